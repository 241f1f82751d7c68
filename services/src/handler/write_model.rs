//! The handlers' write model: what a handler must know to validate a command and append
//! its event in order. Built by tailing the event log from its start, so any handler
//! instance can take any command; nothing here is stored anywhere but the log.
//!
//! Per conversation it keeps the kind, the members with their roles, the sequence of the
//! newest event (the next event's `prev`), each member's read marker (only for members who
//! ever set one: at most one entry per member, ~100 bytes, so 1 MB for a 10,000-member group
//! whose every member reads it) and the mutes of muted members (the rules that use them are
//! in [`membership`]); per shard, the newest sequence (the append's expected last
//! subject sequence); and a bounded memory of which commands already produced which event,
//! so a repeated or redelivered command is answered with its original outcome, and a
//! different request reusing a command's id (another [`Fingerprint`]) with `id_reused`.

mod membership;

use std::collections::{HashMap, VecDeque};

use serde::{Deserialize, Serialize};

use parley_events::event::{ConversationCreated, ConversationRead, MessagePosted};
use parley_events::subjects::Shards;
use parley_events::{
    Action, Command, CommandId, ConversationId, ConversationKind, ErrorCode, Event, EventEnvelope,
    EventId, Fingerprint, Member, OutcomeResult, RecordedEvent, Role, UserId,
};

use super::messages::{MessageRef, MessageState, NotAppended};
use crate::config::LimitsConfig;
pub use membership::{check_batch, check_mute_seconds, check_title};

/// What the write model says about a command.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// The command already took effect (a repeat, or a create of something that exists).
    Known(Accepted),
    /// Append `event` to the conversation's shard, expecting the shard's last sequence to be
    /// `expected_shard_seq`.
    Append {
        event: EventEnvelope,
        shard: u32,
        expected_shard_seq: u64,
    },
    Reject {
        code: ErrorCode,
        message: String,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Accepted {
    pub conversation: ConversationId,
    pub seq: u64,
    pub event: EventId,
}

/// What a command that appended an event is remembered by: its outcome, and what it asked
/// for, to tell a repeat from a different request under the same id.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
struct Remembered {
    accepted: Accepted,
    fingerprint: Fingerprint,
}

impl Remembered {
    /// The answer to `command`, which has this one's id (or, for a creation, names the
    /// conversation this one created).
    fn answer(&self, command: &Command) -> Decision {
        if command.fingerprint() == self.fingerprint {
            Decision::Known(self.accepted)
        } else {
            reject(
                ErrorCode::IdReused,
                format!(
                    "id {:?} was already used for a different request; send this one with a fresh id",
                    command.client_id.as_str()
                ),
            )
        }
    }
}

#[derive(Serialize, Deserialize)]
struct Aggregate {
    kind: ConversationKind,
    members: HashMap<UserId, Role>,
    last_seq: u64,
    created: Remembered,
    /// Each member's newest read marker. Absent from snapshots of builds before markers:
    /// those builds could not have read a log holding any.
    #[serde(default)]
    read: HashMap<UserId, Marker>,
    /// Members muted, with when their mute ends (ms since the Unix epoch); a mute that ran
    /// out stays until it is replaced or its member goes.
    #[serde(default)]
    mutes: HashMap<UserId, u64>,
    /// Deleted messages and reactions.
    #[serde(default)]
    messages: MessageState,
}

/// A member's read marker and the `conversation.read` event that set it.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
struct Marker {
    seq: u64,
    set_by: Accepted,
}

pub struct WriteModel {
    shards: Shards,
    conversations: HashMap<ConversationId, Aggregate>,
    shard_last: Vec<u64>,
    commands: HashMap<CommandId, Remembered>,
    command_order: VecDeque<CommandId>,
    remembered_commands: usize,
    /// Highest sequence applied from the log tail.
    position: u64,
}

/// The checks a message body must pass, whoever makes them: the gateway refuses at the edge
/// what the handler would refuse anyway.
pub fn check_body(body: &str, limits: &LimitsConfig) -> Result<(), (ErrorCode, String)> {
    if body.trim().is_empty() {
        return Err((ErrorCode::EmptyMessage, "a message needs a body".into()));
    }
    let max = limits.max_message_bytes;
    if body.len() > max {
        return Err((
            ErrorCode::MessageTooLarge,
            format!("a message body is at most {max} bytes"),
        ));
    }
    Ok(())
}

impl From<Accepted> for OutcomeResult {
    fn from(accepted: Accepted) -> Self {
        OutcomeResult::Accepted {
            conversation: accepted.conversation,
            seq: accepted.seq,
            event: accepted.event,
        }
    }
}

/// Format 2 added the fingerprints, format 3 each conversation's kind and mutes, deleted
/// messages and reactions; a snapshot of another format is refused, which costs one replay
/// of the whole log.
const SNAPSHOT_FORMAT: u32 = 3;

#[derive(Serialize)]
struct SnapshotRef<'a> {
    format: u32,
    shards: u32,
    position: u64,
    shard_last: &'a [u64],
    conversations: &'a HashMap<ConversationId, Aggregate>,
    /// Oldest first, so a restore forgets the same ones first.
    commands: Vec<(CommandId, Remembered)>,
}

