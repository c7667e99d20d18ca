//! Prometheus metrics: one registry per service instance (no globals, so two
//! services in one test process keep separate figures), plus the metrics every
//! service exports. Names follow `rt_<what>_<unit>`; counters get `_total`.

use std::sync::{Arc, Mutex};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Label `thread` (the actix worker or arbiter a probe runs on).
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ThreadLabel {
    pub thread: String,
}

/// Label `event` (a NATS connection event).
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EventLabel {
    pub event: &'static str,
}

/// A latency histogram from 50 µs to ~13 s.
pub fn latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.000_05, 2.0, 19))
}

/// A shared, lockable registry; metrics are registered at start-up and
/// encoded on each scrape.
#[derive(Clone, Default)]
pub struct MetricsRegistry {
    inner: Arc<Mutex<Registry>>,
}

impl MetricsRegistry {
    /// Registers a metric under `name` (no `_total`: the encoder adds it to counters).
    pub fn register(
        &self,
        name: &str,
        help: &str,
        metric: impl prometheus_client::registry::Metric,
    ) {
        if let Ok(mut registry) = self.inner.lock() {
            registry.register(name, help, metric);
        }
    }

    /// The Prometheus text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if let Ok(registry) = self.inner.lock() {
            // Writing into a String cannot fail.
            let _ = prometheus_client::encoding::text::encode(&mut out, &registry);
        }
        out
    }
}

/// Metrics every service exports.
#[derive(Clone)]
pub struct CommonMetrics {
    /// How late a timer fires on each runtime thread: the event-loop stall meter.
    pub runtime_lag: Family<ThreadLabel, Histogram, fn() -> Histogram>,
    pub process_resident_memory: Gauge,
    pub nats_events: Family<EventLabel, Counter>,
    /// Outgoing NATS messages refused because the publish queue was full.
    pub bus_queue_full: Counter,
    /// Requests to other services that got no reply in time.
    pub bus_timeouts: Counter,
}

impl CommonMetrics {
    pub fn new(registry: &MetricsRegistry) -> Self {
        let metrics = Self {
            runtime_lag: Family::new_with_constructor(latency_histogram),
            process_resident_memory: Gauge::default(),
            nats_events: Family::default(),
            bus_queue_full: Counter::default(),
            bus_timeouts: Counter::default(),
        };
        registry.register(
            "rt_runtime_lag_seconds",
            "How late a 100 ms timer fires on each runtime thread",
            metrics.runtime_lag.clone(),
        );
        registry.register(
            "rt_process_resident_memory_bytes",
            "Resident set size of the process",
            metrics.process_resident_memory.clone(),
        );
        registry.register(
            "rt_nats_events",
            "NATS connection events (connected, disconnected, slow_consumer, ...)",
            metrics.nats_events.clone(),
        );
        registry.register(
            "rt_bus_queue_full",
            "Outgoing NATS messages refused because the publish queue was full",
            metrics.bus_queue_full.clone(),
        );
        registry.register(
            "rt_bus_timeouts",
            "Requests to other services that got no reply within the deadline",
            metrics.bus_timeouts.clone(),
        );
        metrics
    }
}

/// Resident memory of this process in bytes (Linux), if it can be read.
pub fn resident_memory_bytes() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * 4096)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn common_metrics_encode() {
        let registry = MetricsRegistry::default();
        let metrics = CommonMetrics::new(&registry);
        metrics
            .nats_events
            .get_or_create(&EventLabel { event: "connected" })
            .inc();
        metrics
            .runtime_lag
            .get_or_create(&ThreadLabel {
                thread: "main".into(),
            })
            .observe(0.001);
        let text = registry.encode();
        assert!(
            text.contains("rt_nats_events_total{event=\"connected\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("rt_runtime_lag_seconds_count{thread=\"main\"} 1"),
            "{text}"
        );
        assert!(resident_memory_bytes().is_some_and(|b| b > 0));
    }
}
