#!/usr/bin/env bash
# Proves infra/k8s-check.sh fails on broken manifests: copies k8s/, breaks the copy in one
# way per case, and expects the check to fail naming the problem; the unbroken copy must
# pass. A check that passed a broken manifest would make this script fail. Needs the
# nats-server infra/install.sh installs (infra/test.sh runs that first).
set -euo pipefail

REPO="$(cd "$(dirname "$0")/.." && pwd)"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
passed=0
failed=0

# case NAME FILE SED_EXPRESSION EXPECTED_OUTPUT: break FILE (under k8s/) with sed, run the
# check, and expect it to fail printing EXPECTED_OUTPUT.
case_() {
    local name="$1" file="$2" expression="$3" expected="$4"
    rm -rf "$work/k8s"
    cp -r "$REPO/k8s" "$work/k8s"
    sed -i "$expression" "$work/k8s/$file"
    if cmp -s "$REPO/k8s/$file" "$work/k8s/$file"; then
        echo "FAIL $name: the edit changed nothing in $file (the test is stale)"
        failed=$((failed + 1))
        return
    fi
    local output status=0
    output="$("$REPO/infra/k8s-check.sh" "$work/k8s" 2>&1)" || status=$?
    if [ "$status" -ne 0 ] && grep -qF -- "$expected" <<<"$output"; then
        echo "ok   $name"
        passed=$((passed + 1))
    else
        echo "FAIL $name: exit $status, expected output containing: $expected"
        printf '%s\n' "$output" | sed 's/^/     /'
        failed=$((failed + 1))
    fi
}

if "$REPO/infra/k8s-check.sh" "$REPO/k8s" >/dev/null 2>&1; then
    echo "ok   the unbroken manifests pass"
    passed=$((passed + 1))
else
    echo "FAIL the unbroken manifests do not pass"
    failed=$((failed + 1))
fi
case_ "a string where an integer belongs" base/handler.yaml \
    's/terminationGracePeriodSeconds: 30/terminationGracePeriodSeconds: thirty/' "terminationGracePeriodSeconds: 'thirty' is not of type 'integer'"
case_ "a misspelt field" base/nats.yaml \
    's/podManagementPolicy:/podManagementPolicies:/' "'podManagementPolicies' was unexpected"
case_ "a custom resource against its CRD schema" base/scylla.yaml \
    's/members: 3/members: three/' "racks.0.members: 'three' is not of type 'integer'"
case_ "an unknown custom resource field" base/scylla.yaml \
    's/developerMode: false/developerModes: false/' "'developerModes' was unexpected"
case_ "a Secret that is not rendered" base/projector.yaml \
    's/name: parley-secrets/name: parley-secret/' "uses Secret parley-secret, which is not in the rendering"
case_ "a Service selecting nothing" base/redis.yaml \
    '/^kind: Service/,$ s/app.kubernetes.io\/name: redis/app.kubernetes.io\/name: rediss/' "selects no pod template"
case_ "a drain longer than the grace period" base/parley.toml \
    's/drain_secs = 20/drain_secs = 60/' "sockets are killed mid-drain"
case_ "NATS without fsync on every write" base/nats.conf \
    's/sync_interval: always/sync_interval: 2m/' "lacks \`sync_interval: always\`"
case_ "a nats.conf nats-server refuses" overlays/dev/nats.conf \
    's/jetstream {/jetstrem {/' 'unknown field "jetstrem"'
case_ "a kustomization naming a missing file" base/kustomization.yaml \
    's/- redis.yaml/- redis-missing.yaml/' "redis-missing.yaml"

echo "k8s-check-test.sh: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
