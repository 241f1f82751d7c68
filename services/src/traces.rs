//! OpenTelemetry traces: one chat command is one trace, from the gateway that took it,
//! through the handler that appended its event, to the projector that stored it.
//!
//! The W3C trace context (`traceparent`) rides in NATS headers: on the command the gateway
//! publishes to the intake, and on the event the handler appends to the log, so each role
//! continues the trace of the one before it. Spans are exported over OTLP/HTTP when
//! `[traces]` names an endpoint; without one nothing is exported and no header is written,
//! so tracing costs nothing when it is off.

use std::sync::atomic::{AtomicBool, Ordering};

use async_nats::HeaderMap;
use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::{Protocol, WithExportConfig};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider};
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::filter::Targets;
use tracing_subscriber::{Layer, Registry};

use crate::config::{OtlpProtocol, TracesConfig};

#[derive(Debug, thiserror::Error)]
pub enum TracesError {
    #[error("cannot set up the OTLP span exporter: {0}")]
    Exporter(String),
}

/// Whether this process exports spans: without an exporter there is no context to carry,
/// and the hot paths skip even asking for it (measured: 1.7% of a handler's CPU otherwise).
static EXPORTING: AtomicBool = AtomicBool::new(false);

/// The running span export; dropping it flushes what is queued and stops the exporter.
pub struct SpanExport {
    provider: Option<SdkTracerProvider>,
}

/// The subscriber layer that turns Parley's spans into OpenTelemetry spans.
pub type SpanLayer = Box<dyn Layer<Registry> + Send + Sync>;

impl SpanExport {
    /// The export `config` asks for (none without an endpoint) and the layer feeding it.
    pub fn start(config: &TracesConfig) -> Result<(SpanExport, Option<SpanLayer>), TracesError> {
        let Some(endpoint) = &config.otlp_endpoint else {
            return Ok((SpanExport { provider: None }, None));
        };
        let protocol = match config.protocol {
            OtlpProtocol::HttpProtobuf => Protocol::HttpBinary,
            OtlpProtocol::HttpJson => Protocol::HttpJson,
        };
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_protocol(protocol)
            .with_endpoint(endpoint)
            .build()
            .map_err(|e| TracesError::Exporter(e.to_string()))?;
        // A trace started elsewhere keeps its sampling decision; new ones are sampled at
        // the configured ratio.
        let sampler =
            Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(config.sample_ratio)));
        let resource = opentelemetry_sdk::Resource::builder()
            .with_service_name(config.service_name.clone())
            .build();
        let provider = SdkTracerProvider::builder()
            .with_batch_exporter(exporter)
            .with_sampler(sampler)
            .with_resource(resource)
            .build();
        EXPORTING.store(true, Ordering::Relaxed);
        let layer = tracing_opentelemetry::layer()
            .with_tracer(provider.tracer("parley"))
            .with_filter(Targets::new().with_target("parley_services", tracing::Level::INFO))
            .boxed();
        Ok((
            SpanExport {
                provider: Some(provider),
            },
            Some(layer),
        ))
    }

    /// Export every span ended so far now rather than at the next batch.
    pub fn flush(&self) {
        if let Some(provider) = &self.provider
            && let Err(e) = provider.force_flush()
        {
            tracing::warn!(error = %e, "cannot export spans");
        }
    }
}

impl Drop for SpanExport {
    fn drop(&mut self) {
        if let Some(provider) = self.provider.take()
            && let Err(e) = provider.shutdown()
        {
            tracing::warn!(error = %e, "cannot export the last spans");
        }
    }
}

/// The trace context of `span`, as NATS headers to publish with; empty when no trace is
/// being recorded.
pub fn context_headers(span: &tracing::Span) -> HeaderMap {
    let mut headers = HeaderMap::new();
    if !EXPORTING.load(Ordering::Relaxed) {
        return headers;
    }
    let context = span.context();
    TraceContextPropagator::new().inject_context(&context, &mut NatsHeaders(&mut headers));
    headers
}

/// Make `span` continue the trace whose context `headers` carry (a no-op without one).
pub fn continue_trace(span: &tracing::Span, headers: Option<&HeaderMap>) {
    let Some(headers) = headers else { return };
    if headers.get(TRACEPARENT).is_none() {
        return;
    }
    let context = TraceContextPropagator::new().extract(&ReadNatsHeaders(headers));
    // Only a span that has already started refuses a parent; ours are fresh.
    let _ = span.set_parent(context);
}

/// Whether `headers` carry a trace context.
pub fn carries_trace(headers: Option<&HeaderMap>) -> bool {
    headers.is_some_and(|h| h.get(TRACEPARENT).is_some())
}

const TRACEPARENT: &str = "traceparent";

struct NatsHeaders<'a>(&'a mut HeaderMap);

struct ReadNatsHeaders<'a>(&'a HeaderMap);

impl Injector for NatsHeaders<'_> {
    fn set(&mut self, key: &str, value: String) {
        self.0.insert(key, value.as_str());
    }
}

impl Extractor for ReadNatsHeaders<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).map(|value| value.as_str())
    }

    fn keys(&self) -> Vec<&str> {
        self.0
            .iter()
            .map(|(name, _)| AsRef::<str>::as_ref(name))
            .collect()
    }
}
