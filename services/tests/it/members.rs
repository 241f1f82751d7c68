//! The `members` frame (protocol 2): a conversation's details and its members in pages,
//! through a gateway on real NATS and SQLite, and what it answers to requests it cannot
//! serve.

use crate::support;

use serde_json::json;
use support::{Platform, eventually};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_pages_through_a_group_with_its_details() {
    let platform = Platform::start(1).await;
    let mut alice = platform.connect_v2(0, "alice").await;
    alice.send(json!({"type": "create_group", "id": "g", "title": "team", "members": ["dave", "bob", "carol"]})).await;
    let ack = alice.reply_to("g").await;
    assert_eq!(ack["type"], "ack", "{ack}");
    let group = ack["conversation"].clone();
    let created = alice.next_of(&["event"]).await;
    platform.projected().await;

    let mut members = Vec::new();
    let mut after = None;
    for page_number in 0.. {
        let id = format!("m-{page_number}");
        alice.send(json!({"type": "members", "id": id, "conversation": group, "after": after, "limit": 3})).await;
        let page = alice.reply_to(&id).await;
        assert_eq!(page["type"], "members", "{page}");
        assert_eq!(page["conversation"], group);
        assert_eq!(page["kind"], "group");
        assert_eq!(page["title"], "team");
        assert_eq!(page["role"], "owner", "the requester's role");
        assert_eq!(page["member_count"], 4);
        assert_eq!(page["created_at"], created["event"]["at"]);
        let listed = page["members"].as_array().unwrap();
        assert!(listed.len() <= 3);
        members.extend(listed.iter().cloned());
        after = listed.last().map(|m| m["user"].clone());
        if page["has_more"] == false {
            break;
        }
    }
    assert_eq!(
        members,
        [
            json!({"user": "alice", "role": "owner"}),
            json!({"user": "bob", "role": "member"}),
            json!({"user": "carol", "role": "member"}),
            json!({"user": "dave", "role": "member"}),
        ],
        "every member once, ordered by user id"
    );

    let mut bob = platform.connect_v2(0, "bob").await;
    bob.send(json!({"type": "members", "id": "b", "conversation": group, "limit": 0}))
        .await;
    let page = bob.reply_to("b").await;
    assert_eq!(page["role"], "member");
    assert_eq!(
        page["members"].as_array().unwrap().len(),
        1,
        "a limit below 1 is 1"
    );
    assert_eq!(page["has_more"], true);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_requests_it_cannot_serve_get_their_error_codes() {
    let platform = Platform::start(1).await;
    let (_alice, _bob, conversation) = platform.alice_and_bob().await;
    let store = platform.store().await;
    eventually(|| async { store.conversation(conversation).await.unwrap() }).await;
    let mut alice = platform.connect_v2(0, "alice").await;
    let mut carol = platform.connect_v2(0, "carol").await;
    let unknown = "00000000-0000-0000-0000-000000000063";
    for (member, frame, code) in [
        (true, json!({"type": "members", "id": "r"}), "bad_frame"),
        (
            true,
            json!({"type": "members", "id": "r", "conversation": "nope"}),
            "bad_frame",
        ),
        (
            true,
            json!({"type": "members", "id": "r", "conversation": conversation, "after": "not an id!"}),
            "bad_frame",
        ),
        (
            true,
            json!({"type": "members", "id": "r", "conversation": conversation, "after": 5}),
            "bad_frame",
        ),
        (
            true,
            json!({"type": "members", "id": "r", "conversation": conversation, "limit": "ten"}),
            "bad_frame",
        ),
        (
            true,
            json!({"type": "members", "id": "r", "conversation": conversation, "limit": -1}),
            "bad_frame",
        ),
        (
            true,
            json!({"type": "members", "id": "r", "conversation": conversation, "role": "owner"}),
            "bad_frame",
        ),
        (
            false,
            json!({"type": "members", "id": "r", "conversation": conversation}),
            "not_member",
        ),
        (
            false,
            json!({"type": "members", "id": "r", "conversation": unknown}),
            "conversation_not_found",
        ),
    ] {
        let client = if member { &mut alice } else { &mut carol };
        client.send(frame.clone()).await;
        let reply = client.next_of(&["error"]).await;
        assert_eq!(reply["code"], code, "{frame}: {reply}");
        assert_eq!(reply["retryable"], false);
        assert_eq!(reply["id"], "r", "{frame}: {reply}");
    }
    // A version 1 socket is answered as a version 1 server would.
    let mut v1 = platform.connect(0, "alice").await;
    v1.send(json!({"type": "members", "id": "r", "conversation": conversation}))
        .await;
    let reply = v1.next_of(&["error"]).await;
    assert_eq!(reply["code"], "unknown_frame_type", "{reply}");
}
