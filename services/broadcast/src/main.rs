//! `rt-broadcast`: sequencing, history and delivery. Configuration comes from
//! `RT_CONFIG` and `RT_…` variables (see docs/operations.md).

use std::process::ExitCode;

use rt_shared::config::Config;

fn main() -> ExitCode {
    let config = match Config::from_env() {
        Ok(config) => config,
        Err(error) => {
            eprintln!("rt-broadcast: {error}");
            return ExitCode::from(2);
        }
    };
    let telemetry = rt_shared::telemetry::init(&config.log, &config.telemetry, "rt-broadcast");
    let code = actix_rt::System::new().block_on(async move {
        let handle = match rt_broadcast::run(config).await {
            Ok(handle) => handle,
            Err(error) => {
                tracing::error!(%error, "broadcast failed to start");
                return ExitCode::FAILURE;
            }
        };
        rt_shared::shutdown::signal().await;
        tracing::info!("shutting down");
        handle.stop().await;
        ExitCode::SUCCESS
    });
    // Last, off the event loop: it blocks until buffered spans are sent.
    telemetry.shutdown();
    code
}
