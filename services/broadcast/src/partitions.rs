//! Which broadcast instance sequences which channels.
//!
//! Channels hash into [`subject::BROADCAST_PARTITIONS`] partitions
//! ([`subject::partition`]). An instance sequences a partition's channels
//! only while it holds the partition's lease: key `p<N>` in the NATS KV
//! bucket `rt_broadcast_leases`, whose entries expire `broadcast.lease_ttl_ms`
//! after their last write. The holder renews its leases every fifth of that
//! (compare-and-set on the entry's revision) and considers a lease lost once
//! four fifths have passed without a successful renewal, before the entry can
//! expire for anyone else. A lease is taken with a KV `create`, which fails
//! while another instance holds it; an instance whose `broadcast.instance_id`
//! matches the holder (a restart) takes it over at once.
//!
//! Instances announce themselves and their partitions on `rt.bc.members`
//! every tick; each aims at a fair share (partitions ÷ live instances, rounded
//! up), giving away the surplus (highest numbers first) and taking free
//! partitions when short. Giving a partition away is graceful: this instance
//! stops routing it and unsubscribes its subjects, lets the writes in flight
//! settle, then deletes the lease so the next owner can take it at once. The
//! next owner loads each channel from the JetStream record when it is first
//! used; the first write fences against anything written since.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use actix::prelude::*;
use async_nats::jetstream::{self, kv, stream};
use bytes::Bytes;
use futures_util::StreamExt as _;
use rt_proto::internal::{self, BroadcastMember, PartitionLease};
use rt_proto::subject::{self, BROADCAST_PARTITIONS};
use rt_shared::Bus;
use rt_shared::bus::BusError;
use rt_shared::telemetry::now_ms;
use tokio::sync::{mpsc, oneshot};

use crate::ingest::{AddPartition, Ingest, RemovePartition};
use crate::metrics::{BroadcastMetrics, KindLabel};
use crate::shard::{Release, Shard};

/// The KV bucket of partition leases.
pub const LEASES_BUCKET: &str = "rt_broadcast_leases";

const _: () = assert!(BROADCAST_PARTITIONS <= 64, "ownership is a 64-bit set");

/// The partitions this instance sequences, read on every request.
#[derive(Debug, Default)]
pub struct Ownership {
    bits: AtomicU64,
}

impl Ownership {
    pub fn none() -> Self {
        Self::default()
    }

    /// Every partition (an instance running alone without leases).
    pub fn all() -> Self {
        let ownership = Self::default();
        for p in 0..BROADCAST_PARTITIONS {
            ownership.set(p, true);
        }
        ownership
    }

    pub fn owns(&self, partition: u32) -> bool {
        partition < BROADCAST_PARTITIONS
            && self.bits.load(Ordering::Acquire) & (1 << partition) != 0
    }

    pub fn count(&self) -> u32 {
        self.bits.load(Ordering::Acquire).count_ones()
    }

    fn set(&self, partition: u32, owned: bool) {
        if partition >= BROADCAST_PARTITIONS {
            return;
        }
        if owned {
            self.bits.fetch_or(1 << partition, Ordering::AcqRel);
        } else {
            self.bits.fetch_and(!(1 << partition), Ordering::AcqRel);
        }
    }
}

/// Opens (creating when missing) the leases bucket; entries expire after `ttl`.
pub async fn open_bucket(bus: &Bus, ttl: Duration) -> Result<kv::Store, BusError> {
    let js = jetstream::new(bus.client().clone());
    let config = stream::Config {
        name: format!("KV_{LEASES_BUCKET}"),
        subjects: vec![format!("$KV.{LEASES_BUCKET}.>")],
        max_messages_per_subject: 1,
        max_age: ttl,
        storage: stream::StorageType::File,
        allow_rollup: true,
        deny_delete: true,
        allow_direct: true,
        discard: stream::DiscardPolicy::New,
        num_replicas: 1,
        ..Default::default()
    };
    // Not `create_key_value`: it reads the account info first, in a shape
    // nats-server 2.9 does not send (see rt_shared::kv).
    let stream = js
        .get_or_create_stream(config)
        .await
        .map_err(|e| BusError::Subscribe(format!("KV bucket {LEASES_BUCKET}: {e}")))?;
    let have = stream.cached_info().config.max_age;
    if have != ttl {
        tracing::warn!(
            bucket = LEASES_BUCKET,
            bucket_ttl_ms = have.as_millis() as u64,
            configured_ttl_ms = ttl.as_millis() as u64,
            "the leases bucket was created with another lease_ttl_ms: its entries expire after the bucket's"
        );
    }
    js.get_key_value(LEASES_BUCKET)
        .await
        .map_err(|e| BusError::Subscribe(format!("KV bucket {LEASES_BUCKET}: {e}")))
}

