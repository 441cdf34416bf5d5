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

use crate::backoff::{self, Decision};
use crate::engine::SyncContext;
use crate::ports::{CloudError, DeliveryOutcome, OutboxItem};
use crate::status::ActorKind;

/// Journal code for a sale whose automatic retries are used up. It is a terminal-local code
/// (the cloud never sends it); the message names the last error the cloud or network gave.
/// An operator retry (`terminal outbox retry`) resets the attempts.
pub const ATTEMPTS_EXHAUSTED: &str = "POS_SYNC_ATTEMPTS_EXHAUSTED";

/// Maps the answer to one request onto one outcome per claimed item.
///
/// - 200 with one result per item, in order: `accepted`/`duplicate` → synced; `conflict` /
///   `rejected` → needs attention with the cloud's code and message.
/// - 200 with the wrong number of results, or results naming other events: the answer cannot
///   be trusted, so it is treated like a transient failure (the ledger makes a resend safe).
/// - Transient failure (network, 429, 5xx): retry at the time `backoff(failures, retry_after)`
///   decides, or needs attention once it gives up.
/// - Any other whole-request refusal (400, 401, 403, 413 …): needs attention for every item;
///   resending the same request unchanged cannot succeed.
pub fn outcomes_for(
    items: &[OutboxItem],
    result: Result<SalesEventsResponse, CloudError>,
    backoff: &mut dyn FnMut(u32, Option<Duration>) -> Decision,
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
                                code: r.code.unwrap_or(default_code).as_str().to_string(),
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
    let code = err.code_str();
    let message = err.to_string();
    if !err.can_retry() {
        return items
            .iter()
            .map(|item| DeliveryOutcome::NeedsAttention {
                journal_id: item.journal_id,
                code: code.clone(),
                message: message.clone(),
            })
            .collect();
    }
    items
        .iter()
        .map(|item| {
            let failures = item.attempts.saturating_add(1);
            match backoff(failures, err.retry_after()) {
                Decision::RetryAt(not_before) => DeliveryOutcome::RetryLater {
                    journal_id: item.journal_id,
                    not_before,
                    code: code.clone(),
                    message: message.clone(),
                },
                Decision::GiveUp => DeliveryOutcome::NeedsAttention {
                    journal_id: item.journal_id,
                    code: ATTEMPTS_EXHAUSTED.to_string(),
                    message: format!(
                        "gave up after {failures} attempts; last error {code}: {message}"
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
/// 413 then marks it for attention).
pub fn split_requests(items: Vec<OutboxItem>, max_body: usize) -> Vec<Vec<OutboxItem>> {
    // `{"events":[` + `]}` plus commas
    const ENVELOPE: usize = 16;
    let mut out: Vec<Vec<OutboxItem>> = Vec::new();
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
}

/// Live state: the in-flight slots and the tasks that hold them. Dropping the state (the
/// actor stopped or failed) aborts those tasks; their rows stay `in_flight` in the store and
/// are released by the next start.
pub struct OutboxState {
    ctx: Arc<SyncContext>,
    in_flight: usize,
    tasks: JoinSet<()>,
    generation: u64,
    /// After a transient failure (cloud unreachable, 5xx, 429), no new claims until the hold
    /// ends: sales recorded meanwhile wait as `pending` instead of each paying a doomed request
    /// and a failure write. Cleared by the next answer that is not a transient failure.
    hold: Option<Hold>,
}

/// A pause in claiming after a transient failure.
struct Hold {
    /// The earliest retry time of the failed batch.
    until: chrono::DateTime<chrono::Utc>,
    /// For a hold caused by an unreachable cloud: when it began. Any answer from the cloud
    /// after that (e.g. to the `CatalogSyncer`'s delta poll) means it is back, and lifts the
    /// hold early so queued sales flush without waiting out the backoff.
    since_unreachable: Option<chrono::DateTime<chrono::Utc>>,
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
        if let Some(hold) = &state.hold {
            let (until, now) = (hold.until, ctx.now());
            let cloud_back = hold.since_unreachable.is_some_and(|since| {
                ctx.board
                    .snapshot()
                    .last_contact_at
                    .is_some_and(|at| at > since)
            });
            if now < until && !cloud_back {
                Self::refresh_counts(&ctx).await?;
                if state.in_flight == 0 {
                    ctx.board.set_state(
                        ActorKind::SalesOutbox,
                        format!(
                            "backing off until {}",
                            until.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
                        ),
                    );
                }
                let wait = (until - now).to_std().unwrap_or(Duration::ZERO);
                state.generation = state.generation.wrapping_add(1);
                let g = state.generation;
                drop(myself.send_after(wait.min(cfg.outbox_idle_poll), move || OutboxMsg::Wake(g)));
                return Ok(());
            }
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
            state.tasks.spawn(async move {
                let requests = split_requests(items, MAX_BODY_BYTES);
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
                format!("sending ({} batches in flight)", state.in_flight),
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
                        format!(
                            "waiting (next retry at {})",
                            due.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
                        ),
                    );
                }
                None => ctx.board.set_state(ActorKind::SalesOutbox, "idle"),
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
        let unreachable = matches!(&result, Err(CloudError::Unreachable(_)));
        ctx.backoff.report_contact(!unreachable);
        if let Err(e) = &result {
            ctx.board.set_error(ActorKind::SalesOutbox, e.to_string());
        }
        // Ask Backoff once per distinct failure count; the pure mapping then uses the answers.
        let retry_after = result.as_ref().err().and_then(CloudError::retry_after);
        let now = ctx.now();
        let mut decisions: BTreeMap<u32, Decision> = BTreeMap::new();
        let needs_retry = match &result {
            Err(e) => e.can_retry(),
            Ok(resp) => check_results(&items, resp).is_err(),
        };
        let distinct: std::collections::BTreeSet<u32> = if needs_retry {
            items.iter().map(|i| i.attempts.saturating_add(1)).collect()
        } else {
            Default::default()
        };
        for failures in distinct {
            let d = backoff::ask(ctx.backoff.get(), &cfg.backoff, failures, retry_after, now).await;
            decisions.insert(failures, d);
        }
        let mut lookup = |failures: u32, ra: Option<Duration>| {
            decisions
                .get(&failures)
                .copied()
                .unwrap_or_else(|| backoff::decide(&cfg.backoff, failures, ra, 1.0, now))
        };
        let outcomes = outcomes_for(&items, result, &mut lookup);
        Self::log_outcomes(cfg, &items, &outcomes);
        state.hold = hold_after(&outcomes).map(|until| Hold {
            until,
            since_unreachable: unreachable.then_some(now),
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

    fn log_outcomes(
        cfg: &crate::engine::EngineConfig,
        items: &[OutboxItem],
        outcomes: &[DeliveryOutcome],
    ) {
        let first = items.first().map(|i| i.event.local_event_id).unwrap_or(0);
        let last = items.last().map(|i| i.event.local_event_id).unwrap_or(0);
        let attempt = items.iter().map(|i| i.attempts + 1).max().unwrap_or(1);
        let mut retry_code: Option<&str> = None;
        let mut synced = 0usize;
        for (item, o) in items.iter().zip(outcomes) {
            match o {
                DeliveryOutcome::Synced { .. } => synced += 1,
                DeliveryOutcome::NeedsAttention { code, message, .. } => tracing::warn!(
                    terminalId = %cfg.terminal_id, branchId = %cfg.branch_id,
                    eventId = item.event.local_event_id, syncAttempt = item.attempts + 1,
                    errorCode = %code, %message, "sale needs attention"
                ),
                DeliveryOutcome::RetryLater { code, .. } => retry_code = Some(code.as_str()),
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

/// When the outbox may claim again after a batch: the earliest retry time of a transiently
/// failed batch (only a transient failure yields `RetryLater`), or `None` (claim freely) after
/// any other answer.
pub fn hold_after(outcomes: &[DeliveryOutcome]) -> Option<chrono::DateTime<chrono::Utc>> {
    outcomes
        .iter()
        .filter_map(|o| match o {
            DeliveryOutcome::RetryLater { not_before, .. } => Some(*not_before),
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
        ctx.board.set_state(ActorKind::SalesOutbox, "starting");
        Ok(OutboxState {
            ctx,
            in_flight: 0,
            tasks: JoinSet::new(),
            generation: 0,
            hold: None,
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
            not_before: t(at),
            code: "NETWORK".into(),
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
            code: ATTEMPTS_EXHAUSTED.into(),
            message: "gave up".into(),
        };
        assert_eq!(hold_after(&[gave_up]), None);
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

    fn retry_in(secs: i64) -> impl FnMut(u32, Option<Duration>) -> Decision {
        move |_, _| Decision::RetryAt(t0() + chrono::Duration::seconds(secs))
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
        let out = outcomes_for(&items, Ok(resp), &mut retry_in(1));
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
            matches!(&out[2], DeliveryOutcome::NeedsAttention { code, .. } if code == "POS_SYNC_EVENT_DUPLICATE")
        );
        assert!(
            matches!(&out[3], DeliveryOutcome::NeedsAttention { code, .. } if code == "POS_SYNC_EVENT_INVALID")
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
        let mut backoff = |f: u32, ra: Option<Duration>| {
            asked.push((f, ra));
            Decision::RetryAt(t0() + chrono::Duration::seconds(30))
        };
        let out = outcomes_for(&items, Err(err), &mut backoff);
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
                if not_before == t0() + chrono::Duration::seconds(30) && code == "POS_SYNC_RATE_LIMITED")
            );
        }
        let out = outcomes_for(
            &items,
            Err(CloudError::Unreachable("reset".into())),
            &mut retry_in(2),
        );
        assert!(matches!(&out[0], DeliveryOutcome::RetryLater { code, .. } if code == "NETWORK"));
    }

    #[test]
    fn exhausted_attempts_need_attention() {
        let items = vec![item(1, 11)];
        let out = outcomes_for(
            &items,
            Err(CloudError::Unreachable("down".into())),
            &mut |_, _| Decision::GiveUp,
        );
        assert!(
            matches!(&out[0], DeliveryOutcome::NeedsAttention { code, message, .. }
            if code == ATTEMPTS_EXHAUSTED && message.contains("12 attempts") && message.contains("NETWORK"))
        );
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
        let out = outcomes_for(&items, Err(err), &mut |_, _| {
            panic!("no backoff for a refusal")
        });
        assert_eq!(out.len(), 2);
        assert!(out.iter().all(|o| matches!(o, DeliveryOutcome::NeedsAttention { code, .. } if code == "POS_SYNC_UNAUTHORIZED")));
    }

    #[test]
    fn wrong_result_count_or_order_is_retried_not_trusted() {
        let items = vec![item(1, 0), item(2, 0)];
        let short = SalesEventsResponse {
            results: vec![result(1, EventStatus::Accepted)],
        };
        let out = outcomes_for(&items, Ok(short), &mut retry_in(5));
        assert!(out.iter().all(
            |o| matches!(o, DeliveryOutcome::RetryLater { code, .. } if code == "BAD_RESPONSE")
        ));
        let swapped = SalesEventsResponse {
            results: vec![
                result(2, EventStatus::Accepted),
                result(1, EventStatus::Accepted),
            ],
        };
        let out = outcomes_for(&items, Ok(swapped), &mut retry_in(5));
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
            let out = outcomes_for(&items, Ok(SalesEventsResponse { results }), &mut retry_in(1));
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
