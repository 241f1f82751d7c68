//! Old logs still replay: a log written by the code of November 2026 (the fixture
//! `fixtures/log-2026-11.jsonl`) is loaded into a fresh nats-server with its sequences,
//! subjects and headers, and the platform started on it must take new commands on the old
//! conversations and serve their history, list and read markers. When an event type gains a
//! version, this test is what proves that the upcasters and the projections still read the
//! events as they were first written.
//!
//! The fixture was made by `write_old_log_fixture` below, which records a fresh platform's
//! whole log after a scripted session (it refuses to overwrite a file, so the fixture stays
//! what the old code wrote):
//!
//! ```text
//! PARLEY_FIXTURE_OUT=services/tests/fixtures/log-2026-11.jsonl \
//!   cargo test -p parley-services --test it old_log::write_old_log_fixture -- --ignored
//! ```

use crate::support;

use std::collections::{BTreeMap, BTreeSet};
use std::io::Write;

use async_nats::HeaderMap;
use parley_events::{ConversationId, Event, EventEnvelope, RecordedEvent};
use parley_localstack::{NatsOptions, NatsServer};
use parley_services::config::Config;
use parley_services::topology::log_stream_config;
use serde::{Deserialize, Serialize};
use serde_json::json;
use serde_json::value::RawValue;
use support::{Client, Platform, eventually};

const FIXTURE: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/fixtures/log-2026-11.jsonl"
);

/// The fixture's first line: how it was made, and the log's shard count.
#[derive(Serialize, Deserialize)]
struct Header {
    fixture: String,
    shards: u32,
    events: u64,
}

/// One stored message of the log stream, exactly as the stream holds it.
#[derive(Serialize, Deserialize)]
struct Stored {
    seq: u64,
    subject: String,
    /// The headers the handler published it with, in name order.
    headers: BTreeMap<String, String>,
    /// The stored payload, byte for byte (an `EventEnvelope`).
    payload: Box<RawValue>,
}

