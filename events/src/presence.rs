//! Presence updates: ephemeral, never logged. Gateways publish one when a socket opens, at
//! every heartbeat interval while it stays open, and when it closes; the presence projector
//! turns them into expiring records in Redis.

use serde::{Deserialize, Serialize};

use crate::ids::UserId;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PresenceUpdate {
    pub user: UserId,
    /// The socket's connection id; a user with several devices has several.
    pub connection: String,
    pub state: ConnectionState,
    /// Milliseconds since the Unix epoch, by the gateway's clock.
    pub at: u64,
    /// How long the record stays valid without another heartbeat.
    pub ttl_secs: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ConnectionState {
    /// The socket is open (sent on open and at every heartbeat).
    Open,
    /// The socket closed.
    Closed,
}

/// A user's aggregate presence: online while any of their connections is. Answers a
/// presence query, and is what the projector publishes when a user comes online or goes
/// offline.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserStatus {
    pub user: UserId,
    pub online: bool,
    /// Milliseconds since the Unix epoch of the newest update from any of the user's
    /// connections; absent when never seen (or presence was wiped since).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_seen: Option<u64>,
}

/// A gateway asking the projectors for the current status of some users.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PresenceQuery {
    pub users: Vec<UserId>,
}

/// The projectors' answer to a [`PresenceQuery`], in the query's order.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PresenceAnswer {
    pub users: Vec<UserStatus>,
}

json_bytes!(PresenceUpdate, UserStatus, PresenceQuery, PresenceAnswer);
