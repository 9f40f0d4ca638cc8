//! The confirm window: fetched rows queued per ordering key, the publishes whose confirm is on
//! its way, and the silence clock that presumes a connection dead. Invariants: a key has at
//! most one message unconfirmed; at most `max_in_flight` messages are unconfirmed or confirmed
//! with the mark not written yet (the most a crash or a broken connection sends twice); a key
//! whose row failed sends nothing more until the failure is recorded and the row is due again.

use std::time::{Duration, Instant};

use futures::stream::{FuturesUnordered, StreamExt};

use super::marks::MarkPipeline;
use super::report::{Health, RefusalLog, Reporter};
use crate::config::OnExhausted;
use crate::dispatch::KeyQueues;
use crate::message::{self, BrokerLimits, MessageShape, OutboundMessage, OutboxRow};
use crate::metrics::{ParkReason, TableMetrics};
use crate::publisher::{PublishError, Publisher, Refusal};
use crate::retry::{RetryPolicy, Verdict};
use crate::shutdown::Shutdown;
use crate::store::{Failure, LockGuard, RowVersion, TableLock};
use crate::telemetry::otlp::{PublishSpan, PublishSpans};

/// A publish whose confirm is on its way: the row, when it was sent, its span (when spans are
/// exported), and the broker's answer.
type Answered = (
    OutboxRow,
    Instant,
    Option<PublishSpan>,
    Result<(), PublishError>,
);

type InFlight =
    FuturesUnordered<std::pin::Pin<Box<dyn std::future::Future<Output = Answered> + Send>>>;

pub(crate) struct ConfirmWindow {
    /// Fetched rows by ordering key, kept across fetches so the window stays full from one
    /// batch to the next.
    queues: KeyQueues,
    in_flight: InFlight,
    /// How long the window has waited for a confirm while listening: since the last confirm
    /// (or since it went from empty to busy), counting only time spent waiting in
    /// [`ConfirmWindow::drive`]. Time the relay spent elsewhere (a slow fetch or mark) or the
    /// process did not run (SIGSTOP, a stall) is not the broker's silence: the confirms that
    /// came meanwhile are read first.
    silence: Duration,
    max_in_flight: usize,
    metrics: TableMetrics,
    refusals: RefusalLog,
    /// The publish spans' factory when spans are exported; None: no span is made.
    spans: Option<&'static PublishSpans>,
}

/// What one [`ConfirmWindow::drive`] settled.
#[derive(Default)]
pub(crate) struct Settled {
    pub confirmed: usize,
    pub failed: usize,
    pub parked: usize,
    /// The channel or connection broke (or went silent): nothing in flight is known.
    pub broken: Option<PublishError>,
    /// New rows are announced (a NOTIFY arrived while confirms were outstanding).
    pub announced: bool,
    /// Publishing stopped at the leases' `until`: rows taken for sending were not sent (and
    /// left the window); what was in flight is still settled.
    pub lease_ran_out: bool,
}

/// What `drive` needs from the table relay around it.
pub(crate) struct Drive<'a> {
    pub publisher: &'a mut Publisher,
    pub marks: &'a mut MarkPipeline,
    pub lock: &'a TableLock,
    pub guard: LockGuard,
    /// Publish nothing at or after this instant (the partition leases' safe end); `None`:
    /// publish nothing, only settle what is in flight.
    pub until: Option<tokio::time::Instant>,
    pub reporter: &'a mut Reporter,
    pub shutdown: &'a Shutdown,
    pub policy: &'a RetryPolicy,
    pub table: &'a str,
    pub default_exchange: &'a str,
    /// How the table's rows become messages (content type, format, trace column).
    pub shape: &'a MessageShape,
    pub max_message_bytes: crate::message::BodyLimit,
    /// More rows are probably due: return as soon as a fetch fits.
    pub more_waiting: bool,
}

impl ConfirmWindow {
    pub fn new(max_in_flight: usize, metrics: TableMetrics) -> Self {
        ConfirmWindow {
            queues: KeyQueues::default(),
            in_flight: FuturesUnordered::new(),
            silence: Duration::ZERO,
            max_in_flight,
            metrics,
            refusals: RefusalLog::default(),
            spans: crate::telemetry::otlp::spans(),
        }
    }

