//! `simulations load`: a virtual fleet against a deployment (docs/deployment.md).
//!
//! N virtual terminals run as async tasks in this one process and speak the real protocol
//! with real tokens (enrolled in bulk by `cloud terminal import`) and their own `pos_id` and
//! device nonce: each polls the catalog delta every P seconds (±20 % jitter), records sales
//! at R per minute (exponential gaps) and delivers what it holds in one batch, backing off on
//! 429/5xx/no answer the way the real outbox does (exponential with full jitter, `Retry-After`
//! honoured). Terminals start warm — holding the catalog at the current version — except the
//! `--cold K` first ones, which take a full snapshot at the same moment (the herd); a virtual
//! terminal counts and hashes what it receives instead of storing it.
//!
//! Every virtual terminal sends `X-Forwarded-For: 10.a.b.c` (its own shop address): the
//! generator's address, 127.0.0.1, is a trusted proxy of the cluster, so the cloud files each
//! terminal under its own per-address bucket, as it would for tills in different shops.
//!
//! Without `--cloud-url` the run starts the `scripts/cluster` topology itself (nginx with TLS
//! over K `cloud serve` processes on a fresh PostgreSQL database). At the end every
//! acknowledged sale is looked up in `sales_events` (read from PostgreSQL, not through the API
//! under test): the exactly-once audit.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use possync_protocol::{DeltaPage, EventStatus, SaleEvent, SalesEventsResponse, SnapshotPage};
use possync_testkit::cloud::CloudCli;
use possync_testkit::cluster::Cluster;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;
use sha2::{Digest, Sha256};
use uuid::Uuid;

use crate::cloud_cluster::RunDatabase;
use crate::ledger_audit::read_cloud_sales;
use crate::SimError;

/// Most sales in one delivery (the real outbox's default batch).
const MAX_BATCH: usize = 100;
/// Backoff of a failed delivery or poll: first wait and cap.
const BACKOFF_BASE: Duration = Duration::from_millis(500);
const BACKOFF_CAP: Duration = Duration::from_secs(30);
/// After the run's duration, how long terminals may take to deliver what they still hold.
const DRAIN_LIMIT: Duration = Duration::from_secs(120);
/// Virtual terminals per HTTP client (its pool of keep-alive connections is shared).
const TERMINALS_PER_CLIENT: usize = 128;

/// What to run.
#[derive(Debug, Clone)]
pub struct LoadConfig {
    /// Virtual terminals.
    pub terminals: usize,
    /// Branches (terminal i belongs to branch i mod M).
    pub branches: usize,
    /// How long terminals sell and poll.
    pub duration: Duration,
    /// An existing deployment (`https://…`); its database must be given too.
    pub cloud_url: Option<String>,
    /// CA certificate for `cloud_url`.
    pub ca_cert: Option<PathBuf>,
    /// The deployment's database (enrolment and audit).
    pub database_url: Option<String>,
    /// Cloud instances when the run starts its own cluster.
    pub instances: usize,
    /// Catalog entities seeded before the run.
    pub catalog: usize,
    /// Terminals that start cold (full snapshot at the start).
    pub cold: usize,
    /// Sales per terminal per minute.
    pub sales_per_minute: f64,
    /// Seconds between delta polls of one terminal.
    pub poll_seconds: f64,
    /// Catalog changes per minute during the run (admin upserts).
    pub changes_per_minute: f64,
    /// Random seed (logged in the report).
    pub seed: u64,
    /// kill -9 one instance a third into the run and start it again 5 s later.
    pub chaos: bool,
    /// PostgreSQL server on which the run creates its database (`postgres://user@host:port`).
    pub pg_server: String,
    /// With `chaos`: the shell command that restarts that server (e.g. `pg_ctlcluster 15
    /// chaos restart`), run 5 s after the instance is back. Use a server of its own: every
    /// other client of it is cut off too.
    pub postgres_restart: Option<String>,
}

/// Latency percentiles of one route, in milliseconds.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Percentiles {
    /// Requests measured.
    pub count: usize,
    /// Median.
    pub p50: f64,
    /// 99th percentile.
    pub p99: f64,
    /// 99.9th percentile.
    pub p999: f64,
    /// Slowest.
    pub max: f64,
}

impl Percentiles {
    fn of(mut micros: Vec<u32>) -> Percentiles {
        micros.sort_unstable();
        let at = |q: f64| -> f64 {
            if micros.is_empty() {
                return 0.0;
            }
            let i = ((micros.len() as f64 * q).ceil() as usize).clamp(1, micros.len()) - 1;
            f64::from(micros[i]) / 1000.0
        };
        Percentiles {
            count: micros.len(),
            p50: at(0.50),
            p99: at(0.99),
            p999: at(0.999),
            max: at(1.0),
        }
    }
}

/// The exactly-once audit of every acknowledged sale against `sales_events`.
#[derive(Debug, Clone, Serialize, Default)]
pub struct Audit {
    /// Acknowledged (accepted or duplicate) by the cloud.
    pub acknowledged: usize,
    /// Acknowledged and found exactly once.
    pub found_once: usize,
    /// Acknowledged but absent.
    pub lost: usize,
    /// Keys stored more than once.
    pub duplicated: usize,
    /// Stored but never acknowledged (the answer was lost, e.g. an instance killed after
    /// commit): not a defect as long as the terminal still holds them for redelivery.
    pub stored_unacknowledged: usize,
    /// Sales the terminals still held after the drain (should be 0).
    pub undelivered: usize,
}

