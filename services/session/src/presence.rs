//! Presence as the cluster sees it: a mirror of the presence bucket (each
//! gateway writes its own slice of each channel), answered from memory and
//! merged over the nodes that are alive.
//!
//! When a gateway dies without saying goodbye, its slices stay in the
//! bucket; they stop counting at once (the node is not alive), and the
//! instance that takes the node's reap lock sends `leave` for its listed
//! clients on channels with join/leave, then deletes the slices.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::kv;
use futures_util::StreamExt as _;
use rt_proto::ChannelName;
use rt_proto::session::{self, PresenceChange, PresenceReply, PresenceSlice, PresentClient};
use rt_shared::Bus;
use rt_shared::config::Config;
use rt_shared::session_client::publish_presence_change;

use crate::nodes::NodeView;

/// Slices by channel key (the escaped channel), then by node.
type Slices = HashMap<String, HashMap<String, PresenceSlice>>;

#[derive(Clone, Default)]
pub struct PresenceView {
    slices: Arc<Mutex<Slices>>,
}

impl PresenceView {
    fn apply(&self, key: &str, slice: Option<PresenceSlice>) {
        let Some((channel_key, node)) = key.split_once('.') else {
            return;
        };
        let Ok(mut slices) = self.slices.lock() else {
            return;
        };
        match slice {
            Some(slice) => {
                slices
                    .entry(channel_key.to_owned())
                    .or_default()
                    .insert(node.to_owned(), slice);
            }
            None => {
                if let Some(nodes) = slices.get_mut(channel_key) {
                    nodes.remove(node);
                    if nodes.is_empty() {
                        slices.remove(channel_key);
                    }
                }
            }
        }
    }

    /// Who is in `channel` on live nodes: the list, or only the count when
    /// it is over `max_list` (or a node only counted its clients).
    pub fn query(
        &self,
        channel: &ChannelName,
        nodes: &NodeView,
        now_ms: u64,
        max_list: usize,
    ) -> PresenceReply {
        let key = session::presence_key(channel, "");
        let channel_key = key.trim_end_matches('.');
        let Ok(slices) = self.slices.lock() else {
            return PresenceReply {
                clients: Some(Vec::new()),
                count: 0,
            };
        };
        let live: Vec<&PresenceSlice> = slices
            .get(channel_key)
            .map(|by_node| {
                by_node
                    .iter()
                    .filter(|(node, _)| nodes.is_live(node, now_ms))
                    .map(|(_, slice)| slice)
                    .collect()
            })
            .unwrap_or_default();
        let count: u64 = live.iter().map(|s| s.count).sum();
        let listable = count <= max_list as u64 && live.iter().all(|slice| slice.clients.is_some());
        let clients = listable.then(|| {
            live.iter()
                .flat_map(|slice| slice.clients.iter().flatten().cloned())
                .collect::<Vec<PresentClient>>()
        });
        PresenceReply { clients, count }
    }

    /// The slices of `node`, as (KV key, channel, slice).
    fn of_node(&self, node: &str) -> Vec<(String, PresenceSlice)> {
        let Ok(slices) = self.slices.lock() else {
            return Vec::new();
        };
        slices
            .iter()
            .filter_map(|(channel_key, by_node)| {
                by_node
                    .get(node)
                    .map(|slice| (format!("{channel_key}.{node}"), slice.clone()))
            })
            .collect()
    }

    /// Follows the bucket until an error.
    pub async fn follow(self, bucket: kv::Store) -> Result<(), String> {
        let mut watch = bucket
            .watch_with_history(">")
            .await
            .map_err(|e| e.to_string())?;
        while let Some(entry) = watch.next().await {
            let entry = entry.map_err(|e| e.to_string())?;
            match entry.operation {
                kv::Operation::Put => {
                    match rt_proto::internal::from_msgpack::<PresenceSlice>(&entry.value) {
                        Ok(slice) => self.apply(&entry.key, Some(slice)),
                        Err(error) => {
                            tracing::warn!(key = %entry.key, %error, "undecodable presence slice");
                        }
                    }
                }
                kv::Operation::Delete | kv::Operation::Purge => self.apply(&entry.key, None),
            }
        }
        Err("presence watch ended".into())
    }
}

/// Follows the presence bucket for as long as the service runs.
pub async fn follow_forever(view: PresenceView, bucket: kv::Store) {
    loop {
        if let Err(error) = view.clone().follow(bucket.clone()).await {
            tracing::warn!(%error, "watching presence again shortly");
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Sends `leave` for a dead node's clients and deletes its slices.
/// Returns how many clients left.
pub async fn reap_node(
    view: &PresenceView,
    bucket: &kv::Store,
    bus: &Bus,
    config: &Config,
    node: &str,
) -> usize {
    let mut left = 0;
    for (key, slice) in view.of_node(node) {
        let Some(channel) = session::presence_key_channel(&key) else {
            continue;
        };
        let join_leave = config.namespace(&channel).is_some_and(|ns| ns.join_leave);
        if join_leave && let Some(clients) = slice.clients {
            left += clients.len();
            let change = PresenceChange {
                joins: Vec::new(),
                leaves: clients,
            };
            // Shed like any join/leave when the lane is full.
            let _ = publish_presence_change(bus, &channel, &change);
        }
        if let Err(error) = bucket.delete(&key).await {
            tracing::warn!(%key, %error, "cannot delete a dead node's presence");
        }
    }
    left
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client(id: &str) -> PresentClient {
        PresentClient {
            client: id.into(),
            user: "u".into(),
            info: None,
        }
    }

    #[test]
    fn merges_live_nodes_and_counts_large_channels() {
        let channel = ChannelName::parse("chat:a").expect("valid");
        let view = PresenceView::default();
        let listed = PresenceSlice {
            clients: Some(vec![client("1"), client("2")]),
            count: 2,
        };
        view.apply(&session::presence_key(&channel, "n1"), Some(listed.clone()));
        view.apply(&session::presence_key(&channel, "n2"), Some(listed));
        let nodes = NodeView::new(1_000);
        // Only n1 beats: n2's clients do not count.
        nodes_beat(&nodes, "n1", 5_000);
        let reply = view.query(&channel, &nodes, 5_500, 10);
        assert_eq!(reply.count, 2);
        assert_eq!(reply.clients.map(|c| c.len()), Some(2));
        nodes_beat(&nodes, "n2", 5_000);
        let reply = view.query(&channel, &nodes, 5_500, 3);
        assert_eq!((reply.count, reply.clients), (4, None));
        view.apply(&session::presence_key(&channel, "n2"), None);
        assert_eq!(view.of_node("n2").len(), 0);
        assert_eq!(view.of_node("n1").len(), 1);
    }

    fn nodes_beat(nodes: &NodeView, node: &str, at_ms: u64) {
        nodes.beat_for_tests(node, at_ms);
    }
}
