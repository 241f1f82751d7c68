//! One simulated WebSocket client: a reader task that logs everything the gateway sends,
//! and a writer task that sends on the open-loop schedule.
//!
//! They are separate tasks because the gateway stops reading a socket with 32 commands in
//! flight: a writer blocked on that back-pressure must not stop acks and events from being
//! read, or the gateway would close the socket as a slow consumer.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use futures::stream::{SplitSink, SplitStream};
use futures::{SinkExt, StreamExt};
use parley_events::protocol::{ClientFrame, HttpError, ServerFrame};
use parley_events::{ClientMsgId, ConversationId, Event, UserId};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use tokio_util::sync::CancellationToken;

use crate::live::Live;
use crate::schedule::{self, Phase, SlotShare};

type Socket = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// Digits of the scheduled time at the start of every body.
const STAMP_DIGITS: usize = 20;

/// The frame that asks for a conversation, answered with an `ack` naming it.
#[derive(Debug, Clone)]
pub enum Create {
    Direct { peer: UserId },
    Group { members: Vec<UserId> },
}

/// A conversation created by a connection during set-up.
#[derive(Debug)]
pub struct Created {
    pub conversation_index: usize,
    pub result: Result<ConversationId, String>,
}

/// A slot, once its conversation exists.
#[derive(Debug, Clone)]
pub struct SendSlot {
    pub slot: usize,
    pub conversation: ConversationId,
    pub share: SlotShare,
}

pub enum Control {
    Create {
        conversation_index: usize,
        create: Create,
    },
    /// Send on the schedule, from `start_us` (microseconds since the run's origin).
    Start {
        slots: Vec<SendSlot>,
        phases: Arc<[Phase]>,
        start_us: u64,
        message_bytes: usize,
    },
}

/// What one connection saw, for the ledger.
#[derive(Debug, Default)]
pub struct ConnOutcome {
    /// `(conversation, seq, prev)` of every `event`, in arrival order.
    pub deliveries: Vec<(ConversationId, u64, u64)>,
    /// `(conversation, seq)` of every `ack` of a send.
    pub acks: Vec<(ConversationId, u64)>,
    pub sent: u64,
    /// The socket closed (or never opened) before the run ended.
    pub closed: bool,
}

/// Open the connection at `connect_at`, then serve it until `finish` is cancelled.
pub async fn run(
    live: Arc<Live>,
    url: String,
    connect_at: Instant,
    control: mpsc::Receiver<Control>,
    created: mpsc::UnboundedSender<Created>,
    finish: CancellationToken,
) -> ConnOutcome {
    tokio::time::sleep_until(connect_at.into()).await;
    let socket = match connect(&url).await {
        Ok(socket) => socket,
        Err(code) => {
            live.record_error(code);
            live.connect_failed.fetch_add(1, Ordering::Relaxed);
            return ConnOutcome {
                closed: true,
                ..ConnOutcome::default()
            };
        }
    };
    let (sink, mut stream) = socket.split();
    match tokio::time::timeout(Duration::from_secs(30), stream.next()).await {
        Ok(Some(Ok(Message::Text(text))))
            if matches!(
                serde_json::from_str::<ServerFrame>(&text),
                Ok(ServerFrame::Welcome { .. })
            ) =>
        {
            live.record_connect(
                live.now_us()
                    .saturating_sub(live.micros_since_origin(connect_at)),
            );
        }
        _ => {
            live.record_error("connect:no_welcome");
            live.connect_failed.fetch_add(1, Ordering::Relaxed);
            return ConnOutcome {
                closed: true,
                ..ConnOutcome::default()
            };
        }
    }
    let writer = tokio::spawn(write(Arc::clone(&live), sink, control, finish.clone()));
    let mut outcome = read(&live, stream, created, finish).await;
    match writer.await {
        Ok(sent) => outcome.sent = sent,
        Err(_) => {
            live.record_error("harness:writer_task_panicked");
            outcome.closed = true;
        }
    }
    outcome
}

async fn connect(url: &str) -> Result<Socket, String> {
    // A 4 KiB read buffer instead of tungstenite's 128 KiB: messages are small, and ten
    // thousand idle clients must not cost the harness over a gigabyte.
    let config = WebSocketConfig::default().read_buffer_size(4096);
    match tokio_tungstenite::connect_async_with_config(url, Some(config), true).await {
        Ok((socket, _)) => Ok(socket),
        Err(tungstenite::Error::Http(response)) => {
            let code = response
                .body()
                .as_deref()
                .and_then(|body| serde_json::from_slice::<HttpError>(body).ok())
                .map(|e| e.code.as_str().to_owned())
                .unwrap_or_else(|| response.status().as_u16().to_string());
            Err(format!("connect:{code}"))
        }
        Err(e) => Err(format!("connect:{}", error_kind(&e))),
    }
}

