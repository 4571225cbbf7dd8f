//! OpenTelemetry: metrics and traces over OTLP/HTTP (protobuf), for any OTLP backend (a
//! collector, Azure Monitor's OTLP ingestion, Grafana, Honeycomb...). The JSON audit and
//! `stats` lines stay the Azure-native path; this is the vendor-neutral one beside them.
//!
//! Off unless `OTEL_EXPORTER_OTLP_ENDPOINT` (or a signal's own `..._TRACES_ENDPOINT`,
//! `..._METRICS_ENDPOINT`) is set and `OTEL_SDK_DISABLED` is not `true`; off, nothing is built
//! and every reporting site is one branch on an `Option`. On, the SDK reads the rest of the
//! standard variables itself: `OTEL_EXPORTER_OTLP_HEADERS`, `OTEL_SERVICE_NAME` (default here
//! `token-broker`), `OTEL_RESOURCE_ATTRIBUTES`, `OTEL_METRIC_EXPORT_INTERVAL`,
//! `OTEL_BSP_SCHEDULE_DELAY`, `OTEL_TRACES_SAMPLER`, `OTEL_EXPORTER_OTLP_TIMEOUT`.
//!
//! The exports go out through a reqwest client like the broker's own (one HTTP and TLS stack;
//! the exporter crates' own clients are not compiled in). The SDK runs its exporters on threads
//! of its own, outside the async runtime, so each export is handed to the runtime it was built
//! in ([`RuntimeClient`]).
//!
//! What is named here never carries a secret: attributes are connection names, statuses,
//! outcomes and durations, and a request span's path (never its query, which may hold the
//! function key); tokens, assertions and credentials have no attribute at all.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use opentelemetry::KeyValue;
use opentelemetry::metrics::{Counter, Histogram, MeterProvider as _};
use opentelemetry::propagation::TextMapPropagator as _;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_http::{Bytes, HttpClient, HttpError, Request, Response};
use opentelemetry_otlp::{
    MetricExporter, Protocol, SpanExporter, WithExportConfig, WithHttpConfig,
};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::metrics::{PeriodicReader, SdkMeterProvider};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{BatchSpanProcessor, SdkTracerProvider};
use tracing_opentelemetry::OpenTelemetrySpanExt as _;

/// Bounds of the duration histograms, in seconds: the semantic conventions' advice for
/// `http.client.request.duration`, which fits token fetches too.
const DURATION_BOUNDS: [f64; 14] = [
    0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
];

/// The providers and the broker's instruments; see the module documentation.
pub struct Otel {
    meters: SdkMeterProvider,
    tracers: SdkTracerProvider,
    /// Whether spans are exported (an endpoint for traces is set): requests then get spans.
    traces: bool,
    requests: Counter<u64>,
    cache_lookups: Counter<u64>,
    fetches: Counter<u64>,
    fetch_duration: Histogram<f64>,
    holds: Counter<u64>,
    key_vault: Counter<u64>,
    invalidations: Counter<u64>,
    provider_duration: Histogram<f64>,
}

impl fmt::Debug for Otel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Otel")
    }
}

/// Which signals the environment asks for: `(metrics, traces)`, each on when the general
/// endpoint or its own is set, both off with `OTEL_SDK_DISABLED=true`.
pub fn requested(env: impl Fn(&str) -> Option<String>) -> (bool, bool) {
    let set = |name: &str| env(name).is_some_and(|value| !value.trim().is_empty());
    let disabled = env("OTEL_SDK_DISABLED").is_some_and(|v| v.trim().eq_ignore_ascii_case("true"));
    let general = !disabled && set("OTEL_EXPORTER_OTLP_ENDPOINT");
    (
        general || !disabled && set("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT"),
        general || !disabled && set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"),
    )
}

