//! Group commit: a handler lane appends the events it has queued as one atomic batch. The
//! bursts here are queued on the intake while the handler is stopped, so its lane finds
//! them all at once; every invariant of single appends must still hold.

mod support;

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use futures::StreamExt;
use parley_events::subjects::{
    INTAKE_PARTITIONS, LOG_STREAM, OUTCOME_BATCHES_HEADER, handler_consumer,
};
use parley_events::{
    Action, ClientMsgId, Command, CommandId, ConversationId, Event, Outcome, OutcomeResult, UserId,
};
use parley_services::config::Config;
use parley_services::unix_millis;
use support::Platform;

fn user(name: &str) -> UserId {
    UserId::parse(name).unwrap()
}

/// A command of `actor` as a gateway puts it on the intake, answered on `parley.outcome.test`.
fn command(actor: &str, id: &str, action: Action) -> Command {
    Command::new(
        user(actor),
        ClientMsgId::parse(id).unwrap(),
        unix_millis(),
        "parley.outcome.test".into(),
        action,
    )
}

fn create_direct(peer: &str) -> Command {
    command(
        "alice",
        &format!("dm-{peer}"),
        Action::CreateDirect { peer: user(peer) },
    )
}

fn post(conversation: ConversationId, id: &str) -> Command {
    command(
        "alice",
        id,
        Action::PostMessage {
            conversation,
            body: id.into(),
            reply_to: None,
        },
    )
}

/// Messages the handlers' intake consumers have delivered so far, redeliveries included.
async fn intake_deliveries(platform: &Platform) -> u64 {
    let intake = platform
        .jetstream()
        .await
        .get_stream(parley_events::subjects::INTAKE_STREAM)
        .await
        .unwrap();
    let mut delivered = 0;
    for partition in 0..INTAKE_PARTITIONS {
        delivered += intake
            .consumer_info(handler_consumer(partition))
            .await
            .unwrap()
            .delivered
            .consumer_sequence;
    }
    delivered
}

/// Publish `commands` to the intake in order, each as its own message (a command listed
/// twice is on the intake twice, as a gateway's resubmission would put it), all before
/// waiting for the first ack: a burst. Like a gateway from before outcome batches, they do
/// not say that they read several outcomes in one message, so [`answers`] reads one.
async fn enqueue(platform: &Platform, commands: &[Command]) {
    enqueue_with(platform, commands, async_nats::HeaderMap::new()).await
}

/// [`enqueue`] with `headers` on every command.
async fn enqueue_with(platform: &Platform, commands: &[Command], headers: async_nats::HeaderMap) {
    let js = platform.jetstream().await;
    let mut acks = Vec::new();
    for command in commands {
        acks.push(
            js.publish_with_headers(
                platform.intake_subject(command.conversation()),
                headers.clone(),
                command.to_bytes().into(),
            )
            .await
            .unwrap(),
        );
    }
    for ack in acks {
        ack.await.unwrap();
    }
}

/// Outcomes read from `outcomes` until every command of `expected` has one; a command
/// answered twice must be answered the same both times.
async fn answers(
    outcomes: &mut async_nats::Subscriber,
    expected: &[Command],
) -> HashMap<CommandId, OutcomeResult> {
    let wanted: HashSet<CommandId> = expected.iter().map(|command| command.id).collect();
    let mut answered = HashMap::new();
    while !wanted.iter().all(|id| answered.contains_key(id)) {
        let message = tokio::time::timeout(Duration::from_secs(30), outcomes.next())
            .await
            .expect("every command is answered")
            .unwrap();
        let outcome = Outcome::from_bytes(&message.payload).unwrap();
        if let Some(earlier) = answered.insert(outcome.command, outcome.result.clone()) {
            assert_eq!(earlier, outcome.result, "answered differently twice");
        }
    }
    answered
}

