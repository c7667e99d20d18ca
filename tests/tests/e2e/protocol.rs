//! The connection rules: connect first, encodings, errors and closes.

use std::time::Duration;

use futures_util::StreamExt as _;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::frame::Frame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};

use crate::*;

fn code(reply: &Value) -> u64 {
    reply["error"]["code"]
        .as_u64()
        .unwrap_or_else(|| panic!("expected an error reply, got {reply}"))
}

#[actix_rt::test]
async fn first_command_must_be_connect() {
    let cluster = TestCluster::start().await;
    for encoding in WsEncoding::BOTH {
        let mut client = WsClient::open(&cluster.ws_url(0), encoding).await;
        client.send(&json!({"id": 1, "op": "ping"})).await;
        assert_eq!(client.closed().await.0, 4000);

        let mut client = WsClient::open(&cluster.ws_url(0), encoding).await;
        client.send(&json!({"id": 1})).await;
        assert_eq!(client.closed().await.0, 4000, "no op at all");
    }
}

#[actix_rt::test]
async fn no_connect_in_time_closes_with_4001() {
    let cluster = TestCluster::start_with(1, |c| c.gateway.connect_timeout_ms = 300).await;
    let mut client = WsClient::open(&cluster.ws_url(0), WsEncoding::Json).await;
    assert_eq!(client.closed().await.0, 4001);
}

