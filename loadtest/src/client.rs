//! One simulated device: a reader task that logs everything the gateway sends (and opens a
//! new socket when it loses one, or drops one when the run tells it to), and a writer task
//! that sends on the open-loop schedule.
//!
//! They are separate tasks because the gateway stops reading a socket with 32 commands in
//! flight: a writer blocked on that back-pressure must not stop acks and events from being
//! read, or the gateway would close the socket as a slow consumer.
//!
//! Every socket speaks protocol 2 and starts with `resume` (docs/protocol.md, "Resume"): the
//! device keeps its cursor and the last sequence of each conversation it received an event in
//! since, across its sockets, so a reconnect delivers exactly what it missed.

use std::borrow::Cow;
use std::collections::{BTreeMap, HashSet};
use std::net::{Ipv4Addr, SocketAddr};
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::stream::{SplitSink, SplitStream};
use futures::{SinkExt, StreamExt};
use parley_events::protocol::{
    ClientFrame, HttpError, ResumeCursor, ResumeState, ServerFrame, is_packed, unpack_frames,
};
use parley_events::{ClientMsgId, ConversationId, UserId};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::{mpsc, watch};
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
/// How long a socket may take to say `welcome`, and then each frame of a resume.
const FRAME_WAIT: Duration = Duration::from_secs(30);
/// Pause before asking again when a resume is refused as `unavailable`, and how many times.
const RESUME_RETRY: Duration = Duration::from_millis(250);
const RESUME_ATTEMPTS: u32 = 40;

/// The frame that asks for a conversation, answered with an `ack` naming it.
#[derive(Debug, Clone)]
pub enum Create {
    Direct { peer: UserId },
    Group { members: Vec<UserId> },
}

/// The answer to a set-up request: a conversation's creation (`batch` 0) or one of the
/// additions of members after it (`batch` 1 on), with the sequence of the event it appended.
#[derive(Debug)]
pub struct Created {
    pub conversation_index: usize,
    pub batch: u32,
    pub result: Result<(ConversationId, u64), String>,
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
    /// Add `users` to the group, as the `batch`-th addition of its set-up.
    Add {
        conversation_index: usize,
        batch: u32,
        conversation: ConversationId,
        users: Vec<UserId>,
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
    /// Sent by a resume (before its `resumed`), not on the live path.
    pub resumed: bool,
}

/// The harness's messages among `session`'s events.
pub fn messages_in(session: &[Received]) -> u64 {
    session
        .iter()
        .filter(|r| matches!(r.content, Content::Message(_)))
        .count() as u64
}

/// One resume of a socket: its `resume` frames and what they brought.
#[derive(Debug, Clone, Copy)]
pub struct ResumeRecord {
    /// Microseconds since the run's origin, from the first `resume` to the last `resumed`.
    pub start_us: u64,
    pub end_us: u64,
    /// `resume` frames sent: one, plus one per round that followed `more`.
    pub frames: u32,
    pub events: u64,
    /// The socket it resumed was dropped for an outage (see [`Disconnect::down`]).
    pub after_outage: bool,
}

/// How the run tells a device to drop its socket.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Disconnect {
    /// With a close frame (and waiting for the gateway's), or by cutting the TCP
    /// connection without one (the gateway sees 1006).
    pub clean: bool,
    /// How long to stay away before reconnecting (the backoff comes on top).
    pub down: Duration,
}

/// Exponential backoff with full jitter: before reconnect attempt `n` (from 0) a random
/// pause between zero and `min(cap, base * 2^n)`, so clients that lost their sockets together
/// do not come back together.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Backoff {
    pub base: Duration,
    pub cap: Duration,
}

impl Backoff {
    pub fn pause(&self, attempt: u32) -> Duration {
        let ceiling = self.base.saturating_mul(1 << attempt.min(20)).min(self.cap);
        ceiling.mul_f64(fastrand::f64())
    }
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
    /// The gateway (its index in the run's URLs) each session's socket was opened to.
    pub gateways: Vec<usize>,
    /// Every send that went out (or may have: a write that failed part way), in order.
    pub sent: Vec<(SendKey, ConversationId)>,
    pub acks: Vec<Ack>,
    /// `(send, code)` of every `error` answering a send.
    pub errors: Vec<(SendKey, String)>,
    pub resumes: Vec<ResumeRecord>,
    /// The first socket never opened.
    pub closed: bool,
}

