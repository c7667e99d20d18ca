//! The `main` every service binary shares: load the configuration, install
//! telemetry, start the service in an actix system, stop it on SIGTERM or
//! Ctrl-C, and flush telemetry last.

use std::fmt::Display;
use std::future::Future;
use std::process::ExitCode;

use crate::config::Config;

/// Runs a service until a termination signal. `start` gets the validated
/// configuration; `stop` gets what it returned (a gateway drains there).
/// A bad configuration exits with 2 and a message naming the key.
pub fn main<H, E, Start, Started, Stop, Stopped>(
    name: &'static str,
    start: Start,
    stop: Stop,
) -> ExitCode
where
    Start: FnOnce(Config) -> Started,
    Started: Future<Output = Result<H, E>>,
    E: Display,
    Stop: FnOnce(H) -> Stopped,
    Stopped: Future<Output = ()>,
{
    let config = match Config::from_env() {
        Ok(config) => config,
        Err(error) => {
            eprintln!("{name}: {error}");
            return ExitCode::from(2);
        }
    };
    let telemetry = crate::telemetry::init(&config.log, &config.telemetry, name);
    let code = actix_rt::System::new().block_on(async move {
        let handle = match start(config).await {
            Ok(handle) => handle,
            Err(error) => {
                tracing::error!(%error, service = name, "failed to start");
                return ExitCode::FAILURE;
            }
        };
        crate::shutdown::signal().await;
        tracing::info!(service = name, "shutting down");
        stop(handle).await;
        ExitCode::SUCCESS
    });
    // Last, off the event loop: it blocks until buffered spans are sent.
    telemetry.shutdown();
    code
}
