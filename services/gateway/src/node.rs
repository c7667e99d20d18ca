//! Work the gateway does as a node rather than per connection: its
//! heartbeat in NATS KV, the presence flush, batched session events to the
//! session service, and kicks from `/api/disconnect` on any gateway.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt as _;
use rt_proto::CloseCode;
use rt_proto::session::{self, Kick, NodeBeat, SessionEvent, SessionEvents};
use rt_shared::telemetry::{RateLimitedLog, now_ms};
use rt_shared::{Bus, BusError};
use tokio::sync::oneshot;

use crate::connection::Disconnect;
use crate::state::AppState;

static NODE_ERRORS: RateLimitedLog = RateLimitedLog::new(5_000);

/// Most events sent to the session service in one message.
const EVENTS_PER_MESSAGE: usize = 1_000;

/// Session events waiting for the next tick, bounded: past `capacity` the
/// oldest subscription-list updates go first (a newer list of the same
/// session usually follows), then the oldest events of any kind.
pub struct SessionReporter {
    capacity: usize,
    pending: Mutex<VecDeque<SessionEvent>>,
}

impl SessionReporter {
    pub fn new(capacity: usize) -> Self {
        Self {
            capacity,
            pending: Mutex::new(VecDeque::new()),
        }
    }

    /// Queues an event; returns how many were dropped to make room.
    pub fn report(&self, event: SessionEvent) -> u64 {
        let Ok(mut pending) = self.pending.lock() else {
            return 1;
        };
        let mut dropped = 0;
        while pending.len() >= self.capacity {
            let victim = pending
                .iter()
                .position(|e| matches!(e, SessionEvent::Subs { .. }))
                .unwrap_or(0);
            pending.remove(victim);
            dropped += 1;
        }
        pending.push_back(event);
        dropped
    }

    fn take(&self, max: usize) -> Vec<SessionEvent> {
        let Ok(mut pending) = self.pending.lock() else {
            return Vec::new();
        };
        let n = pending.len().min(max);
        pending.drain(..n).collect()
    }

    fn put_back(&self, events: Vec<SessionEvent>) {
        if let Ok(mut pending) = self.pending.lock() {
            for event in events.into_iter().rev() {
                pending.push_front(event);
            }
        }
    }
}

/// Stops the node's background work.
pub struct NodeTasks {
    stop: Option<oneshot::Sender<Ending>>,
    done: Option<oneshot::Receiver<()>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ending {
    /// One last flush, then the heartbeat is removed: the node said goodbye.
    Clean,
    /// Stop at once, as a crash would: the session service notices the
    /// missing heartbeat and cleans up after the node.
    Abrupt,
}

impl NodeTasks {
    /// Stops ticking after one last flush, and removes the node's heartbeat.
    pub async fn stop(self) {
        self.end(Ending::Clean).await;
    }

    /// Stops ticking without a goodbye.
    pub async fn abort(self) {
        self.end(Ending::Abrupt).await;
    }

    async fn end(mut self, ending: Ending) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(ending);
        }
        if let Some(done) = self.done.take() {
            let _ = tokio::time::timeout(Duration::from_secs(5), done).await;
        }
    }
}

/// Starts the heartbeat/flush loop and the kick listener.
pub async fn start(app: Arc<AppState>) -> Result<NodeTasks, BusError> {
    let kicks = app.bus.subscribe(session::KICK.to_owned()).await?;
    actix_rt::spawn(listen_for_kicks(app.clone(), kicks));
    let (stop_tx, stop_rx) = oneshot::channel();
    let (done_tx, done_rx) = oneshot::channel();
    // The first heartbeat before the node reports ready, so a session
    // instance never sees this node's clients before the node itself.
    beat(&app).await;
    actix_rt::spawn(async move {
        tick(app, stop_rx).await;
        let _ = done_tx.send(());
    });
    Ok(NodeTasks {
        stop: Some(stop_tx),
        done: Some(done_rx),
    })
}

async fn tick(app: Arc<AppState>, stop: oneshot::Receiver<Ending>) {
    // Two tasks: a flush waiting for the session service's answer must not
    // delay a heartbeat (a late one makes the node look dead).
    let beats = actix_rt::spawn(beat_forever(app.clone()));
    let flushes = actix_rt::spawn(flush_forever(app.clone()));
    let ending = stop.await.unwrap_or(Ending::Abrupt);
    beats.abort();
    flushes.abort();
    if ending == Ending::Abrupt {
        return;
    }
    flush(&app).await;
    if let Some(buckets) = app.buckets.get()
        && let Err(error) = buckets.nodes.delete(&app.node).await
    {
        tracing::warn!(%error, "cannot remove this node's heartbeat");
    }
}

async fn beat_forever(app: Arc<AppState>) {
    let mut every = tokio::time::interval(Duration::from_millis(app.config.gateway.heartbeat_ms));
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        beat(&app).await;
    }
}

