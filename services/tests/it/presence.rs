//! Typing indicators and presence as clients see them (protocol version 2), on real
//! servers: who gets them, who does not, what is refused, that typing never reaches the
//! log, and that presence comes back after Redis is wiped.

use crate::support;

use std::time::Duration;

use serde_json::{Value, json};
use support::{Client, Platform, eventually};

/// The next `typing` frame, skipping nothing: any other frame first fails the test.
async fn next_typing(client: &mut Client) -> Value {
    client.next_of(&["typing"]).await
}

/// Alice (two v2 sockets on gateway 0), bob (v2, gateway 1) and carol (v1, gateway 0) in a
/// group created by alice; every socket has seen its creation.
async fn group_of_three(platform: &Platform) -> (Client, Client, Client, Client, String) {
    let mut alice = platform.connect_v2(0, "alice").await;
    let mut alice_phone = platform.connect_v2(0, "alice").await;
    let mut bob = platform.connect_v2(1, "bob").await;
    let mut carol = platform.connect(0, "carol").await;
    alice
        .send(json!({"type": "create_group", "id": "g", "title": "t", "members": ["bob", "carol"]}))
        .await;
    let ack = alice.reply_to("g").await;
    assert_eq!(ack["type"], "ack", "{ack}");
    for socket in [&mut alice, &mut alice_phone, &mut bob, &mut carol] {
        let created = socket.next_of(&["event"]).await;
        assert_eq!(created["event"]["type"], "conversation.created");
    }
    let conversation = ack["conversation"].as_str().unwrap().to_owned();
    (alice, alice_phone, bob, carol, conversation)
}

#[tokio::test]
async fn typing_reaches_other_members_v2_sockets_once_and_never_the_log() {
    let platform = Platform::start(2).await;
    let (mut alice, mut alice_phone, mut bob, mut carol, conversation) =
        group_of_three(&platform).await;

    alice
        .send(json!({"type": "typing", "conversation": conversation, "state": "started"}))
        .await;
    let typing = next_typing(&mut bob).await;
    assert_eq!(
        typing,
        json!({"type": "typing", "conversation": conversation, "user": "alice",
               "state": "started", "expires_in_ms": 6000})
    );
    // Only the creation is in the log: typing is never appended.
    assert_eq!(platform.log().await.len(), 1);

    // A `stopped` while not typing is dropped; the `started` after it is not.
    alice
        .send(json!({"type": "typing", "conversation": conversation, "state": "stopped"}))
        .await;
    let stopped = next_typing(&mut bob).await;
    assert_eq!(
        (stopped["state"].clone(), stopped["expires_in_ms"].clone()),
        (json!("stopped"), json!(0))
    );
    alice
        .send(json!({"type": "typing", "conversation": conversation, "state": "stopped"}))
        .await;
    bob.send(json!({"type": "typing", "conversation": conversation, "state": "started"}))
        .await;
    // Alice's sockets get bob's typing, neither of them its own.
    for socket in [&mut alice, &mut alice_phone] {
        let typing = next_typing(socket).await;
        assert_eq!(
            (typing["user"].clone(), typing["state"].clone()),
            (json!("bob"), json!("started"))
        );
    }

    // Bob got each of alice's notices once (one copy per gateway, not per socket), and
    // nothing for the dropped `stopped`: his next frame is the message sent now. Carol
    // (version 1) and alice's other socket got none of alice's notices either.
    alice
        .send(json!({"type": "send", "id": "m", "conversation": conversation, "body": "hi"}))
        .await;
    assert_eq!(alice.reply_to("m").await["type"], "ack");
    for socket in [&mut bob, &mut carol, &mut alice_phone] {
        let next = socket.next_of(&["event"]).await;
        assert_eq!(next["event"]["data"]["body"], "hi");
    }
    assert_eq!(platform.log().await.len(), 2);
}

