//! The write-behind buffer: writes waiting for the database, bounded, with
//! an explicit policy when the bound is hit. Pure data, no I/O, so the
//! policy is unit-tested directly.
//!
//! Every write gets a sequence number in enqueue order; batches are taken
//! oldest first across all kinds, so once a batch ending at sequence `n` is
//! written, everything enqueued up to `n` is either written or was dropped
//! ([`super::Store::flush`] relies on this).
//!
//! **Coalescing.** A session upsert for an id that is already queued
//! replaces the queued record in place (last wins) and keeps its place in
//! line; a revocation for a user already queued keeps the larger
//! `before_secs`. So a batch never holds the same session or user twice, and
//! the buffer holds at most one write per session and per user.
//!
//! **When full** (`capacity` writes queued), in this order:
//! 1. the oldest queued audit row is dropped;
//! 2. if no audit row is queued and the new write is one, the new row is dropped;
//! 3. otherwise the oldest queued session upsert is dropped (there is never
//!    an older duplicate to prefer: duplicates were coalesced on arrival);
//! 4. only if the buffer holds nothing but revocations, the oldest one.
//!
//! Each drop is reported to the caller, which counts it.

use std::collections::{HashMap, VecDeque};

use rt_proto::session::SessionRecord;

use super::AuditEntry;

/// A revocation waiting to be written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Revocation {
    pub user: String,
    pub before_secs: u64,
    pub created_ms: u64,
}

/// One row to write.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum Row {
    Session(String, SessionRecord),
    Audit(AuditEntry),
    Revocation(Revocation),
}

/// What kind of write a row is (the `kind` label of the metrics).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(super) enum Kind {
    Session,
    Audit,
    Revocation,
}

impl Kind {
    pub fn label(self) -> &'static str {
        match self {
            Self::Session => "session",
            Self::Audit => "audit",
            Self::Revocation => "revocation",
        }
    }
}

impl Row {
    pub fn kind(&self) -> Kind {
        match self {
            Self::Session(..) => Kind::Session,
            Self::Audit(_) => Kind::Audit,
            Self::Revocation(_) => Kind::Revocation,
        }
    }
}

/// Rows taken from the buffer to be written in one transaction.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Batch {
    /// The highest sequence number among the writes taken.
    pub max_seq: u64,
    pub rows: Vec<Row>,
}

impl Batch {
    pub fn count(&self, kind: Kind) -> u64 {
        self.rows.iter().filter(|row| row.kind() == kind).count() as u64
    }

    /// The session `id` if this batch holds it.
    pub fn session(&self, id: &str) -> Option<&SessionRecord> {
        self.rows.iter().find_map(|row| match row {
            Row::Session(row_id, record) if row_id == id => Some(record),
            _ => None,
        })
    }
}

pub(super) struct Buffer {
    capacity: usize,
    /// Sequence number of the last write accepted.
    last_seq: u64,
    audits: VecDeque<(u64, AuditEntry)>,
    /// Queued session ids in line order; exactly the keys of `sessions`.
    session_order: VecDeque<(u64, String)>,
    sessions: HashMap<String, SessionRecord>,
    /// Queued revoked users in line order; exactly the keys of `revocations`.
    revocation_order: VecDeque<(u64, String)>,
    revocations: HashMap<String, Revocation>,
}

impl Buffer {
    /// A buffer of at most `capacity` writes (at least 1).
    pub fn new(capacity: usize) -> Self {
        Self {
            capacity: capacity.max(1),
            last_seq: 0,
            audits: VecDeque::new(),
            session_order: VecDeque::new(),
            sessions: HashMap::new(),
            revocation_order: VecDeque::new(),
            revocations: HashMap::new(),
        }
    }

    pub fn len(&self) -> usize {
        self.audits.len() + self.session_order.len() + self.revocation_order.len()
    }

    /// Sequence number of the last write accepted (0: none yet).
    pub fn last_seq(&self) -> u64 {
        self.last_seq
    }

