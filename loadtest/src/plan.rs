//! Who connects where, who is in which conversation, and who sends how much.

use std::time::Duration;

use parley_events::UserId;

use crate::ledger::{ConvIndex, Joined};
use crate::scenario::Scenario;
use crate::schedule::{self, Phase, SlotShare};

#[derive(Debug, Clone)]
pub struct ConnPlan {
    pub user: usize,
    pub gateway: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConvKind {
    Direct,
    Group,
}

#[derive(Debug, Clone)]
pub struct ConvPlan {
    pub kind: ConvKind,
    /// User indices; the first one creates the conversation.
    pub members: Vec<usize>,
    /// User indices that send in it.
    pub senders: Vec<usize>,
}

/// Members a `create_group` names besides its creator, and an `add_members` at most: the
/// gateways' default `limits.max_members_per_add`, and well inside the default frame limit
/// with the harness's user ids. A larger group is created, then filled by additions.
pub const SETUP_BATCH: usize = 1000;

impl ConvPlan {
    /// The users each set-up request makes members: the creation's (its creator first),
    /// then each addition's.
    pub fn batches(&self) -> Vec<&[usize]> {
        match self.kind {
            ConvKind::Direct => vec![&self.members[..]],
            ConvKind::Group => {
                let created = self.members.len().min(1 + SETUP_BATCH);
                std::iter::once(&self.members[..created])
                    .chain(self.members[created..].chunks(SETUP_BATCH))
                    .collect()
            }
        }
    }
}

/// One user sending in one conversation over one of its connections.
#[derive(Debug, Clone, Copy)]
pub struct SlotPlan {
    pub conversation: ConvIndex,
    pub connection: usize,
    pub share: SlotShare,
}

#[derive(Debug, Clone)]
pub struct Plan {
    pub users: Vec<UserId>,
    pub connections: Vec<ConnPlan>,
    pub conversations: Vec<ConvPlan>,
    pub slots: Vec<SlotPlan>,
    /// Rates over time, from the start of sending.
    pub phases: Vec<Phase>,
}

impl Plan {
    /// `tag` makes this run's user ids (and so its direct conversations) fresh, so a run
    /// against a long-lived platform never mixes with an earlier run's history.
    pub fn build(scenario: &Scenario, tag: &str, gateways: usize) -> Plan {
        let users: Vec<UserId> = (0..scenario.users)
            .map(|i| UserId::parse(format!("{tag}u{i}")).expect("tag and index form a valid id"))
            .collect();
        let per_user = scenario.connections_per_user;
        let connections = (0..scenario.users * per_user)
            .map(|c| ConnPlan {
                user: c / per_user,
                gateway: c % gateways.max(1),
            })
            .collect();

        let mut conversations = Vec::new();
        let mut next_user = 0;
        for _ in 0..scenario.conversations.direct_pairs {
            let members = vec![next_user, next_user + 1];
            next_user += 2;
            conversations.push(ConvPlan {
                kind: ConvKind::Direct,
                senders: members.clone(),
                members,
            });
        }
        for group in &scenario.conversations.groups {
            for _ in 0..group.count {
                let members: Vec<usize> = (next_user..next_user + group.size).collect();
                next_user += group.size;
                let senders = members[..group.senders.unwrap_or(group.size)].to_vec();
                conversations.push(ConvPlan {
                    kind: ConvKind::Group,
                    members,
                    senders,
                });
            }
        }

        // Slots user by user, so per-user shares can be computed from the counts.
        let mut slots_of_user: Vec<Vec<ConvIndex>> = vec![Vec::new(); scenario.users];
        for (index, conv) in conversations.iter().enumerate() {
            for &user in &conv.senders {
                slots_of_user[user].push(index as ConvIndex);
            }
        }
        let per_user_rate = scenario
            .rate
            .as_ref()
            .and_then(|rate| rate.per_user_per_sec);
        let shares = match per_user_rate {
            Some(_) => {
                schedule::per_user_shares(&slots_of_user.iter().map(Vec::len).collect::<Vec<_>>())
            }
            None => schedule::equal_shares(slots_of_user.iter().map(Vec::len).sum()),
        };
        let slots = slots_of_user
            .iter()
            .enumerate()
            .flat_map(|(user, convs)| {
                convs
                    .iter()
                    .enumerate()
                    .map(move |(n, &conversation)| (user, n, conversation))
            })
            .zip(shares)
            .map(|((user, n, conversation), share)| SlotPlan {
                conversation,
                // A user's conversations are spread over its connections.
                connection: user * per_user + n % per_user,
                share,
            })
            .collect();

        let sending_users = slots_of_user.iter().filter(|s| !s.is_empty()).count();
        let phases = match (&scenario.ramp, &scenario.rate) {
            (Some(ramp), _) => {
                schedule::stepped(&ramp.steps(), Duration::from_secs_f64(ramp.step_secs))
            }
            (None, Some(rate)) => vec![Phase {
                start: Duration::ZERO,
                length: scenario.sending_time(),
                rate: match (rate.messages_per_sec, per_user_rate) {
                    (Some(r), _) => r,
                    (None, Some(r)) => r * sending_users as f64,
                    (None, None) => 0.0,
                },
            }],
            (None, None) => Vec::new(),
        };

        Plan {
            users,
            connections,
            conversations,
            slots,
            phases,
        }
    }

