//! What every worker of a gateway shares.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use actix::Addr;
use rt_shared::broadcast_client::BroadcastClient;
use rt_shared::config::Config;
use rt_shared::health::Health;

use crate::connection::Connection;
use crate::hub::{ConnId, Hub};
use crate::metrics::GatewayMetrics;

pub struct AppState {
    pub config: Arc<Config>,
    pub hub: Arc<Hub>,
    pub broadcast: BroadcastClient,
    /// The node's NATS bus, for requests to services without a typed client (RPC).
    pub bus: rt_shared::Bus,
    pub metrics: GatewayMetrics,
    pub connections: Connections,
    pub health: Health,
    /// This node's name, shown to clients in `connect`.
    pub node: String,
    next_conn_id: AtomicU64,
}

impl AppState {
    pub fn new(
        config: Arc<Config>,
        hub: Arc<Hub>,
        bus: rt_shared::Bus,
        metrics: GatewayMetrics,
        health: Health,
        node: String,
    ) -> Self {
        Self {
            config,
            hub,
            broadcast: BroadcastClient::new(bus.clone()),
            bus,
            metrics,
            connections: Connections::default(),
            health,
            node,
            next_conn_id: AtomicU64::new(1),
        }
    }

    pub fn next_conn_id(&self) -> ConnId {
        self.next_conn_id.fetch_add(1, Ordering::Relaxed)
    }
}

/// Every live connection of this node, for draining and (later) kicks.
#[derive(Default)]
pub struct Connections {
    by_id: Mutex<HashMap<ConnId, Addr<Connection>>>,
}

impl Connections {
    pub fn insert(&self, id: ConnId, addr: Addr<Connection>) {
        if let Ok(mut map) = self.by_id.lock() {
            map.insert(id, addr);
        }
    }

    pub fn remove(&self, id: ConnId) {
        if let Ok(mut map) = self.by_id.lock() {
            map.remove(&id);
        }
    }

    pub fn len(&self) -> usize {
        self.by_id.lock().map_or(0, |m| m.len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn all(&self) -> Vec<Addr<Connection>> {
        self.by_id
            .lock()
            .map(|m| m.values().cloned().collect())
            .unwrap_or_default()
    }
}
