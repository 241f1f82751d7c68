//! `parley-loadtest`: flags in, report out. The work is in the library.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Parser, Subcommand, ValueEnum};
use parley_loadtest::run::{self, RunOptions, Target};
use parley_loadtest::scenario::Fault;
use parley_loadtest::{Durability, Overrides, Scenario, report};
use parley_services::config::Secret;

#[derive(Parser)]
#[command(
    name = "parley-loadtest",
    version,
    about = "Open-loop load test for Parley with a correctness ledger and baselines",
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Subcommand)]
enum Command {
    /// Run a scenario (the default).
    Run(Box<RunArgs>),
    /// Measure the baselines only: raw JetStream async publish and a WebSocket echo.
    Baseline {
        /// NATS to publish to; without it a nats-server is started here.
        #[arg(long)]
        nats_url: Option<String>,
        #[arg(long, value_enum, default_value = "always")]
        durability: DurabilityArg,
        #[arg(long, default_value_t = 128)]
        message_bytes: usize,
    },
}

#[derive(Args, Clone)]
struct RunArgs {
    /// Scenario file (TOML), e.g. loadtest/scenarios/dm-steady.toml.
    #[arg(long, short)]
    scenario: Option<PathBuf>,
    /// Start nats-server, redis-server and the `parley` roles here, stopped when done.
    #[arg(long)]
    spawn: bool,
    /// The `parley` binary for --spawn (default: next to this program).
    #[arg(long)]
    parley_bin: Option<PathBuf>,
    /// Gateway WebSocket URL (repeat for several); clients are spread across them.
    #[arg(long = "gateway", conflicts_with = "spawn")]
    gateways: Vec<String>,
    /// HS256 secret the gateways verify tokens with (without --spawn).
    #[arg(long, env = "PARLEY_AUTH__SECRET", hide_env_values = true)]
    secret: Option<String>,
    /// NATS of the external platform: for the JetStream baseline, the ledger's log read and
    /// the projection lag.
    #[arg(long, conflicts_with = "spawn")]
    nats_url: Option<String>,
    /// Measure the baselines too and print ratios.
    #[arg(long)]
    baselines: bool,
    /// Where reports go (a new directory per run).
    #[arg(long, default_value = "loadtest-results")]
    out: PathBuf,
    /// No live progress line.
    #[arg(long)]
    quiet: bool,
    #[arg(long)]
    users: Option<usize>,
    #[arg(long)]
    connect_rate: Option<f64>,
    #[arg(long)]
    duration_secs: Option<f64>,
    #[arg(long)]
    warmup_secs: Option<f64>,
    /// Messages per second across the system (replaces the file's [rate] or [ramp]).
    #[arg(long)]
    rate: Option<f64>,
    #[arg(long)]
    message_bytes: Option<usize>,
    #[arg(long, value_enum)]
    durability: Option<DurabilityArg>,
    /// Gateways to start with --spawn.
    #[arg(long)]
    gateways_to_spawn: Option<usize>,
    /// With --spawn: kill ROLE (handler, projector, gateway[-<i>], nats, redis) with SIGKILL
    /// SECS after sending starts and restart it DOWN_SECS (default 2) later; repeatable.
    #[arg(long = "fault", value_name = "ROLE@SECS[:DOWN_SECS]")]
    faults: Vec<Fault>,
    /// With --spawn: start N nats-server nodes as one cluster, with the log and the intake
    /// replicated on every node (3 for R3).
    #[arg(long, value_name = "N", requires = "spawn")]
    nats_cluster: Option<usize>,
    /// Whether the clients ask for packed frames (replaces the file's `pack`).
    #[arg(long, value_name = "BOOL")]
    pack: Option<bool>,
}

#[derive(Clone, Copy, ValueEnum)]
enum DurabilityArg {
    Always,
    Lazy,
}

impl From<DurabilityArg> for Durability {
    fn from(d: DurabilityArg) -> Durability {
        match d {
            DurabilityArg::Always => Durability::Always,
            DurabilityArg::Lazy => Durability::Lazy,
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: starting the runtime: {e}");
            return ExitCode::from(2);
        }
    };
    let result = runtime.block_on(async {
        tokio::select! {
            result = dispatch(cli) => result,
            // Dropping the run stops everything it started.
            _ = tokio::signal::ctrl_c() => Err(anyhow::anyhow!("interrupted")),
        }
    });
    // Connection tasks still running after an interrupt must not hold up the exit.
    runtime.shutdown_background();
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}

async fn dispatch(cli: Cli) -> anyhow::Result<ExitCode> {
    match cli.command {
        Some(Command::Baseline {
            nats_url,
            durability,
            message_bytes,
        }) => {
            let (baselines, durability) =
                run::baselines(nats_url, durability.into(), message_bytes).await?;
            println!("Durability: {durability}");
            for t in [
                &baselines.jetstream,
                &baselines.jetstream_consume,
                &baselines.websocket_echo,
            ]
            .into_iter()
            .flatten()
            {
                let latency = if t.latency.count == 0 {
                    String::new()
                } else {
                    format!(
                        "; latency ms p50 {:.2} p90 {:.2} p99 {:.2} p99.9 {:.2} max {:.2}",
                        t.latency.p50_ms,
                        t.latency.p90_ms,
                        t.latency.p99_ms,
                        t.latency.p999_ms,
                        t.latency.max_ms
                    )
                };
                println!("{}: {:.0}/s{latency}", t.what, t.per_sec);
            }
            Ok(ExitCode::SUCCESS)
        }
        Some(Command::Run(args)) => run_scenario(*args).await,
        None => run_scenario(cli.run).await,
    }
}

async fn run_scenario(args: RunArgs) -> anyhow::Result<ExitCode> {
    let path = args
        .scenario
        .context("--scenario <file> is required (see loadtest/scenarios/)")?;
    let scenario = Scenario::load(&path)?.with_overrides(&Overrides {
        users: args.users,
        connect_rate: args.connect_rate,
        duration_secs: args.duration_secs,
        warmup_secs: args.warmup_secs,
        rate: args.rate,
        message_bytes: args.message_bytes,
        durability: args.durability.map(Into::into),
        gateways: args.gateways_to_spawn,
        nats_nodes: args.nats_cluster,
        baselines: args.baselines,
        pack: args.pack,
        faults: args.faults,
    })?;
    let target = if args.spawn {
        Target::Spawn {
            parley: args.parley_bin,
        }
    } else {
        if args.gateways.is_empty() {
            anyhow::bail!("give --spawn, or --gateway <ws://host:port/ws> with --secret");
        }
        Target::External {
            gateways: args.gateways,
            secret: Secret::new(
                args.secret
                    .context("--secret (or PARLEY_AUTH__SECRET) is required without --spawn")?,
            ),
            nats_url: args.nats_url,
        }
    };
    let outcome = run::run(RunOptions {
        scenario,
        target,
        out_dir: args.out,
        progress: !args.quiet,
        command: std::env::args().collect::<Vec<_>>().join(" "),
    })
    .await?;
    println!("{}", report::render_table(&outcome.report));
    println!(
        "Report: {}  Picture: {}",
        outcome.dir.join("report.json").display(),
        outcome.dir.join("report.svg").display()
    );
    Ok(if outcome.report.passed {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}
