//! Conversions between MessagePack values and JSON (PROTOCOL.md §1 "data", §6).
//!
//! Inside the platform every value is MessagePack. JSON exists only at the
//! edge, so these functions are called once per inbound JSON message and once
//! per publication per gateway for JSON subscribers, never per recipient.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use rmpv::Value;

/// Deepest nesting accepted when decoding untrusted MessagePack. rmpv counts
/// each container level twice, so this admits about 129 levels: as deep as
/// serde_json accepts, so JSON data never loses its JSON form to this limit.
pub const MAX_DEPTH: usize = 260;

/// Why bytes are not exactly one MessagePack value.
#[derive(Debug, thiserror::Error)]
pub enum DecodeValueError {
    #[error("invalid MessagePack: {0}")]
    Invalid(#[from] rmpv::decode::Error),
    #[error("invalid MessagePack: {0}")]
    Malformed(#[from] ScanError),
    #[error("{0} trailing bytes after the MessagePack value")]
    Trailing(usize),
}

/// Decodes exactly one MessagePack value from `bytes`, refusing trailing bytes.
pub fn decode_one(bytes: &[u8]) -> Result<Value, DecodeValueError> {
    let len = scan(bytes)?;
    if len != bytes.len() {
        return Err(DecodeValueError::Trailing(bytes.len() - len));
    }
    let mut cursor = bytes;
    Ok(rmpv::decode::read_value_with_max_depth(
        &mut cursor,
        MAX_DEPTH,
    )?)
}

/// Decodes the first MessagePack value of `bytes`; returns it and the bytes it took.
pub fn decode_prefix(bytes: &[u8]) -> Result<(Value, usize), DecodeValueError> {
    let len = scan(bytes)?;
    let mut cursor = &bytes[..len];
    Ok((
        rmpv::decode::read_value_with_max_depth(&mut cursor, MAX_DEPTH)?,
        len,
    ))
}

/// One entry of a map read by [`map_entries_raw`]: the key (when a string)
/// and the raw bytes of the value.
pub type RawEntry<'a> = (Option<String>, &'a [u8]);

/// The entries of a top-level map, without decoding the values.
pub fn map_entries_raw(bytes: &[u8]) -> Result<Vec<RawEntry<'_>>, DecodeValueError> {
    let total = scan(bytes)?;
    if total != bytes.len() {
        return Err(DecodeValueError::Trailing(bytes.len() - total));
    }
    let mut cursor = bytes;
    let len = rmp::decode::read_map_len(&mut cursor).map_err(|_| ScanError::Truncated)?;
    let mut entries = Vec::with_capacity(len.min(64) as usize);
    for _ in 0..len {
        let key_len = scan(cursor)?;
        let key = match decode_prefix(cursor)?.0 {
            Value::String(s) => s.into_str(),
            _ => None,
        };
        cursor = &cursor[key_len..];
        let value_len = scan(cursor)?;
        entries.push((key, &cursor[..value_len]));
        cursor = &cursor[value_len..];
    }
    Ok(entries)
}

/// Why [`scan`] refused bytes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScanError {
    #[error("truncated value")]
    Truncated,
    #[error("reserved marker 0xc1")]
    Reserved,
    #[error("nested deeper than {MAX_DEPTH} levels")]
    TooDeep,
}

