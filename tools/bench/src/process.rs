//! The real relay binary as a child process: its generated config file, `migrate`, `run`, and
//! what the kernel says about it (CPU seconds from /proc/<pid>/stat, peak RSS from VmHWM).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::Context;
use outbox_relay::config::TableName;
use tokio::process::{Child, Command};

use crate::env::BenchEnv;

/// The relay's settings for one bench run (written as TOML).
pub struct RelayConfig {
    pg_url: String,
    amqp_url: String,
    connection_name: String,
    exchange: String,
    tables: Vec<TableName>,
    batch_size: u32,
    max_in_flight: usize,
    poll_interval: Duration,
    /// `[retry]` keys as TOML values (`("max_attempts", "1")`), the relay's defaults otherwise.
    retry: Vec<(&'static str, String)>,
    /// Every table's `on_published` (`"mark"` or `"delete"`); the relay's default when unset.
    on_published: Option<&'static str>,
    /// `health.listen`, for `GET /metrics` and `GET /ready`.
    health: Option<std::net::SocketAddr>,
    /// `telemetry.otlp_endpoint`: the relay exports a span per published row there.
    otlp_endpoint: Option<String>,
    /// `relay.heartbeat` and `relay.lease` with the two timeouts the lease must outlast; the
    /// relay's defaults when unset.
    leases: Option<LeaseTimings>,
    /// `relay.channels`; the relay's default when unset.
    channels: Option<u32>,
    /// `relay.notify`: LISTEN for the insert trigger, which `migrate` installs (or drops).
    notify: bool,
}

/// How quickly a relay's partitions move when it stops: it renews every `heartbeat`, and its
/// leases run out `lease` after its last renewal. The relay requires
/// `lease > heartbeat + confirm_timeout + statement_timeout` (an owner that cannot renew stops
/// and settles before its lease can expire), so the two timeouts are set with them.
#[derive(Debug, Clone, Copy)]
pub struct LeaseTimings {
    pub heartbeat: Duration,
    pub lease: Duration,
    /// `rabbitmq.confirm_timeout`.
    pub confirm_timeout: Duration,
    /// `postgres.statement_timeout`.
    pub statement_timeout: Duration,
}

impl RelayConfig {
    /// Defaults of the relay for everything the bench does not set.
    pub fn new(env: &BenchEnv, tables: &[TableName]) -> RelayConfig {
        RelayConfig {
            pg_url: env.db_url.to_string(),
            amqp_url: env.amqp_url.clone(),
            // The relay's AMQP connections are told apart from the bench's own ("<name> admin",
            // "<name> consumer", "<name> raw") by this name (see `resources`).
            connection_name: relay_connection_name(env),
            exchange: env.exchange.clone(),
            tables: tables.to_vec(),
            batch_size: 1000,
            max_in_flight: 1000,
            poll_interval: Duration::from_secs(1),
            retry: Vec::new(),
            on_published: None,
            health: None,
            otlp_endpoint: None,
            leases: None,
            channels: None,
            notify: true,
        }
    }

    /// Sets `relay.notify`; `migrate` with this config drops the tables' NOTIFY trigger when
    /// false, and the relay finds new rows by polling.
    pub fn notify(mut self, notify: bool) -> Self {
        self.notify = notify;
        self
    }

    /// Sets the lease timings (see [`LeaseTimings`]).
    pub fn leases(mut self, timings: LeaseTimings) -> Self {
        self.leases = Some(timings);
        self
    }

    /// Sets `relay.channels`: broker channels per table.
    pub fn channels(mut self, channels: u32) -> Self {
        self.channels = Some(channels);
        self
    }

    /// Serves the health endpoint (and `/metrics`) on `addr`.
    pub fn health(mut self, addr: std::net::SocketAddr) -> Self {
        self.health = Some(addr);
        self
    }

