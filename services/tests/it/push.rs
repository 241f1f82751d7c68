//! Push notifications: messages to members with no live socket become POSTs to a real HTTP
//! server this test starts, retried, dead-lettered, listed and redriven with `parley push`.

use crate::support;

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use parley_events::subjects::{LOG_STREAM, PUSH_CONSUMER};
use parley_events::{ConversationId, RecordedEvent};
use parley_services::config::{Config, Secret};
use serde_json::{Value, json};
use support::{Client, Platform, eventually, eventually_within, http_get};

/// One POST the webhook received, and what it answered.
#[derive(Debug, Clone)]
struct Received {
    headers: HeaderMap,
    body: Value,
    status: u16,
}

#[derive(Default)]
struct HookState {
    received: Vec<Received>,
    /// Statuses answered next, in order; then `otherwise`.
    script: VecDeque<u16>,
    otherwise: u16,
}

/// The operator's push gateway: records every POST and answers what the test says.
#[derive(Clone)]
struct Hook {
    state: Arc<Mutex<HookState>>,
    address: SocketAddr,
}

impl Hook {
    async fn start(otherwise: u16) -> Hook {
        let state = Arc::new(Mutex::new(HookState {
            otherwise,
            ..Default::default()
        }));
        let app = axum::Router::new()
            .route("/push", axum::routing::post(receive))
            .with_state(Arc::clone(&state));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        Hook { state, address }
    }

    fn url(&self) -> String {
        format!("http://{}/push", self.address)
    }

    fn answer(&self, script: &[u16], otherwise: u16) {
        let mut state = self.state.lock().unwrap();
        state.script = script.iter().copied().collect();
        state.otherwise = otherwise;
    }

    fn received(&self) -> Vec<Received> {
        self.state.lock().unwrap().received.clone()
    }
}

