//! The producers scenario (issue 23): what the outbox costs the application that writes it.
//! Producer connections commit single-row inserts as fast as they can into the outbox table
//! with the relay stopped (the table's triggers alone), with the relay draining it to the live
//! consumer, and with the relay draining it under `notify = false` (no NOTIFY trigger). Each
//! outbox run sits between two runs of the same inserts into a plain copy of the table, so
//! every ratio compares runs seconds apart. The producers only insert and time their own
//! commits; a relay is the bench's child, started for one run and stopped once it caught up.

use std::time::{Duration, Instant};

use anyhow::Context;
use outbox_relay::config::TableName;
use sqlx::postgres::PgPool;
use sqlx::{Connection, PgConnection};

use crate::env::{self, BenchEnv};
use crate::process::{self, HostCpu, LogProblems, ProcessCpu, RelayConfig, RelayProcess};
use crate::report::{
    CommitTimes, ProducerCount, ProducerRun, Producers, RelayKeptUp, Situation, SituationRuns,
};
use crate::scenarios;
use crate::workload;
use crate::Plan;

/// PostgreSQL sessions a relay may open: its pool (`postgres.max_connections`, 4 by default)
/// and its coordination session.
const RELAY_SESSIONS: i64 = 5;
/// Sessions kept free beside the producers for the bench itself: its pool (8) and the
/// short-lived admin and `migrate` connections.
const BENCH_SESSIONS: i64 = 10;
/// How long a relay may take to publish what was left when the producers stopped.
const CATCH_UP_LIMIT: Duration = Duration::from_secs(60);

pub async fn producers(env: &BenchEnv, plan: &Plan) -> anyhow::Result<Producers> {
    let shape = &plan.producer_runs;
    let pool = env.pool()?;
    let outbox = env::table(env::PRODUCERS_TABLE);
    let quiet = env::table(env::PRODUCERS_QUIET_TABLE);
    let plain = env::table(env::PRODUCERS_PLAIN_TABLE);
    workload::create_plain_copy(pool, &outbox, &plain).await?;
    let mut tables = vec![&plain, &outbox];
    if shape.situations.contains(&Situation::DrainingWithoutNotify) {
        let config = RelayConfig::new(env, std::slice::from_ref(&quiet))
            .notify(false)
            .write(&env.dir.join("producers-quiet-migrate.toml"))?;
        process::migrate(
            &env.relay_bin,
            &config,
            &env.dir.join("producers-quiet-migrate.log"),
        )
        .await?;
        tables.push(&quiet);
    }
    check_triggers(pool, &outbox, &quiet, &plain, tables.len() > 2).await?;

    let (max_connections, _) = session_room(pool).await?;
    let mut result = Producers {
        run_s: shape.run.as_secs_f64(),
        short: shape.short,
        max_connections,
        insert: workload::producer_insert_sql(&outbox),
        counts: Vec::new(),
        log: LogProblems::default(),
    };
    for &asked in &shape.counts {
        let (_, room) = session_room(pool).await?;
        let producers = asked.min(room.clamp(1, u32::MAX as i64) as u32);
        if producers < asked {
            eprintln!(
                "  producers: {asked} connections do not fit max_connections {max_connections} \
                 beside the sessions already open, a relay's and the bench's: {producers} instead"
            );
        }
        let mut connections = connect(env, producers).await?;
        // Each connection prepares each table's insert once, untimed.
        for table in &tables {
            commit_for(&mut connections, table, Duration::ZERO).await?;
        }
        let mut count = ProducerCount {
            asked,
            producers,
            situations: shape
                .situations
                .iter()
                .map(|&situation| SituationRuns {
                    situation,
                    outbox: Vec::new(),
                    plain: Vec::new(),
                })
                .collect(),
        };
        let name = format!("producers {producers}");
        let mut before = plain_run(env, &mut connections, &plain, shape.run).await?;
        report_run(&name, 1, plan.rounds, "plain", &before);
        for round in 1..=plan.rounds {
            for runs in &mut count.situations {
                let situation = runs.situation;
                let table = if situation.notify() { &outbox } else { &quiet };
                let tag = format!("prod{producers}{}{round}", situation_tag(situation));
                let run = outbox_run(
                    env,
                    plan,
                    situation,
                    &mut connections,
                    table,
                    &tag,
                    &mut result.log,
                )
                .await?;
                report_run(&name, round, plan.rounds, situation.name(), &run);
                let after = plain_run(env, &mut connections, &plain, shape.run).await?;
                report_run(&name, round, plan.rounds, "plain", &after);
                runs.outbox.push(run);
                runs.plain.push(before);
                runs.plain.push(after.clone());
                before = after;
            }
        }
        for connection in connections {
            let _ = connection.close().await;
        }
        result.counts.push(count);
    }
    Ok(result)
}

