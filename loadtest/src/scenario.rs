//! Scenarios: what load to offer, read from TOML and overridable by flags.

use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::presence::PresenceProbe;

/// How the NATS server of a spawned platform makes JetStream writes durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Durability {
    /// `sync_interval: always`: every write is fsynced before it is acknowledged.
    Always,
    /// nats-server's default: fsync every 2 minutes; a machine crash can lose acknowledged
    /// writes.
    Lazy,
}

impl Durability {
    pub fn describe(self) -> &'static str {
        match self {
            Durability::Always => "nats sync_interval: always (fsync per write)",
            Durability::Lazy => "nats default lazy fsync (every 2 min)",
        }
    }

    /// The durability of a spawned platform on `nats_nodes` NATS nodes, whose streams have
    /// one replica per node: e.g. "R3 on a 3-node nats cluster, nats sync_interval: always
    /// (fsync per write)".
    pub fn describe_on(self, nats_nodes: usize) -> String {
        let servers = if nats_nodes == 1 {
            "one nats-server".to_owned()
        } else {
            format!("a {nats_nodes}-node nats cluster")
        };
        format!("R{nats_nodes} on {servers}, {}", self.describe())
    }
}

/// One scenario file. Unknown keys are refused so a typo never silently runs the default.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    pub name: String,
    #[serde(default)]
    pub description: String,
    /// Distinct users; those not needed by `conversations` stay connected and silent.
    pub users: usize,
    #[serde(default = "one")]
    pub connections_per_user: usize,
    /// Connections opened per second (open loop: each has a scheduled connect time).
    #[serde(default = "default_connect_rate")]
    pub connect_rate: f64,
    /// Measured time, after the warm-up.
    pub duration_secs: f64,
    /// Sending before measuring: latencies of sends scheduled in it are not recorded (the
    /// ledger still checks them).
    #[serde(default)]
    pub warmup_secs: f64,
    /// Body size of every message, in bytes.
    #[serde(default = "default_message_bytes")]
    pub message_bytes: usize,
    /// Applies to `--spawn`; an external platform's durability is its own.
    #[serde(default = "default_durability")]
    pub durability: Durability,
    /// Gateways `--spawn` starts; clients are spread across them.
    #[serde(default = "one")]
    pub gateways: usize,
    /// NATS nodes `--spawn` starts: more than one makes a cluster, with the log and the
    /// intake replicated on every node.
    #[serde(default = "one")]
    pub nats_nodes: usize,
    /// Handler processes `--spawn` starts; at least two when a fault kills the handler, so
    /// service continues.
    #[serde(default = "one")]
    pub handlers: usize,
    /// Projector processes `--spawn` starts: they share one durable consumer, each event
    /// going to one of them. More than one needs the CQL store.
    #[serde(default = "one")]
    pub projectors: usize,
    /// The conversation store of a spawned platform.
    #[serde(default)]
    pub store: StoreChoice,
    /// Measure the baselines in the same run and print ratios.
    #[serde(default)]
    pub baselines: bool,
    /// Whether the clients ask for packed frames (`pack=1`): pushes ready together come in
    /// one WebSocket message. Off by default, so runs compare with earlier ones.
    #[serde(default)]
    pub pack: bool,
    #[serde(default)]
    pub conversations: Conversations,
    /// A steady open-loop rate. Exactly one of `rate` and `ramp` when there are
    /// conversations.
    #[serde(default)]
    pub rate: Option<Rate>,
    #[serde(default)]
    pub ramp: Option<Ramp>,
    /// `--spawn` only: processes to kill (SIGKILL) and restart during the run.
    #[serde(default)]
    pub faults: Vec<Fault>,
    /// Devices dropping their sockets during sending, and how every lost socket comes back.
    #[serde(default)]
    pub reconnects: Reconnects,
    /// Measure presence during the sending: see [`crate::presence`].
    #[serde(default)]
    pub presence: Option<PresenceProbe>,
    /// `--spawn` only: rebuild the projection and switch to it during the sending: see
    /// [`crate::replay`].
    #[serde(default)]
    pub replay: Option<ReplayPlan>,
}

/// `rebuild_at_secs` after sending starts, `parley replay rebuild --follow` into a new
/// SQLite file in the run's directory; `switch_at_secs` after, `parley replay switch` to it.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplayPlan {
    pub rebuild_at_secs: f64,
    pub switch_at_secs: f64,
}

