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
//! The bound's policy: when a push would pass `limit` bytes, the queue is
//! dropped and the connection closes with 4004 (slow consumer); the client
//! reconnects and recovers from history.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};

use bytes::{Bytes, BytesMut};
use bytestring::ByteString;
use futures_util::Stream;
use prometheus_client::metrics::gauge::Gauge;
use rt_proto::CloseCode;

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
}

/// What the actor takes off the queue.
#[derive(Debug)]
pub enum Outgoing {
    Frame(Frame),
    /// Close the socket with this code and reason (after everything queued before it).
    Close(CloseCode, String),
}

/// Result of queueing a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Push {
    Queued,
    /// This push passed the bound: the queue was dropped and the connection is closing with 4004.
    Overflowed,
    /// The connection is closing or closed; the message was discarded.
    Closed,
}

#[derive(Debug)]
enum State {
    Open,
    /// Deliver what is queued, then close.
    Closing(CloseCode, String),
    /// The close was handed to the actor.
    Done,
}

struct Inner {
    frames: VecDeque<Frame>,
    bytes: usize,
    state: State,
    waker: Option<Waker>,
}

pub struct Outbound {
    inner: Mutex<Inner>,
    limit: usize,
    max_batch: usize,
    /// Gateway-wide queued bytes.
    total_bytes: Gauge,
}

impl Outbound {
    pub fn new(limit: usize, max_batch: usize, total_bytes: Gauge) -> Arc<Self> {
        Arc::new(Self {
            inner: Mutex::new(Inner {
                frames: VecDeque::new(),
                bytes: 0,
                state: State::Open,
                waker: None,
            }),
            limit,
            max_batch: max_batch.max(1),
            total_bytes,
        })
    }

    /// Queues a message, enforcing the byte bound.
    pub fn push(&self, frame: Frame) -> Push {
        let Ok(mut inner) = self.inner.lock() else {
            return Push::Closed;
        };
        if !matches!(inner.state, State::Open) {
            return Push::Closed;
        }
        let len = frame.len();
        if inner.bytes + len > self.limit {
            self.discard(&mut inner);
            inner.state = State::Closing(CloseCode::SLOW_CONSUMER, "slow consumer".into());
            wake(&mut inner);
            return Push::Overflowed;
        }
        inner.bytes += len;
        inner.frames.push_back(frame);
        self.total_bytes.inc_by(as_i64(len));
        wake(&mut inner);
        Push::Queued
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

    /// Drops everything queued and stops accepting (the actor is stopping).
    pub fn shut(&self) {
        if let Ok(mut inner) = self.inner.lock() {
            self.discard(&mut inner);
            inner.state = State::Done;
            inner.waker = None;
        }
    }

    /// Bytes queued now.
    pub fn queued_bytes(&self) -> usize {
        self.inner.lock().map_or(0, |i| i.bytes)
    }

    fn discard(&self, inner: &mut Inner) {
        self.total_bytes.dec_by(as_i64(inner.bytes));
        inner.frames.clear();
        inner.bytes = 0;
    }

    fn poll_next_outgoing(&self, cx: &mut Context<'_>) -> Poll<Option<Outgoing>> {
        let Ok(mut inner) = self.inner.lock() else {
            return Poll::Ready(None);
        };
        if let Some(first) = inner.frames.pop_front() {
            let mut taken = first.len();
            let frame = if inner
                .frames
                .front()
                .is_some_and(|next| taken + next.len() <= self.max_batch)
            {
                self.coalesce(&mut inner, first, &mut taken)
            } else {
                first
            };
            inner.bytes -= taken;
            self.total_bytes.dec_by(as_i64(taken));
            return Poll::Ready(Some(Outgoing::Frame(frame)));
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

    /// Joins queued messages into one frame (MessagePack back to back, JSON
    /// one per line), up to `max_batch` bytes.
    fn coalesce(&self, inner: &mut Inner, first: Frame, taken: &mut usize) -> Frame {
        match first {
            Frame::Binary(first) => {
                let mut buf = BytesMut::with_capacity(self.max_batch);
                buf.extend_from_slice(&first);
                while let Some(Frame::Binary(next)) = inner.frames.front() {
                    if *taken + next.len() > self.max_batch {
                        break;
                    }
                    *taken += next.len();
                    buf.extend_from_slice(next);
                    inner.frames.pop_front();
                }
                Frame::Binary(buf.freeze())
            }
            Frame::Text(first) => {
                let mut text = String::with_capacity(self.max_batch);
                text.push_str(&first);
                while let Some(Frame::Text(next)) = inner.frames.front() {
                    if *taken + next.len() > self.max_batch {
                        break;
                    }
                    *taken += next.len();
                    text.push('\n');
                    text.push_str(next);
                    inner.frames.pop_front();
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

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::StreamExt as _;

    fn queue(limit: usize, batch: usize) -> Arc<Outbound> {
        Outbound::new(limit, batch, Gauge::default())
    }

    fn bin(n: usize) -> Frame {
        Frame::Binary(Bytes::from(vec![7u8; n]))
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
        q.push(Frame::Text(ByteString::from_static("{\"b\":2}")));
        let mut stream = OutboundStream(q);
        match stream.next().now_or_never_ready() {
            Some(Outgoing::Frame(Frame::Text(t))) => assert_eq!(&*t, "{\"a\":1}\n{\"b\":2}"),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[actix_rt::test]
    async fn overflow_drops_the_queue_and_closes_with_4004() {
        let total = Gauge::default();
        let q = Outbound::new(10, 10, total.clone());
        assert_eq!(q.push(bin(6)), Push::Queued);
        assert_eq!(total.get(), 6);
        assert_eq!(q.push(bin(6)), Push::Overflowed);
        assert_eq!(q.push(bin(1)), Push::Closed);
        assert_eq!(total.get(), 0, "dropped bytes are released");
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
