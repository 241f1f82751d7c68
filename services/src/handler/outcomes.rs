//! Answering commands: outcomes to the gateways, acknowledgements to the intake.
//!
//! Every lane hands its answered commands here, and whatever has piled up since the last
//! round goes out together: one message per gateway for all of its outcomes (when the
//! gateway said, by [`OUTCOME_BATCHES_HEADER`] on the command, that it reads a batch),
//! then each command's acknowledgement. Under load a merged commit answers many lanes at
//! once, and their outcomes cost one publish and one wake-up of the gateway instead of one
//! each; a lone answer goes out alone, as it did before. A command's outcome is always
//! published before its acknowledgement, on the same connection, as before.

use async_nats::jetstream::{AckKind, Message};
use parley_events::Outcome;
use parley_events::subjects::OUTCOME_BATCHES_HEADER;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tracing::warn;

use super::Taken;
use crate::telemetry;

/// Most answers sent in one round.
const MAX_ROUND: usize = 256;

/// A command answered: where its outcome goes, and how its intake message is acknowledged.
pub(super) struct Answered {
    /// The gateway's outcome subject; `None` for a command that names none.
    pub reply_to: Option<String>,
    pub outcome: Outcome,
    pub message: Taken,
    pub ack: AckKind,
}

/// Where lanes hand their answers. The queue is bounded in practice by the intake's
/// `max_ack_pending`: no more commands than that are out unacknowledged.
#[derive(Clone)]
pub(super) struct Outcomes {
    queue: mpsc::UnboundedSender<Answered>,
}

impl Outcomes {
    /// The answering task ends once every `Outcomes` is dropped and what it holds is sent.
    pub(super) fn start(client: async_nats::Client) -> (Outcomes, JoinHandle<()>) {
        let (queue, answers) = mpsc::unbounded_channel();
        (Outcomes { queue }, tokio::spawn(answer(client, answers)))
    }

    pub(super) fn send(&self, answered: Answered) {
        // The task outlives every sender (see `start`).
        let _ = self.queue.send(answered);
    }
}

async fn answer(client: async_nats::Client, mut answers: mpsc::UnboundedReceiver<Answered>) {
    let mut round = Vec::with_capacity(MAX_ROUND);
    while answers.recv_many(&mut round, MAX_ROUND).await > 0 {
        let outcomes = round.iter().filter_map(|answered| {
            let reply_to = answered.reply_to.as_deref()?;
            Some((
                reply_to,
                reads_batches(&answered.message),
                &answered.outcome,
            ))
        });
        for (reply_to, count, payload) in by_gateway(outcomes) {
            metrics::histogram!(telemetry::HANDLER_OUTCOMES_PER_MESSAGE).record(count as f64);
            if let Err(e) = client.publish(reply_to.to_owned(), payload.into()).await {
                warn!(error = %e, "cannot send outcomes to a gateway");
            }
        }
        for answered in round.drain(..) {
            if let Err(e) = answered.message.ack_with(answered.ack).await {
                // The command will be redelivered and answered again from the write model.
                warn!(error = %e, "cannot acknowledge the command");
            }
        }
    }
}

/// The messages that carry `outcomes` (each with its gateway's subject, and whether that
/// gateway reads batches), as subject, number of outcomes and payload: one message per
/// gateway that reads batches, in the order of each one's first outcome, after one per
/// outcome for the others.
fn by_gateway<'a>(
    outcomes: impl Iterator<Item = (&'a str, bool, &'a Outcome)>,
) -> Vec<(&'a str, usize, Vec<u8>)> {
    let mut batches: Vec<(&str, Vec<&Outcome>)> = Vec::new();
    let mut messages = Vec::new();
    for (reply_to, reads_batches, outcome) in outcomes {
        if !reads_batches {
            messages.push((reply_to, 1, outcome.to_bytes()));
            continue;
        }
        match batches.iter_mut().find(|(gateway, _)| *gateway == reply_to) {
            Some((_, batch)) => batch.push(outcome),
            None => batches.push((reply_to, vec![outcome])),
        }
    }
    messages.extend(
        batches
            .into_iter()
            .map(|(reply_to, batch)| (reply_to, batch.len(), Outcome::batch_to_bytes(&batch))),
    );
    messages
}

/// Whether the gateway that sent the command in `message` reads several outcomes in one
/// message (gateways from before batching read one, and do not say this).
fn reads_batches(message: &Message) -> bool {
    message
        .headers
        .as_ref()
        .is_some_and(|headers| headers.get(OUTCOME_BATCHES_HEADER).is_some())
}

#[cfg(test)]
mod tests {
    use super::*;
    use parley_events::{ClientMsgId, CommandId, ErrorCode, OutcomeResult, UserId};

    fn outcome(n: u32) -> Outcome {
        let alice = UserId::parse("alice").unwrap();
        Outcome {
            command: CommandId::from_client(&alice, &ClientMsgId::parse(format!("m{n}")).unwrap()),
            result: OutcomeResult::Rejected {
                code: ErrorCode::NotMember,
                message: format!("command {n}"),
            },
        }
    }

    #[test]
    fn outcomes_go_one_message_per_gateway_that_reads_batches_and_alone_to_the_others() {
        let (a, b, c, d, e) = (outcome(1), outcome(2), outcome(3), outcome(4), outcome(5));
        let round = [
            ("parley.outcome.gw-a", true, &a),
            ("parley.outcome.gw-old", false, &b),
            ("parley.outcome.gw-b", true, &c),
            ("parley.outcome.gw-a", true, &d),
            ("parley.outcome.gw-old", false, &e),
        ];
        let messages = by_gateway(round.into_iter());
        let read: Vec<(&str, usize, Vec<Outcome>)> = messages
            .iter()
            .map(|(to, count, payload)| (*to, *count, Outcome::all_from_bytes(payload).unwrap()))
            .collect();
        assert_eq!(
            read,
            [
                ("parley.outcome.gw-old", 1, vec![b.clone()]),
                ("parley.outcome.gw-old", 1, vec![e.clone()]),
                ("parley.outcome.gw-a", 2, vec![a.clone(), d.clone()]),
                ("parley.outcome.gw-b", 1, vec![c.clone()]),
            ]
        );
        // A gateway from before batching reads what it is sent as it always did.
        for (to, _, payload) in &messages {
            if *to == "parley.outcome.gw-old" {
                assert!(Outcome::from_bytes(payload).is_ok());
            }
        }
    }
}
