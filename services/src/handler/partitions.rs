//! Which handler instance takes which commands.
//!
//! The intake is split into [`INTAKE_PARTITIONS`] partitions, each a contiguous range of log
//! shards with a durable consumer of its own. Every instance announces itself in the
//! handlers bucket and watches the others' announcements; from the same set of instances,
//! each works out the same owner for every partition (rendezvous hashing), so instances own
//! disjoint shards and their appends do not fail each other's expected-sequence checks.
//!
//! Ownership is a preference, never a condition of correctness: every instance pulls every
//! partition, its own at priority 0 and the others at priority 1, and the server hands a
//! command to the lowest priority pulling. So a partition whose owner stopped or crashed
//! (its pull requests gone with its connection) is taken by a standby at once, before any
//! announcement expires; and while two instances disagree about the set (one just came or
//! went), a shard they both take is still appended to safely, with conflicts retried as
//! before.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream::consumer::{AckPolicy, DeliverPolicy, PriorityPolicy, pull};
use async_nats::jetstream::kv;
use futures::StreamExt;
use parley_events::subjects::{
    HANDLER_PRIORITY_GROUP, INTAKE_PARTITIONS, INTAKE_STREAM, fnv1a, handler_consumer,
    intake_subject,
};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::intake_pull::IntakePull;
use super::{HandlerError, Inner, Lane, MAX_SETUP_BACKOFF, READY_CHECK};
use crate::admin::{Readiness, Reason};
use crate::backoff::Backoff;
use crate::config::Config;
use crate::telemetry;
use crate::topology;

/// How long an instance's announcement counts after it was last put. An instance that
/// stops without withdrawing it (a crash) keeps its partitions' preference this long, but
/// not their commands: its standbys take those as soon as its pull requests are gone.
pub(super) const LEASE: Duration = Duration::from_secs(6);
/// Priorities of an instance's pull requests: first on its own partitions, next on the
/// others'.
const OWNER: usize = 0;
const STANDBY: usize = 1;

/// The intake partitions an instance owns.
pub(super) type Owned = BTreeSet<u32>;
/// What an instance knows of its partitions: `None` until it has seen the others'
/// announcements (it pulls everything as a standby meanwhile).
pub(super) type Ownership = Option<Owned>;

/// The partitions `instance` owns among `live` (which need not list it): for each
/// partition, the instance with the highest score. Every instance that sees the same set
/// agrees, and a set that gains or loses one instance moves only that instance's share.
pub(super) fn owned_by<'a>(instance: &str, live: impl IntoIterator<Item = &'a str>) -> Owned {
    let live: Vec<&str> = live.into_iter().filter(|id| *id != instance).collect();
    (0..INTAKE_PARTITIONS)
        .filter(|partition| {
            let mine = score(instance, *partition);
            live.iter()
                .all(|other| (score(other, *partition), *other) < (mine, instance))
        })
        .collect()
}

/// FNV-1a of the instance and the partition, then a finalizer so that ids that differ in
/// one character still score unrelated.
fn score(instance: &str, partition: u32) -> u64 {
    let mut hash = fnv1a(instance.bytes().chain(partition.to_le_bytes()));
    hash ^= hash >> 33;
    hash = hash.wrapping_mul(0xff51_afd7_ed55_8ccd);
    hash ^= hash >> 33;
    hash = hash.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    hash ^ (hash >> 33)
}

/// Commands a partition's consumer hands out before it waits for acknowledgements: the
/// intake's `max_ack_pending` shared out, so all partitions together stay within it.
pub(super) fn max_ack_pending_per_partition(config: &Config) -> i64 {
    let partitions = i64::from(INTAKE_PARTITIONS);
    (config.intake.max_ack_pending + partitions - 1) / partitions
}

