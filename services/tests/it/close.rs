//! Close frames reach the client: a slow consumer reads why it was dropped, and a client's
//! own close frame is answered with one, whatever the socket was doing (RFC 6455 5.5.1).
//! Answers to a client's own requests never make it a slow consumer.

use crate::support;

use std::time::Duration;

use parley_events::ConversationId;
use parley_services::config::Config;
use serde_json::json;
use support::{Client, Closed, Platform, eventually, eventually_within};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

/// The receive buffer of a client that stops reading.
const SMALL_RECEIVE_BUFFER: u32 = 4096;
/// A message body large enough to fill socket buffers in tens of sends: on loopback the
/// server's send buffer alone grows to about 4 MiB (`net.ipv4.tcp_wmem`).
const BODY_BYTES: usize = 60 * 1024;
/// More messages of [`BODY_BYTES`] than the socket buffers and tungstenite's hold.
const MORE_THAN_BUFFERED: usize = 150;

/// Limits that let a message carry [`BODY_BYTES`].
fn large_messages(config: &mut Config) {
    config.limits.max_message_bytes = BODY_BYTES;
}

/// Send one message as `client` and read until its ack, dropping the events in between
/// (the sender's own copies), so the sender never becomes a slow consumer itself.
async fn send_acked(client: &mut Client, id: &str, conversation: ConversationId) {
    client
        .send(json!({"type": "send", "id": id, "conversation": conversation, "body": "x".repeat(BODY_BYTES)}))
        .await;
    loop {
        let frame = client.next().await;
        if frame["id"] == id {
            assert_eq!(frame["type"], "ack", "{frame}");
            return;
        }
    }
}

/// Alice, and Carol on a socket with a small receive buffer, in a direct conversation.
async fn alice_and_slow_carol(platform: &Platform) -> (Client, Client, ConversationId) {
    let mut alice = platform.connect(0, "alice").await;
    let mut carol = platform
        .connect_with_receive_buffer(0, "carol", SMALL_RECEIVE_BUFFER)
        .await;
    let conversation = platform.direct(&mut alice, &mut carol, "carol").await;
    (alice, carol, conversation)
}

/// Carol's presence going offline is how a test sees the gateway drop her socket. A short
/// presence TTL has the gateway republish her open record every 2 s, in case the projector
/// was not listening yet when she connected.
fn watch_presence(config: &mut Config) {
    config.gateway.presence_ttl_secs = 6;
}

async fn carol_is_online(platform: &Platform) {
    eventually(|| async { platform.presence("carol").await.online().then_some(()) }).await;
}

