//! Commands through faults: a NATS restart, a stopped handler, a full intake, a handler
//! that crashed between its append and its acknowledgement, several handler instances
//! taking one socket's pipelined sends. What the client sees (ack, `timeout`, `unavailable`,
//! a late ack, the order of its sends) and what the log holds afterwards.

use crate::support;

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use parley_events::subjects::log_subject;
use parley_events::{ConversationId, Outcome};
use parley_services::handler::{Decision, WriteModel};
use serde_json::{Value, json};
use support::{Client, Platform, eventually, http_get};

fn send(id: &str, conversation: ConversationId, body: &str) -> Value {
    json!({"type": "send", "id": id, "conversation": conversation, "body": body})
}

/// The replies to `id` until its final one: an `ack` or a non-`timeout` error, after any
/// number of `timeout` errors (which say the outcome is not known yet).
async fn final_reply(client: &mut Client, id: &str) -> (Value, usize) {
    let mut timeouts = 0;
    loop {
        let reply = client.reply_to(id).await;
        if reply["type"] == "error" && reply["code"] == "timeout" {
            assert_retryable(&reply, "timeout");
            timeouts += 1;
            continue;
        }
        return (reply, timeouts);
    }
}

/// `reply` is a retryable `error` with `code`.
fn assert_retryable(reply: &Value, code: &str) {
    assert_eq!(reply["type"], "error", "{reply}");
    assert_eq!(reply["code"], code, "{reply}");
    assert_eq!(reply["retryable"], true, "{reply}");
}

