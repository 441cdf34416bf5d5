//! `SalesOutbox`: delivers the sales journal to the cloud, at least once, with bounded
//! concurrency; the cloud's idempotency ledger turns that into exactly once.
//!
//! Rows are claimed from the store (`pending`, or `failed` and due), sent, and their outcomes
//! recorded in one transaction per batch. The mapping from a cloud answer to per-row outcomes
//! is the pure function [`outcomes_for`].

use possync_protocol::{
    ErrorCode, EventStatus, SaleEvent, SalesEventsResponse, MAX_BODY_BYTES, MAX_EVENTS_PER_REQUEST,
};
use ractor::{Actor, ActorProcessingErr, ActorRef};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::backoff::{self, Budget, Decision};
use crate::code::TerminalCode;
use crate::context::SyncContext;
use crate::ports::{
    CloudError, DeliveryOutcome, FailureClass, FailureHistory, OutboxItem, TransientFailure,
};
use crate::status::{ActorKind, ActorState};
use chrono::{DateTime, Utc};

/// Whether a transient failure is the sale's own, so that it counts toward `max_attempts`.
///
/// The rule: the cloud answered with a retryable error of its own ([`FailureClass::CloudTrouble`]),
/// the request carried this sale alone, and the cloud stored other sales of this till after
/// this sale's previous failure. Everything else is the cloud's trouble and is retried for as
/// long as it lasts: no answer at all (an outage of any length), a throttle, a proxy's 5xx,
/// or a cloud error while nothing else gets stored either (its database is down). The first
/// failure of a sale is never blamed on it: there is no earlier failure to compare with, and
/// a sale that failed in company goes alone next time (see [`split_requests`]).
pub fn blame_sale(
    class: FailureClass,
    request_len: usize,
    history: &FailureHistory,
    cloud_stored_at: Option<DateTime<Utc>>,
) -> bool {
    class == FailureClass::CloudTrouble
        && request_len == 1
        && matches!(
            (history.last_failed_at, cloud_stored_at),
            (Some(failed), Some(stored)) if stored > failed
        )
}

/// How to pace the retry of one item after a transient failure: `(blamed, failures, budget)`.
/// A blamed failure is paced by, and counted against, the sale's own failures; any other by
/// all its attempts, without a budget.
pub fn retry_pacing(
    item: &OutboxItem,
    class: FailureClass,
    request_len: usize,
    cloud_stored_at: Option<DateTime<Utc>>,
) -> (bool, u32, Budget) {
    if blame_sale(class, request_len, &item.history, cloud_stored_at) {
        (
            true,
            item.history.sale_failures.saturating_add(1),
            Budget::Attempts,
        )
    } else {
        (false, item.attempts.saturating_add(1), Budget::Unbounded)
    }
}

/// Maps the answer to one request onto one outcome per claimed item.
///
/// - 200 with one result per item, in order: `accepted`/`duplicate` → synced; `conflict` /
///   `rejected` → needs attention with the cloud's code and message.
/// - 200 with the wrong number of results, or results naming other events: the answer cannot
///   be trusted, so it is treated like no answer (the ledger makes a resend safe).
/// - Transient failure: retry at the time `backoff(failures, budget, retry_after)` decides.
///   Only a failure [`blame_sale`] pins on the sale has a budget, so only such failures can
///   end in needs attention ([`TerminalCode::AttemptsExhausted`]); an outage never does.
/// - Any other whole-request refusal *with the cloud's error envelope* (400, 403, 413 … with
///   a stable code): needs attention for every item; resending the same request unchanged
///   cannot succeed. The same statuses without the envelope are a proxy's error page
///   ([`FailureClass::NoAnswer`]): retried and held, never parked.
///
/// `cloud_stored_at` is when the cloud last stored a sale of this till (the evidence that it
/// works for others); `now` is when the answer came back.
pub fn outcomes_for(
    items: &[OutboxItem],
    result: Result<SalesEventsResponse, CloudError>,
    cloud_stored_at: Option<DateTime<Utc>>,
    now: DateTime<Utc>,
    backoff: &mut dyn FnMut(u32, Budget, Option<Duration>) -> Decision,
) -> Vec<DeliveryOutcome> {
    let err = match result {
        Ok(resp) => match check_results(items, &resp) {
            Ok(()) => {
                return items
                    .iter()
                    .zip(resp.results)
                    .map(|(item, r)| match r.status {
                        EventStatus::Accepted | EventStatus::Duplicate => DeliveryOutcome::Synced {
                            journal_id: item.journal_id,
                            cloud_event_id: r.cloud_event_id.map(|u| u.to_string()),
                            duplicate: r.status == EventStatus::Duplicate,
                        },
                        EventStatus::Conflict | EventStatus::Rejected => {
                            let default_code = if r.status == EventStatus::Conflict {
                                ErrorCode::PosSyncEventDuplicate
                            } else {
                                ErrorCode::PosSyncEventInvalid
                            };
                            DeliveryOutcome::NeedsAttention {
                                journal_id: item.journal_id,
                                code: TerminalCode::Api(r.code.unwrap_or(default_code)),
                                message: r.message.unwrap_or_else(|| {
                                    format!("cloud answered {:?}", r.status).to_lowercase()
                                }),
                            }
                        }
                    })
                    .collect();
            }
            Err(why) => CloudError::BadResponse(why),
        },
        Err(e) => e,
    };
    let code = err.code();
    let message = err.to_string();
    let class = err.class();
    if class == FailureClass::Refused {
        return items
            .iter()
            .map(|item| DeliveryOutcome::NeedsAttention {
                journal_id: item.journal_id,
                code,
                message: message.clone(),
            })
            .collect();
    }
    items
        .iter()
        .map(|item| {
            let (blamed, failures, budget) =
                retry_pacing(item, class, items.len(), cloud_stored_at);
            let failure = match class {
                FailureClass::NoAnswer | FailureClass::CredentialsRefused => {
                    TransientFailure::NoAnswer
                }
                _ => TransientFailure::CloudAnswered { blamed },
            };
            match backoff(failures, budget, err.retry_after()) {
                Decision::RetryAt(not_before) => DeliveryOutcome::RetryLater {
                    journal_id: item.journal_id,
                    failure,
                    failed_at: now,
                    not_before,
                    code,
                    message: message.clone(),
                },
                // A terminal-local code (the cloud never sends it); the message names the
                // last error the cloud gave. Only failures blamed on the sale itself (see
                // [`blame_sale`]) use up attempts, so an outage never ends here. An operator
                // retry (`terminal outbox retry`) resets the attempts.
                Decision::GiveUp => DeliveryOutcome::NeedsAttention {
                    journal_id: item.journal_id,
                    code: TerminalCode::AttemptsExhausted,
                    message: format!(
                        "the cloud failed this sale {failures} times on its own while storing \
                         other sales; last error {code}: {message}"
                    ),
                },
            }
        })
        .collect()
}

