//! The gateway's channel registry and local fan-out.
//!
//! - ONE NATS subscription per channel per gateway process, however many
//!   local subscribers: a relay task subscribes on the first and unsubscribes
//!   after the last.
//! - Each publication is decoded once and encoded at most once per wire
//!   encoding; every local subscriber gets a clone of the same bytes.
//! - The registry is sharded by channel so one hot channel does not serialize
//!   the node.
//! - Publications that wait together in a channel's NATS subscription (the
//!   node fell behind) go out as one run: each subscriber's share is queued
//!   under one lock with one wake-up (see [`Outbound::push_pubs`]).
//! - The relay writes the subscribers of its own worker thread itself and
//!   hands each other worker one batch per run with its connections' shares
//!   (see [`crate::handoff`]), so every worker writes its own connections.
//! - A subscriber whose `subscribe` is still being answered is *pending*: live
//!   publications are buffered for it (bounded) and replayed after the reply,
//!   skipping what the reply already covers, so the switch-over from recovery
//!   to live has no gap and no duplicate.
//!
//! Nothing is lost silently. Each live subscriber has a position (epoch and
//! offset of the last publication queued to it, at first its subscribe
//! reply's); a publication is queued to it only when it is the next one.
//! When the node itself misses publications — an offset jump on arrival
//! (a NATS slow consumer, a reconnect), or, after a NATS reconnect or a
//! slow-consumer event, possibly at the tail of any channel — it *repairs*
//! the channel: it asks broadcast for what follows its last position, holds
//! newer arrivals meanwhile (bounded by `gateway.max_pending_while_subscribing`),
//! then delivers the missed publications and the held ones in offset order.
//! A subscriber that still cannot follow (the publications are no longer in
//! history, the epoch changed, broadcast did not answer, too much arrived
//! meanwhile) gets `unsubscribed` with code 112 and its subscription ends: it
//! resubscribes with `since`, and `recovered` tells it whether to refetch.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::hash::{BuildHasher, BuildHasherDefault, DefaultHasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, RwLock};
use std::time::Duration;

use bytestring::ByteString;
use futures_util::{FutureExt as _, StreamExt as _};
use prometheus_client::metrics::counter::Counter;
use rt_proto::internal::{Publication, RecoverReply, StreamPosition};
use rt_proto::session::{self, PresenceChange};
use rt_proto::{ChannelName, CloseCode, Encoding, ErrorCode, outbound, subject};
use rt_shared::broadcast_client::BroadcastClient;
use rt_shared::config::SlowConsumerPolicy;
use rt_shared::telemetry::{RateLimitedLog, add_link, now_ms};
use rt_shared::trace_context::TraceContext;
use rt_shared::{Bus, BusError};
use tokio::sync::oneshot;

use crate::handoff::{Deliveries, Handed, HandoffItem, Inbox, SubAlive};
use crate::metrics::{GatewayMetrics, ReasonLabel};
use crate::outbound::{Frame, Outbound};

const SHARDS: usize = 64;

/// Publications a channel's relay takes from its NATS subscription at once
/// when several are waiting (a backlog); one when they come one at a time.
const RELAY_BATCH: usize = 64;

/// Channels checked at once after a NATS reconnect or slow-consumer event.
const SWEEP_CONCURRENCY: usize = 64;

/// How often the node looks at its NATS connection's counters.
const WATCH_INTERVAL: Duration = Duration::from_millis(100);

/// Slow-consumer events (NATS is dropping messages: the node is overloaded)
/// start a check of every channel at most this often; offset jumps are
/// caught on arrival meanwhile.
const SLOW_CONSUMER_SWEEP_INTERVAL: Duration = Duration::from_secs(1);

/// Waits before asking broadcast again when a repair got no answer.
const REPAIR_RETRIES: [Duration; 2] = [Duration::from_millis(200), Duration::from_millis(1_000)];

static RELAY_ERRORS: RateLimitedLog = RateLimitedLog::new(5_000);
static REPAIR_LOG: RateLimitedLog = RateLimitedLog::new(5_000);

/// A connection's identity inside this gateway.
pub type ConnId = u64;

/// A publication as delivered to this node, encoded lazily once per encoding.
pub struct EncodedPub {
    pub publication: Publication,
    frames: [OnceLock<Frame>; 2],
}

impl EncodedPub {
    pub fn new(publication: Publication) -> Self {
        Self {
            publication,
            frames: [OnceLock::new(), OnceLock::new()],
        }
    }

    /// The `pub` push in `encoding`, encoded on first use.
    pub fn frame(&self, encoding: Encoding) -> Frame {
        self.frames[encoding.index()]
            .get_or_init(|| encode_frame(&outbound::push_pub(&self.publication), encoding))
            .clone()
    }
}

/// Encodes one message as a frame of the encoding's type.
pub fn encode_frame(message: &outbound::Out, encoding: Encoding) -> Frame {
    let bytes = outbound::encode(message, encoding);
    match encoding {
        Encoding::MsgPack => Frame::Binary(bytes.into()),
        // serde_json only writes valid UTF-8.
        Encoding::Json => Frame::Text(ByteString::from(
            String::from_utf8(bytes).unwrap_or_default(),
        )),
    }
}

enum SubState {
    Pending(Vec<Arc<EncodedPub>>),
    /// The epoch and offset of the last publication queued to it (at first,
    /// its subscribe reply's position).
    Live {
        epoch: String,
        offset: u64,
    },
}

struct LocalSub {
    outbound: Arc<Outbound>,
    /// The worker serving the connection (pushes from elsewhere go through it).
    worker: Arc<Inbox>,
    alive: SubAlive,
    encoding: Encoding,
    /// The subscription's token on its connection.
    token: u64,
    policy: SlowConsumerPolicy,
    state: SubState,
}

/// Why a subscriber cannot follow its channel any more.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Lost {
    /// Publications after its position cannot be delivered.
    Gap,
    /// The channel's history was reset under it.
    Epoch,
}

impl Lost {
    fn reason(self) -> &'static str {
        match self {
            Lost::Gap => "publications were missed: resubscribe with since",
            Lost::Epoch => "the channel's history was reset (new epoch): resubscribe with since",
        }
    }
}

/// What made the node ask broadcast for publications it may have missed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RepairReason {
    /// An offset jump on arrival.
    Gap,
    /// The NATS connection was re-established: anything may have been missed meanwhile.
    Reconnect,
    /// NATS dropped messages of one of the node's subscriptions.
    SlowConsumer,
}

