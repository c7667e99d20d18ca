//! Error codes (a reply's `error.code`) and WebSocket close codes.
//!
//! Each constant's comment says what a client should do when it sees it. The
//! mapping from a failure to a code lives in exactly one place per edge (the
//! gateway's command handler, the HTTP API); everything else passes codes as
//! these constants.

/// A reply's `error.code`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(transparent)]
pub struct ErrorCode(pub u16);

impl ErrorCode {
    /// Something broke inside the platform; the cause is logged, not sent. Retry with backoff.
    pub const INTERNAL: Self = Self(100);
    /// Missing, malformed or badly signed credentials. Do not retry with the same token.
    pub const UNAUTHORIZED: Self = Self(101);
    /// The channel's namespace is not configured.
    pub const UNKNOWN_CHANNEL: Self = Self(102);
    /// The namespace does not allow this (e.g. client publish off).
    pub const PERMISSION_DENIED: Self = Self(103);
    /// Unknown `op`, or unknown RPC method.
    pub const UNKNOWN_OP: Self = Self(104);
    /// The connection is already subscribed to this channel.
    pub const ALREADY_SUBSCRIBED: Self = Self(105);
    /// A configured limit (subscriptions, size, in-flight commands) was hit.
    pub const LIMIT_EXCEEDED: Self = Self(106);
    /// The command decoded but its arguments are wrong.
    pub const BAD_REQUEST: Self = Self(107);
    /// The feature exists in the protocol but is not enabled on this deployment.
    pub const NOT_AVAILABLE: Self = Self(108);
    /// The token has expired: get a new one.
    pub const TOKEN_EXPIRED: Self = Self(109);
    /// Too many requests; temporary, retry later.
    pub const TOO_MANY_REQUESTS: Self = Self(111);
    /// The requested position cannot be served: resubscribe with `since`, refetch if not recovered.
    pub const UNRECOVERABLE_POSITION: Self = Self(112);
    /// The server is busy; temporary, retry after `retry_after_ms`.
    pub const BUSY: Self = Self(113);
    /// No answer within the deadline; temporary.
    pub const TIMEOUT: Self = Self(114);

    /// Whether a client may simply retry the same command later.
    pub fn is_temporary(self) -> bool {
        matches!(self, Self::TOO_MANY_REQUESTS | Self::BUSY | Self::TIMEOUT)
    }

