//! Publishing paced sends: the pacer hands [`Tick`]s to a queue, and a small pool of
//! transport workers takes them: WebSocket `publish` commands on dedicated connections, or
//! `POST /api/publish` over keep-alive HTTP/1.1. Each send carries its *intended* time in
//! `data.t`, so a send delayed by the transport is measured as late, not as on time.

mod over_http;
pub mod over_ws;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use tokio::sync::{Mutex, Semaphore, mpsc, oneshot};
use tokio::task::JoinHandle;

use crate::client::Dialer;
use crate::clock::Clock;
use crate::error::Result;
use crate::http::{HttpConn, HttpTarget};
use crate::pacer::{LATE, Tick, Window};
use crate::stats::{self, Hist, Live, Tally};

/// How publications reach the server.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Via {
    /// The `publish` op on dedicated WebSocket connections.
    Ws,
    /// `POST /api/publish` with the API key.
    Http,
}

pub struct PublishSpec {
    pub via: Via,
    /// Send `n` goes to `channels[n % channels.len()]` (never empty).
    pub channels: Vec<String>,
    pub pad: String,
    pub http_base: String,
    pub api_key: String,
    /// Publisher connections (connection `i` from the dialer's source address for `i`).
    pub connections: usize,
    pub window: Window,
    pub clock: Clock,
    /// How long to wait for outstanding acknowledgements once sending is over.
    pub drain: Duration,
    /// Closed loop: one permit given back for every send that ends, whatever the outcome
    /// (the feeder, [`crate::pacer::spawn_closed_loop`], takes one per send).
    pub slots: Option<Arc<Semaphore>>,
}

/// What the publishers did. Latencies and "measured" counts cover the measured window.
#[derive(Debug)]
pub struct PubStats {
    pub sent: u64,
    pub failed: u64,
    pub sent_measured: u64,
    pub ok_measured: u64,
    pub failed_measured: u64,
    /// Measured sends written more than [`LATE`] after their intended time.
    pub late_measured: u64,
    /// Intended time → acknowledgement.
    pub ack: Hist,
    /// Intended time → written to the socket: the generator's own delay.
    pub lag: Hist,
    pub first_write: Option<Instant>,
    pub last_write: Option<Instant>,
    /// Highest offset the server acknowledged, by index in [`PublishSpec::channels`] (to
    /// find subscribers' missing tails).
    pub max_offsets: BTreeMap<usize, u64>,
    /// Measured acknowledgements by channel index (what each channel's subscribers should
    /// receive).
    pub acked_by_channel: BTreeMap<usize, u64>,
    /// Failures of the whole run by kind (`publish error 103`, `publish http 503 code 113`).
    pub errors: Tally,
    /// The measured sends' failures by kind.
    pub failed_by_kind: Tally,
    /// `Retry-After` of refused HTTP publishes, in µs (reports show ms).
    pub retry_after: Hist,
}

impl PublishSpec {
    /// The index and name of the channel send `seq` goes to.
    pub fn channel_of(&self, seq: u64) -> (usize, &str) {
        let i = (seq % self.channels.len().max(1) as u64) as usize;
        (i, self.channels.get(i).map_or("", String::as_str))
    }

    /// Ends one send: its outcome counted in `stats`, the live counters moved (`written`:
    /// it went out, so it was outstanding) and, in a closed loop, its slot given back.
    pub fn settle(
        &self,
        stats: &mut PubStats,
        tick: &Tick,
        outcome: Result<Option<u64>, String>,
        written: bool,
        live: &Live,
    ) {
        match &outcome {
            Ok(_) if self.window.contains(tick.seq) => Live::add(&live.acked_measured, 1),
            Ok(_) => {}
            Err(_) => Live::add(&live.publish_failed, 1),
        }
        if written {
            Live::sub(&live.outstanding, 1);
        }
        stats.on_ack(tick, self.channel_of(tick.seq).0, outcome, &self.window);
        if let Some(slots) = &self.slots {
            slots.add_permits(1);
        }
    }
}

impl Default for PubStats {
    fn default() -> Self {
        PubStats::new()
    }
}

impl PubStats {
    pub fn new() -> Self {
        PubStats {
            sent: 0,
            failed: 0,
            sent_measured: 0,
            ok_measured: 0,
            failed_measured: 0,
            late_measured: 0,
            ack: stats::new_hist(),
            lag: stats::new_hist(),
            first_write: None,
            last_write: None,
            max_offsets: BTreeMap::new(),
            acked_by_channel: BTreeMap::new(),
            errors: Tally::default(),
            failed_by_kind: Tally::default(),
            retry_after: stats::new_hist(),
        }
    }

