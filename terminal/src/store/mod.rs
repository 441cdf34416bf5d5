//! The terminal's local SQLite store: the catalog copy, the sales outbox (`sync_journal`), the
//! till's own receipts and stock, and the migration from the legacy Google Drive era layout.
//!
//! Why one module owns all of it: every durability promise the terminal makes — "a sale is
//! answered only after it is on disk", "a synced sale can never change", "sync never touches
//! stock" — is a property of how these tables are written, so the writes live in one place and
//! each one is a single SQLite transaction.
//!
//! The connection runs in WAL mode with `synchronous=FULL`: a commit returns only after the WAL
//! is fsynced, which is what lets `enqueue_sale` answer "stored" and mean it across a power cut.
//! See `docs/local-schema.md` for the tables and `docs/migration.md` for the legacy migration.

mod catalog;
mod error;
pub mod idempotency;
pub mod identity;
mod inventory;
mod journal;
pub mod legacy;
pub mod schema;

pub use catalog::{CatalogQuery, CatalogStats, LOOKUP_LIMIT};
pub use error::TerminalStoreError;
pub use idempotency::{IdempotencyKey, KeyInvalid};
pub use identity::{
    CarryCandidate, CarryDecision, CarryOverCounts, CarryScope, ChangeReason, IdentityChange,
    Inherited, KeySpace,
};
pub use journal::{EnqueuedSale, JournalRow, JournalStatus, KeyedSale, RetryTarget};
pub use legacy::{migrate_legacy, LegacyOutcome, LegacyReport};

use chrono::{DateTime, SecondsFormat, Utc};
use possync_actors::{
    CatalogPosition, DeliveryOutcome, LocalStore, OutboxCounts, OutboxItem, StoreError,
};
use possync_protocol::fingerprint::FingerprintTree;
use possync_protocol::{
    DeltaPage, Entity, EventType, KeyRange, ManifestEntry, ReconcilePlan, SalePayload, SnapshotPage,
};
use rusqlite::{Connection, OptionalExtension};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;
use uuid::Uuid;

/// Blocking store work lost its worker thread (a panic inside it, or the runtime shutting
/// down): the operation's transaction did not report success, so callers treat it as a storage
/// failure (`POS_SYNC_STORAGE_FAILED`) — never as bad input.
#[derive(Debug, thiserror::Error)]
#[error("local database worker failed: {0}")]
pub struct WorkerLost(String);

/// Runs blocking store work (SQLite) on tokio's blocking pool for an async caller; the one
/// way the CLI and the carry-over reach the store from async code.
pub async fn off_thread<T, E>(f: impl FnOnce() -> Result<T, E> + Send + 'static) -> Result<T, E>
where
    T: Send + 'static,
    E: From<WorkerLost> + Send + 'static,
{
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| E::from(WorkerLost(e.to_string())))?
}

/// How long a statement waits for another connection's lock (e.g. the CLI while the daemon
/// writes) before failing with `POS_SYNC_STORAGE_FAILED`.
pub const BUSY_TIMEOUT: Duration = Duration::from_secs(5);
/// Prepared statements kept per connection (see `SqliteStore::open`).
const STATEMENT_CACHE_CAPACITY: usize = 128;
/// How often the daemon checkpoints the WAL in the background (see
/// [`SqliteStore::checkpoint_in_background`]).
pub const WAL_CHECKPOINT_EVERY: Duration = Duration::from_millis(500);

/// The terminal's local database. Cheap to clone (one shared connection behind a mutex), so
/// the engine, the HTTP handlers and the CLI can all hold it; every method is one transaction.
#[derive(Clone)]
pub struct SqliteStore {
    inner: Arc<Inner>,
}

struct Inner {
    conn: Mutex<Connection>,
    /// The `pos_id` at open, shown only if the database cannot be read; the stored one is the
    /// truth (a fork or re-enrollment changes it, possibly in another process).
    pos_id_at_open: Uuid,
    /// This device's nonce (see [`identity::ensure_device_nonce`]).
    device_nonce: Uuid,
    path: PathBuf,
    /// Its own connection for WAL checkpoints (see [`SqliteStore::checkpoint_wal`]), opened
    /// on first use, so a checkpoint never holds `conn`.
    checkpointer: Mutex<Option<Connection>>,
}