/// The write half of a socket, shared by the writer (sends) and the reader (a clean drop's
/// close frame).
type Sink = Arc<tokio::sync::Mutex<SplitSink<Socket, Message>>>;
type Stream = SplitStream<Socket>;

/// Which socket is current, and what was sent and answered on it: when it dies, the sends it
/// left unanswered never will be, so the drain need not wait for them.
#[derive(Debug, Default)]
struct Sockets {
    current: usize,
    up: bool,
    sent: u64,
    answered: u64,
    /// The last socket the run told the device to drop: a write failing on it is no error
    /// of the platform's.
    dropped: Option<usize>,
}

impl Sockets {
    fn opened(&mut self, session: usize) {
        *self = Sockets {
            current: session,
            up: true,
            sent: 0,
            answered: 0,
            dropped: self.dropped,
        };
    }

    /// Count a failed write on `session` as an error, unless the device dropped it.
    fn write_failed(&self, session: usize, live: &Live, e: &tungstenite::Error) {
        if self.dropped != Some(session) {
            live.record_error(format!("send:{}", error_kind(e)));
        }
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

/// Where the device stands in the log, kept across its sockets: what its next `resume` says.
#[derive(Debug, Default)]
struct Position {
    /// The `cursor` of the last first-round `resumed`.
    cursor: Option<ResumeCursor>,
    /// The last sequence of every conversation the device received an event in since that
    /// cursor was issued, and of those still `more`.
    since_cursor: BTreeMap<ConversationId, u64>,
    /// Every conversation the device has received an event of.
    joined: HashSet<ConversationId>,
}

/// One open socket: its halves, and a second handle on its TCP connection to cut it with.
struct Wire {
    sink: Sink,
    stream: Stream,
    tcp: Option<std::net::TcpStream>,
    /// When its `welcome` arrived (before the resume).
    welcomed: Instant,
}

/// What a device is given to connect with.
pub struct Device {
    pub live: Arc<Live>,
    /// The gateways' URLs (token included); the first socket goes to `urls[first]`.
    pub urls: Arc<[String]>,
    pub first: usize,
    pub connect_at: Instant,
    pub backoff: Backoff,
    /// Whether the run may cut its sockets without a close frame: each then keeps a second
    /// handle on its TCP connection (a second open file) to cut it with.
    pub cuts: bool,
}

/// Open the connection at `connect_at` to `urls[first]` and resume, then serve it until
/// `finish` is cancelled. A socket lost on the way (or dropped as `disconnects` says) is
/// replaced after a backoff: by one to another gateway in `urls`, picked at random (the same
/// one again when there is only one), retried until it opens, and resumed.
pub async fn run(
    device: Device,
    control: mpsc::Receiver<Control>,
    created: mpsc::UnboundedSender<Created>,
    mut disconnects: mpsc::Receiver<Disconnect>,
    finish: CancellationToken,
) -> ConnOutcome {
    let Device {
        live,
        urls,
        first,
        connect_at,
        backoff,
        cuts,
    } = device;
    tokio::time::sleep_until(connect_at.into()).await;
    let mut outcome = ConnOutcome::default();
    let mut position = Position::default();
    let mut wire = match open(
        &live,
        (first, &urls[first]),
        &mut position,
        &mut outcome,
        false,
        cuts,
    )
    .await
    {
        Ok(wire) => wire,
        Err(code) => {
            live.record_error(code);
            live.connect_failed.fetch_add(1, Ordering::Relaxed);
            outcome.closed = true;
            return outcome;
        }
    };
    live.record_connect(
        live.micros_since_origin(wire.welcomed)
            .saturating_sub(live.micros_since_origin(connect_at)),
    );
    let sockets = Arc::new(Mutex::new(Sockets::default()));
    sockets.lock().unwrap().opened(0);
    let (sinks_tx, sinks_rx) = watch::channel((0, Arc::clone(&wire.sink)));
    let writer = tokio::spawn(write(
        Arc::clone(&live),
        sinks_rx,
        Arc::clone(&sockets),
        control,
        finish.clone(),
    ));
    let mut session = 0;
    loop {
        let down = read(
            &live,
            wire,
            &mut outcome,
            &mut position,
            &created,
            &sockets,
            &mut disconnects,
            &finish,
        )
        .await;
        if finish.is_cancelled() {
            break;
        }
        sockets.lock().unwrap().lost(&live);
        live.down.fetch_add(1, Ordering::Relaxed);
        // Any gateway but the one just lost, picked at random as a load balancer would: the
        // sockets of a gateway that went away spread over all the others.
        let current = outcome.gateways.last().copied().unwrap_or(first);
        let reconnect = Reconnect {
            urls: &urls,
            next: current + 1 + fastrand::usize(..urls.len().saturating_sub(1).max(1)),
            down,
            backoff,
            cuts,
        };
        match reconnect
            .run(&live, &mut position, &mut outcome, &finish)
            .await
        {
            Some(next) => {
                live.down.fetch_sub(1, Ordering::Relaxed);
                session += 1;
                sockets.lock().unwrap().opened(session);
                sinks_tx.send_replace((session, Arc::clone(&next.sink)));
                wire = next;
            }
            None => break,
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

/// Connect, wait for the `welcome`, and resume from `position`. The socket's deliveries go
/// to a new session of `outcome`, also when it fails part way through the resume.
async fn open(
    live: &Live,
    (gateway, url): (usize, &str),
    position: &mut Position,
    outcome: &mut ConnOutcome,
    after_outage: bool,
    cuts: bool,
) -> Result<Wire, String> {
    let socket = connect(url).await?;
    let tcp = cuts
        .then(|| socket.get_ref().get_ref().as_fd().try_clone_to_owned().ok())
        .flatten()
        .map(std::net::TcpStream::from);
    let (sink, mut stream) = socket.split();
    let mut sink = Arc::new(tokio::sync::Mutex::new(sink));
    match tokio::time::timeout(FRAME_WAIT, stream.next()).await {
        Ok(Some(Ok(Message::Text(text))))
            if matches!(
                serde_json::from_str::<ServerFrame>(&text),
                Ok(ServerFrame::Welcome { .. })
            ) => {}
        _ => return Err("connect:no_welcome".to_owned()),
    }
    let welcomed = Instant::now();
    outcome.sessions.push(Vec::new());
    outcome.gateways.push(gateway);
    let record = resume(live, &mut sink, &mut stream, position, outcome).await?;
    outcome.resumes.push(ResumeRecord {
        after_outage,
        ..record
    });
    Ok(Wire {
        sink,
        stream,
        tcp,
        welcomed,
    })
}

/// Send `resume` from `position` and read its events up to `resumed`; follow every `more`
/// with another `resume` naming those conversations, until all are live.
async fn resume(
    live: &Live,
    sink: &mut Sink,
    stream: &mut Stream,
    position: &mut Position,
    outcome: &mut ConnOutcome,
) -> Result<ResumeRecord, String> {
    let mut record = ResumeRecord {
        start_us: live.now_us(),
        end_us: 0,
        frames: 0,
        events: 0,
        after_outage: false,
    };
    // The first round names the cursor and every conversation touched since; later rounds
    // only the conversations still `more` (the gateway ignores their cursor).
    let mut cursor = position.cursor;
    let mut named = position.since_cursor.clone();
    let mut refused = 0;
    loop {
        let first_round = record.frames == 0;
        let id = RequestId::resume_id(record.frames);
        let frame = ClientFrame::Resume {
            id: id.clone(),
            cursor,
            conversations: named.clone(),
        };
        sink.lock()
            .await
            .send(Message::text(to_json(&frame)))
            .await
            .map_err(|e| format!("connection:{}", error_kind(&e)))?;
        record.frames += 1;
        live.resume_frames.fetch_add(1, Ordering::Relaxed);
        let outcome_of_round = loop {
            let text = match tokio::time::timeout(FRAME_WAIT, stream.next()).await {
                Ok(Some(Ok(Message::Text(text)))) => text,
                Ok(Some(Ok(Message::Close(frame)))) => {
                    return Err(format!(
                        "close:{}",
                        frame.map_or(1005, |f| u16::from(f.code))
                    ));
                }
                Ok(Some(Ok(_))) => continue,
                Ok(Some(Err(e))) => return Err(format!("connection:{}", error_kind(&e))),
                Ok(None) => return Err("connection:ended".to_owned()),
                Err(_) => return Err("harness:resume_timed_out".to_owned()),
            };
            if let Some(events) = deliver_events(live, outcome, position, &text, true) {
                record.events += events;
                live.resumed_events.fetch_add(events, Ordering::Relaxed);
                continue;
            }
            match serde_json::from_str::<ServerFrame>(&text) {
                Ok(ServerFrame::Resumed {
                    id: answered,
                    cursor: reached,
                    conversations,
                    ..
                }) if answered == id => break Ok((reached, conversations)),
                Ok(ServerFrame::Error {
                    id: Some(answered),
                    code,
                    retryable,
                    ..
                }) if answered == id => break Err((code, retryable)),
                Ok(_) => live.record_error("harness:unexpected_frame_in_resume"),
                Err(_) => live.record_error("harness:unreadable_frame"),
            }
        };
        let (reached, statuses) = match outcome_of_round {
            Ok(answer) => answer,
            Err((code, retryable)) => {
                live.record_error(format!("frame:{code}"));
                refused += 1;
                if !retryable || refused >= RESUME_ATTEMPTS {
                    return Err(format!("resume:{code}"));
                }
                tokio::time::sleep(RESUME_RETRY).await;
                continue;
            }
        };
        let mut more = BTreeMap::new();
        for status in statuses {
            match status.state {
                ResumeState::More => {
                    more.insert(status.conversation, status.seq);
                }
                ResumeState::Live => {}
                // The harness's log keeps everything and its devices name only their own
                // conversations: either state means the resume went wrong.
                ResumeState::Truncated => live.record_error("resume:truncated"),
                ResumeState::NotMember => live.record_error("resume:not_member"),
            }
        }
        if first_round {
            // Everything up to the new cursor was sent, except what is still `more`.
            position.cursor = Some(reached);
            position.since_cursor = more.clone();
        } else {
            position.since_cursor.extend(more.iter());
        }
        if more.is_empty() {
            record.end_us = live.now_us();
            return Ok(record);
        }
        live.more_rounds.fetch_add(1, Ordering::Relaxed);
        cursor = None;
        named = more;
    }
}

/// The part of an `event` frame the harness reads: where the event sits, what it is, and
/// for a message its client id and body, borrowed from the frame. A fan-out run receives
/// every message once per member, so the receive path parses no more than this.
#[derive(Debug, serde::Deserialize)]
struct EventFrame<'a> {
    #[serde(borrow)]
    event: EventView<'a>,
}

#[derive(Debug, serde::Deserialize)]
struct EventView<'a> {
    seq: u64,
    prev: u64,
    conversation: ConversationId,
    #[serde(rename = "type", borrow)]
    type_name: Cow<'a, str>,
    #[serde(borrow, default)]
    data: DataView<'a>,
}

#[derive(Debug, Default, serde::Deserialize)]
struct DataView<'a> {
    #[serde(borrow, default)]
    client_id: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    body: Option<Cow<'a, str>>,
}

/// The frame's event, when it is an `event` frame.
fn event_view(text: &str) -> Option<Result<EventView<'_>, serde_json::Error>> {
    is_event_frame(text).then(|| serde_json::from_str::<EventFrame>(text).map(|frame| frame.event))
}

/// Whether `text` is an `event` frame (the server writes the `type` first).
fn is_event_frame(text: &str) -> bool {
    text.starts_with(r#"{"type":"event","#)
}

/// Deliver the events in a message from the gateway, an `event` frame or a packed message
/// (`pack=1`); how many, or `None` when it is neither. A packed message holds pushes only: an
/// answer to a request in it is the gateway's error.
fn deliver_events(
    live: &Live,
    outcome: &mut ConnOutcome,
    position: &mut Position,
    text: &str,
    resumed: bool,
) -> Option<u64> {
    let packed;
    let frames: &[&str] = if is_packed(text) {
        let Ok(frames) = unpack_frames(text) else {
            live.record_error("harness:unreadable_frame");
            return Some(0);
        };
        packed = frames;
        &packed
    } else if is_event_frame(text) {
        std::slice::from_ref(&text)
    } else {
        return None;
    };
    let mut events = 0;
    for &frame in frames {
        match event_view(frame) {
            Some(Ok(event)) => {
                events += 1;
                deliver(live, outcome, position, &event, resumed);
            }
            Some(Err(_)) => live.record_error("harness:unreadable_frame"),
            None => {
                if matches!(
                    serde_json::from_str::<ServerFrame>(frame),
                    Ok(ServerFrame::Ack { .. }
                        | ServerFrame::Error { .. }
                        | ServerFrame::Resumed { .. })
                ) {
                    live.record_error("harness:answer_in_pack");
                }
            }
        }
    }
    Some(events)
}

/// Log an `event` frame's event into the outcome's last session and the device's position.
fn deliver(
    live: &Live,
    outcome: &mut ConnOutcome,
    position: &mut Position,
    event: &EventView,
    resumed: bool,
) {
    let conversation = event.conversation;
    position.since_cursor.insert(conversation, event.seq);
    // A device's first event of a conversation is the one that made its user a member.
    if position.joined.insert(conversation) {
        live.joined_seen.fetch_add(1, Ordering::Relaxed);
    }
    let content = Content::classify(&event.type_name, event.data.client_id.as_deref());
    if let Some(session) = outcome.sessions.last_mut() {
        session.push(Received {
            conversation,
            seq: event.seq,
            prev: event.prev,
            content,
            resumed,
        });
    }
    match content {
        Content::Message(_) => match event.data.body.as_deref().and_then(read_stamp) {
            // Latency is the live path's: a resumed message waited for its device to come back.
            Some(scheduled_us) if !resumed => live.record_delivery(scheduled_us),
            Some(_) => {
                live.delivered.fetch_add(1, Ordering::Relaxed);
            }
            None => live.record_error("harness:unstamped_message"),
        },
        // The ledger counts the others as foreign; nothing to time.
        Content::Created | Content::Joined | Content::Foreign => {}
    }
}

/// Replacing a lost socket.
struct Reconnect<'a> {
    urls: &'a [String],
    /// The gateway to try first; later attempts move on through `urls`.
    next: usize,
    /// Stay away this long first (a planned outage).
    down: Duration,
    backoff: Backoff,
    cuts: bool,
}

impl Reconnect<'_> {
    /// Try the gateways in turn, pausing by the backoff before each attempt, until one lets
    /// the device in and it resumed, or the run ends.
    async fn run(
        &self,
        live: &Live,
        position: &mut Position,
        outcome: &mut ConnOutcome,
        finish: &CancellationToken,
    ) -> Option<Wire> {
        let outage = !self.down.is_zero();
        tokio::select! {
            _ = finish.cancelled() => return None,
            () = tokio::time::sleep(self.down) => {}
        }
        for attempt in 0.. {
            tokio::select! {
                _ = finish.cancelled() => return None,
                () = tokio::time::sleep(self.backoff.pause(attempt)) => {}
            }
            let gateway = (self.next + attempt as usize) % self.urls.len();
            let url = (gateway, self.urls[gateway].as_str());
            tokio::select! {
                _ = finish.cancelled() => return None,
                opened = open(live, url, position, outcome, outage, self.cuts) => match opened {
                    Ok(wire) => {
                        live.reconnects.fetch_add(1, Ordering::Relaxed);
                        return Some(wire);
                    }
                    Err(code) => live.record_error(format!("reconnect:{code}")),
                },
            }
        }
        None
    }
}

