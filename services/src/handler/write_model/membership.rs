//! The write model's membership rules: who may add, remove, promote, rename, mute and
//! leave (the permission table in docs/protocol.md), the group caps, the last-owner rule,
//! and mutes. Groups only: a direct conversation's two members are fixed.

use parley_events::event::{
    ConversationRenamed, MemberLeft, MemberMuted, MemberRoleChanged, MemberUnmuted, MembersAdded,
    MembersRemoved,
};
use parley_events::protocol::{MAX_MUTE_SECONDS, rfc3339};
use parley_events::{Action, Command, ConversationKind, ErrorCode, Event, Member, Role, UserId};

use super::Aggregate;
use crate::config::LimitsConfig;

type Refusal = (ErrorCode, String);

fn refuse<T>(code: ErrorCode, message: impl Into<String>) -> Result<T, Refusal> {
    Err((code, message.into()))
}

/// The checks a group title must pass, at creation and on rename; the gateway makes them
/// too, at the edge.
pub fn check_title(title: &str, limits: &LimitsConfig) -> Result<(), Refusal> {
    if title.trim().is_empty() {
        return refuse(ErrorCode::InvalidRequest, "a group title must not be blank");
    }
    if title.len() > limits.max_title_bytes {
        return refuse(
            ErrorCode::InvalidRequest,
            format!("a group title is at most {} bytes", limits.max_title_bytes),
        );
    }
    Ok(())
}

/// The checks on the size of a batch of users, made at the edge and in the write model.
pub fn check_batch(users: &[UserId], limits: &LimitsConfig) -> Result<(), Refusal> {
    if users.is_empty() {
        return refuse(ErrorCode::InvalidRequest, "name at least one user");
    }
    if users.len() > limits.max_members_per_add {
        return refuse(
            ErrorCode::InvalidRequest,
            format!(
                "one request names at most {} users",
                limits.max_members_per_add
            ),
        );
    }
    Ok(())
}

/// The checks on a mute's length, at the edge and in the write model.
pub fn check_mute_seconds(seconds: u64) -> Result<(), Refusal> {
    if !(1..=MAX_MUTE_SECONDS).contains(&seconds) {
        return refuse(
            ErrorCode::InvalidRequest,
            format!("a mute lasts 1 to {MAX_MUTE_SECONDS} seconds"),
        );
    }
    Ok(())
}

/// `muted` when `user` is muted at `now` (milliseconds since the Unix epoch).
pub fn check_not_muted(aggregate: &Aggregate, user: &UserId, now: u64) -> Result<(), Refusal> {
    match aggregate.mutes.get(user) {
        Some(&until) if until > now => refuse(
            ErrorCode::Muted,
            format!(
                "you are muted in this conversation until {}",
                rfc3339(until)
            ),
        ),
        _ => Ok(()),
    }
}

fn owners(aggregate: &Aggregate) -> usize {
    aggregate
        .members
        .values()
        .filter(|role| **role == Role::Owner)
        .count()
}

/// The role of `user`, a member named by the request (not the actor).
fn target_role(aggregate: &Aggregate, user: &UserId) -> Result<Role, Refusal> {
    aggregate.members.get(user).copied().ok_or_else(|| {
        (
            ErrorCode::InvalidRequest,
            format!("{user} is not a member of this conversation"),
        )
    })
}

fn forbidden<T>(what: &str) -> Result<T, Refusal> {
    refuse(
        ErrorCode::Forbidden,
        format!("your role does not allow {what}"),
    )
}

/// Whether a member of role `actor` may remove or mute one of role `target`: admins act on
/// plain members only, owners on anyone but owners, or on owners too when `owners_too`
/// (a removal: the owner acting stays, so the group keeps an owner).
fn may_moderate(actor: Role, target: Role, owners_too: bool) -> bool {
    match actor {
        Role::Owner => owners_too || target != Role::Owner,
        Role::Admin => target == Role::Member,
        Role::Member => false,
    }
}

