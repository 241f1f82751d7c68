//! Configuration: one typed struct, loaded once from a TOML file and the environment.
//!
//! Sources, later ones winning: built-in defaults, the file (`--config` or `PARLEY_CONFIG`),
//! then environment variables `PARLEY_<SECTION>__<KEY>` (for example
//! `PARLEY_AUTH__SECRET`, `PARLEY_NATS__URL`, `PARLEY_GATEWAY__LISTEN`). Every key is
//! documented in `docs/configuration.md`. Unknown keys are errors, so a typo never silently
//! falls back to a default. Secrets are wrapped in [`Secret`], whose `Debug` never prints
//! them.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::Figment;
use figment::providers::{Format, Serialized, Toml};
use figment::value::{Dict, Value};
use serde::{Deserialize, Serialize};

/// The prefix of every environment variable Parley reads.
pub const ENV_PREFIX: &str = "PARLEY_";
/// The environment variable naming the config file when `--config` is not given.
pub const ENV_CONFIG_FILE: &str = "PARLEY_CONFIG";
/// Variables with Parley's prefix that are not configuration keys: the config file, where
/// `infra/install.sh` put the servers, and the test suite's CQL switches (which a `parley`
/// process started by a test inherits).
const ENV_NOT_CONFIG: [&str; 5] = [
    ENV_CONFIG_FILE,
    "PARLEY_HOME",
    "PARLEY_REQUIRE_CQL",
    "PARLEY_TEST_SCYLLA",
    "PARLEY_TEST_SCYLLA_DC",
];

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read configuration: {0}")]
    Load(#[from] Box<figment::Error>),
    #[error("invalid configuration:\n  - {}", .0.join("\n  - "))]
    Invalid(Vec<String>),
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub nats: NatsConfig,
    pub redis: RedisConfig,
    pub log: LogConfig,
    pub intake: IntakeConfig,
    pub auth: AuthConfig,
    pub limits: LimitsConfig,
    pub gateway: GatewayConfig,
    pub handler: HandlerConfig,
    pub projector: ProjectorConfig,
    pub admin: AdminConfig,
    pub local: LocalConfig,
    pub traces: TracesConfig,
    pub push: PushConfig,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct NatsConfig {
    /// Server URL(s), comma separated; may carry credentials, so it is kept secret. Unset:
    /// `parley up` starts a local nats-server; the single-role commands refuse to start.
    pub url: Option<Secret>,
    /// A NATS credentials file (`.creds`), for servers that require one.
    pub credentials_file: Option<PathBuf>,
    /// Client name shown in the server's connection list.
    pub name: String,
    /// TLS to the servers (required once enabled, whatever the URL's scheme).
    pub tls: TlsConfig,
}

impl Default for NatsConfig {
    fn default() -> Self {
        NatsConfig {
            url: None,
            credentials_file: None,
            name: "parley".into(),
            tls: TlsConfig::default(),
        }
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RedisConfig {
    /// `redis://host:port/db` or `rediss://` for TLS. Unset: `parley up` starts a local
    /// redis-server; the projector refuses to start.
    pub url: Option<Secret>,
    /// TLS settings for a `rediss://` URL; without them a `rediss://` URL trusts the
    /// system's roots.
    pub tls: TlsConfig,
}

/// The event log stream. Fixed at creation: a running deployment that finds a different
/// setting on the existing stream refuses to start rather than change it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    pub replicas: usize,
    /// Number of shard subjects appends are ordered on.
    pub shards: u32,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            replicas: 1,
            shards: 1024,
        }
    }
}

/// Where the intake keeps queued commands.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum IntakeStorage {
    /// No fsync on the command path. Safe because a client is acknowledged only once the
    /// command's event is in the (file-stored) log: a command lost with a server restart
    /// was never acknowledged, its sender gets `timeout`, and the retry under the same
    /// client message id is deduped by the handlers.
    Memory,
    /// Queued commands survive a server restart, at the cost of a second fsync'd write
    /// (and a fsync'd removal) per command when the server syncs every write.
    File,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct IntakeConfig {
    pub replicas: usize,
    pub storage: IntakeStorage,
    /// Bytes of queued commands held before publishes are refused; bounds a memory intake.
    pub max_bytes: i64,
    /// How long the intake remembers a client message id to drop a repeated send.
    pub duplicate_window_secs: u64,
    /// Most commands held before publishes are refused (backpressure on gateways).
    pub max_messages: i64,
    /// How long a command taken by a handler that gives no sign of life waits before it is
    /// redelivered; a live handler renews it for the commands it works on.
    pub ack_wait_secs: u64,
    /// How long a live handler may hold one delivery of a command before it is redelivered.
    pub max_hold_secs: u64,
    /// Deliveries of one command before it is given up (and its sender told).
    pub max_deliver: i64,
    /// Commands handed out to handlers and not yet acknowledged, across all instances.
    pub max_ack_pending: i64,
}

impl Default for IntakeConfig {
    fn default() -> Self {
        IntakeConfig {
            replicas: 1,
            storage: IntakeStorage::Memory,
            max_bytes: 256 * 1024 * 1024,
            duplicate_window_secs: 120,
            max_messages: 1_000_000,
            ack_wait_secs: 5,
            max_hold_secs: 30,
            max_deliver: 5,
            max_ack_pending: 4096,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// HS256 shared secret, at least 32 bytes. Unset: `parley up` creates a development
    /// secret in its data directory; a gateway without it needs `jwks_file`.
    pub secret: Option<Secret>,
    /// A JWKS file (JSON) of the public keys RS256 and EdDSA tokens are verified with,
    /// chosen by the token's `kid`; re-read when it changes.
    pub jwks_file: Option<PathBuf>,
    /// Seconds between checks of whether `jwks_file` changed.
    pub jwks_poll_secs: u64,
    /// Seconds a revocation is kept: at least the longest lifetime of the tokens issued.
    pub revocation_ttl_secs: u64,
    /// Seconds of clock skew allowed when checking `exp` and `nbf`.
    pub leeway_secs: u64,
    /// Required `iss` claim, if set.
    pub issuer: Option<String>,
    /// Required `aud` claim, if set.
    pub audience: Option<String>,
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            secret: None,
            jwks_file: None,
            jwks_poll_secs: 5,
            revocation_ttl_secs: 7 * 86_400,
            leeway_secs: 5,
            issuer: None,
            audience: None,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Largest WebSocket frame (and message) a client may send; larger closes with 1009.
    /// Unset, it is the least that carries every legal `send`
    /// ([`LimitsConfig::min_frame_bytes`]); set, it must be at least that.
    pub max_frame_bytes: Option<usize>,
    /// Largest message body in bytes; larger gets `message_too_large`.
    pub max_message_bytes: usize,
    /// Most members a group may have.
    pub max_group_members: usize,
    /// Longest group title in bytes.
    pub max_title_bytes: usize,
    /// Most users one `add_members` or `remove_members` names.
    pub max_members_per_add: usize,
    /// Most messages one `history` page returns.
    pub max_history_page: u32,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            max_frame_bytes: None,
            max_message_bytes: 4 * 1024,
            max_group_members: 10_000,
            max_title_bytes: 256,
            max_members_per_add: 1000,
            max_history_page: 100,
        }
    }
}

/// Bytes a body byte may take in a JSON frame: a control character is escaped `\u00XX`.
const MAX_ESCAPED_BYTES_PER_BYTE: usize = 6;
/// Room in a frame for all but its body: `type`, a 64-byte `id`, the conversation, the
/// keys and quotes, with room to spare for a client that escapes or spaces them too.
const FRAME_ENVELOPE_BYTES: usize = 1024;
/// The largest frame a gateway accepts, whatever the configuration.
const MAX_FRAME_BYTES: usize = 1024 * 1024;

impl LimitsConfig {
    /// The least frame size that carries every legal `send`: the largest body with every
    /// byte escaped at worst, and the rest of the frame.
    pub fn min_frame_bytes(&self) -> usize {
        self.max_message_bytes
            .saturating_mul(MAX_ESCAPED_BYTES_PER_BYTE)
            .saturating_add(FRAME_ENVELOPE_BYTES)
    }

