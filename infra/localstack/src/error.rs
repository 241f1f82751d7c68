//! The error type of this crate.

use std::io;
use std::path::PathBuf;
use std::process::ExitStatus;
use std::time::Duration;

/// Why a local server could not be found or started.
#[derive(Debug, thiserror::Error)]
pub enum LocalError {
    /// No executable with this name in any searched directory.
    #[error(
        "`{name}` not found (searched: {}); run `{installer}` from the repository root \
         to install it into .parley/bin, or set PARLEY_HOME to a directory whose bin/ holds it",
        display_paths(searched)
    )]
    BinaryNotFound {
        /// The executable's file name.
        name: String,
        /// The directories searched, in order.
        searched: Vec<PathBuf>,
        /// The repository's script that installs it.
        installer: &'static str,
    },

    /// The executable is older than Parley needs.
    #[error(
        "{} is version {found}, Parley needs {required} or newer; run `{installer}`",
        binary.display()
    )]
    TooOld {
        /// The executable that was checked.
        binary: PathBuf,
        /// The version it reported.
        found: String,
        /// The oldest version Parley accepts.
        required: String,
        /// The repository's script that installs a version it accepts.
        installer: &'static str,
    },

    /// `<binary> --version` did not print a version this crate understands.
    #[error("could not read a version from `{} --version`: {output:?}", binary.display())]
    UnknownVersion {
        /// The executable that was checked.
        binary: PathBuf,
        /// What it printed (stdout then stderr), or why it could not run.
        output: String,
    },

    /// The process could not be spawned.
    #[error("failed to spawn {}", binary.display())]
    Spawn {
        /// The executable.
        binary: PathBuf,
        /// The operating system's error.
        #[source]
        source: io::Error,
    },

    /// The process exited before it became ready (bad config, port taken, ...).
    #[error("{name} exited during startup ({status}); last log lines:\n{log_tail}")]
    Exited {
        /// `nats-server` or `redis-server`.
        name: String,
        /// How it exited.
        status: ExitStatus,
        /// The end of its log for this start.
        log_tail: String,
    },

    /// The process kept running but did not answer its readiness probe in time; it has been
    /// killed.
    #[error("{name} not ready after {after:?}; last log lines:\n{log_tail}")]
    NotReady {
        /// `nats-server` or `redis-server`.
        name: String,
        /// How long we waited.
        after: Duration,
        /// The end of its log for this start.
        log_tail: String,
    },

    /// A server on this directory is running, and the process that started it too.
    #[error(
        "{name} (pid {pid}, started by pid {owner}) already runs on {}: is another \
         `parley up` using this directory?",
        config.display()
    )]
    InUse {
        /// `nats-server`.
        name: String,
        /// The running server.
        pid: u32,
        /// The live process that started it.
        owner: u32,
        /// The config file it was started with, in the directory both would use.
        config: PathBuf,
    },

    /// A server an earlier run left on this directory did not stop when told to.
    #[error(
        "{name} (pid {pid}) from an earlier run still uses {}; it did not stop on SIGTERM or \
         SIGKILL, and a second server on its files would corrupt them",
        config.display()
    )]
    LeftoverRunning {
        /// `nats-server`.
        name: String,
        /// The leftover process.
        pid: u32,
        /// The config file it was started with, in the directory both would use.
        config: PathBuf,
    },

    /// A file-system operation around the server failed (temp dir, config, log file).
    #[error("{what}")]
    Io {
        /// What was being done, including the path.
        what: String,
        /// The operating system's error.
        #[source]
        source: io::Error,
    },
}

impl LocalError {
    pub(crate) fn io(what: impl Into<String>) -> impl FnOnce(io::Error) -> LocalError {
        let what = what.into();
        move |source| LocalError::Io { what, source }
    }
}

fn display_paths(paths: &[PathBuf]) -> String {
    if paths.is_empty() {
        return "nothing".to_owned();
    }
    paths
        .iter()
        .map(|p| p.display().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}
