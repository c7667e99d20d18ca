//! The session service: who may connect and subscribe.
//!
//! - [`auth`]: JWT verification (HS256, RS256, ES256).
//! - [`core`]: what each request does: `connect` authentication with the
//!   per-user connection limit and session resume, `refresh`, channel
//!   tokens, presence reads, revocations, connection events.
//! - [`limits`]: the per-user connection count (compare-and-set in NATS KV;
//!   113 rather than an unchecked admission when it cannot be counted).
//! - [`revocations`]: the shared record of revocations in NATS KV, loaded
//!   before ready and watched.
//! - [`ingest`]: the actor reading `rt.session.*` in the queue group
//!   `rt.session`, shedding with 113 past `session.queue_capacity`.
//! - [`nodes`], [`presence`]: mirrors of the gateways' heartbeats and
//!   presence slices in NATS KV, and the clean-up after a dead gateway.
//! - [`store`]: persistence through sqlx (SQLite or PostgreSQL), write-behind.
//!
//! Shared state lives in NATS KV ([`rt_shared::kv`]), so any number of
//! instances can run. An instance reports ready once it has read the
//! revocations from KV; the database is the durable (and audit) record
//! that puts back into KV what NATS lost (recent sessions, revocations).

pub mod auth;
pub mod core;
pub mod ingest;
pub mod limits;
pub mod metrics;
pub mod nodes;
pub mod presence;
pub mod revocations;
pub mod store;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use rt_proto::session;
use rt_shared::config::Config;
use rt_shared::health::{Health, OpsState};
use rt_shared::kv::Buckets;
use rt_shared::metrics::{CommonMetrics, MetricsRegistry};
use rt_shared::telemetry::now_ms;
use rt_shared::{Bus, BusError, lag};

use crate::auth::{KeyError, Verifier};
use crate::core::Core;
use crate::ingest::{Ingest, Stop};
use crate::metrics::SessionMetrics;
use crate::nodes::REAP_LOCK_PREFIX;
use crate::revocations::{RevocationError, RevocationView};
use crate::store::{Store, StoreError};

