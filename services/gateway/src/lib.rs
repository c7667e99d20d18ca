//! The gateway: connections only.
//!
//! - [`ws_route`] negotiates the encoding and starts one [`connection`] actor
//!   per WebSocket; [`commands`] is what each client command does.
//! - [`hub`] is the channel registry and local fan-out (one NATS subscription
//!   per channel per node, each publication encoded once per encoding).
//! - [`outbound`] is each connection's byte-bounded queue; [`direct`] lets
//!   it write a frame for a quiet, idle connection straight to the socket.
//! - [`identity`]: `connect` through the session service, token expiry and
//!   `refresh`, private channels, presence; [`admission`]: the token bucket
//!   on new connections.
//! - [`presence`]: this node's share of presence and its join/leave batches;
//!   [`node`]: heartbeat, flushes, session events and kicks.
//! - [`http_api`] serves `/api/*` for backend services; [`demo`], the demo
//!   app (chat and ops dashboard) at `/`.
//!
//! [`run`] starts it inside the current actix system: one actix worker per
//! core (configurable) and a runtime-lag probe on each.

pub mod admission;
pub mod commands;
pub mod connection;
pub mod demo;
pub mod direct;
pub mod errors;
pub mod handoff;
pub mod http_api;
pub mod hub;
pub mod identity;
pub mod metrics;
pub mod node;
pub mod outbound;
pub mod presence;
pub mod rpc;
pub mod state;
pub mod ws_route;
pub mod ws_upgrade;

use std::cell::Cell;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix_http::{HttpService, KeepAlive};
use actix_service::{fn_service, map_config};
use actix_web::dev::AppConfig;
use actix_web::{App, web};
use rt_proto::CloseCode;
use rt_shared::config::Config;
use rt_shared::health::{Health, OpsState};
use rt_shared::metrics::{CommonMetrics, MetricsRegistry};
use rt_shared::{Bus, BusError, lag};

use crate::connection::Disconnect;
use crate::hub::Hub;
use crate::metrics::GatewayMetrics;
use crate::node::NodeTasks;
use crate::state::AppState;
use rt_shared::kv::Buckets;

#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error(transparent)]
    Bus(#[from] BusError),
    #[error("invalid gateway.node_name {0:?}: use 1 to 64 of A-Z a-z 0-9 - _")]
    NodeName(String),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: String,
        source: std::io::Error,
    },
}

/// A running gateway.
pub struct GatewayHandle {
    addr: SocketAddr,
    server: actix_web::dev::ServerHandle,
    app: Arc<AppState>,
    tasks: NodeTasks,
    _stats: rt_shared::stats::StatsPublisher,
}

impl GatewayHandle {
    /// The bound HTTP/WebSocket address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Graceful shutdown: readiness turns false, no new connections, every
    /// socket gets `disconnect` and close 4005 with a jittered
    /// `retry_after_ms` (so clients do not all come back at once), then the
    /// server stops once they are gone or the drain timeout passes.
    pub async fn drain(self) {
        let config = &self.app.config.gateway;
        self.app.health.set_draining();
        self.server.pause().await;
        let base = config.drain_retry_after_ms;
        for connection in self.app.connections.all() {
            connection.do_send(Disconnect {
                code: CloseCode::DRAINING,
                reason: "server draining",
                reconnect: true,
                retry_after_ms: Some(base + fastrand::u64(0..=base)),
            });
        }
        let deadline = Instant::now() + Duration::from_millis(config.drain_timeout_ms);
        while !self.app.connections.is_empty() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tracing::info!(remaining = self.app.connections.len(), "drained");
        self.tasks.stop().await;
        self.server.stop(true).await;
    }

    /// Stops at once, without telling clients or the cluster (as a crash
    /// would, short of the process dying).
    pub async fn stop(self) {
        self.tasks.abort().await;
        self.server.stop(false).await;
    }

    /// This node's name.
    pub fn node(&self) -> &str {
        &self.app.node
    }
}

thread_local! {
    static PROBE_STARTED: Cell<bool> = const { Cell::new(false) };
}