/// Whether an answer lines up with what was sent: one result per event, in order.
fn check_results(items: &[OutboxItem], resp: &SalesEventsResponse) -> Result<(), String> {
    if resp.results.len() != items.len() {
        return Err(format!(
            "{} results for {} events",
            resp.results.len(),
            items.len()
        ));
    }
    for (item, r) in items.iter().zip(&resp.results) {
        if let Some(id) = r.local_event_id {
            if id != item.event.local_event_id {
                return Err(format!(
                    "result for local_event_id {id} where {} was sent",
                    item.event.local_event_id
                ));
            }
        }
    }
    Ok(())
}

/// Splits claimed items into requests the cloud accepts: at most 500 events and about
/// `max_body` bytes of JSON each (a single event larger than that goes alone, and the cloud's
/// 413 then marks it for attention). A sale the cloud already failed with an error of its own
/// goes alone, so that a failure it keeps causing can be told from one it shared
/// ([`blame_sale`]) and never holds other sales back.
pub fn split_requests(items: Vec<OutboxItem>, max_body: usize) -> Vec<Vec<OutboxItem>> {
    // `{"events":[` + `]}` plus commas
    const ENVELOPE: usize = 16;
    let (suspects, items): (Vec<OutboxItem>, Vec<OutboxItem>) = items
        .into_iter()
        .partition(|i| i.history.answered_failures > 0);
    let mut out: Vec<Vec<OutboxItem>> = suspects.into_iter().map(|i| vec![i]).collect();
    let mut current: Vec<OutboxItem> = Vec::new();
    let mut size = ENVELOPE;
    for item in items {
        let len = serde_json::to_vec(&item.event)
            .map(|v| v.len())
            .unwrap_or(max_body)
            + 1;
        if !current.is_empty() && (size + len > max_body || current.len() >= MAX_EVENTS_PER_REQUEST)
        {
            out.push(std::mem::take(&mut current));
            size = ENVELOPE;
        }
        size += len;
        current.push(item);
    }
    if !current.is_empty() {
        out.push(current);
    }
    out
}

/// The smallest request body the outbox shrinks to after a proxy's 413 (see
/// [`request_bytes_after`]).
pub const MIN_REQUEST_BYTES: usize = 16 * 1024;

/// How large the next requests may be after `err`, if it calls for smaller ones: a 413
/// *without* the cloud's error envelope is a proxy in front of the cloud whose body limit is
/// below the cloud's (nginx's `client_max_body_size`, a WAF's). Resending the same batch would
/// meet the same page for ever, so each such answer halves the request size, down to
/// [`MIN_REQUEST_BYTES`]; log2 steps find the proxy's limit. It lasts for the outbox's run (a
/// restart starts at the cloud's limit again). The cloud's own 413 (with its envelope) is a
/// sale too large for the cloud itself, handled by the refusal path, never by this.
pub fn request_bytes_after(err: &CloudError, current: usize) -> Option<usize> {
    match err {
        CloudError::Rejected {
            status: 413,
            code: None,
            ..
        } if current > MIN_REQUEST_BYTES => Some((current / 2).max(MIN_REQUEST_BYTES)),
        _ => None,
    }
}

/// Messages of the [`SalesOutbox`].
#[derive(Debug)]
pub enum OutboxMsg {
    /// Claim and send while there is capacity and work.
    Pump,
    /// Timer wake-up; ignored unless `generation` is current.
    Wake(u64),
    /// A sent request came back. `last` marks the final request of its claimed batch, which
    /// frees one concurrency slot.
    BatchDone {
        /// The sales that request carried.
        items: Vec<OutboxItem>,
        /// What the cloud answered.
        result: Result<SalesEventsResponse, CloudError>,
        /// Whether this was the batch's final request.
        last: bool,
    },
    /// The answer to an outage probe ([`CloudApi::probe`](crate::ports::CloudApi::probe)).
    ProbeDone(Result<(), CloudError>),
}

/// Live state: the in-flight slots and the tasks that hold them. Dropping the state (the
/// actor stopped or failed) aborts those tasks; their rows stay `in_flight` in the store and
/// are released by the next start.
pub struct OutboxState {
    ctx: Arc<SyncContext>,
    in_flight: usize,
    tasks: JoinSet<()>,
    generation: u64,
    /// While the cloud is away, no sale is sent: sales recorded meanwhile wait as `pending`
    /// instead of each paying a doomed request and a failure write.
    hold: Option<Hold>,
    /// The largest request body to build ([`request_bytes_after`]): the cloud's limit until a
    /// proxy answers 413.
    request_bytes: usize,
    /// When the cloud last stored a sale of ours: the evidence [`blame_sale`] needs before it
    /// pins a failure on one sale. Memory only: after a restart nothing is blamed until the
    /// cloud has stored something again, which errs on the side of never parking a sale.
    cloud_stored_at: Option<DateTime<Utc>>,
}

