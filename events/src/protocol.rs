//! The client protocol: JSON objects in WebSocket text frames, each with a `type`.
//!
//! The full description, with examples, is `docs/protocol.md`; this module is its source of
//! truth for shapes and names.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::ErrorCode;
use crate::event::{ConversationKind, Event, Member, RecordedEvent, Role};
use crate::ids::{ClientMsgId, ConversationId, EventId, UserId};
use crate::presence::UserStatus;
use crate::typing::{TypingNotice, TypingState};

/// Newest version of the protocol described here. A client asks for it at the upgrade
/// (`?protocol=2`); without asking it gets [`OLDEST_PROTOCOL_VERSION`], so clients written
/// for version 1 keep working. `welcome` announces the version a socket speaks.
pub const PROTOCOL_VERSION: u32 = 2;
/// Oldest version still served, and the one a client gets when it does not ask.
pub const OLDEST_PROTOCOL_VERSION: u32 = 1;

/// The protocol version asked for by the value of the upgrade's `protocol` query parameter.
pub fn protocol_version(asked: Option<&str>) -> Result<u32, String> {
    let Some(asked) = asked else {
        return Ok(OLDEST_PROTOCOL_VERSION);
    };
    match asked.parse::<u32>() {
        Ok(version) if (OLDEST_PROTOCOL_VERSION..=PROTOCOL_VERSION).contains(&version) => {
            Ok(version)
        }
        _ => Err(format!(
            "protocol {asked:?} is not served; ask for {OLDEST_PROTOCOL_VERSION} to {PROTOCOL_VERSION}"
        )),
    }
}

/// Whether a socket asked for packed frames with the value of the upgrade's `pack` query
/// parameter: `1` on, `0` or absent off. Packing is part of version 2.
pub fn packing(asked: Option<&str>, protocol: u32) -> Result<bool, String> {
    match asked {
        None | Some("0") => Ok(false),
        Some("1") if protocol >= 2 => Ok(true),
        Some("1") => Err("pack=1 needs protocol=2".to_owned()),
        Some(other) => Err(format!("pack {other:?} is not understood; use 0 or 1")),
    }
}

/// Several serialized server frames as one WebSocket message: a JSON array of them, in
/// order. Only a socket that asked for `pack=1` is sent one, and it is sent frames alone too.
pub fn pack_frames<S: std::ops::Deref<Target = str>>(frames: &[S]) -> String {
    let bytes = frames.iter().map(|f| f.len() + 1).sum::<usize>() + 1;
    let mut packed = String::with_capacity(bytes);
    packed.push('[');
    for (n, frame) in frames.iter().enumerate() {
        if n > 0 {
            packed.push(',');
        }
        packed.push_str(frame);
    }
    packed.push(']');
    packed
}

/// Whether a message from the server packs several frames ([`pack_frames`]): a frame alone
/// is an object.
pub fn is_packed(text: &str) -> bool {
    text.trim_start().starts_with('[')
}

/// The frames in one WebSocket message from the server, as the JSON text of each: the
/// elements of a packed message ([`pack_frames`]), or the message itself.
pub fn unpack_frames(text: &str) -> Result<Vec<&str>, serde_json::Error> {
    if is_packed(text) {
        let frames: Vec<&serde_json::value::RawValue> = serde_json::from_str(text)?;
        Ok(frames.into_iter().map(|frame| frame.get()).collect())
    } else {
        Ok(vec![text])
    }
}

/// WebSocket close codes the server uses (RFC 6455 section 7.4.1, plus the 4000 range).
pub mod close {
    /// Normal closure, also used when the server closes an idle socket.
    pub const NORMAL: u16 = 1000;
    /// The server is shutting down; reconnect, possibly to another gateway.
    pub const GOING_AWAY: u16 = 1001;
    /// The peer broke the WebSocket protocol.
    pub const PROTOCOL_ERROR: u16 = 1002;
    /// A binary frame: this protocol only accepts text frames.
    pub const UNSUPPORTED_DATA: u16 = 1003;
    /// The connection ended without a close frame. Never sent (RFC 6455 reserves it); it
    /// labels such endings in metrics.
    pub const ABNORMAL: u16 = 1006;
    /// A text frame that is not valid UTF-8.
    pub const INVALID_PAYLOAD: u16 = 1007;
    /// Policy: the client reads too slowly to keep up with its conversations.
    pub const POLICY_VIOLATION: u16 = 1008;
    /// A frame or message larger than the advertised `max_frame_bytes`.
    pub const MESSAGE_TOO_BIG: u16 = 1009;
    /// The server hit an unexpected condition.
    pub const INTERNAL_ERROR: u16 = 1011;
    /// (v2) The socket fell too far behind one of its conversations to be caught up in
    /// place: reconnect and resume.
    pub const TRY_AGAIN_LATER: u16 = 1013;
}

