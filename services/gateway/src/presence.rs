//! This node's share of presence, and its join/leave events.
//!
//! Connections report when they start and stop being subscribed to a
//! channel whose namespace has `presence` or `join_leave`. Every
//! `presence_batch_ms` the node
//! - writes its slice of each changed channel to the presence KV bucket
//!   (key: channel + node; only this node writes it, so no locking), listing
//!   clients up to `session.presence_max_list` and only counting past it;
//! - sends each changed channel's joins and leaves as ONE message on the
//!   channel's delivery subject, which every gateway with subscribers
//!   already receives, so a storm of joins costs one message per channel per
//!   tick instead of one per client.
//!
//! Join/leave is the first thing shed under load: when the NATS lane is
//! full the batch is dropped and counted; publications keep their room.

use std::collections::HashMap;
use std::sync::Mutex;

use futures_util::future::join_all;
use rt_proto::ChannelName;
use rt_proto::session::{self, PresenceChange, PresenceSlice, PresentClient};
use rt_shared::Bus;
use rt_shared::kv::Buckets;
use rt_shared::session_client::publish_presence_change;
use rt_shared::telemetry::RateLimitedLog;

use crate::metrics::{GatewayMetrics, ResultLabel};

static PRESENCE_ERRORS: RateLimitedLog = RateLimitedLog::new(5_000);

/// What a namespace wants tracked for its channels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Tracking {
    pub presence: bool,
    pub join_leave: bool,
}

impl Tracking {
    pub fn any(self) -> bool {
        self.presence || self.join_leave
    }
}

#[derive(Default)]
struct ChannelPresence {
    tracking: Option<Tracking>,
    clients: HashMap<String, PresentClient>,
    changes: PresenceChange,
    /// The slice in KV no longer matches `clients`.
    slice_dirty: bool,
}

/// The node's presence table, shared by every worker.
pub struct PresenceTable {
    node: String,
    max_list: usize,
    channels: Mutex<HashMap<ChannelName, ChannelPresence>>,
}

/// One tick's work, taken out of the table so no lock is held while sending.
struct Flush {
    channel: ChannelName,
    slice: Option<PresenceSlice>,
    change: Option<PresenceChange>,
}

impl PresenceTable {
    pub fn new(node: String, max_list: usize) -> Self {
        Self {
            node,
            max_list,
            channels: Mutex::new(HashMap::new()),
        }
    }

    pub fn join(&self, channel: &ChannelName, tracking: Tracking, client: PresentClient) {
        self.change(channel, tracking, client, true);
    }

    pub fn leave(&self, channel: &ChannelName, tracking: Tracking, client: PresentClient) {
        self.change(channel, tracking, client, false);
    }

    fn change(&self, channel: &ChannelName, tracking: Tracking, client: PresentClient, join: bool) {
        if !tracking.any() {
            return;
        }
        let Ok(mut channels) = self.channels.lock() else {
            return;
        };
        let entry = channels.entry(channel.clone()).or_default();
        entry.tracking = Some(tracking);
        let changed = if join {
            entry
                .clients
                .insert(client.client.clone(), client.clone())
                .is_none()
        } else {
            entry.clients.remove(&client.client).is_some()
        };
        if !changed {
            return;
        }
        if tracking.presence {
            entry.slice_dirty = true;
        }
        if tracking.join_leave {
            if join {
                entry.changes.joins.push(client);
            } else {
                entry.changes.leaves.push(client);
            }
        }
    }

    /// Clients of this node in `channel` right now (for tests and debugging).
    pub fn local_count(&self, channel: &ChannelName) -> usize {
        self.channels
            .lock()
            .ok()
            .and_then(|c| c.get(channel).map(|e| e.clients.len()))
            .unwrap_or(0)
    }

    fn take_changes(&self) -> Vec<Flush> {
        let Ok(mut channels) = self.channels.lock() else {
            return Vec::new();
        };
        let mut flushes = Vec::new();
        channels.retain(|channel, entry| {
            let slice = entry.slice_dirty.then(|| {
                let count = entry.clients.len() as u64;
                let clients = (entry.clients.len() <= self.max_list)
                    .then(|| entry.clients.values().cloned().collect());
                PresenceSlice { clients, count }
            });
            entry.slice_dirty = false;
            let change = (!entry.changes.joins.is_empty() || !entry.changes.leaves.is_empty())
                .then(|| std::mem::take(&mut entry.changes));
            if slice.is_some() || change.is_some() {
                flushes.push(Flush {
                    channel: channel.clone(),
                    slice,
                    change,
                });
            }
            !entry.clients.is_empty()
        });
        flushes
    }

