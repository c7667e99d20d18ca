//! What each client command does. The mapping from failures to error codes
//! and closes lives here (and in [`crate::errors`]), nowhere else.

use std::borrow::Cow;
use std::time::Duration;

use actix::prelude::*;
use actix_web_actors::ws;
use rt_proto::command::{Command, Envelope, SubRequest};
use rt_proto::internal::{HistoryRequest, PubInfo, RecoverReply, StreamPosition};
use rt_proto::outbound::{self, ErrorBody, Out};
use rt_proto::{ChannelName, CloseCode, ErrorCode};
use rt_shared::BusError;
use rt_shared::broadcast_client::Pending;
use rt_shared::config::SlowConsumerPolicy;
use rt_shared::telemetry::current_context;

use crate::connection::{Connection, Phase, SubSlot};
use crate::errors::bus_error;
use crate::hub::{HubError, encode_frame};

type Ctx = ws::WebsocketContext<Connection>;

/// A subscription's outcome, tagged with its token: the SubResult, or why it failed.
type SubOutcome = Result<(u64, Subscribed), (u64, ErrorBody)>;

/// What a subscribe produced: the SubResult to send and the position it covers.
struct Subscribed {
    result: Out,
    covered: StreamPosition,
}

impl Connection {
    pub(crate) fn handle_envelope(&mut self, envelope: Envelope, ctx: &mut Ctx) {
        let id = envelope.id;
        if self.phase == Phase::AwaitingConnect && envelope.op.as_deref() != Some("connect") {
            return self.fail(
                CloseCode::PROTOCOL_ERROR,
                "the first command must be connect",
            );
        }
        if self.phase == Phase::Authenticating {
            return self.reply_error(
                id,
                &ErrorBody::new(
                    ErrorCode::BAD_REQUEST,
                    "wait for the connect reply before sending commands",
                ),
            );
        }
        let command = match Command::parse(&envelope, self.encoding) {
            Ok(command) => command,
            Err(error) => {
                let body = ErrorBody::new(error.code, error.message);
                return if self.phase == Phase::AwaitingConnect {
                    self.refuse_connect(id, &body)
                } else {
                    self.reply_error(id, &body)
                };
            }
        };
        // A span for each command that crosses to another service: its
        // context rides in the NATS headers, so the whole action is one trace.
        let span = match &command {
            Command::Connect(_)
            | Command::Subscribe { .. }
            | Command::Presence { .. }
            | Command::Refresh { .. }
            | Command::Publish { .. }
            | Command::History { .. }
            | Command::Rpc { .. } => tracing::info_span!(
                "gateway.command",
                op = envelope.op.as_deref().unwrap_or_default(),
                client = %self.client_id
            ),
            _ => tracing::Span::none(),
        };
        let _entered = span.enter();
        match command {
            Command::Connect(args) => self.connect(id, args, ctx),
            Command::Subscribe {
                channel,
                since,
                token,
            } => self.subscribe(id, channel, since, token, ctx),
            Command::Unsubscribe { channel } => self.unsubscribe(id, &channel, ctx),
            Command::Publish {
                channel,
                data,
                idempotency_key,
            } => self.publish(id, channel, data, idempotency_key, ctx),
            Command::History {
                channel,
                limit,
                since,
                reverse,
            } => self.history(id, channel, limit, since, reverse, ctx),
            Command::Ping => self.reply_ok(id, Out::Map(Vec::new())),
            Command::Presence { channel } => self.presence(id, &channel, ctx),
            Command::Rpc {
                method,
                data,
                timeout_ms,
            } => self.rpc(id, &method, data, timeout_ms, ctx),
            Command::Refresh { token } => self.refresh(id, token, ctx),
        }
    }

    pub(crate) fn reply_ok(&mut self, id: u32, result: Out) {
        if id != 0 {
            self.send(&outbound::reply_ok(id, result));
        }
    }

    pub(crate) fn reply_error(&mut self, id: u32, error: &ErrorBody) {
        self.app.metrics.error(error.code.0);
        if id != 0 {
            self.send(&outbound::reply_error(id, error));
        }
    }

    /// A failed first `connect`: the error reply, then the close §6 prescribes.
    pub(crate) fn refuse_connect(&mut self, id: u32, error: &ErrorBody) {
        self.reply_error(id, error);
        self.close_after_drain(CloseCode::after_failed_connect(error.code), &error.message);
    }

    pub(crate) fn user(&self) -> &str {
        &self.identity.user
    }

