//! Publish/subscribe runs: the phases `fanout`, `http-publish` and `chat` share, and the
//! report sections they have in common ([`report`]).
//!
//! [`Run`] drives a run from the main task. It owns the collector (what subscribers, and
//! chat members, report as [`Event`]s), prints the progress line once a second, watches
//! Ctrl-C, and goes through the phases: [`Run::connect`] (until every connection is up or
//! has failed), [`Run::load`] (until the pacer is done), [`Run::pump`] (while publishers
//! drain), [`Run::settle`] (until deliveries catch up), [`Run::stop`] (stop everyone and
//! collect their summaries). [`run_publishers`] is the whole run of the scenarios whose
//! publishers are separate from their subscribers (fanout, http-publish); chat members
//! publish on their own connections and go through the phases themselves.

pub mod report;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::{Semaphore, mpsc, oneshot, watch};
use tokio::time::{Interval, MissedTickBehavior};

use crate::cli::Common;
use crate::client::Dialer;
use crate::clock::Clock;
use crate::collector::Collector;
use crate::error::Result;
use crate::pacer::{self, PacerOutcome, Schedule, Window};
use crate::publish::{self, PubStats, PublishSpec, Via};
use crate::report::{Generator, Progress, p50_p99};
use crate::stats::{Live, Summary};
use crate::subscriber::{self, Event, SubSpec};
use crate::sysinfo::{self, CpuSample, FdLimit};

/// How publications are offered.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Load {
    /// Publications per second on an open-loop schedule.
    Rate(f64),
    /// This many publishes in flight, a new one as soon as one ends (closed loop).
    Closed(usize),
}

impl Load {
    /// The measured sends; checks the load too.
    pub fn window(self, warmup: Duration, duration: Duration) -> Result<Window> {
        match self {
            Load::Rate(rate) => {
                let window = Window::of(&Schedule::new(Instant::now(), rate)?, warmup, duration);
                if window.count() == 0 {
                    return Err(
                        "nothing to measure: --duration × the rate is under one publication".into(),
                    );
                }
                Ok(window)
            }
            Load::Closed(0) => Err("a closed loop needs at least 1 publish in flight".into()),
            Load::Closed(_) if duration.is_zero() => {
                Err("nothing to measure: --duration is 0".into())
            }
            Load::Closed(_) => Ok(Window::CLOSED_LOOP),
        }
    }

    /// Publications per second offered (0 for a closed loop).
    pub fn rate(self) -> f64 {
        match self {
            Load::Rate(rate) => rate,
            Load::Closed(_) => 0.0,
        }
    }
}

/// What the run loop hands to the report.
#[derive(Clone, Copy, Debug)]
pub struct Outcome {
    pub interrupted: bool,
    /// The load stopped before its end (its transport went away).
    pub cut_short: bool,
    pub measure_start: Instant,
    pub open_at_end: u64,
}

#[cfg(test)]
impl Outcome {
    /// A run that went to the end of its schedule.
    pub fn completed(measure_start: Instant, open_at_end: u64) -> Self {
        Outcome {
            interrupted: false,
            cut_short: false,
            measure_start,
            open_at_end,
        }
    }
}

/// The load phase: how the pacer ended, when the measured window started, and CPU samples
/// at its start and end.
pub struct Loaded {
    pub pacer: Option<PacerOutcome>,
    pub measure_start: Instant,
    pub cpu: (Option<CpuSample>, Option<CpuSample>),
}

impl Loaded {
    pub fn cut_short(&self) -> bool {
        self.pacer.is_none_or(|p| p.cut_short)
    }
}

/// Counter values at one progress tick.
#[derive(Clone, Copy)]
struct Snapshot {
    at: Instant,
    sent: u64,
    delivered: u64,
    cpu: Option<CpuSample>,
}

impl Snapshot {
    fn take(live: &Live) -> Self {
        Snapshot {
            at: Instant::now(),
            sent: Live::get(&live.sent),
            delivered: Live::get(&live.delivered),
            cpu: CpuSample::now(),
        }
    }
}

type CtrlC = Pin<Box<dyn Future<Output = std::io::Result<()>> + Send>>;

/// The main task's side of a publish/subscribe run (see the module docs).
pub struct Run {
    pub live: Arc<Live>,
    pub col: Collector,
    pub interrupted: bool,
    /// Lines for the report's generator section (why a run may not be what was asked).
    pub notes: Vec<String>,
    events: mpsc::UnboundedReceiver<Event>,
    events_open: bool,
    stop_tx: watch::Sender<bool>,
    ticker: Interval,
    ctrl_c: CtrlC,
    started: Instant,
    /// Progress lines count seconds from here (the schedule's start, once there is one).
    origin: Instant,
    cores: usize,
    prev: Snapshot,
}