/// The cold-start herd.
#[derive(Debug, Clone, Serialize)]
pub struct ColdReport {
    /// Terminals that took a full snapshot at once.
    pub terminals: usize,
    /// Entities each received (the branch's view; the same for every terminal of a branch).
    pub entities_per_terminal_max: usize,
    /// Time from the common start to each terminal's last page, in ms.
    pub finish_ms: Percentiles,
    /// Snapshot pages the cloud instances served (their `snapshot_pages` counters).
    pub snapshot_pages_served: f64,
}

/// `simulations load`'s JSON report.
#[derive(Debug, Clone, Serialize)]
pub struct LoadReport {
    /// Virtual terminals.
    pub terminals: usize,
    /// Branches.
    pub branches: usize,
    /// Selling/polling time.
    pub duration_s: f64,
    /// The seed.
    pub seed: u64,
    /// Cloud instances (0: an external deployment).
    pub instances: usize,
    /// Catalog entities at the start.
    pub catalog_entities: usize,
    /// Sales the cloud acknowledged.
    pub sales_acknowledged: usize,
    /// Rows in `sales_events` for this run's terminals.
    pub sales_in_cloud: usize,
    /// Acknowledged and absent.
    pub lost: usize,
    /// Stored more than once.
    pub duplicated: usize,
    /// Responses per HTTP status (`transport` for no answer).
    pub responses: BTreeMap<String, u64>,
    /// Latency per route.
    pub latency_ms: BTreeMap<String, Percentiles>,
    /// Peak resident memory of each cloud instance (sampled every second).
    pub cloud_peak_rss_mib: Vec<f64>,
    /// Peak of this generator process's resident memory.
    pub generator_peak_rss_mib: f64,
    /// Peak connections to the run's database (`pg_stat_activity`, sampled every second).
    pub db_connections_peak: i64,
    /// PostgreSQL's `max_connections`.
    pub db_max_connections: i64,
    /// The exactly-once audit.
    pub audit: Audit,
    /// The cold herd, when `--cold` was given.
    pub cold: Option<ColdReport>,
    /// Counters summed over the instances' `/metrics` at the end (delta polls from memory,
    /// snapshot pages, catalog notifications, and any snapshot-cache counter they expose).
    pub cloud_counters: BTreeMap<String, f64>,
    /// The instances' own view of latency per route (`http_request_duration_seconds`, summed
    /// over instances and statuses): the bucket bounds holding the median and the 99th
    /// percentile. Beside `latency_ms` (what the virtual terminals saw, through nginx and their
    /// own busy runtime) it tells the cloud's share from the generator's.
    pub cloud_latency_ms: BTreeMap<String, BucketPercentiles>,
    /// Catalog changes written during the run.
    pub catalog_changes: usize,
    /// What the chaos schedule did.
    pub chaos: Vec<String>,
    /// `/proc/loadavg` at the end (the machine is shared).
    pub load_average: String,
    /// Responses that were neither 2xx nor 429 (and, without --chaos, transport failures).
    pub unexpected_responses: u64,
    /// The verdict: nothing lost or duplicated, nothing undelivered, no unexpected response.
    pub passed: bool,
}

/// One request's outcome, for the report.
#[derive(Default)]
struct Recorder {
    latencies: HashMap<&'static str, Vec<u32>>,
    statuses: BTreeMap<String, u64>,
}

type SharedRecorder = Arc<Mutex<Recorder>>;

fn record(rec: &SharedRecorder, route: &'static str, status: Option<u16>, took: Duration) {
    let mut r = rec.lock().unwrap_or_else(|p| p.into_inner());
    let key = status.map_or_else(|| "transport".to_string(), |s| s.to_string());
    *r.statuses.entry(key).or_insert(0) += 1;
    if status.is_some_and(|s| (200..300).contains(&s)) {
        r.latencies
            .entry(route)
            .or_default()
            .push(took.as_micros().min(u128::from(u32::MAX)) as u32);
    }
}

/// One virtual terminal's identity.
#[derive(Debug, Clone)]
struct Identity {
    terminal_id: Uuid,
    token: String,
    branch: String,
    pos_id: Uuid,
    nonce: String,
    forwarded_for: String,
}

/// What one virtual terminal did.
#[derive(Debug, Default)]
struct Outcome {
    acknowledged: Vec<i64>,
    undelivered: usize,
    cold_finish: Option<(Duration, usize)>,
}

/// Where the run's cloud is and how to administer it.
struct Target {
    url: String,
    ca_pem: Option<Vec<u8>>,
    admin: CloudCli,
    admin_token: String,
    database_url: String,
    cluster: Option<Cluster>,
    database: Option<RunDatabase>,
}

fn http_client(ca_pem: Option<&[u8]>) -> Result<reqwest::Client, SimError> {
    let mut b = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(60))
        .pool_idle_timeout(Duration::from_secs(60))
        .tcp_keepalive(Duration::from_secs(30));
    if let Some(pem) = ca_pem {
        let ca = reqwest::Certificate::from_pem(pem)
            .map_err(|e| SimError::Io(format!("CA certificate: {e}")))?;
        b = b.add_root_certificate(ca);
    }
    b.build().map_err(|e| SimError::Http(e.to_string()))
}

