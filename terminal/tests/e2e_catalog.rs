//! End to end, real processes: a catalog change in the cloud reaches the terminal by delta
//! (no new snapshot), and local tampering with the terminal's SQLite file is reported by
//! verify and repaired by apply — with `local_inventory` and the sales untouched.

mod e2e_support;

use e2e_support::{enroll, sale_payload, terminal_cli, Cable, Cloud, Daemon, MAX_POLLS, POLL};
use possync_terminal::store::SqliteStore;
use possync_testkit::webdriver::{start_driver, Session};
use serde_json::{json, Value};

/// Reads one counter/gauge value (summed over labels) from Prometheus text.
fn metric(text: &str, name: &str) -> f64 {
    possync_testkit::metrics_text::sum(text, name)
}

async fn metrics(daemon: &Daemon) -> String {
    reqwest::get(format!("{}/metrics", daemon.url))
        .await
        .expect("GET /metrics")
        .text()
        .await
        .expect("metrics text")
}

fn product_name(db: &rusqlite::Connection, id: &str) -> Option<String> {
    db.query_row(
        "SELECT json_extract(data, '$.name') FROM catalog_entities \
         WHERE entity_type = 'product' AND entity_id = ?1",
        [id],
        |r| r.get(0),
    )
    .ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delta_without_resnapshot_and_tampering_verified_then_repaired() {
    let cloud = Cloud::start(&[]);
    cloud.upsert_product("p1", "SKU-1", "4000000000011", "Coffee beans");
    cloud.upsert_product("p2", "SKU-2", "4000000000028", "Oat milk");
    cloud.upsert_product("p3", "SKU-3", "4000000000035", "Croissant");
    let (terminal_id, token) = cloud.process.add_terminal("b1").expect("terminal add");
    let cable = Cable::start(&cloud.process.base_url).await;
    let dir = tempfile::tempdir().expect("data dir");

    // A live cloud checks the token: a wrong one, or the right one for another branch, is
    // refused with one coded line and nothing is stored.
    for (tok, branch) in [("pst_wrong", "b1"), (token.as_str(), "b2")] {
        let (ok, out, err) = terminal_cli(
            dir.path(),
            &[
                "enroll",
                "--cloud-url",
                &cable.url(),
                "--token",
                tok,
                "--terminal-id",
                &terminal_id.to_string(),
                "--branch",
                branch,
            ],
        );
        assert!(!ok, "{out}");
        let lines = e2e_support::human_lines(&err);
        assert_eq!(lines.len(), 1, "{err}");
        assert!(
            lines[0].starts_with("error: POS_SYNC_UNAUTHORIZED: "),
            "{err}"
        );
    }
    assert!(!dir.path().join("terminal.db").exists(), "nothing stored");
    enroll(dir.path(), &cable, terminal_id, &token, "b1");
    let mut daemon = Daemon::start(dir.path(), &[]);

    let s = daemon
        .wait_status("first snapshot", |s| {
            s["catalog"]["entities"] == 3 && s["catalog"]["version"].as_i64().is_some()
        })
        .await;
    let v1 = s["catalog"]["version"].as_i64().expect("version");
    let m = metrics(&daemon).await;
    let snapshot_pages = metric(&m, "snapshot_pages");
    assert!(snapshot_pages >= 1.0, "{m}");

    // 1. One catalog change in the cloud arrives by delta, with no new snapshot.
    cloud.upsert_product("p2", "SKU-2", "4000000000028", "Oat milk barista");
    let mut hit = Value::Null;
    for _ in 0..MAX_POLLS {
        hit = daemon.get("/catalog/lookup?sku=SKU-2").await;
        if hit["entities"][0]["data"]["name"] == "Oat milk barista" {
            break;
        }
        tokio::time::sleep(POLL).await;
    }
    assert_eq!(
        hit["entities"][0]["data"]["name"], "Oat milk barista",
        "{hit}"
    );
    let s = daemon.status().await;
    assert!(
        s["catalog"]["version"].as_i64().expect("version") > v1,
        "{s:#}"
    );
    let m = metrics(&daemon).await;
    assert_eq!(
        metric(&m, "snapshot_pages"),
        snapshot_pages,
        "no new snapshot: {m}"
    );
    assert!(metric(&m, "delta_sync_runs") >= 1.0, "{m}");
    assert!(metric(&m, "terminal_cloud_requests_total") >= 2.0, "{m}");

    // The till's own data: local stock and one sale.
    let store = SqliteStore::open(&dir.path().join("terminal.db")).expect("open store");
    store.adjust_local_inventory("p1", 7).expect("stock");
    let (code, body) = daemon
        .post(
            "/sales",
            json!({"type": "sale", "payload": sale_payload(1)}),
        )
        .await;
    assert_eq!(code, 201, "{body}");
    let db = rusqlite::Connection::open(dir.path().join("terminal.db")).expect("sqlite");
    let count = |table: &str| -> i64 {
        db.query_row(&format!("SELECT count(*) FROM {table}"), [], |r| r.get(0))
            .expect("count")
    };
    let sales_before = count("sales");
    let inventory_before: Vec<(String, i64)> = {
        let mut st = db
            .prepare("SELECT product_id, qty FROM local_inventory ORDER BY product_id")
            .expect("prepare");
        st.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .expect("query")
            .collect::<Result<_, _>>()
            .expect("rows")
    };
    assert_eq!(sales_before, 1);

    // 2. Tamper with the catalog in the SQLite file: change p1, delete p3, invent p9.
    db.execute_batch(
        "UPDATE catalog_entities SET data = json_set(data, '$.name', 'Tampered') \
           WHERE entity_type = 'product' AND entity_id = 'p1';
         DELETE FROM catalog_entities WHERE entity_type = 'product' AND entity_id = 'p3';
         INSERT INTO catalog_entities (entity_type, entity_id, branch_id, version, deleted, hash, data, updated_at)
           VALUES ('product', 'p9', NULL, 1, 0, 'bogus', '{\"name\":\"Ghost\"}', '2026-01-01T00:00:00.000000Z');",
    )
    .expect("tamper");

    // 3. Verify (CLI, through the running daemon) reports it and changes nothing.
    let (ok, out, err) = terminal_cli(dir.path(), &["reconcile", "--verify"]);
    assert!(ok, "{out} {err}");
    let report: Value = serde_json::from_str(&out).expect("verify json");
    assert_eq!(report["applied"], false, "{report}");
    assert_eq!(report["upserts"], 2, "p1 differs, p3 missing: {report}");
    assert_eq!(report["deletes"], 1, "p9 unknown to the cloud: {report}");
    assert_eq!(report["method"], "fingerprints", "{report}");
    assert!(
        report["round_trips"]
            .as_u64()
            .is_some_and(|n| (2..=8).contains(&n)),
        "{report}"
    );
    assert!(
        report["bytes_received"].as_u64().is_some_and(|n| n > 0),
        "{report}"
    );
    assert_eq!(product_name(&db, "p1").as_deref(), Some("Tampered"));
    assert_eq!(product_name(&db, "p9").as_deref(), Some("Ghost"));

    // The operator's page in headless Chromium says the same when Verify is clicked.
    let driver = start_driver().await;
    let session = Session::new(&driver).await;
    session.goto(&format!("{}/", daemon.url)).await;
    let online = session.wait_text("#online", |t| t == "online").await;
    assert_eq!(online, "online");
    session.click("#verify-btn").await;
    let shown = session
        .wait_text("#action-result", |t| t.starts_with("Verify"))
        .await;
    assert!(
        shown.starts_with("Verify: 3 entries differ (checked "),
        "page shows: {shown}"
    );
    assert!(
        shown.contains("upserts 2, deletes 1"),
        "page shows: {shown}"
    );
    assert!(
        shown.contains("round trips") && shown.contains("B received by fingerprints"),
        "page shows the cost: {shown}"
    );
    session.close().await;
    drop(driver);
    assert_eq!(product_name(&db, "p1").as_deref(), Some("Tampered"));

    // 4. Apply (status endpoint) repairs it.
    let (code, report) = daemon.post("/reconcile", json!({"mode": "apply"})).await;
    assert_eq!(code, 200, "{report}");
    assert_eq!(report["applied"], true, "{report}");
    assert_eq!(product_name(&db, "p1").as_deref(), Some("Coffee beans"));
    assert_eq!(product_name(&db, "p3").as_deref(), Some("Croissant"));
    assert_eq!(product_name(&db, "p9"), None);
    let (code, again) = daemon.post("/reconcile", json!({"mode": "verify"})).await;
    assert_eq!(code, 200);
    assert_eq!(again["upserts"], 0, "{again}");
    assert_eq!(again["deletes"], 0, "{again}");
    assert_eq!(
        again["round_trips"], 1,
        "nothing drifted: one round trip: {again}"
    );

    // A second daemon on the same data dir is refused.
    let (ok, _, err) = terminal_cli(dir.path(), &["run", "--status-bind", "127.0.0.1:0"]);
    assert!(!ok);
    let lines = e2e_support::human_lines(&err);
    assert_eq!(lines.len(), 1, "{err}");
    assert!(
        lines[0].starts_with("error: DAEMON_ALREADY_RUNNING: "),
        "{err}"
    );

    // `terminal status` asks the running daemon (live engine state).
    let (ok, out, err) = terminal_cli(dir.path(), &["status"]);
    assert!(ok, "{out} {err}");
    let live: Value = serde_json::from_str(&out).expect("status json");
    assert_eq!(live["daemon_running"], true, "{live:#}");
    assert_eq!(live["online"], true, "{live:#}");
    assert_eq!(live["catalog"]["entities"], 3, "{live:#}");

    // 5. The till's own data is untouched.
    assert_eq!(count("sales"), sales_before);
    let inventory_after: Vec<(String, i64)> = {
        let mut st = db
            .prepare("SELECT product_id, qty FROM local_inventory ORDER BY product_id")
            .expect("prepare");
        st.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .expect("query")
            .collect::<Result<_, _>>()
            .expect("rows")
    };
    assert_eq!(inventory_after, inventory_before);
    assert_eq!(store.local_inventory("p1").expect("stock"), Some(7));

    // 6. With no daemon, `terminal reconcile` runs its own short-lived engine.
    let exit = daemon.terminate();
    assert!(exit.success(), "daemon exit {exit:?}");
    db.execute(
        "UPDATE catalog_entities SET data = json_set(data, '$.name', 'Again') \
         WHERE entity_type = 'product' AND entity_id = 'p2'",
        [],
    )
    .expect("tamper again");
    let (ok, out, err) = terminal_cli(dir.path(), &["reconcile", "--apply"]);
    assert!(ok, "{out} {err}");
    let report: Value = serde_json::from_str(&out).expect("apply json");
    assert_eq!(report["applied"], true, "{report}");
    assert_eq!(report["upserts"], 1, "{report}");
    assert_eq!(product_name(&db, "p2").as_deref(), Some("Oat milk barista"));
    assert_eq!(count("sales"), sales_before);
}

/// Issue 7 §3: for floats whose digits used to change between the cloud's canonical text and
/// what a terminal parsed, the terminal's hash of what it was served equals the served hash,
/// so apply-then-verify reports zero drift (it used to "repair" the same entities forever).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn floats_in_catalog_data_verify_with_zero_drift() {
    let cloud = Cloud::start(&[]);
    let floats = [
        // Texts that drifted through admin → stored → served → terminal under serde_json's
        // default (inexact) float parser: found by the proptest, kept as regressions.
        "1.0715660391465826e-75",
        "3.0261999441573203e-52",
        "6.466053826432699e-236",
        "2.347135155778617e+214",
        "1.7802719962921167e-19",
        "-4.199010356643058e-19",
        "0.1",
        "0.30000000000000004",
        "1.7976931348623157e308",
        "5e-324",
        "123456789.12345678901234567890",
        "0.000001234567890123456789",
        "3.141592653589793238462643383279",
        "-0.0",
        "18446744073709551616",
    ];
    for (i, f) in floats.iter().enumerate() {
        let data =
            format!("{{\"name\": \"f{i}\", \"weight_kg\": {f}, \"tiers\": [{f}, {{\"x\": {f}}}]}}");
        cloud
            .process
            .cli(&[
                "catalog",
                "upsert",
                "--type",
                "product",
                "--id",
                &format!("f{i}"),
                "--data",
                &data,
            ])
            .expect("catalog upsert");
    }
    let (terminal_id, token) = cloud.process.add_terminal("b1").expect("terminal add");
    let cable = Cable::start(&cloud.process.base_url).await;
    let dir = tempfile::tempdir().expect("data dir");
    enroll(dir.path(), &cable, terminal_id, &token, "b1");
    let mut daemon = Daemon::start(dir.path(), &[]);
    daemon
        .wait_status("snapshot of the float catalog", |s| {
            s["catalog"]["entities"] == floats.len()
        })
        .await;
    let exit = daemon.terminate();
    assert!(exit.success(), "daemon exit {exit:?}");
    let (ok, out, err) = terminal_cli(dir.path(), &["reconcile", "--verify"]);
    assert!(ok, "{out} {err}");
    let report: Value = serde_json::from_str(&out).expect("verify json");
    assert_eq!(report["upserts"], 0, "no drift: {report}");
    assert_eq!(report["deletes"], 0, "no drift: {report}");
    let (ok, out, err) = terminal_cli(dir.path(), &["reconcile", "--apply"]);
    assert!(ok, "{out} {err}");
    let report: Value = serde_json::from_str(&out).expect("apply json");
    assert_eq!(report["upserts"], 0, "nothing to repair: {report}");
}