    /// Exports the relay's spans to the OTLP/HTTP collector at `endpoint`.
    pub fn otlp(mut self, endpoint: String) -> Self {
        self.otlp_endpoint = Some(endpoint);
        self
    }

    /// Sets every table's `on_published` (`"mark"` or `"delete"`).
    pub fn on_published(mut self, mode: &'static str) -> Self {
        self.on_published = Some(mode);
        self
    }

    /// Sets a `[retry]` key; `value` is written as it is (a TOML value: `1`, `"1h"`).
    pub fn retry(mut self, key: &'static str, value: &str) -> Self {
        self.retry.push((key, value.to_owned()));
        self
    }

    pub fn window(mut self, batch_size: u32, max_in_flight: usize) -> Self {
        self.batch_size = batch_size;
        self.max_in_flight = max_in_flight;
        self
    }

    pub fn pg_url(mut self, url: &url::Url) -> Self {
        self.pg_url = url.to_string();
        self
    }

    pub fn poll_interval(&self) -> Duration {
        self.poll_interval
    }

    /// Writes the file (mode 0600: it may carry passwords) and returns its path.
    pub fn write(&self, path: &Path) -> anyhow::Result<PathBuf> {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        // JSON string literals are valid TOML basic strings.
        let s = |v: &str| serde_json::Value::String(v.to_owned()).to_string();
        let ms = |d: Duration| format!("\"{}ms\"", d.as_millis());
        let mut postgres = format!("[postgres]\nurl = {}\n", s(&self.pg_url));
        let mut rabbitmq = format!(
            "[rabbitmq]\nurl = {}\nconnection_name = {}\n",
            s(&self.amqp_url),
            s(&self.connection_name)
        );
        let mut relay = format!(
            "[relay]\nbatch_size = {}\nmax_in_flight = {}\npoll_interval = {}\nnotify = {}\n",
            self.batch_size,
            self.max_in_flight,
            ms(self.poll_interval),
            self.notify
        );
        if let Some(t) = &self.leases {
            postgres += &format!("statement_timeout = {}\n", ms(t.statement_timeout));
            rabbitmq += &format!("confirm_timeout = {}\n", ms(t.confirm_timeout));
            relay += &format!("heartbeat = {}\nlease = {}\n", ms(t.heartbeat), ms(t.lease));
        }
        if let Some(channels) = self.channels {
            relay += &format!("channels = {channels}\n");
        }
        let mut text = format!("{postgres}\n{rabbitmq}\n{relay}\n[log]\nlevel = \"info\"\n");
        if let Some(endpoint) = &self.otlp_endpoint {
            text += &format!("\n[telemetry]\notlp_endpoint = {}\n", s(endpoint));
        }
        if let Some(addr) = self.health {
            text += &format!("\n[health]\nlisten = {}\n", s(&addr.to_string()));
        }
        if !self.retry.is_empty() {
            text += "\n[retry]\n";
            for (key, value) in &self.retry {
                text += &format!("{key} = {value}\n");
            }
        }
        for table in &self.tables {
            text += &format!(
                "\n[[outbox]]\ntable = {}\nexchange = {}\n",
                s(&table.to_string()),
                s(&self.exchange)
            );
            if let Some(mode) = self.on_published {
                text += &format!("on_published = {}\n", s(mode));
            }
        }
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(path)
            .with_context(|| format!("writing {}", path.display()))?;
        file.write_all(text.as_bytes())?;
        Ok(path.to_owned())
    }
}

/// The `rabbitmq.connection_name` of every relay the bench starts. The relay names its
/// connection exactly so, or (before the one-connection redesign) "<name> <schema.table>" per
/// table: either way the client-provided name starts with it.
pub fn relay_connection_name(env: &BenchEnv) -> String {
    format!("{} relay", env.exchange)
}

/// Runs `outbox-relay --config FILE migrate` and fails with its output when it fails.
pub async fn migrate(bin: &Path, config: &Path, log: &Path) -> anyhow::Result<()> {
    let out = Command::new(bin)
        .arg("--config")
        .arg(config)
        .arg("migrate")
        .stdin(Stdio::null())
        .env("NO_COLOR", "1")
        .kill_on_drop(true)
        .output()
        .await
        .with_context(|| format!("starting {}", bin.display()))?;
    let mut text = out.stdout.clone();
    text.extend_from_slice(&out.stderr);
    let _ = std::fs::write(log, &text);
    if !out.status.success() {
        anyhow::bail!(
            "`outbox-relay migrate` failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&text).trim()
        );
    }
    Ok(())
}

/// CPU time and memory of a process, from /proc.
#[derive(Debug, Clone, Copy, Default)]
pub struct Usage {
    /// utime + stime, seconds.
    pub cpu_s: f64,
    /// VmHWM: the peak resident set size, MiB.
    pub peak_rss_mib: f64,
}

/// A running `outbox-relay run`.
pub struct RelayProcess {
    child: Child,
    pub pid: u32,
    log: PathBuf,
    pub started: Instant,
}

impl RelayProcess {
    /// Starts the relay with `config`; its stdout and stderr go to `log`.
    pub fn start(bin: &Path, config: &Path, log: &Path) -> anyhow::Result<RelayProcess> {
        let file =
            std::fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
        let err = file.try_clone()?;
        let started = Instant::now();
        let child = Command::new(bin)
            .arg("--config")
            .arg(config)
            .arg("run")
            .stdin(Stdio::null())
            .env("NO_COLOR", "1")
            .stdout(file)
            .stderr(err)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let pid = child
            .id()
            .ok_or_else(|| anyhow::anyhow!("the relay exited at once; see {}", log.display()))?;
        Ok(RelayProcess {
            child,
            pid,
            log: log.to_owned(),
            started,
        })
    }

