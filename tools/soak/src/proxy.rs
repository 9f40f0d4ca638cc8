//! A small TCP proxy between the relay and one server, so the soak can break the network for
//! real: reset every connection, go silent (sockets stay open, nothing is forwarded), or add
//! latency. Owns sockets only; knows nothing of PostgreSQL or AMQP.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// One listening port on 127.0.0.1 forwarding to `upstream`.
pub struct Proxy {
    pub port: u16,
    state: Arc<ProxyState>,
}

struct ProxyState {
    upstream: SocketAddr,
    silent: watch::Sender<bool>,
    latency_ms: AtomicU64,
    /// Cancelled to reset every connection accepted under it; replaced by a fresh one.
    generation: Mutex<CancellationToken>,
}

impl Proxy {
    /// Binds an ephemeral port and starts accepting; runs until `stop`.
    pub async fn start(
        name: &'static str,
        upstream: SocketAddr,
        stop: CancellationToken,
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
        });
        let accept_state = state.clone();
        tokio::spawn(async move {
            loop {
                let accepted = tokio::select! {
                    a = listener.accept() => a,
                    _ = stop.cancelled() => break,
                };
                let Ok((client, _)) = accepted else {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                };
                let token = accept_state.current_generation();
                tokio::spawn(serve(client, accept_state.clone(), token));
            }
            accept_state.reset();
        });
        Ok(Proxy { port, state })
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

    /// Back to a clean network (used when a fault ends early and at the end of the run).
    pub fn heal(&self) {
        self.set_silent(false);
        self.set_latency(Duration::ZERO);
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
    let reset = {
        let (mut client_read, mut client_write) = client.split();
        let (mut server_read, mut server_write) = server.split();
        tokio::select! {
            _ = pump(&mut client_read, &mut server_write, &state) => false,
            _ = pump(&mut server_read, &mut client_write, &state) => false,
            _ = token.cancelled() => true,
        }
    };
    if reset {
        let _ = client.set_zero_linger();
        let _ = server.set_zero_linger();
    }
}

/// Copies one direction until EOF or an error, honouring silence and latency.
async fn pump<R, W>(from: &mut R, to: &mut W, state: &ProxyState)
where
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
