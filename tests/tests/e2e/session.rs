//! Tokens, private channels, resumable sessions, limits and kicks: the
//! session service seen from outside, through the gateways.

use std::collections::{BTreeSet, HashSet};
use std::net::SocketAddr;
use std::time::Duration;

use futures_util::StreamExt as _;
use rt_tests::presence::{self, presence_push};
use rt_tests::tokens::{self, now_secs};
use serde_json::{Value, json};

use crate::*;

fn code(reply: &Value) -> u64 {
    reply["error"]["code"]
        .as_u64()
        .unwrap_or_else(|| panic!("expected an error reply, got {reply}"))
}

/// Opens a socket, sends `connect` with `args`, returns the reply and the close code.
async fn refused_connect(cluster: &TestCluster, args: Value) -> (u64, u16) {
    let mut client = WsClient::open(&cluster.ws_url(0), WsEncoding::Json).await;
    let reply = client.command("connect", args).await;
    let code = code(&reply);
    (code, client.closed().await.0)
}

#[actix_rt::test]
async fn a_valid_token_names_the_user_and_its_info_reaches_publications() {
    let cluster = TestCluster::start().await;
    let token = tokens::token_with(json!({
        "sub": "alice", "exp": now_secs() + 60, "info": {"name": "Alice"}
    }));
    for encoding in WsEncoding::BOTH {
        let (mut c, ok) =
            WsClient::connected_with(&cluster.ws_url(0), encoding, json!({ "token": token })).await;
        assert_eq!(ok["user"], json!("alice"));
        assert_eq!(ok["resumed"], json!(false));
        assert_eq!(ok["session"].as_str().map(str::len), Some(32));
        c.command("subscribe", json!({"channel": "chat:info"}))
            .await;
        c.command("publish", json!({"channel": "chat:info", "data": 1}))
            .await;
        let publication = c.next_push("pub").await;
        assert_eq!(
            publication["info"],
            json!({"user": "alice", "client": ok["client"], "info": {"name": "Alice"}})
        );
    }
}

#[actix_rt::test]
async fn bad_tokens_of_every_kind_are_refused_with_the_documented_codes() {
    let cluster = TestCluster::start().await;
    let expired = tokens::token_with(json!({"sub": "bob", "exp": now_secs() - 10}));
    assert_eq!(
        refused_connect(&cluster, json!({ "token": expired })).await,
        (109, 4003)
    );
    let wrong_secret = tokens::sign(
        &json!({"sub": "bob", "exp": now_secs() + 60}),
        b"some other secret entirely",
    );
    let header_none = "eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0";
    let claims = "eyJzdWIiOiJib2IifQ"; // {"sub":"bob"}
    let valid = tokens::token("bob");
    let (head, rest) = valid.split_once('.').expect("a JWT has dots");
    let (_, signature) = rest.split_once('.').expect("a JWT has two dots");
    let cases = [
        ("wrong secret", wrong_secret),
        ("alg none", format!("{header_none}.{claims}.")),
        (
            "alg none with a signature",
            format!("{header_none}.{claims}.{signature}"),
        ),
        ("tampered claims", format!("{head}.{claims}.{signature}")),
        (
            "no sub",
            tokens::token_with(json!({"exp": now_secs() + 60})),
        ),
        ("sub not a string", tokens::token_with(json!({"sub": 7}))),
        (
            "channels not strings",
            tokens::token_with(json!({"sub": "bob", "channels": [1]})),
        ),
        (
            "info not an object",
            tokens::token_with(json!({"sub": "bob", "info": "x"})),
        ),
        ("garbage", "not a jwt".to_owned()),
        ("empty", String::new()),
        ("two parts", "abc.def".to_owned()),
        ("bad base64", "a!b.c!d.e!f".to_owned()),
    ];
    for (what, token) in cases {
        assert_eq!(
            refused_connect(&cluster, json!({ "token": token })).await,
            (101, 4002),
            "{what}"
        );
    }
    // A token of the wrong JSON type is a bad request, not a bad token.
    assert_eq!(
        refused_connect(&cluster, json!({"token": 5})).await,
        (107, 4000)
    );
}

#[actix_rt::test]
async fn a_live_connection_is_closed_with_4003_when_its_token_expires() {
    let cluster = TestCluster::start().await;
    let args = json!({ "token": tokens::expiring("carol", 2) });
    let (mut c, _) = WsClient::connected_with(&cluster.ws_url(0), WsEncoding::Json, args).await;
    let push = within(
        "the disconnect push",
        Duration::from_secs(5),
        c.next_push("disconnect"),
    )
    .await;
    assert_eq!(push["code"], json!(4003));
    assert_eq!(push["reconnect"], json!(true));
    assert_eq!(c.closed().await.0, 4003);
}

#[actix_rt::test]
async fn refresh_extends_a_live_connection_and_refuses_another_users_token() {
    let cluster = TestCluster::start().await;
    let args = json!({ "token": tokens::expiring("dave", 2) });
    let (mut c, _) = WsClient::connected_with(&cluster.ws_url(0), WsEncoding::MsgPack, args).await;
    let reply = c
        .command("refresh", json!({ "token": tokens::token("erin") }))
        .await;
    assert_eq!(code(&reply), 101, "a token for another user");
    let fresh = tokens::expiring("dave", 3600);
    let reply = c.command("refresh", json!({ "token": fresh })).await;
    let expires_at = reply["ok"]["expires_at"].as_u64().expect("expires_at");
    assert!(expires_at >= now_secs() + 3500, "{reply}");
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(c.command("ping", json!({})).await["ok"], json!({}));
    let reply = c
        .command(
            "refresh",
            json!({"token": tokens::token_with(json!({"sub": "dave"}))}),
        )
        .await;
    assert_eq!(reply["ok"]["expires_at"], json!(0), "no exp: never");
    let expired = tokens::token_with(json!({"sub": "dave", "exp": now_secs() - 5}));
    assert_eq!(
        code(&c.command("refresh", json!({ "token": expired })).await),
        109
    );
}

