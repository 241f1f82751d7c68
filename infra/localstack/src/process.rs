//! Shared machinery: free ports, spawning with a log file, readiness polling, killing.

use std::collections::BTreeSet;
use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom};
use std::net::{Ipv4Addr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, OnceLock, PoisonError};
use std::thread;
use std::time::{Duration, Instant};

use crate::LocalError;

/// How long a server gets to answer its readiness probe after being spawned.
pub(crate) const READY_TIMEOUT: Duration = Duration::from_secs(10);

/// How many free ports a start tries when the chosen one turns out to be taken.
const START_ATTEMPTS: usize = 3;

/// Pause between readiness probes.
const POLL_INTERVAL: Duration = Duration::from_millis(10);

/// How much of a log goes into an error.
const LOG_TAIL_LINES: usize = 40;
const LOG_TAIL_BYTES: u64 = 16 * 1024;

/// The loopback address every server binds.
pub(crate) const LOOPBACK: Ipv4Addr = Ipv4Addr::LOCALHOST;

/// How many ports below the kernel's ephemeral range [`free_port`] chooses from.
const CHOSEN_PORTS: u16 = 12_000;

/// How many random ports [`free_port`] tries before it asks the kernel for one.
const CHOICE_ATTEMPTS: usize = 64;

/// Where the kernel's ephemeral range starts when `/proc` does not say (Linux's default).
const DEFAULT_EPHEMERAL_FLOOR: u16 = 32_768;

/// The ports [`free_port`] has handed out in this process, never handed out again.
static HANDED_OUT: Mutex<BTreeSet<u16>> = Mutex::new(BTreeSet::new());

/// A free loopback port for a server, which stays its own for the life of this process.
///
/// A server killed and started again on its port (a fault test) leaves the port free
/// meanwhile. Chosen by the kernel, the port was in the range it hands to every bind to
/// port 0 and every outgoing connection, and tests running beside this one took it while
/// its server was down (CI: "address already in use" on a restart). So the port is chosen
/// at random below that range, checked by binding it, and never handed out twice by this
/// process. Falls back to the kernel's choice when no port there is free.
pub fn free_port() -> Result<u16, LocalError> {
    let floor = ephemeral_floor();
    let lowest = floor.saturating_sub(CHOSEN_PORTS).max(1024);
    let mut handed_out = HANDED_OUT.lock().unwrap_or_else(PoisonError::into_inner);
    // No room below the range (a floor under 1024): straight to the kernel's choice.
    let attempts = if lowest < floor { CHOICE_ATTEMPTS } else { 0 };
    for _ in 0..attempts {
        let port = fastrand::u16(lowest..floor);
        if !handed_out.contains(&port) && TcpListener::bind((LOOPBACK, port)).is_ok() {
            handed_out.insert(port);
            return Ok(port);
        }
    }
    let listener = TcpListener::bind((LOOPBACK, 0))
        .map_err(LocalError::io("binding 127.0.0.1:0 to find a free port"))?;
    let port = listener
        .local_addr()
        .map_err(LocalError::io("reading the port of a 127.0.0.1:0 listener"))?
        .port();
    handed_out.insert(port);
    Ok(port)
}

/// The first port of the kernel's ephemeral range (`net.ipv4.ip_local_port_range`), read
/// once per process.
pub fn ephemeral_floor() -> u16 {
    static FLOOR: OnceLock<u16> = OnceLock::new();
    *FLOOR.get_or_init(|| {
        fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
            .ok()
            .and_then(|range| range.split_whitespace().next()?.parse().ok())
            .unwrap_or(DEFAULT_EPHEMERAL_FLOOR)
    })
}

/// Runs `attempt` on `fixed_port`, or on a fresh free port; with a free port, tries again on
/// another one (up to [`START_ATTEMPTS`] in all) when the server exited because the port was
/// already in use (the race in [`free_port`]).
pub(crate) fn start_with_retry<T>(
    name: &str,
    fixed_port: Option<u16>,
    mut attempt: impl FnMut(u16) -> Result<T, LocalError>,
) -> Result<T, LocalError> {
    let mut tries = 0;
    loop {
        let port = match fixed_port {
            Some(port) => port,
            None => free_port()?,
        };
        tries += 1;
        match attempt(port) {
            Err(err) if fixed_port.is_none() && tries < START_ATTEMPTS && port_in_use(&err) => {
                tracing::debug!(
                    name,
                    port,
                    "port taken before the server bound it; retrying"
                );
            }
            result => return result,
        }
    }
}

