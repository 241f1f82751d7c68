//! Commands from sockets: publish to the intake, wait for the handler's outcome, answer the
//! client with `ack` or `error`.
//!
//! The intake dedupes by command id. When a publish comes back as a duplicate, the original
//! may have been sent from another socket or gateway, so its outcome may never arrive here:
//! the gateway asks the handlers what became of the command, and queues a fresh copy when
//! they do not know.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use async_nats::jetstream::context::PublishAckFuture;
use async_nats::jetstream::message::PublishMessage;
use parley_events::command::OutcomeQuery;
use parley_events::protocol::ServerFrame;
use parley_events::subjects::{INTAKE_SUBJECT, OUTCOME_QUERY_SUBJECT};
use parley_events::{Command, CommandId, ErrorCode, Outcome, OutcomeResult};
use tokio::sync::watch;
use tracing::{debug, warn};

use super::Shared;
use super::delivery::Outbox;
use crate::telemetry;

/// Commands waiting for their outcome, by id. Several sockets (a user's devices retrying
/// the same send) may wait on one command.
#[derive(Default)]
pub struct Pending {
    waiting: Mutex<HashMap<CommandId, watch::Sender<Option<OutcomeResult>>>>,
}

impl Pending {
    fn waiting(
        &self,
    ) -> std::sync::MutexGuard<'_, HashMap<CommandId, watch::Sender<Option<OutcomeResult>>>> {
        self.waiting.lock().expect("pending lock is never poisoned")
    }

    /// Wait for `command`; `true` when this caller is the first to wait and must publish.
    fn watch(&self, command: CommandId) -> (watch::Receiver<Option<OutcomeResult>>, bool) {
        let mut waiting = self.waiting();
        match waiting.get(&command) {
            Some(sender) => (sender.subscribe(), false),
            None => {
                let (sender, receiver) = watch::channel(None);
                waiting.insert(command, sender);
                (receiver, true)
            }
        }
    }

    pub fn resolve(&self, outcome: Outcome) {
        if let Some(sender) = self.waiting().remove(&outcome.command) {
            sender.send_replace(Some(outcome.result));
        }
    }

    fn forget(&self, command: CommandId) {
        self.waiting().remove(&command);
    }
}

/// A command published (or joined, when the same command is already in flight here) whose
/// outcome is still to come.
pub struct Submitted {
    command: Command,
    outcome: watch::Receiver<Option<OutcomeResult>>,
    publish: Option<Result<PublishAckFuture, String>>,
    started: Instant,
}

/// Hand `command` to the intake. Called in the socket's read order and awaited there, so
/// one socket's commands reach the intake (and the log) in the order they were sent.
pub async fn publish(shared: &Shared, command: Command) -> Submitted {
    let started = Instant::now();
    let (outcome, first) = shared.pending.watch(command.id);
    let publish = if first {
        Some(to_intake(shared, &command, command.id.to_string()).await)
    } else {
        None
    };
    Submitted {
        command,
        outcome,
        publish,
        started,
    }
}

/// Wait for the intake's acknowledgement and the handler's outcome, then answer on
/// `outbox`.
pub async fn complete(shared: Arc<Shared>, outbox: Outbox, submitted: Submitted) {
    let Submitted {
        command,
        mut outcome,
        publish,
        started,
    } = submitted;
    let first = publish.is_some();
    if let Some(publish) = publish {
        let acked = match publish {
            Ok(pending) => pending.await.map_err(|e| e.to_string()),
            Err(e) => Err(e),
        };
        match acked {
            Ok(ack) if ack.duplicate => {
                tokio::spawn(resolve_duplicate(Arc::clone(&shared), command.clone()));
            }
            Ok(_) => {}
            Err(cause) => {
                warn!(command = %command.id, %cause, "cannot publish a command to the intake");
                shared.pending.resolve(Outcome {
                    command: command.id,
                    result: OutcomeResult::Rejected {
                        code: ErrorCode::Unavailable,
                        message: "the service is temporarily unavailable; retry with the same id"
                            .into(),
                    },
                });
            }
        }
    }
    let timeout = shared.config.command_timeout();
    let result = match tokio::time::timeout(timeout, outcome.wait_for(Option::is_some)).await {
        Ok(Ok(result)) => result.clone().expect("waited for Some"),
        _ => {
            if first {
                shared.pending.forget(command.id);
            }
            OutcomeResult::Rejected {
                code: ErrorCode::Timeout,
                message:
                    "no outcome in time; the command may still take effect, retry with the same id"
                        .into(),
            }
        }
    };
    let (frame, label) = match result {
        OutcomeResult::Accepted {
            conversation,
            seq,
            event,
        } => (
            ServerFrame::Ack {
                id: command.client_id,
                conversation,
                seq,
                event,
            },
            "accepted",
        ),
        OutcomeResult::Rejected { code, message } => (
            ServerFrame::error(Some(command.client_id), code, message),
            code.as_str(),
        ),
    };
    metrics::histogram!(telemetry::GATEWAY_COMMAND_SECONDS).record(started.elapsed().as_secs_f64());
    metrics::counter!(telemetry::GATEWAY_COMMAND_OUTCOMES_TOTAL, "outcome" => label).increment(1);
    outbox.send(&frame);
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

/// Publish `command` to the intake under `message_id`, the intake's dedupe key.
async fn to_intake(
    shared: &Shared,
    command: &Command,
    message_id: String,
) -> Result<PublishAckFuture, String> {
    let message = PublishMessage::build()
        .payload(command.to_bytes().into())
        .message_id(message_id);
    shared
        .topology
        .js
        .send_publish(INTAKE_SUBJECT, message)
        .await
        .map_err(|e| e.to_string())
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
    match shared.client.request(OUTCOME_QUERY_SUBJECT, query).await {
        Ok(reply) if !reply.payload.is_empty() => match Outcome::from_bytes(&reply.payload) {
            Ok(outcome) => return shared.pending.resolve(outcome),
            Err(e) => warn!(error = %e, "unreadable outcome from a handler"),
        },
        Ok(_) => {}
        Err(e) => debug!(error = %e, "outcome query failed"),
    }
    let retry_id = format!("{}:{}", command.id, command.issued_at);
    let queued = match to_intake(&shared, &command, retry_id).await {
        Ok(pending) => pending.await.map(|_| ()).map_err(|e| e.to_string()),
        Err(e) => Err(e),
    };
    if let Err(cause) = queued {
        warn!(command = %command.id, %cause, "cannot queue a repeated command");
        shared.pending.resolve(unavailable(command.id));
    }
}
