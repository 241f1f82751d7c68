//! Commands from sockets: publish to the intake, follow each until its outcome is known,
//! answer the client with `ack` or `error`.
//!
//! Three rules make the answers ones a client can rely on:
//!
//! - **Per-sender order.** A socket's commands to one conversation form a line
//!   ([`Sequencer`]): a command is published only once the one before it has its outcome
//!   (appended, or rejected for good). So they reach the log in the order the socket sent
//!   them, whatever the number of handler instances, and a redelivered command can never be
//!   overtaken by a later one. Commands to different conversations do not wait for each
//!   other.
//! - **Late outcomes still arrive.** `timeout` (after `gateway.command_timeout_secs`) tells
//!   the client that the outcome is not known yet, not that the command failed: the gateway
//!   keeps following it for [`Config::outcome_wait`](crate::config::Config::outcome_wait)
//!   and sends its `ack` (or `error`) on the same socket when it learns it.
//! - **Nothing waits on what a server restart lost.** A command is published again under the
//!   same id when the NATS client reconnects and every command timeout while its outcome is
//!   missing: the intake dedupes a copy it still holds, a memory intake that lost it queues
//!   it again, and handlers answer a command they already applied from their write model.
//!
//! The intake dedupes by command id. When a publish comes back as a duplicate, the original
//! may have been sent from another socket or gateway, so its outcome may never arrive here:
//! the gateway asks the handlers what became of the command, and queues a fresh copy when
//! they do not know.

use std::collections::HashMap;
use std::pin::pin;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::context::{PublishError, PublishErrorKind};
use async_nats::jetstream::message::PublishMessage;
use async_nats::jetstream::publish::PublishAck;
use futures::future::OptionFuture;
use parley_events::command::OutcomeQuery;
use parley_events::protocol::{ClientFrame, ServerFrame};
use parley_events::subjects::{OUTCOME_BATCHES_HEADER, OUTCOME_QUERY_SUBJECT};
use parley_events::{
    Action, ClientMsgId, Command, CommandId, ConversationId, ErrorCode, Fingerprint, Outcome,
    OutcomeResult,
};
use tokio::sync::{OwnedSemaphorePermit, watch};
use tokio::time::Instant;
use tracing::{debug, info, warn};

use super::Shared;
use super::delivery::Outbox;
use crate::admin::Reason;
use crate::backoff::Backoff;
use crate::config::LimitsConfig;
use crate::handler::{check_batch, check_body, check_emoji, check_mute_seconds, check_title};
use crate::{telemetry, topology};

/// How long a publish to the intake is retried before the client is told `unavailable`:
/// long enough to ride out the intake being created again after a server restart.
const PUBLISH_RETRY_WINDOW: Duration = Duration::from_secs(3);
const FIRST_PUBLISH_RETRY: Duration = Duration::from_millis(25);
const MAX_PUBLISH_RETRY: Duration = Duration::from_millis(250);
/// How soon a command whose publish got no acknowledgement is published again.
const UNCERTAIN_RESUBMIT: Duration = Duration::from_millis(500);

/// A command waiting for its outcome: what it asked for, and where its outcome goes.
struct Waiting {
    fingerprint: Fingerprint,
    outcome: watch::Sender<Option<OutcomeResult>>,
}

/// Commands waiting for their outcome, by id. Several sockets (a user's devices retrying
/// the same send) may wait on one command.
#[derive(Default)]
pub struct Pending {
    waiting: Mutex<HashMap<CommandId, Waiting>>,
}

/// How a command joins [`Pending`].
enum Watch {
    /// The first to wait for it: this caller publishes it.
    First(watch::Receiver<Option<OutcomeResult>>),
    /// The same request is already in flight: its outcome is this one's too.
    Joined(watch::Receiver<Option<OutcomeResult>>),
    /// A different request with the same id is in flight.
    Reused,
}

impl Pending {
    fn waiting(&self) -> std::sync::MutexGuard<'_, HashMap<CommandId, Waiting>> {
        self.waiting.lock().expect("pending lock is never poisoned")
    }

    fn watch(&self, command: &Command) -> Watch {
        let fingerprint = command.fingerprint();
        let mut waiting = self.waiting();
        match waiting.get(&command.id) {
            Some(first) if first.fingerprint == fingerprint => {
                Watch::Joined(first.outcome.subscribe())
            }
            Some(_) => Watch::Reused,
            None => {
                let (outcome, receiver) = watch::channel(None);
                waiting.insert(
                    command.id,
                    Waiting {
                        fingerprint,
                        outcome,
                    },
                );
                Watch::First(receiver)
            }
        }
    }

    pub fn resolve(&self, outcome: Outcome) {
        if let Some(waiting) = self.waiting().remove(&outcome.command) {
            waiting.outcome.send_replace(Some(outcome.result));
        }
    }

    fn forget(&self, command: CommandId) {
        self.waiting().remove(&command);
    }
}

