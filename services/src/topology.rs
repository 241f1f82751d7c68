//! The JetStream topology: the intake stream and the event log, created idempotently by
//! whichever role starts first, and checked by every role that finds them already there.
//!
//! A stream whose existing configuration differs from what this deployment asks for is
//! never changed silently: the role refuses to start and says which setting differs. The
//! one exception is a permission that adds to what the stream accepts without changing
//! anything it holds: atomic batch publish, which a log created before group commit lacks,
//! is switched on.

use std::collections::HashMap;
use std::time::Duration;

use async_nats::jetstream::{self, kv, stream};
use parley_events::subjects::{
    HANDLERS_BUCKET, INTAKE_STREAM, INTAKE_SUBJECTS, LOG_SHARDS_METADATA, LOG_STREAM, LOG_SUBJECTS,
    PUSH_DLQ_STREAM, PUSH_DLQ_SUBJECT, REVOCATIONS_BUCKET, Shards,
};

use crate::config::{Config, IntakeStorage};

/// Largest message either stream accepts. A group creation listing 10,000 members is the
/// largest event today (about 400 KB).
pub const MAX_STREAM_MESSAGE_BYTES: i32 = 1024 * 1024;
/// The log dedupes appends by event id within this window, which covers the time a
/// redelivered command can race its first delivery.
pub const LOG_DUPLICATE_WINDOW: Duration = Duration::from_secs(120);

/// Pull requests on the log (the handlers' tails, the projector, the push worker): how long
/// one waits on the server, and how often the server says it is alive while there is
/// nothing to deliver; the handlers' intake pulls share the heartbeat, not the expiry
/// (`handler/intake_pull.rs`). A pull request lost to a server restart or a leader change
/// is noticed within two heartbeats, not when it would have expired.
pub const PULL_EXPIRES: Duration = Duration::from_secs(10);
pub const PULL_HEARTBEAT: Duration = Duration::from_secs(1);
/// Longest one attempt to set up a consumer again may take before it is abandoned and tried
/// anew. While a cluster elects a stream leader, requests go unanswered until the client's
/// request timeout (5 s); retrying sooner finds the new leader sooner.
pub const SETUP_ATTEMPT: Duration = Duration::from_secs(2);

/// `setup`, abandoned after [`SETUP_ATTEMPT`] with the error `unanswered` makes.
pub async fn attempt<T, E>(
    setup: impl Future<Output = Result<T, E>>,
    unanswered: impl FnOnce(String) -> E,
) -> Result<T, E> {
    tokio::time::timeout(SETUP_ATTEMPT, setup)
        .await
        .unwrap_or_else(|_| Err(unanswered(format!("no answer within {SETUP_ATTEMPT:?}"))))
}

/// How many times a role looks for a stream whose creation it lost to another role.
const FIND_ATTEMPTS: u32 = 3;

#[derive(Debug, thiserror::Error)]
pub enum TopologyError {
    #[error("cannot create or read stream {stream}: {cause}")]
    Unavailable { stream: &'static str, cause: String },
    #[error(
        "refusing to start: stream {stream} exists with {setting} = {found}, but this configuration needs {wanted}; \
         change the configuration to match, or migrate the stream deliberately"
    )]
    Incompatible {
        stream: &'static str,
        setting: &'static str,
        found: String,
        wanted: String,
    },
}

/// Handles to the two streams, checked against the configuration.
#[derive(Clone)]
pub struct Topology {
    pub js: jetstream::Context,
    pub log: stream::Stream,
    pub intake: stream::Stream,
    pub shards: Shards,
}

pub fn log_stream_config(config: &Config) -> stream::Config {
    stream::Config {
        name: LOG_STREAM.into(),
        description: Some("Parley event log: the source of truth".into()),
        subjects: vec![LOG_SUBJECTS.into()],
        retention: stream::RetentionPolicy::Limits,
        storage: stream::StorageType::File,
        num_replicas: config.log.replicas,
        duplicate_window: LOG_DUPLICATE_WINDOW,
        max_message_size: MAX_STREAM_MESSAGE_BYTES,
        allow_direct: true,
        // Handlers append what a lane has queued as one atomic batch (group commit).
        allow_atomic_publish: true,
        deny_delete: true,
        deny_purge: true,
        metadata: HashMap::from([(
            LOG_SHARDS_METADATA.to_owned(),
            config.log.shards.to_string(),
        )]),
        ..Default::default()
    }
}

