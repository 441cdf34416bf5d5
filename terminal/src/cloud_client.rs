//! The production [`CloudApi`]: the cloud's `/v1/pos/*` routes over HTTPS with `reqwest`.
//!
//! Its one job beyond moving bytes is to *classify* every failure the way the engine's retry
//! decision needs it: no answer at all is [`CloudError::Unreachable`] (retry later, the sale is
//! safe in the outbox), an error envelope is [`CloudError::Rejected`] with its stable code,
//! `Retry-After` and `details.reason`, and a 2xx that does not parse is
//! [`CloudError::BadResponse`]. Every request carries a fresh UUID v7 `x-request-id` so a log
//! line on the terminal can be matched with the cloud's.

use async_trait::async_trait;
use possync_actors::backoff::MAX_RETRY_AFTER;
use possync_actors::{CloudApi, CloudError, Traffic};
use possync_protocol::fingerprint::{
    FingerprintRequest, FingerprintResponse, LeafReconcileRequest,
};
use possync_protocol::{
    DeltaPage, ErrorCode, ErrorEnvelope, HeldKeysPage, ReconcileRequest, ReconcileResponse,
    SaleEvent, SalesEventsRequest, SalesEventsResponse, SnapshotPage, SyncStatus,
    DEVICE_NONCE_HEADER, POS_API_PREFIX, REQUEST_ID_HEADER, TILL_CATALOG_VERSION_HEADER,
    TILL_NEEDS_ATTENTION_HEADER,
};
use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, Opts, Registry};
use reqwest::header::{HeaderMap, RETRY_AFTER};
use reqwest::{Method, StatusCode};
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::collections::HashMap;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};
use uuid::Uuid;

/// Header naming which delivery attempt of a batch this is (1-based), so the cloud's logs can
/// tell a first delivery from a retry without a lookup.
pub const SYNC_ATTEMPT_HEADER: &str = "x-sync-attempt";

/// How long to wait for a TCP/TLS connection before calling the cloud unreachable. Short: a
/// till that is offline must find out quickly and keep selling.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest a whole request may take (a 1000-entity snapshot page on a slow link included).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
/// Idle pooled connections are closed after this (below nginx's default 75 s keep-alive).
const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// TCP keep-alive probes on the pooled connection, so a dead path is noticed.
const TCP_KEEPALIVE: Duration = Duration::from_secs(30);

/// Parses a PEM file of one or more CA certificates for [`HttpCloud::trusting`]; the error
/// says what is wrong with the file.
pub fn parse_ca_pem(pem: &str) -> Result<Vec<reqwest::Certificate>, String> {
    let certs = reqwest::Certificate::from_pem_bundle(pem.as_bytes())
        .map_err(|e| format!("CA certificate is not PEM: {e}"))?;
    if certs.is_empty() {
        return Err("the CA certificate file holds no certificate".into());
    }
    Ok(certs)
}

/// The content encoding the terminal asks for on the cloud's JSON answers (snapshot and
/// delta pages above all). `zstd` is the default: on the benchmark's catalog it moves ~9×
/// fewer bytes than identity for a few ms of CPU per 1 000-entity page on each side; `gzip`
/// is for a proxy that strips zstd; `identity` for a fast LAN where bytes cost nothing and
/// CPU does (docs/terminal-operations.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum CatalogEncoding {
    /// `Accept-Encoding: gzip, zstd` (the cloud prefers zstd).
    #[default]
    Zstd,
    /// `Accept-Encoding: gzip`.
    Gzip,
    /// No compression.
    Identity,
}

impl CatalogEncoding {
    /// The name used on the command line and in `POSSYNC_CATALOG_ENCODING`.
    pub fn name(self) -> &'static str {
        match self {
            CatalogEncoding::Zstd => "zstd",
            CatalogEncoding::Gzip => "gzip",
            CatalogEncoding::Identity => "identity",
        }
    }
}

/// How this terminal's HTTP clients are built: timeouts, the CAs it trusts beyond the web PKI
/// (`terminal enroll --ca-cert`), one pooled keep-alive connection per cloud whose idle
/// connections are dropped before a proxy's usual 60–75 s keep-alive timeout closes them under
/// us. Kept so [`HttpCloud::with_catalog_encoding`] can rebuild the answer client.
#[derive(Clone)]
struct ClientSettings {
    connect: Duration,
    request: Duration,
    roots: Vec<reqwest::Certificate>,
}

impl ClientSettings {
    fn builder(&self) -> reqwest::ClientBuilder {
        let mut b = reqwest::Client::builder()
            .connect_timeout(self.connect)
            .timeout(self.request)
            .pool_idle_timeout(POOL_IDLE_TIMEOUT)
            .tcp_keepalive(TCP_KEEPALIVE)
            .user_agent(concat!("possync-terminal/", env!("CARGO_PKG_VERSION")));
        for root in &self.roots {
            b = b.add_root_certificate(root.clone());
        }
        b
    }

