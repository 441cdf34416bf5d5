//! The sale-enqueue half of the benchmark: how long a till waits for "sale stored", beside how
//! long this disk takes to make one small row durable.
//!
//! Why the baseline is a plain fsync'd INSERT: the enqueue's promise is "answered only after
//! the commit is durable", so its floor is one WAL commit with `synchronous=FULL` on the same
//! disk. Everything above that floor (validation, the journal row, the next id, HTTP) is what
//! the terminal adds.

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use chrono::Utc;
use possync_protocol::{EventType, SalePayload};
use possync_terminal::store::SqliteStore;

/// A valid sale receipt (the testkit's sample, so its size is that of a real two-line
/// receipt); `n` varies the amounts.
pub fn sample_payload(n: i64) -> SalePayload {
    possync_testkit::sample_sale_event(uuid::Uuid::nil(), uuid::Uuid::nil(), n.max(1), "b1").payload
}

/// Opens a fresh terminal store at `path` and times `n` calls of `SqliteStore::enqueue_sale`.
pub fn store_enqueue(path: &Path, n: usize) -> anyhow::Result<Vec<Duration>> {
    let store = SqliteStore::open(path)?;
    let payloads: Vec<SalePayload> = (1..=n as i64).map(sample_payload).collect();
    let mut samples = Vec::with_capacity(n);
    for p in &payloads {
        let t0 = Instant::now();
        store.enqueue_sale(EventType::Sale, Utc::now(), p)?;
        samples.push(t0.elapsed());
    }
    Ok(samples)
}

/// Times `n` single-row INSERTs (autocommit: one transaction each) of a sale-sized JSON text
/// into a scratch file at `path` in WAL mode with `synchronous=FULL`.
pub fn raw_fsync_insert(path: &Path, n: usize) -> anyhow::Result<Vec<Duration>> {
    let conn = rusqlite::Connection::open(path)?;
    let mode: String = conn.pragma_update_and_check(None, "journal_mode", "WAL", |r| r.get(0))?;
    if !mode.eq_ignore_ascii_case("wal") {
        bail!("scratch file is not in WAL mode ({mode})");
    }
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.execute_batch(
        "CREATE TABLE IF NOT EXISTS raw_sales (id INTEGER PRIMARY KEY, payload TEXT NOT NULL)",
    )?;
    let payloads: Vec<String> = (1..=n as i64)
        .map(|i| serde_json::to_string(&sample_payload(i)))
        .collect::<Result<_, _>>()?;
    let mut stmt = conn.prepare("INSERT INTO raw_sales (payload) VALUES (?1)")?;
    let mut samples = Vec::with_capacity(n);
    for p in &payloads {
        let t0 = Instant::now();
        stmt.execute([p])?;
        samples.push(t0.elapsed());
    }
    Ok(samples)
}

/// Times `n` `POST /sales` calls to a running daemon's status endpoint, one at a time, each
/// measured until the `201` answer (sent only after the commit) is read.
pub async fn daemon_post_sales(
    client: &reqwest::Client,
    status_url: &str,
    first: i64,
    n: usize,
) -> anyhow::Result<Vec<Duration>> {
    let bodies: Vec<Vec<u8>> = (first..first + n as i64)
        .map(|i| serde_json::to_vec(&serde_json::json!({ "payload": sample_payload(i) })))
        .collect::<Result<_, _>>()?;
    let url = format!("{status_url}/sales");
    let mut samples = Vec::with_capacity(n);
    for body in bodies {
        let t0 = Instant::now();
        let resp = client
            .post(&url)
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await
            .context("POST /sales")?;
        let status = resp.status();
        let answer = resp.bytes().await.context("reading POST /sales answer")?;
        samples.push(t0.elapsed());
        if status.as_u16() != 201 {
            bail!(
                "POST /sales answered {status}: {}",
                String::from_utf8_lossy(&answer)
            );
        }
    }
    Ok(samples)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_series_store_every_row() {
        let dir = tempfile::tempdir().expect("tempdir");
        assert_eq!(
            store_enqueue(&dir.path().join("t.db"), 5)
                .expect("enqueue")
                .len(),
            5
        );
        let store = SqliteStore::open(&dir.path().join("t.db")).expect("reopen");
        assert_eq!(store.list_journal(None, 100).expect("journal").len(), 5);
        assert_eq!(
            raw_fsync_insert(&dir.path().join("raw.db"), 4)
                .expect("raw")
                .len(),
            4
        );
        let conn = rusqlite::Connection::open(dir.path().join("raw.db")).expect("open");
        let n: i64 = conn
            .query_row("SELECT count(*) FROM raw_sales", [], |r| r.get(0))
            .expect("count");
        assert_eq!(n, 4);
    }

    #[test]
    fn sample_payloads_pass_the_protocol_checks() {
        for i in [1, 2, 77] {
            assert_eq!(
                possync_protocol::validate_payload(EventType::Sale, &sample_payload(i)),
                Ok(())
            );
        }
    }
}
