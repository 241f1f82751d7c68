//! One process running any set of roles: connects to NATS (and Redis, the store) once,
//! makes sure the topology exists, serves the admin endpoints, runs the roles until
//! shutdown, and stops them all when one fails.

use std::sync::Arc;
use std::time::Duration;

use parley_projections::{ConversationStore, CqlStore, PresenceStore, SqliteStore, StoreErrorKind};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::admin::{self, Readiness, Reason};
use crate::backoff::Backoff;
use crate::config::{Config, StoreKind};
use crate::gateway::Gateway;
use crate::handler::Handler;
use crate::projector::{self, Projector};
use crate::replay::{self, ActiveStore, Target};
use crate::{telemetry, topology};

const NATS_READY_CHECK: &str = "nats";
pub(crate) const STORE_READY_CHECK: &str = "store";
/// How often a running node asks its conversation store whether it answers.
const STORE_CHECK_INTERVAL: Duration = Duration::from_secs(5);
const SUBSCRIPTION_CAPACITY: usize = 4096;
/// How long a stopping node waits for NATS to take what its client still buffers (live
/// copies, outcomes, presence: nothing a client was told is stored).
const FLUSH_AT_EXIT: Duration = Duration::from_secs(2);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Roles {
    pub gateway: bool,
    pub handler: bool,
    pub projector: bool,
}

impl Roles {
    pub const ALL: Roles = Roles {
        gateway: true,
        handler: true,
        projector: true,
    };
    pub const GATEWAY: Roles = Roles {
        gateway: true,
        handler: false,
        projector: false,
    };
    pub const HANDLER: Roles = Roles {
        gateway: false,
        handler: true,
        projector: false,
    };
    pub const PROJECTOR: Roles = Roles {
        gateway: false,
        handler: false,
        projector: true,
    };
}

