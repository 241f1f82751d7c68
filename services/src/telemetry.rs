//! Telemetry: every metric name Parley emits is declared here, with its unit in the name.
//!
//! Labels are bounded: frame types, error codes, results and close codes, never a user or
//! conversation id. Counters are bumped once per batch where work is batched.

use std::sync::OnceLock;
use std::time::Duration;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

pub const NOT_READY: &str = "parley_not_ready";

pub const GATEWAY_CONNECTIONS: &str = "parley_gateway_connections";
pub const GATEWAY_UPGRADES_TOTAL: &str = "parley_gateway_upgrades_total";
pub const AUTH_KEY_RELOADS_TOTAL: &str = "parley_auth_key_reloads_total";
pub const GATEWAY_REVOCATIONS_TOTAL: &str = "parley_gateway_revocations_total";
pub const GATEWAY_FRAMES_RECEIVED_TOTAL: &str = "parley_gateway_frames_received_total";
pub const GATEWAY_FRAME_ERRORS_TOTAL: &str = "parley_gateway_frame_errors_total";
pub const GATEWAY_CLOSES_TOTAL: &str = "parley_gateway_closes_total";
pub const GATEWAY_EVENTS_DELIVERED_TOTAL: &str = "parley_gateway_events_delivered_total";
pub const GATEWAY_SOCKET_FLUSHES_TOTAL: &str = "parley_gateway_socket_flushes_total";
pub const GATEWAY_PACKED_MESSAGES_TOTAL: &str = "parley_gateway_packed_messages_total";
pub const GATEWAY_PACKED_FRAMES_TOTAL: &str = "parley_gateway_packed_frames_total";
pub const GATEWAY_GAP_FILLS_TOTAL: &str = "parley_gateway_gap_fills_total";
pub const GATEWAY_CATCH_UPS_TOTAL: &str = "parley_gateway_catch_ups_total";
pub const GATEWAY_RESUMES_TOTAL: &str = "parley_gateway_resumes_total";
pub const GATEWAY_RESUME_SECONDS: &str = "parley_gateway_resume_seconds";
pub const GATEWAY_RESUMED_EVENTS_TOTAL: &str = "parley_gateway_resumed_events_total";
pub const GATEWAY_CONVERSATION_SUBSCRIPTIONS: &str = "parley_gateway_conversation_subscriptions";
pub const GATEWAY_COMMAND_SECONDS: &str = "parley_gateway_command_seconds";
pub const GATEWAY_COMMAND_OUTCOMES_TOTAL: &str = "parley_gateway_command_outcomes_total";
pub const GATEWAY_LATE_OUTCOMES_TOTAL: &str = "parley_gateway_late_outcomes_total";
pub const GATEWAY_COMMANDS_RESUBMITTED_TOTAL: &str = "parley_gateway_commands_resubmitted_total";
pub const GATEWAY_INTAKE_PUBLISH_RETRIES_TOTAL: &str =
    "parley_gateway_intake_publish_retries_total";
pub const GATEWAY_TYPING_RECEIVED_TOTAL: &str = "parley_gateway_typing_received_total";
pub const GATEWAY_TYPING_DELIVERED_TOTAL: &str = "parley_gateway_typing_delivered_total";
pub const GATEWAY_PRESENCE_WATCHED_USERS: &str = "parley_gateway_presence_watched_users";
pub const GATEWAY_PRESENCE_WATCHES: &str = "parley_gateway_presence_watches";
pub const GATEWAY_PRESENCE_PUSHES_TOTAL: &str = "parley_gateway_presence_pushes_total";
pub const GATEWAY_RATE_LIMITED_TOTAL: &str = "parley_gateway_rate_limited_total";
pub const GATEWAY_RATE_LIMIT_BUCKETS: &str = "parley_gateway_rate_limit_buckets";

