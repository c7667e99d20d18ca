//! The database behind the store: SQLite or PostgreSQL, the same migrations
//! and the same SQL text for both.
//!
//! **Why an enum of two pools and not sqlx's `Any` driver.** `Any` needs the
//! `any` feature (not in the workspace's sqlx feature set, so a second build
//! of sqlx) and maps every value through its own narrow type set at run time.
//! With `enum Db { Sqlite(SqlitePool), Postgres(PgPool) }` each query is
//! compiled against the real driver and [`on_db!`] writes the body once: the
//! macro expands it into both match arms, so the SQL and the binds cannot
//! drift apart. The SQL sticks to what both understand: `$n` placeholders,
//! `INSERT … ON CONFLICT … DO UPDATE SET … = excluded.…`, BIGINT
//! milliseconds, JSON kept as TEXT, no generated keys.

use std::str::FromStr;
use std::time::Duration;

use rt_proto::session::{ChannelGrant, SessionRecord};
use sqlx::postgres::{PgPool, PgPoolOptions};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use sqlx::{QueryBuilder, Row};

use super::StoreError;
use super::buffer::{Batch, Row as Write};

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// How long a caller waits for a pooled connection (or a new one) before
/// the attempt counts as failed.
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(5);
/// Rows per INSERT statement: well under SQLite's 32766 and PostgreSQL's
/// 65535 bound parameters with 8 columns.
const ROWS_PER_STATEMENT: usize = 256;

const SESSION_COLUMNS: &str =
    "INSERT INTO sessions (id, user_id, created_ms, updated_ms, closed_ms, node, subs, grants) ";
/// Last write wins, except that an older record (by `updated_ms`, e.g. from
/// a slower session instance) never overwrites a newer one.
const SESSION_UPSERT: &str = " ON CONFLICT (id) DO UPDATE SET \
     user_id = excluded.user_id, created_ms = excluded.created_ms, \
     updated_ms = excluded.updated_ms, closed_ms = excluded.closed_ms, \
     node = excluded.node, subs = excluded.subs, grants = excluded.grants \
     WHERE sessions.updated_ms <= excluded.updated_ms";
const AUDIT_COLUMNS: &str =
    "INSERT INTO connections (client, session, user_id, node, event, code, at_ms) ";
const REVOCATION_COLUMNS: &str = "INSERT INTO revocations (user_id, before_secs, created_ms) ";
/// A revocation only ever moves forward in time.
const REVOCATION_UPSERT: &str = " ON CONFLICT (user_id) DO UPDATE SET \
     before_secs = excluded.before_secs, created_ms = excluded.created_ms \
     WHERE excluded.before_secs > revocations.before_secs";

#[derive(Clone)]
pub(super) enum Db {
    Sqlite(SqlitePool),
    Postgres(PgPool),
}

/// Runs `$body` with `$pool` bound to whichever pool `$db` holds; the body
/// is compiled once per driver.
macro_rules! on_db {
    ($db:expr, $pool:ident => $body:expr) => {
        match $db {
            Db::Sqlite($pool) => $body,
            Db::Postgres($pool) => $body,
        }
    };
}

impl Db {
    /// Connects to `url` (`sqlite:…` or `postgres:…`) and runs the migrations.
    pub async fn open(url: &str) -> Result<Db, StoreError> {
        let scheme = scheme(url);
        let db = match scheme {
            "sqlite" => {
                let connect = |source| StoreError::Connect { scheme, source };
                let memory = url.contains(":memory:") || url.contains("mode=memory");
                let mut options = SqliteConnectOptions::from_str(url)
                    .map_err(connect)?
                    .create_if_missing(true)
                    .busy_timeout(Duration::from_secs(5));
                let mut pool = SqlitePoolOptions::new().acquire_timeout(ACQUIRE_TIMEOUT);
                if memory {
                    // An in-memory database lives as long as its connection:
                    // exactly one, never closed for idleness or age.
                    pool = pool
                        .max_connections(1)
                        .min_connections(1)
                        .idle_timeout(None)
                        .max_lifetime(None);
                } else {
                    // WAL lets reads proceed while the writer commits.
                    options = options
                        .journal_mode(SqliteJournalMode::Wal)
                        .synchronous(SqliteSynchronous::Normal);
                    pool = pool.max_connections(4);
                }
                Db::Sqlite(pool.connect_with(options).await.map_err(connect)?)
            }
            "postgres" | "postgresql" => Db::Postgres(
                PgPoolOptions::new()
                    .max_connections(8)
                    .acquire_timeout(ACQUIRE_TIMEOUT)
                    .connect(url)
                    .await
                    .map_err(|source| StoreError::Connect { scheme, source })?,
            ),
            other => {
                return Err(StoreError::Scheme {
                    scheme: other.to_string(),
                });
            }
        };
        db.migrate().await?;
        Ok(db)
    }

