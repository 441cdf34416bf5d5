//! The legacy local database layout — the one that synced through Google Drive — as a
//! builder, so the migration can be tested against it (here, in the daemon's end-to-end tests
//! and by hand: `terminal migrate --legacy-db PATH` on a file this wrote).
//!
//! The layout, as the old till wrote it:
//! - `products(id INTEGER PRIMARY KEY, sku TEXT, barcode TEXT, name TEXT NOT NULL,
//!   price_cents INTEGER NOT NULL, stock INTEGER NOT NULL DEFAULT 0)`
//! - `sales(id INTEGER PRIMARY KEY, receipt_no TEXT NOT NULL, created_at TEXT NOT NULL,
//!   total_cents INTEGER NOT NULL, lines_json TEXT NOT NULL, drive_synced INTEGER NOT NULL DEFAULT 0)`
//!   where `lines_json` is `[{"product_id": <products.id>, "qty": n, "price_cents": n,
//!   "discount_cents": n?}]` and `created_at` is SQLite's `YYYY-MM-DD HH:MM:SS` in UTC
//! - `drive_sync_state(key TEXT PRIMARY KEY, value TEXT)` — Drive folder id, last upload time
//! - `drive_upload_log(id INTEGER PRIMARY KEY, uploaded_at TEXT, drive_file_id TEXT, sales_count INTEGER)`

use rusqlite::{params, Connection};
use std::path::Path;

use super::error::TerminalStoreError;

/// One row of the legacy `products` table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LegacyProduct {
    /// Local integer id (what legacy sale lines point at).
    pub id: i64,
    /// The key the first cloud snapshot is matched by; may be missing in old data.
    pub sku: Option<String>,
    /// EAN barcode, if the product had one.
    pub barcode: Option<String>,
    /// Display name.
    pub name: String,
    /// Tax-inclusive unit price in cents.
    pub price_cents: i64,
    /// Units on hand as the till counted them (may be negative).
    pub stock: i64,
}

/// One row of the legacy `sales` table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LegacySale {
    /// Legacy integer id.
    pub id: i64,
    /// Receipt number.
    pub receipt_no: String,
    /// `YYYY-MM-DD HH:MM:SS` (UTC) or RFC 3339, as the old app wrote it.
    pub created_at: String,
    /// Total in cents.
    pub total_cents: i64,
    /// `[{"product_id", "qty", "price_cents", "discount_cents"?}]`, stored verbatim.
    pub lines_json: String,
    /// Whether the old sync had uploaded it to Drive.
    pub drive_synced: bool,
}

/// A whole legacy database.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LegacyFixture {
    /// Products to write.
    pub products: Vec<LegacyProduct>,
    /// Sales to write.
    pub sales: Vec<LegacySale>,
    /// Stored in `drive_sync_state`; the migration keeps it, nothing uses it.
    pub drive_folder_id: String,
    /// Stored in `drive_sync_state`.
    pub last_upload_at: String,
    /// Rows of `drive_upload_log`.
    pub uploads: i64,
}

fn product(
    id: i64,
    sku: Option<&str>,
    barcode: Option<&str>,
    name: &str,
    price: i64,
    stock: i64,
) -> LegacyProduct {
    LegacyProduct {
        id,
        sku: sku.map(str::to_string),
        barcode: barcode.map(str::to_string),
        name: name.to_string(),
        price_cents: price,
        stock,
    }
}

fn sale(id: i64, created_at: &str, total: i64, lines_json: &str, synced: bool) -> LegacySale {
    LegacySale {
        id,
        receipt_no: format!("L-{id:06}"),
        created_at: created_at.to_string(),
        total_cents: total,
        lines_json: lines_json.to_string(),
        drive_synced: synced,
    }
}

impl LegacyFixture {
    /// A small shop's database with every case the migration must handle: products with and
    /// without SKU/barcode, negative stock, sales already on Drive, sales still waiting,
    /// a refund, a sale whose total disagrees with its lines, and one with unreadable lines.
    ///
    /// SKUs `SKU-COFFEE` and `SKU-TEA` are the ones a test snapshot can bring back with cloud
    /// ids, to check the legacy id mapping.
    pub fn sample() -> LegacyFixture {
        LegacyFixture {
            products: vec![
                product(
                    1,
                    Some("SKU-COFFEE"),
                    Some("4006381333931"),
                    "Coffee 250g",
                    450,
                    12,
                ),
                product(
                    2,
                    Some("SKU-TEA"),
                    Some("4006381333948"),
                    "Green Tea",
                    300,
                    0,
                ),
                product(3, Some("SKU-MUG"), None, "Mug", 899, -2),
                product(4, None, Some("2000000000015"), "Loose Cookies", 120, 40),
                product(
                    7,
                    Some("SKU-SUGAR"),
                    Some("4006381333955"),
                    "Sugar 1kg",
                    199,
                    5,
                ),
            ],
            sales: vec![
                sale(
                    1,
                    "2026-10-01 09:15:00",
                    900,
                    r#"[{"product_id":1,"qty":2,"price_cents":450}]"#,
                    true,
                ),
                sale(
                    2,
                    "2026-10-01 10:02:30",
                    1199,
                    r#"[{"product_id":2,"qty":1,"price_cents":300},{"product_id":3,"qty":1,"price_cents":899}]"#,
                    true,
                ),
                sale(
                    3,
                    "2026-10-02 08:00:00",
                    240,
                    r#"[{"product_id":4,"qty":2,"price_cents":120}]"#,
                    true,
                ),
                sale(
                    4,
                    "2026-10-03 12:30:00",
                    1149,
                    r#"[{"product_id":1,"qty":1,"price_cents":450},{"product_id":7,"qty":4,"price_cents":199,"discount_cents":97}]"#,
                    false,
                ),
                sale(
                    5,
                    "2026-10-03 12:45:10",
                    300,
                    r#"[{"product_id":2,"qty":1,"price_cents":300}]"#,
                    false,
                ),
                sale(
                    6,
                    "2026-10-03T13:00:00Z",
                    -450,
                    r#"[{"product_id":1,"qty":-1,"price_cents":450}]"#,
                    false,
                ),
                sale(
                    7,
                    "2026-10-03 14:00:00",
                    1000,
                    r#"[{"product_id":3,"qty":1,"price_cents":899}]"#,
                    false,
                ),
                sale(8, "2026-10-03 15:00:00", 120, "not json", false),
            ],
            drive_folder_id: "1AbCdEfGhIjKlMnOpQrStUvWxYz".to_string(),
            last_upload_at: "2026-10-02T23:00:00Z".to_string(),
            uploads: 3,
        }
    }

