//! Presence to clients (protocol version 2), subscribed on demand.
//!
//! A socket asks for the presence of some users (`presence`); the gateway keeps those that
//! share a conversation with the socket's user (one store query per request, plus the direct
//! conversations the socket follows, which the store may not hold yet), answers their
//! current status and pushes their changes from then on, until `presence_unsubscribe` or
//! the socket closes. A user with 10,000 contacts is sent only the changes of the users its
//! client asked about.
//!
//! The gateway holds one NATS subscription per watched user (`parley.presence.user.<user>`),
//! whatever the number of its sockets watching them; the presence projector publishes there
//! when the user comes online or goes offline. Current status comes from the projectors
//! (request/reply on `parley.query.presence`), which read Redis: gateways never reach Redis.
//! The watched user is subscribed to (and the subscription flushed) before the query, so a
//! change between the two is not missed; of a change and an answer, the one with the newer
//! `last_seen` wins.

use std::collections::hash_map::Entry;
use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use axum::extract::ws::Utf8Bytes;
use futures::StreamExt;
use parley_events::presence::{PresenceAnswer, PresenceQuery, UserStatus};
use parley_events::protocol::ServerFrame;
use parley_events::subjects::{PRESENCE_QUERY_SUBJECT, presence_user_subject};
use parley_events::{ClientMsgId, ConversationId, ErrorCode, UserId};
use tokio::task::JoinHandle;
use tracing::{debug, warn};

use super::Shared;
use super::delivery::{ConnectionId, Outbox, Routes};
use super::socket::Session;
use crate::telemetry;

/// Users one `presence` frame may name.
pub const MAX_USERS_PER_FRAME: usize = 100;
/// Users one socket may watch at once.
pub const MAX_WATCHED_PER_SOCKET: usize = 1000;
/// How long the gateway waits for the projectors' answer.
const QUERY_TIMEOUT: Duration = Duration::from_secs(2);

/// Which local sockets watch which users, and the newest status known of each.
pub struct Watchers {
    client: async_nats::Client,
    routes: Arc<Routes>,
    table: Mutex<Table>,
}

#[derive(Default)]
struct Table {
    users: HashMap<UserId, Watched>,
    sockets: HashMap<ConnectionId, HashSet<UserId>>,
}

struct Watched {
    sockets: HashSet<ConnectionId>,
    /// From an answer or a change, whichever has the newer `last_seen`.
    status: Option<UserStatus>,
    follower: JoinHandle<()>,
}

impl Drop for Watched {
    fn drop(&mut self) {
        // Dropping the follower drops its subscription, which unsubscribes from NATS.
        self.follower.abort();
    }
}

/// Why a `presence` request was not answered.
enum Refusal {
    Invalid(String),
    Unavailable(&'static str),
}

impl Watchers {
    pub fn new(client: async_nats::Client, routes: Arc<Routes>) -> Arc<Watchers> {
        Arc::new(Watchers {
            client,
            routes,
            table: Mutex::new(Table::default()),
        })
    }

    fn table(&self) -> std::sync::MutexGuard<'_, Table> {
        self.table
            .lock()
            .expect("presence table lock is never poisoned")
    }

    fn watched_by(&self, conn: ConnectionId) -> HashSet<UserId> {
        self.table().sockets.get(&conn).cloned().unwrap_or_default()
    }

