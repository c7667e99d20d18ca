//! The chat report: one struct, printed as text and serialized as JSON.

use serde::Serialize;

use super::{Args, Unsent};
use crate::collector::Collector;
use crate::pubsub::Outcome;
use crate::pubsub::report::{Connections, Delivery, Lost, Publishing, errors_of, measured_secs};
use crate::report::{Errors, Generator, interrupted_suffix, latency_line, secs};
use crate::stats::{Live, Summary, Tally};
use crate::wire::Encoding;

#[derive(Serialize, Debug)]
pub struct ChatReport {
    pub scenario: &'static str,
    /// Stopped by Ctrl-C before the schedule ended.
    pub interrupted: bool,
    pub config: Config,
    /// The members' connections (each subscribed to its room).
    pub connections: Connections,
    /// Messages published (measured window), acknowledgement latency from the intended
    /// send time.
    pub publish: Publishing,
    /// Measured messages that failed, by kind (`publish error 106`, `publish no reply`…).
    pub publish_errors: Tally,
    /// Measured messages never handed to their member's connection.
    pub unsent: UnsentCounts,
    /// Every member receives every message of its room, its own included.
    pub delivery: Delivery,
    /// Publish-to-deliver latency (receive time − intended send time), every delivery.
    pub latency_ms: Option<Summary>,
    pub lost: Lost,
    pub errors: Errors,
    pub generator: Generator,
}

#[derive(Serialize, Debug)]
pub struct Config {
    pub url: String,
    pub prefix: String,
    pub rooms: usize,
    pub members_per_room: usize,
    pub connections: usize,
    pub rate_per_member: f64,
    /// Messages per second, all members.
    pub rate: f64,
    pub encoding: Encoding,
    pub duration_s: f64,
    pub warmup_s: f64,
    pub payload_bytes: usize,
    pub bind_ips: Vec<String>,
}

#[derive(Serialize, Debug, PartialEq, Eq)]
pub struct UnsentCounts {
    pub member_gone: u64,
    pub queue_full: u64,
}

pub fn build(
    args: &Args,
    col: &Collector,
    outcome: &Outcome,
    unsent: &Unsent,
    generator: Generator,
) -> ChatReport {
    let common = &args.common;
    let pubs = &col.published;
    let rate = args.total_rate();
    let span = measured_secs(pubs, outcome, 1.0 / rate, common.duration);
    ChatReport {
        scenario: "chat",
        interrupted: outcome.interrupted || outcome.cut_short,
        config: Config {
            url: common.url.clone(),
            prefix: args.prefix.clone(),
            rooms: args.rooms,
            members_per_room: args.members,
            connections: args.connections(),
            rate_per_member: args.rate_per_member,
            rate,
            encoding: common.encoding,
            duration_s: secs(common.duration),
            warmup_s: secs(common.warmup),
            payload_bytes: args.payload_bytes,
            bind_ips: common.bind_ip.iter().map(|ip| ip.to_string()).collect(),
        },
        connections: Connections::of(args.connections(), col, outcome.open_at_end),
        publish: Publishing::of(rate, pubs, span),
        publish_errors: pubs.failed_by_kind.clone(),
        unsent: UnsentCounts {
            member_gone: Live::get(&unsent.member_gone),
            queue_full: Live::get(&unsent.queue_full),
        },
        delivery: Delivery::of(col, col.expected(&pubs.acked_by_channel), span),
        latency_ms: Summary::of(&col.latency),
        lost: Lost::of(col, pubs),
        errors: errors_of(col, pubs),
        generator,
    }
}

impl ChatReport {
    pub fn render(&self) -> String {
        let c = &self.config;
        let mut out = format!(
            "\n== rtload chat: {} rooms × {} members ({} connections, {}), {}/s per member = {}/s, {} B pad, {}s after {}s warmup{} ==\n",
            c.rooms,
            c.members_per_room,
            c.connections,
            c.encoding,
            c.rate_per_member,
            c.rate,
            c.payload_bytes,
            c.duration_s,
            c.warmup_s,
            interrupted_suffix(self.interrupted),
        );
        self.connections.render(&mut out);
        self.publish.render(&mut out);
        out += &format!(
            "ack latency   {}\n",
            latency_line(self.publish.ack_ms.as_ref())
        );
        for (kind, n) in self.publish_errors.iter() {
            out += &format!("  {n:>10}  {kind}\n");
        }
        let u = &self.unsent;
        if u.member_gone + u.queue_full > 0 {
            out += &format!(
                "unsent        {} (member not connected {}, member's queue full {})\n",
                u.member_gone + u.queue_full,
                u.member_gone,
                u.queue_full
            );
        }
        self.delivery.render(self.latency_ms.as_ref(), &mut out);
        self.lost.render(&mut out);
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
    use crate::publish::PubStats;
    use crate::stats;
    use crate::subscriber::{Event, OffsetTracker, Summary as SubSummary};

    #[test]
    fn expected_deliveries_count_every_member_of_each_room() {
        let cli = Cli::try_parse_from([
            "rtload",
            "chat",
            "--rooms",
            "2",
            "--members",
            "3",
            "--rate-per-member",
            "10",
            "--duration",
            "1s",
        ])
        .unwrap();
        let Scenario::Chat(args) = cli.scenario else {
            panic!("chat expected")
        };
        let mut col = Collector::default();
        // 6 members, 3 per room; 60 messages measured, 30 per room (offsets 1..=30).
        for member in 0..6 {
            col.on(Event::Ready {
                connect: Duration::from_millis(2),
                subscribe: Duration::from_micros(400),
            });
            let mut samples = stats::Samples::default();
            let mut offsets = OffsetTracker::starting_at(Some(0));
            // The last member of room 1 misses its room's last two messages.
            let last = if member == 5 { 28 } else { 30 };
            for o in 1..=last {
                offsets.observe(o);
                samples.push(1000 + o);
            }
            col.on(Event::Done(Box::new(SubSummary {
                delivered: last,
                delivered_measured: last,
                samples,
                ..SubSummary::new(member % 2, offsets)
            })));
        }
        let start = Instant::now();
        let mut pubs = PubStats::for_tests(start, 60, Duration::from_millis(983), 30);
        pubs.max_offsets.insert(1, 30);
        pubs.acked_by_channel.insert(0, 30);
        pubs.acked_by_channel.insert(1, 30);
        col.published = pubs;
        let outcome = Outcome::completed(start, 6);
        let report = build(
            &args,
            &col,
            &outcome,
            &Unsent::default(),
            Generator::for_tests(),
        );
        assert_eq!(report.config.rate, 60.0);
        assert_eq!(report.delivery.expected, 180);
        assert_eq!(report.delivery.delivered, 178);
        assert_eq!((report.lost.total, report.lost.tail), (2, Some(2)));
        assert_eq!(report.publish.acked_rate, 60.0);
        let text = report.render();
        assert!(
            text.contains("delivered     178.0 msg/s (178 of 180 expected, 98.889%)"),
            "{text}"
        );
        assert!(text.contains("lost          2 (gaps 0, tail 2)"), "{text}");
        assert!(text.contains("ack latency   "), "{text}");
        let json = serde_json::to_value(&report).unwrap();
        assert_eq!(json["config"]["members_per_room"], 3);
        assert_eq!(json["unsent"]["member_gone"], 0);
        assert_eq!(json["latency_ms"]["count"], 178);
    }
}
