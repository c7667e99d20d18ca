//! A connection's outbound queue: bounded in bytes, shared by the fan-out
//! (any thread) and the connection actor (its worker thread).
//!
//! Everything a client receives goes through it, replies included, so the
//! order a client sees is the order things were queued (an `unsubscribe`
//! reply is never overtaken by a publication queued before it). The actor
//! drains it as a stream of frames, coalescing what is queued into one frame
//! up to `max_batch_bytes`: under load a client gets fewer, larger frames;
//! when idle each message goes out alone at once.
//!
//! Publications are queued with the subscription they belong to (its token
//! on this connection) and its namespace's slow-consumer policy; the frame is
//! the one shared by every subscriber of the node (a `Bytes` clone, never a
//! copy). That is what conflation needs and all it needs:
//!
//! - `conflate`: a publication whose subscription already has one queued,
//!   not yet written, takes that one's place (same slot, so it is not pushed
//!   back behind what was queued since); the older one is skipped and the
//!   client sees an offset jump.
//! - `auto`: everything is queued while the queue stays under the high mark
//!   (`gateway.auto_conflate_threshold_bytes`); past it the connection
//!   conflates its `auto` subscriptions as above, until the writer drains it
//!   under the low mark (`gateway.auto_conflate_low_water_bytes`).
//! - `disconnect`: never conflated.
//!
//! The bound (`limit` bytes) counts everything queued. When a message would
//! pass it, the queue first drops every conflatable publication that is not
//! its subscription's newest (`auto` ones queued before conflation began); if
//! it still does not fit — non-conflatable messages, or the newest
//! publication of every conflated channel, fill the bound — the queue is
//! dropped and the connection closes with 4004 (slow consumer); the client
//! reconnects and recovers from history. A conflating client therefore never
//! costs more than the bound either.
//!
//! A frame pushed while the connection's output is idle (nothing queued here
//! or in front of the socket) skips the queue: it is written to the socket
//! at once ([`crate::direct`]).

use std::collections::{HashMap, VecDeque};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};

use bytes::{Bytes, BytesMut};
use bytestring::ByteString;
use futures_util::Stream;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use rt_proto::CloseCode;
use rt_shared::config::{GatewayConfig, SlowConsumerPolicy};

use crate::direct::DirectSocket;
use crate::metrics::{DirectionLabel, GatewayMetrics};

/// One encoded message, in the connection's frame type.
#[derive(Debug, Clone)]
pub enum Frame {
    Binary(Bytes),
    Text(ByteString),
}

impl Frame {
    pub fn len(&self) -> usize {
        match self {
            Frame::Binary(b) => b.len(),
            Frame::Text(t) => t.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn is_binary(&self) -> bool {
        matches!(self, Frame::Binary(_))
    }
}

/// What the actor takes off the queue.
#[derive(Debug)]
pub enum Outgoing {
    Frame(Frame),
    /// The server ended subscription `token` of `channel` (it could not keep
    /// it consistent): forget it, then write `frame` (the `unsubscribed` push).
    Lost {
        channel: String,
        token: u64,
        frame: Frame,
    },
    /// Close the socket with this code and reason (after everything queued before it).
    Close(CloseCode, String),
}

/// Result of queueing a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Push {
    /// Queued (for a publication: possibly in the place of an older one of
    /// its channel), or written to the idle socket at once.
    Queued,
    /// This push passed the bound: the queue was dropped and the connection is closing with 4004.
    Overflowed,
    /// The connection is closing or closed; the message was discarded.
    Closed,
}

/// The queue's sizes, from the gateway config.
#[derive(Debug, Clone, Copy)]
pub struct Bounds {
    /// Bytes queued at most.
    pub limit: usize,
    /// Largest coalesced frame.
    pub max_batch: usize,
    /// Past this many queued bytes, `auto` subscriptions conflate.
    pub auto_on: usize,
    /// At or under this many, they deliver everything again.
    pub auto_off: usize,
}

impl Bounds {
    pub fn from_config(config: &GatewayConfig) -> Self {
        let limit = config.outbound_buffer_bytes;
        let auto_on = match config.auto_conflate_threshold_bytes {
            0 => limit / 2,
            n => n,
        };
        let auto_off = match config.auto_conflate_low_water_bytes {
            0 => auto_on / 4,
            n => n,
        };
        Self {
            limit,
            max_batch: config.max_batch_bytes.max(1),
            auto_on,
            auto_off,
        }
    }
}

/// The gateway-wide counters every queue updates.
#[derive(Clone, Default)]
pub struct QueueMetrics {
    /// Bytes queued across all connections.
    pub buffered_bytes: Gauge,
    /// Publications skipped by conflation.
    pub conflated: Counter,
    pub switched_on: Counter,
    pub switched_off: Counter,
    /// Frames written straight to the socket, and their payload bytes (the
    /// actor counts the frames it writes).
    pub messages_out: Counter,
    pub bytes_out: Counter,
}

impl QueueMetrics {
    pub fn new(metrics: &GatewayMetrics) -> Self {
        let switches = |direction| {
            metrics
                .conflation_switches
                .get_or_create(&DirectionLabel { direction })
                .clone()
        };
        Self {
            buffered_bytes: metrics.outbound_bytes.clone(),
            conflated: metrics.conflated.clone(),
            switched_on: switches("on"),
            switched_off: switches("off"),
            messages_out: metrics.messages_out.clone(),
            bytes_out: metrics.bytes_out.clone(),
        }
    }
}

#[derive(Debug)]
enum State {
    Open,
    /// Deliver what is queued, then close.
    Closing(CloseCode, String),
    /// The close was handed to the actor.
    Done,
}

#[derive(Debug)]
enum Item {
    /// A reply or a push that is not a publication: never conflated.
    Message(Frame),
    /// A publication of subscription `sub`.
    Pub {
        sub: u64,
        policy: SlowConsumerPolicy,
        frame: Frame,
    },
    /// The end of a subscription, with its `unsubscribed` push.
    Lost {
        channel: String,
        token: u64,
        frame: Frame,
    },
}

impl Item {
    fn frame(&self) -> &Frame {
        match self {
            Item::Message(frame) | Item::Pub { frame, .. } | Item::Lost { frame, .. } => frame,
        }
    }

