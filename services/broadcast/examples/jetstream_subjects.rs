//! Raw JetStream publish throughput to 1 or many subjects, with or without a
//! per-subject limit: the cost the history streams inherit from the server.
//!
//! `cargo run --release -p rt-broadcast --example jetstream_subjects -- \
//!    nats://127.0.0.1:4222 <subjects> <max_messages_per_subject or -1> [count]`
//!
//! Writes `count` (default 300,000) 100-byte messages round-robin over the
//! subjects, 256 in flight, each with a `Nats-Msg-Id` as broadcast sets it,
//! into a fresh file stream, and prints messages per second. On nats-server
//! 2.9 a per-subject limit that is being enforced on many subjects is an
//! order of magnitude slower than on one subject; 2.10+ does not slow down.

use std::time::{Duration, Instant};

use async_nats::jetstream::{self, stream};
use futures_util::StreamExt as _;
use futures_util::stream::FuturesUnordered;

type Error = Box<dyn std::error::Error + Send + Sync>;

#[actix_rt::main]
async fn main() -> Result<(), Error> {
    let args: Vec<String> = std::env::args().collect();
    let url = args
        .get(1)
        .ok_or("usage: URL SUBJECTS PER_SUBJECT_LIMIT [COUNT]")?;
    let subjects: usize = args.get(2).ok_or("SUBJECTS missing")?.parse()?;
    let per_subject: i64 = args.get(3).ok_or("PER_SUBJECT_LIMIT missing")?.parse()?;
    let count: usize = args.get(4).map_or(Ok(300_000), |c| c.parse())?;
    let client = async_nats::connect(url.as_str()).await?;
    let js = jetstream::ContextBuilder::new()
        .max_ack_inflight(4096)
        .backpressure_on_inflight(true)
        .build(client);
    let name = format!("BENCH_{subjects}_{}", per_subject.max(0));
    let _ = js.delete_stream(&name).await;
    js.get_or_create_stream(stream::Config {
        name: name.clone(),
        subjects: vec![format!("{name}.>")],
        max_messages_per_subject: per_subject,
        max_age: Duration::from_secs(300),
        storage: stream::StorageType::File,
        ..Default::default()
    })
    .await?;
    let start = Instant::now();
    let mut acks = FuturesUnordered::new();
    for i in 0..count {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Nats-Msg-Id", format!("s{}/e/{i}/0", i % subjects).as_str());
        let subject = format!("{name}.s{}", i % subjects);
        let ack = js
            .publish_with_headers(subject, headers, vec![0u8; 100].into())
            .await?;
        acks.push(ack.into_future());
        while acks.len() > 256 {
            if let Some(ack) = acks.next().await {
                ack?;
            }
        }
    }
    while let Some(ack) = acks.next().await {
        ack?;
    }
    println!(
        "{subjects} subject(s), max_messages_per_subject {per_subject}: {:.0} messages/s",
        count as f64 / start.elapsed().as_secs_f64()
    );
    js.delete_stream(&name).await?;
    Ok(())
}