/// Loopback source addresses the harness spreads its connections to a gateway on the same
/// machine over. One address has ~28,000 ephemeral ports, and Linux's search for a free one
/// slows once half of them are taken: from 127.0.0.1 alone, 18,000 connects at 1,000/s took
/// seconds (p90 1.8-4.4 s) where 10,000 took milliseconds.
const LOOPBACK_SOURCES: u8 = 16;

async fn connect(url: &str) -> Result<Socket, String> {
    // A 4 KiB read buffer instead of tungstenite's 128 KiB: messages are small, and ten
    // thousand idle clients must not cost the harness over a gigabyte.
    let config = WebSocketConfig::default().read_buffer_size(4096);
    let connected = match loopback_gateway(url) {
        Some(gateway) => match connect_from_loopback(gateway).await {
            Ok(tcp) => {
                tokio_tungstenite::client_async_with_config(
                    url,
                    MaybeTlsStream::Plain(tcp),
                    Some(config),
                )
                .await
            }
            Err(e) => Err(tungstenite::Error::Io(e)),
        },
        None => tokio_tungstenite::connect_async_with_config(url, Some(config), true).await,
    };
    match connected {
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

/// The gateway's address when `url` is a plain `ws://` URL to an IPv4 loopback address.
fn loopback_gateway(url: &str) -> Option<SocketAddr> {
    let uri: tungstenite::http::Uri = url.parse().ok()?;
    if uri.scheme_str() != Some("ws") {
        return None;
    }
    let ip: Ipv4Addr = uri.host()?.parse().ok()?;
    ip.is_loopback()
        .then(|| SocketAddr::from((ip, uri.port_u16().unwrap_or(80))))
}

/// Connect with Nagle off from the next of the [`LOOPBACK_SOURCES`] addresses, in turn.
async fn connect_from_loopback(gateway: SocketAddr) -> std::io::Result<TcpStream> {
    static NEXT: AtomicU8 = AtomicU8::new(0);
    let source = Ipv4Addr::new(
        127,
        0,
        0,
        1 + NEXT.fetch_add(1, Ordering::Relaxed) % LOOPBACK_SOURCES,
    );
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::from((source, 0)))?;
    let tcp = socket.connect(gateway).await?;
    tcp.set_nodelay(true)?;
    Ok(tcp)
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

/// Read one socket until the run ends, the socket is lost, or the run told the device to
/// drop it; how long to stay away before reconnecting (zero unless told otherwise).
#[allow(clippy::too_many_arguments)]
async fn read(
    live: &Live,
    wire: Wire,
    outcome: &mut ConnOutcome,
    position: &mut Position,
    created: &mpsc::UnboundedSender<Created>,
    sockets: &Mutex<Sockets>,
    disconnects: &mut mpsc::Receiver<Disconnect>,
    finish: &CancellationToken,
) -> Duration {
    let Wire {
        sink,
        mut stream,
        tcp,
        ..
    } = wire;
    // An order to drop that came while the device was away is stale.
    while disconnects.try_recv().is_ok() {}
    let mut dropping: Option<Disconnect> = None;
    let mut orders_open = true;
    loop {
        let message = tokio::select! {
            biased;
            _ = finish.cancelled() => return Duration::ZERO,
            order = disconnects.recv(), if orders_open && dropping.is_none() => {
                match order {
                    Some(order) => {
                        {
                            let mut sockets = sockets.lock().unwrap();
                            sockets.dropped = Some(sockets.current);
                        }
                        cut(live, order, &sink, tcp.as_ref());
                        dropping = Some(order);
                    }
                    None => orders_open = false,
                }
                continue;
            }
            message = stream.next() => message,
        };
        // Once the run is over the harness closes the sockets itself: how they end is not
        // the platform's doing; nor is the end of a socket the device dropped.
        if finish.is_cancelled() {
            return Duration::ZERO;
        }
        let ended = |what: String| {
            if dropping.is_none() {
                live.record_error(what);
            }
            dropping.map_or(Duration::ZERO, |order| order.down)
        };
        let text = match message {
            Some(Ok(Message::Text(text))) => text,
            Some(Ok(Message::Close(frame))) => {
                let code = frame.map_or(1005, |f| u16::from(f.code));
                return ended(format!("close:{code}"));
            }
            Some(Ok(_)) => continue,
            Some(Err(e)) => return ended(format!("connection:{}", error_kind(&e))),
            None => return ended("connection:ended".to_owned()),
        };
        if deliver_events(live, outcome, position, &text, false).is_some() {
            continue;
        }
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
                Some(RequestId::Create {
                    conversation_index,
                    batch,
                }) => {
                    let _ = created.send(Created {
                        conversation_index,
                        batch,
                        result: Ok((conversation, seq)),
                    });
                }
                _ => live.record_error("harness:unknown_ack"),
            },
            ServerFrame::Error { id, code, .. } => {
                live.record_error(format!("frame:{code}"));
                match id.as_ref().and_then(|id| RequestId::parse(id.as_str())) {
                    Some(RequestId::Send { key, .. }) => {
                        live.send_errors.fetch_add(1, Ordering::Relaxed);
                        sockets.lock().unwrap().answered += 1;
                        outcome.errors.push((key, code.as_str().to_owned()));
                    }
                    Some(RequestId::Create {
                        conversation_index,
                        batch,
                    }) => {
                        let _ = created.send(Created {
                            conversation_index,
                            batch,
                            result: Err(code.as_str().to_owned()),
                        });
                    }
                    _ => {}
                }
            }
            _ => {}
        }
    }
}

