//! One simulated WebSocket client: a reader task that logs everything the gateway sends (and
//! opens a new socket when it loses one), and a writer task that sends on the open-loop
//! schedule.
//!
//! They are separate tasks because the gateway stops reading a socket with 32 commands in
//! flight: a writer blocked on that back-pressure must not stop acks and events from being
//! read, or the gateway would close the socket as a slow consumer.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
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

use crate::ledger::{Content, SendKey};
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

/// One `event` frame as it arrived.
#[derive(Debug, Clone, Copy)]
pub struct Received {
    pub conversation: ConversationId,
    pub seq: u64,
    pub prev: u64,
    pub content: Content,
}

/// One `ack` of a send.
#[derive(Debug, Clone, Copy)]
pub struct Ack {
    pub key: SendKey,
    pub conversation: ConversationId,
    pub seq: u64,
    /// When it arrived, microseconds since the run's origin.
    pub at_us: u64,
}

/// What one connection saw, for the ledger.
#[derive(Debug, Default)]
pub struct ConnOutcome {
    /// Per socket opened, every `event` received on it, in arrival order. A socket the run
    /// ended while the client was reconnecting shows as a last, empty, session.
    pub sessions: Vec<Vec<Received>>,
    /// Every send that went out (or may have: a write that failed part way), in order.
    pub sent: Vec<(SendKey, ConversationId)>,
    pub acks: Vec<Ack>,
    /// `(send, code)` of every `error` answering a send.
    pub errors: Vec<(SendKey, String)>,
    /// The first socket never opened.
    pub closed: bool,
}

type Sink = SplitSink<Socket, Message>;
type Stream = SplitStream<Socket>;

/// Which socket is current, and what was sent and answered on it: when it dies, the sends it
/// left unanswered never will be, so the drain need not wait for them.
#[derive(Debug, Default)]
struct Sockets {
    current: usize,
    up: bool,
    sent: u64,
    answered: u64,
}

impl Sockets {
    fn opened(&mut self, session: usize) {
        *self = Sockets {
            current: session,
            up: true,
            sent: 0,
            answered: 0,
        };
    }