    /// The client for answers the engine decodes as they arrive: decoders for `encoding`
    /// (which also sets the `Accept-Encoding` it sends).
    fn answers(&self, encoding: CatalogEncoding) -> Result<reqwest::Client, CloudError> {
        self.builder()
            .gzip(encoding != CatalogEncoding::Identity)
            .zstd(encoding == CatalogEncoding::Zstd)
            .build()
            .map_err(|e| CloudError::Unreachable(format!("building HTTP client: {e}")))
    }

    /// The client that leaves bodies as they came over the wire (to count their bytes).
    fn wire(&self) -> Result<reqwest::Client, CloudError> {
        self.builder()
            .no_gzip()
            .no_zstd()
            .build()
            .map_err(|e| CloudError::Unreachable(format!("building HTTP client: {e}")))
    }
}

/// Where a cloud is and how this terminal authenticates to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CloudTarget {
    /// Base URL, e.g. `https://cloud.example.com` (no trailing `/v1`).
    pub base_url: String,
    /// The terminal's bearer token.
    pub token: String,
}

/// `reqwest`-backed client of the cloud sync API.
///
/// Cloning is cheap and shares the connection pool.
#[derive(Clone)]
pub struct HttpCloud {
    client: reqwest::Client,
    /// Without transparent decompression: the reconcile family counts its wire bytes.
    wire: reqwest::Client,
    /// Requests and wire bytes of the reconcile family (see [`CloudApi::reconcile_traffic`]).
    traffic: Arc<std::sync::Mutex<Traffic>>,
    /// Shared by every clone, so a reloaded token serves the whole engine at once.
    target: Arc<RwLock<CloudTarget>>,
    /// Reads the enrollment saved now (e.g. by `terminal token set` in another process).
    reload: Option<TargetSource>,
    device_nonce: Option<String>,
    /// Nonces of the databases this one was copied from, for the sales it inherited.
    inherited_nonces: Arc<HashMap<Uuid, String>>,
    metrics: Option<ClientMetrics>,
    /// How the clients were built, kept to rebuild `client` for another encoding.
    settings: ClientSettings,
    /// What this till reports about itself with every request (shared by every clone).
    report: Arc<TillReporting>,
}

/// What a till tells the cloud about itself with each request, for the fleet view: the
/// catalog version its copy is at and how many of its sales wait for an operator (headers
/// `x-possync-catalog-version`, `x-possync-needs-attention`). Kept current by the daemon;
/// a figure not known yet is not sent.
#[derive(Debug)]
pub struct TillReporting {
    catalog_version: AtomicI64,
    needs_attention: AtomicI64,
}

impl Default for TillReporting {
    fn default() -> Self {
        TillReporting {
            catalog_version: AtomicI64::new(UNKNOWN),
            needs_attention: AtomicI64::new(UNKNOWN),
        }
    }
}

/// A figure not known (not sent).
const UNKNOWN: i64 = -1;

impl TillReporting {
    /// Sets the figures sent from now on (`None`: not known, not sent).
    pub fn set(&self, catalog_version: Option<i64>, needs_attention: Option<i64>) {
        let store = |cell: &AtomicI64, v: Option<i64>| {
            cell.store(v.filter(|n| *n >= 0).unwrap_or(UNKNOWN), Ordering::Relaxed)
        };
        store(&self.catalog_version, catalog_version);
        store(&self.needs_attention, needs_attention);
    }

    /// The headers to send: each known figure with its name.
    fn headers(&self) -> impl Iterator<Item = (&'static str, String)> + '_ {
        [
            (TILL_CATALOG_VERSION_HEADER, &self.catalog_version),
            (TILL_NEEDS_ATTENTION_HEADER, &self.needs_attention),
        ]
        .into_iter()
        .filter_map(|(name, cell)| {
            let v = cell.load(Ordering::Relaxed);
            (v >= 0).then(|| (name, v.to_string()))
        })
    }
}

/// The headers of a sales delivery: its attempt number and the device nonce it is sent with.
#[derive(Debug, Clone, Copy)]
struct Delivery<'a> {
    attempt: u32,
    nonce: Option<&'a str>,
}

/// Reads the current [`CloudTarget`] from where the enrollment is kept; blocking.
pub type TargetSource = Arc<dyn Fn() -> Option<CloudTarget> + Send + Sync>;

impl std::fmt::Debug for HttpCloud {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpCloud")
            .field("base_url", &self.base_url())
            .field("device_nonce", &self.device_nonce)
            .finish_non_exhaustive()
    }
}