    /// The frame size limit in force, as `welcome` announces it.
    pub fn frame_bytes(&self) -> usize {
        self.max_frame_bytes
            .unwrap_or_else(|| self.min_frame_bytes())
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct GatewayConfig {
    pub listen: SocketAddr,
    /// Frames queued for one socket before it counts as too slow and is closed (1008).
    pub send_queue: usize,
    /// Seconds between server pings.
    pub ping_interval_secs: u64,
    /// Seconds without any frame from the client before the socket is closed.
    pub idle_timeout_secs: u64,
    /// Origins allowed to open sockets from a browser (`https://app.example.com`).
    /// Empty: any origin. Requests without an `Origin` header (non-browser clients) pass.
    pub allowed_origins: Vec<String>,
    /// Seconds to wait for a handler's outcome before telling the client `timeout`.
    pub command_timeout_secs: u64,
    /// Most conversations of one user a gateway subscribes to at connect.
    pub max_conversations_per_user: u32,
    /// Most events one `resume` sends; the conversations left over are reported `more`.
    pub resume_max_events: u32,
    /// Most bytes of event frames one `resume` sends.
    pub resume_max_bytes: usize,
    /// Most sockets one gateway holds.
    pub max_connections: usize,
    /// Seconds a presence record lives without a heartbeat; heartbeats go out every third.
    pub presence_ttl_secs: u32,
    /// Seconds given to open sockets to close when the gateway shuts down.
    pub drain_secs: u64,
    /// Token buckets on requests and upgrades.
    pub rate_limits: RateLimitsConfig,
    /// A directory of static files served at `/` (the web chat's `clients/web/dist`), so
    /// the page and its sockets share one origin. Unset: the gateway serves `/ws` only.
    pub web_dir: Option<PathBuf>,
    /// `POST /dev/token` mints a token for any user. Set only by `parley up` when it made
    /// its own development secret; no file or variable can turn it on.
    #[serde(skip)]
    pub dev_tokens: bool,
    /// Milliseconds a new connection has to complete its TLS handshake and to send the
    /// upgrade request's line and headers; a slower one is closed.
    pub header_timeout_ms: u64,
    /// Most connections open at once from one IP address (IPv6: one /64), counted from
    /// accept to close; `rate_limits.exempt_networks` are spared.
    pub max_connections_per_ip: usize,
    /// `wss://`: the listener speaks TLS.
    pub tls: GatewayTlsConfig,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        GatewayConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            send_queue: 256,
            ping_interval_secs: 20,
            idle_timeout_secs: 60,
            allowed_origins: Vec::new(),
            command_timeout_secs: 10,
            max_conversations_per_user: 10_000,
            resume_max_events: 1000,
            resume_max_bytes: 1 << 20,
            max_connections: 100_000,
            presence_ttl_secs: 60,
            drain_secs: 10,
            rate_limits: RateLimitsConfig::default(),
            web_dir: None,
            dev_tokens: false,
            header_timeout_ms: 10_000,
            max_connections_per_ip: 1_000,
            tls: GatewayTlsConfig::default(),
        }
    }
}

/// TLS served by the gateway (`[gateway.tls]`). The certificate is read at start (a missing
/// or malformed file stops the gateway there) and again whenever either file changes, so
/// a rotated certificate takes effect without a restart; a replacement that cannot be used
/// keeps the previous certificate in service.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct GatewayTlsConfig {
    pub enabled: bool,
    /// PEM certificate chain, leaf first.
    pub cert_file: Option<PathBuf>,
    /// PEM private key of `cert_file`.
    pub key_file: Option<PathBuf>,
    /// Seconds between checks of the files' modification times.
    pub reload_secs: u64,
}

impl Default for GatewayTlsConfig {
    fn default() -> Self {
        GatewayTlsConfig {
            enabled: false,
            cert_file: None,
            key_file: None,
            reload_secs: 5,
        }
    }
}

impl GatewayTlsConfig {
    /// The certificate and key files, when TLS is on.
    pub fn files(&self) -> Option<(&Path, &Path)> {
        match (self.enabled, &self.cert_file, &self.key_file) {
            (true, Some(cert), Some(key)) => Some((cert.as_path(), key.as_path())),
            _ => None,
        }
    }

    fn problems(&self, require: &mut impl FnMut(bool, &str)) {
        require(
            !self.enabled || (self.cert_file.is_some() && self.key_file.is_some()),
            "gateway.tls.enabled needs both gateway.tls.cert_file and gateway.tls.key_file",
        );
        require(
            self.enabled || (self.cert_file.is_none() && self.key_file.is_none()),
            "gateway.tls files are given but gateway.tls.enabled is false: sockets would be plaintext",
        );
        require(
            [&self.cert_file, &self.key_file]
                .iter()
                .all(|f| f.as_ref().is_none_or(|p| !p.as_os_str().is_empty())),
            "gateway.tls file paths must not be empty (leave a key out instead)",
        );
        require(
            (1..=3600).contains(&self.reload_secs),
            "gateway.tls.reload_secs must be between 1 and 3600",
        );
    }
}

/// Token buckets, kept by each gateway process on its own: N gateways let a user or an
/// address through N times over, at most (clients spread over them). Rates are per second,
/// bursts are the bucket sizes. None can be 0: a limit is turned down by raising it, and an
/// address is spared the per-address limits by `exempt_networks`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RateLimitsConfig {
    /// Requests (frames of every kind) one user may send, over all their sockets.
    pub user_per_sec: u32,
    pub user_burst: u32,
    /// Requests from one IP address (IPv6: one /64), over all its sockets and users.
    pub ip_per_sec: u32,
    pub ip_burst: u32,
    /// WebSocket upgrades (refused ones too) from one IP address (IPv6: one /64).
    pub upgrades_per_ip_per_sec: u32,
    pub upgrades_per_ip_burst: u32,
    /// Networks the per-address limits do not apply to (per-user limits still do): by
    /// default loopback, where a reverse proxy on the gateway's machine (or a load test)
    /// brings every client from one address.
    pub exempt_networks: Vec<ipnet::IpNet>,
    /// A socket whose requests are refused this many times within `flood_window_secs` is
    /// closed (1008).
    pub flood_limited_requests: u32,
    pub flood_window_secs: u64,
    /// Seconds between sweeps that drop the buckets of users and addresses gone idle.
    pub sweep_secs: u64,
}

impl Default for RateLimitsConfig {
    fn default() -> Self {
        RateLimitsConfig {
            user_per_sec: 20,
            user_burst: 100,
            ip_per_sec: 200,
            ip_burst: 1000,
            upgrades_per_ip_per_sec: 10,
            upgrades_per_ip_burst: 50,
            exempt_networks: vec![
                "127.0.0.0/8".parse().expect("a network"),
                "::1/128".parse().expect("a network"),
            ],
            flood_limited_requests: 50,
            flood_window_secs: 10,
            sweep_secs: 10,
        }
    }
}

/// The highest rate or burst a limit may be set to: far above what one user or address
/// should ever need, and small enough for the buckets' arithmetic to stay exact.
const MAX_RATE_LIMIT: u32 = 1_000_000;

