//! `parley log …` and `parley conversation at`, run as the binary against real
//! nats-servers: export and import round trips (whole, re-run, interrupted), refused files,
//! show, stats, tail with filters, a conversation at an earlier point, and the old-log
//! fixture read through the upcaster.

use crate::support;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use parley_events::subjects::LOG_STREAM;
use parley_events::{ConversationId, Event, RecordedEvent};
use parley_localstack::{NatsOptions, NatsServer};
use serde_json::{Value, json};
use support::{Client, Platform};

/// What a run of the binary gave.
struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

/// A config file pointing the binary at `nats_url`, with the test platform's shard count.
fn config_file(dir: &Path, nats_url: &str) -> PathBuf {
    let path = dir.join(format!("parley-{}.toml", port_digits(nats_url)));
    std::fs::write(
        &path,
        format!("[nats]\nurl = \"{nats_url}\"\n\n[log]\nshards = 16\n"),
    )
    .unwrap();
    path
}

fn port_digits(url: &str) -> String {
    url.chars().filter(char::is_ascii_digit).collect()
}

async fn parley(config: &Path, args: &[&str]) -> Run {
    let output = tokio::process::Command::new(env!("CARGO_BIN_EXE_parley"))
        .arg("--config")
        .arg(config)
        .args(args)
        .output()
        .await
        .expect("the binary runs");
    Run {
        code: output.status.code().expect("exits by itself"),
        stdout: String::from_utf8(output.stdout).unwrap(),
        stderr: String::from_utf8(output.stderr).unwrap(),
    }
}

/// `parley` with `args`, which must succeed; its standard output.
async fn ok(config: &Path, args: &[&str]) -> String {
    let run = parley(config, args).await;
    assert_eq!(run.code, 0, "parley {args:?}: {}", run.stderr);
    run.stdout
}

async fn request(client: &mut Client, frame: Value) -> Value {
    let id = frame["id"].as_str().unwrap().to_owned();
    client.send(frame).await;
    let reply = client.reply_to(&id).await;
    assert_eq!(reply["type"], "ack", "{reply}");
    reply
}

/// A session touching every kind of event: a direct conversation and a group, messages,
/// a reply, an edit, a deletion, reactions, read markers, members added and removed, a
/// rename, a role change and a mute. Returns the group.
async fn session(platform: &Platform) -> ConversationId {
    let mut alice = platform.connect_v2(0, "alice").await;
    let dm = request(
        &mut alice,
        json!({"type": "create_direct", "id": "dm", "peer": "bob"}),
    )
    .await["conversation"]
        .clone();
    let group = request(
        &mut alice,
        json!({"type": "create_group", "id": "g", "title": "team", "members": ["bob"]}),
    )
    .await["conversation"]
        .clone();
    let hi = request(
        &mut alice,
        json!({"type": "send", "id": "m1", "conversation": dm, "body": "hi bob"}),
    )
    .await["seq"]
        .clone();
    let steps = [
        json!({"type": "send", "id": "m2", "conversation": group, "body": "welcome"}),
        json!({"type": "add_members", "id": "a1", "conversation": group, "users": ["carol", "dave"]}),
        json!({"type": "rename", "id": "r1", "conversation": group, "title": "launch"}),
        json!({"type": "send", "id": "m3", "conversation": dm, "body": "lunch?", "reply_to": hi}),
        json!({"type": "edit", "id": "e1", "conversation": dm, "message": hi, "body": "hi bob!"}),
        json!({"type": "react", "id": "x1", "conversation": dm, "message": hi, "emoji": "👍"}),
        json!({"type": "set_role", "id": "s1", "conversation": group, "user": "carol", "role": "admin"}),
        json!({"type": "mute", "id": "u1", "conversation": group, "user": "dave", "seconds": 60}),
        json!({"type": "mark_read", "id": "k1", "conversation": dm, "seq": hi}),
        json!({"type": "remove_members", "id": "d1", "conversation": group, "users": ["bob"]}),
        json!({"type": "delete", "id": "x2", "conversation": dm, "message": hi}),
    ];
    for step in steps {
        request(&mut alice, step).await;
    }
    platform.projected().await;
    serde_json::from_value(group).unwrap()
}

