//! The seven measurement scenarios (the production shapes are in `shapes`). Each prepares its
//! table, runs the relay (a child process) and its baseline in alternating rounds, and returns
//! the raw figures; `report` turns them into medians and ratios.

use std::time::{Duration, Instant};

use anyhow::Context;
use outbox_relay::config::{OnExhausted, PostgresSettings, SecretUrl, TableName};
use outbox_relay::message;
use outbox_relay::store::{Coordination, LockState, RowVersion, Store, TableSql};
use outbox_relay_testkit::proxy::Proxy;
use outbox_relay_testkit::servers;
use sqlx::{Connection, PgConnection};
use tokio::sync::oneshot;

use crate::consumer::Received;
use crate::env::{self, BenchEnv};
use crate::process::{CpuSplit, HostCpu, ProcessCpu, RelayConfig, RelayProcess, Usage};
use crate::report::{
    Comparison, DeleteMode, History, Idle, Latency, PgOnly, PgOnlyRun, Run, Scraped, Tracing,
};
use crate::workload::{self, EVENT_TYPE, ROUTING_KEY};
use crate::{raw, Plan};

/// Backlog drained by the relay versus the same messages published raw with the same window.
pub async fn drain(env: &BenchEnv, plan: &Plan) -> anyhow::Result<Comparison> {
    let table = env::table(env::DRAIN_TABLE);
    compare(
        env,
        plan,
        "drain",
        &table,
        plan.drain_rows,
        plan.ordering_keys,
        plan.max_in_flight,
    )
    .await
}

/// One ordering key: the relay may only have one message in flight; so has the baseline.
pub async fn hot_key(env: &BenchEnv, plan: &Plan) -> anyhow::Result<Comparison> {
    let table = env::table(env::HOT_KEY_TABLE);
    compare(env, plan, "hot-key", &table, plan.hot_key_rows, 1, 1).await
}

async fn compare(
    env: &BenchEnv,
    plan: &Plan,
    name: &str,
    table: &TableName,
    rows: u64,
    keys: u64,
    raw_window: usize,
) -> anyhow::Result<Comparison> {
    let mut result = Comparison {
        rows,
        keys,
        raw_window,
        relay: Vec::new(),
        raw: Vec::new(),
    };
    for round in 1..=plan.rounds {
        let tag = format!("{name}{round}raw");
        prepare_backlog(env, table, &tag, rows, keys).await?;
        let raw = raw_round(env, table, &tag, rows, raw_window).await?;
        progress(name, round, plan.rounds, "raw", &raw);
        result.raw.push(raw);

        let tag = format!("{name}{round}relay");
        prepare_backlog(env, table, &tag, rows, keys).await?;
        let relay = relay_round(env, plan, table, &tag, rows).await?;
        progress(name, round, plan.rounds, "relay", &relay);
        result.relay.push(relay);
    }
    Ok(result)
}

fn busy_since(earlier: Option<HostCpu>) -> Option<f64> {
    Some(HostCpu::now()?.busy_since(&earlier?))
}

/// One timed drain of `rows` events, relay or raw, as the report shows it.
pub(crate) fn timed_run(
    rows: u64,
    started: Instant,
    seconds: f64,
    got: Received,
    usage: Option<Usage>,
    cpu: Option<HostCpu>,
    split: CpuSplit,
) -> Run {
    Run {
        events_per_s: rows as f64 / seconds,
        seconds,
        startup_ms: got
            .first
            .map(|f| f.duration_since(started).as_secs_f64() * 1000.0),
        usage,
        duplicates: got.duplicates,
        host_cpu_busy: busy_since(cpu),
        cpu_split: Some(split),
    }
}

