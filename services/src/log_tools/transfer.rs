//! `parley log export` and `parley log import`: the log to JSON lines and back.
//!
//! An export line is a recorded event (`RecordedEvent::to_bytes`): the stored form with its
//! `seq`, at the current version of its type (old versions go through the upcaster), so
//! exporting the same events always gives the same bytes. An import appends each line's
//! stored form at exactly the line's `seq`: into an empty log whose next sequence is the
//! file's first (a log that does not exist yet is created starting there), each publish
//! carrying `Nats-Expected-Last-Sequence` (so nothing else can slip in between and shift
//! the sequences that `prev` and message references name) and `Nats-Msg-Id` = the event id
//! (so a re-sent publish is dropped). Whatever an interrupted import stored is a prefix of
//! the file; running it again checks that prefix and appends the rest.

use std::collections::{HashMap, HashSet};
use std::io::{BufRead, BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};

use async_nats::HeaderMap;
use async_nats::header::{NATS_EXPECTED_LAST_SEQUENCE, NATS_MESSAGE_ID};
use async_nats::jetstream::context::{GetStreamErrorKind, PublishError};
use async_nats::jetstream::publish::PublishAck;
use async_nats::jetstream::{self, ErrorCode, stream};
use futures::StreamExt;
use futures::stream::FuturesOrdered;
use parley_events::subjects::{LOG_STREAM, Shards};
use parley_events::{ConversationId, Event, EventId, RecordedEvent};

use super::{
    LogToolsError, Next, Start, in_time, open_log, output, scan, shards_of, state, subjects_of,
};
use crate::config::Config;
use crate::progress::Progress;
use crate::topology;

/// Publishes awaiting their acknowledgement at once during an import.
const IMPORT_IN_FLIGHT: usize = 256;

#[derive(Debug, clap::Args)]
pub struct ExportArgs {
    /// First sequence to export (default: the log's first).
    #[arg(long)]
    pub from_seq: Option<u64>,
    /// Last sequence to export (default: the log's last when the export starts).
    #[arg(long)]
    pub to_seq: Option<u64>,
    /// Export only this conversation's events (repeatable). Such a file has gaps in its
    /// sequences, so it reads well but does not import.
    #[arg(long = "conversation", value_name = "ID")]
    pub conversations: Vec<ConversationId>,
    /// Write to this file instead of standard output.
    #[arg(long, short)]
    pub output: Option<PathBuf>,
}

#[derive(Debug, clap::Args)]
pub struct ImportArgs {
    /// An export file: one recorded event a line, consecutive sequences.
    pub file: PathBuf,
}

/// `parley log export`.
pub async fn export(config: &Config, args: ExportArgs) -> Result<(), LogToolsError> {
    if let (Some(from), Some(to)) = (args.from_seq, args.to_seq)
        && from > to
    {
        return Err(LogToolsError::Input(format!(
            "--from-seq {from} is after --to-seq {to}"
        )));
    }
    let js = super::jetstream(config).await?;
    let mut log = open_log(&js).await?;
    let state = state(&mut log).await?;
    let from = args
        .from_seq
        .unwrap_or(state.first_sequence)
        .max(state.first_sequence);
    let until = args
        .to_seq
        .unwrap_or(state.last_sequence)
        .min(state.last_sequence);
    let mut out = BufWriter::with_capacity(1 << 20, output(args.output.as_ref())?);
    let total = args
        .conversations
        .is_empty()
        .then(|| (until + 1).saturating_sub(from));
    let progress = Progress::new("export", total);
    let wanted: HashSet<ConversationId> = args.conversations.iter().copied().collect();
    let mut written = 0u64;
    let write_failed = |e: std::io::Error| LogToolsError::Runtime(format!("writing: {e}"));
    scan(
        &log,
        Start::Seq(from),
        Some(until),
        subjects_of(shards_of(&log)?, &args.conversations),
        |stored| {
            let event = stored.event()?;
            progress.advance(1);
            if wanted.is_empty() || wanted.contains(&event.envelope.conversation) {
                out.write_all(&event.to_bytes()).map_err(write_failed)?;
                out.write_all(b"\n").map_err(write_failed)?;
                written += 1;
            }
            Ok(Next::More)
        },
    )
    .await?;
    out.flush().map_err(write_failed)?;
    progress.finish(written);
    Ok(())
}

/// What validating a file found.
struct Validated {
    first: u64,
    last: u64,
    /// The stored form of the events at the sequences asked for.
    kept: HashMap<u64, Vec<u8>>,
}

