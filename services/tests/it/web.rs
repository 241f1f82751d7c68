//! The gateway's HTTP side besides `/ws`: the web chat's files from `gateway.web_dir`, and
//! `parley up`'s development tokens, which only it can turn on.

use crate::support;

use futures::StreamExt;
use parley_services::config::Config;
use serde_json::Value;
use support::{Platform, http_get, http_request};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_web_dir_is_served_by_plain_file_names_and_nothing_else() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("index.html"),
        "<!doctype html><title>chat</title>",
    )
    .unwrap();
    std::fs::write(dir.path().join("app.js"), "console.log(1)").unwrap();
    std::fs::write(dir.path().join(".secret"), "hidden").unwrap();
    let web = dir.path().to_owned();
    let platform = Platform::start_with(1, move |config| config.gateway.web_dir = Some(web)).await;
    let gateway = platform.gateways[0];

    assert_eq!(
        http_get(gateway, "/").await,
        (200, "<!doctype html><title>chat</title>".to_owned())
    );
    assert_eq!(
        http_get(gateway, "/app.js").await,
        (200, "console.log(1)".to_owned())
    );
    for refused in [
        "/.secret",
        "/missing.js",
        "/..%2Fapp.js",
        "/sub/app.js",
        "/dev/token",
    ] {
        assert_eq!(http_get(gateway, refused).await.0, 404, "{refused}");
    }
    // No development tokens unless parley up made its own secret.
    let (status, _) = http_request(
        gateway,
        "POST",
        "/dev/token",
        &[("Content-Type", "application/json")],
        r#"{"user":"alice"}"#,
    )
    .await;
    assert_eq!(status, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_development_token_opens_a_socket_but_not_for_a_foreign_page_or_a_bad_name() {
    let platform = Platform::start_with(1, |config| {
        config.gateway.dev_tokens = true;
        config.gateway.allowed_origins = vec!["http://127.0.0.1:1".into()];
    })
    .await;
    let gateway = platform.gateways[0];
    let json = [("Content-Type", "application/json")];

    let (status, body) =
        http_request(gateway, "POST", "/dev/token", &json, r#"{"user":"dora"}"#).await;
    assert_eq!(status, 200, "{body}");
    let answer: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(answer["user"], "dora");
    let url = format!(
        "ws://{gateway}/ws?access_token={}",
        answer["token"].as_str().unwrap()
    );
    let (mut socket, _) = tokio_tungstenite::connect_async(url).await.unwrap();
    let welcome: Value = match socket.next().await {
        Some(Ok(tungstenite::Message::Text(text))) => serde_json::from_str(&text).unwrap(),
        other => panic!("expected the welcome frame, got {other:?}"),
    };
    assert_eq!(welcome["type"], "welcome", "{welcome}");
    assert_eq!(welcome["user"], "dora", "{welcome}");

    let foreign = [
        ("Content-Type", "application/json"),
        ("Origin", "https://evil.example"),
    ];
    let (status, body) = http_request(
        gateway,
        "POST",
        "/dev/token",
        &foreign,
        r#"{"user":"dora"}"#,
    )
    .await;
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("origin_not_allowed"), "{body}");
    let (status, body) = http_request(
        gateway,
        "POST",
        "/dev/token",
        &json,
        r#"{"user":"has space"}"#,
    )
    .await;
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("invalid_request"), "{body}");
    let (status, _) = http_request(gateway, "POST", "/dev/token", &json, "{").await;
    assert_eq!(status / 100, 4);
}

#[test]
fn development_tokens_cannot_be_configured_and_a_web_dir_needs_its_page() {
    let err = Config::from_toml("[gateway]\ndev_tokens = true\n").unwrap_err();
    assert!(err.to_string().contains("dev_tokens"), "{err}");
    let empty = tempfile::tempdir().unwrap();
    let err = Config::from_toml(&format!(
        "[gateway]\nweb_dir = \"{}\"\n",
        empty.path().display()
    ))
    .unwrap_err();
    assert!(
        err.to_string()
            .contains("gateway.web_dir must be a directory holding index.html"),
        "{err}"
    );
}
