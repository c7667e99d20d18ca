//! `idle`: what an idle connection costs the gateway. Reads the gateway's resident memory,
//! opens N connections (each `connect`ed anonymously, then silent but still read, so
//! WebSocket pings are answered), waits for them to settle, samples the memory once a
//! second while holding them, and reports the median growth per established connection.
//! Memory comes from `/proc/<pid>/status` with `--gateway-pid`, else from the gateway's
//! `/metrics` ([`memory`]).

pub mod memory;

use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde::Serialize;
use tokio::sync::{Semaphore, mpsc, watch};
use tokio::time::MissedTickBehavior;
use tokio_tungstenite::tungstenite::Message;

use crate::calls::report::Connections;
use crate::cli::Common;
use crate::client::Dialer;
use crate::clock::parse_duration;
use crate::collector::Setup;
use crate::error::{Result, short};
use crate::report::{Errors, Generator, p50_p99, print_and_write, secs};
use crate::stats::{Summary, Tally};
use crate::sysinfo::{self, CpuSample};
use crate::wire::Encoding;
use memory::{Source, median, mib, per_connection_kib};

#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    #[command(flatten)]
    pub common: Common,

    /// Connections to open and hold, each `connect`ed anonymously.
    #[arg(long, default_value_t = 1000)]
    pub connections: usize,

    /// How long to hold them all, sampling the gateway's memory once a second.
    #[arg(long, value_parser = parse_duration, default_value = "20s")]
    pub hold: Duration,

    /// Pause between the last connection coming up and the first sample.
    #[arg(long, value_parser = parse_duration, default_value = "5s")]
    pub settle: Duration,

    /// The gateway's Prometheus endpoint (default: http://<host:port of --url>/metrics);
    /// read for `rt_process_resident_memory_bytes`.
    #[arg(long)]
    pub metrics: Option<String>,

    /// The gateway's process id(s), when it runs on this machine: memory is read from
    /// /proc/<pid>/status (VmRSS, summed over the pids: e.g. a Node.js cluster's primary
    /// and workers, comma-separated or repeated) instead of --metrics, which is more precise.
    #[arg(long, value_delimiter = ',')]
    pub gateway_pid: Vec<u32>,
}

enum Event {
    Ready {
        connect: Duration,
    },
    Failed {
        kind: String,
        message: String,
    },
    /// The socket ended before the run did.
    ClosedEarly {
        kind: String,
    },
}

#[derive(Serialize, Debug)]
pub struct IdleReport {
    pub scenario: &'static str,
    /// Stopped by Ctrl-C before the hold ended.
    pub interrupted: bool,
    pub config: Config,
    pub connections: Connections,
    pub memory: Memory,
    pub errors: Errors,
    pub generator: Generator,
}

#[derive(Serialize, Debug)]
pub struct Config {
    pub url: String,
    pub encoding: Encoding,
    pub connections: usize,
    pub settle_s: f64,
    pub hold_s: f64,
    pub bind_ips: Vec<String>,
}

/// The gateway's resident memory, bytes.
#[derive(Serialize, Debug, Default, PartialEq)]
pub struct Memory {
    /// `/proc/<pid>/status VmRSS`, or the metrics URL and gauge.
    pub source: String,
    /// Before the first connection.
    pub before_bytes: u64,
    /// The median of the samples taken during the hold.
    pub during_bytes: Option<u64>,
    pub samples: usize,
    pub min_bytes: Option<u64>,
    pub max_bytes: Option<u64>,
    /// Samples that could not be read.
    pub read_errors: u64,
    /// (during − before) / established, KiB with one decimal.
    pub per_connection_kib: Option<f64>,
}

impl Memory {
    fn of(
        source: String,
        before: u64,
        samples: &[u64],
        read_errors: u64,
        established: usize,
    ) -> Self {
        let during = median(samples);
        Memory {
            source,
            before_bytes: before,
            during_bytes: during,
            samples: samples.len(),
            min_bytes: samples.iter().min().copied(),
            max_bytes: samples.iter().max().copied(),
            read_errors,
            per_connection_kib: during.and_then(|d| per_connection_kib(before, d, established)),
        }
    }
}