/// Each event of `path` with its line number, as read and decoded; a line that is not a
/// recorded event is an input error naming it.
fn for_each_line(
    path: &Path,
    mut each: impl FnMut(u64, RecordedEvent) -> Result<(), LogToolsError>,
) -> Result<(), LogToolsError> {
    let file = std::fs::File::open(path)
        .map_err(|e| LogToolsError::Input(format!("cannot open {}: {e}", path.display())))?;
    let mut reader = BufReader::with_capacity(1 << 20, file);
    let mut line = Vec::new();
    let mut number = 0u64;
    loop {
        line.clear();
        let read = reader
            .read_until(b'\n', &mut line)
            .map_err(|e| LogToolsError::Input(format!("reading {}: {e}", path.display())))?;
        if read == 0 {
            return Ok(());
        }
        number += 1;
        let bytes = line.strip_suffix(b"\n").unwrap_or(&line);
        let event = RecordedEvent::from_bytes(bytes)
            .map_err(|e| LogToolsError::Input(format!("line {number}: {e}")))?;
        each(number, event)?;
    }
}

/// Check the whole file before anything is written: every line a recorded event,
/// sequences consecutive, each conversation's `prev` naming its previous event in the file
/// (or one before the file), every message an event names a message of its conversation,
/// no event id twice. Keeps the stored form of the events at `keep`.
fn validate(path: &Path, keep: &[u64]) -> Result<Validated, LogToolsError> {
    let mut first = None;
    let mut last = 0u64;
    let mut newest: HashMap<ConversationId, u64> = HashMap::new();
    let mut messages: HashMap<u64, ConversationId> = HashMap::new();
    let mut ids: HashSet<EventId> = HashSet::new();
    let mut kept = HashMap::new();
    for_each_line(path, |line, event| {
        let bad = |why: String| Err(LogToolsError::Input(format!("line {line}: {why}")));
        let (seq, envelope) = (event.seq, &event.envelope);
        let first = *first.get_or_insert(seq);
        if seq == 0 {
            return bad("seq 0: log sequences start at 1".into());
        }
        if line > 1 && seq != last + 1 {
            return bad(format!(
                "seq {seq} does not follow {last}: an import needs consecutive sequences \
                 (a --conversation export has gaps)"
            ));
        }
        last = seq;
        let conversation = envelope.conversation;
        match newest.insert(conversation, seq) {
            Some(previous) if envelope.prev != previous => {
                return bad(format!(
                    "event {seq} has prev {}, but the previous event of conversation \
                     {conversation} is {previous}",
                    envelope.prev
                ));
            }
            None if envelope.prev >= first => {
                return bad(format!(
                    "event {seq} has prev {}, which is not an event of conversation \
                     {conversation}",
                    envelope.prev
                ));
            }
            _ => {}
        }
        let reply = match &envelope.event {
            Event::MessagePosted(posted) => posted.reply_to,
            _ => None,
        };
        for message in envelope.event.target_message().into_iter().chain(reply) {
            if message >= first && messages.get(&message) != Some(&conversation) {
                return bad(format!(
                    "event {seq} refers to message {message}, which is not a message of \
                     conversation {conversation}"
                ));
            }
        }
        if matches!(envelope.event, Event::MessagePosted(_)) {
            messages.insert(seq, conversation);
        }
        if !ids.insert(envelope.id) {
            return bad(format!(
                "event id {} is on an earlier line too",
                envelope.id
            ));
        }
        if keep.contains(&seq) {
            kept.insert(seq, envelope.to_bytes());
        }
        Ok(())
    })?;
    let first =
        first.ok_or_else(|| LogToolsError::Input(format!("{} holds no events", path.display())))?;
    Ok(Validated { first, last, kept })
}

/// `parley log import FILE`.
pub async fn import(config: &Config, args: ImportArgs) -> Result<(), LogToolsError> {
    let js = super::jetstream(config).await?;
    // What the log holds decides which events of the file to compare: nothing is written
    // before the file has been read through.
    let existing = match in_time_get_stream(&js).await? {
        Some(mut log) => Some((state(&mut log).await?, log)),
        None => None,
    };
    let compare: Vec<u64> = match &existing {
        Some((state, _)) if state.messages > 0 => vec![state.first_sequence, state.last_sequence],
        _ => Vec::new(),
    };
    let file = validate(&args.file, &compare)?;
    let appended_after = match &existing {
        None => file.first - 1,
        Some((state, _)) if state.messages == 0 => {
            let next = state.last_sequence + 1;
            if next != file.first {
                return Err(LogToolsError::Input(format!(
                    "the log is empty but its next sequence is {next}, and the file starts at \
                     {}: delete the stream so that the import creates it starting there",
                    file.first
                )));
            }
            state.last_sequence
        }
        Some((state, log)) => {
            resuming(log, state, &file).await?;
            state.last_sequence
        }
    };
    if existing.is_none() {
        let mut wanted = topology::log_stream_config(config);
        wanted.first_sequence = (file.first > 1).then_some(file.first);
        in_time("creating the log stream", js.create_stream(wanted)).await?;
    }
    // The same checks as every role's start: the log matches this configuration.
    in_time(
        "checking the log stream",
        topology::ensure(js.clone(), config),
    )
    .await?;
    let shards = Shards::new(config.log.shards).expect("validated by Config::validate");
    let total = file.last - appended_after;
    let progress = Progress::new("import", Some(total));
    let appended = append(&js, shards, &args.file, appended_after, &progress).await?;
    progress.finish(appended);
    println!(
        "imported {appended} events (sequences {} to {}); {} were already in the log",
        appended_after + 1,
        file.last,
        appended_after + 1 - file.first
    );
    Ok(())
}

