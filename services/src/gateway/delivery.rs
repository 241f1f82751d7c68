//! Live delivery inside one gateway: which sockets are open, which users they belong to,
//! and which conversations they follow.
//!
//! A conversation with at least one local member socket has exactly one NATS subscription
//! here, whatever the number of those sockets; each event is serialized once and fanned
//! out to the sockets in process. The follower of a conversation delivers its events in
//! log order: it drops what it has already delivered and, when an event's `prev` shows it
//! missed some (the live path is at most once), fetches the missing ones from the log first.

use std::collections::hash_map::Entry;
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, Weak};

use async_nats::jetstream::stream::Stream as LogStream;
use axum::extract::ws::Utf8Bytes;
use futures::StreamExt;
use parley_events::protocol::{ServerFrame, close};
use parley_events::subjects::live_subject;
use parley_events::{ConversationId, EventEnvelope, RecordedEvent, UserId};
use tokio::sync::mpsc;
use tokio::sync::mpsc::error::TrySendError;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, warn};

use super::typing;
use crate::telemetry;

/// Most events fetched from the log to fill one gap; a longer gap is left to the client's
/// history request.
const MAX_GAP_FILL: usize = 256;

pub type ConnectionId = u64;

/// Why and how a socket is being closed, set once by whoever closes it first.
pub struct SocketControl {
    kick: CancellationToken,
    reason: Mutex<Option<(u16, &'static str)>>,
}

impl SocketControl {
    pub fn new() -> Self {
        SocketControl {
            kick: CancellationToken::new(),
            reason: Mutex::new(None),
        }
    }

    /// Ask the socket to close with `code`; the first reason given wins.
    pub fn close(&self, code: u16, reason: &'static str) {
        let mut slot = self
            .reason
            .lock()
            .expect("close reason lock is never poisoned");
        if slot.is_none() {
            *slot = Some((code, reason));
            metrics::counter!(telemetry::GATEWAY_CLOSES_TOTAL, "code" => code.to_string())
                .increment(1);
        }
        self.kick.cancel();
    }

    pub fn reason(&self) -> Option<(u16, &'static str)> {
        *self
            .reason
            .lock()
            .expect("close reason lock is never poisoned")
    }

    pub async fn closing(&self) {
        self.kick.cancelled().await
    }
}

/// The sending side of one socket: a bounded queue of serialized frames.
#[derive(Clone)]
pub struct Outbox {
    tx: mpsc::Sender<Utf8Bytes>,
    pub control: Arc<SocketControl>,
}

impl Outbox {
    pub fn new(capacity: usize) -> (Outbox, mpsc::Receiver<Utf8Bytes>) {
        let (tx, rx) = mpsc::channel(capacity);
        (
            Outbox {
                tx,
                control: Arc::new(SocketControl::new()),
            },
            rx,
        )
    }

    /// Queue a frame. A full queue means the client reads too slowly to keep up: it is
    /// closed rather than allowed to make the process grow.
    pub fn push(&self, frame: Utf8Bytes) {
        match self.tx.try_send(frame) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                self.control
                    .close(close::POLICY_VIOLATION, "slow consumer: send queue full");
            }
            Err(TrySendError::Closed(_)) => {}
        }
    }

    pub fn send(&self, frame: &ServerFrame) {
        self.push(Utf8Bytes::from(frame.to_json()));
    }
}

struct SocketEntry {
    user: UserId,
    /// The protocol version the socket speaks: it is sent only what that version knows.
    protocol: u32,
    outbox: Outbox,
    conversations: HashSet<ConversationId>,
}

struct ConversationRoute {
    sockets: HashSet<ConnectionId>,
    follower: JoinHandle<()>,
}

impl Drop for ConversationRoute {
    fn drop(&mut self) {
        // Dropping the follower drops its subscription, which unsubscribes from NATS.
        self.follower.abort();
    }
}

