//! Publishing with the WebSocket `publish` op: a writer that stamps and sends ([`write`]),
//! and [`Acks`], which matches replies to sends by id. A dedicated publisher connection
//! ([`ws_worker`]) reads nothing but replies; a chat member (`scenario::chat`) runs the
//! same writer and hands its replies to [`Acks`] from its subscriber's reader.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;

use super::{PubStats, PublishSpec, Queue, next_batch};
use crate::client::Ws;
use crate::pacer::Tick;
use crate::stats::Live;
use crate::wire::{self, Encoding, Incoming, Publish, Stamp, next_id};

/// Sends written by [`write`], by id, for [`Acks`].
pub type Inflight = mpsc::UnboundedReceiver<(u32, Tick)>;

/// A dedicated publisher connection: the writer, and a reader of its replies until every
/// send is answered (or `drain` after the last one).
pub(super) async fn ws_worker(
    ws: Ws,
    encoding: Encoding,
    queue: Queue,
    spec: Arc<PublishSpec>,
    live: Arc<Live>,
) -> PubStats {
    let (sink, stream) = ws.split();
    let (inflight_tx, inflight_rx) = mpsc::unbounded_channel();
    let acks = tokio::spawn(ws_acks(
        stream,
        encoding,
        Acks::new(inflight_rx, spec.clone()),
        live.clone(),
    ));
    let (mut stats, sink) = write(sink, encoding, queue, inflight_tx, &spec, &live).await;
    match acks.await {
        Ok((ack_stats, stream)) => {
            stats.merge(ack_stats);
            if let Ok(mut ws) = sink.reunite(stream) {
                let _ = tokio::time::timeout(Duration::from_secs(1), ws.close(None)).await;
            }
        }
        Err(e) => stats.errors.add(format!("publish ack task failed: {e}"), 1),
    }
    stats
}

/// Sends the ticks of `queue` as `publish` commands until it closes. Each send goes to
/// `inflight` (id and tick) before it is written, so the reader knows it before its reply
/// can arrive. Returns the writer's counts and the sink (to close the socket with).
pub async fn write(
    mut sink: SplitSink<Ws, Message>,
    encoding: Encoding,
    queue: Queue,
    inflight: mpsc::UnboundedSender<(u32, Tick)>,
    spec: &PublishSpec,
    live: &Live,
) -> (PubStats, SplitSink<Ws, Message>) {
    let mut stats = PubStats::new();
    let mut id = 1u32; // 1 was the `connect`
    let mut broken = false;
    while let Some(batch) = next_batch(&queue, 256).await {
        let mut written = 0;
        for tick in batch {
            if broken {
                let lost = Err("publish connection lost".into());
                spec.settle(&mut stats, &tick, lost, false, live);
                continue;
            }
            let message = encoding.encode(&Publish {
                id: next_id(&mut id),
                op: "publish",
                channel: spec.channel_of(tick.seq).1,
                data: Stamp {
                    t: spec.clock.unix_us(tick.intended),
                    seq: tick.seq,
                    pad: &spec.pad,
                },
            });
            let message = match message {
                Ok(m) => m,
                Err(e) => {
                    let failed = Err(format!("publish encode: {e}"));
                    spec.settle(&mut stats, &tick, failed, false, live);
                    continue;
                }
            };
            // Counted before the reader can end it, so the gauge never goes below zero.
            Live::add(&live.outstanding, 1);
            // The ack reader must know the id before the reply can arrive. If the write
            // fails, the reply never comes and the reader counts the send as failed.
            if inflight.send((id, tick)).is_err() {
                // The reader is gone: its socket ended.
                let lost = Err("publish connection lost".into());
                spec.settle(&mut stats, &tick, lost, true, live);
                broken = true;
                continue;
            }
            stats.on_write(&tick, Instant::now(), &spec.window);
            written += 1;
            broken = sink.feed(message).await.is_err();
        }
        Live::add(&live.sent, written);
        broken = broken || sink.flush().await.is_err();
        if broken {
            // Stop taking sends: other workers (if any) carry on; with none left, the
            // pacer (or router) sees the queue close.
            break;
        }
    }
    (stats, sink)
}

