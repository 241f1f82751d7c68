//! The conversation projection is disposable: deleted, it is rebuilt from the log and equals
//! what it was.

use std::time::Duration;

use crate::support;

use async_nats::jetstream::consumer::{AckPolicy, DeliverPolicy, PriorityPolicy, pull};
use parley_events::subjects::{LOG_STREAM, PROJECTOR_CONSUMER, PROJECTOR_PRIORITY_GROUP};
use parley_events::{ConversationId, UserId};
use parley_projections::ConversationStore;
use serde_json::json;
use support::{Client, Platform, Running};

async fn snapshot(
    store: &dyn ConversationStore,
    conversations: &[ConversationId],
    users: &[&str],
) -> String {
    let mut out = String::new();
    for id in conversations {
        out += &format!("{:?}\n", store.conversation(*id).await.unwrap());
        out += &format!("{:?}\n", store.members(*id).await.unwrap());
        out += &format!("{:?}\n", store.history(*id, None, 1000).await.unwrap());
    }
    for user in users {
        out += &format!(
            "{:?}\n",
            store
                .inbox(&UserId::parse(*user).unwrap(), None, 100)
                .await
                .unwrap()
        );
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_store_is_rebuilt_from_the_log_and_equals_the_live_one() {
    let mut platform = Platform::start(1).await;
    let (mut alice, _bob, direct) = platform.alice_and_bob().await;
    alice.send(json!({"type": "create_group", "id": "g", "title": "team", "members": ["bob", "carol"]})).await;
    let group: ConversationId = alice.reply_to("g").await["conversation"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    for i in 0..20 {
        let conversation = if i % 3 == 0 { group } else { direct };
        alice.send(json!({"type": "send", "id": format!("m{i}"), "conversation": conversation, "body": format!("message {i}")})).await;
    }
    for i in 0..20 {
        assert_eq!(alice.reply_to(&format!("m{i}")).await["type"], "ack");
    }
    platform.projected().await;
    let conversations = [direct, group];
    let users = ["alice", "bob", "carol"];
    let live = snapshot(&*platform.store().await, &conversations, &users).await;
    assert!(live.contains("message 19"));

    platform.stop_projector().await;
    let path = &platform.config.projector.store.path;
    for suffix in ["", "-wal", "-shm"] {
        let file = format!("{}{suffix}", path.display());
        let _ = std::fs::remove_file(file);
    }
    platform.start_projector().await;
    platform.projected().await;
    assert_eq!(
        snapshot(&*platform.store().await, &conversations, &users).await,
        live
    );
}

/// `bodies` sent while no projector runs, the first `taken` of them delivered to a projector
/// instance (or this one before a reconnect) that never applied them: one pull request, as a
/// projector's stream would send it, from a connection then gone, which keeps the
/// consumer's pin for `takeover_secs`. Then a projector starts: its store ends up with every
/// message, in order.
async fn taken_and_never_applied(takeover_secs: u64, bodies: &[&str], taken: usize) {
    use futures::StreamExt;

    let mut platform =
        Platform::start_with(1, |config| config.projector.takeover_secs = takeover_secs).await;
    let (mut alice, _bob, conversation) = platform.alice_and_bob().await;
    platform.projected().await;
    platform.stop_projector().await;
    for (i, body) in bodies.iter().enumerate() {
        sent(&mut alice, conversation, &format!("m{i}"), body).await;
    }

    let dying = async_nats::connect(platform.nats.url()).await.unwrap();
    let inbox = dying.new_inbox();
    let mut delivered = dying.subscribe(inbox.clone()).await.unwrap();
    let request =
        json!({"batch": taken, "expires": 5_000_000_000u64, "group": PROJECTOR_PRIORITY_GROUP});
    dying
        .publish_with_reply(
            format!("$JS.API.CONSUMER.MSG.NEXT.{LOG_STREAM}.{PROJECTOR_CONSUMER}"),
            inbox,
            request.to_string().into(),
        )
        .await
        .unwrap();
    for _ in 0..taken {
        let event = delivered.next().await.expect("a log event");
        assert!(event.status.is_none(), "{event:?}");
    }
    dying.drain().await.unwrap();

    platform.start_projector().await;
    platform.projected().await;
    assert_eq!(
        bodies_in(&*platform.store().await, conversation).await,
        bodies,
        "the store holds every message, in order"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_a_projector_took_and_never_applied_still_reach_the_store() {
    // The next projector acknowledges what comes after them, which with ack policy `all`
    // acknowledges them too: they are never delivered again.
    taken_and_never_applied(3, &["taken 1", "taken 2", "after the taker died"], 2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_a_crashed_projector_took_reach_the_store_with_nothing_sent_after_them() {
    // Redelivered only after the ack wait (600 s here), and nothing later to skip over
    // them: the projector that takes the stalled pin reads them from the log.
    taken_and_never_applied(300, &["taken 1", "taken 2"], 2).await;
}

async fn log_stream(platform: &Platform) -> async_nats::jetstream::stream::Stream {
    platform
        .jetstream()
        .await
        .get_stream(LOG_STREAM)
        .await
        .unwrap()
}

/// Send `body` to `conversation` as `id`, and wait for its `ack`.
async fn sent(client: &mut Client, conversation: ConversationId, id: &str, body: &str) {
    support::acked(
        client,
        json!({"type": "send", "id": id, "conversation": conversation, "body": body}),
    )
    .await;
}

/// The bodies of `conversation`'s messages in `store`, in order.
async fn bodies_in(store: &dyn ConversationStore, conversation: ConversationId) -> Vec<String> {
    let mut messages = store
        .history(conversation, None, 100)
        .await
        .unwrap()
        .messages;
    messages.sort_by_key(|m| m.seq);
    messages.into_iter().map(|m| m.body).collect()
}

const STANDBY_STORE: &str = "standby.db";

/// A platform whose projector has a second instance beside it, on a store of its own, both
/// pulling before the log holds any event; and Alice with the sends that follow, all
/// acknowledged and projected by whichever instance the server pinned.
async fn two_projectors(takeover_secs: u64) -> (Platform, Running, Client, ConversationId) {
    let platform = Platform::start_with(1, |config| {
        config.projector.takeover_secs = takeover_secs;
    })
    .await;
    let standby = platform.spawn_projector(STANDBY_STORE).await;
    let log = log_stream(&platform).await;
    support::eventually(|| async {
        let info = log.consumer_info(PROJECTOR_CONSUMER).await.ok()?;
        (info.num_waiting >= 2).then_some(())
    })
    .await;
    let (mut alice, _bob, conversation) = platform.alice_and_bob().await;
    for i in 0..5 {
        sent(
            &mut alice,
            conversation,
            &format!("m{i}"),
            &format!("message {i}"),
        )
        .await;
    }
    (platform, standby, alice, conversation)
}

/// Which instance applied the events so far (`true`: the platform's own), once the other
/// has had the time to apply any it was given: one instance applied all, the other none.
async fn pinned_is_the_platforms(
    platform: &Platform,
    conversation: ConversationId,
    sent: usize,
) -> bool {
    let own = platform.store().await;
    let standby = platform.store_named(STANDBY_STORE).await;
    let applied = support::eventually(|| async {
        for (store, is_own) in [(&own, true), (&standby, false)] {
            if bodies_in(&**store, conversation).await.len() == sent {
                return Some(is_own);
            }
        }
        None
    })
    .await;
    // Instances sharing the consumer without a pin are handed alternate events within
    // milliseconds of each other; a standby's store stays empty.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let idle = if applied { &standby } else { &own };
    assert_eq!(
        idle.position().await.unwrap(),
        0,
        "the instance not pinned applied nothing"
    );
    applied
}

/// Two projectors, the pinned one lost (`crash`: as a crash would, else stopped cleanly),
/// then one more send: the other instance's store ends up with every message.
async fn the_standby_takes_over(takeover_secs: u64, crash: bool) {
    let (mut platform, standby, mut alice, conversation) = two_projectors(takeover_secs).await;
    let own_pinned = pinned_is_the_platforms(&platform, conversation, 5).await;
    let (lost, survivor) = if own_pinned {
        (
            platform.take_projector(),
            platform.store_named(STANDBY_STORE).await,
        )
    } else {
        (standby, platform.store().await)
    };
    if crash {
        lost.crash().await;
    } else {
        lost.stop().await;
    }
    // Messages keep coming, as on a live platform: a crashed instance's pull requests
    // outlive it at the server and may take the first ones, which the instance that takes
    // over reads from the log when it is handed a later one.
    let mut all: Vec<String> = (0..5).map(|i| format!("message {i}")).collect();
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    for i in 0.. {
        let body = format!("after {i}");
        sent(&mut alice, conversation, &format!("after-{i}"), &body).await;
        all.push(body);
        tokio::time::sleep(Duration::from_millis(500)).await;
        let projected = bodies_in(&*survivor, conversation).await;
        if projected == all {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the other instance has not taken over: {projected:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_projector_applies_nothing_and_takes_over_at_once_from_one_that_stops() {
    // A takeover through the pin's timeout would take longer than the test waits.
    the_standby_takes_over(300, false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_projector_takes_over_from_one_that_crashed_long_before_its_pin_times_out() {
    // The pin alone would keep the crashed instance's place for 300 s.
    the_standby_takes_over(300, true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_from_before_standby_projectors_is_updated_in_place_and_loses_nothing() {
    let mut platform = Platform::start(1).await;
    let (mut alice, _bob, conversation) = platform.alice_and_bob().await;
    sent(&mut alice, conversation, "m0", "before the upgrade").await;
    platform.projected().await;
    platform.stop_projector().await;

    // The consumer as earlier releases left it: no priority group, at the store's position.
    let log = log_stream(&platform).await;
    let position = platform.store().await.position().await.unwrap();
    log.delete_consumer(PROJECTOR_CONSUMER).await.unwrap();
    log.create_consumer(pull::Config {
        durable_name: Some(PROJECTOR_CONSUMER.into()),
        ack_policy: AckPolicy::All,
        deliver_policy: DeliverPolicy::ByStartSequence {
            start_sequence: position + 1,
        },
        ack_wait: Duration::from_secs(60),
        max_ack_pending: 2048,
        ..Default::default()
    })
    .await
    .unwrap();
    sent(&mut alice, conversation, "m1", "during the upgrade").await;

    platform.start_projector().await;
    platform.projected().await;
    assert_eq!(
        bodies_in(&*platform.store().await, conversation).await,
        ["before the upgrade", "during the upgrade"]
    );
    let config = log.consumer_info(PROJECTOR_CONSUMER).await.unwrap().config;
    assert_eq!(config.priority_policy, PriorityPolicy::PinnedClient);
    assert_eq!(config.priority_groups, [PROJECTOR_PRIORITY_GROUP]);
    assert_eq!(
        config.deliver_policy,
        DeliverPolicy::ByStartSequence {
            start_sequence: position + 1
        },
        "its start kept"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_projector_started_during_a_replay_is_ready_once_the_store_has_caught_up() {
    let mut platform = Platform::start(1).await;
    let (mut alice, _bob, conversation) = platform.alice_and_bob().await;
    platform.stop_projector().await;
    // Further behind than the lag (1,000 events) at which a starting projector says it is
    // replaying, and is not ready until the store has caught up.
    for round in 0..11 {
        let ids: Vec<String> = (0..100).map(|i| format!("m{round}-{i}")).collect();
        alice
            .send_pipelined(ids.iter().map(
                |id| json!({"type": "send", "id": id, "conversation": conversation, "body": id}),
            ))
            .await;
        for id in &ids {
            assert_eq!(alice.reply_to(id).await["type"], "ack");
        }
    }

    // Two instances on the one store: the pinned one replays, the other is handed nothing.
    let standby = platform.spawn_projector("conversations.db").await;
    platform.start_projector().await;
    for admin in [platform.projector_admin(), standby.admin()] {
        support::eventually_within(Duration::from_secs(60), || async move {
            let (status, _) = support::http_get(admin, "/readyz").await;
            (status == 200).then_some(())
        })
        .await;
    }
    platform.projected().await;
}