#[derive(Default)]
struct Table {
    sockets: HashMap<ConnectionId, SocketEntry>,
    users: HashMap<UserId, HashSet<ConnectionId>>,
    conversations: HashMap<ConversationId, ConversationRoute>,
}

/// The gateway's routing table.
pub struct Routes {
    table: Mutex<Table>,
    client: async_nats::Client,
    log: LogStream,
}

impl Routes {
    pub fn new(client: async_nats::Client, log: LogStream) -> Arc<Routes> {
        Arc::new(Routes {
            table: Mutex::new(Table::default()),
            client,
            log,
        })
    }

    fn table(&self) -> std::sync::MutexGuard<'_, Table> {
        self.table
            .lock()
            .expect("routing table lock is never poisoned")
    }

    pub fn register(&self, conn: ConnectionId, user: UserId, protocol: u32, outbox: Outbox) {
        let mut table = self.table();
        table.users.entry(user.clone()).or_default().insert(conn);
        table.sockets.insert(
            conn,
            SocketEntry {
                user,
                protocol,
                outbox,
                conversations: HashSet::new(),
            },
        );
    }

    /// Forget a socket; conversations left without local sockets are unsubscribed.
    pub fn unregister(&self, conn: ConnectionId) {
        let dropped: Vec<ConversationRoute> = {
            let mut table = self.table();
            let Some(entry) = table.sockets.remove(&conn) else {
                return;
            };
            if let Some(conns) = table.users.get_mut(&entry.user) {
                conns.remove(&conn);
                if conns.is_empty() {
                    table.users.remove(&entry.user);
                }
            }
            let dropped = entry
                .conversations
                .iter()
                .filter_map(|conversation| {
                    let route = table.conversations.get_mut(conversation)?;
                    route.sockets.remove(&conn);
                    if route.sockets.is_empty() {
                        table.conversations.remove(conversation)
                    } else {
                        None
                    }
                })
                .collect();
            shrink_if_sparse(&mut table.sockets);
            shrink_if_sparse(&mut table.users);
            shrink_if_sparse(&mut table.conversations);
            dropped
        };
        metrics::gauge!(telemetry::GATEWAY_CONVERSATION_SUBSCRIPTIONS)
            .decrement(dropped.len() as f64);
    }

    pub fn connections_of(&self, user: &UserId) -> Vec<ConnectionId> {
        self.table()
            .users
            .get(user)
            .map(|conns| conns.iter().copied().collect())
            .unwrap_or_default()
    }

    /// Whether socket `conn` follows `conversation`: then its user is a member, as the
    /// store or a live creation said.
    pub fn follows(&self, conn: ConnectionId, conversation: ConversationId) -> bool {
        self.table()
            .sockets
            .get(&conn)
            .is_some_and(|entry| entry.conversations.contains(&conversation))
    }

    /// Every open socket with its user, for presence heartbeats.
    pub fn snapshot(&self) -> Vec<(ConnectionId, UserId)> {
        self.table()
            .sockets
            .iter()
            .map(|(conn, entry)| (*conn, entry.user.clone()))
            .collect()
    }

    /// Make `conns` follow `conversation`. `baseline` is the newest sequence the caller
    /// knows these sockets have (or will have) seen; later events are delivered, and a
    /// gap after it is filled from the log.
    pub async fn follow(
        self: &Arc<Self>,
        conns: &[ConnectionId],
        conversation: ConversationId,
        baseline: u64,
    ) -> Result<(), async_nats::SubscribeError> {
        let needs_subscription = !self.table().conversations.contains_key(&conversation);
        let subscription = if needs_subscription {
            Some(self.client.subscribe(live_subject(conversation)).await?)
        } else {
            None
        };
        let mut table = self.table();
        let table = &mut *table;
        let conns: Vec<ConnectionId> = conns
            .iter()
            .copied()
            .filter(|conn| table.sockets.contains_key(conn))
            .collect();
        if conns.is_empty() {
            return Ok(());
        }
        let route = match table.conversations.entry(conversation) {
            Entry::Occupied(route) => route.into_mut(),
            Entry::Vacant(slot) => {
                let Some(subscription) = subscription else {
                    // Another caller created and then dropped the route between our checks;
                    // the next event of this conversation will bring the socket back in.
                    return Ok(());
                };
                let follower = tokio::spawn(follow_conversation(
                    Arc::downgrade(self),
                    conversation,
                    subscription,
                    baseline,
                ));
                metrics::gauge!(telemetry::GATEWAY_CONVERSATION_SUBSCRIPTIONS).increment(1.0);
                slot.insert(ConversationRoute {
                    sockets: HashSet::new(),
                    follower,
                })
            }
        };
        for conn in conns {
            route.sockets.insert(conn);
            if let Some(entry) = table.sockets.get_mut(&conn) {
                entry.conversations.insert(conversation);
            }
        }
        Ok(())
    }

    /// Make sure the server has every subscription made so far before events that depend
    /// on them are delivered to clients.
    pub async fn flush(&self) {
        if let Err(e) = self.client.flush().await {
            debug!(error = %e, "flush after subscribing failed");
        }
    }

    /// Queue `event` on every local socket following its conversation that speaks a
    /// protocol version knowing its type.
    fn fan_out(&self, event: RecordedEvent) {
        let since = event.envelope.event.since_protocol();
        let conversation = event.envelope.conversation;
        let delivered = self.push_to_followers(conversation, &event_frame(event), |_, protocol| {
            protocol >= since
        });
        metrics::counter!(telemetry::GATEWAY_EVENTS_DELIVERED_TOTAL).increment(delivered);
    }

    /// Queue `frame` on the local sockets following `conversation` that `wants`, given the
    /// socket's user and protocol version; how many.
    pub fn push_to_followers(
        &self,
        conversation: ConversationId,
        frame: &Utf8Bytes,
        wants: impl Fn(&UserId, u32) -> bool,
    ) -> u64 {
        let outboxes: Vec<Outbox> = {
            let table = self.table();
            let Some(route) = table.conversations.get(&conversation) else {
                return 0;
            };
            route
                .sockets
                .iter()
                .filter_map(|conn| table.sockets.get(conn))
                .filter(|entry| wants(&entry.user, entry.protocol))
                .map(|entry| entry.outbox.clone())
                .collect()
        };
        for outbox in &outboxes {
            outbox.push(frame.clone());
        }
        outboxes.len() as u64
    }

    /// Queue `frame` on the given sockets only; how many are still open.
    pub fn send_to(&self, conns: &[ConnectionId], frame: &Utf8Bytes) -> u64 {
        let table = self.table();
        let mut delivered = 0;
        for entry in conns.iter().filter_map(|conn| table.sockets.get(conn)) {
            entry.outbox.push(frame.clone());
            delivered += 1;
        }
        delivered
    }

    /// Read the events between `after` and `prev` (inclusive) from the log by walking the
    /// `prev` chain backwards; oldest first.
    async fn fill_gap(&self, after: u64, prev: u64) -> Vec<RecordedEvent> {
        let mut missing = Vec::new();
        let mut seq = prev;
        while seq > after && missing.len() < MAX_GAP_FILL {
            match self.log.direct_get(seq).await {
                Ok(message) => match EventEnvelope::from_bytes(&message.payload) {
                    Ok(envelope) => {
                        let next = envelope.prev;
                        missing.push(envelope.recorded(seq));
                        seq = next;
                    }
                    Err(e) => {
                        warn!(seq, error = %e, "cannot read an event while filling a gap");
                        break;
                    }
                },
                Err(e) => {
                    warn!(seq, error = %e, "cannot fetch an event while filling a gap");
                    break;
                }
            }
        }
        missing.reverse();
        metrics::counter!(telemetry::GATEWAY_GAP_FILLS_TOTAL).increment(1);
        missing
    }
}

