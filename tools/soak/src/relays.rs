//! The real relay binary as child processes: started, SIGKILLed, SIGSTOPped and SIGTERMed by
//! the faults, kept at the wanted count (a relay that exits by itself is recorded and replaced),
//! and stopped with SIGTERM at the end.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::Context;
use tokio::process::{Child, Command};

/// The relay processes of the run.
pub struct Relays {
    bin: PathBuf,
    config: PathBuf,
    dir: PathBuf,
    children: Vec<RelayChild>,
    spawned: u32,
    /// How many relays should be running between faults: the watcher replaces exits up to it,
    /// member-join and member-leave move it.
    pub wanted: usize,
    /// Exits the soak did not cause, with the tail of the relay's log.
    pub unexpected_exits: Vec<String>,
}

struct RelayChild {
    number: u32,
    child: Child,
    log: PathBuf,
}

/// Finds `outbox-relay` next to the soak's own executable (built there first when the soak was
/// started by `cargo run`).
pub fn locate_relay_binary() -> anyhow::Result<PathBuf> {
    let relay = outbox_relay_testkit::relay::beside_tool(env!("CARGO_PKG_NAME"))?;
    if !relay.is_file() {
        anyhow::bail!(
            "the relay binary {} is missing: build both with `cargo build --release --workspace --bins` \
             (or pass --relay-bin PATH)",
            relay.display()
        );
    }
    Ok(relay)
}

impl Relays {
    pub fn new(bin: PathBuf, config: PathBuf, dir: PathBuf) -> Relays {
        Relays {
            bin,
            config,
            dir,
            children: Vec::new(),
            spawned: 0,
            wanted: 0,
            unexpected_exits: Vec::new(),
        }
    }

    /// Starts one more relay process, logging to `relay-N.log` in the run's folder.
    pub fn spawn(&mut self) -> anyhow::Result<()> {
        self.spawned += 1;
        let log = self.dir.join(format!("relay-{}.log", self.spawned));
        let out =
            std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
        let err = out.try_clone()?;
        let child = Command::new(&self.bin)
            .arg("--config")
            .arg(&self.config)
            .arg("run")
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {}", self.bin.display()))?;
        self.children.push(RelayChild {
            number: self.spawned,
            child,
            log,
        });
        Ok(())
    }

    pub fn running(&self) -> usize {
        self.children.len()
    }

    pub fn spawned(&self) -> u32 {
        self.spawned
    }

    /// The number (as in `relay-N.log`) of the relay at `index` (0 = the oldest running one).
    pub fn number(&self, index: usize) -> Option<u32> {
        self.children.get(index).map(|c| c.number)
    }

    /// Sends `signal` (`-STOP`, `-CONT`, ...) to relay `number`; false when it is not running
    /// or `kill` failed.
    pub async fn signal(&self, number: u32, signal: &str) -> bool {
        let Some(pid) = self
            .children
            .iter()
            .find(|c| c.number == number)
            .and_then(|c| c.child.id())
        else {
            return false;
        };
        send(signal, pid).await
    }

    /// Takes the relay at `index` out of the run (the watcher no longer sees it), to be
    /// stopped with [`Stopping::terminate`] without holding the relays' lock.
    pub fn take(&mut self, index: usize) -> Option<Stopping> {
        (index < self.children.len()).then(|| Stopping(self.children.remove(index)))
    }

    pub fn logs(&self) -> Vec<PathBuf> {
        (1..=self.spawned)
            .map(|n| self.dir.join(format!("relay-{n}.log")))
            .collect()
    }

    /// SIGKILLs the relay at `index` (0 = the oldest running one).
    pub async fn kill(&mut self, index: usize) {
        if index >= self.children.len() {
            return;
        }
        let mut c = self.children.remove(index);
        let _ = c.child.start_kill();
        let _ = c.child.wait().await;
    }

    pub async fn kill_all(&mut self) {
        while !self.children.is_empty() {
            self.kill(0).await;
        }
    }

