//! The handler role: takes commands from the intake stream, validates them against the
//! write model, appends their events to the log with optimistic concurrency, publishes the
//! live copy, and tells the originating gateway the outcome.
//!
//! The intake is split into partitions (ranges of shards) that the instances share out
//! between them (`partitions`), so instances append to disjoint shards; any instance still
//! takes any partition whose owner is gone. Within an instance, commands are spread over
//! lanes by shard: commands of one shard run one after another (their appends would
//! conflict anyway), different shards in parallel. Across instances, a conflicting append
//! fails its expected-sequence check, the instance waits until its log tail has caught up
//! with the shard, and decides again.

mod commits;
mod holding;
mod intake_pull;
mod messages;
mod outcomes;
mod partitions;
mod snapshots;
mod write_model;

use std::collections::{HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use async_nats::jetstream::consumer::{AckPolicy, DeliverPolicy, pull};
use async_nats::jetstream::stream::{DirectGetErrorKind, RawMessageErrorKind};
use async_nats::jetstream::{AckKind, Message};
use futures::StreamExt;
use parley_events::command::OutcomeQuery;
use parley_events::subjects::{
    HANDLER_QUEUE, INTAKE_PARTITIONS, LIVE_MEMBERSHIP_SUBJECT, OUTCOME_QUERY_SUBJECT,
    OUTCOME_SUBJECT_PREFIX, live_subject,
};
use parley_events::{Command, ErrorCode, EventEnvelope, Outcome, OutcomeResult, RecordedEvent};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, error, info, info_span, warn};

use crate::admin::{Readiness, Reason};
use crate::backoff::{self, Backoff};
use crate::config::Config;
use crate::node::Nats;
use crate::telemetry;
use crate::topology::{self, Topology};
use commits::{Append, Commits, Failed, MIN_ATOMIC_BATCH};
use holding::{Holding, Taken};
pub use messages::{MAX_EMOJI_BYTES, MessageRef, check_emoji};
use outcomes::{Answered, Outcomes};
pub use write_model::{
    Accepted, Decision, WriteModel, check_batch, check_body, check_mute_seconds, check_title,
};

/// How long a command waits for this instance's log tail to catch up after a conflict.
const CATCH_UP_TIMEOUT: Duration = Duration::from_secs(5);
/// How often the tail considers a snapshot even when no event arrives.
const SNAPSHOT_CHECK: Duration = Duration::from_secs(1);
/// Longest wait between attempts to set up an intake consumer or the log tail again: short,
/// because on a cluster a stream answers again as soon as its new leader is elected, and
/// an attempt costs one request.
const MAX_SETUP_BACKOFF: Duration = Duration::from_secs(1);
/// Events one pull of the log tail asks for.
const TAIL_BATCH: usize = 500;
/// How long the server keeps a log tail's consumer that nobody pulls from.
const TAIL_INACTIVE_THRESHOLD: Duration = Duration::from_secs(30);
/// Delay before a command that hit a transient failure is redelivered the first time; it
/// doubles with each delivery up to [`MAX_RETRY_DELAY`], so the default five deliveries
/// span 7.5 s: long enough to ride out a cluster electing a stream's leader (4 to 9 s)
/// rather than answer `unavailable` during it.
const RETRY_DELAY: Duration = Duration::from_millis(500);
const MAX_RETRY_DELAY: Duration = Duration::from_secs(4);
pub(crate) const READY_CHECK: &str = "handler";

#[derive(Debug, thiserror::Error)]
pub enum HandlerError {
    #[error("cannot set up the intake consumer: {0}")]
    Consumer(String),
    #[error("cannot tail the event log: {0}")]
    Tail(String),
    #[error("cannot subscribe to outcome queries: {0}")]
    Subscribe(String),
    #[error("event at log sequence {seq} cannot be read: {cause}")]
    Decode { seq: u64, cause: String },
}

/// A failure that says nothing about the command itself; retrying later can succeed.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct Transient(String);

pub struct Handler {
    inner: Arc<Inner>,
}

struct Inner {
    config: Arc<Config>,
    /// This instance's name among the handlers: `handler.instance`, or new at each start.
    instance: String,
    nats: Nats,
    topology: Topology,
    model: Mutex<WriteModel>,
    /// The log tail's position, for waiting until it has caught up with an append.
    position: watch::Sender<u64>,
    readiness: Readiness,
    /// The intake messages taken and not yet answered.
    holding: Arc<Holding>,
}

