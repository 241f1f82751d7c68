//! A local `nats-server` with JetStream.

use std::ffi::OsStr;
use std::fmt::Write as _;
use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tempfile::TempDir;

use crate::binary::{SERVERS_INSTALLER, locate};
use crate::process::{
    self, Spawned, kill_and_reap, prepare_dir, probe_connect, start_with_retry, temp_dir,
};
use crate::{LocalError, ServerTls};

/// The oldest nats-server Parley accepts (atomic batch publish, current JetStream API).
pub const NATS_MIN_VERSION: &str = "2.12.0";

/// Largest message payload the local server accepts: 8 MiB (nats-server's default is
/// 1 MiB). A group event carrying a large member list must fit in one message; 8 MiB is also
/// the most nats-server accepts without warning. Clients learn it from the INFO line.
pub const NATS_MAX_PAYLOAD: &str = "8MB";

pub(crate) const NATS_NAME: &str = "nats-server";
const CONFIG_FILE: &str = "nats.conf";
const LOG_FILE: &str = "nats.log";
/// The process id of whoever started the server on this directory.
const OWNER_FILE: &str = "nats.owner";
const STORE_DIR: &str = "store";

static SERVER_SEQ: AtomicU64 = AtomicU64::new(0);

/// A name no other server started by this machine's tests has: `parley-local-<pid>-<n>`.
/// Readiness checks it, and a cluster needs distinct server names.
pub(crate) fn unique_name() -> String {
    format!(
        "parley-local-{}-{}",
        std::process::id(),
        SERVER_SEQ.fetch_add(1, Ordering::Relaxed)
    )
}

/// A node's place in a cluster: the cluster's name, its own route port, and the route
/// ports of the other nodes.
#[derive(Debug, Clone)]
pub(crate) struct ClusterMembership {
    pub(crate) name: String,
    pub(crate) route_port: u16,
    pub(crate) peers: Vec<u16>,
}

/// How to start a [`NatsServer`].
#[derive(Debug, Clone)]
pub struct NatsOptions {
    /// Enable JetStream (default `true`).
    pub jetstream: bool,
    /// `jetstream { sync_interval: always }`: fsync every write before acknowledging it
    /// (default `true`). Without it nats-server fsyncs every 2 minutes and an OS crash can
    /// lose acknowledged events. Costs throughput: measured on a 2-core machine, per-message
    /// fsync cut raw async publish from about 178k/s to 6.5k/s.
    pub sync_always: bool,
    /// Where config, log and JetStream store live. `None` (default): a fresh temporary
    /// directory, removed when the server is dropped. `Some(dir)`: created if missing and
    /// kept, so the log survives across runs (`parley up`).
    pub data_dir: Option<PathBuf>,
    /// Client port on 127.0.0.1. `None` (default): a free port chosen by the kernel.
    pub port: Option<u16>,
    /// TLS for every client connection (the `INFO` line still comes in plaintext first,
    /// as the protocol has it). `None` (default): plaintext.
    pub tls: Option<ServerTls>,
}

impl Default for NatsOptions {
    fn default() -> Self {
        NatsOptions {
            jetstream: true,
            sync_always: true,
            data_dir: None,
            port: None,
            tls: None,
        }
    }
}

/// A running (or stopped) `nats-server` child process listening on `127.0.0.1`.
///
/// Dropping it kills the process (SIGKILL), reaps it, and removes the directory if it was
/// a temporary one.
///
/// Directory layout (`dir()`): `nats.conf` (generated), `nats.log` (stdout and stderr,
/// appended across restarts), `nats.owner` (the starter's process id), `store/` (the
/// JetStream `store_dir`; nats-server puts its data under `store/jetstream/`).
pub struct NatsServer {
    child: Option<Spawned>,
    port: u16,
    binary: PathBuf,
    version: String,
    server_name: String,
    jetstream: bool,
    sync_always: bool,
    tls: Option<ServerTls>,
    cluster: Option<ClusterMembership>,
    dir: PathBuf,
    store_dir: PathBuf,
    /// Removes the directory on drop when it is a temporary one; declared last so it drops
    /// after the process is gone.
    _temp: Option<TempDir>,
}

impl std::fmt::Debug for NatsServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsServer")
            .field("url", &self.url())
            .field("pid", &self.child.as_ref().map(|c| c.child.id()))
            .field("version", &self.version)
            .field("dir", &self.dir)
            .finish()
    }
}

impl NatsServer {
    /// Finds `nats-server` (see [`find_binary`]), checks it is at least
    /// [`NATS_MIN_VERSION`], writes its config and starts it, returning once it accepts
    /// clients: a TCP connection gets the server's `INFO` line, naming this server and (with
    /// JetStream) announcing JetStream. Blocks for the startup, typically well under a
    /// second, at most about 10 s.
    pub fn start(opts: NatsOptions) -> Result<NatsServer, LocalError> {
        let fixed_port = opts.port;
        let mut server = NatsServer::prepare(opts, 0, None)?;
        start_with_retry(NATS_NAME, fixed_port, |port| {
            server.port = port;
            server.write_config()?;
            server.spawn_and_wait()
        })?;
        Ok(server)
    }

