//! The history of record: JetStream.
//!
//! One stream per namespace (`RT_HIST_D` for the default namespace,
//! `RT_HIST_N_<namespace>` for the others), one subject per channel
//! ([`subject::history_record`]). The stream's limits are the namespace's:
//! `history_size` → `max_messages_per_subject` (at least 1, so a channel's
//! position survives a restart even without history), `history_ttl_secs` →
//! `max_age`. Each message is one publication: the body is the MessagePack
//! [`Publication`] (exactly what is delivered on `rt.deliver.<channel>`), the
//! headers carry its offset, epoch, writer and idempotency key
//! ([`rt_proto::internal::record`]) and JetStream's `Nats-Msg-Id`
//! `<channel>/<epoch>/<offset>/<attempt>`.
//!
//! Reading the record in stream order, a message supersedes the messages of
//! its channel and epoch before it whose offset is not lower
//! ([`consecutive_view`]): that is how a sequencer repairs a hole left by a
//! write that JetStream lost while later ones were stored (it writes the
//! missing offset and the ones after it again, see `shard.rs`).
//!
//! Writes are pipelined by one writer task per shard ([`spawn_writer`]):
//! they go out on the NATS connection in the order the shard sequenced them
//! (JetStream stores one connection's messages to a stream in that order),
//! many in flight, and each acknowledgement comes back to the shard as a
//! [`WriteDone`].

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use actix::prelude::*;
use async_nats::HeaderMap;
use async_nats::jetstream::{
    self, consumer, context::PublishErrorKind, message::PublishMessage, stream,
};
use bytes::Bytes;
use futures_util::StreamExt as _;
use futures_util::stream::FuturesUnordered;
use rt_proto::internal::{self, Publication, record};
use rt_proto::{ChannelName, subject};
use rt_shared::config::{Config, NamespaceConfig};
use rt_shared::telemetry::{RateLimitedLog, now_ms};
use tokio::sync::mpsc;

use crate::history::{ChannelState, Limits, StoredPub};

static WRITE_ERRORS: RateLimitedLog = RateLimitedLog::new(5_000);

/// Messages one tail or range read may return (a bound against surprises;
/// a channel's record holds at most its namespace's `history_size`).
const MAX_READ: usize = 1_000_000;
/// Messages per pull request of a range read.
const READ_BATCH: usize = 1_000;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("JetStream history stream {stream}: {message} (is JetStream enabled?)")]
    Stream { stream: String, message: String },
    #[error("JetStream read of {channel}: {message}")]
    Read { channel: String, message: String },
    #[error("no namespace configured for {0}")]
    UnknownNamespace(String),
}

/// One stored publication as read back.
#[derive(Debug, Clone)]
pub struct StoredMsg {
    pub seq: u64,
    pub writer: String,
    pub key: Option<String>,
    pub publication: Publication,
}

impl StoredMsg {
    fn parse(seq: u64, headers: Option<&HeaderMap>, payload: &[u8]) -> Option<Self> {
        let publication: Publication = internal::from_msgpack(payload).ok()?;
        let header = |name: &str| {
            headers
                .and_then(|h| h.get(name))
                .map(|v| v.as_str().to_owned())
        };
        Some(Self {
            seq,
            writer: header(record::WRITER).unwrap_or_default(),
            key: header(record::KEY).map(|k| unescape_key(&k)),
            publication,
        })
    }

    pub fn offset(&self) -> u64 {
        self.publication.offset
    }

    pub fn epoch(&self) -> &str {
        &self.publication.epoch
    }
}

/// A channel's state as loaded from the record.
pub struct Loaded {
    pub state: ChannelState,
    /// Stream sequence of the channel's last message (0: none): the first
    /// write after the load expects it (`Nats-Expected-Last-Subject-Sequence`).
    pub last_seq: u64,
    /// Why a new epoch was started, if one was.
    pub new_epoch: Option<&'static str>,
}

/// Handle on the history streams.
pub struct Record {
    js: jetstream::Context,
    config: Arc<Config>,
    streams: Mutex<HashMap<String, stream::Stream>>,
}

impl Record {
    pub fn new(client: async_nats::Client, config: Arc<Config>) -> Self {
        let js = jetstream::ContextBuilder::new()
            .timeout(Duration::from_millis(config.broadcast.history_timeout_ms))
            .build(client);
        Self {
            js,
            config,
            streams: Mutex::new(HashMap::new()),
        }
    }

