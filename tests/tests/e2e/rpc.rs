//! RPC: the gateway forwards to `rt.rpc.<method>`; compute (or any service) answers.

use std::time::{Duration, Instant};

use futures_util::StreamExt as _;
use rt_tests::http;
use serde_json::{Value, json};

use crate::*;

fn code(reply: &Value) -> u64 {
    reply["error"]["code"]
        .as_u64()
        .unwrap_or_else(|| panic!("expected an error reply, got {reply}"))
}

async fn cluster_with_compute(adjust: impl FnOnce(&mut rt_shared::config::Config)) -> TestCluster {
    let mut cluster = TestCluster::start_with(1, adjust).await;
    cluster.start_compute().await;
    cluster
}

#[actix_rt::test]
async fn password_hashing_round_trip_in_both_encodings() {
    let cluster = cluster_with_compute(|_| {}).await;
    for encoding in WsEncoding::BOTH {
        let mut c = cluster.client(0, encoding).await;
        let reply = c
            .command(
                "rpc",
                json!({"method": "auth.hash_password", "data": {"password": "correct horse"}}),
            )
            .await;
        let hash = reply["ok"]["data"]["hash"]
            .as_str()
            .unwrap_or_else(|| panic!("{reply}"))
            .to_owned();
        assert!(hash.starts_with("$argon2id$"), "{hash}");
        for (password, valid) in [("correct horse", true), ("battery staple", false)] {
            let reply = c
                .command(
                    "rpc",
                    json!({"method": "auth.verify_password", "data": {"password": password, "hash": hash}}),
                )
                .await;
            assert_eq!(reply["ok"]["data"], json!({"valid": valid}), "{reply}");
        }
        let reply = c
            .command(
                "rpc",
                json!({"method": "auth.hash_password", "data": {"pw": 1}}),
            )
            .await;
        assert_eq!(code(&reply), 107, "the method's own validation");
    }
}

#[actix_rt::test]
async fn streaming_results_arrive_before_the_final_reply() {
    let cluster = cluster_with_compute(|_| {}).await;
    for encoding in WsEncoding::BOTH {
        let mut c = cluster.client(0, encoding).await;
        let values: Vec<u64> = (1..=100).collect();
        let id = c
            .send_command(
                "rpc",
                json!({"method": "stats.summarize", "data": {"values": values, "chunk": 25}}),
            )
            .await;
        let mut parts = Vec::new();
        let reply = loop {
            let message = c.next_message().await;
            if message["push"] == json!("rpc_part") {
                assert_eq!(message["id"], json!(id));
                parts.push(message["data"]["processed"].clone());
            } else if message["id"] == json!(id) {
                break message;
            }
        };
        assert_eq!(
            parts,
            vec![json!(25), json!(50), json!(75)],
            "parts, in order, before the reply"
        );
        let data = &reply["ok"]["data"];
        assert_eq!(data["count"], json!(100));
        assert_eq!(data["mean"], json!(50.5));
        assert_eq!(data["p99"], json!(99.0));
    }
    let text = http::get(cluster.addr(0), "/metrics", &[]).await.text();
    assert!(text.contains("rt_gateway_rpc_seconds_count 2"), "{text}");
}

#[actix_rt::test]
async fn unknown_and_invalid_methods() {
    let cluster = cluster_with_compute(|_| {}).await;
    let mut c = cluster.client(0, WsEncoding::Json).await;
    assert_eq!(
        code(&c.command("rpc", json!({"method": "no.such.method"})).await),
        104
    );
    assert_eq!(
        code(&c.command("rpc", json!({"method": "bad method!"})).await),
        107
    );
    assert_eq!(code(&c.command("rpc", json!({})).await), 107);
    let reply = c
        .command(
            "rpc",
            json!({"method": "geo.nearby", "data": {"origin": [48.85, 2.35], "radius_km": 400,
                   "points": [[51.5, -0.12], [40.7, -74.0], [48.86, 2.34]]}}),
        )
        .await;
    let matches = &reply["ok"]["data"]["matches"];
    assert_eq!(matches[0]["index"], json!(2), "{reply}");
    assert_eq!(matches[1]["index"], json!(0));
    assert_eq!(matches.as_array().map(Vec::len), Some(2));
}