pub const HANDLER_COMMANDS_TOTAL: &str = "parley_handler_commands_total";
pub const HANDLER_APPEND_CONFLICTS_TOTAL: &str = "parley_handler_append_conflicts_total";
pub const HANDLER_APPEND_SECONDS: &str = "parley_handler_append_seconds";
pub const HANDLER_COMMAND_SECONDS: &str = "parley_handler_command_seconds";
pub const HANDLER_LOG_POSITION: &str = "parley_handler_log_position";
pub const HANDLER_TAIL_EVENTS_TOTAL: &str = "parley_handler_tail_events_total";
pub const HANDLER_INSTANCES: &str = "parley_handler_instances";
pub const HANDLER_PARTITIONS_OWNED: &str = "parley_handler_partitions_owned";
pub const HANDLER_PARTITION_MOVES_TOTAL: &str = "parley_handler_partition_moves_total";
pub const HANDLER_BATCH_EVENTS: &str = "parley_handler_batch_events";
pub const HANDLER_OUTCOMES_PER_MESSAGE: &str = "parley_handler_outcomes_per_message";
pub const HANDLER_COMMANDS_HELD: &str = "parley_handler_commands_held";
pub const HANDLER_COMMANDS_KEPT_TOTAL: &str = "parley_handler_commands_kept_total";

pub const PROJECTOR_HOLES_FILLED_TOTAL: &str = "parley_projector_holes_filled_total";
pub const PROJECTOR_PINS_TAKEN_TOTAL: &str = "parley_projector_pins_taken_total";
pub const PROJECTOR_EVENTS_APPLIED_TOTAL: &str = "parley_projector_events_applied_total";
pub const PROJECTOR_BATCH_EVENTS: &str = "parley_projector_batch_events";
pub const PROJECTOR_APPLY_SECONDS: &str = "parley_projector_apply_seconds";
pub const PROJECTOR_POSITION: &str = "parley_projector_position";
pub const PROJECTOR_ERRORS_TOTAL: &str = "parley_projector_errors_total";
pub const PROJECTOR_APPLY_RETRIES_TOTAL: &str = "parley_projector_apply_retries_total";
pub const STORE_ERRORS_TOTAL: &str = "parley_store_errors_total";
pub const PRESENCE_UPDATES_TOTAL: &str = "parley_presence_updates_total";
pub const PRESENCE_ERRORS_TOTAL: &str = "parley_presence_errors_total";
pub const PRESENCE_CHANGES_TOTAL: &str = "parley_presence_changes_total";
pub const PRESENCE_QUERIES_TOTAL: &str = "parley_presence_queries_total";
pub const PUSH_EVENTS_TOTAL: &str = "parley_push_events_total";
pub const PUSH_NOTIFICATIONS_TOTAL: &str = "parley_push_notifications_total";
pub const PUSH_WEBHOOK_REQUESTS_TOTAL: &str = "parley_push_webhook_requests_total";
pub const PUSH_RETRIES_TOTAL: &str = "parley_push_retries_total";
pub const PUSH_WEBHOOK_SECONDS: &str = "parley_push_webhook_seconds";
pub const PUSH_CONSUMER_PENDING: &str = "parley_push_consumer_pending";
pub const GATEWAY_CONNECTIONS_CLOSED_EARLY_TOTAL: &str =
    "parley_gateway_connections_closed_early_total";
pub const GATEWAY_TLS_RELOADS_TOTAL: &str = "parley_gateway_tls_reloads_total";

const LATENCY_BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0,
];
const BATCH_BUCKETS: [f64; 10] = [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0];

/// The process-wide Prometheus recorder, installed on first use. Every role in the process
/// (one in production, several under `parley up` or in tests) reports through it.
pub fn prometheus() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        let handle = [
            PROJECTOR_BATCH_EVENTS,
            HANDLER_BATCH_EVENTS,
            HANDLER_OUTCOMES_PER_MESSAGE,
        ]
        .into_iter()
        .fold(
            PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), &LATENCY_BUCKETS),
            |builder, batch_sizes| {
                builder.and_then(|builder| {
                    builder
                        .set_buckets_for_metric(Matcher::Full(batch_sizes.into()), &BATCH_BUCKETS)
                })
            },
        )
        .expect("bucket lists are non-empty")
        .install_recorder()
        .expect("no other metrics recorder is installed in this process");
        describe();
        let upkeep = handle.clone();
        // Histograms are drained into their summaries by upkeep; without it they grow.
        std::thread::Builder::new()
            .name("metrics-upkeep".into())
            .spawn(move || {
                loop {
                    std::thread::sleep(Duration::from_secs(5));
                    upkeep.run_upkeep();
                }
            })
            .expect("spawning a thread at start-up succeeds");
        handle
    })
}

