//! Logging and tracing setup.
//!
//! One `tracing` subscriber per process: `pretty` logs for development or
//! JSON lines for production (with the current span's fields), plus the
//! OpenTelemetry layer, so every `tracing` span is an OpenTelemetry span with
//! W3C ids. The ids always exist (that is what carries a trace across NATS);
//! spans are *exported* over OTLP/HTTP only when `telemetry.otlp_enabled` is
//! set. Hot paths log nothing per message: they count in metrics and use
//! [`RateLimitedLog`] for warnings.

use std::io::IsTerminal as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use opentelemetry::trace::{
    SpanContext, SpanId, TraceContextExt as _, TraceFlags, TraceId, TraceState, TracerProvider as _,
};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider};
use tracing_opentelemetry::OpenTelemetrySpanExt as _;
use tracing_subscriber::Layer as _;
use tracing_subscriber::filter::{LevelFilter, Targets};
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;

use crate::config::{LogConfig, LogFormat, TelemetryConfig};
use crate::trace_context::TraceContext;

const DEFAULT_OTLP_TRACES: &str = "http://127.0.0.1:4318/v1/traces";

/// Keeps the tracer provider alive; [`Telemetry::shutdown`] flushes what is
/// buffered (call it last, off the event loop: it blocks).
pub struct Telemetry {
    provider: SdkTracerProvider,
}

impl Telemetry {
    /// Sends buffered spans now (blocking).
    pub fn flush(&self) {
        if let Err(error) = self.provider.force_flush() {
            tracing::warn!(%error, "flushing spans failed");
        }
    }

    /// Flushes and stops the exporter (blocking).
    pub fn shutdown(self) {
        if let Err(error) = self.provider.shutdown() {
            tracing::warn!(%error, "stopping the span exporter failed");
        }
    }
}

/// Installs the global subscriber (logs + OpenTelemetry). Calling it again
/// (tests start several services in one process) keeps the first one; the
/// returned handle is then inert.
pub fn init(log: &LogConfig, telemetry: &TelemetryConfig, default_service: &str) -> Telemetry {
    let provider = tracer_provider(telemetry, default_service);
    let tracer = provider.tracer("realtime");
    // `RUST_LOG` wins over the configured filter; both use the
    // `target=level,…` syntax. The log filter applies to log output only:
    // spans that carry trace context across services exist whatever the
    // log level (a global filter would drop them too).
    let filter = std::env::var("RUST_LOG")
        .ok()
        .and_then(|v| v.parse::<Targets>().ok())
        .or_else(|| log.filter.parse::<Targets>().ok())
        .unwrap_or_else(|| Targets::new().with_default(LevelFilter::INFO));
    let otel = tracing_opentelemetry::layer()
        .with_tracer(tracer)
        .with_filter(LevelFilter::INFO);
    let registry = tracing_subscriber::registry().with(otel);
    let result = match log.format {
        LogFormat::Pretty => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .with_target(true)
                    // Colours only on a terminal, never in log files.
                    .with_ansi(std::io::stdout().is_terminal())
                    .with_filter(filter),
            )
            .try_init(),
        LogFormat::Json => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .event_format(crate::log_format::JsonLines)
                    .with_filter(filter),
            )
            .try_init(),
    };
    // Already installed: keep the existing one.
    drop(result);
    Telemetry { provider }
}

fn tracer_provider(config: &TelemetryConfig, default_service: &str) -> SdkTracerProvider {
    let env = |key: &str| std::env::var(key).ok().filter(|v| !v.is_empty());
    let service = config
        .service_name
        .clone()
        .or_else(|| env("OTEL_SERVICE_NAME"))
        .unwrap_or_else(|| default_service.to_owned());
    let builder = SdkTracerProvider::builder()
        .with_resource(Resource::builder().with_service_name(service).build());
    if !config.otlp_enabled {
        // Ids for propagation, nothing recorded or sent.
        return builder.with_sampler(Sampler::AlwaysOff).build();
    }
    let ratio = config
        .sampling_ratio
        .or_else(|| env("OTEL_TRACES_SAMPLER_ARG").and_then(|v| v.parse().ok()))
        .unwrap_or(1.0);
    let endpoint = config
        .otlp_endpoint
        .clone()
        .or_else(|| env("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))
        .or_else(|| {
            env("OTEL_EXPORTER_OTLP_ENDPOINT")
                .map(|base| format!("{}/v1/traces", base.trim_end_matches('/')))
        })
        .unwrap_or_else(|| DEFAULT_OTLP_TRACES.to_owned());
    use opentelemetry_otlp::WithExportConfig as _;
    match opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_endpoint(endpoint.clone())
        .build()
    {
        Ok(exporter) => builder
            .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
                ratio,
            ))))
            .with_batch_exporter(exporter)
            .build(),
        Err(error) => {
            eprintln!("cannot export traces to {endpoint}: {error}; tracing export is off");
            builder.with_sampler(Sampler::AlwaysOff).build()
        }
    }
}

