//! `outbox-relay replay`: publishes a range of a table's published rows again, with the
//! properties and `message_id` of their first publish plus the header `x-outbox-replay`, at a
//! bounded rate, on an AMQP connection of its own, each confirmed by the broker. Reads through
//! the store (`store/replay.rs`), builds through `message`, publishes through `publisher`; has
//! no SQL and no AMQP of its own. It changes no row and takes no lock: the running relay goes
//! on as if no replay happened.
//!
//! Invariant: rows go out on one channel in increasing id order, so per key in id order; a row
//! counts as replayed only once the broker confirmed it; confirms are settled oldest first, so
//! every row before the oldest unconfirmed one is confirmed, and the first refusal stops the
//! replay there.

use std::collections::VecDeque;
use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::time::{Duration, Instant};

use anyhow::Context;
use chrono::{DateTime, NaiveDate, NaiveDateTime, NaiveTime, SecondsFormat, Utc};
use clap::{ArgGroup, Args};
use futures::FutureExt;

use crate::config::{
    exchange_name_problem, OnPublished, OutboxSettings, RabbitSettings, Settings, TableName,
};
use crate::message::{self, OutboxRow};
use crate::publisher::{Broker, PendingConfirm, PublishError, Publisher};
use crate::shutdown::Shutdown;
use crate::store::{CountChunk, ReplayRange, Retained, Store};

/// Ids one counting statement scans.
const COUNT_CHUNK: i64 = 10_000;
/// How often a long replay prints its progress.
const PROGRESS_EVERY: Duration = Duration::from_secs(2);

/// `outbox-relay replay`'s arguments. A range needs a start (`--from-id` or `--since`); id
/// and time bounds may be combined, and narrow each other.
#[derive(Debug, Args)]
#[command(
    group(ArgGroup::new("start").required(true).multiple(true).args(["from_id", "since"])),
    after_help = REPLAY_EXAMPLES
)]
pub struct ReplayArgs {
    /// The outbox table (`schema.table`), one of the config's [[outbox]] tables.
    #[arg(long, value_parser = TableName::parse)]
    pub table: TableName,
    /// Replay rows from this id on (inclusive).
    #[arg(long, value_name = "ID")]
    pub from_id: Option<i64>,
    /// Replay rows up to this id (inclusive); default: the newest row when the replay starts.
    #[arg(long, value_name = "ID")]
    pub to_id: Option<i64>,
    /// Replay rows created at or after this time: a date (2026-12-07, its midnight), a date
    /// and time (2026-12-07T10:00:00, 2026-12-07 10:00), both in UTC, or RFC 3339 with its
    /// zone (2026-12-07T10:00:00+01:00).
    #[arg(long, value_name = "TIME", value_parser = parse_time)]
    pub since: Option<DateTime<Utc>>,
    /// Replay rows created before this time (the forms of --since; a bare date or time is UTC).
    #[arg(long, value_name = "TIME", value_parser = parse_time)]
    pub until: Option<DateTime<Utc>>,
    /// Replay only the rows of this ordering key.
    #[arg(long, value_name = "KEY")]
    pub key: Option<String>,
    /// Publish to this exchange instead of the row's or the table's ("" is the default exchange).
    #[arg(long, value_name = "NAME", value_parser = parse_exchange)]
    pub exchange: Option<String>,
    /// Publish with this routing key instead of the row's.
    #[arg(long, value_name = "KEY", value_parser = parse_routing_key)]
    pub routing_key: Option<String>,
    /// Publish at most this many messages per second.
    #[arg(long, value_name = "N", default_value_t = 1000,
          value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub rate: u32,
    /// Only count the rows the replay would publish; does not connect to RabbitMQ.
    #[arg(long)]
    pub dry_run: bool,
}

/// A time as an operator types it: RFC 3339 with its zone (`2026-12-07T10:00:00+01:00`,
/// `...Z`), or without a zone, read as UTC: a date (`2026-12-07`, its midnight) or a date and
/// time (`2026-12-07T10:00:00`, `2026-12-07 10:00`, seconds and fractions optional).
fn parse_time(s: &str) -> Result<DateTime<Utc>, String> {
    let s = s.trim();
    if let Ok(t) = DateTime::parse_from_rfc3339(s) {
        return Ok(t.with_timezone(&Utc));
    }
    for format in ["%Y-%m-%dT%H:%M%#z", "%Y-%m-%d %H:%M%#z"] {
        if let Ok(t) = DateTime::parse_from_str(s, format) {
            return Ok(t.with_timezone(&Utc));
        }
    }
    for format in [
        "%Y-%m-%dT%H:%M:%S%.f",
        "%Y-%m-%d %H:%M:%S%.f",
        "%Y-%m-%dT%H:%M",
        "%Y-%m-%d %H:%M",
    ] {
        if let Ok(t) = NaiveDateTime::parse_from_str(s, format) {
            return Ok(t.and_utc());
        }
    }
    if let Ok(day) = NaiveDate::parse_from_str(s, "%Y-%m-%d") {
        return Ok(day.and_time(NaiveTime::MIN).and_utc());
    }
    Err(format!(
        "{s:?} is not a time: expected a date (2026-12-07), a date and time without a zone \
         (2026-12-07T10:00:00, 2026-12-07 10:00; both read as UTC), or RFC 3339 with its zone \
         (2026-12-07T10:00:00+01:00, 2026-12-07T09:00:00Z)"
    ))
}