/// Per-route request counts by outcome and latency, so an operator can tell "the cloud is
/// slow" from "the cloud refuses us" from "no network" on `/metrics`.
#[derive(Debug, Clone)]
struct ClientMetrics {
    requests: IntCounterVec,
    seconds: HistogramVec,
}

impl HttpCloud {
    /// Builds a client with connect/request timeouts, zstd (or gzip) answers and rustls (the
    /// platform's web PKI roots only).
    pub fn new(target: CloudTarget) -> Result<HttpCloud, CloudError> {
        Self::build(target, CONNECT_TIMEOUT, REQUEST_TIMEOUT, None)
    }

    /// As [`HttpCloud::new`], also trusting the CA certificate(s) in `ca_pem` (PEM, one or
    /// more): a cloud behind a TLS proxy whose certificate a private CA issued (the one
    /// `terminal enroll --ca-cert` stored).
    pub fn trusting(target: CloudTarget, ca_pem: Option<&str>) -> Result<HttpCloud, CloudError> {
        Self::build(target, CONNECT_TIMEOUT, REQUEST_TIMEOUT, ca_pem)
    }

    /// As [`HttpCloud::new`] with explicit timeouts (tests use short ones).
    pub fn with_timeouts(
        target: CloudTarget,
        connect: Duration,
        request: Duration,
    ) -> Result<HttpCloud, CloudError> {
        Self::build(target, connect, request, None)
    }

    fn build(
        target: CloudTarget,
        connect: Duration,
        request: Duration,
        ca_pem: Option<&str>,
    ) -> Result<HttpCloud, CloudError> {
        let roots = match ca_pem {
            Some(pem) => parse_ca_pem(pem)
                .map_err(|e| CloudError::Unreachable(format!("building HTTP client: {e}")))?,
            None => Vec::new(),
        };
        let settings = ClientSettings {
            connect,
            request,
            roots,
        };
        Ok(HttpCloud {
            client: settings.answers(CatalogEncoding::default())?,
            wire: settings.wire()?,
            traffic: Arc::default(),
            target: Arc::new(RwLock::new(CloudTarget {
                base_url: target.base_url.trim_end_matches('/').to_string(),
                token: target.token,
            })),
            reload: None,
            device_nonce: None,
            inherited_nonces: Arc::new(HashMap::new()),
            metrics: None,
            settings,
            report: Arc::default(),
        })
    }

    /// `req` with the till's report headers (those known).
    fn with_report(&self, mut req: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        for (name, value) in self.report.headers() {
            req = req.header(name, value);
        }
        req
    }

    /// What this client reports about the till with every request; the daemon keeps it
    /// current ([`TillReporting::set`]).
    pub fn reporting(&self) -> Arc<TillReporting> {
        self.report.clone()
    }

    /// Asks for `encoding` on the cloud's JSON answers (default [`CatalogEncoding::Zstd`]).
    pub fn with_catalog_encoding(
        mut self,
        encoding: CatalogEncoding,
    ) -> Result<HttpCloud, CloudError> {
        self.client = self.settings.answers(encoding)?;
        Ok(self)
    }

    /// Sends `x-device-nonce` with every sales request, so the cloud can tell a second
    /// database using this `pos_id` (a cloned disk, a restored backup) from this one.
    pub fn with_device_nonce(mut self, nonce: Uuid) -> HttpCloud {
        self.device_nonce = Some(nonce.to_string());
        self
    }

    /// Sends `nonce` instead of this device's for sales of `pos_id`: sales inherited from the
    /// database this one was copied from are delivered as that database would deliver them.
    pub fn with_inherited_nonces(
        mut self,
        by_pos: impl IntoIterator<Item = (Uuid, Uuid)>,
    ) -> HttpCloud {
        self.inherited_nonces = Arc::new(
            by_pos
                .into_iter()
                .map(|(pos, nonce)| (pos, nonce.to_string()))
                .collect(),
        );
        self
    }

    /// On a `POS_SYNC_UNAUTHORIZED` answer, re-reads the target from `source` and, if the
    /// token or URL changed since (a rotation taken with `terminal token set`, a re-enrollment
    /// while the daemon runs), retries the request once with the new one.
    pub fn with_reload(mut self, source: TargetSource) -> HttpCloud {
        self.reload = Some(source);
        self
    }

    /// Takes the target from the reload source now if it changed (a `terminal enroll` with a
    /// new cloud URL while the daemon runs, when the old URL may just be unreachable rather
    /// than refusing). Returns whether it changed.
    pub async fn refresh(&self) -> bool {
        let used = self.current();
        self.reloaded(&used).await
    }

