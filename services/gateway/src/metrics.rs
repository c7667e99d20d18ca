//! The gateway's metrics, registered in the service's registry.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use rt_shared::metrics::{MetricsRegistry, latency_histogram};

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CodeLabel {
    pub code: u16,
}

#[derive(Clone)]
pub struct GatewayMetrics {
    pub connections: Gauge,
    pub connections_opened: Counter,
    pub connections_closed: Family<CodeLabel, Counter>,
    pub subscriptions: Gauge,
    pub channels: Gauge,
    pub messages_in: Counter,
    pub messages_out: Counter,
    pub bytes_in: Counter,
    pub bytes_out: Counter,
    pub slow_consumers: Counter,
    pub errors: Family<CodeLabel, Counter>,
    /// Sequencing (`ts`) to the moment a gateway queues it for its subscribers.
    pub publish_to_deliver: Histogram,
    /// Socket accepted to `connect` answered.
    pub connect_latency: Histogram,
    /// `rpc` received to its final reply (or error) queued.
    pub rpc_latency: Histogram,
    /// Publications received with an offset gap on a channel (missed by this node).
    pub delivery_gaps: Counter,
    /// Shared by every connection's outbound queue.
    pub outbound_bytes: Gauge,
    pub admission_refused: Counter,
    pub presence_events: Counter,
    pub presence_dropped: Counter,
    pub presence_writes: Family<ResultLabel, Counter>,
    pub session_events_dropped: Counter,
    /// Batches of session events kept because no session instance ran.
    pub session_events_kept: Counter,
    pub kicked: Counter,
    pub token_expired: Counter,
    /// Publications a conflating connection skipped (a newer one of the same channel replaced them).
    pub conflated: Counter,
    /// Connections switching their `auto` subscriptions to conflation and back.
    pub conflation_switches: Family<DirectionLabel, Counter>,
    /// Times this node asked broadcast to fill a gap it missed (or may have).
    pub gap_repairs: Family<ReasonLabel, Counter>,
    /// Repairs that delivered missed publications from history.
    pub gaps_filled: Counter,
    /// Publications delivered from history by repairs.
    pub refilled_publications: Counter,
    /// Repairs that could not fill (not in history, new epoch, no answer, buffer full).
    pub gap_repairs_failed: Counter,
    /// `unsubscribed` pushes with code 112 (the subscriber must resubscribe with `since`).
    pub resubscribe_requests: Counter,
}

/// Label `direction`: `on` or `off`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DirectionLabel {
    pub direction: &'static str,
}

/// Label `reason`: what made the node check a channel (`gap`, `reconnect`, `slow_consumer`).
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: &'static str,
}

/// Label `result`: `ok` or `error`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, prometheus_client::encoding::EncodeLabelSet)]
pub struct ResultLabel {
    pub result: &'static str,
}