const REPLAY_EXAMPLES: &str = "\
Only rows published by the replay's start are sent; rows not yet published and discarded rows
are skipped and counted. A range is refused (exit 1) only when the relay deleted rows it reaches:
on_published = \"delete\", or the retention sweeper's deletions before the oldest published row
still in the table. A date or time without a zone is UTC.

Examples:
  outbox-relay replay --table public.outbox --from-id 1 --dry-run
  outbox-relay replay --table public.outbox --since 2026-12-07 --until \"2026-12-07 12:00\"
  outbox-relay replay --table public.outbox --since 2026-12-07T10:00:00+01:00 --key order-991 \\
      --exchange replays --rate 200";

fn parse_exchange(s: &str) -> Result<String, String> {
    match exchange_name_problem(s) {
        Some(problem) => Err(problem),
        None => Ok(s.to_owned()),
    }
}

fn parse_routing_key(s: &str) -> Result<String, String> {
    if s.len() > 255 {
        return Err(format!("{} bytes; AMQP allows at most 255", s.len()));
    }
    Ok(s.to_owned())
}

/// Why a replay does not start, where the exit code depends on it.
#[derive(Debug, thiserror::Error)]
pub enum ReplayError {
    /// Arguments that contradict each other: a usage error like clap's own (exit 2).
    #[error("{0}")]
    Usage(String),
    /// `--table` names a table the config does not relay (exit 78, EX_CONFIG).
    #[error("--table {table}: not an [[outbox]] table in {} (configured: {configured})", file.display())]
    NotConfigured {
        table: TableName,
        file: std::path::PathBuf,
        configured: String,
    },
}

impl ReplayError {
    pub fn exit_code(&self) -> i32 {
        match self {
            ReplayError::Usage(_) => 2,
            ReplayError::NotConfigured { .. } => crate::config::EX_CONFIG,
        }
    }
}

/// Runs `outbox-relay replay` and prints its outcome: the count with `--dry-run`, else what
/// was replayed. Exit 1 (an error) when the range reaches rows the relay deleted, when the
/// broker refuses a message, or when rows vanished while the replay ran.
pub async fn main(
    settings: &Settings,
    config_file: &Path,
    args: &ReplayArgs,
) -> anyhow::Result<()> {
    let table = settings
        .outbox
        .iter()
        .find(|t| t.table == args.table)
        .ok_or_else(|| ReplayError::NotConfigured {
            table: args.table.clone(),
            file: config_file.to_owned(),
            configured: settings
                .outbox
                .iter()
                .map(|t| t.table.to_string())
                .collect::<Vec<_>>()
                .join(", "),
        })?;
    check_bounds(args)?;
    if table.mapping.is_some() {
        anyhow::bail!(
            "{}: replay does not serve adopted tables (mapped columns) yet",
            table.table
        );
    }
    let store = Store::connect(&settings.postgres).await?;
    let outcome = replay(&store, settings, table, args).await;
    store.close().await;
    outcome
}

fn check_bounds(args: &ReplayArgs) -> Result<(), ReplayError> {
    if let (Some(from), Some(to)) = (args.from_id, args.to_id) {
        if to < from {
            return Err(ReplayError::Usage(format!(
                "--to-id {to} is before --from-id {from}"
            )));
        }
    }
    if let (Some(since), Some(until)) = (args.since, args.until) {
        if until <= since {
            return Err(ReplayError::Usage(format!(
                "--until {} is not after --since {}",
                rfc3339(until),
                rfc3339(since)
            )));
        }
    }
    Ok(())
}

