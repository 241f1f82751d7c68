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
        | Action::MarkRead { .. } => unreachable!("not a membership command"),
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
        | Event::ConversationRead(_) => {}
    }
}