async fn log_state(nats: &NatsServer) -> Option<(u64, u64)> {
    let js = async_nats::jetstream::new(async_nats::connect(nats.url()).await.unwrap());
    let mut log = js.get_stream(LOG_STREAM).await.ok()?;
    let state = log.info().await.unwrap().state.clone();
    Some((state.messages, state.last_sequence))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_export_imports_into_a_fresh_nats_and_exports_again_byte_for_byte() {
    let platform = Platform::start(1).await;
    session(&platform).await;
    let dir = tempfile::tempdir().unwrap();
    let source = config_file(dir.path(), &platform.nats.url());
    let exported = dir.path().join("log.jsonl");
    ok(
        &source,
        &["log", "export", "--output", exported.to_str().unwrap()],
    )
    .await;
    let text = std::fs::read_to_string(&exported).unwrap();
    let log = platform.log().await;
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), log.len());
    for (line, event) in lines.iter().zip(&log) {
        assert_eq!(
            line.as_bytes(),
            event.to_bytes(),
            "the recorded event format"
        );
    }

    // Into a second, fresh nats-server, then out again.
    let target = NatsServer::start(NatsOptions::default()).unwrap();
    let target_config = config_file(dir.path(), &target.url());
    let imported = ok(
        &target_config,
        &["log", "import", exported.to_str().unwrap()],
    )
    .await;
    assert!(
        imported.starts_with(&format!("imported {} events", log.len())),
        "{imported}"
    );
    let again = ok(&target_config, &["log", "export"]).await;
    assert_eq!(
        again, text,
        "export -> import -> export gives the same bytes"
    );

    // Re-running the finished import appends nothing.
    let before = log_state(&target).await;
    let rerun = ok(
        &target_config,
        &["log", "import", exported.to_str().unwrap()],
    )
    .await;
    assert!(rerun.starts_with("imported 0 events"), "{rerun}");
    assert_eq!(log_state(&target).await, before);

    // An interrupted import (a prefix stored), then the whole file: the same log.
    let prefix = dir.path().join("prefix.jsonl");
    let half: String = lines[..lines.len() / 2]
        .iter()
        .map(|l| format!("{l}\n"))
        .collect();
    std::fs::write(&prefix, half).unwrap();
    let third = NatsServer::start(NatsOptions::default()).unwrap();
    let third_config = config_file(dir.path(), &third.url());
    ok(&third_config, &["log", "import", prefix.to_str().unwrap()]).await;
    assert_eq!(
        log_state(&third).await,
        Some(((lines.len() / 2) as u64, (lines.len() / 2) as u64))
    );
    let resumed = ok(
        &third_config,
        &["log", "import", exported.to_str().unwrap()],
    )
    .await;
    assert!(
        resumed.ends_with(&format!("{} were already in the log\n", lines.len() / 2)),
        "{resumed}"
    );
    assert_eq!(ok(&third_config, &["log", "export"]).await, text);

    // A range exports with its sequences, and imports into a log that starts there.
    let range = dir.path().join("range.jsonl");
    ok(
        &source,
        &[
            "log",
            "export",
            "--from-seq",
            "5",
            "-o",
            range.to_str().unwrap(),
        ],
    )
    .await;
    let fourth = NatsServer::start(NatsOptions::default()).unwrap();
    let fourth_config = config_file(dir.path(), &fourth.url());
    ok(&fourth_config, &["log", "import", range.to_str().unwrap()]).await;
    assert_eq!(
        ok(&fourth_config, &["log", "export"]).await,
        lines[4..]
            .iter()
            .map(|l| format!("{l}\n"))
            .collect::<String>()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn import_refuses_a_bad_file_with_its_line_number_and_writes_nothing() {
    let platform = Platform::start(1).await;
    let group = session(&platform).await;
    let dir = tempfile::tempdir().unwrap();
    let source = config_file(dir.path(), &platform.nats.url());
    let text = ok(&source, &["log", "export"]).await;
    let lines: Vec<String> = text.lines().map(str::to_owned).collect();
    let target = NatsServer::start(NatsOptions::default()).unwrap();
    let target_config = config_file(dir.path(), &target.url());
    let write = |name: &str, lines: &[String]| {
        let path = dir.path().join(name);
        std::fs::write(
            &path,
            lines.iter().map(|l| format!("{l}\n")).collect::<String>(),
        )
        .unwrap();
        path
    };
    let refused = |run: Run, wanted: &str| {
        assert_eq!(run.code, 2, "{}", run.stderr);
        assert!(run.stderr.contains(wanted), "{wanted:?} in {}", run.stderr);
    };

    let mut bad_json = lines.clone();
    bad_json[2] = "{\"seq\": 3,".into();
    let file = write("bad-json.jsonl", &bad_json);
    refused(
        parley(&target_config, &["log", "import", file.to_str().unwrap()]).await,
        "line 3: malformed event envelope",
    );

    // The last event of the group names a prev that is not the group's previous event.
    let last = lines
        .iter()
        .rposition(|l| l.contains(&group.to_string()))
        .unwrap();
    let mut broken: Value = serde_json::from_str(&lines[last]).unwrap();
    broken["prev"] = json!(broken["prev"].as_u64().unwrap() - 1);
    let mut broken_prev = lines.clone();
    broken_prev[last] = broken.to_string();
    let file = write("broken-prev.jsonl", &broken_prev);
    refused(
        parley(&target_config, &["log", "import", file.to_str().unwrap()]).await,
        &format!("line {}: event {} has prev", last + 1, last + 1),
    );

    // A conversation's export has gaps in its sequences.
    let only = ok(
        &source,
        &["log", "export", "--conversation", &group.to_string()],
    )
    .await;
    let gaps: Vec<String> = only.lines().map(str::to_owned).collect();
    assert!(gaps.len() < lines.len());
    let file = write("gaps.jsonl", &gaps);
    refused(
        parley(&target_config, &["log", "import", file.to_str().unwrap()]).await,
        "line 2: seq",
    );
    assert_eq!(log_state(&target).await, None, "nothing was written");

    // A log that holds something else.
    let whole = write("whole.jsonl", &lines);
    let mut other = lines[..3].to_vec();
    let mut changed: Value = serde_json::from_str(&other[2]).unwrap();
    changed["actor"] = json!("mallory");
    other[2] = changed.to_string();
    let other = write("other.jsonl", &other);
    ok(&target_config, &["log", "import", other.to_str().unwrap()]).await;
    refused(
        parley(&target_config, &["log", "import", whole.to_str().unwrap()]).await,
        "the log is not empty",
    );
    assert_eq!(log_state(&target).await, Some((3, 3)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn show_stats_and_tail_read_the_log() {
    let platform = Platform::start(1).await;
    let group = session(&platform).await;
    let log = platform.log().await;
    let dir = tempfile::tempdir().unwrap();
    let config = config_file(dir.path(), &platform.nats.url());

    // One event by sequence and by id, the same JSON.
    let posted = log
        .iter()
        .find(|e| matches!(e.envelope.event, Event::MessagePosted(_)))
        .unwrap();
    let by_seq = ok(&config, &["log", "show", &posted.seq.to_string(), "--json"]).await;
    let by_id = ok(
        &config,
        &["log", "show", &posted.envelope.id.to_string(), "--json"],
    )
    .await;
    assert_eq!(by_seq.trim_end().as_bytes(), posted.to_bytes());
    assert_eq!(by_id, by_seq);
    let text = ok(&config, &["log", "show", &posted.seq.to_string()]).await;
    assert!(
        text.starts_with(&format!("seq {} on parley.log.", posted.seq)),
        "{text}"
    );
    let missing = parley(&config, &["log", "show", "100000"]).await;
    assert_eq!(missing.code, 1, "{}", missing.stderr);
    let unknown = parley(&config, &["log", "show", &uuid_v7_now()]).await;
    assert_eq!(unknown.code, 1, "{}", unknown.stderr);
    assert_eq!(parley(&config, &["log", "show", "nonsense"]).await.code, 2);

    // Stats: counts by type as the log holds them.
    let stats: Value =
        serde_json::from_str(&ok(&config, &["log", "stats", "--json"]).await).unwrap();
    let mut counts: BTreeMap<String, u64> = BTreeMap::new();
    for event in &log {
        *counts
            .entry(event.envelope.event.type_name().to_owned())
            .or_default() += 1;
    }
    let reported: BTreeMap<String, u64> = stats["types"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            (
                t["type"].as_str().unwrap().to_owned(),
                t["events"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(reported, counts);
    assert_eq!(stats["events"], json!(log.len()));
    assert_eq!(
        (stats["first_seq"].as_u64(), stats["last_seq"].as_u64()),
        (Some(1), Some(log.len() as u64))
    );
    assert_eq!(stats["shards"], 16);
    let shards = parley_events::subjects::Shards::new(16).unwrap();
    let mut used: Vec<u32> = log
        .iter()
        .map(|e| shards.of(e.envelope.conversation))
        .collect();
    used.sort();
    used.dedup();
    assert_eq!(stats["shards_used"], json!(used.len()));

    // Tail from the start with filters, stopping after --limit.
    let group_messages: Vec<&RecordedEvent> = log
        .iter()
        .filter(|e| {
            e.envelope.conversation == group
                && matches!(
                    e.envelope.event,
                    Event::MembersAdded(_) | Event::MembersRemoved(_)
                )
        })
        .collect();
    assert_eq!(group_messages.len(), 2);
    let tailed = ok(
        &config,
        &[
            "log",
            "tail",
            "--from-seq",
            "1",
            "--conversation",
            &group.to_string(),
            "--type",
            "member.added",
            "--type",
            "member.removed",
            "--limit",
            "2",
            "--json",
        ],
    )
    .await;
    let tailed: Vec<&str> = tailed.lines().collect();
    assert_eq!(
        tailed,
        group_messages
            .iter()
            .map(|e| String::from_utf8(e.to_bytes()).unwrap())
            .collect::<Vec<_>>()
    );
    // Dave's events: the addition naming him, then his mute.
    let daves = ok(
        &config,
        &[
            "log",
            "tail",
            "--from-seq",
            "1",
            "--user",
            "dave",
            "--limit",
            "2",
        ],
    )
    .await;
    let types: Vec<&str> = daves
        .lines()
        .map(|l| l.split_whitespace().nth(2).unwrap())
        .collect();
    assert_eq!(types, ["member.added", "member.muted"], "{daves}");
    assert!(daves.contains("alice added carol and dave"), "{daves}");
    assert_eq!(
        parley(&config, &["log", "tail", "--type", "message.exploded"])
            .await
            .code,
        2
    );
}

fn uuid_v7_now() -> String {
    uuid::Uuid::now_v7().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_conversation_at_an_earlier_seq_is_what_it_was_then() {
    let platform = Platform::start(1).await;
    let group = session(&platform).await;
    let log = platform.log().await;
    let dir = tempfile::tempdir().unwrap();
    let config = config_file(dir.path(), &platform.nats.url());
    let at = |seq: u64| {
        let config = config.clone();
        async move {
            let text = ok(
                &config,
                &[
                    "conversation",
                    "at",
                    &group.to_string(),
                    "--seq",
                    &seq.to_string(),
                    "--json",
                ],
            )
            .await;
            serde_json::from_str::<Value>(&text).unwrap()
        }
    };
    let seq_of = |type_name: &str| {
        log.iter()
            .find(|e| e.envelope.conversation == group && e.envelope.event.type_name() == type_name)
            .unwrap()
            .seq
    };
    let members = |view: &Value| -> Vec<(String, String)> {
        view["members"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| {
                (
                    m["user"].as_str().unwrap().into(),
                    m["role"].as_str().unwrap().into(),
                )
            })
            .collect()
    };
    let pair = |user: &str, role: &str| (user.to_owned(), role.to_owned());

    // Right after the creation: the first title, two members, no message yet.
    let created = at(seq_of("conversation.created")).await;
    assert_eq!(created["title"], "team");
    assert_eq!(
        members(&created),
        [pair("alice", "owner"), pair("bob", "member")]
    );
    assert_eq!(created["messages"], json!([]));
    // Before the rename: the welcome, carol and dave added, the old title.
    let before_rename = at(seq_of("conversation.renamed") - 1).await;
    assert_eq!(before_rename["title"], "team");
    assert_eq!(members(&before_rename).len(), 4);
    let bodies: Vec<&str> = before_rename["messages"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m.get("system").is_none())
        .map(|m| m["body"].as_str().unwrap())
        .collect();
    assert_eq!(bodies, ["welcome"]);

    // At the end: what the store shows.
    let now = at(log.last().unwrap().seq).await;
    let store = platform.store().await;
    let stored: Vec<(String, String)> = store
        .members(group)
        .await
        .unwrap()
        .into_iter()
        .map(|m| (m.user.to_string(), m.role.as_str().to_owned()))
        .collect();
    assert_eq!(members(&now), stored);
    assert_eq!(
        members(&now),
        [
            pair("alice", "owner"),
            pair("carol", "admin"),
            pair("dave", "member")
        ]
    );
    assert_eq!(now["title"], "launch");
    let mut history = store.history(group, None, 20).await.unwrap().messages;
    history.reverse();
    assert_eq!(now["messages"], serde_json::to_value(&history).unwrap());

    // By time: the time of the rename's event shows the rename.
    let renamed = log
        .iter()
        .find(|e| e.seq == seq_of("conversation.renamed"))
        .unwrap();
    let time = parley_events::protocol::rfc3339(renamed.envelope.at);
    let text = ok(
        &config,
        &["conversation", "at", &group.to_string(), "--time", &time],
    )
    .await;
    assert!(text.contains("(group \"launch\") as of seq"), "{text}");
    let unknown = parley(
        &config,
        &["conversation", "at", &uuid_v7_now(), "--seq", "5"],
    )
    .await;
    assert_eq!(unknown.code, 1, "{}", unknown.stderr);
    assert_eq!(
        parley(&config, &["conversation", "at", &group.to_string()])
            .await
            .code,
        2,
        "--seq or --time is required"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_old_log_fixture_exports_through_the_upcaster_and_imports() {
    let fixture = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/log-2026-11.jsonl"
    );
    let text = std::fs::read_to_string(fixture).unwrap();
    let mut lines = text.lines();
    let header: Value = serde_json::from_str(lines.next().unwrap()).unwrap();
    assert_eq!(header["shards"], 16);
    let nats = NatsServer::start(NatsOptions::default()).unwrap();
    let js = async_nats::jetstream::new(async_nats::connect(nats.url()).await.unwrap());
    let mut config = parley_services::config::Config::default();
    config.log.shards = 16;
    js.create_stream(parley_services::topology::log_stream_config(&config))
        .await
        .unwrap();
    let mut v1 = Vec::new();
    for line in lines {
        let stored: Value = serde_json::from_str(line).unwrap();
        let payload = stored["payload"].to_string();
        if stored["payload"]["v"] == 1 && stored["payload"]["type"] == "message.posted" {
            v1.push(stored["seq"].as_u64().unwrap());
        }
        js.publish(
            stored["subject"].as_str().unwrap().to_owned(),
            payload.into_bytes().into(),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    }
    assert!(!v1.is_empty(), "the fixture holds message.posted v1");

    let dir = tempfile::tempdir().unwrap();
    let source = config_file(dir.path(), &nats.url());
    let shown: Value =
        serde_json::from_str(&ok(&source, &["log", "show", &v1[0].to_string(), "--json"]).await)
            .unwrap();
    assert_eq!(
        (&shown["type"], &shown["v"]),
        (&json!("message.posted"), &json!(2))
    );
    let stats = ok(&source, &["log", "stats"]).await;
    assert!(
        stats
            .lines()
            .any(|l| l.split_whitespace().take(2).eq(["message.posted", "v1"])),
        "stats count stored versions: {stats}"
    );

    let exported = ok(&source, &["log", "export"]).await;
    for line in exported.lines() {
        let event = RecordedEvent::from_bytes(line.as_bytes()).unwrap();
        let json: Value = serde_json::from_str(line).unwrap();
        assert_eq!(
            json["v"],
            event.envelope.event.version(),
            "current versions"
        );
    }
    let file = dir.path().join("old.jsonl");
    std::fs::write(&file, &exported).unwrap();
    let target = NatsServer::start(NatsOptions::default()).unwrap();
    let target_config = config_file(dir.path(), &target.url());
    ok(&target_config, &["log", "import", file.to_str().unwrap()]).await;
    assert_eq!(ok(&target_config, &["log", "export"]).await, exported);
}

/// `EVENTS` synthetic events: `CONVERSATIONS` direct conversations, each created and then
/// sent messages round-robin, as (subject, stored bytes) in log order from sequence 1.
fn generated_log(events: u64, conversations: u64) -> Vec<(String, Vec<u8>)> {
    use parley_events::{
        ClientMsgId, CommandId, ConversationCreated, ConversationKind, EventEnvelope, EventId,
        Member, MessagePosted, Role, UserId,
    };
    let shards = parley_events::subjects::Shards::new(16).unwrap();
    let hub = UserId::parse("hub").unwrap();
    let mut last = vec![0u64; conversations as usize];
    let at = 1_796_000_000_000u64;
    (1..=events)
        .map(|seq| {
            let index = ((seq - 1) % conversations) as usize;
            let user = UserId::parse(format!("u{index}")).unwrap();
            let conversation = ConversationId::direct(&user, &hub);
            let client_id = ClientMsgId::parse(format!("m-{seq}")).unwrap();
            let command = CommandId::from_client(&user, &client_id);
            let event = if last[index] == 0 {
                let mut members = [user.clone(), hub.clone()].map(|user| Member {
                    user,
                    role: Role::Member,
                });
                members.sort_by(|a, b| a.user.as_str().cmp(b.user.as_str()));
                Event::ConversationCreated(ConversationCreated {
                    kind: ConversationKind::Direct,
                    title: None,
                    members: members.to_vec(),
                })
            } else {
                Event::MessagePosted(MessagePosted {
                    client_id,
                    body: format!("message {seq}: a line of ordinary length for a chat"),
                    reply_to: None,
                })
            };
            let envelope = EventEnvelope {
                id: EventId::derive(command, 0, at + seq),
                conversation,
                prev: last[index],
                command,
                actor: user,
                at: at + seq,
                event,
            };
            last[index] = seq;
            (shards.subject(conversation), envelope.to_bytes())
        })
        .collect()
}

/// Export and import rates on a log of 200,000 events, each beside the raw JetStream rate
/// measured in the same run on the same events: async publish with 256 in flight (as the
/// import publishes, and as `parley-loadtest baseline` does) and an ordered consumer read.
/// Both nats-servers fsync lazily (`sync_always: false`), so the import's own work shows
/// rather than the disk's fsync latency, which bounds raw publish and import alike.
/// Prints the figures for docs/benchmarks.md.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a benchmark: run by hand with --ignored --nocapture"]
async fn export_and_import_rates() {
    use futures::StreamExt;
    use std::future::IntoFuture;
    use std::time::Instant;
    const EVENTS: u64 = 200_000;
    let log = generated_log(EVENTS, 1_000);
    let bytes: usize = log.iter().map(|(_, b)| b.len()).sum();
    let lazy = || NatsOptions {
        sync_always: false,
        ..NatsOptions::default()
    };
    let source = NatsServer::start(lazy()).unwrap();
    let js = async_nats::jetstream::new(async_nats::connect(source.url()).await.unwrap());
    let mut config = parley_services::config::Config::default();
    config.log.shards = 16;
    js.create_stream(parley_services::topology::log_stream_config(&config))
        .await
        .unwrap();

    let started = Instant::now();
    let mut pending = futures::stream::FuturesUnordered::<
        <async_nats::jetstream::context::PublishAckFuture as IntoFuture>::IntoFuture,
    >::new();
    for (subject, payload) in &log {
        if pending.len() >= 256 {
            pending.next().await.unwrap().unwrap();
        }
        let ack = js
            .publish(subject.clone(), payload.clone().into())
            .await
            .unwrap();
        pending.push(ack.into_future());
    }
    while let Some(ack) = pending.next().await {
        ack.unwrap();
    }
    let publish = EVENTS as f64 / started.elapsed().as_secs_f64();

    let stream = js.get_stream(LOG_STREAM).await.unwrap();
    let consumer = stream
        .create_consumer(async_nats::jetstream::consumer::pull::OrderedConfig::default())
        .await
        .unwrap();
    let mut messages = consumer.messages().await.unwrap();
    let started = Instant::now();
    for _ in 0..EVENTS {
        messages.next().await.unwrap().unwrap();
    }
    let consume = EVENTS as f64 / started.elapsed().as_secs_f64();
    drop(messages);

    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("log.jsonl");
    let source_config = config_file(dir.path(), &source.url());
    let started = Instant::now();
    ok(
        &source_config,
        &["log", "export", "-o", file.to_str().unwrap()],
    )
    .await;
    let export = EVENTS as f64 / started.elapsed().as_secs_f64();

    let target = NatsServer::start(lazy()).unwrap();
    let target_config = config_file(dir.path(), &target.url());
    let started = Instant::now();
    ok(&target_config, &["log", "import", file.to_str().unwrap()]).await;
    let import = EVENTS as f64 / started.elapsed().as_secs_f64();
    assert_eq!(log_state(&target).await, Some((EVENTS, EVENTS)));

    println!(
        "{EVENTS} events, {:.0} B each on average, 1,000 conversations, 16 shards\n\
         raw JetStream publish (256 in flight)  {publish:>9.0} events/s\n\
         raw JetStream ordered consume          {consume:>9.0} events/s\n\
         parley log export                      {export:>9.0} events/s  ({:.2} of consume)\n\
         parley log import                      {import:>9.0} events/s  ({:.2} of publish)",
        bytes as f64 / EVENTS as f64,
        export / consume,
        import / publish
    );
}
