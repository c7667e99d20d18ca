//! Open-loop pacing: send `n` is due at `start + n / rate`, whatever happened to the sends
//! before it. A slow server or a slow transport never delays the schedule; it makes sends
//! late, and latency is measured from the intended time, so the lateness is counted
//! (no coordinated omission).
//!
//! The pacer runs on its own OS thread: `std::thread::sleep` wakes within tens of
//! microseconds, where tokio's timer wheel rounds every sleep up to the next millisecond,
//! which at 1000 msg/s would add up to 1 ms of the generator's own jitter to each sample.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use tokio::sync::{Semaphore, mpsc, oneshot};

use crate::error::Result;

/// A send that happens more than this after its intended time counts as late: the
/// generator (or the transport it feeds) fell behind schedule.
pub const LATE: Duration = Duration::from_millis(10);

/// The intended send times of an open-loop run.
#[derive(Clone, Copy, Debug)]
pub struct Schedule {
    start: Instant,
    rate: f64,
}

impl Schedule {
    pub fn new(start: Instant, rate_per_sec: f64) -> Result<Self> {
        if !(rate_per_sec.is_finite() && rate_per_sec > 0.0) {
            return Err(format!("rate must be a positive number, got {rate_per_sec}").into());
        }
        Ok(Schedule {
            start,
            rate: rate_per_sec,
        })
    }

    pub fn start(&self) -> Instant {
        self.start
    }

    /// When send `n` (0-based) is due, relative to the start. Computed from `n` directly,
    /// never by adding intervals, so rounding cannot drift over a long run.
    pub fn offset(&self, n: u64) -> Duration {
        let nanos = (n as f64 * 1e9 / self.rate).ceil();
        Duration::from_nanos(if nanos >= u64::MAX as f64 {
            u64::MAX
        } else {
            nanos as u64
        })
    }

    pub fn at(&self, n: u64) -> Instant {
        self.start + self.offset(n)
    }

    /// How many sends are due strictly before `d` after the start: sends `0..count_before(d)`
    /// fall in `[0, d)`. Exact with respect to [`Schedule::offset`].
    pub fn count_before(&self, d: Duration) -> u64 {
        let mut n = (d.as_secs_f64() * self.rate).ceil() as u64;
        while n > 0 && self.offset(n - 1) >= d {
            n -= 1;
        }
        while self.offset(n) < d {
            n += 1;
        }
        n
    }
}

/// Which sends are measured: those in `[first, end)` (by sequence number, so the window is
/// defined by the schedule, not by when anything arrived).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Window {
    pub first: u64,
    pub end: u64,
}

impl Window {
    pub fn of(schedule: &Schedule, warmup: Duration, duration: Duration) -> Self {
        Window {
            first: schedule.count_before(warmup),
            end: schedule.count_before(warmup + duration),
        }
    }

    pub fn contains(&self, seq: u64) -> bool {
        (self.first..self.end).contains(&seq)
    }

    pub fn count(&self) -> u64 {
        self.end - self.first
    }

    /// The measured sends of a closed loop ([`spawn_closed_loop`]).
    pub const CLOSED_LOOP: Window = Window {
        first: CLOSED_LOOP_MEASURED,
        end: u64::MAX,
    };
}

/// In a closed loop the measured window is a phase, not a stretch of a schedule: sends
/// made during the warmup are numbered from 0 and measured ones from this, so
/// [`Window::CLOSED_LOOP`] tells them apart by sequence number as for a schedule (in
/// publishers, subscribers and reports alike).
pub const CLOSED_LOOP_MEASURED: u64 = 1 << 40;

/// One send handed to the transport.
#[derive(Clone, Copy, Debug)]
pub struct Tick {
    pub seq: u64,
    pub intended: Instant,
}

#[derive(Clone, Copy, Debug)]
pub struct PacerOutcome {
    /// Sends handed to the transport.
    pub emitted: u64,
    /// Stopped early (interrupt, or the transport went away).
    pub cut_short: bool,
}

