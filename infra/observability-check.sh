#!/usr/bin/env bash
# Checks infra/observability/: every metric the dashboard and the alerts use exists in
# services/src/telemetry.rs, every query parses (promtool check rules), and the alerts'
# unit tests pass (promtool test rules alerts.test.yaml). promtool is built once from the
# Go module proxy and cached under .parley/tools; the build tag remove_all_sd leaves out
# Prometheus's cloud service discovery (the SDKs of a dozen clouds), which checking rules
# never uses: a build with them filled the 2-core build machine's free disk.
set -euo pipefail

# shellcheck source=infra/tools.sh
. "$(dirname "$0")/tools.sh"
OBS="$REPO/infra/observability"

promtool="$(go_tool promtool github.com/prometheus/prometheus/cmd/promtool "$PROMTOOL_VERSION" remove_all_sd)"
python="$(python_tools)"

queries="$(mktemp --suffix=.yaml)"
trap 'rm -f "$queries"' EXIT
"$python" "$REPO/infra/observability_check.py" --telemetry "$REPO/services/src/telemetry.rs" \
    --dashboard "$OBS/parley-dashboard.json" --alerts "$OBS/alerts.yaml" --promql-out "$queries"
"$promtool" check rules "$OBS/alerts.yaml" "$queries"
(cd "$OBS" && "$promtool" test rules alerts.test.yaml)
echo "observability-check.sh: dashboard and alert rules checked, alert tests passed"
