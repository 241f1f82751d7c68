//! The active projection target and moving to another (`parley replay switch`).
//!
//! The target in use is the `target` key of the [`BUCKET`] KV bucket; with no key, the
//! configured store is (so nothing changes for a deployment that never switches). Every
//! node follows the key ([`Follower`]): its projector moves at once and projects into the
//! new target from the target's position at the switch; its gateway moves once the new
//! target has caught up with the log as it stood when the node saw the switch, so a reader
//! never sees an older view than before. Each node records what its roles use under
//! `instance.<node>.<role>`, refreshed every [`HEARTBEAT`], which `switch` reads to say
//! what moved.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, kv};
use futures::StreamExt;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::{ActiveStore, ReplayError, Target};
use crate::backoff::Backoff;
use crate::config::Config;
use crate::topology::Topology;
use crate::unix_millis;

pub const BUCKET: &str = "PARLEY_PROJECTION";
const TARGET_KEY: &str = "target";
const INSTANCE_PREFIX: &str = "instance.";
/// How often a node records what its roles use.
const HEARTBEAT: Duration = Duration::from_secs(10);
/// A node that has not recorded for this long is taken for gone.
const ALIVE: Duration = Duration::from_secs(30);
/// How often a gateway waiting for a new target to catch up asks for its position.
const CATCH_UP_POLL: Duration = Duration::from_millis(100);

/// The value of the `target` key.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Switch {
    pub target: String,
    /// The target's position when the switch was made: projectors project again from the
    /// event after it, so nothing another projector acknowledged into the old target while
    /// they were moving one by one is missing from the new one.
    pub from: u64,
}

/// What a node's role uses, under `instance.<node>.<role>`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Using {
    pub target: String,
    /// Milliseconds since the Unix epoch of the record.
    pub at: u64,
}

/// The projection bucket, created if no node or command has yet.
pub async fn bucket(js: &jetstream::Context, config: &Config) -> Result<kv::Store, ReplayError> {
    let wanted = kv::Config {
        bucket: BUCKET.into(),
        description: "Parley's active projection target (parley replay switch)".into(),
        history: 1,
        storage: jetstream::stream::StorageType::File,
        num_replicas: config.log.replicas,
        ..Default::default()
    };
    crate::topology::key_value(js, wanted)
        .await
        .map_err(|e| ReplayError::Nats(format!("bucket {BUCKET}: {e}")))
}

/// The switch in force, if any.
pub async fn active(bucket: &kv::Store) -> Result<Option<Switch>, ReplayError> {
    let value = bucket
        .get(TARGET_KEY)
        .await
        .map_err(|e| ReplayError::Nats(format!("bucket {BUCKET}: {e}")))?;
    value.map(|bytes| parse_switch(&bytes)).transpose()
}

fn parse_switch(bytes: &[u8]) -> Result<Switch, ReplayError> {
    let switch: Switch = serde_json::from_slice(bytes)
        .map_err(|e| ReplayError::BadTarget(format!("in {BUCKET}/{TARGET_KEY}: {e}")))?;
    switch.target.parse::<Target>()?;
    Ok(switch)
}

/// The target a node starts on: the switched one, or the configured store.
pub async fn start_target(bucket: &kv::Store, config: &Config) -> Result<Target, ReplayError> {
    match active(bucket).await? {
        Some(switch) => switch.target.parse(),
        None => Ok(Target::configured(config)),
    }
}

#[derive(Debug, Clone)]
pub struct SwitchOptions {
    pub target: Target,
    /// Most events the target may be behind the log.
    pub max_lag: u64,
    /// Longest wait for the nodes to report that they moved.
    pub wait: Duration,
}

/// What `switch` did.
#[derive(Debug, Clone, Serialize)]
pub struct Switched {
    pub target: String,
    pub position: u64,
    pub log_end: u64,
    /// `instance.<node>.<role>` of the live roles now using the target.
    pub moved: Vec<String>,
    /// Live roles still on another target when the wait ended, with theirs.
    pub not_moved: Vec<(String, String)>,
}

