//! The push dead-letter stream (`PARLEY_PUSH_DLQ`) and `parley push`: list what the webhook
//! kept refusing, and POST it again once the webhook is fixed.
//!
//! A redriven notification that the webhook takes is deleted from the stream; one it refuses
//! again is published anew with its attempts added up and the new error, and the old copy
//! deleted, so it appears under a new stream sequence.

use std::time::Duration;

use async_nats::jetstream::context::GetStreamErrorKind;
use async_nats::jetstream::stream::DirectGetErrorKind;
use async_nats::jetstream::{self, ErrorCode};
use parley_events::subjects::{PUSH_DLQ_STREAM, PUSH_DLQ_SUBJECT};
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use super::{DeadLetter, PushError, Undelivered, Webhook};
use crate::admin::Readiness;
use crate::config::Config;
use crate::{node, unix_millis};

/// Longest `parley push` waits for NATS to answer at start.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// `parley push …`
#[derive(Debug, clap::Subcommand)]
pub enum PushCommand {
    /// List the notifications the webhook kept refusing, oldest first. Exits 0, or 1 when
    /// NATS cannot be reached.
    DeadLetters {
        /// One JSON array on stdout instead of a table.
        #[arg(long)]
        json: bool,
        /// Most dead letters listed.
        #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u64).range(1..=100_000))]
        limit: u64,
    },
    /// POST dead letters to the webhook again (with the configured retries). Each one
    /// delivered leaves the dead-letter stream; one refused again stays, with its attempts
    /// and error updated (under a new sequence). Exits 0 when every one was delivered, 1
    /// when one was refused again or NATS cannot be reached, 2 when push is not configured
    /// or `--seq` names no dead letter.
    #[command(group(clap::ArgGroup::new("which").required(true)))]
    Redrive {
        /// Every dead letter.
        #[arg(long, group = "which")]
        all: bool,
        /// The one dead letter at this sequence of the dead-letter stream (as listed).
        #[arg(long, group = "which")]
        seq: Option<u64>,
    },
}

/// One dead letter as listed.
#[derive(Debug, Serialize)]
struct Listed {
    seq: u64,
    #[serde(flatten)]
    letter: DeadLetter,
}

/// Publish one dead letter, waiting for the stream to have stored it.
pub(super) async fn publish(js: &jetstream::Context, letter: &DeadLetter) -> Result<(), PushError> {
    let payload = serde_json::to_vec(letter).expect("a dead letter serializes");
    js.publish(PUSH_DLQ_SUBJECT, payload.into())
        .await
        .map_err(|e| PushError::DeadLetters(e.to_string()))?
        .await
        .map_err(|e| PushError::DeadLetters(e.to_string()))?;
    Ok(())
}

/// Run a `parley push` command; the process's exit code.
pub async fn run(config: &Config, command: PushCommand) -> i32 {
    let result = match command {
        PushCommand::DeadLetters { json, limit } => list(config, json, limit).await,
        PushCommand::Redrive { all: _, seq } => redrive(config, seq).await,
    };
    match result {
        Ok(code) => code,
        Err(Failure { code, message }) => {
            eprintln!("parley push: {message}");
            code
        }
    }
}

/// Why a command failed, and its exit code.
struct Failure {
    code: i32,
    message: String,
}

impl Failure {
    fn runtime(message: impl std::fmt::Display) -> Failure {
        Failure {
            code: 1,
            message: message.to_string(),
        }
    }

    fn usage(message: impl std::fmt::Display) -> Failure {
        Failure {
            code: 2,
            message: message.to_string(),
        }
    }
}

/// JetStream, and the dead-letter stream: `None` when it was never created (push was never
/// on here).
async fn stream(
    config: &Config,
) -> Result<(jetstream::Context, Option<jetstream::stream::Stream>), Failure> {
    if config.nats.url.is_none() {
        return Err(Failure::usage("nats.url is not configured"));
    }
    let nats = tokio::time::timeout(
        CONNECT_TIMEOUT,
        node::connect_nats(config, &Readiness::default()),
    )
    .await
    .map_err(|_| Failure::runtime(format!("NATS did not answer within {CONNECT_TIMEOUT:?}")))?
    .map_err(Failure::runtime)?;
    let js = jetstream::new(nats.client);
    let stream = match js.get_stream(PUSH_DLQ_STREAM).await {
        Ok(stream) => Some(stream),
        Err(e)
            if matches!(
                e.kind(),
                GetStreamErrorKind::JetStream(ref e) if e.error_code() == ErrorCode::STREAM_NOT_FOUND
            ) =>
        {
            None
        }
        Err(e) => return Err(Failure::runtime(format!("{PUSH_DLQ_STREAM}: {e}"))),
    };
    Ok((js, stream))
}

