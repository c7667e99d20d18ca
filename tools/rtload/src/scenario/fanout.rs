//! `fanout`: N subscribers on one channel, publications at a fixed rate (open loop), and
//! publish-to-deliver latency as every subscriber sees it.
//!
//! Phases: connect (bounded concurrency) → warmup (load, samples discarded) → measure →
//! drain (outstanding acks and deliveries) → stop and collect. The measured window is
//! defined by sequence numbers from the schedule, so a late delivery of a measured
//! publication still counts, and a warmup publication never does. The run itself is
//! [`crate::pubsub::run_publishers`], shared with `http-publish`.

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

    /// Subscriber connections.
    #[arg(long, default_value_t = 1000)]
    pub subscribers: usize,

    /// Publications per second, on an open-loop schedule.
    #[arg(long, default_value_t = 1000.0)]
    pub rate: f64,

    /// Channel to publish on and subscribe to (its namespace must allow anonymous clients,
    /// and client publishes for --publish-via ws).
    #[arg(long, default_value = "bench:fanout")]
    pub channel: String,

    /// Length of the padding string in each publication's data (beside `t` and `seq`).
    #[arg(long, default_value_t = 64)]
    pub payload_bytes: usize,

    /// Publish with the WebSocket `publish` op or with `POST /api/publish`.
    #[arg(long, value_enum, default_value_t = Via::Ws)]
    pub publish_via: Via,

    /// Publisher connections (default: 1 WebSocket, or 4 keep-alive HTTP connections).
    #[arg(long)]
    pub publishers: Option<usize>,
}

impl Args {
    fn publishers(&self) -> usize {
        self.publishers
            .unwrap_or(match self.publish_via {
                Via::Ws => 1,
                Via::Http => 4,
            })
            .max(1)
    }
}

pub async fn run(args: Args) -> Result<ExitCode> {
    let common = &args.common;
    if args.subscribers == 0 {
        return Err("--subscribers must be at least 1".into());
    }
    let publishers = args.publishers();
    eprintln!(
        "rtload fanout: {} subscribers on {} ({}), {} publisher(s) via {:?}, {}/s for {:?} after {:?} warmup",
        args.subscribers,
        args.channel,
        common.encoding,
        publishers,
        args.publish_via,
        args.rate,
        common.duration,
        common.warmup,
    );
    let plan = Plan {
        common: common.clone(),
        channels: vec![args.channel.clone()],
        subscribers: args.subscribers,
        via: args.publish_via,
        publishers,
        load: Load::Rate(args.rate),
        payload_bytes: args.payload_bytes,
    };
    let finished = pubsub::run_publishers(&plan).await?;
    let report = report::build(&args, finished);
    print_and_write(&report.render(), &report, common.json_out.as_deref())?;
    // A run that measured nothing is a failure, whatever the reason (shown above).
    if report.publish.acked == 0 || report.delivery.delivered == 0 {
        eprintln!("rtload: nothing was measured (no acknowledged publication delivered)");
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}