impl Inner {
    fn model(&self) -> MutexGuard<'_, WriteModel> {
        self.model
            .lock()
            .expect("write model lock is never poisoned")
    }
}

impl Handler {
    pub fn build(
        config: Arc<Config>,
        nats: Nats,
        topology: Topology,
        readiness: Readiness,
    ) -> Handler {
        readiness.not_ready(
            READY_CHECK,
            Reason::CatchingUp,
            "catching up with the event log",
        );
        let model = WriteModel::new(topology.shards, config.handler.remembered_commands);
        let instance = config
            .handler
            .instance
            .clone()
            .unwrap_or_else(|| format!("handler-{}", uuid::Uuid::new_v4().simple()));
        Handler {
            inner: Arc::new(Inner {
                config,
                instance,
                nats,
                topology,
                model: Mutex::new(model),
                position: watch::channel(0).0,
                readiness,
                holding: Arc::default(),
            }),
        }
    }

    /// Tail the log until caught up, then take commands until `shutdown`; commands already
    /// taken are finished before this returns.
    pub async fn run(self, shutdown: CancellationToken) -> Result<(), HandlerError> {
        let inner = self.inner;
        let mut log = inner.topology.log.clone();
        let end_at_start = log
            .info()
            .await
            .map_err(|e| HandlerError::Tail(e.to_string()))?
            .state
            .last_sequence;
        let restored = snapshots::load(
            &inner.topology.js,
            inner.topology.shards,
            inner.config.handler.remembered_commands,
            end_at_start,
        )
        .await;
        if let Some(model) = restored {
            inner.position.send_replace(model.position());
            *inner.model() = model;
        }
        // The tail outlives `shutdown` until the lanes are done: a command they finish may
        // have to wait for the tail to catch up after a conflict.
        let tailing = CancellationToken::new();
        let _stop_tailing = tailing.clone().drop_guard();
        let mut tail = tokio::spawn(tail_log(Arc::clone(&inner), tailing));
        let mut caught_up = inner.position.subscribe();
        // `inner` holds the position's sender, so waiting for it can only end by reaching it.
        let reached = async {
            let _ = caught_up
                .wait_for(|position| *position >= end_at_start)
                .await;
        };
        tokio::select! {
            () = reached => {}
            stopped = &mut tail => return tail_ended(stopped),
            () = shutdown.cancelled() => return Ok(()),
        }
        info!(
            position = end_at_start,
            "write model caught up with the event log"
        );

        let queries = inner
            .nats
            .client
            .queue_subscribe(OUTCOME_QUERY_SUBJECT, HANDLER_QUEUE.into())
            .await
            .map_err(|e| HandlerError::Subscribe(e.to_string()))?;
        let answering = tokio::spawn(answer_queries(
            Arc::clone(&inner),
            queries,
            shutdown.clone(),
        ));

        // An intake this configuration cannot use stops the role here, with the setting
        // named; once running, a missing intake is created again by the partitions' pulls.
        topology::ensure_intake(&inner.topology.js, &inner.config)
            .await
            .map_err(|e| HandlerError::Consumer(e.to_string()))?;

        // The consumers never hand out more than their `max_ack_pending` together, so a lane
        // that can hold them all never blocks the others: a slow shard delays only itself.
        let lane_queue = usize::try_from(
            partitions::max_ack_pending_per_partition(&inner.config) * i64::from(INTAKE_PARTITIONS),
        )
        .unwrap_or(1);
        let (commits, merging) = Commits::start(&inner);
        let (answers, answering_commands) = Outcomes::start(inner.nats.client.clone());
        let (lanes, lane_tasks): (Vec<Lane>, Vec<JoinHandle<()>>) = (0..inner.config.handler.lanes)
            .map(|_| {
                let (tx, rx) = mpsc::channel(lane_queue);
                let lane = run_lane(Arc::clone(&inner), commits.clone(), answers.clone(), rx);
                (tx, tokio::spawn(lane))
            })
            .unzip();
        drop(commits);
        drop(answers);
        let lanes: Arc<[Lane]> = lanes.into();
        // Commands stay held until the last is answered, after `shutdown`.
        let holding = CancellationToken::new();
        let _stop_holding = holding.clone().drop_guard();
        tokio::spawn(Arc::clone(&inner.holding).keep_alive(
            inner.nats.client.clone(),
            Duration::from_secs(inner.config.intake.ack_wait_secs),
            Duration::from_secs(inner.config.intake.max_hold_secs),
            holding,
        ));

        // Pulls start once this instance knows its partitions, at the priority that gives,
        // rather than as a standby everywhere only to change moments later. Should the
        // others' announcements not be readable, it pulls every partition as a standby,
        // which still takes every command no other instance takes.
        let taking = shutdown.child_token();
        // The announcement is withdrawn only once the pulls have finished: until then the
        // others stay standbys, and do not take this instance's partitions alongside it.
        let announcing = CancellationToken::new();
        let (owned, mut owned_rx) = watch::channel(None);
        let following = tokio::spawn(partitions::follow_instances(
            Arc::clone(&inner),
            owned,
            announcing.clone(),
        ));
        tokio::select! {
            known = tokio::time::timeout(partitions::LEASE, owned_rx.wait_for(Option::is_some)) => {
                if known.is_err() {
                    warn!("the other handler instances are not known yet; standing by for every intake partition");
                }
            }
            () = shutdown.cancelled() => {}
        }
        let health = Arc::new(partitions::IntakeHealth::new(inner.readiness.clone()));
        let pulls: Vec<JoinHandle<()>> = (0..INTAKE_PARTITIONS)
            .map(|partition| {
                tokio::spawn(partitions::take_partition(
                    Arc::clone(&inner),
                    partition,
                    owned_rx.clone(),
                    Arc::clone(&lanes),
                    Arc::clone(&health),
                    taking.clone(),
                ))
            })
            .collect();
        drop(lanes);

        // Without its tail the write model goes stale: stop taking commands.
        let failure = tokio::select! {
            () = shutdown.cancelled() => None,
            stopped = &mut tail => Some(tail_ended(stopped)),
        };
        // Closing the lanes lets each finish what it holds; unacknowledged commands that
        // were never taken are redelivered to another instance.
        inner
            .readiness
            .not_ready(READY_CHECK, Reason::ShuttingDown, "shutting down");
        taking.cancel();
        for pull in pulls {
            let _ = pull.await;
        }
        announcing.cancel();
        let _ = following.await;
        for lane in lane_tasks {
            let _ = lane.await;
        }
        // The lanes held the only ways in, so the merging ends once what it holds is appended.
        if let Some(merging) = merging {
            let _ = merging.await;
        }
        // And the answering once every answer the lanes gave is sent.
        let _ = answering_commands.await;
        answering.abort();
        failure.unwrap_or(Ok(()))
    }
}

