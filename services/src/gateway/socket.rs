//! One WebSocket: a reader loop that turns frames into commands and queries, and a writer
//! task that drains the socket's bounded queue, pings, and sends the close frame.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket};
use futures::stream::{SplitSink, SplitStream};
use futures::{Sink, SinkExt, StreamExt};
use parley_events::presence::ConnectionState;
use parley_events::protocol::{
    ClientFrame, ConversationSummary, Limits, MessagePreview, ServerFrame, close, pack_frames,
};
use parley_events::{ClientMsgId, Command, ConversationId, ErrorCode, Role, UserId};
use parley_projections::{ConversationStore, HistoryPage, StoreError};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;
use tokio::time::{Instant, MissedTickBehavior};
use tracing::{Instrument, debug, info_span, warn};

use super::Shared;
use super::delivery::{ConnectionId, Outbox, SocketControl};
use super::send_queue::{QueueReader, Queued};
use super::{commands, limits, presence, resume, typing};
use crate::{telemetry, unix_millis};

/// Commands one socket may have in flight; past this, the reader stops reading, which
/// pushes back on the client through TCP.
const MAX_IN_FLIGHT: usize = 32;
/// A write that takes longer than this means the peer stopped reading.
pub const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// Most frames written before one flush; a bound on how long the first of them waits.
const MAX_FRAMES_PER_FLUSH: usize = 64;
const DEFAULT_HISTORY_PAGE: u32 = 50;
const DEFAULT_CONVERSATIONS_PAGE: u32 = 100;
const MAX_CONVERSATIONS_PAGE: u32 = 1000;
const DEFAULT_MEMBERS_PAGE: u32 = 100;
const MAX_MEMBERS_PAGE: u32 = 1000;
/// Largest frame the server sends: a history page is trimmed to fit, and the socket's write
/// buffer is sized for one such frame.
pub const MAX_SERVER_FRAME_BYTES: usize = 512 * 1024;

pub struct Session {
    pub user: UserId,
    /// The protocol version the socket speaks, chosen at the upgrade.
    pub protocol: u32,
    /// Whether frames ready together go out packed in one message (`pack=1`).
    pub pack: bool,
    pub conn: ConnectionId,
    /// The peer's address, which the per-address rate limits count.
    pub ip: std::net::IpAddr,
    /// When the token expires; the session ends then (close 1008).
    pub expires_at: Instant,
    /// The token's claims, which a revocation may cover.
    pub claims: crate::auth::Claims,
    pub typing: typing::SocketTyping,
}

/// Serve one upgraded socket until it has closed.
///
/// Not an `async fn`, and its first and last steps boxed, because this future is most of an
/// idle socket's memory: an `async fn` keeps its arguments for its whole life even once they
/// are moved out, and every step awaited inline (a log lookup, a presence publish, the close
/// handshake) would be laid out in every socket's task while only the read loop runs.
pub fn serve(
    shared: Arc<Shared>,
    socket: WebSocket,
    session: Box<Session>,
    permit: OwnedSemaphorePermit,
) -> impl Future<Output = ()> + Send + 'static {
    let span = info_span!("socket", conn = session.conn);
    let (outbox, queue) = Outbox::new(shared.config.gateway.send_queue);
    let (sink, mut stream) = socket.split();
    let writer = tokio::spawn(write_loop(
        sink,
        queue,
        Arc::clone(&outbox.control),
        shared.config.ping_interval(),
        session.pack,
    ));
    async move {
        metrics::gauge!(telemetry::GATEWAY_CONNECTIONS).increment(1.0);
        Box::pin(start(&shared, &session, &outbox)).await;
        read_loop(&shared, &session, &mut stream, &outbox).await;
        Box::pin(finish(&shared, &session, stream, &outbox, writer)).await;
        metrics::gauge!(telemetry::GATEWAY_CONNECTIONS).decrement(1.0);
        // The gateway counts a socket until it has closed.
        drop(permit);
    }
    .instrument(span)
}

