//! The write model's rules for changing messages: edits, deletions, reactions and replies.
//!
//! They need the message they refer to: that it is a `message.posted` of the conversation,
//! and who wrote it. The write model does not keep every message (that grows without
//! bound); the handler reads the one a command names from the log by its sequence and hands
//! it in as a [`MessageRef`]. What the write model keeps per conversation is sparse: the
//! deleted messages, and the reactions of messages that have any ([`MessageState`]).

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use parley_events::event::{MessageDeleted, MessageEdited, Reaction};
use parley_events::{ErrorCode, Event, EventEnvelope, Role, UserId};

use super::write_model::{Accepted, check_body};
use crate::config::LimitsConfig;

/// Longest emoji accepted, in bytes: room for the longest ZWJ sequences in use.
pub const MAX_EMOJI_BYTES: usize = 32;
/// Most different emoji one user holds on one message: with the member limit, it bounds a
/// message's reactions (and the store partition that holds them).
pub const MAX_EMOJI_PER_USER: usize = 20;

/// A message as the log holds it, read by the handler at the sequence a command names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MessageRef {
    pub seq: u64,
    pub author: UserId,
}

impl MessageRef {
    /// The message `envelope` at `seq` is, if it is a message of `conversation`.
    pub fn of(
        envelope: &EventEnvelope,
        seq: u64,
        conversation: parley_events::ConversationId,
    ) -> Option<MessageRef> {
        (envelope.conversation == conversation && matches!(envelope.event, Event::MessagePosted(_)))
            .then(|| MessageRef {
                seq,
                author: envelope.actor.clone(),
            })
    }
}

/// What a conversation's messages need remembered beyond the log: which are deleted (by
/// the event that deleted them) and who holds which emoji on which message (by the event
/// that added it). A deleted message's reactions are forgotten: nothing may react to it.
#[derive(Debug, Default, Serialize, Deserialize)]
pub(super) struct MessageState {
    #[serde(default, skip_serializing_if = "HashMap::is_empty")]
    deleted: HashMap<u64, Accepted>,
    #[serde(default, skip_serializing_if = "HashMap::is_empty")]
    reactions: HashMap<u64, HashMap<UserId, HashMap<String, Accepted>>>,
}

/// Why a message command is not appended: it already took effect, or it is refused.
#[derive(Debug)]
pub(super) enum NotAppended {
    Known(Accepted),
    Refused(ErrorCode, String),
}

fn refused(code: ErrorCode, message: impl Into<String>) -> NotAppended {
    NotAppended::Refused(code, message.into())
}

/// The checks an emoji must pass, whoever makes them: the gateway refuses at the edge what
/// the handler would refuse anyway.
pub fn check_emoji(emoji: &str) -> Result<(), (ErrorCode, String)> {
    if emoji.is_empty()
        || emoji.len() > MAX_EMOJI_BYTES
        || emoji.chars().any(|c| c.is_whitespace() || c.is_control())
    {
        return Err((
            ErrorCode::InvalidRequest,
            format!(
                "an emoji is 1 to {MAX_EMOJI_BYTES} bytes without spaces or control characters"
            ),
        ));
    }
    Ok(())
}

impl MessageState {
    /// Follow one event of the conversation; `accepted` says where it is in the log.
    pub(super) fn apply(&mut self, envelope: &EventEnvelope, accepted: Accepted) {
        match &envelope.event {
            Event::MessageDeleted(MessageDeleted { message }) => {
                self.deleted.entry(*message).or_insert(accepted);
                self.reactions.remove(message);
            }
            Event::ReactionAdded(Reaction { message, emoji })
                if !self.deleted.contains_key(message) =>
            {
                self.reactions
                    .entry(*message)
                    .or_default()
                    .entry(envelope.actor.clone())
                    .or_default()
                    .entry(emoji.clone())
                    .or_insert(accepted);
            }
            Event::ReactionRemoved(Reaction { message, emoji }) => {
                if let Some(users) = self.reactions.get_mut(message) {
                    if let Some(held) = users.get_mut(&envelope.actor) {
                        held.remove(emoji);
                        if held.is_empty() {
                            users.remove(&envelope.actor);
                        }
                    }
                    if users.is_empty() {
                        self.reactions.remove(message);
                    }
                }
            }
            // An edit changes nothing kept here, and other events are not about messages.
            _ => {}
        }
    }

