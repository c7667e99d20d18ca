//! `rt-session`: tokens, sessions, presence reads and persistence. Configuration
//! comes from `RT_CONFIG` and `RT_…` variables (see docs/operations.md).

use std::process::ExitCode;

fn main() -> ExitCode {
    rt_shared::service::main("rt-session", rt_session::run, |handle| handle.stop())
}