#[derive(Deserialize)]
struct Snapshot {
    shards: u32,
    position: u64,
    shard_last: Vec<u64>,
    conversations: HashMap<ConversationId, Aggregate>,
    commands: Vec<(CommandId, Remembered)>,
}

impl From<NotAppended> for Decision {
    fn from(not: NotAppended) -> Self {
        match not {
            NotAppended::Known(accepted) => Decision::Known(accepted),
            NotAppended::Refused(code, message) => Decision::Reject { code, message },
        }
    }
}

fn reject(code: ErrorCode, message: impl Into<String>) -> Decision {
    Decision::Reject {
        code,
        message: message.into(),
    }
}

impl WriteModel {
    /// The conversation, if it exists and `user` is a member of it.
    fn member_of(
        &self,
        conversation: ConversationId,
        user: &UserId,
    ) -> Result<&Aggregate, (ErrorCode, &'static str)> {
        let Some(aggregate) = self.conversations.get(&conversation) else {
            return Err((ErrorCode::ConversationNotFound, "no such conversation"));
        };
        if !aggregate.members.contains_key(user) {
            return Err((
                ErrorCode::NotMember,
                "you are not a member of this conversation",
            ));
        }
        Ok(aggregate)
    }

    /// The event `change` decides on, given the conversation's message state and the
    /// actor's role there; a refusal when the actor is not a member.
    fn change_message(
        &self,
        command: &Command,
        change: impl FnOnce(&MessageState, Role) -> Result<Event, NotAppended>,
    ) -> Result<Event, NotAppended> {
        let aggregate = self
            .member_of(command.conversation(), &command.actor)
            .map_err(|(code, message)| NotAppended::Refused(code, message.to_owned()))?;
        // A muted member may still take their own messages down, not add to the conversation.
        if !matches!(command.action, Action::DeleteMessage { .. }) {
            membership::check_not_muted(aggregate, &command.actor, command.issued_at)
                .map_err(|(code, message)| NotAppended::Refused(code, message))?;
        }
        change(&aggregate.messages, aggregate.members[&command.actor])
    }

    pub fn new(shards: Shards, remembered_commands: usize) -> Self {
        WriteModel {
            shards,
            conversations: HashMap::new(),
            shard_last: vec![0; shards.count() as usize],
            commands: HashMap::new(),
            command_order: VecDeque::new(),
            remembered_commands,
            position: 0,
        }
    }

    pub fn position(&self) -> u64 {
        self.position
    }