pub fn intake_stream_config(config: &Config) -> stream::Config {
    stream::Config {
        name: INTAKE_STREAM.into(),
        description: Some("Parley commands from gateways to handlers".into()),
        subjects: vec![INTAKE_SUBJECTS.into()],
        retention: stream::RetentionPolicy::WorkQueue,
        storage: intake_storage(config),
        num_replicas: config.intake.replicas,
        duplicate_window: Duration::from_secs(config.intake.duplicate_window_secs),
        max_messages: config.intake.max_messages,
        max_bytes: config.intake.max_bytes,
        // A full intake refuses new commands instead of dropping queued ones.
        discard: stream::DiscardPolicy::New,
        max_message_size: MAX_STREAM_MESSAGE_BYTES,
        ..Default::default()
    }
}

/// The key-value bucket `wanted` names, created with `wanted` if no role or command has
/// yet (an existing bucket is taken as it is).
pub async fn key_value(
    js: &jetstream::Context,
    wanted: kv::Config,
) -> Result<kv::Store, jetstream::context::CreateKeyValueError> {
    match js.get_key_value(&wanted.bucket).await {
        Ok(store) => Ok(store),
        Err(_) => js.create_key_value(wanted).await,
    }
}

/// The revocations bucket: one record per key, each dropped once it is older than any
/// token it could cover.
pub fn revocations_bucket_config(config: &Config) -> kv::Config {
    kv::Config {
        bucket: REVOCATIONS_BUCKET.into(),
        description: "Parley token revocations, watched by every gateway".into(),
        history: 1,
        max_age: Duration::from_secs(config.auth.revocation_ttl_secs),
        storage: stream::StorageType::File,
        num_replicas: config.log.replicas,
        ..Default::default()
    }
}

fn intake_storage(config: &Config) -> stream::StorageType {
    match config.intake.storage {
        IntakeStorage::Memory => stream::StorageType::Memory,
        IntakeStorage::File => stream::StorageType::File,
    }
}

/// The handler instances' announcements: one key per live instance, which it puts again
/// every third of `lease`; a key not put for `lease` is gone. Kept like the intake (an
/// announcement lost with a memory store is put again within a third of a lease).
pub fn handlers_bucket_config(config: &Config, lease: Duration) -> kv::Config {
    kv::Config {
        bucket: HANDLERS_BUCKET.into(),
        description: "Parley handler instances, each owning some intake partitions".into(),
        history: 1,
        max_age: lease,
        storage: intake_storage(config),
        num_replicas: config.intake.replicas,
        ..Default::default()
    }
}

/// The push notifications the webhook kept refusing, until an operator redrives them or
/// they age out; bounded in age and bytes (oldest dropped first), and deletable one by one
/// (a redriven notification leaves it).
pub fn push_dead_letters_config(config: &Config) -> stream::Config {
    stream::Config {
        name: PUSH_DLQ_STREAM.into(),
        description: Some("Parley push notifications the webhook kept refusing".into()),
        subjects: vec![PUSH_DLQ_SUBJECT.into()],
        retention: stream::RetentionPolicy::Limits,
        storage: stream::StorageType::File,
        num_replicas: config.log.replicas,
        max_age: Duration::from_secs(config.push.dead_letter_max_age_secs),
        max_bytes: config.push.dead_letter_max_bytes,
        discard: stream::DiscardPolicy::Old,
        // Stated, since the server's default (2 minutes) would exceed the shortest max age
        // allowed and differ from what the check compares; dead letters are not deduped.
        duplicate_window: Duration::from_secs(60),
        max_message_size: MAX_STREAM_MESSAGE_BYTES,
        allow_direct: true,
        ..Default::default()
    }
}

/// Create the streams if missing (the push dead letters only when push is on), then check
/// that what exists matches `config`.
pub async fn ensure(js: jetstream::Context, config: &Config) -> Result<Topology, TopologyError> {
    let shards = Shards::new(config.log.shards).expect("validated by Config::validate");
    let log = ensure_stream(&js, LOG_STREAM, log_stream_config(config)).await?;
    let intake = ensure_intake(&js, config).await?;
    if config.push.webhook_url.is_some() {
        ensure_stream(&js, PUSH_DLQ_STREAM, push_dead_letters_config(config)).await?;
    }
    Ok(Topology {
        js,
        log,
        intake,
        shards,
    })
}

