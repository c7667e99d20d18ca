//! One request/reply connection: set up (bounded concurrency), then a writer task that
//! sends the calls the pacer routes to it and a reader that matches replies by id. Two
//! tasks, so a write blocked on a full socket never stops replies from being read (and a
//! busy reader never delays a send).
//!
//! The writer tells the reader about each call (id, intended and write times) before it
//! writes it, so the reply can never arrive first. Counts and samples go to the collector
//! as [`Event`]s, samples about once a second (each connection buffers its own: no lock on
//! the hot path).

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use tokio::sync::{Semaphore, mpsc, watch};
use tokio::time::MissedTickBehavior;
use tokio_tungstenite::tungstenite::Message;

use super::tracker::{CallSamples, CallStats, Outcome, Sent, Tracker};
use super::{Call, Live};
use crate::client::{Dialer, Ws};
use crate::error::short;
use crate::pacer::{Tick, Window};
use crate::stats::Samples;
use crate::wire::{self, Encoding, next_id};

/// What every connection of a run shares.
pub struct Spec {
    pub call: Call,
    pub encoding: Encoding,
    pub window: Window,
    /// A call without a reply this long after it was written is given up (checked about
    /// once a second).
    pub timeout: Duration,
    pub flush_every: Duration,
    /// Keep `ok` latencies tagged with their sequence numbers too (see
    /// [`crate::stats::SeqSamples`]), for a scenario that splits the run into phases.
    pub by_seq: bool,
}

pub enum Event {
    /// Connected; the pacer routes this connection's calls to `ticks`.
    Ready {
        connect: Duration,
        ticks: mpsc::UnboundedSender<Tick>,
    },
    /// Setup failed: the error's kind (for the tally) and a readable message.
    Failed { kind: String, message: String },
    /// Samples of measured calls since the last flush.
    Samples(Box<CallSamples>),
    /// The connection is finished (told to stop, or its socket ended).
    Done(Box<Summary>),
}

#[derive(Debug, Default)]
pub struct Summary {
    pub stats: CallStats,
    /// Samples not flushed yet.
    pub samples: CallSamples,
    /// The socket ended before the run did.
    pub closed_early: bool,
}

/// Sets up connection `index` and runs it until `stop` turns true.
pub async fn connection(
    index: usize,
    dialer: Arc<Dialer>,
    permits: Arc<Semaphore>,
    spec: Arc<Spec>,
    live: Arc<Live>,
    events: mpsc::UnboundedSender<Event>,
    stop: watch::Receiver<bool>,
) {
    let opened = {
        let _permit = permits.acquire().await;
        dialer.open(index).await
    };
    let (conn, connect) = match opened {
        Ok(opened) => opened,
        Err(e) => {
            let _ = events.send(Event::Failed {
                kind: e.kind(),
                message: e.to_string(),
            });
            return;
        }
    };
    let (ticks_tx, ticks) = mpsc::unbounded_channel();
    let _ = events.send(Event::Ready {
        connect,
        ticks: ticks_tx,
    });
    Live::add(&live.open, 1);
    let (sink, stream) = conn.ws.split();
    let (inflight_tx, inflight) = mpsc::unbounded_channel();
    let writer = tokio::spawn(write(
        sink,
        ticks,
        inflight_tx,
        spec.clone(),
        live.clone(),
        events.clone(),
        stop.clone(),
    ));
    let (mut summary, stream) = read(stream, inflight, &spec, &live, &events, stop).await;
    Live::sub(&live.open, 1);
    // The writer ends when the pacer is done or at stop; after an early close it goes on
    // counting the calls routed here as lost until then.
    match writer.await {
        Ok((stats, lag, sink)) => {
            summary.stats.merge(&stats);
            if !lag.is_empty() {
                let samples = CallSamples {
                    lag,
                    ..CallSamples::default()
                };
                let _ = events.send(Event::Samples(Box::new(samples)));
            }
            if !summary.closed_early
                && let Ok(mut ws) = sink.reunite(stream)
            {
                let _ = tokio::time::timeout(Duration::from_secs(1), ws.close(None)).await;
            }
        }
        Err(e) => summary
            .stats
            .errors
            .add(format!("writer task failed: {e}"), 1),
    }
    let _ = events.send(Event::Done(Box::new(summary)));
}