struct Held {
    revision: u64,
    /// Past this, without a renewal, the lease counts as lost (it may expire
    /// for the others a fifth of the TTL later).
    valid_until: Instant,
    releasing: bool,
}

struct Member {
    seen: Instant,
    partitions: Vec<u32>,
    leaving: bool,
}

/// The running lease manager.
pub struct LeaseHandle {
    stop: Option<oneshot::Sender<oneshot::Sender<()>>>,
    task: actix_rt::task::JoinHandle<()>,
}

impl LeaseHandle {
    /// Gives every partition away (gracefully) and stops.
    pub async fn stop(mut self, timeout: Duration) {
        if let Some(stop) = self.stop.take() {
            let (done_tx, done_rx) = oneshot::channel();
            if stop.send(done_tx).is_ok() {
                let _ = tokio::time::timeout(timeout, done_rx).await;
            }
        }
        self.task.abort();
    }

    /// Stops at once, keeping the leases until they expire (a crash).
    pub fn abort(self) {
        self.task.abort();
    }
}

pub struct Leases {
    kv: kv::Store,
    bus: Bus,
    id: Arc<str>,
    ttl: Duration,
    release_timeout: Duration,
    ownership: Arc<Ownership>,
    ingest: Addr<Ingest>,
    shards: Vec<Addr<Shard>>,
    metrics: BroadcastMetrics,
    held: BTreeMap<u32, Held>,
    members: HashMap<String, Member>,
    released_tx: mpsc::UnboundedSender<u32>,
    released_rx: mpsc::UnboundedReceiver<u32>,
}

