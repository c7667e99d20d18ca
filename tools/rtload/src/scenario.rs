//! Scenarios, one module each (`ping` and `rpc` share the request/reply engine in
//! [`crate::calls`]; `fanout`, `http-publish` and `chat` the publish/subscribe run in
//! [`crate::pubsub`]). A scenario takes its own `Args` (with [`crate::cli::Common`]
//! flattened in), runs, prints its report and returns the exit code. To add one: a module
//! here, a variant in [`crate::cli::Scenario`], an arm in [`run`].

pub mod channels;
pub mod chat;
pub mod fanout;
pub mod http_publish;
pub mod idle;
pub mod ping;
pub mod rpc;
pub mod storm;

use std::process::ExitCode;

use crate::cli::Scenario;
use crate::error::Result;

pub async fn run(scenario: Scenario) -> Result<ExitCode> {
    match scenario {
        Scenario::Channels(args) => channels::run(args).await,
        Scenario::Fanout(args) => fanout::run(args).await,
        Scenario::Ping(args) => ping::run(args).await,
        Scenario::Idle(args) => idle::run(args).await,
        Scenario::Rpc(args) => rpc::run(args).await,
        Scenario::Storm(args) => storm::run(args).await,
        Scenario::Chat(args) => chat::run(args).await,
        Scenario::HttpPublish(args) => http_publish::run(args).await,
        Scenario::Report(args) => crate::compare::run(&args).map(|()| ExitCode::SUCCESS),
        Scenario::Floor(args) => crate::floor::run(&args),
        Scenario::FloorSink(args) => crate::floor::sink(args).await,
    }
}
