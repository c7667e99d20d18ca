//! `channels`: publish throughput and publish-to-deliver latency over one or many
//! channels: what sequencing (and the JetStream history write) costs.
//!
//! `--publishers` WebSocket connections publish round-robin over `--channels` channels
//! (`<prefix>0`, `<prefix>1`, …). Without `--rate` each keeps `--window` publishes in
//! flight (closed loop: a new one as each ack comes back), which measures the most the
//! path sustains; with `--rate` they publish on an open-loop schedule (latency measured
//! from the intended send time). `--subscribers` connections share the channels (each
//! channel on one of them) and measure publish-to-deliver on every publication, and
//! count offset gaps per channel.
//!
//! Phases: connect and subscribe → warmup → measure → drain. Publications are counted in
//! the measured window by their send time, acks and deliveries alike.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::{SinkExt as _, StreamExt as _};
use serde::{Deserialize, Serialize};
use tokio_tungstenite::tungstenite::Message;

use crate::cli::Common;
use crate::client::Dialer;
use crate::clock::Clock;
use crate::error::Result;
use crate::stats::{self, Hist, Summary};
use crate::sysinfo::{self, CpuSample};
use crate::wire::{self, Encoding, ErrorBody, Publish, Stamp, StampView};

#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    #[command(flatten)]
    pub common: Common,

    /// Channels published to, round-robin (`<prefix>0` … `<prefix>N-1`).
    #[arg(long, default_value_t = 1)]
    pub channels: usize,

    /// Channel name prefix (its namespace must allow anonymous client publishes).
    #[arg(long, default_value = "bench:ch")]
    pub prefix: String,

    /// Publisher connections.
    #[arg(long, default_value_t = 4)]
    pub publishers: usize,

    /// Publishes in flight per publisher (closed loop); at most the gateway's
    /// `max_inflight_per_connection`.
    #[arg(long, default_value_t = 64)]
    pub window: usize,

    /// Publications per second over all publishers (open loop); 0: closed loop, as fast
    /// as acks come back.
    #[arg(long, default_value_t = 0.0)]
    pub rate: f64,

    /// Subscriber connections (0: one per 250 channels).
    #[arg(long, default_value_t = 0)]
    pub subscribers: usize,

    /// Length of the padding string in each publication's data.
    #[arg(long, default_value_t = 64)]
    pub payload_bytes: usize,

    /// Publish and subscribe through the gateway's WebSocket (`ws`), or straight on
    /// NATS as a backend service would (`nats`: requests to `rt.publish.<channel>`,
    /// subscriptions to `rt.deliver.<channel>`), which measures broadcast alone.
    #[arg(long, value_enum, default_value_t = Via::Ws)]
    pub via: Via,

    /// NATS server for `--via nats`.
    #[arg(long, default_value = "nats://127.0.0.1:4222")]
    pub nats_url: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Via {
    Ws,
    Nats,
}

/// A delivery on `rt.deliver.<channel>` (MessagePack), as much as is read.
#[derive(Deserialize, Debug)]
struct Delivery<'a> {
    #[serde(borrow)]
    channel: Cow<'a, str>,
    offset: u64,
    #[serde(borrow)]
    data: &'a [u8],
}

/// The reply to a request on `rt.publish.<channel>`.
#[derive(Deserialize, Debug, Default)]
struct NatsAck {
    #[serde(default)]
    offset: Option<u64>,
    #[serde(default)]
    error: Option<NatsError>,
}

#[derive(Deserialize, Debug, Default)]
struct NatsError {
    #[serde(default)]
    code: u32,
}

/// One message from the gateway, as much as this scenario reads.
#[derive(Deserialize, Debug, Default)]
struct Incoming<'a> {
    #[serde(default)]
    id: Option<u64>,
    #[serde(default, borrow)]
    push: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    channel: Option<Cow<'a, str>>,
    #[serde(default)]
    offset: Option<u64>,
    #[serde(default)]
    data: Option<StampView>,
    #[serde(default, borrow)]
    error: Option<ErrorBody<'a>>,
}