/// The seq a command was acknowledged with; panics on a rejection.
fn acked_seq(answers: &HashMap<CommandId, OutcomeResult>, command: &Command) -> u64 {
    match &answers[&command.id] {
        OutcomeResult::Accepted { seq, .. } => *seq,
        other => panic!("{} was not accepted: {other:?}", command.client_id.as_str()),
    }
}

/// The log's invariants: each command's event once, one unbroken `prev` chain per
/// conversation; returns the log's posted bodies per conversation, in log order.
async fn checked_log(platform: &Platform) -> HashMap<ConversationId, Vec<(u64, String)>> {
    let log = platform.log().await;
    let mut commands = HashSet::new();
    let mut newest: HashMap<ConversationId, u64> = HashMap::new();
    let mut posted: HashMap<ConversationId, Vec<(u64, String)>> = HashMap::new();
    for event in &log {
        assert!(
            commands.insert(event.envelope.command),
            "seq {}: a command appended twice",
            event.seq
        );
        let conversation = event.envelope.conversation;
        let previous = newest.insert(conversation, event.seq).unwrap_or(0);
        assert_eq!(
            event.envelope.prev, previous,
            "seq {} breaks its conversation's chain",
            event.seq
        );
        if let Event::MessagePosted(message) = &event.envelope.event {
            posted
                .entry(conversation)
                .or_default()
                .push((event.seq, message.body.clone()));
        }
    }
    posted
}

/// How many log events were stored as part of an atomic batch.
async fn batched_events(platform: &Platform) -> usize {
    let js = platform.jetstream().await;
    let mut log = js.get_stream(LOG_STREAM).await.unwrap();
    let last = log.info().await.unwrap().state.last_sequence;
    let mut batched = 0;
    for seq in 1..=last {
        let message = log.direct_get(seq).await.unwrap();
        if message.headers.get("Nats-Batch-Id").is_some() {
            batched += 1;
        }
    }
    batched
}

/// A burst of creations and posts for many conversations (three posts each, one of them on
/// the intake twice), taken by one lane; checks everything and returns the events stored
/// in batches.
async fn burst(max_batch: usize) -> usize {
    burst_with(|config| {
        config.handler.lanes = 1;
        config.handler.max_batch = max_batch;
    })
    .await
}

/// [`burst`] with the handler configured by `adjust`.
async fn burst_with(adjust: impl FnOnce(&mut Config)) -> usize {
    let mut platform = Platform::start_with(1, adjust).await;
    let client = async_nats::connect(platform.nats.url()).await.unwrap();
    let mut outcomes = client.subscribe("parley.outcome.test").await.unwrap();
    platform.stop_handler().await;

    let peers: Vec<String> = (0..40).map(|i| format!("peer{i}")).collect();
    let mut commands = Vec::new();
    let mut posts = Vec::new();
    for peer in &peers {
        let create = create_direct(peer);
        let conversation = create.conversation();
        commands.push(create);
        let mine: Vec<Command> = (0..3)
            .map(|k| post(conversation, &format!("{peer}-{k}")))
            .collect();
        commands.extend(mine.iter().cloned());
        posts.push((conversation, mine));
    }
    let mut on_the_intake = commands.clone();
    // Redelivered: the second post of every fourth conversation is on the intake twice.
    for (_, mine) in posts.iter().step_by(4) {
        on_the_intake.push(mine[1].clone());
    }
    let delivered_before = intake_deliveries(&platform).await;
    enqueue(&platform, &on_the_intake).await;
    platform.start_handler().await;

    let answered = answers(&mut outcomes, &commands).await;
    // Every intake message was taken once: none was left to come back after its ack wait
    // (a lane that dropped a command it held back would rely on that redelivery).
    assert_eq!(
        intake_deliveries(&platform).await - delivered_before,
        on_the_intake.len() as u64,
        "deliveries of {} intake messages",
        on_the_intake.len()
    );
    let posted = checked_log(&platform).await;
    assert_eq!(
        platform.log().await.len(),
        commands.len(),
        "every command appended once"
    );
    for (conversation, mine) in &posts {
        // Acknowledged at the seqs the log holds them at, in the order they were sent.
        let acked: Vec<(u64, String)> = mine
            .iter()
            .map(|command| {
                (
                    acked_seq(&answered, command),
                    command.client_id.as_str().to_owned(),
                )
            })
            .collect();
        assert_eq!(posted[conversation], acked);
        assert!(acked.windows(2).all(|pair| pair[0].0 < pair[1].0));
    }
    batched_events(&platform).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_for_many_conversations_is_committed_in_batches_with_every_chain_intact() {
    let batched = burst(256).await;
    assert!(batched > 0, "no event was appended in an atomic batch");
}

/// Batches smaller than the conversations waiting: a batch fills while commands held back
/// from the last round remain, and those must open the next round, none dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_held_back_when_a_batch_fills_are_appended_in_later_batches() {
    let batched = burst(20).await;
    assert!(batched > 0, "no event was appended in an atomic batch");
}

