//! Starts the real servers (installed by `infra/install.sh`) and talks to them over raw TCP.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::time::{Duration, Instant};

use parley_localstack::{
    CASSANDRA_INSTALLER, LocalError, NatsCluster, NatsClusterOptions, NatsOptions, NatsServer,
    RedisOptions, RedisServer, SERVERS_INSTALLER, find_binary,
};

const TIMEOUT: Duration = Duration::from_secs(5);

fn connect(port: u16) -> std::io::Result<TcpStream> {
    let stream = TcpStream::connect(("127.0.0.1", port))?;
    stream.set_read_timeout(Some(TIMEOUT))?;
    stream.set_write_timeout(Some(TIMEOUT))?;
    Ok(stream)
}

fn port_from_url(url: &str, scheme: &str) -> u16 {
    url.strip_prefix(scheme)
        .and_then(|rest| rest.strip_prefix("127.0.0.1:"))
        .and_then(|port| port.parse().ok())
        .unwrap_or_else(|| panic!("unexpected url {url}"))
}

fn nats_info(port: u16) -> serde_json::Value {
    let mut line = String::new();
    BufReader::new(connect(port).unwrap())
        .read_line(&mut line)
        .unwrap();
    let json = line.strip_prefix("INFO ").expect("INFO line");
    serde_json::from_str(json.trim()).unwrap()
}

/// A JetStream API request over the raw NATS protocol; returns the JSON reply.
fn js_request(port: u16, subject: &str, body: &str) -> serde_json::Value {
    try_js_request(port, subject, body)
        .unwrap_or_else(|e| panic!("no reply to {subject} on port {port}: {e}"))
}

/// [`js_request`] that reports a missing reply (no responders, a timeout, a closed port)
/// instead of failing, for requests that may need a retry while a cluster elects leaders.
fn try_js_request(port: u16, subject: &str, body: &str) -> Result<serde_json::Value, String> {
    let mut stream = connect(port).map_err(|e| e.to_string())?;
    let mut reader = BufReader::new(stream.try_clone().unwrap());
    let mut line = String::new();
    reader.read_line(&mut line).map_err(|e| e.to_string())?;
    assert!(line.starts_with("INFO "), "{line}");
    write!(
        stream,
        "CONNECT {{\"verbose\":false,\"pedantic\":false,\"headers\":true,\"no_responders\":true}}\r\nSUB reply.1 1\r\nPUB {subject} reply.1 {}\r\n{body}\r\n",
        body.len()
    )
    .map_err(|e| e.to_string())?;
    loop {
        line.clear();
        reader.read_line(&mut line).map_err(|e| e.to_string())?;
        if line.starts_with("PING") {
            stream.write_all(b"PONG\r\n").unwrap();
        } else if let Some(rest) = line.strip_prefix("MSG ") {
            let len: usize = rest.split_whitespace().last().unwrap().parse().unwrap();
            let mut payload = vec![0; len + 2];
            reader.read_exact(&mut payload).unwrap();
            return Ok(serde_json::from_slice(&payload[..len]).unwrap());
        } else if line.starts_with("HMSG ") {
            return Err(format!("status reply: {}", line.trim_end()));
        } else {
            assert!(!line.starts_with("-ERR"), "{line}");
        }
    }
}

/// Retries `request` until it yields a reply without an `error`, for at most 30 s.
fn until_answered(
    mut request: impl FnMut() -> Result<serde_json::Value, String>,
) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let last = match request() {
            Ok(reply) if reply.get("error").is_none() => return reply,
            Ok(reply) => reply.to_string(),
            Err(e) => e,
        };
        assert!(
            Instant::now() < deadline,
            "still failing after 30 s: {last}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn redis_ping(port: u16) -> String {
    let mut stream = connect(port).unwrap();
    stream.write_all(b"PING\r\n").unwrap();
    let mut line = String::new();
    BufReader::new(stream).read_line(&mut line).unwrap();
    line
}

fn assert_closed(port: u16) {
    assert!(
        TcpStream::connect(("127.0.0.1", port)).is_err(),
        "port {port} still accepts connections"
    );
}