/// A new socket's first steps: its welcome, its routes, its presence, and a version 1
/// socket's catch-up.
async fn start(shared: &Arc<Shared>, session: &Session, outbox: &Outbox) {
    // Where "from now" starts for a version 1 socket: before its welcome, so whatever
    // happens once the client holds the welcome reaches it, by its resume or live.
    let connected_at = if session.protocol < 2 {
        shared.log.bounds().await.ok().map(|bounds| bounds.last)
    } else {
        None
    };
    outbox.send(&ServerFrame::Welcome {
        protocol: session.protocol,
        user: session.user.clone(),
        connection: shared.connection_name(session.conn),
        limits: Limits {
            max_frame_bytes: shared.config.limits.frame_bytes(),
            max_message_bytes: shared.config.limits.max_message_bytes,
            max_history_page: shared.config.limits.max_history_page,
        },
        pack: session.pack,
    });
    shared.routes.register(
        session.conn,
        session.user.clone(),
        session.protocol,
        outbox.clone(),
    );
    shared.revocations.track(
        session.conn,
        session.user.clone(),
        session.claims.clone(),
        Arc::clone(&outbox.control),
    );
    shared
        .publish_presence(&session.user, session.conn, ConnectionState::Open)
        .await;
    if session.protocol < 2 {
        resume::connect_v1(shared, session, outbox, connected_at).await;
    }
}

/// A closing socket's last steps: out of the routes, offline, and the close handshake once
/// the writer has stopped.
async fn finish(
    shared: &Arc<Shared>,
    session: &Session,
    stream: SplitStream<WebSocket>,
    outbox: &Outbox,
    writer: JoinHandle<SplitSink<WebSocket, Message>>,
) {
    shared.routes.unregister(session.conn);
    shared.revocations.untrack(session.conn);
    shared.watchers.unwatch(session.conn, None);
    shared
        .publish_presence(&session.user, session.conn, ConnectionState::Closed)
        .await;
    // The writer stops as soon as the socket is closing, so this does not wait on a peer
    // that stopped reading.
    match writer.await {
        Ok(sink) => {
            let socket = sink
                .reunite(stream)
                .expect("the writer's sink and the reader's stream are one socket");
            close_handshake(socket, &outbox.control).await;
        }
        Err(e) => warn!(error = %e, "socket writer failed"),
    }
}

/// Read the client's frames until the socket is closing, for whatever reason.
async fn read_loop(
    shared: &Arc<Shared>,
    session: &Session,
    stream: &mut SplitStream<WebSocket>,
    outbox: &Outbox,
) {
    let in_flight = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    let mut sequencer = commands::Sequencer::default();
    let mut last_heard = Instant::now();
    let mut idle_check = tokio::time::interval(shared.config.ping_interval());
    idle_check.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let control = Arc::clone(&outbox.control);
    let mut flood = limits::Flood::new(&shared.config.gateway.rate_limits);
    // Created once: a timer and two waits registered anew for every frame read would cost
    // more than the frame.
    let closing = control.closing();
    let shutdown = shared.shutdown.cancelled();
    let expiry = tokio::time::sleep_until(session.expires_at);
    tokio::pin!(closing, shutdown, expiry);
    loop {
        let message = tokio::select! {
            () = &mut closing => return,
            () = &mut shutdown => {
                control.close(close::GOING_AWAY, "server shutting down");
                return;
            }
            () = &mut expiry => {
                control.close(close::POLICY_VIOLATION, "token expired");
                return;
            }
            _ = idle_check.tick() => {
                if last_heard.elapsed() > shared.config.idle_timeout() {
                    control.close(close::NORMAL, "idle timeout");
                    return;
                }
                continue;
            }
            message = stream.next() => message,
        };
        last_heard = Instant::now();
        match message {
            None => {
                control.close(close::ABNORMAL, "connection lost");
                return;
            }
            Some(Err(e)) => {
                let (code, reason) = close_for(&e);
                debug!(error = %e, code, "socket error");
                control.close(code, reason);
                return;
            }
            Some(Ok(Message::Text(text))) => {
                match flood.check(&shared.limits, &session.user, session.ip, &text) {
                    limits::Verdict::Pass => {
                        // Boxed: a request's state (a history page, a resume) lives only
                        // while it is answered, not in every idle socket's task.
                        Box::pin(handle_text(
                            shared,
                            session,
                            outbox,
                            &in_flight,
                            &mut sequencer,
                            &text,
                        ))
                        .await;
                    }
                    // Boxed like a request: refusals are rare, and every socket's task
                    // would otherwise hold room for one.
                    limits::Verdict::Refuse(frame) => Box::pin(outbox.answer(&frame)).await,
                    limits::Verdict::Close(reason) => {
                        control.close(close::POLICY_VIOLATION, reason);
                        return;
                    }
                }
            }
            Some(Ok(Message::Binary(_))) => {
                control.close(close::UNSUPPORTED_DATA, "only text frames are accepted");
                return;
            }
            Some(Ok(Message::Close(_))) => {
                control.close(close::NORMAL, "closed by client");
                return;
            }
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
        }
    }
}