async fn flush_forever(app: Arc<AppState>) {
    let mut every = tokio::time::interval(Duration::from_millis(
        app.config.gateway.presence_batch_ms.max(1),
    ));
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        flush(&app).await;
    }
}

/// Writes this node's presence changes and sends its session events, a
/// batch at a time, each acknowledged by a session instance on receipt.
async fn flush(app: &AppState) {
    if let Some(buckets) = app.buckets.get() {
        app.presence.flush(&app.bus, buckets, &app.metrics).await;
    }
    loop {
        let events = app.reporter.take(EVENTS_PER_MESSAGE);
        if events.is_empty() {
            return;
        }
        let batch = SessionEvents {
            node: app.node.clone(),
            events,
        };
        let answer = match app.session.events(&batch) {
            Ok(answer) => answer,
            Err(error) => {
                // The lane is full: try again next tick, in order.
                if let Some(suppressed) = NODE_ERRORS.allow() {
                    tracing::warn!(%error, suppressed, "session events delayed");
                }
                app.reporter.put_back(batch.events);
                return;
            }
        };
        match answer.wait().await {
            Ok(_) => {}
            Err(BusError::NoResponders) => {
                // No session instance runs: nobody took the batch. Keep it,
                // in order, until one is back, or the closes in it would
                // never release their users' connection slots.
                if let Some(suppressed) = NODE_ERRORS.allow() {
                    tracing::warn!(
                        suppressed,
                        "no session instance: session events kept for later"
                    );
                }
                app.metrics.session_events_kept.inc();
                app.reporter.put_back(batch.events);
                return;
            }
            Err(error) => {
                // Sent, but no answer in time: an instance may have taken
                // it, and one taken twice would release slots twice, so it
                // is not sent again.
                if let Some(suppressed) = NODE_ERRORS.allow() {
                    tracing::warn!(%error, suppressed, "session events not acknowledged");
                }
            }
        }
    }
}

async fn beat(app: &AppState) {
    let Some(buckets) = app.buckets.get() else {
        return;
    };
    let beat = NodeBeat {
        at_ms: now_ms(),
        started_ms: app.started_ms,
    };
    let Ok(bytes) = rt_proto::internal::to_msgpack(&beat) else {
        return;
    };
    if let Err(error) = buckets.nodes.put(&app.node, bytes.into()).await
        && let Some(suppressed) = NODE_ERRORS.allow()
    {
        tracing::warn!(%error, suppressed, "cannot write this node's heartbeat");
    }
}

async fn listen_for_kicks(app: Arc<AppState>, mut kicks: async_nats::Subscriber) {
    while let Some(message) = kicks.next().await {
        let kick: Kick = match rt_proto::internal::from_msgpack(&message.payload) {
            Ok(kick) => kick,
            Err(error) => {
                if let Some(suppressed) = NODE_ERRORS.allow() {
                    tracing::warn!(%error, suppressed, "undecodable kick");
                }
                continue;
            }
        };
        let connections = app.connections.of_user(&kick.user);
        if connections.is_empty() {
            continue;
        }
        tracing::info!(user = %kick.user, connections = connections.len(), "kicking user");
        for connection in connections {
            app.metrics.kicked.inc();
            connection.do_send(Disconnect {
                code: CloseCode(kick.code),
                reason: "kicked",
                reconnect: false,
                retry_after_ms: None,
            });
        }
    }
}

/// Builds the message `/api/disconnect` publishes to every gateway.
pub fn kick(bus: &Bus, user: &str) -> Result<(), BusError> {
    let kick = Kick {
        user: user.to_owned(),
        code: CloseCode::KICKED.0,
        reason: "kicked".into(),
    };
    bus.publish_msg(session::KICK.to_owned(), None, &kick)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn subs(session: &str) -> SessionEvent {
        SessionEvent::Subs {
            session: session.into(),
            subs: Vec::new(),
            at_ms: 0,
        }
    }

    fn closed(session: &str) -> SessionEvent {
        SessionEvent::Closed {
            session: session.into(),
            client: String::new(),
            user: String::new(),
            code: 1000,
            subs: Vec::new(),
            at_ms: 0,
        }
    }

    #[test]
    fn overflow_drops_subscription_lists_before_closes() {
        let reporter = SessionReporter::new(2);
        assert_eq!(reporter.report(closed("a")), 0);
        assert_eq!(reporter.report(subs("b")), 0);
        assert_eq!(reporter.report(closed("c")), 1);
        let kept = reporter.take(10);
        assert_eq!(kept, vec![closed("a"), closed("c")]);
    }

    #[test]
    fn put_back_keeps_the_order() {
        let reporter = SessionReporter::new(10);
        reporter.report(closed("a"));
        reporter.report(closed("b"));
        let taken = reporter.take(1);
        reporter.report(closed("c"));
        reporter.put_back(taken);
        assert_eq!(
            reporter.take(10),
            vec![closed("a"), closed("b"), closed("c")]
        );
    }
}
