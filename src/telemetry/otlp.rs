//! The relay's own spans, exported over OTLP/HTTP (protobuf) when `[telemetry] otlp_endpoint`
//! is set: one PRODUCER span per published row ([`PublishSpan`]), a child of the producer's
//! trace context, with OpenTelemetry's messaging attributes. Must never slow or stop delivery:
//! an ended span goes into a bounded queue without waiting, and one exporter thread (its own
//! runtime, its own CPU) sends the queue in batches; a span the full queue has no room for, or
//! that the collector does not take (down, slow, refusing), is dropped and counted
//! ([`dropped_spans`]), never retried beyond the exporter's own timeout, never waited for. At
//! exit [`shutdown`] sends what is queued within a bound. With export off nothing here runs:
//! [`spans`] is None and the relay makes no span and allocates nothing for one.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, SystemTime};

use anyhow::Context as _;
use opentelemetry::trace::{
    Span as _, SpanContext, SpanId, SpanKind, Status, TraceContextExt, TraceFlags, TraceId,
    TraceState, Tracer as _, TracerProvider as _,
};
use opentelemetry::{Context, KeyValue};
use opentelemetry_otlp::{Protocol, WithExportConfig};
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::{
    SdkTracer, SdkTracerProvider, SpanData, SpanExporter as _, SpanProcessor,
};
use opentelemetry_sdk::Resource;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::message::{OutboundMessage, OutboxRow};

/// Ended spans the queue holds at most (a few hundred bytes to a few KiB each): about four
/// seconds of a relay publishing 1000 rows a second while the collector is away, and a bounded
/// few MiB of memory whatever the collector does.
const QUEUE_SPANS: usize = 4096;

/// Spans sent in one request at most (the SDK's default batch size).
const BATCH_SPANS: usize = 512;

/// How long a batch that is not full waits for more spans before it is sent.
const BATCH_DELAY: Duration = Duration::from_secs(1);

/// How long the process waits at exit for the queued spans to be sent (see [`shutdown`]).
pub const EXIT_FLUSH: Duration = Duration::from_secs(2);

/// Spans dropped: the queue was full, or the collector did not take the batch.
static DROPPED: AtomicU64 = AtomicU64::new(0);

/// The publish spans' factory, once export has started (see [`start`]).
static SPANS: OnceLock<PublishSpans> = OnceLock::new();

/// The exporter thread's stop signal and its word that it is done, for [`shutdown`].
static EXPORTER: Mutex<Option<ExporterThread>> = Mutex::new(None);

struct ExporterThread {
    stop: CancellationToken,
    done: std::sync::mpsc::Receiver<()>,
}

/// How many spans were dropped since the process started (not retried): the queue was full,
/// or the collector was down, slow or refused them.
pub fn dropped_spans() -> u64 {
    DROPPED.load(Ordering::Relaxed)
}

/// The factory of publish spans while export is on; None (the relay makes no span) when off.
pub fn spans() -> Option<&'static PublishSpans> {
    SPANS.get()
}

/// Starts exporting to `traces_url` (the resolved `telemetry.traces_url`): the tracer the
/// relays start their spans with, and the exporter thread. Once per process; a second call
/// does nothing. Fails only when the exporter cannot be built or its thread cannot start.
pub fn start(traces_url: &str) -> anyhow::Result<()> {
    if SPANS.get().is_some() {
        return Ok(());
    }
    let resource = resource();
    // The exporter's HTTP client (hyper's) needs a Tokio runtime: the thread's own, so the
    // encoding and the requests never take the relay's time.
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the span exporter's runtime")?;
    let mut exporter = {
        let _entered = runtime.enter();
        opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_protocol(Protocol::HttpBinary)
            .with_endpoint(traces_url)
            .build()
            .context("building the OTLP span exporter")?
    };
    exporter.set_resource(&resource);
    let (queue, mut spans) = mpsc::channel::<SpanData>(QUEUE_SPANS);
    let stop = CancellationToken::new();
    let (done_tx, done) = std::sync::mpsc::channel();
    let stopping = stop.clone();
    let url = traces_url.to_owned();
    std::thread::Builder::new()
        .name("otlp exporter".into())
        .spawn(move || {
            runtime.block_on(async move {
                let mut failing = false;
                let mut batch = Vec::with_capacity(BATCH_SPANS);
                loop {
                    tokio::select! {
                        n = spans.recv_many(&mut batch, BATCH_SPANS) => if n == 0 { break },
                        _ = stopping.cancelled() => break,
                    }
                    let deadline = tokio::time::Instant::now() + BATCH_DELAY;
                    while batch.len() < BATCH_SPANS {
                        let room = BATCH_SPANS - batch.len();
                        tokio::select! {
                            n = spans.recv_many(&mut batch, room) => if n == 0 { break },
                            _ = tokio::time::sleep_until(deadline) => break,
                            _ = stopping.cancelled() => break,
                        }
                    }
                    export(&exporter, &mut batch, &url, &mut failing).await;
                    if stopping.is_cancelled() {
                        break;
                    }
                }
                // Stopping: what is queued goes out, as long as `shutdown` waits for it.
                while !spans.is_empty() || !batch.is_empty() {
                    while batch.len() < BATCH_SPANS {
                        match spans.try_recv() {
                            Ok(span) => batch.push(span),
                            Err(_) => break,
                        }
                    }
                    export(&exporter, &mut batch, &url, &mut failing).await;
                }
                let _ = done_tx.send(());
            })
        })
        .context("starting the span exporter's thread")?;
    let provider = SdkTracerProvider::builder()
        .with_resource(resource)
        .with_span_processor(Queue { queue })
        .build();
    let tracer = provider.tracer("outbox-relay");
    *EXPORTER.lock().unwrap_or_else(|e| e.into_inner()) = Some(ExporterThread { stop, done });
    let _ = SPANS.set(PublishSpans {
        tracer,
        _provider: provider,
    });
    tracing::info!(
        url = traces_url,
        "exporting the relay's spans over OTLP/HTTP"
    );
    Ok(())
}

