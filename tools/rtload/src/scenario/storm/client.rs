//! One storm client: `connect`s to gateway A with `subs` (its one channel, one round
//! trip), reads publications, and whenever its socket ends for any reason reconnects with
//! exponential backoff and full jitter, resuming its session and recovering from the last
//! position it saw. It checks what it receives: every offset of its channel exactly once,
//! recovered publications and live ones together.
//!
//! The pure parts ([`Backoff`], [`Rng`], [`Position`]) are unit-tested; the task
//! ([`client`]) reports to the collector with [`Event`]s.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use tokio::io::AsyncWriteExt;
use tokio::sync::{Semaphore, mpsc, watch};
use tokio_tungstenite::tungstenite::Message;

use crate::client::{Dialer, SetupError, Ws};
use crate::clock::Clock;
use crate::error::short;
use crate::stats::{Samples, Tally};
use crate::subscriber::OffsetTracker;
use crate::wire::{self, ConnectOk, Encoding, Since, StampView};

/// Close codes after which a client must not reconnect (PROTOCOL.md §1).
const FATAL_CLOSES: [u16; 3] = [4000, 4002, 4008];
/// Admission refused: the socket is closed with this (after a `disconnect` push).
pub const OVERLOADED: u16 = 4007;
/// The gateway is draining (graceful shutdown).
pub const DRAINING: u16 = 4005;

/// Exponential backoff with full jitter: before attempt `n` (0-based) wait a uniform time
/// in `[0, min(cap, base · 2^n)]`. After a `retry_after_ms` from the server (already
/// jittered by it), that long plus a uniform `[0, base]`, whatever the attempt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Backoff {
    pub base: Duration,
    pub cap: Duration,
}

impl Backoff {
    pub fn ceiling(&self, attempt: u32) -> Duration {
        self.base
            .saturating_mul(1u32 << attempt.min(20))
            .min(self.cap)
    }

    pub fn delay(&self, attempt: u32, retry_after_ms: Option<u64>, rng: &mut Rng) -> Duration {
        match retry_after_ms {
            Some(ms) => Duration::from_millis(ms) + self.base.mul_f64(rng.unit()),
            None => self.ceiling(attempt).mul_f64(rng.unit()),
        }
    }
}

/// A small, fast PRNG (SplitMix64) for jitter: no dependency, one per client.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn seeded(seed: u64) -> Self {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, 1)`.
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Where a client is in its channel, and what it has seen: the offsets (gaps and
/// duplicates), and what recovery could not bring back.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Position {
    pub epoch: Option<String>,
    pub offsets: OffsetTracker,
    /// `recovered: false` answers (each a loss event: the app would refetch its state).
    pub not_recovered: u32,
    /// Publications skipped by an unrecovered resubscribe within the same epoch.
    pub unrecoverable: u64,
    /// Unrecovered resubscribes that came back in another epoch (the gap is unknowable).
    pub epoch_changes: u32,
    /// The first few gaps and duplicates, with where they were seen (evidence).
    pub anomalies: Vec<Anomaly>,
    /// Where the last offset seen came from.
    pub last_source: Option<Source>,
    /// When the current connection's `connect` reply arrived.
    pub connected_at: Option<Instant>,
    /// Connections lost so far.
    pub outages: u32,
}

/// Where a publication came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    /// A `pub` push on an established connection.
    Live,
    /// `pubs` of a `connect` reply.
    Recovered,
    /// A `pub` push in the frame of the `connect` reply, after it.
    WithReply,
}

/// An offset that was not the one expected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Anomaly {
    /// The offset received, and the one expected (the last seen + 1).
    pub offset: u64,
    pub expected: u64,
    pub source: Source,
    /// Where the last offset seen before it came from.
    pub after: Option<Source>,
    /// Connections this client had lost before (0: its first connection).
    pub outages: u32,
    /// Since the current connection's `connect` reply.
    pub ms_after_connect: u64,
}

/// Refusals for load a client takes at its first connect before it gives up.
const SETUP_RETRIES: u32 = 20;

/// Anomalies kept per client.
const ANOMALIES_KEPT: usize = 4;

/// What one SubResult did to a [`Position`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Applied {
    pub recovered: bool,
    /// Publications that came in the reply (`pubs`).
    pub pubs: u64,
}

