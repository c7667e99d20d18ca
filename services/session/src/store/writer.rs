//! The write-behind writer: one task owns the database side of the store.
//!
//! **Batching.** When the writer is idle the first write is taken at once
//! (latency first). Writes that arrive while a batch is being written wait
//! for the next one, which starts when `write_batch_size` writes are queued
//! or `write_interval_ms` after the previous batch started, whichever comes
//! first (batching under load). A flush or close cuts any wait short.
//!
//! **Failures.** A batch that fails for a reason retrying can fix (network,
//! database down or refusing connections, pool timeout, a table renamed
//! during maintenance) is kept and retried with capped exponential backoff
//! (100 ms doubling to 5 s), while the enqueue side keeps filling the
//! bounded buffer. A batch the database refuses as data (a constraint, a
//! value it cannot store) is written row by row instead, and only the
//! refused rows are given up, so one bad row never blocks the rest. One
//! warning when the database goes down, one info line when it is back.
//!
//! **Shutdown.** When the last `Store` handle is dropped the writer drains
//! the buffer and exits; if the database is down then, it gives up after
//! three attempts and counts everything left as `result="error"`.

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::sync::{Notify, watch};
use tokio::time::Instant;

use rt_shared::telemetry::RateLimitedLog;

use super::buffer::{Batch, Buffer, Kind};
use super::db::Db;
use super::metrics::StoreMetrics;

const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// A write attempt that takes longer than this (a hung connection) fails.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(30);
/// Attempts per batch once the store is closed, before giving up.
const ATTEMPTS_AFTER_CLOSE: u32 = 3;

/// The writer's progress, watched by [`super::Store::flush`].
#[derive(Debug, Clone, Default)]
pub(super) struct Progress {
    /// Every write with a sequence number up to this one is written or dropped.
    pub completed: u64,
    /// Write attempts started so far (the first is number 1).
    pub attempts: u64,
    /// The number of the last attempt that failed (0: none did).
    pub failed_attempt: u64,
    pub last_error: Option<String>,
    /// The writer task has ended (store closed, or its runtime shut down).
    pub stopped: bool,
}

/// What the enqueue side and the writer share.
pub(super) struct Shared {
    state: Mutex<State>,
    /// Wakes the writer (new work it waits for, a flush, the close).
    wake: Notify,
    pub progress: watch::Sender<Progress>,
    pub metrics: StoreMetrics,
    drop_log: RateLimitedLog,
    refused_log: RateLimitedLog,
}

pub(super) struct State {
    pub buffer: Buffer,
    /// The batch being written, readable so a read sees its own writes.
    pub inflight: Option<Arc<Batch>>,
    /// Wake the writer once this many writes are queued (`usize::MAX`: it
    /// is busy and will look by itself).
    wake_at: usize,
    /// A flush is waiting: write now, skip the batching wait and the backoff.
    urgent: bool,
    closed: bool,
}

impl State {
    pub fn pending(&self) -> usize {
        self.buffer.len() + self.inflight.as_ref().map_or(0, |batch| batch.rows.len())
    }
}

impl Shared {
    pub fn new(capacity: usize, metrics: StoreMetrics) -> Self {
        Self {
            state: Mutex::new(State {
                buffer: Buffer::new(capacity),
                inflight: None,
                wake_at: 1,
                urgent: false,
                closed: false,
            }),
            wake: Notify::new(),
            progress: watch::Sender::new(Progress::default()),
            metrics,
            drop_log: RateLimitedLog::new(10_000),
            refused_log: RateLimitedLog::new(10_000),
        }
    }

    pub fn lock(&self) -> MutexGuard<'_, State> {
        // Buffer operations leave it consistent at every step that can panic.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Queues a write through `push`; never blocks on the database.
    pub fn enqueue(&self, push: impl FnOnce(&mut Buffer) -> Option<Kind>) {
        let (dropped, wake, pending) = {
            let mut state = self.lock();
            let dropped = push(&mut state.buffer);
            let wake = state.buffer.len() >= state.wake_at;
            if wake {
                state.wake_at = usize::MAX;
            }
            (dropped, wake, state.pending())
        };
        if wake {
            self.wake.notify_one();
        }
        self.metrics.pending.set(gauge(pending));
        if let Some(kind) = dropped {
            self.metrics.dropped(kind);
            if let Some(suppressed) = self.drop_log.allow() {
                tracing::warn!(
                    kind = kind.label(),
                    suppressed,
                    "database write buffer full: dropping writes (audit rows first)"
                );
            }
        }
    }