#[actix_rt::test]
async fn private_channels_need_the_channels_claim_or_a_channel_token() {
    let cluster = TestCluster::start().await;
    let token = tokens::token_with(json!({
        "sub": "frank", "exp": now_secs() + 60, "channels": ["priv:a"]
    }));
    let (mut c, _) = WsClient::connected_with(
        &cluster.ws_url(0),
        WsEncoding::Json,
        json!({ "token": token }),
    )
    .await;
    assert!(c.command("subscribe", json!({"channel": "priv:a"})).await["ok"].is_object());
    assert_eq!(
        code(&c.command("subscribe", json!({"channel": "priv:b"})).await),
        103
    );
    assert_eq!(
        code(&c.command("history", json!({"channel": "priv:b"})).await),
        103,
        "no reading around the rule"
    );
    let for_someone_else = tokens::channel_token("grace", "priv:b");
    assert_eq!(
        code(
            &c.command(
                "subscribe",
                json!({"channel": "priv:b", "token": for_someone_else})
            )
            .await
        ),
        103
    );
    let for_another_channel = tokens::channel_token("frank", "priv:c");
    assert_eq!(
        code(
            &c.command(
                "subscribe",
                json!({"channel": "priv:b", "token": for_another_channel})
            )
            .await
        ),
        103
    );
    let forged = tokens::sign(
        &json!({"sub": "frank", "channel": "priv:b", "exp": now_secs() + 60}),
        b"not the secret",
    );
    assert_eq!(
        code(
            &c.command("subscribe", json!({"channel": "priv:b", "token": forged}))
                .await
        ),
        101
    );
    let expired =
        tokens::token_with(json!({"sub": "frank", "channel": "priv:b", "exp": now_secs() - 5}));
    assert_eq!(
        code(
            &c.command("subscribe", json!({"channel": "priv:b", "token": expired}))
                .await
        ),
        109
    );
    let good = tokens::channel_token("frank", "priv:b");
    let reply = c
        .command("subscribe", json!({"channel": "priv:b", "token": good}))
        .await;
    assert!(reply["ok"].is_object(), "{reply}");
    // Anonymous clients never reach private channels.
    let mut anonymous = cluster.client(0, WsEncoding::Json).await;
    assert_eq!(
        code(
            &anonymous
                .command("subscribe", json!({"channel": "priv:a"}))
                .await
        ),
        103
    );
}

#[actix_rt::test]
async fn a_session_resumes_on_another_gateway_with_its_subscriptions_and_what_was_missed() {
    let cluster = TestCluster::start_with(2, |_| {}).await;
    let token = tokens::token("heidi");
    let (mut c, ok) = WsClient::connected_with(
        &cluster.ws_url(0),
        WsEncoding::MsgPack,
        json!({ "token": token }),
    )
    .await;
    let session = ok["session"].clone();
    let sub = c
        .command("subscribe", json!({"channel": "chat:resume"}))
        .await;
    let epoch = sub["ok"]["epoch"].clone();
    c.command("subscribe", json!({"channel": "chat:other"}))
        .await;
    c.command("publish", json!({"channel": "chat:resume", "data": "seen"}))
        .await;
    let seen = c.next_push("pub").await;
    let seen_offset = seen["offset"].as_u64().expect("offset");
    // The subscription list reaches the session service, then the client goes.
    tokio::time::sleep(Duration::from_millis(900)).await;
    drop(c);
    let mut publisher = cluster.client(1, WsEncoding::Json).await;
    for i in 0..3 {
        publisher
            .command("publish", json!({"channel": "chat:resume", "data": i}))
            .await;
    }
    let args = json!({
        "token": token,
        "session": session,
        "subs": {"chat:resume": {"offset": seen_offset, "epoch": epoch}},
    });
    let (_, ok) = WsClient::connected_with(&cluster.ws_url(1), WsEncoding::MsgPack, args).await;
    assert_eq!(ok["session"], session);
    assert_eq!(ok["resumed"], json!(true));
    let resumed = &ok["subs"]["chat:resume"];
    assert_eq!(resumed["recovered"], json!(true), "{ok}");
    let data: Vec<Value> = resumed["pubs"]
        .as_array()
        .expect("pubs")
        .iter()
        .map(|p| p["data"].clone())
        .collect();
    assert_eq!(data, vec![json!(0), json!(1), json!(2)]);
    // The channel the client did not list comes back from the session.
    assert!(ok["subs"]["chat:other"]["offset"].is_u64(), "{ok}");

    // Someone else's session id does not resume.
    let args = json!({ "token": tokens::token("ivan"), "session": session });
    let (_, ok) = WsClient::connected_with(&cluster.ws_url(0), WsEncoding::Json, args).await;
    assert_eq!(ok["resumed"], json!(false));
    assert_ne!(ok["session"], session);
}

#[actix_rt::test]
async fn connections_per_user_are_limited_across_gateways() {
    let cluster = TestCluster::start_with(2, |c| c.session.max_connections_per_user = 2).await;
    let mut first = cluster.client_as(0, WsEncoding::Json, "judy").await;
    let _second = cluster.client_as(1, WsEncoding::Json, "judy").await;
    let mut third = WsClient::open(&cluster.ws_url(0), WsEncoding::Json).await;
    let reply = third
        .command("connect", json!({"token": tokens::token("judy")}))
        .await;
    assert_eq!(code(&reply), 106);
    assert_eq!(third.closed().await.0, 4006);
    // Other users are not affected.
    cluster.client_as(0, WsEncoding::Json, "mallory").await;
    // A slot frees when a connection ends.
    first.close().await;
    eventually("a freed slot", STEP, || async {
        let mut c = WsClient::open(&cluster.ws_url(1), WsEncoding::Json).await;
        let reply = c
            .command("connect", json!({"token": tokens::token("judy")}))
            .await;
        reply.get("ok").map(|_| ())
    })
    .await;
}

#[actix_rt::test]
async fn api_disconnect_kicks_the_user_everywhere_with_4008_and_can_revoke() {
    let cluster = TestCluster::start_with(2, |_| {}).await;
    let token = tokens::token("ken");
    let mut on_first = cluster.client_as(0, WsEncoding::Json, "ken").await;
    let mut on_second = cluster.client_as(1, WsEncoding::MsgPack, "ken").await;
    let mut bystander = cluster.client_as(1, WsEncoding::Json, "leo").await;
    let res = rt_tests::http::post_json(
        cluster.addr(0),
        "/api/disconnect",
        Some(API_KEY),
        &json!({"user": "ken", "revoke": true}),
    )
    .await;
    assert_eq!(res.status, 200, "{}", res.text());
    for client in [&mut on_first, &mut on_second] {
        let push = client.next_push("disconnect").await;
        assert_eq!(push["reconnect"], json!(false));
        assert_eq!(client.closed().await.0, 4008);
    }
    assert_eq!(bystander.command("ping", json!({})).await["ok"], json!({}));
    // Revoked: the same token no longer connects; a newer one does.
    assert_eq!(
        refused_connect(&cluster, json!({ "token": token })).await,
        (101, 4002)
    );
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    cluster.client_as(0, WsEncoding::Json, "ken").await;

    let res = rt_tests::http::post_json(
        cluster.addr(0),
        "/api/disconnect",
        Some(API_KEY),
        &json!({}),
    )
    .await;
    assert_eq!(res.status, 400);
}

