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

/// Times one `SqliteStore::enqueue_sale` of `payload`.
pub fn store_enqueue(store: &SqliteStore, payload: &SalePayload) -> anyhow::Result<Duration> {
    let t0 = Instant::now();
    store.enqueue_sale(EventType::Sale, Utc::now(), payload)?;
    Ok(t0.elapsed())
}

/// A scratch SQLite file in WAL mode with `synchronous=FULL` and one plain table: the floor
/// under every durable enqueue.
pub struct RawFsyncTable {
    conn: rusqlite::Connection,
}

impl RawFsyncTable {
    /// Creates (or reopens) the scratch file at `path`.
    pub fn open(path: &Path) -> anyhow::Result<RawFsyncTable> {
        let conn = rusqlite::Connection::open(path)?;
        let mode: String =
            conn.pragma_update_and_check(None, "journal_mode", "WAL", |r| r.get(0))?;
        if !mode.eq_ignore_ascii_case("wal") {
            bail!("scratch file is not in WAL mode ({mode})");
        }
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.execute_batch(
            "CREATE TABLE IF NOT EXISTS raw_sales (id INTEGER PRIMARY KEY, payload TEXT NOT NULL)",
        )?;
        Ok(RawFsyncTable { conn })
    }

    /// Times one single-row INSERT of `payload_json`, autocommit (its own transaction).
    pub fn insert(&self, payload_json: &str) -> anyhow::Result<Duration> {
        let mut stmt = self
            .conn
            .prepare_cached("INSERT INTO raw_sales (payload) VALUES (?1)")?;
        let t0 = Instant::now();
        stmt.execute([payload_json])?;
        Ok(t0.elapsed())
    }

    /// Rows stored so far.
    pub fn count(&self) -> anyhow::Result<i64> {
        Ok(self
            .conn
            .query_row("SELECT count(*) FROM raw_sales", [], |r| r.get(0))?)
    }
}

/// One `POST /sales` as the caller saw it, and the daemon's own account of it (its
/// `Server-Timing` header).
#[derive(Debug, Clone, Copy)]
pub struct PostedSale {
    /// From sending the request until the `201` answer was read.
    pub total: Duration,
    /// The committed enqueue inside the daemon (`store`).
    pub store: Duration,
    /// The daemon's handler, from the body read to the answer (`handler`).
    pub handler: Duration,
}

/// Reads `NAME;dur=MS` from a `Server-Timing` value.
fn server_timing(value: &str, name: &str) -> Option<Duration> {
    value.split(',').find_map(|metric| {
        let mut parts = metric.trim().split(';');
        if parts.next()? != name {
            return None;
        }
        let ms: f64 = parts
            .find_map(|p| p.trim().strip_prefix("dur="))?
            .parse()
            .ok()?;
        Some(Duration::from_secs_f64(ms / 1000.0))
    })
}

/// One timed `POST /sales` of `body`: the status, the `Server-Timing` header, the answer
/// and the time until the answer was read.
async fn timed_post(
    client: &reqwest::Client,
    status_url: &str,
    token: &str,
    body: Vec<u8>,
) -> anyhow::Result<(reqwest::StatusCode, Option<String>, Vec<u8>, Duration)> {
    let t0 = Instant::now();
    let resp = client
        .post(format!("{status_url}/sales"))
        .bearer_auth(token)
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .context("POST /sales")?;
    let status = resp.status();
    let timing = resp
        .headers()
        .get("server-timing")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let answer = resp.bytes().await.context("reading POST /sales answer")?;
    Ok((status, timing, answer.to_vec(), t0.elapsed()))
}

/// Times one `POST /sales` of `payload` to a running daemon's status endpoint, until its
/// `201` answer (sent only after the commit) is read.
pub async fn daemon_post_sale(
    client: &reqwest::Client,
    status_url: &str,
    token: &str,
    payload: &SalePayload,
) -> anyhow::Result<PostedSale> {
    let body = serde_json::to_vec(&serde_json::json!({ "payload": payload }))?;
    let (status, timing, answer, total) = timed_post(client, status_url, token, body).await?;
    if status.as_u16() != 201 {
        bail!(
            "POST /sales answered {status}: {}",
            String::from_utf8_lossy(&answer)
        );
    }
    let timing = timing.context("POST /sales answered without Server-Timing")?;
    let part = |name| {
        server_timing(&timing, name)
            .with_context(|| format!("Server-Timing {timing:?} has no {name}"))
    };
    Ok(PostedSale {
        total,
        store: part("store")?,
        handler: part("handler")?,
    })
}

/// The event type the HTTP floor sends: not one there is, so `POST /sales` reads the whole
/// body, parses the receipt and answers `422` at the type (serialised after the payload), with
/// nothing stored. The connection stays open, as after a sale (a request whose body is left
/// unread — a route the daemon does not serve, say — is answered and the connection closed,
/// so the next request would pay for a new one).
pub const NO_SUCH_TYPE: &str = "BENCH_FLOOR";

/// Times one `POST /sales` of `payload` with the type [`NO_SUCH_TYPE`]: the loopback HTTP
/// round trip, the body and the JSON parse, with nothing stored.
pub async fn daemon_round_trip(
    client: &reqwest::Client,
    status_url: &str,
    token: &str,
    payload: &SalePayload,
) -> anyhow::Result<Duration> {
    // serde_json's map keeps keys sorted: "payload" is parsed before "type" fails.
    let body =
        serde_json::to_vec(&serde_json::json!({ "payload": payload, "type": NO_SUCH_TYPE }))?;
    let (status, _, _, elapsed) = timed_post(client, status_url, token, body).await?;
    if status.as_u16() != 422 {
        bail!("POST /sales of type {NO_SUCH_TYPE} answered {status}, not 422");
    }
    Ok(elapsed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_local_series_store_every_row() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = SqliteStore::open(&dir.path().join("t.db")).expect("open");
        let raw = RawFsyncTable::open(&dir.path().join("raw.db")).expect("raw");
        for i in 1..=5 {
            let p = sample_payload(i);
            store_enqueue(&store, &p).expect("enqueue");
            raw.insert(&serde_json::to_string(&p).expect("json"))
                .expect("insert");
        }
        assert_eq!(store.list_journal(None, 100).expect("journal").len(), 5);
        assert_eq!(raw.count().expect("count"), 5);
        let reopened = RawFsyncTable::open(&dir.path().join("raw.db")).expect("reopen");
        assert_eq!(reopened.count().expect("count"), 5, "rows are durable");
    }

    #[test]
    fn server_timing_values_are_read_by_name() {
        let v = "store;dur=0.412, handler;dur=0.530";
        assert_eq!(
            server_timing(v, "store"),
            Some(Duration::from_secs_f64(0.000412))
        );
        assert_eq!(
            server_timing(v, "handler"),
            Some(Duration::from_secs_f64(0.00053))
        );
        assert_eq!(server_timing(v, "db"), None);
        assert_eq!(server_timing("store", "store"), None, "no duration");
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