async fn replay(
    store: &Store,
    settings: &Settings,
    table: &OutboxSettings,
    args: &ReplayArgs,
) -> anyhow::Result<()> {
    let name = &table.table;
    let retained = store.replay_start(name).await?;
    let range = plan(table, args, &retained)?;
    let total = count(store, &range).await?;
    let skipped = skipped_rows(total.unpublished, total.discarded);
    if args.dry_run {
        println!(
            "{name}: {} row(s) to replay{}{skipped} (dry run: nothing published)",
            total.rows,
            id_span(&total)
        );
        return Ok(());
    }
    if total.rows == 0 {
        println!("{name}: replayed 0 rows{skipped}");
        return Ok(());
    }
    let started_at = rfc3339(retained.started_at);
    eprintln!(
        "replay {name}: {} row(s){}, published by {started_at}, at most {}/s",
        total.rows,
        id_span(&total),
        args.rate
    );
    // Its own connection, named apart from the relay's: the relay's channels and their order
    // are never touched.
    let rabbit = RabbitSettings {
        connection_name: format!("{} replay", settings.rabbitmq.connection_name),
        ..settings.rabbitmq.clone()
    };
    let broker = Broker::new(&rabbit);
    let mut publisher = broker
        .publisher(&[])
        .await
        .map_err(|e| anyhow::anyhow!("{e}"))
        .context("opening the replay's channel")?;
    let shutdown = stop_on_signals(name).context("installing signal handlers")?;
    let sender = Sender {
        store,
        table,
        range: &range,
        replay_header: started_at,
        exchange: args.exchange.as_deref(),
        routing_key: args.routing_key.as_deref(),
        max_message_bytes: settings.rabbitmq.max_message_bytes,
        batch: i64::from(settings.relay.batch_size),
        window: settings.relay.max_in_flight.min(args.rate as usize).max(1),
        rate: args.rate,
        shape: message::MessageShape::for_table(table, &settings.postgres),
    };
    let sent = sender.send_all(&mut publisher, &shutdown, &total).await;
    publisher.close().await;
    broker.close().await;
    let sent = sent?;
    if sent.replayed < total.rows {
        anyhow::bail!(
            "{name}: replayed {} of the {} row(s) counted at the start: the others were deleted \
             while the replay ran (retention?) and are no longer retained",
            sent.replayed,
            total.rows
        );
    }
    let skipped = skipped_rows(sent.unpublished, sent.discarded);
    println!(
        "{name}: replayed {} row(s){}{skipped}",
        sent.replayed,
        id_span(&CountChunk {
            first_id: sent.first_id,
            last_id: sent.last_id,
            ..CountChunk::default()
        })
    );
    Ok(())
}

/// Stops the replay at the first SIGINT or SIGTERM, once the outstanding confirms are in; a
/// second signal stops waiting for them. Logs each SIGHUP and otherwise ignores it, as `run`
/// does: its default action would end the replay at once, without the outstanding confirms or
/// the line saying where to resume. (Installed once publishing starts: before, the default
/// action ends a replay that has sent nothing.)
fn stop_on_signals(table: &TableName) -> std::io::Result<Shutdown> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    tokio::spawn({
        let table = table.clone();
        async move {
            while hup.recv().await.is_some() {
                tracing::warn!(%table, "SIGHUP ignored: the replay goes on; SIGINT or SIGTERM stops it");
            }
        }
    });
    let shutdown = Shutdown::new();
    let stop = shutdown.clone();
    let table = table.clone();
    tokio::spawn(async move {
        tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
        eprintln!(
            "replay {table}: stopping: waiting for the outstanding confirms (a second signal stops waiting)"
        );
        stop.stop();
        tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
        stop.abort();
    });
    Ok(shutdown)
}

/// The rows to replay, or the refusal of a range that reaches rows the relay deleted. The
/// relay deletes rows in two ways only, and a range is refused only then, never because ids
/// are sparse (the order guard draws every id, so they step by two, and rolled-back inserts
/// leave gaps too):
/// - `on_published = "delete"`: every row is deleted once published, so no range is kept.
/// - the retention sweeper, which records what it deleted (`outbox_relay.deleted_history`):
///   it deletes the oldest published rows first, so the retained history begins at the oldest
///   published row still there, and a range starting before it is refused rather than
///   replayed with a silent hole at its start.
///
/// A table whose relay never deleted a row keeps every published row: any range is served,
/// its rows not yet published skipped and counted.
fn plan(
    outbox: &OutboxSettings,
    args: &ReplayArgs,
    retained: &Retained,
) -> anyhow::Result<ReplayRange> {
    let table = &outbox.table;
    if outbox.on_published == OnPublished::Delete {
        anyhow::bail!(
            "{table} keeps no published row to replay: on_published = \"delete\" deletes each \
             row once the broker confirmed it"
        );
    }
    if let Some(deleted) = retained.deleted {
        let swept = format!(
            "the retention sweeper deleted {} published row(s) of {table} (the last at {})",
            deleted.rows,
            rfc3339(deleted.last_deleted)
        );
        let Some(oldest) = retained.oldest else {
            anyhow::bail!("cannot replay {table}: {swept}, and no published row is left");
        };
        // Either start bound inside the retained history keeps the whole range inside it
        // (the bounds narrow each other); a resumed `--since` run stays valid with its
        // `--from-id`.
        let id_inside = args.from_id.is_some_and(|from| from >= oldest.id);
        let time_inside = args.since.is_some_and(|since| since >= oldest.created_at);
        if !id_inside && !time_inside {
            let start = [
                args.from_id.map(|from| format!("from id {from}")),
                args.since.map(|since| format!("since {}", rfc3339(since))),
            ];
            let start = start.into_iter().flatten().collect::<Vec<_>>().join(" ");
            anyhow::bail!(
                "cannot replay {table} {start}: {swept}; the oldest published row still there is \
                 id {}, created {}: rows before it are no longer retained. Narrow the range: \
                 --from-id {} or --since {}",
                oldest.id,
                rfc3339(oldest.created_at),
                oldest.id,
                rfc3339(oldest.created_at)
            );
        }
    }
    let newest = retained.newest_id.unwrap_or(i64::MIN);
    Ok(ReplayRange {
        table: table.clone(),
        after: args.from_id.unwrap_or(i64::MIN).saturating_sub(1),
        last: args.to_id.map_or(newest, |to| to.min(newest)),
        published_by: retained.started_at,
        key: args.key.clone(),
        since: args.since,
        until: args.until,
        skip_discarded: retained.discards_recorded,
    })
}

