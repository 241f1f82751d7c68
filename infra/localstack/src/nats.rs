//! A local `nats-server` with JetStream.

use std::ffi::OsStr;
use std::fmt::Write as _;
use std::fs;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tempfile::TempDir;

use crate::binary::{binary_version, find_binary, require_version};
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

const NAME: &str = "nats-server";
const CONFIG_FILE: &str = "nats.conf";
const LOG_FILE: &str = "nats.log";
const STORE_DIR: &str = "store";

static SERVER_SEQ: AtomicU64 = AtomicU64::new(0);

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
/// appended across restarts), `store/` (the JetStream `store_dir`; nats-server puts its
/// data under `store/jetstream/`).
pub struct NatsServer {
    child: Option<Spawned>,
    port: u16,
    binary: PathBuf,
    version: String,
    server_name: String,
    jetstream: bool,
    sync_always: bool,
    tls: Option<ServerTls>,
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
        let binary = find_binary(NAME)?;
        let version = binary_version(&binary)?;
        require_version(&binary, &version, NATS_MIN_VERSION)?;

        let (temp, dir) = match &opts.data_dir {
            None => {
                let temp = temp_dir("parley-nats-")?;
                let dir = temp.path().to_owned();
                (Some(temp), dir)
            }
            Some(dir) => (None, prepare_dir(dir)?),
        };
        let store_dir = dir.join(STORE_DIR);
        let server_name = format!(
            "parley-local-{}-{}",
            std::process::id(),
            SERVER_SEQ.fetch_add(1, Ordering::Relaxed)
        );
        let mut server = NatsServer {
            child: None,
            port: 0,
            binary,
            version,
            server_name,
            jetstream: opts.jetstream,
            sync_always: opts.sync_always,
            tls: opts.tls,
            dir,
            store_dir,
            _temp: temp,
        };
        start_with_retry(NAME, opts.port, |port| {
            server.port = port;
            server.write_config()?;
            server.spawn_and_wait()
        })?;
        Ok(server)
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

    fn write_config(&self) -> Result<(), LocalError> {
        let path = self.dir.join(CONFIG_FILE);
        fs::write(&path, self.config_text())
            .map_err(LocalError::io(format!("writing {}", path.display())))
    }

    fn spawn_and_wait(&mut self) -> Result<(), LocalError> {
        let config = self.dir.join(CONFIG_FILE);
        let log = self.log_path();
        let mut spawned = process::spawn(
            &self.binary,
            &[OsStr::new("-c"), config.as_os_str()],
            &self.dir,
            &log,
        )?;
        let (port, name, jetstream) = (self.port, self.server_name.as_str(), self.jetstream);
        process::wait_ready(NAME, &mut spawned, &log, |left| {
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

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.stop();
    }
}
