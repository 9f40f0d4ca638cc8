//! The production shapes of the issue "Relay core v2": many outbox tables in one relay process,
//! and one ordering key held back at the head of a long queue. Each times the real relay
//! against the same drain without the shape, in alternating rounds of the same run. A drain
//! that does not finish within its bound is reported as not delivered (how far it got): it is
//! never waited for without end and never ends the bench.

use std::path::Path;
use std::time::{Duration, Instant};

use outbox_relay::config::TableName;
use sqlx::postgres::PgPool;
use tokio::sync::oneshot;

use crate::env::{self, BenchEnv};
use crate::process::{self, HostCpu, LogProblems, ProcessCpu, RelayConfig, RelayProcess};
use crate::report::{Drained, HeldKey, ManyTables, Shortfall};
use crate::resources::{self, SessionSampler};
use crate::scenarios::{self, progress, timed_run};
use crate::workload::{self, ROUTING_KEY};
use crate::Plan;

/// The pool size the many-tables relay runs with: the relay's default.
const MAX_CONNECTIONS: u32 = 4;

/// How long the one row per table of the many-tables warm-up may take.
const WARM_UP_LIMIT: Duration = Duration::from_secs(30);

/// The bound of a drain with the shape: ten times the same drain without it, within 30 s to
/// 120 s (long enough for a slow machine, short enough that a relay delivering nothing shows
/// as such in minutes).
fn bound_after(baseline: &Drained) -> Duration {
    let seconds = baseline.run().map_or(120.0, |r| r.seconds * 10.0);
    Duration::from_secs_f64(seconds.clamp(30.0, 120.0))
}

/// The bound of a drain without the shape: generous, as the other scenarios' deadline.
fn baseline_bound(rows: u64) -> Duration {
    Duration::from_secs(120) + Duration::from_millis(rows)
}

