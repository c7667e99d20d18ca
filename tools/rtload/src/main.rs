//! rtload: the realtime platform's load generator.
//!
//! Parts: [`cli`] (flags), [`scenario`] (one module per scenario), and what scenarios share:
//! [`client`] (dial, WebSocket handshake, setup commands), [`wire`] (encodings, frame
//! splitting, zero-copy decoding), [`pacer`] (open-loop schedule), [`publish`] (WebSocket
//! and HTTP publishers), [`subscriber`] (push consumer), [`calls`] (request/reply load:
//! matching replies by id, outcomes by error code), [`stats`] (HDR histograms,
//! counters), [`report`] (progress line, generator health, JSON) and [`sysinfo`] (CPU and
//! descriptor limits of the generator itself); [`floor`] measures the machine's own floor
//! for a fan-out, with no server.

mod calls;
mod cli;
mod client;
mod clock;
mod collector;
mod compare;
mod error;
mod floor;
mod http;
mod pacer;
mod publish;
mod pubsub;
mod report;
mod scenario;
mod stats;
mod subscriber;
mod sysinfo;
mod wire;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    sysinfo::set_server_pids(cli.server_pid.clone());
    if let cli::Scenario::Floor(args) = &cli.scenario {
        return floor::run(args).unwrap_or_else(|e| {
            eprintln!("rtload floor: {e}");
            ExitCode::FAILURE
        });
    }
    if let cli::Scenario::Report(args) = &cli.scenario {
        return match compare::run(args) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("rtload report: {e}");
                ExitCode::FAILURE
            }
        };
    }
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    builder.enable_all().thread_name("rtload-worker");
    if let Some(threads) = cli.threads {
        builder.worker_threads(threads.max(1));
    }
    let runtime = match builder.build() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("rtload: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(scenario::run(cli.scenario)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("rtload: {e}");
            ExitCode::FAILURE
        }
    }
}