/// Starts the pacer thread: it hands sends `0..total` to `tx` at their intended times and
/// reports how it went when done. `stop` ends it early.
pub fn spawn(
    schedule: Schedule,
    total: u64,
    tx: mpsc::Sender<Tick>,
    stop: Arc<AtomicBool>,
) -> Result<oneshot::Receiver<PacerOutcome>> {
    spawn_with(schedule, total, stop, move |tick| {
        tx.blocking_send(tick).is_ok()
    })
}

/// Starts the pacer thread with any transport: `deliver` is called on the pacer thread with
/// each send at its intended time, and returns false when the transport is gone (the run is
/// then cut short). It must not block for long: that would delay the sends after it. It is
/// dropped when the pacer ends, so senders it owns close then.
pub fn spawn_with<F>(
    schedule: Schedule,
    total: u64,
    stop: Arc<AtomicBool>,
    mut deliver: F,
) -> Result<oneshot::Receiver<PacerOutcome>>
where
    F: FnMut(Tick) -> bool + Send + 'static,
{
    let (done_tx, done_rx) = oneshot::channel();
    thread::Builder::new()
        .name("rtload-pacer".into())
        .spawn(move || {
            let mut emitted = 0;
            let mut cut_short = false;
            'sends: for seq in 0..total {
                let intended = schedule.at(seq);
                loop {
                    if stop.load(Ordering::Relaxed) {
                        cut_short = true;
                        break 'sends;
                    }
                    let now = Instant::now();
                    if now >= intended {
                        break;
                    }
                    thread::sleep((intended - now).min(Duration::from_millis(50)));
                }
                if !deliver(Tick { seq, intended }) {
                    cut_short = true;
                    break;
                }
                emitted += 1;
            }
            drop(deliver);
            // The receiver may be gone if the run was abandoned; nothing to tell then.
            let _ = done_tx.send(PacerOutcome { emitted, cut_short });
        })?;
    Ok(done_rx)
}

/// Starts a closed loop (a tokio task): a send as soon as one of `slots` is free, due at
/// once; the transport gives a slot back for each send that ends, so `slots` sends are in
/// flight at all times. Sends before `measure_from` are numbered from 0, later ones from
/// [`CLOSED_LOOP_MEASURED`]; none is made from `end` on. `stop` ends it early.
pub fn spawn_closed_loop(
    tx: mpsc::Sender<Tick>,
    slots: Arc<Semaphore>,
    measure_from: Instant,
    end: Instant,
    stop: Arc<AtomicBool>,
) -> oneshot::Receiver<PacerOutcome> {
    let (done_tx, done_rx) = oneshot::channel();
    tokio::spawn(async move {
        let (mut warmup, mut measured) = (0u64, 0u64);
        let mut cut_short = false;
        loop {
            if stop.load(Ordering::Relaxed) {
                cut_short = true;
                break;
            }
            // Wake up now and then to notice `stop` and `end` while every slot is taken.
            let free = tokio::time::timeout(Duration::from_millis(50), slots.acquire()).await;
            let permit = match free {
                Ok(Ok(permit)) => permit,
                Ok(Err(_)) => {
                    cut_short = true;
                    break;
                }
                Err(_) if Instant::now() >= end => break,
                Err(_) => continue,
            };
            let now = Instant::now();
            if now >= end {
                break;
            }
            permit.forget();
            let seq = if now < measure_from {
                warmup += 1;
                warmup - 1
            } else {
                measured += 1;
                CLOSED_LOOP_MEASURED + measured - 1
            };
            if tx.send(Tick { seq, intended: now }).await.is_err() {
                cut_short = true;
                break;
            }
        }
        drop(tx);
        let _ = done_tx.send(PacerOutcome {
            emitted: warmup + measured,
            cut_short,
        });
    });
    done_rx
}

/// Spreads one schedule over connections, round-robin: send `n` goes to connection
/// `n % connections`. With a total rate R over C connections, each connection sends every
/// C / R seconds, and consecutive connections are 1 / R apart: the load is even in time
/// and over connections, never a burst from all of them at once.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Spread {
    connections: usize,
}

