//! What the demo app stands on: every service publishes its key figures on
//! `sys:stats`, which only operator tokens may read, and the gateway serves
//! the app itself at `/` (`gateway.demo`).

use std::collections::BTreeMap;
use std::time::Duration;

use rt_shared::stats::{self, Figure};
use rt_tests::http;
use rt_tests::tokens::{now_secs, token_with};
use serde_json::{Value, json};

use crate::*;

fn keys(figures: &[Figure]) -> Vec<&'static str> {
    let mut keys: Vec<_> = figures.iter().map(Figure::key).collect();
    keys.sort_unstable();
    keys
}

#[actix_rt::test]
async fn services_publish_their_figures_to_operators_only() {
    let mut cluster = TestCluster::start_with(1, |c| c.telemetry.stats_interval_ms = 200).await;
    cluster.start_compute().await;
    let url = cluster.ws_url(0);

    // `sys` is private and closed to anonymous clients.
    let mut anonymous = cluster.client(0, WsEncoding::Json).await;
    let reply = anonymous
        .command("subscribe", json!({ "channel": stats::CHANNEL }))
        .await;
    assert_eq!(reply["error"]["code"], json!(103), "{reply}");
    let mut user = cluster.client_as(0, WsEncoding::Json, "alice").await;
    let reply = user
        .command("subscribe", json!({ "channel": stats::CHANNEL }))
        .await;
    assert_eq!(reply["error"]["code"], json!(103), "{reply}");

    // An operator: a token whose `channels` claim lists it.
    let token = token_with(json!({
        "sub": "ops", "exp": now_secs() + 3600, "channels": [stats::CHANNEL],
    }));
    let (mut ops, _) =
        WsClient::connected_with(&url, WsEncoding::MsgPack, json!({ "token": token })).await;
    let reply = ops
        .command("subscribe", json!({ "channel": stats::CHANNEL }))
        .await;
    assert!(reply["ok"].is_object(), "{reply}");
    // Operators read figures; nobody but the services writes them.
    let reply = ops
        .command(
            "publish",
            json!({ "channel": stats::CHANNEL, "data": {"fake": 1} }),
        )
        .await;
    assert_eq!(reply["error"]["code"], json!(103), "{reply}");

    // Every service shows up with all its figures; the rates and the
    // gateway's latency fill in as it delivers (the stats themselves).
    let positive = |data: &Value, figure: &str| data["figures"][figure].as_f64() > Some(0.0);
    let mut latest: BTreeMap<String, Value> = BTreeMap::new();
    let (mut delivered, mut sequenced) = (None, None);
    within(
        "figures from every service",
        Duration::from_secs(15),
        async {
            loop {
                let push = ops.next_push("pub").await;
                assert_eq!(push["channel"], json!(stats::CHANNEL));
                let data = push["data"].clone();
                let service = data["service"].as_str().expect("service").to_owned();
                if service == "gateway"
                    && positive(&data, "publications_per_sec")
                    && data["figures"]["publish_to_deliver_p99_ms"].is_number()
                {
                    delivered = Some(data.clone());
                }
                if service == "broadcast" && positive(&data, "publications_per_sec") {
                    sequenced = Some(data.clone());
                }
                latest.insert(service, data);
                if latest.len() == 4 && delivered.is_some() && sequenced.is_some() {
                    break;
                }
            }
        },
    )
    .await;

    for (service, figures) in [
        ("gateway", stats::GATEWAY),
        ("broadcast", stats::BROADCAST),
        ("compute", stats::COMPUTE),
        ("session", stats::SESSION),
    ] {
        let data = &latest[service];
        let published: Vec<&str> = data["figures"]
            .as_object()
            .expect("figures")
            .keys()
            .map(String::as_str)
            .collect();
        assert_eq!(published, keys(figures), "{service}: {data}");
        assert!(
            data["node"].as_str().is_some_and(|n| !n.is_empty()),
            "{data}"
        );
        let interval = data["interval_ms"].as_u64().expect("interval_ms");
        assert!((150..2_000).contains(&interval), "{data}");
        // Refreshed every second by the lag probe: maybe not yet at 200 ms.
        assert!(data["figures"]["memory_bytes"].is_u64(), "{data}");
    }
    let gateway = &delivered.expect("gateway figures")["figures"];
    assert_eq!(latest["gateway"]["node"], json!(cluster.gateways[0].node()));
    // anonymous, alice and ops.
    assert_eq!(gateway["connections"], json!(3), "{gateway}");
    let p50 = gateway["publish_to_deliver_p50_ms"].as_f64().expect("p50");
    let p99 = gateway["publish_to_deliver_p99_ms"].as_f64().expect("p99");
    // A sanity bound only: a loaded CI box can stall a debug build for a while.
    assert!(p50 <= p99 && p99 < 30_000.0, "{gateway}");
    assert_eq!(latest["compute"]["figures"]["queue_depth"], json!(0));

    // History holds the recent figures, for a dashboard that just opened.
    let reply = ops
        .command("history", json!({ "channel": stats::CHANNEL, "limit": 10 }))
        .await;
    let latest_offset = reply["ok"]["offset"].as_u64().expect("offset");
    let kept = reply["ok"]["pubs"].as_array().map_or(0, Vec::len) as u64;
    assert!(
        latest_offset >= 4 && kept == latest_offset.min(10),
        "{reply}"
    );
}

#[actix_rt::test]
async fn stats_stay_off_without_the_interval() {
    // test_config turns them off: nothing is sequenced on sys:stats.
    let cluster = TestCluster::start().await;
    let token = token_with(json!({
        "sub": "ops", "exp": now_secs() + 3600, "channels": [stats::CHANNEL],
    }));
    let (mut ops, _) = WsClient::connected_with(
        &cluster.ws_url(0),
        WsEncoding::Json,
        json!({ "token": token }),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let reply = ops
        .command("history", json!({ "channel": stats::CHANNEL, "limit": 0 }))
        .await;
    assert_eq!(reply["ok"]["offset"], json!(0), "{reply}");
}

#[actix_rt::test]
async fn the_gateway_serves_the_demo_app() {
    let cluster = TestCluster::start().await;
    let addr = cluster.addr(0);
    let page = http::get(addr, "/", &[]).await;
    assert_eq!(page.status, 200);
    assert_eq!(
        page.header("content-type"),
        Some("text/html; charset=utf-8")
    );
    assert!(page.text().contains("/demo/app.js"), "{}", page.text());
    let etag = page.header("etag").expect("an ETag").to_owned();
    let again = http::get(addr, "/", &[("If-None-Match", &etag)]).await;
    assert_eq!(again.status, 304);

    let sdk = http::get(addr, "/demo/vendor/realtime/client.js", &[]).await;
    assert_eq!(sdk.status, 200);
    assert_eq!(
        sdk.header("content-type"),
        Some("text/javascript; charset=utf-8")
    );
    assert!(sdk.text().contains("export class Client"));
    assert_eq!(http::get(addr, "/demo/missing.js", &[]).await.status, 404);

    let off = TestCluster::start_with(1, |c| c.gateway.demo = false).await;
    assert_eq!(http::get(off.addr(0), "/", &[]).await.status, 404);
    // The rest of the gateway is unchanged.
    assert_eq!(http::get(off.addr(0), "/healthz", &[]).await.status, 200);
}
