//! Tokens, private channels, resumable sessions, limits and kicks: the
//! session service seen from outside, through the gateways.

use std::time::Duration;

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
async fn two_session_instances_share_limits_sessions_and_revocations() {
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