impl Run {
    /// A run, and the sender its tasks report on (drop the last clone once they are
    /// spawned: the run knows everyone is done when the channel closes).
    pub fn new(cores: usize, notes: Vec<String>) -> (Self, mpsc::UnboundedSender<Event>) {
        let (events_tx, events) = mpsc::unbounded_channel();
        let (stop_tx, _) = watch::channel(false);
        let mut ticker = tokio::time::interval(Duration::from_secs(1));
        ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
        ticker.reset();
        let live = Arc::new(Live::default());
        let prev = Snapshot::take(&live);
        let run = Run {
            live,
            col: Collector::default(),
            interrupted: false,
            notes,
            events,
            events_open: true,
            stop_tx,
            ticker,
            ctrl_c: Box::pin(tokio::signal::ctrl_c()),
            started: Instant::now(),
            origin: Instant::now(),
            cores,
            prev,
        };
        (run, events_tx)
    }

    /// What the run's tasks watch: it turns true when they are to stop.
    pub fn stop_signal(&self) -> watch::Receiver<bool> {
        self.stop_tx.subscribe()
    }

    /// Tells every task to stop (a run given up).
    pub fn abort(&self) {
        let _ = self.stop_tx.send(true);
    }

    fn on_event(&mut self, event: Option<Event>) {
        match event {
            Some(event) => self.col.on(event),
            None => self.events_open = false,
        }
    }

    fn progress(&mut self, phase: &'static str) {
        let now = Snapshot::take(&self.live);
        let prev = std::mem::replace(&mut self.prev, now);
        let secs = now.at.duration_since(prev.at).as_secs_f64().max(1e-9);
        let (cpu_percent, machine_cpu_percent) =
            sysinfo::cpu_between(prev.cpu, now.cpu, self.cores);
        let live = &self.live;
        let line = Progress {
            elapsed: now.at.saturating_duration_since(self.origin),
            phase,
            sent_per_s: now.sent.saturating_sub(prev.sent) as f64 / secs,
            delivered_per_s: now.delivered.saturating_sub(prev.delivered) as f64 / secs,
            p99_ms: self.col.p99_ms(),
            open: Live::get(&live.open),
            lost: Live::get(&live.lost),
            errors: Live::get(&live.errors) + Live::get(&live.publish_failed),
            cpu_percent,
            machine_cpu_percent,
        };
        eprintln!("{line}");
    }

    /// Waits until each of `requested` connections (`what`: "subscribers", "members") is
    /// up or has failed, printing the tally once a second. An error when none came up (of
    /// more than none) or on Ctrl-C.
    pub async fn connect(&mut self, requested: usize, what: &str) -> Result<()> {
        while !self.col.setup.settled(requested) && self.events_open && !self.interrupted {
            tokio::select! {
                ev = self.events.recv() => self.on_event(ev),
                _ = self.ticker.tick() => eprintln!(
                    "[{:>4}s connect] {} ready, {} failed of {}",
                    self.started.elapsed().as_secs(), self.col.setup.ready, self.col.setup.failed, requested
                ),
                _ = &mut self.ctrl_c, if !self.interrupted => self.interrupted = true,
            }
        }
        let setup = &self.col.setup;
        if requested > 0 {
            eprintln!(
                "rtload: {} of {requested} {what} ready in {:.1}s ({} failed); connect {}",
                setup.ready,
                self.started.elapsed().as_secs_f64(),
                setup.failed,
                p50_p99(Summary::of(&setup.connect).as_ref()),
            );
        }
        if (requested > 0 && setup.ready == 0) || self.interrupted {
            self.abort();
            let why = match (&setup.first_failure, self.interrupted) {
                (Some(failure), false) => failure.clone(),
                _ => "interrupted".into(),
            };
            return Err(format!("no run: {why}").into());
        }
        Ok(())
    }

    /// The load, until the pacer (`pacer`) is done; `origin` is its schedule's start and
    /// `measure_start` the first measured send's time. Ctrl-C sets `pacer_stop`.
    pub async fn load(
        &mut self,
        pacer: oneshot::Receiver<PacerOutcome>,
        origin: Instant,
        measure_start: Instant,
        pacer_stop: &AtomicBool,
    ) -> Loaded {
        self.origin = origin;
        let mut cpu_start = None;
        tokio::pin!(pacer);
        let outcome = loop {
            tokio::select! {
                ev = self.events.recv(), if self.events_open => self.on_event(ev),
                _ = self.ticker.tick() => {
                    let phase = if Instant::now() < measure_start { "warmup" } else { "measure" };
                    self.progress(phase);
                }
                _ = tokio::time::sleep_until(measure_start.into()), if cpu_start.is_none() => {
                    cpu_start = CpuSample::now();
                }
                outcome = &mut pacer => break outcome.ok(),
                _ = &mut self.ctrl_c, if !self.interrupted => {
                    self.interrupted = true;
                    pacer_stop.store(true, Ordering::Relaxed);
                }
            }
        };
        Loaded {
            pacer: outcome,
            measure_start,
            cpu: (cpu_start, CpuSample::now()),
        }
    }

