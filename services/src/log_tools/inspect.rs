//! `parley log tail`, `parley log show` and `parley log stats`: reading the log as it is.

use std::collections::BTreeMap;
use std::io::Write;

use parley_events::protocol::{SystemEntry, rfc3339};
use parley_events::{ConversationId, ConversationKind, Event, EventId, RecordedEvent, UserId};
use serde::{Deserialize, Serialize};

use super::{
    LogToolsError, Next, Output, Start, jetstream, open_log, scan, shards_of, state, subjects_of,
};
use crate::config::Config;
use crate::progress::Progress;

#[derive(Debug, clap::Args)]
pub struct TailArgs {
    /// Start at this sequence instead of the log's end.
    #[arg(long)]
    pub from_seq: Option<u64>,
    /// Only this conversation's events (repeatable).
    #[arg(long = "conversation", value_name = "ID")]
    pub conversations: Vec<ConversationId>,
    /// Only events by this user or naming them as a member (added, removed, role, mute).
    #[arg(long, value_parser = user_id)]
    pub user: Option<UserId>,
    /// Only events of this type, e.g. message.posted (repeatable).
    #[arg(long = "type", value_name = "TYPE", value_parser = event_type)]
    pub types: Vec<String>,
    /// Stop after this many events.
    #[arg(long)]
    pub limit: Option<u64>,
    #[command(flatten)]
    pub output: Output,
}

#[derive(Debug, clap::Args)]
pub struct ShowArgs {
    /// A log sequence (a number) or an event id (a UUID).
    pub event: String,
    /// By id: how far, in seconds, from the time in the id the scan looks.
    #[arg(long, default_value_t = 600)]
    pub within: u64,
    #[command(flatten)]
    pub output: Output,
}

#[derive(Debug, clap::Args)]
pub struct StatsArgs {
    #[command(flatten)]
    pub output: Output,
}

fn user_id(value: &str) -> Result<UserId, String> {
    UserId::parse(value).map_err(|e| e.to_string())
}

/// Every event type name this build knows, in the order of docs/events.md.
const TYPES: [&str; 14] = [
    parley_events::event::CONVERSATION_CREATED,
    parley_events::event::MESSAGE_POSTED,
    parley_events::event::CONVERSATION_READ,
    parley_events::event::MEMBER_ADDED,
    parley_events::event::MEMBER_REMOVED,
    parley_events::event::MEMBER_LEFT,
    parley_events::event::MEMBER_ROLE_CHANGED,
    parley_events::event::CONVERSATION_RENAMED,
    parley_events::event::MEMBER_MUTED,
    parley_events::event::MEMBER_UNMUTED,
    parley_events::event::MESSAGE_EDITED,
    parley_events::event::MESSAGE_DELETED,
    parley_events::event::REACTION_ADDED,
    parley_events::event::REACTION_REMOVED,
];

fn event_type(value: &str) -> Result<String, String> {
    TYPES
        .contains(&value)
        .then(|| value.to_owned())
        .ok_or_else(|| format!("unknown event type; one of {}", TYPES.join(", ")))
}

/// Whether `event` concerns `user`: they did it, or it names them as a member.
fn concerns(event: &RecordedEvent, user: &UserId) -> bool {
    let envelope = &event.envelope;
    envelope.actor == *user
        || envelope.event.joining().iter().any(|m| m.user == *user)
        || SystemEntry::of(event).is_some_and(|entry| entry.users.contains(user))
}

/// Up to `chars` characters of `text`, with an ellipsis when cut.
fn clip(text: &str, chars: usize) -> String {
    match text.char_indices().nth(chars) {
        Some((end, _)) => format!("{}…", &text[..end]),
        None => text.to_owned(),
    }
}