fn read_fixture() -> (Header, Vec<Stored>) {
    let text = std::fs::read_to_string(FIXTURE).expect("the fixture is in the repository");
    let mut lines = text.lines();
    let header: Header = serde_json::from_str(lines.next().expect("a header line")).unwrap();
    let stored: Vec<Stored> = lines.map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(stored.len() as u64, header.events);
    (header, stored)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_log_written_before_issue_13_replays_into_the_write_model_and_the_store() {
    let (header, stored) = read_fixture();
    let head = stored.last().unwrap().seq;
    let events: Vec<RecordedEvent> = stored
        .iter()
        .map(|s| {
            EventEnvelope::from_bytes(s.payload.get().as_bytes())
                .expect("today's code decodes every old event")
                .recorded(s.seq)
        })
        .collect();

    // The log, loaded before any role runs, with the headers it was written with: the
    // expected-last-subject-sequence checks pass again only if sequences and subjects are
    // exactly those of the original.
    let nats = NatsServer::start(NatsOptions::default()).expect("nats-server starts");
    let js = async_nats::jetstream::new(async_nats::connect(nats.url()).await.unwrap());
    let mut config = Config::default();
    config.log.shards = header.shards;
    js.create_stream(log_stream_config(&config)).await.unwrap();
    for message in &stored {
        let mut headers = HeaderMap::new();
        for (name, value) in &message.headers {
            headers.insert(name.as_str(), value.as_str());
        }
        let ack = js
            .publish_with_headers(
                message.subject.clone(),
                headers,
                message.payload.get().to_owned().into(),
            )
            .await
            .unwrap()
            .await
            .unwrap();
        assert_eq!(ack.sequence, message.seq, "sequences are preserved");
    }

    let platform = Platform::start_on_server(nats, 1, |config| {
        config.log.shards = header.shards;
    })
    .await;
    let store = platform.store().await;
    eventually(|| async { (store.position().await.unwrap() >= head).then_some(()) }).await;

    // What the fixture holds, per conversation: members, messages, last event, markers.
    let mut members: BTreeMap<ConversationId, Vec<String>> = BTreeMap::new();
    let mut messages: BTreeMap<ConversationId, Vec<(u64, String, String)>> = BTreeMap::new();
    let mut last: BTreeMap<ConversationId, u64> = BTreeMap::new();
    let mut markers: BTreeMap<(ConversationId, String), u64> = BTreeMap::new();
    let mut sends: Vec<(String, String, ConversationId, String, u64)> = Vec::new();
    for event in &events {
        let conversation = event.envelope.conversation;
        let actor = event.envelope.actor.to_string();
        last.insert(conversation, event.seq);
        // Not a `match`: the event types added later are not in this log.
        if let Event::ConversationCreated(created) = &event.envelope.event {
            members.insert(
                conversation,
                created.members.iter().map(|m| m.user.to_string()).collect(),
            );
        } else if let Event::MessagePosted(posted) = &event.envelope.event {
            {
                messages.entry(conversation).or_default().push((
                    event.seq,
                    actor.clone(),
                    posted.body.clone(),
                ));
                sends.push((
                    actor,
                    posted.client_id.to_string(),
                    conversation,
                    posted.body.clone(),
                    event.seq,
                ));
            }
        } else if let Event::ConversationRead(read) = &event.envelope.event {
            markers.insert((conversation, actor), read.seq);
        }
    }
    assert!(members.len() >= 4, "the fixture has several conversations");

    let users: BTreeSet<String> = members.values().flatten().cloned().collect();
    let mut clients: BTreeMap<String, Client> = BTreeMap::new();
    for user in &users {
        clients.insert(user.clone(), platform.connect_v2(0, user).await);
    }

    // The list and the history show the old conversations, messages and markers.
    for (user, client) in clients.iter_mut() {
        client
            .send(json!({"type": "conversations", "id": "list", "limit": 1000}))
            .await;
        let list = client.reply_to("list").await;
        let mut listed = BTreeMap::new();
        for entry in list["conversations"].as_array().unwrap() {
            let id: ConversationId = entry["conversation"].as_str().unwrap().parse().unwrap();
            listed.insert(id, entry["read_seq"].as_u64().unwrap());
        }
        let expected: BTreeMap<ConversationId, u64> = members
            .iter()
            .filter(|(_, m)| m.contains(user))
            .map(|(c, _)| (*c, markers.get(&(*c, user.clone())).copied().unwrap_or(0)))
            .collect();
        assert_eq!(listed, expected, "{user}'s list and read markers: {list}");
    }
    for (conversation, posted) in &messages {
        let reader = &members[conversation][0];
        let client = clients.get_mut(reader).unwrap();
        client
            .send(json!({"type": "history", "id": "h", "conversation": conversation, "limit": 100}))
            .await;
        let history = client.reply_to("h").await;
        let shown: Vec<(u64, String, String)> = history["messages"]
            .as_array()
            .unwrap()
            .iter()
            .rev()
            .map(|m| {
                (
                    m["seq"].as_u64().unwrap(),
                    m["sender"].as_str().unwrap().to_owned(),
                    m["body"].as_str().unwrap().to_owned(),
                )
            })
            .collect();
        assert_eq!(&shown, posted, "history of {conversation}");
    }

    // The write model knows the old commands: a send replayed with its old id is answered
    // with the original event, nothing appended.
    for (actor, id, conversation, body, seq) in sends.iter().step_by(7) {
        let client = clients.get_mut(actor).unwrap();
        client
            .send(json!({"type": "send", "id": id, "conversation": conversation, "body": body}))
            .await;
        let ack = client.reply_to(id).await;
        assert_eq!((&ack["type"], &ack["seq"]), (&json!("ack"), &json!(seq)));
    }

    // New posts on every old conversation follow its old last event, and a read marker
    // moves past the old one.
    for (i, (conversation, conversation_members)) in members.iter().enumerate() {
        let (author, reader) = (&conversation_members[0], &conversation_members[1]);
        let (post, read) = (format!("after-{i}"), format!("read-after-{i}"));
        let client = clients.get_mut(author).unwrap();
        client
            .send(json!({"type": "send", "id": post, "conversation": conversation, "body": "still here"}))
            .await;
        let ack = client.reply_to(&post).await;
        assert_eq!(ack["type"], "ack", "{ack}");
        let seq = ack["seq"].as_u64().unwrap();
        assert!(seq > head);
        let appended = platform.log().await;
        let posted = &appended[usize::try_from(seq).unwrap() - 1];
        assert_eq!(posted.seq, seq);
        assert_eq!(posted.envelope.prev, last[conversation], "{conversation}");

        let client = clients.get_mut(reader).unwrap();
        client
            .send(
                json!({"type": "mark_read", "id": read, "conversation": conversation, "seq": seq}),
            )
            .await;
        let ack = client.reply_to(&read).await;
        assert_eq!(ack["type"], "ack", "{ack}");
        assert!(ack["seq"].as_u64().unwrap() > seq, "a new marker: {ack}");
    }

    // The store follows the log past its old head.
    platform.projected().await;
    let now = platform.log().await.last().unwrap().seq;
    assert!(now > head);
    assert_eq!(store.position().await.unwrap(), now);
}

/// Writes the fixture: a scripted session on a fresh platform (direct conversations and
/// groups, messages, read markers), then every stored message of the log, one per line.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "writes a fixture: run by hand with PARLEY_FIXTURE_OUT"]
async fn write_old_log_fixture() {
    let out = std::env::var("PARLEY_FIXTURE_OUT").expect("PARLEY_FIXTURE_OUT names the file");
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&out)
        .expect("a new file: an existing fixture is never overwritten");

    let platform = Platform::start(1).await;
    let mut clients = BTreeMap::new();
    for user in ["alice", "bob", "carol", "dave"] {
        clients.insert(user, platform.connect_v2(0, user).await);
    }
    let conversation = |ack: &serde_json::Value| ack["conversation"].as_str().unwrap().to_owned();

    let ab = conversation(
        &request(
            &mut clients,
            "alice",
            json!({"type": "create_direct", "id": "dm-bob", "peer": "bob"}),
        )
        .await,
    );
    let ac = conversation(
        &request(
            &mut clients,
            "carol",
            json!({"type": "create_direct", "id": "dm-alice", "peer": "alice"}),
        )
        .await,
    );
    let team = conversation(&request(&mut clients, "alice", json!({"type": "create_group", "id": "g-team", "title": "team", "members": ["bob", "carol", "dave"]})).await);
    let untitled = conversation(
        &request(
            &mut clients,
            "carol",
            json!({"type": "create_group", "id": "g-2", "members": ["dave", "alice"]}),
        )
        .await,
    );
    let script: [(&str, &String, &str); 24] = [
        ("alice", &ab, "hi bob"),
        ("bob", &ab, "hi alice"),
        ("alice", &ab, "lunch at noon?"),
        ("bob", &ab, "yes 🍜"),
        ("carol", &ac, "did you see the report?"),
        ("alice", &ac, "reading it now"),
        ("alice", &team, "welcome to the team"),
        ("bob", &team, "thanks!"),
        ("carol", &team, "hello all"),
        ("dave", &team, "👋"),
        ("alice", &team, "standup at 10"),
        ("carol", &untitled, "planning the offsite"),
        ("dave", &untitled, "Lisbon?"),
        ("alice", &untitled, "Lisbon works"),
        ("bob", &ab, "see you there"),
        ("carol", &team, "quotes \"and\" back\\slashes"),
        ("dave", &team, "line one\nline two"),
        ("alice", &ac, "done: looks good"),
        ("carol", &ac, "thanks"),
        ("bob", &team, "ünïcödé and ĸana カナ"),
        ("carol", &untitled, "booking it"),
        ("alice", &team, "see you at 10"),
        ("dave", &untitled, "great"),
        ("alice", &ab, "bye"),
    ];
    let mut newest = BTreeMap::new();
    for (i, (user, conversation, body)) in script.into_iter().enumerate() {
        let ack = request(&mut clients, user, json!({"type": "send", "id": format!("m-{i}"), "conversation": conversation, "body": body})).await;
        newest.insert(conversation.clone(), ack["seq"].as_u64().unwrap());
    }
    let reads: [(&str, &String); 7] = [
        ("bob", &ab),
        ("alice", &ab),
        ("carol", &team),
        ("dave", &team),
        ("alice", &untitled),
        ("carol", &ac),
        ("bob", &team),
    ];
    for (i, (user, conversation)) in reads.into_iter().enumerate() {
        request(&mut clients, user, json!({"type": "mark_read", "id": format!("r-{i}"), "conversation": conversation, "seq": newest[conversation]})).await;
    }
    // A marker that stops short of the newest message, so an old conversation has unread.
    let before_newest = newest[&untitled] - 1;
    request(
        &mut clients,
        "dave",
        json!({"type": "mark_read", "id": "r-early", "conversation": untitled, "seq": before_newest}),
    )
    .await;

    let js = platform.jetstream().await;
    let mut stream = js
        .get_stream(parley_events::subjects::LOG_STREAM)
        .await
        .unwrap();
    let last = stream.info().await.unwrap().state.last_sequence;
    let header = Header {
        fixture: format!(
            "The log of a scripted session (old_log.rs, write_old_log_fixture) on the code of \
             November 2026 ({}), one stored message per line: seq, subject, headers, payload",
            env!("CARGO_PKG_VERSION")
        ),
        shards: platform.config.log.shards,
        events: last,
    };
    writeln!(file, "{}", serde_json::to_string(&header).unwrap()).unwrap();
    for seq in 1..=last {
        let message = stream.get_raw_message(seq).await.unwrap();
        let headers = message
            .headers
            .iter()
            .map(|(name, values)| {
                assert_eq!(values.len(), 1);
                (name.to_string(), values[0].to_string())
            })
            .collect();
        let payload = String::from_utf8(message.payload.to_vec()).unwrap();
        let stored = Stored {
            seq,
            subject: message.subject.to_string(),
            headers,
            payload: RawValue::from_string(payload).unwrap(),
        };
        writeln!(file, "{}", serde_json::to_string(&stored).unwrap()).unwrap();
    }
}

/// Send `frame` as `user` and read its `ack`.
async fn request(
    clients: &mut BTreeMap<&str, Client>,
    user: &str,
    frame: serde_json::Value,
) -> serde_json::Value {
    let client = clients.get_mut(user).unwrap();
    let id = frame["id"].as_str().unwrap().to_owned();
    client.send(frame).await;
    let ack = client.reply_to(&id).await;
    assert_eq!(ack["type"], "ack", "{ack}");
    ack
}
