//! Shutdown and trace context across hops.

use std::time::Duration;

use futures_util::StreamExt as _;
use rt_tests::http;
use serde_json::json;

use crate::*;

#[actix_rt::test]
async fn draining_sends_4005_with_a_jittered_retry_hint() {
    let mut cluster = TestCluster::start_with(1, |c| c.gateway.drain_retry_after_ms = 1_000).await;
    let mut clients = Vec::new();
    for encoding in [WsEncoding::Json, WsEncoding::MsgPack, WsEncoding::Json] {
        clients.push(cluster.client(0, encoding).await);
    }
    let addr = cluster.addr(0);
    let gateway = cluster.gateways.remove(0);
    let drain = actix_rt::spawn(gateway.drain());
    let mut hints = Vec::new();
    for client in &mut clients {
        let push = client.next_push("disconnect").await;
        assert_eq!(push["code"], json!(4005));
        assert_eq!(push["reconnect"], json!(true));
        let hint = push["retry_after_ms"].as_u64().expect("retry_after_ms");
        assert!((1_000..=2_000).contains(&hint), "{hint}");
        hints.push(hint);
        assert_eq!(client.closed().await.0, 4005);
    }
    within("drain", Duration::from_secs(5), drain)
        .await
        .expect("drain task");
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "no longer listening"
    );
}

#[actix_rt::test]
async fn http_traceparent_travels_to_the_delivery() {
    let cluster = TestCluster::start().await;
    let nats = cluster.nats_client().await;
    let mut deliveries = nats
        .subscribe("rt.deliver.chat:traced")
        .await
        .expect("subscribe");
    rt_tests::nats_sync(&nats).await;
    let parent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let auth = format!("apikey {API_KEY}");
    let res = http::request(
        cluster.addr(0),
        "POST",
        "/api/publish",
        &[
            ("Content-Type", "application/json"),
            ("Authorization", &auth),
            ("traceparent", parent),
        ],
        json!({"channel": "chat:traced", "data": 1})
            .to_string()
            .as_bytes(),
    )
    .await
    .expect("request");
    assert_eq!(res.status, 200);
    let delivery = within("delivery", STEP, deliveries.next())
        .await
        .expect("a delivery");
    let header = delivery
        .headers
        .as_ref()
        .and_then(|h| h.get("traceparent"))
        .map(|v| v.as_str().to_owned())
        .expect("traceparent header on the delivery");
    assert!(
        header.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"),
        "same trace: {header}"
    );
    assert_ne!(header, parent, "a new span id per hop");
}

#[actix_rt::test]
async fn a_silent_connection_is_closed_as_stale_with_4009() {
    let cluster = TestCluster::start_with(1, |c| c.gateway.ping_interval_ms = 100).await;
    let mut client = cluster.client(0, WsEncoding::Json).await;
    // Not reading means not answering the server's pings either.
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(client.closed().await.0, 4009);

    // A client that reads (and so answers pings) stays connected.
    let mut live = cluster.client(0, WsEncoding::Json).await;
    for _ in 0..6 {
        let pong = live.command("ping", json!({})).await;
        assert_eq!(pong["ok"], json!({}));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[actix_rt::test]
async fn health_is_served_while_nats_is_down_and_readiness_follows_it() {
    let nats_port = rt_tests::nats::free_port();
    let http_port = rt_tests::nats::free_port();
    let mut config = rt_tests::cluster::test_config(&format!("nats://127.0.0.1:{nats_port}"));
    config.gateway.http_addr = format!("127.0.0.1:{http_port}");
    let starting = actix_rt::spawn(rt_gateway::run(config));
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], http_port));
    eventually("/healthz answers without NATS", STEP, || async move {
        let res = http::request(addr, "GET", "/healthz", &[], b"")
            .await
            .ok()?;
        (res.status == 200).then_some(())
    })
    .await;
    assert_eq!(
        http::get(addr, "/readyz", &[]).await.status,
        503,
        "not ready without NATS"
    );

    let _nats = rt_tests::NatsServer::start_on(nats_port);
    let gateway = within(
        "the gateway finishes starting",
        Duration::from_secs(30),
        starting,
    )
    .await
    .expect("start task")
    .expect("the gateway starts once NATS is up");
    assert_eq!(http::get(addr, "/readyz", &[]).await.status, 200);
    gateway.stop().await;
}
