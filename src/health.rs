//! The optional health endpoint (`[health] listen`): `GET /ready` answers 200 while every
//! table's relay is relaying or standing by and 503 otherwise (a server down, the outbox table
//! unusable, the broker blocking, starting or rejoining its table's membership, shutting down).
//! A standby is a registered member whose partitions live relays hold: the table's other
//! relays, this process's other channels, or a relay of an earlier release during an upgrade; a
//! relay whose membership was lost is rejoining, not a standby. `GET /live` answers 200 while
//! every relay loop keeps turning and nothing in the process has panicked (after a panic it
//! only drains and exits). Both return each table's state as JSON, from the relays' heartbeats.
//! `GET /metrics` answers the metrics (`crate::metrics`) for Prometheus. Another method on
//! these paths is answered 405 with `Allow: GET, HEAD`; any other path 404.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use crate::metrics::{BacklogSource, Metrics};
use crate::relay::Heartbeat;
use crate::shutdown::Shutdown;

/// A relay loop that has not turned for this long is reported as not live (the loops turn at
/// least once a second whatever they wait for: confirms, work while idle, the lock, a backoff).
pub const LIVE_LIMIT: Duration = Duration::from_secs(15);

/// What the endpoint reports on: each table's heartbeat.
pub struct Probe {
    pub beats: Vec<Arc<Heartbeat>>,
    pub shutdown: Shutdown,
    pub metrics: Arc<Metrics>,
    pub backlog: BacklogSource,
}

impl Probe {
    fn ready(&self) -> bool {
        !self.shutdown.is_stopping() && self.beats.iter().all(|b| b.is_ready())
    }

    fn live(&self) -> bool {
        crate::telemetry::panics() == 0 && self.beats.iter().all(|b| b.silence() < LIVE_LIMIT)
    }

    fn report(&self) -> serde_json::Value {
        let tables: Vec<_> = self
            .beats
            .iter()
            .map(|beat| {
                serde_json::json!({
                    "table": beat.table(),
                    "ready": beat.is_ready(),
                    "state": beat.state(),
                })
            })
            .collect();
        serde_json::json!({
            "ready": self.ready(),
            "live": self.live(),
            "stopping": self.shutdown.is_stopping(),
            "tables": tables,
        })
    }
}

/// Binds the endpoint's address; the error names the config key.
pub async fn bind(addr: SocketAddr) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("health.listen: cannot listen on {addr}"))
}

/// Serves probes until the task is aborted (by the service, once the relays have stopped),
/// so `/ready` answers 503 while they drain.
pub async fn serve(listener: TcpListener, probe: Arc<Probe>) {
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                tracing::warn!(error = %e, "health endpoint: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let probe = probe.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request| {
                let probe = probe.clone();
                async move { Ok::<_, Infallible>(respond(&probe, &request).await) }
            });
            // A client that hangs up early is not worth a log line.
            let _ = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(Duration::from_secs(5))
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

async fn respond<B>(probe: &Probe, request: &Request<B>) -> Response<Full<Bytes>> {
    let ok = match (request.method(), request.uri().path()) {
        (&Method::GET | &Method::HEAD, "/ready") => probe.ready(),
        (&Method::GET | &Method::HEAD, "/live") => probe.live(),
        (&Method::GET | &Method::HEAD, "/metrics") => return metrics(probe, request).await,
        // A path that exists, asked with another method: 405 with the methods it takes
        // (RFC 9110, 15.5.6), not 404 as if it did not exist.
        (_, "/ready" | "/live" | "/metrics") => {
            return Response::builder()
                .status(StatusCode::METHOD_NOT_ALLOWED)
                .header(hyper::header::ALLOW, "GET, HEAD")
                .header("content-type", "text/plain")
                .body(Full::new(Bytes::from(format!(
                    "outbox-relay health endpoint: {} takes GET (or HEAD), not {}\n",
                    request.uri().path(),
                    request.method()
                ))))
                .expect("a plain-text response is valid");
        }
        _ => {
            return Response::builder()
                .status(StatusCode::NOT_FOUND)
                .header("content-type", "text/plain")
                .body(Full::new(Bytes::from_static(
                    b"outbox-relay health endpoint: GET /ready, GET /live or GET /metrics\n",
                )))
                .expect("a static response is valid");
        }
    };
    let mut body = probe.report().to_string();
    body.push('\n');
    Response::builder()
        .status(if ok {
            StatusCode::OK
        } else {
            StatusCode::SERVICE_UNAVAILABLE
        })
        .header("content-type", "application/json")
        .header("cache-control", "no-store")
        .body(Full::new(Bytes::from(body)))
        .expect("a JSON response is valid")
}

/// The metrics in the format the scraper asks for: OpenMetrics when its `Accept` names it,
/// Prometheus' text format otherwise.
async fn metrics<B>(probe: &Probe, request: &Request<B>) -> Response<Full<Bytes>> {
    let openmetrics = request
        .headers()
        .get_all(hyper::header::ACCEPT)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .any(|v| v.contains("application/openmetrics-text"));
    let body = probe.metrics.scrape(&probe.backlog, openmetrics).await;
    let content_type = if openmetrics {
        "application/openmetrics-text; version=1.0.0; charset=utf-8"
    } else {
        "text/plain; version=0.0.4; charset=utf-8"
    };
    Response::builder()
        .status(StatusCode::OK)
        .header("content-type", content_type)
        .header("cache-control", "no-store")
        .body(Full::new(Bytes::from(body)))
        .expect("a metrics response is valid")
}
