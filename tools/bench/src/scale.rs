//! The scale-out scenario: one table drained by several relay processes at once (1, 2 and 3,
//! with 1 and 4 broker channels each) against raw publishing of the same backlog in the same
//! run, and the failover time: how long a partition's rows stop when the relay that owns it is
//! SIGKILLed or SIGSTOPped under a steady load. The relays are the bench's children; which
//! relay owns what is read from the lease rows and the relays' logs, never set.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use outbox_relay::config::TableName;
use sqlx::postgres::PgPool;
use sqlx::{Connection, PgConnection};

use crate::env::{self, BenchEnv};
use crate::leases;
use crate::process::{
    HostCpu, LeaseTimings, LogProblems, ProcessCpu, RelayConfig, RelayProcess, Usage,
};
use crate::report::{Drained, Failover, Fault, FaultKind, ScaleCell, ScaleOut, Shortfall};
use crate::scenarios::{self, progress, timed_run};
use crate::shapes::{self, report_round};
use crate::workload::{self, EVENT_TYPE, ROUTING_KEY};
use crate::Plan;

/// The relays' lease timings in this scenario (every cell and the failover): short, so a
/// rebalance takes seconds; valid, as lease (6 s) > heartbeat + confirm and statement
/// timeouts (5 s).
pub const TIMINGS: LeaseTimings = LeaseTimings {
    heartbeat: Duration::from_secs(1),
    lease: Duration::from_secs(6),
    confirm_timeout: Duration::from_secs(2),
    statement_timeout: Duration::from_secs(2),
};

/// How long the relays may take to share the partitions after a start, a join or a fault.
const SETTLE_LIMIT: Duration = Duration::from_secs(60);

/// How long a relay continued after SIGSTOP may take to register again and take its share
/// (a few heartbeats).
const REJOIN_LIMIT: Duration = Duration::from_secs(20);

/// How often the lease rows are read while waiting for a rebalance.
const SETTLE_POLL: Duration = Duration::from_millis(50);

/// The failover's steady load: rows per second over the ordering keys, one in every
/// `PROBE_EVERY` on the probe key (whose partition's owner is the one faulted), from
/// `PRODUCERS` connections of single-row transactions.
const LOAD_RATE: u32 = 500;
const PROBE_EVERY: u64 = 5;
const PROBE_KEY: &str = "probe";
const PRODUCERS: u64 = 2;
/// The longest the failover's load may run: the size of the consumer's checklist.
const LOAD_LIMIT: Duration = Duration::from_secs(600);
/// The load before the first fault, and after each takeover before the next step.
const STEADY: Duration = Duration::from_secs(2);
/// Relays of the failover.
const FAILOVER_RELAYS: usize = 3;

/// The (relays, channels) cells of the drain: the full grid, or a reduced one for CI.
fn grid(quick: bool) -> Vec<(u32, u32)> {
    if quick {
        vec![(1, 1), (3, 1), (1, 4)]
    } else {
        [1, 4]
            .into_iter()
            .flat_map(|channels| [1, 2, 3].map(|relays| (relays, channels)))
            .collect()
    }
}

/// Drains with several relays on one table against raw publishing, then the failover time.
pub async fn scale_out(env: &BenchEnv, plan: &Plan) -> anyhow::Result<ScaleOut> {
    let table = env::table(env::SCALE_TABLE);
    let pool = env.pool()?;
    let oid = leases::table_oid(pool, &table).await?;
    let (rows, keys) = (plan.drain_rows, plan.ordering_keys);
    let mut cells: Vec<ScaleCell> = grid(plan.quick)
        .into_iter()
        .map(|(relays, channels)| ScaleCell {
            relays,
            channels,
            drains: Vec::new(),
            settle_s: Vec::new(),
        })
        .collect();
    let (mut raws, mut log) = (Vec::new(), LogProblems::default());
    for round in 1..=plan.rounds {
        for cell in cells.iter_mut() {
            let who = format!("{}r x {}ch", cell.relays, cell.channels);
            let tag = format!("so{round}raw{}x{}", cell.relays, cell.channels);
            scenarios::prepare_backlog(env, &table, &tag, rows, keys).await?;
            let raw = scenarios::raw_round(env, &table, &tag, rows, plan.max_in_flight).await?;
            progress("scale-out", round, plan.rounds, "raw", &raw);
            raws.push(raw);

            let tag = format!("so{round}relays{}x{}", cell.relays, cell.channels);
            let (drained, settle_s) = drain(env, plan, &table, oid, cell, &tag, &mut log).await?;
            report_round("scale-out", round, plan.rounds, &who, &drained);
            if let Some(settle_s) = settle_s {
                eprintln!(
                    "      partitions shared fairly {settle_s:.1} s after the relays started"
                );
                cell.settle_s.push(settle_s);
            }
            cell.drains.push(drained);
        }
    }
    let mut failover_log = LogProblems::default();
    // A failover that goes wrong is a figure too: it does not end the bench.
    let failover = failover(env, plan, &table, oid, &mut failover_log)
        .await
        .map_err(|e| {
            eprintln!("  scale-out failover: {e:#}");
            format!("{e:#}")
        });
    Ok(ScaleOut {
        rows,
        keys,
        partitions: leases::partitions(pool, oid).await?,
        timings: TIMINGS,
        raw: raws,
        cells,
        failover,
        log,
        failover_log,
    })
}