impl fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SqliteStore")
            .field("path", &self.inner.path)
            .field("pos_id", &self.inner.pos_id_at_open)
            .finish()
    }
}

/// What opening the database did to it, for the daemon's start-up log and `terminal migrate`.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct OpenReport {
    /// Schema version found in the file (0 for a new file or the legacy layout).
    pub from_version: u32,
    /// Migrations applied now.
    pub applied: Vec<u32>,
    /// The safety copy taken before migrating, if anything was migrated on a non-empty file.
    pub backup_path: Option<PathBuf>,
    /// Set when the legacy Google Drive era layout was converted now.
    pub legacy: Option<LegacyReport>,
}

/// The terminal's enrollment with the cloud: where to sync and as whom.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Enrollment {
    /// Base URL of `cloud serve`, e.g. `https://sync.example.com`.
    pub cloud_url: String,
    /// The id the cloud issued to this terminal (first part of every idempotency key).
    pub terminal_id: Uuid,
    /// The branch this terminal sells for; it never acts for another.
    pub branch_id: String,
    /// Bearer token; never printed by `Debug`.
    pub token: String,
    /// CA certificate(s) (PEM) trusted for the cloud's TLS besides the web PKI roots, from
    /// `terminal enroll --ca-cert`; kept here so the file need not stay on the till.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_cert_pem: Option<String>,
}

impl fmt::Debug for Enrollment {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Enrollment")
            .field("cloud_url", &self.cloud_url)
            .field("terminal_id", &self.terminal_id)
            .field("branch_id", &self.branch_id)
            .field("token", &"<redacted>")
            .field("ca_cert_pem", &self.ca_cert_pem.is_some())
            .finish()
    }
}

/// What [`SqliteStore::save_enrollment`] changed besides the enrollment itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct EnrollmentSaved {
    /// The new `pos_id`, when the till was enrolled as another terminal or branch.
    pub forked_to: Option<Uuid>,
    /// Sales parked with `POS_SYNC_UNAUTHORIZED` released for delivery.
    pub released: usize,
}

/// Formats a time the way every column of this database stores it: RFC 3339 UTC with
/// microseconds and `Z`, fixed width, so text order equals time order in SQL comparisons.
pub(crate) fn time_text(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Micros, true)
}

/// Parses a stored time.
pub(crate) fn parse_time(s: &str) -> Result<DateTime<Utc>, TerminalStoreError> {
    DateTime::parse_from_rfc3339(s)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|e| TerminalStoreError::Corrupt(format!("stored time {s:?}: {e}")))
}

/// The two key/value tables.
#[derive(Clone, Copy)]
pub(crate) enum Kv {
    CatalogMeta,
    SyncState,
}

impl Kv {
    fn table(self) -> &'static str {
        match self {
            Kv::CatalogMeta => "catalog_meta",
            Kv::SyncState => "sync_state",
        }
    }

    /// The statements, as fixed text per table so each is prepared once per connection
    /// (`prepare_cached`): a sale reads and writes these on every enqueue.
    fn sql(self, op: KvOp) -> &'static str {
        match (self, op) {
            (Kv::CatalogMeta, KvOp::Get) => "SELECT value FROM catalog_meta WHERE key = ?1",
            (Kv::SyncState, KvOp::Get) => "SELECT value FROM sync_state WHERE key = ?1",
            (Kv::CatalogMeta, KvOp::Set) => {
                "INSERT INTO catalog_meta (key, value) VALUES (?1, ?2)
                 ON CONFLICT (key) DO UPDATE SET value = excluded.value"
            }
            (Kv::SyncState, KvOp::Set) => {
                "INSERT INTO sync_state (key, value) VALUES (?1, ?2)
                 ON CONFLICT (key) DO UPDATE SET value = excluded.value"
            }
            (Kv::CatalogMeta, KvOp::Delete) => "DELETE FROM catalog_meta WHERE key = ?1",
            (Kv::SyncState, KvOp::Delete) => "DELETE FROM sync_state WHERE key = ?1",
        }
    }

    pub(crate) fn get(
        self,
        conn: &Connection,
        key: &str,
    ) -> Result<Option<String>, rusqlite::Error> {
        conn.prepare_cached(self.sql(KvOp::Get))?
            .query_row([key], |r| r.get(0))
            .optional()
    }

    pub(crate) fn get_i64(
        self,
        conn: &Connection,
        key: &str,
    ) -> Result<Option<i64>, TerminalStoreError> {
        match self.get(conn, key)? {
            None => Ok(None),
            Some(v) => v.parse().map(Some).map_err(|_| {
                TerminalStoreError::Corrupt(format!(
                    "{}.{key} is {v:?}, not an integer",
                    self.table()
                ))
            }),
        }
    }

    pub(crate) fn set(
        self,
        conn: &Connection,
        key: &str,
        value: &str,
    ) -> Result<(), rusqlite::Error> {
        conn.prepare_cached(self.sql(KvOp::Set))?
            .execute([key, value])
            .map(|_| ())
    }

    pub(crate) fn delete(self, conn: &Connection, key: &str) -> Result<(), rusqlite::Error> {
        conn.prepare_cached(self.sql(KvOp::Delete))?
            .execute([key])
            .map(|_| ())
    }
}

