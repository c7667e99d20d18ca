//! The fanout report: one struct, printed as text and serialized as JSON.

use std::time::Duration;

use serde::Serialize;

use super::{Args, Outcome};
use crate::collector::Collector;
use crate::publish::{PubStats, Via};
use crate::report::{Generator, fmt_ms, latency_line, p50_p99};
use crate::stats::{Summary, Tally, round3};
use crate::wire::Encoding;

#[derive(Serialize, Debug)]
pub struct FanoutReport {
    pub scenario: &'static str,
    /// Stopped by Ctrl-C, or the publisher went away before the schedule ended.
    pub interrupted: bool,
    pub config: Config,
    pub connections: Connections,
    pub publish: Publishing,
    pub delivery: Delivery,
    /// Publish-to-deliver latency (receive time − intended send time), all subscribers.
    pub latency_ms: Option<Summary>,
    pub lost: Lost,
    pub errors: Errors,
    pub generator: Generator,
}

#[derive(Serialize, Debug)]
pub struct Config {
    pub url: String,
    pub http: String,
    pub channel: String,
    pub encoding: Encoding,
    pub publish_via: Via,
    pub publishers: usize,
    pub subscribers: usize,
    pub rate: f64,
    pub duration_s: f64,
    pub warmup_s: f64,
    pub payload_bytes: usize,
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
    pub subscribe_ms: Option<Summary>,
}

#[derive(Serialize, Debug)]
pub struct Publishing {
    pub offered_rate: f64,
    pub achieved_rate: f64,
    /// Measured-window counts.
    pub sent: u64,
    pub acked: u64,
    pub failed: u64,
    /// Intended send time → acknowledgement.
    pub ack_ms: Option<Summary>,
    /// Intended send time → written to the socket (the generator's own delay).
    pub send_lag_ms: Option<Summary>,
}

#[derive(Serialize, Debug)]
pub struct Delivery {
    /// Measured publications received, summed over subscribers.
    pub delivered: u64,
    /// Acknowledged measured publications × established subscribers.
    pub expected: u64,
    pub ratio: Option<f64>,
    pub rate: f64,
    /// `pub` pushes without rtload's stamp (another publisher on the channel).
    pub unstamped: u64,
}

#[derive(Serialize, Debug)]
pub struct Lost {
    pub total: u64,
    /// Skipped offsets between received publications.
    pub gaps: u64,
    /// Acknowledged publications after a subscriber's last received one.
    pub tail: Option<u64>,
    pub out_of_order: u64,
}

#[derive(Serialize, Debug)]
pub struct Errors {
    pub total: u64,
    pub kinds: Tally,
}

pub fn build(
    args: &Args,
    outcome: &Outcome,
    col: &Collector,
    pubs: &PubStats,
    generator: Generator,
) -> FanoutReport {
    let common = &args.common;
    let period = 1.0 / args.rate;
    // The measured span: the planned duration, stretched if the last measured send went
    // out late, or cut to what was sent when the run stopped early.
    let sent_span = pubs.last_write.map_or(0.0, |last| {
        last.saturating_duration_since(outcome.measure_start)
            .as_secs_f64()
            + period
    });
    let span = if outcome.interrupted || outcome.cut_short {
        sent_span
    } else {
        sent_span.max(common.duration.as_secs_f64())
    };
    let per_sec = |n: u64| {
        if span > 0.0 {
            round3(n as f64 / span)
        } else {
            0.0
        }
    };
    let expected = pubs.ok_measured * col.setup.ready as u64;
    let gaps = col.lost_in_gaps();
    let tail = col.lost_in_tails(pubs.max_offset());
    let mut kinds = col.setup.errors.clone();
    kinds.merge(&col.errors);
    kinds.merge(&pubs.errors);
    FanoutReport {
        scenario: "fanout",
        interrupted: outcome.interrupted || outcome.cut_short,
        config: Config {
            url: common.url.clone(),
            http: common.http.clone(),
            channel: args.channel.clone(),
            encoding: common.encoding,
            publish_via: args.publish_via,
            publishers: args.publishers(),
            subscribers: args.subscribers,
            rate: args.rate,
            duration_s: secs(common.duration),
            warmup_s: secs(common.warmup),
            payload_bytes: args.payload_bytes,
            bind_ips: common.bind_ip.iter().map(|ip| ip.to_string()).collect(),
        },
        connections: Connections {
            requested: args.subscribers,
            established: col.setup.ready,
            failed: col.setup.failed,
            open_at_end: outcome.open_at_end,
            closed_early: col.closed_early,
            connect_ms: Summary::of(&col.setup.connect),
            subscribe_ms: Summary::of(&col.subscribe),
        },
        publish: Publishing {
            offered_rate: args.rate,
            achieved_rate: per_sec(pubs.sent_measured),
            sent: pubs.sent_measured,
            acked: pubs.ok_measured,
            failed: pubs.failed_measured,
            ack_ms: Summary::of(&pubs.ack),
            send_lag_ms: Summary::of(&pubs.lag),
        },
        delivery: Delivery {
            delivered: col.delivered_measured,
            expected,
            ratio: (expected > 0).then(|| col.delivered_measured as f64 / expected as f64),
            rate: per_sec(col.delivered_measured),
            unstamped: col.unstamped,
        },
        latency_ms: Summary::of(&col.latency),
        lost: Lost {
            total: gaps + tail.unwrap_or(0),
            gaps,
            tail,
            out_of_order: col.out_of_order(),
        },
        errors: Errors {
            total: kinds.total(),
            kinds,
        },
        generator,
    }
}

fn secs(d: Duration) -> f64 {
    round3(d.as_secs_f64())
}