/// HELP text and units for every metric, so `/metrics` explains itself.
fn describe() {
    use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
    describe_gauge!(
        NOT_READY,
        Unit::Count,
        "1 while the readiness check `check` fails for `reason`, else 0."
    );
    describe_gauge!(
        GATEWAY_CONNECTIONS,
        Unit::Count,
        "Open WebSocket connections."
    );
    describe_counter!(
        GATEWAY_UPGRADES_TOTAL,
        Unit::Count,
        "Upgrade requests by result (accepted or the refusal's error code)."
    );
    describe_counter!(
        GATEWAY_REVOCATIONS_TOTAL,
        Unit::Count,
        "Revocations a gateway took in while running, by kind (user or token)."
    );
    describe_counter!(
        AUTH_KEY_RELOADS_TOTAL,
        Unit::Count,
        "Re-reads of the changed JWKS file by result (ok, or error: the previous keys stay)."
    );
    describe_counter!(
        GATEWAY_FRAMES_RECEIVED_TOTAL,
        Unit::Count,
        "Valid client frames by type."
    );
    describe_counter!(
        GATEWAY_FRAME_ERRORS_TOTAL,
        Unit::Count,
        "Client frames answered with an error, by error code."
    );
    describe_counter!(
        GATEWAY_CLOSES_TOTAL,
        Unit::Count,
        "Sockets closed by the server or client, by close code."
    );
    describe_counter!(
        GATEWAY_EVENTS_DELIVERED_TOTAL,
        Unit::Count,
        "Event frames queued to sockets."
    );
    describe_counter!(
        GATEWAY_PACKED_MESSAGES_TOTAL,
        Unit::Count,
        "WebSocket messages that packed several frames, to sockets that asked (pack=1)."
    );
    describe_counter!(
        GATEWAY_PACKED_FRAMES_TOTAL,
        Unit::Count,
        "Frames sent inside packed messages (frames per packed message = this / messages)."
    );
    describe_counter!(
        GATEWAY_SOCKET_FLUSHES_TOTAL,
        Unit::Count,
        "Socket writes flushed; each carries every frame that was ready (frames per flush = frames sent / this)."
    );
    describe_counter!(
        GATEWAY_GAP_FILLS_TOTAL,
        Unit::Count,
        "Gaps in live delivery filled from the log."
    );
    describe_counter!(
        GATEWAY_CATCH_UPS_TOTAL,
        Unit::Count,
        "Sockets that joined a followed conversation behind it, caught up from the log, by result (caught_up, closed: too far behind)."
    );
    describe_counter!(
        GATEWAY_RESUMES_TOTAL,
        Unit::Count,
        "Resumes (a version 1 socket's connect counts as one), by result (live, more, unavailable)."
    );
    describe_histogram!(
        GATEWAY_RESUME_SECONDS,
        Unit::Seconds,
        "From a resume's start to its last event queued."
    );
    describe_counter!(
        GATEWAY_RESUMED_EVENTS_TOTAL,
        Unit::Count,
        "Events sent to sockets by resumes, by source (store, log)."
    );
    describe_gauge!(
        GATEWAY_CONVERSATION_SUBSCRIPTIONS,
        Unit::Count,
        "Conversations this gateway follows."
    );
    describe_histogram!(
        GATEWAY_COMMAND_SECONDS,
        Unit::Seconds,
        "From a command frame to its ack or error."
    );
    describe_counter!(
        GATEWAY_COMMAND_OUTCOMES_TOTAL,
        Unit::Count,
        "Command outcomes sent to clients, by outcome."
    );
    describe_counter!(
        GATEWAY_LATE_OUTCOMES_TOTAL,
        Unit::Count,
        "Outcomes sent to clients after they were told `timeout`."
    );
    describe_counter!(
        GATEWAY_COMMANDS_RESUBMITTED_TOTAL,
        Unit::Count,
        "Commands published to the intake again under the same id while their outcome was missing, by trigger (reconnect, interval)."
    );
    describe_counter!(
        GATEWAY_INTAKE_PUBLISH_RETRIES_TOTAL,
        Unit::Count,
        "Intake publishes retried, by failure kind (stream_not_found, timed_out, other)."
    );
    describe_counter!(
        GATEWAY_TYPING_RECEIVED_TOTAL,
        Unit::Count,
        "Typing frames from clients, by result (forwarded, rate_limited, redundant, refused)."
    );
    describe_counter!(
        GATEWAY_TYPING_DELIVERED_TOTAL,
        Unit::Count,
        "Typing frames queued to sockets."
    );
    describe_gauge!(
        GATEWAY_PRESENCE_WATCHED_USERS,
        Unit::Count,
        "Users whose presence this gateway follows (one NATS subscription each)."
    );
    describe_gauge!(
        GATEWAY_PRESENCE_WATCHES,
        Unit::Count,
        "Presence subscriptions of sockets (socket and watched user pairs)."
    );
    describe_counter!(
        GATEWAY_PRESENCE_PUSHES_TOTAL,
        Unit::Count,
        "Presence changes queued to sockets."
    );
    describe_counter!(
        GATEWAY_RATE_LIMITED_TOTAL,
        Unit::Count,
        "Requests and upgrades refused by a rate limit, by scope (user, ip, upgrade)."
    );
    describe_gauge!(
        GATEWAY_RATE_LIMIT_BUCKETS,
        Unit::Count,
        "Rate-limit buckets held after the last sweep, by scope (user, ip, upgrade)."
    );
    describe_counter!(
        HANDLER_COMMANDS_TOTAL,
        Unit::Count,
        "Commands handled, by action and result."
    );
    describe_counter!(
        HANDLER_APPEND_CONFLICTS_TOTAL,
        Unit::Count,
        "Appends refused by the expected-sequence check and retried."
    );
    describe_histogram!(
        HANDLER_APPEND_SECONDS,
        Unit::Seconds,
        "One append to the event log, publish to ack."
    );
    describe_histogram!(
        HANDLER_BATCH_EVENTS,
        Unit::Count,
        "Events one lane appended with one commit (an atomic batch, or 1 for an event appended alone)."
    );
    describe_histogram!(
        HANDLER_OUTCOMES_PER_MESSAGE,
        Unit::Count,
        "Outcomes sent to a gateway in one message (answers that were ready together)."
    );
    describe_histogram!(
        HANDLER_COMMAND_SECONDS,
        Unit::Seconds,
        "One command, taken to answered."
    );
    describe_gauge!(
        HANDLER_LOG_POSITION,
        Unit::Count,
        "Last log sequence in this handler's write model."
    );
    describe_counter!(
        HANDLER_TAIL_EVENTS_TOTAL,
        Unit::Count,
        "Log events read by this handler's tail (after any snapshot it started from)."
    );
    describe_gauge!(
        HANDLER_COMMANDS_HELD,
        Unit::Count,
        "Intake commands this handler has taken and not yet answered."
    );
    describe_counter!(
        HANDLER_COMMANDS_KEPT_TOTAL,
        Unit::Count,
        "Times this handler told the intake a command it held longer than a third of the ack wait was still in progress."
    );
    describe_gauge!(
        HANDLER_INSTANCES,
        Unit::Count,
        "Handler instances this one sees announced (itself included)."
    );
    describe_gauge!(
        HANDLER_PARTITIONS_OWNED,
        Unit::Count,
        "Intake partitions this handler owns (pulls first); it stands by for the others."
    );
    describe_counter!(
        HANDLER_PARTITION_MOVES_TOTAL,
        Unit::Count,
        "Intake partitions this handler took or gave up as instances came and went."
    );
    describe_counter!(
        PROJECTOR_PINS_TAKEN_TOTAL,
        Unit::Count,
        "Times this instance released the projection's pin from another instance that had left events unacknowledged without progress (crashed, cut off, or stuck)."
    );
    describe_counter!(
        PROJECTOR_HOLES_FILLED_TOTAL,
        Unit::Count,
        "Log events read directly because the batch after them was delivered and they never were again (a pull that died or reconnected with them)."
    );
    describe_counter!(
        PROJECTOR_EVENTS_APPLIED_TOTAL,
        Unit::Count,
        "Events applied to the conversation store."
    );
    describe_histogram!(
        PROJECTOR_BATCH_EVENTS,
        Unit::Count,
        "Events per store transaction."
    );
    describe_histogram!(
        PROJECTOR_APPLY_SECONDS,
        Unit::Seconds,
        "Writing one batch to the conversation store (one SQLite transaction, or every CQL write of the batch and then the position), by store."
    );
    describe_gauge!(
        PROJECTOR_POSITION,
        Unit::Count,
        "Last log sequence in the conversation store."
    );
    describe_counter!(
        PROJECTOR_ERRORS_TOTAL,
        Unit::Count,
        "Projection failures, by kind."
    );
    describe_counter!(
        PROJECTOR_APPLY_RETRIES_TOTAL,
        Unit::Count,
        "Batches retried because the conversation store could not be reached, by store."
    );
    describe_counter!(
        STORE_ERRORS_TOTAL,
        Unit::Count,
        "Failed opens and health checks of the conversation store, by kind."
    );
    describe_counter!(
        PRESENCE_UPDATES_TOTAL,
        Unit::Count,
        "Presence updates recorded, by state."
    );
    describe_counter!(
        PRESENCE_ERRORS_TOTAL,
        Unit::Count,
        "Presence updates not recorded, by kind."
    );
    describe_counter!(
        PRESENCE_CHANGES_TOTAL,
        Unit::Count,
        "Users who came online or went offline, published to gateways, by state."
    );
    describe_counter!(
        PRESENCE_QUERIES_TOTAL,
        Unit::Count,
        "Presence queries answered, by result."
    );
    describe_counter!(
        PUSH_EVENTS_TOTAL,
        Unit::Count,
        "Log events the push worker finished with, by result (notified, not_a_message, deferred: handed back to the log for later, interrupted, undecodable)."
    );
    describe_counter!(
        PUSH_NOTIFICATIONS_TOTAL,
        Unit::Count,
        "Push notifications sent by the push worker, by result (delivered, dead_lettered)."
    );
    describe_counter!(
        PUSH_WEBHOOK_REQUESTS_TOTAL,
        Unit::Count,
        "POSTs to the push webhook, by result (success, retryable_status: 5xx/408/429, refused: any other status, timeout, connection)."
    );
    describe_counter!(
        PUSH_RETRIES_TOTAL,
        Unit::Count,
        "POSTs to the push webhook retried after a retryable failure."
    );
    describe_histogram!(
        PUSH_WEBHOOK_SECONDS,
        Unit::Seconds,
        "One POST to the push webhook, connection included, until its answer or timeout."
    );
    describe_gauge!(
        PUSH_CONSUMER_PENDING,
        Unit::Count,
        "Log events not yet handed to the push worker, as of the last one it took (its lag)."
    );
}

