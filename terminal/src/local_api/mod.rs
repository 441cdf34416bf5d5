//! The daemon's loopback API (docs/terminal-operations.md): JSON status, the operator's HTML page, offline
//! catalog lookup, atomic sale enqueue, outbox listing and retry, reconcile, and metrics.
//!
//! It binds loopback addresses only, and every request passes [`access`]: an allowed `Host`,
//! no foreign `Origin`, and a local token plus a JSON body on every state-changing route
//! (docs/security.md).

pub mod access;
mod page;
pub mod report;
pub mod requests;

use actix_web::dev::{ServerHandle, Service as _};
use actix_web::http::StatusCode;
use actix_web::middleware::from_fn;
use actix_web::{web, App, HttpRequest, HttpResponse, HttpServer, ResponseError};
use chrono::Utc;
use possync_protocol::{ErrorCode, ErrorEnvelope};
use prometheus::{Encoder, Gauge, IntGauge, IntGaugeVec, Opts, Registry, TextEncoder};
use std::net::{SocketAddr, TcpListener, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use thiserror::Error;
use tracing::Instrument as _;

use crate::operator::{SyncControl, SyncControlError, Till, TillError};
use access::{AccessPolicy, Gate};
pub use report::{build_report, StatusReport};
pub use requests::SaleRequest;

/// Default bind address of the status endpoint.
pub const DEFAULT_STATUS_BIND: &str = "127.0.0.1:7070";
/// Largest `POST /sales` body accepted (one sale of 500 lines fits comfortably).
const SALE_BODY_LIMIT: usize = possync_protocol::MAX_BODY_BYTES;

/// Why the status endpoint could not start.
#[derive(Debug, Error)]
pub enum StatusBindError {
    #[error("status endpoint must bind a loopback address, not {0}")]
    /// The bind address resolves to a non-loopback address.
    NotLoopback(String),
    #[error("bad status bind address {0:?}")]
    /// The bind address did not parse or resolve.
    BadAddress(String),
    #[error("--allowed-host {0:?} is not a host name or address with an optional :port")]
    /// An `--allowed-host` value that is not a host.
    BadAllowedHost(String),
    #[error("binding {addr}: {source}")]
    /// The socket could not be bound.
    Bind {
        /// The address tried.
        addr: String,
        /// The underlying error.
        source: std::io::Error,
    },
    #[error("registering metrics: {0}")]
    /// The store gauges could not be registered.
    Metrics(#[from] prometheus::Error),
}

/// A failed request, answered with the API error envelope.
#[derive(Debug, Error)]
pub enum StatusError {
    #[error(transparent)]
    /// A till operation failed.
    Till(#[from] TillError),
    /// The request body or query could not be understood.
    #[error("{message}")]
    BadRequest {
        /// The stable code the envelope carries.
        code: ErrorCode,
        /// What was wrong.
        message: String,
    },
    /// The engine could not run the command (e.g. the cloud is unreachable).
    #[error(transparent)]
    Engine(#[from] SyncControlError),
    /// The blocking pool refused the job (shutting down).
    #[error("local database worker unavailable")]
    Worker,
    /// No route of the local API has this method and path.
    #[error("no route {method} {path} (see docs/api.md, \"Terminal local API\")")]
    UnknownRoute {
        /// The request's method.
        method: String,
        /// The request's path.
        path: String,
    },
}

impl StatusError {
    fn code(&self) -> ErrorCode {
        match self {
            StatusError::Till(e) => e.code(),
            StatusError::BadRequest { code, .. } => *code,
            // The envelope speaks the contract's codes; a failure the contract has no code
            // for (`NETWORK`, `ENGINE_UNAVAILABLE`) is a failed reconcile, and its message
            // names the engine's own code.
            StatusError::Engine(e) => e.code.api().unwrap_or(ErrorCode::PosCatalogReconcileFailed),
            StatusError::Worker => ErrorCode::PosSyncStorageFailed,
            StatusError::UnknownRoute { .. } => ErrorCode::PosRequestInvalid,
        }
    }
}

impl ResponseError for StatusError {
    fn status_code(&self) -> StatusCode {
        match self {
            StatusError::Till(TillError::Invalid(_)) => StatusCode::UNPROCESSABLE_ENTITY,
            StatusError::Till(TillError::NotFound(_)) => StatusCode::NOT_FOUND,
            StatusError::Till(
                TillError::NotEnrolled | TillError::Enrollment(_) | TillError::KeyReused(_),
            ) => StatusCode::CONFLICT,
            StatusError::Till(TillError::Storage(_)) | StatusError::Worker => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            StatusError::BadRequest { .. } => StatusCode::BAD_REQUEST,
            StatusError::UnknownRoute { .. } => StatusCode::NOT_FOUND,
            StatusError::Engine(_) => StatusCode::BAD_GATEWAY,
        }
    }

    fn error_response(&self) -> HttpResponse {
        let status = self.status_code();
        HttpResponse::build(status).json(ErrorEnvelope::new(
            self.code(),
            status.as_u16(),
            self.to_string(),
        ))
    }
}

/// Any request no route takes (unknown path, or a method a path does not serve): 404 with
/// the envelope, like every other refusal of the local API.
async fn unknown_route(req: actix_web::HttpRequest) -> Result<HttpResponse, StatusError> {
    Err(StatusError::UnknownRoute {
        method: req.method().to_string(),
        path: req.path().chars().take(200).collect(),
    })
}

/// Gauges computed from the database at scrape time, beside the engine's own metrics.
#[derive(Clone)]
struct StoreGauges {
    outbox_rows: IntGaugeVec,
    catalog_entities: IntGauge,
    catalog_version: IntGauge,
    oldest_pending_age: Gauge,
}

impl StoreGauges {
    fn register(registry: &Registry) -> Result<StoreGauges, prometheus::Error> {
        let outbox_rows = IntGaugeVec::new(
            Opts::new("terminal_outbox_rows", "sync_journal rows by state"),
            &["state"],
        )?;
        let catalog_entities =
            IntGauge::new("terminal_catalog_entities", "catalog entities held locally")?;
        let catalog_version = IntGauge::new(
            "terminal_catalog_version",
            "catalog version the local copy is complete up to (-1 before the first snapshot)",
        )?;
        let oldest_pending_age = Gauge::new(
            "terminal_oldest_pending_age_seconds",
            "age of the oldest sale not yet delivered (0 when none)",
        )?;
        registry.register(Box::new(outbox_rows.clone()))?;
        registry.register(Box::new(catalog_entities.clone()))?;
        registry.register(Box::new(catalog_version.clone()))?;
        registry.register(Box::new(oldest_pending_age.clone()))?;
        Ok(StoreGauges {
            outbox_rows,
            catalog_entities,
            catalog_version,
            oldest_pending_age,
        })
    }
}

/// How long the outbox nudge of a sale waits for the sales right behind it (a basket
/// scanned, a queue at the till): they share one nudge, so the outbox claims and sends them
/// as one batch instead of committing a claim and an answer per sale while the next sales
/// wait for the same connection and disk. A sale is durable before its 201 either way; this
/// only delays its delivery by at most this long.
pub const SALE_NUDGE_DELAY: Duration = Duration::from_millis(20);

/// The one pending outbox nudge for recently recorded sales (see [`SALE_NUDGE_DELAY`]).
#[derive(Default)]
struct SaleNudge {
    pending: AtomicBool,
}

impl SaleNudge {
    /// Nudges the outbox [`SALE_NUDGE_DELAY`] from now unless a nudge is already due. A sale
    /// recorded after the due nudge took the flag down schedules the next one, so none is
    /// left without one.
    fn after_sale(self: &Arc<Self>, engine: Arc<dyn SyncControl>) {
        if self.pending.swap(true, Ordering::AcqRel) {
            return;
        }
        let me = self.clone();
        actix_web::rt::spawn(async move {
            tokio::time::sleep(SALE_NUDGE_DELAY).await;
            me.pending.store(false, Ordering::Release);
            engine.flush_outbox_now().await;
        });
    }
}

/// Shared state of the handlers.
struct Shared {
    till: Arc<dyn Till>,
    engine: Arc<dyn SyncControl>,
    sale_nudge: Arc<SaleNudge>,
    registry: Registry,
    gauges: StoreGauges,
    /// The operator page with this run's page token in it.
    page: String,
}

/// Who may use the endpoint beyond its own loopback names (see [`access`]).
#[derive(Debug, Clone)]
pub struct LocalApiConfig {
    /// The local token (`<data-dir>/local-api.token`) that opens every route.
    pub local_token: String,
    /// Further `Host` names to answer to (`--allowed-host`), each with an optional `:port`.
    pub allowed_hosts: Vec<String>,
}

type State = web::Data<Shared>;

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, TillError> + Send + 'static,
) -> Result<T, StatusError> {
    web::block(f)
        .await
        .map_err(|_| StatusError::Worker)?
        .map_err(StatusError::from)
}

async fn page(state: State) -> HttpResponse {
    let mut res = HttpResponse::Ok();
    // The page carries a token and has buttons: no other site may frame it (clickjacking),
    // and nothing it fetches leaves the till.
    res.content_type("text/html; charset=utf-8").insert_header((
        "content-security-policy",
        "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; \
         connect-src 'self'; img-src 'self'; frame-ancestors 'none'; form-action 'none'; \
         base-uri 'none'",
    ));
    for header in possync_protocol::OPERATOR_PAGE_HEADERS {
        res.insert_header(header);
    }
    res.body(state.page.clone())
}

async fn status(state: State) -> Result<HttpResponse, StatusError> {
    let view = state.engine.view();
    let till = state.till.clone();
    let report = blocking(move || build_report(till.as_ref(), Some(&view), Utc::now())).await?;
    Ok(HttpResponse::Ok()
        .insert_header(("cache-control", "no-store"))
        .json(report))
}

/// The response header marking a `POST /sales` answered from an earlier request with the
/// same `Idempotency-Key` (value `true`; absent on a sale recorded now).
pub const IDEMPOTENT_REPLAYED: &str = "idempotent-replayed";

/// `POST /sales`. The 201 carries a `Server-Timing` header (`store`: the committed enqueue,
/// `handler`: from the body read to the answer, both in ms) so a caller can tell the disk's
/// share of a slow sale from the rest (scripts/bench-terminal reports both).
///
/// With an `Idempotency-Key` (docs/terminal-operations.md, "Retrying a sale") the key is
/// looked up in the sale's own transaction: a retry of the same request is answered 201 with
/// the original receipt and `Idempotent-Replayed: true`, storing nothing; the key with another
/// request is 409 `POS_LOCAL_IDEMPOTENCY_KEY_REUSED`. A replay is 201 like the original, so
/// a client that only checks for 201 handles a retry without knowing about replays.
async fn post_sale(
    state: State,
    req: HttpRequest,
    body: web::Bytes,
) -> Result<HttpResponse, StatusError> {
    let started = std::time::Instant::now();
    let key_values: Vec<&[u8]> = req
        .headers()
        .get_all(requests::IDEMPOTENCY_KEY)
        .map(|v| v.as_bytes())
        .collect();
    let key = requests::idempotency_key(&key_values)?;
    let sale = SaleRequest::parse(&body)?;
    let till = state.till.clone();
    // The store logs the sale (one line per sale); the 201 goes out once it is committed.
    let (receipt, replayed, stored) = blocking(move || {
        let t = std::time::Instant::now();
        let (receipt, replayed) = match key {
            None => {
                let occurred_at = sale.occurred_at.unwrap_or_else(Utc::now);
                let receipt = till.enqueue_sale(sale.event_type, occurred_at, &sale.payload)?;
                (receipt, false)
            }
            // `occurred_at` goes down as given: whether the client gave it is part of the
            // request the key stands for.
            Some(key) => {
                let keyed = till.enqueue_sale_keyed(
                    &key,
                    sale.event_type,
                    sale.occurred_at,
                    &sale.payload,
                )?;
                (keyed.receipt, keyed.replayed)
            }
        };
        Ok((receipt, replayed, t.elapsed()))
    })
    .await?;
    // A replay stored nothing new: there is nothing to deliver sooner.
    if !replayed {
        state.sale_nudge.after_sale(state.engine.clone());
    }
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let mut res = HttpResponse::Created();
    res.insert_header((
        "server-timing",
        format!(
            "store;dur={:.3}, handler;dur={:.3}",
            ms(stored),
            ms(started.elapsed())
        ),
    ));
    if replayed {
        res.insert_header((IDEMPOTENT_REPLAYED, "true"));
    }
    Ok(res.json(receipt))
}

async fn lookup(state: State, req: HttpRequest) -> Result<HttpResponse, StatusError> {
    let query = requests::lookup_query(req.query_string())?;
    let till = state.till.clone();
    let entities = blocking(move || till.lookup(&query)).await?;
    Ok(HttpResponse::Ok().json(serde_json::json!({
        "count": entities.len(),
        "entities": entities,
    })))
}

async fn outbox(state: State, req: HttpRequest) -> Result<HttpResponse, StatusError> {
    let (filter, limit) = requests::outbox_query(req.query_string())?;
    let till = state.till.clone();
    let rows = blocking(move || till.journal(filter, limit)).await?;
    Ok(HttpResponse::Ok().json(serde_json::json!({"count": rows.len(), "rows": rows})))
}

async fn outbox_retry(state: State, body: web::Bytes) -> Result<HttpResponse, StatusError> {
    let selection = requests::retry_selection(&body)?;
    let till = state.till.clone();
    let released = blocking(move || till.retry(selection)).await?;
    tracing::info!(released, "operator retry");
    if released > 0 {
        let engine = state.engine.clone();
        actix_web::rt::spawn(async move { engine.flush_outbox_now().await });
    }
    Ok(HttpResponse::Ok().json(serde_json::json!({"released": released})))
}

async fn reconcile(state: State, body: web::Bytes) -> Result<HttpResponse, StatusError> {
    let mode = requests::reconcile_choice(&body)?;
    let report = state.engine.reconcile(mode).await?;
    Ok(HttpResponse::Ok().json(report))
}

async fn metrics(state: State) -> Result<HttpResponse, StatusError> {
    let till = state.till.clone();
    let (summary, counts) =
        blocking(move || Ok((till.catalog_summary()?, till.outbox_counts()?))).await?;
    let g = &state.gauges;
    for (label, n) in [
        ("pending", counts.pending),
        ("in_flight", counts.in_flight),
        ("failed", counts.failed),
        ("synced", counts.synced),
        ("needs_attention", counts.needs_attention),
    ] {
        g.outbox_rows.with_label_values(&[label]).set(n);
    }
    g.catalog_entities.set(summary.entities);
    g.catalog_version.set(summary.version.unwrap_or(-1));
    let age = counts
        .oldest_pending_at
        .map(|t| (Utc::now() - t).num_milliseconds().max(0) as f64 / 1000.0)
        .unwrap_or(0.0);
    g.oldest_pending_age.set(age);
    let mut buf = Vec::new();
    TextEncoder::new()
        .encode(&state.registry.gather(), &mut buf)
        .map_err(|e| StatusError::Till(TillError::Storage(format!("encoding metrics: {e}"))))?;
    Ok(HttpResponse::Ok()
        .content_type(TextEncoder::new().format_type())
        .body(buf))
}

/// Resolves `bind` and refuses anything that is not a loopback address.
pub fn loopback_addr(bind: &str) -> Result<SocketAddr, StatusBindError> {
    let addrs: Vec<SocketAddr> = bind
        .to_socket_addrs()
        .map_err(|_| StatusBindError::BadAddress(bind.to_string()))?
        .collect();
    let first = addrs
        .first()
        .copied()
        .ok_or_else(|| StatusBindError::BadAddress(bind.to_string()))?;
    if addrs.iter().all(|a| a.ip().is_loopback()) {
        Ok(first)
    } else {
        Err(StatusBindError::NotLoopback(bind.to_string()))
    }
}

/// A running status endpoint.
pub struct StatusServer {
    addr: SocketAddr,
    handle: ServerHandle,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
}

impl StatusServer {
    /// Binds `bind` (loopback only; port 0 picks a free port) and starts serving on the
    /// current tokio runtime, admitting requests by `access`.
    pub fn start(
        bind: &str,
        access: LocalApiConfig,
        till: Arc<dyn Till>,
        engine: Arc<dyn SyncControl>,
        registry: Registry,
    ) -> Result<StatusServer, StatusBindError> {
        let addr = loopback_addr(bind)?;
        if let Some(bad) = access
            .allowed_hosts
            .iter()
            .find(|h| !access::valid_allowed_host(h))
        {
            return Err(StatusBindError::BadAllowedHost(bad.clone()));
        }
        let gauges = StoreGauges::register(&registry)?;
        let listener = TcpListener::bind(addr).map_err(|source| StatusBindError::Bind {
            addr: addr.to_string(),
            source,
        })?;
        let local = listener
            .local_addr()
            .map_err(|source| StatusBindError::Bind {
                addr: addr.to_string(),
                source,
            })?;
        // Every request's log lines carry who this terminal is (read once: enrollment does
        // not change while the daemon runs).
        let (terminal_id, branch_id) = match till.identity() {
            Ok(id) => (
                id.terminal_id.map(|t| t.to_string()).unwrap_or_default(),
                id.branch_id.unwrap_or_default(),
            ),
            Err(_) => (String::new(), String::new()),
        };
        let policy = AccessPolicy::new(local.port(), &access.allowed_hosts, &access.local_token);
        let page_html = page::with_token(policy.page_token());
        let gate = web::Data::new(Gate::register(policy, &registry)?);
        let shared = web::Data::new(Shared {
            till,
            sale_nudge: Arc::default(),
            engine,
            registry,
            gauges,
            page: page_html,
        });
        let server = HttpServer::new(move || {
            let (terminal_id, branch_id) = (terminal_id.clone(), branch_id.clone());
            App::new()
                // Registered first, so it runs inside the span below: refusals are logged
                // with the terminal's ids.
                .wrap(from_fn(access::guard))
                .wrap_fn(move |req, srv| {
                    let span = tracing::info_span!(
                        "status_request",
                        terminalId = %terminal_id,
                        branchId = %branch_id,
                        method = %req.method(),
                        path = %req.path(),
                    );
                    srv.call(req).instrument(span)
                })
                .app_data(shared.clone())
                .app_data(gate.clone())
                .app_data(web::PayloadConfig::new(SALE_BODY_LIMIT))
                .route("/", web::get().to(page))
                .route("/status", web::get().to(status))
                .route("/sales", web::post().to(post_sale))
                .route("/catalog/lookup", web::get().to(lookup))
                .route("/outbox", web::get().to(outbox))
                .route("/outbox/retry", web::post().to(outbox_retry))
                .route("/reconcile", web::post().to(reconcile))
                .route("/metrics", web::get().to(metrics))
                .default_service(web::to(unknown_route))
        })
        .workers(2)
        .disable_signals()
        .shutdown_timeout(5)
        .listen(listener)
        .map_err(|source| StatusBindError::Bind {
            addr: addr.to_string(),
            source,
        })?
        .run();
        let handle = server.handle();
        let task = tokio::spawn(server);
        Ok(StatusServer {
            addr: local,
            handle,
            task,
        })
    }

    /// The address actually bound (useful with port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://ADDR` of the endpoint.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Stops accepting, lets in-flight requests finish, and joins the server.
    pub async fn stop(self) {
        self.handle.stop(true).await;
        match self.task.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "status endpoint stopped with an error"),
            Err(e) => tracing::warn!(error = %e, "status endpoint task failed"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_loopback_binds_are_accepted() {
        assert!(loopback_addr("127.0.0.1:0").is_ok());
        assert!(loopback_addr("[::1]:7070").is_ok());
        assert!(matches!(
            loopback_addr("0.0.0.0:7070"),
            Err(StatusBindError::NotLoopback(_))
        ));
        assert!(matches!(
            loopback_addr("192.168.1.10:7070"),
            Err(StatusBindError::NotLoopback(_))
        ));
        assert!(matches!(
            loopback_addr("not an address"),
            Err(StatusBindError::BadAddress(_))
        ));
    }
}
