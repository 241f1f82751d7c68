//! Connection hardening through a real gateway: a client that never finishes its upgrade
//! request (half a request, headers trickled a byte at a time, or nothing at all) is cut off
//! after `gateway.header_timeout_ms` while others still connect, and one address holds at
//! most `gateway.max_connections_per_ip` connections, the next refused with HTTP 429
//! `too_many_connections` until one closes.

use crate::support;

use std::net::SocketAddr;
use std::time::Duration;

use support::{Platform, eventually};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite;

/// How long a test waits for the gateway to close a connection it should close; generous,
/// because it bounds a hang, not a speed.
const CLOSE_WAIT: Duration = Duration::from_secs(20);

/// Read from `stream` until the gateway closes it (end of file or a reset), whatever it
/// sends first; fails the test if it stays open.
async fn closed_by_gateway(mut stream: TcpStream) {
    let mut buffer = [0u8; 1024];
    let closed = tokio::time::timeout(CLOSE_WAIT, async {
        loop {
            match stream.read(&mut buffer).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "the gateway kept the connection open");
}

fn upgrade_head(gateway: SocketAddr) -> String {
    format!(
        "GET /ws HTTP/1.1\r\nHost: {gateway}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_and_unfinished_upgrade_requests_are_closed_while_others_connect() {
    let platform = Platform::start_with(1, |config| config.gateway.header_timeout_ms = 300).await;
    let gateway = platform.gateways[0];

    // Half a request: the line and some headers, never the blank line that ends them.
    let mut half = TcpStream::connect(gateway).await.unwrap();
    half.write_all(upgrade_head(gateway).as_bytes())
        .await
        .unwrap();
    // Nothing at all.
    let silent = TcpStream::connect(gateway).await.unwrap();
    // A header trickled one byte at a time, for as long as the gateway takes it.
    let trickled = TcpStream::connect(gateway).await.unwrap();
    let (mut trickled_read, mut trickled_write) = trickled.into_split();
    let trickler = tokio::spawn(async move {
        let head = format!("{}X-Slow: {}", upgrade_head(gateway), "a".repeat(10_000));
        for byte in head.as_bytes() {
            if trickled_write.write_all(&[*byte]).await.is_err() {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        false
    });

    // Meanwhile the accept loop still serves a real client, start to finish.
    let mut alice = platform.connect(0, "alice").await;
    alice
        .send(serde_json::json!({"type": "ping", "id": "p"}))
        .await;
    assert_eq!(alice.reply_to("p").await["type"], "pong");

    closed_by_gateway(half).await;
    closed_by_gateway(silent).await;
    let mut buffer = [0u8; 1024];
    let trickle_closed = tokio::time::timeout(CLOSE_WAIT, async {
        while let Ok(n) = trickled_read.read(&mut buffer).await
            && n > 0
        {}
    })
    .await;
    assert!(trickle_closed.is_ok(), "the trickled connection stays open");
    drop(trickled_read);
    assert!(
        trickler.await.unwrap(),
        "the gateway took the whole trickled header"
    );

    // The timeout is on the headers, not the socket: an upgraded socket idles on.
    alice
        .send(serde_json::json!({"type": "ping", "id": "q"}))
        .await;
    assert_eq!(alice.reply_to("q").await["type"], "pong");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_address_holds_at_most_its_cap_of_connections() {
    let platform = Platform::start_with(1, |config| {
        config.gateway.max_connections_per_ip = 2;
        // Loopback is spared by default; here it stands for any one client address.
        config.gateway.rate_limits.exempt_networks = Vec::new();
    })
    .await;
    let alice = platform.connect(0, "alice").await;
    let _bob = platform.connect(0, "bob").await;

    match platform.try_connect(0, "carol").await {
        Err(tungstenite::Error::Http(response)) => {
            assert_eq!(response.status().as_u16(), 429);
            let body: serde_json::Value =
                serde_json::from_slice(response.body().as_deref().unwrap_or_default()).unwrap();
            assert_eq!(body["code"], "too_many_connections", "{body}");
            assert_eq!(body["retryable"], true, "{body}");
        }
        Err(other) => panic!("expected an HTTP refusal, got {other}"),
        Ok(_) => panic!("a third connection from one address was accepted"),
    }
    alice.close().await;
    let mut carol = eventually(|| async { platform.try_connect(0, "carol").await.ok() }).await;
    assert_eq!(carol.next_of(&["welcome"]).await["user"], "carol");
}