/// One socket's lines of commands, one line per conversation.
#[derive(Default)]
pub struct Sequencer {
    /// Per conversation, the settlement of the newest command in its line.
    newest: HashMap<ConversationId, watch::Receiver<bool>>,
}

/// Held while a command is followed; dropping it (however the command ends) lets the next
/// command of its line go.
pub struct Settled(watch::Sender<bool>);

impl Drop for Settled {
    fn drop(&mut self) {
        self.0.send_replace(true);
    }
}

/// Where a command stands in its line: what it waits for, and what it releases.
pub struct Place {
    after: Option<watch::Receiver<bool>>,
    settled: Settled,
}

impl Sequencer {
    /// Join the end of `conversation`'s line.
    pub fn join(&mut self, conversation: ConversationId) -> Place {
        // Lines whose newest command has settled are empty; forgetting them keeps the map
        // as small as the socket's commands in flight.
        self.newest.retain(|_, settled| !*settled.borrow());
        let (settled, newest) = watch::channel(false);
        Place {
            after: self.newest.insert(conversation, newest),
            settled: Settled(settled),
        }
    }
}

/// What the handler would refuse `action` for anyway, refused at the edge to save the round
/// trip: a bad body or emoji, a batch of members too large, a bad title or mute length, a
/// reference to sequence 0, a reply on a socket whose protocol has none.
pub fn check_at_edge(
    action: &Action,
    protocol: u32,
    limits: &LimitsConfig,
) -> Result<(), (ErrorCode, String)> {
    match action {
        // Version 1's `send` has no such field, and refused unknown fields as bad frames.
        Action::PostMessage {
            reply_to: Some(_), ..
        } if protocol < 2 => Err((
            ErrorCode::BadFrame,
            "invalid send frame: `reply_to` needs protocol version 2; ask for it at the upgrade"
                .to_owned(),
        )),
        Action::PostMessage { body, .. } | Action::EditMessage { body, .. } => {
            check_body(body, limits)
        }
        Action::React { emoji, .. } | Action::Unreact { emoji, .. } => check_emoji(emoji),
        Action::AddMembers { users, .. } | Action::RemoveMembers { users, .. } => {
            check_batch(users, limits)
        }
        Action::Rename {
            title: Some(title), ..
        } => check_title(title, limits),
        Action::Mute { seconds, .. } => check_mute_seconds(*seconds),
        _ => Ok(()),
    }?;
    match Command::target_of(action) {
        Some(0) => Err((
            ErrorCode::MessageNotFound,
            "messages are numbered from 1".to_owned(),
        )),
        _ => Ok(()),
    }
}

/// Follow `command` from its place in line to its outcome, answering on `outbox`. The
/// `permit` (one of the socket's commands in flight) is held until the outcome is known.
///
/// The command's id is claimed now, not when the returned future first runs: of two
/// different requests under one id, the one the socket read first goes ahead and the other
/// is refused, whichever line each waits in and whichever task the runtime polls first.
pub fn follow(
    shared: Arc<Shared>,
    outbox: Outbox,
    command: Command,
    place: Place,
    permit: OwnedSemaphorePermit,
) -> impl Future<Output = ()> + Send + 'static {
    let watch = shared.pending.watch(&command);
    run(shared, outbox, command, watch, place, permit)
}