/// Many tables in one relay: its sessions and connections, its statements when idle, and the
/// drain of `--events` rows spread evenly over the tables against the same drain on one table.
pub async fn many_tables(env: &BenchEnv, plan: &Plan) -> anyhow::Result<ManyTables> {
    let tables = (0..plan.tables)
        .map(|i| TableName::parse(&format!("{}.t{i}", env::MANY_TABLES_SCHEMA)))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| anyhow::anyhow!("a many-tables table name: {e}"))?;
    let pool = env.pool()?;
    let started = Instant::now();
    let config = RelayConfig::new(env, &tables).write(&env.dir.join("many-migrate.toml"))?;
    process::migrate(&env.relay_bin, &config, &env.dir.join("many-migrate.log")).await?;
    let migrate_s = started.elapsed().as_secs_f64();
    eprintln!(
        "  many-tables: {} tables migrated in {migrate_s:.1} s",
        tables.len()
    );
    let relay_name = process::relay_connection_name(env);
    let mut log = LogProblems::default();

    // Idle, through the counting proxy, once one row of every table went out (every table's
    // lock taken and listening).
    let (proxy, proxied) = scenarios::counting_proxy(env).await?;
    let config = RelayConfig::new(env, &tables)
        .window(plan.batch_size, plan.max_in_flight)
        .pg_url(&proxied);
    let poll = config.poll_interval();
    let path = config.write(&env.dir.join("many-idle.toml"))?;
    let mut relay = RelayProcess::start(&env.relay_bin, &path, &env.dir.join("many-idle.log"))?;
    let sessions = SessionSampler::start(pool, &env.id);
    let warm_up = warm_up_each(env, &mut relay, &tables, "mtwarm").await?;
    if let Some(short) = &warm_up {
        eprintln!("  many-tables warm-up (1 row per table): {short}");
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut amqp = resources::amqp_connections(&relay_name).await.ok();
    let idle = scenarios::count_idle(env, &proxy, &relay, poll, plan.idle).await?;
    eprintln!(
        "  many-tables idle {:.0} s: {:.2} statements/s, relay CPU {:.3} s",
        idle.seconds, idle.statements_per_s, idle.cpu_s
    );
    let mut sessions_max = sessions.stop();
    log.read(relay.log_path());
    let stopped = relay.stop().await;
    proxy.stop();
    match stopped {
        Ok(_) => {}
        // A relay that could not even warm up may not stop cleanly either: that is a figure.
        Err(e) if warm_up.is_some() => eprintln!("  many-tables idle relay: {e:#}"),
        Err(e) => return Err(e),
    }

    let one = env::table(env::DRAIN_TABLE);
    let (rows, keys) = (plan.drain_rows, plan.ordering_keys);
    let mut result = ManyTables {
        tables: plan.tables,
        rows,
        max_connections: MAX_CONNECTIONS,
        migrate_s,
        warm_up,
        idle,
        sessions_max: 0,
        one_table_sessions_max: 0,
        amqp_connections_max: None,
        one_table: Vec::new(),
        many: Vec::new(),
        log: LogProblems::default(),
    };
    for round in 1..=plan.rounds {
        let tag = format!("mt{round}one");
        scenarios::prepare_backlog(env, &one, &tag, rows, keys).await?;
        let config = RelayConfig::new(env, std::slice::from_ref(&one))
            .window(plan.batch_size, plan.max_in_flight)
            .write(&env.dir.join(format!("{tag}.toml")))?;
        let unmarked = workload::any_unpublished_sql(std::slice::from_ref(&one));
        let out = drain_within(env, &config, &tag, rows, baseline_bound(rows), &unmarked).await?;
        report_round("many-tables", round, plan.rounds, "1 table", &out.drained);
        result.one_table_sessions_max = result.one_table_sessions_max.max(out.sessions_max);
        log.read(&out.log);
        let bound = bound_after(&out.drained);
        result.one_table.push(out.drained);

        let tag = format!("mt{round}many");
        workload::truncate_all(pool, &tables).await?;
        let n = tables.len() as u64;
        for (i, table) in (0u64..).zip(&tables) {
            let range = rows * i / n..rows * (i + 1) / n;
            workload::seed_range(pool, table, &tag, range, keys, false).await?;
        }
        workload::vacuum_analyze_all(pool, &tables).await?;
        let config = RelayConfig::new(env, &tables)
            .window(plan.batch_size, plan.max_in_flight)
            .write(&env.dir.join(format!("{tag}.toml")))?;
        let unmarked = workload::any_unpublished_sql(&tables);
        let mut out = drain_within(env, &config, &tag, rows, bound, &unmarked).await?;
        let who = format!("{} tables", tables.len());
        report_round("many-tables", round, plan.rounds, &who, &out.drained);
        sessions_max = sessions_max.max(out.sessions_max);
        amqp = amqp.max(out.amqp_connections.take());
        log.read(&out.log);
        result.many.push(out.drained);
    }
    result.sessions_max = sessions_max;
    result.amqp_connections_max = amqp;
    result.log = log;
    Ok(result)
}

/// Inserts one row into each table and waits (bounded) until every one arrived and is
/// marked; `Some` says how far it got.
async fn warm_up_each(
    env: &BenchEnv,
    relay: &mut RelayProcess,
    tables: &[TableName],
    tag: &str,
) -> anyhow::Result<Option<Shortfall>> {
    let pool = env.pool()?;
    let consumer = env.consumer()?;
    let all_received = consumer.expect(tag, tables.len(), false);
    let started = Instant::now();
    for (i, table) in (0u64..).zip(tables) {
        workload::seed_range(pool, table, tag, i..i + 1, 1, false).await?;
    }
    let unmarked = workload::any_unpublished_sql(tables);
    let until = tokio::time::Instant::now() + WARM_UP_LIMIT;
    let ended =
        wait_delivered(|| relay.check_alive(), all_received, pool, &unmarked, until).await?;
    let received = consumer.progress() as u64;
    consumer.finish();
    Ok(ended.err().map(|note| Shortfall {
        received,
        expected: tables.len() as u64,
        seconds: started.elapsed().as_secs_f64(),
        note,
    }))
}

