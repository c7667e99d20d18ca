//! A WebSocket client that speaks the public protocol, for tests.
//!
//! Messages are handled as `serde_json::Value` whatever the wire encoding,
//! so one test body can run over both encodings.

use std::collections::VecDeque;

use futures_util::{SinkExt as _, StreamExt as _};
use serde_json::{Value, json};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

use crate::{STEP, within};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WsEncoding {
    MsgPack,
    Json,
}

impl WsEncoding {
    pub const BOTH: [WsEncoding; 2] = [WsEncoding::MsgPack, WsEncoding::Json];

    pub fn subprotocol(self) -> &'static str {
        match self {
            WsEncoding::MsgPack => "rt.v1.msgpack",
            WsEncoding::Json => "rt.v1.json",
        }
    }
}

pub type Socket = WebSocketStream<MaybeTlsStream<TcpStream>>;

pub struct WsClient {
    pub ws: Socket,
    pub encoding: WsEncoding,
    next_id: u32,
    inbox: VecDeque<Value>,
}

impl WsClient {
    /// Opens a socket offering exactly `protocols` (may be empty).
    pub async fn open_with_protocols(
        url: &str,
        protocols: &[&str],
    ) -> Result<(Socket, Option<String>), tungstenite::Error> {
        let mut request = url.into_client_request()?;
        if !protocols.is_empty() {
            let value = protocols.join(", ");
            request.headers_mut().insert(
                "Sec-WebSocket-Protocol",
                value.parse().map_err(|_| {
                    tungstenite::Error::Url(tungstenite::error::UrlError::NoHostName)
                })?,
            );
        }
        let config = WebSocketConfig::default()
            .max_message_size(Some(64 << 20))
            .max_frame_size(Some(64 << 20));
        let (ws, response) =
            tokio_tungstenite::connect_async_with_config(request, Some(config), false).await?;
        let chosen = response
            .headers()
            .get("Sec-WebSocket-Protocol")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        Ok((ws, chosen))
    }

    /// Opens a socket in `encoding` (no `connect` sent yet).
    pub async fn open(url: &str, encoding: WsEncoding) -> Self {
        let (ws, chosen) = within(
            "websocket handshake",
            STEP,
            Self::open_with_protocols(url, &[encoding.subprotocol()]),
        )
        .await
        .expect("websocket handshake");
        assert_eq!(
            chosen.as_deref(),
            Some(encoding.subprotocol()),
            "negotiated subprotocol"
        );
        Self {
            ws,
            encoding,
            next_id: 1,
            inbox: VecDeque::new(),
        }
    }

    /// Opens a socket whose kernel receive buffer is about `recv_buffer`
    /// bytes and completes an anonymous `connect`: once it stops reading, the
    /// server's queue for it fills after little data, as a slow consumer's
    /// on a real network would.
    pub async fn connected_with_recv_buffer(
        url: &str,
        encoding: WsEncoding,
        recv_buffer: u32,
    ) -> Self {
        let mut request = url.into_client_request().expect("a WebSocket URL");
        request.headers_mut().insert(
            "Sec-WebSocket-Protocol",
            encoding
                .subprotocol()
                .parse()
                .expect("a valid header value"),
        );
        let host = request
            .uri()
            .authority()
            .expect("a host")
            .as_str()
            .to_owned();
        let addr = tokio::net::lookup_host(host)
            .await
            .expect("resolve")
            .next()
            .expect("an address");
        let socket = if addr.is_ipv4() {
            tokio::net::TcpSocket::new_v4()
        } else {
            tokio::net::TcpSocket::new_v6()
        }
        .expect("a socket");
        socket.set_recv_buffer_size(recv_buffer).expect("SO_RCVBUF");
        let stream = within("TCP connect", STEP, socket.connect(addr))
            .await
            .expect("TCP connect");
        let config = WebSocketConfig::default()
            .max_message_size(Some(64 << 20))
            .max_frame_size(Some(64 << 20));
        let (ws, _) = within(
            "websocket handshake",
            STEP,
            tokio_tungstenite::client_async_with_config(
                request,
                MaybeTlsStream::Plain(stream),
                Some(config),
            ),
        )
        .await
        .expect("websocket handshake");
        let mut client = Self {
            ws,
            encoding,
            next_id: 1,
            inbox: VecDeque::new(),
        };
        let reply = client.command("connect", json!({})).await;
        assert!(reply.get("ok").is_some(), "connect failed: {reply}");
        client
    }

