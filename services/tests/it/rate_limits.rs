//! Rate limits through a real gateway: requests past a user's or an address's bucket get
//! `rate_limited` with a wait that works and append nothing, a socket that keeps sending
//! while limited is closed 1008, upgrades past an address's bucket get HTTP 429 with
//! `Retry-After`, loopback is spared the per-address limits by default (the load-test
//! harness and a local reverse proxy connect from there), and limits set wrong stop the
//! `parley` binary at start.

use crate::support;

use std::process::Command;
use std::time::Duration;

use serde_json::{Value, json};
use support::{Client, Platform, eventually, http_get};
use tokio_tungstenite::tungstenite;

/// Send `count` pings on `client` at once; their answers by id, in order.
async fn pipelined_pings(client: &mut Client, prefix: &str, count: usize) -> Vec<Value> {
    let ids: Vec<String> = (0..count).map(|i| format!("{prefix}{i}")).collect();
    client
        .send_pipelined(ids.iter().map(|id| json!({"type": "ping", "id": id})))
        .await;
    let mut answers = Vec::new();
    for id in &ids {
        answers.push(client.reply_to(id).await);
    }
    answers
}

/// Wait until some gateway of `platform` reports refusals by the limit of `scope` (the
/// metrics are shared by every test of this process: only their presence is telling).
async fn counted(platform: &Platform, scope: &str) {
    let line = format!("parley_gateway_rate_limited_total{{scope=\"{scope}\"}}");
    let admin = platform.admin_addresses()[0];
    eventually(|| async {
        http_get(admin, "/metrics")
            .await
            .1
            .contains(&line)
            .then_some(())
    })
    .await;
}

