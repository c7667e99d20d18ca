//! Client → server commands (PROTOCOL.md §1 "Commands").
//!
//! Two steps, because they fail differently: [`Envelope::from_value`] checks
//! what every message must have (a map with a valid `id`) and its failure is a
//! protocol error (close 4000); [`Command::parse`] reads the op's arguments and
//! its failure is an error reply (104 or 107).

use bytes::Bytes;
use rmpv::Value;

use crate::codes::ErrorCode;
use crate::encoding::Encoding;
use crate::internal::StreamPosition;
use crate::value;

/// A decoded message before its op is read.
#[derive(Debug, Clone, PartialEq)]
pub struct Envelope {
    /// 0 means fire and forget: no reply at all.
    pub id: u32,
    /// `None` when `op` is missing or not a string.
    pub op: Option<String>,
    fields: Vec<(Value, Value)>,
}

/// Why a message breaks the protocol (close 4000, no reply).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProtocolError {
    #[error("message is not a map")]
    NotAMap,
    #[error("id is not an integer in u32 range")]
    BadId,
}

impl Envelope {
    pub fn from_value(value: Value) -> Result<Self, ProtocolError> {
        let Value::Map(fields) = value else {
            return Err(ProtocolError::NotAMap);
        };
        let id = match field(&fields, "id") {
            None | Some(Value::Nil) => 0,
            Some(Value::Integer(i)) => i
                .as_u64()
                .and_then(|u| u32::try_from(u).ok())
                .ok_or(ProtocolError::BadId)?,
            Some(_) => return Err(ProtocolError::BadId),
        };
        let op = match field(&fields, "op") {
            Some(Value::String(s)) => s.as_str().map(str::to_owned),
            _ => None,
        };
        Ok(Self { id, op, fields })
    }

    fn get(&self, key: &str) -> Option<&Value> {
        field(&self.fields, key)
    }
}

fn field<'a>(fields: &'a [(Value, Value)], key: &str) -> Option<&'a Value> {
    fields
        .iter()
        .find(|(k, _)| k.as_str() == Some(key))
        .map(|(_, v)| v)
}

/// A command that decoded but cannot run: an error reply, never a close
/// (except for a failed first `connect`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct CommandError {
    pub code: ErrorCode,
    pub message: String,
}

impl CommandError {
    fn bad(message: impl Into<String>) -> Self {
        Self {
            code: ErrorCode::BAD_REQUEST,
            message: message.into(),
        }
    }
}

/// One entry of `connect`'s `subs`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SubRequest {
    /// Subscribe, recovering from `since` when given.
    Valid { since: Option<StreamPosition> },
    /// This channel fails with the error; the others proceed.
    Invalid(CommandError),
}

#[derive(Debug, Clone, PartialEq)]
pub struct ConnectArgs {
    pub token: Option<String>,
    pub session: Option<String>,
    pub subs: Vec<(String, SubRequest)>,
    pub name: Option<String>,
    pub version: Option<String>,
}

/// A command with typed arguments. Channel names are still raw strings here:
/// the gateway validates them, because their namespace decides the error.
#[derive(Debug, Clone, PartialEq)]
pub enum Command {
    Connect(ConnectArgs),
    Subscribe {
        channel: String,
        since: Option<StreamPosition>,
        token: Option<String>,
    },
    Unsubscribe {
        channel: String,
    },
    Publish {
        channel: String,
        /// Raw MessagePack of the data.
        data: Bytes,
        idempotency_key: Option<String>,
    },
    History {
        channel: String,
        limit: Option<u64>,
        since: Option<StreamPosition>,
        reverse: bool,
    },
    Presence {
        channel: String,
    },
    Rpc {
        method: String,
        data: Bytes,
        /// Extension: a deadline shorter than the server's default.
        timeout_ms: Option<u64>,
    },
    Refresh {
        token: String,
    },
    Ping,
}

