//! Baselines measured in the same run, so results can be quoted as ratios that hold on a
//! noisy machine: raw JetStream async publish with acks on the same NATS server, reading
//! those messages back through an ordered consumer, and a bare WebSocket echo round trip on
//! the same machine.

use std::time::{Duration, Instant};

use async_nats::jetstream::consumer::pull;
use async_nats::jetstream::{self, stream};
use bytes::Bytes;
use futures::stream::FuturesUnordered;
use futures::{SinkExt, StreamExt};
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio_tungstenite::tungstenite::Message;

use crate::LoadtestError;
use crate::latency::{Latency, Summary};

const STREAM: &str = "LOADTEST_BASELINE";
const SUBJECT: &str = "loadtest.baseline";
/// Publishes awaiting their ack at once, as measured for the design notes.
const IN_FLIGHT: usize = 256;
/// Echo clients running at once.
const ECHO_CLIENTS: usize = 16;

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Baselines {
    pub jetstream: Option<Throughput>,
    /// Reading back what the publish baseline stored (no latency: one stream of reads).
    #[serde(default)]
    pub jetstream_consume: Option<Throughput>,
    pub websocket_echo: Option<Throughput>,
    /// Where and when they were measured, so a reader knows what they competed with.
    #[serde(default)]
    pub how: String,
}

/// Operations per second and the latency of each.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Throughput {
    pub what: String,
    pub per_sec: f64,
    pub latency: Summary,
}

/// JetStream async publish of `message_bytes` payloads to a file stream on `nats_url`, at
/// most [`IN_FLIGHT`] unacknowledged, for `duration`; then those messages read back from the
/// start through an ordered pull consumer (as a resume reads the log), for at most
/// `duration`. The stream is deleted afterwards. Publish first, consume second.
pub async fn jetstream(
    nats_url: &str,
    message_bytes: usize,
    duration: Duration,
) -> Result<(Throughput, Throughput), LoadtestError> {
    let fail = |e: &dyn std::fmt::Display| LoadtestError::Baseline(format!("jetstream: {e}"));
    let client = async_nats::connect(nats_url).await.map_err(|e| fail(&e))?;
    let js = jetstream::new(client);
    let _ = js.delete_stream(STREAM).await;
    js.create_stream(stream::Config {
        name: STREAM.to_owned(),
        subjects: vec![SUBJECT.to_owned()],
        storage: stream::StorageType::File,
        // Bounded so a long baseline never fills the disk.
        max_messages: 1_000_000,
        ..Default::default()
    })
    .await
    .map_err(|e| fail(&e))?;
    let payload = Bytes::from(vec![b'x'; message_bytes]);
    let mut latency = Latency::default();
    let mut pending = FuturesUnordered::new();
    let start = Instant::now();
    let mut acked = 0u64;
    let mut result = Ok(());
    while start.elapsed() < duration {
        while pending.len() < IN_FLIGHT {
            let sent = Instant::now();
            match js.publish(SUBJECT, payload.clone()).await {
                Ok(ack) => pending.push(async move { (sent, ack.await) }),
                Err(e) => {
                    result = Err(fail(&e));
                    break;
                }
            }
        }
        if result.is_err() {
            break;
        }
        if let Some((sent, ack)) = pending.next().await {
            if let Err(e) = ack {
                result = Err(fail(&e));
                break;
            }
            latency.record_micros(micros(sent.elapsed()));
            acked += 1;
        }
    }
    let elapsed = start.elapsed();
    drop(pending);
    let consumed = match result {
        Ok(()) => consume(&js, acked, duration).await,
        Err(e) => Err(e),
    };
    let _ = js.delete_stream(STREAM).await;
    let consumed = consumed?;
    Ok((
        Throughput {
            what: format!(
                "JetStream async publish, {message_bytes} B, {IN_FLIGHT} in flight, file storage, R1"
            ),
            per_sec: acked as f64 / elapsed.as_secs_f64(),
            latency: latency.summary(),
        },
        Throughput {
            what: format!(
                "JetStream ordered consume of those {message_bytes} B messages, from the stream's start"
            ),
            per_sec: consumed,
            latency: Summary::default(),
        },
    ))
}