    pub fn add(&mut self, rows: Vec<OutboxRow>) {
        self.queues.add(rows);
    }

    /// Ids queued or in flight.
    pub fn held_ids(&self) -> impl Iterator<Item = i64> + '_ {
        self.queues.held_ids()
    }

    pub fn is_empty(&self) -> bool {
        self.queues.held() == 0
    }

    /// Rows in memory: queued or in flight.
    pub fn held(&self) -> usize {
        self.queues.held()
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.len()
    }

    /// A fetch is worth it: nothing queued can be sent now, and a batch fits beside the window.
    pub fn has_room_to_fetch(&self) -> bool {
        !self.queues.has_ready() && self.queues.held() <= self.max_in_flight
    }

    /// Forgets queued rows and unconfirmed publishes: they stay due in the table and go out
    /// again (same message_id) once the relay is back; the unconfirmed ones count as resent.
    pub fn clear(&mut self) {
        self.metrics.resent(self.in_flight.len());
        self.queues.clear();
        self.in_flight = FuturesUnordered::new();
    }

    /// With nothing held, gives back the memory its queues grew to (a table that was busy
    /// once costs kilobytes while it is quiet, not the capacity of its largest batch).
    pub fn shrink_when_empty(&mut self) {
        if self.queues.held() == 0 && self.in_flight.is_empty() {
            self.queues.clear();
            self.in_flight = FuturesUnordered::new();
        }
    }

    /// The silence clock starts again (the broker blocks the connection: confirms cannot come).
    pub fn hold_clock(&mut self) {
        self.silence = Duration::ZERO;
    }

    /// Sends ready rows and settles confirms as they arrive. Returns when nothing is in flight;
    /// early, with confirms outstanding, when a fetch fits and more rows wait (or are
    /// announced), or when enough confirmed rows wait for a mark and none is being written.
    pub async fn drive(&mut self, d: Drive<'_>) -> Settled {
        let mut out = Settled::default();
        let fill = Fill {
            policy: d.policy,
            table: d.table,
            default_exchange: d.default_exchange,
            shape: d.shape,
            limits: BrokerLimits {
                max_body: d.max_message_bytes,
                frame_max: d.publisher.frame_max(),
            },
            until: d.until,
            spans: self.spans,
        };
        let confirm_timeout = d.publisher.confirm_timeout();
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // The silence clock counts from here: the time away from the window is not the
        // broker's.
        let mut listened_at = Instant::now();
        loop {
            if out.broken.is_none()
                && !out.lease_ran_out
                && d.until.is_some()
                && !d.shutdown.is_stopping()
                && d.lock.still_holds(&d.guard)
            {
                if let Err(e) = self.fill(&fill, d.publisher, d.marks, &mut out).await {
                    out.broken = Some(e);
                }
            }
            if self.in_flight.is_empty() || out.broken.is_some() {
                break;
            }
            // Go and fetch while these confirms are on their way: at once when the last fetch
            // was full, or as soon as new rows are announced. Not while settling (`until` is
            // `None`): the relay fetches nothing before what is in flight is settled, so
            // returning early would only spin without ever reading these confirms.
            let room_to_fetch =
                d.until.is_some() && self.has_room_to_fetch() && !d.shutdown.is_stopping();
            if room_to_fetch && d.more_waiting {
                break;
            }
            let next = tokio::select! {
                // Confirms that are there are read before the silence clock is looked at.
                biased;
                next = self.in_flight.next() => next,
                _ = d.shutdown.aborted() => break,
                _ = d.lock.notified(), if room_to_fetch => {
                    out.announced = true;
                    break;
                }
                _ = tick.tick() => {
                    d.reporter.beat();
                    // A tick much later than due: the process did not run (or could not poll)
                    // meanwhile; only what the window could have heard counts as silence.
                    let now = Instant::now();
                    self.silence += now.duration_since(listened_at).min(TICK * 2);
                    listened_at = now;
                    if d.publisher.is_blocked() {
                        // Confirms may legitimately take long while the broker blocks us
                        // (resource alarm): the loop is alive and the silence clock stops.
                        self.silence = Duration::ZERO;
                        d.reporter.set(Health::Blocked);
                    } else if self.silence >= confirm_timeout {
                        out.broken = Some(PublishError::Transport(format!(
                            "no confirm from the broker within {}",
                            humantime::format_duration(confirm_timeout)
                        )));
                        break;
                    }
                    continue;
                }
            };
            let Some((row, sent, span, result)) = next else {
                break;
            };
            self.silence = Duration::ZERO;
            listened_at = Instant::now();
            match result {
                Ok(()) => {
                    if let Some(span) = span {
                        span.confirmed();
                    }
                    self.metrics.confirmed(sent, row.created_at);
                    d.marks.confirm(RowVersion::of(&row));
                    out.confirmed += 1;
                    self.queues.release(&row);
                    if d.marks.wants_mark() {
                        break;
                    }
                }
                Err(PublishError::Refused(Refusal::Nack, reason)) => {
                    // A nack says the broker could not take the message (a quorum queue
                    // without its majority or its leader, a full queue set to reject-publish,
                    // an internal error), nothing about the row: an outage, so attempts do not
                    // count and the row goes out again, same message_id, after the backoff.
                    if let Some(span) = span {
                        span.lost(&reason);
                    }
                    self.metrics.refused(Refusal::Nack);
                    self.metrics.resent(1);
                    if out.broken.is_none() {
                        out.broken = Some(PublishError::Transport(reason));
                    }
                }
                Err(PublishError::Refused(refusal, reason)) => {
                    self.refusals.refused(
                        d.table,
                        refusal,
                        &row,
                        row.exchange.as_deref().unwrap_or(d.default_exchange),
                        &reason,
                        d.policy.max_attempts,
                    );
                    self.metrics.refused(refusal);
                    self.queues.stop_key(&row);
                    record(
                        d.marks,
                        d.policy,
                        &self.metrics,
                        &mut out,
                        &row,
                        span,
                        reason,
                        false,
                    );
                }
                Err(e) => {
                    // Its outcome is lost with the channel: it goes out again.
                    if let Some(span) = span {
                        span.lost(&e.to_string());
                    }
                    self.metrics.resent(1);
                    d.publisher.forget_exchanges();
                    if out.broken.is_none() {
                        out.broken = Some(e);
                    }
                }
            }
        }
        if out.failed > out.parked {
            // The first refusal of each kind was logged with its reason where it was decided
            // on (RefusalLog); the rest are counted, and this is for debugging only.
            tracing::debug!(
                table = d.table,
                failed = out.failed - out.parked,
                "publishes refused by the broker; retrying with backoff"
            );
        }
        out
    }

    /// Fills the window from the ready keys and hands the whole group to the client at once
    /// (its I/O thread writes the frames together instead of waking once per message).
    async fn fill(
        &mut self,
        f: &Fill<'_>,
        publisher: &mut Publisher,
        marks: &mut MarkPipeline,
        out: &mut Settled,
    ) -> Result<(), PublishError> {
        let mut sends: Vec<(OutboxRow, OutboundMessage, Option<PublishSpan>)> = Vec::new();
        while self.in_flight.len() + marks.pending() + sends.len() < self.max_in_flight {
            let Some(mut row) = self.queues.next_to_send() else {
                break;
            };
            // With spans exported, the row's span starts here, a child of the producer's
            // context, and the message names it as the consumer's parent.
            let mut span = f.spans.map(|spans| {
                message::take_trace(&mut row, f.shape);
                spans.start(&row, f.table, message::producer_trace(&row))
            });
            let built = message::build_traced(
                &mut row,
                f.table,
                f.default_exchange,
                f.shape,
                f.limits,
                span.as_ref().map(PublishSpan::traceparent),
            );
            let message = match built {
                Ok(m) => m,
                Err(unpublishable) => {
                    if f.policy.on_exhausted == OnExhausted::Skip {
                        self.queues.release(&row);
                    } else {
                        self.queues.stop_key(&row);
                    }
                    let error = unpublishable.to_string();
                    record(marks, f.policy, &self.metrics, out, &row, span, error, true);
                    continue;
                }
            };
            if let Some(span) = &mut span {
                span.published(&message);
            }
            match publisher.ensure_exchange(&message.exchange).await {
                Ok(()) => sends.push((row, message, span)),
                Err(PublishError::Refused(refusal, reason)) => {
                    self.refusals.refused(
                        f.table,
                        refusal,
                        &row,
                        &message.exchange,
                        &reason,
                        f.policy.max_attempts,
                    );
                    self.metrics.refused(refusal);
                    self.queues.stop_key(&row);
                    record(
                        marks,
                        f.policy,
                        &self.metrics,
                        out,
                        &row,
                        span,
                        reason,
                        false,
                    );
                }
                Err(e) => {
                    self.queues.stop_key(&row);
                    return Err(e);
                }
            }
        }
        if sends.is_empty() {
            return Ok(());
        }
        // The last moment to look: a process paused since the turn began (SIGSTOP, a stall)
        // may have lost its partitions meanwhile; it sends nothing before it has checked.
        if f.until
            .is_none_or(|until| tokio::time::Instant::now() >= until)
        {
            // Not sent: their keys' rows leave the window and stay due in the table, for
            // this relay once its leases are renewed, or for the partitions' next owner.
            for (row, _, span) in sends {
                self.queues.stop_key(&row);
                if let Some(span) = span {
                    span.lost("not sent: the partition leases ran out first");
                }
            }
            out.lease_ran_out = true;
            return Ok(());
        }
        let sent_at = Instant::now();
        if self.in_flight.is_empty() {
            self.silence = Duration::ZERO;
        }
        // Frames (and delivery tags) keep the order of `sends`; a key has at most one message
        // in the group.
        let results =
            futures::future::join_all(sends.iter().map(|(_, m, _)| publisher.publish(m))).await;
        let mut broken = None;
        for ((row, _, span), sent) in sends.into_iter().zip(results) {
            match sent {
                Ok(pending) => self.in_flight.push(Box::pin(async move {
                    (row, sent_at, span, pending.wait().await)
                })),
                Err(e) => {
                    if let Some(span) = span {
                        span.lost(&e.to_string());
                    }
                    broken.get_or_insert(e);
                }
            }
        }
        broken.map_or(Ok(()), Err)
    }
}

