//! Parley's load-test harness: open-loop scenarios against real gateways, latency measured
//! from each send's scheduled time, a ledger that checks every acknowledged message reached
//! every member exactly once and in order, and baselines measured in the same run.
//!
//! The binary (`src/main.rs`) only parses flags; [`run::run`] and [`run::baselines`] do the
//! work. Reports go to an output directory (JSON, SVG, role logs).

pub mod baseline;
pub mod chart;
pub mod client;
pub mod latency;
pub mod ledger;
pub mod live;
pub mod log;
pub mod plan;
pub mod platform;
pub mod presence;
pub mod replay;
pub mod report;
pub mod resources;
pub mod run;
pub mod scenario;
pub mod schedule;

use std::path::PathBuf;
use std::time::Duration;

pub use scenario::{Durability, Overrides, Scenario, ScenarioError};

#[derive(Debug, thiserror::Error)]
pub enum LoadtestError {
    #[error(transparent)]
    Scenario(#[from] ScenarioError),
    #[error(
        "the `parley` binary was not found (looked for {}); build it first: \
         `cargo build --release -p parley-services --bin parley` (or without --release for a \
         debug harness), or name it with --parley-bin",
        .searched.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
    )]
    ParleyNotFound { searched: Vec<PathBuf> },
    #[error("cannot start {}: {source}", binary.display())]
    Spawn {
        binary: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Server(#[from] parley_localstack::LocalError),
    #[error("the spawned {role} exited during start-up ({status}); its log ends with:\n{log_tail}")]
    RoleExited {
        role: String,
        status: String,
        log_tail: String,
    },
    #[error("the spawned platform was not ready after {after:?}; logs:\n{logs}")]
    NotReady { after: Duration, logs: String },
    #[error(
        "{needed} connections need {needed_fds} open files but the limit is {limit} (hard limit \
         included); raise it with `ulimit -n`"
    )]
    FileLimit {
        needed: usize,
        needed_fds: u64,
        limit: u64,
    },
    #[error("set-up failed: {0}")]
    Setup(String),
    #[error("baseline failed: {0}")]
    Baseline(String),
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error("cannot read process statistics: {0}")]
    Resources(String),
    #[error("reading the log back: {0}")]
    Log(String),
    #[error("fault injection: {0}")]
    Fault(String),
    #[error("drawing the chart: {0}")]
    Chart(String),
}

impl LoadtestError {
    pub(crate) fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> LoadtestError {
        let what = what.into();
        move |source| LoadtestError::Io { what, source }
    }
}

pub(crate) fn unix_secs() -> u64 {
    parley_services::unix_millis() / 1000
}
