//! The faults, injected for real at seeded random times: a relay SIGKILLed and restarted, a
//! relay SIGSTOPped past its lease and SIGCONTed, a member joining (one more relay) and leaving
//! (SIGTERM), a second relay on the same table, broker connections closed, the broker stopped
//! and started, resource alarms, PostgreSQL sessions terminated and the server restarted, and
//! network faults through the proxies; and, asked for by name, bad rows and an operator's hand on
//! the table ([`crate::operator`]). Whole-server faults hold the exclusive server-fault lock
//! for their duration only and always restore the server (guards that restore from `Drop`, and a
//! pending file that the next run restores from if this one was killed). Member faults keep
//! between 1 and `--relays` + 1 relays running, and never stop the last one.

use std::fs::File;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use sqlx::Connection;
use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;

use outbox_relay_testkit::proxy::Proxy;
use outbox_relay_testkit::servers::{rabbitmqctl, run_tool, run_tool_blocking, Servers};

use crate::operator::RowFaults;
use crate::relays::Relays;
use crate::setup::World;

/// Every kind of fault the soak injects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum FaultKind {
    RelayKill,
    RelayPause,
    MemberJoin,
    MemberLeave,
    TwoRelays,
    AmqpClose,
    BrokerRestart,
    BrokerAlarm,
    PgTerminate,
    PgRestart,
    NetReset,
    NetSilent,
    NetLatency,
    BadRow,
    Operator,
}

impl FaultKind {
    pub const ALL: [FaultKind; 15] = [
        FaultKind::RelayKill,
        FaultKind::RelayPause,
        FaultKind::MemberJoin,
        FaultKind::MemberLeave,
        FaultKind::TwoRelays,
        FaultKind::AmqpClose,
        FaultKind::BrokerRestart,
        FaultKind::BrokerAlarm,
        FaultKind::PgTerminate,
        FaultKind::PgRestart,
        FaultKind::NetReset,
        FaultKind::NetSilent,
        FaultKind::NetLatency,
        FaultKind::BadRow,
        FaultKind::Operator,
    ];

    pub fn name(self) -> &'static str {
        match self {
            FaultKind::RelayKill => "relay-kill",
            FaultKind::RelayPause => "relay-pause",
            FaultKind::MemberJoin => "member-join",
            FaultKind::MemberLeave => "member-leave",
            FaultKind::TwoRelays => "two-relays",
            FaultKind::AmqpClose => "amqp-close",
            FaultKind::BrokerRestart => "broker-restart",
            FaultKind::BrokerAlarm => "broker-alarm",
            FaultKind::PgTerminate => "pg-terminate",
            FaultKind::PgRestart => "pg-restart",
            FaultKind::NetReset => "net-reset",
            FaultKind::NetSilent => "net-silent",
            FaultKind::NetLatency => "net-latency",
            FaultKind::BadRow => "bad-row",
            FaultKind::Operator => "operator",
        }
    }

    pub fn parse(name: &str) -> Option<FaultKind> {
        FaultKind::ALL.into_iter().find(|k| k.name() == name)
    }

    /// Faults about several members sharing a table: in `all` only with `--relays` >= 2.
    pub fn needs_members(self) -> bool {
        matches!(
            self,
            FaultKind::RelayPause | FaultKind::MemberJoin | FaultKind::MemberLeave
        )
    }

    /// Faults that change the table's rows (bad rows, TRUNCATE, updates by hand): left out of
    /// `all`, asked for by name, since they change what the run's figures count.
    pub fn changes_rows(self) -> bool {
        matches!(self, FaultKind::BadRow | FaultKind::Operator)
    }

    /// Faults that touch the whole server and so need the exclusive lock.
    pub fn is_server_wide(self) -> bool {
        matches!(
            self,
            FaultKind::BrokerRestart | FaultKind::BrokerAlarm | FaultKind::PgRestart
        )
    }
}

