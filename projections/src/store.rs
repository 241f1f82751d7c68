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
}

/// A page of history, newest first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HistoryPage {
    pub messages: Vec<HistoryMessage>,
    /// Whether older messages exist below the last one returned.
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

    /// Cheap check that the store answers, for readiness.
    async fn check(&self) -> Result<(), StoreError>;
}