impl Position {
    /// The first subscription (`{}`: from now): the channel's position.
    pub fn start(offset: Option<u64>, epoch: Option<String>) -> Self {
        Position {
            epoch,
            offsets: OffsetTracker::starting_at(offset),
            ..Position::default()
        }
    }

    /// Notes one publication's offset (see [`OffsetTracker::observe`]), keeping the first
    /// few that were not the next one expected.
    pub fn observe(&mut self, offset: u64, source: Source) {
        if let Some(last) = self.offsets.last
            && offset != last + 1
            && self.anomalies.len() < ANOMALIES_KEPT
        {
            self.anomalies.push(Anomaly {
                offset,
                expected: last + 1,
                source,
                after: self.last_source,
                outages: self.outages,
                ms_after_connect: self
                    .connected_at
                    .map_or(0, |at| at.elapsed().as_millis() as u64),
            });
        }
        self.offsets.observe(offset);
        self.last_source = Some(source);
    }

    /// What to send in `subs` to recover from here.
    pub fn since(&self) -> Since {
        Since {
            offset: self.offsets.last,
            epoch: self.epoch.clone(),
        }
    }

    /// Takes a SubResult of a reconnect: recovered publications are observed in order
    /// (`on_pub` is called for each with its stamp); an unrecovered one is a loss event, and
    /// the position jumps to the channel's latest.
    pub fn apply(&mut self, sub: &wire::SubOutcome, mut on_pub: impl FnMut(StampView)) -> Applied {
        if sub.recovered {
            for p in &sub.pubs {
                if let Some(offset) = p.offset {
                    self.observe(offset, Source::Recovered);
                }
                on_pub(p.data.unwrap_or_default());
            }
            return Applied {
                recovered: true,
                pubs: sub.pubs.len() as u64,
            };
        }
        self.not_recovered += 1;
        let latest = sub.offset;
        if sub.epoch.is_some() && sub.epoch == self.epoch {
            if let (Some(latest), Some(last)) = (latest, self.offsets.last)
                && latest > last
            {
                self.unrecoverable += latest - last;
            }
            self.offsets.last = latest.max(self.offsets.last);
        } else {
            self.epoch_changes += 1;
            self.epoch = sub.epoch.clone();
            self.offsets.last = latest;
        }
        Applied {
            recovered: false,
            pubs: 0,
        }
    }

    /// Publications this client missed for good, given the highest offset the publisher
    /// had acknowledged on its channel: gaps, what recovery could not bring back, and the
    /// tail it never received.
    pub fn lost(&self, acked: Option<u64>) -> u64 {
        self.offsets.lost
            + self.unrecoverable
            + acked.and_then(|a| self.offsets.tail(a)).unwrap_or(0)
    }
}

/// What every storm client shares.
pub struct Spec {
    pub encoding: Encoding,
    pub clock: Clock,
    pub backoff: Backoff,
    pub channels: Vec<String>,
}

impl Spec {
    /// Client `index`'s channel (index into `channels`): round-robin, so 5000 clients on
    /// 50 channels are 100 per channel.
    pub fn channel_of(&self, index: usize) -> usize {
        index % self.channels.len().max(1)
    }
}

/// Counters read by the progress line (and, `last`, by the end of the run).
pub struct Live {
    /// Storm clients connected and subscribed.
    pub open: AtomicU64,
    /// Reconnect attempts (each a new TCP connection).
    pub attempts: AtomicU64,
    /// Attempts refused with 4007 (or 111/113 at `connect`, which close with 4007).
    pub refused: AtomicU64,
    /// `pub` pushes received live.
    pub delivered: AtomicU64,
    /// Publications received in `connect` replies (recovery).
    pub recovered: AtomicU64,
    /// Each client's last offset seen (`u64::MAX` before it knows one).
    pub last: Vec<AtomicU64>,
}

impl Live {
    pub fn new(clients: usize) -> Self {
        Live {
            open: AtomicU64::new(0),
            attempts: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            delivered: AtomicU64::new(0),
            recovered: AtomicU64::new(0),
            last: (0..clients).map(|_| AtomicU64::new(u64::MAX)).collect(),
        }
    }

    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }

    fn add(counter: &AtomicU64, n: u64) {
        if n > 0 {
            counter.fetch_add(n, Ordering::Relaxed);
        }
    }

    fn sub(counter: &AtomicU64) {
        let _ = counter.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| {
            Some(v.saturating_sub(1))
        });
    }

    fn note_last(&self, index: usize, last: Option<u64>) {
        if let (Some(slot), Some(last)) = (self.last.get(index), last) {
            slot.store(last, Ordering::Relaxed);
        }
    }
}