/// A frame from the client.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum ClientFrame {
    /// Post a message. `id` makes the send idempotent: resend with the same id after a
    /// timeout or reconnect and the message is stored once.
    Send {
        id: ClientMsgId,
        conversation: ConversationId,
        body: String,
        /// (v2) The sequence of an earlier message of the conversation this one replies to.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        reply_to: Option<u64>,
    },
    /// Open (or find) the direct conversation with `peer`.
    CreateDirect { id: ClientMsgId, peer: UserId },
    /// Create a group owned by the sender.
    CreateGroup {
        id: ClientMsgId,
        #[serde(default)]
        title: Option<String>,
        members: Vec<UserId>,
    },
    /// Page backwards through a conversation's messages, newest first, starting below
    /// `before` (a sequence; omitted = from the newest); or, with `after` (v2), forwards,
    /// oldest first, starting above it. Not both.
    History {
        id: ClientMsgId,
        conversation: ConversationId,
        #[serde(default)]
        before: Option<u64>,
        #[serde(default)]
        after: Option<u64>,
        #[serde(default)]
        limit: Option<u32>,
    },
    /// The user's conversations, most recently active first; with `before` (a `last_seq`
    /// from the previous page), the next page.
    Conversations {
        id: ClientMsgId,
        #[serde(default)]
        before: Option<u64>,
        #[serde(default)]
        limit: Option<u32>,
    },
    /// (v2) Catch up after a reconnect: every event of the user's conversations after the
    /// given points, then live delivery. A conversation named in `conversations` resumes
    /// after that sequence; any other conversation after `cursor`, or, without a cursor,
    /// from now (nothing old is sent for it).
    Resume {
        id: ClientMsgId,
        #[serde(default)]
        cursor: Option<ResumeCursor>,
        #[serde(default)]
        conversations: BTreeMap<ConversationId, u64>,
    },
    /// (v2) A conversation's details and a page of its members, ordered by user id; with
    /// `after` (a user id from the previous page), the next page.
    Members {
        id: ClientMsgId,
        conversation: ConversationId,
        #[serde(default)]
        after: Option<UserId>,
        #[serde(default)]
        limit: Option<u32>,
    },
    /// (v2) Mark the conversation read up to `seq` (inclusive); markers only move forward.
    MarkRead {
        id: ClientMsgId,
        conversation: ConversationId,
        seq: u64,
    },
    /// Application-level keepalive for clients that cannot send WebSocket pings.
    Ping {
        #[serde(default)]
        id: Option<ClientMsgId>,
    },
    /// (v2) The sender started or stopped typing in `conversation`. Not answered; `id` only
    /// names the request in an `error`.
    Typing {
        #[serde(default)]
        id: Option<ClientMsgId>,
        conversation: ConversationId,
        state: TypingState,
    },
    /// (v2) The current presence of `users`, and their changes from now on.
    Presence { id: ClientMsgId, users: Vec<UserId> },
    /// (v2) Stop the changes of `users`. Not answered; `id` only names the request in an
    /// `error`.
    PresenceUnsubscribe {
        #[serde(default)]
        id: Option<ClientMsgId>,
        users: Vec<UserId>,
    },
    /// (v2) Add `users` to a group as plain members (owners and admins).
    AddMembers {
        id: ClientMsgId,
        conversation: ConversationId,
        users: Vec<UserId>,
    },
    /// (v2) Remove `users` from a group (owners; admins remove plain members only).
    RemoveMembers {
        id: ClientMsgId,
        conversation: ConversationId,
        users: Vec<UserId>,
    },
    /// (v2) Leave a group.
    Leave {
        id: ClientMsgId,
        conversation: ConversationId,
    },
    /// (v2) Give a member of a group a role (owners).
    SetRole {
        id: ClientMsgId,
        conversation: ConversationId,
        user: UserId,
        role: Role,
    },
    /// (v2) Set a group's title; `null` clears it (owners and admins).
    Rename {
        id: ClientMsgId,
        conversation: ConversationId,
        title: Option<String>,
    },
    /// (v2) Keep a member from posting for `seconds` (owners; admins mute plain members only).
    Mute {
        id: ClientMsgId,
        conversation: ConversationId,
        user: UserId,
        seconds: u64,
    },
    /// (v2) Lift a member's mute.
    Unmute {
        id: ClientMsgId,
        conversation: ConversationId,
        user: UserId,
    },
    /// (v2) Replace the body of the sender's own message at sequence `message`.
    Edit {
        id: ClientMsgId,
        conversation: ConversationId,
        message: u64,
        body: String,
    },
    /// (v2) Delete the message at sequence `message`: one's own, or anyone's as an owner or
    /// admin of the group.
    Delete {
        id: ClientMsgId,
        conversation: ConversationId,
        message: u64,
    },
    /// (v2) Add `emoji` to the message at sequence `message`.
    React {
        id: ClientMsgId,
        conversation: ConversationId,
        message: u64,
        emoji: String,
    },
    /// (v2) Remove the sender's `emoji` from the message at sequence `message`.
    Unreact {
        id: ClientMsgId,
        conversation: ConversationId,
        message: u64,
        emoji: String,
    },
}

/// Longest mute a `mute` frame may ask for: a year.
pub const MAX_MUTE_SECONDS: u64 = 366 * 24 * 3600;

/// The `type` names [`ClientFrame`] accepts.
pub const CLIENT_FRAME_TYPES: [&str; 23] = [
    "send",
    "create_direct",
    "create_group",
    "history",
    "conversations",
    "resume",
    "members",
    "mark_read",
    "ping",
    "typing",
    "presence",
    "presence_unsubscribe",
    "add_members",
    "remove_members",
    "leave",
    "set_role",
    "rename",
    "mute",
    "unmute",
    "edit",
    "delete",
    "react",
    "unreact",
];

/// Why a text frame is not a [`ClientFrame`].
#[derive(Debug, thiserror::Error)]
#[error("{problem}")]
pub struct FrameError {
    /// The frame's `id`, when it was a JSON object with a valid one, so the error can name
    /// the request.
    pub id: Option<ClientMsgId>,
    pub problem: FrameProblem,
}

#[derive(Debug, thiserror::Error)]
pub enum FrameProblem {
    #[error("frame is not a JSON object with a string \"type\": {0}")]
    Malformed(String),
    #[error("unknown frame type {0:?}")]
    UnknownType(String),
    #[error("invalid {frame_type} frame: {reason}")]
    Invalid { frame_type: String, reason: String },
}

impl FrameError {
    pub fn code(&self) -> ErrorCode {
        match self.problem {
            FrameProblem::UnknownType(_) => ErrorCode::UnknownFrameType,
            FrameProblem::Malformed(_) | FrameProblem::Invalid { .. } => ErrorCode::BadFrame,
        }
    }

    pub fn request_id(&self) -> Option<&ClientMsgId> {
        self.id.as_ref()
    }
}