impl RateLimitsConfig {
    fn problems(&self, require: &mut impl FnMut(bool, &str)) {
        for (key, value) in [
            ("user_per_sec", self.user_per_sec),
            ("user_burst", self.user_burst),
            ("ip_per_sec", self.ip_per_sec),
            ("ip_burst", self.ip_burst),
            ("upgrades_per_ip_per_sec", self.upgrades_per_ip_per_sec),
            ("upgrades_per_ip_burst", self.upgrades_per_ip_burst),
            ("flood_limited_requests", self.flood_limited_requests),
        ] {
            require(
                (1..=MAX_RATE_LIMIT).contains(&value),
                &format!(
                    "gateway.rate_limits.{key} must be between 1 and {MAX_RATE_LIMIT} (limits \
                     cannot be turned off with 0: raise them, or list networks in \
                     gateway.rate_limits.exempt_networks)"
                ),
            );
        }
        for (key, value) in [
            ("flood_window_secs", self.flood_window_secs),
            ("sweep_secs", self.sweep_secs),
        ] {
            require(
                (1..=3600).contains(&value),
                &format!("gateway.rate_limits.{key} must be between 1 and 3600"),
            );
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct HandlerConfig {
    /// Commands processed concurrently by one instance (commands of one shard are serial).
    pub lanes: usize,
    /// Conflicting appends retried before a command is returned to the queue.
    pub append_retries: u32,
    /// Commands whose outcomes one instance remembers, to answer repeated sends.
    pub remembered_commands: usize,
    /// Log events between write-model snapshots; a starting handler loads the latest and
    /// replays only the log after it. 0: never snapshot, always replay the whole log.
    pub snapshot_every_events: u64,
    /// Most events appended as one atomic batch (one commit, one fsync), gathered from one
    /// lane and across lanes; 1 appends each event on its own. At most the server's batch
    /// limit (1,000).
    pub max_batch: usize,
    /// With batching on, most appends (single events or batches) in flight at once: what
    /// lanes hand over while all are in flight is merged into the next batch. At most the
    /// server's limit of atomic batches in flight per stream (50).
    pub commits_in_flight: usize,
    /// The name this instance announces itself under, to share the intake partitions out
    /// with the other instances: unique per instance (a pod's name). Two instances with one
    /// name both own its partitions, which is safe but as slow as sharing every shard.
    /// Unset: `handler-<random>`, new at each start.
    pub instance: Option<String>,
}

/// The most atomic batches nats-server keeps in flight for one stream.
pub const MAX_ATOMIC_BATCHES_IN_FLIGHT: usize = 50;

/// The most messages nats-server accepts in one atomic batch (`jetstream.limits.batch`
/// can only lower it).
pub const MAX_ATOMIC_BATCH: usize = 1_000;

impl Default for HandlerConfig {
    fn default() -> Self {
        HandlerConfig {
            lanes: 64,
            append_retries: 10,
            remembered_commands: 1_000_000,
            snapshot_every_events: 100_000,
            max_batch: 256,
            commits_in_flight: 4,
            instance: None,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ProjectorConfig {
    pub store: StoreConfig,
    /// Most events applied in one store transaction.
    pub batch: usize,
    /// How long a transaction that is not full waits for more events, in all: a store
    /// applies fewer, larger transactions for less work per event, and delivery to clients
    /// does not wait for the store. 0 applies what is ready at once.
    pub linger_ms: u64,
    /// How long a projector may go without asking the log for events before a standby
    /// instance takes over the projection (after a crash; a projector that stops cleanly
    /// hands over at once). Instances beyond the first stand by: they apply nothing while
    /// the active one pulls.
    pub takeover_secs: u64,
}

impl Default for ProjectorConfig {
    fn default() -> Self {
        ProjectorConfig {
            store: StoreConfig::default(),
            batch: 512,
            linger_ms: 5,
            takeover_secs: 10,
        }
    }
}

/// The conversation store. One struct rather than an enum per kind, so that a file or the
/// environment can switch `kind` over the defaults without tripping over the other kind's
/// keys.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    pub kind: StoreKind,
    /// The embedded store's file (`kind = "sqlite"`).
    pub path: PathBuf,
    /// The CQL cluster (`kind = "scylla"`).
    pub scylla: ScyllaConfig,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            kind: StoreKind::Sqlite,
            path: PathBuf::from(".parley/data/conversations.db"),
            scylla: ScyllaConfig::default(),
        }
    }
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum StoreKind {
    /// The embedded store: one SQLite file.
    Sqlite,
    /// ScyllaDB (or another CQL server).
    Scylla,
}

impl StoreKind {
    /// A bounded label for metrics and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            StoreKind::Sqlite => "sqlite",
            StoreKind::Scylla => "scylla",
        }
    }
}

/// Where the ScyllaDB store lives and how it is written. See `docs/storage.md`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ScyllaConfig {
    /// `host:port` of some nodes; the driver discovers the others.
    pub contact_points: Vec<String>,
    pub keyspace: String,
    /// The datacenter this process runs in: its replicas are tried first and `local_*`
    /// consistencies count there. Unset: no preference (single-datacenter clusters).
    pub local_datacenter: Option<String>,
    /// Replicas per datacenter (`NetworkTopologyStrategy`), used when Parley creates the
    /// keyspace; an existing keyspace is left as it is.
    pub replication: std::collections::BTreeMap<String, u32>,
    /// ScyllaDB only: create the keyspace with tablets on or off. Unset: the cluster default.
    pub tablets: Option<bool>,
    pub consistency: ConsistencyLevel,
    pub username: Option<String>,
    pub password: Option<Secret>,
    /// TLS to every node; plaintext unless `tls.enabled`.
    pub tls: TlsConfig,
    /// Client-side timeout of one request (retries of idempotent statements included).
    pub request_timeout_secs: u64,
    /// Statements of one projector batch in flight at once.
    pub max_in_flight: usize,
}

impl Default for ScyllaConfig {
    fn default() -> Self {
        ScyllaConfig {
            contact_points: Vec::new(),
            keyspace: "parley".into(),
            local_datacenter: None,
            replication: std::collections::BTreeMap::new(),
            tablets: None,
            consistency: ConsistencyLevel::LocalQuorum,
            username: None,
            password: None,
            tls: TlsConfig::default(),
            request_timeout_secs: 5,
            max_in_flight: 128,
        }
    }
}

impl ScyllaConfig {
    /// The store's options; the history bucket size is not configurable (it is fixed once
    /// history is written).
    pub fn options(&self) -> parley_projections::CqlOptions {
        let mut options =
            parley_projections::CqlOptions::new(self.contact_points.clone(), &self.keyspace);
        options.local_datacenter = self.local_datacenter.clone();
        options.replication = self.replication.clone();
        options.tablets = self.tablets;
        options.consistency = self.consistency.cql();
        options.username = self.username.clone();
        options.password = self.password.as_ref().map(|p| p.expose().to_owned());
        options.tls = self.tls.client();
        options.request_timeout = Duration::from_secs(self.request_timeout_secs);
        options.max_in_flight = self.max_in_flight;
        options
    }
}

/// TLS to a server (`[nats.tls]`, `[redis.tls]`, `[projector.store.scylla.tls]`). The files
/// are read when the process starts; one that is missing or malformed stops it there. See
/// `docs/configuration.md`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct TlsConfig {
    pub enabled: bool,
    /// PEM file of the CAs the server's certificate must chain to. Unset: the system's roots.
    pub ca_file: Option<PathBuf>,
    /// PEM certificate chain this client presents, for servers that require client
    /// certificates; goes with `key_file`.
    pub cert_file: Option<PathBuf>,
    /// PEM private key of `cert_file`.
    pub key_file: Option<PathBuf>,
    /// The DNS name the server's certificate carries, when it is not the address connected
    /// to (not for Redis).
    pub server_name: Option<String>,
}

impl TlsConfig {
    /// The client settings, `None` when TLS is off.
    pub fn client(&self) -> Option<parley_projections::TlsClient> {
        self.enabled.then(|| parley_projections::TlsClient {
            ca_file: self.ca_file.clone(),
            client_cert: self.cert_file.clone().zip(self.key_file.clone()).map(
                |(cert_file, key_file)| parley_projections::ClientCert {
                    cert_file,
                    key_file,
                },
            ),
            server_name: self.server_name.clone(),
        })
    }

    /// Problems with the settings of section `section` (e.g. `nats.tls`).
    fn problems(&self, section: &str, require: &mut impl FnMut(bool, &str)) {
        let files = [&self.ca_file, &self.cert_file, &self.key_file];
        require(
            self.enabled || (files.iter().all(|f| f.is_none()) && self.server_name.is_none()),
            &format!(
                "{section} settings are given but {section}.enabled is false: connections would be plaintext"
            ),
        );
        require(
            self.cert_file.is_some() == self.key_file.is_some(),
            &format!("{section}.cert_file and {section}.key_file go together: set both or neither"),
        );
        require(
            files
                .iter()
                .all(|f| f.as_ref().is_none_or(|p| !p.as_os_str().is_empty())),
            &format!("{section} file paths must not be empty (leave a key out instead)"),
        );
        require(
            self.server_name
                .as_deref()
                .is_none_or(parley_projections::tls::is_valid_server_name),
            &format!("{section}.server_name must be a DNS name such as scylla.example.internal"),
        );
    }
}

/// CQL consistency levels Parley accepts for its reads and writes. No `any` (a write
/// acknowledged by a hint only) and no serial levels (no lightweight transactions).
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ConsistencyLevel {
    One,
    LocalOne,
    Quorum,
    LocalQuorum,
    EachQuorum,
    All,
}

impl ConsistencyLevel {
    fn cql(self) -> parley_projections::Consistency {
        use parley_projections::Consistency;
        match self {
            ConsistencyLevel::One => Consistency::One,
            ConsistencyLevel::LocalOne => Consistency::LocalOne,
            ConsistencyLevel::Quorum => Consistency::Quorum,
            ConsistencyLevel::LocalQuorum => Consistency::LocalQuorum,
            ConsistencyLevel::EachQuorum => Consistency::EachQuorum,
            ConsistencyLevel::All => Consistency::All,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// Health, readiness and `/metrics`.
    pub listen: SocketAddr,
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 9090)),
        }
    }
}

/// OpenTelemetry traces (`[traces]`): off unless an OTLP endpoint is given.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct TracesConfig {
    /// The OTLP/HTTP traces endpoint of a collector, e.g. `http://otel-collector:4318/v1/traces`.
    /// Unset: no spans are exported and no trace context travels with commands and events.
    pub otlp_endpoint: Option<String>,
    pub protocol: OtlpProtocol,
    /// `service.name` of the exported spans; one per deployment, the role is an attribute.
    pub service_name: String,
    /// The share of new traces recorded (0 to 1); a command's trace is recorded by every role
    /// when it was by the gateway that started it.
    pub sample_ratio: f64,
}

impl Default for TracesConfig {
    fn default() -> Self {
        TracesConfig {
            otlp_endpoint: None,
            protocol: OtlpProtocol::HttpProtobuf,
            service_name: "parley".into(),
            sample_ratio: 1.0,
        }
    }
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum OtlpProtocol {
    HttpProtobuf,
    HttpJson,
}

/// What `parley up` starts when no servers are configured.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LocalConfig {
    /// Where the local nats-server keeps its JetStream files, and the dev secret lives.
    pub data_dir: PathBuf,
    /// fsync every JetStream write (`sync_interval: always`): an acknowledged send survives
    /// a machine crash, at a large cost in append rate. Off: NATS's default lazy fsync.
    pub fsync_always: bool,
}

impl Default for LocalConfig {
    fn default() -> Self {
        LocalConfig {
            data_dir: PathBuf::from(".parley/data"),
            fsync_always: true,
        }
    }
}

