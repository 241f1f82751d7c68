//! Presence in a real Redis: connections, expiry without a word from the gateway, last seen;
//! and the same over TLS, with a throwaway CA (`parley_localstack::pki`).

use parley_events::UserId;
use parley_events::presence::{ConnectionState, PresenceUpdate};
use parley_localstack::pki::{Authority, TestPki};
use parley_localstack::{RedisOptions, RedisServer};
use parley_projections::{ClientCert, PresenceError, PresenceStore, TlsClient};

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
    let store = PresenceStore::connect(&PresenceStore::client(&redis.url(), None).unwrap())
        .await
        .unwrap();
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

#[tokio::test]
async fn recording_tells_when_a_user_comes_online_or_goes_offline() {
    let redis = RedisServer::start(RedisOptions::default()).unwrap();
    let store = PresenceStore::connect(&PresenceStore::client(&redis.url(), None).unwrap())
        .await
        .unwrap();
    let now = 1_800_000_000_000;
    let record = |connection: &'static str, state, at| {
        let store = store.clone();
        async move {
            store
                .record(&update("bob", connection, state, at))
                .await
                .unwrap()
        }
    };
    let first = record("phone", ConnectionState::Open, now).await;
    assert!(first.changed() && first.now.online());
    // A second device, heartbeats, and closing one of two devices change nothing.
    assert!(
        !record("laptop", ConnectionState::Open, now + 1)
            .await
            .changed()
    );
    assert!(
        !record("phone", ConnectionState::Open, now + 2)
            .await
            .changed()
    );
    assert!(
        !record("phone", ConnectionState::Closed, now + 3)
            .await
            .changed()
    );
    let last = record("laptop", ConnectionState::Closed, now + 4).await;
    assert!(last.changed() && !last.now.online());
    assert_eq!(last.now.last_seen, Some(now + 4));
    // A late close of a connection already gone is no change either.
    assert!(
        !record("phone", ConnectionState::Closed, now + 5)
            .await
            .changed()
    );

    let statuses = store
        .statuses(
            &[
                UserId::parse("bob").unwrap(),
                UserId::parse("nobody").unwrap(),
            ],
            now + 6,
        )
        .await
        .unwrap();
    assert_eq!(
        statuses
            .iter()
            .map(|s| (s.online(), s.last_seen))
            .collect::<Vec<_>>(),
        vec![(false, Some(now + 5)), (false, None)]
    );
    assert!(store.statuses(&[], now).await.unwrap().is_empty());
}

#[tokio::test]
async fn the_sweep_finds_users_whose_records_expired_without_a_close() {
    let redis = RedisServer::start(RedisOptions::default()).unwrap();
    let store = PresenceStore::connect(&PresenceStore::client(&redis.url(), None).unwrap())
        .await
        .unwrap();
    let now = 1_800_000_000_000;
    for (user, connection) in [("crashed", "c1"), ("closed", "c2"), ("alive", "c3")] {
        store
            .record(&update(user, connection, ConnectionState::Open, now))
            .await
            .unwrap();
    }
    store
        .record(&update("closed", "c2", ConnectionState::Closed, now + 1000))
        .await
        .unwrap();
    store
        .record(&update("alive", "c3", ConnectionState::Open, now + 30_000))
        .await
        .unwrap();
    assert!(store.expired(now + 59_000, 100).await.unwrap().is_empty());
    // 60 s records: `crashed` expired, `alive` heartbeat at +30 s holds until +90 s, and
    // `closed` said goodbye, so it is not swept.
    let expired = store.expired(now + 61_000, 100).await.unwrap();
    assert_eq!(expired.len(), 1, "{expired:?}");
    assert_eq!(expired[0].0, UserId::parse("crashed").unwrap());
    assert_eq!(
        (expired[0].1.online(), expired[0].1.last_seen),
        (false, Some(now))
    );
    // Handed out once.
    assert!(store.expired(now + 62_000, 100).await.unwrap().is_empty());
    let later = store.expired(now + 91_000, 100).await.unwrap();
    assert_eq!(later.len(), 1);
    assert_eq!(later[0].0, UserId::parse("alive").unwrap());
}

