//! Presence in a real Redis: connections, expiry without a word from the gateway, last seen.

use parley_events::UserId;
use parley_events::presence::{ConnectionState, PresenceUpdate};
use parley_localstack::{RedisOptions, RedisServer};
use parley_projections::PresenceStore;

fn update(user: &str, connection: &str, state: ConnectionState, at: u64) -> PresenceUpdate {
    PresenceUpdate {
        user: UserId::parse(user).unwrap(),
        connection: connection.into(),
        state,
        at,
        ttl_secs: 60,
    }
}

#[tokio::test]
async fn several_devices_expiry_and_last_seen() {
    let redis = RedisServer::start(RedisOptions::default()).unwrap();
    let store = PresenceStore::connect(&redis.url()).await.unwrap();
    let alice = UserId::parse("alice").unwrap();
    let now = 1_800_000_000_000;

    store
        .record(&update("alice", "phone", ConnectionState::Open, now))
        .await
        .unwrap();
    store
        .record(&update("alice", "laptop", ConnectionState::Open, now))
        .await
        .unwrap();
    let status = store.status(&alice, now + 1000).await.unwrap();
    assert_eq!((status.connections, status.last_seen), (2, Some(now)));

    store
        .record(&update(
            "alice",
            "phone",
            ConnectionState::Closed,
            now + 5000,
        ))
        .await
        .unwrap();
    let status = store.status(&alice, now + 5000).await.unwrap();
    assert_eq!((status.online(), status.connections), (true, 1));

    // A late update from another gateway does not move last seen backwards.
    store
        .record(&update(
            "alice",
            "laptop",
            ConnectionState::Open,
            now + 1000,
        ))
        .await
        .unwrap();
    assert_eq!(
        store.status(&alice, now + 5000).await.unwrap().last_seen,
        Some(now + 5000)
    );

    // No heartbeat for longer than the TTL: offline, though nobody said so.
    let status = store.status(&alice, now + 61_000 + 1000).await.unwrap();
    assert!(!status.online());
    assert_eq!(status.last_seen, Some(now + 5000));

    let never = store
        .status(&UserId::parse("nobody").unwrap(), now)
        .await
        .unwrap();
    assert_eq!((never.online(), never.last_seen), (false, None));
}