#[derive(Clone, Copy)]
enum KvOp {
    Get,
    Set,
    Delete,
}

impl SqliteStore {
    /// Opens (or creates) the database at `path`: WAL, `synchronous=FULL`, foreign keys,
    /// busy timeout; backs the file up and runs pending migrations (converting the legacy
    /// layout when it finds one); creates this database's `pos_id` once.
    pub fn open(path: &Path) -> Result<SqliteStore, TerminalStoreError> {
        Self::open_with_report(path).map(|(store, _)| store)
    }

    /// [`SqliteStore::open`], also saying what was migrated (for logs and `terminal migrate`).
    pub fn open_with_report(path: &Path) -> Result<(SqliteStore, OpenReport), TerminalStoreError> {
        let mut conn = Connection::open(path)?;
        conn.busy_timeout(BUSY_TIMEOUT)?;
        // Every write transaction takes the write lock up front (BEGIN IMMEDIATE), waiting up
        // to the busy timeout: a deferred one that read first could not upgrade while another
        // process (daemon vs. CLI) committed in between, and would fail instead of waiting.
        conn.set_transaction_behavior(rusqlite::TransactionBehavior::Immediate);
        // The legacy app may have used `user_version` for its own numbering: a legacy
        // layout counts as version 0 of this schema whatever the header says.
        let legacy_layout = legacy::has_original_layout(&conn)?;
        let from_version = if legacy_layout {
            0
        } else {
            schema::check_not_newer(&conn)?
        };
        let pending = from_version < schema::latest_version();
        let backup_path = if (pending || legacy_layout) && schema::has_user_objects(&conn)? {
            Some(schema::backup(&conn, path, from_version)?)
        } else {
            None
        };
        let mode: String =
            conn.pragma_update_and_check(None, "journal_mode", "WAL", |r| r.get(0))?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(TerminalStoreError::Corrupt(format!(
                "could not switch to WAL (journal_mode is {mode})"
            )));
        }
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.pragma_update(None, "foreign_keys", true)?;
        // Every statement the daemon runs stays prepared: the sale path alone uses about ten,
        // the outbox, catalog and status queries as many again (rusqlite's default keeps 16,
        // and a statement pushed out is parsed again on its next use).
        conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE_CAPACITY);

        if legacy_layout {
            legacy::retire_original_tables(&mut conn)?;
        }
        let applied = schema::apply_pending(&mut conn, schema::latest_version())?;
        let pos_id = ensure_pos_id(&conn)?;
        let legacy = legacy::convert_if_pending(&mut conn, pos_id, backup_path.clone())?;
        let device_nonce = identity::ensure_device_nonce(&mut conn, path)?;
        let report = OpenReport {
            from_version,
            applied,
            backup_path,
            legacy,
        };
        let store = SqliteStore {
            inner: Arc::new(Inner {
                conn: Mutex::new(conn),
                pos_id_at_open: pos_id,
                device_nonce,
                path: path.to_path_buf(),
                checkpointer: Mutex::new(None),
            }),
        };
        Ok((store, report))
    }

    /// The `pos_id` new sales are stamped with: generated when the database was created, and
    /// replaced by a fork or a re-enrollment as another terminal (see [`identity`]).
    pub fn pos_id(&self) -> Uuid {
        identity::pos_id(&self.conn()).unwrap_or(self.inner.pos_id_at_open)
    }

    /// This device's nonce, sent with every sales request (`x-device-nonce`).
    pub fn device_nonce(&self) -> Uuid {
        self.inner.device_nonce
    }

    /// Sales inherited from the database this one was copied from (delivered with its nonce).
    pub fn inherited(&self) -> Result<Vec<Inherited>, TerminalStoreError> {
        identity::inherited(&self.conn())
    }

    /// The key space new sales are stamped with and the outbox delivers; `None` before
    /// enrollment.
    pub fn key_space(&self) -> Result<Option<KeySpace>, TerminalStoreError> {
        identity::key_space(&self.conn())
    }

    /// The last [`identity::CHANGES_KEPT`] changes of the key space, oldest first.
    pub fn identity_changes(&self) -> Result<Vec<IdentityChange>, TerminalStoreError> {
        identity::changes(&self.conn())
    }

    /// Forks to a new `pos_id` if the cloud said the current one is used by another database.
    pub fn fork_if_needed(&self) -> Result<Option<Uuid>, TerminalStoreError> {
        identity::fork(&mut self.conn())
    }

    /// Unsent rows of earlier key spaces, waiting to be carried over.
    pub fn carry_candidates(
        &self,
        scope: CarryScope,
    ) -> Result<Vec<CarryCandidate>, TerminalStoreError> {
        identity::carry_candidates(&self.conn(), scope)
    }

    /// Inherited rows left to the original database (see
    /// [`identity::inherited_left_to_original`]).
    pub fn inherited_left_to_original(&self) -> Result<Vec<CarryCandidate>, TerminalStoreError> {
        identity::inherited_left_to_original(&self.conn())
    }

    /// Applies a carry-over (one transaction; rows changed since they were read are skipped).
    pub fn apply_carry_over(
        &self,
        decisions: &[CarryDecision],
    ) -> Result<CarryOverCounts, TerminalStoreError> {
        identity::apply_carry_over(&mut self.conn(), decisions)
    }

    /// Stops SQLite from checkpointing the WAL inside a committing transaction (by default
    /// the commit that crosses 1 000 WAL pages copies them into the database file and fsyncs
    /// it — a sale's `POST /sales` paid for that). The caller then runs
    /// [`SqliteStore::checkpoint_wal`] regularly, off the sale path: the daemon does, every
    /// [`WAL_CHECKPOINT_EVERY`]. Durability is the same either way: a commit is durable once
    /// its WAL frames are fsynced (`synchronous=FULL`), checkpointed or not.
    pub fn checkpoint_in_background(&self) -> Result<(), TerminalStoreError> {
        self.conn().pragma_update(None, "wal_autocheckpoint", 0)?;
        Ok(())
    }

    /// Copies committed WAL frames into the database file (`wal_checkpoint(PASSIVE)`: never
    /// waits for a writer or a reader, so a sale committing meanwhile is not held up) on the
    /// store's own checkpoint connection. Returns the WAL frames checkpointed.
    pub fn checkpoint_wal(&self) -> Result<i64, TerminalStoreError> {
        let mut slot = self
            .inner
            .checkpointer
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if slot.is_none() {
            let conn = Connection::open(&self.inner.path)?;
            conn.busy_timeout(BUSY_TIMEOUT)?;
            conn.pragma_update(None, "synchronous", "FULL")?;
            *slot = Some(conn);
        }
        let Some(conn) = slot.as_ref() else {
            return Ok(0);
        };
        let (_busy, _log, done): (i64, i64, i64) =
            conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?))
            })?;
        Ok(done.max(0))
    }

    /// The journal as audit records, by `pos_id` then `local_event_id` (`terminal audit verify`).
    pub fn audit_records(
        &self,
    ) -> Result<Vec<possync_protocol::journal_chain::AuditRecord>, TerminalStoreError> {
        journal::audit_records(&self.conn())
    }

    /// Path of the database file.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    fn conn(&self) -> MutexGuard<'_, Connection> {
        // A panic while holding the lock cannot leave a half-applied write behind: the open
        // transaction rolls back when it is dropped. So the connection stays usable.
        self.inner
            .conn
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The enrollment saved by `terminal enroll`, if any.
    pub fn enrollment(&self) -> Result<Option<Enrollment>, TerminalStoreError> {
        let conn = self.conn();
        read_enrollment(&conn)
    }

    /// Saves the enrollment, and stamps its terminal and branch into sales queued before the
    /// terminal was enrolled (e.g. converted legacy sales), so their idempotency key is fixed
    /// before the first delivery.
    ///
    /// Enrolling again as the same terminal and branch (a rotated token, a new cloud URL)
    /// keeps the `pos_id`, the journal and the catalog, and releases sales parked only because
    /// the old token was refused. Enrolling as another terminal or branch starts a new `pos_id`
    /// in the same transaction; the unsent sales of the old identity then wait for a
    /// carry-over (see [`identity`]).
    pub fn save_enrollment(&self, e: &Enrollment) -> Result<EnrollmentSaved, TerminalStoreError> {
        if !possync_protocol::valid_branch_id(&e.branch_id) {
            return Err(TerminalStoreError::InvalidEnrollment(format!(
                "branch_id {:?} must be 1-64 of [a-z0-9_-]",
                e.branch_id
            )));
        }
        let mut conn = self.conn();
        let tx = conn.transaction()?;
        let previous = read_enrollment(&tx)?;
        let forked_to = match previous {
            Some(p) if p.terminal_id != e.terminal_id || p.branch_id != e.branch_id => {
                Some(identity::fork_in(&tx, ChangeReason::Reenrolled)?)
            }
            _ => None,
        };
        Kv::SyncState.set(&tx, "enrollment", &serde_json::to_string(e)?)?;
        journal::stamp_identity(&tx, e)?;
        let released = identity::release_unauthorized(&tx)?;
        tx.commit()?;
        Ok(EnrollmentSaved {
            forked_to,
            released,
        })
    }

    /// Validates the sale with the shared protocol rules, then in ONE transaction takes the
    /// next `local_event_id`, stores the receipt in `sales` and its event in `sync_journal`
    /// (`pending`). Returns only after the commit is durable.
    pub fn enqueue_sale(
        &self,
        event_type: EventType,
        occurred_at: DateTime<Utc>,
        payload: &SalePayload,
    ) -> Result<EnqueuedSale, TerminalStoreError> {
        possync_protocol::validate_payload(event_type, payload)?;
        let mut conn = self.conn();
        journal::enqueue(&mut conn, event_type, occurred_at, payload)
    }

    /// [`Self::enqueue_sale`] under the client's `Idempotency-Key` (see [`idempotency`]): a
    /// new key records the sale with the key in the same transaction; a key that recorded this
    /// same request (type, payload, and `occurred_at` if given) answers the original sale's
    /// receipt and stores nothing; a key that recorded another request is
    /// [`TerminalStoreError::IdempotencyKeyReused`]. `occurred_at` `None` means now (for a
    /// new sale; a replay keeps the original time).
    pub fn enqueue_sale_keyed(
        &self,
        key: &IdempotencyKey,
        event_type: EventType,
        occurred_at: Option<DateTime<Utc>>,
        payload: &SalePayload,
    ) -> Result<KeyedSale, TerminalStoreError> {
        possync_protocol::validate_payload(event_type, payload)?;
        let request_hash = idempotency::request_hash(event_type, occurred_at, payload)?;
        let mut conn = self.conn();
        journal::enqueue_keyed(
            &mut conn,
            key,
            &request_hash,
            event_type,
            occurred_at.unwrap_or_else(Utc::now),
            payload,
        )
    }

    /// Offline catalog lookup over product entities (at most [`LOOKUP_LIMIT`] results).
    pub fn lookup(&self, q: CatalogQuery) -> Result<Vec<Entity>, TerminalStoreError> {
        catalog::lookup(&self.conn(), &q)
    }

    /// Catalog version, entity count and last sync time, for `/status`.
    pub fn catalog_stats(&self) -> Result<CatalogStats, TerminalStoreError> {
        catalog::stats(&self.conn())
    }

    /// Journal rows, optionally of one state, newest first.
    pub fn list_journal(
        &self,
        status: Option<JournalStatus>,
        limit: usize,
    ) -> Result<Vec<JournalRow>, TerminalStoreError> {
        journal::list(&self.conn(), status, limit)
    }

    /// Operator retry: `needs_attention` (or `failed`, for one row) → `pending` with the
    /// attempt count reset. Returns how many rows moved.
    pub fn retry_journal(&self, target: RetryTarget) -> Result<usize, TerminalStoreError> {
        journal::retry(&self.conn(), target)
    }

    /// Every journal row as `(pos_id, local_event_id, status)`, for simulations and e2e tests.
    pub fn journal_for_report(&self) -> Result<Vec<(Uuid, i64, String)>, TerminalStoreError> {
        journal::for_report(&self.conn())
    }

    /// Local stock of a product. A cloud product id that a legacy product was matched to
    /// reads the stock counted under the legacy id.
    pub fn local_inventory(&self, product_id: &str) -> Result<Option<i64>, TerminalStoreError> {
        inventory::local_inventory(&self.conn(), product_id)
    }

    /// Adds `delta` to a product's local stock (creating the row at `delta`); returns the new
    /// quantity. Only the branch POS calls this; sync never does.
    pub fn adjust_local_inventory(
        &self,
        product_id: &str,
        delta: i64,
    ) -> Result<i64, TerminalStoreError> {
        let mut conn = self.conn();
        inventory::adjust_local_inventory(&mut conn, product_id, delta)
    }

    /// [`LocalStore::catalog_position`] with the store's own error type.
    pub fn catalog_position_local(&self) -> Result<CatalogPosition, TerminalStoreError> {
        catalog::position(&self.conn())
    }

    /// What the till reports to the cloud about itself: the catalog version its copy is
    /// complete up to (`None` before the first snapshot) and its sales needing attention.
    pub fn till_report(&self) -> Result<(Option<i64>, i64), TerminalStoreError> {
        let conn = self.conn();
        Ok((
            catalog::position(&conn)?.catalog_version,
            journal::counts(&conn)?.needs_attention,
        ))
    }
}

