//! Conversations created in the last few minutes, by member. A socket that connects after a
//! conversation's creation went out live, but before the projector has stored it, would
//! otherwise not follow it until it reconnects.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use parley_events::{ConversationId, UserId};

/// How long a creation is remembered: far longer than the projector normally lags.
const KEEP: Duration = Duration::from_secs(300);
/// Most (member, conversation) pairs remembered; the oldest go first.
const MAX_ENTRIES: usize = 100_000;

#[derive(Default)]
pub struct RecentCreations {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    /// Per user, oldest first: the conversation and its creation's sequence.
    by_user: HashMap<UserId, VecDeque<(ConversationId, u64)>>,
    /// Every entry of `by_user`, oldest first, to expire them in order.
    order: VecDeque<(Instant, UserId)>,
}

impl RecentCreations {
    pub fn record<'a>(
        &self,
        conversation: ConversationId,
        seq: u64,
        members: impl IntoIterator<Item = &'a UserId>,
    ) {
        let now = Instant::now();
        let mut inner = self
            .inner
            .lock()
            .expect("recent creations lock is never poisoned");
        for member in members {
            inner
                .by_user
                .entry(member.clone())
                .or_default()
                .push_back((conversation, seq));
            inner.order.push_back((now, member.clone()));
        }
        inner.expire(now);
    }

    /// The user's conversations created recently, with their creation's sequence.
    pub fn of(&self, user: &UserId) -> Vec<(ConversationId, u64)> {
        let mut inner = self
            .inner
            .lock()
            .expect("recent creations lock is never poisoned");
        inner.expire(Instant::now());
        inner
            .by_user
            .get(user)
            .map(|entries| entries.iter().copied().collect())
            .unwrap_or_default()
    }
}

impl Inner {
    fn expire(&mut self, now: Instant) {
        while let Some((at, _)) = self.order.front() {
            if now.duration_since(*at) <= KEEP && self.order.len() <= MAX_ENTRIES {
                break;
            }
            let Some((_, user)) = self.order.pop_front() else {
                break;
            };
            if let Some(entries) = self.by_user.get_mut(&user) {
                entries.pop_front();
                if entries.is_empty() {
                    self.by_user.remove(&user);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remembers_by_member_and_forgets_the_oldest_past_the_bound() {
        let recent = RecentCreations::default();
        let (alice, bob) = (
            UserId::parse("alice").unwrap(),
            UserId::parse("bob").unwrap(),
        );
        let first = ConversationId::direct(&alice, &bob);
        recent.record(first, 1, [&alice, &bob]);
        assert_eq!(recent.of(&bob), vec![(first, 1)]);
        assert!(recent.of(&UserId::parse("carol").unwrap()).is_empty());
        let crowd: Vec<UserId> = (0..MAX_ENTRIES)
            .map(|i| UserId::parse(format!("u{i}")).unwrap())
            .collect();
        recent.record(
            ConversationId::from_uuid(uuid::Uuid::from_u128(9)),
            2,
            &crowd,
        );
        assert!(recent.of(&bob).is_empty(), "the oldest entries made room");
        assert_eq!(recent.of(&crowd[MAX_ENTRIES - 1]).len(), 1);
    }
}
