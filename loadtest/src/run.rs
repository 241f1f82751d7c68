//! One run: start or reach the platform, measure baselines, connect, set up conversations,
//! send on the schedule, drain, check the ledger and write the report.

use std::collections::HashMap;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};
use parley_events::ConversationId;
use parley_services::auth;
use parley_services::config::Secret;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::baseline::{self, Baselines};
use crate::client::{self, ConnOutcome, Control, Create, SendSlot};
use crate::ledger::{self, ConvIndex, Delivery, LedgerInput};
use crate::live::{Live, TimelinePoint, Window};
use crate::plan::{ConvKind, Plan};
use crate::platform::{SpawnOptions, SpawnedPlatform};
use crate::report::{self, Report};
use crate::resources::{Machine, Sampler};
use crate::scenario::{Durability, Scenario};
use crate::{LoadtestError, chart, unix_secs};

/// The gateway's default `limits.max_frame_bytes`.
const DEFAULT_MAX_FRAME_BYTES: usize = 16_384;
/// How long the drain waits for outstanding acks and deliveries.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
/// How long baselines run, each.
pub const BASELINE_TIME: Duration = Duration::from_secs(5);
/// Creates in flight during set-up.
const SETUP_CONCURRENCY: usize = 256;

/// Where the load goes.
#[derive(Debug, Clone)]
pub enum Target {
    /// Start the platform here (`--spawn`).
    Spawn { parley: Option<PathBuf> },
    /// Gateways that are already running, and the secret their tokens are signed with.
    External {
        gateways: Vec<String>,
        secret: Secret,
        /// For the JetStream baseline.
        nats_url: Option<String>,
    },
}

#[derive(Debug, Clone)]
pub struct RunOptions {
    pub scenario: Scenario,
    pub target: Target,
    /// Reports go to a new directory under this one.
    pub out_dir: PathBuf,
    pub progress: bool,
    /// The command line, for the report.
    pub command: String,
}

#[derive(Debug)]
pub struct RunOutcome {
    pub report: Report,
    pub dir: PathBuf,
}

/// Time series shared between the sampler and the run.
#[derive(Default)]
struct Recorded {
    timeline: Vec<TimelinePoint>,
    windows: Vec<Window>,
}

