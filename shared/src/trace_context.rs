//! W3C trace context (`traceparent` / `tracestate`) as it rides in NATS and
//! HTTP headers.
//!
//! The ids come from the OpenTelemetry span of the sender
//! ([`crate::telemetry::current_context`]); a receiver continues the trace
//! with [`crate::telemetry::set_remote_parent`], so one user action keeps one
//! trace id across gateway → broadcast → gateway.

use std::fmt::Write as _;

/// Header names, as the W3C spec spells them.
pub const TRACEPARENT: &str = "traceparent";
pub const TRACESTATE: &str = "tracestate";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TraceContext {
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    pub flags: u8,
    pub state: Option<String>,
}

impl TraceContext {
    /// Parses a `traceparent` value (version 00; unknown versions are read
    /// by their first four fields, as the spec asks). Invalid → `None`.
    pub fn parse(traceparent: &str, tracestate: Option<&str>) -> Option<Self> {
        let mut parts = traceparent.trim().split('-');
        let version = parts.next()?;
        let trace = parts.next()?;
        let span = parts.next()?;
        let flags = parts.next()?;
        if version.len() != 2 || version == "ff" || (version == "00" && parts.next().is_some()) {
            return None;
        }
        let trace_id: [u8; 16] = hex_bytes(trace)?;
        let span_id: [u8; 8] = hex_bytes(span)?;
        let [flags]: [u8; 1] = hex_bytes(flags)?;
        if trace_id == [0; 16] || span_id == [0; 8] {
            return None;
        }
        Some(Self {
            trace_id,
            span_id,
            flags,
            state: tracestate.map(str::to_owned).filter(|s| !s.is_empty()),
        })
    }

    /// The `traceparent` header value.
    pub fn traceparent(&self) -> String {
        let mut s = String::with_capacity(55);
        s.push_str("00-");
        push_hex(&mut s, &self.trace_id);
        s.push('-');
        push_hex(&mut s, &self.span_id);
        let _ = write!(s, "-{:02x}", self.flags);
        s
    }

    pub fn span_id_hex(&self) -> String {
        let mut s = String::with_capacity(16);
        push_hex(&mut s, &self.span_id);
        s
    }

    pub fn trace_id_hex(&self) -> String {
        let mut s = String::with_capacity(32);
        push_hex(&mut s, &self.trace_id);
        s
    }

    /// Reads the context from NATS headers.
    pub fn from_nats_headers(headers: Option<&async_nats::HeaderMap>) -> Option<Self> {
        let headers = headers?;
        let parent = headers.get(TRACEPARENT)?;
        Self::parse(parent.as_str(), headers.get(TRACESTATE).map(|v| v.as_str()))
    }

    /// Writes the context into NATS headers.
    pub fn inject_nats(&self, headers: &mut async_nats::HeaderMap) {
        headers.insert(TRACEPARENT, self.traceparent().as_str());
        if let Some(state) = &self.state {
            headers.insert(TRACESTATE, state.as_str());
        }
    }
}

fn push_hex(s: &mut String, bytes: &[u8]) {
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
}

fn hex_bytes<const N: usize>(text: &str) -> Option<[u8; N]> {
    if text.len() != N * 2
        || !text
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    {
        return None;
    }
    let mut out = [0u8; N];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(text.get(i * 2..i * 2 + 2)?, 16).ok()?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_what_it_parses() {
        let header = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let context = TraceContext::parse(header, None).expect("valid");
        assert_eq!(context.traceparent(), header);
        assert_eq!(context.span_id_hex(), "00f067aa0ba902b7");
        assert_eq!(context.flags, 1);
    }

    #[test]
    fn parses_the_spec_example_and_refuses_bad_ones() {
        let ctx = TraceContext::parse(
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            Some("k=v"),
        )
        .expect("spec example");
        assert_eq!(ctx.trace_id_hex(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(ctx.state.as_deref(), Some("k=v"));
        for bad in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
        ] {
            assert!(TraceContext::parse(bad, None).is_none(), "{bad}");
        }
    }

    #[test]
    fn nats_headers_round_trip() {
        let ctx = TraceContext::parse(
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00",
            Some("k=v"),
        )
        .expect("valid");
        let mut headers = async_nats::HeaderMap::new();
        ctx.inject_nats(&mut headers);
        assert_eq!(TraceContext::from_nats_headers(Some(&headers)), Some(ctx));
        assert_eq!(TraceContext::from_nats_headers(None), None);
    }
}