/// Publish-to-deliver latency (µs), live pushes and recovered publications apart.
#[derive(Debug, Default)]
pub struct Delays {
    pub live: Samples,
    pub recovered: Samples,
}

impl Delays {
    fn len(&self) -> usize {
        self.live.len() + self.recovered.len()
    }

    fn take(&mut self) -> Delays {
        Delays {
            live: self.live.take(),
            recovered: self.recovered.take(),
        }
    }
}

pub enum Event {
    /// First connect and subscribe done (after `refused` refusals for load).
    Ready {
        connect: Duration,
        refused: u32,
    },
    /// First connect failed: the client takes no part in the run.
    Failed {
        kind: String,
        message: String,
    },
    /// The socket ended (`why` as tallied).
    Lost {
        index: usize,
        at: Instant,
    },
    /// Connected and subscribed again.
    Back(Back),
    /// Stopped reconnecting: the server said not to (4000, 4002, 4008).
    GaveUp {
        index: usize,
    },
    /// Latency samples (a client hands them over when its buffer is full).
    Samples(Delays),
    Done(Box<Summary>),
}

#[derive(Debug, Clone, Copy)]
pub struct Back {
    pub index: usize,
    pub at: Instant,
    /// Since the socket was lost.
    pub down_for: Duration,
    /// The successful attempt: TCP + handshake + `connect` with recovery.
    pub connect: Duration,
    /// Attempts this outage took (the successful one included).
    pub attempts: u32,
    pub resumed: bool,
    pub recovered: bool,
}

/// What one client saw over the run.
#[derive(Debug, Default)]
pub struct Summary {
    pub index: usize,
    pub channel: usize,
    pub position: Position,
    pub delivered: u64,
    pub recovered_pubs: u64,
    pub attempts: u64,
    /// Failed attempts by kind (`tcp`, `connect closed 4007`, `connect error 113`...).
    pub failures: Tally,
    /// Why sockets ended (`closed 1006`, `socket error: ...`) and pushes that ended them.
    pub losses: Tally,
    pub resumed: u32,
    pub not_resumed: u32,
    /// Publications pushed before a `connect` reply (the protocol says they follow it).
    pub early: u64,
    /// Attempts refused for load (close 4007, or 111/113 at `connect`).
    pub refused: u64,
    /// Sockets closed with 4005 (draining), attempts included.
    pub draining: u64,
    pub gave_up: bool,
    /// Samples not handed over yet.
    pub delays: Delays,
}

/// How a connection ended.
enum End {
    Stopped,
    Lost {
        close_code: Option<u16>,
        retry_after_ms: Option<u64>,
    },
}

