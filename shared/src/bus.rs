//! The typed NATS bus every service talks through.
//!
//! - One connection per service process, connected once, cloned everywhere.
//! - Outgoing messages go through one bounded, ordered lane: `publish` and
//!   `request` are synchronous, never wait, and keep the caller's order (an
//!   actor's handler can send without spawning futures whose first poll order
//!   is not guaranteed). When the lane is full the caller gets
//!   [`BusError::Busy`] at once: the bound's policy is "reject, retry later".
//! - Replies to requests arrive on one wildcard inbox subscription and are
//!   routed to the waiting caller by token, with a deadline per request.
//! - Every message carries the W3C trace context in its headers.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::{Client, ConnectOptions, Event, HeaderMap, Message, StatusCode, Subscriber};
use bytes::Bytes;
use futures_util::StreamExt as _;
use rt_proto::internal::{BusResult, WireError};
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::sync::{mpsc, oneshot};

use crate::config::NatsConfig;
use crate::health::Health;
use crate::metrics::{CommonMetrics, EventLabel};
use crate::telemetry::RateLimitedLog;
use crate::trace_context::TraceContext;

/// Failures at the bus boundary; callers map them to error codes.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    #[error("cannot connect to NATS at {url}: {message}")]
    Connect { url: String, message: String },
    #[error("NATS subscribe failed: {0}")]
    Subscribe(String),
    #[error("the outgoing NATS queue is full")]
    Busy,
    #[error("the NATS connection is closed")]
    Closed,
    #[error("no reply within {0:?}")]
    Timeout(Duration),
    #[error("no service answers this subject")]
    NoResponders,
    #[error("cannot encode message: {0}")]
    Encode(String),
    #[error("cannot decode reply: {0}")]
    Decode(String),
    #[error("remote error {}: {}", .0.code, .0.message)]
    Remote(WireError),
}

struct Outgoing {
    subject: String,
    reply: Option<String>,
    headers: HeaderMap,
    payload: Bytes,
}

/// Who waits for replies on a token: one reply, or a stream of partial
/// replies ended by the first message without the `Rt-Part` header.
enum Waiter {
    Once(oneshot::Sender<Message>),
    Stream(mpsc::Sender<Message>),
}

struct BusInner {
    client: Client,
    lane: mpsc::Sender<Outgoing>,
    pending: Mutex<HashMap<u64, Waiter>>,
    reply_prefix: String,
    next_token: AtomicU64,
    timeout: Duration,
    metrics: CommonMetrics,
}

/// A cloneable handle on the service's NATS connection.
#[derive(Clone)]
pub struct Bus {
    inner: Arc<BusInner>,
}

static LANE_ERRORS: RateLimitedLog = RateLimitedLog::new(5_000);

impl Bus {
    /// Starts connecting (retrying in the background until NATS answers),
    /// starts the outgoing lane and the reply router on the current runtime,
    /// and returns at once: a service can serve `/healthz` meanwhile. Await
    /// [`Bus::flush`] to know the connection is up and subscriptions are
    /// registered with the server.
    pub async fn connect(
        config: &NatsConfig,
        name: &str,
        health: Health,
        metrics: CommonMetrics,
    ) -> Result<Bus, BusError> {
        let events_health = health.clone();
        let events_metrics = metrics.clone();
        let options = ConnectOptions::new()
            .name(name)
            .retry_on_initial_connect()
            .subscription_capacity(config.subscription_capacity)
            .request_timeout(Some(Duration::from_millis(config.request_timeout_ms)))
            .event_callback(move |event| {
                let health = events_health.clone();
                let metrics = events_metrics.clone();
                async move { on_event(&event, &health, &metrics) }
            });
        let client = options
            .connect(config.url.as_str())
            .await
            .map_err(|e| BusError::Connect {
                url: config.url.clone(),
                message: e.to_string(),
            })?;
        let reply_prefix = client.new_inbox();
        let replies = client
            .subscribe(format!("{reply_prefix}.*"))
            .await
            .map_err(|e| BusError::Subscribe(e.to_string()))?;
        let (lane, lane_rx) = mpsc::channel(config.publish_queue);
        let inner = Arc::new(BusInner {
            client: client.clone(),
            lane,
            pending: Mutex::new(HashMap::new()),
            reply_prefix,
            next_token: AtomicU64::new(1),
            timeout: Duration::from_millis(config.request_timeout_ms),
            metrics,
        });
        tokio::spawn(run_lane(client.clone(), lane_rx));
        tokio::spawn(route_replies(Arc::downgrade(&inner), replies));
        // Readiness follows the connection events (see `on_event`).
        drop(health);
        Ok(Bus { inner })
    }

