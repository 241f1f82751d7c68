//! TLS on the hops to NATS and Redis: a whole platform whose nats-server and redis-server
//! accept only TLS with a client certificate, from a throwaway CA
//! (`parley_localstack::pki`); and TLS files that cannot work stopping a node at start.

use crate::support;

use parley_localstack::pki::TestPki;
use parley_localstack::{NatsOptions, RedisOptions};
use parley_services::config::{Config, Secret, TlsConfig};
use serde_json::json;
use support::{Platform, eventually, run_refused_projector};

fn mutual(pki: &TestPki) -> TlsConfig {
    TlsConfig {
        enabled: true,
        ca_file: Some(pki.trusted.ca.clone()),
        cert_file: Some(pki.trusted.client_cert.clone()),
        key_file: Some(pki.trusted.client_key.clone()),
        server_name: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chat_runs_over_mutual_tls_to_nats_and_redis() {
    let pki = TestPki::new().unwrap();
    let platform = Platform::start_on(
        NatsOptions {
            tls: Some(pki.server_tls(true)),
            ..NatsOptions::default()
        },
        RedisOptions {
            tls: Some(pki.server_tls(true)),
            ..RedisOptions::default()
        },
        1,
        |config| {
            config.nats.tls = mutual(&pki);
            config.redis.tls = mutual(&pki);
            // Heartbeats every second: presence sent before the projector subscribed (it
            // is at most once) comes again within the wait below.
            config.gateway.presence_ttl_secs = 3;
        },
    )
    .await;
    assert!(platform.redis.url().starts_with("rediss://"));

    let (mut alice, mut bob, conversation) = platform.alice_and_bob().await;
    alice
        .send(json!({"type": "send", "id": "m1", "conversation": conversation, "body": "over TLS"}))
        .await;
    let ack = alice.reply_to("m1").await;
    assert_eq!(ack["type"], "ack", "{ack}");
    let delivered = bob.next_of(&["event"]).await;
    assert_eq!(
        delivered["event"]["data"]["body"], "over TLS",
        "{delivered}"
    );

    platform.projected().await;
    assert_eq!(
        platform
            .posted()
            .await
            .into_iter()
            .map(|(_, body)| body)
            .collect::<Vec<_>>(),
        ["over TLS"]
    );
    // Presence went gateway -> NATS -> projector -> Redis, both hops over TLS.
    eventually(|| async { platform.presence("bob").await.online().then_some(()) }).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nats_refuses_clients_whose_settings_do_not_match() {
    let pki = TestPki::new().unwrap();
    let nats = parley_localstack::NatsServer::start(NatsOptions {
        tls: Some(pki.server_tls(true)),
        ..NatsOptions::default()
    })
    .unwrap();
    // One attempt each, without the node's retries, so a refusal comes back at once.
    let connect = |tls: TlsConfig| {
        let url = nats.url();
        async move {
            let options = async_nats::ConnectOptions::new();
            let options = match tls.client() {
                Some(client) => options
                    .require_tls(true)
                    .tls_client_config(client.client_config().unwrap()),
                None => options,
            };
            options.connect(url).await
        }
    };
    parley_projections::tls::install_process_provider();
    connect(mutual(&pki))
        .await
        .expect("the right settings connect");
    for (what, tls) in [
        // The server announces TLS, so the client tries it anyway, with the system's
        // roots, which do not hold the test CA.
        ("TLS off", TlsConfig::default()),
        (
            "no client certificate",
            TlsConfig {
                cert_file: None,
                key_file: None,
                ..mutual(&pki)
            },
        ),
        (
            "the wrong CA",
            TlsConfig {
                ca_file: Some(pki.foreign.ca.clone()),
                ..mutual(&pki)
            },
        ),
    ] {
        assert!(connect(tls).await.is_err(), "{what}: connected");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unusable_tls_files_stop_the_node_at_start() {
    let pki = TestPki::new().unwrap();
    let missing = pki.path("no-such-ca.pem");
    let broken = TlsConfig {
        ca_file: Some(missing.clone()),
        ..mutual(&pki)
    };
    let run = |nats: TlsConfig, redis: TlsConfig| {
        let mut config = Config::default();
        // Nothing listens here: only an error found before connecting ends the run quickly.
        config.nats.url = Some(Secret::new("nats://127.0.0.1:1"));
        config.redis.url = Some(Secret::new("rediss://127.0.0.1:1"));
        config.nats.tls = nats;
        config.redis.tls = redis;
        config
            .validate()
            .expect("the settings are well-formed; the files are not");
        run_refused_projector(config)
    };
    for (section, nats, redis) in [
        ("nats.tls", broken.clone(), TlsConfig::default()),
        ("redis", TlsConfig::default(), broken.clone()),
    ] {
        let error = run(nats, redis).await.unwrap_err().to_string();
        assert!(
            error.contains(section) && error.contains(&missing.display().to_string()),
            "{error}"
        );
    }
}
