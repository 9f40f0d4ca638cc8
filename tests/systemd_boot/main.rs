//! The Debian package under a real systemd: a container boots systemd as its PID 1 (see
//! [`container`]), the package is installed there with `dpkg -i` as an operator would install
//! it, configured with its secrets as systemd credentials (`LoadCredential=` through the
//! drop-in the package ships as an example, `url_file` in the config), and the unit is driven
//! with `systemctl`: readiness, `Status:`, rows flowing, the sandbox's rating, the dynamic
//! user, the watchdog, the drain at stop, and a configuration error. It needs root; it is
//! skipped, loudly, only on a machine that cannot boot a container, and fails instead under
//! CI=true.
//!
//! The package is the one scripts/package built with `cargo deb` (scripts/test and .ci/run build
//! it first);
//! `OUTBOX_RELAY_TEST_DEB` names another. The container's tree is cached by
//! `scripts/systemd-tree` in /var/cache/outbox-relay-test/; each boot writes to a tmpfs overlay
//! only.

mod container;

use std::collections::{HashMap, HashSet};
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use outbox_relay_testkit::prelude::*;
use url::Url;

use container::Machine;

const UNIT: &str = "outbox-relay.service";
const CONFIG: &str = "/etc/outbox-relay/outbox-relay.toml";
const CREDENTIALS: &str = "/etc/outbox-relay/credentials";
const DOCS: &str = "/usr/share/doc/outbox-relay";
const DROP_INS: &str = "/etc/systemd/system/outbox-relay.service.d";
/// Where the test's files (the package) appear inside the container.
const SHARED: &str = "/opt/outbox-relay-test";
/// The test's drop-in: a watchdog of seconds rather than the unit's 30 s, and a quick
/// restart, so the watchdog check takes seconds. The unit's own values are checked by
/// tests/systemd_unit.rs.
const TEST_DROP_IN: &str = "[Service]\nWatchdogSec=5s\nRestartSec=1s\n";
const WATCHDOG: Duration = Duration::from_secs(5);
const RESTART: Duration = Duration::from_secs(1);
/// The most the unit's exposure may be rated by `systemd-analyze security` (0 safe, 10 unsafe).
const MAX_EXPOSURE: f64 = 2.0;
/// systemd's range of dynamic users.
const DYNAMIC_UIDS: std::ops::RangeInclusive<u32> = 61184..=65519;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_package_runs_under_a_real_systemd_with_credentials_watchdog_drain_and_sandbox() {
    if let Some(why) = container::unavailable() {
        let message = format!("this machine cannot boot a container: {why}");
        if std::env::var("CI").is_ok_and(|ci| ci == "true") {
            panic!("{message} (CI=true: the real-systemd test may not be skipped)");
        }
        // Straight to stderr: the test harness captures eprintln! of a test that passes.
        let rule = "!".repeat(78);
        let _ = writeln!(
            std::io::stderr().lock(),
            "\n{rule}\nSKIPPED systemd_boot: {message}\n{rule}\n"
        );
        return;
    }
    let clock = Steps::new();
    let deb = package();
    let tree = container::cached_tree();
    clock.step("the cached tree");

    // The relay reaches the broker through a proxy, so that the test can hold its start back.
    let env = TestEnv::new(Setup::new().without_migrate().set(
        "rabbitmq",
        "connect_timeout",
        "\"1s\"",
    ))
    .await;
    let (broker, relay_amqp_url) = broker_proxy(&env.amqp_url).await;
    let pg_url = with_host_password(&env.pg_url);
    fs::copy(&deb, env.dir.join("outbox-relay.deb")).expect("copy the package");
    clock.step("the test's database, exchange and queue");

    let machine = Machine::boot(
        &tree,
        "obr-test",
        &[(env.dir.as_path(), SHARED)],
        &env.dir.join("console.log"),
    );
    clock.step("boot");

    // --- The package, installed as an operator would.
    machine.ok(&["dpkg", "-i", &format!("{SHARED}/outbox-relay.deb")]);
    let status = machine.ok(&[
        "dpkg-query",
        "-W",
        "-f",
        "${Status}|${Conffiles}",
        "outbox-relay",
    ]);
    assert!(status.starts_with("install ok installed|"), "{status}");
    assert!(
        status.contains(CONFIG),
        "the config is not a conffile: {status}"
    );
    for file in [
        "/usr/bin/outbox-relay".to_owned(),
        format!("{DOCS}/README.md"),
        format!("{DOCS}/docs/configuration.md"),
        format!("{DOCS}/outbox-relay.env.example"),
        format!("{DOCS}/credentials.conf.example"),
        "/usr/share/zsh/vendor-completions/_outbox-relay".to_owned(),
        "/usr/share/fish/vendor_completions.d/outbox-relay.fish".to_owned(),
        "/usr/share/man/man1/outbox-relay-run.1.gz".to_owned(),
    ] {
        assert!(machine.path(&file).is_file(), "the package has no {file}");
    }
    // The completions and man pages are the binary's own (generated from its CLI definition):
    // bash completes the commands, and the man page is the program's, in roff.
    let completed = machine.ok(&[
        "bash",
        "-c",
        ". /usr/share/bash-completion/completions/outbox-relay && complete -p outbox-relay",
    ]);
    assert!(completed.contains("outbox-relay"), "{completed}");
    let man = machine.ok(&["sh", "-c", "zcat /usr/share/man/man1/outbox-relay.1.gz"]);
    assert!(
        man.contains(".TH outbox-relay 1") && man.contains("outbox\\-relay\\-migrate(1)"),
        "the man page is not outbox-relay(1) listing its commands:\n{man}"
    );
    assert_eq!(
        mode_of(&machine.path(CONFIG)),
        0o644,
        "{CONFIG} must be readable by the service"
    );
    // Installed disabled and stopped: the config needs editing first.
    assert_eq!(
        stdout(&machine, &["systemctl", "is-enabled", UNIT]),
        "disabled"
    );
    assert_eq!(
        stdout(&machine, &["systemctl", "is-active", UNIT]),
        "inactive"
    );
    clock.step("dpkg -i");

    // --- Configured: the config without secrets, the URLs as root-only credentials, the
    // package's example drop-in for LoadCredential=, and the schema.
    machine.write(CONFIG, &with_url_files(&env.config_path), 0o644);
    machine.ok(&["install", "-d", "-m", "0700", CREDENTIALS]);
    // Written the way an editor leaves a file: with a trailing newline.
    machine.write(
        &format!("{CREDENTIALS}/postgres.url"),
        &format!("{pg_url}\n"),
        0o600,
    );
    machine.write(
        &format!("{CREDENTIALS}/rabbitmq.url"),
        &format!("{relay_amqp_url}\n"),
        0o600,
    );
    machine.ok(&[
        "install",
        "-D",
        "-m",
        "0644",
        &format!("{DOCS}/credentials.conf.example"),
        &format!("{DROP_INS}/credentials.conf"),
    ]);
    machine.write(&format!("{DROP_INS}/test.conf"), TEST_DROP_IN, 0o644);
    machine.ok(&["systemctl", "daemon-reload"]);
    // The README's way to run a command with the service's secrets: the credentials' IDs are
    // their file names, so their directory serves as $CREDENTIALS_DIRECTORY.
    machine.ok(&[
        "env",
        &format!("CREDENTIALS_DIRECTORY={CREDENTIALS}"),
        "outbox-relay",
        "migrate",
    ]);
    clock.step("config, credentials, drop-ins, migrate");

    // --- The start waits for READY=1: with the broker unreachable the unit stays
    // "activating", and its status names the table and why; once the broker answers, the
    // relay is ready and the unit active.
    broker.set_silent(true);
    machine.ok(&["systemctl", "enable", "--now", "--no-block", UNIT]);
    machine.wait_until(
        Duration::from_secs(30),
        "a status naming the broker outage",
        || {
            show(&machine, &["StatusText"])["StatusText"]
                .starts_with("public.outbox: not ready: RabbitMQ")
        },
    );
    let held = show(&machine, &["ActiveState", "SubState", "StatusText"]);
    assert_eq!(
        (held["ActiveState"].as_str(), held["SubState"].as_str()),
        ("activating", "start"),
        "the start did not wait for READY=1: {held:?}"
    );
    broker.heal();
    machine.wait_until(Duration::from_secs(30), "the unit to become active", || {
        show(&machine, &["ActiveState"])["ActiveState"] == "active"
    });
    let ready = show(
        &machine,
        &["SubState", "StatusText", "MainPID", "NRestarts"],
    );
    assert_eq!(ready["SubState"], "running", "{ready:?}");
    assert_eq!(ready["StatusText"], "public.outbox: relaying", "{ready:?}");
    assert_eq!(ready["NRestarts"], "0", "{ready:?}");
    let status = stdout(&machine, &["systemctl", "status", "--no-pager", UNIT]);
    assert!(
        status.contains("Status: \"public.outbox: relaying\""),
        "systemctl status shows no Status: line naming the table:\n{status}"
    );
    assert_eq!(
        stdout(&machine, &["systemctl", "is-enabled", UNIT]),
        "enabled"
    );
    clock.step("start, held back until READY=1");

    // --- Rows flow, in order per key.
    let ids = env.insert(&rows_over_keys("first", 4, 40)).await;
    let received = env.consumer.wait_for(ids.len()).await;
    assert_first_deliveries_in_id_order(&received);
    assert_eq!(
        delivered_ids(&received),
        ids.iter().copied().collect::<HashSet<_>>()
    );
    clock.step("rows flow");

    // --- DynamicUser with the config readable and the secrets read from root-only files
    // through $CREDENTIALS_DIRECTORY; no secret in the journal.
    let pid = ready["MainPID"].clone();
    let uid = uid_of(&machine, &pid);
    assert!(
        DYNAMIC_UIDS.contains(&uid),
        "the relay runs as uid {uid}, not a dynamic user"
    );
    for credential in ["postgres.url", "rabbitmq.url"] {
        let path = machine.path(&format!("{CREDENTIALS}/{credential}"));
        assert_eq!(mode_of(&path), 0o600, "{credential} should be root-only");
    }
    let journal = unit_journal(&machine);
    assert!(
        journal.contains("guest:***@"),
        "the journal shows no redacted URL:\n{journal}"
    );
    for secret in secrets(&[&pg_url, &relay_amqp_url]) {
        assert!(
            !journal.contains(&secret),
            "the journal shows a password:\n{journal}"
        );
    }

    // --- The sandbox, as systemd inside rates it.
    let security = stdout(
        &machine,
        &["systemd-analyze", "security", "--no-pager", UNIT],
    );
    let exposure = overall_exposure(&security);
    assert!(
        exposure <= MAX_EXPOSURE,
        "systemd-analyze security rates the unit {exposure} (at most {MAX_EXPOSURE}):\n{security}"
    );
    clock.step(&format!("dynamic user {uid}, secrets, exposure {exposure}"));

    // --- A relay that stops feeding the watchdog is killed and restarted by systemd.
    let restarts: u32 = show(&machine, &["NRestarts"])["NRestarts"].parse().unwrap();
    machine.ok(&[
        "systemctl",
        "kill",
        "--kill-who=main",
        "--signal=SIGSTOP",
        UNIT,
    ]);
    let frozen = Instant::now();
    machine.wait_until(
        WATCHDOG + RESTART + Duration::from_secs(30),
        "systemd to restart the frozen relay",
        || {
            let now = show(&machine, &["ActiveState", "MainPID", "NRestarts"]);
            now["ActiveState"] == "active"
                && now["MainPID"] != pid
                && now["NRestarts"].parse::<u32>().is_ok_and(|n| n > restarts)
        },
    );
    let restarted_after = frozen.elapsed();
    assert!(
        restarted_after >= WATCHDOG,
        "restarted {restarted_after:?} after the freeze, before WatchdogSec={WATCHDOG:?}"
    );
    let journal = unit_journal(&machine);
    assert!(
        journal.contains("Watchdog timeout"),
        "no watchdog timeout in the journal:\n{journal}"
    );
    let ids = env.insert(&rows_over_keys("second", 4, 20)).await;
    let received = env.consumer.wait_for(40 + ids.len()).await;
    assert!(ids.iter().all(|id| delivered_ids(&received).contains(id)));
    clock.step(&format!(
        "watchdog: killed and restarted {restarted_after:.1?} after SIGSTOP"
    ));

    // --- `systemctl stop` drains: a backlog is being sent; the relay stops fetching, marks
    // every row the broker confirmed, and exits 0.
    let backlog = env.insert(&rows_over_keys("third", 8, 3000)).await;
    // Stopped while the backlog is going out, not before it starts nor after it ends.
    let before = env.consumer.unique_count();
    tokio::time::timeout(Duration::from_secs(30), async {
        while env.consumer.unique_count() < before + 100 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await
    .expect("the backlog to start flowing");
    machine.ok(&["systemctl", "stop", UNIT]);
    let stopped = show(
        &machine,
        &["ActiveState", "Result", "ExecMainCode", "ExecMainStatus"],
    );
    assert_eq!(
        (
            stopped["ActiveState"].as_str(),
            stopped["Result"].as_str(),
            stopped["ExecMainCode"].as_str(),
            stopped["ExecMainStatus"].as_str()
        ),
        ("inactive", "success", "1", "0"),
        "the relay did not exit 0 at stop (ExecMainCode 1 is 'exited'): {stopped:?}"
    );
    env.wait_until_queue_is_settled().await;
    let delivered = delivered_ids(&env.consumer.received());
    let published = published_ids(&env).await;
    let unmarked: Vec<&i64> = delivered.difference(&published).collect();
    assert!(
        unmarked.is_empty(),
        "rows delivered but not marked published after the drain: {unmarked:?}"
    );
    let sent = backlog.iter().filter(|id| delivered.contains(id)).count();
    let journal = unit_journal(&machine);
    assert!(
        journal.contains("shutting down: no new fetches, draining in-flight confirms"),
        "{journal}"
    );
    clock.step(&format!(
        "stop: drained, exit 0 ({sent} of {} backlog rows sent, all marked)",
        backlog.len()
    ));

    // --- A configuration error (here an empty credential) exits 78 and is not restarted.
    machine.write(&format!("{CREDENTIALS}/postgres.url"), "\n", 0o600);
    let start = machine.run(&["systemctl", "start", UNIT]);
    assert!(
        !start.status.success(),
        "the start with an empty credential succeeded"
    );
    let failed = show(
        &machine,
        &["ActiveState", "Result", "ExecMainStatus", "NRestarts"],
    );
    assert_eq!(
        (
            failed["ActiveState"].as_str(),
            failed["Result"].as_str(),
            failed["ExecMainStatus"].as_str()
        ),
        ("failed", "exit-code", "78"),
        "{failed:?}"
    );
    // Not restarted: still failed, with no new restart, well after RestartSec.
    std::thread::sleep(RESTART * 3);
    let later = show(&machine, &["ActiveState", "NRestarts"]);
    assert_eq!(
        (later["ActiveState"].as_str(), later["NRestarts"].as_str()),
        ("failed", failed["NRestarts"].as_str()),
        "a configuration error was restarted"
    );
    let journal = unit_journal(&machine);
    let named = "postgres.url_file: /run/credentials/outbox-relay.service/postgres.url is empty";
    assert!(
        journal.contains(named),
        "the error does not name the key and the path:\n{journal}"
    );
    assert!(
        stdout(&machine, &["systemctl", "status", "--no-pager", UNIT]).contains("status=78/CONFIG")
    );
    // Fixed, the unit starts again (a blocking start: it returns once READY=1 came).
    machine.write(&format!("{CREDENTIALS}/postgres.url"), &pg_url, 0o600);
    machine.ok(&["systemctl", "start", UNIT]);
    assert_eq!(show(&machine, &["ActiveState"])["ActiveState"], "active");
    clock.step("config error: exit 78, not restarted; fixed, started");

    drop(machine);
    clock.step("shutdown and cleanup");
}

/// Prints how long each step took (the test's own timing, for the README and CI budget).
struct Steps {
    start: Instant,
    last: std::cell::Cell<Instant>,
}

impl Steps {
    fn new() -> Steps {
        let now = Instant::now();
        Steps {
            start: now,
            last: std::cell::Cell::new(now),
        }
    }

    fn step(&self, what: &str) {
        let now = Instant::now();
        eprintln!(
            "systemd_boot: {:>6.1?} (+{:.1?}) {what}",
            now - self.start,
            now - self.last.get()
        );
        self.last.set(now);
    }
}

/// The package scripts/package built for this version (or `$OUTBOX_RELAY_TEST_DEB`); fails when
/// it is missing or older than the files it is made of.
fn package() -> PathBuf {
    if let Some(deb) = std::env::var_os("OUTBOX_RELAY_TEST_DEB") {
        return PathBuf::from(deb);
    }
    let arch = Command::new("dpkg")
        .arg("--print-architecture")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .expect("dpkg --print-architecture");
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(|t| root.join(t))
        .unwrap_or_else(|| root.join("target"));
    let deb = target.join("debian").join(format!(
        "outbox-relay_{}-1_{arch}.deb",
        env!("CARGO_PKG_VERSION")
    ));
    let built = fs::metadata(&deb)
        .and_then(|m| m.modified())
        .unwrap_or_else(|_| {
            panic!(
                "no package at {}: build it with scripts/package (scripts/test and .ci/run do)",
                deb.display()
            )
        });
    let mut sources = Vec::new();
    for name in [
        "Cargo.toml",
        "Cargo.lock",
        "README.md",
        "docs",
        "src",
        "systemd",
        "config",
        "migrations",
    ] {
        files_under(&root.join(name), &mut sources);
    }
    if let Some((newer, _)) = sources
        .iter()
        .filter_map(|f| Some((f, fs::metadata(f).and_then(|m| m.modified()).ok()?)))
        .filter(|(_, changed)| *changed > built)
        .max_by_key(|(_, changed)| *changed)
    {
        panic!(
            "{} is older than {}: rebuild it with scripts/package",
            deb.display(),
            newer.display()
        );
    }
    deb
}

fn files_under(path: &Path, out: &mut Vec<PathBuf>) {
    match fs::read_dir(path) {
        Ok(entries) => entries.flatten().for_each(|e| files_under(&e.path(), out)),
        Err(_) if path.is_file() => out.push(path.to_owned()),
        Err(_) => {}
    }
}

/// The test's config with `url_file` for both servers instead of their URLs.
fn with_url_files(config: &Path) -> String {
    let text = fs::read_to_string(config).expect("read the test's config");
    let mut section = String::new();
    let mut replaced = 0;
    let lines: Vec<String> = text
        .lines()
        .map(|line| {
            if line.starts_with('[') {
                section = line.trim_matches(|c| c == '[' || c == ']').to_owned();
            }
            match section.as_str() {
                "postgres" | "rabbitmq" if line.starts_with("url = ") => {
                    replaced += 1;
                    format!("url_file = \"{section}.url\"")
                }
                _ => line.to_owned(),
            }
        })
        .collect();
    assert_eq!(
        replaced, 2,
        "the test's config has no two url lines:\n{text}"
    );
    lines.join("\n") + "\n"
}

/// `url` with the password the host's clients use, from PGPASSWORD or ~/.pgpass (where
/// scripts/services keeps it when TCP logins need one): the relay in the container has neither.
fn with_host_password(url: &str) -> String {
    let mut url = Url::parse(url).expect("the test database's URL");
    if url.password().is_none() {
        if let Some(password) = std::env::var("PGPASSWORD").ok().or_else(|| pgpass(&url)) {
            url.set_password(Some(&password))
                .expect("a URL with a user");
        }
    }
    url.into()
}

/// The password of the first ~/.pgpass line that matches `url` (fields may be `*`).
fn pgpass(url: &Url) -> Option<String> {
    let file = std::env::var_os("PGPASSFILE")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| Path::new(&home).join(".pgpass")))?;
    let text = fs::read_to_string(file).ok()?;
    let port = url.port().unwrap_or(5432).to_string();
    let wanted = [
        url.host_str()?,
        &port,
        url.path().trim_start_matches('/'),
        url.username(),
    ];
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .map(pgpass_fields)
        .find(|fields| {
            fields.len() == 5
                && fields[..4]
                    .iter()
                    .zip(wanted)
                    .all(|(field, want)| field == "*" || field == want)
        })
        .map(|mut fields| fields.remove(4))
}

