//! The platform rides out a NATS restart: clients keep their sockets, and sends after the
//! restart are appended, delivered and projected as before. And it can be stopped while
//! NATS is down.

use crate::support;

use std::time::Duration;

use serde_json::json;
use support::Platform;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chat_continues_after_nats_restarts() {
    let mut platform = Platform::start(1).await;
    let (mut alice, mut bob, conversation) = platform.alice_and_bob().await;
    alice
        .send(
            json!({"type": "send", "id": "before", "conversation": conversation, "body": "before"}),
        )
        .await;
    assert_eq!(
        bob.next_of(&["event"]).await["event"]["data"]["body"],
        "before"
    );

    platform.nats.stop();
    platform
        .nats
        .restart()
        .expect("nats-server restarts on its port and store");

    // Clients retry with the same id until the platform has reconnected; the id makes the
    // retries safe.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let ack = loop {
        alice.send(json!({"type": "send", "id": "after", "conversation": conversation, "body": "after"})).await;
        let reply = alice.reply_to("after").await;
        if reply["type"] == "ack" {
            break reply;
        }
        assert_eq!(
            reply["retryable"], true,
            "only retryable errors while NATS is back: {reply}"
        );
        assert!(
            tokio::time::Instant::now() < deadline,
            "no ack after the restart: {reply}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(ack["seq"].as_u64().unwrap() > 2);
    let delivered = loop {
        let frame = bob.next_of(&["event"]).await;
        if frame["event"]["data"]["body"] == "after" {
            break frame;
        }
    };
    assert_eq!(delivered["event"]["prev"], 2);
    bob.expect_silence(Duration::from_millis(300)).await;
    platform.projected().await;
    let bodies = platform.posted_bodies().await;
    assert_eq!(bodies, ["before", "after"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_role_stops_when_told_to_while_nats_is_down() {
    let mut platform = Platform::start(1).await;
    let (mut alice, mut bob, conversation) = platform.alice_and_bob().await;
    alice
        .send(json!({"type": "send", "id": "m", "conversation": conversation, "body": "hi"}))
        .await;
    assert_eq!(alice.reply_to("m").await["type"], "ack");
    bob.next_of(&["event"]).await;

    // As when a whole deployment is stopped and NATS goes first: nothing a role still
    // wants to tell NATS on its way out may keep it from stopping.
    // Its clients gone first, the gateway need not wait out its drain period for them.
    drop((alice, bob));
    platform.nats.stop();
    platform.stop_roles().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_at_start_holds_up_presence_only() {
    use parley_localstack::{RedisOptions, RedisServer};
    use parley_services::config::Secret;

    // Nothing listens on it until this test's Redis starts; free_port keeps it from every
    // other socket meanwhile (a port from the kernel was taken in CI during the start).
    let port = parley_localstack::free_port().unwrap();
    let platform = Platform::start_with(1, |c| {
        c.redis.url = Some(Secret::new(format!("redis://127.0.0.1:{port}")));
        c.gateway.presence_ttl_secs = 3;
    })
    .await;
    let (mut alice, mut bob, conversation) = platform.alice_and_bob().await;
    alice
        .send(json!({"type": "send", "id": "m", "conversation": conversation, "body": "no redis"}))
        .await;
    assert_eq!(
        bob.next_of(&["event"]).await["event"]["data"]["body"],
        "no redis"
    );
    // The conversation projection is not held up by presence.
    platform.projected().await;

    // Redis comes up: the presence projector connects, and the next heartbeat records Bob.
    let redis = RedisServer::start(RedisOptions {
        port: Some(port),
        ..RedisOptions::default()
    })
    .unwrap();
    let store = parley_projections::PresenceStore::connect(
        &parley_projections::PresenceStore::client(&redis.url(), None).unwrap(),
    )
    .await
    .unwrap();
    let bob_id = parley_events::UserId::parse("bob").unwrap();
    support::eventually(|| async {
        let status = store
            .status(&bob_id, parley_services::unix_millis())
            .await
            .unwrap();
        status.online().then_some(())
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sockets_keep_answering_while_nats_is_down_and_commands_pile_up() {
    let mut platform = Platform::start(1).await;
    let mut alice = platform.connect_v2(0, "alice").await;
    let mut bob = platform.connect_v2(0, "bob").await;
    let conversation = platform.direct(&mut alice, &mut bob, "bob").await;
    let mut senders = Vec::new();
    for i in 0..70 {
        senders.push(platform.connect(0, &format!("sender-{i}")).await);
    }

    // More commands than the gateway's NATS client queues while it reconnects (2,048): each
    // socket's 32 in flight, each to a conversation of its own so that none waits its turn.
    platform.nats.stop();
    for (i, sender) in senders.iter_mut().enumerate() {
        sender
            .send_pipelined((0..32).map(|j| {
                let conversation = format!("00000000-0000-4000-8000-{:012}", i * 100 + j);
                json!({"type": "send", "id": format!("m{j}"), "conversation": conversation, "body": "hi"})
            }))
            .await;
    }

    // The last one queued is still told it has no outcome yet, not only once NATS is back
    // (a JetStream publish gives up on the full queue after its timeout).
    let last = senders
        .last_mut()
        .unwrap()
        .reply_to_within("m31", Duration::from_secs(30))
        .await
        .expect("the command is answered while NATS is down");
    assert_eq!(last["code"], "timeout", "{last}");
    // A typing notice NATS cannot take is dropped, not waited on by the socket's reader.
    alice
        .send_pipelined([
            json!({"type": "typing", "conversation": conversation, "state": "started"}),
            json!({"type": "ping", "id": "q"}),
        ])
        .await;
    assert_eq!(alice.reply_to("q").await["type"], "pong");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_sent_while_nats_is_down_is_told_timeout_on_time_and_acked_once_it_is_back() {
    let mut platform = Platform::start_with(1, |c| c.gateway.command_timeout_secs = 1).await;
    let (mut alice, mut bob, conversation) = platform.alice_and_bob().await;

    platform.nats.stop();
    alice
        .send(json!({"type": "send", "id": "m", "conversation": conversation, "body": "hi"}))
        .await;
    // Its publish waits out the JetStream timeout (5 s) for an answer that cannot come; the
    // client hears at its command timeout (1 s) that the outcome is not known yet.
    let told = alice
        .reply_to_within("m", Duration::from_secs(4))
        .await
        .expect("told before the publish gives up");
    assert_eq!(told["code"], "timeout", "{told}");

    // Published again when the gateway reconnects; the ack follows on the same socket.
    platform
        .nats
        .restart()
        .expect("nats-server restarts on its port and store");
    let acked = alice
        .reply_to_within("m", Duration::from_secs(30))
        .await
        .expect("the outcome follows once NATS is back");
    assert_eq!(acked["type"], "ack", "{acked}");
    assert_eq!(bob.next_of(&["event"]).await["event"]["data"]["body"], "hi");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_that_need_nats_are_refused_at_once_while_it_is_down_and_the_socket_still_answers()
{
    let mut platform = Platform::start(1).await;
    let mut alice = platform.connect_v2(0, "alice").await;
    let mut bob = platform.connect_v2(0, "bob").await;
    platform.direct(&mut alice, &mut bob, "bob").await;

    // A presence request's flush waited for NATS to come back, and each read of the log a
    // resume makes waited out the JetStream timeout (5 s): the socket's reader with them.
    platform.nats.stop();
    for (id, request) in [
        (
            "p",
            json!({"type": "presence", "id": "p", "users": ["bob"]}),
        ),
        ("r", json!({"type": "resume", "id": "r"})),
    ] {
        alice
            .send_pipelined([request, json!({"type": "ping", "id": "q"})])
            .await;
        let refused = alice
            .reply_to_within(id, Duration::from_secs(4))
            .await
            .expect("refused at once, not once NATS is back or a log read gives up");
        assert_eq!(refused["code"], "unavailable", "{refused}");
        assert_eq!(refused["retryable"], true, "{refused}");
        assert_eq!(alice.reply_to("q").await["type"], "pong");
    }

    // A version 1 socket reads the log's head before its welcome and again to catch up.
    let opened = tokio::time::timeout(Duration::from_secs(4), async {
        let mut carol = platform.connect(0, "carol").await;
        carol.send(json!({"type": "ping", "id": "q"})).await;
        carol.reply_to("q").await
    })
    .await
    .expect("a version 1 socket opens and answers before a log read would give up");
    assert_eq!(opened["type"], "pong");
}
