//! The pure part of request/reply load: what a server message means for the calls in
//! flight ([`classify`]), the calls one connection is waiting on, matched by id
//! ([`Tracker`]), and the counts they add up to ([`CallStats`]). No sockets here, so every
//! rule is unit-tested.
//!
//! A call ends exactly once, with one [`Outcome`]: its final reply (`ok` or `error`), or
//! no reply within the client's timeout, or its connection gone. `rpc_part` pushes before
//! the final reply are counted, and the first one's arrival is timed; they do not end it.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use super::Live;
use crate::pacer::{LATE, Window};
use crate::stats::{Hist, Samples, SeqSamples, Tally};
use crate::wire::Incoming;

/// The error codes the report singles out (PROTOCOL.md §1).
pub const UNKNOWN: u32 = 104;
pub const BUSY: u32 = 113;
pub const TIMEOUT: u32 = 114;

/// A command written to the socket: which send of the schedule, when it was due, and when
/// it went out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sent {
    pub seq: u64,
    pub intended: Instant,
    pub written: Instant,
}

/// How a call ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// `{"id": N, "ok": ...}` (also a reply with neither `ok` nor `error`).
    Ok,
    /// `{"id": N, "error": {code, retry_after_ms?}}`.
    Error {
        code: u32,
        retry_after_ms: Option<u64>,
    },
    /// Nothing within the client's timeout (or before the run ended).
    NoReply,
    /// The connection closed or broke before the reply; or before the call could be sent.
    Lost,
}

/// What one message from the server is, for the calls in flight.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Received {
    /// A final reply to the call with this id.
    Reply { id: u32, outcome: Outcome },
    /// `{"push": "rpc_part", "id": N, ...}`: a partial result of a call still in flight.
    Part { id: u32 },
    /// A push that says something went wrong with the connection (`disconnect`,
    /// `unsubscribed`), with its code.
    Trouble { kind: String, code: u32 },
    /// Anything else (other pushes, replies with an id out of u32 range).
    Other,
}

/// Sorts one decoded message. `push` is looked at first: an `rpc_part` carries the id of
/// its call too, and must not be taken for the final reply.
pub fn classify(msg: &Incoming<'_>) -> Received {
    let id = msg.id.and_then(|id| u32::try_from(id).ok());
    match (msg.push.as_deref(), id) {
        (Some("rpc_part"), Some(id)) => Received::Part { id },
        (Some(kind @ ("disconnect" | "unsubscribed")), _) => Received::Trouble {
            kind: kind.to_string(),
            code: msg.code.unwrap_or(0),
        },
        (Some(_), _) | (None, None) => Received::Other,
        (None, Some(id)) => Received::Reply {
            id,
            outcome: match &msg.error {
                Some(e) => Outcome::Error {
                    code: e.code,
                    retry_after_ms: e.retry_after_ms,
                },
                None => Outcome::Ok,
            },
        },
    }
}

/// A short name for an error code, for reports.
pub fn code_name(code: u32) -> &'static str {
    match code {
        100 => "internal",
        101 => "unauthorized",
        102 => "unknown channel",
        103 => "permission denied",
        UNKNOWN => "unknown op or method",
        105 => "already subscribed",
        106 => "limit exceeded",
        107 => "bad request",
        108 => "not available",
        109 => "token expired",
        111 => "too many requests",
        112 => "unrecoverable position",
        BUSY => "busy",
        TIMEOUT => "timeout",
        _ => "unknown code",
    }
}

/// Counts for the calls of the measured window (by schedule sequence number, like fanout's
/// publications), plus connection-level errors of the whole run. Adds up over connections.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CallStats {
    /// Commands written, warmup included.
    pub sent: u64,
    /// Measured commands written.
    pub sent_measured: u64,
    /// Measured commands written more than [`LATE`] after their intended time.
    pub late_measured: u64,
    pub first_write: Option<Instant>,
    pub last_write: Option<Instant>,
    /// Outcomes of measured calls.
    pub ok: u64,
    /// Error replies by code.
    pub by_code: BTreeMap<u32, u64>,
    pub no_reply: u64,
    pub lost: u64,
    /// `rpc_part` pushes of measured calls that then ended (whatever the outcome), and how
    /// many calls had at least one.
    pub parts: u64,
    pub calls_with_parts: u64,
    /// Replies and parts for no call in flight (a reply after the client gave up; a
    /// server answering twice).
    pub unmatched: u64,
    /// Connection-level trouble, whole run: closes, undecodable frames, `disconnect` pushes.
    pub errors: Tally,
}