impl ClientFrame {
    /// The request's `id` (a `ping` may have none).
    pub fn id(&self) -> Option<&ClientMsgId> {
        match self {
            ClientFrame::Send { id, .. }
            | ClientFrame::CreateDirect { id, .. }
            | ClientFrame::CreateGroup { id, .. }
            | ClientFrame::History { id, .. }
            | ClientFrame::Conversations { id, .. }
            | ClientFrame::Resume { id, .. }
            | ClientFrame::Members { id, .. }
            | ClientFrame::MarkRead { id, .. }
            | ClientFrame::Presence { id, .. }
            | ClientFrame::AddMembers { id, .. }
            | ClientFrame::RemoveMembers { id, .. }
            | ClientFrame::Leave { id, .. }
            | ClientFrame::SetRole { id, .. }
            | ClientFrame::Rename { id, .. }
            | ClientFrame::Mute { id, .. }
            | ClientFrame::Unmute { id, .. } => Some(id),
            ClientFrame::Edit { id, .. }
            | ClientFrame::Delete { id, .. }
            | ClientFrame::React { id, .. }
            | ClientFrame::Unreact { id, .. } => Some(id),
            ClientFrame::Ping { id }
            | ClientFrame::Typing { id, .. }
            | ClientFrame::PresenceUnsubscribe { id, .. } => id.as_ref(),
        }
    }

    /// The oldest protocol version that has this frame type: a socket speaking an older one
    /// is answered `unknown_frame_type`, as a server of that version would.
    pub fn since_protocol(&self) -> u32 {
        match self {
            ClientFrame::Resume { .. }
            | ClientFrame::Members { .. }
            | ClientFrame::MarkRead { .. }
            | ClientFrame::Typing { .. }
            | ClientFrame::Presence { .. }
            | ClientFrame::PresenceUnsubscribe { .. }
            | ClientFrame::AddMembers { .. }
            | ClientFrame::RemoveMembers { .. }
            | ClientFrame::Leave { .. }
            | ClientFrame::SetRole { .. }
            | ClientFrame::Rename { .. }
            | ClientFrame::Mute { .. }
            | ClientFrame::Unmute { .. } => 2,
            ClientFrame::Edit { .. }
            | ClientFrame::Delete { .. }
            | ClientFrame::React { .. }
            | ClientFrame::Unreact { .. } => 2,
            ClientFrame::Send { .. }
            | ClientFrame::CreateDirect { .. }
            | ClientFrame::CreateGroup { .. }
            | ClientFrame::History { .. }
            | ClientFrame::Conversations { .. }
            | ClientFrame::Ping { .. } => 1,
        }
    }

    /// Parse a text frame, telling malformed JSON, unknown types and invalid fields apart.
    pub fn parse(text: &str) -> Result<Self, FrameError> {
        let value: Value = serde_json::from_str(text).map_err(|e| FrameError {
            id: None,
            problem: FrameProblem::Malformed(e.to_string()),
        })?;
        // Read before anything else is checked: every error about an object names the
        // request when it can.
        let id = value
            .get("id")
            .and_then(Value::as_str)
            .and_then(|id| ClientMsgId::parse(id).ok());
        let fail = |problem| FrameError {
            id: id.clone(),
            problem,
        };
        let frame_type = match value.get("type") {
            Some(Value::String(t)) => t.clone(),
            _ => return Err(fail(FrameProblem::Malformed("missing \"type\"".into()))),
        };
        if !CLIENT_FRAME_TYPES.contains(&frame_type.as_str()) {
            return Err(fail(FrameProblem::UnknownType(frame_type)));
        }
        serde_json::from_value(value).map_err(|e| {
            fail(FrameProblem::Invalid {
                frame_type,
                reason: e.to_string(),
            })
        })
    }
}

/// Limits the client must respect, announced in `welcome`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Limits {
    pub max_frame_bytes: usize,
    pub max_message_bytes: usize,
    pub max_history_page: u32,
}

/// A frame from the server.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerFrame {
    /// First frame on every socket.
    Welcome {
        protocol: u32,
        user: UserId,
        /// This connection's id, for support and logs.
        connection: String,
        limits: Limits,
        /// Whether frames ready together may come packed in one message (`pack=1`).
        #[serde(default, skip_serializing_if = "is_false")]
        pack: bool,
    },
    /// The request `id` took effect: its event is in the log at `seq`.
    Ack {
        id: ClientMsgId,
        conversation: ConversationId,
        seq: u64,
        event: EventId,
    },
    Error {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<ClientMsgId>,
        code: ErrorCode,
        message: String,
        retryable: bool,
        /// (`rate_limited`) Milliseconds to wait before the request can succeed.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        retry_after_ms: Option<u64>,
    },
    /// An event of one of the user's conversations (including the user's own sends); with
    /// `system` (v2), how a membership change reads in the conversation.
    Event {
        event: RecordedEvent,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        system: Option<SystemEntry>,
    },
    History {
        id: ClientMsgId,
        conversation: ConversationId,
        messages: Vec<HistoryMessage>,
        /// Whether more messages exist beyond the last one returned: older ones when paging
        /// backwards, newer ones when paging forwards (`after`).
        has_more: bool,
    },
    Conversations {
        id: ClientMsgId,
        conversations: Vec<ConversationSummary>,
        /// Whether less recently active conversations exist beyond the last one returned.
        has_more: bool,
    },
    /// (v2) The answer to `members`.
    Members {
        id: ClientMsgId,
        conversation: ConversationId,
        kind: ConversationKind,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        title: Option<String>,
        /// Milliseconds since the Unix epoch of its creation.
        created_at: u64,
        member_count: u64,
        /// The requester's role in it.
        role: Role,
        /// Ordered by user id.
        members: Vec<Member>,
        /// Whether members with greater user ids exist beyond the last one returned.
        has_more: bool,
    },
    Pong {
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<ClientMsgId>,
    },
    /// (v2) Another member started or stopped typing.
    Typing(TypingNotice),
    /// (v2) The answer to a `presence` request.
    Presence {
        id: ClientMsgId,
        users: Vec<UserStatus>,
        /// Users asked for who share no conversation with the requester: not watched.
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        not_visible: Vec<UserId>,
    },
    /// (v2) A watched user came online or went offline.
    PresenceChanged(UserStatus),
    /// (v2) The end of a resume's events. Conversations not listed are live and complete:
    /// nothing was missed, and what follows arrives live.
    Resumed {
        id: ClientMsgId,
        /// Where the user's conversations stand now; send it with the next `resume`.
        cursor: ResumeCursor,
        conversations: Vec<ResumeStatus>,
        /// Read markers and unread counts of the conversations this resume sent events of
        /// (at most [`MAX_RESUME_UNREAD`], the most recently active), as the conversation
        /// store knows them.
        unread: Vec<UnreadCount>,
    },
}

