//! What gateways and the session service say to each other, and the layout of
//! the shared state they keep in NATS KV.
//!
//! Requests go to `rt.session.*` in the queue group `rt.session`, so any
//! number of session instances share them. Replies are [`crate::internal::BusResult`]s.
//! Everything is a MessagePack map (`to_vec_named`), like [`crate::internal`].

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::channel::ChannelName;

/// The queue group every session instance joins.
pub const QUEUE: &str = "rt.session";
/// Gateway → session: authenticate a `connect` ([`AuthRequest`] → [`AuthReply`]).
pub const AUTH: &str = "rt.session.auth";
/// Gateway → session: a live connection's new token ([`RefreshRequest`] → [`RefreshReply`]).
pub const REFRESH: &str = "rt.session.refresh";
/// Gateway → session: may this client subscribe to a private channel with a
/// channel token ([`ChannelAuthRequest`] → [`ChannelGrant`]).
pub const AUTHORIZE: &str = "rt.session.authorize";
/// Gateway → session: who is in a channel ([`PresenceRequest`] → [`PresenceReply`]).
pub const PRESENCE: &str = "rt.session.presence";
/// Gateway → session, fire and forget: batched connection events ([`SessionEvents`]).
pub const EVENTS: &str = "rt.session.events";
/// HTTP API (any gateway) → session: revoke a user's tokens ([`RevokeRequest`] → `{}`).
pub const REVOKE: &str = "rt.session.revoke";
/// Session → every session instance: a revocation to apply to caches (no queue group).
pub const REVOKED: &str = "rt.session.revoked";
/// Anyone → every gateway (no queue group): close a user's connections ([`Kick`]).
pub const KICK: &str = "rt.control.kick";

/// NATS header marking a message on a channel's delivery subject as a
/// presence change ([`PresenceChange`]) rather than a publication.
pub const EVENT_HEADER: &str = "Rt-Event";
/// Value of [`EVENT_HEADER`] for join/leave batches.
pub const EVENT_PRESENCE: &str = "presence";

/// KV bucket: one entry per gateway node, refreshed every heartbeat ([`NodeBeat`]).
pub const NODES_BUCKET: &str = "rt_nodes";
/// KV bucket: who is in which channel, one entry per channel per node ([`PresenceSlice`]).
pub const PRESENCE_BUCKET: &str = "rt_presence";
/// KV bucket: resumable sessions by id ([`SessionRecord`]).
pub const SESSIONS_BUCKET: &str = "rt_sessions";
/// KV bucket: live connections per user, per node ([`UserConnections`]).
pub const USERS_BUCKET: &str = "rt_users";
/// KV bucket: the shared record of revocations, one entry per revoked user
/// (key [`user_key`], value a [`RevokeRequest`]: tokens of `user` issued at
/// or before `before` are refused). Every session instance loads it before
/// it is ready and watches it.
pub const REVOCATIONS_BUCKET: &str = "rt_revocations";

/// Gateway → session on [`AUTH`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuthRequest {
    /// The `connect` token; `None` asks for an anonymous connection.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    /// The session to resume, if the client sent one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session: Option<String>,
    pub client: String,
    pub node: String,
    /// Whether this gateway accepts anonymous connections.
    pub allow_anonymous: bool,
}

/// What a `connect` may do: who it is and what it may resume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuthReply {
    pub user: String,
    /// Raw MessagePack of the token's `info` claim.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub info: Option<Bytes>,
    /// The token's `exp` (seconds since the Unix epoch); 0 for none.
    pub expires_at: u64,
    /// The token's `channels` claim: private channels this user may join.
    #[serde(default)]
    pub channels: Vec<String>,
    /// The session id to hand the client (the resumed one, or a new one).
    pub session: String,
    pub resumed: bool,
    /// Channels of the resumed session, still authorized, to subscribe again.
    #[serde(default)]
    pub restore: Vec<String>,
    /// Private channels granted to the session by channel tokens, with their expiry.
    #[serde(default)]
    pub grants: Vec<ChannelGrant>,
}

