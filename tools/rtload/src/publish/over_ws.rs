//! Publishing with the WebSocket `publish` op: a writer that stamps and sends, and a
//! reader that matches replies to sends by id.

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
use crate::wire::{self, Encoding, Publish, Stamp, next_id};

pub(super) async fn ws_worker(
    ws: Ws,
    encoding: Encoding,
    queue: Queue,
    spec: Arc<PublishSpec>,
    live: Arc<Live>,
) -> PubStats {
    let (mut sink, stream) = ws.split();
    let (inflight_tx, inflight_rx) = mpsc::unbounded_channel();
    let acks = tokio::spawn(ws_acks(
        stream,
        encoding,
        inflight_rx,
        spec.clone(),
        live.clone(),
    ));
    let mut stats = PubStats::new();
    let mut id = 1u32; // 1 was the `connect`
    let mut broken = false;
    while let Some(batch) = next_batch(&queue, 256).await {
        let mut written = 0;
        for tick in batch {
            if broken {
                let channel = spec.channel_of(tick.seq).0;
                stats.on_ack(
                    &tick,
                    channel,
                    Err("publish connection lost".into()),
                    &spec.window,
                );
                Live::add(&live.publish_failed, 1);
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
                    let channel = spec.channel_of(tick.seq).0;
                    stats.on_ack(
                        &tick,
                        channel,
                        Err(format!("publish encode: {e}")),
                        &spec.window,
                    );
                    continue;
                }
            };
            stats.on_write(&tick, Instant::now(), &spec.window);
            written += 1;
            // The ack reader must know the id before the reply can arrive. If the write
            // fails, the reply never comes and the reader counts the send as failed.
            let _ = inflight_tx.send((id, tick));
            broken = sink.feed(message).await.is_err();
        }
        Live::add(&live.sent, written);
        broken = broken || sink.flush().await.is_err();
        if broken {
            // Stop taking sends: other workers (if any) carry on; with none left, the
            // pacer sees the queue close and the run ends early.
            break;
        }
    }
    drop(inflight_tx);
    match acks.await {
        Ok((ack_stats, stream)) => {
            stats.merge(ack_stats);
            close_quietly(sink, stream).await;
        }
        Err(e) => stats.errors.add(format!("publish ack task failed: {e}"), 1),
    }
    stats
}

async fn close_quietly(sink: SplitSink<Ws, Message>, stream: SplitStream<Ws>) {
    if let Ok(mut ws) = sink.reunite(stream) {
        let _ = tokio::time::timeout(Duration::from_secs(1), ws.close(None)).await;
    }
}

/// Reads the publisher connection's replies and matches them to sends by id.
async fn ws_acks(
    mut stream: SplitStream<Ws>,
    encoding: Encoding,
    mut inflight: mpsc::UnboundedReceiver<(u32, Tick)>,
    spec: Arc<PublishSpec>,
    live: Arc<Live>,
) -> (PubStats, SplitStream<Ws>) {
    let mut stats = PubStats::new();
    let mut pending: HashMap<u32, Tick> = HashMap::new();
    let mut writer_done = false;
    let mut deadline = tokio::time::Instant::now() + Duration::from_secs(86_400 * 365);
    let mut lost_connection = None;
    loop {
        if writer_done && pending.is_empty() {
            break;
        }
        tokio::select! {
            item = inflight.recv(), if !writer_done => match item {
                Some((id, tick)) => { pending.insert(id, tick); }
                None => {
                    writer_done = true;
                    deadline = tokio::time::Instant::now() + spec.drain;
                }
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
                while let Ok((id, tick)) = inflight.try_recv() {
                    pending.insert(id, tick);
                }
                for part in wire::split_frame(encoding, bytes) {
                    let Ok(reply) = part.and_then(|m| wire::decode(encoding, m)) else {
                        stats.errors.add("publish reply undecodable", 1);
                        Live::add(&live.errors, 1);
                        continue;
                    };
                    let Some(tick) = reply.id.and_then(|id| u32::try_from(id).ok()).and_then(|id| pending.remove(&id)) else {
                        continue;
                    };
                    let outcome = match (&reply.error, reply.ok) {
                        (Some(err), _) => Err(format!("publish error {}", err.code)),
                        (None, ok) => Ok(ok.and_then(|ok| ok.offset)),
                    };
                    if outcome.is_err() {
                        Live::add(&live.publish_failed, 1);
                    }
                    stats.on_ack(&tick, spec.channel_of(tick.seq).0, outcome, &spec.window);
                }
            },
            _ = tokio::time::sleep_until(deadline), if writer_done => break,
        }
    }
    if let Some(reason) = lost_connection {
        stats.errors.add(reason, 1);
    }
    // Sends still pending never got an answer.
    while let Ok((id, tick)) = inflight.try_recv() {
        pending.insert(id, tick);
    }
    Live::add(&live.publish_failed, pending.len() as u64);
    for tick in pending.into_values() {
        let channel = spec.channel_of(tick.seq).0;
        stats.on_ack(&tick, channel, Err("publish no reply".into()), &spec.window);
    }
    (stats, stream)
}
