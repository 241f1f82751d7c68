//! A pull on one intake partition that never strands what the server sent to it.
//!
//! A handler changes the priority of its pulls whenever a partition changes hands, and a
//! pull request's priority is fixed when it is sent. A pull dropped for that (as
//! async-nats's pull stream is) unsubscribes its inbox, and whatever the server had
//! already sent to it is discarded: it waits out the ack wait, after the gateway has asked
//! again at its command timeout. Unsubscribing first does not close that gap, because the
//! server chooses a waiting request and routes to its inbox in separate steps.
//!
//! So this pull keeps one inbox, and its requests are never abandoned: a change of
//! priority sends the next request at the new priority and lets the old ones run out
//! (they expire within [`EXPIRES`]), still taking what they bring; stopping sends no more
//! requests and reads until every one has ended, which the server says for each (a
//! request that is filled ends with its last command, one that expires ends with a
//! status saying how much of it was left).

use std::time::{Duration, Instant};

use async_nats::jetstream::consumer::PullConsumer;
use async_nats::jetstream::consumer::pull::BatchConfig;
use async_nats::jetstream::{self, Message};
use async_nats::{StatusCode, Subject, Subscriber};
use futures::StreamExt;
use parley_events::subjects::HANDLER_PRIORITY_GROUP;
use tracing::debug;

use super::{Inner, Lane};
use crate::topology::{PULL_HEARTBEAT, SETUP_ATTEMPT};

/// Commands one pull request asks for.
const BATCH: usize = 256;
/// Below this many commands still asked for, another request is sent: one is always
/// waiting on the server, because a partition whose owner has none waiting goes to a
/// standby.
const ASK_AGAIN_BELOW: usize = BATCH / 2;
/// How long a request waits on the server. Short, because it bounds how long an instance
/// that gave up a partition (or is stopping) keeps taking some of its commands; an idle
/// partition costs a request and its expiry every [`RENEW_AFTER`].
const EXPIRES: Duration = Duration::from_secs(3);
/// A request is renewed before it expires, so that one is always waiting.
const RENEW_AFTER: Duration = Duration::from_secs(2);
/// Silence after which the pull requests are taken as lost (a server restart or a consumer
/// leader change): the server says it is alive every [`PULL_HEARTBEAT`] while it has
/// nothing to send.
const SILENCE: Duration = PULL_HEARTBEAT.saturating_mul(2);

#[derive(Debug, thiserror::Error)]
pub(super) enum PullError {
    #[error("cannot subscribe to a pull inbox: {0}")]
    Subscribe(String),
    #[error("cannot send a pull request: {0}")]
    Request(String),
    #[error("no word from the server for {SILENCE:?}: the pull requests are lost")]
    Silent,
    #[error("the server refused the pull: {0}")]
    Refused(String),
    #[error("the pull inbox closed")]
    Closed,
}

pub(super) struct IntakePull {
    js: jetstream::Context,
    consumer: PullConsumer,
    inbox: Subscriber,
    inbox_subject: Subject,
    request: BatchConfig,
    /// Commands the outstanding requests may still bring. Exact while the server reports
    /// what an ended request left (nats-server 2.12 does), so zero means every request ended.
    asked: usize,
    requested_at: Instant,
    heard_at: Instant,
}

impl IntakePull {
    /// Subscribe an inbox and send the first pull request on `consumer` at `priority`.
    pub(super) async fn start(
        js: &jetstream::Context,
        nats: &async_nats::Client,
        consumer: PullConsumer,
        priority: usize,
    ) -> Result<IntakePull, PullError> {
        let inbox_subject = Subject::from(nats.new_inbox());
        let inbox = nats
            .subscribe(inbox_subject.clone())
            .await
            .map_err(|e| PullError::Subscribe(e.to_string()))?;
        let now = Instant::now();
        let mut pull = IntakePull {
            js: js.clone(),
            consumer,
            inbox,
            inbox_subject,
            request: BatchConfig {
                batch: BATCH,
                expires: Some(EXPIRES),
                idle_heartbeat: PULL_HEARTBEAT,
                group: Some(HANDLER_PRIORITY_GROUP.to_owned()),
                priority: Some(priority),
                ..BatchConfig::default()
            },
            asked: 0,
            requested_at: now,
            heard_at: now,
        };
        pull.ask().await?;
        Ok(pull)
    }

    /// The next command. Cancel-safe: a command is returned in the same poll that reads it.
    pub(super) async fn next(&mut self) -> Result<Message, PullError> {
        loop {
            if self.asked < ASK_AGAIN_BELOW || self.requested_at.elapsed() >= RENEW_AFTER {
                self.ask().await?;
            }
            if let Some(command) = self.receive(self.requested_at + RENEW_AFTER).await? {
                return Ok(command);
            }
        }
    }

    /// Send the next requests at `priority`; those sent before run out by themselves.
    pub(super) async fn reprioritize(&mut self, priority: usize) -> Result<(), PullError> {
        self.request.priority = Some(priority);
        self.ask().await
    }

