//! `wss://` served by the gateway itself (`[gateway.tls]`): a TLS WebSocket client trusting
//! the test CA chats; a plaintext client is refused; a client that never sends its
//! ClientHello holds up no one else's handshake and is cut off; a replaced certificate is
//! served to new connections without a restart while open sockets stay up, and a bad
//! replacement keeps the certificate in service.

use crate::support;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use parley_localstack::pki::TestPki;
use parley_projections::TlsClient;
use parley_services::config::{Config, GatewayTlsConfig};
use parley_services::node::{self, Listeners, Roles};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use serde_json::{Value, json};
use support::{Platform, eventually, http_get};
use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_util::sync::CancellationToken;

type Wss = WebSocketStream<TlsStream<TcpStream>>;

/// A gateway serving `wss://` beside a platform's handler and projector.
struct TlsGateway {
    address: SocketAddr,
    admin: SocketAddr,
    shutdown: CancellationToken,
    cert_file: PathBuf,
    key_file: PathBuf,
    /// Trusts both test CAs: the first certificate's and its replacement's.
    connector: TlsConnector,
}

impl Drop for TlsGateway {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

fn copy(from: &Path, to: &Path) {
    // Written aside and renamed, as a certificate rotation should be: never half a file.
    let aside = to.with_extension("new");
    std::fs::copy(from, &aside).unwrap();
    std::fs::rename(&aside, to).unwrap();
}

async fn tls_gateway(platform: &Platform, first: &TestPki, second: &TestPki) -> TlsGateway {
    let cert_file = first.path("gateway.pem");
    let key_file = first.path("gateway-key.pem");
    copy(&first.server_cert, &cert_file);
    copy(&first.server_key, &key_file);
    let mut config: Config = (*platform.config).clone();
    config.gateway.tls = GatewayTlsConfig {
        enabled: true,
        cert_file: Some(cert_file.clone()),
        key_file: Some(key_file.clone()),
        reload_secs: 1,
    };
    config.gateway.header_timeout_ms = 1_000;
    config.validate().unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let admin = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (address, admin_address) = (listener.local_addr().unwrap(), admin.local_addr().unwrap());
    let shutdown = CancellationToken::new();
    tokio::spawn(node::run(
        Arc::new(config),
        Roles::GATEWAY,
        Listeners {
            gateway: Some(listener),
            admin: Some(admin),
        },
        shutdown.clone(),
    ));
    let cas = first.path("both-cas.pem");
    let both = format!(
        "{}{}",
        std::fs::read_to_string(&first.trusted.ca).unwrap(),
        std::fs::read_to_string(&second.trusted.ca).unwrap()
    );
    std::fs::write(&cas, both).unwrap();
    let client = TlsClient {
        ca_file: Some(cas),
        ..TlsClient::default()
    }
    .client_config()
    .unwrap();
    TlsGateway {
        address,
        admin: admin_address,
        shutdown,
        cert_file,
        key_file,
        connector: TlsConnector::from(Arc::new(client)),
    }
}

impl TlsGateway {
    /// A TLS connection, handshake done.
    async fn handshake(&self) -> std::io::Result<TlsStream<TcpStream>> {
        let tcp = TcpStream::connect(self.address).await?;
        let name = ServerName::try_from("127.0.0.1").unwrap();
        self.connector.connect(name, tcp).await
    }

    /// `user`'s socket over TLS, welcome read; `None` while the gateway is not serving.
    async fn connect(&self, platform: &Platform, user: &str) -> Option<Wss> {
        let tls = self.handshake().await.ok()?;
        let mut request = format!("wss://{}/ws", self.address)
            .into_client_request()
            .unwrap();
        request.headers_mut().insert(
            "Authorization",
            format!("Bearer {}", platform.token(user)).parse().unwrap(),
        );
        let (mut socket, _) = tokio_tungstenite::client_async(request, tls).await.ok()?;
        let welcome = next(&mut socket).await;
        assert_eq!(welcome["type"], "welcome", "{welcome}");
        Some(socket)
    }