/// The event a membership command appends to `aggregate` (the actor is a member of it),
/// or why it is refused.
pub fn decide(
    aggregate: &Aggregate,
    actor_role: Role,
    command: &Command,
    limits: &LimitsConfig,
) -> Result<Event, Refusal> {
    if aggregate.kind != ConversationKind::Group {
        return refuse(
            ErrorCode::InvalidRequest,
            "a direct conversation's members cannot change",
        );
    }
    let actor = &command.actor;
    let naming_self = |user: &UserId, what: &str| {
        if user == actor {
            refuse(
                ErrorCode::InvalidRequest,
                format!("you cannot {what} yourself; leave is the way out"),
            )
        } else {
            Ok(())
        }
    };
    Ok(match &command.action {
        Action::AddMembers { users, .. } => {
            if actor_role == Role::Member {
                return forbidden("adding members");
            }
            check_batch(users, limits)?;
            let mut new: Vec<UserId> = users
                .iter()
                .filter(|user| !aggregate.members.contains_key(*user))
                .cloned()
                .collect();
            new.sort();
            new.dedup();
            if new.is_empty() {
                return refuse(
                    ErrorCode::InvalidRequest,
                    "every user named is already a member",
                );
            }
            if aggregate.members.len() + new.len() > limits.max_group_members {
                return refuse(
                    ErrorCode::InvalidRequest,
                    format!("a group has at most {} members", limits.max_group_members),
                );
            }
            Event::MembersAdded(MembersAdded {
                members: new
                    .into_iter()
                    .map(|user| Member {
                        user,
                        role: Role::Member,
                    })
                    .collect(),
            })
        }
        Action::RemoveMembers { users, .. } => {
            if actor_role == Role::Member {
                return forbidden("removing members");
            }
            check_batch(users, limits)?;
            let mut removed = Vec::new();
            for user in users {
                naming_self(user, "remove")?;
                // Users who are not members are left out, like members on an add.
                let Some(&role) = aggregate.members.get(user) else {
                    continue;
                };
                if !may_moderate(actor_role, role, true) {
                    return forbidden(&format!("removing {user}, who is an {}", role.as_str()));
                }
                removed.push(user.clone());
            }
            removed.sort();
            removed.dedup();
            if removed.is_empty() {
                return refuse(
                    ErrorCode::InvalidRequest,
                    "none of the users named is a member",
                );
            }
            Event::MembersRemoved(MembersRemoved { users: removed })
        }
        Action::Leave { .. } => {
            if actor_role == Role::Owner && owners(aggregate) == 1 {
                return refuse(
                    ErrorCode::LastOwner,
                    "you are the group's last owner: make another member an owner first",
                );
            }
            Event::MemberLeft(MemberLeft {})
        }
        Action::SetRole { user, role, .. } => {
            if user == actor {
                // Stepping down: refused for everyone (leave is the way out), and the last
                // owner is told the reason that matters most.
                if actor_role == Role::Owner && owners(aggregate) == 1 {
                    return refuse(
                        ErrorCode::LastOwner,
                        "you are the group's last owner: make another member an owner first",
                    );
                }
                naming_self(user, "change the role of")?;
            }
            if actor_role != Role::Owner {
                return forbidden("changing roles");
            }
            if target_role(aggregate, user)? == *role {
                return refuse(
                    ErrorCode::InvalidRequest,
                    format!("{user} is already an {}", role.as_str()),
                );
            }
            Event::MemberRoleChanged(MemberRoleChanged {
                user: user.clone(),
                role: *role,
            })
        }
        Action::Rename { title, .. } => {
            if actor_role == Role::Member {
                return forbidden("renaming the group");
            }
            if let Some(title) = title {
                check_title(title, limits)?;
            }
            Event::ConversationRenamed(ConversationRenamed {
                title: title.clone(),
            })
        }
        Action::Mute { user, seconds, .. } => {
            naming_self(user, "mute")?;
            check_mute_seconds(*seconds)?;
            let role = target_role(aggregate, user)?;
            if !may_moderate(actor_role, role, false) {
                return forbidden(&format!("muting {user}, who is an {}", role.as_str()));
            }
            Event::MemberMuted(MemberMuted {
                user: user.clone(),
                until: command.issued_at.saturating_add(seconds * 1000),
            })
        }
        Action::Unmute { user, .. } => {
            let role = target_role(aggregate, user)?;
            if !may_moderate(actor_role, role, false) {
                return forbidden(&format!("unmuting {user}, who is an {}", role.as_str()));
            }
            if aggregate
                .mutes
                .get(user)
                .is_none_or(|until| *until <= command.issued_at)
            {
                return refuse(ErrorCode::InvalidRequest, format!("{user} is not muted"));
            }
            Event::MemberUnmuted(MemberUnmuted { user: user.clone() })
        }
        Action::CreateDirect { .. }
        | Action::CreateGroup { .. }
        | Action::PostMessage { .. }
        | Action::MarkRead { .. }
        | Action::EditMessage { .. }
        | Action::DeleteMessage { .. }
        | Action::React { .. }
        | Action::Unreact { .. } => unreachable!("not a membership command"),
    })
}