    /// Asks the writer to write everything now; returns the sequence number
    /// a flush waits for.
    pub fn request_flush(&self) -> u64 {
        let target = {
            let mut state = self.lock();
            state.urgent = true;
            state.buffer.last_seq()
        };
        self.wake.notify_one();
        target
    }

    pub fn close(&self) {
        self.lock().closed = true;
        self.wake.notify_one();
    }

    fn is_closed(&self) -> bool {
        self.lock().closed
    }

    /// A batch is done (written or given up): everything up to `max_seq` is settled.
    fn complete(&self, max_seq: u64) {
        let pending = {
            let mut state = self.lock();
            state.inflight = None;
            state.pending()
        };
        self.metrics.pending.set(gauge(pending));
        self.progress
            .send_modify(|progress| progress.completed = progress.completed.max(max_seq));
    }
}

pub(super) struct WriterConfig {
    pub batch_size: usize,
    pub interval: Duration,
}

/// Marks the progress stopped when the writer ends, even when its runtime
/// drops it mid-await, so a flush never waits forever.
struct StopGuard(Arc<Shared>);

impl Drop for StopGuard {
    fn drop(&mut self) {
        self.0
            .progress
            .send_modify(|progress| progress.stopped = true);
    }
}

enum Failure {
    /// Nothing was written; retry the whole batch.
    Transient(String),
    /// Some rows were written one by one; retry the rest.
    Partial(Arc<Batch>, String),
}

struct Writer {
    shared: Arc<Shared>,
    db: Db,
    config: WriterConfig,
    /// When the last write attempt started (paces batches under load).
    last_start: Option<Instant>,
    /// Since when the database has been failing, if it is.
    down_since: Option<Instant>,
    /// Whether the migrations have run (not yet when the store started
    /// with the database unreachable).
    migrated: bool,
}

/// The writer task: runs until the store is closed and drained.
pub(super) async fn run(shared: Arc<Shared>, db: Db, config: WriterConfig, migrated: bool) {
    let _stop = StopGuard(shared.clone());
    let mut writer = Writer {
        shared,
        db,
        config,
        last_start: None,
        down_since: None,
        migrated,
    };
    while let Some(batch) = writer.next_batch().await {
        writer.write(batch).await;
    }
}

impl Writer {
    /// Waits for the next batch; `None` once closed with nothing left.
    async fn next_batch(&mut self) -> Option<Arc<Batch>> {
        let mut was_idle = false;
        loop {
            let due = {
                let mut state = self.shared.lock();
                let queued = state.buffer.len();
                if queued == 0 {
                    let last = state.buffer.last_seq();
                    self.shared.progress.send_if_modified(|progress| {
                        let moved = progress.completed < last;
                        progress.completed = progress.completed.max(last);
                        moved
                    });
                    if state.closed {
                        return None;
                    }
                    state.wake_at = 1;
                    was_idle = true;
                    None
                } else {
                    let due = self
                        .last_start
                        .map_or_else(Instant::now, |start| start + self.config.interval);
                    if was_idle
                        || state.urgent
                        || state.closed
                        || queued >= self.config.batch_size
                        || Instant::now() >= due
                    {
                        state.urgent = false;
                        state.wake_at = usize::MAX;
                        let batch = Arc::new(state.buffer.take(self.config.batch_size));
                        state.inflight = Some(batch.clone());
                        return Some(batch);
                    }
                    state.wake_at = self.config.batch_size;
                    Some(due)
                }
            };
            match due {
                None => self.shared.wake.notified().await,
                Some(due) => {
                    tokio::select! {
                        () = self.shared.wake.notified() => {}
                        () = tokio::time::sleep_until(due) => {}
                    }
                }
            }
        }
    }