/// How often a waiting window beats the heartbeat and looks at the silence clock.
const TICK: Duration = Duration::from_millis(250);

/// The parts of [`Drive`] that filling the window reads.
struct Fill<'a> {
    policy: &'a RetryPolicy,
    table: &'a str,
    default_exchange: &'a str,
    shape: &'a MessageShape,
    limits: BrokerLimits,
    until: Option<tokio::time::Instant>,
    spans: Option<&'static PublishSpans>,
}

/// Hands a failed row to the mark pipeline with the policy's verdict (`park_now` for rows that
/// can never be sent as they stand), and ends its span (if any) with the reason and verdict.
#[allow(clippy::too_many_arguments)]
fn record(
    marks: &mut MarkPipeline,
    policy: &RetryPolicy,
    metrics: &TableMetrics,
    out: &mut Settled,
    row: &OutboxRow,
    span: Option<PublishSpan>,
    error: String,
    park_now: bool,
) {
    let attempt = row.attempts.max(0) as u32 + 1;
    let verdict = if park_now {
        Verdict::Park
    } else {
        policy.after_failure(attempt, rand::random::<f64>())
    };
    let retry_after = match verdict {
        Verdict::RetryAfter(d) => Some(d),
        Verdict::Park => None,
    };
    if let Some(span) = span {
        span.failed(&error, retry_after);
    }
    out.failed += 1;
    if retry_after.is_none() {
        out.parked += 1;
        metrics.parked(if park_now {
            ParkReason::Unpublishable
        } else {
            ParkReason::AttemptsExhausted
        });
    }
    marks.fail(
        Failure {
            row: RowVersion::of(row),
            error,
            retry_after,
        },
        &row.ordering_key,
        row.attempts,
    );
}