async fn start_target(cfg: &LoadConfig) -> Result<Target, SimError> {
    if let Some(url) = &cfg.cloud_url {
        let database_url = cfg.database_url.clone().ok_or_else(|| {
            SimError::Io("--cloud-url needs --database-url (enrolment and the audit)".into())
        })?;
        let admin_token = std::env::var("POSSYNC_ADMIN_TOKEN").map_err(|_| {
            SimError::Io("--cloud-url needs POSSYNC_ADMIN_TOKEN (catalog changes)".into())
        })?;
        let ca_pem = match &cfg.ca_cert {
            Some(p) => {
                Some(std::fs::read(p).map_err(|e| SimError::Io(format!("{}: {e}", p.display())))?)
            }
            None => None,
        };
        let binary = possync_testkit::cloud::cloud_binary()
            .map_err(|e| SimError::MissingBinary(e.to_string()))?;
        let data_dir = std::env::temp_dir().join(format!("possync-load-{}", Uuid::new_v4()));
        return Ok(Target {
            url: url.trim_end_matches('/').to_string(),
            ca_pem,
            admin: CloudCli {
                binary,
                data_dir,
                database_url: database_url.clone(),
                admin_token: admin_token.clone(),
            },
            admin_token,
            database_url,
            cluster: None,
            database: None,
        });
    }
    let name = format!("possync_load_{}", Uuid::new_v4().simple());
    let database = RunDatabase::create_fresh(&cfg.pg_server, &name).await?;
    let url = database.url.clone();
    let instances = cfg.instances.max(1);
    let cluster = tokio::task::spawn_blocking(move || Cluster::start(instances, &url, &[]))
        .await
        .map_err(|e| SimError::Io(e.to_string()))?
        .map_err(|e| SimError::Process {
            name: "scripts/cluster".into(),
            message: format!("{e:#}"),
        })?;
    let ca_pem = std::fs::read(&cluster.ca_cert)
        .map_err(|e| SimError::Io(format!("{}: {e}", cluster.ca_cert.display())))?;
    Ok(Target {
        url: cluster.url.clone(),
        ca_pem: Some(ca_pem),
        admin: cluster.admin.clone(),
        admin_token: cluster.admin_token.clone(),
        database_url: cluster.database_url.clone(),
        cluster: Some(cluster),
        database: Some(database),
    })
}

fn branch_name(i: usize) -> String {
    format!("b{i:05}")
}

/// Entity `i` of the seeded catalog: three in four global, the rest owned by a branch.
fn catalog_entity(i: usize, branches: usize, version_tag: u64) -> serde_json::Value {
    let branch = (i % 4 == 3).then(|| branch_name(i % branches));
    serde_json::json!({
        "type": "product",
        "id": format!("p{i:06}"),
        "branch_id": branch,
        "data": {"name": format!("Product {i}"), "sku": format!("SKU-{i}"),
                 "price_minor": 100 + (i as u64 * 7 + version_tag) % 5000},
    })
}

async fn admin_blocking<T: Send + 'static>(
    f: impl FnOnce() -> anyhow::Result<T> + Send + 'static,
) -> Result<T, SimError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| SimError::Io(e.to_string()))?
        .map_err(|e| SimError::Command {
            command: "cloud".into(),
            message: format!("{e:#}"),
        })
}

/// Seeds the catalog (one `cloud catalog import`) and enrolls every terminal (one `cloud
/// terminal import`).
async fn prepare(cfg: &LoadConfig, admin: &CloudCli) -> Result<Vec<Identity>, SimError> {
    let dir = tempfile::tempdir().map_err(|e| SimError::Io(e.to_string()))?;
    if cfg.catalog > 0 {
        let path = dir.path().join("catalog.jsonl");
        let mut text = String::with_capacity(cfg.catalog * 120);
        for i in 0..cfg.catalog {
            text.push_str(&catalog_entity(i, cfg.branches, 0).to_string());
            text.push('\n');
        }
        std::fs::write(&path, text).map_err(|e| SimError::Io(e.to_string()))?;
        let a = admin.clone();
        let p = path.to_string_lossy().into_owned();
        admin_blocking(move || a.run(&["catalog", "import", &p])).await?;
    }
    let branches: Vec<String> = (0..cfg.terminals)
        .map(|i| branch_name(i % cfg.branches))
        .collect();
    let a = admin.clone();
    let b = branches.clone();
    let started = Instant::now();
    let issued = admin_blocking(move || a.add_terminals(&b)).await?;
    tracing::info!(
        terminals = issued.len(),
        ms = started.elapsed().as_millis() as u64,
        "terminals enrolled"
    );
    Ok(issued
        .into_iter()
        .zip(branches)
        .enumerate()
        .map(|(i, ((terminal_id, token), branch))| Identity {
            terminal_id,
            token,
            branch,
            pos_id: Uuid::now_v7(),
            nonce: Uuid::new_v4().simple().to_string(),
            forwarded_for: format!("10.{}.{}.{}", (i >> 16) & 255, (i >> 8) & 255, i & 255),
        })
        .collect())
}

/// Exponential backoff with full jitter; `retry_after` wins when longer.
fn backoff(attempt: u32, retry_after: Option<Duration>, rng: &mut StdRng) -> Duration {
    let exp = BACKOFF_BASE
        .saturating_mul(1u32 << attempt.min(10))
        .min(BACKOFF_CAP);
    let jittered = exp.mul_f64(rng.random_range(0.5..1.0));
    retry_after.map_or(jittered, |r| r.max(jittered))
}

