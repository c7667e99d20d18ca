//! The session service's metrics.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use rt_shared::metrics::{MetricsRegistry, latency_histogram};

/// Labels `op` (auth, refresh, authorize, presence, revoke) and `code` (0 for success).
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OpLabel {
    pub op: &'static str,
    pub code: u16,
}

/// Label `cache` (`token`, `channel_token`).
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CacheLabel {
    pub cache: &'static str,
}

/// Label `reason` (`kv_error`, `contended`).
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: &'static str,
}

#[derive(Clone)]
pub struct SessionMetrics {
    pub requests: Family<OpLabel, Counter>,
    pub request_seconds: Histogram,
    pub shed: Counter,
    pub inflight: Gauge,
    pub cache_hits: Family<CacheLabel, Counter>,
    pub cache_misses: Family<CacheLabel, Counter>,
    pub sessions_resumed: Counter,
    pub sessions_created: Counter,
    pub live_nodes: Gauge,
    pub nodes_reaped: Counter,
    pub kv_errors: Counter,
    pub limit_unchecked: Family<ReasonLabel, Counter>,
    pub revocations: Gauge,
}

impl SessionMetrics {
    pub fn new(registry: &MetricsRegistry) -> Self {
        let m = Self {
            requests: Family::default(),
            request_seconds: latency_histogram(),
            shed: Counter::default(),
            inflight: Gauge::default(),
            cache_hits: Family::default(),
            cache_misses: Family::default(),
            sessions_resumed: Counter::default(),
            sessions_created: Counter::default(),
            live_nodes: Gauge::default(),
            nodes_reaped: Counter::default(),
            kv_errors: Counter::default(),
            limit_unchecked: Family::default(),
            revocations: Gauge::default(),
        };
        registry.register(
            "rt_session_requests",
            "Requests answered, by operation and error code (0: success)",
            m.requests.clone(),
        );
        registry.register(
            "rt_session_request_seconds",
            "Time to answer a request",
            m.request_seconds.clone(),
        );
        registry.register(
            "rt_session_shed",
            "Requests refused with 113 because the queue was full",
            m.shed.clone(),
        );
        registry.register(
            "rt_session_inflight",
            "Requests being handled",
            m.inflight.clone(),
        );
        registry.register(
            "rt_cache_hits",
            "Cache hits, by cache",
            m.cache_hits.clone(),
        );
        registry.register(
            "rt_cache_misses",
            "Cache misses, by cache",
            m.cache_misses.clone(),
        );
        registry.register(
            "rt_session_resumed",
            "Connects that resumed an earlier session",
            m.sessions_resumed.clone(),
        );
        registry.register(
            "rt_session_created",
            "Connects that started a new session",
            m.sessions_created.clone(),
        );
        registry.register(
            "rt_session_live_nodes",
            "Gateways whose heartbeat is fresh",
            m.live_nodes.clone(),
        );
        registry.register(
            "rt_session_nodes_reaped",
            "Gateways found dead whose presence this instance cleaned up",
            m.nodes_reaped.clone(),
        );
        registry.register(
            "rt_session_kv_errors",
            "Failed NATS KV operations",
            m.kv_errors.clone(),
        );
        registry.register(
            "rt_session_limit_unchecked",
            "Connects answered 113 because the per-user connection count could not be checked, by reason (kv_error, contended)",
            m.limit_unchecked.clone(),
        );
        registry.register(
            "rt_session_revocations",
            "Revocations this instance enforces, mirrored from NATS KV",
            m.revocations.clone(),
        );
        m
    }

    pub fn answered(&self, op: &'static str, code: u16) {
        self.requests.get_or_create(&OpLabel { op, code }).inc();
    }
}
