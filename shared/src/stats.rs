//! Key figures, published live: every `telemetry.stats_interval_ms` each
//! service publishes a small summary of its metrics to the channel
//! [`CHANNEL`] (`sys:stats`), through `rt.publish.sys:stats` like any
//! backend publication. Broadcast sequences and keeps it (a short history),
//! so a dashboard is just a subscriber: the demo's ops page subscribes with
//! an operator token (the `sys` namespace is private; see docs/operations.md).
//!
//! The figures are read from the service's own Prometheus registry (the text
//! exposition `/metrics` serves), so a service only names which metrics to
//! publish ([`GATEWAY`], [`BROADCAST`], [`COMPUTE`], [`SESSION`]):
//!
//! - [`Figure::Gauge`]: the current value (summed over label sets);
//! - [`Figure::Rate`]: a counter's increase per second over the last interval;
//! - [`Figure::Quantile`]: a quantile of a histogram's observations *in the
//!   last interval*, in milliseconds, estimated from the bucket counts the
//!   way PromQL's `histogram_quantile` does (linear inside the bucket that
//!   holds the rank; the latency buckets double, so the true value lies in
//!   the same bucket, within a factor of two). No observation in the
//!   interval gives `null`.
//!
//! A publication's data (MessagePack):
//! `{service, node, interval_ms, figures: {name: number or null}}`.

use std::collections::HashMap;
use std::hash::{BuildHasher, Hasher};
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::{Map, Number, Value};

use crate::bus::Bus;
use crate::config::Config;
use crate::metrics::MetricsRegistry;
use crate::trace_context::TraceContext;

/// The namespace of operator channels.
pub const NAMESPACE: &str = "sys";
/// Where every service publishes its figures.
pub const CHANNEL: &str = "sys:stats";

/// One published figure, read from the service's metrics.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Figure {
    /// `key` = the metric's current value, summed over its label sets.
    Gauge {
        key: &'static str,
        metric: &'static str,
    },
    /// `key` = the increase per second of a counter (summed over label sets;
    /// the name as exported, with `_total`, or a histogram's `_count`).
    Rate {
        key: &'static str,
        metric: &'static str,
    },
    /// `key` = quantile `q` of a histogram's observations in the last
    /// interval (all label sets merged), in milliseconds; `null` when none.
    Quantile {
        key: &'static str,
        metric: &'static str,
        q: f64,
    },
}

impl Figure {
    pub fn key(&self) -> &'static str {
        match self {
            Self::Gauge { key, .. } | Self::Rate { key, .. } | Self::Quantile { key, .. } => key,
        }
    }
}

const fn gauge(key: &'static str, metric: &'static str) -> Figure {
    Figure::Gauge { key, metric }
}
const fn rate(key: &'static str, metric: &'static str) -> Figure {
    Figure::Rate { key, metric }
}
const fn quantile(key: &'static str, metric: &'static str, q: f64) -> Figure {
    Figure::Quantile { key, metric, q }
}

const LAG: &str = "rt_runtime_lag_seconds";
const MEMORY: &str = "rt_process_resident_memory_bytes";

/// The gateway's figures.
pub const GATEWAY: &[Figure] = &[
    gauge("connections", "rt_gateway_connections"),
    gauge("subscriptions", "rt_gateway_subscriptions"),
    gauge("channels", "rt_gateway_channels"),
    // Frames written to sockets (one frame may carry several messages under load).
    rate("messages_out_per_sec", "rt_gateway_messages_out_total"),
    rate("messages_in_per_sec", "rt_gateway_messages_in_total"),
    rate("bytes_out_per_sec", "rt_gateway_bytes_out_total"),
    // Publications this node fanned out to its local subscribers.
    rate(
        "publications_per_sec",
        "rt_gateway_publish_to_deliver_seconds_count",
    ),
    quantile(
        "publish_to_deliver_p50_ms",
        "rt_gateway_publish_to_deliver_seconds",
        0.5,
    ),
    quantile(
        "publish_to_deliver_p99_ms",
        "rt_gateway_publish_to_deliver_seconds",
        0.99,
    ),
    gauge(
        "outbound_buffered_bytes",
        "rt_gateway_outbound_buffered_bytes",
    ),
    rate("errors_per_sec", "rt_gateway_errors_total"),
    rate("slow_consumers_per_sec", "rt_gateway_slow_consumers_total"),
    quantile("runtime_lag_p99_ms", LAG, 0.99),
    gauge("memory_bytes", MEMORY),
];

