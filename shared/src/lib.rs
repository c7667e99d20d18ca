//! What every `realtime` service runs on.
//!
//! - [`config`]: defaults → TOML file → `RT_…` environment, validated once.
//! - [`telemetry`]: logs (pretty, or [`log_format`] JSON lines with trace ids),
//!   OpenTelemetry spans exported over OTLP, rate-limited warnings.
//! - [`trace_context`]: W3C `traceparent` carried in NATS and HTTP headers.
//! - [`bus`]: the typed NATS bus (ordered bounded lane, request/reply with deadlines);
//!   [`broadcast_client`], [`session_client`]: the typed clients of the broadcast and session services.
//! - [`metrics`]: per-service Prometheus registry and the common metrics;
//!   [`lag`]: the runtime-lag probe.
//! - [`health`]: `/healthz`, `/readyz`, `/metrics`.
//! - [`cache`]: a bounded in-memory cache whose entries expire, with hit/miss counters.
//! - [`kv`]: the NATS KV buckets holding state every node must see.
//! - [`stats`]: each service's key figures, published every second on `sys:stats`.
//! - [`shutdown`]: SIGTERM/SIGINT as a future; [`service`]: the `main` every binary shares.

pub mod broadcast_client;
pub mod bus;
pub mod cache;
pub mod config;
pub mod health;
pub mod kv;
pub mod lag;
pub mod log_format;
pub mod metrics;
pub mod service;
pub mod session_client;
pub mod shutdown;
pub mod stats;
pub mod telemetry;
pub mod trace_context;

pub use bus::{Bus, BusError};
pub use config::{Config, ConfigError};
