//! The terminals of a run: real `terminal run` daemons, each with its own data directory and
//! SQLite file, enrolled with its own [`FaultProxy`] as its cloud URL.
//!
//! Sales go in through the daemon's loopback `POST /sales` (the till's own path, which
//! answers only after the local transaction is durable). At the end the harness reads each
//! terminal's `sync_journal` and `catalog_entities` straight from its SQLite file, read-only.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::cloud_cluster::Enrollment;
use crate::daemon::{run_command, Daemon};
use crate::proxy::FaultProxy;
use crate::SimError;

/// Tuning passed to every daemon: short backoff so faults resolve within a run.
#[derive(Debug, Clone, Serialize)]
pub struct DaemonTuning {
    /// First retry delay bound (`POSSYNC_BACKOFF_BASE_MS`).
    pub backoff_base_ms: u64,
    /// Longest retry delay (`POSSYNC_BACKOFF_CAP_MS`): the outage outlasts it.
    pub backoff_cap_ms: u64,
    /// Pause between catalog delta polls (`POSSYNC_DELTA_INTERVAL_MS`).
    pub delta_interval_ms: u64,
    /// Failures blamed on a sale before it needs an operator (`POSSYNC_MAX_ATTEMPTS`). Kept
    /// small so the run's outage outlasts the whole budget several times over.
    pub max_attempts: u32,
}

impl DaemonTuning {
    /// The longest time `max_attempts` failed deliveries can take: the sum of the backoff
    /// ceilings. An outage longer than this used to park sales for an operator.
    pub fn attempt_budget_ms(&self) -> u64 {
        (1..=self.max_attempts.min(64))
            .map(|i| {
                self.backoff_base_ms
                    .saturating_mul(1u64 << (i - 1).min(62))
                    .min(self.backoff_cap_ms)
            })
            .fold(0u64, u64::saturating_add)
    }

    /// The environment variables the daemon reads for these knobs.
    pub fn env(&self) -> Vec<(String, String)> {
        vec![
            (
                "POSSYNC_BACKOFF_BASE_MS".into(),
                self.backoff_base_ms.to_string(),
            ),
            (
                "POSSYNC_BACKOFF_CAP_MS".into(),
                self.backoff_cap_ms.to_string(),
            ),
            (
                "POSSYNC_DELTA_INTERVAL_MS".into(),
                self.delta_interval_ms.to_string(),
            ),
            ("POSSYNC_MAX_ATTEMPTS".into(), self.max_attempts.to_string()),
            ("RUST_LOG".into(), "info".into()),
        ]
    }
}

/// One row of a terminal's `sync_journal`, as the audit needs it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JournalEntry {
    /// The terminal database's `pos_id`.
    pub pos_id: String,
    /// Its number on that `pos_id`.
    pub local_event_id: i64,
    /// `pending`, `in_flight`, `failed`, `synced` or `needs_attention`.
    pub status: String,
    /// Deliveries recorded so far.
    pub attempts: i64,
}

/// One live catalog row of a terminal.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct CatalogRow {
    /// Entity type.
    pub entity_type: String,
    /// Entity id.
    pub id: String,
    /// Catalog version of this copy.
    pub version: i64,
    /// sha256 of its canonical data.
    pub hash: String,
    /// `None` for a global entity.
    pub branch_id: Option<String>,
}

/// What `POST /sales` answers.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Receipt {
    /// The terminal database's `pos_id`.
    pub pos_id: String,
    /// Number the sale got on it.
    pub local_event_id: i64,
}

/// One simulated terminal.
pub struct TerminalNode {
    /// Position in the fleet (0-based).
    pub index: usize,
    /// What `cloud terminal add` issued.
    pub enrollment: Enrollment,
    /// Its data directory (`terminal.db`, logs next to it).
    pub data_dir: PathBuf,
    /// Its fault proxy, which it is enrolled with as cloud URL.
    pub proxy: FaultProxy,
    daemon: Option<Daemon>,
    bin: PathBuf,
    log: PathBuf,
    env: Vec<(String, String)>,
    client: reqwest::Client,
    /// The daemon's local API token (`terminal local-token`), for its `POST` routes.
    local_token: String,
    /// kill -9 + restart cycles so far.
    pub kills: u32,
}