/// The head row of the held key, and what holds it back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Head {
    /// Unpublishable (a routing key of 300 bytes, more than AMQP's 255) with max_attempts 1:
    /// parked on its first attempt; under hold_key its key waits.
    Parked,
    /// Refused (its exchange does not exist) and waiting for a retry delay of an hour.
    Retrying,
}

impl Head {
    fn name(self) -> &'static str {
        match self {
            Head::Parked => "parked",
            Head::Retrying => "retrying",
        }
    }

    /// The relay's settings for this head (also used for the drain without a held key).
    fn config(self, env: &BenchEnv, plan: &Plan, table: &TableName) -> RelayConfig {
        let config = RelayConfig::new(env, std::slice::from_ref(table))
            .window(plan.batch_size, plan.max_in_flight);
        match self {
            Head::Parked => config.retry("max_attempts", "1"),
            Head::Retrying => config
                .retry("initial_delay", "\"1h\"")
                .retry("max_delay", "\"1h\""),
        }
    }
}

const HELD_KEY: &str = "held-key";

/// A drain of `--events` rows of 1,000 keys beside one key held back at the head of
/// 10 x `--events` queued rows (parked, then waiting for a retry), against the same drain
/// without the held key.
pub async fn held_key(env: &BenchEnv, plan: &Plan) -> anyhow::Result<HeldKey> {
    let table = env::table(env::HELD_KEY_TABLE);
    let pool = env.pool()?;
    // The relay's schema as `migrate` of the binary under test left it: before the redesign
    // there are no held keys (and no `held` column).
    let held_schema: bool =
        sqlx::query_scalar("SELECT to_regclass('outbox_relay.held_keys') IS NOT NULL")
            .fetch_one(pool)
            .await?;
    let (rows, keys) = (plan.drain_rows, plan.ordering_keys);
    let mut result = HeldKey {
        queued_rows: plan.held_queue_rows,
        rows,
        keys,
        held_schema,
        queued_held: Vec::new(),
        queue_insert_s: Vec::new(),
        without: Vec::new(),
        parked: Vec::new(),
        retrying: Vec::new(),
        log: LogProblems::default(),
    };
    for round in 1..=plan.rounds {
        let tag = format!("hk{round}none");
        reset_held_table(pool, &table, held_schema).await?;
        workload::seed(pool, &table, &tag, rows, keys, false).await?;
        workload::vacuum_analyze(pool, &table).await?;
        let config = Head::Parked
            .config(env, plan, &table)
            .write(&env.dir.join(format!("{tag}.toml")))?;
        let unmarked = unmarked_after_sql(&table, 0, held_schema);
        let out = drain_within(env, &config, &tag, rows, baseline_bound(rows), &unmarked).await?;
        report_round("held-key", round, plan.rounds, "no held", &out.drained);
        result.log.read(&out.log);
        let bound = bound_after(&out.drained);
        result.without.push(out.drained);

        for head in [Head::Parked, Head::Retrying] {
            let tag = format!("hk{round}{}", head.name());
            reset_held_table(pool, &table, held_schema).await?;
            let config = head
                .config(env, plan, &table)
                .write(&env.dir.join(format!("{tag}.toml")))?;
            hold_back_head(env, &table, head, held_schema, &config, &tag).await?;
            // The queue goes in after the relay recorded the head's failure, as a producer's
            // rows would: with held keys they start out held.
            let started = Instant::now();
            let last_queued =
                workload::queue_on_key(pool, &table, "hkqueue", HELD_KEY, plan.held_queue_rows)
                    .await?;
            let inserted = started.elapsed().as_secs_f64();
            result.queue_insert_s.push(inserted);
            let held = if held_schema {
                let n: i64 = sqlx::query_scalar(&format!(
                    "SELECT count(*) FROM {} WHERE published_at IS NULL AND held",
                    table.quoted()
                ))
                .fetch_one(pool)
                .await?;
                result.queued_held.push(n);
                format!(", {n} of them held")
            } else {
                String::new()
            };
            eprintln!(
                "  held-key round {round}/{}: {} rows queued behind the {} head in {inserted:.1} s{held}",
                plan.rounds,
                plan.held_queue_rows,
                head.name()
            );
            workload::seed(pool, &table, &tag, rows, keys, false).await?;
            workload::vacuum_analyze(pool, &table).await?;
            let unmarked = unmarked_after_sql(&table, last_queued, held_schema);
            let out = drain_within(env, &config, &tag, rows, bound, &unmarked).await?;
            report_round("held-key", round, plan.rounds, head.name(), &out.drained);
            result.log.read(&out.log);
            match head {
                Head::Parked => result.parked.push(out.drained),
                Head::Retrying => result.retrying.push(out.drained),
            }
        }
    }
    Ok(result)
}

