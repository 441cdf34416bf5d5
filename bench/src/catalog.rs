//! The catalog half of the benchmark: the seed file `cloud catalog import` reads, the transfer
//! baseline (every snapshot page fetched over HTTP and dropped), and the raw insert baseline
//! (the same rows bulk-inserted into an empty file with the terminal's own schema, one
//! transaction).
//!
//! Why these two baselines: a terminal taking a snapshot cannot be faster than moving the
//! bytes plus writing the rows, so "snapshot ÷ (transfer + raw insert)" says how much the sync
//! engine adds on top of the work that cannot be avoided, on this machine, in this run.

use std::io::Write as _;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use possync_protocol::{Entity, SnapshotPage};

/// Largest snapshot page the contract allows; the terminal's engine asks for the same.
pub const PAGE_LIMIT: u32 = 1000;

/// One product as a `cloud catalog import` JSON line. Field sizes resemble a real catalog row
/// (SKU, EAN-13 barcode, a name of a few words, price, category and tax references).
pub fn product_line(i: usize) -> String {
    let data = serde_json::json!({
        "sku": format!("SKU-{i:07}"),
        "barcode": format!("400{i:010}"),
        "name": format!("Product {i} organic whole bean coffee 250 g"),
        "price_minor": 199 + (i % 5000) as i64,
        "currency": "EUR",
        "category_id": format!("cat-{:03}", i % 200),
        "tax_rate_id": if i.is_multiple_of(3) { "vat-reduced" } else { "vat-standard" },
        "unit": "piece",
        "active": true,
    });
    serde_json::json!({
        "type": "product",
        "id": format!("prod-{i:07}"),
        "branch_id": null,
        "data": data,
    })
    .to_string()
}

/// Writes `n` products as JSON lines to `path`.
pub fn write_import_file(path: &Path, n: usize) -> anyhow::Result<()> {
    let file =
        std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
    let mut w = std::io::BufWriter::new(file);
    for i in 1..=n {
        writeln!(w, "{}", product_line(i))?;
    }
    w.flush()?;
    Ok(())
}

/// A content encoding asked of the cloud for snapshot pages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WireEncoding {
    /// No compression: the plain transfer.
    Identity,
    /// zstd (the terminal's default).
    Zstd,
    /// gzip.
    Gzip,
}

impl WireEncoding {
    /// Every encoding, in report order.
    pub const ALL: [WireEncoding; 3] = [
        WireEncoding::Identity,
        WireEncoding::Zstd,
        WireEncoding::Gzip,
    ];

    /// The `Accept-Encoding` / `Content-Encoding` name.
    pub fn name(self) -> &'static str {
        match self {
            WireEncoding::Identity => "identity",
            WireEncoding::Zstd => "zstd",
            WireEncoding::Gzip => "gzip",
        }
    }

    fn decode(self, wire: &[u8]) -> anyhow::Result<Vec<u8>> {
        Ok(match self {
            WireEncoding::Identity => wire.to_vec(),
            WireEncoding::Zstd => zstd::stream::decode_all(wire)?,
            WireEncoding::Gzip => {
                let mut out = Vec::with_capacity(wire.len() * 8);
                std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(wire), &mut out)?;
                out
            }
        })
    }
}

/// What one pass over every snapshot page cost.
#[derive(Debug)]
pub struct TransferPass {
    /// The encoding asked for (and checked in `Content-Encoding`).
    pub encoding: WireEncoding,
    /// Wall time spent in HTTP and decoding (request until the last body byte, decompressed):
    /// the transfer part of a floor.
    pub http: Duration,
    /// Of which decompressing the bodies.
    pub decode: Duration,
    /// Wall time spent parsing the pages into [`SnapshotPage`] (what the terminal also does).
    pub parse: Duration,
    /// Pages fetched.
    pub pages: usize,
    /// Entities received.
    pub entities: usize,
    /// Body bytes on the wire (before decoding).
    pub wire_bytes: u64,
    /// Body bytes after decoding (the JSON).
    pub bytes: u64,
    /// The version the snapshot was taken at.
    pub snapshot_version: i64,
    /// The rows, when the caller asked to keep them (for the raw insert baseline).
    pub kept: Vec<Entity>,
}