/// Give back a table's memory once most of it is empty: a map keeps the capacity of its
/// busiest moment, and a reconnect storm would otherwise leave it sized for the storm.
/// Shrinking to twice the length when under a quarter full keeps the cost amortized.
fn shrink_if_sparse<K: Eq + std::hash::Hash, V>(map: &mut HashMap<K, V>) {
    const SMALLEST: usize = 64;
    if map.capacity() > SMALLEST && map.len() < map.capacity() / 4 {
        map.shrink_to((map.len() * 2).max(SMALLEST));
    }
}

pub fn event_frame(event: RecordedEvent) -> Utf8Bytes {
    Utf8Bytes::from(ServerFrame::Event { event }.to_json())
}

async fn follow_conversation(
    routes: Weak<Routes>,
    conversation: ConversationId,
    mut subscription: async_nats::Subscriber,
    mut last: u64,
) {
    while let Some(message) = subscription.next().await {
        if typing::is_ephemeral(&message) {
            if let Some(routes) = routes.upgrade() {
                typing::deliver(&routes, conversation, &message);
            }
            continue;
        }
        let event = match RecordedEvent::from_bytes(&message.payload) {
            Ok(event) => event,
            Err(e) => {
                warn!(%conversation, error = %e, "unreadable live event");
                continue;
            }
        };
        if event.seq <= last {
            continue;
        }
        let Some(routes) = routes.upgrade() else {
            return;
        };
        let span = tracing::debug_span!("event", %conversation, seq = event.seq);
        last = deliver(&routes, event, last).instrument(span).await;
    }
}

