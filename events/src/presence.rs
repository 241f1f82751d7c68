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

impl PresenceUpdate {
    pub fn to_bytes(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a presence update always serializes")
    }

    pub fn from_bytes(bytes: &[u8]) -> Result<Self, serde_json::Error> {
        serde_json::from_slice(bytes)
    }
}