impl Command {
    /// Reads the op and its arguments. `encoding` matters for `data_b64`,
    /// which JSON clients may send instead of `data`.
    pub fn parse(envelope: &Envelope, encoding: Encoding) -> Result<Command, CommandError> {
        let op = envelope
            .op
            .as_deref()
            .ok_or_else(|| CommandError::bad("missing or non-string op"))?;
        let e = envelope;
        Ok(match op {
            "connect" => Command::Connect(ConnectArgs {
                token: opt_str(e, "token")?,
                session: opt_str(e, "session")?,
                subs: subs(e)?,
                name: opt_str(e, "name")?,
                version: opt_str(e, "version")?,
            }),
            "subscribe" => Command::Subscribe {
                channel: req_str(e, "channel")?,
                since: position(e.get("since"), "since")?,
                token: opt_str(e, "token")?,
            },
            "unsubscribe" => Command::Unsubscribe {
                channel: req_str(e, "channel")?,
            },
            "publish" => Command::Publish {
                channel: req_str(e, "channel")?,
                data: data(e, encoding, true)?,
                idempotency_key: opt_str(e, "idempotency_key")?,
            },
            "history" => {
                let since = position(e.get("since"), "since")?;
                let reverse = opt_bool(e, "reverse")?.unwrap_or(false);
                if reverse && since.is_some() {
                    return Err(CommandError::bad("reverse cannot be combined with since"));
                }
                Command::History {
                    channel: req_str(e, "channel")?,
                    limit: opt_u64(e, "limit")?,
                    since,
                    reverse,
                }
            }
            "presence" => Command::Presence {
                channel: req_str(e, "channel")?,
            },
            "rpc" => Command::Rpc {
                method: req_str(e, "method")?,
                data: data(e, encoding, false)?,
                timeout_ms: opt_u64(e, "timeout_ms")?,
            },
            "refresh" => Command::Refresh {
                token: req_str(e, "token")?,
            },
            "ping" => Command::Ping,
            other => {
                return Err(CommandError {
                    code: ErrorCode::UNKNOWN_OP,
                    message: format!("unknown op {other:?}"),
                });
            }
        })
    }
}

fn opt_str(e: &Envelope, key: &str) -> Result<Option<String>, CommandError> {
    match e.get(key) {
        None | Some(Value::Nil) => Ok(None),
        Some(Value::String(s)) => s
            .as_str()
            .map(|s| Some(s.to_owned()))
            .ok_or_else(|| CommandError::bad(format!("{key} is not valid UTF-8"))),
        Some(_) => Err(CommandError::bad(format!("{key} must be a string"))),
    }
}

fn req_str(e: &Envelope, key: &str) -> Result<String, CommandError> {
    opt_str(e, key)?.ok_or_else(|| CommandError::bad(format!("{key} is required")))
}

fn opt_bool(e: &Envelope, key: &str) -> Result<Option<bool>, CommandError> {
    match e.get(key) {
        None | Some(Value::Nil) => Ok(None),
        Some(Value::Boolean(b)) => Ok(Some(*b)),
        Some(_) => Err(CommandError::bad(format!("{key} must be a boolean"))),
    }
}

fn opt_u64(e: &Envelope, key: &str) -> Result<Option<u64>, CommandError> {
    match e.get(key) {
        None | Some(Value::Nil) => Ok(None),
        Some(v) => as_u64(v, key).map(Some),
    }
}

fn as_u64(v: &Value, key: &str) -> Result<u64, CommandError> {
    match v {
        Value::Integer(i) => i
            .as_u64()
            .ok_or_else(|| CommandError::bad(format!("{key} must be a non-negative integer"))),
        _ => Err(CommandError::bad(format!("{key} must be an integer"))),
    }
}

