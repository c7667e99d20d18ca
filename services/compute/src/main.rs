//! `rt-compute`: CPU-heavy RPC methods on worker threads. Configuration comes
//! from `RT_CONFIG` and `RT_…` variables (see docs/operations.md).

fn main() -> std::process::ExitCode {
    rt_shared::service::main("rt-compute", rt_compute::run, |handle| handle.stop())
}