/// Map a WebSocket read error to the RFC 6455 close code the client deserves.
fn close_for(error: &axum::Error) -> (u16, &'static str) {
    match tungstenite_error(error) {
        Some(
            tungstenite::Error::Protocol(
                tungstenite::error::ProtocolError::ResetWithoutClosingHandshake,
            )
            | tungstenite::Error::ConnectionClosed
            | tungstenite::Error::AlreadyClosed
            | tungstenite::Error::Io(_),
        ) => (close::ABNORMAL, "connection lost"),
        Some(tungstenite::Error::Capacity(_)) => (close::MESSAGE_TOO_BIG, "frame too large"),
        Some(tungstenite::Error::Utf8(_)) => {
            (close::INVALID_PAYLOAD, "text frame is not valid UTF-8")
        }
        Some(tungstenite::Error::Protocol(_)) => (close::PROTOCOL_ERROR, "protocol error"),
        _ => (close::INTERNAL_ERROR, "connection error"),
    }
}

/// The tungstenite error behind an axum WebSocket error.
fn tungstenite_error(error: &axum::Error) -> Option<&tungstenite::Error> {
    use std::error::Error as _;
    let mut source: Option<&(dyn std::error::Error + 'static)> = error.source();
    while let Some(cause) = source {
        if let Some(ws) = cause.downcast_ref::<tungstenite::Error>() {
            return Some(ws);
        }
        source = cause.source();
    }
    None
}

async fn handle_text(
    shared: &Arc<Shared>,
    session: &Session,
    outbox: &Outbox,
    in_flight: &Arc<Semaphore>,
    sequencer: &mut commands::Sequencer,
    text: &str,
) {
    let frame = match ClientFrame::parse(text) {
        Ok(frame) => frame,
        Err(e) => {
            metrics::counter!(telemetry::GATEWAY_FRAME_ERRORS_TOTAL, "code" => e.code().as_str())
                .increment(1);
            outbox
                .answer(&ServerFrame::error(
                    e.request_id().cloned(),
                    e.code(),
                    e.to_string(),
                ))
                .await;
            return;
        }
    };
    if frame.since_protocol() > session.protocol {
        let code = ErrorCode::UnknownFrameType;
        metrics::counter!(telemetry::GATEWAY_FRAME_ERRORS_TOTAL, "code" => code.as_str())
            .increment(1);
        outbox
            .answer(&ServerFrame::error(
                frame.id().cloned(),
                code,
                format!(
                    "this frame type needs protocol version {}; ask for it at the upgrade",
                    frame.since_protocol()
                ),
            ))
            .await;
        return;
    }
    let (frame_type, action) = match commands::command_of(frame) {
        Ok((frame_type, id, action)) => (frame_type, Some((id, action))),
        Err(request) => {
            let Some(frame_type) = answer_request(shared, session, outbox, request).await else {
                return;
            };
            (frame_type, None)
        }
    };
    if let Some((id, action)) = &action
        && let Err((code, message)) =
            commands::check_at_edge(action, session.protocol, &shared.config.limits)
    {
        metrics::counter!(telemetry::GATEWAY_FRAME_ERRORS_TOTAL, "code" => code.as_str())
            .increment(1);
        outbox
            .answer(&ServerFrame::error(Some(id.clone()), code, message))
            .await;
        return;
    }
    metrics::counter!(telemetry::GATEWAY_FRAMES_RECEIVED_TOTAL, "type" => frame_type).increment(1);
    let Some((client_id, action)) = action else {
        return;
    };
    let Ok(permit) = Arc::clone(in_flight).acquire_owned().await else {
        return;
    };
    let command = Command::new(
        session.user.clone(),
        client_id,
        unix_millis(),
        shared.outcome_subject.clone(),
        action,
    );
    // Joining the line here, in read order, is what keeps the socket's commands to one
    // conversation in the order it sent them.
    let place = sequencer.join(command.conversation());
    let span = info_span!("command", otel.name = "gateway command", command = %command.id);
    tokio::spawn(
        commands::follow(Arc::clone(shared), outbox.clone(), command, place, permit)
            .instrument(span),
    );
}

/// Answer a request the gateway serves itself (no command): reads, resume, pings, typing
/// and presence. The frame's type name, for the metric; `None` when it was refused.
async fn answer_request(
    shared: &Arc<Shared>,
    session: &Session,
    outbox: &Outbox,
    frame: ClientFrame,
) -> Option<&'static str> {
    Some(match frame {
        ClientFrame::History {
            id,
            conversation,
            before,
            after,
            limit,
        } => {
            let from = match (before, after) {
                (Some(_), Some(_)) => {
                    outbox
                        .answer(&ServerFrame::error(
                            Some(id),
                            ErrorCode::InvalidRequest,
                            "`before` and `after` page in opposite directions; send one of them",
                        ))
                        .await;
                    return None;
                }
                (before, None) => HistoryFrom::Before(before),
                (None, Some(after)) => HistoryFrom::After(after),
            };
            history(shared, session, outbox, id, conversation, from, limit).await;
            "history"
        }
        ClientFrame::Conversations { id, before, limit } => {
            conversations(shared, session, outbox, id, before, limit).await;
            "conversations"
        }
        ClientFrame::Resume {
            id,
            cursor,
            conversations,
        } => {
            let point = resume::ResumePoint {
                cursor,
                conversations,
            };
            resume::answer(shared, session, outbox, id, point).await;
            "resume"
        }
        ClientFrame::Members {
            id,
            conversation,
            after,
            limit,
        } => {
            members(shared, session, outbox, id, conversation, after, limit).await;
            "members"
        }
        ClientFrame::Ping { id } => {
            outbox.answer(&ServerFrame::Pong { id }).await;
            "ping"
        }
        ClientFrame::Typing {
            id,
            conversation,
            state,
        } => {
            typing::handle(shared, session, outbox, id, conversation, state).await;
            "typing"
        }
        ClientFrame::Presence { id, users } => {
            presence::handle_watch(shared, session, outbox, id, users).await;
            "presence"
        }
        ClientFrame::PresenceUnsubscribe { users, .. } => {
            shared.watchers.unwatch(session.conn, Some(&users));
            "presence_unsubscribe"
        }
        ClientFrame::Send { .. }
        | ClientFrame::CreateDirect { .. }
        | ClientFrame::CreateGroup { .. }
        | ClientFrame::MarkRead { .. }
        | ClientFrame::Edit { .. }
        | ClientFrame::Delete { .. }
        | ClientFrame::React { .. }
        | ClientFrame::Unreact { .. }
        | ClientFrame::AddMembers { .. }
        | ClientFrame::RemoveMembers { .. }
        | ClientFrame::Leave { .. }
        | ClientFrame::SetRole { .. }
        | ClientFrame::Rename { .. }
        | ClientFrame::Mute { .. }
        | ClientFrame::Unmute { .. } => unreachable!("command frames became commands above"),
    })
}

