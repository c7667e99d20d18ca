//! The client side of the wire (PROTOCOL.md §1): encodings, the commands rtload sends,
//! splitting a frame into messages, and a zero-copy view of what the server sends back.
//!
//! The hot path (a subscriber decoding `pub` pushes) allocates nothing per message:
//! frames are split by scanning, each message is decoded into [`Incoming`] borrowing from
//! the frame, and `data` is read only for the two integers rtload stamps into it.

mod stamp;

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fmt;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio_tungstenite::tungstenite::Message;

use crate::error::Result;

/// How messages are encoded on a WebSocket, chosen by subprotocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Encoding {
    /// `rt.v1.msgpack`: binary frames of concatenated MessagePack maps.
    Msgpack,
    /// `rt.v1.json`: text frames of JSON objects, one per line.
    Json,
}

impl Encoding {
    pub fn subprotocol(self) -> &'static str {
        match self {
            Encoding::Msgpack => "rt.v1.msgpack",
            Encoding::Json => "rt.v1.json",
        }
    }

    /// Encodes one command as a WebSocket message of this encoding.
    pub fn encode<T: Serialize>(self, value: &T) -> Result<Message> {
        Ok(match self {
            Encoding::Msgpack => Message::binary(rmp_serde::to_vec_named(value)?),
            Encoding::Json => Message::text(serde_json::to_string(value)?),
        })
    }
}

impl fmt::Display for Encoding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Encoding::Msgpack => "msgpack",
            Encoding::Json => "json",
        })
    }
}

/// A command without arguments (`connect` anonymously, `ping`).
#[derive(Serialize, Debug)]
pub struct Bare {
    pub id: u32,
    pub op: &'static str,
}

/// `connect` with a session to resume and channels to subscribe to in the same round trip
/// (PROTOCOL.md §1): `subs` maps each channel to the last position seen (`{offset,
/// epoch}`: recover from there) or to `{}` (subscribe from now).
#[derive(Serialize, Debug)]
pub struct Connect<'a> {
    pub id: u32,
    pub op: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub session: Option<&'a str>,
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub subs: &'a BTreeMap<String, Since>,
}

/// A position in a channel to recover from; both absent means "from now".
#[derive(Serialize, Debug, Default, Clone, PartialEq, Eq)]
pub struct Since {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub offset: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub epoch: Option<String>,
}

/// A command whose only argument is a channel (`subscribe`, `unsubscribe`).
#[derive(Serialize, Debug)]
pub struct OnChannel<'a> {
    pub id: u32,
    pub op: &'static str,
    pub channel: &'a str,
}

/// `publish` over the WebSocket.
#[derive(Serialize, Debug)]
pub struct Publish<'a> {
    pub id: u32,
    pub op: &'static str,
    pub channel: &'a str,
    pub data: Stamp<'a>,
}

/// `rpc`: a method and its `data`, any JSON value (MessagePack clients send its MessagePack
/// form: JSON integers become integers, other numbers float64). No `data` at all is nil.
#[derive(Serialize, Debug)]
pub struct Rpc<'a> {
    pub id: u32,
    pub op: &'static str,
    pub method: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data: Option<&'a serde_json::Value>,
}

/// Request ids for one connection: never 0 (fire and forget), wrapping after u32::MAX.
pub fn next_id(id: &mut u32) -> u32 {
    *id = id.checked_add(1).unwrap_or(1);
    *id
}

/// The `data` rtload publishes: the intended send time (µs since the Unix epoch), a
/// sequence number, and padding to reach the requested payload size.
#[derive(Serialize, Debug, Clone, Copy)]
pub struct Stamp<'a> {
    pub t: u64,
    pub seq: u64,
    pub pad: &'a str,
}

/// One message from the server, as much of it as rtload reads. Unknown fields are skipped.
#[derive(Deserialize, Debug, Default)]
pub struct Incoming<'a> {
    #[serde(default)]
    pub id: Option<u64>,
    #[serde(default, borrow)]
    pub push: Option<Cow<'a, str>>,
    #[serde(default)]
    pub offset: Option<u64>,
    #[serde(default)]
    pub data: Option<StampView>,
    #[serde(default)]
    pub ok: Option<OkBody>,
    #[serde(default, borrow)]
    pub error: Option<ErrorBody<'a>>,
    /// `code` of a `disconnect` or `unsubscribed` push.
    #[serde(default)]
    pub code: Option<u32>,
    /// `retry_after_ms` of a `disconnect` push (4005 draining, 4007 overloaded).
    #[serde(default, deserialize_with = "stamp::lenient_u64")]
    pub retry_after_ms: Option<u64>,
}