    /// Checks a channel name and its namespace for a client operation:
    /// anonymous access, private channels, client publishing.
    pub(crate) fn channel_for(&self, name: &str, publish: bool) -> Result<ChannelName, ErrorBody> {
        let channel = ChannelName::parse(name).map_err(|e| {
            ErrorBody::new(ErrorCode::BAD_REQUEST, format!("channel {name:?}: {e}"))
        })?;
        let namespace = self.app.config.namespace(&channel).ok_or_else(|| {
            ErrorBody::new(
                ErrorCode::UNKNOWN_CHANNEL,
                format!("unknown namespace of {name:?}"),
            )
        })?;
        if self.user().is_empty() && !namespace.allow_anonymous {
            return Err(ErrorBody::new(
                ErrorCode::PERMISSION_DENIED,
                "anonymous clients may not use this namespace",
            ));
        }
        if namespace.private && !self.may_access_private(name) {
            return Err(ErrorBody::new(
                ErrorCode::PERMISSION_DENIED,
                "a private channel: it needs the token's channels claim or a channel token",
            ));
        }
        if publish && !namespace.client_publish {
            return Err(ErrorBody::new(
                ErrorCode::PERMISSION_DENIED,
                "clients may not publish in this namespace",
            ));
        }
        Ok(channel)
    }

    /// Reserves a slot for a command that waits on another service.
    pub(crate) fn begin_inflight(&mut self, id: u32) -> bool {
        if self.inflight >= self.app.config.gateway.max_inflight_per_connection {
            self.reply_error(
                id,
                &ErrorBody::new(ErrorCode::TOO_MANY_REQUESTS, "too many commands in flight")
                    .with_retry_after(100),
            );
            return false;
        }
        self.inflight += 1;
        true
    }

