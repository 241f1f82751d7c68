//! `[replay]` under the harness: a short run against a spawned platform in which the
//! projection is rebuilt into a new SQLite file and switched to while 100 messages/s keep
//! flowing. Asserts correctness, never speed: the ledger clean throughout, the switch made
//! and every live role moved, the rebuild stopped cleanly, and a gateway's history after
//! the sending read from the rebuilt file (its newest message one the old store, left at
//! the switch, does not have). About 25 s.

use parley_loadtest::Scenario;
use parley_loadtest::report::render_table;

mod support;

#[test]
fn rebuild_and_switch_under_load_keep_the_ledger_clean_and_move_the_readers() {
    let scenario = Scenario::parse(
        r#"
        name = "replay-ci"
        users = 24
        connect_rate = 400
        duration_secs = 12
        message_bytes = 64
        gateways = 2
        [conversations]
        direct_pairs = 8
        groups = [{ size = 4, count = 2, senders = 2 }]
        [rate]
        messages_per_sec = 100
        [replay]
        rebuild_at_secs = 2
        switch_at_secs = 5
        "#,
        "replay test",
    )
    .unwrap();
    scenario.validate().unwrap();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let (outcome, _out) = runtime.block_on(support::spawned_run(scenario, "replay test"));
    let report = outcome.report;
    println!("{}", render_table(&report));

    let ledger = &report.ledger;
    assert!(ledger.log_checked, "the log was not read: {ledger:?}");
    assert!(ledger.acknowledged_messages > 0, "{ledger:?}");
    assert_eq!(ledger.acked_not_in_log, 0, "{:?}", ledger.examples);
    assert_eq!(ledger.appended_twice, 0, "{:?}", ledger.examples);
    assert!(report.passed, "ledger: {ledger:?}");

    let replay = report.replay.as_ref().expect("the replay ran");
    assert_eq!(replay.error, None, "{replay:?}");
    let (rebuilt_at, switched_at) = (
        replay.rebuild_started_at_secs.unwrap(),
        replay.switch_started_at_secs.unwrap(),
    );
    assert!(rebuilt_at >= 2.0 && switched_at >= 5.0, "{replay:?}");
    assert_eq!(replay.switch_exit, Some(0), "{}", replay.switch_output);
    let out = &replay.switch_output;
    assert!(
        out.starts_with(&format!("switched to {}", replay.target)),
        "{out}"
    );
    for role in ["gateway", "projector"] {
        assert!(
            out.lines()
                .any(|l| l.trim_start().starts_with("moved: ") && l.ends_with(&format!(".{role}"))),
            "no {role} moved: {out}"
        );
    }
    // Two gateways and one projector, each recorded as moved.
    assert_eq!(out.matches("moved: ").count(), 3, "{out}");
    assert_eq!(replay.rebuild_exit, Some(0), "{}", replay.rebuild_output);
    assert!(
        replay
            .rebuild_output
            .starts_with(&format!("rebuilt {}", replay.target)),
        "{}",
        replay.rebuild_output
    );
    assert!(replay.read_from_target, "{replay:?}");
    assert!(replay.succeeded());
}
