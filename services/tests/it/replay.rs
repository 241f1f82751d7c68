//! `parley replay`: a rebuilt target equals the live one, verify finds a planted difference,
//! a switch under live load moves gateways and the projector without losing an event, and
//! a gateway started after a switch reads the switched target.

use crate::support;

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use parley_events::ConversationId;
use parley_localstack::CassandraNode;
use parley_services::progress::Progress;
use parley_services::replay::Target;
use parley_services::replay::rebuild::{self, RebuildOptions};
use parley_services::replay::switch::{self, SwitchOptions};
use serde_json::{Value, json};
use support::{Client, Platform, acked_seq as acked, eventually};
use tokio_util::sync::CancellationToken;

/// `parley replay ARGS` against the platform's NATS and store settings: exit code, stdout,
/// stderr.
fn parley(platform: &Platform, args: &[&str]) -> (Option<i32>, String, String) {
    parley_with(platform, &[], args)
}

/// [`parley`] with more environment variables.
fn parley_with(
    platform: &Platform,
    env: &[(&str, &str)],
    args: &[&str],
) -> (Option<i32>, String, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_parley"))
        .arg("replay")
        .args(args)
        .envs(env.iter().copied())
        .env(
            "PARLEY_NATS__URL",
            platform.config.nats.url.as_ref().unwrap().expose(),
        )
        .env("PARLEY_LOG__SHARDS", platform.config.log.shards.to_string())
        // As a user runs it: the tool's own default log level.
        .env_remove("RUST_LOG")
        .output()
        .expect("parley runs");
    (
        output.status.code(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

fn sqlite(path: &Path) -> String {
    format!("sqlite:{}", path.display())
}

/// A group and a direct conversation with everything a conversation can hold, all sent
/// through the gateway and projected: messages `message 0` to `message 11` (every third in
/// the group), message 2 edited, reactions on message 4 (one added and removed again),
/// message 5 deleted, Bob's read marker in the direct one, the group renamed, a member
/// added, a role changed and a member removed.
async fn conversations(platform: &Platform) -> (Client, Client, ConversationId, ConversationId) {
    // Protocol version 2: edits, reactions and deletions need it.
    let mut alice = platform.connect_v2(0, "alice").await;
    let mut bob = platform.connect_v2(0, "bob").await;
    let direct = platform.direct(&mut alice, &mut bob, "bob").await;
    alice.send(json!({"type": "create_group", "id": "g", "title": "team", "members": ["bob", "carol"]})).await;
    let group: ConversationId = alice.reply_to("g").await["conversation"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    let mut seqs = Vec::new();
    for i in 0..12 {
        let conversation = if i % 3 == 0 { group } else { direct };
        seqs.push(acked(&mut alice, json!({"type": "send", "id": format!("m{i}"), "conversation": conversation, "body": format!("message {i}")})).await);
    }
    let (a, b) = (true, false);
    for (by_alice, frame) in [
        (
            a,
            json!({"type": "edit", "id": "e", "conversation": direct, "message": seqs[2], "body": "message 2, edited"}),
        ),
        (
            a,
            json!({"type": "react", "id": "r1", "conversation": direct, "message": seqs[4], "emoji": "👍"}),
        ),
        (
            b,
            json!({"type": "react", "id": "r2", "conversation": direct, "message": seqs[4], "emoji": "👍"}),
        ),
        (
            b,
            json!({"type": "react", "id": "r3", "conversation": direct, "message": seqs[4], "emoji": "🎉"}),
        ),
        (
            b,
            json!({"type": "unreact", "id": "r4", "conversation": direct, "message": seqs[4], "emoji": "🎉"}),
        ),
        (
            a,
            json!({"type": "delete", "id": "d", "conversation": direct, "message": seqs[5]}),
        ),
        (
            b,
            json!({"type": "mark_read", "id": "k", "conversation": direct, "seq": seqs[7]}),
        ),
        (
            a,
            json!({"type": "rename", "id": "t", "conversation": group, "title": "team, renamed"}),
        ),
        (
            a,
            json!({"type": "add_members", "id": "a", "conversation": group, "users": ["dave"]}),
        ),
        (
            a,
            json!({"type": "set_role", "id": "s", "conversation": group, "user": "carol", "role": "admin"}),
        ),
        (
            a,
            json!({"type": "remove_members", "id": "x", "conversation": group, "users": ["bob"]}),
        ),
    ] {
        let client = if by_alice { &mut alice } else { &mut bob };
        acked(client, frame).await;
    }
    platform.projected().await;
    (alice, bob, direct, group)
}

/// `sql` run on the SQLite file at `path`, behind the store's back.
fn plant(path: &Path, sql: &str, conversation: ConversationId) {
    let db = rusqlite::Connection::open(path).unwrap();
    let changed = db.execute(sql, [conversation.to_string()]).unwrap();
    assert_eq!(changed, 1, "{sql}");
}

/// One integer `sql` reads from the SQLite file at `path`.
fn read_one(path: &Path, sql: &str, conversation: ConversationId) -> i64 {
    let db = rusqlite::Connection::open(path).unwrap();
    db.query_row(sql, [conversation.to_string()], |row| row.get(0))
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebuilt_target_equals_the_live_store_and_verify_finds_a_planted_difference() {
    let platform = Platform::start(1).await;
    let (_alice, _bob, direct, _group) = conversations(&platform).await;
    let dir = tempfile::tempdir().unwrap();
    let rebuilt_path = dir.path().join("rebuilt.db");
    let last = platform.log().await.last().unwrap().seq;

    let (code, out, err) = parley(&platform, &["rebuild", "--to", &sqlite(&rebuilt_path)]);
    assert_eq!(code, Some(0), "{out}\n{err}");
    assert!(out.contains(&format!("position {last}")), "{out}");
    // What the tool did is its own output; its log says only what went wrong.
    assert!(!err.contains("INFO"), "{err}");

    let live = sqlite(&platform.config.projector.store.path);
    let rebuilt = sqlite(&rebuilt_path);
    let (code, out, err) = parley(&platform, &["verify", "--a", &live, "--b", &rebuilt]);
    assert_eq!(code, Some(0), "{out}\n{err}");
    assert!(out.contains("compared 2 conversations"), "{out}");
    assert!(out.ends_with("equal\n"), "{out}");
    let (code, out, err) = parley(&platform, &["verify", "--a", &rebuilt, "--b", "log"]);
    assert_eq!(code, Some(0), "{out}\n{err}");

    // A second rebuild into the same file is refused; --resume continues (nothing to do).
    let (code, _, err) = parley(&platform, &["rebuild", "--to", &rebuilt]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("already holds data"), "{err}");
    let (code, out, err) = parley(&platform, &["rebuild", "--to", &rebuilt, "--resume"]);
    assert_eq!(code, Some(0), "{out}\n{err}");
    assert!(out.contains("0 events applied"), "{out}");

    // Planted behind the store's back: a message body, an edited body, a reaction and a
    // read marker, each in a different message or place.
    let seq_of = |body: &str| {
        read_one(
            &rebuilt_path,
            &format!("SELECT seq FROM messages WHERE conversation = ?1 AND body = '{body}'"),
            direct,
        )
    };
    let planted = [
        (
            format!("message {}", seq_of("message 1")),
            "UPDATE messages SET body = 'planted' WHERE conversation = ?1 AND body = 'message 1'",
        ),
        (
            format!("message {}", seq_of("message 2")),
            "UPDATE message_edits SET body = 'planted edit' WHERE conversation = ?1 AND body = 'message 2, edited'",
        ),
        (
            format!("message {}", seq_of("message 4")),
            "UPDATE reactions SET present = 0 WHERE conversation = ?1 AND user_id = 'bob' AND present",
        ),
        (
            "read marker bob".to_owned(),
            "UPDATE read_markers SET seq = seq - 1 WHERE conversation = ?1 AND user_id = 'bob'",
        ),
    ];
    for (_, sql) in &planted {
        plant(&rebuilt_path, sql, direct);
    }
    let (code, out, err) = parley(&platform, &["verify", "--a", &live, "--b", &rebuilt]);
    assert_eq!(code, Some(1), "{out}\n{err}");
    for (what, _) in &planted {
        assert!(
            out.contains(&format!("conversation {direct}: {what}\n")),
            "{what}: {out}"
        );
    }
    assert!(out.contains("planted edit"), "{out}");
    assert!(out.ends_with("4 differences\n"), "{out}");
    let (code, out, _) = parley(
        &platform,
        &["verify", "--a", &live, "--b", &rebuilt, "--json"],
    );
    assert_eq!(code, Some(1));
    let report: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(report["equal"], false);
    let named: BTreeSet<String> = report["differences"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| {
            assert_eq!(d["conversation"], direct.to_string(), "{d}");
            d["what"].as_str().unwrap().to_owned()
        })
        .collect();
    let expected: BTreeSet<String> = planted.iter().map(|(what, _)| what.clone()).collect();
    assert_eq!(named, expected, "{report}");
    // The reaction: Bob's thumbs up is gone from the planted side only.
    let reaction = report["differences"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["what"] == planted[2].0)
        .unwrap();
    assert!(
        reaction["a"].as_str().unwrap().contains(r#""count":2"#),
        "{reaction}"
    );
    assert!(
        reaction["b"].as_str().unwrap().contains(r#""count":1"#),
        "{reaction}"
    );
}

/// Without Java this prints `skipped: ...` and passes, unless CI or `PARLEY_REQUIRE_CQL`
/// requires it (as the CQL store tests do).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebuild_into_a_fresh_cql_keyspace_equals_the_live_store_and_the_log() {
    let Some(node) = CassandraNode::start_or_skip("the CQL rebuild test") else {
        return;
    };
    let platform = Platform::start(1).await;
    let _ = conversations(&platform).await;
    let last = platform.log().await.last().unwrap().seq;
    // The node's settings for `cql:` targets; the live store stays SQLite.
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("cql.toml");
    std::fs::write(
        &config,
        format!(
            "[projector.store.scylla]\ncontact_points = [\"{}\"]\nlocal_datacenter = \"{dc}\"\nreplication = {{ {dc} = 1 }}\n",
            node.contact_point(),
            dc = node.datacenter()
        ),
    )
    .unwrap();
    let env = [("PARLEY_CONFIG", config.to_str().unwrap())];

    let (code, out, err) = parley_with(&platform, &env, &["rebuild", "--to", "cql:rebuilt"]);
    assert_eq!(code, Some(0), "{out}\n{err}");
    assert!(out.contains(&format!("position {last}")), "{out}");
    let live = sqlite(&platform.config.projector.store.path);
    for b in [live.as_str(), "log"] {
        let (code, out, err) =
            parley_with(&platform, &env, &["verify", "--a", "cql:rebuilt", "--b", b]);
        assert_eq!(code, Some(0), "against {b}: {out}\n{err}");
        assert!(out.contains("compared 2 conversations"), "{out}");
        assert!(out.ends_with("equal\n"), "{out}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_targets_exit_2_and_a_switch_to_a_target_far_behind_is_refused() {
    let platform = Platform::start(1).await;
    let _ = conversations(&platform).await;
    for args in [
        &["rebuild", "--to", "mysql:x"][..],
        &["rebuild", "--to", "cql:bad-name"],
        &["switch", "--to", "sqlite:"],
        &["verify", "--a", "nowhere", "--b", "log"],
    ] {
        let (code, out, err) = parley(&platform, args);
        assert_eq!(code, Some(2), "{args:?}: {out}\n{err}");
        assert!(
            err.contains("a target is sqlite:<path> or cql:<keyspace>"),
            "{err}"
        );
    }
    let dir = tempfile::tempdir().unwrap();
    let empty = sqlite(&dir.path().join("empty.db"));
    let (code, out, err) = parley(&platform, &["switch", "--to", &empty, "--max-lag", "5"]);
    assert_eq!(code, Some(1), "{out}\n{err}");
    assert!(err.contains("run `parley replay rebuild"), "{err}");
    // Nothing moved: the key is not set.
    let js = platform.jetstream().await;
    let bucket = switch::bucket(&js, &platform.config).await.unwrap();
    assert_eq!(switch::active(&bucket).await.unwrap(), None);
}

/// Every message in the conversation as the gateway's `history` shows it, oldest first.
async fn history_seqs(client: &mut Client, conversation: ConversationId) -> Vec<u64> {
    let mut seqs = Vec::new();
    let mut before: Option<u64> = None;
    for page in 0.. {
        let id = format!("h{page}");
        client
            .send(json!({"type": "history", "id": id, "conversation": conversation, "before": before, "limit": 100}))
            .await;
        let reply = client.reply_to(&id).await;
        let messages = reply["messages"].as_array().unwrap().clone();
        seqs.extend(messages.iter().map(|m| m["seq"].as_u64().unwrap()));
        if reply["has_more"] != true {
            break;
        }
        before = seqs.last().copied();
    }
    seqs.sort_unstable();
    seqs
}

/// Alice sends `count` messages from `first`, each awaited: their acknowledged sequences.
async fn send(
    alice: &mut Client,
    conversation: ConversationId,
    first: usize,
    count: usize,
) -> Vec<u64> {
    let mut acked = Vec::new();
    for i in first..first + count {
        let id = format!("load{i}");
        alice.send(json!({"type": "send", "id": id, "conversation": conversation, "body": format!("load {i}")})).await;
        let ack = alice.reply_to(&id).await;
        assert_eq!(ack["type"], "ack", "{ack}");
        acked.push(ack["seq"].as_u64().unwrap());
    }
    acked
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rebuild_and_switch_under_live_load_lose_nothing_and_later_nodes_use_the_switch() {
    let mut platform = Platform::start(1).await;
    let (mut alice, mut bob, direct, _group) = conversations(&platform).await;
    let dir = tempfile::tempdir().unwrap();
    let target = Target::Sqlite(dir.path().join("new.db"));

    // Alice keeps sending throughout, from her own task.
    let sender = tokio::spawn(async move {
        let acked = send(&mut alice, direct, 0, 150).await;
        (alice, acked)
    });
    let stop_rebuild = CancellationToken::new();
    let rebuild = {
        let (config, options, stop) = (
            Arc::clone(&platform.config),
            RebuildOptions {
                follow: true,
                ..RebuildOptions::new(target.clone())
            },
            stop_rebuild.clone(),
        );
        tokio::spawn(async move {
            rebuild::run(&config, &options, |_| Progress::silent("rebuild"), &stop).await
        })
    };
    let new_store = target.open(&platform.config).await.unwrap();
    eventually(|| async { (new_store.position().await.unwrap() > 20).then_some(()) }).await;
    let switched = switch::switch(
        &platform.config,
        &SwitchOptions {
            target: target.clone(),
            max_lag: 10_000,
            wait: Duration::from_secs(30),
        },
    )
    .await
    .unwrap();
    assert!(switched.not_moved.is_empty(), "{switched:?}");
    assert!(
        switched.moved.iter().any(|m| m.ends_with(".gateway"))
            && switched.moved.iter().any(|m| m.ends_with(".projector")),
        "{switched:?}"
    );
    stop_rebuild.cancel();
    rebuild.await.unwrap().unwrap();
    let (mut alice, mut acked) = sender.await.unwrap();
    acked.extend(send(&mut alice, direct, 150, 30).await);

    // A projector started after the switch writes into the switched target.
    platform.stop_projector().await;
    platform.start_projector().await;
    acked.extend(send(&mut alice, direct, 180, 20).await);

    let last = platform.log().await.last().unwrap().seq;
    eventually(|| async { (new_store.position().await.unwrap() >= last).then_some(()) }).await;
    let logged: BTreeSet<u64> = platform
        .posted()
        .await
        .into_iter()
        .filter(|(_, body)| body.starts_with("load "))
        .map(|(seq, _)| seq)
        .collect();
    let acked_set: BTreeSet<u64> = acked.iter().copied().collect();
    assert_eq!(acked_set.len(), 200, "no message acknowledged twice");
    assert_eq!(acked_set, logged);
    let stored: BTreeSet<u64> = {
        let page = new_store.history(direct, None, 1000).await.unwrap();
        page.messages
            .iter()
            .filter(|m| m.body.starts_with("load "))
            .map(|m| m.seq)
            .collect()
    };
    assert_eq!(
        stored, logged,
        "every acknowledged message is in the new target"
    );
    let shown: Vec<u64> = history_seqs(&mut bob, direct).await;
    let shown_set: BTreeSet<u64> = shown.iter().copied().collect();
    assert_eq!(shown.len(), shown_set.len(), "no message shown twice");
    assert!(
        logged.is_subset(&shown_set),
        "the gateway shows every message"
    );

    // The old target was left where the projector moved away from it: the last messages
    // are in the new target only.
    let old = platform.store().await;
    assert!(old.position().await.unwrap() < last);
    let newest = *acked.last().unwrap();
    let old_page = old.history(direct, None, 1000).await.unwrap();
    assert!(old_page.messages.iter().all(|m| m.seq != newest));

    // A gateway started after the switch reads the switched target from the start.
    let later = platform.add_gateway().await;
    let mut later_bob = platform.connect(later, "bob").await;
    let shown: BTreeSet<u64> = history_seqs(&mut later_bob, direct)
        .await
        .into_iter()
        .collect();
    assert!(shown.contains(&newest), "the new gateway shows {shown:?}");
    assert!(
        logged.is_subset(&shown),
        "the new gateway shows every message"
    );
}
