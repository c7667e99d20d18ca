//! Deliveries handed to the worker thread that serves a connection.
//!
//! A channel has one NATS subscription per gateway, so its relay runs on one
//! worker thread while its subscribers' connections are spread over all of
//! them. Pushing to a connection of another worker queues the frame and wakes
//! that connection's task from across threads: for a channel with thousands
//! of subscribers, thousands of cross-thread wake-ups per publication, and
//! every one of those connections' tasks polled just to write one frame.
//!
//! Instead the fan-out hands each other worker ONE batch per run: every push
//! for that worker's connections, in order. The worker's *deliverer* task
//! makes those pushes on the connection's own thread, where an idle socket is
//! written at once (see [`crate::direct`]) and the connections' tasks are not
//! woken at all; each worker writes its own connections, in parallel.
//!
//! Order per subscription is kept: every push the hub makes to a connection
//! goes through its worker's inbox unless the caller runs on that worker and
//! the inbox is empty (checked under the channel's lock, which every push for
//! the channel holds). A subscription removed by its connection (an
//! `unsubscribe`, on the connection's thread) skips what was handed off before
//! the removal and not yet delivered, so nothing follows the `unsubscribe`
//! reply; an `unsubscribed` push (the hub ended it) that reaches the
//! connection after the client unsubscribed or subscribed again is not
//! written (the connection checks its token).
//!
//! A worker's event loop is never held by one fan-out for long: the
//! deliverer yields to the worker's other tasks (pings, replies, other
//! channels, new connections) after each [`SLICE`] of pushes, and a fan-out
//! pushes at once on its own thread only up to [`AT_ONCE_LIMIT`] pushes,
//! handing a larger share to its own worker's deliverer like any other
//! worker's. Without that, one publication to 5,000 local subscribers held
//! the thread for the ~75 ms of its writes, and every other connection on
//! it waited that long for anything.
//!
//! Pace: a relay takes its next arrivals only once every worker has made
//! the pushes its channel handed to it before the latest run ([`Handed`]):
//! the workers write one run while the relay prepares the next, and under
//! load what piles up in the channel's subscription meanwhile goes out as
//! one run (one push per subscriber carrying several publications, written
//! as one frame) rather than one handoff per publication to a worker that
//! only falls further behind.
//!
//! Bound: an inbox holds at most [`INBOX_LIMIT`] handoffs; past it, relays
//! wait for room before taking more from NATS (whose own bound, and the hub's
//! slow-consumer repair, apply from there). Nothing is dropped.

use std::cell::RefCell;
use std::pin::pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};
use std::thread::ThreadId;
use std::time::{Duration, Instant};

use prometheus_client::metrics::counter::Counter;
use rt_shared::config::SlowConsumerPolicy;
use tokio::sync::Notify;

use crate::direct::this_thread;
use crate::outbound::{Frame, Outbound, Push};

/// Handoffs an inbox holds before relays wait for room.
pub const INBOX_LIMIT: usize = 65_536;

/// How long a deliverer pushes before it lets the worker's other tasks run
/// (about 60 direct writes of a small frame on loopback).
pub const SLICE: Duration = Duration::from_millis(1);

/// Pushes a fan-out makes at once on its own thread (a few milliseconds of
/// writes, that hold the thread); past this, that share goes through the
/// thread's deliverer, which takes turns with the rest. Lower costs a
/// mid-sized channel its latency (64: fan-out to 1,000 subscribers at
/// 1,000/s had p50 +20 %), higher holds everyone else on the worker up.
pub const AT_ONCE_LIMIT: usize = 512;

/// Pushes between two looks at the clock in a deliverer's slice.
const PUSHES_PER_CLOCK_CHECK: usize = 16;

thread_local! {
    static CURRENT: RefCell<Option<Arc<Inbox>>> = const { RefCell::new(None) };
}

/// Whether a subscription still exists on its connection: cleared when the
/// connection removes it, so what was handed off before is not delivered after.
#[derive(Clone)]
pub struct SubAlive(Arc<AtomicBool>);