async fn run(
    shared: Arc<Shared>,
    outbox: Outbox,
    command: Command,
    watch: Watch,
    place: Place,
    permit: OwnedSemaphorePermit,
) {
    let Place { after, settled } = place;
    if let Some(mut before) = after {
        // An error means the previous command's task is gone, which settles it too.
        let _ = before.wait_for(|settled| *settled).await;
    }
    let started = Instant::now();
    let (mut outcome, first) = match watch {
        Watch::First(outcome) => (outcome, true),
        Watch::Joined(outcome) => (outcome, false),
        Watch::Reused => {
            answer(&outbox, &command, started, id_reused(&command)).await;
            return;
        }
    };
    let mut reconnects = shared.nats.reconnects();
    // A publish runs beside the timers: one that waits out NATS's answer (up to the
    // JetStream timeout, then its retries) holds back neither the `timeout` answer nor an
    // outcome that arrives meanwhile.
    let mut submission = pin!(first.then(|| submit(&shared, &command)));
    let mut next_submit = None;
    // Armed once, not in each round of the loop: a command goes round it at least twice
    // (its publish's answer, then its outcome).
    let mut answer_by = pin!(tokio::time::sleep_until(
        started + shared.config.command_timeout()
    ));
    let mut give_up = pin!(tokio::time::sleep_until(
        started + shared.config.outcome_wait()
    ));
    let mut timed_out = false;
    let result = loop {
        tokio::select! {
            // An error means the first waiter gave up and forgot the command.
            result = async { outcome.wait_for(Option::is_some).await.ok().and_then(|r| r.clone()) } => {
                break result;
            }
            () = answer_by.as_mut(), if !timed_out => {
                timed_out = true;
                answer(&outbox, &command, started, timeout_result()).await;
            }
            Some(submitted) = OptionFuture::from(submission.as_mut().as_pin_mut()) => {
                submission.set(None);
                next_submit = submitted.next_attempt(&shared);
            }
            // A publish still waiting for an answer on the lost connection is dropped: the
            // intake dedupes whichever copy got in.
            Ok(()) = reconnects.changed(), if first => {
                metrics::counter!(telemetry::GATEWAY_COMMANDS_RESUBMITTED_TOTAL, "trigger" => "reconnect").increment(1);
                next_submit = None;
                submission.set(Some(submit(&shared, &command)));
            }
            () = sleep_until_some(next_submit) => {
                metrics::counter!(telemetry::GATEWAY_COMMANDS_RESUBMITTED_TOTAL, "trigger" => "interval").increment(1);
                next_submit = None;
                submission.set(Some(submit(&shared, &command)));
            }
            () = give_up.as_mut() => {
                if first {
                    shared.pending.forget(command.id);
                }
                warn!(command = %command.id, "no outcome while the handlers could still have tried it; no longer following it");
                break None;
            }
        }
    };
    match result {
        Some(result) => {
            if timed_out {
                metrics::counter!(telemetry::GATEWAY_LATE_OUTCOMES_TOTAL).increment(1);
            }
            answer(&outbox, &command, started, result).await;
        }
        None if !timed_out => answer(&outbox, &command, started, timeout_result()).await,
        None => {}
    }
    drop(settled);
    drop(permit);
}

/// A command frame's type name, request id and command ([`check_at_edge`] checks it);
/// any other frame back, for the gateway to answer itself.
pub fn command_of(frame: ClientFrame) -> Result<(&'static str, ClientMsgId, Action), ClientFrame> {
    Ok(match frame {
        ClientFrame::Send {
            id,
            conversation,
            body,
            reply_to,
        } => (
            "send",
            id,
            Action::PostMessage {
                conversation,
                body,
                reply_to,
            },
        ),
        ClientFrame::Edit {
            id,
            conversation,
            message,
            body,
        } => (
            "edit",
            id,
            Action::EditMessage {
                conversation,
                message,
                body,
            },
        ),
        ClientFrame::Delete {
            id,
            conversation,
            message,
        } => (
            "delete",
            id,
            Action::DeleteMessage {
                conversation,
                message,
            },
        ),
        ClientFrame::React {
            id,
            conversation,
            message,
            emoji,
        } => (
            "react",
            id,
            Action::React {
                conversation,
                message,
                emoji,
            },
        ),
        ClientFrame::Unreact {
            id,
            conversation,
            message,
            emoji,
        } => (
            "unreact",
            id,
            Action::Unreact {
                conversation,
                message,
                emoji,
            },
        ),
        ClientFrame::CreateDirect { id, peer } => {
            ("create_direct", id, Action::CreateDirect { peer })
        }
        ClientFrame::CreateGroup { id, title, members } => {
            ("create_group", id, Action::CreateGroup { title, members })
        }
        ClientFrame::MarkRead {
            id,
            conversation,
            seq,
        } => ("mark_read", id, Action::MarkRead { conversation, seq }),
        ClientFrame::AddMembers {
            id,
            conversation,
            users,
        } => (
            "add_members",
            id,
            Action::AddMembers {
                conversation,
                users,
            },
        ),
        ClientFrame::RemoveMembers {
            id,
            conversation,
            users,
        } => (
            "remove_members",
            id,
            Action::RemoveMembers {
                conversation,
                users,
            },
        ),
        ClientFrame::Leave { id, conversation } => ("leave", id, Action::Leave { conversation }),
        ClientFrame::SetRole {
            id,
            conversation,
            user,
            role,
        } => (
            "set_role",
            id,
            Action::SetRole {
                conversation,
                user,
                role,
            },
        ),
        ClientFrame::Rename {
            id,
            conversation,
            title,
        } => (
            "rename",
            id,
            Action::Rename {
                conversation,
                title,
            },
        ),
        ClientFrame::Mute {
            id,
            conversation,
            user,
            seconds,
        } => (
            "mute",
            id,
            Action::Mute {
                conversation,
                user,
                seconds,
            },
        ),
        ClientFrame::Unmute {
            id,
            conversation,
            user,
        } => ("unmute", id, Action::Unmute { conversation, user }),
        other => return Err(other),
    })
}