fn retry_after(r: &reqwest::Response) -> Option<Duration> {
    r.headers()
        .get(reqwest::header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .parse::<u64>()
        .ok()
        .map(Duration::from_secs)
}

/// How a request ended.
enum Answer<T> {
    Ok(T),
    /// 429, 5xx or no answer: try again later.
    Retry(Option<Duration>),
    /// Anything else: reported, not retried.
    Refused,
}

struct VirtualTerminal {
    id: Identity,
    http: reqwest::Client,
    base: String,
    rec: SharedRecorder,
    /// The catalog version it holds (-1 before its first snapshot), reported with every
    /// request as a real till does (`x-possync-catalog-version`).
    catalog_version: std::sync::atomic::AtomicI64,
}

impl VirtualTerminal {
    /// `req` as this till sends it: its token, its shop's address (through the trusted proxy)
    /// and its report (catalog version when known; no sale needs attention).
    fn as_till(&self, req: reqwest::RequestBuilder) -> reqwest::RequestBuilder {
        let req = req
            .bearer_auth(&self.id.token)
            .header("x-forwarded-for", &self.id.forwarded_for)
            .header(possync_protocol::TILL_NEEDS_ATTENTION_HEADER, "0");
        match self
            .catalog_version
            .load(std::sync::atomic::Ordering::Relaxed)
        {
            v if v >= 0 => req.header(possync_protocol::TILL_CATALOG_VERSION_HEADER, v),
            _ => req,
        }
    }

    fn holds_version(&self, v: i64) {
        self.catalog_version
            .store(v, std::sync::atomic::Ordering::Relaxed);
    }

    async fn get<T: serde::de::DeserializeOwned>(
        &self,
        route: &'static str,
        path: &str,
    ) -> Answer<T> {
        let started = Instant::now();
        let sent = self
            .as_till(self.http.get(format!("{}{path}", self.base)))
            .send()
            .await;
        self.answer(route, started, sent).await
    }

    async fn answer<T: serde::de::DeserializeOwned>(
        &self,
        route: &'static str,
        started: Instant,
        sent: reqwest::Result<reqwest::Response>,
    ) -> Answer<T> {
        let r = match sent {
            Ok(r) => r,
            Err(_) => {
                record(&self.rec, route, None, started.elapsed());
                return Answer::Retry(None);
            }
        };
        let status = r.status().as_u16();
        let wait = retry_after(&r);
        let body = r.json::<T>().await;
        record(&self.rec, route, Some(status), started.elapsed());
        match (status, body) {
            (200..=299, Ok(v)) => Answer::Ok(v),
            (429 | 500..=599, _) | (200..=299, Err(_)) => Answer::Retry(wait),
            _ => Answer::Refused,
        }
    }

    async fn deliver(&self, batch: &[SaleEvent]) -> Answer<SalesEventsResponse> {
        let started = Instant::now();
        let sent = self
            .as_till(self.http.post(format!("{}/v1/pos/sales/events", self.base)))
            .header(possync_protocol::DEVICE_NONCE_HEADER, &self.id.nonce)
            .json(&serde_json::json!({ "events": batch }))
            .send()
            .await;
        self.answer("sales", started, sent).await
    }

    /// A full snapshot, counted and hashed; returns (entities, snapshot_version).
    async fn snapshot(&self, rng: &mut StdRng) -> (usize, i64) {
        let mut cursor: Option<String> = None;
        let mut hasher = Sha256::new();
        let mut entities = 0;
        let mut attempt = 0;
        loop {
            let path = match &cursor {
                None => "/v1/pos/catalog/snapshot?limit=1000".to_string(),
                Some(c) => format!("/v1/pos/catalog/snapshot?limit=1000&cursor={c}"),
            };
            match self.get::<SnapshotPage>("snapshot", &path).await {
                Answer::Ok(page) => {
                    attempt = 0;
                    entities += page.entities.len();
                    for e in &page.entities {
                        hasher.update(e.id.as_bytes());
                        hasher.update(e.version.to_le_bytes());
                    }
                    match page.next_cursor {
                        Some(c) => cursor = Some(c),
                        None => return (entities, page.snapshot_version),
                    }
                }
                Answer::Retry(w) => {
                    tokio::time::sleep(backoff(attempt, w, rng)).await;
                    attempt += 1;
                }
                Answer::Refused => return (entities, 0),
            }
        }
    }

    /// Delta pages from `since` until none remain; returns the new `since` (unchanged when
    /// the poll failed: the next one retries).
    async fn poll(&self, since: i64) -> i64 {
        let mut since = since;
        loop {
            let path = format!("/v1/pos/catalog/delta?since={since}&limit=1000");
            match self.get::<DeltaPage>("delta", &path).await {
                Answer::Ok(page) => {
                    since = page.next_since;
                    if !page.has_more {
                        return since;
                    }
                }
                Answer::Retry(_) | Answer::Refused => return since,
            }
        }
    }

    async fn run(
        self,
        warm_version: i64,
        cold: bool,
        cfg: Arc<LoadConfig>,
        start: Instant,
        seed: u64,
    ) -> Outcome {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut out = Outcome::default();
        let deadline = start + cfg.duration;
        let mut since = warm_version;
        if cold {
            let (n, v) = self.snapshot(&mut rng).await;
            out.cold_finish = Some((start.elapsed(), n));
            since = v;
        }
        self.holds_version(since);
        let poll_every = Duration::from_secs_f64(cfg.poll_seconds.max(0.1));
        let mean_gap = 60.0 / cfg.sales_per_minute.max(0.0001);
        let mut next_poll = Instant::now() + poll_every.mul_f64(rng.random_range(0.0..1.0));
        let mut next_sale = Instant::now()
            + Duration::from_secs_f64(-mean_gap * rng.random::<f64>().max(1e-9).ln());
        let mut pending: VecDeque<SaleEvent> = VecDeque::new();
        let mut next_delivery: Option<Instant> = None;
        let mut attempt = 0u32;
        let mut local_id = 0i64;
        loop {
            let now = Instant::now();
            let selling = now < deadline;
            if !selling && (pending.is_empty() || now >= deadline + DRAIN_LIMIT) {
                break;
            }
            if selling && now >= next_sale {
                local_id += 1;
                pending.push_back(possync_testkit::sample_sale_event(
                    self.id.terminal_id,
                    self.id.pos_id,
                    local_id,
                    &self.id.branch,
                ));
                next_sale +=
                    Duration::from_secs_f64(-mean_gap * rng.random::<f64>().max(1e-9).ln());
                next_delivery.get_or_insert(now);
            }
            if selling && now >= next_poll {
                since = self.poll(since).await;
                self.holds_version(since);
                next_poll = Instant::now() + poll_every.mul_f64(rng.random_range(0.8..1.2));
            }
            if next_delivery.is_some_and(|t| Instant::now() >= t) && !pending.is_empty() {
                let n = pending.len().min(MAX_BATCH);
                let batch: Vec<SaleEvent> = pending.iter().take(n).cloned().collect();
                match self.deliver(&batch).await {
                    Answer::Ok(resp) => {
                        attempt = 0;
                        // One result per event, in order: acknowledged (accepted or
                        // duplicate) or not (conflict, rejected — a real outbox flags those);
                        // either way the batch leaves the queue.
                        let mut answered = 0;
                        for r in resp.results.iter().take(n) {
                            answered += 1;
                            match (r.status, r.local_event_id) {
                                (EventStatus::Accepted | EventStatus::Duplicate, Some(id)) => {
                                    out.acknowledged.push(id)
                                }
                                _ => out.undelivered += 1,
                            }
                        }
                        out.undelivered += n - answered;
                        pending.drain(..n);
                        next_delivery = (!pending.is_empty()).then(Instant::now);
                    }
                    Answer::Retry(w) => {
                        next_delivery = Some(Instant::now() + backoff(attempt, w, &mut rng));
                        attempt += 1;
                    }
                    Answer::Refused => {
                        out.undelivered += n;
                        pending.drain(..n);
                        next_delivery = (!pending.is_empty()).then(Instant::now);
                    }
                }
                continue;
            }
            let mut wake = if selling {
                next_poll.min(next_sale).min(deadline)
            } else {
                deadline + DRAIN_LIMIT
            };
            if let Some(t) = next_delivery {
                wake = wake.min(t);
            }
            tokio::time::sleep_until(tokio::time::Instant::from_std(wake)).await;
        }
        out.undelivered += pending.len();
        out
    }
}

/// Peak values sampled every second while the run lasts.
#[derive(Default)]
struct Peaks {
    rss_mib: Vec<f64>,
    generator_rss_mib: f64,
    db_connections: i64,
    max_connections: i64,
}

fn rss_mib(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kb / 1024.0)
}