fn situation_tag(situation: Situation) -> &'static str {
    match situation {
        Situation::RelayStopped => "stopped",
        Situation::RelayDraining => "draining",
        Situation::DrainingWithoutNotify => "quiet",
    }
}

/// The figures mean what they say only with the right triggers: the outbox has the order
/// guard and the NOTIFY trigger, its quiet twin (when used) the order guard only, the plain
/// copy none.
async fn check_triggers(
    pool: &PgPool,
    outbox: &TableName,
    quiet: &TableName,
    plain: &TableName,
    with_quiet: bool,
) -> anyhow::Result<()> {
    let notify = |t: &TableName| t.derived("notify");
    let found = workload::triggers(pool, outbox).await?;
    anyhow::ensure!(
        found.len() == 2 && found.contains(&notify(outbox)),
        "{outbox} should have the order guard and the NOTIFY trigger, has {found:?}"
    );
    if with_quiet {
        let found = workload::triggers(pool, quiet).await?;
        anyhow::ensure!(
            found.len() == 1 && !found.contains(&notify(quiet)),
            "{quiet} (notify = false) should have the order guard only, has {found:?}"
        );
    }
    let found = workload::triggers(pool, plain).await?;
    anyhow::ensure!(
        found.is_empty(),
        "{plain} should have no trigger, has {found:?}"
    );
    Ok(())
}

/// The server's max_connections, and how many more sessions fit beside the ones open now
/// (of every database and user), one relay's and the bench's own, keeping the superuser
/// reserve free.
async fn session_room(pool: &PgPool) -> anyhow::Result<(i64, i64)> {
    let (max, reserved, open): (i64, i64, i64) = sqlx::query_as(
        "SELECT current_setting('max_connections')::bigint, \
                current_setting('superuser_reserved_connections')::bigint, \
                (SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend')",
    )
    .fetch_one(pool)
    .await
    .context("reading max_connections")?;
    Ok((max, max - reserved - open - RELAY_SESSIONS - BENCH_SESSIONS))
}

async fn connect(env: &BenchEnv, producers: u32) -> anyhow::Result<Vec<PgConnection>> {
    let mut connections = Vec::with_capacity(producers as usize);
    for _ in 0..producers {
        connections.push(
            PgConnection::connect(env.db_url.as_str())
                .await
                .context("connecting a producer")?,
        );
    }
    Ok(connections)
}

/// Every commit of one run, as the producers saw them.
struct Commits {
    /// Each commit's latency in microseconds.
    micros: Vec<u64>,
    /// From the common start until the last commit.
    seconds: f64,
}

/// Each connection commits single-row inserts into `table`, one after the other, from a
/// common start until `length` has passed (at least one each). Each connection is one
/// producer task; they come back to `connections` when done.
async fn commit_for(
    connections: &mut Vec<PgConnection>,
    table: &TableName,
    length: Duration,
) -> anyhow::Result<Commits> {
    let sql = workload::producer_insert_sql(table);
    // Every task is spawned and waiting before the clock starts.
    let start = Instant::now() + Duration::from_millis(20);
    let deadline = start + length;
    let mut tasks = Vec::with_capacity(connections.len());
    for mut connection in connections.drain(..) {
        let sql = sql.clone();
        tasks.push(tokio::spawn(async move {
            tokio::time::sleep_until(start.into()).await;
            let mut micros = Vec::new();
            loop {
                let sent = Instant::now();
                // One row, one transaction (autocommit): the commit is acknowledged when
                // execute returns.
                let done = sqlx::query(&sql).execute(&mut connection).await;
                if let Err(e) = done {
                    return Err((connection, e));
                }
                let committed = Instant::now();
                micros.push(committed.duration_since(sent).as_micros() as u64);
                if committed >= deadline {
                    return Ok((connection, micros, committed));
                }
            }
        }));
    }
    let mut micros = Vec::new();
    let mut last = start;
    let mut failed = None;
    for task in tasks {
        match task.await? {
            Ok((connection, mine, ended)) => {
                connections.push(connection);
                micros.extend(mine);
                last = last.max(ended);
            }
            Err((connection, e)) => {
                connections.push(connection);
                failed.get_or_insert(e);
            }
        }
    }
    if let Some(e) = failed {
        return Err(anyhow::Error::new(e).context(format!("a producer's insert into {table}")));
    }
    Ok(Commits {
        micros,
        seconds: last.duration_since(start).as_secs_f64(),
    })
}

