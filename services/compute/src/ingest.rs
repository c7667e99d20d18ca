//! The ingest actor: takes RPC requests off NATS (one queue subscription per
//! registered method, so another service may answer other methods), applies
//! the queue bound, and hands jobs to the workers. It also hears
//! cancellations, so work for a client that left is skipped.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use actix::prelude::*;
use async_nats::Message as NatsMessage;
use bytes::Bytes;
use rt_proto::internal::WireError;
use rt_proto::{ErrorCode, rpc, subject};
use rt_shared::telemetry::RateLimitedLog;
use rt_shared::trace_context::TraceContext;

use crate::registry::Registry;
use crate::worker::{Job, Shared, Worker};

static REFUSALS: RateLimitedLog = RateLimitedLog::new(5_000);

pub struct Ingest {
    shared: Arc<Shared>,
    registry: Registry,
    workers: Addr<Worker>,
}

/// Stops the actor, dropping (so unsubscribing) its subscriptions.
pub struct Stop;

impl Message for Stop {
    type Result = ();
}

impl Ingest {
    pub fn new(shared: Arc<Shared>, registry: Registry, workers: Addr<Worker>) -> Self {
        Self {
            shared,
            registry,
            workers,
        }
    }

    fn cancel(&self, subject: &str) {
        let Some(id) = subject.strip_prefix(subject::CANCEL_PREFIX) else {
            return;
        };
        if let Ok(cancels) = self.shared.cancels.lock()
            && let Some(flag) = cancels.get(id)
        {
            flag.store(true, Ordering::Relaxed);
        }
    }

    fn accept(&self, message: NatsMessage) -> Result<(), WireError> {
        let name = message
            .subject
            .strip_prefix(subject::RPC_PREFIX)
            .ok_or_else(|| WireError::new(ErrorCode::UNKNOWN_OP, "not an RPC subject"))?;
        let method = self.registry.get(name).ok_or_else(|| {
            WireError::new(ErrorCode::UNKNOWN_OP, format!("unknown method {name}"))
        })?;
        let request = rpc::decode_request(&message.payload).map_err(|e| {
            WireError::new(
                ErrorCode::BAD_REQUEST,
                format!("malformed RPC request: {e}"),
            )
        })?;
        let header = |key: &str| {
            message
                .headers
                .as_ref()
                .and_then(|h| h.get(key))
                .map(|v| v.as_str().to_owned())
        };
        let deadline_ms = header(rpc::HEADER_DEADLINE).and_then(|v| v.parse::<u64>().ok());
        let request_id = header(rpc::HEADER_REQUEST_ID).filter(|id| !id.is_empty());
        if self.shared.try_enqueue().is_none() {
            self.shared.metrics.busy_rejections.inc();
            return Err(
                WireError::new(ErrorCode::BUSY, "compute is busy, retry later")
                    .with_retry_after(self.shared.retry_after_ms()),
            );
        }
        let cancelled = Arc::new(AtomicBool::new(false));
        if let Some(id) = &request_id
            && let Ok(mut cancels) = self.shared.cancels.lock()
        {
            cancels.insert(id.clone(), cancelled.clone());
        }
        // The queue bound is `Shared::queued`, taken above; the arbiter's own
        // channel only ever holds what that bound admitted.
        self.workers.do_send(Job {
            method_name: name.to_owned(),
            method,
            request,
            reply: message.reply.as_ref().map(|r| r.to_string()),
            request_id,
            cancelled,
            deadline_ms,
            accepted: Instant::now(),
            trace: TraceContext::from_nats_headers(message.headers.as_ref()),
        });
        Ok(())
    }

    fn refuse(&self, message: &NatsMessage, error: WireError) {
        if error.code != ErrorCode::BUSY
            && let Some(suppressed) = REFUSALS.allow()
        {
            tracing::warn!(subject = %message.subject, code = error.code.0, reason = %error.message, suppressed, "RPC refused");
        }
        if let Some(reply) = &message.reply {
            let _ = self.shared.bus.publish(
                reply.to_string(),
                Default::default(),
                Bytes::from(rpc::encode_reply_error(&error)),
            );
        }
    }
}

impl Actor for Ingest {
    type Context = Context<Self>;
}

impl StreamHandler<NatsMessage> for Ingest {
    fn handle(&mut self, message: NatsMessage, _: &mut Self::Context) {
        if message.subject.starts_with(subject::CANCEL_PREFIX) {
            return self.cancel(&message.subject);
        }
        if let Err(error) = self.accept(message.clone()) {
            self.refuse(&message, error);
        }
    }

    // One subscription ending (shutdown) must not stop the others.
    fn finished(&mut self, _: &mut Self::Context) {}
}

impl Handler<Stop> for Ingest {
    type Result = ();

    fn handle(&mut self, _: Stop, ctx: &mut Self::Context) {
        ctx.stop();
    }
}