    fn len(&self) -> usize {
        self.frame().len()
    }

    /// The subscription of a publication that conflation may skip.
    fn conflatable_sub(&self) -> Option<u64> {
        match self {
            Item::Pub { sub, policy, .. } if *policy != SlowConsumerPolicy::Disconnect => {
                Some(*sub)
            }
            _ => None,
        }
    }
}

#[derive(Debug)]
struct Entry {
    /// Increasing in queue order, so an entry is found by binary search.
    seq: u64,
    item: Item,
}

struct Inner {
    items: VecDeque<Entry>,
    next_seq: u64,
    bytes: usize,
    /// The newest queued publication (its `seq`) of each subscription whose
    /// policy allows conflation.
    newest: HashMap<u64, u64>,
    /// Queued conflatable publications that are not their subscription's newest.
    stale: usize,
    /// An `auto` publication was ever queued here.
    has_auto: bool,
    /// `auto` subscriptions are being conflated.
    auto_conflating: bool,
    state: State,
    waker: Option<Waker>,
    /// The socket, for frames pushed while it is idle (none in unit tests
    /// and once the connection ends).
    socket: Option<DirectSocket>,
}

impl Inner {
    fn position(&self, seq: u64) -> Option<usize> {
        self.items.binary_search_by_key(&seq, |e| e.seq).ok()
    }

    /// Bookkeeping for an entry leaving the queue (written or dropped).
    fn forget(&mut self, entry: &Entry) {
        if let Some(sub) = entry.item.conflatable_sub() {
            if self.newest.get(&sub) == Some(&entry.seq) {
                self.newest.remove(&sub);
            } else {
                self.stale = self.stale.saturating_sub(1);
            }
        }
    }
}

pub struct Outbound {
    inner: Mutex<Inner>,
    bounds: Bounds,
    metrics: QueueMetrics,
}

impl Outbound {
    pub fn new(bounds: Bounds, metrics: QueueMetrics) -> Arc<Self> {
        Arc::new(Self {
            inner: Mutex::new(Inner {
                items: VecDeque::new(),
                next_seq: 0,
                bytes: 0,
                newest: HashMap::new(),
                stale: 0,
                has_auto: false,
                auto_conflating: false,
                state: State::Open,
                waker: None,
                socket: None,
            }),
            bounds: Bounds {
                max_batch: bounds.max_batch.max(1),
                ..bounds
            },
            metrics,
        })
    }

    /// Lets pushes write to the connection's socket while it is idle.
    pub fn attach(&self, socket: DirectSocket) {
        if let Ok(mut inner) = self.inner.lock() {
            inner.socket = Some(socket);
        }
    }

    /// The pump wrote everything and the actor has nothing more: frames
    /// pushed from now on may go straight to the socket.
    pub fn writer_idle(&self) {
        if let Ok(mut inner) = self.inner.lock()
            && inner.items.is_empty()
            && matches!(inner.state, State::Open)
            && let Some(socket) = inner.socket.as_mut()
        {
            socket.set_idle();
        }
    }

    /// The pump is about to run: frames are queued until it is idle again.
    /// Returns what the socket did not take of a direct write; the pump
    /// writes it before anything else.
    pub fn writer_busy(&self) -> Option<Bytes> {
        self.inner
            .lock()
            .ok()
            .and_then(|mut inner| inner.socket.as_mut().and_then(DirectSocket::set_busy))
    }

