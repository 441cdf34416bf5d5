//! In-memory till and engine for the status endpoint tests: a till with a known catalog and
//! queue, and an engine that is offline and reports a fixed drift, so every assertion about
//! the endpoint and page can be checked against exact numbers.

#![allow(dead_code)]

use async_trait::async_trait;
use chrono::{DateTime, Duration, Utc};
use possync_actors::{
    ActorKind, ActorState, ActorStatus, CatalogPosition, EngineStatus, OutboxCounts,
    ReconcileAction, ReconcileReport, TerminalCode,
};
use possync_protocol::{Entity, ErrorCode, EventType, SalePayload};
use possync_terminal::local_api::{LocalApiConfig, StatusServer};
use possync_terminal::operator::{
    ActorView, CatalogQuery, CatalogSummary, EngineView, EnqueueReceipt, IdempotencyKey, Identity,
    JournalRow, JournalStatus, KeyedReceipt, RetryTarget, SyncControl, SyncControlError, Till,
    TillError,
};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use uuid::Uuid;

pub const POS_ID: &str = "0194b7a2-6c1e-7f00-8000-000000000001";
/// The local API token of the fake endpoints (a real daemon reads its data dir's).
pub const LOCAL_TOKEN: &str =
    "ltk_00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff";

/// A till whose journal is a list of rows and whose catalog is two products.
pub struct FakeTill {
    pub rows: Mutex<Vec<JournalRow>>,
    pub entities: Vec<Entity>,
    pub snapshot_in_progress: bool,
    /// Idempotency key → (request hash, receipt) of the keyed sales recorded.
    pub keys: Mutex<HashMap<String, (String, EnqueueReceipt)>>,
}

fn product(id: &str, sku: &str, barcode: &str, name: &str) -> Entity {
    let data = json!({"sku": sku, "barcode": barcode, "name": name, "price_minor": 250});
    Entity {
        entity_type: "product".into(),
        id: id.into(),
        version: 7,
        deleted: false,
        branch_id: None,
        hash: possync_protocol::entity_hash(&data),
        data,
    }
}

impl FakeTill {
    /// Two synced sales, one pending, one needing attention.
    pub fn new() -> FakeTill {
        let now = Utc::now();
        let row = |id: i64, status, code: Option<ErrorCode>, created: DateTime<Utc>| JournalRow {
            journal_id: id,
            local_event_id: id,
            status,
            attempts: if code.is_some() { 12 } else { 0 },
            next_attempt_at: None,
            last_error_code: code.map(|c| c.as_str().to_string()),
            last_error_message: code.map(|_| "total does not match lines".to_string()),
            cloud_event_id: None,
            created_at: created,
            receipt_no: Some(format!("B1-T1-{id:06}")),
        };
        FakeTill {
            rows: Mutex::new(vec![
                row(1, JournalStatus::Synced, None, now - Duration::minutes(30)),
                row(2, JournalStatus::Synced, None, now - Duration::minutes(20)),
                row(
                    3,
                    JournalStatus::NeedsAttention,
                    Some(ErrorCode::PosSyncEventInvalid),
                    now - Duration::minutes(15),
                ),
                row(4, JournalStatus::Pending, None, now - Duration::minutes(10)),
            ]),
            entities: vec![
                product("p1", "SKU-1", "4006381333931", "Espresso beans 1kg"),
                product("p2", "SKU-2", "4006381333948", "Oat milk"),
            ],
            snapshot_in_progress: false,
            keys: Mutex::default(),
        }
    }

    fn count(&self, status: JournalStatus) -> i64 {
        self.rows
            .lock()
            .expect("rows")
            .iter()
            .filter(|r| r.status == status)
            .count() as i64
    }
}

impl Till for FakeTill {
    fn identity(&self) -> Result<Identity, TillError> {
        Ok(Identity {
            pos_id: Uuid::parse_str(POS_ID).expect("uuid"),
            terminal_id: Some(Uuid::nil()),
            branch_id: Some("b1".into()),
        })
    }

    fn enqueue_sale(
        &self,
        event_type: EventType,
        occurred_at: DateTime<Utc>,
        payload: &SalePayload,
    ) -> Result<EnqueueReceipt, TillError> {
        possync_protocol::validate_payload(event_type, payload)
            .map_err(|e| TillError::Invalid(e.to_string()))?;
        let mut rows = self.rows.lock().expect("rows");
        let id = rows.len() as i64 + 1;
        rows.push(JournalRow {
            journal_id: id,
            local_event_id: id,
            status: JournalStatus::Pending,
            attempts: 0,
            next_attempt_at: None,
            last_error_code: None,
            last_error_message: None,
            cloud_event_id: None,
            created_at: occurred_at,
            receipt_no: Some(payload.receipt_no.clone()),
        });
        Ok(EnqueueReceipt {
            pos_id: Uuid::parse_str(POS_ID).expect("uuid"),
            local_event_id: id,
        })
    }

