#!/usr/bin/env bash
# The project's test command: installs the local servers, checks k8s/ and the dashboard
# and alerts, then format check, clippy and the whole workspace's tests (integration tests
# start real nats-server / redis-server from .parley/bin through the parley-localstack
# crate, and a local Cassandra node for the CQL store's conformance suite and fault tests),
# then the TypeScript client's tests (clients/js/test.sh: npm ci, build, unit tests,
# integration tests against target/debug/parley) and the web chat's browser tests
# (clients/web/test.sh: Debian's Chromium driven by playwright-core).
set -euo pipefail

cd "$(dirname "$0")/.."
start=$SECONDS
# A whole-suite run gains little from incremental caches, and they took 2.5 GB of the
# disk; a developer who wants them sets CARGO_INCREMENTAL=1.
export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"

infra/install.sh
# k8s/: every overlay rendered and validated offline, and the check shown to fail on
# broken copies of it (tools cached under .parley/tools after the first run).
infra/k8s-check.sh
infra/k8s-check-test.sh
# The Grafana dashboard and the Prometheus alerts: metric names, PromQL, alert unit tests.
infra/observability-check.sh
# The CQL store's tests must run in CI, never skip: cassandra.sh fails without Java, and
# the tests fail instead of skipping.
export PARLEY_REQUIRE_CQL=1
infra/cassandra.sh
cargo fmt --all -- --check
# Clippy runs inside the test build (infra/clippy-rustc.sh); --all-targets also lints the
# benches and examples, as `cargo clippy --all-targets` would.
export RUSTC_WORKSPACE_WRAPPER="$PWD/infra/clippy-rustc.sh"
cargo test --workspace --all-targets --no-run
if cargo nextest --version >/dev/null 2>&1; then
    cargo nextest run --workspace
    # nextest does not run doc tests.
    cargo test --workspace --doc
else
    cargo test --workspace
fi
# The TypeScript client's tests run against the parley binary the cargo tests just built.
clients/js/test.sh
clients/web/test.sh

echo "infra/test.sh: install, fmt, clippy, Rust, JS and browser tests passed in $((SECONDS - start)) s"