    /// A larger generated database (`products` products, `sales` sales of which every third
    /// is still waiting for Drive), for volume tests.
    pub fn generated(products: i64, sales: i64) -> LegacyFixture {
        let products_v: Vec<LegacyProduct> = (1..=products)
            .map(|i| LegacyProduct {
                id: i,
                sku: Some(format!("SKU-{i:06}")),
                barcode: Some(format!("20{i:011}")),
                name: format!("Product {i}"),
                price_cents: 100 + i % 900,
                stock: i % 50,
            })
            .collect();
        let sales_v = (1..=sales)
            .map(|i| {
                let pid = 1 + i % products.max(1);
                let price = 100 + pid % 900;
                let qty = 1 + i % 3;
                LegacySale {
                    id: i,
                    receipt_no: format!("G-{i:08}"),
                    created_at: format!("2026-09-{:02} {:02}:{:02}:00", 1 + i % 28, i % 24, i % 60),
                    total_cents: qty * price,
                    lines_json: format!(
                        r#"[{{"product_id":{pid},"qty":{qty},"price_cents":{price}}}]"#
                    ),
                    drive_synced: i % 3 != 0,
                }
            })
            .collect();
        LegacyFixture {
            products: products_v,
            sales: sales_v,
            drive_folder_id: "generated-folder".into(),
            last_upload_at: "2026-09-30T23:00:00Z".into(),
            uploads: 1,
        }
    }

    /// Sales not yet uploaded to Drive.
    pub fn unsynced_sales(&self) -> usize {
        self.sales.iter().filter(|s| !s.drive_synced).count()
    }

    /// Writes the legacy layout to a new file at `path` (fails if tables already exist).
    pub fn write(&self, path: &Path) -> Result<(), TerminalStoreError> {
        let mut conn = Connection::open(path)?;
        let tx = conn.transaction()?;
        tx.execute_batch(
            "CREATE TABLE products (
                 id INTEGER PRIMARY KEY, sku TEXT, barcode TEXT, name TEXT NOT NULL,
                 price_cents INTEGER NOT NULL, stock INTEGER NOT NULL DEFAULT 0);
             CREATE INDEX products_barcode ON products (barcode);
             CREATE TABLE sales (
                 id INTEGER PRIMARY KEY, receipt_no TEXT NOT NULL, created_at TEXT NOT NULL,
                 total_cents INTEGER NOT NULL, lines_json TEXT NOT NULL,
                 drive_synced INTEGER NOT NULL DEFAULT 0);
             CREATE INDEX sales_drive_synced ON sales (drive_synced);
             CREATE TABLE drive_sync_state (key TEXT PRIMARY KEY, value TEXT);
             CREATE TABLE drive_upload_log (
                 id INTEGER PRIMARY KEY, uploaded_at TEXT, drive_file_id TEXT, sales_count INTEGER);",
        )?;
        for p in &self.products {
            tx.execute(
                "INSERT INTO products (id, sku, barcode, name, price_cents, stock) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![p.id, p.sku, p.barcode, p.name, p.price_cents, p.stock],
            )?;
        }
        for s in &self.sales {
            tx.execute(
                "INSERT INTO sales (id, receipt_no, created_at, total_cents, lines_json, drive_synced)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![s.id, s.receipt_no, s.created_at, s.total_cents, s.lines_json, s.drive_synced],
            )?;
        }
        tx.execute(
            "INSERT INTO drive_sync_state (key, value) VALUES ('drive_folder_id', ?1), ('last_upload_at', ?2)",
            params![self.drive_folder_id, self.last_upload_at],
        )?;
        for i in 1..=self.uploads {
            tx.execute(
                "INSERT INTO drive_upload_log (id, uploaded_at, drive_file_id, sales_count) VALUES (?1, ?2, ?3, ?4)",
                params![i, self.last_upload_at, format!("drive-file-{i}"), 1],
            )?;
        }
        tx.commit()?;
        Ok(())
    }
}