impl RepairReason {
    fn label(self) -> &'static str {
        match self {
            RepairReason::Gap => "gap",
            RepairReason::Reconnect => "reconnect",
            RepairReason::SlowConsumer => "slow_consumer",
        }
    }
}

/// A channel waiting for broadcast to tell what follows `since`.
struct Repair {
    id: u64,
    since: StreamPosition,
    /// Arrivals held until the missed publications are delivered.
    held: Vec<Arc<EncodedPub>>,
}

enum Relay {
    /// Subscribing to NATS; these wait for it.
    Starting(Vec<oneshot::Sender<()>>),
    Running,
}

struct ChannelEntry {
    subscribers: HashMap<ConnId, LocalSub>,
    relay: Relay,
    generation: u64,
    stop_relay: Option<oneshot::Sender<()>>,
    /// The newest position this node knows it has delivered everything up
    /// to (received, filled, or vouched for by a subscribe reply), to spot gaps.
    last: Option<StreamPosition>,
    repair: Option<Repair>,
    /// What this channel's pushes handed to workers, for the relay's pace.
    handed: Handed,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HubError {
    #[error("already subscribed")]
    AlreadySubscribed,
    #[error("the subscription ended before it was ready")]
    Gone,
}

type Shard = HashMap<String, ChannelEntry>;

pub struct Hub {
    shards: Vec<Mutex<Shard>>,
    bus: Bus,
    broadcast: BroadcastClient,
    metrics: GatewayMetrics,
    max_pending: usize,
    next_generation: AtomicU64,
    /// Every worker's inbox, to wait for room in.
    inboxes: RwLock<Vec<Arc<Inbox>>>,
}

fn position(publication: &Publication) -> StreamPosition {
    StreamPosition {
        offset: publication.offset,
        epoch: publication.epoch.clone(),
    }
}

/// Whether `publication` comes after `last` with publications missing in between.
fn follows_with_gap(last: Option<&StreamPosition>, publication: &Publication) -> bool {
    last.is_some_and(|last| last.epoch == publication.epoch && publication.offset > last.offset + 1)
}

/// Moves the node's position past `publication` (a new epoch starts over).
fn advance(last: &mut Option<StreamPosition>, publication: &Publication) {
    match last {
        Some(last) if last.epoch == publication.epoch => {
            last.offset = last.offset.max(publication.offset)
        }
        last => *last = Some(position(publication)),
    }
}

impl Hub {
    pub fn new(bus: Bus, metrics: GatewayMetrics, max_pending: usize) -> Arc<Self> {
        Arc::new(Self {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            broadcast: BroadcastClient::new(bus.clone()),
            bus,
            metrics,
            max_pending,
            next_generation: AtomicU64::new(1),
            inboxes: RwLock::new(Vec::new()),
        })
    }

    fn shard(&self, channel: &str) -> Option<MutexGuard<'_, Shard>> {
        let hash = BuildHasherDefault::<DefaultHasher>::default().hash_one(channel);
        let index = usize::try_from(hash % SHARDS as u64).unwrap_or(0);
        self.shards.get(index).and_then(|m| m.lock().ok())
    }

    fn next_id(&self) -> u64 {
        self.next_generation.fetch_add(1, Ordering::Relaxed)
    }

    /// The calling worker's inbox, remembered so relays can wait for room in it.
    fn worker_inbox(&self) -> Arc<Inbox> {
        let inbox = Inbox::current();
        let known = self
            .inboxes
            .read()
            .is_ok_and(|inboxes| inboxes.iter().any(|i| Arc::ptr_eq(i, &inbox)));
        if !known && let Ok(mut inboxes) = self.inboxes.write() {
            inboxes.retain(|i| !i.is_closed());
            inboxes.push(inbox.clone());
        }
        inbox
    }

    /// Waits until every worker has made the pushes `channel` handed to it
    /// before but the latest run. Its relay so takes its next arrivals at
    /// the pace of the slowest worker: what piles up in the subscription
    /// meanwhile goes out as one run, one push per subscriber, instead of
    /// one per arrival to a worker that falls further behind. Also waits
    /// while some worker has more handed to it than it may hold (many relays
    /// at once).
    async fn wait_for_workers(&self, channel: &ChannelName) {
        let handed = self
            .shard(channel.as_str())
            .and_then(|shard| {
                shard
                    .get(channel.as_str())
                    .map(|entry| entry.handed.clone())
            })
            .unwrap_or_default();
        handed.made_but_latest().await;
        let full: Vec<Arc<Inbox>> = self
            .inboxes
            .read()
            .map(|inboxes| inboxes.iter().filter(|i| i.is_full()).cloned().collect())
            .unwrap_or_default();
        for inbox in full {
            inbox.room().await;
        }
    }

    /// Whether this node already holds a subscription for `channel`.
    pub fn has_channel(&self, channel: &ChannelName) -> bool {
        self.shard(channel.as_str())
            .is_some_and(|shard| shard.contains_key(channel.as_str()))
    }

    /// Channels this node holds subscriptions for.
    pub fn channel_count(&self) -> usize {
        usize::try_from(self.metrics.channels.get()).unwrap_or(0)
    }

    /// Registers a pending subscriber: subscription `token` of connection
    /// `conn`, in a namespace with slow-consumer `policy`. The returned
    /// receiver resolves once this node's NATS subscription for the channel
    /// is in place (at once if it already is); only then may the caller ask
    /// broadcast for the position.
    pub fn add_pending(
        self: &Arc<Self>,
        channel: &ChannelName,
        conn: ConnId,
        outbound: Arc<Outbound>,
        encoding: Encoding,
        token: u64,
        policy: SlowConsumerPolicy,
    ) -> Result<oneshot::Receiver<()>, HubError> {
        let (ready_tx, ready_rx) = oneshot::channel();
        let worker = self.worker_inbox();
        let mut shard = self.shard(channel.as_str()).ok_or(HubError::Gone)?;
        let entry = match shard.entry(channel.as_str().to_owned()) {
            Entry::Occupied(e) => e.into_mut(),
            Entry::Vacant(v) => {
                let generation = self.next_id();
                let (stop_tx, stop_rx) = oneshot::channel();
                self.metrics.channels.inc();
                actix_rt::spawn(run_relay(
                    self.clone(),
                    channel.clone(),
                    generation,
                    stop_rx,
                ));
                v.insert(ChannelEntry {
                    subscribers: HashMap::new(),
                    relay: Relay::Starting(Vec::new()),
                    generation,
                    stop_relay: Some(stop_tx),
                    last: None,
                    repair: None,
                    handed: Handed::default(),
                })
            }
        };
        if entry.subscribers.contains_key(&conn) {
            return Err(HubError::AlreadySubscribed);
        }
        entry.subscribers.insert(
            conn,
            LocalSub {
                outbound,
                worker,
                alive: SubAlive::new(),
                encoding,
                token,
                policy,
                state: SubState::Pending(Vec::new()),
            },
        );
        self.metrics.subscriptions.inc();
        match &mut entry.relay {
            Relay::Starting(waiters) => waiters.push(ready_tx),
            Relay::Running => {
                let _ = ready_tx.send(());
            }
        }
        Ok(ready_rx)
    }

