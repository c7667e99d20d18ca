//! Publications a gateway misses are never lost silently: it fills the gap
//! from broadcast's history, in order, before anything newer, or tells the
//! subscriber `unsubscribed` with 112 (resubscribe with `since`).

use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt as _;
use rt_proto::ChannelName;
use rt_proto::internal::{BusResult, Publication, RecoverReply, RecoverRequest, StreamPosition};
use rt_tests::NatsServer;
use serde_json::{Value, json};

use crate::slow_consumers::metric;
use crate::*;

fn channel(name: &str) -> ChannelName {
    ChannelName::parse(name).expect("a valid channel")
}

fn publication(name: &str, epoch: &str, offset: u64, data: &Value) -> Publication {
    Publication {
        channel: name.to_owned(),
        offset,
        epoch: epoch.to_owned(),
        ts: rt_shared::telemetry::now_ms(),
        data: Bytes::from(rt_proto::value::encode(&rt_proto::value::from_json(data))),
        info: None,
    }
}

/// Publishes a delivery on the channel's delivery subject, as broadcast does.
async fn deliver(nats: &async_nats::Client, p: &Publication) {
    let payload = rt_proto::internal::to_msgpack(p).expect("encode");
    nats.publish(
        rt_proto::subject::deliver(&channel(&p.channel)),
        payload.into(),
    )
    .await
    .expect("publish delivery");
    nats.flush().await.expect("flush");
}

/// The next recover request the gateway sends for `name` (this test plays
/// broadcast, on whichever internal subject the gateway addresses it).
async fn next_recover(
    requests: &mut async_nats::Subscriber,
    name: &str,
) -> (Option<StreamPosition>, String) {
    let suffix = format!("recover.{name}");
    let message = loop {
        let message = within("a recover request", STEP, requests.next())
            .await
            .expect("the subscription is open");
        if message.subject.ends_with(suffix.as_str()) {
            break message;
        }
    };
    let request: RecoverRequest =
        rt_proto::internal::from_msgpack(&message.payload).expect("a recover request");
    let reply = message.reply.expect("a request").to_string();
    (request.since, reply)
}

async fn answer(nats: &async_nats::Client, reply_to: String, reply: RecoverReply) {
    let payload = rt_proto::internal::to_msgpack(&BusResult::Ok(reply)).expect("encode");
    nats.publish(reply_to, payload.into())
        .await
        .expect("answer");
    nats.flush().await.expect("flush");
}

/// A ping round trip: what was queued before its reply has been read.
async fn settle(client: &mut WsClient) {
    assert_eq!(client.command("ping", json!({})).await["ok"], json!({}));
}