/// 64 lanes over 64 shards, one commit in flight: what lanes hand over while it is out is
/// merged.
fn merging_across_lanes(config: &mut Config) {
    config.handler.lanes = 64;
    config.handler.max_batch = 256;
    config.handler.commits_in_flight = 1;
    config.log.shards = 64;
}

/// Forty conversations over 64 lanes: no lane ever holds the 16 events a batch of its own
/// needs, so only merging what many lanes hand over while the one commit in flight is out
/// makes batches.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn single_events_of_many_lanes_are_merged_into_batches_with_every_chain_intact() {
    let batched = burst_with(merging_across_lanes).await;
    assert!(batched > 0, "no event was appended in an atomic batch");
}

/// A gateway that reads batches gets the outcomes answered together in one message: a
/// merged commit answers many lanes at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outcomes_answered_together_reach_a_gateway_that_reads_batches_in_one_message() {
    let mut platform = Platform::start_with(1, merging_across_lanes).await;
    let client = async_nats::connect(platform.nats.url()).await.unwrap();
    let mut outcomes = client.subscribe("parley.outcome.test").await.unwrap();
    platform.stop_handler().await;
    let creations: Vec<Command> = (0..40)
        .map(|i| create_direct(&format!("peer{i}")))
        .collect();
    let mut batches = async_nats::HeaderMap::new();
    batches.insert(OUTCOME_BATCHES_HEADER, "1");
    enqueue_with(&platform, &creations, batches).await;
    platform.start_handler().await;

    let mut answered: HashMap<CommandId, OutcomeResult> = HashMap::new();
    let mut largest = 0;
    while answered.len() < creations.len() {
        let message = tokio::time::timeout(Duration::from_secs(30), outcomes.next())
            .await
            .expect("every command is answered")
            .unwrap();
        let read = Outcome::all_from_bytes(&message.payload).unwrap();
        largest = largest.max(read.len());
        for outcome in read {
            let again = answered.insert(outcome.command, outcome.result);
            assert!(again.is_none(), "{:?} answered twice", outcome.command);
        }
    }
    for creation in &creations {
        acked_seq(&answered, creation);
    }
    assert!(largest > 1, "every outcome came alone");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_batch_of_one_every_event_is_appended_alone() {
    assert_eq!(burst(1).await, 0);
}

/// Two posts in every conversation `creations` made, queued at once, each acknowledged;
/// returns them.
async fn post_round(
    platform: &Platform,
    outcomes: &mut async_nats::Subscriber,
    creations: &[Command],
    round: usize,
) -> Vec<Command> {
    let burst: Vec<Command> = creations
        .iter()
        .enumerate()
        .flat_map(|(i, create)| {
            (0..2).map(move |k| post(create.conversation(), &format!("c{i}-r{round}-{k}")))
        })
        .collect();
    enqueue(platform, &burst).await;
    let answered = answers(outcomes, &burst).await;
    for command in &burst {
        acked_seq(&answered, command);
    }
    burst
}

