//! Server → client messages: replies and pushes, built as an [`Out`] tree and
//! encoded for either wire encoding.
//!
//! `data` and passthrough values stay raw MessagePack inside the tree, so the
//! MessagePack encoding splices them unchanged and only the JSON encoding
//! converts them (once per message, however many subscribers receive it).

use std::borrow::Cow;

use bytes::Bytes;

use crate::codes::ErrorCode;
use crate::encoding::Encoding;
use crate::internal::{PubInfo, Publication};
use crate::session::{PresenceReply, PresentClient};
use crate::value;

/// One outbound value.
#[derive(Debug, Clone, PartialEq)]
pub enum Out {
    Nil,
    Bool(bool),
    UInt(u64),
    Str(Cow<'static, str>),
    Array(Vec<Out>),
    Map(Vec<(Cow<'static, str>, Out)>),
    /// Raw MessagePack of a `data` field: JSON clients get `data`, `data_b64` or `data_mp64`.
    Data(Bytes),
    /// Raw MessagePack of any other passthrough value (an `info` map).
    Raw(Bytes),
}

impl Out {
    pub fn str(s: impl Into<Cow<'static, str>>) -> Self {
        Out::Str(s.into())
    }

    /// A map from `(key, value)` pairs with static keys.
    pub fn map<const N: usize>(entries: [(&'static str, Out); N]) -> Self {
        Out::Map(
            entries
                .into_iter()
                .map(|(k, v)| (Cow::Borrowed(k), v))
                .collect(),
        )
    }

    /// Appends an entry when `self` is a map (builder helper for optional fields).
    pub fn with(mut self, key: &'static str, value: Out) -> Self {
        if let Out::Map(entries) = &mut self {
            entries.push((Cow::Borrowed(key), value));
        }
        self
    }
}

/// An error as a client sees it in a reply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErrorBody {
    pub code: ErrorCode,
    pub message: String,
    pub retry_after_ms: Option<u64>,
}

impl ErrorBody {
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

    pub fn to_out(&self) -> Out {
        let out = Out::map([
            ("code", Out::UInt(u64::from(self.code.0))),
            ("message", Out::str(self.message.clone())),
            ("temporary", Out::Bool(self.code.is_temporary())),
        ]);
        match self.retry_after_ms {
            Some(ms) => out.with("retry_after_ms", Out::UInt(ms)),
            None => out,
        }
    }
}

/// `{"id": N, "ok": result}`.
pub fn reply_ok(id: u32, result: Out) -> Out {
    Out::map([("id", Out::UInt(u64::from(id))), ("ok", result)])
}

/// `{"id": N, "error": {...}}`.
pub fn reply_error(id: u32, error: &ErrorBody) -> Out {
    Out::map([("id", Out::UInt(u64::from(id))), ("error", error.to_out())])
}

/// The fields of a Pub (without `push`), as in `history` and SubResult `pubs`.
pub fn publication(p: &Publication) -> Out {
    let mut entries: Vec<(Cow<'static, str>, Out)> = Vec::with_capacity(6);
    push_publication_fields(&mut entries, p);
    Out::Map(entries)
}

/// `{"push": "pub", ...Pub}`.
pub fn push_pub(p: &Publication) -> Out {
    let mut entries: Vec<(Cow<'static, str>, Out)> = Vec::with_capacity(7);
    entries.push((Cow::Borrowed("push"), Out::str("pub")));
    push_publication_fields(&mut entries, p);
    Out::Map(entries)
}

fn push_publication_fields(entries: &mut Vec<(Cow<'static, str>, Out)>, p: &Publication) {
    entries.push((Cow::Borrowed("channel"), Out::str(p.channel.clone())));
    entries.push((Cow::Borrowed("offset"), Out::UInt(p.offset)));
    entries.push((Cow::Borrowed("data"), Out::Data(p.data.clone())));
    if let Some(info) = &p.info {
        entries.push((Cow::Borrowed("info"), pub_info(info)));
    }
    entries.push((Cow::Borrowed("ts"), Out::UInt(p.ts)));
}

fn pub_info(info: &PubInfo) -> Out {
    let out = Out::map([
        ("user", Out::str(info.user.clone())),
        ("client", Out::str(info.client.clone())),
    ]);
    match &info.info {
        Some(raw) => out.with("info", Out::Raw(raw.clone())),
        None => out,
    }
}

/// `{"push": "join"|"leave", channel, info: {user, client, info?}}`.
pub fn push_presence(join: bool, channel: &str, client: &PresentClient) -> Out {
    Out::map([
        ("push", Out::str(if join { "join" } else { "leave" })),
        ("channel", Out::str(channel.to_owned())),
        ("info", client_info(client)),
    ])
}

/// The result of `presence`: `{clients: {client: {user, info?}}}`, or
/// `{count}` when the channel is too large to list.
pub fn presence(reply: &PresenceReply) -> Out {
    match &reply.clients {
        Some(clients) => Out::map([(
            "clients",
            Out::Map(
                clients
                    .iter()
                    .map(|c| {
                        let entry = Out::map([("user", Out::str(c.user.clone()))]);
                        let entry = match &c.info {
                            Some(raw) => entry.with("info", Out::Raw(raw.clone())),
                            None => entry,
                        };
                        (Cow::Owned(c.client.clone()), entry)
                    })
                    .collect(),
            ),
        )]),
        None => Out::map([("count", Out::UInt(reply.count))]),
    }
}

fn client_info(client: &PresentClient) -> Out {
    let out = Out::map([
        ("user", Out::str(client.user.clone())),
        ("client", Out::str(client.client.clone())),
    ]);
    match &client.info {
        Some(raw) => out.with("info", Out::Raw(raw.clone())),
        None => out,
    }
}

/// `{"push": "unsubscribed", channel, code, reason}`.
pub fn push_unsubscribed(channel: &str, code: ErrorCode, reason: &str) -> Out {
    Out::map([
        ("push", Out::str("unsubscribed")),
        ("channel", Out::str(channel.to_owned())),
        ("code", Out::UInt(u64::from(code.0))),
        ("reason", Out::str(reason.to_owned())),
    ])
}

/// `{"push": "rpc_part", id, data}`: a partial result of call `id`.
pub fn push_rpc_part(id: u32, data: Bytes) -> Out {
    Out::map([
        ("push", Out::str("rpc_part")),
        ("id", Out::UInt(u64::from(id))),
        ("data", Out::Data(data)),
    ])
}

/// `{"push": "disconnect", code, reason, reconnect, retry_after_ms?}`.
pub fn push_disconnect(
    code: u16,
    reason: &str,
    reconnect: bool,
    retry_after_ms: Option<u64>,
) -> Out {
    let out = Out::map([
        ("push", Out::str("disconnect")),
        ("code", Out::UInt(u64::from(code))),
        ("reason", Out::str(reason.to_owned())),
        ("reconnect", Out::Bool(reconnect)),
    ]);
    match retry_after_ms {
        Some(ms) => out.with("retry_after_ms", Out::UInt(ms)),
        None => out,
    }
}

/// Encodes one message. A frame carrying several is the concatenation of
/// their encodings joined by [`separator`].
pub fn encode(out: &Out, encoding: Encoding) -> Vec<u8> {
    match encoding {
        Encoding::MsgPack => {
            let mut buf = Vec::with_capacity(64);
            write_msgpack(&mut buf, out);
            buf
        }
        Encoding::Json => {
            let json = to_json(out);
            // Serializing a serde_json::Value into a Vec cannot fail.
            serde_json::to_vec(&json).unwrap_or_default()
        }
    }
}

/// Several messages as the bytes of one frame, separated per the encoding.
pub fn encode_many(messages: &[Out], encoding: Encoding) -> Vec<u8> {
    let mut buf = Vec::new();
    for (i, message) in messages.iter().enumerate() {
        if i > 0 {
            buf.extend_from_slice(separator(encoding));
        }
        buf.extend_from_slice(&encode(message, encoding));
    }
    buf
}

/// What goes between two messages in one frame.
pub fn separator(encoding: Encoding) -> &'static [u8] {
    match encoding {
        Encoding::MsgPack => b"",
        Encoding::Json => b"\n",
    }
}

fn write_msgpack(buf: &mut Vec<u8>, out: &Out) {
    // Writes into a Vec cannot fail; the results are ignored on purpose.
    match out {
        Out::Nil => {
            let _ = rmp::encode::write_nil(buf);
        }
        Out::Bool(b) => {
            let _ = rmp::encode::write_bool(buf, *b);
        }
        Out::UInt(u) => {
            let _ = rmp::encode::write_uint(buf, *u);
        }
        Out::Str(s) => {
            let _ = rmp::encode::write_str(buf, s);
        }
        Out::Array(items) => {
            let _ = rmp::encode::write_array_len(buf, len_u32(items.len()));
            for item in items {
                write_msgpack(buf, item);
            }
        }
        Out::Map(entries) => {
            let _ = rmp::encode::write_map_len(buf, len_u32(entries.len()));
            for (k, v) in entries {
                let _ = rmp::encode::write_str(buf, k);
                write_msgpack(buf, v);
            }
        }
        Out::Data(raw) | Out::Raw(raw) => buf.extend_from_slice(raw),
    }
}

fn len_u32(len: usize) -> u32 {
    u32::try_from(len).unwrap_or(u32::MAX)
}

fn to_json(out: &Out) -> serde_json::Value {
    match out {
        Out::Nil => serde_json::Value::Null,
        Out::Bool(b) => serde_json::Value::Bool(*b),
        Out::UInt(u) => serde_json::Value::from(*u),
        Out::Str(s) => serde_json::Value::String(s.to_string()),
        Out::Array(items) => serde_json::Value::Array(items.iter().map(to_json).collect()),
        Out::Map(entries) => {
            let mut map = serde_json::Map::with_capacity(entries.len());
            for (k, v) in entries {
                match v {
                    Out::Data(raw) => {
                        let data = value::data_to_json(raw);
                        map.insert(data.key().to_owned(), data.into_value());
                    }
                    other => {
                        map.insert(k.to_string(), to_json(other));
                    }
                }
            }
            serde_json::Value::Object(map)
        }
        Out::Data(raw) => value::data_to_json(raw).into_value(),
        Out::Raw(raw) => match value::decode_one(raw) {
            Ok(v) => value::to_json_lossy(&v),
            Err(_) => serde_json::Value::Null,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rmpv::Value;

    fn publication(data: Value) -> Publication {
        Publication {
            channel: "chat:a".into(),
            offset: 3,
            epoch: "ep".into(),
            ts: 42,
            data: Bytes::from(value::encode(&data)),
            info: Some(PubInfo {
                user: "u1".into(),
                client: "c1".into(),
                info: None,
            }),
        }
    }

    #[test]
    fn pub_push_in_json() {
        let bytes = encode(&push_pub(&publication(Value::from("hi"))), Encoding::Json);
        let json: serde_json::Value = serde_json::from_slice(&bytes).expect("json");
        assert_eq!(
            json,
            serde_json::json!({"push": "pub", "channel": "chat:a", "offset": 3, "data": "hi",
                "info": {"user": "u1", "client": "c1"}, "ts": 42})
        );
        assert!(!bytes.contains(&b'\n'), "one message is one line");
    }

    #[test]
    fn pub_push_binary_data_in_json_is_data_b64() {
        let bytes = encode(
            &push_pub(&publication(Value::Binary(vec![0, 1]))),
            Encoding::Json,
        );
        let json: serde_json::Value = serde_json::from_slice(&bytes).expect("json");
        assert_eq!(json["data_b64"], "AAE=");
        assert!(json.get("data").is_none());
    }

    #[test]
    fn pub_push_in_msgpack_splices_data() {
        let data = Value::Map(vec![(Value::from(1), Value::Ext(5, vec![9]))]);
        let bytes = encode(&push_pub(&publication(data.clone())), Encoding::MsgPack);
        let decoded = value::decode_one(&bytes).expect("one msgpack map");
        let map = decoded.as_map().expect("map");
        let got = map
            .iter()
            .find(|(k, _)| k.as_str() == Some("data"))
            .map(|(_, v)| v.clone());
        assert_eq!(got, Some(data));
    }

    #[test]
    fn error_reply_carries_temporary_and_retry() {
        let body = ErrorBody::new(ErrorCode::BUSY, "busy").with_retry_after(250);
        let bytes = encode(&reply_error(9, &body), Encoding::Json);
        let json: serde_json::Value = serde_json::from_slice(&bytes).expect("json");
        assert_eq!(
            json,
            serde_json::json!({"id": 9, "error": {"code": 113, "message": "busy",
                "temporary": true, "retry_after_ms": 250}})
        );
    }
}