#[actix_rt::test]
async fn any_service_can_answer_an_rpc_method() {
    // No compute service here: a plain NATS responder serves the method.
    let cluster = TestCluster::start().await;
    let nats = cluster.nats_client().await;
    let mut requests = nats
        .queue_subscribe("rt.rpc.echo.upper", "echo-service".into())
        .await
        .expect("subscribe");
    rt_tests::nats_sync(&nats).await;
    let responder = nats.clone();
    let seen = actix_rt::spawn(async move {
        let request = requests.next().await.expect("a request");
        let body = rt_proto::value::to_json_lossy(
            &rt_proto::value::decode_one(&request.payload).expect("msgpack"),
        );
        let reply = request.reply.expect("a reply subject");
        let text = body["data"].as_str().unwrap_or_default().to_uppercase();
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Rt-Part", "1");
        let part =
            rt_proto::value::encode(&rt_proto::value::from_json(&json!({"data": "working"})));
        responder
            .publish_with_headers(reply.clone(), headers, part.into())
            .await
            .expect("part");
        let last = rt_proto::value::encode(&rt_proto::value::from_json(&json!({"data": text})));
        responder.publish(reply, last.into()).await.expect("reply");
        body
    });
    let mut c = cluster.client(0, WsEncoding::MsgPack).await;
    let id = c
        .send_command("rpc", json!({"method": "echo.upper", "data": "hello"}))
        .await;
    let part = c.next_push("rpc_part").await;
    assert_eq!(
        (part["id"].clone(), part["data"].clone()),
        (json!(id), json!("working"))
    );
    let reply = c.reply(id).await;
    assert_eq!(reply["ok"]["data"], json!("HELLO"));
    let body = within("responder", STEP, seen)
        .await
        .expect("responder task");
    assert_eq!(body["data"], json!("hello"));
    assert_eq!(body["user"], json!(""));
    assert!(
        body["client"].as_str().is_some_and(|c| !c.is_empty()),
        "{body}"
    );
}

#[actix_rt::test]
async fn a_silent_method_times_out_with_114_and_is_cancelled() {
    let cluster = TestCluster::start().await;
    let nats = cluster.nats_client().await;
    let _silent = nats
        .subscribe("rt.rpc.slow.thing")
        .await
        .expect("subscribe");
    let mut cancels = nats.subscribe("rt.cancel.>").await.expect("subscribe");
    rt_tests::nats_sync(&nats).await;
    let mut c = cluster.client(0, WsEncoding::Json).await;
    let started = Instant::now();
    let reply = c
        .command("rpc", json!({"method": "slow.thing", "timeout_ms": 300}))
        .await;
    assert_eq!(code(&reply), 114);
    assert_eq!(reply["error"]["temporary"], json!(true));
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "the client's shorter deadline applies"
    );
    let cancel = within("a cancel message", STEP, cancels.next())
        .await
        .expect("cancel");
    assert!(cancel.subject.starts_with("rt.cancel."));
}

#[actix_rt::test]
async fn a_full_compute_queue_answers_113_at_once() {
    let cluster = cluster_with_compute(|c| {
        c.compute.workers = 1;
        c.compute.queue_capacity = 1;
        // ~100+ ms per hash: one running, one queued, the rest refused.
        c.compute.argon2_memory_kib = 32 * 1024;
        c.compute.argon2_iterations = 3;
    })
    .await;
    let mut c = cluster.client(0, WsEncoding::Json).await;
    let mut ids = Vec::new();
    for _ in 0..6 {
        ids.push(
            c.send_command(
                "rpc",
                json!({"method": "auth.hash_password", "data": {"password": "x"}}),
            )
            .await,
        );
    }
    let mut first_ok_at = None;
    let mut busy = Vec::new();
    for _ in 0..6 {
        let message = c.next_message().await;
        if message.get("ok").is_some() {
            first_ok_at.get_or_insert(busy.len());
        } else {
            assert_eq!(code(&message), 113, "{message}");
            assert_eq!(message["error"]["temporary"], json!(true));
            assert!(
                message["error"]["retry_after_ms"]
                    .as_u64()
                    .is_some_and(|ms| ms > 0),
                "{message}"
            );
            busy.push(message);
        }
    }
    assert!(
        busy.len() >= 3,
        "at most one running and one queued: {} refused",
        busy.len()
    );
    assert!(
        first_ok_at.is_some_and(|n| n >= 3),
        "refusals come at once, before the queued work finishes"
    );
    let text = http::get(
        cluster.compute.as_ref().expect("compute").ops_addr(),
        "/metrics",
        &[],
    )
    .await
    .text();
    assert!(text.contains("rt_compute_busy_rejections_total"), "{text}");
    assert!(
        text.contains("rt_compute_job_seconds_count{method=\"auth.hash_password\"}"),
        "{text}"
    );
}

#[actix_rt::test]
async fn work_for_a_client_that_left_is_skipped() {
    let cluster = cluster_with_compute(|c| {
        c.compute.workers = 1;
        c.compute.queue_capacity = 10;
        c.compute.argon2_memory_kib = 32 * 1024;
        c.compute.argon2_iterations = 3;
    })
    .await;
    let mut leaver = cluster.client(0, WsEncoding::Json).await;
    for _ in 0..5 {
        leaver
            .send_command(
                "rpc",
                json!({"method": "auth.hash_password", "data": {"password": "x"}}),
            )
            .await;
    }
    // Let the calls reach compute, then leave without waiting.
    tokio::time::sleep(Duration::from_millis(100)).await;
    drop(leaver);
    let ops = cluster.compute.as_ref().expect("compute").ops_addr();
    eventually(
        "skipped jobs counted",
        Duration::from_secs(10),
        || async move {
            let text = http::get(ops, "/metrics", &[]).await.text();
            text.lines()
                .find(|l| {
                    l.starts_with("rt_compute_jobs_total{") && l.contains("outcome=\"skipped\"")
                })
                .and_then(|l| l.rsplit(' ').next())
                .and_then(|n| n.parse::<u64>().ok())
                .filter(|n| *n >= 2)
        },
    )
    .await;
}