/// One relay of this scenario's config: the bench's window, the scenario's lease timings.
fn relay_config(env: &BenchEnv, plan: &Plan, table: &TableName, channels: u32) -> RelayConfig {
    RelayConfig::new(env, std::slice::from_ref(table))
        .window(plan.batch_size, plan.max_in_flight)
        .leases(TIMINGS)
        .channels(channels)
}

/// Starts the cell's relays on the empty table, waits until they share its partitions, then
/// commits the backlog in one transaction and times from the commit until every row is
/// received and marked published (bounded: a drain that does not finish is reported as not
/// delivered). Also returns the seconds the relays took to share the partitions, if they did.
async fn drain(
    env: &BenchEnv,
    plan: &Plan,
    table: &TableName,
    oid: i64,
    cell: &ScaleCell,
    tag: &str,
    log: &mut LogProblems,
) -> anyhow::Result<(Drained, Option<f64>)> {
    let pool = env.pool()?;
    let rows = plan.drain_rows;
    workload::truncate(pool, table).await?;
    env.purge_queue().await?;
    let mut fleet = Fleet::new(oid);
    for i in 0..cell.relays {
        let config = relay_config(env, plan, table, cell.channels);
        fleet.add(env, config, &format!("{tag}-r{i}"))?;
    }
    let started = Instant::now();
    if let Err(e) = fleet.settle(pool, &fleet.running(), SETTLE_LIMIT).await {
        fleet.read_logs(log);
        let stopped = fleet.stop().await.err();
        let note = match stopped {
            Some(s) => format!("{e:#}; stopping them: {s:#}"),
            None => format!("{e:#}"),
        };
        let short = Shortfall {
            received: 0,
            expected: rows,
            seconds: started.elapsed().as_secs_f64(),
            note: Some(note),
        };
        return Ok((Drained::NotDelivered(short), None));
    }
    let settle_s = started.elapsed().as_secs_f64();
    leases::analyze(pool).await?;

    let consumer = env.consumer()?;
    let all_received = consumer.expect(tag, rows as usize, false);
    let cpu = HostCpu::now();
    let processes = ProcessCpu::now();
    let committed = workload::seed_at_once(pool, table, tag, rows, plan.ordering_keys).await?;
    let until = tokio::time::Instant::now() + bound(rows);
    let unmarked = workload::any_unpublished_sql(std::slice::from_ref(table));
    let ended =
        shapes::wait_delivered(|| fleet.check_alive(), all_received, pool, &unmarked, until).await;
    let seconds = committed.elapsed().as_secs_f64();
    let split = ProcessCpu::now().since(&processes, &fleet.pids());
    fleet.read_logs(log);
    let drained = match ended? {
        Ok(()) => {
            let usages = fleet.stop().await?;
            // The relays' CPU during the timed drain (not their start-up), and the largest RSS.
            let usage = Usage {
                cpu_s: split.relay_s,
                peak_rss_mib: usages.iter().map(|u| u.peak_rss_mib).fold(0.0, f64::max),
            };
            Drained::Done(timed_run(
                rows,
                committed,
                seconds,
                consumer.finish(),
                Some(usage),
                cpu,
                split,
            ))
        }
        Err(note) => {
            let received = consumer.progress() as u64;
            consumer.finish();
            let stopped = fleet.stop().await.err();
            let note = note.or_else(|| stopped.map(|e| format!("{e:#}")));
            Drained::NotDelivered(Shortfall {
                received,
                expected: rows,
                seconds,
                note,
            })
        }
    };
    Ok((drained, Some(settle_s)))
}