#[tokio::test]
async fn nats_starts_with_jetstream_and_cleans_up_on_drop() {
    let nats = NatsServer::start(NatsOptions::default()).unwrap();
    let port = nats.port();
    assert_eq!(nats.url(), format!("nats://127.0.0.1:{port}"));
    assert_eq!(port_from_url(&nats.url(), "nats://"), port);
    assert!(nats.version().starts_with("2."), "{}", nats.version());

    let info = nats_info(port);
    assert_eq!(info["jetstream"], true);
    assert_eq!(info["max_payload"], 8 * 1024 * 1024);
    assert_eq!(info["version"], nats.version());

    let conf = std::fs::read_to_string(nats.dir().join("nats.conf")).unwrap();
    assert!(conf.contains("sync_interval: always"), "{conf}");
    assert!(!conf.contains("http"), "{conf}");

    let dir = nats.dir().to_owned();
    let store = nats.store_dir().to_owned();
    assert!(store.starts_with(&dir));
    assert!(dir.exists());
    drop(nats);
    assert_closed(port);
    assert!(!dir.exists(), "{} left behind", dir.display());
}

#[tokio::test]
async fn nats_without_jetstream() {
    let nats = NatsServer::start(NatsOptions {
        jetstream: false,
        ..NatsOptions::default()
    })
    .unwrap();
    let info = nats_info(nats.port());
    assert_ne!(info["jetstream"], true);
}

#[tokio::test]
async fn nats_restart_keeps_port_store_and_streams() {
    let mut nats = NatsServer::start(NatsOptions::default()).unwrap();
    let port = nats.port();
    let store = nats.store_dir().to_owned();

    let created = js_request(
        port,
        "$JS.API.STREAM.CREATE.EVENTS",
        r#"{"name":"EVENTS","subjects":["ev.>"],"storage":"file","num_replicas":1}"#,
    );
    assert_eq!(created["config"]["name"], "EVENTS", "{created}");

    nats.stop();
    nats.stop(); // idempotent
    assert_closed(port);
    assert!(store.exists(), "stop must keep the store");

    nats.restart().unwrap();
    assert_eq!(nats.port(), port);
    assert_eq!(nats.store_dir(), store);
    let info = js_request(port, "$JS.API.STREAM.INFO.EVENTS", "");
    assert_eq!(info["config"]["name"], "EVENTS", "{info}");

    // Restarting a running server works too.
    nats.restart().unwrap();
    assert_eq!(nats_info(port)["jetstream"], true);
}

/// A nats-server keeping its config, log and store in `data`.
fn start_on(data: &Path) -> Result<NatsServer, LocalError> {
    NatsServer::start(NatsOptions {
        data_dir: Some(data.to_owned()),
        ..NatsOptions::default()
    })
}

#[tokio::test]
async fn nats_persistent_data_dir_is_kept() {
    let parent = tempfile::tempdir().unwrap();
    let data = parent.path().join("nats-data");
    let nats = start_on(&data).unwrap();
    assert_eq!(nats.dir(), data);
    js_request(
        nats.port(),
        "$JS.API.STREAM.CREATE.KEEP",
        r#"{"name":"KEEP","subjects":["keep.>"],"storage":"file"}"#,
    );
    drop(nats);
    assert!(data.join("nats.log").exists());

    // A new server on the same directory (and a new port) finds the stream.
    let nats = start_on(&data).unwrap();
    let info = js_request(nats.port(), "$JS.API.STREAM.INFO.KEEP", "");
    assert_eq!(info["config"]["name"], "KEEP", "{info}");
}

/// SIGKILLs a process no test handle owns when the test ends, whichever way it ends.
struct KillOnDrop(u32);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = std::process::Command::new("kill")
            .args(["-KILL", &self.0.to_string()])
            .stderr(std::process::Stdio::null())
            .status();
    }
}

/// Whether `pid` is a live process, not a zombie.
fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        !matches!(
            stat.rsplit_once(')')
                .map(|(_, rest)| rest.trim_start().as_bytes()[0]),
            Some(b'Z' | b'X')
        )
    })
}