impl Spread {
    pub fn new(connections: usize) -> Result<Self> {
        if connections == 0 {
            return Err("no connection to spread the sends over".into());
        }
        Ok(Spread { connections })
    }

    #[inline]
    pub fn conn_of(&self, seq: u64) -> usize {
        (seq % self.connections as u64) as usize
    }

    /// The interval between two sends of one connection.
    pub fn per_conn_interval(&self, total_rate: f64) -> Duration {
        Duration::from_secs_f64(self.connections as f64 / total_rate)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn schedule(rate: f64) -> Schedule {
        Schedule::new(Instant::now(), rate).unwrap()
    }

    #[test]
    fn offsets_follow_the_rate_without_drift() {
        let s = schedule(1000.0);
        assert_eq!(s.offset(0), Duration::ZERO);
        assert_eq!(s.offset(1), Duration::from_millis(1));
        assert_eq!(s.offset(3_600_000), Duration::from_secs(3600));
        let s = schedule(3.0);
        assert_eq!(s.offset(1), Duration::from_nanos(333_333_334));
        assert_eq!(s.offset(3), Duration::from_secs(1));
        assert_eq!(schedule(0.5).offset(3), Duration::from_secs(6));
    }

    #[test]
    fn count_before_is_exact_at_boundaries() {
        let s = schedule(1000.0);
        assert_eq!(s.count_before(Duration::ZERO), 0);
        assert_eq!(s.count_before(Duration::from_nanos(1)), 1);
        assert_eq!(s.count_before(Duration::from_secs(1)), 1000);
        assert_eq!(s.count_before(Duration::from_nanos(1_000_000_001)), 1001);
        assert_eq!(schedule(3.0).count_before(Duration::from_secs(1)), 3);
        assert_eq!(schedule(0.5).count_before(Duration::from_secs(3)), 2);
        for rate in [1.0, 7.0, 333.3, 1000.0, 12_345.0] {
            let s = schedule(rate);
            for ms in [1u64, 10, 999, 1000, 1001, 20_000] {
                let d = Duration::from_millis(ms);
                let n = s.count_before(d);
                assert!(n == 0 || s.offset(n - 1) < d, "rate {rate} d {d:?}");
                assert!(s.offset(n) >= d, "rate {rate} d {d:?}");
            }
        }
    }

    #[test]
    fn window_counts_measured_sends() {
        let s = schedule(1000.0);
        let w = Window::of(&s, Duration::from_secs(3), Duration::from_secs(20));
        assert_eq!((w.first, w.end, w.count()), (3000, 23_000, 20_000));
        assert!(!w.contains(2999) && w.contains(3000) && w.contains(22_999) && !w.contains(23_000));
    }

    #[test]
    fn rejects_nonsense_rates() {
        for rate in [0.0, -1.0, f64::NAN, f64::INFINITY] {
            assert!(Schedule::new(Instant::now(), rate).is_err());
        }
    }

    #[tokio::test]
    async fn pacer_emits_on_schedule_and_in_order() {
        let s = Schedule::new(Instant::now(), 2000.0).unwrap();
        let (tx, mut rx) = mpsc::channel(16);
        let done = spawn(s, 100, tx, Arc::new(AtomicBool::new(false))).unwrap();
        let mut seqs = Vec::new();
        while let Some(tick) = rx.recv().await {
            assert!(Instant::now() >= tick.intended);
            assert_eq!(tick.intended, s.at(tick.seq));
            seqs.push(tick.seq);
        }
        assert_eq!(seqs, (0..100).collect::<Vec<_>>());
        let outcome = done.await.unwrap();
        assert_eq!((outcome.emitted, outcome.cut_short), (100, false));
    }

    #[test]
    fn spread_gives_every_connection_an_even_share_at_an_even_pace() {
        let s = schedule(1000.0);
        let spread = Spread::new(7).unwrap();
        let mut per_conn: Vec<Vec<u64>> = vec![Vec::new(); 7];
        for seq in 0..7000 {
            per_conn[spread.conn_of(seq)].push(seq);
        }
        assert!(per_conn.iter().all(|sends| sends.len() == 1000));
        // Each connection's sends are 7 ms apart, and connection k starts k ms in.
        for (k, sends) in per_conn.iter().enumerate() {
            assert_eq!(s.offset(sends[0]), Duration::from_millis(k as u64));
            for pair in sends.windows(2) {
                assert_eq!(
                    s.offset(pair[1]) - s.offset(pair[0]),
                    Duration::from_millis(7)
                );
            }
        }
        assert_eq!(spread.per_conn_interval(1000.0), Duration::from_millis(7));
        // An uneven total still differs by at most one send between connections.
        let spread = Spread::new(3).unwrap();
        let mut counts = [0u32; 3];
        (0..10).for_each(|seq| counts[spread.conn_of(seq)] += 1);
        assert_eq!(counts, [4, 3, 3]);
        assert!(Spread::new(0).is_err());
    }

    #[tokio::test]
    async fn pacer_routes_through_any_transport() {
        let s = Schedule::new(Instant::now(), 5000.0).unwrap();
        let spread = Spread::new(3).unwrap();
        let (txs, mut rxs): (Vec<_>, Vec<_>) =
            (0..3).map(|_| mpsc::unbounded_channel::<Tick>()).unzip();
        let done = spawn_with(s, 30, Arc::new(AtomicBool::new(false)), move |tick| {
            txs[spread.conn_of(tick.seq)].send(tick).is_ok()
        })
        .unwrap();
        assert_eq!(done.await.unwrap().emitted, 30);
        for (k, rx) in rxs.iter_mut().enumerate() {
            let mut seqs = Vec::new();
            while let Some(tick) = rx.recv().await {
                seqs.push(tick.seq);
            }
            // The senders went away with the pacer, so each queue ended.
            assert_eq!(seqs, (0..10).map(|i| i * 3 + k as u64).collect::<Vec<_>>());
        }
    }

    #[tokio::test]
    async fn closed_loop_keeps_the_slots_busy_and_numbers_by_phase() {
        let start = Instant::now();
        let slots = Arc::new(Semaphore::new(2));
        let (tx, mut rx) = mpsc::channel(16);
        let done = spawn_closed_loop(
            tx,
            slots.clone(),
            start + Duration::from_millis(60),
            start + Duration::from_millis(150),
            Arc::new(AtomicBool::new(false)),
        );
        let mut seqs = Vec::new();
        while let Some(tick) = rx.recv().await {
            seqs.push(tick.seq);
            tokio::time::sleep(Duration::from_millis(5)).await;
            slots.add_permits(1);
        }
        let outcome = done.await.unwrap();
        assert!(!outcome.cut_short);
        assert_eq!(outcome.emitted, seqs.len() as u64);
        let warmup: Vec<u64> = seqs
            .iter()
            .copied()
            .filter(|s| *s < CLOSED_LOOP_MEASURED)
            .collect();
        let measured: Vec<u64> = seqs
            .iter()
            .copied()
            .filter(|s| Window::CLOSED_LOOP.contains(*s))
            .collect();
        assert!(!warmup.is_empty() && !measured.is_empty(), "{seqs:?}");
        assert_eq!(warmup, (0..warmup.len() as u64).collect::<Vec<_>>());
        assert_eq!(measured[0], CLOSED_LOOP_MEASURED);
        assert_eq!(seqs.len(), warmup.len() + measured.len());
        // One send ends every 5 ms, so about 30 in 150 ms: the loop waits for free slots.
        assert!(seqs.len() < 60, "{}", seqs.len());
    }

    #[tokio::test]
    async fn pacer_stops_when_asked() {
        let s = Schedule::new(Instant::now(), 1.0).unwrap();
        let (tx, mut rx) = mpsc::channel(16);
        let stop = Arc::new(AtomicBool::new(false));
        let done = spawn(s, 1000, tx, stop.clone()).unwrap();
        assert_eq!(rx.recv().await.unwrap().seq, 0);
        stop.store(true, Ordering::Relaxed);
        let outcome = done.await.unwrap();
        assert!(outcome.cut_short);
        assert_eq!(outcome.emitted, 1);
    }
}