/// The `:`-separated fields of a ~/.pgpass line (`\:` and `\\` escaped).
fn pgpass_fields(line: &str) -> Vec<String> {
    let mut fields = vec![String::new()];
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => fields.last_mut().unwrap().extend(chars.next()),
            ':' => fields.push(String::new()),
            c => fields.last_mut().unwrap().push(c),
        }
    }
    fields
}

/// The passwords in `urls` (as written in the URL and decoded), to look for where none may be.
fn secrets(urls: &[&str]) -> Vec<String> {
    let mut out = Vec::new();
    for url in urls {
        let url = Url::parse(url).expect("a URL");
        if let Some(password) = url.password() {
            out.push(format!("{}:{password}@", url.username()));
        }
    }
    out
}

/// `systemctl show` of the unit's `properties`.
fn show(machine: &Machine, properties: &[&str]) -> HashMap<String, String> {
    let text = machine.ok(&["systemctl", "show", UNIT, "-p", &properties.join(",")]);
    text.lines()
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect()
}

/// A command's stdout, trimmed, whatever its exit status (`is-enabled` exits 1 for disabled).
fn stdout(machine: &Machine, args: &[&str]) -> String {
    String::from_utf8_lossy(&machine.run(args).stdout)
        .trim()
        .to_owned()
}

