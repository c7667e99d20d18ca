//! A subscriber connection: set up (connect + subscribe, bounded concurrency), then read
//! `pub` pushes until told to stop, recording publish-to-deliver latency, deliveries and
//! gaps in offsets. Everything it learns goes to the collector as [`Event`]s: latency
//! samples once a second or every [`Samples::FLUSH_AT`] (its own buffer, so no lock on the
//! hot path), a summary at the end. [`consume`] is also the reader of a chat member, which
//! publishes on the same socket: replies go to a handler of its own.

use std::sync::Arc;
use std::time::Duration;

use futures_util::{Stream, StreamExt};
use tokio::sync::{Semaphore, mpsc, watch};
use tokio::time::MissedTickBehavior;
use tokio_tungstenite::tungstenite::{self, Message};

use crate::client::Dialer;
use crate::clock::Clock;
use crate::error::short;
use crate::pacer::Window;
use crate::publish::PubStats;
use crate::stats::{Live, Samples, Tally};
use crate::wire::{self, Encoding, Incoming};

pub struct SubSpec {
    pub channel: String,
    /// The channel's index in the run's list (publishers count acknowledgements by it).
    pub channel_index: usize,
    pub encoding: Encoding,
    pub window: Window,
    pub clock: Clock,
    pub flush_every: Duration,
}

impl SubSpec {
    /// A spec for each of the run's channels, in their order (their index is the one
    /// publishers count acknowledgements by).
    pub fn per_channel(
        channels: &[String],
        encoding: Encoding,
        window: Window,
        clock: Clock,
    ) -> Vec<Arc<SubSpec>> {
        channels
            .iter()
            .enumerate()
            .map(|(index, channel)| {
                Arc::new(SubSpec {
                    channel: channel.clone(),
                    channel_index: index,
                    encoding,
                    window,
                    clock,
                    flush_every: Duration::from_secs(1),
                })
            })
            .collect()
    }
}

pub enum Event {
    /// Connected and subscribed.
    Ready {
        connect: Duration,
        subscribe: Duration,
    },
    /// Setup failed: the error's kind (for the tally) and a readable message.
    Failed { kind: String, message: String },
    /// Latency samples (µs) of measured publications since the last flush.
    Samples(Samples),
    /// The subscriber stopped (asked to, or its connection ended).
    Done(Box<Summary>),
    /// A chat member's publishing: its writer's counts once its queue is done
    /// (`writer_done`), its acknowledgements' when it stops.
    Published {
        stats: Box<PubStats>,
        writer_done: bool,
    },
}

/// What one subscriber saw.
#[derive(Debug)]
pub struct Summary {
    /// Index of its channel (see [`SubSpec::channel_index`]).
    pub channel: usize,
    pub delivered: u64,
    pub delivered_measured: u64,
    pub offsets: OffsetTracker,
    /// `pub` pushes whose data carried no rtload stamp (someone else publishing).
    pub unstamped: u64,
    pub errors: Tally,
    /// The connection ended before the subscriber was told to stop.
    pub closed_early: bool,
    /// Samples recorded since the last flush.
    pub samples: Samples,
}

/// Follows a channel's offsets: each publication should be the previous plus one.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct OffsetTracker {
    /// The last offset seen (starting from the subscribe reply's).
    pub last: Option<u64>,
    /// Publications skipped over (offset jumped ahead).
    pub lost: u64,
    /// Publications at or below one already seen (duplicates, reordering).
    pub out_of_order: u64,
}

impl OffsetTracker {
    pub fn starting_at(offset: Option<u64>) -> Self {
        OffsetTracker {
            last: offset,
            ..Default::default()
        }
    }

    /// Notes one publication's offset; returns how many were lost just before it.
    #[inline]
    pub fn observe(&mut self, offset: u64) -> u64 {
        match self.last {
            Some(last) if offset <= last => {
                self.out_of_order += 1;
                0
            }
            Some(last) => {
                let gap = offset - last - 1;
                self.lost += gap;
                self.last = Some(offset);
                gap
            }
            None => {
                self.last = Some(offset);
                0
            }
        }
    }

    /// Publications after the last one seen, up to `latest` acknowledged to the publisher.
    pub fn tail(&self, latest: u64) -> Option<u64> {
        self.last.map(|last| latest.saturating_sub(last))
    }
}

