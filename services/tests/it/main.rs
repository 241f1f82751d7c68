//! Most of the services' integration tests, as one test binary: each file here was a binary
//! of its own, compiling `support` again and linking against the whole dependency tree, which
//! made building the test targets three times slower (65 s against 20 s, dependencies
//! built). Tests that read process-wide state (the metrics recorder, the tracing subscriber)
//! stay binaries of their own beside this one, where no other test moves it.

#[path = "../support/mod.rs"]
mod support;

mod bad_input;
mod chat;
mod close;
mod cluster;
mod conversation_list;
mod cql_store;
mod faults_commands;
mod hardening;
mod history;
mod log_tools;
mod members;
mod membership;
mod messages;
mod old_log;
mod packing;
mod presence;
mod projection;
mod protocol_codes;
mod push;
mod rate_limits;
mod read_markers;
mod replay;
mod replay_figures;
mod resilience;
mod resume;
mod revocation;
mod store_figures;
mod tls;
mod topology;
mod up;
mod web;
mod wss;
