//! Who a connection is and what that lets it do: `connect` through the
//! session service, token expiry and `refresh`, private channels, presence,
//! and what the session service is told about the connection's life.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use actix::prelude::*;
use actix_web_actors::ws;
use rt_proto::command::{ConnectArgs, SubRequest};
use rt_proto::internal::StreamPosition;
use rt_proto::outbound::{self, ErrorBody, Out};
use rt_proto::session::{
    AuthReply, AuthRequest, ChannelAuthRequest, PresentClient, RefreshRequest, SessionEvent,
};
use rt_proto::{ChannelName, CloseCode, ErrorCode};
use rt_shared::BusError;
use rt_shared::telemetry::{RateLimitedLog, current_context, now_ms};

use crate::connection::{Connection, Identity, Phase};
use crate::errors::bus_error;
use crate::presence::Tracking;

type Ctx = ws::WebsocketContext<Connection>;

static DEGRADED: RateLimitedLog = RateLimitedLog::new(10_000);

/// How long a changed subscription list waits before it is reported, so a
/// burst of subscribes becomes one report.
const SUBS_REPORT_DELAY: Duration = Duration::from_millis(500);

impl Connection {
    pub(crate) fn connect(&mut self, id: u32, args: ConnectArgs, ctx: &mut Ctx) {
        if self.phase != Phase::AwaitingConnect {
            return self.reply_error(
                id,
                &ErrorBody::new(ErrorCode::BAD_REQUEST, "already connected"),
            );
        }
        let allow_anonymous = self.app.config.gateway.allow_anonymous;
        if args.token.is_none() && !allow_anonymous {
            return self.refuse_connect(
                id,
                &ErrorBody::new(
                    ErrorCode::UNAUTHORIZED,
                    "anonymous connections are not allowed",
                ),
            );
        }
        let request = AuthRequest {
            token: args.token.clone(),
            session: args.session.clone(),
            client: self.client_id.clone(),
            node: self.app.node.clone(),
            allow_anonymous,
        };
        let trace = current_context();
        let sent = self.app.session.authenticate(&request, trace.as_ref());
        self.phase = Phase::Authenticating;
        let anonymous = args.token.is_none();
        // The answer travels back as a message rather than a future of this
        // actor: if the socket is gone by then, the message's guard still
        // tells the session service, or the user's connection count would
        // keep a connection that never was.
        let addr = ctx.address();
        let app = self.app.clone();
        let client = self.client_id.clone();
        let subs = args.subs;
        let wait = async move {
            let result = match sent {
                Ok(pending) => pending.wait().await,
                Err(error) => Err(error),
            };
            let release = result.as_ref().ok().map(|reply| ReleaseIfUnused {
                app,
                session: reply.session.clone(),
                user: reply.user.clone(),
                client,
            });
            addr.do_send(Authenticated {
                id,
                result,
                subs,
                anonymous,
                release,
            });
        };
        actix_rt::spawn(tracing::Instrument::instrument(
            wait,
            tracing::Span::current(),
        ));
    }

    fn authenticated(&mut self, done: Authenticated, ctx: &mut Ctx) {
        let Authenticated {
            id,
            result,
            subs,
            anonymous,
            mut release,
        } = done;
        if self.phase != Phase::Authenticating {
            // Closing already: `release` reports the session as closed.
            return;
        }
        if let Some(release) = release.as_mut() {
            release.session.clear();
        }
        self.phase = Phase::AwaitingConnect;
        match result {
            Ok(reply) => self.connected(id, reply, subs, ctx),
            // Without a session service anonymous clients still get in,
            // with a session that cannot be resumed: degrade, not refuse.
            Err(BusError::NoResponders) if anonymous => {
                if let Some(suppressed) = DEGRADED.allow() {
                    tracing::warn!(
                        suppressed,
                        "no session service answers: anonymous connect without a resumable session"
                    );
                }
                let reply = AuthReply {
                    user: String::new(),
                    info: None,
                    expires_at: 0,
                    channels: Vec::new(),
                    session: self.client_id.clone(),
                    resumed: false,
                    restore: Vec::new(),
                    grants: Vec::new(),
                };
                self.connected(id, reply, subs, ctx);
            }
            Err(error) => self.refuse_connect(id, &bus_error(&error)),
        }
    }

