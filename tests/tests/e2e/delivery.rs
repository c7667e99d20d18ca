//! Publications reaching subscribers: encodings, order, recovery, sources.

use serde_json::json;

use crate::*;

#[actix_rt::test]
async fn subscribe_publish_unsubscribe_in_both_encodings() {
    let cluster = TestCluster::start().await;
    for encoding in WsEncoding::BOTH {
        let mut sub = cluster.client(0, encoding).await;
        let mut publisher = cluster.client(0, encoding).await;
        let channel = format!("chat:basic-{encoding:?}");
        let reply = sub.command("subscribe", json!({"channel": channel})).await;
        assert_eq!(reply["ok"]["offset"], json!(0), "{reply}");
        assert_eq!(reply["ok"]["recovered"], json!(false), "{reply}");
        let epoch = reply["ok"]["epoch"].clone();
        assert!(epoch.is_string());

        let data = json!({"text": "hello", "n": 1, "f": 1.5, "list": [1, "two", null]});
        let ack = publisher
            .command("publish", json!({"channel": channel, "data": data}))
            .await;
        assert_eq!(ack["ok"], json!({"offset": 1, "epoch": epoch}), "{ack}");

        let pubmsg = sub.next_push("pub").await;
        assert_eq!(pubmsg["channel"], json!(channel));
        assert_eq!(pubmsg["offset"], json!(1));
        assert_eq!(pubmsg["data"], data);
        assert_eq!(pubmsg["info"]["user"], json!(""));
        assert!(pubmsg["info"]["client"].is_string());
        assert!(pubmsg["ts"].is_u64());

        let reply = sub
            .command("unsubscribe", json!({"channel": channel}))
            .await;
        assert_eq!(reply["ok"], json!({}));
        publisher
            .command("publish", json!({"channel": channel, "data": 2}))
            .await;
        // A ping round trip after the publish ack: had the publication been
        // delivered, it would have arrived first.
        let pong = sub.command("ping", json!({})).await;
        assert_eq!(pong["ok"], json!({}));
        assert!(
            !sub.inbox_has_push("pub"),
            "nothing of an unsubscribed channel arrives after the unsubscribe reply"
        );
    }
}

#[actix_rt::test]
async fn ten_thousand_publications_from_three_publishers_arrive_in_order_on_two_gateways() {
    const PER_PUBLISHER: usize = 3_334;
    let mut cluster = TestCluster::start_with(1, |_| {}).await;
    cluster.add_gateway().await;
    let channel = "chat:order";
    let mut subscribers = Vec::new();
    for (gateway, encoding) in [
        (0, WsEncoding::MsgPack),
        (1, WsEncoding::Json),
        (1, WsEncoding::MsgPack),
    ] {
        let mut sub = cluster.client(gateway, encoding).await;
        let reply = sub.command("subscribe", json!({"channel": channel})).await;
        assert_eq!(reply["ok"]["offset"], json!(0));
        subscribers.push(sub);
    }
    let mut publishers = Vec::new();
    for (n, gateway) in [0usize, 1, 0].into_iter().enumerate() {
        let url = cluster.ws_url(gateway);
        publishers.push(tokio::spawn(async move {
            let mut publisher = WsClient::connected(&url, WsEncoding::MsgPack).await;
            // Pipelined in windows within the in-flight limit: a window is
            // sent before any of its acks is awaited.
            let mut offsets = Vec::with_capacity(PER_PUBLISHER);
            for window in (0..PER_PUBLISHER).collect::<Vec<_>>().chunks(200) {
                let mut ids = Vec::with_capacity(window.len());
                for seq in window {
                    let id = publisher
                        .send_command(
                            "publish",
                            json!({"channel": channel, "data": {"p": n, "seq": seq}}),
                        )
                        .await;
                    ids.push(id);
                }
                for id in ids {
                    let reply = publisher.reply(id).await;
                    offsets.push(
                        reply["ok"]["offset"]
                            .as_u64()
                            .unwrap_or_else(|| panic!("publish failed: {reply}")),
                    );
                }
            }
            assert!(
                offsets.windows(2).all(|w| w[0] < w[1]),
                "one connection's publishes are sequenced in order"
            );
            offsets.len()
        }));
    }
    let mut total = 0;
    for publisher in publishers {
        total += within("publisher", Duration::from_secs(60), publisher)
            .await
            .expect("publisher task");
    }
    assert_eq!(total, 3 * PER_PUBLISHER);
    for sub in &mut subscribers {
        let mut next_seq = [0u64; 3];
        for expected in 1..=total as u64 {
            let p = sub.next_push("pub").await;
            assert_eq!(p["offset"], json!(expected), "in offset order, no gap");
            let publisher = p["data"]["p"].as_u64().expect("p") as usize;
            assert_eq!(
                p["data"]["seq"],
                json!(next_seq[publisher]),
                "each publisher's order kept"
            );
            next_seq[publisher] += 1;
        }
    }
}

