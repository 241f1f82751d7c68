//! The projector role: feeds the conversation store from the event log, and presence
//! updates into Redis.
//!
//! The conversation projection reads the log through a durable consumer and applies events
//! in batches; the store records the batch's last sequence with the rows, and the consumer
//! is acknowledged only after the store has committed. A crash between the two re-applies
//! the batch, which the store's idempotent writes make harmless. The store's position is
//! the truth: when the consumer is ahead of it (the store was deleted to be rebuilt), the
//! consumer is recreated at the store's position and the log is replayed from there.
//!
//! The consumer pins one instance (priority policy `pinned_client`): the others stand by and
//! take over when the pinned one stops pulling for `projector.takeover_secs`, or at once when
//! it stops cleanly or pulls anew (it releases its own pin).

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::consumer::{AckPolicy, DeliverPolicy, PriorityPolicy, pull};
use futures::{FutureExt, Stream, StreamExt};
use parley_events::presence::{ConnectionState, PresenceAnswer, PresenceQuery, PresenceUpdate};
use parley_events::subjects::{
    PRESENCE_QUERY_SUBJECT, PRESENCE_QUEUE, PRESENCE_SUBJECT, PROJECTOR_CONSUMER,
    PROJECTOR_PRIORITY_GROUP, presence_user_subject,
};
use parley_events::{EventEnvelope, RecordedEvent, UserId};
use parley_projections::{
    ConversationStore, PresenceClient, PresenceStore, StoreErrorKind, UserPresence,
};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, error, info, info_span, warn};

use crate::admin::{Readiness, Reason};
use crate::backoff::Backoff;
use crate::config::{Config, ProjectorConfig};
use crate::log::LogReader;
use crate::replay::{ActiveStore, Target};
use crate::topology::{self, Topology};
use crate::{telemetry, unix_millis};

pub(crate) const READY_CHECK: &str = "projector";
pub(crate) const PRESENCE_READY_CHECK: &str = "presence";
pub(crate) const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// Longest wait before pulling again after the log's consumer or a pull failed.
const MAX_PULL_BACKOFF: Duration = Duration::from_secs(1);
/// Longest pause between retries of a batch the store refused: a retry costs one batch of
/// writes, and a store back from an outage should not wait long to be fed.
const MAX_APPLY_BACKOFF: Duration = Duration::from_secs(5);
/// Most users one expiry sweep (one per [`REDIS_CHECK_INTERVAL`]) announces offline.
const SWEEP_LIMIT: usize = 1000;
/// How often the presence projector asks Redis whether it answers, and sweeps expired
/// presence.
const REDIS_CHECK_INTERVAL: Duration = Duration::from_secs(1);
/// A store further behind the log than this many events when projection starts is
/// replaying: it is reported not ready until it has caught up.
const REPLAY_LAG: usize = 1000;
/// How often an instance that is handed no events looks at the projection's consumer: has
/// the replay it follows ended, has the instance the consumer is pinned to stopped.
const STANDBY_CHECK: Duration = Duration::from_secs(1);
/// How long the instance the consumer is pinned to may leave events unacknowledged without
/// acknowledging any before another instance releases its pin: one that crashed would
/// keep it until `projector.takeover_secs`, and one that is alive acknowledges a batch every
/// few milliseconds while events wait.
const STALLED_PIN: Duration = Duration::from_secs(3);
/// How often the projector checks that the store still holds what it acknowledged: a store
/// that lost writes, or was emptied for a rebuild, is noticed within this.
const POSITION_CHECK_INTERVAL: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum ProjectorError {
    #[error("conversation store: {0}")]
    Store(#[from] parley_projections::StoreError),
    #[error("event log consumer: {0}")]
    Consumer(String),
    #[error(
        "event at log sequence {seq} cannot be read ({cause}); the projection stops here rather than skip it: deploy a build that understands it"
    )]
    Decode { seq: u64, cause: String },
    #[error(
        "the conversation store came back at log position {position}, behind the {acknowledged} this projector had acknowledged (it lost acknowledged writes, e.g. a single replica crashed before its commit log reached disk); replaying the log from the store's position"
    )]
    StoreBehind { position: u64, acknowledged: u64 },
}

/// Why a projection attempt ended without an error.
enum Stopped {
    Shutdown,
    /// `parley replay switch` moved the store: project into the new one from the switch's
    /// position.
    Switched,
}

impl ProjectorError {
    fn consumer(cause: impl std::fmt::Display) -> ProjectorError {
        ProjectorError::Consumer(cause.to_string())
    }

    fn reason(&self) -> Reason {
        match self {
            ProjectorError::Store(_) => Reason::StoreUnavailable,
            ProjectorError::Consumer(_) => Reason::PullFailing,
            ProjectorError::Decode { .. } => Reason::Failed,
            ProjectorError::StoreBehind { .. } => Reason::Replaying,
        }
    }

    fn kind(&self) -> &'static str {
        match self {
            ProjectorError::Store(e) => e.kind.as_str(),
            ProjectorError::Consumer(_) => "consumer",
            ProjectorError::Decode { .. } => "decode",
            ProjectorError::StoreBehind { .. } => "store_behind",
        }
    }
}

