//! One channel's committed position and hot history window.
//!
//! Pure data, no I/O: a shard owns one of these per channel it has in memory.
//! It holds what has been *committed* (stored in the record, when there is
//! one, and delivered): the epoch, the last offset, the newest publications
//! (the hot window) and the idempotency keys of the last minutes.
//!
//! The window sits in front of the JetStream record. Offsets at or below
//! [`ChannelState::floor`] may be in the record without being in memory (a
//! channel loaded after a restart, or a window smaller than the namespace's
//! history); a read that needs them is answered in two steps: the shard reads
//! the record ([`Read::Record`]), then completes the answer here with
//! [`ChannelState::pubs_after`] or [`ChannelState::newest`], which check that
//! the result has no hole.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use bytes::Bytes;
use rt_proto::ErrorCode;
use rt_proto::internal::{
    HistoryReply, PubInfo, Publication, RecoverReply, StreamPosition, WireError,
};

/// Keys remembered per channel for idempotent publish; the oldest go first.
pub const MAX_IDEMPOTENCY_KEYS: usize = 10_000;

/// A publication in the hot window.
#[derive(Debug, Clone)]
pub struct StoredPub {
    pub offset: u64,
    /// Its stream sequence in the record (0 without one).
    pub seq: u64,
    pub ts: u64,
    pub data: Bytes,
    pub info: Option<PubInfo>,
    pub stored_at: Instant,
}

/// History limits of the channel's namespace.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Publications kept (the record keeps as many).
    pub size: usize,
    pub ttl: Duration,
    pub idempotency_window: Duration,
    /// Publications kept in memory (at most `size`).
    pub memory: usize,
}

/// Where the publications a read needs are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Read {
    /// All in memory (or nothing to read).
    Memory,
    /// Offsets `from..=to` must be read from the record first.
    Record { from: u64, to: u64 },
    /// Cannot be served: another epoch, ahead of the stream, or gone.
    Unservable,
}

pub struct ChannelState {
    name: String,
    epoch: String,
    offset: u64,
    window: VecDeque<StoredPub>,
    floor: u64,
    idempotency: HashMap<String, (u64, Instant)>,
    idempotency_order: VecDeque<(String, Instant)>,
    last_activity: Instant,
}

impl ChannelState {
    /// A channel with no history at all: a new epoch, offset 0.
    pub fn new(name: String, now: Instant) -> Self {
        Self::restore(name, new_epoch(), 0, 0, now)
    }

