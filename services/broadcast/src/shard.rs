//! A sequencer shard: the single owner of a slice of the channels.
//!
//! Channels are spread over shards by hash, so one channel's publications are
//! always sequenced by one actor, in the order the ingest actor received them,
//! while different channels sequence in parallel on other threads.
//!
//! ## The publication pipeline (JetStream history)
//!
//! A publish takes the channel's next offset at once and becomes a *write*:
//! the MessagePack publication goes to JetStream through the shard's writer
//! task, pipelined (many writes in flight, handed to the NATS connection in
//! offset order). A write is *committed* only when JetStream has acknowledged
//! it and every write before it: then, in offset order, it joins the hot
//! window, is delivered on `rt.deliver.<channel>` and acknowledged to its
//! publisher. An acknowledged publication is therefore always in the record.
//!
//! - **Load.** A channel seen for the first time (after a start, a partition
//!   takeover or an idle eviction) is loaded from the record first (position,
//!   recent publications, idempotency keys); requests wait meanwhile.
//! - **Fence.** The first write after a load or a resync carries
//!   `Nats-Expected-Last-Subject-Sequence` and goes alone: if someone else
//!   wrote the channel since, it fails and the channel is loaded again. Every
//!   write also carries `Nats-Msg-Id` `<channel>/<epoch>/<offset>/<attempt>`,
//!   so a second writer of an offset is refused for the duplicate window.
//! - **Resync.** When a write fails (timeout, lost connection, …) the channel
//!   stops sending, waits for every write in flight to settle, then reads what
//!   the record holds after its last committed message. Its own writes that
//!   follow on without a hole are adopted (committed as if acknowledged); the
//!   rest are written again with the next attempt number, fenced, so they
//!   supersede whatever JetStream kept of them (see [`crate::store`]). A write
//!   by another sequencer in that tail means this one is no longer the only
//!   writer: it fails its writes and loads the channel again.
//!
//! With `history_store = "memory"` a write is committed at once: the same
//! path without JetStream.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use async_nats::{HeaderMap, Subject};
use bytes::Bytes;
use rt_proto::internal::{
    BusResult, HistoryRequest, PubInfo, Publication, PublishAck, RecoverRequest, StreamPosition,
    WireError,
};
use rt_proto::{ChannelName, ErrorCode, subject};
use rt_shared::Bus;
use rt_shared::bus::{Reserved, headers_with};
use rt_shared::config::{Config, HistoryStore, NamespaceConfig};
use rt_shared::telemetry::{RateLimitedLog, current_context, now_ms, set_remote_parent};
use rt_shared::trace_context::TraceContext;
use serde::Serialize;
use tokio::sync::{mpsc, oneshot};

use crate::history::{self, ChannelState, Limits, Read};
use crate::metrics::{BroadcastMetrics, ReasonLabel, RecoveredLabel, ResultLabel};
use crate::partitions::Ownership;
use crate::store::{self, Record, StoreError, StoredMsg, WriteDone, WriteFailure, WriteJob};

const SWEEP_INTERVAL: Duration = Duration::from_secs(10);
/// First retry of a failed load or resync; doubles up to [`MAX_RETRY`].
const FIRST_RETRY: Duration = Duration::from_millis(100);
const MAX_RETRY: Duration = Duration::from_secs(5);
/// `retry_after_ms` of the 113 answers given while a channel cannot sequence.
const RETRY_AFTER_MS: u64 = 500;

static ENCODE_ERRORS: RateLimitedLog = RateLimitedLog::new(5_000);
static RELOADS: RateLimitedLog = RateLimitedLog::new(5_000);

/// A request routed to the shard owning `channel`.
pub struct Incoming {
    pub channel: ChannelName,
    pub kind: IncomingKind,
    pub reply: Option<Subject>,
    /// Answer in JSON (the public publish subject with `Accept: application/json`).
    pub reply_json: bool,
    pub trace: Option<TraceContext>,
    pub received: Instant,
}

pub enum IncomingKind {
    Publish {
        data: Bytes,
        info: Option<PubInfo>,
        idempotency_key: Option<String>,
    },
    History(HistoryRequest),
    Recover(RecoverRequest),
}

impl Message for Incoming {
    type Result = ();
}

/// Stop sequencing a partition's channels (it moves to another instance):
/// queued requests are refused, writes in flight settle and commit, then the
/// channels are dropped and `done` fires.
pub struct Release {
    pub partition: u32,
    pub done: oneshot::Sender<()>,
}

impl Message for Release {
    type Result = ();
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Being loaded from the record; requests wait.
    Loading,
    Ready,
    /// A write failed: nothing more is sent until every write in flight settled.
    Settling,
    /// Reading the record's tail after a failed write; requests wait.
    Resyncing,
    /// Its partition is moving away: finishing the writes in flight.
    Releasing,
}

#[derive(Debug)]
enum Status {
    Pending,
    Stored(u64),
    Failed(WriteFailure),
}

