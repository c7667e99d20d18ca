//! Configuration: defaults → TOML file → `RT_…` environment, validated once.
//!
//! One file configures the whole cluster (every service reads the sections it
//! needs), because namespaces matter to more than one service. Environment
//! overrides follow one rule, `RT_<SECTION>__<KEY>` (e.g.
//! `RT_GATEWAY__MAX_MESSAGE_SIZE=131072`), plus the shorthands in [`SHORTHANDS`].
//! The file is named by `RT_CONFIG`. Unknown keys are errors, so a typo is
//! reported instead of silently ignored.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::Path;

use serde::Deserialize;

/// Environment shorthands for the settings a developer sets most.
pub const SHORTHANDS: &[(&str, &str)] = &[
    ("RT_NATS_URL", "nats.url"),
    ("RT_HTTP_ADDR", "gateway.http_addr"),
    ("RT_API_KEY", "gateway.api_key"),
    ("RT_LOG_FORMAT", "log.format"),
];

/// Why configuration could not be loaded; the message names the bad key.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Parse { path: String, message: String },
    #[error("environment variable {var}: {message}")]
    Env { var: String, message: String },
    #[error("invalid config: {key}: {message}")]
    Invalid { key: String, message: String },
}

/// A secret that never prints.
#[derive(Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if self.0.is_empty() { "\"\"" } else { "\"***\"" })
    }
}

#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub nats: NatsConfig,
    pub log: LogConfig,
    pub telemetry: TelemetryConfig,
    pub gateway: GatewayConfig,
    pub broadcast: BroadcastConfig,
    pub compute: ComputeConfig,
    pub session: SessionConfig,
    /// Options of channels without a `:` namespace.
    pub default_namespace: NamespaceConfig,
    /// Options of each named namespace; channels in any other namespace get 102.
    pub namespaces: BTreeMap<String, NamespaceConfig>,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct NatsConfig {
    pub url: String,
    /// Deadline for requests between services.
    pub request_timeout_ms: u64,
    /// Messages a subscription may buffer before NATS reports a slow consumer.
    pub subscription_capacity: usize,
    /// Outgoing messages queued towards the NATS connection before callers get "busy".
    pub publish_queue: usize,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    /// `pretty` for development, `json` for production.
    pub format: LogFormat,
    /// A `tracing` filter; `RUST_LOG` wins when set.
    pub filter: String,
}

