//! `rt-gateway`: WebSocket and HTTP edge. Configuration comes from
//! `RT_CONFIG` and `RT_…` variables (see docs/operations.md). SIGTERM drains:
//! clients get close 4005 with a jittered retry hint.

use std::process::ExitCode;

use rt_shared::config::Config;

fn main() -> ExitCode {
    let config = match Config::from_env() {
        Ok(config) => config,
        Err(error) => {
            eprintln!("rt-gateway: {error}");
            return ExitCode::from(2);
        }
    };
    let telemetry = rt_shared::telemetry::init(&config.log, &config.telemetry, "rt-gateway");
    let code = actix_rt::System::new().block_on(async move {
        let handle = match rt_gateway::run(config).await {
            Ok(handle) => handle,
            Err(error) => {
                tracing::error!(%error, "gateway failed to start");
                return ExitCode::FAILURE;
            }
        };
        rt_shared::shutdown::signal().await;
        tracing::info!("draining");
        handle.drain().await;
        ExitCode::SUCCESS
    });
    // Last, off the event loop: it blocks until buffered spans are sent.
    telemetry.shutdown();
    code
}