    /// Fails (with the end of its log) if the relay has exited.
    pub fn check_alive(&mut self) -> anyhow::Result<()> {
        if let Some(status) = self.child.try_wait()? {
            anyhow::bail!("the relay exited early ({status}): {}", self.log_tail());
        }
        Ok(())
    }

    /// CPU seconds and peak RSS so far.
    pub fn usage(&self) -> anyhow::Result<Usage> {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid))
            .with_context(|| format!("reading /proc/{}/stat", self.pid))?;
        // Fields after the command name (which may contain spaces) start with the state, so
        // utime and stime (fields 14 and 15 of proc(5)) are the 12th and 13th after it.
        let after = stat
            .rsplit_once(')')
            .map(|(_, rest)| rest)
            .ok_or_else(|| anyhow::anyhow!("unexpected /proc/{}/stat", self.pid))?;
        let fields: Vec<&str> = after.split_whitespace().collect();
        let ticks = |i: usize| {
            fields
                .get(i)
                .and_then(|f| f.parse::<u64>().ok())
                .unwrap_or(0)
        };
        // SAFETY: sysconf only reads a system constant.
        let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
        let cpu_s = (ticks(11) + ticks(12)) as f64 / per_second;
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid))?;
        let hwm_kib = status
            .lines()
            .find(|l| l.starts_with("VmHWM:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0);
        Ok(Usage {
            cpu_s,
            peak_rss_mib: hwm_kib as f64 / 1024.0,
        })
    }

    /// Reads the usage, then stops the relay with SIGTERM as systemd would, and checks that it
    /// drained and exited cleanly.
    pub async fn stop(mut self) -> anyhow::Result<Usage> {
        self.check_alive()?;
        let usage = self.usage()?;
        // SAFETY: signalling our own child, whose pid is still ours (it has not been reaped).
        unsafe {
            libc::kill(self.pid as libc::pid_t, libc::SIGTERM);
        }
        match tokio::time::timeout(Duration::from_secs(30), self.child.wait()).await {
            Ok(Ok(status)) if status.success() => Ok(usage),
            Ok(Ok(status)) => anyhow::bail!(
                "the relay exited with {status} after SIGTERM: {}",
                self.log_tail()
            ),
            Ok(Err(e)) => Err(e.into()),
            Err(_) => {
                let _ = self.child.kill().await;
                anyhow::bail!(
                    "the relay did not stop within 30 s of SIGTERM: {}",
                    self.log_tail()
                )
            }
        }
    }

    /// Sends `signal` (SIGSTOP, SIGCONT) to the relay, which stays the bench's child.
    pub fn signal(&mut self, signal: libc::c_int) -> anyhow::Result<()> {
        self.check_alive()?;
        // SAFETY: signalling our own child, whose pid is still ours (it has not been reaped).
        if unsafe { libc::kill(self.pid as libc::pid_t, signal) } != 0 {
            anyhow::bail!(
                "signal {signal} to the relay {}: {}",
                self.pid,
                std::io::Error::last_os_error()
            );
        }
        Ok(())
    }

    /// SIGKILL, as a crash would: no drain, no hand-over. Returns once the relay is reaped.
    pub async fn kill(mut self) -> anyhow::Result<()> {
        self.signal(libc::SIGKILL)?;
        self.child
            .wait()
            .await
            .with_context(|| format!("reaping the killed relay {}", self.pid))?;
        Ok(())
    }

    pub fn log_path(&self) -> &Path {
        &self.log
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let tail = lines[lines.len().saturating_sub(10)..].join("\n");
        format!("{} (log {})", tail.trim(), self.log.display())
    }
}

