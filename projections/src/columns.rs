//! How both stores turn read-model values into column values and back, and the errors they
//! raise doing it: one definition, so the two stores cannot drift apart in what they accept.

use parley_events::event::{MessageEdited, MessagePosted};
use parley_events::protocol::{HistoryMessage, MAX_REACTION_USERS, ReactionCount, SystemEntry};
use parley_events::{
    ClientMsgId, ConversationKind, Event, EventEnvelope, EventId, Member, RecordedEvent, Role,
    UserId,
};

use crate::store::{EventsPage, MembersPage, StoreError, StoreErrorKind};

pub(crate) fn unavailable(e: impl std::fmt::Display) -> StoreError {
    StoreError::new(StoreErrorKind::Unavailable, e.to_string())
}

pub(crate) fn schema(e: impl std::fmt::Display) -> StoreError {
    StoreError::new(StoreErrorKind::Schema, e.to_string())
}

pub(crate) fn corrupt(e: impl std::fmt::Display) -> StoreError {
    StoreError::new(StoreErrorKind::Corrupt, e.to_string())
}

/// Log sequences are stored as signed 64-bit integers, the widest both SQL and CQL have;
/// JetStream sequences never come near the top of that range.
pub(crate) fn i64_of(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

pub(crate) fn u64_of(value: i64) -> u64 {
    u64::try_from(value).unwrap_or(0)
}

pub(crate) fn kind_str(kind: ConversationKind) -> &'static str {
    match kind {
        ConversationKind::Direct => "direct",
        ConversationKind::Group => "group",
    }
}

pub(crate) fn parse_kind(value: &str) -> Result<ConversationKind, StoreError> {
    match value {
        "direct" => Ok(ConversationKind::Direct),
        "group" => Ok(ConversationKind::Group),
        other => Err(corrupt(format!("unknown conversation kind {other:?}"))),
    }
}

pub(crate) fn parse_role(value: &str) -> Result<Role, StoreError> {
    Role::parse(value).ok_or_else(|| corrupt(format!("unknown role {value:?}")))
}

pub(crate) fn parse_user(value: String) -> Result<UserId, StoreError> {
    UserId::parse(value).map_err(corrupt)
}

pub(crate) fn parse_member(user: String, role: &str) -> Result<Member, StoreError> {
    Ok(Member {
        user: parse_user(user)?,
        role: parse_role(role)?,
    })
}

/// What a history row says about a message's changes, beyond the posted message itself.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Changes {
    pub edited: bool,
    pub deleted: bool,
    pub reply_to: Option<i64>,
}

/// A history row as both stores read it: sequence, event id, sender, client message id
/// (empty on a system entry), body (the latest), time, and the system entry as JSON (on
/// system entries only).
pub(crate) type HistoryRow = (i64, EventId, String, String, String, i64, Option<String>);

/// A history row and its changes as a history entry. A deleted message is a tombstone: no
/// body, no edited marker (reactions are not read for it).
pub(crate) fn history_message(
    (seq, id, sender, client_id, body, at, system): HistoryRow,
    changes: Changes,
) -> Result<HistoryMessage, StoreError> {
    Ok(HistoryMessage {
        seq: u64_of(seq),
        id,
        sender: parse_user(sender)?,
        client_id: match system {
            Some(_) => None,
            None => Some(ClientMsgId::parse(client_id).map_err(corrupt)?),
        },
        body: if changes.deleted { String::new() } else { body },
        at: u64_of(at),
        system: system
            .map(|json| serde_json::from_str::<SystemEntry>(&json).map_err(corrupt))
            .transpose()?,
        edited: changes.edited && !changes.deleted,
        deleted: changes.deleted,
        reply_to: changes.reply_to.map(u64_of),
        reactions: Vec::new(),
    })
}

/// The history row of a membership event, if it has one: its system entry as JSON.
pub(crate) fn system_json(recorded: &RecordedEvent) -> Option<String> {
    SystemEntry::of(recorded)
        .map(|entry| serde_json::to_string(&entry).expect("a system entry always serializes"))
}

/// A message's reactions from its (emoji, user) pairs in any order, each counted once:
/// per emoji (in byte order) the count and the first [`MAX_REACTION_USERS`] users.
pub(crate) fn reaction_counts(
    mut pairs: Vec<(String, String)>,
) -> Result<Vec<ReactionCount>, StoreError> {
    pairs.sort();
    pairs.dedup();
    let mut counts: Vec<ReactionCount> = Vec::new();
    for (emoji, user) in pairs {
        let user = parse_user(user)?;
        match counts.last_mut() {
            Some(last) if last.emoji == emoji => {
                last.count += 1;
                if last.users.len() < MAX_REACTION_USERS {
                    last.users.push(user);
                }
            }
            _ => counts.push(ReactionCount {
                emoji,
                count: 1,
                users: vec![user],
            }),
        }
    }
    Ok(counts)
}

/// The message whose body `event` carries (a post's own sequence `seq`, an edit's target),
/// and the body.
pub(crate) fn carried_body(event: &Event, seq: u64) -> Option<(u64, &str)> {
    match event {
        Event::MessagePosted(MessagePosted { body, .. }) => Some((seq, body)),
        Event::MessageEdited(MessageEdited { message, body }) => Some((*message, body)),
        _ => None,
    }
}

/// `envelope` with the body it carries replaced by `body` (nothing changes for an event
/// without one): how a deleted message's body leaves the stored events.
pub(crate) fn with_body(envelope: &EventEnvelope, body: &str) -> EventEnvelope {
    let mut envelope = envelope.clone();
    match &mut envelope.event {
        Event::MessagePosted(posted) => posted.body = body.to_owned(),
        Event::MessageEdited(edited) => edited.body = body.to_owned(),
        _ => {}
    }
    envelope
}

/// A page of stored events from rows of (sequence, envelope bytes), read one row beyond
/// `limit` to know whether more follow. An event this build cannot decode is corrupt here:
/// the projector stops at such an event before storing it.
pub(crate) fn events_page(rows: Vec<(i64, Vec<u8>)>, limit: u32) -> Result<EventsPage, StoreError> {
    let has_more = rows.len() > limit as usize;
    let events = rows
        .into_iter()
        .take(limit as usize)
        .map(|(seq, bytes)| {
            EventEnvelope::from_bytes(&bytes)
                .map(|envelope| envelope.recorded(u64_of(seq)))
                .map_err(corrupt)
        })
        .collect::<Result<_, _>>()?;
    Ok(EventsPage { events, has_more })
}

/// When the event whose stored bytes these are happened, without decoding all of it (a
/// large group's creation lists every member).
pub(crate) fn event_at(bytes: &[u8]) -> Result<u64, StoreError> {
    #[derive(serde::Deserialize)]
    struct At {
        at: u64,
    }
    serde_json::from_slice::<At>(bytes)
        .map(|e| e.at)
        .map_err(corrupt)
}

/// A page of members from (user, role) rows read one beyond `limit`.
pub(crate) fn members_page(
    rows: Vec<(String, String)>,
    limit: u32,
) -> Result<MembersPage, StoreError> {
    let has_more = rows.len() > limit as usize;
    let members = rows
        .into_iter()
        .take(limit as usize)
        .map(|(user, role)| parse_member(user, &role))
        .collect::<Result<_, _>>()?;
    Ok(MembersPage { members, has_more })
}
