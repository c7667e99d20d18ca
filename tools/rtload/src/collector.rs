//! The collector: the single owner of everything subscribers report. It records their
//! latency samples into one histogram as they arrive (about once a second from each) and
//! merges their final summaries.

use crate::stats::{self, Hist, Tally};
use crate::subscriber::{Event, OffsetTracker};

pub struct Collector {
    pub ready: usize,
    pub failed: usize,
    pub done: usize,
    /// TCP + handshake + `connect` reply.
    pub connect: Hist,
    /// `subscribe` round trip.
    pub subscribe: Hist,
    /// Publish-to-deliver latency of measured publications, all subscribers.
    pub latency: Hist,
    pub setup_errors: Tally,
    pub first_failure: Option<String>,
    pub delivered: u64,
    pub delivered_measured: u64,
    pub unstamped: u64,
    pub closed_early: u64,
    pub errors: Tally,
    pub offsets: Vec<OffsetTracker>,
}

impl Default for Collector {
    fn default() -> Self {
        Collector {
            ready: 0,
            failed: 0,
            done: 0,
            connect: stats::new_hist(),
            subscribe: stats::new_hist(),
            latency: stats::new_hist(),
            setup_errors: Tally::default(),
            first_failure: None,
            delivered: 0,
            delivered_measured: 0,
            unstamped: 0,
            closed_early: 0,
            errors: Tally::default(),
            offsets: Vec::new(),
        }
    }
}

impl Collector {
    pub fn on(&mut self, event: Event) {
        match event {
            Event::Ready { connect, subscribe } => {
                self.ready += 1;
                stats::record(&mut self.connect, connect.as_micros() as u64);
                stats::record(&mut self.subscribe, subscribe.as_micros() as u64);
            }
            Event::Failed { kind, message } => {
                self.failed += 1;
                self.setup_errors.add(kind, 1);
                self.first_failure.get_or_insert(message);
            }
            Event::Samples(samples) => samples.record_into(&mut self.latency),
            Event::Done(s) => {
                self.done += 1;
                s.samples.record_into(&mut self.latency);
                self.delivered += s.delivered;
                self.delivered_measured += s.delivered_measured;
                self.unstamped += s.unstamped;
                self.closed_early += u64::from(s.closed_early);
                self.errors.merge(&s.errors);
                self.offsets.push(s.offsets);
            }
        }
    }

    /// p99 of the measured latency so far, in ms.
    pub fn p99_ms(&self) -> Option<f64> {
        (!self.latency.is_empty()).then(|| stats::us_to_ms(self.latency.value_at_quantile(0.99)))
    }

    pub fn lost_in_gaps(&self) -> u64 {
        self.offsets.iter().map(|o| o.lost).sum()
    }

    pub fn out_of_order(&self) -> u64 {
        self.offsets.iter().map(|o| o.out_of_order).sum()
    }

    /// Publications up to `latest` that subscribers never received at the end of their
    /// stream (a gap with nothing after it). `None` if no offset is known.
    pub fn lost_in_tails(&self, latest: Option<u64>) -> Option<u64> {
        let latest = latest?;
        Some(self.offsets.iter().filter_map(|o| o.tail(latest)).sum())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::subscriber::Summary;

    #[test]
    fn events_merge_into_totals() {
        let mut c = Collector::default();
        c.on(Event::Ready {
            connect: Duration::from_micros(1500),
            subscribe: Duration::from_micros(300),
        });
        c.on(Event::Failed {
            kind: "tcp".into(),
            message: "tcp: refused".into(),
        });
        let mut h = stats::Samples::default();
        h.push(700);
        c.on(Event::Samples(h.clone()));
        let mut offsets = OffsetTracker::starting_at(Some(0));
        offsets.observe(1);
        offsets.observe(3);
        let mut errors = Tally::default();
        errors.add("closed 4004", 1);
        c.on(Event::Done(Box::new(Summary {
            delivered: 2,
            delivered_measured: 1,
            offsets,
            unstamped: 0,
            errors,
            closed_early: true,
            samples: h,
        })));
        assert_eq!((c.ready, c.failed, c.done), (1, 1, 1));
        assert_eq!(c.latency.len(), 2);
        assert_eq!(c.p99_ms(), Some(0.7));
        assert_eq!(c.lost_in_gaps(), 1);
        assert_eq!(c.lost_in_tails(Some(10)), Some(7));
        assert_eq!(c.lost_in_tails(None), None);
        assert_eq!(c.first_failure.as_deref(), Some("tcp: refused"));
        assert_eq!((c.closed_early, c.errors.total()), (1, 1));
    }
}