#[actix_rt::test]
async fn a_gap_is_filled_in_order_or_the_subscriber_is_told_to_resubscribe() {
    let cluster = TestCluster::without_broadcast(|_| {}).await;
    let addr = cluster.addr(0);
    let name = "chat:gappy";
    let nats = cluster.nats_client().await;
    let mut recovers = nats.subscribe("rt.bc.>").await.expect("subscribe");
    rt_tests::nats_sync(&nats).await;
    let mut client = cluster.client(0, WsEncoding::Json).await;

    let id = client
        .send_command("subscribe", json!({"channel": name}))
        .await;
    let (since, reply_to) = next_recover(&mut recovers, name).await;
    assert_eq!(since, None);
    let position = |offset, recovered, pubs| RecoverReply {
        offset,
        epoch: "e1".into(),
        recovered,
        pubs,
    };
    answer(&nats, reply_to, position(3, false, Vec::new())).await;
    assert_eq!(client.reply(id).await["ok"]["offset"], json!(3));

    deliver(&nats, &publication(name, "e1", 4, &json!("live-4"))).await;
    assert_eq!(client.next_push("pub").await["data"], json!("live-4"));

    // 5 and 6 never reach the node: 7 shows the gap, and the node asks for
    // what follows 4, holding 7 and what comes meanwhile.
    deliver(&nats, &publication(name, "e1", 7, &json!("live-7"))).await;
    let (since, reply_to) = next_recover(&mut recovers, name).await;
    assert_eq!(
        since,
        Some(StreamPosition {
            offset: 4,
            epoch: "e1".into()
        })
    );
    deliver(&nats, &publication(name, "e1", 8, &json!("live-8"))).await;
    let filled = (5..=7)
        .map(|o| publication(name, "e1", o, &json!(format!("filled-{o}"))))
        .collect();
    answer(&nats, reply_to, position(7, true, filled)).await;
    let mut got = Vec::new();
    for _ in 0..4 {
        let message = client.next_push("pub").await;
        got.push((message["offset"].clone(), message["data"].clone()));
    }
    assert_eq!(
        got,
        vec![
            (json!(5), json!("filled-5")),
            (json!(6), json!("filled-6")),
            (json!(7), json!("filled-7")),
            (json!(8), json!("live-8")),
        ],
        "the missed ones from history, then the held ones, each once"
    );
    settle(&mut client).await;
    assert!(!client.inbox_has_push("pub"), "no duplicate");
    assert_eq!(metric(addr, "rt_gateway_gaps_filled_total").await, 1.0);
    assert_eq!(
        metric(addr, "rt_gateway_refilled_publications_total").await,
        3.0
    );

    // A gap history no longer covers: 112, and the subscription is over.
    deliver(&nats, &publication(name, "e1", 12, &json!("live-12"))).await;
    let (since, reply_to) = next_recover(&mut recovers, name).await;
    assert_eq!(since.map(|s| s.offset), Some(8));
    answer(&nats, reply_to, position(12, false, Vec::new())).await;
    let push = client.next_message().await;
    assert_eq!(push["push"], json!("unsubscribed"), "{push}");
    assert_eq!(push["channel"], json!(name));
    assert_eq!(push["code"], json!(112));
    assert!(push["reason"].is_string());
    deliver(&nats, &publication(name, "e1", 13, &json!("live-13"))).await;
    settle(&mut client).await;
    assert!(!client.inbox_has_push("pub"), "nothing after unsubscribed");
    assert_eq!(
        metric(addr, "rt_gateway_resubscribe_requests_total").await,
        1.0
    );

    // Resubscribing with `since` works (the slot is free again).
    let id = client
        .send_command(
            "subscribe",
            json!({"channel": name, "since": {"offset": 8, "epoch": "e1"}}),
        )
        .await;
    let (since, reply_to) = next_recover(&mut recovers, name).await;
    assert_eq!(since.map(|s| s.offset), Some(8));
    answer(&nats, reply_to, position(13, false, Vec::new())).await;
    let reply = client.reply(id).await;
    assert_eq!(reply["ok"]["recovered"], json!(false), "{reply}");
    deliver(&nats, &publication(name, "e1", 14, &json!("live-14"))).await;
    assert_eq!(client.next_push("pub").await["data"], json!("live-14"));

    // A new epoch under a live subscription: 112 at once.
    deliver(&nats, &publication(name, "e2", 1, &json!("other epoch"))).await;
    let push = client.next_message().await;
    assert_eq!(push["push"], json!("unsubscribed"), "{push}");
    assert_eq!(push["code"], json!(112));
    assert_eq!(
        metric(addr, "rt_gateway_resubscribe_requests_total").await,
        2.0
    );
    assert_eq!(
        metric(addr, "rt_gateway_gap_repairs_total{reason=\"gap\"}").await,
        2.0
    );
}

#[actix_rt::test]
async fn publications_the_node_missed_and_broadcast_does_not_have_end_in_112() {
    let cluster = TestCluster::start().await;
    let name = "chat:jump";
    let mut sub = cluster.client(0, WsEncoding::MsgPack).await;
    let reply = sub.command("subscribe", json!({"channel": name})).await;
    let epoch = reply["ok"]["epoch"].as_str().expect("epoch").to_owned();
    let mut publisher = cluster.client(0, WsEncoding::MsgPack).await;
    for n in 1..=3 {
        publisher
            .command("publish", json!({"channel": name, "data": n}))
            .await;
        assert_eq!(sub.next_push("pub").await["offset"], json!(n));
    }

    // A delivery that jumps to 10: the node asks broadcast for 4 to 9, which
    // it does not have.
    let nats = cluster.nats_client().await;
    deliver(&nats, &publication(name, &epoch, 10, &json!("bogus"))).await;
    let push = sub.next_message().await;
    assert_eq!(push["push"], json!("unsubscribed"), "{push}");
    assert_eq!(push["code"], json!(112));
    assert_eq!(
        metric(cluster.addr(0), "rt_gateway_gap_repairs_failed_total").await,
        1.0
    );

    // Resubscribing with `since` recovers, and it is live again.
    let reply = sub
        .command(
            "subscribe",
            json!({"channel": name, "since": {"offset": 3, "epoch": epoch}}),
        )
        .await;
    assert_eq!(reply["ok"]["recovered"], json!(true), "{reply}");
    assert_eq!(reply["ok"]["offset"], json!(3));
    publisher
        .command("publish", json!({"channel": name, "data": 4}))
        .await;
    let message = sub.next_push("pub").await;
    assert_eq!(
        (message["offset"].clone(), message["data"].clone()),
        (json!(4), json!(4))
    );
}

