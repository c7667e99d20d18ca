//! Persistence through sqlx: sessions, the connection audit trail and
//! revocations, in SQLite (embedded default; a file, or memory for tests) or
//! PostgreSQL (production), with the same migrations and queries.
//!
//! Writes are write-behind: [`Store::save_session`], [`Store::audit`] and
//! [`Store::revoke`] only queue (never block, never fail visibly) and one
//! writer task writes batches in single transactions. Reads go to the
//! database directly, but see the writes still queued or in flight first,
//! so a session saved a moment ago is found.
//!
//! - `buffer`: the bounded queue, coalescing and the drop policy when full.
//! - `writer`: batching, retries with backoff, shutdown.
//! - `db`: the two drivers behind one enum, and the SQL.
//! - [`metrics`]: what the store exports (`rt_session_db_*`).

mod buffer;
mod db;
pub mod metrics;
mod writer;

use std::sync::Arc;
use std::time::Duration;

use rt_proto::session::SessionRecord;
use rt_shared::config::SessionConfig;
use rt_shared::metrics::MetricsRegistry;
use rt_shared::telemetry::now_ms;

pub use metrics::StoreMetrics;

use buffer::{Revocation, Row};
use db::Db;
use writer::{Shared, WriterConfig};

/// One connection event for the audit trail (table `connections`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditEntry {
    pub client: String,
    pub session: String,
    pub user: String,
    pub node: String,
    pub event: AuditEvent,
    /// The close code, for a disconnect.
    pub code: Option<u16>,
    /// Milliseconds since the Unix epoch.
    pub at_ms: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuditEvent {
    Connect,
    Disconnect,
}

impl AuditEvent {
    /// The value stored in `connections.event`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Connect => "connect",
            Self::Disconnect => "disconnect",
        }
    }
}

/// Why the store could not do something. Messages name the database by its
/// URL scheme only, never the URL (it may hold a password).
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("session.database_url: unsupported scheme {scheme:?} (use sqlite: or postgres:)")]
    Scheme { scheme: String },
    #[error("cannot connect to the {scheme} database: {source}")]
    Connect {
        scheme: &'static str,
        source: sqlx::Error,
    },
    #[error("cannot migrate the {scheme} database: {source}")]
    Migrate {
        scheme: &'static str,
        source: sqlx::migrate::MigrateError,
    },
    #[error("{scheme} query failed: {source}")]
    Query {
        scheme: &'static str,
        source: sqlx::Error,
    },
    #[error("stored session {id:?} cannot be read: {message}")]
    Corrupt { id: String, message: String },
    /// A flush saw a write attempt fail; the writes stay queued and retried.
    #[error("the {scheme} database is unavailable, writes are queued: {message}")]
    Unavailable {
        scheme: &'static str,
        message: String,
    },
    #[error("the store's writer has stopped")]
    Stopped,
}

/// The session service's database, shared by cloning.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

struct Inner {
    db: Db,
    shared: Arc<Shared>,
    /// Opened with [`Store::open_or_defer`] while the database was down.
    deferred: bool,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // The last handle is gone: the writer drains what is queued and exits.
        self.shared.close();
    }
}

impl Store {
    /// Connects to `session.database_url` (a missing SQLite file is created;
    /// `sqlite::memory:` is pinned to one connection), applies the migrations
    /// and spawns the writer task on the current Tokio runtime (inside an
    /// actix System too). Registers `rt_session_db_*` into `registry`.
    pub async fn open(
        config: &SessionConfig,
        registry: &MetricsRegistry,
    ) -> Result<Store, StoreError> {
        let db = Db::open(&config.database_url).await?;
        Ok(Self::start(config, registry, db, true))
    }

    /// [`Store::open`], except that a PostgreSQL database that cannot be
    /// reached (or migrated) now does not stop the service: the store
    /// starts without it, queues writes as during any outage, and the
    /// writer connects and migrates before its first batch. The service's
    /// shared state is in NATS KV, so it can serve meanwhile; a crash during
    /// a database outage must not become a session service outage. A bad
    /// URL, or SQLite (a local file: a failure there is a setup mistake),
    /// still fails here.
    pub async fn open_or_defer(
        config: &SessionConfig,
        registry: &MetricsRegistry,
    ) -> Result<Store, StoreError> {
        let url = &config.database_url;
        match Db::open(url).await {
            Ok(db) => Ok(Self::start(config, registry, db, true)),
            Err(error @ (StoreError::Connect { .. } | StoreError::Migrate { .. }))
                if matches!(db::scheme(url), "postgres" | "postgresql") =>
            {
                let db = Db::open_lazy(url)?;
                tracing::error!(
                    %error,
                    "database unavailable at start: serving without it, writes are queued until it answers"
                );
                Ok(Self::start(config, registry, db, false))
            }
            Err(error) => Err(error),
        }
    }

    /// Spawns the writer over `db` (`migrated`: whether the migrations ran).
    fn start(config: &SessionConfig, registry: &MetricsRegistry, db: Db, migrated: bool) -> Store {
        let metrics = StoreMetrics::new(registry);
        let shared = Arc::new(Shared::new(config.write_buffer, metrics));
        let writer = WriterConfig {
            batch_size: config.write_batch_size.max(1),
            interval: Duration::from_millis(config.write_interval_ms),
        };
        tokio::spawn(writer::run(shared.clone(), db.clone(), writer, migrated));
        Store {
            inner: Arc::new(Inner {
                db,
                shared,
                deferred: !migrated,
            }),
        }
    }