    /// The model as of its tail position, for a later start to resume from instead of
    /// replaying the whole log.
    pub fn snapshot(&self) -> Vec<u8> {
        let snapshot = SnapshotRef {
            format: SNAPSHOT_FORMAT,
            shards: self.shards.count(),
            position: self.position,
            shard_last: &self.shard_last,
            conversations: &self.conversations,
            commands: self
                .command_order
                .iter()
                .filter_map(|command| Some((*command, *self.commands.get(command)?)))
                .collect(),
        };
        serde_json::to_vec(&snapshot).expect("a write model always serializes")
    }

    /// A model restored from [`WriteModel::snapshot`] bytes, if they are of this format and
    /// shard count.
    pub fn restore(
        bytes: &[u8],
        shards: Shards,
        remembered_commands: usize,
    ) -> Result<Self, String> {
        // The format first: another format's fields need not parse as this one's.
        #[derive(Deserialize)]
        struct Format {
            format: u32,
        }
        let Format { format } = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
        if format != SNAPSHOT_FORMAT {
            return Err(format!("snapshot format {format} is not {SNAPSHOT_FORMAT}"));
        }
        let snapshot: Snapshot = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
        if snapshot.shards != shards.count() || snapshot.shard_last.len() != shards.count() as usize
        {
            return Err(format!(
                "snapshot has {} shards, the log {}",
                snapshot.shards,
                shards.count()
            ));
        }
        let mut model = WriteModel::new(shards, remembered_commands);
        model.position = snapshot.position;
        model.shard_last = snapshot.shard_last;
        model.conversations = snapshot.conversations;
        for (command, accepted) in snapshot.commands {
            model.remember(command, accepted);
        }
        Ok(model)
    }

    pub fn outcome_of(&self, command: CommandId) -> Option<Accepted> {
        self.commands
            .get(&command)
            .map(|remembered| remembered.accepted)
    }

    /// Apply an event from the log tail, or one this handler just appended. Idempotent:
    /// an event seen twice changes nothing the second time.
    pub fn apply(&mut self, recorded: &RecordedEvent, from_tail: bool) {
        let envelope = &recorded.envelope;
        let seq = recorded.seq;
        let shard = self.shards.of(envelope.conversation) as usize;
        self.shard_last[shard] = self.shard_last[shard].max(seq);
        if from_tail {
            self.position = self.position.max(seq);
        }
        let remembered = Remembered {
            accepted: Accepted {
                conversation: envelope.conversation,
                seq,
                event: envelope.id,
            },
            fingerprint: Fingerprint::of_event(envelope),
        };
        match &envelope.event {
            Event::ConversationCreated(created) => {
                self.conversations
                    .entry(envelope.conversation)
                    .or_insert_with(|| Aggregate {
                        kind: created.kind,
                        members: created
                            .members
                            .iter()
                            .map(|m| (m.user.clone(), m.role))
                            .collect(),
                        last_seq: seq,
                        created: remembered,
                        read: HashMap::new(),
                        mutes: HashMap::new(),
                        messages: MessageState::default(),
                    });
            }
            // Every later event moves the conversation on; each part of the state follows
            // the events that concern it and ignores the others.
            event => {
                if let Some(aggregate) = self.conversations.get_mut(&envelope.conversation) {
                    aggregate.last_seq = aggregate.last_seq.max(seq);
                    if let Event::ConversationRead(read) = event {
                        let marker = Marker {
                            seq: read.seq,
                            set_by: remembered.accepted,
                        };
                        aggregate
                            .read
                            .entry(envelope.actor.clone())
                            .and_modify(|m| {
                                if read.seq > m.seq {
                                    *m = marker;
                                }
                            })
                            .or_insert(marker);
                    }
                    membership::apply(aggregate, &envelope.actor, event);
                    aggregate.messages.apply(envelope, remembered.accepted);
                }
            }
        }
        self.remember(envelope.command, remembered);
    }

    fn remember(&mut self, command: CommandId, remembered: Remembered) {
        if self.commands.insert(command, remembered).is_none() {
            self.command_order.push_back(command);
            while self.command_order.len() > self.remembered_commands {
                if let Some(oldest) = self.command_order.pop_front() {
                    self.commands.remove(&oldest);
                }
            }
        }
    }

