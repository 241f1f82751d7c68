//! Presence in Redis: which users have a live socket, and when each was last seen.
//!
//! Per user, a sorted set `parley:presence:{user}` holds one member per open connection,
//! scored with the time that connection's record expires; the whole key also expires, so a
//! gateway that dies without a word leaves nothing behind once its heartbeats stop. A
//! second key, `parley:last_seen:{user}`, keeps the newest time the user was seen. The
//! braces are Redis Cluster hash tags: both keys of a user live in one slot.
//!
//! A third key, `parley:presence:expiring`, lists every user with an open record by its
//! latest expiry, so a sweep finds the users whose records all expired without a close.
//!
//! Nothing here is precious: wiping Redis empties presence until the next heartbeat round
//! (at most one heartbeat interval) rebuilds it from live connections.

use parley_events::UserId;
use parley_events::presence::{ConnectionState, PresenceUpdate, UserStatus};
use redis::aio::ConnectionManager;
use redis::{ConnectionAddr, IntoConnectionInfo};

use crate::tls::{self, TlsClient, TlsError};

#[derive(Debug, thiserror::Error)]
pub enum PresenceError {
    /// Redis did not answer, or answered with an error; retrying later can succeed.
    #[error("presence store: {0}")]
    Redis(#[from] redis::RedisError),
    /// The TLS settings cannot work; retrying cannot help.
    #[error("presence store: {0}")]
    Tls(#[from] TlsError),
}

/// A user's presence as read from Redis.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UserPresence {
    /// Number of connections whose record has not expired.
    pub connections: u32,
    /// Milliseconds since the Unix epoch; `None` if never seen (or Redis was wiped).
    pub last_seen: Option<u64>,
}

impl UserPresence {
    pub fn online(&self) -> bool {
        self.connections > 0
    }

    /// As gateways and clients see it.
    pub fn of(self, user: UserId) -> UserStatus {
        UserStatus {
            user,
            online: self.online(),
            last_seen: self.last_seen,
        }
    }
}

/// What recording one update did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Recorded {
    /// Whether the user had a live connection just before the update.
    pub was_online: bool,
    /// The user's presence just after it.
    pub now: UserPresence,
}

impl Recorded {
    /// Whether the update brought the user online or took them offline.
    pub fn changed(&self) -> bool {
        self.was_online != self.now.online()
    }
}

/// Where Redis is and how to reach it, checked but not connected yet.
#[derive(Debug, Clone)]
pub struct PresenceClient(redis::Client);

#[derive(Clone)]
pub struct PresenceStore {
    conn: ConnectionManager,
}

/// Set KEYS[1] to ARGV[1] unless it already holds a larger number.
const KEEP_NEWEST: &str = "local current = tonumber(redis.call('GET', KEYS[1]))
if current == nil or current < tonumber(ARGV[1]) then redis.call('SET', KEYS[1], ARGV[1]) end
return 0";

/// Every user with an open connection record, scored with the latest expiry among them: the
/// expiry sweep's work list. One key for all users, written outside each user's
/// transaction, so it never shares a transaction with keys of another Redis Cluster slot.
const EXPIRING_KEY: &str = "parley:presence:expiring";

fn connections_key(user: &UserId) -> String {
    format!("parley:presence:{{{user}}}")
}

fn last_seen_key(user: &UserId) -> String {
    format!("parley:last_seen:{{{user}}}")
}

impl PresenceStore {
    /// The Redis client for `url` (`redis://host:port/db`, or `rediss://` for TLS). With
    /// `tls`, the URL must be `rediss://`, and the server is verified against `tls`'s CA
    /// instead of the system's roots; without it, a `rediss://` URL uses the system's roots.
    /// Every file is read here, so a bad one fails now rather than at each connection.
    pub fn client(url: &str, tls: Option<&TlsClient>) -> Result<PresenceClient, PresenceError> {
        // The redis client builds its TLS configuration from the process default.
        tls::install_process_provider();
        // Without TCP_NODELAY, a command written while the previous one is unacknowledged
        // (heartbeats and queries share the connection) waits out Redis' delayed ACK: 40 ms.
        let info = url
            .into_connection_info()?
            .set_tcp_settings(redis::io::tcp::TcpSettings::default().set_nodelay(true));
        let Some(settings) = tls else {
            return Ok(PresenceClient(redis::Client::open(info)?));
        };
        if !matches!(info.addr(), ConnectionAddr::TcpTls { .. }) {
            return Err(TlsError::new("TLS settings for Redis need a rediss:// URL").into());
        }
        if settings.server_name.is_some() {
            return Err(TlsError::new(
                "Redis is verified against the host of its URL; a server name cannot be set",
            )
            .into());
        }
        // Checks every file the way the other clients do, with the same messages.
        settings.client_config()?;
        let client_tls = match &settings.client_cert {
            Some(cert) => Some(redis::ClientTlsConfig {
                client_cert: tls::read(&cert.cert_file)?,
                client_key: tls::read(&cert.key_file)?,
            }),
            None => None,
        };
        let root_cert = settings.ca_file.as_deref().map(tls::read).transpose()?;
        let certificates = redis::TlsCertificates {
            client_tls,
            root_cert,
        };
        Ok(PresenceClient(redis::Client::build_with_tls(
            info,
            certificates,
        )?))
    }

    /// Connect with a client from [`client`](Self::client).
    pub async fn connect(client: &PresenceClient) -> Result<Self, PresenceError> {
        let conn = client.0.get_connection_manager().await?;
        Ok(PresenceStore { conn })
    }

