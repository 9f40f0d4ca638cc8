//! `outbox-relay-soak`: a seeded fault-injection soak. Runs real producers, the real relay
//! binary (one or several processes sharing the table's partitions) and a real consumer
//! against the local PostgreSQL and RabbitMQ, injects faults at seeded random times, checks the
//! relay's promises continuously and against the table at the end, and prints one summary line
//! (plus one line per fault kind).

mod badrows;
mod checker;
mod consumer;
mod faults;
mod leases;
mod operator;
mod partitions;
mod producers;
mod relays;
mod setup;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use sqlx::{Connection, Row};
use tokio_util::sync::CancellationToken;

use checker::{body_hash, Checker, CommittedRow};
use faults::{FaultKind, FaultLog, Injector};
use operator::{Mark, RowFaults, RowFigures, RowLog};
use outbox_relay_testkit::proxy::Proxy;
use outbox_relay_testkit::servers::Servers;
use partitions::Timeline;
use producers::{Load, ProducerLog, ProducerStats};
use relays::{LeaseLines, Relays};
use setup::{Sharing, World};

/// The longest any one step of the run's ending (stopping the fault injector, which restores
/// the servers, or a producer) may take before the soak goes on without it.
const ENDING_STEP: Duration = Duration::from_secs(120);

/// Seeded fault-injection soak for outbox-relay: producers, the relay binary and a consumer
/// under real faults; prints `soak: seed=S produced=N delivered=N lost=N order_violations=N
/// duplicates=N faults=N longest_recovery_ms=N` and exits non-zero if anything was lost, out
/// of order, or delivered after a rollback.
#[derive(Debug, Parser)]
#[command(name = "outbox-relay-soak", version)]
struct Args {
    /// Seed of the fault schedule and of the producers' choices (default: from the clock).
    #[arg(long)]
    seed: Option<u64>,
    /// How long producers write and faults are injected (then the relay drains).
    #[arg(long, default_value = "3m", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Rows committed per second, over all producers.
    #[arg(long, default_value_t = 200)]
    events_per_second: u32,
    /// Producer connections.
    #[arg(long, default_value_t = 4)]
    producers: u32,
    /// Ordering keys the rows are spread over.
    #[arg(long, default_value_t = 100)]
    keys: u32,
    /// Relay processes running on the table the whole time (members sharing its partitions);
    /// relay-kill kills one of them at random and starts another.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=50))]
    relays: u32,
    /// The table's partitions (`[[outbox]] partitions`): with the default 100 keys, 16 gives
    /// each partition about six keys.
    #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u32).range(1..))]
    partitions: u32,
    /// Broker channels per table and relay (`[relay] channels`).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    channels: u32,
    /// How often a member renews (`[relay] heartbeat`).
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    heartbeat: Duration,
    /// How long a member stays live after its last heartbeat (`[relay] lease`); must be longer
    /// than the heartbeat + 4 s (the soak's confirm and statement timeouts, 2 s each). A pause
    /// lasts the lease + 1..3 s; delivery on every partition should resume within lease + 2 s.
    #[arg(long, default_value = "6s", value_parser = humantime::parse_duration)]
    lease: Duration,
    /// Fault kinds, comma-separated, or `all` or `none`: relay-kill, relay-pause, member-join,
    /// member-leave, two-relays, amqp-close, broker-restart, broker-alarm, pg-terminate,
    /// pg-restart, net-reset, net-silent, net-latency, bad-row, operator. `all` has
    /// relay-pause, member-join and member-leave only with --relays 2 or more, and never
    /// bad-row or operator (they change the table's rows: ask for them by name).
    #[arg(long, default_value = "all", value_delimiter = ',')]
    faults: Vec<String>,
    /// Leave out the whole-server faults (broker-restart, broker-alarm, pg-restart), e.g. when
    /// other test runs share the servers.
    #[arg(long)]
    no_server_faults: bool,
    /// Mean pause between two faults.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    fault_gap: Duration,
    /// How long to wait after the run for every committed row to arrive before counting it lost.
    #[arg(long, default_value = "60s", value_parser = humantime::parse_duration)]
    drain_grace: Duration,
    /// Also write the figures as JSON to FILE.
    #[arg(long, value_name = "FILE")]
    json: Option<PathBuf>,
    /// The relay binary (default: `outbox-relay` next to this executable).
    #[arg(long, value_name = "PATH")]
    relay_bin: Option<PathBuf>,
    /// PostgreSQL server (user and host; the soak creates its own database).
    #[arg(
        long,
        env = "SOAK_POSTGRES_URL",
        default_value = "postgres://postgres@127.0.0.1:5432"
    )]
    postgres_url: url::Url,
    /// RabbitMQ server (user and host; the soak creates its own vhost).
    #[arg(
        long,
        env = "SOAK_RABBITMQ_URL",
        default_value = "amqp://guest:guest@127.0.0.1:5672"
    )]
    rabbitmq_url: url::Url,
    /// Keep the database and vhost after the run (for inspection).
    #[arg(long)]
    keep: bool,
}

fn main() {
    let args = Args::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("soak: cannot start the async runtime: {e}");
            std::process::exit(2);
        }
    };
    let code = match runtime.block_on(soak(args)) {
        Ok(passed) if passed => 0,
        Ok(_) => 1,
        Err(e) => {
            eprintln!("soak: {e:#}");
            2
        }
    };
    std::process::exit(code);
}