impl TerminalNode {
    /// `terminal enroll` against the proxy, then `terminal run`.
    pub async fn enroll_and_start(
        index: usize,
        bin: &Path,
        run_dir: &Path,
        enrollment: Enrollment,
        proxy: FaultProxy,
        tuning: &DaemonTuning,
    ) -> Result<TerminalNode, SimError> {
        let data_dir = run_dir.join(format!("terminal-{index}"));
        std::fs::create_dir_all(&data_dir).map_err(|e| SimError::Io(e.to_string()))?;
        let env = tuning.env();
        let args: Vec<String> = vec![
            "enroll".into(),
            "--cloud-url".into(),
            proxy.url().to_string(),
            "--token".into(),
            enrollment.token.clone(),
            "--terminal-id".into(),
            enrollment.terminal_id.clone(),
            "--branch".into(),
            enrollment.branch_id.clone(),
            "--data-dir".into(),
            data_dir.to_string_lossy().into_owned(),
        ];
        run_command(bin, &args, &env).await?;
        let token_args: Vec<String> = vec![
            "local-token".into(),
            "--data-dir".into(),
            data_dir.to_string_lossy().into_owned(),
        ];
        let local_token = run_command(bin, &token_args, &env)
            .await?
            .trim()
            .to_string();
        let client = reqwest::Client::builder()
            .no_proxy()
            .timeout(Duration::from_secs(30))
            .build()
            .map_err(|e| SimError::Http(e.to_string()))?;
        let mut node = TerminalNode {
            index,
            enrollment,
            log: run_dir.join(format!("terminal-{index}.log")),
            data_dir,
            proxy,
            daemon: None,
            bin: bin.to_path_buf(),
            env,
            client,
            local_token,
            kills: 0,
        };
        node.start().await?;
        Ok(node)
    }

    /// A second till made from a copy of `source`'s live database (SQLite's online backup: a
    /// consistent snapshot, as imaging a running machine gives), with the same enrollment,
    /// started as its own daemon behind its own proxy.
    pub async fn clone_of(
        source: &TerminalNode,
        index: usize,
        run_dir: &Path,
        proxy: FaultProxy,
    ) -> Result<TerminalNode, SimError> {
        let data_dir = run_dir.join(format!("terminal-{index}"));
        std::fs::create_dir_all(&data_dir).map_err(|e| SimError::Io(e.to_string()))?;
        let from = source.database_path()?;
        let to = data_dir.join("terminal.db");
        tokio::task::spawn_blocking(move || -> Result<(), SimError> {
            let src = rusqlite::Connection::open(&from)
                .map_err(|e| SimError::Io(format!("opening {}: {e}", from.display())))?;
            src.busy_timeout(Duration::from_secs(5))
                .map_err(|e| SimError::Io(e.to_string()))?;
            src.backup(rusqlite::MAIN_DB, &to, None)
                .map_err(|e| SimError::Io(format!("copying {}: {e}", from.display())))
        })
        .await
        .map_err(|e| SimError::Io(e.to_string()))??;
        tracing::warn!(
            source = source.index,
            clone = index,
            "fault: till data directory cloned into a second daemon"
        );
        // The new till gets its own network (its proxy); enrolling again as the same terminal
        // and branch changes only the URL.
        let e = &source.enrollment;
        let args: Vec<String> = vec![
            "enroll".into(),
            "--cloud-url".into(),
            proxy.url().to_string(),
            "--token".into(),
            e.token.clone(),
            "--terminal-id".into(),
            e.terminal_id.clone(),
            "--branch".into(),
            e.branch_id.clone(),
            "--data-dir".into(),
            data_dir.to_string_lossy().into_owned(),
        ];
        run_command(&source.bin, &args, &source.env).await?;
        // The local API token lives beside the database, not in it: the new till has its own.
        let token_args: Vec<String> = vec![
            "local-token".into(),
            "--data-dir".into(),
            data_dir.to_string_lossy().into_owned(),
        ];
        let local_token = run_command(&source.bin, &token_args, &source.env)
            .await?
            .trim()
            .to_string();
        let mut node = TerminalNode {
            index,
            enrollment: source.enrollment.clone(),
            log: run_dir.join(format!("terminal-{index}.log")),
            data_dir,
            proxy,
            daemon: None,
            bin: source.bin.clone(),
            env: source.env.clone(),
            client: source.client.clone(),
            local_token,
            kills: 0,
        };
        node.start().await?;
        Ok(node)
    }

    async fn start(&mut self) -> Result<(), SimError> {
        let args: Vec<String> = vec![
            "run".into(),
            "--data-dir".into(),
            self.data_dir.to_string_lossy().into_owned(),
            "--status-bind".into(),
            "127.0.0.1:0".into(),
        ];
        let d = Daemon::spawn(
            &format!("terminal-{}", self.index),
            &self.bin,
            &args,
            &self.env,
            "status on ",
            &self.log,
        )
        .await?;
        self.daemon = Some(d);
        Ok(())
    }

    /// kill -9 the daemon (its outbox is typically mid-flush) and start it again.
    pub async fn kill_and_restart(&mut self) -> Result<(), SimError> {
        if let Some(d) = self.daemon.take() {
            tracing::warn!(terminal = self.index, pid = ?d.pid(), "fault: kill -9 terminal daemon");
            d.kill9().await;
        }
        self.kills += 1;
        self.start().await
    }

