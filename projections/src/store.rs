//! The conversation store: conversations, members, messages and each user's inbox.

use async_trait::async_trait;
use parley_events::protocol::HistoryMessage;
use parley_events::{ConversationId, ConversationKind, Member, RecordedEvent, Role, UserId};

/// What kind of failure a store hit; callers decide on retries from this, not from text.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreErrorKind {
    /// The store cannot be reached or is busy; retrying later can succeed.
    Unavailable,
    /// The store's schema is missing, foreign or newer than this build.
    Schema,
    /// Stored data could not be read back.
    Corrupt,
    /// The store's settings cannot work as given (an unreadable or invalid TLS file);
    /// retrying cannot help.
    Config,
}

impl StoreErrorKind {
    /// A bounded label for metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            StoreErrorKind::Unavailable => "unavailable",
            StoreErrorKind::Schema => "schema",
            StoreErrorKind::Corrupt => "corrupt",
            StoreErrorKind::Config => "config",
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("conversation store {}: {message}", kind.as_str())]
pub struct StoreError {
    pub kind: StoreErrorKind,
    pub message: String,
}

impl StoreError {
    pub fn new(kind: StoreErrorKind, message: impl Into<String>) -> Self {
        StoreError {
            kind,
            message: message.into(),
        }
    }
}

/// A conversation as the store knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConversationView {
    pub id: ConversationId,
    pub kind: ConversationKind,
    pub title: Option<String>,
    /// Sequence of the conversation's newest event the store has applied.
    pub last_seq: u64,
}

/// What a conversation's detail view shows beyond [`ConversationView`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConversationDetails {
    pub view: ConversationView,
    /// Milliseconds since the Unix epoch of its `conversation.created`.
    pub created_at: u64,
    pub member_count: u64,
}

/// A page of a conversation's members, ordered by user id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MembersPage {
    pub members: Vec<Member>,
    /// Whether members with greater user ids exist beyond the last one returned.
    pub has_more: bool,
}

/// One line of a user's inbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InboxEntry {
    pub conversation: ConversationId,
    pub kind: ConversationKind,
    pub title: Option<String>,
    pub role: Role,
    pub last_seq: u64,
    /// Milliseconds since the Unix epoch of the newest event.
    pub last_activity_at: u64,
    /// The user's read marker (0: none). Left 0 by `inbox`; see
    /// [`ConversationStore::list_view`].
    pub read_seq: u64,
    /// Messages by others after the marker, at most [`UNREAD_CAP`]. Left 0 by `inbox`.
    pub unread: u32,
    /// The newest message. Left `None` by `inbox`.
    pub last_message: Option<HistoryMessage>,
}

/// Unread counts look at no more than this many messages after the marker, so a user away
/// for a month costs a bounded read: a count of `UNREAD_CAP` means "at least that many".
pub const UNREAD_CAP: u32 = 1000;

/// Conversations whose list-view details one `list_view` reads at once.
const LIST_VIEW_CONCURRENCY: usize = 16;

/// A page of history: newest first when paging backwards, oldest first when forwards.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HistoryPage {
    pub messages: Vec<HistoryMessage>,
    /// Whether more messages exist beyond the last one returned, in the page's direction.
    pub has_more: bool,
}

/// A page of a conversation's events, oldest first.
#[derive(Debug, Clone, PartialEq)]
pub struct EventsPage {
    /// Exactly as recorded in the log, every type.
    pub events: Vec<RecordedEvent>,
    /// Whether newer events exist after the last one returned.
    pub has_more: bool,
}