fn sample_peaks(
    pids: Vec<Option<u32>>,
    database_url: String,
    peaks: Arc<Mutex<Peaks>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
) {
    use diesel::sql_types::BigInt;
    use diesel::{Connection, PgConnection, QueryableByName, RunQueryDsl};
    #[derive(QueryableByName)]
    struct N {
        #[diesel(sql_type = BigInt)]
        n: i64,
    }
    let mut conn = PgConnection::establish(&database_url).ok();
    if let Some(c) = conn.as_mut() {
        if let Ok(v) = diesel::sql_query(
            "SELECT setting::bigint AS n FROM pg_settings WHERE name = 'max_connections'",
        )
        .get_result::<N>(c)
        {
            peaks
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .max_connections = v.n;
        }
    }
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        let db = conn.as_mut().and_then(|c| {
            diesel::sql_query(
                "SELECT count(*)::bigint AS n FROM pg_stat_activity WHERE datname = current_database()",
            )
            .get_result::<N>(c)
            .ok()
        });
        let me = rss_mib(std::process::id()).unwrap_or(0.0);
        let mut p = peaks.lock().unwrap_or_else(|p| p.into_inner());
        p.rss_mib.resize(pids.len(), 0.0);
        for (i, pid) in pids.iter().enumerate() {
            if let Some(rss) = pid.and_then(rss_mib) {
                p.rss_mib[i] = p.rss_mib[i].max(rss);
            }
        }
        p.generator_rss_mib = p.generator_rss_mib.max(me);
        if let Some(v) = db {
            p.db_connections = p.db_connections.max(v.n - 1); // minus this sampler
        }
        drop(p);
        std::thread::sleep(Duration::from_secs(1));
    }
}

/// Percentiles read off a Prometheus histogram: the upper bound of the bucket each falls in
/// (`None`: above the largest finite bucket).
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct BucketPercentiles {
    /// Requests counted.
    pub count: f64,
    /// The median is at most this (ms).
    pub p50_at_most: Option<f64>,
    /// The 99th percentile is at most this (ms).
    pub p99_at_most: Option<f64>,
}

/// Per route, the cumulative `http_request_duration_seconds_bucket` counts of `text`
/// (several expositions may be fed in: they add up), keyed by bucket bound in seconds.
fn add_latency_buckets(text: &str, into: &mut BTreeMap<String, BTreeMap<u64, f64>>) {
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("http_request_duration_seconds_bucket{") else {
            continue;
        };
        let Some((labels, value)) = rest.rsplit_once("} ") else {
            continue;
        };
        let label = |name: &str| {
            labels.split(',').find_map(|kv| {
                kv.strip_prefix(name)
                    .and_then(|v| v.strip_prefix("=\""))
                    .map(|v| v.trim_end_matches('"').to_string())
            })
        };
        let (Some(route), Some(le), Ok(n)) = (label("route"), label("le"), value.parse::<f64>())
        else {
            continue;
        };
        // Bounds as integer microseconds, so they order and add up exactly (+Inf last).
        let bound = if le == "+Inf" {
            u64::MAX
        } else {
            match le.parse::<f64>() {
                Ok(secs) => (secs * 1e6).round() as u64,
                Err(_) => continue,
            }
        };
        *into.entry(route).or_default().entry(bound).or_insert(0.0) += n;
    }
}