#[actix_rt::test]
async fn admission_control_closes_a_storm_with_4007_and_a_retry_hint() {
    let cluster = TestCluster::start_with(1, |c| {
        c.gateway.connect_rate = 1;
        c.gateway.connect_burst = 2;
        c.gateway.admission_retry_after_ms = 500;
    })
    .await;
    let _a = cluster.client(0, WsEncoding::Json).await;
    let _b = cluster.client(0, WsEncoding::Json).await;
    let mut refused = WsClient::open(&cluster.ws_url(0), WsEncoding::Json).await;
    let push = refused.next_push("disconnect").await;
    assert_eq!(push["code"], json!(4007));
    let retry = push["retry_after_ms"].as_u64().expect("retry hint");
    assert!((500..=1000).contains(&retry), "{push}");
    assert_eq!(refused.closed().await.0, 4007);
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    cluster.client(0, WsEncoding::Json).await;
}

#[actix_rt::test]
async fn without_a_session_service_tokens_wait_and_anonymous_clients_still_connect() {
    let mut cluster = TestCluster::start().await;
    for session in cluster.sessions.drain(..) {
        session.stop().await;
    }
    assert_eq!(
        refused_connect(&cluster, json!({"token": tokens::token("nina")})).await,
        (113, 4007)
    );
    let (_, ok) = WsClient::connected_with(&cluster.ws_url(0), WsEncoding::Json, json!({})).await;
    assert_eq!(ok["resumed"], json!(false));
}

#[actix_rt::test]
async fn clients_survive_a_session_service_restart_and_sessions_still_resume() {
    let mut cluster = TestCluster::start_with(1, |_| {}).await;
    cluster.add_session().await;
    let token = tokens::token("olga");
    let (mut c, ok) = WsClient::connected_with(
        &cluster.ws_url(0),
        WsEncoding::Json,
        json!({ "token": token }),
    )
    .await;
    c.command("subscribe", json!({"channel": "chat:restart"}))
        .await;
    tokio::time::sleep(Duration::from_millis(900)).await;
    for session in cluster.sessions.drain(..) {
        session.stop().await;
    }
    // Live connections do not need the session service.
    c.command("publish", json!({"channel": "chat:restart", "data": 1}))
        .await;
    assert_eq!(c.next_push("pub").await["data"], json!(1));
    cluster.add_session().await;
    drop(c);
    let args = json!({"token": token, "session": ok["session"]});
    let (_, resumed) = WsClient::connected_with(&cluster.ws_url(0), WsEncoding::Json, args).await;
    assert_eq!(resumed["resumed"], json!(true), "{resumed}");
    assert!(resumed["subs"]["chat:restart"].is_object(), "{resumed}");
}