/// The broadcast service's figures.
pub const BROADCAST: &[Figure] = &[
    rate("publications_per_sec", "rt_broadcast_publications_total"),
    gauge("channels", "rt_broadcast_channels"),
    quantile("sequence_p99_ms", "rt_broadcast_sequence_seconds", 0.99),
    rate("errors_per_sec", "rt_broadcast_errors_total"),
    quantile("runtime_lag_p99_ms", LAG, 0.99),
    gauge("memory_bytes", MEMORY),
];

/// The compute service's figures.
pub const COMPUTE: &[Figure] = &[
    gauge("queue_depth", "rt_compute_queue_depth"),
    rate("jobs_per_sec", "rt_compute_jobs_total"),
    rate(
        "busy_rejections_per_sec",
        "rt_compute_busy_rejections_total",
    ),
    quantile("job_p99_ms", "rt_compute_job_seconds", 0.99),
    quantile("wait_p99_ms", "rt_compute_wait_seconds", 0.99),
    quantile("runtime_lag_p99_ms", LAG, 0.99),
    gauge("memory_bytes", MEMORY),
];

/// The session service's figures.
pub const SESSION: &[Figure] = &[
    rate("requests_per_sec", "rt_session_requests_total"),
    rate("shed_per_sec", "rt_session_shed_total"),
    gauge("inflight", "rt_session_inflight"),
    gauge("live_nodes", "rt_session_live_nodes"),
    quantile("request_p99_ms", "rt_session_request_seconds", 0.99),
    quantile("runtime_lag_p99_ms", LAG, 0.99),
    gauge("memory_bytes", MEMORY),
];

/// The publishing task; dropping it (with the service's handle) stops it.
pub struct StatsPublisher {
    task: Option<tokio::task::JoinHandle<()>>,
}

impl StatsPublisher {
    /// Whether figures are being published (the interval is not 0 and the
    /// `sys` namespace is configured).
    pub fn is_running(&self) -> bool {
        self.task.is_some()
    }
}

impl Drop for StatsPublisher {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// The data of one stats publication.
#[derive(Debug, Serialize)]
struct StatsMessage<'a> {
    service: &'a str,
    node: &'a str,
    /// The time the figures cover (rates and quantiles are over it).
    interval_ms: u64,
    figures: Map<String, Value>,
}

/// Starts publishing `figures` of `registry` every `telemetry.stats_interval_ms`
/// on the current runtime, as `service` on `node` (default: host name and
/// process id). Publishes nothing when the interval is 0 or the cluster has
/// no `sys` namespace (broadcast would refuse the channel).
pub fn spawn_publisher(
    config: &Config,
    bus: Bus,
    registry: MetricsRegistry,
    service: &'static str,
    node: Option<&str>,
    figures: &'static [Figure],
) -> StatsPublisher {
    let interval_ms = config.telemetry.stats_interval_ms;
    let Some(namespace) = config.namespaces.get(NAMESPACE) else {
        if interval_ms > 0 {
            tracing::info!(
                service,
                "stats publishing off: no [namespaces.{NAMESPACE}] configured"
            );
        }
        return StatsPublisher { task: None };
    };
    if interval_ms == 0 {
        return StatsPublisher { task: None };
    }
    if !namespace.private || namespace.allow_anonymous {
        tracing::warn!(
            service,
            "namespace {NAMESPACE} is not private with allow_anonymous = false: anyone can read {CHANNEL}"
        );
    }
    let node = node.map_or_else(default_node, str::to_owned);
    let subject = format!("{}{CHANNEL}", rt_proto::subject::PUBLISH_PREFIX);
    let period = Duration::from_millis(interval_ms);
    let task = tokio::spawn(async move {
        let mut window = Window::new(figures, Snapshot::parse(&registry.encode()));
        let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticker.tick().await;
            let (elapsed, figures) = window.advance(Snapshot::parse(&registry.encode()));
            let message = StatsMessage {
                service,
                node: &node,
                interval_ms: u64::try_from(elapsed.as_millis()).unwrap_or(u64::MAX),
                figures,
            };
            let Ok(payload) = rt_proto::internal::to_msgpack(&message) else {
                continue;
            };
            // Not sampled: a figure a second per service must not fill the trace store.
            let trace = TraceContext {
                trace_id: random_bytes(),
                span_id: random_bytes(),
                flags: 0,
                state: None,
            };
            // A full lane (NATS down or overloaded) skips this round: the
            // next one carries fresh figures anyway.
            let _ = bus.publish(
                subject.clone(),
                crate::bus::headers_with(Some(&trace)),
                payload.into(),
            );
        }
    });
    StatsPublisher { task: Some(task) }
}

