//! Packed frames (`pack=1`, protocol version 2) on real servers: pushes ready together come
//! in one WebSocket message, in order and each once; an answer never shares a message; a
//! socket that did not ask gets one frame per message.

use crate::support;

use serde_json::json;
use support::Platform;

const BODY: usize = 60 * 1024;
/// 6 MB of events: more than the gateway's send buffer for a socket holds (4 MiB at most), so
/// a socket that stops reading has them wait in its queue.
const SENDS: usize = 100;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pushes_ready_together_come_packed_in_order_and_answers_alone() {
    let platform = Platform::start_with(1, |c| {
        c.limits.max_message_bytes = BODY;
        c.gateway.send_queue = 4 * SENDS;
        c.gateway.rate_limits.user_per_sec = 1000;
        c.gateway.rate_limits.user_burst = 1000;
    })
    .await;
    let mut alice = platform.connect_v2(0, "alice").await;
    let mut bob = platform
        .connect_asking_with_receive_buffer(0, "bob", "protocol=2&pack=1", 4096)
        .await;
    let mut carol = platform
        .connect_asking_with_receive_buffer(0, "carol", "protocol=2", 4096)
        .await;
    for socket in [&mut bob, &mut carol] {
        socket.send(json!({"type": "resume", "id": "r"})).await;
        assert_eq!(socket.reply_to("r").await["type"], "resumed");
    }
    alice
        .send(json!({"type": "create_group", "id": "g", "title": "t", "members": ["bob", "carol"]}))
        .await;
    let ack = alice.reply_to("g").await;
    assert_eq!(ack["type"], "ack", "{ack}");
    let conversation = ack["conversation"].as_str().unwrap().to_owned();
    let created = ack["seq"].as_u64().unwrap();

    // Bob and carol read nothing while alice sends: their events back up in their queues.
    for i in 0..SENDS {
        let id = format!("m{i}");
        alice
            .send(
                json!({"type": "send", "id": id, "conversation": conversation,
                         "body": "x".repeat(BODY)}),
            )
            .await;
        assert_eq!(alice.reply_to(&id).await["type"], "ack");
    }
    bob.send(json!({"type": "ping", "id": "p"})).await;

    for (name, socket) in [("bob", &mut bob), ("carol", &mut carol)] {
        let mut seqs = Vec::new();
        let mut answered = false;
        while seqs.len() < SENDS + 1 || (name == "bob" && !answered) {
            let frame = socket.next().await;
            match frame["type"].as_str() {
                Some("event") => seqs.push(frame["event"]["seq"].as_u64().unwrap()),
                Some("pong") => answered = true,
                _ => {}
            }
        }
        let expected: Vec<u64> = (created..=created + SENDS as u64).collect();
        assert_eq!(seqs, expected, "{name}: every event once, in order");
        if name == "bob" {
            assert!(
                !socket.packed.is_empty(),
                "bob asked for packing and got none"
            );
            let packed_frames: usize = socket.packed.iter().map(Vec::len).sum();
            assert!(packed_frames > socket.packed.len(), "{:?}", socket.packed);
            for types in &socket.packed {
                assert!(types.iter().all(|t| t == "\"event\""), "{types:?}");
            }
        } else {
            assert!(socket.packed.is_empty(), "carol did not ask for packing");
        }
    }
}