/// Sets up subscriber `index` and runs it until `stop` turns true.
pub async fn subscriber(
    index: usize,
    dialer: Arc<Dialer>,
    permits: Arc<Semaphore>,
    spec: Arc<SubSpec>,
    live: Arc<Live>,
    events: mpsc::UnboundedSender<Event>,
    stop: watch::Receiver<bool>,
) {
    let setup = async {
        let _permit = permits.acquire().await;
        let (mut conn, connect) = dialer.open(index).await?;
        let (offset, subscribe) = conn.subscribe(&spec.channel).await?;
        Ok::<_, crate::client::SetupError>((conn.ws, connect, subscribe, offset))
    };
    let (mut ws, connect, subscribe, offset) = match setup.await {
        Ok(ready) => ready,
        Err(e) => {
            let _ = events.send(Event::Failed {
                kind: e.kind(),
                message: e.to_string(),
            });
            return;
        }
    };
    let _ = events.send(Event::Ready { connect, subscribe });
    Live::add(&live.open, 1);
    let summary = Summary::new(spec.channel_index, OffsetTracker::starting_at(offset));
    let summary = consume(&mut ws, summary, &spec, &live, &events, stop, |_| {}).await;
    if !summary.closed_early {
        let _ = tokio::time::timeout(Duration::from_secs(1), ws.close(None)).await;
    }
    Live::dec(&live.open);
    let _ = events.send(Event::Done(Box::new(summary)));
}