/// Bring `aggregate` up to a membership event by `actor`. A member who goes loses their
/// mute and read marker with them, so the aggregate stays bounded by its members.
pub fn apply(aggregate: &mut Aggregate, actor: &UserId, event: &Event) {
    let gone = |aggregate: &mut Aggregate, user: &UserId| {
        aggregate.members.remove(user);
        aggregate.mutes.remove(user);
        aggregate.read.remove(user);
    };
    match event {
        Event::MembersAdded(added) => {
            for member in &added.members {
                aggregate.members.insert(member.user.clone(), member.role);
            }
        }
        Event::MembersRemoved(removed) => {
            for user in &removed.users {
                gone(aggregate, user);
            }
        }
        Event::MemberLeft(_) => gone(aggregate, actor),
        Event::MemberRoleChanged(changed) => {
            if let Some(role) = aggregate.members.get_mut(&changed.user) {
                *role = changed.role;
            }
        }
        Event::MemberMuted(muted) => {
            aggregate.mutes.insert(muted.user.clone(), muted.until);
        }
        Event::MemberUnmuted(unmuted) => {
            aggregate.mutes.remove(&unmuted.user);
        }
        Event::ConversationRenamed(_)
        | Event::ConversationCreated(_)
        | Event::MessagePosted(_)
        | Event::ConversationRead(_)
        | Event::MessageEdited(_)
        | Event::MessageDeleted(_)
        | Event::ReactionAdded(_)
        | Event::ReactionRemoved(_) => {}
    }
}

#[cfg(test)]
mod tests {
    //! Given the events of some commands, when a membership command comes, then this event
    //! or this refusal.

    use parley_events::ConversationId;
    use parley_events::subjects::Shards;

    use super::super::test_support::{command, command_at, user};
    use super::super::{Accepted, Decision, WriteModel};
    use super::*;

    fn users(names: &[&str]) -> Vec<UserId> {
        names.iter().map(|name| user(name)).collect()
    }

    /// alice (owner) creates a group with bob, carol, dave, erin and fay; the setup then
    /// makes carol and fay admins and erin a second owner, through the model's own rules.
    fn create() -> Command {
        command(
            "alice",
            "g",
            Action::CreateGroup {
                title: Some("team".into()),
                members: users(&["bob", "carol", "dave", "erin", "fay"]),
            },
        )
    }

    fn group() -> ConversationId {
        create().conversation()
    }

    fn set_role(actor: &str, id: &str, who: &str, role: Role) -> Command {
        command(
            actor,
            id,
            Action::SetRole {
                conversation: group(),
                user: user(who),
                role,
            },
        )
    }

    fn add(actor: &str, id: &str, names: &[&str]) -> Command {
        command(
            actor,
            id,
            Action::AddMembers {
                conversation: group(),
                users: users(names),
            },
        )
    }

    fn remove(actor: &str, id: &str, names: &[&str]) -> Command {
        command(
            actor,
            id,
            Action::RemoveMembers {
                conversation: group(),
                users: users(names),
            },
        )
    }

    fn leave(actor: &str, id: &str) -> Command {
        command(
            actor,
            id,
            Action::Leave {
                conversation: group(),
            },
        )
    }

    fn rename(actor: &str, id: &str, title: Option<&str>) -> Command {
        command(
            actor,
            id,
            Action::Rename {
                conversation: group(),
                title: title.map(str::to_owned),
            },
        )
    }

    fn mute(actor: &str, id: &str, who: &str, seconds: u64) -> Command {
        command(
            actor,
            id,
            Action::Mute {
                conversation: group(),
                user: user(who),
                seconds,
            },
        )
    }

    fn unmute_at(actor: &str, id: &str, who: &str, at: u64) -> Command {
        command_at(
            actor,
            id,
            at,
            Action::Unmute {
                conversation: group(),
                user: user(who),
            },
        )
    }