    /// Opens a socket and completes an anonymous `connect`.
    pub async fn connected(url: &str, encoding: WsEncoding) -> Self {
        let mut client = Self::open(url, encoding).await;
        let reply = client.command("connect", json!({})).await;
        assert!(reply.get("ok").is_some(), "connect failed: {reply}");
        client
    }

    /// Opens a socket and completes a `connect` with `args` (token, session,
    /// subs…); returns the client and the `ok` result.
    pub async fn connected_with(url: &str, encoding: WsEncoding, args: Value) -> (Self, Value) {
        let mut client = Self::open(url, encoding).await;
        let reply = client.command("connect", args).await;
        let ok = reply
            .get("ok")
            .cloned()
            .unwrap_or_else(|| panic!("connect failed: {reply}"));
        (client, ok)
    }

    /// Encodes one message in this client's encoding.
    pub fn encode(&self, message: &Value) -> Message {
        match self.encoding {
            WsEncoding::Json => Message::text(message.to_string()),
            WsEncoding::MsgPack => Message::binary(rt_proto::value::encode(
                &rt_proto::value::from_json(message),
            )),
        }
    }

    pub async fn send(&mut self, message: &Value) {
        let frame = self.encode(message);
        self.send_raw(frame).await;
    }

    pub async fn send_raw(&mut self, frame: Message) {
        within("send", STEP, self.ws.send(frame))
            .await
            .expect("send frame");
    }

    /// Sends `op` with `args` and a fresh id; returns the reply (`ok` or `error`),
    /// keeping pushes that arrive meanwhile for later.
    pub async fn command(&mut self, op: &str, args: Value) -> Value {
        let id = self.send_command(op, args).await;
        self.reply(id).await
    }

    /// Sends a command without waiting; returns its id.
    pub async fn send_command(&mut self, op: &str, mut args: Value) -> u32 {
        let id = self.next_id;
        self.next_id += 1;
        args["id"] = json!(id);
        args["op"] = json!(op);
        self.send(&args).await;
        id
    }

    /// Waits for the reply to `id`.
    pub async fn reply(&mut self, id: u32) -> Value {
        if let Some(pos) = self.inbox.iter().position(|m| m["id"] == json!(id)) {
            return self.inbox.remove(pos).unwrap_or_default();
        }
        loop {
            let messages = self.read_frame().await;
            let mut found = None;
            for message in messages {
                if found.is_none() && message["id"] == json!(id) {
                    found = Some(message);
                } else {
                    self.inbox.push_back(message);
                }
            }
            if let Some(reply) = found {
                return reply;
            }
        }
    }

    /// A message already received and waiting, or one that arrives within 200 ms.
    pub fn next_message_now(&mut self) -> Option<Value> {
        self.inbox.pop_front()
    }

    /// Whether a push of `kind` was already read and is waiting.
    pub fn inbox_has_push(&self, kind: &str) -> bool {
        self.inbox.iter().any(|m| m["push"] == json!(kind))
    }

    /// The next message of any kind.
    pub async fn next_message(&mut self) -> Value {
        loop {
            if let Some(message) = self.inbox.pop_front() {
                return message;
            }
            let messages = self.read_frame().await;
            self.inbox.extend(messages);
        }
    }

    /// The next push of `kind` (skipping other pushes).
    pub async fn next_push(&mut self, kind: &str) -> Value {
        loop {
            let message = self.next_message().await;
            if message["push"] == json!(kind) {
                return message;
            }
        }
    }

    /// Closes the socket normally (1000) and waits for the server's answer.
    pub async fn close(&mut self) {
        let frame = tokio_tungstenite::tungstenite::protocol::CloseFrame {
            code: tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode::Normal,
            reason: "bye".into(),
        };
        let _ = within("close", STEP, self.ws.close(Some(frame))).await;
        while let Some(Ok(_)) = within("close answer", STEP, self.ws.next()).await {}
    }