    /// Queues a session upsert; returns what had to be dropped, if anything.
    pub fn push_session(&mut self, id: &str, record: SessionRecord) -> Option<Kind> {
        if let Some(queued) = self.sessions.get_mut(id) {
            *queued = record;
            return None;
        }
        let dropped = self.make_room(Kind::Session);
        let seq = self.next_seq();
        self.session_order.push_back((seq, id.to_string()));
        self.sessions.insert(id.to_string(), record);
        dropped
    }

    /// Queues an audit row; returns what had to be dropped, if anything
    /// (possibly this row itself).
    pub fn push_audit(&mut self, entry: AuditEntry) -> Option<Kind> {
        let dropped = self.make_room(Kind::Audit);
        if dropped == Some(Kind::Audit) && self.len() >= self.capacity {
            // No queued audit row could go: the new one is the one dropped.
            return dropped;
        }
        let seq = self.next_seq();
        self.audits.push_back((seq, entry));
        dropped
    }

    /// Queues a revocation (the larger `before_secs` wins); returns what had
    /// to be dropped, if anything.
    pub fn push_revocation(&mut self, revocation: Revocation) -> Option<Kind> {
        if let Some(queued) = self.revocations.get_mut(&revocation.user) {
            if revocation.before_secs > queued.before_secs {
                *queued = revocation;
            }
            return None;
        }
        let dropped = self.make_room(Kind::Revocation);
        let seq = self.next_seq();
        self.revocation_order
            .push_back((seq, revocation.user.clone()));
        self.revocations.insert(revocation.user.clone(), revocation);
        dropped
    }

    /// Takes up to `max` writes, oldest first across kinds.
    pub fn take(&mut self, max: usize) -> Batch {
        let mut batch = Batch {
            max_seq: 0,
            rows: Vec::with_capacity(max.min(self.len())),
        };
        while batch.rows.len() < max {
            let audit = self.audits.front().map(|(seq, _)| *seq);
            let session = self.session_order.front().map(|(seq, _)| *seq);
            let revocation = self.revocation_order.front().map(|(seq, _)| *seq);
            let Some(oldest) = [audit, session, revocation].into_iter().flatten().min() else {
                break;
            };
            let row = if audit == Some(oldest) {
                self.audits.pop_front().map(|(_, entry)| Row::Audit(entry))
            } else if session == Some(oldest) {
                self.session_order.pop_front().and_then(|(_, id)| {
                    let record = self.sessions.remove(&id)?;
                    Some(Row::Session(id, record))
                })
            } else {
                self.revocation_order
                    .pop_front()
                    .and_then(|(_, user)| self.revocations.remove(&user).map(Row::Revocation))
            };
            batch.max_seq = oldest;
            batch.rows.extend(row);
        }
        batch
    }

    /// The queued upsert of session `id`, if any.
    pub fn session(&self, id: &str) -> Option<&SessionRecord> {
        self.sessions.get(id)
    }

    /// The queued revocations.
    pub fn revocations(&self) -> impl Iterator<Item = &Revocation> {
        self.revocations.values()
    }

    fn next_seq(&mut self) -> u64 {
        self.last_seq += 1;
        self.last_seq
    }

