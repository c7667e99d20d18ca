//! The storm report: one struct, printed as text and serialized as JSON.

use std::ops::Range;
use std::time::Duration;

use serde::Serialize;

use super::client::Anomaly;
use super::{Args, PingRun, Storm, Timeline};
use crate::calls::{self, report::Connections};
use crate::publish::PubStats;
use crate::report::{
    Errors, Generator, fmt_ms, interrupted_suffix, latency_line, p50_p99, per_sec, secs,
};
use crate::stats::{self, Summary, Tally, round3};
use crate::wire::Encoding;

#[derive(Serialize, Debug)]
pub struct StormReport {
    pub scenario: &'static str,
    /// Stopped by Ctrl-C.
    pub interrupted: bool,
    pub config: Config,
    /// Storm clients (gateway A), and ping clients (gateway B): first set-up.
    pub connections: Connections,
    pub ping_connections: Connections,
    pub storm: StormOutcome,
    pub publish: Publishing,
    pub delivery: Delivery,
    pub ping: Ping,
    pub errors: Errors,
    pub generator: Generator,
}

#[derive(Serialize, Debug)]
pub struct Config {
    pub url: String,
    pub ping_url: Option<String>,
    pub publish_url: String,
    pub encoding: Encoding,
    pub clients: usize,
    pub channels: usize,
    pub channel_prefix: String,
    pub ping_clients: usize,
    pub ping_rate_per_conn: f64,
    pub rate: f64,
    pub publishers: usize,
    pub payload_bytes: usize,
    pub backoff_base_ms: f64,
    pub backoff_cap_ms: f64,
    pub warmup_s: f64,
    pub drain_s: f64,
    /// `--drop-after`: rtload dropped every storm client's socket this long after READY
    /// (absent: someone else made the storm).
    pub drop_after_s: Option<f64>,
    pub bind_ips: Vec<String>,
}

#[derive(Serialize, Debug)]
pub struct StormOutcome {
    /// A storm client lost its connection after READY.
    pub happened: bool,
    /// Every client that was up is back, recovered (`recovered: true`), none gave up.
    pub all_recovered: bool,
    pub first_disconnect_after_ready_s: Option<f64>,
    /// Clients that lost their connection at least once.
    pub clients_disconnected: usize,
    /// Down when the run ended.
    pub still_down: usize,
    /// Stopped reconnecting because the server said so (4000, 4002, 4008).
    pub gave_up: usize,
    /// First disconnect → last client back and recovered.
    pub duration_ms: Option<f64>,
    /// The same moments as wall-clock times (ms since the Unix epoch), to line them up
    /// with the kill and the restart.
    pub first_disconnect_unix_ms: Option<u64>,
    pub last_back_unix_ms: Option<u64>,
    /// Per outage (a client's loss → that client back and recovered).
    pub reconnect_ms: Option<Summary>,
    /// The successful attempt alone: TCP + handshake + `connect` with recovery.
    pub reconnect_connect_ms: Option<Summary>,
    pub outages: u64,
    /// Reconnect attempts, all clients; and the most one outage took.
    pub attempts: u64,
    pub max_attempts_per_outage: u32,
    /// Attempts refused for load: close 4007 (admission), or 111/113 at `connect`.
    pub refused_4007: u64,
    /// Sockets closed with 4005 (draining).
    pub draining_4005: u64,
    /// Refusals for load at the clients' first connect (before READY), retried.
    pub setup_refused_4007: u64,
    pub resumed: u64,
    pub not_resumed: u64,
    pub recovered: u64,
    /// `recovered: false` answers: each a loss event (the app would refetch).
    pub not_recovered: u64,
    /// Failed attempts by kind.
    pub failed_attempts: Tally,
    /// Why sockets ended.
    pub disconnects: Tally,
}

#[derive(Serialize, Debug)]
pub struct Publishing {
    pub offered_rate: f64,
    pub achieved_rate: f64,
    pub sent: u64,
    pub acked: u64,
    pub failed: u64,
    pub ack_ms: Option<Summary>,
    pub send_lag_ms: Option<Summary>,
}

/// Every storm client's channel, offset by offset.
#[derive(Serialize, Debug)]
pub struct Delivery {
    pub clients_checked: usize,
    /// `pub` pushes, and publications in `connect` replies (recovery).
    pub live: u64,
    pub recovered: u64,
    /// Publish (intended time) → received.
    pub live_latency_ms: Option<Summary>,
    pub recovered_latency_ms: Option<Summary>,
    /// Publications some client never got: gaps + tails + unrecoverable (0 expected
    /// inside the history window).
    pub lost: u64,
    pub gaps: u64,
    /// Acknowledged publications after a client's last offset at the end.
    pub tail: u64,
    /// Skipped by a `recovered: false` answer.
    pub unrecoverable: u64,
    pub clients_with_loss: usize,
    pub max_lost_per_client: u64,
    /// Offsets received at or below one already seen (duplicates or reordering).
    pub duplicates: u64,
    pub epoch_changes: u64,
    /// Publications pushed before their `connect` reply (the protocol says they follow
    /// it: 0 expected).
    pub early: u64,
    /// The first gaps and duplicates seen (a few per client, [`ANOMALIES_SHOWN`] in all):
    /// evidence for whoever investigates.
    pub anomalies: Vec<ClientAnomaly>,
}

