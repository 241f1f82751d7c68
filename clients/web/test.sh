#!/usr/bin/env bash
# The web chat's tests: Debian's Chromium and emoji font (installed from Debian's archive
# when missing), the locked npm packages (playwright-core drives the system browser; it
# downloads none), the page built over the client library (clients/js/test.sh builds it
# first), then two users chatting in two browser contexts against a real `parley up`
# ($PARLEY_BIN, default the workspace's target/debug/parley). Screenshots land in
# clients/web/test-artifacts/.
set -euo pipefail

cd "$(dirname "$0")"
repo=$(cd ../.. && pwd)
export PARLEY_BIN=${PARLEY_BIN:-$repo/target/debug/parley}
if [ ! -x "$PARLEY_BIN" ]; then
    echo "clients/web/test.sh: no parley binary at $PARLEY_BIN (cargo build -p parley-services, or set PARLEY_BIN)" >&2
    exit 1
fi

# The emoji font draws the reaction buttons in the screenshots (without it they are
# empty boxes); a browser given by $CHROMIUM is taken as it is.
packages=()
[ -n "${CHROMIUM:-}" ] || command -v chromium >/dev/null || packages+=(chromium)
[ -n "${CHROMIUM:-}" ] || [ -f /usr/share/fonts/truetype/noto/NotoColorEmoji.ttf ] || packages+=(fonts-noto-color-emoji)
if [ ${#packages[@]} -gt 0 ]; then
    echo "clients/web/test.sh: installing ${packages[*]} from Debian's archive for the browser tests" >&2
    as_root=()
    [ "$(id -u)" -eq 0 ] || as_root=(sudo -n)
    if ! "${as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${packages[@]}" >/dev/null; then
        "${as_root[@]}" apt-get update -q >/dev/null
        "${as_root[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${packages[@]}" >/dev/null
    fi
fi
export CHROMIUM=${CHROMIUM:-$(command -v chromium)}

# The page bundles the library's dist/; the test seeds history with it over `ws`, a
# devDependency of the library's.
if [ ! -f ../js/dist/index.js ] || [ ! -d ../js/node_modules/ws ]; then
    (cd ../js && npm ci --no-audit --no-fund && npm run build)
fi
npm ci --no-audit --no-fund
npm run build
npm test