fn decode(encoding: Encoding, message: &[u8]) -> Option<Incoming<'_>> {
    match encoding {
        Encoding::Msgpack => rmp_serde::from_slice(message).ok(),
        Encoding::Json => serde_json::from_slice(message).ok(),
    }
}

/// The measured window, in µs since the Unix epoch (of send times).
#[derive(Clone, Copy)]
struct Window {
    from: u64,
    to: u64,
}

impl Window {
    fn contains(&self, t: u64) -> bool {
        (self.from..self.to).contains(&t)
    }
}

#[derive(Default)]
struct Counters {
    sent: AtomicU64,
    /// Sent and not yet answered.
    outstanding: AtomicU64,
    acked: AtomicU64,
    acked_measured: AtomicU64,
    delivered: AtomicU64,
    delivered_measured: AtomicU64,
    gaps: AtomicU64,
    errors: Mutex<BTreeMap<String, u64>>,
    ack_hist: Mutex<Option<Hist>>,
    deliver_hist: Mutex<Option<Hist>>,
}

impl Counters {
    fn error(&self, kind: String) {
        if let Ok(mut errors) = self.errors.lock() {
            *errors.entry(kind).or_default() += 1;
        }
    }

    fn merge(slot: &Mutex<Option<Hist>>, samples: &[u64]) {
        if let Ok(mut hist) = slot.lock() {
            let hist = hist.get_or_insert_with(stats::new_hist);
            for &us in samples {
                stats::record(hist, us);
            }
        }
    }
}

#[derive(Serialize, Debug)]
struct Report {
    via: Via,
    channels: usize,
    publishers: usize,
    window: usize,
    rate: f64,
    subscribers: usize,
    encoding: Encoding,
    measured_secs: f64,
    acked: u64,
    acked_per_sec: f64,
    delivered: u64,
    delivered_per_sec: f64,
    /// Acknowledged in the window but not delivered (after the drain).
    undelivered: i64,
    gaps: u64,
    errors: BTreeMap<String, u64>,
    ack_ms: Option<Summary>,
    publish_to_deliver_ms: Option<Summary>,
    cpu_percent: Option<f64>,
    machine_cpu_percent: Option<f64>,
}

