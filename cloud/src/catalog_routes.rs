//! `GET /v1/pos/catalog/snapshot`, `GET /v1/pos/catalog/delta`, `POST /v1/pos/catalog/reconcile`:
//! the terminal's read side of catalog truth, always scoped to the token's branch.
//!
//! Page `limit`: absent → [`DEFAULT_PAGE_LIMIT`]; above [`MAX_PAGE_LIMIT`] → clamped to it (a
//! client asking for more simply gets full pages); 0, negative or not a number → 400.

use std::collections::HashMap;

use actix_web::http::header;
use actix_web::{web, HttpRequest, HttpResponse};
use possync_protocol::fingerprint::{
    FingerprintRequest, FingerprintResponse, LeafReconcileRequest, MAX_NODES_PER_REQUEST,
};
use possync_protocol::{ReconcileMode, ReconcileRequest, DEFAULT_PAGE_LIMIT, MAX_PAGE_LIMIT};

use crate::app::AppState;
use crate::auth::Terminal;
use crate::body::{is_json, read_limited};
use crate::db::catalog::{self, CatalogError};
use crate::db::snapshot_pages::{self, PageOrigin};
use crate::db::StoreError;
use crate::error::ApiError;
use crate::fingerprint_cache::CachedTree;
use crate::snapshot_cache::{EncodedPage, PageEncoding, PageKey, Served};

/// Which route a catalog failure happened on, to pick its stable code.
#[derive(Debug, Clone, Copy)]
enum Route {
    Snapshot,
    Delta,
    Reconcile,
}

impl Route {
    fn bad_request(self, msg: String) -> ApiError {
        match self {
            Route::Snapshot => ApiError::SnapshotBadRequest(msg),
            Route::Delta => ApiError::DeltaBadRequest(msg),
            Route::Reconcile => ApiError::ReconcileMalformed(msg),
        }
    }

    fn server_failure(self, msg: String) -> ApiError {
        match self {
            Route::Snapshot => ApiError::SnapshotFailed(msg),
            Route::Delta => ApiError::DeltaFailed(msg),
            Route::Reconcile => ApiError::ReconcileFailed(msg),
        }
    }

    /// The single mapping of storage-side catalog errors onto this route's codes.
    fn map(self, e: CatalogError, max_body_bytes: usize) -> ApiError {
        match e {
            CatalogError::BadCursor(m)
            | CatalogError::BadSince(m)
            | CatalogError::BadManifest(m)
            | CatalogError::InvalidEntity(m) => self.bad_request(m),
            CatalogError::ResnapshotRequired { horizon } => {
                ApiError::ResnapshotRequired { horizon }
            }
            CatalogError::ManifestTooLarge { max_entries } => ApiError::ManifestTooLarge {
                max_entries,
                max_bytes: max_body_bytes,
            },
            CatalogError::Store(StoreError::InvalidInput(m)) => self.bad_request(m),
            CatalogError::Store(e) => self.server_failure(e.to_string()),
        }
    }
}

fn query_map(req: &HttpRequest, route: Route) -> Result<HashMap<String, String>, ApiError> {
    web::Query::<HashMap<String, String>>::from_query(req.query_string())
        .map(web::Query::into_inner)
        .map_err(|e| route.bad_request(format!("bad query string: {e}")))
}

/// Parses `limit` per the rule in the module doc.
fn page_limit(q: &HashMap<String, String>, route: Route) -> Result<u32, ApiError> {
    match q.get("limit") {
        None => Ok(DEFAULT_PAGE_LIMIT),
        Some(s) => match s.parse::<u64>() {
            Ok(0) | Err(_) => Err(route.bad_request(format!(
                "limit must be an integer between 1 and {MAX_PAGE_LIMIT}"
            ))),
            Ok(n) => Ok(n.min(u64::from(MAX_PAGE_LIMIT)) as u32),
        },
    }
}

