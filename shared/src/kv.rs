//! The NATS KV buckets where state every node must see lives: node
//! heartbeats, presence, sessions, per-user connection counts and
//! revocations (layout and value types in [`rt_proto::session`]).
//!
//! Gateways and session instances open the same buckets with the same
//! settings; whoever comes first creates them.

use std::time::Duration;

use async_nats::jetstream::{self, kv, stream};
use rt_proto::session::{
    NODES_BUCKET, PRESENCE_BUCKET, REVOCATIONS_BUCKET, SESSIONS_BUCKET, USERS_BUCKET,
};

use crate::bus::{Bus, BusError};

/// How long an untouched entry of the session and user buckets survives:
/// a backstop that bounds their size, far longer than any resume TTL.
const RECORD_MAX_AGE: Duration = Duration::from_secs(24 * 3600);
/// Heartbeats of nodes long gone disappear by themselves.
const NODE_MAX_AGE: Duration = Duration::from_secs(3600);

/// How long a revocation holds: for as long as a token it revokes can still
/// be valid. Tokens without `exp` never expire, so by default neither does
/// a revocation (one entry per user, so the bucket is bounded by the number
/// of users ever revoked). A deployment whose tokens all carry a bounded
/// `exp` may set the stream's max age to that lifetime (`nats stream edit
/// KV_rt_revocations --max-age …`); the session service reads it at start
/// and forgets, in memory too, what the bucket expired.
const REVOCATION_MAX_AGE: Duration = Duration::ZERO;

/// Handles on the shared buckets.
#[derive(Clone)]
pub struct Buckets {
    pub nodes: kv::Store,
    pub presence: kv::Store,
    pub sessions: kv::Store,
    pub users: kv::Store,
    pub revocations: kv::Store,
}

impl Buckets {
    /// Opens (creating when missing) every bucket. Needs JetStream on the server.
    pub async fn open(bus: &Bus) -> Result<Self, BusError> {
        let js = jetstream::new(bus.client().clone());
        Ok(Self {
            nodes: open(&js, NODES_BUCKET, NODE_MAX_AGE).await?,
            // Presence slices are removed by their node or, when a node dies,
            // by the session service; they must not expire while a node lives.
            presence: open(&js, PRESENCE_BUCKET, Duration::ZERO).await?,
            sessions: open(&js, SESSIONS_BUCKET, RECORD_MAX_AGE).await?,
            users: open(&js, USERS_BUCKET, RECORD_MAX_AGE).await?,
            revocations: open(&js, REVOCATIONS_BUCKET, REVOCATION_MAX_AGE).await?,
        })
    }
}

/// Creates the bucket's stream the way a KV bucket is laid out, then opens
/// it. Not `create_key_value`: async-nats reads the account info first, in a
/// shape nats-server 2.9 (Debian's) does not send.
async fn open(
    js: &jetstream::Context,
    bucket: &str,
    max_age: Duration,
) -> Result<kv::Store, BusError> {
    let config = stream::Config {
        name: format!("KV_{bucket}"),
        subjects: vec![format!("$KV.{bucket}.>")],
        max_messages_per_subject: 1,
        max_age,
        storage: stream::StorageType::File,
        allow_rollup: true,
        deny_delete: true,
        deny_purge: false,
        allow_direct: true,
        discard: stream::DiscardPolicy::New,
        num_replicas: 1,
        ..Default::default()
    };
    // An existing stream is used as it is (an operator may have tuned it).
    js.get_or_create_stream(config).await.map_err(|e| {
        BusError::Subscribe(format!("KV bucket {bucket}: {e} (is JetStream enabled?)"))
    })?;
    js.get_key_value(bucket)
        .await
        .map_err(|e| BusError::Subscribe(format!("KV bucket {bucket}: {e}")))
}
