#!/usr/bin/env bash
# The JS client's tests: install the locked packages, build, unit tests, then the
# integration tests against a real `parley up` ($PARLEY_BIN, default the workspace's
# target/debug/parley, which infra/test.sh's cargo tests have just built).
set -euo pipefail

cd "$(dirname "$0")"
repo=$(cd ../.. && pwd)
export PARLEY_BIN=${PARLEY_BIN:-$repo/target/debug/parley}
if [ ! -x "$PARLEY_BIN" ]; then
    echo "clients/js/test.sh: no parley binary at $PARLEY_BIN (cargo build -p parley-services, or set PARLEY_BIN)" >&2
    exit 1
fi

npm ci --no-audit --no-fund
npm run build
npm test
npm run test:integration
npm run size
