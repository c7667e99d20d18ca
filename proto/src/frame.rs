//! Inbound WebSocket messages → individual MessagePack maps.
//!
//! Any failure here is a protocol error: the gateway closes with 4000 and
//! processes none of the frame's commands.

use rmpv::Value;

use crate::encoding::Encoding;
use crate::value;

/// What kind of WebSocket data message arrived.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameKind {
    Text,
    Binary,
}

/// Why a frame is a protocol error.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("a text frame on rt.v1.msgpack or a binary frame on rt.v1.json")]
    WrongFrameType,
    #[error("the frame carries no message")]
    Empty,
    #[error("{0}")]
    MsgPack(#[from] value::DecodeValueError),
    #[error("invalid JSON: {0}")]
    Json(#[from] serde_json::Error),
    #[error("invalid UTF-8 in a JSON frame")]
    Utf8,
    #[error("a message is not a map")]
    NotAMap,
}

/// Splits a frame into its messages, each a map.
pub fn decode(
    encoding: Encoding,
    kind: FrameKind,
    payload: &[u8],
) -> Result<Vec<Value>, FrameError> {
    let messages = match (encoding, kind) {
        (Encoding::MsgPack, FrameKind::Binary) => decode_msgpack(payload)?,
        (Encoding::Json, FrameKind::Text) => {
            let text = std::str::from_utf8(payload).map_err(|_| FrameError::Utf8)?;
            decode_json(text)?
        }
        _ => return Err(FrameError::WrongFrameType),
    };
    if messages.is_empty() {
        return Err(FrameError::Empty);
    }
    if messages.iter().any(|m| !m.is_map()) {
        return Err(FrameError::NotAMap);
    }
    Ok(messages)
}

fn decode_msgpack(mut payload: &[u8]) -> Result<Vec<Value>, FrameError> {
    let mut messages = Vec::new();
    while !payload.is_empty() {
        let (message, len) = value::decode_prefix(payload)?;
        messages.push(message);
        payload = &payload[len..];
    }
    Ok(messages)
}

fn decode_json(text: &str) -> Result<Vec<Value>, FrameError> {
    let mut messages = Vec::new();
    for line in text.split('\n') {
        if line.trim().is_empty() {
            continue;
        }
        let json: serde_json::Value = serde_json::from_str(line)?;
        if !json.is_object() {
            return Err(FrameError::NotAMap);
        }
        messages.push(value::from_json(&json));
    }
    Ok(messages)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mp(v: &Value) -> Vec<u8> {
        value::encode(v)
    }

    fn cmd(id: u64, op: &str) -> Value {
        Value::Map(vec![
            (Value::from("id"), Value::from(id)),
            (Value::from("op"), Value::from(op)),
        ])
    }

    #[test]
    fn several_msgpack_maps_in_one_frame() {
        let mut frame = mp(&cmd(1, "ping"));
        frame.extend(mp(&cmd(2, "ping")));
        let msgs = decode(Encoding::MsgPack, FrameKind::Binary, &frame).expect("decodes");
        assert_eq!(msgs, vec![cmd(1, "ping"), cmd(2, "ping")]);
    }

    #[test]
    fn several_json_lines_in_one_frame() {
        let frame = "{\"id\":1,\"op\":\"ping\"}\n{\"id\":2,\"op\":\"ping\"}\n";
        let msgs = decode(Encoding::Json, FrameKind::Text, frame.as_bytes()).expect("decodes");
        assert_eq!(msgs, vec![cmd(1, "ping"), cmd(2, "ping")]);
    }

    #[test]
    fn malformed_frames_are_errors() {
        let bad: [(Encoding, FrameKind, &[u8]); 9] = [
            (Encoding::MsgPack, FrameKind::Text, b"\x80"),
            (Encoding::Json, FrameKind::Binary, b"{}"),
            (Encoding::MsgPack, FrameKind::Binary, b""),
            (Encoding::MsgPack, FrameKind::Binary, b"\x81\xa2id"),
            (Encoding::MsgPack, FrameKind::Binary, b"\x01"),
            (
                Encoding::MsgPack,
                FrameKind::Binary,
                b"\xdf\xff\xff\xff\xff",
            ),
            (Encoding::Json, FrameKind::Text, b"[1,2]"),
            (Encoding::Json, FrameKind::Text, b"{\"id\":1"),
            (Encoding::Json, FrameKind::Text, b"  \n "),
        ];
        for (encoding, kind, payload) in bad {
            assert!(
                decode(encoding, kind, payload).is_err(),
                "{encoding:?} {payload:?}"
            );
        }
        assert!(matches!(
            decode(Encoding::Json, FrameKind::Text, b"\xff"),
            Err(FrameError::Utf8)
        ));
    }
}