    /// Drops one queued write if the buffer is full (see the module docs for
    /// the order). For an incoming audit row with no audit row queued, nothing
    /// is removed and `Some(Kind::Audit)` means "drop the incoming row".
    fn make_room(&mut self, incoming: Kind) -> Option<Kind> {
        if self.len() < self.capacity {
            return None;
        }
        if self.audits.pop_front().is_some() {
            return Some(Kind::Audit);
        }
        if incoming == Kind::Audit {
            return Some(Kind::Audit);
        }
        if let Some((_, id)) = self.session_order.pop_front() {
            self.sessions.remove(&id);
            return Some(Kind::Session);
        }
        if let Some((_, user)) = self.revocation_order.pop_front() {
            self.revocations.remove(&user);
            return Some(Kind::Revocation);
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::AuditEvent;

    fn session(user: &str, updated_ms: u64) -> SessionRecord {
        SessionRecord {
            user: user.into(),
            created_ms: 1,
            updated_ms,
            node: None,
            closed_ms: None,
            subs: vec![],
            grants: vec![],
        }
    }

    fn audit(client: &str) -> AuditEntry {
        AuditEntry {
            client: client.into(),
            session: "s".into(),
            user: "u".into(),
            node: "n".into(),
            event: AuditEvent::Connect,
            code: None,
            at_ms: 1,
        }
    }

    fn revocation(user: &str, before_secs: u64) -> Revocation {
        Revocation {
            user: user.into(),
            before_secs,
            created_ms: 1,
        }
    }

    fn clients(batch: &Batch) -> Vec<String> {
        batch
            .rows
            .iter()
            .filter_map(|row| match row {
                Row::Audit(entry) => Some(entry.client.clone()),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn full_buffer_drops_oldest_audit_rows_first() {
        let mut buffer = Buffer::new(3);
        assert_eq!(buffer.push_audit(audit("a1")), None);
        assert_eq!(buffer.push_session("s1", session("u", 1)), None);
        assert_eq!(buffer.push_audit(audit("a2")), None);
        // Full: a session upsert pushes out the oldest audit row...
        assert_eq!(
            buffer.push_session("s2", session("u", 2)),
            Some(Kind::Audit)
        );
        // ...and an audit row pushes out the next oldest one.
        assert_eq!(buffer.push_audit(audit("a3")), Some(Kind::Audit));
        assert_eq!(buffer.len(), 3);
        let batch = buffer.take(10);
        assert_eq!(clients(&batch), vec!["a3"]);
        assert_eq!(batch.count(Kind::Session), 2);
        assert_eq!(buffer.len(), 0);
    }

    #[test]
    fn audit_row_is_dropped_rather_than_a_session() {
        let mut buffer = Buffer::new(2);
        buffer.push_session("s1", session("u", 1));
        buffer.push_revocation(revocation("u", 5));
        assert_eq!(buffer.push_audit(audit("a1")), Some(Kind::Audit));
        assert_eq!(buffer.len(), 2);
        assert!(buffer.session("s1").is_some());
        // With only sessions and revocations queued, the oldest session goes.
        assert_eq!(
            buffer.push_session("s2", session("u", 2)),
            Some(Kind::Session)
        );
        assert!(buffer.session("s1").is_none());
        assert!(buffer.session("s2").is_some());
        assert_eq!(buffer.revocations().count(), 1);
    }

    #[test]
    fn revocations_go_last() {
        let mut buffer = Buffer::new(2);
        buffer.push_revocation(revocation("a", 1));
        buffer.push_revocation(revocation("b", 1));
        assert_eq!(
            buffer.push_revocation(revocation("c", 1)),
            Some(Kind::Revocation)
        );
        let users: Vec<_> = buffer.revocations().map(|r| r.user.clone()).collect();
        assert!(users.contains(&"b".to_string()) && users.contains(&"c".to_string()));
    }

    #[test]
    fn upserts_coalesce_on_arrival() {
        let mut buffer = Buffer::new(10);
        buffer.push_session("s1", session("u", 1));
        buffer.push_audit(audit("a1"));
        buffer.push_session("s1", session("u", 2));
        buffer.push_session("s1", session("u", 3));
        buffer.push_revocation(revocation("u", 10));
        buffer.push_revocation(revocation("u", 7));
        assert_eq!(buffer.len(), 3);
        let batch = buffer.take(10);
        // The session kept its place in line (first), with the last record.
        assert_eq!(batch.rows[0], Row::Session("s1".into(), session("u", 3)));
        assert_eq!(batch.rows[2], Row::Revocation(revocation("u", 10)));
        assert_eq!(batch.max_seq, 3);
    }

    #[test]
    fn batches_are_taken_oldest_first_and_bounded() {
        let mut buffer = Buffer::new(100);
        for i in 0..5 {
            buffer.push_audit(audit(&format!("a{i}")));
            buffer.push_session(&format!("s{i}"), session("u", i));
        }
        let first = buffer.take(4);
        assert_eq!(first.rows.len(), 4);
        assert_eq!(first.max_seq, 4);
        assert_eq!(clients(&first), vec!["a0", "a1"]);
        let rest = buffer.take(100);
        assert_eq!(rest.rows.len(), 6);
        assert_eq!(rest.max_seq, buffer.last_seq());
        assert_eq!(buffer.take(10).rows.len(), 0);
    }
}
