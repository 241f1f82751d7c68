//! A restarted handler resumes from its write-model snapshot and replays only the log after
//! it, deciding exactly as if it had replayed everything.

mod support;

use parley_events::subjects::HANDLER_SNAPSHOT_BUCKET;
use serde_json::json;
use support::{Platform, eventually};
use tokio::io::AsyncReadExt;

fn tail_events_read() -> u64 {
    parley_services::telemetry::prometheus()
        .render()
        .lines()
        .find_map(|line| line.strip_prefix("parley_handler_tail_events_total "))
        .map_or(0, |value| value.trim().parse().unwrap())
}

async fn snapshot_position(platform: &Platform) -> Option<u64> {
    let client = async_nats::connect(platform.nats.url()).await.unwrap();
    let bucket = async_nats::jetstream::new(client)
        .get_object_store(HANDLER_SNAPSHOT_BUCKET)
        .await
        .ok()?;
    let mut object = bucket.get("write-model").await.ok()?;
    let mut bytes = Vec::new();
    object.read_to_end(&mut bytes).await.ok()?;
    let snapshot: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    snapshot["position"].as_u64()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_handler_resumes_from_its_snapshot() {
    let mut platform = Platform::start_with(1, |c| c.handler.snapshot_every_events = 5).await;
    let (mut alice, mut bob, conversation) = platform.alice_and_bob().await;
    for i in 0..12 {
        alice.send(json!({"type": "send", "id": format!("m{i}"), "conversation": conversation, "body": format!("{i}")})).await;
    }
    let mut first_ack = None;
    for i in 0..12 {
        let ack = alice.reply_to(&format!("m{i}")).await;
        first_ack.get_or_insert(ack);
    }
    let last_seq = platform.log().await.last().unwrap().seq;
    assert_eq!(last_seq, 13);
    let snapshot =
        eventually(|| async { snapshot_position(&platform).await.filter(|p| *p >= 10) }).await;

    platform.stop_handler().await;
    let read_before = tail_events_read();
    platform.start_handler().await;

    // A command from before the snapshot is still known...
    alice
        .send(json!({"type": "send", "id": "m0", "conversation": conversation, "body": "0"}))
        .await;
    assert_eq!(alice.reply_to("m0").await, first_ack.unwrap());
    // ...with what it asked for, so a different request under its id is refused.
    alice
        .send(json!({"type": "send", "id": "m0", "conversation": conversation, "body": "not 0"}))
        .await;
    let reused = alice.reply_to("m0").await;
    assert_eq!(
        (&reused["code"], &reused["retryable"]),
        (&json!("id_reused"), &json!(false)),
        "{reused}"
    );
    // ...and a new one chains after the log's real last event.
    alice
        .send(json!({"type": "send", "id": "new", "conversation": conversation, "body": "new"}))
        .await;
    assert_eq!(alice.reply_to("new").await["seq"], last_seq + 1);
    let delivered = loop {
        let frame = bob.next_of(&["event"]).await;
        if frame["event"]["data"]["body"] == "new" {
            break frame;
        }
    };
    assert_eq!(delivered["event"]["prev"], last_seq);

    let replayed = tail_events_read() - read_before;
    assert!(
        replayed <= last_seq + 1 - snapshot,
        "the restarted handler read {replayed} events; the snapshot was at {snapshot} of {last_seq}"
    );
}
