//! Resume: bring a socket up to date with its user's conversations, then make it live.
//!
//! The log's head `H` is read first. Everything of the user's conversations up to `H` comes
//! from the conversation store, once its position reaches `H` (a shared poller watches it);
//! when the store lags further than it catches up within [`STORE_WAIT`], the events between
//! its position and `H` are read from the log itself, so a lagging or rebuilding store never
//! makes a resume skip anything. Each conversation is then attached to its follower at the
//! newest sequence sent, and the follower delivers, or reads from the log, whatever came
//! after. Conversations created after `H` reach the socket when the resume ends.
//!
//! A version 1 socket resumes once, at connect, from now: nothing old is sent, it just
//! follows its conversations from their newest events.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parley_events::protocol::{
    MAX_RESUME_UNREAD, ResumeCursor, ResumeState, ResumeStatus, ServerFrame, UnreadCount,
};
use parley_events::{ClientMsgId, ConversationId, ErrorCode, RecordedEvent, UserId};
use parley_projections::{ConversationStore, InboxEntry, StoreError};
use tokio::sync::{Notify, watch};
use tracing::{debug, warn};

use super::Shared;
use super::delivery::{Outbox, event_frame, is_sent_to};
use super::socket::Session;
use crate::config::GatewayConfig;
use crate::log::LogError;
use crate::telemetry;

/// Most events of one conversation read from the store at once.
const STORE_PAGE: u32 = 200;
/// How long a resume waits for the store to reach the log's head before reading what the
/// store lacks from the log.
const STORE_WAIT: Duration = Duration::from_secs(1);
/// How often the store's position is read while a resume waits for it.
const STORE_POLL: Duration = Duration::from_millis(20);
/// Most events read from the log to cover what the store has not projected yet. A store
/// further behind (being rebuilt) makes resumes `unavailable` until it catches up.
pub const MAX_LOG_WINDOW: u64 = 4096;

#[derive(Debug, thiserror::Error)]
pub enum ResumeError {
    #[error("the conversation store is {behind} events behind the log")]
    StoreBehind { behind: u64 },
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Log(#[from] LogError),
    #[error("the socket closed during the resume")]
    Closed,
}

/// The store's position, read by one poller for every resume waiting on it.
pub struct StoreProgress {
    store: Arc<dyn ConversationStore>,
    position: watch::Sender<u64>,
    wanted: Notify,
}

impl StoreProgress {
    pub fn new(store: Arc<dyn ConversationStore>) -> Arc<Self> {
        Arc::new(StoreProgress {
            store,
            position: watch::Sender::new(0),
            wanted: Notify::new(),
        })
    }

    /// Poll the store's position while some resume waits for it.
    pub async fn run(self: Arc<Self>) {
        loop {
            if self.position.receiver_count() == 0 {
                self.wanted.notified().await;
            }
            match self.store.position().await {
                Ok(position) => {
                    self.position.send_replace(position);
                }
                Err(e) => debug!(error = %e, "cannot read the store's position"),
            }
            tokio::time::sleep(STORE_POLL).await;
        }
    }

