//! NATS + broadcast + gateways, started in the test's actix system.

use std::net::SocketAddr;

use rt_broadcast::BroadcastHandle;
use rt_compute::ComputeHandle;
use rt_gateway::GatewayHandle;
use rt_shared::config::Config;

use crate::nats::NatsServer;
use crate::ws_client::{WsClient, WsEncoding};

pub const API_KEY: &str = "test-api-key";

pub struct TestCluster {
    pub nats: NatsServer,
    pub config: Config,
    pub broadcast: Option<BroadcastHandle>,
    pub compute: Option<ComputeHandle>,
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
    config.broadcast.shards = 2;
    config.compute.http_addr = "127.0.0.1:0".into();
    config.compute.workers = 2;
    // Cheap argon2 in tests; the benchmark uses the production cost.
    config.compute.argon2_memory_kib = 1024;
    config.compute.argon2_iterations = 1;
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
    config
}

impl TestCluster {
    /// One broadcast and one gateway with [`test_config`].
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
        let mut cluster = Self {
            nats,
            config,
            broadcast: Some(broadcast),
            compute: None,
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

    pub async fn add_gateway(&mut self) -> usize {
        let gateway = rt_gateway::run(self.config.clone())
            .await
            .expect("gateway starts");
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
