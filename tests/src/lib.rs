//! Test harness for end-to-end tests: a real `nats-server` on a free port,
//! the real services in-process on port 0, and a real WebSocket client that
//! speaks the public protocol.
//!
//! - [`NatsServer`]: started per test, JetStream on, temp dir, killed on drop.
//! - [`TestCluster`]: NATS + broadcast + session + N gateways, configured per test.
//! - [`tokens`]: JWTs signed with the cluster's test secret.
//! - [`WsClient`]: a protocol client over tokio-tungstenite, both encodings.
//! - [`http`]: a minimal HTTP/1.1 client for `/api/*` and ops endpoints.
//! - [`presence`]: joining with a token, `join`/`leave` pushes, `/api/presence`.
//! - [`process`]: the services' real binaries as child processes (`kill -9`).

#![allow(
    clippy::expect_used,
    reason = "test code: a failed expectation is a failed test"
)]

pub mod cluster;
pub mod http;
pub mod nats;
pub mod presence;
pub mod process;
pub mod tokens;
pub mod ws_client;

pub use cluster::TestCluster;
pub use nats::NatsServer;
pub use ws_client::{WsClient, WsEncoding};

use std::future::Future;
use std::time::Duration;

/// How long one step of a test may take before it fails.
pub const STEP: Duration = Duration::from_secs(10);

/// Every await in a test runs under a deadline.
pub async fn within<T>(what: &str, duration: Duration, fut: impl Future<Output = T>) -> T {
    match tokio::time::timeout(duration, fut).await {
        Ok(value) => value,
        Err(_) => panic!("timed out after {duration:?} waiting for {what}"),
    }
}

/// Polls `check` until it returns `Some`, or panics after `duration`.
pub async fn eventually<T, F, Fut>(what: &str, duration: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + duration;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        if tokio::time::Instant::now() >= deadline {
            panic!("condition not met within {duration:?}: {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits until the NATS server has processed everything `client` sent so far
/// (its subscriptions included): async-nats' `flush` only empties the socket
/// buffer, while a request nobody serves is answered "no responders" only
/// after the server handled all that came before it on this connection.
pub async fn nats_sync(client: &async_nats::Client) {
    let subject = format!("{}.sync", client.new_inbox());
    match client.request(subject, bytes::Bytes::new()).await {
        Ok(_) => {}
        Err(error) if error.kind() == async_nats::RequestErrorKind::NoResponders => {}
        Err(error) => panic!("NATS round trip failed: {error}"),
    }
}
