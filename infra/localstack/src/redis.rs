//! A local `redis-server` without persistence.

use std::ffi::OsStr;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use tempfile::TempDir;

use crate::binary::{SERVERS_INSTALLER, locate};
use crate::process::{
    self, Spawned, free_port, kill_and_reap, probe_connect, start_with_retry, temp_dir,
};
use crate::{LocalError, ServerTls};

/// The oldest redis-server Parley accepts.
pub const REDIS_MIN_VERSION: &str = "6.0.0";

const NAME: &str = "redis-server";
const LOG_FILE: &str = "redis.log";

/// How to start a [`RedisServer`].
#[derive(Debug, Clone, Default)]
pub struct RedisOptions {
    /// Port on 127.0.0.1. `None` (default): a free port chosen by the kernel.
    pub port: Option<u16>,
    /// Serve TLS on a second free port, which [`RedisServer::url`] then names (`rediss://`).
    /// The plaintext port stays open on loopback for the readiness probe. `None` (default):
    /// plaintext only.
    pub tls: Option<ServerTls>,
}

/// A running (or stopped) `redis-server` child process on `127.0.0.1`, with no persistence
/// (`--save "" --appendonly no`) and its own temporary working directory (`dir()`, holding
/// `redis.log`), removed on drop together with the killed process.
pub struct RedisServer {
    child: Option<Spawned>,
    port: u16,
    tls_port: Option<u16>,
    version: String,
    dir: PathBuf,
    /// Declared last so it drops after the process is gone.
    _temp: TempDir,
}

impl std::fmt::Debug for RedisServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisServer")
            .field("url", &self.url())
            .field("pid", &self.child.as_ref().map(|c| c.child.id()))
            .field("version", &self.version)
            .field("dir", &self.dir)
            .finish()
    }
}

impl RedisServer {
    /// Finds `redis-server` (see [`find_binary`]), checks it is at least
    /// [`REDIS_MIN_VERSION`] and starts it, returning once it answers `PING` with `+PONG`
    /// and `INFO server` reports this child's process id. Blocks for the startup, typically
    /// well under a second, at most about 10 s.
    pub fn start(opts: RedisOptions) -> Result<RedisServer, LocalError> {
        let (binary, version) = locate(NAME, REDIS_MIN_VERSION, SERVERS_INSTALLER)?;
        let temp = temp_dir("parley-redis-")?;
        let dir = temp.path().to_owned();
        let log = dir.join(LOG_FILE);

        let tls = opts
            .tls
            .map(|tls| free_port().map(|port| (port, tls)))
            .transpose()?;
        let tls_args: Vec<std::ffi::OsString> = match &tls {
            Some((port, tls)) => [
                "--tls-port".into(),
                port.to_string().into(),
                "--tls-cert-file".into(),
                tls.cert_chain.clone().into_os_string(),
                "--tls-key-file".into(),
                tls.key.clone().into_os_string(),
                "--tls-ca-cert-file".into(),
                tls.client_ca.clone().into_os_string(),
                "--tls-auth-clients".into(),
                (if tls.require_client_cert { "yes" } else { "no" }).into(),
            ]
            .into(),
            None => Vec::new(),
        };
        let (spawned, port) = start_with_retry(NAME, opts.port, |port| {
            let port_arg = port.to_string();
            let plain: [&OsStr; 14] = [
                OsStr::new("--port"),
                OsStr::new(&port_arg),
                OsStr::new("--bind"),
                OsStr::new("127.0.0.1"),
                OsStr::new("--save"),
                OsStr::new(""),
                OsStr::new("--appendonly"),
                OsStr::new("no"),
                OsStr::new("--dir"),
                dir.as_os_str(),
                OsStr::new("--protected-mode"),
                OsStr::new("yes"),
                OsStr::new("--daemonize"),
                OsStr::new("no"),
            ];
            let args: Vec<&OsStr> = plain
                .into_iter()
                .chain(tls_args.iter().map(|a| a.as_os_str()))
                .collect();
            let mut spawned = process::spawn(&binary, &args, &dir, &log)?;
            let pid = spawned.child.id();
            process::wait_ready(NAME, &mut spawned, &log, |left| probe(port, pid, left))?;
            Ok((spawned, port))
        })?;
        let server = RedisServer {
            child: Some(spawned),
            port,
            tls_port: tls.map(|(port, _)| port),
            version,
            dir,
            _temp: temp,
        };
        tracing::debug!(url = %server.url(), dir = %server.dir.display(), "redis-server ready");
        Ok(server)
    }

    /// The client URL: `redis://127.0.0.1:PORT`, or `rediss://127.0.0.1:TLS_PORT` when
    /// started with TLS.
    pub fn url(&self) -> String {
        match self.tls_port {
            Some(tls_port) => format!("rediss://127.0.0.1:{tls_port}"),
            None => format!("redis://127.0.0.1:{}", self.port),
        }
    }

    /// The port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The server's temporary working directory (removed on drop).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The server's log file (stdout and stderr).
    pub fn log_path(&self) -> PathBuf {
        self.dir.join(LOG_FILE)
    }

    /// The version `redis-server --version` reported, e.g. `7.0.15`.
    pub fn version(&self) -> &str {
        &self.version
    }

    /// Kills the process (SIGKILL) and waits for it. Idempotent. All data is lost (there
    /// is no persistence); the directory stays until drop.
    pub fn stop(&mut self) {
        if let Some(mut spawned) = self.child.take() {
            kill_and_reap(&mut spawned.child);
            tracing::debug!(url = %self.url(), "redis-server stopped");
        }
    }
}

/// Ready when `PING` gets `+PONG` and `INFO server` names `pid` as the process id (so it is
/// our child, not another process that took the port).
fn probe(port: u16, pid: u32, left: Duration) -> bool {
    let Some(mut stream) = probe_connect(port, left) else {
        return false;
    };
    if stream.write_all(b"PING\r\nINFO server\r\n").is_err() {
        return false;
    }
    let mut reader = BufReader::new(&mut stream);
    let mut line = String::new();
    if reader.read_line(&mut line).is_err() || !line.starts_with("+PONG") {
        return false;
    }
    line.clear();
    if reader.read_line(&mut line).is_err() {
        return false;
    }
    let Some(len) = line
        .strip_prefix('$')
        .and_then(|n| n.trim().parse::<usize>().ok())
    else {
        return false;
    };
    let mut body = vec![0; len];
    if reader.read_exact(&mut body).is_err() {
        return false;
    }
    let expected = format!("process_id:{pid}");
    String::from_utf8_lossy(&body)
        .lines()
        .any(|l| l.trim() == expected)
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
    }
}