/// Measures the first MessagePack value in `bytes` without allocating, and
/// checks it strictly: rmpv alone reads the never-used marker 0xc1 as nil,
/// which would let an invalid body through.
pub fn scan(bytes: &[u8]) -> Result<usize, ScanError> {
    // Items still to read at each open container level.
    let mut pending: Vec<u64> = Vec::new();
    let mut pos = 0usize;
    loop {
        let marker = *bytes.get(pos).ok_or(ScanError::Truncated)?;
        let be = |at: usize, n: usize| -> Result<u64, ScanError> {
            let field = bytes.get(at..at + n).ok_or(ScanError::Truncated)?;
            Ok(field.iter().fold(0u64, |acc, b| (acc << 8) | u64::from(*b)))
        };
        let (size, children): (u64, u64) = match marker {
            0x00..=0x7f | 0xe0..=0xff | 0xc0 | 0xc2 | 0xc3 => (1, 0),
            0x80..=0x8f => (1, 2 * u64::from(marker & 0x0f)),
            0x90..=0x9f => (1, u64::from(marker & 0x0f)),
            0xa0..=0xbf => (1 + u64::from(marker & 0x1f), 0),
            0xc1 => return Err(ScanError::Reserved),
            0xc4 | 0xd9 => (2 + be(pos + 1, 1)?, 0),
            0xc5 | 0xda => (3 + be(pos + 1, 2)?, 0),
            0xc6 | 0xdb => (5 + be(pos + 1, 4)?, 0),
            0xc7 => (3 + be(pos + 1, 1)?, 0),
            0xc8 => (4 + be(pos + 1, 2)?, 0),
            0xc9 => (6 + be(pos + 1, 4)?, 0),
            0xca => (5, 0),
            0xcb => (9, 0),
            0xcc | 0xd0 => (2, 0),
            0xcd | 0xd1 => (3, 0),
            0xce | 0xd2 => (5, 0),
            0xcf | 0xd3 => (9, 0),
            0xd4 => (3, 0),
            0xd5 => (4, 0),
            0xd6 => (6, 0),
            0xd7 => (10, 0),
            0xd8 => (18, 0),
            0xdc => (3, be(pos + 1, 2)?),
            0xdd => (5, be(pos + 1, 4)?),
            0xde => (3, 2 * be(pos + 1, 2)?),
            0xdf => (5, 2 * be(pos + 1, 4)?),
        };
        let end = u64::try_from(pos)
            .ok()
            .and_then(|p| p.checked_add(size))
            .filter(|end| *end <= bytes.len() as u64)
            .ok_or(ScanError::Truncated)?;
        pos = usize::try_from(end).map_err(|_| ScanError::Truncated)?;
        if children > 0 {
            if pending.len() >= MAX_DEPTH / 2 {
                return Err(ScanError::TooDeep);
            }
            pending.push(children);
            continue;
        }
        // A complete value: count it off its containers, closing finished ones.
        loop {
            match pending.last_mut() {
                None => return Ok(pos),
                Some(left) => {
                    *left -= 1;
                    if *left > 0 {
                        break;
                    }
                    pending.pop();
                }
            }
        }
    }
}

/// Encodes `value` as MessagePack.
pub fn encode(value: &Value) -> Vec<u8> {
    let mut out = Vec::new();
    write(&mut out, value);
    out
}

/// Appends the MessagePack encoding of `value` to `out`. Unlike
/// `rmpv::encode::write_value`, a str holding invalid UTF-8 stays a str, so
/// data passes through byte for byte.
pub fn write(out: &mut Vec<u8>, value: &Value) {
    // Writing into a Vec cannot fail; results are ignored on purpose.
    match value {
        Value::String(s) if s.as_str().is_none() => {
            let bytes = s.as_bytes();
            let _ = rmp::encode::write_str_len(out, u32::try_from(bytes.len()).unwrap_or(u32::MAX));
            out.extend_from_slice(bytes);
        }
        Value::Array(items) => {
            let _ =
                rmp::encode::write_array_len(out, u32::try_from(items.len()).unwrap_or(u32::MAX));
            for item in items {
                write(out, item);
            }
        }
        Value::Map(entries) => {
            let _ =
                rmp::encode::write_map_len(out, u32::try_from(entries.len()).unwrap_or(u32::MAX));
            for (k, v) in entries {
                write(out, k);
                write(out, v);
            }
        }
        other => {
            let _ = rmpv::encode::write_value(out, other);
        }
    }
}

/// Converts JSON to MessagePack: integers stay integers, other numbers become
/// float64, objects become maps with string keys.
pub fn from_json(json: &serde_json::Value) -> Value {
    match json {
        serde_json::Value::Null => Value::Nil,
        serde_json::Value::Bool(b) => Value::Boolean(*b),
        serde_json::Value::Number(n) => {
            if let Some(u) = n.as_u64() {
                Value::from(u)
            } else if let Some(i) = n.as_i64() {
                Value::from(i)
            } else {
                Value::F64(n.as_f64().unwrap_or(f64::NAN))
            }
        }
        serde_json::Value::String(s) => Value::from(s.as_str()),
        serde_json::Value::Array(items) => Value::Array(items.iter().map(from_json).collect()),
        serde_json::Value::Object(map) => Value::Map(
            map.iter()
                .map(|(k, v)| (Value::from(k.as_str()), from_json(v)))
                .collect(),
        ),
    }
}

