//! The session service on the real PostgreSQL at 127.0.0.1:5432: what it
//! records, and that clients keep connecting while the database is down.
//! Each test gets its own database, dropped at the end. Without a PostgreSQL
//! there the test says so and passes, unless `RT_REQUIRE_POSTGRES=1` (CI).

use std::time::Duration;

use rt_shared::telemetry::now_ms;
use serde_json::json;
use sqlx::postgres::PgPool;
use sqlx::{AssertSqlSafe, Row};

use crate::*;

const PG_ROOT: &str = "postgres://postgres@127.0.0.1:5432";

/// A fresh database, or `None` (with a message) when no PostgreSQL answers.
async fn fresh_database() -> Option<(PgPool, String)> {
    let admin = match tokio::time::timeout(
        Duration::from_secs(3),
        PgPool::connect(&format!("{PG_ROOT}/postgres")),
    )
    .await
    {
        Ok(Ok(pool)) => pool,
        other => {
            let why = match other {
                Ok(Err(e)) => e.to_string(),
                _ => "timed out".into(),
            };
            assert!(
                std::env::var("RT_REQUIRE_POSTGRES").as_deref() != Ok("1"),
                "RT_REQUIRE_POSTGRES=1 but PostgreSQL at 127.0.0.1:5432 does not answer: {why}"
            );
            eprintln!("SKIPPED: no PostgreSQL on 127.0.0.1:5432 ({why})");
            return None;
        }
    };
    let name = format!("rt_e2e_{:016x}", fastrand_u64());
    sqlx::query(AssertSqlSafe(format!("CREATE DATABASE {name}")))
        .execute(&admin)
        .await
        .expect("create database");
    Some((admin, name))
}

fn fastrand_u64() -> u64 {
    use std::hash::{BuildHasher, RandomState};
    RandomState::new().hash_one(std::time::SystemTime::now())
}

async fn count(pool: &PgPool, sql: &'static str) -> i64 {
    sqlx::query(sql)
        .fetch_one(pool)
        .await
        .map(|row| row.get::<i64, _>(0))
        .unwrap_or(-1)
}

async fn metric(addr: std::net::SocketAddr, name: &str) -> f64 {
    let text = rt_tests::http::get(addr, "/metrics", &[]).await.text();
    text.lines()
        .filter(|line| line.starts_with(name))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[actix_rt::test]
async fn sessions_and_the_audit_reach_postgres_and_an_outage_only_delays_them() {
    let Some((admin, name)) = fresh_database().await else {
        return;
    };
    let url = format!("{PG_ROOT}/{name}");
    let mut cluster = TestCluster::start_with(1, |c| {
        c.session.database_url = url.clone();
        c.session.write_interval_ms = 20;
    })
    .await;
    let db = PgPool::connect(&url).await.expect("test database");

    let before_ms = now_ms();
    let args = json!({ "token": rt_tests::tokens::token("pat") });
    let (mut first, ok) =
        WsClient::connected_with(&cluster.ws_url(0), WsEncoding::Json, args).await;
    first.close().await;
    eventually("connect and disconnect audited", STEP, || async {
        (count(
            &db,
            "SELECT COUNT(*) FROM connections WHERE user_id = 'pat'",
        )
        .await
            == 2)
            .then_some(())
    })
    .await;
    let code = sqlx::query("SELECT code FROM connections WHERE event = 'disconnect'")
        .fetch_one(&db)
        .await
        .expect("disconnect row")
        .get::<Option<i32>, _>(0);
    assert_eq!(code, Some(1000));
    // Each row says who, on which node, in which session and when.
    let rows = sqlx::query(
        "SELECT event, client, session, node, at_ms FROM connections \
         WHERE user_id = 'pat' ORDER BY at_ms, event",
    )
    .fetch_all(&db)
    .await
    .expect("audit rows");
    let after_ms = now_ms();
    for row in &rows {
        let event: String = row.get(0);
        assert_eq!(
            row.get::<String, _>(1),
            ok["client"].as_str().expect("client"),
            "{event}"
        );
        assert_eq!(
            row.get::<String, _>(2),
            ok["session"].as_str().expect("session"),
            "{event}"
        );
        assert_eq!(
            row.get::<String, _>(3),
            ok["node"].as_str().expect("node"),
            "{event}"
        );
        let at_ms = u64::try_from(row.get::<i64, _>(4)).expect("a time after 1970");
        assert!(
            (before_ms..=after_ms).contains(&at_ms),
            "{event} at {at_ms}"
        );
    }
    let events: Vec<String> = rows.iter().map(|row| row.get(0)).collect();
    assert_eq!(events, ["connect", "disconnect"]);
    assert_eq!(
        count(
            &db,
            "SELECT COUNT(*) FROM sessions WHERE user_id = 'pat' AND closed_ms IS NOT NULL"
        )
        .await,
        1
    );
    db.close().await;

    // The database goes away: nobody may connect to it, live sessions are cut.
    for sql in [
        format!("ALTER DATABASE {name} ALLOW_CONNECTIONS false"),
        format!("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{name}'"),
    ] {
        sqlx::query(AssertSqlSafe(sql))
            .execute(&admin)
            .await
            .expect("take the database away");
    }
    let ops = cluster.sessions[0].ops_addr();
    let mut during = Vec::new();
    for i in 0..5 {
        let mut c = cluster
            .client_as(0, WsEncoding::MsgPack, &format!("quinn{i}"))
            .await;
        assert_eq!(c.command("ping", json!({})).await["ok"], json!({}));
        during.push(c);
    }
    eventually(
        "writes retried while the database is down",
        STEP,
        || async { (metric(ops, "rt_session_db_retries_total").await > 0.0).then_some(()) },
    )
    .await;

    sqlx::query(AssertSqlSafe(format!(
        "ALTER DATABASE {name} ALLOW_CONNECTIONS true"
    )))
    .execute(&admin)
    .await
    .expect("bring the database back");
    let db = PgPool::connect(&url).await.expect("test database");
    eventually("what was queued lands", Duration::from_secs(30), || async {
        let rows = count(
            &db,
            "SELECT COUNT(*) FROM connections WHERE user_id LIKE 'quinn%'",
        )
        .await;
        (rows == 5).then_some(())
    })
    .await;
    db.close().await;
    drop(during);
    for session in cluster.sessions.drain(..) {
        session.stop().await;
    }
    sqlx::query(AssertSqlSafe(format!("DROP DATABASE {name} WITH (FORCE)")))
        .execute(&admin)
        .await
        .expect("drop the test database");
}