pub(crate) fn progress(name: &str, round: u32, rounds: u32, who: &str, run: &Run) {
    let usage = run
        .usage
        .map(|u| {
            format!(
                ", relay cpu {:.2} s, peak RSS {:.1} MiB",
                u.cpu_s, u.peak_rss_mib
            )
        })
        .unwrap_or_default();
    let busy = run
        .host_cpu_busy
        .map(|b| format!(", machine CPU {:.0}% busy", b * 100.0))
        .unwrap_or_default();
    let split = run
        .cpu_split
        .map(|c| {
            format!(
                "\n      CPU s: relay {:.2}, bench {:.2}, rabbitmq {:.2}, postgresql {:.2}, other {:.2}",
                c.relay_s, c.bench_s, c.rabbitmq_s, c.postgresql_s, c.other_s
            )
        })
        .unwrap_or_default();
    eprintln!(
        "  {name} round {round}/{rounds}: {who:<7} {:>9.0} events/s ({:.2} s{usage}{busy}){split}",
        run.events_per_s, run.seconds
    );
}

/// An empty table with `rows` fresh pending rows, vacuumed and analyzed.
pub(crate) async fn prepare_backlog(
    env: &BenchEnv,
    table: &TableName,
    tag: &str,
    rows: u64,
    keys: u64,
) -> anyhow::Result<()> {
    let pool = env.pool()?;
    workload::truncate(pool, table).await?;
    workload::seed(pool, table, tag, rows, keys, false).await?;
    workload::vacuum_analyze(pool, table).await
}

/// Publishes the table's pending rows from memory with lapin (built by the relay's own
/// message code, so properties and headers are identical), `window` confirms in flight.
/// No limit: the raw baseline sends what it is given.
const UNLIMITED: message::BrokerLimits = message::BrokerLimits {
    max_body: outbox_relay::message::BodyLimit::Configured(usize::MAX),
    frame_max: usize::MAX,
};

pub(crate) async fn raw_round(
    env: &BenchEnv,
    table: &TableName,
    tag: &str,
    rows: u64,
    window: usize,
) -> anyhow::Result<Run> {
    let pending = workload::load_pending(env.pool()?, table).await?;
    let table_name = table.to_string();
    let messages = pending
        .into_iter()
        .map(|mut row| message::build(&mut row, &table_name, &env.exchange, UNLIMITED))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| anyhow::anyhow!("building the raw messages: {e}"))?;
    env.purge_queue().await?;
    let consumer = env.consumer()?;
    let all_received = consumer.expect(tag, rows as usize, false);
    let cpu = HostCpu::now();
    let processes = ProcessCpu::now();
    let started = Instant::now();
    raw::publish_all(
        &env.amqp_url,
        &format!("{} raw", env.exchange),
        &messages,
        window,
    )
    .await?;
    wait_for_consumer(env, None, Some(table), all_received, rows, deadline(rows)).await?;
    let seconds = started.elapsed().as_secs_f64();
    let split = ProcessCpu::now().since(&processes, &[]);
    Ok(timed_run(
        rows,
        started,
        seconds,
        consumer.finish(),
        None,
        cpu,
        split,
    ))
}

/// Starts the relay on the table's backlog and times it from start until every row is
/// received by the consumer and marked published.
async fn relay_round(
    env: &BenchEnv,
    plan: &Plan,
    table: &TableName,
    tag: &str,
    rows: u64,
) -> anyhow::Result<Run> {
    let config = RelayConfig::new(env, std::slice::from_ref(table))
        .window(plan.batch_size, plan.max_in_flight);
    relay_round_with(env, config, table, 0, tag, rows).await
}

