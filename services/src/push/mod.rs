//! Push notifications: a projection of the event log that tells the operator's push gateway
//! (a webhook) about each message posted to a member who has no live socket.
//!
//! It runs in the projector role when `push.webhook_url` is set, on its own durable consumer
//! of the log. For each `message.posted` it waits until the conversation store has applied
//! the event (the store may lag the log), reads the conversation's members there, drops the
//! sender and everyone Redis presence shows online, and POSTs one notification per
//! remaining member, each with an `Idempotency-Key` derived from the event and the
//! recipient. A notification the webhook keeps refusing goes to the dead-letter stream;
//! only once every recipient's notification is delivered or dead-lettered is the log event
//! acknowledged. Delivery to the webhook is therefore at least once: an event redelivered
//! after a crash is notified again, under the same keys.
//!
//! Push is a side channel: its failures never make the projector unready; they show in its
//! own metrics and logs.

pub mod dead_letters;
mod webhook;

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::AckKind;
use async_nats::jetstream::consumer::{AckPolicy, DeliverPolicy, pull};
use futures::{StreamExt, TryStreamExt};
use parley_events::subjects::PUSH_CONSUMER;
use parley_events::{ConversationId, Event, EventEnvelope, EventId, UserId};
use parley_projections::{ConversationStore, PresenceClient, PresenceStore};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, error, info, info_span, warn};

pub use dead_letters::PushCommand;
pub use webhook::{IDEMPOTENCY_KEY, Undelivered, Webhook};

use crate::backoff::Backoff;
use crate::config::Config;
use crate::node::Nats;
use crate::topology::{self, Topology};
use crate::{telemetry, unix_millis};

/// How long the log may wait for its acknowledgement before redelivering an event. Events
/// being notified say "in progress" every third of it, so a slow webhook (every retry of
/// every recipient) never makes JetStream hand the event out twice.
const ACK_WAIT: Duration = Duration::from_secs(30);
/// Longest an event waits for the conversation store to apply it; after that it is handed
/// back to the log and tried again later (the store is down or rebuilding).
const STORE_WAIT: Duration = Duration::from_secs(10);
/// How often the store's position is read while waiting for it.
const STORE_POLL: Duration = Duration::from_millis(50);
/// How long an event that could not be worked on (store or Redis unavailable, the
/// dead-letter stream unwritable) waits before the log hands it out again.
const DEFER: Duration = Duration::from_secs(5);
const MAX_BACKOFF: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum PushError {
    #[error("{0}")]
    Config(String),
    #[error("event log consumer: {0}")]
    Consumer(String),
    #[error("redis: {0}")]
    Presence(#[from] parley_projections::PresenceError),
    #[error("conversation store: {0}")]
    Store(#[from] parley_projections::StoreError),
    #[error(
        "the conversation store is at log position {position}, still behind event {seq} after {STORE_WAIT:?}"
    )]
    StoreBehind { position: u64, seq: u64 },
    #[error("dead-letter stream: {0}")]
    DeadLetters(String),
}

/// What the webhook receives for one recipient of one message: the JSON body of the POST.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Notification {
    /// The `message.posted` event (the message's id).
    pub event_id: EventId,
    /// Its log sequence: the message's number in the conversation's history.
    pub seq: u64,
    pub conversation: ConversationId,
    pub sender: UserId,
    pub recipient: UserId,
    /// The body's first `push.preview_chars` characters; absent when that is 0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preview: Option<String>,
    /// When the message was sent, milliseconds since the Unix epoch.
    pub sent_at: u64,
}

impl Notification {
    /// The same for every POST of this notification, redeliveries and redrives included,
    /// and different for every other: a UUIDv5 of the recipient in the event id's namespace
    /// (a user id may hold characters a header cannot).
    pub fn idempotency_key(&self) -> uuid::Uuid {
        uuid::Uuid::new_v5(self.event_id.as_uuid(), self.recipient.as_str().as_bytes())
    }
}

/// A notification the webhook kept refusing, as kept in the dead-letter stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeadLetter {
    pub notification: Notification,
    /// The last refusal: the HTTP status and the start of the body, or why no answer came.
    pub error: String,
    /// POSTs made so far, redrives included.
    pub attempts: u32,
    /// When it was dead-lettered (or last redriven), milliseconds since the Unix epoch.
    pub failed_at: u64,
}

