//! `rtload report`: turns the results of a comparison run (`bench/compare/run`: the same
//! scenarios against our cluster and against the Node.js peer, alternating, several
//! rounds) into `report.md` and SVG plots.
//!
//! Input directory:
//! - `runs.json`: the manifest, one object per run, either a JSON array or one object per
//!   line: `{"scenario": "fanout-sweep", "variant": "1000", "x": 1000, "system": "ours",
//!   "round": 1, "file": "fanout-sweep-1000-ours-1.json", "exit": 0, "params": {...}}`.
//!   `scenario` groups runs into a table (with `variant`); `x` places the run on a plot's
//!   x axis (offered rate, connections); `system` is `ours` or `node`; `file` is rtload's
//!   `--json-out`, relative to the directory; `exit` its exit code; `params` is shown as
//!   is. A run with `"ladder_p99_ms": 50` belongs to a rate ladder: per system and round,
//!   the highest `x` reached before the first rate whose p99 passed the limit (or that
//!   delivered under 99 %) is that round's result.
//! - `machine.json`: a flat object describing the machine (CPU, cores, memory, kernel,
//!   versions), printed as a table.
//!
//! Each figure is the median over rounds of that run's value; the ratio is ours / Node,
//! and "better" follows the metric's direction (lower for latency, memory, CPU; higher for
//! throughput and delivery).

mod svg;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde_json::Value;

use crate::error::Result;
use svg::{Bar, NODE, OURS, Plot, Series};

#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    /// The results directory (runs.json, machine.json and the JSON reports it names).
    #[arg(long)]
    pub input: PathBuf,

    /// Where to write report.md and the SVG plots (default: --input).
    #[arg(long)]
    pub out: Option<PathBuf>,
}

/// One line of the manifest.
#[derive(Deserialize, Debug, Clone, PartialEq)]
pub struct RunEntry {
    pub scenario: String,
    #[serde(default)]
    pub variant: String,
    #[serde(default)]
    pub x: Option<f64>,
    pub system: String,
    #[serde(default)]
    pub round: u32,
    pub file: String,
    #[serde(default)]
    pub exit: Option<i32>,
    #[serde(default)]
    pub params: Value,
    #[serde(default)]
    pub ladder_p99_ms: Option<f64>,
}

/// Which direction is better.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Better {
    Lower,
    Higher,
    /// Shown, not judged (e.g. the generator's own CPU).
    Info,
}

/// Metric names, shared by extraction, tables and plots.
pub mod m {
    pub const THROUGHPUT: &str = "throughput (msg/s)";
    pub const P50: &str = "latency p50 (ms)";
    pub const P99: &str = "latency p99 (ms)";
    pub const P999: &str = "latency p999 (ms)";
    pub const P2D_P99: &str = "publish-to-deliver p99 (ms)";
    pub const DELIVERED: &str = "delivered of expected";
    pub const LOST: &str = "lost";
    pub const CPU: &str = "server CPU (s)";
    pub const CPU_PER_1K: &str = "server CPU per 1k msgs (ms)";
    pub const RSS: &str = "server RSS (MiB)";
    pub const RSS_PER_CONN: &str = "server RSS / connection (KiB)";
    pub const MEM_PER_CONN: &str = "memory per connection (KiB)";
    pub const MEM_DURING: &str = "server memory holding them (MiB)";
    pub const ESTABLISHED: &str = "connections established";
    pub const GEN_CPU: &str = "rtload CPU (% of all cores)";
    pub const MACHINE_CPU: &str = "machine CPU (%)";
    pub const MAX_RATE: &str = "max rate with p99 under the limit (publications/s)";
    pub const STORM_BACK: &str = "first loss to all back and recovered (ms)";
    pub const OUTAGE_P50: &str = "outage per client p50 (ms)";
    pub const OUTAGE_P99: &str = "outage per client p99 (ms)";
    pub const DUPLICATES: &str = "duplicated";
    pub const PING_DURING_P99: &str = "bystanders' ping p99 during the storm (ms)";
}