impl FanoutReport {
    pub fn render(&self) -> String {
        let c = &self.config;
        let mut out = format!(
            "\n== rtload fanout: {} subscribers on {} ({}), publish via {} x{}, {} B pad, {}/s for {}s after {}s warmup{} ==\n",
            c.subscribers,
            c.channel,
            c.encoding,
            match c.publish_via {
                Via::Ws => "ws",
                Via::Http => "http",
            },
            c.publishers,
            c.payload_bytes,
            c.rate,
            c.duration_s,
            c.warmup_s,
            crate::report::interrupted_suffix(self.interrupted),
        );
        let k = &self.connections;
        out += &format!(
            "connections   {} of {} established, {} failed, {} open at end; connect {}; subscribe {}\n",
            k.established,
            k.requested,
            k.failed,
            k.open_at_end,
            p50_p99(k.connect_ms.as_ref()),
            p50_p99(k.subscribe_ms.as_ref()),
        );
        let p = &self.publish;
        out += &format!(
            "publish       offered {:.1}/s, achieved {:.1}/s ({} sent, {} acked, {} failed); ack {}; send lag {}\n",
            p.offered_rate,
            p.achieved_rate,
            p.sent,
            p.acked,
            p.failed,
            p50_p99(p.ack_ms.as_ref()),
            p50_p99(p.send_lag_ms.as_ref()),
        );
        let d = &self.delivery;
        out += &format!(
            "delivered     {:.1} msg/s ({} of {} expected, {})\n",
            d.rate,
            d.delivered,
            d.expected,
            d.ratio
                .map_or_else(|| "-".to_string(), |r| format!("{:.3}%", r * 100.0)),
        );
        if d.unstamped > 0 {
            out += &format!(
                "              {} publications on the channel were not rtload's (ignored)\n",
                d.unstamped
            );
        }
        out += &format!("latency       {}\n", latency_line(self.latency_ms.as_ref()));
        let l = &self.lost;
        out += &format!(
            "lost          {} (gaps {}, tail {}); out of order {}\n",
            l.total,
            l.gaps,
            l.tail.map_or_else(|| "-".to_string(), |t| t.to_string()),
            l.out_of_order,
        );
        out += &format!("errors        {}\n", self.errors.total);
        for (kind, n) in self.errors.kinds.iter() {
            out += &format!("  {n:>10}  {kind}\n");
        }
        if self.publish.failed > 0 && self.config.publish_via == Via::Ws {
            out += &format!(
                "hint          publishes failed over WebSocket; if the namespace forbids client publishes, try --publish-via http (max ack {} ms)\n",
                fmt_ms(self.publish.ack_ms.map(|s| s.max_ms))
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

    use clap::Parser;

    use super::*;
    use crate::cli::{Cli, Scenario};
    use crate::stats;
    use crate::subscriber::{Event, OffsetTracker, Summary as SubSummary};

    #[test]
    fn report_renders_and_serializes() {
        let cli = Cli::try_parse_from([
            "rtload",
            "fanout",
            "--subscribers",
            "2",
            "--rate",
            "100",
            "--duration",
            "1s",
        ])
        .unwrap();
        let Scenario::Fanout(args) = cli.scenario else {
            panic!("fanout expected")
        };
        let mut col = Collector::default();
        for _ in 0..2 {
            col.on(Event::Ready {
                connect: Duration::from_millis(2),
                subscribe: Duration::from_micros(400),
            });
            let mut samples = stats::Samples::default();
            for us in 1..=100 {
                samples.push(us * 10);
            }
            let mut offsets = OffsetTracker::starting_at(Some(0));
            for o in 1..=400 {
                offsets.observe(o);
            }
            col.on(Event::Done(Box::new(SubSummary {
                delivered: 400,
                delivered_measured: 100,
                offsets,
                unstamped: 0,
                errors: Tally::default(),
                closed_early: false,
                samples,
            })));
        }
        let start = Instant::now();
        let pubs = PubStats::for_tests(start, 100, Duration::from_millis(990), 400);
        let outcome = Outcome {
            interrupted: false,
            cut_short: false,
            measure_start: start,
            open_at_end: 2,
        };
        let generator = Generator {
            cores: 2,
            cpu_percent: Some(12.0),
            machine_cpu_percent: Some(30.0),
            fd_soft_limit: None,
            fd_hard_limit: None,
            fds_needed: 70,
            late_sends: 0,
            max_send_lag_ms: Some(0.05),
            warnings: vec![],
        }
        .assessed();
        let report = build(&args, &outcome, &col, &pubs, generator);
        assert_eq!(report.delivery.expected, 200);
        assert_eq!(report.delivery.ratio, Some(1.0));
        assert_eq!(report.delivery.rate, 200.0);
        assert_eq!(report.publish.achieved_rate, 100.0);
        assert_eq!(report.lost.total, 0);
        let text = report.render();
        assert!(
            text.contains(
                "latency       p50 0.500  p90 0.900  p99 0.990  p999 1.000  max 1.000 ms  (n=200)"
            ),
            "{text}"
        );
        assert!(
            text.contains("delivered     200.0 msg/s (200 of 200 expected, 100.000%)"),
            "{text}"
        );
        assert!(text.contains("connections   2 of 2 established"), "{text}");
        let json = serde_json::to_value(&report).unwrap();
        assert_eq!(json["latency_ms"]["p99_ms"], 0.99);
        assert_eq!(json["config"]["encoding"], "msgpack");
        assert_eq!(json["config"]["publish_via"], "ws");
        assert!(json["config"].get("api_key").is_none());
    }
}
