//! The two wire encodings a WebSocket client can choose (PROTOCOL.md §1).

/// A connection's encoding, chosen once by `Sec-WebSocket-Protocol`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Encoding {
    /// `rt.v1.msgpack`: binary frames, concatenated MessagePack maps.
    MsgPack,
    /// `rt.v1.json` (or no subprotocol): text frames, one JSON object per line.
    Json,
}

/// Subprotocol name for [`Encoding::MsgPack`].
pub const SUBPROTOCOL_MSGPACK: &str = "rt.v1.msgpack";
/// Subprotocol name for [`Encoding::Json`].
pub const SUBPROTOCOL_JSON: &str = "rt.v1.json";

impl Encoding {
    /// Both encodings, in a fixed order (used to index per-encoding caches).
    pub const ALL: [Encoding; 2] = [Encoding::MsgPack, Encoding::Json];

    pub fn from_subprotocol(name: &str) -> Option<Self> {
        match name {
            SUBPROTOCOL_MSGPACK => Some(Self::MsgPack),
            SUBPROTOCOL_JSON => Some(Self::Json),
            _ => None,
        }
    }

    pub fn subprotocol(self) -> &'static str {
        match self {
            Self::MsgPack => SUBPROTOCOL_MSGPACK,
            Self::Json => SUBPROTOCOL_JSON,
        }
    }

    /// Position in [`Encoding::ALL`].
    pub fn index(self) -> usize {
        match self {
            Self::MsgPack => 0,
            Self::Json => 1,
        }
    }

    /// Negotiates from the client's `Sec-WebSocket-Protocol` offers, in the
    /// client's order. `Ok(None)` means no subprotocol was offered (JSON, and
    /// no subprotocol header in the answer); `Err` means only unsupported ones were.
    pub fn negotiate<'a>(
        offers: impl IntoIterator<Item = &'a str>,
    ) -> Result<Option<Encoding>, UnsupportedSubprotocol> {
        let mut offered_any = false;
        for offer in offers.into_iter().map(str::trim).filter(|o| !o.is_empty()) {
            offered_any = true;
            if let Some(encoding) = Self::from_subprotocol(offer) {
                return Ok(Some(encoding));
            }
        }
        if offered_any {
            Err(UnsupportedSubprotocol)
        } else {
            Ok(None)
        }
    }
}

/// Every subprotocol the client offered is unknown.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error(
    "none of the offered WebSocket subprotocols is supported (use rt.v1.msgpack or rt.v1.json)"
)]
pub struct UnsupportedSubprotocol;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn negotiation_takes_the_first_supported_in_client_order() {
        assert_eq!(
            Encoding::negotiate(["x", "rt.v1.json", "rt.v1.msgpack"]),
            Ok(Some(Encoding::Json))
        );
        assert_eq!(
            Encoding::negotiate(["rt.v1.msgpack", "rt.v1.json"]),
            Ok(Some(Encoding::MsgPack))
        );
        assert_eq!(Encoding::negotiate([]), Ok(None));
        assert_eq!(
            Encoding::negotiate(["chat", "v2"]),
            Err(UnsupportedSubprotocol)
        );
    }
}
