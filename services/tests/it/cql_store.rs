//! The roles on the CQL store, on a local Cassandra node: a chat carried end to end, a wrong
//! keyspace or schema refused at start, unusable TLS files refused at start, the store
//! unreachable at start, and the node killed with `kill -9` in the middle of projecting.
//!
//! One node serves this test binary (starting one takes ~10 s); the tests take turns on it,
//! each in its own keyspace. Without Java the tests print `skipped: ...`, unless CI or
//! `PARLEY_REQUIRE_CQL` requires them.

use crate::support;

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use parley_events::subjects::{LOG_STREAM, PROJECTOR_CONSUMER};
use parley_localstack::{CassandraNode, NatsOptions, NatsServer, RedisOptions, RedisServer};
use parley_services::config::{Config, Secret, StoreKind};
use parley_services::node::{self, Listeners, Roles};
use serde_json::json;
use support::{Platform, eventually, eventually_within, run_refused_projector};
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;

/// The binary's node, taken in turn by the tests (the fault test kills and restarts it).
async fn node() -> Option<tokio::sync::MutexGuard<'static, CassandraNode>> {
    static NODE: OnceLock<Option<Mutex<CassandraNode>>> = OnceLock::new();
    let node = NODE.get_or_init(|| {
        CassandraNode::start_or_skip("the services' CQL store tests").map(Mutex::new)
    });
    Some(node.as_ref()?.lock().await)
}

fn use_cql(config: &mut Config, node: &CassandraNode, keyspace: &str) {
    let store = &mut config.projector.store;
    store.kind = StoreKind::Scylla;
    store.scylla.contact_points = vec![node.contact_point()];
    store.scylla.keyspace = keyspace.to_owned();
    store.scylla.local_datacenter = Some(node.datacenter().to_owned());
    store.scylla.replication = [(node.datacenter().to_owned(), 1)].into();
}

async fn session(node: &CassandraNode) -> scylla::client::session::Session {
    scylla::client::session_builder::SessionBuilder::new()
        .known_node(node.contact_point())
        .build()
        .await
        .unwrap()
}

