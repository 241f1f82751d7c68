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
