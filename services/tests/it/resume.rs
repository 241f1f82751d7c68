//! Resume (protocol version 2): a client that reconnects gets every event it missed, in
//! order, then live events, with nothing missing and nothing twice.

use crate::support;

use std::time::Duration;

use parley_events::ConversationId;
use serde_json::{Value, json};
use support::{Client, Closed, Platform};

/// Send `resume` and read until its `resumed`: the events it brought, and the `resumed`.
async fn resume(client: &mut Client, id: &str, point: Value) -> (Vec<Value>, Value) {
    let mut frame = json!({"type": "resume", "id": id});
    frame
        .as_object_mut()
        .unwrap()
        .extend(point.as_object().unwrap().clone());
    client.send(frame).await;
    let mut events = Vec::new();
    loop {
        let frame = client.next().await;
        match frame["type"].as_str() {
            Some("event") => events.push(frame["event"].clone()),
            Some("resumed") if frame["id"] == id => return (events, frame),
            _ => panic!("unexpected frame during a resume: {frame}"),
        }
    }
}

/// `count` messages from `client` to `conversation`, sent without waiting, then every ack
/// awaited; their sequences.
async fn send_many(
    client: &mut Client,
    conversation: ConversationId,
    prefix: &str,
    count: usize,
) -> Vec<u64> {
    for i in 0..count {
        client
            .send(json!({"type": "send", "id": format!("{prefix}-{i}"), "conversation": conversation, "body": format!("{prefix} {i}")}))
            .await;
    }
    let mut seqs = Vec::new();
    for i in 0..count {
        let ack = client.reply_to(&format!("{prefix}-{i}")).await;
        assert_eq!(ack["type"], "ack", "{ack}");
        seqs.push(ack["seq"].as_u64().unwrap());
    }
    seqs
}

/// Send a create frame and return the conversation its ack names.
async fn create(client: &mut Client, frame: Value) -> ConversationId {
    let id = frame["id"].as_str().unwrap().to_owned();
    client.send(frame).await;
    let ack = client.reply_to(&id).await;
    assert_eq!(ack["type"], "ack", "{ack}");
    ack["conversation"].as_str().unwrap().parse().unwrap()
}

fn seqs(events: &[Value]) -> Vec<u64> {
    events.iter().map(|e| e["seq"].as_u64().unwrap()).collect()
}

/// Events of one conversation form an unbroken chain starting after `after`.
fn assert_chain(events: &[Value], after: u64) {
    let mut previous = after;
    for event in events {
        assert_eq!(event["prev"], previous, "gap before {event}");
        previous = event["seq"].as_u64().unwrap();
    }
}

