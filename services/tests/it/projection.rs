//! The conversation projection is disposable: deleted, it is rebuilt from the log and equals
//! what it was.

use crate::support;

use parley_events::{ConversationId, UserId};
use parley_projections::ConversationStore;
use serde_json::json;
use support::Platform;

async fn snapshot(
    store: &dyn ConversationStore,
    conversations: &[ConversationId],
    users: &[&str],
) -> String {
    let mut out = String::new();
    for id in conversations {
        out += &format!("{:?}\n", store.conversation(*id).await.unwrap());
        out += &format!("{:?}\n", store.members(*id).await.unwrap());
        out += &format!("{:?}\n", store.history(*id, None, 1000).await.unwrap());
    }
    for user in users {
        out += &format!(
            "{:?}\n",
            store
                .inbox(&UserId::parse(*user).unwrap(), None, 100)
                .await
                .unwrap()
        );
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_store_is_rebuilt_from_the_log_and_equals_the_live_one() {
    let mut platform = Platform::start(1).await;
    let (mut alice, _bob, direct) = platform.alice_and_bob().await;
    alice.send(json!({"type": "create_group", "id": "g", "title": "team", "members": ["bob", "carol"]})).await;
    let group: ConversationId = alice.reply_to("g").await["conversation"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    for i in 0..20 {
        let conversation = if i % 3 == 0 { group } else { direct };
        alice.send(json!({"type": "send", "id": format!("m{i}"), "conversation": conversation, "body": format!("message {i}")})).await;
    }
    for i in 0..20 {
        assert_eq!(alice.reply_to(&format!("m{i}")).await["type"], "ack");
    }
    platform.projected().await;
    let conversations = [direct, group];
    let users = ["alice", "bob", "carol"];
    let live = snapshot(&*platform.store().await, &conversations, &users).await;
    assert!(live.contains("message 19"));

    platform.stop_projector().await;
    let path = &platform.config.projector.store.path;
    for suffix in ["", "-wal", "-shm"] {
        let file = format!("{}{suffix}", path.display());
        let _ = std::fs::remove_file(file);
    }
    platform.start_projector().await;
    platform.projected().await;
    assert_eq!(
        snapshot(&*platform.store().await, &conversations, &users).await,
        live
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_a_projector_took_and_never_applied_still_reach_the_store() {
    use async_nats::jetstream::consumer::PullConsumer;
    use futures::StreamExt;
    use parley_events::subjects::{LOG_STREAM, PROJECTOR_CONSUMER};

    let mut platform = Platform::start(1).await;
    let (mut alice, _bob, conversation) = platform.alice_and_bob().await;
    platform.projected().await;
    platform.stop_projector().await;
    let bodies = ["taken 1", "taken 2", "after the taker died"];
    for (i, body) in bodies.iter().enumerate() {
        let id = format!("m{i}");
        support::acked(
            &mut alice,
            json!({"type": "send", "id": id, "conversation": conversation, "body": body}),
        )
        .await;
    }

    // A projector instance (or this one before a reconnect) that took the first two and
    // never applied them: delivered, unacknowledged, its connection gone.
    let dying = async_nats::connect(platform.nats.url()).await.unwrap();
    let consumer: PullConsumer = async_nats::jetstream::new(dying.clone())
        .get_consumer_from_stream(PROJECTOR_CONSUMER, LOG_STREAM)
        .await
        .unwrap();
    let mut taken = consumer.fetch().max_messages(2).messages().await.unwrap();
    for _ in 0..2 {
        taken.next().await.expect("a log event").unwrap();
    }
    dying.drain().await.unwrap();

    // The next projector acknowledges what comes after them, which with ack policy `all`
    // acknowledges them too: they are never delivered again.
    platform.start_projector().await;
    platform.projected().await;
    let history = platform
        .store()
        .await
        .history(conversation, None, 100)
        .await
        .unwrap();
    let mut messages = history.messages;
    messages.sort_by_key(|m| m.seq);
    let projected: Vec<&str> = messages.iter().map(|m| m.body.as_str()).collect();
    assert_eq!(projected, bodies, "the store holds every message, in order");
}
