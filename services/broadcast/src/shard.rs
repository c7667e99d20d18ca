//! A sequencer shard: the single owner of a slice of the channels.
//!
//! Channels are spread over shards by hash, so one channel's publications are
//! always sequenced by one actor, in the order the ingest actor received them,
//! while different channels sequence in parallel on other threads.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use async_nats::Subject;
use bytes::Bytes;
use rt_proto::internal::{BusResult, HistoryRequest, PubInfo, RecoverRequest, WireError};
use rt_proto::{ChannelName, ErrorCode, subject};
use rt_shared::Bus;
use rt_shared::bus::headers_with;
use rt_shared::config::{Config, NamespaceConfig};
use rt_shared::telemetry::{RateLimitedLog, current_context, now_ms, set_remote_parent};
use rt_shared::trace_context::TraceContext;
use serde::Serialize;

use crate::history::{ChannelState, Limits};
use crate::metrics::{BroadcastMetrics, RecoveredLabel};

const SWEEP_INTERVAL: Duration = Duration::from_secs(10);

static ENCODE_ERRORS: RateLimitedLog = RateLimitedLog::new(5_000);

/// A request routed to the shard owning `channel`.
pub struct Incoming {
    pub channel: ChannelName,
    pub kind: IncomingKind,
    pub reply: Option<Subject>,
    /// Answer in JSON (the public publish subject with `Accept: application/json`).
    pub reply_json: bool,
    pub trace: Option<TraceContext>,
    pub received: Instant,
}

pub enum IncomingKind {
    Publish {
        data: Bytes,
        info: Option<PubInfo>,
        idempotency_key: Option<String>,
    },
    History(HistoryRequest),
    Recover(RecoverRequest),
}

impl Message for Incoming {
    type Result = ();
}

pub struct Shard {
    bus: Bus,
    config: Arc<Config>,
    metrics: BroadcastMetrics,
    channels: HashMap<String, ChannelState>,
}

impl Shard {
    pub fn new(bus: Bus, config: Arc<Config>, metrics: BroadcastMetrics) -> Self {
        Self {
            bus,
            config,
            metrics,
            channels: HashMap::new(),
        }
    }

    fn limits(&self, namespace: &NamespaceConfig) -> Limits {
        Limits {
            size: namespace.history_size,
            ttl: Duration::from_secs(namespace.history_ttl_secs),
            idempotency_window: Duration::from_secs(self.config.broadcast.idempotency_window_secs),
        }
    }

    fn state(&mut self, channel: &ChannelName, now: Instant) -> &mut ChannelState {
        let metrics = &self.metrics;
        self.channels
            .entry(channel.as_str().to_owned())
            .or_insert_with(|| {
                metrics.channels.inc();
                ChannelState::new(channel.as_str().to_owned(), now)
            })
    }

    fn sweep(&mut self) {
        let now = Instant::now();
        let idle = Duration::from_secs(self.config.broadcast.channel_idle_secs);
        let config = self.config.clone();
        let before = self.channels.len();
        let idempotency_window = Duration::from_secs(config.broadcast.idempotency_window_secs);
        self.channels.retain(|name, state| {
            let Ok(channel) = ChannelName::parse(name) else {
                return false;
            };
            if let Some(ns) = config.namespace(&channel) {
                state.expire(
                    now,
                    Limits {
                        size: ns.history_size,
                        ttl: Duration::from_secs(ns.history_ttl_secs),
                        idempotency_window,
                    },
                );
            }
            !(state.is_history_empty() && now.duration_since(state.last_activity()) >= idle)
        });
        let evicted = before - self.channels.len();
        self.metrics
            .channels
            .dec_by(i64::try_from(evicted).unwrap_or(i64::MAX));
    }

    fn reply<T: Serialize>(&self, reply: Option<Subject>, json: bool, result: BusResult<T>) {
        let Some(reply) = reply else { return };
        let encoded = if json {
            serde_json::to_vec(&result).map_err(|e| e.to_string())
        } else {
            rt_proto::internal::to_msgpack(&result).map_err(|e| e.to_string())
        };
        match encoded {
            // A full lane means the caller's request times out (114) and is counted.
            Ok(payload) => drop(self.bus.publish(
                reply.to_string(),
                Default::default(),
                Bytes::from(payload),
            )),
            Err(error) => {
                if let Some(suppressed) = ENCODE_ERRORS.allow() {
                    tracing::error!(%error, suppressed, "cannot encode a reply");
                }
            }
        }
    }