/// The outbox's pause while the cloud is away (no answer, throttled, or failing everything).
///
/// Invariant: while a hold stands, the only requests the outbox makes are probes, at most one
/// at a time, each after the backoff delay of the outage so far (capped at `backoff.cap`, or a
/// longer `Retry-After`). So after the cloud returns, the queue starts draining within one
/// backoff cap, however long the outage was; sooner if another actor hears from the cloud.
///
/// The hold lives on monotonic time ([`Clock::monotonic`](crate::ports::Clock::monotonic)) and
/// on the board's count of answers, never on the wall clock: a clock stepped back by hours
/// (NTP correcting a wrong RTC after boot) must not push the next probe hours away, nor hide
/// an answer that came after the hold began.
struct Hold {
    /// When the next probe is due (monotonic).
    until: Instant,
    /// When the hold began (monotonic), for the log line when it ends.
    since: Instant,
    /// The board's answer count when the hold began: any answer from the cloud after it
    /// (e.g. to the `CatalogSyncer`'s delta poll) ends the hold early.
    contacts: u64,
    /// Failed attempts in this outage so far (the failed batch's, then one per failed probe):
    /// paces the probes.
    failures: u32,
    /// A probe is on its way.
    probing: bool,
}

/// The actor that drains the sales journal.
pub struct SalesOutbox;

impl SalesOutbox {
    async fn pump(
        myself: &ActorRef<OutboxMsg>,
        state: &mut OutboxState,
    ) -> Result<(), ActorProcessingErr> {
        let ctx = state.ctx.clone();
        let cfg = &ctx.config;
        if let Some(hold) = &mut state.hold {
            let now = ctx.clock.monotonic();
            let cloud_back = ctx.board.contacts() != hold.contacts;
            if !cloud_back {
                Self::refresh_counts(&ctx).await?;
                if !hold.probing && now >= hold.until {
                    // Due: ask the cloud whether it is back, instead of spending sales on it.
                    hold.probing = true;
                    let cloud = ctx.cloud.clone();
                    let me = myself.clone();
                    state.tasks.spawn(async move {
                        let result = cloud.probe().await;
                        let _ = me.cast(OutboxMsg::ProbeDone(result));
                    });
                }
                let wait = hold.until.saturating_duration_since(now);
                if state.in_flight == 0 {
                    // The page shows a clock time: now on the wall clock plus the wait.
                    ctx.board.set_state(
                        ActorKind::SalesOutbox,
                        ActorState::Holding {
                            next_probe_at: backoff::retry_instant(ctx.now(), wait, Duration::ZERO),
                        },
                    );
                }
                if !hold.probing {
                    state.generation = state.generation.wrapping_add(1);
                    let g = state.generation;
                    drop(
                        myself
                            .send_after(wait.min(cfg.outbox_idle_poll), move || OutboxMsg::Wake(g)),
                    );
                }
                return Ok(());
            }
            tracing::info!(
                terminalId = %cfg.terminal_id, branchId = %cfg.branch_id,
                "cloud answered again; sending queued sales"
            );
            state.hold = None;
        }
        while state.in_flight < cfg.outbox_concurrency {
            let now = ctx.now();
            let limit = cfg.outbox_batch;
            let items = ctx.store_call(move |s| s.claim_batch(limit, now)).await?;
            if items.is_empty() {
                break;
            }
            state.in_flight += 1;
            let cloud = ctx.cloud.clone();
            let me = myself.clone();
            let request_bytes = state.request_bytes;
            state.tasks.spawn(async move {
                let requests = split_requests(items, request_bytes);
                let n = requests.len();
                for (i, items) in requests.into_iter().enumerate() {
                    let events: Vec<SaleEvent> = items.iter().map(|i| i.event.clone()).collect();
                    let attempt = items
                        .iter()
                        .map(|i| i.attempts)
                        .max()
                        .unwrap_or(0)
                        .saturating_add(1);
                    let result = cloud.post_events(&events, attempt).await;
                    let _ = me.cast(OutboxMsg::BatchDone {
                        items,
                        result,
                        last: i + 1 == n,
                    });
                }
            });
        }
        // Reap finished tasks so the set does not grow.
        while state.tasks.try_join_next().is_some() {}
        Self::refresh_counts(&ctx).await?;
        if state.in_flight > 0 {
            ctx.board.set_state(
                ActorKind::SalesOutbox,
                ActorState::Sending {
                    batches: state.in_flight,
                },
            );
        } else {
            let next_due = ctx.store_call(|s| s.next_due_at()).await?;
            let now = ctx.now();
            let mut delay = cfg.outbox_idle_poll;
            match next_due {
                Some(due) => {
                    let until = (due - now).to_std().unwrap_or(Duration::ZERO);
                    delay = delay.min(until);
                    ctx.board.set_state(
                        ActorKind::SalesOutbox,
                        ActorState::Waiting { next_retry_at: due },
                    );
                }
                None => ctx
                    .board
                    .set_state(ActorKind::SalesOutbox, ActorState::Idle),
            }
            state.generation = state.generation.wrapping_add(1);
            let g = state.generation;
            drop(myself.send_after(delay, move || OutboxMsg::Wake(g)));
        }
        Ok(())
    }

    async fn refresh_counts(ctx: &SyncContext) -> Result<(), ActorProcessingErr> {
        let counts = ctx.store_call(|s| s.outbox_counts()).await?;
        ctx.metrics
            .queued_events
            .set(counts.pending + counts.in_flight + counts.failed);
        ctx.board.set_outbox(counts);
        Ok(())
    }