/// OpenTelemetry export. Unset values fall back to the standard `OTEL_*`
/// variables (`OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`, `OTEL_EXPORTER_OTLP_ENDPOINT`,
/// `OTEL_TRACES_SAMPLER_ARG`, `OTEL_SERVICE_NAME`), then to the defaults.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct TelemetryConfig {
    /// Export spans over OTLP/HTTP. Off by default: trace context still
    /// travels in headers, nothing is sent anywhere.
    pub otlp_enabled: bool,
    /// Full OTLP/HTTP traces URL (`…/v1/traces`); default `http://127.0.0.1:4318/v1/traces`.
    pub otlp_endpoint: Option<String>,
    /// Fraction of new traces sampled (a sampled caller's trace is always followed); default 1.0.
    pub sampling_ratio: Option<f64>,
    /// `service.name` of the spans; default the binary's name.
    pub service_name: Option<String>,
    /// How often each service publishes its key figures on `sys:stats`
    /// (when the `sys` namespace is configured); 0 turns it off.
    pub stats_interval_ms: u64,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Pretty,
    Json,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct GatewayConfig {
    /// WebSocket, HTTP API, health and metrics; port 0 picks a free port.
    pub http_addr: String,
    /// `Authorization: apikey <key>` for `/api/*`; empty disables the API.
    pub api_key: Secret,
    /// actix workers (threads); 0 means one per core.
    pub workers: usize,
    /// Largest inbound WebSocket message (after reassembly) and HTTP body.
    pub max_message_size: usize,
    /// Time a new socket has to send `connect`.
    pub connect_timeout_ms: u64,
    /// WebSocket ping interval; three silent intervals close with 4009.
    pub ping_interval_ms: u64,
    /// Per-connection outbound bound in bytes; past it the namespace's slow-consumer policy applies.
    pub outbound_buffer_bytes: usize,
    /// Queued bytes past which a connection conflates its subscriptions in
    /// `auto` namespaces; 0: half of `outbound_buffer_bytes`.
    pub auto_conflate_threshold_bytes: usize,
    /// Queued bytes under which such a connection delivers everything again;
    /// 0: a quarter of the threshold.
    pub auto_conflate_low_water_bytes: usize,
    /// Largest frame the writer coalesces queued messages into.
    pub max_batch_bytes: usize,
    /// Whether clients may connect without a token (user "").
    pub allow_anonymous: bool,
    /// Default deadline of a client's `rpc` (a client may ask for less with `timeout_ms`).
    pub rpc_timeout_ms: u64,
    /// Partial results of one `rpc` that may wait unread before the call fails.
    pub rpc_max_pending_parts: usize,
    /// Publications a subscriber may receive while its `subscribe` is being answered.
    pub max_pending_while_subscribing: usize,
    /// Subscriptions one connection may hold.
    pub max_subscriptions_per_connection: usize,
    /// Commands of one connection waiting for another service at once.
    pub max_inflight_per_connection: usize,
    /// Base of the jittered `retry_after_ms` sent with 4005 on shutdown.
    pub drain_retry_after_ms: u64,
    /// How long shutdown waits for sockets to close before it stops anyway.
    pub drain_timeout_ms: u64,
    /// Node name shown to clients; empty generates one.
    pub node_name: String,
    /// New connections admitted per second (token bucket refill); 0 admits all.
    pub connect_rate: u32,
    /// Connections admitted at once before the rate applies (bucket size).
    pub connect_burst: u32,
    /// Base of the jittered `retry_after_ms` sent with 4007 when admission refuses.
    pub admission_retry_after_ms: u64,
    /// Distinct channels this node may hold subscriptions for; past it, 106.
    pub max_channels: usize,
    /// How often this node announces itself alive (presence and sessions
    /// of a node that stops are cleaned up after `session.node_ttl_ms`).
    pub heartbeat_ms: u64,
    /// Join/leave events of one channel collected this long before they go
    /// out as one message (only while events keep coming; an isolated one goes at once).
    pub presence_batch_ms: u64,
    /// Serve the demo app (chat and ops dashboard) at `/`.
    pub demo: bool,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct BroadcastConfig {
    /// Health and metrics endpoint; port 0 picks a free port.
    pub http_addr: String,
    /// Sequencer actors (channels are spread over them by hash); 0 means one
    /// per core. One runs on the main thread beside the NATS connection (no
    /// hand-off between threads per publication); more run a thread each.
    pub shards: usize,
    /// Largest `limit` a history query may ask for.
    pub history_max_limit: u32,
    /// Largest publication data in bytes.
    pub max_data_bytes: usize,
    /// Sequencer mailbox bound; a full shard answers 113.
    pub shard_mailbox: usize,
    /// How long an idempotency key returns its first publish's position.
    pub idempotency_window_secs: u64,
    /// A channel with no activity for this long is dropped from memory (with
    /// `history_store = "memory"` only once its history is empty too, and its
    /// next publication starts a new epoch; with JetStream it is loaded back
    /// from the record when next used).
    pub channel_idle_secs: u64,
    /// Where history lives: `jetstream` (the record: survives restarts of
    /// broadcast, several instances share it) or `memory` (this process only).
    pub history_store: HistoryStore,
    /// Replicas of the history streams (1 on a single server; 3 in a JetStream cluster).
    pub history_replicas: usize,
    /// How long a history write or read may wait for JetStream.
    pub history_timeout_ms: u64,
    /// History writes awaiting JetStream's acknowledgement, per shard; past it
    /// publishes get 113.
    pub history_max_inflight: usize,
    /// JetStream duplicate window of the history streams: how long a second
    /// writer of the same channel offset is refused (fencing). Capped by the
    /// namespace's `history_ttl_secs`.
    pub history_duplicate_window_secs: u64,
    /// Publications per channel kept in memory in front of the record; older
    /// ones are read from JetStream when asked for. 0: the namespace's `history_size`.
    pub memory_window: usize,
    /// This instance's name in partition leases; empty generates one per
    /// process. A stable name (e.g. a StatefulSet pod name) lets a restarted
    /// instance take its partitions back without waiting for the leases to expire.
    pub instance_id: String,
    /// Lifetime of a partition lease: when an instance dies, its partitions
    /// move to the others after this long.
    pub lease_ttl_ms: u64,
}

/// Where the broadcast service keeps channel history.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum HistoryStore {
    /// JetStream streams, one per namespace: the history of record.
    Jetstream,
    /// Only the broadcast process's memory: lost on restart.
    Memory,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ComputeConfig {
    /// Health and metrics endpoint; port 0 picks a free port.
    pub http_addr: String,
    /// Worker threads running jobs; 0 means one per core.
    pub workers: usize,
    /// Jobs accepted but not yet started; past it callers get 113 at once.
    pub queue_capacity: usize,
    /// argon2id memory cost in KiB (OWASP minimum: 19456).
    pub argon2_memory_kib: u32,
    /// argon2id iterations.
    pub argon2_iterations: u32,
    /// argon2id lanes.
    pub argon2_parallelism: u32,
    /// Values `stats.summarize` accepts in one call.
    pub max_values: usize,
}

/// The session service: tokens, sessions, presence reads, persistence.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct SessionConfig {
    /// Health and metrics endpoint; port 0 picks a free port.
    pub http_addr: String,
    /// `sqlite://path` (created if missing), `sqlite::memory:`, or `postgres://…`.
    pub database_url: String,
    /// HS256 secret; empty disables HS256 tokens.
    pub jwt_hmac_secret: Secret,
    /// PEM public key (RSA → RS256, EC P-256 → ES256), inline; empty disables.
    pub jwt_public_key_pem: String,
    /// Same as `jwt_public_key_pem`, read from a file.
    pub jwt_public_key_file: String,
    /// Clock skew tolerated on `exp` (and `nbf`), in seconds.
    pub jwt_leeway_secs: u64,
    /// How long a session can be resumed after its connection ended.
    pub resume_ttl_secs: u64,
    /// Live connections one user may hold across the cluster; 0: no limit.
    pub max_connections_per_user: u32,
    /// Requests waiting to be handled; past it callers get 113 with a retry hint.
    pub queue_capacity: usize,
    /// Verified tokens and authorization verdicts kept in memory.
    pub cache_capacity: usize,
    /// Longest a cached verdict lives (never past the token's `exp`).
    pub cache_ttl_secs: u64,
    /// Database writes per batch (write-behind).
    pub write_batch_size: usize,
    /// How long a write waits for its batch to fill.
    pub write_interval_ms: u64,
    /// Writes held in memory while the database is slow or down; past it the
    /// oldest audit rows are dropped (counted), sessions and revocations kept.
    pub write_buffer: usize,
    /// Sessions read from the database into the cache at start-up.
    pub warm_sessions: usize,
    /// A gateway silent for this long is considered gone: its clients leave presence.
    pub node_ttl_ms: u64,
    /// Channels with more present clients than this answer `presence` with a count.
    pub presence_max_list: usize,
    /// Connection audit rows older than this are deleted (0: kept forever).
    pub audit_retention_days: u64,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct NamespaceConfig {
    /// Publications kept per channel for `history` and recovery (0: none).
    pub history_size: usize,
    /// How long a publication stays in history.
    pub history_ttl_secs: u64,
    /// Whether clients may publish (HTTP and NATS publishers always may).
    pub client_publish: bool,
    /// Whether anonymous clients may subscribe and publish here.
    pub allow_anonymous: bool,
    /// What happens when a subscriber cannot keep up.
    pub slow_consumer: SlowConsumerPolicy,
    /// Subscribing needs the channel in the token's `channels` claim or a channel token.
    pub private: bool,
    /// Whether `presence` answers for channels here.
    pub presence: bool,
    /// Whether subscribers get `join`/`leave` pushes.
    pub join_leave: bool,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum SlowConsumerPolicy {
    /// Drop the client's queue and close with 4004; it reconnects and recovers.
    Disconnect,
    /// Keep only the newest queued publication of the channel for that
    /// client until it drains (its offsets jump); never close for it.
    Conflate,
    /// Deliver everything while the connection keeps up; conflate once its
    /// queue passes `gateway.auto_conflate_threshold_bytes`, until it drains
    /// under `gateway.auto_conflate_low_water_bytes`.
    Auto,
}

impl Default for NatsConfig {
    fn default() -> Self {
        Self {
            url: "nats://127.0.0.1:4222".into(),
            request_timeout_ms: 5_000,
            subscription_capacity: 65_536,
            publish_queue: 65_536,
        }
    }
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            format: LogFormat::Pretty,
            filter: "info".into(),
        }
    }
}