/// A key pair from the session crate's test fixtures.
fn fixture(name: &str) -> String {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../services/session/tests/fixtures")
        .join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn signed(algorithm: jsonwebtoken::Algorithm, private_pem: &str, claims: &Value) -> String {
    let key = match algorithm {
        jsonwebtoken::Algorithm::RS256 => {
            jsonwebtoken::EncodingKey::from_rsa_pem(private_pem.as_bytes())
        }
        _ => jsonwebtoken::EncodingKey::from_ec_pem(private_pem.as_bytes()),
    }
    .expect("fixture key");
    jsonwebtoken::encode(&jsonwebtoken::Header::new(algorithm), claims, &key).expect("sign")
}

#[actix_rt::test]
async fn rs256_and_es256_tokens_verify_and_algorithm_confusion_is_refused() {
    let rsa_public = fixture("rsa_public.pem");
    let rsa = TestCluster::start_with(1, |c| {
        c.session.jwt_public_key_pem = rsa_public.clone();
    })
    .await;
    let claims = json!({"sub": "rita", "exp": now_secs() + 60});
    let good = signed(
        jsonwebtoken::Algorithm::RS256,
        &fixture("rsa_private.pem"),
        &claims,
    );
    let (_, ok) =
        WsClient::connected_with(&rsa.ws_url(0), WsEncoding::Json, json!({ "token": good })).await;
    assert_eq!(ok["user"], json!("rita"));
    let other_key = signed(
        jsonwebtoken::Algorithm::RS256,
        &fixture("rsa_other_private.pem"),
        &claims,
    );
    assert_eq!(
        refused_connect(&rsa, json!({ "token": other_key })).await,
        (101, 4002),
        "signed by another RSA key"
    );
    // HS256 "signed" with the public key as the secret: the classic confusion.
    let confused = tokens::sign(&claims, rsa_public.as_bytes());
    assert_eq!(
        refused_connect(&rsa, json!({ "token": confused })).await,
        (101, 4002),
        "HS256 with the RSA public key as secret"
    );
    let es = signed(
        jsonwebtoken::Algorithm::ES256,
        &fixture("ec_private.pem"),
        &claims,
    );
    assert_eq!(
        refused_connect(&rsa, json!({ "token": es })).await,
        (101, 4002),
        "ES256 where only an RSA key is configured"
    );

    let ec = TestCluster::start_with(1, |c| {
        c.session.jwt_public_key_pem = fixture("ec_public.pem");
        c.session.jwt_hmac_secret = rt_shared::config::Secret::default();
    })
    .await;
    let es = signed(
        jsonwebtoken::Algorithm::ES256,
        &fixture("ec_private.pem"),
        &claims,
    );
    let (_, ok) =
        WsClient::connected_with(&ec.ws_url(0), WsEncoding::Json, json!({ "token": es })).await;
    assert_eq!(ok["user"], json!("rita"));
    assert_eq!(
        refused_connect(&ec, json!({ "token": tokens::token("rita") })).await,
        (101, 4002),
        "HS256 where no secret is configured"
    );
}

#[actix_rt::test]
async fn a_full_session_queue_sheds_with_113_and_a_retry_hint() {
    let cluster = TestCluster::start_with(1, |c| c.session.queue_capacity = 1).await;
    let url = cluster.ws_url(0);
    let attempts = (0..60).map(|i| {
        let url = url.clone();
        async move {
            let mut client = WsClient::open(&url, WsEncoding::Json).await;
            let token = tokens::token(&format!("crowd{i}"));
            client.command("connect", json!({ "token": token })).await
        }
    });
    let replies = futures_util::future::join_all(attempts).await;
    let shed: Vec<&Value> = replies
        .iter()
        .filter(|r| r["error"]["code"] == json!(113))
        .collect();
    assert!(!shed.is_empty(), "60 connects at once against a queue of 1");
    for reply in &shed {
        assert_eq!(reply["error"]["temporary"], json!(true));
        assert!(
            reply["error"]["retry_after_ms"].as_u64().is_some(),
            "{reply}"
        );
    }
    assert!(
        replies
            .iter()
            .all(|r| r.get("ok").is_some() || r["error"]["code"] == json!(113)),
        "only successes and sheds: {replies:?}"
    );
}

#[actix_rt::test]
async fn two_session_instances_share_connection_limits_and_revocations() {
    let mut cluster = TestCluster::start_with(2, |c| c.session.max_connections_per_user = 3).await;
    cluster.add_session().await;
    // Connects spread over both instances; the limit holds across them.
    let mut held = Vec::new();
    for gateway in [0, 1, 0] {
        held.push(cluster.client_as(gateway, WsEncoding::Json, "sam").await);
    }
    for gateway in [0, 1] {
        let mut c = WsClient::open(&cluster.ws_url(gateway), WsEncoding::Json).await;
        let reply = c
            .command("connect", json!({"token": tokens::token("sam")}))
            .await;
        assert_eq!(code(&reply), 106, "gateway {gateway}");
    }
    // A revocation handled by one instance is applied by the other.
    let res = rt_tests::http::post_json(
        cluster.addr(1),
        "/api/disconnect",
        Some(API_KEY),
        &json!({"user": "tess", "revoke": true}),
    )
    .await;
    assert_eq!(res.status, 200);
    let old = tokens::token_with(json!({"sub": "tess", "iat": now_secs() - 10}));
    for _ in 0..6 {
        assert_eq!(
            refused_connect(&cluster, json!({ "token": old })).await,
            (101, 4002)
        );
    }
}

#[actix_rt::test]
async fn a_new_session_instance_warms_sessions_from_the_database_before_it_is_ready() {
    let dir = tempfile::tempdir().expect("temp dir");
    let url = format!("sqlite://{}/session.db", dir.path().display());
    let mut cluster = TestCluster::start_with(1, |c| c.session.database_url = url.clone()).await;
    let token = tokens::token("uma");
    let (mut c, ok) = WsClient::connected_with(
        &cluster.ws_url(0),
        WsEncoding::Json,
        json!({ "token": token }),
    )
    .await;
    c.command("subscribe", json!({"channel": "chat:warm"}))
        .await;
    c.close().await;
    let session = ok["session"].as_str().expect("session").to_owned();
    // The close reaches the session service, which writes it behind.
    tokio::time::sleep(Duration::from_millis(500)).await;
    for instance in cluster.sessions.drain(..) {
        instance.stop().await;
    }
    // NATS loses the session (as a NATS without its old file store would).
    let js = async_nats::jetstream::new(cluster.nats_client().await);
    let sessions = js
        .get_key_value(rt_proto::session::SESSIONS_BUCKET)
        .await
        .expect("sessions bucket");
    sessions.purge(&session).await.expect("purge");
    assert!(sessions.get(&session).await.expect("get").is_none());

    cluster.add_session().await;
    let metrics = rt_tests::http::get(cluster.sessions[0].ops_addr(), "/readyz", &[]).await;
    assert_eq!(metrics.status, 200, "ready only after warming");
    assert!(
        sessions.get(&session).await.expect("get").is_some(),
        "back in KV"
    );
    let args = json!({"token": token, "session": session});
    let (_, resumed) = WsClient::connected_with(&cluster.ws_url(0), WsEncoding::Json, args).await;
    assert_eq!(resumed["resumed"], json!(true), "{resumed}");
    assert!(resumed["subs"]["chat:warm"].is_object(), "{resumed}");
}

#[actix_rt::test]
async fn a_gateway_holds_at_most_max_channels_and_verified_tokens_are_cached() {
    let cluster = TestCluster::start_with(1, |c| c.gateway.max_channels = 2).await;
    let token = tokens::token("vera");
    let mut c = cluster.client_as(0, WsEncoding::Json, "vera").await;
    for channel in ["chat:c1", "chat:c2"] {
        assert!(c.command("subscribe", json!({ "channel": channel })).await["ok"].is_object());
    }
    let mut other = cluster.client(0, WsEncoding::Json).await;
    assert_eq!(
        code(
            &other
                .command("subscribe", json!({"channel": "chat:c3"}))
                .await
        ),
        106,
        "a third channel on this node"
    );
    assert!(
        other
            .command("subscribe", json!({"channel": "chat:c1"}))
            .await["ok"]
            .is_object(),
        "channels the node already holds are fine"
    );

    for _ in 0..3 {
        WsClient::connected_with(
            &cluster.ws_url(0),
            WsEncoding::Json,
            json!({ "token": token }),
        )
        .await;
    }
    let metrics = rt_tests::http::get(cluster.sessions[0].ops_addr(), "/metrics", &[])
        .await
        .text();
    let hits: f64 = metrics
        .lines()
        .filter(|l| l.starts_with("rt_cache_hits_total{cache=\"token\"}"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert!(
        hits >= 3.0,
        "the same token verified once, then cached:\n{metrics}"
    );
}

#[actix_rt::test]
async fn sockets_that_leave_during_connect_do_not_keep_connection_slots() {
    let cluster = TestCluster::start_with(1, |c| c.session.max_connections_per_user = 2).await;
    for _ in 0..6 {
        let mut c = WsClient::open(&cluster.ws_url(0), WsEncoding::Json).await;
        c.send(&json!({"id": 1, "op": "connect", "token": tokens::token("wade")}))
            .await;
        // Gone before the answer (most of the time): no slot may stay taken.
        drop(c);
    }
    eventually("both slots free again", STEP, || async {
        let mut held = Vec::new();
        for _ in 0..2 {
            let mut c = WsClient::open(&cluster.ws_url(0), WsEncoding::Json).await;
            let reply = c
                .command("connect", json!({"token": tokens::token("wade")}))
                .await;
            reply.get("ok")?;
            held.push(c);
        }
        Some(())
    })
    .await;
}

/// The sum of the samples of `name` (e.g. `rt_session_requests_total`) whose
/// labels include every one of `labels` (e.g. `op="auth"`), as session
/// instance `index` exports them.
async fn session_metric(cluster: &TestCluster, index: usize, name: &str, labels: &[&str]) -> f64 {
    let text = rt_tests::http::get(cluster.sessions[index].ops_addr(), "/metrics", &[])
        .await
        .text();
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let metric = series.split('{').next()?;
            let wanted = metric == name && labels.iter().all(|label| series.contains(label));
            wanted.then(|| value.parse::<f64>().ok()).flatten()
        })
        .sum()
}

/// `rt_session_created_total` of each session instance.
async fn sessions_created(cluster: &TestCluster) -> Vec<f64> {
    let mut counts = Vec::new();
    for index in 0..cluster.sessions.len() {
        counts.push(session_metric(cluster, index, "rt_session_created_total", &[]).await);
    }
    counts
}

/// Sleeps until the wall clock reaches `secs` (seconds since the Unix epoch),
/// the moment a token with that `exp` stops being valid.
async fn sleep_until_secs(secs: u64) {
    while now_secs() < secs {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A client of `user` on `gateway`, subscribed to `channel`; with its client id.
async fn joined(
    cluster: &TestCluster,
    gateway: usize,
    encoding: WsEncoding,
    user: &str,
    channel: &str,
) -> (WsClient, String) {
    presence::joined(&cluster.ws_url(gateway), encoding, user, channel).await
}

/// Who is in `channel`, asked over WebSocket through `client` and over HTTP
/// through the gateway at `gateway`.
async fn listed_both_ways(
    cluster: &TestCluster,
    gateway: usize,
    client: &mut WsClient,
    channel: &str,
) -> (BTreeSet<String>, BTreeSet<String>) {
    let reply = client
        .command("presence", json!({ "channel": channel }))
        .await;
    let answer = presence::presence_over_http(cluster.addr(gateway), channel).await;
    (
        presence::client_ids(&reply["ok"]["clients"]),
        presence::client_ids(&answer["clients"]),
    )
}

/// Waits until `presence` lists exactly `expected` through every gateway,
/// both over WebSocket (`clients[g]` is on gateway `g`) and over HTTP; then
/// asks a few more times, so that both session instances (each answers from
/// its own mirror of the presence bucket) are seen to agree.
async fn listed_everywhere(
    cluster: &TestCluster,
    clients: &mut [&mut WsClient],
    channel: &str,
    expected: &[&str],
) {
    let expected: BTreeSet<String> = expected.iter().map(|id| (*id).to_owned()).collect();
    for (gateway, client) in clients.iter_mut().enumerate() {
        let deadline = tokio::time::Instant::now() + STEP;
        loop {
            let (ws, http) = listed_both_ways(cluster, gateway, client, channel).await;
            if ws == expected && http == expected {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "gateway {gateway} never listed {expected:?}: over WebSocket {ws:?}, over HTTP {http:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        for _ in 0..4 {
            let (ws, http) = listed_both_ways(cluster, gateway, client, channel).await;
            assert_eq!(ws, expected, "gateway {gateway} over WebSocket");
            assert_eq!(http, expected, "gateway {gateway} over HTTP");
        }
    }
}

/// The `data` of a recovered subscription's `pubs`.
fn recovered_data(sub: &Value) -> Vec<Value> {
    sub["pubs"]
        .as_array()
        .unwrap_or_else(|| panic!("no pubs in {sub}"))
        .iter()
        .map(|p| p["data"].clone())
        .collect()
}

/// Everything the session service does must hold with two instances (a
/// queue group: any request may reach either) behind two gateways: a session
/// resumed through the other gateway and instance, presence and join/leave
/// across gateways, kicks on both gateways, `refresh`, and, once one instance
/// stops, the other serving everything, sessions the stopped one created
/// included.
#[actix_rt::test]
async fn two_session_instances_behind_two_gateways_share_sessions_presence_kicks_and_refresh() {
    const ROOM: &str = "room:two-by-two";
    const CHAT: &str = "chat:two-by-two";
    let mut cluster = TestCluster::start_with(2, |_| {}).await;
    cluster.add_session().await;

    // refresh keeps a live connection whose first token lasts 2 s. Each
    // token differs (no cache hit), so both instances verify some.
    let first_exp = now_secs() + 2;
    let short = tokens::token_with(json!({"sub": "dora", "exp": first_exp, "iat": now_secs()}));
    let (mut dora, _) = WsClient::connected_with(
        &cluster.ws_url(1),
        WsEncoding::MsgPack,
        json!({ "token": short }),
    )
    .await;
    for i in 0..16 {
        let exp = now_secs() + 3600 + i;
        let fresh = tokens::token_with(json!({"sub": "dora", "exp": exp, "iat": now_secs()}));
        let reply = dora.command("refresh", json!({ "token": fresh })).await;
        assert_eq!(
            reply["ok"]["expires_at"],
            json!(exp),
            "refresh {i}: {reply}"
        );
    }
    let reply = dora
        .command("refresh", json!({ "token": tokens::token("erin") }))
        .await;
    assert_eq!(code(&reply), 101, "a token for another user");

    // Presence and join/leave across the gateways.
    let (mut ann, ann_id) = joined(&cluster, 0, WsEncoding::Json, "ann", ROOM).await;
    let (mut ben, ben_id) = joined(&cluster, 1, WsEncoding::MsgPack, "ben", ROOM).await;
    let join = presence_push(&mut ann, "join", &ben_id).await;
    assert_eq!(join["info"], json!({"user": "ben", "client": ben_id}));
    listed_everywhere(
        &cluster,
        &mut [&mut ann, &mut ben],
        ROOM,
        &[&ann_id, &ben_id],
    )
    .await;

    // A session made through gateway 0 resumes through gateway 1 with what it missed.
    let carl_token = tokens::token("carl");
    let (mut carl, ok) = WsClient::connected_with(
        &cluster.ws_url(0),
        WsEncoding::Json,
        json!({ "token": carl_token }),
    )
    .await;
    let session = ok["session"].clone();
    let carl_id = ok["client"].as_str().expect("client id").to_owned();
    let sub = carl.command("subscribe", json!({ "channel": CHAT })).await;
    let epoch = sub["ok"]["epoch"].clone();
    carl.command("subscribe", json!({ "channel": ROOM })).await;
    presence_push(&mut ben, "join", &carl_id).await;
    carl.command("publish", json!({"channel": CHAT, "data": "seen"}))
        .await;
    let seen = carl.next_push("pub").await["offset"]
        .as_u64()
        .expect("offset");
    // The subscription list reaches the session service, then the client goes.
    tokio::time::sleep(Duration::from_millis(900)).await;
    drop(carl);
    presence_push(&mut ben, "leave", &carl_id).await;
    let mut publisher = cluster.client(1, WsEncoding::Json).await;
    for i in 0..3 {
        publisher
            .command("publish", json!({"channel": CHAT, "data": i}))
            .await;
    }
    let args = json!({
        "token": carl_token,
        "session": session,
        "subs": { CHAT: {"offset": seen, "epoch": epoch} },
    });
    let (mut carl, ok) =
        WsClient::connected_with(&cluster.ws_url(1), WsEncoding::MsgPack, args).await;
    assert_eq!(ok["resumed"], json!(true), "{ok}");
    assert_eq!(ok["session"], session);
    assert_eq!(ok["subs"][CHAT]["recovered"], json!(true), "{ok}");
    assert_eq!(
        recovered_data(&ok["subs"][CHAT]),
        vec![json!(0), json!(1), json!(2)]
    );
    assert!(
        ok["subs"][ROOM]["offset"].is_u64(),
        "the room comes back: {ok}"
    );
    let carl_id = ok["client"].as_str().expect("client id").to_owned();
    // Its restored room subscription joins again, seen on the other gateway.
    presence_push(&mut ann, "join", &carl_id).await;
    listed_everywhere(
        &cluster,
        &mut [&mut ann, &mut ben],
        ROOM,
        &[&ann_id, &ben_id, &carl_id],
    )
    .await;

    // POST /api/disconnect through one gateway kicks the user on both.
    let mut eve_on_first = cluster.client_as(0, WsEncoding::Json, "eve").await;
    let (mut eve_on_second, eve_id) = joined(&cluster, 1, WsEncoding::MsgPack, "eve", ROOM).await;
    presence_push(&mut ann, "join", &eve_id).await;
    let res = rt_tests::http::post_json(
        cluster.addr(0),
        "/api/disconnect",
        Some(API_KEY),
        &json!({"user": "eve"}),
    )
    .await;
    assert_eq!(res.status, 200, "{}", res.text());
    for (gateway, eve) in [(0, &mut eve_on_first), (1, &mut eve_on_second)] {
        let push = eve.next_push("disconnect").await;
        assert_eq!(push["code"], json!(4008), "gateway {gateway}");
        assert_eq!(push["reconnect"], json!(false), "gateway {gateway}");
        assert_eq!(eve.closed().await.0, 4008, "gateway {gateway}");
    }
    presence_push(&mut ann, "leave", &eve_id).await;
    for bystander in [&mut ann, &mut ben, &mut carl] {
        assert_eq!(bystander.command("ping", json!({})).await["ok"], json!({}));
    }

    // Enough connects that both instances surely answered some (each goes
    // to one of the two at random: 2^-20 that one instance got them all).
    for i in 0..20 {
        let mut c = cluster
            .client_as(i % 2, WsEncoding::Json, &format!("spread{i}"))
            .await;
        c.close().await;
    }
    for index in 0..2 {
        for op in ["auth", "refresh", "presence"] {
            let answered = session_metric(
                &cluster,
                index,
                "rt_session_requests_total",
                &[&format!("op=\"{op}\""), "code=\"0\""],
            )
            .await;
            assert!(answered > 0.0, "instance {index} answered no {op} request");
        }
    }

    // dora's first token has run out; her refreshed connection stays.
    sleep_until_secs(first_exp + 1).await;
    assert_eq!(dora.command("ping", json!({})).await["ok"], json!({}));

    // One instance stops: the other serves everything, including resuming a
    // session that only the stopped one handled.
    let before = sessions_created(&cluster).await;
    let fay_token = tokens::token("fay");
    let (mut fay, ok) = WsClient::connected_with(
        &cluster.ws_url(0),
        WsEncoding::Json,
        json!({ "token": fay_token }),
    )
    .await;
    let after = sessions_created(&cluster).await;
    let creator: Vec<usize> = (0..2).filter(|&i| after[i] > before[i]).collect();
    assert_eq!(
        creator.len(),
        1,
        "one instance made fay's session: {before:?} → {after:?}"
    );
    let creator = creator[0];
    let fay_session = ok["session"].clone();
    let sub = fay.command("subscribe", json!({ "channel": CHAT })).await;
    let (offset, epoch) = (sub["ok"]["offset"].clone(), sub["ok"]["epoch"].clone());
    fay.command("subscribe", json!({ "channel": ROOM })).await;
    tokio::time::sleep(Duration::from_millis(900)).await;
    fay.close().await;
    // The close reaches a session instance before the one that made the session goes.
    tokio::time::sleep(Duration::from_millis(500)).await;
    cluster.sessions.remove(creator).stop().await;
    let resumed_before = session_metric(&cluster, 0, "rt_session_resumed_total", &[]).await;
    publisher
        .command("publish", json!({"channel": CHAT, "data": "while away"}))
        .await;
    let args = json!({
        "token": fay_token,
        "session": fay_session,
        "subs": { CHAT: {"offset": offset, "epoch": epoch} },
    });
    let (_fay, ok) = WsClient::connected_with(&cluster.ws_url(1), WsEncoding::Json, args).await;
    assert_eq!(ok["resumed"], json!(true), "{ok}");
    assert_eq!(ok["session"], fay_session);
    assert_eq!(
        recovered_data(&ok["subs"][CHAT]),
        vec![json!("while away")],
        "{ok}"
    );
    assert!(
        ok["subs"][ROOM]["offset"].is_u64(),
        "the room comes back: {ok}"
    );
    let fay_id = ok["client"].as_str().expect("client id").to_owned();
    assert_eq!(
        session_metric(&cluster, 0, "rt_session_resumed_total", &[]).await,
        resumed_before + 1.0,
        "the remaining instance resumed it"
    );
    presence_push(&mut ann, "join", &fay_id).await;
    listed_everywhere(
        &cluster,
        &mut [&mut ann, &mut ben],
        ROOM,
        &[&ann_id, &ben_id, &carl_id, &fay_id],
    )
    .await;
    let fresh = tokens::token_with(json!({"sub": "dora", "exp": now_secs() + 7200}));
    let reply = dora.command("refresh", json!({ "token": fresh })).await;
    assert!(reply["ok"]["expires_at"].is_u64(), "{reply}");
}

/// A session resumes within `resume_ttl_secs` of its connection's end, and
/// not after: then the client gets a new session (`resumed: false`) and the
/// old one's channels do not come back. Channels the client lists itself
/// still recover from the channel's history, which does not depend on the session.
#[actix_rt::test]
async fn a_session_resumes_within_resume_ttl_secs_and_not_after() {
    const TTL: Duration = Duration::from_secs(2);
    const LISTED: &str = "chat:ttl-listed";
    const KEPT: &str = "chat:ttl-kept";
    let cluster = TestCluster::start_with(1, |c| c.session.resume_ttl_secs = TTL.as_secs()).await;
    let token = tokens::token("tilda");
    let (mut c, ok) = WsClient::connected_with(
        &cluster.ws_url(0),
        WsEncoding::Json,
        json!({ "token": token }),
    )
    .await;
    let session = ok["session"].clone();
    let sub = c.command("subscribe", json!({ "channel": LISTED })).await;
    let epoch = sub["ok"]["epoch"].clone();
    c.command("subscribe", json!({ "channel": KEPT })).await;
    c.command("publish", json!({"channel": LISTED, "data": "seen"}))
        .await;
    let seen = c.next_push("pub").await["offset"].as_u64().expect("offset");
    c.close().await;
    let closed = tokio::time::Instant::now();
    let mut publisher = cluster.client(0, WsEncoding::Json).await;
    publisher
        .command("publish", json!({"channel": LISTED, "data": 1}))
        .await;
    // The close reaches the session service (events go every 50 ms).
    tokio::time::sleep(Duration::from_millis(300)).await;

    let args = json!({
        "token": token,
        "session": session,
        "subs": { LISTED: {"offset": seen, "epoch": epoch} },
    });
    let (mut c, ok) = WsClient::connected_with(&cluster.ws_url(0), WsEncoding::Json, args).await;
    assert!(
        closed.elapsed() < TTL,
        "the machine is too slow for this test: the resume came {:?} after the close",
        closed.elapsed()
    );
    assert_eq!(ok["resumed"], json!(true), "within the TTL: {ok}");
    assert_eq!(ok["session"], session);
    assert_eq!(recovered_data(&ok["subs"][LISTED]), vec![json!(1)]);
    assert!(ok["subs"][KEPT]["offset"].is_u64(), "{ok}");
    let latest = ok["subs"][LISTED]["offset"].as_u64().expect("offset");

    c.close().await;
    let closed = tokio::time::Instant::now();
    publisher
        .command("publish", json!({"channel": LISTED, "data": 2}))
        .await;
    tokio::time::sleep_until(closed + TTL + Duration::from_millis(500)).await;
    let args = json!({
        "token": token,
        "session": session,
        "subs": { LISTED: {"offset": latest, "epoch": epoch} },
    });
    let (mut c, ok) = WsClient::connected_with(&cluster.ws_url(0), WsEncoding::Json, args).await;
    assert_eq!(ok["resumed"], json!(false), "past the TTL: {ok}");
    let fresh = ok["session"].as_str().expect("a session id");
    assert_eq!(fresh.len(), 32, "{ok}");
    assert_ne!(ok["session"], session, "a new session");
    assert!(ok["subs"].get(KEPT).is_none(), "not restored: {ok}");
    assert_eq!(ok["subs"][LISTED]["recovered"], json!(true), "{ok}");
    assert_eq!(recovered_data(&ok["subs"][LISTED]), vec![json!(2)]);
    // Nothing of the old session's channel reaches it.
    publisher
        .command("publish", json!({"channel": KEPT, "data": "not for you"}))
        .await;
    publisher
        .command("publish", json!({"channel": LISTED, "data": 3}))
        .await;
    let next = c.next_push("pub").await;
    assert_eq!(
        (next["channel"].clone(), next["data"].clone()),
        (json!(LISTED), json!(3))
    );
    assert!(
        c.next_message_now().is_none(),
        "nothing else arrived with it"
    );
}

/// A verified token is cached, but never past its `exp`: after it, the same
/// token is refused with 109 both at `connect` and in `refresh`.
#[actix_rt::test]
async fn a_cached_token_verdict_never_outlives_the_tokens_exp() {
    let cluster = TestCluster::start().await;
    let exp = now_secs() + 4;
    let token = tokens::token_with(json!({"sub": "cora", "exp": exp, "iat": now_secs()}));
    let (mut live, _) = WsClient::connected_with(
        &cluster.ws_url(0),
        WsEncoding::Json,
        json!({ "token": tokens::token("cora") }),
    )
    .await;
    let hits = || session_metric(&cluster, 0, "rt_cache_hits_total", &["cache=\"token\""]);
    let hits_before = hits().await;
    for _ in 0..2 {
        let (mut c, ok) = WsClient::connected_with(
            &cluster.ws_url(0),
            WsEncoding::Json,
            json!({ "token": token }),
        )
        .await;
        assert_eq!(ok["user"], json!("cora"));
        c.close().await;
    }
    let reply = live.command("refresh", json!({ "token": token })).await;
    assert_eq!(reply["ok"]["expires_at"], json!(exp), "{reply}");
    // Back to a long token, so the live connection outlives the short one.
    let reply = live
        .command("refresh", json!({ "token": tokens::token("cora") }))
        .await;
    assert!(reply["ok"]["expires_at"].as_u64() > Some(exp), "{reply}");
    assert!(
        hits().await >= hits_before + 2.0,
        "the token was verified once, then served from the cache"
    );
    assert!(now_secs() < exp, "the machine is too slow for this test");

    sleep_until_secs(exp).await;
    for attempt in 0..2 {
        assert_eq!(
            refused_connect(&cluster, json!({ "token": token })).await,
            (109, 4003),
            "connect {attempt} after exp"
        );
    }
    let reply = live.command("refresh", json!({ "token": token })).await;
    assert_eq!(code(&reply), 109, "refresh after exp: {reply}");
    assert_eq!(live.command("ping", json!({})).await["ok"], json!({}));
}

/// A channel token's authorization is cached too, never past its `exp`:
/// after it, the same channel token is refused with 109, the connections it
/// opened the channel to need a new one, and a resumed session does not
/// bring the channel back.
#[actix_rt::test]
async fn a_cached_channel_token_verdict_is_not_reused_after_its_exp() {
    const CHANNEL: &str = "priv:soon";
    let cluster = TestCluster::start().await;
    let exp = now_secs() + 4;
    let channel_token = tokens::token_with(json!({"sub": "cole", "channel": CHANNEL, "exp": exp}));
    let subscribe = json!({"channel": CHANNEL, "token": channel_token});
    let user_token = tokens::token("cole");
    let (mut first, first_ok) = WsClient::connected_with(
        &cluster.ws_url(0),
        WsEncoding::Json,
        json!({ "token": user_token }),
    )
    .await;
    let reply = first.command("subscribe", subscribe.clone()).await;
    assert!(reply["ok"].is_object(), "{reply}");
    let hits = || {
        session_metric(
            &cluster,
            0,
            "rt_cache_hits_total",
            &["cache=\"channel_token\""],
        )
    };
    let hits_before = hits().await;
    let mut second = cluster.client_as(0, WsEncoding::MsgPack, "cole").await;
    let reply = second.command("subscribe", subscribe.clone()).await;
    assert!(reply["ok"].is_object(), "{reply}");
    assert!(
        hits().await >= hits_before + 1.0,
        "the second authorization came from the cache"
    );
    second
        .command("unsubscribe", json!({ "channel": CHANNEL }))
        .await;
    assert!(now_secs() < exp, "the machine is too slow for this test");

    sleep_until_secs(exp).await;
    let mut third = cluster.client_as(0, WsEncoding::Json, "cole").await;
    assert_eq!(
        code(&third.command("subscribe", subscribe.clone()).await),
        109,
        "a new connection after exp"
    );
    assert_eq!(
        code(&second.command("subscribe", subscribe.clone()).await),
        109,
        "the connection the token opened the channel to, after exp"
    );
    assert_eq!(
        code(
            &second
                .command("subscribe", json!({ "channel": CHANNEL }))
                .await
        ),
        103,
        "its grant ended with the token"
    );
    first.close().await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let args = json!({"token": user_token, "session": first_ok["session"]});
    let (_, ok) = WsClient::connected_with(&cluster.ws_url(0), WsEncoding::Json, args).await;
    assert_eq!(ok["resumed"], json!(true), "{ok}");
    assert!(
        ok["subs"].get(CHANNEL).is_none(),
        "a private channel whose token expired is not restored: {ok}"
    );
}

/// A new session instance answers `/readyz` with 503 while it loads its hot
/// set (recent sessions) from the database into NATS KV, and 200 only once
/// all of it is there. The database holds enough sessions that warming takes
/// a measurable time, and `/readyz` is polled from the instance's start.
#[actix_rt::test]
async fn readyz_is_503_while_a_new_session_instance_warms_and_200_once_warmed() {
    const SESSIONS: usize = 4_000;
    let dir = tempfile::tempdir().expect("temp dir");
    let mut cluster = TestCluster::start().await;
    for instance in cluster.sessions.drain(..) {
        instance.stop().await;
    }
    let mut config = cluster.config.clone();
    config.session.database_url = format!("sqlite://{}/warm.db", dir.path().display());
    config.session.warm_sessions = SESSIONS;
    // The durable record of SESSIONS recently closed sessions, written as the
    // service writes it.
    let ids: Vec<String> = (0..SESSIONS)
        .map(|i| format!("{:032x}", 0x5eed_0000_u64 + i as u64))
        .collect();
    {
        let registry = rt_shared::metrics::MetricsRegistry::default();
        let store = rt_session::store::Store::open(&config.session, &registry)
            .await
            .expect("the database opens");
        let now = rt_shared::telemetry::now_ms();
        for (i, id) in ids.iter().enumerate() {
            let age = i as u64;
            let record = rt_proto::session::SessionRecord {
                user: format!("warm{i}"),
                created_ms: now - 60_000,
                updated_ms: now - 1_000 - age,
                node: None,
                closed_ms: Some(now - 1_000 - age),
                subs: vec!["chat:warmed".to_owned()],
                grants: Vec::new(),
            };
            store.save_session(id, &record);
        }
        store.flush().await.expect("the sessions are written");
    }
    let js = async_nats::jetstream::new(cluster.nats_client().await);
    let bucket = js
        .get_key_value(rt_proto::session::SESSIONS_BUCKET)
        .await
        .expect("sessions bucket");
    let wanted: HashSet<&str> = ids.iter().map(String::as_str).collect();
    let in_kv = || async {
        let mut keys = bucket.keys().await.expect("keys");
        let mut found = 0;
        while let Some(key) = keys.next().await {
            if wanted.contains(key.expect("a key").as_str()) {
                found += 1;
            }
        }
        found
    };
    assert_eq!(in_kv().await, 0, "KV starts without them");

    let ops: SocketAddr = ([127, 0, 0, 1], rt_tests::nats::free_port()).into();
    config.session.http_addr = ops.to_string();
    let started = tokio::time::Instant::now();
    let poll = async {
        // Each distinct answer in order, with when it was first seen.
        let mut answers: Vec<(String, Duration)> = Vec::new();
        loop {
            let answer = match rt_tests::http::request(ops, "GET", "/readyz", &[], b"").await {
                Ok(res) => format!("{} {}", res.status, res.text().trim()),
                Err(_) => "no answer".to_owned(),
            };
            let ready = answer.starts_with("200");
            if answers.last().map(|(a, _)| a) != Some(&answer) {
                answers.push((answer, started.elapsed()));
            }
            if ready {
                // Straight away: everything warmed must be in KV already.
                return (answers, in_kv().await);
            }
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "never ready: {answers:?}"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    };
    let (instance, (answers, warmed_when_ready)) =
        futures_util::future::join(rt_session::run(config), poll).await;
    cluster
        .sessions
        .push(instance.expect("session service starts"));
    let starting = answers
        .iter()
        .position(|(a, _)| a == "503 not ready: starting");
    let ready = answers.iter().position(|(a, _)| a.starts_with("200"));
    assert!(
        matches!((starting, ready), (Some(s), Some(r)) if s < r),
        "503 while starting, then 200: {answers:?}"
    );
    assert_eq!(
        warmed_when_ready, SESSIONS,
        "every warmed session was in KV by the first 200 ({answers:?})"
    );
    eprintln!("readiness while warming {SESSIONS} sessions: {answers:?}");

    // A warmed session resumes through a gateway.
    let args = json!({"token": tokens::token("warm7"), "session": ids[7]});
    let (_, ok) = WsClient::connected_with(&cluster.ws_url(0), WsEncoding::Json, args).await;
    assert_eq!(ok["resumed"], json!(true), "{ok}");
    assert!(ok["subs"]["chat:warmed"].is_object(), "{ok}");
}
