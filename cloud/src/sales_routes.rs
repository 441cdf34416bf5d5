//! `POST /v1/pos/sales/events`, `GET /v1/pos/sync/status` and `GET /v1/pos/sales/held`:
//! exactly-once sales ingestion.
//!
//! The body is first read as `{"events": [any JSON]}` so that one malformed event is rejected
//! on its own while the others still count. Before anything is stored, every raw event is
//! checked to name the token's terminal and branch: one stranger fails the whole request with
//! 403 and nothing stored. Valid events then go, as one batch, through the branch's ingestion
//! actor (group commit).
//!
//! A request carrying `x-device-nonce` first binds its `pos_id`s to that device
//! ([`crate::db::devices`]); events of a `pos_id` owned by another device are answered
//! `conflict` with `POS_SYNC_POS_CLONED` and never reach the ledger, so a cloned disk or a
//! restored backup cannot even collide with the original's keys.

use std::collections::{BTreeSet, HashMap};

use actix_web::{web, HttpMessage, HttpRequest, HttpResponse};
use possync_protocol::{
    validate_event, ErrorCode, EventResult, EventStatus, SaleEvent, SaleFlag, SalesEventsRequest,
    SalesEventsResponse, DEVICE_NONCE_HEADER, MAX_HELD_KEYS_PER_PAGE,
};
use serde::Deserialize;
use uuid::Uuid;

use crate::app::{AppState, RequestId};
use crate::auth::Terminal;
use crate::body::{is_json, read_limited};
use crate::db::devices;
use crate::db::ledger::{self, IngestOutcome, IngestRequest};
use crate::db::terminals::TerminalIdentity;
use crate::error::ApiError;

/// Header a terminal may send with the attempt number of this delivery, for logs.
pub const SYNC_ATTEMPT_HEADER: &str = "x-sync-attempt";

#[derive(Deserialize)]
struct RawEvents {
    events: Vec<serde_json::Value>,
}

/// Refuses the request if any raw event names another terminal or branch than the token's.
/// An absent field is left to per-event validation; a present one that is not exactly this
/// terminal's (or branch's) value is a stranger.
fn check_ownership(events: &[serde_json::Value], who: &TerminalIdentity) -> Result<(), ApiError> {
    for (i, raw) in events.iter().enumerate() {
        if let Some(t) = raw.get("terminal_id") {
            let same = t
                .as_str()
                .and_then(|s| Uuid::parse_str(s).ok())
                .is_some_and(|id| id == who.terminal_id);
            if !same {
                return Err(ApiError::Forbidden(format!(
                    "events[{i}] names another terminal than the token's; nothing was stored"
                )));
            }
        }
        if let Some(b) = raw.get("branch_id") {
            if b.as_str() != Some(who.branch_id.as_str()) {
                return Err(ApiError::Forbidden(format!(
                    "events[{i}] names another branch than the token's; nothing was stored"
                )));
            }
        }
    }
    Ok(())
}

/// One event as parsed: the typed event, or why it is not one (with its raw
/// `local_event_id` when that is an integer).
type ParsedEvent = Result<SaleEvent, (Option<i64>, String)>;

/// Parses the body, checks the event count and refuses strangers (403) before anything else.
///
/// The common case — every event has the schema — is parsed straight into typed events, with no
/// intermediate JSON tree (that tree's allocations dominated ingestion CPU). Only when that
/// fails is the body parsed as `{"events": [any JSON]}`, so one malformed event is rejected on
/// its own while the others still count.
fn parse_events(
    body: &[u8],
    who: &TerminalIdentity,
    max_events: usize,
) -> Result<Vec<ParsedEvent>, ApiError> {
    let too_many = |n: usize| {
        ApiError::BodyTooLarge(format!("{n} events in one request; at most {max_events}"))
    };
    if let Ok(typed) = serde_json::from_slice::<SalesEventsRequest>(body) {
        if typed.events.len() > max_events {
            return Err(too_many(typed.events.len()));
        }
        for (i, e) in typed.events.iter().enumerate() {
            if e.terminal_id != who.terminal_id || e.branch_id != who.branch_id {
                return Err(ApiError::Forbidden(format!(
                    "events[{i}] names another terminal or branch than the token's; nothing was stored"
                )));
            }
        }
        return Ok(typed.events.into_iter().map(Ok).collect());
    }
    let raw: RawEvents = serde_json::from_slice(body)
        .map_err(|e| ApiError::InvalidBody(format!("body must be {{\"events\": [...]}}: {e}")))?;
    if raw.events.len() > max_events {
        return Err(too_many(raw.events.len()));
    }
    check_ownership(&raw.events, who)?;
    Ok(raw
        .events
        .into_iter()
        .map(|value| {
            let local_id = value.get("local_event_id").and_then(|v| v.as_i64());
            serde_json::from_value::<SaleEvent>(value)
                .map_err(|e| (local_id, format!("schema: {e}")))
        })
        .collect())
}