impl Default for GatewayConfig {
    fn default() -> Self {
        Self {
            http_addr: "127.0.0.1:8080".into(),
            api_key: Secret::default(),
            workers: 0,
            max_message_size: 64 * 1024,
            connect_timeout_ms: 10_000,
            ping_interval_ms: 25_000,
            outbound_buffer_bytes: 1024 * 1024,
            auto_conflate_threshold_bytes: 0,
            auto_conflate_low_water_bytes: 0,
            max_batch_bytes: 16 * 1024,
            allow_anonymous: true,
            rpc_timeout_ms: 10_000,
            rpc_max_pending_parts: 256,
            max_pending_while_subscribing: 1_000,
            max_subscriptions_per_connection: 512,
            max_inflight_per_connection: 256,
            drain_retry_after_ms: 2_000,
            drain_timeout_ms: 5_000,
            node_name: String::new(),
            connect_rate: 0,
            connect_burst: 1_000,
            admission_retry_after_ms: 1_000,
            max_channels: 100_000,
            heartbeat_ms: 2_000,
            presence_batch_ms: 50,
            demo: true,
        }
    }
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        Self {
            otlp_enabled: false,
            otlp_endpoint: None,
            sampling_ratio: None,
            service_name: None,
            stats_interval_ms: 1_000,
        }
    }
}