    /// Creates (or adjusts) the stream of every configured namespace.
    pub async fn ensure_streams(&self) -> Result<(), StoreError> {
        self.stream_of(None).await?;
        for name in self.config.namespaces.keys() {
            self.stream_of(Some(name)).await?;
        }
        Ok(())
    }

    fn namespace_config(&self, namespace: Option<&str>) -> Option<&NamespaceConfig> {
        match namespace {
            None => Some(&self.config.default_namespace),
            Some(ns) => self.config.namespaces.get(ns),
        }
    }

    /// The stream a namespace's history lives in, created or updated to match
    /// the namespace's limits.
    fn stream_config(&self, namespace: Option<&str>, ns: &NamespaceConfig) -> stream::Config {
        let max_age = Duration::from_secs(ns.history_ttl_secs.max(1));
        let duplicate_window =
            Duration::from_secs(self.config.broadcast.history_duplicate_window_secs).min(max_age);
        stream::Config {
            name: subject::history_stream(namespace),
            description: Some(format!(
                "realtime channel history of namespace {}",
                namespace.unwrap_or("(default)")
            )),
            subjects: vec![subject::history_stream_filter(namespace)],
            max_messages_per_subject: i64::try_from(ns.history_size.max(1)).unwrap_or(i64::MAX),
            max_age,
            duplicate_window,
            storage: stream::StorageType::File,
            num_replicas: self.config.broadcast.history_replicas,
            allow_direct: true,
            discard: stream::DiscardPolicy::Old,
            ..Default::default()
        }
    }

    async fn stream_of(&self, namespace: Option<&str>) -> Result<stream::Stream, StoreError> {
        let name = subject::history_stream(namespace);
        if let Some(stream) = self.streams.lock().ok().and_then(|s| s.get(&name).cloned()) {
            return Ok(stream);
        }
        let ns = self
            .namespace_config(namespace)
            .ok_or_else(|| StoreError::UnknownNamespace(namespace.unwrap_or_default().into()))?;
        let wanted = self.stream_config(namespace, ns);
        let error = |message: String| StoreError::Stream {
            stream: name.clone(),
            message,
        };
        let mut stream = self
            .js
            .get_or_create_stream(wanted.clone())
            .await
            .map_err(|e| error(e.to_string()))?;
        let have = stream.cached_info().config.clone();
        if have.max_messages_per_subject != wanted.max_messages_per_subject
            || have.max_age != wanted.max_age
            || have.duplicate_window != wanted.duplicate_window
        {
            // Only the fields the namespace maps to; anything else an
            // operator tuned on the stream stays.
            let updated = stream::Config {
                max_messages_per_subject: wanted.max_messages_per_subject,
                max_age: wanted.max_age,
                duplicate_window: wanted.duplicate_window,
                ..have
            };
            self.js
                .update_stream(&updated)
                .await
                .map_err(|e| error(format!("cannot update its limits: {e}")))?;
            tracing::info!(
                stream = %name,
                max_messages_per_subject = wanted.max_messages_per_subject,
                max_age_secs = wanted.max_age.as_secs(),
                "history stream limits updated to the namespace's"
            );
            stream = self
                .js
                .get_stream(&name)
                .await
                .map_err(|e| error(e.to_string()))?;
        }
        if let Ok(mut streams) = self.streams.lock() {
            streams.insert(name, stream.clone());
        }
        Ok(stream)
    }

    /// Forgets a stream handle after an error, so the next use looks it up
    /// (and creates it again if the server lost it).
    pub fn forget(&self, channel: &ChannelName) {
        if let Ok(mut streams) = self.streams.lock() {
            streams.remove(&subject::history_stream(channel.namespace()));
        }
    }

    fn read_error(&self, channel: &ChannelName, message: impl ToString) -> StoreError {
        self.forget(channel);
        StoreError::Read {
            channel: channel.as_str().to_owned(),
            message: message.to_string(),
        }
    }