fn rejected(local_event_id: Option<i64>, message: String) -> EventResult {
    EventResult {
        local_event_id,
        status: EventStatus::Rejected,
        code: Some(ErrorCode::PosSyncEventInvalid),
        cloud_event_id: None,
        message: Some(message),
    }
}

/// The answer for an event whose `pos_id` belongs to another device: nothing stored.
fn cloned(local_event_id: i64) -> EventResult {
    EventResult {
        local_event_id: Some(local_event_id),
        status: EventStatus::Conflict,
        code: Some(ErrorCode::PosSyncPosCloned),
        cloud_event_id: None,
        message: Some(
            "this pos_id belongs to another device (cloned disk or restored backup); \
             nothing was stored: deliver the sale under a new pos_id"
                .to_string(),
        ),
    }
}

/// The `x-device-nonce` header: `None` when absent (older terminals are not checked), an
/// error when present but malformed.
fn device_nonce(req: &HttpRequest) -> Result<Option<String>, ApiError> {
    let Some(value) = req.headers().get(DEVICE_NONCE_HEADER) else {
        return Ok(None);
    };
    value
        .to_str()
        .ok()
        .filter(|v| devices::valid_nonce(v))
        .map(|v| Some(v.to_string()))
        .ok_or_else(|| {
            ApiError::InvalidBody(format!(
                "{DEVICE_NONCE_HEADER} must be 1-{} of [A-Za-z0-9-]",
                devices::MAX_NONCE_LEN
            ))
        })
}

fn from_outcome(local_event_id: i64, outcome: IngestOutcome) -> EventResult {
    let (status, code, id, message) = match outcome {
        IngestOutcome::Refused => {
            return rejected(
                Some(local_event_id),
                "the database cannot store this event as sent; nothing of it was stored".into(),
            )
        }
        IngestOutcome::Accepted {
            cloud_event_id,
            chain_break: false,
        } => (EventStatus::Accepted, None, cloud_event_id, None),
        IngestOutcome::Accepted {
            cloud_event_id,
            chain_break: true,
        } => (
            EventStatus::Accepted,
            Some(ErrorCode::PosSyncChainBreak),
            cloud_event_id,
            Some(
                "stored; its chain_hash does not follow from its predecessor's: a chain break is recorded"
                    .to_string(),
            ),
        ),
        IngestOutcome::Duplicate { cloud_event_id } => (
            EventStatus::Duplicate,
            Some(ErrorCode::PosSyncEventDuplicate),
            cloud_event_id,
            None,
        ),
        IngestOutcome::Conflict { cloud_event_id } => (
            EventStatus::Conflict,
            Some(ErrorCode::PosSyncEventDuplicate),
            cloud_event_id,
            Some(
                "this key was already ingested with a different payload; the first one is kept"
                    .to_string(),
            ),
        ),
    };
    EventResult {
        local_event_id: Some(local_event_id),
        status,
        code,
        cloud_event_id: Some(id),
        message,
    }
}

fn status_label(s: EventStatus) -> &'static str {
    match s {
        EventStatus::Accepted => "accepted",
        EventStatus::Duplicate => "duplicate",
        EventStatus::Conflict => "conflict",
        EventStatus::Rejected => "rejected",
    }
}