/// `; skipped ...` after a replay's count: rows of the range not yet published, and rows an
/// operator discarded (never sent).
fn skipped_rows(unpublished: u64, discarded: u64) -> String {
    let mut text = String::new();
    if unpublished > 0 {
        text += &format!("; skipped {unpublished} row(s) of the range not yet published");
    }
    if discarded > 0 {
        text += &format!("; skipped {discarded} discarded row(s)");
    }
    text
}

/// Counts the range chunk by chunk (the total for `--dry-run` and the progress line).
async fn count(store: &Store, range: &ReplayRange) -> anyhow::Result<CountChunk> {
    let mut total = CountChunk::default();
    let mut after = range.after;
    while after < range.last {
        let chunk = store.count_replay_chunk(range, after, COUNT_CHUNK).await?;
        let Some(scanned_to) = chunk.scanned_to else {
            break;
        };
        total.rows += chunk.rows;
        total.unpublished += chunk.unpublished;
        total.discarded += chunk.discarded;
        total.first_id = total.first_id.or(chunk.first_id);
        total.last_id = chunk.last_id.or(total.last_id);
        after = scanned_to;
    }
    Ok(total)
}

/// What the replay publishes and how: the range, its destination overrides and its bounds.
struct Sender<'a> {
    store: &'a Store,
    table: &'a OutboxSettings,
    range: &'a ReplayRange,
    /// The `x-outbox-replay` header's value: the replay's start.
    replay_header: String,
    exchange: Option<&'a str>,
    routing_key: Option<&'a str>,
    max_message_bytes: usize,
    /// Ids read per statement.
    batch: i64,
    /// Unconfirmed publishes at most.
    window: usize,
    rate: u32,
    /// The table's message format, as the relay sends it.
    shape: message::MessageShape,
}

/// What a replay that ran to the end sent.
#[derive(Debug, Default)]
struct Sent {
    replayed: u64,
    unpublished: u64,
    discarded: u64,
    first_id: Option<i64>,
    last_id: Option<i64>,
}

