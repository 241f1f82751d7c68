//! Rebuilding a projection into a new target while the live one keeps serving, switching
//! readers and projectors over to it, and comparing two targets (`parley replay`).
//!
//! - [`rebuild`]: the log into a target, with its own ordered consumer.
//! - [`switch`]: the active target, kept in a JetStream KV bucket and followed by nodes.
//! - [`active`]: the one swappable store handle gateways and projectors read through.
//! - [`verify`]: two targets (or a target and the log) compared conversation by conversation.

pub mod active;
pub mod cli;
pub mod rebuild;
pub mod switch;
pub mod verify;

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;

use parley_projections::ConversationStore;

use crate::config::{Config, StoreKind};
use crate::node::NodeError;

pub use active::ActiveStore;

/// Where a projection lives: `sqlite:<path>` or `cql:<keyspace>` (on the configured contact
/// points, with the configured TLS, credentials and consistency).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Target {
    Sqlite(PathBuf),
    Cql(String),
}

impl Target {
    /// The store `config` names.
    pub fn configured(config: &Config) -> Target {
        let store = &config.projector.store;
        match store.kind {
            StoreKind::Sqlite => Target::Sqlite(store.path.clone()),
            StoreKind::Scylla => Target::Cql(store.scylla.keyspace.clone()),
        }
    }

    /// A bounded label for metrics, as `projector.store.kind` names it.
    pub fn kind(&self) -> &'static str {
        match self {
            Target::Sqlite(_) => StoreKind::Sqlite.as_str(),
            Target::Cql(_) => StoreKind::Scylla.as_str(),
        }
    }

    /// `config` with this target as its store, everything else kept.
    pub fn configure(&self, config: &Config) -> Config {
        let mut config = config.clone();
        let store = &mut config.projector.store;
        match self {
            Target::Sqlite(path) => {
                store.kind = StoreKind::Sqlite;
                store.path = path.clone();
            }
            Target::Cql(keyspace) => {
                store.kind = StoreKind::Scylla;
                store.scylla.keyspace = keyspace.clone();
            }
        }
        config
    }

    /// Open (creating if needed) the target's store.
    pub async fn open(&self, config: &Config) -> Result<Arc<dyn ConversationStore>, ReplayError> {
        if let Target::Cql(_) = self
            && config.projector.store.scylla.contact_points.is_empty()
        {
            return Err(ReplayError::BadTarget(format!(
                "{self}: projector.store.scylla.contact_points is not configured"
            )));
        }
        crate::node::open_store(&self.configure(config))
            .await
            .map_err(|e| ReplayError::Store(format!("{self}: {e}")))
    }
}

impl FromStr for Target {
    type Err = ReplayError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = |why: &str| {
            ReplayError::BadTarget(format!(
                "{s:?}: {why}; a target is sqlite:<path> or cql:<keyspace>"
            ))
        };
        match s.split_once(':') {
            Some(("sqlite", path)) if !path.is_empty() => Ok(Target::Sqlite(PathBuf::from(path))),
            Some(("cql", keyspace)) => {
                let valid = keyspace.len() <= 48
                    && keyspace.starts_with(|c: char| c.is_ascii_alphabetic())
                    && keyspace
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '_');
                if valid {
                    Ok(Target::Cql(keyspace.to_owned()))
                } else {
                    Err(bad(
                        "a keyspace is 1-48 letters, digits or underscores, starting with a letter",
                    ))
                }
            }
            Some(("sqlite", _)) => Err(bad("the path is empty")),
            _ => Err(bad("unknown kind")),
        }
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Sqlite(path) => write!(f, "sqlite:{}", path.display()),
            Target::Cql(keyspace) => write!(f, "cql:{keyspace}"),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    #[error("bad target {0}")]
    BadTarget(String),
    #[error(
        "{target} already holds data (position {position}); pass --resume to continue from there, or choose a new target"
    )]
    Occupied { target: Target, position: u64 },
    #[error(
        "{target} holds the log up to {position}; --from-seq {from} needs it to hold up to {}",
        from - 1
    )]
    Gap {
        target: Target,
        position: u64,
        from: u64,
    },
    #[error(
        "{target} is {lag} events behind the log (position {position}, log at {end}; at most {max_lag} allowed): run `parley replay rebuild --to {target} --resume --follow` first"
    )]
    Behind {
        target: Target,
        position: u64,
        end: u64,
        lag: u64,
        max_lag: u64,
    },
    #[error("conversation store {0}")]
    Store(String),
    #[error("NATS: {0}")]
    Nats(String),
    #[error(transparent)]
    Projector(#[from] crate::projector::ProjectorError),
    #[error("interrupted")]
    Interrupted,
}

impl ReplayError {
    /// The exit code `parley replay` ends with: 2 for what the operator passed, 1 otherwise.
    pub fn exit_code(&self) -> i32 {
        match self {
            ReplayError::BadTarget(_) | ReplayError::Occupied { .. } | ReplayError::Gap { .. } => 2,
            _ => 1,
        }
    }
}

impl From<parley_projections::StoreError> for ReplayError {
    fn from(e: parley_projections::StoreError) -> Self {
        ReplayError::Store(e.to_string())
    }
}

impl From<NodeError> for ReplayError {
    fn from(e: NodeError) -> Self {
        ReplayError::Nats(e.to_string())
    }
}

/// Connect to NATS and find (or set up) the log, as every `parley replay` command does.
pub(crate) async fn connect(
    config: &Config,
) -> Result<(crate::node::Nats, crate::topology::Topology), ReplayError> {
    let nats = crate::node::connect_nats(config, &crate::admin::Readiness::default()).await?;
    let topology = crate::topology::ensure(async_nats::jetstream::new(nats.client.clone()), config)
        .await
        .map_err(|e| ReplayError::Nats(e.to_string()))?;
    Ok((nats, topology))
}

/// The log's last sequence now.
pub(crate) async fn log_end(topology: &crate::topology::Topology) -> Result<u64, ReplayError> {
    let mut log = topology.log.clone();
    Ok(log
        .info()
        .await
        .map_err(|e| ReplayError::Nats(e.to_string()))?
        .state
        .last_sequence)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_parse_and_print_back() {
        for text in ["sqlite:/tmp/a.db", "sqlite:rel/b.db", "cql:parley_2"] {
            let target: Target = text.parse().unwrap();
            assert_eq!(target.to_string(), text);
        }
        for bad in [
            "",
            "sqlite:",
            "cql:",
            "cql:1x",
            "cql:a-b",
            "mysql:x",
            "/tmp/a.db",
        ] {
            let e = bad.parse::<Target>().unwrap_err();
            assert_eq!(e.exit_code(), 2, "{bad}: {e}");
        }
    }
}