async fn receive(
    State(state): State<Arc<Mutex<HookState>>>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> StatusCode {
    let mut state = state.lock().unwrap();
    let status = state.script.pop_front().unwrap_or(state.otherwise);
    state.received.push(Received {
        headers,
        body: serde_json::from_slice(&body).unwrap_or(Value::Null),
        status,
    });
    StatusCode::from_u16(status).unwrap()
}

/// Push on, to `hook`, with short backoffs so retries take milliseconds.
fn with_push(hook: &Hook, max_attempts: u32) -> impl FnOnce(&mut Config) {
    let url = hook.url();
    move |config| {
        config.push.webhook_url = Some(url);
        config.push.auth_header = Some(Secret::new("Bearer hook-secret"));
        config.push.max_attempts = max_attempts;
        config.push.initial_backoff_ms = 10;
        config.push.max_backoff_ms = 50;
        config.push.preview_chars = 5;
    }
}

/// The push consumer's acknowledgement floor: every event up to it has been notified (or
/// dead-lettered). Waits for the consumer to exist.
async fn push_floor(platform: &Platform) -> u64 {
    let js = platform.jetstream().await;
    eventually(|| async {
        let stream = js.get_stream(LOG_STREAM).await.ok()?;
        let info = stream.consumer_info(PUSH_CONSUMER).await.ok()?;
        Some(info.ack_floor.stream_sequence)
    })
    .await
}

/// Wait until the push worker has finished with every event up to `seq`.
async fn notified_up_to(platform: &Platform, seq: u64) {
    eventually(|| async { (push_floor(platform).await >= seq).then_some(()) }).await;
}

/// `alice` posts `body` to `conversation`; the event as logged.
async fn post(
    platform: &Platform,
    alice: &mut Client,
    conversation: ConversationId,
    id: &str,
    body: &str,
) -> RecordedEvent {
    alice
        .send(json!({"type": "send", "id": id, "conversation": conversation, "body": body}))
        .await;
    let ack = alice.reply_to(id).await;
    assert_eq!(ack["type"], "ack", "{ack}");
    platform
        .log()
        .await
        .into_iter()
        .rev()
        .find(|e| matches!(&e.envelope.event, parley_events::Event::MessagePosted(p) if p.body == body))
        .expect("the message is in the log")
}

/// The key every POST of `event`'s notification to `recipient` carries.
fn key(event: &RecordedEvent, recipient: &str) -> String {
    uuid::Uuid::new_v5(event.envelope.id.as_uuid(), recipient.as_bytes()).to_string()
}

/// Alice's direct conversation with bob, who never connects.
async fn direct_with_offline_bob(alice: &mut Client) -> ConversationId {
    alice
        .send(json!({"type": "create_direct", "id": "dm", "peer": "bob"}))
        .await;
    let ack = alice.reply_to("dm").await;
    assert_eq!(ack["type"], "ack", "{ack}");
    ack["conversation"].as_str().unwrap().parse().unwrap()
}

/// `parley push` with `args` against the platform; exit code, stdout, stderr.
async fn parley_push(platform: &Platform, hook: &Hook, args: &[&str]) -> (i32, String, String) {
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_parley"))
        .arg("push")
        .args(args)
        .env(
            "PARLEY_NATS__URL",
            platform.config.nats.url.as_ref().unwrap().expose(),
        )
        .env("PARLEY_PUSH__WEBHOOK_URL", hook.url())
        .env("PARLEY_PUSH__INITIAL_BACKOFF_MS", "10")
        .env("PARLEY_PUSH__MAX_BACKOFF_MS", "50")
        .output()
        .await
        .expect("parley runs");
    (
        output.status.code().expect("parley exits"),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

async fn dead_letters(platform: &Platform, hook: &Hook) -> Vec<Value> {
    let (code, stdout, stderr) = parley_push(platform, hook, &["dead-letters", "--json"]).await;
    assert_eq!(code, 0, "{stderr}");
    serde_json::from_str::<Vec<Value>>(&stdout).expect("a JSON array")
}

/// The value of the counter `name` with `labels` on the projector's `/metrics`, 0 if absent.
async fn metric(platform: &Platform, name_and_labels: &str) -> f64 {
    let projector = *platform.admin_addresses().last().unwrap();
    let (_, text) = http_get(projector, "/metrics").await;
    text.lines()
        .find_map(|line| line.strip_prefix(name_and_labels)?.trim().parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_notifies_the_offline_member_only() {
    let hook = Hook::start(200).await;
    let platform = Platform::start_with(1, with_push(&hook, 3)).await;
    push_floor(&platform).await;
    let mut alice = platform.connect(0, "alice").await;
    let _bob = platform.connect(0, "bob").await;
    eventually(|| async { platform.presence("bob").await.online().then_some(()) }).await;
    alice
        .send(json!({"type": "create_group", "id": "g", "title": "team", "members": ["bob", "carol"]}))
        .await;
    let group: ConversationId = alice.reply_to("g").await["conversation"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();

    let event = post(&platform, &mut alice, group, "m1", "hello carol").await;
    notified_up_to(&platform, event.seq).await;
    let received = hook.received();
    assert_eq!(received.len(), 1, "only carol is offline: {received:?}");
    let Received {
        headers,
        body,
        status,
    } = &received[0];
    assert_eq!(*status, 200);
    assert_eq!(
        *body,
        json!({
            "event_id": event.envelope.id.to_string(),
            "seq": event.seq,
            "conversation": group.to_string(),
            "sender": "alice",
            "recipient": "carol",
            "preview": "hello",
            "sent_at": event.envelope.at,
        })
    );
    assert_eq!(headers["content-type"], "application/json");
    assert_eq!(headers["authorization"], "Bearer hook-secret");
    assert_eq!(headers["idempotency-key"], key(&event, "carol").as_str());
    assert!(dead_letters(&platform, &hook).await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_webhook_is_retried_under_the_same_key_until_it_takes_the_notification() {
    let hook = Hook::start(200).await;
    let platform = Platform::start_with(1, with_push(&hook, 5)).await;
    push_floor(&platform).await;
    let mut alice = platform.connect(0, "alice").await;
    let direct = direct_with_offline_bob(&mut alice).await;
    let retries_before = metric(&platform, "parley_push_retries_total").await;

    hook.answer(&[503, 503], 200);
    let event = post(&platform, &mut alice, direct, "m1", "are you there?").await;
    notified_up_to(&platform, event.seq).await;
    let received = hook.received();
    let statuses: Vec<u16> = received.iter().map(|r| r.status).collect();
    assert_eq!(
        statuses,
        [503, 503, 200],
        "delivered once, after two failures"
    );
    for r in &received {
        assert_eq!(r.headers["idempotency-key"], key(&event, "bob").as_str());
        assert_eq!(r.body["recipient"], "bob");
    }
    assert!(
        metric(&platform, "parley_push_retries_total").await >= retries_before + 2.0,
        "the two retries are counted"
    );
    assert!(dead_letters(&platform, &hook).await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_notifications_are_dead_lettered_listed_and_redriven() {
    let hook = Hook::start(503).await;
    let platform = Platform::start_with(1, with_push(&hook, 3)).await;
    push_floor(&platform).await;
    let mut alice = platform.connect(0, "alice").await;
    let direct = direct_with_offline_bob(&mut alice).await;

    // Failing past max_attempts, then refused outright.
    let failing = post(&platform, &mut alice, direct, "m1", "first").await;
    notified_up_to(&platform, failing.seq).await;
    hook.answer(&[400], 503);
    let refused = post(&platform, &mut alice, direct, "m2", "second").await;
    notified_up_to(&platform, refused.seq).await;
    assert_eq!(hook.received().len(), 4, "three attempts, then one");

    let letters = dead_letters(&platform, &hook).await;
    assert_eq!(letters.len(), 2, "{letters:?}");
    assert_eq!(
        letters[0]["notification"]["event_id"],
        failing.envelope.id.to_string()
    );
    assert_eq!(letters[0]["attempts"], 3);
    assert!(
        letters[0]["error"]
            .as_str()
            .unwrap()
            .starts_with("HTTP 503"),
        "{letters:?}"
    );
    assert_eq!(letters[1]["notification"]["recipient"], "bob");
    assert_eq!(letters[1]["attempts"], 1);
    assert!(
        letters[1]["error"]
            .as_str()
            .unwrap()
            .starts_with("HTTP 400"),
        "{letters:?}"
    );
    let (code, table, _) = parley_push(&platform, &hook, &["dead-letters"]).await;
    assert_eq!(code, 0);
    assert!(
        table.contains("HTTP 400") && table.contains("bob"),
        "{table}"
    );

    let (code, _, stderr) = parley_push(&platform, &hook, &["redrive", "--seq", "999"]).await;
    assert_eq!(code, 2, "no such dead letter: {stderr}");
    assert!(
        stderr.contains("no dead letter at sequence 999"),
        "{stderr}"
    );

    // Still refused: the letter stays, with its attempts added up.
    hook.answer(&[400], 503);
    let seq = letters[1]["seq"].as_u64().unwrap().to_string();
    let (code, stdout, _) = parley_push(&platform, &hook, &["redrive", "--seq", &seq]).await;
    assert_eq!(code, 1, "{stdout}");
    let letters = dead_letters(&platform, &hook).await;
    assert_eq!(letters.len(), 2, "{letters:?}");
    assert_eq!(letters[1]["attempts"], 2);

    // Fixed: everything goes out under its original key, and the stream empties.
    hook.answer(&[], 200);
    let before = hook.received().len();
    let (code, stdout, stderr) = parley_push(&platform, &hook, &["redrive", "--all"]).await;
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert!(stdout.contains("2 delivered, 0 refused again"), "{stdout}");
    let redriven: Vec<String> = hook.received()[before..]
        .iter()
        .map(|r| r.headers["idempotency-key"].to_str().unwrap().to_owned())
        .collect();
    assert_eq!(redriven, [key(&failing, "bob"), key(&refused, "bob")]);
    assert!(dead_letters(&platform, &hook).await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_projector_restart_loses_no_notification_and_keeps_its_key() {
    let hook = Hook::start(503).await;
    let mut platform = Platform::start_with(1, with_push(&hook, 100)).await;
    push_floor(&platform).await;
    let mut alice = platform.connect(0, "alice").await;
    let direct = direct_with_offline_bob(&mut alice).await;

    // Stopped while retrying the first; the second is posted while no projector runs.
    let first = post(&platform, &mut alice, direct, "m1", "first").await;
    eventually(|| async { (hook.received().len() >= 2).then_some(()) }).await;
    platform.stop_projector().await;
    hook.answer(&[], 200);
    let second = post(&platform, &mut alice, direct, "m2", "second").await;
    platform.start_projector().await;
    eventually_within(Duration::from_secs(30), || async {
        (push_floor(&platform).await >= second.seq).then_some(())
    })
    .await;

    let received = hook.received();
    let delivered: Vec<&str> = received
        .iter()
        .filter(|r| r.status == 200)
        .map(|r| r.headers["idempotency-key"].to_str().unwrap())
        .collect();
    assert!(
        delivered.contains(&key(&first, "bob").as_str()),
        "{received:?}"
    );
    assert!(
        delivered.contains(&key(&second, "bob").as_str()),
        "{received:?}"
    );
    let keys = [key(&first, "bob"), key(&second, "bob")];
    for r in &received {
        let key = r.headers["idempotency-key"].to_str().unwrap();
        assert!(
            keys.iter().any(|k| k == key),
            "only these two notifications: {key}"
        );
    }
    assert!(dead_letters(&platform, &hook).await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_push_settings_and_arguments_get_clear_errors() {
    let hook = Hook::start(200).await;
    let platform = Platform::start(0).await;
    for (key, value, expected) in [
        (
            "PARLEY_PUSH__WEBHOOK_URL",
            "ftp://push.example",
            "push.webhook_url must be an http:// or https:// URL",
        ),
        (
            "PARLEY_PUSH__MAX_ATTEMPTS",
            "0",
            "push.max_attempts must be between 1 and 100",
        ),
    ] {
        let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_parley"))
            .args(["push", "redrive", "--all"])
            .env(key, value)
            .output()
            .await
            .unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success());
        assert!(stderr.contains(expected), "{stderr}");
    }
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_parley"))
        .args(["push", "redrive", "--all"])
        .env(
            "PARLEY_NATS__URL",
            platform.config.nats.url.as_ref().unwrap().expose(),
        )
        .output()
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("push.webhook_url is not configured"),
        "{stderr}"
    );
    let (code, _, stderr) = parley_push(&platform, &hook, &["redrive"]).await;
    assert_eq!(code, 2, "--all or --seq is required: {stderr}");
    let (code, _, stderr) = parley_push(&platform, &hook, &["dead-letters", "--limit", "0"]).await;
    assert_eq!(code, 2, "{stderr}");
    let (code, stdout, _) = parley_push(&platform, &hook, &["dead-letters"]).await;
    assert_eq!(code, 0);
    assert_eq!(stdout.trim(), "no dead letters");
}