/// Sockets the run drops on purpose while sending, and the backoff of every reconnect.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Reconnects {
    /// Drops per second across the system, each of a connection picked at random (Poisson
    /// arrivals), while sending.
    #[serde(default)]
    pub drops_per_sec: f64,
    /// The fraction of drops that close with a close frame; the others cut the TCP
    /// connection without one.
    #[serde(default = "default_clean_ratio")]
    pub clean_ratio: f64,
    /// Before reconnect attempt `n` a device waits a random time up to
    /// `min(backoff_cap_ms, backoff_base_ms * 2^n)` (full jitter).
    #[serde(default = "default_backoff_base_ms")]
    pub backoff_base_ms: u64,
    #[serde(default = "default_backoff_cap_ms")]
    pub backoff_cap_ms: u64,
    /// Every connection without a send slot drops at once and stays away, then all come
    /// back and resume together: the resume cost figure.
    #[serde(default)]
    pub outage: Option<Outage>,
}

impl Reconnects {
    /// Whether some drops cut a socket without a close frame.
    pub fn cuts_abruptly(&self) -> bool {
        (self.drops_per_sec > 0.0 && self.clean_ratio < 1.0) || self.outage.is_some()
    }
}

impl Default for Reconnects {
    fn default() -> Reconnects {
        Reconnects {
            drops_per_sec: 0.0,
            clean_ratio: default_clean_ratio(),
            backoff_base_ms: default_backoff_base_ms(),
            backoff_cap_ms: default_backoff_cap_ms(),
            outage: None,
        }
    }
}

/// `at_secs` after sending starts, the silent connections drop (without a close frame) and
/// reconnect `down_secs` later.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Outage {
    pub at_secs: f64,
    pub down_secs: f64,
}

/// The conversation store `--spawn` gives the platform.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StoreChoice {
    /// The embedded SQLite file, shared by the processes on this machine.
    #[default]
    Sqlite,
    /// A local Cassandra node (`cassandra-node` under `PARLEY_HOME`), through the CQL store
    /// that production runs on ScyllaDB.
    Cql,
}

impl StoreChoice {
    pub fn describe(self) -> &'static str {
        match self {
            StoreChoice::Sqlite => "embedded SQLite",
            StoreChoice::Cql => "CQL store on a local Cassandra node",
        }
    }
}

/// A process of a spawned platform that a fault kills.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum FaultRole {
    /// The first handler; the platform then runs two, so service continues.
    Handler,
    Projector,
    /// `gateway-<i>` (`gateway` is `gateway-0`).
    Gateway(usize),
    /// The nats-server (of a platform with one).
    Nats,
    /// `nats-<i>`: node `i` of a NATS cluster (`--nats-cluster`); the others keep serving.
    NatsNode(usize),
    /// The redis-server, flushed (`FLUSHALL`) before it is killed.
    Redis,
}

impl std::fmt::Display for FaultRole {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            FaultRole::Handler => f.write_str("handler"),
            FaultRole::Projector => f.write_str("projector"),
            FaultRole::Gateway(i) => write!(f, "gateway-{i}"),
            FaultRole::Nats => f.write_str("nats"),
            FaultRole::NatsNode(i) => write!(f, "nats-{i}"),
            FaultRole::Redis => f.write_str("redis"),
        }
    }
}

impl std::str::FromStr for FaultRole {
    type Err = String;

    fn from_str(s: &str) -> Result<FaultRole, String> {
        match s {
            "handler" => Ok(FaultRole::Handler),
            "projector" => Ok(FaultRole::Projector),
            "gateway" => Ok(FaultRole::Gateway(0)),
            "nats" => Ok(FaultRole::Nats),
            "redis" => Ok(FaultRole::Redis),
            _ => {
                let numbered = |prefix: &str| s.strip_prefix(prefix).and_then(|i| i.parse().ok());
                numbered("gateway-")
                    .map(FaultRole::Gateway)
                    .or_else(|| numbered("nats-").map(FaultRole::NatsNode))
                    .ok_or_else(|| {
                        format!(
                            "unknown role {s:?}: one of handler, projector, gateway, gateway-<i>, \
                             nats, nats-<i>, redis"
                        )
                    })
            }
        }
    }
}

impl TryFrom<String> for FaultRole {
    type Error = String;
    fn try_from(s: String) -> Result<FaultRole, String> {
        s.parse()
    }
}

impl From<FaultRole> for String {
    fn from(role: FaultRole) -> String {
        role.to_string()
    }
}

/// Kill `role` with SIGKILL `at_secs` after sending starts; start it again, with the same
/// ports, configuration and data, `down_secs` later. A `removed` role is stopped with
/// SIGTERM instead, as a scale-down would (a gateway drains its sockets, which move to the
/// others), and never started again.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Fault {
    pub role: FaultRole,
    pub at_secs: f64,
    #[serde(default = "default_down_secs")]
    pub down_secs: f64,
    #[serde(default)]
    pub removed: bool,
}

