//! Commands, as gateways publish them to the intake stream, and the outcomes handlers send
//! back to the originating gateway.

use serde::{Deserialize, Serialize};

use crate::error::ErrorCode;
use crate::event::{ConversationKind, Event, EventEnvelope, Role};
use crate::ids::{ClientMsgId, CommandId, ConversationId, EventId, UserId};

/// A client request a handler must validate before anything is appended.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Command {
    /// Derived from `actor` and `client_id`; also the intake stream's dedupe key.
    pub id: CommandId,
    pub actor: UserId,
    pub client_id: ClientMsgId,
    /// When the gateway received the request, milliseconds since the Unix epoch.
    pub issued_at: u64,
    /// The subject the outcome goes to: the originating gateway's outcome subject.
    pub reply_to: String,
    pub action: Action,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum Action {
    /// Open (or find) the direct conversation between the actor and `peer`.
    CreateDirect { peer: UserId },
    /// Create a group owned by the actor; `members` are added as plain members.
    CreateGroup {
        #[serde(default)]
        title: Option<String>,
        members: Vec<UserId>,
    },
    PostMessage {
        conversation: ConversationId,
        body: String,
        /// The sequence of the message this one replies to.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reply_to: Option<u64>,
    },
    /// Move the actor's read marker in `conversation` forward to `seq`.
    MarkRead {
        conversation: ConversationId,
        seq: u64,
    },
    /// Add `users` to a group as plain members.
    AddMembers {
        conversation: ConversationId,
        users: Vec<UserId>,
    },
    /// Remove `users` from a group.
    RemoveMembers {
        conversation: ConversationId,
        users: Vec<UserId>,
    },
    /// The actor leaves a group.
    Leave { conversation: ConversationId },
    /// Give `user` the role `role` in a group.
    SetRole {
        conversation: ConversationId,
        user: UserId,
        role: Role,
    },
    /// Set a group's title (`None` clears it).
    Rename {
        conversation: ConversationId,
        #[serde(default)]
        title: Option<String>,
    },
    /// Keep `user` from posting to a group for `seconds` from the command's `issued_at`.
    Mute {
        conversation: ConversationId,
        user: UserId,
        seconds: u64,
    },
    /// Lift `user`'s mute.
    Unmute {
        conversation: ConversationId,
        user: UserId,
    },
    /// Replace the body of the actor's message at sequence `message`.
    EditMessage {
        conversation: ConversationId,
        message: u64,
        body: String,
    },
    /// Delete the message at sequence `message` (the actor's own, or anyone's for an owner
    /// or admin).
    DeleteMessage {
        conversation: ConversationId,
        message: u64,
    },
    /// Add the actor's `emoji` to the message at sequence `message`.
    React {
        conversation: ConversationId,
        message: u64,
        emoji: String,
    },
    /// Remove the actor's `emoji` from the message at sequence `message`.
    Unreact {
        conversation: ConversationId,
        message: u64,
        emoji: String,
    },
}

impl Command {
    pub fn new(
        actor: UserId,
        client_id: ClientMsgId,
        issued_at: u64,
        reply_to: String,
        action: Action,
    ) -> Self {
        Command {
            id: CommandId::from_client(&actor, &client_id),
            actor,
            client_id,
            issued_at,
            reply_to,
            action,
        }
    }

    /// The conversation the command acts on, known before anything is validated.
    pub fn conversation(&self) -> ConversationId {
        match &self.action {
            Action::CreateDirect { peer } => ConversationId::direct(&self.actor, peer),
            Action::CreateGroup { .. } => ConversationId::group(self.id),
            Action::PostMessage { conversation, .. } | Action::MarkRead { conversation, .. } => {
                *conversation
            }
            Action::AddMembers { conversation, .. }
            | Action::RemoveMembers { conversation, .. }
            | Action::Leave { conversation }
            | Action::SetRole { conversation, .. }
            | Action::Rename { conversation, .. }
            | Action::Mute { conversation, .. }
            | Action::Unmute { conversation, .. } => *conversation,
            Action::EditMessage { conversation, .. }
            | Action::DeleteMessage { conversation, .. }
            | Action::React { conversation, .. }
            | Action::Unreact { conversation, .. } => *conversation,
        }
    }