/// The sends of one connection waiting for their reply, matched by id.
pub struct Acks {
    inflight: Inflight,
    pending: HashMap<u32, Tick>,
    writer_done: bool,
    spec: Arc<PublishSpec>,
    pub stats: PubStats,
}

impl Acks {
    pub fn new(inflight: Inflight, spec: Arc<PublishSpec>) -> Self {
        Acks {
            inflight,
            pending: HashMap::new(),
            writer_done: false,
            spec,
            stats: PubStats::new(),
        }
    }

    /// Takes what the writer registered so far.
    fn take_sent(&mut self) {
        while let Ok((id, tick)) = self.inflight.try_recv() {
            self.pending.insert(id, tick);
        }
    }

    /// Waits for the writer's next send; false once the writer is gone.
    async fn next_sent(&mut self) -> bool {
        match self.inflight.recv().await {
            Some((id, tick)) => {
                self.pending.insert(id, tick);
                true
            }
            None => {
                self.writer_done = true;
                false
            }
        }
    }

    /// Everything sent has been answered, and nothing more will be.
    fn settled(&self) -> bool {
        self.writer_done && self.pending.is_empty()
    }

    /// One message that is not a push: if it answers a pending send, settles that send.
    pub fn on_reply(&mut self, reply: &Incoming<'_>, live: &Live) {
        if reply.push.is_some() {
            return;
        }
        self.take_sent();
        let Some(tick) = reply
            .id
            .and_then(|id| u32::try_from(id).ok())
            .and_then(|id| self.pending.remove(&id))
        else {
            return;
        };
        let outcome = match (&reply.error, reply.ok) {
            (Some(err), _) => Err(format!("publish error {}", err.code)),
            (None, ok) => Ok(ok.and_then(|ok| ok.offset)),
        };
        self.spec
            .settle(&mut self.stats, &tick, outcome, true, live);
    }

    /// Ends every send still unanswered as failed with `reason`; the writer can register
    /// no more.
    pub fn abandon(&mut self, reason: &str, live: &Live) {
        self.inflight.close();
        self.take_sent();
        for (_, tick) in self.pending.drain() {
            self.spec
                .settle(&mut self.stats, &tick, Err(reason.into()), true, live);
        }
    }
}

/// Reads a publisher connection's replies until every send is answered (or `drain` after
/// the writer finished, or the socket ends).
async fn ws_acks(
    mut stream: SplitStream<Ws>,
    encoding: Encoding,
    mut acks: Acks,
    live: Arc<Live>,
) -> (PubStats, SplitStream<Ws>) {
    let mut deadline = tokio::time::Instant::now() + Duration::from_secs(86_400 * 365);
    let mut lost_connection = None;
    while !acks.settled() {
        tokio::select! {
            more = acks.next_sent(), if !acks.writer_done => if !more {
                deadline = tokio::time::Instant::now() + acks.spec.drain;
            },
            frame = stream.next() => {
                let frame = match frame {
                    Some(Ok(frame)) => frame,
                    Some(Err(e)) => { lost_connection = Some(format!("publish connection: {e}")); break; }
                    None => { lost_connection = Some("publish connection closed".into()); break; }
                };
                let bytes: &[u8] = match &frame {
                    Message::Binary(b) => b,
                    Message::Text(t) => t.as_bytes(),
                    Message::Close(c) => {
                        let code = c.as_ref().map_or(1005, |c| u16::from(c.code));
                        lost_connection = Some(format!("publish connection closed {code}"));
                        break;
                    }
                    _ => continue,
                };
                for part in wire::split_frame(encoding, bytes) {
                    match part.and_then(|m| wire::decode(encoding, m)) {
                        Ok(reply) => acks.on_reply(&reply, &live),
                        Err(_) => {
                            acks.stats.errors.add("publish reply undecodable", 1);
                            Live::add(&live.errors, 1);
                        }
                    }
                }
            },
            _ = tokio::time::sleep_until(deadline), if acks.writer_done => break,
        }
    }
    if let Some(reason) = lost_connection {
        acks.stats.errors.add(reason, 1);
    }
    // Sends still pending never got an answer.
    acks.abandon("publish no reply", &live);
    (acks.stats, stream)
}