/// The notifications of one posted message: one per member other than the sender who has
/// no live socket. `online` says which of the members do.
fn notifications(
    envelope: &EventEnvelope,
    seq: u64,
    members: impl IntoIterator<Item = UserId>,
    online: impl Fn(&UserId) -> bool,
    preview_chars: usize,
) -> Vec<Notification> {
    let Event::MessagePosted(posted) = &envelope.event else {
        return Vec::new();
    };
    let preview = (preview_chars > 0).then(|| posted.body.chars().take(preview_chars).collect());
    members
        .into_iter()
        .filter(|user| *user != envelope.actor && !online(user))
        .map(|recipient| Notification {
            event_id: envelope.id,
            seq,
            conversation: envelope.conversation,
            sender: envelope.actor.clone(),
            recipient,
            preview: preview.clone(),
            sent_at: envelope.at,
        })
        .collect()
}

/// Why one consuming attempt ended without an error.
enum Stopped {
    Shutdown,
    Reconnected,
}

/// The push worker of a projector node.
pub struct Pusher {
    config: Arc<Config>,
    nats: Nats,
    topology: Topology,
    store: Arc<dyn ConversationStore>,
    presence: PresenceClient,
    webhook: Webhook,
}

impl Pusher {
    /// The worker, or `None` when push is off.
    pub fn build(
        config: Arc<Config>,
        nats: Nats,
        topology: Topology,
        store: Arc<dyn ConversationStore>,
        presence: PresenceClient,
    ) -> Result<Option<Pusher>, PushError> {
        let Some(webhook) = Webhook::new(&config.push)? else {
            return Ok(None);
        };
        Ok(Some(Pusher {
            config,
            nats,
            topology,
            store,
            presence,
            webhook,
        }))
    }

    /// Notify until `shutdown`, retrying with backoff whatever fails.
    pub async fn run(self, shutdown: CancellationToken) {
        let mut backoff = Backoff::new(MAX_BACKOFF);
        loop {
            let started = Instant::now();
            match self.consume(&shutdown).instrument(info_span!("push")).await {
                Ok(Stopped::Shutdown) => return,
                Ok(Stopped::Reconnected) => {
                    info!("reconnected to NATS; pulling from the event log again");
                    continue;
                }
                Err(e) => {
                    if started.elapsed() > MAX_BACKOFF {
                        backoff = Backoff::new(MAX_BACKOFF);
                    }
                    error!(error = %e, retry_in = ?backoff.delay(), "push notifications stopped");
                }
            }
            if !backoff.wait(&shutdown).await {
                return;
            }
        }
    }

    async fn consumer(&self) -> Result<pull::Stream, PushError> {
        let concurrency = self.config.push.concurrency;
        let consumer = self
            .topology
            .log
            .get_or_create_consumer(
                PUSH_CONSUMER,
                pull::Config {
                    durable_name: Some(PUSH_CONSUMER.into()),
                    description: Some("Parley push notifications".into()),
                    ack_policy: AckPolicy::Explicit,
                    // Turning push on for a deployment with history notifies from then on,
                    // not every message ever sent.
                    deliver_policy: DeliverPolicy::New,
                    ack_wait: ACK_WAIT,
                    max_ack_pending: i64::try_from(concurrency * 2).unwrap_or(i64::MAX),
                    ..Default::default()
                },
            )
            .await
            .map_err(|e| PushError::Consumer(e.to_string()))?;
        consumer
            .stream()
            .max_messages_per_batch(concurrency)
            .expires(topology::PULL_EXPIRES)
            .heartbeat(topology::PULL_HEARTBEAT)
            .messages()
            .await
            .map_err(|e| PushError::Consumer(e.to_string()))
    }