/// The queue of one lane: commands with the intake message that carried them.
type Lane = mpsc::Sender<(Command, Taken)>;

/// Hand a command from the intake to the lane of its conversation's shard.
async fn dispatch(inner: &Inner, lanes: &[Lane], message: Message) {
    let command = match Command::from_bytes(&message.payload) {
        Ok(command) => command,
        Err(e) => {
            // Only a bug or a foreign publisher writes an unreadable command; redelivering
            // it cannot help.
            error!(error = %e, "unreadable command on the intake; terminating it");
            metrics::counter!(telemetry::HANDLER_COMMANDS_TOTAL, "action" => "unknown", "result" => "unreadable").increment(1);
            let _ = message.ack_with(AckKind::Term).await;
            return;
        }
    };
    let lane = inner.topology.shards.of(command.conversation()) as usize % lanes.len();
    let taken = inner.holding.take(message);
    // A lane ends only when its sender is dropped, at shutdown.
    let _ = lanes[lane].send((command, taken)).await;
}

/// Errors after which pulling from the current consumer cannot resume by itself: the
/// consumer is gone, or the pull request was lost (no heartbeat).
fn pull_lost(error: &pull::MessagesError) -> bool {
    matches!(
        error.kind(),
        pull::MessagesErrorKind::ConsumerDeleted
            | pull::MessagesErrorKind::NoResponders
            | pull::MessagesErrorKind::Pull
            | pull::MessagesErrorKind::MissingHeartbeat
    )
}

