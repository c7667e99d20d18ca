//! `floor`: what this machine allows a fan-out at best, with no server at all.
//!
//! A publication fanned out to N WebSocket subscribers is, at the very least, one small
//! `write` per subscriber socket, and on one machine the kernel's loopback path runs the
//! receiver's side of TCP inside each of those writes. `floor` measures exactly that and
//! nothing else: `--writers` threads (a gateway's workers) write one 11-byte WebSocket
//! frame carrying its scheduled send time to each of N loopback sockets, `--rate` rounds
//! per second on an open-loop schedule, while a child process (`rtload floor-sink`, a
//! tokio runtime reading every socket as rtload's subscribers do) records send-to-read
//! latency. No encoding, no queues, no NATS: a server's fan-out to N subscribers on this
//! machine cannot beat these percentiles, so they put the fan-out scenario's figures in
//! proportion (e.g. whether "10,000 subscribers under 50 ms" is possible here at all).
//!
//! The sink runs in its own process so each side stays under the per-process descriptor
//! limit; it reports its histogram as one JSON line on stdout when every socket closed.

use std::io::{BufRead as _, BufReader, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use tokio::io::AsyncReadExt as _;

use crate::clock::parse_duration;
use crate::error::Result;
use crate::report::{p50_p99, write_json};
use crate::stats::{self, Hist, Summary};

/// A frame: FIN + binary opcode, payload length 9, the scheduled send time (µs since the
/// Unix epoch, big-endian) and whether the round is measured (1) or warm-up (0).
const FRAME_LEN: usize = 11;

#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    /// Loopback sockets to write to (the subscribers).
    #[arg(long, default_value_t = 10_000)]
    pub sockets: usize,

    /// Writer threads; the sockets are split evenly between them.
    #[arg(long, default_value_t = 2)]
    pub writers: usize,

    /// Rounds per second (a round writes one frame to every socket).
    #[arg(long, default_value_t = 1.0)]
    pub rate: f64,

    /// Measured time, after the warmup.
    #[arg(long, value_parser = parse_duration, default_value = "10s")]
    pub duration: Duration,

    /// Rounds before the measured time, not recorded.
    #[arg(long, value_parser = parse_duration, default_value = "2s")]
    pub warmup: Duration,

    /// Also write the report as JSON to this file.
    #[arg(long)]
    pub json_out: Option<PathBuf>,
}

#[derive(clap::Args, Debug, Clone)]
pub struct SinkArgs {
    /// Connections to accept before reading.
    #[arg(long)]
    pub sockets: usize,
}

/// What the sink reports.
#[derive(Serialize, Deserialize, Debug, Default)]
struct SinkReport {
    /// Send-to-read latency of the measured frames: (µs, count) pairs of its histogram.
    latency: Vec<(u64, u64)>,
    /// Sockets that ended with an error instead of a close.
    errors: u64,
}

#[derive(Serialize, Debug)]
struct Report {
    scenario: &'static str,
    sockets: usize,
    writers: usize,
    rate: f64,
    duration_s: f64,
    /// Send-to-read latency of the measured frames (the fan-out's publish-to-deliver floor).
    latency_ms: Option<Summary>,
    /// How long one writer took to write its share of a round.
    round_ms: Option<Summary>,
    frames_expected: u64,
    frames_read: u64,
    socket_errors: u64,
}

fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
}

fn frame(scheduled_us: u64, measured: bool) -> [u8; FRAME_LEN] {
    let mut frame = [0u8; FRAME_LEN];
    frame[0] = 0x82;
    frame[1] = 9;
    frame[2..10].copy_from_slice(&scheduled_us.to_be_bytes());
    frame[10] = u8::from(measured);
    frame
}

