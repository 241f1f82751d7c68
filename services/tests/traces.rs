//! OpenTelemetry traces: one chat command is one trace across the gateway, the handler and
//! the projector, exported over OTLP/HTTP to a collector (here a test HTTP server that keeps
//! what it is sent). The trace context rides in NATS headers between the roles.

mod support;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::routing::post;
use parley_services::config::{OtlpProtocol, TracesConfig};
use parley_services::telemetry;
use serde_json::{Value, json};
use support::{Platform, eventually};

/// Every span the collector was sent: `(trace id, span id, parent span id, name)`.
type Spans = Arc<Mutex<Vec<(String, String, String, String)>>>;

/// A collector on 127.0.0.1 taking OTLP/HTTP JSON at `/v1/traces`; its endpoint.
async fn collector(spans: Spans) -> String {
    let app = Router::new().route(
        "/v1/traces",
        post(move |body: axum::Json<Value>| async move {
            let mut spans = spans.lock().unwrap();
            for resource in body["resourceSpans"].as_array().into_iter().flatten() {
                let attributes = resource["resource"]["attributes"].as_array();
                let service = attributes
                    .into_iter()
                    .flatten()
                    .find(|a| a["key"] == "service.name");
                assert_eq!(
                    service.map(|a| &a["value"]["stringValue"]),
                    Some(&json!("parley-test")),
                    "{resource}"
                );
                for scope in resource["scopeSpans"].as_array().into_iter().flatten() {
                    for span in scope["spans"].as_array().into_iter().flatten() {
                        let text = |key: &str| span[key].as_str().unwrap_or_default().to_owned();
                        spans.push((
                            text("traceId"),
                            text("spanId"),
                            text("parentSpanId"),
                            text("name"),
                        ));
                    }
                }
            }
            axum::Json(json!({}))
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    format!("http://{address}/v1/traces")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_is_one_trace_from_the_gateway_through_the_handler_to_the_projector() {
    let spans = Spans::default();
    let traces = TracesConfig {
        otlp_endpoint: Some(collector(Arc::clone(&spans)).await),
        protocol: OtlpProtocol::HttpJson,
        service_name: "parley-test".into(),
        sample_ratio: 1.0,
    };
    let export = telemetry::init_logging(false, &traces).unwrap();
    let platform = Platform::start(1).await;
    let (mut alice, _bob, conversation) = platform.alice_and_bob().await;
    alice
        .send(json!({"type": "send", "id": "traced", "conversation": conversation, "body": "hi"}))
        .await;
    assert_eq!(alice.reply_to("traced").await["type"], "ack");
    platform.projected().await;

    // The creation and the message: two commands, each a trace of three spans, each span a
    // child of the one before it.
    let chains = eventually(|| {
        export.flush();
        let spans = spans.lock().unwrap().clone();
        async move {
            let by_id: HashMap<&str, &(String, String, String, String)> =
                spans.iter().map(|s| (s.1.as_str(), s)).collect();
            let chains: Vec<Vec<&str>> = spans
                .iter()
                .filter(|s| s.3 == "projector event")
                .map(|projector| {
                    let mut chain = vec![projector.3.as_str()];
                    let mut at = projector;
                    while let Some(parent) = by_id.get(at.2.as_str()) {
                        assert_eq!(parent.0, at.0, "a parent in another trace: {spans:?}");
                        chain.push(parent.3.as_str());
                        at = parent;
                    }
                    chain
                })
                .collect();
            let complete = chains
                .iter()
                .filter(|c| **c == ["projector event", "handler command", "gateway command"])
                .count();
            (complete >= 2).then(|| format!("{chains:?}"))
        }
    })
    .await;
    println!("traces: {chains}");
}
