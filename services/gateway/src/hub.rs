//! The gateway's channel registry and local fan-out.
//!
//! - ONE NATS subscription per channel per gateway process, however many
//!   local subscribers: a relay task subscribes on the first and unsubscribes
//!   after the last.
//! - Each publication is decoded once and encoded at most once per wire
//!   encoding; every local subscriber gets a clone of the same bytes.
//! - The registry is sharded by channel so one hot channel does not serialize
//!   the node.
//! - A subscriber whose `subscribe` is still being answered is *pending*: live
//!   publications are buffered for it (bounded) and replayed after the reply,
//!   skipping what the reply already covers, so the switch-over from recovery
//!   to live has no gap and no duplicate.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::hash::{BuildHasher, BuildHasherDefault, DefaultHasher};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};

use bytestring::ByteString;
use futures_util::StreamExt as _;
use rt_proto::internal::Publication;
use rt_proto::session::{self, PresenceChange};
use rt_proto::{ChannelName, CloseCode, Encoding, outbound, subject};
use rt_shared::Bus;
use rt_shared::telemetry::{RateLimitedLog, add_link, now_ms};
use rt_shared::trace_context::TraceContext;
use tokio::sync::oneshot;

use crate::metrics::GatewayMetrics;
use crate::outbound::{Frame, Outbound, Push};

const SHARDS: usize = 64;

static RELAY_ERRORS: RateLimitedLog = RateLimitedLog::new(5_000);

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
    Live,
}

struct LocalSub {
    outbound: Arc<Outbound>,
    encoding: Encoding,
    state: SubState,
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
    /// The last delivered (epoch, offset), to spot gaps.
    last: Option<(String, u64)>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HubError {
    #[error("already subscribed")]
    AlreadySubscribed,
    #[error("the subscription ended before it was ready")]
    Gone,
}

pub struct Hub {
    shards: Vec<Mutex<HashMap<String, ChannelEntry>>>,
    bus: Bus,
    metrics: GatewayMetrics,
    max_pending: usize,
    next_generation: std::sync::atomic::AtomicU64,
}

impl Hub {
    pub fn new(bus: Bus, metrics: GatewayMetrics, max_pending: usize) -> Arc<Self> {
        Arc::new(Self {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            bus,
            metrics,
            max_pending,
            next_generation: std::sync::atomic::AtomicU64::new(1),
        })
    }

    fn shard(&self, channel: &str) -> Option<MutexGuard<'_, HashMap<String, ChannelEntry>>> {
        let hash = BuildHasherDefault::<DefaultHasher>::default().hash_one(channel);
        let index = usize::try_from(hash % SHARDS as u64).unwrap_or(0);
        self.shards.get(index).and_then(|m| m.lock().ok())
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

