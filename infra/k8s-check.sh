#!/usr/bin/env bash
# Renders every overlay of k8s/ with kustomize and validates every object offline: built-in
# kinds against the Kubernetes schemas kubernetes-validate ships (strict: unknown fields
# are errors), custom resources against k8s/schemas/, plus the references and the drain
# timing no schema sees (infra/k8s_check.py). Exits non-zero on any problem.
#
#   infra/k8s-check.sh [K8S_DIR]    (default: the repository's k8s/)
set -euo pipefail

# The oldest Kubernetes the manifests are meant for: preStop `sleep` is on by default from
# 1.30, matchLabelKeys in pod affinity from 1.31.
KUBERNETES_VERSION="1.33"

# shellcheck source=infra/tools.sh
. "$(dirname "$0")/tools.sh"
K8S="${1:-$REPO/k8s}"

kustomize="$(go_tool kustomize sigs.k8s.io/kustomize/kustomize/v5 "$KUSTOMIZE_VERSION")"
python="$(python_tools)"

rendered="$(mktemp -d)"
trap 'rm -rf "$rendered"' EXIT
overlays=()
for overlay in "$K8S"/overlays/*/; do
    name="$(basename "$overlay")"
    "$kustomize" build "$overlay" >"$rendered/$name.yaml"
    overlays+=("$rendered/$name.yaml")
done
[ "${#overlays[@]}" -gt 0 ] || { echo "k8s-check.sh: no overlays in $K8S/overlays" >&2; exit 1; }

# The nats-server infra/install.sh installs (infra/test.sh runs it first) tests nats.conf.
nats_server="${PARLEY_HOME:-$REPO/.parley}/bin/nats-server"
[ -x "$nats_server" ] || nats_server="$(command -v nats-server || true)"
nats_args=()
if [ -n "$nats_server" ]; then
    nats_args=(--nats-server "$nats_server")
else
    echo "k8s-check.sh: no nats-server installed (infra/install.sh): nats.conf is not tested by it" >&2
fi

"$python" "$REPO/infra/k8s_check.py" --kubernetes-version "$KUBERNETES_VERSION" \
    --schemas "$K8S/schemas" "${nats_args[@]}" "${overlays[@]}"
echo "k8s-check.sh: ${#overlays[@]} overlays rendered and valid (Kubernetes $KUBERNETES_VERSION)"