impl Default for BroadcastConfig {
    fn default() -> Self {
        Self {
            http_addr: "127.0.0.1:8081".into(),
            shards: 1,
            history_max_limit: 1_000,
            max_data_bytes: 64 * 1024,
            shard_mailbox: 16_384,
            idempotency_window_secs: 300,
            channel_idle_secs: 3_600,
            history_store: HistoryStore::Jetstream,
            history_replicas: 1,
            history_timeout_ms: 5_000,
            history_max_inflight: 4_096,
            history_duplicate_window_secs: 120,
            memory_window: 0,
            instance_id: String::new(),
            lease_ttl_ms: 5_000,
        }
    }
}

impl Default for ComputeConfig {
    fn default() -> Self {
        Self {
            http_addr: "127.0.0.1:8082".into(),
            workers: 0,
            queue_capacity: 64,
            argon2_memory_kib: 19_456,
            argon2_iterations: 2,
            argon2_parallelism: 1,
            max_values: 1_000_000,
        }
    }
}

impl Default for SessionConfig {
    fn default() -> Self {
        Self {
            http_addr: "127.0.0.1:8083".into(),
            database_url: "sqlite://rt-session.db".into(),
            jwt_hmac_secret: Secret::default(),
            jwt_public_key_pem: String::new(),
            jwt_public_key_file: String::new(),
            jwt_leeway_secs: 5,
            resume_ttl_secs: 300,
            max_connections_per_user: 100,
            queue_capacity: 4_096,
            cache_capacity: 100_000,
            cache_ttl_secs: 300,
            write_batch_size: 500,
            write_interval_ms: 100,
            write_buffer: 100_000,
            warm_sessions: 10_000,
            node_ttl_ms: 10_000,
            presence_max_list: 1_000,
            audit_retention_days: 30,
        }
    }
}

impl Default for NamespaceConfig {
    fn default() -> Self {
        Self {
            history_size: 100,
            history_ttl_secs: 300,
            client_publish: true,
            allow_anonymous: true,
            slow_consumer: SlowConsumerPolicy::Disconnect,
            private: false,
            presence: false,
            join_leave: false,
        }
    }
}

impl Config {
    /// Loads from `RT_CONFIG` (if set) and the process environment.
    pub fn from_env() -> Result<Self, ConfigError> {
        let vars: Vec<(String, String)> = std::env::vars().collect();
        let file = vars
            .iter()
            .find(|(k, _)| k == "RT_CONFIG")
            .map(|(_, v)| v.clone());
        Self::load(file.as_deref().map(Path::new), &vars)
    }