    /// Collects events and prints progress (`phase`) until `fut` is done.
    pub async fn pump<F: Future>(&mut self, fut: F, phase: &'static str) -> F::Output {
        tokio::pin!(fut);
        loop {
            tokio::select! {
                ev = self.events.recv(), if self.events_open => self.on_event(ev),
                _ = self.ticker.tick() => self.progress(phase),
                _ = &mut self.ctrl_c, if !self.interrupted => self.interrupted = true,
                out = &mut fut => break out,
            }
        }
    }

    /// Collects events until `done` holds, Ctrl-C, or `timeout`.
    pub async fn settle(&mut self, timeout: Duration, done: impl Fn(&Live, &Collector) -> bool) {
        let deadline = tokio::time::Instant::now() + timeout;
        while !self.interrupted && !done(&self.live, &self.col) {
            tokio::select! {
                ev = self.events.recv(), if self.events_open => self.on_event(ev),
                _ = tokio::time::sleep(Duration::from_millis(20)) => {}
                _ = self.ticker.tick() => self.progress("drain"),
                _ = tokio::time::sleep_until(deadline) => break,
                _ = &mut self.ctrl_c, if !self.interrupted => self.interrupted = true,
            }
        }
    }

    /// Stops the run ([`Run::stop`]; `what` names its connections) and sums it up for the
    /// report: how the run ended, and the generator's view of the measured window.
    pub async fn finish(
        &mut self,
        what: &str,
        loaded: &Loaded,
        fd: Option<FdLimit>,
        fds_needed: u64,
    ) -> (Outcome, Generator) {
        let open_at_end = self.stop(what).await;
        // After the stop: its note about missing summaries belongs in the generator's.
        let generator = self.generator(loaded.cpu, fd, fds_needed);
        let outcome = Outcome {
            interrupted: self.interrupted,
            cut_short: loaded.cut_short(),
            measure_start: loaded.measure_start,
            open_at_end,
        };
        (outcome, generator)
    }

    /// Tells every task to stop and collects their summaries (5 s at most; a note says
    /// how many of `what` did not report). Returns how many connections were open.
    async fn stop(&mut self, what: &str) -> u64 {
        let open_at_end = Live::get(&self.live.open);
        self.abort();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while self.events_open {
            tokio::select! {
                ev = self.events.recv() => self.on_event(ev),
                _ = tokio::time::sleep_until(deadline) => {
                    self.notes.push(format!(
                        "{} {what} did not report within 5 s; their counts are missing",
                        self.col.setup.ready.saturating_sub(self.col.done)
                    ));
                    break;
                }
            }
        }
        open_at_end
    }

    /// The generator's view of itself over the measured window (`cpu`): its notes, the
    /// descriptor limit, the publishers' late sends.
    fn generator(
        &mut self,
        cpu: (Option<CpuSample>, Option<CpuSample>),
        fd: Option<FdLimit>,
        fds_needed: u64,
    ) -> Generator {
        let server = sysinfo::server_between(cpu.0, cpu.1);
        let (cpu_percent, machine_cpu_percent) = sysinfo::cpu_between(cpu.0, cpu.1, self.cores);
        let pubs = &self.col.published;
        Generator {
            cores: self.cores,
            cpu_percent,
            machine_cpu_percent,
            fd_soft_limit: None,
            fd_hard_limit: None,
            fds_needed,
            late_sends: pubs.late_measured,
            max_send_lag_ms: Summary::of(&pubs.lag).map(|s| s.max_ms),
            warnings: std::mem::take(&mut self.notes),
            server,
        }
        .fd(fd)
        .assessed()
    }
}

/// Subscribers on channels and a pool of publishers (fanout, http-publish).
#[derive(Clone, Debug)]
pub struct Plan {
    pub common: Common,
    pub channels: Vec<String>,
    /// Subscriber connections; subscriber `k` is on channel `k % channels`.
    pub subscribers: usize,
    pub via: Via,
    /// Publisher connections.
    pub publishers: usize,
    pub load: Load,
    pub payload_bytes: usize,
}