    /// Validate `command` against the current state and say what to do with it. A command
    /// that refers to a message ([`Command::target_message`]) is refused here as referring
    /// to none: decide it with [`WriteModel::decide_with`].
    pub fn decide(&self, command: &Command, limits: &LimitsConfig) -> Decision {
        self.decide_with(command, limits, None)
    }

    /// [`WriteModel::decide`], with the message the command refers to as the log holds it
    /// at [`Command::target_message`] (`None` when that is not a message of the
    /// conversation).
    pub fn decide_with(
        &self,
        command: &Command,
        limits: &LimitsConfig,
        target: Option<&MessageRef>,
    ) -> Decision {
        if let Some(remembered) = self.commands.get(&command.id) {
            return remembered.answer(command);
        }
        let conversation = command.conversation();
        let event = match &command.action {
            Action::CreateDirect { peer } => {
                if *peer == command.actor {
                    return reject(
                        ErrorCode::InvalidRequest,
                        "a direct conversation needs two different users",
                    );
                }
                // Whoever asks, with any id, gets its creation: a direct conversation's
                // fingerprint is its id.
                if let Some(existing) = self.conversations.get(&conversation) {
                    return existing.created.answer(command);
                }
                let mut members = [command.actor.clone(), peer.clone()];
                members.sort();
                Event::ConversationCreated(ConversationCreated {
                    kind: ConversationKind::Direct,
                    title: None,
                    members: members
                        .into_iter()
                        .map(|user| Member {
                            user,
                            role: Role::Member,
                        })
                        .collect(),
                })
            }
            Action::CreateGroup { title, members } => {
                // A group's id derives from its creating command's: this id created it,
                // which this catches even after the command memory forgot the command.
                if let Some(existing) = self.conversations.get(&conversation) {
                    return existing.created.answer(command);
                }
                if let Some(title) = title
                    && let Err((code, message)) = check_title(title, limits)
                {
                    return reject(code, message);
                }
                let mut others: Vec<UserId> = members
                    .iter()
                    .filter(|user| **user != command.actor)
                    .cloned()
                    .collect();
                others.sort();
                others.dedup();
                if others.len() + 1 > limits.max_group_members {
                    return reject(
                        ErrorCode::InvalidRequest,
                        format!("a group has at most {} members", limits.max_group_members),
                    );
                }
                let owner = Member {
                    user: command.actor.clone(),
                    role: Role::Owner,
                };
                Event::ConversationCreated(ConversationCreated {
                    kind: ConversationKind::Group,
                    title: title.clone(),
                    members: std::iter::once(owner)
                        .chain(others.into_iter().map(|user| Member {
                            user,
                            role: Role::Member,
                        }))
                        .collect(),
                })
            }
            Action::PostMessage { body, reply_to, .. } => {
                let aggregate = match self.member_of(conversation, &command.actor) {
                    Ok(aggregate) => aggregate,
                    Err((code, message)) => return reject(code, message),
                };
                if let Err((code, message)) =
                    membership::check_not_muted(aggregate, &command.actor, command.issued_at)
                {
                    return reject(code, message);
                }
                if let Err((code, message)) = check_body(body, limits) {
                    return reject(code, message);
                }
                if let Err(not) = aggregate.messages.check_reply(*reply_to, target) {
                    return not.into();
                }
                Event::MessagePosted(MessagePosted {
                    client_id: command.client_id.clone(),
                    body: body.clone(),
                    reply_to: *reply_to,
                })
            }
            Action::MarkRead { seq, .. } => {
                let aggregate = match self.member_of(conversation, &command.actor) {
                    Ok(aggregate) => aggregate,
                    Err((code, message)) => return reject(code, message),
                };
                if *seq == 0 || *seq > aggregate.last_seq {
                    return reject(
                        ErrorCode::InvalidRequest,
                        format!(
                            "seq must be between 1 and the conversation's newest event ({})",
                            aggregate.last_seq
                        ),
                    );
                }
                // Markers only move forward: one at or past `seq` already says it.
                if let Some(marker) = aggregate.read.get(&command.actor)
                    && marker.seq >= *seq
                {
                    return Decision::Known(marker.set_by);
                }
                Event::ConversationRead(ConversationRead { seq: *seq })
            }
            Action::AddMembers { .. }
            | Action::RemoveMembers { .. }
            | Action::Leave { .. }
            | Action::SetRole { .. }
            | Action::Rename { .. }
            | Action::Mute { .. }
            | Action::Unmute { .. } => {
                let aggregate = match self.member_of(conversation, &command.actor) {
                    Ok(aggregate) => aggregate,
                    Err((code, message)) => return reject(code, message),
                };
                let role = aggregate.members[&command.actor];
                match membership::decide(aggregate, role, command, limits) {
                    Ok(event) => event,
                    Err((code, message)) => return reject(code, message),
                }
            }
            Action::EditMessage { message, body, .. } => {
                let edit = |messages: &MessageState, _| {
                    messages.edit(&command.actor, *message, body, target, limits)
                };
                match self.change_message(command, edit) {
                    Ok(event) => event,
                    Err(not) => return not.into(),
                }
            }
            Action::DeleteMessage { message, .. } => {
                let delete = |messages: &MessageState, role| {
                    messages.delete(&command.actor, role, *message, target)
                };
                match self.change_message(command, delete) {
                    Ok(event) => event,
                    Err(not) => return not.into(),
                }
            }
            Action::React { message, emoji, .. } | Action::Unreact { message, emoji, .. } => {
                let add = matches!(command.action, Action::React { .. });
                let react = |messages: &MessageState, _| {
                    messages.react(&command.actor, *message, emoji, add, target)
                };
                match self.change_message(command, react) {
                    Ok(event) => event,
                    Err(not) => return not.into(),
                }
            }
        };
        let shard = self.shards.of(conversation);
        Decision::Append {
            event: EventEnvelope {
                id: command.event_id(0),
                conversation,
                prev: self
                    .conversations
                    .get(&conversation)
                    .map_or(0, |aggregate| aggregate.last_seq),
                command: command.id,
                actor: command.actor.clone(),
                at: command.issued_at,
                event,
            },
            shard,
            expected_shard_seq: self.shard_last[shard as usize],
        }
    }
}

