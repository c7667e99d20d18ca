//! `chat`: many rooms, everyone publishes and everyone subscribes. `--rooms` channels
//! (`<prefix>0` … `<prefix>R-1`) with `--members` connections each; a member subscribes
//! to its room and publishes in it on its own connection with the `publish` op, as a chat
//! client does, and receives every message of its room, its own included.
//!
//! One open-loop schedule carries every message (`rooms × members × --rate-per-member`
//! per second), spread round-robin over the members ([`Spread`]): each member sends every
//! `1 / rate-per-member` seconds, consecutive members `1 / total rate` apart. Member `k`
//! is in room `k % rooms`, so send `n` (member `n % members`) is in room `n % rooms`,
//! which is the channel the shared [`PublishSpec`] gives it. Every message carries its
//! intended send time: ack and publish-to-deliver latencies run from it.
//!
//! A member is two tasks on one socket: the writer of [`crate::publish`]'s WebSocket
//! publishers (from the member's own queue), and a subscriber's reader
//! ([`subscriber::consume`]) that hands the replies to the publishes to [`Acks`].
//! Phases ([`crate::pubsub::Run`]): connect → warmup → measure → drain (every writer done
//! and every publish answered, then deliveries) → stop and collect.

mod report;

use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use tokio::sync::{Mutex, Semaphore, mpsc, watch};

use crate::cli::Common;
use crate::client::{Dialer, SetupError};
use crate::clock::Clock;
use crate::error::Result;
use crate::pacer::{self, Schedule, Spread, Tick, Window};
use crate::publish::over_ws::{self, Acks};
use crate::publish::{PublishSpec, Via};
use crate::pubsub::{Load, Run};
use crate::report::print_and_write;
use crate::stats::Live;
use crate::subscriber::{self, Event, OffsetTracker, SubSpec, Summary};
use crate::sysinfo;

/// Sends waiting in one member's queue at most: past it the member is hopelessly behind
/// (its socket does not take what it is given) and further sends are dropped, counted.
const MEMBER_QUEUE: usize = 1024;

#[derive(clap::Args, Debug, Clone)]
pub struct Args {
    #[command(flatten)]
    pub common: Common,

    /// Rooms: channels `<prefix>0` … `<prefix>R-1`.
    #[arg(long, default_value_t = 10)]
    pub rooms: usize,

    /// Connections per room; each subscribes to its room and publishes in it.
    #[arg(long, default_value_t = 10)]
    pub members: usize,

    /// Messages per second each member publishes (one open-loop schedule for all).
    #[arg(long, default_value_t = 1.0)]
    pub rate_per_member: f64,

    /// Room name prefix. Its namespace must let anonymous clients publish: `chat` does in
    /// config/dev.toml and in the test harness.
    #[arg(long, default_value = "chat:load-")]
    pub prefix: String,

    /// Length of the padding string in each message's data (beside `t` and `seq`).
    #[arg(long, default_value_t = 64)]
    pub payload_bytes: usize,
}

impl Args {
    /// Member connections in all.
    pub fn connections(&self) -> usize {
        self.rooms * self.members
    }

    /// Messages per second in all.
    pub fn total_rate(&self) -> f64 {
        self.connections() as f64 * self.rate_per_member
    }
}

/// Measured messages the pacer could not hand to their member.
#[derive(Default, Debug)]
pub struct Unsent {
    /// The member was not there: it never connected, or its socket ended.
    pub member_gone: AtomicU64,
    /// Its queue was full ([`MEMBER_QUEUE`]).
    pub queue_full: AtomicU64,
}