/// Longest an instance waits to read the revocations at start; past it, it
/// stops (and its supervisor starts it again) rather than serve without them.
const REVOCATIONS_LOAD_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error(transparent)]
    Bus(#[from] BusError),
    #[error(transparent)]
    Keys(#[from] KeyError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("cannot load the revocations: {0}")]
    Revocations(#[from] RevocationError),
    #[error("cannot serve health and metrics on {addr}: {source}")]
    Bind {
        addr: String,
        source: std::io::Error,
    },
}

/// A running session service.
pub struct SessionHandle {
    ops_addr: SocketAddr,
    ops: actix_web::dev::ServerHandle,
    ingest: Addr<Ingest>,
    health: Health,
    core: Arc<Core>,
    background: Vec<actix_rt::task::JoinHandle<()>>,
    _stats: rt_shared::stats::StatsPublisher,
}

impl SessionHandle {
    pub fn ops_addr(&self) -> SocketAddr {
        self.ops_addr
    }

    /// Leaves the queue group, writes what is queued for the database, stops.
    pub async fn stop(self) {
        self.health.set_draining();
        let _ = self.ingest.send(Stop).await;
        for task in &self.background {
            task.abort();
        }
        if let Err(error) = self.core.store.flush().await {
            tracing::warn!(%error, "database writes still pending at shutdown");
        }
        self.ops.stop(true).await;
    }
}

/// Starts the session service in the current actix system.
pub async fn run(config: Config) -> Result<SessionHandle, SessionError> {
    let config = Arc::new(config);
    let registry = MetricsRegistry::default();
    let common = CommonMetrics::new(&registry);
    let metrics = SessionMetrics::new(&registry);
    let health = Health::default();
    let verifier = Verifier::from_config(&config.session)?;
    if !verifier.is_configured() {
        tracing::warn!(
            "no JWT key configured (session.jwt_hmac_secret / jwt_public_key_*): only anonymous connections can succeed"
        );
    }
    // Health is served from the start; readiness waits for NATS and warming.
    let state = OpsState {
        health: health.clone(),
        metrics: registry.clone(),
    };
    let (server, ops_addr) =
        rt_shared::health::serve(&config.session.http_addr, state).map_err(|source| {
            SessionError::Bind {
                addr: config.session.http_addr.clone(),
                source,
            }
        })?;
    let ops = server.handle();
    actix_rt::spawn(server);

    let store = Store::open_or_defer(&config.session, &registry).await?;
    let bus = Bus::connect(&config.nats, "rt-session", health.clone(), common.clone()).await?;
    bus.flush().await?;
    let buckets = Buckets::open(&bus).await?;
    // Revocations first: an instance that answered without them would let
    // revoked tokens in.
    let max_age = buckets
        .revocations
        .status()
        .await
        .map(|status| status.max_age())
        .unwrap_or_default();
    let revocations = RevocationView::new(max_age);
    let watch = tokio::time::timeout(
        REVOCATIONS_LOAD_TIMEOUT,
        revocations::load(&revocations, &buckets.revocations),
    )
    .await
    .map_err(|_| RevocationError::Kv("timed out reading the bucket".into()))??;
    let mut background = vec![actix_rt::spawn(revocations::follow_forever(
        revocations.clone(),
        buckets.revocations.clone(),
        watch,
    ))];
    let core = Arc::new(Core::new(
        config.clone(),
        bus.clone(),
        buckets.clone(),
        store,
        verifier,
        metrics,
        revocations,
    ));

    let (nodes_loaded, nodes_ready) = tokio::sync::oneshot::channel();
    background.push(actix_rt::spawn(nodes::follow_forever(
        core.nodes.clone(),
        buckets.nodes.clone(),
        nodes_loaded,
    )));
    background.push(actix_rt::spawn(presence::follow_forever(
        core.presence.clone(),
        buckets.presence.clone(),
    )));
    warm(&core).await;
    // Connection limits need to know which nodes live before answering.
    let _ = tokio::time::timeout(Duration::from_secs(5), nodes_ready).await;
    background.push(actix_rt::spawn(reap_dead_nodes(core.clone())));
    background.push(actix_rt::spawn(prune_database(core.clone())));

    let mut subscriptions = Vec::new();
    for subject in [
        session::AUTH,
        session::REFRESH,
        session::AUTHORIZE,
        session::PRESENCE,
        session::REVOKE,
        session::EVENTS,
    ] {
        subscriptions.push(
            bus.queue_subscribe(subject.to_owned(), session::QUEUE)
                .await?,
        );
    }
    subscriptions.push(bus.subscribe(session::REVOKED.to_owned()).await?);
    bus.flush().await?;
    bus.sync().await?;
    let ingest_core = core.clone();
    let ingest = Ingest::create(move |ctx| {
        for subscription in subscriptions {
            ctx.add_stream(subscription);
        }
        Ingest::new(ingest_core)
    });
    lag::spawn_probe("main", common, true);
    let stats = rt_shared::stats::spawn_publisher(
        &config,
        bus,
        registry,
        "session",
        None,
        rt_shared::stats::SESSION,
    );
    health.set_warmed();
    tracing::info!(%ops_addr, nats = %config.nats.url, "session ready");
    Ok(SessionHandle {
        ops_addr,
        ops,
        ingest,
        health,
        core,
        background,
        _stats: stats,
    })
}

/// Puts back into NATS KV what it lost (a NATS without its old file store)
/// from the database: revocations still in force and recent sessions. The
/// database is only a source here: with it down, the instance starts from
/// what KV holds.
async fn warm(core: &Core) {
    if core.store.started_without_database() {
        // Each read would wait out the connect timeout for nothing.
        tracing::warn!("database unavailable: starting from what NATS KV holds");
        return;
    }
    seed_revocations(core).await;
    let ttl_ms = core.config.session.resume_ttl_secs * 1000;
    let since = now_ms().saturating_sub(ttl_ms);
    let recent = match core
        .store
        .recent_sessions(since, core.config.session.warm_sessions)
        .await
    {
        Ok(recent) => recent,
        Err(error) => {
            tracing::warn!(%error, "cannot load recent sessions; starting cold");
            return;
        }
    };
    let mut restored = 0;
    for (id, record) in &recent {
        let Ok(bytes) = rt_proto::internal::to_msgpack(record) else {
            continue;
        };
        // Only where KV lost it: KV is newer than the write-behind database.
        if core.buckets.sessions.create(id, bytes.into()).await.is_ok() {
            restored += 1;
        }
    }
    tracing::info!(
        sessions = recent.len(),
        restored,
        "warmed from the database"
    );
}

/// Revocations the database holds and the bucket does not (or holds an
/// earlier one of), written into the bucket. Where the bucket has a max
/// age, only those made within it: older ones have lapsed everywhere.
async fn seed_revocations(core: &Core) {
    let max_age_ms = u64::try_from(core.revocations.max_age().as_millis()).unwrap_or(u64::MAX);
    let now = now_ms();
    let since = if max_age_ms == 0 {
        0
    } else {
        now.saturating_sub(max_age_ms)
    };
    let stored = match core.store.revocations(since).await {
        Ok(stored) => stored,
        Err(error) => {
            tracing::warn!(%error, "cannot read revocations from the database; KV has the record");
            return;
        }
    };
    let mut seeded = 0;
    for (user, before) in stored {
        if core.revocations.before(&user, now) >= Some(before) {
            continue;
        }
        match revocations::record(&core.buckets.revocations, &user, before).await {
            Ok(()) => {
                core.revocations.apply(&user, before, now);
                seeded += 1;
            }
            Err(error) => {
                tracing::warn!(%error, "cannot put a revocation back into KV");
                // Still enforced here; another instance's start may write it.
                core.revocations.apply(&user, before, now);
            }
        }
    }
    if seeded > 0 {
        tracing::info!(
            seeded,
            "revocations missing from KV put back from the database"
        );
    }
}

/// Finds gateways that stopped beating and cleans up after them; one
/// instance per dead node does it (a KV create is the lock).
async fn reap_dead_nodes(core: Arc<Core>) {
    let period = Duration::from_millis((core.config.session.node_ttl_ms / 4).max(100));
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let now = now_ms();
        core.metrics
            .live_nodes
            .set(i64::try_from(core.nodes.live_count(now)).unwrap_or(i64::MAX));
        core.metrics
            .revocations
            .set(i64::try_from(core.revocations.len()).unwrap_or(i64::MAX));
        for node in core.nodes.dead(now) {
            let lock = format!("{REAP_LOCK_PREFIX}{node}");
            let taken = core
                .buckets
                .nodes
                .create(&lock, now.to_string().into())
                .await
                .is_ok();
            if !taken {
                release_stale_lock(&core, &lock, now).await;
                continue;
            }
            let left = presence::reap_node(
                &core.presence,
                &core.buckets.presence,
                &core.bus,
                &core.config,
                &node,
            )
            .await;
            // The node's heartbeat goes last: once deleted, nobody reaps it again.
            let _ = core.buckets.nodes.delete(&node).await;
            let _ = core.buckets.nodes.delete(&lock).await;
            core.metrics.nodes_reaped.inc();
            tracing::info!(
                node,
                clients_left = left,
                "cleaned up after a gateway that stopped"
            );
        }
        // Remember dead nodes for as long as one of their sessions could resume.
        let keep_ms = core.config.session.resume_ttl_secs * 1000 * 2;
        core.nodes.prune(now.saturating_sub(keep_ms));
    }
}

/// A reaper that died mid-way leaves its lock; past the node TTL it is released.
async fn release_stale_lock(core: &Core, lock: &str, now: u64) {
    if let Ok(Some(value)) = core.buckets.nodes.get(lock).await
        && let Some(taken_at) = std::str::from_utf8(&value)
            .ok()
            .and_then(|s| s.parse::<u64>().ok())
        && taken_at + core.config.session.node_ttl_ms < now
    {
        let _ = core.buckets.nodes.delete(lock).await;
    }
}

/// Sessions that can no longer resume and audit rows past their retention
/// leave the database, so its tables stay bounded. Every instance does it;
/// the deletes are idempotent.
async fn prune_database(core: Arc<Core>) {
    const EVERY: Duration = Duration::from_secs(600);
    let mut tick = tokio::time::interval(EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let now = now_ms();
        // The KV record lives a day at most; past that nothing resumes.
        let session_horizon = (core.config.session.resume_ttl_secs * 1000).max(24 * 3600 * 1000);
        if let Err(error) = core
            .store
            .prune_sessions(now.saturating_sub(session_horizon))
            .await
        {
            tracing::warn!(%error, "cannot prune old sessions");
        }
        let days = core.config.session.audit_retention_days;
        if days > 0
            && let Err(error) = core
                .store
                .prune_audit(now.saturating_sub(days * 24 * 3600 * 1000))
                .await
        {
            tracing::warn!(%error, "cannot prune the connection audit");
        }
    }
}
