//! Malformed and adversarial input at the wire edge (PROTOCOL.md §1, §6).
//!
//! Whatever a client sends, `frame::decode`, `Envelope::from_value` and
//! `Command::parse` answer `Ok` or `Err`, never panic, never allocate what a
//! header merely declares, and sort failures into the documented buckets:
//! protocol error (close 4000), 107 or 104. Outbound pushes decode back to
//! exactly what was published.
//!
//! Every property runs from a fixed seed with no persistence file, so a run is
//! deterministic and leaves nothing behind.

#![allow(
    clippy::expect_used,
    reason = "a failed expectation in a test is the test failing, with its message"
)]

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use proptest::collection::vec;
use proptest::option;
use proptest::prelude::*;
use proptest::sample::{Index, select};
use proptest::test_runner::{RngSeed, TestCaseError};
use rmpv::Value;
use rt_proto::command::{Command, Envelope, ProtocolError};
use rt_proto::frame::{self, FrameError, FrameKind};
use rt_proto::internal::{PubInfo, Publication};
use rt_proto::{Encoding, ErrorCode, outbound, value};

/// Every op of PROTOCOL.md §1 "Commands".
const OPS: [&str; 9] = [
    "connect",
    "subscribe",
    "unsubscribe",
    "publish",
    "history",
    "presence",
    "rpc",
    "refresh",
    "ping",
];

/// Every argument name some op reads.
const ARG_KEYS: [&str; 13] = [
    "channel",
    "since",
    "token",
    "session",
    "subs",
    "name",
    "version",
    "data",
    "data_b64",
    "idempotency_key",
    "limit",
    "reverse",
    "method",
];

const PAIRS: [(Encoding, FrameKind); 4] = [
    (Encoding::MsgPack, FrameKind::Binary),
    (Encoding::MsgPack, FrameKind::Text),
    (Encoding::Json, FrameKind::Text),
    (Encoding::Json, FrameKind::Binary),
];

fn config(cases: u32) -> ProptestConfig {
    ProptestConfig {
        cases,
        rng_seed: RngSeed::Fixed(0x7274_2d70_726f_746f),
        failure_persistence: None,
        max_shrink_iters: 4096,
        ..ProptestConfig::default()
    }
}

// ---------------------------------------------------------------------------
// Value helpers
// ---------------------------------------------------------------------------

fn s(text: &str) -> Value {
    Value::from(text)
}

fn map(entries: Vec<(&str, Value)>) -> Value {
    Value::Map(entries.into_iter().map(|(k, v)| (s(k), v)).collect())
}

/// A MessagePack str whose bytes may be invalid UTF-8 (rmpv only builds those
/// by decoding).
fn raw_str(bytes: Vec<u8>) -> Value {
    let mut encoded = vec![0xd9, u8::try_from(bytes.len()).expect("short string")];
    encoded.extend(bytes);
    value::decode_one(&encoded).expect("a str8 always decodes")
}

/// The MessagePack bytes a client puts on the wire for `v`. Unlike
/// `rmpv::encode::write_value` (and so `value::encode`), a str holding invalid
/// UTF-8 stays a str instead of turning into a bin.
fn wire(v: &Value) -> Vec<u8> {
    let mut out = Vec::new();
    write_wire(&mut out, v);
    out
}

fn write_wire(out: &mut Vec<u8>, v: &Value) {
    let len = |n: usize| u32::try_from(n).expect("test values are small");
    match v {
        Value::String(s) if s.as_str().is_none() => {
            rmp::encode::write_str_len(out, len(s.as_bytes().len())).expect("writes to a Vec");
            out.extend_from_slice(s.as_bytes());
        }
        Value::Array(items) => {
            rmp::encode::write_array_len(out, len(items.len())).expect("writes to a Vec");
            for item in items {
                write_wire(out, item);
            }
        }
        Value::Map(entries) => {
            rmp::encode::write_map_len(out, len(entries.len())).expect("writes to a Vec");
            for (k, v) in entries {
                write_wire(out, k);
                write_wire(out, v);
            }
        }
        other => rmpv::encode::write_value(out, other).expect("writes to a Vec"),
    }
}

/// Whether a str with invalid UTF-8 hides anywhere in `v`.
fn has_invalid_utf8(v: &Value) -> bool {
    match v {
        Value::String(s) => s.as_str().is_none(),
        Value::Array(items) => items.iter().any(has_invalid_utf8),
        Value::Map(entries) => entries
            .iter()
            .any(|(k, v)| has_invalid_utf8(k) || has_invalid_utf8(v)),
        _ => false,
    }
}

/// The MessagePack frame carrying `messages` back to back.
fn msgpack_frame(messages: &[Value]) -> Vec<u8> {
    messages.iter().flat_map(wire).collect()
}

/// Structural equality where floats compare by bits, so NaN equals itself.
fn same(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::F32(x), Value::F32(y)) => x.to_bits() == y.to_bits(),
        (Value::F64(x), Value::F64(y)) => x.to_bits() == y.to_bits(),
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(a, b)| same(a, b))
        }
        (Value::Map(x), Value::Map(y)) => {
            x.len() == y.len()
                && x.iter()
                    .zip(y)
                    .all(|((ka, va), (kb, vb))| same(ka, kb) && same(va, vb))
        }
        _ => a == b,
    }
}

/// Like [`same`], but floats may differ by a couple of ULPs: serde_json's
/// default float parsing is best-effort, not exact.
fn same_after_json(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::F64(x), Value::F64(y)) => close_floats(*x, *y),
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(a, b)| same_after_json(a, b))
        }
        (Value::Map(x), Value::Map(y)) => {
            x.len() == y.len()
                && x.iter()
                    .zip(y)
                    .all(|((ka, va), (kb, vb))| same_after_json(ka, kb) && same_after_json(va, vb))
        }
        _ => a == b,
    }
}

