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

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    pub result: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    pub kind: &'static str,
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
    /// History writes to JetStream by outcome.
    pub store_writes: Family<ResultLabel, Counter>,
    /// From handing a write to the NATS connection to JetStream's ack.
    pub store_write_latency: Histogram,
    /// Writes handed to JetStream and not yet acknowledged.
    pub store_inflight: Gauge,
    /// Reads of the record, by kind (load, range, tail).
    pub store_reads: Family<KindLabel, Counter>,
    /// Read failures, by kind.
    pub store_read_errors: Family<KindLabel, Counter>,
    /// History and recovery queries the hot window could not answer alone.
    pub window_misses: Counter,
    /// Resyncs after a failed write, by outcome (clean, repaired, reloaded).
    pub resyncs: Family<ResultLabel, Counter>,
    /// New epochs started, by reason (empty, hole, memory).
    pub epochs: Family<ReasonLabel, Counter>,
    /// Partitions this instance owns.
    pub partitions_owned: Gauge,
    /// Partition ownership changes, by event (acquired, released, lost).
    pub partition_events: Family<KindLabel, Counter>,
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
            store_writes: Family::default(),
            store_write_latency: latency_histogram(),
            store_inflight: Gauge::default(),
            store_reads: Family::default(),
            store_read_errors: Family::default(),
            window_misses: Counter::default(),
            resyncs: Family::default(),
            epochs: Family::default(),
            partitions_owned: Gauge::default(),
            partition_events: Family::default(),
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
            "Time from receiving a publish to queueing its delivery (with JetStream: after its write is acknowledged)",
            m.sequence_latency.clone(),
        );
        registry.register(
            "rt_broadcast_store_writes",
            "History writes to JetStream by result (ok, fenced, duplicate, failed)",
            m.store_writes.clone(),
        );
        registry.register(
            "rt_broadcast_store_write_seconds",
            "Time from handing a history write to NATS to JetStream's acknowledgement",
            m.store_write_latency.clone(),
        );
        registry.register(
            "rt_broadcast_store_inflight",
            "History writes awaiting JetStream's acknowledgement",
            m.store_inflight.clone(),
        );
        registry.register(
            "rt_broadcast_store_reads",
            "Reads of the JetStream record by kind (load, range, tail)",
            m.store_reads.clone(),
        );
        registry.register(
            "rt_broadcast_store_read_errors",
            "Failed reads of the JetStream record by kind (retried)",
            m.store_read_errors.clone(),
        );
        registry.register(
            "rt_broadcast_window_misses",
            "History and recovery queries that needed the JetStream record",
            m.window_misses.clone(),
        );
        registry.register(
            "rt_broadcast_resyncs",
            "Channel resyncs after a failed history write, by result (clean, repaired, reloaded)",
            m.resyncs.clone(),
        );
        registry.register(
            "rt_broadcast_epochs",
            "Epochs started, by reason (empty: no stored message; hole: the record lost a write; memory: no record)",
            m.epochs.clone(),
        );
        registry.register(
            "rt_broadcast_partitions_owned",
            "Channel partitions this instance sequences",
            m.partitions_owned.clone(),
        );
        registry.register(
            "rt_broadcast_partition_events",
            "Partition ownership changes by kind (acquired, released, lost)",
            m.partition_events.clone(),
        );
        m
    }

    pub fn store_write(&self, result: &'static str) {
        self.store_writes
            .get_or_create(&ResultLabel { result })
            .inc();
    }

    pub fn store_read(&self, kind: &'static str, ok: bool) {
        self.store_reads.get_or_create(&KindLabel { kind }).inc();
        if !ok {
            self.store_read_errors
                .get_or_create(&KindLabel { kind })
                .inc();
        }
    }

    pub fn error(&self, code: rt_proto::ErrorCode) {
        self.errors.get_or_create(&CodeLabel { code: code.0 }).inc();
    }
}