/// Client `index`: first connect (bounded by `permits`), then read and reconnect until
/// `stop` turns true; each new value of `drops` makes it drop the socket it holds then.
#[allow(clippy::too_many_arguments)]
pub async fn client(
    index: usize,
    dialer: Arc<Dialer>,
    permits: Arc<Semaphore>,
    spec: Arc<Spec>,
    live: Arc<Live>,
    events: mpsc::UnboundedSender<Event>,
    mut stop: watch::Receiver<bool>,
    mut drops: watch::Receiver<u64>,
    seed: u64,
) {
    let channel = spec.channel_of(index);
    let name = spec.channels.get(channel).cloned().unwrap_or_default();
    let from_now = BTreeMap::from([(name.clone(), Since::default())]);
    let mut rng = Rng::seeded(seed);
    // The first connect: a refusal for load (admission control is on while everyone
    // connects too) is retried the way a real client would, the rest is a failure.
    let mut refused_at_setup = 0u32;
    let subscribed = loop {
        let first = {
            let _permit = permits.acquire().await;
            dialer.open_with(index, None, &from_now).await
        };
        let outcome = first.and_then(|opened| {
            let sub = subscription(&opened.reply, &name)?;
            Ok((opened, sub))
        });
        match outcome {
            Err(e) if refused(&e) && refused_at_setup < SETUP_RETRIES => {
                refused_at_setup += 1;
                let delay = spec
                    .backoff
                    .delay(refused_at_setup, e.retry_after_ms, &mut rng);
                tokio::time::sleep(delay).await;
            }
            outcome => break outcome,
        }
    };
    let (opened, sub) = match subscribed {
        Ok(ok) => ok,
        Err(e) => {
            let _ = events.send(Event::Failed {
                kind: e.kind(),
                message: e.to_string(),
            });
            return;
        }
    };
    let mut s = Summary {
        index,
        channel,
        position: Position::start(sub.offset, sub.epoch),
        ..Summary::default()
    };
    s.position.connected_at = Some(Instant::now());
    // Publications before the reply cannot be placed (the position comes with it).
    s.early += opened
        .before
        .iter()
        .filter(|m| is_pub(spec.encoding, m))
        .count() as u64;
    let mut session = Some(opened.reply.session);
    let mut ws = opened.conn.ws;
    let mut flow = take_all(&mut s, &spec, &opened.after);
    live.note_last(index, s.position.offsets.last);
    Live::add(&live.open, 1);
    let _ = events.send(Event::Ready {
        connect: opened.connect,
        refused: refused_at_setup,
    });
    loop {
        let end = match flow {
            Flow::Resubscribe => resubscribe(&mut ws).await,
            Flow::Go => {
                consume(
                    &mut ws, &mut s, &spec, &live, &events, &mut stop, &mut drops,
                )
                .await
            }
        };
        let (close_code, mut retry_after_ms) = match end {
            End::Stopped => {
                let _ = tokio::time::timeout(Duration::from_secs(1), ws.close(None)).await;
                Live::sub(&live.open);
                break;
            }
            End::Lost {
                close_code,
                retry_after_ms,
            } => (close_code, retry_after_ms),
        };
        let lost_at = Instant::now();
        Live::sub(&live.open);
        s.position.outages += 1;
        let _ = events.send(Event::Lost { index, at: lost_at });
        if close_code.is_some_and(|c| FATAL_CLOSES.contains(&c)) {
            s.gave_up = true;
            let _ = events.send(Event::GaveUp { index });
            break;
        }
        // Reconnect: with backoff, resuming the session and recovering from the position.
        let mut attempt = 0u32;
        let reconnected = loop {
            let delay = spec.backoff.delay(attempt, retry_after_ms, &mut rng);
            let stopped = tokio::select! {
                _ = tokio::time::sleep(delay) => false,
                _ = async { stop.wait_for(|stop| *stop).await.is_ok() } => true,
            };
            if stopped {
                break None;
            }
            attempt += 1;
            s.attempts += 1;
            Live::add(&live.attempts, 1);
            let subs = BTreeMap::from([(name.clone(), s.position.since())]);
            let outcome = dialer
                .open_with(index, session.as_deref(), &subs)
                .await
                .and_then(|opened| {
                    let sub = subscription(&opened.reply, &name)?;
                    Ok((opened, sub))
                });
            match outcome {
                Ok(ok) => break Some(ok),
                Err(e) => {
                    s.failures.add(failure_kind(&e), 1);
                    if refused(&e) {
                        s.refused += 1;
                        Live::add(&live.refused, 1);
                    }
                    s.draining += u64::from(e.close_code == Some(DRAINING));
                    if e.close_code.is_some_and(|c| FATAL_CLOSES.contains(&c)) {
                        break None;
                    }
                    retry_after_ms = e.retry_after_ms;
                }
            }
        };
        let Some((opened, sub)) = reconnected else {
            if !*stop.borrow() {
                s.gave_up = true;
                let _ = events.send(Event::GaveUp { index });
            }
            break;
        };
        // In the order the server sent them: pushes before the reply (there should be
        // none), the recovered publications, then what followed in the reply's frame.
        let delivered = s.delivered;
        s.early += opened
            .before
            .iter()
            .filter(|m| is_pub(spec.encoding, m))
            .count() as u64;
        flow = take_all(&mut s, &spec, &opened.before);
        s.position.connected_at = Some(Instant::now());
        let received = spec.clock.now_us();
        let applied = s.position.apply(&sub, |stamp| {
            if let Some(t) = stamp.t {
                s.delays.recovered.push(received.saturating_sub(t));
            }
        });
        if let Flow::Go = flow {
            flow = take_all(&mut s, &spec, &opened.after);
        }
        Live::add(&live.delivered, s.delivered - delivered);
        s.recovered_pubs += applied.pubs;
        Live::add(&live.recovered, applied.pubs);
        let resumed = opened.reply.resumed;
        if resumed {
            s.resumed += 1;
        } else {
            s.not_resumed += 1;
        }
        session = Some(opened.reply.session);
        live.note_last(index, s.position.offsets.last);
        Live::add(&live.open, 1);
        // A drop ordered while this client was down was for the socket it lost.
        drops.borrow_and_update();
        let now = Instant::now();
        let _ = events.send(Event::Back(Back {
            index,
            at: now,
            down_for: now.saturating_duration_since(lost_at),
            connect: opened.connect,
            attempts: attempt,
            resumed,
            recovered: applied.recovered,
        }));
        ws = opened.conn.ws;
    }
    let _ = events.send(Event::Done(Box::new(s)));
}