/// Every role's `/readyz` status.
async fn readiness(platform: &Platform) -> Vec<(u16, String)> {
    let mut statuses = Vec::new();
    for address in platform.admin_addresses() {
        statuses.push(http_get(address, "/readyz").await);
    }
    statuses
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_nats_restart_sends_succeed_at_once_and_no_role_was_ready_without_it() {
    let mut platform = Platform::start(1).await;
    platform.add_handler().await;
    let (mut alice, mut bob, conversation) = platform.alice_and_bob().await;
    alice.send(send("before", conversation, "before")).await;
    assert_eq!(alice.reply_to("before").await["type"], "ack");

    platform.nats.stop();
    eventually(|| async {
        let statuses = readiness(&platform).await;
        statuses
            .iter()
            .all(|(status, body)| *status == 503 && body.contains("disconnected"))
            .then_some(())
    })
    .await;
    // Sent while NATS is down: the gateway follows it through the outage.
    alice.send(send("during", conversation, "during")).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    platform.nats.restart().expect("nats-server restarts");
    let back = std::time::Instant::now();

    // No client retry: one frame each, answered by an ack.
    alice.send(send("after", conversation, "after")).await;
    let (during, _) = final_reply(&mut alice, "during").await;
    assert_eq!(during["type"], "ack", "{during}");
    let (after, timeouts) = final_reply(&mut alice, "after").await;
    assert_eq!(after["type"], "ack", "{after}");
    assert_eq!(timeouts, 0, "answered within the command timeout");
    println!(
        "first send after the restart acked {:?} after nats-server answered",
        back.elapsed()
    );
    assert!(
        during["seq"].as_u64() < after["seq"].as_u64(),
        "the socket's sends stay in order"
    );
    eventually(|| async {
        readiness(&platform)
            .await
            .iter()
            .all(|(status, _)| *status == 200)
            .then_some(())
    })
    .await;

    let bodies = platform.posted_bodies().await;
    assert_eq!(bodies, ["before", "during", "after"]);
    for body in ["during", "after"] {
        loop {
            let frame = bob.next_of(&["event"]).await;
            if frame["event"]["data"]["body"] == body {
                break;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_sends_keep_their_order_with_three_handlers() {
    let mut platform = Platform::start(1).await;
    platform.add_handler().await;
    platform.add_handler().await;
    // No wait for the instances to settle: the first bursts meet partitions moving.
    let (mut alice, _bob, conversation) = platform.alice_and_bob().await;
    let (bursts, per_burst) = (10, 20);
    let mut sent = Vec::new();
    for burst in 0..bursts {
        let ids: Vec<String> = (0..per_burst).map(|i| format!("b{burst}-{i}")).collect();
        for id in &ids {
            alice.send(send(id, conversation, id)).await;
        }
        let mut last_seq = 0;
        for id in &ids {
            let ack = alice.reply_to(id).await;
            assert_eq!(ack["type"], "ack", "{ack}");
            let seq = ack["seq"].as_u64().unwrap();
            assert!(
                seq > last_seq,
                "{id} acked at {seq}, before an earlier send's {last_seq}"
            );
            last_seq = seq;
        }
        sent.extend(ids);
    }
    let logged = platform.posted_bodies().await;
    assert_eq!(
        logged, sent,
        "the log holds the sends in the order the socket sent them"
    );
}

/// `per_partition` direct conversations of `client`'s in every intake partition (16
/// shards, 16 partitions: one shard each).
async fn conversations_in_every_partition(
    platform: &Platform,
    client: &mut Client,
    per_partition: usize,
) -> Vec<ConversationId> {
    let mut conversations: HashMap<String, Vec<ConversationId>> = HashMap::new();
    let mut peers = 0;
    while conversations.len() < 16 || conversations.values().any(|c| c.len() < per_partition) {
        let peer = format!("peer{peers}");
        peers += 1;
        client
            .send(json!({"type": "create_direct", "id": peer, "peer": peer}))
            .await;
        let ack = client.reply_to(&peer).await;
        assert_eq!(ack["type"], "ack", "{ack}");
        let conversation: ConversationId = ack["conversation"].as_str().unwrap().parse().unwrap();
        let partition = conversations
            .entry(platform.intake_subject(conversation))
            .or_default();
        if partition.len() < per_partition {
            partition.push(conversation);
        }
    }
    conversations.into_values().flatten().collect()
}

/// A command stranded by a handler would wait out this ack wait, and the socket would see
/// `timeout` after the command timeout: both are far longer than a reply is waited for.
fn strandings_show(config: &mut parley_services::config::Config) {
    config.intake.ack_wait_secs = 120;
    config.intake.max_hold_secs = 120;
    config.gateway.command_timeout_secs = 30;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_partitions_of_a_stopped_handler_are_taken_by_the_other_at_once() {
    let mut platform = Platform::start_with(1, strandings_show).await;
    platform.add_handler().await;
    platform.handlers_announced(2).await;
    let mut alice = platform.connect(0, "alice").await;
    let conversations = conversations_in_every_partition(&platform, &mut alice, 1).await;

    platform.stop_handler().await;
    for (i, conversation) in conversations.iter().enumerate() {
        alice
            .send(send(&format!("after-{i}"), *conversation, "after"))
            .await;
    }
    for i in 0..conversations.len() {
        let reply = alice.reply_to(&format!("after-{i}")).await;
        assert_eq!(reply["type"], "ack", "{reply}");
    }
    assert_eq!(platform.posted_bodies().await.len(), conversations.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sends_in_flight_while_partitions_change_hands_are_never_stranded() {
    let mut platform = Platform::start_with(1, strandings_show).await;
    let mut alice = platform.connect(0, "alice").await;
    let conversations = conversations_in_every_partition(&platform, &mut alice, 4).await;

    // Rounds of one send per conversation, until told to stop, while a second and a third
    // instance join (partitions move to each) and then the first stops (its own move).
    let stop = tokio_util::sync::CancellationToken::new();
    let sending = tokio::spawn({
        let stop = stop.clone();
        async move {
            let mut sent = 0;
            while !stop.is_cancelled() {
                let ids: Vec<String> = (0..conversations.len())
                    .map(|i| format!("m{}", sent + i))
                    .collect();
                for (id, conversation) in ids.iter().zip(&conversations) {
                    alice.send(send(id, *conversation, id)).await;
                }
                for id in &ids {
                    let reply = alice.reply_to_within(id, Duration::from_secs(10)).await;
                    let reply = reply.unwrap_or_else(|| panic!("{id} is stranded"));
                    assert_eq!(reply["type"], "ack", "{reply}");
                }
                sent += ids.len();
            }
            sent
        }
    });
    for instances in 2..=3 {
        tokio::time::sleep(Duration::from_millis(300)).await;
        platform.add_handler().await;
        platform.handlers_announced(instances).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    platform.stop_handler().await;
    platform.handlers_announced(2).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.cancel();
    let sent = sending.await.expect("every send is acknowledged in time");
    println!("{sent} sends while partitions changed hands");
    assert_eq!(platform.posted_bodies().await.len(), sent);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_taken_by_a_handler_that_died_is_acknowledged_before_the_command_timeout() {
    use async_nats::jetstream::consumer::PullConsumer;
    use async_nats::jetstream::consumer::pull::BatchConfig;
    use futures::StreamExt;
    use parley_events::subjects::{HANDLER_PRIORITY_GROUP, INTAKE_STREAM, Shards};
    use parley_services::config::Config;

    // The defaults: the intake's ack wait (5 s) is shorter than the command timeout (10 s,
    // which the other tests shorten).
    let mut platform = Platform::start_with(1, |config| {
        config.gateway.command_timeout_secs = Config::default().gateway.command_timeout_secs;
    })
    .await;
    let (mut alice, _bob, conversation) = platform.alice_and_bob().await;
    platform.stop_handler().await;
    alice
        .send(send("taken", conversation, "taken by a handler that died"))
        .await;

    // A handler that takes the command, at the owner's priority, and dies before answering.
    let shards = Shards::new(platform.config.log.shards).unwrap();
    let partition = shards.intake_partition(shards.of(conversation));
    let dying = async_nats::connect(platform.nats.url()).await.unwrap();
    let consumer: PullConsumer = async_nats::jetstream::new(dying.clone())
        .get_consumer_from_stream(
            parley_events::subjects::handler_consumer(partition),
            INTAKE_STREAM,
        )
        .await
        .unwrap();
    let inbox = dying.new_inbox();
    let mut taken = dying.subscribe(inbox.clone()).await.unwrap();
    consumer
        .request_batch(
            BatchConfig {
                batch: 1,
                expires: Some(Duration::from_secs(10)),
                group: Some(HANDLER_PRIORITY_GROUP.to_owned()),
                priority: Some(0),
                ..BatchConfig::default()
            },
            inbox.into(),
        )
        .await
        .unwrap();
    let command = tokio::time::timeout(Duration::from_secs(10), taken.next())
        .await
        .expect("the dying handler takes the command")
        .unwrap();
    let command = parley_events::Command::from_bytes(&command.payload).unwrap();
    assert_eq!(command.conversation(), conversation);
    dying.drain().await.unwrap();
    assert!(
        taken.next().await.is_none(),
        "the dying handler's connection is closed"
    );

    platform.start_handler().await;
    let reply = alice.reply_to("taken").await;
    assert_eq!(
        reply["type"], "ack",
        "redelivered after the ack wait, answered before the command timeout: {reply}"
    );
    assert_eq!(
        platform.posted_bodies().await,
        ["taken by a handler that died"]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timeout_is_followed_by_the_late_ack_and_a_retry_gets_the_same_ack() {
    let mut platform = Platform::start_with(1, |c| c.gateway.command_timeout_secs = 1).await;
    let (mut alice, _bob, conversation) = platform.alice_and_bob().await;
    platform.stop_handler().await;
    alice.send(send("slow", conversation, "slow")).await;
    assert_retryable(&alice.reply_to("slow").await, "timeout");

    platform.start_handler().await;
    let late = alice.reply_to("slow").await;
    assert_eq!(
        late["type"], "ack",
        "the outcome follows the timeout: {late}"
    );
    alice.send(send("slow", conversation, "slow")).await;
    let again = alice.reply_to("slow").await;
    assert_eq!(again["type"], "ack", "{again}");
    assert_eq!(again["seq"], late["seq"]);
    assert_eq!(again["event"], late["event"]);
    assert_eq!(platform.posted().await.len(), 1, "appended once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_intake_answers_unavailable_and_a_retry_succeeds_once_it_drains() {
    let mut platform = Platform::start_with(1, |c| {
        c.intake.max_messages = 1;
        c.gateway.command_timeout_secs = 30;
    })
    .await;
    let mut alice = platform.connect(0, "alice").await;
    let mut bob = platform.connect(0, "bob").await;
    let mut carol = platform.connect(0, "carol").await;
    let with_bob = platform.direct(&mut alice, &mut bob, "bob").await;
    let with_carol = platform.direct(&mut carol, &mut alice, "alice").await;
    platform.stop_handler().await;

    // The first fills the intake; the second (another conversation, so it does not wait
    // behind the first) is refused by it.
    alice.send(send("queued", with_bob, "queued")).await;
    alice.send(send("refused", with_carol, "refused")).await;
    assert_retryable(&alice.reply_to("refused").await, "unavailable");

    platform.start_handler().await;
    let (queued, _) = final_reply(&mut alice, "queued").await;
    assert_eq!(queued["type"], "ack", "{queued}");
    alice.send(send("refused", with_carol, "refused")).await;
    let (retried, _) = final_reply(&mut alice, "refused").await;
    assert_eq!(retried["type"], "ack", "{retried}");
    let bodies = platform.posted_bodies().await;
    assert_eq!(bodies, ["queued", "refused"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_redelivered_after_a_crash_between_append_and_ack_gets_its_original_seq() {
    use futures::StreamExt;

    let mut platform = Platform::start(1).await;
    let (_alice, _bob, conversation) = platform.alice_and_bob().await;
    platform.stop_handler().await;

    // What a handler that died right after its append left behind: the event in the log,
    // the command still on the intake.
    let command = support::alice_posts(conversation, "crashed", "appended before the crash");
    let shards = parley_events::subjects::Shards::new(platform.config.log.shards).unwrap();
    let mut model = WriteModel::new(shards, 100);
    for event in platform.log().await {
        model.apply(&event, true);
    }
    let Decision::Append {
        event,
        shard,
        expected_shard_seq,
    } = model.decide(&command, &platform.config.limits)
    else {
        panic!("the write model appends the command");
    };
    let client = async_nats::connect(platform.nats.url()).await.unwrap();
    let mut outcomes = client.subscribe("parley.outcome.test").await.unwrap();
    let js = async_nats::jetstream::new(client);
    let appended = js
        .send_publish(
            log_subject(shard),
            async_nats::jetstream::message::PublishMessage::build()
                .payload(event.to_bytes().into())
                .message_id(event.id.to_string())
                .expected_last_subject_sequence(expected_shard_seq),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    js.send_publish(
        platform.intake_subject(command.conversation()),
        async_nats::jetstream::message::PublishMessage::build()
            .payload(command.to_bytes().into())
            .message_id(command.id.to_string()),
    )
    .await
    .unwrap()
    .await
    .unwrap();

    platform.start_handler().await;
    let message = tokio::time::timeout(Duration::from_secs(10), outcomes.next())
        .await
        .expect("the redelivered command is answered")
        .unwrap();
    let outcome = Outcome::from_bytes(&message.payload).unwrap();
    assert_eq!(
        outcome.result,
        parley_events::OutcomeResult::Accepted {
            conversation,
            seq: appended.sequence,
            event: event.id,
        }
    );
    let bodies = platform.posted_bodies().await;
    assert_eq!(bodies, ["appended before the crash"], "appended once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_senders_on_two_gateways_leave_one_chain_per_conversation_and_exact_deliveries()
{
    let mut platform = Platform::start(2).await;
    platform.add_handler().await;
    let users = ["ann", "ben", "cat"];
    // Two sockets per user, one on each gateway.
    let mut sockets = Vec::new();
    for user in users {
        for gateway in 0..2 {
            sockets.push((user, platform.connect(gateway, user).await));
        }
    }
    let (_, owner) = &mut sockets[0];
    owner
        .send(json!({"type": "create_group", "id": "g", "title": "all", "members": ["ben", "cat"]}))
        .await;
    let ack = owner.reply_to("g").await;
    assert_eq!(ack["type"], "ack", "{ack}");
    let group: ConversationId = ack["conversation"].as_str().unwrap().parse().unwrap();
    for (_, socket) in &mut sockets {
        let created = socket.next_of(&["event"]).await;
        assert_eq!(created["event"]["type"], "conversation.created");
    }

    // Every socket pipelines its sends at once.
    let per_socket = 15;
    for (index, (_, socket)) in sockets.iter_mut().enumerate() {
        for i in 0..per_socket {
            let id = format!("s{index}-{i}");
            socket.send(send(&id, group, &id)).await;
        }
    }
    let total = sockets.len() * per_socket;
    for (index, (_, socket)) in sockets.iter_mut().enumerate() {
        for i in 0..per_socket {
            let (reply, _) = final_reply(socket, &format!("s{index}-{i}")).await;
            assert_eq!(reply["type"], "ack", "{reply}");
        }
    }

    // Each socket receives exactly every message, each once, in log order.
    for (user, socket) in &mut sockets {
        let mut seen = HashSet::new();
        let mut last = 0;
        while seen.len() < total {
            let frame = socket.next_of(&["event"]).await;
            let seq = frame["event"]["seq"].as_u64().unwrap();
            assert!(seen.insert(seq), "{user}: seq {seq} delivered twice");
            assert!(seq > last, "{user}: seq {seq} after {last}");
            last = seq;
        }
        socket.expect_silence(Duration::from_millis(200)).await;
    }

    // The whole log: one unbroken `prev` chain per conversation, no fork, no double append.
    let log = platform.log().await;
    let mut newest: HashMap<ConversationId, u64> = HashMap::new();
    let mut bodies = HashSet::new();
    for event in &log {
        let previous = newest
            .insert(event.envelope.conversation, event.seq)
            .unwrap_or(0);
        assert_eq!(
            event.envelope.prev, previous,
            "seq {} breaks the chain",
            event.seq
        );
        if let parley_events::Event::MessagePosted(posted) = &event.envelope.event {
            assert!(
                bodies.insert(posted.body.clone()),
                "{} appended twice",
                posted.body
            );
        }
    }
    assert_eq!(bodies.len(), total);
}