    async fn consume(&self, shutdown: &CancellationToken) -> Result<Stopped, PushError> {
        let presence = PresenceStore::connect(&self.presence).await?;
        let messages = topology::attempt(self.consumer(), PushError::Consumer).await?;
        info!("notifying offline members from the event log");
        // Events in progress when this attempt ends are handed back to the log (nak), so a
        // restarted worker gets them at once instead of after the ack wait.
        let stop = shutdown.child_token();
        let mut reconnects = self.nats.reconnects();
        let reconnected = {
            let stop = stop.clone();
            tokio::spawn(async move {
                tokio::select! {
                    () = stop.cancelled() => false,
                    changed = reconnects.changed() => {
                        stop.cancel();
                        changed.is_ok()
                    }
                }
            })
        };
        let processed = messages
            .take_until(stop.clone().cancelled_owned())
            .map_err(|e| PushError::Consumer(e.to_string()))
            .try_for_each_concurrent(self.config.push.concurrency, |message| {
                self.event(message, &presence, &stop)
            })
            .await;
        stop.cancel();
        let reconnected = reconnected.await.unwrap_or(false) && !shutdown.is_cancelled();
        processed?;
        if reconnected {
            Ok(Stopped::Reconnected)
        } else if shutdown.is_cancelled() {
            Ok(Stopped::Shutdown)
        } else {
            Err(PushError::Consumer("consumer stream ended".into()))
        }
    }

    /// Notify one log event's recipients, then acknowledge it; or hand it back to the log.
    async fn event(
        &self,
        message: async_nats::jetstream::Message,
        presence: &PresenceStore,
        stop: &CancellationToken,
    ) -> Result<(), PushError> {
        let info = message
            .info()
            .map_err(|e| PushError::Consumer(e.to_string()))?;
        let seq = info.stream_sequence;
        metrics::gauge!(telemetry::PUSH_CONSUMER_PENDING).set(info.pending as f64);
        let envelope = match EventEnvelope::from_bytes(&message.payload) {
            Ok(envelope) => envelope,
            Err(e) => {
                // The conversation projection stops on such an event; notifications are
                // not worth holding up every later message for.
                error!(seq, error = %e, "cannot read a log event; no notification for it");
                return self.finish(&message, AckKind::Term, "undecodable").await;
            }
        };
        if !matches!(envelope.event, Event::MessagePosted(_)) {
            return self.finish(&message, AckKind::Ack, "not_a_message").await;
        }
        let work = self.notify(&envelope, seq, presence, stop);
        tokio::pin!(work);
        let mut progress = tokio::time::interval(ACK_WAIT / 3);
        progress.tick().await;
        let outcome = loop {
            tokio::select! {
                outcome = &mut work => break outcome,
                _ = progress.tick() => {
                    if let Err(e) = message.ack_with(AckKind::Progress).await {
                        warn!(seq, error = %e, "cannot extend the ack wait of an event being notified");
                    }
                }
            }
        };
        match outcome {
            Ok(true) => self.finish(&message, AckKind::Ack, "notified").await,
            Ok(false) => {
                self.finish(&message, AckKind::Nak(None), "interrupted")
                    .await
            }
            Err(e) => {
                warn!(seq, error = %e, retry_in = ?DEFER, "cannot notify a message now; the log hands it out again later");
                self.finish(&message, AckKind::Nak(Some(DEFER)), "deferred")
                    .await
            }
        }
    }

    async fn finish(
        &self,
        message: &async_nats::jetstream::Message,
        ack: AckKind,
        result: &'static str,
    ) -> Result<(), PushError> {
        metrics::counter!(telemetry::PUSH_EVENTS_TOTAL, "result" => result).increment(1);
        message
            .ack_with(ack)
            .await
            .map_err(|e| PushError::Consumer(e.to_string()))
    }

