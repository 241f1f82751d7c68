//! The event log's format: the envelope, the event catalogue and upcasting.
//!
//! An event is stored as one JSON object:
//!
//! ```json
//! {"id":"…","conversation":"…","prev":41,"command":"…","actor":"alice","at":1700000000000,
//!  "type":"message.posted","v":1,"data":{…}}
//! ```
//!
//! The log sequence is not stored in the payload (the stream assigns it on append); readers
//! attach it from the stream and hand out a [`RecordedEvent`]. `prev` is the sequence of the
//! previous event of the same conversation (0 for its first), so any reader can detect a gap.
//!
//! Stored history is never rewritten. A change to an event's data bumps its version; the
//! decoder turns older versions into the current one through [`upcast`], one version step at
//! a time, so every reader only ever sees current types. An unknown type or a version newer
//! than this build understands is an error, never a silent skip.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::ids::{ClientMsgId, CommandId, ConversationId, EventId, UserId};

/// An event with its place in the log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RecordedEvent {
    /// The event's sequence in the log stream.
    pub seq: u64,
    #[serde(flatten)]
    pub envelope: EventEnvelope,
}

/// An event and its metadata, as appended to the log.
#[derive(Debug, Clone, PartialEq)]
pub struct EventEnvelope {
    pub id: EventId,
    pub conversation: ConversationId,
    /// Sequence of the previous event of this conversation; 0 when this is its first.
    pub prev: u64,
    /// The command that caused this event.
    pub command: CommandId,
    /// The user who issued the command.
    pub actor: UserId,
    /// When the command was issued, milliseconds since the Unix epoch.
    pub at: u64,
    pub event: Event,
}

/// The event catalogue. Names are past tense; each has a type name and a version.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(untagged)]
pub enum Event {
    ConversationCreated(ConversationCreated),
    MessagePosted(MessagePosted),
    ConversationRead(ConversationRead),
    MembersAdded(MembersAdded),
    MembersRemoved(MembersRemoved),
    MemberLeft(MemberLeft),
    MemberRoleChanged(MemberRoleChanged),
    ConversationRenamed(ConversationRenamed),
    MemberMuted(MemberMuted),
    MemberUnmuted(MemberUnmuted),
    MessageEdited(MessageEdited),
    MessageDeleted(MessageDeleted),
    ReactionAdded(Reaction),
    ReactionRemoved(Reaction),
}

/// `conversation.created` v1: a direct conversation (exactly two members) or a group (its
/// creator is the owner).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConversationCreated {
    pub kind: ConversationKind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub title: Option<String>,
    pub members: Vec<Member>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ConversationKind {
    Direct,
    Group,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Member {
    pub user: UserId,
    pub role: Role,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    Owner,
    Admin,
    Member,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Owner => "owner",
            Role::Admin => "admin",
            Role::Member => "member",
        }
    }

    pub fn parse(value: &str) -> Option<Self> {
        match value {
            "owner" => Some(Role::Owner),
            "admin" => Some(Role::Admin),
            "member" => Some(Role::Member),
            _ => None,
        }
    }
}

/// `message.posted` v2 (v1 had no `reply_to`). The message's id is the event's id; other
/// events refer to the message by its log sequence.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MessagePosted {
    /// The sender's id for the send, so the sender's other devices can match it up.
    pub client_id: ClientMsgId,
    pub body: String,
    /// The sequence of the earlier message of the same conversation this one replies to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reply_to: Option<u64>,
}

/// `message.edited` v1: the author replaced the body of the message at sequence `message`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MessageEdited {
    pub message: u64,
    pub body: String,
}

/// `message.deleted` v1: the message at sequence `message` is a tombstone from here on; its
/// body leaves every projection (the log keeps the events).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MessageDeleted {
    pub message: u64,
}

/// `reaction.added` v1 and `reaction.removed` v1: the actor's `emoji` on the message at
/// sequence `message`. A user has each emoji on a message at most once.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Reaction {
    pub message: u64,
    pub emoji: String,
}

/// `conversation.read` v1: the actor has read the conversation up to `seq` (inclusive).
/// Appended only when it moves the actor's marker forward.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConversationRead {
    pub seq: u64,
}

/// `member.added` v1: the actor added these users to a group. Users who were already
/// members are not in it, so it never holds an empty list.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MembersAdded {
    pub members: Vec<Member>,
}

/// `member.removed` v1: the actor removed these members from a group.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MembersRemoved {
    pub users: Vec<UserId>,
}

/// `member.left` v1: the actor left the group.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemberLeft {}

