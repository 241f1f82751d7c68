//! The gateway role: WebSocket endpoint, authentication at the upgrade, commands to the
//! intake, live events to sockets, history from the conversation store, presence updates.
//!
//! Gateways hold connections, not state: anything a socket needs comes from the log, the
//! store or the handlers, so any client may connect to any gateway.
//!
//! - [`socket`]: one connection's reader and writer.
//! - [`commands`]: publishing commands and routing their outcomes back.
//! - [`delivery`]: the routing table and the per-conversation followers.
//! - [`resume`]: bringing a socket up to date before it goes live.
//! - [`log`]: single events read from the log.
//! - [`typing`]: typing indicators, carried on the conversations' live subjects.
//! - [`presence`]: presence pushed to the sockets that asked for it.
//! - [`revocations`]: revoked tokens refused, and their live sockets closed.
//! - [`limits`]: rate limits on requests and upgrades, connections per address.
//! - [`accept`]: the accept loop, TLS handshakes and the header timeout.
//! - [`tls`]: the `wss://` certificate, reloaded when its files change.

mod accept;
mod commands;
mod delivery;
mod limits;
mod presence;
mod resume;
mod revocations;
mod send_queue;
mod socket;
mod tls;
mod typing;
mod web;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use axum::Extension;
use axum::Router;
use axum::extract::ws::WebSocketUpgrade;
use axum::extract::{ConnectInfo, State};
use axum::http::{HeaderMap, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use futures::StreamExt;
use parley_events::presence::{ConnectionState, PresenceUpdate};
use parley_events::protocol::{HttpError, packing, protocol_version};
use parley_events::subjects::{LIVE_MEMBERSHIP_SUBJECT, PRESENCE_SUBJECT, outcome_subject};
use parley_events::{ErrorCode, Outcome, RecordedEvent, UserId};
use parley_projections::ConversationStore;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::admin::Readiness;
use crate::auth::{AuthError, Verifier};
use crate::config::Config;
use crate::log::LogReader;
use crate::node::Nats;
use crate::revocation::{self, Revoked};
use crate::topology::Topology;
use crate::{telemetry, unix_millis};
use delivery::{ConnectionId, Routes};
use limits::{ConnectionCounts, RateLimits};
use resume::StoreProgress;
use revocations::Revocations;
use socket::Session;
pub use tls::CertificateError;

pub(crate) const READY_CHECK: &str = "gateway";
/// Socket read buffer; small, because idle connections dominate a gateway's memory.
const READ_BUFFER_BYTES: usize = 1024;
const WRITE_BUFFER_BYTES: usize = 4 * 1024;
/// Longest a best-effort publish waits for room in the NATS client's queue.
const BEST_EFFORT_PUBLISH_WAIT: Duration = Duration::from_millis(500);

#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error(
        "neither auth.secret nor auth.jwks_file is configured; the gateway cannot verify tokens"
    )]
    NoKeys,
    #[error("auth.jwks_file: {0}")]
    Keys(#[from] crate::auth::KeysError),
    #[error("cannot subscribe to {subject}: {cause}")]
    Subscribe { subject: String, cause: String },
    #[error(transparent)]
    Revocations(#[from] crate::revocation::RevocationError),
    #[error("serving failed: {0}")]
    Serve(#[from] std::io::Error),
    #[error(transparent)]
    Certificate(#[from] CertificateError),
}

pub struct Gateway {
    shared: Arc<Shared>,
    revocations: async_nats::jetstream::kv::Watch,
    outcomes: async_nats::Subscriber,
    membership: async_nats::Subscriber,
    /// `wss://`: the handshakes, and the certificate they serve.
    tls: Option<(tokio_rustls::TlsAcceptor, Arc<tls::Certificate>)>,
}

pub(crate) struct Shared {
    config: Arc<Config>,
    name: String,
    outcome_subject: String,
    nats: Nats,
    readiness: Readiness,
    topology: Topology,
    store: Arc<dyn ConversationStore>,
    /// The store's position, watched while resumes wait for it.
    progress: Arc<StoreProgress>,
    log: LogReader,
    verifier: Arc<Verifier>,
    revocations: Arc<Revocations>,
    routes: Arc<Routes>,
    watchers: Arc<presence::Watchers>,
    pending: commands::Pending,
    connections: Arc<Semaphore>,
    limits: Arc<RateLimits>,
    next_connection: AtomicU64,
    /// Whether a task is creating (or finding) the intake after a publish found none.
    ensuring_intake: AtomicBool,
    /// Whether the last publish found no intake (the gateway is not ready meanwhile).
    intake_missing: AtomicBool,
    shutdown: CancellationToken,
}

impl Gateway {
    pub async fn build(
        config: Arc<Config>,
        nats: Nats,
        topology: Topology,
        store: Arc<dyn ConversationStore>,
        readiness: Readiness,
    ) -> Result<Gateway, GatewayError> {
        let verifier = Verifier::new(&config.auth)?.ok_or(GatewayError::NoKeys)?;
        let tls = tls::Certificate::load(&config.gateway.tls)?;
        let client = nats.client.clone();
        let name = format!("gw-{}", uuid::Uuid::new_v4().simple());
        let outcome_subject = outcome_subject(&name);
        let subscribe = |subject: String| {
            let client = client.clone();
            async move {
                client
                    .subscribe(subject.clone())
                    .await
                    .map_err(|e| GatewayError::Subscribe {
                        subject,
                        cause: e.to_string(),
                    })
            }
        };
        let bucket = revocation::bucket(&topology.js, &config).await?;
        let (revoked, revocations) =
            Revoked::load(&bucket, config.auth.revocation_ttl_secs).await?;
        let outcomes = subscribe(outcome_subject.clone()).await?;
        let membership = subscribe(LIVE_MEMBERSHIP_SUBJECT.to_owned()).await?;
        let log = LogReader::new(&topology);
        let routes = Routes::new(client.clone(), log.clone());
        let shared = Arc::new(Shared {
            verifier: Arc::new(verifier),
            revocations: Revocations::new(revoked),
            connections: Arc::new(Semaphore::new(config.gateway.max_connections)),
            limits: RateLimits::new(&config.gateway.rate_limits),
            watchers: presence::Watchers::new(client.clone(), Arc::clone(&routes)),
            routes,
            progress: StoreProgress::new(Arc::clone(&store)),
            log,
            config,
            name,
            outcome_subject,
            nats,
            readiness: readiness.clone(),
            topology,
            store,
            pending: commands::Pending::default(),
            next_connection: AtomicU64::new(1),
            ensuring_intake: AtomicBool::new(false),
            intake_missing: AtomicBool::new(false),
            shutdown: CancellationToken::new(),
        });
        readiness.ready(READY_CHECK);
        Ok(Gateway {
            shared,
            revocations,
            outcomes,
            membership,
            tls,
        })
    }

    /// The gateway's id, unique per process start; it names its outcome subject.
    pub fn name(&self) -> &str {
        &self.shared.name
    }

    /// Serve sockets on `listener` until `shutdown`, then ask every socket to close (1001)
    /// and give them `gateway.drain_secs` to go.
    pub async fn run(
        self,
        listener: TcpListener,
        shutdown: CancellationToken,
    ) -> Result<(), GatewayError> {
        let Gateway {
            shared,
            revocations,
            outcomes,
            membership,
            tls,
        } = self;
        let (tls, certificate) = tls.unzip();
        let mut background = vec![
            tokio::spawn(route_outcomes(Arc::clone(&shared), outcomes)),
            tokio::spawn(follow_membership(Arc::clone(&shared), membership)),
            tokio::spawn(heartbeat_presence(Arc::clone(&shared))),
            tokio::spawn(Arc::clone(&shared.progress).run()),
            tokio::spawn(watch_key_file(Arc::clone(&shared))),
            tokio::spawn(Arc::clone(&shared.revocations).follow(revocations)),
            tokio::spawn(Arc::clone(&shared.limits).sweep_forever()),
        ];
        background.extend(certificate.map(|c| tokio::spawn(c.watch())));
        let app = Router::new()
            .route("/ws", get(upgrade))
            .merge(web::routes(&shared))
            .with_state(Arc::clone(&shared));
        let address = listener.local_addr()?;
        let scheme = if tls.is_some() { "wss" } else { "ws" };
        info!(%address, scheme, gateway = %shared.name, "gateway listening");
        let gateway = &shared.config.gateway;
        let acceptor = accept::Acceptor {
            router: app,
            tls,
            counts: ConnectionCounts::new(
                gateway.max_connections_per_ip,
                &gateway.rate_limits.exempt_networks,
            ),
            header_timeout: Duration::from_millis(gateway.header_timeout_ms),
        };
        let closing_sockets = async {
            shutdown.cancelled().await;
            shared.shutdown.cancel();
        };
        tokio::join!(
            accept::serve(listener, acceptor, shutdown.clone()),
            closing_sockets
        );
        // Upgraded sockets outlive the HTTP server; each holds a connection permit until it
        // has closed, so holding every permit means every socket is gone.
        let drain = Duration::from_secs(shared.config.gateway.drain_secs);
        let all = u32::try_from(shared.config.gateway.max_connections).unwrap_or(u32::MAX);
        if tokio::time::timeout(drain, shared.connections.acquire_many(all))
            .await
            .is_err()
        {
            warn!("sockets still open after the drain period");
        }
        for task in background {
            task.abort();
        }
        Ok(())
    }
}

impl Shared {
    fn connection_name(&self, conn: ConnectionId) -> String {
        format!("{}-{conn}", self.name)
    }

    async fn publish_presence(&self, user: &UserId, conn: ConnectionId, state: ConnectionState) {
        let update = PresenceUpdate {
            user: user.clone(),
            connection: self.connection_name(conn),
            state,
            at: unix_millis(),
            ttl_secs: self.config.gateway.presence_ttl_secs,
        };
        // A presence update lost now is made good by the socket's next heartbeat, or its
        // record's expiry.
        let publish = self
            .nats
            .client
            .publish(PRESENCE_SUBJECT, update.to_bytes().into());
        if let Err(cause) = self.best_effort(publish).await {
            debug!(%cause, "presence update not published");
        }
    }

    /// Publish something the platform can do without (typing, presence), unless NATS is
    /// away. While the client reconnects nothing drains its queue of outgoing messages;
    /// once that is full a publish waits for room, and with it the task that made it (a
    /// socket's reader, which then answers nothing, pings included) until NATS is back.
    async fn best_effort<E: std::fmt::Display>(
        &self,
        publish: impl Future<Output = Result<(), E>>,
    ) -> Result<(), String> {
        if !crate::node::connected(&self.nats.client) {
            return Err("NATS is not connected".to_owned());
        }
        match tokio::time::timeout(BEST_EFFORT_PUBLISH_WAIT, publish).await {
            Ok(published) => published.map_err(|e| e.to_string()),
            Err(_) => Err("the NATS client's queue stayed full".to_owned()),
        }
    }
}

/// Whether a browser page of the request's origin may use the gateway: any when
/// `gateway.allowed_origins` is empty, and requests without an `Origin` header (not from a
/// browser page) always.
fn origin_allowed(shared: &Shared, headers: &HeaderMap) -> bool {
    let allowed = &shared.config.gateway.allowed_origins;
    match headers.get(header::ORIGIN) {
        Some(origin) if !allowed.is_empty() => {
            allowed.iter().any(|a| origin.as_bytes() == a.as_bytes())
        }
        _ => true,
    }
}

fn refuse(status: StatusCode, code: ErrorCode, message: &str) -> Response {
    refuse_with(status, HttpError::new(code, message))
}

fn refuse_with(status: StatusCode, error: HttpError) -> Response {
    metrics::counter!(telemetry::GATEWAY_UPGRADES_TOTAL, "result" => error.code.as_str())
        .increment(1);
    (status, axum::Json(error)).into_response()
}

/// The token from `Authorization: Bearer …`, else from the `access_token` query parameter.
fn token_of<'a>(headers: &'a HeaderMap, uri: &'a Uri) -> Option<&'a str> {
    let from_header = headers
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.strip_prefix("Bearer "));
    from_header.or_else(|| query_param(uri, "access_token"))
}

/// A query parameter's value as it appears in the URI (not percent-decoded).
fn query_param<'a>(uri: &'a Uri, name: &str) -> Option<&'a str> {
    uri.query()?.split('&').find_map(|pair| {
        pair.strip_prefix(name)
            .and_then(|rest| rest.strip_prefix('='))
    })
}

