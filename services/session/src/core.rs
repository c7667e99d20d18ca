//! What each request to the session service does. One [`Core`] is shared by
//! every handler; the NATS plumbing and load shedding live in [`crate::ingest`].

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use bytes::Bytes;
use rt_proto::ChannelName;
use rt_proto::ErrorCode;
use rt_proto::internal::WireError;
use rt_proto::session::{
    self, AuthReply, AuthRequest, ChannelAuthRequest, ChannelGrant, PresenceReply, PresenceRequest,
    RefreshReply, RefreshRequest, RevokeRequest, SessionEvent, SessionEvents, SessionRecord,
    UserConnections,
};
use rt_shared::Bus;
use rt_shared::cache::TtlCache;
use rt_shared::config::Config;
use rt_shared::kv::Buckets;
use rt_shared::telemetry::now_ms;

use crate::auth::{ChannelClaims, Claims, Verifier};
use crate::metrics::{CacheLabel, SessionMetrics};
use crate::nodes::NodeView;
use crate::presence::PresenceView;
use crate::store::{AuditEntry, AuditEvent, Store};

/// Attempts of a compare-and-set update before giving up.
const CAS_ATTEMPTS: usize = 8;

pub struct Core {
    pub config: Arc<Config>,
    pub bus: Bus,
    pub buckets: Buckets,
    pub store: Store,
    pub verifier: Verifier,
    pub nodes: NodeView,
    pub presence: PresenceView,
    pub metrics: SessionMetrics,
    tokens: TtlCache<String, Claims>,
    channel_tokens: TtlCache<String, ChannelClaims>,
    /// Users whose tokens issued (`iat`) before the value are refused.
    revocations: RwLock<HashMap<String, u64>>,
}

impl Core {
    pub fn new(
        config: Arc<Config>,
        bus: Bus,
        buckets: Buckets,
        store: Store,
        verifier: Verifier,
        metrics: SessionMetrics,
    ) -> Self {
        let capacity = config.session.cache_capacity;
        Self {
            nodes: NodeView::new(config.session.node_ttl_ms),
            presence: PresenceView::default(),
            tokens: TtlCache::new(capacity),
            channel_tokens: TtlCache::new(capacity),
            revocations: RwLock::new(HashMap::new()),
            config,
            bus,
            buckets,
            store,
            verifier,
            metrics,
        }
    }

    pub fn load_revocations(&self, revocations: Vec<(String, u64)>) {
        if let Ok(mut map) = self.revocations.write() {
            for (user, before) in revocations {
                let entry = map.entry(user).or_insert(0);
                *entry = (*entry).max(before);
            }
        }
    }

    /// A connection token, verified once and then served from the cache
    /// (never past its `exp`, nor past `cache_ttl_secs`).
    fn claims(&self, token: &str) -> Result<Claims, WireError> {
        self.cached(
            &self.tokens,
            "token",
            token,
            |c| c.exp,
            |now_secs| self.verifier.verify(token, now_secs),
        )
    }

    fn channel_claims(&self, token: &str) -> Result<ChannelClaims, WireError> {
        self.cached(
            &self.channel_tokens,
            "channel_token",
            token,
            |c| c.exp,
            |now_secs| self.verifier.verify_channel(token, now_secs),
        )
    }

    /// Serves `token`'s claims from `cache` while they are unexpired, else
    /// verifies it and caches the result for at most `cache_ttl_secs`.
    fn cached<C: Clone>(
        &self,
        cache: &TtlCache<String, C>,
        cache_name: &'static str,
        token: &str,
        exp: impl Fn(&C) -> Option<u64>,
        verify: impl FnOnce(u64) -> Result<C, crate::auth::AuthError>,
    ) -> Result<C, WireError> {
        let now = Instant::now();
        let label = CacheLabel { cache: cache_name };
        let now_secs = now_ms() / 1000;
        if let Some(claims) = cache.get(token, now)
            && exp(&claims).is_none_or(|exp| exp > now_secs)
        {
            self.metrics.cache_hits.get_or_create(&label).inc();
            return Ok(claims);
        }
        self.metrics.cache_misses.get_or_create(&label).inc();
        let claims = verify(now_secs).map_err(|e| WireError::new(e.code(), e.to_string()))?;
        let ttl = self.cache_ttl(exp(&claims), now_secs);
        if !ttl.is_zero() {
            cache.insert(token.to_owned(), claims.clone(), now + ttl);
        }
        Ok(claims)
    }