    /// The channel's last stored message.
    pub async fn last(&self, channel: &ChannelName) -> Result<Option<StoredMsg>, StoreError> {
        let stream = self.stream_of(channel.namespace()).await?;
        match stream
            .get_last_raw_message_by_subject(&subject::history_record(channel))
            .await
        {
            Ok(m) => Ok(StoredMsg::parse(m.sequence, Some(&m.headers), &m.payload)),
            Err(e) if e.kind() == stream::LastRawMessageErrorKind::NoMessageFound => Ok(None),
            Err(e) => Err(self.read_error(channel, e)),
        }
    }

    /// The channel's messages with a stream sequence above `seq`, in stream
    /// order (consistent reads from the stream leader, one by one: used for
    /// the few writes a resync looks at).
    pub async fn after_seq(
        &self,
        channel: &ChannelName,
        seq: u64,
    ) -> Result<Vec<StoredMsg>, StoreError> {
        let stream = self.stream_of(channel.namespace()).await?;
        let record_subject = subject::history_record(channel);
        let mut out = Vec::new();
        let mut next = seq + 1;
        while out.len() < MAX_READ {
            match stream
                .raw_message_builder()
                .next_by_subject(record_subject.clone())
                .sequence(next)
                .send()
                .await
            {
                Ok(m) => {
                    next = m.sequence + 1;
                    if let Some(msg) = StoredMsg::parse(m.sequence, Some(&m.headers), &m.payload) {
                        out.push(msg);
                    }
                }
                Err(e) if e.kind() == stream::RawMessageErrorKind::NoMessageFound => break,
                Err(e) => return Err(self.read_error(channel, e)),
            }
        }
        Ok(out)
    }