pub struct Projector {
    config: Arc<Config>,
    topology: Topology,
    store: Arc<ActiveStore>,
    readiness: Readiness,
    /// Swaps of `store`; the value is the sequence after which to project again.
    swaps: std::sync::Mutex<tokio::sync::watch::Receiver<Option<u64>>>,
    /// The `Nats-Pin-Id` the server last delivered to this instance with. A pull stream
    /// dropped with its pin leaves every instance standing by until the pin times out, so
    /// the instance releases its own pin before it pulls anew and when it stops.
    pin: std::sync::Mutex<Option<String>>,
}

impl Projector {
    pub fn build(
        config: Arc<Config>,
        topology: Topology,
        store: Arc<dyn ConversationStore>,
        readiness: Readiness,
    ) -> Projector {
        let target = Target::configured(&config);
        Projector::switchable(config, topology, ActiveStore::new(target, store), readiness)
    }

    /// A projector writing through `store`, which `parley replay switch` may swap: it then
    /// starts again on the new store.
    pub fn switchable(
        config: Arc<Config>,
        topology: Topology,
        store: Arc<ActiveStore>,
        readiness: Readiness,
    ) -> Projector {
        readiness.not_ready(READY_CHECK, Reason::Starting, "starting");
        let mut swaps = store.swaps();
        swaps.mark_unchanged();
        Projector {
            config,
            topology,
            store,
            readiness,
            swaps: std::sync::Mutex::new(swaps),
            pin: std::sync::Mutex::new(None),
        }
    }

    /// Project until `shutdown`, retrying with backoff whatever fails. A lost consumer or
    /// pull is retried within a second (on a cluster the log answers again as soon as it
    /// has a new leader); anything else backs off up to [`MAX_BACKOFF`]. An attempt that ran
    /// for longer than that starts the backoff afresh.
    pub async fn run(self, shutdown: CancellationToken) {
        let mut backoff = Backoff::new(MAX_BACKOFF);
        let mut pull_backoff = Backoff::new(MAX_PULL_BACKOFF);
        loop {
            let started = Instant::now();
            let attempt = self
                .project(&shutdown)
                .instrument(info_span!("projector"))
                .await;
            if started.elapsed() > MAX_BACKOFF {
                backoff = Backoff::new(MAX_BACKOFF);
                pull_backoff = Backoff::new(MAX_PULL_BACKOFF);
            }
            let waiting = match attempt {
                Ok(Stopped::Shutdown) => {
                    self.hand_over().await;
                    return;
                }
                Ok(Stopped::Switched) => {
                    info!(target = %self.store.target(), "the projection moved to another target");
                    continue;
                }
                Err(e) => {
                    let waiting = match e {
                        ProjectorError::Consumer(_) => &mut pull_backoff,
                        _ => &mut backoff,
                    };
                    metrics::counter!(telemetry::PROJECTOR_ERRORS_TOTAL, "kind" => e.kind())
                        .increment(1);
                    error!(error = %e, retry_in = ?waiting.delay(), "projection stopped");
                    self.readiness
                        .not_ready(READY_CHECK, e.reason(), e.to_string());
                    waiting
                }
            };
            if !waiting.wait(&shutdown).await {
                return;
            }
        }
    }

    /// The consumer's message stream, starting after the store's position (returned too),
    /// or after `switched_at` when the store was just switched (see [`ActiveStore::swap`]).
    async fn consumer(
        &self,
        switched_at: Option<u64>,
    ) -> Result<(pull::Stream, u64), ProjectorError> {
        let position = self.store.position().await?;
        let position = switched_at.map_or(position, |at| at.min(position));
        let log = &self.topology.log;
        let mut existing = log.consumer_info(PROJECTOR_CONSUMER).await.ok();
        if let Some(info) = &existing
            && info.ack_floor.stream_sequence > position
        {
            warn!(
                consumer = info.ack_floor.stream_sequence,
                store = position,
                "the store is behind its consumer (deleted or restored?); replaying the log from the store's position"
            );
            log.delete_consumer(PROJECTOR_CONSUMER)
                .await
                .map_err(ProjectorError::consumer)?;
            existing = None;
        }
        let mut config = consumer_config(&self.config.projector, position);
        let consumer = match existing {
            None => log
                .get_or_create_consumer(PROJECTOR_CONSUMER, config)
                .await
                .map_err(ProjectorError::consumer)?,
            Some(info) => {
                self.release_pin(&info).await?;
                if same_delivery(&info.config, &config) {
                    log.get_consumer(PROJECTOR_CONSUMER)
                        .await
                        .map_err(ProjectorError::consumer)?
                } else {
                    // A consumer from before standby instances, or from another configuration:
                    // updated in place, its position kept (the server refuses to change it).
                    info!(
                        takeover_secs = self.config.projector.takeover_secs,
                        "updating the projection's consumer to this configuration"
                    );
                    config.deliver_policy = info.config.deliver_policy;
                    log.update_consumer(config)
                        .await
                        .map_err(ProjectorError::consumer)?
                }
            }
        };
        info!(position, "projecting from the event log");
        // The pinned instance pulls again (and keeps its pin) two or three times in a
        // takeover time.
        let expires = Duration::from_secs(self.config.projector.takeover_secs) / 3;
        let messages = consumer
            .stream()
            .group(PROJECTOR_PRIORITY_GROUP)
            .max_messages_per_batch(self.config.projector.batch)
            .expires(expires)
            .heartbeat(topology::PULL_HEARTBEAT.min(expires / 2))
            .messages()
            .await
            .map_err(ProjectorError::consumer)?;
        Ok((messages, position))
    }

