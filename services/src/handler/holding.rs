//! Commands a handler holds, kept from being redelivered while it works on them.
//!
//! The intake's ack wait is what brings back the commands of a handler that died: until it
//! runs out, a command the dead instance had taken waits, and its sender sees `timeout`
//! when the wait is longer than the gateway's command timeout. So the ack wait is short
//! (`intake.ack_wait_secs`), and a live handler says it is still working on each command it
//! holds ("in progress", which restarts the server's ack wait for that command) every third
//! of it. It says so only for `intake.max_hold_secs`: a command held longer (a lane that
//! stopped making progress while its process lives on) is left to run out and go to
//! another delivery, as every command did after the ack wait before.

use std::collections::HashMap;
use std::ops::Deref;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::Subject;
use async_nats::jetstream::{AckKind, Message};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::telemetry;

#[derive(Default)]
pub(super) struct Holding {
    held: Mutex<HashMap<u64, Hold>>,
    next: AtomicU64,
}

struct Hold {
    reply: Subject,
    since: Instant,
}

/// An intake message this handler holds until it is acknowledged (or refused) and dropped.
pub(super) struct Taken {
    message: Message,
    key: u64,
    holding: Arc<Holding>,
}

impl Deref for Taken {
    type Target = Message;

    fn deref(&self) -> &Message {
        &self.message
    }
}

impl Drop for Taken {
    fn drop(&mut self) {
        self.holding.lock().remove(&self.key);
    }
}

impl Holding {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Hold>> {
        self.held
            .lock()
            .expect("the holding lock is never poisoned")
    }

    /// Hold `message` until the returned [`Taken`] is dropped. A message without a reply
    /// subject is not a JetStream delivery and has no ack wait to restart.
    pub(super) fn take(self: &Arc<Self>, message: Message) -> Taken {
        let key = self.next.fetch_add(1, Ordering::Relaxed);
        if let Some(reply) = message.reply.clone() {
            self.lock().insert(
                key,
                Hold {
                    reply,
                    since: Instant::now(),
                },
            );
        }
        Taken {
            message,
            key,
            holding: Arc::clone(self),
        }
    }

    /// Every third of `ack_wait`, tell the server that each command held for at least that
    /// long (and for less than `max_hold`) is still being worked on, until `stop`.
    pub(super) async fn keep_alive(
        self: Arc<Self>,
        client: async_nats::Client,
        ack_wait: Duration,
        max_hold: Duration,
        stop: CancellationToken,
    ) {
        let every = ack_wait / 3;
        let mut ticks = tokio::time::interval(every);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                _ = ticks.tick() => {}
            }
            let (due, released) = {
                let held = self.lock();
                metrics::gauge!(telemetry::HANDLER_COMMANDS_HELD).set(held.len() as f64);
                due(
                    held.values().map(|hold| (hold.since, &hold.reply)),
                    Instant::now(),
                    every,
                    max_hold,
                )
            };
            if released > 0 {
                warn!(
                    commands = released,
                    ?max_hold,
                    "commands held longer than intake.max_hold_secs are left to be redelivered"
                );
            }
            metrics::counter!(telemetry::HANDLER_COMMANDS_KEPT_TOTAL).increment(due.len() as u64);
            for reply in due {
                // What `Message::ack_with(AckKind::Progress)` sends, without keeping the message.
                if let Err(e) = client.publish(reply, AckKind::Progress.into()).await {
                    debug!(error = %e, "cannot tell the intake a command is still in progress");
                }
            }
        }
    }
}

