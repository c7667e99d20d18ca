//! Revocations: "refuse `user`'s tokens issued at or before `before`".
//!
//! The shared record is the NATS KV bucket [`REVOCATIONS_BUCKET`], one entry
//! per user (key [`session::user_key`], value a [`RevokeRequest`]). A
//! revocation is acknowledged only once it is in the bucket, so an instance
//! that was cut off from NATS when it was made, or that starts later (with
//! its database down, or a database that never saw it), still enforces it.
//!
//! Every instance mirrors the bucket in a [`RevocationView`]: [`load`] reads
//! it before the instance reports ready, then [`follow_forever`] applies
//! changes as they come. The database keeps a copy for audit and, at start,
//! seeds the bucket where NATS lost an entry (see `warm` in the crate root).
//!
//! A revocation only ever moves forward in time: the bucket is updated by
//! compare-and-set and the larger `before` wins, everywhere.
//!
//! How long one holds is the bucket's max age, read at start. By default it
//! has none (tokens without `exp` never expire, so neither may their
//! revocation); where the bucket is given one, entries it expired are
//! forgotten in memory at the same time, so every instance agrees.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use async_nats::jetstream::kv;
use bytes::Bytes;
use futures_util::{StreamExt as _, TryStreamExt as _};
use rt_proto::session::REVOCATIONS_BUCKET;
use rt_proto::session::{self, RevokeRequest};

/// Compare-and-set attempts when recording a revocation.
const CAS_ATTEMPTS: usize = 8;
/// Entries read at once while loading the bucket.
const LOAD_CONCURRENCY: usize = 32;

