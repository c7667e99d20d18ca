//! Command line: one subcommand per scenario, each flattening the options all scenarios
//! share ([`Common`]).

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};

use crate::clock::parse_duration;
use crate::compare;
use crate::scenario::{channels, chat, fanout, http_publish, idle, ping, rpc, storm};
use crate::wire::Encoding;

#[derive(Parser, Debug)]
#[command(
    name = "rtload",
    version,
    about = "Load generator for the realtime platform",
    long_about = "Load generator for the realtime platform. Publishes on an open-loop schedule \
                  (latency is measured from each message's intended send time, so a slow \
                  server cannot hide its slowness) and reports HDR percentiles. Progress goes \
                  to stderr once a second; the final report to stdout."
)]
pub struct Cli {
    /// Tokio worker threads (default: one per core).
    #[arg(long, global = true)]
    pub threads: Option<usize>,

    /// The server's process ids on this machine, comma-separated (e.g. gateway, broadcast,
    /// session and nats-server; or a Node.js cluster's primary, workers and nats-server):
    /// their CPU time (utime + stime, all threads, from /proc/<pid>/stat) and resident
    /// memory (VmRSS) over the measured window go in the report as `server`.
    #[arg(long, global = true, value_delimiter = ',')]
    pub server_pid: Vec<u32>,

    #[command(subcommand)]
    pub scenario: Scenario,
}

#[derive(Subcommand, Debug)]
pub enum Scenario {
    /// Many subscribers on one channel, paced publications: publish-to-deliver latency
    /// and delivery under fan-out.
    Fanout(fanout::Args),
    /// Publish throughput and publish-to-deliver over one or many channels (closed loop
    /// with --window, or open loop with --rate): the cost of sequencing and history.
    Channels(channels::Args),
    /// Many connections pinging on one open-loop schedule: the gateway's responsiveness
    /// (ping round-trip time) under load.
    Ping(ping::Args),
    /// Open-loop RPC calls: latency to the final reply, throughput, outcomes by error code
    /// (113 busy and its retry_after, 114 timeout, 104), partial results.
    Rpc(rpc::Args),
    /// N connections held idle: the gateway's memory per connection (from /metrics or
    /// /proc/<pid>/status).
    Idle(idle::Args),
    /// A reconnect storm: clients on gateway A reconnect with backoff when it is killed
    /// and restarted (by bench/storm/run); time to recover, publications lost or
    /// duplicated per client, 4007 refusals, and ping latency on gateway B meanwhile.
    Storm(storm::Args),
    /// Chat rooms: every member publishes in its room on its own connection (open loop)
    /// and receives all of it; publish ack and publish-to-deliver latency, loss per member.
    Chat(chat::Args),
    /// A backend publishing with `POST /api/publish` (open loop with --rate, closed loop
    /// with --rate 0): request latency, throughput, responses by status and code; with
    /// subscribers, publish-to-deliver latency and loss.
    HttpPublish(http_publish::Args),
    /// Not a scenario: this machine's floor for a fan-out, with no server. Writer threads
    /// write one small frame to each of N loopback sockets per round (open loop) while a
    /// child process reads them all: the best publish-to-deliver any server could show here.
    Floor(crate::floor::Args),
    /// The reading side of `floor` (started by it).
    #[command(hide = true)]
    FloorSink(crate::floor::SinkArgs),
    /// Not a scenario: reads the JSON results of a comparison run (bench/compare/run:
    /// runs.json, machine.json and one report per run) and writes report.md and SVG plots.
    Report(compare::Args),
}

/// Options every scenario takes.
#[derive(clap::Args, Debug, Clone)]
pub struct Common {
    /// Gateway WebSocket endpoint (ws:// only).
    #[arg(long, default_value = "ws://127.0.0.1:8080/ws")]
    pub url: String,

    /// Gateway HTTP base URL, for `/api/*`.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    pub http: String,

    /// API key for `/api/*` (`Authorization: apikey KEY`).
    #[arg(long, default_value = "dev-api-key")]
    pub api_key: String,

    /// Wire encoding (subprotocol rt.v1.msgpack or rt.v1.json).
    #[arg(long, value_enum, default_value_t = Encoding::Msgpack)]
    pub encoding: Encoding,

    /// Measured time, after the warmup (e.g. 20s, 2m).
    #[arg(long, value_parser = parse_duration, default_value = "20s")]
    pub duration: Duration,

    /// Load before measuring; its samples are discarded.
    #[arg(long, value_parser = parse_duration, default_value = "3s")]
    pub warmup: Duration,

    /// Source addresses, comma-separated (e.g. 127.0.0.1,127.0.0.2): connections are spread
    /// over them round-robin, each address bringing its own ephemeral ports.
    #[arg(long, value_delimiter = ',')]
    pub bind_ip: Vec<IpAddr>,

