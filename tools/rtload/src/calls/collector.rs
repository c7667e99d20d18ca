//! The single owner of what request/reply connections report: setup (shared with fanout's
//! collector), samples into one set of histograms, and the merged counts.

use super::conn::Event;
use super::tracker::{CallHists, CallStats};
use crate::collector::Setup;
use crate::stats::{self, SeqSamples};

#[derive(Default)]
pub struct Collector {
    pub setup: Setup,
    pub done: usize,
    pub closed_early: u64,
    pub hists: CallHists,
    pub stats: CallStats,
    /// `ok` latencies by sequence number, when the connections keep them.
    pub ok_by_seq: SeqSamples,
}

impl Collector {
    /// Takes one event. `Ready` carries the connection's send queue, which the caller keeps;
    /// here only its setup time is recorded.
    pub fn on(&mut self, event: Event) {
        match event {
            Event::Ready { connect, .. } => self.setup.on_ready(connect),
            Event::Failed { kind, message } => self.setup.on_failed(kind, message),
            Event::Samples(mut samples) => {
                samples.record_into(&mut self.hists);
                self.ok_by_seq.append(&mut samples.ok_by_seq);
            }
            Event::Done(mut summary) => {
                self.done += 1;
                self.closed_early += u64::from(summary.closed_early);
                summary.samples.record_into(&mut self.hists);
                self.ok_by_seq.append(&mut summary.samples.ok_by_seq);
                self.stats.merge(&summary.stats);
            }
        }
    }

    /// p99 of the measured `ok` latency so far, in ms.
    pub fn p99_ms(&self) -> Option<f64> {
        let h = &self.hists.latency;
        (!h.is_empty()).then(|| stats::us_to_ms(h.value_at_quantile(0.99)))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::calls::conn::Summary;
    use crate::calls::tracker::{CallSamples, Outcome};

    #[test]
    fn events_merge_into_totals() {
        let mut c = Collector::default();
        let (ticks, _rx) = tokio::sync::mpsc::unbounded_channel();
        c.on(Event::Ready {
            connect: Duration::from_millis(3),
            ticks,
        });
        c.on(Event::Failed {
            kind: "connect error 101".into(),
            message: "connect: error 101: unauthorized".into(),
        });
        let mut samples = CallSamples::default();
        samples.latency.push(800);
        samples.retry_after.push(250_000);
        c.on(Event::Samples(Box::new(samples.clone())));
        let mut stats = CallStats::default();
        stats.count(Outcome::Ok);
        stats.count(Outcome::Error {
            code: 113,
            retry_after_ms: Some(250),
        });
        c.on(Event::Done(Box::new(Summary {
            stats,
            samples,
            closed_early: true,
        })));
        assert_eq!(
            (c.setup.ready, c.setup.failed, c.done, c.closed_early),
            (1, 1, 1, 1)
        );
        assert_eq!((c.hists.latency.len(), c.hists.retry_after.len()), (2, 2));
        assert_eq!(c.p99_ms(), Some(0.8));
        assert_eq!((c.stats.ok, c.stats.errors_with(113)), (1, 1));
    }
}