#[actix_rt::test]
async fn subprotocol_negotiation() {
    let cluster = TestCluster::start().await;
    let url = cluster.ws_url(0);
    let (_, chosen) = WsClient::open_with_protocols(&url, &["chat", "rt.v1.json", "rt.v1.msgpack"])
        .await
        .expect("handshake");
    assert_eq!(
        chosen.as_deref(),
        Some("rt.v1.json"),
        "first supported in the client's order"
    );
    let (_, chosen) = WsClient::open_with_protocols(&url, &["rt.v1.msgpack", "rt.v1.json"])
        .await
        .expect("handshake");
    assert_eq!(chosen.as_deref(), Some("rt.v1.msgpack"));
    let refused = WsClient::open_with_protocols(&url, &["chat", "v2"]).await;
    match refused {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            assert_eq!(response.status(), 400)
        }
        other => panic!(
            "expected a 400 handshake refusal, got {:?}",
            other.map(|(_, p)| p)
        ),
    }
    // No subprotocol: JSON text frames.
    let (mut ws, chosen) = WsClient::open_with_protocols(&url, &[])
        .await
        .expect("handshake");
    assert_eq!(chosen, None);
    futures_util::SinkExt::send(&mut ws, Message::text(r#"{"id":1,"op":"connect"}"#))
        .await
        .expect("send");
    match within("connect reply", STEP, ws.next()).await {
        Some(Ok(Message::Text(text))) => {
            let reply: Value = serde_json::from_str(&text).expect("JSON reply");
            assert!(reply["ok"]["client"].is_string(), "{reply}");
        }
        other => panic!("expected a text reply, got {other:?}"),
    }
}

#[actix_rt::test]
async fn malformed_frames_close_with_4000_and_others_keep_being_served() {
    let cluster = TestCluster::start().await;
    let mut bystander = cluster.client(0, WsEncoding::MsgPack).await;
    bystander
        .command("subscribe", json!({"channel": "chat:calm"}))
        .await;
    let mut publisher = cluster.client(0, WsEncoding::Json).await;

    let bad_frames: Vec<(WsEncoding, Message)> = vec![
        (WsEncoding::Json, Message::text("{not json")),
        (WsEncoding::Json, Message::text("[1, 2]")),
        (WsEncoding::Json, Message::binary(b"{}".to_vec())),
        (
            WsEncoding::Json,
            Message::text(r#"{"id": 1.5, "op": "ping"}"#),
        ),
        (
            WsEncoding::Json,
            Message::text(r#"{"id": -1, "op": "ping"}"#),
        ),
        (
            WsEncoding::Json,
            Message::text(r#"{"id": 4294967296, "op": "ping"}"#),
        ),
        (
            WsEncoding::Json,
            Message::text("{\"id\":2,\"op\":\"ping\"}\n{\"id\":\"x\"}"),
        ),
        (WsEncoding::MsgPack, Message::binary(vec![0xc1])),
        (WsEncoding::MsgPack, Message::binary(vec![0x81, 0xa2, b'i'])),
        (WsEncoding::MsgPack, Message::binary(vec![0x01])),
        (
            WsEncoding::MsgPack,
            Message::binary(vec![0xdf, 0xff, 0xff, 0xff, 0xff]),
        ),
        (
            WsEncoding::MsgPack,
            Message::text(r#"{"id":1,"op":"ping"}"#),
        ),
    ];
    for (encoding, frame) in bad_frames {
        let mut client = cluster.client(0, encoding).await;
        let shown = format!("{frame:?}");
        client.send_raw(frame).await;
        assert_eq!(client.closed().await.0, 4000, "{encoding:?} {shown}");
    }

    for n in 1..=3 {
        publisher
            .command("publish", json!({"channel": "chat:calm", "data": n}))
            .await;
        let p = bystander.next_push("pub").await;
        assert_eq!(p["data"], json!(n));
    }
}

#[actix_rt::test]
async fn oversized_messages_close_with_1009() {
    let cluster = TestCluster::start_with(1, |c| c.gateway.max_message_size = 1024).await;
    let mut client = cluster.client(0, WsEncoding::Json).await;
    let big = json!({"id": 2, "op": "publish", "channel": "chat:x", "data": "y".repeat(2000)});
    client.send(&big).await;
    assert_eq!(client.closed().await.0, 1009);

    // Fragments that are each small but add up to too much.
    let mut client = cluster.client(0, WsEncoding::MsgPack).await;
    let chunk = vec![0xc0u8; 600];
    client
        .send_raw(Message::Frame(Frame::message(
            chunk.clone(),
            OpCode::Data(Data::Binary),
            false,
        )))
        .await;
    client
        .send_raw(Message::Frame(Frame::message(
            chunk,
            OpCode::Data(Data::Continue),
            true,
        )))
        .await;
    assert_eq!(client.closed().await.0, 1009);

    // A fragmented message under the limit is reassembled and served.
    let mut client = cluster.client(0, WsEncoding::Json).await;
    let text = r#"{"id":7,"op":"ping"}"#.as_bytes();
    client
        .send_raw(Message::Frame(Frame::message(
            text[..5].to_vec(),
            OpCode::Data(Data::Text),
            false,
        )))
        .await;
    client
        .send_raw(Message::Frame(Frame::message(
            text[5..].to_vec(),
            OpCode::Data(Data::Continue),
            true,
        )))
        .await;
    assert_eq!(client.reply(7).await["ok"], json!({}));
}

#[actix_rt::test]
async fn command_errors_are_replies_and_the_connection_stays() {
    let cluster =
        TestCluster::start_with(1, |c| c.gateway.max_subscriptions_per_connection = 2).await;
    for encoding in WsEncoding::BOTH {
        let mut c = cluster.client(0, encoding).await;
        assert_eq!(code(&c.command("frobnicate", json!({})).await), 104);
        let id = 900;
        c.send(&json!({"id": id})).await;
        assert_eq!(code(&c.reply(id).await), 107, "missing op");
        c.send(&json!({"id": id + 1, "op": 7})).await;
        assert_eq!(code(&c.reply(id + 1).await), 107, "non-string op");
        assert_eq!(
            code(&c.command("connect", json!({})).await),
            107,
            "second connect"
        );
        assert_eq!(
            code(&c.command("subscribe", json!({})).await),
            107,
            "missing channel"
        );
        assert_eq!(
            code(&c.command("subscribe", json!({"channel": "a..b"})).await),
            107
        );
        assert_eq!(
            code(
                &c.command("subscribe", json!({"channel": "nowhere:x"}))
                    .await
            ),
            102
        );
        assert_eq!(
            code(
                &c.command("publish", json!({"channel": "feed:x", "data": 1}))
                    .await
            ),
            103,
            "feed forbids client publish"
        );
        assert_eq!(
            c.command("subscribe", json!({"channel": "chat:one"})).await["ok"]["offset"],
            json!(0)
        );
        assert_eq!(
            code(&c.command("subscribe", json!({"channel": "chat:one"})).await),
            105
        );
        c.command("subscribe", json!({"channel": "chat:two"})).await;
        assert_eq!(
            code(
                &c.command("subscribe", json!({"channel": "chat:three"}))
                    .await
            ),
            106
        );
        assert_eq!(
            code(&c.command("presence", json!({"channel": "chat:one"})).await),
            108
        );
        assert_eq!(
            code(&c.command("rpc", json!({"method": "x"})).await),
            104,
            "nobody serves x"
        );
        assert_eq!(
            code(
                &c.command("history", json!({"channel": "chat:one", "limit": 1.5}))
                    .await
            ),
            107,
            "float limit"
        );
        assert_eq!(
            code(
                &c.command(
                    "history",
                    json!({"channel": "chat:one", "since": {"offset": 5, "epoch": "nope"}})
                )
                .await
            ),
            112
        );
        // Fire and forget: no reply at all, not even an error.
        c.send(&json!({"op": "frobnicate"})).await;
        c.send(&json!({"id": 0, "op": "ping"})).await;
        assert_eq!(c.command("ping", json!({})).await["ok"], json!({}));
        assert!(c.next_message_now().is_none(), "no reply for id 0 or no id");
    }
}

#[actix_rt::test]
async fn too_many_commands_in_flight_is_111() {
    let cluster = TestCluster::start_with(1, |c| c.gateway.max_inflight_per_connection = 1).await;
    let mut c = cluster.client(0, WsEncoding::Json).await;
    let frame = "{\"id\":1,\"op\":\"history\",\"channel\":\"chat:a\"}\n{\"id\":2,\"op\":\"history\",\"channel\":\"chat:a\"}";
    c.send_raw(Message::text(frame)).await;
    let second = c.reply(2).await;
    assert_eq!(code(&second), 111);
    assert_eq!(second["error"]["temporary"], json!(true));
    assert!(c.reply(1).await["ok"].is_object());
}

#[actix_rt::test]
async fn failed_connect_closes_as_documented() {
    let cluster = TestCluster::start().await;
    let mut c = WsClient::open(&cluster.ws_url(0), WsEncoding::Json).await;
    let reply = c.command("connect", json!({"token": "abc.def.ghi"})).await;
    assert_eq!(code(&reply), 101);
    assert_eq!(c.closed().await.0, 4002);

    let mut c = WsClient::open(&cluster.ws_url(0), WsEncoding::MsgPack).await;
    let reply = c
        .command("connect", json!({"subs": ["not", "a", "map"]}))
        .await;
    assert_eq!(code(&reply), 107);
    assert_eq!(c.closed().await.0, 4000);

    let strict = TestCluster::start_with(1, |c| c.gateway.allow_anonymous = false).await;
    let mut c = WsClient::open(&strict.ws_url(0), WsEncoding::Json).await;
    assert_eq!(code(&c.command("connect", json!({})).await), 101);
    assert_eq!(c.closed().await.0, 4002);
}

#[actix_rt::test]
async fn broadcast_missing_is_113_and_silent_is_114() {
    let cluster = TestCluster::without_broadcast(|c| c.nats.request_timeout_ms = 300).await;
    let mut c = cluster.client(0, WsEncoding::Json).await;
    let reply = c
        .command("publish", json!({"channel": "chat:a", "data": 1}))
        .await;
    assert_eq!(code(&reply), 113);
    assert_eq!(reply["error"]["temporary"], json!(true));
    assert!(
        reply["error"]["retry_after_ms"]
            .as_u64()
            .is_some_and(|ms| ms > 0),
        "{reply}"
    );

    // A responder that never answers: the deadline gives 114.
    let nats = cluster.nats_client().await;
    // (Gateways address broadcast by partition: rt.bc.p.<partition>.<op>.<channel>.)
    let _silent = nats.subscribe("rt.bc.p.>").await.expect("subscribe");
    rt_tests::nats_sync(&nats).await;
    let reply = c.command("history", json!({"channel": "chat:a"})).await;
    assert_eq!(code(&reply), 114, "{reply}");
    assert_eq!(reply["error"]["temporary"], json!(true));
    tokio::time::sleep(Duration::from_millis(10)).await;
}

/// Writes `bytes` on a fresh socket to the gateway and reads until the
/// server closes or `until` says the bytes so far are enough.
async fn raw_exchange(
    addr: std::net::SocketAddr,
    bytes: &[u8],
    until: impl Fn(&[u8]) -> bool,
) -> Vec<u8> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    stream.write_all(bytes).await.expect("write");
    let mut received = Vec::new();
    let mut chunk = [0u8; 4096];
    while !until(&received) {
        let n = within("the gateway's answer", STEP, stream.read(&mut chunk))
            .await
            .expect("read");
        if n == 0 {
            break;
        }
        received.extend_from_slice(&chunk[..n]);
    }
    received
}

fn upgrade_request(path: &str, protocol: &str) -> String {
    format!(
        "GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
         Sec-WebSocket-Protocol: {protocol}\r\n\r\n"
    )
}

#[actix_rt::test]
async fn upgrades_are_answered_by_path_and_frames_sent_with_the_request_are_read() {
    let cluster = TestCluster::start().await;
    let addr = cluster.addr(0);

    // An upgrade to any other path: 404, then the socket closes.
    let answer = raw_exchange(
        addr,
        upgrade_request("/nope", "rt.v1.json").as_bytes(),
        |_| false,
    )
    .await;
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 404"), "{answer}");

    // A plain GET of the endpoint: 400.
    let plain = rt_tests::http::get(addr, "/ws", &[]).await;
    assert_eq!(plain.status, 400, "{}", plain.text());

    // A client that sends its `connect` in the same write as the upgrade
    // request: the frame is read from what came with the request.
    let payload = br#"{"id":1,"op":"connect"}"#;
    let mask = [0x11u8, 0x22, 0x33, 0x44];
    let mut bytes = upgrade_request("/ws", "rt.v1.json").into_bytes();
    bytes.extend_from_slice(&[0x81, 0x80 | payload.len() as u8]);
    bytes.extend_from_slice(&mask);
    bytes.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    let head_end = |b: &[u8]| b.windows(4).position(|w| w == b"\r\n\r\n").map(|p| p + 4);
    // An unmasked frame's payload: (start, length), once its header is in.
    let payload_at = |b: &[u8], at: usize| -> Option<(usize, usize)> {
        match *b.get(at + 1)? & 0x7f {
            126 => Some((
                at + 4,
                usize::from(u16::from_be_bytes([*b.get(at + 2)?, *b.get(at + 3)?])),
            )),
            127 => None,
            short => Some((at + 2, usize::from(short))),
        }
    };
    let answer = raw_exchange(addr, &bytes, |b| {
        head_end(b)
            .and_then(|end| payload_at(b, end))
            .is_some_and(|(start, length)| b.len() >= start + length)
    })
    .await;
    let end = head_end(&answer).expect("a response head");
    let head = String::from_utf8_lossy(&answer[..end]);
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert!(
        head.to_ascii_lowercase()
            .contains("sec-websocket-protocol: rt.v1.json"),
        "{head}"
    );
    assert_eq!(answer[end], 0x81, "a text frame");
    let (start, length) = payload_at(&answer, end).expect("a frame header");
    let reply: Value =
        serde_json::from_slice(&answer[start..start + length]).expect("a JSON reply");
    assert_eq!(reply["id"], json!(1));
    assert!(reply["ok"]["client"].is_string(), "{reply}");
}
