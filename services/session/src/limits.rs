//! The per-user connection limit (`session.max_connections_per_user`),
//! counted in the users bucket ([`rt_proto::session::USERS_BUCKET`]): one
//! entry per user with its live connections per node, updated by
//! compare-and-set so that two instances cannot both give away the last slot.
//!
//! When the count cannot be read or written (a KV error, or an entry that
//! kept changing under every attempt) a connect is not admitted unchecked:
//! the caller answers 113 with a retry hint and the client comes back. A
//! limit that silently stops holding under load or during a NATS hiccup is
//! no limit.

use async_nats::jetstream::kv;
use bytes::Bytes;
use rt_proto::session::UserConnections;

use crate::nodes::NodeView;

/// Attempts of a compare-and-set update before giving up.
pub const CAS_ATTEMPTS: usize = 8;

/// Why a count was not changed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CountError {
    /// The user holds `limit` connections on live nodes already.
    #[error("at most {limit} connections per user")]
    Limit { limit: u32 },
    #[error("cannot read or write the connection count: {0}")]
    Kv(String),
    #[error("the connection count kept changing over {CAS_ATTEMPTS} attempts")]
    Contended,
}

impl CountError {
    /// The `reason` label of `rt_session_limit_unchecked_total`; `None` for a
    /// limit that was checked and reached.
    pub fn unchecked_reason(&self) -> Option<&'static str> {
        match self {
            Self::Limit { .. } => None,
            Self::Kv(_) => Some("kv_error"),
            Self::Contended => Some("contended"),
        }
    }
}

/// How a write of the count failed.
pub(crate) enum WriteError {
    /// The entry changed since it was read: read again.
    Conflict,
    Failed(String),
}

/// What counting needs from the users bucket; a trait so that the failure
/// paths can be tested without a NATS server that misbehaves on cue.
pub(crate) trait CountStore {
    /// The counts under `key` and their revision (`None`: no entry yet).
    async fn read(&self, key: &str) -> Result<(UserConnections, Option<u64>), String>;
    /// Writes `value` if the entry is still at `revision` (`None`: absent).
    async fn write(&self, key: &str, value: Bytes, revision: Option<u64>)
    -> Result<(), WriteError>;
}

impl CountStore for kv::Store {
    async fn read(&self, key: &str) -> Result<(UserConnections, Option<u64>), String> {
        let entry = self
            .entry(key.to_owned())
            .await
            .map_err(|e| e.to_string())?;
        Ok(match entry {
            // An undecodable entry is overwritten (at its revision) from zero.
            Some(entry) if entry.operation == kv::Operation::Put => (
                rt_proto::internal::from_msgpack(&entry.value).unwrap_or_default(),
                Some(entry.revision),
            ),
            Some(entry) => (UserConnections::default(), Some(entry.revision)),
            None => (UserConnections::default(), None),
        })
    }

    async fn write(
        &self,
        key: &str,
        value: Bytes,
        revision: Option<u64>,
    ) -> Result<(), WriteError> {
        match revision {
            Some(revision) => match self.update(key, value, revision).await {
                Ok(_) => Ok(()),
                Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => {
                    Err(WriteError::Conflict)
                }
                Err(e) => Err(WriteError::Failed(e.to_string())),
            },
            None => match self.create(key, value).await {
                Ok(_) => Ok(()),
                Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => {
                    Err(WriteError::Conflict)
                }
                Err(e) => Err(WriteError::Failed(e.to_string())),
            },
        }
    }
}