/// A platform configured by `adjust`, 60 conversations created, then a second handler; with
/// a subscription to the outcomes of commands queued by [`enqueue`].
async fn two_handlers_and_conversations(
    adjust: impl FnOnce(&mut Config),
) -> (Platform, async_nats::Subscriber, Vec<Command>) {
    let mut platform = Platform::start_with(1, adjust).await;
    let client = async_nats::connect(platform.nats.url()).await.unwrap();
    let mut outcomes = client.subscribe("parley.outcome.test").await.unwrap();
    let peers: Vec<String> = (0..60).map(|i| format!("peer{i}")).collect();
    let creations: Vec<Command> = peers.iter().map(|peer| create_direct(peer)).collect();
    enqueue(&platform, &creations).await;
    answers(&mut outcomes, &creations).await;
    platform.add_handler().await;
    (platform, outcomes, creations)
}

/// Held by the tests that count append conflicts, which every handler in this process adds
/// to: one such test's handlers must not add to another's count.
static CONFLICT_COUNT: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// The count of append conflicts the process's handlers have met so far.
async fn conflicts(platform: &Platform) -> u64 {
    let admin = platform.admin_addresses()[0];
    let (_, metrics) = support::http_get(admin, "/metrics").await;
    metrics
        .lines()
        .find_map(|line| line.strip_prefix("parley_handler_append_conflicts_total "))
        .map_or(0, |value| value.trim().parse().unwrap())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_handlers_batching_the_same_shards_lose_and_duplicate_nothing() {
    let _counting = CONFLICT_COUNT.lock().await;
    // Four shards, a lane each: the two instances' batches (a lane's own, or merged across
    // lanes) meet on every shard, and a batch whose expected sequence the other instance
    // made stale is refused as a whole. Under one name both instances own every intake
    // partition, as two instances do for a moment while one joins or leaves.
    let (platform, mut outcomes, creations) = two_handlers_and_conversations(|config| {
        config.handler.lanes = 4;
        config.handler.max_batch = 256;
        config.handler.commits_in_flight = 1;
        config.handler.instance = Some("shared".into());
        config.log.shards = 4;
    })
    .await;

    let before = conflicts(&platform).await;
    let mut sent = Vec::new();
    // Rounds until the instances have met; the log is checked after every one.
    for round in 0..5 {
        sent.extend(post_round(&platform, &mut outcomes, &creations, round).await);
        let posted = checked_log(&platform).await;
        let appended: usize = posted.values().map(Vec::len).sum();
        assert_eq!(appended, sent.len(), "every post appended once");
        if conflicts(&platform).await > before {
            break;
        }
    }
    assert!(
        conflicts(&platform).await > before,
        "the two instances never met on a shard"
    );
    assert!(
        batched_events(&platform).await > 0,
        "no event was appended in an atomic batch"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_handlers_own_disjoint_partitions_and_their_appends_never_conflict() {
    let _counting = CONFLICT_COUNT.lock().await;
    let (platform, mut outcomes, creations) =
        two_handlers_and_conversations(|config| config.handler.max_batch = 256).await;
    platform.handlers_announced(2).await;
    // The first instance gave half its partitions up when it saw the second's name; the
    // pull requests it had sent for them at owner priority run out within their 3 s.
    tokio::time::sleep(Duration::from_secs(4)).await;

    // Each burst touches every shard.
    for round in 0..8 {
        let before = conflicts(&platform).await;
        post_round(&platform, &mut outcomes, &creations, round).await;
        let met = conflicts(&platform).await - before;
        assert_eq!(met, 0, "round {round}: the instances met on a shard");
    }
    let appended: usize = checked_log(&platform).await.values().map(Vec::len).sum();
    assert_eq!(
        appended,
        8 * 2 * creations.len(),
        "every post appended once"
    );
}
