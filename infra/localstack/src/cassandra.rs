//! A local single-node Apache Cassandra, the CQL server the ScyllaDB store's tests run on.
//!
//! The JVM is started by the `cassandra-node` launcher (`infra/cassandra-node.sh`, installed
//! with the jars by `infra/cassandra.sh`), which also watches this process: a node that is
//! never dropped (a test binary's shared node lives in a static) dies, and its directory is
//! deleted, within a second of this process ending, however it ended.

use std::ffi::OsStr;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use tempfile::TempDir;

use crate::binary::{find_binary, locate};
use crate::process::{self, Spawned, free_port, kill_and_reap, probe_connect, temp_dir};
use crate::{LocalError, ServerTls};

/// The oldest Cassandra the launcher may run: 4.1 does not start on Java 17.
pub const CASSANDRA_MIN_VERSION: &str = "5.0.0";

const NAME: &str = "cassandra-node";
/// The script that installs Cassandra's jars and the `cassandra-node` launcher.
pub const CASSANDRA_INSTALLER: &str = "infra/cassandra.sh";
const LOG_FILE: &str = "node.log";
/// In the node's `conf/`: appended by the launcher to the `cassandra.yaml` it writes (see
/// `infra/cassandra-node.sh`).
const EXTRA_CONFIG: &str = "cassandra-extra.yaml";
/// A cold JVM plus Cassandra's start-up is about 10 s here; on a loaded two-core CI
/// machine several times that.
const START_TIMEOUT: Duration = Duration::from_secs(180);

/// Whether CQL tests must run rather than skip: `CI` or `PARLEY_REQUIRE_CQL` is set
/// (`infra/test.sh` sets the latter).
pub fn cql_required() -> bool {
    ["CI", "PARLEY_REQUIRE_CQL"]
        .iter()
        .any(|name| std::env::var_os(name).is_some_and(|v| !v.is_empty()))
}

/// `client_encryption_options` for Cassandra's PEM-based SSL context, which wants the key
/// and the chain in one keystore file (written next to the configuration).
fn client_encryption(tls: &ServerTls, keystore: &Path) -> Result<String, LocalError> {
    let read = |path: &Path| {
        std::fs::read_to_string(path).map_err(LocalError::io(format!("reading {}", path.display())))
    };
    let joined = format!("{}{}", read(&tls.key)?, read(&tls.cert_chain)?);
    std::fs::write(keystore, joined)
        .map_err(LocalError::io(format!("writing {}", keystore.display())))?;
    Ok(format!(
        "client_encryption_options:\n  enabled: true\n  optional: false\n  \
         require_client_auth: {}\n  keystore: {}\n  truststore: {}\n  \
         ssl_context_factory:\n    \
         class_name: org.apache.cassandra.security.PEMBasedSslContextFactory\n",
        tls.require_client_cert,
        keystore.display(),
        tls.client_ca.display()
    ))
}

/// A running (or killed) single-node Cassandra on `127.0.0.1`, with its data in a temporary
/// directory removed on drop together with the JVM.
pub struct CassandraNode {
    launcher: Option<Spawned>,
    binary: PathBuf,
    native_port: u16,
    storage_port: u16,
    tls: bool,
    version: String,
    dir: PathBuf,
    /// Declared last so it drops after the process is gone.
    _temp: TempDir,
}

impl std::fmt::Debug for CassandraNode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CassandraNode")
            .field("contact_point", &self.contact_point())
            .field("version", &self.version)
            .field("dir", &self.dir)
            .finish()
    }
}

impl CassandraNode {
    /// Finds `cassandra-node` (see [`find_binary`]) and starts a plaintext node on free
    /// ports, returning once it answers a CQL `OPTIONS` request. Blocks for the start-up:
    /// about 10 s on an idle machine, at most [`START_TIMEOUT`].
    pub fn start() -> Result<CassandraNode, LocalError> {
        CassandraNode::start_with(None)
    }

    /// The installed `cassandra-node` launcher, or why there is none (the error names the
    /// script that installs it): for callers that start the node some other way.
    pub fn find() -> Result<PathBuf, LocalError> {
        find_binary(NAME, CASSANDRA_INSTALLER)
    }

    /// [`start`](Self::start), with the native port speaking TLS only when `tls` is given.
    pub fn start_with(tls: Option<&ServerTls>) -> Result<CassandraNode, LocalError> {
        let (binary, version) = locate(NAME, CASSANDRA_MIN_VERSION, CASSANDRA_INSTALLER)?;
        let temp = temp_dir("parley-cassandra-")?;
        let dir = temp.path().to_owned();
        let native_port = free_port()?;
        let storage_port = distinct_free_port(&[native_port])?;
        let mut node = CassandraNode {
            launcher: None,
            binary,
            native_port,
            storage_port,
            tls: tls.is_some(),
            version,
            dir,
            _temp: temp,
        };
        if let Some(tls) = tls {
            let conf = node.dir.join("conf");
            std::fs::create_dir_all(&conf)
                .map_err(LocalError::io(format!("creating {}", conf.display())))?;
            let extra = conf.join(EXTRA_CONFIG);
            let yaml = client_encryption(tls, &conf.join("keystore.pem"))?;
            std::fs::write(&extra, yaml)
                .map_err(LocalError::io(format!("writing {}", extra.display())))?;
        }
        node.run()?;
        Ok(node)
    }