/// Where a history page starts, and so which way it goes.
#[derive(Clone, Copy)]
enum HistoryFrom {
    /// Backwards, newest first, below the sequence (from the newest when `None`).
    Before(Option<u64>),
    /// Forwards, oldest first, above the sequence.
    After(u64),
}

async fn history(
    shared: &Arc<Shared>,
    session: &Session,
    outbox: &Outbox,
    id: ClientMsgId,
    conversation: ConversationId,
    from: HistoryFrom,
    limit: Option<u32>,
) {
    let limit = limit
        .unwrap_or(DEFAULT_HISTORY_PAGE)
        .clamp(1, shared.config.limits.max_history_page);
    let page = history_page(shared, session, &id, conversation, from, limit).await;
    outbox
        .answer(&page.unwrap_or_else(|e| store_unavailable(id, "history", e)))
        .await;
}

async fn history_page(
    shared: &Shared,
    session: &Session,
    id: &ClientMsgId,
    conversation: ConversationId,
    from: HistoryFrom,
    limit: u32,
) -> Result<ServerFrame, StoreError> {
    if let Err(refused) = member_role(shared, session, id, conversation).await? {
        return Ok(refused);
    }
    let page = if session.protocol < 2 {
        messages_only(&*shared.store, conversation, from, limit).await?
    } else {
        store_page(&*shared.store, conversation, from, limit).await?
    };
    let mut messages = page.messages;
    if session.protocol < 2 {
        // In version 1's shape: a message there was never edited, deleted, a reply or
        // reacted to (a deleted one's body is empty all the same).
        for message in &mut messages {
            message.edited = false;
            message.deleted = false;
            message.reply_to = None;
            message.reactions = Vec::new();
        }
    }
    Ok(fit_frame(ServerFrame::History {
        id: id.clone(),
        conversation,
        messages,
        has_more: page.has_more,
    }))
}

