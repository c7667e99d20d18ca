//! Frames written straight to an idle connection's socket.
//!
//! A frame queued for a connection normally wakes the connection's task: the
//! actor takes it off its [`Outbound`](crate::outbound::Outbound) queue,
//! encodes the WebSocket header into its buffer, and the pump writes the
//! bytes. For one small frame to a connection that had nothing else to send
//! — every delivery of a channel with many quiet subscribers — that is a
//! task switch and half a dozen polls around one `send`, and it is most of
//! the gateway's own work in such a fan-out (the `send` itself is the
//! kernel's). So when the connection's output is *idle*, the queue writes
//! the frame to the socket itself, header and payload in one `writev`.
//!
//! Only the connection's own worker thread writes directly (a fan-out on
//! that thread, e.g. the channel's relay when it runs there): the frames of
//! connections on other workers are queued and written by their own threads,
//! so a large fan-out's writes still run on every core at once.
//!
//! Only a *quiet* socket is written to directly: one that got no direct
//! write for [`HOT`]. A socket receiving a steady stream gets its frames
//! queued as before, where the pump coalesces what accumulated into one
//! write; writing each at once would cost one `send` per frame instead.
//!
//! Idle means nothing can be ahead of the frame: the pump marks it at the end
//! of a poll in which it wrote everything and the actor had nothing more,
//! and clears it at the start of its next poll, before the actor runs (both
//! under the queue's lock, which a direct write holds too, so a direct write
//! never interleaves with the pump's). Whatever the socket does not take at
//! once is kept here and written by the pump first; a socket that takes
//! nothing gets the frame queued as before.

use std::io::{self, IoSlice};
use std::sync::Arc;
use std::thread::ThreadId;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use tokio::net::tcp::OwnedWriteHalf;

use crate::outbound::Frame;

const OPCODE_TEXT: u8 = 0x1;
const OPCODE_BINARY: u8 = 0x2;
const FIN: u8 = 0x80;

/// A socket written to directly less than this long ago gets its next
/// frames queued (and coalesced) instead.
pub const HOT: Duration = Duration::from_millis(1);

thread_local! {
    static THIS_THREAD: ThreadId = std::thread::current().id();
}

/// The calling thread's id, without `std::thread::current()`'s handle clone
/// (this runs once per delivery).
pub fn this_thread() -> ThreadId {
    THIS_THREAD.with(|id| *id)
}

/// A connection's socket as its queue sees it.
pub struct DirectSocket {
    writer: Arc<OwnedWriteHalf>,
    /// The thread serving the connection (that made this).
    owner: ThreadId,
    /// Nothing is queued anywhere between the queue and the socket.
    idle: bool,
    /// The part of a direct write the socket did not take.
    rest: Option<Bytes>,
    /// When the last direct write was.
    last_write: Option<Instant>,
}

impl DirectSocket {
    pub fn new(writer: Arc<OwnedWriteHalf>) -> Self {
        Self {
            writer,
            owner: this_thread(),
            idle: false,
            rest: None,
            last_write: None,
        }
    }

    pub fn is_idle(&self) -> bool {
        self.idle
    }

    /// The pump wrote everything and the actor has nothing more.
    pub fn set_idle(&mut self) {
        if self.rest.is_none() {
            self.idle = true;
        }
    }

    /// The pump is about to run: no direct writes until it is idle again.
    /// Returns what the socket did not take of the last direct write, which
    /// must go out before anything else.
    pub fn set_busy(&mut self) -> Option<Bytes> {
        self.idle = false;
        self.rest.take()
    }

    /// Writes `frame` as one WebSocket frame if the socket is idle and
    /// quiet and this is the connection's thread. True when it went
    /// (possibly in part: the rest waits for the pump, which the caller
    /// wakes); false when the caller must queue it.
    pub fn write(&mut self, frame: &Frame) -> bool {
        if !self.idle || this_thread() != self.owner {
            return false;
        }
        let now = Instant::now();
        if self
            .last_write
            .is_some_and(|last| now.duration_since(last) < HOT)
        {
            return false;
        }
        let (opcode, payload) = match frame {
            Frame::Binary(bytes) => (OPCODE_BINARY, &bytes[..]),
            Frame::Text(text) => (OPCODE_TEXT, &text.as_bytes()[..]),
        };
        let mut header = [0u8; 10];
        let header_len = encode_header(opcode, payload.len(), &mut header);
        let header = &header[..header_len];
        let written = match self
            .writer
            .try_write_vectored(&[IoSlice::new(header), IoSlice::new(payload)])
        {
            Ok(written) => written,
            // Full (or broken: the pump will see why): queue it.
            Err(error) => {
                if error.kind() != io::ErrorKind::WouldBlock {
                    tracing::debug!(%error, "direct write failed");
                }
                self.idle = false;
                return false;
            }
        };
        self.last_write = Some(now);
        if written < header.len() + payload.len() {
            let mut rest = BytesMut::with_capacity(header.len() + payload.len() - written);
            if written < header.len() {
                rest.extend_from_slice(&header[written..]);
                rest.extend_from_slice(payload);
            } else {
                rest.extend_from_slice(&payload[written - header.len()..]);
            }
            self.rest = Some(rest.freeze());
            self.idle = false;
        }
        true
    }
}