    fn post_at(actor: &str, id: &str, at: u64) -> Command {
        command_at(
            actor,
            id,
            at,
            Action::PostMessage {
                conversation: group(),
                body: "hi".into(),
                reply_to: None,
            },
        )
    }

    fn limits() -> LimitsConfig {
        LimitsConfig::default()
    }

    fn given_with(commands: &[Command], limits: &LimitsConfig) -> WriteModel {
        let mut model = WriteModel::new(Shards::new(4).unwrap(), 100);
        for (seq, command) in (1..).zip(commands) {
            match model.decide(command, limits) {
                Decision::Append { event, .. } => model.apply(&event.recorded(seq), true),
                other => panic!("setup command {command:?} was not appended: {other:?}"),
            }
        }
        model
    }

    /// The standard group: alice and erin owners, carol and fay admins, bob and dave
    /// members.
    fn given(more: &[Command]) -> WriteModel {
        let mut commands = setup();
        commands.extend_from_slice(more);
        given_with(&commands, &limits())
    }

    fn setup() -> Vec<Command> {
        vec![
            create(),
            set_role("alice", "r-carol", "carol", Role::Admin),
            set_role("alice", "r-erin", "erin", Role::Owner),
            set_role("alice", "r-fay", "fay", Role::Admin),
        ]
    }

    fn appended(model: &WriteModel, command: &Command) -> Event {
        match model.decide(command, &limits()) {
            Decision::Append { event, .. } => event.event,
            other => panic!("{command:?} was not appended: {other:?}"),
        }
    }

    fn refused(model: &WriteModel, command: &Command) -> (ErrorCode, String) {
        match model.decide(command, &limits()) {
            Decision::Reject { code, message } => (code, message),
            other => panic!("{command:?} was not refused: {other:?}"),
        }
    }

    fn refused_with(model: &WriteModel, command: &Command) -> ErrorCode {
        refused(model, command).0
    }

    fn member(name: &str, role: Role) -> Member {
        Member {
            user: user(name),
            role,
        }
    }

    #[test]
    fn owners_and_admins_add_members_and_those_already_in_are_left_out() {
        let model = given(&[]);
        for actor in ["alice", "carol"] {
            assert_eq!(
                appended(&model, &add(actor, "a1", &["zoe", "bob", "yan", "zoe"])),
                Event::MembersAdded(MembersAdded {
                    members: vec![member("yan", Role::Member), member("zoe", Role::Member)]
                })
            );
        }
        assert_eq!(
            refused_with(&model, &add("bob", "a2", &["zoe"])),
            ErrorCode::Forbidden
        );
        assert_eq!(
            refused_with(&model, &add("alice", "a3", &["bob", "carol"])),
            ErrorCode::InvalidRequest,
            "a batch adding nobody new"
        );
        assert_eq!(
            refused_with(&model, &add("alice", "a4", &[])),
            ErrorCode::InvalidRequest
        );
        let added = given(&[add("carol", "a5", &["zoe"])]);
        assert!(
            matches!(
                added.decide(&post_at("zoe", "m1", 2_000), &limits()),
                Decision::Append { .. }
            ),
            "an added member posts"
        );
    }

    #[test]
    fn adds_respect_the_batch_cap_and_the_group_cap() {
        let small = LimitsConfig {
            max_group_members: 8,
            max_members_per_add: 2,
            ..LimitsConfig::default()
        };
        let model = given_with(&[create(), add("alice", "a1", &["f1", "f2"])], &small);
        let decide = |command: &Command| model.decide(command, &small);
        assert!(matches!(
            decide(&add("alice", "a2", &["x1", "x2", "x3"])),
            Decision::Reject {
                code: ErrorCode::InvalidRequest,
                ..
            }
        ));
        // 8 members now: one more is over the group's cap, even in a batch within its own.
        assert!(matches!(
            decide(&add("alice", "a3", &["x1"])),
            Decision::Reject {
                code: ErrorCode::InvalidRequest,
                ..
            }
        ));
        let roomier = LimitsConfig {
            max_group_members: 9,
            ..small.clone()
        };
        // Already-members do not count against the cap.
        assert!(matches!(
            model.decide(&add("alice", "a4", &["x1", "bob"]), &roomier),
            Decision::Append { .. }
        ));
    }

