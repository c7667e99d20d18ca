//! What the store exports: rows written and given up, batches, retries,
//! drops, the backlog and how long a batch takes.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use rt_shared::metrics::{MetricsRegistry, latency_histogram};

use super::buffer::Kind;

/// Labels `kind` (`session`, `audit`, `revocation`) and `result` (`ok`, `error`).
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct WriteLabel {
    pub kind: &'static str,
    pub result: &'static str,
}

/// Label `result` (`ok`, `error`).
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    pub result: &'static str,
}

/// Label `kind` (`session`, `audit`, `revocation`).
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    pub kind: &'static str,
}

#[derive(Clone)]
pub struct StoreMetrics {
    /// `rt_session_db_writes_total{kind, result}`: rows committed (`ok`), or
    /// given up (`error`: refused by the database as invalid, or still
    /// unwritten when the store shut down with the database down).
    pub writes: Family<WriteLabel, Counter>,
    /// `rt_session_db_batches_total{result}`: write attempts (one transaction each).
    pub batches: Family<ResultLabel, Counter>,
    /// `rt_session_db_retries_total`: failed attempts that will be retried.
    pub retries: Counter,
    /// `rt_session_db_dropped_total{kind}`: writes dropped because the buffer
    /// was full (audit rows first; see `store::buffer`).
    pub dropped: Family<KindLabel, Counter>,
    /// `rt_session_db_pending`: writes waiting, in the buffer or in flight.
    pub pending: Gauge,
    /// `rt_session_db_batch_seconds`: time per write attempt.
    pub batch_seconds: Histogram,
}

impl StoreMetrics {
    pub fn new(registry: &MetricsRegistry) -> Self {
        let metrics = Self {
            writes: Family::default(),
            batches: Family::default(),
            retries: Counter::default(),
            dropped: Family::default(),
            pending: Gauge::default(),
            batch_seconds: latency_histogram(),
        };
        registry.register(
            "rt_session_db_writes",
            "Rows written to the database (ok), or given up (error)",
            metrics.writes.clone(),
        );
        registry.register(
            "rt_session_db_batches",
            "Database write attempts, one transaction each",
            metrics.batches.clone(),
        );
        registry.register(
            "rt_session_db_retries",
            "Failed database write attempts that are retried",
            metrics.retries.clone(),
        );
        registry.register(
            "rt_session_db_dropped",
            "Writes dropped because the write-behind buffer was full",
            metrics.dropped.clone(),
        );
        registry.register(
            "rt_session_db_pending",
            "Writes waiting for the database (buffered or in flight)",
            metrics.pending.clone(),
        );
        registry.register(
            "rt_session_db_batch_seconds",
            "Time per database write attempt",
            metrics.batch_seconds.clone(),
        );
        metrics
    }

    pub(super) fn written(&self, kind: Kind, result: &'static str, rows: u64) {
        if rows > 0 {
            self.writes
                .get_or_create(&WriteLabel {
                    kind: kind.label(),
                    result,
                })
                .inc_by(rows);
        }
    }

    pub(super) fn batch(&self, result: &'static str) {
        self.batches.get_or_create(&ResultLabel { result }).inc();
    }

    pub(super) fn dropped(&self, kind: Kind) {
        self.dropped
            .get_or_create(&KindLabel { kind: kind.label() })
            .inc();
    }
}