struct ReplyTo {
    subject: Subject,
    json: bool,
}

struct Write {
    publication: Publication,
    payload: Bytes,
    key: Option<String>,
    /// The publisher, then any repeat of its idempotency key made while it was in flight.
    replies: Vec<ReplyTo>,
    /// Room in the bus lane for the delivery and the first reply.
    reserved: Reserved,
    /// Trace context of the delivery.
    headers: HeaderMap,
    received: Instant,
    sent: bool,
    fenced: bool,
    attempt: u32,
    status: Status,
}

struct Channel {
    name: ChannelName,
    partition: u32,
    state: Option<ChannelState>,
    phase: Phase,
    waiting: VecDeque<Incoming>,
    /// Writes not yet committed, in offset order (committed offset + 1, + 2, …).
    writes: VecDeque<Write>,
    /// How many of them (always the last ones) are not handed to the writer yet.
    unsent: usize,
    pending_keys: HashMap<String, u64>,
    /// Identifies this load of the channel: results of an older one are ignored.
    incarnation: u64,
    /// `Rt-Writer` of this load's writes.
    writer: String,
    /// Stream sequence of the last committed (or loaded) message.
    last_seq: u64,
    /// The next write expects this last subject sequence.
    fence: Option<u64>,
    fence_inflight: bool,
    attempt: u32,
    retry: Duration,
}

impl Channel {
    fn settled(&self) -> bool {
        !self
            .writes
            .iter()
            .any(|w| w.sent && matches!(w.status, Status::Pending))
    }
}

/// What a shard needs besides its channels (split out for the borrow checker).
struct Env {
    bus: Bus,
    config: Arc<Config>,
    metrics: BroadcastMetrics,
    record: Option<Arc<Record>>,
    instance: Arc<str>,
    writer: Option<mpsc::UnboundedSender<WriteJob>>,
    /// Writes handed to the writer and not settled.
    inflight: usize,
}

pub struct Shard {
    env: Env,
    ownership: Arc<Ownership>,
    channels: HashMap<String, Channel>,
    releases: Vec<(u32, oneshot::Sender<()>)>,
}

impl Shard {
    pub fn new(
        bus: Bus,
        config: Arc<Config>,
        metrics: BroadcastMetrics,
        record: Option<Arc<Record>>,
        ownership: Arc<Ownership>,
        instance: Arc<str>,
    ) -> Self {
        Self {
            env: Env {
                bus,
                config,
                metrics,
                record,
                instance,
                writer: None,
                inflight: 0,
            },
            ownership,
            channels: HashMap::new(),
            releases: Vec::new(),
        }
    }

    /// Routes a request to its channel, loading the channel first when needed.
    fn dispatch(&mut self, mut msg: Incoming, ctx: &mut Context<Self>) {
        let partition = subject::partition(&msg.channel);
        if !self.ownership.owns(partition) {
            return self.env.refuse(
                msg,
                ErrorCode::BUSY,
                "the channel's partition is moving to another instance, retry",
            );
        }
        if !self.channels.contains_key(msg.channel.as_str()) {
            if self.env.limits(&msg.channel).is_none() {
                return self
                    .env
                    .refuse(msg, ErrorCode::UNKNOWN_CHANNEL, "unknown namespace");
            }
            self.open(&msg.channel, partition, ctx);
        }
        let Some(ch) = self.channels.get_mut(msg.channel.as_str()) else {
            return;
        };
        match ch.phase {
            Phase::Loading | Phase::Resyncing => {
                if ch.waiting.len() >= self.env.config.broadcast.shard_mailbox {
                    self.env
                        .refuse(msg, ErrorCode::BUSY, "broadcast is busy, retry later");
                } else {
                    ch.waiting.push_back(msg);
                }
                return;
            }
            Phase::Releasing => {
                return self.env.refuse(
                    msg,
                    ErrorCode::BUSY,
                    "the channel's partition is moving to another instance, retry",
                );
            }
            Phase::Ready | Phase::Settling => {}
        }
        let kind = std::mem::replace(
            &mut msg.kind,
            IncomingKind::Recover(RecoverRequest { since: None }),
        );
        match kind {
            IncomingKind::Publish {
                data,
                info,
                idempotency_key,
            } => self.env.publish(ch, msg, data, info, idempotency_key),
            IncomingKind::History(request) => self.history(msg, request, ctx),
            IncomingKind::Recover(request) => self.recover(msg, request, ctx),
        }
    }

    /// A channel's first use: from the record, or new in memory.
    fn open(&mut self, name: &ChannelName, partition: u32, ctx: &mut Context<Self>) {
        let now = Instant::now();
        let memory = self.env.record.is_none();
        let mut ch = Channel {
            name: name.clone(),
            partition,
            state: None,
            phase: Phase::Loading,
            waiting: VecDeque::new(),
            writes: VecDeque::new(),
            unsent: 0,
            pending_keys: HashMap::new(),
            incarnation: 0,
            writer: String::new(),
            last_seq: 0,
            fence: None,
            fence_inflight: false,
            attempt: 0,
            retry: FIRST_RETRY,
        };
        self.env.metrics.channels.inc();
        if memory {
            ch.state = Some(ChannelState::new(name.as_str().to_owned(), now));
            ch.phase = Phase::Ready;
            self.env.epoch_started("memory");
            self.channels.insert(name.as_str().to_owned(), ch);
        } else {
            self.channels.insert(name.as_str().to_owned(), ch);
            self.start_load(name.as_str(), ctx);
        }
    }