pub async fn run(args: Args) -> Result<ExitCode> {
    let common = &args.common;
    if args.channels == 0 || args.publishers == 0 || args.window == 0 {
        return Err("--channels, --publishers and --window must be at least 1".into());
    }
    let subscribers = match args.subscribers {
        0 => args.channels.div_ceil(250).max(1),
        n => n,
    };
    let clock = Clock::new();
    let cores = sysinfo::cores();
    let channels: Arc<Vec<String>> = Arc::new(
        (0..args.channels)
            .map(|n| format!("{}{n}", args.prefix))
            .collect(),
    );
    eprintln!(
        "rtload channels: {} channel(s) via {:?}, {} publisher(s) {}, {} subscriber connection(s), {} for {:?} after {:?} warmup",
        args.channels,
        args.via,
        args.publishers,
        if args.rate > 0.0 {
            format!("at {}/s", args.rate)
        } else {
            format!("with {} in flight each", args.window)
        },
        subscribers,
        common.encoding,
        common.duration,
        common.warmup,
    );
    let counters = Arc::new(Counters::default());
    let stop = Arc::new(AtomicBool::new(false));
    let pad: Arc<str> = "x".repeat(args.payload_bytes).into();
    // The measured window starts after the subscriptions are in place.
    let mut tasks = Vec::new();
    let dialer = match args.via {
        Via::Ws => Some(Arc::new(Dialer::new(&common.url, common).await?)),
        Via::Nats => None,
    };
    let mut ws_readers = Vec::new();
    let mut nats_subscriptions = Vec::new();
    for s in 0..subscribers {
        let mine = channels.iter().skip(s).step_by(subscribers);
        match &dialer {
            Some(dialer) => {
                let (mut conn, _) = dialer
                    .open(s)
                    .await
                    .map_err(|e| format!("subscriber {s}: {e}"))?;
                for channel in mine {
                    conn.subscribe(channel)
                        .await
                        .map_err(|e| format!("subscribe {channel}: {e}"))?;
                }
                ws_readers.push(conn);
            }
            None => {
                let client = async_nats::connect(&args.nats_url).await?;
                let mut subs = Vec::new();
                for channel in mine {
                    subs.push(client.subscribe(format!("rt.deliver.{channel}")).await?);
                }
                client.flush().await?;
                nats_subscriptions.push((client, subs));
            }
        }
    }
    let started = Instant::now();
    let window = Window {
        from: clock.unix_us(started + common.warmup),
        to: clock.unix_us(started + common.warmup + common.duration),
    };
    let end = started + common.warmup + common.duration;
    for conn in ws_readers {
        tasks.push(tokio::spawn(ws_subscriber(
            conn,
            clock,
            window,
            counters.clone(),
            stop.clone(),
        )));
    }
    for (client, subs) in nats_subscriptions {
        tasks.push(tokio::spawn(nats_subscriber(
            client,
            subs,
            clock,
            window,
            counters.clone(),
            stop.clone(),
        )));
    }

    let per_publisher_rate = args.rate / args.publishers as f64;
    let mut publishers = Vec::new();
    for p in 0..args.publishers {
        let spec = PublisherSpec {
            index: p,
            count: args.publishers,
            channels: channels.clone(),
            pad: pad.clone(),
            window: args.window,
            rate: per_publisher_rate,
            clock,
            measured: window,
            end,
            counters: counters.clone(),
        };
        match &dialer {
            Some(dialer) => {
                let (conn, _) = dialer
                    .open(subscribers + p)
                    .await
                    .map_err(|e| format!("publisher {p}: {e}"))?;
                publishers.push(tokio::spawn(ws_publisher(conn, spec)));
            }
            None => {
                let client = async_nats::connect(&args.nats_url).await?;
                publishers.push(tokio::spawn(nats_publisher(client, spec)));
            }
        }
    }

    // Progress once a second until the end of the measured window.
    let mut cpu_start = None;
    let mut last_acked = 0;
    let mut last_delivered = 0;
    let mut ticker = tokio::time::interval(Duration::from_secs(1));
    ticker.tick().await;
    while Instant::now() < end {
        ticker.tick().await;
        if cpu_start.is_none() && Instant::now() >= started + common.warmup {
            cpu_start = CpuSample::now();
        }
        let acked = counters.acked.load(Ordering::Relaxed);
        let delivered = counters.delivered.load(Ordering::Relaxed);
        eprintln!(
            "[{:>4}s] acked {}/s, delivered {}/s, gaps {}",
            started.elapsed().as_secs(),
            acked - last_acked,
            delivered - last_delivered,
            counters.gaps.load(Ordering::Relaxed)
        );
        (last_acked, last_delivered) = (acked, delivered);
    }
    let cpu_end = CpuSample::now();
    // Drain: outstanding acks, then the deliveries of what was acknowledged.
    let deadline = Instant::now() + common.drain;
    while Instant::now() < deadline {
        let outstanding = counters.outstanding.load(Ordering::Relaxed);
        let acked = counters.acked_measured.load(Ordering::Relaxed);
        let delivered = counters.delivered_measured.load(Ordering::Relaxed);
        if outstanding == 0 && delivered >= acked {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.store(true, Ordering::Relaxed);
    for publisher in publishers {
        publisher.abort();
        let _ = publisher.await;
    }
    for task in tasks {
        let _ = tokio::time::timeout(Duration::from_secs(2), task).await;
    }

    let secs = common.duration.as_secs_f64();
    let acked = counters.acked_measured.load(Ordering::Relaxed);
    let delivered = counters.delivered_measured.load(Ordering::Relaxed);
    let (cpu_percent, machine_cpu_percent) = sysinfo::cpu_between(cpu_start, cpu_end, cores);
    let summary = |slot: &Mutex<Option<Hist>>| {
        slot.lock()
            .ok()
            .and_then(|h| h.as_ref().and_then(Summary::of))
    };
    let report = Report {
        via: args.via,
        channels: args.channels,
        publishers: args.publishers,
        window: args.window,
        rate: args.rate,
        subscribers,
        encoding: common.encoding,
        measured_secs: secs,
        acked,
        acked_per_sec: stats::round3(acked as f64 / secs),
        delivered,
        delivered_per_sec: stats::round3(delivered as f64 / secs),
        undelivered: acked as i64 - delivered as i64,
        gaps: counters.gaps.load(Ordering::Relaxed),
        errors: counters
            .errors
            .lock()
            .map(|e| e.clone())
            .unwrap_or_default(),
        ack_ms: summary(&counters.ack_hist),
        publish_to_deliver_ms: summary(&counters.deliver_hist),
        cpu_percent,
        machine_cpu_percent,
    };
    print_report(&report);
    if let Some(path) = &common.json_out {
        std::fs::write(path, serde_json::to_vec_pretty(&report)?)?;
        eprintln!("rtload: report written to {}", path.display());
    }
    Ok(if report.acked > 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn print_report(report: &Report) {
    let ms = |s: &Option<Summary>| match s {
        Some(s) => format!(
            "p50 {:.2} p99 {:.2} p999 {:.2} max {:.2}",
            s.p50_ms, s.p99_ms, s.p999_ms, s.max_ms
        ),
        None => "-".into(),
    };
    println!(
        "channels {}  via {:?}  publishers {}  {}  subscribers {}  {}",
        report.channels,
        report.via,
        report.publishers,
        if report.rate > 0.0 {
            format!("rate {}/s", report.rate)
        } else {
            format!("window {}", report.window)
        },
        report.subscribers,
        report.encoding
    );
    println!(
        "acked        {:>10.0}/s  ({} in {:.0}s)   ack rtt ms: {}",
        report.acked_per_sec,
        report.acked,
        report.measured_secs,
        ms(&report.ack_ms)
    );
    println!(
        "delivered    {:>10.0}/s  undelivered {}  gaps {}   publish-to-deliver ms: {}",
        report.delivered_per_sec,
        report.undelivered,
        report.gaps,
        ms(&report.publish_to_deliver_ms)
    );
    println!(
        "errors {:?}   cpu: rtload {}%, machine {}%",
        report.errors,
        report.cpu_percent.map_or("-".into(), |c| format!("{c:.0}")),
        report
            .machine_cpu_percent
            .map_or("-".into(), |c| format!("{c:.0}"))
    );
}

/// Counts a delivery: gaps per channel, and its latency when it was sent in the window.
struct DeliveryLog {
    last: HashMap<String, u64>,
    samples: Vec<u64>,
}

impl DeliveryLog {
    fn new() -> Self {
        Self {
            last: HashMap::new(),
            samples: Vec::with_capacity(4096),
        }
    }

    fn record(
        &mut self,
        counters: &Counters,
        window: Window,
        now: u64,
        channel: &str,
        offset: Option<u64>,
        t: Option<u64>,
    ) {
        counters.delivered.fetch_add(1, Ordering::Relaxed);
        if let Some(offset) = offset {
            match self.last.get_mut(channel) {
                Some(previous) => {
                    if offset > *previous + 1 {
                        counters.gaps.fetch_add(1, Ordering::Relaxed);
                    }
                    *previous = offset;
                }
                None => {
                    self.last.insert(channel.to_owned(), offset);
                }
            }
        }
        if let Some(t) = t
            && window.contains(t)
        {
            counters.delivered_measured.fetch_add(1, Ordering::Relaxed);
            self.samples.push(now.saturating_sub(t));
        }
        if self.samples.len() >= 4096 {
            self.flush(counters);
        }
    }

    fn flush(&mut self, counters: &Counters) {
        Counters::merge(&counters.deliver_hist, &self.samples);
        self.samples.clear();
    }
}

async fn ws_subscriber(
    conn: crate::client::Conn,
    clock: Clock,
    window: Window,
    counters: Arc<Counters>,
    stop: Arc<AtomicBool>,
) {
    let encoding = conn.encoding;
    let mut ws = conn.ws;
    let mut log = DeliveryLog::new();
    while !stop.load(Ordering::Relaxed) {
        let frame = match tokio::time::timeout(Duration::from_millis(200), ws.next()).await {
            Ok(Some(Ok(frame))) => frame,
            Ok(_) => break,
            Err(_) => continue,
        };
        let bytes: &[u8] = match &frame {
            Message::Binary(b) => b,
            Message::Text(t) => t.as_bytes(),
            _ => continue,
        };
        let now = clock.now_us();
        for message in wire::split_frame(encoding, bytes).flatten() {
            let Some(m) = decode(encoding, message) else {
                continue;
            };
            if m.push.as_deref() != Some("pub") {
                continue;
            }
            let channel = m.channel.as_deref().unwrap_or_default();
            log.record(
                &counters,
                window,
                now,
                channel,
                m.offset,
                m.data.and_then(|d| d.t),
            );
        }
    }
    log.flush(&counters);
}

async fn nats_subscriber(
    client: async_nats::Client,
    subscriptions: Vec<async_nats::Subscriber>,
    clock: Clock,
    window: Window,
    counters: Arc<Counters>,
    stop: Arc<AtomicBool>,
) {
    let mut deliveries = futures_util::stream::select_all(subscriptions);
    let mut log = DeliveryLog::new();
    while !stop.load(Ordering::Relaxed) {
        let message =
            match tokio::time::timeout(Duration::from_millis(200), deliveries.next()).await {
                Ok(Some(message)) => message,
                Ok(None) => break,
                Err(_) => continue,
            };
        let now = clock.now_us();
        let Ok(delivery) = rmp_serde::from_slice::<Delivery>(&message.payload) else {
            continue;
        };
        let t = rmp_serde::from_slice::<StampView>(delivery.data)
            .ok()
            .and_then(|d| d.t);
        log.record(
            &counters,
            window,
            now,
            &delivery.channel,
            Some(delivery.offset),
            t,
        );
    }
    log.flush(&counters);
    drop(client);
}

/// What one publisher does.
struct PublisherSpec {
    index: usize,
    count: usize,
    channels: Arc<Vec<String>>,
    pad: Arc<str>,
    window: usize,
    /// Publications per second for this publisher; 0: closed loop.
    rate: f64,
    clock: Clock,
    measured: Window,
    end: Instant,
    counters: Arc<Counters>,
}

impl PublisherSpec {
    fn channel(&self, seq: u64) -> &str {
        &self.channels[(self.index + seq as usize * self.count) % self.channels.len()]
    }

    /// An acknowledgement (or error) of a publish sent at `sent`, now.
    fn answered(&self, sent: u64, now: u64, error: Option<u32>, samples: &mut Vec<u64>) {
        let c = &self.counters;
        c.outstanding.fetch_sub(1, Ordering::Relaxed);
        match error {
            Some(code) => c.error(format!("error {code}")),
            None => {
                c.acked.fetch_add(1, Ordering::Relaxed);
                if self.measured.contains(sent) {
                    c.acked_measured.fetch_add(1, Ordering::Relaxed);
                    samples.push(now.saturating_sub(sent));
                }
            }
        }
        if samples.len() >= 4096 {
            Counters::merge(&c.ack_hist, samples);
            samples.clear();
        }
    }

    fn sending(&self) {
        self.counters.sent.fetch_add(1, Ordering::Relaxed);
        self.counters.outstanding.fetch_add(1, Ordering::Relaxed);
    }
}

/// One WebSocket publisher: `window` publishes in flight, or paced at `rate`.
async fn ws_publisher(conn: crate::client::Conn, spec: PublisherSpec) {
    let encoding = conn.encoding;
    let spec = Arc::new(spec);
    let (mut sink, mut stream) = conn.ws.split();
    let pending: Arc<Mutex<HashMap<u32, u64>>> = Arc::default();
    let permits = Arc::new(tokio::sync::Semaphore::new(spec.window));
    let reader = {
        let (pending, permits, spec) = (pending.clone(), permits.clone(), spec.clone());
        tokio::spawn(async move {
            let mut samples = Vec::with_capacity(4096);
            while let Some(Ok(frame)) = stream.next().await {
                let bytes: &[u8] = match &frame {
                    Message::Binary(b) => b,
                    Message::Text(t) => t.as_bytes(),
                    Message::Close(_) => break,
                    _ => continue,
                };
                let now = spec.clock.now_us();
                for message in wire::split_frame(encoding, bytes).flatten() {
                    let Some(m) = decode(encoding, message) else {
                        continue;
                    };
                    let Some(id) = m.id.and_then(|id| u32::try_from(id).ok()) else {
                        continue;
                    };
                    let Some(sent) = pending.lock().ok().and_then(|mut p| p.remove(&id)) else {
                        continue;
                    };
                    permits.add_permits(1);
                    spec.answered(sent, now, m.error.map(|e| e.code), &mut samples);
                }
            }
            Counters::merge(&spec.counters.ack_hist, &samples);
        })
    };
    let mut id: u32 = 0;
    let mut seq: u64 = 0;
    let interval = (spec.rate > 0.0).then(|| Duration::from_secs_f64(1.0 / spec.rate));
    let mut next_at = Instant::now();
    while Instant::now() < spec.end {
        let intended = match interval {
            Some(interval) => {
                tokio::time::sleep_until(next_at.into()).await;
                let at = next_at;
                next_at += interval;
                at
            }
            None => {
                let Ok(permit) = permits.acquire().await else {
                    break;
                };
                permit.forget();
                Instant::now()
            }
        };
        let t = spec.clock.unix_us(intended);
        let id = wire::next_id(&mut id);
        let message = Publish {
            id,
            op: "publish",
            channel: spec.channel(seq),
            data: Stamp {
                t,
                seq,
                pad: &spec.pad,
            },
        };
        seq += 1;
        let Ok(message) = encoding.encode(&message) else {
            break;
        };
        if let Ok(mut p) = pending.lock() {
            p.insert(id, t);
        }
        spec.sending();
        if sink.send(message).await.is_err() {
            spec.counters.error("send failed".into());
            break;
        }
    }
    // Keep reading acks until the scenario stops this task.
    let _ = reader.await;
}

/// One NATS publisher: requests to `rt.publish.<channel>`, `window` in flight
/// (closed loop) or paced at `rate`.
async fn nats_publisher(client: async_nats::Client, spec: PublisherSpec) {
    let spec = Arc::new(spec);
    let permits = Arc::new(tokio::sync::Semaphore::new(spec.window));
    let interval = (spec.rate > 0.0).then(|| Duration::from_secs_f64(1.0 / spec.rate));
    let mut next_at = Instant::now();
    let mut seq: u64 = 0;
    while Instant::now() < spec.end {
        let intended = match interval {
            Some(interval) => {
                tokio::time::sleep_until(next_at.into()).await;
                let at = next_at;
                next_at += interval;
                at
            }
            None => Instant::now(),
        };
        let Ok(permit) = permits.clone().acquire_owned().await else {
            break;
        };
        let t = spec.clock.unix_us(intended);
        let stamp = Stamp {
            t,
            seq,
            pad: &spec.pad,
        };
        let Ok(payload) = rmp_serde::to_vec_named(&stamp) else {
            break;
        };
        let subject = format!("rt.publish.{}", spec.channel(seq));
        seq += 1;
        spec.sending();
        let (client, spec) = (client.clone(), spec.clone());
        tokio::spawn(async move {
            let reply = client.request(subject, payload.into()).await;
            let now = spec.clock.now_us();
            let mut samples = Vec::new();
            let error = match reply {
                Ok(reply) => {
                    rmp_serde::from_slice::<NatsAck>(&reply.payload).map_or(Some(0), |ack| {
                        match (ack.offset, ack.error) {
                            (Some(_), None) => None,
                            (_, Some(e)) => Some(e.code),
                            (None, None) => Some(0),
                        }
                    })
                }
                Err(_) => Some(114),
            };
            spec.answered(t, now, error, &mut samples);
            Counters::merge(&spec.counters.ack_hist, &samples);
            drop(permit);
        });
    }
}
