//! The `ping` and `rpc` report: one struct, printed as text and serialized as JSON; and
//! their progress line.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use serde::Serialize;

use super::tracker::{BUSY, TIMEOUT, UNKNOWN, code_name};
use super::{Call, Collector, Outcome, Plan, Rate};
use crate::pacer::Window;
use crate::report::{
    Errors, Generator, cpu_suffix, fmt_ms, latency_line, measured_secs, p50_p99, per_sec, secs,
};
use crate::stats::Summary;
use crate::wire::Encoding;

/// What the calls are, for headers: `ping`, or the RPC method.
pub fn call_name(call: &Call) -> String {
    match call {
        Call::Ping => "ping".into(),
        Call::Rpc { method, .. } => method.clone(),
    }
}

/// One line of live progress, printed to stderr once a second.
#[derive(Debug, Clone)]
pub struct Progress {
    pub elapsed: Duration,
    pub phase: &'static str,
    pub sent_per_s: f64,
    pub ok_per_s: f64,
    pub p99_ms: Option<f64>,
    pub open: u64,
    pub in_flight: u64,
    pub busy: u64,
    pub parts: u64,
    pub errors: u64,
    pub cpu_percent: Option<f64>,
    pub machine_cpu_percent: Option<f64>,
}

impl fmt::Display for Progress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "[{:>4}s {:<7}] sent {:>7.0}/s  ok {:>7.0}/s  p99 {:>8} ms  conns {:>6}  in flight {:>5}  errors {}",
            self.elapsed.as_secs_f64().round(),
            self.phase,
            self.sent_per_s,
            self.ok_per_s,
            fmt_ms(self.p99_ms),
            self.open,
            self.in_flight,
            self.errors,
        )?;
        if self.busy > 0 {
            write!(f, "  busy {}", self.busy)?;
        }
        if self.parts > 0 {
            write!(f, "  parts {}", self.parts)?;
        }
        f.write_str(&cpu_suffix(self.cpu_percent, self.machine_cpu_percent))
    }
}

#[derive(Serialize, Debug)]
pub struct CallsReport {
    pub scenario: &'static str,
    /// Stopped by Ctrl-C before the schedule ended.
    pub interrupted: bool,
    pub config: Config,
    pub connections: Connections,
    pub calls: Calls,
    /// Intended send time → `ok` reply, measured calls (for ping: the round-trip time).
    pub latency_ms: Option<Summary>,
    /// Intended send time → error reply.
    pub error_latency_ms: Option<Summary>,
    pub outcomes: Outcomes,
    pub parts: Parts,
    pub errors: Errors,
    pub generator: Generator,
}

#[derive(Serialize, Debug)]
pub struct Config {
    pub url: String,
    pub encoding: Encoding,
    /// `ping`, or the RPC method.
    pub call: String,
    pub data: Option<serde_json::Value>,
    pub connections: usize,
    /// Calls per second, all connections.
    pub rate: f64,
    pub rate_per_conn: Option<f64>,
    pub duration_s: f64,
    pub warmup_s: f64,
    pub timeout_ms: u64,
    pub bind_ips: Vec<String>,
}

#[derive(Serialize, Debug)]
pub struct Connections {
    pub requested: usize,
    pub established: usize,
    pub failed: usize,
    pub open_at_end: u64,
    pub closed_early: u64,
    pub connect_ms: Option<Summary>,
}

impl Connections {
    /// The report line: how many came up, failed, stayed, and connect latency.
    pub fn line(&self) -> String {
        format!("connections   {}", self.counts())
    }

    /// The line without its label.
    pub fn counts(&self) -> String {
        format!(
            "{} of {} established, {} failed, {} open at end, {} closed early; connect {}\n",
            self.established,
            self.requested,
            self.failed,
            self.open_at_end,
            self.closed_early,
            p50_p99(self.connect_ms.as_ref()),
        )
    }
}

/// Measured-window counts.
#[derive(Serialize, Debug)]
pub struct Calls {
    pub offered_rate: f64,
    /// Calls scheduled in the measured window (fewer when interrupted).
    pub scheduled: u64,
    pub sent: u64,
    pub achieved_rate: f64,
    /// Calls that got a final reply, `ok` or error.
    pub replied: u64,
    pub ok: u64,
    /// Throughput: successful calls per second over the measured window.
    pub ok_rate: f64,
    pub failed: u64,
    /// Intended send time → written to the socket (the generator's own delay).
    pub send_lag_ms: Option<Summary>,
}