    async fn batch_done(
        myself: &ActorRef<OutboxMsg>,
        state: &mut OutboxState,
        items: Vec<OutboxItem>,
        result: Result<SalesEventsResponse, CloudError>,
        last: bool,
    ) -> Result<(), ActorProcessingErr> {
        let ctx = state.ctx.clone();
        let cfg = &ctx.config;
        ctx.backoff
            .report_contact(result.as_ref().err().is_none_or(CloudError::cloud_answered));
        if let Err(e) = &result {
            ctx.board.set_error(ActorKind::SalesOutbox, e.to_string());
            if let Some(smaller) = request_bytes_after(e, state.request_bytes) {
                tracing::warn!(
                    terminalId = %cfg.terminal_id, branchId = %cfg.branch_id,
                    errorCode = %e.code(), requestBytes = smaller,
                    "a proxy refused the request's size (413 without the cloud's envelope); \
                     sending smaller requests"
                );
                state.request_bytes = smaller;
            }
        }
        // Ask Backoff once per distinct (failures, budget); the pure mapping then uses the
        // answers.
        let retry_after = result.as_ref().err().and_then(CloudError::retry_after);
        let now = ctx.now();
        let class = match &result {
            Err(e) => Some(e.class()),
            Ok(resp) => check_results(&items, resp)
                .is_err()
                .then_some(FailureClass::NoAnswer),
        };
        let mut decisions: BTreeMap<(u32, Budget), Decision> = BTreeMap::new();
        if let Some(class) = class.filter(|c| *c != FailureClass::Refused) {
            for item in &items {
                let (_, failures, budget) =
                    retry_pacing(item, class, items.len(), state.cloud_stored_at);
                if let std::collections::btree_map::Entry::Vacant(slot) =
                    decisions.entry((failures, budget))
                {
                    let d = backoff::ask(
                        ctx.backoff.get(),
                        &cfg.backoff,
                        failures,
                        budget,
                        retry_after,
                        now,
                    )
                    .await;
                    slot.insert(d);
                }
            }
        }
        let mut lookup = |failures: u32, budget: Budget, ra: Option<Duration>| {
            decisions
                .get(&(failures, budget))
                .copied()
                .unwrap_or_else(|| backoff::decide(&cfg.backoff, failures, budget, ra, 1.0, now))
        };
        let outcomes = outcomes_for(&items, result, state.cloud_stored_at, now, &mut lookup);
        Self::log_outcomes(cfg, &items, &outcomes);
        if outcomes
            .iter()
            .any(|o| matches!(o, DeliveryOutcome::Synced { .. }))
        {
            state.cloud_stored_at = Some(now);
        }
        let mono = ctx.clock.monotonic();
        state.hold = hold_after(&outcomes).map(|until| {
            // The wall-clock retry instant was computed from `now` a moment ago: only the
            // distance counts, measured from here on the monotonic clock.
            let until = later(mono, (until - now).to_std().unwrap_or(Duration::ZERO));
            let failures = items
                .iter()
                .map(|i| i.attempts.saturating_add(1))
                .max()
                .unwrap_or(1);
            match state.hold.take() {
                // Another batch of the same outage: keep its start and pace.
                Some(h) => Hold {
                    until: until.max(h.until),
                    failures: failures.max(h.failures),
                    ..h
                },
                None => Hold {
                    until,
                    since: mono,
                    contacts: ctx.board.contacts(),
                    failures,
                    probing: false,
                },
            }
        });
        let (mut synced, mut retries) = (0u64, 0u64);
        for o in &outcomes {
            match o {
                DeliveryOutcome::Synced { .. } => synced += 1,
                DeliveryOutcome::RetryLater { .. } => retries += 1,
                DeliveryOutcome::NeedsAttention { .. } => {}
            }
        }
        ctx.store_call(move |s| s.record_outcomes(&outcomes))
            .await?;
        ctx.metrics.synced_events.inc_by(synced);
        ctx.metrics.outbox_retries.inc_by(retries);
        if last {
            state.in_flight = state.in_flight.saturating_sub(1);
        }
        Self::pump(myself, state).await
    }

    /// A probe came back: the cloud is back (lift the hold, send), or still away (probe
    /// again after the next backoff delay of this outage; never given up).
    async fn probe_done(
        myself: &ActorRef<OutboxMsg>,
        state: &mut OutboxState,
        result: Result<(), CloudError>,
    ) -> Result<(), ActorProcessingErr> {
        let ctx = state.ctx.clone();
        let cfg = &ctx.config;
        if let Some(hold) = &mut state.hold {
            hold.probing = false;
            match &result {
                Ok(()) => {
                    ctx.backoff.report_contact(true);
                    let away = u64::try_from(
                        ctx.clock
                            .monotonic()
                            .saturating_duration_since(hold.since)
                            .as_millis(),
                    )
                    .unwrap_or(u64::MAX);
                    tracing::info!(
                        terminalId = %cfg.terminal_id, branchId = %cfg.branch_id,
                        away_ms = away, "cloud is back; sending queued sales"
                    );
                    state.hold = None;
                }
                Err(e) => {
                    ctx.backoff.report_contact(e.cloud_answered());
                    hold.failures = hold.failures.saturating_add(1);
                    let now = ctx.now();
                    let wait = match backoff::ask(
                        ctx.backoff.get(),
                        &cfg.backoff,
                        hold.failures,
                        Budget::Unbounded,
                        e.retry_after(),
                        now,
                    )
                    .await
                    {
                        Decision::RetryAt(t) => (t - now).to_std().unwrap_or(Duration::ZERO),
                        // Unbounded budgets never give up; keep the capped pace regardless.
                        Decision::GiveUp => cfg.backoff.cap,
                    };
                    hold.until = later(ctx.clock.monotonic(), wait);
                    tracing::debug!(
                        terminalId = %cfg.terminal_id, branchId = %cfg.branch_id,
                        errorCode = %e.code(), "cloud still away"
                    );
                }
            }
        }
        Self::pump(myself, state).await
    }

    fn log_outcomes(
        cfg: &crate::context::EngineConfig,
        items: &[OutboxItem],
        outcomes: &[DeliveryOutcome],
    ) {
        let first = items.first().map(|i| i.event.local_event_id).unwrap_or(0);
        let last = items.last().map(|i| i.event.local_event_id).unwrap_or(0);
        let attempt = items.iter().map(|i| i.attempts + 1).max().unwrap_or(1);
        let mut retry_code: Option<TerminalCode> = None;
        let mut synced = 0usize;
        for (item, o) in items.iter().zip(outcomes) {
            match o {
                DeliveryOutcome::Synced { .. } => synced += 1,
                DeliveryOutcome::NeedsAttention { code, message, .. } => tracing::warn!(
                    terminalId = %cfg.terminal_id, branchId = %cfg.branch_id,
                    eventId = item.event.local_event_id, syncAttempt = item.attempts + 1,
                    errorCode = %code, %message, "sale needs attention"
                ),
                DeliveryOutcome::RetryLater { code, .. } => retry_code = Some(*code),
            }
        }
        if let Some(code) = retry_code {
            tracing::warn!(
                terminalId = %cfg.terminal_id, branchId = %cfg.branch_id,
                eventId = %format!("{first}..{last}"), syncAttempt = attempt,
                errorCode = %code, "sales batch will be retried"
            );
        }
        if synced > 0 {
            tracing::info!(
                terminalId = %cfg.terminal_id, branchId = %cfg.branch_id,
                eventId = %format!("{first}..{last}"), syncAttempt = attempt,
                synced, "sales delivered"
            );
        }
    }
}

