//! Typing indicators (protocol version 2): ephemeral, never logged.
//!
//! A `typing` frame is checked against the conversation's members (a conversation the
//! socket follows needs no look-up; otherwise the store's answer is cached per socket, so a
//! typist costs at most one store read per conversation, not one per keystroke) and a rate
//! limit per socket, then published once on the conversation's live subject, marked with the
//! [`EPHEMERAL_HEADER`]. Every gateway with a local member socket already holds that
//! subscription for the conversation's events, so typing needs no subscription of its own:
//! the conversation's follower hands the notice to its version 2 sockets, except the
//! typist's own, before any event decoding.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use axum::extract::ws::Utf8Bytes;
use parley_events::protocol::ServerFrame;
use parley_events::subjects::live_subject;
use parley_events::typing::{EPHEMERAL_HEADER, TYPING, TypingNotice, TypingState};
use parley_events::{ClientMsgId, ConversationId, ErrorCode};
use tokio::time::Instant;
use tracing::{debug, warn};

use super::Shared;
use super::delivery::{Outbox, Routes};
use super::socket::Session;
use crate::telemetry;

/// How long a `started` holds on the recipients' side unless refreshed. Clients refresh it
/// while the user keeps typing, at most once per [`MIN_REFRESH`].
pub const EXPIRES_IN: Duration = Duration::from_secs(6);
/// A `started` for a conversation within this of the last one forwarded is dropped.
const MIN_REFRESH: Duration = Duration::from_secs(1);
/// Typing frames one socket may have forwarded per second, over all its conversations.
const MAX_PER_SECOND: u32 = 10;
/// How long a socket's membership answer from the store is trusted; a "no" only briefly,
/// since the store may not hold a conversation created a moment ago yet.
const MEMBER_TTL: Duration = Duration::from_secs(60);
const NOT_MEMBER_TTL: Duration = Duration::from_secs(5);
/// Conversations a socket remembers typing state and membership for; past this it
/// forgets them all, which costs one store read per conversation typed in afterwards.
const MAX_REMEMBERED: usize = 256;

/// One socket's typing state: what it may type in, and what it last sent where.
#[derive(Default)]
pub struct SocketTyping(Mutex<Remembered>);

#[derive(Default)]
struct Remembered {
    /// Whether the user is a member, and when that was read from the store.
    members: HashMap<ConversationId, (bool, Instant)>,
    /// The last state forwarded per conversation, and when.
    last: HashMap<ConversationId, (TypingState, Instant)>,
    /// The current one-second window of the socket-wide limit, and what it let through.
    window: Option<(Instant, u32)>,
}

/// What becomes of one `typing` frame from a member.
#[derive(Debug, PartialEq, Eq)]
enum Verdict {
    Forward,
    /// Over the socket's rate limits.
    RateLimited,
    /// A `stopped` for a conversation the socket was not typing in.
    Redundant,
}

impl Verdict {
    fn as_str(&self) -> &'static str {
        match self {
            Verdict::Forward => "forwarded",
            Verdict::RateLimited => "rate_limited",
            Verdict::Redundant => "redundant",
        }
    }
}

impl SocketTyping {
    fn remembered(&self) -> std::sync::MutexGuard<'_, Remembered> {
        self.0.lock().expect("typing state lock is never poisoned")
    }

    fn cached_membership(&self, conversation: ConversationId, now: Instant) -> Option<bool> {
        self.remembered()
            .members
            .get(&conversation)
            .filter(|(member, read)| {
                let ttl = if *member { MEMBER_TTL } else { NOT_MEMBER_TTL };
                now.duration_since(*read) < ttl
            })
            .map(|(member, _)| *member)
    }

    fn remember_membership(&self, conversation: ConversationId, member: bool, now: Instant) {
        let mut remembered = self.remembered();
        if remembered.members.len() >= MAX_REMEMBERED {
            remembered.members.clear();
        }
        remembered.members.insert(conversation, (member, now));
    }

    /// Decide on a frame from a member, and count it as sent when it is forwarded.
    fn judge(&self, conversation: ConversationId, state: TypingState, now: Instant) -> Verdict {
        let mut remembered = self.remembered();
        let last = remembered.last.get(&conversation).copied();
        match (state, last) {
            (TypingState::Started, Some((TypingState::Started, at)))
                if now.duration_since(at) < MIN_REFRESH =>
            {
                return Verdict::RateLimited;
            }
            (TypingState::Stopped, None | Some((TypingState::Stopped, _))) => {
                return Verdict::Redundant;
            }
            _ => {}
        }
        let window = match remembered.window {
            Some((start, count)) if now.duration_since(start) < Duration::from_secs(1) => {
                (start, count)
            }
            _ => (now, 0),
        };
        if window.1 >= MAX_PER_SECOND {
            return Verdict::RateLimited;
        }
        remembered.window = Some((window.0, window.1 + 1));
        if remembered.last.len() >= MAX_REMEMBERED {
            remembered.last.clear();
        }
        remembered.last.insert(conversation, (state, now));
        Verdict::Forward
    }
}