    /// Loads from an optional file and explicit `RT_…` variables (tests pass their own).
    pub fn load(file: Option<&Path>, vars: &[(String, String)]) -> Result<Self, ConfigError> {
        let (mut table, path) = match file {
            Some(path) => {
                let shown = path.display().to_string();
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: shown.clone(),
                    source,
                })?;
                let table: toml::Table = toml::from_str(&text).map_err(|e| ConfigError::Parse {
                    path: shown.clone(),
                    message: e.to_string(),
                })?;
                (table, shown)
            }
            None => (toml::Table::new(), "(none)".to_owned()),
        };
        for (var, value) in vars {
            if let Some(key) = env_key(var) {
                set_path(&mut table, &key, parse_env_value(value)).map_err(|message| {
                    ConfigError::Env {
                        var: var.clone(),
                        message,
                    }
                })?;
            }
        }
        let config: Config =
            toml::Value::Table(table)
                .try_into()
                .map_err(|e: toml::de::Error| ConfigError::Parse {
                    path,
                    message: e.to_string(),
                })?;
        config.validate()?;
        Ok(config)
    }

    /// Checks what types alone cannot, naming the key at fault.
    pub fn validate(&self) -> Result<(), ConfigError> {
        fn invalid(key: &str, message: impl Into<String>) -> ConfigError {
            ConfigError::Invalid {
                key: key.to_owned(),
                message: message.into(),
            }
        }
        if !(self.nats.url.starts_with("nats://") || self.nats.url.starts_with("tls://")) {
            return Err(invalid("nats.url", "must start with nats:// or tls://"));
        }
        if self.nats.request_timeout_ms == 0 {
            return Err(invalid("nats.request_timeout_ms", "must be > 0"));
        }
        if self.nats.publish_queue == 0 || self.nats.subscription_capacity == 0 {
            return Err(invalid("nats.publish_queue", "queues must be > 0"));
        }
        for (key, addr) in [
            ("gateway.http_addr", &self.gateway.http_addr),
            ("broadcast.http_addr", &self.broadcast.http_addr),
            ("compute.http_addr", &self.compute.http_addr),
            ("session.http_addr", &self.session.http_addr),
        ] {
            addr.parse::<SocketAddr>()
                .map_err(|e| invalid(key, format!("{addr:?} is not ip:port ({e})")))?;
        }
        let g = &self.gateway;
        if g.max_message_size < 256 {
            return Err(invalid(
                "gateway.max_message_size",
                "must be at least 256 bytes",
            ));
        }
        if g.outbound_buffer_bytes < 4096 {
            return Err(invalid(
                "gateway.outbound_buffer_bytes",
                "must be at least 4096 bytes",
            ));
        }
        if g.max_batch_bytes == 0 || g.max_batch_bytes > g.outbound_buffer_bytes {
            return Err(invalid(
                "gateway.max_batch_bytes",
                "must be > 0 and not above outbound_buffer_bytes",
            ));
        }
        if g.auto_conflate_threshold_bytes >= g.outbound_buffer_bytes {
            return Err(invalid(
                "gateway.auto_conflate_threshold_bytes",
                "must be below outbound_buffer_bytes (0: half of it)",
            ));
        }
        let threshold = match g.auto_conflate_threshold_bytes {
            0 => g.outbound_buffer_bytes / 2,
            n => n,
        };
        if g.auto_conflate_low_water_bytes >= threshold {
            return Err(invalid(
                "gateway.auto_conflate_low_water_bytes",
                "must be below auto_conflate_threshold_bytes (0: a quarter of it)",
            ));
        }
        for (key, value) in [
            ("gateway.connect_timeout_ms", g.connect_timeout_ms),
            ("gateway.ping_interval_ms", g.ping_interval_ms),
        ] {
            if value == 0 {
                return Err(invalid(key, "must be > 0"));
            }
        }
        if g.max_inflight_per_connection == 0 {
            return Err(invalid(
                "gateway.max_inflight_per_connection",
                "must be > 0",
            ));
        }
        if let Some(ratio) = self.telemetry.sampling_ratio
            && !(0.0..=1.0).contains(&ratio)
        {
            return Err(invalid(
                "telemetry.sampling_ratio",
                "must be between 0 and 1",
            ));
        }
        if let Some(endpoint) = &self.telemetry.otlp_endpoint
            && !(endpoint.starts_with("http://") || endpoint.starts_with("https://"))
        {
            return Err(invalid(
                "telemetry.otlp_endpoint",
                "must be an http:// or https:// URL",
            ));
        }
        let stats = self.telemetry.stats_interval_ms;
        if stats > 0 && stats < 100 {
            return Err(invalid(
                "telemetry.stats_interval_ms",
                "must be 0 (off) or at least 100",
            ));
        }
        if g.rpc_timeout_ms == 0 {
            return Err(invalid("gateway.rpc_timeout_ms", "must be > 0"));
        }
        let c = &self.compute;
        if c.queue_capacity == 0 {
            return Err(invalid("compute.queue_capacity", "must be > 0"));
        }
        if c.argon2_memory_kib < 8 * c.argon2_parallelism.max(1)
            || c.argon2_iterations == 0
            || c.argon2_parallelism == 0
        {
            return Err(invalid(
                "compute.argon2_memory_kib",
                "argon2 needs iterations ≥ 1, parallelism ≥ 1 and memory ≥ 8 KiB per lane",
            ));
        }
        if self.broadcast.history_max_limit == 0 {
            return Err(invalid("broadcast.history_max_limit", "must be > 0"));
        }
        if self.broadcast.shard_mailbox == 0 {
            return Err(invalid("broadcast.shard_mailbox", "must be > 0"));
        }
        let b = &self.broadcast;
        for (key, value) in [
            ("broadcast.history_replicas", b.history_replicas as u64),
            ("broadcast.history_timeout_ms", b.history_timeout_ms),
            (
                "broadcast.history_max_inflight",
                b.history_max_inflight as u64,
            ),
            (
                "broadcast.history_duplicate_window_secs",
                b.history_duplicate_window_secs,
            ),
        ] {
            if value == 0 {
                return Err(invalid(key, "must be > 0"));
            }
        }
        if b.lease_ttl_ms < 500 {
            return Err(invalid("broadcast.lease_ttl_ms", "must be at least 500"));
        }
        if !b
            .instance_id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            || b.instance_id.len() > 64
        {
            return Err(invalid(
                "broadcast.instance_id",
                "0-64 characters of A-Z a-z 0-9 - _",
            ));
        }
        if g.heartbeat_ms == 0 {
            return Err(invalid("gateway.heartbeat_ms", "must be > 0"));
        }
        if g.connect_rate > 0 && g.connect_burst == 0 {
            return Err(invalid(
                "gateway.connect_burst",
                "must be > 0 when connect_rate is set",
            ));
        }
        let s = &self.session;
        if !(s.database_url.starts_with("sqlite:")
            || s.database_url.starts_with("postgres://")
            || s.database_url.starts_with("postgresql://"))
        {
            return Err(invalid(
                "session.database_url",
                "must start with sqlite:, postgres:// or postgresql://",
            ));
        }
        if !s.jwt_public_key_pem.is_empty() && !s.jwt_public_key_file.is_empty() {
            return Err(invalid(
                "session.jwt_public_key_file",
                "set either jwt_public_key_pem or jwt_public_key_file, not both",
            ));
        }
        for (key, value) in [
            ("session.queue_capacity", s.queue_capacity),
            ("session.write_batch_size", s.write_batch_size),
            ("session.write_buffer", s.write_buffer),
            ("session.cache_capacity", s.cache_capacity),
        ] {
            if value == 0 {
                return Err(invalid(key, "must be > 0"));
            }
        }
        if s.node_ttl_ms <= g.heartbeat_ms {
            return Err(invalid(
                "session.node_ttl_ms",
                "must be longer than gateway.heartbeat_ms",
            ));
        }
        for name in self.namespaces.keys() {
            if name.is_empty() || rt_proto::channel::validate(name).is_err() || name.contains(':') {
                return Err(invalid(
                    &format!("namespaces.{name}"),
                    "a namespace name uses the channel alphabet and has no ':'",
                ));
            }
        }
        Ok(())
    }

    /// The namespace options for a validated channel, or `None` when its
    /// namespace is not configured (error 102).
    pub fn namespace(&self, channel: &rt_proto::ChannelName) -> Option<&NamespaceConfig> {
        match channel.namespace() {
            None => Some(&self.default_namespace),
            Some(ns) => self.namespaces.get(ns),
        }
    }
}

