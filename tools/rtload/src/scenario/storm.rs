//! `storm`: a reconnect storm, measured. N clients on gateway A, each subscribed to one of
//! C channels (`connect` with `subs`); an open-loop publisher on those channels (HTTP,
//! through gateway B by default, so it does not die with A); M more clients pinging
//! gateway B. Once all are up rtload prints a `READY` line and waits: someone kills and
//! restarts gateway A (bench/storm/run does), or, with `--drop-after`, rtload itself
//! drops every storm client's socket at once (a server that stays up: a load balancer or
//! a network path failing; bench/compare/run does this to both systems). Every storm
//! client then reconnects with
//! exponential backoff and full jitter (or the server's `retry_after_ms` plus a little),
//! resuming its session and recovering its channel from the last offset it saw.
//!
//! Measured: the time from the first disconnect to the last client back and recovered,
//! each client's outage, attempts and 4007 refusals, every publication accounted for per
//! client (recovered + live = every offset exactly once: lost, duplicates), and the ping
//! round trip on B before, during and after the storm.
//!
//! Phases: connect → steady (READY; waits up to `--wait-storm` for a disconnect) → storm
//! (until every client is back, quiet for [`QUIET`], or `--recovery-timeout`) → drain (the
//! publisher runs `--drain` longer) → settle (acks, last deliveries) → stop and collect.
//! The ping clients reuse the request/reply engine ([`crate::calls`]); their round trips
//! are split into phases afterwards by schedule sequence number.

pub mod client;
mod report;

use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::{Semaphore, mpsc, watch};
use tokio::time::MissedTickBehavior;

use crate::calls::{self, Call, conn};
use crate::cli::Common;
use crate::client::{Dialer, parse_ws_url};
use crate::clock::{Clock, parse_duration};
use crate::collector::Setup;
use crate::error::Result;
use crate::pacer::{self, Schedule, Window};
use crate::publish::{self, PubStats, PublishSpec, Via};
use crate::report::{Generator, cpu_suffix, fmt_ms, p50_p99, print_and_write};
use crate::stats::{self, Hist, Summary};
use crate::sysinfo::{self, CpuSample};
use client::{Backoff, Event};
pub use report::StormReport;

/// The storm is over when no client is down and none has come back or gone down for
/// this long (clients that lose their socket seconds apart are one storm).
pub const QUIET: Duration = Duration::from_millis(1000);

/// Every send of an open-ended run is measured.
const ALL: Window = Window {
    first: 0,
    end: u64::MAX,
};

#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    #[command(flatten)]
    pub common: Common,

    /// Storm clients, on --url (gateway A).
    #[arg(long, default_value_t = 5000)]
    pub clients: usize,

    /// Channels `<prefix><i>`; client k subscribes to channel k % channels.
    #[arg(long, default_value_t = 50)]
    pub channels: usize,

    /// Channel name prefix (its namespace must keep history and allow anonymous clients).
    #[arg(long, default_value = "chat:storm-")]
    pub channel_prefix: String,

    /// Gateway B, for the ping clients (ws://); without it, no ping clients.
    #[arg(long)]
    pub ping_url: Option<String>,

    /// Clients pinging gateway B during the whole run.
    #[arg(long, default_value_t = 500)]
    pub ping_clients: usize,

    /// Pings per second per ping client (one open-loop schedule over all of them).
    #[arg(long, default_value_t = 1.0)]
    pub ping_rate_per_conn: f64,

    /// A ping with no reply this long after it was sent counts as `no reply`.
    #[arg(long, default_value_t = 10_000)]
    pub ping_timeout_ms: u64,

    /// HTTP base URL to publish through (`POST /api/publish`); default: the gateway of
    /// --ping-url (B, which survives the storm), else --http.
    #[arg(long)]
    pub publish_url: Option<String>,

    /// Publications per second over all channels (round-robin), open loop.
    #[arg(long, default_value_t = 100.0)]
    pub rate: f64,

    /// Keep-alive HTTP connections publishing.
    #[arg(long, default_value_t = 4)]
    pub publishers: usize,

    /// Length of the padding string in each publication's data.
    #[arg(long, default_value_t = 64)]
    pub payload_bytes: usize,

    /// Reconnect backoff: the first ceiling (doubling per failed attempt).
    #[arg(long, value_parser = parse_duration, default_value = "100ms")]
    pub backoff_base: Duration,

    /// Reconnect backoff: the largest ceiling.
    #[arg(long, value_parser = parse_duration, default_value = "5s")]
    pub backoff_cap: Duration,

    /// After READY, how long to wait for the storm (a storm client losing its socket).
    #[arg(long, value_parser = parse_duration, default_value = "120s")]
    pub wait_storm: Duration,

    /// Make the storm: this long after READY, every storm client drops its socket at
    /// once (TCP shutdown, no WebSocket close) and reconnects as after any loss. Without
    /// it, rtload waits for someone else to break the connections (kill gateway A).
    #[arg(long, value_parser = parse_duration)]
    pub drop_after: Option<Duration>,

    /// After the first disconnect, how long every client has to come back.
    #[arg(long, value_parser = parse_duration, default_value = "120s")]
    pub recovery_timeout: Duration,
}

