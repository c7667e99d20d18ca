//! Presence and join/leave across gateways, including a gateway that dies
//! without saying goodbye. The test namespace `room` has both on.

use std::collections::BTreeSet;
use std::time::Duration;

use serde_json::{Value, json};

use crate::*;

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
    let deadline = tokio::time::Instant::now() + STEP;
    loop {
        let reply = client
            .command("presence", json!({ "channel": channel }))
            .await;
        if ok(&reply) {
            return reply;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "presence never showed {what}; last: {reply}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn ids(reply: &Value) -> BTreeSet<String> {
    reply["ok"]["clients"]
        .as_object()
        .map(|clients| clients.keys().cloned().collect())
        .unwrap_or_default()
}

/// The next `kind` push about `client_id` (a subscriber also hears its own join).
async fn next_presence(client: &mut WsClient, kind: &str, client_id: &str) -> Value {
    loop {
        let push = client.next_push(kind).await;
        if push["info"]["client"] == json!(client_id) {
            return push;
        }
    }
}

async fn connect_and_join(
    cluster: &TestCluster,
    gateway: usize,
    user: &str,
    channel: &str,
) -> (WsClient, String) {
    let args = json!({ "token": rt_tests::tokens::token(user) });
    let (mut client, ok) =
        WsClient::connected_with(&cluster.ws_url(gateway), WsEncoding::Json, args).await;
    let reply = client
        .command("subscribe", json!({ "channel": channel }))
        .await;
    assert!(reply["ok"].is_object(), "{reply}");
    (client, ok["client"].as_str().expect("client id").to_owned())
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
    let join = next_presence(&mut a, "join", &b_id).await;
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
    next_presence(&mut a, "leave", &b_id).await;
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
    next_presence(&mut watcher, "join", &doomed_id).await;
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
        next_presence(&mut watcher, "leave", &doomed_id),
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
