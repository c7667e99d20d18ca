//! The http-publish report: one struct, printed as text and serialized as JSON.

use serde::Serialize;

use super::Args;
use crate::pubsub::report::{Connections, Delivery, Lost, Publishing, errors_of, measured_secs};
use crate::pubsub::{Finished, Load};
use crate::report::{Errors, Generator, interrupted_suffix, latency_line, p50_p99, secs};
use crate::stats::{Summary, Tally};
use crate::wire::Encoding;

#[derive(Serialize, Debug)]
pub struct HttpPublishReport {
    pub scenario: &'static str,
    /// Stopped by Ctrl-C, or every connection failed before the end.
    pub interrupted: bool,
    pub config: Config,
    /// Requests of the measured window: `ack_ms` is the request latency of 2xx responses
    /// from the intended send time; `acked_rate` the throughput.
    pub publish: Publishing,
    pub responses: Responses,
    /// Present with `--subscribers-per-channel`.
    pub subscribers: Option<Subscribers>,
    pub errors: Errors,
    pub generator: Generator,
}

#[derive(Serialize, Debug)]
pub struct Config {
    pub http: String,
    pub prefix: String,
    pub channels: usize,
    /// 0: closed loop.
    pub rate: f64,
    /// Requests in flight of a closed loop.
    pub concurrency: Option<usize>,
    pub http_connections: usize,
    pub subscribers_per_channel: usize,
    /// The subscribers' WebSocket endpoint and encoding.
    pub url: String,
    pub encoding: Encoding,
    pub duration_s: f64,
    pub warmup_s: f64,
    pub payload_bytes: usize,
    pub bind_ips: Vec<String>,
}

/// How the measured requests were answered.
#[derive(Serialize, Debug)]
pub struct Responses {
    /// 2xx: `{offset, epoch}`.
    pub ok: u64,
    /// The others by status and error code (`publish http 503 code 113`), or by what
    /// went wrong (`publish http timeout`, `publish http io error`).
    pub failed: Tally,
    /// `Retry-After` of refused requests (503 busy), whole run.
    pub retry_after_ms: Option<Summary>,
}

#[derive(Serialize, Debug)]
pub struct Subscribers {
    pub connections: Connections,
    pub delivery: Delivery,
    /// Publish-to-deliver latency (receive time − intended send time), every delivery.
    pub latency_ms: Option<Summary>,
    pub lost: Lost,
}

pub fn build(args: &Args, http_connections: usize, run: Finished) -> HttpPublishReport {
    let common = &args.common;
    let (col, pubs, outcome) = (&run.col, &run.col.published, &run.outcome);
    let load = args.load();
    let period = match load {
        Load::Rate(rate) => 1.0 / rate,
        Load::Closed(_) => 0.0,
    };
    let span = measured_secs(pubs, outcome, period, common.duration);
    let subscribers = (args.subscribers_per_channel > 0).then(|| Subscribers {
        connections: Connections::of(
            args.channels * args.subscribers_per_channel,
            col,
            outcome.open_at_end,
        ),
        delivery: Delivery::of(col, col.expected(&pubs.acked_by_channel), span),
        latency_ms: Summary::of(&col.latency),
        lost: Lost::of(col, pubs),
    });
    HttpPublishReport {
        scenario: "http-publish",
        interrupted: outcome.interrupted || outcome.cut_short,
        config: Config {
            http: common.http.clone(),
            prefix: args.prefix.clone(),
            channels: args.channels,
            rate: load.rate(),
            concurrency: match load {
                Load::Closed(n) => Some(n),
                Load::Rate(_) => None,
            },
            http_connections,
            subscribers_per_channel: args.subscribers_per_channel,
            url: common.url.clone(),
            encoding: common.encoding,
            duration_s: secs(common.duration),
            warmup_s: secs(common.warmup),
            payload_bytes: args.payload_bytes,
            bind_ips: common.bind_ip.iter().map(|ip| ip.to_string()).collect(),
        },
        publish: Publishing::of(load.rate(), pubs, span),
        responses: Responses {
            ok: pubs.ok_measured,
            failed: pubs.failed_by_kind.clone(),
            retry_after_ms: Summary::of(&pubs.retry_after),
        },
        subscribers,
        errors: errors_of(col, pubs),
        generator: run.generator,
    }
}

