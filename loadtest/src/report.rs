//! The run's report: every figure, as JSON and as a table for people.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

use crate::baseline::Baselines;
use crate::latency::Summary;
use crate::ledger::{self, LedgerReport};
use crate::live::{Counters, ProcessSample, ProjectionSample, TimelinePoint};
use crate::presence::PresenceFigures;
use crate::replay::ReplayFigures;
use crate::resources::Machine;
use crate::scenario::{Fault, FaultRole, Scenario};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    pub scenario: Scenario,
    pub environment: Environment,
    pub connections: ConnectionFigures,
    pub sends: SendFigures,
    /// Seconds of the measured window (after warm-up, until sending ended).
    pub measured_secs: f64,
    pub throughput: Rates,
    pub latency: Latencies,
    /// Errors by code: `frame:<code>` (error frames), `close:<code>`, `connect:<code>`,
    /// `connection:<kind>`, `send:<kind>`, `harness:<what>`.
    pub errors: BTreeMap<String, u64>,
    pub ledger: LedgerReport,
    /// Spawned platform processes and the harness, over the measured window.
    pub processes: Vec<ProcessFigures>,
    /// The process using the most CPU over the measured window.
    pub busiest_process: Option<String>,
    /// Growth of the gateways' RSS while the clients connected, per connection.
    pub gateway_rss_per_connection_bytes: Option<f64>,
    /// How far the conversation store trailed the log over the measured window.
    #[serde(default)]
    pub projection: Option<ProjectionFigures>,
    /// Per gateway, as the clients saw it: sockets opened to it and messages it delivered.
    #[serde(default)]
    pub gateways: Vec<GatewayFigures>,
    pub ramp: Option<RampFigures>,
    /// Per fault of the plan, the interruption it caused.
    #[serde(default)]
    pub faults: Vec<FaultFigures>,
    /// Drops, reconnects and resumes.
    #[serde(default)]
    pub resume: ResumeFigures,
    /// The presence probe's figures, when the scenario has one.
    #[serde(default)]
    pub presence: Option<PresenceFigures>,
    /// What the `[replay]` plan did: the rebuild, the switch and where readers read after.
    #[serde(default)]
    pub replay: Option<ReplayFigures>,
    pub baselines: Option<Baselines>,
    pub ratios: Option<Ratios>,
    pub marks: Marks,
    pub timeline: Vec<TimelinePoint>,
    /// Ledger clean: nothing acknowledged lost or appended twice, no delivery duplicated,
    /// out of order, forked or unexplained, every unacknowledged send classified.
    pub passed: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Environment {
    pub machine: Machine,
    /// Where the platform ran and its durability, in words.
    pub platform: String,
    pub durability: String,
    pub harness_version: String,
    pub started_at_unix: u64,
    pub command: String,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ConnectionFigures {
    pub planned: usize,
    pub connected: u64,
    /// Sockets opened again after one was lost (a gateway that died).
    #[serde(default)]
    pub reconnects: u64,
    /// From the scheduled connect time to the `welcome` frame.
    pub connect: Summary,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SendFigures {
    pub scheduled: usize,
    pub sent: u64,
    pub acked: u64,
    pub send_errors: u64,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Rates {
    /// The schedule's rate, for a steady run: what a saturated run could not send shows
    /// as the difference to `sent_per_sec`.
    #[serde(default)]
    pub offered_per_sec: Option<f64>,
    pub sent_per_sec: f64,
    /// Acknowledged messages per second: the end-to-end message rate, since the ledger
    /// checks each of them reached every member.
    pub acked_per_sec: f64,
    /// Events received per second, over all recipients.
    pub delivered_per_sec: f64,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Latencies {
    pub send_to_ack: Summary,
    pub send_to_delivery: Summary,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProcessFigures {
    pub name: String,
    pub rss_start_bytes: u64,
    pub rss_peak_bytes: u64,
    pub rss_end_bytes: u64,
    /// Percent of one core; a multi-threaded process can exceed 100. The CPU time used
    /// between the window's first and last samples over the time between them.
    pub cpu_mean_percent: f64,
    pub cpu_max_percent: f64,
    /// CPU time per acknowledged message over the same span, microseconds.
    #[serde(default)]
    pub cpu_us_per_message: Option<f64>,
}

/// One gateway's share of the run, counted by the clients.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct GatewayFigures {
    pub name: String,
    /// Sockets opened to it over the run, reconnects included.
    pub sockets_opened: u64,
    /// Connections whose last socket was on it when the run ended.
    pub sockets_at_end: u64,
    /// Messages received on its sockets, live and resumed.
    pub messages_delivered: u64,
}

/// Per gateway of `count`, from every connection's sessions: `(gateway, messages received)`
/// per session, in the order they were opened.
pub fn gateway_figures<'a>(
    count: usize,
    connections: impl IntoIterator<Item = &'a [(usize, u64)]>,
) -> Vec<GatewayFigures> {
    let mut figures: Vec<GatewayFigures> = (0..count)
        .map(|i| GatewayFigures {
            name: format!("gateway-{i}"),
            ..GatewayFigures::default()
        })
        .collect();
    for sessions in connections {
        for &(gateway, messages) in sessions {
            if let Some(g) = figures.get_mut(gateway) {
                g.sockets_opened += 1;
                g.messages_delivered += messages;
            }
        }
        if let Some(g) = sessions.last().and_then(|&(i, _)| figures.get_mut(i)) {
            g.sockets_at_end += 1;
        }
    }
    figures
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RampFigures {
    pub steps: Vec<StepFigures>,
    /// The highest step rate that met every threshold.
    pub highest_rate_held: Option<f64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepFigures {
    pub target_per_sec: f64,
    pub rates: Rates,
    pub send_to_ack: Summary,
    pub send_to_delivery: Summary,
    pub errors: u64,
    pub held: bool,
    /// Why it did not hold.
    pub reason: Option<String>,
    pub busiest_process: Option<String>,
}

/// Result over baseline, measured in the same run. For a ramp, the result is the highest
/// step held.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Ratios {
    /// End-to-end acknowledged (and delivered) messages/s over raw JetStream publishes/s.
    pub messages_vs_jetstream_publish: Option<f64>,
    /// p99 send -> delivery over the JetStream publish-ack p99.
    pub delivery_p99_vs_jetstream_ack_p99: Option<f64>,
    /// p99 send -> ack over the WebSocket echo round-trip p99.
    pub ack_p99_vs_websocket_echo_p99: Option<f64>,
}

/// How often devices lost their sockets, came back and resumed.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ResumeFigures {
    /// Sockets the run dropped: with a close frame, and by cutting the TCP connection.
    pub drops_clean: u64,
    pub drops_abrupt: u64,
    /// Connections that reconnected at least once, and their share of those connected.
    pub reconnected_connections: u64,
    pub reconnected_fraction: f64,
    /// `resume` frames sent (one per socket opened, plus the `more` rounds), the rounds that
    /// followed a `more`, and the events the resumes delivered.
    pub resume_frames: u64,
    pub more_rounds: u64,
    pub resumed_events: u64,
    pub outage: Option<OutageFigures>,
}

/// The devices an outage dropped, resuming together once it ended.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct OutageFigures {
    pub devices: u64,
    /// Events their resumes delivered.
    pub events: u64,
    /// From the first of their resumes starting to the last one ending.
    pub secs: f64,
    pub events_per_sec: f64,
    /// `events_per_sec` over the raw JetStream consume baseline of the same run.
    pub vs_jetstream_consume: Option<f64>,
}

impl OutageFigures {
    /// From every `(start_us, end_us, events)` of the outage's resumes.
    pub fn of(resumes: &[(u64, u64, u64)], consume_per_sec: Option<f64>) -> Option<OutageFigures> {
        let start = resumes.iter().map(|r| r.0).min()?;
        let end = resumes.iter().map(|r| r.1).max()?;
        let events: u64 = resumes.iter().map(|r| r.2).sum();
        let secs = end.saturating_sub(start) as f64 / 1e6;
        let events_per_sec = if secs > 0.0 {
            events as f64 / secs
        } else {
            0.0
        };
        Some(OutageFigures {
            devices: resumes.len() as u64,
            events,
            secs,
            events_per_sec,
            vs_jetstream_consume: consume_per_sec
                .filter(|&c| c > 0.0 && events_per_sec > 0.0)
                .map(|c| events_per_sec / c),
        })
    }
}

/// What the run did for one fault, in microseconds since the run's origin.
#[derive(Debug, Clone)]
pub struct FaultRecord {
    pub fault: Fault,
    pub killed_us: u64,
    pub restarted_us: Option<u64>,
    /// Redis only: when the watched user's presence was back.
    pub presence_back_us: Option<u64>,
    /// NATS and Redis: the roles that depend on the server and answered `/readyz` with 200
    /// while it was down.
    pub ready_while_down: Vec<String>,
    /// NATS and Redis: when every role answered `/readyz` with 200 again after the restart.
    pub all_ready_us: Option<u64>,
    pub error: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FaultFigures {
    pub role: FaultRole,
    /// Seconds since the run's origin, like [`Marks`].
    pub killed_at_secs: f64,
    pub restarted_at_secs: Option<f64>,
    /// From the kill to the first `ack` after it (none: no ack came before sending ended
    /// and the drain was over).
    pub first_ack_after_kill_ms: Option<f64>,
    pub first_ack_after_restart_ms: Option<f64>,
    /// The longest time without an `ack` from the kill until the next fault or the end of
    /// sending (both count as edges of a gap, so an interruption still going on when sending
    /// ended shows in full).
    pub longest_ack_gap_ms: f64,
    /// Redis: from the restart until heartbeats had rebuilt a connected user's presence.
    pub presence_back_after_restart_ms: Option<f64>,
    /// NATS and Redis: roles that said they were ready (`/readyz` 200) while the server
    /// they depend on was down; readiness that tells the truth leaves this empty.
    #[serde(default)]
    pub roles_ready_while_down: Vec<String>,
    /// NATS and Redis: from the restart until every role said it was ready again.
    #[serde(default)]
    pub all_ready_after_restart_ms: Option<f64>,
    /// The fault could not be applied as planned.
    pub error: Option<String>,
}

/// The interruption each fault caused, from the sorted arrival times of every ack.
pub fn fault_figures(
    records: &[FaultRecord],
    acks_us: &[u64],
    sending_end_us: u64,
) -> Vec<FaultFigures> {
    let mut kills: Vec<u64> = records.iter().map(|r| r.killed_us).collect();
    kills.sort_unstable();
    let first_after = |t: u64| {
        let i = acks_us.partition_point(|&a| a <= t);
        acks_us.get(i).map(|&a| ms(a - t))
    };
    records
        .iter()
        .map(|r| {
            let until = kills
                .iter()
                .copied()
                .find(|&k| k > r.killed_us)
                .unwrap_or(sending_end_us);
            let from = acks_us.partition_point(|&a| a <= r.killed_us);
            let to = acks_us.partition_point(|&a| a <= until);
            let longest = std::iter::once(r.killed_us)
                .chain(acks_us[from..to].iter().copied())
                .chain(std::iter::once(until.max(r.killed_us)))
                .collect::<Vec<_>>()
                .windows(2)
                .map(|w| w[1] - w[0])
                .max();
            FaultFigures {
                role: r.fault.role,
                killed_at_secs: r.killed_us as f64 / 1e6,
                restarted_at_secs: r.restarted_us.map(|t| t as f64 / 1e6),
                first_ack_after_kill_ms: first_after(r.killed_us),
                first_ack_after_restart_ms: r.restarted_us.and_then(first_after),
                longest_ack_gap_ms: ms(longest.unwrap_or_default()),
                presence_back_after_restart_ms: r
                    .restarted_us
                    .zip(r.presence_back_us)
                    .map(|(restart, back)| ms(back.saturating_sub(restart))),
                roles_ready_while_down: r.ready_while_down.clone(),
                all_ready_after_restart_ms: r
                    .restarted_us
                    .zip(r.all_ready_us)
                    .map(|(restart, ready)| ms(ready.saturating_sub(restart))),
                error: r.error.clone(),
            }
        })
        .collect()
}

fn ms(micros: u64) -> f64 {
    micros as f64 / 1000.0
}

/// Points in the run, seconds since its origin.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Marks {
    pub connected_secs: f64,
    pub sending_start_secs: f64,
    pub measure_start_secs: f64,
    pub sending_end_secs: f64,
}

/// The timeline points whose interval ends in `(from, to]`, seconds since the origin.
pub fn window(timeline: &[TimelinePoint], from: f64, to: f64) -> &[TimelinePoint] {
    let start = timeline.partition_point(|p| p.t_secs <= from);
    let end = timeline.partition_point(|p| p.t_secs <= to + 1e-9);
    &timeline[start..end.max(start)]
}

pub fn rates(points: &[TimelinePoint]) -> Rates {
    let total = points.iter().fold(Counters::default(), |sum, p| Counters {
        sent: sum.sent + p.counts.sent,
        acked: sum.acked + p.counts.acked,
        delivered: sum.delivered + p.counts.delivered,
        errors: sum.errors + p.counts.errors,
    });
    let secs = match (points.first(), points.last()) {
        // Each point covers the second before it.
        (Some(first), Some(last)) => last.t_secs - first.t_secs + 1.0,
        _ => return Rates::default(),
    };
    Rates {
        offered_per_sec: None,
        sent_per_sec: total.sent as f64 / secs,
        acked_per_sec: total.acked as f64 / secs,
        delivered_per_sec: total.delivered as f64 / secs,
    }
}

pub fn process_figures(points: &[TimelinePoint]) -> Vec<ProcessFigures> {
    let mut by_name: BTreeMap<&str, Vec<(f64, &ProcessSample)>> = BTreeMap::new();
    for point in points {
        for sample in &point.processes {
            by_name
                .entry(&sample.name)
                .or_default()
                .push((point.t_secs, sample));
        }
    }
    by_name
        .into_iter()
        .map(|(name, samples)| {
            let (first_t, first) = samples[0];
            let (last_t, last) = samples[samples.len() - 1];
            let cpu_ms = last.cpu_ms.saturating_sub(first.cpu_ms) as f64;
            // Messages acknowledged in the intervals after the first sample.
            let acked: u64 = points
                .iter()
                .filter(|p| p.t_secs > first_t && p.t_secs <= last_t)
                .map(|p| p.counts.acked)
                .sum();
            let span = last_t - first_t;
            ProcessFigures {
                name: name.to_owned(),
                rss_start_bytes: first.rss_bytes,
                rss_peak_bytes: samples.iter().map(|s| s.1.rss_bytes).max().unwrap_or(0),
                rss_end_bytes: last.rss_bytes,
                cpu_mean_percent: if span > 0.0 {
                    cpu_ms / 10.0 / span
                } else {
                    f64::from(first.cpu_percent)
                },
                cpu_max_percent: samples
                    .iter()
                    .map(|s| f64::from(s.1.cpu_percent))
                    .fold(0.0, f64::max),
                cpu_us_per_message: (acked > 0).then(|| cpu_ms * 1000.0 / acked as f64),
            }
        })
        .collect()
}

/// CPU time per acknowledged message summed over the processes that report it.
pub fn total_cpu_us_per_message(processes: &[ProcessFigures]) -> Option<f64> {
    let per: Vec<f64> = processes
        .iter()
        .filter_map(|p| p.cpu_us_per_message)
        .collect();
    (!per.is_empty()).then(|| per.iter().sum())
}

/// The projection's lag behind the log (events the projector's consumer had not
/// acknowledged), from the samples of a window of the timeline.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ProjectionFigures {
    pub samples: usize,
    pub median_lag: u64,
    pub max_lag: u64,
    /// When the largest lag was sampled, seconds since the run's origin.
    pub max_lag_at_secs: f64,
    /// The longest time the acknowledged floor stood still with events behind it: the
    /// projection stopped (a projector down, a standby not yet holding the consumer).
    pub longest_stall_secs: f64,
    /// The last sample of the window.
    pub last_lag: u64,
}

/// `None` when the window has no sample (no NATS address to read them from).
pub fn projection_figures(points: &[TimelinePoint]) -> Option<ProjectionFigures> {
    let samples: Vec<(f64, ProjectionSample)> = points
        .iter()
        .filter_map(|p| p.projection.map(|sample| (p.t_secs, sample)))
        .collect();
    let last_lag = samples.last()?.1.lag();
    let mut lags: Vec<u64> = samples.iter().map(|(_, sample)| sample.lag()).collect();
    lags.sort_unstable();
    let &(max_lag_at_secs, max) = samples
        .iter()
        .max_by_key(|(_, sample)| sample.lag())
        .expect("at least one sample");
    let mut longest_stall_secs: f64 = 0.0;
    let mut stalled_since = None;
    for pair in samples.windows(2) {
        let [(since, before), (t, now)] = pair else {
            continue;
        };
        if now.lag() > 0 && now.acknowledged <= before.acknowledged {
            let since = *stalled_since.get_or_insert(*since);
            longest_stall_secs = longest_stall_secs.max(t - since);
        } else {
            stalled_since = None;
        }
    }
    Some(ProjectionFigures {
        samples: samples.len(),
        median_lag: lags[lags.len() / 2],
        max_lag: max.lag(),
        max_lag_at_secs,
        longest_stall_secs,
        last_lag,
    })
}

/// The process with the highest mean CPU, with its figure.
pub fn busiest(processes: &[ProcessFigures]) -> Option<String> {
    processes
        .iter()
        .max_by(|a, b| a.cpu_mean_percent.total_cmp(&b.cpu_mean_percent))
        .map(|p| {
            let warning = if p.name == "harness" {
                ": the harness, not the platform, is what limits this run"
            } else {
                ""
            };
            format!(
                "{} ({:.0} % of a core){warning}",
                p.name, p.cpu_mean_percent
            )
        })
}

pub fn ratios(rates: &Rates, latency: &Latencies, baselines: &Baselines) -> Ratios {
    let over = |a: f64, b: f64| (b > 0.0 && a > 0.0).then(|| a / b);
    let js = baselines.jetstream.as_ref();
    let echo = baselines.websocket_echo.as_ref();
    Ratios {
        messages_vs_jetstream_publish: js.and_then(|j| over(rates.acked_per_sec, j.per_sec)),
        delivery_p99_vs_jetstream_ack_p99: js
            .and_then(|j| over(latency.send_to_delivery.p99_ms, j.latency.p99_ms)),
        ack_p99_vs_websocket_echo_p99: echo
            .and_then(|e| over(latency.send_to_ack.p99_ms, e.latency.p99_ms)),
    }
}

fn summary_row(out: &mut String, label: &str, s: &Summary) {
    let _ = writeln!(
        out,
        "  {label:<22} {:>9} {:>9.2} {:>9.2} {:>9.2} {:>9.2} {:>9.2}",
        s.count, s.p50_ms, s.p90_ms, s.p99_ms, s.p999_ms, s.max_ms
    );
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

/// The final table printed after a run.
pub fn render_table(report: &Report) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "Scenario   {}", report.scenario.name);
    let _ = writeln!(out, "Platform   {}", report.environment.platform);
    let _ = writeln!(out, "Durability {}", report.environment.durability);
    let packing = if report.scenario.pack {
        "pushes ready together packed in one message (pack=1)"
    } else {
        "one message per frame (pack=0)"
    };
    let _ = writeln!(out, "Clients    protocol 2, {packing}");
    let m = &report.environment.machine;
    let _ = writeln!(
        out,
        "Machine    {} cores, {:.1} GiB, {}",
        m.cores,
        mib(m.memory_bytes) / 1024.0,
        m.os
    );
    let _ = writeln!(
        out,
        "Connections {} of {} connected, {} reconnects; sends {} scheduled, {} sent, {} acked, {} errors; measured {:.1} s",
        report.connections.connected,
        report.connections.planned,
        report.connections.reconnects,
        report.sends.scheduled,
        report.sends.sent,
        report.sends.acked,
        report.sends.send_errors,
        report.measured_secs
    );
    let t = &report.throughput;
    let _ = writeln!(
        out,
        "Throughput  {}sent {:.0}/s, acked {:.0}/s (end-to-end messages), delivered {:.0}/s (events to recipients)",
        t.offered_per_sec
            .map_or(String::new(), |r| format!("offered {r:.0}/s, ")),
        t.sent_per_sec,
        t.acked_per_sec,
        t.delivered_per_sec
    );
    let _ = writeln!(
        out,
        "\n  {:<22} {:>9} {:>9} {:>9} {:>9} {:>9} {:>9}",
        "latency (ms)", "count", "p50", "p90", "p99", "p99.9", "max"
    );
    summary_row(&mut out, "connect + auth", &report.connections.connect);
    summary_row(&mut out, "send -> ack", &report.latency.send_to_ack);
    summary_row(
        &mut out,
        "send -> delivery",
        &report.latency.send_to_delivery,
    );
    if let Some(baselines) = &report.baselines {
        if let Some(js) = &baselines.jetstream {
            summary_row(&mut out, "jetstream pub -> ack", &js.latency);
        }
        if let Some(echo) = &baselines.websocket_echo {
            summary_row(&mut out, "websocket echo rtt", &echo.latency);
        }
    }
    if !report.processes.is_empty() {
        let _ = writeln!(
            out,
            "\n  {:<14} {:>10} {:>10} {:>10} {:>9} {:>9} {:>12}",
            "process", "RSS start", "RSS peak", "RSS end", "CPU mean", "CPU max", "CPU us/msg"
        );
        let per_message = |us: Option<f64>| us.map_or("-".to_owned(), |us| format!("{us:.1}"));
        for p in &report.processes {
            let _ = writeln!(
                out,
                "  {:<14} {:>7.1} MiB {:>6.1} MiB {:>6.1} MiB {:>8.0}% {:>8.0}% {:>12}",
                p.name,
                mib(p.rss_start_bytes),
                mib(p.rss_peak_bytes),
                mib(p.rss_end_bytes),
                p.cpu_mean_percent,
                p.cpu_max_percent,
                per_message(p.cpu_us_per_message)
            );
        }
        let _ = writeln!(
            out,
            "  {:<14} {:>63} {:>12}",
            "all",
            "",
            per_message(total_cpu_us_per_message(&report.processes))
        );
    }
    if let Some(busiest) = &report.busiest_process {
        let _ = writeln!(out, "Busiest process: {busiest}");
    }
    if report.gateways.len() > 1 {
        let delivered: u64 = report.gateways.iter().map(|g| g.messages_delivered).sum();
        let _ = writeln!(
            out,
            "\n  {:<14} {:>14} {:>14} {:>12} {:>7}",
            "gateway", "sockets opened", "sockets at end", "delivered", "share"
        );
        for g in &report.gateways {
            let share = if delivered > 0 {
                100.0 * g.messages_delivered as f64 / delivered as f64
            } else {
                0.0
            };
            let _ = writeln!(
                out,
                "  {:<14} {:>14} {:>14} {:>12} {:>6.1}%",
                g.name, g.sockets_opened, g.sockets_at_end, g.messages_delivered, share
            );
        }
    }
    if let Some(per) = report.gateway_rss_per_connection_bytes {
        let _ = writeln!(out, "Gateway RSS per connection: {:.1} KiB", per / 1024.0);
    }
    if let Some(p) = &report.projection {
        let _ = writeln!(
            out,
            "Projection lag (log events not yet acknowledged by the projector, {} samples): median {}, max {} at {:.0} s, at the end {}; longest stall {:.0} s",
            p.samples, p.median_lag, p.max_lag, p.max_lag_at_secs, p.last_lag, p.longest_stall_secs
        );
    }
    if let Some(ramp) = &report.ramp {
        let _ = writeln!(
            out,
            "\n  {:>9} {:>9} {:>12} {:>8} {:>6}  busiest",
            "target/s", "acked/s", "p99 deliv ms", "errors", "held"
        );
        for s in &ramp.steps {
            let _ = writeln!(
                out,
                "  {:>9.0} {:>9.0} {:>12.2} {:>8} {:>6}  {}{}",
                s.target_per_sec,
                s.rates.acked_per_sec,
                s.send_to_delivery.p99_ms,
                s.errors,
                if s.held { "yes" } else { "no" },
                s.busiest_process.as_deref().unwrap_or("-"),
                s.reason
                    .as_deref()
                    .map(|r| format!(" ({r})"))
                    .unwrap_or_default()
            );
        }
        match ramp.highest_rate_held {
            Some(rate) => {
                let _ = writeln!(out, "Highest rate held: {rate:.0} messages/s");
            }
            None => {
                let _ = writeln!(out, "Highest rate held: none (the first step failed)");
            }
        }
    }
    if let Some(b) = &report.baselines {
        let _ = writeln!(out, "\nBaselines measured {}", b.how);
        for t in [&b.jetstream, &b.jetstream_consume, &b.websocket_echo]
            .into_iter()
            .flatten()
        {
            let _ = writeln!(out, "Baseline: {} = {:.0}/s", t.what, t.per_sec);
        }
    }
    if let Some(r) = &report.ratios {
        let show = |v: Option<f64>| v.map_or("n/a".to_owned(), |v| format!("{v:.3}"));
        let at = match report.ramp.as_ref().and_then(|r| r.highest_rate_held) {
            Some(rate) => format!(" (at the highest rate held, {rate:.0}/s)"),
            None => String::new(),
        };
        let _ = writeln!(
            out,
            "Ratios{at}: messages/s = {} x JetStream publish rate; p99 send->delivery = {} x JetStream ack p99; p99 send->ack = {} x WebSocket echo p99",
            show(r.messages_vs_jetstream_publish),
            show(r.delivery_p99_vs_jetstream_ack_p99),
            show(r.ack_p99_vs_websocket_echo_p99)
        );
    }
    let r = &report.resume;
    if r.reconnected_connections > 0 || r.drops_clean + r.drops_abrupt > 0 {
        let _ = writeln!(
            out,
            "Reconnects: {} drops ({} clean, {} cut), {} connections reconnected ({:.0} %); {} resume frames, {} more rounds, {} events resumed",
            r.drops_clean + r.drops_abrupt,
            r.drops_clean,
            r.drops_abrupt,
            r.reconnected_connections,
            r.reconnected_fraction * 100.0,
            r.resume_frames,
            r.more_rounds,
            r.resumed_events
        );
    }
    if let Some(o) = &r.outage {
        let _ = writeln!(
            out,
            "Outage: {} devices resumed {} events in {:.2} s = {:.0} events/s{}",
            o.devices,
            o.events,
            o.secs,
            o.events_per_sec,
            o.vs_jetstream_consume
                .map(|v| format!(" = {v:.3} x raw JetStream consume"))
                .unwrap_or_default()
        );
    }
    if !report.errors.is_empty() {
        let codes: Vec<String> = report
            .errors
            .iter()
            .map(|(c, n)| format!("{c} {n}"))
            .collect();
        let _ = writeln!(out, "Errors: {}", codes.join(", "));
    }
    if let Some(p) = &report.presence {
        let _ = writeln!(
            out,
            "\nPresence probe: {} pairs; missed online {}, missed offline {}, failed {:?}",
            p.pairs, p.missed_online, p.missed_offline, p.failed
        );
        summary_row(&mut out, "open -> seen online", &p.open_to_seen_online);
        summary_row(&mut out, "close -> seen offline", &p.close_to_seen_offline);
    }
    if let Some(replay) = &report.replay {
        out.push_str(&replay.text());
    }
    if !report.faults.is_empty() {
        let _ = writeln!(
            out,
            "\n  {:<10} {:>8} {:>10} {:>16} {:>19} {:>15} {:>15} {:>16}  ready while down",
            "fault",
            "kill s",
            "restart s",
            "kill->ack ms",
            "restart->ack ms",
            "longest gap ms",
            "presence ms",
            "all ready ms"
        );
        let show = |v: Option<f64>| v.map_or("-".to_owned(), |v| format!("{v:.0}"));
        for f in &report.faults {
            let _ = writeln!(
                out,
                "  {:<10} {:>8.1} {:>10} {:>16} {:>19} {:>15} {:>15} {:>16}  {}{}",
                f.role.to_string(),
                f.killed_at_secs,
                f.restarted_at_secs
                    .map_or("-".to_owned(), |t| format!("{t:.1}")),
                show(f.first_ack_after_kill_ms),
                show(f.first_ack_after_restart_ms),
                format!("{:.0}", f.longest_ack_gap_ms),
                show(f.presence_back_after_restart_ms),
                show(f.all_ready_after_restart_ms),
                if f.roles_ready_while_down.is_empty() {
                    "-".to_owned()
                } else {
                    f.roles_ready_while_down.join(",")
                },
                f.error
                    .as_deref()
                    .map(|e| format!("  ({e})"))
                    .unwrap_or_default()
            );
        }
    }
    let l = &report.ledger;
    let problems: Vec<String> = ledger::problems(l)
        .into_iter()
        .map(|(name, n)| format!("{name} {n}"))
        .collect();
    let _ = writeln!(
        out,
        "\nLedger {}: {} acked messages, {} expected deliveries; {}",
        if l.clean() { "CLEAN" } else { "FAILED" },
        l.acknowledged_messages,
        l.expected_deliveries,
        problems.join(", ")
    );
    let _ = writeln!(
        out,
        "  unacknowledged {}: {} in the log (timed out but appended), {} never applied, {} unclassified{}",
        l.unacknowledged,
        l.unacknowledged_in_log,
        l.unacknowledged_never_applied,
        l.unacknowledged_unclassified,
        if l.log_checked {
            ""
        } else {
            " (the log was not read: give --nats-url)"
        }
    );
    if l.excluded_connections + l.reconnected_connections > 0 {
        let _ = writeln!(
            out,
            "  {} connections left out (gave up), {} reconnected (and resumed: checked across their sockets)",
            l.excluded_connections, l.reconnected_connections
        );
    }
    for example in &l.examples {
        let _ = writeln!(out, "  {example}");
    }
    out
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::baseline::Throughput;

    pub(crate) fn point(t: f64, acked: u64, cpu: &[(&str, f32, u64)]) -> TimelinePoint {
        TimelinePoint {
            t_secs: t,
            counts: Counters {
                sent: acked,
                acked,
                delivered: 2 * acked,
                errors: 0,
            },
            ack: Summary {
                count: acked,
                p99_ms: t,
                ..Summary::default()
            },
            delivery: Summary {
                count: 2 * acked,
                p50_ms: t / 2.0,
                p99_ms: 2.0 * t,
                ..Summary::default()
            },
            processes: cpu
                .iter()
                .map(|(name, cpu, rss)| ProcessSample {
                    name: (*name).to_owned(),
                    rss_bytes: *rss,
                    cpu_percent: *cpu,
                    // `cpu` percent of a core for every second so far.
                    cpu_ms: (f64::from(*cpu) * 10.0 * t) as u64,
                })
                .collect(),
            projection: None,
        }
    }

    pub(crate) fn sample_report() -> Report {
        // The projection falls behind in seconds 3 and 4 (stands still for 2 s), then
        // catches up.
        let acknowledged = [50, 150, 150, 150, 490, 600];
        let timeline: Vec<_> = (1..=6)
            .map(|t| TimelinePoint {
                projection: Some(ProjectionSample {
                    log_end: 100 * t,
                    acknowledged: acknowledged[t as usize - 1],
                }),
                ..point(
                    t as f64,
                    100 * t,
                    &[
                        ("handler", 90.0, 50 << 20),
                        ("gateway-0", 40.0, (30 + t) << 20),
                    ],
                )
            })
            .collect();
        let processes = process_figures(&timeline);
        Report {
            scenario: Scenario::parse(
                "name = \"t\"\nusers = 2\nduration_secs = 1\n[conversations]\ndirect_pairs = 1\n[rate]\nmessages_per_sec = 1\n",
                "t",
            )
            .unwrap(),
            environment: Environment {
                machine: Machine {
                    host: "h".into(),
                    os: "Linux".into(),
                    cores: 2,
                    memory_bytes: 1 << 30,
                },
                platform: "spawned".into(),
                durability: "nats sync_interval: always (fsync per write)".into(),
                harness_version: "0".into(),
                started_at_unix: 0,
                command: "parley-loadtest run".into(),
            },
            connections: ConnectionFigures::default(),
            sends: SendFigures::default(),
            measured_secs: 6.0,
            throughput: rates(&timeline),
            latency: Latencies::default(),
            errors: BTreeMap::from([("frame:timeout".to_owned(), 1)]),
            ledger: LedgerReport::default(),
            busiest_process: busiest(&processes),
            processes,
            gateway_rss_per_connection_bytes: Some(10240.0),
            projection: projection_figures(&timeline),
            gateways: Vec::new(),
            ramp: None,
            faults: Vec::new(),
            resume: ResumeFigures::default(),
            presence: None,
            replay: None,
            baselines: None,
            ratios: None,
            marks: Marks::default(),
            timeline,
            passed: true,
        }
    }

    #[test]
    fn the_projection_lag_and_its_longest_stall_come_from_the_timeline() {
        let report = sample_report();
        assert_eq!(
            report.projection,
            Some(ProjectionFigures {
                samples: 6,
                median_lag: 50,
                max_lag: 250,
                max_lag_at_secs: 4.0,
                longest_stall_secs: 2.0,
                last_lag: 0,
            })
        );
        assert!(
            render_table(&report).contains(
                "Projection lag (log events not yet acknowledged by the projector, 6 samples): median 50, max 250 at 4 s, at the end 0; longest stall 2 s"
            ),
            "{}",
            render_table(&report)
        );
        let unread = [point(1.0, 1, &[]), point(2.0, 1, &[])];
        assert_eq!(projection_figures(&unread), None);
    }

    #[test]
    fn windows_and_rates_come_from_the_timeline() {
        let report = sample_report();
        let w = window(&report.timeline, 2.0, 4.0);
        assert_eq!(
            w.iter().map(|p| p.t_secs).collect::<Vec<_>>(),
            vec![3.0, 4.0]
        );
        let r = rates(w);
        assert_eq!(r.acked_per_sec, 350.0);
        assert_eq!(r.delivered_per_sec, 700.0);
        assert_eq!(rates(&[]), Rates::default());
    }

    #[test]
    fn process_figures_and_the_busiest_process() {
        let report = sample_report();
        let gw = report
            .processes
            .iter()
            .find(|p| p.name == "gateway-0")
            .unwrap();
        assert_eq!(gw.rss_start_bytes, 31 << 20);
        assert_eq!(gw.rss_peak_bytes, 36 << 20);
        assert_eq!(gw.rss_end_bytes, 36 << 20);
        assert!((gw.cpu_mean_percent - 40.0).abs() < 1e-6);
        // 400 ms of CPU a second while 200, 300, .. 600 messages a second are acked: the
        // five seconds after the first sample used 2,000 ms for 2,000 messages.
        let per_message = gw.cpu_us_per_message.unwrap();
        assert!((per_message - 1000.0).abs() < 1e-6, "{per_message}");
        let total = total_cpu_us_per_message(&report.processes).unwrap();
        assert!((total - 1000.0 * 13.0 / 4.0).abs() < 1e-6, "{total}");
        assert_eq!(
            report.busiest_process.as_deref(),
            Some("handler (90 % of a core)")
        );
    }

    #[test]
    fn ratios_divide_by_the_baselines() {
        let baselines = Baselines {
            jetstream: Some(Throughput {
                what: "js".into(),
                per_sec: 1000.0,
                latency: Summary {
                    p99_ms: 2.0,
                    ..Summary::default()
                },
            }),
            jetstream_consume: None,
            websocket_echo: None,
            how: String::new(),
        };
        let latency = Latencies {
            send_to_ack: Summary {
                p99_ms: 3.0,
                ..Summary::default()
            },
            send_to_delivery: Summary {
                p99_ms: 5.0,
                ..Summary::default()
            },
        };
        let rates = Rates {
            acked_per_sec: 420.0,
            ..Rates::default()
        };
        let r = ratios(&rates, &latency, &baselines);
        assert_eq!(r.messages_vs_jetstream_publish, Some(0.42));
        assert_eq!(r.delivery_p99_vs_jetstream_ack_p99, Some(2.5));
        assert_eq!(r.ack_p99_vs_websocket_echo_p99, None);
    }

    #[test]
    fn a_faults_interruption_is_read_from_the_ack_times() {
        let fault = |role: &str, at_us: u64, restarted_us: u64| FaultRecord {
            fault: format!("{role}@1").parse().unwrap(),
            killed_us: at_us,
            restarted_us: Some(restarted_us),
            presence_back_us: None,
            ready_while_down: Vec::new(),
            all_ready_us: None,
            error: None,
        };
        // Acks every 100 ms, none from 1.05 s to 3.5 s; a second fault at 5 s with no ack
        // after it.
        let acks: Vec<u64> = (0..=10)
            .map(|i| i * 100_000)
            .chain((35..=45).map(|i| i * 100_000))
            .collect();
        let figures = fault_figures(
            &[
                fault("handler", 1_050_000, 3_000_000),
                fault("nats", 5_000_000, 6_000_000),
            ],
            &acks,
            8_000_000,
        );
        assert_eq!(figures[0].first_ack_after_kill_ms, Some(2450.0));
        assert_eq!(figures[0].first_ack_after_restart_ms, Some(500.0));
        assert_eq!(figures[0].longest_ack_gap_ms, 2450.0);
        assert_eq!(figures[0].killed_at_secs, 1.05);
        assert_eq!(figures[1].first_ack_after_kill_ms, None);
        assert_eq!(figures[1].longest_ack_gap_ms, 3000.0);
    }

    #[test]
    fn a_gateway_is_credited_with_the_sockets_opened_to_it_and_what_they_received() {
        // Connection 0 moved from gateway 2 to gateway 0; connection 1 stayed on gateway 1.
        let moved = [(2, 5), (0, 3)];
        let stayed = [(1, 4)];
        let figures = gateway_figures(3, [&moved[..], &stayed[..]]);
        let summary: Vec<(u64, u64, u64)> = figures
            .iter()
            .map(|g| (g.sockets_opened, g.sockets_at_end, g.messages_delivered))
            .collect();
        assert_eq!(summary, [(1, 1, 3), (1, 1, 4), (1, 0, 5)]);
        assert_eq!(figures[2].name, "gateway-2");

        let mut report = sample_report();
        report.gateways = figures;
        let table = render_table(&report);
        assert!(table.contains("sockets at end"), "{table}");
        assert!(
            table.contains("41.7%"),
            "gateway-2's 5 of 12 messages: {table}"
        );
    }

    #[test]
    fn the_table_and_the_json_carry_the_figures() {
        let mut report = sample_report();
        report.faults = fault_figures(
            &[FaultRecord {
                fault: "gateway-0@1:2".parse().unwrap(),
                killed_us: 1_000_000,
                restarted_us: Some(3_000_000),
                presence_back_us: None,
                ready_while_down: Vec::new(),
                all_ready_us: None,
                error: None,
            }],
            &[500_000, 3_250_000],
            6_000_000,
        );
        let table = render_table(&report);
        assert!(table.contains("gateway-0"), "{table}");
        assert!(table.contains("2250"), "{table}");
        assert!(table.contains("Ledger CLEAN"), "{table}");
        assert!(table.contains("fsync per write"), "{table}");
        assert!(
            table.contains("Gateway RSS per connection: 10.0 KiB"),
            "{table}"
        );
        assert!(table.contains("frame:timeout 1"), "{table}");
        let json = serde_json::to_string(&report).unwrap();
        let back: Report = serde_json::from_str(&json).unwrap();
        assert_eq!(back, report);
        report.ledger.lost = 1;
        report
            .ledger
            .examples
            .push("connection 3: acknowledged seq 9 never arrived".into());
        let table = render_table(&report);
        assert!(
            table.contains("Ledger FAILED") && table.contains("lost 1"),
            "{table}"
        );
        assert!(table.contains("seq 9 never arrived"), "{table}");
    }

    #[test]
    fn an_outage_resume_rate_spans_its_first_start_to_its_last_end() {
        assert_eq!(OutageFigures::of(&[], Some(1.0)), None);
        // Three devices resume 600 events between 1.0 s and 1.5 s.
        let o = OutageFigures::of(
            &[
                (1_000_000, 1_200_000, 200),
                (1_100_000, 1_500_000, 300),
                (1_050_000, 1_100_000, 100),
            ],
            Some(2400.0),
        )
        .unwrap();
        assert_eq!(o.devices, 3);
        assert_eq!(o.events, 600);
        assert!((o.secs - 0.5).abs() < 1e-9, "{o:?}");
        assert!((o.events_per_sec - 1200.0).abs() < 1e-6, "{o:?}");
        assert_eq!(o.vs_jetstream_consume, Some(0.5));
    }
}