/// [`relay_round`] with the relay's config given, until every row is received and none with
/// an id above `floor` (the round's rows are above it) is left unpublished: marked, or deleted.
async fn relay_round_with(
    env: &BenchEnv,
    config: RelayConfig,
    table: &TableName,
    floor: i64,
    tag: &str,
    rows: u64,
) -> anyhow::Result<Run> {
    env.purge_queue().await?;
    let consumer = env.consumer()?;
    let all_received = consumer.expect(tag, rows as usize, false);
    let config = config.write(&env.dir.join(format!("{tag}.toml")))?;
    let cpu = HostCpu::now();
    let processes = ProcessCpu::now();
    let mut relay =
        RelayProcess::start(&env.relay_bin, &config, &env.dir.join(format!("{tag}.log")))?;
    let started = relay.started;
    wait_for_consumer(
        env,
        Some(&mut relay),
        Some(table),
        all_received,
        rows,
        deadline(rows),
    )
    .await?;
    let pool = env.pool()?;
    while !workload::all_published_above(pool, table, floor).await? {
        relay.check_alive()?;
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    let seconds = started.elapsed().as_secs_f64();
    let split = ProcessCpu::now().since(&processes, &[relay.pid]);
    let usage = relay.stop().await?;
    Ok(timed_run(
        rows,
        started,
        seconds,
        consumer.finish(),
        Some(usage),
        cpu,
        split,
    ))
}

/// Generous: a minute plus 5 ms per row.
fn deadline(rows: u64) -> Duration {
    Duration::from_secs(60) + Duration::from_millis(5 * rows)
}

/// Waits until the consumer has every message of the round, watching the relay (if any)
/// and failing clearly on a timeout.
async fn wait_for_consumer(
    env: &BenchEnv,
    mut relay: Option<&mut RelayProcess>,
    table: Option<&TableName>,
    all_received: oneshot::Receiver<Instant>,
    expected: u64,
    timeout: Duration,
) -> anyhow::Result<Instant> {
    let until = tokio::time::Instant::now() + timeout;
    tokio::pin!(all_received);
    loop {
        tokio::select! {
            done = &mut all_received => {
                return done.map_err(|_| anyhow::anyhow!("the consumer stopped"));
            }
            _ = tokio::time::sleep(Duration::from_millis(250)) => {
                if let Some(relay) = relay.as_deref_mut() {
                    relay.check_alive()?;
                }
                if tokio::time::Instant::now() >= until {
                    let received = env.consumer()?.progress();
                    let rows = match table {
                        Some(t) => match workload::pending_count(env.pool()?, t).await {
                            Ok((pending, failed)) => format!("; {t} has {pending} unpublished rows, {failed} failed or parked"),
                            Err(e) => format!("; counting the rows of {t} failed: {e:#}"),
                        },
                        None => String::new(),
                    };
                    anyhow::bail!(
                        "only {received} of {expected} messages arrived within {} s{rows}",
                        timeout.as_secs()
                    );
                }
            }
        }
    }
}

/// Steady offered load from several producer connections; commit-to-consumer latency.
pub async fn latency(env: &BenchEnv, plan: &Plan) -> anyhow::Result<Latency> {
    let table = env::table(env::LATENCY_TABLE);
    let config = RelayConfig::new(env, std::slice::from_ref(&table))
        .window(plan.batch_size, plan.max_in_flight)
        .write(&env.dir.join("latency.toml"))?;
    let mut relay = RelayProcess::start(&env.relay_bin, &config, &env.dir.join("latency.log"))?;
    warm_up(env, &mut relay, &table, "latwarm").await?;

    let total = (plan.rate as u64 * plan.latency.as_secs()) as usize;
    let consumer = env.consumer()?;
    let all_received = consumer.expect("lat", total, true);
    let mut producers = Vec::new();
    let period = Duration::from_secs_f64(1.0 / plan.rate as f64);
    let base = Instant::now() + Duration::from_millis(200);
    for p in 0..plan.producers as usize {
        let mut connection = PgConnection::connect(env.db_url.as_str())
            .await
            .context("connecting a producer")?;
        let sql = format!(
            "INSERT INTO {} (dedup_key, ordering_key, routing_key, event_type, payload) VALUES ($1, $2, $3, $4, $5::jsonb)",
            table.quoted()
        );
        let (step, keys) = (plan.producers as usize, plan.ordering_keys);
        producers.push(tokio::spawn(async move {
            let mut commits = Vec::with_capacity(total / step + 1);
            let mut late = Duration::ZERO;
            for i in (p..total).step_by(step) {
                let due = base + period * i as u32;
                tokio::time::sleep_until(due.into()).await;
                let sent = Instant::now();
                late = late.max(sent.saturating_duration_since(due));
                // One row, one transaction (autocommit): the commit is acknowledged when
                // execute returns.
                sqlx::query(&sql)
                    .bind(format!("lat-{i}"))
                    .bind(workload::ordering_key(i as u64, keys))
                    .bind(ROUTING_KEY)
                    .bind(EVENT_TYPE)
                    .bind(workload::payload(i as u64))
                    .execute(&mut connection)
                    .await?;
                commits.push((i, sent, Instant::now()));
            }
            let _ = connection.close().await;
            Ok::<_, sqlx::Error>((commits, late))
        }));
    }
    let mut commits = Vec::with_capacity(total);
    let mut most_late = Duration::ZERO;
    for producer in producers {
        let (mine, late) = producer.await?.context("a producer's insert failed")?;
        commits.extend(mine);
        most_late = most_late.max(late);
    }
    wait_for_consumer(
        env,
        Some(&mut relay),
        Some(&table),
        all_received,
        total as u64,
        Duration::from_secs(60),
    )
    .await?;
    let got = consumer.finish();
    let usage = relay.stop().await?;

    let times = got.times.unwrap_or_default();
    let mut micros = Vec::with_capacity(total);
    let mut from_insert = Vec::with_capacity(total);
    let mut before_ack = 0;
    for (i, sent, committed) in &commits {
        let Some(Some(received)) = times.get(*i) else {
            continue;
        };
        if received < committed {
            before_ack += 1;
        }
        micros.push(received.saturating_duration_since(*committed).as_micros() as u64);
        from_insert.push(received.saturating_duration_since(*sent).as_micros() as u64);
    }
    micros.sort_unstable();
    from_insert.sort_unstable();
    let first = commits.iter().map(|(_, _, t)| *t).min();
    let last = commits.iter().map(|(_, _, t)| *t).max();
    let span = match (first, last) {
        (Some(f), Some(l)) if l > f => l.duration_since(f).as_secs_f64(),
        _ => 0.0,
    };
    Ok(Latency {
        offered_rate: plan.rate,
        producers: plan.producers,
        seconds: plan.latency.as_secs(),
        events: total as u64,
        committed_rate: if span > 0.0 {
            commits.len().saturating_sub(1) as f64 / span
        } else {
            0.0
        },
        producer_most_late_ms: most_late.as_secs_f64() * 1000.0,
        micros,
        from_insert_micros: from_insert,
        received_before_commit_ack: before_ack,
        duplicates: got.duplicates,
        usage,
    })
}

/// Inserts one row and waits until the consumer has it and the relay marked it: the relay is
/// connected, listening and idle afterwards.
pub(crate) async fn warm_up(
    env: &BenchEnv,
    relay: &mut RelayProcess,
    table: &TableName,
    tag: &str,
) -> anyhow::Result<()> {
    let consumer = env.consumer()?;
    let received = consumer.expect(tag, 1, false);
    let pool = env.pool()?;
    workload::seed(pool, table, tag, 1, 1, false).await?;
    wait_for_consumer(
        env,
        Some(relay),
        Some(table),
        received,
        1,
        Duration::from_secs(60),
    )
    .await?;
    consumer.finish();
    while !workload::all_published(pool, table).await? {
        relay.check_alive()?;
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    Ok(())
}

/// The relay with nothing to do: CPU and the statements it sends, counted by a proxy; then the
/// same while `/metrics` is scraped.
pub async fn idle(env: &BenchEnv, plan: &Plan) -> anyhow::Result<Idle> {
    let table = env::table(env::IDLE_TABLE);
    let (proxy, proxied) = counting_proxy(env).await?;
    let health = free_local_addr()?;
    let config = RelayConfig::new(env, std::slice::from_ref(&table))
        .window(plan.batch_size, plan.max_in_flight)
        .pg_url(&proxied)
        .health(health);
    let poll = config.poll_interval();
    let path = config.write(&env.dir.join("idle.toml"))?;
    let mut relay = RelayProcess::start(&env.relay_bin, &path, &env.dir.join("idle.log"))?;
    warm_up(env, &mut relay, &table, "idlewarm").await?;
    // Let the relay finish the turn after the warm-up batch and settle into waiting.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut idle = count_idle(env, &proxy, &relay, poll, plan.idle).await?;
    idle.scraped = Some(count_scraped(&proxy, &mut relay, health, plan.idle).await?);
    relay.stop().await?;
    proxy.stop();
    Ok(idle)
}

/// An address on loopback nobody listens on now (the relay binds it next).
pub(crate) fn free_local_addr() -> anyhow::Result<std::net::SocketAddr> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(listener.local_addr()?)
}

/// The statements an idle relay sends while `GET /metrics` is scraped a few times in
/// `duration` (every third of it, at least every 10 s, as a Prometheus would every 15 s).
async fn count_scraped(
    proxy: &Proxy,
    relay: &mut RelayProcess,
    health: std::net::SocketAddr,
    duration: Duration,
) -> anyhow::Result<Scraped> {
    let every = (duration / 3).clamp(Duration::from_secs(1), Duration::from_secs(10));
    let count0 = proxy.counted();
    let started = Instant::now();
    let mut scrapes = 0u32;
    while started.elapsed() < duration {
        relay.check_alive()?;
        scrape_metrics(health).await?;
        scrapes += 1;
        let next_scrape = every * scrapes;
        tokio::time::sleep(next_scrape.min(duration).saturating_sub(started.elapsed())).await;
    }
    let seconds = started.elapsed().as_secs_f64();
    Ok(Scraped {
        every_s: every.as_secs_f64(),
        scrapes: scrapes.into(),
        seconds,
        statements_per_s: (proxy.counted() - count0).statements as f64 / seconds,
    })
}

/// `GET /metrics`; fails unless the relay answers 200.
async fn scrape_metrics(addr: std::net::SocketAddr) -> anyhow::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    stream
        .write_all(b"GET /metrics HTTP/1.1\r\nHost: relay\r\nConnection: close\r\n\r\n")
        .await?;
    let mut answer = String::new();
    stream.read_to_string(&mut answer).await?;
    anyhow::ensure!(
        answer.starts_with("HTTP/1.1 200"),
        "GET /metrics answered {:?}",
        answer.lines().next().unwrap_or("")
    );
    Ok(())
}

