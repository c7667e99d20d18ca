//! `http-publish`: a backend publishing through `POST /api/publish` (PROTOCOL.md §5,
//! `Authorization: apikey KEY`, body `{"channel": …, "data": …}`), round-robin over
//! `--channels` channels, over `--http-connections` keep-alive HTTP/1.1 connections (one
//! request at a time each). Open loop at `--rate` (latency from the intended send time),
//! or, with `--rate 0`, a closed loop keeping `--concurrency` requests in flight (the
//! most the path sustains). With `--subscribers-per-channel K`, K WebSocket subscribers on
//! each channel measure publish-to-deliver latency and count what they lost.
//!
//! The run is [`crate::pubsub::run_publishers`], shared with `fanout`: connect the
//! subscribers → warmup → measure → drain (outstanding requests, then deliveries) → stop.

mod report;

use std::process::ExitCode;

use crate::cli::Common;
use crate::error::Result;
use crate::publish::Via;
use crate::pubsub::{self, Load, Plan};
use crate::report::print_and_write;

#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    #[command(flatten)]
    pub common: Common,

    /// Channels published to, round-robin (`<prefix>0` … `<prefix>N-1`).
    #[arg(long, default_value_t = 1)]
    pub channels: usize,

    /// Channel name prefix (any configured namespace takes HTTP publishes; subscribers
    /// need one that allows anonymous clients).
    #[arg(long, default_value = "chat:http-")]
    pub prefix: String,

    /// Publications per second over all connections (open loop); 0: closed loop with
    /// --concurrency requests in flight.
    #[arg(long, default_value_t = 1000.0)]
    pub rate: f64,

    /// Requests in flight in a closed loop (--rate 0).
    #[arg(long, default_value_t = 16)]
    pub concurrency: usize,

    /// Keep-alive HTTP/1.1 connections, one request at a time each (default: 4 with a
    /// rate, --concurrency in a closed loop).
    #[arg(long)]
    pub http_connections: Option<usize>,

    /// WebSocket subscribers on each channel, to measure publish-to-deliver latency and
    /// loss (0: none).
    #[arg(long, default_value_t = 0)]
    pub subscribers_per_channel: usize,

    /// Length of the padding string in each publication's data (beside `t` and `seq`).
    #[arg(long, default_value_t = 64)]
    pub payload_bytes: usize,
}

impl Args {
    /// Open loop at `--rate`, or a closed loop when it is 0.
    pub fn load(&self) -> Load {
        if self.rate == 0.0 {
            Load::Closed(self.concurrency)
        } else {
            Load::Rate(self.rate)
        }
    }

    /// The HTTP connections to open: a closed loop needs one per request in flight.
    pub fn http_connections(&self) -> Result<usize> {
        match (self.load(), self.http_connections) {
            (_, Some(0)) => Err("--http-connections must be at least 1".into()),
            (Load::Closed(n), Some(c)) if c < n => Err(format!(
                "{n} requests in flight need at least {n} --http-connections \
                 (HTTP/1.1 carries one request at a time per connection)"
            )
            .into()),
            (_, Some(c)) => Ok(c),
            (Load::Rate(_), None) => Ok(4),
            (Load::Closed(n), None) => Ok(n),
        }
    }

    pub fn channel_names(&self) -> Vec<String> {
        (0..self.channels)
            .map(|n| format!("{}{n}", self.prefix))
            .collect()
    }
}

pub async fn run(args: Args) -> Result<ExitCode> {
    let common = &args.common;
    if args.channels == 0 {
        return Err("--channels must be at least 1".into());
    }
    let connections = args.http_connections()?;
    let load = args.load();
    eprintln!(
        "rtload http-publish: POST {}/api/publish on {} channel(s), {connections} connection(s), {}, {} subscriber(s) per channel ({}), for {:?} after {:?} warmup",
        common.http,
        args.channels,
        match load {
            Load::Rate(rate) => format!("{rate}/s"),
            Load::Closed(n) => format!("closed loop with {n} in flight"),
        },
        args.subscribers_per_channel,
        common.encoding,
        common.duration,
        common.warmup,
    );
    let plan = Plan {
        common: common.clone(),
        channels: args.channel_names(),
        subscribers: args.channels * args.subscribers_per_channel,
        via: Via::Http,
        publishers: connections,
        load,
        payload_bytes: args.payload_bytes,
    };
    let finished = pubsub::run_publishers(&plan).await?;
    let report = report::build(&args, connections, finished);
    print_and_write(&report.render(), &report, common.json_out.as_deref())?;
    let undelivered = report
        .subscribers
        .as_ref()
        .is_some_and(|s| s.delivery.delivered == 0);
    if report.publish.acked == 0 || undelivered {
        eprintln!("rtload: nothing was measured (no publication acknowledged, or none delivered)");
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}
