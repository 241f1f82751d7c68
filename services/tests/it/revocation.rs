//! Revoked tokens: a user's live sockets on every gateway closed with 1008 `token revoked`
//! and their tokens refused at the upgrade, while a token issued after the revocation
//! works; one token revoked by its `jti` with `parley revoke --token`.

use crate::support;

use std::process::Command;
use std::time::Instant;

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use parley_events::UserId;
use parley_services::revocation::{self, Revocation};
use parley_services::unix_millis;
use serde_json::json;
use support::{Client, Closed, Platform, SECRET};
use tokio_tungstenite::tungstenite::{self, client::IntoClientRequest};

fn with_bearer(url: &str, token: &str) -> tungstenite::handshake::client::Request {
    let mut request = url.into_client_request().unwrap();
    request
        .headers_mut()
        .insert("Authorization", format!("Bearer {token}").parse().unwrap());
    request
}

async fn welcomed(url: &str, token: &str) -> Client {
    let mut client = Client::open(with_bearer(url, token))
        .await
        .expect("the upgrade is accepted");
    client.next_of(&["welcome"]).await;
    client
}

async fn refused_as_revoked(url: &str, token: &str) {
    match Client::open(with_bearer(url, token)).await {
        Err(tungstenite::Error::Http(response)) => {
            assert_eq!(response.status().as_u16(), 401);
            let body: serde_json::Value =
                serde_json::from_slice(response.body().as_deref().unwrap_or_default()).unwrap();
            assert_eq!(body["code"], "token_revoked", "{body}");
            assert_eq!(body["retryable"], false);
        }
        Err(other) => panic!("expected an HTTP refusal, got {other}"),
        Ok(_) => panic!("expected the upgrade to be refused"),
    }
}

/// `parley revoke` with `args` against the platform's NATS; its exit code and output.
fn parley_revoke(platform: &Platform, args: &[&str]) -> (Option<i32>, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_parley"))
        .arg("revoke")
        .args(args)
        .env(
            "PARLEY_NATS__URL",
            platform.config.nats.url.as_ref().unwrap().expose(),
        )
        .output()
        .expect("parley runs");
    let text = String::from_utf8_lossy(&output.stdout).into_owned()
        + &String::from_utf8_lossy(&output.stderr);
    (output.status.code(), text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_users_sockets_close_on_every_gateway_and_a_later_token_works() {
    let platform = Platform::start(2).await;
    let old_token = platform.token("alice");
    let mut on_first = welcomed(&platform.url(0), &old_token).await;
    let mut on_second = welcomed(&platform.url(1), &old_token).await;
    let mut bob = platform.connect(0, "bob").await;

    let store = revocation::bucket(&platform.jetstream().await, &platform.config)
        .await
        .unwrap();
    let revoked_at = unix_millis() / 1000;
    let started = Instant::now();
    revocation::revoke(
        &store,
        &Revocation::User(UserId::parse("alice").unwrap()),
        revoked_at,
    )
    .await
    .unwrap();
    for (gateway, socket) in [(0, &mut on_first), (1, &mut on_second)] {
        assert_eq!(
            socket.closed().await,
            Closed {
                code: 1008,
                reason: "token revoked".into()
            }
        );
        // A figure, not an assertion: the brief's target is within one second.
        println!(
            "gateway {gateway}: alice's socket closed {:?} after the revocation was put",
            started.elapsed()
        );
    }

    bob.send(json!({"type": "ping", "id": "still-here"})).await;
    assert_eq!(bob.reply_to("still-here").await["type"], "pong");
    for gateway in 0..2 {
        refused_as_revoked(&platform.url(gateway), &old_token).await;
    }
    // Issued in a later second than the revocation: not covered.
    let fresh = platform.token_with(SECRET, "alice", revoked_at + 1, 3600);
    let mut again = welcomed(&platform.url(1), &fresh).await;
    again.send(json!({"type": "ping", "id": "back"})).await;
    assert_eq!(again.reply_to("back").await["type"], "pong");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parley_revoke_token_closes_that_tokens_socket_and_refuses_it_at_the_upgrade() {
    let platform = Platform::start(1).await;
    let url = platform.url(0);
    let now = unix_millis() / 1000;
    let with_jti = jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &json!({"sub": "carol", "iat": now, "exp": now + 3600, "jti": "session-7"}),
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap();
    let mut carol = welcomed(&url, &with_jti).await;
    let mut other_device = platform.connect(0, "carol").await;

    let (code, output) = parley_revoke(&platform, &["--token", "session-7"]);
    assert_eq!(code, Some(0), "{output}");
    assert_eq!(
        carol.closed().await,
        Closed {
            code: 1008,
            reason: "token revoked".into()
        }
    );
    refused_as_revoked(&url, &with_jti).await;
    // Carol's other token, without that jti, is not covered.
    other_device.send(json!({"type": "ping", "id": "p"})).await;
    assert_eq!(other_device.reply_to("p").await["type"], "pong");

    let (code, output) = parley_revoke(&platform, &[]);
    assert_eq!(
        code,
        Some(2),
        "no --user or --token is a usage error: {output}"
    );
    let (code, output) = parley_revoke(&platform, &["--user", "a", "--token", "b"]);
    assert_eq!(code, Some(2), "both at once is a usage error: {output}");
    let (code, output) = parley_revoke(&platform, &["--help"]);
    assert_eq!(code, Some(0));
    assert!(
        output.contains("--user") && output.contains("--token"),
        "{output}"
    );
}