/// The log stream, or `None` when it does not exist.
async fn in_time_get_stream(
    js: &jetstream::Context,
) -> Result<Option<stream::Stream>, LogToolsError> {
    in_time("looking for the log stream", async {
        match js.get_stream(LOG_STREAM).await {
            Ok(log) => Ok(Some(log)),
            Err(e)
                if matches!(e.kind(), GetStreamErrorKind::JetStream(ref js)
                    if js.error_code() == ErrorCode::STREAM_NOT_FOUND) =>
            {
                Ok(None)
            }
            Err(e) => Err(e),
        }
    })
    .await
}

/// A log that is not empty may only be a prefix of this same file (an interrupted import):
/// it starts where the file starts, ends within it, and its first and last events are the
/// file's, byte for byte.
async fn resuming(
    log: &stream::Stream,
    state: &stream::State,
    file: &Validated,
) -> Result<(), LogToolsError> {
    let refuse = || {
        LogToolsError::Input(format!(
            "the log is not empty (sequences {} to {}) and is not an interrupted import of \
             this file (sequences {} to {}): import needs an empty log",
            state.first_sequence, state.last_sequence, file.first, file.last
        ))
    };
    if state.first_sequence != file.first || state.last_sequence > file.last {
        return Err(refuse());
    }
    for seq in [state.first_sequence, state.last_sequence] {
        let stored = in_time("reading the log", log.direct_get(seq)).await?;
        if file.kept.get(&seq).map(Vec::as_slice) != Some(&stored.payload[..]) {
            return Err(refuse());
        }
    }
    Ok(())
}

/// Publish the file's events after sequence `after`, each at its own sequence; how many.
/// The file was validated; it is read again rather than held, so a log of any size imports
/// in bounded memory: a thread reads and encodes lines while this task publishes them.
async fn append(
    js: &jetstream::Context,
    shards: Shards,
    path: &Path,
    after: u64,
    progress: &Progress,
) -> Result<u64, LogToolsError> {
    let (lines, mut to_publish) = tokio::sync::mpsc::channel(IMPORT_IN_FLIGHT * 4);
    let path = path.to_owned();
    let reader = tokio::task::spawn_blocking(move || {
        for_each_line(&path, |_, event| {
            if event.seq <= after {
                return Ok(());
            }
            let mut headers = HeaderMap::new();
            headers.insert(NATS_MESSAGE_ID, event.envelope.id.to_string().as_str());
            headers.insert(
                NATS_EXPECTED_LAST_SEQUENCE,
                (event.seq - 1).to_string().as_str(),
            );
            let line = (
                event.seq,
                shards.subject(event.envelope.conversation),
                headers,
                event.envelope.to_bytes(),
            );
            // Closed only when publishing failed, which is the error reported.
            lines
                .blocking_send(line)
                .map_err(|_| LogToolsError::Runtime("import stopped".into()))
        })
    });
    let mut pending = FuturesOrdered::new();
    let mut appended = 0u64;
    let mut settle = |(seq, ack): (u64, Result<PublishAck, PublishError>)| {
        let ack = ack.map_err(|e| {
            LogToolsError::Runtime(format!(
                "appending event {seq}: {e}; run the import again to resume"
            ))
        })?;
        if ack.sequence != seq {
            return Err(LogToolsError::Runtime(format!(
                "event {seq} was stored at sequence {}",
                ack.sequence
            )));
        }
        appended += u64::from(!ack.duplicate);
        progress.advance(1);
        Ok(())
    };
    while let Some((seq, subject, headers, payload)) = to_publish.recv().await {
        let ack = in_time(
            "appending to the log",
            js.publish_with_headers(subject, headers, payload.into()),
        )
        .await?;
        pending.push_back(async move { (seq, ack.await) });
        if pending.len() >= IMPORT_IN_FLIGHT
            && let Some(done) = pending.next().await
        {
            settle(done)?;
        }
    }
    while let Some(done) = pending.next().await {
        settle(done)?;
    }
    reader
        .await
        .map_err(|e| LogToolsError::Runtime(format!("reading the file: {e}")))??;
    Ok(appended)
}
