//! Channel names (PROTOCOL.md §2).
//!
//! A valid name is also a valid run of NATS subject tokens: its alphabet has no
//! whitespace, `*` or `>`, and the no-empty-token rule keeps `..` out. That is
//! what lets [`crate::subject`] put a channel straight into a subject.

use std::fmt;

/// The longest channel name, in bytes (the alphabet is ASCII).
pub const MAX_CHANNEL_LEN: usize = 200;

/// Why a channel name was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChannelError {
    #[error("channel name is empty")]
    Empty,
    #[error("channel name is longer than {MAX_CHANNEL_LEN} characters")]
    TooLong,
    #[error("channel name has a character outside A-Z a-z 0-9 _ - : @ = .")]
    BadCharacter,
    #[error("channel name has an empty dot-separated token")]
    EmptyToken,
    #[error("channel name has an empty namespace or an empty name after ':'")]
    EmptyPart,
}

/// A validated channel name.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChannelName(String);

impl ChannelName {
    /// Validates `name` against PROTOCOL.md §2.
    pub fn parse(name: &str) -> Result<Self, ChannelError> {
        validate(name)?;
        Ok(Self(name.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn into_string(self) -> String {
        self.0
    }

    /// The namespace: the part before the first `:`, or `None` for the default namespace.
    pub fn namespace(&self) -> Option<&str> {
        namespace_of(&self.0)
    }
}

impl fmt::Display for ChannelName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl AsRef<str> for ChannelName {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

/// The namespace of an already validated name.
pub fn namespace_of(name: &str) -> Option<&str> {
    name.split_once(':').map(|(ns, _)| ns)
}

/// Checks a channel (or RPC method) name without allocating.
pub fn validate(name: &str) -> Result<(), ChannelError> {
    if name.is_empty() {
        return Err(ChannelError::Empty);
    }
    if name.len() > MAX_CHANNEL_LEN {
        return Err(ChannelError::TooLong);
    }
    if !name.bytes().all(is_channel_byte) {
        return Err(ChannelError::BadCharacter);
    }
    if name.split('.').any(str::is_empty) {
        return Err(ChannelError::EmptyToken);
    }
    if let Some((ns, rest)) = name.split_once(':')
        && (ns.is_empty() || rest.is_empty())
    {
        return Err(ChannelError::EmptyPart);
    }
    Ok(())
}

fn is_channel_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b':' | b'@' | b'=' | b'.')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_valid_names() {
        for name in [
            "a",
            "chat:lobby",
            "news.sport",
            "user@42=x",
            "a:b:c",
            "A-Z_0.9",
        ] {
            assert!(validate(name).is_ok(), "{name}");
        }
        assert!(validate(&"x".repeat(200)).is_ok());
    }

    #[test]
    fn refuses_invalid_names() {
        assert_eq!(validate(""), Err(ChannelError::Empty));
        assert_eq!(validate(&"x".repeat(201)), Err(ChannelError::TooLong));
        for name in ["a b", "a*", "a>", "é", "a/b", "a\n", "a\0"] {
            assert_eq!(validate(name), Err(ChannelError::BadCharacter), "{name:?}");
        }
        for name in [".a", "a.", "a..b", "."] {
            assert_eq!(validate(name), Err(ChannelError::EmptyToken), "{name:?}");
        }
        for name in [":a", "a:", ":"] {
            assert_eq!(validate(name), Err(ChannelError::EmptyPart), "{name:?}");
        }
    }

    #[test]
    fn namespace_is_before_first_colon() {
        let ch = ChannelName::parse("chat:room:1").expect("valid");
        assert_eq!(ch.namespace(), Some("chat"));
        let ch = ChannelName::parse("lobby").expect("valid");
        assert_eq!(ch.namespace(), None);
    }
}