    fn start_load(&mut self, name: &str, ctx: &mut Context<Self>) {
        let (Some(ch), Some(record)) = (self.channels.get_mut(name), self.env.record.clone())
        else {
            return;
        };
        ch.phase = Phase::Loading;
        ch.state = None;
        ch.incarnation = fastrand::u64(..);
        ch.writer = format!("{}/{:x}", self.env.instance, ch.incarnation);
        ch.fence = None;
        ch.fence_inflight = false;
        let Some(limits) = self.env.limits(&ch.name) else {
            return;
        };
        let incarnation = ch.incarnation;
        let channel = ch.name.clone();
        let loading = channel.clone();
        ctx.spawn(
            async move { record.load(&loading, limits).await }
                .into_actor(self)
                .map(move |result, shard, ctx| {
                    shard.on_loaded(channel.as_str(), incarnation, result, ctx)
                }),
        );
    }

    fn on_loaded(
        &mut self,
        name: &str,
        incarnation: u64,
        result: Result<store::Loaded, StoreError>,
        ctx: &mut Context<Self>,
    ) {
        let Some(ch) = self.channels.get_mut(name) else {
            return;
        };
        if ch.incarnation != incarnation || ch.phase != Phase::Loading {
            return;
        }
        self.env.metrics.store_read("load", result.is_ok());
        match result {
            Ok(loaded) => {
                if let Some(reason) = loaded.new_epoch {
                    self.env.epoch_started(reason);
                }
                ch.state = Some(loaded.state);
                ch.last_seq = loaded.last_seq;
                ch.fence = Some(loaded.last_seq);
                ch.phase = Phase::Ready;
                ch.retry = FIRST_RETRY;
                self.drain_waiting(name, ctx);
            }
            Err(error) => {
                if let Some(suppressed) = RELOADS.allow() {
                    tracing::warn!(channel = name, %error, suppressed, "cannot load a channel from the record; retrying");
                }
                let delay = ch.retry;
                ch.retry = (ch.retry * 2).min(MAX_RETRY);
                self.env.expire_waiting(ch);
                let name = name.to_owned();
                ctx.run_later(delay, move |shard, ctx| {
                    if shard.channels.get(&name).is_some_and(|ch| {
                        ch.incarnation == incarnation && ch.phase == Phase::Loading
                    }) {
                        shard.start_load(&name, ctx);
                    }
                });
            }
        }
    }

    /// Runs the requests that waited for a load or a resync, in arrival order.
    fn drain_waiting(&mut self, name: &str, ctx: &mut Context<Self>) {
        let Some(ch) = self.channels.get_mut(name) else {
            return;
        };
        let waiting = std::mem::take(&mut ch.waiting);
        let timeout = Duration::from_millis(self.env.config.nats.request_timeout_ms);
        for msg in waiting {
            if msg.received.elapsed() >= timeout {
                // Its caller has given up: sequencing it now would publish
                // what was reported as failed.
                self.env
                    .refuse(msg, ErrorCode::BUSY, "broadcast is busy, retry later");
            } else {
                let span = span_for(&msg);
                let _entered = span.enter();
                self.dispatch(msg, ctx);
            }
        }
    }

    fn on_write_done(&mut self, done: WriteDone, ctx: &mut Context<Self>) {
        self.env.inflight = self.env.inflight.saturating_sub(1);
        self.env.metrics.store_inflight.dec();
        self.env
            .metrics
            .store_write_latency
            .observe(done.elapsed.as_secs_f64());
        self.env.metrics.store_write(match &done.result {
            Ok(_) => "ok",
            Err(WriteFailure::Fenced) => "fenced",
            Err(WriteFailure::Duplicate) => "duplicate",
            Err(WriteFailure::Failed(_)) => "failed",
        });
        let Some(ch) = self.channels.get_mut(&done.channel) else {
            return;
        };
        if ch.incarnation != done.incarnation {
            return;
        }
        let Some(committed) = ch.state.as_ref().map(ChannelState::offset) else {
            return;
        };
        let Some(index) = done
            .offset
            .checked_sub(committed + 1)
            .and_then(|i| usize::try_from(i).ok())
        else {
            return;
        };
        let Some(write) = ch.writes.get_mut(index) else {
            return;
        };
        if !write.sent || write.attempt != done.attempt || !matches!(write.status, Status::Pending)
        {
            return;
        }
        if write.fenced {
            write.fenced = false;
            ch.fence_inflight = false;
        }
        let failed = done.result.is_err();
        write.status = match done.result {
            Ok(seq) => Status::Stored(seq),
            Err(failure) => Status::Failed(failure),
        };
        if failed && ch.phase == Phase::Ready {
            ch.phase = Phase::Settling;
        }
        self.env.commit_ready(ch);
        let name = done.channel;
        match ch.phase {
            Phase::Ready => self.env.pump(ch),
            Phase::Settling if ch.settled() => self.start_resync(&name, ctx),
            Phase::Releasing if ch.settled() => self.finish_release(&name),
            _ => {}
        }
    }

