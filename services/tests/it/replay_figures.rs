//! The rebuild figures of `docs/benchmarks.md` ("Rebuilding a projection"), in one run:
//!
//! ```text
//! cargo test --release -p parley-services --test it replay_figures:: -- --ignored --nocapture
//! ```
//!
//! 200,000 events (100 direct conversations: each a creation and 1,999 messages) are
//! appended to the log of a local nats-server (file storage, R1, lazy fsync; set-up, not
//! measured). Then, on that log: the raw JetStream consume rate (a plain ordered consumer
//! reading to the end, each event decoded, no store), and `parley replay rebuild` (its
//! library function) into a new SQLite file, the same events applied straight to a new
//! SQLite store (no NATS: the store's share of the rebuild's time), then the rebuild into a
//! new keyspace on a local Cassandra node (started for the run; without Java that row is
//! skipped, unless CI or `PARLEY_REQUIRE_CQL` requires it).

use crate::support;

use std::time::Instant;

use async_nats::jetstream::consumer::pull;
use futures::StreamExt;
use parley_events::{ConversationId, EventEnvelope, RecordedEvent};
use parley_localstack::{CassandraNode, NatsOptions, NatsServer};
use parley_projections::{ConversationStore, SqliteStore};
use parley_services::config::Config;
use parley_services::progress::Progress;
use parley_services::replay::Target;
use parley_services::replay::rebuild::{self, RebuildOptions};
use tokio_util::sync::CancellationToken;

const CONVERSATIONS: u64 = 100;
const PER_CONVERSATION: u64 = 2_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a benchmark: run it on a quiet machine with --ignored"]
async fn rebuild_figures() {
    let nats = NatsServer::start(NatsOptions {
        sync_always: false,
        ..NatsOptions::default()
    })
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (config, _connection, topology) = support::topology_on(&nats.url()).await;
    let started = Instant::now();
    // Conversations interleaved, as a live log is.
    let all: Vec<(ConversationId, Vec<EventEnvelope>)> = (0..CONVERSATIONS)
        .map(|c| support::direct_chat(&format!("a{c}"), &format!("b{c}"), PER_CONVERSATION - 1))
        .collect();
    let mut acks = Vec::new();
    for n in 0..PER_CONVERSATION as usize {
        for (conversation, events) in &all {
            let subject = topology.shards.subject(*conversation);
            acks.push(
                topology
                    .js
                    .publish(subject, events[n].to_bytes().into())
                    .await
                    .unwrap(),
            );
            if acks.len() == 256 {
                for ack in acks.drain(..) {
                    ack.await.unwrap();
                }
            }
        }
    }
    for ack in acks {
        ack.await.unwrap();
    }
    let mut log = topology.log.clone();
    let last = log.info().await.unwrap().state.last_sequence;
    eprintln!(
        "appended {last} events in {:.1} s",
        started.elapsed().as_secs_f64()
    );

    // Raw: an ordered consumer reading the log to its end, each event decoded, no store.
    let started = Instant::now();
    let mut messages = topology
        .log
        .create_consumer(pull::OrderedConfig::default())
        .await
        .unwrap()
        .messages()
        .await
        .unwrap();
    let mut seen = 0;
    while seen < last {
        let message = messages.next().await.unwrap().unwrap();
        EventEnvelope::from_bytes(&message.payload).unwrap();
        seen = message.info().unwrap().stream_sequence;
    }
    let raw = last as f64 / started.elapsed().as_secs_f64();
    drop(messages);

    let rebuild_rate = |config: Config, target: Target| {
        let topology = &topology;
        async move {
            let started = Instant::now();
            let rebuilt = rebuild::rebuild(
                &config,
                topology,
                &RebuildOptions::new(target),
                |_| Progress::silent("rebuild"),
                &CancellationToken::new(),
            )
            .await
            .unwrap();
            assert_eq!(rebuilt.position, last);
            rebuilt.applied as f64 / started.elapsed().as_secs_f64()
        }
    };
    let sqlite = rebuild_rate(
        config.clone(),
        Target::Sqlite(dir.path().join("rebuilt.db")),
    )
    .await;
    println!("| Raw ordered consume | {raw:.0} | 1.00 |");
    println!(
        "| Rebuild into a new SQLite file | {sqlite:.0} | {:.2} |",
        sqlite / raw
    );
    // The same events applied straight to a new SQLite store in batches of `projector.batch`,
    // no NATS: how much of the rebuild's time is the store's.
    let store = SqliteStore::open(&dir.path().join("applied.db")).unwrap();
    let recorded: Vec<RecordedEvent> = (0..PER_CONVERSATION as usize)
        .flat_map(|n| all.iter().map(move |(_, events)| events[n].clone()))
        .zip(1..)
        .map(|(envelope, seq)| envelope.recorded(seq))
        .collect();
    let started = Instant::now();
    for batch in recorded.chunks(config.projector.batch) {
        store.apply(batch).await.unwrap();
    }
    let applied = recorded.len() as f64 / started.elapsed().as_secs_f64();
    assert_eq!(store.position().await.unwrap(), last);
    println!(
        "| SQLite store's apply alone, same events, batches of {} | {applied:.0} | {:.2} |",
        config.projector.batch,
        applied / raw
    );
    // Started after the SQLite rebuild, so its JVM's start-up work does not share the cores
    // with it.
    if let Some(node) = CassandraNode::start_or_skip("the CQL rebuild figure") {
        let mut config = config.clone();
        let scylla = &mut config.projector.store.scylla;
        scylla.contact_points = vec![node.contact_point()];
        scylla.local_datacenter = Some(node.datacenter().to_owned());
        scylla.replication = [(node.datacenter().to_owned(), 1)].into();
        let cql = rebuild_rate(config, Target::Cql("rebuilt".into())).await;
        println!(
            "| Rebuild into a new CQL keyspace | {cql:.0} | {:.2} |",
            cql / raw
        );
    }
}