pub async fn run(args: Args) -> Result<ExitCode> {
    let common = &args.common;
    if args.rooms == 0 || args.members == 0 {
        return Err("--rooms and --members must be at least 1".into());
    }
    let members = args.connections();
    let rate = args.total_rate();
    let window = Load::Rate(rate).window(common.warmup, common.duration)?;
    let clock = Clock::new();
    let cores = sysinfo::cores();
    let fds_needed = (members + 64) as u64;
    let (fd, notes) = sysinfo::prepare_fds(fds_needed);
    let dialer = Arc::new(Dialer::new(&common.url, common).await?);
    let rooms: Vec<String> = (0..args.rooms)
        .map(|r| format!("{}{r}", args.prefix))
        .collect();
    eprintln!(
        "rtload chat: {} rooms × {} members = {members} connections ({}), {}/s each: {rate}/s published, {}/s delivered, for {:?} after {:?} warmup",
        args.rooms,
        args.members,
        common.encoding,
        args.rate_per_member,
        rate * args.members as f64,
        common.duration,
        common.warmup,
    );
    let (mut run, events_tx) = Run::new(cores, notes);
    let subs = SubSpec::per_channel(&rooms, common.encoding, window, clock);
    let pub_spec = Arc::new(PublishSpec {
        via: Via::Ws,
        channels: rooms,
        pad: "x".repeat(args.payload_bytes),
        http_base: common.http.clone(),
        api_key: common.api_key.clone(),
        connections: members,
        window,
        clock,
        drain: common.drain,
        slots: None,
    });
    let permits = Arc::new(Semaphore::new(common.connect_concurrency.max(1)));
    let mut queues = Vec::with_capacity(members);
    for index in 0..members {
        let (tx, rx) = mpsc::channel(MEMBER_QUEUE);
        queues.push(tx);
        let member = Member {
            index,
            sub: subs[index % subs.len()].clone(),
            pubs: pub_spec.clone(),
            live: run.live.clone(),
            events: events_tx.clone(),
        };
        tokio::spawn(member.run(dialer.clone(), permits.clone(), rx, run.stop_signal()));
    }
    drop(events_tx);
    run.connect(members, "members").await?;
    let failed = run.col.setup.failed;
    if failed > 0 {
        run.notes.push(format!(
            "{failed} of {members} members could not be set up: their messages were not sent \
             (counted as unsent) and their rooms had fewer members"
        ));
    }

    // Messages: the pacer hands each to its member's queue.
    let spread = Spread::new(members)?;
    let schedule = Schedule::new(Instant::now() + Duration::from_millis(20), rate)?;
    let measure_start = schedule.at(window.first);
    eprintln!(
        "rtload: {rate}/s over {members} members: each sends every {:.1} ms",
        spread.per_conn_interval(rate).as_secs_f64() * 1000.0
    );
    let unsent = Arc::new(Unsent::default());
    let route = router(queues, spread, run.live.clone(), window, unsent.clone());
    let pacer_stop = Arc::new(AtomicBool::new(false));
    let pacer_done = pacer::spawn_with(schedule, window.end, pacer_stop.clone(), route)?;
    let loaded = run
        .load(pacer_done, schedule.start(), measure_start, &pacer_stop)
        .await;

    // Drain: every writer through its queue and every publish answered, then the
    // deliveries of what was acknowledged (each to every member of its room).
    let ready = run.col.setup.ready;
    run.settle(common.drain, |live, col| {
        col.writers_done >= ready && Live::get(&live.outstanding) == 0
    })
    .await;
    let per_room = args.members as u64;
    run.settle(common.drain, |live, _| {
        Live::get(&live.delivered_measured) >= Live::get(&live.acked_measured) * per_room
    })
    .await;

    let (outcome, generator) = run.finish("members", &loaded, fd, fds_needed).await;
    let report = report::build(&args, &run.col, &outcome, &unsent, generator);
    print_and_write(&report.render(), &report, common.json_out.as_deref())?;
    if report.publish.acked == 0 || report.delivery.delivered == 0 {
        eprintln!("rtload: nothing was measured (no acknowledged message delivered)");
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}

/// The pacer's transport: send `n` goes to member `n % members`'s queue ([`Spread`]),
/// without ever blocking the pacer. A send its member cannot take fails at once.
fn router(
    queues: Vec<mpsc::Sender<Tick>>,
    spread: Spread,
    live: Arc<Live>,
    window: Window,
    unsent: Arc<Unsent>,
) -> impl FnMut(Tick) -> bool + Send + 'static {
    move |tick: Tick| {
        let Err(e) = queues[spread.conn_of(tick.seq)].try_send(tick) else {
            return true;
        };
        Live::add(&live.publish_failed, 1);
        if window.contains(tick.seq) {
            let counter = match e {
                mpsc::error::TrySendError::Closed(_) => &unsent.member_gone,
                mpsc::error::TrySendError::Full(_) => &unsent.queue_full,
            };
            Live::add(counter, 1);
        }
        true
    }
}

/// One chat member: what it shares with the run.
struct Member {
    index: usize,
    sub: Arc<SubSpec>,
    pubs: Arc<PublishSpec>,
    live: Arc<Live>,
    events: mpsc::UnboundedSender<Event>,
}

impl Member {
    /// Connects and subscribes (bounded concurrency), then publishes what arrives on
    /// `queue` and reads its room until `stop` turns true.
    async fn run(
        self,
        dialer: Arc<Dialer>,
        permits: Arc<Semaphore>,
        queue: mpsc::Receiver<Tick>,
        stop: watch::Receiver<bool>,
    ) {
        let Member {
            index,
            sub,
            pubs,
            live,
            events,
        } = self;
        let setup = async {
            let _permit = permits.acquire().await;
            let (mut conn, connect) = dialer.open(index).await?;
            let (offset, subscribe) = conn.subscribe(&sub.channel).await?;
            Ok::<_, SetupError>((conn, connect, subscribe, offset))
        };
        let (conn, connect, subscribe, offset) = match setup.await {
            Ok(ready) => ready,
            Err(e) => {
                let _ = events.send(Event::Failed {
                    kind: e.kind(),
                    message: e.to_string(),
                });
                return;
            }
        };
        let _ = events.send(Event::Ready { connect, subscribe });
        Live::add(&live.open, 1);
        let encoding = conn.encoding;
        let (sink, mut stream) = conn.ws.split();
        let (inflight_tx, inflight) = mpsc::unbounded_channel();
        let writer = {
            let (pubs, live, events) = (pubs.clone(), live.clone(), events.clone());
            tokio::spawn(async move {
                let queue = Arc::new(Mutex::new(queue));
                let (stats, sink) =
                    over_ws::write(sink, encoding, queue, inflight_tx, &pubs, &live).await;
                let _ = events.send(Event::Published {
                    stats: Box::new(stats),
                    writer_done: true,
                });
                sink
            })
        };
        let mut acks = Acks::new(inflight, pubs);
        let summary = Summary::new(sub.channel_index, OffsetTracker::starting_at(offset));
        let summary =
            subscriber::consume(&mut stream, summary, &sub, &live, &events, stop, |reply| {
                acks.on_reply(reply, &live)
            })
            .await;
        Live::dec(&live.open);
        let unanswered = if summary.closed_early {
            "publish connection lost"
        } else {
            "publish no reply"
        };
        acks.abandon(unanswered, &live);
        let _ = events.send(Event::Published {
            stats: Box::new(std::mem::take(&mut acks.stats)),
            writer_done: false,
        });
        // The writer is done by now (its queue closed when the pacer ended).
        if let Ok(sink) = writer.await
            && !summary.closed_early
            && let Ok(mut ws) = sink.reunite(stream)
        {
            let _ = tokio::time::timeout(Duration::from_secs(1), ws.close(None)).await;
        }
        let _ = events.send(Event::Done(Box::new(summary)));
    }
}