async fn tables(node: &CassandraNode, keyspace: &str) -> usize {
    session(node)
        .await
        .query_unpaged(
            "SELECT table_name FROM system_schema.tables WHERE keyspace_name = ?",
            (keyspace,),
        )
        .await
        .unwrap()
        .into_rows_result()
        .unwrap()
        .rows_num()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chat_is_carried_and_read_back_through_the_cql_store() {
    let Some(node) = node().await else { return };
    let platform = Platform::start_with(1, |c| use_cql(c, &node, "chat")).await;
    let (mut alice, mut bob, conversation) = platform.alice_and_bob().await;
    for n in 0..5 {
        let id = format!("m{n}");
        alice
            .send(json!({"type": "send", "id": id, "conversation": conversation, "body": format!("hello {n}")}))
            .await;
        assert_eq!(alice.reply_to(&id).await["type"], "ack");
        let event = bob.next_of(&["event"]).await;
        assert_eq!(event["event"]["data"]["body"], format!("hello {n}"));
    }
    platform.projected().await;
    bob.send(json!({"type": "history", "id": "h", "conversation": conversation, "limit": 3}))
        .await;
    let history = bob.next_of(&["history"]).await;
    let bodies: Vec<_> = history["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["body"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(bodies, ["hello 4", "hello 3", "hello 2"], "{history}");
    assert_eq!(history["has_more"], true);
    let inbox = platform
        .store()
        .await
        .inbox(&parley_events::UserId::parse("bob").unwrap(), None, 10)
        .await
        .unwrap();
    assert_eq!(inbox.len(), 1);
    assert_eq!(inbox[0].conversation, conversation);
}

/// NATS and Redis for a node run outside [`Platform`].
fn servers() -> (NatsServer, RedisServer, Config) {
    let nats = NatsServer::start(NatsOptions::default()).unwrap();
    let redis = RedisServer::start(RedisOptions::default()).unwrap();
    let mut config = Config::default();
    config.nats.url = Some(Secret::new(nats.url()));
    config.redis.url = Some(Secret::new(redis.url()));
    config.auth.secret = Some(Secret::new(support::SECRET));
    config.log.shards = 16;
    (nats, redis, config)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_keyspace_or_a_newer_schema_stops_the_node_at_start_and_writes_nothing() {
    let Some(node) = node().await else { return };
    let (_nats, _redis, mut config) = servers();
    let cql = session(&node).await;
    cql.query_unpaged(
        format!(
            "CREATE KEYSPACE billing WITH replication = {{'class': 'NetworkTopologyStrategy', '{}': 1}}",
            node.datacenter()
        ),
        (),
    )
    .await
    .unwrap();
    cql.query_unpaged("CREATE TABLE billing.invoices (id int PRIMARY KEY)", ())
        .await
        .unwrap();
    use_cql(&mut config, &node, "billing");
    let err = run_refused_projector(config.clone())
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("not Parley's") && err.contains("invoices"),
        "{err}"
    );
    assert_eq!(tables(&node, "billing").await, 1, "nothing was created");

    use_cql(&mut config, &node, "from_the_future");
    drop(
        parley_projections::CqlStore::open(&config.projector.store.scylla.options())
            .await
            .unwrap(),
    );
    cql.query_unpaged(
        "UPDATE from_the_future.schema_version SET version = 7 WHERE name = 'conversations'",
        (),
    )
    .await
    .unwrap();
    let err = run_refused_projector(config).await.unwrap_err().to_string();
    assert!(
        err.contains("schema version 7") && err.contains("upgrade"),
        "{err}"
    );
    let position = cql
        .query_unpaged("SELECT seq FROM from_the_future.projection_position", ())
        .await
        .unwrap()
        .into_rows_result()
        .unwrap()
        .rows_num();
    assert_eq!(position, 0, "nothing was projected");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unusable_cql_tls_files_stop_the_node_at_start() {
    // No node needed: the files are read before any connection is tried.
    let (_nats, _redis, mut config) = servers();
    let store = &mut config.projector.store;
    store.kind = StoreKind::Scylla;
    store.scylla.contact_points = vec!["127.0.0.1:1".into()];
    store.scylla.tls.enabled = true;
    let missing = std::env::temp_dir().join("parley-no-such-cql-ca.pem");
    store.scylla.tls.ca_file = Some(missing.clone());
    let err = run_refused_projector(config).await.unwrap_err().to_string();
    assert!(
        err.contains("config") && err.contains(&missing.display().to_string()),
        "{err}"
    );
}

async fn readyz(address: std::net::SocketAddr) -> (u16, serde_json::Value) {
    let (status, body) = support::http_get(address, "/readyz").await;
    (status, serde_json::from_str(&body).unwrap_or_default())
}

/// The acknowledged floor of the projector's consumer on the log; 0 in the moment a replay
/// from a store that came back behind has deleted the consumer and not yet re-created it.
async fn acked(platform: &Platform) -> u64 {
    let client = async_nats::connect(platform.nats.url()).await.unwrap();
    let js = async_nats::jetstream::new(client);
    let stream = js.get_stream(LOG_STREAM).await.unwrap();
    let Ok(mut consumer) = stream
        .get_consumer::<async_nats::jetstream::consumer::pull::Config>(PROJECTOR_CONSUMER)
        .await
    else {
        return 0;
    };
    consumer
        .info()
        .await
        .map_or(0, |info| info.ack_floor.stream_sequence)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_projector_waits_for_an_unreachable_store_and_survives_a_kill_9_mid_projection() {
    let Some(mut node) = node().await else { return };

    // The load-test harness measures the node through its JVM's process id.
    let jvm = node.pid().expect("a running node has a JVM");
    assert_eq!(
        std::fs::read_to_string(format!("/proc/{jvm}/comm"))
            .unwrap()
            .trim(),
        "java"
    );

    // Unreachable at start: the node runs, is not ready, says why, and retries.
    node.kill();
    assert_eq!(node.pid(), None, "a killed node has no JVM");
    let (_nats, _redis, mut config) = servers();
    use_cql(&mut config, &node, "faults");
    let admin = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = admin.local_addr().unwrap();
    let shutdown = CancellationToken::new();
    let running = tokio::spawn(node::run(
        Arc::new(config),
        Roles::PROJECTOR,
        Listeners {
            gateway: None,
            admin: Some(admin),
        },
        shutdown.clone(),
    ));
    let report = eventually(|| async {
        let (status, report) = readyz(address).await;
        (status == 503
            && report["store"]
                .as_str()
                .is_some_and(|s| s.contains("unavailable")))
        .then_some(report)
    })
    .await;
    assert_ne!(report["store"], "starting", "{report}");
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        !running.is_finished(),
        "an unreachable store does not stop the node"
    );
    node.restart().unwrap();
    // The node retries opening the store with backoff up to 30 s.
    eventually_within(Duration::from_secs(60), || async {
        let (status, report) = readyz(address).await;
        (status == 200 && report["store"] == "ok" && report["projector"] == "ok").then_some(())
    })
    .await;
    shutdown.cancel();
    running.await.unwrap().unwrap();

    // Killed in the middle of projecting: the projector holds its batch unacknowledged,
    // and once the node is back the store ends equal to the log.
    let platform = Platform::start_with(1, |c| use_cql(c, &node, "faults")).await;
    let (mut alice, _bob, conversation) = platform.alice_and_bob().await;
    let send = |n: u32| json!({"type": "send", "id": format!("m{n}"), "conversation": conversation, "body": format!("message {n}")});
    for n in 0..100 {
        alice.send(send(n)).await;
    }
    for n in 0..100 {
        assert_eq!(alice.reply_to(&format!("m{n}")).await["type"], "ack");
    }
    node.kill();
    for n in 100..200 {
        alice.send(send(n)).await;
        assert_eq!(alice.reply_to(&format!("m{n}")).await["type"], "ack");
    }
    let last = platform.log().await.last().unwrap().seq;
    let stalled = acked(&platform).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert_eq!(
        acked(&platform).await,
        stalled,
        "nothing is acknowledged while the store is down"
    );
    assert!(
        stalled < last,
        "the kill landed before the end of the log ({stalled} of {last})"
    );

    node.restart().unwrap();
    // The projector retries every few seconds and the driver reconnects on its own
    // schedule: give both longer than the usual wait.
    eventually_within(Duration::from_secs(60), || async {
        (acked(&platform).await >= last).then_some(())
    })
    .await;
    let store = platform.store().await;
    let mut stored = Vec::new();
    let mut before = None;
    loop {
        let page = store.history(conversation, before, 37).await.unwrap();
        stored.extend(page.messages.iter().map(|m| (m.seq, m.body.clone())));
        before = page.messages.last().map(|m| m.seq);
        if !page.has_more {
            break;
        }
    }
    stored.reverse();
    assert_eq!(stored, platform.posted().await, "the store equals the log");
}