/// `at + wait` without the panic `Instant + Duration` has on overflow (delays are at most
/// `backoff::MAX_DELAY`, but the rule should not hang on that).
fn later(at: Instant, wait: Duration) -> Instant {
    at.checked_add(wait.min(backoff::MAX_DELAY)).unwrap_or(at)
}

/// Whether a batch's outcomes put the outbox on hold, and until when the first probe waits:
/// the earliest retry time of the failures that are the cloud's trouble (no answer, or an
/// error not blamed on the sale). `None` (claim freely) after any other answer: a sale that
/// keeps failing on its own does not hold the others back.
pub fn hold_after(outcomes: &[DeliveryOutcome]) -> Option<DateTime<Utc>> {
    outcomes
        .iter()
        .filter_map(|o| match o {
            DeliveryOutcome::RetryLater {
                not_before,
                failure,
                ..
            } if *failure != (TransientFailure::CloudAnswered { blamed: true }) => {
                Some(*not_before)
            }
            _ => None,
        })
        .min()
}

impl Actor for SalesOutbox {
    type Msg = OutboxMsg;
    type State = OutboxState;
    type Arguments = Arc<SyncContext>;

    async fn pre_start(
        &self,
        _myself: ActorRef<Self::Msg>,
        ctx: Arc<SyncContext>,
    ) -> Result<Self::State, ActorProcessingErr> {
        ctx.board
            .set_state(ActorKind::SalesOutbox, ActorState::Starting);
        Ok(OutboxState {
            ctx,
            in_flight: 0,
            tasks: JoinSet::new(),
            generation: 0,
            hold: None,
            request_bytes: MAX_BODY_BYTES,
            cloud_stored_at: None,
        })
    }

    async fn post_start(
        &self,
        myself: ActorRef<Self::Msg>,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        // Crash recovery: whatever a previous run left in flight goes back to pending (failures
        // here are supervised, unlike in pre_start).
        let ctx = state.ctx.clone();
        let released = ctx.store_call(|s| s.release_in_flight()).await?;
        if released > 0 {
            tracing::info!(
                terminalId = %ctx.config.terminal_id, branchId = %ctx.config.branch_id,
                released, "released sales left in flight by a previous run"
            );
        }
        Self::pump(&myself, state).await
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        message: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match message {
            OutboxMsg::Pump => Self::pump(&myself, state).await,
            OutboxMsg::Wake(g) if g == state.generation => Self::pump(&myself, state).await,
            OutboxMsg::Wake(_) => Ok(()),
            OutboxMsg::BatchDone {
                items,
                result,
                last,
            } => Self::batch_done(&myself, state, items, result, last).await,
            OutboxMsg::ProbeDone(result) => Self::probe_done(&myself, state, result).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::{TimeZone, Utc};
    use possync_protocol::{
        EventResult, EventType, Payment, PaymentMethod, SaleLine, SalePayload, Totals,
    };
    use uuid::Uuid;

    fn item(id: i64, attempts: u32) -> OutboxItem {
        OutboxItem {
            journal_id: id * 10,
            attempts,
            history: FailureHistory::default(),
            event: SaleEvent {
                terminal_id: Uuid::nil(),
                pos_id: Uuid::nil(),
                local_event_id: id,
                branch_id: "b1".into(),
                event_type: EventType::Sale,
                occurred_at: Utc
                    .with_ymd_and_hms(2026, 11, 25, 10, 0, 0)
                    .single()
                    .expect("time"),
                payload: SalePayload {
                    receipt_no: format!("R{id}"),
                    currency: "EUR".into(),
                    lines: vec![SaleLine {
                        product_id: "p".into(),
                        sku: "s".into(),
                        name: "n".into(),
                        qty: 1,
                        unit_price_minor: 100,
                        discount_minor: 0,
                        tax_minor: 0,
                        total_minor: 100,
                    }],
                    totals: Totals {
                        subtotal_minor: 100,
                        tax_minor: 0,
                        total_minor: 100,
                    },
                    payments: vec![Payment {
                        method: PaymentMethod::Cash,
                        amount_minor: 100,
                    }],
                },
                chain_hash: None,
            },
        }
    }

    #[test]
    fn a_transient_failure_holds_claims_until_the_earliest_retry() {
        let t = |s: i64| {
            Utc.timestamp_opt(1_800_000_000 + s, 0)
                .single()
                .expect("time")
        };
        let retry = |id: i64, at: i64| DeliveryOutcome::RetryLater {
            journal_id: id,
            failure: TransientFailure::NoAnswer,
            failed_at: t(0),
            not_before: t(at),
            code: TerminalCode::Network,
            message: "down".into(),
        };
        let synced = DeliveryOutcome::Synced {
            journal_id: 3,
            cloud_event_id: None,
            duplicate: false,
        };
        assert_eq!(hold_after(&[retry(1, 9), retry(2, 4)]), Some(t(4)));
        assert_eq!(hold_after(std::slice::from_ref(&synced)), None);
        // attempts exhausted everywhere: nothing left to wait for
        let gave_up = DeliveryOutcome::NeedsAttention {
            journal_id: 1,
            code: TerminalCode::AttemptsExhausted,
            message: "gave up".into(),
        };
        assert_eq!(hold_after(&[gave_up]), None);
        // a failure blamed on one sale does not hold the others back; an unblamed cloud
        // error does
        let answered = |blamed| DeliveryOutcome::RetryLater {
            journal_id: 5,
            failure: TransientFailure::CloudAnswered { blamed },
            failed_at: t(0),
            not_before: t(7),
            code: TerminalCode::STORAGE_FAILED,
            message: "insert failed".into(),
        };
        assert_eq!(hold_after(&[answered(true)]), None);
        assert_eq!(hold_after(&[answered(false)]), Some(t(7)));
    }

    fn result(id: i64, status: EventStatus) -> EventResult {
        EventResult {
            local_event_id: Some(id),
            status,
            code: match status {
                EventStatus::Conflict | EventStatus::Duplicate => {
                    Some(ErrorCode::PosSyncEventDuplicate)
                }
                EventStatus::Rejected => Some(ErrorCode::PosSyncEventInvalid),
                EventStatus::Accepted => None,
            },
            cloud_event_id: Some(Uuid::nil()),
            message: None,
        }
    }

    fn t0() -> chrono::DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 11, 25, 12, 0, 0)
            .single()
            .expect("time")
    }

