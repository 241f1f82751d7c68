#!/usr/bin/env bash
# Gateway memory after connection storms: one `parley gateway` process, ROUNDS storms of
# SOCKETS idle sockets that connect (the harness's idle-connections scenario) and leave,
# and the gateway's RSS before the first storm, at the peak of each and after each, once
# every socket is gone.
#
#   loadtest/storm.sh [ROUNDS=5] [SOCKETS=2000]
#
# Runs target/release/parley and target/release/parley-loadtest (BIN_DIR=... to change);
# `parley up` starts nats-server and redis-server (found as the tests find them:
# PARLEY_HOME) with a handler and a projector, and the measured gateway runs as a process
# of its own. Loopback only; everything it starts is stopped when it ends.
set -euo pipefail

rounds=${1:-5}
sockets=${2:-2000}
repo=$(cd "$(dirname "$0")/.." && pwd)
bin=$(cd "${BIN_DIR:-$repo/target/release}" && pwd)
scenario=$repo/loadtest/scenarios/idle-connections.toml
work=$(mktemp -d)
pids=()
harness=

cleanup() {
  for pid in "${pids[@]}" $harness; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# Poll `probe` (a shell command) every 0.2 s for up to 60 s.
wait_for() {
  for _ in $(seq 300); do
    if eval "$1"; then return 0; fi
    sleep 0.2
  done
  echo "storm.sh: gave up waiting for: $1" >&2
  exit 1
}

rss_kib() { awk '/^VmRSS:/ { print $2 }' "/proc/$gateway/status"; }
# RSS, and its anonymous part: the file part is mostly the binary's code, paged in the first
# time a code path runs, and not memory the gateway holds.
memory() {
  awk '/^VmRSS:/ { rss = $2 } /^RssAnon:/ { anon = $2 } END { print rss " KiB (anonymous " anon " KiB)" }' \
    "/proc/$gateway/status"
}
threads() { awk '/^Threads:/ { print $2 }' "/proc/$gateway/status"; }

metric() {
  curl -s "http://$admin/metrics" | awk -v name="$1" '$1 == name { print $2 }'
}

ulimit -n "$(ulimit -Hn)"
cd "$work"

PARLEY_GATEWAY__LISTEN=127.0.0.1:$(free_port) PARLEY_ADMIN__LISTEN=127.0.0.1:$(free_port) \
  "$bin/parley" up > up.log 2>&1 &
pids+=($!)
wait_for 'grep -qs "Parley is up" up.log'
nats=$(grep -o 'nats://[0-9.:]*' up.log | head -1)
redis=$(grep -o 'redis://[0-9.:]*' up.log | head -1)
secret=$(cat .parley/data/dev-secret)

port=$(free_port)
admin=127.0.0.1:$(free_port)
PARLEY_NATS__URL=$nats PARLEY_REDIS__URL=$redis PARLEY_AUTH__SECRET=$secret \
  PARLEY_GATEWAY__LISTEN=127.0.0.1:$port PARLEY_ADMIN__LISTEN=$admin \
  "$bin/parley" gateway > gateway.log 2>&1 &
gateway=$!
pids+=("$gateway")
wait_for '[ "$(curl -s -o /dev/null -w "%{http_code}" "http://$admin/readyz")" = 200 ]'

echo "gateway pid $gateway, $rounds storms of $sockets sockets"
echo "idle (after start): $(memory), $(threads) threads"

storm() {
  "$bin/parley-loadtest" --scenario "$scenario" --users "$1" --duration-secs 5 \
    --gateway "ws://127.0.0.1:$port/ws" --secret "$secret" --quiet --out "$work/results" \
    > "loadtest-$2.log" 2>&1 &
  harness=$!
}
finished() {
  if ! wait "$harness"; then
    echo "storm $1: the harness failed:" >&2
    cat "loadtest-$1.log" >&2
    exit 1
  fi
  harness=
  wait_for '[ "$(metric parley_gateway_connections)" = 0 ]'
}
# Storm 0, of 10 sockets, pages in the code a storm runs.
storm 10 0
finished 0
echo "idle (after storm 0): $(memory), $(threads) threads"
for round in $(seq "$rounds"); do
  peak=0
  most_threads=0
  storm "$sockets" "$round"
  while kill -0 "$harness" 2>/dev/null; do
    now=$(rss_kib)
    if [ "$now" -gt "$peak" ]; then peak=$now; fi
    now=$(threads)
    if [ "$now" -gt "$most_threads" ]; then most_threads=$now; fi
    sleep 0.2
  done
  finished "$round"
  echo "storm $round: peak $peak KiB, $most_threads threads; after: $(memory), $(threads) threads"
done
# Allocators that return memory on a timer (jemalloc's decay, mimalloc's purge delay) do so
# over the next seconds.
for settle in 10 20 30; do
  sleep 10
  echo "$settle s after the last storm: $(memory), $(threads) threads"
done