#[actix_rt::test]
async fn a_publication_made_while_nats_restarts_is_delivered_or_announced_with_112() {
    let mut cluster = TestCluster::start().await;
    let addr = cluster.addr(0);
    let port = cluster.nats.port();
    let name = "chat:restart";
    let mut sub = cluster.client(0, WsEncoding::Json).await;
    let reply = sub.command("subscribe", json!({"channel": name})).await;
    let epoch = reply["ok"]["epoch"].as_str().expect("epoch").to_owned();
    let mut publisher = cluster.client(0, WsEncoding::Json).await;
    publisher
        .command("publish", json!({"channel": name, "data": "before"}))
        .await;
    assert_eq!(sub.next_push("pub").await["offset"], json!(1));

    // NATS goes away (a stand-in keeps the cluster's field filled) and comes
    // back on the same port, with empty state.
    drop(std::mem::replace(&mut cluster.nats, NatsServer::start()));
    eventually("the gateway notices", STEP, || async {
        let ready = rt_tests::http::get(addr, "/readyz", &[]).await.status;
        (ready == 503).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    cluster.nats = NatsServer::start_on(port);

    // Published as soon as broadcast answers, whether or not the gateway's
    // subscription is back yet.
    let nats = cluster.nats_client().await;
    let payload = Bytes::from(rt_proto::value::encode(&rt_proto::value::from_json(
        &json!("during"),
    )));
    let offset = eventually("a publish accepted", Duration::from_secs(20), || {
        let nats = nats.clone();
        let payload = payload.clone();
        async move {
            let reply = nats
                .request(format!("rt.publish.{name}"), payload)
                .await
                .ok()?;
            let ack = rmpv::decode::read_value(&mut &reply.payload[..]).ok()?;
            rt_proto::value::to_json_lossy(&ack)["offset"].as_u64()
        }
    })
    .await;

    // Not silent: the subscriber gets it, from the wire or from history, or
    // is told to resubscribe.
    let message = within(
        "the publication or 112",
        Duration::from_secs(20),
        sub.next_message(),
    )
    .await;
    match message["push"].as_str() {
        Some("pub") => {
            assert_eq!(message["offset"], json!(offset), "{message}");
            assert_eq!(message["data"], json!("during"));
        }
        Some("unsubscribed") => {
            assert_eq!(message["code"], json!(112), "{message}");
            let reply = sub
                .command(
                    "subscribe",
                    json!({"channel": name, "since": {"offset": 1, "epoch": epoch}}),
                )
                .await;
            assert!(reply["ok"].is_object(), "{reply}");
        }
        _ => panic!("unexpected {message}"),
    }
    // The gateway checked its channels after reconnecting.
    eventually("a reconnect check", STEP, || async {
        (metric(addr, "rt_gateway_gap_repairs_total{reason=\"reconnect\"}").await >= 1.0)
            .then_some(())
    })
    .await;
}

/// A TCP forwarder the test can cut: a gateway reaches NATS through it, so
/// it loses its connection while broadcast keeps its own.
struct Proxy {
    port: u16,
    open: tokio::sync::watch::Sender<bool>,
}

impl Proxy {
    async fn start(upstream: u16) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let port = listener.local_addr().expect("local address").port();
        let (open, watch) = tokio::sync::watch::channel(true);
        actix_rt::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                if !*watch.borrow() {
                    // Cut: the connection is closed at once.
                    continue;
                }
                let mut watch = watch.clone();
                actix_rt::spawn(async move {
                    let Ok(mut outbound) =
                        tokio::net::TcpStream::connect(("127.0.0.1", upstream)).await
                    else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        _ = watch.wait_for(|open| !*open) => {}
                    }
                });
            }
        });
        Self { port, open }
    }

    fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    fn cut(&self) {
        self.open.send_replace(false);
    }

    fn restore(&self) {
        self.open.send_replace(true);
    }
}

/// Publishes over NATS as a backend service would; returns the offset.
async fn publish(nats: &async_nats::Client, name: &str, data: &Value) -> u64 {
    let payload = rt_proto::value::encode(&rt_proto::value::from_json(data));
    let reply = within(
        "publish",
        STEP,
        nats.request(format!("rt.publish.{name}"), payload.into()),
    )
    .await
    .expect("publish request");
    let ack = rmpv::decode::read_value(&mut &reply.payload[..]).expect("a MessagePack ack");
    rt_proto::value::to_json_lossy(&ack)["offset"]
        .as_u64()
        .unwrap_or_else(|| panic!("publish failed"))
}

