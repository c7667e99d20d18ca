//! The broadcast service: the publication path.
//!
//! - [`ingest`]: one actor reads `rt.publish.>` (any service) and the internal
//!   `rt.bc.*` subjects (gateways), validates, and routes by channel.
//! - [`shard`]: sequencer actors, each the single owner of its channels'
//!   offsets, epochs and hot history; they deliver on `rt.deliver.<channel>`.
//! - [`history`]: one channel's state: consecutive offsets, the history window
//!   (size and TTL per namespace), recovery and idempotency keys.
//!
//! [`run`] starts it all inside the current actix system and returns a handle.

pub mod history;
pub mod ingest;
pub mod metrics;
pub mod shard;

use std::net::SocketAddr;
use std::sync::Arc;

use actix::prelude::*;
use rt_proto::subject;
use rt_shared::config::Config;
use rt_shared::health::{Health, OpsState};
use rt_shared::metrics::{CommonMetrics, MetricsRegistry};
use rt_shared::{Bus, BusError, lag};

use crate::ingest::{Ingest, Stop};
use crate::metrics::BroadcastMetrics;
use crate::shard::Shard;

#[derive(Debug, thiserror::Error)]
pub enum BroadcastError {
    #[error(transparent)]
    Bus(#[from] BusError),
    #[error("cannot serve health and metrics on {addr}: {source}")]
    Bind {
        addr: String,
        source: std::io::Error,
    },
}

/// A running broadcast service.
pub struct BroadcastHandle {
    ops_addr: SocketAddr,
    ops: actix_web::dev::ServerHandle,
    ingest: Addr<Ingest>,
    arbiters: Vec<Arbiter>,
    health: Health,
}

impl BroadcastHandle {
    /// Where `/healthz`, `/readyz` and `/metrics` are served.
    pub fn ops_addr(&self) -> SocketAddr {
        self.ops_addr
    }

    /// Stops taking requests (the queue group hands them to other instances),
    /// then stops the shards and the ops server.
    pub async fn stop(self) {
        self.health.set_draining();
        let _ = self.ingest.send(Stop).await;
        for arbiter in &self.arbiters {
            arbiter.stop();
        }
        self.ops.stop(true).await;
    }
}

/// Starts the service in the current actix system.
pub async fn run(config: Config) -> Result<BroadcastHandle, BroadcastError> {
    let config = Arc::new(config);
    let registry = MetricsRegistry::default();
    let common = CommonMetrics::new(&registry);
    let metrics = BroadcastMetrics::new(&registry);
    let health = Health::default();
    // Health is served from the start; readiness waits for NATS.
    let state = OpsState {
        health: health.clone(),
        metrics: registry,
    };
    let (server, ops_addr) =
        rt_shared::health::serve(&config.broadcast.http_addr, state).map_err(|source| {
            BroadcastError::Bind {
                addr: config.broadcast.http_addr.clone(),
                source,
            }
        })?;
    let ops = server.handle();
    actix_rt::spawn(server);
    let bus = Bus::connect(&config.nats, "rt-broadcast", health.clone(), common.clone()).await?;

    let shard_count = match config.broadcast.shards {
        0 => std::thread::available_parallelism().map_or(1, usize::from),
        n => n,
    };
    let mut arbiters = Vec::with_capacity(shard_count);
    let mut shards = Vec::with_capacity(shard_count);
    for index in 0..shard_count {
        let arbiter = Arbiter::new();
        let (bus, config, metrics, common) =
            (bus.clone(), config.clone(), metrics.clone(), common.clone());
        let shard = Shard::start_in_arbiter(&arbiter.handle(), move |_| {
            lag::spawn_probe(format!("shard-{index}"), common, false);
            Shard::new(bus, config, metrics)
        });
        shards.push(shard);
        arbiters.push(arbiter);
    }

    let queue = subject::BROADCAST_QUEUE;
    let mut subscriptions = Vec::new();
    for prefix in [
        subject::PUBLISH_PREFIX,
        subject::INTERNAL_PUBLISH_PREFIX,
        subject::HISTORY_PREFIX,
        subject::RECOVER_PREFIX,
    ] {
        subscriptions.push(
            bus.queue_subscribe(subject::wildcard(prefix), queue)
                .await?,
        );
    }
    // Connected, then the subscriptions registered with the server, before
    // this service reports ready.
    bus.flush().await?;
    bus.sync().await?;
    let ingest_bus = bus.clone();
    let ingest_config = config.clone();
    let ingest = Ingest::create(move |ctx| {
        for subscription in subscriptions {
            ctx.add_stream(subscription);
        }
        Ingest::new(ingest_bus, ingest_config, metrics, shards)
    });
    lag::spawn_probe("main", common, true);

    health.set_warmed();
    tracing::info!(%ops_addr, shards = shard_count, nats = %config.nats.url, "broadcast ready");
    Ok(BroadcastHandle {
        ops_addr,
        ops,
        ingest,
        arbiters,
        health,
    })
}