    fn current(&self) -> CloudTarget {
        self.target
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    /// Takes a newer target from the reload source; `true` if it differs from `used`.
    async fn reloaded(&self, used: &CloudTarget) -> bool {
        let Some(source) = self.reload.clone() else {
            return false;
        };
        let fresh = match tokio::task::spawn_blocking(move || source()).await {
            Ok(Some(t)) => CloudTarget {
                base_url: t.base_url.trim_end_matches('/').to_string(),
                token: t.token,
            },
            _ => return false,
        };
        if fresh == *used {
            return false;
        }
        tracing::info!(cloud = %fresh.base_url, "enrollment changed since the last request; using the new token");
        *self
            .target
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner()) = fresh;
        true
    }

    /// Registers `terminal_cloud_requests_total{route,outcome}` (outcome `ok` or the failure's
    /// code, e.g. `NETWORK`, `POS_SYNC_RATE_LIMITED`) and `terminal_cloud_request_seconds{route}`
    /// in `registry`, and records every request from then on.
    pub fn with_metrics(mut self, registry: &Registry) -> Result<HttpCloud, prometheus::Error> {
        let requests = IntCounterVec::new(
            Opts::new(
                "terminal_cloud_requests_total",
                "requests to the cloud sync API by route and outcome",
            ),
            &["route", "outcome"],
        )?;
        let seconds = HistogramVec::new(
            HistogramOpts::new(
                "terminal_cloud_request_seconds",
                "time to a complete cloud answer (or failure), by route",
            ),
            &["route"],
        )?;
        registry.register(Box::new(requests.clone()))?;
        registry.register(Box::new(seconds.clone()))?;
        self.metrics = Some(ClientMetrics { requests, seconds });
        Ok(self)
    }

    /// The base URL requests go to.
    pub fn base_url(&self) -> String {
        self.current().base_url
    }

    /// `GET /v1/pos/sales/held`: the keys the cloud holds for `pos_id` above `after`.
    pub async fn held_keys(
        &self,
        pos_id: Uuid,
        after: i64,
        limit: usize,
    ) -> Result<HeldKeysPage, CloudError> {
        let q = [
            ("pos_id", pos_id.to_string()),
            ("after", after.to_string()),
            ("limit", limit.to_string()),
        ];
        self.call::<(), _>(Method::GET, "/sales/held", &q, None, None)
            .await
    }

    /// `GET /v1/pos/sync/status`: used by `terminal enroll` to prove the token works and names
    /// the terminal and branch the operator typed.
    pub async fn sync_status(&self) -> Result<SyncStatus, CloudError> {
        self.call::<(), SyncStatus>(Method::GET, "/sync/status", &[], None, None)
            .await
    }

    /// Counts one call by route and outcome (`ok` or the error's code) and times it.
    fn observe(&self, route: &str, started: Instant, error: Option<&CloudError>) {
        if let Some(m) = &self.metrics {
            let outcome = error.map_or_else(|| "ok".to_string(), |e| e.code().to_string());
            m.requests
                .with_label_values(&[route, outcome.as_str()])
                .inc();
            m.seconds
                .with_label_values(&[route])
                .observe(started.elapsed().as_secs_f64());
        }
    }

    async fn call<B: Serialize + ?Sized, T: DeserializeOwned>(
        &self,
        method: Method,
        route: &'static str,
        query: &[(&str, String)],
        body: Option<&B>,
        sync_attempt: Option<u32>,
    ) -> Result<T, CloudError> {
        let delivery = sync_attempt.map(|attempt| Delivery {
            attempt,
            nonce: None,
        });
        self.call_with_delivery(method, route, query, body, delivery)
            .await
    }

    async fn call_with_delivery<B: Serialize + ?Sized, T: DeserializeOwned>(
        &self,
        method: Method,
        route: &'static str,
        query: &[(&str, String)],
        body: Option<&B>,
        delivery: Option<Delivery<'_>>,
    ) -> Result<T, CloudError> {
        let started = Instant::now();
        let used = self.current();
        let mut result = self
            .call_once(&used, method.clone(), route, query, body, delivery)
            .await;
        if matches!(
            &result,
            Err(CloudError::Rejected {
                code: Some(ErrorCode::PosSyncUnauthorized),
                ..
            })
        ) && self.reloaded(&used).await
        {
            let fresh = self.current();
            result = self
                .call_once(&fresh, method, route, query, body, delivery)
                .await;
        }
        self.observe(route, started, result.as_ref().err());
        result
    }

