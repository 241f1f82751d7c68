//! The platform on a 3-node NATS cluster (log and intake replicated on every node): the
//! chat works, and when the log's stream leader is killed with SIGKILL under load and
//! restarted, every acknowledged send is in the log exactly once with an intact `prev`
//! chain. The interruption is measured and printed, not asserted (timing is the
//! benchmarks' business).

use crate::support;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use parley_events::subjects::LOG_STREAM;
use parley_events::{ConversationId, Event};
use parley_localstack::{NatsCluster, NatsClusterOptions};
use parley_services::admin::Readiness;
use parley_services::config::{Config, Secret};
use parley_services::node;
use serde_json::json;
use support::{Client, Platform, eventually_within};
use tokio::time::Instant;

/// Senders during the kill test, each in a direct conversation of its own.
const SENDERS: usize = 4;
/// Sends per sender: a few hundred in all, over about ten seconds plus the interruption.
const SENDS_PER_SENDER: usize = 75;
/// Time between one sender's sends.
const PACE: Duration = Duration::from_millis(100);
/// Longest a send may stay unacknowledged (retried) before the test gives up.
const GIVE_UP: Duration = Duration::from_secs(60);
/// How long the killed node stays down.
const DOWNTIME: Duration = Duration::from_secs(2);

async fn cluster_platform(gateways: usize) -> Platform<NatsCluster> {
    Platform::start_on_cluster(NatsClusterOptions::default(), gateways, |_| {}).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_works_on_a_three_node_cluster() {
    let platform = cluster_platform(1).await;
    let js = platform.jetstream().await;
    let mut log = js.get_stream(LOG_STREAM).await.unwrap();
    let info = log.info().await.unwrap();
    assert_eq!(info.config.num_replicas, 3);
    let cluster = info.cluster.clone().expect("a clustered stream");
    assert_eq!(cluster.replicas.len(), 2, "{cluster:?}");

    let (mut alice, mut bob, conversation) = platform.alice_and_bob().await;
    alice
        .send(json!({"type": "send", "id": "m-1", "conversation": conversation, "body": "hi bob"}))
        .await;
    let ack = alice.reply_to("m-1").await;
    assert_eq!(ack["type"], "ack", "{ack}");
    let delivered = bob.next_of(&["event"]).await;
    assert_eq!(delivered["event"]["data"]["body"], "hi bob");
    assert_eq!(delivered["event"]["seq"], ack["seq"]);

    platform.projected().await;
    let store = platform.store().await;
    let page = store.history(conversation, None, 10).await.unwrap();
    let bodies: Vec<_> = page.messages.iter().map(|m| m.body.as_str()).collect();
    assert_eq!(bodies, ["hi bob"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_comma_separated_url_reaches_the_cluster_with_its_first_node_down() {
    let mut cluster = NatsCluster::start(NatsClusterOptions::default()).unwrap();
    cluster.kill(0);
    let mut config = Config::default();
    config.nats.url = Some(Secret::new(cluster.urls().join(" , ")));
    let nats = node::connect_nats(&config, &Readiness::default())
        .await
        .expect("connects to a live node of the list");
    let js = async_nats::jetstream::new(nats.client);
    // The API answers through the live nodes (the metadata group keeps its quorum).
    eventually_within(Duration::from_secs(30), || async {
        js.query_account().await.ok()
    })
    .await;
}

/// What one sender saw: per acknowledged send, its body, sequence, when it was first sent
/// and when the ack came.
#[derive(Debug)]
struct Acked {
    body: String,
    seq: u64,
    sent: Instant,
    at: Instant,
}

/// Sends `SENDS_PER_SENDER` messages, one every `PACE`, each retried with the same id on a
/// retryable error until acknowledged; fails after `GIVE_UP` on one send. A failover takes
/// longer than the gateway's command timeout: a send is answered `timeout`, and its ack
/// comes later, to the first copy or to the retry.
async fn send_steadily(
    mut client: Client,
    sender: usize,
    conversation: ConversationId,
    acked: Arc<Mutex<Vec<Acked>>>,
) {
    let mut pace = tokio::time::interval(PACE);
    pace.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    for n in 0..SENDS_PER_SENDER {
        pace.tick().await;
        let id = format!("m-{n}");
        let body = format!("s{sender}-{n}");
        let sent = Instant::now();
        let give_up = sent + GIVE_UP;
        loop {
            client
                .send(json!({"type": "send", "id": id, "conversation": conversation, "body": body}))
                .await;
            let reply = client
                .reply_to_within(&id, give_up.saturating_duration_since(Instant::now()))
                .await
                .unwrap_or_else(|| panic!("{body} still not acknowledged after {GIVE_UP:?}"));
            if reply["type"] == "ack" {
                acked.lock().unwrap().push(Acked {
                    body: body.clone(),
                    seq: reply["seq"].as_u64().expect("an ack has a seq"),
                    sent,
                    at: Instant::now(),
                });
                break;
            }
            assert_eq!(reply["retryable"], true, "{body}: {reply}");
            assert!(
                Instant::now() < give_up,
                "{body} still not acknowledged after {GIVE_UP:?}: {reply}"
            );
            tokio::time::sleep(PACE).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_log_leader_loses_and_duplicates_no_acknowledged_send() {
    let mut platform = cluster_platform(2).await;
    let mut senders = Vec::new();
    for i in 0..SENDERS {
        let mut sender = platform.connect(i % 2, &format!("sender-{i}")).await;
        let peer = format!("peer-{i}");
        let mut receiver = platform.connect((i + 1) % 2, &peer).await;
        let conversation = platform.direct(&mut sender, &mut receiver, &peer).await;
        receiver.close().await;
        senders.push((sender, conversation));
    }

    let acked = Arc::new(Mutex::new(Vec::new()));
    let tasks: Vec<_> = senders
        .into_iter()
        .enumerate()
        .map(|(i, (client, conversation))| {
            tokio::spawn(send_steadily(client, i, conversation, Arc::clone(&acked)))
        })
        .collect();

    // A third of the sends in, kill the node leading the log's stream: its appends in
    // flight fail, and the other two elect a new leader.
    eventually_within(Duration::from_secs(30), || async {
        (acked.lock().unwrap().len() >= SENDERS * SENDS_PER_SENDER / 3).then_some(())
    })
    .await;
    let js = platform.jetstream().await;
    let leader = log_leader(&js).await;
    let node = platform
        .nats
        .index_of(&leader)
        .expect("the log's leader is a node of the cluster");
    platform.nats.kill(node);
    let killed_at = Instant::now();
    tokio::time::sleep(DOWNTIME).await;
    tokio::task::block_in_place(|| platform.nats.restart(node)).expect("the node restarts");
    let restarted_at = Instant::now();

    for task in tasks {
        task.await.expect("every send is acknowledged");
    }
    let mut acked = std::mem::take(&mut *acked.lock().unwrap());
    assert_eq!(acked.len(), SENDERS * SENDS_PER_SENDER);

    // The interruption, as clients saw it.
    acked.sort_by_key(|a| a.at);
    let longest_gap = acked
        .windows(2)
        .map(|w| w[1].at - w[0].at)
        .max()
        .unwrap_or_default();
    // A send first made after the kill measures the failover alone (one made before may
    // have been appended before the kill, with only its ack after it).
    let kill_to_ack = acked
        .iter()
        .filter(|a| a.sent > killed_at)
        .map(|a| a.at - killed_at)
        .min();
    let new_leader = log_leader(&js).await;
    println!(
        "killed the log leader {leader} (node {node}) for {DOWNTIME:?}; new leader \
         {new_leader}; longest time between two acks {longest_gap:?}; kill -> first ack of a \
         send made after the kill {kill_to_ack:?}; node back {:?} after the kill",
        restarted_at - killed_at
    );

    // Every replica caught up, so reads served by any of them see the whole log.
    eventually_within(Duration::from_secs(30), || async {
        let mut stream = js.get_stream(LOG_STREAM).await.ok()?;
        let cluster = stream.info().await.ok()?.cluster.clone()?;
        (cluster.leader.is_some()
            && cluster.replicas.len() == 2
            && cluster.replicas.iter().all(|r| r.current && !r.offline))
        .then_some(())
    })
    .await;
    let log = platform.log().await;

    // Exactly once: each acknowledged body is posted once, at the acknowledged sequence,
    // and nothing else was posted.
    let mut posted: HashMap<&str, Vec<u64>> = HashMap::new();
    for event in &log {
        if let Event::MessagePosted(message) = &event.envelope.event {
            posted.entry(&message.body).or_default().push(event.seq);
        }
    }
    for a in &acked {
        assert_eq!(
            posted.get(a.body.as_str()),
            Some(&vec![a.seq]),
            "{} acknowledged at {}",
            a.body,
            a.seq
        );
    }
    assert_eq!(posted.len(), acked.len(), "posted but never acknowledged");

    // One unbroken `prev` chain per conversation.
    let mut last: BTreeMap<ConversationId, u64> = BTreeMap::new();
    for event in &log {
        let previous = last.insert(event.envelope.conversation, event.seq);
        assert_eq!(
            event.envelope.prev,
            previous.unwrap_or(0),
            "event {} of {}",
            event.seq,
            event.envelope.conversation
        );
    }
    assert_eq!(last.len(), SENDERS);
}

/// The server name of the node leading the log's stream.
async fn log_leader(js: &async_nats::jetstream::Context) -> String {
    eventually_within(Duration::from_secs(30), || async {
        let mut stream = js.get_stream(LOG_STREAM).await.ok()?;
        stream.info().await.ok()?.cluster.clone()?.leader
    })
    .await
}