async fn store_page(
    store: &dyn ConversationStore,
    conversation: ConversationId,
    from: HistoryFrom,
    limit: u32,
) -> Result<HistoryPage, StoreError> {
    match from {
        HistoryFrom::Before(before) => store.history(conversation, before, limit).await,
        HistoryFrom::After(after) => store.history_after(conversation, after, limit).await,
    }
}

/// A version 1 page: version 1 has no system entries, so they are left out, and the store
/// is read on past them until the page has `limit` messages or the history ends. Else a
/// page of system entries alone would come back empty with `has_more`, leaving the client
/// no sequence to page on from.
async fn messages_only(
    store: &dyn ConversationStore,
    conversation: ConversationId,
    mut from: HistoryFrom,
    limit: u32,
) -> Result<HistoryPage, StoreError> {
    let mut messages = Vec::new();
    loop {
        let wanted = limit - u32::try_from(messages.len()).unwrap_or(limit);
        let page = store_page(store, conversation, from, wanted).await?;
        let Some(last) = page.messages.last().map(|m| m.seq) else {
            return Ok(HistoryPage {
                messages,
                has_more: false,
            });
        };
        messages.extend(page.messages.into_iter().filter(|m| m.system.is_none()));
        if messages.len() >= limit as usize || !page.has_more {
            return Ok(HistoryPage {
                messages,
                has_more: page.has_more,
            });
        }
        from = match from {
            HistoryFrom::Before(_) => HistoryFrom::Before(Some(last)),
            HistoryFrom::After(_) => HistoryFrom::After(last),
        };
    }
}

/// The user's role in the conversation, or the error frame for a user who may not read it:
/// `not_member`, or `conversation_not_found` when the store does not know it.
async fn member_role(
    shared: &Shared,
    session: &Session,
    id: &ClientMsgId,
    conversation: ConversationId,
) -> Result<Result<Role, ServerFrame>, StoreError> {
    let store = &shared.store;
    if let Some(role) = store.role_of(conversation, &session.user).await? {
        return Ok(Ok(role));
    }
    Ok(Err(match store.conversation(conversation).await? {
        Some(_) => ServerFrame::error(
            Some(id.clone()),
            ErrorCode::NotMember,
            "you are not a member of this conversation",
        ),
        None => ServerFrame::error(
            Some(id.clone()),
            ErrorCode::ConversationNotFound,
            "no such conversation",
        ),
    }))
}

async fn members(
    shared: &Arc<Shared>,
    session: &Session,
    outbox: &Outbox,
    id: ClientMsgId,
    conversation: ConversationId,
    after: Option<UserId>,
    limit: Option<u32>,
) {
    let limit = limit
        .unwrap_or(DEFAULT_MEMBERS_PAGE)
        .clamp(1, MAX_MEMBERS_PAGE);
    let page = members_page(shared, session, &id, conversation, after.as_ref(), limit).await;
    outbox
        .answer(&page.unwrap_or_else(|e| store_unavailable(id, "the member list", e)))
        .await;
}

async fn members_page(
    shared: &Shared,
    session: &Session,
    id: &ClientMsgId,
    conversation: ConversationId,
    after: Option<&UserId>,
    limit: u32,
) -> Result<ServerFrame, StoreError> {
    let role = match member_role(shared, session, id, conversation).await? {
        Ok(role) => role,
        Err(refused) => return Ok(refused),
    };
    let store = &shared.store;
    // A member of a conversation the store has no details of yet: its creation is being
    // applied right now. Answered as when it is not there at all.
    let Some(details) = store.details(conversation).await? else {
        return Ok(ServerFrame::error(
            Some(id.clone()),
            ErrorCode::ConversationNotFound,
            "no such conversation",
        ));
    };
    let page = store.members_page(conversation, after, limit).await?;
    Ok(fit_frame(ServerFrame::Members {
        id: id.clone(),
        conversation,
        kind: details.view.kind,
        title: details.view.title,
        created_at: details.created_at,
        member_count: details.member_count,
        role,
        members: page.members,
        has_more: page.has_more,
    }))
}