/// `{offset, epoch}`; both are required when the map is given.
fn position(v: Option<&Value>, key: &str) -> Result<Option<StreamPosition>, CommandError> {
    let fields = match v {
        None | Some(Value::Nil) => return Ok(None),
        Some(Value::Map(fields)) => fields,
        Some(_) => return Err(CommandError::bad(format!("{key} must be a map"))),
    };
    let offset = field(fields, "offset");
    let epoch = field(fields, "epoch");
    match (offset, epoch) {
        (Some(offset), Some(Value::String(epoch))) => Ok(Some(StreamPosition {
            offset: as_u64(offset, "offset")?,
            epoch: epoch
                .as_str()
                .ok_or_else(|| CommandError::bad("epoch is not valid UTF-8"))?
                .to_owned(),
        })),
        (Some(_), Some(_)) => Err(CommandError::bad("epoch must be a string")),
        _ => Err(CommandError::bad(format!(
            "{key} needs both offset and epoch"
        ))),
    }
}

fn subs(e: &Envelope) -> Result<Vec<(String, SubRequest)>, CommandError> {
    let entries = match e.get("subs") {
        None | Some(Value::Nil) => return Ok(Vec::new()),
        Some(Value::Map(entries)) => entries,
        Some(_) => return Err(CommandError::bad("subs must be a map")),
    };
    let mut out = Vec::with_capacity(entries.len());
    for (channel, spec) in entries {
        let Some(channel) = channel.as_str() else {
            return Err(CommandError::bad("subs keys must be channel names"));
        };
        let request = match spec {
            Value::Map(fields) if fields.is_empty() => SubRequest::Valid { since: None },
            Value::Map(fields) => {
                let has_offset = field(fields, "offset").is_some_and(|v| !v.is_nil());
                let has_epoch = field(fields, "epoch").is_some_and(|v| !v.is_nil());
                if !has_offset && !has_epoch {
                    SubRequest::Valid { since: None }
                } else {
                    match position(Some(spec), "subs entry") {
                        Ok(since) => SubRequest::Valid { since },
                        Err(err) => SubRequest::Invalid(err),
                    }
                }
            }
            _ => SubRequest::Invalid(CommandError::bad("subs entry must be a map")),
        };
        out.push((channel.to_owned(), request));
    }
    Ok(out)
}

fn data(e: &Envelope, encoding: Encoding, required: bool) -> Result<Bytes, CommandError> {
    data_field(&e.fields, encoding, required)
}