impl Otel {
    /// Builds the exporters from the standard variables when [`requested`]; `Ok(None)` when
    /// not. Must be called inside the async runtime the exports are to run on.
    pub fn from_env() -> Result<Option<Arc<Self>>, String> {
        let (metrics, traces) = requested(|name| std::env::var(name).ok());
        if !metrics && !traces {
            return Ok(None);
        }
        let http: Arc<dyn HttpClient> = Arc::new(RuntimeClient::new()?);
        let mut resource = Resource::builder();
        let named = std::env::var("OTEL_SERVICE_NAME").is_ok_and(|v| !v.trim().is_empty())
            || std::env::var("OTEL_RESOURCE_ATTRIBUTES").is_ok_and(|v| v.contains("service.name"));
        if !named {
            resource = resource.with_service_name("token-broker");
        }
        let resource = resource
            .with_attribute(KeyValue::new("service.version", env!("CARGO_PKG_VERSION")))
            .build();
        // Only the signals asked for: an exporter without an endpoint would send to localhost.
        let mut meters = SdkMeterProvider::builder().with_resource(resource.clone());
        if metrics {
            let exporter = MetricExporter::builder()
                .with_http()
                .with_protocol(Protocol::HttpBinary)
                .with_shared_http_client(http.clone())
                .build()
                .map_err(|error| format!("OTLP metric exporter: {error}"))?;
            meters = meters.with_reader(PeriodicReader::builder(exporter).build());
        }
        let meters = meters.build();
        let mut tracers = SdkTracerProvider::builder().with_resource(resource);
        if traces {
            let exporter = SpanExporter::builder()
                .with_http()
                .with_protocol(Protocol::HttpBinary)
                .with_shared_http_client(http)
                .build()
                .map_err(|error| format!("OTLP span exporter: {error}"))?;
            tracers = tracers.with_span_processor(BatchSpanProcessor::builder(exporter).build());
        }
        let tracers = tracers.build();
        let meter = meters.meter("token-broker");
        let duration = |name: &'static str, description: &'static str| {
            meter
                .f64_histogram(name)
                .with_unit("s")
                .with_description(description)
                .with_boundaries(DURATION_BOUNDS.to_vec())
                .build()
        };
        let counter = |name: &'static str, description: &'static str| {
            meter
                .u64_counter(name)
                .with_unit("{request}")
                .with_description(description)
                .build()
        };
        Ok(Some(Arc::new(Self {
            requests: counter(
                "token_broker.requests",
                "Requests answered, by connection and HTTP status",
            ),
            cache_lookups: counter(
                "token_broker.cache.lookups",
                "Cache look-ups, by tier (memory, shared) and outcome",
            ),
            fetches: counter(
                "token_broker.token.fetches",
                "Token fetches from the identity provider, by connection and result",
            ),
            fetch_duration: duration(
                "token_broker.token.fetch.duration",
                "How long a token fetch took (credential, attempts, backoff)",
            ),
            holds: counter(
                "token_broker.provider.holds",
                "Token fetches answered from a provider hold without asking the provider",
            ),
            key_vault: counter(
                "token_broker.key_vault.operations",
                "Key Vault operations, by kind and result",
            ),
            invalidations: counter(
                "token_broker.invalidations",
                "Invalidation requests, by connection and result",
            ),
            provider_duration: duration(
                "http.client.request.duration",
                "Duration of HTTP client requests to token endpoints",
            ),
            meters,
            tracers,
            traces,
        })))
    }

    /// Whether spans are exported: requests then get a span each, and fetches run in the
    /// span of the request that started them.
    pub fn traces(&self) -> bool {
        self.traces
    }