    /// Make `conn` watch `users`, subscribing to those no local socket watched yet.
    async fn watch(
        self: &Arc<Self>,
        conn: ConnectionId,
        users: &[UserId],
    ) -> Result<(), &'static str> {
        // While NATS is away nothing could be asked or followed; saying so at once keeps
        // the socket's reader (and its pings) from waiting for NATS to come back.
        if !crate::node::connected(&self.client) {
            return Err("NATS is not connected");
        }
        let mut added = 0;
        let mut subscribed = 0;
        for user in users {
            let needs_subscription = !self.table().users.contains_key(user);
            let subscription = if needs_subscription {
                let subscription = self.client.subscribe(presence_user_subject(user)).await;
                Some(subscription.map_err(|_| "cannot subscribe to presence changes")?)
            } else {
                None
            };
            let mut table = self.table();
            let table = &mut *table;
            let watched = match table.users.entry(user.clone()) {
                Entry::Occupied(watched) => watched.into_mut(),
                Entry::Vacant(slot) => {
                    let Some(subscription) = subscription else {
                        // Subscribed and dropped by others between the two looks; the next
                        // request of this socket subscribes again.
                        continue;
                    };
                    subscribed += 1;
                    slot.insert(Watched {
                        sockets: HashSet::new(),
                        status: None,
                        follower: tokio::spawn(follow_user(Arc::downgrade(self), subscription)),
                    })
                }
            };
            if watched.sockets.insert(conn) {
                added += 1;
            }
            table.sockets.entry(conn).or_default().insert(user.clone());
        }
        metrics::gauge!(telemetry::GATEWAY_PRESENCE_WATCHED_USERS).increment(subscribed as f64);
        metrics::gauge!(telemetry::GATEWAY_PRESENCE_WATCHES).increment(added as f64);
        if subscribed > 0 {
            // A flush waits for a connection: one lost since the check above is given up on
            // like an unanswered query.
            match tokio::time::timeout(QUERY_TIMEOUT, self.client.flush()).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => debug!(error = %e, "flush after subscribing to presence failed"),
                Err(_) => return Err("NATS did not confirm the presence subscriptions in time"),
            }
        }
        Ok(())
    }

    /// Stop `conn` watching `users` (all of them when `None`); users left without local
    /// watchers are unsubscribed.
    pub fn unwatch(&self, conn: ConnectionId, users: Option<&[UserId]>) {
        let dropped: Vec<Watched> = {
            let mut table = self.table();
            let table = &mut *table;
            let Some(watching) = table.sockets.get_mut(&conn) else {
                return;
            };
            let leaving: Vec<UserId> = match users {
                Some(users) => users
                    .iter()
                    .filter(|user| watching.remove(*user))
                    .cloned()
                    .collect(),
                None => watching.drain().collect(),
            };
            if watching.is_empty() {
                table.sockets.remove(&conn);
            }
            metrics::gauge!(telemetry::GATEWAY_PRESENCE_WATCHES).decrement(leaving.len() as f64);
            leaving
                .iter()
                .filter_map(|user| {
                    let watched = table.users.get_mut(user)?;
                    watched.sockets.remove(&conn);
                    if watched.sockets.is_empty() {
                        table.users.remove(user)
                    } else {
                        None
                    }
                })
                .collect()
        };
        metrics::gauge!(telemetry::GATEWAY_PRESENCE_WATCHED_USERS).decrement(dropped.len() as f64);
    }

    /// Take in a status (an answer, or a change from the projector) unless an newer one is
    /// known; push it to the watching sockets but `except` when it flips online/offline.
    fn merge(&self, status: UserStatus, except: Option<ConnectionId>) -> UserStatus {
        let conns: Vec<ConnectionId> = {
            let mut table = self.table();
            let Some(watched) = table.users.get_mut(&status.user) else {
                return status;
            };
            if let Some(known) = &watched.status
                && known.last_seen > status.last_seen
            {
                return known.clone();
            }
            let flipped = watched
                .status
                .as_ref()
                .is_none_or(|known| known.online != status.online);
            watched.status = Some(status.clone());
            if !flipped {
                return status;
            }
            watched
                .sockets
                .iter()
                .copied()
                .filter(|conn| Some(*conn) != except)
                .collect()
        };
        if !conns.is_empty() {
            let frame = Utf8Bytes::from(ServerFrame::PresenceChanged(status.clone()).to_json());
            let pushed = self.routes.send_to(&conns, &frame);
            metrics::counter!(telemetry::GATEWAY_PRESENCE_PUSHES_TOTAL).increment(pushed);
        }
        status
    }

    /// The projectors' view of `users`, in order.
    async fn query(&self, users: Vec<UserId>) -> Result<Vec<UserStatus>, &'static str> {
        let count = users.len();
        let payload = PresenceQuery { users }.to_bytes();
        let reply = tokio::time::timeout(
            QUERY_TIMEOUT,
            self.client.request(PRESENCE_QUERY_SUBJECT, payload.into()),
        )
        .await
        .map_err(|_| "no presence projector answered in time")?
        .map_err(|e| {
            debug!(error = %e, "presence query failed");
            "no presence projector answered"
        })?;
        match PresenceAnswer::from_bytes(&reply.payload) {
            Ok(answer) if answer.users.len() == count => Ok(answer.users),
            _ => Err("the presence projector could not read presence"),
        }
    }
}