impl HttpPublishReport {
    pub fn render(&self) -> String {
        let c = &self.config;
        let load = match c.concurrency {
            Some(n) => format!("closed loop with {n} in flight"),
            None => format!("{}/s", c.rate),
        };
        let mut out = format!(
            "\n== rtload http-publish: POST {}/api/publish, {} channel(s), {} connection(s), {load}, {} B pad, {}s after {}s warmup{} ==\n",
            c.http,
            c.channels,
            c.http_connections,
            c.payload_bytes,
            c.duration_s,
            c.warmup_s,
            interrupted_suffix(self.interrupted),
        );
        self.publish.render(&mut out);
        out += &format!("throughput    {:.1} acked/s\n", self.publish.acked_rate);
        out += &format!(
            "request       {}\n",
            latency_line(self.publish.ack_ms.as_ref())
        );
        let r = &self.responses;
        out += &format!("responses     2xx {}, failed {}\n", r.ok, r.failed.total());
        for (kind, n) in r.failed.iter() {
            out += &format!("  {n:>10}  {kind}\n");
        }
        if r.retry_after_ms.is_some() {
            out += &format!("retry-after   {}\n", p50_p99(r.retry_after_ms.as_ref()));
        }
        if let Some(s) = &self.subscribers {
            s.connections.render(&mut out);
            s.delivery.render(s.latency_ms.as_ref(), &mut out);
            s.lost.render(&mut out);
        }
        self.errors.render(&mut out);
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

    fn args(extra: &[&str]) -> Args {
        let mut argv = vec!["rtload", "http-publish", "--duration", "1s"];
        argv.extend(extra);
        let Scenario::HttpPublish(args) = Cli::try_parse_from(argv).unwrap().scenario else {
            panic!("http-publish expected")
        };
        args
    }

    fn finished(pubs: PubStats, start: Instant) -> Finished {
        Finished {
            col: Collector {
                published: pubs,
                ..Collector::default()
            },
            outcome: Outcome::completed(start, 0),
            generator: Generator::for_tests(),
        }
    }

    #[test]
    fn refusals_are_counted_by_status_and_code() {
        let args = args(&["--rate", "100"]);
        let start = Instant::now();
        let mut pubs = PubStats::for_tests(start, 98, Duration::from_millis(990), 98);
        pubs.failed_measured = 2;
        pubs.failed_by_kind.add("publish http 503 code 113", 2);
        pubs.errors.add("publish http 503 code 113", 2);
        stats::record(&mut pubs.retry_after, 1_000_000);
        let report = build(&args, 4, finished(pubs, start));
        assert_eq!(report.publish.acked_rate, 98.0);
        assert!(report.subscribers.is_none());
        let text = report.render();
        assert!(text.contains("throughput    98.0 acked/s"), "{text}");
        assert!(text.contains("responses     2xx 98, failed 2"), "{text}");
        assert!(
            text.contains("           2  publish http 503 code 113"),
            "{text}"
        );
        assert!(text.contains("retry-after   p50 1000."), "{text}");
        let json = serde_json::to_value(&report).unwrap();
        assert_eq!(json["responses"]["failed"]["publish http 503 code 113"], 2);
        assert_eq!(json["config"]["concurrency"], serde_json::Value::Null);
        assert_eq!(json["subscribers"], serde_json::Value::Null);
    }

    #[test]
    fn a_closed_loop_reports_its_concurrency() {
        let args = args(&["--rate", "0", "--concurrency", "8"]);
        let start = Instant::now();
        let pubs = PubStats::for_tests(start, 500, Duration::from_millis(999), 500);
        let report = build(&args, 8, finished(pubs, start));
        assert_eq!(report.config.concurrency, Some(8));
        assert_eq!(report.publish.acked_rate, 500.0);
        let text = report.render();
        assert!(text.contains("closed loop with 8 in flight"), "{text}");
        assert!(
            text.contains("publish       offered closed loop,"),
            "{text}"
        );
    }
}