/// A position in the log, handed out by the server in `resumed` and sent back in `resume`.
/// Opaque to clients: a string they store and return as it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct ResumeCursor(pub u64);

const CURSOR_PREFIX: &str = "c1-";

impl Serialize for ResumeCursor {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&format!("{CURSOR_PREFIX}{:x}", self.0))
    }
}

impl<'de> Deserialize<'de> for ResumeCursor {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.strip_prefix(CURSOR_PREFIX)
            .filter(|hex| !hex.is_empty() && hex.len() <= 16)
            .and_then(|hex| u64::from_str_radix(hex, 16).ok())
            .map(ResumeCursor)
            .ok_or_else(|| serde::de::Error::custom("not a cursor this server issued"))
    }
}

/// Most conversations a `resumed` frame reports unread counts for.
pub const MAX_RESUME_UNREAD: usize = 100;

/// A conversation's read marker and unread count, in `resumed`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnreadCount {
    pub conversation: ConversationId,
    /// The user's read marker: 0 when never set.
    pub read_seq: u64,
    /// Messages by others after the marker, counted among the first 1,000.
    pub unread: u32,
}

/// How one conversation stands at the end of a resume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResumeStatus {
    pub conversation: ConversationId,
    pub state: ResumeState,
    /// The sequence the client has now reached in this conversation: for `more`, where to
    /// resume it from; for `truncated`, the newest one delivered.
    pub seq: u64,
    /// For `truncated`: the oldest sequence the log still holds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first_seq: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ResumeState {
    /// Caught up and followed live, after events that were sent by this resume.
    Live,
    /// Not caught up: the resume's bounds were reached. Nothing arrives live for it until a
    /// later `resume` names it with `seq`.
    More,
    /// The point asked for is older than the log still holds; events from `first_seq` on
    /// were sent, older ones are gone from the log (page `history` for what the store kept).
    Truncated,
    /// Named in the request, but not one of the user's conversations (or none at all).
    NotMember,
}

/// One of the user's conversations in a `conversations` reply.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConversationSummary {
    pub conversation: ConversationId,
    pub kind: ConversationKind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub title: Option<String>,
    /// The user's role in it.
    pub role: Role,
    /// Sequence of its newest event.
    pub last_seq: u64,
    /// Milliseconds since the Unix epoch of its newest event.
    pub last_activity_at: u64,
    /// (v2) Its newest message, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_message: Option<MessagePreview>,
    /// (v2) The user's read marker (0: never marked).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub read_seq: Option<u64>,
    /// (v2) Messages by others after the marker, counted among the first 1,000.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unread: Option<u32>,
}

/// (v2) What a conversation list shows of a message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MessagePreview {
    pub seq: u64,
    pub sender: UserId,
    /// The body's first [`PREVIEW_CHARS`] characters.
    pub body: String,
    pub at: u64,
    /// When the newest entry is a membership change: its system entry (the body is empty).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system: Option<SystemEntry>,
}

/// Characters (Unicode scalar values) of a body a [`MessagePreview`] keeps.
pub const PREVIEW_CHARS: usize = 140;

impl From<HistoryMessage> for MessagePreview {
    fn from(message: HistoryMessage) -> Self {
        let body = match message.body.char_indices().nth(PREVIEW_CHARS) {
            Some((end, _)) => message.body[..end].to_owned(),
            None => message.body,
        };
        MessagePreview {
            seq: message.seq,
            sender: message.sender,
            body,
            at: message.at,
            system: message.system,
        }
    }
}

impl ServerFrame {
    pub fn error(id: Option<ClientMsgId>, code: ErrorCode, message: impl Into<String>) -> Self {
        ServerFrame::Error {
            id,
            code,
            message: message.into(),
            retryable: code.retryable(),
            retry_after_ms: None,
        }
    }

    /// `rate_limited`: the request `id` was refused, and may be sent again after
    /// `retry_after_ms`.
    pub fn rate_limited(id: Option<ClientMsgId>, retry_after_ms: u64) -> Self {
        ServerFrame::Error {
            id,
            code: ErrorCode::RateLimited,
            message: rate_limited_message(retry_after_ms),
            retryable: true,
            retry_after_ms: Some(retry_after_ms),
        }
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string(self).expect("a server frame always serializes")
    }
}

/// One message in a `history` page.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HistoryMessage {
    pub seq: u64,
    /// The message's id (its event's id).
    pub id: EventId,
    pub sender: UserId,
    /// Absent on system entries.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_id: Option<ClientMsgId>,
    /// The latest body; empty on system entries and once deleted.
    pub body: String,
    /// Milliseconds since the Unix epoch.
    pub at: u64,
    /// (v2) A membership change, not a message: `sender` is who made it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system: Option<SystemEntry>,
    /// (v2) Whether the body was edited since it was posted.
    #[serde(default, skip_serializing_if = "is_false")]
    pub edited: bool,
    /// (v2) Whether the message was deleted: a tombstone, its body gone.
    #[serde(default, skip_serializing_if = "is_false")]
    pub deleted: bool,
    /// (v2) The sequence of the message this one replies to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reply_to: Option<u64>,
    /// (v2) Each emoji on the message with how many users reacted with it, ordered by emoji.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub reactions: Vec<ReactionCount>,
}

