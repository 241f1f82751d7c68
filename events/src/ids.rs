//! Identifiers. Each is a newtype whose constructor validates, so an invalid id cannot
//! exist past the boundary where it was parsed.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize};
use uuid::Uuid;

/// Why a string was refused as an identifier.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    #[error("{kind} must not be empty")]
    Empty { kind: &'static str },
    #[error("{kind} is longer than {max} bytes")]
    TooLong { kind: &'static str, max: usize },
    #[error("{kind} contains a character that is not allowed")]
    BadCharacter { kind: &'static str },
}

// Fixed namespaces for the name-based (v5) ids. Changing one changes every derived id in
// stored history, so they are part of the log format.
const DIRECT_NAMESPACE: Uuid = Uuid::from_u128(0x6a5f_0d3c_7c1e_4f0b_9a57_2f1e_8c3d_0001);
const GROUP_NAMESPACE: Uuid = Uuid::from_u128(0x6a5f_0d3c_7c1e_4f0b_9a57_2f1e_8c3d_0002);
const COMMAND_NAMESPACE: Uuid = Uuid::from_u128(0x6a5f_0d3c_7c1e_4f0b_9a57_2f1e_8c3d_0003);
const EVENT_NAMESPACE: Uuid = Uuid::from_u128(0x6a5f_0d3c_7c1e_4f0b_9a57_2f1e_8c3d_0004);

/// A user, as named by the `sub` claim of the token the embedding application issued.
///
/// 1 to 128 bytes, no whitespace or control characters.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(transparent)]
pub struct UserId(String);

impl UserId {
    pub const MAX_LEN: usize = 128;

    pub fn parse(value: impl Into<String>) -> Result<Self, IdError> {
        let value = value.into();
        check_text("user id", &value, Self::MAX_LEN, |c| {
            !c.is_whitespace() && !c.is_control()
        })?;
        Ok(Self(value))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// The client's id for one request (a send, a create, a history query).
///
/// Chosen by the client, unique per user; a retried send reuses it, which is what makes
/// sends idempotent. 1 to 64 bytes of `A-Z a-z 0-9 - _ . :`.
#[derive(Clone, PartialEq, Eq, Hash, Serialize)]
#[serde(transparent)]
pub struct ClientMsgId(String);

impl ClientMsgId {
    pub const MAX_LEN: usize = 64;

    pub fn parse(value: impl Into<String>) -> Result<Self, IdError> {
        let value = value.into();
        check_text("client message id", &value, Self::MAX_LEN, |c| {
            c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.' | ':')
        })?;
        Ok(Self(value))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

fn check_text(
    kind: &'static str,
    value: &str,
    max: usize,
    allowed: impl Fn(char) -> bool,
) -> Result<(), IdError> {
    if value.is_empty() {
        return Err(IdError::Empty { kind });
    }
    if value.len() > max {
        return Err(IdError::TooLong { kind, max });
    }
    if !value.chars().all(allowed) {
        return Err(IdError::BadCharacter { kind });
    }
    Ok(())
}

macro_rules! validated_deserialize {
    ($ty:ty) => {
        impl<'de> Deserialize<'de> for $ty {
            fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                let raw = String::deserialize(deserializer)?;
                <$ty>::parse(raw).map_err(serde::de::Error::custom)
            }
        }

        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl fmt::Debug for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{:?}", self.0)
            }
        }
    };
}
validated_deserialize!(UserId);
validated_deserialize!(ClientMsgId);

macro_rules! uuid_id {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(transparent)]
        pub struct $name(Uuid);

        impl $name {
            pub const fn from_uuid(uuid: Uuid) -> Self {
                Self(uuid)
            }

            pub const fn as_uuid(&self) -> &Uuid {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                self.0.hyphenated().fmt(f)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({})", stringify!($name), self.0.hyphenated())
            }
        }

        impl std::str::FromStr for $name {
            type Err = uuid::Error;

            fn from_str(s: &str) -> Result<Self, Self::Err> {
                Uuid::parse_str(s).map(Self)
            }
        }
    };
}

uuid_id!(
    /// A conversation. Direct conversations have an id derived from their pair of users
    /// (so creating one twice yields the same conversation); groups derive theirs from the
    /// command that created them (so a retried create yields the same group).
    ConversationId
);
uuid_id!(
    /// A command, derived from the sender and the client's message id: the same client
    /// request always maps to the same command, however often it is retried or redelivered.
    CommandId
);
uuid_id!(
    /// An event: a UUIDv7 whose time is the command's issue time and whose remaining bits
    /// derive from the command, so re-handling a command produces the same event id.
    EventId
);

impl ConversationId {
    /// The one direct conversation between two users, whichever of them asks.
    pub fn direct(a: &UserId, b: &UserId) -> Self {
        let (low, high) = if a <= b { (a, b) } else { (b, a) };
        let name = format!("{}\n{}", low.as_str(), high.as_str());
        Self(Uuid::new_v5(&DIRECT_NAMESPACE, name.as_bytes()))
    }

    /// The group created by a command.
    pub fn group(command: CommandId) -> Self {
        Self(Uuid::new_v5(&GROUP_NAMESPACE, command.0.as_bytes()))
    }
}

impl CommandId {
    pub fn from_client(actor: &UserId, client_id: &ClientMsgId) -> Self {
        let name = format!("{}\n{}", actor.as_str(), client_id.as_str());
        Self(Uuid::new_v5(&COMMAND_NAMESPACE, name.as_bytes()))
    }
}

impl EventId {
    /// The `index`-th event caused by `command`, timestamped with the command's issue time.
    pub fn derive(command: CommandId, index: u32, issued_at_ms: u64) -> Self {
        let mut name = [0u8; 20];
        name[..16].copy_from_slice(command.0.as_bytes());
        name[16..].copy_from_slice(&index.to_be_bytes());
        let digest = Uuid::new_v5(&EVENT_NAMESPACE, &name);
        let mut random = [0u8; 10];
        random.copy_from_slice(&digest.as_bytes()[6..16]);
        Self(uuid::Builder::from_unix_timestamp_millis(issued_at_ms, &random).into_uuid())
    }

    /// Milliseconds since the Unix epoch, read back from the UUIDv7 timestamp.
    pub fn unix_millis(&self) -> u64 {
        self.0
            .get_timestamp()
            .map(|ts| {
                let (secs, nanos) = ts.to_unix();
                secs * 1000 + u64::from(nanos) / 1_000_000
            })
            .unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(s: &str) -> UserId {
        UserId::parse(s).unwrap()
    }

    #[test]
    fn direct_conversation_is_the_same_from_either_side() {
        let (a, b) = (user("alice"), user("bob"));
        assert_eq!(
            ConversationId::direct(&a, &b),
            ConversationId::direct(&b, &a)
        );
        assert_ne!(
            ConversationId::direct(&a, &b),
            ConversationId::direct(&a, &user("carol"))
        );
    }

    #[test]
    fn event_id_is_a_deterministic_v7() {
        let command = CommandId::from_client(&user("alice"), &ClientMsgId::parse("m1").unwrap());
        let first = EventId::derive(command, 0, 1_700_000_000_123);
        assert_eq!(first, EventId::derive(command, 0, 1_700_000_000_123));
        assert_ne!(first, EventId::derive(command, 1, 1_700_000_000_123));
        assert_eq!(first.as_uuid().get_version_num(), 7);
        assert_eq!(first.unix_millis(), 1_700_000_000_123);
    }

    #[test]
    fn command_id_is_scoped_by_user() {
        let id = ClientMsgId::parse("m1").unwrap();
        assert_ne!(
            CommandId::from_client(&user("alice"), &id),
            CommandId::from_client(&user("bob"), &id)
        );
    }

    #[test]
    fn invalid_ids_are_refused() {
        assert_eq!(UserId::parse(""), Err(IdError::Empty { kind: "user id" }));
        assert!(matches!(
            UserId::parse("a b"),
            Err(IdError::BadCharacter { .. })
        ));
        assert!(matches!(
            UserId::parse("x".repeat(129)),
            Err(IdError::TooLong { .. })
        ));
        assert!(matches!(
            ClientMsgId::parse("a/b"),
            Err(IdError::BadCharacter { .. })
        ));
        assert!(serde_json::from_str::<UserId>("\"\"").is_err());
        assert!(serde_json::from_str::<ClientMsgId>("\"ok-1\"").is_ok());
    }
}