impl Incoming<'_> {
    pub fn is_pub(&self) -> bool {
        self.push.as_deref() == Some("pub")
    }
}

/// The fields of a reply's `ok` that rtload uses (`offset` of subscribe and publish).
#[derive(Deserialize, Debug, Default, Clone, Copy)]
pub struct OkBody {
    #[serde(default)]
    pub offset: Option<u64>,
}

#[derive(Deserialize, Debug, Default)]
pub struct ErrorBody<'a> {
    #[serde(default)]
    pub code: u32,
    #[serde(default, borrow)]
    pub message: Cow<'a, str>,
    /// How long a temporary error (113 busy, 111, ...) asks the client to wait.
    #[serde(default, deserialize_with = "stamp::lenient_u64")]
    pub retry_after_ms: Option<u64>,
}

/// A reply decoded into an owned `ok` of the caller's choosing (setup replies, read once
/// per connection: not the hot path).
#[derive(Deserialize, Debug)]
#[serde(bound = "T: DeserializeOwned + Default")]
pub struct Reply<T> {
    #[serde(default)]
    pub ok: T,
}

/// The `ok` of a `connect` reply, as much as rtload reads.
#[derive(Deserialize, Debug, Default, Clone, PartialEq)]
pub struct ConnectOk {
    #[serde(default)]
    pub session: String,
    /// Extension (docs/protocol.md): the `session` sent was resumed.
    #[serde(default)]
    pub resumed: bool,
    #[serde(default)]
    pub node: String,
    /// A SubResult, or `{error}`, per channel of `subs`.
    #[serde(default)]
    pub subs: BTreeMap<String, SubOutcome>,
}

/// One channel of `connect`'s `subs`: a SubResult (`offset`, `epoch`, `recovered`, `pubs`)
/// or `{error: {code, ...}}`.
#[derive(Deserialize, Debug, Default, Clone, PartialEq)]
pub struct SubOutcome {
    #[serde(default, deserialize_with = "stamp::lenient_u64")]
    pub offset: Option<u64>,
    #[serde(default)]
    pub epoch: Option<String>,
    #[serde(default)]
    pub recovered: bool,
    /// The missed publications, oldest first (recovery).
    #[serde(default)]
    pub pubs: Vec<PubView>,
    #[serde(default)]
    pub error: Option<CodeOnly>,
}

/// A publication's offset and rtload stamp.
#[derive(Deserialize, Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct PubView {
    #[serde(default, deserialize_with = "stamp::lenient_u64")]
    pub offset: Option<u64>,
    #[serde(default)]
    pub data: Option<StampView>,
}

/// An error object read only for its code.
#[derive(Deserialize, Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct CodeOnly {
    #[serde(default)]
    pub code: u32,
}

/// `t` and `seq` read from a publication's `data`; anything else (data that rtload did not
/// publish, of any shape) decodes as both absent instead of failing the message.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct StampView {
    pub t: Option<u64>,
    pub seq: Option<u64>,
}

/// Splits a frame into its messages: concatenated MessagePack values, or JSON lines.
pub fn split_frame(encoding: Encoding, frame: &[u8]) -> Frames<'_> {
    Frames {
        encoding,
        rest: frame,
    }
}

/// Decodes one message (as returned by [`split_frame`]).
pub fn decode(encoding: Encoding, message: &[u8]) -> Result<Incoming<'_>> {
    Ok(match encoding {
        Encoding::Msgpack => rmp_serde::from_slice(message)?,
        Encoding::Json => serde_json::from_slice(message)?,
    })
}

/// Decodes one message into an owned type (see [`Reply`]).
pub fn decode_as<T: DeserializeOwned>(encoding: Encoding, message: &[u8]) -> Result<T> {
    Ok(match encoding {
        Encoding::Msgpack => rmp_serde::from_slice(message)?,
        Encoding::Json => serde_json::from_slice(message)?,
    })
}

pub struct Frames<'a> {
    encoding: Encoding,
    rest: &'a [u8],
}

impl<'a> Iterator for Frames<'a> {
    type Item = Result<&'a [u8]>;