    #[test]
    fn a_group_fills_to_10000_members_in_batches_of_1000_and_no_further() {
        let limits = limits();
        assert_eq!(
            (limits.max_group_members, limits.max_members_per_add),
            (10_000, 1_000)
        );
        let alone = command(
            "alice",
            "big",
            Action::CreateGroup {
                title: None,
                members: vec![],
            },
        );
        let conversation = alone.conversation();
        let batch = |id: &str, from: usize, count: usize| {
            command(
                "alice",
                id,
                Action::AddMembers {
                    conversation,
                    users: (from..from + count)
                        .map(|i| user(&format!("u{i}")))
                        .collect(),
                },
            )
        };
        let mut commands = vec![alone];
        for n in 0..9 {
            commands.push(batch(&format!("b{n}"), n * 1000, 1000));
        }
        commands.push(batch("b9", 9000, 999));
        let full = given_with(&commands, &limits);
        assert_eq!(
            full.conversations[&conversation].members.len(),
            10_000,
            "the owner and 9,999 added"
        );
        assert!(matches!(
            full.decide(&batch("b10", 20_000, 1), &limits),
            Decision::Reject {
                code: ErrorCode::InvalidRequest,
                ..
            }
        ));
        assert!(
            matches!(
                full.decide(&batch("b11", 0, 1000), &limits),
                Decision::Reject {
                    code: ErrorCode::InvalidRequest,
                    ..
                }
            ),
            "all already members"
        );
    }

    #[test]
    fn removals_follow_the_permission_table() {
        let model = given(&[]);
        assert_eq!(
            appended(
                &model,
                &remove("alice", "x1", &["erin", "carol", "bob", "nobody"])
            ),
            Event::MembersRemoved(MembersRemoved {
                users: users(&["bob", "carol", "erin"])
            }),
            "an owner removes owners, admins and members; non-members are left out"
        );
        assert_eq!(
            appended(&model, &remove("carol", "x2", &["bob", "dave"])),
            Event::MembersRemoved(MembersRemoved {
                users: users(&["bob", "dave"])
            })
        );
        for (actor, target) in [
            ("carol", "fay"),
            ("carol", "erin"),
            ("carol", "alice"),
            ("bob", "dave"),
        ] {
            assert_eq!(
                refused_with(&model, &remove(actor, "x3", &[target])),
                ErrorCode::Forbidden,
                "{actor} removes {target}"
            );
        }
        assert_eq!(
            refused_with(&model, &remove("alice", "x4", &["bob", "alice"])),
            ErrorCode::InvalidRequest,
            "nobody removes themselves"
        );
        assert_eq!(
            refused_with(&model, &remove("alice", "x5", &["nobody"])),
            ErrorCode::InvalidRequest
        );
        let removed = given(&[remove("carol", "x6", &["bob"])]);
        assert_eq!(
            refused_with(&removed, &post_at("bob", "m1", 2_000)),
            ErrorCode::NotMember,
            "a removed member can no longer post"
        );
    }

    #[test]
    fn anyone_may_leave_but_the_last_owner() {
        let model = given(&[]);
        for actor in ["bob", "carol", "erin", "alice"] {
            assert_eq!(
                appended(&model, &leave(actor, "l1")),
                Event::MemberLeft(MemberLeft {})
            );
        }
        let one_owner = given(&[leave("erin", "l2")]);
        let (code, message) = refused(&one_owner, &leave("alice", "l3"));
        assert_eq!(code, ErrorCode::LastOwner);
        assert!(message.contains("owner"), "{message}");
        let left = given(&[leave("bob", "l4")]);
        assert_eq!(
            refused_with(&left, &leave("bob", "l5")),
            ErrorCode::NotMember
        );
    }