    /// The HTTP status the `/api/*` routes answer with for this code.
    pub fn http_status(self) -> u16 {
        match self {
            Self::BAD_REQUEST | Self::UNKNOWN_CHANNEL => 400,
            Self::UNAUTHORIZED | Self::TOKEN_EXPIRED => 401,
            Self::PERMISSION_DENIED => 403,
            Self::UNKNOWN_OP => 404,
            Self::ALREADY_SUBSCRIBED | Self::UNRECOVERABLE_POSITION => 409,
            Self::LIMIT_EXCEEDED | Self::TOO_MANY_REQUESTS => 429,
            Self::NOT_AVAILABLE => 501,
            Self::BUSY => 503,
            Self::TIMEOUT => 504,
            _ => 500,
        }
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

/// A WebSocket close code the server sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct CloseCode(pub u16);

impl CloseCode {
    /// Normal close.
    pub const NORMAL: Self = Self(1000);
    /// A message over the configured maximum size.
    pub const MESSAGE_TOO_BIG: Self = Self(1009);
    /// Internal error: reconnect with backoff.
    pub const INTERNAL_ERROR: Self = Self(1011);
    /// Protocol error: a bug in the client; do not reconnect.
    pub const PROTOCOL_ERROR: Self = Self(4000);
    /// No `connect` within the configured time: reconnect with backoff.
    pub const CONNECT_TIMEOUT: Self = Self(4001);
    /// Unauthorized: do not reconnect with the same credentials.
    pub const UNAUTHORIZED: Self = Self(4002);
    /// Token expired: reconnect with a new token.
    pub const TOKEN_EXPIRED: Self = Self(4003);
    /// The client did not drain its socket fast enough: reconnect and recover.
    pub const SLOW_CONSUMER: Self = Self(4004);
    /// The server is draining (deploy, scale-in): reconnect after `retry_after_ms` with jitter.
    pub const DRAINING: Self = Self(4005);
    /// Connection limit reached: reconnect with backoff.
    pub const CONNECTION_LIMIT: Self = Self(4006);
    /// Overloaded: reconnect after `retry_after_ms` with jitter.
    pub const OVERLOADED: Self = Self(4007);
    /// Kicked by an operator: do not reconnect.
    pub const KICKED: Self = Self(4008);
    /// Nothing arrived (not even a pong) for three ping intervals: reconnect.
    pub const STALE: Self = Self(4009);

    /// Whether a well-behaved client reconnects after this close.
    pub fn reconnect(self) -> bool {
        !matches!(
            self,
            Self::PROTOCOL_ERROR | Self::UNAUTHORIZED | Self::KICKED
        )
    }

    /// The close that follows a failed first `connect` with this error (PROTOCOL.md §6).
    pub fn after_failed_connect(code: ErrorCode) -> Self {
        match code {
            ErrorCode::UNAUTHORIZED => Self::UNAUTHORIZED,
            ErrorCode::TOKEN_EXPIRED => Self::TOKEN_EXPIRED,
            ErrorCode::LIMIT_EXCEEDED => Self::CONNECTION_LIMIT,
            ErrorCode::TOO_MANY_REQUESTS | ErrorCode::BUSY => Self::OVERLOADED,
            ErrorCode::INTERNAL | ErrorCode::TIMEOUT => Self::INTERNAL_ERROR,
            _ => Self::PROTOCOL_ERROR,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failed_connect_maps_to_documented_close() {
        assert_eq!(
            CloseCode::after_failed_connect(ErrorCode::UNAUTHORIZED),
            CloseCode(4002)
        );
        assert_eq!(
            CloseCode::after_failed_connect(ErrorCode::TOKEN_EXPIRED),
            CloseCode(4003)
        );
        assert_eq!(
            CloseCode::after_failed_connect(ErrorCode::BAD_REQUEST),
            CloseCode(4000)
        );
        assert_eq!(
            CloseCode::after_failed_connect(ErrorCode::LIMIT_EXCEEDED),
            CloseCode(4006)
        );
        assert_eq!(
            CloseCode::after_failed_connect(ErrorCode::TOO_MANY_REQUESTS),
            CloseCode(4007)
        );
        assert_eq!(
            CloseCode::after_failed_connect(ErrorCode::BUSY),
            CloseCode(4007)
        );
        assert_eq!(
            CloseCode::after_failed_connect(ErrorCode::INTERNAL),
            CloseCode(1011)
        );
        assert_eq!(
            CloseCode::after_failed_connect(ErrorCode::TIMEOUT),
            CloseCode(1011)
        );
    }

    #[test]
    fn temporary_codes() {
        assert!(ErrorCode::BUSY.is_temporary());
        assert!(ErrorCode::TIMEOUT.is_temporary());
        assert!(ErrorCode::TOO_MANY_REQUESTS.is_temporary());
        assert!(!ErrorCode::BAD_REQUEST.is_temporary());
    }

    #[test]
    fn http_statuses_follow_the_protocol() {
        assert_eq!(ErrorCode::BAD_REQUEST.http_status(), 400);
        assert_eq!(ErrorCode::UNKNOWN_CHANNEL.http_status(), 400);
        assert_eq!(ErrorCode::UNAUTHORIZED.http_status(), 401);
        assert_eq!(ErrorCode::UNKNOWN_OP.http_status(), 404);
        assert_eq!(ErrorCode::UNRECOVERABLE_POSITION.http_status(), 409);
        assert_eq!(ErrorCode::BUSY.http_status(), 503);
        assert_eq!(ErrorCode::INTERNAL.http_status(), 500);
    }
}
