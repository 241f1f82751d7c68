//! Commands, as gateways publish them to the intake stream, and the outcomes handlers send
//! back to the originating gateway.

use serde::{Deserialize, Serialize};

use crate::error::ErrorCode;
use crate::ids::{ClientMsgId, CommandId, ConversationId, EventId, UserId};

/// A client request a handler must validate before anything is appended.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Command {
    /// Derived from `actor` and `client_id`; also the intake stream's dedupe key.
    pub id: CommandId,
    pub actor: UserId,
    pub client_id: ClientMsgId,
    /// When the gateway received the request, milliseconds since the Unix epoch.
    pub issued_at: u64,
    /// The subject the outcome goes to: the originating gateway's outcome subject.
    pub reply_to: String,
    pub action: Action,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
pub enum Action {
    /// Open (or find) the direct conversation between the actor and `peer`.
    CreateDirect { peer: UserId },
    /// Create a group owned by the actor; `members` are added as plain members.
    CreateGroup {
        #[serde(default)]
        title: Option<String>,
        members: Vec<UserId>,
    },
    PostMessage {
        conversation: ConversationId,
        body: String,
    },
    /// Move the actor's read marker in `conversation` forward to `seq`.
    MarkRead {
        conversation: ConversationId,
        seq: u64,
    },
}

impl Command {
    pub fn new(
        actor: UserId,
        client_id: ClientMsgId,
        issued_at: u64,
        reply_to: String,
        action: Action,
    ) -> Self {
        Command {
            id: CommandId::from_client(&actor, &client_id),
            actor,
            client_id,
            issued_at,
            reply_to,
            action,
        }
    }

    /// The conversation the command acts on, known before anything is validated.
    pub fn conversation(&self) -> ConversationId {
        match &self.action {
            Action::CreateDirect { peer } => ConversationId::direct(&self.actor, peer),
            Action::CreateGroup { .. } => ConversationId::group(self.id),
            Action::PostMessage { conversation, .. } | Action::MarkRead { conversation, .. } => {
                *conversation
            }
        }
    }

    /// The id of the `index`-th event this command causes.
    pub fn event_id(&self, index: u32) -> EventId {
        EventId::derive(self.id, index, self.issued_at)
    }

    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a command always serializes")
    }

    pub fn from_bytes(bytes: &[u8]) -> Result<Self, serde_json::Error> {
        serde_json::from_slice(bytes)
    }
}

/// What became of a command.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Outcome {
    pub command: CommandId,
    pub result: OutcomeResult,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum OutcomeResult {
    /// The command's event is in the log at `seq` (for a repeated create, the original
    /// creation's sequence).
    Accepted {
        conversation: ConversationId,
        seq: u64,
        event: EventId,
    },
    Rejected {
        code: ErrorCode,
        message: String,
    },
}

impl Outcome {
    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("an outcome always serializes")
    }

    pub fn from_bytes(bytes: &[u8]) -> Result<Self, serde_json::Error> {
        serde_json::from_slice(bytes)
    }
}

/// A gateway asking the handlers what became of a command the intake had already seen.
/// It carries the whole command, so a handler can also say what a repeat of a rejected
/// command gets (rejections are not in the log).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OutcomeQuery {
    pub command: Command,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retried_request_is_the_same_command_and_event() {
        let alice = UserId::parse("alice").unwrap();
        let make = |issued_at| {
            Command::new(
                alice.clone(),
                ClientMsgId::parse("c1").unwrap(),
                issued_at,
                "parley.outcome.gw".into(),
                Action::CreateGroup {
                    title: None,
                    members: vec![],
                },
            )
        };
        let (first, again) = (make(10), make(10));
        assert_eq!(first.id, again.id);
        assert_eq!(first.conversation(), again.conversation());
        assert_eq!(first.event_id(0), again.event_id(0));
        let bytes = first.to_bytes();
        assert_eq!(Command::from_bytes(&bytes).unwrap(), first);
    }

    #[test]
    fn outcome_round_trips() {
        let outcome = Outcome {
            command: CommandId::from_uuid(uuid::Uuid::nil()),
            result: OutcomeResult::Rejected {
                code: ErrorCode::NotMember,
                message: "no".into(),
            },
        };
        assert_eq!(Outcome::from_bytes(&outcome.to_bytes()).unwrap(), outcome);
    }
}