/// An empty held-key table and no held key left over from the previous round (the table keeps
/// its oid through TRUNCATE, and held keys are per table oid).
async fn reset_held_table(
    pool: &PgPool,
    table: &TableName,
    held_schema: bool,
) -> anyhow::Result<()> {
    workload::truncate(pool, table).await?;
    if held_schema {
        sqlx::query(
            "DELETE FROM outbox_relay.held_keys WHERE table_oid = $1::text::regclass::oid::bigint",
        )
        .bind(table.quoted())
        .execute(pool)
        .await?;
    }
    Ok(())
}

/// Inserts the head row of the held key and runs the relay until it recorded the head's
/// failure (parked, or refused and waiting) and, with held keys, holds the key; then stops it.
async fn hold_back_head(
    env: &BenchEnv,
    table: &TableName,
    head: Head,
    held_schema: bool,
    config: &Path,
    tag: &str,
) -> anyhow::Result<()> {
    let pool = env.pool()?;
    let missing = format!("{}-missing", env.exchange);
    let (routing_key, exchange) = match head {
        Head::Parked => ("r".repeat(300), None),
        Head::Retrying => (ROUTING_KEY.to_owned(), Some(missing.as_str())),
    };
    let id =
        workload::insert_head(pool, table, "hkhead-0", HELD_KEY, &routing_key, exchange).await?;
    let failed = match head {
        Head::Parked => "o.parked_at IS NOT NULL",
        Head::Retrying => "o.attempts > 0 AND o.next_attempt_at > now() + interval '30 minutes'",
    };
    let holds = if held_schema {
        " AND EXISTS (SELECT 1 FROM outbox_relay.held_keys h \
            WHERE h.table_oid = o.tableoid::bigint AND h.ordering_key = o.ordering_key AND h.holder = o.id)"
    } else {
        ""
    };
    let sql = format!(
        "SELECT EXISTS (SELECT 1 FROM {} o WHERE o.id = {id} AND {failed}{holds})",
        table.quoted()
    );
    let log = env.dir.join(format!("{tag}-head.log"));
    let mut relay = RelayProcess::start(&env.relay_bin, config, &log)?;
    let until = Instant::now() + Duration::from_secs(60);
    while !workload::ask(pool, &sql).await? {
        relay.check_alive()?;
        if Instant::now() >= until {
            let _ = relay.stop().await;
            anyhow::bail!(
                "held-key: the {} head row was not held back within 60 s (see {})",
                head.name(),
                log.display()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    relay.stop().await?;
    Ok(())
}

/// True while a row of the round (ids above `after`: the round's rows come after the queue)
/// is unmarked. Reads the due index (with held keys, its predicate includes `NOT held`).
fn unmarked_after_sql(table: &TableName, after: i64, held_schema: bool) -> String {
    format!(
        "SELECT EXISTS (SELECT 1 FROM {} WHERE published_at IS NULL AND parked_at IS NULL{} AND id > {after})",
        table.quoted(),
        if held_schema { " AND NOT held" } else { "" }
    )
}

pub(crate) fn report_round(name: &str, round: u32, rounds: u32, who: &str, drained: &Drained) {
    match drained {
        Drained::Done(run) => progress(name, round, rounds, who, run),
        Drained::NotDelivered(short) => {
            eprintln!("  {name} round {round}/{rounds}: {who:<7} {short}")
        }
    }
}

/// A bounded relay drain, and what the relay held on the servers meanwhile.
struct Outcome {
    drained: Drained,
    /// Most PostgreSQL sessions of the relay, sampled during the drain.
    sessions_max: i64,
    /// The relay's AMQP connections at the end of the drain (read after the clock stopped).
    amqp_connections: Option<usize>,
    log: std::path::PathBuf,
}

/// Starts the relay with `config` on a prepared backlog and times it until the consumer has
/// every message of `tag` and `unmarked` (a statement of one boolean) says every row of the
/// round is marked published, giving up after `limit`.
async fn drain_within(
    env: &BenchEnv,
    config: &Path,
    tag: &str,
    rows: u64,
    limit: Duration,
    unmarked: &str,
) -> anyhow::Result<Outcome> {
    env.purge_queue().await?;
    let pool = env.pool()?;
    let consumer = env.consumer()?;
    let all_received = consumer.expect(tag, rows as usize, false);
    let log = env.dir.join(format!("{tag}.log"));
    let cpu = HostCpu::now();
    let processes = ProcessCpu::now();
    let mut relay = RelayProcess::start(&env.relay_bin, config, &log)?;
    let sessions = SessionSampler::start(pool, &env.id);
    let started = relay.started;
    let until = tokio::time::Instant::now() + limit;
    let ended = wait_delivered(|| relay.check_alive(), all_received, pool, unmarked, until).await;
    let seconds = started.elapsed().as_secs_f64();
    let split = ProcessCpu::now().since(&processes, &[relay.pid]);
    let sessions_max = sessions.stop();
    let amqp_connections = resources::amqp_connections(&process::relay_connection_name(env))
        .await
        .ok();
    let drained = match ended? {
        Ok(()) => {
            let usage = relay.stop().await?;
            Drained::Done(timed_run(
                rows,
                started,
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
            let stopped = relay.stop().await.err();
            // A relay that exited already says so in `note`; one that would not stop is news.
            let note = note.or_else(|| stopped.map(|e| format!("{e:#}")));
            Drained::NotDelivered(Shortfall {
                received,
                expected: rows,
                seconds,
                note,
            })
        }
    };
    Ok(Outcome {
        drained,
        sessions_max,
        amqp_connections,
        log,
    })
}

/// Waits until the consumer has the round (`all_received`) and `unmarked` turns false.
/// `Ok(Err(None))`: `until` passed first; `Ok(Err(Some(why)))`: a relay exited (`alive`, the
/// check of the relays, failed).
pub(crate) async fn wait_delivered(
    mut alive: impl FnMut() -> anyhow::Result<()>,
    all_received: oneshot::Receiver<Instant>,
    pool: &PgPool,
    unmarked: &str,
    until: tokio::time::Instant,
) -> anyhow::Result<Result<(), Option<String>>> {
    tokio::pin!(all_received);
    let mut received = false;
    loop {
        if received {
            if !workload::ask(pool, unmarked).await? {
                return Ok(Ok(()));
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        } else {
            tokio::select! {
                done = &mut all_received => {
                    done.map_err(|_| anyhow::anyhow!("the consumer stopped"))?;
                    received = true;
                    continue;
                }
                _ = tokio::time::sleep(Duration::from_millis(250)) => {}
            }
        }
        if let Err(e) = alive() {
            return Ok(Err(Some(format!("{e:#}"))));
        }
        if tokio::time::Instant::now() >= until {
            return Ok(Err(None));
        }
    }
}