/// Maps `RT_SECTION__KEY` or a shorthand to a dotted key path.
fn env_key(var: &str) -> Option<String> {
    if let Some((_, path)) = SHORTHANDS.iter().find(|(name, _)| *name == var) {
        return Some((*path).to_owned());
    }
    let rest = var.strip_prefix("RT_")?;
    if !rest.contains("__") {
        return None;
    }
    Some(
        rest.split("__")
            .map(str::to_ascii_lowercase)
            .collect::<Vec<_>>()
            .join("."),
    )
}

/// Reads an env value as TOML when it parses as a scalar (numbers, booleans),
/// else as a plain string, so `RT_GATEWAY__WORKERS=4` and `RT_NATS_URL=nats://…` both work.
fn parse_env_value(value: &str) -> toml::Value {
    let wrapped = format!("v = {value}");
    match toml::from_str::<toml::Table>(&wrapped) {
        Ok(mut t) => match t.remove("v") {
            Some(
                v @ (toml::Value::Integer(_) | toml::Value::Float(_) | toml::Value::Boolean(_)),
            ) => v,
            _ => toml::Value::String(value.to_owned()),
        },
        Err(_) => toml::Value::String(value.to_owned()),
    }
}

fn set_path(table: &mut toml::Table, path: &str, value: toml::Value) -> Result<(), String> {
    let mut parts = path.split('.').peekable();
    let mut current = table;
    while let Some(part) = parts.next() {
        if parts.peek().is_none() {
            current.insert(part.to_owned(), value);
            return Ok(());
        }
        let entry = current
            .entry(part.to_owned())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        current = entry
            .as_table_mut()
            .ok_or_else(|| format!("{part} is not a table"))?;
    }
    Err("empty key".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn defaults_are_valid() {
        let config = Config::load(None, &[]).expect("defaults load");
        assert_eq!(config, Config::default());
    }

    #[test]
    fn file_then_env_override() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("rt.toml");
        std::fs::write(
            &path,
            "[gateway]\nworkers = 3\nmax_message_size = 1024\n[namespaces.chat]\nhistory_size = 5\n",
        )
        .expect("write");
        let config = Config::load(
            Some(&path),
            &vars(&[
                ("RT_GATEWAY__WORKERS", "2"),
                ("RT_HTTP_ADDR", "127.0.0.1:0"),
                ("RT_API_KEY", "k"),
                ("RT_NAMESPACES__CHAT__CLIENT_PUBLISH", "false"),
                ("HOME", "/root"),
            ]),
        )
        .expect("loads");
        assert_eq!(config.gateway.workers, 2);
        assert_eq!(config.gateway.max_message_size, 1024);
        assert_eq!(config.gateway.http_addr, "127.0.0.1:0");
        assert_eq!(config.gateway.api_key.expose(), "k");
        let chat = &config.namespaces["chat"];
        assert_eq!(chat.history_size, 5);
        assert!(!chat.client_publish);
        assert_eq!(format!("{:?}", config.gateway.api_key), "\"***\"");
    }

    #[test]
    fn errors_name_the_key() {
        let err =
            Config::load(None, &vars(&[("RT_GATEWAY__WROKERS", "2")])).expect_err("unknown key");
        assert!(err.to_string().contains("wrokers"), "{err}");
        let err = Config::load(None, &vars(&[("RT_HTTP_ADDR", "nowhere")])).expect_err("bad addr");
        assert!(err.to_string().contains("gateway.http_addr"), "{err}");
        let err =
            Config::load(None, &vars(&[("RT_GATEWAY__WORKERS", "many")])).expect_err("bad type");
        assert!(err.to_string().contains("workers"), "{err}");
        let err = Config::load(None, &vars(&[("RT_NATS_URL", "http://x")])).expect_err("bad url");
        assert!(err.to_string().contains("nats.url"), "{err}");
        let err = Config::load(None, &vars(&[("RT_NAMESPACES__BAD:NS__HISTORY_SIZE", "1")]))
            .expect_err("bad namespace");
        assert!(err.to_string().contains("namespaces.bad:ns"), "{err}");
        let err =
            Config::load(Some(Path::new("/nonexistent/rt.toml")), &[]).expect_err("missing file");
        assert!(err.to_string().contains("/nonexistent/rt.toml"), "{err}");
    }

    #[test]
    fn slow_consumer_policies_and_auto_conflation_marks() {
        let config = Config::load(
            None,
            &vars(&[
                ("RT_NAMESPACES__LOSSY__SLOW_CONSUMER", "conflate"),
                ("RT_NAMESPACES__MIXED__SLOW_CONSUMER", "auto"),
                ("RT_GATEWAY__AUTO_CONFLATE_THRESHOLD_BYTES", "600000"),
                ("RT_GATEWAY__AUTO_CONFLATE_LOW_WATER_BYTES", "100000"),
            ]),
        )
        .expect("loads");
        assert_eq!(
            config.namespaces["lossy"].slow_consumer,
            SlowConsumerPolicy::Conflate
        );
        assert_eq!(
            config.namespaces["mixed"].slow_consumer,
            SlowConsumerPolicy::Auto
        );
        let err = Config::load(
            None,
            &vars(&[("RT_GATEWAY__AUTO_CONFLATE_THRESHOLD_BYTES", "1048576")]),
        )
        .expect_err("threshold at the bound");
        assert!(
            err.to_string()
                .contains("gateway.auto_conflate_threshold_bytes"),
            "{err}"
        );
        let err = Config::load(
            None,
            &vars(&[("RT_GATEWAY__AUTO_CONFLATE_LOW_WATER_BYTES", "524288")]),
        )
        .expect_err("low water at the default threshold");
        assert!(
            err.to_string()
                .contains("gateway.auto_conflate_low_water_bytes"),
            "{err}"
        );
        let err = Config::load(None, &vars(&[("RT_NAMESPACES__X__SLOW_CONSUMER", "drop")]))
            .expect_err("unknown policy");
        assert!(err.to_string().contains("drop"), "{err}");
    }

    #[test]
    fn history_store_and_lease_settings() {
        let config = Config::load(
            None,
            &vars(&[
                ("RT_BROADCAST__HISTORY_STORE", "memory"),
                ("RT_BROADCAST__INSTANCE_ID", "broadcast-0"),
            ]),
        )
        .expect("loads");
        assert_eq!(config.broadcast.history_store, HistoryStore::Memory);
        assert_eq!(config.broadcast.instance_id, "broadcast-0");
        assert_eq!(
            Config::default().broadcast.history_store,
            HistoryStore::Jetstream
        );
        let err = Config::load(None, &vars(&[("RT_BROADCAST__HISTORY_STORE", "disk")]))
            .expect_err("unknown store");
        assert!(err.to_string().contains("disk"), "{err}");
        let err = Config::load(None, &vars(&[("RT_BROADCAST__INSTANCE_ID", "a b")]))
            .expect_err("bad instance id");
        assert!(err.to_string().contains("broadcast.instance_id"), "{err}");
        let err = Config::load(None, &vars(&[("RT_BROADCAST__LEASE_TTL_MS", "100")]))
            .expect_err("lease too short");
        assert!(err.to_string().contains("broadcast.lease_ttl_ms"), "{err}");
    }

    #[test]
    fn the_dev_config_in_the_repo_loads() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/dev.toml");
        let config = Config::load(Some(&path), &[]).expect("config/dev.toml is valid");
        assert!(config.namespaces.contains_key("chat"));
        assert!(!config.namespaces["news"].client_publish);
        let sys = &config.namespaces[crate::stats::NAMESPACE];
        assert!(sys.private && !sys.allow_anonymous && !sys.client_publish);
    }

    #[test]
    fn bad_toml_file_is_reported_with_its_path() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("bad.toml");
        std::fs::write(&path, "[gateway\n").expect("write");
        let err = Config::load(Some(&path), &[]).expect_err("parse error");
        assert!(err.to_string().contains("bad.toml"), "{err}");
    }
}
