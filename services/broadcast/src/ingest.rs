//! The ingest actor: reads every broadcast subject off NATS, validates, and
//! routes each request to the shard that owns its channel.
//!
//! It is the only reader of the subscriptions, so requests for one channel
//! reach their shard in the order NATS delivered them.
//!
//! Subjects:
//! - `rt.bc.p.<partition>.<op>.<channel>` (gateways): subscribed only for the
//!   partitions this instance holds ([`AddPartition`], [`RemovePartition`]).
//! - `rt.publish.<channel>` (any service) and the older unpartitioned
//!   `rt.bc.{publish,history,recover}.<channel>`: every instance subscribes
//!   (no queue group, so one publisher's order is kept); only the owner of
//!   the channel's partition acts, the others ignore the message. A subject
//!   without a valid channel is answered by the owner of partition 0.

use std::collections::HashMap;
use std::hash::{BuildHasher, BuildHasherDefault, DefaultHasher};
use std::sync::Arc;
use std::time::Instant;

use actix::prelude::*;
use async_nats::{Message as NatsMessage, Subscriber};
use bytes::Bytes;
use rt_proto::internal::{
    self, BusResult, HistoryRequest, PublishRequest, RecoverRequest, WireError,
};
use rt_proto::subject::BroadcastOp;
use rt_proto::{ChannelName, ErrorCode, subject, value};
use rt_shared::Bus;
use rt_shared::config::Config;
use rt_shared::telemetry::RateLimitedLog;
use rt_shared::trace_context::TraceContext;

use crate::metrics::BroadcastMetrics;
use crate::partitions::Ownership;
use crate::shard::{Incoming, IncomingKind, Shard};

static REFUSALS: RateLimitedLog = RateLimitedLog::new(5_000);

/// Public publish header: the body is JSON instead of MessagePack.
const CONTENT_TYPE: &str = "Content-Type";
/// Public publish header: answer in JSON.
const ACCEPT: &str = "Accept";
/// Public publish header: idempotency key.
const IDEMPOTENCY_KEY: &str = "Rt-Idempotency-Key";
const JSON: &str = "application/json";

pub struct Ingest {
    bus: Bus,
    config: Arc<Config>,
    metrics: BroadcastMetrics,
    shards: Vec<Addr<Shard>>,
    ownership: Arc<Ownership>,
    partitions: HashMap<u32, SpawnHandle>,
}

/// Start reading a partition's subjects (its lease was taken).
pub struct AddPartition {
    pub partition: u32,
    pub subscription: Subscriber,
}

impl Message for AddPartition {
    type Result = ();
}

/// Stop reading a partition's subjects (dropping the subscription unsubscribes).
pub struct RemovePartition(pub u32);

impl Message for RemovePartition {
    type Result = ();
}

/// Stops the actor, which drops (and so unsubscribes) its subscriptions.
pub struct Stop;

impl Message for Stop {
    type Result = ();
}

impl Ingest {
    pub fn new(
        bus: Bus,
        config: Arc<Config>,
        metrics: BroadcastMetrics,
        shards: Vec<Addr<Shard>>,
        ownership: Arc<Ownership>,
    ) -> Self {
        Self {
            bus,
            config,
            metrics,
            shards,
            ownership,
            partitions: HashMap::new(),
        }
    }

    fn shard_for(&self, channel: &ChannelName) -> Option<&Addr<Shard>> {
        let hash = BuildHasherDefault::<DefaultHasher>::default().hash_one(channel.as_str());
        let index = usize::try_from(hash % self.shards.len().max(1) as u64).unwrap_or(0);
        self.shards.get(index)
    }

    fn route(&self, message: NatsMessage) -> Result<(), (ErrorCode, String)> {
        let subject = message.subject.as_str();
        let headers = message.headers.as_ref();
        let header = |name: &str| {
            headers
                .and_then(|h| h.get(name))
                .map(|v| v.as_str().to_owned())
        };
        let reply_json = header(ACCEPT).is_some_and(|v| v.starts_with(JSON));
        let (kind, channel, addressed) = if subject.starts_with(subject::PARTITION_PREFIX) {
            let (_, op, channel) = subject::parse_broadcast_request(subject)
                .map_err(|e| (ErrorCode::BAD_REQUEST, e.to_string()))?;
            let kind = match op {
                BroadcastOp::Publish => Kind::Publish,
                BroadcastOp::History => Kind::History,
                BroadcastOp::Recover => Kind::Recover,
            };
            (kind, channel, true)
        } else {
            let (prefix, kind) = if subject.starts_with(subject::PUBLISH_PREFIX) {
                (subject::PUBLISH_PREFIX, Kind::PublicPublish)
            } else if subject.starts_with(subject::INTERNAL_PUBLISH_PREFIX) {
                (subject::INTERNAL_PUBLISH_PREFIX, Kind::Publish)
            } else if subject.starts_with(subject::HISTORY_PREFIX) {
                (subject::HISTORY_PREFIX, Kind::History)
            } else if subject.starts_with(subject::RECOVER_PREFIX) {
                (subject::RECOVER_PREFIX, Kind::Recover)
            } else {
                return Err((
                    ErrorCode::BAD_REQUEST,
                    format!("unexpected subject {subject}"),
                ));
            };
            match subject::parse_channel(prefix, subject) {
                Ok(channel) => (kind, channel, false),
                // Every instance sees it; one answers.
                Err(_) if !self.ownership.owns(0) => return Ok(()),
                Err(e) => return Err((ErrorCode::BAD_REQUEST, e.to_string())),
            }
        };
        if !self.ownership.owns(subject::partition(&channel)) {
            return if addressed {
                // Arrived just as the partition moved away: the caller retries.
                Err((
                    ErrorCode::BUSY,
                    "the channel's partition is moving to another instance, retry".to_owned(),
                ))
            } else {
                // Another instance owns it and answers.
                Ok(())
            };
        }
        if self.config.namespace(&channel).is_none() {
            return Err((
                ErrorCode::UNKNOWN_CHANNEL,
                format!("unknown namespace in {channel}"),
            ));
        }
        let max = self.config.broadcast.max_data_bytes;
        let kind = match kind {
            Kind::PublicPublish => {
                let is_json = header(CONTENT_TYPE).is_some_and(|v| v.starts_with(JSON));
                let data = public_data(&message.payload, is_json)?;
                check_size(&data, max)?;
                IncomingKind::Publish {
                    data,
                    info: None,
                    idempotency_key: header(IDEMPOTENCY_KEY).filter(|k| !k.is_empty()),
                }
            }
            Kind::Publish => {
                let request: PublishRequest = decode(&message.payload)?;
                check_size(&request.data, max)?;
                IncomingKind::Publish {
                    data: request.data,
                    info: request.info,
                    idempotency_key: request.idempotency_key,
                }
            }
            Kind::History => IncomingKind::History(decode::<HistoryRequest>(&message.payload)?),
            Kind::Recover => IncomingKind::Recover(decode::<RecoverRequest>(&message.payload)?),
        };
        let incoming = Incoming {
            channel,
            kind,
            reply: message.reply.clone(),
            reply_json,
            trace: TraceContext::from_nats_headers(headers),
            received: Instant::now(),
        };
        let shard = self
            .shard_for(&incoming.channel)
            .ok_or((ErrorCode::INTERNAL, "no shard".to_owned()))?;
        shard.try_send(incoming).map_err(|e| match e {
            SendError::Full(_) => (ErrorCode::BUSY, "broadcast is busy, retry later".to_owned()),
            SendError::Closed(_) => (ErrorCode::INTERNAL, "shard stopped".to_owned()),
        })
    }