/// Reads `ws` until `stop` turns true or the socket ends: `pub` pushes into `s`, replies
/// (messages without `push`) to `on_reply`. Samples go to `events` as they pile up.
pub async fn consume<S>(
    ws: &mut S,
    mut s: Summary,
    spec: &SubSpec,
    live: &Live,
    events: &mpsc::UnboundedSender<Event>,
    mut stop: watch::Receiver<bool>,
    mut on_reply: impl FnMut(&Incoming<'_>),
) -> Summary
where
    S: Stream<Item = Result<Message, tungstenite::Error>> + Unpin,
{
    let mut flush = tokio::time::interval(spec.flush_every);
    flush.set_missed_tick_behavior(MissedTickBehavior::Delay);
    flush.reset(); // the first tick would otherwise fire at once
    loop {
        tokio::select! {
            biased;
            // (The guard `wait_for` returns must not live across an await: map it away.)
            _ = async { stop.wait_for(|stop| *stop).await.is_ok() } => break,
            frame = ws.next() => {
                let frame = match frame {
                    Some(Ok(frame)) => frame,
                    Some(Err(e)) => { s.end(format!("socket error: {}", short(&e)), live); break; }
                    None => { s.end("socket closed".into(), live); break; }
                };
                let bytes: &[u8] = match &frame {
                    Message::Binary(b) => b,
                    Message::Text(t) => t.as_bytes(),
                    Message::Close(c) => {
                        let code = c.as_ref().map_or(1005, |c| u16::from(c.code));
                        s.end(format!("closed {code}"), live);
                        break;
                    }
                    _ => continue,
                };
                s.on_frame(bytes, spec, live, &mut on_reply);
                if s.samples.len() >= Samples::FLUSH_AT {
                    let _ = events.send(Event::Samples(s.samples.take()));
                }
            }
            _ = flush.tick() => {
                if !s.samples.is_empty() {
                    let _ = events.send(Event::Samples(s.samples.take()));
                }
            }
        }
    }
    s
}

impl Summary {
    pub fn new(channel: usize, offsets: OffsetTracker) -> Self {
        Summary {
            channel,
            delivered: 0,
            delivered_measured: 0,
            offsets,
            unstamped: 0,
            errors: Tally::default(),
            closed_early: false,
            samples: Samples::default(),
        }
    }

    /// The hot path: one frame, possibly several messages, all received "now". Messages
    /// that are not pushes go to `on_reply`.
    fn on_frame(
        &mut self,
        bytes: &[u8],
        spec: &SubSpec,
        live: &Live,
        mut on_reply: impl FnMut(&Incoming<'_>),
    ) {
        let now_us = spec.clock.now_us();
        let (mut delivered, mut measured, mut lost) = (0, 0, 0);
        for part in wire::split_frame(spec.encoding, bytes) {
            let msg = match part.and_then(|m| wire::decode(spec.encoding, m)) {
                Ok(msg) => msg,
                Err(_) => {
                    self.errors.add("undecodable message", 1);
                    Live::add(&live.errors, 1);
                    continue;
                }
            };
            if msg.is_pub() {
                delivered += 1;
                if let Some(offset) = msg.offset {
                    lost += self.offsets.observe(offset);
                }
                match msg.data {
                    Some(wire::StampView {
                        t: Some(t),
                        seq: Some(seq),
                    }) => {
                        if spec.window.contains(seq) {
                            measured += 1;
                            self.samples.push(now_us.saturating_sub(t));
                        }
                    }
                    _ => self.unstamped += 1,
                }
            } else if let Some(kind @ ("unsubscribed" | "disconnect")) = msg.push.as_deref() {
                self.errors
                    .add(format!("{kind} push {}", msg.code.unwrap_or(0)), 1);
                Live::add(&live.errors, 1);
            } else if msg.push.is_none() {
                on_reply(&msg);
            }
        }
        self.delivered += delivered;
        self.delivered_measured += measured;
        Live::add(&live.delivered, delivered);
        Live::add(&live.delivered_measured, measured);
        Live::add(&live.lost, lost);
    }

    fn end(&mut self, reason: String, live: &Live) {
        self.closed_early = true;
        self.errors.add(reason, 1);
        Live::add(&live.errors, 1);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn offsets_count_gaps_and_reordering() {
        let mut t = OffsetTracker::starting_at(Some(10));
        assert_eq!(t.observe(11), 0);
        assert_eq!(t.observe(12), 0);
        assert_eq!(t.observe(15), 2);
        assert_eq!(t.observe(14), 0);
        assert_eq!(t.observe(15), 0);
        assert_eq!(t.observe(16), 0);
        assert_eq!((t.lost, t.out_of_order, t.last), (2, 2, Some(16)));
        assert_eq!(t.tail(20), Some(4));
        assert_eq!(t.tail(3), Some(0));
        let mut fresh = OffsetTracker::starting_at(None);
        assert_eq!(fresh.tail(5), None);
        assert_eq!(fresh.observe(7), 0);
        assert_eq!(fresh.tail(9), Some(2));
    }

    #[test]
    fn a_batched_frame_records_each_publication() {
        let spec = SubSpec {
            channel: "bench:fanout".into(),
            channel_index: 0,
            encoding: Encoding::Msgpack,
            window: Window { first: 2, end: 100 },
            clock: Clock::new(),
            flush_every: Duration::from_secs(1),
        };
        let live = Live::default();
        let now = spec.clock.now_us();
        let mut frame = Vec::new();
        for (offset, seq) in [(1u64, 1u64), (2, 2), (3, 3), (5, 5)] {
            let push = json!({"push": "pub", "channel": "bench:fanout", "offset": offset,
                              "data": {"t": now - 1000 * seq, "seq": seq, "pad": "p"}});
            frame.extend(rmp_serde::to_vec_named(&push).unwrap());
        }
        frame.extend(
            rmp_serde::to_vec_named(&json!({"push": "pub", "offset": 6, "data": "x"})).unwrap(),
        );
        frame.extend(
            rmp_serde::to_vec_named(&json!({"push": "unsubscribed", "channel": "c", "code": 112}))
                .unwrap(),
        );
        frame.extend(rmp_serde::to_vec_named(&json!({"id": 7, "ok": {"offset": 6}})).unwrap());
        let mut s = Summary::new(0, OffsetTracker::starting_at(Some(0)));
        let mut replies = Vec::new();
        s.on_frame(&frame, &spec, &live, |m| replies.push(m.id));
        assert_eq!(replies, [Some(7)], "the reply went to the handler");
        assert_eq!((s.delivered, s.delivered_measured, s.unstamped), (5, 3, 1));
        assert_eq!(s.offsets.lost, 1);
        assert_eq!(s.samples.len(), 3);
        assert!(
            s.samples.min().unwrap() >= 2000,
            "latency is receive time minus t"
        );
        assert_eq!(Live::get(&live.delivered), 5);
        assert_eq!(Live::get(&live.lost), 1);
        assert_eq!(
            s.errors.iter().collect::<Vec<_>>(),
            [("unsubscribed push 112", 1)]
        );
    }
}