    /// Reads frames until the server closes; returns the close code and reason.
    pub async fn closed(&mut self) -> (u16, String) {
        loop {
            match within("close", STEP, self.ws.next()).await {
                Some(Ok(Message::Close(Some(frame)))) => {
                    return (u16::from(frame.code), frame.reason.to_string());
                }
                Some(Ok(Message::Close(None))) => return (1005, String::new()),
                Some(Ok(_)) => continue,
                Some(Err(error)) => panic!("socket error while waiting for close: {error}"),
                None => panic!("socket ended without a close frame"),
            }
        }
    }

    /// Opens a socket and completes an anonymous `connect`, or `None` if
    /// any step fails (a gateway that is down or still starting).
    pub async fn try_connected(url: &str, encoding: WsEncoding) -> Option<Self> {
        let (ws, _) = tokio::time::timeout(
            STEP,
            Self::open_with_protocols(url, &[encoding.subprotocol()]),
        )
        .await
        .ok()?
        .ok()?;
        let mut client = Self {
            ws,
            encoding,
            next_id: 1,
            inbox: VecDeque::new(),
        };
        let id = client.next_id;
        client.next_id += 1;
        let connect = client.encode(&json!({"id": id, "op": "connect"}));
        tokio::time::timeout(STEP, client.ws.send(connect))
            .await
            .ok()?
            .ok()?;
        loop {
            let message = tokio::time::timeout(STEP, client.next_message_or_end())
                .await
                .ok()??;
            if message["id"] == json!(id) {
                return message.get("ok").is_some().then_some(client);
            }
        }
    }

    /// The next message of any kind, or `None` once the socket has ended
    /// (closed by the server, reset, or a dead process).
    pub async fn next_message_or_end(&mut self) -> Option<Value> {
        loop {
            if let Some(message) = self.inbox.pop_front() {
                return Some(message);
            }
            let messages = self.try_read_frame().await.ok()?;
            self.inbox.extend(messages);
        }
    }

    /// Reads one data frame and splits it into messages.
    async fn read_frame(&mut self) -> Vec<Value> {
        match self.try_read_frame().await {
            Ok(messages) => messages,
            Err(end) => panic!("{end}"),
        }
    }

    /// Reads one data frame and splits it into messages; `Err` says how the
    /// socket ended.
    async fn try_read_frame(&mut self) -> Result<Vec<Value>, String> {
        loop {
            let frame = within("a frame from the server", STEP, self.ws.next()).await;
            match frame {
                Some(Ok(Message::Binary(bytes))) => {
                    assert_eq!(
                        self.encoding,
                        WsEncoding::MsgPack,
                        "binary frame on a JSON connection"
                    );
                    return Ok(split_msgpack(&bytes));
                }
                Some(Ok(Message::Text(text))) => {
                    assert_eq!(
                        self.encoding,
                        WsEncoding::Json,
                        "text frame on a MessagePack connection"
                    );
                    return Ok(text
                        .split('\n')
                        .filter(|l| !l.trim().is_empty())
                        .map(|l| {
                            serde_json::from_str(l)
                                .unwrap_or_else(|e| panic!("bad JSON line {l:?}: {e}"))
                        })
                        .collect());
                }
                Some(Ok(Message::Close(frame))) => {
                    return Err(format!("unexpected close: {frame:?}"));
                }
                Some(Ok(_)) => continue,
                Some(Err(error)) => return Err(format!("socket error: {error}")),
                None => return Err("socket ended".to_owned()),
            }
        }
    }
}

/// Concatenated MessagePack maps → JSON values.
pub fn split_msgpack(mut bytes: &[u8]) -> Vec<Value> {
    let mut out = Vec::new();
    while !bytes.is_empty() {
        let value = rmpv::decode::read_value(&mut bytes).expect("server sent valid MessagePack");
        out.push(rt_proto::value::to_json_lossy(&value));
    }
    out
}
