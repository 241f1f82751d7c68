//! Live delivery inside one gateway: which sockets are open, which users they belong to,
//! and which conversations they follow.
//!
//! A conversation with at least one local member socket has exactly one NATS subscription
//! here, whatever the number of those sockets; each event is serialized once and fanned
//! out to the sockets in process. The follower of a conversation delivers its events in
//! log order: it drops what it has already delivered and, when an event's `prev` shows it
//! missed some (the live path is at most once), fetches the missing ones from the log first.
//!
//! Each socket has its own position in each conversation it follows: the newest sequence it
//! has been sent. A socket is sent an event only when it has the event's `prev`, so it never
//! sees a gap or a repeat: a socket that joins a followed conversation behind the follower
//! (it resumed from an older point) is caught up from the log by the follower first, and
//! one that joins ahead of it (the store gave it newer events) skips what it already has.

use std::collections::hash_map::Entry;
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, Weak};

use axum::extract::ws::Utf8Bytes;
use bytes::Bytes;
use futures::StreamExt;
use parley_events::protocol::{ServerFrame, SystemEntry, close};
use parley_events::subjects::{BARRIER_SUBJECT, live_subject};
use parley_events::{ConversationId, RecordedEvent, UserId};
use tokio::sync::{Notify, Semaphore};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, warn};

use super::send_queue::{QueueReader, Queued, Refused, SendQueue};
use super::typing;
use crate::log::LogReader;
use crate::telemetry;

/// Most events fetched from the log to fill one gap or catch one socket up. A version 2
/// socket further behind than this is closed (1013) to resume again; a version 1 socket
/// sees the gap and reads it with `history`.
pub const MAX_GAP_FILL: usize = 256;
/// Most joins (creations, additions) kept for a socket while it resumes; more, and the
/// oldest are dropped.
const MAX_JOINS_WHILE_RESUMING: usize = 1024;

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

/// Answers to a socket's own requests that may wait in its queue; past this, whoever answers
/// waits, and the socket's reader with it, which pushes back on the client through TCP.
pub const MAX_QUEUED_ANSWERS: usize = 32;

/// The sending side of one socket: a bounded queue of serialized frames, with room for
/// `capacity` frames pushed to it (events) beside [`MAX_QUEUED_ANSWERS`] answers.
#[derive(Clone)]
pub struct Outbox {
    frames: Arc<SendQueue>,
    answers: Arc<Semaphore>,
    pub control: Arc<SocketControl>,
}

impl Outbox {
    pub fn new(capacity: usize) -> (Outbox, QueueReader) {
        let (frames, reader) = SendQueue::new(capacity + MAX_QUEUED_ANSWERS);
        (
            Outbox {
                frames,
                answers: Arc::new(Semaphore::new(MAX_QUEUED_ANSWERS)),
                control: Arc::new(SocketControl::new()),
            },
            reader,
        )
    }

    /// Queue a frame the server pushes. A full queue means the client reads too slowly to
    /// keep up with its conversations: it is closed rather than allowed to make the process
    /// grow.
    pub fn push(&self, frame: Utf8Bytes) {
        self.queue((frame, None));
    }

    pub fn send(&self, frame: &ServerFrame) {
        self.push(Utf8Bytes::from(frame.to_json()));
    }

    /// Queue the answer to one of the client's requests, once one of its answer slots is
    /// free: a client that sends requests faster than it reads their answers is slowed
    /// down, not closed. Answers always find room: the queue is full only when pushed
    /// frames overflowed it, which closes the socket.
    pub async fn answer(&self, frame: &ServerFrame) {
        self.answer_with(Utf8Bytes::from(frame.to_json())).await;
    }

    /// [`answer`](Self::answer) with a frame already serialized (the events a resume
    /// sends are its answer); false when the socket is closing.
    pub async fn answer_with(&self, frame: Utf8Bytes) -> bool {
        let slot = tokio::select! {
            () = self.control.closing() => return false,
            slot = Arc::clone(&self.answers).acquire_owned() => {
                slot.expect("the answer slots are never closed")
            }
        };
        self.queue((frame, Some(slot)));
        true
    }