impl Args {
    fn channel_names(&self) -> Vec<String> {
        (0..self.channels)
            .map(|i| format!("{}{i}", self.channel_prefix))
            .collect()
    }

    /// Where publications go: --publish-url, else gateway B's HTTP side, else --http.
    pub fn publish_url(&self) -> Result<String> {
        if let Some(url) = &self.publish_url {
            return Ok(url.clone());
        }
        match &self.ping_url {
            Some(ping) => Ok(format!("http://{}", parse_ws_url(ping)?.authority)),
            None => Ok(self.common.http.clone()),
        }
    }

    fn backoff(&self) -> Backoff {
        Backoff {
            base: self.backoff_base,
            cap: self.backoff_cap.max(self.backoff_base),
        }
    }

    fn ping_wanted(&self) -> usize {
        if self.ping_url.is_some() {
            self.ping_clients
        } else {
            0
        }
    }
}

/// The storm clients' collector: setup, outages as they happen, and the clients' final
/// summaries.
pub struct Storm {
    pub setup: Setup,
    /// Refusals for load (4007) during the first connects, retried.
    pub setup_refused: u64,
    /// When READY was printed: losses before it are not the storm.
    pub ready_at: Option<Instant>,
    /// Each client's current outage, if it is down.
    down_since: Vec<Option<Instant>>,
    pub ever_lost: usize,
    lost: Vec<bool>,
    pub gave_up: usize,
    pub first_loss: Option<Instant>,
    pub last_back: Option<Instant>,
    /// Last loss or return, for [`QUIET`].
    last_change: Option<Instant>,
    /// Outage durations (loss → back and recovered), one per outage.
    pub outage: Hist,
    /// The successful attempt's connect (TCP + handshake + `connect` with recovery).
    pub reconnect: Hist,
    pub backs: u64,
    pub max_attempts: u32,
    pub resumed: u64,
    pub recovered: u64,
    pub live_delay: Hist,
    pub recovered_delay: Hist,
    pub summaries: Vec<client::Summary>,
}

impl Storm {
    pub fn new(clients: usize) -> Self {
        Storm {
            setup: Setup::default(),
            setup_refused: 0,
            ready_at: None,
            down_since: vec![None; clients],
            ever_lost: 0,
            lost: vec![false; clients],
            gave_up: 0,
            first_loss: None,
            last_back: None,
            last_change: None,
            outage: stats::new_hist(),
            reconnect: stats::new_hist(),
            backs: 0,
            max_attempts: 0,
            resumed: 0,
            recovered: 0,
            live_delay: stats::new_hist(),
            recovered_delay: stats::new_hist(),
            summaries: Vec::new(),
        }
    }

