//! PostgreSQL clusters of a test's own: made with `initdb` (or, for a streaming standby of
//! another, with `pg_basebackup -R`), each on a free port of 127.0.0.1 with its data, socket and
//! log in a temp dir, run as user `postgres` (`runuser`, so the tests run as root). Stopped and
//! removed when dropped, also when the test panics. The shared server is never touched.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use url::Url;

use crate::faults::signal;
use crate::servers::unique_name;
use crate::wait::TIMEOUT;

/// One cluster: its dir, and the postmaster once started.
pub struct PgCluster {
    child: Option<Child>,
    dir: PathBuf,
    data: PathBuf,
    log: PathBuf,
    bin: PathBuf,
    pub port: u16,
}

/// `pg_hba.conf` of a cluster that trusts everything on loopback, replication included.
const TRUST_LOOPBACK: &str = "local all all trust\nlocal replication all trust\n\
     host all all 127.0.0.1/32 trust\nhost replication all 127.0.0.1/32 trust\n";

impl PgCluster {
    /// A new cluster (`initdb`, trust on loopback, replication allowed), not started: add to
    /// its config or its `pg_hba.conf` first, then [`PgCluster::start`].
    pub fn init(prefix: &str) -> anyhow::Result<PgCluster> {
        let cluster = PgCluster::empty(prefix)?;
        cluster.as_postgres(
            "initdb",
            Command::new(cluster.bin.join("initdb"))
                .arg("-D")
                .arg(&cluster.data)
                .args([
                    "-U",
                    "postgres",
                    "-A",
                    "trust",
                    "--no-sync",
                    "--no-instructions",
                ]),
        )?;
        std::fs::write(cluster.data.join("pg_hba.conf"), TRUST_LOOPBACK)?;
        let port = cluster.port;
        cluster.configure(&format!(
            "\n# outbox-relay test kit: a cluster of one test\n\
             port = {port}\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = '{}'\n\
             fsync = off\nshared_buffers = '16MB'\nmax_connections = 30\nlog_connections = on\n",
            cluster.dir.display()
        ))?;
        Ok(cluster)
    }

    /// A streaming standby of `primary` (which must run): `pg_basebackup -R` through a
    /// replication slot of its own, so the primary keeps the WAL until the standby has it; on a
    /// port and in a dir of its own. Not started.
    pub fn standby_of(primary: &PgCluster, prefix: &str) -> anyhow::Result<PgCluster> {
        let cluster = PgCluster::empty(prefix)?;
        let slot = unique_name("obr_slot");
        cluster.as_postgres(
            "pg_basebackup",
            Command::new(cluster.bin.join("pg_basebackup"))
                .args(["-h", "127.0.0.1", "-U", "postgres", "-X", "stream", "-R"])
                .args(["-c", "fast", "--no-sync", "-C", "-S", &slot])
                .arg("-p")
                .arg(primary.port.to_string())
                .arg("-D")
                .arg(&cluster.data),
        )?;
        // The copied config is the primary's: later lines win.
        cluster.configure(&format!(
            "\n# outbox-relay test kit: a standby of port {}\n\
             port = {}\nunix_socket_directories = '{}'\nhot_standby = on\n",
            primary.port,
            cluster.port,
            cluster.dir.display()
        ))?;
        Ok(cluster)
    }

    /// A dir and a port, nothing in the dir yet; removed when dropped.
    fn empty(prefix: &str) -> anyhow::Result<PgCluster> {
        let bin = postgres_bin_dir()?;
        let dir = std::env::temp_dir().join(unique_name(prefix));
        std::fs::create_dir_all(&dir)?;
        let cluster = PgCluster {
            child: None,
            data: dir.join("data"),
            log: dir.join("postgres.log"),
            dir,
            bin,
            port: free_port()?,
        };
        let (uid, gid) = (postgres_id("-u")?, postgres_id("-g")?);
        std::os::unix::fs::chown(&cluster.dir, Some(uid), Some(gid))?;
        Ok(cluster)
    }