    /// The sequence of the earlier message this command needs to see before it can be
    /// decided: the one it edits, deletes, reacts to or replies to.
    pub fn target_message(&self) -> Option<u64> {
        Self::target_of(&self.action)
    }

    /// [`Command::target_message`] of a command with this action.
    pub fn target_of(action: &Action) -> Option<u64> {
        match action {
            Action::PostMessage { reply_to, .. } => *reply_to,
            Action::EditMessage { message, .. }
            | Action::DeleteMessage { message, .. }
            | Action::React { message, .. }
            | Action::Unreact { message, .. } => Some(*message),
            Action::CreateDirect { .. }
            | Action::CreateGroup { .. }
            | Action::MarkRead { .. }
            | Action::AddMembers { .. }
            | Action::RemoveMembers { .. }
            | Action::Leave { .. }
            | Action::SetRole { .. }
            | Action::Rename { .. }
            | Action::Mute { .. }
            | Action::Unmute { .. } => None,
        }
    }

    /// What this request asks for; see [`Fingerprint`].
    pub fn fingerprint(&self) -> Fingerprint {
        match &self.action {
            Action::CreateDirect { .. } => Request::Direct {
                conversation: self.conversation(),
            },
            Action::CreateGroup { title, members } => {
                Request::group(title.as_deref(), members.iter(), &self.actor)
            }
            Action::PostMessage {
                conversation,
                body,
                reply_to,
            } => Request::Post {
                conversation: *conversation,
                body,
                reply_to: *reply_to,
            },
            Action::MarkRead { conversation, seq } => Request::Read {
                conversation: *conversation,
                seq: *seq,
            },
            Action::AddMembers { conversation, .. } => Request::AddMembers {
                conversation: *conversation,
            },
            Action::RemoveMembers { conversation, .. } => Request::RemoveMembers {
                conversation: *conversation,
            },
            Action::Leave { conversation } => Request::Leave {
                conversation: *conversation,
            },
            Action::SetRole {
                conversation,
                user,
                role,
            } => Request::SetRole {
                conversation: *conversation,
                user,
                role: *role,
            },
            Action::Rename {
                conversation,
                title,
            } => Request::Rename {
                conversation: *conversation,
                title: title.as_deref(),
            },
            Action::Mute {
                conversation,
                user,
                seconds,
            } => Request::Mute {
                conversation: *conversation,
                user,
                seconds: *seconds,
            },
            Action::Unmute { conversation, user } => Request::Unmute {
                conversation: *conversation,
                user,
            },
            Action::EditMessage {
                conversation,
                message,
                body,
            } => Request::Edit {
                conversation: *conversation,
                message: *message,
                body,
            },
            Action::DeleteMessage {
                conversation,
                message,
            } => Request::Delete {
                conversation: *conversation,
                message: *message,
            },
            Action::React {
                conversation,
                message,
                emoji,
            } => Request::React {
                conversation: *conversation,
                message: *message,
                emoji,
            },
            Action::Unreact {
                conversation,
                message,
                emoji,
            } => Request::Unreact {
                conversation: *conversation,
                message: *message,
                emoji,
            },
        }
        .fingerprint()
    }

    /// The id of the `index`-th event this command causes.
    pub fn event_id(&self, index: u32) -> EventId {
        EventId::derive(self.id, index, self.issued_at)
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a command always serializes")
    }

    pub fn from_bytes(bytes: &[u8]) -> Result<Self, serde_json::Error> {
        serde_json::from_slice(bytes)
    }
}

/// What a request asks for, reduced to what decides its effect, so two requests under one
/// id can be told apart: a repeat (same fingerprint) gets the original answer, a different
/// request reusing the id (another fingerprint) gets `id_reused`. It is derived alike from a
/// command and from the event the command appended ([`Fingerprint::of_event`]), so a handler
/// that rebuilt its memory from the log answers as the one that appended. Stable across
/// builds: it is kept in handler snapshots.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Fingerprint(u64);