    /// After a failed write, once everything in flight settled: find out
    /// what the record kept.
    fn start_resync(&mut self, name: &str, ctx: &mut Context<Self>) {
        let (Some(ch), Some(record)) = (self.channels.get_mut(name), self.env.record.clone())
        else {
            return;
        };
        ch.phase = Phase::Resyncing;
        let foreign = ch.writes.iter().any(|w| {
            matches!(
                w.status,
                Status::Failed(WriteFailure::Fenced | WriteFailure::Duplicate)
            )
        });
        if foreign {
            return self.reload(name, "another writer", ctx);
        }
        let incarnation = ch.incarnation;
        let channel = ch.name.clone();
        let reading = channel.clone();
        let after = ch.last_seq;
        ctx.spawn(
            async move { record.after_seq(&reading, after).await }
                .into_actor(self)
                .map(move |result, shard, ctx| {
                    shard.on_tail(channel.as_str(), incarnation, result, ctx)
                }),
        );
    }

    fn on_tail(
        &mut self,
        name: &str,
        incarnation: u64,
        result: Result<Vec<StoredMsg>, StoreError>,
        ctx: &mut Context<Self>,
    ) {
        let Some(ch) = self.channels.get_mut(name) else {
            return;
        };
        if ch.incarnation != incarnation || ch.phase != Phase::Resyncing {
            return;
        }
        self.env.metrics.store_read("tail", result.is_ok());
        let tail = match result {
            Ok(tail) => tail,
            Err(error) => {
                if let Some(suppressed) = RELOADS.allow() {
                    tracing::warn!(channel = name, %error, suppressed, "cannot read the record after a failed write; retrying");
                }
                let delay = ch.retry;
                ch.retry = (ch.retry * 2).min(MAX_RETRY);
                self.env.expire_waiting(ch);
                let name = name.to_owned();
                ctx.run_later(delay, move |shard, ctx| {
                    if shard.channels.get(&name).is_some_and(|ch| {
                        ch.incarnation == incarnation && ch.phase == Phase::Resyncing
                    }) {
                        shard.start_resync_read(&name, ctx);
                    }
                });
                return;
            }
        };
        if tail.iter().any(|m| m.writer != ch.writer) {
            return self.reload(name, "another writer", ctx);
        }
        let subject_last_seq = tail.last().map_or(ch.last_seq, |m| m.seq);
        let mut repaired = false;
        for msg in store::consecutive_view(tail) {
            let next = ch.state.as_ref().map_or(0, |s| s.offset() + 1);
            let epoch_matches = ch.state.as_ref().is_some_and(|s| s.epoch() == msg.epoch());
            let Some(front) = ch.writes.front_mut() else {
                break;
            };
            if !epoch_matches || msg.offset() != next || front.publication.offset != next {
                repaired = true;
                break;
            }
            front.status = Status::Stored(msg.seq);
            self.env.commit_ready(ch);
        }
        repaired |= !ch.writes.is_empty();
        for write in &mut ch.writes {
            write.sent = false;
            write.fenced = false;
            write.status = Status::Pending;
        }
        ch.unsent = ch.writes.len();
        ch.attempt += 1;
        ch.fence = Some(subject_last_seq);
        ch.fence_inflight = false;
        ch.phase = Phase::Ready;
        ch.retry = FIRST_RETRY;
        self.env
            .metrics
            .resyncs
            .get_or_create(&ResultLabel {
                result: if repaired { "repaired" } else { "clean" },
            })
            .inc();
        self.env.pump(ch);
        self.drain_waiting(name, ctx);
    }

    fn start_resync_read(&mut self, name: &str, ctx: &mut Context<Self>) {
        if let Some(ch) = self.channels.get_mut(name) {
            ch.phase = Phase::Settling;
        }
        self.start_resync(name, ctx);
    }

    /// Someone else wrote the channel: fail what is pending and load it again.
    fn reload(&mut self, name: &str, why: &'static str, ctx: &mut Context<Self>) {
        let Some(ch) = self.channels.get_mut(name) else {
            return;
        };
        if let Some(suppressed) = RELOADS.allow() {
            tracing::warn!(
                channel = name,
                why,
                suppressed,
                "reloading a channel from the record"
            );
        }
        self.env
            .metrics
            .resyncs
            .get_or_create(&ResultLabel { result: "reloaded" })
            .inc();
        for write in std::mem::take(&mut ch.writes) {
            self.env
                .fail_write(write, "the channel is being reloaded, retry");
        }
        ch.unsent = 0;
        ch.pending_keys.clear();
        ch.attempt += 1;
        self.start_load(name, ctx);
    }