/// Announce this instance until `shutdown`, follow the others' announcements, and keep
/// `owned` up to date. Withdraws the announcement on the way out, so that the partitions
/// move to the other instances at once.
pub(super) async fn follow_instances(
    inner: Arc<Inner>,
    owned: watch::Sender<Ownership>,
    shutdown: CancellationToken,
) {
    let mut backoff = Backoff::new(MAX_SETUP_BACKOFF);
    loop {
        match announce_and_watch(&inner, &owned, &shutdown).await {
            Ok(()) => break,
            Err(cause) => {
                warn!(%cause, retry_in = ?backoff.delay(), "cannot follow the other handler instances; owned partitions stay as they were")
            }
        }
        if !backoff.wait(&shutdown).await {
            break;
        }
    }
}

/// One run of following the instances: returns `Ok` on shutdown, having withdrawn the
/// announcement, and an error once the bucket or its watch fails (a server restart loses a
/// memory bucket: it is created again).
async fn announce_and_watch(
    inner: &Inner,
    owned: &watch::Sender<Ownership>,
    shutdown: &CancellationToken,
) -> Result<(), String> {
    let bucket = topology::key_value(
        &inner.topology.js,
        topology::handlers_bucket_config(&inner.config, LEASE),
    )
    .await
    .map_err(|e| format!("cannot create the handlers bucket: {e}"))?;
    let me = inner.instance.as_str();
    bucket
        .put(me, bytes::Bytes::new())
        .await
        .map_err(|e| format!("cannot announce this instance: {e}"))?;
    let mut announcements = bucket
        .watch_with_history(">")
        .await
        .map_err(|e| format!("cannot watch the handlers bucket: {e}"))?;
    let mut reconnects = inner.nats.reconnects();
    let mut seen: HashMap<String, Instant> = HashMap::new();
    // Until the watch has delivered every current announcement, a partial set would claim
    // other instances' partitions.
    let mut complete = false;
    let mut announce = tokio::time::interval(LEASE / 3);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => {
                let withdrawn = tokio::time::timeout(topology::SETUP_ATTEMPT, bucket.delete(me)).await;
                if !matches!(withdrawn, Ok(Ok(()))) {
                    debug!("could not withdraw this instance's announcement; it expires by itself");
                }
                return Ok(());
            }
            Ok(()) = reconnects.changed() => return Err("reconnected to NATS".into()),
            _ = announce.tick() => {
                // A put waits out its ack timeout when NATS is gone; stopping must not.
                tokio::select! {
                    put = bucket.put(me, bytes::Bytes::new()) => {
                        put.map_err(|e| format!("cannot announce this instance: {e}"))?;
                    }
                    () = shutdown.cancelled() => continue,
                }
                seen.retain(|_, at| at.elapsed() < LEASE);
            }
            entry = announcements.next() => match entry {
                Some(Ok(entry)) => {
                    match entry.operation {
                        kv::Operation::Put => seen.insert(entry.key, Instant::now()),
                        kv::Operation::Delete | kv::Operation::Purge => seen.remove(&entry.key),
                    };
                    complete |= entry.delta == 0;
                }
                Some(Err(e)) => return Err(format!("the handlers bucket's watch failed: {e}")),
                None => return Err("the handlers bucket's watch ended".into()),
            },
        }
        if complete {
            let instances = seen.keys().filter(|id| *id != me).count() + 1;
            metrics::gauge!(telemetry::HANDLER_INSTANCES).set(instances as f64);
            let now = owned_by(me, seen.keys().map(String::as_str));
            owned.send_if_modified(|before| {
                if before.as_ref() == Some(&now) {
                    return false;
                }
                if let Some(before) = before {
                    let moved = before.symmetric_difference(&now).count();
                    metrics::counter!(telemetry::HANDLER_PARTITION_MOVES_TOTAL)
                        .increment(moved as u64);
                }
                metrics::gauge!(telemetry::HANDLER_PARTITIONS_OWNED).set(now.len() as f64);
                info!(owned = ?now, instances, "intake partitions owned");
                *before = Some(now);
                true
            });
        }
    }
}