/// The bucket bounds holding the median and the 99th percentile of cumulative `buckets`.
fn bucket_percentiles(buckets: &BTreeMap<u64, f64>) -> BucketPercentiles {
    let count = buckets.get(&u64::MAX).copied().unwrap_or(0.0);
    let at = |q: f64| {
        buckets
            .iter()
            .find(|(_, n)| **n >= q * count)
            .and_then(|(bound, _)| (*bound != u64::MAX).then(|| *bound as f64 / 1000.0))
    };
    BucketPercentiles {
        count,
        p50_at_most: at(0.5),
        p99_at_most: at(0.99),
    }
}

/// Sums the counters of interest over every instance's `/metrics`.
async fn cloud_counters(
    http: &reqwest::Client,
    instance_urls: &[String],
) -> (BTreeMap<String, f64>, BTreeMap<String, BucketPercentiles>) {
    let mut sums = BTreeMap::new();
    let mut buckets = BTreeMap::new();
    for base in instance_urls {
        let Ok(r) = http.get(format!("{base}/metrics")).send().await else {
            continue;
        };
        let Ok(text) = r.text().await else { continue };
        add_latency_buckets(&text, &mut buckets);
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let Some((name, value)) = line.rsplit_once(' ') else {
                continue;
            };
            let wanted = name.starts_with("delta_polls_from_memory")
                || name.starts_with("delta_sync_runs")
                || name.starts_with("catalog_notifications")
                || name.starts_with("snapshot")
                || name.contains("snapshot_cache")
                || name.starts_with("branch_actors")
                || name.starts_with("rate_limited_total");
            if let (true, Ok(v)) = (wanted, value.parse::<f64>()) {
                *sums.entry(name.to_string()).or_insert(0.0) += v;
            }
        }
    }
    let latency = buckets
        .iter()
        .map(|(route, b)| (route.clone(), bucket_percentiles(b)))
        .collect();
    (sums, latency)
}

/// Runs the load and audits it. `Err` only when the run could not be carried out.
pub async fn run(cfg: LoadConfig) -> Result<LoadReport, SimError> {
    let cfg = Arc::new(LoadConfig {
        terminals: cfg.terminals.max(1),
        branches: cfg.branches.max(1),
        cold: cfg.cold.min(cfg.terminals.max(1)),
        ..cfg
    });
    let target = start_target(&cfg).await?;
    let result = drive(&cfg, &target).await;
    if let Some(cluster) = target.cluster {
        drop(cluster);
    }
    if let Some(db) = &target.database {
        if let Err(e) = db.drop_database().await {
            tracing::warn!(error = %e, "could not drop the run's database");
        }
    }
    result
}