    fn history(&mut self, msg: Incoming, request: HistoryRequest, ctx: &mut Context<Self>) {
        let Some(limits) = self.env.limits(&msg.channel) else {
            return self
                .env
                .refuse(msg, ErrorCode::UNKNOWN_CHANNEL, "unknown namespace");
        };
        let limit = request
            .limit
            .min(self.env.config.broadcast.history_max_limit) as usize;
        let now = Instant::now();
        let Some(state) = self
            .channels
            .get_mut(msg.channel.as_str())
            .and_then(|ch| ch.state.as_mut())
        else {
            return;
        };
        state.expire(now, limits);
        self.env.metrics.history_queries.inc();
        let plan = match &request.since {
            Some(since) => state.plan_after(since),
            None if limit == 0 => Read::Memory,
            None => state.plan_newest(limit),
        };
        match plan {
            Read::Unservable => {
                let error = history::unservable();
                self.env.reply::<()>(&msg, BusResult::Err { error });
            }
            Read::Memory => {
                let result = history_answer(state, &request, limit, &[]);
                self.env.reply(&msg, BusResult::from(result));
            }
            Read::Record { from, to } => {
                // With `since`, no more than `limit` (at least one, to check
                // that the position is servable).
                let to = match request.since {
                    Some(_) => to.min(from.saturating_add(limit.max(1) as u64) - 1),
                    None => to,
                };
                self.read_record(msg, from, to, ctx, move |shard, msg, record| {
                    let Some(state) = shard.state(&msg.channel) else {
                        return;
                    };
                    let result = history_answer(state, &request, limit, record);
                    shard.env.reply(&msg, BusResult::from(result));
                });
            }
        }
    }

    fn recover(&mut self, msg: Incoming, request: RecoverRequest, ctx: &mut Context<Self>) {
        let Some(limits) = self.env.limits(&msg.channel) else {
            return self
                .env
                .refuse(msg, ErrorCode::UNKNOWN_CHANNEL, "unknown namespace");
        };
        let now = Instant::now();
        let Some(state) = self
            .channels
            .get_mut(msg.channel.as_str())
            .and_then(|ch| ch.state.as_mut())
        else {
            return;
        };
        state.expire(now, limits);
        let Some(since) = request.since else {
            let reply = state.recover_reply(None);
            return self.env.reply(&msg, BusResult::Ok(reply));
        };
        match state.plan_after(&since) {
            Read::Record { from, to } => {
                self.read_record(msg, from, to, ctx, move |shard, msg, record| {
                    shard.answer_recover(msg, &since, record);
                });
            }
            Read::Memory | Read::Unservable => self.answer_recover(msg, &since, &[]),
        }
    }

    fn answer_recover(&mut self, msg: Incoming, since: &StreamPosition, record: &[Publication]) {
        let Some(state) = self.state(&msg.channel) else {
            return;
        };
        let reply = state.recover_reply(state.pubs_after(since, record, usize::MAX));
        let recovered = if reply.recovered { "true" } else { "false" };
        self.env
            .metrics
            .recoveries
            .get_or_create(&RecoveredLabel { recovered })
            .inc();
        self.env.reply(&msg, BusResult::Ok(reply));
    }

    fn state(&self, channel: &ChannelName) -> Option<&ChannelState> {
        self.channels
            .get(channel.as_str())
            .and_then(|ch| ch.state.as_ref())
    }

    /// Reads publications `from..=to` of the channel's epoch from the record,
    /// then finishes the request with them (nothing without a record).
    fn read_record(
        &mut self,
        msg: Incoming,
        from: u64,
        to: u64,
        ctx: &mut Context<Self>,
        finish: impl FnOnce(&mut Shard, Incoming, &[Publication]) + 'static,
    ) {
        let (Some(record), Some(state)) = (self.env.record.clone(), self.state(&msg.channel))
        else {
            return finish(self, msg, &[]);
        };
        self.env.metrics.window_misses.inc();
        let epoch = state.epoch().to_owned();
        let channel = msg.channel.clone();
        ctx.spawn(
            async move { record.range(&channel, &epoch, from, to).await }
                .into_actor(self)
                .map(move |result, shard, _| {
                    shard.env.metrics.store_read("range", result.is_ok());
                    match result {
                        Ok(pubs) => finish(shard, msg, &pubs),
                        Err(error) => {
                            if let Some(suppressed) = RELOADS.allow() {
                                tracing::warn!(%error, suppressed, "cannot read history from the record");
                            }
                            shard.env.refuse(
                                msg,
                                ErrorCode::BUSY,
                                "the history record is not available, retry",
                            );
                        }
                    }
                }),
        );
    }