fn default_node() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "localhost".to_owned());
    format!("{host}-{}", std::process::id())
}

/// Non-zero pseudo-random bytes for trace ids (no need for a CSPRNG here).
fn random_bytes<const N: usize>() -> [u8; N] {
    let mut out = [0u8; N];
    let state = std::collections::hash_map::RandomState::new();
    for (i, chunk) in out.chunks_mut(8).enumerate() {
        let mut hasher = state.build_hasher();
        hasher.write_usize(i);
        let bytes = (hasher.finish() | 1).to_le_bytes();
        chunk.copy_from_slice(&bytes[..chunk.len()]);
    }
    out
}

/// The figures' inputs at one moment: sums per metric name, and cumulative
/// bucket counts per histogram (label sets merged).
#[derive(Debug, Default, Clone)]
struct Snapshot {
    at: Option<Instant>,
    values: HashMap<String, f64>,
    /// Histogram base name → (upper bound, cumulative count), sorted by bound.
    buckets: HashMap<String, Vec<(f64, f64)>>,
}

impl Snapshot {
    /// Reads the Prometheus text exposition (as prometheus-client writes it:
    /// `name{labels} value`, no timestamps).
    fn parse(text: &str) -> Self {
        let mut snapshot = Self {
            at: Some(Instant::now()),
            ..Self::default()
        };
        for line in text.lines() {
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let Some((series, value)) = line.rsplit_once(' ') else {
                continue;
            };
            let Ok(value) = value.parse::<f64>() else {
                continue;
            };
            let (name, labels) = match series.split_once('{') {
                Some((name, labels)) => (name, labels),
                None => (series, ""),
            };
            if let Some(base) = name.strip_suffix("_bucket")
                && let Some(le) = label(labels, "le")
            {
                let bound = if le == "+Inf" {
                    f64::INFINITY
                } else {
                    match le.parse::<f64>() {
                        Ok(bound) => bound,
                        Err(_) => continue,
                    }
                };
                let buckets = snapshot.buckets.entry(base.to_owned()).or_default();
                match buckets.iter_mut().find(|(b, _)| *b == bound) {
                    Some((_, count)) => *count += value,
                    None => buckets.push((bound, value)),
                }
                continue;
            }
            *snapshot.values.entry(name.to_owned()).or_default() += value;
        }
        for buckets in snapshot.buckets.values_mut() {
            buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
        }
        snapshot
    }
}

/// The value of label `name` in `a="x",b="y"}`.
fn label<'a>(labels: &'a str, name: &str) -> Option<&'a str> {
    let start = labels
        .split(',')
        .find_map(|pair| pair.trim().strip_prefix(name)?.strip_prefix("=\""))?;
    start.split('"').next()
}

/// Successive snapshots, turned into figures over the interval between them.
struct Window {
    figures: &'static [Figure],
    last: Snapshot,
}

impl Window {
    fn new(figures: &'static [Figure], first: Snapshot) -> Self {
        Self {
            figures,
            last: first,
        }
    }

    fn advance(&mut self, now: Snapshot) -> (Duration, Map<String, Value>) {
        let elapsed = match (now.at, self.last.at) {
            (Some(now), Some(last)) => now.saturating_duration_since(last),
            _ => Duration::ZERO,
        };
        let figures = compute(self.figures, &self.last, &now, elapsed);
        self.last = now;
        (elapsed, figures)
    }
}