    /// The `tracing` layer that exports the broker's spans (its own, INFO and up, whatever
    /// `RUST_LOG` says of the log lines), for `telemetry::init`; `None` when traces are not
    /// exported. Spans only: log events inside them are not exported as span events, since
    /// their fields (a provider's own error text, Key Vault's error details) are for the
    /// broker's log, not for a third-party backend.
    pub fn layer(&self) -> Option<super::telemetry::TraceLayer> {
        use tracing_subscriber::Layer as _;
        if !self.traces {
            return None;
        }
        let layer = tracing_opentelemetry::layer()
            .with_tracer(self.tracers.tracer("token-broker"))
            .with_location(false)
            .with_threads(false)
            .with_tracked_inactivity(false)
            .with_filter(tracing_subscriber::filter::filter_fn(|metadata| {
                metadata.is_span()
                    && *metadata.level() <= tracing::Level::INFO
                    && metadata.target().starts_with("token_broker")
            }));
        Some(Box::new(layer))
    }

    /// Exports what is left and stops the exporters. Blocks: call it off the async workers
    /// (`spawn_blocking`), while the runtime still runs (the exports are sent on it).
    pub fn shutdown(&self) {
        if let Err(error) = self.tracers.shutdown() {
            tracing::warn!(%error, "OpenTelemetry traces not flushed at shutdown");
        }
        if let Err(error) = self.meters.shutdown() {
            tracing::warn!(%error, "OpenTelemetry metrics not flushed at shutdown");
        }
    }

    /// A request answered: its route template, connection (when it names a configured one)
    /// and status.
    pub fn request(&self, route: &'static str, connection: Option<&str>, status: u16) {
        let mut attributes = Vec::with_capacity(3);
        attributes.push(KeyValue::new("http.route", route));
        attributes.push(KeyValue::new(
            "http.response.status_code",
            i64::from(status),
        ));
        if let Some(connection) = connection {
            attributes.push(KeyValue::new("connection", connection.to_string()));
        }
        self.requests.add(1, &attributes);
    }

    /// A cache look-up in `tier` (`memory`, `shared`) with `outcome` (`hit`, `stale`, `miss`,
    /// `joined`).
    pub fn cache_lookup(&self, tier: &'static str, outcome: &'static str) {
        self.cache_lookups.add(
            1,
            &[
                KeyValue::new("tier", tier),
                KeyValue::new("outcome", outcome),
            ],
        );
    }

    /// A token fetch of `connection` ended with `result` after `elapsed`.
    pub fn fetch(&self, connection: &str, result: &'static str, elapsed: Duration) {
        let attributes = [
            KeyValue::new("connection", connection.to_string()),
            KeyValue::new("result", result),
        ];
        self.fetches.add(1, &attributes);
        self.fetch_duration
            .record(elapsed.as_secs_f64(), &attributes);
    }

    /// A request answered from a provider hold (`kind`: `retry_after`, `circuit_open`,
    /// `rejected`) that this instance or the fleet (`scope`) holds.
    pub fn hold(&self, connection: &str, kind: &'static str, scope: &'static str) {
        self.holds.add(
            1,
            &[
                KeyValue::new("connection", connection.to_string()),
                KeyValue::new("kind", kind),
                KeyValue::new("scope", scope),
            ],
        );
    }

    /// A Key Vault operation (`get_secret`, `get_key`, `get_certificate`, `sign`) ended with
    /// `result` (`ok`, `error`).
    pub fn key_vault(&self, operation: &'static str, result: &'static str) {
        self.key_vault.add(
            1,
            &[
                KeyValue::new("operation", operation),
                KeyValue::new("result", result),
            ],
        );
    }

    /// An invalidation of `connection` ended with `result` (`invalidated`, `not_current`,
    /// `too_soon`).
    pub fn invalidation(&self, connection: &str, result: &'static str) {
        self.invalidations.add(
            1,
            &[
                KeyValue::new("connection", connection.to_string()),
                KeyValue::new("result", result),
            ],
        );
    }