/// TLS trusting `ca`'s CA, presenting `client`'s certificate.
fn tls(ca: &Authority, client: Option<&Authority>) -> TlsClient {
    TlsClient {
        ca_file: Some(ca.ca.clone()),
        client_cert: client.map(|a| ClientCert {
            cert_file: a.client_cert.clone(),
            key_file: a.client_key.clone(),
        }),
        server_name: None,
    }
}

async fn connect(url: &str, tls: &TlsClient) -> Result<PresenceStore, PresenceError> {
    PresenceStore::connect(&PresenceStore::client(url, Some(tls))?).await
}

/// A redis-server that speaks only TLS and requires a client certificate.
fn tls_redis(pki: &TestPki) -> RedisServer {
    let redis = RedisServer::start(RedisOptions {
        tls: Some(pki.server_tls(true)),
        ..RedisOptions::default()
    })
    .unwrap();
    assert!(redis.url().starts_with("rediss://"), "{}", redis.url());
    redis
}

#[tokio::test]
async fn presence_runs_over_mutual_tls() {
    let pki = TestPki::new().unwrap();
    let redis = tls_redis(&pki);
    let now = 1_800_000_000_000;
    let store = connect(&redis.url(), &tls(&pki.trusted, Some(&pki.trusted)))
        .await
        .unwrap();
    store
        .record(&update("alice", "phone", ConnectionState::Open, now))
        .await
        .unwrap();
    let status = store
        .status(&UserId::parse("alice").unwrap(), now)
        .await
        .unwrap();
    assert_eq!((status.connections, status.last_seen), (1, Some(now)));
}

/// Each refusal takes the redis client's own connection retries (about 6 s), so each case
/// is a test of its own and they run side by side.
async fn assert_refused(settings: impl FnOnce(&TestPki) -> TlsClient) {
    let pki = TestPki::new().unwrap();
    let redis = tls_redis(&pki);
    match connect(&redis.url(), &settings(&pki)).await {
        Err(PresenceError::Redis(_)) => {}
        Err(e) => panic!("expected a refused connection, got {e}"),
        Ok(_) => panic!("expected a refused connection, but it connected"),
    }
}

#[tokio::test]
async fn a_redis_server_the_ca_did_not_sign_is_refused() {
    assert_refused(|pki| tls(&pki.foreign, Some(&pki.trusted))).await;
}

#[tokio::test]
async fn redis_refuses_a_client_without_a_certificate() {
    assert_refused(|pki| tls(&pki.trusted, None)).await;
}

#[tokio::test]
async fn redis_refuses_a_client_certificate_from_a_foreign_ca() {
    assert_refused(|pki| tls(&pki.trusted, Some(&pki.foreign))).await;
}

#[tokio::test]
async fn redis_tls_settings_that_cannot_work_are_refused_before_connecting() {
    let pki = TestPki::new().unwrap();
    let mutual = tls(&pki.trusted, Some(&pki.trusted));
    let refused = |url: &str, settings: &TlsClient| match PresenceStore::client(url, Some(settings))
    {
        Err(PresenceError::Tls(e)) => e.to_string(),
        other => panic!("expected a TLS settings error, got {other:?}"),
    };
    // Nothing listens on port 1: these fail before any connection is tried.
    let error = refused("redis://127.0.0.1:1", &mutual);
    assert!(error.contains("rediss://"), "{error}");

    let missing = pki.path("no-such-ca.pem");
    let error = refused(
        "rediss://127.0.0.1:1",
        &TlsClient {
            ca_file: Some(missing.clone()),
            ..mutual.clone()
        },
    );
    assert!(error.contains(&missing.display().to_string()), "{error}");

    let error = refused(
        "rediss://127.0.0.1:1",
        &TlsClient {
            server_name: Some("redis.internal".into()),
            ..mutual.clone()
        },
    );
    assert!(error.contains("server name"), "{error}");
}
