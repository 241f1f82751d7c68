//! `parley replay rebuild`: the log into a new target, with its own ordered consumer (the
//! live projector's durable one is left alone), through the projector's own apply path.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::consumer::{DeliverPolicy, pull};
use futures::StreamExt;
use tokio_util::sync::CancellationToken;
use tracing::info;

use super::{ActiveStore, ReplayError, Target};
use crate::admin::Readiness;
use crate::config::Config;
use crate::progress::Progress;
use crate::projector::{self, Projector, TopUp, topped_up};
use crate::topology::Topology;

/// How long a batch that is not full waits for the log's next event before it is applied:
/// the consumer fetches the next events only while it is read, so a batch of what happened
/// to be ready when the last one was applied held a quarter of `projector.batch` on
/// average, and a store applies fewer, larger batches faster.
const TOP_UP: TopUp = TopUp {
    gap: Duration::from_millis(20),
    within: None,
};

#[derive(Debug, Clone)]
pub struct RebuildOptions {
    pub target: Target,
    /// Continue a target that already holds data from its position.
    pub resume: bool,
    /// Start at this sequence, into a target holding the log up to the one before.
    pub from_seq: Option<u64>,
    /// Keep following the log after its end as of the start, until shut down.
    pub follow: bool,
    /// Stop after this sequence rather than the log's end (verify against the log).
    pub until: Option<u64>,
}

impl RebuildOptions {
    /// From the start of the log to its end, into a new target.
    pub fn new(target: Target) -> RebuildOptions {
        RebuildOptions {
            target,
            resume: false,
            from_seq: None,
            follow: false,
            until: None,
        }
    }
}

/// How a rebuild ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rebuilt {
    /// The last sequence applied (the target's position when it started, if none).
    pub position: u64,
    pub applied: u64,
}

/// Connect and rebuild: what `parley replay rebuild` does.
pub async fn run(
    config: &Config,
    options: &RebuildOptions,
    progress: impl FnOnce(Option<u64>) -> Progress,
    shutdown: &CancellationToken,
) -> Result<Rebuilt, ReplayError> {
    let (_nats, topology) = super::connect(config).await?;
    rebuild(config, &topology, options, progress, shutdown).await
}

/// Apply the log into `options.target` in batches of `projector.batch`, from the target's
/// position (or `from_seq`) to the log's end as of now (or `until`), or on with `follow`
/// until `shutdown`. `progress` is given the number of events expected.
pub async fn rebuild(
    config: &Config,
    topology: &Topology,
    options: &RebuildOptions,
    progress: impl FnOnce(Option<u64>) -> Progress,
    shutdown: &CancellationToken,
) -> Result<Rebuilt, ReplayError> {
    let target = &options.target;
    let store = target.open(config).await?;
    let position = store.position().await?;
    let start = match options.from_seq {
        Some(from) if position + 1 < from => {
            return Err(ReplayError::Gap {
                target: target.clone(),
                position,
                from,
            });
        }
        Some(from) => from.max(1),
        None if position > 0 && !options.resume => {
            return Err(ReplayError::Occupied {
                target: target.clone(),
                position,
            });
        }
        None => position + 1,
    };
    let end = match options.until {
        Some(until) => until,
        None => super::log_end(topology).await?,
    };
    let expected = (!options.follow).then(|| (end + 1).saturating_sub(start));
    info!(%target, start, end, follow = options.follow, "rebuilding");
    let progress = progress(expected);
    if !options.follow && start > end {
        progress.finish(0);
        return Ok(Rebuilt {
            position,
            applied: 0,
        });
    }
    // The projector's apply path, on a projector of its own writing to the target.
    let applier = Projector::switchable(
        Arc::new(target.configure(config)),
        topology.clone(),
        ActiveStore::new(target.clone(), store),
        Readiness::default(),
    );
    let consumer = topology
        .log
        .create_consumer(pull::OrderedConfig {
            deliver_policy: DeliverPolicy::ByStartSequence {
                start_sequence: start,
            },
            ..Default::default()
        })
        .await
        .map_err(|e| ReplayError::Nats(e.to_string()))?;
    let mut messages = consumer
        .messages()
        .await
        .map_err(|e| ReplayError::Nats(e.to_string()))?;
    let (mut reached, mut applied, mut seen) = (position, 0u64, 0u64);
    loop {
        let first = tokio::select! {
            () = shutdown.cancelled() => break,
            first = messages.next() => first,
        };
        let Some(first) = first else {
            return Err(ReplayError::Nats("the log's consumer ended".into()));
        };
        let batch = topped_up(first, &mut messages, config.projector.batch, TOP_UP).await;
        let mut events = Vec::with_capacity(batch.len());
        for message in batch {
            let message = message.map_err(|e| ReplayError::Nats(e.to_string()))?;
            let event = projector::decode(&message)?;
            seen = seen.max(event.seq);
            if options.follow || event.seq <= end {
                events.push(event);
            }
        }
        if !events.is_empty() {
            if !applier.apply(&events, 0, false, shutdown).await? {
                break;
            }
            applied += events.len() as u64;
            reached = reached.max(events.iter().map(|e| e.seq).max().unwrap_or(0));
            progress.advance(events.len() as u64);
        }
        // `seen`, not `reached`: the log may have lost its last events to its limits.
        if !options.follow && seen >= end {
            break;
        }
    }
    progress.finish(applied);
    info!(%target, position = reached, applied, "rebuild stopped");
    if !options.follow && seen < end {
        return Err(ReplayError::Interrupted);
    }
    Ok(Rebuilt {
        position: reached,
        applied,
    })
}