    /// Writes `frame` to the socket if it is idle and nothing is queued.
    fn write_now(&self, inner: &mut Inner, frame: &Frame) -> bool {
        if !inner.items.is_empty() {
            return false;
        }
        let Some(socket) = inner.socket.as_mut() else {
            return false;
        };
        if !socket.write(frame) {
            return false;
        }
        self.metrics.messages_out.inc();
        self.metrics.bytes_out.inc_by(frame.len() as u64);
        if !socket.is_idle() {
            // A rest waits for the pump.
            wake(inner);
        }
        true
    }

    /// Queues a reply or a push that is not a publication (never conflated).
    pub fn push(&self, frame: Frame) -> Push {
        self.enqueue(Item::Message(frame))
    }

    /// Queues the `unsubscribed` push that ends subscription `token` of
    /// `channel`; the actor forgets the subscription when it writes it.
    pub fn push_lost(&self, channel: &str, token: u64, frame: Frame) -> Push {
        self.enqueue(Item::Lost {
            channel: channel.to_owned(),
            token,
            frame,
        })
    }

    /// Queues a publication of subscription `sub` (the subscription's token
    /// on this connection), conflating by `policy`.
    pub fn push_pub(&self, sub: u64, policy: SlowConsumerPolicy, frame: Frame) -> Push {
        self.push_pubs(sub, policy, std::iter::once(frame))
    }

    /// Queues consecutive publications of subscription `sub`, in order, as
    /// [`Outbound::push_pub`] does each, under one lock and with one wake-up
    /// (the fan-out thread and the connection's thread share this lock: each
    /// acquisition moves it between cores).
    pub fn push_pubs(
        &self,
        sub: u64,
        policy: SlowConsumerPolicy,
        frames: impl IntoIterator<Item = Frame>,
    ) -> Push {
        let Ok(mut inner) = self.inner.lock() else {
            return Push::Closed;
        };
        if !matches!(inner.state, State::Open) {
            return Push::Closed;
        }
        if policy == SlowConsumerPolicy::Auto {
            inner.has_auto = true;
        }
        let mut frames = frames.into_iter().peekable();
        // One frame to an idle socket goes at once; a run is queued, so the
        // actor coalesces it into one frame (one write).
        if inner.socket.as_ref().is_some_and(DirectSocket::is_idle)
            && let Some(first) = frames.next()
        {
            if frames.peek().is_none() && self.write_now(&mut inner, &first) {
                return Push::Queued;
            }
            return self.queue_pubs(inner, sub, policy, std::iter::once(first).chain(frames));
        }
        self.queue_pubs(inner, sub, policy, frames)
    }

    fn queue_pubs(
        &self,
        mut inner: std::sync::MutexGuard<'_, Inner>,
        sub: u64,
        policy: SlowConsumerPolicy,
        frames: impl Iterator<Item = Frame>,
    ) -> Push {
        // Bytes added to the gateway-wide gauge once, at the end (or before
        // an overflow discards the queue).
        let mut added: i64 = 0;
        for frame in frames {
            let len = frame.len();
            self.note_growth(&mut inner, len);
            let conflate = match policy {
                SlowConsumerPolicy::Disconnect => false,
                SlowConsumerPolicy::Conflate => true,
                SlowConsumerPolicy::Auto => inner.auto_conflating,
            };
            let target = if conflate {
                inner.newest.get(&sub).copied()
            } else {
                None
            };
            let freed = target
                .and_then(|seq| inner.position(seq))
                .map_or(0, |i| inner.items[i].item.len());
            if !self.make_room(&mut inner, len, freed) {
                self.metrics.buffered_bytes.inc_by(added);
                return self.overflow(&mut inner);
            }
            // A compaction keeps each subscription's newest: the target is still there.
            match target.and_then(|seq| inner.position(seq)) {
                Some(index) => {
                    let entry = &mut inner.items[index];
                    entry.item = Item::Pub { sub, policy, frame };
                    inner.bytes = inner.bytes - freed + len;
                    added += as_i64(len) - as_i64(freed);
                    self.metrics.conflated.inc();
                }
                None => {
                    let seq = self.append_uncounted(&mut inner, Item::Pub { sub, policy, frame });
                    added += as_i64(len);
                    if policy != SlowConsumerPolicy::Disconnect
                        && inner.newest.insert(sub, seq).is_some()
                    {
                        inner.stale += 1;
                    }
                }
            }
        }
        self.metrics.buffered_bytes.inc_by(added);
        wake(&mut inner);
        Push::Queued
    }

