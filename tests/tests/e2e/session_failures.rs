//! The session service when things go wrong: an instance that starts after
//! a revocation (with an empty database, or none reachable), NATS KV failing
//! under the connection limit, token expiry at the edge of the clock leeway,
//! and the `rt-session` process killed with SIGKILL while clients are
//! connected.

use std::time::Duration;

use rt_tests::process::{self, ServiceProcess};
use rt_tests::tokens::{self, now_secs};
use serde_json::{Value, json};

use crate::*;

/// What a refused `connect` got: the error reply and the close code.
async fn refused_connect(cluster: &TestCluster, args: Value) -> (Value, u16) {
    let mut client = WsClient::open(&cluster.ws_url(0), WsEncoding::Json).await;
    let reply = client.command("connect", args).await;
    assert!(
        reply["error"].is_object(),
        "expected a refusal, got {reply}"
    );
    (reply["error"].clone(), client.closed().await.0)
}

fn code(error: &Value) -> u64 {
    error["code"].as_u64().unwrap_or_default()
}

/// One more in-process session instance with `adjust` applied to the
/// cluster's config (each has its own database: `sqlite::memory:` unless
/// `adjust` says otherwise).
async fn add_session_with(
    cluster: &mut TestCluster,
    adjust: impl FnOnce(&mut rt_shared::config::Config),
) {
    let mut config = cluster.config.clone();
    adjust(&mut config);
    let session = rt_session::run(config)
        .await
        .expect("session service starts");
    cluster.sessions.push(session);
}

async fn stop_sessions(cluster: &mut TestCluster) {
    for session in cluster.sessions.drain(..) {
        session.stop().await;
    }
}