/// What the handler's given/when/then tests build their users and commands with.
#[cfg(test)]
pub(crate) mod test_support {
    use parley_events::{Action, ClientMsgId, Command, UserId};

    pub fn user(name: &str) -> UserId {
        UserId::parse(name).unwrap()
    }

    /// A command of `actor`, issued at `at` (milliseconds since the Unix epoch).
    pub fn command_at(actor: &str, id: &str, at: u64, action: Action) -> Command {
        Command::new(
            user(actor),
            ClientMsgId::parse(id).unwrap(),
            at,
            "parley.outcome.gw".into(),
            action,
        )
    }

    pub fn command(actor: &str, id: &str, action: Action) -> Command {
        command_at(actor, id, 1_000, action)
    }
}

#[cfg(test)]
mod tests {
    use super::test_support::{command, user};
    use super::*;

    /// Given the events of `commands` appended in order, starting at sequence 1.
    fn given(commands: &[Command]) -> WriteModel {
        let mut model = WriteModel::new(Shards::new(4).unwrap(), 100);
        for (seq, command) in (1..).zip(commands) {
            match model.decide(command, &LimitsConfig::default()) {
                Decision::Append { event, .. } => model.apply(&event.recorded(seq), true),
                other => panic!("setup command was not appended: {other:?}"),
            }
        }
        model
    }

    fn direct(actor: &str, peer: &str) -> Command {
        command(
            actor,
            &format!("dm-{peer}"),
            Action::CreateDirect { peer: user(peer) },
        )
    }