/// `POST /v1/pos/sales/events`.
pub async fn post_events(
    state: web::Data<AppState>,
    terminal: Terminal,
    req: HttpRequest,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let who = terminal.0;
    let limits = state.limits;
    if !is_json(&req) {
        return Err(ApiError::InvalidBody(
            "content-type must be application/json".into(),
        ));
    }
    let body = read_limited(
        &req,
        payload,
        limits.max_body_bytes,
        || {
            ApiError::BodyTooLarge(format!(
                "body is over {} bytes; send fewer events per request",
                limits.max_body_bytes
            ))
        },
        |e| ApiError::InvalidBody(format!("could not read body: {e}")),
    )
    .await?;
    let parsed = parse_events(&body, &who, limits.max_events)?;
    let nonce = device_nonce(&req)?;

    let sync_attempt: u32 = req
        .headers()
        .get(SYNC_ATTEMPT_HEADER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let request_id = req
        .extensions()
        .get::<RequestId>()
        .map(|r| r.0.clone())
        .unwrap_or_default();

    let mut results: Vec<Option<EventResult>> = vec![None; parsed.len()];
    let mut batch = Vec::new();
    let mut positions = Vec::new();
    for (i, item) in parsed.into_iter().enumerate() {
        let event = match item {
            Ok(e) => e,
            Err((local_id, message)) => {
                results[i] = Some(rejected(local_id, message));
                continue;
            }
        };
        if let Err(e) = validate_event(&event) {
            results[i] = Some(rejected(Some(event.local_event_id), e.to_string()));
            continue;
        }
        positions.push(i);
        batch.push(IngestRequest::new(event));
    }

    if let Some(nonce) = nonce {
        let pos_ids: BTreeSet<Uuid> = batch.iter().map(|r| r.event.pos_id).collect();
        let foreign = if state.device_bindings.all_bound_to(&pos_ids, &nonce) {
            BTreeSet::new()
        } else {
            let terminal_id = who.terminal_id;
            let (asked, bound_nonce) = (pos_ids.clone(), nonce.clone());
            let foreign = state
                .db
                .run(move |conn| devices::claim_pos_ids(conn, terminal_id, &asked, &bound_nonce))
                .await
                .map_err(|e| ApiError::StorageFailed(e.to_string()))?;
            state
                .device_bindings
                .remember(pos_ids.difference(&foreign), &nonce);
            foreign
        };
        if !foreign.is_empty() {
            let mut kept = Vec::with_capacity(batch.len());
            let mut kept_positions = Vec::with_capacity(batch.len());
            let mut refused = 0u64;
            for (req, pos) in batch.into_iter().zip(positions) {
                if foreign.contains(&req.event.pos_id) {
                    results[pos] = Some(cloned(req.event.local_event_id));
                    refused += 1;
                } else {
                    kept.push(req);
                    kept_positions.push(pos);
                }
            }
            state
                .metrics
                .pos_identity_conflicts
                .with_label_values(&["device"])
                .inc_by(refused);
            for pos_id in &foreign {
                tracing::warn!(terminalId = %who.terminal_id, branchId = %who.branch_id,
                    posId = %pos_id, syncAttempt = sync_attempt,
                    errorCode = ErrorCode::PosSyncPosCloned.as_str(), requestId = %request_id,
                    "pos_id is bound to another device: cloned disk or restored backup; the till is told to fork");
            }
            batch = kept;
            positions = kept_positions;
        }
    }

    // The ids and flags needed for the answer, before the batch moves to the actor.
    let local_ids: Vec<i64> = batch.iter().map(|r| r.event.local_event_id).collect();
    let flags: Vec<Vec<SaleFlag>> = batch.iter().map(|r| r.flags.clone()).collect();
    let outcomes = state
        .ingest
        .ingest(&who.branch_id, batch)
        .await
        .map_err(|e| {
            tracing::error!(terminalId = %who.terminal_id, branchId = %who.branch_id,
                syncAttempt = sync_attempt, errorCode = ErrorCode::PosSyncStorageFailed.as_str(),
                requestId = %request_id, cause = %e, events = local_ids.len(), "sales ingestion failed");
            ApiError::StorageFailed(e.to_string())
        })?;
    for (((pos, outcome), local_id), flags) in
        positions.iter().zip(outcomes).zip(local_ids).zip(flags)
    {
        if let IngestOutcome::Conflict { cloud_event_id } = outcome {
            // Same key, different payload: two databases share this pos_id (a disk image
            // cloned before device nonces, or a till restored from a backup).
            state
                .metrics
                .pos_identity_conflicts
                .with_label_values(&["payload"])
                .inc();
            tracing::warn!(terminalId = %who.terminal_id, branchId = %who.branch_id,
                eventId = local_id, syncAttempt = sync_attempt,
                errorCode = ErrorCode::PosSyncEventDuplicate.as_str(), requestId = %request_id,
                cloudEventId = %cloud_event_id,
                "key ingested before with a different payload: the pos_id is used by two databases");
        }
        if matches!(outcome, IngestOutcome::Accepted { .. }) && !flags.is_empty() {
            let names: Vec<&str> = flags.iter().map(|f| f.as_str()).collect();
            for name in &names {
                state
                    .metrics
                    .flagged_events
                    .with_label_values(&[name])
                    .inc();
            }
            tracing::warn!(terminalId = %who.terminal_id, branchId = %who.branch_id,
                eventId = local_id, syncAttempt = sync_attempt, requestId = %request_id,
                flags = %names.join(","), "sale stored with flags");
        }
        results[*pos] = Some(from_outcome(local_id, outcome));
    }

    let mut out = Vec::with_capacity(results.len());
    for (i, r) in results.into_iter().enumerate() {
        // Every slot is filled above (rejected or an outcome); a gap would be a bug, reported
        // as a storage failure rather than a panic.
        let r = r.ok_or_else(|| ApiError::StorageFailed(format!("no outcome for events[{i}]")))?;
        let label = status_label(r.status);
        state
            .metrics
            .synced_events
            .with_label_values(&[label])
            .inc();
        let code = r.code.map(ErrorCode::as_str).unwrap_or("");
        tracing::info!(terminalId = %who.terminal_id, branchId = %who.branch_id,
            eventId = r.local_event_id.unwrap_or(-1), syncAttempt = sync_attempt,
            errorCode = code, status = label, requestId = %request_id,
            cloudEventId = %r.cloud_event_id.map(|u| u.to_string()).unwrap_or_default(),
            "sale event");
        out.push(r);
    }
    Ok(HttpResponse::Ok().json(SalesEventsResponse { results: out }))
}

/// `GET /v1/pos/sync/status`: how far this terminal's events got, per `pos_id`.
pub async fn sync_status(
    state: web::Data<AppState>,
    terminal: Terminal,
) -> Result<HttpResponse, ApiError> {
    let who = terminal.0;
    let status = state
        .db
        .run(move |conn| ledger::sync_status(conn, who.terminal_id, &who.branch_id))
        .await
        .map_err(|e| ApiError::StorageFailed(e.to_string()))?;
    Ok(HttpResponse::Ok().json(status))
}

/// `GET /v1/pos/sales/held?pos_id=UUID[&after=N][&limit=N]`: which keys of a `pos_id` the
/// cloud holds (see [`ledger::held_keys`]).
pub async fn held_keys(
    state: web::Data<AppState>,
    _terminal: Terminal,
    req: HttpRequest,
) -> Result<HttpResponse, ApiError> {
    let query = web::Query::<HashMap<String, String>>::from_query(req.query_string())
        .map(web::Query::into_inner)
        .map_err(|e| ApiError::InvalidBody(format!("query: {e}")))?;
    let pos_id = query
        .get("pos_id")
        .and_then(|p| Uuid::parse_str(p).ok())
        .ok_or_else(|| ApiError::InvalidBody("pos_id must be a UUID".into()))?;
    let after = match query.get("after") {
        None => 0,
        Some(a) => a
            .parse::<i64>()
            .ok()
            .filter(|a| *a >= 0)
            .ok_or_else(|| ApiError::InvalidBody("after must be an integer >= 0".into()))?,
    };
    let limit = match query.get("limit") {
        None => MAX_HELD_KEYS_PER_PAGE,
        Some(l) => l
            .parse::<usize>()
            .ok()
            .filter(|l| (1..=MAX_HELD_KEYS_PER_PAGE).contains(l))
            .ok_or_else(|| {
                ApiError::InvalidBody(format!("limit must be 1-{MAX_HELD_KEYS_PER_PAGE}"))
            })?,
    };
    let page = state
        .db
        .run(move |conn| ledger::held_keys(conn, pos_id, after, limit))
        .await
        .map_err(|e| ApiError::StorageFailed(e.to_string()))?;
    Ok(HttpResponse::Ok().json(page))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn who() -> TerminalIdentity {
        TerminalIdentity {
            terminal_id: Uuid::nil(),
            branch_id: "b1".into(),
        }
    }

    #[test]
    fn ownership_accepts_own_and_missing_fields() {
        let t = Uuid::nil().to_string();
        let events = vec![
            json!({"terminal_id": t, "branch_id": "b1"}),
            json!({"garbage": true}),
        ];
        assert!(check_ownership(&events, &who()).is_ok());
    }

    #[test]
    fn ownership_refuses_any_stranger() {
        let t = Uuid::nil().to_string();
        let other = Uuid::now_v7().to_string();
        for bad in [
            json!({"terminal_id": other, "branch_id": "b1"}),
            json!({"terminal_id": t, "branch_id": "b2"}),
            json!({"terminal_id": 5}),
            json!({"branch_id": null}),
        ] {
            let events = vec![json!({"terminal_id": t}), bad.clone()];
            assert!(
                matches!(
                    check_ownership(&events, &who()),
                    Err(ApiError::Forbidden(_))
                ),
                "{bad}"
            );
        }
    }

    fn event_json(terminal: Uuid, branch: &str, id: i64) -> serde_json::Value {
        let e = possync_testkit::sample_sale_event(terminal, Uuid::nil(), id, branch);
        serde_json::to_value(e).expect("json")
    }

    #[test]
    fn typed_and_raw_paths_agree_on_ownership_and_rejection() {
        let me = who();
        let good = event_json(me.terminal_id, "b1", 1);
        // Typed path: all well-formed.
        let body =
            serde_json::to_vec(&json!({"events": [good.clone(), good.clone()]})).expect("json");
        let parsed = parse_events(&body, &me, 500).expect("parsed");
        assert!(parsed.iter().all(|p| p.is_ok()));
        // Typed path refuses a stranger.
        let stranger = event_json(Uuid::now_v7(), "b1", 2);
        let body =
            serde_json::to_vec(&json!({"events": [good.clone(), stranger.clone()]})).expect("json");
        assert!(matches!(
            parse_events(&body, &me, 500),
            Err(ApiError::Forbidden(_))
        ));
        // Raw path (one malformed event) refuses the same stranger…
        let body = serde_json::to_vec(&json!({"events": [{"local_event_id": 9}, stranger]}))
            .expect("json");
        assert!(matches!(
            parse_events(&body, &me, 500),
            Err(ApiError::Forbidden(_))
        ));
        // …and otherwise rejects only the malformed one, keeping its id.
        let body =
            serde_json::to_vec(&json!({"events": [good, {"local_event_id": 9}]})).expect("json");
        let parsed = parse_events(&body, &me, 500).expect("parsed");
        assert!(parsed[0].is_ok());
        assert!(matches!(&parsed[1], Err((Some(9), m)) if m.starts_with("schema")));
        // Count limit on both paths.
        let body = serde_json::to_vec(&json!({"events": [{}, {}, {}]})).expect("json");
        assert!(matches!(
            parse_events(&body, &me, 2),
            Err(ApiError::BodyTooLarge(_))
        ));
        assert!(matches!(
            parse_events(b"{", &me, 2),
            Err(ApiError::InvalidBody(_))
        ));
    }

    #[test]
    fn outcomes_map_to_contract_statuses_and_codes() {
        let id = Uuid::now_v7();
        let r = from_outcome(3, IngestOutcome::Conflict { cloud_event_id: id });
        assert_eq!(r.status, EventStatus::Conflict);
        assert_eq!(r.code, Some(ErrorCode::PosSyncEventDuplicate));
        assert_eq!(r.cloud_event_id, Some(id));
        let r = from_outcome(
            3,
            IngestOutcome::Accepted {
                cloud_event_id: id,
                chain_break: false,
            },
        );
        assert_eq!(r.code, None);
        let r = from_outcome(3, IngestOutcome::Refused);
        assert_eq!(r.status, EventStatus::Rejected);
        assert_eq!(r.code, Some(ErrorCode::PosSyncEventInvalid));
        assert_eq!(r.local_event_id, Some(3));
        assert_eq!(r.cloud_event_id, None);
    }
}