    /// Record one update; whether it brought the user online or offline. Updates may
    /// arrive late or twice; an open record only ever extends a connection's expiry, and a
    /// close removes it.
    ///
    /// The connections alive at `update.at` are counted before and after, in the same
    /// transaction as the change, so of several projector instances recording updates of
    /// one user at once exactly one sees each transition.
    pub async fn record(&self, update: &PresenceUpdate) -> Result<Recorded, PresenceError> {
        let key = connections_key(&update.user);
        let ttl_ms = u64::from(update.ttl_secs) * 1000;
        let mut pipe = redis::pipe();
        pipe.atomic().zcount(&key, update.at, "+inf");
        match update.state {
            ConnectionState::Open => {
                let expires = update.at + ttl_ms;
                pipe.cmd("ZADD")
                    .arg(&key)
                    .arg("GT")
                    .arg(expires)
                    .arg(&update.connection)
                    .ignore()
                    .zrembyscore(&key, "-inf", format!("({}", update.at))
                    .ignore()
                    .pexpire(&key, i64::try_from(ttl_ms).unwrap_or(i64::MAX))
                    .ignore();
            }
            ConnectionState::Closed => {
                pipe.zrem(&key, &update.connection).ignore();
            }
        }
        // Updates from several gateways may arrive out of order: last seen only moves forward.
        pipe.cmd("EVAL")
            .arg(KEEP_NEWEST)
            .arg(1)
            .arg(last_seen_key(&update.user))
            .arg(update.at)
            .ignore()
            .zcount(&key, update.at, "+inf")
            .get(last_seen_key(&update.user));
        let mut conn = self.conn.clone();
        let (before, connections, last_seen): (u32, u32, Option<u64>) =
            pipe.query_async(&mut conn).await?;
        let recorded = Recorded {
            was_online: before > 0,
            now: UserPresence {
                connections,
                last_seen,
            },
        };
        // Keep the sweep's list: each open extends the user's latest expiry; a user gone
        // offline by a close needs no sweeping.
        match update.state {
            ConnectionState::Open => {
                redis::cmd("ZADD")
                    .arg(EXPIRING_KEY)
                    .arg("GT")
                    .arg(update.at + ttl_ms)
                    .arg(update.user.as_str())
                    .query_async::<()>(&mut conn)
                    .await?;
            }
            ConnectionState::Closed if !recorded.now.online() => {
                redis::cmd("ZREM")
                    .arg(EXPIRING_KEY)
                    .arg(update.user.as_str())
                    .query_async::<()>(&mut conn)
                    .await?;
            }
            ConnectionState::Closed => {}
        }
        Ok(recorded)
    }

    /// Users whose every connection record has expired by `now_ms` without a close (their
    /// gateway died, or the close was lost), at most `limit`, with their presence now. Each
    /// is handed to one caller only, whatever the number of projectors sweeping at once:
    /// the one whose removal from the list succeeds.
    pub async fn expired(
        &self,
        now_ms: u64,
        limit: usize,
    ) -> Result<Vec<(UserId, UserPresence)>, PresenceError> {
        let mut conn = self.conn.clone();
        let due: Vec<String> = redis::cmd("ZRANGEBYSCORE")
            .arg(EXPIRING_KEY)
            .arg("-inf")
            .arg(now_ms)
            .arg("LIMIT")
            .arg(0)
            .arg(limit)
            .query_async(&mut conn)
            .await?;
        let mut expired = Vec::new();
        for id in due {
            let claimed: u32 = redis::cmd("ZREM")
                .arg(EXPIRING_KEY)
                .arg(&id)
                .query_async(&mut conn)
                .await?;
            let Ok(user) = UserId::parse(id) else {
                continue;
            };
            if claimed == 0 {
                continue;
            }
            // Still online: a heartbeat came in since the list was read; the user's next
            // heartbeat puts them back on it.
            let now = self.status(&user, now_ms).await?;
            if !now.online() {
                expired.push((user, now));
            }
        }
        Ok(expired)
    }

    /// The user's presence as of `now_ms`.
    pub async fn status(&self, user: &UserId, now_ms: u64) -> Result<UserPresence, PresenceError> {
        let mut statuses = self.statuses(std::slice::from_ref(user), now_ms).await?;
        Ok(statuses.remove(0))
    }

    /// The presence of each of `users` as of `now_ms`, in order, in one round trip.
    pub async fn statuses(
        &self,
        users: &[UserId],
        now_ms: u64,
    ) -> Result<Vec<UserPresence>, PresenceError> {
        if users.is_empty() {
            return Ok(Vec::new());
        }
        let mut pipe = redis::pipe();
        for user in users {
            pipe.zcount(connections_key(user), now_ms, "+inf")
                .get(last_seen_key(user));
        }
        let mut conn = self.conn.clone();
        // Flat: each user's connection count, then its last seen (nil when never seen).
        let values: Vec<Option<u64>> = pipe.query_async(&mut conn).await?;
        Ok(values
            .chunks(2)
            .map(|pair| UserPresence {
                connections: u32::try_from(pair[0].unwrap_or(0)).unwrap_or(u32::MAX),
                last_seen: pair.get(1).copied().flatten(),
            })
            .collect())
    }

    /// Cheap check that Redis answers, for readiness.
    pub async fn check(&self) -> Result<(), PresenceError> {
        let mut conn = self.conn.clone();
        let _: String = redis::cmd("PING").query_async(&mut conn).await?;
        Ok(())
    }
}