/// The answer to a read the conversation store could not serve; the cause goes to the log.
fn store_unavailable(id: ClientMsgId, what: &str, cause: StoreError) -> ServerFrame {
    warn!(error = %cause, what, "conversation store read failed");
    ServerFrame::error(
        Some(id),
        ErrorCode::Unavailable,
        format!("{what} is temporarily unavailable"),
    )
}

/// Trim a list frame from its end (the messages furthest from where a history page starts,
/// the least recently active conversations, the greatest user ids of a member page) until it fits in [`MAX_SERVER_FRAME_BYTES`]. A trimmed page says
/// `has_more`, so the client pages on from where it stops.
fn fit_frame(mut frame: ServerFrame) -> ServerFrame {
    while frame.to_json().len() > MAX_SERVER_FRAME_BYTES {
        let trimmed = match &mut frame {
            ServerFrame::History {
                messages, has_more, ..
            } if messages.len() > 1 => {
                *has_more = true;
                messages.pop().is_some()
            }
            ServerFrame::Conversations {
                conversations,
                has_more,
                ..
            } if conversations.len() > 1 => {
                *has_more = true;
                conversations.pop().is_some()
            }
            ServerFrame::Members {
                members, has_more, ..
            } if members.len() > 1 => {
                *has_more = true;
                members.pop().is_some()
            }
            _ => false,
        };
        if !trimmed {
            break;
        }
    }
    frame
}

async fn conversations(
    shared: &Arc<Shared>,
    session: &Session,
    outbox: &Outbox,
    id: ClientMsgId,
    before: Option<u64>,
    limit: Option<u32>,
) {
    let limit = limit
        .unwrap_or(DEFAULT_CONVERSATIONS_PAGE)
        .clamp(1, MAX_CONVERSATIONS_PAGE);
    let frame = conversations_page(shared, session, &id, before, limit)
        .await
        .unwrap_or_else(|e| store_unavailable(id, "the conversation list", e));
    outbox.answer(&frame).await;
}

async fn conversations_page(
    shared: &Shared,
    session: &Session,
    id: &ClientMsgId,
    before: Option<u64>,
    limit: u32,
) -> Result<ServerFrame, StoreError> {
    // One row more than asked tells whether another page exists.
    let mut inbox = shared.store.inbox(&session.user, before, limit + 1).await?;
    let has_more = inbox.len() > limit as usize;
    inbox.truncate(limit as usize);
    // What a list view shows costs reads per entry: only for sockets that are sent it.
    let list_view = session.protocol >= 2;
    if list_view {
        shared.store.list_view(&session.user, &mut inbox).await?;
    }
    Ok(fit_frame(ServerFrame::Conversations {
        id: id.clone(),
        conversations: inbox
            .into_iter()
            .map(|entry| ConversationSummary {
                conversation: entry.conversation,
                kind: entry.kind,
                title: entry.title,
                role: entry.role,
                last_seq: entry.last_seq,
                last_activity_at: entry.last_activity_at,
                last_message: entry.last_message.map(MessagePreview::from),
                read_seq: list_view.then_some(entry.read_seq),
                unread: list_view.then_some(entry.unread),
            })
            .collect(),
        has_more,
    }))
}

/// Send the socket's queued frames and pings until it is closing; the sink goes back to
/// [`serve`] for the close handshake. Once closing, whatever is still queued is dropped: a
/// slow consumer would never read it, and after the client's close frame nothing more may
/// be sent.
async fn write_loop(
    mut sink: SplitSink<WebSocket, Message>,
    mut queue: QueueReader,
    control: Arc<SocketControl>,
    ping_interval: Duration,
    pack: bool,
) -> SplitSink<WebSocket, Message> {
    let mut ping = tokio::time::interval_at(Instant::now() + ping_interval, ping_interval);
    // One wait for the close and one counter handle for the socket's life, not one per
    // frame: at high fan-out every socket loops here once per event.
    let closing = control.closing();
    tokio::pin!(closing);
    let flushes = metrics::counter!(telemetry::GATEWAY_SOCKET_FLUSHES_TOTAL);
    let packing = pack.then(Packing::counted);
    loop {
        let next = tokio::select! {
            biased;
            () = &mut closing => break,
            // An answer's slot is free once the writer has it.
            queued = queue.recv() => Next::Frame(queued),
            _ = ping.tick() => Next::Ping,
        };
        // A write blocked on a full socket is abandoned when the socket starts closing: the
        // close frame must not wait behind it. The part of a frame tungstenite already holds
        // stays whole in its buffer and goes out before the close frame.
        let sent = tokio::select! {
            biased;
            () = &mut closing => break,
            sent = tokio::time::timeout(WRITE_TIMEOUT, write_ready(&mut sink, next, &mut queue, packing.as_ref())) => sent,
        };
        match sent {
            Ok(Ok(())) => flushes.increment(1),
            // The client's close frame has just been read: the reader records it.
            Ok(Err(e))
                if matches!(
                    tungstenite_error(&e),
                    Some(tungstenite::Error::Protocol(
                        tungstenite::error::ProtocolError::SendAfterClosing
                    ))
                ) =>
            {
                break;
            }
            Ok(Err(_)) => {
                control.close(close::INTERNAL_ERROR, "write failed");
                break;
            }
            Err(_) => {
                control.close(close::POLICY_VIOLATION, "slow consumer: write timed out");
                break;
            }
        }
    }
    sink
}

