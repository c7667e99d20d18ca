//! Request/reply load, shared by the `ping` and `rpc` scenarios: N connections, one
//! open-loop schedule spread over them round-robin ([`crate::pacer::Spread`]), each call
//! timed from its intended send time to its final reply, replies matched by id.
//!
//! Phases: connect (bounded concurrency) → warmup → measure → drain (every call in flight
//! gets its reply or is given up after the timeout) → stop and collect. The measured
//! window is by schedule sequence number, as in fanout: a late reply to a measured call
//! counts, a warmup call never does.
//!
//! Parts: [`tracker`] (pure: classifying messages, calls in flight by id, counts),
//! [`conn`] (a connection's writer and reader tasks), [`collector`], [`report`].

pub mod collector;
pub mod conn;
#[cfg(test)]
mod mock_tests;
pub mod report;
pub mod tracker;

use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::{Semaphore, mpsc, watch};
use tokio::time::MissedTickBehavior;
use tokio_tungstenite::tungstenite::Message;

use crate::cli::Common;
use crate::client::Dialer;
use crate::error::Result;
use crate::pacer::{self, Schedule, Spread, Tick, Window};
use crate::report::{Generator, p50_p99, print_and_write};
use crate::stats::Summary;
use crate::sysinfo::{self, CpuSample};
use crate::wire::{Bare, Encoding, Rpc};
pub use collector::Collector;
use conn::{Event, Spec};

/// The command each call sends.
#[derive(Clone, Debug, PartialEq)]
pub enum Call {
    /// `{"id": n, "op": "ping"}`.
    Ping,
    /// `{"id": n, "op": "rpc", "method": M, "data": D}` (no `data` when `None`).
    Rpc {
        method: String,
        data: Option<serde_json::Value>,
    },
}

impl Call {
    pub fn encode(&self, encoding: Encoding, id: u32) -> Result<Message> {
        match self {
            Call::Ping => encoding.encode(&Bare { id, op: "ping" }),
            Call::Rpc { method, data } => encoding.encode(&Rpc {
                id,
                op: "rpc",
                method,
                data: data.as_ref(),
            }),
        }
    }
}

/// The offered load: a total rate, or a rate per requested connection.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Rate {
    Total(f64),
    PerConn(f64),
}

impl Rate {
    /// Calls per second over all connections. Per-connection rates multiply the
    /// *requested* connections: the offered load does not shrink when some fail to connect
    /// (the others then each take a little more).
    pub fn total(self, connections: usize) -> f64 {
        match self {
            Rate::Total(r) => r,
            Rate::PerConn(r) => r * connections as f64,
        }
    }
}

/// What a scenario asks for.
#[derive(Clone, Debug)]
pub struct Plan {
    pub scenario: &'static str,
    pub common: Common,
    pub call: Call,
    pub connections: usize,
    pub rate: Rate,
    /// A call without a reply this long after it was written counts as `no reply`.
    pub timeout: Duration,
}

impl Plan {
    pub fn total_rate(&self) -> f64 {
        self.rate.total(self.connections)
    }

    /// The measured sends; checks the rate too.
    pub fn window(&self) -> Result<Window> {
        let schedule = Schedule::new(Instant::now(), self.total_rate())?;
        Ok(Window::of(
            &schedule,
            self.common.warmup,
            self.common.duration,
        ))
    }
}

/// Counters read by the once-a-second progress line (and the drain, which waits for
/// `outstanding` to reach zero). All calls, warmup included.
#[derive(Default, Debug)]
pub struct Live {
    /// Sends the pacer routed to a connection, and those a connection's writer took.
    pub routed: AtomicU64,
    pub taken: AtomicU64,
    /// Calls written to a socket.
    pub sent: AtomicU64,
    pub ok: AtomicU64,
    /// 113 replies.
    pub busy: AtomicU64,
    /// Calls that ended otherwise: other error replies, no reply, connection lost.
    pub failed: AtomicU64,
    pub parts: AtomicU64,
    /// Connection-level trouble (closes, undecodable frames, `disconnect` pushes).
    pub errors: AtomicU64,
    /// Calls written and not ended yet.
    pub outstanding: AtomicU64,
    /// Connections open.
    pub open: AtomicU64,
}

