//! A client connection: TCP from a chosen source address, the WebSocket handshake with the
//! encoding's subprotocol, and request/reply for the setup commands (`connect`,
//! `subscribe`). After setup a scenario owns the raw stream and reads it its own way.

use std::collections::BTreeMap;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{Message, http::header};

use crate::cli::Common;
use crate::error::Result;
use crate::wire::{self, Bare, Connect, ConnectOk, Encoding, OnChannel, Reply, Since};

pub type Ws = WebSocketStream<TcpStream>;

/// Why a connection could not be set up; `stage` names it in the report's error tally.
#[derive(Debug)]
pub struct SetupError {
    pub stage: &'static str,
    pub detail: String,
    /// The close code, when the server closed the socket during setup (4007 overloaded...).
    pub close_code: Option<u16>,
    /// The server's `retry_after_ms`: from a `disconnect` push before the close, or from an
    /// error reply.
    pub retry_after_ms: Option<u64>,
}

impl SetupError {
    pub fn new(stage: &'static str, detail: impl fmt::Display) -> Self {
        SetupError {
            stage,
            detail: detail.to_string(),
            close_code: None,
            retry_after_ms: None,
        }
    }

    /// The error code of the server's error reply, if that is what failed.
    pub fn code(&self) -> Option<u32> {
        let rest = self.detail.strip_prefix("error ")?;
        rest.split(':').next()?.trim().parse().ok()
    }

    /// The key this error is counted under: the stage, plus the error code if the server
    /// answered with one, or the close code if it closed the socket.
    pub fn kind(&self) -> String {
        if let Some(rest) = self.detail.strip_prefix("error ") {
            return format!(
                "{} error {}",
                self.stage,
                rest.split(':').next().unwrap_or(rest)
            );
        }
        match self.close_code {
            Some(code) => format!("{} closed {code}", self.stage),
            None => self.stage.to_string(),
        }
    }
}

impl fmt::Display for SetupError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.stage, self.detail)
    }
}

impl std::error::Error for SetupError {}

/// Where and how to connect. Source addresses are used round-robin by connection index,
/// so connections spread evenly over them (each source IP has its own ~28k ephemeral ports).
#[derive(Debug, Clone)]
pub struct Dialer {
    url: String,
    server: SocketAddr,
    sources: Vec<IpAddr>,
    encoding: Encoding,
    timeout: Duration,
}

impl Dialer {
    /// A dialer to `url` (a scenario's `--url`, or another gateway's) with the source
    /// addresses, encoding and connect timeout of the run's common options.
    pub async fn new(url: &str, common: &Common) -> Result<Self> {
        let target = parse_ws_url(url)?;
        let server = tokio::net::lookup_host(&target.authority)
            .await?
            .next()
            .ok_or_else(|| format!("{} does not resolve", target.authority))?;
        Ok(Dialer {
            url: url.to_string(),
            server,
            sources: common.bind_ip.clone(),
            encoding: common.encoding,
            timeout: common.connect_timeout,
        })
    }

    pub fn source_for(&self, index: usize) -> Option<IpAddr> {
        (!self.sources.is_empty()).then(|| self.sources[index % self.sources.len()])
    }

    /// TCP + WebSocket handshake + anonymous `connect`. Returns the connection and the time
    /// all of that took.
    pub async fn open(&self, index: usize) -> Result<(Conn, Duration), SetupError> {
        let started = Instant::now();
        let mut conn = self.handshake(index).await?;
        conn.call("connect", |id| Bare { id, op: "connect" })
            .await?;
        Ok((conn, started.elapsed()))
    }

    /// TCP + WebSocket handshake + an anonymous `connect` that resumes `session` (if any) and
    /// subscribes to `subs` in the same round trip. Returns the connection, the time all of
    /// that took, the reply (the session, and a SubResult or error per channel) and the
    /// pushes that came with it (live publications may share the reply's frame).
    pub async fn open_with(
        &self,
        index: usize,
        session: Option<&str>,
        subs: &BTreeMap<String, Since>,
    ) -> Result<Opened, SetupError> {
        let started = Instant::now();
        let mut conn = self.handshake(index).await?;
        let exchange = conn
            .exchange("connect", |id| Connect {
                id,
                op: "connect",
                session,
                subs,
            })
            .await?;
        let reply: Reply<ConnectOk> = wire::decode_as(self.encoding, &exchange.reply)
            .map_err(|e| SetupError::new("connect", format!("undecodable reply: {e}")))?;
        Ok(Opened {
            conn,
            connect: started.elapsed(),
            reply: reply.ok,
            before: exchange.before,
            after: exchange.after,
        })
    }