/// Messages per second read from the start of the baseline stream, up to `stored` of them
/// or for `duration`.
async fn consume(
    js: &jetstream::Context,
    stored: u64,
    duration: Duration,
) -> Result<f64, LoadtestError> {
    let fail =
        |e: &dyn std::fmt::Display| LoadtestError::Baseline(format!("jetstream consume: {e}"));
    let stream = js.get_stream(STREAM).await.map_err(|e| fail(&e))?;
    let consumer = stream
        .create_consumer(pull::OrderedConfig::default())
        .await
        .map_err(|e| fail(&e))?;
    let mut messages = consumer.messages().await.map_err(|e| fail(&e))?;
    let start = Instant::now();
    let mut read = 0u64;
    while read < stored && start.elapsed() < duration {
        match tokio::time::timeout(duration, messages.next()).await {
            Ok(Some(Ok(_))) => read += 1,
            Ok(Some(Err(e))) => return Err(fail(&e)),
            Ok(None) | Err(_) => break,
        }
    }
    Ok(read as f64 / start.elapsed().as_secs_f64())
}

/// Round trips of `message_bytes` text frames through an in-process echo server over
/// loopback, [`ECHO_CLIENTS`] clients each waiting for its echo before the next send.
pub async fn websocket_echo(
    message_bytes: usize,
    duration: Duration,
) -> Result<Throughput, LoadtestError> {
    let fail = |e: &dyn std::fmt::Display| LoadtestError::Baseline(format!("websocket echo: {e}"));
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .map_err(|e| fail(&e))?;
    let url = format!("ws://{}", listener.local_addr().map_err(|e| fail(&e))?);
    let server = tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            tokio::spawn(async move {
                let Ok(mut socket) = tokio_tungstenite::accept_async(tcp).await else {
                    return;
                };
                while let Some(Ok(message)) = socket.next().await {
                    if message.is_text() && socket.send(message).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    let text = "x".repeat(message_bytes);
    let start = Instant::now();
    let clients: Vec<_> = (0..ECHO_CLIENTS)
        .map(|_| {
            let url = url.clone();
            let text = text.clone();
            tokio::spawn(async move {
                let (mut socket, _) = tokio_tungstenite::connect_async(url).await?;
                let mut latency = Latency::default();
                while start.elapsed() < duration {
                    let sent = Instant::now();
                    socket.send(Message::text(text.clone())).await?;
                    match socket.next().await {
                        Some(Ok(_)) => latency.record_micros(micros(sent.elapsed())),
                        Some(Err(e)) => return Err(e),
                        None => break,
                    }
                }
                let _ = socket.close(None).await;
                Ok::<_, tokio_tungstenite::tungstenite::Error>(latency)
            })
        })
        .collect();
    let mut latency = Latency::default();
    for client in clients {
        let client = client.await.map_err(|e| fail(&e))?.map_err(|e| fail(&e))?;
        latency.merge(&client);
    }
    let elapsed = start.elapsed();
    server.abort();
    Ok(Throughput {
        what: format!(
            "WebSocket echo round trip, {message_bytes} B, {ECHO_CLIENTS} clients, loopback"
        ),
        per_sec: latency.count() as f64 / elapsed.as_secs_f64(),
        latency: latency.summary(),
    })
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn websocket_echo_round_trips() {
        let echo = websocket_echo(64, Duration::from_millis(300))
            .await
            .unwrap();
        assert!(echo.latency.count > 0);
        assert!(echo.per_sec > 0.0);
        assert!(echo.latency.p50_ms <= echo.latency.max_ms);
    }

    #[tokio::test]
    async fn jetstream_publishes_on_a_real_server() {
        let nats = parley_localstack::NatsServer::start(parley_localstack::NatsOptions {
            sync_always: false,
            ..Default::default()
        })
        .unwrap();
        let (published, consumed) = jetstream(&nats.url(), 64, Duration::from_millis(500))
            .await
            .unwrap();
        assert!(published.latency.count > 0);
        assert!(published.per_sec > 0.0);
        assert!(consumed.per_sec > 0.0);
    }
}
