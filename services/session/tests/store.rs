#![allow(clippy::expect_used, clippy::unwrap_used, reason = "tests")]
//! The store against real databases: every test runs on SQLite (a temp file)
//! and on the PostgreSQL at 127.0.0.1:5432 (a fresh database per test,
//! dropped at the end). Without a PostgreSQL there, the PostgreSQL half is
//! skipped with a message, unless `RT_REQUIRE_POSTGRES=1` makes it a failure.

use std::future::Future;
use std::time::Duration;

use rt_proto::session::{ChannelGrant, SessionRecord};
use rt_session::store::{AuditEntry, AuditEvent, Store, StoreError};
use rt_shared::config::SessionConfig;
use rt_shared::metrics::MetricsRegistry;
use sqlx::postgres::PgPool;
use sqlx::sqlite::SqlitePool;
use sqlx::{AssertSqlSafe, Row};

const PG_ADDR: &str = "127.0.0.1:5432";
const PG_ROOT: &str = "postgres://postgres@127.0.0.1:5432";
const TEST_TIMEOUT: Duration = Duration::from_secs(90);

/// A database for one test; dropped (PostgreSQL) or deleted (SQLite) at the end.
struct TestDb {
    url: String,
    kind: Kind,
    _dir: Option<tempfile::TempDir>,
    pg: Option<PgDatabase>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Sqlite,
    Postgres,
}

impl TestDb {
    fn config(&self) -> SessionConfig {
        SessionConfig {
            database_url: self.url.clone(),
            write_batch_size: 100,
            write_interval_ms: 20,
            write_buffer: 10_000,
            ..SessionConfig::default()
        }
    }

    async fn open(&self, config: &SessionConfig) -> (Store, MetricsRegistry) {
        let registry = MetricsRegistry::default();
        let store = Store::open(config, &registry)
            .await
            .unwrap_or_else(|e| panic!("{:?}: open: {e}", self.kind));
        (store, registry)
    }

    /// One number from the database, through a connection of our own.
    async fn scalar(&self, sql: &'static str) -> i64 {
        match self.kind {
            Kind::Sqlite => {
                let pool = SqlitePool::connect(&self.url).await.unwrap();
                let value = sqlx::query(sql).fetch_one(&pool).await.unwrap().get(0);
                pool.close().await;
                value
            }
            Kind::Postgres => {
                let pool = PgPool::connect(&self.url).await.unwrap();
                let value = sqlx::query(sql).fetch_one(&pool).await.unwrap().get(0);
                pool.close().await;
                value
            }
        }
    }
}

/// A fresh PostgreSQL database, dropped when this goes out of scope.
struct PgDatabase {
    name: String,
}

impl Drop for PgDatabase {
    fn drop(&mut self) {
        let name = self.name.clone();
        // Drop cannot await: do it on a thread with a runtime of its own.
        let cleanup = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async move {
                let Ok(admin) = admin_pool().await else {
                    return;
                };
                let _ = sqlx::query(AssertSqlSafe(format!(
                    "ALTER DATABASE {name} ALLOW_CONNECTIONS true"
                )))
                .execute(&admin)
                .await;
                let _ = terminate(&admin, &name).await;
                let forced = sqlx::query(AssertSqlSafe(format!(
                    "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
                )))
                .execute(&admin)
                .await;
                if forced.is_err() {
                    // PostgreSQL before 13 has no FORCE.
                    let _ = terminate(&admin, &name).await;
                    let _ = sqlx::query(AssertSqlSafe(format!("DROP DATABASE IF EXISTS {name}")))
                        .execute(&admin)
                        .await;
                }
                admin.close().await;
            });
        });
        let _ = cleanup.join();
    }
}

async fn terminate(admin: &PgPool, name: &str) -> Result<(), sqlx::Error> {
    sqlx::query("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1")
        .bind(name)
        .execute(admin)
        .await
        .map(|_| ())
}