pub async fn run(options: RunOptions) -> Result<RunOutcome, LoadtestError> {
    let scenario = options.scenario.clone();
    let started_at_unix = unix_secs();
    let dir = options
        .out_dir
        .join(format!("{}-{started_at_unix}", scenario.name));
    std::fs::create_dir_all(&dir)
        .map_err(LoadtestError::io(format!("creating {}", dir.display())))?;
    raise_file_limit(scenario.connections())?;

    let tag = &uuid::Uuid::new_v4().simple().to_string()[..4];
    let gateway_count = match &options.target {
        Target::Spawn { .. } => scenario.gateways,
        Target::External { gateways, .. } => gateways.len(),
    };
    let plan = Plan::build(&scenario, tag, gateway_count);
    let frame_needed = plan.largest_create_frame();

    let (platform, gateways, secret, nats_url, platform_text) = match &options.target {
        Target::Spawn { parley } => {
            if options.progress {
                eprintln!("starting nats-server, redis-server and the parley roles ...");
            }
            let spawned = SpawnedPlatform::start(&SpawnOptions {
                parley: parley.clone(),
                gateways: scenario.gateways,
                durability: scenario.durability,
                max_frame_bytes: (frame_needed > DEFAULT_MAX_FRAME_BYTES)
                    .then_some(frame_needed.next_power_of_two()),
                log_dir: dir.join("logs"),
            })
            .await?;
            let text = format!(
                "spawned on this machine: {} gateway(s), 1 handler, 1 projector, nats-server {}, redis",
                scenario.gateways, spawned.nats_version
            );
            let (urls, secret, nats) = (
                spawned.gateway_urls.clone(),
                spawned.secret.clone(),
                Some(spawned.nats_url.clone()),
            );
            (Some(spawned), urls, secret, nats, text)
        }
        Target::External {
            gateways,
            secret,
            nats_url,
        } => {
            if frame_needed > DEFAULT_MAX_FRAME_BYTES {
                eprintln!(
                    "note: create_group frames of up to {frame_needed} bytes need the gateways' limits.max_frame_bytes raised"
                );
            }
            (
                None,
                gateways.clone(),
                secret.clone(),
                nats_url.clone(),
                format!("external: {} gateway(s)", gateways.len()),
            )
        }
    };
    let durability = match &platform {
        Some(p) => p.durability.describe().to_owned(),
        None => "external platform: its NATS server's own setting (not verified)".to_owned(),
    };

    let baselines = if scenario.baselines {
        if options.progress {
            eprintln!(
                "measuring the baselines ({} s each) ...",
                BASELINE_TIME.as_secs()
            );
        }
        Some(measure_baselines(nats_url.as_deref(), scenario.message_bytes).await?)
    } else {
        None
    };

    let mut processes = platform.as_ref().map(|p| p.processes()).unwrap_or_default();
    processes.push(("harness".to_owned(), std::process::id()));
    let live = Arc::new(Live::new(Instant::now()));
    let recorded = Arc::new(Mutex::new(Recorded::default()));
    let phase = Arc::new(Mutex::new("connecting"));
    let progress = Progress::new(options.progress);
    let sampler = tokio::spawn(sample_every_second(
        Arc::clone(&live),
        Arc::clone(&recorded),
        Sampler::new(&processes)?,
        Arc::clone(&phase),
        progress.clone(),
    ));

    let gateway_rss_before = gateway_rss(&processes);
    let finish = CancellationToken::new();
    let (created_tx, mut created_rx) = mpsc::unbounded_channel();
    let token_ttl = scenario.sending_time().as_secs() + 3600;
    let tokens: Vec<String> = plan
        .users
        .iter()
        .map(|user| auth::mint(&secret, user, unix_secs(), token_ttl))
        .collect();
    let mut controls = Vec::with_capacity(plan.connections.len());
    let mut tasks = Vec::with_capacity(plan.connections.len());
    for (i, conn) in plan.connections.iter().enumerate() {
        let (tx, rx) = mpsc::channel(16);
        controls.push(tx);
        let url = format!(
            "{}?access_token={}",
            gateways[conn.gateway], tokens[conn.user]
        );
        let connect_at = live.origin + Duration::from_secs_f64(i as f64 / scenario.connect_rate);
        tasks.push(tokio::spawn(client::run(
            Arc::clone(&live),
            url,
            connect_at,
            rx,
            created_tx.clone(),
            finish.clone(),
        )));
    }
    let planned = plan.connections.len() as u64;
    let connect_budget =
        Duration::from_secs_f64(planned as f64 / scenario.connect_rate) + Duration::from_secs(60);
    wait_for(connect_budget, || {
        live.connected.load(Ordering::Relaxed) + live.connect_failed.load(Ordering::Relaxed)
            >= planned
    })
    .await;
    let connected_secs = secs_since(&live, Instant::now());
    let gateway_rss_per_connection =
        match (gateway_rss_before, live.connected.load(Ordering::Relaxed)) {
            (Some(before), connected) if connected > 0 => {
                // Let allocations settle before reading the growth.
                tokio::time::sleep(Duration::from_secs(2)).await;
                gateway_rss(&processes)
                    .map(|after| (after as f64 - before as f64) / connected as f64)
            }
            _ => None,
        };

    *phase.lock().unwrap() = "setting up";
    let conversations = set_up(&plan, &controls, &mut created_rx).await?;
    let members = plan.member_connections(scenario.connections_per_user);
    let expected_created: u64 = members.iter().map(|m| m.len() as u64).sum();
    let all_seen = wait_for(Duration::from_secs(30), || {
        live.created_seen.load(Ordering::Relaxed) >= expected_created
    })
    .await;
    if !all_seen {
        return Err(LoadtestError::Setup(format!(
            "{} of {expected_created} member connections received their conversation.created within 30 s",
            live.created_seen.load(Ordering::Relaxed)
        )));
    }

    // Sending starts a moment from now, so every writer has its schedule before it is due.
    let start_us = live.now_us() + 500_000;
    let measure_us = start_us + micros(scenario.warmup());
    if scenario.ramp.is_some() {
        live.measure_from(start_us);
    } else {
        live.measure_from(measure_us);
    }
    let phases: Arc<[crate::schedule::Phase]> = plan.phases.clone().into();
    let mut slots_by_conn: HashMap<usize, Vec<SendSlot>> = HashMap::new();
    for (index, slot) in plan.slots.iter().enumerate() {
        slots_by_conn
            .entry(slot.connection)
            .or_default()
            .push(SendSlot {
                slot: index,
                conversation: conversations[slot.conversation as usize],
                share: slot.share,
            });
    }
    for (conn, slots) in slots_by_conn {
        let _ = controls[conn]
            .send(Control::Start {
                slots,
                phases: Arc::clone(&phases),
                start_us,
                message_bytes: scenario.message_bytes,
            })
            .await;
    }
    let sending_start = live.at(start_us);
    let sending_end = sending_start + scenario.sending_time();
    *phase.lock().unwrap() = if scenario.warmup_secs > 0.0 {
        "warming up"
    } else {
        "sending"
    };

    let ramp = match &scenario.ramp {
        Some(ramp) => Some(run_ramp(ramp, &live, &recorded, sending_start, &phase).await),
        None => {
            if scenario.warmup_secs > 0.0 {
                tokio::time::sleep_until(live.at(measure_us).into()).await;
                *phase.lock().unwrap() = "sending";
            }
            tokio::time::sleep_until(sending_end.into()).await;
            None
        }
    };
    let sending_end_secs = secs_since(&live, Instant::now().min(sending_end));
    live.stop_sending.store(true, Ordering::Relaxed);

    *phase.lock().unwrap() = "draining";
    drain(&live).await;
    finish.cancel();
    drop(controls);
    let mut outcomes = Vec::with_capacity(tasks.len());
    for task in tasks {
        outcomes.push(task.await.unwrap_or_else(|_| {
            // Its sends and deliveries are unknown: leave it out of the ledger, loudly.
            live.record_error("harness:connection_task_panicked");
            ConnOutcome {
                closed: true,
                ..ConnOutcome::default()
            }
        }));
    }
    sampler.abort();
    progress.finish();
    let recorded = {
        let mut r = recorded.lock().unwrap();
        std::mem::take(&mut r.timeline)
    };
    drop(platform);

    let ledger = ledger::check(&ledger_input(&plan, &members, &conversations, &outcomes));
    let marks = report::Marks {
        connected_secs,
        sending_start_secs: secs_since(&live, sending_start),
        measure_start_secs: secs_since(&live, live.at(measure_us)),
        sending_end_secs,
    };
    let measured_from = if scenario.ramp.is_some() {
        marks.sending_start_secs
    } else {
        marks.measure_start_secs
    };
    let measured = report::window(&recorded, measured_from, marks.sending_end_secs);
    // An idle scenario sends nothing: its resources are read while connected.
    let resource_window = if plan.slots.is_empty() {
        report::window(&recorded, marks.connected_secs, f64::MAX)
    } else {
        measured
    };
    let processes = report::process_figures(resource_window);
    let throughput = report::rates(measured);
    let window = live.measured();
    let latency = report::Latencies {
        send_to_ack: window.ack.summary(),
        send_to_delivery: window.delivery.summary(),
    };
    let held_step = ramp.as_ref().and_then(|r| r.steps.iter().rfind(|s| s.held));
    let ratios = baselines.as_ref().map(|b| match held_step {
        Some(step) => report::ratios(
            &step.rates,
            &report::Latencies {
                send_to_ack: step.send_to_ack,
                send_to_delivery: step.send_to_delivery,
            },
            b,
        ),
        None => report::ratios(&throughput, &latency, b),
    });
    let sent: u64 = outcomes.iter().map(|o| o.sent).sum();
    let report = Report {
        environment: report::Environment {
            machine: Machine::describe(),
            platform: platform_text,
            durability,
            harness_version: env!("CARGO_PKG_VERSION").to_owned(),
            started_at_unix,
            command: options.command.clone(),
        },
        connections: report::ConnectionFigures {
            planned: plan.connections.len(),
            connected: live.connected.load(Ordering::Relaxed),
            connect: live.connect_latency().summary(),
        },
        sends: report::SendFigures {
            scheduled: plan.scheduled_messages(
                Duration::from_secs_f64(marks.sending_end_secs - marks.sending_start_secs)
                    + Duration::from_millis(1),
            ),
            sent,
            acked: outcomes.iter().map(|o| o.acks.len() as u64).sum(),
            send_errors: live.send_errors.load(Ordering::Relaxed),
        },
        measured_secs: marks.sending_end_secs - measured_from,
        throughput,
        latency,
        errors: live.errors_by_code(),
        passed: ledger.clean(),
        ledger,
        busiest_process: report::busiest(&processes),
        processes,
        gateway_rss_per_connection_bytes: gateway_rss_per_connection,
        ramp,
        baselines,
        ratios,
        marks,
        timeline: recorded,
        scenario,
    };
    write_outputs(&dir, &report)?;
    Ok(RunOutcome { report, dir })
}