/// What a socket's writer sends next.
enum Next {
    Frame(Queued),
    Ping,
}

/// Write `first` and every frame already queued behind it (up to [`MAX_FRAMES_PER_FLUSH`]),
/// then flush once: under load a socket's events go out in one write (and, with Nagle off,
/// one TCP segment) instead of one system call each. On a socket that asked for packing,
/// pushed frames ready together go as one message, which spares both ends the work of a
/// WebSocket message per frame.
async fn write_ready(
    sink: &mut SplitSink<WebSocket, Message>,
    first: Next,
    queue: &mut QueueReader,
    packing: Option<&Packing>,
) -> Result<(), axum::Error> {
    let first = match first {
        Next::Frame(queued) => queued,
        Next::Ping => {
            sink.feed(Message::Ping(bytes::Bytes::new())).await?;
            return sink.flush().await;
        }
    };
    // Most flushes carry one frame: it goes as it is, with nothing to gather.
    let second = packing.and_then(|_| queue.try_recv());
    let (Some(packing), Some(second)) = (packing, second) else {
        sink.feed(Message::Text(first.0)).await?;
        for _ in 1..MAX_FRAMES_PER_FLUSH {
            let Some((frame, _answer_slot)) = queue.try_recv() else {
                break;
            };
            sink.feed(Message::Text(frame)).await?;
        }
        return sink.flush().await;
    };
    let mut ready = vec![first, second];
    while ready.len() < MAX_FRAMES_PER_FLUSH {
        let Some(queued) = queue.try_recv() else {
            break;
        };
        ready.push(queued);
    }
    for message in packed_messages(ready, MAX_SERVER_FRAME_BYTES, packing) {
        sink.feed(Message::Text(message)).await?;
    }
    sink.flush().await
}

/// A packing socket's counts of the packed messages it sent and the frames in them.
struct Packing {
    messages: metrics::Counter,
    frames: metrics::Counter,
}

impl Packing {
    fn counted() -> Packing {
        Packing {
            messages: metrics::counter!(telemetry::GATEWAY_PACKED_MESSAGES_TOTAL),
            frames: metrics::counter!(telemetry::GATEWAY_PACKED_FRAMES_TOTAL),
        }
    }
}

/// `ready` in as few messages as packing allows, in order: runs of pushed frames packed up
/// to `max_bytes`; an answer (which holds an answer slot) always alone, so a client meets
/// answers to its requests only as messages of their own.
fn packed_messages(ready: Vec<Queued>, max_bytes: usize, packing: &Packing) -> Vec<Utf8Bytes> {
    let close_run = |run: &mut Vec<Utf8Bytes>, messages: &mut Vec<Utf8Bytes>| match run.len() {
        0 => {}
        1 => messages.extend(run.pop()),
        frames => {
            messages.push(Utf8Bytes::from(pack_frames(&run[..])));
            packing.messages.increment(1);
            packing.frames.increment(frames as u64);
            run.clear();
        }
    };
    let mut messages = Vec::with_capacity(1);
    let mut run = Vec::new();
    let mut run_bytes = 1;
    for (frame, answer_slot) in ready {
        if answer_slot.is_some() {
            close_run(&mut run, &mut messages);
            run_bytes = 1;
            messages.push(frame);
            continue;
        }
        if !run.is_empty() && run_bytes + frame.len() + 1 > max_bytes {
            close_run(&mut run, &mut messages);
            run_bytes = 1;
        }
        run_bytes += frame.len() + 1;
        run.push(frame);
    }
    close_run(&mut run, &mut messages);
    messages
}

