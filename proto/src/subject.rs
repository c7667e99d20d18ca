//! Every NATS subject the platform uses, as functions.
//!
//! Services never `format!` a subject themselves. Channel names reach these
//! builders only as [`ChannelName`], whose alphabet cannot inject `*`, `>` or
//! whitespace, and inbound subjects are parsed back strictly.

use crate::channel::{ChannelError, ChannelName};

/// Public: any service publishes a channel's data here (PROTOCOL.md §4).
pub const PUBLISH_PREFIX: &str = "rt.publish.";
/// Internal: gateways publish client and HTTP publications with their envelope here.
pub const INTERNAL_PUBLISH_PREFIX: &str = "rt.bc.publish.";
/// Internal: history queries answered by broadcast.
pub const HISTORY_PREFIX: &str = "rt.bc.history.";
/// Internal: subscribe-time position and recovery queries answered by broadcast.
pub const RECOVER_PREFIX: &str = "rt.bc.recover.";
/// Internal: broadcast delivers sequenced publications to gateways here.
pub const DELIVER_PREFIX: &str = "rt.deliver.";
/// Public: RPC methods are answered here, in a queue group.
pub const RPC_PREFIX: &str = "rt.rpc.";

/// Internal: asks whoever runs RPC request `<id>` to stop (the client left).
pub const CANCEL_PREFIX: &str = "rt.cancel.";

/// Internal: partition-addressed requests to broadcast,
/// `rt.bc.p.<partition>.<op>.<channel>` (see [`broadcast_request`]). Only the
/// instance that owns the partition subscribes to `rt.bc.p.<partition>.>`.
pub const PARTITION_PREFIX: &str = "rt.bc.p.";
/// Internal: broadcast instances announce themselves and the partitions they
/// own here, once per lease tick (used to spread partitions fairly).
pub const BROADCAST_MEMBERS: &str = "rt.bc.members";
/// Channels are hashed into this many partitions; a partition is the unit a
/// broadcast instance owns (through a lease in NATS KV). Every gateway and
/// broadcast instance must agree on it, so it is part of the protocol, not
/// configuration.
pub const BROADCAST_PARTITIONS: u32 = 64;

/// The history record in JetStream: one subject per channel,
/// `rt.hist.d.<channel>` for the default namespace and
/// `rt.hist.n.<namespace>.<channel>` for a named one (the namespace as one
/// escaped token, so each namespace's stream filters `rt.hist.n.<namespace>.>`
/// and no two namespaces' filters overlap).
pub const HISTORY_RECORD_PREFIX: &str = "rt.hist.";
/// The queue group every compute instance joins on each method it serves.
pub const COMPUTE_QUEUE: &str = "rt.compute";

/// Subject for a public publish to `channel`.
pub fn publish(channel: &ChannelName) -> String {
    join(PUBLISH_PREFIX, channel.as_str())
}

/// Subject for a gateway's enveloped publish to `channel`.
pub fn internal_publish(channel: &ChannelName) -> String {
    join(INTERNAL_PUBLISH_PREFIX, channel.as_str())
}

/// Subject for a history query on `channel`.
pub fn history(channel: &ChannelName) -> String {
    join(HISTORY_PREFIX, channel.as_str())
}

/// Subject for a position / recovery query on `channel`.
pub fn recover(channel: &ChannelName) -> String {
    join(RECOVER_PREFIX, channel.as_str())
}

/// Subject on which `channel`'s sequenced publications are delivered.
pub fn deliver(channel: &ChannelName) -> String {
    join(DELIVER_PREFIX, channel.as_str())
}

/// Subject answering RPC `method` (validated with the channel-name rules).
pub fn rpc(method: &ChannelName) -> String {
    join(RPC_PREFIX, method.as_str())
}

/// Subject cancelling RPC request `request_id` (an id made by [`crate::rpc::request_id`]).
pub fn cancel(request_id: &str) -> String {
    join(CANCEL_PREFIX, request_id)
}

/// What a partition-addressed broadcast request asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BroadcastOp {
    Publish,
    History,
    Recover,
}

impl BroadcastOp {
    fn token(self) -> &'static str {
        match self {
            BroadcastOp::Publish => "publish",
            BroadcastOp::History => "history",
            BroadcastOp::Recover => "recover",
        }
    }

    fn parse(token: &str) -> Option<Self> {
        match token {
            "publish" => Some(BroadcastOp::Publish),
            "history" => Some(BroadcastOp::History),
            "recover" => Some(BroadcastOp::Recover),
            _ => None,
        }
    }
}