/// Anomalies listed in the report.
pub const ANOMALIES_SHOWN: usize = 20;

#[derive(Serialize, Debug)]
pub struct ClientAnomaly {
    pub client: usize,
    pub channel: String,
    #[serde(flatten)]
    pub anomaly: Anomaly,
}

#[derive(Serialize, Debug)]
pub struct Ping {
    pub url: Option<String>,
    pub clients: usize,
    pub rate: f64,
    /// Round trips by the ping's intended send time: from READY + warmup to the first
    /// disconnect; during the storm; after it.
    pub before_ms: Option<Summary>,
    pub during_ms: Option<Summary>,
    pub after_ms: Option<Summary>,
    pub ok: u64,
    pub error_replies: u64,
    pub no_reply: u64,
    pub connection_lost: u64,
}

#[allow(clippy::too_many_arguments)]
pub(super) fn build(
    args: &Args,
    publish_url: &str,
    timeline: &Timeline,
    storm: &Storm,
    pings: &calls::Collector,
    ping_run: Option<&PingRun>,
    open_at_end: (u64, u64),
    pubs: &PubStats,
    generator: Generator,
) -> StormReport {
    let common = &args.common;
    let ping_timeout = Duration::from_millis(args.ping_timeout_ms);
    let sums = &storm.summaries;
    let mut failed_attempts = Tally::default();
    let mut disconnects = Tally::default();
    let mut errors = storm.setup.errors.clone();
    errors.merge(&pings.setup.errors);
    errors.merge(&pings.stats.kinds(ping_timeout));
    errors.merge(&pubs.errors);
    let mut d = Delivery {
        clients_checked: sums.len(),
        live: 0,
        recovered: 0,
        live_latency_ms: Summary::of(&storm.live_delay),
        recovered_latency_ms: Summary::of(&storm.recovered_delay),
        lost: 0,
        gaps: 0,
        tail: 0,
        unrecoverable: 0,
        clients_with_loss: 0,
        max_lost_per_client: 0,
        duplicates: 0,
        epoch_changes: 0,
        early: 0,
        anomalies: Vec::new(),
    };
    let (mut attempts, mut outages, mut refused, mut draining) = (0, 0, 0, 0);
    let (mut resumed, mut not_resumed, mut not_recovered) = (0, 0, 0);
    for s in sums {
        let p = &s.position;
        let acked = pubs.max_offsets.get(&s.channel).copied();
        let lost = p.lost(acked);
        d.lost += lost;
        d.gaps += p.offsets.lost;
        d.tail += acked.and_then(|a| p.offsets.tail(a)).unwrap_or(0);
        d.unrecoverable += p.unrecoverable;
        d.clients_with_loss += usize::from(lost > 0);
        d.max_lost_per_client = d.max_lost_per_client.max(lost);
        d.duplicates += p.offsets.out_of_order;
        d.epoch_changes += u64::from(p.epoch_changes);
        d.early += s.early;
        for a in &p.anomalies {
            if d.anomalies.len() < ANOMALIES_SHOWN {
                d.anomalies.push(ClientAnomaly {
                    client: s.index,
                    channel: format!("{}{}", args.channel_prefix, s.channel),
                    anomaly: *a,
                });
            }
        }
        d.live += s.delivered;
        d.recovered += s.recovered_pubs;
        attempts += s.attempts;
        outages += u64::from(p.outages);
        refused += s.refused;
        draining += s.draining;
        resumed += u64::from(s.resumed);
        not_resumed += u64::from(s.not_resumed);
        not_recovered += u64::from(p.not_recovered);
        failed_attempts.merge(&s.failures);
        disconnects.merge(&s.losses);
    }
    let still_down = storm.down();
    let happened = storm.first_loss.is_some();
    let duration = storm
        .first_loss
        .zip(storm.last_back)
        .filter(|_| still_down == 0)
        .map(|(first, last)| ms(last.saturating_duration_since(first)));
    let span = pubs.first_write.zip(pubs.last_write).map_or(0.0, |(a, b)| {
        b.saturating_duration_since(a).as_secs_f64() + 1.0 / args.rate
    });
    let ping = ping_section(args, timeline, storm, pings, ping_run);
    StormReport {
        scenario: "storm",
        interrupted: timeline.interrupted,
        config: Config {
            url: common.url.clone(),
            ping_url: args.ping_url.clone(),
            publish_url: publish_url.to_string(),
            encoding: common.encoding,
            clients: args.clients,
            channels: args.channels,
            channel_prefix: args.channel_prefix.clone(),
            ping_clients: args.ping_wanted(),
            ping_rate_per_conn: args.ping_rate_per_conn,
            rate: args.rate,
            publishers: args.publishers.max(1),
            payload_bytes: args.payload_bytes,
            backoff_base_ms: ms(args.backoff_base),
            backoff_cap_ms: ms(args.backoff_cap),
            warmup_s: secs(common.warmup),
            drain_s: secs(common.drain),
            drop_after_s: args.drop_after.map(secs),
            bind_ips: common.bind_ip.iter().map(|ip| ip.to_string()).collect(),
        },
        connections: Connections {
            requested: args.clients,
            established: storm.setup.ready,
            failed: storm.setup.failed,
            open_at_end: open_at_end.0,
            closed_early: storm.gave_up as u64,
            connect_ms: Summary::of(&storm.setup.connect),
        },
        ping_connections: Connections {
            requested: args.ping_wanted(),
            established: pings.setup.ready,
            failed: pings.setup.failed,
            open_at_end: open_at_end.1,
            closed_early: pings.closed_early,
            connect_ms: Summary::of(&pings.setup.connect),
        },
        storm: StormOutcome {
            happened,
            all_recovered: happened
                && still_down == 0
                && storm.gave_up == 0
                && not_recovered == 0
                && storm.summaries.len() == storm.setup.ready,
            first_disconnect_after_ready_s: storm.first_loss.map(|first| {
                round3(
                    first
                        .saturating_duration_since(timeline.ready_at)
                        .as_secs_f64(),
                )
            }),
            clients_disconnected: storm.ever_lost,
            still_down,
            gave_up: storm.gave_up,
            duration_ms: duration,
            first_disconnect_unix_ms: storm.first_loss.map(|at| timeline.clock.unix_us(at) / 1000),
            last_back_unix_ms: storm
                .last_back
                .filter(|_| happened)
                .map(|at| timeline.clock.unix_us(at) / 1000),
            reconnect_ms: Summary::of(&storm.outage),
            reconnect_connect_ms: Summary::of(&storm.reconnect),
            outages,
            attempts,
            max_attempts_per_outage: storm.max_attempts,
            refused_4007: refused,
            draining_4005: draining,
            setup_refused_4007: storm.setup_refused,
            resumed,
            not_resumed,
            recovered: storm.recovered,
            not_recovered,
            failed_attempts,
            disconnects,
        },
        publish: Publishing {
            offered_rate: args.rate,
            achieved_rate: per_sec(pubs.sent_measured, span),
            sent: pubs.sent_measured,
            acked: pubs.ok_measured,
            failed: pubs.failed_measured,
            ack_ms: Summary::of(&pubs.ack),
            send_lag_ms: Summary::of(&pubs.lag),
        },
        delivery: d,
        ping,
        errors: Errors::of(errors),
        generator,
    }
}