    /// TCP from the source address for `index`, then the WebSocket handshake.
    async fn handshake(&self, index: usize) -> Result<Conn, SetupError> {
        let tcp = tokio::time::timeout(
            self.timeout,
            tcp_connect(self.server, self.source_for(index)),
        )
        .await
        .map_err(|_| SetupError::new("tcp", "timed out"))?
        .map_err(|e| SetupError::new("tcp", e))?;
        let mut request = self
            .url
            .as_str()
            .into_client_request()
            .map_err(|e| SetupError::new("handshake", e))?;
        request.headers_mut().insert(
            header::SEC_WEBSOCKET_PROTOCOL,
            HeaderValue::from_static(self.encoding.subprotocol()),
        );
        // Small buffers: the defaults (128 KiB each way; the read one allocated up front)
        // would cost 256 MiB per 1000 sockets. Larger frames still arrive whole: the read
        // size is only how much is asked of the socket at a time.
        let config = WebSocketConfig::default()
            .read_buffer_size(8 * 1024)
            .write_buffer_size(8 * 1024);
        let handshake = tokio_tungstenite::client_async_with_config(request, tcp, Some(config));
        let (ws, _response) = tokio::time::timeout(self.timeout, handshake)
            .await
            .map_err(|_| SetupError::new("handshake", "timed out"))?
            .map_err(|e| SetupError::new("handshake", e))?;
        Ok(Conn {
            ws,
            encoding: self.encoding,
            timeout: self.timeout,
            next_id: 1,
        })
    }
}