    #[test]
    fn only_owners_change_roles_and_nobody_demotes_themselves() {
        let model = given(&[]);
        assert_eq!(
            appended(&model, &set_role("erin", "s1", "bob", Role::Owner)),
            Event::MemberRoleChanged(MemberRoleChanged {
                user: user("bob"),
                role: Role::Owner
            })
        );
        assert_eq!(
            refused_with(&model, &set_role("carol", "s2", "bob", Role::Admin)),
            ErrorCode::Forbidden
        );
        assert_eq!(
            refused_with(&model, &set_role("alice", "s3", "alice", Role::Member)),
            ErrorCode::InvalidRequest,
            "an owner with a co-owner still may not step down through set_role"
        );
        let one_owner = given(&[leave("erin", "l1")]);
        assert_eq!(
            refused_with(&one_owner, &set_role("alice", "s4", "alice", Role::Admin)),
            ErrorCode::LastOwner
        );
        assert_eq!(
            refused_with(&model, &set_role("alice", "s5", "nobody", Role::Admin)),
            ErrorCode::InvalidRequest
        );
        assert_eq!(
            refused_with(&model, &set_role("alice", "s6", "carol", Role::Admin)),
            ErrorCode::InvalidRequest,
            "already an admin"
        );
        // A promoted admin may then add.
        let promoted = given(&[set_role("alice", "s7", "bob", Role::Admin)]);
        assert!(matches!(
            appended(&promoted, &add("bob", "a1", &["zoe"])),
            Event::MembersAdded(_)
        ));
    }

    #[test]
    fn owners_and_admins_rename_within_the_title_rules() {
        let model = given(&[]);
        assert_eq!(
            appended(&model, &rename("carol", "n1", Some("new"))),
            Event::ConversationRenamed(ConversationRenamed {
                title: Some("new".into())
            })
        );
        assert_eq!(
            appended(&model, &rename("alice", "n2", None)),
            Event::ConversationRenamed(ConversationRenamed { title: None })
        );
        assert_eq!(
            refused_with(&model, &rename("bob", "n3", Some("mine"))),
            ErrorCode::Forbidden
        );
        let long = "x".repeat(limits().max_title_bytes + 1);
        for wrong in ["  ", long.as_str()] {
            assert_eq!(
                refused_with(&model, &rename("alice", "n4", Some(wrong))),
                ErrorCode::InvalidRequest
            );
        }
    }

    #[test]
    fn mutes_follow_the_permission_table() {
        let model = given(&[]);
        assert_eq!(
            appended(&model, &mute("alice", "u1", "carol", 60)),
            Event::MemberMuted(MemberMuted {
                user: user("carol"),
                until: 61_000
            }),
            "an owner mutes an admin; the mute runs from the command's issued_at"
        );
        assert!(matches!(
            appended(&model, &mute("carol", "u2", "bob", 60)),
            Event::MemberMuted(_)
        ));
        for (actor, target) in [
            ("carol", "fay"),
            ("carol", "alice"),
            ("alice", "erin"),
            ("bob", "dave"),
            ("carol", "carol"),
        ] {
            let code = refused_with(&model, &mute(actor, "u3", target, 60));
            let expected = if actor == target {
                ErrorCode::InvalidRequest
            } else {
                ErrorCode::Forbidden
            };
            assert_eq!(code, expected, "{actor} mutes {target}");
        }
        for seconds in [0, parley_events::protocol::MAX_MUTE_SECONDS + 1] {
            assert_eq!(
                refused_with(&model, &mute("alice", "u4", "bob", seconds)),
                ErrorCode::InvalidRequest
            );
        }
        assert_eq!(
            refused_with(&model, &mute("alice", "u5", "nobody", 60)),
            ErrorCode::InvalidRequest
        );
        assert_eq!(
            refused_with(&model, &unmute_at("bob", "u6", "dave", 1_000)),
            ErrorCode::Forbidden
        );
    }

    #[test]
    fn a_muted_member_cannot_post_until_the_mute_ends_or_is_lifted() {
        let model = given(&[mute("carol", "u1", "bob", 60)]);
        let (code, message) = refused(&model, &post_at("bob", "m1", 60_999));
        assert_eq!(code, ErrorCode::Muted);
        assert!(
            message.contains("1970-01-01T00:01:01.000Z"),
            "says until when: {message}"
        );
        assert!(!code.retryable());
        assert!(matches!(
            model.decide(&post_at("bob", "m2", 61_000), &limits()),
            Decision::Append { .. }
        ));
        assert!(matches!(
            model.decide(&post_at("dave", "m3", 2_000), &limits()),
            Decision::Append { .. }
        ));
        assert_eq!(
            appended(&model, &unmute_at("alice", "u2", "bob", 2_000)),
            Event::MemberUnmuted(MemberUnmuted { user: user("bob") })
        );
        assert_eq!(
            refused_with(&model, &unmute_at("alice", "u3", "bob", 61_000)),
            ErrorCode::InvalidRequest,
            "a mute that ran out is not there to lift"
        );
        let lifted = given(&[
            mute("carol", "u4", "bob", 60),
            unmute_at("carol", "u5", "bob", 2_000),
        ]);
        assert!(matches!(
            lifted.decide(&post_at("bob", "m4", 2_000), &limits()),
            Decision::Append { .. }
        ));
        // Leaving and coming back does not keep the mute.
        let back = given(&[
            mute("carol", "u6", "bob", 60),
            leave("bob", "l1"),
            add("carol", "a1", &["bob"]),
        ]);
        assert!(matches!(
            back.decide(&post_at("bob", "m5", 2_000), &limits()),
            Decision::Append { .. }
        ));
    }