/// A drain's bound: a minute plus a millisecond per row (the single relay drains at more
/// than ten times that rate here).
fn bound(rows: u64) -> Duration {
    Duration::from_secs(60) + Duration::from_millis(rows)
}

/// Three relays under a steady load; the owner of the probe key's partition is SIGKILLed (and
/// replaced), then the owner of it at that time SIGSTOPped until the others took its partitions
/// over, and SIGCONTed; `plan.rounds` times. Every row inserted must arrive.
async fn failover(
    env: &BenchEnv,
    plan: &Plan,
    table: &TableName,
    oid: i64,
    log: &mut LogProblems,
) -> anyhow::Result<Failover> {
    let pool = env.pool()?;
    workload::truncate(pool, table).await?;
    env.purge_queue().await?;
    let mut fleet = Fleet::new(oid);
    let mut started = 0;
    for _ in 0..FAILOVER_RELAYS {
        fleet.add(
            env,
            relay_config(env, plan, table, 1),
            &format!("fo-r{started}"),
        )?;
        started += 1;
    }
    let outcome = faults(env, plan, table, oid, &mut fleet, &mut started).await;
    fleet.read_logs(log);
    let stopped = fleet.stop().await;
    let mut failover = outcome?;
    if let Err(e) = stopped {
        failover.notes.push(format!("stopping the relays: {e:#}"));
    }
    Ok(failover)
}