/// A statement-counting proxy in front of the bench's PostgreSQL, and the bench database's URL
/// through it (without TLS: the proxy reads the protocol).
pub(crate) async fn counting_proxy(env: &BenchEnv) -> anyhow::Result<(Proxy, url::Url)> {
    if env.db_url.host_str().is_none() {
        anyhow::bail!("counting statements needs a TCP host in --pg-url");
    }
    let upstream = servers::socket_addr(&env.db_url, 5432)?;
    let proxy = Proxy::start_counting_postgres("postgres", upstream).await?;
    let proxied = proxy.route_without_tls(&env.db_url)?;
    Ok((proxy, proxied))
}

/// What a relay connected through `proxy` does for `duration`, already idle: the statements
/// it sends, its CPU, the database's transactions. The relay keeps running.
pub(crate) async fn count_idle(
    env: &BenchEnv,
    proxy: &Proxy,
    relay: &RelayProcess,
    poll: Duration,
    duration: Duration,
) -> anyhow::Result<Idle> {
    let (count0, usage0, xacts0) = (
        proxy.counted(),
        relay.usage()?,
        env.database_transactions().await?,
    );
    let started = Instant::now();
    tokio::time::sleep(duration).await;
    let (count1, usage1, xacts1) = (
        proxy.counted(),
        relay.usage()?,
        env.database_transactions().await?,
    );
    let seconds = started.elapsed().as_secs_f64();
    let counted = count1 - count0;
    let statements_per_s = counted.statements as f64 / seconds;
    Ok(Idle {
        seconds,
        cpu_s: usage1.cpu_s - usage0.cpu_s,
        statements: counted.statements,
        statements_per_s,
        statements_per_poll_interval: statements_per_s * poll.as_secs_f64(),
        round_trips_per_s: counted.round_trips as f64 / seconds,
        database_transactions_per_s: (xacts1 - xacts0) as f64 / seconds,
        poll_interval_s: poll.as_secs_f64(),
        usage: usage1,
        scraped: None,
    })
}