pub async fn run(args: Args) -> Result<ExitCode> {
    let report = measure(&args).await?;
    print_and_write(&report.render(), &report, args.common.json_out.as_deref())?;
    if report.memory.per_connection_kib.is_none() {
        eprintln!("rtload: nothing was measured (no memory sample during the hold)");
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}

/// The first reading; the metrics gauge may need a second to be refreshed after start.
async fn read_before(source: &Source) -> Result<u64> {
    let mut attempt = 0;
    loop {
        match source.read().await {
            Ok(bytes) => return Ok(bytes),
            Err(e) if attempt >= 2 => {
                return Err(format!(
                    "cannot read the gateway's memory ({}): {e}",
                    source.describe()
                )
                .into());
            }
            Err(_) => attempt += 1,
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

pub async fn measure(args: &Args) -> Result<IdleReport> {
    let common = &args.common;
    if args.connections == 0 {
        return Err("--connections must be at least 1".into());
    }
    if args.hold.is_zero() {
        return Err("--hold must be longer than 0".into());
    }
    let cores = sysinfo::cores();
    let source = Source::new(&args.gateway_pid, args.metrics.as_deref(), &common.url).await?;
    let before = read_before(&source).await?;
    let fds_needed = (args.connections + 64) as u64;
    let (fd, mut notes) = sysinfo::prepare_fds(fds_needed);
    let dialer = Arc::new(Dialer::new(&common.url, common).await?);
    eprintln!(
        "rtload idle: {} connections ({}), settle {:?}, hold {:?}; gateway memory {} before ({})",
        args.connections,
        common.encoding,
        args.settle,
        args.hold,
        mib(before),
        source.describe(),
    );
    let open = Arc::new(AtomicU64::new(0));
    let (events_tx, mut events) = mpsc::unbounded_channel();
    let (stop_tx, stop_rx) = watch::channel(false);
    let permits = Arc::new(Semaphore::new(common.connect_concurrency.max(1)));
    let cpu_start = CpuSample::now();
    let started = Instant::now();
    for index in 0..args.connections {
        tokio::spawn(connection(
            index,
            dialer.clone(),
            permits.clone(),
            open.clone(),
            events_tx.clone(),
            stop_rx.clone(),
        ));
    }
    drop(events_tx);

    let mut setup = Setup::default();
    let mut closed = Tally::default();
    let mut interrupted = false;
    let ctrl_c = tokio::signal::ctrl_c();
    tokio::pin!(ctrl_c);
    let mut ticker = tokio::time::interval(Duration::from_secs(1));
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    ticker.reset();
    let on = |ev: Event, setup: &mut Setup, closed: &mut Tally| match ev {
        Event::Ready { connect } => setup.on_ready(connect),
        Event::Failed { kind, message } => setup.on_failed(kind, message),
        Event::ClosedEarly { kind } => closed.add(kind, 1),
    };

    // Connect.
    while !setup.settled(args.connections) && !interrupted {
        tokio::select! {
            ev = events.recv() => match ev {
                Some(ev) => on(ev, &mut setup, &mut closed),
                None => break,
            },
            _ = ticker.tick() => eprintln!(
                "[{:>4}s connect] {} ready, {} failed of {}",
                started.elapsed().as_secs(), setup.ready, setup.failed, args.connections
            ),
            _ = &mut ctrl_c => interrupted = true,
        }
    }
    eprintln!(
        "rtload: {} of {} connections ready in {:.1}s ({} failed); connect {}",
        setup.ready,
        args.connections,
        started.elapsed().as_secs_f64(),
        setup.failed,
        p50_p99(Summary::of(&setup.connect).as_ref()),
    );
    if setup.ready == 0 || interrupted {
        let _ = stop_tx.send(true);
        let why = match (&setup.first_failure, interrupted) {
            (Some(failure), false) => failure.clone(),
            _ => "interrupted".into(),
        };
        return Err(format!("no run: {why}").into());
    }
    if setup.failed > 0 {
        notes.push(format!(
            "{} of {} connections could not be set up; memory per connection is over the {} that were",
            setup.failed, args.connections, setup.ready
        ));
    }

    // Settle, then hold and sample.
    let hold_start = tokio::time::Instant::now() + args.settle;
    let hold_end = hold_start + args.hold;
    let mut sampler = tokio::time::interval_at(hold_start, Duration::from_secs(1));
    sampler.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut samples: Vec<u64> = Vec::new();
    let mut read_errors = 0u64;
    let mut last_error: Option<String> = None;
    // Every connection may close early: the hold goes on (and shows it).
    let mut events_open = true;
    loop {
        tokio::select! {
            ev = events.recv(), if events_open => match ev {
                Some(ev) => on(ev, &mut setup, &mut closed),
                None => events_open = false,
            },
            now = sampler.tick() => {
                if now >= hold_end {
                    break;
                }
                match source.read().await {
                    Ok(bytes) => samples.push(bytes),
                    Err(e) => {
                        read_errors += 1;
                        last_error = Some(e.to_string());
                    }
                }
                eprintln!(
                    "[{:>4}s hold   ] conns {:>6}  closed early {}  memory {}",
                    started.elapsed().as_secs(),
                    open.load(Ordering::Relaxed),
                    closed.total(),
                    samples.last().map_or_else(|| "-".into(), |b| mib(*b)),
                );
            }
            _ = ticker.tick(), if tokio::time::Instant::now() < hold_start => eprintln!(
                "[{:>4}s settle ] conns {:>6}  closed early {}",
                started.elapsed().as_secs(), open.load(Ordering::Relaxed), closed.total()
            ),
            _ = tokio::time::sleep_until(hold_end) => break,
            _ = &mut ctrl_c => {
                interrupted = true;
                break;
            }
        }
    }
    let cpu_end = CpuSample::now();
    if let Some(e) = last_error {
        notes.push(format!(
            "{read_errors} memory samples could not be read (last: {e})"
        ));
    }

    // Stop: every connection closes its socket cleanly (bounded wait).
    let open_at_end = open.load(Ordering::Relaxed);
    while let Ok(ev) = events.try_recv() {
        on(ev, &mut setup, &mut closed);
    }
    let _ = stop_tx.send(true);
    let deadline = Instant::now() + Duration::from_secs(3);
    while open.load(Ordering::Relaxed) > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
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
        late_sends: 0,
        max_send_lag_ms: None,
        warnings: notes,
        server,
    }
    .fd(fd)
    .assessed();
    let mut kinds = setup.errors.clone();
    kinds.merge(&closed);
    Ok(IdleReport {
        scenario: "idle",
        interrupted,
        config: Config {
            url: common.url.clone(),
            encoding: common.encoding,
            connections: args.connections,
            settle_s: secs(args.settle),
            hold_s: secs(args.hold),
            bind_ips: common.bind_ip.iter().map(|ip| ip.to_string()).collect(),
        },
        connections: Connections {
            requested: args.connections,
            established: setup.ready,
            failed: setup.failed,
            open_at_end,
            closed_early: closed.total(),
            connect_ms: Summary::of(&setup.connect),
        },
        memory: Memory::of(
            source.describe(),
            before,
            &samples,
            read_errors,
            setup.ready,
        ),
        errors: Errors::of(kinds),
        generator,
    })
}

/// Sets up connection `index`, then only reads (pushes are dropped; reading is what
/// answers WebSocket pings) until `stop`, and closes.
async fn connection(
    index: usize,
    dialer: Arc<Dialer>,
    permits: Arc<Semaphore>,
    open: Arc<AtomicU64>,
    events: mpsc::UnboundedSender<Event>,
    mut stop: watch::Receiver<bool>,
) {
    let opened = {
        let _permit = permits.acquire().await;
        dialer.open(index).await
    };
    let (mut conn, connect) = match opened {
        Ok(opened) => opened,
        Err(e) => {
            let _ = events.send(Event::Failed {
                kind: e.kind(),
                message: e.to_string(),
            });
            return;
        }
    };
    open.fetch_add(1, Ordering::Relaxed);
    let _ = events.send(Event::Ready { connect });
    let ended = loop {
        tokio::select! {
            frame = conn.ws.next() => match frame {
                Some(Ok(Message::Close(c))) => {
                    break Some(format!("closed {}", c.as_ref().map_or(1005, |c| u16::from(c.code))));
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => break Some(short(&e)),
                None => break Some("connection closed".into()),
            },
            _ = stop.wait_for(|stop| *stop) => break None,
        }
    };
    match ended {
        Some(kind) => {
            let _ = events.send(Event::ClosedEarly { kind });
        }
        None => {
            let _ = tokio::time::timeout(Duration::from_secs(1), conn.ws.close(None)).await;
        }
    }
    open.fetch_sub(1, Ordering::Relaxed);
}

impl IdleReport {
    pub fn render(&self) -> String {
        let c = &self.config;
        let mut out = format!(
            "\n== rtload idle: {} connections ({}), {}s settle then {}s hold{} ==\n",
            c.connections,
            c.encoding,
            c.settle_s,
            c.hold_s,
            crate::report::interrupted_suffix(self.interrupted),
        );
        out += &self.connections.line();
        let m = &self.memory;
        let opt = |b: Option<u64>| b.map_or_else(|| "-".to_string(), mib);
        out += &format!(
            "memory        before {}, during {} (median of {} samples, min {}, max {}{}); {}\n",
            mib(m.before_bytes),
            opt(m.during_bytes),
            m.samples,
            opt(m.min_bytes),
            opt(m.max_bytes),
            if m.read_errors > 0 {
                format!(", {} unreadable", m.read_errors)
            } else {
                String::new()
            },
            m.source,
        );
        out += &format!(
            "per conn      {} KiB ((during − before) / established)\n",
            m.per_connection_kib
                .map_or_else(|| "-".to_string(), |kib| format!("{kib:.1}")),
        );
        self.errors.render(&mut out);
        self.generator.render(&mut out);
        out
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn memory_summary_and_report_text() {
        let mib1 = 1024 * 1024;
        let m = Memory::of(
            "/proc/1/status VmRSS".into(),
            10 * mib1,
            &[13 * mib1, 11 * mib1, 12 * mib1],
            1,
            100,
        );
        assert_eq!(m.during_bytes, Some(12 * mib1));
        assert_eq!(
            (m.min_bytes, m.max_bytes),
            (Some(11 * mib1), Some(13 * mib1))
        );
        assert_eq!(m.per_connection_kib, Some(20.5));
        let none = Memory::of(String::new(), mib1, &[], 0, 10);
        assert_eq!((none.during_bytes, none.per_connection_kib), (None, None));

        let report = IdleReport {
            scenario: "idle",
            interrupted: false,
            config: Config {
                url: "ws://127.0.0.1:8080/ws".into(),
                encoding: Encoding::Json,
                connections: 100,
                settle_s: 5.0,
                hold_s: 20.0,
                bind_ips: vec![],
            },
            connections: Connections {
                requested: 100,
                established: 100,
                failed: 0,
                open_at_end: 100,
                closed_early: 0,
                connect_ms: None,
            },
            memory: m,
            errors: Errors::of(Tally::default()),
            generator: Generator::for_tests(),
        };
        let text = report.render();
        assert!(text.contains("memory        before 10.0 MiB, during 12.0 MiB (median of 3 samples, min 11.0 MiB, max 13.0 MiB, 1 unreadable); /proc/1/status VmRSS\n"), "{text}");
        assert!(text.contains("per conn      20.5 KiB"), "{text}");
        let json = serde_json::to_value(&report).unwrap();
        assert_eq!(json["memory"]["per_connection_kib"], 20.5);
        assert_eq!(json["connections"]["established"], 100);
    }
}