#[tokio::test]
async fn typing_sent_right_after_a_resume_answer_reaches_the_resumed_socket() {
    // Dave's gateway subscribes to the conversation during his resume; its answer must wait
    // until the server holds that subscription, or the notice below can pass it by.
    let platform = Platform::start(2).await;
    let mut alice = platform.connect_v2(0, "alice").await;
    alice
        .send(json!({"type": "create_group", "id": "g", "title": "t", "members": ["dave"]}))
        .await;
    let ack = alice.reply_to("g").await;
    assert_eq!(ack["type"], "ack", "{ack}");
    alice.next_of(&["event"]).await;
    let conversation = ack["conversation"].as_str().unwrap().to_owned();

    let mut dave = platform.connect_v2(1, "dave").await;
    alice
        .send(json!({"type": "typing", "conversation": conversation, "state": "started"}))
        .await;
    let typing = next_typing(&mut dave).await;
    assert_eq!(
        (typing["user"].clone(), typing["conversation"].clone()),
        (json!("alice"), json!(conversation))
    );
}

#[tokio::test]
async fn typing_is_refused_to_non_members_old_protocols_and_bad_frames() {
    let platform = Platform::start(1).await;
    let (mut alice, _bob, conversation) = {
        let mut alice = platform.connect_v2(0, "alice").await;
        let mut bob = platform.connect_v2(0, "bob").await;
        let conversation = platform.direct(&mut alice, &mut bob, "bob").await;
        (alice, bob, conversation.to_string())
    };
    let mut mallory = platform.connect_v2(0, "mallory").await;
    mallory
        .send(
            json!({"type": "typing", "id": "t1", "conversation": conversation, "state": "started"}),
        )
        .await;
    let refused = mallory.reply_to("t1").await;
    assert_eq!(
        (refused["code"].clone(), refused["retryable"].clone()),
        (json!("not_member"), json!(false))
    );

    let mut old = platform.connect(0, "alice").await;
    old.send(
        json!({"type": "typing", "id": "t2", "conversation": conversation, "state": "started"}),
    )
    .await;
    assert_eq!(old.reply_to("t2").await["code"], "unknown_frame_type");
    old.send(json!({"type": "presence", "id": "p", "users": ["bob"]}))
        .await;
    assert_eq!(old.reply_to("p").await["code"], "unknown_frame_type");

    for (id, frame) in [
        (
            "b1",
            json!({"type": "typing", "id": "b1", "state": "started"}),
        ),
        (
            "b2",
            json!({"type": "typing", "id": "b2", "conversation": conversation, "state": "typing"}),
        ),
        (
            "b3",
            json!({"type": "typing", "id": "b3", "conversation": "nope", "state": "started"}),
        ),
        (
            "b4",
            json!({"type": "presence", "id": "b4", "users": "bob"}),
        ),
        (
            "b5",
            json!({"type": "presence", "id": "b5", "users": ["has space"]}),
        ),
        ("b6", json!({"type": "presence_unsubscribe", "id": "b6"})),
    ] {
        alice.send(frame).await;
        let error = alice.reply_to(id).await;
        assert_eq!(error["code"], "bad_frame", "{id}: {error}");
    }
    alice
        .send(json!({"type": "presence", "id": "e1", "users": []}))
        .await;
    assert_eq!(alice.reply_to("e1").await["code"], "invalid_request");
    let crowd: Vec<String> = (0..101).map(|n| format!("u{n}")).collect();
    alice
        .send(json!({"type": "presence", "id": "e2", "users": crowd}))
        .await;
    assert_eq!(alice.reply_to("e2").await["code"], "invalid_request");
}

/// Wait until `watcher` knows `user` is `online`: from `answer` (to a `presence` request),
/// or from a push after it.
async fn sees(watcher: &mut Client, answer: Value, user: &str, online: bool) -> Value {
    assert_eq!(answer["type"], "presence", "{answer}");
    let status = answer["users"]
        .as_array()
        .unwrap()
        .iter()
        .find(|status| status["user"] == user)
        .cloned()
        .unwrap_or_else(|| panic!("{user} missing from {answer}"));
    if status["online"] == online {
        return status;
    }
    let changed = watcher.next_of(&["presence_changed"]).await;
    assert_eq!(
        (changed["user"].clone(), changed["online"].clone()),
        (json!(user), json!(online))
    );
    changed
}

