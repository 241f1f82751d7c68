//! `--spawn`: a whole platform on this machine, one process per role, so each process's
//! CPU and memory can be read on its own and the first to saturate can be named.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use futures::{SinkExt, StreamExt};
use parley_events::protocol::{ClientFrame, ServerFrame};
use parley_events::{ClientMsgId, UserId};
use parley_localstack::{
    CassandraNode, NatsCluster, NatsClusterOptions, NatsOptions, NatsServer, RedisOptions,
    RedisServer, free_port, log_tail,
};
use parley_projections::{CqlOptions, CqlStore};
use parley_services::auth;
use parley_services::config::Secret;
use tokio_tungstenite::tungstenite::Message;

use crate::LoadtestError;
use crate::scenario::{Durability, FaultRole, StoreChoice};

/// How long the spawned roles get to become ready.
const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a removed role gets to drain and exit after SIGTERM before it is killed: the
/// gateway's default drain period and then some.
const REMOVE_TIMEOUT: Duration = Duration::from_secs(20);
/// The embedded SQLite store's file name, in a directory of its own.
const STORE_FILE: &str = "conversations.db";

#[derive(Debug, Clone)]
pub struct SpawnOptions {
    /// The `parley` binary; found next to this program when not given.
    pub parley: Option<PathBuf>,
    pub gateways: usize,
    pub durability: Durability,
    /// NATS nodes: one server, or a cluster with the log and intake replicated on each.
    pub nats_nodes: usize,
    /// Where each role's log goes.
    pub log_dir: PathBuf,
    /// Handler processes: two when one of them is to be killed, so service continues.
    pub handlers: usize,
    /// Projector processes, sharing one durable consumer.
    pub projectors: usize,
    pub store: StoreChoice,
    /// The gateways' `presence_ttl_secs` when not the default: shorter, so heartbeats
    /// rebuild presence within a short run after Redis lost it.
    pub presence_ttl_secs: Option<u32>,
}

struct Role {
    name: String,
    child: Child,
    log: PathBuf,
    /// The `parley` subcommand.
    command: &'static str,
    /// Settings of this process alone (its listeners).
    env: Vec<(String, String)>,
    /// Stopped for good by a scale-down: no longer watched, restarted or measured.
    removed: bool,
}

/// The platform `--spawn` started. Dropping it kills every process (also on a panic or an
/// early return).
pub struct SpawnedPlatform {
    pub gateway_urls: Vec<String>,
    pub secret: Secret,
    /// For the JetStream baseline: the server's URL, or the first node's of a cluster.
    pub nats_url: String,
    pub nats_version: String,
    pub durability: Durability,
    roles: Vec<Role>,
    nats: Nats,
    redis: RedisServer,
    /// What every role is started with: the binary and the shared settings.
    parley: PathBuf,
    env: Vec<(String, String)>,
    store_dir: tempfile::TempDir,
    /// The CQL store's node, when the platform has one; dropped (and stopped) after the roles.
    cassandra: Option<CassandraNode>,
}

/// The NATS `--spawn` started.
enum Nats {
    Server(Box<NatsServer>),
    Cluster(NatsCluster),
}

impl Nats {
    fn start(nodes: usize, durability: Durability) -> Result<Nats, LoadtestError> {
        let sync_always = durability == Durability::Always;
        Ok(if nodes == 1 {
            Nats::Server(Box::new(NatsServer::start(NatsOptions {
                jetstream: true,
                sync_always,
                ..NatsOptions::default()
            })?))
        } else {
            Nats::Cluster(NatsCluster::start(NatsClusterOptions {
                nodes,
                sync_always,
            })?)
        })
    }

    /// The one nats-server of a platform without a cluster.
    fn single(&mut self) -> Result<&mut NatsServer, LoadtestError> {
        match self {
            Nats::Server(server) => Ok(server),
            _ => Err(LoadtestError::Fault(
                "NATS is a cluster here: name a node (nats-<i>)".to_owned(),
            )),
        }
    }

    /// The cluster, if it has node `i`.
    fn cluster(&mut self, i: usize) -> Result<&mut NatsCluster, LoadtestError> {
        match self {
            Nats::Cluster(cluster) if i < cluster.nodes().len() => Ok(cluster),
            _ => Err(LoadtestError::Fault(format!(
                "no nats-{i} in this platform (--nats-cluster starts a cluster)"
            ))),
        }
    }

