//! The real `outbox-relay` binary: where it is for the tests and for the tools. The tools look
//! beside their own executable (cargo puts every binary of the workspace in one directory),
//! and build it first when started with `cargo run`, so it is never missing or older than the
//! library they were built with.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use anyhow::Context;

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

/// `cargo build --bin outbox-relay` for the profile whose directory holds `path`.
fn build_with_cargo(cargo: &Path, path: &Path) -> anyhow::Result<()> {
    let profile = match path
        .parent()
        .and_then(Path::file_name)
        .and_then(|d| d.to_str())
    {
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
