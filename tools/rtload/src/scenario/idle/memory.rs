//! The gateway's resident memory, from its Prometheus `/metrics`
//! (`rt_process_resident_memory_bytes`, refreshed by the gateway about once a second) or,
//! more precisely, from `/proc/<pid>/status` (`VmRSS`) when it runs on this machine.
//! Parsing and arithmetic are pure functions; [`Source::read`] does the I/O.

use crate::client::parse_ws_url;
use crate::error::Result;
use crate::http::{HttpConn, HttpTarget};

/// The gauge the gateway exports.
pub const METRIC: &str = "rt_process_resident_memory_bytes";

/// Where memory readings come from.
#[derive(Debug, Clone)]
pub enum Source {
    /// `VmRSS` of `/proc/<pid>/status`, summed over the pids (a server made of several
    /// processes, e.g. a Node.js cluster's primary and workers).
    Proc(Vec<u32>),
    /// `GET path` on `target`, then the [`METRIC`] line.
    Metrics {
        url: String,
        target: HttpTarget,
        path: String,
    },
}

impl Source {
    /// `--gateway-pid` when given (read directly, the precise one); otherwise `--metrics`,
    /// or the `/metrics` next to the WebSocket URL.
    pub async fn new(pids: &[u32], metrics: Option<&str>, ws_url: &str) -> Result<Self> {
        if !pids.is_empty() {
            return Ok(Source::Proc(pids.to_vec()));
        }
        let url = match metrics {
            Some(url) => url.to_string(),
            None => metrics_url_for(ws_url)?,
        };
        let (base, path) = split_http_url(&url)?;
        let target = HttpTarget::new(&base).await?;
        Ok(Source::Metrics { url, target, path })
    }

    /// How the report names it.
    pub fn describe(&self) -> String {
        match self {
            Source::Proc(pids) => format!(
                "/proc/{}/status VmRSS",
                match pids.as_slice() {
                    [pid] => pid.to_string(),
                    _ => format!(
                        "{{{}}}",
                        pids.iter()
                            .map(u32::to_string)
                            .collect::<Vec<_>>()
                            .join(",")
                    ),
                }
            ),
            Source::Metrics { url, .. } => format!("{url} {METRIC}"),
        }
    }

    /// One reading, in bytes.
    pub async fn read(&self) -> Result<u64> {
        match self {
            Source::Proc(pids) => {
                let mut sum = 0;
                for pid in pids {
                    let path = format!("/proc/{pid}/status");
                    // A /proc read never blocks for long: no need for a blocking thread.
                    let text = std::fs::read_to_string(&path)
                        .map_err(|e| format!("reading {path}: {e}"))?;
                    sum += parse_vmrss(&text).ok_or_else(|| format!("no VmRSS line in {path}"))?;
                }
                Ok(sum)
            }
            Source::Metrics { url, target, path } => {
                let mut conn = HttpConn::connect(target, None).await?;
                let response = conn.request("GET", path, "", b"").await?;
                if response.status != 200 {
                    return Err(format!("GET {url}: status {}", response.status).into());
                }
                let text = String::from_utf8_lossy(&response.body);
                match parse_metric(&text, METRIC) {
                    // The gauge reads 0 until the gateway's first refresh.
                    Some(0) => Err(format!("{METRIC} not reported yet by {url}").into()),
                    Some(bytes) => Ok(bytes),
                    None => Err(format!("no {METRIC} in {url}").into()),
                }
            }
        }
    }
}

/// `ws://host:port/ws` → `http://host:port/metrics` (the gateway serves both).
pub fn metrics_url_for(ws_url: &str) -> Result<String> {
    Ok(format!(
        "http://{}/metrics",
        parse_ws_url(ws_url)?.authority
    ))
}

/// `http://host:port/path` → (`http://host:port`, `/path`); no path means `/metrics`.
pub fn split_http_url(url: &str) -> Result<(String, String)> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| format!("`{url}`: only http:// URLs are supported"))?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/metrics"),
    };
    if authority.is_empty() {
        return Err(format!("`{url}`: no host").into());
    }
    Ok((format!("http://{authority}"), path.to_string()))
}

/// The value of the unlabelled sample `name` in Prometheus text format, as whole bytes
/// (`1.2e+07` and `12345.0` are accepted). `None` if absent or not a number.
pub fn parse_metric(text: &str, name: &str) -> Option<u64> {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .find_map(|line| {
            let rest = line.strip_prefix(name)?;
            // Exactly this name: `name 1` or `name{} 1`, not `name_total 1`.
            let rest = rest.strip_prefix("{}").unwrap_or(rest);
            if !rest.starts_with([' ', '\t']) {
                return None;
            }
            let value: f64 = rest.split_whitespace().next()?.parse().ok()?;
            (value.is_finite() && value >= 0.0).then_some(value.round() as u64)
        })
}

