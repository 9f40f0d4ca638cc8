//! The relay's own spans over OTLP (`[telemetry] otlp_endpoint`): a real OTLP/HTTP receiver
//! started by the test decodes what the relay exports with the OpenTelemetry project's protobuf
//! definitions. The publish span is a child of the producer's span, carries the messaging
//! attributes, and is the parent the consumer's message names; a collector that is down does
//! not stop delivery; a bad endpoint exits 78 naming the key or the variable.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use opentelemetry_proto::tonic::trace::v1::status::StatusCode;
use opentelemetry_proto::tonic::trace::v1::Span;
use outbox_relay_testkit::prelude::*;
use prost::Message as _;
use serde_json::json;

const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const PRODUCER_SPAN: &str = "00f067aa0ba902b7";

/// A span as the receiver got it, with the resource's `service.name`.
#[derive(Debug, Clone)]
struct Exported {
    service: Option<String>,
    span: Span,
}

impl Exported {
    fn attribute(&self, key: &str) -> Option<Value> {
        self.span
            .attributes
            .iter()
            .find(|kv| kv.key == key)
            .and_then(|kv| kv.value.as_ref())
            .and_then(|v| v.value.clone())
    }

    fn string(&self, key: &str) -> Option<String> {
        match self.attribute(key) {
            Some(Value::StringValue(s)) => Some(s),
            _ => None,
        }
    }

    fn int(&self, key: &str) -> Option<i64> {
        match self.attribute(key) {
            Some(Value::IntValue(n)) => Some(n),
            _ => None,
        }
    }
}