    /// A PostgreSQL pool that connects on first use, for starting while the
    /// database is unreachable; the caller migrates once it answers. Only
    /// the URL is checked here.
    pub fn open_lazy(url: &str) -> Result<Db, StoreError> {
        let scheme = scheme(url);
        match scheme {
            "postgres" | "postgresql" => Ok(Db::Postgres(
                PgPoolOptions::new()
                    .max_connections(8)
                    .acquire_timeout(ACQUIRE_TIMEOUT)
                    .connect_lazy(url)
                    .map_err(|source| StoreError::Connect { scheme, source })?,
            )),
            other => Err(StoreError::Scheme {
                scheme: other.to_string(),
            }),
        }
    }

    /// Applies pending migrations (a no-op when all are applied).
    pub async fn migrate(&self) -> Result<(), StoreError> {
        on_db!(self, pool => MIGRATOR.run(pool).await).map_err(|source| StoreError::Migrate {
            scheme: self.scheme(),
            source,
        })
    }

    pub fn scheme(&self) -> &'static str {
        match self {
            Db::Sqlite(_) => "sqlite",
            Db::Postgres(_) => "postgres",
        }
    }

    fn query_error(&self, source: sqlx::Error) -> StoreError {
        StoreError::Query {
            scheme: self.scheme(),
            source,
        }
    }

    /// Writes a batch in one transaction: multi-row upserts and inserts.
    pub async fn write(&self, batch: &Batch) -> Result<(), sqlx::Error> {
        let mut sessions = Vec::new();
        let mut audits = Vec::new();
        let mut revocations = Vec::new();
        for row in &batch.rows {
            match row {
                Write::Session(id, record) => sessions.push((id, record)),
                Write::Audit(entry) => audits.push(entry),
                Write::Revocation(revocation) => revocations.push(revocation),
            }
        }
        on_db!(self, pool => {
            let mut tx = pool.begin().await?;
            for chunk in sessions.chunks(ROWS_PER_STATEMENT) {
                let mut query = QueryBuilder::new(SESSION_COLUMNS);
                query.push_values(chunk, |mut values, (id, record)| {
                    values
                        .push_bind(id.as_str())
                        .push_bind(record.user.as_str())
                        .push_bind(to_i64(record.created_ms))
                        .push_bind(to_i64(record.updated_ms))
                        .push_bind(record.closed_ms.map(to_i64))
                        .push_bind(record.node.as_deref())
                        .push_bind(to_json(&record.subs))
                        .push_bind(to_json(&record.grants));
                });
                query.push(SESSION_UPSERT);
                query.build().execute(&mut *tx).await?;
            }
            for chunk in audits.chunks(ROWS_PER_STATEMENT) {
                let mut query = QueryBuilder::new(AUDIT_COLUMNS);
                query.push_values(chunk, |mut values, entry| {
                    values
                        .push_bind(entry.client.as_str())
                        .push_bind(entry.session.as_str())
                        .push_bind(entry.user.as_str())
                        .push_bind(entry.node.as_str())
                        .push_bind(entry.event.as_str())
                        .push_bind(entry.code.map(i32::from))
                        .push_bind(to_i64(entry.at_ms));
                });
                query.build().execute(&mut *tx).await?;
            }
            for chunk in revocations.chunks(ROWS_PER_STATEMENT) {
                let mut query = QueryBuilder::new(REVOCATION_COLUMNS);
                query.push_values(chunk, |mut values, revocation| {
                    values
                        .push_bind(revocation.user.as_str())
                        .push_bind(to_i64(revocation.before_secs))
                        .push_bind(to_i64(revocation.created_ms));
                });
                query.push(REVOCATION_UPSERT);
                query.build().execute(&mut *tx).await?;
            }
            tx.commit().await
        })
    }

    /// Whether retrying `error` cannot help: the database refused the data
    /// itself (a constraint, a value it cannot store such as a NUL byte in
    /// PostgreSQL text) or we could not encode it. Everything else (network,
    /// pool timeouts, a database shutting down or refusing connections, a
    /// missing table during maintenance) is worth retrying.
    pub fn is_permanent(&self, error: &sqlx::Error) -> bool {
        match error {
            sqlx::Error::Encode(_) | sqlx::Error::InvalidArgument(_) => true,
            sqlx::Error::Database(db) => {
                let code = db.code().unwrap_or_default();
                match self {
                    // SQLSTATE classes 22 (data exception) and 23 (integrity).
                    Db::Postgres(_) => code.starts_with("22") || code.starts_with("23"),
                    // Primary result codes TOOBIG, CONSTRAINT, MISMATCH, RANGE
                    // (extended codes keep the primary one in the low byte).
                    Db::Sqlite(_) => code
                        .parse::<i32>()
                        .is_ok_and(|code| matches!(code & 0xff, 18 | 19 | 20 | 25)),
                }
            }
            _ => false,
        }
    }

    pub async fn load_session(&self, id: &str) -> Result<Option<SessionRecord>, StoreError> {
        let row = on_db!(self, pool => {
            match sqlx::query(SESSION_SELECT_BY_ID)
                .bind(id)
                .fetch_optional(pool)
                .await
            {
                Ok(Some(row)) => Ok(Some(session_from(&row)?)),
                Ok(None) => Ok(None),
                Err(error) => Err(self.query_error(error)),
            }
        })?;
        Ok(row.map(|(_, record)| record))
    }

    pub async fn recent_sessions(
        &self,
        since_ms: u64,
        limit: usize,
    ) -> Result<Vec<(String, SessionRecord)>, StoreError> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        on_db!(self, pool => {
            let rows = sqlx::query(SESSION_SELECT_RECENT)
                .bind(to_i64(since_ms))
                .bind(limit)
                .fetch_all(pool)
                .await
                .map_err(|error| self.query_error(error))?;
            rows.iter().map(session_from).collect()
        })
    }

    pub async fn revocations(
        &self,
        created_since_ms: u64,
    ) -> Result<Vec<(String, u64)>, StoreError> {
        on_db!(self, pool => {
            let rows = sqlx::query("SELECT user_id, before_secs FROM revocations WHERE created_ms >= $1")
                .bind(to_i64(created_since_ms))
                .fetch_all(pool)
                .await
                .map_err(|error| self.query_error(error))?;
            rows.iter()
                .map(|row| {
                    let user: String = row.try_get("user_id").map_err(|e| self.query_error(e))?;
                    let before: i64 = row.try_get("before_secs").map_err(|e| self.query_error(e))?;
                    Ok((user, to_u64(before)))
                })
                .collect()
        })
    }

    /// Deletes sessions last updated before `updated_before_ms`; returns how many.
    pub async fn prune_sessions(&self, updated_before_ms: u64) -> Result<u64, StoreError> {
        on_db!(self, pool => {
            sqlx::query("DELETE FROM sessions WHERE updated_ms < $1")
                .bind(to_i64(updated_before_ms))
                .execute(pool)
                .await
                .map(|done| done.rows_affected())
                .map_err(|error| self.query_error(error))
        })
    }

    /// Deletes audit rows older than `before_ms`; returns how many.
    pub async fn prune_audit(&self, before_ms: u64) -> Result<u64, StoreError> {
        on_db!(self, pool => {
            sqlx::query("DELETE FROM connections WHERE at_ms < $1")
                .bind(to_i64(before_ms))
                .execute(pool)
                .await
                .map(|done| done.rows_affected())
                .map_err(|error| self.query_error(error))
        })
    }
}