    fn release(&mut self, partition: u32, done: oneshot::Sender<()>) {
        let names: Vec<String> = self
            .channels
            .iter()
            .filter(|(_, ch)| ch.partition == partition)
            .map(|(name, _)| name.clone())
            .collect();
        for name in names {
            let Some(ch) = self.channels.get_mut(&name) else {
                continue;
            };
            ch.phase = Phase::Releasing;
            for msg in std::mem::take(&mut ch.waiting) {
                self.env.refuse(
                    msg,
                    ErrorCode::BUSY,
                    "the channel's partition is moving to another instance, retry",
                );
            }
            while ch.writes.back().is_some_and(|w| !w.sent) {
                if let Some(write) = ch.writes.pop_back() {
                    ch.unsent = ch.unsent.saturating_sub(1);
                    self.env.fail_write(
                        write,
                        "the channel's partition is moving to another instance, retry",
                    );
                }
            }
            if ch.settled() {
                self.finish_release(&name);
            }
        }
        self.releases.push((partition, done));
        self.check_releases();
    }

    fn finish_release(&mut self, name: &str) {
        let Some(mut ch) = self.channels.remove(name) else {
            return;
        };
        self.env.metrics.channels.dec();
        self.env.commit_ready(&mut ch);
        for write in std::mem::take(&mut ch.writes) {
            self.env.fail_write(
                write,
                "the channel's partition moved to another instance, retry",
            );
        }
        self.check_releases();
    }

    fn check_releases(&mut self) {
        let channels = &self.channels;
        let (done, waiting): (Vec<_>, Vec<_>) = std::mem::take(&mut self.releases)
            .into_iter()
            .partition(|(p, _)| !channels.values().any(|ch| ch.partition == *p));
        self.releases = waiting;
        for (_, sender) in done {
            let _ = sender.send(());
        }
    }

    fn sweep(&mut self) {
        let now = Instant::now();
        let idle = Duration::from_secs(self.env.config.broadcast.channel_idle_secs);
        let memory = self.env.record.is_none();
        let env = &self.env;
        let before = self.channels.len();
        self.channels.retain(|_, ch| {
            let Some(state) = ch.state.as_mut() else {
                return true;
            };
            if let Some(limits) = env.limits(&ch.name) {
                state.expire(now, limits);
            }
            let quiet = ch.phase == Phase::Ready
                && ch.writes.is_empty()
                && ch.waiting.is_empty()
                && now.saturating_duration_since(state.last_activity()) >= idle;
            // Without a record, forgetting a channel forgets its history.
            !(quiet && (!memory || state.is_history_empty()))
        });
        let evicted = before - self.channels.len();
        self.env
            .metrics
            .channels
            .dec_by(i64::try_from(evicted).unwrap_or(i64::MAX));
    }
}

/// A history query answered from the window and what was read from the record.
fn history_answer(
    state: &ChannelState,
    request: &HistoryRequest,
    limit: usize,
    record: &[Publication],
) -> Result<rt_proto::internal::HistoryReply, WireError> {
    let pubs = match &request.since {
        Some(since) => state
            .pubs_after(since, record, limit)
            .ok_or_else(history::unservable)?,
        None if limit == 0 => Vec::new(),
        None => {
            let mut pubs = state.newest(limit, record);
            if request.reverse {
                pubs.reverse();
            }
            pubs
        }
    };
    Ok(state.history_reply(pubs))
}

impl Env {
    fn limits(&self, channel: &ChannelName) -> Option<Limits> {
        let ns: &NamespaceConfig = self.config.namespace(channel)?;
        let b = &self.config.broadcast;
        let memory = match (b.history_store, b.memory_window) {
            (HistoryStore::Memory, _) | (_, 0) => ns.history_size,
            (HistoryStore::Jetstream, n) => n.min(ns.history_size),
        };
        Some(Limits {
            size: ns.history_size,
            ttl: Duration::from_secs(ns.history_ttl_secs),
            idempotency_window: Duration::from_secs(b.idempotency_window_secs),
            memory,
        })
    }

    fn epoch_started(&self, reason: &'static str) {
        self.metrics
            .epochs
            .get_or_create(&ReasonLabel { reason })
            .inc();
    }

