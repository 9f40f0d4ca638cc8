//! Real faults for a test's relay: its database sessions terminated (all, or only the one
//! holding the tables' advisory locks) or frozen with SIGSTOP like a network gone silent, and
//! its broker connections closed with `rabbitmqctl`. Each touches only the test's own database
//! or vhost, so tests in parallel do not feel each other's faults.

use crate::env::TestEnv;

impl TestEnv {
    /// Terminates only the coordination session (the table's lock and LISTEN) of the relay
    /// owning partition `partition` of the table; returns how many were terminated.
    pub async fn terminate_owner_session(&self, partition: i32) -> i64 {
        sqlx::query_scalar(
            "SELECT count(pg_terminate_backend(m.session_pid)) FROM outbox_relay.leases l \
             JOIN outbox_relay.members m ON m.table_oid = l.table_oid AND m.member = l.owner \
             WHERE l.table_oid = $1::regclass::oid::bigint AND l.partition = $2",
        )
        .bind(crate::rows::quoted_table(&self.table))
        .bind(partition)
        .fetch_one(&self.pool)
        .await
        .expect("terminate the owner's coordination session")
    }

    /// Terminates this test database's sessions opened by the relay (never the test's own).
    pub async fn terminate_relay_sessions(&self) -> i64 {
        sqlx::query_scalar(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
             WHERE datname = $1 AND application_name = 'outbox-relay' AND pid <> pg_backend_pid()",
        )
        .bind(&self.db)
        .fetch_one(&self.pool)
        .await
        .expect("terminate the relay's sessions")
    }

    /// Freezes (SIGSTOP) the backends of the relay's sessions in the test's database: their
    /// sockets stay open and nothing comes back, like a network that went silent. They are
    /// thawed (SIGCONT) when the returned guard drops, also when the test fails, and by a
    /// detached process after [`THAW_AFTER`] even when the test process dies first.
    ///
    /// Only while every relay session sits idle between statements: a backend stopped inside
    /// a statement may hold a lock that every session of the server needs (ProcArrayLock at
    /// its commit, say), and would wedge the whole server, other tests included. Give the
    /// relay a long `relay.poll_interval`, so its coordination session is idle.
    pub async fn freeze_relay_sessions(&self) -> FrozenBackends {
        let deadline = std::time::Instant::now() + crate::wait::TIMEOUT;
        let pids = loop {
            let sessions: Vec<(i32, Option<String>)> = sqlx::query_as(
                "SELECT pid, state FROM pg_stat_activity \
                 WHERE datname = $1 AND application_name = 'outbox-relay' AND pid <> pg_backend_pid()",
            )
            .bind(&self.db)
            .fetch_all(&self.pool)
            .await
            .expect("list the relay's sessions");
            if !sessions.is_empty() && sessions.iter().all(|(_, s)| s.as_deref() == Some("idle")) {
                break sessions
                    .into_iter()
                    .map(|(pid, _)| pid)
                    .collect::<Vec<i32>>();
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the relay's sessions never were all idle: {sessions:?}"
            );
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        };
        let list = pids
            .iter()
            .map(|p| p.to_string())
            .collect::<Vec<_>>()
            .join(" ");
        let _ = std::process::Command::new("sh")
            .args([
                "-c",
                &format!(
                    "sleep {}; kill -CONT {list} 2>/dev/null",
                    THAW_AFTER.as_secs()
                ),
            ])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn();
        // The guard exists before the first SIGSTOP, so a failure below still thaws them.
        let frozen = FrozenBackends { pids };
        for pid in &frozen.pids {
            assert!(signal("-STOP", *pid), "kill -STOP {pid} failed");
        }
        frozen
    }

    /// Closes every connection to the test's own vhost (the relay's and the consumer's), as
    /// `rabbitmqctl close_all_connections` does for an operator. Needs [`crate::setup::Setup::own_vhost`].
    pub async fn close_broker_connections(&self) {
        let vhost = self
            .vhost
            .as_deref()
            .expect("closing connections needs a vhost of the test's own (Setup::own_vhost)");
        crate::servers::rabbitmqctl(&["close_all_connections", "--vhost", vhost, "test"])
            .await
            .unwrap_or_else(|e| panic!("{e:#}"));
    }
}

/// When a detached process thaws frozen backends whatever happened to the test.
pub const THAW_AFTER: std::time::Duration = std::time::Duration::from_secs(120);

/// Backends stopped by [`TestEnv::freeze_relay_sessions`]; continued when dropped.
pub struct FrozenBackends {
    pub pids: Vec<i32>,
}

impl Drop for FrozenBackends {
    fn drop(&mut self) {
        for pid in &self.pids {
            signal("-CONT", *pid);
        }
    }
}

/// Runs `rabbitmqctl ARGS` to completion and panics with its output when it fails (for tests;
/// [`crate::servers::rabbitmqctl`] is the bounded, non-panicking one).
pub fn rabbitmqctl(args: &[&str]) {
    let out = std::process::Command::new("rabbitmqctl")
        .args(args)
        .output()
        .expect("rabbitmqctl can be run");
    assert!(
        out.status.success(),
        "rabbitmqctl {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `kill SIGNAL PID`; true when it succeeded.
pub fn signal(signal: &str, pid: i32) -> bool {
    std::process::Command::new("kill")
        .args([signal, &pid.to_string()])
        .status()
        .is_ok_and(|s| s.success())
}