    /// Writes `batch`, retrying until it is written (or given up after close).
    async fn write(&mut self, mut batch: Arc<Batch>) {
        let mut backoff = FIRST_BACKOFF;
        let mut failures_after_close = 0;
        loop {
            let mut attempt = 0;
            self.shared.progress.send_modify(|progress| {
                progress.attempts += 1;
                attempt = progress.attempts;
            });
            let started = Instant::now();
            self.last_start = Some(started);
            let result = self.attempt(&batch).await;
            self.shared
                .metrics
                .batch_seconds
                .observe(started.elapsed().as_secs_f64());
            let error = match result {
                Ok(()) => {
                    self.shared.metrics.batch("ok");
                    if let Some(since) = self.down_since.take() {
                        tracing::info!(
                            down_secs = since.elapsed().as_secs(),
                            pending = self.shared.lock().pending(),
                            "database is back: writing the backlog"
                        );
                    }
                    self.shared.complete(batch.max_seq);
                    return;
                }
                Err(Failure::Transient(error)) => error,
                Err(Failure::Partial(rest, error)) => {
                    batch = rest;
                    self.shared.lock().inflight = Some(batch.clone());
                    error
                }
            };
            self.shared.metrics.batch("error");
            self.shared.progress.send_modify(|progress| {
                progress.failed_attempt = attempt;
                progress.last_error = Some(error.clone());
            });
            if self.down_since.is_none() {
                self.down_since = Some(Instant::now());
                tracing::warn!(
                    %error,
                    pending = self.shared.lock().pending(),
                    "database unavailable: writes stay buffered and are retried"
                );
            }
            if self.shared.is_closed() {
                failures_after_close += 1;
                if failures_after_close >= ATTEMPTS_AFTER_CLOSE {
                    self.give_up(&batch, &error);
                    return;
                }
            }
            self.shared.metrics.retries.inc();
            // Back off, unless a flush or the close wants an attempt now.
            tokio::select! {
                () = tokio::time::sleep(backoff) => {}
                () = self.shared.wake.notified() => {}
            }
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }

    /// One attempt: the whole batch in one transaction, or row by row if the
    /// database refuses some of the data. Counts the rows written.
    async fn attempt(&mut self, batch: &Arc<Batch>) -> Result<(), Failure> {
        if !self.migrated {
            // The tables may not exist yet: a failure is like any outage.
            match tokio::time::timeout(ATTEMPT_TIMEOUT, self.db.migrate()).await {
                Ok(Ok(())) => self.migrated = true,
                Ok(Err(error)) => return Err(Failure::Transient(error.to_string())),
                Err(_) => return Err(Failure::Transient("migrations timed out".into())),
            }
        }
        match self.write_once(batch).await {
            Ok(()) => {
                for kind in [Kind::Session, Kind::Audit, Kind::Revocation] {
                    self.shared.metrics.written(kind, "ok", batch.count(kind));
                }
                Ok(())
            }
            Err(error) if self.db.is_permanent(&error) => self.write_row_by_row(batch).await,
            Err(error) => Err(Failure::Transient(error.to_string())),
        }
    }

    async fn write_once(&self, batch: &Batch) -> Result<(), sqlx::Error> {
        match tokio::time::timeout(ATTEMPT_TIMEOUT, self.db.write(batch)).await {
            Ok(result) => result,
            Err(_) => Err(sqlx::Error::PoolTimedOut),
        }
    }

    async fn write_row_by_row(&self, batch: &Arc<Batch>) -> Result<(), Failure> {
        for (index, row) in batch.rows.iter().enumerate() {
            let single = Batch {
                max_seq: batch.max_seq,
                rows: vec![row.clone()],
            };
            match self.write_once(&single).await {
                Ok(()) => self.shared.metrics.written(row.kind(), "ok", 1),
                Err(error) if self.db.is_permanent(&error) => {
                    self.shared.metrics.written(row.kind(), "error", 1);
                    if let Some(suppressed) = self.shared.refused_log.allow() {
                        tracing::warn!(
                            kind = row.kind().label(),
                            %error,
                            suppressed,
                            "the database refused a row; it is dropped"
                        );
                    }
                }
                Err(error) => {
                    let rest = Batch {
                        max_seq: batch.max_seq,
                        rows: batch.rows[index..].to_vec(),
                    };
                    return Err(Failure::Partial(Arc::new(rest), error.to_string()));
                }
            }
        }
        Ok(())
    }

    /// Closed with the database down: everything still waiting is lost.
    fn give_up(&self, batch: &Batch, error: &str) {
        let (rest, last) = {
            let mut state = self.shared.lock();
            let rest = state.buffer.take(usize::MAX);
            (rest, state.buffer.last_seq())
        };
        let mut lost = 0;
        for kind in [Kind::Session, Kind::Audit, Kind::Revocation] {
            let rows = batch.count(kind) + rest.count(kind);
            self.shared.metrics.written(kind, "error", rows);
            lost += rows;
        }
        tracing::error!(%error, lost, "store closed with the database down: unwritten rows are lost");
        self.shared.complete(last.max(batch.max_seq));
    }
}

fn gauge(value: usize) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}
