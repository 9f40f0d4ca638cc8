//! A real systemd, booted with `systemd-nspawn` on a cached minimal Debian tree (made by
//! `scripts/systemd-tree`), for the test that installs the package and drives the unit. Owns
//! the container's life: the boot, commands inside it, and the cleanup of the nspawn process
//! and its cgroups, also when the test fails. Knows nothing of the relay.

use std::fs;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

/// The container's cgroups are made under this prefix, followed by the test process's pid.
const CGROUP_PREFIX: &str = "outbox-relay-test-";
/// The host tools the container needs, and the Debian packages that bring them.
const HOST_TOOLS: [(&str, &str); 3] = [
    ("systemd-nspawn", "systemd-container"),
    ("debootstrap", "debootstrap"),
    ("systemd-machine-id-setup", "systemd"),
];

/// Why this machine cannot boot a container, if it cannot. Installs the missing host tools
/// (`systemd-container`, `debootstrap`) with apt-get first when it can, as `.ci/run` does.
pub fn unavailable() -> Option<String> {
    if !is_root() {
        return Some("the test must run as root (systemd-nspawn, debootstrap, cgroups)".into());
    }
    if cgroup_hierarchies().is_empty() {
        return Some("no cgroup hierarchy found under /sys/fs/cgroup".into());
    }
    let missing: Vec<&str> = HOST_TOOLS
        .iter()
        .filter(|(tool, _)| !on_path(tool))
        .map(|(_, package)| *package)
        .collect();
    if missing.is_empty() {
        return None;
    }
    eprintln!(
        "systemd_boot: installing {} (apt-get, --no-install-recommends)",
        missing.join(" ")
    );
    let installed = Command::new("apt-get")
        .arg("update")
        .status()
        .is_ok_and(|s| s.success())
        && Command::new("apt-get")
            .args(["install", "-y", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()
            .is_ok_and(|s| s.success());
    let still: Vec<&str> = HOST_TOOLS
        .iter()
        .filter(|(tool, _)| !on_path(tool))
        .map(|(tool, _)| *tool)
        .collect();
    (!installed || !still.is_empty()).then(|| {
        format!(
            "{} missing and apt-get could not install {}",
            still.join(", "),
            missing.join(" ")
        )
    })
}

fn is_root() -> bool {
    fs::read_to_string("/proc/self/status").is_ok_and(|s| {
        s.lines()
            .find(|l| l.starts_with("Uid:"))
            .and_then(|l| l.split_whitespace().nth(2))
            == Some("0")
    })
}

fn on_path(tool: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join(tool).is_file()))
        || ["/usr/sbin", "/usr/bin", "/sbin", "/bin"]
            .iter()
            .any(|dir| Path::new(dir).join(tool).is_file())
}

/// The cgroup hierarchies nspawn makes its `payload/` and `supervisor/` cgroups in: on a
/// hybrid host (this one) the unified hierarchy and the named `systemd` one; on a cgroup v2
/// host, the one hierarchy.
fn cgroup_hierarchies() -> Vec<PathBuf> {
    let root = Path::new("/sys/fs/cgroup");
    let hybrid: Vec<PathBuf> = ["unified", "systemd"]
        .iter()
        .map(|h| root.join(h))
        .filter(|h| h.join("cgroup.procs").is_file())
        .collect();
    if !hybrid.is_empty() {
        hybrid
    } else if root.join("cgroup.controllers").is_file() {
        vec![root.to_owned()]
    } else {
        Vec::new()
    }
}

/// The cached tree for this host's Debian release, made first when missing (a few minutes,
/// once; `scripts/systemd-tree` says how, and .ci/run starts it early). The boots never write
/// to it (`--volatile=overlay`).
pub fn cached_tree() -> PathBuf {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/systemd-tree");
    // stderr is inherited: the note that the tree is being made shows while the test waits.
    let out = Command::new(&script)
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .unwrap_or_else(|e| panic!("running {}: {e}", script.display()));
    assert!(
        out.status.success(),
        "{} failed ({}): see its messages above",
        script.display(),
        out.status
    );
    let tree = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    assert!(
        tree.join("usr/bin/systemctl").is_file(),
        "{} has no systemctl",
        tree.display()
    );
    tree
}

fn log_file(path: &Path) -> fs::File {
    fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .unwrap_or_else(|e| panic!("opening {}: {e}", path.display()))
}

