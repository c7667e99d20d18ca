//! Presence from a client's and an operator's side: joining a channel with a
//! token, waiting for `join`/`leave` pushes about one client, asking
//! `/api/presence`, and reading the client ids out of either answer.

use std::collections::BTreeSet;
use std::net::SocketAddr;

use serde_json::{Value, json};

use crate::cluster::API_KEY;
use crate::{STEP, WsClient, WsEncoding, tokens, within};

/// Connects `user` (with a token) to the gateway at `url` and subscribes to
/// `channel`; returns the client and its client id.
pub async fn joined(
    url: &str,
    encoding: WsEncoding,
    user: &str,
    channel: &str,
) -> (WsClient, String) {
    let args = json!({ "token": tokens::token(user) });
    let (mut client, ok) = WsClient::connected_with(url, encoding, args).await;
    let reply = client
        .command("subscribe", json!({ "channel": channel }))
        .await;
    assert!(reply["ok"].is_object(), "{reply}");
    (client, ok["client"].as_str().expect("client id").to_owned())
}

/// The next `kind` push (`join` or `leave`) about client `id`, skipping
/// those about others (a subscriber also hears its own join).
pub async fn presence_push(client: &mut WsClient, kind: &str, id: &str) -> Value {
    within(&format!("{kind} of {id}"), STEP, async {
        loop {
            let push = client.next_push(kind).await;
            if push["info"]["client"] == json!(id) {
                return push;
            }
        }
    })
    .await
}

/// The whole `/api/presence/{channel}` answer of the gateway at `addr`.
pub async fn presence_over_http(addr: SocketAddr, channel: &str) -> Value {
    let res = crate::http::get(
        addr,
        &format!("/api/presence/{channel}"),
        &[("authorization", &format!("apikey {API_KEY}"))],
    )
    .await;
    assert_eq!(res.status, 200, "{}", res.text());
    res.json()
}

/// The client ids of a presence answer's `clients` map (empty for `{count}`).
pub fn client_ids(clients: &Value) -> BTreeSet<String> {
    clients
        .as_object()
        .map(|clients| clients.keys().cloned().collect())
        .unwrap_or_default()
}
