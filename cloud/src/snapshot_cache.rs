//! Snapshot pages encoded once per catalog version and branch view, served many times.
//!
//! A page of `GET /v1/pos/catalog/snapshot` is a pure function of the branch view, the catalog
//! version the database is at, the cursor and the limit: the rows after the cursor's key as
//! they are *now* (module docs of `db::catalog`). So a page read and encoded for one terminal
//! answers every other terminal asking for the same page at the same catalog version — a fleet
//! of tills replaced on the same morning (the cold-start herd) costs the database one read
//! per page per catalog version, and costs the CPU one compression per page.
//!
//! A request first reads the catalog version (one indexed row), then looks the page up under
//! `(branch, version, cursor, limit)`. Concurrent requests for a page nobody has read yet wait
//! for the first one's read instead of reading too (single flight). Entries are never stale:
//! when the catalog moves on, requests read the new version and miss.
//!
//! Pages are held zstd-compressed (level [`ZSTD_LEVEL`], about a tenth of the JSON), so the
//! cache is small: [`DEFAULT_BUDGET_BYTES`] holds a 100 000-entity catalog's pages many times
//! over. A `gzip` answer is derived once from the held page and kept beside it; an `identity`
//! answer is decompressed per request (zstd decodes at GB/s).
//!
//! The encoding is negotiated from `Accept-Encoding` ([`PageEncoding::negotiate`]): zstd, then
//! gzip (by quality, zstd on a tie), then identity — each at a low level, because a snapshot page on a LAN or a shop's
//! uplink is worth sending fast rather than small at any price (docs/api.md).

use std::sync::{Arc, Mutex, OnceLock};

use actix_web::http::header::HeaderValue;
use hashlink::LinkedHashMap;

/// zstd level for held pages: 1 compresses a snapshot page ~9× at hundreds of MB/s.
pub const ZSTD_LEVEL: i32 = 1;
/// gzip level for `gzip` answers: the fastest (1); gzip's default (6) costs 3–4× the time for
/// a few percent fewer bytes.
pub const GZIP_LEVEL: u32 = 1;
/// Default bound on the bytes held (compressed pages and their gzip forms).
pub const DEFAULT_BUDGET_BYTES: usize = 64 * 1024 * 1024;

/// How a snapshot page travels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PageEncoding {
    /// `Content-Encoding: zstd`.
    Zstd,
    /// `Content-Encoding: gzip`.
    Gzip,
    /// No content encoding.
    Identity,
}

impl PageEncoding {
    /// Picks the encoding for an `Accept-Encoding` header: the accepted coding of highest
    /// quality among zstd and gzip, zstd on a tie (`*` stands for either one not listed);
    /// identity when neither is accepted. A coding listed with `q=0` is refused.
    pub fn negotiate(accept: Option<&HeaderValue>) -> PageEncoding {
        let Some(text) = accept.and_then(|v| v.to_str().ok()) else {
            return PageEncoding::Identity;
        };
        let (mut zstd, mut gzip, mut any) = (None, None, None);
        for item in text.split(',') {
            let mut parts = item.split(';');
            let coding = parts.next().unwrap_or("").trim().to_ascii_lowercase();
            let q = parts
                .filter_map(|p| p.trim().strip_prefix("q="))
                .find_map(|q| q.trim().parse::<f32>().ok())
                .unwrap_or(1.0);
            match coding.as_str() {
                "zstd" => zstd = Some(q),
                "gzip" | "x-gzip" => gzip = Some(q),
                "*" => any = Some(q),
                _ => {}
            }
        }
        let zstd = zstd.or(any).unwrap_or(0.0);
        let gzip = gzip.or(any).unwrap_or(0.0);
        if zstd > 0.0 && zstd >= gzip {
            PageEncoding::Zstd
        } else if gzip > 0.0 {
            PageEncoding::Gzip
        } else {
            PageEncoding::Identity
        }
    }

    /// The `Content-Encoding` value, none for identity.
    pub fn content_encoding(self) -> Option<&'static str> {
        match self {
            PageEncoding::Zstd => Some("zstd"),
            PageEncoding::Gzip => Some("gzip"),
            PageEncoding::Identity => None,
        }
    }

    /// The label used in metrics.
    pub fn label(self) -> &'static str {
        self.content_encoding().unwrap_or("identity")
    }
}

