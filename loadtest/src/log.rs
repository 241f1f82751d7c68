//! Reads the run's events back from the log, so the ledger can check acknowledgements and
//! deliveries against the source of truth and classify sends that got no `ack`.
//!
//! The log is read from the sequence it had before the run created its conversations, once
//! the intake holds no more commands (a command still queued may yet be appended).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use async_nats::jetstream::consumer::{DeliverPolicy, pull};
use async_nats::jetstream::context::GetStreamErrorKind;
use async_nats::jetstream::{self, ErrorCode, stream};
use futures::StreamExt;
use parley_events::subjects::{INTAKE_STREAM, LOG_STREAM, PROJECTOR_CONSUMER};
use parley_events::{ConversationId, EventEnvelope};

use crate::LoadtestError;
use crate::ledger::{Content, ConvIndex, LogRead, Observed};
use crate::live::ProjectionSample;

/// How long reading the log may take before the run gives up on it.
const READ_TIMEOUT: Duration = Duration::from_secs(60);

pub struct LogReader {
    js: jetstream::Context,
}

fn fail<E: std::fmt::Display>(what: &str) -> impl FnOnce(E) -> LoadtestError + '_ {
    move |e| LoadtestError::Log(format!("{what}: {e}"))
}

impl LogReader {
    pub async fn connect(nats_url: &str) -> Result<LogReader, LoadtestError> {
        let client = async_nats::connect(nats_url)
            .await
            .map_err(fail("connecting to NATS"))?;
        Ok(LogReader {
            js: jetstream::new(client),
        })
    }

    /// The log's last sequence now; 0 when the log does not exist yet.
    pub async fn last_sequence(&self) -> Result<u64, LoadtestError> {
        Ok(self
            .state(LOG_STREAM)
            .await?
            .map_or(0, |state| state.last_sequence))
    }

    /// The log's end and the projector consumer's acknowledged floor now; `None` when
    /// either cannot be read.
    pub async fn projection(&self) -> Option<ProjectionSample> {
        let log = self.js.get_stream(LOG_STREAM).await.ok()?;
        let log_end = log.cached_info().state.last_sequence;
        let consumer = log.consumer_info(PROJECTOR_CONSUMER).await.ok()?;
        Some(ProjectionSample {
            log_end,
            acknowledged: consumer.ack_floor.stream_sequence,
        })
    }

    /// Commands in the intake now (queued, or taken by a handler and not yet done); 0 when
    /// the intake does not exist: a nats-server restart loses an intake kept in memory (and
    /// its commands), and the handlers create it again.
    pub async fn intake_pending(&self) -> Result<u64, LoadtestError> {
        Ok(self
            .state(INTAKE_STREAM)
            .await?
            .map_or(0, |state| state.messages))
    }

    /// A stream's state; `None` when there is no such stream.
    async fn state(&self, name: &str) -> Result<Option<stream::State>, LoadtestError> {
        match self.js.get_stream(name).await {
            Ok(mut stream) => Ok(Some(stream.info().await.map_err(fail(name))?.state.clone())),
            Err(e) => match e.kind() {
                GetStreamErrorKind::JetStream(js)
                    if js.error_code() == ErrorCode::STREAM_NOT_FOUND =>
                {
                    Ok(None)
                }
                _ => Err(fail(name)(e)),
            },
        }
    }

    /// Wait until the intake is empty, for at most `budget`; the commands left in it.
    pub async fn wait_for_empty_intake(&self, budget: Duration) -> Result<u64, LoadtestError> {
        let deadline = Instant::now() + budget;
        loop {
            let pending = self.intake_pending().await?;
            if pending == 0 || Instant::now() >= deadline {
                return Ok(pending);
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// The events after `after` of the conversations in `index`, in log order.
    pub async fn read(
        &self,
        after: u64,
        index: &HashMap<ConversationId, ConvIndex>,
        intake_pending: u64,
    ) -> Result<LogRead, LoadtestError> {
        let last = self.last_sequence().await?;
        let mut read = LogRead {
            events: Vec::new(),
            intake_pending,
        };
        if last <= after {
            return Ok(read);
        }
        let stream = self
            .js
            .get_stream(LOG_STREAM)
            .await
            .map_err(fail("log stream"))?;
        let consumer = stream
            .create_consumer(pull::OrderedConfig {
                deliver_policy: DeliverPolicy::ByStartSequence {
                    start_sequence: after + 1,
                },
                ..Default::default()
            })
            .await
            .map_err(fail("log consumer"))?;
        let mut messages = consumer.messages().await.map_err(fail("log messages"))?;
        let reading = async {
            while let Some(message) = messages.next().await {
                let message = message.map_err(fail("reading the log"))?;
                let seq = message.info().map_err(fail("log message"))?.stream_sequence;
                let envelope = EventEnvelope::from_bytes(&message.payload)
                    .map_err(|e| fail("decoding the log")(format!("seq {seq}: {e}")))?;
                if let Some(&conv) = index.get(&envelope.conversation) {
                    read.events.push(Observed {
                        conversation: Some(conv),
                        seq,
                        prev: envelope.prev,
                        content: Content::of(&envelope.event),
                        resumed: false,
                    });
                }
                if seq >= last {
                    return Ok(());
                }
            }
            Err(LoadtestError::Log("the log consumer ended early".into()))
        };
        tokio::time::timeout(READ_TIMEOUT, reading)
            .await
            .map_err(|_| LoadtestError::Log(format!("not read within {READ_TIMEOUT:?}")))??;
        Ok(read)
    }
}