/// The partition `channel` belongs to: FNV-1a (64 bit) of its name modulo
/// [`BROADCAST_PARTITIONS`]. Stable across processes, versions and platforms.
pub fn partition(channel: &ChannelName) -> u32 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in channel.as_str().bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    // The modulus fits in u32, so the remainder does too.
    u32::try_from(hash % u64::from(BROADCAST_PARTITIONS)).unwrap_or(0)
}

/// Subject of a request to whichever broadcast instance owns `channel`'s
/// partition: `rt.bc.p.<partition>.<op>.<channel>`.
pub fn broadcast_request(op: BroadcastOp, channel: &ChannelName) -> String {
    format!(
        "{PARTITION_PREFIX}{}.{}.{}",
        partition(channel),
        op.token(),
        channel.as_str()
    )
}

/// Everything addressed to `partition`: `rt.bc.p.<partition>.>`.
pub fn partition_wildcard(partition: u32) -> String {
    format!("{PARTITION_PREFIX}{partition}.>")
}

/// Parses `rt.bc.p.<partition>.<op>.<channel>`, checking that the partition
/// is the channel's.
pub fn parse_broadcast_request(
    subject: &str,
) -> Result<(u32, BroadcastOp, ChannelName), SubjectError> {
    let rest = subject
        .strip_prefix(PARTITION_PREFIX)
        .ok_or(SubjectError::WrongPrefix {
            expected: PARTITION_PREFIX,
        })?;
    let mut parts = rest.splitn(3, '.');
    let number = parts.next().unwrap_or_default();
    let op = parts.next().and_then(BroadcastOp::parse);
    let (Ok(number), Some(op), Some(channel)) = (number.parse::<u32>(), op, parts.next()) else {
        return Err(SubjectError::BadPartition);
    };
    let channel = ChannelName::parse(channel)?;
    if partition(&channel) != number {
        return Err(SubjectError::BadPartition);
    }
    Ok((number, op, channel))
}

/// The record subject of `channel` in the history streams.
pub fn history_record(channel: &ChannelName) -> String {
    match channel.namespace() {
        None => format!("{HISTORY_RECORD_PREFIX}d.{}", channel.as_str()),
        Some(ns) => format!(
            "{HISTORY_RECORD_PREFIX}n.{}.{}",
            escape_token(ns),
            channel.as_str()
        ),
    }
}

/// The subject filter of a namespace's history stream (`None`: the default namespace).
pub fn history_stream_filter(namespace: Option<&str>) -> String {
    match namespace {
        None => format!("{HISTORY_RECORD_PREFIX}d.>"),
        Some(ns) => format!("{HISTORY_RECORD_PREFIX}n.{}.>", escape_token(ns)),
    }
}

/// The name of a namespace's history stream: `RT_HIST_D` for the default
/// namespace, `RT_HIST_N_<namespace>` (escaped) for a named one.
pub fn history_stream(namespace: Option<&str>) -> String {
    match namespace {
        None => "RT_HIST_D".to_owned(),
        Some(ns) => format!("RT_HIST_N_{}", escape_token(ns)),
    }
}

/// A namespace as one subject token and stream-name fragment: `.` and `=`
/// (the only characters of the namespace alphabet that are not safe there)
/// become `=2E` and `=3D`, so distinct namespaces stay distinct.
fn escape_token(ns: &str) -> String {
    let mut out = String::with_capacity(ns.len());
    for c in ns.chars() {
        match c {
            '.' => out.push_str("=2E"),
            '=' => out.push_str("=3D"),
            c => out.push(c),
        }
    }
    out
}

/// Wildcard matching every subject that starts with `prefix` (one of the constants above).
pub fn wildcard(prefix: &str) -> String {
    join(prefix, ">")
}

/// Why an inbound subject was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SubjectError {
    #[error("subject does not start with {expected}")]
    WrongPrefix { expected: &'static str },
    #[error("subject carries an invalid channel name: {0}")]
    BadChannel(#[from] ChannelError),
    #[error(
        "subject is not rt.bc.p.<partition>.<publish|history|recover>.<channel> with the channel's partition"
    )]
    BadPartition,
}

/// Parses the channel out of `subject`, which must start with `prefix`.
pub fn parse_channel(prefix: &'static str, subject: &str) -> Result<ChannelName, SubjectError> {
    let rest = subject
        .strip_prefix(prefix)
        .ok_or(SubjectError::WrongPrefix { expected: prefix })?;
    Ok(ChannelName::parse(rest)?)
}

