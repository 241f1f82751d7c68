//! The `conversations` list: what a version 2 socket is sent for a list view (the newest
//! message's preview, the user's read marker and unread count), and exactly the version 1
//! shape for version 1 sockets; on real NATS and SQLite, through a gateway.

use crate::support;

use serde_json::json;
use support::{Platform, eventually};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn version_2_lists_carry_a_preview_the_marker_and_unread_and_version_1_lists_do_not() {
    let platform = Platform::start(1).await;
    let mut alice = platform.connect_v2(0, "alice").await;
    let mut bob = platform.connect_v2(0, "bob").await;
    let conversation = platform.direct(&mut alice, &mut bob, "bob").await;
    let long = "é".repeat(200);
    let mut seqs = Vec::new();
    for (i, body) in ["first", "second", long.as_str()].into_iter().enumerate() {
        let id = format!("b{i}");
        bob.send(json!({"type": "send", "id": id, "conversation": conversation, "body": body}))
            .await;
        seqs.push(bob.reply_to(&id).await["seq"].as_u64().unwrap());
    }
    alice
        .send(json!({"type": "mark_read", "id": "r", "conversation": conversation, "seq": seqs[0]}))
        .await;
    assert_eq!(alice.reply_to("r").await["type"], "ack");
    platform.projected().await;
    let store = platform.store().await;
    let user = parley_events::UserId::parse("alice").unwrap();
    eventually(|| async {
        (store.read_marker(conversation, &user).await.unwrap() == seqs[0]).then_some(())
    })
    .await;

    alice
        .send(json!({"type": "conversations", "id": "c"}))
        .await;
    let list = alice.reply_to("c").await;
    let entry = &list["conversations"][0];
    assert_eq!(entry["conversation"], json!(conversation));
    assert_eq!(entry["read_seq"], seqs[0]);
    assert_eq!(entry["unread"], 2, "bob's two messages after the marker");
    let preview = &entry["last_message"];
    assert_eq!(preview["seq"], seqs[2]);
    assert_eq!(preview["sender"], "bob");
    assert_eq!(
        preview["body"],
        "é".repeat(140),
        "140 characters, not bytes"
    );
    assert!(preview["at"].as_u64().unwrap() > 0);

    // Bob never set a marker, and every message is his own: nothing is unread.
    bob.send(json!({"type": "conversations", "id": "c"})).await;
    let entry = bob.reply_to("c").await["conversations"][0].clone();
    assert_eq!(
        (&entry["read_seq"], &entry["unread"]),
        (&json!(0), &json!(0))
    );

    let mut v1 = platform.connect(0, "alice").await;
    v1.send(json!({"type": "conversations", "id": "c"})).await;
    let list = v1.reply_to("c").await;
    let entry = list["conversations"][0].as_object().unwrap();
    let mut keys: Vec<&str> = entry.keys().map(String::as_str).collect();
    keys.sort_unstable();
    assert_eq!(
        keys,
        [
            "conversation",
            "kind",
            "last_activity_at",
            "last_seq",
            "role"
        ],
        "exactly the version 1 shape"
    );
}