/// `parley-loadtest baseline`: both baselines, against `nats_url` or a nats-server started
/// here with `durability`.
pub async fn baselines(
    nats_url: Option<String>,
    durability: Durability,
    message_bytes: usize,
) -> Result<(Baselines, String), LoadtestError> {
    match nats_url {
        Some(url) => Ok((
            measure_baselines(Some(&url), message_bytes).await?,
            "external NATS: its own setting (not verified)".to_owned(),
        )),
        None => {
            let nats = parley_localstack::NatsServer::start(parley_localstack::NatsOptions {
                sync_always: durability == Durability::Always,
                ..Default::default()
            })?;
            let measured = measure_baselines(Some(&nats.url()), message_bytes).await?;
            Ok((measured, durability.describe().to_owned()))
        }
    }
}

async fn measure_baselines(
    nats_url: Option<&str>,
    message_bytes: usize,
) -> Result<Baselines, LoadtestError> {
    let jetstream = match nats_url {
        Some(url) => Some(baseline::jetstream(url, message_bytes, BASELINE_TIME).await?),
        None => {
            eprintln!("note: no NATS URL (--nats-url), so no JetStream baseline");
            None
        }
    };
    let websocket_echo = Some(baseline::websocket_echo(message_bytes, BASELINE_TIME).await?);
    Ok(Baselines {
        jetstream,
        websocket_echo,
    })
}