impl GatewayMetrics {
    pub fn new(registry: &MetricsRegistry) -> Self {
        let m = Self {
            connections: Gauge::default(),
            connections_opened: Counter::default(),
            connections_closed: Family::default(),
            subscriptions: Gauge::default(),
            channels: Gauge::default(),
            messages_in: Counter::default(),
            messages_out: Counter::default(),
            bytes_in: Counter::default(),
            bytes_out: Counter::default(),
            slow_consumers: Counter::default(),
            errors: Family::default(),
            publish_to_deliver: latency_histogram(),
            connect_latency: latency_histogram(),
            rpc_latency: latency_histogram(),
            delivery_gaps: Counter::default(),
            outbound_bytes: Gauge::default(),
            admission_refused: Counter::default(),
            presence_events: Counter::default(),
            presence_dropped: Counter::default(),
            presence_writes: Family::default(),
            session_events_dropped: Counter::default(),
            session_events_kept: Counter::default(),
            kicked: Counter::default(),
            token_expired: Counter::default(),
            conflated: Counter::default(),
            conflation_switches: Family::default(),
            gap_repairs: Family::default(),
            gaps_filled: Counter::default(),
            refilled_publications: Counter::default(),
            gap_repairs_failed: Counter::default(),
            resubscribe_requests: Counter::default(),
        };
        registry.register(
            "rt_gateway_connections",
            "Open WebSocket connections",
            m.connections.clone(),
        );
        registry.register(
            "rt_gateway_connections_opened",
            "WebSocket connections accepted",
            m.connections_opened.clone(),
        );
        registry.register(
            "rt_gateway_connections_closed",
            "WebSocket connections closed, by close code",
            m.connections_closed.clone(),
        );
        registry.register(
            "rt_gateway_subscriptions",
            "Subscriptions held by local connections",
            m.subscriptions.clone(),
        );
        registry.register(
            "rt_gateway_channels",
            "Channels with at least one local subscriber",
            m.channels.clone(),
        );
        registry.register(
            "rt_gateway_messages_in",
            "Client messages received",
            m.messages_in.clone(),
        );
        registry.register(
            "rt_gateway_messages_out",
            "WebSocket frames written to clients",
            m.messages_out.clone(),
        );
        registry.register(
            "rt_gateway_bytes_in",
            "Bytes received from clients",
            m.bytes_in.clone(),
        );
        registry.register(
            "rt_gateway_bytes_out",
            "Bytes written to clients",
            m.bytes_out.clone(),
        );
        registry.register(
            "rt_gateway_slow_consumers",
            "Connections closed with 4004 because their outbound buffer overflowed",
            m.slow_consumers.clone(),
        );
        registry.register(
            "rt_gateway_errors",
            "Error replies and protocol closes, by code",
            m.errors.clone(),
        );
        registry.register(
            "rt_gateway_publish_to_deliver_seconds",
            "From sequencing to being queued for local subscribers",
            m.publish_to_deliver.clone(),
        );
        registry.register(
            "rt_gateway_connect_seconds",
            "From socket accepted to connect answered",
            m.connect_latency.clone(),
        );
        registry.register(
            "rt_gateway_rpc_seconds",
            "From an rpc command to its final reply or error",
            m.rpc_latency.clone(),
        );
        registry.register(
            "rt_gateway_delivery_gaps",
            "Publications that arrived after an offset gap on their channel",
            m.delivery_gaps.clone(),
        );
        registry.register(
            "rt_gateway_outbound_buffered_bytes",
            "Bytes queued towards clients across all connections",
            m.outbound_bytes.clone(),
        );
        registry.register(
            "rt_gateway_admission_refused",
            "New connections refused by admission control (closed with 4007)",
            m.admission_refused.clone(),
        );
        registry.register(
            "rt_gateway_presence_events",
            "Join and leave events this node sent",
            m.presence_events.clone(),
        );
        registry.register(
            "rt_gateway_presence_dropped",
            "Join/leave batches shed because the NATS lane was full",
            m.presence_dropped.clone(),
        );
        registry.register(
            "rt_gateway_presence_writes",
            "Presence slices written to NATS KV, by result",
            m.presence_writes.clone(),
        );
        registry.register(
            "rt_gateway_session_events_dropped",
            "Session events (subscription lists, closes) dropped on overflow",
            m.session_events_dropped.clone(),
        );
        registry.register(
            "rt_gateway_session_events_kept",
            "Batches of session events kept for later because no session instance answered",
            m.session_events_kept.clone(),
        );
        registry.register(
            "rt_gateway_kicked",
            "Connections closed by /api/disconnect (4008)",
            m.kicked.clone(),
        );
        registry.register(
            "rt_gateway_token_expired",
            "Connections closed because their token expired (4003)",
            m.token_expired.clone(),
        );
        registry.register(
            "rt_gateway_conflated",
            "Publications skipped for a conflating client (a newer one of the channel replaced them)",
            m.conflated.clone(),
        );
        registry.register(
            "rt_gateway_conflation_switches",
            "Connections switching their auto-policy subscriptions to conflation (on) and back (off)",
            m.conflation_switches.clone(),
        );
        registry.register(
            "rt_gateway_gap_repairs",
            "Requests to broadcast for publications this node missed or may have missed, by reason",
            m.gap_repairs.clone(),
        );
        registry.register(
            "rt_gateway_gaps_filled",
            "Gaps this node filled from history before delivering newer publications",
            m.gaps_filled.clone(),
        );
        registry.register(
            "rt_gateway_refilled_publications",
            "Publications delivered from history to fill gaps",
            m.refilled_publications.clone(),
        );
        registry.register(
            "rt_gateway_gap_repairs_failed",
            "Gap repairs that could not fill (outside history, new epoch, no answer, buffer full)",
            m.gap_repairs_failed.clone(),
        );
        registry.register(
            "rt_gateway_resubscribe_requests",
            "Subscriptions ended with an unsubscribed push, code 112 (resubscribe with since)",
            m.resubscribe_requests.clone(),
        );
        m
    }

    pub fn error(&self, code: u16) {
        self.errors.get_or_create(&CodeLabel { code }).inc();
    }
}