    fn on_write(&mut self, tick: &Tick, now: Instant, window: &Window) {
        self.sent += 1;
        if window.contains(tick.seq) {
            let lag = now.saturating_duration_since(tick.intended);
            self.sent_measured += 1;
            stats::record(&mut self.lag, lag.as_micros() as u64);
            if lag > LATE {
                self.late_measured += 1;
            }
            self.first_write.get_or_insert(now);
            self.last_write = Some(now);
        }
    }

    fn on_ack(
        &mut self,
        tick: &Tick,
        channel: usize,
        outcome: Result<Option<u64>, String>,
        window: &Window,
    ) {
        let measured = window.contains(tick.seq);
        match outcome {
            Ok(offset) => {
                if measured {
                    self.ok_measured += 1;
                    *self.acked_by_channel.entry(channel).or_default() += 1;
                    let us = tick.intended.elapsed().as_micros() as u64;
                    stats::record(&mut self.ack, us);
                }
                if let Some(offset) = offset {
                    let max = self.max_offsets.entry(channel).or_default();
                    *max = (*max).max(offset);
                }
            }
            Err(kind) => {
                self.failed += 1;
                if measured {
                    self.failed_measured += 1;
                    self.failed_by_kind.add(kind.clone(), 1);
                }
                self.errors.add(kind, 1);
            }
        }
    }

    pub fn merge(&mut self, o: PubStats) {
        self.sent += o.sent;
        self.failed += o.failed;
        self.sent_measured += o.sent_measured;
        self.ok_measured += o.ok_measured;
        self.failed_measured += o.failed_measured;
        self.late_measured += o.late_measured;
        stats::merge(&mut self.ack, &o.ack);
        stats::merge(&mut self.lag, &o.lag);
        self.first_write = match (self.first_write, o.first_write) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        self.last_write = self.last_write.max(o.last_write);
        for (channel, offset) in o.max_offsets {
            let max = self.max_offsets.entry(channel).or_default();
            *max = (*max).max(offset);
        }
        for (channel, n) in o.acked_by_channel {
            *self.acked_by_channel.entry(channel).or_default() += n;
        }
        self.errors.merge(&o.errors);
        self.failed_by_kind.merge(&o.failed_by_kind);
        stats::merge(&mut self.retry_after, &o.retry_after);
    }
}

#[cfg(test)]
impl PubStats {
    /// `measured` sends, all acknowledged, the last written `last` after `start`.
    pub fn for_tests(start: Instant, measured: u64, last: Duration, max_offset: u64) -> Self {
        let mut s = PubStats::new();
        s.sent = measured;
        s.sent_measured = measured;
        s.ok_measured = measured;
        s.first_write = Some(start);
        s.last_write = Some(start + last);
        s.max_offsets.insert(0, max_offset);
        s
    }
}

pub type Queue = Arc<Mutex<mpsc::Receiver<Tick>>>;

/// The publisher thread, running the transport workers.
pub struct Publisher {
    done: oneshot::Receiver<PubStats>,
}

/// Opens the publishing connections and starts their workers, on a thread and
/// single-threaded runtime of their own: subscriber tasks on the main runtime, however
/// busy, cannot then delay a send behind them in a run queue (which would show up as
/// latency that is the generator's, not the server's). Feed the returned sender from the
/// pacer; dropping it ends the workers once they have drained.
pub async fn start(
    spec: Arc<PublishSpec>,
    dialer: Arc<Dialer>,
    live: Arc<Live>,
) -> Result<(mpsc::Sender<Tick>, Publisher)> {
    let (tx, rx) = mpsc::channel(4096);
    let (ready_tx, ready_rx) = oneshot::channel::<Result<()>>();
    let (done_tx, done_rx) = oneshot::channel();
    std::thread::Builder::new()
        .name("rtload-publisher".into())
        .spawn(move || {
            let runtime = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(runtime) => runtime,
                Err(e) => {
                    let _ = ready_tx.send(Err(e.into()));
                    return;
                }
            };
            runtime.block_on(async move {
                let workers = match open_workers(spec, &dialer, rx, live).await {
                    Ok(workers) => {
                        let _ = ready_tx.send(Ok(()));
                        workers
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                        return;
                    }
                };
                let mut total = PubStats::new();
                for worker in workers {
                    match worker.await {
                        Ok(stats) => total.merge(stats),
                        Err(e) => total.errors.add(format!("publisher task failed: {e}"), 1),
                    }
                }
                let _ = done_tx.send(total);
            });
        })?;
    ready_rx
        .await
        .map_err(|_| "the publisher thread died during setup")??;
    Ok((tx, Publisher { done: done_rx }))
}