    /// Runs `command` as user `postgres`; fails with its error output.
    fn as_postgres(&self, what: &str, command: &mut Command) -> anyhow::Result<()> {
        let mut runuser = Command::new("runuser");
        runuser
            .args(["-u", "postgres", "--"])
            .arg(command.get_program())
            .args(command.get_args())
            .stdin(Stdio::null());
        let out = runuser
            .output()
            .with_context(|| format!("running {what} with runuser"))?;
        if !out.status.success() {
            bail!(
                "{what} failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(())
    }

    /// The cluster's data directory (owned by `postgres`).
    pub fn data(&self) -> &Path {
        &self.data
    }

    /// Appends `text` to `postgresql.conf`.
    pub fn configure(&self, text: &str) -> anyhow::Result<()> {
        let mut conf = std::fs::OpenOptions::new()
            .append(true)
            .open(self.data.join("postgresql.conf"))?;
        std::io::Write::write_all(&mut conf, text.as_bytes())?;
        Ok(())
    }

    /// Starts the postmaster and waits until it takes connections (a standby: read-only ones).
    pub fn start(&mut self) -> anyhow::Result<()> {
        let out = std::fs::File::options()
            .create(true)
            .append(true)
            .open(&self.log)?;
        let child = self.child.insert(
            Command::new("runuser")
                .args(["-u", "postgres", "--"])
                .arg(self.bin.join("postgres"))
                .arg("-D")
                .arg(&self.data)
                .stdin(Stdio::null())
                .stdout(Stdio::from(out.try_clone()?))
                .stderr(Stdio::from(out))
                .spawn()
                .context("starting postgres with runuser")?,
        );
        let pid_file = self.data.join("postmaster.pid");
        wait_until_ready("the test's PostgreSQL", child, &self.log, || {
            // The postmaster's status is the pid file's eighth line: "ready" once it accepts
            // connections, "standby" once a standby accepts read-only ones.
            std::fs::read_to_string(&pid_file).is_ok_and(|pid| {
                pid.lines()
                    .nth(7)
                    .is_some_and(|l| matches!(l.trim(), "ready" | "standby"))
            })
        })
    }

    /// Stops the server with a fast shutdown (sessions ended; a primary's walsenders first send
    /// every WAL record to the connected standbys) and waits for it to exit.
    pub fn stop(&mut self) {
        let pid = self.postmaster_pid();
        if let Some(child) = &mut self.child {
            if let Some(pid) = pid {
                signal("-INT", pid);
                let deadline = Instant::now() + Duration::from_secs(15);
                while Instant::now() < deadline && matches!(child.try_wait(), Ok(None)) {
                    std::thread::sleep(Duration::from_millis(50));
                }
                if matches!(child.try_wait(), Ok(None)) {
                    signal("-KILL", pid);
                }
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        self.child = None;
    }

    /// Promotes a standby (`pg_ctl promote`) and waits until it takes writes.
    pub fn promote(&self) -> anyhow::Result<()> {
        self.as_postgres(
            "pg_ctl promote",
            Command::new(self.bin.join("pg_ctl"))
                .args(["promote", "-w", "-t", "60", "-D"])
                .arg(&self.data),
        )
    }

    /// `postgres://postgres@127.0.0.1:<port>`: the server, for [`crate::setup::Setup::postgres_server`].
    pub fn url(&self) -> Url {
        Url::parse(&format!("postgres://postgres@127.0.0.1:{}", self.port)).expect("a valid URL")
    }

    /// `127.0.0.1:<port>`, as a host of a multi-host `postgres.url`.
    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Connection attempts the server saw so far (`log_connections`).
    pub fn connections(&self) -> usize {
        self.log().matches("connection received").count()
    }

    /// Everything the server logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn postmaster_pid(&self) -> Option<i32> {
        std::fs::read_to_string(self.data.join("postmaster.pid"))
            .ok()?
            .lines()
            .next()?
            .trim()
            .parse()
            .ok()
    }
}

impl Drop for PgCluster {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The `bin` dir of the newest PostgreSQL installed (`/usr/lib/postgresql/<version>/bin`).
fn postgres_bin_dir() -> anyhow::Result<PathBuf> {
    let root = Path::new("/usr/lib/postgresql");
    let newest = std::fs::read_dir(root)
        .with_context(|| format!("reading {} (is PostgreSQL installed?)", root.display()))?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let version: u32 = e.file_name().to_str()?.parse().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").is_file().then_some((version, bin))
        })
        .max_by_key(|(version, _)| *version);
    newest
        .map(|(_, bin)| bin)
        .with_context(|| format!("no PostgreSQL with initdb under {}", root.display()))
}

/// The uid (`-u`) or gid (`-g`) of the `postgres` user.
pub(crate) fn postgres_id(which: &str) -> anyhow::Result<u32> {
    let out = Command::new("id")
        .args([which, "postgres"])
        .output()
        .context("running id")?;
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .with_context(|| "no postgres user (is PostgreSQL installed?)".to_string())
}

/// A port of 127.0.0.1 free now.
pub(crate) fn free_port() -> anyhow::Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").context("finding a free port")?;
    Ok(listener.local_addr()?.port())
}

/// The last lines of a server's log, for an error.
fn tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

/// Polls `ready` every 50 ms until it holds; fails when `child` exits first or after
/// [`TIMEOUT`], with the server's log.
pub(crate) fn wait_until_ready(
    what: &str,
    child: &mut Child,
    log: &Path,
    mut ready: impl FnMut() -> bool,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        if ready() {
            return Ok(());
        }
        if let Some(status) = child.try_wait()? {
            bail!(
                "{what} exited ({status}) before it was ready:\n{}",
                tail(log)
            );
        }
        if Instant::now() > deadline {
            bail!("{what} was not ready within {TIMEOUT:?}:\n{}", tail(log));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