    /// A `POST` of the reconcile family: JSON body, gzip answer decoded here, both sizes
    /// counted as they crossed the wire.
    async fn call_counted<B: Serialize + ?Sized, T: DeserializeOwned>(
        &self,
        route: &'static str,
        body: &B,
    ) -> Result<T, CloudError> {
        let started = Instant::now();
        let target = self.current();
        let url = format!("{}{}{}", target.base_url, POS_API_PREFIX, route);
        let request_id = Uuid::now_v7().to_string();
        let json = serde_json::to_vec(body)
            .map_err(|e| CloudError::BadResponse(format!("encoding {route}: {e}")))?;
        let sent = json.len() as u64;
        let result = async {
            let resp = self
                .with_report(self.wire.post(&url))
                .bearer_auth(&target.token)
                .header(REQUEST_ID_HEADER, &request_id)
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .header(reqwest::header::ACCEPT_ENCODING, "gzip")
                .body(json)
                .send()
                .await
                .map_err(|e| CloudError::Unreachable(describe(&e)))?;
            let status = resp.status();
            let headers = resp.headers().clone();
            let raw = resp.bytes().await.map_err(|e| {
                CloudError::Unreachable(format!("reading response: {}", describe(&e)))
            })?;
            {
                let mut t = self.traffic.lock().unwrap_or_else(|e| e.into_inner());
                t.requests += 1;
                t.bytes_sent += sent;
                t.bytes_received += raw.len() as u64;
            }
            let gzipped = headers
                .get(reqwest::header::CONTENT_ENCODING)
                .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"gzip"));
            let body = if gzipped {
                let mut out = Vec::with_capacity(raw.len() * 4);
                std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(&raw[..]), &mut out)
                    .map_err(|e| CloudError::BadResponse(format!("{route}: bad gzip: {e}")))?;
                out
            } else {
                raw.to_vec()
            };
            if status.is_success() {
                serde_json::from_slice(&body)
                    .map_err(|e| CloudError::BadResponse(format!("POST {route}: {e}")))
            } else {
                Err(rejection(status, &headers, &body))
            }
        }
        .await;
        self.observe(route, started, result.as_ref().err());
        result
    }

    async fn call_once<B: Serialize + ?Sized, T: DeserializeOwned>(
        &self,
        target: &CloudTarget,
        method: Method,
        route: &str,
        query: &[(&str, String)],
        body: Option<&B>,
        delivery: Option<Delivery<'_>>,
    ) -> Result<T, CloudError> {
        let url = format!("{}{}{}", target.base_url, POS_API_PREFIX, route);
        let request_id = Uuid::now_v7().to_string();
        let mut req = self
            .client
            .request(method.clone(), &url)
            .bearer_auth(&target.token)
            .header(REQUEST_ID_HEADER, &request_id);
        req = self.with_report(req);
        if !query.is_empty() {
            req = req.query(query);
        }
        if let Some(d) = delivery {
            req = req.header(SYNC_ATTEMPT_HEADER, d.attempt.to_string());
            if let Some(nonce) = d.nonce {
                req = req.header(DEVICE_NONCE_HEADER, nonce);
            }
        }
        if let Some(body) = body {
            req = req.json(body);
        }
        let resp = req.send().await.map_err(|e| {
            tracing::debug!(requestId = %request_id, route, error = %e, "cloud unreachable");
            CloudError::Unreachable(describe(&e))
        })?;
        let status = resp.status();
        let headers = resp.headers().clone();
        // A body cut off mid-way is a network failure, not a bad answer: retry it.
        let bytes = resp
            .bytes()
            .await
            .map_err(|e| CloudError::Unreachable(format!("reading response: {}", describe(&e))))?;
        tracing::debug!(
            requestId = %request_id,
            route,
            status = status.as_u16(),
            bytes = bytes.len(),
            "cloud answered"
        );
        if status.is_success() {
            serde_json::from_slice(&bytes)
                .map_err(|e| CloudError::BadResponse(format!("{method} {route}: {e}")))
        } else {
            Err(rejection(status, &headers, &bytes))
        }
    }
}

/// A short, single-line cause for a transport error (`reqwest` chains hold the useful part).
fn describe(e: &reqwest::Error) -> String {
    let mut out = if e.is_timeout() {
        "timed out".to_string()
    } else if e.is_connect() {
        "connection failed".to_string()
    } else {
        e.to_string()
    };
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

/// Turns a non-2xx answer into [`CloudError::Rejected`], reading the API error envelope when
/// there is one.
fn rejection(status: StatusCode, headers: &HeaderMap, body: &[u8]) -> CloudError {
    // Delta-seconds only (an HTTP-date is ignored: the till's clock may be wrong), clamped to
    // `MAX_RETRY_AFTER` (1 h): a proxy's absurd value slows the till down, never parks it for
    // years nor overflows the backoff's clock arithmetic. A number too long for u64 is
    // clamped too, not ignored: the server did ask for a long wait.
    let retry_after = headers
        .get(RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|v| !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()))
        .map(|v| {
            v.parse::<u64>()
                .map_or(MAX_RETRY_AFTER, Duration::from_secs)
                .min(MAX_RETRY_AFTER)
        });
    match serde_json::from_slice::<ErrorEnvelope>(body) {
        Ok(env) => CloudError::Rejected {
            status: status.as_u16(),
            code: Some(env.error.code),
            message: env.error.message,
            retry_after,
            reason: env
                .error
                .details
                .get("reason")
                .and_then(|r| r.as_str())
                .map(str::to_string),
        },
        Err(_) => {
            // No envelope (a proxy's error page, or an unknown code): keep a short excerpt.
            let text = String::from_utf8_lossy(body);
            let excerpt: String = text.chars().take(200).collect();
            let code = parse_code_loosely(&text);
            CloudError::Rejected {
                status: status.as_u16(),
                code,
                message: if excerpt.trim().is_empty() {
                    status.to_string()
                } else {
                    excerpt
                },
                retry_after,
                reason: None,
            }
        }
    }
}