/// `member.role_changed` v1: the actor gave `user` the role `role`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemberRoleChanged {
    pub user: UserId,
    pub role: Role,
}

/// `conversation.renamed` v1: the group's title is now `title` (`null`: no title).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConversationRenamed {
    pub title: Option<String>,
}

/// `member.muted` v1: `user` may not post until `until` (milliseconds since the Unix epoch).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemberMuted {
    pub user: UserId,
    pub until: u64,
}

/// `member.unmuted` v1: `user`'s mute was lifted before it ran out.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemberUnmuted {
    pub user: UserId,
}

/// Why stored bytes could not be read as an event.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("malformed event envelope: {0}")]
    Malformed(#[from] serde_json::Error),
    #[error("unknown event type {type_name:?}")]
    UnknownType { type_name: String },
    #[error(
        "event {type_name:?} has version {version}, this build understands up to {current}; upgrade the reader"
    )]
    VersionTooNew {
        type_name: String,
        version: u32,
        current: u32,
    },
    #[error("no upcaster from {type_name:?} version {version}")]
    NoUpcaster { type_name: String, version: u32 },
}

pub const CONVERSATION_CREATED: &str = "conversation.created";
pub const MESSAGE_POSTED: &str = "message.posted";
pub const CONVERSATION_READ: &str = "conversation.read";
pub const MEMBER_ADDED: &str = "member.added";
pub const MEMBER_REMOVED: &str = "member.removed";
pub const MEMBER_LEFT: &str = "member.left";
pub const MEMBER_ROLE_CHANGED: &str = "member.role_changed";
pub const CONVERSATION_RENAMED: &str = "conversation.renamed";
pub const MEMBER_MUTED: &str = "member.muted";
pub const MEMBER_UNMUTED: &str = "member.unmuted";
pub const MESSAGE_EDITED: &str = "message.edited";
pub const MESSAGE_DELETED: &str = "message.deleted";
pub const REACTION_ADDED: &str = "reaction.added";
pub const REACTION_REMOVED: &str = "reaction.removed";

/// The current version of each event type this build writes.
fn current_version(type_name: &str) -> Option<u32> {
    match type_name {
        CONVERSATION_CREATED | CONVERSATION_READ => Some(1),
        MESSAGE_POSTED => Some(2),
        MEMBER_ADDED | MEMBER_REMOVED | MEMBER_LEFT | MEMBER_ROLE_CHANGED
        | CONVERSATION_RENAMED | MEMBER_MUTED | MEMBER_UNMUTED => Some(1),
        MESSAGE_EDITED | MESSAGE_DELETED | REACTION_ADDED | REACTION_REMOVED => Some(1),
        _ => None,
    }
}

