//! The JetStream topology: created once by whoever starts first, refused when incompatible.

use parley_localstack::{NatsOptions, NatsServer};
use parley_services::config::{Config, IntakeStorage, Secret};
use parley_services::topology::{self, TopologyError};

fn config_for(nats: &NatsServer) -> Config {
    let mut config = Config::default();
    config.nats.url = Some(Secret::new(nats.url()));
    config
}

async fn jetstream(nats: &NatsServer) -> async_nats::jetstream::Context {
    async_nats::jetstream::new(async_nats::connect(nats.url()).await.unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn roles_starting_together_all_get_the_same_topology() {
    let nats = NatsServer::start(NatsOptions::default()).unwrap();
    let config = config_for(&nats);
    let mut starts = Vec::new();
    for _ in 0..4 {
        let js = jetstream(&nats).await;
        let config = config.clone();
        starts.push(tokio::spawn(async move {
            topology::ensure(js, &config).await.map(|_| ())
        }));
    }
    for start in starts {
        start.await.unwrap().unwrap();
    }
    // And again, later, against the existing streams.
    topology::ensure(jetstream(&nats).await, &config)
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_incompatible_existing_stream_is_refused_not_changed() {
    let nats = NatsServer::start(NatsOptions::default()).unwrap();
    let config = config_for(&nats);
    topology::ensure(jetstream(&nats).await, &config)
        .await
        .unwrap();

    let mut other_shards = config.clone();
    other_shards.log.shards = 64;
    let message = refused(&nats, &other_shards, "metadata parley.shards").await;
    assert!(
        message.contains("refusing to start") && message.contains("1024") && message.contains("64"),
        "{message}"
    );

    let mut other_window = config.clone();
    other_window.intake.duplicate_window_secs = 30;
    refused(&nats, &other_window, "duplicate_window").await;

    // The intake's storage is checked too: a memory intake is neither kept nor replaced
    // when the configuration asks for a file-stored one.
    let mut other_storage = config.clone();
    other_storage.intake.storage = IntakeStorage::File;
    refused(&nats, &other_storage, "storage").await;

    // Nothing was changed: the original configuration still fits.
    topology::ensure(jetstream(&nats).await, &config)
        .await
        .unwrap();
}

/// Ensure the topology with `config`, expect it refused over `setting`, and return the
/// message the operator would see.
async fn refused(nats: &NatsServer, config: &Config, setting: &str) -> String {
    let err = topology::ensure(jetstream(nats).await, config)
        .await
        .err()
        .expect("refused");
    assert!(
        matches!(&err, TopologyError::Incompatible { setting: found, .. } if *found == setting),
        "{err}"
    );
    err.to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_created_before_group_commit_is_allowed_atomic_batches_at_start() {
    let nats = NatsServer::start(NatsOptions::default()).unwrap();
    let config = config_for(&nats);
    let js = jetstream(&nats).await;
    let old = async_nats::jetstream::stream::Config {
        allow_atomic_publish: false,
        ..topology::log_stream_config(&config)
    };
    js.create_stream(old).await.unwrap();
    let info = |js: async_nats::jetstream::Context| async move {
        js.get_stream(parley_events::subjects::LOG_STREAM)
            .await
            .unwrap()
            .info()
            .await
            .unwrap()
            .config
            .clone()
    };
    assert!(!info(js.clone()).await.allow_atomic_publish);

    topology::ensure(js.clone(), &config).await.unwrap();
    let upgraded = info(js.clone()).await;
    assert!(upgraded.allow_atomic_publish, "upgraded in place");
    assert!(
        upgraded.deny_delete && upgraded.allow_direct,
        "nothing else changed"
    );
    // And a later start finds nothing to change.
    topology::ensure(js.clone(), &config).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_intake_from_before_partitions_is_refused_with_its_subjects_named() {
    let nats = NatsServer::start(NatsOptions::default()).unwrap();
    let config = config_for(&nats);
    let old = async_nats::jetstream::stream::Config {
        subjects: vec!["parley.intake".into()],
        ..topology::intake_stream_config(&config)
    };
    jetstream(&nats).await.create_stream(old).await.unwrap();
    let message = refused(&nats, &config, "subjects").await;
    assert!(
        message.contains("[\"parley.intake\"]") && message.contains("parley.intake.*"),
        "{message}"
    );
}