fn close_floats(x: f64, y: f64) -> bool {
    x == y
        || (x.is_sign_positive() == y.is_sign_positive() && x.to_bits().abs_diff(y.to_bits()) <= 2)
}

fn get<'a>(message: &'a Value, key: &str) -> Option<&'a Value> {
    message
        .as_map()?
        .iter()
        .find(|(k, _)| k.as_str() == Some(key))
        .map(|(_, v)| v)
}

fn op_name(command: &Command) -> &'static str {
    match command {
        Command::Connect(_) => "connect",
        Command::Subscribe { .. } => "subscribe",
        Command::Unsubscribe { .. } => "unsubscribe",
        Command::Publish { .. } => "publish",
        Command::History { .. } => "history",
        Command::Presence { .. } => "presence",
        Command::Rpc { .. } => "rpc",
        Command::Refresh { .. } => "refresh",
        Command::Ping => "ping",
    }
}

// ---------------------------------------------------------------------------
// Strategies
// ---------------------------------------------------------------------------

/// Any Unicode text, control characters, `\n` and U+2028 included.
fn text(max: usize) -> impl Strategy<Value = String> {
    vec(any::<char>(), 0..max).prop_map(|chars| chars.into_iter().collect())
}

fn integer() -> impl Strategy<Value = Value> {
    prop_oneof![
        (0u64..300).prop_map(Value::from),
        (-40i64..0).prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
    ]
}

fn leaf() -> BoxedStrategy<Value> {
    prop_oneof![
        1 => Just(Value::Nil),
        1 => any::<bool>().prop_map(Value::Boolean),
        2 => integer(),
        1 => any::<f32>().prop_map(Value::F32),
        1 => any::<f64>().prop_map(Value::F64),
        3 => text(12).prop_map(Value::from),
        1 => vec(any::<u8>(), 0..12).prop_map(raw_str),
        1 => vec(any::<u8>(), 0..24).prop_map(Value::Binary),
        1 => (any::<i8>(), vec(any::<u8>(), 0..20)).prop_map(|(ty, data)| Value::Ext(ty, data)),
    ]
    .boxed()
}

/// Any MessagePack value: nested maps and arrays, any key type, binaries,
/// exts, NaN and infinities, invalid UTF-8 strings.
fn any_value() -> BoxedStrategy<Value> {
    leaf()
        .prop_recursive(4, 40, 6, |inner| {
            let key = prop_oneof![
                4 => text(8).prop_map(Value::from),
                1 => integer(),
                1 => inner.clone(),
            ];
            prop_oneof![
                vec(inner.clone(), 0..6).prop_map(Value::Array),
                vec((key, inner), 0..6).prop_map(Value::Map),
            ]
        })
        .boxed()
}

/// Argument values an op plausibly reads, mixed with anything at all.
fn any_arg() -> BoxedStrategy<Value> {
    let position = (option::of(leaf()), option::of(leaf())).prop_map(|(offset, epoch)| {
        let mut entries = Vec::new();
        if let Some(offset) = offset {
            entries.push((s("offset"), offset));
        }
        if let Some(epoch) = epoch {
            entries.push((s("epoch"), epoch));
        }
        Value::Map(entries)
    });
    let subs = vec(
        (
            text(6).prop_map(Value::from),
            prop_oneof![position.clone(), leaf()],
        ),
        0..4,
    )
    .prop_map(Value::Map);
    let b64 = vec(any::<u8>(), 0..12).prop_map(|bytes| s(&BASE64.encode(bytes)));
    prop_oneof![
        3 => any_value(),
        2 => text(10).prop_map(Value::from),
        1 => position,
        1 => subs,
        1 => b64,
        1 => any::<bool>().prop_map(Value::Boolean),
    ]
    .boxed()
}

/// A key for an extra argument: never `id` or `op`, so a command has one of each.
fn extra_key() -> impl Strategy<Value = Value> {
    prop_oneof![
        4 => "[a-z_]{1,10}".prop_filter("not id/op", |k| k != "id" && k != "op").prop_map(|k| s(&k)),
        1 => integer(),
    ]
}

/// What a generated command says its id is.
#[derive(Debug, Clone, Copy)]
enum Id {
    Absent,
    Nil,
    Int(u32),
}

impl Id {
    fn expected(self) -> u32 {
        match self {
            Id::Absent | Id::Nil => 0,
            Id::Int(id) => id,
        }
    }
}

fn any_id() -> impl Strategy<Value = Id> {
    prop_oneof![
        1 => Just(Id::Absent),
        1 => Just(Id::Nil),
        2 => (0u32..1000).prop_map(Id::Int),
        4 => any::<u32>().prop_map(Id::Int),
        1 => Just(Id::Int(u32::MAX)),
    ]
}

/// A command map: an id (or none), a known op and random extra arguments, in
/// random order.
fn command(extras: usize) -> impl Strategy<Value = (Id, &'static str, Value)> {
    (
        any_id(),
        select(OPS.to_vec()),
        vec((extra_key(), any_value()), 0..extras),
    )
        .prop_flat_map(|(id, op, mut fields)| {
            match id {
                Id::Absent => {}
                Id::Nil => fields.push((s("id"), Value::Nil)),
                Id::Int(n) => fields.push((s("id"), Value::from(n))),
            }
            fields.push((s("op"), s(op)));
            Just(fields)
                .prop_shuffle()
                .prop_map(move |fields| (id, op, Value::Map(fields)))
        })
}

#[derive(Debug, Clone)]
enum Mutation {
    Flip(Index, u8),
    Insert(Index, u8),
    Delete(Index),
    Truncate(Index),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        (any::<Index>(), 1u8..=255).prop_map(|(i, x)| Mutation::Flip(i, x)),
        (any::<Index>(), any::<u8>()).prop_map(|(i, b)| Mutation::Insert(i, b)),
        any::<Index>().prop_map(Mutation::Delete),
        any::<Index>().prop_map(Mutation::Truncate),
    ]
}