fn port_in_use(err: &LocalError) -> bool {
    match err {
        LocalError::Exited { log_tail, .. } => log_tail
            .to_ascii_lowercase()
            .contains("address already in use"),
        _ => false,
    }
}

/// A spawned server whose stdout and stderr go to a log file.
pub(crate) struct Spawned {
    pub(crate) child: Child,
    /// Length of the log file before this process started: its own output begins here.
    pub(crate) log_offset: u64,
}

/// Spawns `binary args` in `cwd`, appending stdout and stderr to `log_path`.
pub(crate) fn spawn(
    binary: &Path,
    args: &[&std::ffi::OsStr],
    cwd: &Path,
    log_path: &Path,
) -> Result<Spawned, LocalError> {
    let log = OpenOptions::new()
        .create(true)
        .append(true)
        .open(log_path)
        .map_err(LocalError::io(format!(
            "opening log {}",
            log_path.display()
        )))?;
    let log_offset = log
        .metadata()
        .map_err(LocalError::io(format!("reading {}", log_path.display())))?
        .len();
    let log_err = log.try_clone().map_err(LocalError::io(format!(
        "duplicating {}",
        log_path.display()
    )))?;
    let child = Command::new(binary)
        .args(args)
        .current_dir(cwd)
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log_err)
        .spawn()
        .map_err(|source| LocalError::Spawn {
            binary: binary.to_owned(),
            source,
        })?;
    Ok(Spawned { child, log_offset })
}

/// Polls `probe` until it returns true, the child exits, or [`READY_TIMEOUT`] passes. On
/// failure the child is killed and reaped. `probe` receives the time left.
pub(crate) fn wait_ready(
    name: &str,
    spawned: &mut Spawned,
    log_path: &Path,
    probe: impl FnMut(Duration) -> bool,
) -> Result<(), LocalError> {
    wait_ready_within(name, spawned, log_path, READY_TIMEOUT, probe)
}

/// [`wait_ready`] with its own deadline, for servers that take longer than most to start.
pub(crate) fn wait_ready_within(
    name: &str,
    spawned: &mut Spawned,
    log_path: &Path,
    timeout: Duration,
    mut probe: impl FnMut(Duration) -> bool,
) -> Result<(), LocalError> {
    let started = Instant::now();
    let deadline = started + timeout;
    loop {
        match spawned.child.try_wait() {
            Ok(Some(status)) => {
                return Err(LocalError::Exited {
                    name: name.to_owned(),
                    status,
                    log_tail: log_tail(log_path, spawned.log_offset),
                });
            }
            Ok(None) => {}
            Err(source) => {
                kill_and_reap(&mut spawned.child);
                return Err(LocalError::Io {
                    what: format!("checking whether {name} is still running"),
                    source,
                });
            }
        }
        let now = Instant::now();
        if now >= deadline {
            kill_and_reap(&mut spawned.child);
            return Err(LocalError::NotReady {
                name: name.to_owned(),
                after: now - started,
                log_tail: log_tail(log_path, spawned.log_offset),
            });
        }
        if probe(deadline - now) {
            return Ok(());
        }
        thread::sleep(POLL_INTERVAL);
    }
}

/// Opens a probe connection to `127.0.0.1:port` with timeouts bounded by `left`.
pub(crate) fn probe_connect(port: u16, left: Duration) -> Option<TcpStream> {
    let addr = SocketAddr::from((LOOPBACK, port));
    let connect = left.min(Duration::from_millis(250));
    let io = left.min(Duration::from_secs(1));
    if connect.is_zero() || io.is_zero() {
        return None;
    }
    let stream = TcpStream::connect_timeout(&addr, connect).ok()?;
    stream.set_read_timeout(Some(io)).ok()?;
    stream.set_write_timeout(Some(io)).ok()?;
    Some(stream)
}