/// A failure to encode or decode a held page (never expected: the codecs work in memory).
#[derive(Debug, thiserror::Error)]
#[error("snapshot page {what}: {source}")]
pub struct CodecError {
    what: &'static str,
    #[source]
    source: std::io::Error,
}

/// One page, encoded.
#[derive(Debug)]
pub struct EncodedPage {
    /// The page's `snapshot_version`.
    pub snapshot_version: i64,
    /// Entities on the page.
    pub entities: usize,
    /// Length of the page's JSON.
    pub json_len: usize,
    zstd: Vec<u8>,
    gzip: OnceLock<Vec<u8>>,
}

impl EncodedPage {
    /// Compresses a page's JSON for holding.
    pub fn new(
        snapshot_version: i64,
        entities: usize,
        json: &[u8],
    ) -> Result<EncodedPage, CodecError> {
        let zstd = zstd::bulk::compress(json, ZSTD_LEVEL).map_err(|source| CodecError {
            what: "zstd compression",
            source,
        })?;
        Ok(EncodedPage {
            snapshot_version,
            entities,
            json_len: json.len(),
            zstd,
            gzip: OnceLock::new(),
        })
    }

    /// A page held elsewhere in its zstd form (the shared page store, `db::snapshot_pages`).
    pub fn from_zstd(
        snapshot_version: i64,
        entities: usize,
        json_len: usize,
        zstd: Vec<u8>,
    ) -> EncodedPage {
        EncodedPage {
            snapshot_version,
            entities,
            json_len,
            zstd,
            gzip: OnceLock::new(),
        }
    }

    /// The page's zstd form, as held.
    pub fn zstd_bytes(&self) -> &[u8] {
        &self.zstd
    }

    /// The body to send for `encoding` (gzip derived once and kept, identity decompressed).
    pub fn body(&self, encoding: PageEncoding) -> Result<Vec<u8>, CodecError> {
        match encoding {
            PageEncoding::Zstd => Ok(self.zstd.clone()),
            PageEncoding::Identity => self.json(),
            PageEncoding::Gzip => {
                if let Some(g) = self.gzip.get() {
                    return Ok(g.clone());
                }
                let json = self.json()?;
                let mut enc = flate2::write::GzEncoder::new(
                    Vec::with_capacity(json.len() / 4),
                    flate2::Compression::new(GZIP_LEVEL),
                );
                let gz = std::io::Write::write_all(&mut enc, &json)
                    .and_then(|()| enc.finish())
                    .map_err(|source| CodecError {
                        what: "gzip compression",
                        source,
                    })?;
                Ok(self.gzip.get_or_init(|| gz).clone())
            }
        }
    }

    /// Bytes held for this page (its zstd form and, once derived, its gzip form).
    fn held_bytes(&self) -> usize {
        self.zstd.len() + self.gzip.get().map_or(0, Vec::len)
    }

    fn json(&self) -> Result<Vec<u8>, CodecError> {
        zstd::bulk::decompress(&self.zstd, self.json_len).map_err(|source| CodecError {
            what: "zstd decompression",
            source,
        })
    }
}

/// Which page: branch view, catalog version read before the page, cursor, limit.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PageKey {
    /// The token's branch (its view of the catalog).
    pub branch: String,
    /// The catalog version the database was at.
    pub catalog_version: i64,
    /// The request's cursor (none for a first page).
    pub cursor: Option<String>,
    /// The clamped page limit.
    pub limit: u32,
}

type Cell = Arc<tokio::sync::OnceCell<Arc<EncodedPage>>>;

struct Slot {
    cell: Cell,
    bytes: usize,
}

/// Pages in recency order (least recently used first): a lookup moves its page to the back,
/// eviction takes from the front — O(1) per page, however many are held.
#[derive(Default)]
struct Slots {
    pages: LinkedHashMap<PageKey, Slot>,
    bytes: usize,
}

/// Whether a page came from the cache or from a database read made for this request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Served {
    /// Read from the database by this request.
    Read,
    /// Held already, or read by a concurrent request this one waited for.
    Cached,
}

/// The per-instance cache of encoded snapshot pages, bounded in bytes (least recently used
/// pages go first).
pub struct SnapshotPageCache {
    slots: Mutex<Slots>,
    budget_bytes: usize,
}