/// Bob on protocol 2, resumed from now, and a direct conversation alice (protocol 1)
/// opened with him; the creation's sequence.
async fn alice_and_resumed_bob(platform: &Platform) -> (Client, Client, ConversationId, u64) {
    let mut alice = platform.connect(0, "alice").await;
    let mut bob = platform.open_v2(0, "bob").await;
    let (events, resumed) = resume(&mut bob, "r0", json!({})).await;
    assert!(events.is_empty());
    assert_eq!(resumed["conversations"], json!([]));
    alice
        .send(json!({"type": "create_direct", "id": "dm", "peer": "bob"}))
        .await;
    let ack = alice.reply_to("dm").await;
    let conversation: ConversationId = ack["conversation"].as_str().unwrap().parse().unwrap();
    let created = bob.next_of(&["event"]).await;
    assert_eq!(created["event"]["type"], "conversation.created");
    alice.next_of(&["event"]).await;
    (alice, bob, conversation, ack["seq"].as_u64().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_was_away_gets_what_it_missed_in_order_then_live() {
    let platform = Platform::start(1).await;
    let (mut alice, bob, conversation, created) = alice_and_resumed_bob(&platform).await;
    bob.close().await;

    let missed = send_many(&mut alice, conversation, "away", 5).await;
    let mut bob = platform.open_v2(0, "bob").await;
    bob.expect_silence(Duration::from_millis(200)).await;
    let (events, resumed) = resume(
        &mut bob,
        "r1",
        json!({"conversations": {conversation.to_string(): created}}),
    )
    .await;
    assert_eq!(seqs(&events), missed);
    assert_chain(&events, created);
    assert_eq!(events[0]["data"]["body"], "away 0");
    assert_eq!(resumed["conversations"], json!([]));
    assert_eq!(
        resumed["unread"],
        json!([{"conversation": conversation, "read_seq": 0, "unread": 5}]),
        "bob never marked it read: alice's five are unread"
    );
    assert!(resumed["cursor"].as_str().unwrap().starts_with("c1-"));

    let live = send_many(&mut alice, conversation, "back", 1).await;
    let event = bob.next_of(&["event"]).await;
    assert_eq!(event["event"]["seq"], live[0]);
    assert_eq!(event["event"]["prev"], *missed.last().unwrap());
    bob.expect_silence(Duration::from_millis(300)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cursor_brings_the_conversations_created_while_away_with_their_events() {
    let platform = Platform::start(1).await;
    let mut bob = platform.open_v2(0, "bob").await;
    let (_, resumed) = resume(&mut bob, "r0", json!({})).await;
    let cursor = resumed["cursor"].clone();
    bob.close().await;

    let mut carol = platform.connect(0, "carol").await;
    let group = create(
        &mut carol,
        json!({"type": "create_group", "id": "g", "title": "away", "members": ["bob"]}),
    )
    .await;
    let sent = send_many(&mut carol, group, "while-away", 2).await;

    let mut bob = platform.open_v2(0, "bob").await;
    let (events, resumed) = resume(&mut bob, "r1", json!({"cursor": cursor})).await;
    assert_eq!(events.len(), 3, "{events:?}");
    assert_eq!(events[0]["type"], "conversation.created");
    assert_eq!(events[0]["conversation"], group.to_string());
    assert_eq!(seqs(&events[1..]), sent);
    assert_chain(&events[1..], events[0]["seq"].as_u64().unwrap());
    assert_eq!(resumed["conversations"], json!([]));
    assert!(resumed["cursor"] != cursor, "the cursor moved on");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_device_resumes_from_now_and_then_follows_live() {
    let platform = Platform::start(1).await;
    let (mut alice, _bob, conversation, _) = alice_and_resumed_bob(&platform).await;
    send_many(&mut alice, conversation, "old", 3).await;
    platform.projected().await;

    let mut tablet = platform.open_v2(0, "bob").await;
    let (events, resumed) = resume(&mut tablet, "r", json!({})).await;
    assert!(
        events.is_empty(),
        "nothing old for a new device: {events:?}"
    );
    assert_eq!(resumed["conversations"], json!([]));
    let live = send_many(&mut alice, conversation, "new", 1).await;
    assert_eq!(tablet.next_of(&["event"]).await["event"]["seq"], live[0]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_absence_is_resumed_in_bounded_rounds_without_gaps_or_repeats() {
    let platform = Platform::start_with(1, |c| c.gateway.resume_max_events = 5).await;
    let (mut alice, bob, conversation, created) = alice_and_resumed_bob(&platform).await;
    bob.close().await;
    let missed = send_many(&mut alice, conversation, "m", 12).await;

    let mut bob = platform.open_v2(0, "bob").await;
    let key = conversation.to_string();
    let mut received = Vec::new();
    let mut at = created;
    let mut rounds = 0;
    loop {
        rounds += 1;
        let (events, resumed) = resume(
            &mut bob,
            &format!("r{rounds}"),
            json!({"conversations": {&key: at}}),
        )
        .await;
        assert!(events.len() <= 5, "a round stays within its bound");
        assert_chain(&events, at);
        received.extend(seqs(&events));
        let states = resumed["conversations"].as_array().unwrap();
        if states.is_empty() {
            break;
        }
        assert_eq!(states[0]["state"], "more");
        at = states[0]["seq"].as_u64().unwrap();
        assert_eq!(at, *received.last().unwrap());
        if rounds == 1 {
            // While it is `more`, the conversation is not live for this socket: what is
            // sent now comes with a later round, in order.
            send_many(&mut alice, conversation, "during", 1).await;
            bob.expect_silence(Duration::from_millis(300)).await;
        }
    }
    let log: Vec<u64> = platform
        .log()
        .await
        .iter()
        .filter(|e| e.envelope.conversation == conversation && e.seq > created)
        .map(|e| e.seq)
        .collect();
    assert_eq!(received, log, "every event once, in order");
    assert_eq!(&received[..missed.len()], missed);
    assert_eq!(rounds, 3, "13 events in rounds of 5");
    let live = send_many(&mut alice, conversation, "live", 1).await;
    assert_eq!(bob.next_of(&["event"]).await["event"]["seq"], live[0]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resume_reads_what_the_store_has_not_projected_from_the_log() {
    let mut platform = Platform::start(1).await;
    let mut bob = platform.open_v2(0, "bob").await;
    let (_, resumed) = resume(&mut bob, "r0", json!({})).await;
    let cursor = resumed["cursor"].clone();
    bob.close().await;

    platform.stop_projector().await;
    let mut alice = platform.connect(0, "alice").await;
    let conversation = create(
        &mut alice,
        json!({"type": "create_direct", "id": "dm", "peer": "bob"}),
    )
    .await;
    let sent = send_many(&mut alice, conversation, "unprojected", 3).await;

    let mut bob = platform.open_v2(0, "bob").await;
    let (events, resumed) = resume(&mut bob, "r1", json!({"cursor": cursor})).await;
    assert_eq!(events[0]["type"], "conversation.created");
    assert_eq!(seqs(&events[1..]), sent);
    assert_eq!(resumed["conversations"], json!([]));
    // And it is live: the next message arrives without the store.
    let live = send_many(&mut alice, conversation, "live", 1).await;
    assert_eq!(bob.next_of(&["event"]).await["event"]["seq"], live[0]);
    platform.start_projector().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_point_older_than_the_log_holds_is_marked_truncated() {
    let platform = Platform::start(1).await;
    let (mut alice, bob, conversation, created) = alice_and_resumed_bob(&platform).await;
    bob.close().await;
    let sent = send_many(&mut alice, conversation, "m", 6).await;
    // An operator keeps only the newest three events.
    let js = platform.jetstream().await;
    let mut log = js
        .get_stream(parley_events::subjects::LOG_STREAM)
        .await
        .unwrap();
    let mut config = log.info().await.unwrap().config.clone();
    config.max_messages = 3;
    js.update_stream(config).await.unwrap();
    let first = log.info().await.unwrap().state.first_sequence;
    assert_eq!(first, sent[3]);

    let mut bob = platform.open_v2(0, "bob").await;
    let (events, resumed) = resume(
        &mut bob,
        "r",
        json!({"conversations": {conversation.to_string(): created}}),
    )
    .await;
    assert_eq!(seqs(&events), &sent[3..]);
    assert_eq!(
        resumed["conversations"],
        json!([{"conversation": conversation, "state": "truncated", "seq": sent[5], "first_seq": first}])
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resume_names_foreign_conversations_and_refuses_bad_input() {
    let platform = Platform::start(1).await;
    let (_alice, _bob, conversation, _) = alice_and_resumed_bob(&platform).await;
    let mut carol = platform.open_v2(0, "carol").await;
    let (events, resumed) = resume(
        &mut carol,
        "r",
        json!({"conversations": {conversation.to_string(): 0}}),
    )
    .await;
    assert!(events.is_empty());
    assert_eq!(
        resumed["conversations"],
        json!([{"conversation": conversation, "state": "not_member", "seq": 0}])
    );

    for (frame, code) in [
        (
            json!({"type": "resume", "id": "c", "cursor": "c1-zz"}),
            "bad_frame",
        ),
        (
            json!({"type": "resume", "id": "c", "cursor": 7}),
            "bad_frame",
        ),
        (
            json!({"type": "resume", "id": "c", "conversations": {"not-a-uuid": 1}}),
            "bad_frame",
        ),
        (
            json!({"type": "resume", "id": "c", "conversations": {conversation.to_string(): -1}}),
            "bad_frame",
        ),
        (
            json!({"type": "resume", "id": "c", "conversations": [1]}),
            "bad_frame",
        ),
    ] {
        carol.send(frame.clone()).await;
        let error = carol.reply_to("c").await;
        assert_eq!(error["code"], code, "{frame}: {error}");
    }
    let mut old = platform.connect(0, "carol").await;
    old.send(json!({"type": "resume", "id": "v1"})).await;
    assert_eq!(old.reply_to("v1").await["code"], "unknown_frame_type");
    assert!(platform.log().await.len() == 1, "nothing appended");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnecting_while_messages_flow_sees_each_exactly_once_in_order() {
    let platform = Platform::start(2).await;
    let (mut alice, bob, conversation, created) = alice_and_resumed_bob(&platform).await;
    bob.close().await;
    let sender = tokio::spawn(async move {
        let mut seqs = Vec::new();
        for round in 0..10 {
            seqs.extend(send_many(&mut alice, conversation, &format!("flow{round}"), 10).await);
        }
        seqs
    });
    let key = conversation.to_string();
    let mut received: Vec<u64> = Vec::new();
    let mut at = created;
    // Bob hops between the two gateways, resuming each time from what he has.
    for hop in 0..6 {
        let mut bob = platform.open_v2(hop % 2, "bob").await;
        let (events, _) = resume(&mut bob, "r", json!({"conversations": {&key: at}})).await;
        assert_chain(&events, at);
        received.extend(seqs(&events));
        at = received.last().copied().unwrap_or(at);
        // Live for a moment.
        while let Some(frame) = bob.next_within(Duration::from_millis(50)).await {
            let event = &frame["event"];
            assert_eq!(event["prev"], at, "live event out of line: {frame}");
            at = event["seq"].as_u64().unwrap();
            received.push(at);
        }
        bob.close().await;
    }
    let sent = sender.await.unwrap();
    let mut bob = platform.open_v2(0, "bob").await;
    let (events, _) = resume(&mut bob, "last", json!({"conversations": {&key: at}})).await;
    assert_chain(&events, at);
    received.extend(seqs(&events));
    assert_eq!(received, sent, "every message once, in order");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_socket_that_falls_too_far_behind_while_resuming_is_told_to_resume_again() {
    // Bob's resume sends more than the socket buffers hold (about 4 MiB on loopback), so it
    // waits on Bob, who does not read, while Alice keeps the conversation busy.
    const BODY: usize = 60 * 1024;
    let platform = Platform::start_with(1, |c| {
        c.limits.max_message_bytes = BODY;
        c.gateway.resume_max_bytes = 64 << 20;
        c.gateway.send_queue = 8;
    })
    .await;
    let (mut alice, bob, conversation, created) = alice_and_resumed_bob(&platform).await;
    bob.close().await;
    for i in 0..150 {
        alice
            .send(json!({"type": "send", "id": format!("big-{i}"), "conversation": conversation, "body": "x".repeat(BODY)}))
            .await;
        assert_eq!(alice.reply_to(&format!("big-{i}")).await["type"], "ack");
    }
    let mut bob = platform
        .connect_speaking_with_receive_buffer(0, "bob", 2, 4096)
        .await;
    bob.send(
        json!({"type": "resume", "id": "r", "conversations": {conversation.to_string(): created}}),
    )
    .await;
    // Alice's socket follows the conversation on the same gateway: once she has her own
    // events, the follower is past them, far ahead of what Bob's resume read.
    let busy = send_many(&mut alice, conversation, "busy", 500).await;
    let mut seen = 0;
    while seen < busy.len() {
        if alice.next().await["type"] == "event" {
            seen += 1;
        }
    }
    let mut received = Vec::new();
    let closed = loop {
        match bob.next_or_close().await {
            Ok(frame) if frame["type"] == "event" => {
                received.push(frame["event"]["seq"].as_u64().unwrap());
            }
            Ok(_) => {}
            Err(closed) => break closed,
        }
    };
    assert_eq!(
        closed,
        Closed {
            code: 1013,
            reason: "fell behind a conversation: resume".into()
        }
    );
    let log: Vec<u64> = platform
        .log()
        .await
        .iter()
        .filter(|e| e.envelope.conversation == conversation && e.seq > created)
        .map(|e| e.seq)
        .collect();
    // What reached Bob is where he stands: the frames still queued at the close are
    // dropped, and the resume may have read some of Alice's messages when it began.
    assert!(!received.is_empty());
    assert_eq!(received, log[..received.len()], "a prefix, in order");
    // Resuming again from there gets the rest, exactly.
    let mut bob = platform.open_v2(0, "bob").await;
    let mut at = *received.last().unwrap();
    loop {
        let (events, resumed) = resume(
            &mut bob,
            "again",
            json!({"conversations": {conversation.to_string(): at}}),
        )
        .await;
        received.extend(seqs(&events));
        match resumed["conversations"].as_array().unwrap().first() {
            Some(more) => at = more["seq"].as_u64().unwrap(),
            None => break,
        }
    }
    assert_eq!(received, log);
    assert!(log.ends_with(&busy));
}
