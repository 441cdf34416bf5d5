//! The actix-web application: shared state, the middleware every request passes through
//! (request id, latency and error metrics, compression) and the route table.
//!
//! [`build`] is used both by `cloud serve` and by in-process tests, so both run exactly the
//! same stack.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Instant;

use actix_web::body::{BoxBody, MessageBody};
use actix_web::dev::{ServiceFactory, ServiceRequest, ServiceResponse};
use actix_web::http::header::{HeaderName, HeaderValue};
use actix_web::http::StatusCode;
use actix_web::middleware::{from_fn, Compress, Next};
use actix_web::ResponseError;
use actix_web::{web, App, HttpMessage};
use uuid::Uuid;

use crate::admin_routes;
use crate::auth;
use crate::catalog_routes;
use crate::config::{Limits, RateLimits};
use crate::db::Database;
use crate::error::ApiError;
use crate::ingest::{IngestRegistry, IngestSettings};
use crate::metrics::Metrics;
use crate::rate_limit::Buckets;
use crate::sales_routes;

/// Everything handlers share. Built once per server and cloned (cheaply) into each worker.
pub struct AppState {
    /// The connection pool.
    pub db: Database,
    /// This instance's metrics.
    pub metrics: Metrics,
    /// Branch ingestion actors.
    pub ingest: IngestRegistry,
    /// Buckets per client address (before authentication).
    pub address_buckets: Buckets<IpAddr>,
    /// Proxies whose forwarding headers name the client.
    pub trusted_proxies: crate::client_address::TrustedProxies,
    /// Buckets per terminal.
    pub terminal_buckets: Buckets<Uuid>,
    /// sha256 of the admin token: compared in constant time, never kept in clear beyond start.
    pub admin_token_sha256: [u8; 32],
    /// Request size limits.
    pub limits: Limits,
    /// When this instance last wrote each terminal's `last_seen_at`.
    pub contacts: crate::db::terminals::ContactLog,
    /// `pos_id` → device nonce bindings already confirmed (see `db::devices`).
    pub device_bindings: crate::db::devices::KnownBindings,
    /// Fingerprint trees per branch view and catalog version.
    pub fingerprints: crate::fingerprint_cache::FingerprintCache,
    /// Snapshot pages encoded once per branch view and catalog version.
    pub snapshot_pages: crate::snapshot_cache::SnapshotPageCache,
    /// When `GET /metrics` last refreshed the journal gauges.
    pub journal_gauges: crate::admin_routes::JournalGaugeClock,
    /// Permits to build a snapshot page from the catalog (`Limits::snapshot_builds`).
    pub snapshot_builds: tokio::sync::Semaphore,
    /// Catalog versions known without a query (kept current by the PostgreSQL listener that
    /// `server::run` starts; empty, so never used, otherwise).
    pub catalog_versions: crate::catalog_versions::CatalogVersions,
    /// Set (to the mapping file's name) when `--catalog-source-only` refuses admin catalog
    /// writes.
    pub catalog_source_only: std::sync::OnceLock<String>,
}

impl AppState {
    /// Assembles the state from its parts.
    pub fn new(
        db: Database,
        metrics: Metrics,
        admin_token: &str,
        limits: Limits,
        rate_limits: RateLimits,
        ingest: IngestSettings,
    ) -> Arc<AppState> {
        let snapshot_builds = limits.snapshot_builds.max(1);
        Arc::new(AppState {
            ingest: IngestRegistry::new(db.clone(), metrics.clone(), ingest),
            db,
            metrics,
            address_buckets: Buckets::new(
                rate_limits.address,
                rate_limits.max_buckets,
                rate_limits.bucket_idle,
            ),
            terminal_buckets: Buckets::new(
                rate_limits.terminal,
                rate_limits.max_buckets,
                rate_limits.bucket_idle,
            ),
            trusted_proxies: rate_limits.trusted_proxies.clone(),
            admin_token_sha256: auth::token_digest(admin_token),
            limits,
            contacts: Default::default(),
            device_bindings: Default::default(),
            fingerprints: Default::default(),
            snapshot_pages: Default::default(),
            snapshot_builds: tokio::sync::Semaphore::new(snapshot_builds),
            journal_gauges: Default::default(),
            catalog_versions: Default::default(),
            catalog_source_only: std::sync::OnceLock::new(),
        })
    }
}

