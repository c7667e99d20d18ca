//! Every NATS subject the platform uses, as functions.
//!
//! Services never `format!` a subject themselves. Channel names reach these
//! builders only as [`ChannelName`], whose alphabet cannot inject `*`, `>` or
//! whitespace, and inbound subjects are parsed back strictly.

use crate::channel::{ChannelError, ChannelName};

/// Public: any service publishes a channel's data here (PROTOCOL.md §4).
pub const PUBLISH_PREFIX: &str = "rt.publish.";
/// Internal: gateways publish client and HTTP publications with their envelope here.
pub const INTERNAL_PUBLISH_PREFIX: &str = "rt.bc.publish.";
/// Internal: history queries answered by broadcast.
pub const HISTORY_PREFIX: &str = "rt.bc.history.";
/// Internal: subscribe-time position and recovery queries answered by broadcast.
pub const RECOVER_PREFIX: &str = "rt.bc.recover.";
/// Internal: broadcast delivers sequenced publications to gateways here.
pub const DELIVER_PREFIX: &str = "rt.deliver.";
/// Public: RPC methods are answered here, in a queue group.
pub const RPC_PREFIX: &str = "rt.rpc.";

/// Internal: asks whoever runs RPC request `<id>` to stop (the client left).
pub const CANCEL_PREFIX: &str = "rt.cancel.";

/// The queue group every broadcast instance joins.
pub const BROADCAST_QUEUE: &str = "rt.broadcast";
/// The queue group every compute instance joins on each method it serves.
pub const COMPUTE_QUEUE: &str = "rt.compute";

/// Subject for a public publish to `channel`.
pub fn publish(channel: &ChannelName) -> String {
    join(PUBLISH_PREFIX, channel.as_str())
}

/// Subject for a gateway's enveloped publish to `channel`.
pub fn internal_publish(channel: &ChannelName) -> String {
    join(INTERNAL_PUBLISH_PREFIX, channel.as_str())
}

/// Subject for a history query on `channel`.
pub fn history(channel: &ChannelName) -> String {
    join(HISTORY_PREFIX, channel.as_str())
}

/// Subject for a position / recovery query on `channel`.
pub fn recover(channel: &ChannelName) -> String {
    join(RECOVER_PREFIX, channel.as_str())
}

/// Subject on which `channel`'s sequenced publications are delivered.
pub fn deliver(channel: &ChannelName) -> String {
    join(DELIVER_PREFIX, channel.as_str())
}

/// Subject answering RPC `method` (validated with the channel-name rules).
pub fn rpc(method: &ChannelName) -> String {
    join(RPC_PREFIX, method.as_str())
}

/// Subject cancelling RPC request `request_id` (an id made by [`crate::rpc::request_id`]).
pub fn cancel(request_id: &str) -> String {
    join(CANCEL_PREFIX, request_id)
}

/// Wildcard matching every subject that starts with `prefix` (one of the constants above).
pub fn wildcard(prefix: &str) -> String {
    join(prefix, ">")
}

/// Why an inbound subject was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SubjectError {
    #[error("subject does not start with {expected}")]
    WrongPrefix { expected: &'static str },
    #[error("subject carries an invalid channel name: {0}")]
    BadChannel(#[from] ChannelError),
}

/// Parses the channel out of `subject`, which must start with `prefix`.
pub fn parse_channel(prefix: &'static str, subject: &str) -> Result<ChannelName, SubjectError> {
    let rest = subject
        .strip_prefix(prefix)
        .ok_or(SubjectError::WrongPrefix { expected: prefix })?;
    Ok(ChannelName::parse(rest)?)
}

fn join(prefix: &str, rest: &str) -> String {
    let mut s = String::with_capacity(prefix.len() + rest.len());
    s.push_str(prefix);
    s.push_str(rest);
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ch(name: &str) -> ChannelName {
        ChannelName::parse(name).expect("valid channel")
    }

    #[test]
    fn builds_and_parses_back() {
        let c = ch("chat:room.1");
        assert_eq!(publish(&c), "rt.publish.chat:room.1");
        assert_eq!(deliver(&c), "rt.deliver.chat:room.1");
        for (prefix, subject) in [
            (PUBLISH_PREFIX, publish(&c)),
            (INTERNAL_PUBLISH_PREFIX, internal_publish(&c)),
            (HISTORY_PREFIX, history(&c)),
            (RECOVER_PREFIX, recover(&c)),
            (DELIVER_PREFIX, deliver(&c)),
        ] {
            assert_eq!(parse_channel(prefix, &subject), Ok(c.clone()));
        }
        assert_eq!(wildcard(PUBLISH_PREFIX), "rt.publish.>");
        assert_eq!(rpc(&ch("auth.hash")), "rt.rpc.auth.hash");
    }

    #[test]
    fn refuses_foreign_or_bad_subjects() {
        assert!(matches!(
            parse_channel(PUBLISH_PREFIX, "rt.deliver.x"),
            Err(SubjectError::WrongPrefix { .. })
        ));
        assert!(matches!(
            parse_channel(PUBLISH_PREFIX, "rt.publish."),
            Err(SubjectError::BadChannel(_))
        ));
        assert!(matches!(
            parse_channel(PUBLISH_PREFIX, "rt.publish.a..b"),
            Err(SubjectError::BadChannel(_))
        ));
    }
}