impl Live {
    #[inline]
    pub fn add(counter: &AtomicU64, n: u64) {
        if n > 0 {
            counter.fetch_add(n, Ordering::Relaxed);
        }
    }

    /// Saturating: a gauge must not wrap around if ever decremented once too often.
    pub fn sub(counter: &AtomicU64, n: u64) {
        let _ = counter.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| {
            Some(v.saturating_sub(n))
        });
    }

    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
}

/// What the run loop hands to the report.
pub struct Outcome {
    pub interrupted: bool,
    pub cut_short: bool,
    pub measure_start: Instant,
    pub open_at_end: u64,
    /// Measured sends the pacer could not hand to any connection.
    pub unrouted: u64,
}

/// Runs the plan, prints the report (and writes it as JSON if asked).
pub async fn run(plan: Plan) -> Result<ExitCode> {
    let report = measure(&plan).await?;
    print_and_write(&report.render(), &report, plan.common.json_out.as_deref())?;
    // A run in which no measured call got any reply measured nothing.
    if report.calls.replied == 0 {
        eprintln!("rtload: nothing was measured (no measured call got a reply)");
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}

/// Runs the plan: connect, call on schedule, drain, collect. Progress goes to stderr.
pub async fn measure(plan: &Plan) -> Result<report::CallsReport> {
    let common = &plan.common;
    let cores = sysinfo::cores();
    if plan.connections == 0 {
        return Err("--connections must be at least 1".into());
    }
    if plan.timeout.is_zero() {
        return Err("--timeout-ms must be at least 1".into());
    }
    let window = plan.window()?;
    if window.count() == 0 {
        return Err("nothing to measure: --duration × the rate is under one call".into());
    }
    let fds_needed = (plan.connections + 64) as u64;
    let (fd, mut notes) = sysinfo::prepare_fds(fds_needed);
    let dialer = Arc::new(Dialer::new(&common.url, common).await?);
    let live = Arc::new(Live::default());
    let (events_tx, mut events) = mpsc::unbounded_channel();
    let (stop_tx, stop_rx) = watch::channel(false);
    let spec = Arc::new(Spec {
        call: plan.call.clone(),
        encoding: common.encoding,
        window,
        timeout: plan.timeout,
        flush_every: Duration::from_secs(1),
        by_seq: false,
    });
    let permits = Arc::new(Semaphore::new(common.connect_concurrency.max(1)));
    eprintln!(
        "rtload {}: {} over {} connections ({}), {}/s for {:?} after {:?} warmup, timeout {:?}",
        plan.scenario,
        report::call_name(&plan.call),
        plan.connections,
        common.encoding,
        plan.total_rate(),
        common.duration,
        common.warmup,
        plan.timeout,
    );
    let started = Instant::now();
    for index in 0..plan.connections {
        tokio::spawn(conn::connection(
            index,
            dialer.clone(),
            permits.clone(),
            spec.clone(),
            live.clone(),
            events_tx.clone(),
            stop_rx.clone(),
        ));
    }
    drop(events_tx);

    let mut col = Collector::default();
    let mut routes: Vec<mpsc::UnboundedSender<Tick>> = Vec::with_capacity(plan.connections);
    let mut events_open = true;
    let mut interrupted = false;
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    let mut ticker = tokio::time::interval(Duration::from_secs(1));
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    ticker.reset();

    // Connect.
    while !col.setup.settled(plan.connections) && events_open && !interrupted {
        tokio::select! {
            ev = events.recv() => match ev {
                Some(Event::Ready { connect, ticks }) => {
                    routes.push(ticks);
                    col.setup.on_ready(connect);
                }
                Some(ev) => col.on(ev),
                None => events_open = false,
            },
            _ = ticker.tick() => eprintln!(
                "[{:>4}s connect] {} ready, {} failed of {}",
                started.elapsed().as_secs(), col.setup.ready, col.setup.failed, plan.connections
            ),
            _ = &mut ctrl_c, if !interrupted => interrupted = true,
        }
    }
    eprintln!(
        "rtload: {} of {} connections ready in {:.1}s ({} failed); connect {}",
        col.setup.ready,
        plan.connections,
        started.elapsed().as_secs_f64(),
        col.setup.failed,
        p50_p99(Summary::of(&col.setup.connect).as_ref()),
    );
    if routes.is_empty() || interrupted {
        let _ = stop_tx.send(true);
        let why = match (&col.setup.first_failure, interrupted) {
            (Some(failure), false) => failure.clone(),
            _ => "interrupted".into(),
        };
        return Err(format!("no run: {why}").into());
    }
    if col.setup.failed > 0 {
        notes.push(format!(
            "{} of {} connections could not be set up; the offered {}/s went to the {} that were",
            col.setup.failed,
            plan.connections,
            plan.total_rate(),
            routes.len()
        ));
    }

    // Calls: the pacer routes each send to its connection's writer.
    let spread = Spread::new(routes.len())?;
    let schedule = Schedule::new(
        Instant::now() + Duration::from_millis(20),
        plan.total_rate(),
    )?;
    let measure_start = schedule.at(window.first);
    eprintln!(
        "rtload: {}/s over {} connections: each sends every {:.1} ms",
        plan.total_rate(),
        routes.len(),
        spread.per_conn_interval(plan.total_rate()).as_secs_f64() * 1000.0
    );
    let pacer_stop = Arc::new(AtomicBool::new(false));
    let unrouted = Arc::new(AtomicU64::new(0));
    let deliver = router(routes, live.clone(), window, unrouted.clone())?;
    let mut pacer_done = pacer::spawn_with(schedule, window.end, pacer_stop.clone(), deliver)?;
    let mut cpu_start: Option<CpuSample> = None;
    let mut prev = Snapshot::take(&live);
    let cut_short = loop {
        tokio::select! {
            ev = events.recv(), if events_open => match ev {
                Some(ev) => col.on(ev),
                None => events_open = false,
            },
            _ = ticker.tick() => {
                let phase = if Instant::now() < measure_start { "warmup" } else { "measure" };
                prev = progress(&live, &col, prev, phase, schedule.start(), cores);
            }
            _ = tokio::time::sleep_until(measure_start.into()), if cpu_start.is_none() => {
                cpu_start = CpuSample::now();
            }
            outcome = &mut pacer_done => match outcome {
                Ok(o) => break o.cut_short,
                Err(_) => break true,
            },
            _ = &mut ctrl_c, if !interrupted => {
                interrupted = true;
                pacer_stop.store(true, Ordering::Relaxed);
            }
        }
    };
    let cpu_end = CpuSample::now();

    // Drain: every call routed is taken by its writer, and every call written ends (reply,
    // or given up after the timeout, checked once a second).
    let deadline = tokio::time::Instant::now() + plan.timeout + Duration::from_secs(2);
    let settled = |live: &Live| {
        Live::get(&live.taken) >= Live::get(&live.routed) && Live::get(&live.outstanding) == 0
    };
    while !interrupted && !settled(&live) {
        tokio::select! {
            ev = events.recv(), if events_open => match ev {
                Some(ev) => col.on(ev),
                None => events_open = false,
            },
            _ = tokio::time::sleep(Duration::from_millis(20)) => {}
            _ = ticker.tick() => prev = progress(&live, &col, prev, "drain", schedule.start(), cores),
            _ = tokio::time::sleep_until(deadline) => break,
            _ = &mut ctrl_c => interrupted = true,
        }
    }

    // Stop the connections and collect their summaries.
    let open_at_end = Live::get(&live.open);
    let _ = stop_tx.send(true);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while events_open {
        tokio::select! {
            ev = events.recv() => match ev {
                Some(ev) => col.on(ev),
                None => events_open = false,
            },
            _ = tokio::time::sleep_until(deadline) => {
                notes.push(format!(
                    "{} connections did not report within 5 s; their counts are missing",
                    col.setup.ready.saturating_sub(col.done)
                ));
                break;
            }
        }
    }

    let server = sysinfo::server_between(cpu_start, cpu_end);
    let (cpu_percent, machine_cpu_percent) = sysinfo::cpu_between(cpu_start, cpu_end, cores);
    let generator = Generator {
        cores,
        cpu_percent,
        machine_cpu_percent,
        fd_soft_limit: None,
        fd_hard_limit: None,
        fds_needed,
        late_sends: col.stats.late_measured,
        max_send_lag_ms: Summary::of(&col.hists.lag).map(|s| s.max_ms),
        warnings: notes,
        server,
    }
    .fd(fd)
    .assessed();
    let outcome = Outcome {
        interrupted,
        cut_short,
        measure_start,
        open_at_end,
        unrouted: Live::get(&unrouted),
    };
    Ok(report::build(plan, window, &outcome, &col, generator))
}

/// The pacer's transport for request/reply load: send `n` goes to connection `n % N`'s
/// writer ([`Spread`]). A send for a connection whose writer is gone ends at once as
/// failed, and counts in `unrouted` when it is measured.
pub fn router(
    routes: Vec<mpsc::UnboundedSender<Tick>>,
    live: Arc<Live>,
    window: Window,
    unrouted: Arc<AtomicU64>,
) -> Result<impl FnMut(Tick) -> bool + Send + 'static> {
    let spread = Spread::new(routes.len())?;
    Ok(move |tick: Tick| {
        Live::add(&live.routed, 1);
        if routes[spread.conn_of(tick.seq)].send(tick).is_err() {
            // That connection's writer is gone (it keeps its queue until the end otherwise,
            // even after its socket closed).
            Live::add(&live.taken, 1);
            Live::add(&live.failed, 1);
            if window.contains(tick.seq) {
                Live::add(&unrouted, 1);
            }
        }
        true
    })
}

