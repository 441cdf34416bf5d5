//! The catalog fed from a back office's own PostgreSQL tables (docs/catalog-source.md): the
//! real `cloud` binary installs the capture, plain SQL in the back office changes the tables,
//! and the catalog — read by the library, and by a terminal token over HTTP — follows with
//! the existing guarantees.

mod common;

use std::collections::HashMap;
use std::path::Path;
use std::process::{Command, Output};
use std::time::Instant;

use diesel::connection::SimpleConnection;
use diesel::prelude::*;
use diesel::sql_types::{BigInt, Bool, Nullable, Text};
use diesel::PgConnection;
use possync_cloud::db::{catalog, Database};
use possync_protocol::entity_hash;
use possync_testkit::cloud::{cloud_binary, CloudProcess};
use possync_testkit::pg::TestDatabase;
use serde_json::{json, Value};

const BACK_OFFICE: &str = r#"
CREATE SCHEMA backoffice;
CREATE TABLE backoffice.tax_rates (
    code         text PRIMARY KEY,
    basis_points integer NOT NULL,
    label        text
);
CREATE TABLE backoffice.products (
    sku           text PRIMARY KEY,
    name          text NOT NULL,
    price_minor   bigint NOT NULL,
    tax_code      text REFERENCES backoffice.tax_rates (code),
    archived      boolean NOT NULL DEFAULT false,
    changed_at    timestamptz NOT NULL DEFAULT '2026-11-29 10:00:00+00',
    internal_note text
);
CREATE TABLE backoffice.branch_prices (
    sku         text NOT NULL,
    branch      text NOT NULL,
    price_minor bigint NOT NULL,
    PRIMARY KEY (sku, branch)
);
INSERT INTO backoffice.tax_rates VALUES ('std', 2000, 'Standard'), ('zero', 0, NULL);
INSERT INTO backoffice.products (sku, name, price_minor, tax_code)
    VALUES ('tea', 'Tea', 250, 'std'), ('cake', 'Cake', 400, 'std');
INSERT INTO backoffice.branch_prices VALUES ('tea', 'b1', 240), ('tea', 'b2', 260);
"#;

const MAPPING: &str = r#"
[[entity]]
type = "tax_rate"
table = "backoffice.tax_rates"
id = "code"
data = ["basis_points", "label"]

[[entity]]
type = "product"
table = "backoffice.products"
id = "sku"
data = ["name", "price_minor as price", "tax_code", "changed_at"]
deleted = "archived"

[[entity]]
type = "branch_price"
table = "backoffice.branch_prices"
id = ["sku", "branch"]
branch = "branch"
data = ["sku", "price_minor"]
"#;

/// A fresh database holding the sample back office, and the mapping file.
struct BackOffice {
    db: TestDatabase,
    dir: tempfile::TempDir,
}

impl BackOffice {
    fn create() -> BackOffice {
        let db = TestDatabase::create().expect("PostgreSQL must be reachable (never skipped)");
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("mapping.toml"), MAPPING).expect("mapping written");
        let bo = BackOffice { db, dir };
        bo.sql(BACK_OFFICE);
        bo
    }

    fn conn(&self) -> PgConnection {
        PgConnection::establish(&self.db.url).expect("connect")
    }

    fn sql(&self, sql: &str) {
        self.db.batch_execute(sql).expect("back-office SQL");
    }

    fn mapping(&self) -> String {
        self.dir.path().join("mapping.toml").display().to_string()
    }

    /// Runs `cloud <args>` on this database.
    fn cloud(&self, args: &[&str]) -> Output {
        cloud_on(&self.db.url, self.dir.path(), args)
    }

    fn install(&self) -> String {
        let out = self.cloud(&["catalog", "source", "install", &self.mapping()]);
        assert!(out.status.success(), "install: {}", text(&out.stderr));
        text(&out.stdout)
    }

    fn catalog(&self) -> HashMap<String, Row> {
        diesel::sql_query(
            "SELECT entity_type || '/' || entity_id AS key, branch_id, version, deleted, hash, data \
             FROM catalog_entities",
        )
        .load::<Row>(&mut self.conn())
        .expect("catalog read")
        .into_iter()
        .map(|r| (r.key.clone(), r))
        .collect()
    }

    fn counter(&self) -> i64 {
        diesel::sql_query("SELECT version AS n FROM catalog_counter")
            .get_result::<N>(&mut self.conn())
            .expect("counter")
            .n
    }
}