impl CallStats {
    pub fn on_write(&mut self, sent: &Sent, window: &Window) {
        self.sent += 1;
        if window.contains(sent.seq) {
            self.sent_measured += 1;
            if sent.written.saturating_duration_since(sent.intended) > LATE {
                self.late_measured += 1;
            }
            self.first_write.get_or_insert(sent.written);
            self.last_write = Some(sent.written);
        }
    }

    /// Counts a measured call's outcome.
    pub fn count(&mut self, outcome: Outcome) {
        match outcome {
            Outcome::Ok => self.ok += 1,
            Outcome::Error { code, .. } => *self.by_code.entry(code).or_default() += 1,
            Outcome::NoReply => self.no_reply += 1,
            Outcome::Lost => self.lost += 1,
        }
    }

    pub fn errors_with(&self, code: u32) -> u64 {
        self.by_code.get(&code).copied().unwrap_or(0)
    }

    pub fn error_replies(&self) -> u64 {
        self.by_code.values().sum()
    }

    /// Measured calls that ended, whatever the way.
    pub fn ended(&self) -> u64 {
        self.ok + self.error_replies() + self.no_reply + self.lost
    }

    /// Measured calls that did not end with `ok`.
    pub fn failed(&self) -> u64 {
        self.ended() - self.ok
    }

    /// Everything that went wrong, by kind: measured calls' failures (`error 113 (busy)`,
    /// `no reply within 12000 ms`, `connection lost`) and connection-level errors.
    pub fn kinds(&self, timeout: Duration) -> Tally {
        let mut kinds = self.errors.clone();
        for (code, n) in &self.by_code {
            kinds.add(format!("error {code} ({})", code_name(*code)), *n);
        }
        kinds.add(
            format!("no reply within {} ms", timeout.as_millis()),
            self.no_reply,
        );
        kinds.add("connection lost", self.lost);
        kinds.add("reply or part for no call in flight", self.unmatched);
        kinds
    }

    pub fn merge(&mut self, o: &CallStats) {
        self.sent += o.sent;
        self.sent_measured += o.sent_measured;
        self.late_measured += o.late_measured;
        self.first_write = match (self.first_write, o.first_write) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        self.last_write = self.last_write.max(o.last_write);
        self.ok += o.ok;
        for (code, n) in &o.by_code {
            *self.by_code.entry(*code).or_default() += n;
        }
        self.no_reply += o.no_reply;
        self.lost += o.lost;
        self.parts += o.parts;
        self.calls_with_parts += o.calls_with_parts;
        self.unmatched += o.unmatched;
        self.errors.merge(&o.errors);
    }
}

/// Raw µs samples of measured calls, buffered by a connection until handed to the
/// collector (see [`crate::stats`] on why not a histogram per connection).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CallSamples {
    /// Intended send time → `ok` reply.
    pub latency: Samples,
    /// Intended send time → error reply.
    pub error_latency: Samples,
    /// Intended send time → first `rpc_part`.
    pub first_part: Samples,
    /// `retry_after_ms` of 113 replies, as µs (so reports show them in ms like the rest).
    pub retry_after: Samples,
    /// Intended send time → written: the generator's own delay.
    pub lag: Samples,
    /// The `ok` latencies again, tagged with their sequence numbers; kept only when the
    /// scenario asks ([`Tracker::keeping_seq`]).
    pub ok_by_seq: SeqSamples,
}