#[derive(Serialize, Debug)]
pub struct Outcomes {
    pub ok: u64,
    pub busy_113: Busy,
    pub timeout_114: u64,
    pub unknown_104: u64,
    /// Every error reply by code, those above included.
    pub error_codes: BTreeMap<u32, u64>,
    /// No reply within the timeout (or before the run ended).
    pub no_reply: u64,
    /// The connection closed or broke first.
    pub connection_lost: u64,
}

#[derive(Serialize, Debug)]
pub struct Busy {
    pub count: u64,
    /// The `retry_after_ms` the server asked for.
    pub retry_after_ms: Option<Summary>,
}

#[derive(Serialize, Debug)]
pub struct Parts {
    /// `rpc_part` pushes of measured calls.
    pub pushes: u64,
    pub calls_with_parts: u64,
    /// Intended send time → first part.
    pub first_part_ms: Option<Summary>,
}

pub fn build(
    plan: &Plan,
    window: Window,
    outcome: &Outcome,
    col: &Collector,
    generator: Generator,
) -> CallsReport {
    let common = &plan.common;
    let s = &col.stats;
    let rate = plan.total_rate();
    let interrupted = outcome.interrupted || outcome.cut_short;
    let span = measured_secs(
        s.last_write,
        outcome.measure_start,
        1.0 / rate,
        common.duration,
        interrupted,
    );
    let mut kinds = col.setup.errors.clone();
    kinds.merge(&s.kinds(plan.timeout));
    kinds.add("connection lost", outcome.unrouted);
    CallsReport {
        scenario: plan.scenario,
        interrupted,
        config: Config {
            url: common.url.clone(),
            encoding: common.encoding,
            call: call_name(&plan.call),
            data: match &plan.call {
                Call::Rpc { data, .. } => data.clone(),
                Call::Ping => None,
            },
            connections: plan.connections,
            rate,
            rate_per_conn: match plan.rate {
                Rate::PerConn(r) => Some(r),
                Rate::Total(_) => None,
            },
            duration_s: secs(common.duration),
            warmup_s: secs(common.warmup),
            timeout_ms: plan.timeout.as_millis() as u64,
            bind_ips: common.bind_ip.iter().map(|ip| ip.to_string()).collect(),
        },
        connections: Connections {
            requested: plan.connections,
            established: col.setup.ready,
            failed: col.setup.failed,
            open_at_end: outcome.open_at_end,
            closed_early: col.closed_early,
            connect_ms: Summary::of(&col.setup.connect),
        },
        calls: Calls {
            offered_rate: rate,
            scheduled: if interrupted {
                s.ended() + outcome.unrouted
            } else {
                window.count()
            },
            sent: s.sent_measured,
            achieved_rate: per_sec(s.sent_measured, span),
            replied: s.ok + s.error_replies(),
            ok: s.ok,
            ok_rate: per_sec(s.ok, span),
            failed: s.failed() + outcome.unrouted,
            send_lag_ms: Summary::of(&col.hists.lag),
        },
        latency_ms: Summary::of(&col.hists.latency),
        error_latency_ms: Summary::of(&col.hists.error_latency),
        outcomes: Outcomes {
            ok: s.ok,
            busy_113: Busy {
                count: s.errors_with(BUSY),
                retry_after_ms: Summary::of(&col.hists.retry_after),
            },
            timeout_114: s.errors_with(TIMEOUT),
            unknown_104: s.errors_with(UNKNOWN),
            error_codes: s.by_code.clone(),
            no_reply: s.no_reply,
            connection_lost: s.lost + outcome.unrouted,
        },
        parts: Parts {
            pushes: s.parts,
            calls_with_parts: s.calls_with_parts,
            first_part_ms: Summary::of(&col.hists.first_part),
        },
        errors: Errors::of(kinds),
        generator,
    }
}

impl CallsReport {
    fn is_ping(&self) -> bool {
        self.scenario == "ping"
    }