    fn servers(&self) -> &[NatsServer] {
        match self {
            Nats::Server(server) => std::slice::from_ref(server),
            Nats::Cluster(cluster) => cluster.nodes(),
        }
    }
}

impl Drop for SpawnedPlatform {
    fn drop(&mut self) {
        for role in &mut self.roles {
            let _ = role.child.kill();
            let _ = role.child.wait();
        }
        // The NATS servers die with `nats`, after the roles.
        self.redis.stop();
    }
}

/// The `parley` binary next to `exe` (the release or debug directory of the target dir),
/// or in its parent (test binaries live in `deps/`).
pub fn locate_parley(exe: &Path) -> Result<PathBuf, LoadtestError> {
    let dir = exe.parent().unwrap_or(Path::new("."));
    let candidates = [dir.join("parley"), dir.join("../parley")];
    candidates
        .iter()
        .find(|p| p.is_file())
        .map(|p| p.canonicalize().unwrap_or_else(|_| p.clone()))
        .ok_or_else(|| LoadtestError::ParleyNotFound {
            searched: candidates.to_vec(),
        })
}

impl SpawnedPlatform {
    pub async fn start(options: &SpawnOptions) -> Result<SpawnedPlatform, LoadtestError> {
        let parley = match &options.parley {
            Some(path) => path.clone(),
            None => {
                locate_parley(&std::env::current_exe().map_err(LoadtestError::io("current exe"))?)?
            }
        };
        std::fs::create_dir_all(&options.log_dir).map_err(LoadtestError::io(format!(
            "creating {}",
            options.log_dir.display()
        )))?;
        let nats = Nats::start(options.nats_nodes, options.durability)?;
        let servers = nats.servers();
        let nats_urls: Vec<String> = servers.iter().map(NatsServer::url).collect();
        let replicas = servers.len().to_string();
        let redis = RedisServer::start(RedisOptions::default())?;
        let store = tempfile::tempdir().map_err(LoadtestError::io("store directory"))?;
        let cassandra = match options.store {
            StoreChoice::Sqlite => None,
            StoreChoice::Cql => Some(start_cql_store().await?),
        };
        let secret = Secret::new(format!(
            "{}{}",
            uuid::Uuid::new_v4().simple(),
            uuid::Uuid::new_v4().simple()
        ));
        let mut env = vec![
            ("PARLEY_NATS__URL".to_owned(), nats_urls.join(",")),
            ("PARLEY_LOG__REPLICAS".to_owned(), replicas.clone()),
            ("PARLEY_INTAKE__REPLICAS".to_owned(), replicas),
            ("PARLEY_REDIS__URL".to_owned(), redis.url()),
            ("PARLEY_AUTH__SECRET".to_owned(), secret.expose().to_owned()),
            (
                "PARLEY_PROJECTOR__STORE__PATH".to_owned(),
                store.path().join(STORE_FILE).display().to_string(),
            ),
        ];
        if let Some(node) = &cassandra {
            env.extend(cql_settings(node));
        }
        if let Some(ttl) = options.presence_ttl_secs {
            env.push((
                "PARLEY_GATEWAY__PRESENCE_TTL_SECS".to_owned(),
                ttl.to_string(),
            ));
        }
        let mut platform = SpawnedPlatform {
            gateway_urls: Vec::new(),
            secret,
            nats_url: nats_urls[0].clone(),
            nats_version: servers[0].version().to_owned(),
            durability: options.durability,
            roles: Vec::new(),
            nats,
            redis,
            parley,
            env,
            store_dir: store,
            cassandra,
        };
        // The projector creates the store the gateways read; the handler the streams.
        let mut plan = Vec::new();
        for i in 0..options.projectors.max(1) {
            plan.push((numbered("projector", i), "projector", None));
        }
        for i in 0..options.handlers.max(1) {
            plan.push((numbered("handler", i), "handler", None));
        }
        for i in 0..options.gateways {
            plan.push((format!("gateway-{i}"), "gateway", Some(free_port()?)));
        }
        for (name, command, gateway_port) in plan {
            let mut env = vec![(
                "PARLEY_ADMIN__LISTEN".to_owned(),
                format!("127.0.0.1:{}", free_port()?),
            )];
            if let Some(port) = gateway_port {
                env.push((
                    "PARLEY_GATEWAY__LISTEN".to_owned(),
                    format!("127.0.0.1:{port}"),
                ));
                platform
                    .gateway_urls
                    .push(format!("ws://127.0.0.1:{port}/ws"));
            }
            let log = options.log_dir.join(format!("{name}.log"));
            let child = platform.spawn_role(command, &env, &log, false)?;
            platform.roles.push(Role {
                name,
                child,
                log,
                command,
                env,
                removed: false,
            });
        }
        platform.wait_until_ready().await?;
        Ok(platform)
    }

