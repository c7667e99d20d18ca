//! What every scenario reports: the live progress line, latency lines, the generator's own
//! health (is rtload the bottleneck?), and writing the JSON report.

use std::fmt;
use std::path::Path;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::error::Result;
use crate::stats::{Summary, Tally, round3};
use crate::sysinfo::{FdLimit, ServerUsage};

/// Generator CPU above this share of all cores makes results suspect.
pub const CPU_WARN_PERCENT: f64 = 80.0;
/// The machine as a whole above this: generator and server fight over cores.
pub const MACHINE_WARN_PERCENT: f64 = 90.0;

/// One line of live progress, printed to stderr once a second.
#[derive(Debug, Clone)]
pub struct Progress {
    pub elapsed: Duration,
    pub phase: &'static str,
    pub sent_per_s: f64,
    pub delivered_per_s: f64,
    pub p99_ms: Option<f64>,
    pub open: u64,
    pub lost: u64,
    pub errors: u64,
    pub cpu_percent: Option<f64>,
    pub machine_cpu_percent: Option<f64>,
}

impl fmt::Display for Progress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "[{:>4}s {:<7}] sent {:>7.0}/s  delivered {:>9.0}/s  p99 {:>8} ms  conns {:>6}  lost {}  errors {}",
            self.elapsed.as_secs_f64().round(),
            self.phase,
            self.sent_per_s,
            self.delivered_per_s,
            fmt_ms(self.p99_ms),
            self.open,
            self.lost,
            self.errors,
        )?;
        f.write_str(&cpu_suffix(self.cpu_percent, self.machine_cpu_percent))
    }
}

/// The end of a progress line: `  cpu 43% (machine 100%)`, or nothing when unknown.
pub fn cpu_suffix(cpu: Option<f64>, machine: Option<f64>) -> String {
    match (cpu, machine) {
        (Some(cpu), Some(machine)) => format!("  cpu {cpu:.0}% (machine {machine:.0}%)"),
        (Some(cpu), None) => format!("  cpu {cpu:.0}%"),
        (None, _) => String::new(),
    }
}

/// Milliseconds with three decimals, or `-` when there is nothing to show.
pub fn fmt_ms(ms: Option<f64>) -> String {
    ms.map_or_else(|| "-".to_string(), |ms| format!("{ms:.3}"))
}

/// `p50 0.812  p90 1.034  p99 2.345  p999 4.567  max 9.876 ms  (n=1000)`.
pub fn latency_line(summary: Option<&Summary>) -> String {
    match summary {
        None => "no samples".to_string(),
        Some(s) => format!(
            "p50 {}  p90 {}  p99 {}  p999 {}  max {} ms  (n={})",
            fmt_ms(Some(s.p50_ms)),
            fmt_ms(Some(s.p90_ms)),
            fmt_ms(Some(s.p99_ms)),
            fmt_ms(Some(s.p999_ms)),
            fmt_ms(Some(s.max_ms)),
            s.count
        ),
    }
}

/// The title suffix of a report cut short by Ctrl-C.
pub fn interrupted_suffix(interrupted: bool) -> &'static str {
    if interrupted { " (INTERRUPTED)" } else { "" }
}

/// `p50 1.234 / p99 5.678 ms`.
pub fn p50_p99(summary: Option<&Summary>) -> String {
    match summary {
        None => "-".to_string(),
        Some(s) => format!(
            "p50 {} / p99 {} ms",
            fmt_ms(Some(s.p50_ms)),
            fmt_ms(Some(s.p99_ms))
        ),
    }
}

/// A duration in seconds, rounded to three decimals as the JSON reports carry them.
pub fn secs(d: Duration) -> f64 {
    round3(d.as_secs_f64())
}

/// The measured span in seconds: the planned duration, stretched if the last measured
/// send (`last_write`) went out late, or cut to what was sent when the run stopped early.
/// `period` is the time between two sends of the schedule (0 for a closed loop).
pub fn measured_secs(
    last_write: Option<Instant>,
    measure_start: Instant,
    period: f64,
    planned: Duration,
    stopped_early: bool,
) -> f64 {
    let sent_span = last_write.map_or(0.0, |last| {
        last.saturating_duration_since(measure_start).as_secs_f64() + period
    });
    if stopped_early {
        sent_span
    } else {
        sent_span.max(planned.as_secs_f64())
    }
}

/// `n` per second over `secs` (0 when nothing was measured).
pub fn per_sec(n: u64, secs: f64) -> f64 {
    if secs > 0.0 {
        round3(n as f64 / secs)
    } else {
        0.0
    }
}

/// Every error of a run by kind, and their sum.
#[derive(Serialize, Debug)]
pub struct Errors {
    pub total: u64,
    pub kinds: Tally,
}

impl Errors {
    pub fn of(kinds: Tally) -> Self {
        Errors {
            total: kinds.total(),
            kinds,
        }
    }