/// Push notifications for members with no live socket (`services/src/push`), POSTed to the
/// operator's webhook. Off unless `webhook_url` is set. See `docs/operations.md`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct PushConfig {
    /// `http://` or `https://` URL each notification is POSTed to. Unset: push is off.
    pub webhook_url: Option<String>,
    /// Longest one POST may take, connection included, before it counts as failed.
    pub timeout_ms: u64,
    /// POSTs of one notification (the first included) before it is dead-lettered.
    pub max_attempts: u32,
    /// Backoff before the first retry; doubled per retry up to `max_backoff_ms`, each wait
    /// drawn at random below that (full jitter).
    pub initial_backoff_ms: u64,
    pub max_backoff_ms: u64,
    /// Most POSTs in flight at once, and most log events being notified at once.
    pub concurrency: usize,
    /// The `Authorization` header value sent with each POST (`Bearer …`); never logged.
    pub auth_header: Option<Secret>,
    /// Characters of the message body sent as `preview`; 0 sends no preview.
    pub preview_chars: usize,
    /// How long the dead-letter stream keeps a notification.
    pub dead_letter_max_age_secs: u64,
    /// Bytes the dead-letter stream holds before it drops its oldest notifications.
    pub dead_letter_max_bytes: i64,
}

impl Default for PushConfig {
    fn default() -> Self {
        PushConfig {
            webhook_url: None,
            timeout_ms: 5_000,
            max_attempts: 5,
            initial_backoff_ms: 500,
            max_backoff_ms: 30_000,
            concurrency: 16,
            auth_header: None,
            preview_chars: 100,
            dead_letter_max_age_secs: 14 * 86_400,
            dead_letter_max_bytes: 1 << 30,
        }
    }
}

impl PushConfig {
    fn problems(&self, require: &mut impl FnMut(bool, &str)) {
        if let Some(url) = &self.webhook_url {
            let uri = url.parse::<http::Uri>().ok();
            require(
                uri.as_ref().is_some_and(|uri| {
                    matches!(uri.scheme_str(), Some("http" | "https")) && uri.host().is_some()
                }),
                &format!(
                    "push.webhook_url must be an http:// or https:// URL with a host, not {url:?}"
                ),
            );
            require(
                uri.as_ref()
                    .and_then(|uri| uri.authority())
                    .is_none_or(|authority| !authority.as_str().contains('@')),
                "push.webhook_url must not carry credentials: put them in push.auth_header",
            );
        }
        require(
            (100..=60_000).contains(&self.timeout_ms),
            "push.timeout_ms must be between 100 and 60000",
        );
        require(
            (1..=100).contains(&self.max_attempts),
            "push.max_attempts must be between 1 and 100",
        );
        require(
            (1..=60_000).contains(&self.initial_backoff_ms),
            "push.initial_backoff_ms must be between 1 and 60000",
        );
        require(
            (self.initial_backoff_ms..=3_600_000).contains(&self.max_backoff_ms),
            "push.max_backoff_ms must be between push.initial_backoff_ms and 3600000",
        );
        require(
            (1..=1024).contains(&self.concurrency),
            "push.concurrency must be between 1 and 1024",
        );
        require(
            self.auth_header.as_ref().is_none_or(|value| {
                !value.expose().trim().is_empty()
                    && http::HeaderValue::from_str(value.expose()).is_ok()
            }),
            "push.auth_header must be a non-empty HTTP header value (visible ASCII, no line breaks)",
        );
        require(
            self.preview_chars <= 4096,
            "push.preview_chars must be at most 4096 (0: no preview)",
        );
        require(
            (60..=365 * 86_400).contains(&self.dead_letter_max_age_secs),
            "push.dead_letter_max_age_secs must be between 60 and 31536000",
        );
        require(
            self.dead_letter_max_bytes >= i64::from(crate::topology::MAX_STREAM_MESSAGE_BYTES),
            "push.dead_letter_max_bytes must be at least 1048576",
        );
    }
}

/// A secret value: deserializes from a string, never shows in `Debug` output or logs.
#[derive(Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(***)")
    }
}

pub const MIN_SECRET_BYTES: usize = 32;

impl Config {
    /// Load from `file` (if any) and the given environment variables, then validate.
    pub fn load(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let mut figment = Figment::from(Serialized::defaults(Config::default()));
        if let Some(file) = file {
            if !file.is_file() {
                return Err(ConfigError::Invalid(vec![format!(
                    "config file {} does not exist",
                    file.display()
                )]));
            }
            figment = figment.merge(Toml::file(file));
        }
        figment = figment.merge(Serialized::defaults(env_dict(env)?));
        let config: Config = figment.extract().map_err(Box::new)?;
        config.validate()?;
        Ok(config)
    }

    /// Parse a TOML document over the defaults, then validate.
    pub fn from_toml(text: &str) -> Result<Config, ConfigError> {
        let config: Config = Figment::from(Serialized::defaults(Config::default()))
            .merge(Toml::string(text))
            .extract()
            .map_err(Box::new)?;
        config.validate()?;
        Ok(config)
    }