    /// The channel's messages from `policy` on, in stream order, until
    /// `stop` says enough (the message it stops at is included).
    pub async fn read(
        &self,
        channel: &ChannelName,
        policy: consumer::DeliverPolicy,
        mut stop: impl FnMut(&StoredMsg) -> bool,
    ) -> Result<Vec<StoredMsg>, StoreError> {
        let stream = self.stream_of(channel.namespace()).await?;
        let timeout = Duration::from_millis(self.config.broadcast.history_timeout_ms);
        let consumer = stream
            .create_consumer(consumer::pull::Config {
                filter_subject: subject::history_record(channel),
                deliver_policy: policy,
                ack_policy: consumer::AckPolicy::None,
                inactive_threshold: Duration::from_secs(30),
                memory_storage: true,
                ..Default::default()
            })
            .await
            .map_err(|e| self.read_error(channel, e))?;
        let name = consumer.cached_info().name.clone();
        let mut pending = consumer.cached_info().num_pending;
        let mut out = Vec::new();
        let result: Result<(), StoreError> = async {
            'reading: while pending > 0 && out.len() < MAX_READ {
                let batch = usize::try_from(pending)
                    .unwrap_or(READ_BATCH)
                    .min(READ_BATCH);
                let mut messages = consumer
                    .fetch()
                    .max_messages(batch)
                    .expires(timeout)
                    .messages()
                    .await
                    .map_err(|e| self.read_error(channel, e))?;
                let mut got = 0;
                while let Some(message) = messages.next().await {
                    let message = message.map_err(|e| self.read_error(channel, e))?;
                    got += 1;
                    pending = pending.saturating_sub(1);
                    let seq = message
                        .info()
                        .map(|i| i.stream_sequence)
                        .unwrap_or_default();
                    if let Some(msg) =
                        StoredMsg::parse(seq, message.headers.as_ref(), &message.payload)
                    {
                        let done = stop(&msg);
                        out.push(msg);
                        if done {
                            break 'reading;
                        }
                    }
                }
                if got == 0 {
                    return Err(self.read_error(channel, "the read stopped short"));
                }
            }
            Ok(())
        }
        .await;
        // Best effort: an ephemeral consumer also goes away by itself when idle.
        let _ = stream.delete_consumer(&name).await;
        result.map(|()| out)
    }

    /// Publications `from..=to` of the channel's `epoch`, oldest first, as far
    /// as the record has them (the caller checks for holes).
    pub async fn range(
        &self,
        channel: &ChannelName,
        epoch: &str,
        from: u64,
        to: u64,
    ) -> Result<Vec<Publication>, StoreError> {
        let msgs = self
            .read(channel, consumer::DeliverPolicy::All, |m| {
                m.epoch() == epoch && m.offset() >= to
            })
            .await?;
        Ok(consecutive_view(msgs)
            .into_iter()
            .filter(|m| m.epoch() == epoch && (from..=to).contains(&m.offset()))
            .map(|m| m.publication)
            .collect())
    }

    /// Loads a channel: its position from its last stored message, and the
    /// publications and idempotency keys of the last idempotency window.
    ///
    /// A new epoch is drawn when the channel has no stored message left (all
    /// expired, never published, or the stream was lost), or when the
    /// record's newest run of its epoch has a hole (a write JetStream lost
    /// while later ones were stored, left unrepaired by a sequencer that died).
    pub async fn load(&self, channel: &ChannelName, limits: Limits) -> Result<Loaded, StoreError> {
        let now = Instant::now();
        let Some(last) = self.last(channel).await? else {
            return Ok(Loaded {
                state: ChannelState::new(channel.as_str().to_owned(), now),
                last_seq: 0,
                new_epoch: Some("empty"),
            });
        };
        let epoch = last.epoch().to_owned();
        let offset = last.offset();
        let floor = if limits.size == 0 { 0 } else { offset };
        let mut state = ChannelState::restore(
            channel.as_str().to_owned(),
            epoch.clone(),
            offset,
            floor,
            now,
        );
        let now_ms = now_ms();
        let window_ms = u64::try_from(limits.idempotency_window.as_millis()).unwrap_or(u64::MAX);
        let age = |ts: u64| Duration::from_millis(now_ms.saturating_sub(ts));
        if age(last.publication.ts) >= limits.idempotency_window {
            return Ok(Loaded {
                state,
                last_seq: last.seq,
                new_epoch: None,
            });
        }
        let start = time::OffsetDateTime::now_utc()
            - time::Duration::milliseconds(i64::try_from(window_ms).unwrap_or(i64::MAX));
        let msgs = self
            .read(
                channel,
                consumer::DeliverPolicy::ByStartTime { start_time: start },
                |m| m.seq >= last.seq,
            )
            .await?;
        let run: Vec<StoredMsg> = consecutive_view(msgs)
            .into_iter()
            .filter(|m| m.epoch() == epoch)
            .collect();
        if run.last().map(StoredMsg::offset) != Some(offset) {
            return Err(self.read_error(channel, "the newest message changed while loading"));
        }
        if run.windows(2).any(|w| w[1].offset() != w[0].offset() + 1) {
            tracing::warn!(channel = %channel, %epoch, offset, "the record of the epoch has a hole: starting a new epoch");
            return Ok(Loaded {
                state: ChannelState::new(channel.as_str().to_owned(), now),
                last_seq: last.seq,
                new_epoch: Some("hole"),
            });
        }
        if let Some(first) = run.first()
            && limits.size > 0
        {
            state = ChannelState::restore(
                channel.as_str().to_owned(),
                epoch,
                offset,
                first.offset() - 1,
                now,
            );
        }
        let window_from = run.len().saturating_sub(limits.size);
        for (index, msg) in run.into_iter().enumerate() {
            let at = now.checked_sub(age(msg.publication.ts)).unwrap_or(now);
            let stored = StoredPub {
                offset: msg.offset(),
                seq: msg.seq,
                ts: msg.publication.ts,
                data: msg.publication.data,
                info: msg.publication.info,
                stored_at: at,
            };
            if index >= window_from {
                state.warm(stored, msg.key, at, limits);
            } else if let Some(key) = msg.key {
                state.warm_key(key, stored.offset, at, limits);
            }
        }
        state.expire(now, limits);
        Ok(Loaded {
            state,
            last_seq: last.seq,
            new_epoch: None,
        })
    }
}

/// The record in stream order with superseded messages removed: a message
/// drops the messages of its epoch just before it whose offset is not lower.
pub fn consecutive_view(msgs: Vec<StoredMsg>) -> Vec<StoredMsg> {
    let mut out: Vec<StoredMsg> = Vec::with_capacity(msgs.len());
    for msg in msgs {
        while out
            .last()
            .is_some_and(|last| last.epoch() == msg.epoch() && last.offset() >= msg.offset())
        {
            out.pop();
        }
        out.push(msg);
    }
    out
}

