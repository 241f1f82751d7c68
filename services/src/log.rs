//! What the roles read from the log itself: single events by direct get, never through a
//! consumer. A gateway fills a conversation's gaps, catches a socket up, and covers what the
//! conversation store has not projected yet when a socket resumes; the projector reads what
//! its consumer will never deliver again (`projector.rs`).

use async_nats::jetstream::stream::{DirectGetErrorKind, Stream as LogStream};
use futures::{StreamExt, TryStreamExt};
use parley_events::subjects::Shards;
use parley_events::{ConversationId, EventEnvelope, RecordedEvent};
use tracing::warn;

use crate::topology::Topology;

/// Direct gets in flight at once when reading a range of the log.
const CONCURRENT_GETS: usize = 32;
/// Most messages of a shard looked at by one forward read of a conversation: the other
/// conversations of a busy shard must not turn it into a scan of the log.
const MAX_EXAMINED: usize = 4096;

#[derive(Debug, thiserror::Error)]
#[error("cannot read the log: {0}")]
pub struct LogError(String);

/// The sequences the log holds now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogBounds {
    /// The oldest sequence still held (1 unless a retention removed older events).
    pub first: u64,
    /// The newest sequence; 0 for an empty log.
    pub last: u64,
}

#[derive(Clone)]
pub struct LogReader {
    log: LogStream,
    shards: Shards,
    client: async_nats::Client,
}

impl LogReader {
    pub fn new(topology: &Topology) -> Self {
        LogReader {
            log: topology.log.clone(),
            shards: topology.shards,
            client: topology.js.client(),
        }
    }

    /// Refused at once while the client is not connected: a read would wait out the
    /// JetStream timeout, and a socket's reader (a resume, a version 1 socket's start)
    /// with it, for an answer that cannot come.
    fn check_connected(&self) -> Result<(), LogError> {
        if crate::node::connected(&self.client) {
            Ok(())
        } else {
            Err(LogError("not connected to NATS".to_owned()))
        }
    }

    pub async fn bounds(&self) -> Result<LogBounds, LogError> {
        self.check_connected()?;
        let info = self
            .log
            .get_info()
            .await
            .map_err(|e| LogError(e.to_string()))?;
        Ok(LogBounds {
            first: info.state.first_sequence,
            last: info.state.last_sequence,
        })
    }

    /// The event at `seq`; `None` when the log no longer (or does not yet) hold it.
    pub async fn event(&self, seq: u64) -> Result<Option<RecordedEvent>, LogError> {
        self.check_connected()?;
        match self.log.direct_get(seq).await {
            Ok(message) => decode(&message.payload, seq).map(Some),
            Err(e) if e.kind() == DirectGetErrorKind::NotFound => Ok(None),
            Err(e) => Err(LogError(e.to_string())),
        }
    }

    /// Every event with a sequence in `after + 1 ..= through`, in order.
    pub async fn range(&self, after: u64, through: u64) -> Result<Vec<RecordedEvent>, LogError> {
        self.events(after + 1..=through).await
    }

    /// The events at `seqs` that the log holds, in the order of `seqs`.
    pub async fn events(
        &self,
        seqs: impl IntoIterator<Item = u64>,
    ) -> Result<Vec<RecordedEvent>, LogError> {
        let events: Vec<Option<RecordedEvent>> = futures::stream::iter(seqs)
            .map(|seq| self.event(seq))
            .buffered(CONCURRENT_GETS)
            .try_collect()
            .await?;
        Ok(events.into_iter().flatten().collect())
    }

    /// The events of `conversation` from `from` back to, but not including, `after`, by
    /// walking the `prev` chain; oldest first, at most `limit`. `complete` is false when the
    /// walk stopped at `limit` or at an event it could not read before reaching `after`.
    pub async fn chain_back(&self, after: u64, from: u64, limit: usize) -> Chain {
        let mut events = Vec::new();
        let mut seq = from;
        while seq > after && events.len() < limit {
            match self.event(seq).await {
                Ok(Some(event)) => {
                    seq = event.envelope.prev;
                    events.push(event);
                }
                Ok(None) => {
                    warn!(seq, "an event of a conversation's chain is not in the log");
                    break;
                }
                Err(e) => {
                    warn!(seq, error = %e, "cannot read an event of a conversation's chain");
                    break;
                }
            }
        }
        events.reverse();
        Chain {
            complete: seq <= after,
            events,
        }
    }

    /// The events of `conversation` after `after`, oldest first, at most `limit`: its shard's
    /// subject read forward, skipping the other conversations that share the shard (at most
    /// [`MAX_EXAMINED`] messages in all).
    pub async fn conversation_after(
        &self,
        conversation: ConversationId,
        after: u64,
        limit: usize,
    ) -> Result<Vec<RecordedEvent>, LogError> {
        self.check_connected()?;
        let subject = self.shards.subject(conversation);
        let mut events = Vec::new();
        let mut next = after + 1;
        for _ in 0..MAX_EXAMINED {
            if events.len() == limit {
                return Ok(events);
            }
            let message = match self
                .log
                .direct_get_next_for_subject(subject.as_str(), Some(next))
                .await
            {
                Ok(message) => message,
                Err(e) if e.kind() == DirectGetErrorKind::NotFound => return Ok(events),
                Err(e) => return Err(LogError(e.to_string())),
            };
            next = message.sequence + 1;
            let event = decode(&message.payload, message.sequence)?;
            if event.envelope.conversation == conversation {
                events.push(event);
            }
        }
        warn!(%conversation, after, "stopped reading a busy shard forward; a later event fills the rest");
        Ok(events)
    }
}

/// Events read by walking a conversation's `prev` chain.
pub struct Chain {
    pub events: Vec<RecordedEvent>,
    /// Whether the walk reached the sequence it was asked to stop at.
    pub complete: bool,
}

fn decode(payload: &[u8], seq: u64) -> Result<RecordedEvent, LogError> {
    EventEnvelope::from_bytes(payload)
        .map(|envelope| envelope.recorded(seq))
        .map_err(|e| LogError(format!("event {seq} is unreadable: {e}")))
}
