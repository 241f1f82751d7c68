//! Short runs against a platform the harness starts itself: real nats-server, redis-server
//! and `parley` role processes. Assert a clean ledger, never a latency.

mod support;

use parley_loadtest::run::RunOutcome;
use parley_loadtest::{Overrides, Scenario};

/// Run the scenario `toml` against a spawned platform.
async fn spawned_run(toml: &str, name: &str) -> (RunOutcome, tempfile::TempDir) {
    let scenario = Scenario::parse(toml, name)
        .unwrap()
        .with_overrides(&Overrides::default())
        .unwrap();
    support::spawned_run(scenario, "test").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_run_has_a_clean_ledger() {
    let (outcome, _out) = spawned_run(
        r#"
        name = "e2e"
        users = 40
        connections_per_user = 1
        connect_rate = 400
        duration_secs = 3
        message_bytes = 64
        durability = "lazy"
        gateways = 2
        # The ledger reads packed messages as it reads frames that come alone.
        pack = true
        [conversations]
        direct_pairs = 12
        groups = [{ size = 8, count = 2, senders = 3 }]
        [rate]
        messages_per_sec = 150
        "#,
        "e2e",
    )
    .await;
    let report = &outcome.report;
    assert!(report.passed, "ledger: {:?}", report.ledger);
    assert_eq!(report.connections.connected, 40);
    assert!(report.errors.is_empty(), "errors: {:?}", report.errors);
    // 12 pairs with 2 senders each and 2 groups with 3: 30 slots sharing 150/s for 3 s. A
    // late timer on a loaded machine may end sending before the last of them is due, so
    // the counts are bounds; the ledger is what must be exact.
    assert!(report.sends.scheduled <= 450, "{:?}", report.sends);
    assert!(report.sends.sent > 0 && report.sends.sent <= 450);
    let ledger = &report.ledger;
    assert!(ledger.log_checked, "{ledger:?}");
    assert_eq!(ledger.acknowledged_messages, report.sends.acked);
    assert_eq!(
        ledger.unacknowledged,
        report.sends.sent - report.sends.acked,
        "{ledger:?}"
    );
    assert_eq!(ledger.unacknowledged_unclassified, 0, "{ledger:?}");
    // Every message reaches every member (pairs twice, groups of 8 eight times), and so do
    // the 14 creations.
    assert!(
        ledger.expected_deliveries >= 2 * report.sends.acked + 24 * 2 + 2 * 8,
        "{ledger:?}"
    );
    assert!(report.environment.durability.contains("lazy"));
    assert_eq!(report.throughput.offered_per_sec, Some(150.0));
    for name in [
        "gateway-0",
        "gateway-1",
        "handler",
        "projector",
        "nats-server",
        "harness",
    ] {
        assert!(
            report.processes.iter().any(|p| p.name == name),
            "no figures for {name}: {:?}",
            report.processes
        );
    }
    // Messages were acknowledged in the measured window, so every process has a CPU cost
    // per message, from its CPU time.
    for process in &report.processes {
        let per_message = process.cpu_us_per_message;
        assert!(
            per_message.is_some_and(|us| us.is_finite() && us >= 0.0),
            "{process:?}"
        );
    }
    // The projection was sampled from the log and the projector's consumer every second:
    // by the end of the run it had acknowledged what the run appended.
    let projection = report.projection.as_ref().expect("projection figures");
    assert!(projection.samples > 0, "{projection:?}");
    let last = report
        .timeline
        .iter()
        .rev()
        .find_map(|p| p.projection)
        .expect("a projection sample");
    assert!(
        last.acknowledged > 0 && last.log_end >= last.acknowledged,
        "{last:?}"
    );
    assert!(outcome.dir.join("report.json").is_file());
    assert!(outcome.dir.join("report.svg").is_file());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_on_a_three_node_cluster_is_clean_and_says_r3() {
    let (outcome, _out) = spawned_run(
        r#"
        name = "e2e-cluster"
        users = 8
        duration_secs = 2
        message_bytes = 64
        nats_nodes = 3
        [conversations]
        direct_pairs = 4
        [rate]
        messages_per_sec = 40
        "#,
        "e2e-cluster",
    )
    .await;
    let report = &outcome.report;
    assert!(report.passed, "ledger: {:?}", report.ledger);
    assert_eq!(report.ledger.acknowledged_messages, 80);
    let durability = &report.environment.durability;
    assert!(
        durability.starts_with("R3 on a 3-node nats cluster") && durability.contains("always"),
        "{durability}"
    );
    assert!(
        report.environment.platform.contains("3-node nats cluster"),
        "{}",
        report.environment.platform
    );
    for name in ["nats-server-0", "nats-server-1", "nats-server-2"] {
        assert!(
            report.processes.iter().any(|p| p.name == name),
            "no figures for {name}: {:?}",
            report.processes
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_dropped_at_random_and_in_an_outage_resume_everything() {
    let (outcome, _out) = spawned_run(
        r#"
        name = "e2e-reconnects"
        users = 30
        duration_secs = 8
        message_bytes = 64
        durability = "lazy"
        [conversations]
        direct_pairs = 10
        groups = [{ size = 10, count = 1, senders = 2 }]
        [rate]
        messages_per_sec = 120
        [reconnects]
        drops_per_sec = 3
        clean_ratio = 0.5
        backoff_base_ms = 50
        backoff_cap_ms = 500
        outage = { at_secs = 2, down_secs = 3 }
        "#,
        "e2e-reconnects",
    )
    .await;
    let report = &outcome.report;
    assert!(report.passed, "ledger: {:?}", report.ledger);
    let resume = &report.resume;
    // The silent members of the group (8, less any that were away when it began).
    let outage = resume.outage.as_ref().expect("the outage's resumes");
    assert!((1..=8).contains(&outage.devices), "{resume:?}");
    assert!(outage.events > 0, "{resume:?}");
    assert!(
        resume.drops_clean > 0 && resume.drops_abrupt > 0,
        "{resume:?}"
    );
    assert!(resume.reconnected_fraction >= 0.2, "{resume:?}");
    assert!(resume.resumed_events >= outage.events, "{resume:?}");
    assert_eq!(report.ledger.excluded_connections, 0, "{:?}", report.ledger);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_larger_than_a_creation_is_filled_by_additions_and_every_member_gets_every_message()
{
    let (outcome, _out) = spawned_run(
        r#"
        name = "batched-group"
        users = 1050
        connect_rate = 2000
        duration_secs = 2
        message_bytes = 64
        durability = "lazy"
        [conversations]
        groups = [{ size = 1050, count = 1, senders = 2 }]
        [rate]
        messages_per_sec = 10
        "#,
        "batched-group",
    )
    .await;
    let report = &outcome.report;
    assert!(report.passed, "ledger: {:?}", report.ledger);
    assert_eq!(report.connections.connected, 1050);
    assert!(report.errors.is_empty(), "errors: {:?}", report.errors);
    let ledger = &report.ledger;
    assert!(
        ledger.log_checked && ledger.acknowledged_messages > 0,
        "{ledger:?}"
    );
    // The creation (1,001 members) and the addition (49) reach every member from the event
    // that made it one, and every acknowledged message all 1,050: nothing before an
    // addition is owed to the members it added.
    assert_eq!(
        ledger.expected_deliveries,
        1001 * 2 + 49 + 1050 * ledger.acknowledged_messages,
        "{ledger:?}"
    );
}