/// Drain with already-published history in the table versus drain on an empty table.
pub async fn history(env: &BenchEnv, plan: &Plan) -> anyhow::Result<History> {
    let empty = env::table(env::DRAIN_TABLE);
    let hist = env::table(env::HISTORY_TABLE);
    let pool = env.pool()?;
    // In steps of a million rows, so a long fill says how far it got.
    const STEP: u64 = 1_000_000;
    let mut seed_s = 0.0;
    let mut from = 0;
    while from < plan.history_rows {
        let to = (from + STEP).min(plan.history_rows);
        let took =
            workload::seed_history(pool, &hist, "history", from..to, plan.ordering_keys).await?;
        seed_s += took.as_secs_f64();
        from = to;
        if plan.history_rows > STEP {
            eprintln!(
                "  history: {to} of {} published rows inserted",
                plan.history_rows
            );
        }
    }
    let history_top = workload::max_id(pool, &hist).await?;
    let vacuumed = Instant::now();
    workload::vacuum_analyze(pool, &hist).await?;
    let vacuum_s = vacuumed.elapsed().as_secs_f64();
    let history_bytes = workload::total_bytes(pool, &hist).await?;
    eprintln!(
        "  history: {} published rows inserted in {seed_s:.1} s, vacuumed and analyzed in {vacuum_s:.1} s, {:.2} GiB with indexes",
        plan.history_rows,
        history_bytes as f64 / (1u64 << 30) as f64
    );
    let mut result = History {
        history_rows: plan.history_rows,
        rows: plan.drain_rows,
        seed_s,
        vacuum_s,
        history_bytes,
        empty: Vec::new(),
        history: Vec::new(),
    };
    for round in 1..=plan.rounds {
        let tag = format!("hempty{round}");
        prepare_backlog(env, &empty, &tag, plan.drain_rows, plan.ordering_keys).await?;
        let run = relay_round(env, plan, &empty, &tag, plan.drain_rows).await?;
        progress("history", round, plan.rounds, "empty", &run);
        result.empty.push(run);

        let tag = format!("hbacklog{round}");
        workload::delete_above(pool, &hist, history_top).await?;
        workload::seed(
            pool,
            &hist,
            &tag,
            plan.drain_rows,
            plan.ordering_keys,
            false,
        )
        .await?;
        workload::vacuum_analyze(pool, &hist).await?;
        let config = RelayConfig::new(env, std::slice::from_ref(&hist))
            .window(plan.batch_size, plan.max_in_flight);
        let run = relay_round_with(env, config, &hist, history_top, &tag, plan.drain_rows).await?;
        progress("history", round, plan.rounds, "history", &run);
        result.history.push(run);
    }
    Ok(result)
}