    fn queue(&self, queued: Queued) {
        match self.frames.try_push(queued) {
            Ok(()) | Err(Refused::Closed) => {}
            Err(Refused::Full) => {
                self.control
                    .close(close::POLICY_VIOLATION, "slow consumer: send queue full");
            }
        }
    }
}

struct SocketEntry {
    user: UserId,
    /// The protocol version the socket speaks: it is sent only what that version knows.
    protocol: u32,
    outbox: Outbox,
    conversations: HashSet<ConversationId>,
    phase: Phase,
}

/// Where a socket stands in receiving its user's events.
enum Phase {
    /// Version 2, before its first resume: it is sent nothing yet.
    Waiting,
    /// Its resume is running: events making its user a member wait here until the resume
    /// ends, which hands over those the resume did not cover.
    Resuming(Vec<RecordedEvent>),
    /// Sent every event of the conversations it follows.
    Live,
}

struct ConversationRoute {
    /// Local sockets following the conversation, each with the newest sequence it was sent.
    sockets: HashMap<ConnectionId, u64>,
    /// The newest sequence the follower has handled.
    last: u64,
    /// Wakes the follower to catch up sockets that joined behind `last`.
    behind: Arc<Notify>,
    follower: JoinHandle<()>,
}

impl Drop for ConversationRoute {
    fn drop(&mut self) {
        // Dropping the follower drops its subscription, which unsubscribes from NATS.
        self.follower.abort();
        metrics::gauge!(telemetry::GATEWAY_CONVERSATION_SUBSCRIPTIONS).decrement(1.0);
    }
}

#[derive(Default)]
struct Table {
    sockets: HashMap<ConnectionId, SocketEntry>,
    users: HashMap<UserId, HashSet<ConnectionId>>,
    conversations: HashMap<ConversationId, ConversationRoute>,
}

impl Table {
    /// Take `conns` out of `conversation`; its route when no local socket is left in it,
    /// for the caller to drop (which unsubscribes) outside the lock.
    fn leave(
        &mut self,
        conversation: ConversationId,
        conns: &[ConnectionId],
    ) -> Option<ConversationRoute> {
        // Every event's fan-out asks, and almost none takes anyone out.
        if conns.is_empty() {
            return None;
        }
        for conn in conns {
            if let Some(entry) = self.sockets.get_mut(conn) {
                entry.conversations.remove(&conversation);
            }
        }
        let route = self.conversations.get_mut(&conversation)?;
        for conn in conns {
            route.sockets.remove(conn);
        }
        if route.sockets.is_empty() {
            self.conversations.remove(&conversation)
        } else {
            None
        }
    }
}

/// The gateway's routing table.
pub struct Routes {
    table: Mutex<Table>,
    client: async_nats::Client,
    log: LogReader,
}