    /// Reloads that found the files unusable, from `/metrics`.
    async fn failed_reloads(&self) -> u64 {
        let metrics = http_get(self.admin, "/metrics").await.1;
        metrics
            .lines()
            .find_map(|line| {
                line.strip_prefix("parley_gateway_tls_reloads_total{result=\"failed\"} ")
            })
            .map_or(0, |value| value.trim().parse().unwrap())
    }

    /// The leaf certificate a new connection is served.
    async fn served_certificate(&self) -> CertificateDer<'static> {
        let tls = self.handshake().await.unwrap();
        tls.get_ref().1.peer_certificates().unwrap()[0].clone()
    }
}

fn leaf(pki: &TestPki) -> CertificateDer<'static> {
    CertificateDer::pem_file_iter(&pki.server_cert)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
}

async fn next(socket: &mut Wss) -> Value {
    loop {
        let message = tokio::time::timeout(Duration::from_secs(10), socket.next())
            .await
            .expect("a frame in time")
            .expect("the socket is open")
            .expect("a frame");
        if let Message::Text(text) = message {
            return serde_json::from_str(&text).unwrap();
        }
    }
}

/// Send `frame` and read until its reply (a handler still starting answers `timeout`
/// first, then the outcome).
async fn request(socket: &mut Wss, frame: Value) -> Value {
    let id = frame["id"].clone();
    socket
        .send(Message::Text(frame.to_string().into()))
        .await
        .unwrap();
    loop {
        let reply = next(socket).await;
        if reply["id"] == id && reply["type"] != "event" && reply["code"] != "timeout" {
            return reply;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_client_chats_over_wss_and_a_rotated_certificate_is_served_without_restart() {
    let (first, second) = (TestPki::new().unwrap(), TestPki::new().unwrap());
    let platform = Platform::start(0).await;
    let gateway = tls_gateway(&platform, &first, &second).await;

    // A client that opens TCP and never says hello, before anyone else.
    let mut silent = TcpStream::connect(gateway.address).await.unwrap();
    let mut alice = eventually(|| gateway.connect(&platform, "alice")).await;
    let created = request(
        &mut alice,
        json!({"type": "create_direct", "id": "dm", "peer": "bob"}),
    )
    .await;
    assert_eq!(created["type"], "ack", "{created}");
    let conversation = created["conversation"].clone();
    let sent = request(
        &mut alice,
        json!({"type": "send", "id": "m1", "conversation": conversation, "body": "over wss"}),
    )
    .await;
    assert_eq!(sent["type"], "ack", "{sent}");
    // The silent one is cut off once the handshake time is up.
    let mut buffer = [0u8; 64];
    let cut = tokio::time::timeout(Duration::from_secs(20), silent.read(&mut buffer)).await;
    assert!(
        matches!(cut, Ok(Ok(0) | Err(_))),
        "the silent connection stays open: {cut:?}"
    );

    // Plaintext to the TLS port gets no socket.
    let plain = tokio_tungstenite::connect_async(format!(
        "ws://{}/ws?access_token={}",
        gateway.address,
        platform.token("bob")
    ))
    .await;
    assert!(plain.is_err(), "a plaintext upgrade succeeded");

    // Rotation: new files, a new certificate for new connections.
    assert_eq!(gateway.served_certificate().await, leaf(&first));
    copy(&second.server_key, &gateway.key_file);
    copy(&second.server_cert, &gateway.cert_file);
    eventually(|| async { (gateway.served_certificate().await == leaf(&second)).then_some(()) })
        .await;
    let mut bob = gateway
        .connect(&platform, "bob")
        .await
        .expect("bob connects");
    let ping = request(&mut bob, json!({"type": "ping", "id": "b"})).await;
    assert_eq!(ping["type"], "pong");
    // Alice's socket, opened before, is still up.
    let ping = request(&mut alice, json!({"type": "ping", "id": "a"})).await;
    assert_eq!(ping["type"], "pong");

    // A broken replacement: logged and counted, the last good certificate stays.
    let failed_before = gateway.failed_reloads().await;
    std::fs::write(&gateway.cert_file, "not a certificate").unwrap();
    eventually(|| async { (gateway.failed_reloads().await > failed_before).then_some(()) }).await;
    assert_eq!(gateway.served_certificate().await, leaf(&second));
}