fn mutate(mut bytes: Vec<u8>, mutations: &[Mutation]) -> Vec<u8> {
    for m in mutations {
        let len = bytes.len();
        match m {
            Mutation::Insert(i, b) => bytes.insert(i.index(len + 1), *b),
            _ if len == 0 => {}
            Mutation::Flip(i, x) => bytes[i.index(len)] ^= x,
            Mutation::Delete(i) => {
                bytes.remove(i.index(len));
            }
            Mutation::Truncate(i) => bytes.truncate(i.index(len)),
        }
    }
    bytes
}

/// The JSON line a client would send for a command: every argument with a JSON
/// form (value.rs rules), the others left out.
fn json_line(command: &Value) -> (String, Value) {
    let Value::Map(fields) = command else {
        panic!("commands are maps");
    };
    let representable: Vec<(Value, Value)> = fields
        .iter()
        .filter(|(k, v)| {
            value::to_json_strict(&Value::Map(vec![((*k).clone(), (*v).clone())])).is_some()
        })
        .cloned()
        .collect();
    let json = value::to_json_strict(&Value::Map(representable))
        .expect("only representable fields are kept");
    let line = serde_json::to_string(&json).expect("serializes");
    (line, value::from_json(&json))
}

// ---------------------------------------------------------------------------
// Oracles shared by the properties
// ---------------------------------------------------------------------------

/// What §1 says the id of a map message is: absent or nil → 0, an integer in
/// u32 range → itself, anything else → protocol error. With duplicate keys the
/// first one counts (the decoder's choice).
fn expected_id(message: &Value) -> Result<u32, ProtocolError> {
    match get(message, "id") {
        None | Some(Value::Nil) => Ok(0),
        Some(Value::Integer(i)) => i
            .as_u64()
            .and_then(|u| u32::try_from(u).ok())
            .ok_or(ProtocolError::BadId),
        Some(_) => Err(ProtocolError::BadId),
    }
}

/// Runs one decoded message through both later steps and checks the outcome
/// buckets: a known op never fails with 104, an unknown one always does,
/// a missing or non-string op is 107, a parsed command is the op's variant.
fn check_message(message: &Value) -> Result<(), TestCaseError> {
    let envelope = match Envelope::from_value(message.clone()) {
        Ok(envelope) => envelope,
        Err(ProtocolError::NotAMap) => {
            prop_assert!(!message.is_map(), "a map was refused as not a map");
            return Ok(());
        }
        Err(ProtocolError::BadId) => {
            prop_assert_eq!(expected_id(message), Err(ProtocolError::BadId));
            return Ok(());
        }
    };
    prop_assert!(message.is_map());
    prop_assert_eq!(Ok(envelope.id), expected_id(message));
    let op = match get(message, "op") {
        Some(Value::String(op)) => op.as_str(),
        _ => None,
    };
    prop_assert_eq!(envelope.op.as_deref(), op);
    for encoding in Encoding::ALL {
        match Command::parse(&envelope, encoding) {
            Ok(command) => prop_assert_eq!(Some(op_name(&command)), op),
            Err(err) => match op {
                Some(op) if !OPS.contains(&op) => prop_assert_eq!(err.code, ErrorCode::UNKNOWN_OP),
                _ => prop_assert_eq!(err.code, ErrorCode::BAD_REQUEST, "{}", err.message),
            },
        }
    }
    Ok(())
}