/// Finds a stable code in an envelope whose other fields did not parse.
fn parse_code_loosely(text: &str) -> Option<ErrorCode> {
    let v: serde_json::Value = serde_json::from_str(text).ok()?;
    ErrorCode::parse(v.get("error")?.get("code")?.as_str()?)
}

#[async_trait]
impl CloudApi for HttpCloud {
    async fn snapshot(&self, cursor: Option<&str>, limit: u32) -> Result<SnapshotPage, CloudError> {
        let mut q = vec![("limit", limit.to_string())];
        if let Some(c) = cursor {
            q.push(("cursor", c.to_string()));
        }
        self.call::<(), _>(Method::GET, "/catalog/snapshot", &q, None, None)
            .await
    }

    async fn delta(&self, since: i64, limit: u32) -> Result<DeltaPage, CloudError> {
        let q = [("since", since.to_string()), ("limit", limit.to_string())];
        self.call::<(), _>(Method::GET, "/catalog/delta", &q, None, None)
            .await
    }

    async fn reconcile(&self, req: &ReconcileRequest) -> Result<ReconcileResponse, CloudError> {
        self.call_counted("/catalog/reconcile", req).await
    }

    async fn fingerprints(
        &self,
        req: &FingerprintRequest,
    ) -> Result<FingerprintResponse, CloudError> {
        self.call_counted("/catalog/fingerprints", req).await
    }

    async fn reconcile_leaves(
        &self,
        req: &LeafReconcileRequest,
    ) -> Result<ReconcileResponse, CloudError> {
        self.call_counted("/catalog/reconcile/leaves", req).await
    }

    fn reconcile_traffic(&self) -> Traffic {
        *self.traffic.lock().unwrap_or_else(|e| e.into_inner())
    }

    async fn post_events(
        &self,
        events: &[SaleEvent],
        sync_attempt: u32,
    ) -> Result<SalesEventsResponse, CloudError> {
        // The outbox sends one pos_id per request (`claim_batch`), so the first event's
        // pos_id says whose nonce this is.
        let nonce = events
            .first()
            .and_then(|e| self.inherited_nonces.get(&e.pos_id))
            .or(self.device_nonce.as_ref())
            .cloned();
        let body = SalesEventsRequest {
            events: events.to_vec(),
        };
        let delivery = Delivery {
            attempt: sync_attempt,
            nonce: nonce.as_deref(),
        };
        self.call_with_delivery(
            Method::POST,
            "/sales/events",
            &[],
            Some(&body),
            Some(delivery),
        )
        .await
    }