/// A finished run of a [`Plan`]: what its report is made of.
pub struct Finished {
    /// Everything subscribers reported; `published`, the publishers' counts.
    pub col: Collector,
    pub outcome: Outcome,
    pub generator: Generator,
}

/// Runs a [`Plan`]: subscribers connect, the publishers open, the load runs (warmup, then
/// the measured window), publishers drain their acknowledgements, deliveries settle (at
/// most `--drain` each), everyone stops. Progress goes to stderr.
pub async fn run_publishers(plan: &Plan) -> Result<Finished> {
    let common = &plan.common;
    if plan.channels.is_empty() || plan.publishers == 0 {
        return Err("at least one channel and one publisher connection are needed".into());
    }
    let clock = Clock::new();
    let cores = sysinfo::cores();
    let fds_needed = (plan.subscribers + plan.publishers + 64) as u64;
    let (fd, notes) = sysinfo::prepare_fds(fds_needed);
    let window = plan.load.window(common.warmup, common.duration)?;
    let dialer = Arc::new(Dialer::new(&common.url, common).await?);
    let (mut run, events_tx) = Run::new(cores, notes);
    let specs = SubSpec::per_channel(&plan.channels, common.encoding, window, clock);
    let permits = Arc::new(Semaphore::new(common.connect_concurrency.max(1)));
    for index in 0..plan.subscribers {
        tokio::spawn(subscriber::subscriber(
            index,
            dialer.clone(),
            permits.clone(),
            specs[index % specs.len()].clone(),
            run.live.clone(),
            events_tx.clone(),
            run.stop_signal(),
        ));
    }
    drop(events_tx);
    run.connect(plan.subscribers, "subscribers").await?;

    // Publish: open the publishers, then start the pacer (or the closed loop).
    let slots = match plan.load {
        Load::Closed(in_flight) => Some(Arc::new(Semaphore::new(in_flight))),
        Load::Rate(_) => None,
    };
    let pub_spec = Arc::new(PublishSpec {
        via: plan.via,
        channels: plan.channels.clone(),
        pad: "x".repeat(plan.payload_bytes),
        http_base: common.http.clone(),
        api_key: common.api_key.clone(),
        connections: plan.publishers,
        window,
        clock,
        drain: common.drain,
        slots: slots.clone(),
    });
    let (tx, publisher) = match publish::start(pub_spec, dialer.clone(), run.live.clone()).await {
        Ok(started) => started,
        Err(e) => {
            run.abort();
            return Err(format!("cannot start the publisher: {e}").into());
        }
    };
    let pacer_stop = Arc::new(AtomicBool::new(false));
    let (pacer_done, origin, measure_start) = match (plan.load, slots) {
        (Load::Closed(_), Some(slots)) => {
            let origin = Instant::now();
            let measure_start = origin + common.warmup;
            let done = pacer::spawn_closed_loop(
                tx,
                slots,
                measure_start,
                measure_start + common.duration,
                pacer_stop.clone(),
            );
            (done, origin, measure_start)
        }
        (load, _) => {
            let schedule = Schedule::new(Instant::now() + Duration::from_millis(20), load.rate())?;
            let done = pacer::spawn(schedule, window.end, tx, pacer_stop.clone())?;
            (done, schedule.start(), schedule.at(window.first))
        }
    };
    let loaded = run
        .load(pacer_done, origin, measure_start, &pacer_stop)
        .await;
    if loaded.cut_short() && !run.interrupted {
        let emitted = loaded.pacer.map_or(0, |p| p.emitted);
        run.notes.push(format!(
            "the publisher stopped taking sends after {emitted} (its connections failed)"
        ));
    }

    // Drain: outstanding acks, then deliveries of acknowledged publications.
    let finish = tokio::spawn(publisher.finish());
    let pub_stats = match run.pump(finish, "drain").await {
        Ok(stats) => stats,
        Err(e) => {
            let mut stats = PubStats::new();
            stats.errors.add(format!("publisher task failed: {e}"), 1);
            stats
        }
    };
    // Every subscriber of a channel gets each of its publications (channels get equal
    // shares of subscribers and of publications).
    let expected_now =
        pub_stats.ok_measured * Live::get(&run.live.open) / plan.channels.len() as u64;
    run.col.published.merge(pub_stats);
    if plan.subscribers > 0 {
        run.settle(common.drain, |live, _| {
            Live::get(&live.delivered_measured) >= expected_now
        })
        .await;
    }

    let (outcome, generator) = run.finish("subscribers", &loaded, fd, fds_needed).await;
    Ok(Finished {
        col: run.col,
        outcome,
        generator,
    })
}