/// The drain with each confirmed row deleted (`on_published = "delete"`) versus the same drain
/// with each marked (`"mark"`), alternating, on fresh backlogs of the same table.
pub async fn delete_mode(env: &BenchEnv, plan: &Plan) -> anyhow::Result<DeleteMode> {
    let table = env::table(env::DRAIN_TABLE);
    let mut result = DeleteMode {
        rows: plan.drain_rows,
        mark: Vec::new(),
        delete: Vec::new(),
    };
    for round in 1..=plan.rounds {
        for mode in ["mark", "delete"] {
            let tag = format!("{mode}{round}");
            prepare_backlog(env, &table, &tag, plan.drain_rows, plan.ordering_keys).await?;
            let config = RelayConfig::new(env, std::slice::from_ref(&table))
                .window(plan.batch_size, plan.max_in_flight)
                .on_published(mode);
            let run = relay_round_with(env, config, &table, 0, &tag, plan.drain_rows).await?;
            progress("delete-mode", round, plan.rounds, mode, &run);
            if mode == "mark" {
                result.mark.push(run);
            } else {
                result.delete.push(run);
            }
        }
    }
    Ok(result)
}

/// The drain with the relay exporting a span per row to an OTLP collector versus the same
/// drain with export off, alternating, on fresh backlogs of the same table.
pub async fn tracing(env: &BenchEnv, plan: &Plan) -> anyhow::Result<Tracing> {
    let table = env::table(env::DRAIN_TABLE);
    let sink = crate::otlp_sink::OtlpSink::start().await?;
    // A collector that is down: a loopback port nothing listens on.
    let down = format!("http://{}", free_local_addr()?);
    let mut result = Tracing {
        rows: plan.drain_rows,
        off: Vec::new(),
        on: Vec::new(),
        down: Vec::new(),
        spans: 0,
    };
    for round in 1..=plan.rounds {
        for export in ["off", "on", "down"] {
            let tag = format!("trace{export}{round}");
            prepare_backlog(env, &table, &tag, plan.drain_rows, plan.ordering_keys).await?;
            let mut config = RelayConfig::new(env, std::slice::from_ref(&table))
                .window(plan.batch_size, plan.max_in_flight);
            match export {
                "on" => config = config.otlp(sink.endpoint()),
                "down" => config = config.otlp(down.clone()),
                _ => {}
            }
            let run = relay_round_with(env, config, &table, 0, &tag, plan.drain_rows).await?;
            progress("tracing", round, plan.rounds, export, &run);
            match export {
                "on" => result.on.push(run),
                "down" => result.down.push(run),
                _ => result.off.push(run),
            }
        }
    }
    // The relay flushes its queue at exit: what the collector has now is all it got.
    result.spans = sink.spans();
    Ok(result)
}

