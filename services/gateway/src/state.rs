//! What every worker of a gateway shares.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use actix::Addr;
use rt_shared::broadcast_client::BroadcastClient;
use rt_shared::config::Config;
use rt_shared::health::Health;
use rt_shared::kv::Buckets;
use rt_shared::session_client::SessionClient;

use crate::admission::Admission;
use crate::connection::Connection;
use crate::hub::{ConnId, Hub};
use crate::metrics::GatewayMetrics;
use crate::node::SessionReporter;
use crate::presence::PresenceTable;

/// Session events a node holds while the session service is slow.
const SESSION_EVENTS_BOUND: usize = 100_000;

pub struct AppState {
    pub config: Arc<Config>,
    pub hub: Arc<Hub>,
    pub broadcast: BroadcastClient,
    pub session: SessionClient,
    /// The node's NATS bus, for requests to services without a typed client (RPC).
    pub bus: rt_shared::Bus,
    /// Shared state in NATS KV, set once NATS answers; unset when the server
    /// has no JetStream (presence is then unavailable, everything else works).
    pub buckets: std::sync::OnceLock<Buckets>,
    pub presence: PresenceTable,
    pub reporter: SessionReporter,
    pub admission: Admission,
    pub metrics: GatewayMetrics,
    pub connections: Connections,
    pub health: Health,
    /// This node's name, shown to clients in `connect`.
    pub node: String,
    pub started_ms: u64,
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
        let gateway = &config.gateway;
        Self {
            hub,
            broadcast: BroadcastClient::new(bus.clone()),
            session: SessionClient::new(bus.clone()),
            bus,
            buckets: std::sync::OnceLock::new(),
            presence: PresenceTable::new(node.clone(), config.session.presence_max_list),
            reporter: SessionReporter::new(SESSION_EVENTS_BOUND),
            admission: Admission::new(
                gateway.connect_rate,
                gateway.connect_burst,
                gateway.admission_retry_after_ms,
            ),
            metrics,
            connections: Connections::default(),
            health,
            node,
            started_ms: rt_shared::telemetry::now_ms(),
            next_conn_id: AtomicU64::new(1),
            config,
        }
    }

    pub fn next_conn_id(&self) -> ConnId {
        self.next_conn_id.fetch_add(1, Ordering::Relaxed)
    }
}

/// Every live connection of this node, by id and by user, for draining and kicks.
#[derive(Default)]
pub struct Connections {
    inner: Mutex<Registry>,
}

#[derive(Default)]
struct Registry {
    by_id: HashMap<ConnId, Addr<Connection>>,
    by_user: HashMap<String, HashSet<ConnId>>,
}

impl Connections {
    pub fn insert(&self, id: ConnId, addr: Addr<Connection>) {
        if let Ok(mut registry) = self.inner.lock() {
            registry.by_id.insert(id, addr);
        }
    }

    /// Records who a connection is, once its `connect` succeeded.
    pub fn set_user(&self, id: ConnId, user: &str) {
        if let Ok(mut registry) = self.inner.lock() {
            registry
                .by_user
                .entry(user.to_owned())
                .or_default()
                .insert(id);
        }
    }

    pub fn remove(&self, id: ConnId, user: &str) {
        if let Ok(mut registry) = self.inner.lock() {
            registry.by_id.remove(&id);
            if let Some(ids) = registry.by_user.get_mut(user) {
                ids.remove(&id);
                if ids.is_empty() {
                    registry.by_user.remove(user);
                }
            }
        }
    }

    pub fn of_user(&self, user: &str) -> Vec<Addr<Connection>> {
        let Ok(registry) = self.inner.lock() else {
            return Vec::new();
        };
        registry
            .by_user
            .get(user)
            .map(|ids| {
                ids.iter()
                    .filter_map(|id| registry.by_id.get(id).cloned())
                    .collect()
            })
            .unwrap_or_default()
    }

    pub fn len(&self) -> usize {
        self.inner.lock().map_or(0, |r| r.by_id.len())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn all(&self) -> Vec<Addr<Connection>> {
        self.inner
            .lock()
            .map(|r| r.by_id.values().cloned().collect())
            .unwrap_or_default()
    }
}