/// Pull one intake partition until `shutdown`, at the priority its ownership gives, and hand
/// its commands to the lanes. Set up again with its consumer whenever the NATS client
/// reconnects (a server restart loses a memory intake with its consumers and every pull
/// request) or the pull is lost.
pub(super) async fn take_partition(
    inner: Arc<Inner>,
    partition: u32,
    mut owned: watch::Receiver<Ownership>,
    lanes: Arc<[Lane]>,
    health: Arc<IntakeHealth>,
    shutdown: CancellationToken,
) {
    let mut reconnects = inner.nats.reconnects();
    let mut backoff = Backoff::new(MAX_SETUP_BACKOFF);
    loop {
        let mut priority = priority_of(partition, &owned.borrow_and_update());
        let setup = topology::attempt(
            pull_partition(&inner, partition, priority),
            HandlerError::Consumer,
        );
        let mut pull = tokio::select! {
            () = shutdown.cancelled() => return,
            setup = setup => match setup {
                Ok(pull) => {
                    backoff = Backoff::new(MAX_SETUP_BACKOFF);
                    health.up(partition);
                    pull
                }
                Err(e) => {
                    warn!(partition, error = %e, retry_in = ?backoff.delay(), "cannot set up the intake partition's consumer yet");
                    health.down(partition, Reason::NoIntake, e.to_string());
                    if !backoff.wait(&shutdown).await {
                        return;
                    }
                    continue;
                }
            },
        };
        let (reason, cause) = loop {
            tokio::select! {
                () = shutdown.cancelled() => {
                    pull.finish(&inner, &lanes).await;
                    return;
                }
                Ok(()) = reconnects.changed() => {
                    info!(partition, "reconnected to NATS; setting up the intake partition's consumer again");
                    break (Reason::NoIntake, "reconnected to NATS".to_owned());
                }
                Ok(()) = owned.changed() => {
                    let now = priority_of(partition, &owned.borrow_and_update());
                    if now != priority {
                        priority = now;
                        if let Err(e) = pull.reprioritize(priority).await {
                            break (Reason::PullFailing, e.to_string());
                        }
                    }
                }
                next = pull.next() => match next {
                    Ok(command) => super::dispatch(&inner, &lanes, command).await,
                    Err(e) => break (Reason::PullFailing, e.to_string()),
                },
            }
        };
        // A lost pull's requests are gone. A reconnect lost whatever was on its way over the
        // old connection (redelivered after the ack wait); requests that outlived it on a
        // cluster's consumer leader are abandoned here, a rare loss of the same kind, rather
        // than waited out by every instance at once after a server restart.
        drop(pull);
        warn!(partition, %cause, "the intake partition's consumer is gone or unreachable; setting it up again");
        health.down(partition, reason, cause);
    }
}

fn priority_of(partition: u32, owned: &Ownership) -> usize {
    match owned {
        Some(owned) if owned.contains(&partition) => OWNER,
        _ => STANDBY,
    }
}

/// A pull at `priority` on the partition's durable consumer, created first. The intake is
/// checked only when that fails: after a server restart has lost a memory intake, both are
/// created again here.
async fn pull_partition(
    inner: &Inner,
    partition: u32,
    priority: usize,
) -> Result<IntakePull, HandlerError> {
    let failed = |e: &dyn std::fmt::Display| HandlerError::Consumer(e.to_string());
    let config = partition_consumer(&inner.config, partition);
    let js = &inner.topology.js;
    let consumer = match js
        .create_consumer_on_stream(config.clone(), INTAKE_STREAM)
        .await
    {
        Ok(consumer) => consumer,
        Err(missing) => {
            debug!(partition, error = %missing, "cannot create the partition's consumer; checking the intake");
            topology::ensure_intake(js, &inner.config)
                .await
                .map_err(|e| failed(&e))?
                .create_consumer(config)
                .await
                .map_err(|e| failed(&e))?
        }
    };
    IntakePull::start(js, &inner.nats.client, consumer, priority)
        .await
        .map_err(|e| failed(&e))
}