/// `GET /v1/pos/catalog/snapshot?cursor&limit`: served from the encoded page cache
/// (`snapshot_cache`), in the encoding `Accept-Encoding` negotiates (zstd, gzip, identity).
pub async fn snapshot(
    state: web::Data<AppState>,
    terminal: Terminal,
    req: HttpRequest,
) -> Result<HttpResponse, ApiError> {
    let route = Route::Snapshot;
    let max_bytes = state.limits.max_body_bytes;
    let q = query_map(&req, route)?;
    let limit = page_limit(&q, route)?;
    let cursor = q.get("cursor").filter(|c| !c.is_empty()).cloned();
    if let Some(c) = &cursor {
        catalog::check_snapshot_cursor(c).map_err(|e| route.map(e, max_bytes))?;
    }
    let encoding = PageEncoding::negotiate(req.headers().get(header::ACCEPT_ENCODING));
    let catalog_version = state
        .db
        .run(catalog::current_version)
        .await
        .map_err(|e| route.map(e, max_bytes))?;
    let key = PageKey {
        branch: terminal.0.branch_id.clone(),
        catalog_version,
        cursor,
        limit,
    };
    let read = {
        let (state, key) = (state.clone(), key.clone());
        move || async move {
            // Built by another instance already: one indexed row, no build permit needed.
            let shared = if state.db.backend() == crate::db::Backend::Postgres {
                let key = key.clone();
                state
                    .db
                    .run(move |conn| snapshot_pages::find_shared(conn, &key))
                    .await?
            } else {
                None
            };
            if let Some(page) = shared {
                state.metrics.snapshot_page_shared_hits_total.inc();
                return Ok(page);
            }
            // A herd of cold terminals queues here behind a few builds instead of taking
            // every pooled connection; pages held or stored already never come this far.
            let _permit = state.snapshot_builds.acquire().await.map_err(|_| {
                CatalogError::Store(StoreError::Unavailable("shutting down".into()))
            })?;
            let (page, origin) = state
                .db
                .run(move |conn| {
                    snapshot_pages::get_or_build(conn, &key, |conn| {
                        let page = catalog::snapshot_page(
                            conn,
                            &key.branch,
                            key.cursor.as_deref(),
                            limit,
                        )?;
                        let json = serde_json::to_vec(&page).map_err(|e| {
                            CatalogError::Store(StoreError::Unavailable(format!(
                                "encoding a snapshot page: {e}"
                            )))
                        })?;
                        EncodedPage::new(page.snapshot_version, page.entities.len(), &json).map_err(
                            |e| CatalogError::Store(StoreError::Unavailable(e.to_string())),
                        )
                    })
                })
                .await?;
            match origin {
                PageOrigin::Built => state.metrics.snapshot_page_reads_total.inc(),
                PageOrigin::Shared => state.metrics.snapshot_page_shared_hits_total.inc(),
            }
            Ok::<_, CatalogError>(page)
        }
    };
    let (page, served) = match state.snapshot_pages.get_or_read(key.clone(), read).await {
        Ok(found) => found,
        Err(e) => {
            state.snapshot_pages.forget_failed(&key);
            return Err(route.map(e, max_bytes));
        }
    };
    if served == Served::Cached {
        state.metrics.snapshot_page_cache_hits_total.inc();
    }
    let body = {
        let page = page.clone();
        web::block(move || page.body(encoding))
            .await
            .map_err(|e| route.server_failure(format!("encoding a snapshot page: {e}")))?
            .map_err(|e| route.server_failure(e.to_string()))?
    };
    state.snapshot_pages.account(&key, &page);
    state.metrics.snapshot_pages.inc();
    state
        .metrics
        .snapshot_page_bytes_total
        .with_label_values(&[encoding.label()])
        .inc_by(body.len() as u64);
    tracing::info!(terminalId = %terminal.0.terminal_id, branchId = %terminal.0.branch_id,
        snapshotVersion = page.snapshot_version, entities = page.entities,
        encoding = encoding.label(), bytes = body.len(), cached = served == Served::Cached,
        "snapshot page");
    let mut resp = HttpResponse::Ok();
    resp.content_type("application/json")
        .insert_header((header::VARY, "accept-encoding"));
    if let Some(ce) = encoding.content_encoding() {
        resp.insert_header((header::CONTENT_ENCODING, ce));
    }
    Ok(resp.body(body))
}

