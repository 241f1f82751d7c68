//! One WebSocket: a reader loop that turns frames into commands and queries, and a writer
//! task that drains the socket's bounded queue, pings, and sends the close frame.

use std::collections::HashSet;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, Utf8Bytes, WebSocket};
use futures::stream::{SplitSink, SplitStream};
use futures::{Sink, SinkExt, StreamExt};
use parley_events::presence::ConnectionState;
use parley_events::protocol::{ClientFrame, ConversationSummary, Limits, ServerFrame, close};
use parley_events::{Action, ClientMsgId, Command, ConversationId, ErrorCode, UserId};
use parley_projections::StoreError;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio::time::{Instant, MissedTickBehavior};
use tracing::{Instrument, debug, info_span, warn};

use super::Shared;
use super::commands;
use super::delivery::{ConnectionId, Outbox, SocketControl};
use super::{presence, typing};
use crate::handler::check_body;
use crate::{telemetry, unix_millis};

/// Commands one socket may have in flight; past this, the reader stops reading, which
/// pushes back on the client through TCP.
const MAX_IN_FLIGHT: usize = 32;
/// A write that takes longer than this means the peer stopped reading.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
const DEFAULT_HISTORY_PAGE: u32 = 50;
const DEFAULT_CONVERSATIONS_PAGE: u32 = 100;
const MAX_CONVERSATIONS_PAGE: u32 = 1000;
/// Largest frame the server sends: a history page is trimmed to fit, and the socket's write
/// buffer is sized for one such frame.
pub const MAX_SERVER_FRAME_BYTES: usize = 512 * 1024;

pub struct Session {
    pub user: UserId,
    /// The protocol version the socket speaks, chosen at the upgrade.
    pub protocol: u32,
    pub conn: ConnectionId,
    /// When the token expires; the session ends then (close 1008).
    pub expires_at: Instant,
    pub typing: typing::SocketTyping,
}

pub async fn serve(
    shared: Arc<Shared>,
    socket: WebSocket,
    session: Session,
    _permit: OwnedSemaphorePermit,
) {
    let span = info_span!("socket", conn = session.conn);
    async move {
        metrics::gauge!(telemetry::GATEWAY_CONNECTIONS).increment(1.0);
        let (outbox, queue) = Outbox::new(shared.config.gateway.send_queue);
        let (sink, mut stream) = socket.split();
        let writer = tokio::spawn(write_loop(
            sink,
            queue,
            Arc::clone(&outbox.control),
            shared.config.ping_interval(),
        ));
        outbox.send(&ServerFrame::Welcome {
            protocol: session.protocol,
            user: session.user.clone(),
            connection: shared.connection_name(session.conn),
            limits: Limits {
                max_frame_bytes: shared.config.limits.max_frame_bytes,
                max_message_bytes: shared.config.limits.max_message_bytes,
                max_history_page: shared.config.limits.max_history_page,
            },
        });
        shared.routes.register(
            session.conn,
            session.user.clone(),
            session.protocol,
            outbox.clone(),
        );
        shared
            .publish_presence(&session.user, session.conn, ConnectionState::Open)
            .await;
        follow_inbox(&shared, &session).await;

        read_loop(&shared, &session, &mut stream, &outbox).await;

        shared.routes.unregister(session.conn);
        shared.watchers.unwatch(session.conn, None);
        shared
            .publish_presence(&session.user, session.conn, ConnectionState::Closed)
            .await;
        // The writer stops as soon as the socket is closing, so this does not wait on a
        // peer that stopped reading.
        match writer.await {
            Ok(sink) => {
                let socket = sink
                    .reunite(stream)
                    .expect("the writer's sink and the reader's stream are one socket");
                close_handshake(socket, &outbox.control).await;
            }
            Err(e) => warn!(error = %e, "socket writer failed"),
        }
        metrics::gauge!(telemetry::GATEWAY_CONNECTIONS).decrement(1.0);
    }
    .instrument(span)
    .await
}

