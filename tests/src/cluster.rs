//! NATS + broadcast + gateways, started in the test's actix system.

use std::net::SocketAddr;

use rt_broadcast::BroadcastHandle;
use rt_compute::ComputeHandle;
use rt_gateway::GatewayHandle;
use rt_session::SessionHandle;
use rt_shared::config::Config;

use crate::nats::NatsServer;
use crate::ws_client::{WsClient, WsEncoding};

pub const API_KEY: &str = "test-api-key";
/// The HS256 secret test tokens are signed with ([`crate::tokens`]).
pub const JWT_SECRET: &str = "test-jwt-secret-of-reasonable-length";

pub struct TestCluster {
    pub nats: NatsServer,
    pub config: Config,
    pub broadcast: Option<BroadcastHandle>,
    pub compute: Option<ComputeHandle>,
    pub sessions: Vec<SessionHandle>,
    pub gateways: Vec<GatewayHandle>,
    /// The process's telemetry, when this cluster installed it (the first in a test binary).
    pub telemetry: Option<std::sync::Arc<rt_shared::telemetry::Telemetry>>,
}

/// The configuration tests start from: ephemeral ports, a known API key,
/// two workers per gateway, a `chat` namespace and a read-only `feed` one.
pub fn test_config(nats_url: &str) -> Config {
    let mut config = Config::default();
    config.nats.url = nats_url.to_owned();
    config.log.filter = "warn".into();
    config.nats.request_timeout_ms = 2_000;
    config.gateway.http_addr = "127.0.0.1:0".into();
    config.gateway.api_key = rt_shared::config::Secret::new(API_KEY);
    config.gateway.workers = 2;
    config.gateway.drain_timeout_ms = 2_000;
    config.broadcast.http_addr = "127.0.0.1:0".into();
    // broadcast.shards stays at its default (one, on the main thread); the
    // broadcast processes in failures.rs run two.
    config.compute.http_addr = "127.0.0.1:0".into();
    config.compute.workers = 2;
    // Cheap argon2 in tests; the benchmark uses the production cost.
    config.compute.argon2_memory_kib = 1024;
    config.compute.argon2_iterations = 1;
    config.session.http_addr = "127.0.0.1:0".into();
    config.session.database_url = "sqlite::memory:".into();
    config.session.jwt_hmac_secret = rt_shared::config::Secret::new(JWT_SECRET);
    config.session.jwt_leeway_secs = 0;
    // Fast enough that tests of a dying gateway take seconds, not minutes.
    config.gateway.heartbeat_ms = 200;
    config.session.node_ttl_ms = 1_000;
    let chat = rt_shared::config::NamespaceConfig {
        history_size: 1_000,
        ..Default::default()
    };
    config.namespaces.insert("chat".into(), chat);
    let feed = rt_shared::config::NamespaceConfig {
        client_publish: false,
        ..Default::default()
    };
    config.namespaces.insert("feed".into(), feed);
    // "room:<x>": presence and join/leave pushes, token holders only.
    let room = rt_shared::config::NamespaceConfig {
        presence: true,
        join_leave: true,
        allow_anonymous: false,
        ..Default::default()
    };
    config.namespaces.insert("room".into(), room);
    // "priv:<x>": private (token `channels` claim or a channel token).
    let private = rt_shared::config::NamespaceConfig {
        private: true,
        allow_anonymous: false,
        ..Default::default()
    };
    config.namespaces.insert("priv".into(), private);
    // "sys:stats": the services' figures, for operator tokens only. Published
    // only by tests that turn it on (`telemetry.stats_interval_ms`), so the
    // others count metrics and spans without it.
    let sys = rt_shared::config::NamespaceConfig {
        history_size: 60,
        private: true,
        allow_anonymous: false,
        client_publish: false,
        ..Default::default()
    };
    config
        .namespaces
        .insert(rt_shared::stats::NAMESPACE.into(), sys);
    config.telemetry.stats_interval_ms = 0;
    config
}

