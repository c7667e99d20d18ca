//! Measurements: HDR histograms in microseconds, their summaries, live counters for the
//! progress line, and tallies of errors by kind.
//!
//! Hot-path latencies are buffered per task as raw samples ([`Samples`]: a plain `Vec`
//! push, no lock) and handed to the collector, which records them into one histogram.
//! A histogram per connection was tried first: at 3 significant figures it weighs 16 to
//! 100 KiB (growing with the largest latency), and replacing and merging one per
//! connection per second cost more CPU than the whole WebSocket path at 5000 connections.
//! Histograms start small and grow with the largest value seen (3 significant figures:
//! 1 µs resolution below 2 ms, 0.1% above).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};

use hdrhistogram::Histogram;
use serde::Serialize;

pub type Hist = Histogram<u64>;

/// Larger samples are recorded as this (one hour): a garbage timestamp must not grow a
/// histogram to cover all of u64. (It also fits a `u32`.)
pub const MAX_RECORDED_US: u64 = 3_600_000_000;

pub fn new_hist() -> Hist {
    // 3 significant figures is within hdrhistogram's 0..=5, so creation cannot fail.
    Histogram::new(3).unwrap_or_else(|_| unreachable!("3 significant figures is valid"))
}

#[inline]
pub fn record(h: &mut Hist, us: u64) {
    let us = us.min(MAX_RECORDED_US);
    // `record` grows the histogram as needed (`saturating_record` would clamp instead); it
    // fails only if growing fails, and then clamping is the best left to do.
    if h.record(us).is_err() {
        h.saturating_record(us);
    }
}

pub fn merge(into: &mut Hist, from: &Hist) {
    // `into` auto-resizes (every histogram here comes from `new_hist`), so adding a
    // histogram of any range succeeds.
    let _ = into.add(from);
}

/// Latency samples (µs) buffered by one task until it hands them to the collector.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Samples(Vec<u32>);

impl Samples {
    /// Hand samples over at least this often (bounds a task's buffer to 16 KiB).
    pub const FLUSH_AT: usize = 4096;

    #[inline]
    pub fn push(&mut self, us: u64) {
        self.0.push(us.min(MAX_RECORDED_US) as u32);
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Takes the buffered samples, leaving this buffer empty.
    pub fn take(&mut self) -> Samples {
        Samples(std::mem::take(&mut self.0))
    }

    pub fn record_into(&self, h: &mut Hist) {
        for &us in &self.0 {
            record(h, u64::from(us));
        }
    }

    #[cfg(test)]
    pub fn min(&self) -> Option<u32> {
        self.0.iter().copied().min()
    }
}

/// Latency samples (µs) tagged with the schedule sequence number of the send they time,
/// for reports that split a run into phases only known afterwards (before, during and
/// after a reconnect storm): the schedule maps each number back to its intended time.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct SeqSamples(Vec<(u64, u32)>);

impl SeqSamples {
    #[inline]
    pub fn push(&mut self, seq: u64, us: u64) {
        self.0.push((seq, us.min(MAX_RECORDED_US) as u32));
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn append(&mut self, other: &mut SeqSamples) {
        self.0.append(&mut other.0);
    }

    /// Records the samples whose sequence number is in `range` into `h`.
    pub fn record_range(&self, range: std::ops::Range<u64>, h: &mut Hist) {
        for &(seq, us) in &self.0 {
            if range.contains(&seq) {
                record(h, u64::from(us));
            }
        }
    }
}

/// Percentiles of a latency histogram, in milliseconds rounded to the microsecond.
#[derive(Serialize, Clone, Copy, Debug, PartialEq)]
pub struct Summary {
    pub count: u64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
    pub mean_ms: f64,
}

impl Summary {
    /// `None` when nothing was recorded.
    pub fn of(h: &Hist) -> Option<Self> {
        if h.is_empty() {
            return None;
        }
        let q = |q: f64| us_to_ms(h.value_at_quantile(q));
        Some(Summary {
            count: h.len(),
            p50_ms: q(0.50),
            p90_ms: q(0.90),
            p99_ms: q(0.99),
            p999_ms: q(0.999),
            max_ms: us_to_ms(h.max()),
            mean_ms: round3(h.mean() / 1000.0),
        })
    }
}

pub fn us_to_ms(us: u64) -> f64 {
    round3(us as f64 / 1000.0)
}

pub fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// Counters read by the once-a-second progress line. Writers add per frame or per batch,
/// not per message, to keep cache-line traffic low.
#[derive(Default, Debug)]
pub struct Live {
    /// Publications handed to the server.
    pub sent: AtomicU64,
    /// Publications that failed (error reply, HTTP error, broken connection).
    pub publish_failed: AtomicU64,
    /// Publications written and not answered yet (acknowledged, refused or given up).
    pub outstanding: AtomicU64,
    /// Acknowledged publications whose `seq` is in the measured window.
    pub acked_measured: AtomicU64,
    /// `pub` pushes received by all subscribers.
    pub delivered: AtomicU64,
    /// Of those, the ones whose `seq` is in the measured window.
    pub delivered_measured: AtomicU64,
    /// Publications a subscriber never saw (gaps in offsets).
    pub lost: AtomicU64,
    /// Everything else that went wrong (closed sockets, undecodable frames...).
    pub errors: AtomicU64,
    /// Subscriber connections currently open.
    pub open: AtomicU64,
}

impl Live {
    #[inline]
    pub fn add(counter: &AtomicU64, n: u64) {
        if n > 0 {
            counter.fetch_add(n, Ordering::Relaxed);
        }
    }

    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }

