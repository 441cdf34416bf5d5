//! Operator routes: health, readiness and metrics (no auth, no data), and the admin API under
//! `/v1/admin/*` (admin token only): catalog writes and consume-only status views.

use actix_web::http::header::CONTENT_TYPE;
use actix_web::{web, HttpRequest, HttpResponse};
use possync_protocol::valid_branch_id;
use serde::Deserialize;

use crate::app::AppState;
use crate::body::{is_json, read_limited};
use crate::db::catalog::{self, CatalogError, EntityWrite};
use crate::db::{ledger, terminals, StoreError};
use crate::error::ApiError;

/// `GET /healthz`: the process is up and serving.
pub async fn healthz() -> HttpResponse {
    HttpResponse::Ok().json(serde_json::json!({"status": "ok"}))
}

/// `GET /readyz`: the database answers; otherwise 503 so a load balancer stops routing here.
pub async fn readyz(state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    state
        .db
        .run(|conn| crate::db::select_one(conn).map_err(StoreError::from))
        .await
        .map_err(|e| ApiError::StorageFailed(e.to_string()))?;
    Ok(HttpResponse::Ok().json(serde_json::json!({"status": "ready"})))
}

/// `GET /metrics`: Prometheus text exposition. The journal gauges (`sales_gaps`,
/// `sales_chain_breaks`) come from two grouped queries over the ledger, run by at most one
/// scrape per [`JOURNAL_GAUGES_EVERY`] on each instance (a fleet's ledger is large and several
/// instances are scraped); between refreshes, and when the database does not answer, they keep
/// their last figures and the rest is served anyway.
pub async fn metrics(state: web::Data<AppState>) -> HttpResponse {
    if state.journal_gauges.due() {
        let read = state
            .db
            .run(|conn| {
                Ok::<_, crate::db::StoreError>((
                    crate::db::journal_audit::gaps_per_branch(conn)?,
                    crate::db::journal_audit::chain_breaks_per_branch(conn)?,
                ))
            })
            .await;
        match read {
            Ok((gaps, breaks)) => state.metrics.set_journal_signals(&gaps, &breaks),
            Err(e) => {
                state.journal_gauges.retry_next_scrape();
                tracing::warn!(errorCode = %possync_protocol::ErrorCode::PosSyncStorageFailed, cause = %e,
                    "journal gauges not refreshed")
            }
        }
    }
    HttpResponse::Ok()
        .insert_header((CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8"))
        .body(state.metrics.render())
}

/// How often a scrape refreshes the journal gauges from the database.
pub const JOURNAL_GAUGES_EVERY: std::time::Duration = std::time::Duration::from_secs(30);

/// After a failed refresh, the least time before the next one. `/metrics` needs no token, so
/// without it a caller scraping in a loop while the database struggles would run the grouped
/// ledger queries on every request — load on a database that is already failing.
pub const JOURNAL_GAUGES_RETRY_AFTER: std::time::Duration = std::time::Duration::from_secs(5);

/// When the journal gauges may next be refreshed: one refresh per [`JOURNAL_GAUGES_EVERY`], or
/// [`JOURNAL_GAUGES_RETRY_AFTER`] after a failed one; the first scrape always refreshes.
#[derive(Debug, Default)]
pub struct JournalGaugeClock {
    next: std::sync::Mutex<Option<std::time::Instant>>,
}

impl JournalGaugeClock {
    /// Whether this scrape refreshes; claims the refresh so concurrent scrapes do not.
    pub fn due(&self) -> bool {
        self.due_at(std::time::Instant::now())
    }

    fn due_at(&self, now: std::time::Instant) -> bool {
        let mut next = self.next.lock().unwrap_or_else(|e| e.into_inner());
        if next.is_some_and(|t| now < t) {
            return false;
        }
        *next = Some(now + JOURNAL_GAUGES_EVERY);
        true
    }

    /// A refresh failed: let a scrape try again, but not before [`JOURNAL_GAUGES_RETRY_AFTER`].
    pub fn retry_next_scrape(&self) {
        self.retry_at(std::time::Instant::now());
    }

    fn retry_at(&self, now: std::time::Instant) {
        *self.next.lock().unwrap_or_else(|e| e.into_inner()) =
            Some(now + JOURNAL_GAUGES_RETRY_AFTER);
    }
}

#[derive(Debug, Deserialize)]
struct UpsertBody {
    entities: Vec<EntityWrite>,
}

#[derive(Debug, Deserialize)]
struct DeleteKey {
    #[serde(rename = "type")]
    entity_type: String,
    id: String,
}

#[derive(Debug, Deserialize)]
struct DeleteBody {
    entities: Vec<DeleteKey>,
}

/// Most entities in one admin write, to bound one transaction.
const MAX_ADMIN_ENTITIES: usize = 5000;

async fn json_body<T: serde::de::DeserializeOwned>(
    state: &AppState,
    req: &HttpRequest,
    payload: web::Payload,
) -> Result<T, ApiError> {
    if !is_json(req) {
        return Err(ApiError::InvalidBody(
            "content-type must be application/json".into(),
        ));
    }
    let limit = state.limits.max_body_bytes * 8;
    let body = read_limited(
        req,
        payload,
        limit,
        || ApiError::BodyTooLarge(format!("admin bodies are limited to {limit} bytes")),
        |e| ApiError::InvalidBody(format!("could not read body: {e}")),
    )
    .await?;
    serde_json::from_slice(&body).map_err(|e| ApiError::InvalidBody(e.to_string()))
}

fn admin_catalog_error(e: CatalogError) -> ApiError {
    match e {
        CatalogError::Store(StoreError::InvalidInput(m)) => ApiError::InvalidBody(m),
        CatalogError::Store(e) => ApiError::StorageFailed(e.to_string()),
        other => ApiError::InvalidBody(other.to_string()),
    }
}

/// With `--catalog-source-only` the back office's tables are the one source of truth: an
/// admin write would be a second one that the next back-office change silently overwrites.
fn refuse_if_source_only(state: &AppState) -> Result<(), ApiError> {
    match state.catalog_source_only.get() {
        Some(mapping) => Err(ApiError::Forbidden(format!(
            "admin catalog writes are refused: this cloud's catalog comes from the back \
             office's tables ({mapping}, --catalog-source-only); change them there"
        ))),
        None => Ok(()),
    }
}

/// `POST /v1/admin/catalog/upsert` `{"entities": [{"type","id","branch_id","data"}]}` → the
/// stored entities with their new versions.
pub async fn catalog_upsert(
    state: web::Data<AppState>,
    req: HttpRequest,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    refuse_if_source_only(&state)?;
    let body: UpsertBody = json_body(&state, &req, payload).await?;
    if body.entities.len() > MAX_ADMIN_ENTITIES {
        return Err(ApiError::BodyTooLarge(format!(
            "at most {MAX_ADMIN_ENTITIES} entities per request"
        )));
    }
    let writes = body.entities;
    let stored = state
        .db
        .run(move |conn| catalog::upsert_entities(conn, &writes))
        .await
        .map_err(admin_catalog_error)?;
    tracing::info!(entities = stored.len(), "admin catalog upsert");
    Ok(HttpResponse::Ok().json(serde_json::json!({ "entities": stored })))
}

/// `POST /v1/admin/catalog/delete` `{"entities": [{"type","id"}]}` → the tombstones written.
pub async fn catalog_delete(
    state: web::Data<AppState>,
    req: HttpRequest,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    refuse_if_source_only(&state)?;
    let body: DeleteBody = json_body(&state, &req, payload).await?;
    if body.entities.len() > MAX_ADMIN_ENTITIES {
        return Err(ApiError::BodyTooLarge(format!(
            "at most {MAX_ADMIN_ENTITIES} entities per request"
        )));
    }
    let keys: Vec<(String, String)> = body
        .entities
        .into_iter()
        .map(|k| (k.entity_type, k.id))
        .collect();
    let deleted = state
        .db
        .run(move |conn| catalog::delete_entities(conn, &keys))
        .await
        .map_err(admin_catalog_error)?;
    tracing::info!(entities = deleted.len(), "admin catalog delete");
    Ok(HttpResponse::Ok().json(serde_json::json!({ "entities": deleted })))
}

/// `GET /v1/admin/terminals`: enrolled terminals (no token material).
pub async fn terminals(state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    let list = state
        .db
        .run(terminals::list_terminals)
        .await
        .map_err(|e| ApiError::StorageFailed(e.to_string()))?;
    Ok(HttpResponse::Ok().json(serde_json::json!({ "terminals": list })))
}

#[derive(Debug, Deserialize)]
struct SummaryQuery {
    branch: Option<String>,
}

/// `GET /v1/admin/sales/summary[?branch=B]`: number of stored sales events (consume-only).
pub async fn sales_summary(
    state: web::Data<AppState>,
    req: HttpRequest,
) -> Result<HttpResponse, ApiError> {
    let q = web::Query::<SummaryQuery>::from_query(req.query_string())
        .map_err(|e| ApiError::InvalidBody(format!("bad query string: {e}")))?
        .into_inner();
    if let Some(b) = q.branch.as_deref().filter(|b| !valid_branch_id(b)) {
        return Err(ApiError::InvalidBody(format!(
            "branch {b:?} must be 1-64 of [a-z0-9_-]"
        )));
    }
    let branch = q.branch.clone();
    let count = state
        .db
        .run(move |conn| ledger::count_sales(conn, branch.as_deref()))
        .await
        .map_err(|e| ApiError::StorageFailed(e.to_string()))?;
    Ok(
        HttpResponse::Ok()
            .json(serde_json::json!({ "branch_id": q.branch, "sales_events": count })),
    )
}

/// One terminal as the fleet view shows it.
#[derive(Debug, serde::Serialize)]
struct FleetTerminal {
    branch_id: String,
    terminal_id: uuid::Uuid,
    name: Option<String>,
    revoked_at: Option<chrono::DateTime<chrono::Utc>>,
    /// When it last called the cloud (to about a minute).
    last_contact_at: Option<chrono::DateTime<chrono::Utc>>,
    /// Catalog versions between the cloud's current one and the one the till reported with its
    /// last recorded contact (`x-possync-catalog-version`); `null` when it has not reported.
    catalog_versions_behind: Option<i64>,
    /// Its sales waiting for an operator, as it reported them with its last recorded contact
    /// (`x-possync-needs-attention`); `null` when it has not reported.
    needs_attention: Option<i64>,
}

/// `GET /v1/admin/fleet`: per branch and till (consume-only): the terminals and their last
/// contact, pending gap ranges ("missing 1042–1047 from T") and recorded chain breaks.
pub async fn fleet(state: web::Data<AppState>) -> Result<HttpResponse, ApiError> {
    let (signals, list, catalog_version) = state
        .db
        .run(|conn| {
            let signals = crate::db::journal_audit::journal_signals(conn)?;
            let version = crate::db::catalog::current_version(conn)
                .map_err(|e| StoreError::Unavailable(e.to_string()))?;
            Ok::<_, StoreError>((signals, terminals::list_terminals(conn)?, version))
        })
        .await
        .map_err(|e| ApiError::StorageFailed(e.to_string()))?;
    let terminals: Vec<FleetTerminal> = list
        .into_iter()
        .map(|t| FleetTerminal {
            branch_id: t.branch_id,
            terminal_id: t.terminal_id,
            name: t.name,
            revoked_at: t.revoked_at,
            last_contact_at: t.last_seen_at,
            catalog_versions_behind: t
                .reported
                .catalog_version
                .map(|v| (catalog_version - v).max(0)),
            needs_attention: t.reported.needs_attention,
        })
        .collect();
    Ok(HttpResponse::Ok().json(serde_json::json!({
        "generated_at": chrono::Utc::now(),
        "terminals": terminals,
        "gaps": signals.gaps,
        "chain_breaks": signals.chain_breaks,
    })))
}

#[cfg(test)]
mod tests {
    use super::JournalGaugeClock;

    #[test]
    fn one_scrape_per_period_refreshes_the_journal_gauges_and_a_failure_retries_after_a_pause() {
        use super::{JOURNAL_GAUGES_EVERY, JOURNAL_GAUGES_RETRY_AFTER};
        use std::time::{Duration, Instant};
        let clock = JournalGaugeClock::default();
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        assert!(clock.due_at(t0), "the first scrape reads");
        assert!(
            !clock.due_at(t0 + ms(1)),
            "the next one within the period does not"
        );
        assert!(!clock.due_at(t0 + JOURNAL_GAUGES_EVERY - ms(1)));
        assert!(
            clock.due_at(t0 + JOURNAL_GAUGES_EVERY),
            "a period later it reads again"
        );

        // The read at `t1` failed: scrapes in a loop do not re-run it at once.
        let t1 = t0 + JOURNAL_GAUGES_EVERY;
        clock.retry_at(t1);
        for d in [0, 1, 100, 4_999] {
            assert!(!clock.due_at(t1 + ms(d)), "{d} ms after a failure: no read");
        }
        assert!(
            clock.due_at(t1 + JOURNAL_GAUGES_RETRY_AFTER),
            "after the pause the next scrape reads again"
        );
        assert!(!clock.due_at(t1 + JOURNAL_GAUGES_RETRY_AFTER + ms(1)));
    }
}