/// Namespace of the name-based UUID whose first 64 bits are a fingerprint.
const FINGERPRINT_NAMESPACE: uuid::Uuid =
    uuid::Uuid::from_u128(0x6a5f_0d3c_7c1e_4f0b_9a57_2f1e_8c3d_0005);

impl Fingerprint {
    /// The fingerprint of the command that appended `envelope`.
    pub fn of_event(envelope: &EventEnvelope) -> Fingerprint {
        match &envelope.event {
            Event::ConversationCreated(created) => match created.kind {
                ConversationKind::Direct => Request::Direct {
                    conversation: envelope.conversation,
                },
                ConversationKind::Group => Request::group(
                    created.title.as_deref(),
                    created.members.iter().map(|member| &member.user),
                    &envelope.actor,
                ),
            },
            Event::MessagePosted(posted) => Request::Post {
                conversation: envelope.conversation,
                body: &posted.body,
                reply_to: posted.reply_to,
            },
            Event::ConversationRead(read) => Request::Read {
                conversation: envelope.conversation,
                seq: read.seq,
            },
            Event::MembersAdded(_) => Request::AddMembers {
                conversation: envelope.conversation,
            },
            Event::MembersRemoved(_) => Request::RemoveMembers {
                conversation: envelope.conversation,
            },
            Event::MemberLeft(_) => Request::Leave {
                conversation: envelope.conversation,
            },
            Event::MemberRoleChanged(changed) => Request::SetRole {
                conversation: envelope.conversation,
                user: &changed.user,
                role: changed.role,
            },
            Event::ConversationRenamed(renamed) => Request::Rename {
                conversation: envelope.conversation,
                title: renamed.title.as_deref(),
            },
            // A mute lasts from the command's `issued_at`, which is the event's `at`.
            Event::MemberMuted(muted) => Request::Mute {
                conversation: envelope.conversation,
                user: &muted.user,
                seconds: muted.until.saturating_sub(envelope.at) / 1000,
            },
            Event::MemberUnmuted(unmuted) => Request::Unmute {
                conversation: envelope.conversation,
                user: &unmuted.user,
            },
            Event::MessageEdited(edited) => Request::Edit {
                conversation: envelope.conversation,
                message: edited.message,
                body: &edited.body,
            },
            Event::MessageDeleted(deleted) => Request::Delete {
                conversation: envelope.conversation,
                message: deleted.message,
            },
            Event::ReactionAdded(reaction) => Request::React {
                conversation: envelope.conversation,
                message: reaction.message,
                emoji: &reaction.emoji,
            },
            Event::ReactionRemoved(reaction) => Request::Unreact {
                conversation: envelope.conversation,
                message: reaction.message,
                emoji: &reaction.emoji,
            },
        }
        .fingerprint()
    }
}

/// The canonical form a fingerprint is taken of: what a command and its event agree on.
#[derive(Serialize)]
#[serde(tag = "request", rename_all = "snake_case")]
enum Request<'a> {
    /// A direct conversation is named by its two users, so its id says it all.
    Direct {
        conversation: ConversationId,
    },
    /// The creator is the owner whatever the list says; the others in order, once each.
    Group {
        title: Option<&'a str>,
        others: Vec<&'a UserId>,
    },
    /// A send that replies to nothing has the fingerprint it had before replies existed:
    /// fingerprints are kept in handler snapshots.
    Post {
        conversation: ConversationId,
        body: &'a str,
        #[serde(skip_serializing_if = "Option::is_none")]
        reply_to: Option<u64>,
    },
    Read {
        conversation: ConversationId,
        seq: u64,
    },
    /// A batch add or removal is named by its conversation alone: its event leaves out the
    /// users it did not change (already members, or not members), so the users asked for
    /// cannot be recovered from the log. Another batch under the same id and conversation
    /// is taken for a repeat.
    AddMembers {
        conversation: ConversationId,
    },
    RemoveMembers {
        conversation: ConversationId,
    },
    Leave {
        conversation: ConversationId,
    },
    SetRole {
        conversation: ConversationId,
        user: &'a UserId,
        role: Role,
    },
    Rename {
        conversation: ConversationId,
        title: Option<&'a str>,
    },
    Mute {
        conversation: ConversationId,
        user: &'a UserId,
        seconds: u64,
    },
    Unmute {
        conversation: ConversationId,
        user: &'a UserId,
    },
    Edit {
        conversation: ConversationId,
        message: u64,
        body: &'a str,
    },
    Delete {
        conversation: ConversationId,
        message: u64,
    },
    React {
        conversation: ConversationId,
        message: u64,
        emoji: &'a str,
    },
    Unreact {
        conversation: ConversationId,
        message: u64,
        emoji: &'a str,
    },
}

