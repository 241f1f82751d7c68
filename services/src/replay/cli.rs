//! `parley replay`: its arguments and what each subcommand prints. Exit codes: 0 done (and,
//! for verify, equal), 1 a runtime failure or differences found, 2 bad arguments.

use std::time::Duration;

use clap::Subcommand;
use tokio_util::sync::CancellationToken;

use super::rebuild::{self, RebuildOptions};
use super::switch::{self, SwitchOptions};
use super::verify::{self, Side};
use super::{ReplayError, Target};
use crate::config::Config;
use crate::progress::Progress;

#[derive(Debug, Subcommand)]
pub enum ReplayCommand {
    /// Rebuild the projection into a new target (sqlite:<path> or cql:<keyspace>) from the
    /// log, while the live projector keeps serving the old one. Ends at the log's end as of
    /// the start, printing the position reached, unless --follow.
    Rebuild {
        /// sqlite:<path> (a new file) or cql:<keyspace> (a new keyspace on the configured
        /// contact points).
        #[arg(long)]
        to: String,
        /// Continue a target that already holds data from its position.
        #[arg(long)]
        resume: bool,
        /// Start at this log sequence, into a target that holds the log up to the one before.
        #[arg(long)]
        from_seq: Option<u64>,
        /// Keep following the log until Ctrl-C (to switch under load).
        #[arg(long)]
        follow: bool,
    },
    /// Make TARGET the projection gateways read and projectors write, without downtime:
    /// projectors move at once, gateways once the target has caught up.
    Switch {
        #[arg(long)]
        to: String,
        /// Refuse a target more than this many events behind the log.
        #[arg(long, default_value_t = 10_000)]
        max_lag: u64,
        /// Longest wait for the running nodes to report that they moved.
        #[arg(long, default_value_t = 60)]
        wait_secs: u64,
        /// Print the result as JSON on standard output.
        #[arg(long)]
        json: bool,
    },
    /// Compare two targets, or a target with the log (--b log), and print the differences;
    /// exits 1 when any differ.
    Verify {
        #[arg(long)]
        a: String,
        /// A target, or `log`.
        #[arg(long)]
        b: String,
        /// Print the report as JSON on standard output.
        #[arg(long)]
        json: bool,
    },
}

/// Run one `parley replay` subcommand; the exit code.
pub async fn run(config: &Config, command: ReplayCommand) -> i32 {
    match execute(config, command).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("parley replay: {e}");
            e.exit_code()
        }
    }
}

async fn execute(config: &Config, command: ReplayCommand) -> Result<i32, ReplayError> {
    let shutdown = CancellationToken::new();
    {
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            if tokio::signal::ctrl_c().await.is_ok() {
                shutdown.cancel();
            }
        });
    }
    match command {
        ReplayCommand::Rebuild {
            to,
            resume,
            from_seq,
            follow,
        } => {
            let options = RebuildOptions {
                resume,
                from_seq,
                follow,
                ..RebuildOptions::new(to.parse()?)
            };
            let what = format!("rebuild {}", options.target);
            let rebuilt = rebuild::run(
                config,
                &options,
                |total| Progress::new(what, total),
                &shutdown,
            )
            .await?;
            println!(
                "rebuilt {}: {} events applied, position {}",
                options.target, rebuilt.applied, rebuilt.position
            );
            Ok(0)
        }
        ReplayCommand::Switch {
            to,
            max_lag,
            wait_secs,
            json,
        } => {
            let options = SwitchOptions {
                target: to.parse()?,
                max_lag,
                wait: Duration::from_secs(wait_secs),
            };
            let switched = switch::switch(config, &options).await?;
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&switched).expect("serializes")
                );
            } else {
                println!(
                    "switched to {} (its position {}, the log at {})",
                    switched.target, switched.position, switched.log_end
                );
                for moved in &switched.moved {
                    println!("  moved: {moved}");
                }
                for (instance, on) in &switched.not_moved {
                    println!("  not moved within {wait_secs} s: {instance} (still on {on})");
                }
            }
            Ok(if switched.not_moved.is_empty() { 0 } else { 1 })
        }
        ReplayCommand::Verify { a, b, json } => {
            let a: Target = a.parse()?;
            let b: Side = b.parse()?;
            let report = verify::run(
                config,
                &a,
                &b,
                |total| Progress::counting("verify", total, "conversations"),
                &shutdown,
            )
            .await?;
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&report).expect("serializes")
                );
            } else {
                print!("{}", report.text());
            }
            Ok(if report.equal { 0 } else { 1 })
        }
    }
}
