//! One actor per WebSocket connection: frames in, liveness, closing.
//!
//! Commands are handled in [`crate::commands`]. Everything sent to the client
//! goes through the connection's [`Outbound`] queue, which this actor drains
//! as a stream; nothing else writes to the socket.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use actix_web_actors::ws;
use bytes::BytesMut;
use rt_proto::command::Envelope;
use rt_proto::frame::{self, FrameKind};
use rt_proto::{CloseCode, Encoding, outbound};
use rt_shared::telemetry::RateLimitedLog;

use crate::hub::{ConnId, encode_frame};
use crate::metrics::CodeLabel;
use crate::outbound::{Bounds, Frame, Outbound, OutboundStream, Outgoing, Push, QueueMetrics};
use crate::state::AppState;

static PROTOCOL_ERRORS: RateLimitedLog = RateLimitedLog::new(5_000);

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Phase {
    /// Waiting for the first command, which must be `connect`.
    AwaitingConnect,
    /// `connect` is being checked by the session service.
    Authenticating,
    Connected,
    /// A close is on its way; further input is ignored.
    Closing,
}

/// Where a subscription stands; `token` tells apart a re-subscription from an
/// earlier one that was answered late.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SubSlot {
    pub token: u64,
    pub live: bool,
}

/// Who the client is, once `connect` succeeded.
#[derive(Debug, Clone, Default)]
pub struct Identity {
    /// `""` for an anonymous client.
    pub user: String,
    /// Raw MessagePack of the token's `info` claim.
    pub info: Option<bytes::Bytes>,
    pub session: String,
    /// The token's `exp` (seconds since the Unix epoch); 0: never.
    pub expires_at: u64,
    /// Private channels the token's `channels` claim opens.
    pub channels: HashSet<String>,
    /// Private channels opened by channel tokens, with their expiry (0: never).
    pub grants: HashMap<String, u64>,
}

pub struct Connection {
    pub(crate) id: ConnId,
    pub(crate) client_id: String,
    pub(crate) encoding: Encoding,
    pub(crate) app: Arc<AppState>,
    pub(crate) outbound: Arc<Outbound>,
    pub(crate) phase: Phase,
    pub(crate) subscriptions: HashMap<String, SubSlot>,
    pub(crate) next_sub_token: u64,
    pub(crate) inflight: usize,
    /// RPC calls this connection is waiting for, by request id (to cancel on close).
    pub(crate) rpcs_running: HashSet<String>,
    pub(crate) rpc_seq: u64,
    pub(crate) opened: Instant,
    pub(crate) identity: Identity,
    /// The timer that closes with 4003 when the token expires.
    pub(crate) expiry: Option<SpawnHandle>,
    /// A subscription-list report to the session service is scheduled.
    pub(crate) subs_report_scheduled: bool,
    /// Admission refused this socket: tell it when to come back, then close.
    refused_retry_after_ms: Option<u64>,
    last_seen: Instant,
    /// A fragmented message being reassembled: its kind and bytes so far.
    continuation: Option<(FrameKind, BytesMut)>,
    close_code: Option<u16>,
}

/// Asks the connection to leave: push `disconnect`, then close with `code`.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Disconnect {
    pub code: CloseCode,
    pub reason: &'static str,
    pub reconnect: bool,
    pub retry_after_ms: Option<u64>,
}

impl Connection {
    /// A connection that admission control refused: it only says 4007.
    pub fn refused(app: Arc<AppState>, encoding: Encoding, retry_after_ms: u64) -> Self {
        let mut connection = Self::new(app, encoding);
        connection.refused_retry_after_ms = Some(retry_after_ms);
        connection
    }

    pub fn new(app: Arc<AppState>, encoding: Encoding) -> Self {
        let id = app.next_conn_id();
        let config = &app.config.gateway;
        let outbound = Outbound::new(Bounds::from_config(config), QueueMetrics::new(&app.metrics));
        let now = Instant::now();
        Self {
            id,
            client_id: format!("{:016x}", fastrand::u64(..)),
            encoding,
            app,
            outbound,
            phase: Phase::AwaitingConnect,
            subscriptions: HashMap::new(),
            next_sub_token: 1,
            inflight: 0,
            rpcs_running: HashSet::new(),
            rpc_seq: 0,
            opened: now,
            identity: Identity::default(),
            expiry: None,
            subs_report_scheduled: false,
            refused_retry_after_ms: None,
            last_seen: now,
            continuation: None,
            close_code: None,
        }
    }

    /// Queues one message for the client.
    pub(crate) fn send(&mut self, message: &outbound::Out) {
        let frame = encode_frame(message, self.encoding);
        self.send_frame(frame);
    }