    /// Per conversation, the connections of its members, each with the sequence of the
    /// set-up event that made its user a member: `joined[conversation][batch]`, the batches
    /// of [`ConvPlan::batches`].
    pub fn member_joins(&self, per_user: usize, joined: &[Vec<u64>]) -> Vec<Vec<Joined>> {
        self.conversations
            .iter()
            .zip(joined)
            .map(|(conv, seqs)| {
                conv.batches()
                    .iter()
                    .zip(seqs)
                    .flat_map(|(users, &seq)| {
                        users.iter().flat_map(move |&u| {
                            (u * per_user..(u + 1) * per_user).map(move |conn| Joined { conn, seq })
                        })
                    })
                    .collect()
            })
            .collect()
    }

    /// Messages the schedule offers in its first `until` (a ramp stops early).
    pub fn scheduled_messages(&self, until: Duration) -> usize {
        self.slots
            .iter()
            .map(|slot| {
                schedule::slot_times(slot.share, &self.phases)
                    .take_while(|t| *t < until)
                    .count()
            })
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scenario(text: &str) -> Scenario {
        Scenario::parse(text, "t").unwrap()
    }

    #[test]
    fn pairs_and_groups_get_their_own_users_and_spread_over_gateways() {
        let s = scenario(
            r#"
            name = "mix"
            users = 12
            connections_per_user = 2
            duration_secs = 2
            [conversations]
            direct_pairs = 2
            groups = [{ size = 5, count = 1, senders = 2 }]
            [rate]
            messages_per_sec = 60
            "#,
        );
        let plan = Plan::build(&s, "t1", 3);
        assert_eq!(plan.users.len(), 12);
        assert_eq!(plan.users[11].as_str(), "t1u11");
        assert_eq!(plan.connections.len(), 24);
        assert_eq!(plan.connections[4].gateway, 1);
        assert_eq!(plan.conversations.len(), 3);
        assert_eq!(plan.conversations[1].members, vec![2, 3]);
        assert_eq!(plan.conversations[2].members, (4..9).collect::<Vec<_>>());
        assert_eq!(plan.conversations[2].senders, vec![4, 5]);
        // Both users of each pair and two group members send: 6 slots sharing 60/s.
        assert_eq!(plan.slots.len(), 6);
        assert_eq!(plan.scheduled_messages(Duration::MAX), 120);
        assert_eq!(plan.scheduled_messages(Duration::from_secs(1)), 60);
        // Users 9..12 are idle; members' connections come in pairs, from their creation.
        let joins = plan.member_joins(2, &[vec![1], vec![2], vec![3]]);
        let conns: Vec<usize> = joins[0].iter().map(|j| j.conn).collect();
        assert_eq!(conns, vec![0, 1, 2, 3]);
        assert!(joins[2].iter().all(|j| j.seq == 3));
    }

    #[test]
    fn a_group_larger_than_a_batch_is_created_then_filled_by_additions() {
        let s = scenario(
            r#"
            name = "big"
            users = 2500
            duration_secs = 1
            [conversations]
            groups = [{ size = 2500, count = 1, senders = 1 }]
            [rate]
            messages_per_sec = 1
            "#,
        );
        let plan = Plan::build(&s, "t", 1);
        let batches = plan.conversations[0].batches();
        let sizes: Vec<usize> = batches.iter().map(|b| b.len()).collect();
        // The creator and 1,000 others, then additions of 1,000 and the last 499.
        assert_eq!(sizes, vec![1 + SETUP_BATCH, SETUP_BATCH, 499]);
        assert_eq!(batches[0][0], 0, "the creator comes first");
        let joins = plan.member_joins(1, &[vec![10, 11, 12]]);
        let seq_of = |conn: usize| joins[0].iter().find(|j| j.conn == conn).unwrap().seq;
        assert_eq!(
            (seq_of(0), seq_of(1000), seq_of(1001), seq_of(2499)),
            (10, 10, 11, 12)
        );
        assert_eq!(joins[0].len(), 2500);
    }

    #[test]
    fn per_user_rate_scales_with_sending_users() {
        let s = scenario(
            r#"
            name = "pu"
            users = 4
            duration_secs = 10
            [conversations]
            direct_pairs = 2
            [rate]
            per_user_per_sec = 0.5
            "#,
        );
        let plan = Plan::build(&s, "t", 1);
        assert_eq!(plan.phases[0].rate, 2.0);
        assert_eq!(plan.scheduled_messages(Duration::MAX), 20);
    }
}