/// Sends one batch (emptying it); a batch the collector does not take is dropped and counted,
/// and logged once per outage.
async fn export(
    exporter: &opentelemetry_otlp::SpanExporter,
    batch: &mut Vec<SpanData>,
    url: &str,
    failing: &mut bool,
) {
    if batch.is_empty() {
        return;
    }
    let spans = std::mem::take(batch);
    let n = spans.len() as u64;
    match exporter.export(spans).await {
        Ok(()) => {
            if std::mem::take(failing) {
                tracing::info!(url, "the OTLP collector takes the relay's spans again");
            }
        }
        Err(e) => {
            DROPPED.fetch_add(n, Ordering::Relaxed);
            if !std::mem::replace(failing, true) {
                tracing::warn!(url, error = %e, "the OTLP collector did not take the relay's spans; they are dropped and counted (outbox_relay_spans_dropped_total) until it does");
            }
        }
    }
    *batch = Vec::with_capacity(BATCH_SPANS);
}

/// Stops the exporter and waits, for at most `within`, until the spans queued so far are sent
/// (or refused): a collector that does not answer cannot hold the exit up for longer. Spans
/// still queued then are lost with the process. Does nothing when export is off.
pub fn shutdown(within: Duration) {
    let thread = EXPORTER.lock().unwrap_or_else(|e| e.into_inner()).take();
    if let Some(thread) = thread {
        thread.stop.cancel();
        let _ = thread.done.recv_timeout(within);
    }
}

/// The resource the spans are reported under: `service.name` from `OTEL_SERVICE_NAME` (or
/// `OTEL_RESOURCE_ATTRIBUTES`), else `outbox-relay`; `service.version` the relay's.
fn resource() -> Resource {
    let named_by_env = std::env::var("OTEL_SERVICE_NAME").is_ok_and(|v| !v.trim().is_empty())
        || std::env::var("OTEL_RESOURCE_ATTRIBUTES").is_ok_and(|v| {
            v.split(',')
                .any(|kv| kv.trim().starts_with("service.name="))
        });
    let builder = Resource::builder()
        .with_attribute(KeyValue::new("service.version", env!("CARGO_PKG_VERSION")));
    if named_by_env {
        builder.build()
    } else {
        builder.with_service_name("outbox-relay").build()
    }
}

/// The SDK's span processor: an ended (sampled) span into the queue, never waiting.
#[derive(Debug)]
struct Queue {
    queue: mpsc::Sender<SpanData>,
}

impl SpanProcessor for Queue {
    fn on_start(&self, _span: &mut opentelemetry_sdk::trace::Span, _cx: &Context) {}

