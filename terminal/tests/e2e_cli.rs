//! The `terminal` command line with no cloud at all: enrolling offline, selling offline from a
//! file, listing and retrying the outbox, reading status from the database — and every failure
//! is one line naming a stable code, with a non-zero exit.

mod e2e_support;

use e2e_support::{human_lines, sale_payload, terminal_cli};
use serde_json::Value;

/// A port nothing listens on (bound then released).
fn dead_url() -> String {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("port")
        .port();
    format!("http://127.0.0.1:{port}")
}

fn one_error_line(stderr: &str, code: &str) {
    let lines = human_lines(stderr);
    assert_eq!(lines.len(), 1, "exactly one line expected: {stderr}");
    assert!(
        lines[0].starts_with(&format!("error: {code}: ")),
        "line should name {code}: {}",
        lines[0]
    );
}

#[test]
fn commands_work_offline_and_fail_with_one_coded_line() {
    let dir = tempfile::tempdir().expect("data dir");
    let d = dir.path();

    // Not enrolled yet.
    let (ok, _, err) = terminal_cli(d, &["status"]);
    assert!(!ok);
    one_error_line(&err, "POS_SYNC_UNAUTHORIZED");
    let (ok, _, err) = terminal_cli(d, &["run", "--status-bind", "127.0.0.1:0"]);
    assert!(!ok);
    one_error_line(&err, "POS_SYNC_UNAUTHORIZED");

    // Enrolling offline is allowed, with a warning.
    let terminal_id = uuid::Uuid::now_v7().to_string();
    let (ok, out, err) = terminal_cli(
        d,
        &[
            "enroll",
            "--cloud-url",
            &dead_url(),
            "--token",
            "pst_x",
            "--terminal-id",
            &terminal_id,
            "--branch",
            "b1",
        ],
    );
    assert!(ok, "{out} {err}");
    let enrolled: Value = serde_json::from_str(&out).expect("enroll json");
    assert_eq!(enrolled["verified"], false);
    assert_eq!(enrolled["terminal_id"], terminal_id.as_str());
    assert!(err.contains("warning: token not verified"), "{err}");

    // A bad branch is refused before anything is stored.
    let (ok, _, err) = terminal_cli(
        d,
        &[
            "enroll",
            "--cloud-url",
            &dead_url(),
            "--token",
            "t",
            "--terminal-id",
            &terminal_id,
            "--branch",
            "Bad Branch!",
        ],
    );
    assert!(!ok);
    one_error_line(&err, "POS_SYNC_EVENT_INVALID");

    // Selling offline from a file: a bare payload and a full body.
    let bare = d.join("bare.json");
    std::fs::write(&bare, sale_payload(1).to_string()).expect("write");
    let (ok, out, err) = terminal_cli(d, &["sale", "add", bare.to_str().expect("path")]);
    assert!(ok, "{out} {err}");
    let first: Value = serde_json::from_str(out.trim()).expect("json");
    assert_eq!(first["local_event_id"], 1);
    assert!(first["pos_id"].is_string());
    let body = d.join("body.json");
    std::fs::write(
        &body,
        serde_json::json!({"type": "refund", "occurred_at": "2026-11-01T10:00:00Z",
                           "payload": {
                               "receipt_no": "B1-T1-R1", "currency": "EUR",
                               "lines": [{"product_id": "p1", "qty": -1, "unit_price_minor": 250, "total_minor": -250}],
                               "totals": {"subtotal_minor": -250, "tax_minor": 0, "total_minor": -250},
                               "payments": [{"method": "cash", "amount_minor": -250}]}})
        .to_string(),
    )
    .expect("write");
    let (ok, out, err) = terminal_cli(d, &["sale", "add", body.to_str().expect("path")]);
    assert!(ok, "{out} {err}");
    let second: Value = serde_json::from_str(out.trim()).expect("json");
    assert_eq!(second["local_event_id"], 2);
    assert_eq!(second["pos_id"], first["pos_id"]);

    // Invalid sales: one coded line, nothing stored.
    let mut bad = sale_payload(3);
    bad["payments"][0]["amount_minor"] = serde_json::json!(1);
    let bad_file = d.join("bad.json");
    std::fs::write(&bad_file, bad.to_string()).expect("write");
    let (ok, _, err) = terminal_cli(d, &["sale", "add", bad_file.to_str().expect("path")]);
    assert!(!ok);
    one_error_line(&err, "POS_SYNC_EVENT_INVALID");
    std::fs::write(&bad_file, "not json").expect("write");
    let (ok, _, err) = terminal_cli(d, &["sale", "add", bad_file.to_str().expect("path")]);
    assert!(!ok);
    one_error_line(&err, "POS_SYNC_EVENT_INVALID");
    let (ok, _, err) = terminal_cli(d, &["sale", "add", "/nonexistent/sale.json"]);
    assert!(!ok);
    one_error_line(&err, "IO_FAILED");

    // The outbox, from the database.
    let (ok, out, err) = terminal_cli(d, &["outbox", "list"]);
    assert!(ok, "{err}");
    let rows: Vec<Value> = serde_json::from_str(&out).expect("rows");
    assert_eq!(rows.len(), 2);
    assert!(rows.iter().all(|r| r["status"] == "pending"), "{out}");
    let (ok, out, _) = terminal_cli(d, &["outbox", "list", "--status", "needs_attention"]);
    assert!(ok);
    assert_eq!(
        serde_json::from_str::<Vec<Value>>(&out)
            .expect("rows")
            .len(),
        0
    );
    let (ok, _, err) = terminal_cli(d, &["outbox", "list", "--status", "lost"]);
    assert!(!ok);
    one_error_line(&err, "POS_SYNC_EVENT_INVALID");
    let (ok, out, _) = terminal_cli(d, &["outbox", "retry", "--all"]);
    assert!(ok);
    assert_eq!(
        serde_json::from_str::<Value>(&out).expect("json")["released"],
        0
    );
    let (ok, _, err) = terminal_cli(d, &["outbox", "retry", "1"]);
    assert!(!ok, "a pending row is not waiting for a retry");
    one_error_line(&err, "POS_SYNC_EVENT_INVALID");

    // Status without a daemon: from the database.
    let (ok, out, err) = terminal_cli(d, &["status"]);
    assert!(ok, "{err}");
    let s: Value = serde_json::from_str(&out).expect("status");
    assert_eq!(s["daemon_running"], false);
    assert_eq!(s["online"], Value::Null);
    assert_eq!(s["outbox"]["pending"], 2);
    assert_eq!(s["outbox"]["queued"], 2);
    assert_eq!(s["terminal_id"], terminal_id.as_str());
    assert_eq!(s["catalog"]["version"], Value::Null);

    // Reconcile with the cloud unreachable fails with one coded line.
    let (ok, _, err) = terminal_cli(d, &["reconcile", "--verify"]);
    assert!(!ok);
    let lines = human_lines(&err);
    assert_eq!(lines.len(), 1, "{err}");
    assert!(lines[0].starts_with("error: "), "{err}");

    // The status endpoint refuses a non-loopback address.
    let (ok, _, err) = terminal_cli(d, &["run", "--status-bind", "0.0.0.0:0"]);
    assert!(!ok);
    one_error_line(&err, "STATUS_BIND_FAILED");

    // `migrate` on the current database reports nothing to do.
    let (ok, out, err) = terminal_cli(d, &["migrate"]);
    assert!(ok, "{err}");
    let report: Value = serde_json::from_str(&out).expect("migrate json");
    assert_eq!(report["applied"], serde_json::json!([]), "{out}");
}

/// One sync engine per data dir, whatever the daemon's probe says: with the engine lock held
/// (here by this test, as a daemon too busy to answer its status URL would hold it),
/// `terminal run` stops with `DAEMON_ALREADY_RUNNING` and starts nothing; once the holder is
/// gone, the same data dir gets past the lock (to the next check: it is not enrolled).
#[test]
fn a_second_engine_on_one_data_dir_is_refused_by_the_lock() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("till");
    std::fs::create_dir_all(&data).expect("data dir");
    let held = possync_terminal::data_dir::EngineLock::acquire(&data).expect("lock");
    let (ok, _, err) = terminal_cli(&data, &["run", "--status-bind", "127.0.0.1:0"]);
    assert!(!ok);
    one_error_line(&err, "DAEMON_ALREADY_RUNNING");
    drop(held);
    let (ok, _, err) = terminal_cli(&data, &["run", "--status-bind", "127.0.0.1:0"]);
    assert!(!ok);
    assert!(
        !err.contains("DAEMON_ALREADY_RUNNING"),
        "the lock went with its holder: {err}"
    );
}