/// Fetches every snapshot page as the terminal `token` would, in `encoding`, keeping the rows
/// only if `keep`. `client` must not decode bodies itself (`no_gzip`, `no_zstd`): the pass
/// counts wire bytes and times decoding. Nothing is written anywhere.
pub async fn fetch_all_pages(
    client: &reqwest::Client,
    base_url: &str,
    token: &str,
    encoding: WireEncoding,
    keep: bool,
) -> anyhow::Result<TransferPass> {
    let mut pass = TransferPass {
        encoding,
        http: Duration::ZERO,
        decode: Duration::ZERO,
        parse: Duration::ZERO,
        pages: 0,
        entities: 0,
        wire_bytes: 0,
        bytes: 0,
        snapshot_version: 0,
        kept: Vec::new(),
    };
    let mut cursor: Option<String> = None;
    loop {
        let mut req = client
            .get(format!("{base_url}/v1/pos/catalog/snapshot"))
            .bearer_auth(token)
            .header(reqwest::header::ACCEPT_ENCODING, encoding.name())
            .query(&[("limit", PAGE_LIMIT.to_string())]);
        if let Some(c) = &cursor {
            req = req.query(&[("cursor", c)]);
        }
        let t0 = Instant::now();
        let resp = req.send().await.context("GET snapshot page")?;
        let status = resp.status();
        let got = resp
            .headers()
            .get(reqwest::header::CONTENT_ENCODING)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("identity")
            .to_string();
        let wire = resp.bytes().await.context("reading snapshot page")?;
        if !status.is_success() {
            bail!(
                "snapshot page answered {status}: {}",
                String::from_utf8_lossy(&wire)
            );
        }
        if got != encoding.name() {
            bail!(
                "asked for {} and got Content-Encoding {got}",
                encoding.name()
            );
        }
        let t_decode = Instant::now();
        let body = encoding.decode(&wire)?;
        pass.decode += t_decode.elapsed();
        pass.http += t0.elapsed();
        let t1 = Instant::now();
        let page: SnapshotPage = serde_json::from_slice(&body).context("parsing snapshot page")?;
        pass.parse += t1.elapsed();
        pass.pages += 1;
        pass.wire_bytes += wire.len() as u64;
        pass.bytes += body.len() as u64;
        pass.entities += page.entities.len();
        pass.snapshot_version = page.snapshot_version;
        if keep {
            pass.kept.extend(page.entities);
        }
        match page.next_cursor {
            Some(c) => cursor = Some(c),
            None => break,
        }
    }
    Ok(pass)
}

/// A client that leaves bodies encoded, for [`fetch_all_pages`].
pub fn wire_client() -> anyhow::Result<reqwest::Client> {
    Ok(reqwest::Client::builder().no_gzip().no_zstd().build()?)
}

/// The rows of a snapshot as the terminal stores them, serialised before the clock starts so
/// the baseline measures SQLite alone.
pub struct RawRow {
    entity_type: String,
    entity_id: String,
    branch_id: Option<String>,
    version: i64,
    hash: String,
    data: String,
}

/// Prepares `entities` for [`raw_insert`].
pub fn raw_rows(entities: &[Entity]) -> anyhow::Result<Vec<RawRow>> {
    entities
        .iter()
        .map(|e| {
            Ok(RawRow {
                entity_type: e.entity_type.clone(),
                entity_id: e.id.clone(),
                branch_id: e.branch_id.clone(),
                version: e.version,
                hash: e.hash.clone(),
                data: serde_json::to_string(&e.data)?,
            })
        })
        .collect()
}