/// The unit's journal of this boot: the relay's lines and systemd's about it.
fn unit_journal(machine: &Machine) -> String {
    machine.ok(&["journalctl", "-b", "-u", UNIT, "-o", "cat", "--no-pager"])
}

/// The real uid of a process in the container.
fn uid_of(machine: &Machine, pid: &str) -> u32 {
    let status = fs::read_to_string(machine.path(&format!("/proc/{pid}/status")))
        .unwrap_or_else(|e| panic!("reading the relay's /proc/{pid}/status: {e}"));
    status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|uid| uid.parse().ok())
        .unwrap_or_else(|| panic!("no Uid in /proc/{pid}/status:\n{status}"))
}

fn mode_of(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    fs::metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o7777
}

/// The number in `→ Overall exposure level for outbox-relay.service: 1.1 OK`.
fn overall_exposure(report: &str) -> f64 {
    report
        .lines()
        .find_map(|l| l.split_once("Overall exposure level for "))
        .and_then(|(_, rest)| rest.split_once(": "))
        .and_then(|(_, rating)| rating.split_whitespace().next())
        .and_then(|number| number.parse().ok())
        .unwrap_or_else(|| panic!("no overall exposure in:\n{report}"))
}

/// Ids of the test table's rows marked published.
async fn published_ids(env: &TestEnv) -> HashSet<i64> {
    let sql = format!(
        "SELECT id FROM {} WHERE published_at IS NOT NULL",
        quoted_table(&env.table)
    );
    sqlx::query_scalar::<_, i64>(&sql)
        .fetch_all(&env.pool)
        .await
        .expect("read the published rows")
        .into_iter()
        .collect()
}