    fn cache_ttl(&self, exp: Option<u64>, now_secs: u64) -> Duration {
        let max = self.config.session.cache_ttl_secs;
        let secs = match exp {
            Some(exp) => exp.saturating_sub(now_secs).min(max),
            None => max,
        };
        Duration::from_secs(secs)
    }

    fn check_revoked(&self, claims: &Claims) -> Result<(), WireError> {
        let before = self
            .revocations
            .read()
            .ok()
            .and_then(|map| map.get(&claims.sub).copied());
        match before {
            Some(before) if claims.iat.unwrap_or(0) <= before => Err(WireError::new(
                ErrorCode::UNAUTHORIZED,
                "this token has been revoked",
            )),
            _ => Ok(()),
        }
    }

    /// `connect`: who it is, whether it may connect, and its session.
    pub async fn authenticate(&self, request: AuthRequest) -> Result<AuthReply, WireError> {
        let claims = match &request.token {
            Some(token) => {
                let claims = self.claims(token)?;
                self.check_revoked(&claims)?;
                Some(claims)
            }
            None if request.allow_anonymous => None,
            None => {
                return Err(WireError::new(
                    ErrorCode::UNAUTHORIZED,
                    "anonymous connections are not allowed",
                ));
            }
        };
        let user = claims.as_ref().map(|c| c.sub.clone()).unwrap_or_default();
        if !user.is_empty() {
            self.count_connection(&user, &request.node, 1, true).await?;
        }
        let now = now_ms();
        let resumable = match &request.session {
            Some(id) => self.resumable(id, &user, now).await,
            None => None,
        };
        let channels = claims
            .as_ref()
            .map(|c| c.channels.clone())
            .unwrap_or_default();
        let (session_id, resumed, record) = match resumable {
            Some((id, record)) => {
                self.metrics.sessions_resumed.inc();
                (id, true, record)
            }
            None => {
                self.metrics.sessions_created.inc();
                let record = SessionRecord {
                    user: user.clone(),
                    created_ms: now,
                    updated_ms: now,
                    node: None,
                    closed_ms: None,
                    subs: Vec::new(),
                    grants: Vec::new(),
                };
                (new_session_id(), false, record)
            }
        };
        let now_secs = now / 1000;
        let grants: Vec<ChannelGrant> = record
            .grants
            .iter()
            .filter(|g| g.expires_at == 0 || g.expires_at > now_secs)
            .cloned()
            .collect();
        let restore: Vec<String> = record
            .subs
            .iter()
            .filter(|name| self.may_restore(name, &user, &channels, &grants))
            .cloned()
            .collect();
        let record = SessionRecord {
            updated_ms: now,
            node: Some(request.node.clone()),
            closed_ms: None,
            grants: grants.clone(),
            ..record
        };
        self.save_session(&session_id, &record).await;
        self.store.audit(AuditEntry {
            client: request.client.clone(),
            session: session_id.clone(),
            user: user.clone(),
            node: request.node.clone(),
            event: AuditEvent::Connect,
            code: None,
            at_ms: now,
        });
        Ok(AuthReply {
            user,
            info: claims.as_ref().and_then(|c| c.info.clone()),
            expires_at: claims.as_ref().and_then(|c| c.exp).unwrap_or(0),
            channels,
            session: session_id,
            resumed,
            restore,
            grants,
        })
    }

    /// Whether a resumed session's channel is still open to this user.
    fn may_restore(
        &self,
        name: &str,
        user: &str,
        channels: &[String],
        grants: &[ChannelGrant],
    ) -> bool {
        let Ok(channel) = ChannelName::parse(name) else {
            return false;
        };
        let Some(namespace) = self.config.namespace(&channel) else {
            return false;
        };
        if user.is_empty() && !namespace.allow_anonymous {
            return false;
        }
        !namespace.private
            || channels.iter().any(|c| c == name)
            || grants.iter().any(|g| g.channel == name)
    }

