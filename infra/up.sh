#!/usr/bin/env bash
# The project's run command: installs the local servers if needed, then runs every Parley
# role in one process (`parley up`), starting nats-server and redis-server as child
# processes unless PARLEY_NATS__URL / PARLEY_REDIS__URL (or a config file) name running ones.
# Extra arguments go to `parley`, e.g. `infra/up.sh --config parley.toml`.
set -euo pipefail

cd "$(dirname "$0")/.."
infra/install.sh
exec cargo run --quiet --release -p parley-services --bin parley -- "$@" up
