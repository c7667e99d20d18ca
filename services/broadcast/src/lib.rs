//! The broadcast service: the publication path.
//!
//! - [`ingest`]: one actor reads `rt.publish.>` (any service) and the internal
//!   `rt.bc.*` subjects (gateways), validates, and routes by channel.
//! - [`shard`]: sequencer actors, each the single owner of its channels'
//!   offsets, epochs and hot history; they write each publication to the
//!   JetStream record and, once it is stored, deliver it on
//!   `rt.deliver.<channel>` and acknowledge it.
//! - [`history`]: one channel's committed state: consecutive offsets, the hot
//!   window (size and TTL per namespace), recovery and idempotency keys.
//! - [`store`]: the JetStream record (a stream per namespace, a subject per
//!   channel) and the pipelined writer.
//! - [`partitions`]: which instance sequences which channels: partitions
//!   owned through leases in NATS KV, so several instances can run at once.
//!
//! [`run`] starts it all inside the current actix system and returns a handle.

pub mod history;
pub mod ingest;
pub mod metrics;
pub mod partitions;
pub mod shard;
pub mod store;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use rt_proto::subject;
use rt_shared::config::{Config, HistoryStore};
use rt_shared::health::{Health, OpsState};
use rt_shared::metrics::{CommonMetrics, MetricsRegistry};
use rt_shared::{Bus, BusError, lag};

use crate::ingest::{Ingest, Stop};
use crate::metrics::BroadcastMetrics;
use crate::partitions::{LeaseHandle, Leases, Ownership};
use crate::shard::Shard;
use crate::store::{Record, StoreError};

