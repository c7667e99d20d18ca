//! The typed client gateways use to reach the session service.

use rt_proto::session::{
    self, AuthReply, AuthRequest, ChannelAuthRequest, ChannelGrant, PresenceChange, PresenceReply,
    PresenceRequest, RefreshReply, RefreshRequest, RevokeRequest, SessionEvents,
};
use rt_proto::{ChannelName, subject};

use crate::broadcast_client::Pending;
use crate::bus::{Bus, BusError};
use crate::trace_context::TraceContext;

/// An empty reply (`{}`).
#[derive(Debug, Clone, Copy, serde::Deserialize)]
pub struct Done {}

/// Requests to the session service; each call sends at once, in call order,
/// and returns a reply to await.
#[derive(Clone)]
pub struct SessionClient {
    bus: Bus,
}

impl SessionClient {
    pub fn new(bus: Bus) -> Self {
        Self { bus }
    }

    /// Who a `connect` is, and what session it resumes.
    pub fn authenticate(
        &self,
        request: &AuthRequest,
        trace: Option<&TraceContext>,
    ) -> Result<Pending<AuthReply>, BusError> {
        self.send(session::AUTH, request, trace)
    }

    /// Verifies a live connection's new token.
    pub fn refresh(
        &self,
        request: &RefreshRequest,
        trace: Option<&TraceContext>,
    ) -> Result<Pending<RefreshReply>, BusError> {
        self.send(session::REFRESH, request, trace)
    }

    /// Checks a channel token for a private channel.
    pub fn authorize(
        &self,
        request: &ChannelAuthRequest,
        trace: Option<&TraceContext>,
    ) -> Result<Pending<ChannelGrant>, BusError> {
        self.send(session::AUTHORIZE, request, trace)
    }

    /// Who is in `channel`.
    pub fn presence(
        &self,
        channel: &str,
        trace: Option<&TraceContext>,
    ) -> Result<Pending<PresenceReply>, BusError> {
        let request = PresenceRequest {
            channel: channel.to_owned(),
        };
        self.send(session::PRESENCE, &request, trace)
    }

    /// Refuses `user`'s tokens issued before `before` (seconds since the epoch).
    pub fn revoke(
        &self,
        user: &str,
        before: u64,
        trace: Option<&TraceContext>,
    ) -> Result<Pending<Done>, BusError> {
        let request = RevokeRequest {
            user: user.to_owned(),
            before,
        };
        self.send(session::REVOKE, &request, trace)
    }

    /// Reports connection events; fire and forget.
    /// Sends a batch of this node's session events; a session instance
    /// acknowledges it on receipt. `BusError::NoResponders` from the reply
    /// means no instance runs: the batch was not taken, send it again later.
    pub fn events(&self, events: &SessionEvents) -> Result<Pending<Done>, BusError> {
        self.send(session::EVENTS, events, None)
    }

    fn send<Req: serde::Serialize, T>(
        &self,
        subject: &str,
        request: &Req,
        trace: Option<&TraceContext>,
    ) -> Result<Pending<T>, BusError> {
        Ok(Pending::new(self.bus.request_msg(
            subject.to_owned(),
            trace,
            request,
        )?))
    }
}

/// Sends joins and leaves of `channel` on its delivery subject, marked with
/// the presence header, so every gateway with subscribers relays them.
pub fn publish_presence_change(
    bus: &Bus,
    channel: &ChannelName,
    change: &PresenceChange,
) -> Result<(), BusError> {
    let mut headers = async_nats::HeaderMap::new();
    headers.insert(session::EVENT_HEADER, session::EVENT_PRESENCE);
    let payload = crate::bus::encode(change)?;
    bus.publish(subject::deliver(channel), headers, payload)
}
