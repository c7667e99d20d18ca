//! `rpc`: open-loop RPC calls `{"id": n, "op": "rpc", "method": M, "data": D}` spread over
//! the connections; latency from each call's intended send time to its final reply;
//! outcomes by error code (113 busy with its `retry_after_ms`, 114 timeout, 104 unknown
//! method), `rpc_part` pushes and the time to the first one; successful calls per second.

use std::process::ExitCode;
use std::time::Duration;

use crate::calls::{self, Call, Plan, Rate};
use crate::cli::Common;
use crate::error::Result;

#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    #[command(flatten)]
    pub common: Common,

    /// The RPC method (e.g. auth.hash_password).
    #[arg(long)]
    pub method: String,

    /// The call's `data`, as JSON (e.g. '{"password":"correct horse"}'); sent converted
    /// with --encoding msgpack. Without it, the call has no data (nil).
    #[arg(long, value_parser = parse_json)]
    pub data: Option<serde_json::Value>,

    /// Calls per second, all connections together, on an open-loop schedule.
    #[arg(long, default_value_t = 10.0)]
    pub rate: f64,

    /// Connections the calls are spread over (round-robin), each `connect`ed anonymously.
    #[arg(long, default_value_t = 50)]
    pub connections: usize,

    /// A call with no final reply this long after it was sent counts as `no reply`. Keep it
    /// above the server's RPC deadline (10 s by default), or its 114 replies come too late
    /// to be seen.
    #[arg(long, default_value_t = 12_000)]
    pub timeout_ms: u64,
}

impl Args {
    pub fn plan(&self) -> Plan {
        Plan {
            scenario: "rpc",
            common: self.common.clone(),
            call: Call::Rpc {
                method: self.method.clone(),
                data: self.data.clone(),
            },
            connections: self.connections,
            rate: Rate::Total(self.rate),
            timeout: Duration::from_millis(self.timeout_ms),
        }
    }
}

fn parse_json(text: &str) -> Result<serde_json::Value, String> {
    serde_json::from_str(text).map_err(|e| format!("not JSON: {e}"))
}

pub async fn run(args: Args) -> Result<ExitCode> {
    calls::run(args.plan()).await
}