    /// Sends what changed since the last tick.
    pub async fn flush(&self, bus: &Bus, buckets: &Buckets, metrics: &GatewayMetrics) {
        let flushes = self.take_changes();
        if flushes.is_empty() {
            return;
        }
        let mut writes = Vec::new();
        for flush in flushes {
            if let Some(change) = flush.change {
                let events = (change.joins.len() + change.leaves.len()) as u64;
                match publish_presence_change(bus, &flush.channel, &change) {
                    Ok(()) => {
                        metrics.presence_events.inc_by(events);
                    }
                    Err(_) => {
                        metrics.presence_dropped.inc();
                    }
                }
            }
            if let Some(slice) = flush.slice {
                let key = session::presence_key(&flush.channel, &self.node);
                writes.push(write_slice(buckets, key, slice));
            }
        }
        for ok in join_all(writes).await {
            let result = if ok { "ok" } else { "error" };
            metrics
                .presence_writes
                .get_or_create(&ResultLabel { result })
                .inc();
        }
    }
}

/// Writes (or, when nobody is left, deletes) this node's slice of a channel.
async fn write_slice(buckets: &Buckets, key: String, slice: PresenceSlice) -> bool {
    let result = if slice.count == 0 {
        buckets
            .presence
            .delete(&key)
            .await
            .map_err(|e| e.to_string())
    } else {
        match rt_proto::internal::to_msgpack(&slice) {
            Ok(bytes) => buckets
                .presence
                .put(&key, bytes.into())
                .await
                .map(|_| ())
                .map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        }
    };
    match result {
        Ok(()) => true,
        Err(error) => {
            if let Some(suppressed) = PRESENCE_ERRORS.allow() {
                tracing::warn!(key, %error, suppressed, "cannot write presence");
            }
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client(id: &str) -> PresentClient {
        PresentClient {
            client: id.into(),
            user: format!("user-{id}"),
            info: None,
        }
    }

    const BOTH: Tracking = Tracking {
        presence: true,
        join_leave: true,
    };

    #[test]
    fn changes_are_batched_per_channel_and_lists_turn_into_counts() {
        let table = PresenceTable::new("n1".into(), 2);
        let channel = ChannelName::parse("chat:a").expect("valid");
        table.join(&channel, BOTH, client("1"));
        table.join(&channel, BOTH, client("2"));
        // A repeated join changes nothing.
        table.join(&channel, BOTH, client("2"));
        let flushes = table.take_changes();
        assert_eq!(flushes.len(), 1);
        let change = flushes[0].change.as_ref().expect("joins");
        assert_eq!(change.joins.len(), 2);
        let slice = flushes[0].slice.as_ref().expect("slice");
        assert_eq!(slice.count, 2);
        assert_eq!(slice.clients.as_ref().map(Vec::len), Some(2));

        table.join(&channel, BOTH, client("3"));
        let flushes = table.take_changes();
        let slice = flushes[0].slice.as_ref().expect("slice");
        assert_eq!((slice.count, slice.clients.is_none()), (3, true));
        assert!(table.take_changes().is_empty(), "nothing new");
    }

    #[test]
    fn the_last_leave_writes_an_empty_slice_and_forgets_the_channel() {
        let table = PresenceTable::new("n1".into(), 10);
        let channel = ChannelName::parse("chat:b").expect("valid");
        let presence_only = Tracking {
            presence: true,
            join_leave: false,
        };
        table.join(&channel, presence_only, client("1"));
        table.take_changes();
        table.leave(&channel, presence_only, client("1"));
        let flushes = table.take_changes();
        assert_eq!(flushes.len(), 1);
        assert!(flushes[0].change.is_none(), "no join_leave here");
        assert_eq!(flushes[0].slice.as_ref().map(|s| s.count), Some(0));
        assert_eq!(table.local_count(&channel), 0);
        assert!(table.take_changes().is_empty());
    }
}
