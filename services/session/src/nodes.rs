//! Which gateways are alive, mirrored from their heartbeats in NATS KV.
//!
//! Every session instance keeps this view. A node whose heartbeat is older
//! than `session.node_ttl_ms` is dead: its connection counts stop counting,
//! its sessions become resumable from its last heartbeat, and one session
//! instance (whoever takes the reap lock) removes its presence.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::kv;
use futures_util::StreamExt as _;
use rt_proto::session::NodeBeat;

/// KV keys under this prefix in the nodes bucket are reap locks, not nodes.
pub const REAP_LOCK_PREFIX: &str = "reap.";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Seen {
    at_ms: u64,
    /// The heartbeat entry was deleted: the node said goodbye, or was reaped.
    gone: bool,
}

/// The mirror of the nodes bucket.
#[derive(Clone)]
pub struct NodeView {
    ttl_ms: u64,
    nodes: Arc<Mutex<HashMap<String, Seen>>>,
}

impl NodeView {
    pub fn new(ttl_ms: u64) -> Self {
        Self {
            ttl_ms,
            nodes: Arc::new(Mutex::new(HashMap::new())),
        }
    }

    fn record(&self, node: &str, seen: Seen) {
        if let Ok(mut nodes) = self.nodes.lock() {
            nodes.insert(node.to_owned(), seen);
        }
    }

    fn mark_gone(&self, node: &str, now_ms: u64) {
        if let Ok(mut nodes) = self.nodes.lock() {
            let entry = nodes.entry(node.to_owned()).or_insert(Seen {
                at_ms: now_ms,
                gone: true,
            });
            entry.gone = true;
        }
    }

    #[cfg(test)]
    pub(crate) fn beat_for_tests(&self, node: &str, at_ms: u64) {
        self.record(node, Seen { at_ms, gone: false });
    }

    /// Whether `node` beat within the TTL and has not left.
    pub fn is_live(&self, node: &str, now_ms: u64) -> bool {
        self.nodes
            .lock()
            .ok()
            .and_then(|nodes| nodes.get(node).copied())
            .is_some_and(|seen| !seen.gone && seen.at_ms + self.ttl_ms > now_ms)
    }

    /// The last heartbeat seen from `node`, if any.
    pub fn last_seen(&self, node: &str) -> Option<u64> {
        self.nodes
            .lock()
            .ok()
            .and_then(|nodes| nodes.get(node).map(|seen| seen.at_ms))
    }

    /// Nodes that stopped beating without saying goodbye.
    pub fn dead(&self, now_ms: u64) -> Vec<String> {
        self.nodes
            .lock()
            .map(|nodes| {
                nodes
                    .iter()
                    .filter(|(_, seen)| !seen.gone && seen.at_ms + self.ttl_ms <= now_ms)
                    .map(|(node, _)| node.clone())
                    .collect()
            })
            .unwrap_or_default()
    }

    pub fn live_count(&self, now_ms: u64) -> usize {
        self.nodes
            .lock()
            .map(|nodes| {
                nodes
                    .values()
                    .filter(|seen| !seen.gone && seen.at_ms + self.ttl_ms > now_ms)
                    .count()
            })
            .unwrap_or(0)
    }

    /// Forgets nodes gone for much longer than any resume TTL could need.
    pub fn prune(&self, older_than_ms: u64) {
        if let Ok(mut nodes) = self.nodes.lock() {
            nodes.retain(|_, seen| seen.at_ms >= older_than_ms);
        }
    }

    /// Follows the bucket until `stop`; the first call to `loaded` resolves
    /// once the entries present at start have been read.
    pub async fn follow(
        self,
        bucket: kv::Store,
        loaded: tokio::sync::oneshot::Sender<()>,
    ) -> Result<(), String> {
        let existing = bucket.status().await.map_err(|e| e.to_string())?.values();
        let mut watch = bucket
            .watch_with_history(">")
            .await
            .map_err(|e| e.to_string())?;
        let mut loaded = Some(loaded);
        if existing == 0
            && let Some(loaded) = loaded.take()
        {
            let _ = loaded.send(());
        }
        while let Some(entry) = watch.next().await {
            let entry = match entry {
                Ok(entry) => entry,
                Err(error) => {
                    tracing::warn!(%error, "node heartbeat watch error");
                    continue;
                }
            };
            if !entry.key.starts_with(REAP_LOCK_PREFIX) {
                match entry.operation {
                    kv::Operation::Put => {
                        if let Ok(beat) = rt_proto::internal::from_msgpack::<NodeBeat>(&entry.value)
                        {
                            self.record(
                                &entry.key,
                                Seen {
                                    at_ms: beat.at_ms,
                                    gone: false,
                                },
                            );
                        }
                    }
                    kv::Operation::Delete | kv::Operation::Purge => {
                        self.mark_gone(&entry.key, rt_shared::telemetry::now_ms());
                    }
                }
            }
            if entry.delta == 0
                && let Some(loaded) = loaded.take()
            {
                let _ = loaded.send(());
            }
        }
        Err("node heartbeat watch ended".into())
    }
}

/// Follows the nodes bucket for as long as the service runs, watching again
/// after an error (e.g. a NATS restart).
pub async fn follow_forever(
    view: NodeView,
    bucket: kv::Store,
    loaded: tokio::sync::oneshot::Sender<()>,
) {
    let mut loaded = Some(loaded);
    loop {
        let signal = loaded
            .take()
            .unwrap_or_else(|| tokio::sync::oneshot::channel().0);
        if let Err(error) = view.clone().follow(bucket.clone(), signal).await {
            tracing::warn!(%error, "watching node heartbeats again shortly");
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn liveness_follows_the_ttl_and_goodbyes() {
        let view = NodeView::new(1_000);
        view.record(
            "a",
            Seen {
                at_ms: 10_000,
                gone: false,
            },
        );
        assert!(view.is_live("a", 10_500));
        assert!(!view.is_live("a", 11_000));
        assert_eq!(view.dead(11_000), vec!["a".to_owned()]);
        assert!(!view.is_live("unknown", 10_000));
        view.mark_gone("a", 11_000);
        assert!(!view.is_live("a", 10_500));
        assert!(view.dead(20_000).is_empty(), "a goodbye is not a death");
        assert_eq!(view.last_seen("a"), Some(10_000));
        view.prune(10_001);
        assert_eq!(view.last_seen("a"), None);
    }
}
