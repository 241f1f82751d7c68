#!/usr/bin/env bash
# The project's run command: installs the local servers if needed, then runs every Parley
# role in one process (`parley up`), starting nats-server and redis-server as child
# processes unless PARLEY_NATS__URL / PARLEY_REDIS__URL (or a config file) name running ones.
# Extra arguments go to `parley`, e.g. `infra/up.sh --config parley.toml`.
set -euo pipefail

cd "$(dirname "$0")/.."
infra/install.sh
# The web chat, which `parley up` serves at / (clients/web/dist): built when npm is here and
# the page is missing or older than its sources.
if command -v npm >/dev/null 2>&1; then
    if [ ! -f clients/web/dist/index.html ] \
        || [ -n "$(find clients/web/src clients/js/src -newer clients/web/dist/index.html -print -quit)" ]; then
        echo "infra/up.sh: building the web chat (clients/js, clients/web)" >&2
        (cd clients/js && npm ci --no-audit --no-fund --silent && npm run build --silent) >&2
        (cd clients/web && npm ci --no-audit --no-fund --silent && npm run build --silent) >&2
    fi
else
    echo "infra/up.sh: no npm here; the web chat is not built (parley up serves /ws only)" >&2
fi
exec cargo run --quiet --release -p parley-services --bin parley -- "$@" up