    fn retry_in(secs: i64) -> impl FnMut(u32, Budget, Option<Duration>) -> Decision {
        move |_, _, _| Decision::RetryAt(t0() + chrono::Duration::seconds(secs))
    }

    #[test]
    fn per_event_statuses_map_to_journal_states() {
        let items = vec![item(1, 0), item(2, 0), item(3, 0), item(4, 0)];
        let resp = SalesEventsResponse {
            results: vec![
                result(1, EventStatus::Accepted),
                result(2, EventStatus::Duplicate),
                result(3, EventStatus::Conflict),
                result(4, EventStatus::Rejected),
            ],
        };
        let out = outcomes_for(&items, Ok(resp), None, t0(), &mut retry_in(1));
        assert!(matches!(
            &out[0],
            DeliveryOutcome::Synced {
                journal_id: 10,
                duplicate: false,
                ..
            }
        ));
        assert!(matches!(
            &out[1],
            DeliveryOutcome::Synced {
                journal_id: 20,
                duplicate: true,
                ..
            }
        ));
        assert!(
            matches!(&out[2], DeliveryOutcome::NeedsAttention { code, .. } if *code == ErrorCode::PosSyncEventDuplicate)
        );
        assert!(
            matches!(&out[3], DeliveryOutcome::NeedsAttention { code, .. } if *code == ErrorCode::PosSyncEventInvalid)
        );
    }

    #[test]
    fn transient_failures_retry_at_the_backoff_time_with_retry_after_passed_on() {
        let items = vec![item(1, 0), item(2, 3)];
        let err = CloudError::Rejected {
            status: 429,
            code: Some(ErrorCode::PosSyncRateLimited),
            message: "slow down".into(),
            retry_after: Some(Duration::from_secs(30)),
            reason: None,
        };
        let mut asked = Vec::new();
        let mut backoff = |f: u32, b: Budget, ra: Option<Duration>| {
            assert_eq!(b, Budget::Unbounded, "a throttle is never the sale's fault");
            asked.push((f, ra));
            Decision::RetryAt(t0() + chrono::Duration::seconds(30))
        };
        let out = outcomes_for(&items, Err(err), None, t0(), &mut backoff);
        assert_eq!(
            asked,
            vec![
                (1, Some(Duration::from_secs(30))),
                (4, Some(Duration::from_secs(30)))
            ]
        );
        for o in out {
            assert!(
                matches!(o, DeliveryOutcome::RetryLater { not_before, ref code, .. }
                if not_before == t0() + chrono::Duration::seconds(30) && *code == ErrorCode::PosSyncRateLimited)
            );
        }
        let out = outcomes_for(
            &items,
            Err(CloudError::Unreachable("reset".into())),
            None,
            t0(),
            &mut retry_in(2),
        );
        assert!(
            matches!(&out[0], DeliveryOutcome::RetryLater { code, .. } if *code == TerminalCode::Network)
        );
    }

    fn storage_failed() -> CloudError {
        CloudError::Rejected {
            status: 503,
            code: Some(ErrorCode::PosSyncStorageFailed),
            message: "insert failed".into(),
            retry_after: None,
            reason: None,
        }
    }

    /// A real policy with a small budget, so any budgeted failure past it gives up.
    fn tight_backoff(
        now: chrono::DateTime<Utc>,
    ) -> impl FnMut(u32, Budget, Option<Duration>) -> Decision {
        let policy = crate::backoff::BackoffPolicy {
            base: Duration::from_millis(10),
            cap: Duration::from_millis(100),
            max_attempts: 3,
        };
        move |f, b, ra| backoff::decide(&policy, f, b, ra, 0.5, now)
    }

    #[test]
    fn an_unanswered_sale_is_never_given_up_however_many_attempts() {
        let items = vec![item(1, 1_000)];
        let out = outcomes_for(
            &items,
            Err(CloudError::Unreachable("down".into())),
            Some(t0()),
            t0(),
            &mut tight_backoff(t0()),
        );
        assert!(matches!(
            &out[0],
            DeliveryOutcome::RetryLater { failure: TransientFailure::NoAnswer, code, .. } if *code == TerminalCode::Network
        ));
    }

