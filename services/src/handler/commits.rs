//! Appending decided events to the log: group commit across lanes.
//!
//! A lane decides one command's event (or a batch of its own) and hands it here. While a
//! limited number of commits are in flight, what the lanes hand over queues up, and the next
//! free commit takes the queue as one JetStream atomic batch: one commit, one fsync, for
//! events of many lanes. Lanes own disjoint shards, so events from different lanes never
//! share a shard's expected-sequence check. With too little queued for a batch to pay, a
//! commit carries one lane's events alone, so a lightly loaded handler appends exactly as
//! if there were no batching.
//!
//! A batch is refused as a whole without naming the event at fault; every lane in it then
//! appends its events alone ([`Commit::alone`]), where a conflict or a duplicate concerns
//! exactly one command.

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;
use std::time::Instant;

use async_nats::HeaderMap;
use parley_events::EventEnvelope;
use parley_events::subjects::log_subject;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinSet;
use tracing::{debug, warn};

use super::Inner;
use crate::telemetry;

/// Fewest events worth an atomic batch. nats-server 2.15.1 stages a batch of a file-stored
/// R1 stream in a store of its own, which costs about as much as a dozen single appends
/// (measured here: 4 to 9 ms a batch against 0.4 ms an append, `sync_interval: always`);
/// fewer events are appended one at a time.
pub(super) const MIN_ATOMIC_BATCH: usize = 16;

/// An event decided for the command at `index` of a lane's batch.
pub(super) struct Append {
    pub index: usize,
    pub event: EventEnvelope,
    pub shard: u32,
    pub expected_shard_seq: u64,
    /// The command's trace context, carried on to the projector.
    pub trace: HeaderMap,
}

/// Why an append did not go through.
#[derive(Debug, Clone)]
pub(super) enum Failed {
    /// The log holds something the write model has not seen, up to this sequence: the
    /// event already (a duplicate), or another writer's append to its shard.
    Behind(u64),
    /// An atomic batch was refused as a whole (a stale expected sequence or an event
    /// already stored, without saying which event); its events are retried one at a time.
    Batch(String),
    Transient(String),
}

/// Where lanes hand their decided events to be appended.
#[derive(Clone)]
pub(super) struct Commits {
    queue: Option<mpsc::UnboundedSender<Commit>>,
}

/// One lane's events waiting to be appended, and where to send the sequences they got.
struct Commit {
    appends: Vec<Append>,
    /// Never merged with other lanes' events: set after a batch holding them was refused.
    alone: bool,
    done: oneshot::Sender<Appended>,
}

impl Commits {
    /// Commits for `inner`'s handler; with `handler.max_batch` of 1 nothing is merged and
    /// every lane appends directly, as many at once as there are lanes.
    pub fn start(inner: &Arc<Inner>) -> (Commits, Option<tokio::task::JoinHandle<()>>) {
        let handler = &inner.config.handler;
        if handler.max_batch < MIN_ATOMIC_BATCH {
            return (Commits { queue: None }, None);
        }
        // Unbounded, but never long: every lane waits for its commit before handing over
        // more, so at most one commit per lane is queued.
        let (queue, waiting) = mpsc::unbounded_channel();
        let task = tokio::spawn(merge(
            Arc::clone(inner),
            waiting,
            handler.commits_in_flight,
            handler.max_batch,
        ));
        (Commits { queue: Some(queue) }, Some(task))
    }

    /// Append `appends` (one lane's, at most one expected-sequence check per shard among
    /// them is needed): the sequences they were stored at, in order.
    pub async fn append(
        &self,
        inner: &Inner,
        appends: Vec<Append>,
        alone: bool,
    ) -> (Vec<Append>, Result<Vec<u64>, Failed>) {
        let Some(queue) = &self.queue else {
            let appended = append(inner, &appends).await;
            return (appends, appended);
        };
        let (done, result) = oneshot::channel();
        let commit = Commit {
            appends,
            alone,
            done,
        };
        if let Err(mpsc::error::SendError(commit)) = queue.send(commit) {
            // Only at shutdown, after the merging task ended: append directly.
            let appended = append(inner, &commit.appends).await;
            return (commit.appends, appended);
        }
        result.await.unwrap_or_else(|_| {
            (
                Vec::new(),
                Err(Failed::Transient("the commit was dropped".into())),
            )
        })
    }
}

