//! Revoked tokens at the gateway: refused at the upgrade, and every live session a new
//! revocation covers closed (1008 `token revoked`) as soon as the bucket's watch delivers it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use futures::StreamExt;
use parley_events::UserId;
use parley_events::protocol::close;
use tracing::warn;

use super::delivery::{ConnectionId, SocketControl};
use crate::auth::Claims;
use crate::revocation::{Revocation, Revoked, revocation_covers};
use crate::telemetry;

/// The close reason of a socket whose token was revoked.
pub const REVOKED_REASON: &str = "token revoked";

/// What a live socket was opened with, and how to close it.
struct LiveToken {
    user: UserId,
    claims: Claims,
    control: Arc<SocketControl>,
}

/// The revocations in force and the live sockets they may cover.
pub struct Revocations {
    revoked: Revoked,
    live: Mutex<HashMap<ConnectionId, LiveToken>>,
}

impl Revocations {
    pub fn new(revoked: Revoked) -> Arc<Revocations> {
        Arc::new(Revocations {
            revoked,
            live: Mutex::default(),
        })
    }

    pub fn covers(&self, user: &UserId, claims: &Claims) -> bool {
        self.revoked.covers(user, claims)
    }

    /// Follow socket `conn` until [`untrack`](Self::untrack); closed at once if a
    /// revocation that arrived since its upgrade already covers it.
    pub fn track(
        &self,
        conn: ConnectionId,
        user: UserId,
        claims: Claims,
        control: Arc<SocketControl>,
    ) {
        if self.revoked.covers(&user, &claims) {
            control.close(close::POLICY_VIOLATION, REVOKED_REASON);
            return;
        }
        self.live.lock().expect("live tokens lock").insert(
            conn,
            LiveToken {
                user,
                claims,
                control,
            },
        );
    }

    pub fn untrack(&self, conn: ConnectionId) {
        self.live.lock().expect("live tokens lock").remove(&conn);
    }

    /// Take in the bucket's new records until the watch ends, closing the sockets each
    /// covers.
    pub async fn follow(self: Arc<Self>, mut watch: async_nats::jetstream::kv::Watch) {
        while let Some(entry) = watch.next().await {
            let entry = match entry {
                Ok(entry) => entry,
                Err(e) => {
                    warn!(error = %e, "revocations watch failed");
                    continue;
                }
            };
            let Some((revocation, at)) = self.revoked.apply(&entry) else {
                continue;
            };
            let kind = match revocation {
                Revocation::User(_) => "user",
                Revocation::Token(_) => "token",
            };
            metrics::counter!(telemetry::GATEWAY_REVOCATIONS_TOTAL, "kind" => kind).increment(1);
            let live = self.live.lock().expect("live tokens lock");
            for token in live.values() {
                if revocation_covers(&revocation, at, &token.user, &token.claims) {
                    token.control.close(close::POLICY_VIOLATION, REVOKED_REASON);
                }
            }
        }
        warn!("the revocations watch ended; new revocations no longer close live sockets");
    }
}
