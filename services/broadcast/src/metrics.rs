//! Broadcast's metrics, registered in the service's registry.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use rt_shared::metrics::{MetricsRegistry, latency_histogram};

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CodeLabel {
    pub code: u16,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RecoveredLabel {
    pub recovered: &'static str,
}

#[derive(Clone)]
pub struct BroadcastMetrics {
    pub publications: Counter,
    pub duplicates: Counter,
    pub errors: Family<CodeLabel, Counter>,
    pub channels: Gauge,
    pub history_queries: Counter,
    pub recoveries: Family<RecoveredLabel, Counter>,
    /// From receipt off NATS to the delivery being queued for NATS.
    pub sequence_latency: Histogram,
}

impl BroadcastMetrics {
    pub fn new(registry: &MetricsRegistry) -> Self {
        let m = Self {
            publications: Counter::default(),
            duplicates: Counter::default(),
            errors: Family::default(),
            channels: Gauge::default(),
            history_queries: Counter::default(),
            recoveries: Family::default(),
            sequence_latency: latency_histogram(),
        };
        registry.register(
            "rt_broadcast_publications",
            "Publications sequenced",
            m.publications.clone(),
        );
        registry.register(
            "rt_broadcast_duplicates",
            "Publishes answered from an idempotency key instead of being sequenced again",
            m.duplicates.clone(),
        );
        registry.register(
            "rt_broadcast_errors",
            "Refused requests by error code",
            m.errors.clone(),
        );
        registry.register(
            "rt_broadcast_channels",
            "Channels with state in memory",
            m.channels.clone(),
        );
        registry.register(
            "rt_broadcast_history_queries",
            "History queries answered",
            m.history_queries.clone(),
        );
        registry.register(
            "rt_broadcast_recoveries",
            "Subscribe-time position queries, by whether `since` was recovered",
            m.recoveries.clone(),
        );
        registry.register(
            "rt_broadcast_sequence_seconds",
            "Time from receiving a publish to queueing its delivery",
            m.sequence_latency.clone(),
        );
        m
    }

    pub fn error(&self, code: rt_proto::ErrorCode) {
        self.errors.get_or_create(&CodeLabel { code: code.0 }).inc();
    }
}
