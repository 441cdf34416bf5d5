//! End to end, real processes: `cloud serve` on a fresh PostgreSQL database and the `terminal`
//! daemon. First run takes the snapshot; with the cloud stopped, lookups still work and sales
//! queue; with the cloud back the queue flushes and the cloud holds each sale exactly once;
//! a `kill -9` of the daemon in the middle of a flush, then a restart, still gives exactly once.

mod e2e_support;

use e2e_support::{
    enroll, human_lines, pos_entry, sale_payload, terminal_cli, Cable, Cloud, Daemon,
};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_sales_flush_exactly_once_even_across_kill_9() {
    // A slow rate limit makes the flush take many requests, so the kill lands mid-flush.
    let mut cloud = Cloud::start(&["--rate-per-second", "4", "--rate-burst", "4"]);
    for i in 1..=5 {
        cloud.upsert_product(
            &format!("p{i}"),
            &format!("SKU-{i}"),
            &format!("40000000000{i}"),
            &format!("Product {i}"),
        );
    }
    let (terminal_id, token) = cloud.process.add_terminal("b1").expect("terminal add");
    let cable = Cable::start(&cloud.process.base_url).await;
    let dir = tempfile::tempdir().expect("data dir");
    enroll(dir.path(), &cable, terminal_id, &token, "b1");
    let mut daemon = Daemon::start(
        dir.path(),
        &["--outbox-batch", "5", "--delta-interval-ms", "2000"],
    );

    // 1. First run: the full snapshot.
    let s = daemon
        .wait_status("first snapshot", |s| {
            s["catalog"]["entities"] == 5 && s["catalog"]["version"].as_i64().is_some()
        })
        .await;
    assert_eq!(s["catalog"]["snapshot"]["in_progress"], false);
    let pos_id = s["pos_id"].as_str().expect("pos_id").to_string();

    // 2. Cloud stopped (process gone, cable cut): lookups work, sales queue.
    cable.cut();
    cloud.process.terminate().expect("stop cloud");
    let hit = daemon.get("/catalog/lookup?barcode=400000000003").await;
    assert_eq!(hit["count"], 1, "{hit}");
    assert_eq!(hit["entities"][0]["id"], "p3");
    let by_name = daemon.get("/catalog/lookup?q=product%204").await;
    assert_eq!(by_name["entities"][0]["id"], "p4", "{by_name}");
    for n in 1..=20 {
        let (code, body) = daemon
            .post(
                "/sales",
                json!({"type": "sale", "payload": sale_payload(n)}),
            )
            .await;
        assert_eq!(code, 201, "{body}");
        assert_eq!(body["local_event_id"], n);
        assert_eq!(body["pos_id"], pos_id.as_str());
    }
    // One more through the CLI while the daemon runs (direct, durable enqueue).
    let sale_file = dir.path().join("sale.json");
    std::fs::write(&sale_file, sale_payload(21).to_string()).expect("write sale");
    let (ok, out, err) = terminal_cli(
        dir.path(),
        &["sale", "add", sale_file.to_str().expect("path")],
    );
    assert!(ok, "{out} {err}");
    let added: serde_json::Value = serde_json::from_str(out.trim()).expect("sale add json");
    assert_eq!(added["local_event_id"], 21);
    let s = daemon
        .wait_status("offline, sales queued", |s| {
            s["online"] == false && s["outbox"]["queued"] == 21
        })
        .await;
    assert_eq!(s["outbox"]["synced"], 0);
    assert!(s["outbox"]["oldest_pending_at"].is_string());

    // 3. Cloud back: the queue flushes; the cloud holds each sale exactly once.
    cloud.process.restart().expect("restart cloud");
    cable.plug(&cloud.process.base_url);
    daemon
        .wait_status("queue flushed", |s| s["outbox"]["synced"] == 21)
        .await;
    let held = cloud.sync_status(&token).await;
    let entry = pos_entry(&held, &pos_id);
    assert_eq!(entry["total_events"], 21, "{held}");
    assert_eq!(
        cloud.stored_sales("b1").await,
        21,
        "stored rows, admin view"
    );
    assert_eq!(entry["highest_contiguous"], 21, "{held}");
    assert_eq!(entry["ids_above_gap"], json!([]));

    // 4. kill -9 in the middle of a flush.
    cable.cut();
    for n in 22..=121 {
        let (code, body) = daemon
            .post(
                "/sales",
                json!({"type": "sale", "payload": sale_payload(n)}),
            )
            .await;
        assert_eq!(code, 201, "{body}");
    }
    cable.plug(&cloud.process.base_url);
    let s = daemon
        .wait_status("flush under way", |s| {
            s["outbox"]["synced"].as_i64().is_some_and(|n| n > 21)
        })
        .await;
    daemon.kill_9();
    let synced_at_kill = s["outbox"]["synced"].as_i64().expect("synced");
    assert!(
        synced_at_kill < 121,
        "the flush finished before the kill ({synced_at_kill}); the test did not test a mid-flush crash"
    );
    // The crashed daemon left a stale daemon.json: `terminal status` notices and reads the DB.
    assert!(dir.path().join("daemon.json").exists());
    let (ok, out, err) = terminal_cli(dir.path(), &["status"]);
    assert!(ok, "{out} {err}");
    let crashed: serde_json::Value = serde_json::from_str(&out).expect("status json");
    assert_eq!(crashed["daemon_running"], false);
    daemon.restart();
    daemon
        .wait_status("queue flushed after restart", |s| {
            s["outbox"]["synced"] == 121 && s["outbox"]["queued"] == 0
        })
        .await;
    let held = cloud.sync_status(&token).await;
    let entry = pos_entry(&held, &pos_id);
    assert_eq!(entry["total_events"], 121, "{held}");
    assert_eq!(
        cloud.stored_sales("b1").await,
        121,
        "stored rows, admin view"
    );
    assert_eq!(entry["highest_contiguous"], 121, "{held}");
    assert_eq!(entry["ids_above_gap"], json!([]));
    let s = daemon.status().await;
    assert_eq!(s["outbox"]["needs_attention"], 0, "{s:#}");

    // 5. Graceful stop joins everything and exits 0; `terminal status` then reads the DB.
    let exit = daemon.terminate();
    assert!(
        exit.success(),
        "daemon exit {exit:?}; log:\n{}",
        daemon.log()
    );
    let (ok, out, err) = terminal_cli(dir.path(), &["status"]);
    assert!(ok, "{out} {err}");
    let offline: serde_json::Value = serde_json::from_str(&out).expect("status json");
    assert_eq!(offline["daemon_running"], false);
    assert_eq!(offline["outbox"]["synced"], 121);
    assert!(human_lines(&err).is_empty(), "{err}");
}
