//! WebSocket connections, taken over from the HTTP/1 dispatcher at the upgrade.
//!
//! Why not the usual `actix_web_actors::ws::start` from a route: that keeps
//! actix-http's HTTP/1 dispatcher in between for the connection's whole life,
//! with its 8 KiB read and 8 KiB write buffers, to feed a payload stream, and
//! idle connections are what a real-time gateway holds most of. Here the
//! dispatcher hands the socket over once it has parsed an upgrade request
//! (`HttpService::upgrade`); we answer the handshake, free its buffers, and
//! run the same connection actor (`WebsocketContext`, the same codec) over
//! the socket directly:
//! - reads allocate a chunk only once the socket is readable and hand it to
//!   the actor's frame decoder, so an idle connection holds no read buffer;
//! - the actor's output goes to the socket as it comes, up to
//!   `WRITE_QUEUE_LIMIT` bytes queued while the client does not read; past
//!   it the actor is not polled (backpressure), as the dispatcher did.
//!
//! Everything an upgrade request can be refused for is answered here, with
//! the status and body the route gave before: another path (404), a draining
//! gateway (503 with `Retry-After`), no supported subprotocol (400), a bad
//! handshake (actix-http's answer). Plain `GET /ws` without an upgrade still
//! reaches the route ([`crate::ws_route`]), which says 400.

use std::collections::VecDeque;
use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use actix_codec::Framed;
use actix_http::body::{BodySize, BoxBody, MessageBody as _};
use actix_http::error::PayloadError;
use actix_http::h1::{self, Message};
use actix_http::header::{HeaderValue, RETRY_AFTER, SEC_WEBSOCKET_PROTOCOL};
use actix_http::{Request, RequestHead, Response, StatusCode, ws};
use actix_rt::net::TcpStream;
use actix_web_actors::ws::WebsocketContext;
use bytes::{Buf as _, Bytes, BytesMut};
use futures_util::{SinkExt as _, Stream};
use rt_proto::Encoding;
use tokio::io::AsyncWriteExt as _;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};

use crate::connection::Connection;
use crate::direct::DirectSocket;
use crate::outbound::Outbound;
use crate::state::AppState;

/// The WebSocket endpoint's path.
pub const PATH: &str = "/ws";

/// Bytes read from the socket at a time (allocated per read, handed over).
const READ_CHUNK: usize = 4096;

/// Output bytes queued for a client that is not reading before the actor
/// stops being polled (actix-http's default HTTP/1 write buffer size).
const WRITE_QUEUE_LIMIT: usize = 32 * 1024;

/// How long a closed connection waits for the client to close its side
/// (actix-web's `client_disconnect_timeout`).
const LINGER: Duration = Duration::from_secs(1);

/// The socket, as actix-http hands it over with the parsed request.
pub type Upgrade = (Request, Framed<TcpStream, h1::Codec>);

/// Serves one upgrade request to its end: the handshake answer, then the
/// connection. Errors are the socket's (the caller logs them at debug).
pub async fn serve(app: Arc<AppState>, upgrade: Upgrade) -> io::Result<()> {
    // This future lives as long as the connection, and sized inline it would
    // be as large as its largest state, the handshake's (the request, the
    // HTTP codec, the actor before it starts): boxed, that state is freed
    // once the handshake is done.
    let Some(socket) = Box::pin(handshake(app, upgrade)).await? else {
        return Ok(());
    };
    socket.run().await
}

/// A connection past its handshake: the actor's output going out, the
/// client's bytes coming in (read through the actor's input stream).
struct Socket<S> {
    pump: Pump<S>,
    reader: Rc<OwnedReadHalf>,
}