    /// Makes a pending subscriber live at `position` (its subscribe
    /// answer's): queues `reply`, then what arrived meanwhile after that
    /// position, in order.
    pub fn activate(
        &self,
        channel: &ChannelName,
        conn: ConnId,
        reply: Option<Frame>,
        position: StreamPosition,
    ) -> Result<(), HubError> {
        let mut shard = self.shard(channel.as_str()).ok_or(HubError::Gone)?;
        let entry = shard.get_mut(channel.as_str()).ok_or(HubError::Gone)?;
        let sub = entry.subscribers.get_mut(&conn).ok_or(HubError::Gone)?;
        let live = SubState::Live {
            epoch: position.epoch.clone(),
            offset: position.offset,
        };
        let SubState::Pending(buffered) = std::mem::replace(&mut sub.state, live) else {
            return Err(HubError::Gone);
        };
        // Broadcast answered after this node's NATS subscription was in
        // place: everything after this position reaches the node.
        if entry.last.is_none() {
            entry.last = Some(position);
        }
        let mut deliveries = Deliveries::new(&self.metrics.slow_consumers);
        if let Some(reply) = reply {
            deliveries.push(
                &sub.worker,
                &sub.outbound,
                &sub.alive,
                HandoffItem::Message(reply),
            );
        }
        let lost = self.offer_run(sub, &buffered, &mut deliveries);
        deliveries.send();
        if let Some(why) = lost {
            self.end(entry, channel.as_str(), conn, why);
            self.drop_if_empty(&mut shard, channel.as_str());
        }
        Ok(())
    }

    /// Removes a subscriber; the relay stops after the last one.
    pub fn remove(&self, channel: &str, conn: ConnId) {
        let Some(mut shard) = self.shard(channel) else {
            return;
        };
        let Some(entry) = shard.get_mut(channel) else {
            return;
        };
        if let Some(sub) = entry.subscribers.remove(&conn) {
            // What was handed to its worker and not yet pushed is not
            // pushed after the connection's own reply to this.
            sub.alive.end();
            self.metrics.subscriptions.dec();
        }
        self.drop_if_empty(&mut shard, channel);
    }

    /// Forgets a channel without subscribers and stops its relay.
    fn drop_if_empty(&self, shard: &mut Shard, channel: &str) {
        if !shard
            .get(channel)
            .is_some_and(|entry| entry.subscribers.is_empty())
        {
            return;
        }
        if let Some(mut entry) = shard.remove(channel) {
            if let Some(stop) = entry.stop_relay.take() {
                let _ = stop.send(());
            }
            self.metrics.channels.dec();
        }
    }

    fn relay_started(&self, channel: &ChannelName, generation: u64) {
        let Some(mut shard) = self.shard(channel.as_str()) else {
            return;
        };
        if let Some(entry) = shard.get_mut(channel.as_str())
            && entry.generation == generation
            && let Relay::Starting(waiters) = std::mem::replace(&mut entry.relay, Relay::Running)
        {
            for waiter in waiters {
                let _ = waiter.send(());
            }
        }
    }

    /// Takes publications that arrived from NATS together (in offset order)
    /// to every local subscriber of their channel. Consecutive ones go out
    /// as one run: each subscriber's queue is locked and woken once per run,
    /// not once per publication, which is what keeps a backlog (several
    /// publications waiting in the channel's NATS subscription) cheap to
    /// catch up on.
    fn fan_out(
        self: &Arc<Self>,
        channel: &ChannelName,
        generation: u64,
        arrivals: Vec<Publication>,
    ) {
        let Some(mut shard) = self.shard(channel.as_str()) else {
            return;
        };
        let Some(entry) = shard.get_mut(channel.as_str()) else {
            return;
        };
        if entry.generation != generation {
            return;
        }
        let now = now_ms();
        let mut run: Vec<Arc<EncodedPub>> = Vec::with_capacity(arrivals.len());
        for publication in arrivals {
            self.metrics
                .publish_to_deliver
                .observe(now.saturating_sub(publication.ts) as f64 / 1000.0);
            let encoded = Arc::new(EncodedPub::new(publication));
            if entry.repair.is_none()
                && !follows_with_gap(entry.last.as_ref(), &encoded.publication)
            {
                advance(&mut entry.last, &encoded.publication);
                run.push(encoded);
            } else {
                self.deliver_run(entry, channel.as_str(), &run);
                run.clear();
                self.accept(entry, channel, encoded, true);
            }
        }
        self.deliver_run(entry, channel.as_str(), &run);
        self.drop_if_empty(&mut shard, channel.as_str());
    }

    /// Delivers an arrival, holds it while the channel is being repaired,
    /// or starts a repair when it shows this node missed publications (unless
    /// `may_repair` is false: then the subscribers it leaves behind get 112).
    fn accept(
        self: &Arc<Self>,
        entry: &mut ChannelEntry,
        channel: &ChannelName,
        publication: Arc<EncodedPub>,
        may_repair: bool,
    ) {
        if let Some(repair) = entry.repair.as_mut() {
            if repair.held.len() < self.max_pending {
                repair.held.push(publication);
                return;
            }
            // Too much arrived meanwhile: give up filling; whoever the held
            // publications leave behind is told to resubscribe.
            self.metrics.gap_repairs_failed.inc();
            if let Some(repair) = entry.repair.take() {
                log_repair_failure(
                    channel,
                    &repair.since,
                    "too many publications arrived meanwhile",
                );
                for held in repair.held {
                    self.deliver(entry, channel.as_str(), held);
                }
            }
            self.deliver(entry, channel.as_str(), publication);
            return;
        }
        if let Some(last) = entry
            .last
            .as_ref()
            .filter(|last| follows_with_gap(Some(last), &publication.publication))
        {
            self.metrics.delivery_gaps.inc();
            if may_repair {
                let since = last.clone();
                self.start_repair(entry, channel, RepairReason::Gap, since, vec![publication]);
                return;
            }
            self.metrics.gap_repairs_failed.inc();
            log_repair_failure(channel, last, "broadcast does not have them (yet)");
        }
        self.deliver(entry, channel.as_str(), publication);
    }

