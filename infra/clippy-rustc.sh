#!/usr/bin/env bash
# The compiler infra/test.sh builds the workspace's own crates with (cargo's
# RUSTC_WORKSPACE_WRAPPER, as `cargo clippy` sets it): clippy's driver with every warning
# denied, so one build lints every target and produces the test binaries. A separate
# `cargo clippy` would type-check the whole dependency tree a second time, 7 of CI's 26
# minutes. Dependencies are compiled by plain rustc, their lints capped as always.
exec clippy-driver "$@" -D warnings