    /// The store's rule with the store's request hash, over a map instead of a table.
    fn enqueue_sale_keyed(
        &self,
        key: &IdempotencyKey,
        event_type: EventType,
        occurred_at: Option<DateTime<Utc>>,
        payload: &SalePayload,
    ) -> Result<KeyedReceipt, TillError> {
        let hash =
            possync_terminal::store::idempotency::request_hash(event_type, occurred_at, payload)
                .map_err(|e| TillError::Storage(e.to_string()))?;
        let mut keys = self.keys.lock().expect("keys");
        match keys.get(key.as_str()) {
            Some((seen, receipt)) if *seen == hash => Ok(KeyedReceipt {
                receipt: receipt.clone(),
                replayed: true,
            }),
            Some(_) => Err(TillError::KeyReused(format!("key {key} reused"))),
            None => {
                let receipt =
                    self.enqueue_sale(event_type, occurred_at.unwrap_or_else(Utc::now), payload)?;
                keys.insert(key.as_str().to_string(), (hash, receipt.clone()));
                Ok(KeyedReceipt {
                    receipt,
                    replayed: false,
                })
            }
        }
    }

    fn lookup(&self, query: &CatalogQuery) -> Result<Vec<Entity>, TillError> {
        Ok(self
            .entities
            .iter()
            .filter(|e| match query {
                CatalogQuery::Barcode(b) => e.data["barcode"] == b.as_str(),
                CatalogQuery::Sku(s) => e.data["sku"] == s.as_str(),
                CatalogQuery::Text(t) => e.data["name"]
                    .as_str()
                    .is_some_and(|n| n.to_lowercase().contains(&t.to_lowercase())),
            })
            .cloned()
            .collect())
    }

    fn catalog_summary(&self) -> Result<CatalogSummary, TillError> {
        Ok(CatalogSummary {
            version: Some(42),
            entities: self.entities.len() as i64,
            last_synced_at: Some(Utc::now() - Duration::seconds(90)),
        })
    }

    fn catalog_position(&self) -> Result<CatalogPosition, TillError> {
        Ok(CatalogPosition {
            catalog_version: Some(42),
            snapshot_in_progress: self.snapshot_in_progress,
            snapshot_received: if self.snapshot_in_progress { 250 } else { 0 },
            snapshot_total: if self.snapshot_in_progress { 1000 } else { 0 },
            ..CatalogPosition::default()
        })
    }

    fn outbox_counts(&self) -> Result<OutboxCounts, TillError> {
        let oldest = self
            .rows
            .lock()
            .expect("rows")
            .iter()
            .filter(|r| r.status == JournalStatus::Pending)
            .map(|r| r.created_at)
            .min();
        Ok(OutboxCounts {
            pending: self.count(JournalStatus::Pending),
            in_flight: self.count(JournalStatus::InFlight),
            failed: self.count(JournalStatus::Failed),
            synced: self.count(JournalStatus::Synced),
            needs_attention: self.count(JournalStatus::NeedsAttention),
            oldest_pending_at: oldest,
        })
    }

    fn journal(
        &self,
        state: Option<JournalStatus>,
        limit: usize,
    ) -> Result<Vec<JournalRow>, TillError> {
        Ok(self
            .rows
            .lock()
            .expect("rows")
            .iter()
            .rev()
            .filter(|r| state.is_none_or(|s| r.status == s))
            .take(limit)
            .cloned()
            .collect())
    }

    fn retry(&self, target: RetryTarget) -> Result<usize, TillError> {
        let mut rows = self.rows.lock().expect("rows");
        let mut n = 0;
        for r in rows.iter_mut() {
            let hit = match target {
                RetryTarget::One(id) => r.journal_id == id,
                RetryTarget::AllNeedingAttention => true,
            };
            if hit && r.status == JournalStatus::NeedsAttention {
                r.status = JournalStatus::Pending;
                r.attempts = 0;
                n += 1;
            }
        }
        if n == 0 {
            if let RetryTarget::One(id) = target {
                return Err(TillError::NotFound(format!(
                    "no needs_attention journal row {id}"
                )));
            }
        }
        Ok(n)
    }
}

/// An engine that is offline and whose catalog differs from the cloud in two entries.
#[derive(Default)]
pub struct FakeEngine {
    pub flushes: AtomicUsize,
    pub reconciles: Mutex<Vec<ReconcileAction>>,
}

#[async_trait]
impl SyncControl for FakeEngine {
    fn view(&self) -> EngineView {
        EngineView {
            online: false,
            last_contact_at: None,
            offline_since: Some(chrono::Utc::now() - chrono::Duration::minutes(90)),
            actors: vec![
                ActorView {
                    name: ActorKind::CatalogSyncer,
                    status: ActorStatus {
                        state: ActorState::Idle,
                        restarts: 1,
                        last_error: Some(format!("{}: connection refused", TerminalCode::Network)),
                    },
                },
                ActorView {
                    name: ActorKind::SalesOutbox,
                    status: ActorStatus {
                        state: ActorState::Waiting {
                            next_retry_at: Utc::now() + Duration::seconds(30),
                        },
                        restarts: 0,
                        last_error: None,
                    },
                },
            ],
            detail: EngineStatus::default(),
        }
    }

