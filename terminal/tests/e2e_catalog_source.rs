//! End to end, real processes: a back office's plain SQL on its own PostgreSQL tables reaches
//! a real terminal daemon by delta, through the catalog source's capture triggers
//! (docs/catalog-source.md), and the terminal's verify finds its copy equal to the cloud's —
//! the hashes the triggers computed in SQL are the ones the terminal computes.

mod e2e_support;

use std::process::Command;

use e2e_support::{enroll, terminal_cli, Cable, Daemon, MAX_POLLS, POLL};
use possync_testkit::cloud::{cloud_binary, CloudProcess};
use possync_testkit::pg::TestDatabase;
use serde_json::{json, Value};

const BACK_OFFICE: &str = "
CREATE SCHEMA backoffice;
CREATE TABLE backoffice.tax_rates (code text PRIMARY KEY, basis_points integer NOT NULL);
CREATE TABLE backoffice.products (
    sku text PRIMARY KEY, name text NOT NULL, price_minor bigint NOT NULL,
    archived boolean NOT NULL DEFAULT false);
CREATE TABLE backoffice.branch_prices (
    sku text NOT NULL, branch text NOT NULL, price_minor bigint NOT NULL,
    PRIMARY KEY (sku, branch));
INSERT INTO backoffice.tax_rates VALUES ('std', 2000);
INSERT INTO backoffice.products (sku, name, price_minor)
    VALUES ('tea', 'Tea \"Assam\"', 250), ('cake', 'Cake', 400);
INSERT INTO backoffice.branch_prices VALUES ('tea', 'b1', 240), ('tea', 'b2', 260);
";

const MAPPING: &str = r#"
[[entity]]
type = "tax_rate"
table = "backoffice.tax_rates"
id = "code"
data = ["basis_points"]

[[entity]]
type = "product"
table = "backoffice.products"
id = "sku"
data = ["sku", "name", "price_minor"]
deleted = "archived"

[[entity]]
type = "branch_price"
table = "backoffice.branch_prices"
id = ["sku", "branch"]
branch = "branch"
data = ["sku", "price_minor"]
"#;

/// The terminal's live document of one entity (`None`: absent or a tombstone).
fn held(db: &rusqlite::Connection, entity_type: &str, id: &str) -> Option<Value> {
    db.query_row(
        "SELECT data FROM catalog_entities \
         WHERE entity_type = ?1 AND entity_id = ?2 AND deleted = 0",
        [entity_type, id],
        |r| r.get::<_, String>(0),
    )
    .ok()
    .and_then(|d| serde_json::from_str(&d).ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn back_office_sql_reaches_a_terminal_by_delta() {
    let pg = TestDatabase::create().expect("PostgreSQL must be reachable for e2e tests");
    pg.batch_execute(BACK_OFFICE).expect("back office schema");
    let dir = tempfile::tempdir().expect("dir");
    let mapping = dir.path().join("mapping.toml");
    std::fs::write(&mapping, MAPPING).expect("mapping");
    let mapping = mapping.display().to_string();
    let out = Command::new(cloud_binary().expect("cloud binary built"))
        .args(["--database-url", &pg.url, "--data-dir"])
        .arg(dir.path())
        .args(["catalog", "source", "install", &mapping])
        .env_remove("POSSYNC_DATABASE_URL")
        .output()
        .expect("cloud runs");
    assert!(
        out.status.success(),
        "install: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let cloud = CloudProcess::start_with(
        Some(&pg.url),
        &["--catalog-source", &mapping, "--catalog-source-only"],
    )
    .expect("cloud serves the catalog source");
    let (terminal_id, token) = cloud.add_terminal("b1").expect("terminal add");
    let cable = Cable::start(&cloud.base_url).await;
    let tdir = tempfile::tempdir().expect("terminal dir");
    enroll(tdir.path(), &cable, terminal_id, &token, "b1");
    let daemon = Daemon::start(tdir.path(), &[]);
    // tax_rate/std, product/tea, product/cake, branch_price/tea:b1 — not b2's price.
    daemon
        .wait_status("first snapshot", |s| s["catalog"]["entities"] == 4)
        .await;
    let db = rusqlite::Connection::open(tdir.path().join("terminal.db")).expect("terminal.db");
    assert_eq!(
        held(&db, "product", "tea"),
        Some(json!({"sku": "tea", "name": "Tea \"Assam\"", "price_minor": 250}))
    );
    assert_eq!(held(&db, "branch_price", "tea:b2"), None);

    // The back office's own admin app, in plain SQL.
    pg.batch_execute(
        "BEGIN;
         UPDATE backoffice.products SET price_minor = 275 WHERE sku = 'tea';
         INSERT INTO backoffice.products (sku, name, price_minor) VALUES ('scone', 'Scone', 300);
         UPDATE backoffice.products SET archived = true WHERE sku = 'cake';
         UPDATE backoffice.branch_prices SET price_minor = 230 WHERE branch = 'b1';
         UPDATE backoffice.branch_prices SET price_minor = 1 WHERE branch = 'b2';
         DELETE FROM backoffice.tax_rates WHERE code = 'std';
         COMMIT;
         BEGIN;
         INSERT INTO backoffice.products (sku, name, price_minor) VALUES ('ghost', 'Ghost', 1);
         ROLLBACK;",
    )
    .expect("back office writes");
    let want = |db: &rusqlite::Connection| {
        held(db, "product", "tea").is_some_and(|d| d["price_minor"] == 275)
            && held(db, "product", "scone").is_some()
            && held(db, "product", "cake").is_none()
            && held(db, "tax_rate", "std").is_none()
            && held(db, "branch_price", "tea:b1").is_some_and(|d| d["price_minor"] == 230)
    };
    let mut converged = false;
    for _ in 0..MAX_POLLS {
        if want(&db) {
            converged = true;
            break;
        }
        tokio::time::sleep(POLL).await;
    }
    assert!(
        converged,
        "terminal did not converge; log:\n{}",
        daemon.log()
    );
    assert_eq!(
        held(&db, "branch_price", "tea:b2"),
        None,
        "another branch's price"
    );
    assert_eq!(held(&db, "product", "ghost"), None, "rolled back");

    // Verify compares hashes the terminal computes with the ones the triggers stored.
    let status = daemon.status().await;
    // tea, scone and b1's price of tea; cake archived, the tax rate deleted.
    assert_eq!(status["catalog"]["entities"], 3, "{status}");
    let (ok, out, err) = terminal_cli(tdir.path(), &["reconcile", "--verify"]);
    assert!(ok, "{out} {err}");
    let report: Value = serde_json::from_str(&out).expect("verify json");
    assert_eq!(report["upserts"], 0, "no drift: {report}");
    assert_eq!(report["deletes"], 0, "no drift: {report}");
}