    /// Release the consumer's pin if the server still holds it for this instance's previous
    /// pull stream, so that the next pull (a standby's or this instance's own) takes it now
    /// rather than when it times out.
    async fn release_pin(
        &self,
        info: &async_nats::jetstream::consumer::Info,
    ) -> Result<(), ProjectorError> {
        let Some(ours) = self.pin.lock().expect("never poisoned").take() else {
            return Ok(());
        };
        if pinned_to(info) == Some(ours.as_str()) {
            self.unpin().await?;
            info!("released this instance's pin on the projection");
        }
        Ok(())
    }

    async fn unpin(&self) -> Result<(), ProjectorError> {
        self.topology
            .log
            .unpin_consumer(PROJECTOR_CONSUMER, PROJECTOR_PRIORITY_GROUP)
            .await
            .map_err(ProjectorError::consumer)
    }

    /// Release the consumer's pin from another instance that has left events unacknowledged
    /// for [`STALLED_PIN`] without acknowledging any: crashed, cut off or stuck. Its own pin
    /// times out only after `projector.takeover_secs`, and nats-server does not tell a dead
    /// instance's pull requests from a live one's. One that was merely slow loses nothing
    /// (the events it holds come back, and every instance fills what it skips over).
    ///
    /// Returns the newest sequence the consumer had delivered when this instance released
    /// the pin: the stalled instance may hold events up to there that come back only after
    /// the ack wait, and this instance reads them from the log instead.
    async fn watch_pin(&self, watch: &mut PinWatch) -> Option<u64> {
        let info = self
            .topology
            .log
            .consumer_info(PROJECTOR_CONSUMER)
            .await
            .ok()?;
        let ours = self.pin.lock().expect("never poisoned").clone();
        let elsewhere = pinned_to(&info).is_some_and(|pinned| Some(pinned) != ours.as_deref());
        let waiting = elsewhere && (info.num_pending > 0 || info.num_ack_pending > 0);
        let floor = info.ack_floor.stream_sequence;
        if !watch.stalled(floor, waiting, Instant::now()) {
            return None;
        }
        *watch = PinWatch::default();
        match self.unpin().await {
            Ok(()) => {
                warn!(
                    floor,
                    pending = info.num_pending,
                    unacknowledged = info.num_ack_pending,
                    "the instance the projection is pinned to has acknowledged nothing for 3 s with events waiting; released its pin"
                );
                metrics::counter!(telemetry::PROJECTOR_PINS_TAKEN_TOTAL).increment(1);
                Some(info.delivered.stream_sequence)
            }
            Err(e) => {
                warn!(error = %e, "could not release a stalled instance's pin on the projection");
                None
            }
        }
    }

    /// On a clean stop, let a standby instance take over the projection at once.
    async fn hand_over(&self) {
        let released = topology::attempt(
            async {
                let info = self
                    .topology
                    .log
                    .consumer_info(PROJECTOR_CONSUMER)
                    .await
                    .map_err(ProjectorError::consumer)?;
                self.release_pin(&info).await
            },
            ProjectorError::Consumer,
        )
        .await;
        if let Err(e) = released {
            warn!(error = %e, "could not release the projection's pin; a standby takes over when it times out");
        }
    }

    /// Remember the pin `message` was delivered with.
    fn note_pin(&self, message: &async_nats::jetstream::Message) {
        let Some(pin) = message
            .headers
            .as_ref()
            .and_then(|headers| headers.get(async_nats::header::NATS_PIN_ID))
        else {
            return;
        };
        let mut ours = self.pin.lock().expect("never poisoned");
        if ours.as_deref() != Some(pin.as_str()) {
            info!("the log delivers to this instance now; any other stands by");
            *ours = Some(pin.as_str().to_owned());
        }
    }