impl CallSamples {
    pub fn len(&self) -> usize {
        self.latency.len()
            + self.error_latency.len()
            + self.first_part.len()
            + self.retry_after.len()
            + self.lag.len()
            + self.ok_by_seq.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn take(&mut self) -> CallSamples {
        std::mem::take(self)
    }

    pub fn record_into(&self, h: &mut CallHists) {
        self.latency.record_into(&mut h.latency);
        self.error_latency.record_into(&mut h.error_latency);
        self.first_part.record_into(&mut h.first_part);
        self.retry_after.record_into(&mut h.retry_after);
        self.lag.record_into(&mut h.lag);
    }
}

/// The histograms [`CallSamples`] end up in.
pub struct CallHists {
    pub latency: Hist,
    pub error_latency: Hist,
    pub first_part: Hist,
    pub retry_after: Hist,
    pub lag: Hist,
}

impl Default for CallHists {
    fn default() -> Self {
        use crate::stats::new_hist;
        CallHists {
            latency: new_hist(),
            error_latency: new_hist(),
            first_part: new_hist(),
            retry_after: new_hist(),
            lag: new_hist(),
        }
    }
}

struct Pending {
    sent: Sent,
    parts: u64,
}

/// The calls one connection is waiting on, by id, and what became of those that ended.
pub struct Tracker {
    window: Window,
    keep_seq: bool,
    pending: HashMap<u32, Pending>,
    pub stats: CallStats,
    pub samples: CallSamples,
}

impl Tracker {
    pub fn new(window: Window) -> Self {
        Tracker {
            window,
            keep_seq: false,
            pending: HashMap::new(),
            stats: CallStats::default(),
            samples: CallSamples::default(),
        }
    }

    /// Also keep each `ok` latency with its sequence number ([`CallSamples::ok_by_seq`]).
    pub fn keeping_seq(mut self, keep: bool) -> Self {
        self.keep_seq = keep;
        self
    }

    /// A command went out with this id: wait for its reply.
    pub fn sent(&mut self, id: u32, sent: Sent) {
        self.pending.insert(id, Pending { sent, parts: 0 });
    }

    #[cfg(test)]
    pub fn outstanding(&self) -> usize {
        self.pending.len()
    }

    /// One message from the server, received at `now`.
    pub fn on_message(&mut self, msg: &Incoming<'_>, now: Instant, live: &Live) {
        match classify(msg) {
            Received::Reply { id, outcome } => match self.pending.remove(&id) {
                Some(call) => self.end(call, outcome, now, live),
                None => self.stats.unmatched += 1,
            },
            Received::Part { id } => match self.pending.get_mut(&id) {
                Some(call) => {
                    if call.parts == 0 && self.window.contains(call.sent.seq) {
                        self.samples
                            .first_part
                            .push(micros(now, call.sent.intended));
                    }
                    call.parts += 1;
                    Live::add(&live.parts, 1);
                }
                None => self.stats.unmatched += 1,
            },
            Received::Trouble { kind, code } => {
                self.stats.errors.add(format!("{kind} push {code}"), 1);
                Live::add(&live.errors, 1);
            }
            Received::Other => {}
        }
    }

    /// Ends the calls written more than `timeout` before `now` as [`Outcome::NoReply`].
    pub fn expire(&mut self, now: Instant, timeout: Duration, live: &Live) -> usize {
        let expired: Vec<u32> = self
            .pending
            .iter()
            .filter(|(_, call)| now.saturating_duration_since(call.sent.written) > timeout)
            .map(|(id, _)| *id)
            .collect();
        for id in &expired {
            if let Some(call) = self.pending.remove(id) {
                self.end(call, Outcome::NoReply, now, live);
            }
        }
        expired.len()
    }

    /// Ends every call still in flight with `outcome` (the connection went away, or the
    /// run is over).
    pub fn abandon(&mut self, outcome: Outcome, live: &Live) {
        let now = Instant::now();
        for (_, call) in std::mem::take(&mut self.pending) {
            self.end(call, outcome, now, live);
        }
    }