fn join(prefix: &str, rest: &str) -> String {
    let mut s = String::with_capacity(prefix.len() + rest.len());
    s.push_str(prefix);
    s.push_str(rest);
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ch(name: &str) -> ChannelName {
        ChannelName::parse(name).expect("valid channel")
    }

    #[test]
    fn builds_and_parses_back() {
        let c = ch("chat:room.1");
        assert_eq!(publish(&c), "rt.publish.chat:room.1");
        assert_eq!(deliver(&c), "rt.deliver.chat:room.1");
        for (prefix, subject) in [
            (PUBLISH_PREFIX, publish(&c)),
            (INTERNAL_PUBLISH_PREFIX, internal_publish(&c)),
            (HISTORY_PREFIX, history(&c)),
            (RECOVER_PREFIX, recover(&c)),
            (DELIVER_PREFIX, deliver(&c)),
        ] {
            assert_eq!(parse_channel(prefix, &subject), Ok(c.clone()));
        }
        assert_eq!(wildcard(PUBLISH_PREFIX), "rt.publish.>");
        assert_eq!(rpc(&ch("auth.hash")), "rt.rpc.auth.hash");
    }

    #[test]
    fn partition_subjects_round_trip() {
        let c = ch("chat:room.1");
        let p = partition(&c);
        assert!(p < BROADCAST_PARTITIONS);
        // Stable: FNV-1a, not a per-process hasher.
        assert_eq!(p, partition(&ch("chat:room.1")));
        for op in [
            BroadcastOp::Publish,
            BroadcastOp::History,
            BroadcastOp::Recover,
        ] {
            let subject = broadcast_request(op, &c);
            assert!(subject.starts_with(&format!("rt.bc.p.{p}.")), "{subject}");
            assert_eq!(parse_broadcast_request(&subject), Ok((p, op, c.clone())));
        }
        assert_eq!(partition_wildcard(7), "rt.bc.p.7.>");
        let wrong = format!(
            "rt.bc.p.{}.publish.chat:room.1",
            (p + 1) % BROADCAST_PARTITIONS
        );
        assert_eq!(
            parse_broadcast_request(&wrong),
            Err(SubjectError::BadPartition)
        );
        assert_eq!(
            parse_broadcast_request("rt.bc.p.x.publish.a"),
            Err(SubjectError::BadPartition)
        );
        assert_eq!(
            parse_broadcast_request("rt.bc.p.1.delete.a"),
            Err(SubjectError::BadPartition)
        );
        // Channels spread over the partitions.
        let used: std::collections::HashSet<u32> = (0..1000)
            .map(|n| partition(&ch(&format!("c{n}"))))
            .collect();
        assert_eq!(used.len(), BROADCAST_PARTITIONS as usize);
    }

    #[test]
    fn history_record_subjects_cannot_collide() {
        assert_eq!(history_record(&ch("lobby")), "rt.hist.d.lobby");
        assert_eq!(history_record(&ch("chat:a.b")), "rt.hist.n.chat.chat:a.b");
        // A dotted namespace is one token, so "a" and "a.b" filter apart.
        assert_eq!(history_record(&ch("a.b:x")), "rt.hist.n.a=2Eb.a.b:x");
        assert_eq!(history_stream_filter(Some("a")), "rt.hist.n.a.>");
        assert_eq!(history_stream_filter(Some("a.b")), "rt.hist.n.a=2Eb.>");
        assert_eq!(history_stream_filter(None), "rt.hist.d.>");
        assert_eq!(history_stream(None), "RT_HIST_D");
        assert_eq!(history_stream(Some("a.b")), "RT_HIST_N_a=2Eb");
        assert_ne!(history_stream(Some("a=2Eb")), history_stream(Some("a.b")));
    }

    #[test]
    fn refuses_foreign_or_bad_subjects() {
        assert!(matches!(
            parse_channel(PUBLISH_PREFIX, "rt.deliver.x"),
            Err(SubjectError::WrongPrefix { .. })
        ));
        assert!(matches!(
            parse_channel(PUBLISH_PREFIX, "rt.publish."),
            Err(SubjectError::BadChannel(_))
        ));
        assert!(matches!(
            parse_channel(PUBLISH_PREFIX, "rt.publish.a..b"),
            Err(SubjectError::BadChannel(_))
        ));
    }
}
