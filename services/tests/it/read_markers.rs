//! Read markers (protocol 2): `mark_read` appends `conversation.read` only when it moves the
//! user's marker forward, the event reaches only the user's own sockets, and the store
//! projects it; on real NATS and SQLite, through a gateway.

use crate::support;

use std::time::Duration;

use parley_events::{Event, UserId};
use serde_json::json;
use support::{Platform, eventually};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_marker_moves_forward_only_and_reaches_only_the_readers_devices() {
    let platform = Platform::start(1).await;
    let mut phone = platform.connect_v2(0, "alice").await;
    let mut bob = platform.connect_v2(0, "bob").await;
    let conversation = platform.direct(&mut phone, &mut bob, "bob").await;
    let mut laptop = platform.connect_v2(0, "alice").await;
    let mut old_bob = platform.connect(0, "bob").await;
    let mut newest = 0;
    for i in 0..3 {
        let id = format!("b{i}");
        bob.send(
            json!({"type": "send", "id": id, "conversation": conversation, "body": format!("{i}")}),
        )
        .await;
        newest = bob.reply_to(&id).await["seq"].as_u64().unwrap();
    }
    for client in [&mut phone, &mut laptop, &mut bob, &mut old_bob] {
        for _ in 0..3 {
            assert_eq!(
                client.next_of(&["event"]).await["event"]["type"],
                "message.posted"
            );
        }
    }

    phone
        .send(json!({"type": "mark_read", "id": "r1", "conversation": conversation, "seq": newest}))
        .await;
    let ack = phone.reply_to("r1").await;
    assert_eq!(ack["type"], "ack", "{ack}");
    let marker_event = ack["seq"].as_u64().unwrap();
    assert!(marker_event > newest, "the marker is an event of its own");
    for device in [&mut phone, &mut laptop] {
        let event = device.next_of(&["event"]).await["event"].clone();
        assert_eq!(event["type"], "conversation.read");
        assert_eq!(event["seq"], marker_event);
        assert_eq!(event["actor"], "alice");
        assert_eq!(event["data"], json!({"seq": newest}));
    }

    // The same request again, and a marker at or below the current one: the existing
    // marker's event, nothing appended.
    phone
        .send(json!({"type": "mark_read", "id": "r1", "conversation": conversation, "seq": newest}))
        .await;
    assert_eq!(phone.reply_to("r1").await, ack);
    phone
        .send(json!({"type": "mark_read", "id": "r2", "conversation": conversation, "seq": 2}))
        .await;
    let behind = phone.reply_to("r2").await;
    assert_eq!(
        (&behind["seq"], &behind["event"]),
        (&ack["seq"], &ack["event"]),
        "{behind}"
    );
    let markers = |log: Vec<parley_events::RecordedEvent>| {
        log.iter()
            .filter(|e| matches!(e.envelope.event, Event::ConversationRead(_)))
            .count()
    };
    assert_eq!(markers(platform.log().await), 1);

    // Bob's sockets, whatever their version, are not told what alice read.
    bob.expect_silence(Duration::from_millis(300)).await;
    old_bob.expect_silence(Duration::from_millis(10)).await;
    laptop.expect_silence(Duration::from_millis(10)).await;

    let store = platform.store().await;
    let alice = UserId::parse("alice").unwrap();
    eventually(|| async {
        (store.read_marker(conversation, &alice).await.unwrap() == newest).then_some(())
    })
    .await;
    assert_eq!(store.unread(conversation, &alice, newest).await.unwrap(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mark_read_requests_it_cannot_take_get_their_error_codes() {
    let platform = Platform::start(1).await;
    let mut alice = platform.connect_v2(0, "alice").await;
    let mut bob = platform.connect_v2(0, "bob").await;
    let conversation = platform.direct(&mut alice, &mut bob, "bob").await;
    let mut carol = platform.connect_v2(0, "carol").await;
    let unknown = "00000000-0000-0000-0000-000000000063";
    for (member, frame, code) in [
        (
            true,
            json!({"type": "mark_read", "id": "r", "conversation": conversation}),
            "bad_frame",
        ),
        (
            true,
            json!({"type": "mark_read", "id": "r", "seq": 1}),
            "bad_frame",
        ),
        (
            true,
            json!({"type": "mark_read", "id": "r", "conversation": conversation, "seq": "1"}),
            "bad_frame",
        ),
        (
            true,
            json!({"type": "mark_read", "id": "r", "conversation": conversation, "seq": -1}),
            "bad_frame",
        ),
        (
            true,
            json!({"type": "mark_read", "id": "r0", "conversation": conversation, "seq": 0}),
            "invalid_request",
        ),
        (
            true,
            json!({"type": "mark_read", "id": "r1", "conversation": conversation, "seq": 2}),
            "invalid_request",
        ),
        (
            false,
            json!({"type": "mark_read", "id": "r2", "conversation": conversation, "seq": 1}),
            "not_member",
        ),
        (
            false,
            json!({"type": "mark_read", "id": "r3", "conversation": unknown, "seq": 1}),
            "conversation_not_found",
        ),
    ] {
        let client = if member { &mut alice } else { &mut carol };
        client.send(frame.clone()).await;
        let id = frame["id"].as_str().unwrap();
        let reply = client.reply_to(id).await;
        assert_eq!(reply["type"], "error", "{frame}: {reply}");
        assert_eq!(reply["code"], code, "{frame}: {reply}");
        assert_eq!(reply["retryable"], false);
    }
    let mut v1 = platform.connect(0, "alice").await;
    v1.send(json!({"type": "mark_read", "id": "r", "conversation": conversation, "seq": 1}))
        .await;
    assert_eq!(v1.next_of(&["error"]).await["code"], "unknown_frame_type");
    assert!(
        !platform
            .log()
            .await
            .iter()
            .any(|e| matches!(e.envelope.event, Event::ConversationRead(_))),
        "nothing was appended"
    );
}
