//! One channel's sequencing state and hot history window.
//!
//! Pure data, no I/O: the shard actor owns a map of these. Offsets are
//! consecutive within an epoch; the epoch is chosen when the state is created
//! (the history before it is gone), so a client holding a position from
//! another epoch learns it cannot be recovered.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use bytes::Bytes;
use rt_proto::ErrorCode;
use rt_proto::internal::{
    HistoryReply, PubInfo, Publication, PublishAck, RecoverReply, StreamPosition, WireError,
};

/// Keys remembered per channel for idempotent publish; the oldest go first.
const MAX_IDEMPOTENCY_KEYS: usize = 10_000;

struct StoredPub {
    offset: u64,
    ts: u64,
    data: Bytes,
    info: Option<PubInfo>,
    stored_at: Instant,
}

/// History limits of the channel's namespace.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub size: usize,
    pub ttl: Duration,
    pub idempotency_window: Duration,
}

pub struct ChannelState {
    name: String,
    epoch: String,
    offset: u64,
    window: VecDeque<StoredPub>,
    idempotency: HashMap<String, (u64, Instant)>,
    idempotency_order: VecDeque<(String, Instant)>,
    last_activity: Instant,
}

/// The outcome of sequencing one publication.
pub struct Sequenced {
    pub publication: Publication,
    /// False when an idempotency key matched an earlier publish: nothing new to deliver.
    pub fresh: bool,
}

impl ChannelState {
    pub fn new(name: String, now: Instant) -> Self {
        Self {
            name,
            epoch: new_epoch(),
            offset: 0,
            window: VecDeque::new(),
            idempotency: HashMap::new(),
            idempotency_order: VecDeque::new(),
            last_activity: now,
        }
    }

    pub fn epoch(&self) -> &str {
        &self.epoch
    }

    pub fn offset(&self) -> u64 {
        self.offset
    }

    pub fn last_activity(&self) -> Instant {
        self.last_activity
    }

    pub fn is_history_empty(&self) -> bool {
        self.window.is_empty()
    }

    /// Assigns the next offset and stores the publication in the window.
    pub fn sequence(
        &mut self,
        data: Bytes,
        info: Option<PubInfo>,
        idempotency_key: Option<String>,
        ts: u64,
        now: Instant,
        limits: Limits,
    ) -> Sequenced {
        self.last_activity = now;
        self.expire(now, limits);
        if let Some(key) = &idempotency_key
            && let Some(&(offset, _)) = self.idempotency.get(key)
        {
            return Sequenced {
                publication: self.ack_only(offset, ts),
                fresh: false,
            };
        }
        self.offset += 1;
        let publication = Publication {
            channel: self.name.clone(),
            offset: self.offset,
            epoch: self.epoch.clone(),
            ts,
            data,
            info,
        };
        if limits.size > 0 && !limits.ttl.is_zero() {
            self.window.push_back(StoredPub {
                offset: self.offset,
                ts,
                data: publication.data.clone(),
                info: publication.info.clone(),
                stored_at: now,
            });
            while self.window.len() > limits.size {
                self.window.pop_front();
            }
        }
        if let Some(key) = idempotency_key {
            self.remember_key(key, now);
        }
        Sequenced {
            publication,
            fresh: true,
        }
    }

    /// The ack for a publication (also for a repeated idempotency key).
    pub fn ack(publication: &Publication) -> PublishAck {
        PublishAck {
            offset: publication.offset,
            epoch: publication.epoch.clone(),
        }
    }

    /// Position, and the publications after `since` when they are all still here.
    pub fn recover(
        &mut self,
        since: Option<&StreamPosition>,
        now: Instant,
        limits: Limits,
    ) -> RecoverReply {
        self.expire(now, limits);
        let mut reply = RecoverReply {
            offset: self.offset,
            epoch: self.epoch.clone(),
            recovered: false,
            pubs: Vec::new(),
        };
        if let Some(since) = since
            && self.servable(since)
        {
            reply.recovered = true;
            reply.pubs = self.after(since.offset, usize::MAX);
        }
        reply
    }