    /// Queues a publication to every subscriber it follows on from; ends
    /// the subscriptions it does not.
    fn deliver(&self, entry: &mut ChannelEntry, channel: &str, publication: Arc<EncodedPub>) {
        self.deliver_run(entry, channel, std::slice::from_ref(&publication));
    }

    /// Queues consecutive publications to every subscriber, all of a
    /// subscriber's in one push; ends the subscriptions they do not follow
    /// on from (after what they could take).
    fn deliver_run(&self, entry: &mut ChannelEntry, channel: &str, run: &[Arc<EncodedPub>]) {
        if run.is_empty() {
            return;
        }
        for publication in run {
            advance(&mut entry.last, &publication.publication);
        }
        let mut lost = Vec::new();
        let mut deliveries = Deliveries::new(&self.metrics.slow_consumers);
        for (conn, sub) in &mut entry.subscribers {
            if let Some(why) = self.offer_run(sub, run, &mut deliveries) {
                lost.push((*conn, why));
            }
        }
        entry.handed.record(deliveries.send());
        for (conn, why) in lost {
            self.end(entry, channel, conn, why);
        }
    }

    /// Adds to `deliveries` the publications of `run` a subscriber takes
    /// (see [`Hub::admit`]), as one push; why it cannot follow past them, if so.
    fn offer_run(
        &self,
        sub: &mut LocalSub,
        run: &[Arc<EncodedPub>],
        deliveries: &mut Deliveries,
    ) -> Option<Lost> {
        let mut frames = Vec::with_capacity(run.len());
        let mut lost = None;
        for publication in run {
            match self.admit(sub, publication) {
                Ok(Some(frame)) => frames.push(frame),
                Ok(None) => {}
                Err(why) => {
                    lost = Some(why);
                    break;
                }
            }
        }
        if !frames.is_empty() {
            deliveries.push(
                &sub.worker,
                &sub.outbound,
                &sub.alive,
                HandoffItem::Pubs {
                    token: sub.token,
                    policy: sub.policy,
                    frames,
                },
            );
        }
        lost
    }

    /// Moves a subscriber past `publication` if it is the next one for it:
    /// the frame to queue for a live one, `None` when it already had it (or
    /// is pending: then it is buffered); `Err` when it cannot follow.
    fn admit(
        &self,
        sub: &mut LocalSub,
        publication: &Arc<EncodedPub>,
    ) -> Result<Option<Frame>, Lost> {
        match &mut sub.state {
            SubState::Pending(buffered) => {
                if buffered.len() < self.max_pending {
                    buffered.push(publication.clone());
                } else {
                    buffered.clear();
                    sub.outbound.fail(CloseCode::SLOW_CONSUMER, "slow consumer");
                    self.metrics.slow_consumers.inc();
                }
                Ok(None)
            }
            SubState::Live { epoch, offset } => {
                let p = &publication.publication;
                if p.epoch != *epoch {
                    return Err(Lost::Epoch);
                }
                if p.offset <= *offset {
                    return Ok(None);
                }
                if p.offset != *offset + 1 {
                    return Err(Lost::Gap);
                }
                *offset = p.offset;
                Ok(Some(publication.frame(sub.encoding)))
            }
        }
    }

    /// Ends a subscription the node cannot keep consistent: `unsubscribed`
    /// with 112, queued after everything it was sent.
    fn end(&self, entry: &mut ChannelEntry, channel: &str, conn: ConnId, why: Lost) {
        let Some(sub) = entry.subscribers.remove(&conn) else {
            return;
        };
        self.metrics.subscriptions.dec();
        self.metrics.resubscribe_requests.inc();
        let push =
            outbound::push_unsubscribed(channel, ErrorCode::UNRECOVERABLE_POSITION, why.reason());
        let frame = encode_frame(&push, sub.encoding);
        let mut deliveries = Deliveries::new(&self.metrics.slow_consumers);
        deliveries.push(
            &sub.worker,
            &sub.outbound,
            &sub.alive,
            HandoffItem::Lost {
                channel: channel.to_owned(),
                token: sub.token,
                frame,
            },
        );
        deliveries.send();
    }

    /// Ends every live subscription that may have missed publications after
    /// `since`: all but those already at broadcast's position (`reply`), or,
    /// without an answer, those past `since`.
    fn end_behind(
        &self,
        entry: &mut ChannelEntry,
        channel: &str,
        since: &StreamPosition,
        reply: Option<&RecoverReply>,
    ) {
        let behind: Vec<(ConnId, Lost)> = entry
            .subscribers
            .iter()
            .filter_map(|(conn, sub)| {
                let SubState::Live { epoch, offset } = &sub.state else {
                    return None;
                };
                let (at_epoch, at_offset) = match reply {
                    Some(reply) => (&reply.epoch, reply.offset),
                    None => (&since.epoch, since.offset + 1),
                };
                if *epoch != *at_epoch {
                    Some((*conn, Lost::Epoch))
                } else if *offset < at_offset {
                    Some((*conn, Lost::Gap))
                } else {
                    None
                }
            })
            .collect();
        for (conn, why) in behind {
            self.end(entry, channel, conn, why);
        }
    }

    fn start_repair(
        self: &Arc<Self>,
        entry: &mut ChannelEntry,
        channel: &ChannelName,
        reason: RepairReason,
        since: StreamPosition,
        held: Vec<Arc<EncodedPub>>,
    ) {
        let id = self.begin(entry, reason, since.clone(), held);
        actix_rt::spawn(run_repair(
            self.clone(),
            channel.clone(),
            entry.generation,
            id,
            since,
        ));
    }

    fn begin(
        &self,
        entry: &mut ChannelEntry,
        reason: RepairReason,
        since: StreamPosition,
        held: Vec<Arc<EncodedPub>>,
    ) -> u64 {
        let id = self.next_id();
        self.metrics
            .gap_repairs
            .get_or_create(&ReasonLabel {
                reason: reason.label(),
            })
            .inc();
        entry.repair = Some(Repair { id, since, held });
        id
    }

    /// Whether repair `id` of the channel is still waiting for its answer.
    fn repairing(&self, channel: &ChannelName, generation: u64, id: u64) -> bool {
        self.shard(channel.as_str()).is_some_and(|shard| {
            shard.get(channel.as_str()).is_some_and(|entry| {
                entry.generation == generation && entry.repair.as_ref().is_some_and(|r| r.id == id)
            })
        })
    }