    #[test]
    fn a_direct_conversation_has_no_membership_changes() {
        let direct = command("alice", "d", Action::CreateDirect { peer: user("bob") });
        let conversation = direct.conversation();
        let model = given_with(std::slice::from_ref(&direct), &limits());
        for action in [
            Action::AddMembers {
                conversation,
                users: users(&["carol"]),
            },
            Action::RemoveMembers {
                conversation,
                users: users(&["bob"]),
            },
            Action::Leave { conversation },
            Action::SetRole {
                conversation,
                user: user("bob"),
                role: Role::Admin,
            },
            Action::Rename {
                conversation,
                title: Some("x".into()),
            },
            Action::Mute {
                conversation,
                user: user("bob"),
                seconds: 5,
            },
            Action::Unmute {
                conversation,
                user: user("bob"),
            },
        ] {
            assert_eq!(
                refused_with(&model, &command("alice", "c", action)),
                ErrorCode::InvalidRequest
            );
        }
    }

    #[test]
    fn outsiders_and_unknown_conversations_are_refused_first() {
        let model = given(&[]);
        assert_eq!(
            refused_with(&model, &add("mallory", "a1", &["zoe"])),
            ErrorCode::NotMember
        );
        let elsewhere = command(
            "alice",
            "a2",
            Action::Leave {
                conversation: ConversationId::direct(&user("x"), &user("y")),
            },
        );
        assert_eq!(
            refused_with(&model, &elsewhere),
            ErrorCode::ConversationNotFound
        );
    }

    /// Every membership command: repeated, it gets its original ack, from the model, a
    /// restored snapshot and a replay of the log; another request under its id gets
    /// `id_reused`.
    #[test]
    fn membership_commands_are_idempotent_by_id() {
        let first = [
            add("alice", "i1", &["zoe"]),
            remove("alice", "i2", &["dave"]),
            leave("bob", "i3"),
            set_role("alice", "i4", "zoe", Role::Admin),
            rename("carol", "i5", Some("renamed")),
            mute("alice", "i6", "zoe", 60),
            unmute_at("alice", "i7", "zoe", 1_000),
        ];
        let others = [
            rename("alice", "i1", Some("other")),
            add("alice", "i2", &["yan"]),
            mute("bob", "i3", "carol", 5),
            set_role("alice", "i4", "zoe", Role::Owner),
            rename("carol", "i5", Some("renamed again")),
            mute("alice", "i6", "zoe", 61),
            unmute_at("alice", "i7", "carol", 1_000),
        ];
        let model = given(&first);
        let restored =
            WriteModel::restore(&model.snapshot(), Shards::new(4).unwrap(), 100).unwrap();
        let mut replayed = WriteModel::new(Shards::new(4).unwrap(), 100);
        let mut log = setup();
        log.extend(first.iter().cloned());
        for (seq, command) in (1..).zip(&log) {
            let Decision::Append { event, .. } = replayed.decide(command, &limits()) else {
                panic!("{command:?}")
            };
            replayed.apply(&event.recorded(seq), true);
        }
        for model in [&model, &restored, &replayed] {
            for (seq, (again, other)) in (5..).zip(first.iter().zip(&others)) {
                // A retry arrives later than the original: the mute still lasts as asked.
                let mut later = again.clone();
                later.issued_at += 5_000;
                assert_eq!(
                    model.decide(&later, &limits()),
                    Decision::Known(Accepted {
                        conversation: group(),
                        seq,
                        event: again.event_id(0),
                    }),
                    "{again:?}"
                );
                assert_eq!(refused_with(model, other), ErrorCode::IdReused, "{other:?}");
            }
        }
    }
}
