//! The embedded store: idempotent, order-insensitive, positioned atomically with its rows.

use parley_events::{
    ClientMsgId, CommandId, ConversationCreated, ConversationId, ConversationKind, Event,
    EventEnvelope, EventId, Member, MessagePosted, RecordedEvent, Role, UserId,
};
use parley_projections::{ConversationStore, SqliteStore, StoreErrorKind};
use proptest::prelude::*;

fn user(name: &str) -> UserId {
    UserId::parse(name).unwrap()
}

fn envelope(
    conversation: ConversationId,
    actor: &str,
    n: u32,
    prev: u64,
    event: Event,
) -> EventEnvelope {
    let command =
        CommandId::from_client(&user(actor), &ClientMsgId::parse(format!("c{n}")).unwrap());
    EventEnvelope {
        id: EventId::derive(command, 0, 1_700_000_000_000 + u64::from(n)),
        conversation,
        prev,
        command,
        actor: user(actor),
        at: 1_700_000_000_000 + u64::from(n),
        event,
    }
}

/// A small log: a direct conversation and a group, with interleaved messages.
fn log() -> Vec<RecordedEvent> {
    let direct = ConversationId::direct(&user("alice"), &user("bob"));
    let group = ConversationId::from_uuid(uuid::Uuid::from_u128(7));
    let created = |kind, title: Option<&str>, members: &[(&str, Role)]| {
        Event::ConversationCreated(ConversationCreated {
            kind,
            title: title.map(str::to_owned),
            members: members
                .iter()
                .map(|(u, role)| Member {
                    user: user(u),
                    role: *role,
                })
                .collect(),
        })
    };
    let posted = |n: u32, body: &str| {
        Event::MessagePosted(MessagePosted {
            client_id: ClientMsgId::parse(format!("m{n}")).unwrap(),
            body: body.into(),
        })
    };
    let mut events = Vec::new();
    let mut last = std::collections::HashMap::new();
    let mut push = |conversation: ConversationId, actor: &str, event: Event| {
        let seq = events.len() as u64 + 1;
        let prev = last.insert(conversation, seq).unwrap_or(0);
        events.push(envelope(conversation, actor, seq as u32, prev, event).recorded(seq));
    };
    push(
        direct,
        "alice",
        created(
            ConversationKind::Direct,
            None,
            &[("alice", Role::Member), ("bob", Role::Member)],
        ),
    );
    push(
        group,
        "carol",
        created(
            ConversationKind::Group,
            Some("team"),
            &[("carol", Role::Owner), ("alice", Role::Member)],
        ),
    );
    for n in 0..6 {
        push(
            direct,
            if n % 2 == 0 { "alice" } else { "bob" },
            posted(n, &format!("direct {n}")),
        );
        push(group, "carol", posted(100 + n, &format!("group {n}")));
    }
    events
}

fn open() -> (tempfile::TempDir, SqliteStore) {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(&dir.path().join("store.db")).unwrap();
    (dir, store)
}

/// Everything a reader can see, for comparing two stores.
async fn snapshot(store: &SqliteStore, events: &[RecordedEvent]) -> String {
    let mut out = format!("position {}\n", store.position().await.unwrap());
    let mut conversations: Vec<_> = events.iter().map(|e| e.envelope.conversation).collect();
    conversations.sort();
    conversations.dedup();
    for id in conversations {
        out += &format!(
            "{:?}\n{:?}\n",
            store.conversation(id).await.unwrap(),
            store.members(id).await.unwrap()
        );
        out += &format!("{:?}\n", store.history(id, None, 1000).await.unwrap());
    }
    for name in ["alice", "bob", "carol"] {
        out += &format!("{:?}\n", store.inbox(&user(name), None, 100).await.unwrap());
    }
    out
}

async fn applied_in_order(events: &[RecordedEvent]) -> String {
    let (_dir, store) = open();
    store.apply(events).await.unwrap();
    snapshot(&store, events).await
}