impl std::str::FromStr for Fault {
    type Err = String;

    /// `ROLE@SECS[:DOWN_SECS]`, e.g. `handler@4:2`.
    fn from_str(s: &str) -> Result<Fault, String> {
        let (role, times) = s
            .split_once('@')
            .ok_or_else(|| format!("{s:?}: expected ROLE@SECS[:DOWN_SECS]"))?;
        let (at, down) = match times.split_once(':') {
            Some((at, down)) => (at, Some(down)),
            None => (times, None),
        };
        let number = |v: &str| {
            v.parse::<f64>()
                .map_err(|_| format!("{s:?}: {v:?} is not a number of seconds"))
        };
        Ok(Fault {
            role: role.parse()?,
            at_secs: number(at)?,
            down_secs: down
                .map(number)
                .transpose()?
                .unwrap_or_else(default_down_secs),
            removed: false,
        })
    }
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Conversations {
    /// Direct conversations, each between two users of its own.
    #[serde(default)]
    pub direct_pairs: usize,
    #[serde(default)]
    pub groups: Vec<GroupSpec>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GroupSpec {
    /// Members, owner included.
    pub size: usize,
    #[serde(default = "one")]
    pub count: usize,
    /// How many of the members send (the first ones); all of them by default.
    #[serde(default)]
    pub senders: Option<usize>,
}

/// Messages per second, across the system or per sending user.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rate {
    #[serde(default)]
    pub messages_per_sec: Option<f64>,
    #[serde(default)]
    pub per_user_per_sec: Option<f64>,
}

/// Raise the system-wide rate in steps until a step breaks a threshold.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Ramp {
    pub start_per_sec: f64,
    pub step_per_sec: f64,
    pub step_secs: f64,
    pub max_per_sec: f64,
    /// A step fails when its p99 send -> delivery exceeds this.
    pub max_p99_ms: f64,
    /// ... or when errors exceed this fraction of its sends.
    #[serde(default)]
    pub max_error_ratio: f64,
    /// ... or when fewer than this fraction of the step's scheduled messages are acknowledged
    /// within it.
    #[serde(default = "default_min_acked_ratio")]
    pub min_acked_ratio: f64,
}

fn one() -> usize {
    1
}
fn default_connect_rate() -> f64 {
    500.0
}
fn default_message_bytes() -> usize {
    128
}
fn default_durability() -> Durability {
    Durability::Always
}
fn default_min_acked_ratio() -> f64 {
    0.95
}
fn default_down_secs() -> f64 {
    2.0
}
fn default_clean_ratio() -> f64 {
    0.25
}
fn default_backoff_base_ms() -> u64 {
    100
}
fn default_backoff_cap_ms() -> u64 {
    1000
}

/// Flag values that replace the file's.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub users: Option<usize>,
    pub connect_rate: Option<f64>,
    pub duration_secs: Option<f64>,
    pub warmup_secs: Option<f64>,
    pub rate: Option<f64>,
    pub message_bytes: Option<usize>,
    pub durability: Option<Durability>,
    pub gateways: Option<usize>,
    pub nats_nodes: Option<usize>,
    pub baselines: bool,
    pub pack: Option<bool>,
    /// Added to the file's.
    pub faults: Vec<Fault>,
}

#[derive(Debug, thiserror::Error)]
pub enum ScenarioError {
    #[error("cannot read scenario {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("scenario {path} is not valid TOML for a scenario: {message}")]
    Parse { path: String, message: String },
    #[error("scenario {name:?} is invalid:\n  - {}", problems.join("\n  - "))]
    Invalid { name: String, problems: Vec<String> },
}

/// The largest body the platform accepts by default (`limits.max_message_bytes`).
pub const MAX_MESSAGE_BYTES: usize = 4096;
/// Room the harness needs in a body for the scheduled send time.
pub const MIN_MESSAGE_BYTES: usize = 24;