/// Subscribe the socket to the conversations the store lists for its user, and to those
/// created too recently for the store to have them yet.
async fn follow_inbox(shared: &Arc<Shared>, session: &Session) {
    let limit = shared.config.gateway.max_conversations_per_user;
    let inbox = shared
        .store
        .inbox(&session.user, None, limit)
        .await
        .unwrap_or_else(|e| {
            warn!(error = %e, "cannot read the user's conversations; following only new ones");
            Vec::new()
        });
    let stored: HashSet<ConversationId> = inbox.iter().map(|entry| entry.conversation).collect();
    let recent = shared
        .recent
        .of(&session.user)
        .into_iter()
        .filter(|(conversation, _)| !stored.contains(conversation));
    let follows = inbox
        .iter()
        .map(|entry| (entry.conversation, entry.last_seq))
        .chain(recent);
    for (conversation, last_seq) in follows {
        if let Err(e) = shared
            .routes
            .follow(&[session.conn], conversation, last_seq)
            .await
        {
            warn!(error = %e, "cannot subscribe to a conversation");
        }
    }
    shared.routes.flush().await;
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
    loop {
        let message = tokio::select! {
            () = control.closing() => return,
            () = shared.shutdown.cancelled() => {
                control.close(close::GOING_AWAY, "server shutting down");
                return;
            }
            () = tokio::time::sleep_until(session.expires_at) => {
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
                handle_text(shared, session, outbox, &in_flight, &mut sequencer, &text).await;
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
            outbox.send(&ServerFrame::error(
                e.request_id().cloned(),
                e.code(),
                e.to_string(),
            ));
            return;
        }
    };
    if frame.since_protocol() > session.protocol {
        let code = ErrorCode::UnknownFrameType;
        metrics::counter!(telemetry::GATEWAY_FRAME_ERRORS_TOTAL, "code" => code.as_str())
            .increment(1);
        outbox.send(&ServerFrame::error(
            frame.request_id().cloned(),
            code,
            format!(
                "unknown frame type {:?} in protocol version {}",
                frame.type_name(),
                session.protocol
            ),
        ));
        return;
    }
    let (frame_type, action) = match frame {
        ClientFrame::Send {
            id,
            conversation,
            body,
        } => {
            // Refused here what the handler would refuse anyway, saving the round trip.
            if let Err((code, message)) = check_body(&body, &shared.config.limits) {
                metrics::counter!(telemetry::GATEWAY_FRAME_ERRORS_TOTAL, "code" => code.as_str())
                    .increment(1);
                outbox.send(&ServerFrame::error(Some(id), code, message));
                return;
            }
            (
                "send",
                Some((id, Action::PostMessage { conversation, body })),
            )
        }
        ClientFrame::CreateDirect { id, peer } => {
            ("create_direct", Some((id, Action::CreateDirect { peer })))
        }
        ClientFrame::CreateGroup { id, title, members } => (
            "create_group",
            Some((id, Action::CreateGroup { title, members })),
        ),
        ClientFrame::History {
            id,
            conversation,
            before,
            limit,
        } => {
            history(shared, session, outbox, id, conversation, before, limit).await;
            ("history", None)
        }
        ClientFrame::Conversations { id, before, limit } => {
            conversations(shared, session, outbox, id, before, limit).await;
            ("conversations", None)
        }
        ClientFrame::Ping { id } => {
            outbox.send(&ServerFrame::Pong { id });
            ("ping", None)
        }
        ClientFrame::Typing {
            id,
            conversation,
            state,
        } => {
            typing::handle(shared, session, outbox, id, conversation, state).await;
            ("typing", None)
        }
        ClientFrame::Presence { id, users } => {
            presence::handle_watch(shared, session, outbox, id, users).await;
            ("presence", None)
        }
        ClientFrame::PresenceUnsubscribe { users, .. } => {
            shared.watchers.unwatch(session.conn, Some(&users));
            ("presence_unsubscribe", None)
        }
    };
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
    let span = info_span!("command", command = %command.id);
    tokio::spawn(
        commands::run(Arc::clone(shared), outbox.clone(), command, place, permit).instrument(span),
    );
}

async fn history(
    shared: &Arc<Shared>,
    session: &Session,
    outbox: &Outbox,
    id: ClientMsgId,
    conversation: ConversationId,
    before: Option<u64>,
    limit: Option<u32>,
) {
    let limit = limit
        .unwrap_or(DEFAULT_HISTORY_PAGE)
        .clamp(1, shared.config.limits.max_history_page);
    let page = history_page(shared, session, &id, conversation, before, limit).await;
    outbox.send(&page.unwrap_or_else(|e| store_unavailable(id, "history", e)));
}

async fn history_page(
    shared: &Shared,
    session: &Session,
    id: &ClientMsgId,
    conversation: ConversationId,
    before: Option<u64>,
    limit: u32,
) -> Result<ServerFrame, StoreError> {
    let store = &shared.store;
    if store.role_of(conversation, &session.user).await?.is_none() {
        return Ok(match store.conversation(conversation).await? {
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
        });
    }
    let page = store.history(conversation, before, limit).await?;
    Ok(fit_frame(ServerFrame::History {
        id: id.clone(),
        conversation,
        messages: page.messages,
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

/// Trim a list frame from its end (the oldest messages of a history page, the least recently
/// active conversations) until it fits in [`MAX_SERVER_FRAME_BYTES`]. A trimmed page says
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
    // One row more than asked tells whether another page exists.
    let frame = match shared.store.inbox(&session.user, before, limit + 1).await {
        Ok(mut inbox) => {
            let has_more = inbox.len() > limit as usize;
            inbox.truncate(limit as usize);
            fit_frame(ServerFrame::Conversations {
                id,
                conversations: inbox
                    .into_iter()
                    .map(|entry| ConversationSummary {
                        conversation: entry.conversation,
                        kind: entry.kind,
                        title: entry.title,
                        role: entry.role,
                        last_seq: entry.last_seq,
                        last_activity_at: entry.last_activity_at,
                    })
                    .collect(),
                has_more,
            })
        }
        Err(e) => store_unavailable(id, "the conversation list", e),
    };
    outbox.send(&frame);
}

/// Send the socket's queued frames and pings until it is closing; the sink goes back to
/// [`serve`] for the close handshake. Once closing, whatever is still queued is dropped: a
/// slow consumer would never read it, and after the client's close frame nothing more may
/// be sent.
async fn write_loop(
    mut sink: SplitSink<WebSocket, Message>,
    mut queue: mpsc::Receiver<Utf8Bytes>,
    control: Arc<SocketControl>,
    ping_interval: Duration,
) -> SplitSink<WebSocket, Message> {
    let mut ping = tokio::time::interval_at(Instant::now() + ping_interval, ping_interval);
    loop {
        let message = tokio::select! {
            biased;
            () = control.closing() => break,
            frame = queue.recv() => match frame {
                Some(frame) => Message::Text(frame),
                None => break,
            },
            _ = ping.tick() => Message::Ping(bytes::Bytes::new()),
        };
        // A write blocked on a full socket is abandoned when the socket starts closing: the
        // close frame must not wait behind it. The part of a frame tungstenite already holds
        // stays whole in its buffer and goes out before the close frame.
        let sent = tokio::select! {
            biased;
            () = control.closing() => break,
            sent = tokio::time::timeout(WRITE_TIMEOUT, sink.send(message)) => sent,
        };
        match sent {
            Ok(Ok(())) => {}
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
