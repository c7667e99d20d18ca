//! End to end against a mock gateway on 127.0.0.1: the whole request/reply engine
//! (connect, pacer routing, writer and reader tasks, drain, collector, report) with
//! replies the real gateway may not give yet: `rpc_part` pushes batched with the final
//! reply, 113 busy with `retry_after_ms`, silence, connections dropped mid-run.

#![allow(clippy::unwrap_used)]

use clap::Parser;
use futures_util::{SinkExt, StreamExt};
use serde_json::{Value, json};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};
use tokio_tungstenite::tungstenite::http::header::SEC_WEBSOCKET_PROTOCOL;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};

use super::report::CallsReport;
use crate::cli::{Cli, Scenario};

#[derive(Clone, Copy)]
enum Behavior {
    /// Every command gets `ok`.
    Answer,
    /// By request id: two parts then `ok` (in one frame), 113 busy, silence, `ok`.
    Mixed,
    /// `ok` to the first N calls of each connection, then close 1011.
    DropAfter(u32),
}

async fn mock_gateway(behavior: Behavior) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            tokio::spawn(session(tcp, behavior));
        }
    });
    format!("ws://{addr}/ws")
}

async fn session(tcp: TcpStream, behavior: Behavior) {
    // Accept the client's subprotocol, as the gateway does for the ones it supports. (The
    // error type is tungstenite's callback signature, not ours to shrink.)
    #[allow(clippy::result_large_err)]
    let echo = |req: &Request, mut resp: Response| {
        if let Some(p) = req.headers().get(SEC_WEBSOCKET_PROTOCOL) {
            resp.headers_mut().insert(SEC_WEBSOCKET_PROTOCOL, p.clone());
        }
        Ok(resp)
    };
    let Ok(mut ws) = tokio_tungstenite::accept_hdr_async(tcp, echo).await else {
        return;
    };
    let mut calls = 0u32;
    while let Some(Ok(frame)) = ws.next().await {
        let (json_frames, cmd): (bool, Value) = match &frame {
            Message::Text(t) => (true, serde_json::from_str(t.as_str()).unwrap()),
            Message::Binary(b) => (false, rmp_serde::from_slice(b).unwrap()),
            _ => continue,
        };
        let id = cmd["id"].as_u64().unwrap();
        let replies = match (cmd["op"].as_str().unwrap(), behavior) {
            ("connect", _) => vec![json!({"id": id, "ok": {"client": "c1", "ping_ms": 25000}})],
            (_, Behavior::Answer) => vec![json!({"id": id, "ok": {}})],
            ("rpc", Behavior::Mixed) => match id % 4 {
                0 => vec![
                    json!({"push": "rpc_part", "id": id, "data": {"step": 1}}),
                    json!({"push": "rpc_part", "id": id, "data": {"step": 2}}),
                    json!({"id": id, "ok": {"data": "done"}}),
                ],
                1 => vec![json!({"id": id, "error": {"code": 113, "message": "busy",
                                "temporary": true, "retry_after_ms": 300}})],
                2 => vec![],
                _ => vec![json!({"id": id, "ok": {"data": "$argon2id$..."}})],
            },
            (_, Behavior::DropAfter(n)) => {
                calls += 1;
                if calls > n {
                    let close = CloseFrame {
                        code: CloseCode::Error,
                        reason: Utf8Bytes::from_static("going away"),
                    };
                    let _ = ws.send(Message::Close(Some(close))).await;
                    return;
                }
                vec![json!({"id": id, "ok": {}})]
            }
            (op, _) => panic!("unexpected op {op}"),
        };
        if replies.is_empty() {
            continue;
        }
        // All in one frame, batched the way the gateway may batch.
        let frame = if json_frames {
            let lines: Vec<String> = replies.iter().map(|r| r.to_string()).collect();
            Message::text(lines.join("\n"))
        } else {
            let mut bytes = Vec::new();
            for r in &replies {
                bytes.extend(rmp_serde::to_vec_named(r).unwrap());
            }
            Message::binary(bytes)
        };
        if ws.send(frame).await.is_err() {
            return;
        }
    }
}