fn fault_kinds(args: &Args) -> anyhow::Result<Vec<FaultKind>> {
    let mut kinds = Vec::new();
    for name in &args.faults {
        match name.trim() {
            "all" => kinds.extend(
                FaultKind::ALL
                    .into_iter()
                    .filter(|k| (args.relays >= 2 || !k.needs_members()) && !k.changes_rows()),
            ),
            "none" | "" => {}
            other => kinds.push(FaultKind::parse(other).with_context(|| {
                let names: Vec<_> = FaultKind::ALL.iter().map(|k| k.name()).collect();
                format!(
                    "--faults: unknown kind {other:?} (known: {})",
                    names.join(", ")
                )
            })?),
        }
    }
    kinds.sort();
    kinds.dedup();
    if args.no_server_faults {
        kinds.retain(|k| !k.is_server_wide());
    }
    Ok(kinds)
}

/// Runs the whole soak; `Ok(true)` when every invariant held.
async fn soak(args: Args) -> anyhow::Result<bool> {
    let seed = args.seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64 % 1_000_000_000)
            .unwrap_or(1)
    });
    let kinds = fault_kinds(&args)?;
    let relay_bin = match &args.relay_bin {
        Some(p) => p.clone(),
        None => relays::locate_relay_binary()?,
    };
    let servers = Servers {
        postgres: args.postgres_url.clone(),
        rabbitmq: args.rabbitmq_url.clone(),
    };
    faults::restore_leftovers();
    let lock = Arc::new(faults::ServerLock::shared(Duration::from_secs(60)).await?);
    let broker = if kinds.contains(&FaultKind::BrokerAlarm) {
        Some(faults::BrokerOriginals::read().await?)
    } else {
        None
    };
    let pg_cluster = faults::find_pg_cluster(servers.postgres.port().unwrap_or(5432)).await;
    if kinds.contains(&FaultKind::PgRestart) && pg_cluster.is_none() {
        anyhow::bail!(
            "pg-restart needs pg_lsclusters to find the cluster serving {}",
            servers.postgres
        );
    }

    let run_id = format!("{seed}_{}", std::process::id());
    let world = World::named(&run_id);
    let names: Vec<_> = kinds.iter().map(|k| k.name()).collect();
    eprintln!(
        "soak: seed={seed} duration={} events_per_second={} relays={} partitions={} lease={} heartbeat={} faults={} logs in {}",
        humantime::format_duration(args.duration),
        args.events_per_second,
        args.relays,
        args.partitions,
        humantime::format_duration(args.lease),
        humantime::format_duration(args.heartbeat),
        if names.is_empty() {
            "none".to_string()
        } else {
            names.join(",")
        },
        world.dir.display()
    );
    // A half-made world (database without vhost, say) is not left behind: what was made is
    // removed when a later step fails.
    let made = world.create(&servers).await?;
    let outcome = run(
        &args, seed, kinds, &servers, &world, relay_bin, lock, broker, pg_cluster,
    )
    .await;
    if args.keep {
        made.keep();
    } else if let Err(e) = made.remove().await {
        eprintln!(
            "soak: cleaning up {} / {}: {e:#}",
            world.database, world.vhost
        );
    }
    let (passed, clean) = outcome?;
    if clean && !args.keep {
        let _ = std::fs::remove_dir_all(&world.dir);
    } else {
        eprintln!(
            "soak: relay logs and faults.log kept in {}",
            world.dir.display()
        );
    }
    Ok(passed)
}