    /// `errors        <total>`, then a line per kind.
    pub fn render(&self, out: &mut String) {
        *out += &format!("errors        {}\n", self.total);
        for (kind, n) in self.kinds.iter() {
            *out += &format!("  {n:>10}  {kind}\n");
        }
    }
}

/// The generator's view of itself.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Generator {
    pub cores: usize,
    /// rtload's CPU over the measured window, as a percentage of all cores.
    pub cpu_percent: Option<f64>,
    /// The whole machine's CPU over the measured window (rtload, a local server, ...).
    pub machine_cpu_percent: Option<f64>,
    pub fd_soft_limit: Option<u64>,
    pub fd_hard_limit: Option<u64>,
    pub fds_needed: u64,
    /// Measured sends written more than 10 ms after their intended time.
    pub late_sends: u64,
    pub max_send_lag_ms: Option<f64>,
    pub warnings: Vec<String>,
    /// The server's processes over the same window (`--server-pid`); [`write_json`]
    /// moves it to the report's top level as `server`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub server: Option<ServerUsage>,
}

impl Generator {
    /// Adds a warning for each sign that rtload itself limited the run, and rounds.
    pub fn assessed(mut self) -> Self {
        let cores = self.cores;
        if let Some(cpu) = self.cpu_percent.filter(|cpu| *cpu >= CPU_WARN_PERCENT) {
            self.warnings.push(format!(
                "rtload used {cpu:.0}% of {cores} cores: the generator may be the bottleneck \
                 (run it on another machine or with fewer subscribers per process)"
            ));
        } else if let Some(busy) = self
            .machine_cpu_percent
            .filter(|b| *b >= MACHINE_WARN_PERCENT)
        {
            self.warnings.push(format!(
                "the machine's {cores} cores were {busy:.0}% busy: rtload and the server (if it \
                 runs here) competed for CPU, so latencies include scheduling delays on both sides"
            ));
        }
        if let Some(soft) = self.fd_soft_limit.filter(|soft| *soft < self.fds_needed) {
            self.warnings.push(format!(
                "file-descriptor limit {soft} is below the ~{} this run needs \
                 (raise it with `ulimit -n` or prlimit)",
                self.fds_needed
            ));
        }
        if self.late_sends > 0 {
            self.warnings.push(format!(
                "the pacer fell behind schedule: {} sends went out more than 10 ms late (max {} ms): \
                 rtload could not keep its own schedule (starved of CPU, or the publish transport \
                 backed up); latencies are measured from the intended times and include that delay",
                self.late_sends,
                fmt_ms(self.max_send_lag_ms)
            ));
        }
        self.cpu_percent = self.cpu_percent.map(round3);
        self.machine_cpu_percent = self.machine_cpu_percent.map(round3);
        self
    }

    pub fn fd(mut self, fd: Option<FdLimit>) -> Self {
        self.fd_soft_limit = fd.and_then(|fd| fd.soft);
        self.fd_hard_limit = fd.and_then(|fd| fd.hard);
        self
    }

    pub fn render(&self, out: &mut String) {
        let pct = |p: Option<f64>| p.map_or_else(|| "-".to_string(), |c| format!("{c:.1}%"));
        let cpu = pct(self.cpu_percent);
        let machine = pct(self.machine_cpu_percent);
        let limit = |l: Option<u64>| l.map_or_else(|| "unlimited".to_string(), |l| l.to_string());
        out.push_str(&format!(
            "generator     cpu {cpu} of {} cores (machine {machine}); fd limit {} (hard {}, need ~{}); late sends {} (max lag {} ms)\n",
            self.cores,
            limit(self.fd_soft_limit),
            limit(self.fd_hard_limit),
            self.fds_needed,
            self.late_sends,
            fmt_ms(self.max_send_lag_ms),
        ));
        if let Some(server) = &self.server {
            server.render(out);
        }
        for w in &self.warnings {
            out.push_str(&format!("WARNING       {w}\n"));
        }
    }
}

#[cfg(test)]
impl Generator {
    /// A generator that kept up (no warnings), for the reports' tests.
    pub fn for_tests() -> Self {
        Generator {
            cores: 2,
            cpu_percent: Some(12.0),
            machine_cpu_percent: Some(30.0),
            fd_soft_limit: None,
            fd_hard_limit: None,
            fds_needed: 70,
            late_sends: 0,
            max_send_lag_ms: Some(0.05),
            warnings: vec![],
            server: None,
        }
        .assessed()
    }
}

/// Prints the text report to stdout and, with `--json-out` (`json_out`), writes `report`
/// there as JSON.
pub fn print_and_write(text: &str, report: &impl Serialize, json_out: Option<&Path>) -> Result<()> {
    print!("{text}");
    if let Some(path) = json_out {
        write_json(path, report)?;
        eprintln!("rtload: report written to {}", path.display());
    }
    Ok(())
}

