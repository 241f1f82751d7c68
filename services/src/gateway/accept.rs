//! The gateway's accept loop: each accepted connection is served by a task of its own, so
//! a slow or silent client never holds up the accepting of others or their handshakes.
//!
//! Per connection, in its task: TCP_NODELAY, its place among its address's connections
//! (refused with 429 once the address holds `gateway.max_connections_per_ip`), the TLS
//! handshake when `[gateway.tls]` is on, and the HTTP/1.1 request that upgrades it; the
//! handshake and the request's line and headers together must arrive within
//! `gateway.header_timeout_ms`. On shutdown the loop stops accepting and every connection
//! not upgraded yet is closed once its request (if any) is answered; upgraded sockets are
//! drained by [`super::Gateway::run`].

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::http::{Request, StatusCode, header};
use axum::response::Response;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use parley_events::ErrorCode;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower_service::Service;
use tracing::{debug, warn};

use super::refuse;
use crate::gateway::limits::{ConnectionCounts, ConnectionSlot};
use crate::telemetry;

/// What every connection task needs.
#[derive(Clone)]
pub(super) struct Acceptor {
    pub(super) router: Router,
    pub(super) tls: Option<TlsAcceptor>,
    pub(super) counts: Arc<ConnectionCounts>,
    pub(super) header_timeout: Duration,
}

/// The place an upgraded socket keeps among its address's connections, until it closes.
#[derive(Clone)]
pub(super) struct Counted {
    _slot: Arc<ConnectionSlot>,
}

/// Accept until `shutdown`, then wait for the connections not upgraded to finish.
pub(super) async fn serve(listener: TcpListener, acceptor: Acceptor, shutdown: CancellationToken) {
    let connections = TaskTracker::new();
    loop {
        let accepted = tokio::select! {
            () = shutdown.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((tcp, peer)) => {
                connections.spawn(connection(acceptor.clone(), tcp, peer, shutdown.clone()));
            }
            // The peer gave up before it was accepted; nothing to do.
            Err(e) if is_connection_error(&e) => {}
            // Out of file descriptors, most likely: accepting again at once would spin.
            Err(e) => {
                warn!(error = %e, "cannot accept a connection; retrying in a second");
                tokio::select! {
                    () = shutdown.cancelled() => break,
                    () = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
            }
        }
    }
    connections.close();
    connections.wait().await;
}

fn is_connection_error(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::{ConnectionAborted, ConnectionRefused, ConnectionReset};
    matches!(
        e.kind(),
        ConnectionRefused | ConnectionAborted | ConnectionReset
    )
}

async fn connection(
    acceptor: Acceptor,
    tcp: TcpStream,
    peer: SocketAddr,
    shutdown: CancellationToken,
) {
    // Without TCP_NODELAY, a frame written within 40 ms of the previous one waits for the
    // client's delayed ACK of that one (a presence push right after its answer did).
    if let Err(e) = tcp.set_nodelay(true) {
        debug!(error = %e, "cannot set TCP_NODELAY on a socket");
    }
    let slot = acceptor.counts.open(peer.ip()).map(Arc::new);
    let Some(tls) = acceptor.tls.clone() else {
        return serve_http(acceptor, TokioIo::new(tcp), peer, slot, shutdown).await;
    };
    let handshake = tokio::select! {
        () = shutdown.cancelled() => return,
        handshake = tokio::time::timeout(acceptor.header_timeout, tls.accept(tcp)) => handshake,
    };
    match handshake {
        Ok(Ok(stream)) => serve_http(acceptor, TokioIo::new(stream), peer, slot, shutdown).await,
        Ok(Err(e)) => {
            debug!(error = %e, %peer, "TLS handshake failed");
            closed_early("tls_failed");
        }
        Err(_) => {
            debug!(%peer, "TLS handshake timed out");
            closed_early("tls_timeout");
        }
    }
}

fn closed_early(reason: &'static str) {
    metrics::counter!(telemetry::GATEWAY_CONNECTIONS_CLOSED_EARLY_TOTAL, "reason" => reason)
        .increment(1);
}

/// Serve the HTTP/1.1 requests of one connection (one upgrade, normally). A connection
/// over its address's cap (`slot` is `None`) has every request refused, then closes.
async fn serve_http<I>(
    acceptor: Acceptor,
    io: TokioIo<I>,
    peer: SocketAddr,
    slot: Option<Arc<ConnectionSlot>>,
    shutdown: CancellationToken,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let router = acceptor.router;
    let service = hyper::service::service_fn(move |mut request: Request<Incoming>| {
        let mut router = router.clone();
        let slot = slot.clone();
        async move {
            let Some(slot) = slot else {
                return Ok::<_, Infallible>(too_many_connections());
            };
            // The peer's address is what the per-address rate limits count.
            request.extensions_mut().insert(ConnectInfo(peer));
            request.extensions_mut().insert(Counted { _slot: slot });
            router.call(request).await
        }
    });
    let connection = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(acceptor.header_timeout)
        .serve_connection(io, service)
        .with_upgrades();
    tokio::pin!(connection);
    let result = tokio::select! {
        result = connection.as_mut() => result,
        () = shutdown.cancelled() => {
            connection.as_mut().graceful_shutdown();
            connection.await
        }
    };
    if let Err(e) = result {
        if e.is_timeout() {
            closed_early("header_timeout");
        }
        debug!(error = %e, %peer, "connection ended with an error");
    }
}

fn too_many_connections() -> Response<Body> {
    let mut response = refuse(
        StatusCode::TOO_MANY_REQUESTS,
        ErrorCode::TooManyConnections,
        "this address holds as many connections as it may; close one first",
    );
    response
        .headers_mut()
        .insert(header::CONNECTION, "close".parse().expect("a header value"));
    response
}