    /// A history query; `limit` is already capped by the caller.
    pub fn history(
        &mut self,
        limit: usize,
        since: Option<&StreamPosition>,
        reverse: bool,
        now: Instant,
        limits: Limits,
    ) -> Result<HistoryReply, WireError> {
        self.expire(now, limits);
        let pubs = match since {
            Some(since) => {
                if !self.servable(since) {
                    return Err(WireError::new(
                        ErrorCode::UNRECOVERABLE_POSITION,
                        "position is in another epoch, outside the history window or ahead of the stream",
                    ));
                }
                self.after(since.offset, limit)
            }
            None => {
                let skip = self.window.len().saturating_sub(limit);
                let mut pubs: Vec<Publication> = self
                    .window
                    .iter()
                    .skip(skip)
                    .map(|p| self.publication(p))
                    .collect();
                if reverse {
                    pubs.reverse();
                }
                pubs
            }
        };
        Ok(HistoryReply {
            pubs,
            offset: self.offset,
            epoch: self.epoch.clone(),
        })
    }

    /// Drops publications past their TTL and idempotency keys past their window.
    pub fn expire(&mut self, now: Instant, limits: Limits) {
        while let Some(front) = self.window.front() {
            if now.duration_since(front.stored_at) >= limits.ttl {
                self.window.pop_front();
            } else {
                break;
            }
        }
        while let Some((key, at)) = self.idempotency_order.front() {
            if now.duration_since(*at) >= limits.idempotency_window {
                self.idempotency.remove(key);
                self.idempotency_order.pop_front();
            } else {
                break;
            }
        }
    }

    /// Whether every publication after `since` can be served.
    fn servable(&self, since: &StreamPosition) -> bool {
        if since.epoch != self.epoch || since.offset > self.offset {
            return false;
        }
        if since.offset == self.offset {
            return true;
        }
        self.window
            .front()
            .is_some_and(|first| first.offset <= since.offset + 1)
    }