async fn upgrade(
    State(shared): State<Arc<Shared>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Extension(counted): Extension<accept::Counted>,
    headers: HeaderMap,
    uri: Uri,
    ws: WebSocketUpgrade,
) -> Response {
    // First, before any work: refused upgrades count too, so guessing tokens is limited.
    if let Err(limited) = shared.limits.upgrade(peer.ip()) {
        let mut response = refuse_with(
            StatusCode::TOO_MANY_REQUESTS,
            HttpError::rate_limited(limited.retry_after_ms()),
        );
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, limited.retry_after_secs().into());
        return response;
    }
    if !origin_allowed(&shared, &headers) {
        return refuse(
            StatusCode::FORBIDDEN,
            ErrorCode::OriginNotAllowed,
            "this origin may not open sockets",
        );
    }
    let verified = token_of(&headers, &uri)
        .ok_or(AuthError::Missing)
        .and_then(|token| shared.verifier.verify(token))
        .and_then(|(user, claims)| {
            if shared.revocations.covers(&user, &claims) {
                Err(AuthError::Revoked)
            } else {
                Ok((user, claims))
            }
        });
    let (user, claims) = match verified {
        Ok(verified) => verified,
        Err(e) => return refuse(StatusCode::UNAUTHORIZED, e.code(), &e.to_string()),
    };
    let asked = protocol_version(query_param(&uri, "protocol")).and_then(|protocol| {
        packing(query_param(&uri, "pack"), protocol).map(|pack| (protocol, pack))
    });
    let (protocol, pack) = match asked {
        Ok(asked) => asked,
        Err(refused) => {
            return refuse(StatusCode::BAD_REQUEST, ErrorCode::InvalidRequest, &refused);
        }
    };
    let Ok(permit) = Arc::clone(&shared.connections).try_acquire_owned() else {
        return refuse(
            StatusCode::SERVICE_UNAVAILABLE,
            ErrorCode::Unavailable,
            "this gateway is full; try another",
        );
    };
    metrics::counter!(telemetry::GATEWAY_UPGRADES_TOTAL, "result" => "accepted").increment(1);
    let remaining = Duration::from_secs(claims.exp.saturating_sub(unix_millis() / 1000));
    let session = Box::new(Session {
        user,
        protocol,
        pack,
        conn: shared.next_connection.fetch_add(1, Ordering::Relaxed),
        ip: peer.ip(),
        expires_at: tokio::time::Instant::now() + remaining,
        claims,
        typing: Default::default(),
    });
    let max_frame = shared.config.limits.frame_bytes();
    ws.max_frame_size(max_frame)
        .max_message_size(max_frame)
        .read_buffer_size(READ_BUFFER_BYTES)
        .write_buffer_size(WRITE_BUFFER_BYTES)
        // A blocked socket leaves at most one frame beyond the write buffer in tungstenite's
        // buffer; the rest is room for the close frame, queued behind it without waiting.
        .max_write_buffer_size(WRITE_BUFFER_BYTES + socket::MAX_SERVER_FRAME_BYTES * 2)
        .on_upgrade(move |socket| {
            let serving = socket::serve(shared, socket, session, permit);
            async move {
                serving.await;
                drop(counted);
            }
        })
}

