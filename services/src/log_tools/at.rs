//! `parley conversation at`: a conversation as it was at a log sequence or a time, from the
//! log alone. Its events up to that point are read from its shard and applied to a fresh
//! SQLite store in a temporary directory, then read back through [`ConversationStore`]:
//! the projection's own code folds them, so the view cannot drift from what the store
//! shows. Mutes are not in it: the store does not keep them (they belong to the handlers'
//! write model).

use parley_events::protocol::{HistoryMessage, rfc3339};
use parley_events::{ConversationId, ConversationKind, Member, RecordedEvent};
use parley_projections::{ConversationStore, SqliteStore, StoreError};
use serde::{Deserialize, Serialize};

use super::{
    LogToolsError, Next, Output, Start, jetstream, open_log, scan, shards_of, state, subjects_of,
};
use crate::config::Config;

/// Events applied to the temporary store at once.
const APPLY_BATCH: usize = 1000;

#[derive(Debug, clap::Args)]
#[command(group(clap::ArgGroup::new("point").required(true)))]
pub struct AtArgs {
    /// The conversation's id.
    pub conversation: ConversationId,
    /// As it was right after this log sequence.
    #[arg(long, group = "point")]
    pub seq: Option<u64>,
    /// As it was at this time (RFC 3339, e.g. 2026-11-30T17:09:37Z): after its last event
    /// before the first one whose time (`at`) is later.
    #[arg(long, group = "point", value_parser = time_millis)]
    pub time: Option<u64>,
    /// How many of its last messages to show.
    #[arg(long, default_value_t = 20)]
    pub messages: u32,
    #[command(flatten)]
    pub output: Output,
}

fn time_millis(value: &str) -> Result<u64, String> {
    let time = async_nats::datetime::parse_rfc3339(value).map_err(|e| e.to_string())?;
    u64::try_from(time.unix_timestamp_nanos() / 1_000_000)
        .map_err(|_| "a time after 1970".to_owned())
}

/// A conversation at one point of the log.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConversationAt {
    pub conversation: ConversationId,
    /// The sequence of its last event at that point.
    pub seq: u64,
    /// That event's time, milliseconds since the epoch.
    pub at: u64,
    pub kind: ConversationKind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub title: Option<String>,
    pub created_at: u64,
    /// Ordered by user id.
    pub members: Vec<Member>,
    /// The last messages, oldest first, with edits, deletions and reactions applied, as
    /// history shows them.
    pub messages: Vec<HistoryMessage>,
}

/// Where the fold stops.
#[derive(Debug, Clone, Copy)]
pub enum Point {
    Seq(u64),
    /// Milliseconds since the epoch.
    Time(u64),
}

/// The conversation as it was at `point`, from the log; `None` when it had no event yet.
pub async fn conversation_at(
    log: &mut async_nats::jetstream::stream::Stream,
    conversation: ConversationId,
    point: Point,
    messages: u32,
) -> Result<Option<ConversationAt>, LogToolsError> {
    let head = state(log).await?.last_sequence;
    let until = match point {
        Point::Seq(seq) => seq.min(head),
        Point::Time(_) => head,
    };
    let mut events: Vec<RecordedEvent> = Vec::new();
    scan(
        log,
        Start::Seq(1),
        Some(until),
        subjects_of(shards_of(log)?, &[conversation]),
        |stored| {
            let event = stored.event()?;
            if event.envelope.conversation != conversation {
                return Ok(Next::More);
            }
            if let Point::Time(time) = point
                && event.envelope.at > time
            {
                return Ok(Next::Stop);
            }
            events.push(event);
            Ok(Next::More)
        },
    )
    .await?;
    let Some(last) = events.last() else {
        return Ok(None);
    };
    let (seq, at) = (last.seq, last.envelope.at);
    let failed = |e: StoreError| LogToolsError::Runtime(format!("folding the events: {e}"));
    let dir = tempfile::tempdir()
        .map_err(|e| LogToolsError::Runtime(format!("a temporary directory: {e}")))?;
    let store = SqliteStore::open(&dir.path().join("at.db")).map_err(failed)?;
    for batch in events.chunks(APPLY_BATCH) {
        store.apply(batch).await.map_err(failed)?;
    }
    let Some(details) = store.details(conversation).await.map_err(failed)? else {
        return Ok(None);
    };
    let members = store.members(conversation).await.map_err(failed)?;
    let mut history = store
        .history(conversation, None, messages)
        .await
        .map_err(failed)?
        .messages;
    history.reverse();
    Ok(Some(ConversationAt {
        conversation,
        seq,
        at,
        kind: details.view.kind,
        title: details.view.title,
        created_at: details.created_at,
        members,
        messages: history,
    }))
}

/// `parley conversation at`.
pub async fn at(config: &Config, args: AtArgs) -> Result<(), LogToolsError> {
    let point = match (args.seq, args.time) {
        (Some(seq), _) => Point::Seq(seq),
        (None, Some(time)) => Point::Time(time),
        (None, None) => unreachable!("clap requires --seq or --time"),
    };
    let js = jetstream(config).await?;
    let mut log = open_log(&js).await?;
    let view = conversation_at(&mut log, args.conversation, point, args.messages)
        .await?
        .ok_or_else(|| {
            LogToolsError::NotFound(format!(
                "conversation {} has no events at that point of the log",
                args.conversation
            ))
        })?;
    let text = if args.output.json {
        serde_json::to_string(&view).expect("a view serializes")
    } else {
        render(&view)
    };
    println!("{text}");
    Ok(())
}

fn render(view: &ConversationAt) -> String {
    let kind = match (&view.kind, &view.title) {
        (ConversationKind::Direct, _) => "direct".to_owned(),
        (ConversationKind::Group, Some(title)) => format!("group {title:?}"),
        (ConversationKind::Group, None) => "group, no title".to_owned(),
    };
    let members: Vec<String> = view
        .members
        .iter()
        .map(|m| format!("{} ({})", m.user.as_str(), m.role.as_str()))
        .collect();
    let mut text = format!(
        "{} ({kind}) as of seq {}, {}\ncreated {}\nmembers ({}): {}\n",
        view.conversation,
        view.seq,
        rfc3339(view.at),
        rfc3339(view.created_at),
        members.len(),
        members.join(", ")
    );
    text.push_str(&format!("last {} messages:\n", view.messages.len()));
    for message in &view.messages {
        let body = match &message.system {
            Some(entry) => format!("[{}]", entry.text),
            None if message.deleted => "[deleted]".to_owned(),
            None if message.edited => format!("{} (edited)", message.body),
            None => message.body.clone(),
        };
        text.push_str(&format!(
            "  {:>8}  {}  {}: {body}\n",
            message.seq,
            rfc3339(message.at),
            message.sender.as_str()
        ));
    }
    text.trim_end().to_owned()
}