/// Up to `limit` dead letters from stream sequence `from` on, oldest first.
async fn read(
    stream: &jetstream::stream::Stream,
    from: u64,
    limit: u64,
) -> Result<Vec<Listed>, Failure> {
    let mut letters = Vec::new();
    let mut next = from.max(1);
    while (letters.len() as u64) < limit {
        let message = match stream
            .direct_get_next_for_subject(PUSH_DLQ_SUBJECT, Some(next))
            .await
        {
            Ok(message) => message,
            Err(e) if e.kind() == DirectGetErrorKind::NotFound => break,
            Err(e) => return Err(Failure::runtime(format!("{PUSH_DLQ_STREAM}: {e}"))),
        };
        next = message.sequence + 1;
        match serde_json::from_slice::<DeadLetter>(&message.payload) {
            Ok(letter) => letters.push(Listed {
                seq: message.sequence,
                letter,
            }),
            Err(e) => eprintln!(
                "parley push: dead letter {} is unreadable, skipped: {e}",
                message.sequence
            ),
        }
    }
    Ok(letters)
}

async fn list(config: &Config, json: bool, limit: u64) -> Result<i32, Failure> {
    let letters = match stream(config).await?.1 {
        Some(stream) => read(&stream, 1, limit).await?,
        None => Vec::new(),
    };
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&letters).expect("dead letters serialize")
        );
        return Ok(0);
    }
    if letters.is_empty() {
        println!("no dead letters");
        return Ok(0);
    }
    println!(
        "{:>6}  {:>8}  {:>8}  {:<16}  {:<36}  {:>8}  ERROR",
        "SEQ", "AGE", "ATTEMPTS", "RECIPIENT", "CONVERSATION", "LOG SEQ"
    );
    let now = unix_millis();
    for Listed { seq, letter } in &letters {
        let n = &letter.notification;
        println!(
            "{seq:>6}  {:>8}  {:>8}  {:<16}  {:<36}  {:>8}  {}",
            format!("{}s", now.saturating_sub(letter.failed_at) / 1000),
            letter.attempts,
            n.recipient.as_str(),
            n.conversation.to_string(),
            n.seq,
            letter.error
        );
    }
    Ok(0)
}

async fn redrive(config: &Config, seq: Option<u64>) -> Result<i32, Failure> {
    let webhook = Webhook::new(&config.push)
        .map_err(Failure::usage)?
        .ok_or_else(|| {
            Failure::usage("push.webhook_url is not configured: nowhere to redrive to")
        })?;
    let (js, Some(stream)) = stream(config).await? else {
        return match seq {
            Some(seq) => Err(Failure::usage(format!("no dead letter at sequence {seq}"))),
            None => {
                println!("no dead letters");
                Ok(0)
            }
        };
    };
    let letters = match seq {
        Some(seq) => {
            let found = read(&stream, seq, 1).await?;
            if found.first().is_none_or(|l| l.seq != seq) {
                return Err(Failure::usage(format!("no dead letter at sequence {seq}")));
            }
            found
        }
        // Only what is there now: a letter refused again goes back under a new sequence,
        // which this run must not pick up again.
        None => {
            let last = stream
                .get_info()
                .await
                .map_err(|e| Failure::runtime(format!("{PUSH_DLQ_STREAM}: {e}")))?
                .state
                .last_sequence;
            read(&stream, 1, u64::MAX)
                .await?
                .into_iter()
                .take_while(|l| l.seq <= last)
                .collect()
        }
    };
    let never = CancellationToken::new();
    let (mut delivered, mut refused) = (0, 0);
    for Listed { seq, letter } in letters {
        let recipient = letter.notification.recipient.clone();
        match webhook.deliver(&letter.notification, &never).await {
            Ok(attempts) => {
                stream.delete_message(seq).await.map_err(|e| {
                    Failure::runtime(format!("delivered {seq} but cannot delete it: {e}"))
                })?;
                delivered += 1;
                println!("delivered  {seq}  to {recipient} ({attempts} attempt(s))");
            }
            Err(Undelivered::Failed { error, attempts }) => {
                let again = DeadLetter {
                    notification: letter.notification,
                    error: error.clone(),
                    attempts: letter.attempts.saturating_add(attempts),
                    failed_at: unix_millis(),
                };
                publish(&js, &again).await.map_err(Failure::runtime)?;
                stream
                    .delete_message(seq)
                    .await
                    .map_err(|e| Failure::runtime(format!("cannot delete {seq}: {e}")))?;
                refused += 1;
                println!("refused    {seq}  to {recipient} ({attempts} attempt(s)): {error}");
            }
            Err(Undelivered::Shutdown) => unreachable!("nothing cancels a redrive"),
        }
    }
    println!("{delivered} delivered, {refused} refused again");
    Ok(if refused == 0 { 0 } else { 1 })
}