#[actix_rt::test]
async fn a_plain_nats_publish_reaches_websocket_subscribers() {
    let cluster = TestCluster::start().await;
    let mut sub = cluster.client(0, WsEncoding::Json).await;
    sub.command("subscribe", json!({"channel": "chat:from-nats"}))
        .await;
    let nats = cluster.nats_client().await;

    // MessagePack body, as a request: the reply is {offset, epoch}.
    let body = rt_proto::value::encode(&rmpv::Value::Map(vec![(
        rmpv::Value::from("temp"),
        rmpv::Value::from(21),
    )]));
    let reply = within(
        "NATS request",
        STEP,
        nats.request("rt.publish.chat:from-nats", body.into()),
    )
    .await
    .expect("reply");
    let ack: serde_json::Value = rt_proto::value::to_json_lossy(
        &rt_proto::value::decode_one(&reply.payload).expect("msgpack reply"),
    );
    assert_eq!(ack["offset"], json!(1), "{ack}");
    let p = sub.next_push("pub").await;
    assert_eq!(p["data"], json!({"temp": 21}));
    assert!(p.get("info").is_none(), "NATS publishes carry no info");

    // JSON body with Content-Type, answer in JSON with Accept; fire-and-forget too.
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Content-Type", "application/json");
    headers.insert("Accept", "application/json");
    let reply = nats
        .request_with_headers(
            "rt.publish.chat:from-nats",
            headers,
            r#"{"temp": 22.5}"#.into(),
        )
        .await
        .expect("reply");
    let ack: serde_json::Value = serde_json::from_slice(&reply.payload).expect("JSON reply");
    assert_eq!(ack["offset"], json!(2));
    nats.publish(
        "rt.publish.chat:from-nats",
        rt_proto::value::encode(&rmpv::Value::from("x")).into(),
    )
    .await
    .expect("publish");
    assert_eq!(sub.next_push("pub").await["data"], json!({"temp": 22.5}));
    assert_eq!(sub.next_push("pub").await["data"], json!("x"));

    // Bad input gets a documented error, not silence.
    let reply = nats
        .request("rt.publish.chat:from-nats", vec![0xc1].into())
        .await
        .expect("reply");
    let error = rt_proto::value::to_json_lossy(
        &rt_proto::value::decode_one(&reply.payload).expect("msgpack"),
    );
    assert_eq!(error["error"]["code"], json!(107), "{error}");
    let reply = nats
        .request("rt.publish.nowhere:x", vec![0xc0].into())
        .await
        .expect("reply");
    let error = rt_proto::value::to_json_lossy(
        &rt_proto::value::decode_one(&reply.payload).expect("msgpack"),
    );
    assert_eq!(error["error"]["code"], json!(102), "{error}");
}

#[actix_rt::test]
async fn history_and_recovery_with_since() {
    let cluster = TestCluster::start_with(1, |c| {
        c.namespaces
            .get_mut("chat")
            .expect("chat namespace")
            .history_size = 5;
    })
    .await;
    for encoding in WsEncoding::BOTH {
        let channel = format!("chat:recover-{encoding:?}");
        let mut publisher = cluster.client(0, WsEncoding::MsgPack).await;
        let mut sub = cluster.client(0, encoding).await;
        let first = sub.command("subscribe", json!({"channel": channel})).await;
        let epoch = first["ok"]["epoch"].clone();
        for n in 1..=3 {
            publisher
                .command("publish", json!({"channel": channel, "data": n}))
                .await;
            assert_eq!(sub.next_push("pub").await["offset"], json!(n));
        }
        // The subscriber leaves at offset 3; four more are published meanwhile.
        sub.command("unsubscribe", json!({"channel": channel}))
            .await;
        for n in 4..=7 {
            publisher
                .command("publish", json!({"channel": channel, "data": n}))
                .await;
        }
        let reply = sub
            .command(
                "subscribe",
                json!({"channel": channel, "since": {"offset": 3, "epoch": epoch}}),
            )
            .await;
        let ok = &reply["ok"];
        assert_eq!(ok["recovered"], json!(true), "{reply}");
        assert_eq!(ok["offset"], json!(7));
        let offsets: Vec<u64> = ok["pubs"]
            .as_array()
            .expect("pubs")
            .iter()
            .map(|p| p["offset"].as_u64().unwrap_or(0))
            .collect();
        assert_eq!(
            offsets,
            vec![4, 5, 6, 7],
            "exactly the missed ones, in order"
        );
        publisher
            .command("publish", json!({"channel": channel, "data": 8}))
            .await;
        assert_eq!(
            sub.next_push("pub").await["offset"],
            json!(8),
            "then live, no gap, no duplicate"
        );

        // Outside the window (5 kept: 4..=8) and wrong epochs are not recovered.
        sub.command("unsubscribe", json!({"channel": channel}))
            .await;
        for since in [
            json!({"offset": 1, "epoch": epoch}),
            json!({"offset": 8, "epoch": "other"}),
            json!({"offset": 99, "epoch": epoch}),
        ] {
            let reply = sub
                .command("subscribe", json!({"channel": channel, "since": since}))
                .await;
            assert_eq!(reply["ok"]["recovered"], json!(false), "{since}: {reply}");
            assert_eq!(reply["ok"]["pubs"], json!([]));
            assert_eq!(reply["ok"]["offset"], json!(8));
            sub.command("unsubscribe", json!({"channel": channel}))
                .await;
        }

        // History: newest first with reverse, a window with since, position only with limit 0.
        let h = sub
            .command("history", json!({"channel": channel, "limit": 2}))
            .await;
        assert_eq!(
            h["ok"]["pubs"]
                .as_array()
                .map(|p| p.iter().map(|p| p["data"].clone()).collect::<Vec<_>>()),
            Some(vec![json!(7), json!(8)])
        );
        let h = sub
            .command(
                "history",
                json!({"channel": channel, "limit": 2, "reverse": true}),
            )
            .await;
        assert_eq!(h["ok"]["pubs"][0]["offset"], json!(8));
        let h = sub
            .command(
                "history",
                json!({"channel": channel, "since": {"offset": 6, "epoch": epoch}}),
            )
            .await;
        assert_eq!(h["ok"]["pubs"].as_array().map(Vec::len), Some(2));
        let h = sub
            .command("history", json!({"channel": channel, "limit": 0}))
            .await;
        assert_eq!(h["ok"], json!({"pubs": [], "offset": 8, "epoch": epoch}));
        let h = sub
            .command(
                "history",
                json!({"channel": channel, "since": {"offset": 1, "epoch": epoch}}),
            )
            .await;
        assert_eq!(h["error"]["code"], json!(112));
    }
}

