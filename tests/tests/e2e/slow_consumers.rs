//! Slow consumers under each namespace policy: `conflate` keeps the newest
//! publication of each channel and the connection; `auto` delivers everything
//! while the client keeps up and conflates while it stalls; `disconnect`
//! closes with 4004 (also on a connection whose other channels conflate).

use std::collections::HashMap;
use std::net::SocketAddr;

use rt_shared::config::{Config, NamespaceConfig, SlowConsumerPolicy};
use serde_json::{Value, json};

use crate::*;

/// Each connection's bound in these tests.
const BOUND: usize = 64 * 1024;
/// The kernel receive buffer of the stalling clients.
const RECV_BUFFER: u32 = 4 * 1024;
/// Publications per round while waiting for a policy to act.
const ROUND: usize = 10;
/// Enough rounds to fill any socket buffer many times over.
const MAX_ROUNDS: usize = 2_000;

/// `lossy:*` conflates, `mixed:*` is `auto`; `chat:*` disconnects (as by default).
fn namespaces(config: &mut Config) {
    config.gateway.outbound_buffer_bytes = BOUND;
    for (name, policy) in [
        ("lossy", SlowConsumerPolicy::Conflate),
        ("mixed", SlowConsumerPolicy::Auto),
    ] {
        config.namespaces.insert(
            name.into(),
            NamespaceConfig {
                history_size: 1_000,
                slow_consumer: policy,
                ..Default::default()
            },
        );
    }
}

/// Publishes over NATS as a backend service would; returns the offset.
async fn publish(nats: &async_nats::Client, channel: &str, data: &Value) -> u64 {
    let payload = rt_proto::value::encode(&rt_proto::value::from_json(data));
    let reply = within(
        "publish",
        STEP,
        nats.request(format!("rt.publish.{channel}"), payload.into()),
    )
    .await
    .expect("publish request");
    let ack = rmpv::decode::read_value(&mut &reply.payload[..]).expect("a MessagePack ack");
    let ack = rt_proto::value::to_json_lossy(&ack);
    ack["offset"]
        .as_u64()
        .unwrap_or_else(|| panic!("publish failed: {ack}"))
}

/// One sample of a gateway metric (0 when it has no sample yet).
pub async fn metric(addr: SocketAddr, sample: &str) -> f64 {
    let text = rt_tests::http::get(addr, "/metrics", &[]).await.text();
    text.lines()
        .find_map(|line| line.strip_prefix(sample)?.strip_prefix(' '))
        .and_then(|value| value.trim().parse().ok())
        .unwrap_or(0.0)
}

/// Reads publications until each channel's `latest` arrived; checks that
/// each channel's offsets strictly increase and returns how many offsets
/// were skipped in all.
async fn read_until_latest(client: &mut WsClient, latest: &HashMap<String, u64>) -> u64 {
    let mut seen: HashMap<String, u64> = HashMap::new();
    let mut skipped = 0;
    while latest
        .iter()
        .any(|(ch, offset)| seen.get(ch) != Some(offset))
    {
        let message = within("publications", STEP, client.next_message()).await;
        assert_eq!(
            message["push"],
            json!("pub"),
            "only publications: {message}"
        );
        let channel = message["channel"].as_str().expect("channel").to_owned();
        let offset = message["offset"].as_u64().expect("offset");
        if let Some(&previous) = seen.get(&channel) {
            assert!(
                offset > previous,
                "{channel}: offset {offset} after {previous}"
            );
            skipped += offset - previous - 1;
        }
        assert!(
            offset <= latest[&channel],
            "{channel}: offset {offset} past the latest"
        );
        seen.insert(channel, offset);
    }
    skipped
}

#[actix_rt::test]
async fn a_conflating_slow_consumer_gets_each_channels_newest_within_its_bound() {
    let cluster = TestCluster::start_with(1, namespaces).await;
    let addr = cluster.addr(0);
    let channels = ["lossy:a", "lossy:b", "lossy:c"];
    let mut slow =
        WsClient::connected_with_recv_buffer(&cluster.ws_url(0), WsEncoding::MsgPack, RECV_BUFFER)
            .await;
    for channel in channels {
        let reply = slow.command("subscribe", json!({"channel": channel})).await;
        assert_eq!(reply["ok"]["offset"], json!(0), "{reply}");
    }
    let nats = cluster.nats_client().await;
    let data = json!({"fill": "x".repeat(4 * 1024)});

    // `slow` reads nothing: its socket buffers fill, then its queue, and
    // from then on each channel's newer publication replaces the queued one.
    let mut rounds = 0;
    loop {
        for channel in channels {
            for _ in 0..ROUND {
                publish(&nats, channel, &data).await;
            }
        }
        let buffered = metric(addr, "rt_gateway_outbound_buffered_bytes").await;
        assert!(
            buffered <= BOUND as f64,
            "{buffered} bytes queued, over the {BOUND}-byte bound"
        );
        if metric(addr, "rt_gateway_conflated_total").await >= 100.0 {
            break;
        }
        rounds += 1;
        assert!(rounds < MAX_ROUNDS, "no conflation after {rounds} rounds");
    }
    let mut latest = HashMap::new();
    for channel in channels {
        let offset = publish(&nats, channel, &json!({"last": channel})).await;
        latest.insert(channel.to_owned(), offset);
    }

    let skipped = read_until_latest(&mut slow, &latest).await;
    assert!(skipped > 0, "conflation shows as offset jumps");
    assert_eq!(metric(addr, "rt_gateway_slow_consumers_total").await, 0.0);
    // Still connected, and live again.
    assert_eq!(slow.command("ping", json!({})).await["ok"], json!({}));
    let next = publish(&nats, "lossy:a", &json!("again")).await;
    let message = slow.next_push("pub").await;
    assert_eq!(
        (message["offset"].clone(), message["data"].clone()),
        (json!(next), json!("again"))
    );
}