/// A materialized view of conversations, fed by the projector, read by gateways.
///
/// `apply` must be idempotent and order-insensitive: applying any permutation of a set of
/// events, with duplicates, leaves the same state as applying them once in log order. It
/// records the highest sequence of the batch as the store's position in the same atomic
/// step as the rows where the store supports that.
#[async_trait]
pub trait ConversationStore: Send + Sync + 'static {
    async fn apply(&self, events: &[RecordedEvent]) -> Result<(), StoreError>;

    /// The highest log sequence applied; 0 for an empty store.
    async fn position(&self) -> Result<u64, StoreError>;

    async fn conversation(
        &self,
        id: ConversationId,
    ) -> Result<Option<ConversationView>, StoreError>;

    async fn members(&self, id: ConversationId) -> Result<Vec<Member>, StoreError>;

    /// The conversation with its creation time and member count; `None` when unknown.
    async fn details(&self, id: ConversationId) -> Result<Option<ConversationDetails>, StoreError>;

    /// Members with a user id greater than `after` (from the first when `None`), ordered by
    /// user id, at most `limit`.
    async fn members_page(
        &self,
        id: ConversationId,
        after: Option<&UserId>,
        limit: u32,
    ) -> Result<MembersPage, StoreError>;

    async fn role_of(&self, id: ConversationId, user: &UserId) -> Result<Option<Role>, StoreError>;

    /// Those of `among` who share at least one conversation with `user` (in any order;
    /// `user` itself when it is a member of anything): whose presence `user` may see.
    async fn co_members(&self, user: &UserId, among: &[UserId]) -> Result<Vec<UserId>, StoreError>;

    /// The user's conversations, most recently active first, at most `limit`; with
    /// `before`, only those whose newest event is older than that sequence (the next page).
    async fn inbox(
        &self,
        user: &UserId,
        before: Option<u64>,
        limit: u32,
    ) -> Result<Vec<InboxEntry>, StoreError>;

    /// Messages with a sequence below `before` (all when `None`), newest first, at most
    /// `limit`.
    async fn history(
        &self,
        id: ConversationId,
        before: Option<u64>,
        limit: u32,
    ) -> Result<HistoryPage, StoreError>;

    /// Messages with a sequence above `after`, oldest first, at most `limit`.
    async fn history_after(
        &self,
        id: ConversationId,
        after: u64,
        limit: u32,
    ) -> Result<HistoryPage, StoreError>;

    /// Every event of the conversation with a sequence above `after`, oldest first, at most
    /// `limit`: the resume index. Only what the store has applied; an event still on its way
    /// through the projector is not there yet, so a caller that must not miss one reads the
    /// log above [`position`](Self::position).
    async fn events_after(
        &self,
        id: ConversationId,
        after: u64,
        limit: u32,
    ) -> Result<EventsPage, StoreError>;

    /// The user's read marker in the conversation: the `seq` of their newest
    /// `conversation.read`, 0 when they never set one.
    async fn read_marker(&self, id: ConversationId, user: &UserId) -> Result<u64, StoreError>;

    /// How many of the first [`UNREAD_CAP`] messages after `after` were sent by someone
    /// other than `user`.
    async fn unread(
        &self,
        id: ConversationId,
        user: &UserId,
        after: u64,
    ) -> Result<u32, StoreError>;

    /// Fill in what a conversation list shows beyond the inbox (`read_seq`, `unread`,
    /// `last_message`) for the user's `entries`: a separate step, because it costs a few
    /// reads per entry, up to [`UNREAD_CAP`] message rows for an unread one, which
    /// following the user's conversations at connect does not need.
    async fn list_view(&self, user: &UserId, entries: &mut [InboxEntry]) -> Result<(), StoreError> {
        use futures::{StreamExt, TryStreamExt};
        let wanted: Vec<(ConversationId, u64)> = entries
            .iter()
            .map(|e| (e.conversation, e.last_seq))
            .collect();
        let filled: Vec<(u64, u32, Option<HistoryMessage>)> = futures::stream::iter(wanted)
            .map(|(id, last_seq)| async move {
                let read_seq = self.read_marker(id, user).await?;
                let unread = if last_seq > read_seq {
                    self.unread(id, user, read_seq).await?
                } else {
                    0
                };
                let last = self.history(id, None, 1).await?.messages.pop();
                Ok::<_, StoreError>((read_seq, unread, last))
            })
            .buffered(LIST_VIEW_CONCURRENCY)
            .try_collect()
            .await?;
        for (entry, (read_seq, unread, last_message)) in entries.iter_mut().zip(filled) {
            entry.read_seq = read_seq;
            entry.unread = unread;
            entry.last_message = last_message;
        }
        Ok(())
    }

    /// Ids of the conversations the store holds rows for, at most `limit`, continuing after
    /// `after` (from the first when `None`) in the store's own order (fewer than `limit`:
    /// the last page). For tools that read everything (`parley replay verify`), not for
    /// serving: the order is the store's, not the ids'.
    async fn conversations_page(
        &self,
        after: Option<ConversationId>,
        limit: u32,
    ) -> Result<Vec<ConversationId>, StoreError>;

    /// Cheap check that the store answers, for readiness.
    async fn check(&self) -> Result<(), StoreError>;
}