    /// Everything but the process: binary, version, directory, a unique server name; `port`
    /// (0 when the caller sets it later, as [`start`](Self::start) does on each attempt).
    pub(crate) fn prepare(
        opts: NatsOptions,
        port: u16,
        cluster: Option<ClusterMembership>,
    ) -> Result<NatsServer, LocalError> {
        let (binary, version) = locate(NATS_NAME, NATS_MIN_VERSION, SERVERS_INSTALLER)?;

        let (temp, dir) = match &opts.data_dir {
            None => {
                let temp = temp_dir("parley-nats-")?;
                let dir = temp.path().to_owned();
                (Some(temp), dir)
            }
            Some(dir) => (None, prepare_dir(dir)?),
        };
        let store_dir = dir.join(STORE_DIR);
        Ok(NatsServer {
            child: None,
            port,
            binary,
            version,
            server_name: unique_name(),
            jetstream: opts.jetstream,
            sync_always: opts.sync_always,
            tls: opts.tls,
            cluster,
            dir,
            store_dir,
            _temp: temp,
        })
    }

    /// The client URL, `nats://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// The client port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The JetStream `store_dir` (`<dir>/store`); exists only once JetStream wrote to it.
    pub fn store_dir(&self) -> &Path {
        &self.store_dir
    }

    /// The directory holding config, log and store.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The server's log file (stdout and stderr).
    pub fn log_path(&self) -> PathBuf {
        self.dir.join(LOG_FILE)
    }

    /// The `server_name` it runs with, unique per server: what JetStream names in a stream's
    /// cluster leader and replicas.
    pub fn server_name(&self) -> &str {
        &self.server_name
    }

    /// The process id while the server runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|spawned| spawned.child.id())
    }

    /// The version `nats-server --version` reported, e.g. `2.15.1`.
    pub fn version(&self) -> &str {
        &self.version
    }

    /// Kills the process (SIGKILL, like a crash or power loss: no graceful shutdown) and waits
    /// for it. Idempotent. Keeps the directory, so [`restart`](Self::restart) finds the
    /// JetStream store.
    pub fn stop(&mut self) {
        if let Some(mut spawned) = self.child.take() {
            kill_and_reap(&mut spawned.child);
            tracing::debug!(url = %self.url(), "nats-server stopped");
        }
    }

    /// Starts the server again on the same port with the same config and store directory
    /// (stopping it first if it is running). Streams and consumers written with
    /// `sync_always` survive.
    pub fn restart(&mut self) -> Result<(), LocalError> {
        self.stop();
        self.spawn_and_wait()
    }

    /// An [`LocalError::Exited`] if the process has exited by itself since it was started.
    pub(crate) fn check_running(&mut self) -> Result<(), LocalError> {
        let log = self.log_path();
        if let Some(spawned) = &mut self.child
            && let Ok(Some(status)) = spawned.child.try_wait()
        {
            return Err(LocalError::Exited {
                name: NATS_NAME.to_owned(),
                status,
                log_tail: process::log_tail(&log, spawned.log_offset),
            });
        }
        Ok(())
    }

    /// The last lines of the log written by the current (or last) process.
    pub(crate) fn log_tail(&self) -> String {
        let offset = self.child.as_ref().map_or(0, |spawned| spawned.log_offset);
        process::log_tail(&self.log_path(), offset)
    }

    fn config_text(&self) -> String {
        let mut conf = String::new();
        // Strings are written as JSON strings: nats-server's config parser accepts them.
        let q = |s: &str| serde_json::Value::from(s).to_string();
        let _ = writeln!(
            conf,
            "# Generated by parley-localstack; rewritten on every start."
        );
        let _ = writeln!(conf, "server_name: {}", q(&self.server_name));
        let _ = writeln!(conf, "listen: \"127.0.0.1:{}\"", self.port);
        let _ = writeln!(conf, "max_payload: {NATS_MAX_PAYLOAD}");
        if self.jetstream {
            let _ = writeln!(conf, "jetstream {{");
            let _ = writeln!(
                conf,
                "  store_dir: {}",
                q(&self.store_dir.to_string_lossy())
            );
            if self.sync_always {
                let _ = writeln!(conf, "  sync_interval: always");
            }
            let _ = writeln!(conf, "}}");
        }
        if let Some(cluster) = &self.cluster {
            let routes: Vec<String> = cluster
                .peers
                .iter()
                .map(|port| q(&format!("nats-route://127.0.0.1:{port}")))
                .collect();
            let _ = writeln!(conf, "cluster {{");
            let _ = writeln!(conf, "  name: {}", q(&cluster.name));
            let _ = writeln!(conf, "  listen: \"127.0.0.1:{}\"", cluster.route_port);
            let _ = writeln!(conf, "  routes: [{}]", routes.join(", "));
            let _ = writeln!(conf, "}}");
        }
        if let Some(tls) = &self.tls {
            let path = |p: &Path| q(&p.to_string_lossy());
            let _ = writeln!(conf, "tls {{");
            let _ = writeln!(conf, "  cert_file: {}", path(&tls.cert_chain));
            let _ = writeln!(conf, "  key_file: {}", path(&tls.key));
            let _ = writeln!(conf, "  ca_file: {}", path(&tls.client_ca));
            let _ = writeln!(conf, "  verify: {}", tls.require_client_cert);
            let _ = writeln!(conf, "}}");
        }
        conf
    }

    pub(crate) fn write_config(&self) -> Result<(), LocalError> {
        let path = self.dir.join(CONFIG_FILE);
        fs::write(&path, self.config_text())
            .map_err(LocalError::io(format!("writing {}", path.display())))
    }

    pub(crate) fn spawn_and_wait(&mut self) -> Result<(), LocalError> {
        let config = self.dir.join(CONFIG_FILE);
        let owner = self.dir.join(OWNER_FILE);
        process::stop_leftovers(NATS_NAME, &config, &owner)?;
        process::record_owner(&owner)?;
        let log = self.log_path();
        let mut spawned = process::spawn(
            &self.binary,
            &[OsStr::new("-c"), config.as_os_str()],
            &self.dir,
            &log,
        )?;
        let (port, name, jetstream) = (self.port, self.server_name.as_str(), self.jetstream);
        process::wait_ready(NATS_NAME, &mut spawned, &log, |left| {
            probe(port, name, jetstream, left)
        })?;
        tracing::debug!(url = %self.url(), pid = spawned.child.id(), dir = %self.dir.display(), "nats-server ready");
        self.child = Some(spawned);
        Ok(())
    }
}