    fn next(&mut self) -> Option<Self::Item> {
        match self.encoding {
            Encoding::Json => loop {
                if self.rest.is_empty() {
                    return None;
                }
                let end = self
                    .rest
                    .iter()
                    .position(|&b| b == b'\n')
                    .unwrap_or(self.rest.len());
                let line = &self.rest[..end];
                self.rest = self.rest.get(end + 1..).unwrap_or(&[]);
                if !line.iter().all(u8::is_ascii_whitespace) {
                    return Some(Ok(line));
                }
            },
            Encoding::Msgpack => {
                if self.rest.is_empty() {
                    return None;
                }
                match msgpack_value_len(self.rest) {
                    Ok(len) => {
                        let (one, rest) = self.rest.split_at(len);
                        self.rest = rest;
                        Some(Ok(one))
                    }
                    Err(e) => {
                        self.rest = &[];
                        Some(Err(e))
                    }
                }
            }
        }
    }
}

/// Length in bytes of the first complete MessagePack value in `buf`. Iterative (a count of
/// values still to skip), so hostile nesting cannot overflow the stack.
pub fn msgpack_value_len(buf: &[u8]) -> Result<usize> {
    let truncated = || "truncated MessagePack value";
    let mut pos = 0usize;
    let mut pending: u64 = 1;
    while pending > 0 {
        pending -= 1;
        let marker = *buf.get(pos).ok_or_else(truncated)?;
        pos += 1;
        let be = |pos: usize, n: usize| -> Result<u64> {
            let bytes = buf.get(pos..pos + n).ok_or_else(truncated)?;
            Ok(bytes.iter().fold(0u64, |acc, &b| (acc << 8) | u64::from(b)))
        };
        // (bytes to skip after the marker, values nested inside that still follow)
        let (skip, children): (u64, u64) = match marker {
            0x00..=0x7f | 0xe0..=0xff | 0xc0 | 0xc2 | 0xc3 => (0, 0),
            0x80..=0x8f => (0, 2 * u64::from(marker & 0x0f)),
            0x90..=0x9f => (0, u64::from(marker & 0x0f)),
            0xa0..=0xbf => (u64::from(marker & 0x1f), 0),
            0xc4 | 0xd9 => (1 + be(pos, 1)?, 0),
            0xc5 | 0xda => (2 + be(pos, 2)?, 0),
            0xc6 | 0xdb => (4 + be(pos, 4)?, 0),
            0xc7 => (1 + 1 + be(pos, 1)?, 0),
            0xc8 => (2 + 1 + be(pos, 2)?, 0),
            0xc9 => (4 + 1 + be(pos, 4)?, 0),
            0xca => (4, 0),
            0xcb => (8, 0),
            0xcc | 0xd0 => (1, 0),
            0xcd | 0xd1 => (2, 0),
            0xce | 0xd2 => (4, 0),
            0xcf | 0xd3 => (8, 0),
            0xd4 => (2, 0),
            0xd5 => (3, 0),
            0xd6 => (5, 0),
            0xd7 => (9, 0),
            0xd8 => (17, 0),
            0xdc => (2, be(pos, 2)?),
            0xdd => (4, be(pos, 4)?),
            0xde => (2, 2 * be(pos, 2)?),
            0xdf => (4, 2 * be(pos, 4)?),
            0xc1 => return Err("invalid MessagePack marker 0xc1".into()),
        };
        let skip = usize::try_from(skip).map_err(|_| "MessagePack length overflows")?;
        pos = pos
            .checked_add(skip)
            .ok_or("MessagePack length overflows")?;
        if pos > buf.len() {
            return Err(truncated().into());
        }
        pending += children;
        // Every pending value needs at least one byte: fail fast on absurd counts.
        if pending > (buf.len() - pos) as u64 {
            return Err(truncated().into());
        }
    }
    Ok(pos)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use serde_json::json;

    fn mp(v: &serde_json::Value) -> Vec<u8> {
        rmp_serde::to_vec_named(v).unwrap()
    }

    fn pub_push(offset: u64, t: u64, seq: u64) -> serde_json::Value {
        json!({"push": "pub", "channel": "bench:fanout", "offset": offset,
               "data": {"t": t, "seq": seq, "pad": "xxxx"}, "info": {"user": ""}, "ts": 5})
    }

    fn decode_all(enc: Encoding, frame: &[u8]) -> Vec<(Option<u64>, StampView)> {
        split_frame(enc, frame)
            .map(|m| {
                let m = decode(enc, m.unwrap()).unwrap();
                (m.offset, m.data.unwrap_or_default())
            })
            .collect()
    }

    #[test]
    fn msgpack_frame_with_several_maps_splits_exactly() {
        let mut frame = Vec::new();
        for i in 1..=3 {
            frame.extend(mp(&pub_push(i, 1_700_000_000_000_000 + i, i * 10)));
        }
        let got = decode_all(Encoding::Msgpack, &frame);
        assert_eq!(got.len(), 3);
        assert_eq!(got[2].0, Some(3));
        assert_eq!(
            got[2].1,
            StampView {
                t: Some(1_700_000_000_000_003),
                seq: Some(30)
            }
        );
    }

    #[test]
    fn json_frame_splits_on_newlines_and_ignores_blank_lines() {
        let a = serde_json::to_string(&pub_push(7, 100, 1)).unwrap();
        let b = serde_json::to_string(&pub_push(8, 200, 2)).unwrap();
        let frame = format!("{a}\n{b}\n\n");
        let got = decode_all(Encoding::Json, frame.as_bytes());
        assert_eq!(got.len(), 2);
        assert_eq!(got[1].0, Some(8));
        assert_eq!(got[1].1.t, Some(200));
    }

    #[test]
    fn msgpack_len_covers_every_marker_family() {
        let values = [
            json!(null),
            json!(true),
            json!(-1),
            json!(-200),
            json!(70000),
            json!(u64::MAX),
            json!(1.5),
            json!("a".repeat(40)),
            json!("b".repeat(300)),
            json!("c".repeat(70000)),
            json!([1, [2, [3, {"k": "v"}]]]),
            json!((0..20).collect::<Vec<_>>()),
            json!({"a": {"b": {"c": [1, 2, 3]}}}),
        ];
        for v in values {
            let mut bytes = mp(&v);
            let len = bytes.len();
            bytes.extend([0xc0, 0xc0]); // trailing nils must not be swallowed
            assert_eq!(msgpack_value_len(&bytes).unwrap(), len, "{v}");
        }
        // bin 8, ext 8, fixext 4 and a 32-bit float, built by hand
        for raw in [
            vec![0xc4, 2, 1, 2],
            vec![0xc7, 3, 5, 1, 2, 3],
            vec![0xd6, 5, 1, 2, 3, 4],
            vec![0xca, 0, 0, 0, 0],
        ] {
            assert_eq!(msgpack_value_len(&raw).unwrap(), raw.len());
        }
    }

    #[test]
    fn truncated_or_invalid_msgpack_is_an_error_not_a_panic() {
        let full = mp(&pub_push(1, 2, 3));
        for cut in 0..full.len() {
            assert!(msgpack_value_len(&full[..cut]).is_err(), "cut at {cut}");
        }
        assert!(msgpack_value_len(&[0xc1]).is_err());
        assert!(msgpack_value_len(&[0xdf, 0xff, 0xff, 0xff, 0xff]).is_err());
        let mut it = split_frame(Encoding::Msgpack, &[0x81, 0xa1]);
        assert!(it.next().unwrap().is_err());
        assert!(it.next().is_none());
    }

    #[test]
    fn data_of_another_shape_decodes_as_no_stamp() {
        for data in [
            json!("text"),
            json!([1, 2]),
            json!(null),
            json!({"t": "soon", "seq": -1}),
            json!({"t": 1.5}),
            json!({"nested": {"t": 1}}),
        ] {
            let msg = json!({"push": "pub", "offset": 1, "data": data});
            for enc in [Encoding::Json, Encoding::Msgpack] {
                let bytes = match enc {
                    Encoding::Json => serde_json::to_vec(&msg).unwrap(),
                    Encoding::Msgpack => mp(&msg),
                };
                let m = decode(enc, &bytes).unwrap();
                assert!(m.is_pub());
                assert_eq!(m.data.unwrap_or_default(), StampView::default(), "{data}");
            }
        }
        // An integral float is accepted: some JSON encoders write them that way.
        let m = decode(
            Encoding::Json,
            br#"{"push":"pub","data":{"t":12.0,"seq":3}}"#,
        )
        .unwrap();
        assert_eq!(m.data.unwrap().t, Some(12));
    }

    #[test]
    fn replies_expose_ok_offset_and_error_code() {
        let ok = mp(&json!({"id": 2, "ok": {"offset": 41, "epoch": "e", "recovered": false}}));
        let m = decode(Encoding::Msgpack, &ok).unwrap();
        assert_eq!((m.id, m.ok.unwrap().offset), (Some(2), Some(41)));

        let err =
            br#"{"id":3,"error":{"code":103,"message":"permission \"denied\"","temporary":false}}"#;
        let m = decode(Encoding::Json, err).unwrap();
        let e = m.error.unwrap();
        assert_eq!((m.id, e.code), (Some(3), 103));
        assert_eq!(e.message, "permission \"denied\"");
    }

    #[test]
    fn busy_errors_expose_retry_after() {
        let busy = mp(&json!({"id": 4, "error": {"code": 113, "message": "busy",
                                                  "temporary": true, "retry_after_ms": 250}}));
        let e = decode(Encoding::Msgpack, &busy).unwrap().error.unwrap();
        assert_eq!((e.code, e.retry_after_ms), (113, Some(250)));
        // Absent, or of an odd type: no retry hint, and the reply still decodes.
        for text in [
            r#"{"id":4,"error":{"code":113,"message":"busy"}}"#,
            r#"{"id":4,"error":{"code":113,"retry_after_ms":"soon"}}"#,
            r#"{"id":4,"error":{"code":113,"retry_after_ms":null}}"#,
        ] {
            let e = decode(Encoding::Json, text.as_bytes())
                .unwrap()
                .error
                .unwrap();
            assert_eq!((e.code, e.retry_after_ms), (113, None), "{text}");
        }
    }

    #[test]
    fn rpc_parts_and_replies_with_data_decode() {
        let part = mp(&json!({"push": "rpc_part", "id": 7, "data": {"progress": [1, 2]}}));
        let m = decode(Encoding::Msgpack, &part).unwrap();
        assert!(!m.is_pub());
        assert_eq!((m.push.as_deref(), m.id), (Some("rpc_part"), Some(7)));
        let reply = br#"{"id":7,"ok":{"data":"$argon2id$v=19$m=19456,t=2,p=1$c2FsdA$aGFzaA"}}"#;
        let m = decode(Encoding::Json, reply).unwrap();
        assert!(m.push.is_none() && m.ok.is_some() && m.error.is_none());
    }

    #[test]
    fn rpc_data_goes_out_as_given_in_json_and_converted_in_msgpack() {
        let data = json!({"password": "correct horse", "cost": 3, "ratio": 1.5});
        let cmd = Rpc {
            id: 5,
            op: "rpc",
            method: "auth.hash_password",
            data: Some(&data),
        };
        let Message::Text(text) = Encoding::Json.encode(&cmd).unwrap() else {
            panic!("json must be a text frame")
        };
        let back: serde_json::Value = serde_json::from_str(text.as_str()).unwrap();
        assert_eq!(
            back,
            json!({"id": 5, "op": "rpc", "method": "auth.hash_password", "data": data})
        );
        let Message::Binary(bin) = Encoding::Msgpack.encode(&cmd).unwrap() else {
            panic!("msgpack must be a binary frame")
        };
        // Decoded without a target type, MessagePack integers come back as integers and
        // float64 as floats: the conversion kept the JSON number kinds.
        let back: serde_json::Value = rmp_serde::from_slice(&bin).unwrap();
        assert!(back["data"]["cost"].is_u64(), "an integer stays an integer");
        assert!(back["data"]["ratio"].is_f64());
        assert_eq!(back["data"], data);
        assert_eq!(back["method"], "auth.hash_password");
        let Message::Text(bare) = Encoding::Json.encode(&Rpc { data: None, ..cmd }).unwrap() else {
            panic!("json must be a text frame")
        };
        assert_eq!(
            bare.as_str(),
            r#"{"id":5,"op":"rpc","method":"auth.hash_password"}"#
        );
    }

    #[test]
    fn connect_carries_the_session_and_positions_to_recover_from() {
        let subs = BTreeMap::from([
            (
                "chat:a".to_string(),
                Since {
                    offset: Some(41),
                    epoch: Some("e7".into()),
                },
            ),
            ("chat:b".to_string(), Since::default()),
        ]);
        let cmd = Connect {
            id: 1,
            op: "connect",
            session: Some("5e55"),
            subs: &subs,
        };
        let Message::Text(text) = Encoding::Json.encode(&cmd).unwrap() else {
            panic!("json must be a text frame")
        };
        assert_eq!(
            text.as_str(),
            r#"{"id":1,"op":"connect","session":"5e55","subs":{"chat:a":{"offset":41,"epoch":"e7"},"chat:b":{}}}"#
        );
        let Message::Binary(bin) = Encoding::Msgpack.encode(&cmd).unwrap() else {
            panic!("msgpack must be a binary frame")
        };
        let back: serde_json::Value = rmp_serde::from_slice(&bin).unwrap();
        assert_eq!(back["subs"]["chat:b"], json!({}));
        let empty = BTreeMap::new();
        let Message::Text(bare) = Encoding::Json
            .encode(&Connect {
                id: 1,
                op: "connect",
                session: None,
                subs: &empty,
            })
            .unwrap()
        else {
            panic!("json must be a text frame")
        };
        assert_eq!(bare.as_str(), r#"{"id":1,"op":"connect"}"#);
    }

    #[test]
    fn connect_replies_expose_session_and_sub_results() {
        let reply = json!({"id": 1, "ok": {
            "client": "c", "session": "5e55", "user": "", "ping_ms": 25000, "node": "gw-a",
            "resumed": true,
            "subs": {
                "chat:a": {"offset": 43, "epoch": "e7", "recovered": true, "pubs": [
                    {"channel": "chat:a", "offset": 42, "data": {"t": 5, "seq": 9, "pad": "x"},
                     "info": {"user": "", "client": ""}, "ts": 1},
                    {"channel": "chat:a", "offset": 43, "data": "not rtload's", "ts": 2}]},
                "chat:b": {"error": {"code": 106, "message": "limit exceeded"}}}}});
        for enc in [Encoding::Json, Encoding::Msgpack] {
            let bytes = match enc {
                Encoding::Json => serde_json::to_vec(&reply).unwrap(),
                Encoding::Msgpack => mp(&reply),
            };
            let r: Reply<ConnectOk> = decode_as(enc, &bytes).unwrap();
            let ok = r.ok;
            assert_eq!(
                (ok.session.as_str(), ok.resumed, ok.node.as_str()),
                ("5e55", true, "gw-a")
            );
            let a = &ok.subs["chat:a"];
            assert!(a.recovered && a.error.is_none());
            assert_eq!((a.offset, a.epoch.as_deref()), (Some(43), Some("e7")));
            assert_eq!(a.pubs.len(), 2);
            assert_eq!(a.pubs[0].offset, Some(42));
            assert_eq!(a.pubs[0].data.unwrap().t, Some(5));
            assert_eq!(a.pubs[1].data.unwrap_or_default(), StampView::default());
            assert_eq!(ok.subs["chat:b"].error.unwrap().code, 106);
        }
        // A plain connect reply (no subs, no resumed) decodes to the defaults.
        let r: Reply<ConnectOk> = decode_as(
            Encoding::Json,
            br#"{"id":1,"ok":{"client":"c","session":"s"}}"#,
        )
        .unwrap();
        assert!(!r.ok.resumed && r.ok.subs.is_empty());
    }

    #[test]
    fn disconnect_pushes_expose_code_and_retry_after() {
        let push = mp(
            &json!({"push": "disconnect", "code": 4007, "reason": "overloaded",
                              "reconnect": true, "retry_after_ms": 1500}),
        );
        let m = decode(Encoding::Msgpack, &push).unwrap();
        assert_eq!(
            (m.push.as_deref(), m.code, m.retry_after_ms),
            (Some("disconnect"), Some(4007), Some(1500))
        );
    }

    #[test]
    fn request_ids_skip_zero_when_wrapping() {
        let mut id = u32::MAX - 1;
        assert_eq!(next_id(&mut id), u32::MAX);
        assert_eq!(next_id(&mut id), 1);
        assert_eq!(next_id(&mut id), 2);
    }

    #[test]
    fn commands_encode_as_maps_in_both_encodings() {
        let cmd = Publish {
            id: 9,
            op: "publish",
            channel: "bench:x",
            data: Stamp {
                t: 5,
                seq: 6,
                pad: "ab",
            },
        };
        let Message::Text(text) = Encoding::Json.encode(&cmd).unwrap() else {
            panic!("json must be a text frame")
        };
        assert_eq!(
            text.as_str(),
            r#"{"id":9,"op":"publish","channel":"bench:x","data":{"t":5,"seq":6,"pad":"ab"}}"#
        );
        let Message::Binary(bin) = Encoding::Msgpack.encode(&cmd).unwrap() else {
            panic!("msgpack must be a binary frame")
        };
        let back: serde_json::Value = rmp_serde::from_slice(&bin).unwrap();
        assert_eq!(back["data"]["seq"], 6);
        assert_eq!(back["op"], "publish");
    }
}