impl Default for SubAlive {
    /// A subscription that exists.
    fn default() -> Self {
        Self::new()
    }
}

impl SubAlive {
    pub fn new() -> Self {
        Self(Arc::new(AtomicBool::new(true)))
    }

    pub fn end(&self) {
        self.0.store(false, Ordering::Relaxed);
    }

    fn is_alive(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

/// One push for a connection of another worker.
pub struct Handoff {
    pub outbound: Arc<Outbound>,
    pub alive: SubAlive,
    pub item: HandoffItem,
}

pub enum HandoffItem {
    /// Consecutive publications of subscription `token`.
    Pubs {
        token: u64,
        policy: SlowConsumerPolicy,
        frames: Vec<Frame>,
    },
    /// A push that is not a publication (presence).
    Message(Frame),
    /// The end of subscription `token`: delivered even though it ended.
    Lost {
        channel: String,
        token: u64,
        frame: Frame,
    },
}

impl Handoff {
    /// Makes the push; `Overflowed` when it closed the connection.
    fn push(self) -> Push {
        match self.item {
            HandoffItem::Lost {
                channel,
                token,
                frame,
            } => self.outbound.push_lost(&channel, token, frame),
            _ if !self.alive.is_alive() => Push::Closed,
            HandoffItem::Pubs {
                token,
                policy,
                frames,
            } => self.outbound.push_pubs(token, policy, frames),
            HandoffItem::Message(frame) => self.outbound.push(frame),
        }
    }
}

/// Handoffs for one worker, with the counter its overflows go to.
pub struct Batch {
    handoffs: Vec<Handoff>,
    slow_consumers: Counter,
}

struct State {
    batches: Vec<Batch>,
    waker: Option<Waker>,
    /// The deliverer is gone (its worker stopped): so are its connections.
    closed: bool,
}

/// A worker thread's queue of handoffs, emptied by its deliverer task.
pub struct Inbox {
    owner: ThreadId,
    state: Mutex<State>,
    /// Handoffs queued (the bound counts these). Not derived from `sent -
    /// done`: two loads give only a bound (done first: an upper one, which
    /// `is_here_and_empty` could use; sent first: a lower one, which the room
    /// check would need to never miss its wake-up), where one counter is exact.
    queued: AtomicUsize,
    room: Notify,
    /// Handoffs ever sent, and ever made (or dropped with a closed inbox):
    /// a sender's ticket is `sent` after its handoffs, made once `done` reaches it.
    sent: AtomicU64,
    done: AtomicU64,
    progress: Notify,
}

impl Inbox {
    /// This worker thread's inbox; the first call on a worker starts its
    /// deliverer (so it must run inside the worker's runtime).
    pub fn current() -> Arc<Inbox> {
        CURRENT.with(|current| {
            let mut current = current.borrow_mut();
            match current.as_ref() {
                Some(inbox) if !inbox.is_closed() => inbox.clone(),
                _ => {
                    let inbox = Arc::new(Inbox::new(this_thread()));
                    actix_rt::spawn(deliver(inbox.clone()));
                    *current = Some(inbox.clone());
                    inbox
                }
            }
        })
    }

    fn new(owner: ThreadId) -> Self {
        Self {
            owner,
            state: Mutex::new(State {
                batches: Vec::new(),
                waker: None,
                closed: false,
            }),
            queued: AtomicUsize::new(0),
            room: Notify::new(),
            sent: AtomicU64::new(0),
            done: AtomicU64::new(0),
            progress: Notify::new(),
        }
    }

    /// Whether pushes for this worker's connections may be made right here,
    /// at once: this is the worker, and nothing handed to it earlier waits.
    /// Only meaningful under the lock of the channel being pushed for.
    pub fn is_here_and_empty(&self) -> bool {
        self.owner == this_thread() && self.queued.load(Ordering::Acquire) == 0
    }

    pub fn is_closed(&self) -> bool {
        self.state.lock().map_or(true, |state| state.closed)
    }

    pub fn is_full(&self) -> bool {
        self.queued.load(Ordering::Acquire) >= INBOX_LIMIT
    }

    /// Queues `handoffs` for the deliverer; returns the ticket
    /// [`Inbox::made_up_to`] waits for. Dropped when the worker is gone
    /// (ticket 0: nothing to wait for).
    pub fn send(&self, handoffs: Vec<Handoff>, slow_consumers: Counter) -> u64 {
        if handoffs.is_empty() {
            return 0;
        }
        let Ok(mut state) = self.state.lock() else {
            return 0;
        };
        if state.closed {
            return 0;
        }
        self.queued.fetch_add(handoffs.len(), Ordering::AcqRel);
        let ticket =
            self.sent.fetch_add(handoffs.len() as u64, Ordering::AcqRel) + handoffs.len() as u64;
        state.batches.push(Batch {
            handoffs,
            slow_consumers,
        });
        if let Some(waker) = state.waker.take() {
            waker.wake();
        }
        ticket
    }

    /// Waits while the inbox is over its bound.
    pub async fn room(&self) {
        loop {
            let mut notified = pin!(self.room.notified());
            notified.as_mut().enable();
            if !self.is_full() || self.is_closed() {
                return;
            }
            notified.await;
        }
    }

    /// Waits until the handoffs sent up to `ticket` have been made (or the
    /// inbox closed); what was sent after them does not prolong the wait.
    pub async fn made_up_to(&self, ticket: u64) {
        // Usually already made: no waiter registered (a lock) for nothing.
        if self.is_made(ticket) {
            return;
        }
        loop {
            let mut notified = pin!(self.progress.notified());
            notified.as_mut().enable();
            if self.is_made(ticket) {
                return;
            }
            notified.await;
        }
    }

    fn is_made(&self, ticket: u64) -> bool {
        self.done.load(Ordering::Acquire) >= ticket || self.is_closed()
    }

    fn poll_take(&self, cx: &mut Context<'_>) -> Poll<Vec<Batch>> {
        let Ok(mut state) = self.state.lock() else {
            return Poll::Ready(Vec::new());
        };
        if state.batches.is_empty() {
            state.waker = Some(cx.waker().clone());
            return Poll::Pending;
        }
        Poll::Ready(std::mem::take(&mut state.batches))
    }

    fn delivered(&self, count: usize) {
        let before = self.queued.fetch_sub(count, Ordering::AcqRel);
        if before >= INBOX_LIMIT && before - count < INBOX_LIMIT {
            self.room.notify_waiters();
        }
        self.done.fetch_add(count as u64, Ordering::AcqRel);
        self.progress.notify_waiters();
    }

    fn close(&self) {
        if let Ok(mut state) = self.state.lock() {
            state.closed = true;
            let dropped: usize = state.batches.drain(..).map(|b| b.handoffs.len()).sum();
            self.queued.fetch_sub(dropped, Ordering::AcqRel);
            self.done.fetch_add(dropped as u64, Ordering::AcqRel);
        }
        self.room.notify_waiters();
        self.progress.notify_waiters();
    }
}

/// Marks the inbox closed when the deliverer stops (its worker stopped).
struct CloseOnDrop(Arc<Inbox>);

impl Drop for CloseOnDrop {
    fn drop(&mut self) {
        self.0.close();
    }
}

/// A worker's deliverer: makes the pushes handed to it, in order.
async fn deliver(inbox: Arc<Inbox>) {
    let inbox = CloseOnDrop(inbox);
    loop {
        let batches = std::future::poll_fn(|cx| inbox.0.poll_take(cx)).await;
        if batches.is_empty() {
            // The lock was poisoned: nothing can be delivered any more.
            return;
        }
        let mut slice_start = Instant::now();
        for batch in batches {
            let count = batch.handoffs.len();
            for (index, handoff) in batch.handoffs.into_iter().enumerate() {
                if handoff.push() == Push::Overflowed {
                    batch.slow_consumers.inc();
                }
                // The batch still counts as queued while this yields, so no
                // push overtakes the rest of it (see `is_here_and_empty`).
                if index % PUSHES_PER_CLOCK_CHECK == PUSHES_PER_CLOCK_CHECK - 1
                    && slice_start.elapsed() >= SLICE
                {
                    tokio::task::yield_now().await;
                    slice_start = Instant::now();
                }
            }
            inbox.0.delivered(count);
        }
    }
}

/// What a channel handed to workers: per inbox, the tickets of its two
/// latest handoffs (earlier ones are made before them).
#[derive(Clone, Default)]
pub struct Handed(Vec<HandedTo>);

#[derive(Clone)]
struct HandedTo {
    inbox: Arc<Inbox>,
    before_latest: u64,
    latest: u64,
}

impl Handed {
    /// Adds newer handoffs.
    pub fn record(&mut self, newer: Handed) {
        for new in newer.0 {
            match self
                .0
                .iter_mut()
                .find(|known| Arc::ptr_eq(&known.inbox, &new.inbox))
            {
                Some(known) => {
                    known.before_latest = known.latest;
                    known.latest = new.latest;
                }
                None => self.0.push(new),
            }
        }
    }

    /// Waits until every worker has made all but the latest handoff: one run
    /// may still be in a worker while the relay takes the next (the workers
    /// and the relay overlap), never two.
    pub async fn made_but_latest(self) {
        for to in self.0 {
            to.inbox.made_up_to(to.before_latest).await;
        }
    }

    fn to(inbox: Arc<Inbox>, ticket: u64) -> HandedTo {
        HandedTo {
            inbox,
            before_latest: 0,
            latest: ticket,
        }
    }
}

/// Pushes to subscribers, collected and made by [`Deliveries::send`]: first
/// each other worker gets its batch, so it starts writing its connections
/// while this thread writes those it may push to itself.
pub struct Deliveries {
    /// Pushes this thread may make itself, and its inbox.
    here: Vec<Handoff>,
    here_inbox: Option<Arc<Inbox>>,
    batches: Vec<(Arc<Inbox>, Vec<Handoff>)>,
    slow_consumers: Counter,
}

impl Deliveries {
    pub fn new(slow_consumers: &Counter) -> Self {
        Self {
            here: Vec::new(),
            here_inbox: None,
            batches: Vec::new(),
            slow_consumers: slow_consumers.clone(),
        }
    }

    /// Pushes `item` to a subscriber served by `worker`.
    pub fn push(
        &mut self,
        worker: &Arc<Inbox>,
        outbound: &Arc<Outbound>,
        alive: &SubAlive,
        item: HandoffItem,
    ) {
        let handoff = Handoff {
            outbound: outbound.clone(),
            alive: alive.clone(),
            item,
        };
        if worker.is_here_and_empty() {
            if self.here_inbox.is_none() {
                self.here_inbox = Some(worker.clone());
            }
            self.here.push(handoff);
            return;
        }
        match self
            .batches
            .iter_mut()
            .find(|(inbox, _)| Arc::ptr_eq(inbox, worker))
        {
            Some((_, handoffs)) => handoffs.push(handoff),
            None => self.batches.push((worker.clone(), vec![handoff])),
        }
    }

    /// Hands each other worker its batch, then makes this thread's pushes.
    /// Must be called under the lock of the channel the pushes are for
    /// (dropping does it too).
    /// Returns what went through workers' inboxes.
    pub fn send(mut self) -> Handed {
        self.flush()
    }

    fn flush(&mut self) -> Handed {
        let mut handed = Vec::with_capacity(self.batches.len() + 1);
        for (inbox, handoffs) in self.batches.drain(..) {
            let ticket = inbox.send(handoffs, self.slow_consumers.clone());
            handed.push(Handed::to(inbox, ticket));
        }
        if self.here.len() > AT_ONCE_LIMIT
            && let Some(inbox) = self.here_inbox.take()
        {
            let ticket = inbox.send(std::mem::take(&mut self.here), self.slow_consumers.clone());
            handed.push(Handed::to(inbox, ticket));
            return Handed(handed);
        }
        for handoff in self.here.drain(..) {
            if handoff.push() == Push::Overflowed {
                self.slow_consumers.inc();
            }
        }
        Handed(handed)
    }
}

impl Drop for Deliveries {
    fn drop(&mut self) {
        self.flush();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outbound::test_queue as queue;
    use bytes::Bytes;

    fn message(q: &Arc<Outbound>) -> Handoff {
        Handoff {
            outbound: q.clone(),
            alive: SubAlive::new(),
            item: HandoffItem::Message(Frame::Binary(Bytes::from_static(b"x"))),
        }
    }

    fn poll_once(future: std::pin::Pin<&mut impl std::future::Future<Output = ()>>) -> bool {
        let mut cx = Context::from_waker(Waker::noop());
        future.poll(&mut cx).is_ready()
    }

    #[test]
    fn relays_wait_for_room_while_an_inbox_is_over_its_bound() {
        let inbox = Inbox::new(this_thread());
        let q = queue();
        inbox.send(
            (0..INBOX_LIMIT - 1).map(|_| message(&q)).collect(),
            Counter::default(),
        );
        assert!(poll_once(pin!(inbox.room())), "room below the bound");
        inbox.send(vec![message(&q)], Counter::default());
        let mut waiting = pin!(inbox.room());
        assert!(!poll_once(waiting.as_mut()), "full");
        // The deliverer takes and pushes everything.
        let mut cx = Context::from_waker(Waker::noop());
        let Poll::Ready(batches) = inbox.poll_take(&mut cx) else {
            panic!("batches wait");
        };
        let count: usize = batches.iter().map(|b| b.handoffs.len()).sum();
        assert_eq!(count, INBOX_LIMIT);
        inbox.delivered(count);
        assert!(poll_once(waiting), "room again");
    }

    #[test]
    fn a_closed_inbox_takes_nothing_and_never_makes_anyone_wait() {
        let inbox = Inbox::new(this_thread());
        let q = queue();
        inbox.send(
            (0..INBOX_LIMIT).map(|_| message(&q)).collect(),
            Counter::default(),
        );
        inbox.close();
        assert!(poll_once(pin!(inbox.room())));
        inbox.send(vec![message(&q)], Counter::default());
        assert!(!inbox.is_full());
        assert_eq!(q.queued_bytes(), 0, "nothing was pushed");
    }

    #[test]
    fn an_ended_subscription_gets_its_lost_push_but_no_publications() {
        let q = queue();
        let alive = SubAlive::new();
        let frame = || Frame::Binary(Bytes::from_static(b"pub"));
        let handoff = |item| Handoff {
            outbound: q.clone(),
            alive: alive.clone(),
            item,
        };
        alive.end();
        let pubs = HandoffItem::Pubs {
            token: 1,
            policy: SlowConsumerPolicy::Disconnect,
            frames: vec![frame()],
        };
        assert_eq!(handoff(pubs).push(), Push::Closed);
        assert_eq!(handoff(HandoffItem::Message(frame())).push(), Push::Closed);
        let lost = HandoffItem::Lost {
            channel: "chat:a".into(),
            token: 1,
            frame: frame(),
        };
        assert_eq!(handoff(lost).push(), Push::Queued);
        assert_eq!(q.queued_bytes(), 3);
    }

    #[test]
    fn pushes_are_made_at_once_only_on_the_owner_thread_with_nothing_waiting() {
        let here = Arc::new(Inbox::new(this_thread()));
        let elsewhere = Arc::new(Inbox::new(
            std::thread::spawn(this_thread).join().expect("thread"),
        ));
        let q = queue();
        let alive = SubAlive::new();
        let frame = || HandoffItem::Message(Frame::Binary(Bytes::from_static(b"m")));
        let mut deliveries = Deliveries::new(&Counter::default());
        deliveries.push(&here, &q, &alive, frame());
        deliveries.push(&elsewhere, &q, &alive, frame());
        deliveries.push(&elsewhere, &q, &alive, frame());
        assert_eq!(q.queued_bytes(), 0, "collected first");
        deliveries.send();
        assert_eq!(q.queued_bytes(), 1, "pushed here, the rest handed over");
        assert_eq!(elsewhere.queued.load(Ordering::Relaxed), 2);
        // With something waiting here, later pushes wait behind it.
        here.send(vec![message(&q)], Counter::default());
        let mut deliveries = Deliveries::new(&Counter::default());
        deliveries.push(&here, &q, &alive, frame());
        drop(deliveries);
        assert_eq!(q.queued_bytes(), 1);
        assert_eq!(here.queued.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn a_relay_waits_for_all_but_its_latest_handoff_and_nothing_later() {
        let inbox = Arc::new(Inbox::new(this_thread()));
        let q = queue();
        let mut handed = Handed::default();
        assert!(
            poll_once(pin!(handed.clone().made_but_latest())),
            "nothing handed"
        );
        let send = |handed: &mut Handed| {
            let ticket = inbox.send(vec![message(&q)], Counter::default());
            handed.record(Handed(vec![Handed::to(inbox.clone(), ticket)]));
        };
        send(&mut handed);
        assert!(
            poll_once(pin!(handed.clone().made_but_latest())),
            "one run may be in the worker"
        );
        send(&mut handed);
        let mut waiting = pin!(handed.clone().made_but_latest());
        assert!(!poll_once(waiting.as_mut()), "not two");
        // Another channel's handoff, sent later, is not waited for.
        inbox.send(vec![message(&q)], Counter::default());
        let mut cx = Context::from_waker(Waker::noop());
        let Poll::Ready(batches) = inbox.poll_take(&mut cx) else {
            panic!("batches wait");
        };
        inbox.delivered(batches[0].handoffs.len());
        assert!(poll_once(waiting), "the first run was made");
        assert_eq!(handed.0.len(), 1, "one entry per worker");
    }

    #[test]
    fn a_large_share_for_this_thread_goes_through_its_own_inbox() {
        let here = Arc::new(Inbox::new(this_thread()));
        let q = queue();
        let alive = SubAlive::new();
        let mut deliveries = Deliveries::new(&Counter::default());
        for _ in 0..=AT_ONCE_LIMIT {
            deliveries.push(
                &here,
                &q,
                &alive,
                HandoffItem::Message(Frame::Binary(Bytes::from_static(b"m"))),
            );
        }
        deliveries.send();
        assert_eq!(q.queued_bytes(), 0, "nothing pushed at once");
        assert_eq!(here.queued.load(Ordering::Relaxed), AT_ONCE_LIMIT + 1);
    }

    #[actix_rt::test]
    async fn a_long_batch_lets_the_workers_other_tasks_run_before_it_ends() {
        // Far more than one slice's worth of pushes, even in an optimised build.
        const PUSHES: usize = 200_000;
        let inbox = Inbox::current();
        let q = queue();
        inbox.send(
            (0..PUSHES).map(|_| message(&q)).collect(),
            Counter::default(),
        );
        // Spawned after the deliverer: it runs when the deliverer yields.
        let waiting_when_it_ran = actix_rt::spawn({
            let inbox = inbox.clone();
            async move { inbox.queued.load(Ordering::Acquire) }
        })
        .await
        .expect("task");
        assert!(
            waiting_when_it_ran > 0,
            "another task of the worker waited for the whole batch"
        );
        while inbox.queued.load(Ordering::Acquire) > 0 {
            tokio::task::yield_now().await;
        }
        assert_eq!(q.queued_bytes(), PUSHES, "every push made, once");
    }
}
