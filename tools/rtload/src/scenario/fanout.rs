//! `fanout`: N subscribers on one channel, publications at a fixed rate (open loop), and
//! publish-to-deliver latency as every subscriber sees it.
//!
//! Phases: connect (bounded concurrency) → warmup (load, samples discarded) → measure →
//! drain (outstanding acks and deliveries) → stop and collect. The measured window is
//! defined by sequence numbers from the schedule, so a late delivery of a measured
//! publication still counts, and a warmup publication never does.

mod report;

use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tokio::sync::{Semaphore, mpsc, watch};
use tokio::time::MissedTickBehavior;

use crate::cli::Common;
use crate::client::Dialer;
use crate::clock::Clock;
use crate::collector::Collector;
use crate::error::Result;
use crate::pacer::{self, Schedule, Window};
use crate::publish::{self, PublishSpec, Via};
use crate::report::{self as common_report, Generator, Progress};
use crate::stats::Live;
use crate::subscriber::{self, SubSpec};
use crate::sysinfo::{self, CpuSample};

#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    #[command(flatten)]
    pub common: Common,

    /// Subscriber connections.
    #[arg(long, default_value_t = 1000)]
    pub subscribers: usize,

    /// Publications per second, on an open-loop schedule.
    #[arg(long, default_value_t = 1000.0)]
    pub rate: f64,

    /// Channel to publish on and subscribe to (its namespace must allow anonymous clients,
    /// and client publishes for --publish-via ws).
    #[arg(long, default_value = "bench:fanout")]
    pub channel: String,

    /// Length of the padding string in each publication's data (beside `t` and `seq`).
    #[arg(long, default_value_t = 64)]
    pub payload_bytes: usize,

    /// Publish with the WebSocket `publish` op or with `POST /api/publish`.
    #[arg(long, value_enum, default_value_t = Via::Ws)]
    pub publish_via: Via,

    /// Publisher connections (default: 1 WebSocket, or 4 keep-alive HTTP connections).
    #[arg(long)]
    pub publishers: Option<usize>,
}

impl Args {
    fn publishers(&self) -> usize {
        self.publishers
            .unwrap_or(match self.publish_via {
                Via::Ws => 1,
                Via::Http => 4,
            })
            .max(1)
    }
}

/// What the run loop hands to the report.
pub struct Outcome {
    pub interrupted: bool,
    pub cut_short: bool,
    pub measure_start: Instant,
    pub open_at_end: u64,
}

