//! Failures on the publication path. History lives in JetStream, so a
//! broadcast instance killed mid-stream, a nats-server restart or several
//! broadcast instances handing partitions over lose no acknowledged
//! publication, keep each channel's offsets consecutive and keep its epoch.
//!
//! The publishers here are backend services on NATS that retry every
//! unacknowledged publish with its idempotency key until it is acknowledged;
//! the subscribers are WebSocket clients that record what arrives live and,
//! at the end (or when told with `unsubscribed`), resubscribe with `since`
//! to recover what they missed. Each ends with exactly the acknowledged
//! publications, in order, once.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use rt_proto::ChannelName;
use rt_shared::config::{Config, HistoryStore, NamespaceConfig};
use serde_json::{Value, json};
use tokio::sync::watch;

use crate::*;
use rt_tests::presence::{client_ids, joined, presence_push};
use rt_tests::process::{self, ServiceProcess};

/// A namespace whose history holds every publication of these tests.
fn history_namespace(config: &mut Config) {
    config.namespaces.insert(
        "hist".into(),
        NamespaceConfig {
            history_size: 10_000,
            history_ttl_secs: 600,
            ..Default::default()
        },
    );
}

fn decode(payload: &[u8]) -> Value {
    rt_proto::value::to_json_lossy(&rt_proto::value::decode_one(payload).expect("msgpack reply"))
}

/// Where each publication `i` of a channel was acknowledged: (offset, epoch).
type Acks = BTreeMap<usize, (u64, String)>;