    fn publish(
        &mut self,
        ch: &mut Channel,
        msg: Incoming,
        data: Bytes,
        info: Option<PubInfo>,
        key: Option<String>,
    ) {
        let Some(limits) = self.limits(&ch.name) else {
            return self.refuse(msg, ErrorCode::UNKNOWN_CHANNEL, "unknown namespace");
        };
        let Some(state) = ch.state.as_mut() else {
            return self.refuse(msg, ErrorCode::BUSY, "broadcast is busy, retry later");
        };
        let now = Instant::now();
        state.touch(now);
        state.expire(now, limits);
        if let Some(key) = &key {
            if let Some(&offset) = ch.pending_keys.get(key)
                && let Some(write) = ch
                    .writes
                    .iter_mut()
                    .find(|w| w.publication.offset == offset)
            {
                // Answered with the first publish's position when it commits.
                self.metrics.duplicates.inc();
                if let Some(reply) = msg.reply {
                    write.replies.push(ReplyTo {
                        subject: reply,
                        json: msg.reply_json,
                    });
                }
                return;
            }
            if let Some(offset) = state.key(key) {
                self.metrics.duplicates.inc();
                let ack = PublishAck {
                    offset,
                    epoch: state.epoch().to_owned(),
                };
                return self.reply(&msg, BusResult::Ok(ack));
            }
        }
        // Writes in flight on this shard, plus this channel's waiting to be sent.
        if self.record.is_some()
            && self.inflight + ch.unsent >= self.config.broadcast.history_max_inflight
        {
            return self.refuse(msg, ErrorCode::BUSY, "broadcast is busy, retry later");
        }
        // Room for the delivery and the ack is reserved before an offset is
        // taken, so a committed publication is never left undelivered.
        let Ok(reserved) = self.bus.try_reserve(1 + usize::from(msg.reply.is_some())) else {
            return self.refuse(msg, ErrorCode::BUSY, "broadcast is busy, retry later");
        };
        let ahead = ch.writes.len() as u64;
        let publication = state.next_publication(ahead, data, info, now_ms());
        let payload = match rt_proto::internal::to_msgpack(&publication) {
            Ok(payload) => Bytes::from(payload),
            Err(error) => {
                if let Some(suppressed) = ENCODE_ERRORS.allow() {
                    tracing::error!(%error, suppressed, "cannot encode a publication");
                }
                return self.refuse(msg, ErrorCode::INTERNAL, "cannot encode the publication");
            }
        };
        if let Some(key) = &key {
            ch.pending_keys.insert(key.clone(), publication.offset);
        }
        let memory = self.record.is_none();
        ch.writes.push_back(Write {
            publication,
            payload,
            key,
            replies: msg
                .reply
                .map(|subject| ReplyTo {
                    subject,
                    json: msg.reply_json,
                })
                .into_iter()
                .collect(),
            reserved,
            headers: headers_with(current_context().as_ref()),
            received: msg.received,
            sent: memory,
            fenced: false,
            attempt: 0,
            status: if memory {
                Status::Stored(0)
            } else {
                Status::Pending
            },
        });
        if memory {
            self.commit_ready(ch);
        } else {
            ch.unsent += 1;
            if ch.phase == Phase::Ready {
                self.pump(ch);
            }
        }
    }

    /// Hands the channel's unsent writes to the writer, in order; a fenced
    /// write goes alone and the others wait for its acknowledgement.
    fn pump(&mut self, ch: &mut Channel) {
        if ch.phase != Phase::Ready || ch.fence_inflight {
            return;
        }
        let Some(writer) = &self.writer else {
            return;
        };
        let subject = subject::history_record(&ch.name);
        let first_unsent = ch.writes.len().saturating_sub(ch.unsent);
        for write in ch.writes.iter_mut().skip(first_unsent) {
            let fence = ch.fence.take();
            ch.unsent = ch.unsent.saturating_sub(1);
            let headers = store::record_headers(
                &write.publication,
                &ch.writer,
                ch.attempt,
                write.key.as_deref(),
                fence,
            );
            write.sent = true;
            write.attempt = ch.attempt;
            write.fenced = fence.is_some();
            self.inflight += 1;
            self.metrics.store_inflight.inc();
            let job = WriteJob {
                channel: ch.name.as_str().to_owned(),
                incarnation: ch.incarnation,
                offset: write.publication.offset,
                attempt: ch.attempt,
                subject: subject.clone(),
                headers,
                payload: write.payload.clone(),
            };
            if writer.send(job).is_err() {
                // The writer is gone (the shard is stopping): nothing settles it.
                self.inflight = self.inflight.saturating_sub(1);
                self.metrics.store_inflight.dec();
                write.status = Status::Failed(WriteFailure::Failed("writer stopped".into()));
            }
            if fence.is_some() {
                ch.fence_inflight = true;
                break;
            }
        }
    }

    /// Commits the stored writes at the front, in offset order.
    fn commit_ready(&mut self, ch: &mut Channel) {
        while ch
            .writes
            .front()
            .is_some_and(|w| matches!(w.status, Status::Stored(_)))
        {
            let Some(write) = ch.writes.pop_front() else {
                break;
            };
            self.commit(ch, write);
        }
    }