const SESSION_SELECT_BY_ID: &str = "SELECT id, user_id, created_ms, updated_ms, closed_ms, node, subs, grants FROM sessions WHERE id = $1";
const SESSION_SELECT_RECENT: &str = "SELECT id, user_id, created_ms, updated_ms, closed_ms, node, subs, grants FROM sessions WHERE updated_ms >= $1 ORDER BY updated_ms DESC, id ASC LIMIT $2";

/// The part of a URL before the first `:` (never the password).
pub(super) fn scheme(url: &str) -> &'static str {
    match url.split(':').next().unwrap_or_default() {
        "sqlite" => "sqlite",
        "postgres" => "postgres",
        "postgresql" => "postgresql",
        _ => "unknown",
    }
}

fn session_from<R>(row: &R) -> Result<(String, SessionRecord), StoreError>
where
    R: Row,
    for<'r> &'r str: sqlx::ColumnIndex<R>,
    String: for<'r> sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    i64: for<'r> sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
{
    let corrupt = |id: &str, message: String| StoreError::Corrupt {
        id: id.to_string(),
        message,
    };
    let id: String = row.try_get("id").map_err(|e| corrupt("?", e.to_string()))?;
    let field = |e: sqlx::Error| corrupt(&id, e.to_string());
    let user: String = row.try_get("user_id").map_err(field)?;
    let created_ms: i64 = row.try_get("created_ms").map_err(field)?;
    let updated_ms: i64 = row.try_get("updated_ms").map_err(field)?;
    let closed_ms: Option<i64> = row.try_get("closed_ms").map_err(field)?;
    let node: Option<String> = row.try_get("node").map_err(field)?;
    let subs: String = row.try_get("subs").map_err(field)?;
    let grants: String = row.try_get("grants").map_err(field)?;
    let subs: Vec<String> =
        serde_json::from_str(&subs).map_err(|e| corrupt(&id, format!("subs: {e}")))?;
    let grants: Vec<ChannelGrant> =
        serde_json::from_str(&grants).map_err(|e| corrupt(&id, format!("grants: {e}")))?;
    let record = SessionRecord {
        user,
        created_ms: to_u64(created_ms),
        updated_ms: to_u64(updated_ms),
        node,
        closed_ms: closed_ms.map(to_u64),
        subs,
        grants,
    };
    Ok((id, record))
}

/// Milliseconds and seconds are stored as BIGINT; past i64 they saturate.
fn to_i64(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

fn to_u64(value: i64) -> u64 {
    u64::try_from(value).unwrap_or(0)
}

fn to_json<T: serde::Serialize>(value: &T) -> String {
    // Vec<String> and Vec<ChannelGrant> always serialize.
    serde_json::to_string(value).unwrap_or_else(|_| "[]".to_string())
}