    /// The raw client, for subscriptions.
    pub fn client(&self) -> &Client {
        &self.inner.client
    }

    pub async fn subscribe(&self, subject: String) -> Result<Subscriber, BusError> {
        self.inner
            .client
            .subscribe(subject)
            .await
            .map_err(|e| BusError::Subscribe(e.to_string()))
    }

    pub async fn queue_subscribe(
        &self,
        subject: String,
        queue: &str,
    ) -> Result<Subscriber, BusError> {
        self.inner
            .client
            .queue_subscribe(subject, queue.to_owned())
            .await
            .map_err(|e| BusError::Subscribe(e.to_string()))
    }

    /// Waits until what was sent so far is written to the server's socket
    /// (and so, at start-up, until the connection is up). It does not mean
    /// the server has processed it: see [`Bus::sync`].
    pub async fn flush(&self) -> Result<(), BusError> {
        self.inner
            .client
            .flush()
            .await
            .map_err(|_| BusError::Closed)
    }

    /// Waits until the server has *processed* everything this connection
    /// sent so far, subscriptions included: a request to a subject nobody
    /// serves comes back as "no responders" only after the server handled
    /// all that came before it on this connection. Call it after subscribing
    /// and before relying on the subscription from another connection
    /// (async-nats' flush only empties the socket buffer).
    pub async fn sync(&self) -> Result<(), BusError> {
        let subject = format!("{}.sync", self.inner.client.new_inbox());
        match self.inner.client.request(subject, Bytes::new()).await {
            Ok(_) => Ok(()),
            Err(error) => match error.kind() {
                async_nats::RequestErrorKind::NoResponders => Ok(()),
                async_nats::RequestErrorKind::TimedOut => {
                    Err(BusError::Timeout(self.inner.timeout))
                }
                _ => Err(BusError::Closed),
            },
        }
    }

    /// Publishes in call order without waiting.
    pub fn publish(
        &self,
        subject: String,
        headers: HeaderMap,
        payload: Bytes,
    ) -> Result<(), BusError> {
        self.send(Outgoing {
            subject,
            reply: None,
            headers,
            payload,
        })
    }

    /// Publishes a MessagePack envelope with the trace context.
    pub fn publish_msg<T: Serialize>(
        &self,
        subject: String,
        trace: Option<&TraceContext>,
        message: &T,
    ) -> Result<(), BusError> {
        let payload = encode(message)?;
        self.publish(subject, headers_with(trace), payload)
    }

    /// Sends a request in call order; await the returned reply.
    pub fn request(
        &self,
        subject: String,
        headers: HeaderMap,
        payload: Bytes,
    ) -> Result<PendingReply, BusError> {
        let token = self.inner.next_token.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        if let Ok(mut pending) = self.inner.pending.lock() {
            pending.insert(token, Waiter::Once(tx));
        }
        let pending = PendingReply {
            rx,
            token,
            inner: self.inner.clone(),
            timeout: self.inner.timeout,
        };
        self.send(Outgoing {
            subject,
            reply: Some(format!("{}.{token}", self.inner.reply_prefix)),
            headers,
            payload,
        })?;
        Ok(pending)
    }

    /// Sends a request whose answer may come in parts: messages with header
    /// `Rt-Part` are partial, the first without it is final. At most
    /// `capacity` parts wait unread; past that the stream ends in an error.
    pub fn request_stream(
        &self,
        subject: String,
        headers: HeaderMap,
        payload: Bytes,
        capacity: usize,
        timeout: Duration,
    ) -> Result<ReplyStream, BusError> {
        let token = self.inner.next_token.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = mpsc::channel(capacity.max(1));
        if let Ok(mut pending) = self.inner.pending.lock() {
            pending.insert(token, Waiter::Stream(tx));
        }
        let stream = ReplyStream {
            rx,
            token,
            inner: self.inner.clone(),
            deadline: tokio::time::Instant::now() + timeout,
            timeout,
        };
        self.send(Outgoing {
            subject,
            reply: Some(format!("{}.{token}", self.inner.reply_prefix)),
            headers,
            payload,
        })?;
        Ok(stream)
    }

