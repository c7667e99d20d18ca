//! The public RPC contract on NATS (PROTOCOL.md §4): requests on
//! `rt.rpc.<method>`, answered by any service in a queue group.
//!
//! Request `{data, user, client}`; reply `{data}` or `{error: {code,
//! message}}`; partial results are messages to the same reply subject with
//! header `Rt-Part: 1`, before the final one. `data` is spliced as raw
//! MessagePack both ways, so a payload is never re-encoded on its way
//! between a client and the method.

use bytes::Bytes;
use rmpv::Value;

use crate::Encoding;
use crate::internal::WireError;
use crate::outbound::{self, Out};
use crate::value;

/// Header marking a partial result.
pub const HEADER_PART: &str = "Rt-Part";
/// Header carrying the id a gateway gave the call (for cancellation).
pub const HEADER_REQUEST_ID: &str = "Rt-Request-Id";
/// Header carrying the caller's deadline, milliseconds since the Unix epoch.
pub const HEADER_DEADLINE: &str = "Rt-Deadline-Ms";

/// Why an RPC message could not be read.
#[derive(Debug, thiserror::Error)]
pub enum RpcDecodeError {
    #[error("{0}")]
    Value(#[from] value::DecodeValueError),
    #[error("not a map")]
    NotAMap,
    #[error("field {0} has the wrong type")]
    BadField(&'static str),
    #[error("neither data nor error in the reply")]
    Empty,
}

/// A request as a method sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct RpcCall {
    pub data: Value,
    pub user: String,
    pub client: String,
}

/// A reply (final or partial) as a caller sees it.
#[derive(Debug, Clone, PartialEq)]
pub enum RpcReply {
    /// Raw MessagePack of `data`.
    Data(Bytes),
    Error(WireError),
}

/// An id for one call, unique per gateway connection and usable as a subject token.
pub fn request_id(client: &str, seq: u64) -> String {
    format!("{client}-{seq:x}")
}

/// `{data, user, client}` with `data` (raw MessagePack) spliced in.
pub fn encode_request(data: Bytes, user: &str, client: &str) -> Vec<u8> {
    let out = Out::map([
        ("data", Out::Data(data)),
        ("user", Out::str(user.to_owned())),
        ("client", Out::str(client.to_owned())),
    ]);
    outbound::encode(&out, Encoding::MsgPack)
}

pub fn decode_request(bytes: &[u8]) -> Result<RpcCall, RpcDecodeError> {
    let Value::Map(fields) = value::decode_one(bytes)? else {
        return Err(RpcDecodeError::NotAMap);
    };
    let mut call = RpcCall {
        data: Value::Nil,
        user: String::new(),
        client: String::new(),
    };
    for (key, val) in fields {
        match key.as_str() {
            Some("data") => call.data = val,
            Some("user") => call.user = string(val, "user")?,
            Some("client") => call.client = string(val, "client")?,
            _ => {}
        }
    }
    Ok(call)
}

fn string(v: Value, field: &'static str) -> Result<String, RpcDecodeError> {
    match v {
        Value::Nil => Ok(String::new()),
        Value::String(s) => s.into_str().ok_or(RpcDecodeError::BadField(field)),
        _ => Err(RpcDecodeError::BadField(field)),
    }
}

/// `{data: value}`.
pub fn encode_reply_data(data: &Value) -> Vec<u8> {
    let mut out = Vec::with_capacity(16);
    let _ = rmp::encode::write_map_len(&mut out, 1);
    let _ = rmp::encode::write_str(&mut out, "data");
    value::write(&mut out, data);
    out
}

/// `{error: {code, message, retry_after_ms?}}`.
pub fn encode_reply_error(error: &WireError) -> Vec<u8> {
    let reply = crate::internal::BusResult::<()>::Err {
        error: error.clone(),
    };
    crate::internal::to_msgpack(&reply).unwrap_or_default()
}

/// Reads a reply, keeping `data` as raw bytes.
pub fn decode_reply(bytes: &[u8]) -> Result<RpcReply, RpcDecodeError> {
    for (key, raw) in value::map_entries_raw(bytes)? {
        match key.as_deref() {
            Some("data") => return Ok(RpcReply::Data(Bytes::copy_from_slice(raw))),
            Some("error") => {
                let error: WireError = crate::internal::from_msgpack(raw)
                    .map_err(|_| RpcDecodeError::BadField("error"))?;
                return Ok(RpcReply::Error(error));
            }
            _ => {}
        }
    }
    Err(RpcDecodeError::Empty)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ErrorCode;

    #[test]
    fn request_round_trip_splices_data() {
        let data = Bytes::from(value::encode(&Value::from("pw")));
        let bytes = encode_request(data, "u1", "c1");
        let call = decode_request(&bytes).expect("decodes");
        assert_eq!(call.data, Value::from("pw"));
        assert_eq!((call.user.as_str(), call.client.as_str()), ("u1", "c1"));
        assert!(decode_request(&[0x01]).is_err());
        assert!(decode_request(&[0x81, 0xa4, b'u', b's', b'e', b'r', 0x01]).is_err());
    }

    #[test]
    fn replies_round_trip() {
        let value_in = Value::Map(vec![(Value::from("n"), Value::from(3))]);
        let reply = decode_reply(&encode_reply_data(&value_in)).expect("decodes");
        assert_eq!(reply, RpcReply::Data(Bytes::from(value::encode(&value_in))));
        let error = WireError::new(ErrorCode::BUSY, "busy").with_retry_after(40);
        assert_eq!(
            decode_reply(&encode_reply_error(&error)).expect("decodes"),
            RpcReply::Error(error)
        );
        assert!(matches!(decode_reply(&[0x80]), Err(RpcDecodeError::Empty)));
        assert!(decode_reply(&[0xc1]).is_err());
    }
}