    /// Connections being set up at once.
    #[arg(long, default_value_t = 200)]
    pub connect_concurrency: usize,

    /// Limit for each setup step (TCP, WebSocket handshake, each command's reply).
    #[arg(long, value_parser = parse_duration, default_value = "10s")]
    pub connect_timeout: Duration,

    /// After the last send, how long to wait for outstanding acks and deliveries.
    #[arg(long, value_parser = parse_duration, default_value = "3s")]
    pub drain: Duration,

    /// Also write the final report as JSON to this file.
    #[arg(long)]
    pub json_out: Option<PathBuf>,
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn fanout_flags_parse() {
        let cli = Cli::try_parse_from([
            "rtload",
            "fanout",
            "--subscribers",
            "10",
            "--rate",
            "50",
            "--duration",
            "2s",
            "--warmup",
            "500ms",
            "--encoding",
            "json",
            "--publish-via",
            "http",
            "--bind-ip",
            "127.0.0.2,127.0.0.3",
            "--json-out",
            "r.json",
        ])
        .unwrap();
        let Scenario::Fanout(args) = cli.scenario else {
            panic!("fanout expected")
        };
        assert_eq!(args.subscribers, 10);
        assert_eq!(args.common.duration, Duration::from_secs(2));
        assert_eq!(args.common.warmup, Duration::from_millis(500));
        assert_eq!(args.common.encoding, Encoding::Json);
        assert_eq!(args.common.bind_ip.len(), 2);
        assert_eq!(args.channel, "bench:fanout");
    }

    #[test]
    fn ping_flags_parse() {
        let cli = Cli::try_parse_from([
            "rtload",
            "ping",
            "--url",
            "ws://127.0.0.1:8080/ws",
            "--connections",
            "1000",
            "--rate-per-conn",
            "1",
            "--duration",
            "20s",
            "--warmup",
            "3s",
            "--encoding",
            "json",
            "--bind-ip",
            "127.0.0.2",
            "--json-out",
            "ping.json",
        ])
        .unwrap();
        let Scenario::Ping(args) = cli.scenario else {
            panic!("ping expected")
        };
        let plan = args.plan();
        assert_eq!(plan.total_rate(), 1000.0);
        assert_eq!(plan.call, crate::calls::Call::Ping);
        assert_eq!(plan.timeout, Duration::from_secs(10));
        assert_eq!(plan.common.encoding, Encoding::Json);
        assert_eq!(plan.window().unwrap().count(), 20_000);
    }

    #[test]
    fn rpc_flags_parse_and_data_must_be_json() {
        let cli = Cli::try_parse_from([
            "rtload",
            "rpc",
            "--method",
            "auth.hash_password",
            "--data",
            r#"{"password":"correct horse"}"#,
            "--rate",
            "20",
            "--duration",
            "20s",
            "--connections",
            "50",
            "--timeout-ms",
            "10000",
        ])
        .unwrap();
        let Scenario::Rpc(args) = cli.scenario else {
            panic!("rpc expected")
        };
        let plan = args.plan();
        assert_eq!(
            plan.call,
            crate::calls::Call::Rpc {
                method: "auth.hash_password".into(),
                data: Some(serde_json::json!({"password": "correct horse"})),
            }
        );
        assert_eq!((plan.connections, plan.total_rate()), (50, 20.0));
        assert_eq!(plan.timeout, Duration::from_secs(10));
        let bad = Cli::try_parse_from(["rtload", "rpc", "--method", "m", "--data", "{oops"]);
        assert!(bad.unwrap_err().to_string().contains("not JSON"));
        assert!(
            Cli::try_parse_from(["rtload", "rpc"]).is_err(),
            "--method is required"
        );
        let Scenario::Rpc(args) = Cli::try_parse_from(["rtload", "rpc", "--method", "m"])
            .unwrap()
            .scenario
        else {
            panic!("rpc expected")
        };
        assert_eq!(args.plan().timeout, Duration::from_secs(12));
    }

    #[test]
    fn chat_flags_parse() {
        let cli = Cli::try_parse_from([
            "rtload",
            "chat",
            "--url",
            "ws://127.0.0.1:8080/ws",
            "--rooms",
            "50",
            "--members",
            "20",
            "--rate-per-member",
            "0.5",
            "--duration",
            "20s",
            "--encoding",
            "json",
            "--bind-ip",
            "127.0.0.2,127.0.0.3",
            "--json-out",
            "chat.json",
        ])
        .unwrap();
        let Scenario::Chat(args) = cli.scenario else {
            panic!("chat expected")
        };
        assert_eq!((args.rooms, args.members), (50, 20));
        assert_eq!(args.connections(), 1000);
        assert_eq!(args.total_rate(), 500.0);
        assert_eq!(args.prefix, "chat:load-");
        assert_eq!(args.payload_bytes, 64);
        assert_eq!(args.common.encoding, Encoding::Json);
        assert_eq!(args.common.bind_ip.len(), 2);
        assert_eq!(
            args.common.json_out.as_deref(),
            Some(std::path::Path::new("chat.json"))
        );
        let Scenario::Chat(args) = Cli::try_parse_from(["rtload", "chat"]).unwrap().scenario else {
            panic!("chat expected")
        };
        assert_eq!(
            (args.rooms, args.members, args.rate_per_member),
            (10, 10, 1.0)
        );
    }