/// Initialise structured logging for the binary, and span export when `[traces]` names an
/// OTLP endpoint. `RUST_LOG` filters the log lines; `json` picks JSON lines. Exported spans
/// are Parley's own at info level whatever `RUST_LOG` says, so quiet logs never break a
/// trace. Keep the returned value until exit: dropping it flushes the spans still queued.
pub fn init_logging(
    json: bool,
    traces: &crate::config::TracesConfig,
) -> Result<crate::traces::SpanExport, crate::traces::TracesError> {
    init_logging_to(json, traces, "info", std::io::stdout)
}

/// Logging for a subcommand whose standard output is its result (`parley replay --json`):
/// log lines go to standard error, only warnings and errors unless `RUST_LOG` asks for more
/// (what the tool does, it prints itself), and no spans are exported.
pub fn init_command_logging(json: bool) {
    // Without an endpoint there is no exporter to fail.
    let _ = init_logging_to(
        json,
        &crate::config::TracesConfig::default(),
        "warn",
        std::io::stderr,
    );
}

fn init_logging_to<W>(
    json: bool,
    traces: &crate::config::TracesConfig,
    default_filter: &str,
    writer: W,
) -> Result<crate::traces::SpanExport, crate::traces::TracesError>
where
    W: for<'w> tracing_subscriber::fmt::MakeWriter<'w> + Send + Sync + 'static,
{
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    use tracing_subscriber::{EnvFilter, Layer};
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    let lines = tracing_subscriber::fmt::layer()
        .with_target(true)
        .with_writer(writer);
    let lines = if json {
        lines.json().with_filter(filter).boxed()
    } else {
        lines.with_filter(filter).boxed()
    };
    let (export, spans) = crate::traces::SpanExport::start(traces)?;
    let mut layers = vec![lines];
    layers.extend(spans);
    tracing_subscriber::registry().with(layers).init();
    Ok(export)
}