    /// Broadcast's answer to repair `id`: the missed publications, then the
    /// held ones, in order; or, when it cannot fill, 112 to whoever is behind.
    fn finish_repair(
        self: &Arc<Self>,
        channel: &ChannelName,
        generation: u64,
        id: u64,
        result: Result<RecoverReply, BusError>,
    ) {
        let Some(mut shard) = self.shard(channel.as_str()) else {
            return;
        };
        let Some(entry) = shard.get_mut(channel.as_str()) else {
            return;
        };
        if entry.generation != generation || entry.repair.as_ref().is_none_or(|r| r.id != id) {
            return;
        }
        let Some(Repair { since, held, .. }) = entry.repair.take() else {
            return;
        };
        match result {
            Ok(reply) if reply.recovered && reply.epoch == since.epoch => {
                let filled: Vec<Arc<EncodedPub>> = reply
                    .pubs
                    .into_iter()
                    .filter(|p| p.epoch == since.epoch && p.offset > since.offset)
                    .map(|p| Arc::new(EncodedPub::new(p)))
                    .collect();
                if !filled.is_empty() {
                    self.metrics.gaps_filled.inc();
                    self.metrics
                        .refilled_publications
                        .inc_by(filled.len() as u64);
                }
                for publication in filled {
                    self.deliver(entry, channel.as_str(), publication);
                }
                // Everything up to broadcast's position was delivered.
                if let Some(last) = &mut entry.last
                    && last.epoch == reply.epoch
                {
                    last.offset = last.offset.max(reply.offset);
                }
                // A gap among the held ones is new since the answer; one
                // that the answer did not move past cannot be filled.
                let progressed = reply.offset > since.offset;
                for publication in held {
                    self.accept(entry, channel, publication, progressed);
                }
            }
            other => {
                self.metrics.gap_repairs_failed.inc();
                let reply = other.as_ref().ok();
                let why = match &other {
                    Ok(reply) if reply.epoch != since.epoch => "the epoch changed".to_owned(),
                    Ok(_) => "not in history".to_owned(),
                    Err(error) => error.to_string(),
                };
                log_repair_failure(channel, &since, &why);
                self.end_behind(entry, channel.as_str(), &since, reply);
                if let Some(reply) = reply {
                    entry.last = Some(StreamPosition {
                        offset: reply.offset,
                        epoch: reply.epoch.clone(),
                    });
                }
                for publication in held {
                    self.deliver(entry, channel.as_str(), publication);
                }
            }
        }
        self.drop_if_empty(&mut shard, channel.as_str());
    }

    async fn ask_broadcast(
        &self,
        channel: &ChannelName,
        since: &StreamPosition,
    ) -> Result<RecoverReply, BusError> {
        self.broadcast
            .recover(channel, Some(since.clone()), None)?
            .wait()
            .await
    }
}

/// Losses the node cannot see on arrival: after a NATS reconnect, or when
/// NATS reports one of its subscriptions a slow consumer, the tail of any
/// channel may be missing. Every channel is then checked against broadcast.
impl Hub {
    /// Watches the NATS connection's reconnects and `slow_consumer_events`
    /// (the bus counts them) and repairs every channel after each.
    pub fn watch_nats(self: &Arc<Self>, slow_consumer_events: Counter) {
        let hub = Arc::downgrade(self);
        let stats = self.bus.client().statistics();
        actix_rt::spawn(async move {
            let mut connects = stats.connects.load(Ordering::Relaxed);
            let mut slow = slow_consumer_events.get();
            let mut due: Option<RepairReason> = None;
            let mut swept: Option<tokio::time::Instant> = None;
            loop {
                tokio::time::sleep(WATCH_INTERVAL).await;
                let Some(hub) = hub.upgrade() else { return };
                let now = stats.connects.load(Ordering::Relaxed);
                if now != connects {
                    // The first connect is not a reconnect.
                    if connects > 0 {
                        due = Some(RepairReason::Reconnect);
                    }
                    connects = now;
                }
                let now = slow_consumer_events.get();
                if now != slow {
                    slow = now;
                    due = due.or(Some(RepairReason::SlowConsumer));
                }
                let too_soon = due == Some(RepairReason::SlowConsumer)
                    && swept.is_some_and(|at| at.elapsed() < SLOW_CONSUMER_SWEEP_INTERVAL);
                if let Some(reason) = due
                    && !too_soon
                    && hub.sweep(reason).await
                {
                    due = None;
                    swept = Some(tokio::time::Instant::now());
                }
            }
        });
    }

    /// Repairs every channel from its last position; false when NATS is not
    /// back yet (the caller tries again).
    async fn sweep(self: &Arc<Self>, reason: RepairReason) -> bool {
        // The node's subscriptions are registered again before its first
        // message after a reconnect: once the server answered this, anything
        // published is either delivered to the node or in broadcast's answer.
        if self.bus.sync().await.is_err() {
            return false;
        }
        let channels: Vec<(ChannelName, u64)> = self
            .shards
            .iter()
            .filter_map(|shard| shard.lock().ok())
            .flat_map(|shard| {
                shard
                    .iter()
                    .filter_map(|(name, entry)| {
                        ChannelName::parse(name)
                            .ok()
                            .map(|channel| (channel, entry.generation))
                    })
                    .collect::<Vec<_>>()
            })
            .collect();
        tracing::info!(
            reason = reason.label(),
            channels = channels.len(),
            "checking every channel for publications missed"
        );
        futures_util::stream::iter(channels)
            .for_each_concurrent(SWEEP_CONCURRENCY, |(channel, generation)| async move {
                if let Some((id, since)) = self.begin_sweep(&channel, generation, reason) {
                    run_repair(self.clone(), channel, generation, id, since).await;
                }
            })
            .await;
        true
    }

    /// Starts repairing one channel from the node's last position (or its
    /// least advanced subscriber's), unless a repair already runs.
    fn begin_sweep(
        &self,
        channel: &ChannelName,
        generation: u64,
        reason: RepairReason,
    ) -> Option<(u64, StreamPosition)> {
        let mut shard = self.shard(channel.as_str())?;
        let entry = shard.get_mut(channel.as_str())?;
        if entry.generation != generation || entry.repair.is_some() {
            return None;
        }
        let since = entry.last.clone().or_else(|| least_advanced(entry))?;
        let id = self.begin(entry, reason, since.clone(), Vec::new());
        Some((id, since))
    }
}