/// What the event says, in a few words: a membership event's system entry text, else a
/// line of its own.
fn summary(event: &RecordedEvent) -> String {
    if let Some(entry) = SystemEntry::of(event) {
        return entry.text;
    }
    let names = |members: &[parley_events::Member]| {
        members
            .iter()
            .map(|m| m.user.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    };
    match &event.envelope.event {
        Event::ConversationCreated(created) => match (created.kind, &created.title) {
            (ConversationKind::Group, Some(title)) => {
                format!("group {title:?}: {}", names(&created.members))
            }
            (ConversationKind::Group, None) => format!("group: {}", names(&created.members)),
            (ConversationKind::Direct, _) => format!("direct: {}", names(&created.members)),
        },
        Event::MessagePosted(posted) => match posted.reply_to {
            Some(to) => format!("(reply to {to}) {:?}", clip(&posted.body, 60)),
            None => format!("{:?}", clip(&posted.body, 60)),
        },
        Event::MessageEdited(edited) => {
            format!("edited {}: {:?}", edited.message, clip(&edited.body, 60))
        }
        Event::MessageDeleted(deleted) => format!("deleted {}", deleted.message),
        Event::ReactionAdded(reaction) => format!("+{} on {}", reaction.emoji, reaction.message),
        Event::ReactionRemoved(reaction) => format!("-{} on {}", reaction.emoji, reaction.message),
        Event::ConversationRead(read) => format!("read up to {}", read.seq),
        _ => String::new(),
    }
}

/// One line of `tail`'s text form.
pub fn line(event: &RecordedEvent) -> String {
    let envelope = &event.envelope;
    format!(
        "{:>8}  {}  {:<20}  {}  {:<12}  {}",
        event.seq,
        rfc3339(envelope.at),
        envelope.event.type_name(),
        envelope.conversation,
        envelope.actor.as_str(),
        summary(event)
    )
}

fn print(text: &str) -> Result<(), LogToolsError> {
    let mut out = std::io::stdout().lock();
    writeln!(out, "{text}")
        .and_then(|()| out.flush())
        .map_err(|e| LogToolsError::Runtime(format!("writing: {e}")))
}

/// `parley log tail`.
pub async fn tail(config: &Config, args: TailArgs) -> Result<(), LogToolsError> {
    let js = jetstream(config).await?;
    let log = open_log(&js).await?;
    let start = args.from_seq.map_or(Start::New, Start::Seq);
    let mut shown = 0u64;
    if args.limit == Some(0) {
        return Ok(());
    }
    let subjects = subjects_of(shards_of(&log)?, &args.conversations);
    scan(&log, start, None, subjects, |stored| {
        let event = stored.event()?;
        let envelope = &event.envelope;
        let wanted = (args.conversations.is_empty()
            || args.conversations.contains(&envelope.conversation))
            && args.user.as_ref().is_none_or(|user| concerns(&event, user))
            && (args.types.is_empty()
                || args.types.iter().any(|t| t == envelope.event.type_name()));
        if !wanted {
            return Ok(Next::More);
        }
        if args.output.json {
            print(&String::from_utf8_lossy(&event.to_bytes()))?;
        } else {
            print(&line(&event))?;
        }
        shown += 1;
        Ok(if args.limit.is_some_and(|limit| shown >= limit) {
            Next::Stop
        } else {
            Next::More
        })
    })
    .await
}

/// `parley log show`.
pub async fn show(config: &Config, args: ShowArgs) -> Result<(), LogToolsError> {
    let js = jetstream(config).await?;
    let mut log = open_log(&js).await?;
    let (event, stored_at, subject) = if let Ok(seq) = args.event.parse::<u64>() {
        let message = match tokio::time::timeout(super::NATS_TIMEOUT, log.direct_get(seq)).await {
            Ok(Ok(message)) => message,
            Ok(Err(e))
                if e.kind() == async_nats::jetstream::stream::DirectGetErrorKind::NotFound =>
            {
                return Err(LogToolsError::NotFound(format!(
                    "no event at sequence {seq}"
                )));
            }
            Ok(Err(e)) => return Err(super::runtime("reading the log")(&e)),
            Err(_) => return Err(LogToolsError::Runtime("NATS did not answer".into())),
        };
        let stored_at = u64::try_from(message.time.unix_timestamp_nanos() / 1_000_000).unwrap_or(0);
        (
            super::decode(seq, &message.payload)?,
            stored_at,
            message.subject.to_string(),
        )
    } else {
        let id: EventId = args.event.parse().map_err(|_| {
            LogToolsError::Input(format!(
                "{:?} is neither a sequence nor an event id",
                args.event
            ))
        })?;
        let at = id.unix_millis();
        let within = args.within.saturating_mul(1000);
        let until = state(&mut log).await?.last_sequence;
        let mut found = None;
        scan(
            &log,
            Start::Time(at.saturating_sub(within)),
            Some(until),
            Vec::new(),
            |stored| {
                let event = stored.event()?;
                if event.envelope.id == id {
                    found = Some((event, stored.stored_at, stored.subject));
                    return Ok(Next::Stop);
                }
                Ok(if event.envelope.at > at.saturating_add(within) {
                    Next::Stop
                } else {
                    Next::More
                })
            },
        )
        .await?;
        found.ok_or_else(|| {
            LogToolsError::NotFound(format!(
                "no event {id} among those within {} s of its time ({}); a larger --within \
                 reads more of the log",
                args.within,
                rfc3339(at)
            ))
        })?
    };
    if args.output.json {
        print(&String::from_utf8_lossy(&event.to_bytes()))
    } else {
        print(&format!(
            "seq {} on {subject}, stored {}\n{}",
            event.seq,
            rfc3339(stored_at),
            serde_json::to_string_pretty(&event).expect("an event serializes")
        ))
    }
}

/// What `stats` reports.
#[derive(Debug, Serialize, Deserialize, PartialEq)]
pub struct Stats {
    pub events: u64,
    pub first_seq: u64,
    pub last_seq: u64,
    /// When the first and last events were stored, RFC 3339; absent for an empty log.
    pub first_stored: Option<String>,
    pub last_stored: Option<String>,
    /// The stream's bytes on disk (payloads, headers and subjects).
    pub bytes: u64,
    /// Shard subjects holding at least one event, and the log's shard count.
    pub shards_used: u64,
    pub shards: u32,
    /// Counts by type and stored version, ordered by type then version.
    pub types: Vec<TypeCount>,
}

#[derive(Debug, Serialize, Deserialize, PartialEq)]
pub struct TypeCount {
    #[serde(rename = "type")]
    pub type_name: String,
    pub v: u32,
    pub events: u64,
}

/// `parley log stats`.
pub async fn stats(config: &Config, args: StatsArgs) -> Result<(), LogToolsError> {
    let js = jetstream(config).await?;
    let mut log = open_log(&js).await?;
    let state = state(&mut log).await?;
    let millis = |time: async_nats::datetime::DateTime| {
        u64::try_from(time.unix_timestamp_nanos() / 1_000_000).unwrap_or(0)
    };
    /// Only what the counts need: the rest of the event is not decoded.
    #[derive(Deserialize)]
    struct Kind {
        #[serde(rename = "type")]
        type_name: String,
        v: u32,
    }
    let mut counts: BTreeMap<(String, u32), u64> = BTreeMap::new();
    let progress = Progress::new("stats", Some(state.messages));
    let mut read = 0u64;
    scan(
        &log,
        Start::Seq(state.first_sequence),
        Some(state.last_sequence),
        Vec::new(),
        |stored| {
            let kind: Kind = serde_json::from_slice(&stored.payload).map_err(|e| {
                LogToolsError::Runtime(format!("the log's event {}: {e}", stored.seq))
            })?;
            *counts.entry((kind.type_name, kind.v)).or_default() += 1;
            read += 1;
            progress.advance(1);
            Ok(Next::More)
        },
    )
    .await?;
    progress.finish(read);
    let empty = state.messages == 0;
    let stats = Stats {
        events: state.messages,
        first_seq: state.first_sequence,
        last_seq: state.last_sequence,
        first_stored: (!empty).then(|| rfc3339(millis(state.first_timestamp))),
        last_stored: (!empty).then(|| rfc3339(millis(state.last_timestamp))),
        bytes: state.bytes,
        shards_used: state.subjects_count,
        shards: shards_of(&log)?.count(),
        types: counts
            .into_iter()
            .map(|((type_name, v), events)| TypeCount {
                type_name,
                v,
                events,
            })
            .collect(),
    };
    if args.output.json {
        return print(&serde_json::to_string(&stats).expect("stats serialize"));
    }
    let mut text = format!(
        "events       {}\nsequences    {} to {}\nstored       {} to {}\nbytes        {}\nshards used  {} of {}\n",
        stats.events,
        stats.first_seq,
        stats.last_seq,
        stats.first_stored.as_deref().unwrap_or("-"),
        stats.last_stored.as_deref().unwrap_or("-"),
        stats.bytes,
        stats.shards_used,
        stats.shards
    );
    for count in &stats.types {
        text.push_str(&format!(
            "  {:<22} v{}  {:>10}\n",
            count.type_name, count.v, count.events
        ));
    }
    print(text.trim_end())
}
