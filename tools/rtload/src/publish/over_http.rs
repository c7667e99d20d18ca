//! Publishing with `POST /api/publish` over keep-alive HTTP/1.1: one request at a time
//! per connection, reconnecting after an error.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::{PubStats, PublishSpec, Queue, next_batch};
use crate::http::{HttpConn, HttpTarget};
use crate::pacer::Tick;
use crate::stats::Live;
use crate::wire::Stamp;

#[derive(Serialize)]
struct HttpPublish<'a> {
    channel: &'a str,
    data: Stamp<'a>,
}

#[derive(Deserialize, Default)]
struct HttpReply {
    #[serde(default)]
    offset: Option<u64>,
    #[serde(default)]
    error: Option<HttpError>,
}

#[derive(Deserialize, Default)]
struct HttpError {
    #[serde(default)]
    code: u32,
}

pub(super) async fn http_worker(
    first: HttpConn,
    target: Arc<HttpTarget>,
    queue: Queue,
    spec: Arc<PublishSpec>,
    live: Arc<Live>,
) -> PubStats {
    let headers = format!(
        "Authorization: apikey {}\r\nContent-Type: application/json\r\n",
        spec.api_key
    );
    let mut stats = PubStats::new();
    let mut conn = Some(first);
    while let Some(batch) = next_batch(&queue, 1).await {
        for tick in batch {
            let outcome = http_publish(
                &mut conn, &target, &headers, &tick, &spec, &mut stats, &live,
            )
            .await;
            if outcome.is_err() {
                Live::add(&live.publish_failed, 1);
            }
            stats.on_ack(&tick, spec.channel_of(tick.seq).0, outcome, &spec.window);
        }
    }
    stats
}

async fn http_publish(
    conn: &mut Option<HttpConn>,
    target: &HttpTarget,
    headers: &str,
    tick: &Tick,
    spec: &PublishSpec,
    stats: &mut PubStats,
    live: &Live,
) -> Result<Option<u64>, String> {
    let body = serde_json::to_vec(&HttpPublish {
        channel: spec.channel_of(tick.seq).1,
        data: Stamp {
            t: spec.clock.unix_us(tick.intended),
            seq: tick.seq,
            pad: &spec.pad,
        },
    })
    .map_err(|e| format!("publish encode: {e}"))?;
    if conn.is_none() {
        *conn = Some(
            HttpConn::connect(target, spec.source)
                .await
                .map_err(|_| "publish http connect failed".to_string())?,
        );
    }
    let Some(c) = conn.as_mut() else {
        return Err("publish http connect failed".into());
    };
    stats.on_write(tick, Instant::now(), &spec.window);
    Live::add(&live.sent, 1);
    let request = c.request("POST", "/api/publish", headers, &body);
    let response = match tokio::time::timeout(Duration::from_secs(10), request).await {
        Ok(Ok(r)) => r,
        Ok(Err(_)) => {
            *conn = None;
            return Err("publish http io error".into());
        }
        Err(_) => {
            *conn = None;
            return Err("publish http timeout".into());
        }
    };
    if !response.keep_alive {
        *conn = None;
    }
    let reply: HttpReply = serde_json::from_slice(&response.body).unwrap_or_default();
    if (200..300).contains(&response.status) {
        Ok(reply.offset)
    } else {
        let code = reply.error.map_or(0, |e| e.code);
        Err(format!("publish http {} code {code}", response.status))
    }
}