    #[test]
    fn a_sale_failing_alone_while_others_are_stored_uses_up_its_attempts() {
        let earlier = t0() - chrono::Duration::seconds(60);
        let mut suspect = item(1, 5);
        suspect.history = FailureHistory {
            answered_failures: 3,
            sale_failures: 2,
            last_failed_at: Some(earlier),
        };
        let stored_since = Some(earlier + chrono::Duration::seconds(1));
        let out = outcomes_for(
            &[suspect.clone()],
            Err(storage_failed()),
            stored_since,
            t0(),
            &mut tight_backoff(t0()),
        );
        assert!(
            matches!(&out[0], DeliveryOutcome::NeedsAttention { code, message, .. }
            if *code == TerminalCode::AttemptsExhausted && message.contains("3 times") && message.contains(ErrorCode::PosSyncStorageFailed.as_str())),
            "{out:?}"
        );
        // the same failure while the cloud stored nothing since: the cloud's trouble
        let out = outcomes_for(
            &[suspect.clone()],
            Err(storage_failed()),
            Some(earlier - chrono::Duration::seconds(1)),
            t0(),
            &mut tight_backoff(t0()),
        );
        assert!(matches!(
            &out[0],
            DeliveryOutcome::RetryLater {
                failure: TransientFailure::CloudAnswered { blamed: false },
                ..
            }
        ));
        // or in company: not pinned on anyone
        let out = outcomes_for(
            &[suspect, item(2, 0)],
            Err(storage_failed()),
            stored_since,
            t0(),
            &mut tight_backoff(t0()),
        );
        assert!(out.iter().all(|o| matches!(
            o,
            DeliveryOutcome::RetryLater {
                failure: TransientFailure::CloudAnswered { blamed: false },
                ..
            }
        )));
    }

    #[test]
    fn failure_classes() {
        let rejected = |status, code| CloudError::Rejected {
            status,
            code,
            message: String::new(),
            retry_after: None,
            reason: None,
        };
        use FailureClass::*;
        assert_eq!(CloudError::Unreachable("x".into()).class(), NoAnswer);
        assert_eq!(CloudError::BadResponse("portal".into()).class(), NoAnswer);
        for s in [502, 503, 504] {
            assert_eq!(rejected(s, None).class(), NoAnswer, "proxy {s}");
        }
        assert_eq!(
            rejected(429, Some(ErrorCode::PosSyncRateLimited)).class(),
            NoAnswer
        );
        assert_eq!(rejected(429, None).class(), NoAnswer);
        assert_eq!(rejected(408, None).class(), NoAnswer);
        assert_eq!(rejected(500, None).class(), CloudTrouble);
        assert_eq!(storage_failed().class(), CloudTrouble);
        assert_eq!(
            rejected(400, Some(ErrorCode::PosSyncEventInvalid)).class(),
            Refused
        );
        assert_eq!(
            rejected(401, Some(ErrorCode::PosSyncUnauthorized)).class(),
            CredentialsRefused
        );
        assert_eq!(
            rejected(403, Some(ErrorCode::PosSyncUnauthorized)).class(),
            Refused
        );
        // Without the cloud's envelope, a 4xx is a middlebox's page (WAF, CDN, nginx): no
        // answer, never a refusal that would park the batch. 401 stays a credentials refusal.
        for s in [400, 403, 404, 405, 410, 413, 422] {
            assert_eq!(rejected(s, None).class(), NoAnswer, "proxy {s}");
        }
        assert_eq!(rejected(401, None).class(), CredentialsRefused);
        assert_eq!(
            rejected(413, Some(ErrorCode::PosRequestInvalid)).class(),
            Refused
        );
    }

    #[test]
    fn only_a_proxy_s_413_shrinks_the_requests_by_halves_down_to_the_floor() {
        let page = |status: u16, code: Option<ErrorCode>| CloudError::Rejected {
            status,
            code,
            message: "<html>413</html>".into(),
            retry_after: None,
            reason: None,
        };
        let proxy = page(413, None);
        let mut size = MAX_BODY_BYTES;
        let mut steps = 0;
        while let Some(next) = request_bytes_after(&proxy, size) {
            assert!(next < size && next >= MIN_REQUEST_BYTES);
            size = next;
            steps += 1;
        }
        assert_eq!(size, MIN_REQUEST_BYTES);
        assert_eq!(steps, 6, "1 MiB to 16 KiB in halves");
        // The cloud's own 413 (a sale too large for it) and other statuses change nothing.
        assert_eq!(
            request_bytes_after(
                &page(413, Some(ErrorCode::PosRequestInvalid)),
                MAX_BODY_BYTES
            ),
            None
        );
        assert_eq!(request_bytes_after(&page(403, None), MAX_BODY_BYTES), None);
    }

    #[test]
    fn a_proxy_error_page_parks_nothing() {
        let items = vec![item(1, 0), item(2, 0), item(3, 0)];
        for status in [400, 403, 404, 413] {
            let err = CloudError::Rejected {
                status,
                code: None,
                message: "<html><body>403 Forbidden</body></html>".into(),
                retry_after: None,
                reason: None,
            };
            let out = outcomes_for(&items, Err(err), None, t0(), &mut retry_in(10));
            assert_eq!(out.len(), 3);
            assert!(
                out.iter().all(|o| matches!(
                    o,
                    DeliveryOutcome::RetryLater {
                        failure: TransientFailure::NoAnswer,
                        code,
                        ..
                    } if *code == TerminalCode::Http(status)
                )),
                "{status}: {out:?}"
            );
            assert!(hold_after(&out).is_some(), "{status}: the queue holds");
        }
    }