    pub(crate) fn send_frame(&mut self, frame: Frame) {
        if self.outbound.push(frame) == Push::Overflowed {
            self.app.metrics.slow_consumers.inc();
        }
    }

    /// Closes at once with no reply (protocol errors, oversized messages).
    pub(crate) fn fail(&mut self, code: CloseCode, reason: &str) {
        self.app.metrics.error(code.0);
        if let Some(suppressed) = PROTOCOL_ERRORS.allow() {
            tracing::info!(client = %self.client_id, code = code.0, reason, suppressed, "closing connection");
        }
        self.phase = Phase::Closing;
        self.outbound.fail(code, reason);
    }

    /// Delivers what is queued (e.g. an error reply), then closes.
    pub(crate) fn close_after_drain(&mut self, code: CloseCode, reason: &str) {
        self.phase = Phase::Closing;
        self.outbound.close_after_drain(code, reason);
    }

    fn on_data(&mut self, kind: FrameKind, payload: &[u8], ctx: &mut ws::WebsocketContext<Self>) {
        self.app.metrics.messages_in.inc();
        self.app.metrics.bytes_in.inc_by(payload.len() as u64);
        if self.phase == Phase::Closing {
            return;
        }
        let envelopes = match frame::decode(self.encoding, kind, payload)
            .map_err(|e| e.to_string())
            .and_then(|values| {
                values
                    .into_iter()
                    .map(|v| Envelope::from_value(v).map_err(|e| e.to_string()))
                    .collect::<Result<Vec<_>, _>>()
            }) {
            Ok(envelopes) => envelopes,
            Err(reason) => return self.fail(CloseCode::PROTOCOL_ERROR, &reason),
        };
        for envelope in envelopes {
            if self.phase == Phase::Closing {
                return;
            }
            self.handle_envelope(envelope, ctx);
        }
    }

    fn on_continuation(
        &mut self,
        item: actix_http::ws::Item,
        ctx: &mut ws::WebsocketContext<Self>,
    ) {
        let max = self.app.config.gateway.max_message_size;
        let (kind, chunk, last) = match item {
            actix_http::ws::Item::FirstText(b) => (Some(FrameKind::Text), b, false),
            actix_http::ws::Item::FirstBinary(b) => (Some(FrameKind::Binary), b, false),
            actix_http::ws::Item::Continue(b) => (None, b, false),
            actix_http::ws::Item::Last(b) => (None, b, true),
        };
        match (kind, self.continuation.as_mut()) {
            (Some(kind), None) => {
                let mut buf = BytesMut::with_capacity(chunk.len().min(max));
                buf.extend_from_slice(&chunk);
                self.continuation = Some((kind, buf));
            }
            (None, Some((_, buf))) => buf.extend_from_slice(&chunk),
            _ => return self.fail(CloseCode::PROTOCOL_ERROR, "unexpected continuation frame"),
        }
        if self
            .continuation
            .as_ref()
            .is_some_and(|(_, buf)| buf.len() > max)
        {
            self.continuation = None;
            return self.fail(CloseCode::MESSAGE_TOO_BIG, "message too big");
        }
        if last && let Some((kind, buf)) = self.continuation.take() {
            self.on_data(kind, &buf, ctx);
        }
    }

    fn write(&mut self, frame: Frame, ctx: &mut ws::WebsocketContext<Self>) {
        self.app.metrics.messages_out.inc();
        self.app.metrics.bytes_out.inc_by(frame.len() as u64);
        match frame {
            Frame::Binary(bytes) => ctx.binary(bytes),
            Frame::Text(text) => ctx.text(text),
        }
    }

    fn check_liveness(&mut self, ctx: &mut ws::WebsocketContext<Self>) {
        let interval = Duration::from_millis(self.app.config.gateway.ping_interval_ms);
        if self.last_seen.elapsed() >= interval * 3 {
            return self.fail(CloseCode::STALE, "no pong");
        }
        ctx.ping(b"");
    }
}