fn raise_file_limit(connections: usize) -> Result<(), LoadtestError> {
    // Each connection is a socket here, and another in a spawned gateway (which inherits
    // this limit); the rest is room for NATS, logs and the runtime.
    let needed_fds = connections as u64 + 1024;
    let limit = rlimit::increase_nofile_limit(needed_fds)
        .map_err(LoadtestError::io("raising the open-file limit"))?;
    if limit < needed_fds {
        return Err(LoadtestError::FileLimit {
            needed: connections,
            needed_fds,
            limit,
        });
    }
    Ok(())
}

async fn set_up(
    plan: &Plan,
    controls: &[mpsc::Sender<Control>],
    created: &mut mpsc::UnboundedReceiver<client::Created>,
) -> Result<Vec<ConversationId>, LoadtestError> {
    let per_user = plan.connections.len() / plan.users.len().max(1);
    let mut ids: Vec<Option<ConversationId>> = vec![None; plan.conversations.len()];
    let mut next = 0;
    let mut outstanding = 0;
    let deadline = Instant::now() + Duration::from_secs(60);
    while next < plan.conversations.len() || outstanding > 0 {
        while next < plan.conversations.len() && outstanding < SETUP_CONCURRENCY {
            let conv = &plan.conversations[next];
            let create = match conv.kind {
                ConvKind::Direct => Create::Direct {
                    peer: plan.users[conv.members[1]].clone(),
                },
                ConvKind::Group => Create::Group {
                    members: conv.members[1..]
                        .iter()
                        .map(|&u| plan.users[u].clone())
                        .collect(),
                },
            };
            controls[conv.members[0] * per_user]
                .send(Control::Create {
                    conversation_index: next,
                    create,
                })
                .await
                .map_err(|_| LoadtestError::Setup("a creator's connection is closed".into()))?;
            next += 1;
            outstanding += 1;
        }
        let reply = tokio::time::timeout_at(deadline.into(), created.recv())
            .await
            .map_err(|_| LoadtestError::Setup("conversations not created within 60 s".into()))?
            .ok_or_else(|| LoadtestError::Setup("every connection closed".into()))?;
        outstanding -= 1;
        match reply.result {
            Ok(id) => ids[reply.conversation_index] = Some(id),
            Err(code) => {
                return Err(LoadtestError::Setup(format!(
                    "creating conversation {} was refused: {code}",
                    reply.conversation_index
                )));
            }
        }
    }
    Ok(ids
        .into_iter()
        .map(|id| id.expect("every create answered"))
        .collect())
}