/// The request's id, available to handlers through the request extensions.
#[derive(Debug, Clone)]
pub struct RequestId(pub String);

/// Echo a client's request id only if it is short and harmless in logs and headers.
fn acceptable_request_id(v: &str) -> bool {
    !v.is_empty()
        && v.len() <= 128
        && v.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
}

/// Longest request target (path and query) served; longer ones get 414 with the envelope.
/// actix's own limit on the whole request head (32 KiB) still answers a bare 431 beyond it.
pub const MAX_URI_BYTES: usize = 8 * 1024;

/// Whether a response already carries a JSON body (the envelope, for error responses).
fn is_json_response(res: &ServiceResponse<BoxBody>) -> bool {
    res.headers()
        .get(actix_web::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"))
}

/// Outermost middleware: assigns the request id, times the request, refuses over-long URLs,
/// gives every bare error response (actix's own 404, 405, 400 from extractors) the envelope,
/// counts errors by code and stamps `x-request-id` on every response.
async fn observe(
    req: ServiceRequest,
    next: Next<impl MessageBody + 'static>,
) -> Result<ServiceResponse<BoxBody>, actix_web::Error> {
    let started = Instant::now();
    let request_id = req
        .headers()
        .get(possync_protocol::REQUEST_ID_HEADER)
        .and_then(|v| v.to_str().ok())
        .filter(|v| acceptable_request_id(v))
        .map(str::to_string)
        .unwrap_or_else(|| Uuid::now_v7().to_string());
    req.extensions_mut().insert(RequestId(request_id.clone()));
    let metrics = req
        .app_data::<web::Data<AppState>>()
        .map(|s| s.metrics.clone());
    let uri_len = req.uri().path_and_query().map_or(0, |pq| pq.as_str().len());
    // Guards answer refusals as responses (never `Err`), so this sees every response; an
    // `Err` here could only come from actix itself and is passed on as is.
    let mut res = if uri_len > MAX_URI_BYTES {
        let api = ApiError::UriTooLong { max: MAX_URI_BYTES };
        req.into_response(api.error_response())
    } else {
        next.call(req).await?.map_into_boxed_body()
    };
    let mut code = res
        .response()
        .error()
        .and_then(|e| e.as_error::<ApiError>())
        .map(ApiError::code);
    let status = res.status();
    if (status.is_client_error() || status.is_server_error()) && !is_json_response(&res) {
        let what = match status {
            StatusCode::METHOD_NOT_ALLOWED => res.request().method().to_string(),
            _ => res.request().path().to_string(),
        };
        let api = ApiError::for_bare_status(status, what);
        code = Some(api.code());
        let (http_req, _bare) = res.into_parts();
        res = ServiceResponse::new(http_req, api.error_response());
    }
    if let Ok(v) = HeaderValue::from_str(&request_id) {
        res.headers_mut().insert(
            HeaderName::from_static(possync_protocol::REQUEST_ID_HEADER),
            v,
        );
    }
    if let Some(m) = metrics {
        let route = res
            .request()
            .match_pattern()
            .unwrap_or_else(|| "unmatched".to_string());
        let status = res.status().as_u16().to_string();
        m.http_request_duration_seconds
            .with_label_values(&[route.as_str(), status.as_str()])
            .observe(started.elapsed().as_secs_f64());
        if let Some(code) = code {
            m.errors_total.with_label_values(&[code.as_str()]).inc();
        }
    }
    Ok(res)
}

/// Builds the application with every route and middleware.
pub fn build(
    state: Arc<AppState>,
) -> App<
    impl ServiceFactory<
        ServiceRequest,
        Config = (),
        Response = ServiceResponse<impl MessageBody>,
        Error = actix_web::Error,
        InitError = (),
    >,
> {
    let data = web::Data::from(state);
    // Every route is a `web::resource`: a served path asked with another method answers 405
    // (`App::route` would put the method in the path's guard and answer 404).
    App::new()
        .app_data(data)
        .wrap(from_fn(observe))
        .default_service(web::to(no_such_route))
        .service(web::resource("/openapi.json").route(web::get().to(openapi)))
        .service(web::resource("/healthz").route(web::get().to(admin_routes::healthz)))
        .service(web::resource("/readyz").route(web::get().to(admin_routes::readyz)))
        // The page needs no token (it holds no data); its script asks for one and calls
        // `/v1/admin/fleet` with it.
        .service(web::resource("/admin/fleet").route(web::get().to(crate::fleet_page::page)))
        .service(
            web::resource("/metrics")
                .wrap(Compress::default())
                .route(web::get().to(admin_routes::metrics)),
        )
        .service(
            web::scope("/v1/pos")
                .wrap(from_fn(auth::terminal_guard))
                .service(
                    // Encoded by the route itself, once per page (snapshot_cache).
                    web::resource("/catalog/snapshot")
                        .route(web::get().to(catalog_routes::snapshot)),
                )
                .service(
                    web::resource("/catalog/delta")
                        .wrap(Compress::default())
                        .route(web::get().to(catalog_routes::delta)),
                )
                .service(
                    web::resource("/catalog/reconcile")
                        .wrap(Compress::default())
                        .route(web::post().to(catalog_routes::reconcile)),
                )
                .service(
                    web::resource("/catalog/fingerprints")
                        .wrap(Compress::default())
                        .route(web::post().to(catalog_routes::fingerprints)),
                )
                .service(
                    web::resource("/catalog/reconcile/leaves")
                        .wrap(Compress::default())
                        .route(web::post().to(catalog_routes::reconcile_leaves)),
                )
                .service(
                    web::resource("/sales/events").route(web::post().to(sales_routes::post_events)),
                )
                .service(web::resource("/sales/held").route(web::get().to(sales_routes::held_keys)))
                .service(
                    web::resource("/sync/status").route(web::get().to(sales_routes::sync_status)),
                ),
        )
        .service(
            web::scope("/v1/admin")
                .wrap(from_fn(auth::admin_guard))
                .service(
                    web::resource("/catalog/upsert")
                        .route(web::post().to(admin_routes::catalog_upsert)),
                )
                .service(
                    web::resource("/catalog/delete")
                        .route(web::post().to(admin_routes::catalog_delete)),
                )
                .service(web::resource("/terminals").route(web::get().to(admin_routes::terminals)))
                .service(
                    web::resource("/sales/summary")
                        .route(web::get().to(admin_routes::sales_summary)),
                )
                .service(web::resource("/fleet").route(web::get().to(admin_routes::fleet))),
        )
}

/// Every path no route serves: 404 with the envelope.
async fn no_such_route(req: actix_web::HttpRequest) -> Result<actix_web::HttpResponse, ApiError> {
    Err(ApiError::NoSuchRoute(req.path().to_string()))
}

/// The OpenAPI 3 description of this API, `docs/openapi.json`, compiled in.
pub const OPENAPI_JSON: &str = include_str!("../../docs/openapi.json");

/// `GET /openapi.json`.
async fn openapi() -> actix_web::HttpResponse {
    actix_web::HttpResponse::Ok()
        .content_type("application/json")
        .body(OPENAPI_JSON)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_ids_from_clients_are_sanitised() {
        assert!(acceptable_request_id(
            "0190f6b2-7c1e-7000-8000-000000000000"
        ));
        assert!(acceptable_request_id("abc.DEF_1"));
        assert!(!acceptable_request_id(""));
        assert!(!acceptable_request_id("a b"));
        assert!(!acceptable_request_id("x\r\nSet-Cookie: y"));
        assert!(!acceptable_request_id(&"a".repeat(129)));
    }
}