    fn enqueue(&self, item: Item) -> Push {
        let Ok(mut inner) = self.inner.lock() else {
            return Push::Closed;
        };
        if !matches!(inner.state, State::Open) {
            return Push::Closed;
        }
        if let Item::Message(frame) = &item
            && self.write_now(&mut inner, frame)
        {
            return Push::Queued;
        }
        let len = item.len();
        self.note_growth(&mut inner, len);
        if !self.make_room(&mut inner, len, 0) {
            return self.overflow(&mut inner);
        }
        self.append(&mut inner, item);
        wake(&mut inner);
        Push::Queued
    }

    fn append(&self, inner: &mut Inner, item: Item) -> u64 {
        self.metrics.buffered_bytes.inc_by(as_i64(item.len()));
        self.append_uncounted(inner, item)
    }

    /// Appends without updating the gauge (the caller does).
    fn append_uncounted(&self, inner: &mut Inner, item: Item) -> u64 {
        let seq = inner.next_seq;
        inner.next_seq += 1;
        inner.bytes += item.len();
        inner.items.push_back(Entry { seq, item });
        seq
    }

    /// Switches `auto` conflation on when the queue is about to pass the high mark.
    fn note_growth(&self, inner: &mut Inner, len: usize) {
        if inner.has_auto && !inner.auto_conflating && inner.bytes + len > self.bounds.auto_on {
            inner.auto_conflating = true;
            self.metrics.switched_on.inc();
        }
    }

    /// Whether `len` more bytes fit once `freed` are released, after
    /// dropping what conflation may drop if they do not.
    fn make_room(&self, inner: &mut Inner, len: usize, freed: usize) -> bool {
        let fits = |inner: &Inner| inner.bytes - freed + len <= self.bounds.limit;
        if fits(inner) {
            return true;
        }
        self.compact(inner);
        fits(inner)
    }

    /// Drops every conflatable publication that is not its subscription's newest.
    fn compact(&self, inner: &mut Inner) {
        if inner.stale == 0 {
            return;
        }
        let Inner {
            items,
            newest,
            bytes,
            stale,
            ..
        } = inner;
        let mut dropped = 0u64;
        let mut dropped_bytes = 0usize;
        items.retain(|entry| match entry.item.conflatable_sub() {
            Some(sub) if newest.get(&sub) != Some(&entry.seq) => {
                dropped += 1;
                dropped_bytes += entry.item.len();
                false
            }
            _ => true,
        });
        *bytes -= dropped_bytes;
        *stale = 0;
        self.metrics.buffered_bytes.dec_by(as_i64(dropped_bytes));
        self.metrics.conflated.inc_by(dropped);
    }

    fn overflow(&self, inner: &mut Inner) -> Push {
        self.discard(inner);
        inner.state = State::Closing(CloseCode::SLOW_CONSUMER, "slow consumer".into());
        wake(inner);
        Push::Overflowed
    }

    /// Drops what is queued and closes with `code` at once (a bound was hit).
    pub fn fail(&self, code: CloseCode, reason: &str) {
        if let Ok(mut inner) = self.inner.lock()
            && matches!(inner.state, State::Open)
        {
            self.discard(&mut inner);
            inner.state = State::Closing(code, reason.to_owned());
            wake(&mut inner);
        }
    }

    /// Delivers what is queued, then closes with `code`. The first close wins.
    pub fn close_after_drain(&self, code: CloseCode, reason: &str) {
        if let Ok(mut inner) = self.inner.lock()
            && matches!(inner.state, State::Open)
        {
            inner.state = State::Closing(code, reason.to_owned());
            wake(&mut inner);
        }
    }

    /// Drops everything queued and stops accepting (the actor is stopping);
    /// lets go of the socket.
    pub fn shut(&self) {
        if let Ok(mut inner) = self.inner.lock() {
            self.discard(&mut inner);
            inner.state = State::Done;
            inner.waker = None;
            inner.socket = None;
        }
    }

    /// Bytes queued now.
    pub fn queued_bytes(&self) -> usize {
        self.inner.lock().map_or(0, |i| i.bytes)
    }

    fn discard(&self, inner: &mut Inner) {
        self.metrics.buffered_bytes.dec_by(as_i64(inner.bytes));
        inner.items.clear();
        inner.newest.clear();
        inner.stale = 0;
        inner.bytes = 0;
    }

    fn poll_next_outgoing(&self, cx: &mut Context<'_>) -> Poll<Option<Outgoing>> {
        let Ok(mut inner) = self.inner.lock() else {
            return Poll::Ready(None);
        };
        if let Some(first) = inner.items.pop_front() {
            inner.forget(&first);
            let taken = first.item.len();
            let (outgoing, taken) = match first.item {
                Item::Lost {
                    channel,
                    token,
                    frame,
                } => (
                    Outgoing::Lost {
                        channel,
                        token,
                        frame,
                    },
                    taken,
                ),
                Item::Message(frame) | Item::Pub { frame, .. } => {
                    let mut taken = taken;
                    let frame = self.coalesce(&mut inner, frame, &mut taken);
                    (Outgoing::Frame(frame), taken)
                }
            };
            inner.bytes -= taken;
            self.metrics.buffered_bytes.dec_by(as_i64(taken));
            if inner.auto_conflating && inner.bytes <= self.bounds.auto_off {
                inner.auto_conflating = false;
                self.metrics.switched_off.inc();
            }
            return Poll::Ready(Some(outgoing));
        }
        match std::mem::replace(&mut inner.state, State::Done) {
            State::Open => {
                inner.state = State::Open;
                inner.waker = Some(cx.waker().clone());
                Poll::Pending
            }
            State::Closing(code, reason) => Poll::Ready(Some(Outgoing::Close(code, reason))),
            State::Done => Poll::Ready(None),
        }
    }