    /// Check what types alone cannot: ranges and relations between values.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let mut problems = Vec::new();
        let mut require = |ok: bool, problem: &str| {
            if !ok {
                problems.push(problem.to_owned());
            }
        };
        require(
            parley_events::subjects::Shards::new(self.log.shards).is_some(),
            "log.shards must be between 1 and 65536",
        );
        require(
            (1..=5).contains(&self.log.replicas) && (1..=5).contains(&self.intake.replicas),
            "log.replicas and intake.replicas must be between 1 and 5",
        );
        require(
            self.intake.duplicate_window_secs >= 1,
            "intake.duplicate_window_secs must be at least 1",
        );
        require(
            self.intake.max_messages >= 1,
            "intake.max_messages must be at least 1",
        );
        require(
            self.intake.max_bytes >= i64::from(crate::topology::MAX_STREAM_MESSAGE_BYTES),
            "intake.max_bytes must be at least 1048576 (one largest command)",
        );
        require(
            (1..=MAX_HOLD_SECS).contains(&self.intake.ack_wait_secs),
            "intake.ack_wait_secs must be between 1 and 3600",
        );
        require(
            (self.intake.ack_wait_secs..=MAX_HOLD_SECS).contains(&self.intake.max_hold_secs),
            "intake.max_hold_secs must be at least intake.ack_wait_secs and at most 3600",
        );
        require(
            self.intake.max_deliver >= 1,
            "intake.max_deliver must be at least 1",
        );
        require(
            self.intake.max_ack_pending >= 1,
            "intake.max_ack_pending must be at least 1",
        );
        require(
            self.auth
                .secret
                .as_ref()
                .is_none_or(|s| s.expose().len() >= MIN_SECRET_BYTES),
            "auth.secret must be at least 32 bytes",
        );
        require(
            self.auth.jwks_poll_secs >= 1,
            "auth.jwks_poll_secs must be at least 1",
        );
        require(
            self.auth.revocation_ttl_secs >= 60,
            "auth.revocation_ttl_secs must be at least 60",
        );
        if let Some(path) = &self.auth.jwks_file
            && let Err(e) = crate::auth::check_key_file(path)
        {
            require(false, &format!("auth.jwks_file: {e}"));
        }
        let limits = &self.limits;
        require(
            limits.max_message_bytes >= 1,
            "limits.max_message_bytes must be at least 1",
        );
        require(
            limits.frame_bytes() >= limits.min_frame_bytes(),
            &format!(
                "limits.max_frame_bytes must be at least {} for limits.max_message_bytes = {} \
                 (a body byte takes up to {MAX_ESCAPED_BYTES_PER_BYTE} bytes escaped in JSON, \
                 plus {FRAME_ENVELOPE_BYTES} for the rest of the frame); leave it unset to \
                 get that",
                limits.min_frame_bytes(),
                limits.max_message_bytes
            ),
        );
        require(
            limits.frame_bytes() <= MAX_FRAME_BYTES,
            &format!(
                "limits.max_frame_bytes must be at most 1 MiB ({MAX_FRAME_BYTES}), so \
                 limits.max_message_bytes at most {}",
                (MAX_FRAME_BYTES - FRAME_ENVELOPE_BYTES) / MAX_ESCAPED_BYTES_PER_BYTE
            ),
        );
        require(
            limits.max_group_members >= 2,
            "limits.max_group_members must be at least 2",
        );
        require(
            limits.max_members_per_add >= 1,
            "limits.max_members_per_add must be at least 1",
        );
        require(
            (1..=1000).contains(&limits.max_history_page),
            "limits.max_history_page must be between 1 and 1000",
        );
        let gateway = &self.gateway;
        require(
            gateway.send_queue >= 1,
            "gateway.send_queue must be at least 1",
        );
        require(
            gateway.ping_interval_secs >= 1,
            "gateway.ping_interval_secs must be at least 1",
        );
        require(
            gateway.idle_timeout_secs > gateway.ping_interval_secs,
            "gateway.idle_timeout_secs must be longer than gateway.ping_interval_secs",
        );
        require(
            gateway.command_timeout_secs >= 1,
            "gateway.command_timeout_secs must be at least 1",
        );
        require(
            gateway.max_connections >= 1,
            "gateway.max_connections must be at least 1",
        );
        require(
            (1..=100_000).contains(&gateway.resume_max_events),
            "gateway.resume_max_events must be between 1 and 100000",
        );
        require(
            (64 * 1024..=64 << 20).contains(&gateway.resume_max_bytes),
            "gateway.resume_max_bytes must be between 65536 and 67108864",
        );
        require(
            gateway.presence_ttl_secs >= 3,
            "gateway.presence_ttl_secs must be at least 3",
        );
        require(
            gateway
                .allowed_origins
                .iter()
                .all(|o| o.starts_with("http://") || o.starts_with("https://")),
            "gateway.allowed_origins entries must start with http:// or https://",
        );
        if let Some(dir) = &gateway.web_dir {
            require(
                dir.join("index.html").is_file(),
                &format!(
                    "gateway.web_dir must be a directory holding index.html: {} (build the web chat: cd clients/web && npm ci && npm run build)",
                    dir.display()
                ),
            );
        }
        gateway.rate_limits.problems(&mut require);
        require(
            (1..=600_000).contains(&gateway.header_timeout_ms),
            "gateway.header_timeout_ms must be between 1 and 600000 (a connection that never \
             sends its headers would be held forever)",
        );
        require(
            gateway.max_connections_per_ip >= 1,
            "gateway.max_connections_per_ip must be at least 1 (spare networks with \
             gateway.rate_limits.exempt_networks instead)",
        );
        gateway.tls.problems(&mut require);
        require(self.handler.lanes >= 1, "handler.lanes must be at least 1");
        require(
            self.handler.remembered_commands >= 1,
            "handler.remembered_commands must be at least 1",
        );
        require(
            (1..=MAX_ATOMIC_BATCH).contains(&self.handler.max_batch),
            "handler.max_batch must be between 1 and 1000",
        );
        require(
            (1..=MAX_ATOMIC_BATCHES_IN_FLIGHT).contains(&self.handler.commits_in_flight),
            "handler.commits_in_flight must be between 1 and 50",
        );
        if let Some(instance) = &self.handler.instance {
            require(
                (1..=64).contains(&instance.len())
                    && instance
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"-_=".contains(&b)),
                "handler.instance must be 1 to 64 characters of A-Z a-z 0-9 - _ =",
            );
        }
        require(
            (1..=10_000).contains(&self.projector.batch),
            "projector.batch must be between 1 and 10000",
        );
        require(
            self.projector.linger_ms <= 1_000,
            "projector.linger_ms must be at most 1000",
        );
        require(
            (3..=300).contains(&self.projector.takeover_secs),
            "projector.takeover_secs must be between 3 and 300",
        );
        self.nats.tls.problems("nats.tls", &mut require);
        require(
            !self.nats.tls.enabled || self.nats.url.is_some(),
            "nats.tls.enabled needs nats.url (the nats-server parley up starts speaks no TLS)",
        );
        self.redis.tls.problems("redis.tls", &mut require);
        require(
            !self.redis.tls.enabled
                || self
                    .redis
                    .url
                    .as_ref()
                    .is_some_and(|url| url.expose().starts_with("rediss://")),
            "redis.tls.enabled needs a rediss:// redis.url",
        );
        require(
            self.redis.tls.server_name.is_none(),
            "redis.tls.server_name cannot be set: Redis is verified against the host of redis.url",
        );
        if self.projector.store.kind == StoreKind::Scylla {
            let scylla = &self.projector.store.scylla;
            require(
                !scylla.contact_points.is_empty(),
                "projector.store.scylla.contact_points must name at least one host:port when projector.store.kind is scylla",
            );
            require(
                scylla.request_timeout_secs >= 1,
                "projector.store.scylla.request_timeout_secs must be at least 1",
            );
            require(
                (1..=4096).contains(&scylla.max_in_flight),
                "projector.store.scylla.max_in_flight must be between 1 and 4096",
            );
            require(
                scylla.password.is_none() || scylla.username.is_some(),
                "projector.store.scylla.password needs projector.store.scylla.username",
            );
            scylla
                .tls
                .problems("projector.store.scylla.tls", &mut require);
        }
        if let Some(endpoint) = &self.traces.otlp_endpoint {
            require(
                endpoint.starts_with("http://") && endpoint.len() > "http://".len(),
                "traces.otlp_endpoint must be an http:// URL (send to a collector; TLS onwards is its job)",
            );
        }
        require(
            (0.0..=1.0).contains(&self.traces.sample_ratio),
            "traces.sample_ratio must be between 0 and 1",
        );
        require(
            !self.traces.service_name.trim().is_empty(),
            "traces.service_name must not be empty",
        );
        self.push.problems(&mut require);
        if problems.is_empty() {
            Ok(())
        } else {
            Err(ConfigError::Invalid(problems))
        }
    }

    pub fn ping_interval(&self) -> Duration {
        Duration::from_secs(self.gateway.ping_interval_secs)
    }

    pub fn idle_timeout(&self) -> Duration {
        Duration::from_secs(self.gateway.idle_timeout_secs)
    }

    pub fn command_timeout(&self) -> Duration {
        Duration::from_secs(self.gateway.command_timeout_secs)
    }

    /// How long a gateway keeps following a command after its `timeout` for a late outcome:
    /// as long as the handlers may still be trying it (every delivery the intake makes, each
    /// held at most `max_hold_secs` and then left for one ack wait) and one more command
    /// timeout for the answer to travel.
    pub fn outcome_wait(&self) -> Duration {
        let deliveries = u32::try_from(self.intake.max_deliver).unwrap_or(u32::MAX);
        let delivery = Duration::from_secs(
            self.intake
                .max_hold_secs
                .saturating_add(self.intake.ack_wait_secs),
        );
        delivery
            .checked_mul(deliveries)
            .unwrap_or(Duration::MAX)
            .saturating_add(self.command_timeout())
    }
}

/// Longest a command may wait on one handler: an hour is far past any append's retries.
const MAX_HOLD_SECS: u64 = 3600;

/// Keys whose environment values are taken as written, never parsed as TOML scalars.
const VERBATIM_KEYS: [&str; 5] = ["secret", "password", "url", "webhook_url", "auth_header"];

/// Turn `PARLEY_SECTION__KEY=value` pairs into a nested dictionary. Values are parsed like
/// TOML scalars (numbers, booleans, arrays); anything else is a string.
fn env_dict(env: impl IntoIterator<Item = (String, String)>) -> Result<Dict, ConfigError> {
    let mut root = Dict::new();
    let mut unknown = Vec::new();
    for (key, value) in env {
        let Some(path) = key.strip_prefix(ENV_PREFIX) else {
            continue;
        };
        // Configuration keys always name a section and a key (`PARLEY_GATEWAY__LISTEN`).
        // A few other variables share the prefix; anything else is most likely a typo.
        if !path.contains("__") {
            if !ENV_NOT_CONFIG.contains(&key.as_str()) {
                unknown.push(format!(
                    "environment variable {key} is not a configuration key; they are named {ENV_PREFIX}<SECTION>__<KEY>"
                ));
            }
            continue;
        }
        let parts: Vec<String> = path.split("__").map(str::to_ascii_lowercase).collect();
        // Secrets and URLs must stay strings even when they look like numbers (a password
        // `0123` parsed as a number would lose its zero).
        let verbatim = parts
            .last()
            .is_some_and(|key| VERBATIM_KEYS.contains(&key.as_str()));
        let parsed = value
            .parse::<Value>()
            .unwrap_or_else(|_| Value::from(value.clone()));
        let leaf = match parsed {
            Value::Dict(..) => Value::from(value),
            _ if verbatim => Value::from(value),
            other => other,
        };
        insert_path(&mut root, &parts, leaf);
    }
    if unknown.is_empty() {
        Ok(root)
    } else {
        Err(ConfigError::Invalid(unknown))
    }
}