/// Drop the socket as `order` says: a close frame (sent off the reader, which goes on
/// reading until the gateway's answer), or the TCP connection shut down under both halves.
fn cut(live: &Live, order: Disconnect, sink: &Sink, tcp: Option<&std::net::TcpStream>) {
    if order.clean {
        live.drops_clean.fetch_add(1, Ordering::Relaxed);
        let sink = Arc::clone(sink);
        tokio::spawn(async move {
            let _ = sink.lock().await.close().await;
        });
    } else {
        live.drops_abrupt.fetch_add(1, Ordering::Relaxed);
        if let Some(tcp) = tcp {
            let _ = tcp.shutdown(std::net::Shutdown::Both);
        }
    }
}

/// The newest socket the reader opened, and its session number. A watch, not a queue: a
/// writer that has nothing to send (a silent device) never takes the sockets, and the
/// reader must never wait for it to.
type Latest = watch::Receiver<(usize, Sink)>;

/// The socket the writer last wrote to.
struct Writing {
    session: usize,
    sockets: Latest,
}

impl Writing {
    /// Send on the newest socket; its session goes to `self.session`.
    async fn send(&mut self, frame: &ClientFrame) -> Result<(), tungstenite::Error> {
        let (session, sink) = self.sockets.borrow_and_update().clone();
        self.session = session;
        sink.lock().await.send(Message::text(to_json(frame))).await
    }