/// What a finished commit sends back to its lane: its events and their sequences.
type Appended = (Vec<Append>, Result<Vec<u64>, Failed>);

/// Take what lanes hand over, at most `in_flight` commits at a time, each as large as the
/// queue allows up to `max_batch` events.
async fn merge(
    inner: Arc<Inner>,
    mut waiting: mpsc::UnboundedReceiver<Commit>,
    in_flight: usize,
    max_batch: usize,
) {
    let mut queued = VecDeque::new();
    let mut committing = JoinSet::new();
    let mut open = true;
    while open || !queued.is_empty() || !committing.is_empty() {
        tokio::select! {
            received = waiting.recv(), if open => match received {
                Some(commit) => queued.push_back(commit),
                None => open = false,
            },
            Some(_) = committing.join_next(), if !committing.is_empty() => {}
        }
        while let Ok(commit) = waiting.try_recv() {
            queued.push_back(commit);
        }
        while committing.len() < in_flight && !queued.is_empty() {
            let next = next_commit(&mut queued, max_batch);
            committing.spawn(commit(Arc::clone(&inner), next));
        }
    }
}

/// The commits the next append carries: as many mergeable ones as fit in `max_batch` when
/// together they are worth a batch, otherwise the oldest alone.
fn next_commit(queued: &mut VecDeque<Commit>, max_batch: usize) -> Vec<Commit> {
    let mergeable: usize = queued
        .iter()
        .filter(|commit| !commit.alone)
        .map(|commit| commit.appends.len())
        .sum();
    if mergeable < MIN_ATOMIC_BATCH {
        return queued.pop_front().into_iter().collect();
    }
    let mut taken = Vec::new();
    let mut events = 0;
    let mut left = VecDeque::with_capacity(queued.len());
    for commit in queued.drain(..) {
        let fits = events + commit.appends.len() <= max_batch || taken.is_empty();
        if commit.alone || !fits {
            left.push_back(commit);
        } else {
            events += commit.appends.len();
            taken.push(commit);
        }
    }
    *queued = left;
    taken
}

/// Append the events of `commits` as one, and tell each lane what its own got.
async fn commit(inner: Arc<Inner>, commits: Vec<Commit>) {
    let mut lanes = Vec::with_capacity(commits.len());
    let mut appends = Vec::new();
    for commit in commits {
        lanes.push((commit.appends.len(), commit.done));
        appends.extend(commit.appends);
    }
    let appended = append(&inner, &appends).await;
    let mut appends = appends.into_iter();
    let mut first = 0;
    for (count, done) in lanes {
        let own: Vec<Append> = appends.by_ref().take(count).collect();
        let result = match &appended {
            Ok(seqs) => Ok(seqs[first..first + count].to_vec()),
            Err(failed) => Err(failed.clone()),
        };
        first += count;
        // A lane that stopped waiting has nothing left to answer.
        let _ = done.send((own, result));
    }
}

/// The server's answer to an append, or to the commit of an atomic batch.
#[derive(serde::Deserialize)]
struct AppendAck {
    #[serde(default)]
    seq: u64,
    #[serde(default)]
    duplicate: bool,
    /// Messages the committed batch stored.
    count: Option<usize>,
    error: Option<ApiError>,
}

#[derive(serde::Deserialize)]
struct ApiError {
    err_code: u64,
    description: String,
}

/// JetStream's error code for a stale expected sequence.
const WRONG_LAST_SEQUENCE: u64 = 10071;

