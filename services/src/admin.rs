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

/// Named readiness checks, each set by the component that owns it.
#[derive(Clone, Default)]
pub struct Readiness {
    checks: Arc<Mutex<BTreeMap<&'static str, Result<(), String>>>>,
}

impl Readiness {
    /// Record the state of `check`; a check that was never set counts as not ready.
    pub fn set(&self, check: &'static str, state: Result<(), String>) {
        self.checks
            .lock()
            .expect("readiness lock is never poisoned")
            .insert(check, state);
    }

    pub fn ready(&self) -> bool {
        let checks = self
            .checks
            .lock()
            .expect("readiness lock is never poisoned");
        !checks.is_empty() && checks.values().all(Result::is_ok)
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
                    Ok(()) => "ok".to_owned(),
                    Err(why) => why.clone(),
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
    let status = if readiness.ready() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, axum::Json(readiness.report()))
}
