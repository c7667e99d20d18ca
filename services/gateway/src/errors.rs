//! Mapping failures of other services to client-facing errors, in one place.

use rt_proto::ErrorCode;
use rt_proto::outbound::ErrorBody;
use rt_shared::BusError;
use rt_shared::telemetry::RateLimitedLog;

static INTERNAL_ERRORS: RateLimitedLog = RateLimitedLog::new(5_000);

/// Retry hint when this node's outgoing NATS queue is full.
const BUSY_RETRY_MS: u64 = 100;
/// Retry hint when no broadcast instance answers.
const UNAVAILABLE_RETRY_MS: u64 = 1_000;

/// The error a client sees for a bus failure; internal causes are logged, not sent.
pub fn bus_error(error: &BusError) -> ErrorBody {
    match error {
        BusError::Busy => {
            ErrorBody::new(ErrorCode::BUSY, "busy, retry later").with_retry_after(BUSY_RETRY_MS)
        }
        BusError::NoResponders => {
            ErrorBody::new(ErrorCode::BUSY, "the service is unavailable, retry later")
                .with_retry_after(UNAVAILABLE_RETRY_MS)
        }
        BusError::Timeout(_) => ErrorBody::new(ErrorCode::TIMEOUT, "timeout"),
        BusError::Remote(wire) => {
            let body = ErrorBody::new(wire.code, wire.message.clone());
            match wire.retry_after_ms {
                Some(ms) => body.with_retry_after(ms),
                None => body,
            }
        }
        other => {
            if let Some(suppressed) = INTERNAL_ERRORS.allow() {
                tracing::error!(error = %other, suppressed, "internal error");
            }
            ErrorBody::new(ErrorCode::INTERNAL, "internal error")
        }
    }
}