    /// Sends a MessagePack request envelope with the trace context.
    pub fn request_msg<T: Serialize>(
        &self,
        subject: String,
        trace: Option<&TraceContext>,
        message: &T,
    ) -> Result<PendingReply, BusError> {
        let payload = encode(message)?;
        self.request(subject, headers_with(trace), payload)
    }

    /// Reserves room for `n` messages in the lane, so a caller can commit to
    /// sending them (e.g. after assigning an offset) or refuse before doing anything.
    pub fn try_reserve(&self, n: usize) -> Result<Reserved, BusError> {
        let mut permits = Vec::with_capacity(n);
        for _ in 0..n {
            match self.inner.lane.clone().try_reserve_owned() {
                Ok(permit) => permits.push(permit),
                // Dropping the permits taken so far gives their room back.
                Err(mpsc::error::TrySendError::Full(_)) => {
                    self.inner.metrics.bus_queue_full.inc();
                    return Err(BusError::Busy);
                }
                Err(mpsc::error::TrySendError::Closed(_)) => return Err(BusError::Closed),
            }
        }
        Ok(Reserved { permits })
    }

    fn send(&self, outgoing: Outgoing) -> Result<(), BusError> {
        self.inner.lane.try_send(outgoing).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => {
                self.inner.metrics.bus_queue_full.inc();
                BusError::Busy
            }
            mpsc::error::TrySendError::Closed(_) => BusError::Closed,
        })
    }
}

/// Room reserved in the outgoing lane by [`Bus::try_reserve`].
pub struct Reserved {
    permits: Vec<mpsc::OwnedPermit<Outgoing>>,
}

impl Reserved {
    /// Publishes with a reserved slot; `false` when none is left.
    pub fn publish(&mut self, subject: String, headers: HeaderMap, payload: Bytes) -> bool {
        match self.permits.pop() {
            Some(permit) => {
                permit.send(Outgoing {
                    subject,
                    reply: None,
                    headers,
                    payload,
                });
                true
            }
            None => false,
        }
    }
}

/// A request on its way; dropping it forgets the reply.
pub struct PendingReply {
    rx: oneshot::Receiver<Message>,
    token: u64,
    inner: Arc<BusInner>,
    timeout: Duration,
}

impl PendingReply {
    /// Overrides the deadline (e.g. a client's RPC deadline).
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The reply message.
    pub async fn wait(mut self) -> Result<Message, BusError> {
        match tokio::time::timeout(self.timeout, &mut self.rx).await {
            Ok(Ok(message)) if message.status == Some(StatusCode::NO_RESPONDERS) => {
                Err(BusError::NoResponders)
            }
            Ok(Ok(message)) => Ok(message),
            Ok(Err(_)) => Err(BusError::Closed),
            Err(_) => {
                self.inner.metrics.bus_timeouts.inc();
                Err(BusError::Timeout(self.timeout))
            }
        }
    }

    /// The reply decoded as a `BusResult<T>`; a remote error becomes [`BusError::Remote`].
    pub async fn decode<T: DeserializeOwned>(self) -> Result<T, BusError> {
        let message = self.wait().await?;
        let result: BusResult<T> =
            rmp_serde::from_slice(&message.payload).map_err(|e| BusError::Decode(e.to_string()))?;
        Result::from(result).map_err(BusError::Remote)
    }
}

impl Drop for PendingReply {
    fn drop(&mut self) {
        if let Ok(mut pending) = self.inner.pending.lock() {
            pending.remove(&self.token);
        }
    }
}

/// Replies to a [`Bus::request_stream`]; dropping it forgets the call.
pub struct ReplyStream {
    rx: mpsc::Receiver<Message>,
    token: u64,
    inner: Arc<BusInner>,
    deadline: tokio::time::Instant,
    timeout: Duration,
}