/// The lowest position among the live subscribers of the first one's epoch.
fn least_advanced(entry: &ChannelEntry) -> Option<StreamPosition> {
    let mut least: Option<StreamPosition> = None;
    for sub in entry.subscribers.values() {
        let SubState::Live { epoch, offset } = &sub.state else {
            continue;
        };
        match &mut least {
            None => {
                least = Some(StreamPosition {
                    offset: *offset,
                    epoch: epoch.clone(),
                });
            }
            Some(least) if least.epoch == *epoch => least.offset = least.offset.min(*offset),
            Some(_) => {}
        }
    }
    least
}

fn log_repair_failure(channel: &ChannelName, since: &StreamPosition, why: &str) {
    if let Some(suppressed) = REPAIR_LOG.allow() {
        tracing::warn!(
            %channel,
            since = since.offset,
            why,
            suppressed,
            "cannot fill missed publications: subscribers behind get 112"
        );
    }
}

/// Asks broadcast what follows `since` (again, a few times, while it does
/// not answer) and hands the answer to the hub.
async fn run_repair(
    hub: Arc<Hub>,
    channel: ChannelName,
    generation: u64,
    id: u64,
    since: StreamPosition,
) {
    let mut result = hub.ask_broadcast(&channel, &since).await;
    for delay in REPAIR_RETRIES {
        if result.is_ok() || !hub.repairing(&channel, generation, id) {
            break;
        }
        tokio::time::sleep(delay).await;
        result = hub.ask_broadcast(&channel, &since).await;
    }
    hub.finish_repair(&channel, generation, id, result);
}

impl Hub {
    /// Hands a batch of joins and leaves to every live local subscriber, as
    /// one frame per subscriber (encoded once per encoding).
    fn fan_out_presence(&self, channel: &ChannelName, generation: u64, change: &PresenceChange) {
        let Some(mut shard) = self.shard(channel.as_str()) else {
            return;
        };
        let Some(entry) = shard.get_mut(channel.as_str()) else {
            return;
        };
        if entry.generation != generation {
            return;
        }
        let messages: Vec<outbound::Out> = change
            .joins
            .iter()
            .map(|c| outbound::push_presence(true, channel.as_str(), c))
            .chain(
                change
                    .leaves
                    .iter()
                    .map(|c| outbound::push_presence(false, channel.as_str(), c)),
            )
            .collect();
        if messages.is_empty() {
            return;
        }
        let mut frames: [Option<Frame>; 2] = [None, None];
        let mut deliveries = Deliveries::new(&self.metrics.slow_consumers);
        for sub in entry.subscribers.values_mut() {
            if !matches!(sub.state, SubState::Live { .. }) {
                continue;
            }
            let frame = frames[sub.encoding.index()]
                .get_or_insert_with(|| encode_batch(&messages, sub.encoding))
                .clone();
            deliveries.push(
                &sub.worker,
                &sub.outbound,
                &sub.alive,
                HandoffItem::Message(frame),
            );
        }
        entry.handed.record(deliveries.send());
    }
}

/// Several messages as one frame (MessagePack maps back to back, JSON lines).
fn encode_batch(messages: &[outbound::Out], encoding: Encoding) -> Frame {
    let bytes = outbound::encode_many(messages, encoding);
    match encoding {
        Encoding::MsgPack => Frame::Binary(bytes.into()),
        Encoding::Json => Frame::Text(ByteString::from(
            String::from_utf8(bytes).unwrap_or_default(),
        )),
    }
}

/// Holds this node's NATS subscription for one channel until told to stop.
async fn run_relay(
    hub: Arc<Hub>,
    channel: ChannelName,
    generation: u64,
    mut stop: oneshot::Receiver<()>,
) {
    let mut subscription = match hub.bus.subscribe(subject::deliver(&channel)).await {
        Ok(subscription) => subscription,
        Err(error) => {
            if let Some(suppressed) = RELAY_ERRORS.allow() {
                tracing::error!(%channel, %error, suppressed, "cannot subscribe to a channel's deliveries");
            }
            return;
        }
    };
    // The subscription must be registered with the server before anyone asks
    // broadcast for a position, or a publication could fall between the two:
    // a round trip through the server, not just a socket flush.
    if let Err(error) = hub.bus.sync().await {
        if let Some(suppressed) = RELAY_ERRORS.allow() {
            tracing::error!(%channel, %error, suppressed, "channel subscription not confirmed");
        }
        return;
    }
    hub.relay_started(&channel, generation);
    let mut arrivals = Vec::with_capacity(RELAY_BATCH);
    loop {
        tokio::select! {
            _ = &mut stop => break,
            message = subscription.next() => {
                let Some(message) = message else { break };
                arrivals.push(message);
                // The workers first write what was handed to them before;
                // what arrives meanwhile, and what else already waits in the
                // subscription, goes out with this message: a node that fell
                // behind catches up in runs.
                hub.wait_for_workers(&channel).await;
                let mut ended = false;
                while arrivals.len() < RELAY_BATCH {
                    match subscription.next().now_or_never() {
                        Some(Some(message)) => arrivals.push(message),
                        Some(None) => {
                            ended = true;
                            break;
                        }
                        None => break,
                    }
                }
                take_arrivals(&hub, &channel, generation, arrivals.drain(..));
                if ended {
                    break;
                }
            }
        }
    }
}

/// Hands what arrived on a channel's subscription to the hub, in order:
/// publications in runs, presence changes between them.
fn take_arrivals(
    hub: &Arc<Hub>,
    channel: &ChannelName,
    generation: u64,
    messages: impl Iterator<Item = async_nats::Message>,
) {
    let mut run: Vec<Publication> = Vec::new();
    let mut origins: Vec<TraceContext> = Vec::new();
    let flush_run = |run: &mut Vec<Publication>, origins: &mut Vec<TraceContext>| {
        let Some(first) = run.first() else { return };
        // One span per run, linked to each publication's trace.
        let span = tracing::info_span!(
            "gateway.fanout",
            channel = %channel,
            offset = first.offset,
            publications = run.len()
        );
        for origin in origins.drain(..) {
            add_link(&span, &origin);
        }
        span.in_scope(|| hub.fan_out(channel, generation, std::mem::take(run)));
    };
    for message in messages {
        if is_presence_event(&message) {
            flush_run(&mut run, &mut origins);
            match rt_proto::internal::from_msgpack::<PresenceChange>(&message.payload) {
                Ok(change) => hub.fan_out_presence(channel, generation, &change),
                Err(error) => {
                    if let Some(suppressed) = RELAY_ERRORS.allow() {
                        tracing::error!(%channel, %error, suppressed, "undecodable presence change");
                    }
                }
            }
            continue;
        }
        match rt_proto::internal::from_msgpack::<Publication>(&message.payload) {
            Ok(publication) => {
                if let Some(origin) = TraceContext::from_nats_headers(message.headers.as_ref()) {
                    origins.push(origin);
                }
                run.push(publication);
            }
            Err(error) => {
                if let Some(suppressed) = RELAY_ERRORS.allow() {
                    tracing::error!(%channel, %error, suppressed, "undecodable delivery");
                }
            }
        }
    }
    flush_run(&mut run, &mut origins);
}