    fn refuse(&self, message: &NatsMessage, code: ErrorCode, reason: String) {
        self.metrics.error(code);
        if let Some(suppressed) = REFUSALS.allow() {
            tracing::warn!(subject = %message.subject, code = code.0, %reason, suppressed, "request refused");
        }
        let Some(reply) = &message.reply else { return };
        let json = message
            .headers
            .as_ref()
            .and_then(|h| h.get(ACCEPT))
            .is_some_and(|v| v.as_str().starts_with(JSON));
        let mut error = WireError::new(code, reason);
        if code == ErrorCode::BUSY {
            error = error.with_retry_after(500);
        }
        let result = BusResult::<()>::Err { error };
        let payload = if json {
            serde_json::to_vec(&result).unwrap_or_default()
        } else {
            internal::to_msgpack(&result).unwrap_or_default()
        };
        // If even the reply cannot be queued, the caller times out (114).
        let _ = self
            .bus
            .publish(reply.to_string(), Default::default(), Bytes::from(payload));
    }
}

enum Kind {
    PublicPublish,
    Publish,
    History,
    Recover,
}

fn decode<T: serde::de::DeserializeOwned>(payload: &[u8]) -> Result<T, (ErrorCode, String)> {
    internal::from_msgpack(payload)
        .map_err(|e| (ErrorCode::BAD_REQUEST, format!("malformed request: {e}")))
}

/// The data of a public publish: exactly one MessagePack value, or JSON
/// converted to MessagePack.
fn public_data(payload: &Bytes, is_json: bool) -> Result<Bytes, (ErrorCode, String)> {
    if is_json {
        let json: serde_json::Value = serde_json::from_slice(payload).map_err(|e| {
            (
                ErrorCode::BAD_REQUEST,
                format!("body is not valid JSON: {e}"),
            )
        })?;
        return Ok(Bytes::from(value::encode(&value::from_json(&json))));
    }
    value::decode_one(payload).map_err(|e| {
        (
            ErrorCode::BAD_REQUEST,
            format!("body is not one MessagePack value: {e}"),
        )
    })?;
    Ok(payload.clone())
}

fn check_size(data: &Bytes, max: usize) -> Result<(), (ErrorCode, String)> {
    if data.len() > max {
        Err((
            ErrorCode::LIMIT_EXCEEDED,
            format!("data is {} bytes, the limit is {max}", data.len()),
        ))
    } else {
        Ok(())
    }
}

impl Actor for Ingest {
    type Context = Context<Self>;
}

impl StreamHandler<NatsMessage> for Ingest {
    fn handle(&mut self, message: NatsMessage, _: &mut Self::Context) {
        if let Err((code, reason)) = self.route(message.clone()) {
            self.refuse(&message, code, reason);
        }
    }

    // One subscription ending (shutdown) must not stop the others.
    fn finished(&mut self, _: &mut Self::Context) {}
}

impl Handler<AddPartition> for Ingest {
    type Result = ();

    fn handle(&mut self, msg: AddPartition, ctx: &mut Self::Context) {
        let handle = ctx.add_stream(msg.subscription);
        if let Some(old) = self.partitions.insert(msg.partition, handle) {
            ctx.cancel_future(old);
        }
    }
}

impl Handler<RemovePartition> for Ingest {
    type Result = ();

    fn handle(&mut self, msg: RemovePartition, ctx: &mut Self::Context) {
        if let Some(handle) = self.partitions.remove(&msg.0) {
            ctx.cancel_future(handle);
        }
    }
}

impl Handler<Stop> for Ingest {
    type Result = ();

    fn handle(&mut self, _: Stop, ctx: &mut Self::Context) {
        ctx.stop();
    }
}
