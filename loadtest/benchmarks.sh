#!/usr/bin/env bash
# Runs every scenario once, back to back, against one release build of one commit, for
# docs/benchmarks.md: the reports go to loadtest-results/benchmarks-<commit>-<date>/<run>/,
# and loadtest/benchmarks_page.py turns them into the page's tables. About 25 minutes on
# the 2-core build machine; run it with nothing else busy, since every figure is a ratio to
# baselines measured on the same machine in the same run.
#
#   loadtest/benchmarks.sh                 # every run below
#   loadtest/benchmarks.sh dm-steady ramp  # only the runs whose names start with these
set -euo pipefail
cd "$(dirname "$0")/.."

if [ -n "$(git status --porcelain --untracked-files=no)" ]; then
    echo "loadtest/benchmarks.sh: the working tree has changes; the page names one commit, so commit first" >&2
    exit 2
fi
# The servers --spawn starts, and Cassandra for horizontal-scale's CQL store.
infra/install.sh
infra/cassandra.sh
cargo build --release -p parley-services --bin parley -p parley-loadtest --bin parley-loadtest

commit=$(git rev-parse --short=7 HEAD)
out="loadtest-results/benchmarks-$commit-$(date -u +%Y%m%d)"
mkdir -p "$out"
# A later call for some runs only adds their reports to the same directory.
[ -f "$out/MACHINE" ] || {
    echo "commit $(git rev-parse HEAD)"
    echo "cpu $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')"
    echo "cores $(nproc)"
    echo "memory $(free -g | awk '/^Mem:/ {print $2}') GiB"
    echo "kernel $(uname -r)"
} > "$out/MACHINE"

# name, then the harness's arguments (each run also gets --spawn --quiet and its own --out).
runs=(
    "dm-steady|--scenario loadtest/scenarios/dm-steady.toml"
    "dm-steady-lazy|--scenario loadtest/scenarios/dm-steady.toml --durability lazy"
    "dm-steady-r3|--scenario loadtest/scenarios/dm-steady.toml --nats-cluster 3"
    "ramp-to-saturation|--scenario loadtest/scenarios/ramp-to-saturation.toml"
    "ramp-to-saturation-lazy|--scenario loadtest/scenarios/ramp-to-saturation.toml --durability lazy"
    "fanout-1000|--scenario loadtest/scenarios/fanout-1000.toml"
    "fanout-1000-packed|--scenario loadtest/scenarios/fanout-1000.toml --pack true"
    "group-fanout|--scenario loadtest/scenarios/group-fanout.toml"
    "group-10k|--scenario loadtest/scenarios/group-10k.toml"
    "idle-connections|--scenario loadtest/scenarios/idle-connections.toml"
    "presence|--scenario loadtest/scenarios/presence.toml"
    "reconnect-resume|--scenario loadtest/scenarios/reconnect-resume.toml"
    "horizontal-scale|--scenario loadtest/scenarios/horizontal-scale.toml"
    "nats-restarts|--scenario loadtest/scenarios/nats-restarts.toml"
    "rebuild-switch|--scenario loadtest/scenarios/rebuild-switch.toml"
)

wanted() {
    [ $# -eq 1 ] && return 0
    local name=$1 prefix
    shift
    for prefix in "$@"; do
        [[ $name == "$prefix"* ]] && return 0
    done
    return 1
}

failed=0
for run in "${runs[@]}"; do
    name=${run%%|*}
    wanted "$name" "$@" || continue
    read -r -a args <<< "${run#*|}"
    echo "loadtest/benchmarks.sh: $name ($(date -u +%H:%M:%S))"
    if ! target/release/parley-loadtest --spawn --quiet --out "$out/$name" "${args[@]}" \
        > "$out/$name.txt" 2>&1; then
        echo "loadtest/benchmarks.sh: $name failed, see $out/$name.txt" >&2
        failed=1
    fi
done
echo "loadtest/benchmarks.sh: reports in $out; the page's tables: python3 loadtest/benchmarks_page.py $out"
exit $failed