async fn run_ramp(
    ramp: &crate::scenario::Ramp,
    live: &Live,
    recorded: &Mutex<Recorded>,
    sending_start: Instant,
    phase: &Mutex<&'static str>,
) -> report::RampFigures {
    let step = Duration::from_secs_f64(ramp.step_secs);
    let mut figures = report::RampFigures::default();
    *phase.lock().unwrap() = "ramping";
    for (i, &target) in ramp.steps().iter().enumerate() {
        let start = sending_start + step * i as u32;
        let end = start + step;
        // The sampler's point for the step's last second lands just after it.
        tokio::time::sleep_until((end + Duration::from_millis(1100)).into()).await;
        // The step's first second is its transition from the previous rate.
        let (from, to) = (secs_since(live, start) + 1.0, secs_since(live, end) + 1.0);
        let (points, latency) = {
            let r = recorded.lock().unwrap();
            let points = report::window(&r.timeline, from, to).to_vec();
            let first = r.timeline.partition_point(|p| p.t_secs <= from);
            let mut latency = Window::default();
            for w in &r.windows[first..first + points.len()] {
                latency.merge(w);
            }
            (points, latency)
        };
        let delivery = latency.delivery;
        let rates = report::rates(&points);
        let errors: u64 = points.iter().map(|p| p.counts.errors).sum();
        let sent: u64 = points.iter().map(|p| p.counts.sent).sum();
        let p99 = delivery.summary().p99_ms;
        let reason = if p99 > ramp.max_p99_ms {
            Some(format!("p99 {p99:.0} ms > {} ms", ramp.max_p99_ms))
        } else if errors as f64 > ramp.max_error_ratio * sent as f64 {
            Some(format!("{errors} errors"))
        } else if rates.acked_per_sec < ramp.min_acked_ratio * target {
            Some(format!(
                "acked {:.0}/s < {:.0} % of target",
                rates.acked_per_sec,
                ramp.min_acked_ratio * 100.0
            ))
        } else {
            None
        };
        let held = reason.is_none();
        figures.steps.push(report::StepFigures {
            target_per_sec: target,
            rates,
            send_to_ack: latency.ack.summary(),
            send_to_delivery: delivery.summary(),
            errors,
            held,
            reason,
            busiest_process: report::busiest(&report::process_figures(&points)),
        });
        if !held {
            break;
        }
        figures.highest_rate_held = Some(target);
    }
    figures
}

/// Wait until every send has its answer and deliveries have stopped arriving for a second.
async fn drain(live: &Live) {
    let deadline = Instant::now() + DRAIN_TIMEOUT;
    let mut last = live.delivered.load(Ordering::Relaxed);
    let mut quiet_since = Instant::now();
    while Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let delivered = live.delivered.load(Ordering::Relaxed);
        if delivered != last {
            last = delivered;
            quiet_since = Instant::now();
        }
        let answered =
            live.acked.load(Ordering::Relaxed) + live.send_errors.load(Ordering::Relaxed);
        if answered >= live.sent.load(Ordering::Relaxed)
            && quiet_since.elapsed() >= Duration::from_secs(1)
        {
            return;
        }
    }
}

fn ledger_input(
    plan: &Plan,
    members: &[Vec<usize>],
    conversations: &[ConversationId],
    outcomes: &[ConnOutcome],
) -> LedgerInput {
    let index: HashMap<ConversationId, ConvIndex> = conversations
        .iter()
        .enumerate()
        .map(|(i, id)| (*id, i as ConvIndex))
        .collect();
    let mut acked = vec![Vec::new(); plan.conversations.len()];
    for outcome in outcomes {
        for (conversation, seq) in &outcome.acks {
            if let Some(&i) = index.get(conversation) {
                acked[i as usize].push(*seq);
            }
        }
    }
    LedgerInput {
        members: members.to_vec(),
        deliveries: outcomes
            .iter()
            .map(|o| {
                o.deliveries
                    .iter()
                    .filter_map(|(conversation, seq, prev)| {
                        index.get(conversation).map(|&c| Delivery {
                            conversation: c,
                            seq: *seq,
                            prev: *prev,
                        })
                    })
                    .collect()
            })
            .collect(),
        closed: outcomes.iter().map(|o| o.closed).collect(),
        acked,
        unacknowledged: outcomes
            .iter()
            .map(|o| o.sent.saturating_sub(o.acks.len() as u64))
            .sum(),
    }
}