async fn tcp_connect(server: SocketAddr, source: Option<IpAddr>) -> std::io::Result<TcpStream> {
    let socket = if server.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    if let Some(ip) = source {
        socket.bind(SocketAddr::new(ip, 0))?;
    }
    let stream = socket.connect(server).await?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// A connection opened by [`Dialer::open_with`].
pub struct Opened {
    pub conn: Conn,
    /// TCP + handshake + `connect` reply.
    pub connect: Duration,
    pub reply: ConnectOk,
    /// Pushes received before the reply, and after it in the reply's frame, in order (each
    /// one message, undecoded).
    pub before: Vec<Vec<u8>>,
    pub after: Vec<Vec<u8>>,
}

/// A command's `ok` reply and the pushes around it (see [`Conn::exchange`]).
struct Exchange {
    reply: Vec<u8>,
    before: Vec<Vec<u8>>,
    after: Vec<Vec<u8>>,
}

/// An open, `connect`ed WebSocket.
pub struct Conn {
    pub ws: Ws,
    pub encoding: Encoding,
    timeout: Duration,
    next_id: u32,
}

impl Conn {
    /// Subscribes; returns the channel's offset from the reply (publications after it will
    /// follow) and the round-trip time.
    pub async fn subscribe(
        &mut self,
        channel: &str,
    ) -> Result<(Option<u64>, Duration), SetupError> {
        let started = Instant::now();
        let offset = self
            .call("subscribe", |id| OnChannel {
                id,
                op: "subscribe",
                channel,
            })
            .await?;
        Ok((offset, started.elapsed()))
    }

    /// Sends one command and waits for its reply. Returns `ok.offset` if any.
    async fn call<T: serde::Serialize>(
        &mut self,
        stage: &'static str,
        build: impl FnOnce(u32) -> T,
    ) -> Result<Option<u64>, SetupError> {
        let raw = self.exchange(stage, build).await?.reply;
        let reply = wire::decode(self.encoding, &raw)
            .map_err(|e| SetupError::new(stage, format!("undecodable reply: {e}")))?;
        Ok(reply.ok.and_then(|ok| ok.offset))
    }

    /// Sends one command and waits for its reply; returns the reply message when it is `ok`,
    /// with the pushes that arrived before it and those after it in the same frame (the
    /// server batches: live publications may follow a reply in its frame). A `disconnect`
    /// push's `retry_after_ms` is kept for the close that follows.
    async fn exchange<T: serde::Serialize>(
        &mut self,
        stage: &'static str,
        build: impl FnOnce(u32) -> T,
    ) -> Result<Exchange, SetupError> {
        let id = self.next_id;
        self.next_id += 1;
        let message = self
            .encoding
            .encode(&build(id))
            .map_err(|e| SetupError::new(stage, e))?;
        let timeout = self.timeout;
        let exchange = async {
            let mut retry_after_ms = None;
            let mut before = Vec::new();
            let sent = self.ws.send(message).await;
            loop {
                let frame = match self.ws.next().await {
                    Some(Ok(frame)) => frame,
                    // A failed send is reported only now: the server may have closed with a
                    // reason (4007 and its retry hint) that is still there to be read.
                    Some(Err(e)) => return Err(SetupError::new(stage, sent.err().unwrap_or(e))),
                    None => {
                        let detail = sent
                            .err()
                            .map_or_else(|| "connection closed".to_string(), |e| e.to_string());
                        return Err(SetupError::new(stage, detail));
                    }
                };
                let bytes: &[u8] = match &frame {
                    Message::Binary(b) => b,
                    Message::Text(t) => t.as_bytes(),
                    Message::Close(c) => {
                        let code = c.as_ref().map_or(1005, |c| u16::from(c.code));
                        return Err(SetupError {
                            close_code: Some(code),
                            retry_after_ms,
                            ..SetupError::new(stage, format!("closed {code}"))
                        });
                    }
                    _ => continue,
                };
                let mut found: Option<Vec<u8>> = None;
                let mut after = Vec::new();
                for part in wire::split_frame(self.encoding, bytes) {
                    let message = part
                        .map_err(|e| SetupError::new(stage, format!("undecodable reply: {e}")))?;
                    let reply = wire::decode(self.encoding, message)
                        .map_err(|e| SetupError::new(stage, format!("undecodable reply: {e}")))?;
                    if reply.push.as_deref() == Some("disconnect") {
                        retry_after_ms = reply.retry_after_ms.or(retry_after_ms);
                    }
                    if reply.push.is_some() {
                        match found {
                            Some(_) => after.push(message.to_vec()),
                            None => before.push(message.to_vec()),
                        }
                        continue;
                    }
                    if found.is_some() || reply.id != Some(u64::from(id)) {
                        continue;
                    }
                    if let Some(err) = reply.error {
                        return Err(SetupError {
                            retry_after_ms: err.retry_after_ms,
                            ..SetupError::new(stage, format!("error {}: {}", err.code, err.message))
                        });
                    }
                    found = Some(message.to_vec());
                }
                if let Some(reply) = found {
                    return Ok(Exchange {
                        reply,
                        before,
                        after,
                    });
                }
            }
        };
        tokio::time::timeout(timeout, exchange)
            .await
            .map_err(|_| SetupError::new(stage, "timed out"))?
    }
}

/// The parts of a `ws://` URL rtload needs.
#[derive(Debug, PartialEq, Eq)]
pub struct WsTarget {
    pub authority: String,
    pub path: String,
}

pub fn parse_ws_url(url: &str) -> Result<WsTarget> {
    let rest = url
        .strip_prefix("ws://")
        .ok_or_else(|| format!("`{url}`: only ws:// URLs are supported (no TLS in rtload)"))?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    Ok(WsTarget {
        authority: with_default_port(authority, 80)?,
        path: path.to_string(),
    })
}

/// `host[:port]` with the port filled in; IPv6 literals keep their brackets.
pub fn with_default_port(authority: &str, port: u16) -> Result<String> {
    if authority.is_empty() {
        return Err("empty host".into());
    }
    let has_port = match authority.rfind(']') {
        Some(close) => authority[close..].contains(':'),
        None => authority.contains(':'),
    };
    Ok(if has_port {
        authority.to_string()
    } else {
        format!("{authority}:{port}")
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn ws_urls_parse() {
        assert_eq!(
            parse_ws_url("ws://127.0.0.1:8080/ws").unwrap(),
            WsTarget {
                authority: "127.0.0.1:8080".into(),
                path: "/ws".into()
            }
        );
        assert_eq!(
            parse_ws_url("ws://localhost").unwrap().authority,
            "localhost:80"
        );
        assert_eq!(parse_ws_url("ws://[::1]/ws").unwrap().authority, "[::1]:80");
        assert_eq!(
            parse_ws_url("ws://[::1]:9/ws").unwrap().authority,
            "[::1]:9"
        );
        assert!(parse_ws_url("wss://example/ws").is_err());
        assert!(parse_ws_url("ws:///ws").is_err());
    }

    #[test]
    fn sources_round_robin() {
        let d = Dialer {
            url: String::new(),
            server: "127.0.0.1:1".parse().unwrap(),
            sources: vec!["127.0.0.2".parse().unwrap(), "127.0.0.3".parse().unwrap()],
            encoding: Encoding::Json,
            timeout: Duration::from_secs(1),
        };
        let picked: Vec<_> = (0..4)
            .map(|i| d.source_for(i).unwrap().to_string())
            .collect();
        assert_eq!(picked, ["127.0.0.2", "127.0.0.3", "127.0.0.2", "127.0.0.3"]);
    }

    #[test]
    fn setup_errors_are_tallied_by_stage_and_code() {
        let e = SetupError::new("subscribe", "error 103: permission denied");
        assert_eq!(e.kind(), "subscribe error 103");
        assert_eq!(e.code(), Some(103));
        assert_eq!(SetupError::new("tcp", "refused").code(), None);
        assert_eq!(SetupError::new("tcp", "refused").kind(), "tcp");
    }
}