    /// Subscribes every `subs` entry, then answers `connect` with all results
    /// at once; live publications wait in the hub until after that reply.
    pub(crate) fn connect_with_subs(
        &mut self,
        id: u32,
        result: Out,
        subs: Vec<(String, SubRequest)>,
        ctx: &mut Ctx,
    ) {
        let mut waits = Vec::new();
        let mut entries: Vec<(Cow<'static, str>, Option<Out>)> = Vec::new();
        for (name, request) in subs {
            let outcome = match request {
                SubRequest::Invalid(error) => Err(ErrorBody::new(error.code, error.message)),
                SubRequest::Valid { since } => self.start_subscription(&name, since),
            };
            match outcome {
                Ok(wait) => {
                    waits.push((name.clone(), wait));
                    entries.push((Cow::Owned(name), None));
                }
                Err(error) => entries.push((
                    Cow::Owned(name),
                    Some(Out::map([("error", error.to_out())])),
                )),
            }
        }
        self.inflight += 1;
        let fut = futures_util::future::join_all(
            waits
                .into_iter()
                .map(|(name, wait)| async move { (name, wait.await) }),
        );
        ctx.spawn(fut.into_actor(self).map(move |outcomes, conn, ctx| {
            conn.inflight -= 1;
            let mut live = Vec::new();
            for (name, outcome) in outcomes {
                let value = match outcome {
                    Ok((token, subscribed)) => {
                        live.push((name.clone(), token, subscribed.covered));
                        subscribed.result
                    }
                    Err((token, error)) => {
                        conn.drop_subscription(&name, token);
                        Out::map([("error", error.to_out())])
                    }
                };
                if let Some(slot) = entries.iter_mut().find(|(n, v)| *n == name && v.is_none()) {
                    slot.1 = Some(value);
                }
            }
            let subs = Out::Map(
                entries
                    .into_iter()
                    .map(|(n, v)| (n, v.unwrap_or(Out::Nil)))
                    .collect(),
            );
            conn.reply_ok(id, result.with("subs", subs));
            conn.app
                .metrics
                .connect_latency
                .observe(conn.opened.elapsed().as_secs_f64());
            for (name, token, covered) in live {
                conn.activate(&name, token, None, covered, ctx);
            }
        }));
    }

    fn subscribe(
        &mut self,
        id: u32,
        name: String,
        since: Option<StreamPosition>,
        token: Option<String>,
        ctx: &mut Ctx,
    ) {
        if let Some(token) = token
            && self.needs_channel_token(&name)
        {
            return self.authorize_then_subscribe(id, name, since, token, ctx);
        }
        self.subscribe_authorized(id, name, since, ctx);
    }

    /// `subscribe` once any channel token has been checked.
    pub(crate) fn subscribe_authorized(
        &mut self,
        id: u32,
        name: String,
        since: Option<StreamPosition>,
        ctx: &mut Ctx,
    ) {
        if !self.begin_inflight(id) {
            return;
        }
        let wait = match self.start_subscription(&name, since) {
            Ok(wait) => wait,
            Err(error) => {
                self.inflight -= 1;
                return self.reply_error(id, &error);
            }
        };
        ctx.spawn(wait.into_actor(self).map(move |outcome, conn, ctx| {
            conn.inflight -= 1;
            match outcome {
                Ok((token, subscribed)) => {
                    let reply = (id != 0).then(|| {
                        encode_frame(&outbound::reply_ok(id, subscribed.result), conn.encoding)
                    });
                    if !conn.activate(&name, token, reply, subscribed.covered, ctx) && id != 0 {
                        conn.reply_error(
                            id,
                            &ErrorBody::new(
                                ErrorCode::BAD_REQUEST,
                                "unsubscribed before the subscription completed",
                            ),
                        );
                    }
                }
                Err((token, error)) => {
                    conn.drop_subscription(&name, token);
                    conn.reply_error(id, &error);
                }
            }
        }));
    }

    /// Validates, registers a pending subscriber and returns the future that
    /// asks broadcast for the position (after this node's NATS subscription is up).
    fn start_subscription(
        &mut self,
        name: &str,
        since: Option<StreamPosition>,
    ) -> Result<impl Future<Output = SubOutcome> + 'static, ErrorBody> {
        let channel = self.channel_for(name, false)?;
        if self.subscriptions.contains_key(name) {
            return Err(ErrorBody::new(
                ErrorCode::ALREADY_SUBSCRIBED,
                "already subscribed",
            ));
        }
        if self.subscriptions.len() >= self.app.config.gateway.max_subscriptions_per_connection {
            return Err(ErrorBody::new(
                ErrorCode::LIMIT_EXCEEDED,
                "too many subscriptions on this connection",
            ));
        }
        if !self.app.hub.has_channel(&channel)
            && self.app.hub.channel_count() >= self.app.config.gateway.max_channels
        {
            return Err(ErrorBody::new(
                ErrorCode::LIMIT_EXCEEDED,
                "this node holds as many channels as it may",
            ));
        }
        let token = self.next_sub_token;
        let policy = self
            .app
            .config
            .namespace(&channel)
            .map_or(SlowConsumerPolicy::Disconnect, |ns| ns.slow_consumer);
        let ready = self
            .app
            .hub
            .add_pending(
                &channel,
                self.id,
                self.outbound.clone(),
                self.encoding,
                token,
                policy,
            )
            .map_err(|e| match e {
                HubError::AlreadySubscribed => {
                    ErrorBody::new(ErrorCode::ALREADY_SUBSCRIBED, "already subscribed")
                }
                HubError::Gone => ErrorBody::new(ErrorCode::INTERNAL, "internal error"),
            })?;
        self.next_sub_token += 1;
        self.subscriptions
            .insert(name.to_owned(), SubSlot { token, live: false });
        let broadcast = self.app.broadcast.clone();
        let timeout = Duration::from_millis(self.app.config.nats.request_timeout_ms);
        let with_pubs = since.is_some();
        let trace = current_context();
        Ok(async move {
            match tokio::time::timeout(timeout, ready).await {
                Ok(Ok(())) => {}
                _ => {
                    return Err((
                        token,
                        ErrorBody::new(ErrorCode::INTERNAL, "channel subscription failed"),
                    ));
                }
            }
            let pending = broadcast
                .recover(&channel, since, trace.as_ref())
                .map_err(|e| (token, bus_error(&e)))?;
            let reply = pending.wait().await.map_err(|e| (token, bus_error(&e)))?;
            Ok((token, sub_result(reply, with_pubs)))
        })
    }

    /// Makes a subscription live, queueing `reply` first. False when it was
    /// dropped meanwhile (unsubscribed, or replaced by a newer subscribe).
    fn activate(
        &mut self,
        name: &str,
        token: u64,
        reply: Option<crate::outbound::Frame>,
        covered: StreamPosition,
        ctx: &mut Ctx,
    ) -> bool {
        let Some(slot) = self.subscriptions.get_mut(name) else {
            return false;
        };
        if slot.token != token {
            return false;
        }
        slot.live = true;
        let Ok(channel) = ChannelName::parse(name) else {
            return false;
        };
        match self.app.hub.activate(&channel, self.id, reply, covered) {
            Ok(()) => {
                self.joined(&channel, ctx);
                true
            }
            Err(_) => {
                self.subscriptions.remove(name);
                false
            }
        }
    }