/// Answers the upgrade request; `None` if it was refused. The request (and
/// the read buffer its headers point into) is dropped on return.
async fn handshake(
    app: Arc<AppState>,
    (request, mut framed): Upgrade,
) -> io::Result<Option<Socket<impl Stream<Item = Result<Bytes, actix_web::Error>>>>> {
    let (connection, response) = match accept(&app, request.head()) {
        Ok(accepted) => accepted,
        Err(response) => {
            refuse(framed, response).await?;
            return Ok(None);
        }
    };
    drop(request);
    framed
        .send(Message::Item((response, BodySize::None)))
        .await
        .map_err(io::Error::other)?;
    // Bytes the client sent right behind its request are already frames.
    let parts = framed.into_parts();
    let early = Bytes::copy_from_slice(&parts.read_buf);
    drop(parts.read_buf);
    drop(parts.write_buf);
    let (reader, writer) = parts.io.into_split();
    let reader = Rc::new(reader);
    let writer = Arc::new(writer);
    let outbound = connection.outbound.clone();
    outbound.attach(DirectSocket::new(writer.clone()));
    let codec = ws::Codec::new().max_size(app.config.gateway.max_message_size);
    let output = WebsocketContext::with_codec(connection, incoming(reader.clone(), early), codec);
    Ok(Some(Socket {
        pump: Pump {
            output: Box::pin(output),
            outbound,
            writer,
            queued: VecDeque::new(),
            queued_bytes: 0,
            ended: false,
        },
        reader,
    }))
}

impl<S> Socket<S>
where
    S: Stream<Item = Result<Bytes, actix_web::Error>>,
{
    async fn run(self) -> io::Result<()> {
        let Socket { mut pump, reader } = self;
        let result = poll_fn(|cx| pump.poll(cx)).await;
        let Pump {
            output,
            outbound,
            writer,
            ..
        } = pump;
        // The actor has stopped (its `stopped` ran); its input stream's
        // handle on the socket goes with it, and the queue lets go of the
        // socket (the actor did so already unless the socket failed first).
        drop(output);
        outbound.shut();
        drop(outbound);
        match Arc::try_unwrap(writer) {
            Ok(mut writer) => Box::pin(linger(&reader, &mut writer)).await,
            // Not expected: the FIN goes when the last holder drops it.
            Err(_) => tracing::debug!("socket still shared at close: no linger"),
        }
        result
    }
}

/// Ends the socket gently: FIN, then read (and drop) what the client still
/// sends until it closes too, for at most [`LINGER`]. Closing at once with
/// unread bytes (the client's close frame, its pongs) would send a reset,
/// and a reset makes the client's kernel discard what it has not read yet,
/// our close frame included.
async fn linger(reader: &OwnedReadHalf, writer: &mut OwnedWriteHalf) {
    let _ = writer.shutdown().await;
    let _ = tokio::time::timeout(LINGER, async {
        let mut sink = [0u8; 512];
        loop {
            if reader.readable().await.is_err() {
                return;
            }
            match reader.try_read(&mut sink) {
                Ok(0) => return,
                Ok(_) => {}
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => {}
                Err(_) => return,
            }
        }
    })
    .await;
}

/// The connection actor and the `101` answer, or why not.
fn accept(
    app: &Arc<AppState>,
    head: &RequestHead,
) -> Result<(Connection, Response<()>), Response<BoxBody>> {
    if head.uri.path() != PATH {
        return Err(Response::with_body(StatusCode::NOT_FOUND, "not found").map_into_boxed_body());
    }
    if app.health.is_draining() {
        let mut response = Response::with_body(StatusCode::SERVICE_UNAVAILABLE, "draining");
        response
            .headers_mut()
            .insert(RETRY_AFTER, HeaderValue::from_static("1"));
        return Err(response.map_into_boxed_body());
    }
    let offers: Vec<&str> = head
        .headers()
        .get_all(SEC_WEBSOCKET_PROTOCOL)
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .collect();
    let negotiated = Encoding::negotiate(offers).map_err(|error| {
        Response::with_body(StatusCode::BAD_REQUEST, error.to_string()).map_into_boxed_body()
    })?;
    let mut response = ws::handshake(head).map_err(Response::from)?;
    if let Some(encoding) = negotiated {
        response.insert_header((SEC_WEBSOCKET_PROTOCOL, encoding.subprotocol()));
    }
    let encoding = negotiated.unwrap_or(Encoding::Json);
    // Refused sockets are still upgraded: a browser cannot read an HTTP
    // error's body, but it can read a close code and a `disconnect` push.
    let connection = match app.admission.admit(std::time::Instant::now()) {
        Ok(()) => Connection::new(app.clone(), encoding),
        Err(retry_after_ms) => Connection::refused(app.clone(), encoding, retry_after_ms),
    };
    Ok((connection, response.finish().drop_body()))
}