/// Why a revocation could not be recorded or loaded.
#[derive(Debug, thiserror::Error)]
pub enum RevocationError {
    #[error("KV bucket {REVOCATIONS_BUCKET}: {0}")]
    Kv(String),
    #[error("KV bucket {REVOCATIONS_BUCKET}: the entry of {user:?} kept changing")]
    Contended { user: String },
    #[error("cannot encode a revocation: {0}")]
    Encode(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Revoked {
    before_secs: u64,
    /// When the bucket drops the entry (ms since the epoch); `None`: never.
    until_ms: Option<u64>,
}

/// This instance's mirror of the revocations bucket, shared by cloning.
#[derive(Clone)]
pub struct RevocationView {
    /// By KV key ([`session::user_key`]), so a deleted entry (which carries
    /// no value) finds its user.
    by_key: Arc<RwLock<HashMap<String, Revoked>>>,
    /// The bucket's max age in ms; 0: entries never expire.
    max_age_ms: u64,
}

impl RevocationView {
    pub fn new(max_age: Duration) -> Self {
        Self {
            by_key: Arc::new(RwLock::new(HashMap::new())),
            max_age_ms: u64::try_from(max_age.as_millis()).unwrap_or(u64::MAX),
        }
    }

    /// When an entry written at `written_ms` leaves the bucket.
    fn until(&self, written_ms: u64) -> Option<u64> {
        (self.max_age_ms > 0).then(|| written_ms.saturating_add(self.max_age_ms))
    }

    /// The bucket's max age (zero: revocations never expire).
    pub fn max_age(&self) -> Duration {
        Duration::from_millis(self.max_age_ms)
    }

    /// Applies `user`'s revocation written at `written_ms`; the larger
    /// `before_secs` wins, as in the bucket.
    pub fn apply(&self, user: &str, before_secs: u64, written_ms: u64) {
        let until_ms = self.until(written_ms);
        self.merge(session::user_key(user), before_secs, until_ms);
    }

    fn merge(&self, key: String, before_secs: u64, until_ms: Option<u64>) {
        let Ok(mut map) = self.by_key.write() else {
            return;
        };
        let fresh = Revoked {
            before_secs,
            until_ms,
        };
        map.entry(key)
            .and_modify(|held| {
                if before_secs > held.before_secs {
                    *held = fresh;
                } else if before_secs == held.before_secs {
                    // The same revocation written again lives as long as its last write.
                    held.until_ms = match (held.until_ms, until_ms) {
                        (Some(a), Some(b)) => Some(a.max(b)),
                        _ => None,
                    };
                }
            })
            .or_insert(fresh);
    }

    /// Applies one entry of the bucket (from the load or the watch).
    fn apply_entry(&self, entry: &kv::Entry) {
        match entry.operation {
            kv::Operation::Put => {
                let Ok(request) = rt_proto::internal::from_msgpack::<RevokeRequest>(&entry.value)
                else {
                    tracing::warn!(key = entry.key, "undecodable revocation in KV; ignored");
                    return;
                };
                let written_ms =
                    u64::try_from(entry.created.unix_timestamp_nanos() / 1_000_000).unwrap_or(0);
                self.merge(entry.key.clone(), request.before, self.until(written_ms));
            }
            // Someone removed the entry by hand: the bucket no longer revokes.
            kv::Operation::Delete | kv::Operation::Purge => {
                if let Ok(mut map) = self.by_key.write() {
                    map.remove(&entry.key);
                }
            }
        }
    }

    /// The `before` in force for `user`, if any.
    pub fn before(&self, user: &str, now_ms: u64) -> Option<u64> {
        let map = self.by_key.read().ok()?;
        let held = map.get(&session::user_key(user))?;
        held.until_ms
            .is_none_or(|until| until > now_ms)
            .then_some(held.before_secs)
    }

    /// Whether a token of `user` issued at `iat` (seconds; a token without
    /// `iat` counts as issued at 0, so any revocation covers it) is refused.
    pub fn is_revoked(&self, user: &str, iat: Option<u64>, now_ms: u64) -> bool {
        self.before(user, now_ms)
            .is_some_and(|before| iat.unwrap_or(0) <= before)
    }

    /// Revocations held (expired ones included until the next load).
    pub fn len(&self) -> usize {
        self.by_key.read().map(|map| map.len()).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Reads the whole bucket into `view` and returns a watch of what changes
/// after that. The watch starts first, so nothing written while the bucket
/// is being read can fall between the two.
pub async fn load(view: &RevocationView, bucket: &kv::Store) -> Result<kv::Watch, RevocationError> {
    let kv_error = |e: &dyn std::fmt::Display| RevocationError::Kv(e.to_string());
    let watch = bucket.watch_all().await.map_err(|e| kv_error(&e))?;
    let keys: Vec<String> = bucket
        .keys()
        .await
        .map_err(|e| kv_error(&e))?
        .try_collect()
        .await
        .map_err(|e| kv_error(&e))?;
    let entries: Vec<Option<kv::Entry>> = futures_util::stream::iter(keys)
        .map(|key| async move { bucket.entry(key).await })
        .buffer_unordered(LOAD_CONCURRENCY)
        .try_collect()
        .await
        .map_err(|e| kv_error(&e))?;
    for entry in entries.iter().flatten() {
        view.apply_entry(entry);
    }
    Ok(watch)
}

/// Applies the bucket's changes for as long as the service runs; after the
/// watch fails (e.g. NATS restarted) it loads the bucket again and goes on.
pub async fn follow_forever(view: RevocationView, bucket: kv::Store, mut watch: kv::Watch) {
    loop {
        while let Some(entry) = watch.next().await {
            match entry {
                Ok(entry) => view.apply_entry(&entry),
                Err(error) => tracing::warn!(%error, "revocation watch error"),
            }
        }
        loop {
            tokio::time::sleep(Duration::from_secs(1)).await;
            match load(&view, &bucket).await {
                Ok(again) => {
                    watch = again;
                    break;
                }
                Err(error) => tracing::warn!(%error, "cannot watch revocations; trying again"),
            }
        }
    }
}

/// Writes `user`'s revocation into the bucket unless one at least as late
/// is there already. Compare-and-set, so concurrent revocations of one user
/// on several instances end with the latest.
pub async fn record(bucket: &kv::Store, user: &str, before: u64) -> Result<(), RevocationError> {
    let key = session::user_key(user);
    let value = rt_proto::internal::to_msgpack(&RevokeRequest {
        user: user.to_owned(),
        before,
    })
    .map_err(|e| RevocationError::Encode(e.to_string()))?;
    let value = Bytes::from(value);
    for _ in 0..CAS_ATTEMPTS {
        let entry = bucket
            .entry(key.clone())
            .await
            .map_err(|e| RevocationError::Kv(e.to_string()))?;
        let revision = match &entry {
            Some(entry) if entry.operation == kv::Operation::Put => {
                let held = rt_proto::internal::from_msgpack::<RevokeRequest>(&entry.value)
                    .map(|r| r.before)
                    .ok();
                if held.is_some_and(|held| held >= before) {
                    return Ok(());
                }
                Some(entry.revision)
            }
            Some(entry) => Some(entry.revision),
            None => None,
        };
        // A conflict means someone wrote in between: read again.
        match revision {
            Some(revision) => match bucket.update(&key, value.clone(), revision).await {
                Ok(_) => return Ok(()),
                Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => continue,
                Err(e) => return Err(RevocationError::Kv(e.to_string())),
            },
            None => match bucket.create(&key, value.clone()).await {
                Ok(_) => return Ok(()),
                Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => continue,
                Err(e) => return Err(RevocationError::Kv(e.to_string())),
            },
        }
    }
    Err(RevocationError::Contended {
        user: user.to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_latest_revocation_wins_and_covers_tokens_issued_up_to_it() {
        let view = RevocationView::new(Duration::ZERO);
        assert!(!view.is_revoked("ann", Some(5), 0));
        view.apply("ann", 100, 1_000);
        view.apply("ann", 50, 2_000);
        assert_eq!(view.before("ann", 3_000), Some(100));
        assert!(view.is_revoked("ann", Some(100), u64::MAX), "iat == before");
        assert!(view.is_revoked("ann", None, 0), "no iat: issued at 0");
        assert!(!view.is_revoked("ann", Some(101), 0));
        assert!(!view.is_revoked("bob", Some(1), 0), "per user");
    }

    #[test]
    fn with_a_max_age_a_revocation_ends_when_the_bucket_drops_it() {
        let view = RevocationView::new(Duration::from_secs(10));
        view.apply("ann", 100, 1_000);
        assert!(view.is_revoked("ann", Some(1), 10_999));
        assert!(!view.is_revoked("ann", Some(1), 11_000));
        // Written again later: it lives as long as the newer write.
        view.apply("ann", 100, 5_000);
        assert!(view.is_revoked("ann", Some(1), 14_999));
        // A later revocation replaces the earlier one, expiry included.
        view.apply("ann", 200, 2_000);
        assert!(!view.is_revoked("ann", Some(1), 12_000));
    }

    #[test]
    fn users_with_any_characters_are_kept_apart() {
        let view = RevocationView::new(Duration::ZERO);
        view.apply("a.b", 10, 0);
        view.apply("a b/é", 20, 0);
        assert_eq!(view.before("a.b", 0), Some(10));
        assert_eq!(view.before("a b/é", 0), Some(20));
        assert_eq!(view.before("a_b", 0), None);
        assert_eq!(view.len(), 2);
    }
}