/// Push a watched user's changes to the sockets watching them, until nobody here does.
async fn follow_user(watchers: Weak<Watchers>, mut subscription: async_nats::Subscriber) {
    while let Some(message) = subscription.next().await {
        let status = match UserStatus::from_bytes(&message.payload) {
            Ok(status) => status,
            Err(e) => {
                warn!(error = %e, "unreadable presence change");
                continue;
            }
        };
        let Some(watchers) = watchers.upgrade() else {
            return;
        };
        watchers.merge(status, None);
    }
}

/// Answer a `presence` frame: the status of each of `users` the socket's user shares a
/// conversation with, now watched; the others as `not_visible`.
pub async fn handle_watch(
    shared: &Shared,
    session: &Session,
    outbox: &Outbox,
    id: ClientMsgId,
    users: Vec<UserId>,
) {
    let frame = match answer(shared, session, &id, users).await {
        Ok(frame) => frame,
        Err(Refusal::Invalid(message)) => {
            ServerFrame::error(Some(id), ErrorCode::InvalidRequest, message)
        }
        Err(Refusal::Unavailable(cause)) => {
            warn!(cause, "cannot answer a presence request");
            ServerFrame::error(
                Some(id),
                ErrorCode::Unavailable,
                "presence is temporarily unavailable",
            )
        }
    };
    if let ServerFrame::Error { code, .. } = &frame {
        metrics::counter!(telemetry::GATEWAY_FRAME_ERRORS_TOTAL, "code" => code.as_str())
            .increment(1);
    }
    outbox.answer(&frame).await;
}

async fn answer(
    shared: &Shared,
    session: &Session,
    id: &ClientMsgId,
    asked: Vec<UserId>,
) -> Result<ServerFrame, Refusal> {
    let mut seen = HashSet::new();
    let users: Vec<UserId> = asked
        .into_iter()
        .filter(|user| seen.insert(user.clone()))
        .collect();
    if users.is_empty() || users.len() > MAX_USERS_PER_FRAME {
        return Err(Refusal::Invalid(format!(
            "a presence request names 1 to {MAX_USERS_PER_FRAME} users"
        )));
    }
    let watchers = &shared.watchers;
    let already = watchers.watched_by(session.conn);
    // Only users new to this socket are checked: the others passed when first asked for.
    let new: Vec<UserId> = users
        .iter()
        .filter(|user| !already.contains(*user))
        .cloned()
        .collect();
    if already.len() + new.len() > MAX_WATCHED_PER_SOCKET {
        return Err(Refusal::Invalid(format!(
            "a socket watches at most {MAX_WATCHED_PER_SOCKET} users; unsubscribe some first"
        )));
    }
    let stored = shared
        .store
        .co_members(&session.user, &new)
        .await
        .map_err(|e| {
            warn!(error = %e, "conversation store read failed");
            Refusal::Unavailable("the conversation store cannot say who may be watched")
        })?;
    // A direct conversation the socket follows counts even before the store has it.
    let direct_peers = new.iter().filter(|user| {
        shared
            .routes
            .follows(session.conn, ConversationId::direct(&session.user, user))
    });
    let visible: HashSet<UserId> = stored
        .into_iter()
        .chain(direct_peers.cloned())
        .chain(already)
        .collect();
    let (watched, not_visible): (Vec<UserId>, Vec<UserId>) =
        users.into_iter().partition(|user| visible.contains(user));
    watchers
        .watch(session.conn, &watched)
        .await
        .map_err(Refusal::Unavailable)?;
    let statuses = if watched.is_empty() {
        Vec::new()
    } else {
        watchers
            .query(watched)
            .await
            .map_err(Refusal::Unavailable)?
            .into_iter()
            .map(|status| watchers.merge(status, Some(session.conn)))
            .collect()
    };
    Ok(ServerFrame::Presence {
        id: id.clone(),
        users: statuses,
        not_visible,
    })
}