fn cloud_on(url: &str, data_dir: &Path, args: &[&str]) -> Output {
    Command::new(cloud_binary().expect("cloud binary built"))
        .arg("--database-url")
        .arg(url)
        .arg("--data-dir")
        .arg(data_dir)
        .args(args)
        .env_remove("POSSYNC_DATABASE_URL")
        .env_remove("POSSYNC_CATALOG_SOURCE")
        .output()
        .expect("cloud runs")
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[derive(QueryableByName, Debug, Clone)]
struct Row {
    #[diesel(sql_type = Text)]
    key: String,
    #[diesel(sql_type = Nullable<Text>)]
    branch_id: Option<String>,
    #[diesel(sql_type = BigInt)]
    version: i64,
    #[diesel(sql_type = Bool)]
    deleted: bool,
    #[diesel(sql_type = Text)]
    hash: String,
    #[diesel(sql_type = Text)]
    data: String,
}

impl Row {
    fn doc(&self) -> Value {
        serde_json::from_str(&self.data).expect("stored data is JSON")
    }
}

#[derive(QueryableByName)]
struct N {
    #[diesel(sql_type = BigInt)]
    n: i64,
}

/// Every change after `since` a terminal of `branch` gets, page by page over HTTP.
async fn pull(
    http: &reqwest::Client,
    cloud: &CloudProcess,
    token: &str,
    mut since: i64,
) -> (Vec<Value>, i64) {
    let mut changes = Vec::new();
    loop {
        let page: Value = http
            .get(cloud.url(&format!("/v1/pos/catalog/delta?since={since}&limit=1000")))
            .bearer_auth(token)
            .send()
            .await
            .expect("delta sent")
            .error_for_status()
            .expect("delta 200")
            .json()
            .await
            .expect("delta json");
        changes.extend(page["changes"].as_array().cloned().unwrap_or_default());
        since = page["next_since"].as_i64().expect("next_since");
        if page["has_more"] != json!(true) {
            return (changes, since);
        }
    }
}

/// The latest state per key of a list of delta changes, checking each hash on the way.
fn latest(changes: &[Value]) -> HashMap<String, Value> {
    let mut out: HashMap<String, Value> = HashMap::new();
    for c in changes {
        assert_eq!(
            c["hash"].as_str(),
            Some(entity_hash(&c["data"]).as_str()),
            "served hash is the protocol hash of the served data: {c}"
        );
        let key = format!(
            "{}/{}",
            c["type"].as_str().unwrap_or(""),
            c["id"].as_str().unwrap_or("")
        );
        if let Some(old) = out.get(&key) {
            assert!(
                old["version"].as_i64() < c["version"].as_i64(),
                "versions grow per key"
            );
        }
        out.insert(key, c.clone());
    }
    out
}

#[test]
fn check_prints_one_coded_line_per_problem() {
    let bo = BackOffice::create();
    bo.sql(
        "CREATE TABLE backoffice.legacy (id integer, price numeric(10,2), weight float8, \
         attrs jsonb, name text);",
    );
    std::fs::write(
        bo.dir.path().join("bad.toml"),
        r#"
[[entity]]
type = "legacy"
table = "backoffice.legacy"
id = "id"
data = ["price", "weight", "attrs", "name", "colour"]

[[entity]]
type = "gone"
table = "backoffice.nothing_here"
id = "id"
data = ["x"]
"#,
    )
    .expect("written");
    let bad = bo.dir.path().join("bad.toml").display().to_string();
    let out = bo.cloud(&["catalog", "source", "check", &bad]);
    assert!(!out.status.success(), "check must fail");
    let stdout = text(&out.stdout);
    let lines: Vec<&str> = stdout.lines().collect();
    for (code, about) in [
        (
            "POS_SOURCE_UNSUPPORTED_TYPE legacy: column price is numeric(10,2)",
            "minor units",
        ),
        (
            "POS_SOURCE_UNSUPPORTED_TYPE legacy: column weight is double precision",
            "floating",
        ),
        (
            "POS_SOURCE_UNSUPPORTED_TYPE legacy: column attrs is jsonb",
            "JSON",
        ),
        (
            "POS_SOURCE_NO_COLUMN legacy: column colour",
            "does not exist",
        ),
        ("POS_SOURCE_ID_NOT_PRIMARY_KEY legacy:", "no primary key"),
        ("POS_SOURCE_NO_TABLE gone:", "does not exist"),
    ] {
        assert!(
            lines
                .iter()
                .any(|l| l.starts_with(code) && l.contains(about)),
            "no line {code:?} … {about:?} in:\n{stdout}"
        );
    }
    assert_eq!(lines.len(), 6, "one line per problem:\n{stdout}");
    assert!(text(&out.stderr).contains("POS_SOURCE_CHECK_FAILED"));

    // The sample mapping is fine; a malformed file is a config error naming the entity.
    let ok = bo.cloud(&["catalog", "source", "check", &bo.mapping()]);
    assert!(ok.status.success(), "{}", text(&ok.stderr));
    std::fs::write(
        bo.dir.path().join("typo.toml"),
        "[[entity]]\ntype='p'\ntable='nodot'\nid='i'\ndata=['a']",
    )
    .expect("written");
    let typo = bo.dir.path().join("typo.toml").display().to_string();
    let out = bo.cloud(&["catalog", "source", "check", &typo]);
    assert!(!out.status.success());
    let err = text(&out.stderr);
    assert!(
        err.contains("POS_SOURCE_CONFIG") && err.contains("schema-qualified"),
        "{err}"
    );
}

#[test]
fn the_sqlite_cloud_refuses_a_catalog_source() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(dir.path().join("m.toml"), MAPPING).expect("written");
    let url = format!("sqlite://{}/cloud.db", dir.path().display());
    let mapping = dir.path().join("m.toml").display().to_string();
    let out = cloud_on(&url, dir.path(), &["catalog", "source", "check", &mapping]);
    assert!(!out.status.success());
    assert!(
        text(&out.stderr).contains("POS_SOURCE_NEEDS_POSTGRES"),
        "{}",
        text(&out.stderr)
    );
    let out = cloud_on(
        &url,
        dir.path(),
        &[
            "serve",
            "--bind",
            "127.0.0.1:0",
            "--catalog-source",
            &mapping,
        ],
    );
    assert!(!out.status.success(), "serve must not start");
    assert!(
        text(&out.stderr).contains("POS_SOURCE_NEEDS_POSTGRES"),
        "{}",
        text(&out.stderr)
    );
}

