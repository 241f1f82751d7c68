//! The stable error codes a client can see, on an `error` frame or an HTTP error body.
//!
//! A code never changes meaning once released; clients match on it. Each code says whether
//! retrying the same request can succeed.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The frame is not valid JSON, or a field is missing or has the wrong shape.
    BadFrame,
    /// The frame's `type` is not one this server knows.
    UnknownFrameType,
    /// The message body exceeds the configured limit.
    MessageTooLarge,
    /// The message body is empty or only whitespace.
    EmptyMessage,
    /// The request is well formed but not allowed (for example a direct conversation with
    /// oneself, or a group over the member limit).
    InvalidRequest,
    /// No conversation with that id exists.
    ConversationNotFound,
    /// The sender is not a member of the conversation.
    NotMember,
    /// No token was presented at the upgrade.
    TokenMissing,
    /// The token's signature, algorithm or claims are not valid.
    TokenInvalid,
    /// The token has expired.
    TokenExpired,
    /// The token was revoked (its `jti`, or every token of its user issued until then).
    TokenRevoked,
    /// The page's origin is not allowed to open a socket.
    OriginNotAllowed,
    /// The request did not complete in time; it may still take effect, so retry with the
    /// same id.
    Timeout,
    /// A dependency is unavailable; retry with the same id.
    Unavailable,
    /// The request's id was already used by this user for a different request; the
    /// request was not applied. Send it with a fresh id.
    IdReused,
    /// The actor's role in the conversation does not allow the request (the permission
    /// table in docs/protocol.md).
    Forbidden,
    /// The last owner of a group may not leave or step down; make another member an owner
    /// first.
    LastOwner,
    /// The member is muted in this conversation; the message says until when.
    Muted,
    /// Too many requests from this user or address; nothing was done. Retry after
    /// `retry_after_ms`.
    RateLimited,
    /// The referenced sequence is not a message of this conversation, or the message was
    /// deleted (for edits, reactions and replies).
    MessageNotFound,
    /// This address holds as many connections to the gateway as it may
    /// (`gateway.max_connections_per_ip`); retry once one of them has closed.
    TooManyConnections,
}

impl ErrorCode {
    pub const ALL: [ErrorCode; 21] = [
        ErrorCode::BadFrame,
        ErrorCode::UnknownFrameType,
        ErrorCode::MessageTooLarge,
        ErrorCode::EmptyMessage,
        ErrorCode::InvalidRequest,
        ErrorCode::ConversationNotFound,
        ErrorCode::NotMember,
        ErrorCode::TokenMissing,
        ErrorCode::TokenInvalid,
        ErrorCode::TokenExpired,
        ErrorCode::TokenRevoked,
        ErrorCode::OriginNotAllowed,
        ErrorCode::Timeout,
        ErrorCode::Unavailable,
        ErrorCode::IdReused,
        ErrorCode::Forbidden,
        ErrorCode::LastOwner,
        ErrorCode::Muted,
        ErrorCode::RateLimited,
        ErrorCode::MessageNotFound,
        ErrorCode::TooManyConnections,
    ];

    /// The code as it appears on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadFrame => "bad_frame",
            ErrorCode::UnknownFrameType => "unknown_frame_type",
            ErrorCode::MessageTooLarge => "message_too_large",
            ErrorCode::EmptyMessage => "empty_message",
            ErrorCode::InvalidRequest => "invalid_request",
            ErrorCode::ConversationNotFound => "conversation_not_found",
            ErrorCode::NotMember => "not_member",
            ErrorCode::TokenMissing => "token_missing",
            ErrorCode::TokenInvalid => "token_invalid",
            ErrorCode::TokenExpired => "token_expired",
            ErrorCode::TokenRevoked => "token_revoked",
            ErrorCode::OriginNotAllowed => "origin_not_allowed",
            ErrorCode::Timeout => "timeout",
            ErrorCode::Unavailable => "unavailable",
            ErrorCode::IdReused => "id_reused",
            ErrorCode::Forbidden => "forbidden",
            ErrorCode::LastOwner => "last_owner",
            ErrorCode::Muted => "muted",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::MessageNotFound => "message_not_found",
            ErrorCode::TooManyConnections => "too_many_connections",
        }
    }

    /// Whether the same request, retried with the same id, can succeed.
    pub fn retryable(self) -> bool {
        matches!(
            self,
            ErrorCode::Timeout
                | ErrorCode::Unavailable
                | ErrorCode::RateLimited
                | ErrorCode::TooManyConnections
        )
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_names_match_serde() {
        for code in ErrorCode::ALL {
            let json = serde_json::to_string(&code).unwrap();
            assert_eq!(json, format!("\"{}\"", code.as_str()));
            assert_eq!(serde_json::from_str::<ErrorCode>(&json).unwrap(), code);
        }
    }
}
