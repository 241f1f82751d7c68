//! Tools that read and write the event log directly: `parley log tail|show|stats|export|
//! import` and `parley conversation at`. They talk to JetStream only (never to a running
//! role), so they work on a log no role serves yet (an import) or no longer serves.
//!
//! Layout:
//! - this file: the shared pieces: the log stream opened from the configuration, one
//!   ordered scan of a range of it, the error type and its exit codes, the clap commands.
//! - [`inspect`]: `tail`, `show`, `stats`.
//! - [`transfer`]: `export` and `import`.
//! - [`at`]: `conversation at`, the conversation as it was at a sequence or a time.

pub mod at;
pub mod inspect;
pub mod transfer;

use std::path::PathBuf;
use std::time::Duration;

use async_nats::jetstream::consumer::{DeliverPolicy, pull};
use async_nats::jetstream::{self, stream};
use bytes::Bytes;
use futures::StreamExt;
use parley_events::subjects::{LOG_SHARDS_METADATA, LOG_STREAM, Shards};
use parley_events::{ConversationId, DecodeError, RecordedEvent};

use crate::config::Config;

/// Longest any one request to NATS may take before the tool gives up (exit 1).
const NATS_TIMEOUT: Duration = Duration::from_secs(10);

/// Why a log tool stopped. The exit code says whose fault it was.
#[derive(Debug, thiserror::Error)]
pub enum LogToolsError {
    /// NATS unreachable, a request refused, an event in the log that does not decode.
    #[error("{0}")]
    Runtime(String),
    /// What was asked for does not exist (an event, a conversation at that point).
    #[error("{0}")]
    NotFound(String),
    /// Bad arguments or a bad input file; nothing was written.
    #[error("{0}")]
    Input(String),
}

impl LogToolsError {
    /// 1 for a runtime failure or nothing found, 2 for bad arguments or input.
    pub fn exit_code(&self) -> i32 {
        match self {
            LogToolsError::Runtime(_) | LogToolsError::NotFound(_) => 1,
            LogToolsError::Input(_) => 2,
        }
    }
}

fn runtime(what: &str) -> impl Fn(&dyn std::fmt::Display) -> LogToolsError + '_ {
    move |e| LogToolsError::Runtime(format!("{what}: {e}"))
}

/// `work`, or a runtime error naming `what` when NATS does not answer in time.
async fn in_time<T, E: std::fmt::Display>(
    what: &str,
    work: impl Future<Output = Result<T, E>>,
) -> Result<T, LogToolsError> {
    match tokio::time::timeout(NATS_TIMEOUT, work).await {
        Ok(result) => result.map_err(|e| runtime(what)(&e)),
        Err(_) => Err(LogToolsError::Runtime(format!(
            "{what}: NATS did not answer within {NATS_TIMEOUT:?}"
        ))),
    }
}

/// JetStream on the configured NATS.
pub async fn jetstream(config: &Config) -> Result<jetstream::Context, LogToolsError> {
    let nats = in_time(
        "connecting to NATS",
        crate::node::connect_nats(config, &crate::admin::Readiness::default()),
    )
    .await?;
    Ok(jetstream::new(nats.client))
}

/// The log stream, which must exist.
pub async fn open_log(js: &jetstream::Context) -> Result<stream::Stream, LogToolsError> {
    in_time(
        &format!("opening the log stream {LOG_STREAM}"),
        js.get_stream(LOG_STREAM),
    )
    .await
}

/// The stream's current state (first and last sequence, counts), read afresh.
async fn state(log: &mut stream::Stream) -> Result<stream::State, LogToolsError> {
    Ok(in_time("reading the log's state", log.info())
        .await?
        .state
        .clone())
}

/// The shard count the log was created with, from its metadata (the log's own truth, which
/// a configuration may not match).
fn shards_of(log: &stream::Stream) -> Result<Shards, LogToolsError> {
    log.cached_info()
        .config
        .metadata
        .get(LOG_SHARDS_METADATA)
        .and_then(|count| count.parse().ok())
        .and_then(Shards::new)
        .ok_or_else(|| {
            LogToolsError::Runtime(format!(
                "the log has no valid {LOG_SHARDS_METADATA} metadata: not a Parley log?"
            ))
        })
}

/// The log subjects holding `conversations`, without repeats; empty for all of the log.
fn subjects_of(shards: Shards, conversations: &[ConversationId]) -> Vec<String> {
    let mut subjects: Vec<String> = conversations.iter().map(|c| shards.subject(*c)).collect();
    subjects.sort();
    subjects.dedup();
    subjects
}

/// Where a scan starts.
#[derive(Debug, Clone, Copy)]
enum Start {
    /// At this sequence (or the log's first, if later).
    Seq(u64),
    /// At the first message stored at or after this time (milliseconds since the epoch).
    Time(u64),
    /// After the last message stored when the scan starts.
    New,
}

/// One stored message of the log, as a scan hands it out.
pub struct Stored {
    pub seq: u64,
    /// When the stream stored it, milliseconds since the epoch (for an imported log, when it
    /// was imported; the event's own `at` is when it happened).
    pub stored_at: u64,
    pub subject: String,
    pub payload: Bytes,
}

impl Stored {
    /// The event, upcast to the current version of its type.
    pub fn event(&self) -> Result<RecordedEvent, LogToolsError> {
        decode(self.seq, &self.payload)
    }
}

fn decode(seq: u64, payload: &[u8]) -> Result<RecordedEvent, LogToolsError> {
    parley_events::EventEnvelope::from_bytes(payload)
        .map(|envelope| envelope.recorded(seq))
        .map_err(|e: DecodeError| LogToolsError::Runtime(format!("the log's event {seq}: {e}")))
}

