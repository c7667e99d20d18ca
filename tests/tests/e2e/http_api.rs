//! `/api/*` for backend services, and the ops endpoints.

use std::time::Duration;

use rt_tests::http;
use serde_json::json;

use crate::*;

#[actix_rt::test]
async fn http_publish_needs_the_api_key() {
    let cluster = TestCluster::start().await;
    let addr = cluster.addr(0);
    let mut sub = cluster.client(0, WsEncoding::MsgPack).await;
    sub.command("subscribe", json!({"channel": "feed:news"}))
        .await;

    let body =
        json!({"channel": "feed:news", "data": {"headline": "hi"}, "info": {"source": "cms"}});
    let missing = http::post_json(addr, "/api/publish", None, &body).await;
    assert_eq!(missing.status, 401);
    assert_eq!(missing.json()["error"]["code"], json!(101));
    let wrong = http::post_json(addr, "/api/publish", Some("nope"), &body).await;
    assert_eq!(wrong.status, 401);

    let ok = http::post_json(addr, "/api/publish", Some(API_KEY), &body).await;
    assert_eq!(ok.status, 200, "{}", ok.text());
    assert_eq!(ok.json()["offset"], json!(1));
    let p = sub.next_push("pub").await;
    assert_eq!(p["data"], json!({"headline": "hi"}));
    assert_eq!(
        p["info"],
        json!({"user": "", "client": "", "info": {"source": "cms"}})
    );

    // data_b64 publishes binary; a MessagePack subscriber gets a bin.
    let ok = http::post_json(
        addr,
        "/api/publish",
        Some(API_KEY),
        &json!({"channel": "feed:news", "data_b64": "AAEC"}),
    )
    .await;
    assert_eq!(ok.status, 200);
    let p = sub.next_push("pub").await;
    assert_eq!(
        p["data"],
        json!("AAEC"),
        "bin shown as base64 by the test's lossy JSON view"
    );

    // MessagePack body and answer.
    let mp_body = rt_proto::value::encode(&rt_proto::value::from_json(
        &json!({"channel": "feed:news", "data": 3}),
    ));
    let auth = format!("apikey {API_KEY}");
    let res = http::request(
        addr,
        "POST",
        "/api/publish",
        &[
            ("Content-Type", "application/msgpack"),
            ("Authorization", &auth),
        ],
        &mp_body,
    )
    .await
    .expect("request");
    assert_eq!(res.status, 200);
    assert_eq!(res.header("content-type"), Some("application/msgpack"));
    let ack =
        rt_proto::value::to_json_lossy(&rt_proto::value::decode_one(&res.body).expect("msgpack"));
    assert_eq!(ack["offset"], json!(3));
}

#[actix_rt::test]
async fn http_errors_follow_the_protocol() {
    let cluster = TestCluster::start_with(1, |c| c.gateway.max_message_size = 1024).await;
    let addr = cluster.addr(0);
    let cases = [
        (json!({"data": 1}), 400, 107),
        (json!({"channel": "a b", "data": 1}), 400, 107),
        (json!({"channel": "nowhere:x", "data": 1}), 400, 102),
        (json!({"channel": "chat:x"}), 400, 107),
        (
            json!({"channel": "chat:x", "data": 1, "info": "not a map"}),
            400,
            107,
        ),
        (
            json!({"channel": "chat:x", "data": "y".repeat(2000)}),
            413,
            106,
        ),
    ];
    for (body, status, code) in cases {
        let res = http::post_json(addr, "/api/publish", Some(API_KEY), &body).await;
        assert_eq!(
            (res.status, res.json()["error"]["code"].clone()),
            (status, json!(code)),
            "{body}"
        );
    }
    let auth = format!("apikey {API_KEY}");
    let res = http::request(
        addr,
        "POST",
        "/api/publish",
        &[("Authorization", &auth)],
        b"{oops",
    )
    .await
    .expect("request");
    assert_eq!(res.status, 400);
    let res = http::get(addr, "/api/nope", &[("Authorization", &auth)]).await;
    assert_eq!(
        (res.status, res.json()["error"]["code"].clone()),
        (404, json!(104))
    );
    let res = http::get(addr, "/api/nope", &[("Authorization", "apikey wrong")]).await;
    assert_eq!(res.status, 401, "the key is checked before the route");
}

#[actix_rt::test]
async fn http_broadcast_and_history() {
    let cluster = TestCluster::start().await;
    let addr = cluster.addr(0);
    let mut sub = cluster.client(0, WsEncoding::Json).await;
    sub.command("subscribe", json!({"channel": "chat:b"})).await;
    let res = http::post_json(
        addr,
        "/api/broadcast",
        Some(API_KEY),
        &json!({"channels": ["chat:a", "chat:b", "bad..name", "chat:a"], "data": "all"}),
    )
    .await;
    assert_eq!(res.status, 200, "{}", res.text());
    let results = res.json()["results"].clone();
    assert_eq!(results[0]["offset"], json!(1));
    assert_eq!(results[1]["offset"], json!(1));
    assert_eq!(results[2]["error"]["code"], json!(107));
    assert_eq!(
        results[3]["offset"],
        json!(2),
        "results come in the channels' order"
    );
    assert_eq!(sub.next_push("pub").await["data"], json!("all"));

    let auth = format!("apikey {API_KEY}");
    let res = http::get(
        addr,
        "/api/history/chat:a?limit=10&reverse=true",
        &[("Authorization", &auth)],
    )
    .await;
    assert_eq!(res.status, 200, "{}", res.text());
    let history = res.json();
    assert_eq!(history["offset"], json!(2));
    assert_eq!(history["pubs"][0]["offset"], json!(2));
    let epoch = history["epoch"].as_str().expect("epoch").to_owned();
    let res = http::get(
        addr,
        &format!("/api/history/chat:a?since=1&epoch={epoch}"),
        &[("Authorization", &auth)],
    )
    .await;
    assert_eq!(res.json()["pubs"].as_array().map(Vec::len), Some(1));
    let res = http::get(
        addr,
        "/api/history/chat:a?since=1&epoch=other",
        &[("Authorization", &auth)],
    )
    .await;
    assert_eq!(
        (res.status, res.json()["error"]["code"].clone()),
        (409, json!(112))
    );
    let res = http::get(
        addr,
        "/api/history/chat:a?since=1",
        &[("Authorization", &auth)],
    )
    .await;
    assert_eq!(res.status, 400);
}