/// Append `appends` to the log with one commit: the sequences they were stored at. One
/// event is a plain publish; several are an atomic batch (headers `Nats-Batch-Id`,
/// `Nats-Batch-Sequence`, `Nats-Batch-Commit` on the last, whose request the server answers
/// once the batch is stored). The server stores a batch's messages at consecutive
/// sequences, so the commit's sequence and count give each event's. The first event of
/// each shard carries the shard's expected last sequence; the server refuses that header
/// on a later message of the same subject in one batch, and nothing can come between
/// them anyway.
async fn append(inner: &Inner, appends: &[Append]) -> Result<Vec<u64>, Failed> {
    let started = Instant::now();
    let batch = (appends.len() > 1).then(|| uuid::Uuid::new_v4().simple().to_string());
    let mut checked = HashSet::new();
    let mut commit = None;
    for (position, append) in (1..).zip(appends) {
        let mut headers = append.trace.clone();
        headers.insert(
            async_nats::header::NATS_MESSAGE_ID,
            append.event.id.to_string().as_str(),
        );
        if checked.insert(append.shard) {
            headers.insert(
                async_nats::header::NATS_EXPECTED_LAST_SUBJECT_SEQUENCE,
                append.expected_shard_seq.to_string().as_str(),
            );
        }
        if let Some(batch) = &batch {
            headers.insert(async_nats::header::NATS_BATCH_ID, batch.as_str());
            headers.insert(
                async_nats::header::NATS_BATCH_SEQUENCE,
                position.to_string().as_str(),
            );
        }
        let subject = log_subject(append.shard);
        let payload = append.event.to_bytes().into();
        let client = &inner.nats.client;
        if position < appends.len() {
            client
                .publish_with_headers(subject, headers, payload)
                .await
                .map_err(|e| Failed::Transient(format!("append failed: {e}")))?;
        } else {
            if batch.is_some() {
                headers.insert(async_nats::header::NATS_BATCH_COMMIT, "1");
            }
            commit = Some(
                client
                    .request_with_headers(subject, headers, payload)
                    .await
                    .map_err(|e| Failed::Transient(format!("append failed: {e}")))?,
            );
        }
    }
    let reply = commit.expect("an append has at least one event");
    metrics::histogram!(telemetry::HANDLER_APPEND_SECONDS).record(started.elapsed().as_secs_f64());
    let ack: AppendAck = serde_json::from_slice(&reply.payload)
        .map_err(|e| Failed::Transient(format!("unreadable append ack: {e}")))?;
    match ack.error {
        None if ack.duplicate => Err(Failed::Behind(ack.seq)),
        None => {
            let stored = ack.count.unwrap_or(1);
            if stored != appends.len() || ack.seq < stored as u64 {
                // Not what the server documents; whatever was stored, the tail brings it.
                warn!(
                    stored,
                    events = appends.len(),
                    seq = ack.seq,
                    "batch ack does not match the batch"
                );
                return Err(Failed::Behind(ack.seq));
            }
            metrics::histogram!(telemetry::HANDLER_BATCH_EVENTS).record(stored as f64);
            let first = ack.seq + 1 - stored as u64;
            Ok((first..=ack.seq).collect())
        }
        Some(error) if batch.is_some() => {
            if error.err_code == WRONG_LAST_SEQUENCE {
                metrics::counter!(telemetry::HANDLER_APPEND_CONFLICTS_TOTAL).increment(1);
            }
            Err(Failed::Batch(error.description))
        }
        Some(error) if error.err_code == WRONG_LAST_SEQUENCE => {
            metrics::counter!(telemetry::HANDLER_APPEND_CONFLICTS_TOTAL).increment(1);
            let append = &appends[0];
            let subject = log_subject(append.shard);
            let last = inner
                .topology
                .log
                .direct_get_last_for_subject(subject.as_str())
                .await
                .map_err(|e| Failed::Transient(format!("cannot read the shard's last event: {e}")))?
                .sequence;
            debug!(
                expected = append.expected_shard_seq,
                last, "append conflict; catching up"
            );
            Err(Failed::Behind(last))
        }
        Some(error) => Err(Failed::Transient(format!(
            "append failed: {}",
            error.description
        ))),
    }
}
