//! Presence and join/leave across gateways, including a gateway that dies
//! without saying goodbye. The test namespace `room` has both on.

use std::collections::BTreeSet;
use std::time::Duration;

use serde_json::{Value, json};

use crate::*;
use rt_tests::presence::{client_ids, joined, presence_over_http, presence_push};

/// The client ids `presence` lists for `channel`, asked through `client`.
async fn listed(client: &mut WsClient, channel: &str) -> BTreeSet<String> {
    let reply = client
        .command("presence", json!({ "channel": channel }))
        .await;
    reply["ok"]["clients"]
        .as_object()
        .unwrap_or_else(|| panic!("expected a client list, got {reply}"))
        .keys()
        .cloned()
        .collect()
}

/// Asks `presence` until its answer satisfies `ok` (it is eventually consistent).
async fn presence_until(
    client: &mut WsClient,
    channel: &str,
    what: &str,
    ok: impl Fn(&Value) -> bool,
) -> Value {
    let ask = async || {
        client
            .command("presence", json!({ "channel": channel }))
            .await
    };
    ask_until("presence", what, ask, ok).await
}

/// Asks with `ask` every 20 ms until an answer satisfies `ok`; fails the
/// test after [`STEP`] with `source`, `what` and the last answer.
async fn ask_until(
    source: &str,
    what: &str,
    mut ask: impl AsyncFnMut() -> Value,
    ok: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = tokio::time::Instant::now() + STEP;
    loop {
        let answer = ask().await;
        if ok(&answer) {
            return answer;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{source} never showed {what}; last: {answer}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `user` on gateway `gateway` (JSON), subscribed to `channel`.
async fn connect_and_join(
    cluster: &TestCluster,
    gateway: usize,
    user: &str,
    channel: &str,
) -> (WsClient, String) {
    joined(&cluster.ws_url(gateway), WsEncoding::Json, user, channel).await
}

/// The client ids of a `presence` reply.
fn ids(reply: &Value) -> BTreeSet<String> {
    client_ids(&reply["ok"]["clients"])
}

#[actix_rt::test]
async fn presence_lists_clients_of_every_gateway_and_join_leave_reach_all() {
    let cluster = TestCluster::start_with(2, |_| {}).await;
    let (mut a, a_id) = connect_and_join(&cluster, 0, "ann", "room:one").await;
    let (mut b, b_id) = connect_and_join(&cluster, 1, "ben", "room:one").await;
    let own = a.next_push("join").await;
    assert_eq!(
        own["info"]["client"],
        json!(a_id),
        "a subscriber hears its own join"
    );
    let join = presence_push(&mut a, "join", &b_id).await;
    assert_eq!(join["channel"], json!("room:one"));
    assert_eq!(join["info"], json!({"user": "ben", "client": b_id}));
    let both: BTreeSet<String> = [a_id.clone(), b_id.clone()].into();
    presence_until(&mut b, "room:one", "both clients", |r| ids(r) == both).await;
    let res = rt_tests::http::get(
        cluster.addr(1),
        "/api/presence/room:one",
        &[("authorization", &format!("apikey {API_KEY}"))],
    )
    .await;
    assert_eq!(res.status, 200, "{}", res.text());
    let clients = res.json()["clients"].clone();
    assert_eq!(clients[&a_id], json!({"user": "ann"}), "{clients}");

    b.command("unsubscribe", json!({"channel": "room:one"}))
        .await;
    presence_push(&mut a, "leave", &b_id).await;
    let only_ann = BTreeSet::from([a_id.clone()]);
    presence_until(&mut a, "room:one", "only ann", |r| ids(r) == only_ann).await;

    // Namespaces without presence say so.
    let reply = a.command("presence", json!({"channel": "chat:x"})).await;
    assert_eq!(reply["error"]["code"], json!(108));
}

#[actix_rt::test]
async fn large_channels_answer_with_a_count() {
    let cluster = TestCluster::start_with(1, |c| c.session.presence_max_list = 3).await;
    let mut clients = Vec::new();
    for i in 0..5 {
        clients.push(connect_and_join(&cluster, 0, &format!("user{i}"), "room:big").await);
    }
    let (first, _) = &mut clients[0];
    presence_until(first, "room:big", "a count of 5", |r| {
        r["ok"] == json!({"count": 5})
    })
    .await;
}

#[actix_rt::test]
async fn a_gateway_that_dies_without_goodbye_leaves_presence_within_the_ttl() {
    let mut cluster = TestCluster::start_with(2, |_| {}).await;
    let (mut watcher, watcher_id) = connect_and_join(&cluster, 0, "wendy", "room:crash").await;
    let (_doomed, doomed_id) = connect_and_join(&cluster, 1, "zed", "room:crash").await;
    presence_push(&mut watcher, "join", &doomed_id).await;
    presence_until(&mut watcher, "room:crash", "both clients", |r| {
        ids(r).len() == 2
    })
    .await;
    // Stops heartbeats and sockets with no clean-up at all, like a crash.
    let doomed_gateway = cluster.gateways.remove(1);
    let died = tokio::time::Instant::now();
    doomed_gateway.stop().await;
    within(
        "the dead node's clients leave",
        Duration::from_secs(10),
        presence_push(&mut watcher, "leave", &doomed_id),
    )
    .await;
    let took = died.elapsed();
    // node_ttl_ms is 1 s in tests; the reaper looks 4 times per TTL.
    assert!(took < Duration::from_secs(5), "took {took:?}");
    assert_eq!(
        listed(&mut watcher, "room:crash").await,
        BTreeSet::from([watcher_id])
    );
}

/// Asks `/api/presence` through `gateway` until its answer satisfies `ok`.
async fn http_presence_until(
    cluster: &TestCluster,
    gateway: usize,
    channel: &str,
    what: &str,
    ok: impl Fn(&Value) -> bool,
) -> Value {
    let source = format!("/api/presence through gateway {gateway}");
    let ask = async || presence_over_http(cluster.addr(gateway), channel).await;
    ask_until(&source, what, ask, ok).await
}

/// Over `presence_max_list` present clients, `GET /api/presence/{channel}`
/// answers `{count}` as the WebSocket op does, also when each gateway alone
/// is under the limit (the count is over the whole cluster); back under it,
/// the list returns.
#[actix_rt::test]
async fn large_channels_answer_with_a_count_over_http_too() {
    const ROOM: &str = "room:big-http";
    let cluster = TestCluster::start_with(2, |c| c.session.presence_max_list = 3).await;
    let mut clients = Vec::new();
    for (i, gateway) in [0, 1, 0].into_iter().enumerate() {
        clients.push(connect_and_join(&cluster, gateway, &format!("member{i}"), ROOM).await);
    }
    let three: BTreeSet<String> = clients.iter().map(|(_, id)| id.clone()).collect();
    for gateway in 0..2 {
        http_presence_until(&cluster, gateway, ROOM, "the three clients", |answer| {
            client_ids(&answer["clients"]) == three
        })
        .await;
    }
    // A fourth, on the gateway that holds only one: 2 + 2 > 3.
    let (mut fourth, fourth_id) = connect_and_join(&cluster, 1, "member3", ROOM).await;
    for gateway in 0..2 {
        let answer = http_presence_until(&cluster, gateway, ROOM, "a count of 4", |answer| {
            answer.get("clients").is_none()
        })
        .await;
        assert_eq!(answer, json!({"count": 4}), "gateway {gateway}");
    }
    presence_until(&mut fourth, ROOM, "a count of 4", |r| {
        r["ok"] == json!({"count": 4})
    })
    .await;
    // Back to three: listed again.
    fourth
        .command("unsubscribe", json!({ "channel": ROOM }))
        .await;
    for gateway in 0..2 {
        http_presence_until(
            &cluster,
            gateway,
            ROOM,
            "the three clients again",
            |answer| client_ids(&answer["clients"]) == three,
        )
        .await;
    }
    assert!(!three.contains(&fourth_id));
}

/// Reads `client`'s frames straight off the socket until it has heard
/// `kind` pushes on `channel` about every client in `expected`; returns, for
/// each frame that carried any, when it arrived and whom it named.
async fn presence_frames(
    client: &mut WsClient,
    kind: &str,
    channel: &str,
    expected: &BTreeSet<String>,
) -> Vec<(tokio::time::Instant, Vec<String>)> {
    use futures_util::StreamExt as _;
    use tokio_tungstenite::tungstenite::Message;
    assert!(
        client.next_message_now().is_none(),
        "nothing may wait in the client's inbox"
    );
    let mut frames = Vec::new();
    let mut heard = BTreeSet::new();
    while !expected.is_subset(&heard) {
        let frame = within(
            &format!("{kind} pushes; heard {} of {}", heard.len(), expected.len()),
            STEP,
            client.ws.next(),
        )
        .await;
        let messages: Vec<Value> = match frame {
            Some(Ok(Message::Text(text))) => text
                .split('\n')
                .filter(|line| !line.trim().is_empty())
                .map(|line| serde_json::from_str(line).expect("a JSON message"))
                .collect(),
            Some(Ok(Message::Binary(bytes))) => rt_tests::ws_client::split_msgpack(&bytes),
            Some(Ok(_)) => continue,
            other => panic!("the socket ended: {other:?}"),
        };
        let named: Vec<String> = messages
            .iter()
            .filter(|m| m["push"] == json!(kind) && m["channel"] == json!(channel))
            .filter_map(|m| m["info"]["client"].as_str().map(str::to_owned))
            .collect();
        if !named.is_empty() {
            heard.extend(named.iter().cloned());
            frames.push((tokio::time::Instant::now(), named));
        }
    }
    frames
}

/// Checks one storm of `kind` pushes: every client named exactly once, and
/// in no more frames than the batching allows (one batch per channel per
/// `presence_batch_ms` tick of the gateway that saw the changes, so k
/// frames need at least k - 1 ticks between the first and the last).
fn assert_batched(
    kind: &str,
    frames: &[(tokio::time::Instant, Vec<String>)],
    expected: &BTreeSet<String>,
    batch: Duration,
) {
    let named: Vec<&String> = frames.iter().flat_map(|(_, ids)| ids).collect();
    assert_eq!(
        named.len(),
        expected.len(),
        "each {kind} exactly once: {frames:?}"
    );
    assert_eq!(
        named.into_iter().cloned().collect::<BTreeSet<_>>(),
        *expected,
        "every {kind}, none lost"
    );
    let (first, last) = (frames[0].0, frames[frames.len() - 1].0);
    let span = last - first;
    // +2: a tick's frame may be late by a little, and the span is measured
    // where the client reads, not where the gateway ticks.
    let allowed = (span.as_millis() / batch.as_millis()) as usize + 2;
    let sizes: Vec<usize> = frames.iter().map(|(_, ids)| ids.len()).collect();
    assert!(
        frames.len() <= allowed,
        "{} {kind}s over {span:?} came in {} frames {sizes:?}; batched every {batch:?}, at most {allowed}",
        expected.len(),
        frames.len(),
    );
}

/// Many members joining, then leaving, at once: their `join`s and `leave`s
/// reach a subscriber on the other gateway batched per `presence_batch_ms`
/// tick (docs/operations.md; one message per channel per tick, one frame to
/// the client), each exactly once, and soon after the changes.
#[actix_rt::test]
async fn join_and_leave_storms_arrive_batched_and_complete() {
    const ROOM: &str = "room:storm";
    const MEMBERS: usize = 24;
    const BATCH: Duration = Duration::from_millis(400);
    let cluster = TestCluster::start_with(2, |c| {
        c.gateway.presence_batch_ms = BATCH.as_millis() as u64;
    })
    .await;
    let (mut watcher, watcher_id) = connect_and_join(&cluster, 0, "watcher", ROOM).await;
    presence_push(&mut watcher, "join", &watcher_id).await;
    let mut members = Vec::new();
    for i in 0..MEMBERS {
        let args = json!({ "token": rt_tests::tokens::token(&format!("storm{i}")) });
        let (client, ok) =
            WsClient::connected_with(&cluster.ws_url(1), WsEncoding::MsgPack, args).await;
        members.push((client, ok["client"].as_str().expect("client id").to_owned()));
    }
    let expected: BTreeSet<String> = members.iter().map(|(_, id)| id.clone()).collect();

    // One after another, each waiting for its reply: spread over time, so
    // without batching each join would be a frame of its own.
    for (member, _) in &mut members {
        let reply = member
            .command("subscribe", json!({ "channel": ROOM }))
            .await;
        assert!(reply["ok"].is_object(), "{reply}");
    }
    let subscribed = tokio::time::Instant::now();
    let joins = presence_frames(&mut watcher, "join", ROOM, &expected).await;
    assert_batched("join", &joins, &expected, BATCH);
    let last = joins[joins.len() - 1].0;
    assert!(
        last.saturating_duration_since(subscribed) < BATCH + Duration::from_secs(2),
        "the last join came {:?} after the last subscribe",
        last - subscribed
    );

    // All leave at once (their sockets drop).
    let left = tokio::time::Instant::now();
    drop(members);
    let leaves = presence_frames(&mut watcher, "leave", ROOM, &expected).await;
    assert_batched("leave", &leaves, &expected, BATCH);
    let last = leaves[leaves.len() - 1].0;
    assert!(
        last - left < BATCH + Duration::from_secs(2),
        "the last leave came {:?} after the sockets dropped",
        last - left
    );
    let alone = BTreeSet::from([watcher_id]);
    presence_until(&mut watcher, ROOM, "the watcher alone", |r| ids(r) == alone).await;
}
