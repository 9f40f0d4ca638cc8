//! The real `outbox-relay` binary: where it is for the tests and for the tools, and, for the
//! tests, `outbox-relay run` as a child process with its log in the test's temp dir. The tools
//! look beside their own executable (cargo puts every binary of the workspace in one
//! directory), and build it first when started with `cargo run`, so it is never missing or
//! older than the library they were built with.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use anyhow::Context;

use crate::env::TestEnv;
use crate::faults::signal;
use crate::wait::{eventually, TIMEOUT};

/// The relay's binary name.
pub const BINARY_NAME: &str = "outbox-relay";

/// The relay binary for the tests: the one cargo built for this test run
/// (`CARGO_BIN_EXE_outbox-relay`, which `cargo test` sets for the relay's own tests), else
/// the one in the test executable's target directory.
pub fn binary() -> &'static Path {
    static BINARY: OnceLock<PathBuf> = OnceLock::new();
    BINARY.get_or_init(|| {
        if let Some(path) = std::env::var_os("CARGO_BIN_EXE_outbox-relay") {
            return PathBuf::from(path);
        }
        beside_current_exe().unwrap_or_else(|e| panic!("finding the relay binary: {e:#}"))
    })
}

/// `outbox-relay` in the directory of the running executable, or in the directory above when
/// that is cargo's `deps` (where test executables live). The file may not exist.
pub fn beside_current_exe() -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("finding the running executable")?;
    let mut dir = exe
        .parent()
        .with_context(|| format!("cannot tell the directory of {}", exe.display()))?;
    if dir.file_name().is_some_and(|name| name == "deps") {
        dir = dir.parent().unwrap_or(dir);
    }
    Ok(dir.join(BINARY_NAME))
}

/// The relay binary for the tool of cargo package `package`: `outbox-relay` beside the tool's
/// executable (which may not exist). When the tool was started by `cargo run` (cargo sets
/// `CARGO` and `CARGO_PKG_NAME` for it), the relay is built there first with the same cargo and
/// profile, so `cargo run -p <tool>` works on a fresh checkout and never measures a stale relay.
pub fn beside_tool(package: &str) -> anyhow::Result<PathBuf> {
    let path = beside_current_exe()?;
    let cargo = std::env::var_os("CARGO");
    let started_by_cargo_run = std::env::var("CARGO_PKG_NAME").is_ok_and(|p| p == package);
    if let (Some(cargo), true) = (cargo, started_by_cargo_run) {
        build_with_cargo(Path::new(&cargo), &path)?;
    }
    Ok(path)
}

/// `cargo build --bin outbox-relay` into the directory of `path`: `<target dir>/<profile>/`,
/// whatever target dir or profile the tool was built with.
fn build_with_cargo(cargo: &Path, path: &Path) -> anyhow::Result<()> {
    let profile_dir = path
        .parent()
        .with_context(|| format!("{} has no directory", path.display()))?;
    let target_dir = profile_dir
        .parent()
        .with_context(|| format!("{} is not in a target directory", profile_dir.display()))?;
    let profile = match profile_dir.file_name().and_then(|d| d.to_str()) {
        Some("debug") | None => "dev".to_owned(),
        Some(dir) => dir.to_owned(),
    };
    // The workspace root is two levels above the tool's package (tools/<tool>/).
    let manifest = std::env::var_os("CARGO_MANIFEST_DIR")
        .map(|dir| Path::new(&dir).join("../../Cargo.toml"))
        .context("cargo run did not set CARGO_MANIFEST_DIR")?;
    eprintln!("building the relay binary next to this tool ({profile} profile)");
    let status = std::process::Command::new(cargo)
        .args(["build", "--package", "outbox-relay", "--bin", BINARY_NAME])
        .args(["--profile", &profile])
        .arg("--target-dir")
        .arg(target_dir)
        .arg("--manifest-path")
        .arg(&manifest)
        .stdin(std::process::Stdio::null())
        .status()
        .with_context(|| format!("running {}", cargo.display()))?;
    if !status.success() {
        anyhow::bail!("building the relay binary failed ({status})");
    }
    Ok(())
}

/// `outbox-relay --config <config>` with nothing from the caller's environment: the config is
/// the whole truth.
pub(crate) fn relay_command(config: &Path) -> Command {
    let mut cmd = Command::new(binary());
    cmd.arg("--config").arg(config);
    for (key, _) in std::env::vars() {
        if key.starts_with("OUTBOX_RELAY") || key == "RUST_LOG" || key == "RUST_BACKTRACE" {
            cmd.env_remove(key);
        }
    }
    cmd.stdin(Stdio::null());
    cmd
}

impl TestEnv {
    /// Starts `outbox-relay run` as a child process, logging to a file in the temp dir.
    pub fn start_relay(&self) -> Relay {
        let n = {
            let mut n = self
                .relays_started
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            *n += 1;
            *n
        };
        let log = self.dir.join(format!("relay-{n}.log"));
        let file = std::fs::File::create(&log).expect("create the relay log");
        let child = relay_command(&self.config_path)
            .arg("run")
            .stdout(Stdio::from(file.try_clone().expect("clone the log file")))
            .stderr(Stdio::from(file))
            .spawn()
            .expect("start outbox-relay run");
        Relay {
            child,
            log,
            label: format!("relay {n} of {}", self.name),
            exited: None,
        }
    }
}

/// A running `outbox-relay run`. Killed on drop; its log is printed when the test failed.
pub struct Relay {
    child: Child,
    log: PathBuf,
    label: String,
    exited: Option<ExitStatus>,
}

impl Relay {
    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Sends SIGTERM (graceful drain).
    pub fn sigterm(&self) {
        // Only while not reaped: until then the pid is still our child's.
        if self.exited.is_none() {
            assert!(
                signal("-TERM", self.pid()),
                "kill -TERM {} failed",
                self.pid()
            );
        }
    }

    /// SIGKILLs the relay and reaps it.
    pub fn sigkill(&mut self) {
        if self.exited.is_none() {
            let _ = self.child.kill();
            self.exited = self.child.wait().ok();
        }
    }

    /// Waits for the process to exit; panics after [`TIMEOUT`].
    pub async fn wait_exit(&mut self) -> ExitStatus {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            if let Some(status) = self.exited {
                return status;
            }
            if let Some(status) = self.child.try_wait().expect("poll the relay process") {
                self.exited = Some(status);
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "{} did not exit within {TIMEOUT:?}",
                self.label
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// True while the process runs.
    pub fn is_running(&mut self) -> bool {
        self.exited.is_none() && matches!(self.child.try_wait(), Ok(None))
    }

    /// Waits until the relay's log contains `needle`.
    pub async fn wait_for_log(&self, needle: &str) {
        eventually(
            &format!("{:?} in the log of {}", needle, self.label),
            || async { self.log().contains(needle) },
        )
        .await;
    }

    /// Everything the relay logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.sigkill();
        if std::thread::panicking() {
            let log = self.log();
            let lines: Vec<&str> = log.lines().collect();
            let tail = &lines[lines.len().saturating_sub(80)..];
            eprintln!(
                "---- {} log (last {} lines) ----\n{}\n----",
                self.label,
                tail.len(),
                tail.join("\n")
            );
        }
    }
}