fn write_outputs(dir: &Path, report: &Report) -> Result<(), LoadtestError> {
    let json = serde_json::to_string_pretty(report).expect("a report always serializes");
    let path = dir.join("report.json");
    std::fs::write(&path, json)
        .map_err(LoadtestError::io(format!("writing {}", path.display())))?;
    chart::draw(
        &dir.join("report.svg"),
        &format!(
            "{}, {}",
            report.scenario.name, report.environment.durability
        ),
        &report.timeline,
    )
}

async fn sample_every_second(
    live: Arc<Live>,
    recorded: Arc<Mutex<Recorded>>,
    mut sampler: Sampler,
    phase: Arc<Mutex<&'static str>>,
    progress: Progress,
) {
    let mut ticks = tokio::time::interval(Duration::from_secs(1));
    ticks.tick().await;
    let mut before = live.counters();
    loop {
        ticks.tick().await;
        let now = live.counters();
        let window = live.take_interval();
        let point = TimelinePoint {
            t_secs: secs_since(&live, Instant::now()),
            counts: now.since(before),
            ack: window.ack.summary(),
            delivery: window.delivery.summary(),
            processes: sampler.sample(),
        };
        before = now;
        let measured = live.measured();
        progress.update(format!(
            "{:>5.0}s {:<11} conns {:>6} | sent {:>6}/s acked {:>6}/s delivered {:>7}/s | p99 ack {:>7.1} ms, delivery {:>7.1} ms | errors {}",
            point.t_secs,
            *phase.lock().unwrap(),
            live.connected.load(Ordering::Relaxed),
            point.counts.sent,
            point.counts.acked,
            point.counts.delivered,
            measured.ack.summary().p99_ms,
            measured.delivery.summary().p99_ms,
            now.errors
        ));
        let mut r = recorded.lock().unwrap();
        r.timeline.push(point);
        r.windows.push(window);
    }
}

/// The live progress line: a spinner on a terminal, a plain line every five seconds
/// otherwise (CI logs, pipes).
#[derive(Clone)]
struct Progress {
    bar: Option<ProgressBar>,
    plain: bool,
    lines: Arc<std::sync::atomic::AtomicU64>,
}

impl Progress {
    fn new(enabled: bool) -> Progress {
        let terminal = std::io::stderr().is_terminal();
        let bar = (enabled && terminal).then(|| {
            let bar = ProgressBar::new_spinner();
            bar.set_style(ProgressStyle::with_template("{spinner} {msg}").expect("valid template"));
            bar.enable_steady_tick(Duration::from_millis(200));
            bar
        });
        Progress {
            bar,
            plain: enabled && !terminal,
            lines: Arc::default(),
        }
    }

    fn update(&self, line: String) {
        if let Some(bar) = &self.bar {
            bar.set_message(line);
        } else if self.plain && self.lines.fetch_add(1, Ordering::Relaxed).is_multiple_of(5) {
            eprintln!("{line}");
        }
    }

    fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

fn gateway_rss(processes: &[(String, u32)]) -> Option<u64> {
    let gateways: Vec<(String, u32)> = processes
        .iter()
        .filter(|(name, _)| name.starts_with("gateway"))
        .cloned()
        .collect();
    if gateways.is_empty() {
        return None;
    }
    let mut sampler = Sampler::new(&gateways).ok()?;
    Some(sampler.sample().iter().map(|s| s.rss_bytes).sum())
}

async fn wait_for(budget: Duration, mut done: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + budget;
    while !done() {
        if Instant::now() > deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    true
}

fn secs_since(live: &Live, at: Instant) -> f64 {
    at.saturating_duration_since(live.origin).as_secs_f64()
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}