impl Default for SnapshotPageCache {
    fn default() -> Self {
        Self::with_budget(DEFAULT_BUDGET_BYTES)
    }
}

impl SnapshotPageCache {
    /// A cache holding at most `budget_bytes` of encoded pages (0 holds nothing beyond the
    /// requests in flight).
    pub fn with_budget(budget_bytes: usize) -> SnapshotPageCache {
        SnapshotPageCache {
            slots: Mutex::new(Slots::default()),
            budget_bytes,
        }
    }

    /// The page under `key`, read and encoded by `read` when no one holds or is reading it.
    /// A failed read is not kept: the next request reads again.
    pub async fn get_or_read<E, F, Fut>(
        &self,
        key: PageKey,
        read: F,
    ) -> Result<(Arc<EncodedPage>, Served), E>
    where
        F: FnOnce() -> Fut,
        Fut: std::future::Future<Output = Result<EncodedPage, E>>,
    {
        let cell = {
            let mut g = self.lock();
            match g.pages.to_back(&key) {
                Some(slot) => slot.cell.clone(),
                None => {
                    let cell = Cell::default();
                    g.pages.insert(
                        key.clone(),
                        Slot {
                            cell: cell.clone(),
                            bytes: 0,
                        },
                    );
                    cell
                }
            }
        };
        let mut served = Served::Cached;
        let page = cell
            .get_or_try_init(|| async {
                served = Served::Read;
                read().await.map(Arc::new)
            })
            .await?
            .clone();
        Ok((page, served))
    }

    /// Records what `page` (held under `key`) now occupies and evicts the least recently used
    /// pages beyond the budget. Call after serving, when a gzip form may have been added.
    pub fn account(&self, key: &PageKey, page: &EncodedPage) {
        let mut guard = self.lock();
        let g = &mut *guard;
        let now = page.held_bytes();
        let Some(slot) = g.pages.get_mut(key) else {
            return;
        };
        let before = std::mem::replace(&mut slot.bytes, now);
        g.bytes = g.bytes - before + now;
        // Pages still being read hold no bytes and are skipped (moved to the back): their
        // requests are waiting on them. At most every slot is visited once.
        let mut visits = g.pages.len();
        while g.bytes > self.budget_bytes && visits > 0 {
            visits -= 1;
            let Some((oldest, slot)) = g.pages.pop_front() else {
                break;
            };
            if slot.cell.initialized() {
                g.bytes -= slot.bytes;
            } else {
                g.pages.insert(oldest, slot);
            }
        }
    }

    /// Drops slots whose read failed (nothing initialised them and nobody waits on them).
    pub fn forget_failed(&self, key: &PageKey) {
        let mut g = self.lock();
        if g.pages
            .get(key)
            .is_some_and(|s| !s.cell.initialized() && Arc::strong_count(&s.cell) == 1)
        {
            g.pages.remove(key);
        }
    }

