//! The compute service: CPU-heavy work kept off the gateways.
//!
//! - [`registry`]: RPC methods are functions registered by name; a method
//!   returns one reply or streams partial results first.
//! - [`methods`]: the built-ins (argon2id passwords, streaming statistics,
//!   geo search).
//! - [`ingest`]: one actor reads `rt.rpc.<method>` for every registered
//!   method (queue group `rt.compute`, so instances share the load), bounds
//!   the queue (113 with a retry hint when full) and hears cancellations.
//! - [`worker`]: a `SyncArbiter` of worker threads (default: one per core)
//!   that run the jobs, skipping those whose caller left or whose deadline passed.
//!
//! [`run`] starts the built-ins; [`run_with`] takes a registry with your own methods.

pub mod ingest;
pub mod methods;
pub mod metrics;
pub mod registry;
pub mod worker;

pub use registry::{Call, Method, MethodResult, Registry, RegistryError};

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize};
use std::sync::{Arc, Mutex};

use actix::prelude::*;
use rt_proto::{ChannelName, subject};
use rt_shared::config::Config;
use rt_shared::health::{Health, OpsState};
use rt_shared::metrics::{CommonMetrics, MetricsRegistry};
use rt_shared::{Bus, BusError, lag};

use crate::ingest::{Ingest, Stop};
use crate::metrics::ComputeMetrics;
use crate::worker::{Shared, Worker};

#[derive(Debug, thiserror::Error)]
pub enum ComputeError {
    #[error(transparent)]
    Bus(#[from] BusError),
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error("cannot serve health and metrics on {addr}: {source}")]
    Bind {
        addr: String,
        source: std::io::Error,
    },
}

/// A running compute service.
pub struct ComputeHandle {
    ops_addr: SocketAddr,
    ops: actix_web::dev::ServerHandle,
    ingest: Addr<Ingest>,
    health: Health,
    _stats: rt_shared::stats::StatsPublisher,
}

impl ComputeHandle {
    pub fn ops_addr(&self) -> SocketAddr {
        self.ops_addr
    }

    /// Leaves the queue groups (other instances take new calls), then stops.
    pub async fn stop(self) {
        self.health.set_draining();
        let _ = self.ingest.send(Stop).await;
        self.ops.stop(true).await;
    }
}

/// Starts the service with the built-in methods.
pub async fn run(config: Config) -> Result<ComputeHandle, ComputeError> {
    let mut registry = Registry::new();
    methods::register_builtins(&mut registry, &config.compute)?;
    run_with(config, registry).await
}

/// Starts the service with `registry`'s methods.
pub async fn run_with(config: Config, registry: Registry) -> Result<ComputeHandle, ComputeError> {
    let metrics_registry = MetricsRegistry::default();
    let common = CommonMetrics::new(&metrics_registry);
    let metrics = ComputeMetrics::new(&metrics_registry);
    let health = Health::default();
    // Health is served from the start; readiness waits for NATS.
    let state = OpsState {
        health: health.clone(),
        metrics: metrics_registry.clone(),
    };
    let (server, ops_addr) =
        rt_shared::health::serve(&config.compute.http_addr, state).map_err(|source| {
            ComputeError::Bind {
                addr: config.compute.http_addr.clone(),
                source,
            }
        })?;
    let ops = server.handle();
    actix_rt::spawn(server);
    let bus = Bus::connect(&config.nats, "rt-compute", health.clone(), common.clone()).await?;
    let workers = match config.compute.workers {
        0 => std::thread::available_parallelism().map_or(1, usize::from),
        n => n,
    };
    let shared = Arc::new(Shared {
        bus: bus.clone(),
        metrics,
        workers,
        capacity: config.compute.queue_capacity,
        queued: AtomicUsize::new(0),
        cancels: Mutex::new(HashMap::new()),
        job_time_us: AtomicU64::new(0),
    });
    let worker_shared = shared.clone();
    let worker_addr = SyncArbiter::start(workers, move || Worker::new(worker_shared.clone()));

    let mut subscriptions = Vec::new();
    let mut names: Vec<&str> = registry.names().collect();
    names.sort_unstable();
    for name in &names {
        // Names were validated at registration.
        let Ok(method) = ChannelName::parse(name) else {
            continue;
        };
        subscriptions.push(
            bus.queue_subscribe(subject::rpc(&method), subject::COMPUTE_QUEUE)
                .await?,
        );
    }
    subscriptions.push(
        bus.subscribe(subject::wildcard(subject::CANCEL_PREFIX))
            .await?,
    );
    // Connected, then the subscriptions registered with the server, before
    // this service reports ready.
    bus.flush().await?;
    bus.sync().await?;
    tracing::info!(methods = ?names, workers, "compute methods registered");
    let ingest = Ingest::create(move |ctx| {
        for subscription in subscriptions {
            ctx.add_stream(subscription);
        }
        Ingest::new(shared, registry, worker_addr)
    });
    lag::spawn_probe("main", common, true);
    let stats = rt_shared::stats::spawn_publisher(
        &config,
        bus,
        metrics_registry,
        "compute",
        None,
        rt_shared::stats::COMPUTE,
    );

    health.set_warmed();
    tracing::info!(%ops_addr, workers, nats = %config.nats.url, "compute ready");
    Ok(ComputeHandle {
        ops_addr,
        ops,
        ingest,
        health,
        _stats: stats,
    })
}