    /// Deliver or dead-letter every notification of the message; `false` when stopped
    /// first (nothing acknowledges the event then, so it is notified again, under the same
    /// keys).
    async fn notify(
        &self,
        envelope: &EventEnvelope,
        seq: u64,
        presence: &PresenceStore,
        stop: &CancellationToken,
    ) -> Result<bool, PushError> {
        if !self.store_reached(seq, stop).await? {
            return Ok(false);
        }
        let members: Vec<UserId> = self
            .store
            .members(envelope.conversation)
            .await?
            .into_iter()
            .map(|m| m.user)
            .collect();
        let statuses = presence.statuses(&members, unix_millis()).await?;
        let online: std::collections::HashSet<&UserId> = members
            .iter()
            .zip(&statuses)
            .filter(|(_, status)| status.online())
            .map(|(user, _)| user)
            .collect();
        let notifications = notifications(
            envelope,
            seq,
            members.iter().cloned(),
            |user| online.contains(user),
            self.config.push.preview_chars,
        );
        let webhook = &self.webhook;
        let outcomes: Vec<_> = futures::stream::iter(notifications)
            .map(|notification| async move {
                let outcome = webhook.deliver(&notification, stop).await;
                (notification, outcome)
            })
            .buffer_unordered(self.config.push.concurrency)
            .collect()
            .await;
        let mut complete = true;
        for (notification, outcome) in outcomes {
            match outcome {
                Ok(_) => {
                    metrics::counter!(telemetry::PUSH_NOTIFICATIONS_TOTAL, "result" => "delivered")
                        .increment(1);
                }
                Err(Undelivered::Shutdown) => complete = false,
                Err(Undelivered::Failed { error, attempts }) => {
                    warn!(seq, attempts, %error, "the webhook refused a notification; dead-lettering it");
                    let letter = DeadLetter {
                        notification,
                        error,
                        attempts,
                        failed_at: unix_millis(),
                    };
                    dead_letters::publish(&self.topology.js, &letter).await?;
                    metrics::counter!(telemetry::PUSH_NOTIFICATIONS_TOTAL, "result" => "dead_lettered")
                        .increment(1);
                }
            }
        }
        Ok(complete)
    }

    /// Wait, bounded, until the conversation store has applied log sequence `seq`, so its
    /// members are those of the message's time or later. `false` when stopped first.
    async fn store_reached(&self, seq: u64, stop: &CancellationToken) -> Result<bool, PushError> {
        let deadline = Instant::now() + STORE_WAIT;
        loop {
            let position = self.store.position().await?;
            if position >= seq {
                return Ok(true);
            }
            if Instant::now() >= deadline {
                return Err(PushError::StoreBehind { position, seq });
            }
            tokio::select! {
                () = stop.cancelled() => return Ok(false),
                () = tokio::time::sleep(STORE_POLL) => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use parley_events::{ClientMsgId, CommandId, MessagePosted};

    use super::*;

    fn posted(body: &str) -> EventEnvelope {
        EventEnvelope {
            id: EventId::from_uuid(uuid::Uuid::from_u128(7)),
            conversation: ConversationId::from_uuid(uuid::Uuid::from_u128(9)),
            prev: 3,
            command: CommandId::from_uuid(uuid::Uuid::from_u128(8)),
            actor: UserId::parse("alice").unwrap(),
            at: 1_700_000_000_000,
            event: Event::MessagePosted(MessagePosted {
                client_id: ClientMsgId::parse("m1").unwrap(),
                body: body.into(),
                reply_to: None,
            }),
        }
    }

    fn users(names: &[&str]) -> Vec<UserId> {
        names.iter().map(|n| UserId::parse(*n).unwrap()).collect()
    }

    #[test]
    fn only_members_other_than_the_sender_with_no_live_socket_are_notified() {
        let sent = notifications(
            &posted("héllo wörld"),
            42,
            users(&["alice", "bob", "carol", "dave"]),
            |user| user.as_str() == "bob",
            4,
        );
        let recipients: Vec<&str> = sent.iter().map(|n| n.recipient.as_str()).collect();
        assert_eq!(recipients, ["carol", "dave"]);
        assert_eq!(
            sent[0].preview.as_deref(),
            Some("héll"),
            "characters, not bytes"
        );
        assert_eq!(sent[0].seq, 42);
        assert_eq!(sent[0].sender.as_str(), "alice");
        assert_ne!(sent[0].idempotency_key(), sent[1].idempotency_key());
        let again = notifications(&posted("x"), 42, users(&["carol"]), |_| false, 0);
        assert_eq!(again[0].idempotency_key(), sent[0].idempotency_key());
        assert_eq!(again[0].preview, None, "no preview when preview_chars is 0");
        let json = serde_json::to_value(&again[0]).unwrap();
        assert!(json.get("preview").is_none(), "{json}");
    }
}
