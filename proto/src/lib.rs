//! The wire contract of `realtime`: everything that crosses a socket or NATS.
//!
//! - [`encoding`]: the two WebSocket encodings and subprotocol negotiation.
//! - [`frame`]: inbound frames → messages; [`command`]: messages → typed commands.
//! - [`outbound`]: replies and pushes, encoded once per encoding.
//! - [`value`]: MessagePack ↔ JSON conversion rules.
//! - [`internal`]: service-to-service envelopes; [`subject`]: every NATS subject.
//! - [`rpc`]: the public RPC request/reply shapes on `rt.rpc.<method>`.
//! - [`session`]: gateway ↔ session envelopes and the KV layout of shared state.
//! - [`channel`]: channel-name validation; [`codes`]: error and close codes.
//!
//! No I/O lives here.

pub mod channel;
pub mod codes;
pub mod command;
pub mod encoding;
pub mod frame;
pub mod internal;
pub mod outbound;
pub mod rpc;
pub mod session;
pub mod subject;
pub mod value;

pub use channel::ChannelName;
pub use codes::{CloseCode, ErrorCode};
pub use encoding::Encoding;
