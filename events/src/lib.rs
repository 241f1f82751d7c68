//! Parley's formats: everything that crosses a process boundary or is stored in the log.
//!
//! Layout:
//! - [`ids`]: identifiers and how the deterministic ones are derived (direct conversations,
//!   command ids, event ids), each a newtype with a parsing constructor.
//! - [`event`]: the event envelope as stored in the log, the event catalogue, and the
//!   upcasting path from older event versions.
//! - [`command`]: commands on the intake stream and the outcomes handlers send back.
//! - [`protocol`]: the client protocol, JSON frames over WebSocket text frames.
//! - [`error`]: the stable error codes clients see.
//! - [`subjects`]: NATS subject and stream names, and the conversation-to-shard mapping.
//! - [`presence`]: the ephemeral presence updates gateways publish, and the per-user status
//!   derived from them.
//! - [`typing`]: ephemeral typing indicators.
//!
//! Invariant: this crate depends on serde and uuid only. Nothing here is async or knows
//! about NATS, Redis or any store; every other crate speaks through these types.

/// `to_bytes`/`from_bytes` (JSON) for types that travel on core NATS subjects.
macro_rules! json_bytes {
    ($($kind:ty),*) => {$(
        impl $kind {
            pub fn to_bytes(&self) -> Vec<u8> {
                serde_json::to_vec(self).expect("plain data always serializes")
            }

            pub fn from_bytes(bytes: &[u8]) -> Result<Self, serde_json::Error> {
                serde_json::from_slice(bytes)
            }
        }
    )*};
}

pub mod command;
pub mod error;
pub mod event;
pub mod ids;
pub mod presence;
pub mod protocol;
pub mod subjects;
pub mod typing;

pub use command::{Action, Command, Fingerprint, Outcome, OutcomeResult};
pub use error::ErrorCode;
pub use event::{
    ConversationCreated, ConversationKind, ConversationRead, DecodeError, Event, EventEnvelope,
    Member, MessageDeleted, MessageEdited, MessagePosted, Reaction, RecordedEvent, Role,
};
pub use ids::{ClientMsgId, CommandId, ConversationId, EventId, IdError, UserId};