impl Scenario {
    pub fn load(path: &Path) -> Result<Scenario, ScenarioError> {
        let text = std::fs::read_to_string(path).map_err(|source| ScenarioError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Scenario::parse(&text, &path.display().to_string())
    }

    pub fn parse(text: &str, origin: &str) -> Result<Scenario, ScenarioError> {
        toml::from_str(text).map_err(|e| ScenarioError::Parse {
            path: origin.to_owned(),
            message: e.to_string(),
        })
    }

    /// Apply flags, then check everything; every problem is listed at once.
    pub fn with_overrides(mut self, o: &Overrides) -> Result<Scenario, ScenarioError> {
        if let Some(v) = o.users {
            self.users = v;
        }
        if let Some(v) = o.connect_rate {
            self.connect_rate = v;
        }
        if let Some(v) = o.duration_secs {
            self.duration_secs = v;
        }
        if let Some(v) = o.warmup_secs {
            self.warmup_secs = v;
        }
        if let Some(v) = o.message_bytes {
            self.message_bytes = v;
        }
        if let Some(v) = o.durability {
            self.durability = v;
        }
        if let Some(v) = o.gateways {
            self.gateways = v;
        }
        if let Some(v) = o.nats_nodes {
            self.nats_nodes = v;
        }
        if let Some(v) = o.rate {
            self.rate = Some(Rate {
                messages_per_sec: Some(v),
                per_user_per_sec: None,
            });
            self.ramp = None;
        }
        self.baselines |= o.baselines;
        if let Some(v) = o.pack {
            self.pack = v;
        }
        self.faults.extend(o.faults.iter().copied());
        self.validate()?;
        Ok(self)
    }

    pub fn validate(&self) -> Result<(), ScenarioError> {
        let mut problems = Vec::new();
        let mut check = |ok: bool, problem: &str| {
            if !ok {
                problems.push(problem.to_owned());
            }
        };
        check(!self.name.trim().is_empty(), "name must not be empty");
        if let Some(probe) = &self.presence {
            check(probe.pairs >= 1, "presence.pairs must be at least 1");
            check(
                probe.per_sec.is_finite() && probe.per_sec > 0.0,
                "presence.per_sec must be a positive number",
            );
        }
        check(self.users >= 1, "users must be at least 1");
        check(
            self.connections_per_user >= 1,
            "connections_per_user must be at least 1",
        );
        check(
            self.connect_rate.is_finite() && self.connect_rate > 0.0,
            "connect_rate must be a positive number",
        );
        check(
            self.duration_secs.is_finite() && self.duration_secs > 0.0,
            "duration_secs must be a positive number",
        );
        check(
            self.warmup_secs.is_finite() && self.warmup_secs >= 0.0,
            "warmup_secs must be zero or more",
        );
        check(
            (MIN_MESSAGE_BYTES..=MAX_MESSAGE_BYTES).contains(&self.message_bytes),
            &format!("message_bytes must be between {MIN_MESSAGE_BYTES} and {MAX_MESSAGE_BYTES}"),
        );
        check(self.gateways >= 1, "gateways must be at least 1");
        check(self.handlers >= 1, "handlers must be at least 1");
        check(self.projectors >= 1, "projectors must be at least 1");
        check(
            self.projectors == 1 || self.store == StoreChoice::Cql,
            "projectors above 1 need store = \"cql\": processes of their own do not share one SQLite writer",
        );
        check(
            (1..=5).contains(&self.nats_nodes),
            "nats_nodes must be between 1 and 5 (a stream has at most 5 replicas)",
        );
        for (i, g) in self.conversations.groups.iter().enumerate() {
            check(
                (2..=10_000).contains(&g.size),
                &format!("conversations.groups[{i}].size must be between 2 and 10000"),
            );
            check(
                g.count >= 1,
                &format!("conversations.groups[{i}].count must be at least 1"),
            );
            if let Some(s) = g.senders {
                check(
                    s >= 1 && s <= g.size,
                    &format!("conversations.groups[{i}].senders must be between 1 and size"),
                );
            }
        }
        let needed = self.users_in_conversations();
        check(
            needed <= self.users,
            &format!(
                "the conversations need {needed} users but users = {}",
                self.users
            ),
        );
        let talking = self.conversation_count() > 0;
        match (&self.rate, &self.ramp, talking) {
            (Some(_), Some(_), _) => check(false, "set either [rate] or [ramp], not both"),
            (None, None, true) => check(false, "conversations need a [rate] or a [ramp]"),
            (Some(_), None, false) | (None, Some(_), false) => {
                check(false, "[rate] and [ramp] need conversations to send in")
            }
            _ => {}
        }
        if let Some(rate) = &self.rate {
            match (rate.messages_per_sec, rate.per_user_per_sec) {
                (Some(r), None) | (None, Some(r)) => check(
                    r.is_finite() && r > 0.0,
                    "the rate must be a positive number",
                ),
                _ => check(
                    false,
                    "[rate] takes exactly one of messages_per_sec and per_user_per_sec",
                ),
            }
        }
        if let Some(ramp) = &self.ramp {
            let positive = |v: f64| v.is_finite() && v > 0.0;
            check(
                positive(ramp.start_per_sec)
                    && positive(ramp.step_per_sec)
                    && positive(ramp.step_secs)
                    && positive(ramp.max_p99_ms),
                "ramp.start_per_sec, step_per_sec, step_secs and max_p99_ms must be positive",
            );
            check(
                ramp.max_per_sec >= ramp.start_per_sec,
                "ramp.max_per_sec must be at least start_per_sec",
            );
            check(
                (0.0..=1.0).contains(&ramp.max_error_ratio)
                    && (0.0..=1.0).contains(&ramp.min_acked_ratio),
                "ramp.max_error_ratio and min_acked_ratio must be between 0 and 1",
            );
        }
        let sending = self.sending_secs();
        for (i, fault) in self.faults.iter().enumerate() {
            check(
                fault.at_secs.is_finite() && (0.0..sending).contains(&fault.at_secs),
                &format!("faults[{i}].at_secs must be within the sending time (0 to {sending} s)"),
            );
            check(
                fault.down_secs.is_finite() && fault.down_secs >= 0.0,
                &format!("faults[{i}].down_secs must be zero or more"),
            );
            if fault.removed {
                let (kind, count) = match fault.role {
                    FaultRole::Gateway(_) => ("gateways", self.gateways),
                    FaultRole::Handler => ("handlers", self.handlers),
                    FaultRole::Projector => ("projectors", self.projectors),
                    _ => ("", 0),
                };
                check(
                    !kind.is_empty(),
                    &format!(
                        "faults[{i}] removes {}: only a gateway, handler or projector can be removed",
                        fault.role
                    ),
                );
                check(
                    kind.is_empty() || count >= 2,
                    &format!(
                        "faults[{i}] removes {}, the only one of the {kind}: nothing would be left to serve",
                        fault.role
                    ),
                );
            }
            match fault.role {
                FaultRole::Gateway(g) => check(
                    g < self.gateways,
                    &format!(
                        "faults[{i}] names gateway-{g}, but there are {} gateways",
                        self.gateways
                    ),
                ),
                FaultRole::NatsNode(n) => check(
                    self.nats_nodes > 1 && n < self.nats_nodes,
                    &format!(
                        "faults[{i}] names nats-{n}, but there is no NATS cluster with that node \
                         (nats_nodes = {})",
                        self.nats_nodes
                    ),
                ),
                FaultRole::Nats => check(
                    self.nats_nodes == 1,
                    &format!(
                        "faults[{i}] names nats, but NATS is a cluster: name a node, nats-<i>"
                    ),
                ),
                _ => {}
            }
        }
        if let Some(replay) = &self.replay {
            check(
                replay.rebuild_at_secs.is_finite()
                    && replay.switch_at_secs.is_finite()
                    && 0.0 <= replay.rebuild_at_secs
                    && replay.rebuild_at_secs < replay.switch_at_secs
                    && replay.switch_at_secs < sending,
                &format!(
                    "replay needs 0 <= rebuild_at_secs < switch_at_secs < the sending time ({sending} s)"
                ),
            );
            check(
                self.store == StoreChoice::Sqlite,
                "replay rebuilds into a SQLite file: it needs store = \"sqlite\"",
            );
        }
        let r = &self.reconnects;
        check(
            r.drops_per_sec.is_finite() && r.drops_per_sec >= 0.0,
            "reconnects.drops_per_sec must be zero or more",
        );
        check(
            (0.0..=1.0).contains(&r.clean_ratio),
            "reconnects.clean_ratio must be between 0 and 1",
        );
        check(
            r.backoff_base_ms >= 1 && r.backoff_cap_ms >= r.backoff_base_ms,
            "reconnects.backoff_base_ms must be at least 1 and backoff_cap_ms at least that",
        );
        if let Some(outage) = &r.outage {
            check(
                outage.at_secs.is_finite() && (0.0..sending).contains(&outage.at_secs),
                &format!(
                    "reconnects.outage.at_secs must be within the sending time (0 to {sending} s)"
                ),
            );
            check(
                outage.down_secs.is_finite() && outage.down_secs > 0.0,
                "reconnects.outage.down_secs must be positive",
            );
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(ScenarioError::Invalid {
                name: self.name.clone(),
                problems,
            })
        }
    }

    pub fn users_in_conversations(&self) -> usize {
        2 * self.conversations.direct_pairs
            + self
                .conversations
                .groups
                .iter()
                .map(|g| g.size * g.count)
                .sum::<usize>()
    }

    pub fn conversation_count(&self) -> usize {
        self.conversations.direct_pairs
            + self
                .conversations
                .groups
                .iter()
                .map(|g| g.count)
                .sum::<usize>()
    }

    /// Handler processes to spawn: two at least when a fault kills the handler.
    pub fn handler_count(&self) -> usize {
        let killed = self
            .faults
            .iter()
            .any(|f| f.role == FaultRole::Handler && !f.removed);
        if killed {
            self.handlers.max(2)
        } else {
            self.handlers
        }
    }

    pub fn connections(&self) -> usize {
        self.users * self.connections_per_user
    }

    pub fn warmup(&self) -> Duration {
        Duration::from_secs_f64(self.warmup_secs)
    }

    /// How long senders run: warm-up plus the measured time, or every ramp step.
    pub fn sending_time(&self) -> Duration {
        Duration::from_secs_f64(self.sending_secs())
    }

    /// [`sending_time`](Self::sending_time) in seconds, also for a scenario not yet
    /// validated (where it may be negative).
    fn sending_secs(&self) -> f64 {
        match &self.ramp {
            Some(ramp) => ramp.step_secs * ramp.steps().len() as f64,
            None => self.warmup_secs + self.duration_secs,
        }
    }
}

impl Ramp {
    /// The system-wide rate of each step.
    pub fn steps(&self) -> Vec<f64> {
        let mut steps = Vec::new();
        let mut rate = self.start_per_sec;
        while rate <= self.max_per_sec + 1e-9 && steps.len() < 1000 {
            steps.push(rate);
            rate += self.step_per_sec;
        }
        steps
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DM: &str = r#"
        name = "dm"
        users = 100
        duration_secs = 10
        [conversations]
        direct_pairs = 50
        [rate]
        messages_per_sec = 200
    "#;

    fn problems(text: &str) -> Vec<String> {
        match Scenario::parse(text, "test").unwrap().validate() {
            Err(ScenarioError::Invalid { problems, .. }) => problems,
            other => panic!("expected problems, got {other:?}"),
        }
    }

    #[test]
    fn a_valid_scenario_gets_its_defaults() {
        let s = Scenario::parse(DM, "test").unwrap();
        s.validate().unwrap();
        assert_eq!(s.connections_per_user, 1);
        assert_eq!(s.message_bytes, 128);
        assert_eq!(s.durability, Durability::Always);
        assert_eq!(s.nats_nodes, 1);
        assert_eq!(s.users_in_conversations(), 100);
        assert_eq!(s.sending_time(), Duration::from_secs(10));
    }

    #[test]
    fn a_replay_plan_is_checked() {
        let with = |replay: &str| format!("{DM}\n[replay]\n{replay}\n");
        let good = Scenario::parse(&with("rebuild_at_secs = 2\nswitch_at_secs = 5"), "t").unwrap();
        good.validate().unwrap();
        for bad in [
            "rebuild_at_secs = 5\nswitch_at_secs = 2",
            "rebuild_at_secs = -1\nswitch_at_secs = 2",
            "rebuild_at_secs = 2\nswitch_at_secs = 10",
            "rebuild_at_secs = 2\nswitch_at_secs = nan",
        ] {
            assert_eq!(
                problems(&with(bad)),
                ["replay needs 0 <= rebuild_at_secs < switch_at_secs < the sending time (10 s)"],
                "{bad}"
            );
        }
        let cql = with("rebuild_at_secs = 2\nswitch_at_secs = 5")
            .replace("duration_secs = 10", "duration_secs = 10\nstore = \"cql\"");
        assert_eq!(
            problems(&cql),
            ["replay rebuilds into a SQLite file: it needs store = \"sqlite\""]
        );
        for bad in [
            "rebuild_at_secs = 2",
            "rebuild_at_secs = 2\nswitch_at_secs = 5\nat = 1",
        ] {
            assert!(Scenario::parse(&with(bad), "t").is_err(), "{bad}");
        }
    }

    #[test]
    fn unknown_keys_and_wrong_types_are_refused() {
        let typo = DM.replace("duration_secs", "durration_secs");
        let err = Scenario::parse(&typo, "typo.toml").unwrap_err().to_string();
        assert!(
            err.contains("typo.toml") && err.contains("durration_secs"),
            "{err}"
        );
        let wrong = DM.replace("users = 100", "users = \"many\"");
        assert!(matches!(
            Scenario::parse(&wrong, "t"),
            Err(ScenarioError::Parse { .. })
        ));
        let durability = format!("durability = \"sometimes\"\n{DM}");
        assert!(Scenario::parse(&durability, "t").is_err());
    }

    #[test]
    fn every_problem_is_listed() {
        let text = DM
            .replace("users = 100", "users = 10")
            .replace("duration_secs = 10", "duration_secs = 0")
            + "message_bytes = 5\n";
        // `message_bytes` after a table would belong to it: put it first instead.
        let text = format!(
            "message_bytes = 5\n{}",
            text.replace("message_bytes = 5\n", "")
        );
        let p = problems(&text);
        assert!(p.iter().any(|p| p.contains("duration_secs")), "{p:?}");
        assert!(p.iter().any(|p| p.contains("message_bytes")), "{p:?}");
        assert!(p.iter().any(|p| p.contains("need 100 users")), "{p:?}");
    }

    #[test]
    fn rate_and_ramp_are_exclusive_and_needed() {
        let both = format!(
            "{DM}\n[ramp]\nstart_per_sec = 1\nstep_per_sec = 1\nstep_secs = 1\nmax_per_sec = 2\nmax_p99_ms = 1\n"
        );
        assert!(problems(&both).iter().any(|p| p.contains("not both")));
        let neither = DM.replace("[rate]\n        messages_per_sec = 200", "");
        assert!(
            problems(&neither)
                .iter()
                .any(|p| p.contains("need a [rate]"))
        );
        let two = DM.replace(
            "messages_per_sec = 200",
            "messages_per_sec = 2\nper_user_per_sec = 1",
        );
        assert!(problems(&two).iter().any(|p| p.contains("exactly one")));
    }

    #[test]
    fn durability_names_the_replicas() {
        assert_eq!(
            Durability::Always.describe_on(1),
            "R1 on one nats-server, nats sync_interval: always (fsync per write)"
        );
        assert_eq!(
            Durability::Lazy.describe_on(3),
            "R3 on a 3-node nats cluster, nats default lazy fsync (every 2 min)"
        );
    }

    #[test]
    fn flags_override_the_file() {
        let s = Scenario::parse(DM, "t")
            .unwrap()
            .with_overrides(&Overrides {
                duration_secs: Some(3.0),
                rate: Some(50.0),
                durability: Some(Durability::Lazy),
                nats_nodes: Some(3),
                pack: Some(true),
                ..Overrides::default()
            })
            .unwrap();
        assert!(
            !Scenario::parse(DM, "t").unwrap().pack,
            "packing is off unless asked for"
        );
        assert!(s.pack);
        assert_eq!(s.duration_secs, 3.0);
        assert_eq!(s.rate.unwrap().messages_per_sec, Some(50.0));
        assert_eq!(s.durability, Durability::Lazy);
        assert_eq!(s.nats_nodes, 3);
        let six = Scenario::parse(DM, "t")
            .unwrap()
            .with_overrides(&Overrides {
                nats_nodes: Some(6),
                ..Overrides::default()
            });
        assert!(
            matches!(&six, Err(ScenarioError::Invalid { problems, .. }) if problems[0].contains("nats_nodes")),
            "{six:?}"
        );
        let bad = Scenario::parse(DM, "t")
            .unwrap()
            .with_overrides(&Overrides {
                users: Some(0),
                ..Overrides::default()
            });
        assert!(matches!(bad, Err(ScenarioError::Invalid { .. })));
    }

    #[test]
    fn a_scaled_out_platform_is_checked() {
        let s = Scenario::parse(DM, "t").unwrap();
        assert_eq!(
            (s.handlers, s.projectors, s.store),
            (1, 1, StoreChoice::Sqlite)
        );
        let p = problems(&format!("handlers = 0\nprojectors = 2\n{DM}"));
        assert!(p.iter().any(|p| p.contains("handlers must be")), "{p:?}");
        assert!(
            p.iter().any(|p| p.contains("need store = \"cql\"")),
            "{p:?}"
        );
        let scaled = format!("projectors = 2\nstore = \"cql\"\ngateways = 3\n{DM}");
        Scenario::parse(&scaled, "t").unwrap().validate().unwrap();

        let removing = |role: &str| {
            format!("{scaled}\n[[faults]]\nrole = \"{role}\"\nat_secs = 1\nremoved = true\n")
        };
        Scenario::parse(&removing("gateway-2"), "t")
            .unwrap()
            .validate()
            .unwrap();
        Scenario::parse(&removing("projector"), "t")
            .unwrap()
            .validate()
            .unwrap();
        let p = problems(&removing("handler"));
        assert!(
            p.iter().any(|p| p.contains("the only one of the handlers")),
            "{p:?}"
        );
        let p = problems(&removing("redis"));
        assert!(
            p.iter()
                .any(|p| p.contains("only a gateway, handler or projector")),
            "{p:?}"
        );
    }

    #[test]
    fn a_killed_handler_gets_a_second_one_a_removed_one_does_not() {
        let killed = format!("{DM}\n[[faults]]\nrole = \"handler\"\nat_secs = 1\n");
        assert_eq!(Scenario::parse(&killed, "t").unwrap().handler_count(), 2);
        let removed = format!(
            "handlers = 3\n{DM}\n[[faults]]\nrole = \"handler\"\nat_secs = 1\nremoved = true\n"
        );
        assert_eq!(Scenario::parse(&removed, "t").unwrap().handler_count(), 3);
    }

    #[test]
    fn reconnects_have_defaults_and_are_checked() {
        let s = Scenario::parse(DM, "t").unwrap();
        assert_eq!(s.reconnects, Reconnects::default());
        assert_eq!(s.reconnects.backoff_cap_ms, 1000);
        let text = format!(
            "{DM}\n[reconnects]\ndrops_per_sec = -1\nclean_ratio = 2\nbackoff_base_ms = 500\nbackoff_cap_ms = 100\noutage = {{ at_secs = 20, down_secs = 0 }}\n"
        );
        let p = problems(&text);
        for field in [
            "drops_per_sec",
            "clean_ratio",
            "backoff_cap_ms",
            "outage.at_secs",
            "outage.down_secs",
        ] {
            assert!(p.iter().any(|p| p.contains(field)), "{field}: {p:?}");
        }
    }

    #[test]
    fn ramp_steps_stop_at_the_maximum() {
        let ramp = Ramp {
            start_per_sec: 100.0,
            step_per_sec: 50.0,
            step_secs: 5.0,
            max_per_sec: 260.0,
            max_p99_ms: 100.0,
            max_error_ratio: 0.0,
            min_acked_ratio: 0.95,
        };
        assert_eq!(ramp.steps(), vec![100.0, 150.0, 200.0, 250.0]);
    }

    #[test]
    fn faults_come_from_the_file_and_the_flags_and_are_checked() {
        let text = format!(
            "{}\n[[faults]]\nrole = \"handler\"\nat_secs = 3\n",
            DM.replace("users = 100", "users = 100\ngateways = 2")
        );
        let s = Scenario::parse(&text, "t")
            .unwrap()
            .with_overrides(&Overrides {
                faults: vec![
                    "gateway-1@4:0.5".parse().unwrap(),
                    "redis@2".parse().unwrap(),
                ],
                ..Overrides::default()
            })
            .unwrap();
        let roles: Vec<_> = s
            .faults
            .iter()
            .map(|f| (f.role, f.at_secs, f.down_secs))
            .collect();
        assert_eq!(
            roles,
            vec![
                (FaultRole::Handler, 3.0, 2.0),
                (FaultRole::Gateway(1), 4.0, 0.5),
                (FaultRole::Redis, 2.0, 2.0)
            ]
        );
        assert_eq!(
            "gateway@1".parse::<Fault>().unwrap().role,
            FaultRole::Gateway(0)
        );
        for bad in ["cache@1", "handler", "handler@soon", "nats@1:x"] {
            assert!(bad.parse::<Fault>().is_err(), "{bad}");
        }
        let late = Scenario::parse(DM, "t")
            .unwrap()
            .with_overrides(&Overrides {
                faults: vec![
                    "nats@10".parse().unwrap(),
                    "gateway-3@1".parse().unwrap(),
                    "nats-1@1".parse().unwrap(),
                ],
                ..Overrides::default()
            });
        let Err(ScenarioError::Invalid { problems, .. }) = late else {
            panic!("{late:?}");
        };
        assert!(
            problems
                .iter()
                .any(|p| p.contains("within the sending time")),
            "{problems:?}"
        );
        assert!(
            problems.iter().any(|p| p.contains("gateway-3")),
            "{problems:?}"
        );
        assert!(
            problems.iter().any(|p| p.contains("nats-1")),
            "{problems:?}"
        );
        assert_eq!(
            "nats-2@1".parse::<Fault>().unwrap().role,
            FaultRole::NatsNode(2)
        );
        let cluster = Scenario::parse(DM, "t")
            .unwrap()
            .with_overrides(&Overrides {
                nats_nodes: Some(3),
                faults: vec!["nats-2@1".parse().unwrap()],
                ..Overrides::default()
            });
        assert!(cluster.is_ok(), "{cluster:?}");
    }

    #[test]
    fn shipped_scenarios_are_valid() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("scenarios");
        let mut seen = 0;
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            Scenario::load(&path)
                .and_then(|s| s.validate())
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            seen += 1;
        }
        assert!(
            seen >= 4,
            "expected the four shipped scenarios, found {seen}"
        );
    }
}