/// `GET /v1/pos/catalog/delta?since&limit`. A missing `since` means 0 (everything retained).
pub async fn delta(
    state: web::Data<AppState>,
    terminal: Terminal,
    req: HttpRequest,
) -> Result<HttpResponse, ApiError> {
    let route = Route::Delta;
    let q = query_map(&req, route)?;
    let limit = page_limit(&q, route)?;
    let since = match q.get("since") {
        None => 0,
        Some(s) => match s.parse::<i64>() {
            Ok(v) if v >= 0 => v,
            _ => {
                return Err(route
                    .bad_request("since must be a non-negative integer catalog version".into()))
            }
        },
    };
    let page = match state
        .catalog_versions
        .empty_delta(&terminal.0.branch_id, since)
    {
        Some(page) => {
            state.metrics.delta_polls_from_memory.inc();
            page
        }
        None => {
            let branch = terminal.0.branch_id.clone();
            state
                .db
                .run(move |conn| catalog::delta_page(conn, &branch, since, limit))
                .await
                .map_err(|e| route.map(e, state.limits.max_body_bytes))?
        }
    };
    state.metrics.delta_sync_runs.inc();
    tracing::info!(terminalId = %terminal.0.terminal_id, branchId = %terminal.0.branch_id,
        since, changes = page.changes.len(), catalogVersion = page.catalog_version, "delta page");
    Ok(HttpResponse::Ok().json(page))
}

/// `POST /v1/pos/catalog/reconcile`: verify or plan one key range of this branch.
pub async fn reconcile(
    state: web::Data<AppState>,
    terminal: Terminal,
    req: HttpRequest,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let route = Route::Reconcile;
    let max_entries = state.limits.manifest_max_entries;
    let max_bytes = state.limits.max_body_bytes;
    let manifest: ReconcileRequest = reconcile_body(&state, &req, payload).await?;
    let label = match manifest.mode {
        ReconcileMode::Verify => "verify",
        ReconcileMode::Plan => "plan",
    };
    let branch = terminal.0.branch_id.clone();
    let answer = state
        .db
        .run(move |conn| catalog::reconcile(conn, &branch, &manifest, max_entries))
        .await
        .map_err(|e| route.map(e, max_bytes))?;
    Ok(reconciled(&state, &terminal, label, answer))
}

/// Counts and logs a reconcile answer (range or leaves), and sends it.
fn reconciled(
    state: &AppState,
    terminal: &Terminal,
    label: &str,
    answer: possync_protocol::ReconcileResponse,
) -> HttpResponse {
    state
        .metrics
        .reconcile_runs
        .with_label_values(&[label])
        .inc();
    tracing::info!(terminalId = %terminal.0.terminal_id, branchId = %terminal.0.branch_id,
        mode = label, checked = answer.summary.checked, upserts = answer.summary.upserts,
        deletes = answer.summary.deletes, "reconcile");
    HttpResponse::Ok().json(answer)
}

/// Reads a JSON body of the reconcile family (size-limited, `application/json`).
async fn reconcile_body<T: serde::de::DeserializeOwned>(
    state: &AppState,
    req: &HttpRequest,
    payload: web::Payload,
) -> Result<T, ApiError> {
    let route = Route::Reconcile;
    let max_entries = state.limits.manifest_max_entries;
    let max_bytes = state.limits.max_body_bytes;
    if !is_json(req) {
        return Err(route.bad_request("content-type must be application/json".into()));
    }
    let body = read_limited(
        req,
        payload,
        max_bytes,
        || ApiError::ManifestTooLarge {
            max_entries,
            max_bytes,
        },
        |e| route.bad_request(format!("could not read body: {e}")),
    )
    .await?;
    serde_json::from_slice(&body).map_err(|e| route.bad_request(format!("body is not valid: {e}")))
}