pub fn run(args: &Args) -> Result<ExitCode> {
    if args.sockets == 0 || args.writers == 0 || args.rate <= 0.0 {
        return Err("floor needs --sockets, --writers and --rate above 0".into());
    }
    let exe = std::env::current_exe()?;
    let mut sink = Command::new(exe)
        .args(["floor-sink", "--sockets", &args.sockets.to_string()])
        .stdout(Stdio::piped())
        .spawn()?;
    let mut lines = BufReader::new(sink.stdout.take().ok_or("sink has no stdout")?).lines();
    let addr: SocketAddr = lines.next().ok_or("sink said nothing")??.trim().parse()?;
    let mut sockets = Vec::with_capacity(args.sockets);
    for _ in 0..args.sockets {
        let socket = TcpStream::connect(addr)?;
        socket.set_nodelay(true)?;
        sockets.push(socket);
    }
    eprintln!(
        "floor: {} sockets connected; {} writers, {}/s for {:?} after {:?} of warmup",
        args.sockets, args.writers, args.rate, args.duration, args.warmup
    );
    let interval = Duration::from_secs_f64(1.0 / args.rate);
    let warmup_rounds = (args.warmup.as_secs_f64() * args.rate).ceil() as u64;
    let measured_rounds = (args.duration.as_secs_f64() * args.rate).ceil() as u64;
    let start = Instant::now() + Duration::from_millis(200);
    let start_us = now_us() + 200_000;
    let share = args.sockets.div_ceil(args.writers);
    let mut round_hist = stats::new_hist();
    std::thread::scope(|scope| -> Result<()> {
        let workers: Vec<_> = sockets
            .chunks_mut(share)
            .map(|group| {
                scope.spawn(move || -> std::io::Result<Hist> {
                    let mut rounds = stats::new_hist();
                    for round in 0..warmup_rounds + measured_rounds {
                        // Open loop: each round has its time; one that starts late says so
                        // in its latency, as a late server's deliveries would.
                        let due = start + interval.mul_f64(round as f64);
                        if let Some(wait) = due.checked_duration_since(Instant::now()) {
                            std::thread::sleep(wait);
                        }
                        let scheduled =
                            start_us + u64::try_from(interval.as_micros()).unwrap_or(0) * round;
                        let frame = frame(scheduled, round >= warmup_rounds);
                        let began = Instant::now();
                        for socket in group.iter_mut() {
                            socket.write_all(&frame)?;
                        }
                        if round >= warmup_rounds {
                            stats::record(&mut rounds, began.elapsed().as_micros() as u64);
                        }
                    }
                    Ok(rounds)
                })
            })
            .collect();
        for worker in workers {
            let rounds = worker.join().map_err(|_| "a writer thread panicked")??;
            stats::merge(&mut round_hist, &rounds);
        }
        Ok(())
    })?;
    drop(sockets);
    let line = lines.next().ok_or("sink ended without a report")??;
    let _ = sink.wait();
    let sink_report: SinkReport = serde_json::from_str(&line)?;
    let mut latency = stats::new_hist();
    for (value, count) in &sink_report.latency {
        let _ = latency.record_n(*value, *count);
    }
    let report = Report {
        scenario: "floor",
        sockets: args.sockets,
        writers: args.writers,
        rate: args.rate,
        duration_s: args.duration.as_secs_f64(),
        latency_ms: Summary::of(&latency),
        round_ms: Summary::of(&round_hist),
        frames_expected: measured_rounds * args.sockets as u64,
        frames_read: latency.len(),
        socket_errors: sink_report.errors,
    };
    print_report(&report);
    if let Some(path) = &args.json_out {
        write_json(path, &report)?;
        eprintln!("rtload: report written to {}", path.display());
    }
    let complete = report.frames_read == report.frames_expected && report.socket_errors == 0;
    Ok(if complete {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn print_report(report: &Report) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(
        out,
        "floor: one {FRAME_LEN}-byte frame to each of {} loopback sockets, {} writer threads, {}/s",
        report.sockets, report.writers, report.rate
    );
    let _ = writeln!(
        out,
        "  send-to-read   {}  (p999 {} ms, max {} ms)",
        p50_p99(report.latency_ms.as_ref()),
        report.latency_ms.map_or(0.0, |s| s.p999_ms),
        report.latency_ms.map_or(0.0, |s| s.max_ms)
    );
    let _ = writeln!(
        out,
        "  one writer's share of a round   {}",
        p50_p99(report.round_ms.as_ref())
    );
    let _ = writeln!(
        out,
        "  frames read    {} of {} expected; socket errors {}",
        report.frames_read, report.frames_expected, report.socket_errors
    );
}

/// The reading side (a child process of `floor`): accepts `sockets` connections, reads
/// every one until it closes, then prints its histogram as one JSON line.
pub async fn sink(args: SinkArgs) -> Result<ExitCode> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    println!("{}", listener.local_addr()?);
    let mut readers = tokio::task::JoinSet::new();
    for _ in 0..args.sockets {
        let (socket, _) = listener.accept().await?;
        readers.spawn(read_frames(socket));
    }
    let mut report = SinkReport::default();
    let mut latency = stats::new_hist();
    while let Some(result) = readers.join_next().await {
        match result {
            Ok(Ok(samples)) => samples.record_into(&mut latency),
            Ok(Err(_)) | Err(_) => report.errors += 1,
        }
    }
    report.latency = latency
        .iter_recorded()
        .map(|v| (v.value_iterated_to(), v.count_at_value()))
        .collect();
    println!("{}", serde_json::to_string(&report)?);
    Ok(ExitCode::SUCCESS)
}

async fn read_frames(mut socket: tokio::net::TcpStream) -> std::io::Result<stats::Samples> {
    let mut samples = stats::Samples::default();
    let mut buf = [0u8; 4096];
    let mut pending = Vec::new();
    loop {
        let n = socket.read(&mut buf).await?;
        if n == 0 {
            return Ok(samples);
        }
        let now = now_us();
        pending.extend_from_slice(&buf[..n]);
        let whole = pending.len() / FRAME_LEN * FRAME_LEN;
        for frame in pending[..whole].chunks_exact(FRAME_LEN) {
            let mut sent = [0u8; 8];
            sent.copy_from_slice(&frame[2..10]);
            if frame[10] == 1 {
                samples.push(now.saturating_sub(u64::from_be_bytes(sent)));
            }
        }
        pending.drain(..whole);
    }
}
