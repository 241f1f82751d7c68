#!/usr/bin/env python3
"""Markdown tables for docs/benchmarks.md from one loadtest/benchmarks.sh directory.

Usage: python3 loadtest/benchmarks_page.py loadtest-results/benchmarks-<commit>-<date>

Every figure printed comes from a run's report.json as the harness wrote it; nothing is
computed here but unit conversions. What limits each scenario is for a person to write.
"""

import json
import sys
from datetime import datetime, timezone
from pathlib import Path


def ms(value):
    if value >= 100:
        return f"{value:,.0f} ms"
    if value >= 10:
        return f"{value:.1f} ms"
    return f"{value:.2f} ms"


def per_sec(value):
    return f"{value:,.0f}/s"


def summary_row(label, summary):
    cells = [ms(summary[key]) for key in ("p50_ms", "p90_ms", "p99_ms", "p999_ms", "max_ms")]
    return f"| {label} ({summary['count']:,}) | " + " | ".join(cells) + " |"


def latencies(report):
    rows = []
    connect = report["connections"]["connect"]
    if connect["count"]:
        rows.append(summary_row("connect + auth", connect))
    for key, label in (("send_to_ack", "send -> ack"), ("send_to_delivery", "send -> delivery")):
        summary = report["latency"][key]
        if summary["count"]:
            rows.append(summary_row(label, summary))
    baselines = report.get("baselines") or {}
    for key, label in (("jetstream", "JetStream publish -> ack"), ("websocket_echo", "WebSocket echo")):
        if baselines.get(key):
            rows.append(summary_row(f"baseline: {label}", baselines[key]["latency"]))
    if not rows:
        return []
    return ["| Figure | p50 | p90 | p99 | p99.9 | max |", "|---|---|---|---|---|---|", *rows, ""]


def rates(report):
    throughput = report["throughput"]
    sends = report["sends"]
    if not sends["scheduled"]:
        return []
    offered = throughput.get("offered_per_sec")
    parts = [f"offered {per_sec(offered)}"] if offered else []
    parts += [
        f"sent {per_sec(throughput['sent_per_sec'])}",
        f"acknowledged {per_sec(throughput['acked_per_sec'])}",
        f"delivered {per_sec(throughput['delivered_per_sec'])}",
    ]
    return [
        f"Rates over the {report['measured_secs']:.0f} s measured: " + ", ".join(parts)
        + f". Sends: {sends['sent']:,} sent, {sends['acked']:,} acknowledged, "
        f"{sends['send_errors']:,} errors.",
        "",
    ]


def baselines_and_ratios(report):
    baselines = report.get("baselines") or {}
    parts = []
    for key, label in (
        ("jetstream", "JetStream async publish"),
        ("jetstream_consume", "JetStream consume"),
        ("websocket_echo", "WebSocket echo"),
    ):
        if baselines.get(key):
            parts.append(f"{label} {per_sec(baselines[key]['per_sec'])}")
    lines = []
    if parts:
        how = baselines.get("how")
        lines.append("Baselines: " + ", ".join(parts) + (f" ({how})" if how else "") + ".")
    ratios = report.get("ratios") or {}
    named = {
        "messages_vs_jetstream_publish": "messages/s ÷ JetStream publish/s",
        "delivery_p99_vs_jetstream_ack_p99": "p99 send -> delivery ÷ JetStream ack p99",
        "ack_p99_vs_websocket_echo_p99": "p99 send -> ack ÷ WebSocket echo p99",
    }
    shown = [f"{label} = **{ratios[key]:.3f}**" for key, label in named.items() if ratios.get(key) is not None]
    if shown:
        lines.append("Ratios: " + "; ".join(shown) + ".")
    return lines + [""] if lines else []


def processes(report):
    rows = ["| Process | CPU, % of a core | CPU per message | RSS peak |", "|---|---|---|---|"]
    for process in report["processes"]:
        per_message = process.get("cpu_us_per_message")
        rows.append(
            f"| {process['name']} | {process['cpu_mean_percent']:.0f} % | "
            + (f"{per_message:,.0f} us" if per_message else "") + " | "
            + f"{process['rss_peak_bytes'] / 2**20:,.0f} MiB |"
        )
    lines = rows + [""]
    extra = []
    if report.get("busiest_process"):
        extra.append(f"Busiest process: {report['busiest_process']}.")
    if report.get("gateway_rss_per_connection_bytes"):
        extra.append(
            f"Gateway RSS per connection: **{report['gateway_rss_per_connection_bytes'] / 1024:.1f} KiB**."
        )
    return lines + ([" ".join(extra), ""] if extra else [])