/// Publishes `{"i": i}` for `i` in `0..count` to `channel` over NATS with
/// `lanes` concurrent publishers (lane `l` sends `l`, `l + lanes`, …, each
/// after the previous one's ack), every publish with idempotency key `k<i>`
/// and retried until acknowledged.
async fn publish_all(
    nats: async_nats::Client,
    channel: String,
    count: usize,
    lanes: usize,
    acked: Arc<AtomicUsize>,
) -> Acks {
    let mut tasks = Vec::new();
    for lane in 0..lanes {
        let (nats, channel, acked) = (nats.clone(), channel.clone(), acked.clone());
        tasks.push(tokio::spawn(async move {
            let mut acks = Acks::new();
            for i in (lane..count).step_by(lanes) {
                let body = rt_proto::value::encode(&rmpv::Value::Map(vec![(
                    rmpv::Value::from("i"),
                    rmpv::Value::from(i as u64),
                )]));
                let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
                loop {
                    assert!(
                        tokio::time::Instant::now() < deadline,
                        "publication {i} of {channel} never acknowledged"
                    );
                    let mut headers = async_nats::HeaderMap::new();
                    headers.insert("Rt-Idempotency-Key", format!("k{i}").as_str());
                    let request = async_nats::Request::new()
                        .payload(body.clone().into())
                        .headers(headers)
                        .timeout(Some(Duration::from_millis(1_500)));
                    let reply = nats
                        .send_request(format!("rt.publish.{channel}"), request)
                        .await;
                    if let Ok(reply) = reply {
                        let ack = decode(&reply.payload);
                        if let (Some(offset), Some(epoch)) =
                            (ack["offset"].as_u64(), ack["epoch"].as_str())
                        {
                            acks.insert(i, (offset, epoch.to_owned()));
                            acked.fetch_add(1, Ordering::Relaxed);
                            break;
                        }
                        // An error (113 while the channel moves): retry.
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
            acks
        }));
    }
    let mut acks = Acks::new();
    for task in tasks {
        acks.extend(task.await.expect("publisher lane"));
    }
    acks
}

/// What a subscriber ended with.
struct Seen {
    /// Every publication it got, live or recovered, by offset: its `i`.
    pubs: BTreeMap<u64, u64>,
    /// Live pushes of an offset it had already received live.
    duplicates: usize,
    /// The epoch of its first subscribe and of its last.
    epochs: (String, String),
}

/// Subscribes `client` to `channel` and records what arrives until `target`
/// says the newest acknowledged offset, then resubscribes with `since` to
/// recover whatever it missed.
async fn follow(client: WsClient, channel: String, target: watch::Receiver<Option<u64>>) -> Seen {
    follow_with(client, channel, target, None).await
}

/// A new connection to `url`, retried every 50 ms for up to 30 s.
async fn reconnect(url: &str, encoding: WsEncoding) -> WsClient {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(client) = WsClient::try_connected(url, encoding).await {
            return client;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no connection to {url} within 30 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// [`follow`]; with `reconnect_url`, when the socket ends (its gateway
/// died) it connects again there (retrying while it is down) and
/// resubscribes with `since`, as a client SDK does.
async fn follow_with(
    mut client: WsClient,
    channel: String,
    mut target: watch::Receiver<Option<u64>>,
    reconnect_url: Option<String>,
) -> Seen {
    let reply = client
        .command("subscribe", json!({"channel": channel}))
        .await;
    let first_epoch = reply["ok"]["epoch"].as_str().expect("epoch").to_owned();
    let mut seen = Seen {
        pubs: BTreeMap::new(),
        duplicates: 0,
        epochs: (first_epoch.clone(), first_epoch.clone()),
    };
    let mut live = HashSet::new();
    let mut record = |seen: &mut Seen, p: &Value, is_live: bool| {
        let offset = p["offset"].as_u64().expect("offset");
        let i = p["data"]["i"].as_u64().expect("data.i");
        if is_live && !live.insert(offset) {
            seen.duplicates += 1;
        }
        if let Some(previous) = seen.pubs.insert(offset, i) {
            assert_eq!(
                previous, i,
                "{channel}: offset {offset} carried two publications"
            );
        }
    };
    let contiguous = |seen: &Seen| {
        let mut last = 0;
        while seen.pubs.contains_key(&(last + 1)) {
            last += 1;
        }
        last
    };
    let mut epoch = first_epoch;
    loop {
        let goal = *target.borrow();
        let mut fresh_connection = false;
        let resubscribe = match goal {
            Some(goal) if contiguous(&seen) >= goal => break,
            // Publishing is over: recover what is missing.
            Some(_) => true,
            None => {
                tokio::select! {
                    message = client.next_message_or_end() => match message {
                        Some(message) => {
                            if message["push"] == json!("pub") {
                                record(&mut seen, &message, true);
                            } else if message["push"] == json!("disconnect") && reconnect_url.is_none() {
                                panic!("{channel}: disconnected: {message}");
                            }
                            message["push"] == json!("unsubscribed")
                        }
                        None => {
                            let url = reconnect_url
                                .as_deref()
                                .unwrap_or_else(|| panic!("{channel}: the socket ended"));
                            client = reconnect(url, client.encoding).await;
                            fresh_connection = true;
                            true
                        }
                    },
                    _ = target.changed() => false,
                }
            }
        };
        if resubscribe {
            if !fresh_connection {
                client
                    .command("unsubscribe", json!({"channel": channel}))
                    .await;
            }
            let since = json!({"offset": contiguous(&seen), "epoch": epoch});
            let reply = client
                .command("subscribe", json!({"channel": channel, "since": since}))
                .await;
            assert_eq!(reply["ok"]["recovered"], json!(true), "{channel}: {reply}");
            epoch = reply["ok"]["epoch"].as_str().expect("epoch").to_owned();
            for p in reply["ok"]["pubs"].as_array().expect("pubs") {
                record(&mut seen, p, false);
            }
        }
    }
    seen.epochs.1 = epoch;
    seen
}

/// Every acknowledged publication exactly once, in offset order from 1, with
/// no other publication, no duplicate delivery and one epoch throughout.
fn check(channel: &str, count: usize, acks: &Acks, seen: &Seen) {
    assert_eq!(
        acks.len(),
        count,
        "{channel}: every publication acknowledged"
    );
    let epochs: HashSet<&String> = acks.values().map(|(_, e)| e).collect();
    assert_eq!(
        epochs.len(),
        1,
        "{channel}: one epoch in the acks: {epochs:?}"
    );
    assert_eq!(
        seen.epochs.0, seen.epochs.1,
        "{channel}: the epoch never changed"
    );
    assert!(
        epochs.contains(&seen.epochs.0),
        "{channel}: acks in the subscriber's epoch"
    );
    let offsets: Vec<u64> = seen.pubs.keys().copied().collect();
    let expected: Vec<u64> = (1..=count as u64).collect();
    assert_eq!(
        offsets, expected,
        "{channel}: offsets 1..={count}, no gap, nothing else"
    );
    for (i, (offset, _)) in acks {
        assert_eq!(
            seen.pubs.get(offset),
            Some(&(*i as u64)),
            "{channel}: publication {i} at its acknowledged offset {offset}"
        );
    }
    assert_eq!(
        seen.duplicates, 0,
        "{channel}: no publication delivered twice"
    );
}

/// What goes wrong in the middle of a stream.
enum Disruption<'a> {
    /// `kill -9` of a service process; with `restart`, the same binary and
    /// settings start again (a supervisor's restart).
    KillProcess {
        process: &'a mut ServiceProcess,
        restart: bool,
    },
    /// The broadcast instance dies and a new process starts.
    RestartBroadcast,
    /// The broadcast instance dies; another one is running already.
    KillBroadcast,
    /// nats-server dies and comes back with its JetStream store half a second later.
    RestartNats,
}

async fn disrupt(cluster: &mut TestCluster, disruption: Disruption<'_>) {
    match disruption {
        Disruption::KillProcess { process, restart } => {
            process.kill();
            if restart {
                process.restart().await;
            }
        }
        Disruption::RestartBroadcast => restart_broadcast(cluster, true).await,
        Disruption::KillBroadcast => {
            cluster
                .broadcast
                .take()
                .expect("a broadcast runs")
                .kill()
                .await;
        }
        Disruption::RestartNats => {
            cluster.nats.kill();
            tokio::time::sleep(Duration::from_millis(1_000)).await;
            cluster.nats.restart();
        }
    }
}

/// Runs publishers and two subscribers (one per encoding) on `channel`,
/// disrupting once `disrupt_after` publications are acknowledged.
async fn stream_through(
    cluster: &mut TestCluster,
    channel: &str,
    count: usize,
    disrupt_after: usize,
    disruption: Disruption<'_>,
) {
    let mut subscribers = Vec::new();
    for encoding in WsEncoding::BOTH {
        subscribers.push((cluster.client(0, encoding).await, None));
    }
    stream_to(
        cluster,
        channel,
        count,
        disrupt_after,
        disruption,
        subscribers,
    )
    .await;
}

/// [`stream_through`] with the caller's subscribers: each a connected
/// client and, for one that should survive its socket, where to reconnect.
async fn stream_to(
    cluster: &mut TestCluster,
    channel: &str,
    count: usize,
    disrupt_after: usize,
    disruption: Disruption<'_>,
    subscribers: Vec<(WsClient, Option<String>)>,
) {
    let (target_tx, target_rx) = watch::channel(None);
    let mut followers = Vec::new();
    for (client, reconnect_url) in subscribers {
        followers.push(actix_rt::spawn(follow_with(
            client,
            channel.to_owned(),
            target_rx.clone(),
            reconnect_url,
        )));
    }
    // Let the subscriptions settle before the first publication.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let acked = Arc::new(AtomicUsize::new(0));
    let publisher = tokio::spawn(publish_all(
        cluster.nats_client().await,
        channel.to_owned(),
        count,
        8,
        acked.clone(),
    ));
    eventually(
        "publications before the disruption",
        Duration::from_secs(30),
        || {
            let acked = acked.clone();
            async move { (acked.load(Ordering::Relaxed) >= disrupt_after).then_some(()) }
        },
    )
    .await;
    disrupt(cluster, disruption).await;
    let acks = within(
        "every publication acknowledged",
        Duration::from_secs(90),
        publisher,
    )
    .await
    .expect("publisher");
    let newest = acks.values().map(|(offset, _)| *offset).max().unwrap_or(0);
    target_tx.send(Some(newest)).expect("followers listen");
    for follower in followers {
        let seen = within(
            "the subscriber catches up",
            Duration::from_secs(30),
            follower,
        )
        .await
        .expect("follower");
        check(channel, count, &acks, &seen);
    }
}

async fn restart_broadcast(cluster: &mut TestCluster, abruptly: bool) {
    let broadcast = cluster.broadcast.take().expect("a broadcast runs");
    if abruptly {
        broadcast.kill().await;
    } else {
        broadcast.stop().await;
    }
    let broadcast = rt_broadcast::run(cluster.config.clone())
        .await
        .expect("broadcast starts again");
    cluster.broadcast = Some(broadcast);
}

#[actix_rt::test]
async fn killing_broadcast_mid_stream_loses_no_acknowledged_publication() {
    let mut cluster = TestCluster::start_with(1, |c| {
        history_namespace(c);
        // A stable name, as a StatefulSet gives: the new process takes the
        // dead one's partitions back at once instead of waiting for the leases.
        c.broadcast.instance_id = "b-crash".into();
    })
    .await;
    stream_through(
        &mut cluster,
        "hist:crash",
        3_000,
        800,
        Disruption::RestartBroadcast,
    )
    .await;
}

#[actix_rt::test]
async fn restarting_nats_server_mid_stream_loses_no_acknowledged_publication() {
    let mut cluster = TestCluster::start_with(1, |c| {
        history_namespace(c);
        // Writes caught by the outage time out (and resync) rather than
        // waiting for the reconnection.
        c.broadcast.history_timeout_ms = 400;
    })
    .await;
    stream_through(
        &mut cluster,
        "hist:nats",
        3_000,
        800,
        Disruption::RestartNats,
    )
    .await;
    // The outage made writes fail and the channel resync (not just wait).
    let ops = cluster.broadcast.as_ref().expect("broadcast").ops_addr();
    let metrics = rt_tests::http::get(ops, "/metrics", &[]).await.text();
    let resynced = metrics
        .lines()
        .any(|l| l.starts_with("rt_broadcast_resyncs_total{") && !l.ends_with(" 0"));
    let failed = metrics
        .lines()
        .any(|l| l.starts_with("rt_broadcast_store_writes_total{result=\"failed\"}"));
    assert_eq!(
        resynced, failed,
        "a failed write leads to a resync:\n{metrics}"
    );
}

#[actix_rt::test]
async fn a_restarted_broadcast_continues_offsets_epochs_and_idempotency() {
    let mut cluster = TestCluster::start_with(1, |c| {
        history_namespace(c);
        c.broadcast.instance_id = "b-restart".into();
    })
    .await;
    let mut publisher = cluster.client(0, WsEncoding::Json).await;
    let mut epoch = None;
    for n in 1..=5u64 {
        let ack = publisher
            .command(
                "publish",
                json!({"channel": "hist:r", "data": n, "idempotency_key": format!("k{n}")}),
            )
            .await;
        assert_eq!(ack["ok"]["offset"], json!(n), "{ack}");
        epoch = Some(ack["ok"]["epoch"].clone());
    }
    let epoch = epoch.expect("epoch");
    for abruptly in [false, true] {
        restart_broadcast(&mut cluster, abruptly).await;
        let mut sub = cluster.client(0, WsEncoding::MsgPack).await;
        let reply = sub
            .command(
                "subscribe",
                json!({"channel": "hist:r", "since": {"offset": 2, "epoch": epoch}}),
            )
            .await;
        assert_eq!(
            reply["ok"]["epoch"], epoch,
            "the same epoch after a restart: {reply}"
        );
        assert_eq!(reply["ok"]["recovered"], json!(true), "{reply}");
        let pubs = reply["ok"]["pubs"].as_array().expect("pubs");
        let data: Vec<&Value> = pubs.iter().map(|p| &p["data"]).collect();
        let newest = reply["ok"]["offset"].as_u64().expect("offset");
        assert_eq!(data.len() as u64, newest - 2, "{reply}");
        // An idempotency key from before the restart still answers with its
        // first position, and sequences nothing.
        let again = publisher
            .command(
                "publish",
                json!({"channel": "hist:r", "data": "again", "idempotency_key": "k3"}),
            )
            .await;
        assert_eq!(again["ok"], json!({"offset": 3, "epoch": epoch}), "{again}");
        let next = publisher
            .command("publish", json!({"channel": "hist:r", "data": "next"}))
            .await;
        assert_eq!(next["ok"], json!({"offset": newest + 1, "epoch": epoch}));
        assert_eq!(sub.next_push("pub").await["offset"], json!(newest + 1));
    }
}

#[actix_rt::test]
async fn the_epoch_changes_only_when_the_history_is_gone() {
    let mut cluster = TestCluster::start_with(1, |c| {
        c.namespaces.insert(
            "brief".into(),
            NamespaceConfig {
                history_size: 10,
                history_ttl_secs: 1,
                ..Default::default()
            },
        );
        c.broadcast.instance_id = "b-brief".into();
    })
    .await;
    let mut client = cluster.client(0, WsEncoding::Json).await;
    let first = client
        .command("publish", json!({"channel": "brief:x", "data": 1}))
        .await;
    let epoch = first["ok"]["epoch"].clone();
    restart_broadcast(&mut cluster, true).await;
    let ack = client
        .command("publish", json!({"channel": "brief:x", "data": 2}))
        .await;
    assert_eq!(
        ack["ok"],
        json!({"offset": 2, "epoch": epoch}),
        "kept while stored: {ack}"
    );
    // Everything expires from the record (and from memory) after a second.
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    restart_broadcast(&mut cluster, true).await;
    let reply = client
        .command(
            "subscribe",
            json!({"channel": "brief:x", "since": {"offset": 2, "epoch": epoch}}),
        )
        .await;
    assert_eq!(reply["ok"]["recovered"], json!(false), "{reply}");
    assert_eq!(reply["ok"]["offset"], json!(0), "{reply}");
    assert_ne!(
        reply["ok"]["epoch"], epoch,
        "nothing stored left: a new epoch"
    );
}

#[actix_rt::test]
async fn history_beyond_the_memory_window_comes_from_jetstream() {
    let mut cluster = TestCluster::start_with(1, |c| {
        history_namespace(c);
        c.broadcast.memory_window = 5;
    })
    .await;
    let nats = cluster.nats_client().await;
    let acks = publish_all(nats, "hist:deep".into(), 50, 1, Arc::default()).await;
    let epoch = acks[&0].1.clone();
    let mut client = cluster.client(0, WsEncoding::Json).await;
    for _ in 0..2 {
        let reply = client
            .command(
                "history",
                json!({"channel": "hist:deep", "since": {"offset": 10, "epoch": epoch}, "limit": 100}),
            )
            .await;
        let offsets: Vec<u64> = reply["ok"]["pubs"]
            .as_array()
            .expect("pubs")
            .iter()
            .map(|p| p["offset"].as_u64().expect("offset"))
            .collect();
        assert_eq!(offsets, (11..=50).collect::<Vec<u64>>(), "{reply}");
        let newest = client
            .command(
                "history",
                json!({"channel": "hist:deep", "limit": 20, "reverse": true}),
            )
            .await;
        let first = &newest["ok"]["pubs"][0];
        assert_eq!(first["offset"], json!(50));
        assert_eq!(newest["ok"]["pubs"].as_array().map(Vec::len), Some(20));
        let recovered = client
            .command(
                "subscribe",
                json!({"channel": "hist:deep", "since": {"offset": 1, "epoch": epoch}}),
            )
            .await;
        assert_eq!(recovered["ok"]["recovered"], json!(true));
        assert_eq!(recovered["ok"]["pubs"].as_array().map(Vec::len), Some(49));
        client
            .command("unsubscribe", json!({"channel": "hist:deep"}))
            .await;
        // After a restart the record serves it all again.
        restart_broadcast(&mut cluster, false).await;
    }
}

#[actix_rt::test]
async fn memory_history_still_works_and_starts_a_new_epoch_on_restart() {
    let mut cluster =
        TestCluster::start_with(1, |c| c.broadcast.history_store = HistoryStore::Memory).await;
    let mut client = cluster.client(0, WsEncoding::Json).await;
    let ack = client
        .command("publish", json!({"channel": "chat:m", "data": 1}))
        .await;
    let epoch = ack["ok"]["epoch"].clone();
    let history = client
        .command("history", json!({"channel": "chat:m"}))
        .await;
    assert_eq!(history["ok"]["pubs"].as_array().map(Vec::len), Some(1));
    restart_broadcast(&mut cluster, false).await;
    let ack = client
        .command("publish", json!({"channel": "chat:m", "data": 2}))
        .await;
    assert_eq!(
        ack["ok"]["offset"],
        json!(1),
        "memory history is gone: {ack}"
    );
    assert_ne!(ack["ok"]["epoch"], epoch);
}

/// Channels `prefix0`, `prefix1`, … until `count` of them are owned by
/// `owner` (and as many by someone else).
fn channels_split(cluster: &TestCluster, prefix: &str, per_side: usize) -> Vec<String> {
    let b = cluster.broadcast.as_ref().expect("broadcast");
    let (mut mine, mut theirs) = (Vec::new(), Vec::new());
    for n in 0.. {
        let name = format!("{prefix}{n}");
        let channel = ChannelName::parse(&name).expect("channel");
        if b.owns(&channel) {
            if mine.len() < per_side {
                mine.push(name);
            }
        } else if theirs.len() < per_side {
            theirs.push(name);
        }
        if mine.len() == per_side && theirs.len() == per_side {
            break;
        }
    }
    mine.extend(theirs);
    mine
}

#[actix_rt::test]
async fn two_instances_share_the_partitions_and_keep_every_channel_in_order() {
    let cluster = TestCluster::start_with(1, |c| {
        history_namespace(c);
        c.broadcast.lease_ttl_ms = 1_000;
    })
    .await;
    assert_eq!(cluster.broadcast.as_ref().map(|b| b.partitions()), Some(64));
    // A second instance joins while publications flow: the first gives it
    // half of the partitions, gracefully.
    let channels: Vec<String> = (0..6).map(|n| format!("hist:share{n}")).collect();
    let (target_tx, target_rx) = watch::channel(None);
    let mut followers = Vec::new();
    for channel in &channels {
        let client = cluster.client(0, WsEncoding::MsgPack).await;
        followers.push((
            channel.clone(),
            actix_rt::spawn(follow(client, channel.clone(), target_rx.clone())),
        ));
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let acked = Arc::new(AtomicUsize::new(0));
    let mut publishers = Vec::new();
    for channel in &channels {
        publishers.push((
            channel.clone(),
            tokio::spawn(publish_all(
                cluster.nats_client().await,
                channel.clone(),
                1_000,
                4,
                acked.clone(),
            )),
        ));
    }
    eventually(
        "a first share of publications",
        Duration::from_secs(30),
        || {
            let acked = acked.clone();
            async move { (acked.load(Ordering::Relaxed) >= 1_000).then_some(()) }
        },
    )
    .await;
    let second = rt_broadcast::run(cluster.config.clone())
        .await
        .expect("a second broadcast starts");
    let first = cluster.broadcast.as_ref().expect("first");
    eventually(
        "partitions shared evenly",
        Duration::from_secs(15),
        || async { (first.partitions() == 32 && second.partitions() == 32).then_some(()) },
    )
    .await;
    let mut acks = HashMap::new();
    for (channel, publisher) in publishers {
        let channel_acks = within("publisher", Duration::from_secs(90), publisher)
            .await
            .expect("publisher");
        acks.insert(channel, channel_acks);
    }
    let newest = acks
        .values()
        .flat_map(|a| a.values().map(|(o, _)| *o))
        .max()
        .unwrap_or(0);
    // Every channel has 1,000: the followers stop at their own channel's end.
    assert_eq!(newest, 1_000);
    target_tx.send(Some(newest)).expect("followers listen");
    for (channel, follower) in followers {
        let seen = within("subscriber", Duration::from_secs(30), follower)
            .await
            .expect("follower");
        check(&channel, 1_000, &acks[&channel], &seen);
    }
    let owned: Vec<bool> = channels
        .iter()
        .map(|c| second.owns(&ChannelName::parse(c).expect("channel")))
        .collect();
    assert!(
        owned.iter().any(|o| *o) || channels.len() < 3,
        "some channels moved to the second instance: {owned:?}"
    );
    second.stop().await;
    eventually(
        "the first takes everything back",
        Duration::from_secs(15),
        || async { (cluster.broadcast.as_ref().map(|b| b.partitions()) == Some(64)).then_some(()) },
    )
    .await;
}

#[actix_rt::test]
async fn when_the_owner_dies_another_instance_takes_its_channels_over() {
    let mut cluster = TestCluster::start_with(1, |c| {
        history_namespace(c);
        c.broadcast.lease_ttl_ms = 1_000;
    })
    .await;
    let survivor = rt_broadcast::run(cluster.config.clone())
        .await
        .expect("a second broadcast starts");
    eventually("partitions shared", Duration::from_secs(15), || async {
        (survivor.partitions() == 32).then_some(())
    })
    .await;
    // A channel the first instance sequences.
    let channel = channels_split(&cluster, "hist:owned", 1).remove(0);
    // The owner dies without a goodbye: its leases expire, the survivor
    // takes the partitions and loads the channel from JetStream.
    stream_through(
        &mut cluster,
        &channel,
        2_000,
        600,
        Disruption::KillBroadcast,
    )
    .await;
    assert_eq!(survivor.partitions(), 64);
    cluster.broadcast = Some(survivor);
}

#[actix_rt::test]
async fn a_stale_writer_cannot_take_an_offset_twice() {
    let cluster = TestCluster::start_with(1, history_namespace).await;
    let channel = "hist:fence";
    let mut client = cluster.client(0, WsEncoding::Json).await;
    let first = client
        .command("publish", json!({"channel": channel, "data": "one"}))
        .await;
    let epoch = first["ok"]["epoch"].as_str().expect("epoch").to_owned();
    // Another sequencer (an instance that lost its lease without knowing it)
    // writes offset 2 straight into the record.
    let stale = rt_proto::internal::Publication {
        channel: channel.into(),
        offset: 2,
        epoch: epoch.clone(),
        ts: 1,
        data: rt_proto::value::encode(&rmpv::Value::from("stale")).into(),
        info: None,
    };
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Nats-Msg-Id", format!("{channel}/{epoch}/2/0").as_str());
    headers.insert("Rt-Offset", "2");
    headers.insert("Rt-Epoch", epoch.as_str());
    headers.insert("Rt-Writer", "elsewhere/1");
    let js = async_nats::jetstream::new(cluster.nats_client().await);
    js.publish_with_headers(
        format!("rt.hist.n.hist.{channel}"),
        headers,
        rt_proto::internal::to_msgpack(&stale)
            .expect("encode")
            .into(),
    )
    .await
    .expect("publish")
    .await
    .expect("stored");
    // This sequencer's write of offset 2 is refused (same Nats-Msg-Id): the
    // publish fails, temporarily, and the channel is loaded again.
    let second = client
        .command("publish", json!({"channel": channel, "data": "two"}))
        .await;
    assert_eq!(second["error"]["code"], json!(113), "{second}");
    assert_eq!(second["error"]["temporary"], json!(true));
    let retried = client
        .command("publish", json!({"channel": channel, "data": "two"}))
        .await;
    assert_eq!(
        retried["ok"],
        json!({"offset": 3, "epoch": epoch}),
        "{retried}"
    );
    let history = client
        .command("history", json!({"channel": channel, "limit": 10}))
        .await;
    let pubs: Vec<(u64, Value)> = history["ok"]["pubs"]
        .as_array()
        .expect("pubs")
        .iter()
        .map(|p| (p["offset"].as_u64().expect("offset"), p["data"].clone()))
        .collect();
    assert_eq!(
        pubs,
        vec![(1, json!("one")), (2, json!("stale")), (3, json!("two"))],
        "one publication per offset: {history}"
    );
}

/// What a broadcast process logs once it serves requests.
const BROADCAST_READY: &str = "broadcast ready";

/// Runs `binary` as its own process on the cluster's NATS, with the `hist`
/// namespace as [`history_namespace`] configures it, plus `settings`
/// (`RT_…` variables); `None` when the binary is not built (see
/// [`rt_tests::process`]).
async fn service_process(
    cluster: &TestCluster,
    binary: &str,
    ready_message: &str,
    settings: &[(&str, &str)],
) -> Option<ServiceProcess> {
    let binary = process::binary_or_skip(binary)?;
    let hist = &cluster.config.namespaces["hist"];
    let mut env: Vec<(String, String)> = [
        ("RT_NATS_URL", cluster.config.nats.url.clone()),
        ("RT_LOG__FILTER", "info".to_owned()),
        ("RT_TELEMETRY__STATS_INTERVAL_MS", "0".to_owned()),
        (
            "RT_NAMESPACES__HIST__HISTORY_SIZE",
            hist.history_size.to_string(),
        ),
        (
            "RT_NAMESPACES__HIST__HISTORY_TTL_SECS",
            hist.history_ttl_secs.to_string(),
        ),
    ]
    .map(|(k, v)| (k.to_owned(), v))
    .to_vec();
    env.extend(
        settings
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned())),
    );
    Some(ServiceProcess::start(binary, env, ready_message).await)
}

/// `rt-broadcast` as its own process with `instance_id` and 1 s leases.
async fn broadcast_process(cluster: &TestCluster, instance_id: &str) -> Option<ServiceProcess> {
    let settings = [
        ("RT_BROADCAST__HTTP_ADDR", "127.0.0.1:0"),
        ("RT_BROADCAST__SHARDS", "2"),
        ("RT_BROADCAST__INSTANCE_ID", instance_id),
        ("RT_BROADCAST__LEASE_TTL_MS", "1000"),
    ];
    service_process(cluster, "rt-broadcast", BROADCAST_READY, &settings).await
}

/// Which broadcast instance holds each partition's lease now.
async fn lease_owners(cluster: &TestCluster) -> HashMap<u32, String> {
    let js = async_nats::jetstream::new(cluster.nats_client().await);
    let leases = js
        .get_key_value("rt_broadcast_leases")
        .await
        .expect("the leases bucket");
    let mut owners = HashMap::new();
    for partition in 0..rt_proto::subject::BROADCAST_PARTITIONS {
        if let Ok(Some(value)) = leases.get(format!("p{partition}")).await {
            let lease: rt_proto::internal::PartitionLease =
                rt_proto::internal::from_msgpack(&value).expect("a lease");
            owners.insert(partition, lease.owner);
        }
    }
    owners
}

#[actix_rt::test]
async fn a_broadcast_process_killed_with_sigkill_and_restarted_loses_no_acknowledged_publication() {
    let mut cluster = TestCluster::without_broadcast(history_namespace).await;
    let Some(mut broadcast) = broadcast_process(&cluster, "b-proc").await else {
        return;
    };
    // The restarted process has the same instance id (as a StatefulSet pod
    // has): it takes its partitions back at once.
    stream_through(
        &mut cluster,
        "hist:sigkill",
        3_000,
        800,
        Disruption::KillProcess {
            process: &mut broadcast,
            restart: true,
        },
    )
    .await;
}

#[actix_rt::test]
async fn when_a_broadcast_process_is_killed_with_sigkill_the_other_takes_its_channels_over() {
    let mut cluster = TestCluster::without_broadcast(history_namespace).await;
    let Some(mut victim) = broadcast_process(&cluster, "b-victim").await else {
        return;
    };
    let Some(survivor) = broadcast_process(&cluster, "b-survivor").await else {
        return;
    };
    let owners = eventually("partitions shared", Duration::from_secs(20), || async {
        let owners = lease_owners(&cluster).await;
        let victims = owners.values().filter(|o| *o == "b-victim").count();
        (owners.len() == 64 && victims == 32).then_some(owners)
    })
    .await;
    // A channel the victim sequences.
    let channel = (0..)
        .map(|n| format!("hist:victim{n}"))
        .find(|name| {
            let channel = ChannelName::parse(name).expect("channel");
            owners[&rt_proto::subject::partition(&channel)] == "b-victim"
        })
        .expect("some channel");
    stream_through(
        &mut cluster,
        &channel,
        2_000,
        600,
        Disruption::KillProcess {
            process: &mut victim,
            restart: false,
        },
    )
    .await;
    let owners = lease_owners(&cluster).await;
    assert!(
        owners.len() == 64 && owners.values().all(|o| o == "b-survivor"),
        "the survivor holds every partition: {owners:?}\n{}",
        survivor.output()
    );
}

/// `rt-gateway` as its own process at `addr`, one worker.
async fn gateway_process(
    cluster: &TestCluster,
    addr: std::net::SocketAddr,
) -> Option<ServiceProcess> {
    let addr = addr.to_string();
    let settings = [
        ("RT_HTTP_ADDR", addr.as_str()),
        ("RT_API_KEY", API_KEY),
        ("RT_GATEWAY__WORKERS", "1"),
    ];
    service_process(cluster, "rt-gateway", "gateway ready", &settings).await
}

/// A loopback address with a port free right now (the process binds it next).
fn free_addr() -> std::net::SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|listener| listener.local_addr())
        .expect("a free port")
}

#[actix_rt::test]
async fn a_gateway_process_killed_with_sigkill_mid_stream_loses_no_acknowledged_publication() {
    let mut cluster = TestCluster::start_with(1, history_namespace).await;
    let addr = free_addr();
    let Some(mut gateway) = gateway_process(&cluster, addr).await else {
        return;
    };
    let channel = "hist:gateway-kill";
    let doomed = format!("ws://{addr}/ws");
    // Subscribers on the gateway that dies: one comes back to it once it is
    // restarted, the other moves to the cluster's other gateway.
    let subscribers = vec![
        (
            WsClient::connected(&doomed, WsEncoding::MsgPack).await,
            Some(doomed.clone()),
        ),
        (
            WsClient::connected(&doomed, WsEncoding::Json).await,
            Some(cluster.ws_url(0)),
        ),
    ];
    stream_to(
        &mut cluster,
        channel,
        3_000,
        800,
        Disruption::KillProcess {
            process: &mut gateway,
            restart: true,
        },
        subscribers,
    )
    .await;
}

/// `rt-gateway` as its own process at `addr` with the cluster's `room`
/// namespace (presence and join/leave) and its fast heartbeat, so its
/// clients show up in presence like any gateway's.
async fn presence_gateway_process(
    cluster: &TestCluster,
    addr: std::net::SocketAddr,
) -> Option<ServiceProcess> {
    let addr = addr.to_string();
    let heartbeat = cluster.config.gateway.heartbeat_ms.to_string();
    let node_ttl = cluster.config.session.node_ttl_ms.to_string();
    let settings = [
        ("RT_HTTP_ADDR", addr.as_str()),
        ("RT_API_KEY", API_KEY),
        ("RT_GATEWAY__WORKERS", "1"),
        ("RT_GATEWAY__HEARTBEAT_MS", heartbeat.as_str()),
        ("RT_SESSION__NODE_TTL_MS", node_ttl.as_str()),
        ("RT_SESSION__JWT_LEEWAY_SECS", "0"),
        ("RT_NAMESPACES__ROOM__PRESENCE", "true"),
        ("RT_NAMESPACES__ROOM__JOIN_LEAVE", "true"),
        ("RT_NAMESPACES__ROOM__ALLOW_ANONYMOUS", "false"),
    ];
    service_process(cluster, "rt-gateway", "gateway ready", &settings).await
}

#[actix_rt::test]
async fn a_gateway_process_killed_with_sigkill_has_its_clients_leave_presence_within_the_ttl() {
    const ROOM: &str = "room:sigkill";
    let cluster = TestCluster::start_with(1, history_namespace).await;
    let addr = free_addr();
    let Some(mut gateway) = presence_gateway_process(&cluster, addr).await else {
        return;
    };
    let (mut watcher, watcher_id) =
        joined(&cluster.ws_url(0), WsEncoding::Json, "wendy", ROOM).await;
    let (_doomed, doomed_id) =
        joined(&format!("ws://{addr}/ws"), WsEncoding::Json, "zed", ROOM).await;
    presence_push(&mut watcher, "join", &doomed_id).await;
    let listed = watcher
        .command("presence", json!({ "channel": ROOM }))
        .await;
    assert!(
        listed["ok"]["clients"][&doomed_id].is_object(),
        "the other process's client is listed: {listed}"
    );
    // No goodbye, no socket close, no last heartbeat: the process is gone.
    gateway.kill();
    let died = tokio::time::Instant::now();
    within(
        "the killed gateway's client leaves",
        Duration::from_secs(10),
        presence_push(&mut watcher, "leave", &doomed_id),
    )
    .await;
    let took = died.elapsed();
    // node_ttl_ms is 1 s in tests and the reaper looks 4 times per TTL.
    assert!(took < Duration::from_secs(5), "took {took:?}");
    let listed = watcher
        .command("presence", json!({ "channel": ROOM }))
        .await;
    assert_eq!(
        client_ids(&listed["ok"]["clients"]),
        BTreeSet::from([watcher_id]),
        "{listed}"
    );
}