fn read_enrollment(conn: &Connection) -> Result<Option<Enrollment>, TerminalStoreError> {
    match Kv::SyncState.get(conn, "enrollment")? {
        None => Ok(None),
        Some(text) => Ok(Some(serde_json::from_str(&text)?)),
    }
}

/// Runs `write` with `synchronous=NORMAL`, for writes the till can redo after a power cut
/// from what it still has or what the cloud holds: snapshot pages before the last (fetched
/// again from the last cursor that reached the disk), delta pages (the cursor moves back, the
/// changes come again, version-guarded), and the outbox's own bookkeeping — an `in_flight`
/// claim (undone at every start anyway) and a delivery outcome (the cloud's idempotency ledger
/// is the record of what was delivered: a lost `synced` mark means one resend answered
/// `duplicate`, and carry-over asks the cloud which keys it holds before re-keying anything).
///
/// Such a commit waits for no fsync, so it holds the store's one connection for microseconds
/// instead of a disk flush, and a sale arriving meanwhile does not queue behind a flush that
/// was not its own. Nothing is weakened: a kill -9 loses none of it (the WAL frames are in
/// the OS), the transaction is as atomic as ever, and the next FULL commit — every sale is
/// one — makes every frame before it durable too (the WAL is sequential). The connection is
/// back at `synchronous=FULL` before the lock is released, and the sale path sets FULL
/// itself as well, so no sale ever depends on this restore.
pub(crate) fn redoable_write<T>(
    conn: &mut Connection,
    write: impl FnOnce(&mut Connection) -> Result<T, TerminalStoreError>,
) -> Result<T, TerminalStoreError> {
    conn.pragma_update(None, "synchronous", "NORMAL")?;
    let written = write(conn);
    let restored = conn.pragma_update(None, "synchronous", "FULL");
    let value = written?;
    restored?;
    Ok(value)
}