/// Starts the gateway in the current actix system.
pub async fn run(config: Config) -> Result<GatewayHandle, GatewayError> {
    let config = Arc::new(config);
    let registry = MetricsRegistry::default();
    let common = CommonMetrics::new(&registry);
    let metrics = GatewayMetrics::new(&registry);
    let health = Health::default();
    let bus = Bus::connect(&config.nats, "rt-gateway", health.clone(), common.clone()).await?;
    let bus_for_flush = bus.clone();
    let node = match config.gateway.node_name.as_str() {
        "" => format!("gw-{:06x}", fastrand::u32(..0x100_0000)),
        name if rt_proto::session::valid_node_name(name) => name.to_owned(),
        name => {
            return Err(GatewayError::NodeName(name.to_owned()));
        }
    };

    let hub = Hub::new(
        bus.clone(),
        metrics.clone(),
        config.gateway.max_pending_while_subscribing,
    );
    hub.watch_nats(
        common
            .nats_events
            .get_or_create(&rt_shared::metrics::EventLabel {
                event: "slow_consumer",
            })
            .clone(),
    );
    let app = Arc::new(AppState::new(
        config.clone(),
        hub,
        bus,
        metrics,
        health.clone(),
        node.clone(),
    ));
    let workers = match config.gateway.workers {
        0 => std::thread::available_parallelism().map_or(1, usize::from),
        n => n,
    };
    let ops = OpsState {
        health: health.clone(),
        metrics: registry.clone(),
    };
    // The main thread runs the NATS connection's tasks: probe it too, and
    // let it report the process's memory.
    lag::spawn_probe("main", common.clone(), true);
    let factory_app = app.clone();
    let demo = config.gateway.demo;
    let listener = listen(&config.gateway.http_addr)?;
    let addr = listener.local_addr().map_err(|source| GatewayError::Bind {
        addr: config.gateway.http_addr.clone(),
        source,
    })?;
    let server = actix_server::Server::build()
        .workers(workers)
        .disable_signals()
        .shutdown_timeout(1)
        .listen("rt-gateway", listener, move || {
            // The factory runs once per worker thread: give each worker its probe.
            if !PROBE_STARTED.replace(true) {
                let name = std::thread::current().name().unwrap_or("worker").to_owned();
                lag::spawn_probe(name, common.clone(), false);
            }
            let ops = ops.clone();
            let app = App::new()
                .app_data(web::Data::new(factory_app.clone()))
                .configure(|cfg| rt_shared::health::configure(cfg, ops))
                .configure(http_api::configure)
                .route(ws_upgrade::PATH, web::get().to(ws_route::ws_route))
                .configure(|cfg| demo::configure(cfg, demo));
            let upgrade_app = factory_app.clone();
            // WebSocket upgrades leave the HTTP/1 dispatcher (see ws_upgrade).
            let upgrade = fn_service(move |upgrade: ws_upgrade::Upgrade| {
                let app = upgrade_app.clone();
                async move {
                    if let Err(error) = ws_upgrade::serve(app, upgrade).await {
                        // A client that left mid-write; nothing to answer.
                        tracing::debug!(%error, "websocket socket error");
                    }
                    Ok::<(), actix_http::Error>(())
                }
            });
            HttpService::build()
                // actix-web's defaults for HttpServer.
                .keep_alive(KeepAlive::default())
                .client_request_timeout(Duration::from_secs(5))
                .client_disconnect_timeout(Duration::from_secs(1))
                // Real-time frames are small: never let Nagle hold one back waiting for an ACK.
                .tcp_nodelay(true)
                .local_addr(addr)
                .upgrade(upgrade)
                .finish(map_config(app, |_| AppConfig::default()))
                .tcp()
        })
        .map_err(|source| GatewayError::Bind {
            addr: config.gateway.http_addr.clone(),
            source,
        })?;
    let server = server.run();
    let handle = server.handle();
    actix_rt::spawn(server);
    // Health is served from here on; ready once NATS is up.
    bus_for_flush.flush().await?;
    match Buckets::open(&bus_for_flush).await {
        Ok(buckets) => {
            let _ = app.buckets.set(buckets);
        }
        Err(error) => {
            tracing::warn!(%error, "no NATS KV: presence is unavailable on this node");
        }
    }
    let tasks = node::start(app.clone()).await?;
    let stats = rt_shared::stats::spawn_publisher(
        &config,
        app.bus.clone(),
        registry,
        "gateway",
        Some(&node),
        rt_shared::stats::GATEWAY,
    );
    health.set_warmed();
    tracing::info!(%addr, node, workers, nats = %config.nats.url, "gateway ready");
    Ok(GatewayHandle {
        addr,
        server: handle,
        app,
        tasks,
        _stats: stats,
    })
}

/// The gateway's listening socket (bound here rather than by the server so
/// its address is known when the port is 0). The backlog is actix-server's
/// default: connections arriving in a burst wait there to be accepted.
fn listen(addr: &str) -> Result<std::net::TcpListener, GatewayError> {
    let bind_error = |source| GatewayError::Bind {
        addr: addr.to_owned(),
        source,
    };
    let socket_addr: SocketAddr = addr
        .parse()
        .map_err(|e| bind_error(std::io::Error::new(std::io::ErrorKind::InvalidInput, e)))?;
    let socket = if socket_addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()
    } else {
        tokio::net::TcpSocket::new_v6()
    }
    .map_err(bind_error)?;
    socket.set_reuseaddr(true).map_err(bind_error)?;
    socket.bind(socket_addr).map_err(bind_error)?;
    let listener = socket.listen(2048).map_err(bind_error)?;
    listener.into_std().map_err(bind_error)
}