fn tail_of(path: &Path, lines: usize) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// A booted container: systemd is its PID 1, the host's network is its network, and every
/// write goes to a tmpfs overlay that vanishes with it. Dropping it shuts it down and removes
/// its cgroups.
pub struct Machine {
    nspawn: Child,
    /// The container's PID 1 (systemd), as the host sees it: commands enter its namespaces.
    leader: u32,
    /// The cgroups made for this container, one per hierarchy (nspawn nests its own in them).
    cgroups: Vec<PathBuf>,
    log: PathBuf,
}

impl Machine {
    /// Boots `tree` as machine `name`, with each `(host dir, container path)` of `binds`
    /// mounted read-only, and waits until its systemd has finished booting. nspawn's console
    /// goes to `log`.
    pub fn boot(tree: &Path, name: &str, binds: &[(&Path, &str)], log: &Path) -> Machine {
        remove_abandoned_cgroups();
        // nspawn without a systemd on the host (--keep-unit) makes payload/ and supervisor/
        // in the cgroup it runs in, and leaves them behind: give it a cgroup of its own, so
        // that a parallel run does not collide with it and the cleanup is exact.
        let cgroups: Vec<PathBuf> = cgroup_hierarchies()
            .iter()
            .map(|h| h.join(format!("{CGROUP_PREFIX}{}", std::process::id())))
            .collect();
        for cgroup in &cgroups {
            fs::create_dir_all(cgroup)
                .unwrap_or_else(|e| panic!("creating the cgroup {}: {e}", cgroup.display()));
        }
        let mut args: Vec<String> = [
            "-q",
            "--boot",
            "--register=no",
            "--keep-unit",
            "--console=read-only",
            "--volatile=overlay",
        ]
        .iter()
        .map(|a| a.to_string())
        .collect();
        args.push(format!("--directory={}", tree.display()));
        args.push(format!("--machine={name}"));
        for (host, inside) in binds {
            args.push(format!("--bind-ro={}:{inside}", host.display()));
        }
        // The shell moves itself into the cgroups, then becomes nspawn; setpriv makes nspawn
        // stop the container should this test process die without running its drops.
        let nspawn = Command::new("sh")
            .arg("-c")
            .arg(
                r#"for cg in $CGROUPS; do echo $$ > "$cg/cgroup.procs" || exit 1; done
                exec setpriv --pdeathsig SIGTERM -- systemd-nspawn "$@""#,
            )
            .arg("sh")
            .args(&args)
            .env(
                "CGROUPS",
                cgroups
                    .iter()
                    .map(|c| c.display().to_string())
                    .collect::<Vec<_>>()
                    .join(" "),
            )
            .stdin(Stdio::null())
            .stdout(log_file(log))
            .stderr(log_file(log))
            .process_group(0)
            .spawn()
            .expect("starting systemd-nspawn");
        let mut machine = Machine {
            leader: 0,
            nspawn,
            cgroups,
            log: log.to_owned(),
        };
        machine.leader = machine.wait_for_leader();
        let private = format!("/proc/{}/root/run/systemd/private", machine.leader);
        machine.wait_until(Duration::from_secs(30), "systemd's private socket", || {
            Path::new(&private).exists()
        });
        let state = machine.run(&["timeout", "60", "systemctl", "is-system-running", "--wait"]);
        let state = String::from_utf8_lossy(&state.stdout).trim().to_owned();
        if state != "running" {
            let failed = machine.run(&["systemctl", "--failed", "--no-legend"]);
            eprintln!(
                "systemd_boot: the container booted {state:?}; failed units:\n{}",
                String::from_utf8_lossy(&failed.stdout)
            );
            assert_eq!(state, "degraded", "the container did not boot");
        }
        machine
    }