/// Gateway → session on [`REFRESH`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RefreshRequest {
    pub token: String,
    /// The connection's user: a token for anybody else is refused.
    pub user: String,
    pub client: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RefreshReply {
    pub expires_at: u64,
    #[serde(default)]
    pub channels: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub info: Option<Bytes>,
}

/// Gateway → session on [`AUTHORIZE`]: a channel token presented with `subscribe`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChannelAuthRequest {
    pub channel: String,
    pub token: String,
    pub user: String,
    pub client: String,
    /// The session the grant is remembered in, so a resume keeps it.
    pub session: String,
}

/// Access to a private channel, until `expires_at` (0: no expiry).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChannelGrant {
    pub channel: String,
    pub expires_at: u64,
}

/// Gateway → session on [`PRESENCE`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PresenceRequest {
    pub channel: String,
}

/// Who is in a channel: every client, or only how many when there are more
/// than `session.presence_max_list`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PresenceReply {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clients: Option<Vec<PresentClient>>,
    pub count: u64,
}

/// One client in a channel's presence.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PresentClient {
    pub client: String,
    pub user: String,
    /// Raw MessagePack of the token's `info` claim.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub info: Option<Bytes>,
}

/// A node's share of one channel's presence (KV [`PRESENCE_BUCKET`], key
/// [`presence_key`]). Written only by that node, so it needs no locking.
/// Past `session.presence_max_list` clients the list is left out and only
/// the count kept, so a huge channel costs a few bytes per node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct PresenceSlice {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clients: Option<Vec<PresentClient>>,
    pub count: u64,
}

/// Joins and leaves of one channel, sent on its delivery subject with
/// header [`EVENT_HEADER`]: [`EVENT_PRESENCE`]. Batched under load.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct PresenceChange {
    #[serde(default)]
    pub joins: Vec<PresentClient>,
    #[serde(default)]
    pub leaves: Vec<PresentClient>,
}

/// A gateway's heartbeat (KV [`NODES_BUCKET`], key = node name).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeBeat {
    /// Milliseconds since the Unix epoch.
    pub at_ms: u64,
    pub started_ms: u64,
}

/// A user's live connections per node (KV [`USERS_BUCKET`], key [`user_key`]).
/// Entries of nodes that stopped beating do not count.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct UserConnections {
    pub nodes: std::collections::BTreeMap<String, u32>,
}

/// A resumable session (KV [`SESSIONS_BUCKET`], key = session id).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionRecord {
    pub user: String,
    pub created_ms: u64,
    /// Last change (connect, subscription change, close).
    pub updated_ms: u64,
    /// The node holding its live connection; `None` once closed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// When its connection ended (milliseconds since the Unix epoch).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub closed_ms: Option<u64>,
    /// Channels it was subscribed to.
    #[serde(default)]
    pub subs: Vec<String>,
    #[serde(default)]
    pub grants: Vec<ChannelGrant>,
}

/// Gateway → session on [`EVENTS`], fire and forget, batched per node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionEvents {
    pub node: String,
    pub events: Vec<SessionEvent>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum SessionEvent {
    /// The session's subscriptions changed (the full list).
    Subs {
        session: String,
        subs: Vec<String>,
        at_ms: u64,
    },
    /// A connection ended.
    Closed {
        session: String,
        client: String,
        user: String,
        code: u16,
        subs: Vec<String>,
        at_ms: u64,
    },
}

/// HTTP API → session on [`REVOKE`]: tokens of `user` issued (`iat`) before
/// `before` (seconds since the Unix epoch) are refused from now on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RevokeRequest {
    pub user: String,
    pub before: u64,
}

/// → every gateway on [`KICK`]: close `user`'s connections with `code`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Kick {
    pub user: String,
    pub code: u16,
    pub reason: String,
}

/// The KV key of `node`'s slice of `channel`'s presence: the channel escaped
/// into one KV token (KV keys allow `[-/_=.a-zA-Z0-9]`; `:`, `@`, `=` and `.`
/// become `=XX`), a dot, the node.
pub fn presence_key(channel: &ChannelName, node: &str) -> String {
    let mut key = escape(channel.as_str());
    key.push('.');
    key.push_str(node);
    key
}

