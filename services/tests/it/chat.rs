//! The message path end to end, on real NATS, Redis and SQLite, with real WebSocket clients.

use crate::support;

use std::time::Duration;

use futures::StreamExt;

use parley_events::{ConversationId, Event};
use serde_json::json;
use support::{Platform, eventually};

fn conversation_of(frame: &serde_json::Value) -> ConversationId {
    frame["conversation"].as_str().unwrap().parse().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_message_is_delivered_once_logged_once_projected_and_presence_tracked() {
    let platform = Platform::start(1).await;
    let (mut alice, mut bob, conversation) = platform.alice_and_bob().await;

    alice
        .send(
            json!({"type": "send", "id": "m-1", "conversation": conversation, "body": "hello bob"}),
        )
        .await;
    let ack = alice.reply_to("m-1").await;
    assert_eq!(ack["type"], "ack");
    let own_event = alice.next_of(&["event"]).await;
    let seq = ack["seq"].as_u64().unwrap();
    assert_eq!(
        own_event["event"]["seq"], seq,
        "the sender's other views get the event too"
    );

    let delivered = bob.next_of(&["event"]).await;
    let event = &delivered["event"];
    assert_eq!(event["seq"], seq);
    assert_eq!(event["type"], "message.posted");
    assert_eq!(event["actor"], "alice");
    assert_eq!(event["data"]["body"], "hello bob");
    assert_eq!(
        event["prev"], 1,
        "prev points at the conversation's creation"
    );
    bob.expect_silence(Duration::from_millis(300)).await;

    assert_eq!(
        platform.posted().await,
        [(seq, "hello bob".to_owned())],
        "exactly one event in the log"
    );

    let store = platform.store().await;
    let page = eventually(|| async {
        let page = store.history(conversation, None, 10).await.unwrap();
        (!page.messages.is_empty()).then_some(page)
    })
    .await;
    assert_eq!(page.messages.len(), 1);
    assert_eq!(page.messages[0].body, "hello bob");
    assert_eq!(page.messages[0].seq, seq);

    bob.send(json!({"type": "history", "id": "h-1", "conversation": conversation}))
        .await;
    let history = bob.next_of(&["history"]).await;
    assert_eq!(history["id"], "h-1");
    assert_eq!(history["messages"][0]["body"], "hello bob");
    assert_eq!(history["messages"][0]["sender"], "alice");
    assert_eq!(history["has_more"], false);

    eventually(|| async {
        (platform.presence("alice").await.online() && platform.presence("bob").await.online())
            .then_some(())
    })
    .await;
    bob.close().await;
    let bob_presence = eventually(|| async {
        let presence = platform.presence("bob").await;
        (!presence.online()).then_some(presence)
    })
    .await;
    assert!(
        bob_presence.last_seen.is_some(),
        "last seen is kept after going offline"
    );
    assert!(platform.presence("alice").await.online());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delivery_works_the_same_across_two_gateways() {
    let platform = Platform::start(2).await;
    let mut alice = platform.connect(0, "alice").await;
    let mut bob = platform.connect(1, "bob").await;
    let conversation = platform.direct(&mut alice, &mut bob, "bob").await;

    for i in 0..5 {
        alice.send(json!({"type": "send", "id": format!("m-{i}"), "conversation": conversation, "body": format!("n{i}")})).await;
    }
    let mut seqs = Vec::new();
    for i in 0..5 {
        let frame = bob.next_of(&["event"]).await;
        assert_eq!(frame["event"]["data"]["body"], format!("n{i}"), "in order");
        seqs.push(frame["event"]["seq"].as_u64().unwrap());
    }
    assert!(seqs.windows(2).all(|w| w[0] < w[1]));
    bob.expect_silence(Duration::from_millis(300)).await;

    // And back the other way.
    bob.send(json!({"type": "send", "id": "r-1", "conversation": conversation, "body": "reply"}))
        .await;
    let reply = loop {
        let frame = alice.next_of(&["ack", "event"]).await;
        if frame["type"] == "event" && frame["event"]["actor"] == "bob" {
            break frame;
        }
    };
    assert_eq!(reply["event"]["data"]["body"], "reply");
    assert_eq!(reply["event"]["prev"], seqs[4]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_client_message_id_twice_appends_once_and_acks_the_same() {
    let platform = Platform::start(2).await;
    let (mut alice, mut bob, conversation) = platform.alice_and_bob().await;
    let send = json!({"type": "send", "id": "same", "conversation": conversation, "body": "once"});

    alice.send(send.clone()).await;
    let first = alice.reply_to("same").await;
    assert_eq!(first["type"], "ack");
    bob.next_of(&["event"]).await;

    alice.send(send.clone()).await;
    let second = alice.reply_to("same").await;
    assert_eq!(first, second);

    // A retry from another device on another gateway after a reconnect: same answer.
    let mut alice_phone = platform.connect(1, "alice").await;
    alice_phone.send(send).await;
    let third = alice_phone.reply_to("same").await;
    assert_eq!(first, third);

    bob.expect_silence(Duration::from_millis(300)).await;
    assert_eq!(platform.posted().await.len(), 1);
}

/// `frame` is the `id_reused` error for `id`.
fn assert_id_reused(frame: &serde_json::Value, id: &str) {
    assert_eq!(frame["type"], "error", "{frame}");
    assert_eq!(frame["id"], id, "{frame}");
    assert_eq!(frame["code"], "id_reused", "{frame}");
    assert_eq!(frame["retryable"], false, "{frame}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_id_reused_for_a_different_request_is_refused_wherever_the_repeat_arrives() {
    let mut platform = Platform::start_with(2, |c| c.gateway.command_timeout_secs = 60).await;
    let (mut alice, _bob, conversation) = platform.alice_and_bob().await;
    let send =
        |body: &str| json!({"type": "send", "id": "x", "conversation": conversation, "body": body});
    let group = |id: &str, title: &str| json!({"type": "create_group", "id": id, "title": title, "members": ["bob"]});

    // While the first is in flight on this gateway (no handler takes it), a different
    // request under its id (another conversation's line, so it does not wait) is refused;
    // sent in one write, so the gateway reads both before either's task first runs.
    platform.stop_handler().await;
    alice
        .send_pipelined([send("first"), group("x", "team")])
        .await;
    assert_id_reused(&alice.reply_to("x").await, "x");
    platform.start_handler().await;
    let first = alice.reply_to("x").await;
    assert_eq!(first["type"], "ack", "{first}");
    alice.send(group("g", "team")).await;
    let group_ack = alice.reply_to("g").await;
    assert_eq!(group_ack["type"], "ack", "{group_ack}");

    // Once it took effect, through the intake's dedupe and the handlers' answer, on this
    // gateway and on another one.
    let mut alice_phone = platform.connect(1, "alice").await;
    for client in [&mut alice, &mut alice_phone] {
        client.send(send("second")).await;
        assert_id_reused(&client.reply_to("x").await, "x");
        client.send(group("g", "other team")).await;
        assert_id_reused(&client.reply_to("g").await, "g");
        client.send(send("first")).await;
        assert_eq!(client.reply_to("x").await, first);
    }

    // After a restart, from the command memory the handler rebuilt from the log.
    platform.stop_handler().await;
    platform.start_handler().await;
    alice.send(send("third")).await;
    assert_id_reused(&alice.reply_to("x").await, "x");
    alice.send(group("g", "other team")).await;
    assert_id_reused(&alice.reply_to("g").await, "g");
    alice.send(send("first")).await;
    assert_eq!(alice.reply_to("x").await, first);
    alice.send(group("g", "team")).await;
    assert_eq!(alice.reply_to("g").await, group_ack);

    assert_eq!(platform.posted_bodies().await, ["first"]);
    assert_eq!(platform.log().await.len(), 3, "creations and one message");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn creating_a_direct_conversation_twice_yields_the_same_one() {
    let platform = Platform::start(1).await;
    let (_alice, mut bob, conversation) = platform.alice_and_bob().await;
    bob.send(json!({"type": "create_direct", "id": "other-id", "peer": "alice"}))
        .await;
    let ack = bob.reply_to("other-id").await;
    assert_eq!(conversation_of(&ack), conversation);
    assert_eq!(ack["seq"], 1);
    assert_eq!(platform.log().await.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_members_receive_messages_and_outsiders_are_refused() {
    let platform = Platform::start(1).await;
    let mut alice = platform.connect(0, "alice").await;
    let mut bob = platform.connect(0, "bob").await;
    let mut carol = platform.connect(0, "carol").await;
    let mut mallory = platform.connect(0, "mallory").await;
    alice.send(json!({"type": "create_group", "id": "g", "title": "team", "members": ["bob", "carol"]})).await;
    let ack = alice.reply_to("g").await;
    let group = conversation_of(&ack);
    for member in [&mut bob, &mut carol] {
        let created = member.next_of(&["event"]).await;
        assert_eq!(created["event"]["data"]["kind"], "group");
        assert_eq!(
            created["event"]["data"]["members"][0],
            json!({"user": "alice", "role": "owner"})
        );
    }
    bob.send(json!({"type": "send", "id": "b1", "conversation": group, "body": "hi team"}))
        .await;
    assert_eq!(
        carol.next_of(&["event"]).await["event"]["data"]["body"],
        "hi team"
    );

    mallory
        .send(json!({"type": "send", "id": "x", "conversation": group, "body": "let me in"}))
        .await;
    let refused = mallory.reply_to("x").await;
    assert_eq!(refused["code"], "not_member");
    eventually(|| async { platform.store().await.conversation(group).await.unwrap() }).await;
    mallory
        .send(json!({"type": "history", "id": "h", "conversation": group}))
        .await;
    let refused = mallory.reply_to("h").await;
    assert_eq!(refused["code"], "not_member");
    mallory.expect_silence(Duration::from_millis(200)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn history_pages_backwards_without_gaps_or_repeats() {
    let platform = Platform::start(1).await;
    let (mut alice, mut bob, conversation) = platform.alice_and_bob().await;
    for i in 0..7 {
        alice.send(json!({"type": "send", "id": format!("p{i}"), "conversation": conversation, "body": format!("{i}")})).await;
    }
    for _ in 0..7 {
        bob.next_of(&["event"]).await;
    }
    eventually(|| async {
        let page = platform
            .store()
            .await
            .history(conversation, None, 10)
            .await
            .unwrap();
        (page.messages.len() == 7).then_some(())
    })
    .await;
    let mut bodies = Vec::new();
    let mut before = None;
    loop {
        bob.send(json!({"type": "history", "id": "h", "conversation": conversation, "before": before, "limit": 3})).await;
        let page = bob.next_of(&["history"]).await;
        let messages = page["messages"].as_array().unwrap();
        bodies.extend(
            messages
                .iter()
                .map(|m| m["body"].as_str().unwrap().to_owned()),
        );
        before = messages.last().map(|m| m["seq"].as_u64().unwrap());
        if page["has_more"] == false {
            break;
        }
    }
    assert_eq!(bodies, ["6", "5", "4", "3", "2", "1", "0"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_queued_while_the_handler_is_down_are_processed_when_it_returns() {
    let mut platform = Platform::start_with(1, |c| c.gateway.command_timeout_secs = 60).await;
    let (mut alice, mut bob, conversation) = platform.alice_and_bob().await;

    platform.stop_handler().await;
    for i in 0..10 {
        alice.send(json!({"type": "send", "id": format!("q{i}"), "conversation": conversation, "body": format!("queued {i}")})).await;
    }
    // The commands wait in the intake stream; nothing is appended meanwhile.
    bob.expect_silence(Duration::from_millis(500)).await;
    assert_eq!(platform.log().await.len(), 1);

    platform.start_handler().await;
    for i in 0..10 {
        let frame = bob.next_of(&["event"]).await;
        assert_eq!(frame["event"]["data"]["body"], format!("queued {i}"));
    }
    for i in 0..10 {
        assert_eq!(alice.reply_to(&format!("q{i}")).await["type"], "ack");
    }
    assert_eq!(platform.log().await.len(), 11);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_event_the_gateway_missed_is_filled_from_the_log() {
    use parley_events::subjects::Shards;
    use parley_events::{ClientMsgId, CommandId, EventEnvelope, EventId, MessagePosted, UserId};

    let platform = Platform::start(1).await;
    let (mut alice, mut bob, conversation) = platform.alice_and_bob().await;

    // An event appended to the log whose live copy never went out, as when a core NATS
    // publish is dropped.
    let alice_id = UserId::parse("alice").unwrap();
    let client_id = ClientMsgId::parse("lost").unwrap();
    let command = CommandId::from_client(&alice_id, &client_id);
    let lost = EventEnvelope {
        id: EventId::derive(command, 0, 1),
        conversation,
        prev: 1,
        command,
        actor: alice_id,
        at: 1,
        event: Event::MessagePosted(MessagePosted {
            client_id,
            body: "lost on the live path".into(),
            reply_to: None,
        }),
    };
    let js = async_nats::jetstream::new(async_nats::connect(platform.nats.url()).await.unwrap());
    let subject = Shards::new(platform.config.log.shards)
        .unwrap()
        .subject(conversation);
    let lost_seq = js
        .publish(subject, lost.to_bytes().into())
        .await
        .unwrap()
        .await
        .unwrap()
        .sequence;

    alice.send(json!({"type": "send", "id": "after", "conversation": conversation, "body": "next one"})).await;
    let first = bob.next_of(&["event"]).await;
    assert_eq!(first["event"]["seq"], lost_seq);
    assert_eq!(first["event"]["data"]["body"], "lost on the live path");
    let second = bob.next_of(&["event"]).await;
    assert_eq!(second["event"]["data"]["body"], "next one");
    assert_eq!(
        second["event"]["prev"], lost_seq,
        "the handler chained after the event it found in the log"
    );
    bob.expect_silence(Duration::from_millis(300)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_largest_legal_bodies_are_accepted_delivered_and_kept_byte_for_byte_however_escaped() {
    let platform = Platform::start(1).await;
    let (mut alice, mut bob, conversation) = platform.alice_and_bob().await;
    let max = platform.config.limits.max_message_bytes;
    // Control characters JSON escapes as `\u00XX` (6 bytes each: 24 KiB for the body, more
    // than the old 16 KiB frame limit), 4-byte emoji sent as UTF-16 escape pairs (12 bytes each), quotes and backslashes.
    let escaped_6: String = (0u8..0x20)
        .filter(|b| !b"\x08\x09\x0a\x0c\x0d".contains(b))
        .map(char::from)
        .cycle()
        .take(max)
        .collect();
    let emoji = "\u{1F600}".repeat(max / 4);
    let quotes: String = "\"\\".repeat(max / 2);
    let frames = [
        ("controls", escaped_6.clone(), None),
        (
            "emoji",
            emoji.clone(),
            Some("\\ud83d\\ude00".repeat(max / 4)),
        ),
        ("quotes", quotes.clone(), None),
    ];
    for (id, body, written) in &frames {
        assert_eq!(body.len(), max);
        let mut text =
            json!({"type": "send", "id": id, "conversation": conversation, "body": body})
                .to_string();
        if let Some(written) = written {
            let encoded = serde_json::to_string(body).unwrap();
            text = text.replace(&encoded, &format!("\"{written}\""));
            assert_eq!(
                serde_json::from_str::<serde_json::Value>(&text).unwrap()["body"],
                *body
            );
        }
        assert!(text.len() <= platform.config.limits.frame_bytes());
        alice
            .send_raw(tokio_tungstenite::tungstenite::Message::Text(text.into()))
            .await;
        let ack = alice.reply_to(id).await;
        assert_eq!(ack["type"], "ack", "{id}: {ack}");
        let event = bob.next_of(&["event"]).await;
        assert_eq!(event["event"]["data"]["body"], *body, "{id}");
    }

    platform.projected().await;
    bob.send(json!({"type": "history", "id": "h", "conversation": conversation}))
        .await;
    let history = bob.reply_to("h").await;
    let bodies: Vec<&str> = history["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|message| message["body"].as_str().unwrap())
        .collect();
    assert_eq!(
        bodies,
        [quotes.as_str(), emoji.as_str(), escaped_6.as_str()]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_delivered_twice_appends_once_and_gets_the_same_outcome_twice() {
    use parley_events::Outcome;

    let platform = Platform::start(1).await;
    let (_alice, mut bob, conversation) = platform.alice_and_bob().await;

    // The same command published twice under different intake ids, as a redelivery after
    // the intake's duplicate window would arrive.
    let client = async_nats::connect(platform.nats.url()).await.unwrap();
    let mut outcomes = client.subscribe("parley.outcome.test").await.unwrap();
    let command = support::alice_posts(conversation, "redelivered", "only once");
    let js = async_nats::jetstream::new(client);
    for attempt in ["first", "second"] {
        let message = async_nats::jetstream::message::PublishMessage::build()
            .payload(command.to_bytes().into())
            .message_id(attempt);
        js.send_publish(platform.intake_subject(command.conversation()), message)
            .await
            .unwrap()
            .await
            .unwrap();
    }
    let mut results = Vec::new();
    for _ in 0..2 {
        let message = tokio::time::timeout(Duration::from_secs(10), outcomes.next())
            .await
            .unwrap()
            .unwrap();
        results.push(Outcome::from_bytes(&message.payload).unwrap());
    }
    assert_eq!(results[0], results[1]);
    assert!(matches!(
        results[0].result,
        parley_events::OutcomeResult::Accepted { .. }
    ));
    assert_eq!(
        bob.next_of(&["event"]).await["event"]["data"]["body"],
        "only once"
    );
    bob.expect_silence(Duration::from_millis(300)).await;
    assert_eq!(platform.posted().await.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_history_page_too_large_for_one_frame_is_trimmed_and_paging_continues() {
    let platform = Platform::start_with(1, |c| c.limits.max_message_bytes = 12_000).await;
    let (mut alice, mut bob, conversation) = platform.alice_and_bob().await;
    let count = 60; // 60 x 12 kB is more than one 512 KiB frame
    for i in 0..count {
        let body = format!("{i:03}{}", "x".repeat(11_990));
        alice.send(json!({"type": "send", "id": format!("big{i}"), "conversation": conversation, "body": body})).await;
    }
    for i in 0..count {
        assert_eq!(alice.reply_to(&format!("big{i}")).await["type"], "ack");
    }
    platform.projected().await;
    let mut seen = Vec::new();
    let mut before = None;
    let mut pages = 0;
    loop {
        bob.send(json!({"type": "history", "id": "h", "conversation": conversation, "before": before, "limit": 100})).await;
        let page = bob.reply_to("h").await;
        assert!(page.to_string().len() <= 512 * 1024);
        pages += 1;
        let messages = page["messages"].as_array().unwrap();
        seen.extend(
            messages
                .iter()
                .map(|m| m["body"].as_str().unwrap()[..3].to_owned()),
        );
        before = messages.last().map(|m| m["seq"].as_u64().unwrap());
        if page["has_more"] == false {
            break;
        }
    }
    assert!(pages > 1, "the page was trimmed");
    let expected: Vec<String> = (0..count).rev().map(|i| format!("{i:03}")).collect();
    assert_eq!(seen, expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_connecting_before_the_store_has_a_new_conversation_still_follows_it() {
    let mut platform = Platform::start(1).await;
    // The store lags: nothing new reaches it while the projector is stopped.
    platform.stop_projector().await;
    let mut alice = platform.connect(0, "alice").await;
    alice
        .send(json!({"type": "create_direct", "id": "dm", "peer": "bob"}))
        .await;
    let conversation = conversation_of(&alice.reply_to("dm").await);
    alice
        .send(json!({"type": "send", "id": "early", "conversation": conversation, "body": "early"}))
        .await;
    assert_eq!(alice.reply_to("early").await["type"], "ack");

    let mut bob = platform.connect(0, "bob").await;
    alice
        .send(json!({"type": "send", "id": "late", "conversation": conversation, "body": "late"}))
        .await;
    assert_eq!(alice.reply_to("late").await["type"], "ack");
    // Bob follows the conversation, though the store does not list it for him yet. (What
    // was sent before he connected is for history, or a resume, to bring.)
    assert_eq!(
        bob.next_of(&["event"]).await["event"]["data"]["body"],
        "late"
    );
    bob.expect_silence(Duration::from_millis(300)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejected_send_repeated_once_it_is_valid_is_accepted() {
    use parley_events::UserId;

    let platform = Platform::start(1).await;
    let mut alice = platform.connect(0, "alice").await;
    let mut bob = platform.connect(0, "bob").await;
    // Direct conversation ids are known in advance; this one does not exist yet.
    let conversation = ConversationId::direct(
        &UserId::parse("alice").unwrap(),
        &UserId::parse("bob").unwrap(),
    );
    let send =
        json!({"type": "send", "id": "early-bird", "conversation": conversation, "body": "hi"});
    alice.send(send.clone()).await;
    assert_eq!(
        alice.reply_to("early-bird").await["code"],
        "conversation_not_found"
    );

    platform.direct(&mut alice, &mut bob, "bob").await;
    // The same request again, inside the intake's duplicate window: it now succeeds.
    alice.send(send).await;
    let ack = alice.reply_to("early-bird").await;
    assert_eq!(ack["type"], "ack", "{ack}");
    assert_eq!(bob.next_of(&["event"]).await["event"]["data"]["body"], "hi");
    assert_eq!(platform.posted().await.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conversations_lists_the_users_conversations_most_recent_first_in_pages() {
    let platform = Platform::start(1).await;
    let (mut alice, mut bob, direct) = platform.alice_and_bob().await;
    alice
        .send(json!({"type": "create_group", "id": "g", "title": "team", "members": ["bob"]}))
        .await;
    let group = conversation_of(&alice.reply_to("g").await);
    alice
        .send(json!({"type": "send", "id": "m", "conversation": direct, "body": "bump"}))
        .await;
    alice.reply_to("m").await;
    platform.projected().await;

    bob.send(json!({"type": "conversations", "id": "c1", "limit": 1}))
        .await;
    let first = bob.reply_to("c1").await;
    assert_eq!(
        first["conversations"][0]["conversation"],
        json!(direct),
        "most recent first"
    );
    assert_eq!(first["conversations"][0]["kind"], "direct");
    assert_eq!(first["has_more"], true);
    let before = first["conversations"][0]["last_seq"].clone();
    bob.send(json!({"type": "conversations", "id": "c2", "before": before}))
        .await;
    let second = bob.reply_to("c2").await;
    assert_eq!(second["conversations"].as_array().unwrap().len(), 1);
    assert_eq!(second["conversations"][0]["conversation"], json!(group));
    assert_eq!(second["conversations"][0]["title"], "team");
    assert_eq!(second["conversations"][0]["role"], "member");
    assert_eq!(second["has_more"], false);
}