#[actix_rt::test]
async fn connect_with_subs_recovers_in_one_round_trip() {
    let cluster = TestCluster::start().await;
    let mut publisher = cluster.client(0, WsEncoding::MsgPack).await;
    let first = publisher
        .command("publish", json!({"channel": "chat:r1", "data": "a"}))
        .await;
    let epoch = first["ok"]["epoch"].clone();
    publisher
        .command("publish", json!({"channel": "chat:r1", "data": "b"}))
        .await;
    let mut c = WsClient::open(&cluster.ws_url(0), WsEncoding::Json).await;
    let reply = c
        .command(
            "connect",
            json!({"subs": {
                "chat:r1": {"offset": 1, "epoch": epoch},
                "chat:r2": {},
                "chat:bad": {"offset": 1},
                "nowhere:x": {}
            }}),
        )
        .await;
    let subs = &reply["ok"]["subs"];
    assert_eq!(subs["chat:r1"]["recovered"], json!(true), "{reply}");
    assert_eq!(subs["chat:r1"]["pubs"][0]["data"], json!("b"));
    assert_eq!(subs["chat:r2"]["offset"], json!(0));
    assert_eq!(subs["chat:bad"]["error"]["code"], json!(107));
    assert_eq!(subs["nowhere:x"]["error"]["code"], json!(102));
    publisher
        .command("publish", json!({"channel": "chat:r1", "data": "c"}))
        .await;
    publisher
        .command("publish", json!({"channel": "chat:r2", "data": "d"}))
        .await;
    assert_eq!(c.next_push("pub").await["data"], json!("c"));
    assert_eq!(c.next_push("pub").await["data"], json!("d"));
}

#[actix_rt::test]
async fn a_slow_consumer_is_closed_with_4004_while_a_fast_one_keeps_receiving() {
    let cluster = TestCluster::start_with(1, |c| c.gateway.outbound_buffer_bytes = 64 * 1024).await;
    let channel = "chat:firehose";
    let mut slow = cluster.client(0, WsEncoding::MsgPack).await;
    slow.command("subscribe", json!({"channel": channel})).await;
    let mut fast = cluster.client(0, WsEncoding::MsgPack).await;
    fast.command("subscribe", json!({"channel": channel})).await;
    let mut publisher = cluster.client(0, WsEncoding::MsgPack).await;

    // ~40 MB in rounds of 5 × 8 KiB (under the bound): `fast` reads each
    // round before the next, `slow` reads nothing, so its socket buffers and
    // then its 64 KiB bound fill up.
    let payload = "z".repeat(8 * 1024);
    let mut offset = 0u64;
    for _ in 0..1_000 {
        let mut ids = Vec::new();
        for _ in 0..5 {
            ids.push(
                publisher
                    .send_command("publish", json!({"channel": channel, "data": payload}))
                    .await,
            );
        }
        for id in ids {
            assert!(publisher.reply(id).await["ok"].is_object());
        }
        for _ in 0..5 {
            offset += 1;
            assert_eq!(fast.next_push("pub").await["offset"], json!(offset));
        }
    }
    assert_eq!(slow.closed().await.0, 4004);
}