/// Make `options.target` the active target, and wait (bounded) until every live node's
/// roles use it.
pub async fn switch(config: &Config, options: &SwitchOptions) -> Result<Switched, ReplayError> {
    let (nats, topology) = super::connect(config).await?;
    let bucket = bucket(&topology.js, config).await?;
    let store = options.target.open(config).await?;
    let position = store.position().await?;
    let end = super::log_end(&topology).await?;
    let lag = end.saturating_sub(position);
    if lag > options.max_lag {
        return Err(ReplayError::Behind {
            target: options.target.clone(),
            position,
            end,
            lag,
            max_lag: options.max_lag,
        });
    }
    let target = options.target.to_string();
    let value = serde_json::to_vec(&Switch {
        target: target.clone(),
        from: position,
    })
    .expect("a switch serializes");
    let switched_at = unix_millis();
    bucket
        .put(TARGET_KEY, value.into())
        .await
        .map_err(|e| ReplayError::Nats(format!("bucket {BUCKET}: {e}")))?;
    info!(%target, position, log_end = end, "switched; waiting for the nodes to move");
    let deadline = tokio::time::Instant::now() + options.wait;
    loop {
        let (moved, not_moved) = roles(&bucket, switched_at, &target).await?;
        if not_moved.is_empty() || tokio::time::Instant::now() >= deadline {
            let _ = nats.client.flush().await;
            return Ok(Switched {
                target,
                position,
                log_end: end,
                moved,
                not_moved,
            });
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Live roles on `target` and those on another, as recorded in the bucket.
async fn roles(
    bucket: &kv::Store,
    now: u64,
    target: &str,
) -> Result<(Vec<String>, Vec<(String, String)>), ReplayError> {
    let nats = |e: &dyn std::fmt::Display| ReplayError::Nats(format!("bucket {BUCKET}: {e}"));
    let mut keys = bucket.keys().await.map_err(|e| nats(&e))?;
    let (mut moved, mut not_moved) = (Vec::new(), Vec::new());
    while let Some(key) = keys.next().await {
        let key = key.map_err(|e| nats(&e))?;
        let Some(instance) = key.strip_prefix(INSTANCE_PREFIX) else {
            continue;
        };
        let Some(bytes) = bucket.get(&key).await.map_err(|e| nats(&e))? else {
            continue;
        };
        let Ok(using) = serde_json::from_slice::<Using>(&bytes) else {
            continue;
        };
        if using.at + (ALIVE.as_millis() as u64) < now {
            continue;
        }
        if using.target == target {
            moved.push(instance.to_owned());
        } else {
            not_moved.push((instance.to_owned(), using.target));
        }
    }
    moved.sort();
    not_moved.sort();
    Ok((moved, not_moved))
}

/// A node's follower of the `target` key: moves its roles' store handles and records
/// what they use.
pub struct Follower {
    pub config: Arc<Config>,
    pub topology: Topology,
    pub bucket: kv::Store,
    /// Names this node's records.
    pub node: String,
    pub gateway: Option<Arc<ActiveStore>>,
    pub projector: Option<Arc<ActiveStore>>,
}

impl Follower {
    /// Follow switches until `shutdown`. A watch that ends (NATS restarted, the bucket's
    /// leader moved) is opened again; it starts with the record in force, which a node
    /// already on that target ignores.
    pub async fn run(self, shutdown: CancellationToken) {
        let mut heartbeat = tokio::time::interval(HEARTBEAT);
        loop {
            let mut watch = loop {
                match self.bucket.watch_with_history(TARGET_KEY).await {
                    Ok(watch) => break watch,
                    Err(e) => {
                        warn!(error = %e, "cannot watch the projection target; retrying");
                        tokio::select! {
                            () = shutdown.cancelled() => return,
                            () = tokio::time::sleep(Duration::from_secs(1)) => {}
                        }
                    }
                }
            };
            loop {
                let entry = tokio::select! {
                    () = shutdown.cancelled() => return,
                    _ = heartbeat.tick() => {
                        self.record().await;
                        continue;
                    }
                    entry = watch.next() => match entry {
                        Some(Ok(entry)) => entry,
                        Some(Err(e)) => {
                            warn!(error = %e, "the projection target's watch failed");
                            continue;
                        }
                        None => break,
                    },
                };
                let switch = match entry.operation {
                    kv::Operation::Put => match parse_switch(&entry.value) {
                        Ok(switch) => switch,
                        Err(e) => {
                            warn!(error = %e, "ignoring an unreadable projection target");
                            continue;
                        }
                    },
                    // Back to the configured store, from wherever it stands.
                    kv::Operation::Delete | kv::Operation::Purge => Switch {
                        target: Target::configured(&self.config).to_string(),
                        from: u64::MAX,
                    },
                };
                let target: Target = switch.target.parse().expect("checked by parse_switch");
                let current = [&self.gateway, &self.projector]
                    .into_iter()
                    .flatten()
                    .all(|handle| handle.target() == target);
                if current {
                    continue;
                }
                if !self.move_to(target, switch.from, &shutdown).await {
                    return;
                }
            }
            warn!("the projection target's watch ended; watching again");
        }
    }

    /// Move the roles to `target`: the projector at once, the gateway once the target has
    /// caught up. `false` on shutdown.
    async fn move_to(&self, target: Target, from: u64, shutdown: &CancellationToken) -> bool {
        info!(%target, "the projection target changed; moving");
        let mut backoff = Backoff::new(Duration::from_secs(5));
        let store = loop {
            match target.open(&self.config).await {
                Ok(store) => break store,
                Err(e) => warn!(error = %e, %target, "cannot open the new projection target yet"),
            }
            if !backoff.wait(shutdown).await {
                return false;
            }
        };
        let from = if from == u64::MAX {
            store.position().await.unwrap_or(0)
        } else {
            from
        };
        if let Some(projector) = &self.projector {
            projector.swap(target.clone(), Arc::clone(&store), from);
            info!(%target, from, "the projector moved");
            self.record().await;
        }
        if let Some(gateway) = &self.gateway {
            let end = match super::log_end(&self.topology).await {
                Ok(end) => end,
                Err(e) => {
                    warn!(error = %e, "cannot read the log's end; the gateway waits for the position at the switch only");
                    from
                }
            };
            loop {
                match store.position().await {
                    Ok(position) if position >= end => break,
                    Ok(_) => {}
                    Err(e) => warn!(error = %e, %target, "cannot read the new target's position"),
                }
                tokio::select! {
                    () = shutdown.cancelled() => return false,
                    () = tokio::time::sleep(CATCH_UP_POLL) => {}
                }
            }
            gateway.swap(target.clone(), store, from);
            info!(%target, caught_up_to = end, "the gateway moved");
            self.record().await;
        }
        true
    }

    /// Record what each role uses now.
    async fn record(&self) {
        let roles = [("gateway", &self.gateway), ("projector", &self.projector)];
        for (role, handle) in roles {
            let Some(handle) = handle else { continue };
            let using = Using {
                target: handle.target().to_string(),
                at: unix_millis(),
            };
            let key = format!("{INSTANCE_PREFIX}{}.{role}", self.node);
            let value = serde_json::to_vec(&using).expect("serializes");
            if let Err(e) = self.bucket.put(key, value.into()).await {
                warn!(error = %e, "cannot record the projection target in use");
            }
        }
    }
}