/// Reads this database's pos_id, generating and storing it the first time.
fn ensure_pos_id(conn: &Connection) -> Result<Uuid, TerminalStoreError> {
    conn.execute(
        "INSERT OR IGNORE INTO sync_state (key, value) VALUES ('pos_id', ?1)",
        [Uuid::new_v4().to_string()],
    )?;
    let text = Kv::SyncState
        .get(conn, "pos_id")?
        .ok_or_else(|| TerminalStoreError::Corrupt("pos_id missing".into()))?;
    Uuid::parse_str(&text).map_err(|e| TerminalStoreError::Corrupt(format!("pos_id {text:?}: {e}")))
}

impl LocalStore for SqliteStore {
    fn catalog_position(&self) -> Result<CatalogPosition, StoreError> {
        Ok(catalog::position(&self.conn())?)
    }

    fn apply_snapshot_page(
        &self,
        page: &SnapshotPage,
        started_fresh: bool,
    ) -> Result<(), StoreError> {
        Ok(catalog::apply_snapshot_page(
            &mut self.conn(),
            page,
            started_fresh,
        )?)
    }

    fn apply_delta_page(&self, page: &DeltaPage) -> Result<(), StoreError> {
        Ok(redoable_write(&mut self.conn(), |c| {
            catalog::apply_delta_page(c, page)
        })?)
    }