    fn after(&self, offset: u64, limit: usize) -> Vec<Publication> {
        let start = self.window.partition_point(|p| p.offset <= offset);
        self.window
            .iter()
            .skip(start)
            .take(limit)
            .map(|p| self.publication(p))
            .collect()
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

    fn ack_only(&self, offset: u64, ts: u64) -> Publication {
        Publication {
            channel: self.name.clone(),
            offset,
            epoch: self.epoch.clone(),
            ts,
            data: Bytes::new(),
            info: None,
        }
    }

    fn remember_key(&mut self, key: String, now: Instant) {
        if self.idempotency_order.len() >= MAX_IDEMPOTENCY_KEYS
            && let Some((oldest, _)) = self.idempotency_order.pop_front()
        {
            self.idempotency.remove(&oldest);
        }
        self.idempotency.insert(key.clone(), (self.offset, now));
        self.idempotency_order.push_back((key, now));
    }
}

fn new_epoch() -> String {
    format!("{:016x}", fastrand::u64(..))
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: Limits = Limits {
        size: 3,
        ttl: Duration::from_secs(60),
        idempotency_window: Duration::from_secs(300),
    };

    fn publish(state: &mut ChannelState, n: u8, now: Instant) -> Publication {
        state
            .sequence(Bytes::from(vec![n]), None, None, 0, now, LIMITS)
            .publication
    }

    fn pos(state: &ChannelState, offset: u64) -> StreamPosition {
        StreamPosition {
            offset,
            epoch: state.epoch().to_owned(),
        }
    }

    #[test]
    fn offsets_are_consecutive_from_one() {
        let now = Instant::now();
        let mut state = ChannelState::new("a".into(), now);
        assert_eq!(state.offset(), 0);
        let offsets: Vec<u64> = (0..5).map(|n| publish(&mut state, n, now).offset).collect();
        assert_eq!(offsets, vec![1, 2, 3, 4, 5]);
    }

    #[test]
    fn recovery_follows_the_window() {
        let now = Instant::now();
        let mut state = ChannelState::new("a".into(), now);
        for n in 0..5 {
            publish(&mut state, n, now);
        }
        // Window holds 3, 4, 5.
        let r = state.recover(Some(&pos(&state, 2)), now, LIMITS);
        assert!(r.recovered);
        assert_eq!(
            r.pubs.iter().map(|p| p.offset).collect::<Vec<_>>(),
            vec![3, 4, 5]
        );
        let r = state.recover(Some(&pos(&state, 5)), now, LIMITS);
        assert!(r.recovered && r.pubs.is_empty());
        assert!(
            !state.recover(Some(&pos(&state, 1)), now, LIMITS).recovered,
            "outside window"
        );
        assert!(
            !state.recover(Some(&pos(&state, 6)), now, LIMITS).recovered,
            "ahead"
        );
        let other = StreamPosition {
            offset: 4,
            epoch: "other".into(),
        };
        let r = state.recover(Some(&other), now, LIMITS);
        assert!(!r.recovered && r.pubs.is_empty());
        assert_eq!(r.offset, 5);
        assert!(!state.recover(None, now, LIMITS).recovered);
    }

    #[test]
    fn ttl_expires_history() {
        let now = Instant::now();
        let mut state = ChannelState::new("a".into(), now);
        publish(&mut state, 1, now);
        let later = now + Duration::from_secs(61);
        let r = state.recover(Some(&pos(&state, 0)), later, LIMITS);
        assert!(!r.recovered, "the only publication expired");
        assert!(
            state
                .recover(Some(&pos(&state, 1)), later, LIMITS)
                .recovered
        );
    }

    #[test]
    fn history_queries() {
        let now = Instant::now();
        let mut state = ChannelState::new("a".into(), now);
        for n in 0..4 {
            publish(&mut state, n, now);
        }
        let offsets = |r: HistoryReply| r.pubs.iter().map(|p| p.offset).collect::<Vec<_>>();
        let h = state.history(2, None, false, now, LIMITS).expect("history");
        assert_eq!(offsets(h), vec![3, 4]);
        let h = state.history(10, None, true, now, LIMITS).expect("history");
        assert_eq!(offsets(h), vec![4, 3, 2]);
        let h = state.history(0, None, false, now, LIMITS).expect("history");
        assert_eq!((h.offset, h.pubs.len()), (4, 0));
        let h = state
            .history(1, Some(&pos(&state, 2)), false, now, LIMITS)
            .expect("history");
        assert_eq!(offsets(h), vec![3]);
        let err = state
            .history(10, Some(&pos(&state, 0)), false, now, LIMITS)
            .expect_err("outside");
        assert_eq!(err.code, ErrorCode::UNRECOVERABLE_POSITION);
        let err = state
            .history(10, Some(&pos(&state, 9)), false, now, LIMITS)
            .expect_err("ahead");
        assert_eq!(err.code, ErrorCode::UNRECOVERABLE_POSITION);
    }

    #[test]
    fn idempotency_key_returns_first_position() {
        let now = Instant::now();
        let mut state = ChannelState::new("a".into(), now);
        let first = state.sequence(
            Bytes::from_static(b"\x01"),
            None,
            Some("k".into()),
            0,
            now,
            LIMITS,
        );
        let again = state.sequence(
            Bytes::from_static(b"\x02"),
            None,
            Some("k".into()),
            0,
            now,
            LIMITS,
        );
        assert!(first.fresh && !again.fresh);
        assert_eq!(again.publication.offset, first.publication.offset);
        assert_eq!(state.offset(), 1);
        let later = now + Duration::from_secs(301);
        let third = state.sequence(
            Bytes::from_static(b"\x03"),
            None,
            Some("k".into()),
            0,
            later,
            LIMITS,
        );
        assert!(third.fresh, "the window has passed");
        assert_eq!(third.publication.offset, 2);
    }

    #[test]
    fn zero_size_namespace_keeps_no_history() {
        let now = Instant::now();
        let limits = Limits { size: 0, ..LIMITS };
        let mut state = ChannelState::new("a".into(), now);
        state.sequence(Bytes::from_static(b"\x01"), None, None, 0, now, limits);
        assert!(state.is_history_empty());
        assert!(!state.recover(Some(&pos(&state, 0)), now, limits).recovered);
    }
}