impl Sender<'_> {
    /// Reads the range chunk by chunk and publishes its rows in id order: each waits for the
    /// pace and for room in the window, and confirms are settled as they arrive. Ends when
    /// every row is confirmed, at the first failure, or after SIGINT/SIGTERM once the
    /// outstanding confirms are in.
    async fn send_all(
        &self,
        publisher: &mut Publisher,
        shutdown: &Shutdown,
        total: &CountChunk,
    ) -> anyhow::Result<Sent> {
        let started = Instant::now();
        let mut pace = Pace::new(self.rate);
        let mut unconfirmed = Unconfirmed::new(publisher.confirm_timeout());
        let mut progress = Progress::new(started);
        let mut sent = Sent::default();
        let mut after = self.range.after;
        let mut interrupted = false;
        'read: while after < self.range.last {
            let chunk = self
                .store
                .replay_chunk(self.range, after, self.batch)
                .await?;
            let Some(scanned_to) = chunk.scanned_to else {
                break;
            };
            after = scanned_to;
            sent.unpublished += chunk.unpublished;
            sent.discarded += chunk.discarded;
            for row in chunk.rows {
                if shutdown.is_stopping() {
                    interrupted = true;
                    break 'read;
                }
                pace.ready(started).await;
                let room = unconfirmed
                    .make_room(self.window, publisher, &mut sent, shutdown)
                    .await;
                match room {
                    Ok(Room::Made) => {}
                    Ok(Room::Aborted) => {
                        interrupted = true;
                        break 'read;
                    }
                    Err(stop) => return Err(self.stopped(stop, &sent, unconfirmed.len())),
                }
                let id = row.id;
                match self.publish(publisher, row).await {
                    Ok(pending) => unconfirmed.push(id, pending),
                    Err(stop) => {
                        // The rows before it are still in flight: their confirms decide what
                        // was replayed, and the first failure among them is the one to name.
                        let older = unconfirmed.settle_all(publisher, &mut sent).await;
                        let first = older.err().unwrap_or(stop);
                        return Err(self.stopped(first, &sent, unconfirmed.len()));
                    }
                }
                progress.report(&self.range.table, &sent, total);
            }
        }
        let settled = tokio::select! {
            settled = unconfirmed.settle_all(publisher, &mut sent) => settled,
            _ = shutdown.aborted() => {
                interrupted = true;
                Ok(())
            }
        };
        if let Err(stop) = settled {
            return Err(self.stopped(stop, &sent, unconfirmed.len()));
        }
        if interrupted {
            anyhow::bail!(
                "replay of {} interrupted after {} of {} row(s) were replayed and confirmed{}; \
                 resume with --from-id {}",
                self.range.table,
                sent.replayed,
                total.rows,
                sent.last_id
                    .map(|id| format!(" (up to id {id})"))
                    .unwrap_or_default(),
                self.resume_from(&sent)
            );
        }
        Ok(sent)
    }

    /// Builds the row's message as the relay did the first time, marks it a replay, applies
    /// the overrides, and sends it.
    async fn publish(
        &self,
        publisher: &mut Publisher,
        mut row: OutboxRow,
    ) -> Result<PendingConfirm, Stop> {
        let id = row.id;
        let stop = |reason: String| Stop { id, reason };
        let mut message = message::build_with(
            &mut row,
            &self.range.table.to_string(),
            &self.table.exchange,
            &self.shape,
            message::BrokerLimits {
                max_body: message::BodyLimit::Configured(self.max_message_bytes),
                frame_max: publisher.frame_max(),
            },
        )
        .map_err(|e| stop(e.to_string()))?;
        message::mark_replay(&mut message, &self.replay_header);
        if let Some(exchange) = self.exchange {
            message.exchange = exchange.to_owned();
        }
        if let Some(routing_key) = self.routing_key {
            message.routing_key = routing_key.to_owned();
        }
        publisher
            .ensure_exchange(&message.exchange)
            .await
            .map_err(|e| stop(e.to_string()))?;
        publisher
            .publish(&message)
            .await
            .map_err(|e| stop(e.to_string()))
    }

    fn resume_from(&self, sent: &Sent) -> i64 {
        sent.last_id
            .map_or(self.range.after.saturating_add(1), |id| id + 1)
    }

    /// The error that ends a replay at `stop`: what is known to be replayed, what may be, and
    /// where to resume (`unconfirmed`: rows sent after it whose confirm is unknown).
    fn stopped(&self, stop: Stop, sent: &Sent, unconfirmed: usize) -> anyhow::Error {
        let after = match unconfirmed {
            0 => String::new(),
            n => format!(
                "; sent after it without a confirm (they may have reached consumers): {n} row(s)"
            ),
        };
        anyhow::anyhow!(
            "replay of {} stopped at row {}: {}. Replayed and confirmed before it: {} row(s){after}. \
             Resume with --from-id {}",
            self.range.table,
            stop.id,
            stop.reason,
            sent.replayed,
            stop.id
        )
    }
}

/// A row the replay could not publish, and why.
struct Stop {
    id: i64,
    reason: String,
}

/// Whether the window has room for one more publish.
enum Room {
    Made,
    /// A second signal: stop waiting.
    Aborted,
}

type Confirm = Pin<Box<dyn Future<Output = Result<(), PublishError>> + Send>>;

/// Publishes whose confirm is still to come, oldest first.
struct Unconfirmed {
    queue: VecDeque<(i64, Confirm)>,
    confirm_timeout: Duration,
}

impl Unconfirmed {
    fn new(confirm_timeout: Duration) -> Self {
        Unconfirmed {
            queue: VecDeque::new(),
            confirm_timeout,
        }
    }

    fn len(&self) -> usize {
        self.queue.len()
    }

    fn push(&mut self, id: i64, pending: PendingConfirm) {
        self.queue.push_back((id, Box::pin(pending.wait())));
    }