    pub fn dec(counter: &AtomicU64) {
        // Only ever called after a matching increment.
        counter.fetch_sub(1, Ordering::Relaxed);
    }

    /// Saturating: a gauge must not wrap around if ever decremented once too often.
    pub fn sub(counter: &AtomicU64, n: u64) {
        if n > 0 {
            let _ = counter.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| {
                Some(v.saturating_sub(n))
            });
        }
    }
}

/// Errors counted by kind (`"subscribe error 103"`, `"closed 4004"`...).
#[derive(Default, Debug, Clone, Serialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct Tally(BTreeMap<String, u64>);

impl Tally {
    pub fn add(&mut self, kind: impl Into<String>, n: u64) {
        if n > 0 {
            *self.0.entry(kind.into()).or_default() += n;
        }
    }

    pub fn merge(&mut self, other: &Tally) {
        for (kind, n) in &other.0 {
            self.add(kind.clone(), *n);
        }
    }

    pub fn total(&self) -> u64 {
        self.0.values().sum()
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, u64)> {
        self.0.iter().map(|(k, n)| (k.as_str(), *n))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn merged_histograms_keep_every_sample() {
        let mut a = new_hist();
        let mut b = new_hist();
        for us in 1..=900 {
            record(&mut a, us);
        }
        for _ in 0..100 {
            record(&mut b, 50_000); // 50 ms: forces a resize of the merge target
        }
        let mut total = new_hist();
        merge(&mut total, &a);
        merge(&mut total, &b);
        let s = Summary::of(&total).unwrap();
        assert_eq!(s.count, 1000);
        assert_eq!(s.p50_ms, 0.5);
        assert_eq!(s.p90_ms, 0.9);
        assert!((49.9..=50.1).contains(&s.p99_ms), "{s:?}");
        assert!((49.9..=50.1).contains(&s.max_ms), "{s:?}");
    }

    #[test]
    fn samples_buffer_and_record_into_one_histogram() {
        let mut a = Samples::default();
        a.push(100);
        a.push(u64::MAX);
        let taken = a.take();
        assert!(a.is_empty());
        assert_eq!(taken.len(), 2);
        let mut h = new_hist();
        taken.record_into(&mut h);
        assert_eq!(h.len(), 2);
        assert_eq!(h.min(), 100);
        assert!(h.max() >= MAX_RECORDED_US);
    }

    #[test]
    fn sequence_tagged_samples_split_by_range() {
        let mut a = SeqSamples::default();
        for seq in 0..10 {
            a.push(seq, 100 * (seq + 1));
        }
        let mut b = SeqSamples::default();
        b.push(10, u64::MAX);
        a.append(&mut b);
        assert_eq!((a.len(), b.len()), (11, 0));
        let mut during = new_hist();
        a.record_range(3..5, &mut during);
        assert_eq!((during.len(), during.min(), during.max()), (2, 400, 500));
        let mut after = new_hist();
        a.record_range(10..u64::MAX, &mut after);
        assert!(after.max() >= MAX_RECORDED_US);
    }

    #[test]
    fn empty_histogram_has_no_summary_and_huge_samples_are_capped() {
        let mut h = new_hist();
        assert!(Summary::of(&h).is_none());
        record(&mut h, u64::MAX);
        let max = Summary::of(&h).unwrap().max_ms;
        assert!((max - MAX_RECORDED_US as f64 / 1000.0).abs() / max < 0.001);
    }

    #[test]
    fn tally_merges_by_kind() {
        let mut a = Tally::default();
        a.add("closed 4004", 2);
        a.add("nothing", 0);
        let mut b = Tally::default();
        b.add("closed 4004", 1);
        b.add("subscribe error 103", 1);
        a.merge(&b);
        assert_eq!(a.total(), 4);
        assert_eq!(
            a.iter().collect::<Vec<_>>(),
            [("closed 4004", 3), ("subscribe error 103", 1)]
        );
    }
}