impl<'a> Request<'a> {
    fn group(
        title: Option<&'a str>,
        members: impl Iterator<Item = &'a UserId>,
        creator: &UserId,
    ) -> Self {
        let mut others: Vec<&UserId> = members.filter(|user| *user != creator).collect();
        others.sort();
        others.dedup();
        Request::Group { title, others }
    }

    fn fingerprint(&self) -> Fingerprint {
        let canonical = serde_json::to_vec(self).expect("a request always serializes");
        let digest = uuid::Uuid::new_v5(&FINGERPRINT_NAMESPACE, &canonical);
        Fingerprint(digest.as_u64_pair().0)
    }
}

/// What became of a command.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Outcome {
    pub command: CommandId,
    pub result: OutcomeResult,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum OutcomeResult {
    /// The command's event is in the log at `seq` (for a repeated create, the original
    /// creation's sequence).
    Accepted {
        conversation: ConversationId,
        seq: u64,
        event: EventId,
    },
    Rejected {
        code: ErrorCode,
        message: String,
    },
}

impl Outcome {
    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("an outcome always serializes")
    }

    pub fn from_bytes(bytes: &[u8]) -> Result<Self, serde_json::Error> {
        serde_json::from_slice(bytes)
    }

    /// Several outcomes for one gateway in one message: a JSON array of outcomes.
    pub fn batch_to_bytes(outcomes: &[&Outcome]) -> Vec<u8> {
        serde_json::to_vec(outcomes).expect("outcomes always serialize")
    }

    /// The outcomes in a message to a gateway: an array of them ([`Outcome::batch_to_bytes`])
    /// or one alone ([`Outcome::to_bytes`]).
    pub fn all_from_bytes(bytes: &[u8]) -> Result<Vec<Self>, serde_json::Error> {
        match bytes.iter().find(|b| !b.is_ascii_whitespace()) {
            Some(b'[') => serde_json::from_slice(bytes),
            _ => Self::from_bytes(bytes).map(|outcome| vec![outcome]),
        }
    }
}