/// One injected fault.
#[derive(Debug, Clone)]
pub struct FaultRecord {
    pub kind: FaultKind,
    pub started: Instant,
    /// When the fault condition was lifted (recovery is measured from here).
    pub ended: Instant,
    /// Where "delivery on every partition resuming" is measured from: the moment a relay was
    /// killed, paused, stopped or started (the other members are to take over while it lasts),
    /// otherwise the end of the fault (nobody can deliver while it lasts).
    pub from: Instant,
    /// How many relays the fault hit: each may send its window again.
    pub relays_hit: usize,
    pub detail: String,
}

/// What [`Injector::inject`] did.
struct Injected {
    ended: Instant,
    /// `None`: measured from `ended`.
    from: Option<Instant>,
    relays_hit: usize,
    detail: String,
}

impl Injected {
    /// A fault the relays could only wait out: measured from its end.
    fn lifted(relays_hit: usize, detail: String) -> Injected {
        Injected {
            ended: Instant::now(),
            from: None,
            relays_hit,
            detail,
        }
    }
}

const LOCK_PATH: &str = "/tmp/obr-server-faults.lock";
const PENDING_RESTORE: &str = "/tmp/obr-soak-pending-restore.json";

/// `/tmp/obr-server-faults.lock`: held shared for the whole run (so nobody else's whole-server
/// fault lands in the middle of the soak's figures) and converted to exclusive for the duration
/// of each of the soak's own whole-server faults.
pub struct ServerLock {
    file: Arc<File>,
}

