//! Publishing with `POST /api/publish` over keep-alive HTTP/1.1: one request at a time
//! per connection, reconnecting after an error.

use std::net::IpAddr;
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
    source: Option<IpAddr>,
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
    let endpoint = Endpoint {
        target: &target,
        source,
        headers: &headers,
    };
    while let Some(batch) = next_batch(&queue, 1).await {
        for tick in batch {
            let mut written = false;
            let outcome = http_publish(
                &mut conn,
                &endpoint,
                &tick,
                &spec,
                &mut stats,
                &live,
                &mut written,
            )
            .await;
            spec.settle(&mut stats, &tick, outcome, written, &live);
        }
    }
    stats
}

/// Where and how a worker's requests go.
struct Endpoint<'a> {
    target: &'a HttpTarget,
    source: Option<IpAddr>,
    headers: &'a str,
}

/// One `POST /api/publish`; `written` turns true once the request went out.
async fn http_publish(
    conn: &mut Option<HttpConn>,
    endpoint: &Endpoint<'_>,
    tick: &Tick,
    spec: &PublishSpec,
    stats: &mut PubStats,
    live: &Live,
    written: &mut bool,
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
            HttpConn::connect(endpoint.target, endpoint.source)
                .await
                .map_err(|_| "publish http connect failed".to_string())?,
        );
    }
    let Some(c) = conn.as_mut() else {
        return Err("publish http connect failed".into());
    };
    stats.on_write(tick, Instant::now(), &spec.window);
    Live::add(&live.sent, 1);
    Live::add(&live.outstanding, 1);
    *written = true;
    let request = c.request("POST", "/api/publish", endpoint.headers, &body);
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
        if let Some(secs) = response.retry_after_secs {
            crate::stats::record(&mut stats.retry_after, secs.saturating_mul(1_000_000));
        }
        let code = reply.error.map_or(0, |e| e.code);
        Err(format!("publish http {} code {code}", response.status))
    }
}