#[actix_rt::test]
async fn health_readiness_and_metrics() {
    let cluster = TestCluster::start().await;
    let addr = cluster.addr(0);
    assert_eq!(http::get(addr, "/healthz", &[]).await.status, 200);
    assert_eq!(http::get(addr, "/readyz", &[]).await.status, 200);
    let mut c = cluster.client(0, WsEncoding::Json).await;
    c.command("subscribe", json!({"channel": "chat:m"})).await;
    c.command("publish", json!({"channel": "chat:m", "data": 1}))
        .await;
    c.next_push("pub").await;
    let text = http::get(addr, "/metrics", &[]).await.text();
    for needle in [
        "rt_gateway_connections 1",
        "rt_gateway_subscriptions 1",
        "rt_gateway_channels 1",
        "rt_gateway_publish_to_deliver_seconds_count 1",
        "rt_runtime_lag_seconds_bucket",
        "rt_nats_events_total{event=\"connected\"} 1",
    ] {
        assert!(text.contains(needle), "missing {needle:?} in\n{text}");
    }
    let value = |text: &str, name: &str| -> f64 {
        text.lines()
            .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0.0)
    };
    let before = value(&text, "rt_gateway_messages_in_total");
    assert!(
        value(&text, "rt_gateway_connect_seconds_count") >= 1.0,
        "{text}"
    );
    c.command("ping", json!({})).await;
    let text = http::get(addr, "/metrics", &[]).await.text();
    assert!(
        value(&text, "rt_gateway_messages_in_total") > before,
        "counters move"
    );
    eventually(
        "process memory reported",
        Duration::from_secs(5),
        || async {
            let text = http::get(addr, "/metrics", &[]).await.text();
            (value(&text, "rt_process_resident_memory_bytes") > 1e6).then_some(())
        },
    )
    .await;
    let ops = cluster.broadcast.as_ref().expect("broadcast").ops_addr();
    assert_eq!(http::get(ops, "/readyz", &[]).await.status, 200);
    let text = http::get(ops, "/metrics", &[]).await.text();
    assert!(text.contains("rt_broadcast_publications_total 1"), "{text}");
}

#[actix_rt::test]
async fn the_grafana_dashboard_only_uses_metrics_that_exist() {
    let dashboard: serde_json::Value =
        serde_json::from_str(include_str!("../../../k8s/grafana/realtime-dashboard.json"))
            .expect("the dashboard is JSON");
    let mut used = std::collections::BTreeSet::new();
    for panel in dashboard["panels"].as_array().expect("panels") {
        for target in panel["targets"].as_array().expect("targets") {
            let expr = target["expr"].as_str().expect("expr");
            let mut rest = expr;
            while let Some(start) = rest.find("rt_") {
                let name: String = rest[start..]
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                rest = &rest[start + name.len()..];
                used.insert(name);
            }
        }
    }
    assert!(used.len() >= 15, "{used:?}");

    // Make every labelled family appear: a close, error replies, an RPC, a refused NATS publish.
    let mut cluster = TestCluster::start().await;
    cluster.start_compute().await;
    let mut c = cluster.client(0, WsEncoding::Json).await;
    c.command("subscribe", json!({"channel": "chat:dash"}))
        .await;
    c.command("publish", json!({"channel": "chat:dash", "data": 1}))
        .await;
    c.command("frobnicate", json!({})).await;
    c.command(
        "rpc",
        json!({"method": "geo.nearby", "data": {"origin": [0, 0], "points": [], "radius_km": 1}}),
    )
    .await;
    let nats = cluster.nats_client().await;
    nats.request("rt.publish.chat:dash", vec![0xc1].into())
        .await
        .expect("reply");
    drop(cluster.client(0, WsEncoding::Json).await);
    let compute = cluster.compute.as_ref().expect("compute").ops_addr();
    let broadcast = cluster.broadcast.as_ref().expect("broadcast").ops_addr();
    let gateway = cluster.addr(0);
    let used = &used;
    eventually(
        "every dashboard metric exported",
        Duration::from_secs(10),
        || async move {
            let mut scraped = String::new();
            for addr in [gateway, broadcast, compute] {
                scraped.push_str(&http::get(addr, "/metrics", &[]).await.text());
            }
            let names: std::collections::BTreeSet<&str> = scraped
                .lines()
                .filter(|l| !l.starts_with('#'))
                .filter_map(|l| l.split(['{', ' ']).next())
                .collect();
            let missing: Vec<&String> = used
                .iter()
                .filter(|name| !names.contains(name.as_str()))
                .collect();
            if !missing.is_empty() {
                eprintln!("not exported yet: {missing:?}");
            }
            missing.is_empty().then_some(())
        },
    )
    .await;
}
