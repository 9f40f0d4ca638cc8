//! A TCP proxy between a client (the relay) and one server, to break the network for real and to
//! watch it: reset every connection (RST, not a polite close), go silent (sockets stay open,
//! nothing is forwarded), add latency, count the connections clients open, and, in front of
//! PostgreSQL, count the statements and round trips clients send. Owns sockets only; it never
//! changes a byte, and reads the PostgreSQL protocol only to count.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use url::Url;

/// One listening port on 127.0.0.1 forwarding to `upstream`; stops when stopped or dropped.
pub struct Proxy {
    pub port: u16,
    state: Arc<ProxyState>,
    stop: CancellationToken,
}

struct ProxyState {
    upstream: SocketAddr,
    silent: watch::Sender<bool>,
    latency_ms: AtomicU64,
    /// Cancelled to reset every connection accepted under it; replaced by a fresh one.
    generation: Mutex<CancellationToken>,
    connections: AtomicU64,
    /// Set when the upstream is PostgreSQL and its clients' messages are counted.
    postgres: Option<PgCounts>,
}

impl Proxy {
    /// Binds an ephemeral port and starts forwarding to `upstream`.
    pub async fn start(name: &str, upstream: SocketAddr) -> anyhow::Result<Proxy> {
        Proxy::listen(name, upstream, None).await
    }

    /// The same in front of PostgreSQL, counting what clients send (see [`Proxy::counted`]).
    /// Clients must not use TLS through it (`sslmode=disable`): encrypted messages cannot be read.
    pub async fn start_counting_postgres(
        name: &str,
        upstream: SocketAddr,
    ) -> anyhow::Result<Proxy> {
        Proxy::listen(name, upstream, Some(PgCounts::default())).await
    }

    async fn listen(
        name: &str,
        upstream: SocketAddr,
        postgres: Option<PgCounts>,
    ) -> anyhow::Result<Proxy> {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .with_context(|| format!("binding the {name} proxy"))?;
        let port = listener.local_addr()?.port();
        let state = Arc::new(ProxyState {
            upstream,
            silent: watch::Sender::new(false),
            latency_ms: AtomicU64::new(0),
            generation: Mutex::new(CancellationToken::new()),
            connections: AtomicU64::new(0),
            postgres,
        });
        let stop = CancellationToken::new();
        let (accept_state, accept_stop) = (state.clone(), stop.clone());
        tokio::spawn(async move {
            loop {
                let accepted = tokio::select! {
                    a = listener.accept() => a,
                    _ = accept_stop.cancelled() => break,
                };
                let Ok((client, _)) = accepted else {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                };
                accept_state.connections.fetch_add(1, Ordering::Relaxed);
                let token = accept_state.current_generation();
                tokio::spawn(serve(client, accept_state.clone(), token));
            }
            accept_state.reset();
        });
        Ok(Proxy { port, state, stop })
    }

    /// `url` with its host and port replaced by the proxy's: the same server, through the proxy.
    pub fn route(&self, url: &Url) -> anyhow::Result<Url> {
        let mut routed = url.clone();
        routed
            .set_host(Some("127.0.0.1"))
            .context("the URL cannot have a host")?;
        routed
            .set_port(Some(self.port))
            .map_err(|_| anyhow::anyhow!("the URL cannot have a port"))?;
        Ok(routed)
    }

    /// [`Proxy::route`] for a PostgreSQL client that must not use TLS (`sslmode=disable` in
    /// place of any `sslmode` the URL had): what a counting proxy needs to read the protocol.
    pub fn route_without_tls(&self, url: &Url) -> anyhow::Result<Url> {
        let mut routed = self.route(url)?;
        let query: Vec<(String, String)> = routed
            .query_pairs()
            .filter(|(k, _)| k != "sslmode")
            .map(|(k, v)| (k.into_owned(), v.into_owned()))
            .collect();
        routed
            .query_pairs_mut()
            .clear()
            .extend_pairs(query)
            .append_pair("sslmode", "disable");
        Ok(routed)
    }

    /// Resets every open connection (RST, not a polite close).
    pub fn reset(&self) {
        self.state.reset();
    }

    /// Stops (or resumes) forwarding in both directions; sockets stay open.
    pub fn set_silent(&self, silent: bool) {
        self.state.silent.send_replace(silent);
    }

    /// Delays every forwarded chunk by `latency`.
    pub fn set_latency(&self, latency: Duration) {
        self.state
            .latency_ms
            .store(latency.as_millis() as u64, Ordering::Relaxed);
    }