#[tokio::test]
async fn presence_is_answered_pushed_private_and_rebuilt_after_redis_is_wiped() {
    // Heartbeats every second, so presence comes back quickly after the wipe.
    let platform = Platform::start_with(2, |config| config.gateway.presence_ttl_secs = 3).await;
    let mut alice = platform.connect_v2(0, "alice").await;
    let mut bob = platform.connect_v2(1, "bob").await;
    platform.direct(&mut alice, &mut bob, "bob").await;
    let _mallory = platform.connect_v2(1, "mallory").await;

    alice
        .send(json!({"type": "presence", "id": "p1", "users": ["bob", "mallory", "bob"]}))
        .await;
    let answer = alice.reply_to("p1").await;
    assert_eq!(answer["not_visible"], json!(["mallory"]), "{answer}");
    assert_eq!(answer["users"].as_array().unwrap().len(), 1, "{answer}");
    sees(&mut alice, answer, "bob", true).await;

    // A second device changes nothing for watchers; the last one closing makes bob offline.
    let bob_phone = platform.connect_v2(0, "bob").await;
    bob_phone.close().await;
    bob.close().await;
    let offline = alice.next_of(&["presence_changed"]).await;
    assert_eq!(
        (offline["user"].clone(), offline["online"].clone()),
        (json!("bob"), json!(false))
    );
    assert!(offline["last_seen"].as_u64().is_some(), "{offline}");
    let bob = platform.connect_v2(1, "bob").await;
    let online = alice.next_of(&["presence_changed"]).await;
    assert_eq!(online["online"], true, "{online}");

    // Wiped: the heartbeats of bob's open socket bring him back, and his close is seen.
    let redis = redis::Client::open(platform.redis.url()).unwrap();
    let mut conn = redis.get_multiplexed_async_connection().await.unwrap();
    redis::cmd("FLUSHALL")
        .query_async::<()>(&mut conn)
        .await
        .unwrap();
    eventually(|| async { platform.presence("bob").await.online().then_some(()) }).await;
    alice
        .send(json!({"type": "presence", "id": "p2", "users": ["bob"]}))
        .await;
    let answer = alice.reply_to("p2").await;
    sees(&mut alice, answer, "bob", true).await;
    bob.close().await;
    let offline = alice.next_of(&["presence_changed"]).await;
    assert_eq!(offline["online"], false, "{offline}");

    // Unsubscribed: bob's next visit is not pushed.
    alice
        .send(json!({"type": "presence_unsubscribe", "users": ["bob"]}))
        .await;
    alice.send(json!({"type": "ping", "id": "sync"})).await;
    assert_eq!(alice.reply_to("sync").await["type"], "pong");
    let bob = platform.connect_v2(1, "bob").await;
    eventually(|| async { platform.presence("bob").await.online().then_some(()) }).await;
    alice.expect_silence(Duration::from_secs(1)).await;
    drop(bob);
}

#[tokio::test]
async fn a_user_whose_gateway_died_is_pushed_offline_once_the_record_expires() {
    let platform = Platform::start(1).await;
    let mut alice = platform.connect_v2(0, "alice").await;
    alice
        .send(json!({"type": "create_direct", "id": "dm", "peer": "carol"}))
        .await;
    let created = alice.next_of(&["ack", "event"]).await;
    if created["type"] == "ack" {
        alice.next_of(&["event"]).await;
    } else {
        alice.reply_to("dm").await;
    }
    alice
        .send(json!({"type": "presence", "id": "p", "users": ["carol"]}))
        .await;
    let answer = alice.reply_to("p").await;
    assert_eq!(answer["users"][0]["online"], false, "{answer}");

    // A gateway (played here) says carol's socket opened, then dies without a word.
    let nats = parley_services::node::connect_nats(
        &platform.config,
        &parley_services::admin::Readiness::default(),
    )
    .await
    .unwrap();
    let update = parley_events::presence::PresenceUpdate {
        user: parley_events::UserId::parse("carol").unwrap(),
        connection: "gw-gone-1".into(),
        state: parley_events::presence::ConnectionState::Open,
        at: parley_services::unix_millis(),
        ttl_secs: 3,
    };
    nats.client
        .publish(
            parley_events::subjects::PRESENCE_SUBJECT,
            update.to_bytes().into(),
        )
        .await
        .unwrap();
    let online = alice.next_of(&["presence_changed"]).await;
    assert_eq!(online["online"], true, "{online}");
    let offline = alice.next_of(&["presence_changed"]).await;
    assert_eq!(
        (offline["online"].clone(), offline["last_seen"].clone()),
        (json!(false), json!(update.at))
    );
}