/// The W3C context of the current `tracing` span, to put in outgoing headers.
pub fn current_context() -> Option<TraceContext> {
    let context = tracing::Span::current().context();
    let span = context.span();
    let span_context = span.span_context();
    span_context.is_valid().then(|| TraceContext {
        trace_id: span_context.trace_id().to_bytes(),
        span_id: span_context.span_id().to_bytes(),
        flags: span_context.trace_flags().to_u8(),
        state: Some(span_context.trace_state().header()).filter(|s| !s.is_empty()),
    })
}

/// Makes `span` continue a caller's trace (from a header).
pub fn set_remote_parent(span: &tracing::Span, parent: &TraceContext) {
    let context = opentelemetry::Context::new().with_remote_span_context(span_context(parent));
    // Fails only when the span is already started elsewhere; nothing to do then.
    let _ = span.set_parent(context);
}

/// Links `span` to a related trace (fan-out: one delivery span per batch,
/// linked to the publication rather than parented by it).
pub fn add_link(span: &tracing::Span, related: &TraceContext) {
    span.add_link(span_context(related));
}

fn span_context(context: &TraceContext) -> SpanContext {
    SpanContext::new(
        TraceId::from_bytes(context.trace_id),
        SpanId::from_bytes(context.span_id),
        TraceFlags::new(context.flags),
        true,
        context
            .state
            .as_deref()
            .and_then(|s| s.parse::<TraceState>().ok())
            .unwrap_or_default(),
    )
}

/// Lets one warning through per interval and counts the ones it swallowed,
/// so a flood of bad input cannot turn into a flood of log lines.
pub struct RateLimitedLog {
    interval_ms: u64,
    last_ms: AtomicU64,
    suppressed: AtomicU64,
}

impl RateLimitedLog {
    pub const fn new(interval_ms: u64) -> Self {
        Self {
            interval_ms,
            last_ms: AtomicU64::new(0),
            suppressed: AtomicU64::new(0),
        }
    }

    /// `Some(n)` when the caller should log now; `n` lines were suppressed since the last one.
    pub fn allow(&self) -> Option<u64> {
        let now = now_ms();
        let last = self.last_ms.load(Ordering::Relaxed);
        if now.saturating_sub(last) >= self.interval_ms
            && self
                .last_ms
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            Some(self.suppressed.swap(0, Ordering::Relaxed))
        } else {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            None
        }
    }
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_limited_log_lets_one_through() {
        let log = RateLimitedLog::new(60_000);
        assert_eq!(log.allow(), Some(0));
        assert_eq!(log.allow(), None);
        assert_eq!(log.allow(), None);
        assert_eq!(log.suppressed.load(Ordering::Relaxed), 2);
    }
}

#[cfg(test)]
mod propagation_tests {
    use super::*;

    #[test]
    fn spans_carry_ids_even_when_nothing_is_exported() {
        let log = LogConfig {
            filter: "warn".into(),
            ..LogConfig::default()
        };
        let _telemetry = init(&log, &TelemetryConfig::default(), "test");
        let parent = TraceContext::parse(
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            None,
        )
        .expect("valid");
        let span = tracing::info_span!("child");
        set_remote_parent(&span, &parent);
        let inside = span
            .in_scope(current_context)
            .expect("a context inside the span");
        assert_eq!(
            inside.trace_id, parent.trace_id,
            "continues the caller's trace"
        );
        assert_ne!(inside.span_id, parent.span_id, "with its own span id");
        let root = tracing::info_span!("root")
            .in_scope(current_context)
            .expect("a root context");
        assert_ne!(root.trace_id, parent.trace_id);
    }
}
