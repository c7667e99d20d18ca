//! `ping`: N connected clients, each sending `{"id": n, "op": "ping"}` on one open-loop
//! schedule spread evenly over them; reports the round-trip time from each ping's intended
//! send time to its reply. The probe for "is the gateway's event loop stalled": a ping
//! does no work beyond a reply, so its RTT is the gateway's responsiveness.

use std::process::ExitCode;
use std::time::Duration;

use crate::calls::{self, Call, Plan, Rate};
use crate::cli::Common;
use crate::error::Result;

#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    #[command(flatten)]
    pub common: Common,

    /// Connections, each `connect`ed anonymously.
    #[arg(long, default_value_t = 1000)]
    pub connections: usize,

    /// Pings per second per connection. The total (connections × this) runs on one
    /// schedule, round-robin over the connections: evenly spread, never in bursts.
    #[arg(long, default_value_t = 1.0)]
    pub rate_per_conn: f64,

    /// A ping with no reply this long after it was sent counts as `no reply`.
    #[arg(long, default_value_t = 10_000)]
    pub timeout_ms: u64,
}

impl Args {
    pub fn plan(&self) -> Plan {
        Plan {
            scenario: "ping",
            common: self.common.clone(),
            call: Call::Ping,
            connections: self.connections,
            rate: Rate::PerConn(self.rate_per_conn),
            timeout: Duration::from_millis(self.timeout_ms),
        }
    }
}

pub async fn run(args: Args) -> Result<ExitCode> {
    calls::run(args.plan()).await
}