    /// A channel whose position comes from the record: publications at or
    /// below `floor` may be read from it.
    pub fn restore(name: String, epoch: String, offset: u64, floor: u64, now: Instant) -> Self {
        Self {
            name,
            epoch,
            offset,
            window: VecDeque::new(),
            floor: floor.min(offset),
            idempotency: HashMap::new(),
            idempotency_order: VecDeque::new(),
            last_activity: now,
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn epoch(&self) -> &str {
        &self.epoch
    }

    /// The last committed offset: what clients are told.
    pub fn offset(&self) -> u64 {
        self.offset
    }

    pub fn floor(&self) -> u64 {
        self.floor
    }

    pub fn last_activity(&self) -> Instant {
        self.last_activity
    }

    pub fn touch(&mut self, now: Instant) {
        self.last_activity = now;
    }

    pub fn is_history_empty(&self) -> bool {
        self.window.is_empty()
    }

    /// The offset an idempotency key was committed at, while it is remembered.
    pub fn key(&self, key: &str) -> Option<u64> {
        self.idempotency.get(key).map(|&(offset, _)| offset)
    }

    /// Builds the next publication (committed offset + `ahead` + 1): the
    /// shard stores it, then [`ChannelState::commit`]s it.
    pub fn next_publication(
        &self,
        ahead: u64,
        data: Bytes,
        info: Option<PubInfo>,
        ts: u64,
    ) -> Publication {
        Publication {
            channel: self.name.clone(),
            offset: self.offset + ahead + 1,
            epoch: self.epoch.clone(),
            ts,
            data,
            info,
        }
    }

    /// Records a stored publication as the channel's newest (its offset must
    /// be the next one), in the window and with its idempotency key.
    pub fn commit(
        &mut self,
        publication: &Publication,
        seq: u64,
        key: Option<String>,
        now: Instant,
        limits: Limits,
    ) {
        self.last_activity = now;
        self.offset = publication.offset;
        self.push_window(
            StoredPub {
                offset: publication.offset,
                seq,
                ts: publication.ts,
                data: publication.data.clone(),
                info: publication.info.clone(),
                stored_at: now,
            },
            limits,
        );
        if let Some(key) = key {
            self.remember_key(key, publication.offset, now, limits);
        }
    }

    /// Fills the window and the keys from the record at load time (oldest
    /// first, consecutive, ending at the channel's offset).
    pub fn warm(
        &mut self,
        stored: StoredPub,
        key: Option<String>,
        stored_at_key: Instant,
        limits: Limits,
    ) {
        let offset = stored.offset;
        self.push_window(stored, limits);
        if let Some(key) = key {
            self.remember_key(key, offset, stored_at_key, limits);
        }
    }

    /// Remembers an idempotency key read from the record at load time.
    pub fn warm_key(&mut self, key: String, offset: u64, at: Instant, limits: Limits) {
        self.remember_key(key, offset, at, limits);
    }

    fn push_window(&mut self, stored: StoredPub, limits: Limits) {
        if limits.size == 0 || limits.ttl.is_zero() {
            return;
        }
        self.window.push_back(stored);
        // Past the namespace's size the record drops them too.
        while self.window.len() > limits.size {
            self.window.pop_front();
        }
        // Past the memory bound they stay in the record only.
        while self.window.len() > limits.memory.clamp(1, limits.size) {
            if let Some(front) = self.window.pop_front() {
                self.floor = self.floor.max(front.offset);
            }
        }
    }

    /// Drops publications past their TTL and idempotency keys past their window.
    pub fn expire(&mut self, now: Instant, limits: Limits) {
        while let Some(front) = self.window.front() {
            if now.saturating_duration_since(front.stored_at) >= limits.ttl {
                self.window.pop_front();
            } else {
                break;
            }
        }
        while let Some((key, at)) = self.idempotency_order.front() {
            if now.saturating_duration_since(*at) >= limits.idempotency_window {
                if self.idempotency.get(key).is_some_and(|(_, t)| t == at) {
                    self.idempotency.remove(key);
                }
                self.idempotency_order.pop_front();
            } else {
                break;
            }
        }
    }

    /// Where the publications after `since` are.
    pub fn plan_after(&self, since: &StreamPosition) -> Read {
        if since.epoch != self.epoch || since.offset > self.offset {
            return Read::Unservable;
        }
        if since.offset == self.offset {
            return Read::Memory;
        }
        let first = self.window.front().map_or(self.offset + 1, |p| p.offset);
        if first <= since.offset + 1 {
            Read::Memory
        } else if first - 1 <= self.floor {
            Read::Record {
                from: since.offset + 1,
                to: first - 1,
            }
        } else {
            Read::Unservable
        }
    }

    /// Where the newest `limit` publications are.
    pub fn plan_newest(&self, limit: usize) -> Read {
        let first = self.window.front().map_or(self.offset + 1, |p| p.offset);
        if self.window.len() >= limit || first <= 1 || first - 1 > self.floor {
            return Read::Memory;
        }
        let missing = (limit - self.window.len()) as u64;
        Read::Record {
            from: first.saturating_sub(missing).max(1),
            to: first - 1,
        }
    }

    /// Every publication after `since`, oldest first, from `record` (what
    /// was read for [`Read::Record`], possibly nothing) then memory; `None`
    /// when they are not all there (another epoch, a hole, gone).
    pub fn pubs_after(
        &self,
        since: &StreamPosition,
        record: &[Publication],
        limit: usize,
    ) -> Option<Vec<Publication>> {
        if since.epoch != self.epoch || since.offset > self.offset {
            return None;
        }
        let mut pubs = Vec::new();
        let mut next = since.offset + 1;
        for p in record {
            if p.epoch != self.epoch || p.offset < next {
                continue;
            }
            if p.offset != next {
                return None;
            }
            if pubs.len() >= limit {
                return Some(pubs);
            }
            pubs.push(p.clone());
            next += 1;
        }
        let start = self.window.partition_point(|p| p.offset < next);
        if next <= self.offset && self.window.get(start).is_none_or(|p| p.offset != next) {
            return None;
        }
        pubs.extend(
            self.window
                .iter()
                .skip(start)
                .take(limit.saturating_sub(pubs.len()))
                .map(|p| self.publication(p)),
        );
        Some(pubs)
    }

    /// The newest `limit` publications that form an unbroken run ending at
    /// the channel's offset, oldest first, from `record` and memory.
    pub fn newest(&self, limit: usize, record: &[Publication]) -> Vec<Publication> {
        let mut pubs: Vec<Publication> = self.window.iter().map(|p| self.publication(p)).collect();
        let mut first = pubs.first().map_or(self.offset + 1, |p| p.offset);
        let mut older: Vec<Publication> = Vec::new();
        for p in record.iter().rev() {
            if p.epoch == self.epoch && p.offset + 1 == first {
                older.push(p.clone());
                first = p.offset;
            }
        }
        older.reverse();
        older.append(&mut pubs);
        let skip = older.len().saturating_sub(limit);
        older.split_off(skip)
    }

    /// The answer to a subscribe-time position query, given what `pubs_after` found.
    pub fn recover_reply(&self, pubs: Option<Vec<Publication>>) -> RecoverReply {
        RecoverReply {
            offset: self.offset,
            epoch: self.epoch.clone(),
            recovered: pubs.is_some(),
            pubs: pubs.unwrap_or_default(),
        }
    }

    /// The answer to a history query, given the publications found for it.
    pub fn history_reply(&self, pubs: Vec<Publication>) -> HistoryReply {
        HistoryReply {
            pubs,
            offset: self.offset,
            epoch: self.epoch.clone(),
        }
    }

    fn publication(&self, stored: &StoredPub) -> Publication {
        Publication {
            channel: self.name.clone(),
            offset: stored.offset,
            epoch: self.epoch.clone(),
            ts: stored.ts,
            data: stored.data.clone(),
            info: stored.info.clone(),
        }
    }

    fn remember_key(&mut self, key: String, offset: u64, at: Instant, limits: Limits) {
        if limits.idempotency_window.is_zero() {
            return;
        }
        if self.idempotency_order.len() >= MAX_IDEMPOTENCY_KEYS
            && let Some((oldest, oldest_at)) = self.idempotency_order.pop_front()
            && self
                .idempotency
                .get(&oldest)
                .is_some_and(|(_, t)| *t == oldest_at)
        {
            self.idempotency.remove(&oldest);
        }
        self.idempotency.insert(key.clone(), (offset, at));
        self.idempotency_order.push_back((key, at));
    }
}

/// The error of a history query whose `since` cannot be served.
pub fn unservable() -> WireError {
    WireError::new(
        ErrorCode::UNRECOVERABLE_POSITION,
        "position is in another epoch, outside the history window or ahead of the stream",
    )
}

/// A fresh epoch: 64 random bits in hex.
pub fn new_epoch() -> String {
    format!("{:016x}", fastrand::u64(..))
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: Limits = Limits {
        size: 3,
        ttl: Duration::from_secs(60),
        idempotency_window: Duration::from_secs(300),
        memory: 3,
    };

    fn publish(state: &mut ChannelState, n: u8, now: Instant) -> Publication {
        publish_with(state, n, None, now, LIMITS)
    }

    fn publish_with(
        state: &mut ChannelState,
        n: u8,
        key: Option<&str>,
        now: Instant,
        limits: Limits,
    ) -> Publication {
        let p = state.next_publication(0, Bytes::from(vec![n]), None, 0);
        state.commit(&p, 0, key.map(str::to_owned), now, limits);
        p
    }

    fn pos(state: &ChannelState, offset: u64) -> StreamPosition {
        StreamPosition {
            offset,
            epoch: state.epoch().to_owned(),
        }
    }

    fn offsets(pubs: &[Publication]) -> Vec<u64> {
        pubs.iter().map(|p| p.offset).collect()
    }

    fn record(state: &ChannelState, range: std::ops::RangeInclusive<u64>) -> Vec<Publication> {
        range
            .map(|offset| Publication {
                channel: state.name().to_owned(),
                offset,
                epoch: state.epoch().to_owned(),
                ts: 0,
                data: Bytes::new(),
                info: None,
            })
            .collect()
    }

    #[test]
    fn offsets_are_consecutive_from_one() {
        let now = Instant::now();
        let mut state = ChannelState::new("a".into(), now);
        assert_eq!(state.offset(), 0);
        let offsets: Vec<u64> = (0..5).map(|n| publish(&mut state, n, now).offset).collect();
        assert_eq!(offsets, vec![1, 2, 3, 4, 5]);
        let ahead = state.next_publication(2, Bytes::new(), None, 0);
        assert_eq!(
            ahead.offset, 8,
            "offsets are assigned past the writes in flight"
        );
    }

    #[test]
    fn recovery_follows_the_window() {
        let now = Instant::now();
        let mut state = ChannelState::new("a".into(), now);
        for n in 0..5 {
            publish(&mut state, n, now);
        }
        // Window holds 3, 4, 5; nothing below it is in a record (floor 0 < 2).
        assert_eq!(state.plan_after(&pos(&state, 2)), Read::Memory);
        let pubs = state.pubs_after(&pos(&state, 2), &[], usize::MAX);
        assert_eq!(offsets(&pubs.expect("recovered")), vec![3, 4, 5]);
        assert_eq!(
            state.pubs_after(&pos(&state, 5), &[], usize::MAX),
            Some(vec![])
        );
        assert_eq!(state.plan_after(&pos(&state, 1)), Read::Unservable);
        assert_eq!(state.pubs_after(&pos(&state, 1), &[], usize::MAX), None);
        assert_eq!(state.plan_after(&pos(&state, 6)), Read::Unservable, "ahead");
        let other = StreamPosition {
            offset: 4,
            epoch: "other".into(),
        };
        assert_eq!(state.plan_after(&other), Read::Unservable);
        let reply = state.recover_reply(None);
        assert!(!reply.recovered && reply.pubs.is_empty() && reply.offset == 5);
    }

    #[test]
    fn below_the_floor_reads_the_record_and_checks_for_holes() {
        let now = Instant::now();
        // Loaded from a record whose last publication is 10; nothing in memory yet.
        let mut state = ChannelState::restore("a".into(), "e".into(), 10, 10, now);
        assert_eq!(state.plan_after(&pos(&state, 10)), Read::Memory);
        assert_eq!(
            state.plan_after(&pos(&state, 7)),
            Read::Record { from: 8, to: 10 }
        );
        let pubs = state.pubs_after(&pos(&state, 7), &record(&state, 5..=10), usize::MAX);
        assert_eq!(offsets(&pubs.expect("complete")), vec![8, 9, 10]);
        let mut holed = record(&state, 8..=10);
        holed.remove(1);
        assert_eq!(state.pubs_after(&pos(&state, 7), &holed, usize::MAX), None);
        assert_eq!(
            state.pubs_after(&pos(&state, 7), &record(&state, 9..=10), usize::MAX),
            None,
            "the record lost 8"
        );
        // New publications go to memory; the record still serves the older part.
        publish(&mut state, 11, now);
        assert_eq!(
            state.plan_after(&pos(&state, 7)),
            Read::Record { from: 8, to: 10 }
        );
        let pubs = state.pubs_after(&pos(&state, 7), &record(&state, 8..=10), 2);
        assert_eq!(offsets(&pubs.expect("complete")), vec![8, 9]);
        let pubs = state.pubs_after(&pos(&state, 7), &record(&state, 8..=10), usize::MAX);
        assert_eq!(offsets(&pubs.expect("complete")), vec![8, 9, 10, 11]);
        assert_eq!(
            state.plan_newest(3),
            Read::Record { from: 9, to: 10 },
            "two more from the record"
        );
        assert_eq!(
            offsets(&state.newest(3, &record(&state, 6..=10))),
            vec![9, 10, 11]
        );
        assert_eq!(
            offsets(&state.newest(3, &record(&state, 6..=9))),
            vec![11],
            "a run broken before the window ends at the window"
        );
    }

    #[test]
    fn a_small_memory_window_raises_the_floor() {
        let now = Instant::now();
        let limits = Limits {
            size: 10,
            memory: 2,
            ..LIMITS
        };
        let mut state = ChannelState::new("a".into(), now);
        for n in 0..5 {
            publish_with(&mut state, n, None, now, limits);
        }
        assert_eq!(state.floor(), 3);
        assert_eq!(
            state.plan_after(&pos(&state, 1)),
            Read::Record { from: 2, to: 3 }
        );
        assert_eq!(state.plan_after(&pos(&state, 3)), Read::Memory);
    }

    #[test]
    fn ttl_expires_history() {
        let now = Instant::now();
        let mut state = ChannelState::new("a".into(), now);
        publish(&mut state, 1, now);
        let later = now + Duration::from_secs(61);
        state.expire(later, LIMITS);
        assert_eq!(
            state.plan_after(&pos(&state, 0)),
            Read::Unservable,
            "the only publication expired"
        );
        assert_eq!(state.plan_after(&pos(&state, 1)), Read::Memory);
    }

    #[test]
    fn newest_without_a_record() {
        let now = Instant::now();
        let mut state = ChannelState::new("a".into(), now);
        for n in 0..4 {
            publish(&mut state, n, now);
        }
        assert_eq!(state.plan_newest(2), Read::Memory);
        assert_eq!(offsets(&state.newest(2, &[])), vec![3, 4]);
        assert_eq!(
            state.plan_newest(10),
            Read::Memory,
            "nothing older anywhere"
        );
        assert_eq!(offsets(&state.newest(10, &[])), vec![2, 3, 4]);
        assert!(state.newest(0, &[]).is_empty());
    }

    #[test]
    fn idempotency_keys_are_remembered_for_the_window() {
        let now = Instant::now();
        let mut state = ChannelState::new("a".into(), now);
        publish_with(&mut state, 1, Some("k"), now, LIMITS);
        assert_eq!(state.key("k"), Some(1));
        assert_eq!(state.key("other"), None);
        state.expire(now + Duration::from_secs(301), LIMITS);
        assert_eq!(state.key("k"), None, "the window has passed");
        // A key used again later points at its newest publication.
        publish_with(&mut state, 2, Some("k"), now, LIMITS);
        publish_with(
            &mut state,
            3,
            Some("k"),
            now + Duration::from_secs(200),
            LIMITS,
        );
        state.expire(now + Duration::from_secs(301), LIMITS);
        assert_eq!(state.key("k"), Some(3));
    }

    #[test]
    fn zero_size_namespace_keeps_no_history() {
        let now = Instant::now();
        let limits = Limits { size: 0, ..LIMITS };
        let mut state = ChannelState::new("a".into(), now);
        publish_with(&mut state, 1, None, now, limits);
        assert!(state.is_history_empty());
        assert_eq!(state.plan_after(&pos(&state, 0)), Read::Unservable);
    }
}
