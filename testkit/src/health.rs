//! The relay's health endpoint (`health.listen`, port 0 in tests): where it listens, from its
//! start-up log line, and plain HTTP GETs on it.

use crate::relay::Relay;

/// The relay's health endpoint address, from its start-up log line.
pub async fn health_addr(relay: &Relay) -> String {
    relay.wait_for_log("health endpoint listening").await;
    let log = relay.log();
    let line = log
        .lines()
        .find(|l| l.contains("health endpoint listening"))
        .expect("the line waited for");
    line.split_whitespace()
        .find_map(|w| w.strip_prefix("addr="))
        .unwrap_or_else(|| panic!("no addr= in {line}"))
        .to_string()
}

/// `GET path` on the health endpoint: the HTTP status and the body.
pub async fn http_get(addr: &str, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr)
        .await
        .expect("connect to the health endpoint");
    let request = format!("GET {path} HTTP/1.1\r\nHost: relay\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no HTTP status line: {response:?}"));
    let body = response
        .split("\r\n\r\n")
        .nth(1)
        .unwrap_or_default()
        .to_owned();
    (status, body)
}

/// `GET /ready`: the HTTP status and the first table's state in words (`relaying`, `not
/// ready: ...`).
pub async fn table_state(addr: &str) -> (u16, String) {
    let (status, body) = http_get(addr, "/ready").await;
    let json: serde_json::Value =
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}"));
    let state = json["tables"][0]["state"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    (status, state)
}
