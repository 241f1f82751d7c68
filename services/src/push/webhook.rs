//! The operator's webhook: one POST per notification, retried with exponential backoff and
//! full jitter while the answer says a retry can succeed (5xx, 408, 429, a timeout, a
//! connection failure), given up at once when it says it cannot (any other status).

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderValue, Request, StatusCode, Uri, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use super::{Notification, PushError};
use crate::backoff::doubled;
use crate::config::PushConfig;
use crate::telemetry;

/// The header that lets the push gateway drop a notification it has already taken.
pub const IDEMPOTENCY_KEY: &str = "idempotency-key";
/// Bytes of a refusal's body kept in the error (and the dead letter).
const ERROR_BODY_BYTES: usize = 512;

/// Why a notification was not delivered.
#[derive(Debug)]
pub enum Undelivered {
    /// Every attempt allowed failed, or one failed in a way no retry can fix.
    Failed { error: String, attempts: u32 },
    /// Shutdown came first; nothing about the notification is known to have worked.
    Shutdown,
}

/// What one POST came to.
enum Attempt {
    Delivered,
    Retryable(String),
    Permanent(String),
}

#[derive(Clone)]
pub struct Webhook {
    client: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
    url: Uri,
    auth: Option<HeaderValue>,
    timeout: Duration,
    max_attempts: u32,
    first_backoff: Duration,
    max_backoff: Duration,
    /// Bounds the POSTs in flight across every notification of this process.
    in_flight: Arc<Semaphore>,
}