    async fn project(&self, shutdown: &CancellationToken) -> Result<Stopped, ProjectorError> {
        let (mut swaps, switched_at) = {
            let mut swaps = self.swaps.lock().expect("never poisoned");
            let switched_at = swaps
                .has_changed()
                .unwrap_or(false)
                .then(|| *swaps.borrow_and_update())
                .flatten();
            (swaps.clone(), switched_at)
        };
        self.store.check().await?;
        let (messages, mut acknowledged) =
            topology::attempt(self.consumer(switched_at), ProjectorError::Consumer).await?;
        // The stream outlives a reconnect: the client pulls again by itself on the same inbox
        // once NATS is back, so the consumer's pin goes to a pull this instance reads. Another
        // stream would leave the old one's last pull request at the server, where it can take
        // the pin and a batch that nobody reads (until the pin times out), after every restart
        // of nats-server. So missed heartbeats are noted, and the stream is kept.
        let messages = messages.filter(|message| {
            let missed = message
                .as_ref()
                .is_err_and(|e| e.kind() == pull::MessagesErrorKind::MissingHeartbeat);
            if missed {
                warn!(
                    "the event log's pull missed a heartbeat (NATS unreachable?); the client pulls again when it is back"
                );
            }
            std::future::ready(!missed)
        });
        let mut messages = std::pin::pin!(messages);
        let top_up = TopUp {
            gap: Duration::from_millis(self.config.projector.linger_ms),
            within: Some(Duration::from_millis(self.config.projector.linger_ms)),
        };
        let log = LogReader::new(&self.topology);
        let bounds = log.bounds().await.map_err(ProjectorError::consumer)?;
        let backfill = Backfill {
            log,
            oldest: bounds.first,
        };
        let mut checked = Instant::now();
        let mut replaying = replay_target(bounds.last, acknowledged);
        self.report_replay(&mut replaying, acknowledged);
        let mut standing_by = tokio::time::interval(STANDBY_CHECK);
        standing_by.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut pinned = PinWatch::default();
        loop {
            let first = tokio::select! {
                () = shutdown.cancelled() => return Ok(Stopped::Shutdown),
                Ok(()) = swaps.changed() => return Ok(Stopped::Switched),
                _ = standing_by.tick() => {
                    // A standby follows a replay through the store's position, which the
                    // pinned instance advances.
                    if replaying.is_some() {
                        acknowledged = acknowledged.max(self.store.position().await?);
                        self.report_replay(&mut replaying, acknowledged);
                    }
                    let Some(delivered) = self.watch_pin(&mut pinned).await else {
                        continue;
                    };
                    // What the stalled instance took is in the store now, not after the
                    // ack wait or whenever a later event arrives.
                    if !self
                        .apply_in_order(
                            Vec::new(),
                            delivered,
                            &mut acknowledged,
                            &backfill,
                            false,
                            shutdown,
                        )
                        .await?
                    {
                        return Ok(Stopped::Shutdown);
                    }
                    continue;
                }
                first = messages.next() => match first {
                    Some(first) => first,
                    None => return Err(ProjectorError::Consumer("consumer stream ended".into())),
                },
            };
            let chunk = topped_up(first, &mut messages, self.config.projector.batch, top_up).await;
            let mut delivered = Vec::with_capacity(chunk.len());
            // One span per traced event, open while its batch is applied: the last step of
            // the trace its command started.
            let mut traced = Vec::new();
            for message in chunk {
                let message = message.map_err(ProjectorError::consumer)?;
                let event = decode(&message)?;
                if crate::traces::carries_trace(message.headers.as_ref()) {
                    let span = info_span!(
                        "event",
                        otel.name = "projector event",
                        seq = event.seq,
                        event = event.envelope.event.type_name()
                    );
                    crate::traces::continue_trace(&span, message.headers.as_ref());
                    traced.push(span);
                }
                delivered.push((event, message));
            }
            if let Some((_, newest)) = delivered.last() {
                self.note_pin(newest);
            }
            let verify = checked.elapsed() >= POSITION_CHECK_INTERVAL;
            if verify {
                checked = Instant::now();
            }
            if !self
                .apply_in_order(delivered, 0, &mut acknowledged, &backfill, verify, shutdown)
                .await?
            {
                return Ok(Stopped::Shutdown);
            }
            drop(traced);
            self.report_replay(&mut replaying, acknowledged);
            standing_by.reset();
        }
    }

    /// Ready, or not while replaying up to the log end `replaying` (now at `position`); the
    /// replay ends once there.
    fn report_replay(&self, replaying: &mut Option<u64>, position: u64) {
        match *replaying {
            Some(end) if position >= end => {
                info!(position, "the store has caught up with the log");
                *replaying = None;
                self.readiness.ready(READY_CHECK);
            }
            Some(end) => self.readiness.not_ready(
                READY_CHECK,
                Reason::Replaying,
                format!("replaying the log into the store: at {position} of {end}"),
            ),
            None => self.readiness.ready(READY_CHECK),
        }
    }

    /// Apply `delivered` (one batch as the consumer delivered it, or none) and acknowledge it
    /// with its newest message (ack policy `all`), after whatever it skips over since
    /// `acknowledged`, up to its newest event or `through`, whichever is later.
    ///
    /// Acknowledging also acknowledges every event before, including events delivered to a
    /// pull that never applied them (this process before it reconnected, or an instance that
    /// died), which the consumer then never delivers again. So the events between the
    /// store's position and the batch that the batch lacks are read from the log by direct
    /// get and applied with it, and the store's position is a watermark: every event at or
    /// below it is in the store, whatever the number of instances. Events read up to a
    /// `through` beyond the batch stay unacknowledged: the consumer delivers them again after
    /// its ack wait, and applying them again changes nothing.
    async fn apply_in_order(
        &self,
        mut delivered: Vec<(RecordedEvent, async_nats::jetstream::Message)>,
        through: u64,
        acknowledged: &mut u64,
        backfill: &Backfill,
        verify: bool,
        shutdown: &CancellationToken,
    ) -> Result<bool, ProjectorError> {
        // In order, whatever order redeliveries came in: the newest acknowledges the batch.
        delivered.sort_by_key(|(event, _)| event.seq);
        let (mut events, messages): (Vec<_>, Vec<_>) = delivered.into_iter().unzip();
        let through = events
            .last()
            .map_or(through, |event| event.seq.max(through));
        let seqs = events.iter().map(|event| event.seq).chain([through]);
        if skips_over(seqs, *acknowledged) {
            let floor = (*acknowledged)
                .max(self.store.position().await?)
                .max(backfill.oldest.saturating_sub(1));
            let holes: Vec<u64> = (floor + 1..=through)
                .filter(|seq| events.binary_search_by_key(seq, |event| event.seq).is_err())
                .collect();
            if let Some(&first) = holes.first() {
                let skipped = holes.len();
                let read = backfill
                    .log
                    .events(holes)
                    .await
                    .map_err(ProjectorError::consumer)?;
                warn!(
                    skipped,
                    read = read.len(),
                    first,
                    "events delivered before were never applied; read them from the log"
                );
                metrics::counter!(telemetry::PROJECTOR_HOLES_FILLED_TOTAL)
                    .increment(read.len() as u64);
                events.extend(read);
                events.sort_by_key(|event| event.seq);
            }
        }
        let Some(last) = events.last().map(|event| event.seq) else {
            return Ok(true);
        };
        if !self.apply(&events, *acknowledged, verify, shutdown).await? {
            return Ok(false);
        }
        if let Some(newest) = messages.last() {
            newest.ack().await.map_err(ProjectorError::consumer)?;
        }
        *acknowledged = (*acknowledged).max(last);
        Ok(true)
    }

