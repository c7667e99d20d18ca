//! Worker threads (an actix `SyncArbiter`): where methods run.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use actix::prelude::*;
use bytes::Bytes;
use rt_proto::rpc;
use rt_shared::Bus;
use rt_shared::telemetry::now_ms;

use crate::metrics::{ComputeMetrics, MethodLabel};
use crate::registry::{Call, Method};

/// What the ingest actor and the workers share.
pub struct Shared {
    pub bus: Bus,
    pub metrics: ComputeMetrics,
    pub workers: usize,
    pub capacity: usize,
    /// Jobs accepted and not yet started: the queue's bound is on this.
    pub queued: AtomicUsize,
    /// Calls that can still be cancelled, by request id.
    pub cancels: Mutex<HashMap<String, Arc<AtomicBool>>>,
    /// Smoothed job time in µs, for the retry hint.
    pub job_time_us: AtomicU64,
}

impl Shared {
    /// Takes a queue slot, or `None` when full.
    pub fn try_enqueue(&self) -> Option<()> {
        let mut current = self.queued.load(Ordering::Relaxed);
        loop {
            if current >= self.capacity {
                return None;
            }
            match self.queued.compare_exchange_weak(
                current,
                current + 1,
                Ordering::AcqRel,
                Ordering::Relaxed,
            ) {
                Ok(_) => {
                    self.metrics.queue_depth.inc();
                    return Some(());
                }
                Err(now) => current = now,
            }
        }
    }

    /// When a refused caller should retry: roughly when the queue ahead of
    /// it will have drained.
    pub fn retry_after_ms(&self) -> u64 {
        let job_ms = self
            .job_time_us
            .load(Ordering::Relaxed)
            .div_ceil(1000)
            .max(1);
        let queued = self.queued.load(Ordering::Relaxed) as u64;
        (job_ms * queued.div_ceil(self.workers.max(1) as u64)).clamp(10, 10_000)
    }

    fn record_job_time(&self, us: u64) {
        // Exponential moving average, weight 1/8: cheap and smooth enough for a hint.
        let old = self.job_time_us.load(Ordering::Relaxed);
        let new = if old == 0 { us } else { old - old / 8 + us / 8 };
        self.job_time_us.store(new, Ordering::Relaxed);
    }
}

/// One accepted call.
pub struct Job {
    pub method_name: String,
    pub method: Arc<dyn Method>,
    pub request: rpc::RpcCall,
    pub reply: Option<String>,
    pub request_id: Option<String>,
    pub cancelled: Arc<AtomicBool>,
    /// Caller's deadline, ms since the Unix epoch.
    pub deadline_ms: Option<u64>,
    pub accepted: Instant,
    /// The caller's trace, continued by the job's span.
    pub trace: Option<rt_shared::trace_context::TraceContext>,
}

impl Message for Job {
    type Result = ();
}

pub struct Worker {
    shared: Arc<Shared>,
}

impl Worker {
    pub fn new(shared: Arc<Shared>) -> Self {
        Self { shared }
    }
}

impl Actor for Worker {
    type Context = SyncContext<Self>;
}

impl Handler<Job> for Worker {
    type Result = ();

    fn handle(&mut self, job: Job, _: &mut Self::Context) {
        let shared = &self.shared;
        shared.queued.fetch_sub(1, Ordering::AcqRel);
        shared.metrics.queue_depth.dec();
        let label = MethodLabel {
            method: job.method_name.clone(),
        };
        shared
            .metrics
            .wait_time
            .get_or_create(&label)
            .observe(job.accepted.elapsed().as_secs_f64());
        // Nobody is waiting any more: skip instead of finishing work for nobody.
        let expired = job.deadline_ms.is_some_and(|d| now_ms() >= d);
        if job.cancelled.load(Ordering::Relaxed) || expired {
            shared.metrics.outcome(&job.method_name, "skipped");
            self.forget(&job);
            return;
        }
        let span = tracing::info_span!("compute.job", method = %job.method_name);
        if let Some(parent) = &job.trace {
            rt_shared::telemetry::set_remote_parent(&span, parent);
        }
        let _entered = span.enter();
        let started = Instant::now();
        let mut call = Call::new(
            job.request.clone(),
            job.reply.clone(),
            shared.bus.clone(),
            job.cancelled.clone(),
        );
        let result = job.method.call(&mut call);
        let elapsed = started.elapsed();
        shared.record_job_time(u64::try_from(elapsed.as_micros()).unwrap_or(u64::MAX));
        shared
            .metrics
            .job_time
            .get_or_create(&label)
            .observe(elapsed.as_secs_f64());
        let payload = match &result {
            Ok(data) => rpc::encode_reply_data(data),
            Err(error) => rpc::encode_reply_error(error),
        };
        shared.metrics.outcome(
            &job.method_name,
            if result.is_ok() { "ok" } else { "error" },
        );
        if let Some(reply) = &job.reply {
            // If the outgoing queue is full the caller times out (114); counted by the bus.
            let _ = shared
                .bus
                .publish(reply.clone(), Default::default(), Bytes::from(payload));
        }
        self.forget(&job);
    }
}

impl Worker {
    fn forget(&self, job: &Job) {
        if let Some(id) = &job.request_id
            && let Ok(mut cancels) = self.shared.cancels.lock()
        {
            cancels.remove(id);
        }
    }
}