impl Event {
    pub fn type_name(&self) -> &'static str {
        match self {
            Event::ConversationCreated(_) => CONVERSATION_CREATED,
            Event::MessagePosted(_) => MESSAGE_POSTED,
            Event::ConversationRead(_) => CONVERSATION_READ,
            Event::MembersAdded(_) => MEMBER_ADDED,
            Event::MembersRemoved(_) => MEMBER_REMOVED,
            Event::MemberLeft(_) => MEMBER_LEFT,
            Event::MemberRoleChanged(_) => MEMBER_ROLE_CHANGED,
            Event::ConversationRenamed(_) => CONVERSATION_RENAMED,
            Event::MemberMuted(_) => MEMBER_MUTED,
            Event::MemberUnmuted(_) => MEMBER_UNMUTED,
            Event::MessageEdited(_) => MESSAGE_EDITED,
            Event::MessageDeleted(_) => MESSAGE_DELETED,
            Event::ReactionAdded(_) => REACTION_ADDED,
            Event::ReactionRemoved(_) => REACTION_REMOVED,
        }
    }

    pub fn version(&self) -> u32 {
        current_version(self.type_name()).unwrap_or(1)
    }

    /// The oldest client protocol version that knows this event type: sockets speaking an
    /// older one are not sent it, so a client never meets a type its version did not list.
    pub fn since_protocol(&self) -> u32 {
        match self {
            Event::ConversationCreated(_) | Event::MessagePosted(_) => 1,
            Event::ConversationRead(_)
            | Event::MembersAdded(_)
            | Event::MembersRemoved(_)
            | Event::MemberLeft(_)
            | Event::MemberRoleChanged(_)
            | Event::ConversationRenamed(_)
            | Event::MemberMuted(_)
            | Event::MemberUnmuted(_)
            | Event::MessageEdited(_)
            | Event::MessageDeleted(_)
            | Event::ReactionAdded(_)
            | Event::ReactionRemoved(_) => 2,
        }
    }

    /// The sequence of the message this event changes (an edit, a deletion, a reaction).
    pub fn target_message(&self) -> Option<u64> {
        match self {
            Event::MessageEdited(MessageEdited { message, .. })
            | Event::MessageDeleted(MessageDeleted { message })
            | Event::ReactionAdded(Reaction { message, .. })
            | Event::ReactionRemoved(Reaction { message, .. }) => Some(*message),
            Event::ConversationCreated(_)
            | Event::MessagePosted(_)
            | Event::ConversationRead(_)
            | Event::MembersAdded(_)
            | Event::MembersRemoved(_)
            | Event::MemberLeft(_)
            | Event::MemberRoleChanged(_)
            | Event::ConversationRenamed(_)
            | Event::MemberMuted(_)
            | Event::MemberUnmuted(_) => None,
        }
    }

    /// Whether only the actor's own sockets are sent it live (a read marker is for the
    /// reader's other devices, not for the other members).
    pub fn only_for_actor(&self) -> bool {
        matches!(self, Event::ConversationRead(_))
    }

    /// The members this event brings into its conversation: their sockets start following
    /// it from this event.
    pub fn joining(&self) -> &[Member] {
        match self {
            Event::ConversationCreated(created) => &created.members,
            Event::MembersAdded(added) => &added.members,
            Event::MessagePosted(_)
            | Event::ConversationRead(_)
            | Event::MembersRemoved(_)
            | Event::MemberLeft(_)
            | Event::MemberRoleChanged(_)
            | Event::ConversationRenamed(_)
            | Event::MemberMuted(_)
            | Event::MemberUnmuted(_)
            | Event::MessageEdited(_)
            | Event::MessageDeleted(_)
            | Event::ReactionAdded(_)
            | Event::ReactionRemoved(_) => &[],
        }
    }

    /// Whether this event, issued by `actor`, takes `user` out of its conversation: it is
    /// the last event of the conversation the user's sockets are sent.
    pub fn departs(&self, user: &UserId, actor: &UserId) -> bool {
        match self {
            Event::MembersRemoved(removed) => removed.users.contains(user),
            Event::MemberLeft(_) => actor == user,
            Event::ConversationCreated(_)
            | Event::MessagePosted(_)
            | Event::ConversationRead(_)
            | Event::MembersAdded(_)
            | Event::MemberRoleChanged(_)
            | Event::ConversationRenamed(_)
            | Event::MemberMuted(_)
            | Event::MemberUnmuted(_)
            | Event::MessageEdited(_)
            | Event::MessageDeleted(_)
            | Event::ReactionAdded(_)
            | Event::ReactionRemoved(_) => false,
        }
    }

    /// Decode the data of a stored event of any known version.
    pub fn decode(type_name: &str, version: u32, data: Value) -> Result<Self, DecodeError> {
        let data = upcast(type_name, version, data)?;
        Ok(match type_name {
            CONVERSATION_CREATED => Event::ConversationCreated(serde_json::from_value(data)?),
            MESSAGE_POSTED => Event::MessagePosted(serde_json::from_value(data)?),
            CONVERSATION_READ => Event::ConversationRead(serde_json::from_value(data)?),
            MEMBER_ADDED => Event::MembersAdded(serde_json::from_value(data)?),
            MEMBER_REMOVED => Event::MembersRemoved(serde_json::from_value(data)?),
            MEMBER_LEFT => Event::MemberLeft(serde_json::from_value(data)?),
            MEMBER_ROLE_CHANGED => Event::MemberRoleChanged(serde_json::from_value(data)?),
            CONVERSATION_RENAMED => Event::ConversationRenamed(serde_json::from_value(data)?),
            MEMBER_MUTED => Event::MemberMuted(serde_json::from_value(data)?),
            MEMBER_UNMUTED => Event::MemberUnmuted(serde_json::from_value(data)?),
            MESSAGE_EDITED => Event::MessageEdited(serde_json::from_value(data)?),
            MESSAGE_DELETED => Event::MessageDeleted(serde_json::from_value(data)?),
            REACTION_ADDED => Event::ReactionAdded(serde_json::from_value(data)?),
            REACTION_REMOVED => Event::ReactionRemoved(serde_json::from_value(data)?),
            _ => {
                return Err(DecodeError::UnknownType {
                    type_name: type_name.to_owned(),
                });
            }
        })
    }
}