async fn route_outcomes(shared: Arc<Shared>, mut outcomes: async_nats::Subscriber) {
    while let Some(message) = outcomes.next().await {
        match Outcome::all_from_bytes(&message.payload) {
            Ok(outcomes) => outcomes
                .into_iter()
                .for_each(|outcome| shared.pending.resolve(outcome)),
            Err(e) => warn!(error = %e, "unreadable outcome"),
        }
    }
}

/// New conversations and new members: the local sockets of the members joining follow
/// the conversation from then on.
async fn follow_membership(shared: Arc<Shared>, mut membership: async_nats::Subscriber) {
    while let Some(message) = membership.next().await {
        match RecordedEvent::from_bytes(&message.payload) {
            Ok(event) => shared.routes.on_joined(event).await,
            Err(e) => warn!(error = %e, "unreadable membership event"),
        }
    }
}

async fn watch_key_file(shared: Arc<Shared>) {
    let period = Duration::from_secs(shared.config.auth.jwks_poll_secs);
    shared.verifier.watch_key_file(period).await;
}

/// Refresh every open socket's presence record well before it expires.
async fn heartbeat_presence(shared: Arc<Shared>) {
    let period = Duration::from_secs(u64::from(shared.config.gateway.presence_ttl_secs) / 3);
    let mut tick = tokio::time::interval(period);
    tick.tick().await;
    loop {
        tick.tick().await;
        for (conn, user) in shared.routes.snapshot() {
            shared
                .publish_presence(&user, conn, ConnectionState::Open)
                .await;
        }
    }
}