/// Counter values at one progress tick.
#[derive(Clone, Copy)]
struct Snapshot {
    at: Instant,
    sent: u64,
    ok: u64,
    cpu: Option<CpuSample>,
}

impl Snapshot {
    fn take(live: &Live) -> Self {
        Snapshot {
            at: Instant::now(),
            sent: Live::get(&live.sent),
            ok: Live::get(&live.ok),
            cpu: CpuSample::now(),
        }
    }
}

fn progress(
    live: &Live,
    col: &Collector,
    prev: Snapshot,
    phase: &'static str,
    start: Instant,
    cores: usize,
) -> Snapshot {
    let now = Snapshot::take(live);
    let secs = now.at.duration_since(prev.at).as_secs_f64().max(1e-9);
    let (cpu_percent, machine_cpu_percent) = sysinfo::cpu_between(prev.cpu, now.cpu, cores);
    let line = report::Progress {
        elapsed: now.at.saturating_duration_since(start),
        phase,
        sent_per_s: (now.sent - prev.sent) as f64 / secs,
        ok_per_s: (now.ok - prev.ok) as f64 / secs,
        p99_ms: col.p99_ms(),
        open: Live::get(&live.open),
        in_flight: Live::get(&live.outstanding),
        busy: Live::get(&live.busy),
        parts: Live::get(&live.parts),
        errors: Live::get(&live.failed) + Live::get(&live.errors),
        cpu_percent,
        machine_cpu_percent,
    };
    eprintln!("{line}");
    now
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn per_connection_rates_multiply_the_requested_connections() {
        assert_eq!(Rate::PerConn(2.0).total(1000), 2000.0);
        assert_eq!(Rate::Total(20.0).total(50), 20.0);
    }

    #[test]
    fn calls_encode_as_the_protocol_commands() {
        let Message::Text(ping) = Call::Ping.encode(Encoding::Json, 7).unwrap() else {
            panic!("json must be a text frame")
        };
        assert_eq!(ping.as_str(), r#"{"id":7,"op":"ping"}"#);
        let rpc = Call::Rpc {
            method: "auth.hash_password".into(),
            data: Some(serde_json::json!({"password": "correct horse"})),
        };
        let Message::Text(text) = rpc.encode(Encoding::Json, 8).unwrap() else {
            panic!("json must be a text frame")
        };
        assert_eq!(
            text.as_str(),
            r#"{"id":8,"op":"rpc","method":"auth.hash_password","data":{"password":"correct horse"}}"#
        );
        let Message::Binary(bin) = rpc.encode(Encoding::Msgpack, 8).unwrap() else {
            panic!("msgpack must be a binary frame")
        };
        let back: serde_json::Value = rmp_serde::from_slice(&bin).unwrap();
        assert_eq!(back["data"]["password"], "correct horse");
    }
}