/// The failover's steps on a started fleet; `started` counts the relays started (for their
/// file names).
async fn faults(
    env: &BenchEnv,
    plan: &Plan,
    table: &TableName,
    oid: i64,
    fleet: &mut Fleet,
    started: &mut usize,
) -> anyhow::Result<Failover> {
    let pool = env.pool()?;
    fleet.settle(pool, &fleet.running(), SETTLE_LIMIT).await?;
    leases::analyze(pool).await?;
    let partitions = leases::partitions(pool, oid)
        .await?
        .ok_or_else(|| anyhow::anyhow!("scale-out: {table} has no partition leases"))?;
    let keys: Vec<String> = (0..plan.ordering_keys)
        .map(|h| format!("key-{h}"))
        .chain([PROBE_KEY.to_owned()])
        .collect();
    let partition_of = leases::partitions_of(pool, &keys, partitions).await?;
    let probe = partition_of
        .get(PROBE_KEY)
        .copied()
        .ok_or_else(|| anyhow::anyhow!("scale-out: no partition for the probe key"))?;

    let capacity = (u64::from(LOAD_RATE) * LOAD_LIMIT.as_secs()) as usize;
    let consumer = env.consumer()?;
    let _all_received = consumer.expect("fo", capacity, true);
    let load = Load::start(env, table, plan.ordering_keys, capacity as u64).await?;
    let load_started = Instant::now();
    tokio::time::sleep(STEADY).await;

    let mut faults = Vec::new();
    for _ in 0..plan.rounds {
        for kind in [FaultKind::Kill, FaultKind::Pause] {
            let fault = inject(pool, fleet, oid, probe, kind).await?;
            eprintln!(
                "  scale-out failover: {} of the owner of partition {probe}: the others held its {} partitions after {:.0} ms",
                kind.signal(),
                fault.partitions.len(),
                fault.taken_over_ms
            );
            if let Some(note) = &fault.note {
                eprintln!("  scale-out failover: {note}");
            }
            if fault.replace {
                // A replacement joins, as systemd would restart the killed relay.
                let config = relay_config(env, plan, table, 1);
                fleet.add(env, config, &format!("fo-r{started}"))?;
                *started += 1;
                fleet.settle(pool, &fleet.running(), SETTLE_LIMIT).await?;
            }
            faults.push(fault);
            tokio::time::sleep(STEADY).await;
        }
    }
    let committed = load.stop().await?;
    let seconds = load_started.elapsed().as_secs_f64();

    // Every committed row must arrive and be marked: give the relays a bounded while.
    let until = Instant::now() + Duration::from_secs(60);
    loop {
        fleet.check_alive()?;
        if consumer.progress() >= committed.len() && workload::all_published(pool, table).await? {
            break;
        }
        if Instant::now() >= until {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let got = consumer.finish();
    let times = got.times.unwrap_or_default();
    let received = |i: u64| times.get(i as usize).copied().flatten();
    let lost = committed
        .iter()
        .filter(|r| received(r.index).is_none())
        .count() as u64;

    let partition = |r: &Committed| {
        let key = key_of(r.index, plan.ordering_keys);
        partition_of.get(&key).copied()
    };
    let measured = faults
        .into_iter()
        .map(|f| f.measure(&committed, probe, &partition, &received))
        .collect();
    Ok(Failover {
        notes: Vec::new(),
        relays: FAILOVER_RELAYS as u32,
        offered_rate: LOAD_RATE,
        probe_rate: LOAD_RATE / PROBE_EVERY as u32,
        seconds,
        committed: committed.len() as u64,
        lost,
        duplicates: got.duplicates,
        faults: measured,
    })
}

/// A fault as injected: when, on which relay's partitions, and when the others held them.
struct Injected {
    kind: FaultKind,
    at: Instant,
    /// The faulted relay's partitions at the fault.
    partitions: Vec<u32>,
    taken_over_ms: f64,
    /// The faulted relay is gone (killed) and a new one should take its place.
    replace: bool,
    /// What went wrong after the takeover (a paused relay that did not come back).
    note: Option<String>,
}

/// Faults the owner of partition `probe` and waits until the other relays share every
/// partition; a paused relay is then continued and waited for until it shares them again
/// (one that does not within `REJOIN_LIMIT` is noted and SIGKILLed, to be replaced).
async fn inject(
    pool: &PgPool,
    fleet: &mut Fleet,
    oid: i64,
    probe: u32,
    kind: FaultKind,
) -> anyhow::Result<Injected> {
    let owner = leases::owner_of(pool, oid, probe)
        .await?
        .ok_or_else(|| anyhow::anyhow!("scale-out: partition {probe} has no owner"))?;
    let victim = fleet.registered_as(owner).ok_or_else(|| {
        anyhow::anyhow!("scale-out: no relay of the bench registered as member {owner}, the owner of partition {probe}")
    })?;
    let partitions = leases::owned_by(pool, oid, owner).await?;
    let others: Vec<usize> = fleet
        .running()
        .into_iter()
        .filter(|i| *i != victim)
        .collect();
    let at = Instant::now();
    match kind {
        FaultKind::Kill => fleet.kill(victim).await?,
        FaultKind::Pause => fleet.signal(victim, libc::SIGSTOP)?,
    }
    let taken = fleet.settle(pool, &others, SETTLE_LIMIT).await;
    if kind == FaultKind::Pause {
        // Continue it even if the takeover failed, so it can be stopped.
        fleet.signal(victim, libc::SIGCONT)?;
    }
    let taken = taken?;
    let (mut replace, mut note) = (kind == FaultKind::Kill, None);
    if kind == FaultKind::Pause {
        // It wakes to a lease that ran out: it must register again and be given its share.
        if let Err(e) = fleet.settle(pool, &fleet.running(), REJOIN_LIMIT).await {
            note = Some(format!(
                "the relay continued after SIGSTOP did not take a share again: {e:#}"
            ));
            // It may not answer SIGTERM either.
            fleet.kill(victim).await?;
            replace = true;
        }
    }
    Ok(Injected {
        kind,
        at,
        partitions,
        taken_over_ms: taken.saturating_duration_since(at).as_secs_f64() * 1000.0,
        replace,
        note,
    })
}

impl Injected {
    /// The fault's figures from the rows inserted (`committed`) and their first arrival.
    fn measure(
        self,
        committed: &[Committed],
        probe: u32,
        partition: &dyn Fn(&Committed) -> Option<u32>,
        received: &dyn Fn(u64) -> Option<Instant>,
    ) -> Fault {
        let at = self.at;
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        // The first arrival, in each partition, of a row inserted after the fault: only a
        // new owner can have published it (the old one was dead or paused).
        let mut resumed: HashMap<u32, Instant> = HashMap::new();
        let mut last_before: Option<Instant> = None;
        for row in committed {
            let (Some(p), Some(got)) = (partition(row), received(row.index)) else {
                continue;
            };
            if row.sent >= at {
                let first = resumed.entry(p).or_insert(got);
                *first = (*first).min(got);
            } else if p == probe && got <= at {
                last_before = Some(last_before.map_or(got, |l| l.max(got)));
            }
        }
        let probe_resumed = resumed.get(&probe).copied();
        let mut partition_resumed_ms: Vec<f64> = self
            .partitions
            .iter()
            .filter_map(|p| resumed.get(p))
            .map(|got| ms(got.saturating_duration_since(at)))
            .collect();
        partition_resumed_ms.sort_by(f64::total_cmp);
        Fault {
            kind: self.kind,
            partition: probe,
            resumed_ms: probe_resumed.map(|r| ms(r.saturating_duration_since(at))),
            gap_ms: probe_resumed
                .zip(last_before)
                .map(|(r, l)| ms(r.saturating_duration_since(l))),
            taken_over_ms: self.taken_over_ms,
            victim_partitions: self.partitions.len() as u32,
            partition_resumed_ms,
            note: self.note,
        }
    }
}

/// The ordering key of the failover's row `index`.
fn key_of(index: u64, keys: u64) -> String {
    if index.is_multiple_of(PROBE_EVERY) {
        PROBE_KEY.to_owned()
    } else {
        workload::ordering_key(index, keys)
    }
}

/// A row of the failover's load, as its producer saw it.
struct Committed {
    index: u64,
    /// Just before its INSERT was sent.
    sent: Instant,
}

/// The failover's producers: single-row transactions at a fixed rate until stopped.
struct Load {
    stop: Arc<AtomicBool>,
    producers: Vec<tokio::task::JoinHandle<Result<Vec<Committed>, sqlx::Error>>>,
}

impl Load {
    async fn start(
        env: &BenchEnv,
        table: &TableName,
        keys: u64,
        capacity: u64,
    ) -> anyhow::Result<Load> {
        let stop = Arc::new(AtomicBool::new(false));
        let sql = format!(
            "INSERT INTO {} (dedup_key, ordering_key, routing_key, event_type, payload) VALUES ($1, $2, $3, $4, $5::jsonb)",
            table.quoted()
        );
        let period = Duration::from_secs_f64(1.0 / f64::from(LOAD_RATE));
        let base = Instant::now() + Duration::from_millis(100);
        let mut producers = Vec::new();
        for p in 0..PRODUCERS {
            let mut connection = PgConnection::connect(env.db_url.as_str())
                .await
                .context("connecting a producer")?;
            let (sql, stop) = (sql.clone(), stop.clone());
            producers.push(tokio::spawn(async move {
                let mut committed = Vec::new();
                for i in (p..capacity).step_by(PRODUCERS as usize) {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    tokio::time::sleep_until((base + period * i as u32).into()).await;
                    let sent = Instant::now();
                    sqlx::query(&sql)
                        .bind(format!("fo-{i}"))
                        .bind(key_of(i, keys))
                        .bind(ROUTING_KEY)
                        .bind(EVENT_TYPE)
                        .bind(workload::payload(i))
                        .execute(&mut connection)
                        .await?;
                    committed.push(Committed { index: i, sent });
                }
                let _ = connection.close().await;
                Ok(committed)
            }));
        }
        Ok(Load { stop, producers })
    }

    /// Stops the producers and returns every row they committed.
    async fn stop(mut self) -> anyhow::Result<Vec<Committed>> {
        self.stop.store(true, Ordering::Relaxed);
        let mut all = Vec::new();
        for producer in std::mem::take(&mut self.producers) {
            all.extend(
                producer
                    .await?
                    .context("a failover producer's insert failed")?,
            );
        }
        Ok(all)
    }
}

impl Drop for Load {
    /// A failover that ends early stops its producers too (they are detached tasks).
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// A relay of a fleet and its health endpoint.
struct Member {
    process: RelayProcess,
    health: SocketAddr,
    paused: bool,
}

/// Relay processes on one table, by the order they were started; a killed one leaves a gap.
struct Fleet {
    table_oid: i64,
    relays: Vec<Option<Member>>,
    /// Logs of every relay started, also the killed ones.
    logs: Vec<PathBuf>,
}

impl Fleet {
    fn new(table_oid: i64) -> Fleet {
        Fleet {
            table_oid,
            relays: Vec::new(),
            logs: Vec::new(),
        }
    }

    /// Starts one more relay with `config` and a health endpoint of its own.
    fn add(&mut self, env: &BenchEnv, config: RelayConfig, name: &str) -> anyhow::Result<()> {
        let health = scenarios::free_local_addr()?;
        let path = config
            .health(health)
            .write(&env.dir.join(format!("{name}.toml")))?;
        let log = env.dir.join(format!("{name}.log"));
        let process = RelayProcess::start(&env.relay_bin, &path, &log)?;
        self.logs.push(log);
        self.relays.push(Some(Member {
            process,
            health,
            paused: false,
        }));
        Ok(())
    }

    /// The relays not killed and not paused.
    fn running(&self) -> Vec<usize> {
        (0..self.relays.len())
            .filter(|i| matches!(&self.relays[*i], Some(m) if !m.paused))
            .collect()
    }

    fn pids(&self) -> Vec<u32> {
        self.relays
            .iter()
            .flatten()
            .map(|m| m.process.pid)
            .collect()
    }

    fn check_alive(&mut self) -> anyhow::Result<()> {
        for member in self.relays.iter_mut().flatten() {
            member.process.check_alive()?;
        }
        Ok(())
    }

    /// The relay that registered last as `member`.
    fn registered_as(&self, member: u64) -> Option<usize> {
        (0..self.relays.len()).find(|i| {
            self.relays[*i].is_some() && leases::registered_member(&self.logs[*i]) == Some(member)
        })
    }

    /// Waits until the relays `among` (and no one else) share every partition fairly and answer
    /// `/ready` with 200; returns the moment they did.
    async fn settle(
        &mut self,
        pool: &PgPool,
        among: &[usize],
        limit: Duration,
    ) -> anyhow::Result<Instant> {
        let until = Instant::now() + limit;
        let mut seen = None;
        loop {
            self.check_alive()?;
            let members: Option<Vec<u64>> = among
                .iter()
                .map(|i| leases::registered_member(&self.logs[*i]))
                .collect();
            if let (Some(members), Some(partitions)) =
                (members, leases::partitions(pool, self.table_oid).await?)
            {
                let spread = leases::spread(pool, self.table_oid).await?;
                if leases::settled(&spread, partitions, &members) && self.ready(among).await {
                    return Ok(Instant::now());
                }
                seen = Some(spread);
            }
            if Instant::now() >= until {
                let logs: Vec<String> = among
                    .iter()
                    .map(|i| self.logs[*i].display().to_string())
                    .collect();
                anyhow::bail!(
                    "scale-out: relays {among:?} did not share the partitions fairly within {} s \
                     (partitions per member: {seen:?}; logs {})",
                    limit.as_secs(),
                    logs.join(", ")
                );
            }
            tokio::time::sleep(SETTLE_POLL).await;
        }
    }

    /// True when every relay of `among` answers `GET /ready` with 200.
    async fn ready(&self, among: &[usize]) -> bool {
        for i in among {
            let Some(member) = &self.relays[*i] else {
                return false;
            };
            if !answers_ready(member.health).await {
                return false;
            }
        }
        true
    }

    async fn kill(&mut self, i: usize) -> anyhow::Result<()> {
        let member = self.relays[i]
            .take()
            .ok_or_else(|| anyhow::anyhow!("scale-out: relay {i} is gone already"))?;
        member.process.kill().await
    }

    /// SIGSTOP or SIGCONT to relay `i`.
    fn signal(&mut self, i: usize, signal: libc::c_int) -> anyhow::Result<()> {
        let member = self.relays[i]
            .as_mut()
            .ok_or_else(|| anyhow::anyhow!("scale-out: relay {i} is gone"))?;
        member.process.signal(signal)?;
        member.paused = signal == libc::SIGSTOP;
        Ok(())
    }

    /// Adds the warnings and errors of every relay's log so far.
    fn read_logs(&self, log: &mut LogProblems) {
        for path in &self.logs {
            log.read(path);
        }
    }

    /// Stops every relay left with SIGTERM, all at once; their usage, or the first failure.
    async fn stop(&mut self) -> anyhow::Result<Vec<Usage>> {
        let members: Vec<Member> = self.relays.iter_mut().filter_map(Option::take).collect();
        let stopped =
            futures::future::join_all(members.into_iter().map(|m| m.process.stop())).await;
        stopped.into_iter().collect()
    }
}

/// `GET /ready` answered 200 within a second (a paused relay never answers).
async fn answers_ready(addr: SocketAddr) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let ask = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await?;
        stream
            .write_all(b"GET /ready HTTP/1.1\r\nHost: relay\r\nConnection: close\r\n\r\n")
            .await?;
        let mut answer = String::new();
        stream.read_to_string(&mut answer).await?;
        Ok::<_, std::io::Error>(answer.starts_with("HTTP/1.1 200"))
    };
    matches!(
        tokio::time::timeout(Duration::from_secs(1), ask).await,
        Ok(Ok(true))
    )
}
