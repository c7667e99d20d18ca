//! Keeps the load generator from rotting: each scenario runs for a second or
//! two, with a handful of connections, against the real services (started
//! in-process by the test harness on a private nats-server), and must report
//! everything delivered and answered.

#![allow(
    clippy::expect_used,
    reason = "test code: a failed expectation is a failed test"
)]

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

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

/// Runs scenario `name` against the cluster's first gateway with the short
/// common settings and `extra` flags; returns its JSON report (`report` in `dir`).
async fn scenario(
    cluster: &TestCluster,
    dir: &Path,
    name: &str,
    report: &str,
    extra: &[&str],
) -> Value {
    let report = dir.join(report);
    let mut args = vec![name.to_owned()];
    args.extend(common(cluster, &report));
    args.extend(extra.iter().map(|a| (*a).to_owned()));
    rtload(args, &report).await
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

    let fanout = scenario(
        &cluster,
        &dir,
        "fanout",
        "fanout.json",
        &[
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
        ],
    )
    .await;
    assert_eq!(fanout["lost"]["total"], 0, "{fanout}");
    let delivery = &fanout["delivery"];
    assert_eq!(delivery["delivered"], delivery["expected"], "{fanout}");
    assert!(
        delivery["delivered"].as_u64().is_some_and(|n| n >= 20 * 50),
        "{fanout}"
    );

    let ping = scenario(
        &cluster,
        &dir,
        "ping",
        "ping.json",
        &["--connections", "10", "--rate-per-conn", "5"],
    )
    .await;
    assert_eq!(ping["calls"]["failed"], 0, "{ping}");
    assert!(
        ping["calls"]["ok"].as_u64().is_some_and(|n| n >= 50),
        "{ping}"
    );

    let rpc = scenario(
        &cluster,
        &dir,
        "rpc",
        "rpc.json",
        &[
            "--method",
            "stats.summarize",
            "--data",
            r#"{"values": [1, 2, 3, 4], "chunk": 2}"#,
            "--rate",
            "10",
            "--connections",
            "2",
        ],
    )
    .await;
    assert_eq!(rpc["calls"]["failed"], 0, "{rpc}");
    assert!(
        rpc["parts"]["pushes"].as_u64().is_some_and(|n| n > 0),
        "partial results counted: {rpc}"
    );

    // Memory is measured, not asserted: only that every connection came up and a
    // per-connection figure was computed (from the gateway's /metrics, next to --url).
    let idle = scenario(
        &cluster,
        &dir,
        "idle",
        "idle.json",
        &["--connections", "20", "--hold", "2s", "--settle", "1s"],
    )
    .await;
    assert_eq!(idle["connections"]["established"], 20, "{idle}");
    assert_eq!(idle["connections"]["closed_early"], 0, "{idle}");
    assert!(
        idle["memory"]["per_connection_kib"].is_f64(),
        "per-connection memory reported: {idle}"
    );
    println!("idle report: {idle}");
}

/// Chat rooms (every member publishing on its own connection and receiving its whole
/// room) and a backend publishing over HTTP (open loop with subscribers, then a closed
/// loop): everything acknowledged, everything delivered, nothing lost, no errors.
#[actix_rt::test]
async fn chat_and_http_publish_scenarios_run_against_the_real_services() {
    let cluster = TestCluster::start().await;
    let dir = tempfile_dir();
    let http = format!("http://{}", cluster.addr(0));

    let chat = scenario(
        &cluster,
        &dir,
        "chat",
        "chat.json",
        &[
            "--rooms",
            "3",
            "--members",
            "4",
            "--rate-per-member",
            "5",
            "--prefix",
            "chat:smoke-room-",
        ],
    )
    .await;
    assert_eq!(chat["connections"]["established"], 12, "{chat}");
    assert_eq!(chat["publish"]["failed"], 0, "{chat}");
    assert_eq!(chat["unsent"]["member_gone"], 0, "{chat}");
    assert_eq!(chat["lost"]["total"], 0, "{chat}");
    assert_eq!(chat["errors"]["total"], 0, "{chat}");
    let delivery = &chat["delivery"];
    assert_eq!(delivery["delivered"], delivery["expected"], "{chat}");
    // 60 messages/s for 2 s, each to the 4 members of its room.
    assert!(
        chat["publish"]["acked"].as_u64().is_some_and(|n| n >= 100),
        "{chat}"
    );
    assert!(
        delivery["expected"].as_u64().is_some_and(|n| n >= 4 * 100),
        "{chat}"
    );
    assert!(chat["latency_ms"]["p99_ms"].is_f64(), "{chat}");
    assert!(chat["publish"]["ack_ms"]["p99_ms"].is_f64(), "{chat}");

    let hp = scenario(
        &cluster,
        &dir,
        "http-publish",
        "http-publish.json",
        &[
            "--http",
            &http,
            "--api-key",
            API_KEY,
            "--channels",
            "3",
            "--prefix",
            "chat:smoke-http-",
            "--rate",
            "60",
            "--http-connections",
            "2",
            "--subscribers-per-channel",
            "2",
        ],
    )
    .await;
    assert_eq!(hp["publish"]["failed"], 0, "{hp}");
    assert_eq!(hp["errors"]["total"], 0, "{hp}");
    assert!(
        hp["responses"]["ok"].as_u64().is_some_and(|n| n >= 100),
        "{hp}"
    );
    let subscribers = &hp["subscribers"];
    assert_eq!(subscribers["connections"]["established"], 6, "{hp}");
    assert_eq!(subscribers["lost"]["total"], 0, "{hp}");
    let delivery = &subscribers["delivery"];
    assert_eq!(delivery["delivered"], delivery["expected"], "{hp}");
    assert!(
        delivery["expected"].as_u64().is_some_and(|n| n >= 2 * 100),
        "{hp}"
    );

    // Closed loop: as fast as 4 requests in flight go, no subscribers.
    let closed = scenario(
        &cluster,
        &dir,
        "http-publish",
        "http-publish-closed.json",
        &[
            "--http",
            &http,
            "--api-key",
            API_KEY,
            "--rate",
            "0",
            "--concurrency",
            "4",
            "--prefix",
            "chat:smoke-closed-",
        ],
    )
    .await;
    assert_eq!(closed["publish"]["failed"], 0, "{closed}");
    assert_eq!(closed["errors"]["total"], 0, "{closed}");
    assert!(
        closed["publish"]["acked"].as_u64().is_some_and(|n| n > 0),
        "{closed}"
    );
    assert_eq!(closed["config"]["concurrency"], 4, "{closed}");
    println!("chat report: {chat}\nhttp-publish report: {hp}\nclosed loop: {closed}");
}