/// Handle a `typing` frame: refused with an `error` when the user is not a member (or the
/// store cannot say), dropped silently when over the rate limits, else published.
pub async fn handle(
    shared: &Shared,
    session: &Session,
    outbox: &Outbox,
    id: Option<ClientMsgId>,
    conversation: ConversationId,
    state: TypingState,
) {
    let now = Instant::now();
    let known = if shared.routes.follows(session.conn, conversation) {
        Some(true)
    } else {
        session.typing.cached_membership(conversation, now)
    };
    let member = match known {
        Some(member) => member,
        None => match shared.store.role_of(conversation, &session.user).await {
            Ok(role) => {
                session
                    .typing
                    .remember_membership(conversation, role.is_some(), now);
                role.is_some()
            }
            Err(e) => {
                warn!(error = %e, "cannot check membership for typing");
                count("refused");
                outbox
                    .answer(&ServerFrame::error(
                        id,
                        ErrorCode::Unavailable,
                        "typing is temporarily unavailable",
                    ))
                    .await;
                return;
            }
        },
    };
    if !member {
        count("refused");
        outbox
            .answer(&ServerFrame::error(
                id,
                ErrorCode::NotMember,
                "you are not a member of this conversation",
            ))
            .await;
        return;
    }
    let verdict = session.typing.judge(conversation, state, now);
    count(verdict.as_str());
    if verdict != Verdict::Forward {
        return;
    }
    let notice = TypingNotice {
        conversation,
        user: session.user.clone(),
        state,
        expires_in_ms: match state {
            TypingState::Started => EXPIRES_IN.as_millis() as u64,
            TypingState::Stopped => 0,
        },
    };
    let mut headers = async_nats::HeaderMap::new();
    headers.insert(EPHEMERAL_HEADER, TYPING);
    let publish = shared.nats.client.publish_with_headers(
        live_subject(conversation),
        headers,
        notice.to_bytes().into(),
    );
    // A typing notice is only worth its few seconds: one NATS cannot take now is dropped.
    if let Err(cause) = shared.best_effort(publish).await {
        debug!(%cause, "typing notice not published");
    }
}

fn count(result: &'static str) {
    metrics::counter!(telemetry::GATEWAY_TYPING_RECEIVED_TOTAL, "result" => result).increment(1);
}

/// Whether a message on a live conversation subject is ephemeral (not a recorded event).
pub fn is_ephemeral(message: &async_nats::Message) -> bool {
    message
        .headers
        .as_ref()
        .is_some_and(|headers| headers.get(EPHEMERAL_HEADER).is_some())
}

/// Hand an ephemeral message to the local members' version 2 sockets, leaving out the
/// typist's own. Kinds this build does not know are ignored.
pub fn deliver(routes: &Routes, conversation: ConversationId, message: &async_nats::Message) {
    let kind = message
        .headers
        .as_ref()
        .and_then(|headers| headers.get(EPHEMERAL_HEADER));
    if kind.map(|kind| kind.as_str()) != Some(TYPING) {
        return;
    }
    let notice = match TypingNotice::from_bytes(&message.payload) {
        Ok(notice) if notice.conversation == conversation => notice,
        Ok(_) => return,
        Err(e) => {
            warn!(%conversation, error = %e, "unreadable typing notice");
            return;
        }
    };
    let typist = notice.user.clone();
    let frame = Utf8Bytes::from(ServerFrame::Typing(notice).to_json());
    let delivered = routes.push_to_followers(conversation, &frame, |user, protocol| {
        protocol >= 2 && *user != typist
    });
    metrics::counter!(telemetry::GATEWAY_TYPING_DELIVERED_TOTAL).increment(delivered);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conversation(n: u128) -> ConversationId {
        ConversationId::from_uuid(uuid::Uuid::from_u128(n))
    }

    #[test]
    fn one_started_per_conversation_per_second_and_stopped_only_after_started() {
        let typing = SocketTyping::default();
        let start = Instant::now();
        let at = |ms| start + Duration::from_millis(ms);
        let c = conversation(1);
        assert_eq!(
            typing.judge(c, TypingState::Stopped, at(0)),
            Verdict::Redundant
        );
        assert_eq!(
            typing.judge(c, TypingState::Started, at(0)),
            Verdict::Forward
        );
        assert_eq!(
            typing.judge(c, TypingState::Started, at(999)),
            Verdict::RateLimited
        );
        assert_eq!(
            typing.judge(c, TypingState::Started, at(1000)),
            Verdict::Forward
        );
        // Another conversation is limited on its own.
        assert_eq!(
            typing.judge(conversation(2), TypingState::Started, at(1000)),
            Verdict::Forward
        );
        assert_eq!(
            typing.judge(c, TypingState::Stopped, at(1001)),
            Verdict::Forward
        );
        assert_eq!(
            typing.judge(c, TypingState::Stopped, at(1002)),
            Verdict::Redundant
        );
        assert_eq!(
            typing.judge(c, TypingState::Started, at(1003)),
            Verdict::Forward
        );
    }

    #[test]
    fn a_socket_forwards_at_most_ten_a_second_over_all_conversations() {
        let typing = SocketTyping::default();
        let start = Instant::now();
        let forwarded = (0..20)
            .filter(|n| {
                typing.judge(conversation(*n), TypingState::Started, start) == Verdict::Forward
            })
            .count();
        assert_eq!(forwarded, MAX_PER_SECOND as usize);
        let later = start + Duration::from_secs(1);
        assert_eq!(
            typing.judge(conversation(100), TypingState::Started, later),
            Verdict::Forward
        );
    }
}
