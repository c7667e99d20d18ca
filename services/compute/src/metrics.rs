//! The compute service's metrics.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use rt_shared::metrics::{MetricsRegistry, latency_histogram};

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MethodLabel {
    pub method: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabel {
    pub method: String,
    pub outcome: &'static str,
}

#[derive(Clone)]
pub struct ComputeMetrics {
    pub queue_depth: Gauge,
    pub busy_rejections: Counter,
    pub jobs: Family<OutcomeLabel, Counter>,
    pub job_time: Family<MethodLabel, Histogram, fn() -> Histogram>,
    pub wait_time: Family<MethodLabel, Histogram, fn() -> Histogram>,
}

impl ComputeMetrics {
    pub fn new(registry: &MetricsRegistry) -> Self {
        let m = Self {
            queue_depth: Gauge::default(),
            busy_rejections: Counter::default(),
            jobs: Family::default(),
            job_time: Family::new_with_constructor(latency_histogram),
            wait_time: Family::new_with_constructor(latency_histogram),
        };
        registry.register(
            "rt_compute_queue_depth",
            "Jobs accepted and not yet started",
            m.queue_depth.clone(),
        );
        registry.register(
            "rt_compute_busy_rejections",
            "Calls answered 113 at once because the queue was full",
            m.busy_rejections.clone(),
        );
        registry.register(
            "rt_compute_jobs",
            "Jobs by method and outcome (ok, error, skipped: caller gone or deadline passed)",
            m.jobs.clone(),
        );
        registry.register(
            "rt_compute_job_seconds",
            "Time a job ran on a worker",
            m.job_time.clone(),
        );
        registry.register(
            "rt_compute_wait_seconds",
            "Time a job waited in the queue",
            m.wait_time.clone(),
        );
        m
    }

    pub fn outcome(&self, method: &str, outcome: &'static str) {
        self.jobs
            .get_or_create(&OutcomeLabel {
                method: method.to_owned(),
                outcome,
            })
            .inc();
    }
}
