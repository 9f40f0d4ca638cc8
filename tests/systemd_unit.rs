//! The systemd unit: `systemd-analyze verify` accepts it without a warning, and the settings the
//! README promises (notify, no restart on a config error, a stop timeout longer than the relay's
//! drain) are in it.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use outbox_relay::config::EX_CONFIG;

const UNIT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/systemd/outbox-relay.service");
const INSTALLED_BINARY: &str = "/usr/bin/outbox-relay";

fn unit_text() -> String {
    std::fs::read_to_string(UNIT).expect("reading the unit file")
}

/// Every value of `key` in the unit, in order (comments skipped).
fn values(unit: &str, key: &str) -> Vec<String> {
    unit.lines()
        .map(str::trim)
        .filter(|l| !l.starts_with('#') && !l.starts_with(';'))
        .filter_map(|l| l.split_once('='))
        .filter(|(k, _)| k.trim() == key)
        .map(|(_, v)| v.trim().to_owned())
        .collect()
}

fn value(unit: &str, key: &str) -> String {
    let found = values(unit, key);
    assert_eq!(
        found.len(),
        1,
        "{key}= should appear once in the unit, found {found:?}"
    );
    found[0].clone()
}

fn seconds(text: &str) -> Duration {
    humantime::parse_duration(text).unwrap_or_else(|e| panic!("{text:?} is not a duration: {e}"))
}

#[test]
fn systemd_analyze_verify_accepts_the_unit_without_warnings() {
    let installed = Command::new("systemd-analyze").arg("--version").output();
    assert!(
        installed.as_ref().is_ok_and(|out| out.status.success()),
        "systemd-analyze is needed to verify the unit: install the Debian package systemd \
         (.ci/run does when it is missing): {installed:?}"
    );
    // The unit runs /usr/bin/outbox-relay (where the package puts it), which verify insists
    // exists and is executable: check a copy that points at the binary cargo just built.
    let unit = unit_text();
    assert!(unit.contains(&format!("ExecStart={INSTALLED_BINARY} ")));
    let copy = unit.replace(
        &format!("ExecStart={INSTALLED_BINARY} "),
        &format!("ExecStart={} ", env!("CARGO_BIN_EXE_outbox-relay")),
    );
    let dir =
        std::env::temp_dir().join(format!("outbox-relay-systemd-unit-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path: PathBuf = dir.join("outbox-relay.service");
    std::fs::write(&path, copy).unwrap();

    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()
        .unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "systemd-analyze verify failed:\n{report}"
    );
    // Unknown or malformed directives are warnings ("..., ignoring") with exit code 0.
    let about_our_unit: Vec<&str> = report
        .lines()
        .filter(|l| {
            l.contains(dir.to_str().unwrap()) || l.contains("outbox-relay") || l.contains("Unknown")
        })
        .collect();
    assert!(
        about_our_unit.is_empty(),
        "systemd-analyze verify warned:\n{report}"
    );
}

#[test]
fn the_unit_runs_the_relay_as_a_notify_service_with_the_documented_config_path() {
    let unit = unit_text();
    assert_eq!(value(&unit, "Type"), "notify");
    assert_eq!(value(&unit, "NotifyAccess"), "main");
    assert_eq!(
        value(&unit, "ExecStart"),
        format!("{INSTALLED_BINARY} --config /etc/outbox-relay/outbox-relay.toml run")
    );
    assert_eq!(
        value(&unit, "EnvironmentFile"),
        "-/etc/outbox-relay/outbox-relay.env"
    );
    assert!(
        values(&unit, "ExecStartPre").is_empty(),
        "migrate is an operator step, not a start step"
    );
}

#[test]
fn the_unit_restarts_on_failure_but_not_on_a_configuration_error() {
    let unit = unit_text();
    assert_eq!(value(&unit, "Restart"), "on-failure");
    assert_eq!(
        value(&unit, "RestartPreventExitStatus"),
        EX_CONFIG.to_string()
    );
    assert!(seconds(&value(&unit, "WatchdogSec")) >= Duration::from_secs(10));
}

#[test]
fn the_unit_waits_longer_for_a_stop_than_the_relay_drains() {
    let unit = unit_text();
    let relay = outbox_relay::config::RelaySettings::default();
    let postgres_statement_timeout = Duration::from_secs(30);
    assert_eq!(value(&unit, "KillSignal"), "SIGTERM");
    // SIGTERM waits up to shutdown_timeout for confirms, then marks what was confirmed (a
    // statement bounded by statement_timeout) before the process exits.
    assert!(
        seconds(&value(&unit, "TimeoutStopSec"))
            > relay.shutdown_timeout + postgres_statement_timeout,
        "TimeoutStopSec must outlast relay.shutdown_timeout plus the final mark"
    );
}

#[test]
fn the_unit_runs_unprivileged_in_a_sandbox() {
    let unit = unit_text();
    assert_eq!(value(&unit, "DynamicUser"), "yes");
    assert_eq!(value(&unit, "CapabilityBoundingSet"), "");
    for (key, expected) in [
        ("NoNewPrivileges", "yes"),
        ("ProtectSystem", "strict"),
        ("ProtectHome", "yes"),
        ("PrivateTmp", "yes"),
        ("PrivateDevices", "yes"),
        ("MemoryDenyWriteExecute", "yes"),
        ("RestrictAddressFamilies", "AF_UNIX AF_INET AF_INET6"),
        ("SystemCallArchitectures", "native"),
    ] {
        assert_eq!(value(&unit, key), expected, "{key}");
    }
    assert!(values(&unit, "SystemCallFilter").contains(&"@system-service".to_owned()));
}