/// (v2) A membership change as a conversation shows it, derived from its event alone, so
/// every client renders it alike: `text` is the canonical English rendering; the other
/// fields let a client render it its own way.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SystemEntry {
    /// The event's type, e.g. `member.added`.
    pub event: String,
    /// The users it is about (added, removed, who left, whose role or mute changed).
    pub users: Vec<UserId>,
    pub role: Option<Role>,
    pub title: Option<String>,
    /// Milliseconds since the Unix epoch.
    pub until: Option<u64>,
    pub text: String,
}

/// Users a [`SystemEntry`]'s text names before it says "and N others".
const NAMED_USERS: usize = 3;

impl SystemEntry {
    /// The entry of a membership event; `None` for messages, creations and read markers.
    pub fn of(recorded: &RecordedEvent) -> Option<SystemEntry> {
        let envelope = &recorded.envelope;
        let actor = envelope.actor.as_str();
        let entry = |users: Vec<UserId>, text: String| SystemEntry {
            event: envelope.event.type_name().to_owned(),
            users,
            role: None,
            title: None,
            until: None,
            text,
        };
        Some(match &envelope.event {
            Event::ConversationCreated(_)
            | Event::MessagePosted(_)
            | Event::ConversationRead(_)
            | Event::MessageEdited(_)
            | Event::MessageDeleted(_)
            | Event::ReactionAdded(_)
            | Event::ReactionRemoved(_) => {
                return None;
            }
            Event::MembersAdded(added) => {
                let users: Vec<UserId> = added.members.iter().map(|m| m.user.clone()).collect();
                let text = format!("{actor} added {}", name_list(&users));
                entry(users, text)
            }
            Event::MembersRemoved(removed) => {
                let text = format!("{actor} removed {}", name_list(&removed.users));
                entry(removed.users.clone(), text)
            }
            Event::MemberLeft(_) => entry(vec![envelope.actor.clone()], format!("{actor} left")),
            Event::MemberRoleChanged(changed) => {
                let role = match changed.role {
                    Role::Owner => "an owner",
                    Role::Admin => "an admin",
                    Role::Member => "a member",
                };
                SystemEntry {
                    role: Some(changed.role),
                    ..entry(
                        vec![changed.user.clone()],
                        format!("{actor} made {} {role}", changed.user),
                    )
                }
            }
            Event::ConversationRenamed(renamed) => SystemEntry {
                title: renamed.title.clone(),
                ..entry(
                    Vec::new(),
                    match &renamed.title {
                        Some(title) => {
                            format!("{actor} renamed the group to \u{201c}{title}\u{201d}")
                        }
                        None => format!("{actor} removed the group's name"),
                    },
                )
            },
            Event::MemberMuted(muted) => SystemEntry {
                until: Some(muted.until),
                ..entry(
                    vec![muted.user.clone()],
                    format!(
                        "{actor} muted {} until {}",
                        muted.user,
                        rfc3339(muted.until)
                    ),
                )
            },
            Event::MemberUnmuted(unmuted) => entry(
                vec![unmuted.user.clone()],
                format!("{actor} unmuted {}", unmuted.user),
            ),
        })
    }
}

/// "bob", "bob and carol", "bob, carol and dave", "bob, carol and 998 others".
fn name_list(users: &[UserId]) -> String {
    let names: Vec<&str> = users.iter().map(UserId::as_str).collect();
    match names.as_slice() {
        [] => String::new(),
        [one] => (*one).to_owned(),
        all if all.len() <= NAMED_USERS => {
            let (last, rest) = all.split_last().expect("not empty");
            format!("{} and {last}", rest.join(", "))
        }
        all => format!("{} and {} others", all[..2].join(", "), all.len() - 2),
    }
}

/// Milliseconds since the Unix epoch as an RFC 3339 UTC time, e.g.
/// `2026-11-30T17:09:37.250Z` (this crate takes no date library for one format).
pub fn rfc3339(millis: u64) -> String {
    let secs = millis / 1000;
    let days = secs / 86_400;
    let rem = secs % 86_400;
    // Howard Hinnant's civil_from_days, for days since 1970-01-01 (never negative here).
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        millis % 1000
    )
}

fn is_false(value: &bool) -> bool {
    !*value
}

/// Most users a [`ReactionCount`] names; `count` counts them all.
pub const MAX_REACTION_USERS: usize = 20;

/// (v2) One emoji's reactions on a message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReactionCount {
    pub emoji: String,
    pub count: u32,
    /// Some of the users who reacted with it, ordered by user id, at most
    /// [`MAX_REACTION_USERS`].
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub users: Vec<UserId>,
}

/// The JSON body of an HTTP error (for example a refused upgrade).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HttpError {
    pub code: ErrorCode,
    pub message: String,
    pub retryable: bool,
    /// (`rate_limited`) Milliseconds to wait before trying again; the `Retry-After` header
    /// says the same in whole seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_after_ms: Option<u64>,
}

impl HttpError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        HttpError {
            code,
            message: message.into(),
            retryable: code.retryable(),
            retry_after_ms: None,
        }
    }

    /// `rate_limited`, to be tried again after `retry_after_ms`.
    pub fn rate_limited(retry_after_ms: u64) -> Self {
        HttpError {
            retry_after_ms: Some(retry_after_ms),
            ..HttpError::new(ErrorCode::RateLimited, rate_limited_message(retry_after_ms))
        }
    }
}