    fn require_resnapshot(&self) -> Result<(), StoreError> {
        Ok(catalog::require_resnapshot(&mut self.conn())?)
    }

    fn manifest_after(
        &self,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<ManifestEntry>, StoreError> {
        Ok(catalog::manifest_after(&self.conn(), after, limit)?)
    }

    fn fingerprint_tree(&self) -> Result<FingerprintTree, StoreError> {
        // Not under the store's connection lock: its own read-only connection.
        Ok(catalog::fingerprint_tree(&self.inner.path)?)
    }

    fn manifest_in_leaves(&self, leaves: &[u32]) -> Result<Vec<ManifestEntry>, StoreError> {
        Ok(catalog::manifest_in_leaves(&self.inner.path, leaves)?)
    }

    fn apply_reconcile_plan(
        &self,
        range: &KeyRange,
        plan: &ReconcilePlan,
        cloud_version: i64,
    ) -> Result<(), StoreError> {
        Ok(catalog::apply_reconcile_plan(
            &mut self.conn(),
            range,
            plan,
            cloud_version,
        )?)
    }

    fn release_in_flight(&self) -> Result<usize, StoreError> {
        Ok(journal::release_in_flight(&self.conn())?)
    }

    fn claim_batch(&self, limit: usize, now: DateTime<Utc>) -> Result<Vec<OutboxItem>, StoreError> {
        Ok(redoable_write(&mut self.conn(), |c| {
            journal::claim_batch(c, limit, now)
        })?)
    }

    fn record_outcomes(&self, outcomes: &[DeliveryOutcome]) -> Result<(), StoreError> {
        Ok(redoable_write(&mut self.conn(), |c| {
            journal::record_outcomes(c, outcomes)
        })?)
    }

    fn next_due_at(&self) -> Result<Option<DateTime<Utc>>, StoreError> {
        Ok(journal::next_due_at(&self.conn())?)
    }

    fn outbox_counts(&self) -> Result<OutboxCounts, StoreError> {
        Ok(journal::counts(&self.conn())?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_connection_is_wal_with_full_sync_and_foreign_keys() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = SqliteStore::open(&dir.path().join("t.db")).expect("open");
        let conn = store.conn();
        let mode: String = conn
            .query_row("PRAGMA journal_mode", [], |r| r.get(0))
            .expect("mode");
        let sync: i64 = conn
            .query_row("PRAGMA synchronous", [], |r| r.get(0))
            .expect("sync");
        let fk: i64 = conn
            .query_row("PRAGMA foreign_keys", [], |r| r.get(0))
            .expect("fk");
        assert_eq!((mode.as_str(), sync, fk), ("wal", 2, 1), "2 = FULL");
    }

    #[test]
    fn with_checkpoints_in_the_background_no_commit_checkpoints_and_the_checkpointer_does() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = SqliteStore::open(&dir.path().join("t.db")).expect("open");
        store
            .checkpoint_in_background()
            .expect("autocheckpoint off");
        let conn = store.conn();
        let auto: i64 = conn
            .query_row("PRAGMA wal_autocheckpoint", [], |r| r.get(0))
            .expect("pragma");
        assert_eq!(auto, 0);
        conn.execute_batch("CREATE TABLE filler (x BLOB)")
            .expect("table");
        // Past the default 1 000-page mark: a commit would have checkpointed by now.
        for _ in 0..300 {
            conn.execute("INSERT INTO filler VALUES (zeroblob(16000))", [])
                .expect("insert");
        }
        drop(conn);
        // Had any commit checkpointed, the WAL would have restarted and hold fewer frames.
        let done = store.checkpoint_wal().expect("checkpoint");
        assert!(
            done > 1000,
            "every frame waited for the checkpointer: {done}"
        );
        assert_eq!(
            store.checkpoint_wal().expect("again"),
            done,
            "all copied already"
        );
    }

    #[test]
    fn outbox_bookkeeping_leaves_full_sync_and_a_sale_always_commits_with_full() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = SqliteStore::open(&dir.path().join("t.db")).expect("open");
        let sync = |s: &SqliteStore| -> i64 {
            s.conn()
                .query_row("PRAGMA synchronous", [], |r| r.get(0))
                .expect("sync")
        };
        let payload = possync_testkit::sample_sale_event(Uuid::nil(), Uuid::nil(), 1, "b1").payload;
        store
            .enqueue_sale(EventType::Sale, Utc::now(), &payload)
            .expect("sale");
        LocalStore::claim_batch(&store, 10, Utc::now()).expect("claim");
        assert_eq!(sync(&store), 2, "FULL again after a claim");
        LocalStore::record_outcomes(&store, &[]).expect("outcomes");
        assert_eq!(sync(&store), 2, "FULL again after recording outcomes");
        // Even if a redoable write had left the connection relaxed, the sale path sets FULL.
        store
            .conn()
            .pragma_update(None, "synchronous", "NORMAL")
            .expect("relax");
        store
            .enqueue_sale(EventType::Sale, Utc::now(), &payload)
            .expect("sale");
        assert_eq!(sync(&store), 2, "a sale commits with FULL");
        // Inside a redoable write the commit does not wait for a flush (NORMAL = 1).
        let inside: i64 = redoable_write(&mut store.conn(), |c| {
            Ok(c.query_row("PRAGMA synchronous", [], |r| r.get(0))?)
        })
        .expect("redoable");
        assert_eq!(inside, 1);
        assert_eq!(sync(&store), 2);
        // A failing redoable write restores FULL too.
        let failed: Result<(), TerminalStoreError> =
            redoable_write(&mut store.conn(), |c| Ok(c.execute_batch("NOT SQL")?));
        assert!(failed.is_err());
        assert_eq!(sync(&store), 2);
    }

