//! `rt-broadcast`: sequencing, history and delivery. Configuration comes from
//! `RT_CONFIG` and `RT_…` variables (see docs/operations.md).

fn main() -> std::process::ExitCode {
    rt_shared::service::main("rt-broadcast", rt_broadcast::run, |handle| handle.stop())
}
