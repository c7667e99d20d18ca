//! What each request to the session service does. One [`Core`] is shared by
//! every handler; the NATS plumbing and load shedding live in [`crate::ingest`].

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use rt_proto::ChannelName;
use rt_proto::ErrorCode;
use rt_proto::internal::WireError;
use rt_proto::session::{
    self, AuthReply, AuthRequest, ChannelAuthRequest, ChannelGrant, PresenceReply, PresenceRequest,
    RefreshReply, RefreshRequest, RevokeRequest, SessionEvent, SessionEvents, SessionRecord,
};
use rt_shared::Bus;
use rt_shared::cache::TtlCache;
use rt_shared::config::Config;
use rt_shared::kv::Buckets;
use rt_shared::telemetry::{RateLimitedLog, now_ms};

use crate::auth::{ChannelClaims, Claims, Verifier};
use crate::limits::{self, CountError};
use crate::metrics::{CacheLabel, ReasonLabel, SessionMetrics};
use crate::nodes::NodeView;
use crate::presence::PresenceView;
use crate::revocations::{self, RevocationView};
use crate::store::{AuditEntry, AuditEvent, Store};

/// Base of the retry hint when a connect or revoke cannot be checked or
/// recorded in NATS KV; jittered by as much again so retries spread out.
const KV_RETRY_MS: u64 = 200;

static LIMIT_UNCHECKED: RateLimitedLog = RateLimitedLog::new(10_000);
static REVOKE_FAILED: RateLimitedLog = RateLimitedLog::new(10_000);

pub struct Core {
    pub config: Arc<Config>,
    pub bus: Bus,
    pub buckets: Buckets,
    pub store: Store,
    pub verifier: Verifier,
    pub nodes: NodeView,
    pub presence: PresenceView,
    pub metrics: SessionMetrics,
    /// The mirror of the revocations bucket ([`crate::revocations`]).
    pub revocations: RevocationView,
    tokens: TtlCache<String, Claims>,
    channel_tokens: TtlCache<String, ChannelClaims>,
}

impl Core {
    pub fn new(
        config: Arc<Config>,
        bus: Bus,
        buckets: Buckets,
        store: Store,
        verifier: Verifier,
        metrics: SessionMetrics,
        revocations: RevocationView,
    ) -> Self {
        let capacity = config.session.cache_capacity;
        Self {
            nodes: NodeView::new(config.session.node_ttl_ms),
            presence: PresenceView::default(),
            tokens: TtlCache::new(capacity),
            channel_tokens: TtlCache::new(capacity),
            revocations,
            config,
            bus,
            buckets,
            store,
            verifier,
            metrics,
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
        if self
            .revocations
            .is_revoked(&claims.sub, claims.iat, now_ms())
        {
            return Err(WireError::new(
                ErrorCode::UNAUTHORIZED,
                "this token has been revoked",
            ));
        }
        Ok(())
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
        // A grant ends when its channel token would stop verifying: at
        // `exp` plus the leeway, the rule for every token (see auth.rs).
        let leeway = self.config.session.jwt_leeway_secs;
        let grants: Vec<ChannelGrant> = record
            .grants
            .iter()
            .filter(|g| g.expires_at == 0 || g.expires_at.saturating_add(leeway) > now_secs)
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
    /// (106) when the user already holds the maximum on live nodes. When
    /// the count cannot be checked (KV error, lasting contention) an
    /// increment is refused with 113 and a retry hint rather than admitted
    /// past the limit ([`crate::limits`]).
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
        let count = limits::count(
            &self.buckets.users,
            &key,
            node,
            delta,
            enforce.then_some(limit),
            &self.nodes,
            now_ms,
        );
        // Within half the gateway's request timeout, so a slow KV still
        // gets the client a 113 with a retry hint, not a 114 timeout. (A
        // write cut short may have landed: a slot then stays counted until
        // the node's connections are released or it dies; rare, and on the
        // safe side of the limit.)
        let budget = Duration::from_millis((self.config.nats.request_timeout_ms / 2).max(1));
        let result = tokio::time::timeout(budget, count)
            .await
            .unwrap_or_else(|_| Err(CountError::Kv("timed out".into())));
        let error = match result {
            Ok(()) => return Ok(()),
            Err(CountError::Limit { limit }) => {
                return Err(WireError::new(
                    ErrorCode::LIMIT_EXCEEDED,
                    format!("at most {limit} connections per user"),
                ));
            }
            Err(error) => error,
        };
        if matches!(error, CountError::Kv(_)) {
            self.metrics.kv_errors.inc();
        }
        if delta > 0 && enforce {
            let reason = error.unchecked_reason().unwrap_or("kv_error");
            self.metrics
                .limit_unchecked
                .get_or_create(&ReasonLabel { reason })
                .inc();
            if let Some(suppressed) = LIMIT_UNCHECKED.allow() {
                tracing::warn!(
                    %error,
                    reason,
                    suppressed,
                    "cannot check a user's connection count: connect answered 113"
                );
            }
        } else if let Some(suppressed) = LIMIT_UNCHECKED.allow() {
            tracing::warn!(%error, suppressed, "cannot release a connection slot");
        }
        Err(busy("cannot check the connection limit now, retry later"))
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

    /// Records a revocation in the shared bucket, which every instance
    /// follows, and answers only once it is there: a revocation that
    /// answered `{}` holds on every instance, present or future. Failing
    /// that, 113: the caller retries (revoking again is harmless).
    pub async fn revoke(&self, request: RevokeRequest) -> Result<(), WireError> {
        if let Err(error) =
            revocations::record(&self.buckets.revocations, &request.user, request.before).await
        {
            self.metrics.kv_errors.inc();
            if let Some(suppressed) = REVOKE_FAILED.allow() {
                tracing::warn!(%error, suppressed, "cannot record a revocation: answered 113");
            }
            return Err(busy("cannot record the revocation now, retry later"));
        }
        self.revocations
            .apply(&request.user, request.before, now_ms());
        // The database keeps it for audit (and to seed a bucket NATS lost).
        self.store.revoke(&request.user, request.before);
        // Instances of the previous version learn revocations only from
        // this subject; during a rolling upgrade they still do.
        let _ = self
            .bus
            .publish_msg(session::REVOKED.to_owned(), None, &request);
        Ok(())
    }

    /// A revocation announced on `rt.session.revoked`: applied here and, in
    /// case it came from an instance of the previous version (which does
    /// not write the bucket), recorded in the bucket too. A no-op for one
    /// recorded already.
    pub async fn revoked_elsewhere(&self, request: RevokeRequest) {
        self.revocations
            .apply(&request.user, request.before, now_ms());
        if let Err(error) =
            revocations::record(&self.buckets.revocations, &request.user, request.before).await
            && let Some(suppressed) = REVOKE_FAILED.allow()
        {
            tracing::warn!(%error, suppressed, "cannot record an announced revocation");
        }
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

/// 113 with a jittered retry hint: a temporary failure of NATS KV.
fn busy(message: &str) -> WireError {
    WireError::new(ErrorCode::BUSY, message)
        .with_retry_after(KV_RETRY_MS + fastrand::u64(0..=KV_RETRY_MS))
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
