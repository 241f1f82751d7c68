//! Changing messages (protocol 2): `edit`, `delete`, `react`, `unreact` and `send` with
//! `reply_to`, each through a real gateway on real NATS and SQLite: acknowledged, delivered
//! live to the other members, shown in history; and every frame sent wrong answered with
//! its error code, nothing appended.

use crate::support;

use std::time::Duration;

use serde_json::{Value, json};
use support::{Client, Platform, acked_seq as acked, eventually};

/// A group of alice (its owner), bob and carol, each connected with protocol 2 and having
/// seen its creation.
async fn team(platform: &Platform) -> (Client, Client, Client, Value) {
    let mut alice = platform.connect_v2(0, "alice").await;
    let mut bob = platform.connect_v2(0, "bob").await;
    let mut carol = platform.connect_v2(0, "carol").await;
    alice
        .send(json!({"type": "create_group", "id": "g", "title": "team", "members": ["bob", "carol"]}))
        .await;
    let ack = alice.reply_to("g").await;
    assert_eq!(ack["type"], "ack", "{ack}");
    for member in [&mut alice, &mut bob, &mut carol] {
        assert_eq!(
            member.next_of(&["event"]).await["event"]["type"],
            "conversation.created"
        );
    }
    (alice, bob, carol, ack["conversation"].clone())
}

/// The live event at `seq`, passing over the earlier ones `client` has not read yet.
async fn live(client: &mut Client, seq: u64) -> Value {
    loop {
        let event = client.next_of(&["event"]).await["event"].clone();
        let at = event["seq"].as_u64().unwrap();
        assert!(at <= seq, "{seq} was skipped: {event}");
        if at == seq {
            return event;
        }
    }
}

/// The conversation's history as `client` pages it, once the store has applied the log.
async fn history(platform: &Platform, client: &mut Client, conversation: &Value) -> Vec<Value> {
    platform.projected().await;
    client
        .send(json!({"type": "history", "id": "h", "conversation": conversation}))
        .await;
    let page = client.reply_to("h").await;
    assert_eq!(page["type"], "history", "{page}");
    page["messages"].as_array().unwrap().clone()
}