    /// The store's position as soon as it reaches `target`, or as it stands after `wait`.
    async fn reach(&self, target: u64, wait: Duration) -> Result<u64, StoreError> {
        let mut position = self.store.position().await?;
        if position >= target {
            return Ok(position);
        }
        let mut polled = self.position.subscribe();
        polled.mark_unchanged();
        self.wanted.notify_one();
        let _ = tokio::time::timeout(wait, async {
            while polled.changed().await.is_ok() {
                position = *polled.borrow_and_update();
                if position >= target {
                    return;
                }
            }
        })
        .await;
        Ok(position)
    }
}

/// Where the client stands: per conversation, and for the rest a cursor (if any).
pub struct ResumePoint {
    pub cursor: Option<ResumeCursor>,
    pub conversations: BTreeMap<ConversationId, u64>,
}

/// What a resume ended with, for the `resumed` frame.
pub struct Resumed {
    pub cursor: ResumeCursor,
    pub conversations: Vec<ResumeStatus>,
    pub unread: Vec<UnreadCount>,
}

/// Answer a version 2 socket's `resume` frame: the events, then `resumed` (or an error).
pub async fn answer(
    shared: &Arc<Shared>,
    session: &Session,
    outbox: &Outbox,
    id: ClientMsgId,
    point: ResumePoint,
) {
    let frame = match resume(shared, session, outbox, point).await {
        Ok(resumed) => ServerFrame::Resumed {
            id,
            cursor: resumed.cursor,
            conversations: resumed.conversations,
            unread: resumed.unread,
        },
        Err(ResumeError::Closed) => return,
        Err(e) => {
            warn!(error = %e, "resume failed");
            ServerFrame::error(
                Some(id),
                ErrorCode::Unavailable,
                "cannot resume right now; try again",
            )
        }
    };
    outbox.answer(&frame).await;
}

/// A version 1 socket's connect: the events of the user's conversations since
/// `connected_at` (the log's head read before the socket was registered, so nothing that
/// happened after the client connected is missed), then live. When the store is too far
/// behind for that, follow what it lists.
pub async fn connect_v1(
    shared: &Arc<Shared>,
    session: &Session,
    outbox: &Outbox,
    connected_at: Option<u64>,
) {
    let point = ResumePoint {
        cursor: connected_at.map(ResumeCursor),
        conversations: BTreeMap::new(),
    };
    match resume(shared, session, outbox, point).await {
        Ok(_) | Err(ResumeError::Closed) => {}
        Err(e) => {
            warn!(error = %e, "cannot resume a new socket; following what the store lists");
            let inbox = followed(shared, session).await.unwrap_or_default();
            for entry in &inbox {
                attach(shared, session, entry.conversation, entry.last_seq).await;
            }
            let head = inbox.iter().map(|entry| entry.last_seq).max().unwrap_or(0);
            shared.routes.finish_resume(session.conn, head).await;
        }
    }
}

/// Send the socket what it lacks after `point`, within the resume's bounds, and make it
/// live in each conversation that caught up.
async fn resume(
    shared: &Arc<Shared>,
    session: &Session,
    outbox: &Outbox,
    point: ResumePoint,
) -> Result<Resumed, ResumeError> {
    let started = Instant::now();
    let first = shared.routes.begin_resume(session.conn);
    let result = resume_conversations(shared, session, outbox, point, first).await;
    let label = match &result {
        Ok(resumed)
            if resumed
                .conversations
                .iter()
                .any(|s| s.state == ResumeState::More) =>
        {
            "more"
        }
        Ok(_) => "live",
        Err(ResumeError::Closed) => "closed",
        Err(_) => "unavailable",
    };
    metrics::counter!(telemetry::GATEWAY_RESUMES_TOTAL, "result" => label).increment(1);
    metrics::histogram!(telemetry::GATEWAY_RESUME_SECONDS).record(started.elapsed().as_secs_f64());
    result
}

async fn resume_conversations(
    shared: &Arc<Shared>,
    session: &Session,
    outbox: &Outbox,
    point: ResumePoint,
    first: bool,
) -> Result<Resumed, ResumeError> {
    let bounds = shared.log.bounds().await?;
    let head = bounds.last;
    let position = shared.progress.reach(head, STORE_WAIT).await?;
    let window = if position >= head {
        Vec::new()
    } else if head - position > MAX_LOG_WINDOW {
        return Err(ResumeError::StoreBehind {
            behind: head - position,
        });
    } else {
        shared.log.range(position, head).await?
    };
    let (conversations, mut inbox) = conversations_at_head(shared, session, &window).await?;

    let cursor = point.cursor.filter(|_| first);
    let named = point.conversations;
    let theirs: HashSet<ConversationId> = conversations.iter().map(|&(c, _)| c).collect();
    let mut statuses: Vec<ResumeStatus> = named
        .keys()
        .filter(|conversation| !theirs.contains(conversation))
        .map(|conversation| ResumeStatus {
            conversation: *conversation,
            state: ResumeState::NotMember,
            seq: 0,
            first_seq: None,
        })
        .collect();
    let mut budget = Budget::new(&shared.config.gateway);
    let mut touched = HashSet::new();
    let mut subscribed = false;
    for &(conversation, last_seq) in &conversations {
        if !first && !named.contains_key(&conversation) {
            continue;
        }
        if shared.routes.follows(session.conn, conversation) {
            continue;
        }
        let Some(asked) = named
            .get(&conversation)
            .copied()
            .or(cursor.map(|cursor| cursor.0))
        else {
            subscribed |= attach(shared, session, conversation, last_seq).await;
            continue;
        };
        let truncated = asked + 1 < bounds.first;
        let from = if truncated { bounds.first - 1 } else { asked };
        let sent = if last_seq <= from {
            Sent {
                seq: from,
                complete: true,
            }
        } else {
            send_events(
                shared,
                outbox,
                &session.user,
                session.protocol,
                conversation,
                from,
                position,
                &window,
                &mut budget,
            )
            .await?
        };
        if sent.seq > from {
            touched.insert(conversation);
        }
        if sent.complete {
            subscribed |= attach(shared, session, conversation, sent.seq).await;
        } else if session.protocol < 2 {
            // A version 1 client cannot pull the rest: it follows from the newest event and
            // reads the gap with `history`, as it always has.
            subscribed |= attach(shared, session, conversation, last_seq).await;
        } else {
            statuses.push(ResumeStatus {
                conversation,
                state: ResumeState::More,
                seq: sent.seq,
                first_seq: None,
            });
        }
        if truncated {
            statuses.push(ResumeStatus {
                conversation,
                state: ResumeState::Truncated,
                seq: sent.seq,
                first_seq: Some(bounds.first),
            });
        }
    }
    if first {
        shared.routes.finish_resume(session.conn, head).await;
    }
    // Everything up to the cursor was sent, except in conversations left `more`.
    let behind = statuses
        .iter()
        .filter(|status| status.state == ResumeState::More)
        .map(|status| status.seq)
        .min();
    // The inbox is most recently active first: the counts kept are those of the
    // conversations a client shows on top.
    inbox.retain(|entry| touched.contains(&entry.conversation));
    inbox.truncate(MAX_RESUME_UNREAD);
    if session.protocol >= 2 && !inbox.is_empty() {
        shared.store.list_view(&session.user, &mut inbox).await?;
    }
    // Typing notices sent once the client reads its answer must reach it.
    if subscribed && session.protocol >= 2 {
        shared.routes.reach_server().await;
    }
    Ok(Resumed {
        cursor: ResumeCursor(behind.map_or(head, |seq| seq.min(head))),
        conversations: statuses,
        unread: inbox
            .into_iter()
            .map(|entry| UnreadCount {
                conversation: entry.conversation,
                read_seq: entry.read_seq,
                unread: entry.unread,
            })
            .collect(),
    })
}

/// The user's conversations as of the log's head, most recently active first, each with
/// its newest sequence: the store's list, with what the log `window` (the part the store
/// has not projected) adds. And the store's list itself.
async fn conversations_at_head(
    shared: &Shared,
    session: &Session,
    window: &[RecordedEvent],
) -> Result<(Vec<(ConversationId, u64)>, Vec<InboxEntry>), StoreError> {
    let inbox = followed(shared, session).await?;
    let mut newest: HashMap<ConversationId, u64> = inbox
        .iter()
        .map(|entry| (entry.conversation, entry.last_seq))
        .collect();
    for event in window {
        let conversation = event.envelope.conversation;
        let joins = (event.envelope.event.joining().iter()).any(|m| m.user == session.user);
        if event
            .envelope
            .event
            .departs(&session.user, &event.envelope.actor)
        {
            // Not a member at the head: nothing of it is sent, and it is not followed.
            newest.remove(&conversation);
        } else if joins || newest.contains_key(&conversation) {
            newest.insert(conversation, event.seq);
        }
    }
    let mut conversations: Vec<(ConversationId, u64)> = newest.into_iter().collect();
    conversations.sort_unstable_by_key(|&(_, last_seq)| std::cmp::Reverse(last_seq));
    Ok((conversations, inbox))
}

/// The user's conversations a socket follows, as the store lists them: the most recently
/// active `gateway.max_conversations_per_user`.
async fn followed(shared: &Shared, session: &Session) -> Result<Vec<InboxEntry>, StoreError> {
    let limit = shared.config.gateway.max_conversations_per_user;
    shared.store.inbox(&session.user, None, limit).await
}

/// How far a resume has gone through its bounds.
struct Budget {
    events: usize,
    bytes: usize,
    max_events: usize,
    max_bytes: usize,
}

impl Budget {
    fn new(config: &GatewayConfig) -> Self {
        Budget {
            events: 0,
            bytes: 0,
            max_events: config.resume_max_events as usize,
            max_bytes: config.resume_max_bytes,
        }
    }

