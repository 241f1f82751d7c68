//! The admin endpoints every role serves: `/healthz` (the process is alive), `/readyz`
//! (every dependency this role needs answers) and `/metrics` (Prometheus text format).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;

use crate::telemetry;

/// Why a check is not ready. A fixed set, so it can label the `parley_not_ready` metric;
/// the detail that goes with it is for people and goes to `/readyz` only.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// The role has not finished starting.
    Starting,
    /// No connection to NATS yet, or it was lost; the client keeps reconnecting.
    Disconnected,
    /// The handler's write model has not caught up with the log.
    CatchingUp,
    /// The intake stream or the handlers' consumer on it is missing and being set up again.
    NoIntake,
    /// Pulling commands or events failed (a lost pull request, a consumer gone).
    PullFailing,
    /// The conversation store does not answer.
    StoreUnavailable,
    /// The conversation store is replaying the log to catch up (rebuilt, restored, or far
    /// behind), so what it serves is stale.
    Replaying,
    /// The role stopped on an error (it retries, or its process stops).
    Failed,
    /// Redis does not answer.
    RedisUnavailable,
    ShuttingDown,
}

impl Reason {
    pub const fn as_str(self) -> &'static str {
        match self {
            Reason::Starting => "starting",
            Reason::Disconnected => "disconnected",
            Reason::CatchingUp => "catching_up",
            Reason::NoIntake => "no_intake",
            Reason::PullFailing => "pull_failing",
            Reason::StoreUnavailable => "store_unavailable",
            Reason::Replaying => "replaying",
            Reason::Failed => "failed",
            Reason::RedisUnavailable => "redis_unavailable",
            Reason::ShuttingDown => "shutting_down",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct NotReady {
    reason: Reason,
    detail: String,
}

/// Named readiness checks, each set by the component that owns it. Every change is
/// mirrored in the gauge `parley_not_ready{check, reason}`: 1 while `check` is not ready
/// for `reason`.
#[derive(Clone, Default)]
pub struct Readiness {
    checks: Arc<Mutex<BTreeMap<&'static str, Option<NotReady>>>>,
}

impl Readiness {
    /// `check` can do its work.
    pub fn ready(&self, check: &'static str) {
        self.record(check, None);
    }

    /// `check` cannot do its work, because of `reason`; `detail` says more to people.
    pub fn not_ready(&self, check: &'static str, reason: Reason, detail: impl Into<String>) {
        self.record(
            check,
            Some(NotReady {
                reason,
                detail: detail.into(),
            }),
        );
    }

    fn record(&self, check: &'static str, state: Option<NotReady>) {
        let new_reason = state.as_ref().map(|s| s.reason);
        let old_reason = self
            .checks
            .lock()
            .expect("readiness lock is never poisoned")
            .insert(check, state)
            .flatten()
            .map(|s| s.reason);
        if old_reason != new_reason {
            if let Some(old) = old_reason {
                metrics::gauge!(telemetry::NOT_READY, "check" => check, "reason" => old.as_str())
                    .set(0.0);
            }
            if let Some(new) = new_reason {
                metrics::gauge!(telemetry::NOT_READY, "check" => check, "reason" => new.as_str())
                    .set(1.0);
            }
        }
    }

    /// Every check is set and ready; a check that was never set counts as not ready.
    pub fn is_ready(&self) -> bool {
        let checks = self
            .checks
            .lock()
            .expect("readiness lock is never poisoned");
        !checks.is_empty() && checks.values().all(Option::is_none)
    }

    fn report(&self) -> serde_json::Value {
        let checks = self
            .checks
            .lock()
            .expect("readiness lock is never poisoned");
        checks
            .iter()
            .map(|(name, state)| {
                let value = match state {
                    None => "ok".to_owned(),
                    Some(NotReady { reason, detail }) => format!("{}: {detail}", reason.as_str()),
                };
                (name.to_string(), serde_json::Value::String(value))
            })
            .collect::<serde_json::Map<_, _>>()
            .into()
    }
}

pub fn router(readiness: Readiness) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/readyz", get(ready))
        .route(
            "/metrics",
            get(|| async { telemetry::prometheus().render() }),
        )
        .with_state(readiness)
}

async fn ready(State(readiness): State<Readiness>) -> impl IntoResponse {
    let status = if readiness.is_ready() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, axum::Json(readiness.report()))
}