/// Answers an upgrade request with an HTTP error; the socket closes after it.
async fn refuse(
    mut framed: Framed<TcpStream, h1::Codec>,
    response: Response<BoxBody>,
) -> io::Result<()> {
    let (head, body) = response.into_parts();
    let body = body.try_into_bytes().unwrap_or_default();
    framed
        .send(Message::Item((head, BodySize::Sized(body.len() as u64))))
        .await
        .map_err(io::Error::other)?;
    framed
        .send(Message::Chunk(Some(body)))
        .await
        .map_err(io::Error::other)?;
    framed
        .send(Message::Chunk(None))
        .await
        .map_err(io::Error::other)?;
    Ok(())
}

/// The client's bytes as the actor's frame decoder reads them: `early`
/// first, then a chunk per read, then the end (or one error, then the end).
fn incoming(
    reader: Rc<OwnedReadHalf>,
    early: Bytes,
) -> impl Stream<Item = Result<Bytes, PayloadError>> {
    let early = (!early.is_empty()).then_some(early);
    futures_util::stream::unfold((Some(reader), early), |(reader, early)| async move {
        if let Some(bytes) = early {
            return Some((Ok(bytes), (reader, None)));
        }
        let reader = reader?;
        loop {
            if let Err(error) = reader.readable().await {
                return Some((Err(PayloadError::Io(error)), (None, None)));
            }
            // Allocated only now, so a quiet connection holds none.
            let mut chunk = BytesMut::with_capacity(READ_CHUNK);
            match reader.try_read_buf(&mut chunk) {
                Ok(0) => return None,
                Ok(_) => return Some((Ok(chunk.freeze()), (Some(reader), None))),
                Err(error) if error.kind() == io::ErrorKind::WouldBlock => continue,
                Err(error) => return Some((Err(PayloadError::Io(error)), (None, None))),
            }
        }
    })
}

/// Moves the actor's output to the socket, polling the actor (which also
/// reads the client's frames) while less than [`WRITE_QUEUE_LIMIT`] is queued.
struct Pump<S> {
    output: Pin<Box<S>>,
    /// The connection's queue, told when this pump is idle (see `crate::direct`).
    outbound: Arc<Outbound>,
    /// Shared with the queue's direct writes.
    writer: Arc<OwnedWriteHalf>,
    /// Output not yet accepted by the socket, in order.
    queued: VecDeque<Bytes>,
    queued_bytes: usize,
    /// The actor has stopped: write what is queued, then finish.
    ended: bool,
}

impl<S> Pump<S>
where
    S: Stream<Item = Result<Bytes, actix_web::Error>>,
{
    fn poll(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // Before the actor runs: what a direct write left goes first.
        if let Some(rest) = self.outbound.writer_busy() {
            self.queued_bytes += rest.len();
            self.queued.push_front(rest);
        }
        let socket: &TcpStream = (*self.writer).as_ref();
        loop {
            while let Some(front) = self.queued.front_mut() {
                match socket.try_write(front) {
                    Ok(0) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                    Ok(written) => {
                        self.queued_bytes -= written;
                        if written == front.len() {
                            self.queued.pop_front();
                        } else {
                            front.advance(written);
                        }
                    }
                    Err(error) if error.kind() == io::ErrorKind::WouldBlock => {
                        match socket.poll_write_ready(cx) {
                            Poll::Ready(Ok(())) => {}
                            Poll::Ready(Err(error)) => return Poll::Ready(Err(error)),
                            // This task is woken when the socket takes more.
                            Poll::Pending => break,
                        }
                    }
                    Err(error) => return Poll::Ready(Err(error)),
                }
            }
            if self.ended {
                return if self.queued.is_empty() {
                    Poll::Ready(Ok(()))
                } else {
                    Poll::Pending
                };
            }
            if self.queued_bytes >= WRITE_QUEUE_LIMIT {
                return Poll::Pending;
            }
            match self.output.as_mut().poll_next(cx) {
                Poll::Ready(Some(Ok(bytes))) => {
                    self.queued_bytes += bytes.len();
                    self.queued.push_back(bytes);
                }
                Poll::Ready(Some(Err(error))) => {
                    tracing::debug!(%error, "websocket output failed");
                    return Poll::Ready(Err(io::Error::other(error.to_string())));
                }
                Poll::Ready(None) => self.ended = true,
                Poll::Pending => {
                    if self.queued.is_empty() {
                        self.outbound.writer_idle();
                    }
                    // Queued bytes, if any, wait on the writer's wakeup above.
                    return Poll::Pending;
                }
            }
        }
    }
}