/// How a `data` value is shown to a JSON client.
#[derive(Debug, Clone, PartialEq)]
pub enum JsonData {
    /// Sent as `data`.
    Plain(serde_json::Value),
    /// A top-level binary, sent as `data_b64`.
    Base64(String),
    /// No JSON form (ext values, odd map keys, invalid UTF-8): the whole
    /// MessagePack encoding, base64, sent as `data_mp64`.
    MsgpackBase64(String),
}

impl JsonData {
    /// The field name this form travels under.
    pub fn key(&self) -> &'static str {
        match self {
            JsonData::Plain(_) => "data",
            JsonData::Base64(_) => "data_b64",
            JsonData::MsgpackBase64(_) => "data_mp64",
        }
    }

    pub fn into_value(self) -> serde_json::Value {
        match self {
            JsonData::Plain(v) => v,
            JsonData::Base64(s) | JsonData::MsgpackBase64(s) => serde_json::Value::String(s),
        }
    }
}

/// Converts the raw MessagePack bytes of a `data` field for a JSON client.
pub fn data_to_json(raw: &[u8]) -> JsonData {
    match decode_one(raw) {
        Ok(Value::Binary(bin)) => JsonData::Base64(BASE64.encode(bin)),
        Ok(value) => match to_json_strict(&value) {
            Some(json) => JsonData::Plain(json),
            None => JsonData::MsgpackBase64(BASE64.encode(raw)),
        },
        Err(_) => JsonData::MsgpackBase64(BASE64.encode(raw)),
    }
}

/// JSON form of a value per §6, or `None` when it has none.
pub fn to_json_strict(value: &Value) -> Option<serde_json::Value> {
    Some(match value {
        Value::Nil => serde_json::Value::Null,
        Value::Boolean(b) => serde_json::Value::Bool(*b),
        Value::Integer(i) => {
            if let Some(u) = i.as_u64() {
                serde_json::Value::from(u)
            } else {
                serde_json::Value::from(i.as_i64()?)
            }
        }
        Value::F32(f) => float(f64::from(*f)),
        Value::F64(f) => float(*f),
        Value::String(s) => serde_json::Value::String(s.as_str()?.to_owned()),
        Value::Binary(b) => serde_json::Value::String(BASE64.encode(b)),
        Value::Array(items) => serde_json::Value::Array(
            items
                .iter()
                .map(to_json_strict)
                .collect::<Option<Vec<_>>>()?,
        ),
        Value::Map(entries) => {
            let mut map = serde_json::Map::with_capacity(entries.len());
            for (k, v) in entries {
                let key = match k {
                    Value::String(s) => s.as_str()?.to_owned(),
                    Value::Integer(i) => i.to_string(),
                    _ => return None,
                };
                map.insert(key, to_json_strict(v)?);
            }
            serde_json::Value::Object(map)
        }
        Value::Ext(..) => return None,
    })
}

/// JSON form of a non-`data` value (e.g. a token's `info` claim): never fails,
/// values without a JSON form become their closest reading or null.
pub fn to_json_lossy(value: &Value) -> serde_json::Value {
    if let Some(json) = to_json_strict(value) {
        return json;
    }
    match value {
        Value::Array(items) => serde_json::Value::Array(items.iter().map(to_json_lossy).collect()),
        Value::Map(entries) => serde_json::Value::Object(
            entries
                .iter()
                .map(|(k, v)| (lossy_key(k), to_json_lossy(v)))
                .collect(),
        ),
        Value::String(s) => serde_json::Value::String(String::from_utf8_lossy(s.as_bytes()).into()),
        _ => serde_json::Value::Null,
    }
}

fn lossy_key(key: &Value) -> String {
    match key {
        Value::String(s) => String::from_utf8_lossy(s.as_bytes()).into(),
        other => other.to_string(),
    }
}

fn float(f: f64) -> serde_json::Value {
    serde_json::Number::from_f64(f).map_or(serde_json::Value::Null, serde_json::Value::Number)
}

/// Decodes standard padded base64 (RFC 4648), as `data_b64` carries.
pub fn decode_base64(text: &str) -> Option<Vec<u8>> {
    BASE64.decode(text).ok()
}