pub use crate::sysinfo::parse_vmrss;

/// The median of the samples (the mean of the middle two for an even count).
pub fn median(samples: &[u64]) -> Option<u64> {
    let mut sorted = samples.to_vec();
    sorted.sort_unstable();
    let n = sorted.len();
    match n {
        0 => None,
        _ if n % 2 == 1 => Some(sorted[n / 2]),
        _ => Some(((u128::from(sorted[n / 2 - 1]) + u128::from(sorted[n / 2])) / 2) as u64),
    }
}

/// (during − before) / established, in KiB with one decimal; negative when the gateway
/// shrank meanwhile. `None` without connections.
pub fn per_connection_kib(before: u64, during: u64, established: usize) -> Option<f64> {
    if established == 0 {
        return None;
    }
    let delta = during as f64 - before as f64;
    let kib = delta / established as f64 / 1024.0;
    Some((kib * 10.0).round() / 10.0)
}

/// Bytes as MiB with one decimal, for the text report.
pub fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn metric_line_is_found_by_exact_name() {
        let text = "# HELP rt_process_resident_memory_bytes Resident set size of the process.\n\
                    # TYPE rt_process_resident_memory_bytes gauge\n\
                    rt_process_resident_memory_bytes_total 7\n\
                    rt_process_resident_memory_bytes 48234496\n\
                    rt_gateway_connections 3\n";
        assert_eq!(parse_metric(text, METRIC), Some(48_234_496));
        assert_eq!(
            parse_metric("rt_process_resident_memory_bytes 1.5e6\n", METRIC),
            Some(1_500_000)
        );
        assert_eq!(
            parse_metric("rt_process_resident_memory_bytes{} 12.0\n", METRIC),
            Some(12)
        );
        assert_eq!(parse_metric("rt_gateway_connections 3\n", METRIC), None);
        assert_eq!(
            parse_metric("rt_process_resident_memory_bytes NaN\n", METRIC),
            None
        );
        assert_eq!(
            parse_metric("rt_process_resident_memory_bytes -1\n", METRIC),
            None
        );
    }

    #[test]
    fn vmrss_is_read_in_bytes() {
        let status =
            "Name:\trt-gateway\nVmPeak:\t  900000 kB\nVmRSS:\t   51200 kB\nRssAnon:\t 40000 kB\n";
        assert_eq!(parse_vmrss(status), Some(51200 * 1024));
        assert_eq!(parse_vmrss("Name:\tkthreadd\n"), None);
        assert_eq!(parse_vmrss("VmRSS:\t12 MB\n"), None);
        let own = std::fs::read_to_string("/proc/self/status").unwrap();
        assert!(parse_vmrss(&own).unwrap() > 0);
    }

    #[test]
    fn urls_derive_and_split() {
        assert_eq!(
            metrics_url_for("ws://127.0.0.1:8080/ws").unwrap(),
            "http://127.0.0.1:8080/metrics"
        );
        assert_eq!(
            metrics_url_for("ws://gw/ws").unwrap(),
            "http://gw:80/metrics"
        );
        assert!(metrics_url_for("wss://gw/ws").is_err());
        assert_eq!(
            split_http_url("http://127.0.0.1:8080/metrics").unwrap(),
            ("http://127.0.0.1:8080".to_string(), "/metrics".to_string())
        );
        assert_eq!(
            split_http_url("http://10.0.0.1:9090").unwrap().1,
            "/metrics"
        );
        assert!(split_http_url("https://x/metrics").is_err());
        assert!(split_http_url("http:///metrics").is_err());
    }

    #[test]
    fn median_and_per_connection_arithmetic() {
        assert_eq!(median(&[]), None);
        assert_eq!(median(&[30, 10, 20]), Some(20));
        assert_eq!(median(&[40, 10, 30, 20]), Some(25));
        assert_eq!(median(&[u64::MAX, u64::MAX]), Some(u64::MAX));
        assert_eq!(median(&[1, 2]), Some(1));
        // 5000 connections that grew the gateway by 50 MiB: 10.24 KiB each.
        let before = 20 * 1024 * 1024;
        assert_eq!(
            per_connection_kib(before, before + 50 * 1024 * 1024, 5000),
            Some(10.2)
        );
        assert_eq!(per_connection_kib(before, before + 3 * 1024, 2), Some(1.5));
        assert_eq!(per_connection_kib(before + 2048, before, 1), Some(-2.0));
        assert_eq!(per_connection_kib(before, before, 0), None);
        assert_eq!(mib(3 * 1024 * 1024 / 2), "1.5 MiB");
    }
}