    /// Start `parley <command>` with the shared settings and `env`, logging to `log`
    /// (appended to when the role is started again).
    fn spawn_role(
        &self,
        command: &str,
        env: &[(String, String)],
        log: &Path,
        append: bool,
    ) -> Result<Child, LoadtestError> {
        let file = File::options()
            .create(true)
            .write(true)
            .append(append)
            .truncate(!append)
            .open(log)
            .map_err(LoadtestError::io(format!("opening {}", log.display())))?;
        self.command(command, env)
            .stdout(file.try_clone().map_err(LoadtestError::io("log file"))?)
            .stderr(file)
            .spawn()
            .map_err(|source| LoadtestError::Spawn {
                binary: self.parley.clone(),
                source,
            })
    }

    /// `parley <command>` with the shared settings and `env`, standard input closed.
    fn command(&self, command: &str, env: &[(String, String)]) -> Command {
        let mut parley = Command::new(&self.parley);
        parley
            .arg(command)
            .env_remove("PARLEY_CONFIG")
            .envs(
                self.env
                    .iter()
                    .chain(env)
                    .map(|(k, v)| (k.as_str(), v.as_str())),
            )
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()),
            )
            // An error a role exits with is its log's last lines: a backtrace captured
            // because RUST_BACKTRACE is set for panics would push the cause out of the tail.
            .env("RUST_LIB_BACKTRACE", "0")
            .stdin(Stdio::null());
        parley
    }

    /// `parley <command>` (a tool: `replay`, `log`) with the platform's settings, to be
    /// given its arguments and run by the caller.
    pub fn tool(&self, command: &str) -> tokio::process::Command {
        tokio::process::Command::from(self.command(command, &[]))
    }

    /// The embedded SQLite store's file (the configured one, whatever `parley replay
    /// switch` later moved the roles to).
    pub fn sqlite_store(&self) -> PathBuf {
        self.store_dir.path().join(STORE_FILE)
    }

    /// Kill `role`'s process with SIGKILL, as a crash would, and reap it. Redis loses its
    /// data (it has no persistence); nats-server keeps its store.
    pub fn kill(&mut self, role: FaultRole) -> Result<(), LoadtestError> {
        match role {
            FaultRole::Nats => self.nats.single()?.stop(),
            FaultRole::NatsNode(i) => self.nats.cluster(i)?.kill(i),
            FaultRole::Redis => self.redis.stop(),
            _ => {
                let process = self.role_mut(role)?;
                let _ = process.child.kill();
                let _ = process.child.wait();
            }
        }
        Ok(())
    }

    /// Stop `role` for good with SIGTERM, as a scale-down does, and wait for it to drain
    /// and exit (SIGKILL after [`REMOVE_TIMEOUT`]).
    pub fn remove(&mut self, role: FaultRole) -> Result<(), LoadtestError> {
        let process = self.role_mut(role)?;
        process.removed = true;
        let pid = process.child.id().to_string();
        let signalled = Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .map_err(LoadtestError::io("running kill -TERM"))?;
        if !signalled.success() {
            return Err(LoadtestError::Fault(format!(
                "kill -TERM {pid} ({role}) failed: {signalled}"
            )));
        }
        let deadline = Instant::now() + REMOVE_TIMEOUT;
        while process
            .child
            .try_wait()
            .map_err(LoadtestError::io("waiting for a removed role"))?
            .is_none()
        {
            if Instant::now() > deadline {
                let _ = process.child.kill();
                let _ = process.child.wait();
                return Err(LoadtestError::Fault(format!(
                    "{role} did not exit within {} s of SIGTERM; killed",
                    REMOVE_TIMEOUT.as_secs()
                )));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }

    /// Start `role` again on the same ports with the same configuration and data; a role's
    /// log continues in the same file.
    pub fn restart(&mut self, role: FaultRole) -> Result<(), LoadtestError> {
        match role {
            FaultRole::Nats => self.nats.single()?.restart()?,
            FaultRole::NatsNode(i) => self.nats.cluster(i)?.restart(i)?,
            FaultRole::Redis => {
                self.redis = RedisServer::start(RedisOptions {
                    port: Some(self.redis.port()),
                    ..RedisOptions::default()
                })?;
            }
            _ => {
                let index = self.role_index(role)?;
                let Role {
                    command, env, log, ..
                } = &self.roles[index];
                let child = self.spawn_role(command, env, log, true)?;
                self.roles[index].child = child;
            }
        }
        Ok(())
    }

    pub fn redis_url(&self) -> String {
        self.redis.url()
    }

    /// Every role process with the address of its admin endpoints.
    pub fn admin_addresses(&self) -> Vec<(String, String)> {
        self.roles
            .iter()
            .filter_map(|role| {
                let (_, address) = role
                    .env
                    .iter()
                    .find(|(key, _)| key == "PARLEY_ADMIN__LISTEN")?;
                Some((role.name.clone(), address.clone()))
            })
            .collect()
    }

    fn role_index(&self, role: FaultRole) -> Result<usize, LoadtestError> {
        let name = role.to_string();
        self.roles
            .iter()
            .position(|r| r.name == name)
            .ok_or_else(|| LoadtestError::Fault(format!("no process {name} in this platform")))
    }

    fn role_mut(&mut self, role: FaultRole) -> Result<&mut Role, LoadtestError> {
        let index = self.role_index(role)?;
        Ok(&mut self.roles[index])
    }

    /// `(name, pid)` of every process of the platform; the nodes of a NATS cluster are
    /// `nats-server-0`, `nats-server-1`, ..., and the CQL store's JVM is `cassandra`.
    pub fn processes(&self) -> Vec<(String, u32)> {
        let mut processes: Vec<(String, u32)> = self
            .roles
            .iter()
            .filter(|r| !r.removed)
            .map(|r| (r.name.clone(), r.child.id()))
            .collect();
        let servers = self.nats.servers();
        for (i, server) in servers.iter().enumerate() {
            let name = match servers.len() {
                1 => "nats-server".to_owned(),
                _ => format!("nats-server-{i}"),
            };
            processes.extend(server.pid().map(|pid| (name, pid)));
        }
        processes.extend(crate::resources::children_named(&["redis-server"]));
        processes.extend(
            self.cassandra
                .as_ref()
                .and_then(CassandraNode::pid)
                .map(|pid| ("cassandra".to_owned(), pid)),
        );
        processes
    }

    /// "nats-server 2.15.1", or "3-node nats cluster (nats-server 2.15.1)".
    pub fn nats_text(&self) -> String {
        match self.nats.servers().len() {
            1 => format!("nats-server {}", self.nats_version),
            n => format!("{n}-node nats cluster (nats-server {})", self.nats_version),
        }
    }

    /// The durability the platform runs with, replicas included.
    pub fn durability_text(&self) -> String {
        self.durability.describe_on(self.nats.servers().len())
    }

    /// Every gateway accepts a socket and the handler answers: a probe user asks for a
    /// direct conversation with itself, which only a handler refuses.
    async fn wait_until_ready(&mut self) -> Result<(), LoadtestError> {
        let deadline = Instant::now() + READY_TIMEOUT;
        let probe = UserId::parse("loadtest-probe").expect("valid id");
        let token = auth::mint(&self.secret, &probe, crate::unix_secs(), 3600);
        for url in self.gateway_urls.clone() {
            loop {
                self.check_running()?;
                if probe_gateway(&url, &token, &probe).await {
                    break;
                }
                if Instant::now() > deadline {
                    return Err(LoadtestError::NotReady {
                        after: READY_TIMEOUT,
                        logs: self.log_tails(),
                    });
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
        Ok(())
    }

    fn check_running(&mut self) -> Result<(), LoadtestError> {
        for i in 0..self.roles.len() {
            if self.roles[i].removed {
                continue;
            }
            if let Ok(Some(status)) = self.roles[i].child.try_wait() {
                return Err(LoadtestError::RoleExited {
                    role: self.roles[i].name.clone(),
                    status: status.to_string(),
                    log_tail: log_tail(&self.roles[i].log, 0),
                });
            }
        }
        Ok(())
    }

    fn log_tails(&self) -> String {
        self.roles
            .iter()
            .map(|r| format!("--- {} ---\n{}", r.name, log_tail(&r.log, 0)))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

/// `base`, then `base-1`, `base-2`, ...: the names of a role's processes.
fn numbered(base: &str, i: usize) -> String {
    if i == 0 {
        base.to_owned()
    } else {
        format!("{base}-{i}")
    }
}

/// A Cassandra node with the store's keyspace and tables already made: created here, once,
/// so that projectors and gateways starting together never race to create one schema.
async fn start_cql_store() -> Result<CassandraNode, LoadtestError> {
    let node = tokio::task::spawn_blocking(CassandraNode::start)
        .await
        .map_err(|e| LoadtestError::Setup(format!("starting Cassandra: {e}")))??;
    let mut options = CqlOptions::new(vec![node.contact_point()], CQL_KEYSPACE);
    options.replication = [(node.datacenter().to_owned(), 1)].into_iter().collect();
    CqlStore::open(&options)
        .await
        .map_err(|e| LoadtestError::Setup(format!("creating the CQL store: {e}")))?;
    Ok(node)
}

/// The keyspace of a spawned platform's CQL store (on a node of its own).
const CQL_KEYSPACE: &str = "parley_loadtest";

/// The settings every role gets for the CQL store on `node`.
fn cql_settings(node: &CassandraNode) -> Vec<(String, String)> {
    vec![
        (
            "PARLEY_PROJECTOR__STORE__KIND".to_owned(),
            "scylla".to_owned(),
        ),
        (
            "PARLEY_PROJECTOR__STORE__SCYLLA__CONTACT_POINTS".to_owned(),
            format!("[\"{}\"]", node.contact_point()),
        ),
        (
            "PARLEY_PROJECTOR__STORE__SCYLLA__KEYSPACE".to_owned(),
            CQL_KEYSPACE.to_owned(),
        ),
        (
            "PARLEY_PROJECTOR__STORE__SCYLLA__LOCAL_DATACENTER".to_owned(),
            node.datacenter().to_owned(),
        ),
    ]
}

async fn probe_gateway(url: &str, token: &str, probe: &UserId) -> bool {
    let attempt = async {
        let (mut socket, _) =
            tokio_tungstenite::connect_async(format!("{url}?access_token={token}"))
                .await
                .ok()?;
        let frame = ClientFrame::CreateDirect {
            id: ClientMsgId::parse("ready").expect("valid id"),
            peer: probe.clone(),
        };
        socket
            .send(Message::text(serde_json::to_string(&frame).ok()?))
            .await
            .ok()?;
        while let Some(Ok(message)) = socket.next().await {
            if let Message::Text(text) = message
                && let Ok(ServerFrame::Error { code, .. }) = serde_json::from_str(&text)
            {
                let _ = socket.close(None).await;
                return Some(code == parley_events::ErrorCode::InvalidRequest);
            }
        }
        None
    };
    matches!(
        tokio::time::timeout(Duration::from_secs(5), attempt).await,
        Ok(Some(true))
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_parley_binary_says_how_to_build_it() {
        let dir = tempfile::tempdir().unwrap();
        let err = locate_parley(&dir.path().join("parley-loadtest")).unwrap_err();
        let message = err.to_string();
        assert!(message.contains("cargo build"), "{message}");
        assert!(
            message.contains(&dir.path().display().to_string()),
            "{message}"
        );
    }

    #[test]
    fn the_parley_binary_is_found_beside_or_above() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("deps")).unwrap();
        std::fs::write(dir.path().join("parley"), "").unwrap();
        let found = locate_parley(&dir.path().join("deps/test-binary")).unwrap();
        assert_eq!(found, dir.path().join("parley").canonicalize().unwrap());
    }
}
