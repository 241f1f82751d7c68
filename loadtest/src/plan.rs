//! Who connects where, who is in which conversation, and who sends how much.

use std::time::Duration;

use parley_events::UserId;

use crate::ledger::ConvIndex;
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

    /// Per conversation, the connections of its members.
    pub fn member_connections(&self, per_user: usize) -> Vec<Vec<usize>> {
        self.conversations
            .iter()
            .map(|conv| {
                conv.members
                    .iter()
                    .flat_map(|&u| u * per_user..(u + 1) * per_user)
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

    /// Size of the largest `create_group` frame this plan sends, to check it against the
    /// gateway's `max_frame_bytes`.
    pub fn largest_create_frame(&self) -> usize {
        self.conversations
            .iter()
            .filter(|c| c.kind == ConvKind::Group)
            .map(|c| {
                c.members
                    .iter()
                    .map(|&u| self.users[u].as_str().len() + 3)
                    .sum::<usize>()
                    + 96
            })
            .max()
            .unwrap_or(0)
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
        // Users 9..12 are idle; members' connections come in pairs.
        assert_eq!(plan.member_connections(2)[0], vec![0, 1, 2, 3]);
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