/// Adds `delta` to the connections under `key` on `node`. With `limit`, an
/// increment is refused when the user already holds that many on live nodes
/// (connections on dead nodes are gone with them and are dropped from the
/// entry). `now_ms` gives the time each attempt judges liveness at.
pub(crate) async fn count(
    store: &impl CountStore,
    key: &str,
    node: &str,
    delta: i64,
    limit: Option<u32>,
    nodes: &NodeView,
    now_ms: impl Fn() -> u64,
) -> Result<(), CountError> {
    for _ in 0..CAS_ATTEMPTS {
        let now = now_ms();
        let (mut counts, revision) = store.read(key).await.map_err(CountError::Kv)?;
        counts
            .nodes
            .retain(|n, count| *count > 0 && (n == node || nodes.is_live(n, now)));
        if let Some(limit) = limit {
            let live: u64 = counts.nodes.values().map(|&c| u64::from(c)).sum();
            if delta > 0 && live >= u64::from(limit) {
                return Err(CountError::Limit { limit });
            }
        }
        let slot = counts.nodes.entry(node.to_owned()).or_insert(0);
        *slot = u32::try_from((i64::from(*slot) + delta).max(0)).unwrap_or(u32::MAX);
        counts.nodes.retain(|_, count| *count > 0);
        let bytes =
            rt_proto::internal::to_msgpack(&counts).map_err(|e| CountError::Kv(e.to_string()))?;
        match store.write(key, Bytes::from(bytes), revision).await {
            Ok(()) => return Ok(()),
            Err(WriteError::Conflict) => continue,
            Err(WriteError::Failed(error)) => return Err(CountError::Kv(error)),
        }
    }
    Err(CountError::Contended)
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;
    use std::sync::Mutex;

    use super::*;

    /// A users bucket that answers from a script, then behaves.
    #[derive(Default)]
    struct Scripted {
        entry: Mutex<(UserConnections, Option<u64>)>,
        reads: Mutex<VecDeque<Result<(), String>>>,
        writes: Mutex<VecDeque<WriteError>>,
        attempts: Mutex<usize>,
    }

    impl CountStore for Scripted {
        async fn read(&self, _: &str) -> Result<(UserConnections, Option<u64>), String> {
            if let Some(Err(error)) = self.reads.lock().expect("lock").pop_front() {
                return Err(error);
            }
            Ok(self.entry.lock().expect("lock").clone())
        }

        async fn write(&self, _: &str, value: Bytes, _: Option<u64>) -> Result<(), WriteError> {
            *self.attempts.lock().expect("lock") += 1;
            if let Some(error) = self.writes.lock().expect("lock").pop_front() {
                return Err(error);
            }
            let counts = rt_proto::internal::from_msgpack(&value).expect("counts");
            let mut entry = self.entry.lock().expect("lock");
            let revision = entry.1.unwrap_or(0) + 1;
            *entry = (counts, Some(revision));
            Ok(())
        }
    }

    fn live_nodes() -> NodeView {
        let nodes = NodeView::new(1_000);
        nodes.beat_for_tests("n1", 10_000);
        nodes
    }

    async fn connect(store: &Scripted, limit: u32) -> Result<(), CountError> {
        count(store, "u_x", "n1", 1, Some(limit), &live_nodes(), || 10_000).await
    }

    fn held(store: &Scripted) -> u32 {
        store
            .entry
            .lock()
            .expect("lock")
            .0
            .nodes
            .get("n1")
            .copied()
            .unwrap_or(0)
    }

    #[actix_rt::test]
    async fn counts_up_to_the_limit_then_refuses() {
        let store = Scripted::default();
        assert_eq!(connect(&store, 2).await, Ok(()));
        assert_eq!(connect(&store, 2).await, Ok(()));
        assert_eq!(
            connect(&store, 2).await,
            Err(CountError::Limit { limit: 2 })
        );
        assert_eq!(held(&store), 2);
        // A release is never refused.
        let release = count(&store, "u_x", "n1", -1, None, &live_nodes(), || 10_000).await;
        assert_eq!(release, Ok(()));
        assert_eq!(held(&store), 1);
    }

    #[actix_rt::test]
    async fn a_conflict_is_retried_and_a_lasting_one_is_not_admitted() {
        let store = Scripted::default();
        store
            .writes
            .lock()
            .expect("lock")
            .extend((0..CAS_ATTEMPTS - 1).map(|_| WriteError::Conflict));
        assert_eq!(
            connect(&store, 5).await,
            Ok(()),
            "7 conflicts, then written"
        );
        assert_eq!(held(&store), 1);

        let store = Scripted::default();
        store
            .writes
            .lock()
            .expect("lock")
            .extend((0..CAS_ATTEMPTS * 2).map(|_| WriteError::Conflict));
        let error = connect(&store, 5).await.expect_err("not admitted");
        assert_eq!(error, CountError::Contended);
        assert_eq!(error.unchecked_reason(), Some("contended"));
        assert_eq!(*store.attempts.lock().expect("lock"), CAS_ATTEMPTS);
        assert_eq!(held(&store), 0);
    }

    #[actix_rt::test]
    async fn a_kv_error_is_not_an_admission() {
        let store = Scripted::default();
        store
            .reads
            .lock()
            .expect("lock")
            .push_back(Err("timed out".into()));
        let error = connect(&store, 5).await.expect_err("not admitted");
        assert!(matches!(error, CountError::Kv(_)), "{error:?}");
        assert_eq!(error.unchecked_reason(), Some("kv_error"));

        let store = Scripted::default();
        store
            .writes
            .lock()
            .expect("lock")
            .push_back(WriteError::Failed("no responders".into()));
        let error = connect(&store, 5).await.expect_err("not admitted");
        assert!(matches!(error, CountError::Kv(_)), "{error:?}");
        assert_eq!(held(&store), 0);
        assert_eq!(
            CountError::Limit { limit: 1 }.unchecked_reason(),
            None,
            "a reached limit is checked"
        );
    }

    #[actix_rt::test]
    async fn connections_on_dead_nodes_do_not_count() {
        let store = Scripted::default();
        store
            .entry
            .lock()
            .expect("lock")
            .0
            .nodes
            .insert("dead".into(), 5);
        assert_eq!(connect(&store, 1).await, Ok(()));
        let entry = store.entry.lock().expect("lock").0.clone();
        assert_eq!(entry.nodes.get("dead"), None, "dropped from the entry");
        assert_eq!(entry.nodes.get("n1"), Some(&1));
    }
}