async fn drive(cfg: &Arc<LoadConfig>, target: &Target) -> Result<LoadReport, SimError> {
    let identities = prepare(cfg, &target.admin).await?;
    let clients: Vec<reqwest::Client> = (0..cfg.terminals.div_ceil(TERMINALS_PER_CLIENT))
        .map(|_| http_client(target.ca_pem.as_deref()))
        .collect::<Result<_, _>>()?;
    let rec: SharedRecorder = Arc::default();
    let admin_http = http_client(target.ca_pem.as_deref())?;

    // The current catalog version: warm terminals hold the catalog at it.
    let probe = VirtualTerminal {
        id: identities[0].clone(),
        http: clients[0].clone(),
        base: target.url.clone(),
        rec: Arc::default(),
        catalog_version: (-1).into(),
    };
    let warm_version = match probe
        .get::<SnapshotPage>("probe", "/v1/pos/catalog/snapshot?limit=1")
        .await
    {
        Answer::Ok(p) => p.snapshot_version,
        _ => return Err(SimError::Http("the catalog version probe failed".into())),
    };

    let instance_pids: Vec<Option<u32>> = match &target.cluster {
        Some(c) => (0..c.instance_ports.len())
            .map(|i| c.instance_pid(i))
            .collect(),
        None => Vec::new(),
    };
    let peaks = Arc::new(Mutex::new(Peaks::default()));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = {
        let (p, s, url, pids) = (
            peaks.clone(),
            stop.clone(),
            target.database_url.clone(),
            instance_pids,
        );
        std::thread::spawn(move || sample_peaks(pids, url, p, s))
    };

    let start = Instant::now();
    let mut tasks = Vec::with_capacity(identities.len());
    for (i, id) in identities.iter().cloned().enumerate() {
        let vt = VirtualTerminal {
            id,
            http: clients[i / TERMINALS_PER_CLIENT].clone(),
            base: target.url.clone(),
            rec: rec.clone(),
            catalog_version: (-1).into(),
        };
        tasks.push(tokio::spawn(vt.run(
            warm_version,
            i < cfg.cold,
            cfg.clone(),
            start,
            cfg.seed.wrapping_mul(1_000_003).wrapping_add(i as u64),
        )));
    }

    // Catalog changes during the run, through the admin API behind nginx.
    let churn = {
        let (http, url, token, c) = (
            admin_http.clone(),
            target.url.clone(),
            target.admin_token.clone(),
            cfg.clone(),
        );
        tokio::spawn(async move {
            let mut rng = StdRng::seed_from_u64(c.seed ^ 0x5eed);
            let mut changes = 0usize;
            if c.changes_per_minute <= 0.0 || c.catalog == 0 {
                return changes;
            }
            let gap = Duration::from_secs_f64(60.0 / c.changes_per_minute);
            let deadline = start + c.duration;
            let mut tag = 1u64;
            loop {
                tokio::time::sleep(gap).await;
                if Instant::now() >= deadline {
                    return changes;
                }
                let i = rng.random_range(0..c.catalog);
                let body = serde_json::json!({"entities": [catalog_entity(i, c.branches, tag)]});
                tag += 1;
                if let Ok(r) = http
                    .post(format!("{url}/v1/admin/catalog/upsert"))
                    .bearer_auth(&token)
                    .json(&body)
                    .send()
                    .await
                {
                    if r.status().is_success() {
                        changes += 1;
                    }
                }
            }
        })
    };

    // Chaos: kill -9 instance 0 a third of the way in, start it again 5 s later.
    let mut chaos_log = Vec::new();
    // A chaos step that did not happen fails the run: a pass must mean the faults were met.
    let mut chaos_failed = false;
    if cfg.chaos {
        if let Some(cluster) = &target.cluster {
            tokio::time::sleep(cfg.duration / 3).await;
            match cluster.kill_instance(0) {
                Ok(()) => chaos_log.push(format!(
                    "{:.1}s: kill -9 instance 0",
                    start.elapsed().as_secs_f64()
                )),
                Err(e) => {
                    chaos_failed = true;
                    chaos_log.push(format!("kill instance 0 failed: {e:#}"));
                }
            }
            tokio::time::sleep(Duration::from_secs(5)).await;
            match cluster.start_instance(0) {
                Ok(()) => chaos_log.push(format!(
                    "{:.1}s: instance 0 started again",
                    start.elapsed().as_secs_f64()
                )),
                Err(e) => {
                    chaos_failed = true;
                    chaos_log.push(format!("restart of instance 0 failed: {e:#}"));
                }
            }
            if let Some(cmd) = &cfg.postgres_restart {
                tokio::time::sleep(Duration::from_secs(5)).await;
                let status = tokio::process::Command::new("sh")
                    .args(["-c", cmd])
                    .status()
                    .await;
                chaos_failed |= !matches!(&status, Ok(s) if s.success());
                chaos_log.push(match status {
                    Ok(s) if s.success() => format!(
                        "{:.1}s: PostgreSQL restarted ({cmd})",
                        start.elapsed().as_secs_f64()
                    ),
                    Ok(s) => format!("PostgreSQL restart `{cmd}` failed: {s}"),
                    Err(e) => format!("PostgreSQL restart `{cmd}` could not run: {e}"),
                });
            }
        } else {
            chaos_failed = true;
            chaos_log.push("--chaos needs the run's own cluster (no --cloud-url)".into());
        }
    }

    let mut outcomes = Vec::with_capacity(tasks.len());
    for t in tasks {
        outcomes.push(
            t.await
                .map_err(|e| SimError::Io(format!("terminal task: {e}")))?,
        );
    }
    let catalog_changes = churn.await.unwrap_or(0);
    let duration_s = cfg.duration.as_secs_f64();

    let instance_urls: Vec<String> = match &target.cluster {
        Some(c) => (0..c.instance_ports.len())
            .map(|i| c.instance_url(i))
            .collect(),
        None => Vec::new(),
    };
    let (counters, cloud_latency) = cloud_counters(&admin_http, &instance_urls).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let _ = sampler.join();

    // The audit, against PostgreSQL itself.
    let stored = read_cloud_sales(&target.database_url).await?;
    let ours: HashMap<Uuid, &Identity> = identities.iter().map(|i| (i.terminal_id, i)).collect();
    let mut in_cloud: HashMap<(String, String, i64), usize> = HashMap::new();
    for s in &stored {
        if Uuid::parse_str(&s.terminal_id).is_ok_and(|t| ours.contains_key(&t)) {
            *in_cloud
                .entry((s.terminal_id.clone(), s.pos_id.clone(), s.local_event_id))
                .or_insert(0) += 1;
        }
    }
    let mut audit = Audit::default();
    let mut acked_keys = HashSet::new();
    for (id, o) in identities.iter().zip(&outcomes) {
        audit.undelivered += o.undelivered;
        for lid in &o.acknowledged {
            let key = (id.terminal_id.to_string(), id.pos_id.to_string(), *lid);
            if !acked_keys.insert(key.clone()) {
                continue;
            }
            audit.acknowledged += 1;
            match in_cloud.get(&key) {
                None => audit.lost += 1,
                Some(1) => audit.found_once += 1,
                Some(_) => {}
            }
        }
    }
    audit.duplicated = in_cloud.values().filter(|n| **n > 1).count();
    audit.stored_unacknowledged = in_cloud.keys().filter(|k| !acked_keys.contains(*k)).count();

    let rec = Arc::try_unwrap(rec)
        .map(|m| m.into_inner().unwrap_or_else(|p| p.into_inner()))
        .unwrap_or_default();
    let latency_ms = rec
        .latencies
        .into_iter()
        .map(|(route, v)| (route.to_string(), Percentiles::of(v)))
        .collect();
    let unexpected_responses: u64 = rec
        .statuses
        .iter()
        .filter(|(code, _)| {
            let ok = code.starts_with('2') || code.as_str() == "429";
            // Under chaos an instance dies mid-request: nginx's 502 and no answer at all are
            // what the terminal retries, as it would in production.
            let chaos_expected =
                cfg.chaos && (code.as_str() == "transport" || code.starts_with('5'));
            !ok && !chaos_expected
        })
        .map(|(_, n)| *n)
        .sum();
    let cold = (cfg.cold > 0).then(|| {
        let finishes: Vec<(Duration, usize)> =
            outcomes.iter().filter_map(|o| o.cold_finish).collect();
        ColdReport {
            terminals: finishes.len(),
            entities_per_terminal_max: finishes.iter().map(|f| f.1).max().unwrap_or(0),
            finish_ms: Percentiles::of(
                finishes
                    .iter()
                    .map(|f| f.0.as_micros().min(u128::from(u32::MAX)) as u32)
                    .collect(),
            ),
            snapshot_pages_served: counters.get("snapshot_pages").copied().unwrap_or(0.0),
        }
    });
    let peaks = Arc::try_unwrap(peaks)
        .map(|m| m.into_inner().unwrap_or_else(|p| p.into_inner()))
        .unwrap_or_default();
    let passed = audit.lost == 0
        && audit.duplicated == 0
        && audit.undelivered == 0
        && unexpected_responses == 0
        && !chaos_failed;
    Ok(LoadReport {
        terminals: cfg.terminals,
        branches: cfg.branches,
        duration_s,
        seed: cfg.seed,
        instances: target
            .cluster
            .as_ref()
            .map_or(0, |c| c.instance_ports.len()),
        catalog_entities: cfg.catalog,
        sales_acknowledged: audit.acknowledged,
        sales_in_cloud: in_cloud.values().sum(),
        lost: audit.lost,
        duplicated: audit.duplicated,
        responses: rec.statuses,
        latency_ms,
        cloud_peak_rss_mib: peaks.rss_mib,
        generator_peak_rss_mib: peaks.generator_rss_mib,
        db_connections_peak: peaks.db_connections,
        db_max_connections: peaks.max_connections,
        audit,
        cold,
        cloud_counters: counters,
        cloud_latency_ms: cloud_latency,
        catalog_changes,
        chaos: chaos_log,
        load_average: std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .trim()
            .to_string(),
        unexpected_responses,
        passed,
    })
}