fn compute(
    figures: &[Figure],
    before: &Snapshot,
    now: &Snapshot,
    elapsed: Duration,
) -> Map<String, Value> {
    let mut out = Map::new();
    for figure in figures {
        let value = match *figure {
            Figure::Gauge { metric, .. } => {
                number(now.values.get(metric).copied().unwrap_or(0.0), 0)
            }
            Figure::Rate { metric, .. } => {
                let secs = elapsed.as_secs_f64();
                let delta = now.values.get(metric).copied().unwrap_or(0.0)
                    - before.values.get(metric).copied().unwrap_or(0.0);
                if secs > 0.0 {
                    number((delta / secs).max(0.0), 2)
                } else {
                    Value::Null
                }
            }
            Figure::Quantile { metric, q, .. } => {
                let empty = Vec::new();
                let delta = bucket_delta(
                    now.buckets.get(metric).unwrap_or(&empty),
                    before.buckets.get(metric).unwrap_or(&empty),
                );
                histogram_quantile(q, &delta).map_or(Value::Null, |secs| number(secs * 1e3, 3))
            }
        };
        out.insert(figure.key().to_owned(), value);
    }
    out
}

/// Cumulative counts observed between two snapshots of one histogram.
fn bucket_delta(now: &[(f64, f64)], before: &[(f64, f64)]) -> Vec<(f64, f64)> {
    now.iter()
        .map(|&(bound, count)| {
            let old = before
                .iter()
                .find(|(b, _)| *b == bound)
                .map_or(0.0, |(_, c)| *c);
            (bound, (count - old).max(0.0))
        })
        .collect()
}

/// Quantile `q` of cumulative buckets `(upper bound, count)` sorted by bound,
/// as PromQL's `histogram_quantile`: linear interpolation inside the bucket
/// holding the rank, from 0 for the first bucket; a rank in the `+Inf`
/// bucket gives the highest finite bound. `None` without observations.
fn histogram_quantile(q: f64, buckets: &[(f64, f64)]) -> Option<f64> {
    let total = buckets.last()?.1;
    if total <= 0.0 {
        return None;
    }
    let rank = q.clamp(0.0, 1.0) * total;
    let (mut lower, mut below) = (0.0, 0.0);
    for &(bound, count) in buckets {
        if count >= rank && count > below {
            if bound.is_infinite() {
                return Some(lower);
            }
            return Some(lower + (bound - lower) * (rank - below) / (count - below));
        }
        lower = if bound.is_finite() { bound } else { lower };
        below = count;
    }
    Some(lower)
}