/// The KV key of a user's connection counts (any string is escaped).
pub fn user_key(user: &str) -> String {
    // Every byte outside the KV alphabet, including multi-byte UTF-8, is escaped.
    let mut key = String::with_capacity(user.len() + 2);
    key.push('u');
    key.push('_');
    key.push_str(&escape(user));
    key
}

/// The node a presence key belongs to (the part after the escaped channel).
pub fn presence_key_node(key: &str) -> Option<&str> {
    key.split_once('.').map(|(_, node)| node)
}

/// The channel a presence key belongs to (the escaped part, unescaped).
pub fn presence_key_channel(key: &str) -> Option<ChannelName> {
    let (escaped, _) = key.split_once('.')?;
    let mut bytes = Vec::with_capacity(escaped.len());
    let mut rest = escaped.as_bytes();
    while let Some((&first, tail)) = rest.split_first() {
        if first == b'=' {
            let hex = tail.get(..2)?;
            let text = std::str::from_utf8(hex).ok()?;
            bytes.push(u8::from_str_radix(text, 16).ok()?);
            rest = &tail[2..];
        } else {
            bytes.push(first);
            rest = tail;
        }
    }
    ChannelName::parse(std::str::from_utf8(&bytes).ok()?).ok()
}

/// Whether `name` can be used as a node name: it appears in KV keys and subjects.
pub fn valid_node_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for byte in text.bytes() {
        if byte.is_ascii_alphanumeric() || byte == b'-' || byte == b'_' {
            out.push(char::from(byte));
        } else {
            out.push('=');
            out.push_str(&format!("{byte:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::internal::{from_msgpack, to_msgpack};

    #[test]
    fn keys_are_single_kv_tokens() {
        let channel = ChannelName::parse("chat:room.1@x=y").expect("valid");
        let key = presence_key(&channel, "gw-1");
        assert_eq!(key, "chat=3Aroom=2E1=40x=3Dy.gw-1");
        assert_eq!(presence_key_node(&key), Some("gw-1"));
        assert_eq!(presence_key_channel(&key), Some(channel));
        assert_eq!(presence_key_channel("bad=4"), None);
        assert_eq!(presence_key_channel("=ZZ.n"), None);
        assert_eq!(user_key("a.b:é"), "u_a=2Eb=3A=C3=A9");
        // Different channels never share a key.
        let a = ChannelName::parse("a.b").expect("valid");
        let b = ChannelName::parse("a=2Eb").expect("valid");
        assert_ne!(presence_key(&a, "n"), presence_key(&b, "n"));
    }

    #[test]
    fn node_names() {
        assert!(valid_node_name("gw-7f3a_1"));
        assert!(!valid_node_name("a.b"));
        assert!(!valid_node_name(""));
        assert!(!valid_node_name("x>"));
    }

    #[test]
    fn events_round_trip() {
        let events = SessionEvents {
            node: "n".into(),
            events: vec![
                SessionEvent::Subs {
                    session: "s".into(),
                    subs: vec!["chat:a".into()],
                    at_ms: 1,
                },
                SessionEvent::Closed {
                    session: "s".into(),
                    client: "c".into(),
                    user: "u".into(),
                    code: 1000,
                    subs: vec![],
                    at_ms: 2,
                },
            ],
        };
        let bytes = to_msgpack(&events).expect("encode");
        assert_eq!(
            from_msgpack::<SessionEvents>(&bytes).expect("decode"),
            events
        );
        let reply = AuthReply {
            user: "u".into(),
            info: Some(Bytes::from_static(&[0x80])),
            expires_at: 5,
            channels: vec!["p:x".into()],
            session: "s".into(),
            resumed: true,
            restore: vec!["chat:a".into()],
            grants: vec![ChannelGrant {
                channel: "p:y".into(),
                expires_at: 9,
            }],
        };
        let bytes = to_msgpack(&reply).expect("encode");
        assert_eq!(from_msgpack::<AuthReply>(&bytes).expect("decode"), reply);
    }
}