def ramp(report):
    figures = report.get("ramp")
    if not figures:
        return []
    rows = [
        "| Step | sent | acked | delivered | p99 send -> ack | p99 send -> delivery | held | busiest process |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for step in figures["steps"]:
        held = "yes" if step["held"] else f"no: {step.get('reason') or ''}"
        rows.append(
            f"| {per_sec(step['target_per_sec'])} | {per_sec(step['rates']['sent_per_sec'])} | "
            f"{per_sec(step['rates']['acked_per_sec'])} | {per_sec(step['rates']['delivered_per_sec'])} | "
            f"{ms(step['send_to_ack']['p99_ms'])} | {ms(step['send_to_delivery']['p99_ms'])} | {held} | "
            f"{step.get('busiest_process') or ''} |"
        )
    held = figures.get("highest_rate_held")
    head = f"Highest rate held: **{per_sec(held)}**." if held else "No step held."
    return [head, "", *rows, ""]


def faults(report):
    if not report.get("faults"):
        return []
    rows = [
        "| Fault | killed at | first ack after kill | first ack after restart | longest gap between acks | roles ready while down |",
        "|---|---|---|---|---|---|",
    ]
    for fault in report["faults"]:
        role = fault["role"] if isinstance(fault["role"], str) else json.dumps(fault["role"])

        def maybe(key):
            return ms(fault[key]) if fault.get(key) is not None else "none"

        rows.append(
            f"| {role} | {fault['killed_at_secs']:.1f} s | {maybe('first_ack_after_kill_ms')} | "
            f"{maybe('first_ack_after_restart_ms')} | {ms(fault['longest_ack_gap_ms'])} | "
            f"{', '.join(fault.get('roles_ready_while_down') or []) or 'none'} |"
        )
    return rows + [""]


def resume(report):
    figures = report.get("resume") or {}
    if not (figures.get("drops_clean") or figures.get("drops_abrupt") or figures.get("outage")):
        return []
    line = (
        f"Drops: {figures['drops_clean']:,} clean, {figures['drops_abrupt']:,} abrupt; "
        f"{figures['reconnected_connections']:,} connections reconnected "
        f"({figures['reconnected_fraction']:.0%}); {figures['resume_frames']:,} resumes, "
        f"{figures['resumed_events']:,} events resumed."
    )
    outage = figures.get("outage")
    if outage:
        ratio = outage.get("vs_jetstream_consume")
        line += (
            f" Outage: {outage['devices']} devices resumed {outage['events']:,} events in "
            f"{outage['secs']:.2f} s = {per_sec(outage['events_per_sec'])}"
            + (f" = **{ratio:.3f} ×** JetStream consume" if ratio else "")
            + "."
        )
    return [line, ""]


def presence(report):
    figures = report.get("presence")
    if not figures:
        return []
    return [
        "| Presence | p50 | p90 | p99 | p99.9 | max |",
        "|---|---|---|---|---|---|",
        summary_row("socket open -> co-member sees online", figures["open_to_seen_online"]),
        summary_row("socket close -> co-member sees offline", figures["close_to_seen_offline"]),
        "",
        f"{figures['pairs']} pairs; missed online {figures['missed_online']}, missed offline "
        f"{figures['missed_offline']}.",
        "",
    ]


def replay(report):
    figures = report.get("replay")
    if not figures:
        return []
    return [
        f"Rebuild into `{figures['target']}`: exit {figures.get('rebuild_exit')}; switch exit "
        f"{figures.get('switch_exit')}; readers read from the new store after the switch: "
        f"{'yes' if figures.get('read_from_target') else 'no'} (newest shown "
        f"{figures.get('newest_shown')}, newest in the new store {figures.get('newest_in_target')})"
        + (f"; error: {figures['error']}" if figures.get("error") else "")
        + ".",
        "",
    ]


def ledger(report):
    figures = report["ledger"]
    verdict = "**clean**" if report["passed"] else "**NOT clean**"
    problems = {
        key: value
        for key, value in figures.items()
        if isinstance(value, int) and not isinstance(value, bool) and value and key not in
        ("acknowledged_messages", "expected_deliveries", "excluded_connections", "reconnected_connections")
    }
    detail = f" ({', '.join(f'{k} {v}' for k, v in problems.items())})" if problems else ""
    return [
        f"Ledger {verdict}{detail}: {figures['acknowledged_messages']:,} acknowledged messages, "
        f"{figures['expected_deliveries']:,} deliveries checked, log checked: "
        f"{'yes' if figures['log_checked'] else 'no'}.",
        "",
    ]


def started_at(report):
    return datetime.fromtimestamp(report["environment"]["started_at_unix"], timezone.utc)


def section(name, report):
    environment = report["environment"]
    return [
        f"### `{name}`: {report['scenario']['description']}",
        "",
        f"`{environment['command']}` at {started_at(report):%H:%M} UTC; "
        f"{environment['durability']}; {environment['platform']}.",
        "",
        *latencies(report),
        *rates(report),
        *baselines_and_ratios(report),
        *ramp(report),
        *faults(report),
        *resume(report),
        *presence(report),
        *replay(report),
        *processes(report),
        *ledger(report),
    ]


def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    directory = Path(sys.argv[1])
    machine = dict(
        line.split(" ", 1) for line in (directory / "MACHINE").read_text().splitlines() if " " in line
    )
    lines = []
    runs = []
    for run in (p for p in directory.iterdir() if p.is_dir()):
        reports = sorted(run.glob("*/report.json"))
        if not reports:
            lines += [f"### `{run.name}`: no report (see `{run.name}.txt`)", ""]
        for path in reports:
            report = json.loads(path.read_text())
            runs.append((run.name, report))
    runs.sort(key=lambda run: started_at(run[1]))
    first, last = (started_at(runs[i][1]) for i in (0, -1))
    head = [
        f"Commit `{machine['commit'][:7]}`; {len(runs)} runs started one after another between "
        f"{first:%Y-%m-%d %H:%M} and {last:%H:%M} UTC on one machine: {machine['cpu']}, "
        f"{machine['cores']} cores, {machine['memory']}, Linux {machine['kernel']}.",
        "",
    ]
    for name, report in runs:
        lines += section(name, report)
    print("\n".join(head + lines))


if __name__ == "__main__":
    main()
