//! `history` both ways: backwards with `before`, forwards with `after`, through a gateway on
//! real NATS and SQLite, and what it answers to requests it cannot serve.

use crate::support;

use serde_json::{Value, json};
use support::{Client, Platform, eventually};

/// The bodies of every page `history` returns from `start` on, following `has_more`, with
/// `cursor` (`before` or `after`) set to the last message of each page.
async fn page_through(
    client: &mut Client,
    conversation: &Value,
    cursor: &str,
    limit: u32,
) -> Vec<String> {
    let mut bodies = Vec::new();
    let mut at: Option<u64> = (cursor == "after").then_some(0);
    for page_number in 0.. {
        let id = format!("h-{page_number}");
        let mut frame =
            json!({"type": "history", "id": id, "conversation": conversation, "limit": limit});
        if let Some(at) = at {
            frame[cursor] = at.into();
        }
        client.send(frame).await;
        let page = client.reply_to(&id).await;
        assert_eq!(page["type"], "history", "{page}");
        let messages = page["messages"].as_array().unwrap();
        assert!(messages.len() <= limit as usize);
        bodies.extend(
            messages
                .iter()
                .map(|m| m["body"].as_str().unwrap().to_owned()),
        );
        at = messages.last().map(|m| m["seq"].as_u64().unwrap()).or(at);
        if page["has_more"] == false {
            break;
        }
    }
    bodies
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_pages_forwards_with_after_and_backwards_with_before() {
    let platform = Platform::start(1).await;
    let (mut alice, _bob, conversation) = platform.alice_and_bob().await;
    let mut bob = platform.connect_v2(0, "bob").await;
    for i in 0..7 {
        alice.send(json!({"type": "send", "id": format!("p{i}"), "conversation": conversation, "body": format!("{i}")})).await;
        assert_eq!(alice.reply_to(&format!("p{i}")).await["type"], "ack");
    }
    platform.projected().await;
    let conversation = json!(conversation);
    let all: Vec<String> = (0..7).map(|i| i.to_string()).collect();
    assert_eq!(
        page_through(&mut bob, &conversation, "after", 3).await,
        all,
        "forwards: oldest first, each message once"
    );
    let mut newest_first = all.clone();
    newest_first.reverse();
    assert_eq!(
        page_through(&mut bob, &conversation, "before", 3).await,
        newest_first
    );

    // `after` is exclusive; a page after the newest message is empty and says so.
    bob.send(json!({"type": "history", "id": "h", "conversation": conversation, "limit": 7}))
        .await;
    let newest = bob.reply_to("h").await["messages"][0]["seq"]
        .as_u64()
        .unwrap();
    bob.send(
        json!({"type": "history", "id": "a", "conversation": conversation, "after": newest - 1}),
    )
    .await;
    let last = bob.reply_to("a").await;
    assert_eq!(last["messages"].as_array().unwrap().len(), 1, "{last}");
    assert_eq!(last["messages"][0]["body"], "6");
    assert_eq!(last["has_more"], false);
    bob.send(json!({"type": "history", "id": "b", "conversation": conversation, "after": newest}))
        .await;
    let empty = bob.reply_to("b").await;
    assert_eq!(empty["messages"], json!([]));
    assert_eq!(empty["has_more"], false);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_requests_it_cannot_serve_get_their_error_codes() {
    let platform = Platform::start(1).await;
    let (_alice, _bob, conversation) = platform.alice_and_bob().await;
    let mut carol = platform.connect_v2(0, "carol").await;
    let mut alice = platform.connect_v2(0, "alice").await;
    let store = platform.store().await;
    eventually(|| async { store.conversation(conversation).await.unwrap() }).await;
    let unknown = "00000000-0000-0000-0000-000000000063";
    for (member, frame, code) in [
        (
            true,
            json!({"type": "history", "id": "r", "conversation": conversation, "before": 5, "after": 1}),
            "invalid_request",
        ),
        (
            true,
            json!({"type": "history", "id": "r", "conversation": conversation, "after": "1"}),
            "bad_frame",
        ),
        (
            true,
            json!({"type": "history", "id": "r", "conversation": conversation, "after": -1}),
            "bad_frame",
        ),
        (
            true,
            json!({"type": "history", "id": "r", "after": 1}),
            "bad_frame",
        ),
        (
            false,
            json!({"type": "history", "id": "r", "conversation": conversation, "after": 0}),
            "not_member",
        ),
        (
            false,
            json!({"type": "history", "id": "r", "conversation": unknown, "after": 0}),
            "conversation_not_found",
        ),
    ] {
        let client = if member { &mut alice } else { &mut carol };
        client.send(frame.clone()).await;
        let reply = client.reply_to("r").await;
        assert_eq!(reply["type"], "error", "{frame}: {reply}");
        assert_eq!(reply["code"], code, "{frame}: {reply}");
        assert_eq!(reply["retryable"], false);
    }
}