/// What the handler reports when its log tail stopped before the handler did.
fn tail_ended(
    stopped: Result<Result<(), HandlerError>, tokio::task::JoinError>,
) -> Result<(), HandlerError> {
    match stopped {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(e),
        Err(e) => Err(HandlerError::Tail(e.to_string())),
    }
}

/// Follow the log from the write model's position, applying every event to the write model
/// and snapshotting it now and then. Only an event that cannot be read ends it (with an
/// error); anything wrong with the consumer is repaired by following the log again from
/// the position reached.
async fn tail_log(inner: Arc<Inner>, shutdown: CancellationToken) -> Result<(), HandlerError> {
    let mut snapshots = Snapshotter {
        taken_at: *inner.position.borrow(),
        saving: Arc::new(AtomicBool::new(false)),
    };
    // Snapshots are also considered on a timer, so one skipped while another was being
    // written is taken even if the log has gone quiet.
    let mut snapshot_check = tokio::time::interval(SNAPSHOT_CHECK);
    let mut backoff = Backoff::new(MAX_SETUP_BACKOFF);
    let mut reconnects = inner.nats.reconnects();
    'consumer: loop {
        let after = *inner.position.borrow();
        let mut messages = match topology::attempt(tail_messages(&inner, after), HandlerError::Tail)
            .await
        {
            Ok(messages) => messages,
            Err(e) => {
                warn!(error = %e, retry_in = ?backoff.delay(), "cannot follow the event log yet");
                if !backoff.wait(&shutdown).await {
                    return Ok(());
                }
                continue;
            }
        };
        backoff = Backoff::new(MAX_SETUP_BACKOFF);
        // The consumer's own count of what it delivered: a message that does not follow
        // the previous one means something was skipped, and only following the log again
        // from the position reached is safe.
        let mut delivered = 0;
        loop {
            let message = tokio::select! {
                () = shutdown.cancelled() => return Ok(()),
                _ = snapshot_check.tick() => {
                    snapshots.consider(&inner);
                    continue;
                }
                // A server restart loses the tail's ephemeral consumer: follow the log again
                // now rather than after two missed heartbeats.
                Ok(()) = reconnects.changed() => continue 'consumer,
                next = messages.next() => match next {
                    Some(Ok(message)) => message,
                    Some(Err(e)) if pull_lost(&e) => {
                        warn!(error = %e, after = *inner.position.borrow(), "the log tail lost its consumer; following the log again");
                        continue 'consumer;
                    }
                    Some(Err(e)) => {
                        warn!(error = %e, "log tail hiccup; continuing");
                        continue;
                    }
                    None => continue 'consumer,
                },
            };
            let Ok(info) = message.info() else {
                continue 'consumer;
            };
            if info.delivered != 1 || info.consumer_sequence != delivered + 1 {
                warn!(
                    expected = delivered + 1,
                    got = info.consumer_sequence,
                    "the log tail skipped a message; following the log again"
                );
                continue 'consumer;
            }
            delivered = info.consumer_sequence;
            let seq = info.stream_sequence;
            let envelope = EventEnvelope::from_bytes(&message.payload).map_err(|e| {
                let error = HandlerError::Decode {
                    seq,
                    cause: e.to_string(),
                };
                inner
                    .readiness
                    .not_ready(READY_CHECK, Reason::Failed, error.to_string());
                error
            })?;
            inner.model().apply(&envelope.recorded(seq), true);
            inner.position.send_replace(seq);
            metrics::gauge!(telemetry::HANDLER_LOG_POSITION).set(seq as f64);
            metrics::counter!(telemetry::HANDLER_TAIL_EVENTS_TOTAL).increment(1);
            snapshots.consider(&inner);
        }
    }
}

/// The log after `after`, through an ephemeral consumer in memory that goes away by itself
/// once nobody pulls from it. Its pull requests carry idle heartbeats like the intake's, so
/// a consumer lost with a server is noticed within seconds.
async fn tail_messages(inner: &Inner, after: u64) -> Result<pull::Stream, HandlerError> {
    let consumer = inner
        .topology
        .log
        .create_consumer(pull::Config {
            deliver_policy: if after == 0 {
                DeliverPolicy::All
            } else {
                DeliverPolicy::ByStartSequence {
                    start_sequence: after + 1,
                }
            },
            ack_policy: AckPolicy::None,
            max_deliver: 1,
            inactive_threshold: TAIL_INACTIVE_THRESHOLD,
            num_replicas: 1,
            memory_storage: true,
            ..Default::default()
        })
        .await
        .map_err(|e| HandlerError::Tail(e.to_string()))?;
    consumer
        .stream()
        .max_messages_per_batch(TAIL_BATCH)
        .expires(topology::PULL_EXPIRES)
        .heartbeat(topology::PULL_HEARTBEAT)
        .messages()
        .await
        .map_err(|e| HandlerError::Tail(e.to_string()))
}