/// `rtload storm` in miniature: 20 clients on `url` (2 channels), 5 pinging `ping_url`
/// 5/s each, 40 publications/s, then `more`.
fn storm_args(url: &str, ping_url: &str, report: &Path, more: &[&str]) -> Vec<String> {
    let report = report.display().to_string();
    let common = [
        "storm",
        "--url",
        url,
        "--ping-url",
        ping_url,
        "--api-key",
        API_KEY,
        "--clients",
        "20",
        "--channels",
        "2",
        "--ping-clients",
        "5",
        "--ping-rate-per-conn",
        "5",
        "--rate",
        "40",
        "--warmup",
        "0s",
        "--drain",
        "1s",
        "--recovery-timeout",
        "15s",
        "--json-out",
        &report,
    ];
    common.iter().chain(more).map(|s| s.to_string()).collect()
}

/// The reconnect storm in miniature: 20 clients on gateway A (2 channels), 5 pinging
/// gateway B, a publisher through B, admission control tight enough to refuse some
/// connects. Once rtload says READY, A is stopped abruptly (a crash, in-process) and a new
/// gateway is started on the same address; every client must come back (after 4007s),
/// resume, and recover its channel: nothing lost, nothing twice.
#[actix_rt::test]
async fn storm_clients_recover_everything_after_a_gateway_restart() {
    let mut cluster = TestCluster::start_with(2, |config| {
        config.gateway.connect_rate = 10;
        config.gateway.connect_burst = 5;
        config.gateway.admission_retry_after_ms = 100;
    })
    .await;
    let (a, b) = (cluster.addr(0), cluster.addr(1));
    let report = tempfile_dir().join("storm.json");
    let args = storm_args(
        &format!("ws://{a}/ws"),
        &format!("ws://{b}/ws"),
        &report,
        &["--wait-storm", "20s"],
    );
    let mut child = Command::new(env!("CARGO_BIN_EXE_rtload"))
        .args(&args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("rtload starts");
    // Progress goes to stderr; READY says every client is up and the load is running.
    let stderr = child.stderr.take().expect("stderr piped");
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    let reader = std::thread::spawn(move || {
        let mut ready = Some(ready_tx);
        let mut log = String::new();
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if line.starts_with("READY")
                && let Some(tx) = ready.take()
            {
                let _ = tx.send(());
            }
            log.push_str(&line);
            log.push('\n');
        }
        log
    });
    let ready = tokio::time::timeout(Duration::from_secs(30), ready_rx).await;
    assert!(matches!(ready, Ok(Ok(()))), "rtload never said READY");
    actix_rt::time::sleep(Duration::from_millis(1500)).await;

    // The crash, and the restart on the same address.
    cluster.gateways.remove(0).stop().await;
    actix_rt::time::sleep(Duration::from_millis(300)).await;
    cluster.gateway_on(a).await;

    let output = actix_rt::task::spawn_blocking(move || child.wait_with_output())
        .await
        .expect("wait task")
        .expect("rtload ends");
    let log = reader.join().expect("stderr reader");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "rtload failed: {stdout}\n{log}");
    let storm: Value =
        serde_json::from_str(&std::fs::read_to_string(&report).expect("report written"))
            .expect("report is JSON");
    let s = &storm["storm"];
    assert_eq!(s["happened"], true, "{stdout}\n{log}");
    assert_eq!(s["clients_disconnected"], 20, "{stdout}");
    assert_eq!(s["all_recovered"], true, "{stdout}\n{log}");
    assert_eq!(s["resumed"], 20, "sessions resumed: {stdout}");
    assert!(
        s["refused_4007"].as_u64().is_some_and(|n| n > 0),
        "admission refused some reconnects, which were retried: {stdout}"
    );
    assert!(
        s["setup_refused_4007"].as_u64().is_some_and(|n| n > 0),
        "and some first connects: {stdout}"
    );
    let d = &storm["delivery"];
    assert_eq!(d["clients_checked"], 20, "{stdout}");
    assert_eq!(d["lost"], 0, "{stdout}");
    assert_eq!(d["duplicates"], 0, "{stdout}");
    assert!(
        d["recovered"].as_u64().is_some_and(|n| n > 0),
        "publications made while A was down came back by recovery: {stdout}"
    );
    assert!(
        storm["publish"]["acked"].as_u64().is_some_and(|n| n > 40),
        "{stdout}"
    );
    let ping = &storm["ping"];
    assert_eq!(ping["connection_lost"], 0, "{stdout}");
    assert!(
        ping["before_ms"]["count"].as_u64().is_some_and(|n| n > 0),
        "{stdout}"
    );
    assert!(
        ping["during_ms"]["count"].as_u64().is_some_and(|n| n > 0),
        "{stdout}"
    );
    println!("storm report:\n{stdout}");
}