/// The headers of a stored publication.
pub fn record_headers(
    publication: &Publication,
    writer: &str,
    attempt: u32,
    key: Option<&str>,
    expected_last_seq: Option<u64>,
) -> HeaderMap {
    let mut headers = HeaderMap::new();
    headers.insert(
        record::MSG_ID,
        format!(
            "{}/{}/{}/{attempt}",
            publication.channel, publication.epoch, publication.offset
        )
        .as_str(),
    );
    headers.insert(record::OFFSET, publication.offset.to_string().as_str());
    headers.insert(record::EPOCH, publication.epoch.as_str());
    headers.insert(record::WRITER, writer);
    if let Some(key) = key {
        headers.insert(record::KEY, escape_key(key).as_str());
    }
    if let Some(seq) = expected_last_seq {
        headers.insert(
            record::EXPECTED_LAST_SUBJECT_SEQUENCE,
            seq.to_string().as_str(),
        );
    }
    headers
}

/// An idempotency key as a header value: `%`, control characters and
/// non-ASCII bytes become `%XX`.
fn escape_key(key: &str) -> String {
    let mut out = String::with_capacity(key.len());
    for byte in key.bytes() {
        if byte == b'%' || !(0x20..0x7f).contains(&byte) {
            out.push_str(&format!("%{byte:02X}"));
        } else {
            out.push(char::from(byte));
        }
    }
    out
}