/// Create the intake if it is missing and check it. Also called by the handlers when their
/// consumer is gone: a memory intake does not outlive a restart of a single server (or of a
/// whole cluster), and only the stream's existence needs restoring, not its contents.
pub async fn ensure_intake(
    js: &jetstream::Context,
    config: &Config,
) -> Result<stream::Stream, TopologyError> {
    ensure_stream(js, INTAKE_STREAM, intake_stream_config(config)).await
}

async fn ensure_stream(
    js: &jetstream::Context,
    name: &'static str,
    wanted: stream::Config,
) -> Result<stream::Stream, TopologyError> {
    let unavailable = |cause: String| TopologyError::Unavailable {
        stream: name,
        cause,
    };
    // Roles starting together race to create the stream; the loser's create fails, and the
    // stream it then finds is checked like any existing one.
    let stream = match js.get_or_create_stream(wanted.clone()).await {
        Ok(stream) => stream,
        Err(create_error) => find_created(js, name)
            .await
            .ok_or_else(|| unavailable(create_error.to_string()))?,
    };
    // The info the create or the lookup answered with: asking again right after a create
    // on a cluster can find no stream leader yet, and be answered "stream not found".
    let found = stream.cached_info().config.clone();
    check_compatible(name, &found, &wanted)?;
    if wanted.allow_atomic_publish && !found.allow_atomic_publish {
        // Every role that finds the old stream may do this at once; the updates agree.
        js.update_stream(stream::Config {
            allow_atomic_publish: true,
            ..found
        })
        .await
        .map_err(|e| unavailable(format!("cannot allow atomic batches: {e}")))?;
        tracing::info!(
            stream = name,
            "atomic batch publish allowed on the existing stream"
        );
    }
    Ok(stream)
}

/// Looks for a stream another role is creating, [`FIND_ATTEMPTS`] times a second apart: on
/// a cluster, the losing create of a race may get no reply at all (it times out), and the
/// new stream may not answer at once.
async fn find_created(js: &jetstream::Context, name: &'static str) -> Option<stream::Stream> {
    for attempt in 1..=FIND_ATTEMPTS {
        match js.get_stream(name).await {
            Ok(stream) => return Some(stream),
            Err(e) => tracing::debug!(stream = name, attempt, error = %e, "stream not found yet"),
        }
        if attempt < FIND_ATTEMPTS {
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }
    None
}

/// The settings that change what the stream means; anything else (descriptions, limits an
/// operator raised by hand) is left to the operator.
fn check_compatible(
    stream: &'static str,
    found: &stream::Config,
    wanted: &stream::Config,
) -> Result<(), TopologyError> {
    let differ = |setting: &'static str, found: String, wanted: String| {
        Err(TopologyError::Incompatible {
            stream,
            setting,
            found,
            wanted,
        })
    };
    if found.subjects != wanted.subjects {
        return differ(
            "subjects",
            format!("{:?}", found.subjects),
            format!("{:?}", wanted.subjects),
        );
    }
    if found.retention != wanted.retention {
        return differ(
            "retention",
            format!("{:?}", found.retention),
            format!("{:?}", wanted.retention),
        );
    }
    if found.storage != wanted.storage {
        return differ(
            "storage",
            format!("{:?}", found.storage),
            format!("{:?}", wanted.storage),
        );
    }
    if found.num_replicas != wanted.num_replicas {
        return differ(
            "replicas",
            found.num_replicas.to_string(),
            wanted.num_replicas.to_string(),
        );
    }
    if found.allow_direct != wanted.allow_direct {
        return differ(
            "allow_direct",
            found.allow_direct.to_string(),
            wanted.allow_direct.to_string(),
        );
    }
    if found.duplicate_window != wanted.duplicate_window {
        return differ(
            "duplicate_window",
            format!("{:?}", found.duplicate_window),
            format!("{:?}", wanted.duplicate_window),
        );
    }
    let shards = |config: &stream::Config| config.metadata.get(LOG_SHARDS_METADATA).cloned();
    if shards(found) != shards(wanted) {
        return differ(
            "metadata parley.shards",
            shards(found).unwrap_or_else(|| "unset".into()),
            shards(wanted).unwrap_or_else(|| "unset".into()),
        );
    }
    Ok(())
}