fn insert_path(dict: &mut Dict, path: &[String], value: Value) {
    match path {
        [] => {}
        [last] => {
            dict.insert(last.clone(), value);
        }
        [first, rest @ ..] => {
            let entry = dict
                .entry(first.clone())
                .or_insert_with(|| Value::from(Dict::new()));
            if let Value::Dict(_, inner) = entry {
                insert_path(inner, rest, value);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn defaults_are_valid() {
        Config::default().validate().unwrap();
    }

    #[test]
    fn environment_overrides_file_values() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("parley.toml");
        std::fs::write(&file, "[gateway]\nsend_queue = 10\n[log]\nshards = 64\n").unwrap();
        let config = Config::load(
            Some(&file),
            env(&[
                ("PARLEY_GATEWAY__SEND_QUEUE", "20"),
                ("PARLEY_NATS__URL", "nats://127.0.0.1:4333"),
                ("PARLEY_AUTH__SECRET", "0123456789abcdef0123456789abcdef"),
                ("UNRELATED", "x"),
                ("PARLEY_HOME", "/opt/parley"),
                ("PARLEY_CONFIG", "/etc/parley.toml"),
            ]),
        )
        .unwrap();
        assert_eq!(config.gateway.send_queue, 20);
        assert_eq!(config.log.shards, 64);
        assert_eq!(
            config.nats.url.as_ref().map(Secret::expose),
            Some("nats://127.0.0.1:4333")
        );
        assert_eq!(
            config.auth.secret.as_ref().map(Secret::expose),
            Some("0123456789abcdef0123456789abcdef")
        );
    }

    #[test]
    fn numeric_looking_secret_stays_a_string() {
        let config = Config::load(
            None,
            env(&[("PARLEY_AUTH__SECRET", "12345678901234567890123456789012345")]),
        )
        .unwrap();
        assert_eq!(
            config.auth.secret.unwrap().expose(),
            "12345678901234567890123456789012345"
        );
    }

    #[test]
    fn secrets_never_show_in_debug_output() {
        let mut config = Config::default();
        config.auth.secret = Some(Secret::new("super-secret-value-that-is-long-enough"));
        config.redis.url = Some(Secret::new("redis://:hunter2@host"));
        config.projector.store.scylla.password = Some(Secret::new("correct-horse"));
        let shown = format!("{config:?}");
        assert!(!shown.contains("super-secret"));
        assert!(!shown.contains("hunter2"));
        assert!(!shown.contains("correct-horse"));
    }

    #[test]
    fn unknown_keys_are_refused() {
        let err = Config::from_toml("[gateway]\nsend_queu = 10\n").unwrap_err();
        assert!(err.to_string().contains("send_queu"), "{err}");
        let err = Config::load(None, env(&[("PARLEY_GATEWAY__LISTNE", "x")])).unwrap_err();
        assert!(err.to_string().contains("listne"), "{err}");
        let err = Config::load(None, env(&[("PARLEY_GATEWAY_LISTEN", "x")])).unwrap_err();
        assert!(err.to_string().contains("PARLEY_GATEWAY_LISTEN"), "{err}");
    }

    #[test]
    fn wrong_types_are_refused() {
        let err = Config::from_toml("[gateway]\nsend_queue = \"many\"\n").unwrap_err();
        assert!(err.to_string().contains("send_queue"), "{err}");
        let err =
            Config::load(None, env(&[("PARLEY_GATEWAY__LISTEN", "not-an-address")])).unwrap_err();
        assert!(err.to_string().contains("listen"), "{err}");
        let err = Config::from_toml("[projector.store]\nkind = \"oracle\"\n").unwrap_err();
        assert!(err.to_string().contains("oracle"), "{err}");
        let err =
            Config::from_toml("[projector.store.scylla]\nconsistency = \"any\"\n").unwrap_err();
        assert!(err.to_string().contains("any"), "{err}");
        let err = Config::load(None, env(&[("PARLEY_INTAKE__STORAGE", "disk")])).unwrap_err();
        assert!(err.to_string().contains("disk"), "{err}");
    }

    #[test]
    fn out_of_range_values_are_refused_with_every_problem_listed() {
        let err = Config::from_toml(
            "[log]\nshards = 0\n[intake]\nmax_bytes = 4096\n[limits]\nmax_frame_bytes = 100\nmax_message_bytes = 200\n[auth]\nsecret = \"short\"\n[gateway]\nallowed_origins = [\"example.com\"]\nresume_max_events = 0\nresume_max_bytes = 1000\n",
        )
        .unwrap_err();
        let text = err.to_string();
        for expected in [
            "log.shards",
            "intake.max_bytes must be at least 1048576",
            "limits.max_frame_bytes must be at least 2224 for limits.max_message_bytes = 200",
            "auth.secret must be at least 32 bytes",
            "allowed_origins",
            "gateway.resume_max_events must be between 1 and 100000",
            "gateway.resume_max_bytes must be between 65536",
        ] {
            assert!(text.contains(expected), "missing {expected:?} in {text}");
        }
    }

    #[test]
    fn a_key_file_that_is_missing_or_unusable_is_refused() {
        let err = Config::from_toml("[auth]\njwks_file = \"/nonexistent/keys.json\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("auth.jwks_file: cannot read /nonexistent/keys.json"),
            "{err}"
        );
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("keys.json");
        for (content, expected) in [
            ("not json", "is not a JWKS document"),
            (
                r#"{"keys":[{"kty":"OKP","crv":"Ed25519","x":"11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"}]}"#,
                "every key needs a kid",
            ),
            (
                r#"{"keys":[{"kty":"OKP","crv":"Ed25519","alg":"RS256","kid":"k","x":"11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"}]}"#,
                "only RSA keys for RS256",
            ),
        ] {
            std::fs::write(&file, content).unwrap();
            let toml = format!("[auth]\njwks_file = {:?}\n", file.display().to_string());
            let err = Config::from_toml(&toml).unwrap_err().to_string();
            assert!(err.contains(expected), "missing {expected:?} in {err}");
        }
        std::fs::write(
            &file,
            r#"{"keys":[{"kty":"OKP","crv":"Ed25519","kid":"k","x":"11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"}]}"#,
        )
        .unwrap();
        let toml = format!("[auth]\njwks_file = {:?}\n", file.display().to_string());
        Config::from_toml(&toml).unwrap();
    }

    #[test]
    fn a_handler_instance_name_that_cannot_be_a_key_is_refused() {
        for wrong in ["", "a.b", "pod 1", "a*", "é", &"x".repeat(65)] {
            let err = Config::from_toml(&format!("[handler]\ninstance = {wrong:?}\n"))
                .unwrap_err()
                .to_string();
            assert!(err.contains("handler.instance"), "{wrong:?}: {err}");
        }
        let right = Config::from_toml("[handler]\ninstance = \"parley-handler-0\"\n").unwrap();
        assert_eq!(right.handler.instance.as_deref(), Some("parley-handler-0"));
    }

    #[test]
    fn a_hold_shorter_than_the_ack_wait_is_refused_and_the_gateway_follows_every_hold() {
        for (wrong, expected) in [
            (
                "ack_wait_secs = 10\nmax_hold_secs = 9",
                "intake.max_hold_secs must be at least intake.ack_wait_secs",
            ),
            (
                "ack_wait_secs = 0",
                "intake.ack_wait_secs must be between 1 and 3600",
            ),
            (
                "ack_wait_secs = 3601\nmax_hold_secs = 3601",
                "intake.ack_wait_secs must be between 1 and 3600",
            ),
            ("max_hold_secs = 3601", "at most 3600"),
            ("max_hold_secs = -1", "max_hold_secs"),
            ("max_hold_secs = \"30s\"", "max_hold_secs"),
        ] {
            let err = Config::from_toml(&format!("[intake]\n{wrong}\n"))
                .unwrap_err()
                .to_string();
            assert!(err.contains(expected), "{wrong}: {err}");
        }
        let config =
            Config::from_toml("[intake]\nack_wait_secs = 10\nmax_hold_secs = 10\n").unwrap();
        assert_eq!(config.intake.max_hold_secs, 10);
        let defaults = Config::default();
        assert_eq!(
            (defaults.intake.ack_wait_secs, defaults.intake.max_hold_secs),
            (5, 30),
            "a dead handler's commands come back before the gateway's command timeout"
        );
        assert!(Duration::from_secs(defaults.intake.ack_wait_secs) < defaults.command_timeout());
        // Five deliveries, each held 30 s and then left 5 s, and one command timeout.
        assert_eq!(defaults.outcome_wait(), Duration::from_secs(5 * 35 + 10));
        let mut huge = Config::default();
        huge.intake.max_hold_secs = u64::MAX;
        assert_eq!(huge.outcome_wait(), Duration::MAX);
    }

    #[test]
    fn commits_in_flight_outside_the_servers_limit_are_refused() {
        for wrong in ["0", "51", "-1", "\"many\""] {
            let err = Config::from_toml(&format!("[handler]\ncommits_in_flight = {wrong}\n"))
                .unwrap_err()
                .to_string();
            assert!(err.contains("commits_in_flight"), "{wrong}: {err}");
        }
        for right in [1, 50] {
            let toml = format!("[handler]\ncommits_in_flight = {right}\n");
            assert_eq!(
                Config::from_toml(&toml).unwrap().handler.commits_in_flight,
                right
            );
        }
    }

    #[test]
    fn a_projector_linger_past_a_second_or_not_a_count_of_milliseconds_is_refused() {
        let err = Config::from_toml("[projector]\nlinger_ms = 1001\n")
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("projector.linger_ms must be at most 1000"),
            "{err}"
        );
        for wrong in ["-1", "\"5ms\"", "0.5"] {
            let err = Config::from_toml(&format!("[projector]\nlinger_ms = {wrong}\n"))
                .unwrap_err()
                .to_string();
            assert!(err.contains("linger_ms"), "{wrong}: {err}");
        }
        for right in [0, 1000] {
            let toml = format!("[projector]\nlinger_ms = {right}\n");
            assert_eq!(Config::from_toml(&toml).unwrap().projector.linger_ms, right);
        }
    }

    #[test]
    fn a_projector_takeover_too_short_to_renew_or_past_five_minutes_is_refused() {
        for wrong in [0, 2, 301] {
            let err = Config::from_toml(&format!("[projector]\ntakeover_secs = {wrong}\n"))
                .unwrap_err()
                .to_string();
            assert!(
                err.contains("projector.takeover_secs must be between 3 and 300"),
                "{wrong}: {err}"
            );
        }
        for wrong in ["-1", "\"10s\"", "2.5"] {
            let err = Config::from_toml(&format!("[projector]\ntakeover_secs = {wrong}\n"))
                .unwrap_err()
                .to_string();
            assert!(err.contains("takeover_secs"), "{wrong}: {err}");
        }
        for right in [3, 300] {
            let toml = format!("[projector]\ntakeover_secs = {right}\n");
            assert_eq!(
                Config::from_toml(&toml).unwrap().projector.takeover_secs,
                right
            );
        }
    }

    #[test]
    fn a_handler_batch_outside_the_servers_limit_is_refused() {
        for wrong in [0, 1001] {
            let err = Config::from_toml(&format!("[handler]\nmax_batch = {wrong}\n"))
                .unwrap_err()
                .to_string();
            assert!(
                err.contains("handler.max_batch must be between 1 and 1000"),
                "{wrong}: {err}"
            );
        }
        let err = Config::from_toml("[handler]\nmax_batch = -1\n").unwrap_err();
        assert!(err.to_string().contains("max_batch"), "{err}");
        for right in [1, 1000] {
            let config = Config::from_toml(&format!("[handler]\nmax_batch = {right}\n")).unwrap();
            assert_eq!(config.handler.max_batch, right);
        }
        assert_eq!(
            Config::default().handler.max_batch,
            256,
            "group commit is on by default"
        );
    }

    #[test]
    fn the_frame_limit_carries_the_largest_body_escaped_at_worst() {
        let limits = Config::default().limits;
        assert_eq!(limits.frame_bytes(), 6 * 4096 + 1024, "derived when unset");
        let raised = Config::from_toml("[limits]\nmax_message_bytes = 10000\n").unwrap();
        assert_eq!(raised.limits.frame_bytes(), 61_024);
        let set = Config::from_toml("[limits]\nmax_frame_bytes = 65536\n").unwrap();
        assert_eq!(set.limits.frame_bytes(), 65_536);
        let err = Config::from_toml("[limits]\nmax_frame_bytes = 16384\n").unwrap_err();
        assert!(
            err.to_string().contains(
                "limits.max_frame_bytes must be at least 25600 for limits.max_message_bytes = 4096"
            ),
            "{err}"
        );
        let err = Config::from_toml("[limits]\nmax_message_bytes = 200000\n").unwrap_err();
        assert!(
            err.to_string()
                .contains("limits.max_message_bytes at most 174592"),
            "{err}"
        );
    }

    #[test]
    fn the_scylla_store_is_chosen_from_the_environment_with_its_credentials() {
        let config = Config::load(
            None,
            env(&[
                ("PARLEY_PROJECTOR__STORE__KIND", "scylla"),
                (
                    "PARLEY_PROJECTOR__STORE__SCYLLA__CONTACT_POINTS",
                    "[\"10.0.0.1:9042\", \"10.0.0.2:9042\"]",
                ),
                ("PARLEY_PROJECTOR__STORE__SCYLLA__LOCAL_DATACENTER", "eu1"),
                ("PARLEY_PROJECTOR__STORE__SCYLLA__REPLICATION__EU1", "3"),
                ("PARLEY_PROJECTOR__STORE__SCYLLA__CONSISTENCY", "local_one"),
                ("PARLEY_PROJECTOR__STORE__SCYLLA__USERNAME", "parley"),
                ("PARLEY_PROJECTOR__STORE__SCYLLA__PASSWORD", "012345"),
            ]),
        )
        .unwrap();
        let scylla = &config.projector.store.scylla;
        assert_eq!(config.projector.store.kind, StoreKind::Scylla);
        assert_eq!(scylla.contact_points, ["10.0.0.1:9042", "10.0.0.2:9042"]);
        assert_eq!(scylla.replication.get("eu1"), Some(&3));
        assert_eq!(scylla.consistency, ConsistencyLevel::LocalOne);
        let options = scylla.options();
        assert_eq!(
            options.password.as_deref(),
            Some("012345"),
            "taken verbatim"
        );
        assert_eq!(options.local_datacenter.as_deref(), Some("eu1"));
        assert!(
            !format!("{config:?}").contains("12345"),
            "the password is never shown"
        );
        assert!(
            !format!("{options:?}").contains("12345"),
            "nor in the store's options"
        );
        let err =
            Config::load(None, env(&[("PARLEY_PROJECTOR__STORE__KIND", "scylla")])).unwrap_err();
        assert!(err.to_string().contains("contact_points"), "{err}");
    }

    #[test]
    fn cql_tls_is_configured_from_the_environment() {
        let config = Config::load(
            None,
            env(&[
                ("PARLEY_PROJECTOR__STORE__KIND", "scylla"),
                (
                    "PARLEY_PROJECTOR__STORE__SCYLLA__CONTACT_POINTS",
                    "[\"10.0.0.1:9042\"]",
                ),
                ("PARLEY_PROJECTOR__STORE__SCYLLA__TLS__ENABLED", "true"),
                (
                    "PARLEY_PROJECTOR__STORE__SCYLLA__TLS__CA_FILE",
                    "/etc/parley/cql-ca.pem",
                ),
                (
                    "PARLEY_PROJECTOR__STORE__SCYLLA__TLS__CERT_FILE",
                    "/etc/parley/cql.pem",
                ),
                (
                    "PARLEY_PROJECTOR__STORE__SCYLLA__TLS__KEY_FILE",
                    "/etc/parley/cql-key.pem",
                ),
                (
                    "PARLEY_PROJECTOR__STORE__SCYLLA__TLS__SERVER_NAME",
                    "scylla.internal",
                ),
            ]),
        )
        .unwrap();
        let tls = config.projector.store.scylla.options().tls.unwrap();
        assert_eq!(
            tls.ca_file.as_deref(),
            Some(Path::new("/etc/parley/cql-ca.pem"))
        );
        let client = tls.client_cert.unwrap();
        assert_eq!(client.cert_file, Path::new("/etc/parley/cql.pem"));
        assert_eq!(client.key_file, Path::new("/etc/parley/cql-key.pem"));
        assert_eq!(tls.server_name.as_deref(), Some("scylla.internal"));

        let plaintext = Config::from_toml(
            "[projector.store]\nkind = \"scylla\"\n[projector.store.scylla]\ncontact_points = [\"10.0.0.1:9042\"]\n",
        )
        .unwrap();
        assert_eq!(plaintext.projector.store.scylla.options().tls, None);
    }

    #[test]
    fn traces_are_configured_from_the_environment_and_wrong_values_refused() {
        let config = Config::load(
            None,
            env(&[
                (
                    "PARLEY_TRACES__OTLP_ENDPOINT",
                    "http://otel-collector:4318/v1/traces",
                ),
                ("PARLEY_TRACES__PROTOCOL", "http_json"),
                ("PARLEY_TRACES__SAMPLE_RATIO", "0.25"),
            ]),
        )
        .unwrap();
        assert_eq!(
            config.traces.otlp_endpoint.as_deref(),
            Some("http://otel-collector:4318/v1/traces")
        );
        assert_eq!(config.traces.protocol, OtlpProtocol::HttpJson);
        assert_eq!(config.traces.sample_ratio, 0.25);
        assert_eq!(Config::default().traces.otlp_endpoint, None);

        let err = Config::from_toml(
            "[traces]\notlp_endpoint = \"https://collector:4318\"\nsample_ratio = 1.5\nservice_name = \" \"\n",
        )
        .unwrap_err()
        .to_string();
        for expected in [
            "traces.otlp_endpoint must be an http:// URL",
            "traces.sample_ratio must be between 0 and 1",
            "traces.service_name must not be empty",
        ] {
            assert!(err.contains(expected), "missing {expected:?} in {err}");
        }
        let err = Config::from_toml("[traces]\nprotocol = \"grpc\"\n").unwrap_err();
        assert!(err.to_string().contains("protocol"), "{err}");
    }

    #[test]
    fn wrong_cql_tls_settings_are_refused_with_every_problem_listed() {
        let scylla = "[projector.store]\nkind = \"scylla\"\n[projector.store.scylla]\ncontact_points = [\"10.0.0.1:9042\"]\n[projector.store.scylla.tls]\n";
        let err = Config::from_toml(&format!(
            "{scylla}enabled = true\ncert_file = \"/etc/parley/cql.pem\"\nca_file = \"\"\nserver_name = \"not a name\"\n"
        ))
        .unwrap_err();
        let text = err.to_string();
        for expected in [
            "tls.cert_file and projector.store.scylla.tls.key_file go together",
            "tls file paths must not be empty",
            "tls.server_name must be a DNS name",
        ] {
            assert!(text.contains(expected), "missing {expected:?} in {text}");
        }

        let err = Config::from_toml(&format!("{scylla}ca_file = \"/etc/parley/cql-ca.pem\"\n"))
            .unwrap_err();
        assert!(err.to_string().contains("tls.enabled is false"), "{err}");

        let err = Config::from_toml(&format!("{scylla}enabled = \"yes\"\n")).unwrap_err();
        assert!(err.to_string().contains("enabled"), "{err}");
        let err = Config::from_toml(&format!("{scylla}verify = false\n")).unwrap_err();
        assert!(err.to_string().contains("verify"), "{err}");
    }

    #[test]
    fn nats_and_redis_tls_are_configured_from_the_environment_and_checked() {
        let config = Config::load(
            None,
            env(&[
                ("PARLEY_NATS__URL", "nats://nats.internal:4222"),
                ("PARLEY_NATS__TLS__ENABLED", "true"),
                ("PARLEY_NATS__TLS__CA_FILE", "/etc/parley/nats-ca.pem"),
                ("PARLEY_REDIS__URL", "rediss://redis.internal:6380"),
                ("PARLEY_REDIS__TLS__ENABLED", "true"),
                ("PARLEY_REDIS__TLS__CERT_FILE", "/etc/parley/redis.pem"),
                ("PARLEY_REDIS__TLS__KEY_FILE", "/etc/parley/redis-key.pem"),
            ]),
        )
        .unwrap();
        let nats = config.nats.tls.client().unwrap();
        assert_eq!(
            nats.ca_file.as_deref(),
            Some(Path::new("/etc/parley/nats-ca.pem"))
        );
        assert_eq!(nats.client_cert, None);
        let redis = config.redis.tls.client().unwrap();
        assert_eq!(redis.ca_file, None, "the system's roots");
        assert_eq!(
            redis.client_cert.unwrap().key_file,
            Path::new("/etc/parley/redis-key.pem")
        );

        let err = Config::from_toml(
            "[nats.tls]\nenabled = true\n[redis]\nurl = \"redis://redis.internal:6379\"\n[redis.tls]\nenabled = true\nserver_name = \"redis.internal\"\n",
        )
        .unwrap_err();
        let text = err.to_string();
        for expected in [
            "nats.tls.enabled needs nats.url",
            "redis.tls.enabled needs a rediss:// redis.url",
            "redis.tls.server_name cannot be set",
        ] {
            assert!(text.contains(expected), "missing {expected:?} in {text}");
        }
        let err =
            Config::from_toml("[nats.tls]\nca_file = \"/etc/parley/nats-ca.pem\"\n").unwrap_err();
        assert!(
            err.to_string()
                .contains("nats.tls settings are given but nats.tls.enabled is false"),
            "{err}"
        );
    }

    #[test]
    fn rate_limits_are_read_from_file_and_environment_and_never_zero() {
        let config = Config::load(
            None,
            env(&[
                ("PARLEY_GATEWAY__RATE_LIMITS__USER_PER_SEC", "5"),
                (
                    "PARLEY_GATEWAY__RATE_LIMITS__EXEMPT_NETWORKS",
                    "[\"10.0.0.0/8\", \"fd00::/8\"]",
                ),
            ]),
        )
        .unwrap();
        let limits = &config.gateway.rate_limits;
        assert_eq!(limits.user_per_sec, 5);
        assert_eq!(limits.user_burst, 100, "the default");
        assert_eq!(
            limits.exempt_networks,
            ["10.0.0.0/8".parse().unwrap(), "fd00::/8".parse().unwrap()]
        );

        let err = Config::from_toml(
            "[gateway.rate_limits]\nuser_per_sec = 0\nupgrades_per_ip_burst = 0\nflood_window_secs = 0\n",
        )
        .unwrap_err();
        let text = err.to_string();
        for expected in [
            "gateway.rate_limits.user_per_sec must be between 1 and 1000000 (limits cannot be turned off with 0",
            "gateway.rate_limits.upgrades_per_ip_burst must be between 1",
            "gateway.rate_limits.flood_window_secs must be between 1 and 3600",
        ] {
            assert!(text.contains(expected), "missing {expected:?} in {text}");
        }
        for (toml, key) in [
            ("ip_per_sec = -1", "ip_per_sec"),
            ("ip_burst = 2.5", "ip_burst"),
            ("user_burst = \"lots\"", "user_burst"),
            ("exempt_networks = [\"localhost\"]", "exempt_networks"),
            ("exempt_networks = [\"10.0.0.1\"]", "exempt_networks"),
            ("per_user = 3", "per_user"),
        ] {
            let err = Config::from_toml(&format!("[gateway.rate_limits]\n{toml}\n")).unwrap_err();
            assert!(err.to_string().contains(key), "{toml}: {err}");
        }
    }

    #[test]
    fn push_is_off_by_default_and_each_wrong_push_setting_is_refused() {
        assert_eq!(Config::default().push.webhook_url, None);
        let config = Config::load(
            None,
            env(&[
                (
                    "PARLEY_PUSH__WEBHOOK_URL",
                    "https://push.example.com/parley",
                ),
                ("PARLEY_PUSH__AUTH_HEADER", "0123456789"),
                ("PARLEY_PUSH__MAX_ATTEMPTS", "8"),
            ]),
        )
        .unwrap();
        assert_eq!(
            config.push.webhook_url.as_deref(),
            Some("https://push.example.com/parley")
        );
        assert_eq!(
            config.push.auth_header.as_ref().map(Secret::expose),
            Some("0123456789"),
            "taken verbatim"
        );
        assert_eq!(config.push.max_attempts, 8);
        assert!(
            !format!("{config:?}").contains("0123456789"),
            "the auth header is never shown"
        );
        for (toml, expected) in [
            (
                "webhook_url = \"ftp://push.example.com\"",
                "push.webhook_url must be an http:// or https:// URL",
            ),
            (
                "webhook_url = \"push.example.com/hook\"",
                "push.webhook_url must be an http:// or https:// URL",
            ),
            (
                "webhook_url = \"https://user:pw@push.example.com\"",
                "push.webhook_url must not carry credentials",
            ),
            (
                "timeout_ms = 10",
                "push.timeout_ms must be between 100 and 60000",
            ),
            (
                "max_attempts = 0",
                "push.max_attempts must be between 1 and 100",
            ),
            (
                "initial_backoff_ms = 0",
                "push.initial_backoff_ms must be between 1 and 60000",
            ),
            (
                "initial_backoff_ms = 2000\nmax_backoff_ms = 1000",
                "push.max_backoff_ms must be between push.initial_backoff_ms",
            ),
            (
                "concurrency = 0",
                "push.concurrency must be between 1 and 1024",
            ),
            (
                "auth_header = \"Bearer a\\nb\"",
                "push.auth_header must be a non-empty HTTP header value",
            ),
            (
                "auth_header = \" \"",
                "push.auth_header must be a non-empty HTTP header value",
            ),
            (
                "preview_chars = 5000",
                "push.preview_chars must be at most 4096",
            ),
            (
                "dead_letter_max_age_secs = 1",
                "push.dead_letter_max_age_secs must be between 60",
            ),
            (
                "dead_letter_max_bytes = 1000",
                "push.dead_letter_max_bytes must be at least 1048576",
            ),
            ("max_attempts = -1", "max_attempts"),
            ("webhok_url = \"http://x\"", "webhok_url"),
        ] {
            let err = Config::from_toml(&format!("[push]\n{toml}\n")).unwrap_err();
            assert!(err.to_string().contains(expected), "{toml}: {err}");
        }
    }

    #[test]
    fn connection_hardening_keys_are_read_and_checked() {
        let config = Config::from_toml(
            "[gateway]\nheader_timeout_ms = 300\nmax_connections_per_ip = 2\n[gateway.tls]\nenabled = true\ncert_file = \"/etc/parley/gw.pem\"\nkey_file = \"/etc/parley/gw-key.pem\"\n",
        )
        .unwrap();
        assert_eq!(config.gateway.header_timeout_ms, 300);
        assert_eq!(config.gateway.max_connections_per_ip, 2);
        assert_eq!(
            config.gateway.tls.files(),
            Some((
                Path::new("/etc/parley/gw.pem"),
                Path::new("/etc/parley/gw-key.pem")
            ))
        );
        assert_eq!(
            Config::default().gateway.tls.files(),
            None,
            "off by default"
        );

        for (toml, expected) in [
            (
                "[gateway]\nheader_timeout_ms = 0\n",
                "gateway.header_timeout_ms must be between 1 and 600000",
            ),
            (
                "[gateway]\nmax_connections_per_ip = 0\n",
                "gateway.max_connections_per_ip must be at least 1",
            ),
            (
                "[gateway.tls]\nenabled = true\ncert_file = \"/etc/parley/gw.pem\"\n",
                "gateway.tls.enabled needs both gateway.tls.cert_file and gateway.tls.key_file",
            ),
            (
                "[gateway.tls]\ncert_file = \"/a.pem\"\nkey_file = \"/b.pem\"\n",
                "gateway.tls.enabled is false",
            ),
            (
                "[gateway.tls]\nenabled = true\ncert_file = \"\"\nkey_file = \"/b.pem\"\n",
                "gateway.tls file paths must not be empty",
            ),
            (
                "[gateway.tls]\nreload_secs = 0\n",
                "gateway.tls.reload_secs must be between 1 and 3600",
            ),
            ("[gateway.tls]\ncert = \"/a.pem\"\n", "cert"),
        ] {
            let err = Config::from_toml(toml).unwrap_err().to_string();
            assert!(err.contains(expected), "{toml}: {err}");
        }
    }

    #[test]
    fn missing_config_file_is_an_error() {
        let err = Config::load(Some(Path::new("/nonexistent/parley.toml")), env(&[])).unwrap_err();
        assert!(err.to_string().contains("does not exist"));
    }
}