    /// The hub ended subscription `token`: forget it, unless it was
    /// replaced meanwhile. True when its `unsubscribed` push is to be
    /// written: not when the client unsubscribed (or subscribed again)
    /// before the push got here, which can happen when it was handed over
    /// from another worker thread.
    pub(crate) fn subscription_lost(&mut self, name: &str, token: u64, ctx: &mut Ctx) -> bool {
        if self
            .subscriptions
            .get(name)
            .is_none_or(|s| s.token != token)
        {
            return false;
        }
        if let Some(slot) = self.subscriptions.remove(name)
            && slot.live
        {
            self.left(name, ctx);
        }
        true
    }

    fn drop_subscription(&mut self, name: &str, token: u64) {
        if self
            .subscriptions
            .get(name)
            .is_some_and(|s| s.token == token)
        {
            self.subscriptions.remove(name);
            self.app.hub.remove(name, self.id);
        }
    }

    fn unsubscribe(&mut self, id: u32, name: &str, ctx: &mut Ctx) {
        if let Some(slot) = self.subscriptions.remove(name) {
            self.app.hub.remove(name, self.id);
            if slot.live {
                self.left(name, ctx);
            }
        }
        self.reply_ok(id, Out::Map(Vec::new()));
    }

    fn publish(
        &mut self,
        id: u32,
        name: String,
        data: bytes::Bytes,
        idempotency_key: Option<String>,
        ctx: &mut Ctx,
    ) {
        let channel = match self.channel_for(&name, true) {
            Ok(channel) => channel,
            Err(error) => return self.reply_error(id, &error),
        };
        if !self.begin_inflight(id) {
            return;
        }
        let info = PubInfo {
            user: self.user().to_owned(),
            client: self.client_id.clone(),
            info: self.identity.info.clone(),
        };
        let trace = current_context();
        let sent = self.app.broadcast.publish_data(
            &channel,
            data,
            Some(info),
            idempotency_key,
            trace.as_ref(),
        );
        self.forward(id, sent, ctx, |ack| {
            Out::map([
                ("offset", Out::UInt(ack.offset)),
                ("epoch", Out::str(ack.epoch)),
            ])
        });
    }

    fn history(
        &mut self,
        id: u32,
        name: String,
        limit: Option<u64>,
        since: Option<StreamPosition>,
        reverse: bool,
        ctx: &mut Ctx,
    ) {
        let channel = match self.channel_for(&name, false) {
            Ok(channel) => channel,
            Err(error) => return self.reply_error(id, &error),
        };
        if !self.begin_inflight(id) {
            return;
        }
        let max = u64::from(self.app.config.broadcast.history_max_limit);
        let request = HistoryRequest {
            limit: u32::try_from(limit.unwrap_or(100).min(max)).unwrap_or(u32::MAX),
            since,
            reverse,
        };
        let trace = current_context();
        let sent = self
            .app
            .broadcast
            .history(&channel, &request, trace.as_ref());
        self.forward(id, sent, ctx, |reply| {
            Out::map([
                (
                    "pubs",
                    Out::Array(reply.pubs.iter().map(outbound::publication).collect()),
                ),
                ("offset", Out::UInt(reply.offset)),
                ("epoch", Out::str(reply.epoch)),
            ])
        });
    }

    /// Awaits a request sent to another service and replies with `to_result`
    /// of its answer, or the mapped error. The caller has taken an in-flight slot.
    fn forward<T: serde::de::DeserializeOwned + 'static>(
        &mut self,
        id: u32,
        sent: Result<Pending<T>, BusError>,
        ctx: &mut Ctx,
        to_result: impl FnOnce(T) -> Out + 'static,
    ) {
        let pending = match sent {
            Ok(pending) => pending,
            Err(error) => {
                self.inflight -= 1;
                return self.reply_error(id, &bus_error(&error));
            }
        };
        let reply = tracing::Instrument::instrument(pending.wait(), tracing::Span::current());
        ctx.spawn(reply.into_actor(self).map(move |result, conn, _| {
            conn.inflight -= 1;
            match result {
                Ok(answer) => conn.reply_ok(id, to_result(answer)),
                Err(error) => conn.reply_error(id, &bus_error(&error)),
            }
        }));
    }
}

/// A SubResult: `offset`, `epoch`, `recovered`, and `pubs` when `since` was given.
fn sub_result(reply: RecoverReply, with_pubs: bool) -> Subscribed {
    let covered = StreamPosition {
        offset: reply.offset,
        epoch: reply.epoch.clone(),
    };
    let mut result = Out::map([
        ("offset", Out::UInt(reply.offset)),
        ("epoch", Out::str(reply.epoch)),
        ("recovered", Out::Bool(reply.recovered)),
    ]);
    if with_pubs {
        result = result.with(
            "pubs",
            Out::Array(reply.pubs.iter().map(outbound::publication).collect()),
        );
    }
    Subscribed { result, covered }
}
