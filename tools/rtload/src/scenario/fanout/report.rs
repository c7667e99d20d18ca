//! The fanout report: one struct, printed as text and serialized as JSON.

use serde::Serialize;

use super::Args;
use crate::publish::Via;
use crate::pubsub::Finished;
use crate::pubsub::report::{Connections, Delivery, Lost, Publishing, errors_of, measured_secs};
use crate::report::{Errors, Generator, fmt_ms, secs};
use crate::stats::Summary;
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

pub fn build(args: &Args, run: Finished) -> FanoutReport {
    let common = &args.common;
    let (col, pubs, outcome) = (&run.col, &run.col.published, &run.outcome);
    let span = measured_secs(pubs, outcome, 1.0 / args.rate, common.duration);
    let expected = pubs.ok_measured * col.setup.ready as u64;
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
        connections: Connections::of(args.subscribers, col, outcome.open_at_end),
        publish: Publishing::of(args.rate, pubs, span),
        delivery: Delivery::of(col, expected, span),
        latency_ms: Summary::of(&col.latency),
        lost: Lost::of(col, pubs),
        errors: errors_of(col, pubs),
        generator: run.generator,
    }
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
        self.connections.render(&mut out);
        self.publish.render(&mut out);
        self.delivery.render(self.latency_ms.as_ref(), &mut out);
        self.lost.render(&mut out);
        self.errors.render(&mut out);
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
    use std::time::{Duration, Instant};

    use clap::Parser;

    use super::*;
    use crate::cli::{Cli, Scenario};
    use crate::collector::Collector;
    use crate::publish::PubStats;
    use crate::pubsub::Outcome;
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
                samples,
                ..SubSummary::new(0, offsets)
            })));
        }
        let start = Instant::now();
        col.published = PubStats::for_tests(start, 100, Duration::from_millis(990), 400);
        let run = Finished {
            col,
            outcome: Outcome::completed(start, 2),
            generator: Generator::for_tests(),
        };
        let report = build(&args, run);
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