impl ServerLock {
    /// Takes the lock shared, waiting at most `limit`; after that the run goes on without it
    /// (with a warning), since a lock that nobody releases must not stall the soak forever.
    pub async fn shared(limit: Duration) -> anyhow::Result<ServerLock> {
        let file = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(LOCK_PATH)
            .with_context(|| format!("opening {LOCK_PATH}"))?;
        let file = Arc::new(file);
        let deadline = Instant::now() + limit;
        loop {
            let f = file.clone();
            if tokio::task::spawn_blocking(move || f.try_lock_shared().is_ok()).await? {
                break;
            }
            if Instant::now() > deadline {
                eprintln!(
                    "soak: WARNING: {LOCK_PATH} stayed locked exclusively for {limit:?}; running without \
                     the shared lock (whole-server faults will be skipped while it stays locked)"
                );
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        Ok(ServerLock { file })
    }

    /// Converts to exclusive, waiting at most `limit` (or until `stop`); `None` when others
    /// kept it shared.
    async fn exclusive(&self, limit: Duration, stop: &CancellationToken) -> Option<ExclusiveLock> {
        let deadline = Instant::now() + limit;
        loop {
            let f = self.file.clone();
            let got = tokio::task::spawn_blocking(move || {
                // A failed conversion has dropped the shared lock: take it back before waiting.
                let got = f.try_lock().is_ok();
                if !got {
                    let _ = f.lock_shared();
                }
                got
            })
            .await
            .unwrap_or(false);
            if got {
                return Some(ExclusiveLock {
                    file: self.file.clone(),
                });
            }
            if Instant::now() > deadline || stop.is_cancelled() {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// Back to shared when dropped.
struct ExclusiveLock {
    file: Arc<File>,
}

impl Drop for ExclusiveLock {
    fn drop(&mut self) {
        let _ = self.file.lock_shared();
    }
}

/// Restores a server when dropped unless [`Restore::done`] already did. The command is also
/// written to a pending file, so a soak that was SIGKILLed is cleaned up by the next run.
struct Restore {
    command: Vec<String>,
    armed: bool,
}

impl Restore {
    fn arm(command: &[&str]) -> Restore {
        let command: Vec<String> = command.iter().map(|s| s.to_string()).collect();
        let _ = std::fs::write(
            PENDING_RESTORE,
            serde_json::to_string(&command).unwrap_or_default(),
        );
        Restore {
            command,
            armed: true,
        }
    }

    async fn done(mut self) -> anyhow::Result<()> {
        let args: Vec<&str> = self.command[1..].iter().map(String::as_str).collect();
        run_tool(&self.command[0], &args, Duration::from_secs(120)).await?;
        self.armed = false;
        let _ = std::fs::remove_file(PENDING_RESTORE);
        Ok(())
    }
}

impl Drop for Restore {
    fn drop(&mut self) {
        if self.armed {
            eprintln!("soak: restoring the server: {}", self.command.join(" "));
            let args: Vec<&str> = self.command[1..].iter().map(String::as_str).collect();
            if let Err(e) = run_tool_blocking(&self.command[0], &args) {
                eprintln!(
                    "soak: RESTORE FAILED, fix by hand: {} ({e:#})",
                    self.command.join(" ")
                );
            }
            let _ = std::fs::remove_file(PENDING_RESTORE);
        }
    }
}

/// Runs the restore command a killed soak left behind, if any.
pub fn restore_leftovers() {
    let Ok(text) = std::fs::read_to_string(PENDING_RESTORE) else {
        return;
    };
    let command: Vec<String> = serde_json::from_str(&text).unwrap_or_default();
    if let Some((tool, args)) = command.split_first() {
        eprintln!(
            "soak: an earlier soak did not restore the server; running: {}",
            command.join(" ")
        );
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        if let Err(e) = run_tool_blocking(tool, &args) {
            eprintln!("soak: {e:#}");
        }
    }
    let _ = std::fs::remove_file(PENDING_RESTORE);
}

/// The broker settings an alarm changes, read at start so they are restored exactly.
#[derive(Debug, Clone)]
pub struct BrokerOriginals {
    memory_watermark: Vec<String>,
    disk_free_limit: String,
}

impl BrokerOriginals {
    pub async fn read() -> anyhow::Result<BrokerOriginals> {
        let memory =
            rabbitmqctl(&["eval", "vm_memory_monitor:get_vm_memory_high_watermark()."]).await?;
        let memory = memory.trim();
        let memory_watermark = if let Some(abs) = memory.strip_prefix("{absolute,") {
            vec![
                "absolute".to_string(),
                abs.trim_end_matches('}').trim().to_string(),
            ]
        } else {
            let fraction: f64 = memory
                .parse()
                .with_context(|| format!("unexpected memory watermark {memory:?}"))?;
            if fraction < 0.01 {
                anyhow::bail!(
                    "the broker's memory watermark is {fraction}: an earlier alarm was not restored; \
                     run `rabbitmqctl set_vm_memory_high_watermark 0.4` first"
                );
            }
            vec![memory.to_string()]
        };
        let disk = rabbitmqctl(&["eval", "rabbit_disk_monitor:get_disk_free_limit()."]).await?;
        let disk_free_limit = disk.trim().to_string();
        disk_free_limit
            .parse::<u64>()
            .with_context(|| format!("unexpected disk free limit {disk_free_limit:?}"))?;
        Ok(BrokerOriginals {
            memory_watermark,
            disk_free_limit,
        })
    }
}

/// Which proxy a network fault hits.
#[derive(Debug, Clone, Copy)]
enum Target {
    Postgres,
    Rabbit,
    Both,
}

/// Everything the faults act on.
pub struct Injector {
    pub rng: ChaCha8Rng,
    pub kinds: Vec<FaultKind>,
    pub mean_gap: Duration,
    /// `--relays`: member-join never goes beyond one more than this.
    pub members: usize,
    /// The relays' lease: a pause lasts this + 1..3 s.
    pub lease: Duration,
    pub relays: Arc<Mutex<Relays>>,
    pub pg_proxy: Arc<Proxy>,
    pub amqp_proxy: Arc<Proxy>,
    pub servers: Servers,
    pub world: World,
    pub lock: Arc<ServerLock>,
    pub broker: Option<BrokerOriginals>,
    /// (version, cluster) of the PostgreSQL cluster, for pg_ctlcluster.
    pub pg_cluster: Option<(String, String)>,
    /// Bad rows and the operator's actions (when either kind is asked for).
    pub rows: Option<RowFaults>,
    pub stop: CancellationToken,
}

/// What the injector did.
#[derive(Default)]
pub struct FaultLog {
    pub records: Vec<FaultRecord>,
    /// Faults that could not be injected, and why.
    pub skipped: Vec<(FaultKind, String)>,
}

impl Injector {
    pub fn new_rng(seed: u64) -> ChaCha8Rng {
        ChaCha8Rng::seed_from_u64(seed)
    }

    /// Injects faults in rounds (every enabled kind once per round, in seeded random order)
    /// with seeded random gaps, until `stop`.
    pub async fn run(mut self, log: Arc<std::sync::Mutex<FaultLog>>) {
        if self.kinds.is_empty() {
            return;
        }
        loop {
            let mut round = self.kinds.clone();
            round.shuffle(&mut self.rng);
            for kind in round {
                let gap = self.mean_gap.mul_f64(self.rng.random_range(0.5..1.5));
                if !self.hold(gap).await {
                    return;
                }
                let started = Instant::now();
                let outcome = self.inject(kind).await;
                let mut log = log.lock().unwrap_or_else(|e| e.into_inner());
                match outcome {
                    Ok(done) => log.records.push(FaultRecord {
                        kind,
                        started,
                        ended: done.ended,
                        from: done.from.unwrap_or(done.ended),
                        relays_hit: done.relays_hit,
                        detail: done.detail,
                    }),
                    Err(e) => {
                        eprintln!("soak: fault {} not injected: {e:#}", kind.name());
                        log.skipped.push((kind, format!("{e:#}")));
                    }
                }
                if self.stop.is_cancelled() {
                    return;
                }
            }
        }
    }

    /// Sleeps `d` unless stopped; false when stopped.
    async fn hold(&self, d: Duration) -> bool {
        tokio::select! {
            _ = tokio::time::sleep(d) => true,
            _ = self.stop.cancelled() => false,
        }
    }

    fn millis(&mut self, low: u64, high: u64) -> Duration {
        Duration::from_millis(self.rng.random_range(low..=high))
    }

    fn target(&mut self) -> Target {
        match self.rng.random_range(0..3) {
            0 => Target::Postgres,
            1 => Target::Rabbit,
            _ => Target::Both,
        }
    }

    fn proxies(&self, target: Target) -> Vec<&Proxy> {
        match target {
            Target::Postgres => vec![&*self.pg_proxy],
            Target::Rabbit => vec![&*self.amqp_proxy],
            Target::Both => vec![&*self.pg_proxy, &*self.amqp_proxy],
        }
    }

    /// Relays running now: the ones a fault on every connection hits.
    async fn running(&self) -> usize {
        self.relays.lock().await.running()
    }

    /// Injects one fault; returns when its condition was lifted, and what was done.
    async fn inject(&mut self, kind: FaultKind) -> anyhow::Result<Injected> {
        match kind {
            FaultKind::RelayKill => {
                let down = self.millis(0, 1500);
                let relays = self.relays.clone();
                // Held through the pause, so the watcher does not replace the relay early.
                let mut relays = relays.lock().await;
                let running = relays.running();
                let hit = Instant::now();
                let detail = if running <= 1 {
                    relays.kill_all().await;
                    self.hold(down).await;
                    relays.spawn()?;
                    format!("SIGKILLed {running} relay(s), restarted after {down:?}")
                } else {
                    let index = self.rng.random_range(0..running);
                    let number = relays.number(index).unwrap_or_default();
                    relays.kill(index).await;
                    self.hold(down).await;
                    relays.spawn()?;
                    format!(
                        "SIGKILLed relay {number} of {running}, started relay {} after {down:?}",
                        relays.spawned()
                    )
                };
                Ok(Injected {
                    ended: Instant::now(),
                    from: Some(hit),
                    relays_hit: running.min(1),
                    detail,
                })
            }
            FaultKind::RelayPause => {
                let paused = self.lease + self.millis(1000, 3000);
                let (number, running) = {
                    let relays = self.relays.lock().await;
                    let running = relays.running();
                    anyhow::ensure!(running > 0, "no relay is running");
                    let index = self.rng.random_range(0..running);
                    (relays.number(index).unwrap_or_default(), running)
                };
                let hit = Instant::now();
                anyhow::ensure!(
                    self.relays.lock().await.signal(number, "-STOP").await,
                    "kill -STOP of relay {number} failed"
                );
                // However the run ends, the relay is woken again (and SIGKILLed at the end if
                // something went wrong on the way).
                let cut_short = !self.hold(paused).await;
                let woken = self.relays.lock().await.signal(number, "-CONT").await;
                anyhow::ensure!(woken, "kill -CONT of relay {number} failed");
                let ended = Instant::now();
                Ok(Injected {
                    ended,
                    from: Some(hit),
                    relays_hit: 1,
                    detail: format!(
                        "SIGSTOPped relay {number} of {running} for {:?}{}",
                        ended.duration_since(hit),
                        if cut_short {
                            " (cut short: the run ended)"
                        } else {
                            ""
                        }
                    ),
                })
            }
            FaultKind::MemberJoin => {
                let mut relays = self.relays.lock().await;
                anyhow::ensure!(
                    relays.wanted <= self.members,
                    "already {} relays (at most --relays + 1)",
                    relays.wanted
                );
                relays.wanted += 1;
                let hit = Instant::now();
                relays.spawn()?;
                Ok(Injected {
                    ended: Instant::now(),
                    from: Some(hit),
                    relays_hit: 1,
                    detail: format!(
                        "relay {} joined ({} running)",
                        relays.spawned(),
                        relays.running()
                    ),
                })
            }
            FaultKind::MemberLeave => {
                let (leaving, running) = {
                    let mut relays = self.relays.lock().await;
                    let running = relays.running();
                    anyhow::ensure!(
                        running >= 2 && relays.wanted >= 2,
                        "{running} relay(s) running: the last one never leaves"
                    );
                    let index = self.rng.random_range(0..running);
                    relays.wanted -= 1;
                    (relays.take(index).context("no relay to stop")?, running)
                };
                let number = leaving.number();
                let hit = Instant::now();
                // Not under the lock: draining takes up to the relay's shutdown timeout.
                if let Err(problem) = leaving.terminate(Duration::from_secs(15)).await {
                    eprintln!("soak: {problem}");
                    self.relays.lock().await.unexpected_exits.push(problem);
                }
                Ok(Injected {
                    ended: Instant::now(),
                    from: Some(hit),
                    relays_hit: 1,
                    detail: format!("SIGTERMed relay {number} of {running}"),
                })
            }
            FaultKind::TwoRelays => {
                let overlap = self.millis(1000, 4000);
                let kill_newcomer = self.rng.random_bool(0.5);
                self.relays.lock().await.spawn()?;
                self.hold(overlap).await;
                let mut relays = self.relays.lock().await;
                let victim = if kill_newcomer {
                    relays.running().saturating_sub(1)
                } else {
                    0
                };
                relays.kill(victim).await;
                let which = if kill_newcomer {
                    "the newcomer"
                } else {
                    "the older relay"
                };
                Ok(Injected::lifted(
                    1,
                    format!("second relay for {overlap:?}, then SIGKILLed {which}"),
                ))
            }
            FaultKind::AmqpClose => {
                rabbitmqctl(&[
                    "close_all_connections",
                    "--vhost",
                    &self.world.vhost,
                    "soak",
                ])
                .await?;
                Ok(Injected::lifted(
                    self.running().await,
                    format!("closed every connection of vhost {}", self.world.vhost),
                ))
            }
            FaultKind::BrokerRestart => {
                let down = self.millis(500, 3000);
                let _exclusive = self.exclusive().await?;
                let restore = Restore::arm(&["rabbitmqctl", "start_app"]);
                rabbitmqctl(&["stop_app"]).await?;
                self.hold(down).await;
                restore.done().await?;
                Ok(Injected::lifted(
                    self.running().await,
                    format!("stop_app, start_app after {down:?}"),
                ))
            }
            FaultKind::BrokerAlarm => {
                let held = self.millis(1000, 5000);
                let memory = self.rng.random_bool(0.5);
                let originals = self
                    .broker
                    .clone()
                    .context("broker settings were not read")?;
                let _exclusive = self.exclusive().await?;
                let (raise, restore): (Vec<&str>, Vec<&str>) = if memory {
                    let mut restore = vec!["rabbitmqctl", "set_vm_memory_high_watermark"];
                    restore.extend(originals.memory_watermark.iter().map(String::as_str));
                    (vec!["set_vm_memory_high_watermark", "0.0000001"], restore)
                } else {
                    (
                        vec!["set_disk_free_limit", "1000000000000000"],
                        vec![
                            "rabbitmqctl",
                            "set_disk_free_limit",
                            &originals.disk_free_limit,
                        ],
                    )
                };
                let restore = Restore::arm(&restore);
                rabbitmqctl(&raise).await?;
                self.hold(held).await;
                restore.done().await?;
                let which = if memory { "memory" } else { "disk" };
                Ok(Injected::lifted(
                    self.running().await,
                    format!("{which} alarm for {held:?}"),
                ))
            }
            FaultKind::PgTerminate => {
                let mut admin = self
                    .servers
                    .connect_pg("postgres", "obr-soak-admin")
                    .await?;
                let terminated: i64 = sqlx::query_scalar(
                    "SELECT count(*) FILTER (WHERE pg_terminate_backend(pid)) FROM pg_stat_activity \
                     WHERE datname = $1 AND application_name = 'outbox-relay'",
                )
                .bind(&self.world.database)
                .fetch_one(&mut admin)
                .await?;
                admin.close().await.ok();
                Ok(Injected::lifted(
                    self.running().await,
                    format!("terminated {terminated} relay session(s)"),
                ))
            }
            FaultKind::PgRestart => {
                let down = self.millis(200, 2000);
                let (version, cluster) = self
                    .pg_cluster
                    .clone()
                    .context("no PostgreSQL cluster found")?;
                let _exclusive = self.exclusive().await?;
                let ctl = [
                    "pg_ctlcluster",
                    "--skip-systemctl-redirect",
                    version.as_str(),
                    cluster.as_str(),
                ];
                let mut start = ctl.to_vec();
                start.push("start");
                let restore = Restore::arm(&start);
                let mut stop = ctl[1..].to_vec();
                stop.extend(["stop", "-m", "fast"]);
                run_tool("pg_ctlcluster", &stop, Duration::from_secs(120)).await?;
                self.hold(down).await;
                restore.done().await?;
                Ok(Injected::lifted(
                    self.running().await,
                    format!("stopped (fast), started after {down:?}"),
                ))
            }
            FaultKind::NetReset => {
                let target = self.target();
                for p in self.proxies(target) {
                    p.reset();
                }
                Ok(Injected::lifted(
                    self.running().await,
                    format!("reset {target:?} connections"),
                ))
            }
            FaultKind::NetSilent => {
                let target = self.target();
                let silent = self.millis(3500, 7000);
                for p in self.proxies(target) {
                    p.set_silent(true);
                }
                self.hold(silent).await;
                for p in self.proxies(target) {
                    p.heal();
                }
                Ok(Injected::lifted(
                    self.running().await,
                    format!("{target:?} silent for {silent:?}"),
                ))
            }
            FaultKind::BadRow | FaultKind::Operator => {
                let rows = self.rows.as_mut().context("no row faults set up")?;
                let detail = if kind == FaultKind::BadRow {
                    rows.insert_bad_rows().await?
                } else {
                    rows.act().await?
                };
                Ok(Injected::lifted(self.running().await, detail))
            }
            FaultKind::NetLatency => {
                let target = self.target();
                let latency = self.millis(20, 250);
                let held = self.millis(2000, 6000);
                for p in self.proxies(target) {
                    p.set_latency(latency);
                }
                self.hold(held).await;
                for p in self.proxies(target) {
                    p.heal();
                }
                Ok(Injected::lifted(
                    self.running().await,
                    format!("{target:?} +{latency:?} for {held:?}"),
                ))
            }
        }
    }

    async fn exclusive(&self) -> anyhow::Result<ExclusiveLock> {
        self.lock
            .exclusive(Duration::from_secs(120), &self.stop)
            .await
            .context(
                "other processes kept /tmp/obr-server-faults.lock shared (waited up to 2 minutes)",
            )
    }
}

/// The cluster serving `port`, from `pg_lsclusters`.
pub async fn find_pg_cluster(port: u16) -> Option<(String, String)> {
    let out = run_tool("pg_lsclusters", &["--no-header"], Duration::from_secs(30))
        .await
        .ok()?;
    out.lines().find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        (f.len() >= 3 && f[2] == port.to_string()).then(|| (f[0].to_string(), f[1].to_string()))
    })
}