/// Decides when the tail snapshots the write model.
struct Snapshotter {
    /// Tail position of the last snapshot taken (or restored).
    taken_at: u64,
    /// Whether a snapshot is being written; at most one write is in flight.
    saving: Arc<AtomicBool>,
}

impl Snapshotter {
    /// Snapshot in the background if the tail has read `handler.snapshot_every_events`
    /// events since the last one and no write is in flight.
    fn consider(&mut self, inner: &Arc<Inner>) {
        let every = inner.config.handler.snapshot_every_events;
        if every == 0 || self.saving.load(Ordering::Acquire) {
            return;
        }
        let (position, bytes) = {
            let model = inner.model();
            if model.position() < self.taken_at + every {
                return;
            }
            (model.position(), model.snapshot())
        };
        self.taken_at = position;
        self.saving.store(true, Ordering::Release);
        let (js, replicas, saving) = (
            inner.topology.js.clone(),
            inner.config.log.replicas,
            Arc::clone(&self.saving),
        );
        tokio::spawn(async move {
            if let Err(e) = snapshots::save(&js, replicas, bytes).await {
                warn!(error = %e, "cannot store a write-model snapshot; the next one will try again");
            }
            saving.store(false, Ordering::Release);
        });
    }
}

async fn answer_queries(
    inner: Arc<Inner>,
    mut queries: async_nats::Subscriber,
    shutdown: CancellationToken,
) {
    loop {
        let request = tokio::select! {
            () = shutdown.cancelled() => return,
            next = queries.next() => match next { Some(request) => request, None => return },
        };
        let Some(reply) = request.reply else { continue };
        let Ok(query) = serde_json::from_slice::<OutcomeQuery>(&request.payload) else {
            debug!("unreadable outcome query");
            continue;
        };
        let decision = match decide(&inner, &query.command).await {
            Ok(decision) => decision,
            Err(Transient(cause)) => {
                debug!(%cause, "cannot answer an outcome query now");
                continue;
            }
        };
        let result = match decision {
            Decision::Known(accepted) => Some(accepted.into()),
            Decision::Reject { code, message } => Some(OutcomeResult::Rejected { code, message }),
            Decision::Append { .. } => None,
        };
        // An empty reply means "not known yet": the command may still be queued.
        let payload = result
            .map(|result| {
                Outcome {
                    command: query.command.id,
                    result,
                }
                .to_bytes()
            })
            .unwrap_or_default();
        if let Err(e) = inner.nats.client.publish(reply, payload.into()).await {
            debug!(error = %e, "cannot answer an outcome query");
        }
    }
}

fn action_name(command: &Command) -> &'static str {
    match command.action {
        parley_events::Action::CreateDirect { .. } => "create_direct",
        parley_events::Action::CreateGroup { .. } => "create_group",
        parley_events::Action::PostMessage { .. } => "post_message",
        parley_events::Action::MarkRead { .. } => "mark_read",
        parley_events::Action::AddMembers { .. } => "add_members",
        parley_events::Action::RemoveMembers { .. } => "remove_members",
        parley_events::Action::Leave { .. } => "leave",
        parley_events::Action::SetRole { .. } => "set_role",
        parley_events::Action::Rename { .. } => "rename",
        parley_events::Action::Mute { .. } => "mute",
        parley_events::Action::Unmute { .. } => "unmute",
        parley_events::Action::EditMessage { .. } => "edit_message",
        parley_events::Action::DeleteMessage { .. } => "delete_message",
        parley_events::Action::React { .. } => "react",
        parley_events::Action::Unreact { .. } => "unreact",
    }
}

