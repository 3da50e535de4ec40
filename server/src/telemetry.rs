//! The server's tracing: log lines on stderr (`RUST_LOG`, default `info`), and with
//! `--otlp-endpoint URL` the spans exported as OpenTelemetry (OTLP over HTTP/protobuf, through
//! the hyper client tonic already brings; batches sent from a task on the server's runtime).
//!
//! A task's life is a chain of spans, each with the field `task` (its ID): `lease` (the
//! dispatch round's lease of it), `result` (its runner's result judged), `train` (the merge
//! train that takes it; its members as `tasks`) and `land` (its base move). An exported span
//! carries those fields as attributes, so a collector finds every step of a task by its ID.
//!
//! This module sits in the lowest layer: it names nothing of the crate.

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::Layer as _;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// The export of spans, when there is one: flushed and ended by [`Telemetry::shutdown`].
#[derive(Debug, Default)]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

/// Sets up the process's tracing: stderr, and the OTLP export to `otlp_traces_url` (the full
/// URL of the collector's traces endpoint) when given. Call from within the Tokio runtime.
pub fn init(otlp_traces_url: Option<&str>) -> Result<Telemetry, String> {
    // PostgreSQL's notices (`relation "_sqlx_migrations" already exists, skipping` at every
    // start) are the database's chatter, not the server's news: warnings and up only.
    let filter = || {
        EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| EnvFilter::new("info,sqlx::postgres::notice=warn"))
    };
    let stderr = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_filter(filter());
    let Some(url) = otlp_traces_url else {
        tracing_subscriber::registry().with(stderr).init();
        return Ok(Telemetry::default());
    };
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_endpoint(url)
        .build()
        .map_err(|e| format!("--otlp-endpoint {url}: cannot set up the exporter: {e}"))?;
    let batches =
        opentelemetry_sdk::trace::span_processor_with_async_runtime::BatchSpanProcessor::builder(
            exporter,
            opentelemetry_sdk::runtime::Tokio,
        )
        .build();
    let provider = SdkTracerProvider::builder()
        .with_span_processor(batches)
        .with_resource(
            opentelemetry_sdk::Resource::builder()
                .with_service_name("pipeline-server")
                .build(),
        )
        .build();
    let otel = tracing_opentelemetry::layer()
        .with_tracer(provider.tracer("pipeline-server"))
        .with_filter(filter());
    tracing_subscriber::registry()
        .with(stderr)
        .with(otel)
        .init();
    Ok(Telemetry {
        provider: Some(provider),
    })
}

impl Telemetry {
    /// Sends the spans not yet exported and ends the export (a bounded wait).
    pub fn shutdown(self) {
        if let Some(provider) = self.provider {
            if let Err(e) = provider.force_flush() {
                eprintln!("pipeline-server: exporting the last spans failed: {e}");
            }
            if let Err(e) = provider.shutdown() {
                eprintln!("pipeline-server: ending the span export failed: {e}");
            }
        }
    }
}
