//! Everything a client can get wrong gets its documented answer, and nothing is appended.

use crate::support;

use std::time::Duration;

use parley_services::unix_millis;
use serde_json::json;
use support::{Client, Closed, Platform, SECRET};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::{self, Message};

/// The upgrade is refused with `status` and the JSON error `code`.
async fn refused(request: tungstenite::handshake::client::Request, status: u16, code: &str) {
    match Client::open(request).await {
        Err(tungstenite::Error::Http(response)) => {
            assert_eq!(response.status().as_u16(), status);
            let body: serde_json::Value =
                serde_json::from_slice(response.body().as_deref().unwrap_or_default()).unwrap();
            assert_eq!(body["code"], code, "{body}");
            assert_eq!(body["retryable"], false);
        }
        Err(other) => panic!("expected an HTTP refusal, got {other}"),
        Ok(_) => panic!("expected the upgrade to be refused"),
    }
}

fn with_bearer(url: &str, token: &str) -> tungstenite::handshake::client::Request {
    let mut request = url.into_client_request().unwrap();
    request
        .headers_mut()
        .insert("Authorization", format!("Bearer {token}").parse().unwrap());
    request
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_tokens_are_refused_at_the_upgrade() {
    let platform = Platform::start(1).await;
    let url = platform.url(0);
    let now = unix_millis() / 1000;

    refused(
        url.clone().into_client_request().unwrap(),
        401,
        "token_missing",
    )
    .await;
    let expired = platform.token_with(SECRET, "alice", now - 7200, 60);
    refused(with_bearer(&url, &expired), 401, "token_expired").await;
    let forged = platform.token_with("some-other-secret-some-other-secret", "alice", now, 60);
    refused(with_bearer(&url, &forged), 401, "token_invalid").await;
    refused(with_bearer(&url, "garbage"), 401, "token_invalid").await;
    // The query parameter is checked just the same.
    refused(
        format!("{url}?access_token={forged}")
            .into_client_request()
            .unwrap(),
        401,
        "token_invalid",
    )
    .await;

    // A browser-style connection with the token in the query string works.
    let good = platform.token("alice");
    let mut client = Client::open(
        format!("{url}?access_token={good}")
            .into_client_request()
            .unwrap(),
    )
    .await
    .unwrap();
    assert_eq!(client.next_of(&["welcome"]).await["user"], "alice");
    assert!(platform.log().await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disallowed_origins_are_refused() {
    let platform = Platform::start_with(1, |c| {
        c.gateway.allowed_origins = vec!["https://chat.example".into()]
    })
    .await;
    let mut request = with_bearer(&platform.url(0), &platform.token("alice"));
    request
        .headers_mut()
        .insert("Origin", "https://evil.example".parse().unwrap());
    refused(request, 403, "origin_not_allowed").await;
    let mut request = with_bearer(&platform.url(0), &platform.token("alice"));
    request
        .headers_mut()
        .insert("Origin", "https://chat.example".parse().unwrap());
    let mut client = Client::open(request).await.unwrap();
    client.next_of(&["welcome"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_protocol_version_or_packing_not_served_is_refused_and_none_asked_means_version_1() {
    let platform = Platform::start(1).await;
    let token = platform.token("alice");
    for wrong in ["0", "3", "two", ""] {
        let url = format!("{}?protocol={wrong}", platform.url(0));
        refused(with_bearer(&url, &token), 400, "invalid_request").await;
    }
    let mut plain = Client::open(with_bearer(&platform.url(0), &token))
        .await
        .unwrap();
    let welcome = plain.next_of(&["welcome"]).await;
    assert_eq!(welcome["protocol"], 1);
    // The frame limit in force, derived from the message limit when not set.
    assert_eq!(
        welcome["limits"]["max_frame_bytes"],
        platform.config.limits.frame_bytes()
    );
    assert!(platform.config.limits.max_frame_bytes.is_none());
    let url = format!("{}?access_token={token}&protocol=2", platform.url(0));
    let mut newer = Client::open(url.into_client_request().unwrap())
        .await
        .unwrap();
    let welcome = newer.next_of(&["welcome"]).await;
    assert_eq!(welcome["protocol"], 2);
    assert_eq!(welcome.get("pack"), None, "packing is off unless asked for");

    // Packing: `pack=1` on version 2 only, and nothing but 0 or 1.
    for wrong in [
        "protocol=1&pack=1",
        "pack=1",
        "protocol=2&pack=2",
        "protocol=2&pack=yes",
    ] {
        let url = format!("{}?{wrong}", platform.url(0));
        refused(with_bearer(&url, &token), 400, "invalid_request").await;
    }
    let mut packed = Client::open(platform.request_with_query(0, "alice", "protocol=2&pack=1"))
        .await
        .unwrap();
    let welcome = packed.next_of(&["welcome"]).await;
    assert_eq!(
        (welcome["protocol"].clone(), welcome["pack"].clone()),
        (json!(2), json!(true))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_frames_and_commands_get_their_error_codes_and_append_nothing() {
    let platform = Platform::start(1).await;
    let (mut alice, mut bob, conversation) = platform.alice_and_bob().await;
    let max = platform.config.limits.max_message_bytes;
    let unknown_conversation = "0191d2c4-0000-7000-8000-000000000000";

    let cases: Vec<(String, &str, Option<&str>)> = vec![
        ("{not json".into(), "bad_frame", None),
        (json!(["not", "an", "object"]).to_string(), "bad_frame", None),
        (json!({"type": "teleport", "id": "t"}).to_string(), "unknown_frame_type", Some("t")),
        (json!({"type": "teleport", "id": "bad id!"}).to_string(), "unknown_frame_type", None),
        (json!({"id": "untyped"}).to_string(), "bad_frame", Some("untyped")),
        (json!({"type": 7, "id": "typed-7"}).to_string(), "bad_frame", Some("typed-7")),
        (json!({"type": "send", "id": "no-conv", "body": "x"}).to_string(), "bad_frame", Some("no-conv")),
        (json!({"type": "send", "id": "bad id!", "conversation": conversation, "body": "x"}).to_string(), "bad_frame", None),
        (json!({"type": "send", "id": "big", "conversation": conversation, "body": "x".repeat(max + 1)}).to_string(), "message_too_large", Some("big")),
        (json!({"type": "send", "id": "empty", "conversation": conversation, "body": "   "}).to_string(), "empty_message", Some("empty")),
        (json!({"type": "send", "id": "nowhere", "conversation": unknown_conversation, "body": "x"}).to_string(), "conversation_not_found", Some("nowhere")),
        (json!({"type": "create_direct", "id": "self", "peer": "alice"}).to_string(), "invalid_request", Some("self")),
    ];
    for (frame, code, id) in cases {
        alice.send_raw(Message::Text(frame.clone().into())).await;
        let error = alice.next_of(&["error"]).await;
        assert_eq!(error["code"], code, "for {frame}: {error}");
        assert_eq!(error["retryable"], false);
        assert!(!error["message"].as_str().unwrap().is_empty());
        match id {
            Some(id) => assert_eq!(error["id"], id),
            None => assert!(error.get("id").is_none()),
        }
    }

    let mut mallory = platform.connect(0, "mallory").await;
    mallory
        .send(json!({"type": "send", "id": "intrude", "conversation": conversation, "body": "hi"}))
        .await;
    let error = mallory.next_of(&["error"]).await;
    assert_eq!(error["code"], "not_member");
    assert_eq!(error["id"], "intrude");

    // The socket survives all of that and still works.
    alice
        .send(json!({"type": "ping", "id": "still-there"}))
        .await;
    assert_eq!(alice.next_of(&["pong"]).await["id"], "still-there");
    bob.expect_silence(Duration::from_millis(300)).await;
    assert_eq!(
        platform.log().await.len(),
        1,
        "only the conversation's creation is in the log"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn protocol_violations_close_with_rfc_6455_codes() {
    let platform = Platform::start(1).await;
    let max_frame = platform.config.limits.frame_bytes();

    let mut client = platform.connect(0, "alice").await;
    let oversized = json!({"type": "ping", "pad": "x".repeat(max_frame)}).to_string();
    client.send_raw(Message::Text(oversized.into())).await;
    assert_eq!(
        client.closed().await,
        Closed {
            code: 1009,
            reason: "frame too large".into()
        }
    );

    let mut client = platform.connect(0, "alice").await;
    client.send_raw(Message::Binary(vec![1, 2, 3].into())).await;
    assert_eq!(
        client.closed().await,
        Closed {
            code: 1003,
            reason: "only text frames are accepted".into()
        }
    );

    assert!(platform.log().await.is_empty());
}

/// A hand-made WebSocket client: completes the upgrade, then sends exactly the bytes a test
/// wants and never answers anything, not even pings (a library would answer those itself).
struct RawSocket {
    tcp: tokio::net::TcpStream,
    received: Vec<u8>,
}

/// What the server sent, frame by frame.
#[derive(Debug, Default)]
struct Seen {
    pings: usize,
    close: Option<(u16, String)>,
}

impl RawSocket {
    async fn open(platform: &Platform) -> RawSocket {
        use tokio::io::AsyncWriteExt;
        let mut tcp = tokio::net::TcpStream::connect(platform.gateways[0])
            .await
            .unwrap();
        let request = format!(
            "GET /ws HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\
             Authorization: Bearer {}\r\n\r\n",
            platform.token("alice")
        );
        tcp.write_all(request.as_bytes()).await.unwrap();
        RawSocket {
            tcp,
            received: Vec::new(),
        }
    }

    /// Send one final frame; `mask` as a client must, or not, as a broken client might.
    async fn send_frame(&mut self, opcode: u8, payload: &[u8], mask: bool) {
        use tokio::io::AsyncWriteExt;
        assert!(payload.len() < 126);
        let mut frame = vec![
            0x80 | opcode,
            payload.len() as u8 | if mask { 0x80 } else { 0 },
        ];
        let key = [0x12, 0x34, 0x56, 0x78];
        if mask {
            frame.extend_from_slice(&key);
            frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
        } else {
            frame.extend_from_slice(payload);
        }
        self.tcp.write_all(&frame).await.unwrap();
    }

    /// Read until the server's close frame.
    async fn until_close(&mut self) -> Seen {
        use tokio::io::AsyncReadExt;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        let mut buffer = [0u8; 4096];
        loop {
            let seen = self.parse();
            if seen.close.is_some() {
                return seen;
            }
            let read = tokio::time::timeout_at(deadline, self.tcp.read(&mut buffer))
                .await
                .expect("closed in time")
                .unwrap();
            assert!(read > 0, "connection ended without a close frame");
            self.received.extend_from_slice(&buffer[..read]);
        }
    }

    /// Server frames are unmasked: opcode in the low nibble of the first byte.
    fn parse(&self) -> Seen {
        let mut seen = Seen::default();
        let Some(head_end) = self.received.windows(4).position(|w| w == b"\r\n\r\n") else {
            return seen;
        };
        let mut frames = &self.received[head_end + 4..];
        while frames.len() >= 2 {
            let opcode = frames[0] & 0x0f;
            let (header, length) = match frames[1] & 0x7f {
                126 if frames.len() >= 4 => {
                    (4, usize::from(u16::from_be_bytes([frames[2], frames[3]])))
                }
                126 => break,
                short => (2, usize::from(short)),
            };
            if frames.len() < header + length {
                break;
            }
            let payload = &frames[header..header + length];
            match opcode {
                0x9 => seen.pings += 1,
                0x8 => {
                    let code = u16::from_be_bytes([payload[0], payload[1]]);
                    seen.close = Some((code, String::from_utf8_lossy(&payload[2..]).into_owned()));
                }
                _ => {}
            }
            frames = &frames[header + length..];
        }
        seen
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_utf8_and_unmasked_frames_close_the_socket() {
    let platform = Platform::start(1).await;

    let mut socket = RawSocket::open(&platform).await;
    socket
        .send_frame(0x1, &[b'{', 0xff, 0xfe, b'}'], true)
        .await;
    assert_eq!(
        socket.until_close().await.close,
        Some((1007, "text frame is not valid UTF-8".to_owned()))
    );

    let mut socket = RawSocket::open(&platform).await;
    socket.send_frame(0x1, br#"{"type":"ping"}"#, false).await;
    assert_eq!(
        socket.until_close().await.close,
        Some((1002, "protocol error".to_owned()))
    );
    assert!(platform.log().await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_sockets_are_pinged_and_closed() {
    let platform = Platform::start_with(1, |c| {
        c.gateway.ping_interval_secs = 1;
        c.gateway.idle_timeout_secs = 2;
    })
    .await;
    let seen = RawSocket::open(&platform).await.until_close().await;
    assert!(
        seen.pings >= 1,
        "the server pings before giving up: {seen:?}"
    );
    assert_eq!(seen.close, Some((1000, "idle timeout".to_owned())));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_gateway_refuses_new_sockets_as_retryable() {
    let platform = Platform::start_with(1, |c| c.gateway.max_connections = 1).await;
    // The start-up probe's socket may still hold the one place for a moment.
    let _first =
        support::eventually(|| async { platform.try_connect(0, "alice").await.ok() }).await;
    match Client::open(with_bearer(&platform.url(0), &platform.token("bob"))).await {
        Err(tungstenite::Error::Http(response)) => {
            assert_eq!(response.status().as_u16(), 503);
            let body: serde_json::Value =
                serde_json::from_slice(response.body().as_deref().unwrap_or_default()).unwrap();
            assert_eq!(body["code"], "unavailable");
            assert_eq!(body["retryable"], true);
        }
        other => panic!("expected a 503, got {:?}", other.map(|_| "a socket")),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_ends_when_its_token_expires() {
    let platform = Platform::start_with(1, |c| c.auth.leeway_secs = 0).await;
    let now = unix_millis() / 1000;
    let token = platform.token_with(SECRET, "alice", now, 2);
    let mut client = Client::open(with_bearer(&platform.url(0), &token))
        .await
        .unwrap();
    client.next_of(&["welcome"]).await;
    let closed = client.closed().await;
    assert_eq!(
        (closed.code, closed.reason.as_str()),
        (1008, "token expired")
    );
}