/// The warnings and errors in relay logs (text format: the level is a line's second field),
/// with the first few distinct ones, to show a run's trouble beside its figures.
#[derive(Debug, Clone, Default)]
pub struct LogProblems {
    pub warnings: u64,
    pub errors: u64,
    /// The first line of up to three distinct messages, without its timestamp.
    pub first: Vec<String>,
}

impl LogProblems {
    const KEPT: usize = 3;

    /// Adds what the log at `path` holds (nothing if it cannot be read).
    pub fn read(&mut self, path: &Path) {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        for line in text.lines() {
            let mut fields = line.split_whitespace();
            let (Some(_time), Some(level)) = (fields.next(), fields.next()) else {
                continue;
            };
            match level {
                "WARN" => self.warnings += 1,
                "ERROR" => self.errors += 1,
                _ => continue,
            }
            let said: String = line
                .split_once(level)
                .map_or(line, |(_, rest)| rest)
                .trim()
                .chars()
                .take(200)
                .collect();
            let said = format!("{level} {said}");
            // Distinct by the message, not by its fields (the same warning for each table).
            let message = |l: &str| -> String {
                l.split_whitespace()
                    .take_while(|w| !w.contains('='))
                    .collect::<Vec<_>>()
                    .join(" ")
            };
            if self.first.len() < Self::KEPT
                && !self.first.iter().any(|f| message(f) == message(&said))
            {
                self.first.push(said);
            }
        }
    }

    pub fn is_empty(&self) -> bool {
        self.warnings == 0 && self.errors == 0
    }
}

/// Busy and total CPU time of the whole machine so far (jiffies, from /proc/stat), to tell a
/// CPU-bound run (every core busy) from one that waits on round trips.
#[derive(Debug, Clone, Copy)]
pub struct HostCpu {
    busy: u64,
    total: u64,
}

impl HostCpu {
    pub fn now() -> Option<HostCpu> {
        let stat = std::fs::read_to_string("/proc/stat").ok()?;
        let line = stat.lines().find(|l| l.starts_with("cpu "))?;
        let v: Vec<u64> = line
            .split_whitespace()
            .skip(1)
            .filter_map(|f| f.parse().ok())
            .collect();
        // user nice system idle iowait irq softirq steal (guest time is inside user).
        let total: u64 = v.iter().take(8).sum();
        let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
        Some(HostCpu {
            busy: total.saturating_sub(idle),
            total,
        })
    }

