//! What the spawned test binaries share: a run of a scenario against a platform the harness
//! spawns from the `parley` binary the workspace build puts next to the tests.

use parley_loadtest::Scenario;
use parley_loadtest::platform::locate_parley;
use parley_loadtest::run::{self, RunOptions, RunOutcome, Target};

/// Run `scenario` against a spawned platform; the run's directory lives as long as the
/// returned `TempDir`.
pub async fn spawned_run(scenario: Scenario, command: &str) -> (RunOutcome, tempfile::TempDir) {
    let parley = locate_parley(&std::env::current_exe().unwrap()).unwrap_or_else(|e| {
        panic!("{e}; `cargo test --workspace` builds it, or run `cargo build -p parley-services --bin parley` first")
    });
    let out = tempfile::tempdir().unwrap();
    let outcome = run::run(RunOptions {
        scenario,
        target: Target::Spawn {
            parley: Some(parley),
        },
        out_dir: out.path().to_owned(),
        progress: false,
        command: command.into(),
    })
    .await
    .unwrap();
    (outcome, out)
}