    /// The session `id` if it belongs to `user` and its connection ended
    /// less than the resume TTL ago (or its node died less than that ago).
    async fn resumable(&self, id: &str, user: &str, now: u64) -> Option<(String, SessionRecord)> {
        let record = self.load_session(id).await?;
        if record.user != user {
            return None;
        }
        let ttl_ms = self.config.session.resume_ttl_secs * 1000;
        let ended_ms = match (&record.closed_ms, &record.node) {
            (Some(closed), _) => *closed,
            // Still open on a live node: a second connection joins the session.
            (None, Some(node)) if self.nodes.is_live(node, now) => now,
            (None, Some(node)) => self.nodes.last_seen(node).unwrap_or(record.updated_ms),
            (None, None) => record.updated_ms,
        };
        (ended_ms + ttl_ms > now).then(|| (id.to_owned(), record))
    }

    async fn load_session(&self, id: &str) -> Option<SessionRecord> {
        if id.is_empty() || id.len() > 64 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        match self.buckets.sessions.get(id).await {
            Ok(Some(bytes)) => return rt_proto::internal::from_msgpack(&bytes).ok(),
            Ok(None) => {}
            Err(error) => {
                self.metrics.kv_errors.inc();
                tracing::warn!(%error, "cannot read a session from KV; trying the database");
            }
        }
        match self.store.load_session(id).await {
            Ok(record) => record,
            Err(error) => {
                tracing::warn!(%error, "cannot read a session from the database");
                None
            }
        }
    }

    async fn save_session(&self, id: &str, record: &SessionRecord) {
        self.store.save_session(id, record);
        match rt_proto::internal::to_msgpack(record) {
            Ok(bytes) => {
                if let Err(error) = self.buckets.sessions.put(id, Bytes::from(bytes)).await {
                    self.metrics.kv_errors.inc();
                    tracing::warn!(%error, "cannot write a session to KV");
                }
            }
            Err(error) => tracing::error!(%error, "cannot encode a session"),
        }
    }

    /// Adds `delta` to `user`'s connections on `node`; with `enforce`, refuses
    /// (106) when the user already holds the maximum on live nodes. A
    /// compare-and-set loop, so concurrent connects on several instances
    /// cannot both take the last slot.
    async fn count_connection(
        &self,
        user: &str,
        node: &str,
        delta: i64,
        enforce: bool,
    ) -> Result<(), WireError> {
        let limit = self.config.session.max_connections_per_user;
        if limit == 0 {
            return Ok(());
        }
        let key = session::user_key(user);
        let bucket = &self.buckets.users;
        for _ in 0..CAS_ATTEMPTS {
            let now = now_ms();
            let entry = match bucket.entry(key.clone()).await {
                Ok(entry) => entry,
                Err(error) => {
                    self.metrics.kv_errors.inc();
                    tracing::warn!(%error, "cannot read connection counts; not enforcing the limit");
                    return Ok(());
                }
            };
            let (mut counts, revision) = match &entry {
                Some(entry) if entry.operation == async_nats::jetstream::kv::Operation::Put => (
                    rt_proto::internal::from_msgpack::<UserConnections>(&entry.value)
                        .unwrap_or_default(),
                    Some(entry.revision),
                ),
                Some(entry) => (UserConnections::default(), Some(entry.revision)),
                None => (UserConnections::default(), None),
            };
            // Dead nodes' connections are gone with them.
            counts
                .nodes
                .retain(|n, count| *count > 0 && (n == node || self.nodes.is_live(n, now)));
            let live: u64 = counts.nodes.values().map(|&c| u64::from(c)).sum();
            if enforce && delta > 0 && live >= u64::from(limit) {
                return Err(WireError::new(
                    ErrorCode::LIMIT_EXCEEDED,
                    format!("at most {limit} connections per user"),
                ));
            }
            let slot = counts.nodes.entry(node.to_owned()).or_insert(0);
            *slot = u32::try_from((i64::from(*slot) + delta).max(0)).unwrap_or(u32::MAX);
            counts.nodes.retain(|_, count| *count > 0);
            let Ok(bytes) = rt_proto::internal::to_msgpack(&counts) else {
                return Ok(());
            };
            let written = match revision {
                Some(revision) => bucket
                    .update(&key, Bytes::from(bytes), revision)
                    .await
                    .map(|_| ())
                    .map_err(|e| e.to_string()),
                None => bucket
                    .create(&key, Bytes::from(bytes))
                    .await
                    .map(|_| ())
                    .map_err(|e| e.to_string()),
            };
            match written {
                Ok(()) => return Ok(()),
                // Someone else wrote in between: read again.
                Err(_) => continue,
            }
        }
        self.metrics.kv_errors.inc();
        tracing::warn!(
            user,
            "connection count contended; not enforcing the limit this time"
        );
        Ok(())
    }