    /// One HTTP request to a token endpoint at `server`: its status, or the `error_type` when
    /// none came back (semantic conventions' `http.client.request.duration`).
    pub fn provider_call(
        &self,
        server: &str,
        port: Option<u16>,
        status: Option<u16>,
        error_type: Option<&'static str>,
        elapsed: Duration,
    ) {
        let mut attributes = vec![
            KeyValue::new("http.request.method", "POST"),
            KeyValue::new("server.address", server.to_string()),
        ];
        if let Some(port) = port {
            attributes.push(KeyValue::new("server.port", i64::from(port)));
        }
        if let Some(status) = status {
            attributes.push(KeyValue::new(
                "http.response.status_code",
                i64::from(status),
            ));
        }
        if let Some(error_type) = error_type {
            attributes.push(KeyValue::new("error.type", error_type));
        }
        self.provider_duration
            .record(elapsed.as_secs_f64(), &attributes);
    }
}

/// Makes `span` continue the caller's trace when the request carries a W3C `traceparent`
/// (and `tracestate`); does nothing without one, or when spans are not exported.
pub fn continue_trace(span: &tracing::Span, headers: &http::HeaderMap) {
    if !headers.contains_key("traceparent") {
        return;
    }
    let context =
        TraceContextPropagator::new().extract(&opentelemetry_http::HeaderExtractor(headers));
    let _ = span.set_parent(context);
}

/// The SDK's HTTP client: a reqwest client whose requests run on the async runtime that was
/// current when it was made (the SDK's export threads have none of their own).
struct RuntimeClient {
    client: reqwest::Client,
    runtime: tokio::runtime::Handle,
}

impl fmt::Debug for RuntimeClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("RuntimeClient")
    }
}

impl RuntimeClient {
    fn new() -> Result<Self, String> {
        let runtime = tokio::runtime::Handle::try_current()
            .map_err(|_| "OpenTelemetry must be set up inside the async runtime".to_string())?;
        let client = reqwest::Client::builder()
            .user_agent(concat!("token-broker/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(10))
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|error| format!("OTLP HTTP client: {error}"))?;
        Ok(Self { client, runtime })
    }
}

#[async_trait::async_trait]
impl HttpClient for RuntimeClient {
    async fn send_bytes(&self, request: Request<Bytes>) -> Result<Response<Bytes>, HttpError> {
        let client = self.client.clone();
        let send = async move {
            let request = reqwest::Request::try_from(request)?;
            let answer = client.execute(request).await?;
            let status = answer.status();
            let headers = answer.headers().clone();
            let body = answer.bytes().await?;
            let mut response = Response::new(body);
            *response.status_mut() = status;
            *response.headers_mut() = headers;
            Ok::<_, HttpError>(response)
        };
        self.runtime
            .spawn(send)
            .await
            .map_err(|error| Box::new(error) as HttpError)?
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_endpoint_turns_its_signals_on_and_the_sdk_switch_turns_them_off() {
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |name: &str| {
                pairs
                    .iter()
                    .find(|(key, _)| *key == name)
                    .map(|(_, value)| value.to_string())
            }
        };
        assert_eq!(requested(env(&[])), (false, false));
        assert_eq!(
            requested(env(&[("OTEL_SERVICE_NAME", "x")])),
            (false, false)
        );
        assert_eq!(
            requested(env(&[("OTEL_EXPORTER_OTLP_ENDPOINT", " ")])),
            (false, false)
        );
        assert_eq!(
            requested(env(&[("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318")])),
            (true, true)
        );
        assert_eq!(
            requested(env(&[(
                "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
                "http://c:4318/v1/traces"
            )])),
            (false, true),
            "a signal's own endpoint turns on that signal only"
        );
        assert_eq!(
            requested(env(&[(
                "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT",
                "http://c:4318/v1/metrics"
            )])),
            (true, false)
        );
        assert_eq!(
            requested(env(&[
                ("OTEL_EXPORTER_OTLP_ENDPOINT", "http://c:4318"),
                ("OTEL_SDK_DISABLED", "TRUE")
            ])),
            (false, false)
        );
    }
}