    fn end(&mut self, call: Pending, outcome: Outcome, now: Instant, live: &Live) {
        Live::sub(&live.outstanding, 1);
        match outcome {
            Outcome::Ok => Live::add(&live.ok, 1),
            Outcome::Error { code: BUSY, .. } => Live::add(&live.busy, 1),
            _ => Live::add(&live.failed, 1),
        }
        if !self.window.contains(call.sent.seq) {
            return;
        }
        self.stats.count(outcome);
        self.stats.parts += call.parts;
        self.stats.calls_with_parts += u64::from(call.parts > 0);
        let us = micros(now, call.sent.intended);
        match outcome {
            Outcome::Ok => {
                self.samples.latency.push(us);
                if self.keep_seq {
                    self.samples.ok_by_seq.push(call.sent.seq, us);
                }
            }
            Outcome::Error {
                code,
                retry_after_ms,
            } => {
                self.samples.error_latency.push(us);
                if let (BUSY, Some(ms)) = (code, retry_after_ms) {
                    self.samples.retry_after.push(ms.saturating_mul(1000));
                }
            }
            Outcome::NoReply | Outcome::Lost => {}
        }
    }
}

fn micros(now: Instant, since: Instant) -> u64 {
    now.saturating_duration_since(since).as_micros() as u64
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::wire::{self, Encoding};

    fn msg(v: serde_json::Value) -> Vec<u8> {
        serde_json::to_vec(&v).unwrap()
    }

    fn with<R>(bytes: &[u8], f: impl FnOnce(&Incoming<'_>) -> R) -> R {
        f(&wire::decode(Encoding::Json, bytes).unwrap())
    }

    fn sent(seq: u64, t0: Instant, intended_ms: u64, written_ms: u64) -> Sent {
        Sent {
            seq,
            intended: t0 + Duration::from_millis(intended_ms),
            written: t0 + Duration::from_millis(written_ms),
        }
    }

    #[test]
    fn messages_are_sorted_into_replies_parts_and_trouble() {
        let cases = [
            (
                json!({"id": 3, "ok": {}}),
                Received::Reply {
                    id: 3,
                    outcome: Outcome::Ok,
                },
            ),
            (
                json!({"id": 3}),
                Received::Reply {
                    id: 3,
                    outcome: Outcome::Ok,
                },
            ),
            (
                json!({"id": 4, "error": {"code": 113, "message": "busy", "temporary": true, "retry_after_ms": 800}}),
                Received::Reply {
                    id: 4,
                    outcome: Outcome::Error {
                        code: 113,
                        retry_after_ms: Some(800),
                    },
                },
            ),
            (
                json!({"id": 5, "error": {"code": 114, "message": "timeout", "temporary": true}}),
                Received::Reply {
                    id: 5,
                    outcome: Outcome::Error {
                        code: 114,
                        retry_after_ms: None,
                    },
                },
            ),
            // A part carries its call's id but is not its reply.
            (
                json!({"push": "rpc_part", "id": 6, "data": {"done": 0.5}}),
                Received::Part { id: 6 },
            ),
            (json!({"push": "rpc_part", "data": 1}), Received::Other),
            (
                json!({"push": "disconnect", "code": 4005, "reason": "draining", "reconnect": true}),
                Received::Trouble {
                    kind: "disconnect".into(),
                    code: 4005,
                },
            ),
            (
                json!({"push": "pub", "channel": "c", "offset": 1, "data": {}}),
                Received::Other,
            ),
            (json!({"id": 4_294_967_296u64, "ok": {}}), Received::Other),
            (json!({"ok": {}}), Received::Other),
        ];
        for (value, want) in cases {
            let bytes = msg(value.clone());
            assert_eq!(with(&bytes, classify), want, "{value}");
        }
    }

    #[test]
    fn replies_end_the_call_with_their_id_in_any_order() {
        let live = Live::default();
        let t0 = Instant::now();
        let mut t = Tracker::new(Window { first: 0, end: 100 });
        for (id, seq) in [(2u32, 0u64), (3, 1), (4, 2)] {
            Live::add(&live.outstanding, 1);
            t.sent(id, sent(seq, t0, seq * 10, seq * 10));
        }
        let now = t0 + Duration::from_millis(50);
        // Out of order, as the protocol allows; then one the tracker never sent.
        for reply in [
            json!({"id": 4, "ok": {"data": "h"}}),
            json!({"id": 2, "error": {"code": 104, "message": "no such method"}}),
            json!({"id": 9, "ok": {}}),
        ] {
            with(&msg(reply), |m| t.on_message(m, now, &live));
        }
        assert_eq!(t.outstanding(), 1);
        assert_eq!(
            (t.stats.ok, t.stats.errors_with(UNKNOWN), t.stats.unmatched),
            (1, 1, 1)
        );
        // Latency runs from the intended send time of *that* call: id 4 was due at 20 ms.
        let mut h = CallHists::default();
        t.samples.record_into(&mut h);
        assert_eq!(h.latency.len(), 1);
        assert!(h.latency.equivalent(h.latency.max(), 30_000));
        assert!(h.error_latency.equivalent(h.error_latency.max(), 50_000));
        assert_eq!(Live::get(&live.outstanding), 1);
        assert_eq!((Live::get(&live.ok), Live::get(&live.failed)), (1, 1));
        // A repeated reply for an ended call is not counted twice.
        with(&msg(json!({"id": 4, "ok": {}})), |m| {
            t.on_message(m, now, &live)
        });
        assert_eq!((t.stats.ok, t.stats.unmatched), (1, 2));
    }

    #[test]
    fn parts_are_counted_and_the_first_one_timed() {
        let live = Live::default();
        let t0 = Instant::now();
        let mut t = Tracker::new(Window { first: 0, end: 100 });
        t.sent(7, sent(0, t0, 0, 1));
        t.sent(8, sent(1, t0, 0, 1));
        let part = msg(json!({"push": "rpc_part", "id": 7, "data": {"step": 1}}));
        with(&part, |m| {
            t.on_message(m, t0 + Duration::from_millis(5), &live)
        });
        with(&part, |m| {
            t.on_message(m, t0 + Duration::from_millis(9), &live)
        });
        // A part does not end the call.
        assert_eq!(t.outstanding(), 2);
        let done = msg(json!({"id": 7, "ok": {"data": "final"}}));
        with(&done, |m| {
            t.on_message(m, t0 + Duration::from_millis(12), &live)
        });
        let done = msg(json!({"id": 8, "ok": {"data": "final"}}));
        with(&done, |m| {
            t.on_message(m, t0 + Duration::from_millis(12), &live)
        });
        // A part after its call ended matches nothing.
        with(&part, |m| {
            t.on_message(m, t0 + Duration::from_millis(13), &live)
        });
        assert_eq!(
            (t.stats.parts, t.stats.calls_with_parts, t.stats.ok),
            (2, 1, 2)
        );
        assert_eq!(t.stats.unmatched, 1);
        assert_eq!(Live::get(&live.parts), 2);
        let mut h = CallHists::default();
        t.samples.record_into(&mut h);
        assert_eq!(h.first_part.len(), 1);
        assert!(h.first_part.equivalent(h.first_part.max(), 5_000));
        assert!(
            h.latency.equivalent(h.latency.max(), 12_000),
            "latency is to the final reply, not a part"
        );
    }

    #[test]
    fn busy_replies_record_their_retry_hint() {
        let live = Live::default();
        let t0 = Instant::now();
        let mut t = Tracker::new(Window { first: 0, end: 100 });
        for (id, retry) in [(2u32, Some(250u64)), (3, Some(1000)), (4, None)] {
            t.sent(id, sent(u64::from(id), t0, 0, 0));
            let mut error = json!({"code": 113, "message": "busy", "temporary": true});
            if let Some(ms) = retry {
                error["retry_after_ms"] = json!(ms);
            }
            with(&msg(json!({"id": id, "error": error})), |m| {
                t.on_message(m, t0 + Duration::from_millis(2), &live)
            });
        }
        assert_eq!(t.stats.errors_with(BUSY), 3);
        assert_eq!((Live::get(&live.busy), Live::get(&live.failed)), (3, 0));
        let mut h = CallHists::default();
        t.samples.record_into(&mut h);
        assert_eq!(h.retry_after.len(), 2);
        // Recorded in µs, so reports show them in ms like every other histogram.
        assert!(h.retry_after.equivalent(h.retry_after.min(), 250_000));
        assert!(h.retry_after.equivalent(h.retry_after.max(), 1_000_000));
    }

    #[test]
    fn silence_times_out_and_a_lost_connection_ends_the_rest() {
        let live = Live::default();
        let t0 = Instant::now();
        let mut t = Tracker::new(Window { first: 0, end: 100 });
        t.sent(2, sent(0, t0, 0, 0));
        t.sent(3, sent(1, t0, 0, 900));
        // The timeout runs from the write, not from the intended time.
        assert_eq!(
            t.expire(
                t0 + Duration::from_millis(1500),
                Duration::from_secs(1),
                &live
            ),
            1
        );
        assert_eq!((t.stats.no_reply, t.outstanding()), (1, 1));
        t.abandon(Outcome::Lost, &live);
        assert_eq!((t.stats.lost, t.outstanding()), (1, 0));
        assert_eq!(t.stats.failed(), 2);
    }

    #[test]
    fn only_the_measured_window_is_counted() {
        let live = Live::default();
        let t0 = Instant::now();
        let mut t = Tracker::new(Window { first: 10, end: 20 });
        for seq in 0..30u64 {
            let id = seq as u32 + 2;
            let s = sent(seq, t0, seq, seq);
            t.stats.on_write(&s, &Window { first: 10, end: 20 });
            t.sent(id, s);
            with(&msg(json!({"id": id, "ok": {}})), |m| {
                t.on_message(m, t0 + Duration::from_millis(40), &live)
            });
        }
        assert_eq!(
            (t.stats.sent, t.stats.sent_measured, t.stats.ok),
            (30, 10, 10)
        );
        assert_eq!(t.samples.latency.len(), 10);
        // Progress counters see the warmup too.
        assert_eq!(Live::get(&live.ok), 30);
    }

    #[test]
    fn writes_count_lateness_and_the_measured_span() {
        let t0 = Instant::now();
        let w = Window { first: 0, end: 10 };
        let mut s = CallStats::default();
        s.on_write(&sent(0, t0, 0, 1), &w);
        s.on_write(&sent(1, t0, 10, 25), &w);
        s.on_write(&sent(10, t0, 100, 500), &w);
        assert_eq!((s.sent, s.sent_measured, s.late_measured), (3, 2, 1));
        assert_eq!(s.first_write, Some(t0 + Duration::from_millis(1)));
        assert_eq!(s.last_write, Some(t0 + Duration::from_millis(25)));
    }

    #[test]
    fn errors_are_tallied_by_code_and_kind_and_merge() {
        let mut a = CallStats::default();
        for outcome in [
            Outcome::Ok,
            Outcome::Ok,
            Outcome::Error {
                code: BUSY,
                retry_after_ms: Some(100),
            },
            Outcome::Error {
                code: BUSY,
                retry_after_ms: None,
            },
            Outcome::Error {
                code: TIMEOUT,
                retry_after_ms: None,
            },
            Outcome::NoReply,
        ] {
            a.count(outcome);
        }
        let mut b = CallStats::default();
        b.count(Outcome::Error {
            code: UNKNOWN,
            retry_after_ms: None,
        });
        b.count(Outcome::Error {
            code: BUSY,
            retry_after_ms: None,
        });
        b.count(Outcome::Lost);
        b.errors.add("closed 4009", 1);
        b.unmatched = 2;
        a.merge(&b);
        assert_eq!(a.ok, 2);
        assert_eq!(
            (
                a.errors_with(BUSY),
                a.errors_with(TIMEOUT),
                a.errors_with(UNKNOWN)
            ),
            (3, 1, 1)
        );
        assert_eq!((a.error_replies(), a.no_reply, a.lost), (5, 1, 1));
        assert_eq!((a.ended(), a.failed()), (9, 7));
        let kinds = a.kinds(Duration::from_millis(12_000));
        assert_eq!(
            kinds.iter().collect::<Vec<_>>(),
            [
                ("closed 4009", 1),
                ("connection lost", 1),
                ("error 104 (unknown op or method)", 1),
                ("error 113 (busy)", 3),
                ("error 114 (timeout)", 1),
                ("no reply within 12000 ms", 1),
                ("reply or part for no call in flight", 2),
            ]
        );
    }
}