    pub fn refresh(&self, request: RefreshRequest) -> Result<RefreshReply, WireError> {
        let claims = self.claims(&request.token)?;
        if claims.sub != request.user {
            return Err(WireError::new(
                ErrorCode::UNAUTHORIZED,
                "the token is for another user",
            ));
        }
        self.check_revoked(&claims)?;
        Ok(RefreshReply {
            expires_at: claims.exp.unwrap_or(0),
            channels: claims.channels,
            info: claims.info,
        })
    }

    pub async fn authorize(&self, request: ChannelAuthRequest) -> Result<ChannelGrant, WireError> {
        let claims = self.channel_claims(&request.token)?;
        if claims.sub != request.user || claims.channel != request.channel {
            return Err(WireError::new(
                ErrorCode::PERMISSION_DENIED,
                "the channel token is for another user or channel",
            ));
        }
        let grant = ChannelGrant {
            channel: request.channel,
            expires_at: claims.exp.unwrap_or(0),
        };
        // Remembered in the session, so a resume keeps the channel open.
        if let Some(mut record) = self.load_session(&request.session).await {
            record.grants.retain(|g| g.channel != grant.channel);
            record.grants.push(grant.clone());
            record.updated_ms = now_ms();
            self.save_session(&request.session, &record).await;
        }
        Ok(grant)
    }

    pub fn presence(&self, request: &PresenceRequest) -> Result<PresenceReply, WireError> {
        let channel = ChannelName::parse(&request.channel)
            .map_err(|e| WireError::new(ErrorCode::BAD_REQUEST, e.to_string()))?;
        Ok(self.presence.query(
            &channel,
            &self.nodes,
            now_ms(),
            self.config.session.presence_max_list,
        ))
    }

    pub async fn revoke(&self, request: RevokeRequest) -> Result<(), WireError> {
        self.load_revocations(vec![(request.user.clone(), request.before)]);
        self.store.revoke(&request.user, request.before);
        // Every other instance applies it too.
        self.bus
            .publish_msg(session::REVOKED.to_owned(), None, &request)
            .map_err(|e| WireError::new(ErrorCode::BUSY, e.to_string()).with_retry_after(100))
    }

    /// Applies a node's batch of connection events.
    pub async fn events(&self, batch: SessionEvents) {
        for event in batch.events {
            match event {
                SessionEvent::Subs {
                    session,
                    subs,
                    at_ms,
                } => {
                    if let Some(mut record) = self.load_session(&session).await {
                        record.subs = subs;
                        record.updated_ms = at_ms;
                        self.save_session(&session, &record).await;
                    }
                }
                SessionEvent::Closed {
                    session,
                    client,
                    user,
                    code,
                    subs,
                    at_ms,
                } => {
                    if let Some(mut record) = self.load_session(&session).await
                        && record.user == user
                    {
                        record.subs = subs;
                        record.updated_ms = at_ms;
                        record.closed_ms = Some(at_ms);
                        record.node = None;
                        self.save_session(&session, &record).await;
                    }
                    if !user.is_empty() {
                        let _ = self.count_connection(&user, &batch.node, -1, false).await;
                    }
                    self.store.audit(AuditEntry {
                        client,
                        session,
                        user,
                        node: batch.node.clone(),
                        event: AuditEvent::Disconnect,
                        code: Some(code),
                        at_ms,
                    });
                }
            }
        }
    }
}

/// 128 bits from the system's CSPRNG, hex: unguessable. A resume also
/// needs a token for the same user, so the id alone opens nothing private.
fn new_session_id() -> String {
    use ring::rand::SecureRandom as _;
    let mut bytes = [0u8; 16];
    if ring::rand::SystemRandom::new().fill(&mut bytes).is_err() {
        // The OS generator does not fail on supported systems; if it ever
        // does, a non-resumable random id is still safe to hand out.
        bytes = fastrand::u128(..).to_le_bytes();
    }
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