/// The `retry_after_ms` of a `rate_limited` error, checked for the fields every such error
/// has; `None` for any other frame.
fn rate_limited(frame: &Value) -> Option<u64> {
    if frame["code"] != "rate_limited" {
        return None;
    }
    assert_eq!(frame["type"], "error", "{frame}");
    assert_eq!(frame["retryable"], true, "{frame}");
    let wait = frame["retry_after_ms"].as_u64().expect("retry_after_ms");
    assert!(wait >= 1, "{frame}");
    Some(wait)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_beyond_a_users_limit_is_refused_with_a_wait_that_works() {
    let platform = Platform::start_with(1, |config| {
        let limits = &mut config.gateway.rate_limits;
        limits.user_per_sec = 1;
        limits.user_burst = 3;
    })
    .await;
    let mut alice = platform.connect(0, "alice").await;
    let mut bob = platform.connect(0, "bob").await;
    // Bob's request, so alice's budget is whole.
    let conversation = platform.direct(&mut bob, &mut alice, "alice").await;

    let ids: Vec<String> = (0..6).map(|i| format!("s{i}")).collect();
    alice
        .send_pipelined(
            ids.iter().map(
                |id| json!({"type": "send", "id": id, "conversation": conversation, "body": id}),
            ),
        )
        .await;
    let mut acked = Vec::new();
    let mut limited = Vec::new();
    for id in &ids {
        let reply = alice.reply_to(id).await;
        match rate_limited(&reply) {
            Some(wait) => limited.push((id.clone(), wait)),
            None => {
                assert_eq!(reply["type"], "ack", "{reply}");
                acked.push(id.clone());
            }
        }
    }
    // Six requests at once against a burst of three refilled at one a second: three pass,
    // and at most one more if the machine took a second over the six.
    assert!((3..=4).contains(&acked.len()), "acked {acked:?}");
    let (last, wait) = limited.last().cloned().expect("some sends were limited");
    assert!(
        wait <= 1000,
        "one token at 1/s comes within a second: {wait}"
    );
    platform.projected().await;
    assert_eq!(
        platform.posted_bodies().await,
        acked,
        "a limited send appends nothing"
    );

    tokio::time::sleep(Duration::from_millis(wait)).await;
    alice
        .send(json!({"type": "send", "id": last, "conversation": conversation, "body": last}))
        .await;
    let reply = alice.reply_to(&last).await;
    assert_eq!(
        reply["type"], "ack",
        "after the wait the same request passes: {reply}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_address_shares_one_budget_over_its_users_unless_exempt() {
    let platform = Platform::start_with(1, |config| {
        let limits = &mut config.gateway.rate_limits;
        limits.exempt_networks.clear();
        limits.ip_per_sec = 1;
        limits.ip_burst = 4;
    })
    .await;
    let mut alice = platform.connect(0, "alice").await;
    let mut bob = platform.connect(0, "bob").await;
    let answers = [
        pipelined_pings(&mut alice, "a", 4).await,
        pipelined_pings(&mut bob, "b", 4).await,
    ]
    .concat();
    let refused = answers.iter().filter_map(rate_limited).count();
    // Eight requests from one address with a burst of four (of which the platform's
    // readiness probe may have taken one): four or five refused, one less for a token
    // refilled (one a second) while they were answered.
    assert!(
        (3..=5).contains(&refused),
        "{refused} refused of {answers:?}"
    );
    for answer in &answers {
        assert!(answer["type"] == "pong" || rate_limited(answer).is_some());
    }
    // Bob had sent nothing before: what held him back is alice's use of the address.
    assert!(rate_limited(&answers[7]).is_some(), "{answers:?}");
    counted(&platform, "ip").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_socket_that_keeps_sending_while_limited_is_closed_1008() {
    let platform = Platform::start_with(1, |config| {
        let limits = &mut config.gateway.rate_limits;
        limits.user_per_sec = 1;
        limits.user_burst = 2;
        limits.flood_limited_requests = 10;
    })
    .await;
    let mut flooder = platform.connect(0, "mallory").await;
    let mut calm = platform.connect(0, "alice").await;
    flooder
        .send_pipelined((0..50).map(|i| json!({"type": "ping", "id": format!("p{i}")})))
        .await;
    let mut pongs = 0;
    let mut refused = 0;
    let closed = loop {
        match flooder.next_or_close().await {
            Ok(frame) if frame["type"] == "pong" => pongs += 1,
            Ok(frame) => {
                rate_limited(&frame).expect("only pongs and rate_limited");
                refused += 1;
            }
            Err(closed) => break closed,
        }
    };
    assert_eq!(
        (closed.code, closed.reason.as_str()),
        (1008, "rate limit: too many requests while limited")
    );
    // The answers still queued when the socket starts closing are dropped with it.
    assert!(pongs <= 3, "{pongs} pongs");
    assert!(refused <= 9, "the tenth refusal closes instead: {refused}");

    // Another user on the same address is not held back.
    assert_eq!(pipelined_pings(&mut calm, "c", 2).await[1]["type"], "pong");
}

/// Try an upgrade; `Ok` when accepted, else the refusal's status, `Retry-After` and body.
async fn upgrade(platform: &Platform, user: &str) -> Result<Client, (u16, Option<u64>, Value)> {
    match platform.try_connect(0, user).await {
        Ok(client) => Ok(client),
        Err(tungstenite::Error::Http(response)) => {
            let retry_after = response
                .headers()
                .get("retry-after")
                .map(|v| v.to_str().unwrap().parse().unwrap());
            let body = serde_json::from_slice(response.body().as_deref().unwrap_or_default())
                .expect("a JSON body");
            Err((response.status().as_u16(), retry_after, body))
        }
        Err(other) => panic!("expected an HTTP refusal, got {other}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upgrades_past_an_addresss_limit_get_429_with_retry_after() {
    let platform = Platform::start_with(1, |config| {
        let limits = &mut config.gateway.rate_limits;
        limits.exempt_networks.clear();
        limits.upgrades_per_ip_per_sec = 1;
        limits.upgrades_per_ip_burst = 3;
    })
    .await;
    let mut sockets = Vec::new();
    let refusal = loop {
        match upgrade(&platform, "alice").await {
            Ok(client) => sockets.push(client),
            Err(refusal) => break refusal,
        }
        assert!(sockets.len() <= 5, "the limit never refused an upgrade");
    };
    let (status, retry_after, body) = refusal;
    assert_eq!(status, 429);
    assert_eq!(retry_after, Some(1), "seconds, rounded up");
    assert_eq!(body["code"], "rate_limited", "{body}");
    assert_eq!(body["retryable"], true, "{body}");
    let wait = body["retry_after_ms"].as_u64().expect("retry_after_ms");
    assert!((1..=1000).contains(&wait), "{body}");
    counted(&platform, "upgrade").await;

    tokio::time::sleep(Duration::from_millis(wait)).await;
    let mut client = upgrade(&platform, "alice")
        .await
        .expect("accepted after the wait");
    client.next_of(&["welcome"]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loopback_is_spared_the_address_limits_by_default() {
    let platform = Platform::start_with(1, |config| {
        let limits = &mut config.gateway.rate_limits;
        limits.upgrades_per_ip_per_sec = 1;
        limits.upgrades_per_ip_burst = 1;
        limits.ip_per_sec = 1;
        limits.ip_burst = 1;
    })
    .await;
    for n in 0..5 {
        let mut client = platform.connect(0, &format!("user{n}")).await;
        let answers = pipelined_pings(&mut client, "p", 3).await;
        assert!(answers.iter().all(|a| a["type"] == "pong"), "{answers:?}");
    }
}

#[test]
fn limits_set_to_zero_or_to_the_wrong_type_stop_the_gateway_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("parley.toml");
    std::fs::write(
        &file,
        "[gateway.rate_limits]\nip_per_sec = 0\nexempt_networks = [\"10.0.0.0/8\"]\n",
    )
    .unwrap();
    for (config, env, expected) in [
        (
            None,
            ("PARLEY_GATEWAY__RATE_LIMITS__USER_BURST", "0"),
            "gateway.rate_limits.user_burst must be between 1 and 1000000",
        ),
        (
            None,
            ("PARLEY_GATEWAY__RATE_LIMITS__USER_PER_SEC", "fast"),
            "user_per_sec",
        ),
        (
            None,
            ("PARLEY_GATEWAY__RATE_LIMITS__EXEMPT_NETWORKS", "[\"lan\"]"),
            "exempt_networks",
        ),
        (
            Some(&file),
            ("PARLEY_GATEWAY__RATE_LIMITS__SWEEP_SECS", "5"),
            "gateway.rate_limits.ip_per_sec must be between 1 and 1000000 (limits cannot be turned off with 0",
        ),
    ] {
        let mut command = Command::new(env!("CARGO_BIN_EXE_parley"));
        command.arg("gateway").env(env.0, env.1);
        if let Some(file) = config {
            command.arg("--config").arg(file);
        }
        let output = command.output().expect("parley runs");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{env:?} started");
        assert!(stderr.contains(expected), "{env:?}: {stderr}");
    }
}
