//! `parley up`, as a user runs it: the real binary starts its own servers, prints where to
//! connect with a token that works, lets only its own origins open sockets from a browser,
//! and stops everything on SIGTERM.

use std::io::{BufRead, BufReader};
use std::process::{Child, ChildStdout, Command, Stdio};
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::{self, Message};

/// A running `parley up` and what its banner says.
struct Up {
    child: Child,
    /// The socket URL with alice's token.
    url: String,
    /// NATS's `host:port`.
    nats: String,
    /// Kept open: `parley up` must not find its stdout closed.
    _stdout: std::io::Lines<BufReader<ChildStdout>>,
    _dir: tempfile::TempDir,
}

/// How long a `parley up` gets to stop its servers after SIGTERM before it is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);

impl Drop for Up {
    // SIGTERM, so that `parley up` stops the servers it started: killed outright, it would
    // leave them running after the test.
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = Command::new("kill")
                .args(["-TERM", &self.child.id().to_string()])
                .status();
            let deadline = std::time::Instant::now() + STOP_TIMEOUT;
            while matches!(self.child.try_wait(), Ok(None)) && std::time::Instant::now() < deadline
            {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn parley_up() -> Up {
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_parley"))
        .arg("up")
        .env("PARLEY_GATEWAY__LISTEN", "127.0.0.1:0")
        .env("PARLEY_ADMIN__LISTEN", "127.0.0.1:0")
        .env("PARLEY_LOCAL__DATA_DIR", dir.path())
        .env(
            "PARLEY_PROJECTOR__STORE__PATH",
            dir.path().join("conversations.db"),
        )
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let (mut url, mut nats, mut token) = (None, None, None);
    while token.is_none() {
        let line = lines.next().expect("banner line").unwrap();
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["WebSocket", address] => url = Some(address.replace("<token>", "")),
            ["NATS", address, ..] => nats = Some(address.trim_start_matches("nats://").to_owned()),
            ["Token", "for", "alice", ..] => {
                token = Some(lines.next().unwrap().unwrap().trim().to_owned())
            }
            _ => {}
        }
    }
    let url = format!(
        "{}{}",
        url.expect("banner names the socket URL"),
        token.unwrap()
    );
    Up {
        child,
        url,
        nats: nats.expect("banner names NATS"),
        _stdout: lines,
        _dir: dir,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parley_up_serves_a_chat_and_stops_cleanly_on_sigterm() {
    let mut up = parley_up();
    let url = up.url.clone();
    let (mut socket, _) = tokio_tungstenite::connect_async(url)
        .await
        .expect("the printed URL and token work");
    let welcome = socket.next().await.unwrap().unwrap();
    assert!(
        welcome.to_text().unwrap().contains(r#""user":"alice""#),
        "{welcome}"
    );
    // A command only a handler answers proves the whole path is up.
    socket
        .send(Message::Text(
            r#"{"type":"create_direct","id":"x","peer":"alice"}"#.into(),
        ))
        .await
        .unwrap();
    let reply = tokio::time::timeout(Duration::from_secs(10), socket.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(
        reply.to_text().unwrap().contains("invalid_request"),
        "{reply}"
    );

    let term = Command::new("kill")
        .args(["-TERM", &up.child.id().to_string()])
        .status()
        .unwrap();
    assert!(term.success());
    let closing = tokio::time::timeout(Duration::from_secs(10), socket.next())
        .await
        .unwrap();
    match closing {
        Some(Ok(Message::Close(Some(frame)))) => assert_eq!(
            (u16::from(frame.code), frame.reason.as_str()),
            (1001, "server shutting down")
        ),
        other => panic!("expected a 1001 close, got {other:?}"),
    }
    let status = up.child.wait().unwrap();
    assert!(status.success(), "parley up exits cleanly: {status}");
    assert!(
        std::net::TcpStream::connect(&up.nats).is_err(),
        "the nats-server parley up started is gone"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parley_up_lets_only_its_own_origins_open_sockets() {
    let up = parley_up();
    let port = up
        .url
        .trim_start_matches("ws://")
        .split_once('/')
        .and_then(|(address, _)| address.rsplit_once(':'))
        .map(|(_, port)| port.to_owned())
        .expect("a port in the URL");
    let with_origin = |origin: Option<&str>| {
        let mut request = up.url.as_str().into_client_request().unwrap();
        if let Some(origin) = origin {
            request
                .headers_mut()
                .insert("Origin", origin.parse().unwrap());
        }
        request
    };

    match tokio_tungstenite::connect_async(with_origin(Some("https://evil.example"))).await {
        Err(tungstenite::Error::Http(response)) => {
            assert_eq!(response.status().as_u16(), 403);
            let body: serde_json::Value =
                serde_json::from_slice(response.body().as_deref().unwrap_or_default()).unwrap();
            assert_eq!(body["code"], "origin_not_allowed", "{body}");
        }
        Err(other) => panic!("expected a 403 for a foreign origin, got {other}"),
        Ok(_) => panic!("a socket was opened from a foreign origin"),
    }
    for origin in [
        Some(format!("http://127.0.0.1:{port}")),
        Some(format!("http://localhost:{port}")),
        None,
    ] {
        let (mut socket, _) = tokio_tungstenite::connect_async(with_origin(origin.as_deref()))
            .await
            .unwrap_or_else(|e| panic!("origin {origin:?} refused: {e}"));
        let welcome = socket.next().await.unwrap().unwrap();
        assert!(welcome.to_text().unwrap().contains("welcome"), "{welcome}");
    }
}
