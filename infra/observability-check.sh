#!/usr/bin/env bash
# Checks infra/observability/: every metric the dashboard and the alerts use exists in
# services/src/telemetry.rs, every query parses (promtool check rules), and the alerts'
# unit tests pass (promtool test rules alerts.test.yaml). promtool comes from Debian's
# prometheus package, unpacked once under .parley/tools (building it from the Go module
# proxy took 7 minutes on a 2-core machine).
set -euo pipefail

# shellcheck source=infra/tools.sh
. "$(dirname "$0")/tools.sh"
OBS="$REPO/infra/observability"

promtool="$(deb_tool promtool "$PROMTOOL_PACKAGE")"
python="$(python_tools)"

queries="$(mktemp --suffix=.yaml)"
trap 'rm -f "$queries"' EXIT
"$python" "$REPO/infra/observability_check.py" --telemetry "$REPO/services/src/telemetry.rs" \
    --dashboard "$OBS/parley-dashboard.json" --alerts "$OBS/alerts.yaml" --promql-out "$queries"
"$promtool" check rules "$OBS/alerts.yaml" "$queries"
(cd "$OBS" && "$promtool" test rules alerts.test.yaml)
echo "observability-check.sh: dashboard and alert rules checked, alert tests passed"