#[actix_rt::test]
async fn a_disconnect_channel_overflowing_a_conflating_connection_closes_it_with_4004() {
    let cluster = TestCluster::start_with(1, namespaces).await;
    let addr = cluster.addr(0);
    let mut slow =
        WsClient::connected_with_recv_buffer(&cluster.ws_url(0), WsEncoding::Json, RECV_BUFFER)
            .await;
    for channel in ["lossy:m", "chat:m"] {
        let reply = slow.command("subscribe", json!({"channel": channel})).await;
        assert!(reply["ok"].is_object(), "{reply}");
    }
    let nats = cluster.nats_client().await;
    let data = json!({"fill": "y".repeat(4 * 1024)});

    // The conflated channel alone never closes the connection…
    let mut rounds = 0;
    while metric(addr, "rt_gateway_conflated_total").await < 50.0 {
        for _ in 0..ROUND {
            publish(&nats, "lossy:m", &data).await;
        }
        rounds += 1;
        assert!(rounds < MAX_ROUNDS, "no conflation after {rounds} rounds");
    }
    assert_eq!(metric(addr, "rt_gateway_slow_consumers_total").await, 0.0);
    // …a disconnect-policy one that does not fit next to it does.
    let mut rounds = 0;
    while metric(addr, "rt_gateway_slow_consumers_total").await < 1.0 {
        for _ in 0..ROUND {
            publish(&nats, "chat:m", &data).await;
        }
        rounds += 1;
        assert!(rounds < MAX_ROUNDS, "no 4004 after {rounds} rounds");
    }
    assert_eq!(slow.closed().await.0, 4004);
}

#[actix_rt::test]
async fn auto_delivers_everything_while_a_client_keeps_up_and_conflates_while_it_stalls() {
    let cluster = TestCluster::start_with(1, namespaces).await;
    let addr = cluster.addr(0);
    let channel = "mixed:feed";
    let mut fast = cluster.client(0, WsEncoding::MsgPack).await;
    let mut slow =
        WsClient::connected_with_recv_buffer(&cluster.ws_url(0), WsEncoding::MsgPack, RECV_BUFFER)
            .await;
    for client in [&mut fast, &mut slow] {
        let reply = client
            .command("subscribe", json!({"channel": channel}))
            .await;
        assert_eq!(reply["ok"]["offset"], json!(0), "{reply}");
    }
    let nats = cluster.nats_client().await;
    let data = json!({"fill": "z".repeat(2 * 1024)});

    // `fast` reads each round before the next and gets every offset; `slow`
    // stalls until its queue passes the threshold and conflation switches on.
    let mut offset = 0;
    let mut rounds = 0;
    while metric(
        addr,
        "rt_gateway_conflation_switches_total{direction=\"on\"}",
    )
    .await
        < 1.0
        || metric(addr, "rt_gateway_conflated_total").await < 20.0
    {
        for _ in 0..ROUND {
            publish(&nats, channel, &data).await;
        }
        for _ in 0..ROUND {
            offset += 1;
            assert_eq!(fast.next_push("pub").await["offset"], json!(offset));
        }
        rounds += 1;
        assert!(
            rounds < MAX_ROUNDS,
            "no switch to conflation after {rounds} rounds"
        );
    }
    assert_eq!(metric(addr, "rt_gateway_slow_consumers_total").await, 0.0);

    // Drained, `slow` saw a jump, and is switched back.
    let latest = HashMap::from([(channel.to_owned(), offset)]);
    let skipped = read_until_latest(&mut slow, &latest).await;
    assert!(skipped > 0, "the stalled client skipped publications");
    eventually("conflation switched off", STEP, || async {
        (metric(
            addr,
            "rt_gateway_conflation_switches_total{direction=\"off\"}",
        )
        .await
            >= 1.0)
            .then_some(())
    })
    .await;

    // Keeping up again, it gets everything again.
    for _ in 0..20 {
        let published = publish(&nats, channel, &data).await;
        assert_eq!(slow.next_push("pub").await["offset"], json!(published));
        assert_eq!(fast.next_push("pub").await["offset"], json!(published));
    }
}