    fn publish(&mut self, msg: Incoming, data: Bytes, info: Option<PubInfo>, key: Option<String>) {
        let Some(namespace) = self.config.namespace(&msg.channel) else {
            return self.refuse(msg, ErrorCode::UNKNOWN_CHANNEL, "unknown namespace");
        };
        let limits = self.limits(namespace);
        // Room for the delivery and the ack is reserved before an offset is
        // taken, so a sequenced publication is never left undelivered.
        let mut reserved = match self.bus.try_reserve(1 + usize::from(msg.reply.is_some())) {
            Ok(reserved) => reserved,
            Err(_) => return self.refuse(msg, ErrorCode::BUSY, "broadcast is busy, retry later"),
        };
        let now = Instant::now();
        let state = self.state(&msg.channel, now);
        let sequenced = state.sequence(data, info, key, now_ms(), now, limits);
        let ack = ChannelState::ack(&sequenced.publication);
        if sequenced.fresh {
            match rt_proto::internal::to_msgpack(&sequenced.publication) {
                Ok(payload) => {
                    reserved.publish(
                        subject::deliver(&msg.channel),
                        headers_with(current_context().as_ref()),
                        Bytes::from(payload),
                    );
                }
                Err(error) => tracing::error!(%error, "cannot encode a publication"),
            }
            self.metrics.publications.inc();
        } else {
            self.metrics.duplicates.inc();
        }
        self.metrics
            .sequence_latency
            .observe(msg.received.elapsed().as_secs_f64());
        if let Some(reply) = msg.reply {
            let payload = if msg.reply_json {
                serde_json::to_vec(&ack).unwrap_or_default()
            } else {
                rt_proto::internal::to_msgpack(&ack).unwrap_or_default()
            };
            reserved.publish(reply.to_string(), Default::default(), Bytes::from(payload));
        }
    }

    fn refuse(&self, msg: Incoming, code: ErrorCode, message: &str) {
        self.metrics.error(code);
        self.reply::<()>(
            msg.reply,
            msg.reply_json,
            BusResult::Err {
                error: WireError::new(code, message),
            },
        );
    }
}

impl Actor for Shard {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.set_mailbox_capacity(self.config.broadcast.shard_mailbox);
        ctx.run_interval(SWEEP_INTERVAL, |shard, _| shard.sweep());
    }
}

impl Handler<Incoming> for Shard {
    type Result = ();

    fn handle(&mut self, mut msg: Incoming, _: &mut Self::Context) {
        let span = match &msg.kind {
            IncomingKind::Publish { .. } => {
                tracing::info_span!("broadcast.sequence", channel = %msg.channel)
            }
            IncomingKind::History(_) => {
                tracing::info_span!("broadcast.history", channel = %msg.channel)
            }
            IncomingKind::Recover(_) => {
                tracing::info_span!("broadcast.recover", channel = %msg.channel)
            }
        };
        if let Some(parent) = &msg.trace {
            set_remote_parent(&span, parent);
        }
        let _entered = span.enter();
        let kind = std::mem::replace(
            &mut msg.kind,
            IncomingKind::Recover(RecoverRequest { since: None }),
        );
        match kind {
            IncomingKind::Publish {
                data,
                info,
                idempotency_key,
            } => self.publish(msg, data, info, idempotency_key),
            IncomingKind::History(request) => {
                let Some(namespace) = self.config.namespace(&msg.channel) else {
                    return self.refuse(msg, ErrorCode::UNKNOWN_CHANNEL, "unknown namespace");
                };
                let limits = self.limits(namespace);
                let limit = request.limit.min(self.config.broadcast.history_max_limit) as usize;
                let now = Instant::now();
                let result = self.state(&msg.channel, now).history(
                    limit,
                    request.since.as_ref(),
                    request.reverse,
                    now,
                    limits,
                );
                self.metrics.history_queries.inc();
                self.reply(msg.reply, msg.reply_json, BusResult::from(result));
            }
            IncomingKind::Recover(request) => {
                let Some(namespace) = self.config.namespace(&msg.channel) else {
                    return self.refuse(msg, ErrorCode::UNKNOWN_CHANNEL, "unknown namespace");
                };
                let limits = self.limits(namespace);
                let now = Instant::now();
                let reply =
                    self.state(&msg.channel, now)
                        .recover(request.since.as_ref(), now, limits);
                if request.since.is_some() {
                    let recovered = if reply.recovered { "true" } else { "false" };
                    self.metrics
                        .recoveries
                        .get_or_create(&RecoveredLabel { recovered })
                        .inc();
                }
                self.reply(msg.reply, msg.reply_json, BusResult::Ok(reply));
            }
        }
    }
}