    /// Back to a clean network (used when a fault ends early and at the end of a run).
    pub fn heal(&self) {
        self.set_silent(false);
        self.set_latency(Duration::ZERO);
    }

    /// Connections clients opened through the proxy so far.
    pub fn connections(&self) -> u64 {
        self.state.connections.load(Ordering::Relaxed)
    }

    /// What PostgreSQL clients sent so far (zero unless started with
    /// [`Proxy::start_counting_postgres`]).
    pub fn counted(&self) -> Counted {
        self.state
            .postgres
            .as_ref()
            .map(PgCounts::counted)
            .unwrap_or_default()
    }

    /// Stops accepting and resets every open connection.
    pub fn stop(&self) {
        self.stop.cancel();
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl ProxyState {
    fn current_generation(&self) -> CancellationToken {
        self.generation
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    fn reset(&self) {
        let mut current = self.generation.lock().unwrap_or_else(|e| e.into_inner());
        current.cancel();
        *current = CancellationToken::new();
    }

    async fn wait_until_audible(&self) {
        let mut rx = self.silent.subscribe();
        let _ = rx.wait_for(|silent| !*silent).await;
    }
}

async fn serve(mut client: TcpStream, state: Arc<ProxyState>, token: CancellationToken) {
    // A silent network does not even complete the upstream handshake.
    tokio::select! {
        _ = state.wait_until_audible() => {}
        _ = token.cancelled() => {
            let _ = client.set_zero_linger();
            return;
        }
    }
    let mut server = match TcpStream::connect(state.upstream).await {
        Ok(s) => s,
        Err(_) => {
            let _ = client.set_zero_linger();
            return;
        }
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let mut frames = state.postgres.as_ref().map(|_| FrontendFrames::default());
    let reset = {
        let (mut client_read, mut client_write) = client.split();
        let (mut server_read, mut server_write) = server.split();
        let counts = state.postgres.as_ref();
        let mut watch_requests = |chunk: &[u8]| {
            if let (Some(frames), Some(counts)) = (frames.as_mut(), counts) {
                frames.feed(chunk, counts);
            }
        };
        let mut ignore_replies = |_: &[u8]| {};
        tokio::select! {
            _ = pump(&mut client_read, &mut server_write, &state, &mut watch_requests) => false,
            _ = pump(&mut server_read, &mut client_write, &state, &mut ignore_replies) => false,
            _ = token.cancelled() => true,
        }
    };
    if reset {
        let _ = client.set_zero_linger();
        let _ = server.set_zero_linger();
    }
}

/// Copies one direction until EOF or an error, honouring silence and latency; `watch` sees
/// every chunk before it is forwarded.
async fn pump<R, W>(
    from: &mut R,
    to: &mut W,
    state: &ProxyState,
    watch: &mut (dyn FnMut(&[u8]) + Send),
) where
    R: AsyncReadExt + Unpin,
    W: AsyncWriteExt + Unpin,
{
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        state.wait_until_audible().await;
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        watch(&buf[..n]);
        let latency = state.latency_ms.load(Ordering::Relaxed);
        if latency > 0 {
            tokio::time::sleep(Duration::from_millis(latency)).await;
        }
        state.wait_until_audible().await;
        if to.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

/// Messages PostgreSQL clients sent: simple queries ('Q') and extended-protocol executions
/// ('E') are statements; simple queries and syncs ('S') are round trips. Exact, and needs
/// nothing on the server (pg_stat_statements would need a restart with
/// shared_preload_libraries).
#[derive(Debug, Default)]
struct PgCounts {
    queries: AtomicU64,
    executes: AtomicU64,
    syncs: AtomicU64,
}

impl PgCounts {
    fn count(&self, kind: u8) {
        let counter = match kind {
            b'Q' => &self.queries,
            b'E' => &self.executes,
            b'S' => &self.syncs,
            _ => return,
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    fn counted(&self) -> Counted {
        let q = self.queries.load(Ordering::Relaxed);
        Counted {
            statements: q + self.executes.load(Ordering::Relaxed),
            round_trips: q + self.syncs.load(Ordering::Relaxed),
        }
    }
}

/// Counters at one moment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counted {
    pub statements: u64,
    pub round_trips: u64,
}

impl std::ops::Sub for Counted {
    type Output = Counted;
    fn sub(self, earlier: Counted) -> Counted {
        Counted {
            statements: self.statements - earlier.statements,
            round_trips: self.round_trips - earlier.round_trips,
        }
    }
}

/// SSLRequest and GSSENCRequest: startup-phase messages after which another untyped one follows.
const SSL_REQUEST: u32 = 80877103;
const GSSENC_REQUEST: u32 = 80877104;

/// Follows the message boundaries of what a PostgreSQL client sends, however the stream is cut
/// into chunks. The startup phase has untyped messages (length, then a code); every later
/// message is a type byte and a length that counts itself but not the type.
#[derive(Debug)]
struct FrontendFrames {
    startup: bool,
    header: [u8; 8],
    have: usize,
    /// Body bytes of the current message still to pass.
    skip: usize,
}

impl Default for FrontendFrames {
    fn default() -> Self {
        FrontendFrames {
            startup: true,
            header: [0; 8],
            have: 0,
            skip: 0,
        }
    }
}

impl FrontendFrames {
    fn feed(&mut self, mut data: &[u8], counts: &PgCounts) {
        while !data.is_empty() {
            if self.skip > 0 {
                let n = self.skip.min(data.len());
                self.skip -= n;
                data = &data[n..];
                continue;
            }
            // Startup: length and code; later: type and length.
            let need = if self.startup { 8 } else { 5 };
            let n = (need - self.have).min(data.len());
            self.header[self.have..self.have + n].copy_from_slice(&data[..n]);
            self.have += n;
            data = &data[n..];
            if self.have < need {
                return;
            }
            self.have = 0;
            let word = |at: usize| {
                u32::from_be_bytes([
                    self.header[at],
                    self.header[at + 1],
                    self.header[at + 2],
                    self.header[at + 3],
                ]) as usize
            };
            if self.startup {
                let (len, code) = (word(0), word(4) as u32);
                self.skip = len.saturating_sub(8);
                self.startup = matches!(code, SSL_REQUEST | GSSENC_REQUEST);
            } else {
                counts.count(self.header[0]);
                self.skip = word(1).saturating_sub(4);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(kind: u8, body: &[u8]) -> Vec<u8> {
        let mut m = vec![kind];
        m.extend_from_slice(&(body.len() as u32 + 4).to_be_bytes());
        m.extend_from_slice(body);
        m
    }

    /// SSLRequest, a startup message, then a simple query, a parse/bind/execute/sync, a
    /// second execute/sync, and a terminate.
    fn session() -> Vec<u8> {
        let mut bytes = Vec::new();
        bytes.extend_from_slice(&8u32.to_be_bytes());
        bytes.extend_from_slice(&SSL_REQUEST.to_be_bytes());
        let startup = b"\x00\x03\x00\x00user\x00postgres\x00\x00";
        bytes.extend_from_slice(&(startup.len() as u32 + 4).to_be_bytes());
        bytes.extend_from_slice(startup);
        bytes.extend(message(b'Q', b"SELECT 1\x00"));
        bytes.extend(message(b'P', b"\x00SELECT $1\x00\x00\x00"));
        bytes.extend(message(b'B', b"\x00\x00\x00\x00\x00\x00\x00\x00"));
        bytes.extend(message(b'E', b"\x00\x00\x00\x00\x00"));
        bytes.extend(message(b'S', b""));
        bytes.extend(message(b'E', b"\x00\x00\x00\x00\x00"));
        bytes.extend(message(b'S', b""));
        bytes.extend(message(b'X', b""));
        bytes
    }

    fn count(chunks: &[&[u8]]) -> Counted {
        let counts = PgCounts::default();
        let mut frames = FrontendFrames::default();
        for chunk in chunks {
            frames.feed(chunk, &counts);
        }
        counts.counted()
    }

    #[test]
    fn statements_and_round_trips_are_counted_in_one_chunk() {
        let bytes = session();
        assert_eq!(
            count(&[&bytes]),
            Counted {
                statements: 3,
                round_trips: 3
            }
        );
    }

    #[test]
    fn statements_are_counted_however_the_stream_is_cut() {
        let bytes = session();
        let single: Vec<&[u8]> = bytes.chunks(1).collect();
        assert_eq!(count(&single), count(&[&bytes]));
        for cut in 0..bytes.len() {
            let (a, b) = bytes.split_at(cut);
            assert_eq!(count(&[a, b]), count(&[&bytes]), "cut at {cut}");
        }
    }
}