    /// Settles the oldest confirms that have already arrived, without waiting.
    fn settle_arrived(&mut self, sent: &mut Sent) -> Result<(), Stop> {
        while let Some((id, confirm)) = self.queue.front_mut() {
            let Some(result) = confirm.now_or_never() else {
                return Ok(());
            };
            let id = *id;
            self.queue.pop_front();
            settle(id, result, sent)?;
        }
        Ok(())
    }

    /// Waits for the oldest confirm: up to the confirm timeout, longer while the broker blocks
    /// the connection (a resource alarm: confirms cannot come until it clears).
    async fn settle_oldest(&mut self, publisher: &Publisher, sent: &mut Sent) -> Result<(), Stop> {
        let Some((id, confirm)) = self.queue.front_mut() else {
            return Ok(());
        };
        let id = *id;
        let result = loop {
            match tokio::time::timeout(self.confirm_timeout, &mut *confirm).await {
                Ok(result) => break result,
                Err(_) if publisher.is_blocked() => continue,
                Err(_) => {
                    break Err(PublishError::Transport(format!(
                        "no confirm within {} (rabbitmq.confirm_timeout)",
                        humantime::format_duration(self.confirm_timeout)
                    )))
                }
            }
        };
        self.queue.pop_front();
        settle(id, result, sent)
    }

    /// Settles the confirms that arrived, then, while the window is full, waits for the
    /// oldest; a second signal stops the wait (a blocked broker may hold the window full).
    async fn make_room(
        &mut self,
        window: usize,
        publisher: &Publisher,
        sent: &mut Sent,
        shutdown: &Shutdown,
    ) -> Result<Room, Stop> {
        self.settle_arrived(sent)?;
        if self.len() < window {
            return Ok(Room::Made);
        }
        tokio::select! {
            settled = self.settle_oldest(publisher, sent) => settled.map(|()| Room::Made),
            _ = shutdown.aborted() => Ok(Room::Aborted),
        }
    }

    /// Waits for every outstanding confirm, oldest first, up to the first failure.
    async fn settle_all(&mut self, publisher: &Publisher, sent: &mut Sent) -> Result<(), Stop> {
        while self.len() > 0 {
            self.settle_oldest(publisher, sent).await?;
        }
        Ok(())
    }
}

fn settle(id: i64, result: Result<(), PublishError>, sent: &mut Sent) -> Result<(), Stop> {
    result.map_err(|e| Stop {
        id,
        reason: e.to_string(),
    })?;
    sent.replayed += 1;
    sent.first_id = sent.first_id.or(Some(id));
    sent.last_id = Some(id);
    Ok(())
}

/// At most `rate` publishes per second, in bursts of at most a tenth of a second's worth (a
/// token bucket). [`Pace::wait`] is pure (the caller gives the time since the start), so the
/// rate is unit-tested without a clock.
struct Pace {
    rate: f64,
    burst: f64,
    tokens: f64,
    at: Duration,
}

impl Pace {
    fn new(rate: u32) -> Self {
        let rate = f64::from(rate.max(1));
        Pace {
            rate,
            burst: (rate / 10.0).max(1.0),
            tokens: 1.0,
            at: Duration::ZERO,
        }
    }

    /// Waits until a publish may go (`started`: the replay's start) and takes its token.
    async fn ready(&mut self, started: Instant) {
        loop {
            let wait = self.wait(started.elapsed());
            if wait.is_zero() {
                return;
            }
            tokio::time::sleep(wait).await;
        }
    }

    /// Zero when a publish may go now (and takes its token); else how long to wait first.
    fn wait(&mut self, now: Duration) -> Duration {
        let earned = now.saturating_sub(self.at).as_secs_f64() * self.rate;
        self.tokens = (self.tokens + earned).min(self.burst);
        self.at = self.at.max(now);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Duration::ZERO
        } else {
            Duration::from_secs_f64((1.0 - self.tokens) / self.rate)
        }
    }
}

/// The progress line of a long replay, on stderr every [`PROGRESS_EVERY`].
struct Progress {
    started: Instant,
    last: Instant,
}

impl Progress {
    fn new(started: Instant) -> Self {
        Progress {
            started,
            last: started,
        }
    }

    fn report(&mut self, table: &TableName, sent: &Sent, total: &CountChunk) {
        if self.last.elapsed() < PROGRESS_EVERY {
            return;
        }
        self.last = Instant::now();
        let per_second = sent.replayed as f64 / self.started.elapsed().as_secs_f64();
        eprintln!(
            "replay {table}: replayed {} of {} rows ({per_second:.0}/s){}",
            sent.replayed,
            total.rows,
            sent.last_id
                .map(|id| format!(", confirmed up to id {id}"))
                .unwrap_or_default()
        );
    }
}

fn id_span(count: &CountChunk) -> String {
    match (count.first_id, count.last_id) {
        (Some(first), Some(last)) => format!(", ids {first} to {last}"),
        _ => String::new(),
    }
}