fn at(messages: &[Value], seq: u64) -> Value {
    messages
        .iter()
        .find(|m| m["seq"] == seq)
        .unwrap_or_else(|| panic!("no message {seq} in {messages:?}"))
        .clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_change_is_acked_delivered_live_and_shown_in_history() {
    let platform = Platform::start(1).await;
    let (mut alice, mut bob, mut carol, group) = team(&platform).await;
    let mut old_bob = platform.connect(0, "bob").await;
    let hello = acked(
        &mut bob,
        json!({"type": "send", "id": "b1", "conversation": group, "body": "helo"}),
    )
    .await;
    for client in [&mut alice, &mut bob, &mut carol, &mut old_bob] {
        live(client, hello).await;
    }

    let reply = acked(
        &mut carol,
        json!({"type": "send", "id": "c1", "conversation": group, "body": "hi bob", "reply_to": hello}),
    )
    .await;
    let event = live(&mut alice, reply).await;
    assert_eq!(
        (&event["type"], &event["v"], &event["data"]["reply_to"]),
        (&json!("message.posted"), &json!(2), &json!(hello))
    );

    let edit = acked(
        &mut bob,
        json!({"type": "edit", "id": "b2", "conversation": group, "message": hello, "body": "hello"}),
    )
    .await;
    let event = live(&mut alice, edit).await;
    assert_eq!(event["type"], "message.edited");
    assert_eq!(event["data"], json!({"message": hello, "body": "hello"}));

    let thumbs = json!({"type": "react", "id": "a1", "conversation": group, "message": hello, "emoji": "👍"});
    let alice_thumbs = acked(&mut alice, thumbs.clone()).await;
    let event = live(&mut bob, alice_thumbs).await;
    assert_eq!(event["type"], "reaction.added");
    assert_eq!(event["actor"], "alice");
    assert_eq!(event["data"], json!({"message": hello, "emoji": "👍"}));
    // The same request again, and the same reaction under another id: what is already done.
    assert_eq!(acked(&mut alice, thumbs).await, alice_thumbs);
    assert_eq!(
        acked(
            &mut alice,
            json!({"type": "react", "id": "a2", "conversation": group, "message": hello, "emoji": "👍"})
        )
        .await,
        alice_thumbs
    );
    acked(
        &mut carol,
        json!({"type": "react", "id": "c2", "conversation": group, "message": hello, "emoji": "👍"}),
    )
    .await;
    acked(
        &mut carol,
        json!({"type": "react", "id": "c3", "conversation": group, "message": hello, "emoji": "🎉"}),
    )
    .await;
    let removed = acked(
        &mut carol,
        json!({"type": "unreact", "id": "c4", "conversation": group, "message": hello, "emoji": "🎉"}),
    )
    .await;

    // The owner deletes carol's reply.
    let deleted = acked(
        &mut alice,
        json!({"type": "delete", "id": "a3", "conversation": group, "message": reply}),
    )
    .await;
    for client in [&mut bob, &mut carol] {
        assert_eq!(live(client, removed).await["type"], "reaction.removed");
        let event = live(client, deleted).await;
        assert_eq!(event["type"], "message.deleted");
        assert_eq!(event["data"], json!({"message": reply}));
    }

    let messages = history(&platform, &mut bob, &group).await;
    assert_eq!(messages.len(), 2, "changes are not messages: {messages:?}");
    let edited = at(&messages, hello);
    assert_eq!(
        (&edited["body"], &edited["edited"], &edited["reactions"]),
        (
            &json!("hello"),
            &json!(true),
            &json!([{"emoji": "👍", "count": 2, "users": ["alice", "carol"]}])
        ),
        "{edited}"
    );
    assert!(edited.get("deleted").is_none() && edited.get("reply_to").is_none());
    let tombstone = at(&messages, reply);
    assert_eq!(
        (
            &tombstone["body"],
            &tombstone["deleted"],
            &tombstone["reply_to"],
            &tombstone["sender"]
        ),
        (&json!(""), &json!(true), &json!(hello), &json!("carol")),
        "{tombstone}"
    );

    // A version 1 socket saw none of the changes live, and reads history in its own shape.
    let mut seen = Vec::new();
    while let Some(frame) = old_bob.next_within(Duration::from_millis(300)).await {
        seen.push(frame["event"]["type"].clone());
    }
    assert_eq!(seen, [json!("message.posted")], "the reply only");
    let old = history(&platform, &mut old_bob, &group).await;
    for message in &old {
        for v2 in ["edited", "deleted", "reply_to", "reactions"] {
            assert!(message.get(v2).is_none(), "{message}");
        }
    }
    assert_eq!(at(&old, hello)["body"], "hello");
    assert_eq!(at(&old, reply)["body"], "");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn message_frames_sent_wrong_get_their_error_codes_and_append_nothing() {
    let platform = Platform::start(1).await;
    let (mut alice, mut bob, mut carol, group) = team(&platform).await;
    let mut dave = platform.connect_v2(0, "dave").await;
    let bobs = acked(
        &mut bob,
        json!({"type": "send", "id": "b1", "conversation": group, "body": "mine"}),
    )
    .await;
    let gone = acked(
        &mut carol,
        json!({"type": "send", "id": "c1", "conversation": group, "body": "soon gone"}),
    )
    .await;
    acked(
        &mut carol,
        json!({"type": "delete", "id": "c2", "conversation": group, "message": gone}),
    )
    .await;
    let created = bobs - 1;
    let logged = platform.log().await.len();
    let unknown = "00000000-0000-0000-0000-000000000063";
    let long = "x".repeat(platform.config.limits.max_message_bytes + 1);
    let edit = |id: &str, message: Value, body: &str| json!({"type": "edit", "id": id, "conversation": group, "message": message, "body": body});
    let react = |id: &str, message: u64, emoji: &str| json!({"type": "react", "id": id, "conversation": group, "message": message, "emoji": emoji});
    let cases: Vec<(&str, Value, &str)> = vec![
        (
            "carol",
            json!({"type": "edit", "id": "e1", "conversation": group, "body": "x"}),
            "bad_frame",
        ),
        ("carol", edit("e2", json!("1"), "x"), "bad_frame"),
        ("carol", edit("e3", json!(-1), "x"), "bad_frame"),
        (
            "carol",
            json!({"type": "edit", "id": "e4", "conversation": group, "message": bobs, "body": "x", "extra": 1}),
            "bad_frame",
        ),
        ("bob", edit("e5", json!(bobs), "  "), "empty_message"),
        ("bob", edit("e6", json!(bobs), &long), "message_too_large"),
        ("bob", edit("e7", json!(0), "x"), "message_not_found"),
        ("bob", edit("e8", json!(99_999), "x"), "message_not_found"),
        (
            "alice",
            edit("e9", json!(created), "x"),
            "message_not_found",
        ),
        ("carol", edit("e10", json!(gone), "x"), "message_not_found"),
        ("carol", edit("e11", json!(bobs), "not yours"), "forbidden"),
        (
            "alice",
            edit("e12", json!(bobs), "not even the owner's"),
            "forbidden",
        ),
        (
            "carol",
            json!({"type": "delete", "id": "d1", "conversation": group, "message": bobs}),
            "forbidden",
        ),
        (
            "carol",
            json!({"type": "delete", "id": "d2", "conversation": group}),
            "bad_frame",
        ),
        (
            "bob",
            json!({"type": "delete", "id": "d3", "conversation": group, "message": 99_999}),
            "message_not_found",
        ),
        (
            "dave",
            json!({"type": "delete", "id": "d4", "conversation": group, "message": bobs}),
            "not_member",
        ),
        ("carol", react("r1", bobs, ""), "invalid_request"),
        ("carol", react("r2", bobs, "two words"), "invalid_request"),
        (
            "carol",
            react("r3", bobs, &"👍".repeat(9)),
            "invalid_request",
        ),
        ("carol", react("r4", gone, "👍"), "message_not_found"),
        ("dave", react("r5", bobs, "👍"), "not_member"),
        (
            "carol",
            json!({"type": "react", "id": "r6", "conversation": unknown, "message": bobs, "emoji": "👍"}),
            "conversation_not_found",
        ),
        (
            "carol",
            json!({"type": "react", "id": "r7", "conversation": group, "message": bobs}),
            "bad_frame",
        ),
        (
            "carol",
            json!({"type": "unreact", "id": "u1", "conversation": group, "message": bobs, "emoji": "👍"}),
            "invalid_request",
        ),
        (
            "carol",
            json!({"type": "send", "id": "s1", "conversation": group, "body": "re", "reply_to": 99_999}),
            "message_not_found",
        ),
        (
            "carol",
            json!({"type": "send", "id": "s2", "conversation": group, "body": "re", "reply_to": gone}),
            "message_not_found",
        ),
        (
            "carol",
            json!({"type": "send", "id": "s3", "conversation": group, "body": "re", "reply_to": created}),
            "message_not_found",
        ),
        (
            "carol",
            json!({"type": "send", "id": "s4", "conversation": group, "body": "re", "reply_to": "x"}),
            "bad_frame",
        ),
        // An id already used for another request.
        ("carol", react("c1", bobs, "👍"), "id_reused"),
    ];
    for (who, frame, code) in cases {
        let client = match who {
            "alice" => &mut alice,
            "bob" => &mut bob,
            "carol" => &mut carol,
            _ => &mut dave,
        };
        client.send(frame.clone()).await;
        let reply = client.reply_to(frame["id"].as_str().unwrap()).await;
        assert_eq!(reply["type"], "error", "{frame}: {reply}");
        assert_eq!(reply["code"], code, "{frame}: {reply}");
        assert_eq!(reply["retryable"], false, "{reply}");
    }

    // Version 1 has none of these frames, and no replies.
    let mut v1 = platform.connect(0, "carol").await;
    for frame in [
        json!({"type": "edit", "id": "v1", "conversation": group, "message": gone, "body": "x"}),
        json!({"type": "delete", "id": "v2", "conversation": group, "message": gone}),
        json!({"type": "react", "id": "v3", "conversation": group, "message": bobs, "emoji": "👍"}),
        json!({"type": "unreact", "id": "v4", "conversation": group, "message": bobs, "emoji": "👍"}),
    ] {
        v1.send(frame.clone()).await;
        let reply = v1.reply_to(frame["id"].as_str().unwrap()).await;
        assert_eq!(reply["code"], "unknown_frame_type", "{frame}: {reply}");
    }
    v1.send(
        json!({"type": "send", "id": "v5", "conversation": group, "body": "re", "reply_to": bobs}),
    )
    .await;
    assert_eq!(v1.reply_to("v5").await["code"], "bad_frame");

    let log = platform.log().await;
    assert_eq!(
        log.len(),
        logged,
        "nothing was appended: {:?}",
        &log[logged..]
    );
    // The refusals went through the handler too, which keeps answering.
    acked(
        &mut carol,
        json!({"type": "react", "id": "r8", "conversation": group, "message": bobs, "emoji": "👍"}),
    )
    .await;
    eventually(|| async { (platform.log().await.len() == logged + 1).then_some(()) }).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_handler_restart_repeats_get_their_ack_and_reused_ids_are_refused() {
    let mut platform = Platform::start(1).await;
    let (_alice, mut bob, mut carol, group) = team(&platform).await;
    let hello = acked(
        &mut bob,
        json!({"type": "send", "id": "b1", "conversation": group, "body": "hello"}),
    )
    .await;
    let requests = [
        json!({"type": "edit", "id": "b2", "conversation": group, "message": hello, "body": "hello!"}),
        json!({"type": "react", "id": "c1", "conversation": group, "message": hello, "emoji": "👍"}),
        json!({"type": "send", "id": "c2", "conversation": group, "body": "hi", "reply_to": hello}),
    ];
    let mut done = Vec::new();
    for frame in requests {
        let client = if frame["id"] == "b2" {
            &mut bob
        } else {
            &mut carol
        };
        let seq = acked(client, frame.clone()).await;
        done.push((frame, seq));
    }
    let logged = platform.log().await.len();

    // The restarted handler knows them only from the log.
    platform.stop_handler().await;
    platform.start_handler().await;
    for (frame, seq) in &done {
        let client = if frame["id"] == "b2" {
            &mut bob
        } else {
            &mut carol
        };
        assert_eq!(acked(client, frame.clone()).await, *seq, "{frame}");
        let mut other = frame.clone();
        other["message"] = hello.into();
        other["type"] = "delete".into();
        for field in ["body", "emoji", "reply_to"] {
            other.as_object_mut().unwrap().remove(field);
        }
        client.send(other.clone()).await;
        let reply = client.reply_to(frame["id"].as_str().unwrap()).await;
        assert_eq!(reply["code"], "id_reused", "{other}: {reply}");
    }
    // And the reaction it holds, under a new id: already done.
    assert_eq!(
        acked(
            &mut carol,
            json!({"type": "react", "id": "c3", "conversation": group, "message": hello, "emoji": "👍"})
        )
        .await,
        done[1].1
    );
    assert_eq!(platform.log().await.len(), logged, "nothing appended twice");
}
