//! The typed client other services use to reach the broadcast service.
//!
//! Requests go to the partition-addressed subjects
//! (`rt.bc.p.<partition>.<op>.<channel>`, [`subject::broadcast_request`]),
//! which only the broadcast instance owning the channel's partition
//! subscribes to: with several instances each request reaches the one
//! sequencer of its channel directly, and while a partition moves between
//! instances the caller gets "no responders" (113, retry) at once.

use rt_proto::ChannelName;
use rt_proto::internal::{
    HistoryReply, HistoryRequest, PubInfo, PublishAck, PublishRequest, RecoverReply,
    RecoverRequest, StreamPosition,
};
use rt_proto::subject::{self, BroadcastOp};

use crate::bus::{Bus, BusError, PendingReply};
use crate::trace_context::TraceContext;

/// Requests to broadcast; each call sends at once, in call order, and returns
/// a reply to await.
#[derive(Clone)]
pub struct BroadcastClient {
    bus: Bus,
}

/// A request sent to broadcast, typed by its reply.
pub struct Pending<T> {
    reply: PendingReply,
    _reply_type: std::marker::PhantomData<fn() -> T>,
}

impl<T> Pending<T> {
    pub(crate) fn new(reply: PendingReply) -> Self {
        Self {
            reply,
            _reply_type: std::marker::PhantomData,
        }
    }
}

impl<T: serde::de::DeserializeOwned> Pending<T> {
    pub async fn wait(self) -> Result<T, BusError> {
        self.reply.decode::<T>().await
    }
}

impl BroadcastClient {
    pub fn new(bus: Bus) -> Self {
        Self { bus }
    }

    /// Sequences a publication; `data` is raw MessagePack.
    pub fn publish(
        &self,
        channel: &ChannelName,
        request: &PublishRequest,
        trace: Option<&TraceContext>,
    ) -> Result<Pending<PublishAck>, BusError> {
        self.send(
            subject::broadcast_request(BroadcastOp::Publish, channel),
            request,
            trace,
        )
    }

    /// Convenience for [`BroadcastClient::publish`].
    pub fn publish_data(
        &self,
        channel: &ChannelName,
        data: bytes::Bytes,
        info: Option<PubInfo>,
        idempotency_key: Option<String>,
        trace: Option<&TraceContext>,
    ) -> Result<Pending<PublishAck>, BusError> {
        self.publish(
            channel,
            &PublishRequest {
                data,
                info,
                idempotency_key,
            },
            trace,
        )
    }

    pub fn history(
        &self,
        channel: &ChannelName,
        request: &HistoryRequest,
        trace: Option<&TraceContext>,
    ) -> Result<Pending<HistoryReply>, BusError> {
        self.send(
            subject::broadcast_request(BroadcastOp::History, channel),
            request,
            trace,
        )
    }

    /// The channel's position and, with `since`, what was missed.
    pub fn recover(
        &self,
        channel: &ChannelName,
        since: Option<StreamPosition>,
        trace: Option<&TraceContext>,
    ) -> Result<Pending<RecoverReply>, BusError> {
        self.send(
            subject::broadcast_request(BroadcastOp::Recover, channel),
            &RecoverRequest { since },
            trace,
        )
    }

    fn send<Req: serde::Serialize, T>(
        &self,
        subject: String,
        request: &Req,
        trace: Option<&TraceContext>,
    ) -> Result<Pending<T>, BusError> {
        Ok(Pending {
            reply: self.bus.request_msg(subject, trace, request)?,
            _reply_type: std::marker::PhantomData,
        })
    }
}
