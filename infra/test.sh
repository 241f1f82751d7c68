#!/usr/bin/env bash
# The project's test command: installs the local servers, then format check, clippy and
# the whole workspace's tests (integration tests start real nats-server / redis-server
# from .parley/bin through the parley-localstack crate).
set -euo pipefail

cd "$(dirname "$0")/.."
start=$SECONDS

infra/install.sh
cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
if cargo nextest --version >/dev/null 2>&1; then
    cargo nextest run --workspace
    # nextest does not run doc tests.
    cargo test --workspace --doc
else
    cargo test --workspace
fi

echo "infra/test.sh: install, fmt, clippy and tests passed in $((SECONDS - start)) s"