    #[test]
    fn a_snapshot_page_leaves_the_connection_at_full_sync() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = SqliteStore::open(&dir.path().join("t.db")).expect("open");
        let page = |next: Option<&str>, id: &str| possync_protocol::SnapshotPage {
            snapshot_version: 2,
            total: 2,
            entities: vec![possync_protocol::Entity {
                entity_type: "product".into(),
                id: id.into(),
                version: 1,
                deleted: false,
                branch_id: None,
                hash: possync_protocol::entity_hash(&serde_json::json!({"n": 1})),
                data: serde_json::json!({"n": 1}),
            }],
            next_cursor: next.map(str::to_string),
        };
        let sync = |s: &SqliteStore| -> i64 {
            s.conn()
                .query_row("PRAGMA synchronous", [], |r| r.get(0))
                .expect("sync")
        };
        catalog::apply_snapshot_page(&mut store.conn(), &page(Some("c1"), "p1"), true)
            .expect("first page");
        assert_eq!(
            sync(&store),
            2,
            "FULL again after a page committed with NORMAL"
        );
        // A failing page (continuing a snapshot that was reset) restores FULL too.
        catalog::require_resnapshot(&mut store.conn()).expect("reset");
        assert!(
            catalog::apply_snapshot_page(&mut store.conn(), &page(Some("c2"), "p2"), false)
                .is_err()
        );
        assert_eq!(sync(&store), 2);
    }

    #[test]
    fn stored_times_sort_as_text_in_time_order() {
        let a = time_text("2026-11-25T09:00:00.5Z".parse().expect("a"));
        let b = time_text("2026-11-25T10:00:00Z".parse().expect("b"));
        assert_eq!(a, "2026-11-25T09:00:00.500000Z");
        assert!(a < b);
        assert_eq!(
            parse_time(&a).expect("parse").timestamp_millis() % 1000,
            500
        );
    }
}