/// The SubResult of `channel` in a `connect` reply; a missing one, or `{error}`, fails the
/// attempt (the client closes and tries again).
fn subscription(reply: &ConnectOk, channel: &str) -> Result<wire::SubOutcome, SetupError> {
    match reply.subs.get(channel) {
        Some(sub) if sub.error.is_none() => Ok(sub.clone()),
        Some(sub) => {
            let code = sub.error.map_or(0, |e| e.code);
            Err(SetupError::new(
                "subscribe",
                format!("error {code}: in connect subs"),
            ))
        }
        None => Err(SetupError::new("subscribe", "no SubResult for the channel")),
    }
}

/// How a failed attempt is tallied: [`SetupError::kind`], with the detail for failures
/// below the protocol (`tcp: Connection refused (os error 111)`, `handshake: HTTP error:
/// 503 Service Unavailable`), which tell a gateway that is down from one that is starting.
fn failure_kind(e: &SetupError) -> String {
    match e.stage {
        "tcp" | "handshake" => {
            let detail: String = e.detail.chars().take(60).collect();
            format!("{}: {detail}", e.stage)
        }
        _ => e.kind(),
    }
}

/// An attempt the server turned away for load: close 4007, or 111/113 at `connect`.
fn refused(e: &SetupError) -> bool {
    e.close_code == Some(OVERLOADED) || matches!(e.code(), Some(111 | 113))
}

fn is_pub(encoding: Encoding, message: &[u8]) -> bool {
    wire::decode(encoding, message).is_ok_and(|m| m.is_pub())
}

/// What to do after a batch of messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Flow {
    Go,
    /// The server sent `unsubscribed`: recover the way the client recovers from anything,
    /// a new connection with its position.
    Resubscribe,
}

/// Takes one message: a live publication (offset checked, latency sampled), or a push
/// that matters (`disconnect`: its retry hint; `unsubscribed`). Join/leave and anything
/// else are ignored.
fn take(
    s: &mut Summary,
    encoding: Encoding,
    message: &[u8],
    source: Source,
    now_us: u64,
    retry_after_ms: &mut Option<u64>,
) -> Flow {
    let Ok(msg) = wire::decode(encoding, message) else {
        s.losses.add("undecodable message", 1);
        return Flow::Go;
    };
    if msg.is_pub() {
        s.delivered += 1;
        if let Some(offset) = msg.offset {
            s.position.observe(offset, source);
        }
        if let Some(t) = msg.data.and_then(|d| d.t) {
            s.delays.live.push(now_us.saturating_sub(t));
        }
        return Flow::Go;
    }
    match msg.push.as_deref() {
        Some("disconnect") => {
            *retry_after_ms = msg.retry_after_ms.or(*retry_after_ms);
            s.losses
                .add(format!("disconnect push {}", msg.code.unwrap_or(0)), 1);
            Flow::Go
        }
        Some("unsubscribed") => {
            s.losses
                .add(format!("unsubscribed push {}", msg.code.unwrap_or(0)), 1);
            Flow::Resubscribe
        }
        _ => Flow::Go,
    }
}

/// [`take`] for the pushes that came with a `connect` reply.
fn take_all(s: &mut Summary, spec: &Spec, messages: &[Vec<u8>]) -> Flow {
    let now_us = spec.clock.now_us();
    let mut flow = Flow::Go;
    for message in messages {
        if take(
            s,
            spec.encoding,
            message,
            Source::WithReply,
            now_us,
            &mut None,
        ) == Flow::Resubscribe
        {
            flow = Flow::Resubscribe;
        }
    }
    flow
}

