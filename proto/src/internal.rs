//! Envelopes that travel between services over NATS (MessagePack maps, via
//! `rmp_serde::to_vec_named`, so services of different versions tolerate added
//! fields). `data` fields hold the raw MessagePack bytes of the value, carried
//! as a bin so nobody re-encodes a payload on the way through.

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::codes::ErrorCode;

/// A position in a channel's stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamPosition {
    pub offset: u64,
    pub epoch: String,
}

/// Who published: `user` and `client` of a WebSocket publisher (empty for HTTP),
/// and a passthrough `info` map (token `info` claim, or an HTTP publish's `info`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct PubInfo {
    pub user: String,
    pub client: String,
    /// Raw MessagePack of the nested `info` map.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub info: Option<Bytes>,
}

/// Gateway → broadcast on `rt.bc.publish.<channel>`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PublishRequest {
    /// Raw MessagePack of the publication's data.
    pub data: Bytes,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub info: Option<PubInfo>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idempotency_key: Option<String>,
}

/// A sequenced publication.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Publication {
    pub channel: String,
    pub offset: u64,
    pub epoch: String,
    /// Milliseconds since the Unix epoch when it was sequenced.
    pub ts: u64,
    /// Raw MessagePack of the data.
    pub data: Bytes,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub info: Option<PubInfo>,
}

/// Broadcast's answer to a publish: where the publication landed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PublishAck {
    pub offset: u64,
    pub epoch: String,
}

/// Gateway → broadcast on `rt.bc.history.<channel>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HistoryRequest {
    pub limit: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<StreamPosition>,
    #[serde(default)]
    pub reverse: bool,
}

/// Publications and the channel's current position.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HistoryReply {
    pub pubs: Vec<Publication>,
    pub offset: u64,
    pub epoch: String,
}

/// Gateway → broadcast on `rt.bc.recover.<channel>` when a client subscribes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecoverRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<StreamPosition>,
}

/// The channel's position and, when `since` was given and could be served,
/// the publications after it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RecoverReply {
    pub offset: u64,
    pub epoch: String,
    pub recovered: bool,
    pub pubs: Vec<Publication>,
}

/// A broadcast instance's heartbeat on `rt.bc.members`: who it is and which
/// partitions it owns. Instances use it to spread partitions evenly; the
/// leases in NATS KV, not this, decide ownership.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BroadcastMember {
    pub id: String,
    pub partitions: Vec<u32>,
    pub at_ms: u64,
    /// The instance is shutting down: do not count it when sharing out partitions.
    #[serde(default)]
    pub leaving: bool,
}

/// The value of a partition lease, key `p<partition>` in the KV bucket
/// `rt_broadcast_leases`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartitionLease {
    pub owner: String,
    pub at_ms: u64,
}

/// Headers of a publication stored in the JetStream history record (the body
/// is the MessagePack [`Publication`], byte for byte what is delivered).
pub mod record {
    /// The publication's offset (decimal).
    pub const OFFSET: &str = "Rt-Offset";
    /// The publication's epoch.
    pub const EPOCH: &str = "Rt-Epoch";
    /// Which sequencer wrote it: `<instance>/<load id>` (a resync adopts only its own writes).
    pub const WRITER: &str = "Rt-Writer";
    /// The idempotency key it was published with, `%`-escaped (`%25`, and `%XX` for control characters).
    pub const KEY: &str = "Rt-Key";
    /// JetStream's own deduplication id: `<channel>/<epoch>/<offset>/<attempt>`,
    /// so two writers cannot both store one offset within the duplicate window.
    pub const MSG_ID: &str = "Nats-Msg-Id";
    /// JetStream's optimistic concurrency check on the channel's subject.
    pub const EXPECTED_LAST_SUBJECT_SEQUENCE: &str = "Nats-Expected-Last-Subject-Sequence";
}

/// An error as it crosses NATS.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireError {
    pub code: ErrorCode,
    pub message: String,
    /// For temporary errors (113): when to retry.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_after_ms: Option<u64>,
}

