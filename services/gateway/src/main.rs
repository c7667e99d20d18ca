//! `rt-gateway`: WebSocket and HTTP edge. Configuration comes from
//! `RT_CONFIG` and `RT_…` variables (see docs/operations.md). SIGTERM drains:
//! clients get close 4005 with a jittered retry hint.

fn main() -> std::process::ExitCode {
    rt_shared::service::main("rt-gateway", rt_gateway::run, |handle| handle.drain())
}