/// The storm rtload makes itself (`--drop-after`, what bench/compare/run uses against
/// both systems): every client drops its socket at once while the one gateway stays up,
/// pings and publications go on through it, and every client comes back and recovers.
#[actix_rt::test]
async fn storm_clients_recover_everything_after_rtload_drops_their_sockets() {
    let cluster = TestCluster::start().await;
    let a = cluster.addr(0);
    let report = tempfile_dir().join("storm-drop.json");
    let args = storm_args(
        &format!("ws://{a}/ws"),
        &format!("ws://{a}/ws"),
        &report,
        &[
            "--publish-url",
            &format!("http://{a}"),
            "--drop-after",
            "1s",
            "--wait-storm",
            "10s",
        ],
    );
    let storm = rtload(args, &report).await;
    let s = &storm["storm"];
    assert_eq!(s["happened"], true, "{storm}");
    assert_eq!(s["clients_disconnected"], 20, "{storm}");
    assert_eq!(s["disconnects"]["dropped by rtload"], 20, "{storm}");
    assert_eq!(s["all_recovered"], true, "{storm}");
    assert_eq!(s["outages"], 20, "one drop each, nothing else: {storm}");
    assert_eq!(s["resumed"], 20, "sessions resumed: {storm}");
    assert_eq!(storm["config"]["drop_after_s"], 1.0, "{storm}");
    let d = &storm["delivery"];
    assert_eq!(d["clients_checked"], 20, "{storm}");
    assert_eq!(d["lost"], 0, "{storm}");
    assert_eq!(d["duplicates"], 0, "{storm}");
    assert!(
        storm["publish"]["acked"].as_u64().is_some_and(|n| n > 40),
        "{storm}"
    );
    assert_eq!(storm["ping"]["connection_lost"], 0, "{storm}");
    assert!(
        storm["ping"]["during_ms"]["count"]
            .as_u64()
            .is_some_and(|n| n > 0),
        "{storm}"
    );
}

fn tempfile_dir() -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("rtload-smoke-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

#[actix_rt::test]
async fn floor_reads_every_frame_it_writes_and_reports_percentiles() {
    let dir = tempfile_dir();
    let report = dir.join("floor.json");
    let args = [
        "floor",
        "--sockets",
        "50",
        "--writers",
        "2",
        "--rate",
        "20",
        "--duration",
        "1s",
        "--warmup",
        "200ms",
        "--json-out",
    ]
    .iter()
    .map(|a| (*a).to_owned())
    .chain([report.display().to_string()])
    .collect();
    let floor = rtload(args, &report).await;
    assert_eq!(floor["frames_read"], 50 * 20, "{floor}");
    assert_eq!(floor["frames_expected"], floor["frames_read"], "{floor}");
    assert_eq!(floor["socket_errors"], 0, "{floor}");
    assert_eq!(floor["latency_ms"]["count"], 50 * 20, "{floor}");
    assert_eq!(
        floor["round_ms"]["count"],
        2 * 20,
        "one per writer per round: {floor}"
    );
}
