//! A TCP proxy in front of PostgreSQL that counts what clients send: simple queries ('Q') and
//! extended-protocol executions ('E') are statements; simple queries and syncs ('S') are round
//! trips. Exact, and needs nothing on the server (pg_stat_statements would need a restart with
//! shared_preload_libraries). Clients must not use TLS through it (sslmode=disable).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

#[derive(Debug, Default)]
struct Counts {
    queries: AtomicU64,
    executes: AtomicU64,
    syncs: AtomicU64,
}

/// Counters at one moment.
#[derive(Debug, Clone, Copy, Default)]
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

pub struct CountingProxy {
    pub port: u16,
    counts: Arc<Counts>,
    task: JoinHandle<()>,
}

impl CountingProxy {
    /// Listens on 127.0.0.1 (a free port) and forwards every connection to `upstream`.
    pub async fn start(upstream: String) -> anyhow::Result<CountingProxy> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let counts = Arc::new(Counts::default());
        let shared = counts.clone();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let upstream = upstream.clone();
                let counts = shared.clone();
                tokio::spawn(async move {
                    if let Ok(server) = TcpStream::connect(&upstream).await {
                        let _ = forward(client, server, counts).await;
                    }
                });
            }
        });
        Ok(CountingProxy { port, counts, task })
    }

    pub fn counted(&self) -> Counted {
        let q = self.counts.queries.load(Ordering::Relaxed);
        Counted {
            statements: q + self.counts.executes.load(Ordering::Relaxed),
            round_trips: q + self.counts.syncs.load(Ordering::Relaxed),
        }
    }

    pub fn stop(self) {
        self.task.abort();
    }
}

async fn forward(client: TcpStream, server: TcpStream, counts: Arc<Counts>) -> std::io::Result<()> {
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    let (mut from_client, mut to_client) = client.into_split();
    let (mut from_server, mut to_server) = server.into_split();
    let replies =
        tokio::spawn(async move { tokio::io::copy(&mut from_server, &mut to_client).await });
    let requests = async {
        // The startup packet (and an SSLRequest or GSSENCRequest before it) has no type byte.
        loop {
            let len = from_client.read_u32().await?;
            let mut body = vec![0; (len as usize).saturating_sub(4)];
            from_client.read_exact(&mut body).await?;
            to_server.write_u32(len).await?;
            to_server.write_all(&body).await?;
            let code = body
                .get(..4)
                .map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]));
            if !matches!(code, Some(80877103) | Some(80877104)) {
                break;
            }
        }
        loop {
            let kind = from_client.read_u8().await?;
            let len = from_client.read_u32().await?;
            let mut body = vec![0; (len as usize).saturating_sub(4)];
            from_client.read_exact(&mut body).await?;
            match kind {
                b'Q' => counts.queries.fetch_add(1, Ordering::Relaxed),
                b'E' => counts.executes.fetch_add(1, Ordering::Relaxed),
                b'S' => counts.syncs.fetch_add(1, Ordering::Relaxed),
                _ => 0,
            };
            let mut frame = Vec::with_capacity(5 + body.len());
            frame.push(kind);
            frame.extend_from_slice(&len.to_be_bytes());
            frame.extend_from_slice(&body);
            to_server.write_all(&frame).await?;
            if kind == b'X' {
                return Ok::<(), std::io::Error>(());
            }
        }
    };
    let outcome = requests.await;
    replies.abort();
    outcome
}