    fn connected(
        &mut self,
        id: u32,
        reply: AuthReply,
        mut subs: Vec<(String, SubRequest)>,
        ctx: &mut Ctx,
    ) {
        self.identity = Identity {
            user: reply.user,
            info: reply.info,
            session: reply.session,
            expires_at: reply.expires_at,
            channels: reply.channels.into_iter().collect::<HashSet<_>>(),
            grants: reply
                .grants
                .into_iter()
                .map(|g| (g.channel, g.expires_at))
                .collect::<HashMap<_, _>>(),
        };
        self.phase = Phase::Connected;
        self.app.connections.set_user(self.id, &self.identity.user);
        self.schedule_expiry(ctx);
        // A resumed session's channels come back even when the client did
        // not list them; its own positions win where it did.
        for channel in reply.restore {
            if !subs.iter().any(|(name, _)| *name == channel) {
                subs.push((channel, SubRequest::Valid { since: None }));
            }
        }
        let config = &self.app.config.gateway;
        let result = Out::map([
            ("client", Out::str(self.client_id.clone())),
            ("session", Out::str(self.identity.session.clone())),
            ("user", Out::str(self.identity.user.clone())),
            ("ping_ms", Out::UInt(config.ping_interval_ms)),
            ("node", Out::str(self.app.node.clone())),
            ("resumed", Out::Bool(reply.resumed)),
        ]);
        if subs.is_empty() {
            self.reply_ok(id, result);
            self.app
                .metrics
                .connect_latency
                .observe(self.opened.elapsed().as_secs_f64());
            return;
        }
        self.connect_with_subs(id, result, subs, ctx);
    }

    /// Closes with 4003 when the token expires, unless `refresh` moves it.
    /// "Expires" means what it means at `connect`: at `exp` plus
    /// `session.jwt_leeway_secs`, the clock skew the session service
    /// tolerates. Closing at `exp` itself would cut a connection that the
    /// same token has just been allowed to open.
    pub(crate) fn schedule_expiry(&mut self, ctx: &mut Ctx) {
        if let Some(handle) = self.expiry.take() {
            ctx.cancel_future(handle);
        }
        if self.identity.expires_at == 0 {
            return;
        }
        let delay_ms = self
            .expires_at_ms(self.identity.expires_at)
            .saturating_sub(now_ms());
        self.expiry = Some(ctx.run_later(Duration::from_millis(delay_ms), |conn, _| {
            conn.expiry = None;
            if conn.phase != Phase::Connected {
                return;
            }
            conn.app.metrics.token_expired.inc();
            conn.send(&outbound::push_disconnect(
                CloseCode::TOKEN_EXPIRED.0,
                "token expired",
                true,
                None,
            ));
            conn.close_after_drain(CloseCode::TOKEN_EXPIRED, "token expired");
        }));
    }

    pub(crate) fn refresh(&mut self, id: u32, token: String, ctx: &mut Ctx) {
        if !self.begin_inflight(id) {
            return;
        }
        let request = RefreshRequest {
            token,
            user: self.identity.user.clone(),
            client: self.client_id.clone(),
        };
        let trace = current_context();
        let sent = self.app.session.refresh(&request, trace.as_ref());
        let reply = async move { sent?.wait().await };
        ctx.spawn(reply.into_actor(self).map(move |result, conn, ctx| {
            conn.inflight -= 1;
            match result {
                Ok(reply) => {
                    conn.identity.expires_at = reply.expires_at;
                    conn.identity.channels = reply.channels.into_iter().collect();
                    if reply.info.is_some() {
                        conn.identity.info = reply.info;
                    }
                    conn.schedule_expiry(ctx);
                    conn.reply_ok(id, Out::map([("expires_at", Out::UInt(reply.expires_at))]));
                }
                Err(error) => conn.reply_error(id, &bus_error(&error)),
            }
        }));
    }