/// Of the holds `(since, reply)` at `now`, checked every `every`: the replies to tell "in
/// progress" (held at least `every`, so at most two checks pass between the delivery and
/// the first word, and less than `max_hold`), and how many reached `max_hold` since the
/// last check.
fn due<'a>(
    holds: impl Iterator<Item = (Instant, &'a Subject)>,
    now: Instant,
    every: Duration,
    max_hold: Duration,
) -> (Vec<Subject>, usize) {
    let mut due = Vec::new();
    let mut released = 0;
    for (since, reply) in holds {
        let held_for = now.saturating_duration_since(since);
        if held_for >= max_hold {
            if held_for < max_hold + every {
                released += 1;
            }
        } else if held_for >= every {
            due.push(reply.clone());
        }
    }
    (due, released)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holds_are_kept_from_a_full_check_old_until_the_most_a_command_is_held() {
        let now = Instant::now();
        let every = Duration::from_secs(1);
        let max_hold = Duration::from_secs(30);
        let ago = |millis| now - Duration::from_millis(millis);
        let subjects: Vec<Subject> = (0..5).map(|i| Subject::from(format!("r{i}"))).collect();
        let holds = [
            (ago(999), &subjects[0]),    // taken since the last check: kept next time
            (ago(1_000), &subjects[1]),  // a check old: kept now
            (ago(29_999), &subjects[2]), // about to reach the most: kept once more
            (ago(30_500), &subjects[3]), // reached it since the last check: released
            (ago(45_000), &subjects[4]), // released long ago
        ];
        let (due, released) = due(holds.into_iter(), now, every, max_hold);
        assert_eq!(due, [subjects[1].clone(), subjects[2].clone()]);
        assert_eq!(released, 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_held_command_comes_back_only_once_let_go_or_held_too_long() {
        use async_nats::jetstream::consumer::{AckPolicy, pull};
        use async_nats::jetstream::stream;
        use futures::StreamExt;
        use parley_localstack::{NatsOptions, NatsServer};

        let nats = NatsServer::start(NatsOptions {
            sync_always: false,
            ..NatsOptions::default()
        })
        .unwrap();
        let client = async_nats::connect(nats.url()).await.unwrap();
        let js = async_nats::jetstream::new(client.clone());
        let stream = js
            .create_stream(stream::Config {
                name: "HOLDING".into(),
                subjects: vec!["holding.>".into()],
                ..Default::default()
            })
            .await
            .unwrap();
        // Renewed every 667 ms: a keeper delayed by less than that still renews in time.
        let ack_wait = Duration::from_secs(2);
        let max_hold = Duration::from_secs(6);
        let consumer = stream
            .create_consumer(pull::Config {
                durable_name: Some("held".into()),
                ack_policy: AckPolicy::Explicit,
                ack_wait,
                ..Default::default()
            })
            .await
            .unwrap();
        for name in ["let-go", "held-too-long"] {
            js.publish(format!("holding.{name}"), name.into())
                .await
                .unwrap()
                .await
                .unwrap();
        }
        let mut messages = consumer.messages().await.unwrap();
        let mut next_within = async |limit| {
            let message = tokio::time::timeout(limit, messages.next()).await.ok()?;
            let message = message.unwrap().unwrap();
            let delivered = message.info().unwrap().delivered;
            Some((message, delivered))
        };
        let delivery = Duration::from_secs(10);

        let holding = Arc::new(Holding::default());
        let stop = CancellationToken::new();
        let _stop = stop.clone().drop_guard();
        tokio::spawn(Arc::clone(&holding).keep_alive(client, ack_wait, max_hold, stop));
        let taken_at = Instant::now();
        let let_go = holding.take(next_within(delivery).await.expect("a delivery").0);
        let held_too_long = holding.take(next_within(delivery).await.expect("a delivery").0);
        assert_eq!(let_go.subject.as_str(), "holding.let-go");

        assert!(
            next_within(Duration::from_millis(4_500)).await.is_none(),
            "more than two ack waits pass, and neither command comes back while held"
        );
        assert_eq!(holding.lock().len(), 2);
        drop(let_go);
        assert_eq!(holding.lock().len(), 1, "a command let go is held no more");
        let (again, delivered) = next_within(delivery).await.expect("a delivery");
        assert_eq!(
            (again.subject.as_str(), delivered),
            ("holding.let-go", 2),
            "the command let go came back first, on its second delivery"
        );
        again.ack_with(AckKind::Ack).await.unwrap();

        let (again, delivered) = next_within(delivery).await.expect("a delivery");
        assert_eq!(
            (again.subject.as_str(), delivered),
            ("holding.held-too-long", 2)
        );
        assert!(
            taken_at.elapsed() >= max_hold,
            "kept until the most a command is held, then let run out: {:?}",
            taken_at.elapsed()
        );
        drop(held_too_long);
    }
}