fn error_kind(e: &tungstenite::Error) -> String {
    match e {
        tungstenite::Error::ConnectionClosed | tungstenite::Error::AlreadyClosed => "closed".into(),
        tungstenite::Error::Io(e) => format!("io:{:?}", e.kind()),
        tungstenite::Error::Protocol(p) => format!("protocol:{p:?}"),
        tungstenite::Error::Capacity(_) => "capacity".into(),
        _ => "other".into(),
    }
}

async fn read(
    live: &Live,
    mut stream: SplitStream<Socket>,
    created: mpsc::UnboundedSender<Created>,
    finish: CancellationToken,
) -> ConnOutcome {
    let mut outcome = ConnOutcome::default();
    loop {
        let message = tokio::select! {
            biased;
            _ = finish.cancelled() => return outcome,
            message = stream.next() => message,
        };
        // Once the run is over the harness closes the sockets itself: how they end is not
        // the platform's doing.
        if finish.is_cancelled() {
            return outcome;
        }
        let text = match message {
            Some(Ok(Message::Text(text))) => text,
            Some(Ok(Message::Close(frame))) => {
                let code = frame.map_or(1005, |f| u16::from(f.code));
                live.record_error(format!("close:{code}"));
                outcome.closed = true;
                return outcome;
            }
            Some(Ok(_)) => continue,
            Some(Err(e)) => {
                live.record_error(format!("connection:{}", error_kind(&e)));
                outcome.closed = true;
                return outcome;
            }
            None => {
                live.record_error("connection:ended");
                outcome.closed = true;
                return outcome;
            }
        };
        let frame = match serde_json::from_str::<ServerFrame>(&text) {
            Ok(frame) => frame,
            Err(_) => {
                live.record_error("harness:unreadable_frame");
                continue;
            }
        };
        match frame {
            ServerFrame::Ack {
                id,
                conversation,
                seq,
                ..
            } => match RequestId::parse(id.as_str()) {
                Some(RequestId::Send { scheduled_us }) => {
                    live.record_ack(scheduled_us);
                    outcome.acks.push((conversation, seq));
                }
                Some(RequestId::Create { conversation_index }) => {
                    let _ = created.send(Created {
                        conversation_index,
                        result: Ok(conversation),
                    });
                }
                None => live.record_error("harness:unknown_ack"),
            },
            ServerFrame::Error { id, code, .. } => {
                live.record_error(format!("frame:{code}"));
                match id.as_ref().and_then(|id| RequestId::parse(id.as_str())) {
                    Some(RequestId::Send { .. }) => {
                        live.send_errors.fetch_add(1, Ordering::Relaxed);
                    }
                    Some(RequestId::Create { conversation_index }) => {
                        let _ = created.send(Created {
                            conversation_index,
                            result: Err(code.as_str().to_owned()),
                        });
                    }
                    None => {}
                }
            }
            ServerFrame::Event { event } => {
                outcome.deliveries.push((
                    event.envelope.conversation,
                    event.seq,
                    event.envelope.prev,
                ));
                match &event.envelope.event {
                    Event::MessagePosted(posted) => match read_stamp(&posted.body) {
                        Some(scheduled_us) => live.record_delivery(scheduled_us),
                        None => live.record_error("harness:unstamped_message"),
                    },
                    Event::ConversationCreated(_) => {
                        live.created_seen.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            _ => {}
        }
    }
}

async fn write(
    live: Arc<Live>,
    mut sink: SplitSink<Socket, Message>,
    mut control: mpsc::Receiver<Control>,
    finish: CancellationToken,
) -> u64 {
    let mut sent = 0;
    loop {
        let command = tokio::select! {
            _ = finish.cancelled() => break,
            command = control.recv() => command,
        };
        let frame = match command {
            None => break,
            Some(Control::Create {
                conversation_index,
                create,
            }) => {
                let id = RequestId::create_id(conversation_index);
                match create {
                    Create::Direct { peer } => ClientFrame::CreateDirect { id, peer },
                    Create::Group { members } => ClientFrame::CreateGroup {
                        id,
                        title: None,
                        members,
                    },
                }
            }
            Some(Control::Start {
                slots,
                phases,
                start_us,
                message_bytes,
            }) => {
                tokio::select! {
                    _ = finish.cancelled() => {}
                    () = send_scheduled(&live, &mut sink, &slots, &phases, start_us, message_bytes, &mut sent) => {}
                }
                continue;
            }
        };
        if let Err(e) = sink.send(Message::text(to_json(&frame))).await {
            live.record_error(format!("send:{}", error_kind(&e)));
        }
    }
    let _ = sink.close().await;
    sent
}

async fn send_scheduled(
    live: &Live,
    sink: &mut SplitSink<Socket, Message>,
    slots: &[SendSlot],
    phases: &[Phase],
    start_us: u64,
    message_bytes: usize,
    sent: &mut u64,
) {
    let mut due: Vec<_> = slots
        .iter()
        .map(|slot| {
            (
                slot,
                0u64,
                schedule::slot_times(slot.share, phases).peekable(),
            )
        })
        .collect();
    loop {
        let Some((slot, n, times)) = due
            .iter_mut()
            .filter_map(|entry| entry.2.peek().copied().map(|t| (t, entry)))
            .min_by_key(|(t, _)| *t)
            .map(|(_, entry)| entry)
        else {
            return;
        };
        let offset = times.next().expect("peeked");
        let scheduled_us = start_us + u64::try_from(offset.as_micros()).unwrap_or(u64::MAX);
        tokio::time::sleep_until(live.at(scheduled_us).into()).await;
        if live.sending_stopped() {
            return;
        }
        let frame = ClientFrame::Send {
            id: RequestId::send_id(slot.slot, *n, scheduled_us),
            conversation: slot.conversation,
            body: stamped_body(scheduled_us, message_bytes),
        };
        *n += 1;
        match sink.send(Message::text(to_json(&frame))).await {
            Ok(()) => {
                *sent += 1;
                live.sent.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                live.record_error(format!("send:{}", error_kind(&e)));
                return;
            }
        }
    }
}

fn to_json(frame: &ClientFrame) -> String {
    serde_json::to_string(frame).expect("a client frame always serializes")
}

/// What the harness encodes in its request ids, so that acks and errors can be attributed
/// without a shared lookup table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestId {
    /// `m<slot>-<n>-<scheduled µs>`
    Send { scheduled_us: u64 },
    /// `c<conversation index>`
    Create { conversation_index: usize },
}

impl RequestId {
    fn create_id(conversation_index: usize) -> ClientMsgId {
        ClientMsgId::parse(format!("c{conversation_index}")).expect("harness ids are valid")
    }

    fn send_id(slot: usize, n: u64, scheduled_us: u64) -> ClientMsgId {
        ClientMsgId::parse(format!("m{slot}-{n}-{scheduled_us}")).expect("harness ids are valid")
    }

    pub fn parse(id: &str) -> Option<RequestId> {
        if let Some(rest) = id.strip_prefix('m') {
            let scheduled_us = rest.rsplit('-').next()?.parse().ok()?;
            Some(RequestId::Send { scheduled_us })
        } else {
            let conversation_index = id.strip_prefix('c')?.parse().ok()?;
            Some(RequestId::Create { conversation_index })
        }
    }
}

/// A body of exactly `bytes` bytes that starts with the scheduled send time, so every
/// recipient can measure send -> delivery from the schedule.
pub fn stamped_body(scheduled_us: u64, bytes: usize) -> String {
    let mut body = format!("{scheduled_us:0width$}", width = STAMP_DIGITS);
    body.push(' ');
    while body.len() < bytes {
        body.push('x');
    }
    body
}

pub fn read_stamp(body: &str) -> Option<u64> {
    body.get(..STAMP_DIGITS)?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_ids_round_trip() {
        let id = RequestId::send_id(7, 42, 12_345_678);
        assert_eq!(id.as_str(), "m7-42-12345678");
        assert_eq!(
            RequestId::parse(id.as_str()),
            Some(RequestId::Send {
                scheduled_us: 12_345_678
            })
        );
        let id = RequestId::create_id(9);
        assert_eq!(
            RequestId::parse(id.as_str()),
            Some(RequestId::Create {
                conversation_index: 9
            })
        );
        assert_eq!(RequestId::parse("ready"), None);
        assert_eq!(RequestId::parse("mx-y"), None);
    }

    #[test]
    fn bodies_carry_their_schedule_and_have_the_asked_size() {
        let body = stamped_body(987_654_321, 128);
        assert_eq!(body.len(), 128);
        assert_eq!(read_stamp(&body), Some(987_654_321));
        assert_eq!(read_stamp("hello"), None);
    }
}