#[derive(Debug, thiserror::Error)]
pub enum BroadcastError {
    #[error(transparent)]
    Bus(#[from] BusError),
    #[error("cannot serve health and metrics on {addr}: {source}")]
    Bind {
        addr: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// A running broadcast service.
pub struct BroadcastHandle {
    ops_addr: SocketAddr,
    ops: actix_web::dev::ServerHandle,
    ingest: Addr<Ingest>,
    arbiters: Vec<Arbiter>,
    health: Health,
    leases: Option<LeaseHandle>,
    release_timeout: std::time::Duration,
    instance: Arc<str>,
    ownership: Arc<Ownership>,
    _stats: rt_shared::stats::StatsPublisher,
}

impl BroadcastHandle {
    /// Where `/healthz`, `/readyz` and `/metrics` are served.
    pub fn ops_addr(&self) -> SocketAddr {
        self.ops_addr
    }

    /// This instance's name in the partition leases.
    pub fn instance(&self) -> &str {
        &self.instance
    }

    /// How many channel partitions this instance sequences now.
    pub fn partitions(&self) -> u32 {
        self.ownership.count()
    }

    /// Whether this instance sequences `channel` now.
    pub fn owns(&self, channel: &rt_proto::ChannelName) -> bool {
        self.ownership.owns(subject::partition(channel))
    }

    /// Stops gracefully: gives its partitions away (their writes in flight
    /// settle, the leases are deleted so another instance takes over at once),
    /// then stops the shards and the ops server.
    pub async fn stop(self) {
        self.health.set_draining();
        if let Some(leases) = self.leases {
            leases.stop(self.release_timeout * 2).await;
        }
        let _ = self.ingest.send(Stop).await;
        for arbiter in &self.arbiters {
            arbiter.stop();
        }
        self.ops.stop(true).await;
    }

    /// Stops at once, as a crash would: nothing is released or drained, the
    /// leases expire by themselves and writes in flight are abandoned.
    pub async fn kill(self) {
        if let Some(leases) = self.leases {
            leases.abort();
        }
        for arbiter in &self.arbiters {
            arbiter.stop();
        }
        let _ = self.ingest.send(Stop).await;
        self.ops.stop(false).await;
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
        metrics: registry.clone(),
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
    // Connected before anything needs JetStream.
    bus.flush().await?;
    let b = &config.broadcast;
    let instance: Arc<str> = if b.instance_id.is_empty() {
        format!("b-{:08x}", fastrand::u32(..)).into()
    } else {
        b.instance_id.as_str().into()
    };
    let record = match b.history_store {
        HistoryStore::Jetstream => {
            let record = Arc::new(Record::new(bus.client().clone(), config.clone()));
            record.ensure_streams().await?;
            Some(record)
        }
        HistoryStore::Memory => None,
    };
    let ttl = Duration::from_millis(b.lease_ttl_ms);
    let bucket = match partitions::open_bucket(&bus, ttl).await {
        Ok(bucket) => Some(bucket),
        Err(error) if record.is_none() => {
            tracing::warn!(%error, "no JetStream for partition leases: running as the only broadcast instance");
            None
        }
        Err(error) => return Err(error.into()),
    };
    let ownership = Arc::new(if bucket.is_some() {
        Ownership::none()
    } else {
        Ownership::all()
    });

    let mut arbiters = Vec::with_capacity(shard_count);
    let mut shards = Vec::with_capacity(shard_count);
    for index in 0..shard_count {
        let (bus, config, metrics, record, ownership, instance) = (
            bus.clone(),
            config.clone(),
            metrics.clone(),
            record.clone(),
            ownership.clone(),
            instance.clone(),
        );
        let new_shard = move || Shard::new(bus, config, metrics, record, ownership, instance);
        if shard_count == 1 {
            // One sequencer shares the main thread with the NATS connection:
            // a publication is read, written, acknowledged and delivered
            // without waking another thread.
            shards.push(new_shard().start());
        } else {
            let arbiter = Arbiter::new();
            let common = common.clone();
            shards.push(Shard::start_in_arbiter(&arbiter.handle(), move |_| {
                lag::spawn_probe(format!("shard-{index}"), common, false);
                new_shard()
            }));
            arbiters.push(arbiter);
        }
    }

    // Public and older unpartitioned subjects: every instance reads them and
    // the partition's owner acts (no queue group, so a publisher's order holds).
    let mut subscriptions = Vec::new();
    for prefix in [
        subject::PUBLISH_PREFIX,
        subject::INTERNAL_PUBLISH_PREFIX,
        subject::HISTORY_PREFIX,
        subject::RECOVER_PREFIX,
    ] {
        subscriptions.push(bus.subscribe(subject::wildcard(prefix)).await?);
    }
    if bucket.is_none() {
        subscriptions.push(
            bus.subscribe(subject::wildcard(subject::PARTITION_PREFIX))
                .await?,
        );
    }
    let ingest_bus = bus.clone();
    let ingest_config = config.clone();
    let ingest_metrics = metrics.clone();
    let ingest_ownership = ownership.clone();
    let ingest_shards = shards.clone();
    let ingest = Ingest::create(move |ctx| {
        for subscription in subscriptions {
            ctx.add_stream(subscription);
        }
        Ingest::new(
            ingest_bus,
            ingest_config,
            ingest_metrics,
            ingest_shards,
            ingest_ownership,
        )
    });
    let release_timeout = Duration::from_millis(b.history_timeout_ms) + Duration::from_secs(1);
    let leases = match bucket {
        Some(bucket) => Some(
            Leases::new(
                bucket,
                bus.clone(),
                instance.clone(),
                ttl,
                release_timeout,
                ownership.clone(),
                ingest.clone(),
                shards,
                metrics.clone(),
            )
            .start(ttl * 2)
            .await?,
        ),
        None => {
            metrics.partitions_owned.set(i64::from(ownership.count()));
            None
        }
    };
    // The subscriptions registered with the server before this service reports ready.
    bus.flush().await?;
    bus.sync().await?;
    lag::spawn_probe("main", common, true);
    let stats = rt_shared::stats::spawn_publisher(
        &config,
        bus,
        registry,
        "broadcast",
        None,
        rt_shared::stats::BROADCAST,
    );

    health.set_warmed();
    tracing::info!(
        %ops_addr,
        shards = shard_count,
        instance = &*instance,
        history = ?config.broadcast.history_store,
        partitions = ownership.count(),
        nats = %config.nats.url,
        "broadcast ready"
    );
    Ok(BroadcastHandle {
        ops_addr,
        ops,
        ingest,
        arbiters,
        health,
        leases,
        release_timeout,
        instance,
        ownership,
        _stats: stats,
    })
}