/// Sends the calls routed to this connection. Returns its counts, the send-lag samples not
/// flushed yet, and the sink (to close the socket with).
async fn write(
    mut sink: SplitSink<Ws, Message>,
    mut ticks: mpsc::UnboundedReceiver<Tick>,
    inflight: mpsc::UnboundedSender<(u32, Sent)>,
    spec: Arc<Spec>,
    live: Arc<Live>,
    events: mpsc::UnboundedSender<Event>,
    mut stop: watch::Receiver<bool>,
) -> (CallStats, Samples, SplitSink<Ws, Message>) {
    let mut stats = CallStats::default();
    let mut lag = Samples::default();
    let mut id = 1u32; // 1 was the `connect`
    let mut broken = false;
    let mut batch = Vec::new();
    loop {
        tokio::select! {
            biased;
            _ = async { stop.wait_for(|stop| *stop).await.is_ok() } => break,
            tick = ticks.recv() => match tick {
                Some(tick) => batch.push(tick),
                None => break,
            },
        }
        while batch.len() < 256 {
            match ticks.try_recv() {
                Ok(tick) => batch.push(tick),
                Err(_) => break,
            }
        }
        let taken = batch.len() as u64;
        let mut written = 0;
        for tick in batch.drain(..) {
            if broken {
                lose(&mut stats, &tick, &spec, &live);
                continue;
            }
            let id = next_id(&mut id);
            let message = match spec.call.encode(spec.encoding, id) {
                Ok(m) => m,
                Err(e) => {
                    stats.errors.add(format!("cannot encode the call: {e}"), 1);
                    lose(&mut stats, &tick, &spec, &live);
                    continue;
                }
            };
            let sent = Sent {
                seq: tick.seq,
                intended: tick.intended,
                written: Instant::now(),
            };
            stats.on_write(&sent, &spec.window);
            if spec.window.contains(sent.seq) {
                lag.push(
                    sent.written
                        .saturating_duration_since(sent.intended)
                        .as_micros() as u64,
                );
            }
            // Counted before the reader can end it, so the gauge never goes below zero.
            Live::add(&live.outstanding, 1);
            if inflight.send((id, sent)).is_err() {
                // The reader is gone: the socket ended.
                Live::sub(&live.outstanding, 1);
                lose(&mut stats, &tick, &spec, &live);
                broken = true;
                continue;
            }
            written += 1;
            // If this fails the reply never comes; the reader ends the call when it sees
            // the socket end.
            broken = sink.feed(message).await.is_err();
        }
        Live::add(&live.sent, written);
        broken = broken || sink.flush().await.is_err();
        // Only now: the drain waits for taken == routed and nothing outstanding, and each
        // call of the batch is outstanding (or ended) by this point.
        Live::add(&live.taken, taken);
        if lag.len() >= Samples::FLUSH_AT {
            let samples = CallSamples {
                lag: lag.take(),
                ..CallSamples::default()
            };
            let _ = events.send(Event::Samples(Box::new(samples)));
        }
    }
    (stats, lag, sink)
}

/// A call that could not be written: the connection is gone.
fn lose(stats: &mut CallStats, tick: &Tick, spec: &Spec, live: &Live) {
    Live::add(&live.failed, 1);
    if spec.window.contains(tick.seq) {
        stats.count(Outcome::Lost);
    }
}

/// Reads replies until told to stop or the socket ends; then ends the calls still in
/// flight (no reply, or lost with the connection).
async fn read(
    mut stream: SplitStream<Ws>,
    mut inflight: mpsc::UnboundedReceiver<(u32, Sent)>,
    spec: &Spec,
    live: &Live,
    events: &mpsc::UnboundedSender<Event>,
    mut stop: watch::Receiver<bool>,
) -> (Summary, SplitStream<Ws>) {
    let mut tracker = Tracker::new(spec.window).keeping_seq(spec.by_seq);
    let mut closed_early = false;
    let mut writer_open = true;
    let mut tick = tokio::time::interval(spec.flush_every);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    tick.reset(); // the first tick would otherwise fire at once
    loop {
        tokio::select! {
            biased;
            // (The guard `wait_for` returns must not live across an await: map it away.)
            _ = async { stop.wait_for(|stop| *stop).await.is_ok() } => break,
            item = inflight.recv(), if writer_open => match item {
                Some((id, sent)) => tracker.sent(id, sent),
                None => writer_open = false,
            },
            frame = stream.next() => {
                let now = Instant::now();
                let frame = match frame {
                    Some(Ok(frame)) => frame,
                    Some(Err(e)) => {
                        end(&mut tracker, format!("socket error: {}", short(&e)), live);
                        closed_early = true;
                        break;
                    }
                    None => {
                        end(&mut tracker, "socket closed".into(), live);
                        closed_early = true;
                        break;
                    }
                };
                let bytes: &[u8] = match &frame {
                    Message::Binary(b) => b,
                    Message::Text(t) => t.as_bytes(),
                    Message::Close(c) => {
                        let code = c.as_ref().map_or(1005, |c| u16::from(c.code));
                        end(&mut tracker, format!("closed {code}"), live);
                        closed_early = true;
                        break;
                    }
                    _ => continue,
                };
                // Calls written before this frame arrived may not have been taken yet.
                while let Ok((id, sent)) = inflight.try_recv() {
                    tracker.sent(id, sent);
                }
                for part in wire::split_frame(spec.encoding, bytes) {
                    match part.and_then(|m| wire::decode(spec.encoding, m)) {
                        Ok(msg) => tracker.on_message(&msg, now, live),
                        Err(_) => {
                            tracker.stats.errors.add("undecodable message", 1);
                            Live::add(&live.errors, 1);
                        }
                    }
                }
                if tracker.samples.len() >= Samples::FLUSH_AT {
                    let _ = events.send(Event::Samples(Box::new(tracker.samples.take())));
                }
            }
            _ = tick.tick() => {
                tracker.expire(Instant::now(), spec.timeout, live);
                if !tracker.samples.is_empty() {
                    let _ = events.send(Event::Samples(Box::new(tracker.samples.take())));
                }
            }
        }
    }
    // Take what the writer sent last; after `close` it cannot send more (it counts its
    // later calls as lost itself).
    inflight.close();
    while let Ok((id, sent)) = inflight.try_recv() {
        tracker.sent(id, sent);
    }
    let outcome = if closed_early {
        Outcome::Lost
    } else {
        Outcome::NoReply
    };
    tracker.abandon(outcome, live);
    let summary = Summary {
        stats: tracker.stats,
        samples: tracker.samples,
        closed_early,
    };
    (summary, stream)
}

fn end(tracker: &mut Tracker, reason: String, live: &Live) {
    tracker.stats.errors.add(reason, 1);
    Live::add(&live.errors, 1);
}