#[actix_rt::test]
async fn publications_missed_while_the_gateway_reconnects_are_filled_from_history() {
    let mut cluster = TestCluster::start_with(0, |_| {}).await;
    let proxy = Proxy::start(cluster.nats.port()).await;
    let mut config = cluster.config.clone();
    config.nats.url = proxy.url();
    cluster
        .gateways
        .push(rt_gateway::run(config).await.expect("gateway starts"));
    let addr = cluster.addr(0);
    let name = "chat:cut";
    let mut sub = cluster.client(0, WsEncoding::MsgPack).await;
    sub.command("subscribe", json!({"channel": name})).await;
    let nats = cluster.nats_client().await;
    assert_eq!(publish(&nats, name, &json!("a")).await, 1);
    assert_eq!(sub.next_push("pub").await["data"], json!("a"));

    // The gateway loses NATS; broadcast does not, and sequences two more.
    proxy.cut();
    eventually("the gateway notices", STEP, || async {
        let ready = rt_tests::http::get(addr, "/readyz", &[]).await.status;
        (ready == 503).then_some(())
    })
    .await;
    assert_eq!(publish(&nats, name, &json!("b")).await, 2);
    assert_eq!(publish(&nats, name, &json!("c")).await, 3);
    proxy.restore();

    // Back, it checks its channels and delivers what it missed, in order.
    for (offset, data) in [(2, "b"), (3, "c")] {
        let message = within("a filled publication", STEP, sub.next_message()).await;
        assert_eq!(message["push"], json!("pub"), "{message}");
        assert_eq!(
            (message["offset"].clone(), message["data"].clone()),
            (json!(offset), json!(data))
        );
    }
    assert!(metric(addr, "rt_gateway_gap_repairs_total{reason=\"reconnect\"}").await >= 1.0);
    assert_eq!(metric(addr, "rt_gateway_gaps_filled_total").await, 1.0);
    assert_eq!(publish(&nats, name, &json!("d")).await, 4);
    let message = sub.next_push("pub").await;
    assert_eq!(
        (message["offset"].clone(), message["data"].clone()),
        (json!(4), json!("d"))
    );
}

#[actix_rt::test]
async fn publications_nats_drops_for_a_slow_node_are_filled_or_announced() {
    let mut cluster = TestCluster::start_with(0, |_| {}).await;
    // This gateway's NATS subscriptions hold one message: a burst overflows them.
    let mut config = cluster.config.clone();
    config.nats.subscription_capacity = 1;
    cluster
        .gateways
        .push(rt_gateway::run(config).await.expect("gateway starts"));
    let addr = cluster.addr(0);
    let name = "chat:burst";
    let mut sub = cluster.client(0, WsEncoding::MsgPack).await;
    let reply = sub.command("subscribe", json!({"channel": name})).await;
    let epoch = reply["ok"]["epoch"].as_str().expect("epoch").to_owned();
    let nats = cluster.nats_client().await;
    assert_eq!(publish(&nats, name, &json!("first")).await, 1);
    assert_eq!(sub.next_push("pub").await["offset"], json!(1));

    // Copies of the first delivery flood the node's subscription (NATS drops
    // what does not fit); real publications are sequenced in the middle of
    // it, so some of their deliveries are dropped too.
    let copy = rt_proto::internal::to_msgpack(&publication(name, &epoch, 1, &json!("first")))
        .expect("encode");
    let copy = Bytes::from(copy);
    let subject = rt_proto::subject::deliver(&channel(name));
    let data = Bytes::from(rt_proto::value::encode(&rt_proto::value::from_json(
        &json!("during"),
    )));
    let mut floods = 0;
    while metric(addr, "rt_nats_events_total{event=\"slow_consumer\"}").await < 1.0 {
        for n in 0..5_000 {
            nats.publish(subject.clone(), copy.clone())
                .await
                .expect("publish");
            if n % 250 == 0 {
                nats.publish(format!("rt.publish.{name}"), data.clone())
                    .await
                    .expect("publish");
            }
        }
        nats.flush().await.expect("flush");
        floods += 1;
        assert!(floods < 10, "NATS never dropped a delivery");
    }
    // A last one on its own: its delivery shows any loss at the tail.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let last = publish(&nats, name, &json!("last")).await;
    assert!(last > 2);

    // Every offset once and in order, or the announcement that it cannot be.
    let mut expected = 2;
    while expected <= last {
        let message = within("publications", STEP, sub.next_message()).await;
        match message["push"].as_str() {
            Some("pub") => {
                assert_eq!(message["offset"], json!(expected), "no silent gap");
                expected += 1;
            }
            Some("unsubscribed") => {
                assert_eq!(message["code"], json!(112), "{message}");
                break;
            }
            _ => panic!("unexpected {message}"),
        }
    }
    eventually("a check after the slow-consumer event", STEP, || async {
        (metric(
            addr,
            "rt_gateway_gap_repairs_total{reason=\"slow_consumer\"}",
        )
        .await
            >= 1.0)
            .then_some(())
    })
    .await;
}