    /// Waits for nspawn's child that runs systemd: the container's PID 1.
    fn wait_for_leader(&mut self) -> u32 {
        let nspawn = self.nspawn.id();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(leader) = child_named(nspawn, "systemd") {
                return leader;
            }
            if let Ok(Some(status)) = self.nspawn.try_wait() {
                panic!(
                    "systemd-nspawn exited ({status}):\n{}",
                    tail_of(&self.log, 40)
                );
            }
            assert!(
                Instant::now() < deadline,
                "no systemd in the container after 30 s:\n{}",
                tail_of(&self.log, 40)
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Polls `check` every 100 ms until it holds; panics after `limit` naming `what`.
    pub fn wait_until(&self, limit: Duration, what: &str, mut check: impl FnMut() -> bool) {
        let deadline = Instant::now() + limit;
        while !check() {
            assert!(
                Instant::now() < deadline,
                "timed out after {limit:?} waiting for {what}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Runs `args` inside the container (all its namespaces, a clean environment) and returns
    /// what it did, whatever its exit status.
    pub fn run(&self, args: &[&str]) -> Output {
        Command::new("nsenter")
            .args(["-t", &self.leader.to_string(), "-a", "--"])
            .args(args)
            .env_clear()
            .env(
                "PATH",
                "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            )
            .env("LANG", "C.UTF-8")
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("running {args:?} in the container: {e}"))
    }

    /// Runs `args` inside the container, asserts that it succeeded, and returns its stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "{args:?} failed in the container ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Writes a file inside the container (through its root, as root) with `mode`.
    pub fn write(&self, path: &str, contents: &str, mode: u32) {
        use std::os::unix::fs::PermissionsExt;
        let host = self.path(path);
        if let Some(dir) = host.parent() {
            fs::create_dir_all(dir).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
        }
        fs::write(&host, contents).unwrap_or_else(|e| panic!("writing {path}: {e}"));
        fs::set_permissions(&host, fs::Permissions::from_mode(mode))
            .unwrap_or_else(|e| panic!("chmod {path}: {e}"));
    }

    /// `path` inside the container, as the host reaches it.
    pub fn path(&self, path: &str) -> PathBuf {
        PathBuf::from(format!("/proc/{}/root{path}", self.leader))
    }

    /// Shuts the container down: SIGTERM to nspawn (systemd in the container powers off),
    /// SIGKILL if that takes more than 15 s.
    fn shut_down(&mut self) -> Option<ExitStatus> {
        let pid = self.nspawn.id().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            match self.nspawn.try_wait() {
                Ok(Some(status)) => return Some(status),
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(50))
                }
                _ => break,
            }
        }
        eprintln!("systemd_boot: the container did not stop within 15 s; SIGKILL");
        let _ = self.nspawn.kill();
        self.nspawn.wait().ok()
    }
}

impl Drop for Machine {
    fn drop(&mut self) {
        let status = self.shut_down();
        for cgroup in &self.cgroups {
            if let Err(e) = remove_cgroup(cgroup) {
                eprintln!(
                    "systemd_boot: could not remove the cgroup {}: {e}",
                    cgroup.display()
                );
            }
        }
        if std::thread::panicking() {
            eprintln!(
                "systemd_boot: nspawn exited {status:?}; the end of its console:\n{}",
                tail_of(&self.log, 40)
            );
        }
    }
}

/// The child of `parent` whose command is `name`.
fn child_named(parent: u32, name: &str) -> Option<u32> {
    fs::read_dir("/proc").ok()?.flatten().find_map(|entry| {
        let pid: u32 = entry.file_name().to_str()?.parse().ok()?;
        let stat = fs::read_to_string(entry.path().join("stat")).ok()?;
        // pid (comm) state ppid ...; comm may hold spaces and parentheses.
        let (comm, rest) = stat.split_once(" (")?.1.rsplit_once(") ")?;
        let ppid: u32 = rest.split_whitespace().nth(1)?.parse().ok()?;
        (ppid == parent && comm == name).then_some(pid)
    })
}

/// Removes a cgroup and the ones nspawn and the container made in it, deepest first; retries
/// for a few seconds while the container's last processes are still leaving.
fn remove_cgroup(cgroup: &Path) -> std::io::Result<()> {
    if !cgroup.exists() {
        return Ok(());
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let mut dirs = Vec::new();
        collect_dirs(cgroup, &mut dirs);
        // Children were pushed after their parents.
        let result = dirs.iter().rev().try_for_each(fs::remove_dir);
        match result {
            Ok(()) => return Ok(()),
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(100)),
            Err(e) => return Err(e),
        }
    }
}

fn collect_dirs(dir: &Path, out: &mut Vec<PathBuf>) {
    out.push(dir.to_owned());
    if let Ok(entries) = fs::read_dir(dir) {
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                collect_dirs(&entry.path(), out);
            }
        }
    }
}

/// Removes the cgroups of earlier runs whose test process is gone (killed before its drops
/// ran; setpriv has stopped their containers).
fn remove_abandoned_cgroups() {
    for hierarchy in cgroup_hierarchies() {
        let Ok(entries) = fs::read_dir(&hierarchy) else {
            continue;
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let Some(pid) = name.strip_prefix(CGROUP_PREFIX) else {
                continue;
            };
            if pid
                .parse::<u32>()
                .is_ok_and(|pid| !Path::new(&format!("/proc/{pid}")).exists())
            {
                let _ = remove_cgroup(&entry.path());
            }
        }
    }
}
