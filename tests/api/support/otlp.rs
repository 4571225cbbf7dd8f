//! A small OTLP/HTTP receiver: takes what the broker exports to `/v1/metrics` and
//! `/v1/traces` (protobuf), keeps the raw bodies (for the leak scan) and the headers, and
//! decodes them with the OpenTelemetry protocol's own generated types.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
use prost::Message;

/// One export as it arrived.
#[derive(Clone)]
pub struct Export {
    pub path: String,
    pub content_type: String,
    pub headers: HeaderMap,
    pub body: Vec<u8>,
}

/// A span as the receiver decoded it.
#[derive(Clone, Debug)]
pub struct ReceivedSpan {
    pub name: String,
    pub trace_id: String,
    pub span_id: String,
    pub parent_span_id: String,
    pub kind: i32,
    pub attributes: Vec<(String, String)>,
    /// Events recorded in the span (log lines inside it, were they exported).
    pub events: usize,
}

impl ReceivedSpan {
    pub fn attribute(&self, name: &str) -> Option<&str> {
        self.attributes
            .iter()
            .find(|(key, _)| key == name)
            .map(|(_, value)| value.as_str())
    }
}

/// A data point of a metric: its attributes, and its value (a sum's value, a histogram's
/// count).
#[derive(Clone, Debug)]
pub struct ReceivedPoint {
    pub metric: String,
    pub attributes: Vec<(String, String)>,
    pub value: f64,
}

impl ReceivedPoint {
    pub fn attribute(&self, name: &str) -> Option<&str> {
        self.attributes
            .iter()
            .find(|(key, _)| key == name)
            .map(|(_, value)| value.as_str())
    }
}

/// The running receiver; dropping it stops it.
pub struct OtlpReceiver {
    pub endpoint: String,
    exports: Arc<Mutex<Vec<Export>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for OtlpReceiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn receive(
    State(exports): State<Arc<Mutex<Vec<Export>>>>,
    uri: axum::http::Uri,
    headers: HeaderMap,
    body: Bytes,
) -> (StatusCode, Vec<u8>) {
    let content_type = headers
        .get("content-type")
        .and_then(|value| value.to_str().ok())
        .unwrap_or_default()
        .to_string();
    exports.lock().unwrap().push(Export {
        path: uri.path().to_string(),
        content_type,
        headers,
        body: body.to_vec(),
    });
    // An empty Export*ServiceResponse: full success.
    (StatusCode::OK, Vec::new())
}

fn text(value: &Option<AnyValue>) -> String {
    match value.as_ref().and_then(|value| value.value.as_ref()) {
        Some(any_value::Value::StringValue(text)) => text.clone(),
        Some(any_value::Value::IntValue(number)) => number.to_string(),
        Some(any_value::Value::BoolValue(flag)) => flag.to_string(),
        Some(any_value::Value::DoubleValue(number)) => number.to_string(),
        Some(other) => format!("{other:?}"),
        None => String::new(),
    }
}

fn pairs(attributes: &[KeyValue]) -> Vec<(String, String)> {
    attributes
        .iter()
        .map(|kv| (kv.key.clone(), text(&kv.value)))
        .collect()
}

impl OtlpReceiver {
    pub async fn start() -> OtlpReceiver {
        let exports: Arc<Mutex<Vec<Export>>> = Arc::default();
        let app = axum::Router::new()
            .route("/v1/metrics", post(receive))
            .route("/v1/traces", post(receive))
            .with_state(exports.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        OtlpReceiver {
            endpoint: format!("http://{address}"),
            exports,
            task,
        }
    }

    pub fn exports(&self) -> Vec<Export> {
        self.exports.lock().unwrap().clone()
    }

    /// Every span received so far.
    pub fn spans(&self) -> Vec<ReceivedSpan> {
        let mut spans = Vec::new();
        for export in self.exports().iter().filter(|e| e.path == "/v1/traces") {
            let request = ExportTraceServiceRequest::decode(export.body.as_slice())
                .expect("a protobuf ExportTraceServiceRequest");
            for resource in &request.resource_spans {
                for scope in &resource.scope_spans {
                    for span in &scope.spans {
                        spans.push(ReceivedSpan {
                            name: span.name.clone(),
                            trace_id: hex::encode(&span.trace_id),
                            span_id: hex::encode(&span.span_id),
                            parent_span_id: hex::encode(&span.parent_span_id),
                            kind: span.kind,
                            attributes: pairs(&span.attributes),
                            events: span.events.len(),
                        });
                    }
                }
            }
        }
        spans
    }

    /// Every metric data point received so far, and each export's resource attributes.
    pub fn points(&self) -> (Vec<ReceivedPoint>, Vec<Vec<(String, String)>>) {
        use opentelemetry_proto::tonic::metrics::v1::{metric::Data, number_data_point};
        let mut points = Vec::new();
        let mut resources = Vec::new();
        for export in self.exports().iter().filter(|e| e.path == "/v1/metrics") {
            let request = ExportMetricsServiceRequest::decode(export.body.as_slice())
                .expect("a protobuf ExportMetricsServiceRequest");
            for resource in &request.resource_metrics {
                resources.push(
                    resource
                        .resource
                        .as_ref()
                        .map(|r| pairs(&r.attributes))
                        .unwrap_or_default(),
                );
                for scope in &resource.scope_metrics {
                    for metric in &scope.metrics {
                        let mut add = |attributes: &[KeyValue], value: f64| {
                            points.push(ReceivedPoint {
                                metric: metric.name.clone(),
                                attributes: pairs(attributes),
                                value,
                            })
                        };
                        match &metric.data {
                            Some(Data::Sum(sum)) => {
                                for point in &sum.data_points {
                                    let value = match point.value {
                                        Some(number_data_point::Value::AsInt(n)) => n as f64,
                                        Some(number_data_point::Value::AsDouble(n)) => n,
                                        None => 0.0,
                                    };
                                    add(&point.attributes, value);
                                }
                            }
                            Some(Data::Histogram(histogram)) => {
                                for point in &histogram.data_points {
                                    add(&point.attributes, point.count as f64);
                                }
                            }
                            _ => {}
                        }
                    }
                }
            }
        }
        (points, resources)
    }

    /// Waits until `ready` holds for what was received, at most `within`.
    pub async fn wait_for(&self, within: Duration, ready: impl Fn(&OtlpReceiver) -> bool) -> bool {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            if ready(self) {
                return true;
            }
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}