impl WireError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            retry_after_ms: None,
        }
    }

    pub fn with_retry_after(mut self, ms: u64) -> Self {
        self.retry_after_ms = Some(ms);
        self
    }
}

/// Every NATS reply: `{error: {code, message}}` or the result's own fields.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum BusResult<T> {
    Err { error: WireError },
    Ok(T),
}

impl<T> From<Result<T, WireError>> for BusResult<T> {
    fn from(result: Result<T, WireError>) -> Self {
        match result {
            Ok(value) => BusResult::Ok(value),
            Err(error) => BusResult::Err { error },
        }
    }
}

impl<T> From<BusResult<T>> for Result<T, WireError> {
    fn from(result: BusResult<T>) -> Self {
        match result {
            BusResult::Ok(value) => Ok(value),
            BusResult::Err { error } => Err(error),
        }
    }
}

/// Encodes an envelope as a MessagePack map.
pub fn to_msgpack<T: Serialize>(value: &T) -> Result<Vec<u8>, rmp_serde::encode::Error> {
    rmp_serde::to_vec_named(value)
}

/// Decodes an envelope from MessagePack.
pub fn from_msgpack<'a, T: Deserialize<'a>>(
    bytes: &'a [u8],
) -> Result<T, rmp_serde::decode::Error> {
    rmp_serde::from_slice(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip<T: Serialize + for<'a> Deserialize<'a> + PartialEq + std::fmt::Debug>(value: T) {
        let bytes = to_msgpack(&value).expect("encode");
        let back: T = from_msgpack(&bytes).expect("decode");
        assert_eq!(back, value);
    }

    fn publication() -> Publication {
        Publication {
            channel: "chat:x".into(),
            offset: 7,
            epoch: "e1".into(),
            ts: 1_700_000_000_000,
            data: Bytes::from_static(&[0x93, 1, 2, 3]),
            info: Some(PubInfo {
                user: "u".into(),
                client: "c".into(),
                info: Some(Bytes::from_static(&[0x80])),
            }),
        }
    }

    #[test]
    fn envelopes_round_trip() {
        round_trip(publication());
        round_trip(PublishRequest {
            data: Bytes::from_static(&[0xc0]),
            info: None,
            idempotency_key: Some("k".into()),
        });
        round_trip(HistoryRequest {
            limit: 10,
            since: Some(StreamPosition {
                offset: 3,
                epoch: "e".into(),
            }),
            reverse: false,
        });
        round_trip(RecoverReply {
            offset: 9,
            epoch: "e".into(),
            recovered: true,
            pubs: vec![publication()],
        });
        round_trip(BusResult::<PublishAck>::Ok(PublishAck {
            offset: 1,
            epoch: "e".into(),
        }));
        round_trip(BroadcastMember {
            id: "b1".into(),
            partitions: vec![0, 5],
            at_ms: 1,
            leaving: false,
        });
        round_trip(PartitionLease {
            owner: "b1".into(),
            at_ms: 2,
        });
        round_trip(BusResult::<PublishAck>::Err {
            error: WireError::new(ErrorCode::BAD_REQUEST, "nope"),
        });
    }

    #[test]
    fn reply_shapes_match_the_public_nats_contract() {
        let ok = to_msgpack(&BusResult::Ok(PublishAck {
            offset: 1,
            epoch: "e".into(),
        }))
        .expect("encode");
        let value = crate::value::decode_one(&ok).expect("msgpack");
        assert_eq!(value.to_string(), r#"{"offset": 1, "epoch": "e"}"#);
        let err = serde_json::to_string(&BusResult::<PublishAck>::Err {
            error: WireError::new(ErrorCode::BAD_REQUEST, "bad"),
        })
        .expect("json");
        assert_eq!(err, r#"{"error":{"code":107,"message":"bad"}}"#);
    }

    #[test]
    fn garbage_is_an_error() {
        assert!(from_msgpack::<Publication>(&[0xff, 0x00]).is_err());
        assert!(from_msgpack::<BusResult<PublishAck>>(&[0x81, 0xa1, b'x']).is_err());
    }
}