fn rate_limited_message(retry_after_ms: u64) -> String {
    format!("too many requests; retry after {retry_after_ms} ms")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pack_is_asked_with_one_or_zero_and_only_on_version_2() {
        assert_eq!(packing(None, 2), Ok(false));
        assert_eq!(packing(Some("0"), 1), Ok(false));
        assert_eq!(packing(Some("1"), 2), Ok(true));
        assert_eq!(
            packing(Some("1"), 1),
            Err("pack=1 needs protocol=2".to_owned())
        );
        for wrong in ["", "true", "2", "01"] {
            let refused = packing(Some(wrong), 2).unwrap_err();
            assert!(refused.contains("use 0 or 1"), "{wrong:?}: {refused}");
        }
    }

    #[test]
    fn packed_frames_unpack_to_the_same_frames_in_order() {
        let frames = [
            ServerFrame::Pong { id: None }.to_json(),
            r#"{"type":"event","body":"[a, b], {\"c\"}","list":[1,[2]]}"#.to_owned(),
            ServerFrame::Pong { id: None }.to_json(),
        ];
        let packed = pack_frames(&frames);
        assert_eq!(
            serde_json::from_str::<Vec<Value>>(&packed).unwrap().len(),
            3,
            "{packed}"
        );
        assert_eq!(unpack_frames(&packed).unwrap(), frames.to_vec());
        assert_eq!(unpack_frames(&frames[1]).unwrap(), vec![frames[1].as_str()]);
        assert!(unpack_frames("[{\"type\":").is_err());
    }

    #[test]
    fn parses_a_send() {
        let conversation = ConversationId::from_uuid(uuid::Uuid::nil());
        let frame = ClientFrame::parse(&format!(
            r#"{{"type":"send","id":"m1","conversation":"{conversation}","body":"hi"}}"#
        ))
        .unwrap();
        assert_eq!(
            frame,
            ClientFrame::Send {
                id: ClientMsgId::parse("m1").unwrap(),
                conversation,
                body: "hi".into(),
                reply_to: None,
            }
        );
    }

    #[test]
    fn tells_bad_frames_apart() {
        for malformed in ["{not json", "[1,2]", r#"{"type":7}"#] {
            assert!(matches!(
                ClientFrame::parse(malformed),
                Err(FrameError {
                    problem: FrameProblem::Malformed(_),
                    id: None
                })
            ));
        }
        let unknown = ClientFrame::parse(r#"{"type":"teleport"}"#).unwrap_err();
        assert_eq!(unknown.code(), ErrorCode::UnknownFrameType);
        let named = ClientFrame::parse(r#"{"type":"teleport","id":"t1"}"#).unwrap_err();
        assert_eq!(named.request_id().map(|id| id.as_str()), Some("t1"));
        let untyped = ClientFrame::parse(r#"{"id":"t2"}"#).unwrap_err();
        assert_eq!(untyped.code(), ErrorCode::BadFrame);
        assert_eq!(untyped.request_id().map(|id| id.as_str()), Some("t2"));
        let invalid = ClientFrame::parse(r#"{"type":"send","id":"m2","body":"x"}"#).unwrap_err();
        assert_eq!(invalid.code(), ErrorCode::BadFrame);
        assert_eq!(invalid.request_id().map(|id| id.as_str()), Some("m2"));
        let extra = ClientFrame::parse(r#"{"type":"ping","surprise":true}"#).unwrap_err();
        assert_eq!(extra.code(), ErrorCode::BadFrame);
    }

    #[test]
    fn every_declared_type_parses() {
        for frame_type in CLIENT_FRAME_TYPES {
            let err = ClientFrame::parse(&format!(r#"{{"type":"{frame_type}"}}"#)).err();
            assert!(
                !matches!(
                    err,
                    Some(FrameError {
                        problem: FrameProblem::UnknownType(_),
                        ..
                    })
                ),
                "{frame_type} is declared but not parsed"
            );
        }
    }

    #[test]
    fn version_2_frames_say_so() {
        let conversation = ConversationId::from_uuid(uuid::Uuid::nil());
        let typing = ClientFrame::parse(&format!(
            r#"{{"type":"typing","conversation":"{conversation}","state":"started"}}"#
        ))
        .unwrap();
        assert_eq!((typing.since_protocol(), typing.id()), (2, None));
        let presence =
            ClientFrame::parse(r#"{"type":"presence","id":"p1","users":["bob"]}"#).unwrap();
        assert_eq!(presence.since_protocol(), 2);
        assert_eq!(presence.id().map(|id| id.as_str()), Some("p1"));
        let ping = ClientFrame::parse(r#"{"type":"ping"}"#).unwrap();
        assert_eq!(ping.since_protocol(), 1);
        for frame_type in CLIENT_FRAME_TYPES {
            let wrong = format!(r#"{{"type":"{frame_type}","id":"x","surprise":1}}"#);
            let Err(FrameError {
                problem:
                    FrameProblem::Invalid {
                        frame_type: named, ..
                    },
                ..
            }) = ClientFrame::parse(&wrong)
            else {
                panic!("{wrong} parses");
            };
            assert_eq!(named, frame_type);
        }
    }

    #[test]
    fn membership_frames_are_version_2_requests() {
        let conversation = ConversationId::from_uuid(uuid::Uuid::nil());
        for frame in [
            format!(
                r#"{{"type":"add_members","id":"a","conversation":"{conversation}","users":["bob"]}}"#
            ),
            format!(
                r#"{{"type":"remove_members","id":"a","conversation":"{conversation}","users":["bob"]}}"#
            ),
            format!(r#"{{"type":"leave","id":"a","conversation":"{conversation}"}}"#),
            format!(
                r#"{{"type":"set_role","id":"a","conversation":"{conversation}","user":"bob","role":"admin"}}"#
            ),
            format!(r#"{{"type":"rename","id":"a","conversation":"{conversation}","title":null}}"#),
            format!(
                r#"{{"type":"mute","id":"a","conversation":"{conversation}","user":"bob","seconds":60}}"#
            ),
            format!(r#"{{"type":"unmute","id":"a","conversation":"{conversation}","user":"bob"}}"#),
        ] {
            let parsed = ClientFrame::parse(&frame).unwrap();
            assert_eq!(parsed.since_protocol(), 2, "{frame}");
            assert_eq!(parsed.id().map(|id| id.as_str()), Some("a"), "{frame}");
        }
        let bad_role = ClientFrame::parse(&format!(
            r#"{{"type":"set_role","id":"a","conversation":"{conversation}","user":"bob","role":"king"}}"#
        ))
        .unwrap_err();
        assert_eq!(bad_role.code(), ErrorCode::BadFrame);
    }

    #[test]
    fn typing_and_presence_frames_are_flat() {
        let notice = ServerFrame::Typing(TypingNotice {
            conversation: ConversationId::from_uuid(uuid::Uuid::nil()),
            user: UserId::parse("bob").unwrap(),
            state: TypingState::Started,
            expires_in_ms: 6000,
        });
        assert_eq!(
            notice.to_json(),
            r#"{"type":"typing","conversation":"00000000-0000-0000-0000-000000000000","user":"bob","state":"started","expires_in_ms":6000}"#
        );
        let changed = ServerFrame::PresenceChanged(UserStatus {
            user: UserId::parse("bob").unwrap(),
            online: false,
            last_seen: Some(7),
        });
        assert_eq!(
            changed.to_json(),
            r#"{"type":"presence_changed","user":"bob","online":false,"last_seen":7}"#
        );
    }

    #[test]
    fn a_client_gets_the_version_it_asks_for_or_version_1() {
        assert_eq!(protocol_version(None), Ok(1));
        assert_eq!(protocol_version(Some("1")), Ok(1));
        assert_eq!(protocol_version(Some("2")), Ok(2));
        for wrong in ["0", "3", "two", "", "-1", "2.0"] {
            let refused = protocol_version(Some(wrong)).unwrap_err();
            assert!(refused.contains("not served"), "{wrong}: {refused}");
        }
    }

    #[test]
    fn a_cursor_is_an_opaque_string_that_round_trips() {
        let json = serde_json::to_string(&ResumeCursor(0x1f4a)).unwrap();
        assert_eq!(json, r#""c1-1f4a""#);
        assert_eq!(
            serde_json::from_str::<ResumeCursor>(&json).unwrap(),
            ResumeCursor(0x1f4a)
        );
        for wrong in [
            r#""1f4a""#,
            r#""c1-""#,
            r#""c1-xyz""#,
            r#""c1-11111111111111111""#,
            "7",
        ] {
            assert!(
                serde_json::from_str::<ResumeCursor>(wrong).is_err(),
                "{wrong}"
            );
        }
        let conversation = ConversationId::from_uuid(uuid::Uuid::from_u128(7));
        let frame = ClientFrame::parse(&format!(
            r#"{{"type":"resume","id":"r","cursor":"c1-a","conversations":{{"{conversation}":4}}}}"#
        ))
        .unwrap();
        assert_eq!(
            frame,
            ClientFrame::Resume {
                id: ClientMsgId::parse("r").unwrap(),
                cursor: Some(ResumeCursor(10)),
                conversations: BTreeMap::from([(conversation, 4)]),
            }
        );
        let frame = ClientFrame::parse(r#"{"type":"resume","id":"r","cursor":"c1-zz"}"#);
        let refused = frame.unwrap_err();
        assert_eq!(refused.code(), ErrorCode::BadFrame);
        assert_eq!(refused.request_id().map(|id| id.as_str()), Some("r"));
    }

    #[test]
    fn a_preview_keeps_the_first_140_characters_on_a_char_boundary() {
        let message = |body: &str| HistoryMessage {
            seq: 5,
            id: EventId::from_uuid(uuid::Uuid::nil()),
            sender: UserId::parse("bob").unwrap(),
            client_id: Some(ClientMsgId::parse("m").unwrap()),
            body: body.into(),
            at: 7,
            system: None,
            edited: false,
            deleted: false,
            reply_to: None,
            reactions: Vec::new(),
        };
        let long = "é".repeat(200);
        let preview = MessagePreview::from(message(&long));
        assert_eq!(preview.body, "é".repeat(140));
        assert_eq!(
            (preview.seq, preview.at, preview.sender.as_str()),
            (5, 7, "bob")
        );
        let exact = "x".repeat(140);
        assert_eq!(MessagePreview::from(message(&exact)).body, exact);
        assert_eq!(MessagePreview::from(message("hi")).body, "hi");
    }

    #[test]
    fn rfc3339_renders_utc_with_millis() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(951_782_400_000), "2000-02-29T00:00:00.000Z");
        assert_eq!(rfc3339(1_796_058_577_250), "2026-11-30T17:09:37.250Z");
    }

    #[test]
    fn system_entries_read_the_same_for_everyone() {
        use crate::event::{
            ConversationRenamed, EventEnvelope, MemberLeft, MemberMuted, MemberRoleChanged,
            MembersAdded, MembersRemoved,
        };
        use crate::ids::CommandId;
        let user = |name: &str| UserId::parse(name).unwrap();
        let recorded = |event| {
            EventEnvelope {
                id: EventId::from_uuid(uuid::Uuid::nil()),
                conversation: ConversationId::from_uuid(uuid::Uuid::nil()),
                prev: 1,
                command: CommandId::from_uuid(uuid::Uuid::nil()),
                actor: user("alice"),
                at: 5,
                event,
            }
            .recorded(2)
        };
        let added = |n: usize| {
            recorded(Event::MembersAdded(MembersAdded {
                members: (0..n)
                    .map(|i| Member {
                        user: user(&format!("u{i}")),
                        role: Role::Member,
                    })
                    .collect(),
            }))
        };
        let text = |event: &RecordedEvent| SystemEntry::of(event).unwrap().text;
        assert_eq!(text(&added(1)), "alice added u0");
        assert_eq!(text(&added(2)), "alice added u0 and u1");
        assert_eq!(text(&added(3)), "alice added u0, u1 and u2");
        assert_eq!(text(&added(1000)), "alice added u0, u1 and 998 others");
        assert_eq!(SystemEntry::of(&added(1000)).unwrap().users.len(), 1000);
        let removed = recorded(Event::MembersRemoved(MembersRemoved {
            users: vec![user("bob")],
        }));
        assert_eq!(text(&removed), "alice removed bob");
        let left = SystemEntry::of(&recorded(Event::MemberLeft(MemberLeft {}))).unwrap();
        assert_eq!(
            (left.text.as_str(), left.users[0].as_str()),
            ("alice left", "alice")
        );
        let promoted = SystemEntry::of(&recorded(Event::MemberRoleChanged(MemberRoleChanged {
            user: user("bob"),
            role: Role::Admin,
        })))
        .unwrap();
        assert_eq!(promoted.text, "alice made bob an admin");
        assert_eq!(promoted.role, Some(Role::Admin));
        let renamed = recorded(Event::ConversationRenamed(ConversationRenamed {
            title: Some("X".into()),
        }));
        assert_eq!(
            text(&renamed),
            "alice renamed the group to \u{201c}X\u{201d}"
        );
        let muted = SystemEntry::of(&recorded(Event::MemberMuted(MemberMuted {
            user: user("bob"),
            until: 1_796_058_577_250,
        })))
        .unwrap();
        assert_eq!(muted.text, "alice muted bob until 2026-11-30T17:09:37.250Z");
        assert_eq!(
            serde_json::to_value(&muted).unwrap(),
            serde_json::json!({"event":"member.muted","users":["bob"],"role":null,
                "title":null,"until":1_796_058_577_250u64,"text":muted.text})
        );
        // A system entry's history row has no client id and an empty body.
        let row = HistoryMessage {
            seq: 2,
            id: EventId::from_uuid(uuid::Uuid::nil()),
            sender: user("alice"),
            client_id: None,
            body: String::new(),
            at: 5,
            system: Some(muted),
            edited: false,
            deleted: false,
            reply_to: None,
            reactions: Vec::new(),
        };
        let json = serde_json::to_value(&row).unwrap();
        assert!(json.get("client_id").is_none());
        assert_eq!(json["system"]["event"], "member.muted");
        let posted = recorded(Event::ConversationRead(crate::event::ConversationRead {
            seq: 1,
        }));
        assert_eq!(SystemEntry::of(&posted), None);
    }

    #[test]
    fn message_frames_are_version_2_and_history_leaves_out_what_is_unset() {
        let conversation = ConversationId::from_uuid(uuid::Uuid::nil());
        for frame in [
            format!(
                r#"{{"type":"edit","id":"e","conversation":"{conversation}","message":3,"body":"b"}}"#
            ),
            format!(r#"{{"type":"delete","id":"e","conversation":"{conversation}","message":3}}"#),
            format!(
                r#"{{"type":"react","id":"e","conversation":"{conversation}","message":3,"emoji":"👍"}}"#
            ),
            format!(
                r#"{{"type":"unreact","id":"e","conversation":"{conversation}","message":3,"emoji":"👍"}}"#
            ),
        ] {
            let parsed = ClientFrame::parse(&frame).unwrap();
            assert_eq!(
                (parsed.since_protocol(), parsed.id().map(|id| id.as_str())),
                (2, Some("e"))
            );
        }
        let reply = ClientFrame::parse(&format!(
            r#"{{"type":"send","id":"s","conversation":"{conversation}","body":"b","reply_to":3}}"#
        ))
        .unwrap();
        assert!(matches!(
            reply,
            ClientFrame::Send {
                reply_to: Some(3),
                ..
            }
        ));
        let plain = HistoryMessage {
            seq: 5,
            id: EventId::from_uuid(uuid::Uuid::nil()),
            sender: UserId::parse("bob").unwrap(),
            client_id: Some(ClientMsgId::parse("m").unwrap()),
            body: "hi".into(),
            at: 7,
            system: None,
            edited: false,
            deleted: false,
            reply_to: None,
            reactions: Vec::new(),
        };
        let json = serde_json::to_value(&plain).unwrap();
        for absent in ["system", "edited", "deleted", "reply_to", "reactions"] {
            assert!(json.get(absent).is_none(), "{absent} in {json}");
        }
        assert_eq!(
            serde_json::from_value::<HistoryMessage>(json).unwrap(),
            plain
        );
    }

    #[test]
    fn error_frame_carries_retryable() {
        let json = ServerFrame::error(None, ErrorCode::Unavailable, "later").to_json();
        assert_eq!(
            json,
            r#"{"type":"error","code":"unavailable","message":"later","retryable":true}"#
        );
    }

    #[test]
    fn a_rate_limited_error_says_when_to_retry_and_others_leave_it_out() {
        let id = ClientMsgId::parse("m1").unwrap();
        let json = ServerFrame::rate_limited(Some(id), 250).to_json();
        assert_eq!(
            json,
            r#"{"type":"error","id":"m1","code":"rate_limited","message":"too many requests; retry after 250 ms","retryable":true,"retry_after_ms":250}"#
        );
        let parsed: ServerFrame = serde_json::from_str(&json).unwrap();
        assert!(matches!(
            parsed,
            ServerFrame::Error {
                retry_after_ms: Some(250),
                ..
            }
        ));
        let http = serde_json::to_value(HttpError::rate_limited(1500)).unwrap();
        assert_eq!(http["code"], "rate_limited");
        assert_eq!(http["retryable"], true);
        assert_eq!(http["retry_after_ms"], 1500);
        let other = serde_json::to_value(HttpError::new(ErrorCode::TokenMissing, "no")).unwrap();
        assert!(other.get("retry_after_ms").is_none(), "{other}");
    }
}