/// One timed run into `table` on an empty table, with the CPU each kind of process used;
/// `relay` is the pid of the relay running meanwhile, if any.
async fn timed_run(
    connections: &mut Vec<PgConnection>,
    table: &TableName,
    length: Duration,
    relay: Option<u32>,
) -> anyhow::Result<ProducerRun> {
    let cpu = HostCpu::now();
    let processes = ProcessCpu::now();
    let commits = commit_for(connections, table, length).await?;
    let split = ProcessCpu::now().since(&processes, relay.as_slice());
    Ok(ProducerRun {
        commits: commits.micros.len() as u64,
        seconds: commits.seconds,
        latency: CommitTimes::of(commits.micros),
        cpu_split: split,
        host_cpu_busy: HostCpu::now()
            .zip(cpu)
            .map(|(now, then)| now.busy_since(&then)),
        relay: None,
    })
}

/// The baseline: the same inserts into the plain copy, emptied first.
async fn plain_run(
    env: &BenchEnv,
    connections: &mut Vec<PgConnection>,
    plain: &TableName,
    length: Duration,
) -> anyhow::Result<ProducerRun> {
    workload::truncate(env.pool()?, plain).await?;
    timed_run(connections, plain, length, None).await
}

/// The inserts into the outbox table, emptied first, in `situation`: with the relay
/// stopped, or with a relay started (and warmed up: connected, listening, idle) before the
/// run and stopped once it published every row.
async fn outbox_run(
    env: &BenchEnv,
    plan: &Plan,
    situation: Situation,
    connections: &mut Vec<PgConnection>,
    table: &TableName,
    tag: &str,
    log: &mut LogProblems,
) -> anyhow::Result<ProducerRun> {
    let pool = env.pool()?;
    let length = plan.producer_runs.run;
    workload::truncate(pool, table).await?;
    if !situation.relay_runs() {
        return timed_run(connections, table, length, None).await;
    }
    let config = RelayConfig::new(env, std::slice::from_ref(table))
        .window(plan.batch_size, plan.max_in_flight)
        .notify(situation.notify())
        .write(&env.dir.join(format!("{tag}.toml")))?;
    let mut relay =
        RelayProcess::start(&env.relay_bin, &config, &env.dir.join(format!("{tag}.log")))?;
    scenarios::warm_up(env, &mut relay, table, tag).await?;
    let mut run = timed_run(connections, table, length, Some(relay.pid)).await?;
    let behind = workload::unpublished(pool, table).await?;
    let stopped = Instant::now();
    let caught_up_s = loop {
        if workload::all_published(pool, table).await? {
            break Some(stopped.elapsed().as_secs_f64());
        }
        if stopped.elapsed() >= CATCH_UP_LIMIT {
            break None;
        }
        relay.check_alive()?;
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    let log_path = relay.log_path().to_owned();
    let usage = relay.stop().await?;
    log.read(&log_path);
    run.relay = Some(RelayKeptUp {
        behind,
        caught_up_s,
        usage,
    });
    Ok(run)
}

fn report_run(name: &str, round: u32, rounds: u32, who: &str, run: &ProducerRun) {
    let c = run.cpu_split;
    let relay = run
        .relay
        .map(|k| {
            format!(
                ", relay {} rows behind at the stop, caught up {}",
                k.behind,
                k.caught_up_s
                    .map_or("not within 60 s".to_owned(), |s| format!("in {s:.2} s"))
            )
        })
        .unwrap_or_default();
    eprintln!(
        "  {name} round {round}/{rounds}: {who:<26} {:>7.0} commits/s, commit mean {:.2} ms, p99 {:.2} ms{relay}\n      \
         CPU s: relay {:.2}, bench {:.2}, rabbitmq {:.2}, postgresql {:.2}, other {:.2}",
        run.commits_per_s(),
        run.latency.mean_ms,
        run.latency.p99_ms,
        c.relay_s,
        c.bench_s,
        c.rabbitmq_s,
        c.postgresql_s,
        c.other_s
    );
}