impl ReplyStream {
    /// The next message (partial or final), or an error when the deadline
    /// passes, nobody answers, or too many parts were left unread.
    pub async fn next(&mut self) -> Result<Message, BusError> {
        match tokio::time::timeout_at(self.deadline, self.rx.recv()).await {
            Ok(Some(message)) if message.status == Some(StatusCode::NO_RESPONDERS) => {
                Err(BusError::NoResponders)
            }
            Ok(Some(message)) => Ok(message),
            Ok(None) => Err(BusError::Closed),
            Err(_) => {
                self.inner.metrics.bus_timeouts.inc();
                Err(BusError::Timeout(self.timeout))
            }
        }
    }
}

impl Drop for ReplyStream {
    fn drop(&mut self) {
        if let Ok(mut pending) = self.inner.pending.lock() {
            pending.remove(&self.token);
        }
    }
}

/// Whether a reply message is a partial one (`Rt-Part: 1`).
pub fn is_part(message: &Message) -> bool {
    message
        .headers
        .as_ref()
        .and_then(|h| h.get(rt_proto::rpc::HEADER_PART))
        .is_some_and(|v| v.as_str() == "1")
}

/// Headers carrying `trace` (the sender's current span), or nothing.
pub fn headers_with(trace: Option<&TraceContext>) -> HeaderMap {
    let mut headers = HeaderMap::new();
    if let Some(trace) = trace {
        trace.inject_nats(&mut headers);
    }
    headers
}

/// Encodes a MessagePack envelope.
pub fn encode<T: Serialize>(message: &T) -> Result<Bytes, BusError> {
    rt_proto::internal::to_msgpack(message)
        .map(Bytes::from)
        .map_err(|e| BusError::Encode(e.to_string()))
}

async fn run_lane(client: Client, mut lane: mpsc::Receiver<Outgoing>) {
    while let Some(out) = lane.recv().await {
        let result = match out.reply {
            Some(reply) => {
                client
                    .publish_with_reply_and_headers(out.subject, reply, out.headers, out.payload)
                    .await
            }
            None => {
                client
                    .publish_with_headers(out.subject, out.headers, out.payload)
                    .await
            }
        };
        if let Err(error) = result
            && let Some(suppressed) = LANE_ERRORS.allow()
        {
            tracing::warn!(%error, suppressed, "NATS publish failed");
        }
    }
}

async fn route_replies(inner: std::sync::Weak<BusInner>, mut replies: Subscriber) {
    while let Some(message) = replies.next().await {
        let Some(inner) = inner.upgrade() else { return };
        let token = message
            .subject
            .rsplit('.')
            .next()
            .and_then(|t| t.parse::<u64>().ok());
        let Some(token) = token else { continue };
        let Ok(mut pending) = inner.pending.lock() else {
            continue;
        };
        let part = is_part(&message);
        match pending.remove(&token) {
            // The caller may have given up (timeout, disconnect): nothing to do then.
            Some(Waiter::Once(waiter)) => drop(waiter.send(message)),
            // A stream stays registered until its final message; a reader
            // that lets `capacity` parts pile up is cut off (its channel
            // closes, so it sees an error instead of a silent gap).
            Some(Waiter::Stream(waiter)) if waiter.try_send(message).is_ok() && part => {
                pending.insert(token, Waiter::Stream(waiter));
            }
            Some(Waiter::Stream(_)) => {}
            None => {}
        }
    }
}

fn on_event(event: &Event, health: &Health, metrics: &CommonMetrics) {
    let name = match event {
        Event::Connected => "connected",
        Event::Disconnected => "disconnected",
        Event::LameDuckMode => "lame_duck",
        Event::Draining => "draining",
        Event::Closed => "closed",
        Event::SlowConsumer(_) => "slow_consumer",
        Event::ServerError(_) => "server_error",
        Event::ClientError(_) => "client_error",
    };
    metrics
        .nats_events
        .get_or_create(&EventLabel { event: name })
        .inc();
    match event {
        Event::Connected => {
            health.set_nats_connected(true);
            tracing::info!("NATS connected");
        }
        Event::Disconnected | Event::Closed => {
            health.set_nats_connected(false);
            tracing::warn!(event = name, "NATS connection lost");
        }
        other => tracing::warn!(event = %other, "NATS event"),
    }
}