    /// Wait for a socket newer than the last one written to; `false` when there will be none.
    async fn next_socket(&mut self) -> bool {
        self.sockets.changed().await.is_ok()
    }
}

async fn write(
    live: Arc<Live>,
    sockets_rx: Latest,
    sockets: Arc<Mutex<Sockets>>,
    mut control: mpsc::Receiver<Control>,
    finish: CancellationToken,
) -> Vec<(SendKey, ConversationId)> {
    let mut sent = Vec::new();
    let mut writing = Writing {
        session: 0,
        sockets: sockets_rx,
    };
    loop {
        let command = tokio::select! {
            _ = finish.cancelled() => break,
            command = control.recv() => command,
        };
        let frame = match command {
            None => break,
            Some(Control::Add {
                conversation_index,
                batch,
                conversation,
                users,
            }) => ClientFrame::AddMembers {
                id: RequestId::create_id(conversation_index, batch),
                conversation,
                users,
            },
            Some(Control::Create {
                conversation_index,
                create,
            }) => {
                let id = RequestId::create_id(conversation_index, 0);
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
        if let Err(e) = writing.send(&frame).await {
            sockets
                .lock()
                .unwrap()
                .write_failed(writing.session, &live, &e);
        }
    }
    let sink = Arc::clone(&writing.sockets.borrow().1);
    let _ = sink.lock().await.close().await;
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
            reply_to: None,
        };
        *n += 1;
        // Counted before it goes: a write that fails part way may still have reached the
        // gateway, and the log check will say.
        sent.push((key, slot.conversation));
        live.sent.fetch_add(1, Ordering::Relaxed);
        match writing.send(&frame).await {
            Ok(()) => sockets.lock().unwrap().sent_on(writing.session, live),
            Err(e) => {
                sockets
                    .lock()
                    .unwrap()
                    .write_failed(writing.session, live, &e);
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
    /// `c<conversation index>-<batch>`: a conversation's creation (batch 0) or an
    /// addition of members to it.
    Create {
        conversation_index: usize,
        batch: u32,
    },
    /// `r<round>`: the resume rounds of one socket.
    Resume { round: u32 },
}

impl RequestId {
    fn create_id(conversation_index: usize, batch: u32) -> ClientMsgId {
        ClientMsgId::parse(format!("c{conversation_index}-{batch}")).expect("harness ids are valid")
    }

    fn resume_id(round: u32) -> ClientMsgId {
        ClientMsgId::parse(format!("r{round}")).expect("harness ids are valid")
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
        } else if let Some(round) = id.strip_prefix('r') {
            Some(RequestId::Resume {
                round: round.parse().ok()?,
            })
        } else {
            let (conversation_index, batch) = id.strip_prefix('c')?.split_once('-')?;
            Some(RequestId::Create {
                conversation_index: conversation_index.parse().ok()?,
                batch: batch.parse().ok()?,
            })
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
    fn only_plain_urls_to_an_ipv4_loopback_gateway_are_spread_over_source_addresses() {
        let spread = |url: &str| loopback_gateway(url).map(|gateway| gateway.to_string());
        assert_eq!(
            spread("ws://127.0.0.1:8080/ws?access_token=t").as_deref(),
            Some("127.0.0.1:8080")
        );
        assert_eq!(spread("ws://127.0.0.9/ws").as_deref(), Some("127.0.0.9:80"));
        assert_eq!(spread("ws://10.0.0.1:8080/ws"), None);
        assert_eq!(spread("ws://localhost:8080/ws"), None);
        assert_eq!(spread("wss://127.0.0.1:8443/ws"), None);
        assert_eq!(spread("not a url"), None);
    }

    #[tokio::test]
    async fn loopback_connects_come_from_successive_source_addresses() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let gateway = listener.local_addr().unwrap();
        let mut sources = HashSet::new();
        for _ in 0..LOOPBACK_SOURCES {
            let _tcp = connect_from_loopback(gateway).await.unwrap();
            let (_accepted, peer) = listener.accept().await.unwrap();
            sources.insert(peer.ip());
        }
        assert_eq!(sources.len(), usize::from(LOOPBACK_SOURCES));
    }

    #[test]
    fn the_receive_path_reads_what_the_server_writes() {
        use parley_events::event::MessagePosted;
        use parley_events::{CommandId, Event, EventEnvelope, EventId, RecordedEvent};
        let key = SendKey { slot: 3, n: 8 };
        let alice = UserId::parse("alice").unwrap();
        let client_id = RequestId::send_id(key, 1_234);
        let command = CommandId::from_client(&alice, &client_id);
        let conversation = ConversationId::direct(&alice, &UserId::parse("bob").unwrap());
        let event = RecordedEvent {
            seq: 12,
            envelope: EventEnvelope {
                id: EventId::derive(command, 0, 1),
                conversation,
                prev: 9,
                command,
                actor: alice,
                at: 1,
                event: Event::MessagePosted(MessagePosted {
                    client_id,
                    body: stamped_body(1_234, 64),
                    reply_to: None,
                }),
            },
        };
        let text = ServerFrame::Event {
            event,
            system: None,
        }
        .to_json();
        let view = event_view(&text).expect("an event frame").unwrap();
        assert_eq!(
            (view.seq, view.prev, view.conversation),
            (12, 9, conversation)
        );
        assert_eq!(
            Content::classify(&view.type_name, view.data.client_id.as_deref()),
            Content::Message(key)
        );
        assert_eq!(view.data.body.as_deref().and_then(read_stamp), Some(1_234));
        let pong = ServerFrame::Pong { id: None }.to_json();
        assert!(event_view(&pong).is_none());
    }

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
        let id = RequestId::create_id(9, 2);
        assert_eq!(
            RequestId::parse(id.as_str()),
            Some(RequestId::Create {
                conversation_index: 9,
                batch: 2
            })
        );
        let id = RequestId::resume_id(3);
        assert_eq!(
            RequestId::parse(id.as_str()),
            Some(RequestId::Resume { round: 3 })
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