/// The figures of one run's JSON report, by metric name.
pub fn metrics_of(report: &Value) -> Vec<(&'static str, Better, f64)> {
    let f = |path: &[&str]| -> Option<f64> {
        let mut v = report;
        for p in path {
            v = v.get(*p)?;
        }
        v.as_f64()
    };
    let mut out = Vec::new();
    let mut push = |name: &'static str, better: Better, v: Option<f64>| {
        if let Some(v) = v.filter(|v| v.is_finite()) {
            out.push((name, better, v));
        }
    };
    let scenario = report.get("scenario").and_then(Value::as_str).unwrap_or("");
    let (throughput, lat, connections): (Option<f64>, &[&str], Option<f64>) = match scenario {
        "fanout" | "chat" => (
            f(&["delivery", "rate"]),
            &["latency_ms"],
            f(&["connections", "established"]),
        ),
        "http-publish" => (
            f(&["publish", "acked_rate"]),
            &["publish", "ack_ms"],
            f(&["subscribers", "connections", "established"]),
        ),
        "ping" | "rpc" => (
            f(&["calls", "ok_rate"]),
            &["latency_ms"],
            f(&["connections", "established"]),
        ),
        _ => (None, &[], f(&["connections", "established"])),
    };
    if scenario == "idle" {
        push(
            m::MEM_PER_CONN,
            Better::Lower,
            f(&["memory", "per_connection_kib"]),
        );
        push(
            m::MEM_DURING,
            Better::Lower,
            f(&["memory", "during_bytes"]).map(|b| b / 1048576.0),
        );
        push(m::ESTABLISHED, Better::Higher, connections);
    } else {
        push(m::THROUGHPUT, Better::Higher, throughput);
        let pct = |key: &str| {
            let mut path = lat.to_vec();
            path.push(key);
            f(&path)
        };
        push(m::P50, Better::Lower, pct("p50_ms"));
        push(m::P99, Better::Lower, pct("p99_ms"));
        push(m::P999, Better::Lower, pct("p999_ms"));
        match scenario {
            "http-publish" => {
                push(
                    m::P2D_P99,
                    Better::Lower,
                    f(&["subscribers", "latency_ms", "p99_ms"]),
                );
                push(
                    m::DELIVERED,
                    Better::Higher,
                    f(&["subscribers", "delivery", "ratio"]),
                );
                push(m::LOST, Better::Lower, f(&["subscribers", "lost", "total"]));
            }
            "fanout" | "chat" => {
                push(m::DELIVERED, Better::Higher, f(&["delivery", "ratio"]));
                push(m::LOST, Better::Lower, f(&["lost", "total"]));
            }
            "storm" => {
                // Not all back: no duration, so the table shows "-" rather than a
                // flattering number.
                let all_back = report
                    .pointer("/storm/all_recovered")
                    .and_then(Value::as_bool)
                    .unwrap_or(false);
                push(
                    m::STORM_BACK,
                    Better::Lower,
                    f(&["storm", "duration_ms"]).filter(|_| all_back),
                );
                push(
                    m::OUTAGE_P50,
                    Better::Lower,
                    f(&["storm", "reconnect_ms", "p50_ms"]),
                );
                push(
                    m::OUTAGE_P99,
                    Better::Lower,
                    f(&["storm", "reconnect_ms", "p99_ms"]),
                );
                push(m::LOST, Better::Lower, f(&["delivery", "lost"]));
                push(m::DUPLICATES, Better::Lower, f(&["delivery", "duplicates"]));
                push(
                    m::PING_DURING_P99,
                    Better::Lower,
                    f(&["ping", "during_ms", "p99_ms"]),
                );
            }
            _ => {}
        }
    }
    let cpu = f(&["server", "cpu_seconds"]);
    push(m::CPU, Better::Lower, cpu);
    if let (Some(busy), Some(tp)) = (f(&["server", "cores_busy"]), throughput)
        && tp > 0.0
    {
        // CPU seconds per second / messages per second = CPU seconds per message.
        push(m::CPU_PER_1K, Better::Lower, Some(busy / tp * 1e6));
    }
    let rss = f(&["server", "rss_bytes"]);
    push(m::RSS, Better::Lower, rss.map(|b| b / 1048576.0));
    if let (Some(rss), Some(n)) = (rss, connections)
        && n > 0.0
        && scenario != "idle"
        && scenario != "http-publish"
    {
        push(m::RSS_PER_CONN, Better::Lower, Some(rss / 1024.0 / n));
    }
    push(m::GEN_CPU, Better::Info, f(&["generator", "cpu_percent"]));
    push(
        m::MACHINE_CPU,
        Better::Info,
        f(&["generator", "machine_cpu_percent"]),
    );
    out
}

/// The median (mean of the middle two for an even count); `None` when empty.
pub fn median(values: &[f64]) -> Option<f64> {
    let mut v: Vec<f64> = values.iter().copied().filter(|v| v.is_finite()).collect();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    match n {
        0 => None,
        _ if n % 2 == 1 => Some(v[n / 2]),
        _ => Some((v[n / 2 - 1] + v[n / 2]) / 2.0),
    }
}

/// ours / Node, and how many times better ours is (> 1: ours better; < 1: Node better).
pub fn ratio(ours: f64, node: f64, better: Better) -> (Option<f64>, Option<f64>) {
    let r = (node != 0.0).then(|| ours / node).filter(|r| r.is_finite());
    let advantage = match better {
        Better::Higher => r,
        Better::Lower => (ours != 0.0).then(|| node / ours).filter(|a| a.is_finite()),
        Better::Info => None,
    };
    (r, advantage)
}

/// "ours ×2.1", "Node ×1.4", "≈ (within 5 %)", or "" when not judged.
pub fn verdict(advantage: Option<f64>) -> String {
    match advantage {
        None => String::new(),
        Some(a) if (a - 1.0).abs() < 0.05 => "≈ (within 5 %)".into(),
        Some(a) if a > 1.0 => format!("**ours** ×{}", fmt_num(a)),
        Some(a) => format!("Node ×{}", fmt_num(1.0 / a)),
    }
}