fn partition_consumer(config: &Config, partition: u32) -> pull::Config {
    pull::Config {
        durable_name: Some(handler_consumer(partition)),
        filter_subject: intake_subject(partition),
        ack_policy: AckPolicy::Explicit,
        deliver_policy: DeliverPolicy::All,
        ack_wait: Duration::from_secs(config.intake.ack_wait_secs),
        max_deliver: config.intake.max_deliver,
        max_ack_pending: max_ack_pending_per_partition(config),
        priority_groups: vec![HANDLER_PRIORITY_GROUP.into()],
        priority_policy: PriorityPolicy::Prioritized,
        ..Default::default()
    }
}

/// The handler is ready to take commands while every partition's pull is set up.
pub(super) struct IntakeHealth {
    readiness: Readiness,
    down: Mutex<BTreeSet<u32>>,
}

impl IntakeHealth {
    /// Every partition counts as down until its first pull is set up.
    pub(super) fn new(readiness: Readiness) -> IntakeHealth {
        IntakeHealth {
            readiness,
            down: Mutex::new((0..INTAKE_PARTITIONS).collect()),
        }
    }

    fn up(&self, partition: u32) {
        let mut down = self
            .down
            .lock()
            .expect("intake health lock is never poisoned");
        if down.remove(&partition) && down.is_empty() {
            self.readiness.ready(READY_CHECK);
        }
    }

    fn down(&self, partition: u32, reason: Reason, cause: String) {
        let mut down = self
            .down
            .lock()
            .expect("intake health lock is never poisoned");
        down.insert(partition);
        self.readiness.not_ready(
            READY_CHECK,
            reason,
            format!("intake partition {partition}: {cause}"),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn instances(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("handler-{i:032x}")).collect()
    }

    #[test]
    fn every_partition_has_exactly_one_owner() {
        for n in 1..=20 {
            let ids = instances(n);
            let mut owners = vec![0; INTAKE_PARTITIONS as usize];
            for id in &ids {
                for partition in owned_by(id, ids.iter().map(String::as_str)) {
                    owners[partition as usize] += 1;
                }
            }
            assert!(owners.iter().all(|o| *o == 1), "{n} instances: {owners:?}");
        }
    }

    #[test]
    fn an_instance_alone_owns_everything() {
        let ids = instances(1);
        assert_eq!(
            owned_by(&ids[0], []).len(),
            INTAKE_PARTITIONS as usize,
            "whether or not it sees its own announcement"
        );
        assert_eq!(
            owned_by(&ids[0], [ids[0].as_str()]).len(),
            INTAKE_PARTITIONS as usize
        );
    }

    #[test]
    fn an_instance_joining_takes_partitions_only_for_itself() {
        let ids = instances(5);
        let before: Vec<Owned> = ids[..4]
            .iter()
            .map(|id| owned_by(id, ids[..4].iter().map(String::as_str)))
            .collect();
        let after: Vec<Owned> = ids
            .iter()
            .map(|id| owned_by(id, ids.iter().map(String::as_str)))
            .collect();
        for i in 0..4 {
            assert!(
                after[i].is_subset(&before[i]),
                "instance {i} gained {:?}",
                after[i].difference(&before[i])
            );
        }
        assert!(!after[4].is_empty(), "the newcomer owns some partitions");
    }

    #[test]
    fn two_instances_share_the_partitions() {
        let ids = instances(2);
        let first = owned_by(&ids[0], ids.iter().map(String::as_str)).len();
        // Rendezvous hashing balances on average, not exactly; this pair's split is fixed.
        assert!((4..=12).contains(&first), "the first owns {first} of 16");
    }

    #[test]
    fn partitions_share_the_intake_limit() {
        let mut config = Config::default();
        config.intake.max_ack_pending = 4096;
        assert_eq!(max_ack_pending_per_partition(&config), 256);
        config.intake.max_ack_pending = 1;
        assert_eq!(max_ack_pending_per_partition(&config), 1);
    }
}