    /// Registers a pending subscriber. The returned receiver resolves once this
    /// node's NATS subscription for the channel is in place (at once if it already is);
    /// only then may the caller ask broadcast for the position.
    pub fn add_pending(
        self: &Arc<Self>,
        channel: &ChannelName,
        conn: ConnId,
        outbound: Arc<Outbound>,
        encoding: Encoding,
    ) -> Result<oneshot::Receiver<()>, HubError> {
        let (ready_tx, ready_rx) = oneshot::channel();
        let mut shard = self.shard(channel.as_str()).ok_or(HubError::Gone)?;
        let entry = match shard.entry(channel.as_str().to_owned()) {
            Entry::Occupied(e) => e.into_mut(),
            Entry::Vacant(v) => {
                let generation = self
                    .next_generation
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
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
                encoding,
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

    /// Makes a pending subscriber live: queues `reply` (the subscribe answer),
    /// then what arrived meanwhile with an offset above `covered`, in order.
    pub fn activate(
        &self,
        channel: &ChannelName,
        conn: ConnId,
        reply: Option<Frame>,
        covered: u64,
    ) -> Result<(), HubError> {
        let mut shard = self.shard(channel.as_str()).ok_or(HubError::Gone)?;
        let sub = shard
            .get_mut(channel.as_str())
            .and_then(|e| e.subscribers.get_mut(&conn))
            .ok_or(HubError::Gone)?;
        let SubState::Pending(buffered) = std::mem::replace(&mut sub.state, SubState::Live) else {
            return Err(HubError::Gone);
        };
        if let Some(reply) = reply
            && sub.outbound.push(reply) == Push::Overflowed
        {
            self.metrics.slow_consumers.inc();
            return Ok(());
        }
        for publication in buffered.iter().filter(|p| p.publication.offset > covered) {
            if sub.outbound.push(publication.frame(sub.encoding)) == Push::Overflowed {
                self.metrics.slow_consumers.inc();
                break;
            }
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
        if entry.subscribers.remove(&conn).is_some() {
            self.metrics.subscriptions.dec();
        }
        if entry.subscribers.is_empty() {
            if let Some(stop) = entry.stop_relay.take() {
                let _ = stop.send(());
            }
            shard.remove(channel);
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

    /// Hands one publication to every local subscriber of its channel.
    fn fan_out(&self, channel: &ChannelName, generation: u64, publication: Publication) {
        let encoded = Arc::new(EncodedPub::new(publication));
        let Some(mut shard) = self.shard(channel.as_str()) else {
            return;
        };
        let Some(entry) = shard.get_mut(channel.as_str()) else {
            return;
        };
        if entry.generation != generation {
            return;
        }
        let p = &encoded.publication;
        if let Some((epoch, last)) = &entry.last
            && *epoch == p.epoch
            && p.offset != last + 1
            && p.offset > *last
        {
            self.metrics.delivery_gaps.inc();
        }
        entry.last = Some((p.epoch.clone(), p.offset));
        self.metrics
            .publish_to_deliver
            .observe(now_ms().saturating_sub(p.ts) as f64 / 1000.0);
        for sub in entry.subscribers.values_mut() {
            match &mut sub.state {
                SubState::Live => {
                    if sub.outbound.push(encoded.frame(sub.encoding)) == Push::Overflowed {
                        self.metrics.slow_consumers.inc();
                    }
                }
                SubState::Pending(buffered) => {
                    if buffered.len() < self.max_pending {
                        buffered.push(encoded.clone());
                    } else {
                        buffered.clear();
                        sub.outbound.fail(CloseCode::SLOW_CONSUMER, "slow consumer");
                        self.metrics.slow_consumers.inc();
                    }
                }
            }
        }
    }
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
        for sub in entry.subscribers.values_mut() {
            if !matches!(sub.state, SubState::Live) {
                continue;
            }
            let frame = frames[sub.encoding.index()]
                .get_or_insert_with(|| encode_batch(&messages, sub.encoding))
                .clone();
            if sub.outbound.push(frame) == Push::Overflowed {
                self.metrics.slow_consumers.inc();
            }
        }
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
    loop {
        tokio::select! {
            _ = &mut stop => break,
            message = subscription.next() => {
                let Some(message) = message else { break };
                if is_presence_event(&message) {
                    match rt_proto::internal::from_msgpack::<PresenceChange>(&message.payload) {
                        Ok(change) => hub.fan_out_presence(&channel, generation, &change),
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
                        // One span per fan-out, linked to the publication's trace.
                        let span = tracing::info_span!("gateway.fanout", channel = %channel, offset = publication.offset);
                        if let Some(origin) = TraceContext::from_nats_headers(message.headers.as_ref()) {
                            add_link(&span, &origin);
                        }
                        span.in_scope(|| hub.fan_out(&channel, generation, publication));
                    }
                    Err(error) => {
                        if let Some(suppressed) = RELAY_ERRORS.allow() {
                            tracing::error!(%channel, %error, suppressed, "undecodable delivery");
                        }
                    }
                }
            }
        }
    }
}

fn is_presence_event(message: &async_nats::Message) -> bool {
    message
        .headers
        .as_ref()
        .and_then(|h| h.get(session::EVENT_HEADER))
        .is_some_and(|v| v.as_str() == session::EVENT_PRESENCE)
}