async fn admin_pool() -> Result<PgPool, String> {
    let mut last = String::new();
    for database in ["postgres", "test"] {
        let url = format!("{PG_ROOT}/{database}");
        match tokio::time::timeout(Duration::from_secs(2), PgPool::connect(&url)).await {
            Ok(Ok(pool)) => return Ok(pool),
            Ok(Err(error)) => last = error.to_string(),
            Err(_) => last = "timed out".into(),
        }
    }
    Err(last)
}

/// A fresh PostgreSQL database, or `None` (with a message) if none answers.
async fn postgres_db() -> Option<TestDb> {
    let skip = |reason: String| {
        let message = format!("no PostgreSQL on {PG_ADDR} ({reason})");
        if std::env::var("RT_REQUIRE_POSTGRES").is_ok_and(|v| v == "1") {
            panic!("RT_REQUIRE_POSTGRES=1 but {message}");
        }
        eprintln!("SKIPPED: {message}");
        None
    };
    let probe = tokio::time::timeout(
        Duration::from_secs(2),
        tokio::net::TcpStream::connect(PG_ADDR),
    )
    .await;
    if !matches!(probe, Ok(Ok(_))) {
        return skip("nothing listens".into());
    }
    let admin = match admin_pool().await {
        Ok(admin) => admin,
        Err(error) => return skip(error),
    };
    let name = format!("rt_store_{:016x}", fastrand::u64(..));
    sqlx::query(AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .execute(&admin)
        .await
        .unwrap_or_else(|e| panic!("CREATE DATABASE {name}: {e}"));
    admin.close().await;
    Some(TestDb {
        url: format!("{PG_ROOT}/{name}"),
        kind: Kind::Postgres,
        _dir: None,
        pg: Some(PgDatabase { name }),
    })
}

fn sqlite_db() -> TestDb {
    let dir = tempfile::tempdir().unwrap();
    TestDb {
        url: format!("sqlite://{}", dir.path().join("store.db").display()),
        kind: Kind::Sqlite,
        _dir: Some(dir),
        pg: None,
    }
}

/// Runs `test` on SQLite, then on PostgreSQL if one answers.
async fn on_both<F, Fut>(test: F)
where
    F: Fn(TestDb) -> Fut,
    Fut: Future<Output = ()>,
{
    tokio::time::timeout(TEST_TIMEOUT, async {
        test(sqlite_db()).await;
        if let Some(db) = postgres_db().await {
            test(db).await;
        }
    })
    .await
    .expect("test timed out");
}

/// The value of one sample line of the exposition (0 when absent).
fn metric(registry: &MetricsRegistry, sample: &str) -> f64 {
    registry
        .encode()
        .lines()
        .find_map(|line| line.strip_prefix(sample)?.strip_prefix(' '))
        .map_or(0.0, |value| value.trim().parse().unwrap())
}

fn record(user: &str, updated_ms: u64) -> SessionRecord {
    SessionRecord {
        user: user.into(),
        created_ms: 1_000,
        updated_ms,
        node: Some("gw-1".into()),
        closed_ms: None,
        subs: vec!["chat:lobby".into(), "news".into()],
        grants: vec![ChannelGrant {
            channel: "secret:room".into(),
            expires_at: 1_900_000_000,
        }],
    }
}

fn audit(client: &str, event: AuditEvent, code: Option<u16>) -> AuditEntry {
    AuditEntry {
        client: client.into(),
        session: format!("s-{client}"),
        user: "alice".into(),
        node: "gw-1".into(),
        event,
        code,
        at_ms: 1_700_000_000_000,
    }
}

#[tokio::test]
async fn migrations_apply_twice() {
    on_both(|db| async move {
        let config = db.config();
        let (first, _) = db.open(&config).await;
        first.save_session("s1", &record("alice", 5));
        first.flush().await.unwrap();
        drop(first);
        // Opening again re-runs the migrator: nothing to do, data intact.
        let (second, _) = db.open(&config).await;
        assert_eq!(
            second.load_session("s1").await.unwrap(),
            Some(record("alice", 5))
        );
        assert_eq!(db.scalar("SELECT COUNT(*) FROM _sqlx_migrations").await, 1);
    })
    .await;
}

#[tokio::test]
async fn sessions_round_trip() {
    on_both(|db| async move {
        let config = db.config();
        let (store, _) = db.open(&config).await;
        assert_eq!(store.load_session("nope").await.unwrap(), None);
        let open = record("alice", 2_000);
        store.save_session("s1", &open);
        // Visible at once, from the queue.
        assert_eq!(store.load_session("s1").await.unwrap(), Some(open.clone()));
        store.flush().await.unwrap();
        assert_eq!(store.pending(), 0);
        let closed = SessionRecord {
            updated_ms: 3_000,
            closed_ms: Some(3_000),
            node: None,
            subs: vec![],
            grants: vec![],
            ..open.clone()
        };
        store.save_session("s2", &open);
        store.save_session("s2", &closed);
        store.flush().await.unwrap();
        // A second store has an empty queue: these come from the database.
        let (reader, _) = db.open(&config).await;
        assert_eq!(reader.load_session("s1").await.unwrap(), Some(open));
        assert_eq!(reader.load_session("s2").await.unwrap(), Some(closed));
        assert_eq!(reader.load_session("s3").await.unwrap(), None);
    })
    .await;
}

#[tokio::test]
async fn upserts_coalesce_and_never_go_back_in_time() {
    on_both(|db| async move {
        let (store, registry) = db.open(&db.config()).await;
        for updated in 1..=100 {
            store.save_session("hot", &record("alice", updated));
        }
        store.flush().await.unwrap();
        assert_eq!(db.scalar("SELECT COUNT(*) FROM sessions").await, 1);
        assert_eq!(
            db.scalar("SELECT updated_ms FROM sessions WHERE id = 'hot'")
                .await,
            100
        );
        // The hundred upserts became one row write.
        let sample = r#"rt_session_db_writes_total{kind="session",result="ok"}"#;
        assert_eq!(metric(&registry, sample), 1.0);
        // An older record (say from a slower instance) does not overwrite a newer one.
        store.save_session("hot", &record("alice", 50));
        store.flush().await.unwrap();
        assert_eq!(
            db.scalar("SELECT updated_ms FROM sessions WHERE id = 'hot'")
                .await,
            100
        );
    })
    .await;
}

#[tokio::test]
async fn audit_rows_are_written_in_batches() {
    on_both(|db| async move {
        let config = SessionConfig {
            write_batch_size: 50,
            ..db.config()
        };
        let (store, registry) = db.open(&config).await;
        for i in 0..200 {
            let (event, code) = if i % 2 == 0 {
                (AuditEvent::Connect, None)
            } else {
                (AuditEvent::Disconnect, Some(4004))
            };
            store.audit(audit(&format!("c{i}"), event, code));
        }
        assert_eq!(store.pending(), 200);
        store.flush().await.unwrap();
        assert_eq!(store.pending(), 0);
        assert_eq!(db.scalar("SELECT COUNT(*) FROM connections").await, 200);
        assert_eq!(
            db.scalar(
                "SELECT COUNT(*) FROM connections WHERE event = 'disconnect' AND code = 4004"
            )
            .await,
            100
        );
        assert_eq!(
            db.scalar("SELECT COUNT(*) FROM connections WHERE event = 'connect' AND code IS NULL")
                .await,
            100
        );
        let batches = metric(&registry, r#"rt_session_db_batches_total{result="ok"}"#);
        assert!((4.0..=5.0).contains(&batches), "{batches} batches");
        assert_eq!(
            metric(
                &registry,
                r#"rt_session_db_writes_total{kind="audit",result="ok"}"#
            ),
            200.0
        );
        assert_eq!(metric(&registry, "rt_session_db_pending"), 0.0);
        assert!(metric(&registry, "rt_session_db_batch_seconds_count") >= 4.0);
    })
    .await;
}

#[tokio::test]
async fn an_idle_writer_writes_at_once() {
    on_both(|db| async move {
        // A long batching interval must not delay a lone write.
        let config = SessionConfig {
            write_interval_ms: 60_000,
            write_batch_size: 1_000,
            ..db.config()
        };
        let (store, _) = db.open(&config).await;
        // The first write ever, then one after the writer has gone idle again
        // (its last batch started less than the interval ago).
        for (n, client) in [(1, "first"), (2, "second")] {
            store.audit(audit(client, AuditEvent::Connect, None));
            let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
            while db.scalar("SELECT COUNT(*) FROM connections").await < n {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "{client} not written within 5 s"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    })
    .await;
}

#[tokio::test]
async fn revocations_keep_the_maximum() {
    on_both(|db| async move {
        let (store, _) = db.open(&db.config()).await;
        store.revoke("alice", 100);
        store.revoke("alice", 50);
        store.revoke("bob", 7);
        store.flush().await.unwrap();
        store.revoke("alice", 70);
        store.flush().await.unwrap();
        let mut all = store.revocations(0).await.unwrap();
        all.sort();
        assert_eq!(all, vec![("alice".into(), 100), ("bob".into(), 7)]);
        // A queued revocation is seen before it is written.
        store.revoke("alice", 200);
        let mut all = store.revocations(0).await.unwrap();
        all.sort();
        assert_eq!(all[0], ("alice".into(), 200));
        store.flush().await.unwrap();
        assert_eq!(
            db.scalar("SELECT before_secs FROM revocations WHERE user_id = 'alice'")
                .await,
            200
        );
        // Only those made since a time (the ones a bucket's max age still keeps).
        store.revoke("carol", 1);
        assert!(
            store.revocations(u64::MAX).await.unwrap().is_empty(),
            "none made that late, queued or stored"
        );
        assert_eq!(store.revocations(0).await.unwrap().len(), 3);
    })
    .await;
}

#[tokio::test]
async fn recent_sessions_newest_first() {
    on_both(|db| async move {
        let (store, _) = db.open(&db.config()).await;
        for (id, updated) in [("a", 10), ("b", 50), ("c", 30), ("d", 40), ("e", 20)] {
            store.save_session(id, &record("u", updated));
        }
        store.flush().await.unwrap();
        let ids = |sessions: Vec<(String, SessionRecord)>| -> Vec<String> {
            sessions.into_iter().map(|(id, _)| id).collect()
        };
        assert_eq!(
            ids(store.recent_sessions(0, 10).await.unwrap()),
            ["b", "d", "c", "e", "a"]
        );
        assert_eq!(ids(store.recent_sessions(25, 2).await.unwrap()), ["b", "d"]);
        assert_eq!(
            ids(store.recent_sessions(30, 10).await.unwrap()),
            ["b", "d", "c"]
        );
        assert!(store.recent_sessions(0, 0).await.unwrap().is_empty());
        let (_, newest) = store.recent_sessions(0, 1).await.unwrap().remove(0);
        assert_eq!(newest, record("u", 50));
        // Retention.
        assert_eq!(store.prune_sessions(30).await.unwrap(), 2);
        assert_eq!(
            ids(store.recent_sessions(0, 10).await.unwrap()),
            ["b", "d", "c"]
        );
    })
    .await;
}

#[tokio::test]
async fn in_memory_sqlite_keeps_its_data() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let config = SessionConfig {
            database_url: "sqlite::memory:".into(),
            ..SessionConfig::default()
        };
        let registry = MetricsRegistry::default();
        let store = Store::open(&config, &registry).await.unwrap();
        for i in 0..10 {
            store.save_session(&format!("s{i}"), &record("u", i));
            store.audit(audit(&format!("c{i}"), AuditEvent::Connect, None));
            store.flush().await.unwrap();
        }
        // Read back through the pool (the queue is empty): same single database.
        assert_eq!(store.recent_sessions(0, 100).await.unwrap().len(), 10);
        assert_eq!(
            store.load_session("s3").await.unwrap(),
            Some(record("u", 3))
        );
        assert_eq!(store.prune_audit(u64::MAX).await.unwrap(), 10);
    })
    .await
    .expect("timed out");
}

#[tokio::test]
async fn bad_urls_fail_without_leaking_the_password() {
    let registry = MetricsRegistry::default();
    let open = |url: &str| {
        let config = SessionConfig {
            database_url: url.into(),
            ..SessionConfig::default()
        };
        let registry = registry.clone();
        async move {
            Store::open(&config, &registry)
                .await
                .err()
                .expect("must fail")
        }
    };
    let error = open("mysql://root:hunter2@localhost/db").await;
    assert!(matches!(error, StoreError::Scheme { .. }), "{error:?}");
    assert!(!error.to_string().contains("hunter2"), "{error}");
    // Nothing listens on port 1: refused until the acquire timeout.
    let error = open("postgres://postgres:hunter2@127.0.0.1:1/db").await;
    assert!(matches!(error, StoreError::Connect { .. }), "{error:?}");
    let text = error.to_string();
    assert!(
        text.contains("postgres") && !text.contains("hunter2"),
        "{text}"
    );
}

/// PostgreSQL goes away mid-run and comes back: queued writes land, and the
/// retries were counted.
#[tokio::test]
async fn writes_survive_a_database_outage() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let Some(db) = postgres_db().await else {
            return;
        };
        let name = db.pg.as_ref().unwrap().name.clone();
        let (store, registry) = db.open(&db.config()).await;
        store.audit(audit("before", AuditEvent::Connect, None));
        store.flush().await.unwrap();

        let admin = admin_pool().await.unwrap();
        sqlx::query(AssertSqlSafe(format!(
            "ALTER DATABASE {name} ALLOW_CONNECTIONS false"
        )))
        .execute(&admin)
        .await
        .unwrap();
        terminate(&admin, &name).await.unwrap();

        for i in 0..50 {
            store.audit(audit(&format!("during{i}"), AuditEvent::Connect, None));
            store.save_session(&format!("s{i}"), &record("alice", i));
        }
        store.revoke("mallory", 99);
        let error = store.flush().await.expect_err("the database is down");
        assert!(matches!(error, StoreError::Unavailable { .. }), "{error:?}");
        assert!(store.pending() >= 101, "{}", store.pending());
        // Reads of queued writes still work while the database is down.
        assert_eq!(
            store.load_session("s7").await.unwrap(),
            Some(record("alice", 7))
        );
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while metric(&registry, "rt_session_db_retries_total") < 1.0 {
            assert!(tokio::time::Instant::now() < deadline, "no retry counted");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert!(metric(&registry, r#"rt_session_db_batches_total{result="error"}"#) >= 1.0);
        assert!(metric(&registry, "rt_session_db_pending") >= 101.0);

        sqlx::query(AssertSqlSafe(format!(
            "ALTER DATABASE {name} ALLOW_CONNECTIONS true"
        )))
        .execute(&admin)
        .await
        .unwrap();
        admin.close().await;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while let Err(error) = store.flush().await {
            assert!(
                tokio::time::Instant::now() < deadline,
                "still failing: {error}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(store.pending(), 0);
        assert_eq!(db.scalar("SELECT COUNT(*) FROM connections").await, 51);
        assert_eq!(db.scalar("SELECT COUNT(*) FROM sessions").await, 50);
        assert_eq!(db.scalar("SELECT COUNT(*) FROM revocations").await, 1);
        assert_eq!(
            metric(&registry, r#"rt_session_db_dropped_total{kind="audit"}"#),
            0.0
        );
    })
    .await
    .expect("timed out");
}

/// A row PostgreSQL refuses (a NUL byte in text) is dropped and counted;
/// the rest of its batch is written.
#[tokio::test]
async fn a_refused_row_does_not_block_its_batch() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        let Some(db) = postgres_db().await else {
            return;
        };
        let (store, registry) = db.open(&db.config()).await;
        store.save_session("good-1", &record("alice", 1));
        store.save_session("bad", &record("nul\0byte", 1));
        store.audit(audit("good-2", AuditEvent::Connect, None));
        store.flush().await.unwrap();
        assert_eq!(db.scalar("SELECT COUNT(*) FROM sessions").await, 1);
        assert_eq!(db.scalar("SELECT COUNT(*) FROM connections").await, 1);
        assert_eq!(
            metric(
                &registry,
                r#"rt_session_db_writes_total{kind="session",result="error"}"#
            ),
            1.0
        );
        // The writer carries on normally.
        store.save_session("good-3", &record("bob", 2));
        store.flush().await.unwrap();
        assert_eq!(db.scalar("SELECT COUNT(*) FROM sessions").await, 2);
    })
    .await
    .expect("timed out");
}

/// A full buffer drops audit rows, counted, while sessions survive.
#[tokio::test]
async fn a_full_buffer_drops_audit_rows_first() {
    on_both(|db| async move {
        let config = SessionConfig {
            write_buffer: 10,
            ..db.config()
        };
        let (store, registry) = db.open(&config).await;
        // The writer cannot run between these calls (single-threaded runtime).
        for i in 0..5 {
            store.save_session(&format!("s{i}"), &record("u", i));
        }
        for i in 0..20 {
            store.audit(audit(&format!("c{i}"), AuditEvent::Connect, None));
        }
        assert_eq!(store.pending(), 10);
        store.flush().await.unwrap();
        assert_eq!(db.scalar("SELECT COUNT(*) FROM sessions").await, 5);
        assert_eq!(db.scalar("SELECT COUNT(*) FROM connections").await, 5);
        assert_eq!(
            metric(&registry, r#"rt_session_db_dropped_total{kind="audit"}"#),
            15.0
        );
    })
    .await;
}

/// PostgreSQL refusing connections when the service starts: the store opens
/// anyway, queues, and once the database answers migrates it and writes.
#[tokio::test]
async fn a_database_down_at_start_is_migrated_and_written_once_it_answers() {
    tokio::time::timeout(TEST_TIMEOUT, async {
        // SQLite is a local file: failing there is a setup mistake, reported at once.
        let registry = MetricsRegistry::default();
        let config = SessionConfig {
            database_url: "sqlite:///nonexistent-directory/rt/store.db".into(),
            ..SessionConfig::default()
        };
        let error = Store::open_or_defer(&config, &registry)
            .await
            .err()
            .expect("an unusable SQLite path fails");
        assert!(matches!(error, StoreError::Connect { .. }), "{error:?}");

        let Some(db) = postgres_db().await else {
            return;
        };
        let name = db.pg.as_ref().unwrap().name.clone();
        let admin = admin_pool().await.unwrap();
        let allow = |allowed: bool| {
            AssertSqlSafe(format!("ALTER DATABASE {name} ALLOW_CONNECTIONS {allowed}"))
        };
        sqlx::query(allow(false)).execute(&admin).await.unwrap();
        let registry = MetricsRegistry::default();
        let store = Store::open_or_defer(&db.config(), &registry)
            .await
            .expect("starts without its database");
        assert!(store.started_without_database());
        store.revoke("alice", 42);
        store.audit(audit("during", AuditEvent::Connect, None));
        assert!(matches!(
            store.flush().await,
            Err(StoreError::Unavailable { .. })
        ));
        assert_eq!(store.pending(), 2, "kept for later");

        sqlx::query(allow(true)).execute(&admin).await.unwrap();
        admin.close().await;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while store.flush().await.is_err() {
            assert!(tokio::time::Instant::now() < deadline, "never written");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(
            db.scalar("SELECT before_secs FROM revocations WHERE user_id = 'alice'")
                .await,
            42
        );
        assert_eq!(db.scalar("SELECT COUNT(*) FROM connections").await, 1);
    })
    .await
    .expect("test timed out");
}
