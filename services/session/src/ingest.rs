//! The actor that reads the session subjects (queue group `rt.session`, so
//! instances share the load), bounds the work in progress and answers.
//!
//! Every request is handled as its own future, because most wait on NATS KV;
//! at most `session.queue_capacity` run at once. Past that a request is
//! answered 113 with a retry hint at once: shedding, not queueing without bound.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use actix::prelude::*;
use async_nats::Message as NatsMessage;
use bytes::Bytes;
use rt_proto::ErrorCode;
use rt_proto::internal::{BusResult, WireError};
use rt_proto::session::{self, RevokeRequest, SessionEvents};
use rt_shared::telemetry::{RateLimitedLog, set_remote_parent};
use rt_shared::trace_context::TraceContext;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tracing::Instrument as _;

use crate::core::Core;

static DECODE_ERRORS: RateLimitedLog = RateLimitedLog::new(5_000);

/// Base of the retry hint sent when shedding; jittered by as much again.
const SHED_RETRY_MS: u64 = 200;

pub struct Ingest {
    core: Arc<Core>,
    inflight: Arc<AtomicUsize>,
}

impl Ingest {
    pub fn new(core: Arc<Core>) -> Self {
        Self {
            core,
            inflight: Arc::new(AtomicUsize::new(0)),
        }
    }

    fn accept(&self, message: NatsMessage) {
        let subject = message.subject.as_str();
        // Revocations announced by other instances are not requests (the
        // KV watch brings them too; see `Core::revoked_elsewhere`).
        if subject == session::REVOKED {
            if let Some(request) = decode::<RevokeRequest>(&message.payload) {
                let core = self.core.clone();
                actix_rt::spawn(async move { core.revoked_elsewhere(request).await });
            }
            return;
        }
        let capacity = self.core.config.session.queue_capacity;
        // Event batches are never shed: each gateway bounds its own, and
        // dropping one would lose closes (and the counts they release).
        if subject != session::EVENTS && self.inflight.load(Ordering::Relaxed) >= capacity {
            self.core.metrics.shed.inc();
            let retry = SHED_RETRY_MS + fastrand::u64(0..=SHED_RETRY_MS);
            let error = WireError::new(ErrorCode::BUSY, "the session service is busy")
                .with_retry_after(retry);
            if let Some(reply) = &message.reply {
                answer::<()>(&self.core, reply.as_str(), Err(error));
            }
            return;
        }
        self.inflight.fetch_add(1, Ordering::Relaxed);
        self.core.metrics.inflight.inc();
        let core = self.core.clone();
        let inflight = self.inflight.clone();
        let span = tracing::info_span!("session.request", subject = %message.subject);
        if let Some(parent) = TraceContext::from_nats_headers(message.headers.as_ref()) {
            set_remote_parent(&span, &parent);
        }
        actix_rt::spawn(
            async move {
                let started = Instant::now();
                handle(&core, message).await;
                core.metrics
                    .request_seconds
                    .observe(started.elapsed().as_secs_f64());
                inflight.fetch_sub(1, Ordering::Relaxed);
                core.metrics.inflight.dec();
            }
            .instrument(span),
        );
    }
}

async fn handle(core: &Core, message: NatsMessage) {
    let subject = message.subject.as_str();
    let reply = message.reply.as_ref().map(|r| r.to_string());
    let reply = reply.as_deref();
    match subject {
        session::AUTH => {
            let result = match decode(&message.payload) {
                Some(request) => core.authenticate(request).await,
                None => Err(bad_request()),
            };
            finish(core, "auth", reply, result);
        }
        session::REFRESH => {
            let result = match decode(&message.payload) {
                Some(request) => core.refresh(request),
                None => Err(bad_request()),
            };
            finish(core, "refresh", reply, result);
        }
        session::AUTHORIZE => {
            let result = match decode(&message.payload) {
                Some(request) => core.authorize(request).await,
                None => Err(bad_request()),
            };
            finish(core, "authorize", reply, result);
        }
        session::PRESENCE => {
            let result = match decode(&message.payload) {
                Some(request) => core.presence(&request),
                None => Err(bad_request()),
            };
            finish(core, "presence", reply, result);
        }
        session::REVOKE => {
            let result = match decode(&message.payload) {
                Some(request) => core.revoke(request).await.map(|()| Empty {}),
                None => Err(bad_request()),
            };
            finish(core, "revoke", reply, result);
        }
        session::EVENTS => {
            // Acknowledged on receipt, before it is applied: the gateway
            // keeps a batch only when no instance is there to take it (no
            // responders), so it never sends one twice.
            if let Some(reply) = reply {
                answer(core, reply, Ok(Empty {}));
            }
            if let Some(batch) = decode::<SessionEvents>(&message.payload) {
                core.events(batch).await;
            }
        }
        other => {
            if let Some(suppressed) = DECODE_ERRORS.allow() {
                tracing::warn!(
                    subject = other,
                    suppressed,
                    "message on an unexpected subject"
                );
            }
        }
    }
}

#[derive(Serialize)]
struct Empty {}

fn bad_request() -> WireError {
    WireError::new(ErrorCode::BAD_REQUEST, "undecodable request")
}

fn finish<T: Serialize>(
    core: &Core,
    op: &'static str,
    reply: Option<&str>,
    result: Result<T, WireError>,
) {
    let code = result.as_ref().map_or_else(|e| e.code.0, |_| 0);
    core.metrics.answered(op, code);
    if let Some(reply) = reply {
        answer(core, reply, result);
    }
}

fn answer<T: Serialize>(core: &Core, reply: &str, result: Result<T, WireError>) {
    let payload = match rt_proto::internal::to_msgpack(&BusResult::from(result)) {
        Ok(payload) => payload,
        Err(error) => {
            tracing::error!(%error, "cannot encode a reply");
            return;
        }
    };
    // If even the reply cannot be queued, the caller times out (114).
    let _ = core
        .bus
        .publish(reply.to_owned(), Default::default(), Bytes::from(payload));
}

fn decode<T: DeserializeOwned>(payload: &[u8]) -> Option<T> {
    match rt_proto::internal::from_msgpack(payload) {
        Ok(value) => Some(value),
        Err(error) => {
            if let Some(suppressed) = DECODE_ERRORS.allow() {
                tracing::warn!(%error, suppressed, "undecodable session request");
            }
            None
        }
    }
}

impl Actor for Ingest {
    type Context = Context<Self>;
}

impl StreamHandler<NatsMessage> for Ingest {
    fn handle(&mut self, message: NatsMessage, _: &mut Self::Context) {
        self.accept(message);
    }

    // One subscription ending (e.g. unsubscribed on stop) must not stop the others.
    fn finished(&mut self, _: &mut Self::Context) {}
}

/// Leaves the queue group: other instances take new requests.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Stop;

impl Handler<Stop> for Ingest {
    type Result = ();

    fn handle(&mut self, _: Stop, ctx: &mut Self::Context) {
        ctx.stop();
    }
}