/// The sum of a metric's samples whose line starts with `prefix`.
async fn metric(addr: std::net::SocketAddr, prefix: &str) -> f64 {
    rt_tests::http::get(addr, "/metrics", &[])
        .await
        .text()
        .lines()
        .filter(|line| line.starts_with(prefix))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

async fn kv(cluster: &TestCluster, bucket: &str) -> async_nats::jetstream::kv::Store {
    async_nats::jetstream::new(cluster.nats_client().await)
        .get_key_value(bucket)
        .await
        .expect("KV bucket")
}

#[actix_rt::test]
async fn a_revocation_holds_on_instances_started_after_it_even_without_a_database() {
    let mut cluster = TestCluster::start().await;
    let old =
        tokens::token_with(json!({"sub": "rex", "iat": now_secs() - 10, "exp": now_secs() + 600}));
    let _rex = WsClient::connected_with(
        &cluster.ws_url(0),
        WsEncoding::Json,
        json!({ "token": old }),
    )
    .await;
    let res = rt_tests::http::post_json(
        cluster.addr(0),
        "/api/disconnect",
        Some(API_KEY),
        &json!({"user": "rex", "revoke": true}),
    )
    .await;
    assert_eq!(res.status, 200, "{}", res.text());
    // The shared record has it once the revoke is answered.
    let entry = kv(&cluster, rt_proto::session::REVOCATIONS_BUCKET)
        .await
        .get(rt_proto::session::user_key("rex"))
        .await
        .expect("KV read");
    assert!(entry.is_some(), "the revocation is in KV");

    // Every instance that saw it goes; a new one with its own, empty
    // database (sqlite::memory:) starts.
    stop_sessions(&mut cluster).await;
    cluster.add_session().await;
    let (error, close) = refused_connect(&cluster, json!({ "token": old })).await;
    assert_eq!((code(&error), close), (101, 4002), "{error}");
    // Tokens issued after the revocation connect.
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    cluster.client_as(0, WsEncoding::Json, "rex").await;

    // And one whose database does not answer at all (nothing listens on
    // port 1): it starts, from what NATS KV holds.
    stop_sessions(&mut cluster).await;
    add_session_with(&mut cluster, |c| {
        c.session.database_url = "postgres://postgres@127.0.0.1:1/rt".into();
    })
    .await;
    let (error, close) = refused_connect(&cluster, json!({ "token": old })).await;
    assert_eq!((code(&error), close), (101, 4002), "{error}");
    cluster.client_as(0, WsEncoding::Json, "rex").await;
}

#[actix_rt::test]
async fn a_revocation_made_on_one_instance_is_applied_by_a_running_one_from_kv() {
    let mut cluster = TestCluster::start().await;
    // Written into the bucket directly, as an instance cut off from the
    // others' announcements would only see it: through the KV watch.
    let revocations = kv(&cluster, rt_proto::session::REVOCATIONS_BUCKET).await;
    let value = rt_proto::internal::to_msgpack(&rt_proto::session::RevokeRequest {
        user: "rhea".into(),
        before: now_secs(),
    })
    .expect("encode");
    revocations
        .put(rt_proto::session::user_key("rhea"), value.into())
        .await
        .expect("KV put");
    let old = tokens::token_with(json!({"sub": "rhea", "iat": now_secs() - 10}));
    eventually("the watch applies it", STEP, || async {
        let mut client = WsClient::open(&cluster.ws_url(0), WsEncoding::Json).await;
        let reply = client.command("connect", json!({ "token": old })).await;
        (reply["error"]["code"] == json!(101)).then_some(())
    })
    .await;
    // The revocation the instance enforces is also the one a new instance loads.
    cluster.add_session().await;
    for _ in 0..4 {
        let (error, _) = refused_connect(&cluster, json!({ "token": old })).await;
        assert_eq!(code(&error), 101, "{error}");
    }
}

#[actix_rt::test]
async fn a_connection_count_that_cannot_be_checked_answers_113_instead_of_admitting() {
    let cluster = TestCluster::start_with(1, |c| c.session.max_connections_per_user = 2).await;
    let _held = cluster.client_as(0, WsEncoding::Json, "ugo").await;
    // The users bucket goes away under the running service: every read of
    // a count fails.
    async_nats::jetstream::new(cluster.nats_client().await)
        .delete_stream(format!("KV_{}", rt_proto::session::USERS_BUCKET))
        .await
        .expect("delete the users bucket");
    for user in ["ugo", "vic"] {
        let (error, close) = refused_connect(&cluster, json!({"token": tokens::token(user)})).await;
        assert_eq!(code(&error), 113, "{user}: {error}");
        assert_eq!(error["temporary"], json!(true), "{error}");
        assert!(error["retry_after_ms"].as_u64().is_some(), "{error}");
        assert_eq!(close, 4007, "{user}: reconnect after the hint");
    }
    let ops = cluster.sessions[0].ops_addr();
    let unchecked = metric(ops, "rt_session_limit_unchecked_total{reason=\"kv_error\"}").await;
    assert!(unchecked >= 2.0, "counted: {unchecked}");
    // Anonymous connections hold no count: they still get in.
    cluster.client(0, WsEncoding::Json).await;
}

/// A connection that ends while no session instance runs still releases
/// its user's slot once one is back: the gateway keeps the batch of events
/// nobody answered and sends it again.
#[actix_rt::test]
async fn a_close_while_no_session_instance_runs_releases_the_slot_once_one_is_back() {
    let mut cluster = TestCluster::start_with(1, |c| c.session.max_connections_per_user = 1).await;
    let token = tokens::token("ursula");
    let mut first = cluster.client_as(0, WsEncoding::Json, "ursula").await;
    let (error, close) = refused_connect(&cluster, json!({ "token": token })).await;
    assert_eq!((code(&error), close), (106, 4006), "the one slot is taken");
    stop_sessions(&mut cluster).await;
    first.close().await;
    eventually("the close kept by the gateway", STEP, || async {
        (metric(cluster.addr(0), "rt_gateway_session_events_kept_total").await > 0.0).then_some(())
    })
    .await;
    cluster.add_session().await;
    eventually("the slot released", STEP, || async {
        let mut client = WsClient::open(&cluster.ws_url(0), WsEncoding::Json).await;
        let reply = client.command("connect", json!({ "token": token })).await;
        reply.get("ok").map(|_| ())
    })
    .await;
}

#[actix_rt::test]
async fn a_token_inside_the_clock_leeway_connects_and_is_closed_when_the_leeway_ends() {
    let cluster = TestCluster::start_with(1, |c| c.session.jwt_leeway_secs = 3).await;
    // Expired a second ago by its own `exp`, still valid for two more seconds
    // with the leeway.
    let exp = now_secs() - 1;
    let token = tokens::token_with(json!({"sub": "lia", "exp": exp, "iat": exp - 60}));
    let (mut client, _) = WsClient::connected_with(
        &cluster.ws_url(0),
        WsEncoding::Json,
        json!({ "token": token }),
    )
    .await;
    // Not closed at once: the connection is as valid as the connect was.
    assert_eq!(client.command("ping", json!({})).await["ok"], json!({}));
    let push = within(
        "the disconnect at exp + leeway",
        Duration::from_secs(5),
        client.next_push("disconnect"),
    )
    .await;
    let closed_at_ms = rt_shared::telemetry::now_ms();
    assert_eq!(push["code"], json!(4003));
    assert!(
        closed_at_ms >= (exp + 3) * 1000,
        "closed at {closed_at_ms}, before exp + leeway = {}",
        (exp + 3) * 1000
    );
    assert_eq!(client.closed().await.0, 4003);
    // Past the leeway, connect refuses it as expired.
    let stale = tokens::token_with(json!({"sub": "lia", "exp": now_secs() - 4}));
    let (error, close) = refused_connect(&cluster, json!({ "token": stale })).await;
    assert_eq!((code(&error), close), (109, 4003), "{error}");
}

/// `rt-session` as its own process on the cluster's NATS, configured as the
/// in-process instances are (`chat` namespace included, so resumed sessions
/// restore their `chat:` channels).
async fn session_process(cluster: &TestCluster) -> Option<ServiceProcess> {
    let binary = process::binary_or_skip("rt-session")?;
    let config = &cluster.config;
    let chat_history = config.namespaces["chat"].history_size.to_string();
    let env: Vec<(String, String)> = [
        ("RT_NATS_URL", config.nats.url.clone()),
        ("RT_LOG__FILTER", "info".to_owned()),
        ("RT_TELEMETRY__STATS_INTERVAL_MS", "0".to_owned()),
        ("RT_SESSION__HTTP_ADDR", "127.0.0.1:0".to_owned()),
        ("RT_SESSION__DATABASE_URL", "sqlite::memory:".to_owned()),
        (
            "RT_SESSION__JWT_HMAC_SECRET",
            rt_tests::cluster::JWT_SECRET.to_owned(),
        ),
        (
            "RT_SESSION__JWT_LEEWAY_SECS",
            config.session.jwt_leeway_secs.to_string(),
        ),
        (
            "RT_SESSION__NODE_TTL_MS",
            config.session.node_ttl_ms.to_string(),
        ),
        // Checked against the node TTL: the gateways' heartbeat.
        (
            "RT_GATEWAY__HEARTBEAT_MS",
            config.gateway.heartbeat_ms.to_string(),
        ),
        ("RT_NAMESPACES__CHAT__HISTORY_SIZE", chat_history),
    ]
    .map(|(k, v)| (k.to_owned(), v))
    .to_vec();
    Some(ServiceProcess::start(binary, env, "session ready").await)
}

/// The subscription list of `session` as the session service recorded it.
async fn recorded_subs(cluster: &TestCluster, session: &str) -> Option<Vec<String>> {
    let bytes = kv(cluster, rt_proto::session::SESSIONS_BUCKET)
        .await
        .get(session)
        .await
        .ok()??;
    let record: rt_proto::session::SessionRecord = rt_proto::internal::from_msgpack(&bytes).ok()?;
    Some(record.subs)
}

async fn publish(cluster: &TestCluster, channel: &str, data: Value) -> u64 {
    let res = rt_tests::http::post_json(
        cluster.addr(0),
        "/api/publish",
        Some(API_KEY),
        &json!({"channel": channel, "data": data}),
    )
    .await;
    assert_eq!(res.status, 200, "{}", res.text());
    res.json()["offset"].as_u64().expect("offset")
}

#[actix_rt::test]
async fn a_session_process_killed_with_sigkill_leaves_clients_connected_and_comes_back() {
    let mut cluster = TestCluster::start().await;
    stop_sessions(&mut cluster).await;
    let Some(mut session) = session_process(&cluster).await else {
        return;
    };
    let channel = "chat:sigkill";
    let token = tokens::token("kit");
    let (mut kit, ok) = WsClient::connected_with(
        &cluster.ws_url(0),
        WsEncoding::Json,
        json!({ "token": token }),
    )
    .await;
    let session_id = ok["session"].as_str().expect("session").to_owned();
    let subscribed = kit
        .command("subscribe", json!({ "channel": channel }))
        .await;
    let epoch = subscribed["ok"]["epoch"].clone();
    let mut lou = cluster.client_as(0, WsEncoding::MsgPack, "lou").await;
    lou.command("subscribe", json!({ "channel": channel }))
        .await;
    // The subscription list reaches the session service before it dies.
    eventually("kit's subscriptions recorded", STEP, || async {
        (recorded_subs(&cluster, &session_id).await? == [channel]).then_some(())
    })
    .await;

    session.kill();

    // Live connections do not need the session service: they stay, and
    // publications keep coming.
    let mut offset = 0;
    for i in 0..3 {
        offset = publish(&cluster, channel, json!(i)).await;
        for client in [&mut kit, &mut lou] {
            let publication = within("a publication", STEP, client.next_push("pub")).await;
            assert_eq!(publication["data"], json!(i));
        }
    }
    assert_eq!(kit.command("ping", json!({})).await["ok"], json!({}));
    // A connect with a token cannot be checked: 113 with a retry hint and
    // close 4007 (reconnect after it), never an unchecked admission.
    let (error, close) = eventually("113 while the session service is down", STEP, || async {
        let (error, close) =
            refused_connect(&cluster, json!({"token": tokens::token("max")})).await;
        // The moment NATS notices the dead connection, a request may time out first.
        (code(&error) == 113).then_some((error, close))
    })
    .await;
    assert_eq!(close, 4007, "{error}");
    assert!(error["retry_after_ms"].as_u64().is_some(), "{error}");
    // Anonymous clients still get in (with a session that cannot resume).
    cluster.client(0, WsEncoding::Json).await;

    session.restart().await;

    // New connects with tokens work again.
    cluster.client_as(0, WsEncoding::Json, "max").await;
    // And kit's session resumes: the subscription comes back, with what
    // was published while kit was away.
    kit.close().await;
    publish(&cluster, channel, json!("missed")).await;
    let args = json!({
        "token": token,
        "session": session_id,
        "subs": {channel: {"offset": offset, "epoch": epoch}},
    });
    let (mut kit, ok) = WsClient::connected_with(&cluster.ws_url(0), WsEncoding::Json, args).await;
    assert_eq!(
        ok["session"],
        json!(session_id),
        "{ok}\n{}",
        session.output()
    );
    assert_eq!(ok["resumed"], json!(true), "{ok}");
    let sub = &ok["subs"][channel];
    assert_eq!(sub["recovered"], json!(true), "{ok}");
    let missed: Vec<Value> = sub["pubs"]
        .as_array()
        .expect("pubs")
        .iter()
        .map(|p| p["data"].clone())
        .collect();
    assert_eq!(missed, [json!("missed")]);
    publish(&cluster, channel, json!("live")).await;
    assert_eq!(kit.next_push("pub").await["data"], json!("live"));
    assert_eq!(lou.next_push("pub").await["data"], json!("missed"));
}
