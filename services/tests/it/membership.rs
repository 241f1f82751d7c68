//! Membership frames (protocol 2) through a real gateway, handler and store on real NATS:
//! what the gateway refuses at the edge, the acks and errors of each frame, system entries
//! in history and in live events, and a muted member's send.

use crate::support;

use std::time::Duration;

use futures::StreamExt;
use parley_events::subjects::LIVE_MEMBERSHIP_SUBJECT;
use parley_events::{Event, RecordedEvent};
use parley_services::admin::Readiness;
use parley_services::node;
use serde_json::{Value, json};
use support::{Client, Platform, acked};

/// A group created by `owner` with `members`, once its creation reached the owner's socket.
async fn group(owner: &mut Client, id: &str, members: &[&str]) -> Value {
    owner
        .send(json!({"type": "create_group", "id": id, "title": "team", "members": members}))
        .await;
    let ack = owner.reply_to(id).await;
    assert_eq!(ack["type"], "ack", "{ack}");
    let created = owner.next_of(&["event"]).await;
    assert_eq!(created["event"]["type"], "conversation.created");
    ack["conversation"].clone()
}

/// `client` sends `frame` (whose id is `id`) and gets an error `code`; the reply.
async fn refused(client: &mut Client, frame: Value, code: &str) -> Value {
    let id = frame["id"].as_str().unwrap_or("none").to_owned();
    client.send(frame.clone()).await;
    let reply = client.reply_to(&id).await;
    assert_eq!(reply["type"], "error", "{frame}: {reply}");
    assert_eq!(reply["code"], code, "{frame}: {reply}");
    assert_eq!(reply["retryable"], false, "{frame}: {reply}");
    reply
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_membership_frame_sent_wrong_is_refused_and_appends_nothing() {
    let platform = Platform::start(1).await;
    let mut alice = platform.connect_v2(0, "alice").await;
    let g = group(&mut alice, "g", &["bob"]).await;
    let appended = platform.log().await.len();
    let too_many: Vec<String> = (0..=platform.config.limits.max_members_per_add)
        .map(|i| format!("u{i}"))
        .collect();
    let long_title = "x".repeat(platform.config.limits.max_title_bytes + 1);
    for (frame, code) in [
        // Missing fields.
        (
            json!({"type": "add_members", "id": "r", "conversation": g}),
            "bad_frame",
        ),
        (
            json!({"type": "add_members", "id": "r", "users": ["carol"]}),
            "bad_frame",
        ),
        (
            json!({"type": "remove_members", "id": "r", "conversation": g}),
            "bad_frame",
        ),
        (json!({"type": "leave", "id": "r"}), "bad_frame"),
        (
            json!({"type": "set_role", "id": "r", "conversation": g, "user": "bob"}),
            "bad_frame",
        ),
        (
            json!({"type": "set_role", "id": "r", "conversation": g, "role": "admin"}),
            "bad_frame",
        ),
        (
            json!({"type": "rename", "id": "r", "title": "x"}),
            "bad_frame",
        ),
        (
            json!({"type": "mute", "id": "r", "conversation": g, "user": "bob"}),
            "bad_frame",
        ),
        (
            json!({"type": "mute", "id": "r", "conversation": g, "seconds": 5}),
            "bad_frame",
        ),
        (
            json!({"type": "unmute", "id": "r", "conversation": g}),
            "bad_frame",
        ),
        // Wrong types.
        (
            json!({"type": "add_members", "id": "r", "conversation": g, "users": "carol"}),
            "bad_frame",
        ),
        (
            json!({"type": "add_members", "id": "r", "conversation": g, "users": [7]}),
            "bad_frame",
        ),
        (
            json!({"type": "add_members", "id": "r", "conversation": g, "users": ["not a user!"]}),
            "bad_frame",
        ),
        (
            json!({"type": "remove_members", "id": "r", "conversation": "nope", "users": ["bob"]}),
            "bad_frame",
        ),
        (
            json!({"type": "leave", "id": "r", "conversation": 5}),
            "bad_frame",
        ),
        (
            json!({"type": "set_role", "id": "r", "conversation": g, "user": "bob", "role": "king"}),
            "bad_frame",
        ),
        (
            json!({"type": "set_role", "id": "r", "conversation": g, "user": "bob", "role": 1}),
            "bad_frame",
        ),
        (
            json!({"type": "rename", "id": "r", "conversation": g, "title": 5}),
            "bad_frame",
        ),
        (
            json!({"type": "mute", "id": "r", "conversation": g, "user": "bob", "seconds": -1}),
            "bad_frame",
        ),
        (
            json!({"type": "mute", "id": "r", "conversation": g, "user": "bob", "seconds": "60"}),
            "bad_frame",
        ),
        (
            json!({"type": "unmute", "id": "r", "conversation": g, "user": ["bob"]}),
            "bad_frame",
        ),
        (
            json!({"type": "leave", "id": "r", "conversation": g, "surprise": 1}),
            "bad_frame",
        ),
        // Well formed, refused at the edge.
        (
            json!({"type": "add_members", "id": "r", "conversation": g, "users": too_many}),
            "invalid_request",
        ),
        (
            json!({"type": "remove_members", "id": "r", "conversation": g, "users": too_many}),
            "invalid_request",
        ),
        (
            json!({"type": "add_members", "id": "r", "conversation": g, "users": []}),
            "invalid_request",
        ),
        (
            json!({"type": "rename", "id": "r", "conversation": g, "title": "  "}),
            "invalid_request",
        ),
        (
            json!({"type": "rename", "id": "r", "conversation": g, "title": long_title}),
            "invalid_request",
        ),
        (
            json!({"type": "mute", "id": "r", "conversation": g, "user": "bob", "seconds": 0}),
            "invalid_request",
        ),
        (
            json!({"type": "mute", "id": "r", "conversation": g, "user": "bob", "seconds": 40_000_000}),
            "invalid_request",
        ),
    ] {
        let reply = refused(&mut alice, frame.clone(), code).await;
        assert_eq!(reply["id"], "r", "{frame}: {reply}");
    }
    assert_eq!(platform.log().await.len(), appended, "nothing was appended");

    // A version 1 socket is answered as a version 1 server would.
    let mut v1 = platform.connect(0, "alice").await;
    for frame in [
        json!({"type": "add_members", "id": "r", "conversation": g, "users": ["carol"]}),
        json!({"type": "leave", "id": "r", "conversation": g}),
        json!({"type": "mute", "id": "r", "conversation": g, "user": "bob", "seconds": 5}),
    ] {
        refused(&mut v1, frame, "unknown_frame_type").await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_membership_frame_is_acked_or_refused_by_the_rules() {
    let platform = Platform::start(1).await;
    let mut alice = platform.connect_v2(0, "alice").await;
    let g = group(&mut alice, "g", &["bob", "carol"]).await;
    let mut bob = platform.connect_v2(0, "bob").await;
    let mut carol = platform.connect_v2(0, "carol").await;

    let add =
        json!({"type": "add_members", "id": "a1", "conversation": g, "users": ["dave", "bob"]});
    let first = acked(&mut alice, add.clone()).await;
    let added = alice.next_of(&["event"]).await;
    assert_eq!(added["event"]["type"], "member.added");
    assert_eq!(
        added["event"]["data"]["members"],
        json!([{"user": "dave", "role": "member"}]),
        "bob was a member already"
    );
    assert_eq!(added["system"]["text"], "alice added dave", "{added}");
    assert_eq!(added["system"]["users"], json!(["dave"]));
    assert_eq!(
        acked(&mut alice, add).await,
        first,
        "a repeat gets the same ack"
    );
    refused(
        &mut alice,
        json!({"type": "rename", "id": "a1", "conversation": g, "title": "other"}),
        "id_reused",
    )
    .await;
    refused(
        &mut bob,
        json!({"type": "add_members", "id": "b1", "conversation": g, "users": ["erin"]}),
        "forbidden",
    )
    .await;
    refused(
        &mut alice,
        json!({"type": "add_members", "id": "a2", "conversation": g, "users": ["bob"]}),
        "invalid_request",
    )
    .await;

    acked(
        &mut alice,
        json!({"type": "set_role", "id": "a3", "conversation": g, "user": "carol", "role": "admin"}),
    )
    .await;
    refused(
        &mut carol,
        json!({"type": "set_role", "id": "c1", "conversation": g, "user": "bob", "role": "admin"}),
        "forbidden",
    )
    .await;
    acked(
        &mut carol,
        json!({"type": "rename", "id": "c2", "conversation": g, "title": "renamed"}),
    )
    .await;
    refused(
        &mut bob,
        json!({"type": "rename", "id": "b2", "conversation": g, "title": "mine"}),
        "forbidden",
    )
    .await;
    refused(
        &mut alice,
        json!({"type": "leave", "id": "a4", "conversation": g}),
        "last_owner",
    )
    .await;

    acked(
        &mut carol,
        json!({"type": "mute", "id": "c3", "conversation": g, "user": "bob", "seconds": 600}),
    )
    .await;
    let muted = refused(
        &mut bob,
        json!({"type": "send", "id": "b3", "conversation": g, "body": "let me speak"}),
        "muted",
    )
    .await;
    assert!(
        muted["message"].as_str().unwrap().contains("until 20"),
        "says until when: {muted}"
    );
    refused(
        &mut carol,
        json!({"type": "mute", "id": "c4", "conversation": g, "user": "alice", "seconds": 60}),
        "forbidden",
    )
    .await;
    acked(
        &mut carol,
        json!({"type": "unmute", "id": "c5", "conversation": g, "user": "bob"}),
    )
    .await;
    refused(
        &mut carol,
        json!({"type": "unmute", "id": "c8", "conversation": g, "user": "bob"}),
        "invalid_request",
    )
    .await;
    acked(
        &mut bob,
        json!({"type": "send", "id": "b4", "conversation": g, "body": "thanks"}),
    )
    .await;

    acked(
        &mut carol,
        json!({"type": "remove_members", "id": "c6", "conversation": g, "users": ["bob"]}),
    )
    .await;
    refused(
        &mut bob,
        json!({"type": "leave", "id": "b5", "conversation": g}),
        "not_member",
    )
    .await;
    acked(
        &mut carol,
        json!({"type": "leave", "id": "c7", "conversation": g}),
    )
    .await;

    // A direct conversation's members are fixed.
    let mut erin = platform.connect_v2(0, "erin").await;
    let mut frank = platform.connect_v2(0, "frank").await;
    let dm = platform.direct(&mut erin, &mut frank, "frank").await;
    refused(
        &mut frank,
        json!({"type": "add_members", "id": "f1", "conversation": dm, "users": ["carol"]}),
        "invalid_request",
    )
    .await;

    let types: Vec<&'static str> = platform
        .log()
        .await
        .iter()
        .map(|e| e.envelope.event.type_name())
        .collect();
    assert_eq!(
        types,
        [
            "conversation.created",
            "member.added",
            "member.role_changed",
            "conversation.renamed",
            "member.muted",
            "member.unmuted",
            "message.posted",
            "member.removed",
            "member.left",
            "conversation.created",
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_shows_system_entries_on_version_2_only() {
    let platform = Platform::start(1).await;
    let mut alice = platform.connect_v2(0, "alice").await;
    let g = group(&mut alice, "g", &["bob"]).await;
    acked(
        &mut alice,
        json!({"type": "send", "id": "m1", "conversation": g, "body": "hello"}),
    )
    .await;
    acked(
        &mut alice,
        json!({"type": "add_members", "id": "a1", "conversation": g, "users": ["carol", "dave"]}),
    )
    .await;
    acked(
        &mut alice,
        json!({"type": "set_role", "id": "a2", "conversation": g, "user": "bob", "role": "admin"}),
    )
    .await;
    acked(
        &mut alice,
        json!({"type": "send", "id": "m2", "conversation": g, "body": "welcome"}),
    )
    .await;
    platform.projected().await;

    alice
        .send(json!({"type": "history", "id": "h", "conversation": g}))
        .await;
    let page = alice.reply_to("h").await;
    let entries: Vec<(Value, Value, Value)> = page["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["body"].clone(),
                m["system"]["text"].clone(),
                m["client_id"].clone(),
            )
        })
        .collect();
    assert_eq!(
        entries,
        [
            (json!("welcome"), Value::Null, json!("m2")),
            (json!(""), json!("alice made bob an admin"), Value::Null),
            (json!(""), json!("alice added carol and dave"), Value::Null),
            (json!("hello"), Value::Null, json!("m1")),
        ],
        "{page}"
    );

    let mut v1 = platform.connect(0, "alice").await;
    v1.send(json!({"type": "history", "id": "h", "conversation": g}))
        .await;
    let page = v1.reply_to("h").await;
    let bodies: Vec<&Value> = page["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            assert!(m.get("system").is_none(), "{m}");
            &m["body"]
        })
        .collect();
    assert_eq!(bodies, [&json!("welcome"), &json!("hello")]);

    // A conversation list whose newest entry is a change shows that entry.
    acked(
        &mut alice,
        json!({"type": "rename", "id": "a3", "conversation": g, "title": null}),
    )
    .await;
    platform.projected().await;
    alice
        .send(json!({"type": "conversations", "id": "c"}))
        .await;
    let list = alice.reply_to("c").await;
    let last = &list["conversations"][0]["last_message"];
    assert_eq!(last["body"], "", "{list}");
    assert_eq!(
        last["system"]["text"], "alice removed the group's name",
        "{list}"
    );
    assert_eq!(list["conversations"][0].get("title"), None, "{list}");

    // Version 1 pages on past system entries: a page of one is the newest message, not an
    // empty page with nothing to page on from.
    let mut pages = Vec::new();
    let mut before = Value::Null;
    for n in 0..3 {
        let id = format!("p{n}");
        v1.send(
            json!({"type": "history", "id": id, "conversation": g, "before": before, "limit": 1}),
        )
        .await;
        let page = v1.reply_to(&id).await;
        let messages = page["messages"].as_array().unwrap();
        assert_eq!(messages.len(), 1, "{page}");
        pages.push((messages[0]["body"].clone(), page["has_more"].clone()));
        before = messages[0]["seq"].clone();
        if page["has_more"] == false {
            break;
        }
    }
    assert_eq!(
        pages,
        [
            (json!("welcome"), json!(true)),
            (json!("hello"), json!(false))
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn member_added_goes_to_every_gateway_on_the_membership_subject_like_a_creation() {
    let platform = Platform::start(1).await;
    let nats = node::connect_nats(&platform.config, &Readiness::default())
        .await
        .unwrap();
    let mut membership = nats
        .client
        .subscribe(LIVE_MEMBERSHIP_SUBJECT)
        .await
        .unwrap();
    nats.client.flush().await.unwrap();
    let mut alice = platform.connect_v2(0, "alice").await;
    let g = group(&mut alice, "g", &["bob"]).await;
    acked(
        &mut alice,
        json!({"type": "add_members", "id": "a1", "conversation": g, "users": ["carol"]}),
    )
    .await;
    acked(
        &mut alice,
        json!({"type": "rename", "id": "a2", "conversation": g, "title": "not membership"}),
    )
    .await;
    acked(
        &mut alice,
        json!({"type": "add_members", "id": "a3", "conversation": g, "users": ["dave"]}),
    )
    .await;
    let mut types = Vec::new();
    while types.len() < 3 {
        let message = tokio::time::timeout(Duration::from_secs(10), membership.next())
            .await
            .unwrap_or_else(|_| panic!("no membership publish after {types:?}"))
            .unwrap();
        let event = RecordedEvent::from_bytes(&message.payload).unwrap();
        types.push(match &event.envelope.event {
            Event::MembersAdded(added) => format!("added {}", added.members[0].user),
            other => other.type_name().to_owned(),
        });
    }
    assert_eq!(
        types,
        ["conversation.created", "added carol", "added dave"],
        "the rename between them is not a membership publish"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_added_start_receiving_and_members_removed_or_leaving_stop_on_every_gateway() {
    let platform = Platform::start(2).await;
    let mut alice = platform.connect_v2(0, "alice").await;
    // Bob is a member from the creation, on the other gateway; carol and dave are added
    // later, one on each gateway.
    let mut bob = platform.connect_v2(1, "bob").await;
    let mut carol = platform.connect_v2(1, "carol").await;
    let mut dave = platform.connect_v2(0, "dave").await;
    let g = group(&mut alice, "g", &["bob"]).await;
    assert_eq!(
        bob.next_of(&["event"]).await["event"]["type"],
        "conversation.created"
    );

    acked(
        &mut alice,
        json!({"type": "add_members", "id": "add", "conversation": g, "users": ["carol", "dave"]}),
    )
    .await;
    for client in [&mut alice, &mut bob, &mut carol, &mut dave] {
        let frame = client.next_of(&["event"]).await;
        assert_eq!(frame["event"]["type"], "member.added", "{frame}");
        assert_eq!(frame["system"]["text"], "alice added carol and dave");
    }
    // The new members follow the group from their addition on.
    acked(
        &mut alice,
        json!({"type": "send", "id": "m1", "conversation": g, "body": "welcome"}),
    )
    .await;
    for client in [&mut alice, &mut bob, &mut carol, &mut dave] {
        let frame = client.next_of(&["event"]).await;
        assert_eq!(frame["event"]["data"]["body"], "welcome", "{frame}");
    }

    // Bob is removed and dave leaves: each is sent that event, and nothing after it.
    acked(
        &mut alice,
        json!({"type": "remove_members", "id": "rm", "conversation": g, "users": ["bob"]}),
    )
    .await;
    for client in [&mut alice, &mut bob, &mut carol, &mut dave] {
        let frame = client.next_of(&["event"]).await;
        assert_eq!(frame["event"]["type"], "member.removed", "{frame}");
    }
    acked(
        &mut dave,
        json!({"type": "leave", "id": "bye", "conversation": g}),
    )
    .await;
    for client in [&mut alice, &mut carol, &mut dave] {
        let frame = client.next_of(&["event"]).await;
        assert_eq!(frame["event"]["type"], "member.left", "{frame}");
    }
    acked(
        &mut alice,
        json!({"type": "send", "id": "m2", "conversation": g, "body": "after"}),
    )
    .await;
    for client in [&mut alice, &mut carol] {
        let frame = client.next_of(&["event"]).await;
        assert_eq!(frame["event"]["data"]["body"], "after", "{frame}");
    }
    // Carol shares bob's gateway and alice dave's: each gateway queued "after" on every
    // socket following the group at once, so a socket still following would have it before
    // the answer to a ping sent now.
    for (client, id) in [(&mut bob, "p-bob"), (&mut dave, "p-dave")] {
        client.send(json!({"type": "ping", "id": id})).await;
        let frame = client.next().await;
        assert_eq!(frame["type"], "pong", "{frame}");
    }

    // A removed member's new socket asking to resume the group is told it is not a member.
    let mut bob_again = platform.open_v2(1, "bob").await;
    let mut named = serde_json::Map::new();
    named.insert(g.as_str().unwrap().to_owned(), json!(0));
    bob_again
        .send(json!({"type": "resume", "id": "r", "conversations": named}))
        .await;
    let resumed = bob_again.reply_to("r").await;
    assert_eq!(resumed["type"], "resumed", "{resumed}");
    assert_eq!(
        resumed["conversations"],
        json!([{"conversation": g, "state": "not_member", "seq": 0}]),
        "{resumed}"
    );
}