async fn run_lane(
    inner: Arc<Inner>,
    commits: Commits,
    outcomes: Outcomes,
    mut rx: mpsc::Receiver<(Command, Taken)>,
) {
    let max_batch = inner.config.handler.max_batch;
    // Commands held back because their conversation already had one in the batch being
    // formed; they open the next batch, in the order they came.
    let mut held = VecDeque::new();
    loop {
        if held.is_empty() {
            match rx.recv().await {
                Some(taken) => held.push_back(taken),
                None => return,
            }
        }
        // At most one command per conversation, so every event's `prev` is known from the
        // write model before the batch is sent.
        let mut batch = Vec::new();
        let mut conversations = HashSet::new();
        let mut later = VecDeque::new();
        let mut earlier = std::mem::take(&mut held);
        while batch.len() < max_batch {
            let Some(taken) = earlier.pop_front().or_else(|| rx.try_recv().ok()) else {
                break;
            };
            if conversations.insert(taken.0.conversation()) {
                batch.push(taken);
            } else {
                later.push_back(taken);
            }
        }
        // A conversation's commands held back stay ahead of its later ones.
        later.extend(earlier);
        held = later;
        handle_commands(&inner, &commits, &outcomes, batch).await;
    }
}

/// How long a command that failed on its `delivered`-th delivery waits for the next.
fn retry_delay(delivered: i64) -> Duration {
    let retry = u32::try_from(delivered.saturating_sub(1).max(0)).unwrap_or(u32::MAX);
    backoff::doubled(RETRY_DELAY, MAX_RETRY_DELAY, retry)
}

/// Execute a lane's batch, then answer and acknowledge each command on its own.
async fn handle_commands(
    inner: &Inner,
    commits: &Commits,
    outcomes: &Outcomes,
    batch: Vec<(Command, Taken)>,
) {
    let started = Instant::now();
    let commands: Vec<&Command> = batch.iter().map(|(command, _)| command).collect();
    // Each command's span continues the trace its gateway started; its event carries the
    // span's context on to the projector.
    let spans: Vec<(tracing::Span, i64)> = batch
        .iter()
        .map(|(command, message)| {
            let delivered = message.info().map(|info| info.delivered).unwrap_or(1);
            let span = info_span!(
                "command",
                otel.name = "handler command",
                command = %command.id,
                action = action_name(command),
                delivered
            );
            crate::traces::continue_trace(&span, message.headers.as_ref());
            (span, delivered)
        })
        .collect();
    let traces: Vec<async_nats::HeaderMap> = spans
        .iter()
        .map(|(span, _)| crate::traces::context_headers(span))
        .collect();
    let results = execute(inner, commits, &commands, &traces).await;
    for (((command, message), result), (span, delivered)) in
        batch.into_iter().zip(results).zip(spans)
    {
        answer(
            inner, outcomes, command, message, delivered, result, started,
        )
        .instrument(span)
        .await;
    }
}

async fn answer(
    inner: &Inner,
    outcomes: &Outcomes,
    command: Command,
    message: Taken,
    delivered: i64,
    executed: Result<OutcomeResult, Transient>,
    started: Instant,
) {
    let action = action_name(&command);
    let (result, ack) = match executed {
        Ok(result) => (result, AckKind::Ack),
        Err(Transient(cause)) if delivered < inner.config.intake.max_deliver => {
            warn!(%cause, "command failed for now; it will be redelivered");
            metrics::counter!(telemetry::HANDLER_COMMANDS_TOTAL, "action" => action, "result" => "retry").increment(1);
            let _ = message
                .ack_with(AckKind::Nak(Some(retry_delay(delivered))))
                .await;
            return;
        }
        Err(Transient(cause)) => {
            error!(%cause, "command failed on its last delivery; giving up");
            let rejected = OutcomeResult::Rejected {
                code: ErrorCode::Unavailable,
                message: "the command could not be processed; retry with the same id".into(),
            };
            (rejected, AckKind::Term)
        }
    };
    let label = match &result {
        OutcomeResult::Accepted { .. } => "accepted",
        OutcomeResult::Rejected { code, .. } if code.retryable() => "failed",
        OutcomeResult::Rejected { .. } => "rejected",
    };
    metrics::counter!(telemetry::HANDLER_COMMANDS_TOTAL, "action" => action, "result" => label)
        .increment(1);
    metrics::histogram!(telemetry::HANDLER_COMMAND_SECONDS).record(started.elapsed().as_secs_f64());
    let outcome = Outcome {
        command: command.id,
        result,
    };
    let reply_to = if command.reply_to.starts_with(OUTCOME_SUBJECT_PREFIX) {
        Some(command.reply_to)
    } else {
        warn!(reply_to = %command.reply_to, "command names no gateway outcome subject; outcome not sent");
        None
    };
    outcomes.send(Answered {
        reply_to,
        outcome,
        message,
        ack,
    });
}