/// `data` (any value) or, in JSON, `data_b64`, as raw MessagePack. Missing
/// data is nil unless `required`. Shared with the HTTP API's bodies.
pub fn data_field(
    fields: &[(Value, Value)],
    encoding: Encoding,
    required: bool,
) -> Result<Bytes, CommandError> {
    let b64 = match encoding {
        Encoding::Json => field(fields, "data_b64"),
        Encoding::MsgPack => None,
    };
    match (field(fields, "data"), b64) {
        (Some(_), Some(_)) => Err(CommandError::bad("send data or data_b64, not both")),
        (Some(v), None) => Ok(Bytes::from(value::encode(v))),
        (None, Some(Value::String(s))) => {
            let bytes = s
                .as_str()
                .and_then(value::decode_base64)
                .ok_or_else(|| CommandError::bad("data_b64 is not valid base64"))?;
            Ok(Bytes::from(value::encode(&Value::Binary(bytes))))
        }
        (None, Some(_)) => Err(CommandError::bad("data_b64 must be a string")),
        (None, None) if required => Err(CommandError::bad("data is required")),
        (None, None) => Ok(Bytes::from(value::encode(&Value::Nil))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::{self, FrameKind};

    fn json(text: &str) -> Result<Command, CommandError> {
        let values =
            frame::decode(Encoding::Json, FrameKind::Text, text.as_bytes()).expect("frame");
        let env = Envelope::from_value(values.into_iter().next().expect("one")).expect("envelope");
        Command::parse(&env, Encoding::Json)
    }

    fn envelope(text: &str) -> Result<Envelope, ProtocolError> {
        let values =
            frame::decode(Encoding::Json, FrameKind::Text, text.as_bytes()).expect("frame");
        Envelope::from_value(values.into_iter().next().expect("one"))
    }

    #[test]
    fn ids() {
        assert_eq!(envelope(r#"{"op":"ping"}"#).map(|e| e.id), Ok(0));
        assert_eq!(envelope(r#"{"id":null,"op":"ping"}"#).map(|e| e.id), Ok(0));
        assert_eq!(envelope(r#"{"id":4294967295}"#).map(|e| e.id), Ok(u32::MAX));
        for bad in [
            r#"{"id":1.0}"#,
            r#"{"id":1e2}"#,
            r#"{"id":-1}"#,
            r#"{"id":4294967296}"#,
            r#"{"id":"1"}"#,
        ] {
            assert_eq!(envelope(bad), Err(ProtocolError::BadId), "{bad}");
        }
    }

    #[test]
    fn ops_and_arguments() {
        assert_eq!(json(r#"{"id":1,"op":"ping"}"#), Ok(Command::Ping));
        assert_eq!(
            json(
                r#"{"id":1,"op":"subscribe","channel":"a","since":{"offset":3,"epoch":"e"},"x":1}"#
            ),
            Ok(Command::Subscribe {
                channel: "a".into(),
                since: Some(StreamPosition {
                    offset: 3,
                    epoch: "e".into()
                }),
                token: None
            })
        );
        assert_eq!(
            json(r#"{"id":1,"op":"nope"}"#).map_err(|e| e.code),
            Err(ErrorCode::UNKNOWN_OP)
        );
        for bad in [
            r#"{"id":1}"#,
            r#"{"id":1,"op":5}"#,
            r#"{"id":1,"op":"subscribe"}"#,
            r#"{"id":1,"op":"subscribe","channel":5}"#,
            r#"{"id":1,"op":"subscribe","channel":"a","since":{"offset":1}}"#,
            r#"{"id":1,"op":"publish","channel":"a"}"#,
            r#"{"id":1,"op":"publish","channel":"a","data":1,"data_b64":"AA=="}"#,
            r#"{"id":1,"op":"publish","channel":"a","data_b64":"!!"}"#,
            r#"{"id":1,"op":"history","channel":"a","limit":1.0}"#,
            r#"{"id":1,"op":"history","channel":"a","limit":-1}"#,
            r#"{"id":1,"op":"history","channel":"a","reverse":true,"since":{"offset":1,"epoch":"e"}}"#,
            r#"{"id":1,"op":"connect","subs":[]}"#,
        ] {
            assert_eq!(
                json(bad).map_err(|e| e.code),
                Err(ErrorCode::BAD_REQUEST),
                "{bad}"
            );
        }
    }

    #[test]
    fn publish_data_b64_becomes_binary() {
        let Ok(Command::Publish { data, .. }) =
            json(r#"{"id":1,"op":"publish","channel":"a","data_b64":"AAE="}"#)
        else {
            panic!("expected publish");
        };
        assert_eq!(
            value::decode_one(&data).expect("msgpack"),
            Value::Binary(vec![0, 1])
        );
    }

    #[test]
    fn connect_subs_fail_per_channel() {
        let Ok(Command::Connect(args)) = json(
            r#"{"id":1,"op":"connect","subs":{"a":{},"b":{"offset":1},"c":{"offset":2,"epoch":"e"},"d":7}}"#,
        ) else {
            panic!("expected connect");
        };
        assert_eq!(args.subs.len(), 4);
        assert_eq!(
            args.subs[0],
            ("a".into(), SubRequest::Valid { since: None })
        );
        assert!(
            matches!(&args.subs[1].1, SubRequest::Invalid(e) if e.code == ErrorCode::BAD_REQUEST)
        );
        assert_eq!(
            args.subs[2].1,
            SubRequest::Valid {
                since: Some(StreamPosition {
                    offset: 2,
                    epoch: "e".into()
                })
            }
        );
        assert!(matches!(&args.subs[3].1, SubRequest::Invalid(_)));
    }
}