#[tokio::test]
async fn applies_conversations_members_messages_and_inbox() {
    let events = log();
    let (_dir, store) = open();
    store.apply(&events).await.unwrap();
    let direct = ConversationId::direct(&user("alice"), &user("bob"));
    let view = store.conversation(direct).await.unwrap().unwrap();
    assert_eq!(view.kind, ConversationKind::Direct);
    assert_eq!(view.last_seq, 13);
    assert_eq!(
        store.role_of(direct, &user("bob")).await.unwrap(),
        Some(Role::Member)
    );
    assert_eq!(store.role_of(direct, &user("carol")).await.unwrap(), None);
    assert_eq!(store.position().await.unwrap(), 14);
    let inbox = store.inbox(&user("alice"), None, 10).await.unwrap();
    assert_eq!(inbox.len(), 2);
    assert_eq!(
        inbox[0].title.as_deref(),
        Some("team"),
        "most recently active first"
    );
    assert!(inbox[0].last_seq > inbox[1].last_seq);
    let first_page = store.inbox(&user("alice"), None, 1).await.unwrap();
    let next_page = store
        .inbox(&user("alice"), Some(first_page[0].last_seq), 10)
        .await
        .unwrap();
    assert_eq!(
        [first_page, next_page].concat(),
        inbox,
        "paging by last_seq"
    );
}

#[tokio::test]
async fn history_pages_backwards_exactly_once_in_order() {
    let events = log();
    let (_dir, store) = open();
    store.apply(&events).await.unwrap();
    let direct = ConversationId::direct(&user("alice"), &user("bob"));
    let mut bodies = Vec::new();
    let mut before = None;
    loop {
        let page = store.history(direct, before, 4).await.unwrap();
        bodies.extend(page.messages.iter().map(|m| m.body.clone()));
        before = page.messages.last().map(|m| m.seq);
        if !page.has_more {
            break;
        }
    }
    let expected: Vec<String> = (0..6).rev().map(|n| format!("direct {n}")).collect();
    assert_eq!(bodies, expected);
}

#[tokio::test]
async fn position_only_moves_forward() {
    let events = log();
    let (_dir, store) = open();
    store.apply(&events[5..]).await.unwrap();
    store.apply(&events[..5]).await.unwrap();
    assert_eq!(store.position().await.unwrap(), 14);
}

#[tokio::test]
async fn a_store_reopened_after_a_crash_mid_batch_keeps_rows_and_position_together() {
    let events = log();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.db");
    {
        let store = SqliteStore::open(&path).unwrap();
        store.apply(&events[..6]).await.unwrap();
        // The next batch never committed: the process died before apply returned.
    }
    let store = SqliteStore::open(&path).unwrap();
    let position = store.position().await.unwrap();
    assert_eq!(position, 6);
    // Resuming from the position (and re-applying a little overlap) converges.
    store.apply(&events[4..]).await.unwrap();
    assert_eq!(
        snapshot(&store, &events).await,
        applied_in_order(&events).await
    );
}

#[tokio::test]
async fn a_store_from_a_newer_build_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("store.db");
    drop(SqliteStore::open(&path).unwrap());
    let conn = rusqlite::Connection::open(&path).unwrap();
    conn.pragma_update(None, "user_version", 99).unwrap();
    drop(conn);
    let err = SqliteStore::open(&path).err().expect("refused");
    assert_eq!(err.kind, StoreErrorKind::Schema);
    assert!(err.to_string().contains("99"), "{err}");
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    /// Any order, any duplicates, any batching: the same state as the log applied once.
    #[test]
    fn permutations_and_duplicates_converge(
        order in Just((0..14usize).collect::<Vec<_>>()).prop_shuffle(),
        duplicates in proptest::collection::vec(0..14usize, 0..10),
        batch in 1..6usize,
    ) {
        let events = log();
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        runtime.block_on(async {
            let mut shuffled: Vec<RecordedEvent> = order.iter().map(|&i| events[i].clone()).collect();
            shuffled.extend(duplicates.iter().map(|&i| events[i].clone()));
            let (_dir, store) = open();
            for chunk in shuffled.chunks(batch) {
                store.apply(chunk).await.unwrap();
            }
            prop_assert_eq!(snapshot(&store, &events).await, applied_in_order(&events).await);
            Ok(())
        })?;
    }
}