#[tokio::test]
async fn a_server_left_on_the_directory_by_a_killed_starter_is_stopped_first() {
    let parent = tempfile::tempdir().unwrap();
    let data = parent.path().join("nats-data");
    let first = start_on(&data).unwrap();
    let config = data.join("nats.conf");
    // The same server again, started by a shell that exits at once: orphaned, as a server
    // is when `parley up` is killed with SIGKILL. (The first one is stopped to free the
    // store; the orphan takes its port from the config.)
    let port = first.port();
    let binary = find_binary("nats-server", SERVERS_INSTALLER).unwrap();
    drop(first);
    let shell = std::process::Command::new("sh")
        .arg("-c")
        .arg(r#""$0" -c "$1" >/dev/null 2>&1 & echo $!"#)
        .arg(&binary)
        .arg(&config)
        .output()
        .unwrap();
    let orphan: u32 = String::from_utf8(shell.stdout)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let _reaped_if_the_test_fails = KillOnDrop(orphan);
    let deadline = Instant::now() + TIMEOUT;
    while connect(port).is_err() {
        assert!(
            Instant::now() < deadline,
            "the orphaned server never listened"
        );
        std::thread::sleep(Duration::from_millis(20));
    }

    let second = start_on(&data).unwrap();
    assert!(
        !alive(orphan),
        "the orphaned server {orphan} still runs beside the new one"
    );
    assert_eq!(nats_info(second.port())["jetstream"], true);
}

#[tokio::test]
async fn a_second_server_on_a_directory_whose_starter_runs_is_refused() {
    let parent = tempfile::tempdir().unwrap();
    let data = parent.path().join("nats-data");
    let first = start_on(&data).unwrap();
    let err = start_on(&data).unwrap_err();
    match &err {
        LocalError::InUse { pid, owner, .. } => {
            assert_eq!(Some(*pid), first.pid(), "{err}");
            assert_eq!(*owner, std::process::id(), "{err}");
        }
        other => panic!("expected InUse, got {other}"),
    }
    assert!(err.to_string().contains("another `parley up`"), "{err}");
    assert_eq!(
        nats_info(first.port())["jetstream"],
        true,
        "the first server still serves"
    );
}

#[tokio::test]
async fn nats_on_a_taken_port_fails_with_the_log() {
    let first = NatsServer::start(NatsOptions::default()).unwrap();
    let err = NatsServer::start(NatsOptions {
        port: Some(first.port()),
        ..NatsOptions::default()
    })
    .unwrap_err();
    match &err {
        LocalError::Exited { log_tail, .. } => {
            assert!(log_tail.contains("address already in use"), "{err}")
        }
        other => panic!("expected Exited, got {other}"),
    }
    // The first server is unharmed.
    assert_eq!(nats_info(first.port())["jetstream"], true);
}

#[test]
fn free_ports_lie_below_the_ephemeral_range_and_are_never_handed_out_twice() {
    let floor = parley_localstack::ephemeral_floor();
    let ports: Vec<u16> = (0..200)
        .map(|_| parley_localstack::free_port().unwrap())
        .collect();
    for port in &ports {
        assert!(
            *port < floor,
            "{port} is in the ephemeral range from {floor}"
        );
    }
    let distinct: std::collections::HashSet<_> = ports.iter().collect();
    assert_eq!(distinct.len(), ports.len(), "{ports:?}");
}

#[tokio::test]
async fn nats_on_a_chosen_port() {
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let nats = NatsServer::start(NatsOptions {
        port: Some(port),
        ..NatsOptions::default()
    })
    .unwrap();
    assert_eq!(nats.port(), port);
    assert_eq!(nats_info(port)["port"], port);
}

#[tokio::test]
async fn nats_cluster_keeps_an_r3_stream_writable_with_a_node_down() {
    let mut cluster = NatsCluster::start(NatsClusterOptions::default()).unwrap();
    let ports: Vec<u16> = cluster.nodes().iter().map(|n| n.port()).collect();
    assert_eq!(ports.len(), 3);
    assert_eq!(
        cluster.url_list(),
        ports
            .iter()
            .map(|p| format!("nats://127.0.0.1:{p}"))
            .collect::<Vec<_>>()
            .join(",")
    );
    for node in cluster.nodes() {
        let info = nats_info(node.port());
        assert_eq!(info["cluster"], cluster.name(), "{info}");
        assert_eq!(info["server_name"], node.server_name(), "{info}");
        let conf = std::fs::read_to_string(node.dir().join("nats.conf")).unwrap();
        assert!(conf.contains("sync_interval: always"), "{conf}");
    }
    let dirs: Vec<_> = cluster.nodes().iter().map(|n| n.dir().to_owned()).collect();

    // `start` returned with a metadata leader and every node in the meta group: an R3
    // stream is placed at once.
    let created = js_request(
        ports[0],
        "$JS.API.STREAM.CREATE.R3",
        r#"{"name":"R3","subjects":["r3.>"],"storage":"file","num_replicas":3}"#,
    );
    assert_eq!(created["config"]["num_replicas"], 3, "{created}");
    let info = until_answered(|| try_js_request(ports[1], "$JS.API.STREAM.INFO.R3", ""));
    let leader = info["cluster"]["leader"]
        .as_str()
        .expect("the stream has a leader");
    let killed = cluster
        .index_of(leader)
        .expect("the leader is one of the nodes");
    let survivor = ports[(killed + 1) % 3];
    let ack = until_answered(|| try_js_request(survivor, "r3.before", "before"));
    assert_eq!(ack["seq"], 1, "{ack}");

    cluster.kill(killed);
    assert_closed(ports[killed]);
    // The two others elect a new stream leader and keep accepting writes.
    let ack = until_answered(|| try_js_request(survivor, "r3.during", "during"));
    assert_eq!(ack["seq"], 2, "{ack}");
    let info = until_answered(|| try_js_request(survivor, "$JS.API.STREAM.INFO.R3", ""));
    assert_ne!(info["cluster"]["leader"], leader, "{info}");

    cluster.restart(killed).unwrap();
    assert_eq!(cluster.nodes()[killed].port(), ports[killed]);
    let ack = until_answered(|| try_js_request(ports[killed], "r3.after", "after"));
    assert_eq!(ack["seq"], 3, "{ack}");
    let info = until_answered(|| try_js_request(ports[killed], "$JS.API.STREAM.INFO.R3", ""));
    assert_eq!(info["state"]["messages"], 3, "{info}");

    drop(cluster);
    for (port, dir) in ports.iter().zip(&dirs) {
        assert_closed(*port);
        assert!(!dir.exists(), "{} left behind", dir.display());
    }
}

#[tokio::test]
async fn redis_answers_ping_and_cleans_up_on_drop() {
    let redis = RedisServer::start(RedisOptions::default()).unwrap();
    let port = redis.port();
    assert_eq!(redis.url(), format!("redis://127.0.0.1:{port}"));
    assert_eq!(port_from_url(&redis.url(), "redis://"), port);
    assert_eq!(redis_ping(port).trim_end(), "+PONG");

    let dir = redis.dir().to_owned();
    assert!(dir.exists());
    drop(redis);
    assert_closed(port);
    assert!(!dir.exists(), "{} left behind", dir.display());
}

#[tokio::test]
async fn redis_stop_is_idempotent() {
    let mut redis = RedisServer::start(RedisOptions::default()).unwrap();
    let port = redis.port();
    redis.stop();
    redis.stop();
    assert_closed(port);
}

#[tokio::test]
async fn both_servers_side_by_side() {
    let nats = NatsServer::start(NatsOptions::default()).unwrap();
    let redis = RedisServer::start(RedisOptions::default()).unwrap();
    assert_ne!(nats.port(), redis.port());
    assert_eq!(nats_info(nats.port())["jetstream"], true);
    assert_eq!(redis_ping(redis.port()).trim_end(), "+PONG");
}

#[test]
fn missing_binary_points_to_install_script() {
    let err = find_binary("definitely-not-a-binary", SERVERS_INSTALLER).unwrap_err();
    assert!(
        matches!(&err, LocalError::BinaryNotFound { name, searched, .. }
            if name == "definitely-not-a-binary" && !searched.is_empty()),
        "{err:?}"
    );
    assert!(err.to_string().contains("run `infra/install.sh`"), "{err}");
    // Cassandra's launcher comes from its own script, which the message must name.
    let err = find_binary("definitely-not-a-binary", CASSANDRA_INSTALLER).unwrap_err();
    assert!(
        err.to_string().contains("run `infra/cassandra.sh`"),
        "{err}"
    );
}

#[test]
fn installed_binaries_are_found() {
    for name in ["nats-server", "redis-server"] {
        let path = find_binary(name, SERVERS_INSTALLER).unwrap();
        assert!(Path::new(&path).is_file(), "{}", path.display());
    }
}