/// Decide, append, retry on conflict: the outcome of each of `commands` (at most one per
/// conversation), or a transient failure. The events decided together are appended with one
/// commit, as one atomic batch, which may carry other lanes' events too; when too few are
/// decided together for a batch to pay, they are appended one at a time (and merged with
/// other lanes' when enough wait); after a batch fails, one at a time and alone, where a
/// conflict or a duplicate concerns exactly one command.
async fn execute(
    inner: &Inner,
    commits: &Commits,
    commands: &[&Command],
    traces: &[async_nats::HeaderMap],
) -> Vec<Result<OutcomeResult, Transient>> {
    let mut results: Vec<Option<Result<OutcomeResult, Transient>>> =
        commands.iter().map(|_| None).collect();
    // A log entry never changes: the messages the commands refer to are read once, whatever
    // the conflicts to retry.
    let targets = futures::future::join_all(commands.iter().map(|c| read_target(inner, c))).await;
    let mut targets: Vec<Option<MessageRef>> = targets
        .into_iter()
        .enumerate()
        .map(|(index, target)| {
            target
                .map_err(|e| results[index] = Some(Err(e)))
                .unwrap_or_default()
        })
        .collect();
    let mut waiting: Vec<usize> = (0..commands.len())
        .filter(|index| results[*index].is_none())
        .collect();
    let mut conflicts = vec![0; commands.len()];
    let mut alone = false;
    // Once a batch holding them was refused, this lane's events are appended on their own,
    // not merged with other lanes' again.
    let mut refused = false;
    while !waiting.is_empty() {
        let mut appends = Vec::new();
        let mut undecided = Vec::new();
        {
            let model = inner.model();
            for index in waiting {
                if alone && !appends.is_empty() {
                    undecided.push(index);
                    continue;
                }
                if conflicts[index] > inner.config.handler.append_retries {
                    results[index] = Some(Err(Transient("too many conflicting appends".into())));
                    continue;
                }
                let decision = model.decide_with(
                    commands[index],
                    &inner.config.limits,
                    targets[index].as_ref(),
                );
                match decision {
                    Decision::Known(accepted) => results[index] = Some(Ok(accepted.into())),
                    Decision::Reject { code, message } => {
                        results[index] = Some(Ok(OutcomeResult::Rejected { code, message }))
                    }
                    Decision::Append {
                        event,
                        shard,
                        expected_shard_seq,
                    } => appends.push(Append {
                        index,
                        event,
                        shard,
                        expected_shard_seq,
                        trace: traces[index].clone(),
                    }),
                }
            }
        }
        if appends.len() < MIN_ATOMIC_BATCH {
            alone = true;
        }
        if alone && appends.len() > 1 {
            undecided.extend(appends.drain(1..).map(|append| append.index));
        }
        waiting = undecided;
        if appends.is_empty() {
            continue;
        }
        let indices: Vec<usize> = appends.iter().map(|append| append.index).collect();
        let (appends, appended) = commits.append(inner, appends, refused).await;
        let indices = indices.into_iter();
        match appended {
            Ok(seqs) => {
                for (append, seq) in appends.into_iter().zip(seqs) {
                    let recorded = append.event.recorded(seq);
                    inner.model().apply(&recorded, false);
                    publish_live(inner, &recorded).await;
                    results[append.index] = Some(Ok(Accepted {
                        conversation: recorded.envelope.conversation,
                        seq,
                        event: recorded.envelope.id,
                    }
                    .into()));
                    targets[append.index] = None;
                }
            }
            // The commands are decided again once the write model holds what they met.
            Err(Failed::Behind(seq)) => {
                if let Err(e) = wait_for_tail(inner, seq).await {
                    let cause = e.0;
                    indices.for_each(|index| results[index] = Some(Err(Transient(cause.clone()))));
                    continue;
                }
                for index in indices {
                    conflicts[index] += 1;
                    waiting.push(index);
                }
            }
            Err(Failed::Batch(cause)) => {
                debug!(%cause, events = indices.len(), "atomic batch refused; appending its events one at a time");
                alone = true;
                refused = true;
                waiting.extend(indices);
            }
            Err(Failed::Transient(cause)) => {
                indices.for_each(|index| results[index] = Some(Err(Transient(cause.clone()))))
            }
        }
    }
    results
        .into_iter()
        .map(|result| result.expect("every command is decided or failed"))
        .collect()
}

