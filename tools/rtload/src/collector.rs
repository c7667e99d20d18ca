//! The collector: the single owner of everything subscribers report. It records their
//! latency samples into one histogram as they arrive (about once a second from each) and
//! merges their final summaries (and, for chat members, their publishing). [`Setup`], the
//! tally of connection setup, is shared with the request/reply scenarios' collector
//! ([`crate::calls::Collector`]).

use std::collections::BTreeMap;
use std::time::Duration;

use crate::publish::PubStats;
use crate::stats::{self, Hist, Tally};
use crate::subscriber::{Event, OffsetTracker};

/// How connection setup went, every scenario alike.
pub struct Setup {
    pub ready: usize,
    pub failed: usize,
    /// TCP + handshake + `connect` reply.
    pub connect: Hist,
    /// Failures by stage and error code (`"connect error 101"`, `"tcp"`...).
    pub errors: Tally,
    /// The first failure in full, to explain a run that could not start.
    pub first_failure: Option<String>,
}

impl Default for Setup {
    fn default() -> Self {
        Setup {
            ready: 0,
            failed: 0,
            connect: stats::new_hist(),
            errors: Tally::default(),
            first_failure: None,
        }
    }
}

impl Setup {
    pub fn on_ready(&mut self, connect: Duration) {
        self.ready += 1;
        stats::record(&mut self.connect, connect.as_micros() as u64);
    }

    pub fn on_failed(&mut self, kind: String, message: String) {
        self.failed += 1;
        self.errors.add(kind, 1);
        self.first_failure.get_or_insert(message);
    }

    /// Every connection has either come up or failed.
    pub fn settled(&self, requested: usize) -> bool {
        self.ready + self.failed >= requested
    }
}

pub struct Collector {
    pub setup: Setup,
    pub done: usize,
    /// `subscribe` round trip.
    pub subscribe: Hist,
    /// Publish-to-deliver latency of measured publications, all subscribers.
    pub latency: Hist,
    pub delivered: u64,
    pub delivered_measured: u64,
    pub unstamped: u64,
    pub closed_early: u64,
    pub errors: Tally,
    /// Each subscriber that reported: its channel's index and its offsets.
    pub offsets: Vec<(usize, OffsetTracker)>,
    /// What the publishers did (chat members report theirs here; other scenarios merge
    /// their publisher's at the end).
    pub published: PubStats,
    /// Chat members whose writer finished.
    pub writers_done: usize,
}

impl Default for Collector {
    fn default() -> Self {
        Collector {
            setup: Setup::default(),
            done: 0,
            subscribe: stats::new_hist(),
            latency: stats::new_hist(),
            delivered: 0,
            delivered_measured: 0,
            unstamped: 0,
            closed_early: 0,
            errors: Tally::default(),
            offsets: Vec::new(),
            published: PubStats::new(),
            writers_done: 0,
        }
    }
}

impl Collector {
    pub fn on(&mut self, event: Event) {
        match event {
            Event::Ready { connect, subscribe } => {
                self.setup.on_ready(connect);
                stats::record(&mut self.subscribe, subscribe.as_micros() as u64);
            }
            Event::Failed { kind, message } => self.setup.on_failed(kind, message),
            Event::Samples(samples) => samples.record_into(&mut self.latency),
            Event::Done(s) => {
                self.done += 1;
                s.samples.record_into(&mut self.latency);
                self.delivered += s.delivered;
                self.delivered_measured += s.delivered_measured;
                self.unstamped += s.unstamped;
                self.closed_early += u64::from(s.closed_early);
                self.errors.merge(&s.errors);
                self.offsets.push((s.channel, s.offsets));
            }
            Event::Published { stats, writer_done } => {
                self.published.merge(*stats);
                self.writers_done += usize::from(writer_done);
            }
        }
    }

    /// p99 of the measured latency so far, in ms.
    pub fn p99_ms(&self) -> Option<f64> {
        (!self.latency.is_empty()).then(|| stats::us_to_ms(self.latency.value_at_quantile(0.99)))
    }

    pub fn lost_in_gaps(&self) -> u64 {
        self.offsets.iter().map(|(_, o)| o.lost).sum()
    }

    pub fn out_of_order(&self) -> u64 {
        self.offsets.iter().map(|(_, o)| o.out_of_order).sum()
    }

    /// Publications up to the newest acknowledged on its channel (`latest`, by channel
    /// index) that each subscriber never received at the end of its stream (a gap with
    /// nothing after it). `None` if no acknowledged offset is known.
    pub fn lost_in_tails(&self, latest: &BTreeMap<usize, u64>) -> Option<u64> {
        if latest.is_empty() {
            return None;
        }
        Some(
            self.offsets
                .iter()
                .filter_map(|(channel, o)| o.tail(*latest.get(channel)?))
                .sum(),
        )
    }

    /// Deliveries due to the subscribers that reported: each acknowledged measured
    /// publication (`acked`, by channel index) once per subscriber of its channel.
    pub fn expected(&self, acked: &BTreeMap<usize, u64>) -> u64 {
        self.offsets
            .iter()
            .map(|(channel, _)| acked.get(channel).copied().unwrap_or(0))
            .sum()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
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
            channel: 0,
            delivered: 2,
            delivered_measured: 1,
            offsets,
            unstamped: 0,
            errors,
            closed_early: true,
            samples: h,
        })));
        assert_eq!((c.setup.ready, c.setup.failed, c.done), (1, 1, 1));
        assert!(c.setup.settled(2) && !c.setup.settled(3));
        assert_eq!(c.setup.errors.iter().collect::<Vec<_>>(), [("tcp", 1)]);
        assert_eq!(c.latency.len(), 2);
        assert_eq!(c.p99_ms(), Some(0.7));
        assert_eq!(c.lost_in_gaps(), 1);
        assert_eq!(c.lost_in_tails(&BTreeMap::from([(0, 10)])), Some(7));
        assert_eq!(c.lost_in_tails(&BTreeMap::from([(1, 10)])), Some(0));
        assert_eq!(c.lost_in_tails(&BTreeMap::new()), None);
        assert_eq!(c.expected(&BTreeMap::from([(0, 4), (1, 9)])), 4);
        let mut stats = PubStats::new();
        stats.sent = 3;
        c.on(Event::Published {
            stats: Box::new(stats),
            writer_done: true,
        });
        assert_eq!((c.published.sent, c.writers_done), (3, 1));
        assert_eq!(c.setup.first_failure.as_deref(), Some("tcp: refused"));
        assert_eq!((c.closed_early, c.errors.total()), (1, 1));
    }
}