    /// Apply one batch, retrying with backoff while the store is unreachable: the batch
    /// stays unacknowledged (so nothing is lost if this process dies meanwhile) and the
    /// projector reports not ready. `false` when shutdown came first.
    ///
    /// With `verify`, and after any failure, the store's position is compared with
    /// `acknowledged` (the log sequence already acknowledged to JetStream) first: a store
    /// back from an outage may have lost writes it had acknowledged (a single replica
    /// killed before its periodic commit-log sync), or been emptied for a rebuild, and
    /// going on would leave a hole. That is an error, and the restarted projection replays
    /// from the store's position.
    pub(crate) async fn apply(
        &self,
        events: &[RecordedEvent],
        acknowledged: u64,
        mut verify: bool,
        shutdown: &CancellationToken,
    ) -> Result<bool, ProjectorError> {
        let store_kind = self.store.target().kind();
        let mut backoff = Backoff::new(MAX_APPLY_BACKOFF);
        loop {
            let position = if verify {
                self.store.position().await.map(Some)
            } else {
                Ok(None)
            };
            let started = Instant::now();
            let span = tracing::debug_span!(
                "apply",
                store = store_kind,
                events = events.len(),
                first = events.first().map(|e| e.seq),
                last = events.last().map(|e| e.seq)
            );
            let applied = match position {
                Ok(Some(position)) if position < acknowledged => {
                    return Err(ProjectorError::StoreBehind {
                        position,
                        acknowledged,
                    });
                }
                Ok(_) => self.store.apply(events).instrument(span).await,
                Err(e) => Err(e),
            };
            match applied {
                Ok(()) => {
                    metrics::histogram!(telemetry::PROJECTOR_APPLY_SECONDS, "store" => store_kind)
                        .record(started.elapsed().as_secs_f64());
                    break;
                }
                Err(e) if e.kind == StoreErrorKind::Unavailable => {
                    metrics::counter!(telemetry::PROJECTOR_ERRORS_TOTAL, "kind" => e.kind.as_str())
                        .increment(1);
                    metrics::counter!(telemetry::PROJECTOR_APPLY_RETRIES_TOTAL, "store" => store_kind)
                        .increment(1);
                    warn!(error = %e, retry_in = ?backoff.delay(), "cannot write to the conversation store; the batch stays unacknowledged and is retried");
                    self.readiness
                        .not_ready(READY_CHECK, Reason::StoreUnavailable, e.to_string());
                    verify = true;
                }
                Err(e) => return Err(e.into()),
            }
            if !backoff.wait(shutdown).await {
                return Ok(false);
            }
        }
        metrics::histogram!(telemetry::PROJECTOR_BATCH_EVENTS).record(events.len() as f64);
        metrics::counter!(telemetry::PROJECTOR_EVENTS_APPLIED_TOTAL).increment(events.len() as u64);
        if let Some(last) = events.last() {
            metrics::gauge!(telemetry::PROJECTOR_POSITION).set(last.seq as f64);
        }
        Ok(true)
    }
}

/// The log's end `end`, when the store at `position` is so far behind it that serving from
/// the store would show stale conversations: the projector is not ready until it has
/// replayed that far.
fn replay_target(end: u64, position: u64) -> Option<u64> {
    let lag = end.saturating_sub(position);
    (lag > REPLAY_LAG as u64).then_some(end)
}

/// Where events delivered and never applied are read from: the log, down to its first
/// sequence when this projection run started (those before were removed by retention and
/// are not looked for).
struct Backfill {
    log: LogReader,
    oldest: u64,
}

/// The `Nats-Pin-Id` of the instance the projection's consumer delivers to, if any.
fn pinned_to(info: &async_nats::jetstream::consumer::Info) -> Option<&str> {
    info.priority_groups
        .iter()
        .find(|group| group.group == PROJECTOR_PRIORITY_GROUP)?
        .pinned_client_id
        .as_deref()
}

/// What an instance handed no events has seen of the instance the consumer is pinned to.
#[derive(Debug, Default)]
struct PinWatch {
    floor: u64,
    /// Since when events have waited with the acknowledged floor at `floor`.
    waiting_since: Option<Instant>,
}