    proptest::proptest! {
        /// The outage rule: whatever the history, attempts and evidence, a failure without an
        /// answer from the cloud (or a refusal of the till's credentials: a revoked or rotated
        /// token) never sends a sale to needs attention, and never holds it
        /// longer than the cap (or the server's `Retry-After`).
        #[test]
        fn no_answer_never_exhausts_a_sale(
            n in 1usize..20,
            attempts in 0u32..100_000,
            answered in 0u32..50,
            blamed in 0u32..50,
            failed_ago in proptest::option::of(0i64..100_000),
            stored_ago in proptest::option::of(0i64..100_000),
            kind in 0u8..7,
            retry_after_s in proptest::option::of(0u64..600),
        ) {
            let err = match kind {
                0 => CloudError::Unreachable("connection refused".into()),
                1 => CloudError::BadResponse("captive portal".into()),
                2 => CloudError::Rejected { status: 502, code: None, message: "bad gateway".into(), retry_after: None, reason: None },
                3 => CloudError::Rejected { status: 504, code: None, message: "gateway timeout".into(), retry_after: None, reason: None },
                4 => CloudError::Rejected { status: 429, code: Some(ErrorCode::PosSyncRateLimited), message: "slow".into(), retry_after: retry_after_s.map(Duration::from_secs), reason: None },
                5 => CloudError::Rejected { status: 401, code: Some(ErrorCode::PosSyncUnauthorized), message: "revoked token".into(), retry_after: None, reason: None },
                _ => CloudError::Rejected { status: 503, code: None, message: "unavailable".into(), retry_after: retry_after_s.map(Duration::from_secs), reason: None },
            };
            let ra = err.retry_after();
            let items: Vec<OutboxItem> = (1..=n as i64).map(|i| {
                let mut it = item(i, attempts);
                it.history = FailureHistory {
                    answered_failures: answered,
                    sale_failures: blamed,
                    last_failed_at: failed_ago.map(|s| t0() - chrono::Duration::seconds(s)),
                };
                it
            }).collect();
            let stored = stored_ago.map(|s| t0() - chrono::Duration::seconds(s));
            let out = outcomes_for(&items, Err(err), stored, t0(), &mut tight_backoff(t0()));
            proptest::prop_assert_eq!(out.len(), n);
            for o in &out {
                match o {
                    DeliveryOutcome::RetryLater { failure, not_before, .. } => {
                        proptest::prop_assert_eq!(*failure, TransientFailure::NoAnswer);
                        let limit = Duration::from_millis(100).max(ra.unwrap_or_default());
                        proptest::prop_assert!(*not_before <= t0() + chrono::Duration::from_std(limit).expect("small"));
                    }
                    other => proptest::prop_assert!(false, "unexpected outcome {:?}", other),
                }
            }
            proptest::prop_assert!(hold_after(&out).is_some());
        }
    }

    #[test]
    fn a_sale_the_cloud_failed_goes_alone() {
        let mut items: Vec<OutboxItem> = (1..=6).map(|i| item(i, 0)).collect();
        items[2].history.answered_failures = 1;
        let parts = split_requests(items, MAX_BODY_BYTES);
        assert_eq!(parts.len(), 2);
        assert_eq!(parts[0].len(), 1);
        assert_eq!(parts[0][0].event.local_event_id, 3);
        assert_eq!(parts[1].len(), 5);
    }

    #[test]
    fn non_retryable_refusal_marks_the_whole_batch() {
        let items = vec![item(1, 0), item(2, 0)];
        let err = CloudError::Rejected {
            status: 403,
            code: Some(ErrorCode::PosSyncUnauthorized),
            message: "other branch".into(),
            retry_after: None,
            reason: None,
        };
        let out = outcomes_for(&items, Err(err), None, t0(), &mut |_, _, _| {
            panic!("no backoff for a refusal")
        });
        assert_eq!(out.len(), 2);
        assert!(out.iter().all(|o| matches!(o, DeliveryOutcome::NeedsAttention { code, .. } if *code == ErrorCode::PosSyncUnauthorized)));
    }

    #[test]
    fn wrong_result_count_or_order_is_retried_not_trusted() {
        let items = vec![item(1, 0), item(2, 0)];
        let short = SalesEventsResponse {
            results: vec![result(1, EventStatus::Accepted)],
        };
        let out = outcomes_for(&items, Ok(short), None, t0(), &mut retry_in(5));
        assert!(out.iter().all(
            |o| matches!(o, DeliveryOutcome::RetryLater { code, .. } if *code == TerminalCode::BadResponse)
        ));
        let swapped = SalesEventsResponse {
            results: vec![
                result(2, EventStatus::Accepted),
                result(1, EventStatus::Accepted),
            ],
        };
        let out = outcomes_for(&items, Ok(swapped), None, t0(), &mut retry_in(5));
        assert!(out
            .iter()
            .all(|o| matches!(o, DeliveryOutcome::RetryLater { .. })));
    }

    proptest::proptest! {
        #[test]
        fn every_claimed_item_gets_exactly_one_outcome_in_order(
            statuses in proptest::collection::vec(0u8..4, 1..30),
            drop_one in proptest::bool::ANY,
            attempts in 0u32..20,
        ) {
            let items: Vec<OutboxItem> = (1..=statuses.len() as i64).map(|i| item(i, attempts)).collect();
            let mut results: Vec<EventResult> = statuses.iter().zip(1i64..).map(|(s, id)| {
                result(id, match s { 0 => EventStatus::Accepted, 1 => EventStatus::Duplicate, 2 => EventStatus::Conflict, _ => EventStatus::Rejected })
            }).collect();
            if drop_one {
                results.pop();
            }
            let out = outcomes_for(&items, Ok(SalesEventsResponse { results }), None, t0(), &mut retry_in(1));
            proptest::prop_assert_eq!(out.len(), items.len());
            for (o, i) in out.iter().zip(&items) {
                let id = match o {
                    DeliveryOutcome::Synced { journal_id, .. }
                    | DeliveryOutcome::NeedsAttention { journal_id, .. }
                    | DeliveryOutcome::RetryLater { journal_id, .. } => *journal_id,
                };
                proptest::prop_assert_eq!(id, i.journal_id);
                // a short answer is never trusted for any item
                proptest::prop_assert_eq!(drop_one, matches!(o, DeliveryOutcome::RetryLater { .. }));
            }
        }
    }

    #[test]
    fn requests_respect_body_and_count_limits() {
        let items: Vec<OutboxItem> = (1..=10).map(|i| item(i, 0)).collect();
        let one = serde_json::to_vec(&items[0].event).expect("json").len();
        let parts = split_requests(items.clone(), one * 3 + 40);
        assert!(parts.len() >= 4);
        assert_eq!(parts.iter().map(Vec::len).sum::<usize>(), 10);
        let ids: Vec<i64> = parts
            .iter()
            .flatten()
            .map(|i| i.event.local_event_id)
            .collect();
        assert_eq!(ids, (1..=10).collect::<Vec<_>>());
        assert_eq!(split_requests(items, MAX_BODY_BYTES).len(), 1);
        let many: Vec<OutboxItem> = (1..=501).map(|i| item(i, 0)).collect();
        assert_eq!(split_requests(many, usize::MAX / 2).len(), 2);
    }
}
