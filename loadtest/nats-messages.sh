#!/usr/bin/env bash
# NATS messages per chat message, per role: nats-server with its monitoring port, every role
# as a process of its own with its own connection name, and the harness sending the
# dm-steady shape at RATE messages/s for SECS seconds; nats-server's /connz before and
# after the measured window gives what each connection published and received.
#
#   loadtest/nats-messages.sh [RATE=1000] [SECS=20] [HANDLERS=1]
#
# Runs target/release/parley and target/release/parley-loadtest (BIN_DIR=... to change);
# nats-server and redis-server are found as the tests find them (PARLEY_HOME, else the
# repository's .parley, else PATH). Lazy fsync, unless SYNC=always. Loopback only;
# everything it starts is stopped when it ends.
set -euo pipefail

rate=${1:-1000}
secs=${2:-20}
handlers=${3:-1}
repo=$(cd "$(dirname "$0")/.." && pwd)
bin=$(cd "${BIN_DIR:-$repo/target/release}" && pwd)
home=${PARLEY_HOME:-$repo/.parley}
server() { if [ -x "$home/bin/$1" ]; then echo "$home/bin/$1"; else command -v "$1"; fi; }
work=$(mktemp -d)
pids=()

cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
nats_port=$(free_port) monitor_port=$(free_port) redis_port=$(free_port) gateway_port=$(free_port)

cat >"$work/nats.conf" <<EOF
listen: "127.0.0.1:$nats_port"
http: "127.0.0.1:$monitor_port"
jetstream { store_dir: "$work/js" ${SYNC:+sync_interval: $SYNC} }
EOF
"$(server nats-server)" -c "$work/nats.conf" >"$work/nats.log" 2>&1 &
pids+=($!)
"$(server redis-server)" --port "$redis_port" --bind 127.0.0.1 --save '' --appendonly no >"$work/redis.log" 2>&1 &
pids+=($!)
sleep 1

export PARLEY_NATS__URL=nats://127.0.0.1:$nats_port PARLEY_REDIS__URL=redis://127.0.0.1:$redis_port
export PARLEY_AUTH__SECRET=nats-messages-nats-messages-nats-messages
export PARLEY_PROJECTOR__STORE__PATH=$work/store.db PARLEY_ADMIN__LISTEN=127.0.0.1:0
export PARLEY_GATEWAY__LISTEN=127.0.0.1:$gateway_port
# Rates far above a person's, from one address: the harness's users may send this fast.
export PARLEY_GATEWAY__RATE_LIMITS__USER_PER_SEC=1000000 PARLEY_GATEWAY__RATE_LIMITS__USER_BURST=1000000
roles=(projector)
for i in $(seq 1 "$handlers"); do roles+=("handler-$i"); done
roles+=(gateway)
for name in "${roles[@]}"; do
  PARLEY_NATS__NAME=$name "$bin/parley" "${name%-*}" >"$work/$name.log" 2>&1 &
  pids+=($!)
  sleep 1.5
done

sed 's/^baselines = true/baselines = false/' "$repo/loadtest/scenarios/dm-steady.toml" >"$work/dm.toml"
connections() {
  curl -s "http://127.0.0.1:$monitor_port/connz?limit=1000" | python3 -c '
import json, sys
for c in json.load(sys.stdin)["connections"]:
    print(c.get("name") or "unnamed", c["in_msgs"], c["out_msgs"])'
}
"$bin/parley-loadtest" --gateway "ws://127.0.0.1:$gateway_port/ws" --scenario "$work/dm.toml" \
  --rate "$rate" --duration-secs "$secs" --warmup-secs 3 --quiet --out "$work/out" >"$work/harness.log" 2>&1 &
harness=$!
pids+=($harness)
# The window starts once the sockets are connected and warmed up, and ends before sending does.
sleep 8
connections >"$work/before"
start=$(date +%s.%N)
sleep $((secs - 4))
connections >"$work/after"
end=$(date +%s.%N)
wait "$harness" || true

python3 - "$work" "$rate" "$start" "$end" <<'EOF'
import sys
work, rate, start, end = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])
def load(name):
    return {line.split()[0]: [float(x) for x in line.split()[1:3]] for line in open(f"{work}/{name}")}
before, after = load("before"), load("after")
messages = rate * (end - start)
print(f"{end - start:.1f} s window, about {messages:.0f} chat messages at {rate:.0f}/s")
print(f"{'connection':12s} {'published':>10s} {'received':>10s}   per chat message")
total = [0.0, 0.0]
for name, (published, received) in sorted(after.items()):
    if name in before:
        delta = [published - before[name][0], received - before[name][1]]
        total = [total[0] + delta[0], total[1] + delta[1]]
        print(f"{name:12s} {delta[0] / messages:10.2f} {delta[1] / messages:10.2f}")
print(f"{'all':12s} {total[0] / messages:10.2f} {total[1] / messages:10.2f}")
EOF
grep -E '^(Throughput|Ledger)' "$work/harness.log" | cut -c1-160