impl PinWatch {
    /// Whether events have waited on another instance's pin for [`STALLED_PIN`] with the
    /// acknowledged floor at `floor` all along.
    fn stalled(&mut self, floor: u64, waiting: bool, now: Instant) -> bool {
        if !waiting || floor != self.floor {
            self.floor = floor;
            self.waiting_since = waiting.then_some(now);
            return false;
        }
        let since = *self.waiting_since.get_or_insert(now);
        now.duration_since(since) >= STALLED_PIN
    }
}

/// The projection's consumer, delivering from after `position`.
fn consumer_config(projector: &ProjectorConfig, position: u64) -> pull::Config {
    pull::Config {
        durable_name: Some(PROJECTOR_CONSUMER.into()),
        ack_policy: AckPolicy::All,
        deliver_policy: if position == 0 {
            DeliverPolicy::All
        } else {
            DeliverPolicy::ByStartSequence {
                start_sequence: position + 1,
            }
        },
        // Events an instance took and never acknowledged come back after this, to whichever
        // instance holds the pin by then: the pin of one that died moves within one takeover
        // time, its events within two.
        ack_wait: Duration::from_secs(projector.takeover_secs * 2),
        max_ack_pending: i64::try_from(projector.batch * 4).unwrap_or(i64::MAX),
        priority_policy: PriorityPolicy::PinnedClient,
        priority_groups: vec![PROJECTOR_PRIORITY_GROUP.into()],
        priority_timeout: Duration::from_secs(projector.takeover_secs),
        ..Default::default()
    }
}

/// Whether the consumer as it is (`existing`) delivers as `wanted` would, starting point
/// aside.
fn same_delivery(
    existing: &async_nats::jetstream::consumer::Config,
    wanted: &pull::Config,
) -> bool {
    existing.ack_policy == wanted.ack_policy
        && existing.ack_wait == wanted.ack_wait
        && existing.max_ack_pending == wanted.max_ack_pending
        && existing.priority_policy == wanted.priority_policy
        && existing.priority_groups == wanted.priority_groups
        && existing.priority_timeout == wanted.priority_timeout
}

/// Whether the ascending sequences `seqs` leave one out after `after`.
fn skips_over(seqs: impl IntoIterator<Item = u64>, after: u64) -> bool {
    let mut end = after;
    for seq in seqs {
        if seq > end + 1 {
            return true;
        }
        end = end.max(seq);
    }
    false
}

/// The event a log message carries, at its sequence: how the projector and `parley replay`
/// read the log alike.
pub(crate) fn decode(
    message: &async_nats::jetstream::Message,
) -> Result<RecordedEvent, ProjectorError> {
    let seq = message
        .info()
        .map_err(ProjectorError::consumer)?
        .stream_sequence;
    let envelope =
        EventEnvelope::from_bytes(&message.payload).map_err(|e| ProjectorError::Decode {
            seq,
            cause: e.to_string(),
        })?;
    Ok(envelope.recorded(seq))
}

/// Record presence updates from every gateway until `shutdown`, announce each user who
/// comes online or goes offline on the user's subject, and answer gateways' queries.
/// Instances share a queue group, so each update is recorded once and each query answered
/// once.
///
/// Redis unreachable at start does not stop the node: presence is ephemeral and must not
/// hold up the conversation projection, so this retries with backoff (not ready meanwhile).
pub async fn run_presence(
    client: async_nats::Client,
    redis: PresenceClient,
    readiness: Readiness,
    shutdown: CancellationToken,
) -> Result<(), async_nats::SubscribeError> {
    // Subscribed before Redis is reached, so an update published meanwhile (a socket that
    // opened while this projector was starting) waits in the subscription instead of being
    // lost until that socket's next heartbeat.
    let mut updates = client
        .queue_subscribe(PRESENCE_SUBJECT, PRESENCE_QUEUE.into())
        .await?;
    // A flush waits for a connection, so a node stopped while NATS is away is not held.
    tokio::select! {
        flushed = client.flush() => {
            if let Err(e) = flushed {
                warn!(error = %e, "cannot flush the presence subscription");
            }
        }
        () = shutdown.cancelled() => return Ok(()),
    }
    let mut backoff = Backoff::new(MAX_BACKOFF);
    let store = loop {
        match PresenceStore::connect(&redis).await {
            Ok(store) => break store,
            Err(e) => {
                warn!(error = %e, retry_in = ?backoff.delay(), "cannot reach Redis for presence");
                readiness.not_ready(
                    PRESENCE_READY_CHECK,
                    Reason::RedisUnavailable,
                    e.to_string(),
                );
                if !backoff.wait(&shutdown).await {
                    return Ok(());
                }
            }
        }
    };
    readiness.ready(PRESENCE_READY_CHECK);
    let queries = tokio::spawn(answer_queries(
        client.clone(),
        store.clone(),
        shutdown.clone(),
    ));
    record_updates(&client, &store, &readiness, &mut updates, &shutdown).await;
    queries.abort();
    Ok(())
}