    /// When a token with `exp` stops being valid, in ms since the epoch:
    /// `exp` plus the leeway, the rule the session service verifies with.
    fn expires_at_ms(&self, exp: u64) -> u64 {
        exp.saturating_add(self.app.config.session.jwt_leeway_secs)
            .saturating_mul(1000)
    }

    /// Whether a private channel is open to this connection without a channel token.
    pub(crate) fn may_access_private(&self, name: &str) -> bool {
        if self.identity.channels.contains(name) {
            return true;
        }
        self.identity
            .grants
            .get(name)
            .is_some_and(|&expires_at| expires_at == 0 || self.expires_at_ms(expires_at) > now_ms())
    }

    /// A `subscribe` with a channel token that the channel needs.
    pub(crate) fn needs_channel_token(&self, name: &str) -> bool {
        let Ok(channel) = ChannelName::parse(name) else {
            return false;
        };
        self.app
            .config
            .namespace(&channel)
            .is_some_and(|ns| ns.private)
            && !self.may_access_private(name)
    }

    /// Checks a channel token with the session service, then subscribes.
    pub(crate) fn authorize_then_subscribe(
        &mut self,
        id: u32,
        name: String,
        since: Option<StreamPosition>,
        token: String,
        ctx: &mut Ctx,
    ) {
        if !self.begin_inflight(id) {
            return;
        }
        let request = ChannelAuthRequest {
            channel: name.clone(),
            token,
            user: self.identity.user.clone(),
            client: self.client_id.clone(),
            session: self.identity.session.clone(),
        };
        let trace = current_context();
        let sent = self.app.session.authorize(&request, trace.as_ref());
        let reply = async move { sent?.wait().await };
        ctx.spawn(reply.into_actor(self).map(move |result, conn, ctx| {
            conn.inflight -= 1;
            match result {
                Ok(grant) => {
                    conn.identity.grants.insert(grant.channel, grant.expires_at);
                    conn.subscribe_authorized(id, name, since, ctx);
                }
                Err(error) => conn.reply_error(id, &bus_error(&error)),
            }
        }));
    }

    pub(crate) fn presence(&mut self, id: u32, name: &str, ctx: &mut Ctx) {
        let channel = match self.channel_for(name, false) {
            Ok(channel) => channel,
            Err(error) => return self.reply_error(id, &error),
        };
        if !self.tracking(&channel).presence {
            return self.reply_error(
                id,
                &ErrorBody::new(
                    ErrorCode::NOT_AVAILABLE,
                    "presence is not enabled in this namespace",
                ),
            );
        }
        if !self.begin_inflight(id) {
            return;
        }
        let trace = current_context();
        let sent = self.app.session.presence(channel.as_str(), trace.as_ref());
        let reply = async move { sent?.wait().await };
        ctx.spawn(reply.into_actor(self).map(move |result, conn, _| {
            conn.inflight -= 1;
            match result {
                Ok(reply) => conn.reply_ok(id, outbound::presence(&reply)),
                Err(error) => conn.reply_error(id, &bus_error(&error)),
            }
        }));
    }

    pub(crate) fn tracking(&self, channel: &ChannelName) -> Tracking {
        match self.app.config.namespace(channel) {
            Some(ns) => Tracking {
                presence: ns.presence,
                join_leave: ns.join_leave,
            },
            None => Tracking {
                presence: false,
                join_leave: false,
            },
        }
    }

    fn present_client(&self) -> PresentClient {
        PresentClient {
            client: self.client_id.clone(),
            user: self.identity.user.clone(),
            info: self.identity.info.clone(),
        }
    }

