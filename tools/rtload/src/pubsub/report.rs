//! The report sections of publish/subscribe runs (fanout, chat, http-publish): each a
//! struct, serialized as is into the JSON report, built from the collector and the
//! publishers' counts, and rendered as one line of text.

use std::time::Duration;

use serde::Serialize;

use super::Outcome;
use crate::collector::Collector;
use crate::publish::PubStats;
use crate::report::{Errors, latency_line, p50_p99, per_sec};
use crate::stats::Summary;

#[derive(Serialize, Debug)]
pub struct Connections {
    pub requested: usize,
    pub established: usize,
    pub failed: usize,
    pub open_at_end: u64,
    pub closed_early: u64,
    pub connect_ms: Option<Summary>,
    pub subscribe_ms: Option<Summary>,
}

#[derive(Serialize, Debug)]
pub struct Publishing {
    /// Publications per second offered; 0 for a closed loop.
    pub offered_rate: f64,
    /// Measured publications sent per second.
    pub achieved_rate: f64,
    /// Measured publications acknowledged per second (the throughput).
    pub acked_rate: f64,
    /// Measured-window counts.
    pub sent: u64,
    pub acked: u64,
    pub failed: u64,
    /// Intended send time → acknowledgement.
    pub ack_ms: Option<Summary>,
    /// Intended send time → written to the socket (the generator's own delay).
    pub send_lag_ms: Option<Summary>,
}

#[derive(Serialize, Debug)]
pub struct Delivery {
    /// Measured publications received, summed over subscribers.
    pub delivered: u64,
    /// Acknowledged measured publications × the subscribers of their channel.
    pub expected: u64,
    pub ratio: Option<f64>,
    pub rate: f64,
    /// `pub` pushes without rtload's stamp (another publisher on the channel).
    pub unstamped: u64,
}

#[derive(Serialize, Debug)]
pub struct Lost {
    pub total: u64,
    /// Skipped offsets between received publications.
    pub gaps: u64,
    /// Acknowledged publications after a subscriber's last received one.
    pub tail: Option<u64>,
    pub out_of_order: u64,
}

/// The measured span in seconds of a publish/subscribe run (see
/// [`crate::report::measured_secs`]); `period` is 0 for a closed loop.
pub fn measured_secs(pubs: &PubStats, outcome: &Outcome, period: f64, planned: Duration) -> f64 {
    crate::report::measured_secs(
        pubs.last_write,
        outcome.measure_start,
        period,
        planned,
        outcome.interrupted || outcome.cut_short,
    )
}

/// Setup failures, subscribers' errors and the publishers' (whole run).
pub fn errors_of(col: &Collector, pubs: &PubStats) -> Errors {
    let mut kinds = col.setup.errors.clone();
    kinds.merge(&col.errors);
    kinds.merge(&pubs.errors);
    Errors::of(kinds)
}

impl Connections {
    pub fn of(requested: usize, col: &Collector, open_at_end: u64) -> Self {
        Connections {
            requested,
            established: col.setup.ready,
            failed: col.setup.failed,
            open_at_end,
            closed_early: col.closed_early,
            connect_ms: Summary::of(&col.setup.connect),
            subscribe_ms: Summary::of(&col.subscribe),
        }
    }

    pub fn render(&self, out: &mut String) {
        *out += &format!(
            "connections   {} of {} established, {} failed, {} open at end; connect {}; subscribe {}\n",
            self.established,
            self.requested,
            self.failed,
            self.open_at_end,
            p50_p99(self.connect_ms.as_ref()),
            p50_p99(self.subscribe_ms.as_ref()),
        );
    }
}

impl Publishing {
    pub fn of(offered_rate: f64, pubs: &PubStats, secs: f64) -> Self {
        Publishing {
            offered_rate,
            achieved_rate: per_sec(pubs.sent_measured, secs),
            acked_rate: per_sec(pubs.ok_measured, secs),
            sent: pubs.sent_measured,
            acked: pubs.ok_measured,
            failed: pubs.failed_measured,
            ack_ms: Summary::of(&pubs.ack),
            send_lag_ms: Summary::of(&pubs.lag),
        }
    }

    /// `publish       offered 100.0/s, achieved 99.9/s (…); ack p50 … / p99 …; send lag …`.
    pub fn render(&self, out: &mut String) {
        let offered = if self.offered_rate > 0.0 {
            format!("{:.1}/s", self.offered_rate)
        } else {
            "closed loop".to_string()
        };
        *out += &format!(
            "publish       offered {offered}, achieved {:.1}/s ({} sent, {} acked, {} failed); ack {}; send lag {}\n",
            self.achieved_rate,
            self.sent,
            self.acked,
            self.failed,
            p50_p99(self.ack_ms.as_ref()),
            p50_p99(self.send_lag_ms.as_ref()),
        );
    }
}

impl Delivery {
    pub fn of(col: &Collector, expected: u64, secs: f64) -> Self {
        Delivery {
            delivered: col.delivered_measured,
            expected,
            ratio: (expected > 0).then(|| col.delivered_measured as f64 / expected as f64),
            rate: per_sec(col.delivered_measured, secs),
            unstamped: col.unstamped,
        }
    }

    /// The delivery line, then the publish-to-deliver latency line.
    pub fn render(&self, latency: Option<&Summary>, out: &mut String) {
        *out += &format!(
            "delivered     {:.1} msg/s ({} of {} expected, {})\n",
            self.rate,
            self.delivered,
            self.expected,
            self.ratio
                .map_or_else(|| "-".to_string(), |r| format!("{:.3}%", r * 100.0)),
        );
        if self.unstamped > 0 {
            *out += &format!(
                "              {} publications on the channel were not rtload's (ignored)\n",
                self.unstamped
            );
        }
        *out += &format!("latency       {}\n", latency_line(latency));
    }
}

impl Lost {
    /// Gaps, and tails up to the newest offset acknowledged on each channel.
    pub fn of(col: &Collector, pubs: &PubStats) -> Self {
        let gaps = col.lost_in_gaps();
        let tail = col.lost_in_tails(&pubs.max_offsets);
        Lost {
            total: gaps + tail.unwrap_or(0),
            gaps,
            tail,
            out_of_order: col.out_of_order(),
        }
    }

    pub fn render(&self, out: &mut String) {
        *out += &format!(
            "lost          {} (gaps {}, tail {}); out of order {}\n",
            self.total,
            self.gaps,
            self.tail.map_or_else(|| "-".to_string(), |t| t.to_string()),
            self.out_of_order,
        );
    }
}