/// Numbers for tables: 3 significant digits, thousands as is.
pub fn fmt_num(v: f64) -> String {
    let a = v.abs();
    if a >= 100.0 {
        format!("{v:.0}")
    } else if a >= 10.0 {
        format!("{v:.1}")
    } else if a >= 1.0 {
        format!("{v:.2}")
    } else if a == 0.0 {
        "0".into()
    } else {
        format!("{v:.3}")
    }
}

/// Runs loaded: each with its figures, `None` when its report is missing or unreadable.
#[derive(Debug, Clone)]
pub struct Loaded {
    pub entry: RunEntry,
    pub metrics: Option<Vec<(&'static str, Better, f64)>>,
    pub warnings: Vec<String>,
}

/// A table: (scenario, variant) → system → metric → values over rounds.
#[derive(Debug, Default)]
pub struct Group {
    pub scenario: String,
    pub variant: String,
    pub x: Option<f64>,
    pub params: Value,
    /// metric → (direction, ours values, node values), in first-seen order.
    pub metrics: Vec<(&'static str, Better, Vec<f64>, Vec<f64>)>,
    pub runs: BTreeMap<String, usize>,
    pub failed: BTreeMap<String, usize>,
    pub warnings: BTreeMap<String, BTreeMap<String, usize>>,
}

impl Group {
    fn add(&mut self, run: &Loaded) {
        let ours = run.entry.system == "ours";
        *self.runs.entry(run.entry.system.clone()).or_default() += 1;
        let Some(metrics) = &run.metrics else {
            *self.failed.entry(run.entry.system.clone()).or_default() += 1;
            return;
        };
        if run.entry.exit.is_some_and(|e| e != 0) {
            *self.failed.entry(run.entry.system.clone()).or_default() += 1;
        }
        for (name, better, v) in metrics {
            let slot = match self.metrics.iter().position(|m| m.0 == *name) {
                Some(i) => &mut self.metrics[i],
                None => {
                    self.metrics.push((name, *better, vec![], vec![]));
                    let last = self.metrics.len() - 1;
                    &mut self.metrics[last]
                }
            };
            if ours {
                slot.2.push(*v);
            } else {
                slot.3.push(*v);
            }
        }
        for w in &run.warnings {
            *self
                .warnings
                .entry(run.entry.system.clone())
                .or_default()
                .entry(warning_kind(w))
                .or_default() += 1;
        }
    }

    /// (metric, direction, ours median, node median).
    pub fn medians(&self) -> Vec<(&'static str, Better, Option<f64>, Option<f64>)> {
        self.metrics
            .iter()
            .map(|(name, b, o, n)| (*name, *b, median(o), median(n)))
            .collect()
    }

