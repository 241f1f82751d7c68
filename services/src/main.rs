//! `parley`: one binary, one subcommand per way to run it. Logic lives in the library.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::{Parser, Subcommand};
use parley_events::UserId;
use parley_services::config::{Config, ENV_CONFIG_FILE, StoreKind};
use parley_services::local::{LocalPlatform, dev_secret};
use parley_services::log_tools::{self, ConversationCommand, LogCommand};
use parley_services::node::{self, Listeners, Roles};
use parley_services::revocation::{self, Revocation};
use parley_services::{auth, telemetry, unix_millis};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// jemalloc rather than glibc's malloc: after a storm of sockets has come and gone, glibc
/// kept the pages they had used in its per-thread arenas, and jemalloc's background thread
/// gives them back; its thread caches are compiled out (`.cargo/config.toml`), since an idle
/// worker's cache kept what was freed into it (docs/benchmarks.md, "Gateway memory after a
/// connection storm").
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[derive(Parser)]
#[command(
    name = "parley",
    version,
    about = "Event-sourced chat on NATS JetStream"
)]
struct Cli {
    /// Configuration file (TOML). Environment variables PARLEY_<SECTION>__<KEY> override it.
    #[arg(long, global = true, env = ENV_CONFIG_FILE)]
    config: Option<PathBuf>,
    /// Log JSON lines instead of human-readable text.
    #[arg(long, global = true)]
    log_json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Everything on one machine: local nats-server and redis-server unless configured,
    /// and every role in this process.
    Up,
    /// Serve WebSockets.
    Gateway,
    /// Validate commands and append events.
    Handler,
    /// Materialize conversations and presence.
    Projector,
    /// Print a development token for USER, signed with the configured secret (or the
    /// development secret `parley up` created).
    Token {
        user: String,
        /// Validity in seconds.
        #[arg(long, default_value_t = 86_400)]
        ttl_secs: u64,
    },
    /// Revoke a user's tokens issued until now, or one token by its `jti`: gateways refuse
    /// them and close their sockets (1008). Exits 0 once recorded, 1 when NATS cannot be
    /// reached, 2 on bad arguments.
    #[command(group(clap::ArgGroup::new("what").required(true)))]
    Revoke {
        /// The user whose tokens issued until now are revoked; a token issued later works.
        #[arg(long, group = "what")]
        user: Option<String>,
        /// The `jti` of the one token revoked, until it expires.
        #[arg(long, group = "what")]
        token: Option<String>,
    },
    /// Push notifications: list the dead letters, redrive them to the webhook.
    #[command(subcommand)]
    Push(parley_services::push::PushCommand),
    /// Read and write the event log: tail, show, stats, export, import. Exit codes: 0 ok,
    /// 1 NATS unreachable or nothing found, 2 bad arguments or a bad input file.
    #[command(subcommand)]
    Log(LogCommand),
    /// Conversations from the log: `at`, a conversation as it was at a point. Exit codes as
    /// for `log`.
    #[command(subcommand)]
    Conversation(ConversationCommand),
    /// Rebuild a projection into a new target, switch readers and projectors to it, and
    /// compare targets.
    #[command(subcommand)]
    Replay(parley_services::replay::cli::ReplayCommand),
}

/// Longest `parley revoke` waits for NATS.
const REVOKE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let config =
        Config::load(cli.config.as_deref(), std::env::vars()).context("loading configuration")?;
    match cli.command {
        Command::Token { user, ttl_secs } => {
            let user = UserId::parse(user).context("user id")?;
            let secret = match &config.auth.secret {
                Some(secret) => secret.clone(),
                None => dev_secret(&config.local.data_dir.join("dev-secret"))?,
            };
            println!(
                "{}",
                auth::mint(&secret, &user, unix_millis() / 1000, ttl_secs)
            );
            Ok(())
        }
        Command::Revoke { user, token } => {
            let revocation = match (user, token) {
                (Some(user), _) => Revocation::User(UserId::parse(user).context("user id")?),
                (None, Some(jti)) => Revocation::Token(jti),
                (None, None) => unreachable!("clap requires --user or --token"),
            };
            tokio::time::timeout(
                REVOKE_TIMEOUT,
                revocation::record(&config, &revocation, unix_millis() / 1000),
            )
            .await
            .context("NATS did not answer within 10 s")??;
            println!("revoked");
            Ok(())
        }
        Command::Push(command) => {
            exit_with(parley_services::push::dead_letters::run(&config, command).await)
        }
        Command::Log(command) => exit_with(log_tools::run_log(&config, command).await),
        Command::Conversation(command) => {
            exit_with(log_tools::run_conversation(&config, command).await)
        }
        Command::Replay(command) => {
            telemetry::init_command_logging(cli.log_json);
            exit_with(parley_services::replay::cli::run(&config, command).await)
        }
        Command::Up => {
            let _spans = telemetry::init_logging(cli.log_json, &config.traces)?;
            let mut local = LocalPlatform::prepare(config).context("starting local servers")?;
            let listeners = bind(&local.config, true).await?;
            let gateway = listeners
                .gateway
                .as_ref()
                .context("gateway listener")?
                .local_addr()?;
            local.allow_own_origins(gateway);
            let config = Arc::clone(&local.config);
            print_banner(&local, &listeners)?;
            serve(config, Roles::ALL, listeners).await
        }
        role => {
            let _spans = telemetry::init_logging(cli.log_json, &config.traces)?;
            let roles = match role {
                Command::Gateway => Roles::GATEWAY,
                Command::Handler => Roles::HANDLER,
                _ => Roles::PROJECTOR,
            };
            let config = Arc::new(config);
            let listeners = bind(&config, roles.gateway).await?;
            serve(config, roles, listeners).await
        }
    }
}