/// The ping round trips split by phase: the schedule maps the storm's start and end to
/// sequence numbers.
fn ping_section(
    args: &Args,
    timeline: &Timeline,
    storm: &Storm,
    pings: &calls::Collector,
    run: Option<&PingRun>,
) -> Ping {
    let s = &pings.stats;
    let mut ping = Ping {
        url: args.ping_url.clone(),
        clients: pings.setup.ready,
        rate: run.map_or(0.0, |r| r.rate),
        before_ms: None,
        during_ms: None,
        after_ms: None,
        ok: s.ok,
        error_replies: s.error_replies(),
        no_reply: s.no_reply,
        connection_lost: s.lost + run.map_or(0, |r| calls::Live::get(&r.unrouted)),
    };
    let Some(run) = run else {
        return ping;
    };
    let to_seq = |at: std::time::Instant| {
        run.schedule
            .count_before(at.saturating_duration_since(run.schedule.start()))
    };
    let warm = to_seq(timeline.ready_at + args.common.warmup);
    let (start, end) = match storm.first_loss {
        Some(first) => (to_seq(first), timeline.storm_end.map_or(u64::MAX, to_seq)),
        None => (u64::MAX, u64::MAX),
    };
    let summary = |range: Range<u64>| {
        let mut h = stats::new_hist();
        pings.ok_by_seq.record_range(range, &mut h);
        Summary::of(&h)
    };
    ping.before_ms = summary(warm..start);
    ping.during_ms = summary(start..end);
    ping.after_ms = summary(end..u64::MAX);
    ping
}

fn ms(d: Duration) -> f64 {
    round3(d.as_secs_f64() * 1000.0)
}