    async fn reconcile(
        &self,
        action: ReconcileAction,
    ) -> Result<ReconcileReport, SyncControlError> {
        self.reconciles.lock().expect("reconciles").push(action);
        Ok(ReconcileReport {
            mode: action,
            method: possync_actors::reconcile::VerifyMethod::Manifest,
            round_trips: 1,
            bytes_sent: 100,
            bytes_received: 200,
            ranges: 1,
            checked: 2,
            unchanged: 0,
            upserts: 1,
            deletes: 1,
            applied: action == ReconcileAction::Apply,
            catalog_version: Some(42),
        })
    }

    async fn flush_outbox_now(&self) {
        self.flushes.fetch_add(1, Ordering::SeqCst);
    }

    async fn sync_catalog_now(&self) {}
}

/// A status endpoint on a free loopback port over the fakes.
pub fn start_fake_server() -> (
    StatusServer,
    Arc<FakeTill>,
    Arc<FakeEngine>,
    prometheus::IntCounter,
) {
    start_server_with(FakeTill::new())
}

/// As [`start_fake_server`] over the given till.
pub fn start_server_with(
    till: FakeTill,
) -> (
    StatusServer,
    Arc<FakeTill>,
    Arc<FakeEngine>,
    prometheus::IntCounter,
) {
    start_server_allowing(till, &[])
}

/// As [`start_server_with`], answering also to the `--allowed-host` names `allowed_hosts`.
pub fn start_server_allowing(
    till: FakeTill,
    allowed_hosts: &[&str],
) -> (
    StatusServer,
    Arc<FakeTill>,
    Arc<FakeEngine>,
    prometheus::IntCounter,
) {
    start_server_on("127.0.0.1:0", till, allowed_hosts)
}

/// As [`start_server_allowing`], bound to `bind` (e.g. the port a stopped server used).
pub fn start_server_on(
    bind: &str,
    till: FakeTill,
    allowed_hosts: &[&str],
) -> (
    StatusServer,
    Arc<FakeTill>,
    Arc<FakeEngine>,
    prometheus::IntCounter,
) {
    let till = Arc::new(till);
    let engine = Arc::new(FakeEngine::default());
    let registry = prometheus::Registry::new();
    let engine_metric =
        prometheus::IntCounter::new("synced_events", "engine-registered metric").expect("counter");
    registry
        .register(Box::new(engine_metric.clone()))
        .expect("register");
    let access = LocalApiConfig {
        local_token: LOCAL_TOKEN.to_string(),
        allowed_hosts: allowed_hosts.iter().map(|h| h.to_string()).collect(),
    };
    let server = StatusServer::start(bind, access, till.clone(), engine.clone(), registry)
        .expect("status server starts");
    (server, till, engine, engine_metric)
}

/// A SALE payload that passes validation.
pub fn valid_payload(receipt: &str) -> Value {
    json!({
        "receipt_no": receipt, "currency": "EUR",
        "lines": [{"product_id": "p1", "sku": "SKU-1", "name": "Espresso beans 1kg", "qty": 2,
                   "unit_price_minor": 250, "discount_minor": 0, "tax_minor": 80, "total_minor": 500}],
        "totals": {"subtotal_minor": 420, "tax_minor": 80, "total_minor": 500},
        "payments": [{"method": "cash", "amount_minor": 500}]
    })
}

/// Serves `html` to every request on a free loopback port until the runtime ends: a web page
/// of another origin than the status endpoint's (the attacker's page in the browser tests).
/// Returns its `http://127.0.0.1:PORT` URL.
pub async fn serve_page_elsewhere(html: String) -> String {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind page server");
    let url = format!(
        "http://{}",
        listener.local_addr().expect("page server addr")
    );
    let html = Arc::new(html);
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            let html = html.clone();
            tokio::spawn(async move {
                // Read the request head; its content does not matter.
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match conn.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let answer = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: text/html; charset=utf-8\r\n\
                     content-length: {}\r\nconnection: close\r\n\r\n{}",
                    html.len(),
                    html
                );
                let _ = conn.write_all(answer.as_bytes()).await;
                let _ = conn.shutdown().await;
            });
        }
    });
    url
}

/// `GET /metrics` of the endpoint at `url`, as text.
pub async fn metrics_text(url: &str) -> String {
    reqwest::get(format!("{url}/metrics"))
        .await
        .expect("GET /metrics")
        .text()
        .await
        .expect("metrics text")
}

/// How many requests the endpoint at `url` refused for `reason`
/// (`terminal_local_api_refused_total`).
pub async fn refused(url: &str, reason: &str) -> f64 {
    metric_value(
        &metrics_text(url).await,
        &format!("terminal_local_api_refused_total{{reason=\"{reason}\"}}"),
    )
}

/// The value of the first sample of `name` (with its labels, e.g. `x{reason="origin"}`) in
/// Prometheus text, or 0 when absent.
pub fn metric_value(text: &str, name: &str) -> f64 {
    possync_testkit::metrics_text::sample(text, name).unwrap_or(0.0)
}