    /// A subscription went live.
    pub(crate) fn joined(&mut self, channel: &ChannelName, ctx: &mut Ctx) {
        let tracking = self.tracking(channel);
        self.app
            .presence
            .join(channel, tracking, self.present_client());
        self.schedule_subs_report(ctx);
    }

    /// A live subscription ended.
    pub(crate) fn left(&mut self, name: &str, ctx: &mut Ctx) {
        if let Ok(channel) = ChannelName::parse(name) {
            let tracking = self.tracking(&channel);
            self.app
                .presence
                .leave(&channel, tracking, self.present_client());
        }
        self.schedule_subs_report(ctx);
    }

    fn schedule_subs_report(&mut self, ctx: &mut Ctx) {
        if self.subs_report_scheduled || self.identity.session.is_empty() {
            return;
        }
        self.subs_report_scheduled = true;
        ctx.run_later(SUBS_REPORT_DELAY, |conn, _| {
            conn.subs_report_scheduled = false;
            if conn.phase != Phase::Connected {
                return;
            }
            let event = SessionEvent::Subs {
                session: conn.identity.session.clone(),
                subs: conn.live_channels(),
                at_ms: now_ms(),
            };
            conn.report(event);
        });
    }

    fn live_channels(&self) -> Vec<String> {
        let mut channels: Vec<String> = self
            .subscriptions
            .iter()
            .filter(|(_, slot)| slot.live)
            .map(|(name, _)| name.clone())
            .collect();
        channels.sort_unstable();
        channels
    }

    fn report(&self, event: SessionEvent) {
        let dropped = self.app.reporter.report(event);
        if dropped > 0 {
            self.app.metrics.session_events_dropped.inc_by(dropped);
        }
    }

    /// The connection is gone: out of presence and the hub, and the session
    /// service told (which keeps the session resumable from now on).
    pub(crate) fn leave_everything(&mut self, code: u16) {
        let subs = self.live_channels();
        let client = self.present_client();
        let subscriptions: Vec<_> = self.subscriptions.drain().collect();
        for (name, slot) in subscriptions {
            self.app.hub.remove(&name, self.id);
            if slot.live
                && let Ok(channel) = ChannelName::parse(&name)
            {
                let tracking = self.tracking(&channel);
                self.app.presence.leave(&channel, tracking, client.clone());
            }
        }
        if self.phase == Phase::Connected || !self.identity.session.is_empty() {
            let event = SessionEvent::Closed {
                session: self.identity.session.clone(),
                client: self.client_id.clone(),
                user: self.identity.user.clone(),
                code,
                subs,
                at_ms: now_ms(),
            };
            self.report(event);
        }
    }
}

/// The session service's answer to a `connect`.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Authenticated {
    id: u32,
    result: Result<AuthReply, BusError>,
    subs: Vec<(String, SubRequest)>,
    anonymous: bool,
    release: Option<ReleaseIfUnused>,
}

impl Handler<Authenticated> for Connection {
    type Result = ();

    fn handle(&mut self, done: Authenticated, ctx: &mut Self::Context) {
        self.authenticated(done, ctx);
    }
}

/// A session the service opened for a socket that is gone before it could
/// use it: unless disarmed (by clearing `session`), dropping it reports the
/// session closed, which releases the user's connection slot.
struct ReleaseIfUnused {
    app: std::sync::Arc<crate::state::AppState>,
    session: String,
    user: String,
    client: String,
}

impl Drop for ReleaseIfUnused {
    fn drop(&mut self) {
        if self.session.is_empty() {
            return;
        }
        let event = SessionEvent::Closed {
            session: std::mem::take(&mut self.session),
            client: std::mem::take(&mut self.client),
            user: std::mem::take(&mut self.user),
            code: 1006,
            subs: Vec::new(),
            at_ms: now_ms(),
        };
        let dropped = self.app.reporter.report(event);
        if dropped > 0 {
            self.app.metrics.session_events_dropped.inc_by(dropped);
        }
    }
}