impl Webhook {
    /// The client for `config`'s webhook; `None` when push is off.
    pub fn new(config: &PushConfig) -> Result<Option<Webhook>, PushError> {
        let Some(url) = &config.webhook_url else {
            return Ok(None);
        };
        let invalid = |e: String| PushError::Config(format!("push.webhook_url: {e}"));
        let url: Uri = url
            .parse()
            .map_err(|e: http::uri::InvalidUri| invalid(e.to_string()))?;
        // Only an https webhook needs trust roots; reading the system's for a plain http one
        // would fail on a machine that has none for no reason.
        let tls = if url.scheme_str() == Some("https") {
            parley_projections::TlsClient {
                ca_file: None,
                client_cert: None,
                server_name: None,
            }
            .client_config()
            .map_err(|e| invalid(e.to_string()))?
        } else {
            rustls::ClientConfig::builder_with_provider(Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .map_err(|e| invalid(e.to_string()))?
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth()
        };
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .build();
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .build(connector);
        let auth = config
            .auth_header
            .as_ref()
            .map(|value| {
                let mut value = HeaderValue::from_str(value.expose()).map_err(|_| {
                    PushError::Config("push.auth_header is not a header value".into())
                })?;
                value.set_sensitive(true);
                Ok::<_, PushError>(value)
            })
            .transpose()?;
        Ok(Some(Webhook {
            client,
            url,
            auth,
            timeout: Duration::from_millis(config.timeout_ms),
            max_attempts: config.max_attempts,
            first_backoff: Duration::from_millis(config.initial_backoff_ms),
            max_backoff: Duration::from_millis(config.max_backoff_ms),
            in_flight: Arc::new(Semaphore::new(config.concurrency)),
        }))
    }

    /// POST `notification` until it is taken, a refusal says retrying cannot help, or
    /// `max_attempts` POSTs failed; the number of POSTs made when it was taken.
    pub async fn deliver(
        &self,
        notification: &Notification,
        shutdown: &CancellationToken,
    ) -> Result<u32, Undelivered> {
        let body =
            Bytes::from(serde_json::to_vec(notification).expect("a notification serializes"));
        let key = HeaderValue::from_str(&notification.idempotency_key().to_string())
            .expect("a UUID is a header value");
        let mut attempts = 0;
        loop {
            attempts += 1;
            let attempt = tokio::select! {
                () = shutdown.cancelled() => return Err(Undelivered::Shutdown),
                attempt = self.post(body.clone(), &key) => attempt,
            };
            let error = match attempt {
                Attempt::Delivered => return Ok(attempts),
                Attempt::Permanent(error) => {
                    return Err(Undelivered::Failed { error, attempts });
                }
                Attempt::Retryable(error) if attempts >= self.max_attempts => {
                    return Err(Undelivered::Failed { error, attempts });
                }
                Attempt::Retryable(error) => error,
            };
            // Full jitter: many notifications failing together (the gateway went down) spread
            // their retries over the whole window instead of coming back in a herd.
            let ceiling = doubled(self.first_backoff, self.max_backoff, attempts - 1);
            let wait = Duration::from_millis(fastrand::u64(0..=ceiling.as_millis() as u64));
            tracing::debug!(%error, attempts, retry_in = ?wait, "webhook refused a notification; retrying");
            metrics::counter!(telemetry::PUSH_RETRIES_TOTAL).increment(1);
            tokio::select! {
                () = shutdown.cancelled() => return Err(Undelivered::Shutdown),
                () = tokio::time::sleep(wait) => {}
            }
        }
    }

    async fn post(&self, body: Bytes, key: &HeaderValue) -> Attempt {
        let _permit = self
            .in_flight
            .acquire()
            .await
            .expect("the semaphore is never closed");
        let mut request = Request::post(self.url.clone())
            .header(header::CONTENT_TYPE, "application/json")
            .header(
                header::USER_AGENT,
                concat!("parley/", env!("CARGO_PKG_VERSION")),
            )
            .header(IDEMPOTENCY_KEY, key.clone());
        if let Some(auth) = &self.auth {
            request = request.header(header::AUTHORIZATION, auth.clone());
        }
        let request = request.body(Full::new(body)).expect("a valid request");
        let started = Instant::now();
        let answered = tokio::time::timeout(self.timeout, async {
            let response = self.client.request(request).await?;
            let status = response.status();
            // The body is read (bounded) so the connection can be reused, and a refusal's
            // reason lands in the log and the dead letter.
            let body = Limited::new(response.into_body(), ERROR_BODY_BYTES)
                .collect()
                .await
                .map(|b| String::from_utf8_lossy(&b.to_bytes()).into_owned())
                .unwrap_or_default();
            Ok::<_, hyper_util::client::legacy::Error>((status, body))
        })
        .await;
        metrics::histogram!(telemetry::PUSH_WEBHOOK_SECONDS)
            .record(started.elapsed().as_secs_f64());
        let (result, attempt) = match answered {
            Err(_) => (
                "timeout",
                Attempt::Retryable(format!("no answer within {:?}", self.timeout)),
            ),
            Ok(Err(e)) => (
                "connection",
                Attempt::Retryable(format!("cannot reach the webhook: {}", error_chain(&e))),
            ),
            Ok(Ok((status, _))) if status.is_success() => ("success", Attempt::Delivered),
            Ok(Ok((status, body))) => {
                let error = match body.trim() {
                    "" => format!("HTTP {status}"),
                    body => format!("HTTP {status}: {body}"),
                };
                if retryable(status) {
                    ("retryable_status", Attempt::Retryable(error))
                } else {
                    ("refused", Attempt::Permanent(error))
                }
            }
        };
        metrics::counter!(telemetry::PUSH_WEBHOOK_REQUESTS_TOTAL, "result" => result).increment(1);
        attempt
    }
}

/// Whether a refusal with `status` may be accepted later: the server failed, or asked for
/// time (408, 429). Anything else (a 4xx, a redirect this client does not follow) would be
/// refused again.
fn retryable(status: StatusCode) -> bool {
    status.is_server_error()
        || status == StatusCode::REQUEST_TIMEOUT
        || status == StatusCode::TOO_MANY_REQUESTS
}

/// An error with its causes, which hyper keeps apart (`client error (Connect)`, then why).
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_server_errors_and_requests_for_time_are_retried() {
        for code in [500, 502, 503, 504, 408, 429] {
            assert!(retryable(StatusCode::from_u16(code).unwrap()), "{code}");
        }
        for code in [301, 400, 401, 403, 404, 410, 413, 422] {
            assert!(!retryable(StatusCode::from_u16(code).unwrap()), "{code}");
        }
    }
}