/// An OTLP/HTTP receiver on a loopback port: `POST /v1/traces` with a protobuf body, decoded
/// and kept.
struct Receiver {
    addr: SocketAddr,
    spans: Arc<Mutex<Vec<Exported>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Receiver {
    async fn start() -> Receiver {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the receiver");
        let addr = listener.local_addr().unwrap();
        let spans = Arc::new(Mutex::new(Vec::new()));
        let kept = spans.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let kept = kept.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |request: Request<Incoming>| {
                        let kept = kept.clone();
                        async move { Ok::<_, hyper::Error>(receive(request, &kept).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Receiver { addr, spans, task }
    }

    fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn spans(&self) -> Vec<Exported> {
        self.spans.lock().unwrap().clone()
    }

    /// The span of the message `message_id`, once it arrived.
    async fn span_of(&self, message_id: &str) -> Exported {
        let find = || {
            self.spans()
                .into_iter()
                .find(|s| s.string("messaging.message.id").as_deref() == Some(message_id))
        };
        eventually(&format!("the publish span of {message_id}"), || async {
            find().is_some()
        })
        .await;
        find().unwrap()
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn receive(request: Request<Incoming>, kept: &Mutex<Vec<Exported>>) -> Response<Full<Bytes>> {
    let status = |code: u16| {
        Response::builder()
            .status(code)
            .body(Full::new(Bytes::new()))
            .unwrap()
    };
    if request.method() != hyper::Method::POST || request.uri().path() != "/v1/traces" {
        return status(404);
    }
    if request
        .headers()
        .get("content-type")
        .is_none_or(|t| t != "application/x-protobuf")
    {
        return status(415);
    }
    let Ok(body) = request.into_body().collect().await else {
        return status(400);
    };
    let Ok(decoded) = ExportTraceServiceRequest::decode(body.to_bytes()) else {
        return status(400);
    };
    let mut spans = kept.lock().unwrap();
    for resource_spans in decoded.resource_spans {
        let service = resource_spans.resource.as_ref().and_then(|r| {
            r.attributes
                .iter()
                .find(|kv| kv.key == "service.name")
                .and_then(|kv| match kv.value.as_ref()?.value.as_ref()? {
                    Value::StringValue(s) => Some(s.clone()),
                    _ => None,
                })
        });
        for scope in resource_spans.scope_spans {
            for span in scope.spans {
                spans.push(Exported {
                    service: service.clone(),
                    span,
                });
            }
        }
    }
    Response::builder()
        .status(200)
        .header("content-type", "application/x-protobuf")
        .body(Full::new(Bytes::from(
            ExportTraceServiceResponse::default().encode_to_vec(),
        )))
        .unwrap()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn append_config(env: &TestEnv, text: &str) {
    let mut config = std::fs::read_to_string(&env.config_path).expect("read the config");
    config += text;
    std::fs::write(&env.config_path, config).expect("write the config");
}

/// The message of `message_id`, once it arrived.
async fn message(env: &TestEnv, message_id: &str) -> Received {
    env.consumer
        .wait_for_id(message_id)
        .await
        .into_iter()
        .find(|m| m.message_id == message_id)
        .expect("the row's message")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_publish_span_is_a_child_of_the_producers_span_and_the_parent_the_consumer_receives() {
    let receiver = Receiver::start().await;
    let env = TestEnv::new(Setup::new()).await;
    append_config(
        &env,
        &format!(
            "\n[telemetry]\notlp_endpoint = \"{}\"\n",
            receiver.endpoint()
        ),
    );
    let _relay = env.start_relay();
    env.insert(&[
        NewRow::new("traced", "k1").headers(json!({
            "traceparent": format!("00-{TRACE_ID}-{PRODUCER_SPAN}-01"),
            "tracestate": "rojo=00f067aa0ba902b7,congo=t61rcWkgMzE",
            "baggage": "userId=alice",
        })),
        NewRow::new("untraced", "k2"),
        NewRow::new("refused", "k3").exchange("no-such-exchange"),
    ])
    .await;

    let m = message(&env, "traced").await;
    let s = receiver.span_of("traced").await;
    // A child of the producer's span, in the producer's trace.
    assert_eq!(hex(&s.span.trace_id), TRACE_ID);
    assert_eq!(hex(&s.span.parent_span_id), PRODUCER_SPAN);
    assert_eq!(s.span.kind, SpanKind::Producer as i32);
    assert_eq!(s.span.name, format!("publish {}", env.exchange));
    assert_eq!(s.service.as_deref(), Some("outbox-relay"));
    // OpenTelemetry's messaging attributes.
    assert_eq!(s.string("messaging.system").as_deref(), Some("rabbitmq"));
    assert_eq!(
        s.string("messaging.operation.type").as_deref(),
        Some("publish")
    );
    assert_eq!(
        s.string("messaging.operation.name").as_deref(),
        Some("publish")
    );
    assert_eq!(
        s.string("messaging.destination.name").as_deref(),
        Some(env.exchange.as_str())
    );
    assert_eq!(
        s.string("messaging.rabbitmq.destination.routing_key")
            .as_deref(),
        Some("test.k1")
    );
    assert_eq!(s.string("messaging.message.id").as_deref(), Some("traced"));
    assert_eq!(
        s.string("outbox.table").as_deref(),
        Some(env.table.as_str())
    );
    assert_eq!(s.int("outbox.attempt"), Some(1));
    assert!(s.int("outbox.wait_ms").is_some_and(|ms| ms >= 0), "{s:?}");
    // Ended by the broker's confirm, not in error.
    assert!(s.span.events.iter().any(|e| e.name == "confirmed"), "{s:?}");
    assert_ne!(
        s.span.status.as_ref().map(|st| st.code),
        Some(StatusCode::Error as i32)
    );
    assert!(s.span.end_time_unix_nano >= s.span.start_time_unix_nano);
    // The consumer continues from the relay's span: same trace and flags, tracestate and
    // baggage as the producer wrote them.
    let relay_span = hex(&s.span.span_id);
    assert_ne!(relay_span, PRODUCER_SPAN);
    assert_eq!(
        m.header_str("traceparent"),
        Some(format!("00-{TRACE_ID}-{relay_span}-01"))
    );
    assert_eq!(
        m.header_str("tracestate").as_deref(),
        Some("rojo=00f067aa0ba902b7,congo=t61rcWkgMzE")
    );
    assert_eq!(m.header_str("baggage").as_deref(), Some("userId=alice"));

    // A row without a trace context: the relay's span starts a trace, and the message names it.
    let m = message(&env, "untraced").await;
    let s = receiver.span_of("untraced").await;
    assert!(s.span.parent_span_id.is_empty(), "a root span: {s:?}");
    assert_eq!(
        m.header_str("traceparent"),
        Some(format!(
            "00-{}-{}-01",
            hex(&s.span.trace_id),
            hex(&s.span.span_id)
        ))
    );

    // A row the broker refuses (its exchange does not exist): the span ends in error with the
    // reason, and says the row is retried.
    let s = receiver.span_of("refused").await;
    let status = s.span.status.clone().expect("a status");
    assert_eq!(status.code, StatusCode::Error as i32, "{s:?}");
    assert!(status.message.contains("no-such-exchange"), "{s:?}");
    assert!(
        s.span
            .events
            .iter()
            .any(|e| e.name == "retry scheduled" || e.name == "parked"),
        "{s:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_spans_still_queued_at_sigterm_are_sent_before_the_relay_exits() {
    let receiver = Receiver::start().await;
    let env = TestEnv::new(Setup::new()).await;
    append_config(
        &env,
        &format!(
            "\n[telemetry]\notlp_endpoint = \"{}\"\n",
            receiver.endpoint()
        ),
    );
    let mut relay = env.start_relay();
    env.insert(&[NewRow::new("last", "k1")]).await;
    message(&env, "last").await;
    // Batches wait up to a second for more spans: this one is still queued now, or in flight.
    relay.sigterm();
    assert!(relay.wait_exit().await.success(), "{}", relay.log());
    assert!(
        receiver
            .spans()
            .iter()
            .any(|s| s.string("messaging.message.id").as_deref() == Some("last")),
        "the span of the last row, sent at exit: {:?}",
        receiver.spans()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_collector_that_never_answers_holds_up_neither_delivery_nor_the_exit() {
    // Accepts connections and never answers (the exporter's own timeout is 10 s).
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = silent.local_addr().unwrap();
    let accepting = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((stream, _)) = silent.accept().await {
            held.push(stream);
        }
    });
    let env = TestEnv::new(Setup::new()).await;
    append_config(
        &env,
        &format!("\n[telemetry]\notlp_endpoint = \"http://{addr}\"\n"),
    );
    let mut relay = env.start_relay();
    let rows: Vec<NewRow> = (0..100)
        .map(|i| NewRow::new(format!("row-{i}"), format!("k{}", i % 10)))
        .collect();
    env.insert(&rows).await;
    env.consumer.wait_for(rows.len()).await;
    env.wait_all_marked().await;
    let stopping = std::time::Instant::now();
    relay.sigterm();
    assert!(relay.wait_exit().await.success(), "{}", relay.log());
    // The flush at exit waits 2 s at most; the export it would wait for takes 10 s.
    assert!(
        stopping.elapsed() < std::time::Duration::from_secs(8),
        "exited after {:?}",
        stopping.elapsed()
    );
    accepting.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_otlp_collector_that_is_down_does_not_stop_delivery_and_its_spans_are_counted_as_dropped(
) {
    // A port nothing listens on: bound, then closed.
    let down = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap()
    };
    let env = TestEnv::new(Setup::new().set("health", "listen", "\"127.0.0.1:0\"")).await;
    append_config(
        &env,
        &format!("\n[telemetry]\notlp_endpoint = \"http://{down}\"\n"),
    );
    let relay = env.start_relay();
    let rows: Vec<NewRow> = (0..200)
        .map(|i| {
            NewRow::new(format!("row-{i}"), format!("k{}", i % 10)).headers(json!({
                "traceparent": format!("00-{TRACE_ID}-{PRODUCER_SPAN}-01"),
            }))
        })
        .collect();
    env.insert(&rows).await;
    env.consumer.wait_for(rows.len()).await;
    env.wait_all_marked().await;
    let addr = health_addr(&relay).await;
    eventually(
        "the spans the collector did not take counted as dropped",
        || async {
            let (_, body) = http_get(&addr, "/metrics").await;
            Scrape::parse(&body)
                .value("outbox_relay_spans_dropped_total", &[])
                .is_some_and(|n| n >= 1.0)
        },
    )
    .await;
    assert!(relay.log().contains("the OTLP collector did not take"));
}

#[tokio::test]
async fn an_otlp_endpoint_that_is_no_http_url_exits_78_naming_the_key_or_the_variable() {
    let dir = std::env::temp_dir().join(unique_name("obr_otlp"));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("outbox-relay.toml");
    let write = |endpoint: &str| {
        std::fs::write(
            &path,
            format!(
                "[postgres]\nurl = \"postgres://postgres@127.0.0.1:5432/app\"\n\
                 [rabbitmq]\nurl = \"amqp://guest:guest@127.0.0.1:5672/%2f\"\n\
                 [telemetry]\notlp_endpoint = {endpoint}\n\
                 [[outbox]]\ntable = \"public.outbox\"\nexchange = \"events\"\n"
            ),
        )
        .unwrap();
    };
    for (endpoint, says) in [
        ("\"https://collector:4318\"", "plain HTTP only"),
        ("\"grpc://collector:4317\"", "got the scheme \"grpc\""),
        ("\"collector:4318\"", "expected an http:// URL"),
        (
            "\"http://user:secret@collector:4318\"",
            "without user or password",
        ),
        ("4318", "telemetry.otlp_endpoint"),
    ] {
        write(endpoint);
        let out = run_cli(&path, &["check-config"]).await;
        assert_eq!(out.code, 78, "{endpoint}: {out:?}");
        assert!(
            out.stderr.contains("telemetry.otlp_endpoint") && out.stderr.contains(says),
            "{endpoint}: names the key and says {says:?}: {}",
            out.stderr
        );
        assert!(!out.stderr.contains("secret"), "{}", out.stderr);
    }
    // The standard variable, when set, is where the spans go: checked the same way, and named.
    write("\"http://127.0.0.1:4318\"");
    let out = std::process::Command::new(relay_binary())
        .arg("--config")
        .arg(&path)
        .arg("check-config")
        .env(
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
            "https://collector/v1/traces",
        )
        .output()
        .expect("run outbox-relay");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(78), "{stderr}");
    assert!(
        stderr.contains("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") && stderr.contains("plain HTTP only"),
        "{stderr}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