/// End with a subcommand's exit code: a failure exits at once (its message is printed);
/// success returns, so everything is dropped and flushed as usual.
fn exit_with(code: i32) -> anyhow::Result<()> {
    if code != 0 {
        std::process::exit(code);
    }
    Ok(())
}

async fn bind(config: &Config, gateway: bool) -> anyhow::Result<Listeners> {
    let admin = TcpListener::bind(config.admin.listen)
        .await
        .with_context(|| format!("binding admin.listen {}", config.admin.listen))?;
    let gateway = if gateway {
        Some(
            TcpListener::bind(config.gateway.listen)
                .await
                .with_context(|| format!("binding gateway.listen {}", config.gateway.listen))?,
        )
    } else {
        None
    };
    Ok(Listeners {
        gateway,
        admin: Some(admin),
    })
}

async fn serve(config: Arc<Config>, roles: Roles, listeners: Listeners) -> anyhow::Result<()> {
    let shutdown = CancellationToken::new();
    tokio::spawn(stop_on_signal(shutdown.clone()));
    node::run(config, roles, listeners, shutdown).await?;
    Ok(())
}

async fn stop_on_signal(shutdown: CancellationToken) {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("installing a SIGTERM handler succeeds");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    tracing::info!("shutting down: draining sockets and in-flight commands");
    shutdown.cancel();
}

fn print_banner(local: &LocalPlatform, listeners: &Listeners) -> anyhow::Result<()> {
    let config = &local.config;
    let gateway = listeners
        .gateway
        .as_ref()
        .context("gateway listener")?
        .local_addr()?;
    let admin = listeners
        .admin
        .as_ref()
        .context("admin listener")?
        .local_addr()?;
    let secret = config.auth.secret.as_ref().context("auth secret")?;
    let alice = auth::mint(
        secret,
        &UserId::parse("alice")?,
        unix_millis() / 1000,
        86_400,
    );
    let nats = match &local.nats {
        Some(server) if config.local.fsync_always => format!(
            "{} (local nats-server {}, JetStream fsync on every write)",
            server.url(),
            server.version()
        ),
        Some(server) => format!(
            "{} (local nats-server {}, JetStream default lazy fsync: a machine crash can lose acknowledged sends)",
            server.url(),
            server.version()
        ),
        None => "configured (durability is that deployment's setting)".to_owned(),
    };
    let redis = match &local.redis {
        Some(server) => format!("{} (local redis-server {})", server.url(), server.version()),
        None => "configured".to_owned(),
    };
    let store = &config.projector.store;
    let store = match store.kind {
        StoreKind::Sqlite => format!("{} (embedded SQLite)", store.path.display()),
        StoreKind::Scylla => format!(
            "ScyllaDB keyspace {} at {} ({:?})",
            store.scylla.keyspace,
            store.scylla.contact_points.join(", "),
            store.scylla.consistency
        ),
    };
    let scheme = if config.gateway.tls.enabled {
        "wss"
    } else {
        "ws"
    };
    println!("Parley is up.");
    println!("  WebSocket   {scheme}://{gateway}/ws?access_token=<token>");
    if let Some(dir) = &config.gateway.web_dir {
        let page = if config.gateway.tls.enabled {
            "https"
        } else {
            "http"
        };
        let sign_in = if config.gateway.dev_tokens {
            "sign in with any user name"
        } else {
            "sign in with a token"
        };
        println!(
            "  Web chat    {page}://{gateway}/ ({sign_in}; files from {})",
            dir.display()
        );
    }
    println!(
        "  Origins     {} (gateway.allowed_origins; requests without Origin pass)",
        config.gateway.allowed_origins.join(" ")
    );
    println!("  Admin       http://{admin}/healthz  /readyz  /metrics");
    println!("  NATS        {nats}");
    println!("  Redis       {redis}");
    println!("  Store       {store}");
    if let Some(file) = &local.secret_file {
        println!(
            "  Dev secret  {} (more tokens: parley token <user>)",
            file.display()
        );
    }
    println!("  Token for alice (24 h):\n    {alice}");
    println!("Press Ctrl-C to stop.");
    Ok(())
}