/// How long a leftover server gets to exit after SIGTERM, then after SIGKILL.
const LEFTOVER_STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// Stops every process whose command line names `config` and whose starter is gone: a
/// server that an earlier run started on this directory and could not stop, because it was
/// killed (SIGKILL, the OOM killer) before it could. A server started again beside it would
/// share its files: two nats-servers on one JetStream store both write it. One whose starter
/// still runs (recorded in `owner_file` by [`record_owner`]) is another run's, and refused.
/// Linux only (it reads `/proc`); elsewhere it finds nothing.
pub(crate) fn stop_leftovers(
    name: &str,
    config: &Path,
    owner_file: &Path,
) -> Result<(), LocalError> {
    let owner = fs::read_to_string(owner_file)
        .ok()
        .and_then(|pid| pid.trim().parse::<u32>().ok());
    for pid in processes_naming(config) {
        // A child's parent stays its starter while the starter lives; an orphan is adopted.
        if let Some(owner) = owner.filter(|owner| parent(pid) == Some(*owner)) {
            return Err(LocalError::InUse {
                name: name.to_owned(),
                pid,
                owner,
                config: config.to_owned(),
            });
        }
        tracing::warn!(
            name,
            pid,
            config = %config.display(),
            "stopping a server an earlier run left running on this directory"
        );
        let stopped = ["-TERM", "-KILL"].into_iter().any(|signal| {
            // The process may exit between the scan and the signal: only its exit counts.
            let _ = Command::new("kill")
                .args([signal, &pid.to_string()])
                .stderr(Stdio::null())
                .status();
            let deadline = Instant::now() + LEFTOVER_STOP_TIMEOUT;
            while running(pid) && Instant::now() < deadline {
                thread::sleep(POLL_INTERVAL);
            }
            !running(pid)
        });
        if !stopped {
            return Err(LocalError::LeftoverRunning {
                name: name.to_owned(),
                pid,
                config: config.to_owned(),
            });
        }
    }
    Ok(())
}

/// Records this process as the starter of the servers on a directory, for
/// [`stop_leftovers`].
pub(crate) fn record_owner(owner_file: &Path) -> Result<(), LocalError> {
    fs::write(owner_file, std::process::id().to_string())
        .map_err(LocalError::io(format!("writing {}", owner_file.display())))
}

/// The processes with `path` as one of their arguments.
fn processes_naming(path: &Path) -> Vec<u32> {
    use std::os::unix::ffi::OsStrExt;
    let wanted = path.as_os_str().as_bytes();
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| *pid != std::process::id())
        .filter(|pid| {
            fs::read(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|cmdline| cmdline.split(|b| *b == 0).any(|arg| arg == wanted))
        })
        .collect()
}

/// Whether `pid` is a live process (a zombie has exited: it only waits for its parent).
fn running(pid: u32) -> bool {
    stat_fields(pid).is_some_and(|fields| fields.first().is_some_and(|s| *s != "Z" && *s != "X"))
}

/// The parent of `pid`.
fn parent(pid: u32) -> Option<u32> {
    stat_fields(pid)?.get(1)?.parse().ok()
}

/// The fields of `/proc/<pid>/stat` after the command name (state, parent, ...); the name is
/// in parentheses and may hold spaces and parentheses itself.
fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let (_, rest) = stat.rsplit_once(')')?;
    Some(rest.split_whitespace().map(str::to_owned).collect())
}

/// SIGKILLs the child (a no-op if it already exited) and waits for it, so no zombie stays.
pub(crate) fn kill_and_reap(child: &mut Child) {
    let pid = child.id();
    if let Err(err) = child.kill() {
        tracing::debug!(pid, %err, "kill failed (process probably gone)");
    }
    if let Err(err) = child.wait() {
        tracing::warn!(pid, %err, "waiting for a killed server failed");
    }
}

/// The last lines the process wrote to its log since `offset`.
pub fn log_tail(path: &Path, offset: u64) -> String {
    let read = || -> std::io::Result<String> {
        let mut file = File::open(path)?;
        let len = file.metadata()?.len();
        let start = offset.max(len.saturating_sub(LOG_TAIL_BYTES));
        file.seek(SeekFrom::Start(start))?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)?;
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    };
    match read() {
        Ok(text) => {
            let lines: Vec<&str> = text.lines().collect();
            let tail = &lines[lines.len().saturating_sub(LOG_TAIL_LINES)..];
            if tail.is_empty() {
                "(log is empty)".to_owned()
            } else {
                tail.join("\n")
            }
        }
        Err(err) => format!("(could not read {}: {err})", path.display()),
    }
}

/// Makes `dir` absolute (relative to the current directory) and creates it.
pub(crate) fn prepare_dir(dir: &Path) -> Result<PathBuf, LocalError> {
    let dir =
        std::path::absolute(dir).map_err(LocalError::io(format!("resolving {}", dir.display())))?;
    fs::create_dir_all(&dir).map_err(LocalError::io(format!("creating {}", dir.display())))?;
    Ok(dir)
}

/// Creates a fresh temporary directory, removed when the returned guard drops.
pub(crate) fn temp_dir(prefix: &str) -> Result<tempfile::TempDir, LocalError> {
    tempfile::Builder::new()
        .prefix(prefix)
        .tempdir()
        .map_err(LocalError::io(format!(
            "creating a temporary directory {prefix}* in {}",
            std::env::temp_dir().display()
        )))
}