    fn on_end(&self, span: SpanData) {
        if !span.span_context.is_sampled() {
            return;
        }
        // Full: the collector has not kept up with the last QUEUE_SPANS spans. Closed: the
        // exporter has stopped (at exit).
        if self.queue.try_send(span).is_err() {
            DROPPED.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn force_flush(&self) -> OTelSdkResult {
        Ok(())
    }

    fn shutdown_with_timeout(&self, _timeout: Duration) -> OTelSdkResult {
        Ok(())
    }
}

/// Makes the publish spans of every table.
pub struct PublishSpans {
    tracer: SdkTracer,
    /// Kept so that the tracer's provider lives as long as the process.
    _provider: SdkTracerProvider,
}

impl std::fmt::Debug for PublishSpans {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PublishSpans")
    }
}

impl PublishSpans {
    /// Starts the span of `row`'s publish, now: a child of `producer` (the row's valid
    /// `traceparent` and its `tracestate`), or the root of a new trace when the row has none.
    pub fn start(
        &self,
        row: &OutboxRow,
        table: &str,
        producer: Option<(&str, Option<&str>)>,
    ) -> PublishSpan {
        let parent = match producer.and_then(|(tp, ts)| remote_context(tp, ts)) {
            Some(context) => Context::new().with_remote_span_context(context),
            None => Context::new(),
        };
        let now = SystemTime::now();
        let waited = now
            .duration_since(SystemTime::from(row.created_at))
            .unwrap_or_default();
        let span = self
            .tracer
            .span_builder("publish")
            .with_kind(SpanKind::Producer)
            .with_start_time(now)
            .with_attributes(vec![
                KeyValue::new("messaging.system", "rabbitmq"),
                KeyValue::new("messaging.operation.type", "publish"),
                KeyValue::new("messaging.operation.name", "publish"),
                KeyValue::new("messaging.message.id", row.dedup_key.clone()),
                KeyValue::new("outbox.table", table.to_owned()),
                KeyValue::new("outbox.row_id", row.id),
                KeyValue::new("outbox.ordering_key", row.ordering_key.clone()),
                KeyValue::new("outbox.attempt", i64::from(row.attempts.max(0)) + 1),
                KeyValue::new("outbox.wait_ms", waited.as_millis() as i64),
            ])
            .start_with_context(&self.tracer, &parent);
        let context = span.span_context();
        let traceparent = format!(
            "00-{}-{}-{:02x}",
            context.trace_id(),
            context.span_id(),
            context.trace_flags().to_u8()
        );
        PublishSpan { span, traceparent }
    }
}

/// The producer's span context from a valid `traceparent` (see
/// `crate::message::is_valid_traceparent`) and its `tracestate` (an invalid one is left out).
fn remote_context(traceparent: &str, tracestate: Option<&str>) -> Option<SpanContext> {
    let trace_id = TraceId::from_hex(traceparent.get(3..35)?).ok()?;
    let span_id = SpanId::from_hex(traceparent.get(36..52)?).ok()?;
    let flags = u8::from_str_radix(traceparent.get(53..55)?, 16).ok()?;
    let state = tracestate
        .and_then(|s| s.parse::<TraceState>().ok())
        .unwrap_or_default();
    Some(SpanContext::new(
        trace_id,
        span_id,
        TraceFlags::new(flags),
        true,
        state,
    ))
}

/// One row's publish span, from the publish to the broker's answer. Dropped without an answer
/// (the connection was lost, the window cleared), it ends where it is dropped.
pub struct PublishSpan {
    span: opentelemetry_sdk::trace::Span,
    traceparent: String,
}

impl PublishSpan {
    /// The `traceparent` the message carries: the producer's trace id and flags, this span as
    /// the parent the consumer continues from.
    pub fn traceparent(&self) -> &str {
        &self.traceparent
    }

    /// Names the span after its destination and adds what the message says.
    pub fn published(&mut self, message: &OutboundMessage) {
        let destination = if message.exchange.is_empty() {
            // The semantic conventions' name of RabbitMQ's default exchange.
            "amq.default"
        } else {
            message.exchange.as_str()
        };
        self.span.update_name(format!("publish {destination}"));
        self.span.set_attributes([
            KeyValue::new("messaging.destination.name", destination.to_owned()),
            KeyValue::new(
                "messaging.rabbitmq.destination.routing_key",
                message.routing_key.clone(),
            ),
            KeyValue::new("messaging.message.body.size", message.body.len() as i64),
        ]);
    }

    /// The broker confirmed the message: an event, and the span ends.
    pub fn confirmed(mut self) {
        let now = SystemTime::now();
        self.span
            .add_event_with_timestamp("confirmed", now, Vec::new());
        self.span.end_with_timestamp(now);
    }

    /// The row failed (refused by the broker, or unpublishable): the span ends in error with
    /// the reason, and an event that says what happens to the row: sent again after
    /// `retry_after`, or parked (None).
    pub fn failed(mut self, reason: &str, retry_after: Option<Duration>) {
        match retry_after {
            Some(delay) => self.span.add_event(
                "retry scheduled",
                vec![KeyValue::new(
                    "outbox.retry_after_ms",
                    delay.as_millis() as i64,
                )],
            ),
            None => self.span.add_event("parked", Vec::new()),
        }
        self.span.set_status(Status::error(reason.to_owned()));
        self.span.end();
    }

    /// Nothing is known of the message (the connection or channel failed, or the broker
    /// nacked it): it goes out again with the same `message_id`, attempts unchanged.
    pub fn lost(mut self, reason: &str) {
        self.span.add_event(
            "sent again later",
            vec![KeyValue::new("exception.message", reason.to_owned())],
        );
        self.span.set_status(Status::error(reason.to_owned()));
        self.span.end();
    }
}
