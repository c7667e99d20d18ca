//! A minimal HTTP/1.1 client over a keep-alive `TcpStream`: one request at a time per
//! connection, `Content-Length` or chunked responses. Enough for `POST /api/publish`
//! without pulling hyper into the tree.

use std::net::{IpAddr, SocketAddr};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

use crate::client::with_default_port;
use crate::error::Result;

/// Response heads larger than this are refused.
const MAX_HEAD: usize = 64 * 1024;

/// An `http://host:port` base URL, resolved once.
#[derive(Debug, Clone)]
pub struct HttpTarget {
    pub addr: SocketAddr,
    pub host: String,
}

impl HttpTarget {
    pub async fn new(base: &str) -> Result<Self> {
        let rest = base
            .strip_prefix("http://")
            .ok_or_else(|| format!("`{base}`: only http:// URLs are supported"))?;
        let authority = rest.split('/').next().unwrap_or(rest);
        let host = with_default_port(authority, 80)?;
        let addr = tokio::net::lookup_host(&host)
            .await?
            .next()
            .ok_or_else(|| format!("{host} does not resolve"))?;
        Ok(HttpTarget { addr, host })
    }
}

#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub body: Vec<u8>,
    /// False when the server said it will close (or HTTP/1.0): open a new connection.
    pub keep_alive: bool,
    /// `Retry-After` in seconds (the delay form; an HTTP date is ignored).
    pub retry_after_secs: Option<u64>,
}

pub struct HttpConn {
    stream: TcpStream,
    host: String,
    buf: Vec<u8>,
}

impl HttpConn {
    pub async fn connect(target: &HttpTarget, source: Option<IpAddr>) -> Result<Self> {
        let socket = if target.addr.is_ipv4() {
            TcpSocket::new_v4()?
        } else {
            TcpSocket::new_v6()?
        };
        if let Some(ip) = source {
            socket.bind(SocketAddr::new(ip, 0))?;
        }
        let stream = socket.connect(target.addr).await?;
        stream.set_nodelay(true)?;
        Ok(HttpConn {
            stream,
            host: target.host.clone(),
            buf: Vec::with_capacity(4096),
        })
    }

    /// Sends one request and reads its response. `headers` are extra header lines, each
    /// ending in `\r\n`.
    pub async fn request(
        &mut self,
        method: &str,
        path: &str,
        headers: &str,
        body: &[u8],
    ) -> Result<Response> {
        let mut out = Vec::with_capacity(256 + headers.len() + body.len());
        out.extend_from_slice(
            format!(
                "{method} {path} HTTP/1.1\r\nHost: {}\r\n{headers}Content-Length: {}\r\n\r\n",
                self.host,
                body.len()
            )
            .as_bytes(),
        );
        out.extend_from_slice(body);
        self.stream.write_all(&out).await?;

        let (head, head_len) = loop {
            if let Some(parsed) = parse_head(&self.buf)? {
                break parsed;
            }
            self.fill().await?;
        };
        let (body, consumed) = if head.chunked {
            loop {
                if let Some(done) = decode_chunked(&self.buf[head_len..])? {
                    break done;
                }
                self.fill().await?;
            }
        } else if let Some(len) = head.content_length {
            while self.buf.len() < head_len + len {
                self.fill().await?;
            }
            (self.buf[head_len..head_len + len].to_vec(), len)
        } else if head.status == 204 || head.status == 304 || head.status < 200 {
            (Vec::new(), 0)
        } else {
            // No length: the body runs to the end of the connection.
            while self.fill().await.is_ok() {}
            (self.buf[head_len..].to_vec(), self.buf.len() - head_len)
        };
        self.buf.drain(..head_len + consumed);
        Ok(Response {
            status: head.status,
            body,
            keep_alive: head.keep_alive && (head.chunked || head.content_length.is_some()),
            retry_after_secs: head.retry_after_secs,
        })
    }

    async fn fill(&mut self) -> Result<()> {
        let mut chunk = [0u8; 8192];
        let n = self.stream.read(&mut chunk).await?;
        if n == 0 {
            return Err("connection closed by the server".into());
        }
        self.buf.extend_from_slice(&chunk[..n]);
        Ok(())
    }
}

#[derive(Debug, PartialEq, Eq)]
pub struct Head {
    pub status: u16,
    pub content_length: Option<usize>,
    pub chunked: bool,
    pub keep_alive: bool,
    pub retry_after_secs: Option<u64>,
}

/// Parses a response head if `buf` holds all of it; returns it and its length.
pub fn parse_head(buf: &[u8]) -> Result<Option<(Head, usize)>> {
    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
        if buf.len() > MAX_HEAD {
            return Err("HTTP response head too large".into());
        }
        return Ok(None);
    };
    let text = std::str::from_utf8(&buf[..end]).map_err(|_| "HTTP response head is not UTF-8")?;
    let mut lines = text.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let mut parts = status_line.splitn(3, ' ');
    let version = parts.next().unwrap_or_default();
    let status: u16 = parts
        .next()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("bad HTTP status line `{status_line}`"))?;
    if !version.starts_with("HTTP/1.") {
        return Err(format!("bad HTTP status line `{status_line}`").into());
    }
    let mut head = Head {
        status,
        content_length: None,
        chunked: false,
        keep_alive: version == "HTTP/1.1",
        retry_after_secs: None,
    };
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-length") {
            head.content_length = Some(value.parse().map_err(|_| "bad Content-Length")?);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            head.chunked = value.to_ascii_lowercase().contains("chunked");
        } else if name.eq_ignore_ascii_case("retry-after") {
            head.retry_after_secs = value.parse().ok();
        } else if name.eq_ignore_ascii_case("connection") {
            let value = value.to_ascii_lowercase();
            if value.contains("close") {
                head.keep_alive = false;
            } else if value.contains("keep-alive") {
                head.keep_alive = true;
            }
        }
    }
    Ok(Some((head, end + 4)))
}

