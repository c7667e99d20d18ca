//! What every `realtime` service runs on.
//!
//! - [`config`]: defaults → TOML file → `RT_…` environment, validated once.
//! - [`telemetry`]: logs (pretty, or [`log_format`] JSON lines with trace ids),
//!   OpenTelemetry spans exported over OTLP, rate-limited warnings.
//! - [`trace_context`]: W3C `traceparent` carried in NATS and HTTP headers.
//! - [`bus`]: the typed NATS bus (ordered bounded lane, request/reply with deadlines);
//!   [`broadcast_client`]: the typed client for the broadcast service.
//! - [`metrics`]: per-service Prometheus registry and the common metrics;
//!   [`lag`]: the runtime-lag probe.
//! - [`health`]: `/healthz`, `/readyz`, `/metrics`.
//! - [`shutdown`]: SIGTERM/SIGINT as a future; [`service`]: the `main` every binary shares.

pub mod broadcast_client;
pub mod bus;
pub mod config;
pub mod health;
pub mod lag;
pub mod log_format;
pub mod metrics;
pub mod service;
pub mod shutdown;
pub mod telemetry;
pub mod trace_context;

pub use bus::{Bus, BusError};
pub use config::{Config, ConfigError};