impl LoadReport {
    /// A few human lines for the terminal.
    pub fn summary(&self) -> String {
        let lat = |r: &str| {
            self.latency_ms
                .get(r)
                .map(|p| format!("p50 {:.1} p99 {:.1} p999 {:.1} ms", p.p50, p.p99, p.p999))
                .unwrap_or_else(|| "-".into())
        };
        let bound = |b: Option<f64>| b.map_or_else(|| "> 5 s".into(), |ms| format!("≤ {ms} ms"));
        let cloud_lat = |route: &str| {
            self.cloud_latency_ms
                .get(route)
                .map(|b| format!("p50 {}, p99 {}", bound(b.p50_at_most), bound(b.p99_at_most)))
                .unwrap_or_else(|| "-".into())
        };
        format!(
            "load: {} terminals x {} branches, {:.0}s, seed {} — {}\n  sales: {} acknowledged, {} in cloud, {} lost, {} duplicated, {} undelivered\n  ingest {} (cloud's own: {})\n  delta  {} (cloud's own: {})\n  responses {:?}\n  cloud peak RSS MiB {:?}, db connections peak {} of {}, load {}\n",
            self.terminals,
            self.branches,
            self.duration_s,
            self.seed,
            if self.passed { "PASSED" } else { "FAILED" },
            self.sales_acknowledged,
            self.sales_in_cloud,
            self.lost,
            self.duplicated,
            self.audit.undelivered,
            lat("sales"),
            cloud_lat("/v1/pos/sales/events"),
            lat("delta"),
            cloud_lat("/v1/pos/catalog/delta"),
            self.responses,
            self.cloud_peak_rss_mib,
            self.db_connections_peak,
            self.db_max_connections,
            self.load_average,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latency_buckets_add_up_over_instances_and_statuses() {
        let one = "# HELP x\n\
            http_request_duration_seconds_bucket{route=\"/r\",status=\"200\",le=\"0.001\"} 90\n\
            http_request_duration_seconds_bucket{route=\"/r\",status=\"200\",le=\"0.01\"} 99\n\
            http_request_duration_seconds_bucket{route=\"/r\",status=\"200\",le=\"+Inf\"} 100\n\
            http_request_duration_seconds_bucket{route=\"/r\",status=\"503\",le=\"0.001\"} 0\n\
            http_request_duration_seconds_bucket{route=\"/r\",status=\"503\",le=\"0.01\"} 0\n\
            http_request_duration_seconds_bucket{route=\"/r\",status=\"503\",le=\"+Inf\"} 0\n";
        let mut b = BTreeMap::new();
        add_latency_buckets(one, &mut b);
        add_latency_buckets(one, &mut b);
        let p = bucket_percentiles(&b["/r"]);
        assert_eq!(p.count, 200.0);
        assert_eq!(p.p50_at_most, Some(1.0));
        assert_eq!(p.p99_at_most, Some(10.0));
        let mut slow = BTreeMap::new();
        add_latency_buckets(
            "http_request_duration_seconds_bucket{route=\"/s\",status=\"200\",le=\"5\"} 1\n\
             http_request_duration_seconds_bucket{route=\"/s\",status=\"200\",le=\"+Inf\"} 10\n",
            &mut slow,
        );
        assert_eq!(
            bucket_percentiles(&slow["/s"]).p99_at_most,
            None,
            "beyond 5 s"
        );
    }

    #[test]
    fn percentiles_pick_the_ranked_sample() {
        let p = Percentiles::of((1..=1000).map(|ms| ms * 1000).collect());
        assert_eq!((p.p50, p.p99, p.p999, p.max), (500.0, 990.0, 999.0, 1000.0));
        assert_eq!(Percentiles::of(Vec::new()).count, 0);
    }

    #[test]
    fn backoff_grows_to_the_cap_and_honours_retry_after() {
        let mut rng = StdRng::seed_from_u64(1);
        assert!(backoff(0, None, &mut rng) <= BACKOFF_BASE);
        assert!(backoff(20, None, &mut rng) <= BACKOFF_CAP);
        assert!(backoff(0, Some(Duration::from_secs(7)), &mut rng) >= Duration::from_secs(7));
    }
}