fn unescape_key(value: &str) -> String {
    let bytes = value.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && let Some(hex) = value.get(i + 1..i + 3)
            && let Ok(byte) = u8::from_str_radix(hex, 16)
        {
            out.push(byte);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A write for the writer task.
pub struct WriteJob {
    pub channel: String,
    pub incarnation: u64,
    pub offset: u64,
    pub attempt: u32,
    pub subject: String,
    pub headers: HeaderMap,
    pub payload: Bytes,
}

/// Why a write was not stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WriteFailure {
    /// `Nats-Expected-Last-Subject-Sequence` did not match: someone else wrote.
    Fenced,
    /// The `Nats-Msg-Id` was already stored (another writer of this offset).
    Duplicate,
    /// Timed out, connection lost, stream missing, …: the outcome is unknown.
    Failed(String),
}

/// The outcome of one write, back at the shard.
pub struct WriteDone {
    pub channel: String,
    pub incarnation: u64,
    pub offset: u64,
    pub attempt: u32,
    /// The stream sequence it was stored at.
    pub result: Result<u64, WriteFailure>,
    pub elapsed: Duration,
}

impl Message for WriteDone {
    type Result = ();
}

struct Meta {
    channel: String,
    incarnation: u64,
    offset: u64,
    attempt: u32,
    started: Instant,
}

impl Meta {
    fn done(self, result: Result<u64, WriteFailure>) -> WriteDone {
        WriteDone {
            channel: self.channel,
            incarnation: self.incarnation,
            offset: self.offset,
            attempt: self.attempt,
            result,
            elapsed: self.started.elapsed(),
        }
    }
}

/// Starts the writer of one shard on the current runtime: jobs are handed to
/// the NATS connection in the order received, their acknowledgements awaited
/// concurrently (up to `max_inflight`), each outcome sent to `done`.
pub fn spawn_writer(
    client: async_nats::Client,
    config: &Config,
    done: Recipient<WriteDone>,
) -> mpsc::UnboundedSender<WriteJob> {
    let js = jetstream::ContextBuilder::new()
        .timeout(Duration::from_millis(config.broadcast.history_timeout_ms))
        .max_ack_inflight(config.broadcast.history_max_inflight)
        .backpressure_on_inflight(true)
        .build(client);
    let (tx, mut rx) = mpsc::unbounded_channel::<WriteJob>();
    let (ack_tx, mut ack_rx) = mpsc::unbounded_channel();
    let acker_done = done.clone();
    actix_rt::spawn(async move {
        // Acks are polled here, apart from the hand-off below: a hand-off
        // waiting for an in-flight permit must not stop the acks that free one.
        let mut acks = FuturesUnordered::new();
        loop {
            tokio::select! {
                next = ack_rx.recv() => match next {
                    Some((meta, ack)) => acks.push(async move {
                        let ack: jetstream::context::PublishAckFuture = ack;
                        (meta, ack.await)
                    }),
                    None if acks.is_empty() => break,
                    None => {}
                },
                Some((meta, result)) = acks.next(), if !acks.is_empty() => {
                    let meta: Meta = meta;
                    let result = match result {
                        Ok(ack) if ack.duplicate => Err(WriteFailure::Duplicate),
                        Ok(ack) => Ok(ack.sequence),
                        Err(e) if e.kind() == PublishErrorKind::WrongLastSequence => Err(WriteFailure::Fenced),
                        Err(e) => Err(WriteFailure::Failed(e.to_string())),
                    };
                    if let Err(WriteFailure::Failed(error)) = &result
                        && let Some(suppressed) = WRITE_ERRORS.allow()
                    {
                        tracing::warn!(%error, channel = %meta.channel, suppressed, "history write failed");
                    }
                    acker_done.do_send(meta.done(result));
                }
            }
        }
    });
    actix_rt::spawn(async move {
        while let Some(job) = rx.recv().await {
            let meta = Meta {
                channel: job.channel,
                incarnation: job.incarnation,
                offset: job.offset,
                attempt: job.attempt,
                started: Instant::now(),
            };
            let message = PublishMessage::build()
                .payload(job.payload)
                .headers(job.headers);
            match js.send_publish(job.subject, message).await {
                Ok(ack) => {
                    if ack_tx.send((meta, ack)).is_err() {
                        break;
                    }
                }
                Err(e) => done.do_send(meta.done(Err(WriteFailure::Failed(e.to_string())))),
            }
        }
    });
    tx
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(seq: u64, epoch: &str, offset: u64) -> StoredMsg {
        StoredMsg {
            seq,
            writer: String::new(),
            key: None,
            publication: Publication {
                channel: "c".into(),
                offset,
                epoch: epoch.into(),
                ts: 0,
                data: Bytes::new(),
                info: None,
            },
        }
    }

    fn view(msgs: Vec<StoredMsg>) -> Vec<(u64, u64)> {
        consecutive_view(msgs)
            .iter()
            .map(|m| (m.seq, m.offset()))
            .collect()
    }

    #[test]
    fn rewritten_offsets_supersede_the_orphans_before_them() {
        // 10 committed; 12 and 13 stored while 11 was lost; then 11..13 written again.
        let record = vec![
            msg(1, "e", 10),
            msg(2, "e", 12),
            msg(3, "e", 13),
            msg(4, "e", 11),
            msg(5, "e", 12),
            msg(6, "e", 13),
            msg(7, "e", 14),
        ];
        assert_eq!(
            view(record),
            vec![(1, 10), (4, 11), (5, 12), (6, 13), (7, 14)]
        );
        // Another epoch's messages are not touched.
        assert_eq!(
            view(vec![msg(1, "a", 5), msg(2, "b", 1), msg(3, "b", 2)]),
            vec![(1, 5), (2, 1), (3, 2)]
        );
    }

    #[test]
    fn keys_survive_the_header_escaping() {
        for key in [
            "plain-key_1",
            "with space",
            "pct%20",
            "new\nline",
            "ünïcode",
            "",
        ] {
            let escaped = escape_key(key);
            assert!(
                escaped.bytes().all(|b| (0x20..0x7f).contains(&b)),
                "{escaped:?}"
            );
            assert_eq!(unescape_key(&escaped), key);
        }
    }

    #[test]
    fn headers_carry_the_position_and_the_fence() {
        let p = msg(0, "e1", 7).publication;
        let h = record_headers(&p, "b1/2a", 1, Some("k"), Some(41));
        let get = |name: &str| h.get(name).map(|v| v.as_str().to_owned());
        assert_eq!(get(record::MSG_ID).as_deref(), Some("c/e1/7/1"));
        assert_eq!(get(record::OFFSET).as_deref(), Some("7"));
        assert_eq!(get(record::EPOCH).as_deref(), Some("e1"));
        assert_eq!(get(record::WRITER).as_deref(), Some("b1/2a"));
        assert_eq!(get(record::KEY).as_deref(), Some("k"));
        assert_eq!(
            get(record::EXPECTED_LAST_SUBJECT_SEQUENCE).as_deref(),
            Some("41")
        );
        let h = record_headers(&p, "b1/2a", 0, None, None);
        assert!(h.get(record::KEY).is_none());
        assert!(h.get(record::EXPECTED_LAST_SUBJECT_SEQUENCE).is_none());
    }
}