impl Routes {
    pub fn new(client: async_nats::Client, log: LogReader) -> Arc<Routes> {
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

    /// Add a socket. A version 1 socket resumes at once (from now); a version 2 socket waits
    /// for its client's `resume`.
    pub fn register(&self, conn: ConnectionId, user: UserId, protocol: u32, outbox: Outbox) {
        let mut table = self.table();
        table.users.entry(user.clone()).or_default().insert(conn);
        let phase = if protocol >= 2 {
            Phase::Waiting
        } else {
            Phase::Resuming(Vec::new())
        };
        table.sockets.insert(
            conn,
            SocketEntry {
                user,
                protocol,
                outbox,
                conversations: HashSet::new(),
                phase,
            },
        );
    }

    /// Forget a socket; conversations left without local sockets are unsubscribed.
    pub fn unregister(&self, conn: ConnectionId) {
        let _dropped: Vec<ConversationRoute> = {
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
                .filter_map(|conversation| table.leave(*conversation, &[conn]))
                .collect();
            shrink_if_sparse(&mut table.sockets);
            shrink_if_sparse(&mut table.users);
            shrink_if_sparse(&mut table.conversations);
            dropped
        };
    }

    /// Every open socket with its user, for presence heartbeats.
    pub fn snapshot(&self) -> Vec<(ConnectionId, UserId)> {
        self.table()
            .sockets
            .iter()
            .map(|(conn, entry)| (*conn, entry.user.clone()))
            .collect()
    }

    /// Whether the socket follows `conversation` (it is live in it).
    pub fn follows(&self, conn: ConnectionId, conversation: ConversationId) -> bool {
        self.table()
            .sockets
            .get(&conn)
            .is_some_and(|entry| entry.conversations.contains(&conversation))
    }

    /// Start the socket's first resume; false when it has had one (it is live, and a
    /// further resume only continues conversations it does not follow yet).
    pub fn begin_resume(&self, conn: ConnectionId) -> bool {
        let mut table = self.table();
        let Some(entry) = table.sockets.get_mut(&conn) else {
            return false;
        };
        match entry.phase {
            Phase::Waiting => {
                entry.phase = Phase::Resuming(Vec::new());
                true
            }
            Phase::Resuming(_) => true,
            Phase::Live => false,
        }
    }

    /// End the socket's first resume, which covered the log up to `head`: from now on it is
    /// live, and it is handed the conversations created after `head` that it did not follow.
    pub async fn finish_resume(self: &Arc<Self>, conn: ConnectionId, head: u64) {
        let joins = {
            let mut table = self.table();
            let Some(entry) = table.sockets.get_mut(&conn) else {
                return;
            };
            match std::mem::replace(&mut entry.phase, Phase::Live) {
                Phase::Resuming(joins) => joins
                    .into_iter()
                    .filter(|joined| joined.seq > head)
                    .collect(),
                _ => Vec::new(),
            }
        };
        for joined in joins {
            self.join(&[conn], joined).await;
        }
    }

    /// An event brought members into a conversation (its creation, or an addition): their
    /// live sockets follow it from that event; sockets still resuming get it when their
    /// resume ends.
    pub async fn on_joined(self: &Arc<Self>, joined: RecordedEvent) {
        let live: Vec<ConnectionId> = {
            let mut table = self.table();
            let Table { sockets, users, .. } = &mut *table;
            let mut live = Vec::new();
            for member in joined.envelope.event.joining() {
                for conn in users.get(&member.user).into_iter().flatten() {
                    let Some(entry) = sockets.get_mut(conn) else {
                        continue;
                    };
                    match &mut entry.phase {
                        Phase::Waiting => {}
                        Phase::Resuming(joins) => {
                            if joins.len() == MAX_JOINS_WHILE_RESUMING {
                                warn!("too many joins while a socket resumes; dropping the oldest");
                                joins.remove(0);
                            }
                            joins.push(joined.clone());
                        }
                        Phase::Live => live.push(*conn),
                    }
                }
            }
            live
        };
        if !live.is_empty() {
            self.join(&live, joined).await;
        }
    }

    /// Send sockets the event that made their user a member, then follow the conversation
    /// from it. A socket already following it (its resume found the membership) is left as
    /// it is.
    async fn join(self: &Arc<Self>, conns: &[ConnectionId], joined: RecordedEvent) {
        let conversation = joined.envelope.conversation;
        let seq = joined.seq;
        let frame = event_frame(joined);
        for conn in conns {
            if self.follows(*conn, conversation) {
                continue;
            }
            match self.attach(*conn, conversation, seq, Some(&frame)).await {
                Ok(_) => {
                    metrics::counter!(telemetry::GATEWAY_EVENTS_DELIVERED_TOTAL).increment(1);
                }
                Err(e) => warn!(error = %e, "cannot subscribe to a conversation joined"),
            }
        }
    }

    /// Make the socket follow `conversation`, having been sent everything up to `seen`
    /// (the event at `seen` itself being `first`, when given: it is queued on the socket
    /// once the socket follows, ahead of anything later). Later events are delivered; if the
    /// follower is already past `seen`, it first catches the socket up from the log. A
    /// conversation new to this gateway is subscribed to (for a `first` frame, with the
    /// server holding the subscription before the socket is sent it, so ephemeral notices
    /// published after reach it), and what was appended after `seen` before the
    /// subscription existed is read from the log. Whether this gateway subscribed to the
    /// conversation just now.
    pub async fn attach(
        self: &Arc<Self>,
        conn: ConnectionId,
        conversation: ConversationId,
        seen: u64,
        first: Option<&Utf8Bytes>,
    ) -> Result<bool, async_nats::SubscribeError> {
        loop {
            let subscription = if self.table().conversations.contains_key(&conversation) {
                None
            } else {
                let subscription = self.client.subscribe(live_subject(conversation)).await?;
                // Only a join waits for the server to hold the subscription: its socket is
                // told it is a member now, and may be sent a typing notice at once. A
                // resume attaching many conversations waits once, before it answers.
                if first.is_some() {
                    self.reach_server().await;
                }
                Some(subscription)
            };
            let subscribed = subscription.is_some();
            let mut table = self.table();
            let table = &mut *table;
            let Some(entry) = table.sockets.get_mut(&conn) else {
                return Ok(false);
            };
            let route = match table.conversations.entry(conversation) {
                Entry::Occupied(route) => route.into_mut(),
                Entry::Vacant(slot) => {
                    let Some(subscription) = subscription else {
                        // The route went away between the two looks: subscribe after all.
                        continue;
                    };
                    let behind = Arc::new(Notify::new());
                    let follower = tokio::spawn(follow_conversation(
                        Arc::downgrade(self),
                        conversation,
                        subscription,
                        Arc::clone(&behind),
                        seen,
                    ));
                    metrics::gauge!(telemetry::GATEWAY_CONVERSATION_SUBSCRIPTIONS).increment(1.0);
                    slot.insert(ConversationRoute {
                        sockets: HashMap::new(),
                        last: seen,
                        behind,
                        follower,
                    })
                }
            };
            entry.conversations.insert(conversation);
            route.sockets.insert(conn, seen);
            if let Some(first) = first {
                entry.outbox.push(first.clone());
            }
            if seen < route.last {
                route.behind.notify_one();
            }
            return Ok(subscribed);
        }
    }

    /// Wait until the server has read everything this gateway sent before (its
    /// subscriptions): only then may a socket be told it is live in what they cover, since a
    /// notice published elsewhere after that must reach it. A flush is not enough: it only
    /// writes the bytes to the socket.
    pub async fn reach_server(&self) {
        match self.client.request(BARRIER_SUBJECT, Bytes::new()).await {
            Ok(_) => {}
            Err(e) if e.kind() == async_nats::RequestErrorKind::NoResponders => {}
            Err(e) => debug!(error = %e, "no round trip to the server; continuing"),
        }
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

    /// Queue an ephemeral `frame` (no sequence, no position) on the local sockets following
    /// `conversation` that `wants`, given the socket's user and protocol; how many.
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
                .keys()
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

    /// Deliver a live event after the events it shows the follower missed.
    async fn deliver(&self, conversation: ConversationId, event: RecordedEvent) {
        let Some(last) = self
            .table()
            .conversations
            .get(&conversation)
            .map(|r| r.last)
        else {
            return;
        };
        if event.seq <= last {
            return;
        }
        let mut batch = if event.envelope.prev > last {
            metrics::counter!(telemetry::GATEWAY_GAP_FILLS_TOTAL).increment(1);
            self.log
                .chain_back(last, event.envelope.prev, MAX_GAP_FILL)
                .await
                .events
        } else {
            Vec::new()
        };
        batch.push(event);
        for event in batch {
            self.fan_out(event);
        }
    }

    /// Queue `event` on every socket following its conversation that has the event before
    /// it and speaks a version knowing its type. Sockets that lack the event before it are
    /// left for a catch-up.
    fn fan_out(&self, event: RecordedEvent) {
        let conversation = event.envelope.conversation;
        let (outboxes, dropped) = {
            let mut table = self.table();
            let Table {
                sockets,
                conversations,
                ..
            } = &mut *table;
            let Some(route) = conversations.get_mut(&conversation) else {
                return;
            };
            if event.seq <= route.last {
                return;
            }
            route.last = event.seq;
            let mut behind = false;
            let mut outboxes = Vec::new();
            let mut departed = Vec::new();
            for (conn, sent) in &mut route.sockets {
                if *sent >= event.seq {
                    continue;
                }
                if *sent < event.envelope.prev {
                    behind = true;
                    continue;
                }
                *sent = event.seq;
                if let Some(entry) = sockets.get(conn) {
                    if is_sent_to(&event, &entry.user, entry.protocol) {
                        outboxes.push(entry.outbox.clone());
                    }
                    if departs(&event, &entry.user) {
                        departed.push(*conn);
                    }
                }
            }
            if behind {
                route.behind.notify_one();
            }
            let dropped = table.leave(conversation, &departed);
            (outboxes, dropped)
        };
        drop(dropped);
        if outboxes.is_empty() {
            return;
        }
        let frame = event_frame(event);
        for outbox in &outboxes {
            outbox.push(frame.clone());
        }
        metrics::counter!(telemetry::GATEWAY_EVENTS_DELIVERED_TOTAL)
            .increment(outboxes.len() as u64);
    }

    /// Send the sockets of `conversation` that are behind the follower what they lack, read
    /// from the log. One that is too far behind is closed, to resume again.
    async fn catch_up(&self, conversation: ConversationId) {
        let (furthest_behind, last) = {
            let table = self.table();
            let Some(route) = table.conversations.get(&conversation) else {
                return;
            };
            let Some(furthest_behind) = route.sockets.values().copied().min() else {
                return;
            };
            (furthest_behind, route.last)
        };
        if furthest_behind >= last {
            return;
        }
        let chain = self
            .log
            .chain_back(furthest_behind, last, MAX_GAP_FILL)
            .await;
        let first_prev = chain.events.first().map(|e| e.envelope.prev);
        // Serialized once, however many sockets this catches up.
        let frames: Vec<Utf8Bytes> = chain.events.iter().cloned().map(event_frame).collect();
        let mut table = self.table();
        let Table {
            sockets,
            conversations,
            ..
        } = &mut *table;
        let Some(route) = conversations.get_mut(&conversation) else {
            return;
        };
        let mut departed = Vec::new();
        for (conn, sent) in &mut route.sockets {
            if *sent >= route.last {
                continue;
            }
            let Some(entry) = sockets.get(conn) else {
                continue;
            };
            let reachable = chain.complete || first_prev.is_some_and(|prev| *sent >= prev);
            // A version 2 client resumes exactly; a version 1 client never could, and
            // reads the gap with `history` as it always has.
            if !reachable && entry.protocol >= 2 {
                metrics::counter!(telemetry::GATEWAY_CATCH_UPS_TOTAL, "result" => "closed")
                    .increment(1);
                entry
                    .outbox
                    .control
                    .close(close::TRY_AGAIN_LATER, "fell behind a conversation: resume");
                continue;
            }
            for (event, frame) in chain.events.iter().zip(&frames) {
                if event.seq <= *sent {
                    continue;
                }
                if is_sent_to(event, &entry.user, entry.protocol) {
                    entry.outbox.push(frame.clone());
                }
                if departs(event, &entry.user) {
                    departed.push(*conn);
                    break;
                }
            }
            *sent = route.last;
            metrics::counter!(telemetry::GATEWAY_CATCH_UPS_TOTAL, "result" => "caught_up")
                .increment(1);
        }
        let dropped = table.leave(conversation, &departed);
        drop(table);
        drop(dropped);
    }
}

/// Whether `event` is the last one of its conversation that `user`'s sockets get: it
/// removes the user from it. Sent, and then they stop following.
fn departs(event: &RecordedEvent, user: &UserId) -> bool {
    event.envelope.event.departs(user, &event.envelope.actor)
}

/// Whether a socket of `user` speaking `protocol` is sent `event` at all, live or by a
/// resume: only event types its version knows, and a read marker only to its reader.
pub fn is_sent_to(event: &RecordedEvent, user: &UserId, protocol: u32) -> bool {
    let envelope = &event.envelope;
    envelope.event.since_protocol() <= protocol
        && (!envelope.event.only_for_actor() || envelope.actor == *user)
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
    let system = SystemEntry::of(&event);
    Utf8Bytes::from(ServerFrame::Event { event, system }.to_json())
}

async fn follow_conversation(
    routes: Weak<Routes>,
    conversation: ConversationId,
    mut subscription: async_nats::Subscriber,
    behind: Arc<Notify>,
    subscribed_after: u64,
) {
    // What was appended after `subscribed_after` went out live before this subscription
    // existed. The subscription is on the same connection as these reads, so the server
    // has it before it answers them: anything appended later arrives live.
    if let Some(routes) = routes.upgrade() {
        match routes
            .log
            .conversation_after(conversation, subscribed_after, MAX_GAP_FILL)
            .await
        {
            Ok(missed) => {
                for event in missed {
                    routes.deliver(conversation, event).await;
                }
            }
            Err(e) => {
                warn!(%conversation, error = %e, "cannot read what a new subscription missed")
            }
        }
    }
    loop {
        tokio::select! {
            message = subscription.next() => {
                let Some(message) = message else {
                    return;
                };
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
                let Some(routes) = routes.upgrade() else {
                    return;
                };
                let span = tracing::debug_span!("event", %conversation, seq = event.seq);
                routes.deliver(conversation, event).instrument(span).await;
            }
            () = behind.notified() => {
                let Some(routes) = routes.upgrade() else {
                    return;
                };
                routes.catch_up(conversation).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_full_send_queue_closes_the_socket_as_a_slow_consumer() {
        let (outbox, mut queue) = Outbox::new(2);
        let pushed = 2 + MAX_QUEUED_ANSWERS;
        for n in 0..pushed {
            outbox.push(Utf8Bytes::from(n.to_string()));
        }
        assert_eq!(outbox.control.reason(), None);
        outbox.push(Utf8Bytes::from_static("one too many"));
        assert_eq!(
            outbox.control.reason(),
            Some((close::POLICY_VIOLATION, "slow consumer: send queue full"))
        );
        // The queue never grew past its bound.
        for n in 0..pushed {
            assert_eq!(queue.recv().await.0.as_str(), n.to_string());
        }
        assert!(queue.try_recv().is_none());
    }

    #[tokio::test]
    async fn answers_wait_for_room_instead_of_closing_the_socket() {
        let (outbox, mut queue) = Outbox::new(2);
        let pong = ServerFrame::Pong { id: None };
        for _ in 0..MAX_QUEUED_ANSWERS {
            outbox.answer(&pong).await;
        }
        let mut waiting = std::pin::pin!(outbox.answer(&pong));
        assert!(futures::poll!(waiting.as_mut()).is_pending());
        // Pushed frames still have their own room.
        outbox.push(Utf8Bytes::from_static("event"));
        outbox.push(Utf8Bytes::from_static("event"));
        assert_eq!(outbox.control.reason(), None);
        drop(queue.recv().await);
        waiting.await;
        assert_eq!(outbox.control.reason(), None);
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
        // A table still over a quarter full is not reallocated. (A removal may leave a
        // tombstone, which `capacity` counts as used, so it can drop by one per removal
        // without any reallocation; shrinking to twice the length would drop it by far more.)
        let mut map: HashMap<u64, u64> = (0..10_000).map(|n| (n, n)).collect();
        let capacity = map.capacity();
        let removed = 6_000;
        for n in 0..removed {
            map.remove(&n);
            shrink_if_sparse(&mut map);
        }
        assert!(map.len() > capacity / 4);
        assert!(
            map.capacity() >= capacity - removed as usize,
            "{} of {capacity}",
            map.capacity()
        );
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