/// Encodes bytes as standard padded base64.
pub fn encode_base64(bytes: &[u8]) -> String {
    BASE64.encode(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn raw(value: Value) -> Vec<u8> {
        encode(&value)
    }

    #[test]
    fn json_numbers_keep_their_kind() {
        let v: serde_json::Value = serde_json::from_str(
            r#"{"i": 1, "n": -2, "f": 1.0, "e": 1e3, "big": 18446744073709551615}"#,
        )
        .expect("json");
        let mp = from_json(&v);
        let get = |k: &str| {
            mp.as_map()
                .and_then(|m| m.iter().find(|(key, _)| key.as_str() == Some(k)))
                .map(|(_, v)| v.clone())
        };
        assert_eq!(get("i"), Some(Value::from(1u64)));
        assert_eq!(get("n"), Some(Value::from(-2i64)));
        assert_eq!(get("f"), Some(Value::F64(1.0)));
        assert_eq!(get("e"), Some(Value::F64(1000.0)));
        assert_eq!(get("big"), Some(Value::from(u64::MAX)));
    }

    #[test]
    fn data_for_json_clients_follows_the_rules() {
        assert_eq!(
            data_to_json(&raw(Value::from(5))),
            JsonData::Plain(json!(5))
        );
        assert_eq!(
            data_to_json(&raw(Value::Binary(vec![1, 2, 3]))),
            JsonData::Base64("AQID".into())
        );
        let nested = Value::Map(vec![
            (Value::from(7), Value::Binary(vec![255])),
            (Value::from("nan"), Value::F64(f64::NAN)),
            (Value::from("one"), Value::F64(1.0)),
        ]);
        let JsonData::Plain(json) = data_to_json(&raw(nested)) else {
            panic!("expected a plain JSON form");
        };
        assert_eq!(json, json!({"7": "/w==", "nan": null, "one": 1.0}));
        assert_eq!(serde_json::to_string(&json["one"]).expect("json"), "1.0");

        let ext = Value::Array(vec![Value::Ext(1, vec![0])]);
        let bytes = raw(ext);
        assert_eq!(
            data_to_json(&bytes),
            JsonData::MsgpackBase64(encode_base64(&bytes))
        );
        let bool_key = Value::Map(vec![(Value::Boolean(true), Value::Nil)]);
        assert!(matches!(
            data_to_json(&raw(bool_key)),
            JsonData::MsgpackBase64(_)
        ));
    }

    #[test]
    fn big_integers_pass_unchanged() {
        let big = (1u64 << 53) + 1;
        assert_eq!(
            data_to_json(&raw(Value::from(big))),
            JsonData::Plain(json!(big))
        );
        assert_eq!(
            data_to_json(&raw(Value::from(i64::MIN))),
            JsonData::Plain(json!(i64::MIN))
        );
    }

    #[test]
    fn decode_one_refuses_trailing_and_truncated() {
        let mut two = raw(Value::from(1));
        two.extend(raw(Value::from(2)));
        assert!(matches!(
            decode_one(&two),
            Err(DecodeValueError::Trailing(1))
        ));
        assert!(decode_one(&[0xdb, 0xff, 0xff, 0xff, 0xff]).is_err());
        assert!(decode_one(&[]).is_err());
    }

    #[test]
    fn scan_is_strict_and_measures() {
        assert_eq!(
            decode_one(&[0xc1]).map_err(|e| e.to_string()).err(),
            Some("invalid MessagePack: reserved marker 0xc1".into())
        );
        assert!(decode_one(&[0x91, 0xc1]).is_err());
        assert_eq!(scan(&[0x92, 0x01, 0x81, 0xa1, b'k', 0xc0, 0xff]), Ok(6));
        assert_eq!(scan(&[0x90]), Ok(1));
        assert_eq!(scan(&[0x80, 0x01]), Ok(1));
        assert_eq!(
            scan(&[0xdd, 0xff, 0xff, 0xff, 0xff, 0x01]),
            Err(ScanError::Truncated)
        );
        assert_eq!(
            scan(&[0xc6, 0xff, 0xff, 0xff, 0xff]),
            Err(ScanError::Truncated)
        );
        let nested_ok = [vec![0x91u8; 120], vec![0xc0]].concat();
        assert_eq!(scan(&nested_ok), Ok(121));
    }

    #[test]
    fn deep_nesting_is_an_error_not_a_stack_overflow() {
        let deep = vec![0x91u8; 100_000];
        assert!(decode_one(&deep).is_err());
    }
}
