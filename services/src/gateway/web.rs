//! The gateway's HTTP side besides `/ws`: the files of `gateway.web_dir` (the web chat),
//! served so that the page and its sockets share one origin, and, under `parley up` only,
//! `POST /dev/token`, which signs a development token for a user name so that signing in
//! to the page is typing one.

use std::sync::Arc;

use axum::Router;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use parley_events::{ErrorCode, UserId};
use serde::{Deserialize, Serialize};

use super::{Shared, origin_allowed, refuse};
use crate::{auth, unix_millis};

/// How long a development token lasts.
const DEV_TOKEN_TTL_SECS: u64 = 86_400;

/// The routes `shared`'s configuration asks for (none by default).
pub(super) fn routes(shared: &Shared) -> Router<Arc<Shared>> {
    let mut router = Router::new();
    if shared.config.gateway.web_dir.is_some() {
        router = router
            .route("/", get(|state| file(state, Path("index.html".to_owned()))))
            .route("/{name}", get(file));
    }
    if shared.config.gateway.dev_tokens {
        router = router.route("/dev/token", post(dev_token));
    }
    router
}

/// One file of `gateway.web_dir`, by a plain name: no directories, nothing hidden.
async fn file(State(shared): State<Arc<Shared>>, Path(name): Path<String>) -> Response {
    let plain = !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'));
    let Some(dir) = shared.config.gateway.web_dir.as_ref().filter(|_| plain) else {
        return StatusCode::NOT_FOUND.into_response();
    };
    match tokio::fs::read(dir.join(&name)).await {
        Ok(body) => (
            [
                (header::CONTENT_TYPE, content_type(&name)),
                // A rebuilt page is picked up on the next load.
                (header::CACHE_CONTROL, "no-cache"),
                (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            ],
            body,
        )
            .into_response(),
        Err(_) => StatusCode::NOT_FOUND.into_response(),
    }
}

fn content_type(name: &str) -> &'static str {
    match name.rsplit_once('.').map(|(_, extension)| extension) {
        Some("html") => "text/html; charset=utf-8",
        Some("js") => "text/javascript; charset=utf-8",
        Some("css") => "text/css; charset=utf-8",
        Some("json" | "map") => "application/json",
        Some("svg") => "image/svg+xml",
        Some("png") => "image/png",
        Some("ico") => "image/x-icon",
        _ => "application/octet-stream",
    }
}

#[derive(Deserialize)]
struct DevTokenRequest {
    user: String,
}

#[derive(Serialize)]
struct DevToken {
    user: UserId,
    token: String,
}

/// A development token for the user named, signed with `parley up`'s development secret.
/// Pages of other origins are refused as their sockets would be.
async fn dev_token(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    axum::Json(request): axum::Json<DevTokenRequest>,
) -> Response {
    if !origin_allowed(&shared, &headers) {
        return refuse(
            StatusCode::FORBIDDEN,
            ErrorCode::OriginNotAllowed,
            "this origin may not ask for tokens",
        );
    }
    let Ok(user) = UserId::parse(request.user) else {
        return refuse(
            StatusCode::BAD_REQUEST,
            ErrorCode::InvalidRequest,
            "not a user id: 1 to 128 bytes, no spaces or control characters",
        );
    };
    let Some(secret) = &shared.config.auth.secret else {
        return StatusCode::NOT_FOUND.into_response();
    };
    let token = auth::mint(secret, &user, unix_millis() / 1000, DEV_TOKEN_TTL_SECS);
    axum::Json(DevToken { user, token }).into_response()
}