#[test]
fn install_loads_the_tables_is_idempotent_and_uninstall_removes_exactly_it() {
    let bo = BackOffice::create();
    // possync's own schema first, so the comparison below sees only what install adds.
    assert!(bo.cloud(&["migrate"]).status.success());
    let objects = |bo: &BackOffice| -> i64 {
        diesel::sql_query(
            "SELECT (SELECT count(*) FROM pg_trigger WHERE NOT tgisinternal) \
                  + (SELECT count(*) FROM pg_proc p JOIN pg_namespace n ON n.oid = p.pronamespace \
                     WHERE n.nspname NOT IN ('pg_catalog', 'information_schema')) \
                  + (SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace \
                     WHERE n.nspname NOT IN ('pg_catalog', 'information_schema', 'pg_toast')) AS n",
        )
        .get_result::<N>(&mut bo.conn())
        .expect("count")
        .n
    };
    // An entity an earlier import wrote that the table does not hold: the load tombstones it.
    let out = bo.cloud(&[
        "catalog", "upsert", "--type", "product", "--id", "stale", "--data", "{}",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let before = objects(&bo);
    let out = bo.install();
    assert!(out.contains(r#""installed":3"#), "{out}");
    let loaded = bo.catalog();
    assert_eq!(loaded.len(), 7, "{loaded:?}");
    assert!(
        loaded["product/stale"].deleted,
        "not in the table: tombstoned"
    );
    let tea = &loaded["product/tea"];
    assert_eq!(
        tea.doc(),
        json!({"name": "Tea", "price": 250, "tax_code": "std",
               "changed_at": "2026-11-29T10:00:00.000000Z"})
    );
    assert_eq!(tea.hash, entity_hash(&tea.doc()));
    assert_eq!(
        loaded["tax_rate/zero"].doc(),
        json!({"basis_points": 0, "label": null})
    );
    assert_eq!(
        loaded["branch_price/tea:b2"].branch_id.as_deref(),
        Some("b2")
    );
    assert_eq!(loaded["product/cake"].branch_id, None);
    let version = bo.counter();
    assert_eq!(version, 8, "the import, six rows, one tombstone");

    // Again: same DDL, and the reload stores nothing new.
    bo.install();
    assert_eq!(
        bo.counter(),
        version,
        "a reload of unchanged rows is a no-op"
    );

    let out = bo.cloud(&["catalog", "source", "uninstall", &bo.mapping()]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(
        objects(&bo),
        before,
        "uninstall removes exactly what install added"
    );
    // Without the triggers, the back office writes as before and nothing is captured.
    bo.sql("UPDATE backoffice.products SET price_minor = 1 WHERE sku = 'tea'");
    assert_eq!(bo.counter(), version);
    assert_eq!(bo.catalog().len(), 7, "catalog entities stay");
}

#[test]
fn hostile_text_hashes_exactly_like_the_protocol() {
    let bo = BackOffice::create();
    bo.install();
    let mut names: Vec<String> = (1u8..=127).map(|b| format!("x{}y", b as char)).collect();
    names.extend(
        [
            "quote \" and backslash \\ and slash /",
            "tab\tnewline\nreturn\r",
            "ünïcödé, 中文, emoji 🧾, RTL עברית",
            "\u{2028}\u{2029}\u{7f}\u{80}\u{ffff}",
            "",
        ]
        .map(String::from),
    );
    let mut c = bo.conn();
    for (i, name) in names.iter().enumerate() {
        diesel::sql_query(
            "INSERT INTO backoffice.products (sku, name, price_minor, changed_at) \
             VALUES ($1, $2, $3, '2026-11-29 10:00:00.123456+05:30')",
        )
        .bind::<Text, _>(format!("h{i}"))
        .bind::<Text, _>(name)
        .bind::<BigInt, _>(-(i as i64))
        .execute(&mut c)
        .expect("insert");
    }
    let catalog = bo.catalog();
    for (i, name) in names.iter().enumerate() {
        let row = &catalog[&format!("product/h{i}")];
        let doc = row.doc();
        assert_eq!(doc["name"].as_str(), Some(name.as_str()));
        assert_eq!(doc["price"], json!(-(i as i64)));
        assert_eq!(doc["changed_at"], json!("2026-11-29T04:30:00.123456Z"));
        assert_eq!(row.hash, entity_hash(&doc), "hash of {name:?}");
        assert_eq!(
            row.data,
            possync_protocol::canonical_json(&doc),
            "canonical text of {name:?}"
        );
    }
}

#[test]
fn keys_the_catalog_cannot_hold_and_scope_moves_are_refused_to_the_writer() {
    let bo = BackOffice::create();
    bo.install();
    let before = bo.counter();
    let err = bo
        .conn()
        .batch_execute(
            "INSERT INTO backoffice.products (sku, name, price_minor) VALUES ('a b', 'Spaced', 1)",
        )
        .expect_err("an id with a space cannot enter the catalog");
    assert!(
        err.to_string()
            .contains("possync catalog source: product row with id a b"),
        "{err}"
    );
    let err = bo
        .conn()
        .batch_execute("INSERT INTO backoffice.branch_prices VALUES ('tea', 'Branch 9', 1)")
        .expect_err("a malformed branch cannot enter the catalog");
    assert!(
        err.to_string().contains("cannot enter the catalog"),
        "{err}"
    );
    assert_eq!(bo.counter(), before, "refused statements leave nothing");
}

#[test]
fn rolled_back_work_never_appears_and_commits_take_versions_in_order() {
    let bo = BackOffice::create();
    bo.install();
    let v0 = bo.counter();
    let tea_version = bo.catalog()["product/tea"].version;
    bo.sql(
        "BEGIN; INSERT INTO backoffice.products (sku, name, price_minor) VALUES ('ghost', 'Ghost', 1); \
         UPDATE backoffice.products SET price_minor = 999 WHERE sku = 'tea'; ROLLBACK;",
    );
    bo.sql(
        "BEGIN; SAVEPOINT s; INSERT INTO backoffice.products (sku, name, price_minor) VALUES ('ghost2', 'G', 1); \
         ROLLBACK TO SAVEPOINT s; UPDATE backoffice.tax_rates SET label = 'Std' WHERE code = 'std'; COMMIT;",
    );
    let c = bo.catalog();
    assert!(!c.contains_key("product/ghost") && !c.contains_key("product/ghost2"));
    assert_eq!(c["product/tea"].doc()["price"], json!(250));
    assert_eq!(
        bo.counter(),
        v0 + 1,
        "only the committed label change is numbered"
    );
    assert_eq!(c["tax_rate/std"].version, v0 + 1);

    // One transaction touching a key several times stores its final state once.
    bo.sql(
        "BEGIN; UPDATE backoffice.products SET price_minor = 1 WHERE sku = 'cake'; \
         UPDATE backoffice.products SET price_minor = 2 WHERE sku = 'cake'; \
         UPDATE backoffice.products SET internal_note = 'not mapped' WHERE sku = 'tea'; COMMIT;",
    );
    let c = bo.catalog();
    assert_eq!(c["product/cake"].doc()["price"], json!(2));
    assert_eq!(c["product/cake"].version, v0 + 2);
    assert_eq!(
        c["product/tea"].version, tea_version,
        "an unmapped column's change is no new version"
    );
    assert_eq!(bo.counter(), v0 + 2);

    // TRUNCATE fires no delete trigger; it is captured all the same, including rows this
    // transaction inserted before it, and rows inserted after it survive.
    bo.sql(
        "BEGIN; INSERT INTO backoffice.branch_prices VALUES ('cake', 'b1', 390); \
         TRUNCATE backoffice.branch_prices; \
         INSERT INTO backoffice.branch_prices VALUES ('scone', 'b2', 310); COMMIT;",
    );
    let c = bo.catalog();
    assert!(c["branch_price/tea:b1"].deleted && c["branch_price/tea:b2"].deleted);
    assert!(
        !c.contains_key("branch_price/cake:b1"),
        "never committed as live"
    );
    assert_eq!(c["branch_price/scone:b2"].doc()["price_minor"], json!(310));
    assert_eq!(bo.counter(), v0 + 5, "two tombstones and one new price");
}

#[test]
fn two_concurrent_writers_and_a_delta_reader_converge_without_skipping() {
    let bo = BackOffice::create();
    bo.sql(
        "INSERT INTO backoffice.products (sku, name, price_minor) \
         SELECT 'p' || g, 'P' || g, g FROM generate_series(1, 50) g;",
    );
    bo.install();
    let url = bo.db.url.clone();
    let writers: Vec<_> =
        (0..2)
            .map(|w| {
                let url = url.clone();
                std::thread::spawn(move || {
                    let mut c = PgConnection::establish(&url).expect("connect");
                    for i in 0..150 {
                        // Overlapping rows between the writers, several rows per transaction.
                        let lo = (i * 7 + w * 3) % 50 + 1;
                        let sql =
                            format!(
                        "BEGIN; UPDATE backoffice.products SET price_minor = price_minor + 1 \
                         WHERE sku IN ('p{lo}', 'p{}'); \
                         INSERT INTO backoffice.products (sku, name, price_minor) \
                         VALUES ('w{w}-{i}', 'new', {i}); \
                         {} COMMIT;",
                        (lo % 50) + 1,
                        if i % 10 == 0 {
                            format!("DELETE FROM backoffice.products WHERE sku = 'w{w}-{}';", i / 2)
                        } else {
                            String::new()
                        }
                    );
                        // A deadlock between the two writers' own row locks aborts one of them,
                        // as it would without possync; retry it.
                        let mut committed = false;
                        for _ in 0..5 {
                            if c.batch_execute(&sql).is_ok() {
                                committed = true;
                                break;
                            }
                            let _ = c.batch_execute("ROLLBACK");
                        }
                        assert!(committed, "writer {w} transaction {i} never committed");
                    }
                })
            })
            .collect();
    // A terminal's delta cursor, pulled while the writers run.
    let db = Database::connect(&url, 1).expect("connect");
    let mut conn = db.conn().expect("conn");
    let mut held: HashMap<String, (i64, Value)> = HashMap::new();
    let mut since = 0;
    let mut pull = |since: &mut i64, held: &mut HashMap<String, (i64, Value)>| loop {
        let page = catalog::delta_page(&mut conn, "b1", *since, 1000).expect("delta");
        for e in page.changes {
            assert_eq!(e.hash, entity_hash(&e.data));
            held.insert(format!("{}/{}", e.entity_type, e.id), (e.version, e.data));
        }
        *since = page.next_since;
        if !page.has_more {
            break;
        }
    };
    while writers.iter().any(|w| !w.is_finished()) {
        pull(&mut since, &mut held);
    }
    for w in writers {
        w.join().expect("writer");
    }
    pull(&mut since, &mut held);
    let truth = bo.catalog();
    let table: HashMap<String, i64> = diesel::sql_query(
        "SELECT 'product/' || sku AS key, price_minor AS n FROM backoffice.products",
    )
    .load::<KeyN>(&mut bo.conn())
    .expect("table")
    .into_iter()
    .map(|r| (r.key, r.n))
    .collect();
    for (key, price) in &table {
        let row = &truth[key];
        assert!(!row.deleted, "{key}");
        assert_eq!(
            row.doc()["price"],
            json!(price),
            "{key}: catalog follows the table"
        );
        assert_eq!(
            held[key].1,
            row.doc(),
            "{key}: the delta reader holds the truth"
        );
    }
    for (key, row) in &truth {
        if row.deleted {
            assert!(!table.contains_key(key));
            assert_eq!(
                held.get(key).map(|h| &h.1),
                Some(&Value::Null),
                "{key} tombstoned"
            );
        }
    }
    assert_eq!(
        truth.values().map(|r| r.version).max(),
        Some(bo.counter()),
        "the counter is the highest committed version"
    );
}

#[derive(QueryableByName)]
struct KeyN {
    #[diesel(sql_type = Text)]
    key: String,
    #[diesel(sql_type = BigInt)]
    n: i64,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plain_sql_and_a_100k_row_price_change_reach_a_terminal_by_delta() {
    let bo = BackOffice::create();
    bo.sql(
        "INSERT INTO backoffice.branch_prices (sku, branch, price_minor) \
         SELECT 'bulk' || g, 'b1', 100 FROM generate_series(1, 100000) g;",
    );
    // Not installed yet: a cloud told to follow the source refuses to start.
    let mapping = bo.mapping();
    let refused = CloudProcess::start_with(Some(&bo.db.url), &["--catalog-source", &mapping]);
    assert!(
        refused.is_err(),
        "serve must refuse a capture that is not installed"
    );
    let started = Instant::now();
    bo.install();
    println!(
        "initial load of 100 006 rows: {:.2}s",
        started.elapsed().as_secs_f64()
    );
    let mut args = common::NO_LIMITS.to_vec();
    args.extend(["--catalog-source", &mapping, "--catalog-source-only"]);
    let cloud = CloudProcess::start_with(Some(&bo.db.url), &args).expect("cloud serves");
    let http = reqwest::Client::new();
    let (_, token) = cloud.add_terminal("b1").expect("terminal");

    // One source of truth: admin writes are refused.
    let r = http
        .post(cloud.url("/v1/admin/catalog/upsert"))
        .bearer_auth(&cloud.admin_token)
        .json(&json!({"entities": [{"type": "product", "id": "x", "data": {}}]}))
        .send()
        .await
        .expect("sent");
    assert_eq!(r.status(), 403);
    let body: Value = r.json().await.expect("json");
    assert!(body.to_string().contains("catalog-source-only"), "{body}");

    let (changes, since) = pull(&http, &cloud, &token, 0).await;
    let view = latest(&changes);
    assert_eq!(
        view.len(),
        100_000 + 5,
        "b1 sees globals and its own prices only"
    );
    assert!(view.contains_key("branch_price/tea:b1") && !view.contains_key("branch_price/tea:b2"));

    // Plain SQL: insert, update, hard delete, soft delete, a per-branch price.
    bo.sql(
        "INSERT INTO backoffice.products (sku, name, price_minor, tax_code) VALUES ('scone', 'Scone', 300, 'zero'); \
         UPDATE backoffice.products SET price_minor = 275 WHERE sku = 'tea'; \
         UPDATE backoffice.products SET archived = true WHERE sku = 'cake'; \
         UPDATE backoffice.branch_prices SET price_minor = 230 WHERE sku = 'tea' AND branch = 'b1'; \
         UPDATE backoffice.branch_prices SET price_minor = 1 WHERE sku = 'tea' AND branch = 'b2'; \
         UPDATE backoffice.products SET tax_code = NULL WHERE tax_code = 'std'; \
         DELETE FROM backoffice.tax_rates WHERE code = 'std';",
    );
    let (changes, since) = pull(&http, &cloud, &token, since).await;
    let got = latest(&changes);
    assert_eq!(got["product/scone"]["data"]["price"], json!(300));
    assert_eq!(got["product/tea"]["data"]["price"], json!(275));
    assert_eq!(got["product/tea"]["data"]["tax_code"], Value::Null);
    assert_eq!(got["product/cake"]["deleted"], json!(true));
    assert_eq!(got["tax_rate/std"]["deleted"], json!(true));
    assert_eq!(
        got["branch_price/tea:b1"]["data"]["price_minor"],
        json!(230)
    );
    assert!(
        !got.contains_key("branch_price/tea:b2"),
        "another branch's change"
    );

    // The bulk change: 100 000 prices in one statement, one transaction.
    let mut c = bo.conn();
    let t0 = Instant::now();
    c.batch_execute(
        "UPDATE backoffice.branch_prices SET price_minor = price_minor + 5 WHERE sku LIKE 'bulk%'",
    )
    .expect("bulk update");
    let committed = t0.elapsed();
    let t1 = Instant::now();
    let (changes, _) = pull(&http, &cloud, &token, since).await;
    let seen = t1.elapsed();
    let got = latest(&changes);
    assert_eq!(got.len(), 100_000);
    assert!(got.values().all(|e| e["data"]["price_minor"] == json!(105)));
    println!(
        "bulk price change of 100 000 rows: commit (capture + flush) {:.2}s, then delta pull \
         by a terminal {:.2}s, total {:.2}s until the terminal holds every new price",
        committed.as_secs_f64(),
        seen.as_secs_f64(),
        (committed + seen).as_secs_f64()
    );
}

#[test]
fn a_load_killed_mid_way_resumes_without_renumbering_what_it_stored() {
    let bo = BackOffice::create();
    bo.sql(
        "INSERT INTO backoffice.branch_prices (sku, branch, price_minor) \
         SELECT 'k' || g, 'b1', g FROM generate_series(1, 100000) g;",
    );
    let total = 100_000 + 6;
    assert!(bo.cloud(&["migrate"]).status.success());
    let mut child = Command::new(cloud_binary().expect("cloud binary built"))
        .arg("--database-url")
        .arg(&bo.db.url)
        .arg("--data-dir")
        .arg(bo.dir.path())
        .args(["catalog", "source", "install", &bo.mapping()])
        .env_remove("POSSYNC_DATABASE_URL")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("install starts");
    // kill -9 once a few batches are committed.
    let mut stored = 0;
    for _ in 0..3000 {
        stored = bo.counter();
        if stored >= 5000 {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    child.kill().expect("kill -9");
    child.wait().expect("reaped");
    let at_kill = bo.counter();
    assert!(
        stored >= 5000 && at_kill < total,
        "the load must be interrupted mid-way (stored {stored}, counter {at_kill})"
    );
    let before: HashMap<String, i64> = bo
        .catalog()
        .into_iter()
        .map(|(k, r)| (k, r.version))
        .collect();

    let out = bo.cloud(&["catalog", "source", "load", &bo.mapping()]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let after = bo.catalog();
    assert_eq!(after.len() as i64, total);
    assert_eq!(
        bo.counter(),
        total,
        "every row got exactly one version: the resumed load renumbered nothing"
    );
    for (key, version) in &before {
        assert_eq!(after[key].version, *version, "{key} kept its version");
    }
    assert_eq!(
        after["branch_price/k77777:b1"].doc()["price_minor"],
        json!(77777)
    );
}

#[test]
fn a_back_office_role_is_captured_without_rights_on_possync_and_cannot_borrow_the_capture() {
    let bo = BackOffice::create();
    bo.install();
    // Roles are cluster-wide: a unique name, dropped at the end.
    let role = format!("backoffice_app_{}", uuid::Uuid::new_v4().simple());
    bo.sql(&format!(
        "CREATE ROLE {role}; GRANT USAGE ON SCHEMA backoffice TO {role}; \
         GRANT ALL ON ALL TABLES IN SCHEMA backoffice TO {role}; \
         CREATE SCHEMA {role}_own AUTHORIZATION {role};"
    ));
    bo.sql(&format!(
        "SET ROLE {role}; UPDATE backoffice.products SET price_minor = 1 WHERE sku = 'tea'; RESET ROLE;"
    ));
    assert_eq!(bo.catalog()["product/tea"].doc()["price"], json!(1));
    let err = bo
        .conn()
        .batch_execute(&format!(
            "SET ROLE {role}; CREATE TABLE {role}_own.products (LIKE backoffice.products); \
             CREATE TRIGGER borrowed AFTER INSERT ON {role}_own.products \
             REFERENCING NEW TABLE AS possync_new FOR EACH STATEMENT \
             EXECUTE FUNCTION public.possync_product_ins();"
        ))
        .expect_err("a role without EXECUTE cannot attach the capture to its own table");
    assert!(err.to_string().contains("permission denied"), "{err}");
    bo.sql(&format!("DROP OWNED BY {role}; DROP ROLE {role};"));
}