/// A server's (unmasked, final) frame header for a payload of `len` bytes;
/// returns how many bytes of `buf` it took (2, 4 or 10).
fn encode_header(opcode: u8, len: usize, buf: &mut [u8; 10]) -> usize {
    buf[0] = FIN | opcode;
    match len {
        0..=125 => {
            buf[1] = len as u8;
            2
        }
        126..=0xFFFF => {
            buf[1] = 126;
            buf[2..4].copy_from_slice(&(len as u16).to_be_bytes());
            4
        }
        _ => {
            buf[1] = 127;
            buf[2..10].copy_from_slice(&(len as u64).to_be_bytes());
            10
        }
    }
}

/// A loopback socket pair for tests: the server's write half, ready for
/// direct writes, and the client's stream.
#[cfg(test)]
pub(crate) async fn socket_pair() -> (Arc<OwnedWriteHalf>, tokio::net::TcpStream) {
    use tokio::net::{TcpListener, TcpStream};
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let client = TcpStream::connect(listener.local_addr().expect("addr"))
        .await
        .expect("connect");
    let (server, _) = listener.accept().await.expect("accept");
    let (_, writer) = server.into_split();
    // Direct writes need the reactor to have seen the socket writable.
    writer.writable().await.expect("writable");
    (Arc::new(writer), client)
}

#[cfg(test)]
mod tests {
    use super::*;
    use actix_codec::Decoder as _;
    use actix_http::ws::{Codec, Frame as WsFrame};
    use tokio::io::AsyncReadExt as _;

    /// Decodes one frame the way a client does (actix-http's client codec).
    fn decode(bytes: &[u8]) -> Option<WsFrame> {
        let mut buf = BytesMut::from(bytes);
        Codec::new()
            .client_mode()
            .max_size(64 << 20)
            .decode(&mut buf)
            .expect("a valid frame")
    }

    #[test]
    fn headers_use_the_shortest_length_encoding() {
        let mut buf = [0u8; 10];
        assert_eq!(encode_header(OPCODE_BINARY, 125, &mut buf), 2);
        assert_eq!(buf[..2], [0x82, 125]);
        assert_eq!(encode_header(OPCODE_TEXT, 126, &mut buf), 4);
        assert_eq!(buf[..4], [0x81, 126, 0, 126]);
        assert_eq!(encode_header(OPCODE_BINARY, 70_000, &mut buf), 10);
        assert_eq!(buf[..2], [0x82, 127]);
        assert_eq!(
            u64::from_be_bytes(buf[2..10].try_into().expect("8")),
            70_000
        );
    }

    #[actix_rt::test]
    async fn an_idle_socket_gets_the_frame_at_once_and_a_busy_one_never() {
        let (writer, mut client) = socket_pair().await;
        let mut socket = DirectSocket::new(writer);
        let frame = Frame::Binary(Bytes::from_static(b"\x81\xa1a\x01"));
        assert!(!socket.write(&frame), "not idle until the pump says so");
        socket.set_idle();
        assert!(socket.write(&frame));
        assert!(socket.set_busy().is_none(), "a small frame goes whole");
        assert!(!socket.write(&frame), "busy while the pump runs");
        socket.set_idle();
        assert!(!socket.write(&frame), "hot: just written to");
        tokio::time::sleep(HOT).await;
        let text = Frame::Text("x".repeat(300).into());
        assert!(socket.write(&text), "quiet again");

        let mut got = vec![0u8; 2 + 4 + 4 + 300];
        client.read_exact(&mut got).await.expect("read");
        assert_eq!(
            decode(&got[..6]),
            Some(WsFrame::Binary(Bytes::from_static(b"\x81\xa1a\x01")))
        );
        assert_eq!(
            decode(&got[6..]),
            Some(WsFrame::Text(Bytes::from("x".repeat(300))))
        );
    }

    #[actix_rt::test]
    async fn another_thread_never_writes_directly() {
        let (writer, _client) = socket_pair().await;
        let mut socket = DirectSocket::new(writer);
        socket.set_idle();
        let frame = Frame::Binary(Bytes::from_static(b"\x01"));
        let (socket, wrote) = std::thread::spawn(move || {
            let wrote = socket.write(&frame);
            (socket, wrote)
        })
        .join()
        .expect("thread");
        assert!(!wrote, "queued for the connection's own thread");
        assert!(socket.is_idle(), "still idle for its own thread");
    }

    #[actix_rt::test]
    async fn what_the_socket_does_not_take_is_kept_for_the_pump() {
        let (writer, mut client) = socket_pair().await;
        let mut socket = DirectSocket::new(writer);
        // More than a loopback socket's buffers take while nobody reads.
        let payload = Bytes::from(vec![7u8; 32 << 20]);
        socket.set_idle();
        assert!(socket.write(&Frame::Binary(payload.clone())));
        assert!(!socket.is_idle(), "a partial write leaves the socket busy");
        socket.set_idle();
        assert!(!socket.is_idle(), "not idle while a rest waits");
        let rest = socket.set_busy().expect("the rest is kept");
        assert!(!rest.is_empty() && rest.len() < payload.len());

        let mut got = Vec::new();
        let expected = 10 + payload.len();
        let sent_directly = expected - rest.len();
        got.resize(sent_directly, 0);
        client.read_exact(&mut got).await.expect("read");
        got.extend_from_slice(&rest);
        assert_eq!(decode(&got), Some(WsFrame::Binary(payload)));
    }
}