impl Leases {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        kv: kv::Store,
        bus: Bus,
        id: Arc<str>,
        ttl: Duration,
        release_timeout: Duration,
        ownership: Arc<Ownership>,
        ingest: Addr<Ingest>,
        shards: Vec<Addr<Shard>>,
        metrics: BroadcastMetrics,
    ) -> Self {
        let (released_tx, released_rx) = mpsc::unbounded_channel();
        Self {
            kv,
            bus,
            id,
            ttl,
            release_timeout,
            ownership,
            ingest,
            shards,
            metrics,
            held: BTreeMap::new(),
            members: HashMap::new(),
            released_tx,
            released_rx,
        }
    }

    fn tick_interval(&self) -> Duration {
        self.ttl / 5
    }

    /// Takes this instance's first share of partitions (waiting at most
    /// `patience`: a partition still leased by a dead instance frees itself
    /// only when its lease expires), then keeps the leases in the background.
    pub async fn start(mut self, patience: Duration) -> Result<LeaseHandle, BusError> {
        let mut members = self
            .bus
            .subscribe(subject::BROADCAST_MEMBERS.to_owned())
            .await?;
        self.bus.sync().await?;
        let deadline = Instant::now() + patience;
        loop {
            self.tick().await;
            if self.active() >= self.fair_share() || Instant::now() >= deadline {
                break;
            }
            let pause = tokio::time::sleep(self.tick_interval());
            tokio::pin!(pause);
            loop {
                tokio::select! {
                    _ = &mut pause => break,
                    Some(message) = members.next() => self.on_member(&message.payload),
                    Some(p) = self.released_rx.recv() => self.released(p).await,
                }
            }
        }
        tracing::info!(
            instance = %self.id,
            partitions = self.active(),
            of = BROADCAST_PARTITIONS,
            "broadcast partitions taken"
        );
        let (stop_tx, mut stop_rx) = oneshot::channel::<oneshot::Sender<()>>();
        let task = actix_rt::spawn(async move {
            let mut interval = tokio::time::interval(self.tick_interval());
            interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = interval.tick() => self.tick().await,
                    Some(message) = members.next() => self.on_member(&message.payload),
                    Some(p) = self.released_rx.recv() => self.released(p).await,
                    done = &mut stop_rx => {
                        self.shutdown().await;
                        if let Ok(done) = done {
                            let _ = done.send(());
                        }
                        break;
                    }
                }
            }
        });
        Ok(LeaseHandle {
            stop: Some(stop_tx),
            task,
        })
    }

    fn active(&self) -> usize {
        self.held.values().filter(|h| !h.releasing).count()
    }

    fn live_members(&self) -> impl Iterator<Item = &Member> {
        let ttl = self.ttl;
        self.members
            .values()
            .filter(move |m| m.seen.elapsed() < ttl && !m.leaving)
    }

    fn fair_share(&self) -> usize {
        let instances = self.live_members().count() + 1;
        (BROADCAST_PARTITIONS as usize).div_ceil(instances)
    }

    fn on_member(&mut self, payload: &[u8]) {
        let Ok(member) = internal::from_msgpack::<BroadcastMember>(payload) else {
            return;
        };
        if *member.id == *self.id {
            return;
        }
        self.members.insert(
            member.id,
            Member {
                seen: Instant::now(),
                partitions: member.partitions,
                leaving: member.leaving,
            },
        );
        let ttl = self.ttl;
        self.members.retain(|_, m| m.seen.elapsed() < ttl * 4);
    }

    fn lease_value(&self) -> Bytes {
        let lease = PartitionLease {
            owner: self.id.to_string(),
            at_ms: now_ms(),
        };
        internal::to_msgpack(&lease)
            .map(Bytes::from)
            .unwrap_or_default()
    }

    async fn tick(&mut self) {
        self.renew().await;
        self.announce(false);
        self.rebalance().await;
        self.metrics
            .partitions_owned
            .set(i64::from(self.ownership.count()));
    }

    async fn renew(&mut self) {
        let sent = Instant::now();
        let value = self.lease_value();
        let kv = &self.kv;
        let renewals = self.held.iter().map(|(&p, held)| {
            let value = value.clone();
            let revision = held.revision;
            async move { (p, kv.update(key(p), value, revision).await) }
        });
        let results = futures_util::future::join_all(renewals).await;
        let validity = self.ttl - self.ttl / 5;
        let mut lost = Vec::new();
        for (p, result) in results {
            let Some(held) = self.held.get_mut(&p) else {
                continue;
            };
            match result {
                Ok(revision) => {
                    held.revision = revision;
                    held.valid_until = sent + validity;
                }
                Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => {
                    tracing::warn!(partition = p, "partition lease taken by another instance");
                    lost.push(p);
                }
                // Unreachable for now (NATS down): the lease holds until `valid_until`.
                Err(_) => {}
            }
        }
        let now = Instant::now();
        let expired: Vec<u32> = self
            .held
            .iter()
            .filter(|(p, held)| now >= held.valid_until && !lost.contains(p))
            .map(|(&p, _)| p)
            .collect();
        lost.extend(expired);
        for p in lost {
            self.lose(p);
        }
    }

    fn announce(&self, leaving: bool) {
        let member = BroadcastMember {
            id: self.id.to_string(),
            partitions: self
                .held
                .iter()
                .filter(|(_, h)| !h.releasing)
                .map(|(&p, _)| p)
                .collect(),
            at_ms: now_ms(),
            leaving,
        };
        if let Ok(payload) = internal::to_msgpack(&member) {
            let _ = self.bus.publish(
                subject::BROADCAST_MEMBERS.to_owned(),
                Default::default(),
                Bytes::from(payload),
            );
        }
    }

    async fn rebalance(&mut self) {
        let fair = self.fair_share();
        let active = self.active();
        if active > fair {
            let surplus: Vec<u32> = self
                .held
                .iter()
                .filter(|(_, h)| !h.releasing)
                .map(|(&p, _)| p)
                .rev()
                .take(active - fair)
                .collect();
            for p in surplus {
                self.start_release(p);
            }
            return;
        }
        if active == fair {
            return;
        }
        let taken: HashSet<u32> = self
            .live_members()
            .flat_map(|m| m.partitions.iter().copied())
            .collect();
        let mut candidates: Vec<u32> = (0..BROADCAST_PARTITIONS)
            .filter(|p| !self.held.contains_key(p) && !taken.contains(p))
            .collect();
        fastrand::shuffle(&mut candidates);
        let mut active = active;
        for p in candidates {
            if active >= fair {
                break;
            }
            if self.acquire(p).await {
                active += 1;
            }
        }
    }

    async fn acquire(&mut self, p: u32) -> bool {
        let sent = Instant::now();
        let value = self.lease_value();
        let revision = match self.kv.create(key(p), value.clone()).await {
            Ok(revision) => revision,
            Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => {
                // Ours from before a restart (same instance_id): take it over.
                let Ok(Some(entry)) = self.kv.entry(key(p)).await else {
                    return false;
                };
                let mine = entry.operation == kv::Operation::Put
                    && internal::from_msgpack::<PartitionLease>(&entry.value)
                        .is_ok_and(|lease| *lease.owner == *self.id);
                if !mine {
                    return false;
                }
                match self.kv.update(key(p), value, entry.revision).await {
                    Ok(revision) => revision,
                    Err(_) => return false,
                }
            }
            Err(_) => return false,
        };
        self.held.insert(
            p,
            Held {
                revision,
                valid_until: sent + (self.ttl - self.ttl / 5),
                releasing: false,
            },
        );
        // Owned before the subscription delivers anything.
        self.ownership.set(p, true);
        match self.bus.subscribe(subject::partition_wildcard(p)).await {
            Ok(subscription) => {
                let _ = self
                    .ingest
                    .send(AddPartition {
                        partition: p,
                        subscription,
                    })
                    .await;
            }
            Err(error) => {
                tracing::warn!(partition = p, %error, "cannot subscribe to a partition; giving it back");
                self.start_release(p);
                return false;
            }
        }
        self.metrics
            .partition_events
            .get_or_create(&KindLabel { kind: "acquired" })
            .inc();
        true
    }

    /// Stops routing `p` here, lets its writes settle, then deletes the lease.
    fn start_release(&mut self, p: u32) {
        let Some(held) = self.held.get_mut(&p) else {
            return;
        };
        if held.releasing {
            return;
        }
        held.releasing = true;
        self.ownership.set(p, false);
        self.ingest.do_send(RemovePartition(p));
        let shards = self.shards.clone();
        let released = self.released_tx.clone();
        let timeout = self.release_timeout;
        actix_rt::spawn(async move {
            let drains = shards.iter().map(|shard| {
                let (done, wait) = oneshot::channel();
                shard.do_send(Release { partition: p, done });
                wait
            });
            let _ = tokio::time::timeout(timeout, futures_util::future::join_all(drains)).await;
            let _ = released.send(p);
        });
    }

    async fn released(&mut self, p: u32) {
        let Some(held) = self.held.remove(&p) else {
            return;
        };
        if let Err(error) = self
            .kv
            .delete_expect_revision(key(p), Some(held.revision))
            .await
        {
            tracing::debug!(partition = p, %error, "lease not deleted (it will expire)");
        }
        self.metrics
            .partition_events
            .get_or_create(&KindLabel { kind: "released" })
            .inc();
    }

    /// The lease is gone (taken, or not renewed in time): stop at once.
    fn lose(&mut self, p: u32) {
        if self.held.remove(&p).is_none() {
            return;
        }
        self.ownership.set(p, false);
        self.ingest.do_send(RemovePartition(p));
        for shard in &self.shards {
            let (done, _) = oneshot::channel();
            shard.do_send(Release { partition: p, done });
        }
        tracing::warn!(partition = p, instance = %self.id, "partition lease lost");
        self.metrics
            .partition_events
            .get_or_create(&KindLabel { kind: "lost" })
            .inc();
    }

    async fn shutdown(&mut self) {
        self.announce(true);
        let partitions: Vec<u32> = self.held.keys().copied().collect();
        for p in partitions {
            self.start_release(p);
        }
        let deadline = tokio::time::Instant::now() + self.release_timeout;
        while !self.held.is_empty() {
            let renew = tokio::time::sleep(self.tick_interval());
            tokio::select! {
                Some(p) = self.released_rx.recv() => self.released(p).await,
                _ = renew => self.renew().await,
                _ = tokio::time::sleep_until(deadline) => break,
            }
        }
        self.metrics.partitions_owned.set(0);
    }
}

fn key(partition: u32) -> String {
    format!("p{partition}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ownership_is_a_set_of_partitions() {
        let o = Ownership::none();
        assert!(!o.owns(3));
        o.set(3, true);
        o.set(63, true);
        assert!(o.owns(3) && o.owns(63) && !o.owns(4));
        assert!(!o.owns(64), "out of range is never owned");
        assert_eq!(o.count(), 2);
        o.set(3, false);
        assert!(!o.owns(3));
        assert_eq!(Ownership::all().count(), BROADCAST_PARTITIONS);
    }
}