/// Bring `data` of `type_name` at `version` up to the current version, one step at a time.
///
/// Adding version 2 of an event means writing the step from 1 to 2 in [`upcast_step`]; stored
/// version-1 events then decode as version 2 everywhere, and nothing in the log changes.
pub fn upcast(type_name: &str, version: u32, mut data: Value) -> Result<Value, DecodeError> {
    let current = current_version(type_name).ok_or_else(|| DecodeError::UnknownType {
        type_name: type_name.to_owned(),
    })?;
    if version > current {
        return Err(DecodeError::VersionTooNew {
            type_name: type_name.to_owned(),
            version,
            current,
        });
    }
    let mut at = version;
    while at < current {
        data = upcast_step(type_name, at, data)?;
        at += 1;
    }
    Ok(data)
}

/// One upcasting step, from `version` to `version + 1`; a step nobody wrote is an error.
fn upcast_step(type_name: &str, version: u32, data: Value) -> Result<Value, DecodeError> {
    match (type_name, version) {
        // v2 added the optional `reply_to`; a v1 message replies to nothing, which v2 says
        // by leaving the field out, so the data is already v2.
        (MESSAGE_POSTED, 1) => Ok(data),
        _ => Err(DecodeError::NoUpcaster {
            type_name: type_name.to_owned(),
            version,
        }),
    }
}

/// The stored form, as read: the data stays raw until its type and version are known.
#[derive(Deserialize)]
struct StoredEnvelope {
    id: EventId,
    conversation: ConversationId,
    prev: u64,
    command: CommandId,
    actor: UserId,
    at: u64,
    #[serde(rename = "type")]
    type_name: String,
    v: u32,
    data: Value,
}

/// The stored form, as written, borrowing the event.
#[derive(Serialize)]
struct StoredEnvelopeRef<'a> {
    id: EventId,
    conversation: ConversationId,
    prev: u64,
    command: CommandId,
    actor: &'a UserId,
    at: u64,
    #[serde(rename = "type")]
    type_name: &'static str,
    v: u32,
    data: &'a Event,
}

impl Serialize for EventEnvelope {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        StoredEnvelopeRef {
            id: self.id,
            conversation: self.conversation,
            prev: self.prev,
            command: self.command,
            actor: &self.actor,
            at: self.at,
            type_name: self.event.type_name(),
            v: self.event.version(),
            data: &self.event,
        }
        .serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for EventEnvelope {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let stored = StoredEnvelope::deserialize(deserializer)?;
        EventEnvelope::from_stored(stored).map_err(serde::de::Error::custom)
    }
}

impl EventEnvelope {
    fn from_stored(stored: StoredEnvelope) -> Result<Self, DecodeError> {
        Ok(EventEnvelope {
            event: Event::decode(&stored.type_name, stored.v, stored.data)?,
            id: stored.id,
            conversation: stored.conversation,
            prev: stored.prev,
            command: stored.command,
            actor: stored.actor,
            at: stored.at,
        })
    }

    /// The bytes appended to the log.
    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("an envelope always serializes")
    }

    /// Read an envelope from the log, upcasting older versions. Errors name what was wrong
    /// (malformed, unknown type, too-new version) so a reader can stop with a clear message.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, DecodeError> {
        let stored: StoredEnvelope = serde_json::from_slice(bytes)?;
        Self::from_stored(stored)
    }

    pub fn recorded(self, seq: u64) -> RecordedEvent {
        RecordedEvent {
            seq,
            envelope: self,
        }
    }
}