/// Deliver `event` after any events it shows were missed; the new newest sequence.
async fn deliver(routes: &Routes, event: RecordedEvent, mut last: u64) -> u64 {
    let mut batch = if last > 0 && event.envelope.prev > last {
        routes.fill_gap(last, event.envelope.prev).await
    } else {
        Vec::new()
    };
    batch.push(event);
    for event in batch {
        if event.seq <= last {
            continue;
        }
        last = event.seq;
        routes.fan_out(event);
    }
    last
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_full_send_queue_closes_the_socket_as_a_slow_consumer() {
        let (outbox, mut queue) = Outbox::new(2);
        outbox.push(Utf8Bytes::from_static("1"));
        outbox.push(Utf8Bytes::from_static("2"));
        assert_eq!(outbox.control.reason(), None);
        outbox.push(Utf8Bytes::from_static("3"));
        assert_eq!(
            outbox.control.reason(),
            Some((close::POLICY_VIOLATION, "slow consumer: send queue full"))
        );
        // The queue never grew past its bound.
        assert_eq!(queue.recv().await.as_deref(), Some("1"));
        assert_eq!(queue.recv().await.as_deref(), Some("2"));
        assert!(queue.try_recv().is_err());
    }

    #[test]
    fn a_table_emptied_after_a_storm_gives_its_capacity_back() {
        let mut map: HashMap<u64, u64> = (0..10_000).map(|n| (n, n)).collect();
        let busiest = map.capacity();
        for n in 0..10_000 {
            map.remove(&n);
            shrink_if_sparse(&mut map);
        }
        assert!(
            map.capacity() < busiest / 100,
            "{} of {busiest}",
            map.capacity()
        );
        // A table that stays busy is not reallocated on every removal.
        let mut map: HashMap<u64, u64> = (0..1000).map(|n| (n, n)).collect();
        let capacity = map.capacity();
        map.remove(&0);
        shrink_if_sparse(&mut map);
        assert_eq!(map.capacity(), capacity);
    }

    #[test]
    fn the_first_close_reason_wins() {
        let control = SocketControl::new();
        control.close(close::GOING_AWAY, "server shutting down");
        control.close(close::NORMAL, "idle timeout");
        assert_eq!(
            control.reason(),
            Some((close::GOING_AWAY, "server shutting down"))
        );
    }
}