/// Creates `path` with the terminal's schema (its own migrations, WAL, `synchronous=FULL`,
/// as `SqliteStore::open` sets them) and times inserting `rows` into `catalog_entities` with
/// one prepared plain `INSERT` in ONE transaction — the same indexes and generated columns
/// the terminal maintains, none of its per-page bookkeeping.
pub fn raw_insert(path: &Path, rows: &[RawRow]) -> anyhow::Result<Duration> {
    let mut conn = rusqlite::Connection::open(path)?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", "FULL")?;
    possync_terminal::store::schema::apply_pending(
        &mut conn,
        possync_terminal::store::schema::latest_version(),
    )?;
    let now = "2026-01-01T00:00:00.000000Z";
    let t0 = Instant::now();
    let tx = conn.transaction()?;
    {
        let mut stmt = tx.prepare(
            "INSERT INTO catalog_entities
                 (entity_type, entity_id, branch_id, version, deleted, hash, data, updated_at, snapshot_generation)
             VALUES (?1, ?2, ?3, ?4, 0, ?5, ?6, ?7, 1)",
        )?;
        for r in rows {
            stmt.execute(rusqlite::params![
                r.entity_type,
                r.entity_id,
                r.branch_id,
                r.version,
                r.hash,
                r.data,
                now
            ])?;
        }
    }
    tx.commit()?;
    let elapsed = t0.elapsed();
    let n: i64 = conn.query_row("SELECT count(*) FROM catalog_entities", [], |r| r.get(0))?;
    if n as usize != rows.len() {
        bail!("raw insert stored {n} rows, expected {}", rows.len());
    }
    Ok(elapsed)
}

/// A real `cloud serve` (on `database_url`, or its embedded SQLite file) with its rate limits
/// out of the way — a benchmark measures sync, not the limiter — seeded with `entities`
/// products by `cloud catalog import` (file written under `work`). Returns the cloud and how
/// long the import took.
pub fn seeded_cloud(
    database_url: Option<&str>,
    work: &Path,
    entities: usize,
) -> anyhow::Result<(possync_testkit::cloud::CloudProcess, Duration)> {
    let unlimited = "1000000";
    let cloud = possync_testkit::cloud::CloudProcess::start_with(
        database_url,
        &[
            "--rate-per-second",
            unlimited,
            "--rate-burst",
            unlimited,
            "--address-rate-per-second",
            unlimited,
            "--address-rate-burst",
            unlimited,
        ],
    )?;
    let import_file = work.join("catalog.jsonl");
    write_import_file(&import_file, entities)?;
    let path_arg = import_file.to_string_lossy().into_owned();
    let t0 = Instant::now();
    let out = cloud.cli(&["catalog", "import", &path_arg])?;
    let took = t0.elapsed();
    let imported: serde_json::Value = serde_json::from_str(out.trim())?;
    if imported["imported"].as_u64() != Some(entities as u64) {
        bail!("cloud catalog import answered {out:?}");
    }
    Ok((cloud, took))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn product_lines_are_import_json_with_distinct_ids() {
        let a: serde_json::Value = serde_json::from_str(&product_line(1)).expect("json");
        let b: serde_json::Value = serde_json::from_str(&product_line(2)).expect("json");
        assert_eq!(a["type"], "product");
        assert!(a["branch_id"].is_null());
        assert_ne!(a["id"], b["id"]);
        assert_ne!(a["data"]["sku"], b["data"]["sku"]);
        assert_eq!(a["data"]["barcode"].as_str().map(str::len), Some(13));
    }

    #[test]
    fn raw_insert_fills_the_terminal_schema() {
        let dir = tempfile::tempdir().expect("tempdir");
        let entities: Vec<Entity> = (1..=50)
            .map(|i| {
                let line: serde_json::Value = serde_json::from_str(&product_line(i)).expect("json");
                Entity {
                    entity_type: "product".into(),
                    id: format!("prod-{i:07}"),
                    version: i as i64,
                    deleted: false,
                    branch_id: None,
                    hash: possync_protocol::entity_hash(&line["data"]),
                    data: line["data"].clone(),
                }
            })
            .collect();
        let path = dir.path().join("raw.db");
        raw_insert(&path, &raw_rows(&entities).expect("rows")).expect("insert");
        let conn = rusqlite::Connection::open(&path).expect("open");
        let sku: String = conn
            .query_row(
                "SELECT entity_id FROM catalog_entities WHERE sku = 'SKU-0000007'",
                [],
                |r| r.get(0),
            )
            .expect("generated sku column is indexed and filled");
        assert_eq!(sku, "prod-0000007");
    }
}
