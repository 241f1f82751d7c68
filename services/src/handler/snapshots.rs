//! Write-model snapshots in a JetStream object store, so a starting handler replays only the
//! log after the latest snapshot instead of all of it.
//!
//! A snapshot is a cache: losing it, or finding it unreadable, costs a full replay and
//! nothing else. Any instance may write one; the newest write wins, and an older one
//! written late only means a longer replay.

use async_nats::jetstream::{self, object_store};
use parley_events::subjects::{HANDLER_SNAPSHOT_BUCKET, Shards};
use tokio::io::AsyncReadExt;
use tracing::{info, warn};

use super::WriteModel;

const OBJECT: &str = "write-model";

/// The latest snapshot, if there is a usable one no newer than `log_end` (a snapshot past
/// the log's end belongs to another log).
pub async fn load(
    js: &jetstream::Context,
    shards: Shards,
    remembered_commands: usize,
    log_end: u64,
) -> Option<WriteModel> {
    let bucket = js.get_object_store(HANDLER_SNAPSHOT_BUCKET).await.ok()?;
    let mut object = bucket.get(OBJECT).await.ok()?;
    let mut bytes = Vec::new();
    if let Err(e) = object.read_to_end(&mut bytes).await {
        warn!(error = %e, "cannot read the write-model snapshot; replaying the whole log");
        return None;
    }
    match WriteModel::restore(&bytes, shards, remembered_commands) {
        Ok(model) if model.position() <= log_end => {
            info!(
                position = model.position(),
                bytes = bytes.len(),
                "write model restored from its snapshot"
            );
            Some(model)
        }
        Ok(model) => {
            warn!(
                snapshot = model.position(),
                log_end, "the snapshot is ahead of the log; replaying the whole log"
            );
            None
        }
        Err(e) => {
            warn!(error = %e, "unusable write-model snapshot; replaying the whole log");
            None
        }
    }
}

/// Store `bytes` as the latest snapshot, creating the bucket on first use.
pub async fn save(js: &jetstream::Context, replicas: usize, bytes: Vec<u8>) -> Result<(), String> {
    let bucket = match js.get_object_store(HANDLER_SNAPSHOT_BUCKET).await {
        Ok(bucket) => bucket,
        Err(_) => js
            .create_object_store(object_store::Config {
                bucket: HANDLER_SNAPSHOT_BUCKET.into(),
                description: Some(
                    "Parley handlers' write-model snapshots (a cache of the log)".into(),
                ),
                num_replicas: replicas,
                ..Default::default()
            })
            .await
            .map_err(|e| e.to_string())?,
    };
    bucket
        .put(OBJECT, &mut bytes.as_slice())
        .await
        .map(|_| ())
        .map_err(|e| e.to_string())
}
