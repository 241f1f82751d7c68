"""Checks the Grafana dashboard and the alert rules against the code (run by
infra/observability-check.sh).

- Every parley_* metric the dashboard or the alerts use is declared in
  services/src/telemetry.rs (histograms may add _bucket, _sum, _count), so a renamed metric
  cannot leave a panel or an alert silently empty.
- The dashboard is valid JSON with unique panel ids and a query on every panel.
- Its queries, with Grafana's $__rate_interval replaced, are written as recording rules to
  the file named by --promql-out, so `promtool check rules` parses every one.

Prints one line per problem and exits 1 if there is any.
"""

import argparse
import json
import pathlib
import re
import sys

import yaml

METRIC = re.compile(r"\bparley_[a-z_]+")
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")


def declared_metrics(telemetry_rs):
    return set(re.findall(r'"(parley_[a-z_]+)"', telemetry_rs.read_text()))


def used_metrics(expr):
    for name in METRIC.findall(expr):
        for suffix in HISTOGRAM_SUFFIXES:
            if name.endswith(suffix):
                yield name, name[: -len(suffix)]
                break
        else:
            yield name, name


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--telemetry", required=True, type=pathlib.Path)
    parser.add_argument("--dashboard", required=True, type=pathlib.Path)
    parser.add_argument("--alerts", required=True, type=pathlib.Path)
    parser.add_argument("--promql-out", required=True, type=pathlib.Path)
    args = parser.parse_args()

    declared = declared_metrics(args.telemetry)
    problems = []
    exprs = []  # (where, expr)

    dashboard = json.loads(args.dashboard.read_text())
    ids = [p["id"] for p in dashboard["panels"]]
    if len(ids) != len(set(ids)):
        problems.append(f"{args.dashboard}: panel ids repeat: {ids}")
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            continue
        targets = panel.get("targets", [])
        if not targets:
            problems.append(f"{args.dashboard}: panel {panel['title']!r} has no query")
        exprs += [(f"panel {panel['title']!r}", t["expr"]) for t in targets]

    for group in yaml.safe_load(args.alerts.read_text())["groups"]:
        exprs += [(f"alert {rule['alert']}", rule["expr"]) for rule in group["rules"]]

    for where, expr in exprs:
        for used, base in used_metrics(expr):
            if base not in declared:
                problems.append(f"{where}: {used} is not a metric of services/src/telemetry.rs")

    rules = [
        {"record": f"dashboard:query_{i}", "expr": expr.replace("$__rate_interval", "5m")}
        for i, (where, expr) in enumerate(exprs)
        if where.startswith("panel")
    ]
    args.promql_out.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))

    for problem in problems:
        print(problem)
    print(f"observability_check.py: {len(exprs)} queries, {len(problems)} problems")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