    pub fn render(&self) -> String {
        let c = &self.config;
        let load = match c.rate_per_conn {
            Some(per) => format!("{} connections × {per}/s = {}/s", c.connections, c.rate),
            None => format!(
                "{} over {} connections, {}/s",
                c.call, c.connections, c.rate
            ),
        };
        let mut out = format!(
            "\n== rtload {}: {load} ({}), {}s after {}s warmup, timeout {} ms{} ==\n",
            self.scenario,
            c.encoding,
            c.duration_s,
            c.warmup_s,
            c.timeout_ms,
            crate::report::interrupted_suffix(self.interrupted),
        );
        out += &self.connections.line();
        let n = &self.calls;
        out += &format!(
            "{:<14}offered {:.1}/s, sent {:.1}/s ({} of {}); ok {} = {:.1}/s, failed {}; send lag {}\n",
            if self.is_ping() { "pings" } else { "calls" },
            n.offered_rate,
            n.achieved_rate,
            n.sent,
            n.scheduled,
            n.ok,
            n.ok_rate,
            n.failed,
            p50_p99(n.send_lag_ms.as_ref()),
        );
        out += &format!(
            "{:<14}{}\n",
            if self.is_ping() {
                "ping RTT"
            } else {
                "latency"
            },
            latency_line(self.latency_ms.as_ref())
        );
        let o = &self.outcomes;
        let error_replies: u64 = o.error_codes.values().sum();
        if !self.is_ping() || error_replies > 0 {
            let others: Vec<String> = o
                .error_codes
                .iter()
                .filter(|(code, _)| ![BUSY, TIMEOUT, UNKNOWN].contains(code))
                .map(|(code, n)| format!("{code} {} {n}", code_name(*code)))
                .collect();
            out += &format!(
                "error replies {error_replies}: 113 busy {} (retry_after {}), 114 timeout {}, 104 unknown {}{}{}; replied in {}\n",
                o.busy_113.count,
                p50_p99(o.busy_113.retry_after_ms.as_ref()),
                o.timeout_114,
                o.unknown_104,
                if others.is_empty() { "" } else { ", " },
                others.join(", "),
                p50_p99(self.error_latency_ms.as_ref()),
            );
        }
        out += &format!(
            "no reply      {} (within {} ms); connection lost {}\n",
            o.no_reply, c.timeout_ms, o.connection_lost
        );
        let p = &self.parts;
        if !self.is_ping() || p.pushes > 0 {
            out += &format!(
                "parts         {} rpc_part pushes on {} calls; first part {}\n",
                p.pushes,
                p.calls_with_parts,
                p50_p99(p.first_part_ms.as_ref()),
            );
        }
        self.errors.render(&mut out);
        if o.unknown_104 > 0 {
            out += &format!(
                "hint          104: the gateway knows no {} (no service answers that method, or the gateway lacks the op)\n",
                c.call
            );
        }
        if o.error_codes.get(&108).is_some_and(|n| *n > 0) {
            out += &format!(
                "hint          108: this deployment does not offer {} (for rpc: the gateway has RPC disabled)\n",
                if self.is_ping() { "ping" } else { "rpc" }
            );
        }
        self.generator.render(&mut out);
        out
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::time::Instant;

    use super::*;
    use crate::calls::conn::{Event, Summary as ConnSummary};
    use crate::calls::tracker::{CallSamples, CallStats, Outcome as CallOutcome};
    use crate::cli::{Cli, Scenario};
    use clap::Parser;

    /// A connection's end: its counts, all in the measured window.
    fn done(stats: CallStats, samples: CallSamples) -> Event {
        Event::Done(Box::new(ConnSummary {
            stats,
            samples,
            closed_early: false,
        }))
    }

    /// A run that went to the end of its schedule.
    fn completed(measure_start: Instant, open_at_end: u64) -> Outcome {
        Outcome {
            interrupted: false,
            cut_short: false,
            measure_start,
            open_at_end,
            unrouted: 0,
        }
    }

    fn rpc_plan() -> Plan {
        let cli = Cli::try_parse_from([
            "rtload",
            "rpc",
            "--method",
            "auth.hash_password",
            "--data",
            r#"{"password":"correct horse"}"#,
            "--rate",
            "10",
            "--connections",
            "2",
            "--duration",
            "2s",
        ])
        .unwrap();
        let Scenario::Rpc(args) = cli.scenario else {
            panic!("rpc expected")
        };
        args.plan()
    }

    #[test]
    fn rpc_report_separates_busy_timeouts_and_parts() {
        let plan = rpc_plan();
        let window = plan.window().unwrap();
        assert_eq!(window.count(), 20);
        let start = Instant::now();
        let mut col = Collector::default();
        let (ticks, _rx) = tokio::sync::mpsc::unbounded_channel();
        for _ in 0..2 {
            col.on(Event::Ready {
                connect: Duration::from_millis(1),
                ticks: ticks.clone(),
            });
        }
        let mut stats = CallStats::default();
        let mut samples = CallSamples::default();
        for i in 0..20u64 {
            let outcome = match i {
                0..=11 => CallOutcome::Ok,
                12..=15 => CallOutcome::Error {
                    code: 113,
                    retry_after_ms: Some(500),
                },
                16 => CallOutcome::Error {
                    code: 114,
                    retry_after_ms: None,
                },
                17 => CallOutcome::Error {
                    code: 108,
                    retry_after_ms: None,
                },
                18 => CallOutcome::NoReply,
                _ => CallOutcome::Lost,
            };
            stats.count(outcome);
            match outcome {
                CallOutcome::Ok => samples.latency.push(200_000 + i * 1000),
                CallOutcome::Error { code: 113, .. } => {
                    samples.error_latency.push(1000);
                    // (Under 2 ms a 3-figure histogram is exact, so the text can be checked.)
                    samples.retry_after.push(1_500);
                }
                CallOutcome::Error { .. } => samples.error_latency.push(10_000_000),
                _ => {}
            }
        }
        stats.sent_measured = 20;
        stats.last_write = Some(start + Duration::from_millis(1900));
        stats.parts = 6;
        stats.calls_with_parts = 3;
        samples.first_part.push(1_200);
        col.on(done(stats, samples));
        let outcome = completed(start, 2);
        let report = build(&plan, window, &outcome, &col, Generator::for_tests());
        assert_eq!(
            (report.calls.ok, report.calls.replied, report.calls.failed),
            (12, 18, 8)
        );
        assert_eq!(report.calls.ok_rate, 6.0, "12 ok over the 2 s window");
        assert_eq!(report.outcomes.busy_113.count, 4);
        assert_eq!(report.outcomes.busy_113.retry_after_ms.unwrap().p50_ms, 1.5);
        assert_eq!(
            (report.outcomes.timeout_114, report.outcomes.no_reply),
            (1, 1)
        );
        assert_eq!(report.outcomes.connection_lost, 1);
        let text = report.render();
        for want in [
            "== rtload rpc: auth.hash_password over 2 connections, 10/s (msgpack), 2s after 3s warmup, timeout 12000 ms ==",
            "calls         offered 10.0/s, sent 10.0/s (20 of 20); ok 12 = 6.0/s, failed 8;",
            "error replies 6: 113 busy 4 (retry_after p50 1.500 / p99 1.500 ms), 114 timeout 1, 104 unknown 0, 108 not available 1;",
            "no reply      1 (within 12000 ms); connection lost 1",
            "parts         6 rpc_part pushes on 3 calls; first part p50 1.200 / p99 1.200 ms",
            "           4  error 113 (busy)",
        ] {
            assert!(text.contains(want), "missing {want:?} in\n{text}");
        }
        let json = serde_json::to_value(&report).unwrap();
        assert_eq!(json["config"]["data"]["password"], "correct horse");
        assert_eq!(json["outcomes"]["error_codes"]["113"], 4);
        assert_eq!(json["calls"]["ok_rate"], 6.0);
        assert_eq!(json["parts"]["first_part_ms"]["p50_ms"], 1.2);
    }

    #[test]
    fn ping_report_reads_as_rtt() {
        let cli = Cli::try_parse_from([
            "rtload",
            "ping",
            "--connections",
            "4",
            "--rate-per-conn",
            "5",
            "--duration",
            "1s",
        ])
        .unwrap();
        let Scenario::Ping(args) = cli.scenario else {
            panic!("ping expected")
        };
        let plan = args.plan();
        let window = plan.window().unwrap();
        let mut col = Collector::default();
        let mut stats = CallStats::default();
        let mut samples = CallSamples::default();
        for us in 1..=20 {
            stats.count(CallOutcome::Ok);
            samples.latency.push(us * 100);
        }
        col.on(done(stats, samples));
        let outcome = completed(Instant::now(), 4);
        let text = build(&plan, window, &outcome, &col, Generator::for_tests()).render();
        assert!(
            text.contains("rtload ping: 4 connections × 5/s = 20/s (msgpack)"),
            "{text}"
        );
        assert!(
            text.contains("ping RTT      p50 1.000  p90 1.800"),
            "{text}"
        );
        assert!(
            !text.contains("rpc_part") && !text.contains("error replies"),
            "{text}"
        );
    }

    #[test]
    fn progress_line_reads_well() {
        let p = Progress {
            elapsed: Duration::from_millis(7_400),
            phase: "measure",
            sent_per_s: 1000.2,
            ok_per_s: 998.0,
            p99_ms: Some(0.4567),
            open: 1000,
            in_flight: 3,
            busy: 0,
            parts: 0,
            errors: 0,
            cpu_percent: Some(12.2),
            machine_cpu_percent: None,
        };
        assert_eq!(
            p.to_string(),
            "[   7s measure] sent    1000/s  ok     998/s  p99    0.457 ms  conns   1000  in flight     3  errors 0  cpu 12%"
        );
        let busy = Progress {
            busy: 40,
            parts: 7,
            ..p
        };
        assert!(
            busy.to_string()
                .contains("errors 0  busy 40  parts 7  cpu 12%")
        );
    }
}
