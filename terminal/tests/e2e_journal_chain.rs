//! End to end, real processes: the sales journal's hash chain (docs/journal-chain.md).
//! A sale changed on the till after it was chained (written straight into the database,
//! past the till's own code) is caught by `terminal audit verify`, stored by the cloud but
//! reported as a chain break for exactly that event, and shown by `cloud audit verify` over
//! the export; a record changed in the exported file fails verification at that record.

mod e2e_support;

use e2e_support::{enroll, terminal_cli, Cable, Cloud, Daemon};
use serde_json::json;

fn cloud_verify(file: &std::path::Path) -> (bool, String, String) {
    let out = std::process::Command::new(
        possync_testkit::cloud::cloud_binary()
            .expect("cloud binary (cargo build -p possync-cloud)"),
    )
    .args(["audit", "verify"])
    .arg(file)
    .output()
    .expect("run cloud audit verify");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sale_changed_on_the_till_is_one_chain_break_in_the_cloud_and_in_the_export() {
    let cloud = Cloud::start(&[]);
    let (terminal_id, token) = cloud.process.add_terminal("b1").expect("terminal add");
    let cable = Cable::start(&cloud.process.base_url).await;
    let dir = tempfile::tempdir().expect("data dir");
    enroll(dir.path(), &cable, terminal_id, &token, "b1");

    // Offline: five sales queue, chained.
    cable.cut();
    let mut daemon = Daemon::start(dir.path(), &[]);
    for n in 1..=5 {
        daemon.sell(n).await;
    }
    daemon
        .wait_status("five queued", |s| s["outbox"]["queued"] == 5)
        .await;
    daemon.terminate();
    let (ok, out, err) = terminal_cli(dir.path(), &["audit", "verify"]);
    assert!(ok, "an untouched journal verifies: {out} {err}");
    let summary: serde_json::Value = serde_json::from_str(out.trim()).expect("json");
    assert_eq!(summary["links_verified"], 5, "{summary}");

    // Someone edits sale 3 in the database file, past the till's code and its triggers.
    {
        let db = rusqlite::Connection::open(dir.path().join("terminal.db")).expect("open db");
        let n = db
            .execute(
                "UPDATE sync_journal
                 SET event = json_set(event, '$.payload.receipt_no', 'FORGED')
                 WHERE local_event_id = 3",
                [],
            )
            .expect("tamper");
        assert_eq!(n, 1);
    }
    let (ok, _, err) = terminal_cli(dir.path(), &["audit", "verify"]);
    assert!(!ok, "the till's own check catches the edit");
    assert!(
        err.contains("POS_SYNC_CHAIN_BREAK") && err.contains("local_event_id 3"),
        "{err}"
    );

    // Back online: every sale is stored, the edited one reported as a chain break.
    cable.plug(&cloud.process.base_url);
    daemon.restart();
    daemon
        .wait_status("all synced", |s| s["outbox"]["synced"] == 5)
        .await;
    assert_eq!(cloud.stored_sales("b1").await, 5);
    let log = std::fs::read_to_string(cloud.process.log_path()).expect("cloud log");
    let coded: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("POS_SYNC_CHAIN_BREAK"))
        .collect();
    // Logged at WARN once, for that event only.
    assert!(!coded.is_empty());
    assert!(
        coded.iter().all(|l| l.contains("\"eventId\":3")),
        "{coded:?}"
    );
    let warned: Vec<&&str> = coded
        .iter()
        .filter(|l| l.contains("\"level\":\"WARN\"") && l.contains("chain break"))
        .collect();
    assert_eq!(warned.len(), 1, "{coded:?}");

    // The fleet view and the metrics name it.
    let fleet: serde_json::Value = reqwest::Client::new()
        .get(cloud.process.url("/v1/admin/fleet"))
        .bearer_auth(&cloud.process.admin_token)
        .send()
        .await
        .expect("fleet")
        .json()
        .await
        .expect("fleet json");
    assert_eq!(
        fleet["chain_breaks"].as_array().map(Vec::len),
        Some(1),
        "{fleet}"
    );
    assert_eq!(fleet["chain_breaks"][0]["local_event_id"], 3, "{fleet}");
    assert_eq!(fleet["gaps"], json!([]), "{fleet}");
    let metrics = reqwest::get(cloud.process.url("/metrics"))
        .await
        .expect("metrics")
        .text()
        .await
        .expect("metrics text");
    assert!(
        metrics.contains("sales_chain_breaks{branch=\"b1\"} 1"),
        "{metrics}"
    );
    assert!(metrics.contains("sales_gaps{branch=\"b1\"} 0"), "{metrics}");

    // The export shows it too, offline, at the third record.
    let export = cloud
        .process
        .cli(&["audit", "export", "--branch", "b1"])
        .expect("audit export");
    let lines: Vec<&str> = export.lines().collect();
    assert_eq!(lines.len(), 5, "{export}");
    let files = tempfile::tempdir().expect("dir");
    let write = |name: &str, lines: &[String]| {
        let path = files.path().join(name);
        std::fs::write(&path, lines.join("\n") + "\n").expect("write export");
        path
    };
    let all: Vec<String> = lines.iter().map(|l| l.to_string()).collect();
    let (ok, _, err) = cloud_verify(&write("all.jsonl", &all));
    assert!(!ok);
    assert!(
        err.contains("line 3") && err.contains("local_event_id 3"),
        "{err}"
    );

    // The two records before it verify; changing one of them in the file fails at it.
    let head = all[..2].to_vec();
    let (ok, out, err) = cloud_verify(&write("head.jsonl", &head));
    assert!(ok, "{out} {err}");
    assert!(out.contains("2 links verified"), "{out}");
    let mut forged = head.clone();
    let mut second: serde_json::Value = serde_json::from_str(&forged[1]).expect("record");
    second["payload"]["receipt_no"] = json!("R-FORGED");
    forged[1] = second.to_string();
    let (ok, _, err) = cloud_verify(&write("forged.jsonl", &forged));
    assert!(!ok);
    assert!(
        err.contains("line 2") && err.contains("chain break"),
        "{err}"
    );
    // A record removed from the file is a gap.
    let gapped = vec![all[0].clone(), all[3].clone(), all[4].clone()];
    let (ok, _, err) = cloud_verify(&write("gapped.jsonl", &gapped));
    assert!(!ok);
    assert!(err.contains("line 2") && err.contains("gap"), "{err}");
}
