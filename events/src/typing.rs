//! Typing indicators: ephemeral, never logged. A gateway publishes one on its conversation's
//! live subject (marked by a header, so it needs no subscription of its own) and every
//! gateway following the conversation hands it to its members' sockets.

use serde::{Deserialize, Serialize};

use crate::ids::{ConversationId, UserId};

/// Header that marks a message on a live conversation subject as ephemeral rather than a
/// recorded event; its value says which kind.
pub const EPHEMERAL_HEADER: &str = "Parley-Ephemeral";
/// [`EPHEMERAL_HEADER`] value of a typing indicator.
pub const TYPING: &str = "typing";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TypingState {
    Started,
    Stopped,
}

/// Who is typing where: the payload on the live subject, and the `typing` server frame.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TypingNotice {
    pub conversation: ConversationId,
    pub user: UserId,
    pub state: TypingState,
    /// How long a `started` holds unless refreshed; 0 for `stopped`.
    pub expires_in_ms: u64,
}

json_bytes!(TypingNotice);