async fn carol_is_offline(platform: &Platform) -> bool {
    !platform.presence("carol").await.online()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_pipelining_far_more_requests_than_the_send_queue_gets_every_answer() {
    let platform = Platform::start(1).await;
    let pipelined = 4 * platform.config.gateway.send_queue;
    let (mut alice, mut bob, conversation) = platform.alice_and_bob().await;
    alice
        .send_pipelined((0..pipelined).map(|i| json!({"type": "ping", "id": format!("p{i}")})))
        .await;
    for i in 0..pipelined {
        assert_eq!(
            alice.next().await,
            json!({"type": "pong", "id": format!("p{i}")})
        );
    }
    // Pages of history, each a store read, and sends, each waiting for its outcome.
    bob.send_pipelined((0..pipelined).map(|i| {
        if i % 8 == 0 {
            json!({"type": "send", "id": format!("s{i}"), "conversation": conversation, "body": "hi"})
        } else {
            json!({"type": "history", "id": format!("h{i}"), "conversation": conversation, "limit": 1})
        }
    }))
    .await;
    for i in 0..pipelined {
        let id = format!("{}{i}", if i % 8 == 0 { "s" } else { "h" });
        let reply = bob.reply_to(&id).await;
        assert!(
            ["ack", "history"].contains(&reply["type"].as_str().unwrap()),
            "{reply}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_consumer_reads_its_close_frame_after_everything_before_it() {
    let platform = Platform::start_with(1, |c| {
        large_messages(c);
        watch_presence(c);
        c.gateway.send_queue = 8;
    })
    .await;
    let (mut alice, mut carol, conversation) = alice_and_slow_carol(&platform).await;
    carol_is_online(&platform).await;

    // Carol reads nothing while Alice floods the conversation, until the gateway gives up
    // on Carol.
    let mut sent = 0;
    while !carol_is_offline(&platform).await {
        assert!(
            sent < 4 * MORE_THAN_BUFFERED,
            "carol was never closed as a slow consumer"
        );
        for _ in 0..10 {
            send_acked(&mut alice, &format!("m-{sent}"), conversation).await;
            sent += 1;
        }
    }

    // Carol now reads what reached her socket, in order, then the close frame.
    let mut last_seq = 0;
    let closed = loop {
        match carol.next_or_close().await {
            Ok(frame) => {
                let seq = frame["event"]["seq"].as_u64().expect("only events");
                assert!(seq > last_seq, "events in order");
                last_seq = seq;
            }
            Err(closed) => break closed,
        }
    };
    assert_eq!(
        closed,
        Closed {
            code: 1008,
            reason: "slow consumer: send queue full".into()
        }
    );
    assert!(last_seq > 0, "carol got some events before the close");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_blocked_too_long_closes_with_a_frame_the_client_reads() {
    // A queue long enough never to fill: the socket, not the queue, is what blocks.
    let platform = Platform::start_with(1, |c| {
        large_messages(c);
        watch_presence(c);
        c.gateway.send_queue = 100_000;
    })
    .await;
    let (mut alice, mut carol, conversation) = alice_and_slow_carol(&platform).await;
    carol_is_online(&platform).await;

    for n in 0..MORE_THAN_BUFFERED {
        send_acked(&mut alice, &format!("m-{n}"), conversation).await;
    }
    // One write blocks for 10 s before the gateway gives up.
    eventually_within(Duration::from_secs(30), || async {
        carol_is_offline(&platform).await.then_some(())
    })
    .await;

    assert_eq!(
        carol.closed().await,
        Closed {
            code: 1008,
            reason: "slow consumer: write timed out".into()
        }
    );
}

fn client_close() -> Message {
    Message::Close(Some(CloseFrame {
        code: CloseCode::Normal,
        reason: "bye".into(),
    }))
}

/// The reply to the client's close frame echoes its code and reason.
fn echoed() -> Closed {
    Closed {
        code: 1000,
        reason: "bye".into(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_clients_close_frame_is_answered() {
    let platform = Platform::start(1).await;
    let mut alice = platform.connect(0, "alice").await;
    alice.send_raw(client_close()).await;
    assert_eq!(alice.closed().await, echoed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_close_frame_is_answered_behind_frames_still_queued_for_the_client() {
    // A queue long enough never to fill: the events wait in it for Carol.
    let platform = Platform::start_with(1, |c| {
        large_messages(c);
        c.gateway.send_queue = 4096;
    })
    .await;
    let (mut alice, mut carol, conversation) = alice_and_slow_carol(&platform).await;
    for n in 0..MORE_THAN_BUFFERED {
        send_acked(&mut alice, &format!("m-{n}"), conversation).await;
    }
    carol.send_raw(client_close()).await;

    let mut events = 0;
    let closed = loop {
        match carol.next_or_close().await {
            Ok(frame) => {
                assert_eq!(frame["type"], "event");
                events += 1;
            }
            Err(closed) => break closed,
        }
    };
    assert_eq!(closed, echoed());
    assert!(
        events < MORE_THAN_BUFFERED,
        "the close came while events were still queued, and they were dropped"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_close_frame_is_answered_while_commands_are_in_flight() {
    let platform = Platform::start(1).await;
    let (mut alice, _bob, conversation) = platform.alice_and_bob().await;
    for n in 0..20 {
        alice
            .send(json!({"type": "send", "id": format!("m-{n}"), "conversation": conversation, "body": "hi"}))
            .await;
    }
    alice.send_raw(client_close()).await;
    assert_eq!(alice.closed().await, echoed());
}