/// Ready when the server on `port` sends an INFO line naming `server_name` (not some other
/// process that grabbed the port) with JetStream enabled if wanted.
fn probe(port: u16, server_name: &str, jetstream: bool, left: Duration) -> bool {
    let Some(stream) = probe_connect(port, left) else {
        return false;
    };
    let mut line = String::new();
    if BufReader::new(stream).read_line(&mut line).is_err() {
        return false;
    }
    let Some(json) = line.strip_prefix("INFO ") else {
        return false;
    };
    let Ok(info) = serde_json::from_str::<serde_json::Value>(json.trim()) else {
        return false;
    };
    let name_ok = info.get("server_name").and_then(|v| v.as_str()) == Some(server_name);
    let js_ok = !jetstream || info.get("jetstream").and_then(|v| v.as_bool()) == Some(true);
    name_ok && js_ok
}

/// Whether JetStream's API answers through the server on `port`: `$JS.API.INFO` gets an
/// account info rather than an error or no reply. In a cluster only the metadata leader
/// answers it, so this is true once the meta group has a leader this server reaches.
pub(crate) fn jetstream_api_answers(port: u16, left: Duration) -> bool {
    let Some(stream) = probe_connect(port, left) else {
        return false;
    };
    let Ok(mut writer) = stream.try_clone() else {
        return false;
    };
    let mut reader = BufReader::new(stream);
    let mut line = String::new();
    if reader.read_line(&mut line).is_err() || !line.starts_with("INFO ") {
        return false;
    }
    // `no_responders`: a request nobody takes is answered at once by a 503 status message
    // instead of waiting out the read timeout.
    let request = "CONNECT {\"verbose\":false,\"pedantic\":false,\"headers\":true,\"no_responders\":true}\r\n\
                   SUB _INBOX.parley-probe 1\r\n\
                   PUB $JS.API.INFO _INBOX.parley-probe 0\r\n\r\n";
    if writer.write_all(request.as_bytes()).is_err() {
        return false;
    }
    loop {
        line.clear();
        if reader.read_line(&mut line).is_err() {
            return false;
        }
        let mut words = line.split_whitespace();
        match words.next() {
            Some("PING") => {
                if writer.write_all(b"PONG\r\n").is_err() {
                    return false;
                }
            }
            // MSG <subject> <sid> <bytes> / HMSG <subject> <sid> <header bytes> <bytes>
            Some(kind @ ("MSG" | "HMSG")) => {
                let numbers: Vec<usize> = words.filter_map(|w| w.parse().ok()).collect();
                let (headers, total) = match (kind, numbers.as_slice()) {
                    ("MSG", [.., total]) => (0, *total),
                    ("HMSG", [.., headers, total]) => (*headers, *total),
                    _ => return false,
                };
                let mut payload = vec![0; total + 2];
                if reader.read_exact(&mut payload).is_err() || headers > total {
                    return false;
                }
                let body = &payload[headers..total];
                return serde_json::from_slice::<serde_json::Value>(body)
                    .is_ok_and(|reply| reply.get("error").is_none());
            }
            _ => return false,
        }
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.stop();
    }
}