    pub fn median_of(&self, metric: &str, system: &str) -> Option<f64> {
        let m = self.metrics.iter().find(|m| m.0 == metric)?;
        median(if system == "ours" { &m.2 } else { &m.3 })
    }
}

/// rtload's warnings, shortened to their kind for counting.
fn warning_kind(w: &str) -> String {
    if w.contains("cores were") {
        "machine CPU saturated (generator and servers share the cores)".into()
    } else if w.contains("may be the bottleneck") {
        "rtload itself near its CPU limit".into()
    } else if w.contains("pacer fell behind") {
        "rtload's pacer sent late".into()
    } else if w.contains("descriptor") {
        "file-descriptor limit".into()
    } else {
        w.chars().take(80).collect()
    }
}

/// Groups runs by (scenario, variant) in manifest order.
pub fn group(runs: &[Loaded]) -> Vec<Group> {
    let mut groups: Vec<Group> = Vec::new();
    for run in runs {
        let e = &run.entry;
        let i = match groups
            .iter()
            .position(|g| g.scenario == e.scenario && g.variant == e.variant)
        {
            Some(i) => i,
            None => {
                groups.push(Group {
                    scenario: e.scenario.clone(),
                    variant: e.variant.clone(),
                    x: e.x,
                    params: e.params.clone(),
                    ..Group::default()
                });
                groups.len() - 1
            }
        };
        groups[i].add(run);
    }
    groups
}

/// Per system, the median over rounds of each round's ladder result: the highest `x`
/// passed before the first failure (p99 over the limit, under 99 % delivered, or no
/// result). 0 when the lowest rate already failed.
pub fn ladder(runs: &[Loaded], scenario: &str) -> BTreeMap<String, (Option<f64>, Vec<f64>)> {
    let mut by: BTreeMap<(String, u32), Vec<&Loaded>> = BTreeMap::new();
    for r in runs.iter().filter(|r| r.entry.scenario == scenario) {
        by.entry((r.entry.system.clone(), r.entry.round))
            .or_default()
            .push(r);
    }
    let mut per_system: BTreeMap<String, Vec<f64>> = BTreeMap::new();
    for ((system, _), mut steps) in by {
        steps.sort_by(|a, b| {
            a.entry
                .x
                .unwrap_or(0.0)
                .total_cmp(&b.entry.x.unwrap_or(0.0))
        });
        let mut best = 0.0;
        for s in steps {
            let limit = s.entry.ladder_p99_ms.unwrap_or(f64::INFINITY);
            let get = |name: &str| {
                s.metrics
                    .as_ref()
                    .and_then(|m| m.iter().find(|m| m.0 == name).map(|m| m.2))
            };
            let ok = matches!(get(m::P99), Some(p) if p <= limit)
                && get(m::DELIVERED).is_none_or(|d| d >= 0.99);
            if !ok {
                break;
            }
            best = s.entry.x.unwrap_or(0.0);
        }
        per_system.entry(system).or_default().push(best);
    }
    per_system
        .into_iter()
        .map(|(system, v)| (system, (median(&v), v)))
        .collect()
}

fn load_manifest(dir: &Path) -> Result<Vec<RunEntry>> {
    let path = dir.join("runs.json");
    let text =
        std::fs::read_to_string(&path).map_err(|e| format!("reading {}: {e}", path.display()))?;
    parse_manifest(&text).map_err(|e| format!("{}: {e}", path.display()).into())
}

/// A JSON array of runs, or one run object per line.
pub fn parse_manifest(text: &str) -> std::result::Result<Vec<RunEntry>, String> {
    if text.trim_start().starts_with('[') {
        return serde_json::from_str(text).map_err(|e| e.to_string());
    }
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| serde_json::from_str(l).map_err(|e| format!("line {}: {e}", i + 1)))
        .collect()
}

fn load_runs(dir: &Path, entries: Vec<RunEntry>) -> Vec<Loaded> {
    entries
        .into_iter()
        .map(|entry| {
            let report: Option<Value> = std::fs::read_to_string(dir.join(&entry.file))
                .ok()
                .and_then(|t| serde_json::from_str(&t).ok());
            let warnings = report
                .as_ref()
                .and_then(|r| r.get("generator")?.get("warnings")?.as_array().cloned())
                .unwrap_or_default()
                .iter()
                .filter_map(|w| w.as_str().map(str::to_string))
                .collect();
            Loaded {
                metrics: report.as_ref().map(metrics_of),
                entry,
                warnings,
            }
        })
        .collect()
}

pub fn run(args: &Args) -> Result<()> {
    let out = args.out.clone().unwrap_or_else(|| args.input.clone());
    std::fs::create_dir_all(&out).map_err(|e| format!("creating {}: {e}", out.display()))?;
    let entries = load_manifest(&args.input)?;
    if entries.is_empty() {
        return Err("runs.json lists no runs".into());
    }
    let machine: Option<Value> = std::fs::read_to_string(args.input.join("machine.json"))
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok());
    let runs = load_runs(&args.input, entries);
    let (markdown, plots) = render(&runs, machine.as_ref());
    for (name, svg) in &plots {
        let path = out.join(name);
        std::fs::write(&path, svg).map_err(|e| format!("writing {}: {e}", path.display()))?;
    }
    let path = out.join("report.md");
    std::fs::write(&path, &markdown).map_err(|e| format!("writing {}: {e}", path.display()))?;
    print!("{markdown}");
    eprintln!(
        "rtload report: {} and {} plots written to {}",
        path.display(),
        plots.len(),
        out.display()
    );
    Ok(())
}

/// The headline metrics, one bar each in the ratio chart.
fn headline(scenario: &str, metric: &str) -> bool {
    match metric {
        m::P99 | m::CPU_PER_1K | m::MEM_PER_CONN | m::MAX_RATE | m::STORM_BACK => true,
        m::THROUGHPUT => scenario.starts_with("http"),
        _ => false,
    }
}