async fn record_updates(
    client: &async_nats::Client,
    store: &PresenceStore,
    readiness: &Readiness,
    updates: &mut async_nats::Subscriber,
    shutdown: &CancellationToken,
) {
    // Updates alone would notice Redis gone only at the next one (a heartbeat may be
    // seconds away); the check keeps readiness true meanwhile.
    let mut redis_check = tokio::time::interval(REDIS_CHECK_INTERVAL);
    loop {
        let message = tokio::select! {
            () = shutdown.cancelled() => return,
            _ = redis_check.tick() => {
                match store.check().await {
                    Ok(()) => readiness.ready(PRESENCE_READY_CHECK),
                    Err(e) => readiness.not_ready(PRESENCE_READY_CHECK, Reason::RedisUnavailable, e.to_string()),
                }
                sweep(client, store).await;
                continue;
            }
            message = updates.next() => match message { Some(message) => message, None => return },
        };
        let update = match PresenceUpdate::from_bytes(&message.payload) {
            Ok(update) => update,
            Err(e) => {
                warn!(error = %e, "unreadable presence update");
                metrics::counter!(telemetry::PRESENCE_ERRORS_TOTAL, "kind" => "decode")
                    .increment(1);
                continue;
            }
        };
        let state = match update.state {
            ConnectionState::Open => "open",
            ConnectionState::Closed => "closed",
        };
        match store.record(&update).await {
            Ok(recorded) => {
                readiness.ready(PRESENCE_READY_CHECK);
                metrics::counter!(telemetry::PRESENCE_UPDATES_TOTAL, "state" => state).increment(1);
                if recorded.changed() {
                    announce(client, update.user, recorded.now).await;
                }
            }
            Err(e) => {
                // Presence repairs itself with the next heartbeat; say so once per failure.
                warn!(error = %e, "cannot record presence");
                readiness.not_ready(
                    PRESENCE_READY_CHECK,
                    Reason::RedisUnavailable,
                    e.to_string(),
                );
                metrics::counter!(telemetry::PRESENCE_ERRORS_TOTAL, "kind" => "redis").increment(1);
            }
        }
    }
}

/// Announce the users whose records all expired without a close (their gateway died): no
/// update says so, and their watchers would otherwise go on showing them online.
async fn sweep(client: &async_nats::Client, store: &PresenceStore) {
    match store.expired(unix_millis(), SWEEP_LIMIT).await {
        Ok(expired) => {
            for (user, now) in expired {
                announce(client, user, now).await;
            }
        }
        Err(e) => warn!(error = %e, "cannot sweep expired presence"),
    }
}

/// Tell the gateways watching `user` that it came online or went offline. At most once, like
/// all of core NATS: a gateway that misses it is corrected by its sockets' next query.
async fn announce(client: &async_nats::Client, user: UserId, now: UserPresence) {
    let subject = presence_user_subject(&user);
    let status = now.of(user);
    let state = if status.online { "online" } else { "offline" };
    match client.publish(subject, status.to_bytes().into()).await {
        Ok(()) => {
            metrics::counter!(telemetry::PRESENCE_CHANGES_TOTAL, "state" => state).increment(1);
        }
        Err(e) => warn!(error = %e, "cannot announce a presence change"),
    }
}

/// Answer gateways' presence queries from Redis until `shutdown`. A query that cannot be
/// answered gets an empty reply, so the gateway says `unavailable` at once instead of
/// waiting out its request.
async fn answer_queries(
    client: async_nats::Client,
    store: PresenceStore,
    shutdown: CancellationToken,
) {
    let mut queries = match client
        .queue_subscribe(PRESENCE_QUERY_SUBJECT, PRESENCE_QUEUE.into())
        .await
    {
        Ok(queries) => queries,
        Err(e) => {
            error!(error = %e, "cannot subscribe to presence queries");
            return;
        }
    };
    loop {
        let message = tokio::select! {
            () = shutdown.cancelled() => return,
            message = queries.next() => match message { Some(message) => message, None => return },
        };
        let Some(reply) = message.reply else { continue };
        let answer = match PresenceQuery::from_bytes(&message.payload) {
            Ok(query) => store
                .statuses(&query.users, unix_millis())
                .await
                .map(|statuses| PresenceAnswer {
                    users: query
                        .users
                        .into_iter()
                        .zip(statuses)
                        .map(|(user, now)| now.of(user))
                        .collect(),
                })
                .map_err(|e| ("redis", e.to_string())),
            Err(e) => Err(("decode", e.to_string())),
        };
        let payload = match answer {
            Ok(answer) => {
                metrics::counter!(telemetry::PRESENCE_QUERIES_TOTAL, "result" => "answered")
                    .increment(1);
                answer.to_bytes()
            }
            Err((kind, cause)) => {
                warn!(error = %cause, "cannot answer a presence query");
                metrics::counter!(telemetry::PRESENCE_QUERIES_TOTAL, "result" => kind).increment(1);
                Vec::new()
            }
        };
        if let Err(e) = client.publish(reply, payload.into()).await {
            warn!(error = %e, "cannot answer a presence query");
        }
    }
}

/// How long a batch that is not full waits for more events before it is applied.
#[derive(Debug, Clone, Copy)]
pub(crate) struct TopUp {
    /// Longest wait for the next event.
    pub gap: Duration,
    /// Longest wait in all, from the first event; `None`: as long as events keep coming
    /// within `gap`.
    pub within: Option<Duration>,
}