    /// The message `seq` names, if it is one of the conversation's and not deleted.
    fn live<'a>(
        &self,
        seq: u64,
        target: Option<&'a MessageRef>,
    ) -> Result<&'a MessageRef, NotAppended> {
        match target {
            Some(message) if message.seq == seq && !self.deleted.contains_key(&seq) => Ok(message),
            Some(message) if message.seq == seq => Err(refused(
                ErrorCode::MessageNotFound,
                format!("message {seq} was deleted"),
            )),
            _ => Err(refused(
                ErrorCode::MessageNotFound,
                format!("{seq} is not a message of this conversation"),
            )),
        }
    }

    /// A send's `reply_to`: an earlier message of this conversation that is not deleted.
    pub(super) fn check_reply(
        &self,
        reply_to: Option<u64>,
        target: Option<&MessageRef>,
    ) -> Result<(), NotAppended> {
        match reply_to {
            Some(seq) => self.live(seq, target).map(|_| ()),
            None => Ok(()),
        }
    }

    /// `actor` edits `message` (`target`, as the log holds it): its author only.
    pub(super) fn edit(
        &self,
        actor: &UserId,
        message: u64,
        body: &str,
        target: Option<&MessageRef>,
        limits: &LimitsConfig,
    ) -> Result<Event, NotAppended> {
        check_body(body, limits).map_err(|(code, text)| refused(code, text))?;
        if self.live(message, target)?.author != *actor {
            return Err(refused(
                ErrorCode::Forbidden,
                "only a message's author may edit it",
            ));
        }
        Ok(Event::MessageEdited(MessageEdited {
            message,
            body: body.to_owned(),
        }))
    }

    /// `actor`, whose role is `role`, deletes `message`: its author, an owner or an admin.
    pub(super) fn delete(
        &self,
        actor: &UserId,
        role: Role,
        message: u64,
        target: Option<&MessageRef>,
    ) -> Result<Event, NotAppended> {
        // Deleting what is deleted is done already, whoever asks.
        if let Some(deleted) = self.deleted.get(&message) {
            return Err(NotAppended::Known(*deleted));
        }
        if self.live(message, target)?.author != *actor
            && !matches!(role, Role::Owner | Role::Admin)
        {
            return Err(refused(
                ErrorCode::Forbidden,
                "only the author, an owner or an admin may delete a message",
            ));
        }
        Ok(Event::MessageDeleted(MessageDeleted { message }))
    }

    /// `actor` adds (`add`) or removes `emoji` on `message`: one of each per user, and
    /// what is already so appends nothing.
    pub(super) fn react(
        &self,
        actor: &UserId,
        message: u64,
        emoji: &str,
        add: bool,
        target: Option<&MessageRef>,
    ) -> Result<Event, NotAppended> {
        check_emoji(emoji).map_err(|(code, text)| refused(code, text))?;
        self.live(message, target)?;
        let mine = self
            .reactions
            .get(&message)
            .and_then(|users| users.get(actor));
        let reaction = Reaction {
            message,
            emoji: emoji.to_owned(),
        };
        match (add, mine.and_then(|mine| mine.get(emoji))) {
            (true, Some(added)) => Err(NotAppended::Known(*added)),
            (true, None) if mine.is_some_and(|mine| mine.len() >= MAX_EMOJI_PER_USER) => {
                Err(refused(
                    ErrorCode::InvalidRequest,
                    format!("one user holds at most {MAX_EMOJI_PER_USER} emoji on a message"),
                ))
            }
            (true, None) => Ok(Event::ReactionAdded(reaction)),
            (false, Some(_)) => Ok(Event::ReactionRemoved(reaction)),
            (false, None) => Err(refused(
                ErrorCode::InvalidRequest,
                format!("you have no {emoji} on message {message}"),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    //! Each rule as given (events in the log) / when (a command) / then (the decision). The
    //! message a command refers to is looked up in the given log, as the handler reads it.

    use super::*;
    use crate::handler::write_model::test_support::{command, user};
    use crate::handler::write_model::{Decision, WriteModel};
    use parley_events::event::{ConversationCreated, MessagePosted};
    use parley_events::subjects::Shards;
    use parley_events::{Action, Command, ConversationId, ConversationKind, Member, RecordedEvent};

    /// A group with an owner (alice), an admin (bob) and two members (carol, dave), and
    /// the direct conversation of alice and erin.
    fn team() -> ConversationId {
        ConversationId::from_uuid(uuid::Uuid::from_u128(7))
    }

    fn dm() -> ConversationId {
        ConversationId::direct(&user("alice"), &user("erin"))
    }

    struct Log {
        model: WriteModel,
        events: Vec<RecordedEvent>,
    }

    impl Log {
        /// The group and the direct conversation, created at sequences 1 and 2.
        fn new() -> Log {
            let mut log = Log {
                model: WriteModel::new(Shards::new(4).unwrap(), 100),
                events: Vec::new(),
            };
            let members = [
                ("alice", Role::Owner),
                ("bob", Role::Admin),
                ("carol", Role::Member),
                ("dave", Role::Member),
            ];
            let created = EventEnvelope {
                id: parley_events::EventId::from_uuid(uuid::Uuid::from_u128(1)),
                conversation: team(),
                prev: 0,
                command: parley_events::CommandId::from_uuid(uuid::Uuid::from_u128(1)),
                actor: user("alice"),
                at: 1,
                event: Event::ConversationCreated(ConversationCreated {
                    kind: ConversationKind::Group,
                    title: None,
                    members: members
                        .iter()
                        .map(|(name, role)| Member {
                            user: user(name),
                            role: *role,
                        })
                        .collect(),
                }),
            };
            log.record(created);
            log.append(&command(
                "alice",
                "dm",
                Action::CreateDirect { peer: user("erin") },
            ));
            log
        }

        fn record(&mut self, envelope: EventEnvelope) -> u64 {
            let seq = self.events.len() as u64 + 1;
            let recorded = envelope.recorded(seq);
            self.model.apply(&recorded, true);
            self.events.push(recorded);
            seq
        }

        /// The message the log holds at the command's target, as the handler reads it.
        fn target(&self, command: &Command) -> Option<MessageRef> {
            let seq = command.target_message()?;
            let event = self
                .events
                .get(usize::try_from(seq).ok()?.checked_sub(1)?)?;
            MessageRef::of(&event.envelope, seq, command.conversation())
        }

        fn when(&self, command: &Command) -> Decision {
            self.model.decide_with(
                command,
                &LimitsConfig::default(),
                self.target(command).as_ref(),
            )
        }

        /// Append what `command` decides to; its sequence.
        fn append(&mut self, command: &Command) -> u64 {
            match self.when(command) {
                Decision::Append { event, .. } => self.record(event),
                other => panic!("{command:?} was not appended: {other:?}"),
            }
        }

        fn post(&mut self, actor: &str, id: &str, conversation: ConversationId) -> u64 {
            self.append(&post(actor, id, conversation, None))
        }

        fn refused(&self, command: &Command) -> ErrorCode {
            match self.when(command) {
                Decision::Reject { code, .. } => code,
                other => panic!("{command:?} was not refused: {other:?}"),
            }
        }

        fn known(&self, command: &Command) -> u64 {
            match self.when(command) {
                Decision::Known(accepted) => accepted.seq,
                other => panic!("{command:?} was not known: {other:?}"),
            }
        }
    }

    fn post(actor: &str, id: &str, conversation: ConversationId, reply_to: Option<u64>) -> Command {
        command(
            actor,
            id,
            Action::PostMessage {
                conversation,
                body: format!("{id} by {actor}"),
                reply_to,
            },
        )
    }

    fn edit(actor: &str, id: &str, message: u64) -> Command {
        command(
            actor,
            id,
            Action::EditMessage {
                conversation: team(),
                message,
                body: "better".into(),
            },
        )
    }

    fn delete(actor: &str, id: &str, conversation: ConversationId, message: u64) -> Command {
        command(
            actor,
            id,
            Action::DeleteMessage {
                conversation,
                message,
            },
        )
    }

    fn react(actor: &str, id: &str, message: u64, emoji: &str) -> Command {
        command(
            actor,
            id,
            Action::React {
                conversation: team(),
                message,
                emoji: emoji.into(),
            },
        )
    }

    fn unreact(actor: &str, id: &str, message: u64, emoji: &str) -> Command {
        command(
            actor,
            id,
            Action::Unreact {
                conversation: team(),
                message,
                emoji: emoji.into(),
            },
        )
    }

    #[test]
    fn only_the_author_edits_and_the_edit_is_an_event_about_the_message() {
        let mut log = Log::new();
        let message = log.post("carol", "m1", team());
        let Decision::Append { event, .. } = log.when(&edit("carol", "e1", message)) else {
            panic!()
        };
        assert_eq!(
            event.event,
            Event::MessageEdited(MessageEdited {
                message,
                body: "better".into()
            })
        );
        for other in ["alice", "bob", "dave"] {
            assert_eq!(
                log.refused(&edit(other, "e2", message)),
                ErrorCode::Forbidden,
                "{other}, even an owner or admin"
            );
        }
        let empty = command(
            "carol",
            "e3",
            Action::EditMessage {
                conversation: team(),
                message,
                body: " ".into(),
            },
        );
        assert_eq!(log.refused(&empty), ErrorCode::EmptyMessage);
    }

    #[test]
    fn a_reference_that_is_not_a_live_message_of_the_conversation_is_not_found() {
        let mut log = Log::new();
        let elsewhere = log.post("alice", "m1", dm());
        let message = log.post("carol", "m2", team());
        let first_edit = log.append(&edit("carol", "e1", message));
        for seq in [0, 1, elsewhere, first_edit, 99] {
            assert_eq!(
                log.refused(&edit("carol", &format!("e-{seq}"), seq)),
                ErrorCode::MessageNotFound,
                "seq {seq}"
            );
            assert_eq!(
                log.refused(&react("carol", &format!("r-{seq}"), seq, "👍")),
                ErrorCode::MessageNotFound
            );
            assert_eq!(
                log.refused(&post("carol", &format!("p-{seq}"), team(), Some(seq))),
                ErrorCode::MessageNotFound
            );
        }
        log.append(&delete("carol", "d1", team(), message));
        assert_eq!(
            log.refused(&edit("carol", "e2", message)),
            ErrorCode::MessageNotFound
        );
        assert_eq!(
            log.refused(&react("dave", "r1", message, "👍")),
            ErrorCode::MessageNotFound
        );
        assert_eq!(
            log.refused(&post("dave", "p1", team(), Some(message))),
            ErrorCode::MessageNotFound,
            "no reply to a deleted message"
        );
    }

    #[test]
    fn a_reply_names_an_earlier_message_of_the_conversation() {
        let mut log = Log::new();
        let message = log.post("carol", "m1", team());
        let reply = log.append(&post("dave", "m2", team(), Some(message)));
        let Event::MessagePosted(MessagePosted { reply_to, .. }) =
            &log.events[reply as usize - 1].envelope.event
        else {
            panic!()
        };
        assert_eq!(*reply_to, Some(message));
    }

    #[test]
    fn the_author_an_owner_or_an_admin_deletes_a_member_only_their_own() {
        let mut log = Log::new();
        let carols = log.post("carol", "m1", team());
        assert_eq!(
            log.refused(&delete("dave", "d1", team(), carols)),
            ErrorCode::Forbidden
        );
        for deleter in ["carol", "alice", "bob"] {
            assert!(
                matches!(
                    log.when(&delete(deleter, "d2", team(), carols)),
                    Decision::Append { .. }
                ),
                "{deleter}"
            );
        }
        let deleted = log.append(&delete("bob", "d3", team(), carols));
        // Deleting it again, with any id, by anyone allowed: already done.
        assert_eq!(log.known(&delete("carol", "d4", team(), carols)), deleted);
        // In a direct conversation both are plain members.
        let alices = log.post("alice", "m2", dm());
        assert_eq!(
            log.refused(&delete("erin", "d5", dm(), alices)),
            ErrorCode::Forbidden
        );
        assert_eq!(
            log.refused(&delete("mallory", "d6", team(), carols)),
            ErrorCode::NotMember
        );
    }

    #[test]
    fn one_of_each_emoji_per_user_and_removing_what_is_not_there_is_refused() {
        let mut log = Log::new();
        let message = log.post("carol", "m1", team());
        let added = log.append(&react("dave", "r1", message, "👍"));
        assert_eq!(log.known(&react("dave", "r2", message, "👍")), added);
        log.append(&react("carol", "r3", message, "👍"));
        log.append(&react("dave", "r4", message, "🎉"));
        log.append(&unreact("dave", "u1", message, "👍"));
        assert_eq!(
            log.refused(&unreact("dave", "u2", message, "👍")),
            ErrorCode::InvalidRequest
        );
        assert_ne!(
            log.append(&react("dave", "r5", message, "👍")),
            added,
            "again, anew"
        );
        for bad in ["", "a b", "x\u{7}", &"😀".repeat(9)] {
            assert_eq!(
                log.refused(&react("dave", "r6", message, bad)),
                ErrorCode::InvalidRequest,
                "{bad:?}"
            );
        }
        for n in 0..MAX_EMOJI_PER_USER - 2 {
            log.append(&react(
                "dave",
                &format!("many{n}"),
                message,
                &format!("e{n}"),
            ));
        }
        assert_eq!(
            log.refused(&react("dave", "r7", message, "one-too-many")),
            ErrorCode::InvalidRequest
        );
        assert_eq!(
            log.refused(&react("mallory", "r8", message, "👍")),
            ErrorCode::NotMember
        );
    }

    #[test]
    fn repeats_get_the_same_ack_and_a_reused_id_is_refused_also_after_a_restart() {
        let mut log = Log::new();
        let message = log.post("carol", "m1", team());
        let requests = [
            edit("carol", "x1", message),
            react("dave", "x2", message, "👍"),
            unreact("dave", "x3", message, "👍"),
            post("dave", "x4", team(), Some(message)),
            delete("carol", "x5", team(), message),
        ];
        let appended: Vec<u64> = requests.iter().map(|c| log.append(c)).collect();
        let other = |c: &Command| {
            command(
                c.actor.as_str(),
                c.client_id.as_str(),
                Action::React {
                    conversation: team(),
                    message,
                    emoji: "🙃".into(),
                },
            )
        };
        // The model that appended, one restored from its snapshot, and one replayed from the
        // log alone: each answers from the events.
        let restored =
            WriteModel::restore(&log.model.snapshot(), Shards::new(4).unwrap(), 100).unwrap();
        let mut replayed = WriteModel::new(Shards::new(4).unwrap(), 100);
        for event in &log.events {
            replayed.apply(event, true);
        }
        for model in [restored, replayed] {
            let again = Log {
                model,
                events: log.events.clone(),
            };
            for (request, seq) in requests.iter().zip(&appended) {
                assert_eq!(again.known(request), *seq, "{request:?}");
                assert_eq!(again.refused(&other(request)), ErrorCode::IdReused);
            }
            assert_eq!(
                again.refused(&react("dave", "x6", message, "👍")),
                ErrorCode::MessageNotFound,
                "the deletion survives"
            );
        }
    }

    #[test]
    fn a_log_written_before_message_changes_loads_and_its_messages_can_be_changed() {
        let old = include_str!("../../../events/tests/fixtures/log-before-message-changes.jsonl");
        let mut log = Log {
            model: WriteModel::new(Shards::new(4).unwrap(), 100),
            events: Vec::new(),
        };
        for line in old.lines() {
            let recorded = RecordedEvent::from_bytes(line.as_bytes()).unwrap();
            log.record(recorded.envelope);
        }
        let conversation = dm_of("alice", "bob");
        let change = |actor: &str, id: &str, action| command(actor, id, action);
        // A send of the old log, retried: its original ack.
        let retried = change(
            "alice",
            "m-1",
            Action::PostMessage {
                conversation,
                body: "hello from before replies".into(),
                reply_to: None,
            },
        );
        assert_eq!(log.known(&retried), 2);
        let edit_old = change(
            "alice",
            "e-1",
            Action::EditMessage {
                conversation,
                message: 2,
                body: "edited after the upgrade".into(),
            },
        );
        assert!(matches!(log.when(&edit_old), Decision::Append { .. }));
        let by_bob = change(
            "bob",
            "e-2",
            Action::EditMessage {
                conversation,
                message: 2,
                body: "x".into(),
            },
        );
        assert_eq!(log.refused(&by_bob), ErrorCode::Forbidden);
        log.append(&change(
            "alice",
            "p-1",
            Action::PostMessage {
                conversation,
                body: "a reply to an old one".into(),
                reply_to: Some(3),
            },
        ));
    }

    fn dm_of(a: &str, b: &str) -> ConversationId {
        ConversationId::direct(&user(a), &user(b))
    }

    #[test]
    fn reactions_survive_a_snapshot_and_a_deleted_message_forgets_its_own() {
        let mut log = Log::new();
        let message = log.post("carol", "m1", team());
        let added = log.append(&react("dave", "r1", message, "👍"));
        let restored =
            WriteModel::restore(&log.model.snapshot(), Shards::new(4).unwrap(), 100).unwrap();
        let again = Log {
            model: restored,
            events: log.events.clone(),
        };
        assert_eq!(again.known(&react("dave", "r2", message, "👍")), added);
        log.append(&delete("carol", "d1", team(), message));
        let state = &log.model;
        assert!(
            !String::from_utf8(state.snapshot()).unwrap().contains("👍"),
            "nothing may react to a deleted message, so its reactions are not kept"
        );
    }
}