    #[test]
    fn http_publish_flags_parse() {
        let cli = Cli::try_parse_from([
            "rtload",
            "http-publish",
            "--http",
            "http://127.0.0.1:8080",
            "--api-key",
            "k",
            "--channels",
            "8",
            "--prefix",
            "news:x-",
            "--rate",
            "2000",
            "--http-connections",
            "16",
            "--subscribers-per-channel",
            "3",
            "--bind-ip",
            "127.0.0.2",
        ])
        .unwrap();
        let Scenario::HttpPublish(args) = cli.scenario else {
            panic!("http-publish expected")
        };
        assert_eq!(args.load(), crate::pubsub::Load::Rate(2000.0));
        assert_eq!(args.http_connections().unwrap(), 16);
        assert_eq!(args.subscribers_per_channel, 3);
        assert_eq!(args.channel_names()[7], "news:x-7");
        assert_eq!(args.common.api_key, "k");

        let parse = |extra: &[&str]| {
            let mut argv = vec!["rtload", "http-publish"];
            argv.extend(extra);
            let Scenario::HttpPublish(args) = Cli::try_parse_from(argv).unwrap().scenario else {
                panic!("http-publish expected")
            };
            args
        };
        let open = parse(&[]);
        assert_eq!(open.load(), crate::pubsub::Load::Rate(1000.0));
        assert_eq!(open.http_connections().unwrap(), 4);
        assert_eq!((open.channels, open.subscribers_per_channel), (1, 0));
        let closed = parse(&["--rate", "0", "--concurrency", "32"]);
        assert_eq!(closed.load(), crate::pubsub::Load::Closed(32));
        assert_eq!(closed.http_connections().unwrap(), 32);
        let short = parse(&[
            "--rate",
            "0",
            "--concurrency",
            "32",
            "--http-connections",
            "8",
        ]);
        assert!(short.http_connections().is_err());
        assert!(
            parse(&["--http-connections", "0"])
                .http_connections()
                .is_err()
        );
    }

    #[test]
    fn idle_flags_parse() {
        let cli = Cli::try_parse_from([
            "rtload",
            "idle",
            "--url",
            "ws://127.0.0.1:8080/ws",
            "--connections",
            "5000",
            "--hold",
            "20s",
            "--gateway-pid",
            "4242",
            "--metrics",
            "http://127.0.0.1:8080/metrics",
            "--bind-ip",
            "127.0.0.2,127.0.0.3",
            "--json-out",
            "idle.json",
        ])
        .unwrap();
        let Scenario::Idle(args) = cli.scenario else {
            panic!("idle expected")
        };
        assert_eq!(args.connections, 5000);
        assert_eq!(args.hold, Duration::from_secs(20));
        assert_eq!(args.settle, Duration::from_secs(5));
        assert_eq!(args.gateway_pid, vec![4242]);
        assert_eq!(args.common.bind_ip.len(), 2);
        let Scenario::Idle(args) = Cli::try_parse_from(["rtload", "idle"]).unwrap().scenario else {
            panic!("idle expected")
        };
        assert_eq!((args.metrics, args.gateway_pid), (None, vec![]));
        let Scenario::Idle(args) = Cli::try_parse_from([
            "rtload",
            "idle",
            "--gateway-pid",
            "1,2",
            "--gateway-pid",
            "3",
        ])
        .unwrap()
        .scenario
        else {
            panic!("idle expected")
        };
        assert_eq!(args.gateway_pid, vec![1, 2, 3]);
    }

    #[test]
    fn server_pids_are_global() {
        let cli = Cli::try_parse_from([
            "rtload",
            "ping",
            "--server-pid",
            "10,11",
            "--connections",
            "5",
        ])
        .unwrap();
        assert_eq!(cli.server_pid, vec![10, 11]);
        let cli = Cli::try_parse_from(["rtload", "--server-pid", "7", "idle"]).unwrap();
        assert_eq!(cli.server_pid, vec![7]);
        let cli = Cli::try_parse_from(["rtload", "report", "--input", "a", "--out", "b"]).unwrap();
        assert!(matches!(cli.scenario, Scenario::Report(_)));
    }
}