async fn open_workers(
    spec: Arc<PublishSpec>,
    dialer: &Dialer,
    rx: mpsc::Receiver<Tick>,
    live: Arc<Live>,
) -> Result<Vec<JoinHandle<PubStats>>> {
    let queue: Queue = Arc::new(Mutex::new(rx));
    let mut workers = Vec::new();
    match spec.via {
        Via::Ws => {
            for i in 0..spec.connections {
                let (conn, _) = dialer.open(i).await?;
                let encoding = conn.encoding;
                workers.push(tokio::spawn(over_ws::ws_worker(
                    conn.ws,
                    encoding,
                    queue.clone(),
                    spec.clone(),
                    live.clone(),
                )));
            }
        }
        Via::Http => {
            let target = Arc::new(HttpTarget::new(&spec.http_base).await?);
            for i in 0..spec.connections {
                let source = dialer.source_for(i);
                let conn = HttpConn::connect(&target, source).await?;
                workers.push(tokio::spawn(over_http::http_worker(
                    conn,
                    source,
                    target.clone(),
                    queue.clone(),
                    spec.clone(),
                    live.clone(),
                )));
            }
        }
    }
    Ok(workers)
}

impl Publisher {
    /// Waits for the workers (after the pacer's sender is gone) and returns their stats.
    pub async fn finish(self) -> PubStats {
        self.done.await.unwrap_or_else(|_| {
            let mut stats = PubStats::new();
            stats.errors.add("the publisher thread died", 1);
            stats
        })
    }
}

async fn next_batch(queue: &Queue, max: usize) -> Option<Vec<Tick>> {
    let mut rx = queue.lock().await;
    let first = rx.recv().await?;
    let mut batch = vec![first];
    while batch.len() < max {
        match rx.try_recv() {
            Ok(tick) => batch.push(tick),
            Err(_) => break,
        }
    }
    Some(batch)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn window() -> Window {
        Window { first: 10, end: 20 }
    }

    #[test]
    fn only_the_measured_window_is_timed() {
        let start = Instant::now();
        let mut s = PubStats::new();
        for seq in 0..30 {
            let tick = Tick {
                seq,
                intended: start,
            };
            s.on_write(&tick, start + Duration::from_millis(seq), &window());
            let outcome = if seq % 10 == 5 {
                Err("publish error 103".to_string())
            } else {
                Ok(Some(seq + 1))
            };
            s.on_ack(&tick, (seq % 2) as usize, outcome, &window());
        }
        assert_eq!((s.sent, s.sent_measured), (30, 10));
        assert_eq!((s.ok_measured, s.failed_measured, s.failed), (9, 1, 3));
        // seq 11..=19 were written more than 10 ms after their intended time
        assert_eq!(s.late_measured, 9);
        assert_eq!(s.lag.len(), 10);
        assert_eq!(s.acked_by_channel, BTreeMap::from([(0, 5), (1, 4)]));
        assert_eq!(s.failed_by_kind.total(), 1);
        assert_eq!(s.max_offsets, BTreeMap::from([(0, 29), (1, 30)]));
        assert_eq!(s.errors.total(), 3);
        assert_eq!(s.last_write, Some(start + Duration::from_millis(19)));
    }

    #[test]
    fn merge_adds_counts_and_keeps_extremes() {
        let t0 = Instant::now();
        let mut a = PubStats::new();
        a.sent = 5;
        a.first_write = Some(t0 + Duration::from_secs(1));
        a.max_offsets.insert(0, 9);
        a.max_offsets.insert(1, 2);
        let mut b = PubStats::new();
        b.sent = 7;
        b.first_write = Some(t0);
        b.last_write = Some(t0 + Duration::from_secs(3));
        b.errors.add("publish http 503 code 113", 2);
        b.max_offsets.insert(1, 4);
        a.merge(b);
        assert_eq!(a.sent, 12);
        assert_eq!(a.first_write, Some(t0));
        assert_eq!(a.last_write, Some(t0 + Duration::from_secs(3)));
        assert_eq!(a.max_offsets, BTreeMap::from([(0, 9), (1, 4)]));
        assert_eq!(a.errors.total(), 2);
    }
}