pub async fn run(args: Args) -> Result<ExitCode> {
    let common = &args.common;
    let clock = Clock::new();
    let cores = sysinfo::cores();
    let publishers = args.publishers();
    let fds_needed = (args.subscribers + publishers + 64) as u64;
    let (fd, fd_note) = sysinfo::raise_fd_limit();
    let mut notes: Vec<String> = fd_note.into_iter().collect();
    if let Some(soft) = fd.and_then(|fd| fd.soft).filter(|soft| *soft < fds_needed) {
        eprintln!(
            "rtload: warning: descriptor limit {soft} < ~{fds_needed} needed; connections will fail"
        );
    }

    if args.subscribers == 0 {
        return Err("--subscribers must be at least 1".into());
    }
    let window = Window::of(
        &Schedule::new(Instant::now(), args.rate)?,
        common.warmup,
        common.duration,
    );
    if window.count() == 0 {
        return Err("nothing to measure: --duration × --rate is under one publication".into());
    }
    let dialer = Arc::new(
        Dialer::new(
            &common.url,
            &common.bind_ip,
            common.encoding,
            common.connect_timeout,
        )
        .await?,
    );
    let live = Arc::new(Live::default());
    let (events_tx, mut events) = mpsc::unbounded_channel();
    let (stop_tx, stop_rx) = watch::channel(false);
    let spec = Arc::new(SubSpec {
        channel: args.channel.clone(),
        encoding: common.encoding,
        window,
        clock,
        flush_every: Duration::from_secs(1),
    });
    let permits = Arc::new(Semaphore::new(common.connect_concurrency.max(1)));
    eprintln!(
        "rtload fanout: {} subscribers on {} ({}), {} publisher(s) via {:?}, {}/s for {:?} after {:?} warmup",
        args.subscribers,
        args.channel,
        common.encoding,
        publishers,
        args.publish_via,
        args.rate,
        common.duration,
        common.warmup,
    );
    let started = Instant::now();
    for index in 0..args.subscribers {
        tokio::spawn(subscriber::subscriber(
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
    let mut events_open = true;
    let mut interrupted = false;
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    let mut ticker = tokio::time::interval(Duration::from_secs(1));
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    ticker.reset();

    // Connect.
    while !col.setup.settled(args.subscribers) && events_open && !interrupted {
        tokio::select! {
            ev = events.recv() => match ev {
                Some(ev) => col.on(ev),
                None => events_open = false,
            },
            _ = ticker.tick() => eprintln!(
                "[{:>4}s connect] {} ready, {} failed of {}",
                started.elapsed().as_secs(), col.setup.ready, col.setup.failed, args.subscribers
            ),
            _ = &mut ctrl_c, if !interrupted => interrupted = true,
        }
    }
    eprintln!(
        "rtload: {} of {} subscribers ready in {:.1}s ({} failed); connect {}",
        col.setup.ready,
        args.subscribers,
        started.elapsed().as_secs_f64(),
        col.setup.failed,
        common_report::p50_p99(crate::stats::Summary::of(&col.setup.connect).as_ref()),
    );
    if col.setup.ready == 0 || interrupted {
        let _ = stop_tx.send(true);
        let why = match (&col.setup.first_failure, interrupted) {
            (Some(failure), false) => failure.clone(),
            _ => "interrupted".into(),
        };
        return Err(format!("no run: {why}").into());
    }

    // Publish: open the publishers, then start the pacer.
    let pub_spec = Arc::new(PublishSpec {
        via: args.publish_via,
        channels: vec![args.channel.clone()],
        pad: "x".repeat(args.payload_bytes),
        http_base: common.http.clone(),
        api_key: common.api_key.clone(),
        connections: publishers,
        source: dialer.source_for(0),
        window,
        clock,
        drain: common.drain,
    });
    let (tx, publisher) = match publish::start(pub_spec, dialer.clone(), live.clone()).await {
        Ok(started) => started,
        Err(e) => {
            let _ = stop_tx.send(true);
            return Err(format!("cannot start the publisher: {e}").into());
        }
    };
    let schedule = Schedule::new(Instant::now() + Duration::from_millis(20), args.rate)?;
    let measure_start = schedule.at(window.first);
    let pacer_stop = Arc::new(AtomicBool::new(false));
    let mut pacer_done = pacer::spawn(schedule, window.end, tx, pacer_stop.clone())?;
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
                Ok(o) if o.cut_short => {
                    if !interrupted {
                        notes.push(format!(
                            "the publisher stopped taking sends after {} of {} (its connections failed)",
                            o.emitted, window.end
                        ));
                    }
                    break true;
                }
                Ok(_) => break false,
                Err(_) => break true,
            },
            _ = &mut ctrl_c, if !interrupted => {
                interrupted = true;
                pacer_stop.store(true, Ordering::Relaxed);
            }
        }
    };
    let cpu_end = CpuSample::now();

    // Drain: outstanding acks, then deliveries of acknowledged publications.
    let finish = tokio::spawn(publisher.finish());
    tokio::pin!(finish);
    let pub_stats = loop {
        tokio::select! {
            ev = events.recv(), if events_open => match ev {
                Some(ev) => col.on(ev),
                None => events_open = false,
            },
            _ = ticker.tick() => prev = progress(&live, &col, prev, "drain", schedule.start(), cores),
            done = &mut finish => break done?,
        }
    };
    let expected_now = pub_stats.ok_measured * Live::get(&live.open);
    let deadline = tokio::time::Instant::now() + common.drain;
    while Live::get(&live.delivered_measured) < expected_now && !interrupted {
        tokio::select! {
            ev = events.recv(), if events_open => match ev {
                Some(ev) => col.on(ev),
                None => events_open = false,
            },
            _ = tokio::time::sleep(Duration::from_millis(20)) => {}
            _ = ticker.tick() => prev = progress(&live, &col, prev, "drain", schedule.start(), cores),
            _ = tokio::time::sleep_until(deadline) => break,
            _ = &mut ctrl_c, if !interrupted => interrupted = true,
        }
    }

    // Stop subscribers and collect their summaries.
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
                    "{} subscribers did not report within 5 s; their counts are missing",
                    col.setup.ready.saturating_sub(col.done)
                ));
                break;
            }
        }
    }

    let (cpu_percent, machine_cpu_percent) = sysinfo::cpu_between(cpu_start, cpu_end, cores);
    let generator = Generator {
        cores,
        cpu_percent,
        machine_cpu_percent,
        fd_soft_limit: None,
        fd_hard_limit: None,
        fds_needed,
        late_sends: pub_stats.late_measured,
        max_send_lag_ms: crate::stats::Summary::of(&pub_stats.lag).map(|s| s.max_ms),
        warnings: notes,
    }
    .fd(fd)
    .assessed();
    let outcome = Outcome {
        interrupted,
        cut_short,
        measure_start,
        open_at_end,
    };
    let report = report::build(&args, &outcome, &col, &pub_stats, generator);
    print!("{}", report.render());
    if let Some(path) = &common.json_out {
        common_report::write_json(path, &report)?;
        eprintln!("rtload: report written to {}", path.display());
    }
    // A run that measured nothing is a failure, whatever the reason (shown above).
    if report.publish.acked == 0 || report.delivery.delivered == 0 {
        eprintln!("rtload: nothing was measured (no acknowledged publication delivered)");
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
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
    let line = Progress {
        elapsed: now.at.saturating_duration_since(start),
        phase,
        sent_per_s: (now.sent - prev.sent) as f64 / secs,
        delivered_per_s: (now.delivered - prev.delivered) as f64 / secs,
        p99_ms: col.p99_ms(),
        open: Live::get(&live.open),
        lost: Live::get(&live.lost),
        errors: Live::get(&live.errors) + Live::get(&live.publish_failed),
        cpu_percent,
        machine_cpu_percent,
    };
    eprintln!("{line}");
    now
}
