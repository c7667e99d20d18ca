//! The runtime-lag probe: a timer that measures how late it fires.
//!
//! A gateway's promise is that nothing stalls its event loops; this is the
//! meter for it. One probe runs on every runtime thread of a service.

use std::time::{Duration, Instant};

use crate::metrics::{CommonMetrics, ThreadLabel, resident_memory_bytes};

const PROBE_INTERVAL: Duration = Duration::from_millis(100);

/// Spawns the probe on the current actix arbiter (or tokio runtime). When
/// `report_memory` is set, it also refreshes the process memory gauge.
pub fn spawn_probe(thread: impl Into<String>, metrics: CommonMetrics, report_memory: bool) {
    let label = ThreadLabel {
        thread: thread.into(),
    };
    let histogram = metrics.runtime_lag.get_or_create_owned(&label);
    actix_rt::spawn(async move {
        let mut ticks: u64 = 0;
        loop {
            let start = Instant::now();
            tokio::time::sleep(PROBE_INTERVAL).await;
            let lag = start.elapsed().saturating_sub(PROBE_INTERVAL);
            histogram.observe(lag.as_secs_f64());
            ticks += 1;
            if report_memory
                && ticks.is_multiple_of(10)
                && let Some(bytes) = resident_memory_bytes()
            {
                metrics
                    .process_resident_memory
                    .set(i64::try_from(bytes).unwrap_or(i64::MAX));
            }
        }
    });
}