impl StormReport {
    pub fn render(&self) -> String {
        let c = &self.config;
        let mut out = format!(
            "\n== rtload storm: {} clients on {} channels at {} ({}); {} ping clients at {}; {}/s published via {}{} ==\n",
            c.clients,
            c.channels,
            c.url,
            c.encoding,
            c.ping_clients,
            c.ping_url.as_deref().unwrap_or("-"),
            c.rate,
            c.publish_url,
            interrupted_suffix(self.interrupted),
        );
        out += &format!("storm clients {}", self.connections.counts());
        if self.storm.setup_refused_4007 > 0 {
            out += &format!(
                "              first connects refused for load (4007) and retried: {}\n",
                self.storm.setup_refused_4007
            );
        }
        out += &format!("ping clients  {}", self.ping_connections.counts());
        let s = &self.storm;
        if !s.happened {
            out += "storm         none: no storm client lost its connection after READY\n";
        } else {
            out += &format!(
                "storm         {} clients disconnected {}s after READY; {}\n",
                s.clients_disconnected,
                s.first_disconnect_after_ready_s.unwrap_or(0.0),
                match s.duration_ms {
                    Some(d) if s.all_recovered => format!(
                        "ALL back and recovered {} ms after the first disconnect",
                        fmt_ms(Some(d))
                    ),
                    Some(d) => format!(
                        "all back {} ms after the first disconnect, NOT all recovered ({} recovered: false, {} gave up)",
                        fmt_ms(Some(d)),
                        s.not_recovered,
                        s.gave_up
                    ),
                    None => format!(
                        "NOT all back: {} still down, {} gave up",
                        s.still_down, s.gave_up
                    ),
                }
            );
            if let Some(after) = c.drop_after_s {
                out += &format!(
                    "              made by rtload: every storm client dropped its socket {after}s after READY\n"
                );
            }
            out += &format!(
                "reconnect     per outage {}  ({} outages)\n",
                latency_line(s.reconnect_ms.as_ref()),
                s.outages
            );
            out += &format!(
                "              attempts {} (at most {} for one outage); refused 4007 {}; draining 4005 {}; successful connect {}\n",
                s.attempts,
                s.max_attempts_per_outage,
                s.refused_4007,
                s.draining_4005,
                p50_p99(s.reconnect_connect_ms.as_ref()),
            );
            out += &format!(
                "              resumed {} / not {}; recovered {} / not {}\n",
                s.resumed, s.not_resumed, s.recovered, s.not_recovered
            );
            for (kind, n) in s.failed_attempts.iter() {
                out += &format!("  {n:>10}  failed attempt: {kind}\n");
            }
            for (kind, n) in s.disconnects.iter() {
                out += &format!("  {n:>10}  disconnect: {kind}\n");
            }
        }
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
            "delivery      {} clients checked: {} live + {} recovered in connect replies\n",
            d.clients_checked, d.live, d.recovered
        );
        out += &format!(
            "LOST          {} publications (gaps {}, tail {}, unrecoverable {}; {} clients with loss, at most {} each); duplicates {}; epoch changes {}; pushed before the connect reply {}\n",
            d.lost,
            d.gaps,
            d.tail,
            d.unrecoverable,
            d.clients_with_loss,
            d.max_lost_per_client,
            d.duplicates,
            d.epoch_changes,
            d.early,
        );
        for a in &d.anomalies {
            let x = &a.anomaly;
            let what = if x.offset < x.expected {
                "duplicate"
            } else {
                "gap"
            };
            out += &format!(
                "  {what:>10}  client {} on {}: offset {} where {} was expected ({:?} after {}, {} ms after connect #{})\n",
                a.client,
                a.channel,
                x.offset,
                x.expected,
                x.source,
                x.after
                    .map_or_else(|| "-".to_string(), |s| format!("{s:?}")),
                x.ms_after_connect,
                x.outages + 1,
            );
        }
        out += &format!(
            "latency live  {}\n",
            latency_line(d.live_latency_ms.as_ref())
        );
        out += &format!(
            "  recovered   {}\n",
            latency_line(d.recovered_latency_ms.as_ref())
        );
        let g = &self.ping;
        out += &format!(
            "ping (B)      {} clients, {}/s: ok {}, error replies {}, no reply {}, connection lost {}\n",
            g.clients, g.rate, g.ok, g.error_replies, g.no_reply, g.connection_lost
        );
        for (phase, summary) in [
            ("before", &g.before_ms),
            ("during", &g.during_ms),
            ("after", &g.after_ms),
        ] {
            out += &format!("  {phase:<12}{}\n", latency_line(summary.as_ref()));
        }
        self.errors.render(&mut out);
        self.generator.render(&mut out);
        out +=
            "              (generator CPU: over the storm window, first disconnect to last back)\n";
        out
    }
}