    /// Joins the queued messages that follow `first` into one frame
    /// (MessagePack back to back, JSON one per line), up to `max_batch`
    /// bytes; an `unsubscribed` that ends a subscription goes alone.
    fn coalesce(&self, inner: &mut Inner, first: Frame, taken: &mut usize) -> Frame {
        let binary = first.is_binary();
        let joinable = |inner: &Inner, taken: usize| {
            inner.items.front().is_some_and(|next| {
                !matches!(next.item, Item::Lost { .. })
                    && next.item.frame().is_binary() == binary
                    && taken + next.item.len() <= self.bounds.max_batch
            })
        };
        if !joinable(inner, *taken) {
            return first;
        }
        match first {
            Frame::Binary(first) => {
                let mut buf = BytesMut::with_capacity(self.bounds.max_batch);
                buf.extend_from_slice(&first);
                while joinable(inner, *taken) {
                    let Some(next) = inner.items.pop_front() else {
                        break;
                    };
                    inner.forget(&next);
                    *taken += next.item.len();
                    if let Frame::Binary(bytes) = next.item.frame() {
                        buf.extend_from_slice(bytes);
                    }
                }
                Frame::Binary(buf.freeze())
            }
            Frame::Text(first) => {
                let mut text = String::with_capacity(self.bounds.max_batch);
                text.push_str(&first);
                while joinable(inner, *taken) {
                    let Some(next) = inner.items.pop_front() else {
                        break;
                    };
                    inner.forget(&next);
                    *taken += next.item.len();
                    if let Frame::Text(line) = next.item.frame() {
                        text.push('\n');
                        text.push_str(line);
                    }
                }
                Frame::Text(ByteString::from(text))
            }
        }
    }
}

fn wake(inner: &mut Inner) {
    if let Some(waker) = inner.waker.take() {
        waker.wake();
    }
}

fn as_i64(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// The actor's view of its queue.
pub struct OutboundStream(pub Arc<Outbound>);

impl Stream for OutboundStream {
    type Item = Outgoing;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Outgoing>> {
        self.0.poll_next_outgoing(cx)
    }
}

/// A queue of 1 MiB that writes one message per frame, for other modules' tests.
#[cfg(test)]
pub(crate) fn test_queue() -> Arc<Outbound> {
    Outbound::new(
        Bounds {
            limit: 1 << 20,
            max_batch: 1,
            auto_on: 1 << 19,
            auto_off: 1 << 17,
        },
        QueueMetrics::default(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use SlowConsumerPolicy::{Auto, Conflate, Disconnect};
    use futures_util::StreamExt as _;
    use tokio::io::AsyncReadExt as _;
    use tokio::net::TcpStream;
    use tokio::net::tcp::OwnedWriteHalf;

    fn bounds(limit: usize, max_batch: usize) -> Bounds {
        Bounds {
            limit,
            max_batch,
            auto_on: limit / 2,
            auto_off: limit / 8,
        }
    }

    fn queue(limit: usize, batch: usize) -> Arc<Outbound> {
        Outbound::new(bounds(limit, batch), QueueMetrics::default())
    }

    fn bin(n: usize) -> Frame {
        tagged(7, n)
    }

    /// A frame of `n` bytes, all `tag`, to tell frames apart once written.
    fn tagged(tag: u8, n: usize) -> Frame {
        Frame::Binary(Bytes::from(vec![tag; n]))
    }

    /// Everything queued, one frame each (the tests use `max_batch` 1), as (tag, len).
    fn drain(q: &Arc<Outbound>) -> Vec<(u8, usize)> {
        let mut out = Vec::new();
        while q.queued_bytes() > 0 {
            match OutboundStream(q.clone()).next().now_or_never_ready() {
                Some(Outgoing::Frame(Frame::Binary(b))) => out.push((b[0], b.len())),
                other => panic!("unexpected {other:?}"),
            }
        }
        out
    }

    /// A queue attached to a real socket: the server's write half, the client's stream.
    async fn attached(limit: usize) -> (Arc<Outbound>, std::sync::Weak<OwnedWriteHalf>, TcpStream) {
        let (writer, client) = crate::direct::socket_pair().await;
        let q = queue(limit, 1);
        q.attach(DirectSocket::new(writer.clone()));
        (q, Arc::downgrade(&writer), client)
    }

    #[actix_rt::test]
    async fn an_idle_quiet_socket_is_written_at_once_and_everything_else_is_queued() {
        let (q, writer, mut client) = attached(1 << 20).await;
        assert_eq!(q.push_pub(1, Disconnect, tagged(1, 3)), Push::Queued);
        assert_eq!(q.queued_bytes(), 3, "queued until the pump says idle");
        assert_eq!(drain(&q), vec![(1, 3)]);

        q.writer_idle();
        assert_eq!(q.push_pub(1, Disconnect, tagged(2, 3)), Push::Queued);
        assert_eq!(q.queued_bytes(), 0, "written, not queued");
        let mut got = [0u8; 5];
        client.read_exact(&mut got).await.expect("read");
        assert_eq!(got, [0x82, 3, 2, 2, 2]);

        tokio::time::sleep(crate::direct::HOT).await;
        assert!(q.writer_busy().is_none());
        q.writer_idle();
        // A run is coalesced by the actor, not written frame by frame.
        q.push_pubs(1, Disconnect, [tagged(3, 1), tagged(4, 1)]);
        assert_eq!(drain(&q), vec![(3, 1), (4, 1)]);

        // Nothing overtakes what is queued.
        q.writer_idle();
        q.push(tagged(5, 1));
        assert_eq!(q.queued_bytes(), 0);
        tokio::time::sleep(crate::direct::HOT).await;
        q.push_lost("chat:a", 1, tagged(6, 1));
        q.push(tagged(7, 1));
        assert_eq!(q.queued_bytes(), 2, "behind the queued unsubscribed push");

        q.shut();
        assert!(writer.upgrade().is_none(), "the queue let go of the socket");
    }

    #[actix_rt::test]
    async fn a_closing_queue_writes_nothing_directly() {
        let (q, _writer, _client) = attached(1 << 20).await;
        q.writer_idle();
        q.close_after_drain(CloseCode::DRAINING, "draining");
        assert_eq!(q.push(tagged(1, 1)), Push::Closed);
        q.writer_idle();
        assert!(q.writer_busy().is_none());
    }

    #[actix_rt::test]
    async fn coalesces_up_to_the_batch_size() {
        let q = queue(1000, 10);
        for _ in 0..5 {
            assert_eq!(q.push(bin(4)), Push::Queued);
        }
        let mut stream = OutboundStream(q.clone());
        let sizes: Vec<usize> = (0..3)
            .map(|_| match stream.next().now_or_never_ready() {
                Some(Outgoing::Frame(f)) => f.len(),
                other => panic!("unexpected {other:?}"),
            })
            .collect();
        assert_eq!(sizes, vec![8, 8, 4]);
        assert_eq!(q.queued_bytes(), 0);
    }

    #[actix_rt::test]
    async fn json_batches_are_lines() {
        let q = queue(1000, 100);
        q.push(Frame::Text(ByteString::from_static("{\"a\":1}")));
        q.push_pub(
            1,
            Conflate,
            Frame::Text(ByteString::from_static("{\"b\":2}")),
        );
        let mut stream = OutboundStream(q);
        match stream.next().now_or_never_ready() {
            Some(Outgoing::Frame(Frame::Text(t))) => assert_eq!(&*t, "{\"a\":1}\n{\"b\":2}"),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[actix_rt::test]
    async fn overflow_drops_the_queue_and_closes_with_4004() {
        let metrics = QueueMetrics::default();
        let q = Outbound::new(bounds(10, 10), metrics.clone());
        assert_eq!(q.push(bin(6)), Push::Queued);
        assert_eq!(metrics.buffered_bytes.get(), 6);
        assert_eq!(q.push_pub(1, Disconnect, bin(6)), Push::Overflowed);
        assert_eq!(q.push(bin(1)), Push::Closed);
        assert_eq!(
            metrics.buffered_bytes.get(),
            0,
            "dropped bytes are released"
        );
        let mut stream = OutboundStream(q);
        match stream.next().now_or_never_ready() {
            Some(Outgoing::Close(code, _)) => assert_eq!(code, CloseCode::SLOW_CONSUMER),
            other => panic!("unexpected {other:?}"),
        }
        assert!(stream.next().now_or_never_ready().is_none());
    }

    #[actix_rt::test]
    async fn close_after_drain_delivers_first() {
        let q = queue(100, 1);
        q.push(bin(1));
        q.close_after_drain(CloseCode::DRAINING, "draining");
        let mut stream = OutboundStream(q);
        assert!(matches!(
            stream.next().now_or_never_ready(),
            Some(Outgoing::Frame(_))
        ));
        assert!(matches!(
            stream.next().now_or_never_ready(),
            Some(Outgoing::Close(CloseCode::DRAINING, _))
        ));
    }

    #[actix_rt::test]
    async fn a_run_of_publications_is_queued_as_each_would_be() {
        let metrics = QueueMetrics::default();
        let q = Outbound::new(bounds(1000, 1), metrics.clone());
        // Delivered in order, counted once each.
        let run = [tagged(1, 10), tagged(2, 11), tagged(3, 12)];
        assert_eq!(q.push_pubs(1, Disconnect, run), Push::Queued);
        assert_eq!(metrics.buffered_bytes.get(), 33);
        // A conflating subscription keeps only the newest of its run.
        let run = [tagged(4, 5), tagged(5, 6), tagged(6, 7)];
        assert_eq!(q.push_pubs(2, Conflate, run), Push::Queued);
        assert_eq!(metrics.conflated.get(), 2);
        assert_eq!(metrics.buffered_bytes.get(), 33 + 7);
        assert_eq!(drain(&q), vec![(1, 10), (2, 11), (3, 12), (6, 7)]);
        assert_eq!(metrics.buffered_bytes.get(), 0);
    }

    #[actix_rt::test]
    async fn a_run_that_passes_the_bound_closes_with_4004_and_leaves_the_gauge_right() {
        let metrics = QueueMetrics::default();
        let q = Outbound::new(bounds(100, 1), metrics.clone());
        q.push(tagged(9, 20));
        let run = [tagged(1, 40), tagged(2, 40), tagged(3, 40)];
        assert_eq!(q.push_pubs(1, Disconnect, run), Push::Overflowed);
        assert_eq!(
            metrics.buffered_bytes.get(),
            0,
            "the dropped queue is no longer counted"
        );
        assert_eq!(q.queued_bytes(), 0);
        assert!(matches!(
            OutboundStream(q.clone()).next().now_or_never_ready(),
            Some(Outgoing::Close(code, _)) if code == CloseCode::SLOW_CONSUMER
        ));
        assert_eq!(q.push_pubs(1, Disconnect, [tagged(4, 1)]), Push::Closed);
    }

    #[actix_rt::test]
    async fn conflation_replaces_the_queued_publication_in_its_place() {
        let metrics = QueueMetrics::default();
        let q = Outbound::new(bounds(1000, 1), metrics.clone());
        q.push_pub(1, Conflate, tagged(1, 10));
        q.push_pub(2, Conflate, tagged(2, 10));
        q.push(tagged(9, 5));
        q.push_pub(1, Conflate, tagged(3, 12));
        q.push_pub(1, Conflate, tagged(4, 8));
        assert_eq!(metrics.conflated.get(), 2);
        assert_eq!(q.queued_bytes(), 8 + 10 + 5);
        assert_eq!(metrics.buffered_bytes.get(), 23);
        // Subscription 1's newest took its older one's slot, ahead of the reply.
        assert_eq!(drain(&q), vec![(4, 8), (2, 10), (9, 5)]);
        // Written: the next one of subscription 1 is queued, not conflated.
        q.push_pub(1, Conflate, tagged(5, 1));
        q.push_pub(2, Disconnect, tagged(6, 1));
        q.push_pub(2, Disconnect, tagged(7, 1));
        assert_eq!(drain(&q), vec![(5, 1), (6, 1), (7, 1)]);
        assert_eq!(metrics.conflated.get(), 2);
        assert_eq!(metrics.buffered_bytes.get(), 0);
    }

    #[actix_rt::test]
    async fn a_conflating_client_stays_under_its_bound_and_open() {
        let metrics = QueueMetrics::default();
        let q = Outbound::new(bounds(100, 1), metrics.clone());
        for round in 0..1_000u32 {
            for sub in 0..4u64 {
                let len = 5 + usize::try_from(round % 20).unwrap_or(0);
                assert_eq!(
                    q.push_pub(sub, Conflate, tagged(sub as u8, len)),
                    Push::Queued
                );
                assert!(q.queued_bytes() <= 100);
                assert!(metrics.buffered_bytes.get() <= 100);
            }
        }
        assert_eq!(metrics.conflated.get(), 4 * 999);
        let written = drain(&q);
        assert_eq!(written.len(), 4, "one publication per channel: {written:?}");
    }

    #[actix_rt::test]
    async fn replies_that_do_not_fit_next_to_conflated_channels_close_with_4004() {
        let q = queue(100, 1);
        for sub in 0..3 {
            q.push_pub(sub, Conflate, bin(20));
        }
        assert_eq!(q.push(bin(30)), Push::Queued);
        assert_eq!(q.push(bin(20)), Push::Overflowed);
        assert_eq!(q.queued_bytes(), 0);
    }

    #[actix_rt::test]
    async fn a_new_channel_that_does_not_fit_closes_with_4004() {
        let q = queue(100, 1);
        for sub in 0..4 {
            q.push_pub(sub, Conflate, bin(25));
        }
        // Every queued publication is its channel's newest: nothing to skip.
        assert_eq!(q.push_pub(9, Conflate, bin(1)), Push::Overflowed);
    }

    #[actix_rt::test]
    async fn a_disconnect_publication_first_makes_auto_ones_conflate() {
        let metrics = QueueMetrics::default();
        let q = Outbound::new(
            Bounds {
                limit: 100,
                max_batch: 1,
                auto_on: 90,
                auto_off: 10,
            },
            metrics.clone(),
        );
        // Under the high mark: every auto publication is kept.
        for tag in 1..=8 {
            q.push_pub(1, Auto, tagged(tag, 10));
        }
        assert_eq!(metrics.conflated.get(), 0);
        // A disconnect-policy one that does not fit: the auto channel is
        // cut to its newest first, and it fits.
        assert_eq!(q.push_pub(2, Disconnect, tagged(20, 25)), Push::Queued);
        assert_eq!(metrics.switched_on.get(), 1);
        assert_eq!(metrics.conflated.get(), 7);
        assert_eq!(q.queued_bytes(), 35);
        assert_eq!(drain(&q), vec![(8, 10), (20, 25)]);
        assert_eq!(metrics.switched_off.get(), 1);
        // Disconnect-policy publications are never skipped: past the bound, 4004.
        for _ in 0..4 {
            q.push_pub(2, Disconnect, bin(25));
        }
        assert_eq!(q.push_pub(2, Disconnect, bin(1)), Push::Overflowed);
    }

    #[actix_rt::test]
    async fn auto_delivers_everything_until_the_high_mark_then_conflates_until_drained() {
        let metrics = QueueMetrics::default();
        let q = Outbound::new(
            Bounds {
                limit: 1000,
                max_batch: 1,
                auto_on: 50,
                auto_off: 20,
            },
            metrics.clone(),
        );
        for tag in 1..=5 {
            q.push_pub(1, Auto, tagged(tag, 10));
        }
        assert_eq!(metrics.switched_on.get(), 0);
        // 50 queued: the next passes the high mark and conflation starts.
        q.push_pub(1, Auto, tagged(6, 10));
        assert_eq!(metrics.switched_on.get(), 1);
        assert_eq!(metrics.conflated.get(), 1, "6 took 5's place");
        q.push_pub(1, Auto, tagged(7, 10));
        q.push_pub(2, Auto, tagged(30, 10));
        q.push_pub(2, Auto, tagged(31, 10));
        assert_eq!(metrics.conflated.get(), 3);
        assert_eq!(q.queued_bytes(), 60);
        // Drain to the low mark: conflation stops.
        let mut stream = OutboundStream(q.clone());
        for _ in 0..4 {
            assert!(matches!(
                stream.next().now_or_never_ready(),
                Some(Outgoing::Frame(_))
            ));
        }
        assert_eq!(q.queued_bytes(), 20);
        assert_eq!(metrics.switched_off.get(), 1);
        q.push_pub(2, Auto, tagged(32, 10));
        q.push_pub(2, Auto, tagged(33, 10));
        assert_eq!(metrics.conflated.get(), 3);
        assert_eq!(drain(&q), vec![(7, 10), (31, 10), (32, 10), (33, 10)]);
    }

    #[actix_rt::test]
    async fn a_lost_subscription_goes_alone_after_what_preceded_it() {
        let q = queue(1000, 1000);
        q.push_pub(1, Conflate, bin(3));
        q.push_lost("chat:a", 1, bin(4));
        q.push(bin(5));
        // The subscription's queued publication is written before it.
        let mut stream = OutboundStream(q.clone());
        assert!(matches!(
            stream.next().now_or_never_ready(),
            Some(Outgoing::Frame(f)) if f.len() == 3
        ));
        match stream.next().now_or_never_ready() {
            Some(Outgoing::Lost {
                channel,
                token,
                frame,
            }) => {
                assert_eq!((channel.as_str(), token, frame.len()), ("chat:a", 1, 4));
            }
            other => panic!("unexpected {other:?}"),
        }
        assert!(matches!(
            stream.next().now_or_never_ready(),
            Some(Outgoing::Frame(f)) if f.len() == 5
        ));
    }

    trait NowOrNever: std::future::Future + Sized {
        /// Polls once; these tests only poll ready queues.
        fn now_or_never_ready(self) -> Self::Output {
            let waker = Waker::noop();
            let mut cx = Context::from_waker(waker);
            let mut fut = std::pin::pin!(self);
            match fut.as_mut().poll(&mut cx) {
                Poll::Ready(v) => v,
                Poll::Pending => panic!("the queue was expected to be ready"),
            }
        }
    }

    impl<F: std::future::Future> NowOrNever for F {}
}