    /// Bytes held.
    pub fn held_bytes(&self) -> usize {
        self.lock().bytes
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Slots> {
        self.slots.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn key(cursor: Option<&str>, version: i64) -> PageKey {
        PageKey {
            branch: "b1".into(),
            catalog_version: version,
            cursor: cursor.map(str::to_string),
            limit: 1000,
        }
    }

    fn json(n: usize) -> Vec<u8> {
        let rows: Vec<_> = (0..n)
            .map(|i| serde_json::json!({"id": format!("prod-{i:07}"), "name": "coffee 250 g"}))
            .collect();
        serde_json::to_vec(&rows).expect("json")
    }

    #[test]
    fn negotiation_prefers_zstd_then_gzip_and_honours_q_zero() {
        let n = |s: &str| PageEncoding::negotiate(Some(&HeaderValue::from_str(s).expect("hv")));
        assert_eq!(n("gzip, zstd"), PageEncoding::Zstd);
        assert_eq!(n("gzip"), PageEncoding::Gzip);
        assert_eq!(n("zstd;q=0, gzip;q=0.5"), PageEncoding::Gzip);
        assert_eq!(n("gzip;q=1, zstd;q=0.5"), PageEncoding::Gzip);
        assert_eq!(n("gzip, *;q=0.1"), PageEncoding::Gzip);
        assert_eq!(n("identity"), PageEncoding::Identity);
        assert_eq!(n("br"), PageEncoding::Identity);
        assert_eq!(n("*"), PageEncoding::Zstd);
        assert_eq!(n("*;q=0"), PageEncoding::Identity);
        assert_eq!(PageEncoding::negotiate(None), PageEncoding::Identity);
    }

    #[test]
    fn every_encoding_decodes_to_the_same_json() {
        let body = json(500);
        let page = EncodedPage::new(7, 500, &body).expect("encode");
        assert!(page.zstd.len() * 4 < body.len(), "zstd shrinks the page");
        assert_eq!(page.body(PageEncoding::Identity).expect("identity"), body);
        let z = page.body(PageEncoding::Zstd).expect("zstd");
        assert_eq!(zstd::stream::decode_all(&z[..]).expect("unzstd"), body);
        let g = page.body(PageEncoding::Gzip).expect("gzip");
        let mut out = Vec::new();
        std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(&g[..]), &mut out)
            .expect("gunzip");
        assert_eq!(out, body);
        assert_eq!(page.held_bytes(), z.len() + g.len());
    }

    #[tokio::test]
    async fn a_herd_reads_each_page_once_and_a_new_version_reads_again() {
        let cache = Arc::new(SnapshotPageCache::default());
        let reads = Arc::new(AtomicUsize::new(0));
        let mut herd = Vec::new();
        for _ in 0..20 {
            let (cache, reads) = (cache.clone(), reads.clone());
            herd.push(tokio::spawn(async move {
                cache
                    .get_or_read(key(Some("c1"), 5), || async {
                        reads.fetch_add(1, Ordering::SeqCst);
                        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                        EncodedPage::new(5, 3, &json(3))
                    })
                    .await
            }));
        }
        let mut read_here = 0;
        for h in herd {
            let (page, served) = h.await.expect("join").expect("page");
            assert_eq!(page.snapshot_version, 5);
            read_here += usize::from(served == Served::Read);
        }
        assert_eq!(reads.load(Ordering::SeqCst), 1);
        assert_eq!(read_here, 1);
        let (_, served) = cache
            .get_or_read(key(Some("c1"), 6), || async {
                EncodedPage::new(6, 3, &json(3))
            })
            .await
            .expect("page");
        assert_eq!(
            served,
            Served::Read,
            "another catalog version is another page"
        );
    }

    #[tokio::test]
    async fn the_least_recently_used_page_goes_first() {
        let one = EncodedPage::new(1, 3, &json(3)).expect("page").held_bytes();
        let cache = SnapshotPageCache::with_budget(2 * one);
        let get = |cursor: &'static str| {
            let cache = &cache;
            async move {
                let (page, served) = cache
                    .get_or_read(key(Some(cursor), 1), || async {
                        EncodedPage::new(1, 3, &json(3))
                    })
                    .await
                    .expect("page");
                cache.account(&key(Some(cursor), 1), &page);
                served
            }
        };
        assert_eq!(get("a").await, Served::Read);
        assert_eq!(get("b").await, Served::Read);
        assert_eq!(get("a").await, Served::Cached, "a is now the most recent");
        assert_eq!(
            get("c").await,
            Served::Read,
            "c pushes the budget over: b goes"
        );
        assert_eq!(cache.held_bytes(), 2 * one);
        assert_eq!(get("a").await, Served::Cached);
        assert_eq!(get("b").await, Served::Read, "b was evicted");
    }

    #[tokio::test]
    async fn a_failed_read_is_not_kept_and_the_budget_evicts_the_oldest() {
        let cache = SnapshotPageCache::with_budget(1);
        let failed: Result<_, std::io::Error> = cache
            .get_or_read(key(None, 1), || async {
                Err(std::io::Error::other("db down"))
            })
            .await;
        assert!(failed.is_err());
        cache.forget_failed(&key(None, 1));
        let (page, served) = cache
            .get_or_read(key(None, 1), || async {
                EncodedPage::new(1, 3, &json(3)).map_err(|e| std::io::Error::other(e.to_string()))
            })
            .await
            .expect("page");
        assert_eq!(served, Served::Read);
        cache.account(&key(None, 1), &page);
        assert_eq!(cache.held_bytes(), 0, "over a 1-byte budget nothing stays");
    }
}