impl Actor for Connection {
    type Context = ws::WebsocketContext<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        self.app.connections.insert(self.id, ctx.address());
        self.app.metrics.connections.inc();
        self.app.metrics.connections_opened.inc();
        ctx.add_stream(OutboundStream(self.outbound.clone()));
        if let Some(retry_after_ms) = self.refused_retry_after_ms {
            self.app.metrics.admission_refused.inc();
            self.send(&outbound::push_disconnect(
                CloseCode::OVERLOADED.0,
                "overloaded",
                true,
                Some(retry_after_ms),
            ));
            self.close_after_drain(CloseCode::OVERLOADED, "overloaded");
            return;
        }
        let config = &self.app.config.gateway;
        ctx.run_later(
            Duration::from_millis(config.connect_timeout_ms),
            |conn, _| {
                if conn.phase == Phase::AwaitingConnect {
                    conn.fail(CloseCode::CONNECT_TIMEOUT, "no connect in time");
                }
            },
        );
        ctx.run_interval(
            Duration::from_millis(config.ping_interval_ms),
            |conn, ctx| {
                conn.check_liveness(ctx);
            },
        );
    }

    fn stopped(&mut self, _: &mut Self::Context) {
        self.cancel_open_rpcs();
        let code = self.close_code.unwrap_or(CloseCode::NORMAL.0);
        self.leave_everything(code);
        self.outbound.shut();
        self.app.connections.remove(self.id, &self.identity.user);
        self.app.metrics.connections.dec();
        self.app
            .metrics
            .connections_closed
            .get_or_create(&CodeLabel { code })
            .inc();
    }
}

/// Frames from the client.
impl StreamHandler<Result<ws::Message, ws::ProtocolError>> for Connection {
    fn handle(&mut self, message: Result<ws::Message, ws::ProtocolError>, ctx: &mut Self::Context) {
        self.last_seen = Instant::now();
        match message {
            Ok(ws::Message::Text(text)) => self.on_data(FrameKind::Text, text.as_bytes(), ctx),
            Ok(ws::Message::Binary(bytes)) => self.on_data(FrameKind::Binary, &bytes, ctx),
            Ok(ws::Message::Continuation(item)) => self.on_continuation(item, ctx),
            Ok(ws::Message::Ping(payload)) => ctx.pong(&payload),
            Ok(ws::Message::Pong(_) | ws::Message::Nop) => {}
            Ok(ws::Message::Close(reason)) => {
                self.close_code = Some(reason.as_ref().map_or(1005, |r| u16::from(r.code)));
                ctx.close(reason);
                ctx.stop();
            }
            Err(ws::ProtocolError::Overflow) => {
                self.fail(CloseCode::MESSAGE_TOO_BIG, "message too big")
            }
            // The peer went away without a close frame: nothing to answer.
            Err(ws::ProtocolError::Io(_)) => {
                self.close_code = Some(1006);
                ctx.stop();
            }
            Err(error) => self.fail(CloseCode::PROTOCOL_ERROR, &error.to_string()),
        }
    }
}

/// Frames to the client, from the outbound queue.
impl StreamHandler<Outgoing> for Connection {
    fn handle(&mut self, outgoing: Outgoing, ctx: &mut Self::Context) {
        match outgoing {
            Outgoing::Frame(frame) => self.write(frame, ctx),
            Outgoing::Lost {
                channel,
                token,
                frame,
            } => {
                if self.subscription_lost(&channel, token, ctx) {
                    self.write(frame, ctx);
                }
            }
            Outgoing::Close(code, reason) => {
                if code == CloseCode::SLOW_CONSUMER {
                    self.app.metrics.error(code.0);
                }
                self.close_code = Some(code.0);
                self.phase = Phase::Closing;
                ctx.close(Some(ws::CloseReason {
                    code: ws::CloseCode::Other(code.0),
                    description: Some(close_reason(reason)),
                }));
                ctx.stop();
            }
        }
    }

    fn finished(&mut self, ctx: &mut Self::Context) {
        ctx.stop();
    }
}

impl Handler<Disconnect> for Connection {
    type Result = ();

    fn handle(&mut self, msg: Disconnect, _: &mut Self::Context) {
        if self.phase == Phase::Closing {
            return;
        }
        self.send(&outbound::push_disconnect(
            msg.code.0,
            msg.reason,
            msg.reconnect,
            msg.retry_after_ms,
        ));
        self.close_after_drain(msg.code, msg.reason);
    }
}

/// A close frame's payload is at most 125 bytes, two of them the code: a
/// longer reason (an error message) is cut at a character boundary.
fn close_reason(mut reason: String) -> String {
    const MAX: usize = 123;
    if reason.len() > MAX {
        let mut end = MAX;
        while !reason.is_char_boundary(end) {
            end -= 1;
        }
        reason.truncate(end);
    }
    reason
}

#[cfg(test)]
mod tests {
    use super::close_reason;

    #[test]
    fn close_reasons_fit_a_control_frame() {
        assert_eq!(close_reason("short".into()), "short");
        let long = "é".repeat(100);
        let cut = close_reason(long);
        assert!(cut.len() <= 123 && cut.chars().all(|c| c == 'é'), "{cut}");
    }
}