impl RecordedEvent {
    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a recorded event always serializes")
    }

    pub fn from_bytes(bytes: &[u8]) -> Result<Self, DecodeError> {
        #[derive(Deserialize)]
        struct WithSeq {
            seq: u64,
            #[serde(flatten)]
            stored: StoredEnvelope,
        }
        let with_seq: WithSeq = serde_json::from_slice(bytes)?;
        Ok(EventEnvelope::from_stored(with_seq.stored)?.recorded(with_seq.seq))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> EventEnvelope {
        let alice = UserId::parse("alice").unwrap();
        let client_id = ClientMsgId::parse("m-1").unwrap();
        let command = CommandId::from_client(&alice, &client_id);
        EventEnvelope {
            id: EventId::derive(command, 0, 1_700_000_000_000),
            conversation: ConversationId::direct(&alice, &UserId::parse("bob").unwrap()),
            prev: 7,
            command,
            actor: alice,
            at: 1_700_000_000_000,
            event: Event::MessagePosted(MessagePosted {
                client_id,
                body: "hello".into(),
                reply_to: None,
            }),
        }
    }

    #[test]
    fn envelope_round_trips_through_stored_bytes() {
        let envelope = sample();
        let bytes = envelope.to_bytes();
        let json: Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(json["type"], "message.posted");
        assert_eq!(json["v"], 2);
        assert_eq!(json["data"]["body"], "hello");
        assert!(json.get("seq").is_none(), "the log assigns the sequence");
        assert_eq!(EventEnvelope::from_bytes(&bytes).unwrap(), envelope);
    }

    #[test]
    fn recorded_event_carries_its_sequence() {
        let recorded = sample().recorded(42);
        let bytes = recorded.to_bytes();
        let json: Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(json["seq"], 42);
        assert_eq!(RecordedEvent::from_bytes(&bytes).unwrap(), recorded);
        assert_eq!(
            serde_json::from_slice::<RecordedEvent>(&bytes).unwrap(),
            recorded
        );
    }

    fn with(field: &str, value: Value) -> Vec<u8> {
        let mut json: Value = serde_json::from_slice(&sample().to_bytes()).unwrap();
        json[field] = value;
        serde_json::to_vec(&json).unwrap()
    }

    #[test]
    fn unknown_type_is_an_error_not_a_skip() {
        let err = EventEnvelope::from_bytes(&with("type", "message.exploded".into())).unwrap_err();
        assert!(
            matches!(err, DecodeError::UnknownType { ref type_name } if type_name == "message.exploded")
        );
    }

    #[test]
    fn newer_version_is_an_error_that_says_upgrade() {
        let err = EventEnvelope::from_bytes(&with("v", 3.into())).unwrap_err();
        assert!(matches!(
            err,
            DecodeError::VersionTooNew {
                version: 3,
                current: 2,
                ..
            }
        ));
        assert!(err.to_string().contains("upgrade"));
    }

    #[test]
    fn version_zero_has_no_upcaster() {
        let err = EventEnvelope::from_bytes(&with("v", 0.into())).unwrap_err();
        assert!(matches!(err, DecodeError::NoUpcaster { version: 0, .. }));
    }

    #[test]
    fn a_stored_v1_message_decodes_as_v2_without_a_reply() {
        // The bytes a build before message.posted v2 appended, as they sit in old logs.
        let stored = br#"{"id":"0190a5d2-7c00-7000-8000-000000000001","conversation":"0190a5d2-7c00-7000-8000-000000000002","prev":3,"command":"0190a5d2-7c00-7000-8000-000000000003","actor":"alice","at":1700000000000,"type":"message.posted","v":1,"data":{"client_id":"m-1","body":"old"}}"#;
        let envelope = EventEnvelope::from_bytes(stored).unwrap();
        assert_eq!(
            envelope.event,
            Event::MessagePosted(MessagePosted {
                client_id: ClientMsgId::parse("m-1").unwrap(),
                body: "old".into(),
                reply_to: None,
            })
        );
        let rewritten: Value = serde_json::from_slice(&envelope.to_bytes()).unwrap();
        assert_eq!(
            (rewritten["v"].as_u64(), rewritten["data"].get("reply_to")),
            (Some(2), None)
        );
        let reply = with(
            "data",
            serde_json::json!({"client_id": "m", "body": "x", "reply_to": 4}),
        );
        let Event::MessagePosted(posted) = EventEnvelope::from_bytes(&reply).unwrap().event else {
            panic!()
        };
        assert_eq!(posted.reply_to, Some(4));
    }

    #[test]
    fn message_changes_round_trip_and_name_their_message() {
        for event in [
            Event::MessageEdited(MessageEdited {
                message: 5,
                body: "fixed".into(),
            }),
            Event::MessageDeleted(MessageDeleted { message: 5 }),
            Event::ReactionAdded(Reaction {
                message: 5,
                emoji: "👍".into(),
            }),
            Event::ReactionRemoved(Reaction {
                message: 5,
                emoji: "👍".into(),
            }),
        ] {
            let envelope = EventEnvelope {
                event: event.clone(),
                ..sample()
            };
            let decoded = EventEnvelope::from_bytes(&envelope.to_bytes()).unwrap();
            assert_eq!(decoded.event, event);
            assert_eq!(
                (event.target_message(), event.since_protocol()),
                (Some(5), 2)
            );
        }
    }

    #[test]
    fn data_with_unexpected_fields_is_malformed() {
        let err = EventEnvelope::from_bytes(&with(
            "data",
            serde_json::json!({"client_id": "m", "body": "x", "extra": 1}),
        ))
        .unwrap_err();
        assert!(matches!(err, DecodeError::Malformed(_)));
    }
}