fn id_reused(command: &Command) -> OutcomeResult {
    OutcomeResult::Rejected {
        code: ErrorCode::IdReused,
        message: format!(
            "id {:?} is in use by a different request; send this one with a fresh id",
            command.client_id.as_str()
        ),
    }
}

fn timeout_result() -> OutcomeResult {
    OutcomeResult::Rejected {
        code: ErrorCode::Timeout,
        message: "no outcome yet; the command may still take effect: its ack follows on this \
                  socket if it does, and a retry with the same id is always safe"
            .into(),
    }
}

/// Send the client the `ack` or `error` for `command`.
async fn answer(outbox: &Outbox, command: &Command, started: Instant, result: OutcomeResult) {
    let (frame, label) = match result {
        OutcomeResult::Accepted {
            conversation,
            seq,
            event,
        } => (
            ServerFrame::Ack {
                id: command.client_id.clone(),
                conversation,
                seq,
                event,
            },
            "accepted",
        ),
        OutcomeResult::Rejected { code, message } => (
            ServerFrame::error(Some(command.client_id.clone()), code, message),
            code.as_str(),
        ),
    };
    metrics::histogram!(telemetry::GATEWAY_COMMAND_SECONDS).record(started.elapsed().as_secs_f64());
    metrics::counter!(telemetry::GATEWAY_COMMAND_OUTCOMES_TOTAL, "outcome" => label).increment(1);
    outbox.answer(&frame).await;
}

fn unavailable(command: CommandId) -> Outcome {
    Outcome {
        command,
        result: OutcomeResult::Rejected {
            code: ErrorCode::Unavailable,
            message: "the service is temporarily unavailable; retry with the same id".into(),
        },
    }
}

/// Where a publish left a command.
enum Submitted {
    /// The intake acknowledged it (or already held it).
    InIntake,
    /// The intake refused it; its waiters were told `unavailable`.
    Refused,
    /// No acknowledgement came: it may or may not be in the intake.
    Unknown,
}

impl Submitted {
    /// When to publish the command again while its outcome is missing: soon when nobody
    /// knows whether the intake has it (a stream electing a new leader does not answer for
    /// seconds), else once a command timeout; never when it was refused.
    fn next_attempt(self, shared: &Shared) -> Option<Instant> {
        match self {
            Submitted::InIntake => Some(Instant::now() + shared.config.command_timeout()),
            Submitted::Unknown => Some(Instant::now() + UNCERTAIN_RESUBMIT),
            Submitted::Refused => None,
        }
    }
}