    fn sent_on(&mut self, session: usize, live: &Live) {
        if self.up && session == self.current {
            self.sent += 1;
        } else {
            live.abandoned.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn lost(&mut self, live: &Live) {
        if self.up {
            self.up = false;
            live.abandoned
                .fetch_add(self.sent.saturating_sub(self.answered), Ordering::Relaxed);
        }
    }
}

/// Open the connection at `connect_at` to `urls[first]`, then serve it until `finish` is
/// cancelled. A socket lost on the way is replaced: by one to the next gateway in `urls`
/// (the same one again when there is only one), retried until it opens.
pub async fn run(
    live: Arc<Live>,
    urls: Arc<[String]>,
    first: usize,
    connect_at: Instant,
    control: mpsc::Receiver<Control>,
    created: mpsc::UnboundedSender<Created>,
    finish: CancellationToken,
) -> ConnOutcome {
    tokio::time::sleep_until(connect_at.into()).await;
    let (sink, mut stream) = match open(&urls[first]).await {
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
    live.record_connect(
        live.now_us()
            .saturating_sub(live.micros_since_origin(connect_at)),
    );
    let sockets = Arc::new(Mutex::new(Sockets::default()));
    sockets.lock().unwrap().opened(0);
    let (sinks_tx, sinks_rx) = mpsc::channel(1);
    let _ = sinks_tx.send((0, sink)).await;
    let writer = tokio::spawn(write(
        Arc::clone(&live),
        sinks_rx,
        Arc::clone(&sockets),
        control,
        finish.clone(),
    ));
    let mut outcome = ConnOutcome::default();
    let mut session = 0;
    loop {
        outcome.sessions.push(Vec::new());
        read(&live, stream, &mut outcome, &created, &sockets, &finish).await;
        if finish.is_cancelled() {
            break;
        }
        sockets.lock().unwrap().lost(&live);
        match reconnect(&live, &urls, first + session + 1, &finish).await {
            Some((sink, next)) => {
                session += 1;
                sockets.lock().unwrap().opened(session);
                let _ = sinks_tx.send((session, sink)).await;
                stream = next;
            }
            None => {
                outcome.sessions.push(Vec::new());
                break;
            }
        }
    }
    drop(sinks_tx);
    match writer.await {
        Ok(sent) => outcome.sent = sent,
        Err(_) => {
            live.record_error("harness:writer_task_panicked");
            outcome.closed = true;
        }
    }
    outcome
}

/// Connect and wait for the `welcome`.
async fn open(url: &str) -> Result<(Sink, Stream), String> {
    let socket = connect(url).await?;
    let (sink, mut stream) = socket.split();
    match tokio::time::timeout(Duration::from_secs(30), stream.next()).await {
        Ok(Some(Ok(Message::Text(text))))
            if matches!(
                serde_json::from_str::<ServerFrame>(&text),
                Ok(ServerFrame::Welcome { .. })
            ) =>
        {
            Ok((sink, stream))
        }
        _ => Err("connect:no_welcome".to_owned()),
    }
}

/// Try the gateways in turn from `next`, waiting longer between rounds, until one lets the
/// client in or the run ends.
async fn reconnect(
    live: &Live,
    urls: &[String],
    next: usize,
    finish: &CancellationToken,
) -> Option<(Sink, Stream)> {
    let mut pause = Duration::from_millis(100);
    for attempt in next.. {
        let url = &urls[attempt % urls.len()];
        tokio::select! {
            _ = finish.cancelled() => return None,
            opened = open(url) => match opened {
                Ok(socket) => {
                    live.reconnects.fetch_add(1, Ordering::Relaxed);
                    return Some(socket);
                }
                Err(code) => live.record_error(format!("re{code}")),
            },
        }
        tokio::select! {
            _ = finish.cancelled() => return None,
            () = tokio::time::sleep(pause) => {}
        }
        pause = (pause * 2).min(Duration::from_secs(1));
    }
    None
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

/// Read one socket until the run ends or the socket is lost, logging into the outcome's
/// last session.
async fn read(
    live: &Live,
    mut stream: Stream,
    outcome: &mut ConnOutcome,
    created: &mpsc::UnboundedSender<Created>,
    sockets: &Mutex<Sockets>,
    finish: &CancellationToken,
) {
    loop {
        let message = tokio::select! {
            biased;
            _ = finish.cancelled() => return,
            message = stream.next() => message,
        };
        // Once the run is over the harness closes the sockets itself: how they end is not
        // the platform's doing.
        if finish.is_cancelled() {
            return;
        }
        let text = match message {
            Some(Ok(Message::Text(text))) => text,
            Some(Ok(Message::Close(frame))) => {
                let code = frame.map_or(1005, |f| u16::from(f.code));
                live.record_error(format!("close:{code}"));
                return;
            }
            Some(Ok(_)) => continue,
            Some(Err(e)) => {
                live.record_error(format!("connection:{}", error_kind(&e)));
                return;
            }
            None => {
                live.record_error("connection:ended");
                return;
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
                Some(RequestId::Send { key, scheduled_us }) => {
                    live.record_ack(scheduled_us);
                    sockets.lock().unwrap().answered += 1;
                    outcome.acks.push(Ack {
                        key,
                        conversation,
                        seq,
                        at_us: live.now_us(),
                    });
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
                    Some(RequestId::Send { key, .. }) => {
                        live.send_errors.fetch_add(1, Ordering::Relaxed);
                        sockets.lock().unwrap().answered += 1;
                        outcome.errors.push((key, code.as_str().to_owned()));
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
                let content = Content::of(&event.envelope.event);
                if let Some(session) = outcome.sessions.last_mut() {
                    session.push(Received {
                        conversation: event.envelope.conversation,
                        seq: event.seq,
                        prev: event.envelope.prev,
                        content,
                    });
                }
                match &event.envelope.event {
                    Event::MessagePosted(posted) => match read_stamp(&posted.body) {
                        Some(scheduled_us) => live.record_delivery(scheduled_us),
                        None => live.record_error("harness:unstamped_message"),
                    },
                    Event::ConversationCreated(_) => {
                        live.created_seen.fetch_add(1, Ordering::Relaxed);
                    }
                    // The ledger counts it as foreign; nothing to time.
                    Event::ConversationRead(_) => {}
                }
            }
            _ => {}
        }
    }
}

/// The socket the writer writes to, and its session number.
struct Writing {
    session: usize,
    sink: Sink,
    sinks: mpsc::Receiver<(usize, Sink)>,
}

impl Writing {
    /// Switch to the newest socket the reader opened, if any.
    fn catch_up(&mut self) {
        while let Ok((session, sink)) = self.sinks.try_recv() {
            self.session = session;
            self.sink = sink;
        }
    }

    /// Wait for a socket newer than this one; `false` when there will be none.
    async fn next_socket(&mut self) -> bool {
        match self.sinks.recv().await {
            Some((session, sink)) => {
                self.session = session;
                self.sink = sink;
                true
            }
            None => false,
        }
    }
}

async fn write(
    live: Arc<Live>,
    mut sinks: mpsc::Receiver<(usize, Sink)>,
    sockets: Arc<Mutex<Sockets>>,
    mut control: mpsc::Receiver<Control>,
    finish: CancellationToken,
) -> Vec<(SendKey, ConversationId)> {
    let mut sent = Vec::new();
    let Some((session, sink)) = sinks.recv().await else {
        return sent;
    };
    let mut writing = Writing {
        session,
        sink,
        sinks,
    };
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
                let schedule = Schedule {
                    slots: &slots,
                    phases: &phases,
                    start_us,
                    message_bytes,
                };
                tokio::select! {
                    _ = finish.cancelled() => {}
                    () = send_scheduled(&live, &mut writing, &sockets, schedule, &mut sent) => {}
                }
                continue;
            }
        };
        writing.catch_up();
        if let Err(e) = writing.sink.send(Message::text(to_json(&frame))).await {
            live.record_error(format!("send:{}", error_kind(&e)));
        }
    }
    let _ = writing.sink.close().await;
    sent
}

struct Schedule<'a> {
    slots: &'a [SendSlot],
    phases: &'a [Phase],
    start_us: u64,
    message_bytes: usize,
}

async fn send_scheduled(
    live: &Live,
    writing: &mut Writing,
    sockets: &Mutex<Sockets>,
    schedule: Schedule<'_>,
    sent: &mut Vec<(SendKey, ConversationId)>,
) {
    let mut due: Vec<_> = schedule
        .slots
        .iter()
        .map(|slot| {
            (
                slot,
                0u32,
                schedule::slot_times(slot.share, schedule.phases).peekable(),
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
        let scheduled_us =
            schedule.start_us + u64::try_from(offset.as_micros()).unwrap_or(u64::MAX);
        tokio::time::sleep_until(live.at(scheduled_us).into()).await;
        if live.sending_stopped() {
            return;
        }
        let key = SendKey {
            slot: u32::try_from(slot.slot).expect("fewer than 2^32 slots"),
            n: *n,
        };
        let frame = ClientFrame::Send {
            id: RequestId::send_id(key, scheduled_us),
            conversation: slot.conversation,
            body: stamped_body(scheduled_us, schedule.message_bytes),
        };
        *n += 1;
        writing.catch_up();
        // Counted before it goes: a write that fails part way may still have reached the
        // gateway, and the log check will say.
        sent.push((key, slot.conversation));
        live.sent.fetch_add(1, Ordering::Relaxed);
        match writing.sink.send(Message::text(to_json(&frame))).await {
            Ok(()) => sockets.lock().unwrap().sent_on(writing.session, live),
            Err(e) => {
                live.record_error(format!("send:{}", error_kind(&e)));
                live.abandoned.fetch_add(1, Ordering::Relaxed);
                // The reader is reconnecting; later sends wait for its new socket (and
                // count from their scheduled time).
                if !writing.next_socket().await {
                    return;
                }
            }
        }
    }
}

fn to_json(frame: &ClientFrame) -> String {
    serde_json::to_string(frame).expect("a client frame always serializes")
}

/// What the harness encodes in its request ids, so that acks, errors and events can be
/// attributed without a shared lookup table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestId {
    /// `m<slot>-<n>-<scheduled µs>`
    Send { key: SendKey, scheduled_us: u64 },
    /// `c<conversation index>`
    Create { conversation_index: usize },
}

impl RequestId {
    fn create_id(conversation_index: usize) -> ClientMsgId {
        ClientMsgId::parse(format!("c{conversation_index}")).expect("harness ids are valid")
    }

    fn send_id(key: SendKey, scheduled_us: u64) -> ClientMsgId {
        ClientMsgId::parse(format!("m{}-{}-{scheduled_us}", key.slot, key.n))
            .expect("harness ids are valid")
    }

    pub fn parse(id: &str) -> Option<RequestId> {
        if let Some(rest) = id.strip_prefix('m') {
            let mut parts = rest.splitn(3, '-');
            let slot = parts.next()?.parse().ok()?;
            let n = parts.next()?.parse().ok()?;
            let scheduled_us = parts.next()?.parse().ok()?;
            Some(RequestId::Send {
                key: SendKey { slot, n },
                scheduled_us,
            })
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
        let key = SendKey { slot: 7, n: 42 };
        let id = RequestId::send_id(key, 12_345_678);
        assert_eq!(id.as_str(), "m7-42-12345678");
        assert_eq!(
            RequestId::parse(id.as_str()),
            Some(RequestId::Send {
                key,
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
        assert_eq!(RequestId::parse("m1-2"), None);
    }

    #[test]
    fn bodies_carry_their_schedule_and_have_the_asked_size() {
        let body = stamped_body(987_654_321, 128);
        assert_eq!(body.len(), 128);
        assert_eq!(read_stamp(&body), Some(987_654_321));
        assert_eq!(read_stamp("hello"), None);
    }
}