/// End the socket the way RFC 6455 asks: send our close frame (or the reply to the client's),
/// then read until the client's reply, all within [`WRITE_TIMEOUT`].
async fn close_handshake(mut socket: WebSocket, control: &SocketControl) {
    let (code, reason) = control.reason().unwrap_or((close::NORMAL, "closing"));
    if code == close::ABNORMAL {
        // The connection is gone; 1006 is never sent.
        return;
    }
    // Queued directly rather than through `send`, whose readiness check waits until all
    // that was written before has drained, which a slow consumer never does. tokio-tungstenite
    // takes the frame even when the socket would block, into the write buffer's room kept
    // for it (`max_write_buffer_size`). This fails when the client closed first; tungstenite
    // has then already queued its reply, with the client's own code, which the flush sends.
    let frame = Message::Close(Some(CloseFrame {
        code,
        reason: reason.into(),
    }));
    if let Err(e) = Pin::new(&mut socket).start_send(frame) {
        debug!(error = %e, "close frame not queued");
    }
    let handshake = async {
        if socket.flush().await.is_ok() {
            // Until the client's close frame: the server then drops the TCP connection first,
            // as RFC 6455 recommends.
            while let Some(Ok(_)) = socket.next().await {}
        }
    };
    if tokio::time::timeout(WRITE_TIMEOUT, handshake)
        .await
        .is_err()
    {
        debug!("the client did not complete the close handshake in time");
    }
}

#[cfg(test)]
mod tests {
    use parley_events::protocol::unpack_frames;

    use super::*;

    fn pushed(texts: &[&str]) -> Vec<Queued> {
        texts
            .iter()
            .map(|text| (Utf8Bytes::from(*text), None))
            .collect()
    }

    impl Packing {
        fn uncounted() -> Packing {
            Packing {
                messages: metrics::Counter::noop(),
                frames: metrics::Counter::noop(),
            }
        }
    }

    fn texts(messages: &[Utf8Bytes]) -> Vec<&str> {
        messages.iter().map(|message| message.as_str()).collect()
    }

    #[test]
    fn pushed_frames_ready_together_are_packed_in_order_within_the_size_bound() {
        let noop = Packing::uncounted();
        let one = packed_messages(pushed(&[r#"{"n":1}"#]), 100, &noop);
        assert_eq!(
            texts(&one),
            [r#"{"n":1}"#],
            "a frame alone is sent as it is"
        );

        let frames = [r#"{"n":1}"#, r#"{"n":2}"#, r#"{"n":3}"#, r#"{"n":4}"#];
        let all = packed_messages(pushed(&frames), 100, &noop);
        assert_eq!(texts(&all), [r#"[{"n":1},{"n":2},{"n":3},{"n":4}]"#]);

        // 7-byte frames: "[" and two frames, each with its separator, make 17 bytes.
        let split = packed_messages(pushed(&frames[..3]), 17, &noop);
        assert_eq!(texts(&split), [r#"[{"n":1},{"n":2}]"#, r#"{"n":3}"#]);
        let unpacked: Vec<&str> = split
            .iter()
            .flat_map(|message| unpack_frames(message).unwrap())
            .collect();
        assert_eq!(unpacked, frames[..3]);

        // A frame larger than the bound still goes, alone.
        let big = "x".repeat(40);
        let alone = packed_messages(pushed(&[r#"{"n":1}"#, &big]), 17, &noop);
        assert_eq!(texts(&alone), [r#"{"n":1}"#, big.as_str()]);
    }

    #[test]
    fn an_answer_is_never_packed_and_splits_the_pushes_around_it() {
        let slots = Arc::new(Semaphore::new(1));
        let mut ready = pushed(&["1", "2"]);
        ready.push((
            Utf8Bytes::from("answer"),
            Some(Arc::clone(&slots).try_acquire_owned().unwrap()),
        ));
        ready.extend(pushed(&["3", "4"]));
        let messages = packed_messages(ready, 100, &Packing::uncounted());
        assert_eq!(texts(&messages), ["[1,2]", "answer", "[3,4]"]);
        assert_eq!(
            slots.available_permits(),
            1,
            "the answer's slot is given back"
        );
    }
}
