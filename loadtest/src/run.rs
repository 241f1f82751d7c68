//! One run: start or reach the platform, measure baselines, connect, set up conversations,
//! send on the schedule (killing and restarting processes as the fault plan says), drain,
//! read the log back, check the ledger and write the report.

use std::collections::HashMap;
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};
use parley_events::{ConversationId, UserId};
use parley_projections::presence::{PresenceError, PresenceStore};
use parley_services::auth;
use parley_services::config::Secret;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::baseline::{self, Baselines};
use crate::client::{self, ConnOutcome, Control, Create, Disconnect, SendSlot};
use crate::ledger::{
    self, Answer, ConnRecord, ConvIndex, LedgerInput, LogRead, Observed, SendKey, SendRecord,
};
use crate::live::{Live, TimelinePoint, Window};
use crate::log::LogReader;
use crate::plan::{ConvKind, Plan};
use crate::platform::{SpawnOptions, SpawnedPlatform};
use crate::presence;
use crate::replay;
use crate::report::{self, Report};
use crate::resources::{Machine, Sampler};
use crate::scenario::{Durability, Fault, FaultRole, Reconnects, Scenario};
use crate::{LoadtestError, chart, unix_secs};

/// How long the drain waits for outstanding acks and deliveries.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
/// How long baselines run, each.
pub const BASELINE_TIME: Duration = Duration::from_secs(5);
/// Creates in flight during set-up.
const SETUP_CONCURRENCY: usize = 256;
/// How long the log check waits for the intake to empty: a command held by a killed handler
/// is redelivered after the intake's ack wait (30 s by default).
const INTAKE_WAIT: Duration = Duration::from_secs(45);
/// The gateways' presence TTL when Redis is to be flushed: heartbeats every 2 s.
const PRESENCE_TTL_UNDER_FAULT: u32 = 6;
/// How long presence may take to come back after Redis restarted.
const PRESENCE_WAIT: Duration = Duration::from_secs(30);
/// How long a role may take to notice that a server it depends on went away before its
/// readiness is held to say so: a client sees a dropped connection within milliseconds.
const DISCONNECT_GRACE: Duration = Duration::from_millis(250);
/// Longest the per-second sample waits for the log and the projector's consumer to answer;
/// a sample they miss records no projection.
const PROJECTION_PROBE: Duration = Duration::from_millis(250);
/// How often readiness is sampled around a fault, and how long one `/readyz` may take.
const READYZ_POLL: Duration = Duration::from_millis(100);
const READYZ_TIMEOUT: Duration = Duration::from_secs(1);
/// How long every role has to say it is ready again after a server came back.
const READY_AGAIN_WAIT: Duration = Duration::from_secs(30);

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
    let cuts = scenario.reconnects.cuts_abruptly();
    raise_file_limit(scenario.connections(), cuts)?;

    let tag = &uuid::Uuid::new_v4().simple().to_string()[..4];
    let gateway_count = match &options.target {
        Target::Spawn { .. } => scenario.gateways,
        Target::External { gateways, .. } => gateways.len(),
    };
    let plan = Plan::build(&scenario, tag, gateway_count);
    if !scenario.faults.is_empty() && !matches!(options.target, Target::Spawn { .. }) {
        return Err(LoadtestError::Fault(
            "a fault plan needs --spawn: the harness kills and restarts the processes it started"
                .into(),
        ));
    }
    if scenario.replay.is_some() && !matches!(options.target, Target::Spawn { .. }) {
        return Err(LoadtestError::Fault(
            "[replay] needs --spawn: the harness rebuilds and switches the platform it started"
                .into(),
        ));
    }
    let killed = |role: FaultRole| scenario.faults.iter().any(|f| f.role == role);
    let handlers = scenario.handler_count();

    // Measured on a nats-server of their own before the platform starts, so the platform's
    // idle work does not move them. A cluster's baselines need the cluster: they are
    // measured on it, beside the platform, below.
    let separate_baselines = scenario.baselines
        && scenario.nats_nodes == 1
        && matches!(options.target, Target::Spawn { .. });
    let mut baselines = if separate_baselines {
        if options.progress {
            eprintln!(
                "measuring the baselines ({} s each) on a separate nats-server ...",
                BASELINE_TIME.as_secs()
            );
        }
        Some(
            baselines(None, scenario.durability, scenario.message_bytes)
                .await?
                .0,
        )
    } else {
        None
    };

    let (platform, gateways, secret, nats_url, platform_text) = match &options.target {
        Target::Spawn { parley } => {
            if options.progress {
                eprintln!("starting nats-server, redis-server and the parley roles ...");
            }
            let spawned = SpawnedPlatform::start(&SpawnOptions {
                parley: parley.clone(),
                gateways: scenario.gateways,
                durability: scenario.durability,
                nats_nodes: scenario.nats_nodes,
                log_dir: dir.join("logs"),
                handlers,
                projectors: scenario.projectors,
                store: scenario.store,
                presence_ttl_secs: killed(FaultRole::Redis).then_some(PRESENCE_TTL_UNDER_FAULT),
            })
            .await?;
            let text = format!(
                "spawned on this machine: {} gateway(s), {handlers} handler(s), {} projector(s), {}, {}, redis",
                scenario.gateways,
                scenario.projectors,
                scenario.store.describe(),
                spawned.nats_text()
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
        } => (
            None,
            gateways.clone(),
            secret.clone(),
            nats_url.clone(),
            format!("external: {} gateway(s)", gateways.len()),
        ),
    };
    let durability = match &platform {
        Some(p) => p.durability_text(),
        None => "external platform: its NATS server's own setting (not verified)".to_owned(),
    };
    let mut processes = platform.as_ref().map(|p| p.processes()).unwrap_or_default();
    // Shared with the fault plan while the run goes on.
    let platform = platform.map(|p| Arc::new(Mutex::new(p)));

    if scenario.baselines && !separate_baselines {
        if options.progress {
            eprintln!(
                "measuring the baselines ({} s each) beside the idle platform ...",
                BASELINE_TIME.as_secs()
            );
        }
        let mut measured = measure_baselines(nats_url.as_deref(), scenario.message_bytes).await?;
        measured.how =
            "on the platform's own NATS server, beside the idle platform, before the clients connected"
                .to_owned();
        baselines = Some(measured);
    }

    processes.push(("harness".to_owned(), std::process::id()));
    let live = Arc::new(Live::new(Instant::now()));
    let recorded = Arc::new(Mutex::new(Recorded::default()));
    let phase = Arc::new(Mutex::new("connecting"));
    let progress = Progress::new(options.progress);
    // One connection to the log: sampled each second for the projection's lag, and read
    // back after the run for the ledger.
    let unreadable = |e: LoadtestError| {
        eprintln!("note: the log cannot be read, so unacknowledged sends stay unclassified: {e}");
    };
    let log_reader = match &nats_url {
        Some(url) => match LogReader::connect(url).await {
            Ok(reader) => Some(Arc::new(reader)),
            Err(e) => {
                unreadable(e);
                None
            }
        },
        None => None,
    };
    let sampler = tokio::spawn(sample_every_second(
        Arc::clone(&live),
        Arc::clone(&recorded),
        Sampler::new(&processes)?,
        log_reader.clone(),
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
    let backoff = client::Backoff {
        base: Duration::from_millis(scenario.reconnects.backoff_base_ms),
        cap: Duration::from_millis(scenario.reconnects.backoff_cap_ms),
    };
    let mut controls = Vec::with_capacity(plan.connections.len());
    let mut disconnects = Vec::with_capacity(plan.connections.len());
    let mut tasks = Vec::with_capacity(plan.connections.len());
    for (i, conn) in plan.connections.iter().enumerate() {
        let (tx, rx) = mpsc::channel(16);
        controls.push(tx);
        let (disconnect_tx, disconnect_rx) = mpsc::channel(1);
        disconnects.push(disconnect_tx);
        let urls: Arc<[String]> = gateways
            .iter()
            .map(|gateway| {
                format!(
                    "{gateway}?protocol=2&pack={}&access_token={}",
                    u8::from(scenario.pack),
                    tokens[conn.user]
                )
            })
            .collect();
        let device = client::Device {
            live: Arc::clone(&live),
            urls,
            first: conn.gateway,
            connect_at: live.origin + Duration::from_secs_f64(i as f64 / scenario.connect_rate),
            backoff,
            cuts,
        };
        tasks.push(tokio::spawn(client::run(
            device,
            rx,
            created_tx.clone(),
            disconnect_rx,
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

    // The log is read back from here after the run.
    let log_start = match log_reader {
        Some(reader) => match reader.last_sequence().await {
            Ok(last) => Some((reader, last)),
            Err(e) => {
                unreadable(e);
                None
            }
        },
        None => None,
    };
    *phase.lock().unwrap() = "setting up";
    let (conversations, joined) = set_up(&plan, &controls, &mut created_rx).await?;
    let members = plan.member_joins(scenario.connections_per_user, &joined);
    let expected_joins: u64 = members.iter().map(|m| m.len() as u64).sum();
    let all_seen = wait_for(Duration::from_secs(30), || {
        live.joined_seen.load(Ordering::Relaxed) >= expected_joins
    })
    .await;
    if !all_seen {
        return Err(LoadtestError::Setup(format!(
            "{} of {expected_joins} member connections received the event that made them members within 30 s",
            live.joined_seen.load(Ordering::Relaxed)
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
    // Connections that only receive: an outage drops them.
    let silent: Vec<usize> = (0..plan.connections.len())
        .filter(|conn| !slots_by_conn.contains_key(conn))
        .collect();
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
    let faults: Vec<_> = match &platform {
        Some(platform) => scenario
            .faults
            .iter()
            .map(|&fault| {
                tokio::spawn(inject(
                    Arc::clone(platform),
                    fault,
                    sending_start,
                    Arc::clone(&live),
                    plan.users[0].clone(),
                ))
            })
            .collect(),
        None => Vec::new(),
    };
    let replay_task = match (&platform, scenario.replay) {
        (Some(platform), Some(plan)) => Some(tokio::spawn(replay::rebuild_and_switch(
            Arc::clone(platform),
            plan,
            sending_start,
            dir.clone(),
        ))),
        _ => None,
    };
    let churn = tokio::spawn(churn(
        scenario.reconnects.clone(),
        disconnects.clone(),
        silent,
        sending_start,
        sending_end,
    ));
    let presence_probe = scenario.presence.clone().map(|probe| {
        let (gateways, secret, tag) = (gateways.clone(), secret.clone(), tag.to_owned());
        tokio::spawn(async move { presence::run(&probe, &gateways, &secret, &tag).await })
    });
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
    churn.abort();

    *phase.lock().unwrap() = "draining";
    drain(&live).await;
    let presence = match presence_probe {
        Some(probe) => Some(
            probe
                .await
                .map_err(|e| LoadtestError::Setup(format!("the presence probe failed: {e}")))?,
        ),
        None => None,
    };
    let mut fault_records = Vec::with_capacity(faults.len());
    for fault in faults {
        fault_records.push(
            fault
                .await
                .map_err(|e| LoadtestError::Fault(format!("a fault task failed: {e}")))?,
        );
    }
    let replay = match (replay_task, &platform) {
        (Some(task), Some(platform)) => {
            let mut figures = task
                .await
                .map_err(|e| LoadtestError::Fault(format!("the replay task failed: {e}")))?;
            match plan.slots.first() {
                Some(slot) => {
                    let old_store = platform.lock().unwrap().sqlite_store();
                    let user = plan.connections[slot.connection].user;
                    replay::check_reads(
                        &mut figures,
                        &old_store,
                        &gateways[0],
                        &tokens[user],
                        conversations[slot.conversation as usize],
                    )
                    .await;
                }
                None => {
                    figures
                        .error
                        .get_or_insert("no conversation to read history from".to_owned());
                }
            }
            Some(figures)
        }
        _ => None,
    };
    // Clients stay connected while the log is read: what is appended late must still reach
    // them.
    let log = match log_start {
        Some((reader, after)) => {
            *phase.lock().unwrap() = "reading the log";
            match read_log(&reader, after, &conversations, &live).await {
                Ok(log) => Some(log),
                Err(e) => {
                    live.record_error("harness:log_unreadable");
                    eprintln!("note: {e}");
                    None
                }
            }
        }
        None => None,
    };
    finish.cancel();
    drop(controls);
    drop(disconnects);
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

    let ledger = ledger::check(&ledger_input(&members, &conversations, &outcomes, log));
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
    let throughput = report::Rates {
        offered_per_sec: match plan.phases.as_slice() {
            [steady] => Some(steady.rate),
            _ => None,
        },
        ..report::rates(measured)
    };
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
    let sent = outcomes.iter().map(|o| o.sent.len() as u64).sum();
    let mut acks_us: Vec<u64> = outcomes
        .iter()
        .flat_map(|o| o.acks.iter().map(|a| a.at_us))
        .collect();
    acks_us.sort_unstable();
    let faults = report::fault_figures(
        &fault_records,
        &acks_us,
        live.micros_since_origin(sending_end),
    );
    let resume = resume_figures(&live, &ledger, &outcomes, baselines.as_ref());
    let sessions_by_connection: Vec<Vec<(usize, u64)>> = outcomes
        .iter()
        .map(|o| {
            o.gateways
                .iter()
                .zip(&o.sessions)
                .map(|(&gateway, session)| (gateway, client::messages_in(session)))
                .collect()
        })
        .collect();
    let gateways = report::gateway_figures(
        gateway_count,
        sessions_by_connection.iter().map(Vec::as_slice),
    );
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
            reconnects: live.reconnects.load(Ordering::Relaxed),
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
        projection: report::projection_figures(measured),
        gateways,
        ramp,
        faults,
        resume,
        presence,
        replay,
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
        Some(url) => {
            let mut measured = measure_baselines(Some(&url), message_bytes).await?;
            measured.how = "on the given NATS server".to_owned();
            Ok((
                measured,
                "external NATS: its own setting (not verified)".to_owned(),
            ))
        }
        None => {
            let nats = parley_localstack::NatsServer::start(parley_localstack::NatsOptions {
                sync_always: durability == Durability::Always,
                ..Default::default()
            })?;
            let mut measured = measure_baselines(Some(&nats.url()), message_bytes).await?;
            measured.how = format!(
                "on a separate nats-server ({}) with nothing else running on it",
                durability.describe()
            );
            Ok((measured, durability.describe().to_owned()))
        }
    }
}

async fn measure_baselines(
    nats_url: Option<&str>,
    message_bytes: usize,
) -> Result<Baselines, LoadtestError> {
    let (jetstream, jetstream_consume) = match nats_url {
        Some(url) => {
            let (published, consumed) =
                baseline::jetstream(url, message_bytes, BASELINE_TIME).await?;
            (Some(published), Some(consumed))
        }
        None => {
            eprintln!("note: no NATS URL (--nats-url), so no JetStream baseline");
            (None, None)
        }
    };
    let websocket_echo = Some(baseline::websocket_echo(message_bytes, BASELINE_TIME).await?);
    Ok(Baselines {
        jetstream,
        jetstream_consume,
        websocket_echo,
        how: String::new(),
    })
}

fn raise_file_limit(connections: usize, cuts: bool) -> Result<(), LoadtestError> {
    // Each connection takes a descriptor here (two when the run cuts sockets: a second
    // handle to cut it with) and one in a spawned gateway, which inherits this limit; the
    // rest is room for NATS, logs and the runtime.
    let per_connection = if cuts { 2 } else { 1 };
    let needed_fds = per_connection * connections as u64 + 1024;
    let (_, hard) = rlimit::getrlimit(rlimit::Resource::NOFILE)
        .map_err(LoadtestError::io("reading the open-file limit"))?;
    if hard < needed_fds {
        // Allowed to a privileged process only; otherwise the check below says what to do.
        let _ = rlimit::setrlimit(rlimit::Resource::NOFILE, needed_fds, needed_fds);
    }
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

/// Create every conversation of the plan, a group larger than [`crate::plan::SETUP_BATCH`] members
/// then filled by additions; the conversations' ids and, per conversation, the sequence of
/// each of its set-up events (see [`Plan::member_joins`]).
async fn set_up(
    plan: &Plan,
    controls: &[mpsc::Sender<Control>],
    created: &mut mpsc::UnboundedReceiver<client::Created>,
) -> Result<(Vec<ConversationId>, Vec<Vec<u64>>), LoadtestError> {
    let per_user = plan.connections.len() / plan.users.len().max(1);
    let users = |members: &[usize]| -> Vec<UserId> {
        members.iter().map(|&u| plan.users[u].clone()).collect()
    };
    let mut ids: Vec<Option<ConversationId>> = vec![None; plan.conversations.len()];
    let mut joined: Vec<Vec<u64>> = plan
        .conversations
        .iter()
        .map(|conv| vec![0; conv.batches().len()])
        .collect();
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
                    members: users(&conv.batches()[0][1..]),
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
        let index = reply.conversation_index;
        let (id, seq) = reply.result.map_err(|code| {
            LoadtestError::Setup(format!(
                "setting up conversation {index} (request {}) was refused: {code}",
                reply.batch
            ))
        })?;
        joined[index][reply.batch as usize] = seq;
        if reply.batch > 0 {
            continue;
        }
        ids[index] = Some(id);
        // The additions go out together from the creator's connection; the handlers append
        // them in order, as one conversation's commands.
        let conv = &plan.conversations[index];
        for (batch, members) in conv.batches().iter().enumerate().skip(1) {
            controls[conv.members[0] * per_user]
                .send(Control::Add {
                    conversation_index: index,
                    batch: batch as u32,
                    conversation: id,
                    users: users(members),
                })
                .await
                .map_err(|_| LoadtestError::Setup("a creator's connection is closed".into()))?;
            outstanding += 1;
        }
    }
    let ids = ids
        .into_iter()
        .map(|id| id.expect("every create answered"))
        .collect();
    Ok((ids, joined))
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

/// Drop sockets while sending: random connections at `drops_per_sec` (Poisson arrivals),
/// and, for an outage, every silent connection at once.
async fn churn(
    reconnects: Reconnects,
    disconnects: Vec<mpsc::Sender<Disconnect>>,
    silent: Vec<usize>,
    sending_start: Instant,
    sending_end: Instant,
) {
    let outage = reconnects.outage.map(|outage| async move {
        tokio::time::sleep_until((sending_start + Duration::from_secs_f64(outage.at_secs)).into())
            .await;
        outage
    });
    let outage = async {
        if let Some(outage) = outage {
            let outage = outage.await;
            for &conn in &silent {
                let _ = disconnects[conn].try_send(Disconnect {
                    clean: false,
                    down: Duration::from_secs_f64(outage.down_secs),
                });
            }
        }
    };
    let random = async {
        if reconnects.drops_per_sec <= 0.0 || disconnects.is_empty() {
            return;
        }
        tokio::time::sleep_until(sending_start.into()).await;
        loop {
            // Exponential gaps between drops: a Poisson process.
            let gap = -(1.0 - fastrand::f64()).ln() / reconnects.drops_per_sec;
            tokio::time::sleep(Duration::from_secs_f64(gap)).await;
            if Instant::now() >= sending_end {
                return;
            }
            let _ = disconnects[fastrand::usize(..disconnects.len())].try_send(Disconnect {
                clean: fastrand::f64() < reconnects.clean_ratio,
                down: Duration::ZERO,
            });
        }
    };
    tokio::join!(outage, random);
}

fn resume_figures(
    live: &Live,
    ledger: &ledger::LedgerReport,
    outcomes: &[ConnOutcome],
    baselines: Option<&Baselines>,
) -> report::ResumeFigures {
    let connected = live.connected.load(Ordering::Relaxed);
    let outage: Vec<(u64, u64, u64)> = outcomes
        .iter()
        .flat_map(|o| &o.resumes)
        .filter(|r| r.after_outage)
        .map(|r| (r.start_us, r.end_us, r.events))
        .collect();
    let consume = baselines
        .and_then(|b| b.jetstream_consume.as_ref())
        .map(|c| c.per_sec);
    report::ResumeFigures {
        drops_clean: live.drops_clean.load(Ordering::Relaxed),
        drops_abrupt: live.drops_abrupt.load(Ordering::Relaxed),
        reconnected_connections: ledger.reconnected_connections,
        reconnected_fraction: if connected > 0 {
            ledger.reconnected_connections as f64 / connected as f64
        } else {
            0.0
        },
        resume_frames: live.resume_frames.load(Ordering::Relaxed),
        more_rounds: live.more_rounds.load(Ordering::Relaxed),
        resumed_events: live.resumed_events.load(Ordering::Relaxed),
        outage: report::OutageFigures::of(&outage, consume),
    }
}

/// Wait until every device that lost its socket is back and resumed, every send has its
/// answer, and deliveries have stopped arriving for a second.
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
        let answered = live.acked.load(Ordering::Relaxed)
            + live.send_errors.load(Ordering::Relaxed)
            + live.abandoned.load(Ordering::Relaxed);
        if answered >= live.sent.load(Ordering::Relaxed)
            && live.down.load(Ordering::Relaxed) == 0
            && quiet_since.elapsed() >= Duration::from_secs(1)
        {
            return;
        }
    }
}

fn ledger_input(
    members: &[Vec<ledger::Joined>],
    conversations: &[ConversationId],
    outcomes: &[ConnOutcome],
    log: Option<LogRead>,
) -> LedgerInput {
    let index = conversation_index(conversations);
    let conv = |id: &ConversationId| index.get(id).copied();
    let mut sends = Vec::new();
    for outcome in outcomes {
        let mut answers: HashMap<SendKey, Answer> = HashMap::new();
        for (key, code) in &outcome.errors {
            answers.insert(*key, Answer::Error(code.clone()));
        }
        // An ack wins over an error for the same send.
        for ack in &outcome.acks {
            answers.insert(ack.key, Answer::Acked { seq: ack.seq });
        }
        for (key, conversation) in &outcome.sent {
            let Some(conversation) = conv(conversation) else {
                continue;
            };
            sends.push(SendRecord {
                key: *key,
                conversation,
                answer: answers.remove(key).unwrap_or(Answer::None),
            });
        }
    }
    LedgerInput {
        members: members.to_vec(),
        connections: outcomes
            .iter()
            .map(|o| ConnRecord {
                sessions: o
                    .sessions
                    .iter()
                    .map(|session| {
                        session
                            .iter()
                            .map(|r| Observed {
                                conversation: conv(&r.conversation),
                                seq: r.seq,
                                prev: r.prev,
                                content: r.content,
                                resumed: r.resumed,
                            })
                            .collect()
                    })
                    .collect(),
                closed: o.closed,
            })
            .collect(),
        sends,
        log,
    }
}

fn conversation_index(conversations: &[ConversationId]) -> HashMap<ConversationId, ConvIndex> {
    conversations
        .iter()
        .enumerate()
        .map(|(i, id)| (*id, i as ConvIndex))
        .collect()
}

/// The run's events, once the intake is empty (or [`INTAKE_WAIT`] has passed) and
/// deliveries have gone quiet again.
async fn read_log(
    reader: &LogReader,
    after: u64,
    conversations: &[ConversationId],
    live: &Live,
) -> Result<LogRead, LoadtestError> {
    let pending = reader.wait_for_empty_intake(INTAKE_WAIT).await?;
    drain(live).await;
    reader
        .read(after, &conversation_index(conversations), pending)
        .await
}

/// Apply one fault: kill the process at its time, start it again after its down time, and
/// for Redis (flushed first) wait until heartbeats have rebuilt one user's presence. For a
/// server the roles depend on (NATS: all of them; Redis: the projector, for presence), watch
/// their readiness: which said ready while it was down, and when all were ready again.
async fn inject(
    platform: Arc<Mutex<SpawnedPlatform>>,
    fault: Fault,
    sending_start: Instant,
    live: Arc<Live>,
    watched: UserId,
) -> report::FaultRecord {
    tokio::time::sleep_until((sending_start + Duration::from_secs_f64(fault.at_secs)).into()).await;
    let mut record = report::FaultRecord {
        fault,
        killed_us: live.now_us(),
        restarted_us: None,
        presence_back_us: None,
        ready_while_down: Vec::new(),
        all_ready_us: None,
        error: None,
    };
    let (redis_url, roles) = {
        let platform = platform.lock().unwrap();
        (platform.redis_url(), platform.admin_addresses())
    };
    let dependents: Option<Vec<(String, String)>> = match fault.role {
        FaultRole::Nats => Some(roles.clone()),
        FaultRole::Redis => Some(
            roles
                .iter()
                .filter(|(name, _)| name == "projector")
                .cloned()
                .collect(),
        ),
        _ => None,
    };
    let result = async {
        if fault.role == FaultRole::Redis {
            flush_redis(&redis_url).await?;
        }
        record.killed_us = live.now_us();
        if fault.removed {
            return on_platform(&platform, move |p| p.remove(fault.role)).await;
        }
        on_platform(&platform, move |p| p.kill(fault.role)).await?;
        let down = Duration::from_secs_f64(fault.down_secs);
        let watching = dependents
            .clone()
            .map(|roles| tokio::spawn(ready_while_down(roles, Instant::now() + down)));
        tokio::time::sleep(down).await;
        if let Some(watching) = watching {
            record.ready_while_down = watching.await.unwrap_or_default();
        }
        record.restarted_us = Some(live.now_us());
        on_platform(&platform, move |p| p.restart(fault.role)).await?;
        if dependents.is_some() && all_ready(&roles).await {
            record.all_ready_us = Some(live.now_us());
        }
        if fault.role == FaultRole::Redis {
            presence_back(&redis_url, &watched).await?;
            record.presence_back_us = Some(live.now_us());
        }
        Ok::<_, LoadtestError>(())
    }
    .await;
    if let Err(e) = result {
        eprintln!("fault {}: {e}", fault.role);
        record.error = Some(e.to_string());
    }
    record
}

/// The status of `GET /readyz` at `address`; `None` when it does not answer.
async fn readyz(address: &str) -> Option<u16> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let exchange = async {
        let mut tcp = tokio::net::TcpStream::connect(address).await.ok()?;
        tcp.write_all(b"GET /readyz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            .await
            .ok()?;
        // "HTTP/1.1 200"
        let mut head = [0u8; 12];
        tcp.read_exact(&mut head).await.ok()?;
        std::str::from_utf8(&head[9..]).ok()?.parse().ok()
    };
    tokio::time::timeout(READYZ_TIMEOUT, exchange).await.ok()?
}

/// The roles that answered `/readyz` with 200 at least once between a short grace after the
/// kill (the time a client takes to see its connection drop) and `until`.
async fn ready_while_down(roles: Vec<(String, String)>, until: Instant) -> Vec<String> {
    tokio::time::sleep(DISCONNECT_GRACE).await;
    let mut ready = Vec::new();
    while Instant::now() < until {
        for (name, address) in &roles {
            if !ready.contains(name) && readyz(address).await == Some(200) {
                ready.push(name.clone());
            }
        }
        tokio::time::sleep(READYZ_POLL).await;
    }
    ready
}

/// Wait until every role answers `/readyz` with 200; `false` if they do not within
/// [`READY_AGAIN_WAIT`].
async fn all_ready(roles: &[(String, String)]) -> bool {
    let deadline = Instant::now() + READY_AGAIN_WAIT;
    while Instant::now() < deadline {
        let mut every = true;
        for (_, address) in roles {
            every &= readyz(address).await == Some(200);
        }
        if every {
            return true;
        }
        tokio::time::sleep(READYZ_POLL).await;
    }
    false
}

/// Run `action` on the platform off the runtime: restarting nats-server blocks until it is
/// ready.
async fn on_platform(
    platform: &Arc<Mutex<SpawnedPlatform>>,
    action: impl FnOnce(&mut SpawnedPlatform) -> Result<(), LoadtestError> + Send + 'static,
) -> Result<(), LoadtestError> {
    let platform = Arc::clone(platform);
    tokio::task::spawn_blocking(move || action(&mut platform.lock().unwrap()))
        .await
        .map_err(|e| LoadtestError::Fault(e.to_string()))?
}

async fn flush_redis(url: &str) -> Result<(), LoadtestError> {
    let fail = |e: redis::RedisError| LoadtestError::Fault(format!("FLUSHALL: {e}"));
    let client = redis::Client::open(url).map_err(fail)?;
    let mut conn = client
        .get_multiplexed_async_connection()
        .await
        .map_err(fail)?;
    redis::cmd("FLUSHALL")
        .query_async::<()>(&mut conn)
        .await
        .map_err(fail)
}

/// Wait until `user` shows online again in Redis.
async fn presence_back(url: &str, user: &UserId) -> Result<(), LoadtestError> {
    let fail = |e: PresenceError| LoadtestError::Fault(format!("reading presence: {e}"));
    let store = PresenceStore::connect(&PresenceStore::client(url, None).map_err(fail)?)
        .await
        .map_err(fail)?;
    let deadline = Instant::now() + PRESENCE_WAIT;
    loop {
        let status = store.status(user, parley_services::unix_millis()).await;
        if status.is_ok_and(|s| s.online()) {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(LoadtestError::Fault(format!(
                "{user}'s presence did not come back within {PRESENCE_WAIT:?}"
            )));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
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
    projection: Option<Arc<LogReader>>,
    phase: Arc<Mutex<&'static str>>,
    progress: Progress,
) {
    let mut ticks = tokio::time::interval(Duration::from_secs(1));
    // A busy harness must not fire missed ticks back to back: near-empty intervals would
    // read as seconds in the timeline.
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
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
            projection: match &projection {
                Some(log) => tokio::time::timeout(PROJECTION_PROBE, log.projection())
                    .await
                    .ok()
                    .flatten(),
                None => None,
            },
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