    fn post(actor: &str, id: &str, conversation: ConversationId, body: &str) -> Command {
        command(
            actor,
            id,
            Action::PostMessage {
                conversation,
                body: body.into(),
                reply_to: None,
            },
        )
    }

    fn rejected_with(decision: Decision) -> ErrorCode {
        match decision {
            Decision::Reject { code, .. } => code,
            other => panic!("expected a rejection, got {other:?}"),
        }
    }

    #[test]
    fn post_to_a_direct_conversation_chains_prev_and_expected_sequence() {
        let model = given(&[direct("alice", "bob")]);
        let conversation = ConversationId::direct(&user("alice"), &user("bob"));
        match model.decide(
            &post("bob", "m1", conversation, "hi"),
            &LimitsConfig::default(),
        ) {
            Decision::Append {
                event,
                expected_shard_seq,
                ..
            } => {
                assert_eq!(event.prev, 1);
                assert_eq!(expected_shard_seq, 1);
                assert_eq!(event.conversation, conversation);
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn creating_a_direct_conversation_again_returns_the_original_from_either_side() {
        let model = given(&[direct("alice", "bob")]);
        let again = model.decide(&direct("bob", "alice"), &LimitsConfig::default());
        assert!(
            matches!(again, Decision::Known(Accepted { seq: 1, .. })),
            "{again:?}"
        );
    }

    #[test]
    fn repeated_command_is_answered_with_its_original_outcome() {
        let conversation = ConversationId::direct(&user("alice"), &user("bob"));
        let send = post("alice", "m1", conversation, "hi");
        let model = given(&[direct("alice", "bob"), send.clone()]);
        assert_eq!(
            model.decide(&send, &LimitsConfig::default()),
            Decision::Known(Accepted {
                conversation,
                seq: 2,
                event: send.event_id(0)
            })
        );
    }

    #[test]
    fn invalid_commands_are_rejected_with_their_codes() {
        let model = given(&[direct("alice", "bob")]);
        let conversation = ConversationId::direct(&user("alice"), &user("bob"));
        let limits = LimitsConfig::default();
        let unknown = ConversationId::direct(&user("x"), &user("y"));
        assert_eq!(
            rejected_with(model.decide(&post("alice", "a", unknown, "hi"), &limits)),
            ErrorCode::ConversationNotFound
        );
        assert_eq!(
            rejected_with(model.decide(&post("mallory", "b", conversation, "hi"), &limits)),
            ErrorCode::NotMember
        );
        assert_eq!(
            rejected_with(model.decide(&post("alice", "c", conversation, "  "), &limits)),
            ErrorCode::EmptyMessage
        );
        let long = "x".repeat(limits.max_message_bytes + 1);
        assert_eq!(
            rejected_with(model.decide(&post("alice", "d", conversation, &long), &limits)),
            ErrorCode::MessageTooLarge
        );
        assert_eq!(
            rejected_with(model.decide(&direct("alice", "alice"), &limits)),
            ErrorCode::InvalidRequest
        );
        let crowd = (0..limits.max_group_members)
            .map(|i| user(&format!("u{i}")))
            .collect();
        let big = command(
            "alice",
            "g",
            Action::CreateGroup {
                title: None,
                members: crowd,
            },
        );
        assert_eq!(
            rejected_with(model.decide(&big, &limits)),
            ErrorCode::InvalidRequest
        );
    }

    #[test]
    fn group_creator_is_owner_and_members_are_deduplicated() {
        let model = given(&[]);
        let create = command(
            "alice",
            "g1",
            Action::CreateGroup {
                title: Some("team".into()),
                members: vec![user("bob"), user("bob"), user("alice")],
            },
        );
        match model.decide(&create, &LimitsConfig::default()) {
            Decision::Append {
                event:
                    EventEnvelope {
                        event: Event::ConversationCreated(created),
                        ..
                    },
                ..
            } => {
                assert_eq!(
                    created.members,
                    vec![
                        Member {
                            user: user("alice"),
                            role: Role::Owner
                        },
                        Member {
                            user: user("bob"),
                            role: Role::Member
                        }
                    ]
                );
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn applying_an_event_twice_changes_nothing() {
        let mut model = given(&[direct("alice", "bob")]);
        let conversation = ConversationId::direct(&user("alice"), &user("bob"));
        let send = post("alice", "m1", conversation, "hi");
        let Decision::Append { event, .. } = model.decide(&send, &LimitsConfig::default()) else {
            panic!()
        };
        let recorded = event.recorded(2);
        model.apply(&recorded, false);
        model.apply(&recorded, true);
        let next = post("alice", "m2", conversation, "again");
        let Decision::Append {
            event,
            expected_shard_seq,
            ..
        } = model.decide(&next, &LimitsConfig::default())
        else {
            panic!()
        };
        assert_eq!(
            (event.prev, expected_shard_seq, model.position()),
            (2, 2, 2)
        );
    }

    #[test]
    fn a_restored_snapshot_decides_like_the_original() {
        let conversation = ConversationId::direct(&user("alice"), &user("bob"));
        let send = post("alice", "m1", conversation, "hi");
        let model = given(&[direct("alice", "bob"), send.clone()]);
        let restored =
            WriteModel::restore(&model.snapshot(), Shards::new(4).unwrap(), 100).unwrap();
        assert_eq!(restored.position(), 2);
        let limits = LimitsConfig::default();
        for command in [
            send,
            post("bob", "m2", conversation, "next"),
            post("carol", "m3", conversation, "x"),
            direct("bob", "alice"),
        ] {
            assert_eq!(
                restored.decide(&command, &limits),
                model.decide(&command, &limits)
            );
        }
        let err = WriteModel::restore(&model.snapshot(), Shards::new(8).unwrap(), 100)
            .err()
            .unwrap();
        assert!(err.contains("shards"), "{err}");
        assert!(WriteModel::restore(b"{}", Shards::new(4).unwrap(), 100).is_err());
    }

    #[test]
    fn read_markers_only_move_forward_and_survive_a_snapshot() {
        let conversation = ConversationId::direct(&user("alice"), &user("bob"));
        let mark = |id: &str, seq| command("alice", id, Action::MarkRead { conversation, seq });
        let limits = LimitsConfig::default();
        let model = given(&[
            direct("alice", "bob"),
            post("bob", "m1", conversation, "hi"),
            mark("r1", 2),
        ]);
        let marker = Accepted {
            conversation,
            seq: 3,
            event: mark("r1", 2).event_id(0),
        };
        for behind in [mark("r2", 1), mark("r3", 2)] {
            assert_eq!(model.decide(&behind, &limits), Decision::Known(marker));
        }
        assert!(
            matches!(
                model.decide(&mark("r4", 3), &limits),
                Decision::Append { .. }
            ),
            "the marker's own event may be marked read"
        );
        for out_of_range in [mark("r5", 0), mark("r6", 4)] {
            assert_eq!(
                rejected_with(model.decide(&out_of_range, &limits)),
                ErrorCode::InvalidRequest
            );
        }
        let outsider = command(
            "carol",
            "r7",
            Action::MarkRead {
                conversation,
                seq: 1,
            },
        );
        assert_eq!(
            rejected_with(model.decide(&outsider, &limits)),
            ErrorCode::NotMember
        );
        let restored =
            WriteModel::restore(&model.snapshot(), Shards::new(4).unwrap(), 100).unwrap();
        assert_eq!(
            restored.decide(&mark("r8", 1), &limits),
            Decision::Known(marker)
        );
    }

    #[test]
    fn a_different_request_reusing_an_id_is_refused_by_the_model_the_snapshot_and_a_replay() {
        let conversation = ConversationId::direct(&user("alice"), &user("bob"));
        let send = post("alice", "m1", conversation, "hi");
        let group = command(
            "alice",
            "g1",
            Action::CreateGroup {
                title: Some("team".into()),
                members: vec![user("bob")],
            },
        );
        let original = given(&[direct("alice", "bob"), send.clone(), group.clone()]);
        let restored =
            WriteModel::restore(&original.snapshot(), Shards::new(4).unwrap(), 100).unwrap();
        let limits = LimitsConfig::default();
        // Rebuilt from the log alone, with a memory too short to hold the group's command.
        let mut replayed = WriteModel::new(Shards::new(4).unwrap(), 1);
        let log = [
            direct("alice", "bob"),
            send.clone(),
            group.clone(),
            post("alice", "m9", conversation, "pushes g1 out"),
        ];
        for (seq, command) in (1..).zip(log) {
            let Decision::Append { event, .. } = replayed.decide(&command, &limits) else {
                panic!()
            };
            replayed.apply(&event.recorded(seq), true);
        }
        assert!(replayed.outcome_of(group.id).is_none());
        let reused = [
            post("alice", "m1", conversation, "another body"),
            command(
                "alice",
                "m1",
                Action::CreateDirect {
                    peer: user("carol"),
                },
            ),
            command(
                "alice",
                "g1",
                Action::CreateGroup {
                    title: Some("other team".into()),
                    members: vec![user("bob")],
                },
            ),
        ];
        for (model, forgot_m1) in [(&original, false), (&restored, false), (&replayed, true)] {
            for command in reused.iter().skip(if forgot_m1 { 2 } else { 0 }) {
                assert_eq!(
                    rejected_with(model.decide(command, &limits)),
                    ErrorCode::IdReused,
                    "{command:?}"
                );
            }
            let same_group = command(
                "alice",
                "g1",
                Action::CreateGroup {
                    title: Some("team".into()),
                    members: vec![user("bob"), user("alice"), user("bob")],
                },
            );
            assert!(matches!(
                model.decide(&same_group, &limits),
                Decision::Known(Accepted { seq: 3, .. })
            ));
        }
        for model in [&original, &restored] {
            assert!(matches!(
                model.decide(&send, &limits),
                Decision::Known(Accepted { seq: 2, .. })
            ));
        }
    }

    #[test]
    fn a_snapshot_of_the_format_without_fingerprints_is_refused() {
        let model = given(&[direct("alice", "bob")]);
        let mut old: serde_json::Value = serde_json::from_slice(&model.snapshot()).unwrap();
        // Format 1 remembered a command's outcome alone.
        old["format"] = 1.into();
        for remembered in old["commands"].as_array_mut().unwrap() {
            remembered[1] = remembered[1]["accepted"].clone();
        }
        for aggregate in old["conversations"].as_object_mut().unwrap().values_mut() {
            aggregate["created"] = aggregate["created"]["accepted"].clone();
        }
        let err = WriteModel::restore(
            &serde_json::to_vec(&old).unwrap(),
            Shards::new(4).unwrap(),
            100,
        )
        .err()
        .unwrap();
        assert!(err.contains("format 1"), "{err}");
    }

    #[test]
    fn remembered_commands_are_bounded() {
        let mut model = WriteModel::new(Shards::new(1).unwrap(), 2);
        let create = direct("alice", "bob");
        let Decision::Append { event, .. } = model.decide(&create, &LimitsConfig::default()) else {
            panic!()
        };
        model.apply(&event.recorded(1), true);
        let conversation = ConversationId::direct(&user("alice"), &user("bob"));
        for (seq, id) in [(2, "m1"), (3, "m2")] {
            let Decision::Append { event, .. } = model.decide(
                &post("alice", id, conversation, "x"),
                &LimitsConfig::default(),
            ) else {
                panic!()
            };
            model.apply(&event.recorded(seq), true);
        }
        assert!(
            model.outcome_of(create.id).is_none(),
            "the oldest command is forgotten"
        );
        assert!(
            model
                .outcome_of(post("alice", "m2", conversation, "x").id)
                .is_some()
        );
    }
}