/// The write model's decision on `command`, with the message it refers to read from the
/// log first.
async fn decide(inner: &Inner, command: &Command) -> Result<Decision, Transient> {
    let target = read_target(inner, command).await?;
    Ok(inner
        .model()
        .decide_with(command, &inner.config.limits, target.as_ref()))
}

/// The message `command` refers to, read from the log outside the model's lock (a read is
/// a round trip); `None` when it refers to none, or to no message of its conversation.
async fn read_target(inner: &Inner, command: &Command) -> Result<Option<MessageRef>, Transient> {
    match command.target_message() {
        Some(seq) => target_message(inner, command, seq).await,
        None => Ok(None),
    }
}

/// The message of the command's conversation at `seq`, as the log holds it; `None` when the
/// log holds no message of that conversation there.
async fn target_message(
    inner: &Inner,
    command: &Command,
    seq: u64,
) -> Result<Option<MessageRef>, Transient> {
    if seq == 0 {
        return Ok(None);
    }
    let log = &inner.topology.log;
    // A direct get may be answered by a replica that has not stored `seq` yet; "not found"
    // is only believed from the stream's leader.
    let payload = match log.direct_get(seq).await {
        Ok(message) => message.payload,
        Err(e) if e.kind() == DirectGetErrorKind::NotFound => {
            match log.get_raw_message(seq).await {
                Ok(message) => message.payload,
                Err(e) if e.kind() == RawMessageErrorKind::NoMessageFound => return Ok(None),
                Err(e) => return Err(Transient(format!("cannot read message {seq}: {e}"))),
            }
        }
        Err(e) => return Err(Transient(format!("cannot read message {seq}: {e}"))),
    };
    Ok(EventEnvelope::from_bytes(&payload)
        .ok()
        .and_then(|envelope| MessageRef::of(&envelope, seq, command.conversation())))
}

async fn wait_for_tail(inner: &Inner, seq: u64) -> Result<(), Transient> {
    let mut position = inner.position.subscribe();
    match tokio::time::timeout(CATCH_UP_TIMEOUT, position.wait_for(|p| *p >= seq)).await {
        Ok(Ok(_)) => Ok(()),
        _ => Err(Transient(format!(
            "log tail did not reach sequence {seq} in time"
        ))),
    }
}

/// The live copy: best effort, at most once. Readers that miss it see a gap in `prev` on the
/// next event and fill it from the log.
async fn publish_live(inner: &Inner, recorded: &RecordedEvent) {
    let payload: bytes::Bytes = recorded.to_bytes().into();
    let conversation = live_subject(recorded.envelope.conversation);
    if let Err(e) = inner
        .nats
        .client
        .publish(conversation, payload.clone())
        .await
    {
        debug!(error = %e, "live publish failed");
    }
    // Gateways learn here of conversations their sockets' users joined: by creation, or by
    // being added.
    if !recorded.envelope.event.joining().is_empty()
        && let Err(e) = inner
            .nats
            .client
            .publish(LIVE_MEMBERSHIP_SUBJECT, payload)
            .await
    {
        debug!(error = %e, "live membership publish failed");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redelivery_delays_double_up_to_the_maximum() {
        let delays: Vec<_> = (1..=6).map(retry_delay).collect();
        assert_eq!(
            delays,
            [500, 1000, 2000, 4000, 4000, 4000].map(Duration::from_millis)
        );
        // Five deliveries (the default) span more than a cluster's longest election.
        let spanned: Duration = (1..5).map(retry_delay).sum();
        assert_eq!(spanned, Duration::from_millis(7500));
        assert_eq!(retry_delay(0), RETRY_DELAY);
        assert_eq!(retry_delay(i64::MAX), MAX_RETRY_DELAY);
    }
}
