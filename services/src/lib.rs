//! Parley's roles and the `parley` binary's logic.
//!
//! Layout:
//! - [`config`]: the one configuration struct, loaded from file + environment.
//! - [`topology`]: the JetStream streams, created and checked at start-up.
//! - [`gateway`]: WebSocket endpoint; frames in, commands out, events back.
//! - [`handler`]: validates commands and appends events with optimistic concurrency.
//! - [`projector`]: feeds the conversation store and presence from the log and gateways.
//! - [`push`]: push notifications to the operator's webhook for members with no live
//!   socket, and `parley push` for its dead letters.
//! - [`node`]: runs any set of roles in one process, with admin endpoints.
//! - [`local`]: `parley up`: local servers, a dev secret, every role in one process.
//! - [`traces`]: OpenTelemetry span export and the trace context carried in NATS headers.
//! - [`log_tools`]: `parley log …` and `parley conversation at`: the log read, exported,
//!   imported, and a conversation as it was at a point.
//! - [`progress`]: the progress bar (or plain lines) of long subcommands.
//! - [`auth`], [`revocation`], [`admin`], [`telemetry`]: tokens and their revocation,
//!   health/readiness/metrics, metric names.
//!
//! Every role is built from the configuration and run with a listener (where it serves one)
//! and a shutdown token, so tests start them in-process on port 0.

pub mod admin;
pub mod auth;
mod backoff;
pub mod config;
pub mod gateway;
pub mod handler;
pub mod local;
mod log;
pub mod log_tools;
pub mod node;
pub mod progress;
pub mod projector;
pub mod push;
pub mod replay;
pub mod revocation;
pub mod telemetry;
pub mod topology;
pub mod traces;

/// Milliseconds since the Unix epoch by this machine's clock.
pub fn unix_millis() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}