    /// Notices relays that exited on their own, records why, and forgets them.
    pub fn reap(&mut self) {
        let mut i = 0;
        while i < self.children.len() {
            match self.children[i].child.try_wait() {
                Ok(Some(status)) => {
                    let c = self.children.remove(i);
                    let tail = log_tail(&c.log, 5);
                    let exit = format!(
                        "relay {} exited by itself ({status}); last log lines:\n{tail}",
                        c.number
                    );
                    eprintln!("soak: {exit}");
                    self.unexpected_exits.push(exit);
                }
                _ => i += 1,
            }
        }
    }

    /// SIGTERM to every relay, then SIGKILL after `grace` (recorded as a problem).
    pub async fn terminate_all(&mut self, grace: Duration) {
        for c in &self.children {
            if let Some(pid) = c.child.id() {
                send("-TERM", pid).await;
            }
        }
        let children: Vec<RelayChild> = self.children.drain(..).collect();
        for mut c in children {
            if tokio::time::timeout(grace, c.child.wait()).await.is_err() {
                // Its shutdown timeout is far shorter: a relay that ignores SIGTERM is a fault
                // of the relay's, and fails the run.
                let problem = format!(
                    "relay {} did not stop within {grace:?} of SIGTERM at the end (SIGKILLed); last log lines:\n{}",
                    c.number,
                    log_tail(&c.log, 5)
                );
                eprintln!("soak: {problem}");
                self.unexpected_exits.push(problem);
                let _ = c.child.start_kill();
                let _ = c.child.wait().await;
            }
        }
    }
}

/// A relay taken out of the run, on its way out.
pub struct Stopping(RelayChild);

impl Stopping {
    pub fn number(&self) -> u32 {
        self.0.number
    }

    /// SIGTERM, then waits up to `grace` for the relay to drain and exit (SIGKILL after that).
    /// `Err` says what went wrong: it did not stop in time, or it exited with a failure.
    pub async fn terminate(mut self, grace: Duration) -> Result<(), String> {
        let c = &mut self.0;
        if let Some(pid) = c.child.id() {
            send("-TERM", pid).await;
        }
        match tokio::time::timeout(grace, c.child.wait()).await {
            Ok(Ok(status)) if status.success() => Ok(()),
            Ok(Ok(status)) => Err(format!(
                "relay {} exited with {status} after SIGTERM; last log lines:\n{}",
                c.number,
                log_tail(&c.log, 5)
            )),
            Ok(Err(e)) => Err(format!("relay {}: waiting for it: {e}", c.number)),
            Err(_) => {
                let _ = c.child.start_kill();
                let _ = c.child.wait().await;
                Err(format!(
                    "relay {} did not stop within {grace:?} of SIGTERM (SIGKILLed); last log lines:\n{}",
                    c.number,
                    log_tail(&c.log, 5)
                ))
            }
        }
    }
}

/// `kill SIGNAL PID`; true when it succeeded.
async fn send(signal: &str, pid: u32) -> bool {
    Command::new("kill")
        .arg(signal)
        .arg(pid.to_string())
        .status()
        .await
        .is_ok_and(|s| s.success())
}

/// Counts of the relay logs' partition-lease lines, over every relay of the run.
#[derive(Debug, Default, Clone, Copy)]
pub struct LeaseLines {
    pub registered: u64,
    pub lease_ran_out: u64,
    pub left: u64,
}

impl Relays {
    /// Counts "partition leases: registered / the lease ran out / left" in every relay log.
    pub fn lease_lines(&self) -> LeaseLines {
        let mut n = LeaseLines::default();
        for log in self.logs() {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            for line in text.lines() {
                if line.contains("partition leases: registered") {
                    n.registered += 1;
                } else if line.contains("partition leases: the lease ran out") {
                    n.lease_ran_out += 1;
                } else if line.contains("partition leases: left") {
                    n.left += 1;
                }
            }
        }
        n
    }
}

/// The last `n` lines of a log file.
pub fn log_tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}