/// `POST /v1/pos/catalog/fingerprints`: fingerprints of nodes of this branch's catalog view
/// (the O(changed) verify; docs/api.md). Served from the per-version tree cache: the database
/// is read for the tree only once per branch view and catalog version.
pub async fn fingerprints(
    state: web::Data<AppState>,
    terminal: Terminal,
    req: HttpRequest,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let route = Route::Reconcile;
    let max_bytes = state.limits.max_body_bytes;
    let ask: FingerprintRequest = reconcile_body(&state, &req, payload).await?;
    if ask.nodes.is_empty() || ask.nodes.len() > MAX_NODES_PER_REQUEST {
        return Err(route.bad_request(format!(
            "nodes must name 1 to {MAX_NODES_PER_REQUEST} nodes"
        )));
    }
    if let Some(bad) = ask.nodes.iter().find(|n| !n.is_valid()) {
        return Err(route.bad_request(format!(
            "node level {} index {} does not exist",
            bad.level, bad.index
        )));
    }
    let branch = terminal.0.branch_id.clone();
    let version = state
        .db
        .run(catalog::current_version)
        .await
        .map_err(|e| route.map(e, max_bytes))?;
    let cached = match state.fingerprints.get(&branch, version) {
        Some(t) => t,
        None => {
            let b = branch.clone();
            let (version, tree) = state
                .db
                .run(move |conn| catalog::fingerprint_tree(conn, &b))
                .await
                .map_err(|e| route.map(e, max_bytes))?;
            state.metrics.fingerprint_tree_builds.inc();
            let t = std::sync::Arc::new(CachedTree { version, tree });
            state.fingerprints.put(&branch, t.clone());
            t
        }
    };
    let nodes = ask
        .nodes
        .iter()
        .map(|n| cached.tree.fingerprint(*n))
        .collect();
    state
        .metrics
        .reconcile_runs
        .with_label_values(&["fingerprints"])
        .inc();
    Ok(HttpResponse::Ok().json(FingerprintResponse {
        catalog_version: cached.version,
        nodes,
    }))
}

/// `POST /v1/pos/catalog/reconcile/leaves`: verify or plan the leaves a fingerprint descent
/// found different.
pub async fn reconcile_leaves(
    state: web::Data<AppState>,
    terminal: Terminal,
    req: HttpRequest,
    payload: web::Payload,
) -> Result<HttpResponse, ApiError> {
    let route = Route::Reconcile;
    let max_entries = state.limits.manifest_max_entries;
    let max_bytes = state.limits.max_body_bytes;
    let ask: LeafReconcileRequest = reconcile_body(&state, &req, payload).await?;
    let label = match ask.mode {
        ReconcileMode::Verify => "verify_leaves",
        ReconcileMode::Plan => "plan_leaves",
    };
    let branch = terminal.0.branch_id.clone();
    let answer = state
        .db
        .run(move |conn| catalog::reconcile_leaves(conn, &branch, &ask, max_entries))
        .await
        .map_err(|e| route.map(e, max_bytes))?;
    Ok(reconciled(&state, &terminal, label, answer))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn page_limit_defaults_clamps_and_refuses() {
        assert_eq!(
            page_limit(&q(&[]), Route::Delta).ok(),
            Some(DEFAULT_PAGE_LIMIT)
        );
        assert_eq!(
            page_limit(&q(&[("limit", "10")]), Route::Delta).ok(),
            Some(10)
        );
        assert_eq!(
            page_limit(&q(&[("limit", "999999999999")]), Route::Delta).ok(),
            Some(MAX_PAGE_LIMIT)
        );
        for bad in ["0", "-1", "ten", ""] {
            assert!(matches!(
                page_limit(&q(&[("limit", bad)]), Route::Snapshot),
                Err(ApiError::SnapshotBadRequest(_))
            ));
        }
    }

    #[test]
    fn catalog_errors_map_to_the_route_codes() {
        let e = Route::Delta.map(CatalogError::ResnapshotRequired { horizon: 5 }, 1);
        assert!(matches!(e, ApiError::ResnapshotRequired { horizon: 5 }));
        let e = Route::Snapshot.map(CatalogError::BadCursor("x".into()), 1);
        assert!(matches!(e, ApiError::SnapshotBadRequest(_)));
        let e = Route::Reconcile.map(
            CatalogError::Store(StoreError::Unavailable("down".into())),
            1,
        );
        assert!(matches!(e, ApiError::ReconcileFailed(_)));
        let e = Route::Reconcile.map(CatalogError::ManifestTooLarge { max_entries: 3 }, 1);
        assert!(matches!(
            e,
            ApiError::ManifestTooLarge { max_entries: 3, .. }
        ));
    }
}