    /// Fraction of all CPUs that were busy since `earlier` (0 to 1).
    pub fn busy_since(&self, earlier: &HostCpu) -> f64 {
        let total = self.total.saturating_sub(earlier.total);
        if total == 0 {
            return 0.0;
        }
        self.busy.saturating_sub(earlier.busy) as f64 / total as f64
    }
}

/// CPU seconds per kind of process, to see where a run's CPU went on a shared machine.
#[derive(Debug, Clone, Copy, Default)]
pub struct CpuSplit {
    pub relay_s: f64,
    /// This bench: the raw publisher and the consumer.
    pub bench_s: f64,
    /// Every `beam.smp` process (RabbitMQ).
    pub rabbitmq_s: f64,
    /// Every `postgres` process (all sessions, also other users').
    pub postgresql_s: f64,
    pub other_s: f64,
}

/// utime + stime of every process, by pid, at one moment.
pub struct ProcessCpu {
    ticks: std::collections::HashMap<u32, (String, u64)>,
}

impl ProcessCpu {
    pub fn now() -> ProcessCpu {
        let mut ticks = std::collections::HashMap::new();
        if let Ok(dir) = std::fs::read_dir("/proc") {
            for entry in dir.flatten() {
                let Some(pid) = entry
                    .file_name()
                    .to_str()
                    .and_then(|n| n.parse::<u32>().ok())
                else {
                    continue;
                };
                let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
                    continue;
                };
                let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
                    continue;
                };
                let comm = stat[open + 1..close].to_owned();
                let fields: Vec<&str> = stat[close + 1..].split_whitespace().collect();
                let t = |i: usize| {
                    fields
                        .get(i)
                        .and_then(|f| f.parse::<u64>().ok())
                        .unwrap_or(0)
                };
                ticks.insert(pid, (comm, t(11) + t(12)));
            }
        }
        ProcessCpu { ticks }
    }

    /// CPU used since `earlier`, split by kind; `relays` are the pids of the relays that ran.
    /// Processes that started in between count from zero; ones that ended are lost.
    pub fn since(&self, earlier: &ProcessCpu, relays: &[u32]) -> CpuSplit {
        // SAFETY: sysconf only reads a system constant.
        let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
        let me = std::process::id();
        let mut split = CpuSplit::default();
        for (pid, (comm, now)) in &self.ticks {
            let before = earlier.ticks.get(pid).map_or(0, |(_, t)| *t);
            let s = now.saturating_sub(before) as f64 / per_second;
            let slot = if relays.contains(pid) {
                &mut split.relay_s
            } else if *pid == me {
                &mut split.bench_s
            } else if comm == "beam.smp" {
                &mut split.rabbitmq_s
            } else if comm == "postgres" {
                &mut split.postgresql_s
            } else {
                &mut split.other_s
            };
            *slot += s;
        }
        split
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_problems_count_warnings_and_errors_and_keep_each_message_once() {
        let path = std::env::temp_dir().join(format!("obr-bench-log-{}.log", std::process::id()));
        std::fs::write(
            &path,
            "2026-12-01T20:43:54.59Z  INFO outbox-relay starting tables=a\n\
             2026-12-01T20:43:54.63Z  WARN PostgreSQL unavailable; retrying table=t4 error=x\n\
             2026-12-01T20:43:54.64Z  WARN PostgreSQL unavailable; retrying table=t5 error=x\n\
             2026-12-01T20:43:54.65Z ERROR the relay gave up\n",
        )
        .unwrap();
        let mut log = LogProblems::default();
        log.read(&path);
        let _ = std::fs::remove_file(&path);
        assert_eq!((log.warnings, log.errors), (2, 1));
        assert_eq!(
            log.first,
            [
                "WARN PostgreSQL unavailable; retrying table=t4 error=x",
                "ERROR the relay gave up"
            ]
        );
    }
}