async fn run(args: &[&str]) -> CallsReport {
    let mut argv = vec!["rtload"];
    argv.extend_from_slice(args);
    let plan = match Cli::try_parse_from(argv).unwrap().scenario {
        Scenario::Ping(a) => a.plan(),
        Scenario::Rpc(a) => a.plan(),
        _ => panic!("not a call scenario"),
    };
    super::measure(&plan).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ping_every_call_gets_its_reply() {
    let url = mock_gateway(Behavior::Answer).await;
    let r = run(&[
        "ping",
        "--url",
        &url,
        "--connections",
        "4",
        "--rate-per-conn",
        "20",
        "--duration",
        "1s",
        "--warmup",
        "200ms",
    ])
    .await;
    assert_eq!(r.connections.established, 4);
    assert_eq!(
        (r.calls.scheduled, r.calls.sent, r.calls.ok),
        (80, 80, 80),
        "{:?} {:?}",
        r.outcomes,
        r.errors
    );
    assert_eq!(r.calls.failed, 0);
    assert_eq!(r.errors.total, 0, "{:?}", r.errors.kinds);
    assert_eq!(r.latency_ms.unwrap().count, 80);
    assert!(r.latency_ms.unwrap().p50_ms < 50.0, "{:?}", r.latency_ms);
    assert_eq!(r.connections.open_at_end, 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rpc_outcomes_parts_busy_and_silence_add_up() {
    let url = mock_gateway(Behavior::Mixed).await;
    let r = run(&[
        "rpc",
        "--url",
        &url,
        "--method",
        "auth.hash_password",
        "--data",
        r#"{"password":"correct horse"}"#,
        "--encoding",
        "json",
        "--connections",
        "3",
        "--rate",
        "60",
        "--duration",
        "1s",
        "--warmup",
        "200ms",
        "--timeout-ms",
        "300",
    ])
    .await;
    let o = &r.outcomes;
    assert_eq!(r.calls.scheduled, 60);
    // Every measured call ended exactly once.
    assert_eq!(o.ok + o.busy_113.count + o.no_reply, 60, "{o:?}");
    assert!(o.busy_113.count > 0 && o.no_reply > 0 && o.ok > 0, "{o:?}");
    assert_eq!(o.connection_lost, 0);
    let retry = o.busy_113.retry_after_ms.unwrap();
    assert!((299.0..=301.0).contains(&retry.p50_ms), "{retry:?}");
    assert_eq!(retry.count, o.busy_113.count);
    let p = &r.parts;
    assert!(p.calls_with_parts > 0);
    assert_eq!(p.pushes, 2 * p.calls_with_parts);
    assert_eq!(p.first_part_ms.unwrap().count, p.calls_with_parts);
    assert_eq!(r.latency_ms.unwrap().count, o.ok);
    let kinds: Vec<_> = r.errors.kinds.iter().collect();
    assert!(
        !kinds.iter().any(|(k, _)| k.contains("no call in flight")),
        "a part or reply was not matched: {kinds:?}"
    );
    let text = r.render();
    assert!(text.contains("no reply      "), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_on_a_dropped_connection_are_lost_not_missing() {
    let url = mock_gateway(Behavior::DropAfter(8)).await;
    let r = run(&[
        "rpc",
        "--url",
        &url,
        "--method",
        "m",
        "--connections",
        "3",
        "--rate",
        "60",
        "--duration",
        "1s",
        "--warmup",
        "200ms",
        "--timeout-ms",
        "2000",
    ])
    .await;
    let o = &r.outcomes;
    assert_eq!(o.ok + o.connection_lost, 60, "{o:?}");
    assert!(o.ok > 0 && o.connection_lost > 0, "{o:?}");
    assert_eq!(o.no_reply, 0);
    assert_eq!(r.connections.closed_early, 3);
    assert_eq!(r.connections.open_at_end, 0);
    let kinds: Vec<_> = r.errors.kinds.iter().collect();
    assert!(kinds.contains(&("closed 1011", 3)), "{kinds:?}");
}
