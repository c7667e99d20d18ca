//! A client connection: TCP from a chosen source address, the WebSocket handshake with the
//! encoding's subprotocol, and request/reply for the setup commands (`connect`,
//! `subscribe`). After setup a scenario owns the raw stream and reads it its own way.

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

use crate::error::Result;
use crate::wire::{self, Bare, Encoding, OnChannel};

pub type Ws = WebSocketStream<TcpStream>;

/// Why a connection could not be set up; `stage` names it in the report's error tally.
#[derive(Debug)]
pub struct SetupError {
    pub stage: &'static str,
    pub detail: String,
}

impl SetupError {
    fn new(stage: &'static str, detail: impl fmt::Display) -> Self {
        SetupError {
            stage,
            detail: detail.to_string(),
        }
    }

    /// The key this error is counted under: the stage, plus the error code if the server
    /// answered with one.
    pub fn kind(&self) -> String {
        match self.detail.strip_prefix("error ") {
            Some(rest) => format!(
                "{} error {}",
                self.stage,
                rest.split(':').next().unwrap_or(rest)
            ),
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
    pub async fn new(
        url: &str,
        sources: &[IpAddr],
        encoding: Encoding,
        timeout: Duration,
    ) -> Result<Self> {
        let target = parse_ws_url(url)?;
        let server = tokio::net::lookup_host(&target.authority)
            .await?
            .next()
            .ok_or_else(|| format!("{} does not resolve", target.authority))?;
        Ok(Dialer {
            url: url.to_string(),
            server,
            sources: sources.to_vec(),
            encoding,
            timeout,
        })
    }

    pub fn source_for(&self, index: usize) -> Option<IpAddr> {
        (!self.sources.is_empty()).then(|| self.sources[index % self.sources.len()])
    }

    /// TCP + WebSocket handshake + anonymous `connect`. Returns the connection and the time
    /// all of that took.
    pub async fn open(&self, index: usize) -> Result<(Conn, Duration), SetupError> {
        let started = Instant::now();
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
        let mut conn = Conn {
            ws,
            encoding: self.encoding,
            timeout: self.timeout,
            next_id: 1,
        };
        conn.call("connect", |id| Bare { id, op: "connect" })
            .await?;
        Ok((conn, started.elapsed()))
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

    /// Sends one command and waits for its reply (pushes arriving meanwhile are dropped:
    /// during setup there are none rtload cares about). Returns `ok.offset` if any.
    async fn call<T: serde::Serialize>(
        &mut self,
        stage: &'static str,
        build: impl FnOnce(u32) -> T,
    ) -> Result<Option<u64>, SetupError> {
        let id = self.next_id;
        self.next_id += 1;
        let message = self
            .encoding
            .encode(&build(id))
            .map_err(|e| SetupError::new(stage, e))?;
        let timeout = self.timeout;
        let exchange = async {
            self.ws
                .send(message)
                .await
                .map_err(|e| SetupError::new(stage, e))?;
            loop {
                let frame = match self.ws.next().await {
                    Some(Ok(frame)) => frame,
                    Some(Err(e)) => return Err(SetupError::new(stage, e)),
                    None => return Err(SetupError::new(stage, "connection closed")),
                };
                let bytes: &[u8] = match &frame {
                    Message::Binary(b) => b,
                    Message::Text(t) => t.as_bytes(),
                    Message::Close(c) => {
                        let code = c.as_ref().map_or(1005, |c| u16::from(c.code));
                        return Err(SetupError::new(stage, format!("closed {code}")));
                    }
                    _ => continue,
                };
                for part in wire::split_frame(self.encoding, bytes) {
                    let reply = part
                        .and_then(|m| wire::decode(self.encoding, m))
                        .map_err(|e| SetupError::new(stage, format!("undecodable reply: {e}")))?;
                    if reply.id != Some(u64::from(id)) {
                        continue;
                    }
                    if let Some(err) = reply.error {
                        return Err(SetupError::new(
                            stage,
                            format!("error {}: {}", err.code, err.message),
                        ));
                    }
                    return Ok(reply.ok.and_then(|ok| ok.offset));
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
        assert_eq!(SetupError::new("tcp", "refused").kind(), "tcp");
    }
}