    pub fn on(&mut self, event: Event) {
        match event {
            Event::Ready { connect, refused } => {
                self.setup.on_ready(connect);
                self.setup_refused += u64::from(refused);
            }
            Event::Failed { kind, message } => self.setup.on_failed(kind, message),
            Event::Lost { index, at } => {
                if let Some(slot) = self.down_since.get_mut(index) {
                    *slot = Some(at);
                }
                if let Some(lost) = self.lost.get_mut(index).filter(|l| !**l) {
                    *lost = true;
                    self.ever_lost += 1;
                }
                if self.ready_at.is_some_and(|ready| at >= ready) {
                    self.first_loss.get_or_insert(at);
                }
                self.last_change = Some(at);
            }
            Event::Back(back) => {
                if let Some(slot) = self.down_since.get_mut(back.index) {
                    *slot = None;
                }
                self.backs += 1;
                self.last_back = self.last_back.max(Some(back.at));
                self.last_change = Some(back.at);
                stats::record(&mut self.outage, back.down_for.as_micros() as u64);
                stats::record(&mut self.reconnect, back.connect.as_micros() as u64);
                self.max_attempts = self.max_attempts.max(back.attempts);
                self.resumed += u64::from(back.resumed);
                self.recovered += u64::from(back.recovered);
            }
            Event::GaveUp { index } => {
                if let Some(slot) = self.down_since.get_mut(index) {
                    *slot = None;
                }
                self.gave_up += 1;
                self.last_change = Some(Instant::now());
            }
            Event::Samples(delays) => {
                delays.live.record_into(&mut self.live_delay);
                delays.recovered.record_into(&mut self.recovered_delay);
            }
            Event::Done(summary) => {
                summary.delays.live.record_into(&mut self.live_delay);
                summary
                    .delays
                    .recovered
                    .record_into(&mut self.recovered_delay);
                self.summaries.push(*summary);
            }
        }
    }

    /// Clients down right now.
    pub fn down(&self) -> usize {
        self.down_since.iter().filter(|d| d.is_some()).count()
    }

    /// The storm happened and is over: nobody down, nothing changed for `quiet`.
    pub fn over(&self, now: Instant, quiet: Duration) -> bool {
        self.first_loss.is_some()
            && self.down() == 0
            && self
                .last_change
                .is_some_and(|at| now.saturating_duration_since(at) >= quiet)
    }
}

/// A one-thread runtime beside the main one, shut down (without blocking) when dropped.
struct Background(Option<tokio::runtime::Runtime>);

impl Background {
    fn start(name: &str) -> Result<Self> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name(name)
            .enable_all()
            .build()?;
        Ok(Background(Some(runtime)))
    }

    fn spawn<F>(&self, task: F)
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        if let Some(runtime) = &self.0 {
            drop(runtime.spawn(task));
        }
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        // Dropping a runtime blocks, which is not allowed inside the main one.
        if let Some(runtime) = self.0.take() {
            runtime.shutdown_background();
        }
    }
}

/// The ping side: its open-loop schedule and pacer.
struct PingRun {
    schedule: Schedule,
    rate: f64,
    stop: Arc<AtomicBool>,
    unrouted: Arc<AtomicU64>,
}

/// When things happened, for the report.
pub struct Timeline {
    pub clock: Clock,
    pub ready_at: Instant,
    pub storm_end: Option<Instant>,
    pub interrupted: bool,
}