    fn commit(&mut self, ch: &mut Channel, mut write: Write) {
        let (Some(state), Some(limits)) = (ch.state.as_mut(), self.limits(&ch.name)) else {
            return;
        };
        let seq = match write.status {
            Status::Stored(seq) => seq,
            _ => 0,
        };
        let offset = write.publication.offset;
        let now = Instant::now();
        if let Some(key) = &write.key
            && ch.pending_keys.get(key) == Some(&offset)
        {
            ch.pending_keys.remove(key);
        }
        state.commit(&write.publication, seq, write.key.take(), now, limits);
        if seq > 0 {
            ch.last_seq = seq;
        }
        write
            .reserved
            .publish(subject::deliver(&ch.name), write.headers, write.payload);
        self.metrics.publications.inc();
        self.metrics
            .sequence_latency
            .observe(write.received.elapsed().as_secs_f64());
        let ack = PublishAck {
            offset,
            epoch: state.epoch().to_owned(),
        };
        let mut replies = write.replies.into_iter();
        if let Some(first) = replies.next() {
            let payload = encode_reply(first.json, &BusResult::Ok(ack.clone()));
            write
                .reserved
                .publish(first.subject.to_string(), HeaderMap::new(), payload);
        }
        for other in replies {
            let payload = encode_reply(other.json, &BusResult::Ok(ack.clone()));
            let _ = self
                .bus
                .publish(other.subject.to_string(), HeaderMap::new(), payload);
        }
    }

    /// Answers a write's publishers with a temporary error; it was not committed.
    fn fail_write(&self, write: Write, message: &str) {
        let error = WireError::new(ErrorCode::BUSY, message).with_retry_after(RETRY_AFTER_MS);
        self.metrics.error(ErrorCode::BUSY);
        for reply in write.replies {
            let payload = encode_reply::<()>(
                reply.json,
                &BusResult::Err {
                    error: error.clone(),
                },
            );
            let _ = self
                .bus
                .publish(reply.subject.to_string(), HeaderMap::new(), payload);
        }
    }

    /// Refuses the waiting requests whose callers have given up.
    fn expire_waiting(&self, ch: &mut Channel) {
        let timeout = Duration::from_millis(self.config.nats.request_timeout_ms);
        while ch
            .waiting
            .front()
            .is_some_and(|msg| msg.received.elapsed() >= timeout)
        {
            if let Some(msg) = ch.waiting.pop_front() {
                self.refuse(
                    msg,
                    ErrorCode::BUSY,
                    "the history record is not available, retry",
                );
            }
        }
    }

    fn reply<T: Serialize>(&self, msg: &Incoming, result: BusResult<T>) {
        let Some(reply) = &msg.reply else { return };
        let payload = encode_reply(msg.reply_json, &result);
        if !payload.is_empty() {
            // A full lane means the caller's request times out (114) and is counted.
            let _ = self
                .bus
                .publish(reply.to_string(), HeaderMap::new(), payload);
        }
    }

    fn refuse(&self, msg: Incoming, code: ErrorCode, message: &str) {
        self.metrics.error(code);
        let mut error = WireError::new(code, message);
        if code == ErrorCode::BUSY {
            error = error.with_retry_after(RETRY_AFTER_MS);
        }
        self.reply::<()>(&msg, BusResult::Err { error });
    }
}

fn encode_reply<T: Serialize>(json: bool, result: &BusResult<T>) -> Bytes {
    let encoded = if json {
        serde_json::to_vec(result).map_err(|e| e.to_string())
    } else {
        rt_proto::internal::to_msgpack(result).map_err(|e| e.to_string())
    };
    match encoded {
        Ok(payload) => Bytes::from(payload),
        Err(error) => {
            if let Some(suppressed) = ENCODE_ERRORS.allow() {
                tracing::error!(%error, suppressed, "cannot encode a reply");
            }
            Bytes::new()
        }
    }
}

/// The span of a request's hop through broadcast, in its caller's trace.
fn span_for(msg: &Incoming) -> tracing::Span {
    let span = match &msg.kind {
        IncomingKind::Publish { .. } => {
            tracing::info_span!("broadcast.sequence", channel = %msg.channel)
        }
        IncomingKind::History(_) => {
            tracing::info_span!("broadcast.history", channel = %msg.channel)
        }
        IncomingKind::Recover(_) => {
            tracing::info_span!("broadcast.recover", channel = %msg.channel)
        }
    };
    if let Some(parent) = &msg.trace {
        set_remote_parent(&span, parent);
    }
    span
}

impl Actor for Shard {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.set_mailbox_capacity(self.env.config.broadcast.shard_mailbox);
        ctx.run_interval(SWEEP_INTERVAL, |shard, _| shard.sweep());
        if self.env.record.is_some() {
            self.env.writer = Some(store::spawn_writer(
                self.env.bus.client().clone(),
                &self.env.config,
                ctx.address().recipient(),
            ));
        }
    }
}

impl Handler<Incoming> for Shard {
    type Result = ();

    fn handle(&mut self, msg: Incoming, ctx: &mut Self::Context) {
        let span = span_for(&msg);
        let _entered = span.enter();
        self.dispatch(msg, ctx);
    }
}

impl Handler<WriteDone> for Shard {
    type Result = ();

    fn handle(&mut self, done: WriteDone, ctx: &mut Self::Context) {
        self.on_write_done(done, ctx);
    }
}

impl Handler<Release> for Shard {
    type Result = ();

    fn handle(&mut self, msg: Release, _: &mut Self::Context) {
        self.release(msg.partition, msg.done);
    }
}