    /// Whether the database was unreachable when the store opened (reads
    /// then wait out the connect timeout until it is back).
    pub fn started_without_database(&self) -> bool {
        self.inner.deferred
    }

    /// Queues an upsert of session `id` (a queued one for the same id is replaced).
    pub fn save_session(&self, id: &str, record: &SessionRecord) {
        self.inner
            .shared
            .enqueue(|buffer| buffer.push_session(id, record.clone()));
    }

    /// Queues an audit row (the first thing dropped when the buffer is full).
    pub fn audit(&self, entry: AuditEntry) {
        self.inner.shared.enqueue(|buffer| buffer.push_audit(entry));
    }

    /// Queues a revocation: tokens of `user` issued before `before_secs` are
    /// refused. The stored value only ever grows.
    pub fn revoke(&self, user: &str, before_secs: u64) {
        let revocation = Revocation {
            user: user.to_string(),
            before_secs,
            created_ms: now_ms(),
        };
        self.inner
            .shared
            .enqueue(|buffer| buffer.push_revocation(revocation));
    }

    /// Session `id`: the queued or in-flight write if there is one, else the database's.
    pub async fn load_session(&self, id: &str) -> Result<Option<SessionRecord>, StoreError> {
        {
            let state = self.inner.shared.lock();
            if let Some(record) = state.buffer.session(id) {
                return Ok(Some(record.clone()));
            }
            if let Some(record) = state.inflight.as_ref().and_then(|batch| batch.session(id)) {
                return Ok(Some(record.clone()));
            }
        }
        self.inner.db.load_session(id).await
    }

    /// Sessions updated at or after `since_ms`, newest first, at most `limit`
    /// (for warming caches at start-up; reads the database only).
    pub async fn recent_sessions(
        &self,
        since_ms: u64,
        limit: usize,
    ) -> Result<Vec<(String, SessionRecord)>, StoreError> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        self.inner.db.recent_sessions(since_ms, limit).await
    }

    /// Every revocation `(user, before_secs)` made at or after
    /// `created_since_ms`, including queued ones.
    pub async fn revocations(
        &self,
        created_since_ms: u64,
    ) -> Result<Vec<(String, u64)>, StoreError> {
        // What is queued or being written is read first: a batch committed
        // while the database is being read is then either in that read or
        // in this snapshot, never in neither.
        let pending: Vec<(String, u64)> = {
            let state = self.inner.shared.lock();
            let inflight = state.inflight.iter().flat_map(|batch| {
                batch.rows.iter().filter_map(|row| match row {
                    Row::Revocation(revocation) => Some(revocation),
                    _ => None,
                })
            });
            state
                .buffer
                .revocations()
                .chain(inflight)
                .filter(|r| r.created_ms >= created_since_ms)
                .map(|r| (r.user.clone(), r.before_secs))
                .collect()
        };
        let mut all: std::collections::HashMap<String, u64> = self
            .inner
            .db
            .revocations(created_since_ms)
            .await?
            .into_iter()
            .collect();
        for (user, before_secs) in pending {
            let before = all.entry(user).or_default();
            *before = (*before).max(before_secs);
        }
        Ok(all.into_iter().collect())
    }

    /// Resolves once everything queued before the call is written. Cuts the
    /// writer's batching wait and backoff short. If the database is down,
    /// fails with [`StoreError::Unavailable`] after the first write attempt
    /// started after the call fails (the writes stay queued and retried).
    pub async fn flush(&self) -> Result<(), StoreError> {
        let shared = &self.inner.shared;
        let mut progress = shared.progress.subscribe();
        let attempts_before = progress.borrow().attempts;
        let target = shared.request_flush();
        loop {
            {
                let now = progress.borrow_and_update();
                if now.completed >= target {
                    return Ok(());
                }
                if now.failed_attempt > attempts_before {
                    return Err(StoreError::Unavailable {
                        scheme: self.inner.db.scheme(),
                        message: now.last_error.clone().unwrap_or_default(),
                    });
                }
                if now.stopped {
                    return Err(StoreError::Stopped);
                }
            }
            if progress.changed().await.is_err() {
                return Err(StoreError::Stopped);
            }
        }
    }

    /// Writes waiting: queued or in flight.
    pub fn pending(&self) -> usize {
        self.inner.shared.lock().pending()
    }

    /// Deletes sessions last updated before `updated_before_ms` (retention);
    /// returns how many went.
    pub async fn prune_sessions(&self, updated_before_ms: u64) -> Result<u64, StoreError> {
        self.inner.db.prune_sessions(updated_before_ms).await
    }

    /// Deletes audit rows older than `before_ms` (retention); returns how many went.
    pub async fn prune_audit(&self, before_ms: u64) -> Result<u64, StoreError> {
        self.inner.db.prune_audit(before_ms).await
    }

    /// The store's metrics (also registered in the registry given to [`Store::open`]).
    pub fn metrics(&self) -> &StoreMetrics {
        &self.inner.shared.metrics
    }
}
