//! `parley up`, as a user runs it: the real binary starts its own servers, prints where to
//! connect with a token that works, and stops everything on SIGTERM.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parley_up_serves_a_chat_and_stops_cleanly_on_sigterm() {
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
    let nats = nats.expect("banner names NATS");

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
        .args(["-TERM", &child.id().to_string()])
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
    let status = tokio::task::spawn_blocking(move || child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success(), "parley up exits cleanly: {status}");
    assert!(
        std::net::TcpStream::connect(&nats).is_err(),
        "the nats-server parley up started is gone"
    );
}