/// Decodes a chunked body if `buf` holds all of it; returns the body and the bytes used.
pub fn decode_chunked(buf: &[u8]) -> Result<Option<(Vec<u8>, usize)>> {
    let mut body = Vec::new();
    let mut pos = 0;
    loop {
        let Some(line_len) = buf[pos..].windows(2).position(|w| w == b"\r\n") else {
            return Ok(None);
        };
        let line = std::str::from_utf8(&buf[pos..pos + line_len]).map_err(|_| "bad chunk size")?;
        let size_text = line.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size_text, 16).map_err(|_| "bad chunk size")?;
        pos += line_len + 2;
        if size == 0 {
            // Trailers, then an empty line.
            loop {
                let Some(len) = buf[pos..].windows(2).position(|w| w == b"\r\n") else {
                    return Ok(None);
                };
                pos += len + 2;
                if len == 0 {
                    return Ok(Some((body, pos)));
                }
            }
        }
        if buf.len() < pos + size + 2 {
            return Ok(None);
        }
        body.extend_from_slice(&buf[pos..pos + size]);
        if &buf[pos + size..pos + size + 2] != b"\r\n" {
            return Err("chunk not followed by CRLF".into());
        }
        pos += size + 2;
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    #[test]
    fn heads_parse_length_chunking_and_connection() {
        let raw = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\ncontent-length: 12\r\n\r\n{\"offset\":1}";
        let (head, len) = parse_head(raw).unwrap().unwrap();
        assert_eq!(
            head,
            Head {
                status: 200,
                content_length: Some(12),
                chunked: false,
                keep_alive: true,
                retry_after_secs: None,
            }
        );
        assert_eq!(&raw[len..], b"{\"offset\":1}");

        let raw = b"HTTP/1.1 503 Service Unavailable\r\nTransfer-Encoding: chunked\r\nRetry-After: 1\r\nConnection: close\r\n\r\n";
        let (head, _) = parse_head(raw).unwrap().unwrap();
        assert!(head.chunked && !head.keep_alive && head.status == 503);
        assert_eq!(head.retry_after_secs, Some(1));
        let raw = b"HTTP/1.1 503 Service Unavailable\r\nRetry-After: Wed, 21 Oct 2015 07:28:00 GMT\r\n\r\n";
        assert_eq!(parse_head(raw).unwrap().unwrap().0.retry_after_secs, None);

        let (head, _) = parse_head(b"HTTP/1.0 200 OK\r\n\r\n").unwrap().unwrap();
        assert!(!head.keep_alive);
        assert!(
            parse_head(b"HTTP/1.1 200 OK\r\nContent-Le")
                .unwrap()
                .is_none()
        );
        assert!(parse_head(b"SSH-2.0-OpenSSH\r\n\r\n").is_err());
    }

    #[test]
    fn chunked_bodies_decode_only_when_complete() {
        let raw = b"4\r\nWiki\r\n5;ext=1\r\npedia\r\n0\r\nX-Trailer: y\r\n\r\nNEXT";
        let (body, used) = decode_chunked(raw).unwrap().unwrap();
        assert_eq!(body, b"Wikipedia");
        assert_eq!(&raw[used..], b"NEXT");
        for cut in 0..raw.len() - 4 {
            assert!(decode_chunked(&raw[..cut]).unwrap().is_none(), "cut {cut}");
        }
        assert!(decode_chunked(b"zz\r\n").is_err());
    }

    #[tokio::test]
    async fn keep_alive_connection_serves_several_requests() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (mut sock, _) = listener.accept().await.unwrap();
            let mut seen = Vec::new();
            let mut buf = [0u8; 4096];
            let mut answered = 0;
            while answered < 2 {
                let n = sock.read(&mut buf).await.unwrap();
                seen.extend_from_slice(&buf[..n]);
                let text = String::from_utf8_lossy(&seen).to_string();
                if text.matches("\r\n\r\n").count() > answered && text.ends_with('}') {
                    let reply: &[u8] = if answered == 0 {
                        b"HTTP/1.1 200 OK\r\nContent-Length: 25\r\n\r\n{\"offset\":7,\"epoch\":\"e\"}\n"
                    } else {
                        b"HTTP/1.1 401 Unauthorized\r\nTransfer-Encoding: chunked\r\n\r\n2\r\n{}\r\n0\r\n\r\n"
                    };
                    sock.write_all(reply).await.unwrap();
                    answered += 1;
                }
            }
            String::from_utf8(seen).unwrap()
        });
        let target = HttpTarget::new(&format!("http://{addr}")).await.unwrap();
        let mut conn = HttpConn::connect(&target, None).await.unwrap();
        let headers = "Authorization: apikey k\r\nContent-Type: application/json\r\n";
        let first = conn
            .request("POST", "/api/publish", headers, b"{}")
            .await
            .unwrap();
        assert_eq!(first.status, 200);
        assert!(first.keep_alive);
        assert_eq!(first.body, b"{\"offset\":7,\"epoch\":\"e\"}\n");
        let second = conn
            .request("POST", "/api/publish", headers, b"{}")
            .await
            .unwrap();
        assert_eq!((second.status, second.body.as_slice()), (401, &b"{}"[..]));
        let seen = server.await.unwrap();
        assert!(seen.starts_with("POST /api/publish HTTP/1.1\r\nHost: 127.0.0.1:"));
        assert!(seen.contains("Authorization: apikey k\r\n"));
        assert!(seen.contains("Content-Length: 2\r\n\r\n{}"));
    }
}