/// The relay's own fetch and mark statements on a backlog, through the library, no broker.
pub async fn pg_only(env: &BenchEnv, plan: &Plan) -> anyhow::Result<PgOnly> {
    let table = env::table(env::DRAIN_TABLE);
    let settings = PostgresSettings {
        url: SecretUrl::new(env.db_url.as_str()),
        url_file: None,
        max_connections: 4,
        connect_timeout: Duration::from_secs(10),
        statement_timeout: Duration::from_secs(30),
    };
    let mut result = PgOnly {
        rows: plan.drain_rows,
        batch_size: plan.batch_size,
        runs: Vec::new(),
    };
    for round in 1..=plan.rounds {
        prepare_backlog(
            env,
            &table,
            &format!("pgonly{round}"),
            plan.drain_rows,
            plan.ordering_keys,
        )
        .await?;
        let store = Store::connect(&settings).await?;
        let sql = TableSql::new(&table, OnExhausted::HoldKey);
        let coordination = Coordination::start(
            &settings,
            store.servers(),
            std::slice::from_ref(&sql),
            false,
            Duration::from_secs(1),
            Duration::from_secs(1),
            Default::default(),
        )?;
        let mut lock = coordination.lock(0);
        let guard = loop {
            match lock.state() {
                LockState::Held(guard) => break guard,
                LockState::Connecting => lock.changed().await,
                LockState::Standby => {
                    anyhow::bail!("pg-only: the table lock of {table} is held by someone else")
                }
                LockState::Down(e) => anyhow::bail!("pg-only: {e}"),
            }
        };
        // The table's only writer: one member holding every partition, as a lone relay does.
        let leases = outbox_relay::store::leases::Leases::new(
            store.pool().clone(),
            table.clone(),
            Duration::from_secs(600),
        );
        let fence = leases.fence_all("bench pg-only", 256).await?;
        let (mut fetch, mut mark, mut done) = (Duration::ZERO, Duration::ZERO, 0u64);
        let started = Instant::now();
        loop {
            let t = Instant::now();
            let rows = store
                .fetch_due(&sql, &guard, &fence, plan.batch_size, &[])
                .await?;
            fetch += t.elapsed();
            if rows.is_empty() {
                break;
            }
            let sent: Vec<RowVersion> = rows.iter().map(RowVersion::of).collect();
            let t = Instant::now();
            store.mark_published(&sql, &sent, &fence).await?;
            mark += t.elapsed();
            done += sent.len() as u64;
        }
        let seconds = started.elapsed().as_secs_f64();
        // The scenarios after this one run relays on the same table: they must find every
        // partition free, not held by this member for the rest of its lease.
        leases.leave_fence(&fence).await?;
        coordination.close().await;
        store.close().await;
        if done != plan.drain_rows {
            anyhow::bail!("pg-only: fetched {done} rows of {}", plan.drain_rows);
        }
        let run = PgOnlyRun {
            rows_per_s: done as f64 / seconds,
            seconds,
            fetch_s: fetch.as_secs_f64(),
            mark_s: mark.as_secs_f64(),
        };
        eprintln!(
            "  pg-only round {round}/{}: {:>9.0} rows/s (fetch {:.2} s, mark {:.2} s)",
            plan.rounds, run.rows_per_s, run.fetch_s, run.mark_s
        );
        result.runs.push(run);
    }
    Ok(result)
}