/// Listeners the node serves on, bound by the caller (port 0 in tests).
pub struct Listeners {
    pub gateway: Option<TcpListener>,
    pub admin: Option<TcpListener>,
}

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("nats.url is not configured")]
    NoNatsUrl,
    #[error("redis.url is not configured; the projector needs Redis for presence")]
    NoRedisUrl,
    #[error("the gateway role needs a listener")]
    NoGatewayListener,
    #[error("cannot connect to NATS: {0}")]
    Nats(String),
    #[error(transparent)]
    Topology(#[from] topology::TopologyError),
    #[error(transparent)]
    Store(#[from] parley_projections::StoreError),
    #[error("redis: {0}")]
    Presence(#[from] parley_projections::PresenceError),
    #[error(transparent)]
    Gateway(#[from] crate::gateway::GatewayError),
    #[error(transparent)]
    Handler(#[from] crate::handler::HandlerError),
    #[error("{role} stopped: {cause}")]
    RoleFailed { role: &'static str, cause: String },
    #[error("admin endpoint: {0}")]
    Admin(std::io::Error),
    #[error("push: {0}")]
    Push(#[from] crate::push::PushError),
    #[error("projection target: {0}")]
    Replay(crate::replay::ReplayError),
}

/// A NATS client and the count of its connections: 1 after the first, one more after each
/// reconnect. Roles watch the count to set up again at once what a server restart may have
/// lost (a memory intake, consumers, pull requests), instead of waiting for a timeout to
/// show it.
#[derive(Clone)]
pub struct Nats {
    pub client: async_nats::Client,
    connections: watch::Receiver<u64>,
}

impl Nats {
    /// The connection count as of now; `changed()` on it fires at the next reconnect.
    pub fn reconnects(&self) -> watch::Receiver<u64> {
        let mut connections = self.connections.clone();
        connections.mark_unchanged();
        connections
    }
}

/// Whether `client` has a connection now. While it has none, nothing drains its queue of
/// outgoing messages, so work that must not wait for NATS to come back asks this first.
pub(crate) fn connected(client: &async_nats::Client) -> bool {
    client.connection_state() == async_nats::connection::State::Connected
}

/// Longest pause between two attempts to reconnect to NATS. Short, so a restarted server is
/// found again within this; attempts to a loopback or LAN address that refuses are cheap.
const MAX_RECONNECT_DELAY: Duration = Duration::from_millis(250);

/// Connect to NATS as configured; retries the first connection for a while, so roles can
/// start before the server does.
pub async fn connect_nats(config: &Config, readiness: &Readiness) -> Result<Nats, NodeError> {
    let url = config
        .nats
        .url
        .as_ref()
        .ok_or(NodeError::NoNatsUrl)?
        .expose();
    // async-nats builds its own TLS configuration for a `tls://` URL when `nats.tls` is off,
    // from the process default.
    parley_projections::tls::install_process_provider();
    let (connections_tx, connections) = watch::channel(0);
    let connections_tx = Arc::new(connections_tx);
    let mut options = async_nats::ConnectOptions::new()
        .name(&config.nats.name)
        .retry_on_initial_connect()
        .connection_timeout(Duration::from_secs(5))
        .request_timeout(Some(Duration::from_secs(5)))
        // Messages buffered per subscription before the client drops them; a gateway holds
        // one subscription per followed conversation, and gap fill repairs a drop.
        .subscription_capacity(SUBSCRIPTION_CAPACITY)
        .reconnect_delay_callback(|attempts| {
            MAX_RECONNECT_DELAY.min(Duration::from_millis(25) * attempts as u32)
        })
        .event_callback({
            // Readiness follows the connection, so a node cut off from NATS is taken out of
            // rotation until the client has reconnected.
            let readiness = readiness.clone();
            let connections = Arc::clone(&connections_tx);
            move |event| {
                let readiness = readiness.clone();
                let connections = Arc::clone(&connections);
                async move {
                    match event {
                        async_nats::Event::Connected => {
                            readiness.ready(NATS_READY_CHECK);
                            connections.send_modify(|count| *count += 1);
                        }
                        async_nats::Event::Disconnected => readiness.not_ready(
                            NATS_READY_CHECK,
                            Reason::Disconnected,
                            "disconnected from NATS",
                        ),
                        // A failed (re)connection attempt; the client keeps trying.
                        async_nats::Event::ClientError(e) => {
                            warn!(error = %e, "cannot connect to NATS yet");
                        }
                        _ => {}
                    }
                }
            }
        });
    if let Some(tls) = config.nats.tls.client() {
        let tls = tls
            .client_config()
            .map_err(|e| NodeError::Nats(format!("nats.tls: {e}")))?;
        options = options.require_tls(true).tls_client_config(tls);
    }
    if let Some(creds) = &config.nats.credentials_file {
        options = options
            .credentials_file(creds)
            .await
            .map_err(|e| NodeError::Nats(format!("credentials file {}: {e}", creds.display())))?;
    }
    // async-nats takes a list of servers, not a comma-separated string.
    let servers: Vec<&str> = url
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .collect();
    let client = options
        .connect(servers.as_slice())
        .await
        .map_err(|e| NodeError::Nats(e.to_string()))?;
    // retry_on_initial_connect returns at once; wait for the first connection, bounded.
    let connected = async {
        while !connected(&client) {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(30), connected)
        .await
        .map_err(|_| NodeError::Nats(format!("no connection to {url} within 30 s")))?;
    Ok(Nats {
        client,
        connections,
    })
}

/// Open the configured conversation store once. SQLite opens on the blocking pool: opening
/// may wait for another process's set-up of the same file.
pub async fn open_store(config: &Config) -> Result<Arc<dyn ConversationStore>, NodeError> {
    let store = &config.projector.store;
    match store.kind {
        StoreKind::Sqlite => {
            let path = store.path.clone();
            let store = tokio::task::spawn_blocking(move || SqliteStore::open(&path))
                .await
                .map_err(|e| NodeError::RoleFailed {
                    role: "store",
                    cause: e.to_string(),
                })??;
            Ok(Arc::new(store))
        }
        StoreKind::Scylla => Ok(Arc::new(CqlStore::open(&store.scylla.options()).await?)),
    }
}

/// Open the store, waiting with backoff while it cannot be reached (the node is not ready
/// meanwhile, and says why). A store that answers but is not Parley's, or is newer than
/// this build, stops the node at once: waiting cannot fix it. `None` on shutdown.
async fn open_store_patiently(
    config: &Config,
    readiness: &Readiness,
    shutdown: &CancellationToken,
) -> Result<Option<Arc<dyn ConversationStore>>, NodeError> {
    let mut backoff = Backoff::new(projector::MAX_BACKOFF);
    loop {
        match open_store(config).await {
            Ok(store) => {
                readiness.ready(STORE_READY_CHECK);
                return Ok(Some(store));
            }
            Err(NodeError::Store(e)) if e.kind == StoreErrorKind::Unavailable => {
                warn!(error = %e, retry_in = ?backoff.delay(), "cannot reach the conversation store; not ready, retrying");
                metrics::counter!(telemetry::STORE_ERRORS_TOTAL, "kind" => e.kind.as_str())
                    .increment(1);
                readiness.not_ready(STORE_READY_CHECK, Reason::StoreUnavailable, e.to_string());
            }
            Err(e) => {
                error!(error = %e, "cannot use the conversation store");
                return Err(e);
            }
        }
        if !backoff.wait(shutdown).await {
            return Ok(None);
        }
    }
}

/// The projection target in force and the bucket that records it, read again after a
/// backoff while NATS cannot answer (a cluster electing the bucket's leader answers "no
/// responders" for a moment); `None` on shutdown. A malformed record stops the node.
async fn start_target_patiently(
    topology: &topology::Topology,
    config: &Config,
    shutdown: &CancellationToken,
) -> Result<Option<(async_nats::jetstream::kv::Store, Target)>, NodeError> {
    let mut backoff = Backoff::new(projector::MAX_BACKOFF);
    loop {
        let attempt = async {
            let bucket = replay::switch::bucket(&topology.js, config).await?;
            let target = replay::switch::start_target(&bucket, config).await?;
            Ok((bucket, target))
        };
        match attempt.await {
            Ok(found) => return Ok(Some(found)),
            Err(replay::ReplayError::Nats(cause)) => {
                warn!(%cause, retry_in = ?backoff.delay(), "cannot read the projection target yet; retrying");
            }
            Err(e) => return Err(NodeError::Replay(e)),
        }
        if !backoff.wait(shutdown).await {
            return Ok(None);
        }
    }
}

/// Keep the store's readiness check current while the node runs.
async fn watch_store(
    store: Arc<dyn ConversationStore>,
    readiness: Readiness,
    shutdown: CancellationToken,
) {
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(STORE_CHECK_INTERVAL) => {}
        }
        match store.check().await {
            Ok(()) => readiness.ready(STORE_READY_CHECK),
            Err(e) => {
                metrics::counter!(telemetry::STORE_ERRORS_TOTAL, "kind" => e.kind.as_str())
                    .increment(1);
                readiness.not_ready(STORE_READY_CHECK, Reason::StoreUnavailable, e.to_string());
            }
        }
    }
}

/// Run `roles` until `shutdown` is cancelled or one of them fails.
pub async fn run(
    config: Arc<Config>,
    roles: Roles,
    listeners: Listeners,
    shutdown: CancellationToken,
) -> Result<(), NodeError> {
    // Installed before any role runs, so no early measurement is lost.
    telemetry::prometheus();
    // Built (and its TLS files read) before anything connects, so a bad setting stops the
    // node at once.
    let presence = if roles.projector {
        let url = config.redis.url.as_ref().ok_or(NodeError::NoRedisUrl)?;
        Some(PresenceStore::client(
            url.expose(),
            config.redis.tls.client().as_ref(),
        )?)
    } else {
        None
    };
    // Every check this node will have is registered now, so readiness never reports a node
    // ready before all of its roles are.
    let readiness = Readiness::default();
    readiness.not_ready(NATS_READY_CHECK, Reason::Disconnected, "connecting");
    let checks = [
        (roles.gateway, crate::gateway::READY_CHECK),
        (roles.handler, crate::handler::READY_CHECK),
        (roles.projector, projector::READY_CHECK),
        (roles.projector, projector::PRESENCE_READY_CHECK),
        (roles.projector || roles.gateway, STORE_READY_CHECK),
    ];
    for (_, check) in checks.into_iter().filter(|(runs, _)| *runs) {
        readiness.not_ready(check, Reason::Starting, "starting");
    }
    let mut tasks: JoinSet<(&'static str, Result<(), String>)> = JoinSet::new();
    if let Some(admin) = listeners.admin {
        let app = admin::router(readiness.clone());
        let stop = shutdown.clone();
        info!(address = %admin.local_addr().map_err(NodeError::Admin)?, "admin endpoints listening");
        tasks.spawn(async move {
            let served = axum::serve(admin, app)
                .with_graceful_shutdown(async move { stop.cancelled().await })
                .await;
            ("admin", served.map_err(|e| e.to_string()))
        });
    }
    let nats = connect_nats(&config, &readiness).await?;
    let client = nats.client.clone();
    let topology = topology::ensure(async_nats::jetstream::new(client.clone()), &config)
        .await
        .inspect_err(|e| error!(error = %e, "cannot set up the JetStream topology"))?;
    // Presence needs neither the store nor the log: it follows updates from the moment NATS
    // answers, so sockets that open while the rest of the node starts are not missed.
    if let Some(presence) = presence.clone() {
        let stop = shutdown.clone();
        let (client, readiness) = (client.clone(), readiness.clone());
        tasks.spawn(async move {
            let result = projector::run_presence(client, presence, readiness, stop).await;
            ("presence", result.map_err(|e| e.to_string()))
        });
    }
    // The store the roles start on: the one `parley replay switch` made active, if any.
    let switching = if roles.gateway || roles.projector {
        let Some((bucket, target)) = start_target_patiently(&topology, &config, &shutdown).await?
        else {
            return Ok(());
        };
        if target != Target::configured(&config) {
            info!(%target, "using the projection target `parley replay switch` made active");
        }
        Some((bucket, target))
    } else {
        None
    };
    let store = match &switching {
        Some((_, target)) => {
            match open_store_patiently(&target.configure(&config), &readiness, &shutdown).await? {
                Some(store) => Some(store),
                None => return Ok(()),
            }
        }
        None => None,
    };
    // One handle per role: a switch moves the projector at once and the gateway only once
    // the new target has caught up.
    let handle = |runs: bool| {
        let (_, target) = switching.as_ref()?;
        let store = Arc::clone(store.as_ref()?);
        runs.then(|| ActiveStore::new(target.clone(), store))
    };
    let (gateway_store, projector_store) = (handle(roles.gateway), handle(roles.projector));
    if let Some((bucket, _)) = switching {
        let follower = replay::switch::Follower {
            config: Arc::clone(&config),
            topology: topology.clone(),
            bucket,
            node: uuid::Uuid::new_v4().simple().to_string(),
            gateway: gateway_store.clone(),
            projector: projector_store.clone(),
        };
        let stop = shutdown.clone();
        tasks.spawn(async move {
            follower.run(stop).await;
            ("replay", Ok(()))
        });
    }
    if let Some(store) = gateway_store.clone().or(projector_store.clone()) {
        let (readiness, stop) = (readiness.clone(), shutdown.clone());
        tasks.spawn(async move {
            watch_store(store, readiness, stop).await;
            ("store", Ok(()))
        });
    }

    if roles.handler {
        let handler = Handler::build(
            Arc::clone(&config),
            nats.clone(),
            topology.clone(),
            readiness.clone(),
        );
        let stop = shutdown.clone();
        tasks.spawn(async move {
            (
                "handler",
                handler.run(stop).await.map_err(|e| e.to_string()),
            )
        });
    }
    if roles.projector {
        let store = projector_store.expect("opened for the projector");
        let projector = Projector::switchable(
            Arc::clone(&config),
            topology.clone(),
            Arc::clone(&store),
            readiness.clone(),
        );
        let stop = shutdown.clone();
        tasks.spawn(async move {
            projector.run(stop).await;
            ("projector", Ok(()))
        });
        let pusher = crate::push::Pusher::build(
            Arc::clone(&config),
            nats.clone(),
            topology.clone(),
            store,
            presence.expect("built for the projector"),
        )?;
        if let Some(pusher) = pusher {
            let stop = shutdown.clone();
            tasks.spawn(async move {
                pusher.run(stop).await;
                ("push", Ok(()))
            });
        }
    }
    if roles.gateway {
        let listener = listeners.gateway.ok_or(NodeError::NoGatewayListener)?;
        let store = gateway_store.expect("opened for the gateway");
        let gateway = Gateway::build(
            Arc::clone(&config),
            nats.clone(),
            topology.clone(),
            store,
            readiness.clone(),
        )
        .await?;
        let stop = shutdown.clone();
        tasks.spawn(async move {
            (
                "gateway",
                gateway.run(listener, stop).await.map_err(|e| e.to_string()),
            )
        });
    }

    let mut first_failure = None;
    while let Some(joined) = tasks.join_next().await {
        let (role, result) = joined.unwrap_or_else(|e| ("task", Err(e.to_string())));
        if let Err(cause) = result {
            error!(role, %cause, "role failed; stopping the node");
            first_failure.get_or_insert(NodeError::RoleFailed { role, cause });
            shutdown.cancel();
        }
    }
    // Publishes still buffered in the client go out before the process ends, if NATS is
    // there to take them: a flush waits for a connection, and one that never comes back
    // (NATS stopped with the node) must not keep the process from exiting.
    if tokio::time::timeout(FLUSH_AT_EXIT, client.flush())
        .await
        .is_err()
    {
        warn!("NATS did not take the last buffered publishes; exiting without them");
    }
    first_failure.map_or(Ok(()), Err)
}