    async fn probe(&self) -> Result<(), CloudError> {
        // `/readyz` needs no token and answers 200 only when the cloud's database does; the
        // body is not read beyond the status (any 2xx means back).
        let url = format!("{}/readyz", self.base_url());
        let resp = self
            .client
            .get(&url)
            .send()
            .await
            .map_err(|e| CloudError::Unreachable(describe(&e)))?;
        let status = resp.status();
        if status.is_success() {
            return Ok(());
        }
        let headers = resp.headers().clone();
        let body = resp
            .bytes()
            .await
            .map_err(|e| CloudError::Unreachable(format!("reading response: {}", describe(&e))))?;
        Err(rejection(status, &headers, &body))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use possync_actors::TerminalCode;
    use reqwest::header::HeaderValue;

    use actix_web::{web, App, HttpRequest, HttpResponse, HttpServer};
    use possync_protocol::{EventStatus, EventType, SalePayload};

    /// A stand-in cloud: a 429 with `Retry-After` on delta, a 200 that is not JSON on
    /// snapshot, and an events route that echoes the headers it saw into `message`.
    async fn fake_cloud() -> (String, actix_web::dev::ServerHandle) {
        let server = HttpServer::new(|| {
            App::new()
                .route(
                    "/v1/pos/catalog/delta",
                    web::get().to(|| async {
                        HttpResponse::TooManyRequests()
                            .insert_header(("retry-after", "3"))
                            .json(ErrorEnvelope::new(
                                ErrorCode::PosSyncRateLimited,
                                429,
                                "slow down",
                            ))
                    }),
                )
                .route(
                    "/v1/pos/catalog/snapshot",
                    web::get().to(|| async { HttpResponse::Ok().body("{\"snapshot_version\": ") }),
                )
                .route(
                    "/v1/pos/sales/events",
                    web::post().to(
                        |req: HttpRequest, body: web::Json<SalesEventsRequest>| async move {
                            let h = |n: &str| {
                                req.headers()
                                    .get(n)
                                    .and_then(|v| v.to_str().ok())
                                    .unwrap_or("")
                                    .to_string()
                            };
                            let seen = format!(
                                "{}|{}|{}|{}|{}",
                                h("authorization"),
                                h(SYNC_ATTEMPT_HEADER),
                                Uuid::parse_str(&h(REQUEST_ID_HEADER))
                                    .map(|u| u.get_version_num())
                                    .unwrap_or(0),
                                h(TILL_CATALOG_VERSION_HEADER),
                                h(TILL_NEEDS_ATTENTION_HEADER)
                            );
                            HttpResponse::Ok().json(SalesEventsResponse {
                                results: body
                                    .events
                                    .iter()
                                    .map(|e| possync_protocol::EventResult {
                                        local_event_id: Some(e.local_event_id),
                                        status: EventStatus::Accepted,
                                        code: None,
                                        cloud_event_id: None,
                                        message: Some(seen.clone()),
                                    })
                                    .collect(),
                            })
                        },
                    ),
                )
        })
        .workers(1)
        .disable_signals()
        .bind("127.0.0.1:0")
        .expect("bind");
        let addr = server.addrs()[0];
        let server = server.run();
        let handle = server.handle();
        tokio::spawn(server);
        (format!("http://{addr}"), handle)
    }

    fn client(base_url: String) -> HttpCloud {
        HttpCloud::new(CloudTarget {
            base_url,
            token: "pst_secret".into(),
        })
        .expect("client")
    }

    fn event(id: i64) -> SaleEvent {
        let payload: SalePayload = serde_json::from_value(serde_json::json!({
            "receipt_no": "R1", "currency": "EUR",
            "lines": [{"product_id": "p1", "qty": 1, "unit_price_minor": 100, "total_minor": 100}],
            "totals": {"subtotal_minor": 100, "tax_minor": 0, "total_minor": 100},
            "payments": [{"method": "cash", "amount_minor": 100}]
        }))
        .expect("payload");
        SaleEvent {
            terminal_id: Uuid::nil(),
            pos_id: Uuid::nil(),
            local_event_id: id,
            branch_id: "b1".into(),
            event_type: EventType::Sale,
            occurred_at: chrono::Utc::now(),
            payload,
            chain_hash: None,
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn classifies_answers_and_sends_the_contract_headers() {
        let (url, handle) = fake_cloud().await;
        let registry = Registry::new();
        let cloud = client(url).with_metrics(&registry).expect("metrics");

        let e = cloud.delta(0, 100).await.expect_err("429");
        assert_eq!(e.code(), ErrorCode::PosSyncRateLimited);
        assert_eq!(e.retry_after(), Some(Duration::from_secs(3)));
        assert!(e.can_retry());

        let e = cloud.snapshot(None, 100).await.expect_err("cut JSON");
        assert!(matches!(e, CloudError::BadResponse(_)), "{e:?}");

        let events = [event(1), event(2)];
        let first = cloud.post_events(&events, 1).await.expect("events");
        assert_eq!(first.results.len(), 2);
        assert_eq!(
            first.results[0].message.as_deref(),
            Some("Bearer pst_secret|1|7||"),
            "bearer token, first attempt, UUID v7 request id, no report before one is known"
        );
        // The daemon's report goes with every request once known (shared by clones).
        cloud.clone().reporting().set(Some(42), Some(3));
        let second = cloud.post_events(&events, 2).await.expect("events");
        assert_eq!(
            second.results[0].message.as_deref(),
            Some("Bearer pst_secret|2|7|42|3")
        );
        cloud.reporting().set(None, Some(0));
        let third = cloud.post_events(&events, 3).await.expect("events");
        assert_eq!(
            third.results[0].message.as_deref(),
            Some("Bearer pst_secret|3|7||0"),
            "an unknown figure is not sent"
        );

        let mut text = Vec::new();
        prometheus::Encoder::encode(
            &prometheus::TextEncoder::new(),
            &registry.gather(),
            &mut text,
        )
        .expect("encode");
        let text = String::from_utf8(text).expect("utf8");
        let rate_limited = format!(
            r#"terminal_cloud_requests_total{{outcome="{}",route="/catalog/delta"}} 1"#,
            ErrorCode::PosSyncRateLimited
        );
        let bad_response = format!(
            r#"terminal_cloud_requests_total{{outcome="{}",route="/catalog/snapshot"}} 1"#,
            TerminalCode::BadResponse
        );
        for line in [
            rate_limited.as_str(),
            bad_response.as_str(),
            r#"terminal_cloud_requests_total{outcome="ok",route="/sales/events"} 3"#,
            r#"terminal_cloud_request_seconds_count{route="/sales/events"} 3"#,
        ] {
            assert!(text.contains(line), "missing {line} in\n{text}");
        }
        handle.stop(true).await;
    }

    #[tokio::test]
    async fn nobody_listening_is_unreachable() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("port")
            .port();
        let e = client(format!("http://127.0.0.1:{port}"))
            .delta(0, 10)
            .await
            .expect_err("refused");
        assert!(matches!(e, CloudError::Unreachable(_)), "{e:?}");
        assert_eq!(e.code(), TerminalCode::Network);
        assert!(e.can_retry());
    }

    /// The body of a cloud error, as the cloud writes it.
    fn envelope(code: ErrorCode, message: &str, details: serde_json::Value) -> Vec<u8> {
        serde_json::to_vec(&serde_json::json!({"error": {
            "code": code, "message": message, "retryable": code.can_retry(429), "details": details,
        }}))
        .expect("envelope")
    }

    #[test]
    fn envelope_becomes_rejected_with_code_retry_after_and_reason() {
        let mut h = HeaderMap::new();
        h.insert(RETRY_AFTER, HeaderValue::from_static("7"));
        let body = envelope(
            ErrorCode::PosCatalogDeltaFailed,
            "too old",
            serde_json::json!({"reason": "resnapshot_required"}),
        );
        let e = rejection(StatusCode::GONE, &h, &body);
        assert_eq!(
            e,
            CloudError::Rejected {
                status: 410,
                code: Some(ErrorCode::PosCatalogDeltaFailed),
                message: "too old".into(),
                retry_after: Some(Duration::from_secs(7)),
                reason: Some("resnapshot_required".into()),
            }
        );
        assert!(e.resnapshot_required());
        assert!(!e.can_retry());
    }

    #[test]
    fn non_envelope_error_keeps_status_and_an_excerpt() {
        let e = rejection(
            StatusCode::BAD_GATEWAY,
            &HeaderMap::new(),
            b"<html>bad gateway</html>",
        );
        match e {
            CloudError::Rejected {
                status,
                code,
                message,
                ..
            } => {
                assert_eq!(status, 502);
                assert_eq!(code, None);
                assert!(message.contains("bad gateway"));
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn a_huge_retry_after_is_clamped_to_an_hour() {
        let body = envelope(
            ErrorCode::PosSyncRateLimited,
            "slow down",
            serde_json::json!({}),
        );
        for huge in ["99999999999999", "18446744073709551616000", " 7200 "] {
            let mut h = HeaderMap::new();
            h.insert(
                RETRY_AFTER,
                HeaderValue::from_str(huge).expect("header value"),
            );
            let e = rejection(StatusCode::TOO_MANY_REQUESTS, &h, &body);
            assert_eq!(e.retry_after(), Some(MAX_RETRY_AFTER), "{huge:?}");
            // What the actors do with it: a retry instant an hour out, no panic.
            let now = chrono::Utc::now();
            let d = possync_actors::backoff::decide(
                &possync_actors::BackoffPolicy::default(),
                1,
                possync_actors::backoff::Budget::Unbounded,
                e.retry_after(),
                0.5,
                now,
            );
            assert_eq!(
                d,
                possync_actors::Decision::RetryAt(now + chrono::Duration::hours(1))
            );
        }
        let mut h = HeaderMap::new();
        h.insert(RETRY_AFTER, HeaderValue::from_static("120"));
        let e = rejection(StatusCode::TOO_MANY_REQUESTS, &h, &body);
        assert_eq!(e.retry_after(), Some(Duration::from_secs(120)));
        h.insert(RETRY_AFTER, HeaderValue::from_static("-5"));
        assert_eq!(
            rejection(StatusCode::TOO_MANY_REQUESTS, &h, &body).retry_after(),
            None
        );
    }

    #[test]
    fn a_malformed_retry_after_is_ignored_not_fatal() {
        let mut h = HeaderMap::new();
        h.insert(RETRY_AFTER, HeaderValue::from_static("soon"));
        let body = envelope(
            ErrorCode::PosSyncRateLimited,
            "slow down",
            serde_json::json!({}),
        );
        let e = rejection(StatusCode::TOO_MANY_REQUESTS, &h, &body);
        assert_eq!(e.retry_after(), None);
        assert!(e.can_retry());
        assert_eq!(e.code(), ErrorCode::PosSyncRateLimited);
    }
}