    fn spent(&self) -> bool {
        self.events >= self.max_events || self.bytes >= self.max_bytes
    }

    /// Events that may still be sent.
    fn room(&self) -> usize {
        self.max_events.saturating_sub(self.events)
    }
}

/// How far one conversation got.
struct Sent {
    /// The newest sequence the socket has now.
    seq: u64,
    /// Whether it has everything up to the log's head.
    complete: bool,
}

/// Send the events of `conversation` after `from`: the store's, then the log window's,
/// until the budget is spent.
#[allow(clippy::too_many_arguments)]
async fn send_events(
    shared: &Shared,
    outbox: &Outbox,
    user: &UserId,
    protocol: u32,
    conversation: ConversationId,
    from: u64,
    store_position: u64,
    window: &[RecordedEvent],
    budget: &mut Budget,
) -> Result<Sent, ResumeError> {
    let mut seq = from;
    let send = async |event: RecordedEvent, budget: &mut Budget, source: &'static str| {
        if !is_sent_to(&event, user, protocol) {
            return true;
        }
        let frame = event_frame(event);
        budget.events += 1;
        budget.bytes += frame.len();
        metrics::counter!(telemetry::GATEWAY_RESUMED_EVENTS_TOTAL, "source" => source).increment(1);
        outbox.answer_with(frame).await
    };
    if seq < store_position {
        loop {
            if budget.spent() {
                return Ok(Sent {
                    seq,
                    complete: false,
                });
            }
            let room = budget.room().min(STORE_PAGE as usize) as u32;
            let page = shared.store.events_after(conversation, seq, room).await?;
            for event in page.events {
                seq = event.seq;
                if !send(event, budget, "store").await {
                    return Err(ResumeError::Closed);
                }
            }
            if !page.has_more {
                break;
            }
        }
    }
    let from_store = seq;
    for event in window
        .iter()
        .filter(|e| e.envelope.conversation == conversation && e.seq > from_store)
    {
        if budget.spent() {
            return Ok(Sent {
                seq,
                complete: false,
            });
        }
        seq = event.seq;
        if !send(event.clone(), budget, "log").await {
            return Err(ResumeError::Closed);
        }
    }
    Ok(Sent {
        seq,
        complete: true,
    })
}

/// Follow `conversation`; whether this gateway subscribed to it just now.
async fn attach(
    shared: &Arc<Shared>,
    session: &Session,
    conversation: ConversationId,
    seen: u64,
) -> bool {
    shared
        .routes
        .attach(session.conn, conversation, seen, None)
        .await
        .unwrap_or_else(|e| {
            warn!(error = %e, "cannot subscribe to a conversation");
            false
        })
}