/// Writes the report as pretty JSON. The server's usage (`generator.server`, present with
/// `--server-pid`) goes to the top level as `server`: `server.cpu_seconds`,
/// `server.rss_bytes`.
pub fn write_json(path: &Path, report: &impl Serialize) -> Result<()> {
    let mut value = serde_json::to_value(report)?;
    hoist_server(&mut value);
    let mut text = serde_json::to_string_pretty(&value)?;
    text.push('\n');
    std::fs::write(path, text).map_err(|e| format!("writing {}: {e}", path.display()))?;
    Ok(())
}

fn hoist_server(value: &mut serde_json::Value) {
    let server = value
        .get_mut("generator")
        .and_then(serde_json::Value::as_object_mut)
        .and_then(|g| g.remove("server"));
    if let (Some(server), Some(top)) = (server, value.as_object_mut()) {
        top.insert("server".into(), server);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::stats::{new_hist, record};

    #[test]
    fn progress_line_reads_well() {
        let p = Progress {
            elapsed: Duration::from_millis(12_400),
            phase: "measure",
            sent_per_s: 999.6,
            delivered_per_s: 999_600.0,
            p99_ms: Some(1.23456),
            open: 1000,
            lost: 0,
            errors: 2,
            cpu_percent: Some(43.4),
            machine_cpu_percent: Some(99.6),
        };
        assert_eq!(
            p.to_string(),
            "[  12s measure] sent    1000/s  delivered    999600/s  p99    1.235 ms  conns   1000  lost 0  errors 2  cpu 43% (machine 100%)"
        );
        let warm = Progress {
            p99_ms: None,
            cpu_percent: None,
            phase: "warmup",
            ..p
        };
        assert!(warm.to_string().contains("p99        - ms"));
    }

    #[test]
    fn latency_lines_use_three_decimals() {
        let mut h = new_hist();
        for us in [800, 900, 1000, 1500, 2000] {
            record(&mut h, us);
        }
        let s = Summary::of(&h).unwrap();
        assert_eq!(
            latency_line(Some(&s)),
            "p50 1.000  p90 2.000  p99 2.000  p999 2.000  max 2.000 ms  (n=5)"
        );
        assert_eq!(p50_p99(Some(&s)), "p50 1.000 / p99 2.000 ms");
        assert_eq!(latency_line(None), "no samples");
    }

    #[test]
    fn generator_warns_when_it_is_the_bottleneck() {
        let fd = FdLimit {
            soft: Some(1024),
            hard: Some(4096),
        };
        let g = Generator {
            cores: 2,
            cpu_percent: Some(91.26),
            machine_cpu_percent: Some(100.0),
            fd_soft_limit: None,
            fd_hard_limit: None,
            fds_needed: 2000,
            late_sends: 3,
            max_send_lag_ms: Some(25.5),
            warnings: vec![],
            server: None,
        }
        .fd(Some(fd))
        .assessed();
        assert_eq!(g.warnings.len(), 3, "{:?}", g.warnings);
        assert_eq!(g.cpu_percent, Some(91.26));
        let mut text = String::new();
        g.render(&mut text);
        assert!(text.starts_with(
            "generator     cpu 91.3% of 2 cores (machine 100.0%); fd limit 1024 (hard 4096, need ~2000); late sends 3 (max lag 25.500 ms)\n"
        ), "{text}");
        assert_eq!(text.matches("WARNING").count(), 3);

        let shared = Generator {
            cpu_percent: Some(30.0),
            late_sends: 0,
            ..g.clone()
        };
        let shared = Generator {
            warnings: vec![],
            server: None,
            ..shared
        }
        .assessed();
        assert_eq!(shared.warnings.len(), 2, "{:?}", shared.warnings);
        assert!(shared.warnings[0].contains("100% busy"));

        let calm = Generator {
            cores: 2,
            cpu_percent: Some(20.0),
            machine_cpu_percent: Some(40.0),
            fd_soft_limit: None,
            fd_hard_limit: None,
            fds_needed: 10,
            late_sends: 0,
            max_send_lag_ms: None,
            warnings: vec![],
            server: None,
        }
        .assessed();
        assert!(calm.warnings.is_empty());
        let json = serde_json::to_value(&calm).unwrap();
        assert_eq!(json["fd_soft_limit"], serde_json::Value::Null);
        assert!(json.get("server").is_none());
    }

    #[test]
    fn server_usage_moves_to_the_top_level() {
        let mut value = serde_json::json!({
            "scenario": "ping",
            "generator": {"cores": 2, "server": {"cpu_seconds": 1.5, "rss_bytes": 10}},
        });
        hoist_server(&mut value);
        assert_eq!(value["server"]["cpu_seconds"], 1.5);
        assert_eq!(value["server"]["rss_bytes"], 10);
        assert!(value["generator"].get("server").is_none());
        let mut plain = serde_json::json!({"generator": {"cores": 2}});
        hoist_server(&mut plain);
        assert!(plain.get("server").is_none());
    }
}
