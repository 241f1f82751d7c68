//! Health, readiness and metrics on a node running every role, as `parley up` does.

mod support;

use std::sync::Arc;

use parley_localstack::{NatsOptions, NatsServer, RedisOptions, RedisServer};
use parley_services::config::{Config, Secret};
use parley_services::node::{self, Listeners, Roles};
use support::http_get as get;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_role_reports_health_readiness_and_metrics_and_stops_on_shutdown() {
    let nats = NatsServer::start(NatsOptions::default()).unwrap();
    let redis = RedisServer::start(RedisOptions::default()).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut config = Config::default();
    config.nats.url = Some(Secret::new(nats.url()));
    config.redis.url = Some(Secret::new(redis.url()));
    config.auth.secret = Some(Secret::new("admin-test-secret-admin-test-secret"));
    config.projector.store.path = dir.path().join("c.db");
    let admin = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let admin_address = admin.local_addr().unwrap();
    let gateway = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let gateway_address = gateway.local_addr().unwrap();
    let shutdown = CancellationToken::new();
    let node = tokio::spawn(node::run(
        Arc::new(config),
        Roles::ALL,
        Listeners {
            gateway: Some(gateway),
            admin: Some(admin),
        },
        shutdown.clone(),
    ));

    let (status, body) = get(admin_address, "/healthz").await;
    assert_eq!((status, body.as_str()), (200, "ok"));
    let ready = loop {
        let (status, body) = get(admin_address, "/readyz").await;
        if status == 200 {
            break body;
        }
        assert_eq!(status, 503, "not ready is 503: {body}");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    let checks: serde_json::Value = serde_json::from_str(&ready).unwrap();
    for check in [
        "nats",
        "store",
        "gateway",
        "handler",
        "projector",
        "presence",
    ] {
        assert_eq!(checks[check], "ok", "{ready}");
    }
    // An upgrade without a token is refused and counted.
    let mut tcp = tokio::net::TcpStream::connect(gateway_address)
        .await
        .unwrap();
    tcp.write_all(
        b"GET /ws HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
          Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
    )
    .await
    .unwrap();
    let mut refusal = vec![0u8; 12];
    tcp.read_exact(&mut refusal).await.unwrap();
    assert_eq!(&refusal[9..12], b"401");
    let (status, metrics) = get(admin_address, "/metrics").await;
    assert_eq!(status, 200);
    assert!(
        metrics.contains(r#"parley_gateway_upgrades_total{result="token_missing"} 1"#),
        "{metrics}"
    );

    shutdown.cancel();
    tokio::time::timeout(std::time::Duration::from_secs(15), node)
        .await
        .expect("node stops in time")
        .unwrap()
        .unwrap();
}
