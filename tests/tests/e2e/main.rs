//! End-to-end tests: a real nats-server, the real services, a real WebSocket
//! client speaking the public protocol from outside.

#![allow(
    clippy::expect_used,
    reason = "test code: a failed expectation is a failed test"
)]

mod database;
mod delivery;
mod demo;
mod failures;
mod http_api;
mod lifecycle;
mod loss;
mod presence;
mod protocol;
mod rpc;
mod session;
mod session_failures;
mod slow_consumers;

use std::time::Duration;

pub use rt_tests::cluster::API_KEY;
pub use rt_tests::{TestCluster, WsClient, WsEncoding, eventually, within};

pub use rt_tests::STEP;