/// `first` and the events that follow it, up to `size`: those ready now, then more as
/// `top_up` allows. A store applies fewer, larger batches for less work per event.
pub(crate) async fn topped_up<S: Stream + Unpin>(
    first: S::Item,
    messages: &mut S,
    size: usize,
    top_up: TopUp,
) -> Vec<S::Item> {
    let deadline = top_up
        .within
        .map(|within| tokio::time::Instant::now() + within);
    let mut batch = Vec::new();
    batch.push(first);
    while batch.len() < size {
        let next = match messages.next().now_or_never() {
            Some(next) => next,
            None => {
                let gap = tokio::time::Instant::now() + top_up.gap;
                let until = deadline.map_or(gap, |deadline| deadline.min(gap));
                match tokio::time::timeout_at(until, messages.next()).await {
                    Ok(next) => next,
                    Err(_) => break,
                }
            }
        };
        // An ended stream is noticed by the next batch's first read.
        let Some(message) = next else { break };
        batch.push(message);
    }
    batch
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_consumer_from_before_standby_or_another_takeover_is_updated_and_its_start_is_not() {
        use async_nats::jetstream::consumer::IntoConsumerConfig;
        let projector = ProjectorConfig::default();
        let wanted = consumer_config(&projector, 0);
        let as_is = |config: pull::Config| config.into_consumer_config();
        assert!(same_delivery(
            &as_is(consumer_config(&projector, 42)),
            &wanted
        ));
        let before_standby = pull::Config {
            priority_policy: PriorityPolicy::None,
            priority_groups: Vec::new(),
            priority_timeout: Duration::ZERO,
            ..consumer_config(&projector, 42)
        };
        assert!(!same_delivery(&as_is(before_standby), &wanted));
        let slower = ProjectorConfig {
            takeover_secs: 30,
            ..ProjectorConfig::default()
        };
        assert!(!same_delivery(&as_is(consumer_config(&slower, 0)), &wanted));
        let larger = ProjectorConfig {
            batch: 1024,
            ..ProjectorConfig::default()
        };
        assert!(!same_delivery(&as_is(consumer_config(&larger, 0)), &wanted));
    }

    #[test]
    fn a_pin_is_stalled_after_events_waited_on_it_with_no_progress_for_the_whole_time() {
        let start = Instant::now();
        let at = |secs: u64| start + Duration::from_secs(secs);
        let mut watch = PinWatch::default();
        assert!(!watch.stalled(10, true, at(0)), "just seen waiting");
        assert!(!watch.stalled(10, true, at(2)));
        assert!(watch.stalled(10, true, at(3)), "3 s at one floor");

        let mut watch = PinWatch::default();
        assert!(!watch.stalled(10, true, at(0)));
        assert!(
            !watch.stalled(11, true, at(2)),
            "progress starts the wait anew"
        );
        assert!(!watch.stalled(11, true, at(4)));
        assert!(watch.stalled(11, true, at(5)));

        let mut watch = PinWatch::default();
        assert!(!watch.stalled(10, true, at(0)));
        assert!(
            !watch.stalled(10, false, at(2)),
            "nothing waiting: nothing stalled"
        );
        assert!(!watch.stalled(10, true, at(4)));
        assert!(!watch.stalled(10, true, at(6)));
        assert!(watch.stalled(10, true, at(7)));
    }

    #[test]
    fn a_batch_skips_over_a_sequence_only_when_one_after_the_last_applied_is_missing() {
        assert!(!skips_over([4, 5, 6], 3));
        assert!(
            !skips_over([2, 3, 4, 5], 3),
            "redelivered ones already applied"
        );
        assert!(!skips_over([], 3));
        assert!(skips_over([5, 6], 3));
        assert!(skips_over([4, 6], 3));
        assert!(skips_over([1, 2, 5], 3));
    }

    #[tokio::test]
    async fn a_batch_takes_what_is_ready_up_to_its_size_and_stops_when_the_log_pauses() {
        let gaps = TopUp {
            gap: Duration::from_millis(20),
            within: None,
        };
        let mut ready = futures::stream::iter(2..=10);
        assert_eq!(topped_up(1, &mut ready, 4, gaps).await, [1, 2, 3, 4]);
        assert_eq!(
            ready.next().await,
            Some(5),
            "the rest stays for the next batch"
        );
        let mut pausing = futures::stream::iter(2..=3).chain(futures::stream::pending());
        assert_eq!(topped_up(1, &mut pausing, 10, gaps).await, [1, 2, 3]);
        let mut ended = futures::stream::iter(2..=3);
        assert_eq!(topped_up(1, &mut ended, 10, gaps).await, [1, 2, 3]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_batch_waits_no_longer_in_all_than_its_top_up_allows() {
        // One event every 4 ms: each comes within the gap, but after 10 ms the batch goes.
        let mut steady = futures::stream::iter(2..)
            .then(|n| async move {
                tokio::time::sleep(Duration::from_millis(4)).await;
                n
            })
            .boxed();
        let within = TopUp {
            gap: Duration::from_millis(5),
            within: Some(Duration::from_millis(10)),
        };
        assert_eq!(topped_up(1, &mut steady, 100, within).await, [1, 2, 3]);
        let nothing_more = TopUp {
            gap: Duration::ZERO,
            within: Some(Duration::ZERO),
        };
        assert_eq!(
            topped_up(1, &mut futures::stream::iter(2..=3), 10, nothing_more).await,
            [1, 2, 3],
            "what is ready is taken even with no wait"
        );
    }
}