/// Sleep until `at`, or forever when there is no such time.
async fn sleep_until_some(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Publish `command` to the intake under its id, retrying for [`PUBLISH_RETRY_WINDOW`]
/// while the intake is missing (a server restart lost it: the gateway creates it again
/// itself) or NATS does not answer. When it cannot get in, its waiters get `unavailable`;
/// when it may have got in (the acknowledgement was lost), it stays followed.
async fn submit(shared: &Arc<Shared>, command: &Command) -> Submitted {
    let deadline = Instant::now() + PUBLISH_RETRY_WINDOW;
    let mut backoff = Backoff::starting_at(FIRST_PUBLISH_RETRY, MAX_PUBLISH_RETRY);
    loop {
        let error = match to_intake(shared, command, command.id.to_string()).await {
            Ok(ack) => {
                // Readiness changes only when the intake comes back, not on every publish.
                if shared.intake_missing.swap(false, Ordering::AcqRel) {
                    shared.readiness.ready(super::READY_CHECK);
                }
                if ack.duplicate {
                    tokio::spawn(resolve_duplicate(Arc::clone(shared), command.clone()));
                }
                return Submitted::InIntake;
            }
            Err(error) => error,
        };
        let kind = match error.kind() {
            PublishErrorKind::StreamNotFound => {
                // Missing (a single server's restart lost it) or, on a cluster, without a
                // leader for the moment; creating it is a no-op in the second case.
                if !shared.intake_missing.swap(true, Ordering::AcqRel) {
                    shared.readiness.not_ready(
                        super::READY_CHECK,
                        Reason::NoIntake,
                        "no intake stream answers",
                    );
                }
                ensure_intake_in_background(shared);
                "stream_not_found"
            }
            PublishErrorKind::TimedOut => "timed_out",
            _ => "other",
        };
        metrics::counter!(telemetry::GATEWAY_INTAKE_PUBLISH_RETRIES_TOTAL, "kind" => kind)
            .increment(1);
        if Instant::now() + backoff.delay() > deadline || !backoff.wait(&shared.shutdown).await {
            warn!(command = %command.id, cause = %error, "cannot publish a command to the intake");
            // A lost acknowledgement may hide a command that did get in: keep following it.
            if error.kind() == PublishErrorKind::TimedOut {
                return Submitted::Unknown;
            }
            shared.pending.resolve(unavailable(command.id));
            return Submitted::Refused;
        }
    }
}

/// Create the intake if it is missing, beside the publishes that keep retrying: while a
/// cluster elects the intake's leader the request waits out its timeout, and publishes
/// must not wait with it. One attempt at a time per gateway.
fn ensure_intake_in_background(shared: &Arc<Shared>) {
    if shared.ensuring_intake.swap(true, Ordering::AcqRel) {
        return;
    }
    let shared = Arc::clone(shared);
    tokio::spawn(async move {
        let ensured = topology::attempt(
            topology::ensure_intake(&shared.topology.js, &shared.config),
            |cause| topology::TopologyError::Unavailable {
                stream: parley_events::subjects::INTAKE_STREAM,
                cause,
            },
        )
        .await;
        match ensured {
            Ok(_) => info!("the intake stream answers again (created if it was missing)"),
            Err(e) => debug!(error = %e, "the intake stream does not answer yet"),
        }
        shared.ensuring_intake.store(false, Ordering::Release);
    });
}

/// Publish `command` to the intake under `message_id`, the intake's dedupe key, and wait
/// for the intake's acknowledgement.
async fn to_intake(
    shared: &Shared,
    command: &Command,
    message_id: String,
) -> Result<PublishAck, PublishError> {
    let mut headers = crate::traces::context_headers(&tracing::Span::current());
    headers.insert(OUTCOME_BATCHES_HEADER, "1");
    let message = PublishMessage::build()
        .payload(command.to_bytes().into())
        .headers(headers)
        .message_id(message_id);
    shared
        .topology
        .js
        .send_publish(
            shared
                .topology
                .shards
                .intake_subject(command.conversation()),
            message,
        )
        .await?
        .await
}

/// The intake had already seen `command`. Ask the handlers what became of it; if they do
/// not know it (it is still queued, or it was rejected before and would pass now), queue a
/// fresh copy under a new intake id. That is safe: handlers answer a command they have
/// already applied from their write model, so it never appends twice, and the answer comes
/// back to this gateway.
async fn resolve_duplicate(shared: Arc<Shared>, command: Command) {
    let query: bytes::Bytes = serde_json::to_vec(&OutcomeQuery {
        command: command.clone(),
    })
    .expect("a query always serializes")
    .into();
    match shared
        .nats
        .client
        .request(OUTCOME_QUERY_SUBJECT, query)
        .await
    {
        Ok(reply) if !reply.payload.is_empty() => match Outcome::from_bytes(&reply.payload) {
            Ok(outcome) => return shared.pending.resolve(outcome),
            Err(e) => warn!(error = %e, "unreadable outcome from a handler"),
        },
        Ok(_) => {}
        Err(e) => debug!(error = %e, "outcome query failed"),
    }
    let retry_id = format!("{}:{}", command.id, command.issued_at);
    if let Err(cause) = to_intake(&shared, &command, retry_id).await {
        // The original may still be queued, so the command is not settled: the next
        // resubmission asks again.
        warn!(command = %command.id, %cause, "cannot queue a repeated command");
    }
}