/// Decodes `payload` as `(encoding, kind)` and checks everything that follows.
fn exercise(encoding: Encoding, kind: FrameKind, payload: &[u8]) -> Result<(), TestCaseError> {
    let right_kind = match encoding {
        Encoding::MsgPack => FrameKind::Binary,
        Encoding::Json => FrameKind::Text,
    };
    match frame::decode(encoding, kind, payload) {
        Err(FrameError::WrongFrameType) => prop_assert_ne!(kind, right_kind),
        Err(_) => prop_assert_eq!(
            kind,
            right_kind,
            "a wrong frame type must be refused as such"
        ),
        Ok(messages) => {
            prop_assert_eq!(kind, right_kind);
            prop_assert!(!messages.is_empty());
            if encoding == Encoding::Json {
                let text = std::str::from_utf8(payload).expect("decoded JSON is UTF-8");
                let lines = text.split('\n').filter(|l| !l.trim().is_empty()).count();
                prop_assert_eq!(messages.len(), lines, "one JSON message per non-blank line");
            }
            for message in &messages {
                prop_assert!(message.is_map());
                check_message(message)?;
            }
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// 1. Arbitrary input never panics
// ---------------------------------------------------------------------------

proptest! {
    #![proptest_config(config(2048))]

    #[test]
    fn arbitrary_bytes_never_panic_on_any_encoding_and_frame_kind(
        payload in vec(any::<u8>(), 0..300),
    ) {
        for (encoding, kind) in PAIRS {
            exercise(encoding, kind, &payload)?;
        }
    }

    #[test]
    fn json_looking_text_never_panics(
        payload in r#"[{}\[\]":,0-9a-z.eE+\- \n\\]{0,80}"#,
    ) {
        for (encoding, kind) in PAIRS {
            exercise(encoding, kind, payload.as_bytes())?;
        }
    }
}

proptest! {
    #![proptest_config(config(512))]

    #[test]
    fn mutated_msgpack_frames_never_panic(
        commands in vec(command(4), 1..4),
        mutations in vec(mutation(), 1..6),
    ) {
        let messages: Vec<Value> = commands.into_iter().map(|(_, _, m)| m).collect();
        let payload = mutate(msgpack_frame(&messages), &mutations);
        for (encoding, kind) in PAIRS {
            exercise(encoding, kind, &payload)?;
        }
    }

    #[test]
    fn mutated_json_frames_never_panic(
        commands in vec(command(4), 1..4),
        mutations in vec(mutation(), 1..6),
    ) {
        let lines: Vec<String> = commands.iter().map(|(_, _, m)| json_line(m).0).collect();
        let payload = mutate(lines.join("\n").into_bytes(), &mutations);
        for (encoding, kind) in PAIRS {
            exercise(encoding, kind, &payload)?;
        }
    }

    #[test]
    fn any_message_value_goes_through_envelope_and_parse(message in any_value()) {
        check_message(&message)?;
        // The same value wrapped as a whole frame.
        exercise(Encoding::MsgPack, FrameKind::Binary, &wire(&message))?;
    }

    /// A known op with random arguments under the names ops read: `Ok` with
    /// that op's command, or 107, never 104, for both encodings.
    #[test]
    fn known_ops_with_random_arguments_fail_only_with_bad_request(
        op in select(OPS.to_vec()),
        args in vec((select(ARG_KEYS.to_vec()), any_arg()), 0..6),
    ) {
        let mut fields = vec![(s("id"), Value::from(7u32)), (s("op"), s(op))];
        fields.extend(args.into_iter().map(|(k, v)| (s(k), v)));
        check_message(&Value::Map(fields))?;
    }

    /// `publish` keeps `data` exactly as sent (§1 "passes through untouched").
    /// Strs with invalid UTF-8 are left out here: see
    /// `publish_keeps_a_str_with_invalid_utf8_a_str`.
    #[test]
    fn publish_data_is_carried_as_its_msgpack_bytes(
        data in any_value().prop_filter("valid UTF-8 strs only", |v| !has_invalid_utf8(v)),
    ) {
        let message = map(vec![("id", Value::from(1)), ("op", s("publish")), ("channel", s("c")), ("data", data.clone())]);
        let decoded = frame::decode(Encoding::MsgPack, FrameKind::Binary, &wire(&message))
            .map_err(|e| TestCaseError::fail(format!("valid frame refused: {e}")))?;
        let envelope = Envelope::from_value(decoded[0].clone())
            .map_err(|e| TestCaseError::fail(format!("valid envelope refused: {e}")))?;
        let Ok(Command::Publish { data: raw, .. }) = Command::parse(&envelope, Encoding::MsgPack) else {
            return Err(TestCaseError::fail("publish with channel and data must parse"));
        };
        let want = wire(&data);
        prop_assert_eq!(raw.as_ref(), want.as_slice());
    }
}

// ---------------------------------------------------------------------------
// 2. Round trips: message count, ids and ops survive a frame
// ---------------------------------------------------------------------------

proptest! {
    #![proptest_config(config(512))]

    #[test]
    fn msgpack_batches_round_trip(commands in vec(command(5), 1..6)) {
        let messages: Vec<Value> = commands.iter().map(|(_, _, m)| m.clone()).collect();
        let decoded = frame::decode(Encoding::MsgPack, FrameKind::Binary, &msgpack_frame(&messages))
            .map_err(|e| TestCaseError::fail(format!("valid frame refused: {e}")))?;
        prop_assert_eq!(decoded.len(), commands.len());
        for ((id, op, original), got) in commands.iter().zip(&decoded) {
            prop_assert!(same(original, got), "{:?} != {:?}", original, got);
            let envelope = Envelope::from_value(got.clone())
                .map_err(|e| TestCaseError::fail(format!("valid envelope refused: {e}")))?;
            prop_assert_eq!(envelope.id, id.expected());
            prop_assert_eq!(envelope.op.as_deref(), Some(*op));
            check_message(got)?;
        }
    }

    #[test]
    fn json_batches_round_trip(
        commands in vec(command(5), 1..6),
        trailing_newline in any::<bool>(),
        crlf in any::<bool>(),
    ) {
        let (lines, expected): (Vec<String>, Vec<Value>) = commands.iter().map(|(_, _, m)| json_line(m)).unzip();
        let mut text = lines.join(if crlf { "\r\n" } else { "\n" });
        if trailing_newline {
            text.push('\n');
        }
        let decoded = frame::decode(Encoding::Json, FrameKind::Text, text.as_bytes())
            .map_err(|e| TestCaseError::fail(format!("valid frame refused: {e}\n{text}")))?;
        prop_assert_eq!(decoded.len(), commands.len());
        for (((id, op, _), want), got) in commands.iter().zip(&expected).zip(&decoded) {
            prop_assert!(same_after_json(want, got), "{:?} != {:?}", want, got);
            let envelope = Envelope::from_value(got.clone())
                .map_err(|e| TestCaseError::fail(format!("valid envelope refused: {e}")))?;
            prop_assert_eq!(envelope.id, id.expected());
            prop_assert_eq!(envelope.op.as_deref(), Some(*op));
            check_message(got)?;
        }
    }
}

// ---------------------------------------------------------------------------
// 3. Truncation
// ---------------------------------------------------------------------------

proptest! {
    #![proptest_config(config(128))]

    /// Every strict prefix of a valid frame is an error, except a prefix that
    /// ends exactly between two messages: that is the shorter batch, intact.
    #[test]
    fn every_strict_prefix_of_a_msgpack_frame_is_an_error_or_a_whole_shorter_batch(
        commands in vec(command(3), 1..4),
    ) {
        let messages: Vec<Value> = commands.into_iter().map(|(_, _, m)| m).collect();
        let mut boundaries = Vec::new();
        let mut payload = Vec::new();
        for message in &messages {
            payload.extend(wire(message));
            boundaries.push(payload.len());
        }
        for cut in 0..payload.len() {
            let result = frame::decode(Encoding::MsgPack, FrameKind::Binary, &payload[..cut]);
            match boundaries.iter().position(|&b| b == cut) {
                Some(i) => {
                    let got = result.map_err(|e| TestCaseError::fail(format!("cut {cut} at a boundary: {e}")))?;
                    prop_assert_eq!(got.len(), i + 1);
                    for (want, got) in messages.iter().zip(&got) {
                        prop_assert!(same(want, got));
                    }
                }
                None if cut == 0 => prop_assert!(matches!(result, Err(FrameError::Empty))),
                None => prop_assert!(
                    matches!(result, Err(FrameError::MsgPack(_))),
                    "cut {} of {}: {:?}", cut, payload.len(), result
                ),
            }
        }
    }

    #[test]
    fn every_strict_prefix_of_a_json_frame_is_an_error_or_a_whole_shorter_batch(
        commands in vec(command(3), 1..4),
    ) {
        let lines: Vec<String> = commands.iter().map(|(_, _, m)| json_line(m).0).collect();
        let text = lines.join("\n");
        let mut ends = Vec::new();
        let mut at = 0;
        for line in &lines {
            at += line.len();
            ends.push(at);
            at += 1;
        }
        for cut in 0..text.len() {
            let result = frame::decode(Encoding::Json, FrameKind::Text, &text.as_bytes()[..cut]);
            // A line is complete at its closing brace and stays so after its '\n'.
            match ends.iter().position(|&end| end == cut || end + 1 == cut) {
                Some(i) => prop_assert_eq!(result.map(|m| m.len()).ok(), Some(i + 1), "cut {}", cut),
                None if cut == 0 => prop_assert!(matches!(result, Err(FrameError::Empty))),
                None => prop_assert!(result.is_err(), "cut {}: {:?}", cut, result),
            }
        }
    }
}

// ---------------------------------------------------------------------------
// 4. Declared lengths far beyond the bytes that follow
// ---------------------------------------------------------------------------

/// 32-bit headers declaring about 4 GiB (or 4 G entries).
fn huge_headers() -> Vec<Vec<u8>> {
    let mut headers = Vec::new();
    for len in [0xffff_ffffu32, 0xffff_fffe, 0x8000_0000, 0x7fff_ffff] {
        let n = len.to_be_bytes();
        for marker in [0xdfu8, 0xdd, 0xdb, 0xc6] {
            headers.push([&[marker][..], &n].concat());
        }
        headers.push([&[0xc9][..], &n, &[0x05]].concat());
        headers.push([&[0xc9][..], &n, &[0xff]].concat());
    }
    headers
}

#[test]
fn huge_declared_lengths_fail_fast_without_allocating_them() {
    let valid = wire(&map(vec![("id", Value::from(1)), ("op", s("ping"))]));
    let prefix_of_map = {
        // {"id": 1, "op": "publish", "channel": "a", "data": <header...>
        let mut bytes = vec![0x84];
        for (k, v) in [
            ("id", Value::from(1)),
            ("op", s("publish")),
            ("channel", s("a")),
        ] {
            bytes.extend(wire(&s(k)));
            bytes.extend(wire(&v));
        }
        bytes.extend(wire(&s("data")));
        bytes
    };
    let tails: [&[u8]; 4] = [b"", b"\x01", b"\xa1x\xc0", &[0xc0; 64 * 1024]];
    let mut checked = 0;
    for header in huge_headers() {
        for tail in tails {
            let alone = [&header[..], tail].concat();
            let as_data = [&prefix_of_map[..], &header, tail].concat();
            let after_valid = [&valid[..], &header, tail].concat();
            // An array of ~4 G elements whose first element is itself huge.
            let nested = [&[0xdd, 0xff, 0xff, 0xff, 0xff][..], &header, tail].concat();
            for payload in [alone, as_data, after_valid, nested] {
                let result = frame::decode(Encoding::MsgPack, FrameKind::Binary, &payload);
                assert!(
                    matches!(result, Err(FrameError::MsgPack(_))),
                    "header {header:02x?} + {} bytes: {result:?}",
                    tail.len()
                );
                assert!(value::decode_one(&payload).is_err());
                checked += 1;
            }
        }
    }
    assert_eq!(checked, 24 * 4 * 4);
}

// ---------------------------------------------------------------------------
// 5. Wrong types
// ---------------------------------------------------------------------------

/// The message through both encodings it can travel in: as a value, as a
/// MessagePack frame and, when it has a JSON form, as a JSON frame.
fn envelopes(message: &Value, with_json: bool) -> Vec<(String, Result<Envelope, ProtocolError>)> {
    let mut out = vec![("value".to_owned(), Envelope::from_value(message.clone()))];
    let frame = wire(message);
    let decoded =
        frame::decode(Encoding::MsgPack, FrameKind::Binary, &frame).expect("a map frame decodes");
    assert_eq!(decoded.len(), 1);
    out.push((
        "msgpack".to_owned(),
        Envelope::from_value(decoded[0].clone()),
    ));
    if let Some(json) = value::to_json_strict(message).filter(|_| with_json) {
        let line = serde_json::to_string(&json).expect("serializes");
        let decoded = frame::decode(Encoding::Json, FrameKind::Text, line.as_bytes())
            .expect("a JSON object decodes");
        assert_eq!(decoded.len(), 1);
        out.push((line, Envelope::from_value(decoded[0].clone())));
    }
    out
}

#[test]
fn ids_that_are_not_u32_integers_are_protocol_errors() {
    let bad_ids = [
        Value::F32(1.0),
        Value::F64(1.0),
        Value::F64(0.0),
        Value::F64(-0.0),
        Value::F64(4_294_967_295.0),
        s("1"),
        s(""),
        raw_str(vec![0xff]),
        Value::from(-1),
        Value::from(i64::MIN),
        Value::from(u64::from(u32::MAX) + 1),
        Value::from(u64::MAX),
        Value::Array(vec![Value::from(1)]),
        Value::Array(vec![]),
        Value::Map(vec![(s("id"), Value::from(1))]),
        Value::Boolean(true),
        Value::Binary(vec![1]),
        Value::Ext(1, vec![1]),
    ];
    for id in bad_ids {
        let message = map(vec![("id", id.clone()), ("op", s("ping"))]);
        for (via, result) in envelopes(&message, true) {
            assert_eq!(result, Err(ProtocolError::BadId), "id {id:?} via {via}");
        }
    }
    // JSON spellings that must be floats (§6) or out of range.
    for text in [
        r#"{"id":1.0,"op":"ping"}"#,
        r#"{"id":1e0,"op":"ping"}"#,
        r#"{"id":1E2,"op":"ping"}"#,
        r#"{"id":-1,"op":"ping"}"#,
        r#"{"id":4294967296,"op":"ping"}"#,
        r#"{"id":18446744073709551616,"op":"ping"}"#,
        r#"{"id":[1],"op":"ping"}"#,
        r#"{"id":{},"op":"ping"}"#,
        r#"{"id":true,"op":"ping"}"#,
    ] {
        let decoded =
            frame::decode(Encoding::Json, FrameKind::Text, text.as_bytes()).expect("JSON object");
        assert_eq!(
            Envelope::from_value(decoded[0].clone()),
            Err(ProtocolError::BadId),
            "{text}"
        );
    }
}

#[test]
fn ids_at_the_edges_of_u32_are_accepted() {
    for (id, want) in [
        (Some(Value::Nil), 0),
        (None, 0),
        (Some(Value::from(0)), 0),
        (Some(Value::from(1)), 1),
        (Some(Value::from(u32::MAX)), u32::MAX),
        (Some(Value::from(i64::from(u32::MAX))), u32::MAX),
    ] {
        let mut entries = vec![("op", s("ping"))];
        if let Some(id) = id.clone() {
            entries.push(("id", id));
        }
        for (via, result) in envelopes(&map(entries), true) {
            assert_eq!(result.map(|e| e.id), Ok(want), "id {id:?} via {via}");
        }
    }
}

proptest! {
    #![proptest_config(config(512))]

    #[test]
    fn any_non_u32_id_is_a_protocol_error(
        id in any_value().prop_filter("not nil or a u32", |v| {
            !v.is_nil() && v.as_u64().is_none_or(|u| u > u64::from(u32::MAX))
        }),
    ) {
        let message = map(vec![("id", id), ("op", s("ping"))]);
        prop_assert_eq!(Envelope::from_value(message), Err(ProtocolError::BadId));
    }
}

#[test]
fn messages_that_are_not_maps_are_protocol_errors() {
    let not_maps = [
        Value::Array(vec![]),
        Value::Array(vec![map(vec![("id", Value::from(1)), ("op", s("ping"))])]),
        s("ping"),
        s(""),
        Value::from(1),
        Value::from(-1),
        Value::Nil,
        Value::Boolean(false),
        Value::F64(1.0),
        Value::Binary(vec![0x80]),
        Value::Ext(0, vec![0x80]),
    ];
    let ping = map(vec![("id", Value::from(1)), ("op", s("ping"))]);
    for not_map in &not_maps {
        assert_eq!(
            Envelope::from_value(not_map.clone()),
            Err(ProtocolError::NotAMap)
        );
        // Alone, before or after a valid command: the whole frame fails.
        for batch in [
            vec![not_map.clone()],
            vec![not_map.clone(), ping.clone()],
            vec![ping.clone(), not_map.clone()],
        ] {
            let result =
                frame::decode(Encoding::MsgPack, FrameKind::Binary, &msgpack_frame(&batch));
            assert!(
                matches!(result, Err(FrameError::NotAMap)),
                "{batch:?}: {result:?}"
            );
        }
    }
    for text in [
        "[]",
        "[{\"id\":1,\"op\":\"ping\"}]",
        "\"ping\"",
        "1",
        "-1.5",
        "null",
        "true",
        "{\"id\":1,\"op\":\"ping\"}\n[1]",
        "[1]\n{\"id\":1,\"op\":\"ping\"}",
    ] {
        let result = frame::decode(Encoding::Json, FrameKind::Text, text.as_bytes());
        assert!(
            matches!(result, Err(FrameError::NotAMap)),
            "{text}: {result:?}"
        );
    }
}

proptest! {
    #![proptest_config(config(512))]

    #[test]
    fn any_non_map_message_is_refused(value in any_value().prop_filter("not a map", |v| !v.is_map())) {
        prop_assert_eq!(Envelope::from_value(value.clone()), Err(ProtocolError::NotAMap));
        let result = frame::decode(Encoding::MsgPack, FrameKind::Binary, &wire(&value));
        prop_assert!(matches!(result, Err(FrameError::NotAMap)), "{:?}", result);
        if let Some(json) = value::to_json_strict(&value) {
            let line = serde_json::to_string(&json).expect("serializes");
            let result = frame::decode(Encoding::Json, FrameKind::Text, line.as_bytes());
            prop_assert!(matches!(result, Err(FrameError::NotAMap)), "{}: {:?}", line, result);
        }
    }
}

fn parse_code(message: &Value, encoding: Encoding) -> Result<&'static str, ErrorCode> {
    let envelope = Envelope::from_value(message.clone()).expect("valid envelope");
    Command::parse(&envelope, encoding)
        .map(|c| op_name(&c))
        .map_err(|e| e.code)
}

#[test]
fn missing_or_non_string_op_is_bad_request() {
    let non_string_ops = [
        None,
        Some(Value::Nil),
        Some(Value::from(1)),
        Some(Value::from(-1)),
        Some(Value::F64(1.0)),
        Some(Value::Boolean(true)),
        Some(Value::Binary(b"ping".to_vec())),
        Some(Value::Ext(0, b"ping".to_vec())),
        Some(Value::Array(vec![s("ping")])),
        Some(map(vec![("op", s("ping"))])),
        Some(raw_str(b"pi\xffng".to_vec())),
    ];
    for op in non_string_ops {
        let mut entries = vec![("id", Value::from(3))];
        if let Some(op) = op.clone() {
            entries.push(("op", op));
        }
        let message = map(entries);
        // In JSON a binary travels as a base64 string: a string op there.
        let with_json = !matches!(op, Some(Value::Binary(_)));
        for (via, envelope) in envelopes(&message, with_json) {
            let envelope = envelope.expect("the id is valid");
            assert_eq!(envelope.op, None, "op {op:?} via {via}");
            for encoding in Encoding::ALL {
                let code = Command::parse(&envelope, encoding)
                    .map(|c| op_name(&c))
                    .map_err(|e| e.code);
                assert_eq!(code, Err(ErrorCode::BAD_REQUEST), "op {op:?} via {via}");
            }
        }
    }
}

#[test]
fn unknown_ops_are_unknown_op() {
    for op in [
        "",
        " ",
        "PING",
        "Ping",
        " ping",
        "ping ",
        "ping\n",
        "ping\0",
        "pub",
        "publish2",
        "sub",
        "close",
        "disconnect",
        "rpc_part",
        "конект",
    ] {
        let message = map(vec![("id", Value::from(3)), ("op", s(op))]);
        for encoding in Encoding::ALL {
            assert_eq!(
                parse_code(&message, encoding),
                Err(ErrorCode::UNKNOWN_OP),
                "{op:?}"
            );
        }
    }
    // And every known op is known, even when its arguments are wrong.
    for op in OPS {
        let message = map(vec![
            ("id", Value::from(3)),
            ("op", s(op)),
            ("channel", Value::from(5)),
        ]);
        for encoding in Encoding::ALL {
            assert_ne!(
                parse_code(&message, encoding),
                Err(ErrorCode::UNKNOWN_OP),
                "{op}"
            );
        }
    }
}

proptest! {
    #![proptest_config(config(512))]

    #[test]
    fn any_unknown_string_op_is_104_and_any_non_string_op_is_107(
        op in prop_oneof![text(12).prop_map(Value::from), any_value()],
        encoding in select(Encoding::ALL.to_vec()),
    ) {
        let known = op.as_str().is_some_and(|o| OPS.contains(&o));
        prop_assume!(!known);
        let message = map(vec![("id", Value::from(3)), ("op", op.clone())]);
        let want = if op.as_str().is_some() { ErrorCode::UNKNOWN_OP } else { ErrorCode::BAD_REQUEST };
        prop_assert_eq!(parse_code(&message, encoding), Err(want));
    }
}

// ---------------------------------------------------------------------------
// 6. Outbound pushes
// ---------------------------------------------------------------------------

/// Whether §1/§6 give `value` a JSON form: no ext anywhere, map keys strings
/// or integers, strings valid UTF-8.
fn has_json_form(v: &Value) -> bool {
    match v {
        Value::Ext(..) => false,
        Value::String(s) => s.as_str().is_some(),
        Value::Array(items) => items.iter().all(has_json_form),
        Value::Map(entries) => entries.iter().all(|(k, v)| {
            let key_ok = match k {
                Value::Integer(_) => true,
                Value::String(s) => s.as_str().is_some(),
                _ => false,
            };
            key_ok && has_json_form(v)
        }),
        _ => true,
    }
}

/// Whether `json` is `v` converted by the §1/§6 rules: nested binaries as
/// base64, integer keys as strings, non-finite floats as null, integers exact.
fn json_matches(v: &Value, json: &serde_json::Value) -> bool {
    use serde_json::Value as J;
    match (v, json) {
        (Value::Nil, J::Null) => true,
        (Value::Boolean(a), J::Bool(b)) => a == b,
        (Value::Integer(i), J::Number(n)) => match i.as_u64() {
            Some(u) => n.as_u64() == Some(u),
            None => i.as_i64().is_some() && n.as_i64() == i.as_i64(),
        },
        (Value::F32(f), _) => float_matches(f64::from(*f), json),
        (Value::F64(f), _) => float_matches(*f, json),
        (Value::String(s), J::String(t)) => s.as_str() == Some(t.as_str()),
        (Value::Binary(b), J::String(t)) => BASE64.decode(t).is_ok_and(|d| &d == b),
        (Value::Array(items), J::Array(js)) => {
            items.len() == js.len() && items.iter().zip(js).all(|(v, j)| json_matches(v, j))
        }
        (Value::Map(entries), J::Object(object)) => {
            // Two keys that print the same (1 and "1") collapse; the later wins.
            let mut expected: Vec<(String, &Value)> = Vec::new();
            for (k, v) in entries {
                let key = match k {
                    Value::String(s) => s.as_str().map(str::to_owned),
                    Value::Integer(i) => Some(i.to_string()),
                    _ => None,
                };
                let Some(key) = key else { return false };
                expected.retain(|(seen, _)| *seen != key);
                expected.push((key, v));
            }
            expected.len() == object.len()
                && expected
                    .iter()
                    .all(|(k, v)| object.get(k).is_some_and(|j| json_matches(v, j)))
        }
        _ => false,
    }
}

fn float_matches(f: f64, json: &serde_json::Value) -> bool {
    if f.is_finite() {
        // Sent as a float even when integral (§6), so it parses back as f64.
        json.is_f64() && json.as_f64().is_some_and(|g| close_floats(f, g))
    } else {
        json.is_null()
    }
}

fn any_publication() -> impl Strategy<Value = (Publication, Value)> {
    let info = option::of((text(8), text(8), option::of(any_value())));
    (
        text(16),
        any::<u64>(),
        text(6),
        any::<u64>(),
        any_value(),
        info,
    )
        .prop_map(|(channel, offset, epoch, ts, data, info)| {
            let publication = Publication {
                channel,
                offset,
                epoch,
                ts,
                data: wire(&data).into(),
                info: info.map(|(user, client, info)| PubInfo {
                    user,
                    client,
                    info: info.map(|i| wire(&i).into()),
                }),
            };
            (publication, data)
        })
}

proptest! {
    #![proptest_config(config(512))]

    #[test]
    fn msgpack_pub_push_is_one_map_with_the_data_untouched((publication, data) in any_publication()) {
        let bytes = outbound::encode(&outbound::push_pub(&publication), Encoding::MsgPack);
        let decoded = value::decode_one(&bytes)
            .map_err(|e| TestCaseError::fail(format!("not exactly one MessagePack value: {e}")))?;
        prop_assert!(decoded.is_map());
        let got = get(&decoded, "data").ok_or_else(|| TestCaseError::fail("no data"))?;
        prop_assert!(same(got, &data), "{:?} != {:?}", got, data);
        prop_assert_eq!(get(&decoded, "push"), Some(&s("pub")));
        prop_assert_eq!(get(&decoded, "channel"), Some(&s(&publication.channel)));
        prop_assert_eq!(get(&decoded, "offset"), Some(&Value::from(publication.offset)));
        prop_assert_eq!(get(&decoded, "ts"), Some(&Value::from(publication.ts)));
        // A client batch of several pushes splits back into them.
        let frame = [&bytes[..], &bytes].concat();
        let batch = frame::decode(Encoding::MsgPack, FrameKind::Binary, &frame)
            .map_err(|e| TestCaseError::fail(format!("batch refused: {e}")))?;
        prop_assert_eq!(batch.len(), 2);
    }

    #[test]
    fn json_pub_push_is_one_line_with_exactly_one_data_key((publication, data) in any_publication()) {
        let bytes = outbound::encode(&outbound::push_pub(&publication), Encoding::Json);
        prop_assert!(!bytes.contains(&b'\n'), "a JSON message is one line");
        let json: serde_json::Value = serde_json::from_slice(&bytes)
            .map_err(|e| TestCaseError::fail(format!("invalid JSON: {e}")))?;
        let object = json.as_object().ok_or_else(|| TestCaseError::fail("not an object"))?;
        let keys: Vec<&str> = ["data", "data_b64", "data_mp64"]
            .into_iter()
            .filter(|k| object.contains_key(*k))
            .collect();
        prop_assert_eq!(keys.len(), 1, "data keys {:?} in {}", keys, json);
        let raw = wire(&data);
        match (keys[0], &data) {
            ("data_b64", Value::Binary(bin)) => {
                prop_assert_eq!(object["data_b64"].as_str().map(|t| BASE64.decode(t).ok()), Some(Some(bin.clone())));
            }
            ("data_b64", _) => return Err(TestCaseError::fail("data_b64 for a non-binary")),
            (_, Value::Binary(_)) => return Err(TestCaseError::fail("a top-level binary must be data_b64")),
            ("data_mp64", _) => {
                prop_assert!(!has_json_form(&data), "{:?} has a JSON form but came as data_mp64", data);
                let back = object["data_mp64"].as_str().and_then(|t| BASE64.decode(t).ok());
                prop_assert_eq!(back, Some(raw));
            }
            _ => {
                prop_assert!(has_json_form(&data), "{:?} has no JSON form but came as data", data);
                prop_assert!(json_matches(&data, &object["data"]), "{:?} became {}", data, object["data"]);
            }
        }
        prop_assert_eq!(object.get("push").and_then(|p| p.as_str()), Some("pub"));
        prop_assert_eq!(object.get("channel").and_then(|c| c.as_str()), Some(publication.channel.as_str()));
        prop_assert_eq!(object.get("offset").and_then(serde_json::Value::as_u64), Some(publication.offset));
        prop_assert_eq!(object.get("ts").and_then(serde_json::Value::as_u64), Some(publication.ts));
        // The line is itself a valid one-message JSON frame, and two of them a batch.
        let mut frame = bytes.clone();
        frame.extend_from_slice(outbound::separator(Encoding::Json));
        frame.extend_from_slice(&bytes);
        let batch = frame::decode(Encoding::Json, FrameKind::Text, &frame)
            .map_err(|e| TestCaseError::fail(format!("batch refused: {e}")))?;
        prop_assert_eq!(batch.len(), 2);
    }
}

// ---------------------------------------------------------------------------
// Regressions: data passes through byte for byte, and nesting limits agree
// ---------------------------------------------------------------------------

fn parse_one(
    encoding: Encoding,
    kind: FrameKind,
    payload: &[u8],
) -> Result<Command, rt_proto::command::CommandError> {
    let messages = frame::decode(encoding, kind, payload).expect("frame decodes");
    assert_eq!(messages.len(), 1);
    let envelope = Envelope::from_value(messages[0].clone()).expect("valid envelope");
    Command::parse(&envelope, encoding)
}

/// §1: "In MessagePack, `data` is any MessagePack value and passes through
/// untouched." rmpv's own encoder writes a str holding invalid UTF-8 as a
/// bin; `value::encode` must not.
#[test]
fn publish_keeps_a_str_with_invalid_utf8_a_str() {
    // {"id": 1, "op": "publish", "channel": "c", "data": str8 [0x80]}
    let frame = b"\x84\xa2id\x01\xa2op\xa7publish\xa7channel\xa1c\xa4data\xa1\x80";
    let Ok(Command::Publish { data, .. }) = parse_one(Encoding::MsgPack, FrameKind::Binary, frame)
    else {
        panic!("a valid publish");
    };
    assert_eq!(data.as_ref(), b"\xa1\x80");
}

/// §1/§6: only data "with no JSON form at all" goes to JSON clients as
/// `data_mp64`. A JSON client may publish arrays nested up to serde_json's
/// limit (~127), so `value::decode_one` must accept as deep.
#[test]
fn deep_json_data_comes_back_to_json_clients_as_data() {
    let depth = 70;
    let text = format!(
        r#"{{"id":1,"op":"publish","channel":"c","data":{}{}}}"#,
        "[".repeat(depth),
        "]".repeat(depth)
    );
    let Ok(Command::Publish { data, .. }) =
        parse_one(Encoding::Json, FrameKind::Text, text.as_bytes())
    else {
        panic!("a valid publish");
    };
    assert_eq!(value::data_to_json(&data).key(), "data");
}
