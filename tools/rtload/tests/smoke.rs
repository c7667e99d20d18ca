//! Keeps the load generator from rotting: each scenario runs for a second or
//! two, with a handful of connections, against the real services (started
//! in-process by the test harness on a private nats-server), and must report
//! everything delivered and answered.

#![allow(
    clippy::expect_used,
    reason = "test code: a failed expectation is a failed test"
)]

use std::path::Path;
use std::process::Command;

use rt_tests::TestCluster;
use rt_tests::cluster::API_KEY;
use serde_json::Value;

/// Runs rtload with `args` (off the test's event loop, which serves the cluster).
async fn rtload(args: Vec<String>, report: &Path) -> Value {
    let status = actix_rt::task::spawn_blocking(move || {
        Command::new(env!("CARGO_BIN_EXE_rtload"))
            .args(&args)
            .output()
            .expect("rtload runs")
    })
    .await
    .expect("rtload task");
    assert!(
        status.status.success(),
        "rtload failed: {}\n{}",
        String::from_utf8_lossy(&status.stdout),
        String::from_utf8_lossy(&status.stderr)
    );
    serde_json::from_str(&std::fs::read_to_string(report).expect("report written"))
        .expect("report is JSON")
}

fn common(cluster: &TestCluster, report: &Path) -> Vec<String> {
    let addr = cluster.addr(0);
    [
        "--url".into(),
        format!("ws://{addr}/ws"),
        "--duration".into(),
        "2s".into(),
        "--warmup".into(),
        "1s".into(),
        "--json-out".into(),
        report.display().to_string(),
    ]
    .into()
}

#[actix_rt::test]
async fn fanout_ping_rpc_and_idle_scenarios_run_against_the_real_services() {
    let mut cluster = TestCluster::start().await;
    cluster.start_compute().await;
    let dir = tempfile_dir();

    let report = dir.join("fanout.json");
    let mut args: Vec<String> = vec!["fanout".into()];
    args.extend(common(&cluster, &report));
    args.extend(
        [
            "--http",
            &format!("http://{}", cluster.addr(0)),
            "--api-key",
            API_KEY,
            "--subscribers",
            "20",
            "--rate",
            "50",
            "--channel",
            "chat:smoke",
        ]
        .map(str::to_owned),
    );
    let fanout = rtload(args, &report).await;
    assert_eq!(fanout["lost"]["total"], 0, "{fanout}");
    let delivery = &fanout["delivery"];
    assert_eq!(delivery["delivered"], delivery["expected"], "{fanout}");
    assert!(
        delivery["delivered"].as_u64().is_some_and(|n| n >= 20 * 50),
        "{fanout}"
    );

    let report = dir.join("ping.json");
    let mut args: Vec<String> = vec!["ping".into()];
    args.extend(common(&cluster, &report));
    args.extend(["--connections", "10", "--rate-per-conn", "5"].map(str::to_owned));
    let ping = rtload(args, &report).await;
    assert_eq!(ping["calls"]["failed"], 0, "{ping}");
    assert!(
        ping["calls"]["ok"].as_u64().is_some_and(|n| n >= 50),
        "{ping}"
    );

    let report = dir.join("rpc.json");
    let mut args: Vec<String> = vec!["rpc".into()];
    args.extend(common(&cluster, &report));
    args.extend(
        [
            "--method",
            "stats.summarize",
            "--data",
            r#"{"values": [1, 2, 3, 4], "chunk": 2}"#,
            "--rate",
            "10",
            "--connections",
            "2",
        ]
        .map(str::to_owned),
    );
    let rpc = rtload(args, &report).await;
    assert_eq!(rpc["calls"]["failed"], 0, "{rpc}");
    assert!(
        rpc["parts"]["pushes"].as_u64().is_some_and(|n| n > 0),
        "partial results counted: {rpc}"
    );

    // Memory is measured, not asserted: only that every connection came up and a
    // per-connection figure was computed (from the gateway's /metrics, next to --url).
    let report = dir.join("idle.json");
    let mut args: Vec<String> = vec!["idle".into()];
    args.extend(common(&cluster, &report));
    args.extend(["--connections", "20", "--hold", "2s", "--settle", "1s"].map(str::to_owned));
    let idle = rtload(args, &report).await;
    assert_eq!(idle["connections"]["established"], 20, "{idle}");
    assert_eq!(idle["connections"]["closed_early"], 0, "{idle}");
    assert!(
        idle["memory"]["per_connection_kib"].is_f64(),
        "per-connection memory reported: {idle}"
    );
    println!("idle report: {idle}");
}

fn tempfile_dir() -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("rtload-smoke-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}
