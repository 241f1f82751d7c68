//! The binary refuses bad flags and scenarios with a clear message and exit code 2.

use std::process::Command;

fn run(args: &[&str]) -> (i32, String) {
    let output = Command::new(env!("CARGO_BIN_EXE_parley-loadtest"))
        .args(args)
        .env_remove("PARLEY_AUTH__SECRET")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&output.stderr).into_owned();
    (output.status.code().unwrap_or(-1), text)
}

fn scenario(dir: &tempfile::TempDir, text: &str) -> String {
    let path = dir.path().join("s.toml");
    std::fs::write(&path, text).unwrap();
    path.display().to_string()
}

#[test]
fn a_scenario_is_required() {
    let (code, err) = run(&["--spawn"]);
    assert_eq!(code, 2);
    assert!(err.contains("--scenario"), "{err}");
}

#[test]
fn an_invalid_scenario_names_its_problems() {
    let dir = tempfile::tempdir().unwrap();
    let path = scenario(&dir, "name = \"x\"\nusers = 0\nduration_secs = -1\n");
    let (code, err) = run(&["--spawn", "--scenario", &path]);
    assert_eq!(code, 2);
    assert!(err.contains("users must be at least 1"), "{err}");
    assert!(
        err.contains("duration_secs must be a positive number"),
        "{err}"
    );
    let path = scenario(
        &dir,
        "name = \"x\"\nusers = 2\nduration_secs = 1\nspeed = 3\n",
    );
    let (code, err) = run(&["--spawn", "--scenario", &path]);
    assert_eq!(code, 2);
    assert!(err.contains("speed"), "{err}");
}

#[test]
fn an_external_target_needs_gateways_and_a_secret() {
    let dir = tempfile::tempdir().unwrap();
    let path = scenario(&dir, "name = \"x\"\nusers = 2\nduration_secs = 1\n");
    let (code, err) = run(&["--scenario", &path]);
    assert_eq!(code, 2);
    assert!(err.contains("--spawn, or --gateway"), "{err}");
    let (code, err) = run(&["--scenario", &path, "--gateway", "ws://127.0.0.1:1/ws"]);
    assert_eq!(code, 2);
    assert!(err.contains("--secret"), "{err}");
}

#[test]
fn conflicting_and_malformed_flags_are_refused() {
    let (code, err) = run(&["--spawn", "--gateway", "ws://x/ws", "--scenario", "s.toml"]);
    assert_eq!(code, 2);
    assert!(err.contains("cannot be used with"), "{err}");
    let (code, err) = run(&[
        "--scenario",
        "s.toml",
        "--spawn",
        "--durability",
        "sometimes",
    ]);
    assert_eq!(code, 2);
    assert!(err.contains("sometimes"), "{err}");
    let (code, err) = run(&["--scenario", "/nonexistent/s.toml", "--spawn"]);
    assert_eq!(code, 2);
    assert!(err.contains("cannot read scenario"), "{err}");
}