/// The report's text and its plots (file name, SVG).
pub fn render(runs: &[Loaded], machine: Option<&Value>) -> (String, Vec<(String, String)>) {
    let mut md = String::new();
    let groups = group(runs);
    let rounds = runs.iter().map(|r| r.entry.round).max().unwrap_or(0);
    md.push_str("# rtload comparison: ours vs Node.js\n\n");
    let _ = writeln!(
        md,
        "{} runs, {} round(s), systems alternating within each round. Each figure is the \
         median over rounds; ratio = ours / Node; \"better\" follows the metric's direction \
         (lower for latency, memory and CPU; higher for throughput and delivery).\n",
        runs.len(),
        rounds
    );
    if let Some(Value::Object(machine)) = machine {
        md.push_str("## Machine\n\n| | |\n|---|---|\n");
        for (k, v) in machine {
            let v = match v {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            let _ = writeln!(md, "| {k} | {} |", v.replace('|', "/"));
        }
        md.push_str(
            "\nrtload, both servers and their nats-servers run on this one machine: the \
             generator competes with the server under test for the same cores (see the \
             rtload CPU and machine CPU rows and the warnings).\n\n",
        );
    }
    let mut bars: Vec<Bar> = Vec::new();
    let mut ladder_done: Vec<String> = Vec::new();
    md.push_str("## Results\n\n");
    for g in &groups {
        let is_ladder = runs
            .iter()
            .any(|r| r.entry.scenario == g.scenario && r.entry.ladder_p99_ms.is_some());
        if is_ladder && !ladder_done.contains(&g.scenario) {
            ladder_done.push(g.scenario.clone());
            let limit = runs
                .iter()
                .find_map(|r| (r.entry.scenario == g.scenario).then_some(r.entry.ladder_p99_ms)?)
                .unwrap_or(0.0);
            let l = ladder(runs, &g.scenario);
            let _ = writeln!(
                md,
                "### {} — highest rate with p99 ≤ {} ms\n\n| | ours | Node | ours/Node | better |\n|---|---:|---:|---:|---|",
                g.scenario,
                fmt_num(limit)
            );
            let get = |s: &str| l.get(s).and_then(|v| v.0);
            let (o, n) = (get("ours"), get("node"));
            let rounds_of = |s: &str| {
                l.get(s)
                    .map(|v| {
                        v.1.iter()
                            .map(|x| fmt_num(*x))
                            .collect::<Vec<_>>()
                            .join(", ")
                    })
                    .unwrap_or_default()
            };
            let (r, adv) = match (o, n) {
                (Some(o), Some(n)) => ratio(o, n, Better::Higher),
                _ => (None, None),
            };
            let _ = writeln!(
                md,
                "| {} | {} | {} | {} | {} |\n\nPer round: ours {}; Node {} (0: not even the lowest rate, {}/s, \
                 stayed under the limit). Ladder steps below.\n",
                m::MAX_RATE,
                o.map_or("-".into(), fmt_num),
                n.map_or("-".into(), fmt_num),
                r.map_or("-".into(), fmt_num),
                verdict(adv),
                rounds_of("ours"),
                rounds_of("node"),
                fmt_num(
                    runs.iter()
                        .filter(|r| r.entry.scenario == g.scenario)
                        .filter_map(|r| r.entry.x)
                        .fold(f64::INFINITY, f64::min)
                ),
            );
            if let Some(a) = adv {
                bars.push(Bar {
                    label: format!("{} max rate", g.scenario),
                    factor: a,
                });
            }
        }
        let title = if g.variant.is_empty() {
            g.scenario.clone()
        } else {
            format!("{} — {}", g.scenario, g.variant)
        };
        let _ = writeln!(md, "### {title}\n");
        if !g.params.is_null() {
            let _ = writeln!(md, "Parameters: `{}`\n", g.params);
        }
        md.push_str("| metric | ours | Node | ours/Node | better |\n|---|---:|---:|---:|---|\n");
        for (name, better, o, n) in g.medians() {
            let (r, adv) = match (o, n) {
                (Some(o), Some(n)) => ratio(o, n, better),
                _ => (None, None),
            };
            let _ = writeln!(
                md,
                "| {name} | {} | {} | {} | {} |",
                o.map_or("-".into(), fmt_num),
                n.map_or("-".into(), fmt_num),
                r.map_or("-".into(), fmt_num),
                verdict(adv)
            );
            if !is_ladder
                && headline(&g.scenario, name)
                && let Some(a) = adv
            {
                bars.push(Bar {
                    label: format!("{title}: {}", short(name)),
                    factor: a,
                });
            }
        }
        md.push('\n');
        let runs_line: Vec<String> = g
            .runs
            .iter()
            .map(|(s, n)| {
                let failed = g.failed.get(s).copied().unwrap_or(0);
                if failed > 0 {
                    format!("{s}: {n} runs, {failed} failed or incomplete")
                } else {
                    format!("{s}: {n} runs")
                }
            })
            .collect();
        let _ = writeln!(md, "Runs: {}.", runs_line.join("; "));
        for (system, kinds) in &g.warnings {
            for (kind, count) in kinds {
                let _ = writeln!(md, "rtload warning ({system}, {count} run(s)): {kind}.");
            }
        }
        md.push('\n');
    }

    let mut plots = Vec::new();
    let x_series = |scenario: &str, metric: &str, system: &str| -> Vec<(f64, f64)> {
        groups
            .iter()
            .filter(|g| g.scenario == scenario)
            .filter_map(|g| Some((g.x?, g.median_of(metric, system)?)))
            .collect()
    };
    let series = |scenario: &str, metric: &str, label: &str, dashed: bool| -> Vec<Series> {
        [("ours", "ours", OURS), ("node", "Node", NODE)]
            .into_iter()
            .map(|(system, name, color)| Series {
                name: format!("{name} {label}"),
                color,
                dashed,
                points: x_series(scenario, metric, system),
            })
            .collect()
    };
    let has = |scenario: &str| {
        groups
            .iter()
            .any(|g| g.scenario == scenario && g.x.is_some())
    };
    md.push_str("## Plots\n\n");
    for (scenario, file, title, limit) in [
        (
            "fanout-sweep",
            "fanout-latency.svg",
            "Fan-out publish-to-deliver latency vs offered rate",
            None,
        ),
        (
            "fanout-10k",
            "fanout-10k-latency.svg",
            "Fan-out to 10k subscribers: latency per ladder step",
            runs.iter().find_map(|r| {
                (r.entry.scenario == "fanout-10k").then_some(r.entry.ladder_p99_ms)?
            }),
        ),
    ] {
        if !has(scenario) {
            continue;
        }
        let mut s = series(scenario, m::P50, "p50", false);
        s.extend(series(scenario, m::P99, "p99", true));
        let label = limit.map(|l| format!("{} ms", fmt_num(l)));
        let plot = Plot {
            title,
            x_label: "offered publications/s",
            y_label: "publish-to-deliver latency, ms",
            log_x: true,
            log_y: true,
            hline: limit.zip(label.as_deref()),
        };
        plots.push((file.to_string(), svg::line_plot(&plot, &s)));
        let _ = writeln!(md, "![{title}]({file})\n");
    }
    if has("idle") {
        for (metric, file, title, y) in [
            (
                m::MEM_PER_CONN,
                "idle-memory-per-connection.svg",
                "Idle connections: server memory per connection",
                "KiB per connection",
            ),
            (
                m::MEM_DURING,
                "idle-memory-total.svg",
                "Idle connections: server resident memory",
                "MiB (all server processes but NATS)",
            ),
        ] {
            let plot = Plot {
                title,
                x_label: "idle connections",
                y_label: y,
                log_x: false,
                log_y: false,
                hline: None,
            };
            plots.push((
                file.to_string(),
                svg::line_plot(&plot, &series("idle", metric, "", false)),
            ));
            let _ = writeln!(md, "![{title}]({file})\n");
        }
    }
    if !bars.is_empty() {
        let title = "ours vs Node: how many times better, per scenario";
        plots.push(("ratios.svg".into(), svg::ratio_bars(title, &bars)));
        let _ = writeln!(md, "![{title}](ratios.svg)\n");
    }
    (md, plots)
}

fn short(metric: &str) -> &str {
    match metric {
        m::P99 => "p99",
        m::CPU_PER_1K => "CPU/msg",
        m::MEM_PER_CONN => "KiB/conn",
        m::THROUGHPUT => "throughput",
        other => other,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use serde_json::json;

    fn fanout(p50: f64, p99: f64, rate: f64, cpu_busy: f64, ratio: f64) -> Value {
        json!({
            "scenario": "fanout",
            "connections": {"established": 1000},
            "delivery": {"rate": rate, "ratio": ratio},
            "latency_ms": {"p50_ms": p50, "p99_ms": p99, "p999_ms": p99 * 2.0},
            "lost": {"total": 0},
            "generator": {"cpu_percent": 40.0, "machine_cpu_percent": 95.0,
                          "warnings": ["the machine's 2 cores were 95% busy: ..."]},
            "server": {"cpu_seconds": cpu_busy * 10.0, "cores_busy": cpu_busy,
                       "rss_bytes": 100 * 1048576},
        })
    }

    fn loaded(scenario: &str, system: &str, round: u32, x: f64, report: Value) -> Loaded {
        Loaded {
            entry: RunEntry {
                scenario: scenario.into(),
                variant: format!("{x}"),
                x: Some(x),
                system: system.into(),
                round,
                file: String::new(),
                exit: Some(0),
                params: json!({"rate": x}),
                ladder_p99_ms: (scenario == "fanout-10k").then_some(50.0),
            },
            metrics: Some(metrics_of(&report)),
            warnings: vec![],
        }
    }

    #[test]
    fn median_over_rounds() {
        assert_eq!(median(&[]), None);
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), Some(2.5));
        assert_eq!(median(&[f64::NAN, 5.0]), Some(5.0));
        let runs = vec![
            loaded(
                "fanout-sweep",
                "ours",
                1,
                1000.0,
                fanout(1.0, 3.0, 1e6, 0.5, 1.0),
            ),
            loaded(
                "fanout-sweep",
                "node",
                1,
                1000.0,
                fanout(2.0, 9.0, 1e6, 1.0, 1.0),
            ),
            loaded(
                "fanout-sweep",
                "ours",
                2,
                1000.0,
                fanout(1.2, 50.0, 1e6, 0.7, 1.0),
            ),
            loaded(
                "fanout-sweep",
                "node",
                2,
                1000.0,
                fanout(2.2, 10.0, 1e6, 1.2, 1.0),
            ),
            loaded(
                "fanout-sweep",
                "ours",
                3,
                1000.0,
                fanout(1.1, 4.0, 1e6, 0.6, 1.0),
            ),
            loaded(
                "fanout-sweep",
                "node",
                3,
                1000.0,
                fanout(2.1, 11.0, 1e6, 1.1, 1.0),
            ),
        ];
        let groups = group(&runs);
        assert_eq!(groups.len(), 1);
        let g = &groups[0];
        // The outlier round (p99 50 ms) does not move the median.
        assert_eq!(g.median_of(m::P99, "ours"), Some(4.0));
        assert_eq!(g.median_of(m::P99, "node"), Some(10.0));
        assert_eq!(g.median_of(m::P50, "ours"), Some(1.1));
        // 0.6 cores busy at 1M deliveries/s: 0.6 ms of CPU per 1000 messages.
        let cpu = g.median_of(m::CPU_PER_1K, "ours").unwrap();
        assert!((cpu - 0.6).abs() < 1e-9, "{cpu}");
        assert_eq!(g.median_of(m::RSS, "ours"), Some(100.0));
        assert!((g.median_of(m::RSS_PER_CONN, "ours").unwrap() - 102.4).abs() < 1e-9);
        assert_eq!(g.runs.get("ours"), Some(&3));
    }

    #[test]
    fn ratio_direction_follows_the_metric() {
        // Latency, memory, CPU: lower is better; ours half of Node's = ours ×2.
        let (r, adv) = ratio(5.0, 10.0, Better::Lower);
        assert_eq!((r, adv), (Some(0.5), Some(2.0)));
        assert_eq!(verdict(adv), "**ours** ×2.00");
        // Throughput: higher is better; ours half of Node's = Node ×2.
        let (r, adv) = ratio(5.0, 10.0, Better::Higher);
        assert_eq!((r, adv), (Some(0.5), Some(0.5)));
        assert_eq!(verdict(adv), "Node ×2.00");
        assert_eq!(
            verdict(ratio(100.0, 98.0, Better::Higher).1),
            "≈ (within 5 %)"
        );
        assert_eq!(ratio(1.0, 2.0, Better::Info).1, None);
        assert_eq!(ratio(1.0, 0.0, Better::Lower).0, None);
        assert_eq!(ratio(0.0, 2.0, Better::Lower).1, None);
        // Every metric extracted has the right direction.
        let dirs: BTreeMap<&str, Better> = metrics_of(&fanout(1.0, 2.0, 1000.0, 0.5, 1.0))
            .into_iter()
            .map(|(n, b, _)| (n, b))
            .collect();
        assert_eq!(dirs[m::THROUGHPUT], Better::Higher);
        assert_eq!(dirs[m::DELIVERED], Better::Higher);
        for lower in [
            m::P50,
            m::P99,
            m::P999,
            m::CPU,
            m::CPU_PER_1K,
            m::RSS,
            m::LOST,
        ] {
            assert_eq!(dirs[lower], Better::Lower, "{lower}");
        }
        assert_eq!(dirs[m::GEN_CPU], Better::Info);
    }

    #[test]
    fn scenarios_extract_their_figures() {
        let idle = json!({"scenario": "idle", "connections": {"established": 5000},
            "memory": {"per_connection_kib": 12.5, "during_bytes": 104857600},
            "server": {"cpu_seconds": 1.0, "cores_busy": 0.1, "rss_bytes": 1}});
        let got: BTreeMap<&str, f64> = metrics_of(&idle)
            .into_iter()
            .map(|(n, _, v)| (n, v))
            .collect();
        assert_eq!(got[m::MEM_PER_CONN], 12.5);
        assert_eq!(got[m::MEM_DURING], 100.0);
        assert!(!got.contains_key(m::THROUGHPUT) && !got.contains_key(m::RSS_PER_CONN));
        let http = json!({"scenario": "http-publish", "publish": {"acked_rate": 500.0,
            "ack_ms": {"p50_ms": 1.0, "p99_ms": 2.0, "p999_ms": 3.0}},
            "subscribers": {"connections": {"established": 10}, "delivery": {"ratio": 1.0},
            "latency_ms": {"p99_ms": 4.0}, "lost": {"total": 0}}});
        let got: BTreeMap<&str, f64> = metrics_of(&http)
            .into_iter()
            .map(|(n, _, v)| (n, v))
            .collect();
        assert_eq!(
            (got[m::THROUGHPUT], got[m::P99], got[m::P2D_P99]),
            (500.0, 2.0, 4.0)
        );
        let ping = json!({"scenario": "ping", "calls": {"ok_rate": 1000.0},
            "latency_ms": {"p50_ms": 0.5, "p99_ms": 1.0, "p999_ms": 2.0},
            "connections": {"established": 1000}});
        let got: BTreeMap<&str, f64> = metrics_of(&ping)
            .into_iter()
            .map(|(n, _, v)| (n, v))
            .collect();
        assert_eq!((got[m::THROUGHPUT], got[m::P50]), (1000.0, 0.5));
        // No server figures without --server-pid.
        assert!(!got.contains_key(m::CPU));
        let storm = |all_recovered: bool| {
            json!({"scenario": "storm", "connections": {"established": 5000},
                "storm": {"all_recovered": all_recovered, "duration_ms": 1500.0,
                    "reconnect_ms": {"p50_ms": 60.0, "p99_ms": 900.0}},
                "delivery": {"lost": 0, "duplicates": 2},
                "ping": {"during_ms": {"p99_ms": 4.5}},
                "server": {"cpu_seconds": 3.0, "rss_bytes": 1048576}})
        };
        let got: BTreeMap<&str, f64> = metrics_of(&storm(true))
            .into_iter()
            .map(|(n, _, v)| (n, v))
            .collect();
        assert_eq!(
            (
                got[m::STORM_BACK],
                got[m::OUTAGE_P50],
                got[m::OUTAGE_P99],
                got[m::LOST],
                got[m::DUPLICATES],
                got[m::PING_DURING_P99],
                got[m::CPU]
            ),
            (1500.0, 60.0, 900.0, 0.0, 2.0, 4.5, 3.0)
        );
        assert!(!got.contains_key(m::THROUGHPUT) && !got.contains_key(m::P50));
        let not_all_back: Vec<&str> = metrics_of(&storm(false))
            .into_iter()
            .map(|(n, _, _)| n)
            .collect();
        assert!(
            !not_all_back.contains(&m::STORM_BACK),
            "no time to recovery when some never came back"
        );
    }

    #[test]
    fn ladder_stops_at_the_first_failure() {
        let step = |system: &str, round, rate: f64, p99: f64, ratio: f64| {
            loaded(
                "fanout-10k",
                system,
                round,
                rate,
                fanout(1.0, p99, rate * 1e4, 0.5, ratio),
            )
        };
        let runs = vec![
            step("ours", 1, 100.0, 5.0, 1.0),
            step("ours", 1, 200.0, 20.0, 1.0),
            step("ours", 1, 400.0, 80.0, 1.0),
            // A later step that passes again does not count: the ladder stopped.
            step("ours", 1, 800.0, 10.0, 1.0),
            step("node", 1, 100.0, 30.0, 1.0),
            step("node", 1, 200.0, 40.0, 0.9),
            step("ours", 2, 100.0, 5.0, 1.0),
            step("ours", 2, 200.0, 60.0, 1.0),
            step("node", 2, 100.0, 70.0, 1.0),
        ];
        let l = ladder(&runs, "fanout-10k");
        assert_eq!(l["ours"].1, vec![200.0, 100.0]);
        assert_eq!(l["ours"].0, Some(150.0));
        assert_eq!(l["node"].1, vec![100.0, 0.0]);
        assert_eq!(l["node"].0, Some(50.0));
    }

    #[test]
    fn manifest_reads_arrays_and_lines() {
        let line =
            r#"{"scenario":"ping","system":"ours","round":1,"file":"ping-ours-1.json","exit":0}"#;
        let lines = parse_manifest(&format!("{line}\n\n{line}\n")).unwrap();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0].variant, "");
        let array = parse_manifest(&format!("[{line}]")).unwrap();
        assert_eq!(array[0], lines[0]);
        assert!(parse_manifest("{oops").is_err());
    }

    #[test]
    fn report_renders_tables_and_well_formed_plots() {
        let idle = |system: &str, n: f64, kib: f64| {
            loaded(
                "idle",
                system,
                1,
                n,
                json!({"scenario": "idle", "connections": {"established": n},
                       "memory": {"per_connection_kib": kib, "during_bytes": n * kib * 1024.0}}),
            )
        };
        let mut runs = vec![
            loaded(
                "fanout-sweep",
                "ours",
                1,
                200.0,
                fanout(1.0, 3.0, 2e5, 0.2, 1.0),
            ),
            loaded(
                "fanout-sweep",
                "node",
                1,
                200.0,
                fanout(2.0, 6.0, 2e5, 0.4, 1.0),
            ),
            loaded(
                "fanout-sweep",
                "ours",
                1,
                1000.0,
                fanout(1.5, 5.0, 1e6, 0.5, 1.0),
            ),
            loaded(
                "fanout-sweep",
                "node",
                1,
                1000.0,
                fanout(3.0, 40.0, 1e6, 1.0, 1.0),
            ),
            loaded(
                "fanout-10k",
                "ours",
                1,
                100.0,
                fanout(1.0, 5.0, 1e6, 0.5, 1.0),
            ),
            loaded(
                "fanout-10k",
                "node",
                1,
                100.0,
                fanout(1.0, 70.0, 1e6, 0.5, 1.0),
            ),
            idle("ours", 1000.0, 10.0),
            idle("node", 1000.0, 20.0),
            idle("ours", 5000.0, 9.0),
            idle("node", 5000.0, 18.0),
        ];
        runs[0].warnings = vec!["the machine's 2 cores were 99% busy".into()];
        runs.push(Loaded {
            metrics: None,
            ..loaded("ping", "node", 1, 1000.0, json!({}))
        });
        let machine = json!({"cpu": "Test CPU | 2 GHz", "cores": 2});
        let (md, plots) = render(&runs, Some(&machine));
        assert!(md.contains("| cpu | Test CPU / 2 GHz |"), "{md}");
        assert!(
            md.contains("| latency p99 (ms) | 5.00 | 40.0 | 0.125 | **ours** ×8.00 |"),
            "{md}"
        );
        assert!(
            md.contains("| max rate with p99 under the limit (publications/s) | 100 | 0 | - |"),
            "{md}"
        );
        assert!(
            md.contains("rtload warning (ours, 1 run(s)): machine CPU saturated"),
            "{md}"
        );
        assert!(md.contains("node: 1 runs, 1 failed or incomplete"), "{md}");
        let names: Vec<&str> = plots.iter().map(|p| p.0.as_str()).collect();
        assert_eq!(
            names,
            [
                "fanout-latency.svg",
                "fanout-10k-latency.svg",
                "idle-memory-per-connection.svg",
                "idle-memory-total.svg",
                "ratios.svg"
            ]
        );
        for (name, text) in &plots {
            let elements = svg::tests::check_xml(text).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(elements[0], "svg", "{name}");
            assert!(md.contains(&format!("]({name})")), "{name}");
        }
        // Both systems' p50 and p99 lines in the latency plot.
        assert_eq!(plots[0].1.matches("<polyline").count(), 4);
        assert!(plots[4].1.matches("class=\"bar\"").count() >= 3);
    }
}