    /// Stops the daemon for good (end of run).
    pub async fn stop(&mut self) {
        if let Some(d) = self.daemon.take() {
            d.kill9().await;
        }
    }

    fn status_url(&self) -> Result<&str, SimError> {
        self.daemon
            .as_ref()
            .map(|d| d.url.as_str())
            .ok_or_else(|| SimError::Process {
                name: format!("terminal-{}", self.index),
                message: "not running".into(),
            })
    }

    /// Records one sale through the daemon. Only a 2xx with a receipt counts as recorded.
    pub async fn record_sale(&self, body: &serde_json::Value) -> Result<Receipt, SimError> {
        let url = format!("{}/sales", self.status_url()?);
        let r = self
            .client
            .post(&url)
            .bearer_auth(&self.local_token)
            .json(body)
            .send()
            .await
            .map_err(|e| SimError::Http(format!("POST {url}: {e}")))?;
        let status = r.status();
        let text = r.text().await.map_err(|e| SimError::Http(e.to_string()))?;
        if !status.is_success() {
            return Err(SimError::Http(format!("POST {url}: {status}: {text}")));
        }
        serde_json::from_str(&text)
            .map_err(|e| SimError::Http(format!("POST {url}: receipt did not parse: {e}: {text}")))
    }

    /// `GET /status` of the daemon, as JSON (for the report).
    pub async fn status(&self) -> Result<serde_json::Value, SimError> {
        let url = format!("{}/status", self.status_url()?);
        self.client
            .get(&url)
            .send()
            .await
            .map_err(|e| SimError::Http(e.to_string()))?
            .json()
            .await
            .map_err(|e| SimError::Http(e.to_string()))
    }

    /// `POST /reconcile {"mode": mode}` on the daemon.
    pub async fn reconcile(&self, mode: &str) -> Result<serde_json::Value, SimError> {
        let url = format!("{}/reconcile", self.status_url()?);
        let r = self
            .client
            .post(&url)
            .bearer_auth(&self.local_token)
            .json(&serde_json::json!({ "mode": mode }))
            .send()
            .await
            .map_err(|e| SimError::Http(e.to_string()))?;
        let status = r.status();
        let v: serde_json::Value = r.json().await.map_err(|e| SimError::Http(e.to_string()))?;
        if !status.is_success() {
            return Err(SimError::Http(format!("reconcile {mode}: {status}: {v}")));
        }
        Ok(v)
    }

    /// `POST /outbox/retry {"all": true}`: what an operator does about sales that need
    /// attention. Returns how many rows went back to `pending`.
    pub async fn retry_needing_attention(&self) -> Result<u64, SimError> {
        let url = format!("{}/outbox/retry", self.status_url()?);
        let r = self
            .client
            .post(&url)
            .bearer_auth(&self.local_token)
            .json(&serde_json::json!({ "all": true }))
            .send()
            .await
            .map_err(|e| SimError::Http(e.to_string()))?;
        let status = r.status();
        let v: serde_json::Value = r.json().await.map_err(|e| SimError::Http(e.to_string()))?;
        if !status.is_success() {
            return Err(SimError::Http(format!("outbox retry: {status}: {v}")));
        }
        Ok(v["released"].as_u64().unwrap_or(0))
    }

    /// The terminal's SQLite file (the one holding `sync_journal`).
    pub fn database_path(&self) -> Result<PathBuf, SimError> {
        find_terminal_db(&self.data_dir)
    }

    /// Every `sync_journal` row.
    pub fn journal(&self) -> Result<Vec<JournalEntry>, SimError> {
        read_journal(&self.database_path()?)
    }

    /// Every live catalog row.
    pub fn catalog(&self) -> Result<Vec<CatalogRow>, SimError> {
        read_catalog(&self.database_path()?)
    }
}

/// Finds the SQLite database in a terminal data directory: the file with a `sync_journal`
/// table (backups named `*.bak-*` are skipped).
pub fn find_terminal_db(dir: &Path) -> Result<PathBuf, SimError> {
    let entries =
        std::fs::read_dir(dir).map_err(|e| SimError::Io(format!("{}: {e}", dir.display())))?;
    let mut candidates: Vec<PathBuf> = entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.is_file())
        .filter(|p| {
            let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
            !name.contains(".bak-")
                && !name.ends_with("-wal")
                && !name.ends_with("-shm")
                && !name.ends_with("-journal")
                && !name.ends_with(".log")
        })
        .collect();
    candidates.sort();
    for p in candidates {
        if let Ok(c) = open_read_only(&p) {
            let has: Result<i64, _> = c.query_row(
                "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = 'sync_journal'",
                [],
                |r| r.get(0),
            );
            if has.unwrap_or(0) == 1 {
                return Ok(p);
            }
        }
    }
    Err(SimError::Io(format!(
        "no terminal database with sync_journal in {}",
        dir.display()
    )))
}