#[allow(clippy::too_many_arguments)]
async fn run(
    args: &Args,
    seed: u64,
    kinds: Vec<FaultKind>,
    servers: &Servers,
    world: &World,
    relay_bin: PathBuf,
    lock: Arc<faults::ServerLock>,
    broker: Option<faults::BrokerOriginals>,
    pg_cluster: Option<(String, String)>,
) -> anyhow::Result<(bool, bool)> {
    let pg_proxy = Arc::new(Proxy::start("postgres", servers.postgres_addr()?).await?);
    let amqp_proxy = Arc::new(Proxy::start("rabbitmq", servers.rabbitmq_addr()?).await?);
    let sharing = Sharing {
        partitions: args.partitions,
        channels: args.channels,
        heartbeat: args.heartbeat,
        lease: args.lease,
    };
    let config = world.write_config(servers, &pg_proxy, &amqp_proxy, sharing)?;
    setup::migrate(&relay_bin, &config).await?;
    setup::log_marks(servers, &world.database).await?;
    let key_partitions =
        setup::key_partitions(servers, &world.database, args.keys.max(1), args.partitions).await?;
    let mut keys_per_partition = vec![0u32; args.partitions as usize];
    for p in &key_partitions {
        keys_per_partition[*p as usize] += 1;
    }
    eprintln!(
        "soak: keys per partition: min {} max {} (empty partitions: {})",
        keys_per_partition.iter().min().unwrap_or(&0),
        keys_per_partition.iter().max().unwrap_or(&0),
        keys_per_partition.iter().filter(|n| **n == 0).count()
    );

    // Ctrl-C or SIGTERM ends the run early; faults in progress restore the servers on the way out.
    let stop_faults = CancellationToken::new();
    let stop_producers = CancellationToken::new();
    {
        let (f, p) = (stop_faults.clone(), stop_producers.clone());
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::spawn(async move {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
            eprintln!("soak: interrupted; restoring servers and draining");
            f.cancel();
            p.cancel();
        });
    }

    let stop_watch_leases = CancellationToken::new();
    let lease_watch = tokio::spawn(leases::watch(
        servers.clone(),
        world.database.clone(),
        world.dir.join("leases.log"),
        stop_watch_leases.clone(),
    ));

    let checker = Arc::new(Mutex::new(Checker::default()));
    let consumer = consumer::start(
        servers.rabbitmq_url(Some(&world.vhost)).to_string(),
        checker.clone(),
    )
    .await?;

    let (migrate_bin, migrate_config) = (relay_bin.clone(), config.clone());
    let relays = Arc::new(tokio::sync::Mutex::new(Relays::new(
        relay_bin,
        config,
        world.dir.clone(),
    )));
    {
        let mut r = relays.lock().await;
        r.wanted = args.relays as usize;
        for _ in 0..r.wanted {
            r.spawn()?;
        }
    }
    // Keeps the wanted relays running: a relay that exits by itself is recorded and replaced.
    let stop_watch = CancellationToken::new();
    let watcher = {
        let (relays, stop) = (relays.clone(), stop_watch.clone());
        tokio::spawn(async move {
            while !stop.is_cancelled() {
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(300)) => {}
                    _ = stop.cancelled() => break,
                }
                let mut r = relays.lock().await;
                r.reap();
                while r.running() < r.wanted {
                    if let Err(e) = r.spawn() {
                        eprintln!("soak: {e:#}");
                        break;
                    }
                }
            }
        })
    };

    let stats = Arc::new(ProducerStats::default());
    let load = Load {
        rows_per_second: f64::from(args.events_per_second.max(1))
            / f64::from(args.producers.max(1)),
        keys: args.keys.max(1),
    };
    let gate = producers::Gate::default();
    let producers: Vec<_> = (0..args.producers.max(1))
        .map(|i| {
            tokio::spawn(producers::run(
                i,
                seed,
                servers.clone(),
                world.database.clone(),
                load,
                stats.clone(),
                gate.clone(),
                stop_producers.clone(),
            ))
        })
        .collect();

    let row_log = Arc::new(Mutex::new(RowLog::default()));
    let rows = if kinds.iter().any(|k| k.changes_rows()) {
        let frame_max = setup::frame_max(servers, &world.vhost).await?;
        eprintln!("soak: bad rows are sized against frame_max={frame_max}");
        Some(RowFaults::new(
            seed,
            servers.clone(),
            world.database.clone(),
            frame_max,
            operator::Recreate {
                relay_bin: migrate_bin.clone(),
                config: migrate_config.clone(),
                gate: gate.clone(),
            },
            row_log.clone(),
        ))
    } else {
        None
    };
    let fault_log = Arc::new(Mutex::new(FaultLog::default()));
    let injector = Injector {
        rng: Injector::new_rng(seed),
        kinds: kinds.clone(),
        mean_gap: args.fault_gap,
        members: args.relays as usize,
        lease: args.lease,
        relays: relays.clone(),
        pg_proxy: pg_proxy.clone(),
        amqp_proxy: amqp_proxy.clone(),
        servers: servers.clone(),
        world: world.clone(),
        lock,
        broker,
        pg_cluster,
        rows,
        stop: stop_faults.clone(),
    };
    let injector = tokio::spawn(injector.run(fault_log.clone()));

    // The run: progress every 10 s until the duration is over or Ctrl-C.
    let started = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_secs(10));
    tick.tick().await;
    let mut delivered_before = usize::MAX;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = tokio::time::sleep(args.duration.saturating_sub(started.elapsed())) => break,
            _ = stop_producers.cancelled() => break,
        }
        let delivered = checker
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .delivered();
        // No std guard may live across an await: read each figure on its own.
        let faults = fault_log
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .records
            .len();
        let (spawned, running) = {
            let r = relays.lock().await;
            (r.spawned(), r.running())
        };
        eprintln!(
            "soak: t={}s committed={} delivered={delivered} faults={faults} relays_running={running} relays_started={spawned} consumer_reconnects={}",
            started.elapsed().as_secs(),
            stats.committed_rows.load(Ordering::Relaxed),
            consumer.reconnects(),
        );
        if delivered == delivered_before {
            // Nothing arrived for 10 s: say whether the relays or the consumer stand still.
            let table = tokio::time::timeout(
                Duration::from_secs(5),
                read_table_state(servers, &world.database),
            )
            .await;
            match table {
                Ok(Ok(t)) => eprintln!(
                    "soak: nothing delivered for 10 s; the table has {} unpublished rows ({} parked)",
                    t.unpublished, t.parked
                ),
                _ => eprintln!("soak: nothing delivered for 10 s; the table could not be read within 5 s"),
            }
        }
        delivered_before = delivered;
    }

    // Faults end first (servers restored, network healed), then producers stop.
    // Every step of the ending is bounded: a soak that hangs tells nobody anything.
    stop_faults.cancel();
    match tokio::time::timeout(ENDING_STEP, injector).await {
        Ok(Ok(())) => {}
        Ok(Err(_)) => {
            eprintln!("soak: the fault injector panicked (servers restored by its guards)")
        }
        Err(_) => eprintln!(
            "soak: the fault injector did not end within {}s of being stopped; going on without it",
            ENDING_STEP.as_secs()
        ),
    }
    pg_proxy.heal();
    amqp_proxy.heal();
    stop_producers.cancel();
    let mut logs = Vec::new();
    for mut p in producers {
        match tokio::time::timeout(ENDING_STEP, &mut p).await {
            Ok(log) => logs.push(log.unwrap_or_default()),
            Err(_) => {
                eprintln!(
                    "soak: a producer did not stop within {}s; its log is lost",
                    ENDING_STEP.as_secs()
                );
                p.abort();
                logs.push(Default::default());
            }
        }
    }
    let run_ended = Instant::now();

    // Drain: wait for every committed row to arrive (bad rows are judged on their own).
    let (mut committed, end_bad) = read_committed(servers, &world.database).await?;
    let drain_started = Instant::now();
    loop {
        let missing = {
            let c = checker.lock().unwrap_or_else(|e| e.into_inner());
            committed.iter().filter(|r| !c.has(r.id)).count()
        };
        if missing == 0 || drain_started.elapsed() > args.drain_grace {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let drain_time = drain_started.elapsed();
    // A little longer, so late duplicates are counted too.
    tokio::time::sleep(Duration::from_secs(1)).await;
    // Every mark names a row version that a consumer must have received (a moment after its
    // confirm at the latest: allow 15 s).
    let marks = read_marks(servers, &world.database).await?;
    let marks_deadline = Instant::now() + Duration::from_secs(15);
    while Instant::now() < marks_deadline {
        let unreceived = {
            let c = checker.lock().unwrap_or_else(|e| e.into_inner());
            marks
                .iter()
                .filter(|m| !c.received_body(m.id, m.body_hash))
                .count()
        };
        if unreceived == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    stop_watch.cancel();
    let _ = watcher.await;
    // Before the relays leave: their partitions are unowned after that, as they should be.
    stop_watch_leases.cancel();
    let lease_watch = lease_watch.await.unwrap_or_default();
    relays
        .lock()
        .await
        .terminate_all(Duration::from_secs(10))
        .await;
    let consumer_reconnects = consumer.reconnects();
    consumer.stop().await;
    pg_proxy.stop();
    amqp_proxy.stop();
    let table = read_table_state(servers, &world.database)
        .await
        .unwrap_or_default();
    write_fault_log(
        world,
        started,
        &fault_log.lock().unwrap_or_else(|e| e.into_inner()),
    );

    let relays = relays.lock().await;
    let checker = checker.lock().unwrap_or_else(|e| e.into_inner());
    let fault_log = fault_log.lock().unwrap_or_else(|e| e.into_inner());
    let row_log = row_log.lock().unwrap_or_else(|e| e.into_inner());
    // Rows a TRUNCATE removed were committed too (owed if they were marked by then).
    committed.extend(row_log.truncated_good.iter().cloned());
    committed.sort_by_key(|r| r.id);
    let row_figures = operator::figures(&row_log, &checker, &end_bad, &marks, setup::EXCHANGE);
    let timeline = partition_timeline(
        &committed,
        &logs,
        &checker,
        &key_partitions,
        args.partitions,
    );
    let report = Report::build(
        seed,
        &checker,
        &committed,
        &logs,
        &fault_log,
        &row_log,
        &row_figures,
        &stats,
        &relays,
        &table,
        &Membership {
            sharing,
            relays: args.relays,
            timeline: &timeline,
            lease_lines: relays.lease_lines(),
            lease_watch,
        },
        started,
        drain_time,
        run_ended,
        consumer_reconnects,
    );
    report.print();
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&report.json)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    if !report.passed {
        eprintln!(
            "soak: FAILED (seed {seed}); relay logs kept in {}: {}",
            world.dir.display(),
            relays
                .logs()
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(" ")
        );
    }
    Ok((report.passed, report.passed && report.slow_recoveries == 0))
}

/// One line per injected fault, kept with the relay logs for a failure's diagnosis: times from
/// the start of the run and, to match the relays' log lines, in UTC.
fn write_fault_log(world: &World, started: Instant, log: &FaultLog) {
    let wall_started = std::time::SystemTime::now() - started.elapsed();
    let utc =
        |t: Instant| humantime::format_rfc3339_millis(wall_started + t.duration_since(started));
    let mut text = String::new();
    for r in &log.records {
        text += &format!(
            "t={:.3}s..{:.3}s ({}..{}) {} {}\n",
            r.started.duration_since(started).as_secs_f64(),
            r.ended.duration_since(started).as_secs_f64(),
            utc(r.started),
            utc(r.ended),
            r.kind.name(),
            r.detail
        );
    }
    let _ = std::fs::write(world.dir.join("faults.log"), text);
}

/// Each committed row by partition, with when it was committed (its producer's first attempt
/// began) and when it first arrived. Rows no producer saw commit (given up at shutdown) are left
/// out: when they were committed is not known.
fn partition_timeline(
    committed: &[CommittedRow],
    logs: &[ProducerLog],
    checker: &Checker,
    key_partitions: &[u32],
    partitions: u32,
) -> Timeline {
    let began: std::collections::HashMap<&str, Instant> = logs
        .iter()
        .flat_map(|l| l.acknowledged.iter())
        .map(|a| (a.dedup_key.as_str(), a.began))
        .collect();
    Timeline::new(
        partitions,
        committed.iter().filter(|r| r.owed).filter_map(|r| {
            let key: usize = r.ordering_key.strip_prefix("key-")?.parse().ok()?;
            let partition = *key_partitions.get(key)?;
            let began = *began.get(r.dedup_key.as_str())?;
            Some((partition, began, checker.first_delivered(r.id)))
        }),
    )
}

/// Every committed row in the table, read once producers have stopped: the good ones (owed),
/// and the bad ones' state by id.
async fn read_committed(
    servers: &Servers,
    database: &str,
) -> anyhow::Result<(Vec<CommittedRow>, HashMap<i64, badrows::RowState>)> {
    let mut conn = connect_with_retry(servers, database).await?;
    let rows = sqlx::query(
        "SELECT id, dedup_key, ordering_key, payload::text AS payload, \
                published_at IS NOT NULL AS published, parked_at IS NOT NULL AS parked, \
                coalesce(last_error, '') AS reason FROM public.outbox ORDER BY id",
    )
    .fetch_all(&mut conn)
    .await
    .context("reading the committed rows")?;
    conn.close().await.ok();
    let mut good = Vec::with_capacity(rows.len());
    let mut bad = HashMap::new();
    for r in &rows {
        let id = r.try_get("id")?;
        let ordering_key: String = r.try_get("ordering_key")?;
        let payload: String = r.try_get("payload")?;
        if ordering_key.starts_with(badrows::KEY_PREFIX) {
            bad.insert(
                id,
                badrows::RowState {
                    parked: r.try_get("parked")?,
                    published: r.try_get("published")?,
                    reason: r.try_get("reason")?,
                    payload,
                    truncated: false,
                },
            );
        } else {
            good.push(CommittedRow {
                id,
                dedup_key: r.try_get("dedup_key")?,
                ordering_key,
                body_hash: body_hash(payload.as_bytes()),
                owed: true,
            });
        }
    }
    Ok((good, bad))
}

/// Every mark the soak's trigger logged.
async fn read_marks(servers: &Servers, database: &str) -> anyhow::Result<Vec<Mark>> {
    let mut conn = connect_with_retry(servers, database).await?;
    let rows: Vec<(i64, String, String)> =
        sqlx::query_as("SELECT id, dedup_key, payload FROM soak_marks")
            .fetch_all(&mut conn)
            .await
            .context("reading the marks log")?;
    conn.close().await.ok();
    Ok(rows
        .into_iter()
        .map(|(id, dedup_key, payload)| Mark {
            id,
            dedup_key,
            body_hash: body_hash(payload.as_bytes()),
        })
        .collect())
}

async fn connect_with_retry(
    servers: &Servers,
    database: &str,
) -> anyhow::Result<sqlx::PgConnection> {
    let mut last = None;
    for _ in 0..60 {
        match servers.connect_pg(database, "obr-soak-checker").await {
            Ok(c) => return Ok(c),
            Err(e) => last = Some(e),
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    Err(last
        .map(anyhow::Error::from)
        .unwrap_or_else(|| anyhow::anyhow!("cannot connect")))
    .context("connecting to the soak's database")
}

/// The rows' state at the end, as the relay left it.
#[derive(Debug, Default)]
struct TableState {
    unpublished: i64,
    parked: i64,
    retried: i64,
    /// Lease rows of the table (one per partition once a relay registered), `None` before the
    /// relay has leases.
    leases: Option<i64>,
}

async fn read_table_state(servers: &Servers, database: &str) -> anyhow::Result<TableState> {
    let mut conn = connect_with_retry(servers, database).await?;
    let row = sqlx::query(
        "SELECT count(*) FILTER (WHERE published_at IS NULL) AS unpublished, \
                count(*) FILTER (WHERE parked_at IS NOT NULL) AS parked, \
                count(*) FILTER (WHERE attempts > 0) AS retried FROM public.outbox",
    )
    .fetch_one(&mut conn)
    .await?;
    let leases = sqlx::query_scalar(
        "SELECT count(*) FROM outbox_relay.leases WHERE table_oid = 'public.outbox'::regclass",
    )
    .fetch_one(&mut conn)
    .await
    .ok();
    conn.close().await.ok();
    Ok(TableState {
        unpublished: row.try_get("unpublished")?,
        parked: row.try_get("parked")?,
        retried: row.try_get("retried")?,
        leases,
    })
}

/// How the relays shared the table, and what the figures about sharing are read from.
struct Membership<'a> {
    sharing: Sharing,
    /// `--relays`.
    relays: u32,
    timeline: &'a Timeline,
    lease_lines: LeaseLines,
    lease_watch: leases::LeaseWatch,
}

/// The figures of a run, as text lines and as JSON.
struct Report {
    lines: Vec<String>,
    json: serde_json::Value,
    passed: bool,
    /// Recoveries and partition resumptions over their targets: not failures, but the logs are
    /// kept.
    slow_recoveries: usize,
}

#[derive(Default)]
struct KindFigures {
    count: u64,
    longest_recovery_ms: u64,
    no_recovery: u64,
    /// Faults followed by the next one before delivery resumed.
    interrupted: u64,
    duplicates: u64,
    max_duplicates_per_fault: u64,
    /// Faults whose duplicates were more than the window of each relay they hit.
    over_window: u64,
    /// Faults after which rows were committed (so resumption could be measured).
    resumption_measured: u64,
    longest_resumption_ms: u64,
    /// Resumptions longer than the bound (lease + 2 s).
    resumption_missed: u64,
    /// Faults followed by the next one before every partition resumed, within the bound.
    resumption_interrupted: u64,
}

/// One fault's own figures.
struct FaultFigures {
    recovery: Duration,
    duplicates: u64,
    /// Delivery on every partition resuming, measured from the record's `from`: the wait (up
    /// to the next fault), the verdict, and what the rows said uncut.
    resumption: Option<(Duration, Resumed, partitions::Resumption)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Resumed {
    Met,
    Missed,
    /// The next fault came first; what is known is within the bound.
    Interrupted,
}

impl Resumed {
    fn name(self) -> &'static str {
        match self {
            Resumed::Met => "met",
            Resumed::Missed => "missed",
            Resumed::Interrupted => "interrupted",
        }
    }
}

impl Report {
    #[allow(clippy::too_many_arguments)]
    fn build(
        seed: u64,
        checker: &Checker,
        committed: &[CommittedRow],
        logs: &[ProducerLog],
        fault_log: &FaultLog,
        row_log: &RowLog,
        row_figures: &RowFigures,
        stats: &ProducerStats,
        relays: &Relays,
        table: &TableState,
        members: &Membership,
        run_started: Instant,
        drain_time: Duration,
        run_ended: Instant,
        consumer_reconnects: u64,
    ) -> Report {
        let rolled_back: HashSet<String> = logs
            .iter()
            .flat_map(|l| l.rolled_back.iter().cloned())
            .collect();
        let verdict = checker.verdict(committed, &rolled_back, &row_log.versions);
        let in_table: HashSet<&str> = committed.iter().map(|r| r.dedup_key.as_str()).collect();
        let acknowledged_missing: Vec<&str> = logs
            .iter()
            .flat_map(|l| l.acknowledged.iter())
            .map(|a| a.dedup_key.as_str())
            .filter(|k| !in_table.contains(k))
            .collect();
        let uncertain: usize = logs.iter().map(|l| l.uncertain.len()).sum();
        // A retried dedup_key inserts again after a TRUNCATE removed its row (right); any other
        // re-insert is wrong.
        let truncated_keys: HashSet<&str> = row_log
            .truncated_good
            .iter()
            .map(|r| r.dedup_key.as_str())
            .collect();
        let (reinserted_after_truncate, reinserted): (Vec<&String>, Vec<&String>) = logs
            .iter()
            .flat_map(|l| l.reinserted.iter())
            .partition(|k| truncated_keys.contains(k.as_str()));
        let delivered = committed.iter().filter(|r| checker.has(r.id)).count();

        let records = &fault_log.records;
        // The duplicates that arrived while a fault was the latest one.
        let mut duplicates = vec![0u64; records.len()];
        for t in &checker.duplicate_times {
            let i = records.partition_point(|r| r.started <= *t);
            if i > 0 {
                duplicates[i - 1] += 1;
            }
        }
        let recovery_target = setup::RECONNECT_MAX_DELAY + Duration::from_secs(2);
        let resumption_bound = members.sharing.lease + Duration::from_secs(2);
        let mut kinds: BTreeMap<FaultKind, KindFigures> = BTreeMap::new();
        let mut per_fault = Vec::with_capacity(records.len());
        let mut longest_recovery = Duration::ZERO;
        let mut slow = Vec::new();
        let mut slow_resumptions = Vec::new();
        let mut over_window = Vec::new();
        for (i, r) in records.iter().enumerate() {
            let k = kinds.entry(r.kind).or_default();
            k.count += 1;
            let next = records.get(i + 1).map(|n| n.started);

            // Recovery: fault end to the next delivery.
            let mut recovery = match checker.recovery_after(r.ended) {
                Some(d) => d,
                None => {
                    k.no_recovery += 1;
                    run_ended.saturating_duration_since(r.ended)
                }
            };
            // The next fault began before delivery resumed: this fault's recovery is only
            // known to be at least the time until then (and is slow if even that is too long).
            if let Some(next) = next {
                let until_next = next.saturating_duration_since(r.ended);
                if until_next < recovery {
                    k.interrupted += 1;
                    recovery = until_next;
                }
            }
            k.longest_recovery_ms = k.longest_recovery_ms.max(recovery.as_millis() as u64);
            longest_recovery = longest_recovery.max(recovery);
            // Target: delivery resumes within the relay's maximum reconnect backoff + 2 s.
            if recovery > recovery_target {
                slow.push(format!(
                    "{} ({}): {} ms",
                    r.kind.name(),
                    r.detail,
                    recovery.as_millis()
                ));
            }

            // Delivery on every partition resuming, from `from` (the kill or pause itself for
            // the faults the other members are to cover, else the fault's end).
            let resumption = members.timeline.resumption(r.from).map(|res| {
                let mut waited = if res.never > 0 {
                    run_ended.saturating_duration_since(r.from)
                } else {
                    res.longest
                };
                let mut verdict = if waited > resumption_bound {
                    Resumed::Missed
                } else {
                    Resumed::Met
                };
                if let Some(next) = next {
                    let until_next = next.saturating_duration_since(r.from);
                    if until_next < waited {
                        waited = until_next;
                        verdict = if until_next > resumption_bound {
                            Resumed::Missed
                        } else {
                            Resumed::Interrupted
                        };
                    }
                }
                k.resumption_measured += 1;
                k.longest_resumption_ms = k.longest_resumption_ms.max(waited.as_millis() as u64);
                match verdict {
                    Resumed::Met => {}
                    Resumed::Missed => {
                        k.resumption_missed += 1;
                        let late: Vec<String> = res
                            .later_than(resumption_bound)
                            .iter()
                            .map(|(p, w)| match w {
                                Some(w) => format!("{p} after {} ms", w.as_millis()),
                                None => format!("{p} never"),
                            })
                            .collect();
                        slow_resumptions.push(format!(
                            "{} ({}): {} ms; of {} partitions with rows committed after it, these delivered one later than {} ms: {}",
                            r.kind.name(),
                            r.detail,
                            waited.as_millis(),
                            res.partitions,
                            resumption_bound.as_millis(),
                            late.join(", ")
                        ));
                    }
                    Resumed::Interrupted => k.resumption_interrupted += 1,
                }
                (waited, verdict, res)
            });

            let dups = duplicates[i];
            k.duplicates += dups;
            k.max_duplicates_per_fault = k.max_duplicates_per_fault.max(dups);
            if dups > setup::WINDOW * r.relays_hit.max(1) as u64 {
                k.over_window += 1;
                over_window.push(format!(
                    "{} ({}): {dups} duplicates, more than the window ({}) of the {} relay(s) it hit",
                    r.kind.name(),
                    r.detail,
                    setup::WINDOW,
                    r.relays_hit.max(1)
                ));
            }
            per_fault.push(FaultFigures {
                recovery,
                duplicates: dups,
                resumption,
            });
        }

        let produced = committed.len() as u64;
        let order_violations = checker.order_violations.len() as u64;
        let bound_ms = resumption_bound.as_millis() as u64;
        let mut lines = vec![format!(
            "soak: seed={seed} produced={produced} delivered={delivered} lost={} order_violations={order_violations} duplicates={} faults={} longest_recovery_ms={}{}",
            verdict.lost,
            checker.duplicates,
            records.len(),
            longest_recovery.as_millis(),
            if row_log.truncates > 0 {
                format!(" not_owed={}", verdict.not_owed)
            } else {
                String::new()
            }
        )];
        for (kind, k) in &kinds {
            let resumed = if k.resumption_measured == 0 {
                String::new()
            } else {
                format!(
                    " partitions_resumed_longest_ms={} bound_ms={bound_ms} resumption={}{}",
                    k.longest_resumption_ms,
                    if k.resumption_missed == 0 {
                        "met".to_string()
                    } else {
                        format!("missed({})", k.resumption_missed)
                    },
                    if k.resumption_interrupted > 0 {
                        format!(" resumption_interrupted={}", k.resumption_interrupted)
                    } else {
                        String::new()
                    }
                )
            };
            lines.push(format!(
                "fault kind={} count={} longest_recovery_ms={} duplicates={} max_duplicates_per_fault={}{}{}{}{}",
                kind.name(),
                k.count,
                k.longest_recovery_ms,
                k.duplicates,
                k.max_duplicates_per_fault,
                if k.over_window > 0 { format!(" over_window={}", k.over_window) } else { String::new() },
                resumed,
                if k.interrupted > 0 { format!(" interrupted={}", k.interrupted) } else { String::new() },
                if k.no_recovery > 0 { format!(" no_delivery_after={}", k.no_recovery) } else { String::new() }
            ));
        }
        for (kind, why) in &fault_log.skipped {
            lines.push(format!("fault kind={} skipped: {why}", kind.name()));
        }
        lines.push(format!(
            "producers: committed_txs={} rolled_back_txs={} rolled_back_rows={} rolled_back_delivered={} dedup_retries={} dedup_reinserted={}{} failed_attempts={} ambiguous_commits={} uncertain={uncertain} acknowledged_missing={}",
            stats.committed_txs.load(Ordering::Relaxed),
            stats.rolled_back_txs.load(Ordering::Relaxed),
            stats.rolled_back_rows.load(Ordering::Relaxed),
            verdict.rolled_back_delivered.len(),
            stats.dedup_retries.load(Ordering::Relaxed),
            reinserted.len(),
            if reinserted_after_truncate.is_empty() {
                String::new()
            } else {
                format!(
                    " dedup_reinserted_after_truncate={}",
                    reinserted_after_truncate.len()
                )
            },
            stats.failed_attempts.load(Ordering::Relaxed),
            stats.ambiguous_commits.load(Ordering::Relaxed),
            acknowledged_missing.len()
        ));
        lines.push(format!(
            "consumer: deliveries={} redeliveries={} duplicate_mismatches={} wrong_content={} unknown_delivered={} reconnects={consumer_reconnects}",
            checker.deliveries,
            checker.redeliveries,
            verdict.mismatches.len(),
            verdict.wrong_content.len(),
            verdict.unknown_delivered.len()
        ));
        lines.push(format!(
            "relay: processes_started={} unexpected_exits={} rows_unpublished_at_end={} rows_parked={} rows_retried={} drain_ms={} slow_recoveries={}",
            relays.spawned(),
            relays.unexpected_exits.len(),
            table.unpublished,
            table.parked,
            table.retried,
            drain_time.as_millis(),
            slow.len()
        ));
        let lease_lines = members.lease_lines;
        let sharing = members.sharing;
        lines.push(format!(
            "members: relays={} partitions={} channels={} heartbeat_ms={} lease_ms={} leases_in_table={} registered={} lease_ran_out={} left={} owner_changes={} longest_unowned_ms={} slow_partition_resumptions={} over_window={}",
            members.relays,
            sharing.partitions,
            sharing.channels,
            sharing.heartbeat.as_millis(),
            sharing.lease.as_millis(),
            table.leases.map_or("none".to_string(), |n| n.to_string()),
            lease_lines.registered,
            lease_lines.lease_ran_out,
            lease_lines.left,
            members.lease_watch.owner_changes,
            members.lease_watch.longest_unowned.as_millis(),
            slow_resumptions.len(),
            over_window.len()
        ));
        let details = [
            ("lost", &verdict.lost_examples),
            ("order violation", &checker.order_violations),
            ("rolled back but delivered", &verdict.rolled_back_delivered),
            ("duplicate mismatch", &verdict.mismatches),
            ("wrong content", &verdict.wrong_content),
            ("slow recovery", &slow),
            ("slow partition resumption", &slow_resumptions),
            ("duplicates over the window", &over_window),
            ("relay exit", &relays.unexpected_exits),
            ("slow key release", &row_figures.slow_releases),
        ];
        // The bad-row and operator lines when those faults ran; the marks line always.
        let row_faults_ran = !row_log.bad.is_empty() || !row_log.actions.is_empty();
        let skip = if row_faults_ran {
            0
        } else {
            row_figures.lines.len().saturating_sub(1)
        };
        lines.extend(row_figures.lines.iter().skip(skip).cloned());
        for (what, list) in details {
            for item in list.iter().take(10) {
                lines.push(format!("  {what}: {item}"));
            }
        }
        for item in row_figures.failures.iter().take(20) {
            lines.push(format!("  {item}"));
        }
        let passed = verdict.lost == 0
            && order_violations == 0
            && verdict.rolled_back_delivered.is_empty()
            && verdict.mismatches.is_empty()
            && row_figures.failures.is_empty()
            && verdict.wrong_content.is_empty()
            && acknowledged_missing.is_empty()
            && relays.unexpected_exits.is_empty();
        let json = serde_json::json!({
            "seed": seed,
            "produced": produced,
            "delivered": delivered,
            "lost": verdict.lost,
            "not_owed": verdict.not_owed,
            "order_violations": order_violations,
            "duplicates": checker.duplicates,
            "faults": records.len(),
            "longest_recovery_ms": longest_recovery.as_millis() as u64,
            "passed": passed,
            "members": {
                "relays": members.relays,
                "partitions": sharing.partitions,
                "channels": sharing.channels,
                "heartbeat_ms": sharing.heartbeat.as_millis() as u64,
                "lease_ms": sharing.lease.as_millis() as u64,
                "partition_resumption_bound_ms": bound_ms,
                "window": setup::WINDOW,
                "leases_in_table": table.leases,
                "registered": lease_lines.registered,
                "lease_ran_out": lease_lines.lease_ran_out,
                "left": lease_lines.left,
                "owner_changes": members.lease_watch.owner_changes,
                "longest_unowned_ms": members.lease_watch.longest_unowned.as_millis() as u64,
                "lease_samples": members.lease_watch.samples,
                "slow_partition_resumptions": slow_resumptions.len(),
                "over_window": over_window.len(),
            },
            "faults_by_kind": kinds.iter().map(|(kind, k)| (kind.name().to_string(), serde_json::json!({
                "count": k.count,
                "longest_recovery_ms": k.longest_recovery_ms,
                "duplicates": k.duplicates,
                "max_duplicates_per_fault": k.max_duplicates_per_fault,
                "over_window": k.over_window,
                "no_delivery_after": k.no_recovery,
                "interrupted": k.interrupted,
                "partitions_resumed": {
                    "measured": k.resumption_measured,
                    "longest_ms": k.longest_resumption_ms,
                    "bound_ms": bound_ms,
                    "met": k.resumption_missed == 0,
                    "missed": k.resumption_missed,
                    "interrupted": k.resumption_interrupted,
                },
            }))).collect::<serde_json::Map<_, _>>(),
            // Times in seconds from the start of the run.
            "fault_records": records.iter().zip(&per_fault).map(|(r, f)| serde_json::json!({
                "kind": r.kind.name(),
                "started_s": r.started.duration_since(run_started).as_secs_f64(),
                "ended_s": r.ended.duration_since(run_started).as_secs_f64(),
                "detail": r.detail,
                "relays_hit": r.relays_hit,
                "recovery_ms": f.recovery.as_millis() as u64,
                "duplicates": f.duplicates,
                "partitions_resumed_ms": f.resumption.as_ref().map(|(d, _, _)| d.as_millis() as u64),
                "partitions_resumed": f.resumption.as_ref().map(|(_, v, _)| v.name()),
                "slowest_partition": f.resumption.as_ref().map(|(_, _, res)| res.slowest),
                "slowest_partition_ms": f.resumption.as_ref().map(|(_, _, res)| res.longest.as_millis() as u64),
                "partitions_never_resumed": f.resumption.as_ref().map(|(_, _, res)| res.never),
            })).collect::<Vec<_>>(),
            "skipped_faults": fault_log.skipped.iter().map(|(k, why)| serde_json::json!({"kind": k.name(), "why": why})).collect::<Vec<_>>(),
            "producers": {
                "committed_txs": stats.committed_txs.load(Ordering::Relaxed),
                "rolled_back_txs": stats.rolled_back_txs.load(Ordering::Relaxed),
                "rolled_back_rows": stats.rolled_back_rows.load(Ordering::Relaxed),
                "rolled_back_delivered": verdict.rolled_back_delivered.len(),
                "dedup_retries": stats.dedup_retries.load(Ordering::Relaxed),
                "dedup_reinserted": reinserted.len(),
                "dedup_reinserted_after_truncate": reinserted_after_truncate.len(),
                "failed_attempts": stats.failed_attempts.load(Ordering::Relaxed),
                "ambiguous_commits": stats.ambiguous_commits.load(Ordering::Relaxed),
                "acknowledged_missing": acknowledged_missing.len(),
            },
            "consumer": {
                "deliveries": checker.deliveries,
                "redeliveries": checker.redeliveries,
                "duplicate_mismatches": verdict.mismatches.len(),
                "wrong_content": verdict.wrong_content.len(),
                "unknown_delivered": verdict.unknown_delivered.len(),
                "reconnects": consumer_reconnects,
            },
            "relay": {
                "processes_started": relays.spawned(),
                "unexpected_exits": relays.unexpected_exits.len(),
                "rows_unpublished_at_end": table.unpublished,
                "rows_parked": table.parked,
                "rows_retried": table.retried,
                "drain_ms": drain_time.as_millis() as u64,
                "slow_recoveries": slow.len(),
            },
        });
        let mut json = json;
        if let (Some(object), serde_json::Value::Object(rows)) =
            (json.as_object_mut(), row_figures.json.clone())
        {
            object.extend(rows);
        }
        Report {
            lines,
            json,
            passed,
            slow_recoveries: slow.len()
                + slow_resumptions.len()
                + over_window.len()
                + row_figures.slow_releases.len(),
        }
    }

    fn print(&self) {
        for line in &self.lines {
            println!("{line}");
        }
    }
}