impl TestCluster {
    /// One broadcast, one session service and one gateway with [`test_config`].
    pub async fn start() -> Self {
        Self::start_with(1, |_| {}).await
    }

    /// `gateways` gateways; `adjust` edits the config first.
    pub async fn start_with(gateways: usize, adjust: impl FnOnce(&mut Config)) -> Self {
        let nats = NatsServer::start();
        let mut config = test_config(&nats.url());
        adjust(&mut config);
        let telemetry = std::sync::Arc::new(rt_shared::telemetry::init(
            &config.log,
            &config.telemetry,
            "rt-tests",
        ));
        let broadcast = rt_broadcast::run(config.clone())
            .await
            .expect("broadcast starts");
        let session = rt_session::run(config.clone())
            .await
            .expect("session service starts");
        let mut cluster = Self {
            nats,
            config,
            broadcast: Some(broadcast),
            compute: None,
            sessions: vec![session],
            gateways: Vec::new(),
            telemetry: Some(telemetry),
        };
        for _ in 0..gateways {
            cluster.add_gateway().await;
        }
        cluster
    }

    /// Only NATS and gateways (no broadcast): for tests of what happens when it is missing.
    pub async fn without_broadcast(adjust: impl FnOnce(&mut Config)) -> Self {
        let nats = NatsServer::start();
        let mut config = test_config(&nats.url());
        adjust(&mut config);
        let mut cluster = Self {
            nats,
            config,
            broadcast: None,
            compute: None,
            sessions: Vec::new(),
            gateways: Vec::new(),
            telemetry: None,
        };
        cluster.add_gateway().await;
        cluster
    }

    /// Starts the compute service with the built-in methods.
    pub async fn start_compute(&mut self) {
        let compute = rt_compute::run(self.config.clone())
            .await
            .expect("compute starts");
        self.compute = Some(compute);
    }

    /// Starts one more session service instance (they share the load).
    pub async fn add_session(&mut self) -> usize {
        let session = rt_session::run(self.config.clone())
            .await
            .expect("session service starts");
        self.sessions.push(session);
        self.sessions.len() - 1
    }

    pub async fn add_gateway(&mut self) -> usize {
        let gateway = rt_gateway::run(self.config.clone())
            .await
            .expect("gateway starts");
        self.gateways.push(gateway);
        self.gateways.len() - 1
    }

    /// Starts a gateway listening on `addr` (a restart on the address of one stopped
    /// before, as a crashed process coming back would); returns its index.
    pub async fn gateway_on(&mut self, addr: SocketAddr) -> usize {
        let mut config = self.config.clone();
        config.gateway.http_addr = addr.to_string();
        let gateway = rt_gateway::run(config).await.expect("gateway starts");
        self.gateways.push(gateway);
        self.gateways.len() - 1
    }

    pub fn addr(&self, gateway: usize) -> SocketAddr {
        self.gateways[gateway].addr()
    }

    pub fn ws_url(&self, gateway: usize) -> String {
        format!("ws://{}/ws", self.addr(gateway))
    }

    /// A connected client on gateway `gateway`.
    pub async fn client(&self, gateway: usize, encoding: WsEncoding) -> WsClient {
        WsClient::connected(&self.ws_url(gateway), encoding).await
    }

    /// A client on gateway `gateway` connected as `user` (a fresh test token).
    pub async fn client_as(&self, gateway: usize, encoding: WsEncoding, user: &str) -> WsClient {
        let args = serde_json::json!({ "token": crate::tokens::token(user) });
        WsClient::connected_with(&self.ws_url(gateway), encoding, args)
            .await
            .0
    }

    /// Sends buffered spans now (the exporter blocks, so off the event loop).
    pub async fn flush_telemetry(&self) {
        if let Some(telemetry) = self.telemetry.clone() {
            let _ = tokio::task::spawn_blocking(move || telemetry.flush()).await;
        }
    }

    /// A plain NATS client, as any backend service would use.
    pub async fn nats_client(&self) -> async_nats::Client {
        async_nats::connect(self.nats.url())
            .await
            .expect("NATS connect")
    }
}