fn open_read_only(p: &Path) -> Result<rusqlite::Connection, SimError> {
    let c = rusqlite::Connection::open_with_flags(
        p,
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(|e| SimError::Io(format!("{}: {e}", p.display())))?;
    c.busy_timeout(Duration::from_secs(10))
        .map_err(|e| SimError::Io(e.to_string()))?;
    Ok(c)
}

/// Reads `sync_journal` (pos_id, local_event_id, status, attempts).
pub fn read_journal(db: &Path) -> Result<Vec<JournalEntry>, SimError> {
    let c = open_read_only(db)?;
    let mut st = c
        .prepare(
            "SELECT pos_id, local_event_id, status, attempts FROM sync_journal \
             ORDER BY pos_id, local_event_id",
        )
        .map_err(|e| SimError::Io(e.to_string()))?;
    let rows = st
        .query_map([], |r| {
            Ok(JournalEntry {
                pos_id: r.get(0)?,
                local_event_id: r.get(1)?,
                status: r.get(2)?,
                attempts: r.get(3)?,
            })
        })
        .map_err(|e| SimError::Io(e.to_string()))?;
    rows.collect::<Result<_, _>>()
        .map_err(|e| SimError::Io(e.to_string()))
}

/// Reads the live (not deleted) rows of `catalog_entities`.
pub fn read_catalog(db: &Path) -> Result<Vec<CatalogRow>, SimError> {
    let c = open_read_only(db)?;
    let mut st = c
        .prepare(
            "SELECT entity_type, entity_id, version, hash, branch_id FROM catalog_entities \
             WHERE deleted = 0 ORDER BY entity_type, entity_id",
        )
        .map_err(|e| SimError::Io(e.to_string()))?;
    let rows = st
        .query_map([], |r| {
            Ok(CatalogRow {
                entity_type: r.get(0)?,
                id: r.get(1)?,
                version: r.get(2)?,
                hash: r.get(3)?,
                branch_id: r.get(4)?,
            })
        })
        .map_err(|e| SimError::Io(e.to_string()))?;
    rows.collect::<Result<_, _>>()
        .map_err(|e| SimError::Io(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_attempt_budget_sums_the_capped_ceilings() {
        let t = DaemonTuning {
            backoff_base_ms: 50,
            backoff_cap_ms: 1000,
            delta_interval_ms: 500,
            max_attempts: 4,
        };
        assert_eq!(t.attempt_budget_ms(), 50 + 100 + 200 + 400);
        let long = DaemonTuning {
            max_attempts: 12,
            ..t
        };
        assert_eq!(
            long.attempt_budget_ms(),
            50 + 100 + 200 + 400 + 800 + 7 * 1000
        );
    }

    #[test]
    fn reads_journal_and_catalog_from_the_terminal_schema() {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = dir.path().join("terminal.sqlite3");
        let c = rusqlite::Connection::open(&db).expect("open");
        for sql in [
            include_str!("../../migrations/terminal/0001_sync_tables.sql"),
            include_str!("../../migrations/terminal/0002_pos_tables.sql"),
        ] {
            c.execute_batch(sql).expect("migration");
        }
        c.execute_batch(
            "INSERT INTO sync_journal (pos_id, local_event_id, event_type, event, status, attempts, created_at, updated_at)
             VALUES ('p', 1, 'sale', '{}', 'synced', 2, 'now', 'now'), ('p', 2, 'sale', '{}', 'pending', 0, 'now', 'now');
             INSERT INTO catalog_entities (entity_type, entity_id, branch_id, version, deleted, hash, data, updated_at)
             VALUES ('product', 'a', NULL, 3, 0, 'h', '{}', 'now'), ('price', 'b', 'b1', 4, 1, 'h', '{}', 'now');",
        )
        .expect("rows");
        drop(c);
        std::fs::write(dir.path().join("terminal.sqlite3.bak-1-v2"), b"x").expect("bak");
        let found = find_terminal_db(dir.path()).expect("found");
        assert_eq!(found, db);
        let j = read_journal(&found).expect("journal");
        assert_eq!(j.len(), 2);
        assert_eq!(j[0].status, "synced");
        assert_eq!(j[0].attempts, 2);
        let cat = read_catalog(&found).expect("catalog");
        assert_eq!(cat.len(), 1, "deleted rows are not live");
        assert_eq!(cat[0].id, "a");
    }
}