    /// [`start`](Self::start) for a test: `None` (after printing `skipped: ...`) when no node
    /// can be started here, unless the CQL tests are required ([`cql_required`]): then it
    /// panics, so CI never passes without having run them.
    pub fn start_or_skip(what: &str) -> Option<CassandraNode> {
        CassandraNode::start_with_or_skip(what, None)
    }

    /// [`start_or_skip`](Self::start_or_skip) with [`start_with`](Self::start_with)'s TLS.
    pub fn start_with_or_skip(what: &str, tls: Option<&ServerTls>) -> Option<CassandraNode> {
        let started = std::time::Instant::now();
        match CassandraNode::start_with(tls) {
            Ok(node) => {
                eprintln!(
                    "{what}: Cassandra {} at {} started in {:.1} s",
                    node.version(),
                    node.contact_point(),
                    started.elapsed().as_secs_f64()
                );
                Some(node)
            }
            Err(e) if cql_required() => {
                panic!("{what} must run here (CI or PARLEY_REQUIRE_CQL is set), but: {e}")
            }
            Err(e) => {
                eprintln!("skipped: {what}: no local Cassandra node ({e})");
                None
            }
        }
    }

    /// Starts the node again on the same ports and data after [`kill`](Self::kill).
    pub fn restart(&mut self) -> Result<(), LocalError> {
        self.kill();
        match self.run() {
            // Seen once in a run starved of CPU: the node started right after a kill -9
            // exited during start-up (with no log left to tell why; a port of the old JVM not
            // released yet fits). A second start, a moment later, is what an operator does.
            Err(LocalError::Exited { .. }) => {
                std::thread::sleep(Duration::from_secs(2));
                self.run()
            }
            other => other,
        }
    }

    fn run(&mut self) -> Result<(), LocalError> {
        std::fs::create_dir_all(&self.dir)
            .map_err(LocalError::io(format!("creating {}", self.dir.display())))?;
        let log = self.log_path();
        let (native, storage, owner) = (
            self.native_port.to_string(),
            self.storage_port.to_string(),
            std::process::id().to_string(),
        );
        let args: [&OsStr; 5] = [
            OsStr::new("run"),
            self.dir.as_os_str(),
            OsStr::new(&native),
            OsStr::new(&storage),
            OsStr::new(&owner),
        ];
        let mut spawned = process::spawn(&self.binary, &args, &self.dir, &log)?;
        let (port, tls) = (self.native_port, self.tls);
        process::wait_ready_within(NAME, &mut spawned, &log, START_TIMEOUT, |left| {
            // The probe speaks no TLS; the native port opens last in start-up, so a port that
            // accepts is a node that serves.
            if tls {
                probe_connect(port, left).is_some()
            } else {
                answers_cql(port, left)
            }
        })?;
        self.launcher = Some(spawned);
        tracing::debug!(contact_point = %self.contact_point(), "cassandra ready");
        Ok(())
    }

    /// `127.0.0.1:PORT`, the CQL (native protocol) address.
    pub fn contact_point(&self) -> String {
        format!("127.0.0.1:{}", self.native_port)
    }

    /// The datacenter name the node reports (Cassandra's `SimpleSnitch`).
    pub fn datacenter(&self) -> &'static str {
        "datacenter1"
    }

    /// The version the launcher reported, e.g. `5.0.6`.
    pub fn version(&self) -> &str {
        &self.version
    }

    /// The node's log file (the launcher's and the JVM's output).
    pub fn log_path(&self) -> PathBuf {
        self.dir.join(LOG_FILE)
    }

    /// The node's directory (configuration, data, commit log); removed on drop.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The JVM's process id while the node runs (its launcher's child, not this process's),
    /// so that what it costs can be measured.
    pub fn pid(&self) -> Option<u32> {
        self.launcher.as_ref()?;
        std::fs::read_to_string(self.dir.join("java.pid"))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    /// SIGKILLs the JVM, as a crash would, and waits for the launcher. The data stays for
    /// [`restart`](Self::restart). Idempotent.
    pub fn kill(&mut self) {
        let pid = self.pid();
        let Some(mut launcher) = self.launcher.take() else {
            return;
        };
        if let Some(pid) = pid {
            let killed = Command::new("kill").args(["-9", &pid.to_string()]).status();
            if let Err(err) = killed {
                tracing::warn!(%err, "could not run kill -9 on the cassandra JVM");
            }
            // The launcher exits once it has reaped the JVM: only then are the ports free
            // for a restart.
            let deadline = std::time::Instant::now() + Duration::from_secs(10);
            while std::time::Instant::now() < deadline
                && matches!(launcher.child.try_wait(), Ok(None))
            {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        kill_and_reap(&mut launcher.child);
    }
}

/// A free port other than those in `taken` (the kernel may hand out a just-closed one again).
fn distinct_free_port(taken: &[u16]) -> Result<u16, LocalError> {
    loop {
        let port = free_port()?;
        if !taken.contains(&port) {
            return Ok(port);
        }
    }
}

impl Drop for CassandraNode {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Ready when a CQL v4 `OPTIONS` request gets a `SUPPORTED` response: the native transport
/// starts last, once the node can serve requests.
fn answers_cql(port: u16, left: Duration) -> bool {
    let Some(mut stream) = probe_connect(port, left) else {
        return false;
    };
    // version 4 request, no flags, stream 0, opcode OPTIONS (0x05), empty body.
    if stream
        .write_all(&[0x04, 0, 0, 0, 0x05, 0, 0, 0, 0])
        .is_err()
    {
        return false;
    }
    let mut header = [0u8; 9];
    stream.read_exact(&mut header).is_ok() && header[0] == 0x84 && header[4] == 0x06
}