/// A gateway asking the handlers what became of a command the intake had already seen.
/// It carries the whole command, so a handler can also say what a repeat of a rejected
/// command gets (rejections are not in the log).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OutcomeQuery {
    pub command: Command,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retried_request_is_the_same_command_and_event() {
        let alice = UserId::parse("alice").unwrap();
        let make = |issued_at| {
            Command::new(
                alice.clone(),
                ClientMsgId::parse("c1").unwrap(),
                issued_at,
                "parley.outcome.gw".into(),
                Action::CreateGroup {
                    title: None,
                    members: vec![],
                },
            )
        };
        let (first, again) = (make(10), make(10));
        assert_eq!(first.id, again.id);
        assert_eq!(first.conversation(), again.conversation());
        assert_eq!(first.event_id(0), again.event_id(0));
        let bytes = first.to_bytes();
        assert_eq!(Command::from_bytes(&bytes).unwrap(), first);
    }

    #[test]
    fn a_command_and_its_event_have_one_fingerprint_and_other_requests_another() {
        use crate::event::{
            ConversationCreated, Member, MessageDeleted, MessageEdited, MessagePosted, Reaction,
            Role,
        };
        let user = |name: &str| UserId::parse(name).unwrap();
        let command = |action| {
            Command::new(
                user("alice"),
                ClientMsgId::parse("c1").unwrap(),
                10,
                "parley.outcome.gw".into(),
                action,
            )
        };
        let appended = |command: &Command, event| EventEnvelope {
            id: command.event_id(0),
            conversation: command.conversation(),
            prev: 0,
            command: command.id,
            actor: command.actor.clone(),
            at: command.issued_at,
            event,
        };
        let member = |name: &str, role| Member {
            user: user(name),
            role,
        };
        let group = command(Action::CreateGroup {
            title: Some("team".into()),
            members: vec![user("carol"), user("bob"), user("alice"), user("bob")],
        });
        let group_event = appended(
            &group,
            Event::ConversationCreated(ConversationCreated {
                kind: ConversationKind::Group,
                title: Some("team".into()),
                members: vec![
                    member("alice", Role::Owner),
                    member("bob", Role::Member),
                    member("carol", Role::Member),
                ],
            }),
        );
        assert_eq!(group.fingerprint(), Fingerprint::of_event(&group_event));
        let direct = command(Action::CreateDirect { peer: user("bob") });
        let direct_event = appended(
            &direct,
            Event::ConversationCreated(ConversationCreated {
                kind: ConversationKind::Direct,
                title: None,
                members: vec![member("alice", Role::Member), member("bob", Role::Member)],
            }),
        );
        assert_eq!(direct.fingerprint(), Fingerprint::of_event(&direct_event));
        let conversation = direct.conversation();
        let post = command(Action::PostMessage {
            conversation,
            body: "hi \u{0} \"there\"".into(),
            reply_to: None,
        });
        let post_event = appended(
            &post,
            Event::MessagePosted(MessagePosted {
                client_id: post.client_id.clone(),
                body: "hi \u{0} \"there\"".into(),
                reply_to: None,
            }),
        );
        assert_eq!(post.fingerprint(), Fingerprint::of_event(&post_event));
        let reaction = || Reaction {
            message: 2,
            emoji: "👍".into(),
        };
        let message_requests = [
            (
                Action::PostMessage {
                    conversation,
                    body: "re".into(),
                    reply_to: Some(2),
                },
                Event::MessagePosted(MessagePosted {
                    client_id: post.client_id.clone(),
                    body: "re".into(),
                    reply_to: Some(2),
                }),
            ),
            (
                Action::EditMessage {
                    conversation,
                    message: 2,
                    body: "re".into(),
                },
                Event::MessageEdited(MessageEdited {
                    message: 2,
                    body: "re".into(),
                }),
            ),
            (
                Action::DeleteMessage {
                    conversation,
                    message: 2,
                },
                Event::MessageDeleted(MessageDeleted { message: 2 }),
            ),
            (
                Action::React {
                    conversation,
                    message: 2,
                    emoji: "👍".into(),
                },
                Event::ReactionAdded(reaction()),
            ),
            (
                Action::Unreact {
                    conversation,
                    message: 2,
                    emoji: "👍".into(),
                },
                Event::ReactionRemoved(reaction()),
            ),
        ];
        let mut message_fingerprints = Vec::new();
        for (action, event) in message_requests {
            let request = command(action);
            assert_eq!(
                request.fingerprint(),
                Fingerprint::of_event(&appended(&request, event)),
                "{request:?}"
            );
            message_fingerprints.push(request.fingerprint());
        }

        let others = [
            command(Action::CreateGroup {
                title: None,
                members: vec![user("bob"), user("carol")],
            }),
            command(Action::CreateGroup {
                title: Some("team".into()),
                members: vec![user("bob")],
            }),
            command(Action::CreateDirect {
                peer: user("carol"),
            }),
            command(Action::PostMessage {
                conversation,
                body: "hi".into(),
                reply_to: None,
            }),
            command(Action::PostMessage {
                conversation: ConversationId::direct(&user("alice"), &user("carol")),
                body: "hi \u{0} \"there\"".into(),
                reply_to: None,
            }),
            command(Action::PostMessage {
                conversation,
                body: "re".into(),
                reply_to: Some(3),
            }),
            command(Action::EditMessage {
                conversation,
                message: 3,
                body: "re".into(),
            }),
            command(Action::React {
                conversation,
                message: 2,
                emoji: "👎".into(),
            }),
        ];
        let mut seen: Vec<Fingerprint> = [&group, &direct, &post]
            .into_iter()
            .chain(&others)
            .map(Command::fingerprint)
            .chain(message_fingerprints.iter().copied())
            .collect();
        let expected = seen.len();
        seen.sort_by_key(|fingerprint| fingerprint.0);
        seen.dedup();
        assert_eq!(seen.len(), expected, "every request has its own");
    }

    #[test]
    fn a_membership_command_and_its_event_have_one_fingerprint() {
        use crate::event::{
            ConversationRenamed, Member, MemberMuted, MemberRoleChanged, MembersAdded,
        };
        let user = |name: &str| UserId::parse(name).unwrap();
        let conversation = ConversationId::from_uuid(uuid::Uuid::from_u128(9));
        let command = |issued_at, action| {
            Command::new(
                user("alice"),
                ClientMsgId::parse("c1").unwrap(),
                issued_at,
                "parley.outcome.gw".into(),
                action,
            )
        };
        let appended = |command: &Command, event| EventEnvelope {
            id: command.event_id(0),
            conversation,
            prev: 1,
            command: command.id,
            actor: command.actor.clone(),
            at: command.issued_at,
            event,
        };
        let mute = command(
            5_000,
            Action::Mute {
                conversation,
                user: user("bob"),
                seconds: 60,
            },
        );
        let muted = appended(
            &mute,
            Event::MemberMuted(MemberMuted {
                user: user("bob"),
                until: 65_000,
            }),
        );
        assert_eq!(mute.fingerprint(), Fingerprint::of_event(&muted));
        // A retry received later is the same request; a mute of another length is not.
        let later = command(
            9_000,
            Action::Mute {
                conversation,
                user: user("bob"),
                seconds: 60,
            },
        );
        assert_eq!(later.fingerprint(), mute.fingerprint());
        let longer = command(
            5_000,
            Action::Mute {
                conversation,
                user: user("bob"),
                seconds: 61,
            },
        );
        assert_ne!(longer.fingerprint(), mute.fingerprint());
        let promote = command(
            5_000,
            Action::SetRole {
                conversation,
                user: user("bob"),
                role: Role::Admin,
            },
        );
        let promoted = appended(
            &promote,
            Event::MemberRoleChanged(MemberRoleChanged {
                user: user("bob"),
                role: Role::Admin,
            }),
        );
        assert_eq!(promote.fingerprint(), Fingerprint::of_event(&promoted));
        let rename = command(
            5_000,
            Action::Rename {
                conversation,
                title: None,
            },
        );
        let renamed = appended(
            &rename,
            Event::ConversationRenamed(ConversationRenamed { title: None }),
        );
        assert_eq!(rename.fingerprint(), Fingerprint::of_event(&renamed));
        // A batch is named by its conversation: its event lists only the users it changed.
        let add = command(
            5_000,
            Action::AddMembers {
                conversation,
                users: vec![user("bob"), user("carol")],
            },
        );
        let added = appended(
            &add,
            Event::MembersAdded(MembersAdded {
                members: vec![Member {
                    user: user("carol"),
                    role: Role::Member,
                }],
            }),
        );
        assert_eq!(add.fingerprint(), Fingerprint::of_event(&added));
        let fingerprints = [&mute, &promote, &rename, &add].map(Command::fingerprint);
        for (i, a) in fingerprints.iter().enumerate() {
            for b in &fingerprints[i + 1..] {
                assert_ne!(a, b, "every action has its own");
            }
        }
    }

    #[test]
    fn outcome_round_trips() {
        let outcome = Outcome {
            command: CommandId::from_uuid(uuid::Uuid::nil()),
            result: OutcomeResult::Rejected {
                code: ErrorCode::NotMember,
                message: "no".into(),
            },
        };
        assert_eq!(Outcome::from_bytes(&outcome.to_bytes()).unwrap(), outcome);
        assert_eq!(
            Outcome::all_from_bytes(&outcome.to_bytes()).unwrap(),
            std::slice::from_ref(&outcome)
        );
        assert_eq!(
            Outcome::all_from_bytes(&Outcome::batch_to_bytes(&[&outcome, &outcome])).unwrap(),
            [outcome.clone(), outcome.clone()]
        );
        assert!(Outcome::all_from_bytes(b"[{}]").is_err());
        assert!(Outcome::all_from_bytes(b"").is_err());
    }
}