pub async fn run(args: Args) -> Result<ExitCode> {
    let report = measure(&args).await?;
    print_and_write(&report.render(), &report, args.common.json_out.as_deref())?;
    if !report.storm.happened || report.publish.acked == 0 {
        eprintln!("rtload: nothing was measured (no storm, or no publication acknowledged)");
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn measure(args: &Args) -> Result<StormReport> {
    let common = &args.common;
    if args.clients == 0 || args.channels == 0 {
        return Err("--clients and --channels must be at least 1".into());
    }
    if !(args.ping_rate_per_conn.is_finite() && args.ping_rate_per_conn > 0.0) {
        return Err("--ping-rate-per-conn must be a positive number".into());
    }
    Schedule::new(Instant::now(), args.rate)?;
    let clock = Clock::new();
    let cores = sysinfo::cores();
    let ping_wanted = args.ping_wanted();
    let publishers = args.publishers.max(1);
    let fds_needed = (args.clients + ping_wanted + publishers + 64) as u64;
    let (fd, mut notes) = sysinfo::prepare_fds(fds_needed);
    let publish_url = args.publish_url()?;
    let dialer = Arc::new(Dialer::new(&common.url, common).await?);
    let ping_dialer = match &args.ping_url {
        Some(url) if ping_wanted > 0 => Some(Arc::new(Dialer::new(url, common).await?)),
        _ => None,
    };
    let channels = args.channel_names();
    let spec = Arc::new(client::Spec {
        encoding: common.encoding,
        clock,
        backoff: args.backoff(),
        channels: channels.clone(),
    });
    let live = Arc::new(client::Live::new(args.clients));
    let ping_live = Arc::new(calls::Live::default());
    let (storm_tx, mut storm_events) = mpsc::unbounded_channel();
    let (ping_tx, mut ping_events) = mpsc::unbounded_channel();
    let (stop_tx, stop_rx) = watch::channel(false);
    // How many times rtload has ordered every storm client to drop its socket.
    let (drop_tx, drop_rx) = watch::channel(0u64);
    let permits = Arc::new(Semaphore::new(common.connect_concurrency.max(1)));
    eprintln!(
        "rtload storm: {} clients on {} channels {}0.. at {} ({}); {} ping clients at {}; {}/s published via {}",
        args.clients,
        args.channels,
        args.channel_prefix,
        common.url,
        common.encoding,
        ping_wanted,
        args.ping_url.as_deref().unwrap_or("-"),
        args.rate,
        publish_url,
    );
    let started = Instant::now();
    let seed = clock.now_us();
    for index in 0..args.clients {
        tokio::spawn(client::client(
            index,
            dialer.clone(),
            permits.clone(),
            spec.clone(),
            live.clone(),
            storm_tx.clone(),
            stop_rx.clone(),
            drop_rx.clone(),
            seed ^ (index as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15),
        ));
    }
    drop(storm_tx);
    let ping_spec = Arc::new(conn::Spec {
        call: Call::Ping,
        encoding: common.encoding,
        window: ALL,
        timeout: Duration::from_millis(args.ping_timeout_ms.max(1)),
        flush_every: Duration::from_secs(1),
        by_seq: true,
    });
    // The ping clients run on a runtime of their own: thousands of storm clients
    // reconnecting at once keep the main one busy, and a ping queued behind them would
    // count the generator's delay as gateway B's.
    let ping_runtime = Background::start("rtload-ping")?;
    if let Some(ping_dialer) = &ping_dialer {
        for index in 0..ping_wanted {
            ping_runtime.spawn(conn::connection(
                index,
                ping_dialer.clone(),
                permits.clone(),
                ping_spec.clone(),
                ping_live.clone(),
                ping_tx.clone(),
                stop_rx.clone(),
            ));
        }
    }
    drop(ping_tx);

    let mut storm = Storm::new(args.clients);
    let mut pings = calls::Collector::default();
    let mut routes = Vec::with_capacity(ping_wanted);
    let (mut storm_open, mut ping_open) = (true, true);
    let mut interrupted = false;
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    let mut ticker = tokio::time::interval(Duration::from_secs(1));
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    ticker.reset();

    // Connect.
    while !(storm.setup.settled(args.clients) && pings.setup.settled(ping_wanted))
        && (storm_open || ping_open)
        && !interrupted
    {
        tokio::select! {
            ev = storm_events.recv(), if storm_open => match ev {
                Some(ev) => storm.on(ev),
                None => storm_open = false,
            },
            ev = ping_events.recv(), if ping_open => match ev {
                Some(conn::Event::Ready { connect, ticks }) => {
                    routes.push(ticks);
                    pings.setup.on_ready(connect);
                }
                Some(ev) => pings.on(ev),
                None => ping_open = false,
            },
            _ = ticker.tick() => eprintln!(
                "[{:>4}s connect] storm {} ready, {} failed of {}; ping {} ready, {} failed of {}",
                started.elapsed().as_secs(), storm.setup.ready, storm.setup.failed, args.clients,
                pings.setup.ready, pings.setup.failed, ping_wanted,
            ),
            _ = &mut ctrl_c, if !interrupted => interrupted = true,
        }
    }
    eprintln!(
        "rtload: {} of {} storm clients ready ({} failed; connect {}), {} of {} ping clients ({} failed), in {:.1}s",
        storm.setup.ready,
        args.clients,
        storm.setup.failed,
        p50_p99(Summary::of(&storm.setup.connect).as_ref()),
        pings.setup.ready,
        ping_wanted,
        pings.setup.failed,
        started.elapsed().as_secs_f64(),
    );
    if storm.setup.ready == 0 || interrupted {
        let _ = stop_tx.send(true);
        let why = match (&storm.setup.first_failure, interrupted) {
            (Some(failure), false) => failure.clone(),
            _ => "interrupted".into(),
        };
        return Err(format!("no run: {why}").into());
    }
    for (who, setup, wanted) in [
        ("storm", &storm.setup, args.clients),
        ("ping", &pings.setup, ping_wanted),
    ] {
        if setup.failed > 0 {
            notes.push(format!(
                "{} of {wanted} {who} clients could not be set up (first: {})",
                setup.failed,
                setup.first_failure.as_deref().unwrap_or("?")
            ));
        }
    }

    // Load: the publisher, then the pings.
    let pub_live = Arc::new(stats::Live::default());
    let pub_spec = Arc::new(PublishSpec {
        via: Via::Http,
        channels,
        pad: "x".repeat(args.payload_bytes),
        http_base: publish_url.clone(),
        api_key: common.api_key.clone(),
        connections: publishers,
        window: ALL,
        clock,
        drain: common.drain,
        slots: None,
    });
    let (pub_tx, publisher) = match publish::start(pub_spec, dialer.clone(), pub_live.clone()).await
    {
        Ok(started) => started,
        Err(e) => {
            let _ = stop_tx.send(true);
            return Err(format!("cannot start the publisher ({publish_url}): {e}").into());
        }
    };
    let pub_stop = Arc::new(AtomicBool::new(false));
    let pub_schedule = Schedule::new(Instant::now() + Duration::from_millis(20), args.rate)?;
    let pub_pacer = pacer::spawn(pub_schedule, u64::MAX, pub_tx, pub_stop.clone())?;
    let ping_run = if routes.is_empty() {
        None
    } else {
        let rate = args.ping_rate_per_conn * ping_wanted as f64;
        let schedule = Schedule::new(Instant::now() + Duration::from_millis(20), rate)?;
        let stop = Arc::new(AtomicBool::new(false));
        let unrouted = Arc::new(AtomicU64::new(0));
        let deliver = calls::router(
            std::mem::take(&mut routes),
            ping_live.clone(),
            ALL,
            unrouted.clone(),
        )?;
        // Its outcome is of no interest: it runs until stopped.
        drop(pacer::spawn_with(
            schedule,
            u64::MAX,
            stop.clone(),
            deliver,
        )?);
        Some(PingRun {
            schedule,
            rate,
            stop,
            unrouted,
        })
    };
    let ready_at = Instant::now();
    storm.ready_at = Some(ready_at);
    eprintln!(
        "READY storm_clients={} ping_clients={} channels={} rate={} unix_ms={}",
        storm.setup.ready,
        pings.setup.ready,
        args.channels,
        args.rate,
        clock.now_us() / 1000,
    );

    // Steady state, then the storm, then the drain.
    let mut phase = Phase::Steady;
    let mut cpu_storm: (Option<CpuSample>, Option<CpuSample>) = (None, None);
    let mut storm_end = None;
    let mut drain_until = None;
    let mut dropped = false;
    let mut prev = Snapshot::take(&live, &pub_live, &ping_live);
    loop {
        let now = Instant::now();
        match phase {
            Phase::Steady => {
                if let Some(after) = args.drop_after
                    && !dropped
                    && now >= ready_at + after
                {
                    dropped = true;
                    eprintln!(
                        "DROP every storm client's socket, {:.3}s after READY",
                        now.saturating_duration_since(ready_at).as_secs_f64()
                    );
                    drop_tx.send_modify(|drops| *drops += 1);
                }
                if let Some(first) = storm.first_loss {
                    phase = Phase::Storm;
                    cpu_storm.0 = CpuSample::now();
                    eprintln!(
                        "STORM first disconnect {:.3}s after READY",
                        first.saturating_duration_since(ready_at).as_secs_f64()
                    );
                } else if now >= ready_at + args.wait_storm {
                    notes.push(format!(
                        "no storm: no storm client lost its connection within {:?} of READY",
                        args.wait_storm
                    ));
                    break;
                }
            }
            Phase::Storm => {
                let timed_out = storm
                    .first_loss
                    .is_some_and(|first| now >= first + args.recovery_timeout);
                if storm.over(now, QUIET) || timed_out {
                    if timed_out {
                        notes.push(format!(
                            "{} storm clients were still down {:?} after the first disconnect",
                            storm.down(),
                            args.recovery_timeout
                        ));
                    }
                    phase = Phase::Drain;
                    cpu_storm.1 = CpuSample::now();
                    storm_end = Some(if timed_out {
                        now
                    } else {
                        storm.last_back.unwrap_or(now)
                    });
                    drain_until = Some(now + common.drain);
                    eprintln!(
                        "RECOVERED {} back, {} down, {} gave up; {} after the first disconnect",
                        storm.backs,
                        storm.down(),
                        storm.gave_up,
                        fmt_secs(storm_end.zip(storm.first_loss).map(|(e, f)| e - f)),
                    );
                }
            }
            Phase::Drain => {
                if drain_until.is_some_and(|until| now >= until) {
                    break;
                }
            }
        }
        if interrupted {
            break;
        }
        tokio::select! {
            ev = storm_events.recv(), if storm_open => match ev {
                Some(ev) => storm.on(ev),
                None => storm_open = false,
            },
            ev = ping_events.recv(), if ping_open => match ev {
                Some(ev) => pings.on(ev),
                None => ping_open = false,
            },
            _ = ticker.tick() => {
                prev = progress(&live, &pub_live, &ping_live, &storm, &pings, prev, phase, ready_at, cores);
            }
            _ = tokio::time::sleep(Duration::from_millis(50)) => {}
            _ = &mut ctrl_c, if !interrupted => interrupted = true,
        }
    }
    if cpu_storm.0.is_some() && cpu_storm.1.is_none() {
        cpu_storm.1 = CpuSample::now();
    }

    // Settle: stop the schedules, wait for acks, then for the last deliveries.
    pub_stop.store(true, Ordering::Relaxed);
    if let Some(run) = &ping_run {
        run.stop.store(true, Ordering::Relaxed);
    }
    let _ = pub_pacer.await;
    let finish = tokio::spawn(publisher.finish());
    tokio::pin!(finish);
    let pub_stats: PubStats = loop {
        tokio::select! {
            ev = storm_events.recv(), if storm_open => match ev {
                Some(ev) => storm.on(ev),
                None => storm_open = false,
            },
            ev = ping_events.recv(), if ping_open => match ev {
                Some(ev) => pings.on(ev),
                None => ping_open = false,
            },
            _ = ticker.tick() => {
                prev = progress(&live, &pub_live, &ping_live, &storm, &pings, prev, Phase::Drain, ready_at, cores);
            }
            done = &mut finish => break done?,
        }
    };
    let deadline = tokio::time::Instant::now() + common.drain.max(Duration::from_secs(2));
    let settled = |live: &client::Live, ping_live: &calls::Live| {
        caught_up(live, &spec, &pub_stats) && calls::Live::get(&ping_live.outstanding) == 0
    };
    while !interrupted && !settled(&live, &ping_live) {
        tokio::select! {
            ev = storm_events.recv(), if storm_open => match ev {
                Some(ev) => storm.on(ev),
                None => storm_open = false,
            },
            ev = ping_events.recv(), if ping_open => match ev {
                Some(ev) => pings.on(ev),
                None => ping_open = false,
            },
            _ = tokio::time::sleep(Duration::from_millis(20)) => {}
            _ = tokio::time::sleep_until(deadline) => break,
            _ = &mut ctrl_c, if !interrupted => interrupted = true,
        }
    }

    // Stop everyone and collect their summaries.
    let open_at_end = (
        client::Live::get(&live.open),
        calls::Live::get(&ping_live.open),
    );
    let _ = stop_tx.send(true);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while storm_open || ping_open {
        tokio::select! {
            ev = storm_events.recv(), if storm_open => match ev {
                Some(ev) => storm.on(ev),
                None => storm_open = false,
            },
            ev = ping_events.recv(), if ping_open => match ev {
                Some(ev) => pings.on(ev),
                None => ping_open = false,
            },
            _ = tokio::time::sleep_until(deadline) => {
                notes.push(format!(
                    "{} storm and {} ping clients did not report within 5 s; their counts are missing",
                    storm.setup.ready.saturating_sub(storm.summaries.len()),
                    pings.setup.ready.saturating_sub(pings.done),
                ));
                break;
            }
        }
    }

    let server = sysinfo::server_between(cpu_storm.0, cpu_storm.1);
    let (cpu_percent, machine_cpu_percent) = sysinfo::cpu_between(cpu_storm.0, cpu_storm.1, cores);
    let max_lag = [
        Summary::of(&pub_stats.lag).map(|s| s.max_ms),
        Summary::of(&pings.hists.lag).map(|s| s.max_ms),
    ]
    .into_iter()
    .flatten()
    .reduce(f64::max);
    let generator = Generator {
        cores,
        cpu_percent,
        machine_cpu_percent,
        fd_soft_limit: None,
        fd_hard_limit: None,
        fds_needed,
        late_sends: pub_stats.late_measured + pings.stats.late_measured,
        max_send_lag_ms: max_lag,
        warnings: notes,
        server,
    }
    .fd(fd)
    .assessed();
    let timeline = Timeline {
        clock,
        ready_at,
        storm_end,
        interrupted,
    };
    Ok(report::build(
        args,
        &publish_url,
        &timeline,
        &storm,
        &pings,
        ping_run.as_ref(),
        open_at_end,
        &pub_stats,
        generator,
    ))
}

/// Every storm client that is still in the run has received its channel up to the
/// highest offset the publisher had acknowledged there.
fn caught_up(live: &client::Live, spec: &client::Spec, pubs: &PubStats) -> bool {
    live.last.iter().enumerate().all(|(index, last)| {
        let last = client::Live::get(last);
        let acked = pubs.max_offsets.get(&spec.channel_of(index));
        // u64::MAX: a client that never came up.
        last == u64::MAX || acked.is_none_or(|acked| last >= *acked)
    })
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Steady,
    Storm,
    Drain,
}

impl Phase {
    fn name(self) -> &'static str {
        match self {
            Phase::Steady => "steady",
            Phase::Storm => "storm",
            Phase::Drain => "drain",
        }
    }
}

fn fmt_secs(d: Option<Duration>) -> String {
    d.map_or_else(|| "-".to_string(), |d| format!("{:.3}s", d.as_secs_f64()))
}

/// Counter values at one progress tick.
#[derive(Clone, Copy)]
struct Snapshot {
    at: Instant,
    attempts: u64,
    sent: u64,
    delivered: u64,
    pings: u64,
    cpu: Option<CpuSample>,
}

impl Snapshot {
    fn take(live: &client::Live, pub_live: &stats::Live, ping_live: &calls::Live) -> Self {
        Snapshot {
            at: Instant::now(),
            attempts: client::Live::get(&live.attempts),
            sent: stats::Live::get(&pub_live.sent),
            delivered: client::Live::get(&live.delivered),
            pings: calls::Live::get(&ping_live.ok),
            cpu: CpuSample::now(),
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn progress(
    live: &client::Live,
    pub_live: &stats::Live,
    ping_live: &calls::Live,
    storm: &Storm,
    pings: &calls::Collector,
    prev: Snapshot,
    phase: Phase,
    ready_at: Instant,
    cores: usize,
) -> Snapshot {
    let now = Snapshot::take(live, pub_live, ping_live);
    let secs = now.at.duration_since(prev.at).as_secs_f64().max(1e-9);
    let rate = |a: u64, b: u64| a.saturating_sub(b) as f64 / secs;
    let (cpu, machine) = sysinfo::cpu_between(prev.cpu, now.cpu, cores);
    eprintln!(
        "[{:>4}s {:<6}] up {:>5}  down {:>5}  attempts {:>6.0}/s  refused {}  pubs {:>5.0}/s  delivered {:>7.0}/s  recovered {}  pings {:>5.0}/s p99 {} ms{}",
        now.at
            .saturating_duration_since(ready_at)
            .as_secs_f64()
            .round(),
        phase.name(),
        client::Live::get(&live.open),
        storm.down(),
        rate(now.attempts, prev.attempts),
        client::Live::get(&live.refused),
        rate(now.sent, prev.sent),
        rate(now.delivered, prev.delivered),
        client::Live::get(&live.recovered),
        rate(now.pings, prev.pings),
        fmt_ms(pings.p99_ms()),
        cpu_suffix(cpu, machine),
    );
    now
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::cli::{Cli, Scenario};
    use clap::Parser;

    #[test]
    fn flags_parse_and_publishing_defaults_to_gateway_b() {
        let cli = Cli::try_parse_from([
            "rtload",
            "storm",
            "--url",
            "ws://127.0.0.1:9001/ws",
            "--ping-url",
            "ws://127.0.0.1:9002/ws",
            "--clients",
            "5000",
            "--channels",
            "50",
            "--ping-clients",
            "500",
            "--rate",
            "200",
        ])
        .unwrap();
        let Scenario::Storm(args) = cli.scenario else {
            panic!("storm expected")
        };
        assert_eq!(
            (args.clients, args.channels, args.ping_wanted()),
            (5000, 50, 500)
        );
        assert_eq!(args.publish_url().unwrap(), "http://127.0.0.1:9002");
        assert_eq!(args.channel_names()[49], "chat:storm-49");
        assert_eq!(args.backoff().base, Duration::from_millis(100));
        let Scenario::Storm(args) = Cli::try_parse_from([
            "rtload",
            "storm",
            "--publish-url",
            "http://10.0.0.1:8080",
            "--ping-clients",
            "9",
        ])
        .unwrap()
        .scenario
        else {
            panic!("storm expected")
        };
        assert_eq!(args.publish_url().unwrap(), "http://10.0.0.1:8080");
        assert_eq!(args.ping_wanted(), 0, "no --ping-url, no ping clients");
    }

    fn back(index: usize, at: Instant, down_for: Duration) -> Event {
        Event::Back(client::Back {
            index,
            at,
            down_for,
            connect: Duration::from_millis(3),
            attempts: 2,
            resumed: true,
            recovered: true,
        })
    }

    #[test]
    fn the_storm_runs_from_the_first_loss_to_the_last_return() {
        let t0 = Instant::now();
        let mut s = Storm::new(3);
        for _ in 0..3 {
            s.on(Event::Ready {
                connect: Duration::from_millis(1),
                refused: 1,
            });
        }
        // A loss before READY is not the storm.
        s.on(Event::Lost { index: 0, at: t0 });
        s.on(back(0, t0, Duration::ZERO));
        s.ready_at = Some(t0 + Duration::from_secs(1));
        assert!(!s.over(t0 + Duration::from_secs(9), QUIET));
        let kill = t0 + Duration::from_secs(5);
        for i in 0..3 {
            s.on(Event::Lost { index: i, at: kill });
        }
        assert_eq!((s.down(), s.first_loss, s.ever_lost), (3, Some(kill), 3));
        s.on(back(
            1,
            kill + Duration::from_secs(1),
            Duration::from_secs(1),
        ));
        s.on(Event::GaveUp { index: 2 });
        assert!(
            !s.over(kill + Duration::from_secs(10), QUIET),
            "one still down"
        );
        let last = kill + Duration::from_secs(2);
        s.on(back(0, last, Duration::from_secs(2)));
        assert_eq!(s.down(), 0);
        assert!(!s.over(last, QUIET), "quiet for a moment first");
        assert!(s.over(last + QUIET, QUIET));
        assert_eq!(s.last_back, Some(last));
        assert_eq!((s.backs, s.resumed, s.recovered, s.gave_up), (3, 3, 3, 1));
        assert_eq!(s.setup_refused, 3);
        assert_eq!(s.outage.len(), 3);
    }
}