/// A JSON number rounded to `decimals` (integers stay integers).
fn number(value: f64, decimals: i32) -> Value {
    if !value.is_finite() {
        return Value::Null;
    }
    let scale = 10f64.powi(decimals);
    let rounded = (value * scale).round() / scale;
    if rounded.fract() == 0.0 && rounded.abs() < 9.0e15 {
        // Exact: integral and below 2^53.
        return Value::Number(Number::from(rounded as i64));
    }
    Number::from_f64(rounded).map_or(Value::Null, Value::Number)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::{CommonMetrics, ThreadLabel};
    use prometheus_client::metrics::counter::Counter;
    use prometheus_client::metrics::gauge::Gauge;

    const TEST_FIGURES: &[Figure] = &[
        gauge("connections", "t_connections"),
        rate("out_per_sec", "t_out_total"),
        quantile("lag_p50_ms", LAG, 0.5),
        quantile("lag_p99_ms", LAG, 0.99),
        gauge("missing", "t_not_there"),
    ];

    fn at(snapshot: Snapshot, instant: Instant) -> Snapshot {
        Snapshot {
            at: Some(instant),
            ..snapshot
        }
    }

    #[test]
    fn figures_come_from_the_registry_over_the_interval() {
        let registry = MetricsRegistry::default();
        let common = CommonMetrics::new(&registry);
        let connections = Gauge::<i64>::default();
        let out = Counter::<u64>::default();
        registry.register("t_connections", "test", connections.clone());
        registry.register("t_out", "test", out.clone());
        let lag = |thread: &str| {
            common.runtime_lag.get_or_create_owned(&ThreadLabel {
                thread: thread.into(),
            })
        };
        // Observed before the window: must not count.
        lag("a").observe(5.0);
        out.inc_by(1_000);
        let start = Instant::now();
        let mut window = Window::new(TEST_FIGURES, at(Snapshot::parse(&registry.encode()), start));

        connections.set(7);
        out.inc_by(50);
        // 98 fast observations on two threads, two slow ones.
        for i in 0..98 {
            lag(if i % 2 == 0 { "a" } else { "b" }).observe(0.000_07);
        }
        lag("b").observe(0.3);
        lag("b").observe(0.3);
        let (elapsed, figures) = window.advance(at(
            Snapshot::parse(&registry.encode()),
            start + Duration::from_millis(500),
        ));
        assert_eq!(elapsed, Duration::from_millis(500));
        assert_eq!(figures["connections"], serde_json::json!(7));
        assert_eq!(figures["out_per_sec"], serde_json::json!(100));
        assert_eq!(figures["missing"], serde_json::json!(0));
        // p50 lies in the (0.05 ms, 0.1 ms] bucket.
        let p50 = figures["lag_p50_ms"].as_f64().expect("p50");
        assert!((0.05..=0.1).contains(&p50), "{figures:?}");
        // p99 lies in the bucket holding 0.3 s: (0.2048 s, 0.4096 s].
        let p99 = figures["lag_p99_ms"].as_f64().expect("p99");
        assert!((204.8..=409.6).contains(&p99), "{figures:?}");

        // Nothing observed in the next interval: quantiles are null, rates 0.
        let (_, figures) = window.advance(at(
            Snapshot::parse(&registry.encode()),
            start + Duration::from_millis(1_500),
        ));
        assert_eq!(figures["lag_p99_ms"], Value::Null);
        assert_eq!(figures["out_per_sec"], serde_json::json!(0));
    }

    #[test]
    fn quantiles_interpolate_like_promql() {
        let buckets = [(1.0, 10.0), (2.0, 20.0), (4.0, 20.0), (f64::INFINITY, 20.0)];
        assert_eq!(histogram_quantile(0.5, &buckets), Some(1.0));
        assert_eq!(histogram_quantile(0.75, &buckets), Some(1.5));
        assert_eq!(histogram_quantile(0.25, &buckets), Some(0.5));
        assert_eq!(histogram_quantile(1.0, &buckets), Some(2.0));
        // A rank in +Inf gives the highest finite bound.
        let tail = [(1.0, 1.0), (f64::INFINITY, 10.0)];
        assert_eq!(histogram_quantile(0.99, &tail), Some(1.0));
        assert_eq!(histogram_quantile(0.5, &[(1.0, 0.0)]), None);
        assert_eq!(histogram_quantile(0.5, &[]), None);
    }

    #[test]
    fn parses_labels_and_plain_series() {
        let text = "# HELP x y\nplain_total 3\nlabelled{code=\"1\"} 2\nlabelled{code=\"2\"} 5\n\
                    h_bucket{thread=\"a b\",le=\"0.5\"} 1\nh_bucket{thread=\"c\",le=\"0.5\"} 2\n\
                    h_bucket{thread=\"a b\",le=\"+Inf\"} 4\nh_bucket{thread=\"c\",le=\"+Inf\"} 2\n# EOF\n";
        let s = Snapshot::parse(text);
        assert_eq!(s.values["plain_total"], 3.0);
        assert_eq!(s.values["labelled"], 7.0);
        assert_eq!(s.buckets["h"], vec![(0.5, 3.0), (f64::INFINITY, 6.0)]);
        assert_eq!(label("a=\"1\",le=\"0.25\"}", "le"), Some("0.25"));
    }

    #[test]
    fn numbers_are_rounded_and_integers_stay_integers() {
        assert_eq!(number(3.0, 2), serde_json::json!(3));
        assert_eq!(number(1.23456, 2), serde_json::json!(1.23));
        assert_eq!(number(f64::NAN, 2), Value::Null);
    }

    #[test]
    fn trace_ids_are_valid() {
        let trace = TraceContext {
            trace_id: random_bytes(),
            span_id: random_bytes(),
            flags: 0,
            state: None,
        };
        let parsed = TraceContext::parse(&trace.traceparent(), None).expect("a valid traceparent");
        assert_eq!(parsed, trace);
        assert_ne!(random_bytes::<16>(), random_bytes::<16>());
    }
}