async fn resubscribe(ws: &mut Ws) -> End {
    let _ = tokio::time::timeout(Duration::from_secs(1), ws.close(None)).await;
    End::Lost {
        close_code: None,
        retry_after_ms: None,
    }
}

/// Resolves when rtload orders every storm client to drop its socket (`--drop-after`);
/// never without such an order.
async fn drop_ordered(drops: &mut watch::Receiver<u64>) {
    if drops.changed().await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// Reads the socket until it ends or `stop`: live publications (offsets checked), and the
/// `disconnect` push that may come before a close.
async fn consume(
    ws: &mut Ws,
    s: &mut Summary,
    spec: &Spec,
    live: &Live,
    events: &mpsc::UnboundedSender<Event>,
    stop: &mut watch::Receiver<bool>,
    drops: &mut watch::Receiver<u64>,
) -> End {
    let mut retry_after_ms = None;
    loop {
        let frame = tokio::select! {
            biased;
            _ = async { stop.wait_for(|stop| *stop).await.is_ok() } => return End::Stopped,
            _ = drop_ordered(drops) => {
                s.losses.add("dropped by rtload", 1);
                // No close handshake: the server learns of it from the TCP stream's end.
                let _ = ws.get_mut().shutdown().await;
                return End::Lost {
                    close_code: None,
                    retry_after_ms: None,
                };
            }
            frame = ws.next() => frame,
        };
        let frame = match frame {
            Some(Ok(frame)) => frame,
            Some(Err(e)) => {
                s.losses.add(format!("socket error: {}", short(&e)), 1);
                return End::Lost {
                    close_code: None,
                    retry_after_ms,
                };
            }
            None => {
                s.losses.add("socket closed", 1);
                return End::Lost {
                    close_code: None,
                    retry_after_ms,
                };
            }
        };
        let bytes: &[u8] = match &frame {
            Message::Binary(b) => b,
            Message::Text(t) => t.as_bytes(),
            Message::Close(c) => {
                let code = c.as_ref().map_or(1005, |c| u16::from(c.code));
                s.losses.add(format!("closed {code}"), 1);
                s.draining += u64::from(code == DRAINING);
                return End::Lost {
                    close_code: Some(code),
                    retry_after_ms,
                };
            }
            _ => continue,
        };
        let now_us = spec.clock.now_us();
        let delivered = s.delivered;
        let mut flow = Flow::Go;
        for part in wire::split_frame(spec.encoding, bytes) {
            let step = match part {
                Ok(message) => take(
                    s,
                    spec.encoding,
                    message,
                    Source::Live,
                    now_us,
                    &mut retry_after_ms,
                ),
                Err(_) => {
                    s.losses.add("undecodable message", 1);
                    Flow::Go
                }
            };
            if step == Flow::Resubscribe {
                flow = step;
            }
        }
        Live::add(&live.delivered, s.delivered - delivered);
        live.note_last(s.index, s.position.offsets.last);
        if s.delays.len() >= Samples::FLUSH_AT {
            let _ = events.send(Event::Samples(s.delays.take()));
        }
        if flow == Flow::Resubscribe {
            return resubscribe(ws).await;
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::wire::{PubView, SubOutcome};

    #[test]
    fn backoff_grows_to_the_cap_with_full_jitter() {
        let b = Backoff {
            base: Duration::from_millis(100),
            cap: Duration::from_secs(5),
        };
        assert_eq!(b.ceiling(0), Duration::from_millis(100));
        assert_eq!(b.ceiling(3), Duration::from_millis(800));
        assert_eq!(b.ceiling(6), Duration::from_secs(5));
        assert_eq!(b.ceiling(1000), Duration::from_secs(5));
        let mut rng = Rng::seeded(7);
        let delays: Vec<Duration> = (0..1000).map(|_| b.delay(2, None, &mut rng)).collect();
        assert!(delays.iter().all(|d| *d <= Duration::from_millis(400)));
        let mean = delays.iter().sum::<Duration>() / 1000;
        assert!(
            (Duration::from_millis(180)..Duration::from_millis(220)).contains(&mean),
            "{mean:?}"
        );
        // A server hint is waited in full, plus at most the base, however many attempts.
        for attempt in [0, 3, 9] {
            let d = b.delay(attempt, Some(1500), &mut rng);
            assert!((Duration::from_millis(1500)..=Duration::from_millis(1600)).contains(&d));
        }
    }

    #[test]
    fn rng_is_uniform_enough_and_seeds_differ() {
        let mut a = Rng::seeded(1);
        let mut b = Rng::seeded(2);
        assert_ne!(a.next_u64(), b.next_u64());
        let mut buckets = [0u32; 10];
        for _ in 0..10_000 {
            let u = a.unit();
            assert!((0.0..1.0).contains(&u));
            buckets[(u * 10.0) as usize] += 1;
        }
        assert!(
            buckets.iter().all(|n| (850..1150).contains(n)),
            "{buckets:?}"
        );
    }

    fn sub(offset: u64, epoch: &str, recovered: bool, pubs: &[u64]) -> SubOutcome {
        SubOutcome {
            offset: Some(offset),
            epoch: Some(epoch.into()),
            recovered,
            pubs: pubs
                .iter()
                .map(|&o| PubView {
                    offset: Some(o),
                    data: Some(StampView {
                        t: Some(o),
                        seq: None,
                    }),
                })
                .collect(),
            error: None,
        }
    }

    #[test]
    fn recovered_publications_fill_the_outage_exactly_once() {
        let mut p = Position::start(Some(10), Some("e1".into()));
        assert_eq!(
            p.since(),
            Since {
                offset: Some(10),
                epoch: Some("e1".into())
            }
        );
        p.offsets.observe(11);
        p.offsets.observe(12);
        let mut stamps = Vec::new();
        p.outages = 1;
        let applied = p.apply(&sub(15, "e1", true, &[13, 14, 15]), |s| stamps.push(s.t));
        assert_eq!(
            applied,
            Applied {
                recovered: true,
                pubs: 3
            }
        );
        assert_eq!(stamps, [Some(13), Some(14), Some(15)]);
        p.offsets.observe(16);
        assert_eq!(p.lost(Some(16)), 0);
        assert_eq!(p.lost(Some(18)), 2, "a tail never received is lost");
        assert_eq!(p.offsets.out_of_order, 0);
        // A publication both recovered and pushed live is a duplicate.
        p.outages = 2;
        p.apply(&sub(16, "e1", true, &[16]), |_| {});
        assert_eq!(p.offsets.out_of_order, 1);
        assert_eq!(
            p.anomalies,
            [Anomaly {
                offset: 16,
                expected: 17,
                source: Source::Recovered,
                after: Some(Source::Recovered),
                outages: 2,
                ms_after_connect: 0,
            }]
        );
    }

    #[test]
    fn unrecovered_answers_count_the_skipped_publications() {
        let mut p = Position::start(Some(10), Some("e1".into()));
        let applied = p.apply(&sub(25, "e1", false, &[]), |_| {});
        assert!(!applied.recovered);
        assert_eq!(
            (p.not_recovered, p.unrecoverable, p.offsets.last),
            (1, 15, Some(25))
        );
        assert_eq!(p.lost(Some(25)), 15);
        // Another epoch: the history was lost; the position restarts there.
        p.apply(&sub(3, "e2", false, &[]), |_| {});
        assert_eq!((p.epoch_changes, p.offsets.last), (1, Some(3)));
        assert_eq!(p.epoch.as_deref(), Some("e2"));
    }

    #[test]
    fn refusals_are_4007_closes_and_busy_connects() {
        let closed = SetupError {
            close_code: Some(4007),
            retry_after_ms: Some(1200),
            ..SetupError::new("connect", "closed 4007")
        };
        assert!(refused(&closed));
        assert_eq!(closed.kind(), "connect closed 4007");
        assert!(refused(&SetupError::new("connect", "error 113: busy")));
        assert!(!refused(&SetupError::new("tcp", "Connection refused")));
        assert_eq!(
            failure_kind(&SetupError::new("tcp", "Connection refused (os error 111)")),
            "tcp: Connection refused (os error 111)"
        );
        assert_eq!(failure_kind(&closed), "connect closed 4007");
        let reply = ConnectOk {
            subs: BTreeMap::from([(
                "chat:a".to_string(),
                SubOutcome {
                    error: Some(wire::CodeOnly { code: 106 }),
                    ..SubOutcome::default()
                },
            )]),
            ..ConnectOk::default()
        };
        assert_eq!(
            subscription(&reply, "chat:a").unwrap_err().kind(),
            "subscribe error 106"
        );
        assert!(subscription(&reply, "chat:b").is_err());
    }
}
