//! One swappable conversation store handle: what gateways and the projector read and write
//! through, so `parley replay switch` can move them to another target without a restart.
//! Each call takes the handle current when it starts and finishes on it, so an in-flight
//! read completes on the old target after a swap.

use std::sync::{Arc, RwLock};

use async_trait::async_trait;
use parley_events::{ConversationId, Member, RecordedEvent, Role, UserId};
use parley_projections::{
    ConversationDetails, ConversationStore, ConversationView, EventsPage, HistoryPage, InboxEntry,
    MembersPage, StoreError,
};
use tokio::sync::watch;

use super::Target;

/// The store in use and the target it is, swapped whole.
pub struct ActiveStore {
    current: RwLock<(Target, Arc<dyn ConversationStore>)>,
    /// Bumped with each swap, carrying the log sequence from which a projector moving with
    /// it must project again (see [`ActiveStore::swap`]).
    swaps: watch::Sender<Option<u64>>,
}

impl ActiveStore {
    pub fn new(target: Target, store: Arc<dyn ConversationStore>) -> Arc<ActiveStore> {
        Arc::new(ActiveStore {
            current: RwLock::new((target, store)),
            swaps: watch::Sender::new(None),
        })
    }

    /// The store in use now.
    pub fn get(&self) -> Arc<dyn ConversationStore> {
        Arc::clone(&self.current.read().expect("never poisoned").1)
    }

    pub fn target(&self) -> Target {
        self.current.read().expect("never poisoned").0.clone()
    }

    /// Use `store` from now on. `project_from` is the sequence after which a projector
    /// writing through this handle projects again (the new target's position when the
    /// switch was made): every event above it reaches the new target, whatever another
    /// projector instance still acknowledged into the old one meanwhile.
    pub fn swap(&self, target: Target, store: Arc<dyn ConversationStore>, project_from: u64) {
        *self.current.write().expect("never poisoned") = (target, store);
        self.swaps.send_replace(Some(project_from));
    }

    /// Fires at every swap; the value is the swap's `project_from`.
    pub fn swaps(&self) -> watch::Receiver<Option<u64>> {
        self.swaps.subscribe()
    }
}

#[async_trait]
impl ConversationStore for ActiveStore {
    async fn apply(&self, events: &[RecordedEvent]) -> Result<(), StoreError> {
        self.get().apply(events).await
    }

    async fn position(&self) -> Result<u64, StoreError> {
        self.get().position().await
    }

    async fn conversation(
        &self,
        id: ConversationId,
    ) -> Result<Option<ConversationView>, StoreError> {
        self.get().conversation(id).await
    }

    async fn members(&self, id: ConversationId) -> Result<Vec<Member>, StoreError> {
        self.get().members(id).await
    }

    async fn details(&self, id: ConversationId) -> Result<Option<ConversationDetails>, StoreError> {
        self.get().details(id).await
    }

    async fn members_page(
        &self,
        id: ConversationId,
        after: Option<&UserId>,
        limit: u32,
    ) -> Result<MembersPage, StoreError> {
        self.get().members_page(id, after, limit).await
    }

    async fn role_of(&self, id: ConversationId, user: &UserId) -> Result<Option<Role>, StoreError> {
        self.get().role_of(id, user).await
    }

    async fn co_members(&self, user: &UserId, among: &[UserId]) -> Result<Vec<UserId>, StoreError> {
        self.get().co_members(user, among).await
    }

    async fn inbox(
        &self,
        user: &UserId,
        before: Option<u64>,
        limit: u32,
    ) -> Result<Vec<InboxEntry>, StoreError> {
        self.get().inbox(user, before, limit).await
    }

    async fn history(
        &self,
        id: ConversationId,
        before: Option<u64>,
        limit: u32,
    ) -> Result<HistoryPage, StoreError> {
        self.get().history(id, before, limit).await
    }

    async fn history_after(
        &self,
        id: ConversationId,
        after: u64,
        limit: u32,
    ) -> Result<HistoryPage, StoreError> {
        self.get().history_after(id, after, limit).await
    }

    async fn events_after(
        &self,
        id: ConversationId,
        after: u64,
        limit: u32,
    ) -> Result<EventsPage, StoreError> {
        self.get().events_after(id, after, limit).await
    }

    async fn read_marker(&self, id: ConversationId, user: &UserId) -> Result<u64, StoreError> {
        self.get().read_marker(id, user).await
    }

    async fn unread(
        &self,
        id: ConversationId,
        user: &UserId,
        after: u64,
    ) -> Result<u32, StoreError> {
        self.get().unread(id, user, after).await
    }

    async fn list_view(&self, user: &UserId, entries: &mut [InboxEntry]) -> Result<(), StoreError> {
        self.get().list_view(user, entries).await
    }

    async fn conversations_page(
        &self,
        after: Option<ConversationId>,
        limit: u32,
    ) -> Result<Vec<ConversationId>, StoreError> {
        self.get().conversations_page(after, limit).await
    }

    async fn check(&self) -> Result<(), StoreError> {
        self.get().check().await
    }
}
