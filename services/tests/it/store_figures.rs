//! The projection-store figures of `docs/benchmarks.md`, measured in one run:
//!
//! ```text
//! cargo test --release -p parley-services --test it store_figures:: -- --ignored --nocapture
//! ```
//!
//! One conversation of 100,000 messages (plus its creation) is appended to the event log of
//! a local nats-server (file storage, R1, NATS's default lazy fsync: the appends are set-up,
//! not measured). Then, on the same
//! log: the raw JetStream consume rate (the projector's consumer settings, each event
//! decoded, batches acknowledged, no store), and the real projector role replaying the
//! whole log into an empty embedded SQLite store and into an empty keyspace on the local
//! Cassandra node (RF 1, LOCAL_QUORUM). Last, the latency of history pages (50 messages,
//! `before` anywhere in the conversation) read back from each store. Needs Java for the
//! Cassandra node; run it on a quiet machine.

use crate::support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::consumer::{AckPolicy, pull};
use futures::StreamExt;
use parley_events::subjects::LOG_STREAM;
use parley_events::{ConversationId, EventEnvelope};
use parley_localstack::{CassandraNode, NatsOptions, NatsServer};
use parley_projections::ConversationStore;
use parley_services::admin::Readiness;
use parley_services::config::{Config, StoreKind};
use parley_services::node;
use parley_services::projector::Projector;
use parley_services::topology;
use tokio_util::sync::CancellationToken;

const MESSAGES: u64 = 100_000;
const PAGE: u32 = 50;
const PAGE_READS: usize = 2_000;

/// Consume the whole log as the projector's consumer does, without a store: events/s.
async fn raw_consume_rate(topology: &topology::Topology, batch: usize, total: u64) -> f64 {
    let consumer = topology
        .log
        .create_consumer(pull::Config {
            durable_name: Some("bench-raw".into()),
            ack_policy: AckPolicy::All,
            max_ack_pending: i64::try_from(batch * 4).unwrap(),
            ..Default::default()
        })
        .await
        .unwrap();
    let started = Instant::now();
    let mut messages = consumer
        .stream()
        .max_messages_per_batch(batch)
        .messages()
        .await
        .unwrap()
        .ready_chunks(batch);
    let mut seen = 0;
    while seen < total {
        let chunk = messages.next().await.unwrap();
        let mut last = None;
        for message in chunk {
            let message = message.unwrap();
            EventEnvelope::from_bytes(&message.payload).unwrap();
            seen += 1;
            last = Some(message);
        }
        last.unwrap().ack().await.unwrap();
    }
    let rate = total as f64 / started.elapsed().as_secs_f64();
    topology.log.delete_consumer("bench-raw").await.unwrap();
    rate
}

/// Replay the whole log into the configured (empty) store with the projector role: events/s.
async fn projection_rate(
    config: &Arc<Config>,
    topology: &topology::Topology,
    store: Arc<dyn ConversationStore>,
    last: u64,
) -> f64 {
    let shutdown = CancellationToken::new();
    let projector = Projector::build(
        Arc::clone(config),
        topology.clone(),
        Arc::clone(&store),
        Readiness::default(),
    );
    let started = Instant::now();
    let running = tokio::spawn(projector.run(shutdown.clone()));
    while store.position().await.unwrap() < last {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let rate = last as f64 / started.elapsed().as_secs_f64();
    shutdown.cancel();
    running.await.unwrap();
    rate
}

/// Latency of history pages with `before` spread over the conversation: (p50, p99) in ms.
async fn history_latency(
    store: &dyn ConversationStore,
    conversation: ConversationId,
    last: u64,
) -> (f64, f64) {
    let mut histogram = hdrhistogram::Histogram::<u64>::new(3).unwrap();
    // xorshift: a fixed, dependency-free spread of `before` values.
    let mut state: u64 = 0x9E37_79B9_7F4A_7C15;
    for _ in 0..PAGE_READS {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        let before = 2 + state % last;
        let started = Instant::now();
        let page = store
            .history(conversation, Some(before), PAGE)
            .await
            .unwrap();
        histogram
            .record(started.elapsed().as_micros() as u64)
            .unwrap();
        assert!(page.messages.len() == PAGE as usize || before <= u64::from(PAGE) + 2);
    }
    (
        histogram.value_at_quantile(0.5) as f64 / 1000.0,
        histogram.value_at_quantile(0.99) as f64 / 1000.0,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a benchmark: run it on a quiet machine, in release, with --ignored"]
async fn projection_store_figures() {
    let nats = NatsServer::start(NatsOptions {
        sync_always: false,
        ..NatsOptions::default()
    })
    .unwrap();
    let cassandra = CassandraNode::start().expect("the figures need the local Cassandra node");
    let dir = tempfile::tempdir().unwrap();
    let (config, _connection, topology) = support::topology_on(&nats.url()).await;

    let (conversation, events) = support::direct_chat("alice", "bob", MESSAGES);
    let subject = topology.shards.subject(conversation);
    let started = Instant::now();
    let mut acks = Vec::new();
    for envelope in events {
        acks.push(
            topology
                .js
                .publish(subject.clone(), envelope.to_bytes().into())
                .await
                .unwrap(),
        );
        if acks.len() == 256 {
            for ack in acks.drain(..) {
                ack.await.unwrap();
            }
        }
    }
    for ack in acks {
        ack.await.unwrap();
    }
    let last = topology
        .js
        .get_stream(LOG_STREAM)
        .await
        .unwrap()
        .info()
        .await
        .unwrap()
        .state
        .last_sequence;
    eprintln!(
        "appended {last} events in {:.1} s",
        started.elapsed().as_secs_f64()
    );

    let batch = config.projector.batch;
    let raw = raw_consume_rate(&topology, batch, last).await;

    let mut results = Vec::new();
    for kind in [StoreKind::Sqlite, StoreKind::Scylla] {
        let mut config = config.clone();
        config.projector.store.kind = kind;
        config.projector.store.path = dir.path().join("conversations.db");
        let scylla = &mut config.projector.store.scylla;
        scylla.contact_points = vec![cassandra.contact_point()];
        scylla.keyspace = "figures".into();
        scylla.local_datacenter = Some(cassandra.datacenter().into());
        scylla.replication = [(cassandra.datacenter().to_owned(), 1)].into();
        let config = Arc::new(config);
        let store = node::open_store(&config).await.unwrap();
        let rate = projection_rate(&config, &topology, Arc::clone(&store), last).await;
        let (p50, p99) = history_latency(&*store, conversation, last).await;
        results.push((kind, rate, p50, p99));
    }

    println!(
        "\n{last} events (1 conversation.created + {MESSAGES} message.posted, one conversation); batch {batch}"
    );
    println!("nats-server: file storage, R1, default lazy fsync");
    println!("raw JetStream consume (decode + ack, no store): {raw:.0} events/s");
    println!(
        "| store | apply rate (events/s) | ratio to raw consume | history page of {PAGE}, p50 | p99 |"
    );
    println!("|---|---|---|---|---|");
    for (kind, rate, p50, p99) in results {
        println!(
            "| {} | {rate:.0} | {:.2} | {p50:.2} ms | {p99:.2} ms |",
            kind.as_str(),
            rate / raw
        );
    }
}