fn is_presence_event(message: &async_nats::Message) -> bool {
    message
        .headers
        .as_ref()
        .and_then(|h| h.get(session::EVENT_HEADER))
        .is_some_and(|v| v.as_str() == session::EVENT_PRESENCE)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outbound::{OutboundStream, Outgoing, test_queue as queue};
    use rt_shared::config::NatsConfig;
    use rt_shared::health::Health;
    use rt_shared::metrics::{CommonMetrics, MetricsRegistry};

    /// A hub whose NATS never answers: these tests drive it by hand.
    async fn hub() -> (Arc<Hub>, GatewayMetrics) {
        let registry = MetricsRegistry::default();
        let config = NatsConfig {
            url: "nats://127.0.0.1:1".into(),
            request_timeout_ms: 60_000,
            ..NatsConfig::default()
        };
        let bus = Bus::connect(
            &config,
            "test",
            Health::default(),
            CommonMetrics::new(&registry),
        )
        .await
        .expect("connects in the background");
        let metrics = GatewayMetrics::new(&registry);
        (Hub::new(bus, metrics.clone(), 100), metrics)
    }

    fn publication(epoch: &str, offset: u64) -> Publication {
        Publication {
            channel: "chat:a".into(),
            offset,
            epoch: epoch.into(),
            ts: now_ms(),
            data: bytes::Bytes::from_static(&[0xc0]),
            info: None,
        }
    }

    fn pos(epoch: &str, offset: u64) -> StreamPosition {
        StreamPosition {
            offset,
            epoch: epoch.into(),
        }
    }

    fn generation(hub: &Hub, channel: &ChannelName) -> u64 {
        hub.shard(channel.as_str())
            .and_then(|shard| shard.get(channel.as_str()).map(|e| e.generation))
            .expect("the channel is registered")
    }

    fn repair_id(hub: &Hub, channel: &ChannelName) -> Option<u64> {
        hub.shard(channel.as_str()).and_then(|shard| {
            shard
                .get(channel.as_str())
                .and_then(|e| e.repair.as_ref().map(|r| r.id))
        })
    }

    /// What the queue holds: publication offsets, and `lost` for an end.
    fn written(q: &Arc<Outbound>) -> Vec<String> {
        let mut out = Vec::new();
        let waker = std::task::Waker::noop();
        let mut cx = std::task::Context::from_waker(waker);
        let mut stream = OutboundStream(q.clone());
        while let std::task::Poll::Ready(Some(item)) =
            std::pin::Pin::new(&mut stream).poll_next(&mut cx)
        {
            let frame = match item {
                Outgoing::Frame(Frame::Binary(bytes)) => bytes,
                Outgoing::Lost { token, .. } => {
                    out.push(format!("lost {token}"));
                    continue;
                }
                other => panic!("unexpected {other:?}"),
            };
            let value = rmpv::decode::read_value(&mut &frame[..]).expect("MessagePack");
            let json = rt_proto::value::to_json_lossy(&value);
            out.push(json["offset"].to_string());
        }
        out
    }

    use futures_util::Stream as _;

    #[actix_rt::test]
    async fn subscribers_get_each_offset_once_and_a_new_epoch_ends_them() {
        let (hub, metrics) = hub().await;
        let channel = ChannelName::parse("chat:a").expect("channel");
        let q = queue();
        hub.add_pending(
            &channel,
            1,
            q.clone(),
            Encoding::MsgPack,
            7,
            SlowConsumerPolicy::Disconnect,
        )
        .expect("added");
        let generation = generation(&hub, &channel);
        // Arrived while subscribing; 5 is covered by the reply.
        hub.fan_out(&channel, generation, vec![publication("e1", 5)]);
        hub.fan_out(&channel, generation, vec![publication("e1", 6)]);
        hub.activate(&channel, 1, None, pos("e1", 5))
            .expect("activated");
        // Late duplicates are skipped; the next one goes out.
        hub.fan_out(&channel, generation, vec![publication("e1", 6)]);
        hub.fan_out(&channel, generation, vec![publication("e1", 7)]);
        assert_eq!(written(&q), vec!["6", "7"]);
        // A new epoch under the subscription: it ends with 112.
        hub.fan_out(&channel, generation, vec![publication("e2", 1)]);
        assert_eq!(written(&q), vec!["lost 7"]);
        assert_eq!(metrics.resubscribe_requests.get(), 1);
        assert_eq!(metrics.subscriptions.get(), 0);
        assert!(!hub.has_channel(&channel), "its last subscriber is gone");
    }

    #[actix_rt::test]
    async fn a_gap_holds_newer_arrivals_until_history_fills_it() {
        let (hub, metrics) = hub().await;
        let channel = ChannelName::parse("chat:a").expect("channel");
        let (q1, q2) = (queue(), queue());
        let policies = [
            (1, &q1, SlowConsumerPolicy::Conflate),
            (2, &q2, SlowConsumerPolicy::Disconnect),
        ];
        for (conn, q, policy) in policies {
            hub.add_pending(&channel, conn, q.clone(), Encoding::MsgPack, conn, policy)
                .expect("added");
            hub.activate(&channel, conn, None, pos("e1", 4))
                .expect("activated");
        }
        let generation = generation(&hub, &channel);
        hub.fan_out(&channel, generation, vec![publication("e1", 7)]);
        hub.fan_out(&channel, generation, vec![publication("e1", 8)]);
        assert!(written(&q1).is_empty(), "held while the gap is filled");
        let id = repair_id(&hub, &channel).expect("repairing");
        let reply = RecoverReply {
            offset: 7,
            epoch: "e1".into(),
            recovered: true,
            pubs: (5..=7).map(|o| publication("e1", o)).collect(),
        };
        hub.finish_repair(&channel, generation, id, Ok(reply));
        // In order after the gap; the conflating subscriber (not reading
        // meanwhile) has only the newest waiting.
        assert_eq!(written(&q1), vec!["8"]);
        assert_eq!(written(&q2), vec!["5", "6", "7", "8"]);
        assert_eq!(metrics.gaps_filled.get(), 1);
        assert_eq!(metrics.refilled_publications.get(), 3);

        // A gap broadcast cannot fill: whoever is behind gets 112.
        hub.fan_out(&channel, generation, vec![publication("e1", 12)]);
        let id = repair_id(&hub, &channel).expect("repairing");
        let reply = RecoverReply {
            offset: 12,
            epoch: "e1".into(),
            recovered: false,
            pubs: Vec::new(),
        };
        hub.finish_repair(&channel, generation, id, Ok(reply));
        assert_eq!(written(&q1), vec!["lost 1"]);
        assert_eq!(written(&q2), vec!["lost 2"]);
        assert_eq!(metrics.gap_repairs_failed.get(), 1);
        assert_eq!(metrics.resubscribe_requests.get(), 2);
    }

    #[actix_rt::test]
    async fn a_run_is_delivered_in_order_up_to_a_gap_and_the_rest_waits_for_the_repair() {
        let (hub, metrics) = hub().await;
        let channel = ChannelName::parse("chat:a").expect("channel");
        let (q1, q2) = (queue(), queue());
        for (conn, q) in [(1, &q1), (2, &q2)] {
            hub.add_pending(
                &channel,
                conn,
                q.clone(),
                Encoding::MsgPack,
                conn,
                SlowConsumerPolicy::Disconnect,
            )
            .expect("added");
        }
        hub.activate(&channel, 1, None, pos("e1", 4))
            .expect("activated");
        hub.activate(&channel, 2, None, pos("e1", 5))
            .expect("activated");
        let generation = generation(&hub, &channel);
        // Arrived together: 5 and 6 go out at once (5 only to whoever lacks
        // it), 8 shows 7 is missing, so 8 and 9 wait for the repair.
        let run = [5, 6, 8, 9].map(|o| publication("e1", o)).to_vec();
        hub.fan_out(&channel, generation, run);
        assert_eq!(written(&q1), vec!["5", "6"]);
        assert_eq!(written(&q2), vec!["6"]);
        assert_eq!(metrics.delivery_gaps.get(), 1);
        let id = repair_id(&hub, &channel).expect("repairing");
        let reply = RecoverReply {
            offset: 7,
            epoch: "e1".into(),
            recovered: true,
            pubs: vec![publication("e1", 7)],
        };
        hub.finish_repair(&channel, generation, id, Ok(reply));
        assert_eq!(written(&q1), vec!["7", "8", "9"]);
        assert_eq!(written(&q2), vec!["7", "8", "9"]);
        // A new epoch inside a run ends the subscriptions after what they could take.
        let run = vec![publication("e1", 10), publication("e2", 1)];
        hub.fan_out(&channel, generation, run);
        assert_eq!(written(&q1), vec!["10", "lost 1"]);
        assert_eq!(written(&q2), vec!["10", "lost 2"]);
        assert!(!hub.has_channel(&channel));
    }

    #[actix_rt::test]
    async fn too_many_arrivals_during_a_repair_abandon_it() {
        let (hub, metrics) = hub().await;
        let channel = ChannelName::parse("chat:a").expect("channel");
        let q = queue();
        hub.add_pending(
            &channel,
            1,
            q.clone(),
            Encoding::MsgPack,
            3,
            SlowConsumerPolicy::Auto,
        )
        .expect("added");
        hub.activate(&channel, 1, None, pos("e1", 0))
            .expect("activated");
        let generation = generation(&hub, &channel);
        // The hub holds 100 at most (its max_pending).
        for offset in 2..=102 {
            hub.fan_out(&channel, generation, vec![publication("e1", offset)]);
        }
        assert_eq!(written(&q), vec!["lost 3"]);
        assert_eq!(repair_id(&hub, &channel), None);
        assert_eq!(metrics.gap_repairs_failed.get(), 1);
    }

    #[actix_rt::test]
    async fn another_workers_subscriber_gets_its_publications_from_its_worker_and_none_after_it_unsubscribed()
     {
        use std::sync::mpsc;
        let (hub, _) = hub().await;
        let channel = ChannelName::parse("chat:a").expect("channel");
        let (q_here, q_there) = (queue(), queue());
        hub.add_pending(
            &channel,
            1,
            q_here.clone(),
            Encoding::MsgPack,
            1,
            SlowConsumerPolicy::Disconnect,
        )
        .expect("added");
        hub.activate(&channel, 1, None, pos("e1", 0))
            .expect("activated");
        let (to_worker, steps) = mpsc::channel::<()>();
        let (done, from_worker) = mpsc::channel::<()>();
        let worker = {
            let (hub, channel, q) = (hub.clone(), channel.clone(), q_there.clone());
            std::thread::spawn(move || {
                actix_rt::System::new().block_on(async move {
                    let wait = || steps.recv_timeout(Duration::from_secs(10)).expect("step");
                    hub.add_pending(
                        &channel,
                        2,
                        q,
                        Encoding::MsgPack,
                        2,
                        SlowConsumerPolicy::Disconnect,
                    )
                    .expect("added");
                    hub.activate(&channel, 2, None, pos("e1", 0))
                        .expect("activated");
                    done.send(()).expect("main waits");
                    // This worker is busy while the fan-out runs elsewhere.
                    wait();
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    done.send(()).expect("main waits");
                    // An unsubscribe handled before the worker got to what
                    // was handed to it.
                    wait();
                    hub.remove(channel.as_str(), 2);
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    done.send(()).expect("main waits");
                });
            })
        };
        let wait = || {
            from_worker
                .recv_timeout(Duration::from_secs(10))
                .expect("the worker goes on")
        };
        wait();
        let generation = generation(&hub, &channel);
        hub.fan_out(&channel, generation, vec![publication("e1", 1)]);
        hub.fan_out(&channel, generation, vec![publication("e1", 2)]);
        // This thread's subscriber at once, the other's only by its worker.
        assert_eq!(written(&q_here), vec!["1", "2"]);
        assert!(written(&q_there).is_empty());
        to_worker.send(()).expect("worker waits");
        wait();
        assert_eq!(written(&q_there), vec!["1", "2"]);

        hub.fan_out(&channel, generation, vec![publication("e1", 3)]);
        to_worker.send(()).expect("worker waits");
        wait();
        assert_eq!(written(&q_here), vec!["3"]);
        assert!(
            written(&q_there).is_empty(),
            "nothing follows the unsubscribe"
        );
        worker.join().expect("worker ends");
    }
}