fn rfc3339(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Micros, true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{DeletedHistory, RetainedRow};
    use clap::Parser;

    #[derive(Debug, Parser)]
    struct Command {
        #[command(flatten)]
        args: ReplayArgs,
    }

    fn args(line: &[&str]) -> Result<ReplayArgs, clap::Error> {
        let line = std::iter::once("replay").chain(line.iter().copied());
        Command::try_parse_from(line).map(|c| c.args)
    }

    fn at(s: &str) -> DateTime<Utc> {
        parse_time(s).unwrap()
    }

    fn retained(oldest: Option<(i64, &str)>, deleted: Option<i64>) -> Retained {
        Retained {
            started_at: at("2026-03-01T12:00:00Z"),
            newest_id: Some(900),
            oldest: oldest.map(|(id, t)| RetainedRow {
                id,
                created_at: at(t),
            }),
            deleted: deleted.map(|rows| DeletedHistory {
                rows,
                last_deleted: at("2026-02-28T00:00:00Z"),
            }),
            discards_recorded: true,
        }
    }

    fn table() -> OutboxSettings {
        serde_json::from_value(serde_json::json!({"table": "outbox", "exchange": "events"}))
            .unwrap()
    }

    #[test]
    fn a_time_is_a_date_a_date_and_time_in_utc_or_rfc_3339_with_its_zone() {
        let utc = |s: &str| rfc3339(parse_time(s).unwrap());
        assert_eq!(utc("2026-12-07"), "2026-12-07T00:00:00.000000Z");
        assert_eq!(utc("2026-12-07T10:00:00"), "2026-12-07T10:00:00.000000Z");
        assert_eq!(utc("2026-12-07 10:00"), "2026-12-07T10:00:00.000000Z");
        assert_eq!(utc("2026-12-07T10:00"), "2026-12-07T10:00:00.000000Z");
        assert_eq!(utc("2026-12-07 10:00:05.25"), "2026-12-07T10:00:05.250000Z");
        assert_eq!(
            utc("2026-12-07T10:00:00+01:00"),
            "2026-12-07T09:00:00.000000Z"
        );
        assert_eq!(utc("2026-12-07 10:00:00Z"), "2026-12-07T10:00:00.000000Z");
        assert_eq!(utc("2026-12-07T10:00+02:00"), "2026-12-07T08:00:00.000000Z");
        for bad in ["yesterday", "2026-13-01", "07.12.2026", "2026-12-07T25:00"] {
            let e = parse_time(bad).unwrap_err();
            assert!(e.contains("RFC 3339") && e.contains("UTC"), "{bad}: {e}");
        }
    }

    #[test]
    fn a_replay_needs_a_start_and_sane_bounds() {
        let no_start = args(&["--table", "outbox", "--to-id", "5"]).unwrap_err();
        assert_eq!(no_start.exit_code(), 2);
        let backwards = args(&["--table", "outbox", "--from-id", "9", "--to-id", "5"]).unwrap();
        let e = check_bounds(&backwards).unwrap_err();
        assert_eq!(e.exit_code(), 2);
        assert!(
            e.to_string().contains("--to-id 5 is before --from-id 9"),
            "{e}"
        );
        let bad_time = args(&["--table", "outbox", "--since", "yesterday"]).unwrap_err();
        assert!(bad_time.to_string().contains("RFC 3339"), "{bad_time}");
        assert!(args(&["--table", "outbox", "--from-id", "1", "--rate", "0"]).is_err());
        assert!(args(&[
            "--table",
            "outbox",
            "--from-id",
            "1",
            "--exchange",
            "no spaces"
        ])
        .is_err());
        let both = args(&[
            "--table",
            "outbox",
            "--from-id",
            "1",
            "--since",
            "2026-01-01T00:00:00+01:00",
        ])
        .unwrap();
        assert_eq!(both.since, Some(at("2025-12-31T23:00:00Z")));
        assert_eq!(both.rate, 1000);
        let by_date = args(&["--table", "outbox", "--since", "2026-12-07"]).unwrap();
        assert_eq!(by_date.since, Some(at("2026-12-07T00:00:00Z")));
    }

    #[test]
    fn a_range_is_never_refused_on_a_table_whose_relay_deleted_no_row() {
        // Ids start at 2 and step by two (the order guard draws them): id 1 never existed.
        let kept = retained(Some((2, "2026-02-01T00:00:00Z")), None);
        let range = plan(
            &table(),
            &args(&["--table", "outbox", "--from-id", "1"]).unwrap(),
            &kept,
        )
        .unwrap();
        assert_eq!((range.after, range.last), (0, 900));
        let early = args(&["--table", "outbox", "--since", "2020-01-01"]).unwrap();
        assert!(plan(&table(), &early, &kept).is_ok());
        // Nothing published yet: an empty range, not a refusal.
        let nothing = plan(
            &table(),
            &args(&["--table", "outbox", "--from-id", "1"]).unwrap(),
            &retained(None, None),
        )
        .unwrap();
        assert!(nothing.skip_discarded);
    }

    #[test]
    fn a_range_that_starts_before_the_oldest_row_the_sweeper_left_is_refused_naming_it() {
        let kept = retained(Some((500, "2026-02-01T00:00:00Z")), Some(40));
        let e = plan(
            &table(),
            &args(&["--table", "outbox", "--from-id", "1"]).unwrap(),
            &kept,
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("from id 1") && e.contains("--from-id 500"),
            "{e}"
        );
        assert!(e.contains("deleted 40 published row(s)"), "{e}");
        assert!(e.contains("2026-02-01T00:00:00.000000Z"), "{e}");
        let e = plan(
            &table(),
            &args(&["--table", "outbox", "--since", "2026-01-31T00:00:00Z"]).unwrap(),
            &kept,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("--since 2026-02-01T00:00:00.000000Z"), "{e}");
        let both = |from: &str, since: &str| {
            let line = ["--table", "outbox", "--from-id", from, "--since", since];
            plan(&table(), &args(&line).unwrap(), &kept).map_err(|e| e.to_string())
        };
        let e = both("1", "2026-01-31T00:00:00Z").unwrap_err();
        assert!(
            e.contains("from id 1 since 2026-01-31T00:00:00.000000Z"),
            "{e}"
        );
        assert!(
            both("500", "2026-01-31T00:00:00Z").is_ok(),
            "an id inside suffices"
        );
        assert!(
            both("1", "2026-02-01T00:00:00Z").is_ok(),
            "a time inside suffices"
        );
        let e = plan(
            &table(),
            &args(&["--table", "outbox", "--from-id", "1"]).unwrap(),
            &retained(None, Some(40)),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("no published row is left"), "{e}");
    }

    #[test]
    fn every_range_of_a_table_in_delete_mode_is_refused() {
        let mut deleting = table();
        deleting.on_published = OnPublished::Delete;
        let e = plan(
            &deleting,
            &args(&["--table", "outbox", "--from-id", "1"]).unwrap(),
            &retained(Some((500, "2026-02-01T00:00:00Z")), None),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("on_published = \"delete\""), "{e}");
    }

    #[test]
    fn a_range_ends_at_the_newest_row_at_the_start_and_takes_rows_published_by_then() {
        let kept = retained(Some((500, "2026-02-01T00:00:00Z")), Some(1));
        let open = plan(
            &table(),
            &args(&["--table", "outbox", "--from-id", "500"]).unwrap(),
            &kept,
        )
        .unwrap();
        assert_eq!((open.after, open.last), (499, 900));
        assert_eq!(open.published_by, kept.started_at);
        let capped = plan(
            &table(),
            &args(&["--table", "outbox", "--from-id", "600", "--to-id", "5000"]).unwrap(),
            &kept,
        )
        .unwrap();
        assert_eq!((capped.after, capped.last), (599, 900));
        let by_time = plan(
            &table(),
            &args(&[
                "--table",
                "outbox",
                "--since",
                "2026-02-01T00:00:00Z",
                "--key",
                "k",
            ])
            .unwrap(),
            &kept,
        )
        .unwrap();
        assert_eq!((by_time.after, by_time.last), (i64::MIN, 900));
        assert_eq!(by_time.key.as_deref(), Some("k"));
    }

    #[test]
    fn the_pace_allows_the_rate_and_a_tenth_of_a_second_of_burst() {
        let ms = Duration::from_millis;
        let mut slow = Pace::new(10);
        assert_eq!(slow.wait(ms(0)), Duration::ZERO);
        assert_eq!(slow.wait(ms(0)), ms(100));
        assert_eq!(slow.wait(ms(50)), ms(50));
        assert_eq!(slow.wait(ms(100)), Duration::ZERO);
        // A pause earns no more than the burst (one message at 10/s).
        assert_eq!(slow.wait(ms(5000)), Duration::ZERO);
        assert!(slow.wait(ms(5000)) > Duration::ZERO);

        let mut fast = Pace::new(1000);
        let now = ms(10_000);
        let burst = (0..1000).take_while(|_| fast.wait(now).is_zero()).count();
        assert_eq!(burst, 100, "a tenth of a second's worth at once");
        let in_a_second = (0..2000)
            .filter(|i| fast.wait(now + ms(*i / 2)).is_zero())
            .count();
        assert!((999..=1001).contains(&in_a_second), "{in_a_second}");
    }
}