    /// Send no more requests, and hand the lanes what the outstanding ones bring until the
    /// server has ended them all. A server that stops answering (it is restarting) is given
    /// up on after the longest a request lives; what it sent over the failing connection is
    /// redelivered after the ack wait.
    pub(super) async fn finish(mut self, inner: &Inner, lanes: &[Lane]) {
        let give_up_at = Instant::now() + EXPIRES + SETUP_ATTEMPT;
        while self.asked > 0 && Instant::now() < give_up_at {
            match self.receive(give_up_at).await {
                Ok(Some(command)) => super::dispatch(inner, lanes, command).await,
                Ok(None) => {}
                Err(e) => {
                    debug!(error = %e, "an intake pull ended before its requests did");
                    return;
                }
            }
        }
        if self.asked > 0 {
            debug!(
                asked = self.asked,
                "an intake pull's requests did not all end in time"
            );
        }
    }

    /// What the server sends next, until `wake_at`: a command, or `None` for a status or
    /// for nothing.
    async fn receive(&mut self, wake_at: Instant) -> Result<Option<Message>, PullError> {
        let received = tokio::select! {
            biased;
            received = self.inbox.next() => received,
            () = tokio::time::sleep_until(wake_at.min(self.heard_at + SILENCE).into()) => {
                if self.heard_at.elapsed() >= SILENCE {
                    return Err(PullError::Silent);
                }
                return Ok(None);
            }
        };
        let message = received.ok_or(PullError::Closed)?;
        self.heard_at = Instant::now();
        match message.status {
            None => {
                self.asked = self.asked.saturating_sub(1);
                Ok(Some(Message {
                    message,
                    context: self.js.clone(),
                }))
            }
            Some(StatusCode::IDLE_HEARTBEAT) => Ok(None),
            Some(StatusCode::TIMEOUT | StatusCode::REQUEST_TERMINATED)
                if !refuses_again(&message) =>
            {
                self.asked = self.asked.saturating_sub(unfulfilled(&message));
                Ok(None)
            }
            Some(status) => {
                let description = message.description.unwrap_or_default();
                Err(PullError::Refused(format!("{status} {description}")))
            }
        }
    }

    async fn ask(&mut self) -> Result<(), PullError> {
        self.consumer
            .request_batch(self.request.clone(), self.inbox_subject.clone())
            .await
            .map_err(|e| PullError::Request(e.to_string()))?;
        self.asked += BATCH;
        self.requested_at = Instant::now();
        Ok(())
    }
}

/// A request the server ended because it would refuse any like it: asking again cannot
/// help, setting the consumer up again may.
fn refuses_again(status: &async_nats::Message) -> bool {
    status.description.as_deref().is_some_and(|description| {
        description == "Consumer Deleted"
            || description == "Consumer is push based"
            || description.starts_with("Exceeded Max")
    })
}

/// How much of an ended request was left unsent, from the header the server adds; without
/// it, the whole of one request.
fn unfulfilled(status: &async_nats::Message) -> usize {
    status
        .headers
        .as_ref()
        .and_then(|headers| headers.get("Nats-Pending-Messages"))
        .and_then(|value| value.as_str().parse().ok())
        .unwrap_or(BATCH)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status(code: u16, description: &str, pending: Option<&str>) -> async_nats::Message {
        let headers = pending.map(|pending| {
            let mut headers = async_nats::HeaderMap::new();
            headers.insert("Nats-Pending-Messages", pending);
            headers
        });
        async_nats::Message {
            subject: Subject::from("_INBOX.x"),
            reply: None,
            payload: bytes::Bytes::new(),
            headers,
            status: Some(StatusCode::from_u16(code).expect("a status code")),
            description: Some(description.to_owned()),
            length: 0,
        }
    }

    #[test]
    fn an_ended_request_counts_what_it_left() {
        assert_eq!(unfulfilled(&status(408, "Request Timeout", Some("37"))), 37);
        assert_eq!(unfulfilled(&status(409, "Leadership Change", Some("0"))), 0);
        assert_eq!(
            unfulfilled(&status(408, "Request Timeout", None)),
            BATCH,
            "without the header, the whole request"
        );
        assert_eq!(
            unfulfilled(&status(408, "Request Timeout", Some("many"))),
            BATCH,
            "an unreadable header counts as absent"
        );
    }

    #[test]
    fn only_requests_the_server_would_refuse_again_end_the_pull() {
        for ends_the_pull in [
            "Consumer Deleted",
            "Consumer is push based",
            "Exceeded MaxWaiting",
            "Exceeded MaxRequestBatch of 100",
        ] {
            assert!(
                refuses_again(&status(409, ends_the_pull, None)),
                "{ends_the_pull}"
            );
        }
        for asks_again in ["Request Timeout", "Leadership Change", "Server Shutdown"] {
            assert!(
                !refuses_again(&status(409, asks_again, None)),
                "{asks_again}"
            );
        }
    }
}