/// What a scan's visitor wants next.
#[derive(Debug, PartialEq, Eq)]
enum Next {
    More,
    Stop,
}

/// Read the log in order through an ordered consumer from `start`, on `subjects` only
/// (every subject when empty), handing each message to `visit` until it says stop. With
/// `until`, the scan ends after that sequence, or earlier once nothing more is stored (what
/// is appended meanwhile past `until` is not read); without, it follows the log live.
async fn scan(
    log: &stream::Stream,
    start: Start,
    until: Option<u64>,
    subjects: Vec<String>,
    mut visit: impl FnMut(Stored) -> Result<Next, LogToolsError>,
) -> Result<(), LogToolsError> {
    let deliver_policy = match start {
        Start::Seq(seq) => DeliverPolicy::ByStartSequence {
            start_sequence: seq.max(1),
        },
        Start::Time(millis) => DeliverPolicy::ByStartTime {
            start_time: async_nats::datetime::from_nanos(i128::from(millis) * 1_000_000)
                .map_err(|e| runtime("a start time")(&e))?,
        },
        Start::New => DeliverPolicy::New,
    };
    if let (Start::Seq(from), Some(until)) = (start, until)
        && from > until
    {
        return Ok(());
    }
    let consumer = in_time(
        "creating an ordered consumer on the log",
        log.create_consumer(pull::OrderedConfig {
            deliver_policy,
            filter_subjects: subjects,
            ..Default::default()
        }),
    )
    .await?;
    if until.is_some() && consumer.cached_info().num_pending == 0 {
        return Ok(());
    }
    let mut messages = in_time("reading the log", consumer.messages()).await?;
    while let Some(message) = messages.next().await {
        let message = message.map_err(|e| runtime("reading the log")(&e))?;
        let info = message.info().map_err(|e| runtime("reading the log")(&e))?;
        let (seq, pending) = (info.stream_sequence, info.pending);
        if until.is_some_and(|until| seq > until) {
            break;
        }
        let stored_at =
            u64::try_from(info.published.unix_timestamp_nanos() / 1_000_000).unwrap_or(0);
        let stored = Stored {
            seq,
            stored_at,
            subject: message.subject.to_string(),
            payload: message.message.payload.clone(),
        };
        if visit(stored)? == Next::Stop {
            break;
        }
        if until.is_some_and(|until| seq >= until || pending == 0) {
            break;
        }
    }
    Ok(())
}

/// `parley log …`: the log's subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum LogCommand {
    /// Follow the log live (from its end, or from --from-seq), one line per event that
    /// passes the filters, until Ctrl-C or --limit events.
    Tail(inspect::TailArgs),
    /// One event, by sequence or by event id. By sequence it is one direct read. By id it
    /// is a scan: the log has no index on event ids, but an id (UUIDv7) holds the time its
    /// command arrived, so the scan starts at the messages stored --within seconds before
    /// that and stops at the first event whose time is --within seconds after it. Exits 1
    /// when not found.
    Show(inspect::ShowArgs),
    /// Counts by event type and version, first and last sequence and time, bytes, shards
    /// used. Reads the whole log (for the counts by type).
    Stats(inspect::StatsArgs),
    /// Write the log (or a range, or some conversations) as JSON lines, one recorded event
    /// a line (docs/events.md, "Export files"), at the current version of each type.
    Export(transfer::ExportArgs),
    /// Load an export file into an empty log, keeping sequences, event ids and prev chains.
    /// The whole file is validated first (exit 2 with the line number, nothing written).
    /// Re-running an interrupted import resumes where the log stops; re-running a finished
    /// one appends nothing.
    Import(transfer::ImportArgs),
}

/// `parley conversation …`.
#[derive(Debug, clap::Subcommand)]
pub enum ConversationCommand {
    /// The conversation as it was at a sequence or a time, computed from the log alone:
    /// members and roles, title, the last messages with edits and deletions applied.
    At(at::AtArgs),
}

/// The options every log tool output shares.
#[derive(Debug, Clone, clap::Args)]
pub struct Output {
    /// JSON on standard output instead of text.
    #[arg(long)]
    pub json: bool,
}

/// A file or standard output.
fn output(path: Option<&PathBuf>) -> Result<Box<dyn std::io::Write>, LogToolsError> {
    Ok(match path {
        Some(path) => {
            Box::new(std::fs::File::create(path).map_err(|e| {
                LogToolsError::Input(format!("cannot create {}: {e}", path.display()))
            })?)
        }
        None => Box::new(std::io::stdout().lock()),
    })
}

/// Run `parley log <command>`.
pub async fn run_log(config: &Config, command: LogCommand) -> i32 {
    exit_code(match command {
        LogCommand::Tail(args) => inspect::tail(config, args).await,
        LogCommand::Show(args) => inspect::show(config, args).await,
        LogCommand::Stats(args) => inspect::stats(config, args).await,
        LogCommand::Export(args) => transfer::export(config, args).await,
        LogCommand::Import(args) => transfer::import(config, args).await,
    })
}

/// Run `parley conversation <command>`.
pub async fn run_conversation(config: &Config, command: ConversationCommand) -> i32 {
    exit_code(match command {
        ConversationCommand::At(args) => at::at(config, args).await,
    })
}

/// The exit code of a finished command, its error on standard error.
fn exit_code(result: Result<(), LogToolsError>) -> i32 {
    match result {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("Error: {e}");
            e.exit_code()
        }
    }
}
