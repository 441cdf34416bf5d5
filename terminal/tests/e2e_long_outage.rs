//! End to end, real processes: an outage many times longer than the whole backoff budget.
//! The cloud (`cloud serve` on PostgreSQL) is stopped while the till keeps selling; no sale may
//! end in `needs_attention`, and after the cloud is started again every sale flushes by itself,
//! exactly once, within a backoff cap or so of its return.

mod e2e_support;

use e2e_support::{enroll, pos_entry, Cable, Cloud, Daemon};
use std::time::{Duration, Instant};

/// Compressed policy: the whole budget (3 attempts of at most 10, 20, 40 ms) is spent in well
/// under a second; the cap is 200 ms.
const POLICY: &[&str] = &[
    "--backoff-base-ms",
    "10",
    "--backoff-cap-ms",
    "200",
    "--max-attempts",
    "3",
    "--outbox-batch",
    "10",
    "--delta-interval-ms",
    "500",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_longer_than_the_budget_flushes_every_sale_by_itself() {
    let mut cloud = Cloud::start(&[]);
    cloud.upsert_product("p1", "SKU-1", "4000000000001", "Product 1");
    let (terminal_id, token) = cloud.process.add_terminal("b1").expect("terminal add");
    let cable = Cable::start(&cloud.process.base_url).await;
    let dir = tempfile::tempdir().expect("data dir");
    enroll(dir.path(), &cable, terminal_id, &token, "b1");
    let daemon = Daemon::start(dir.path(), POLICY);
    let s = daemon
        .wait_status("first snapshot", |s| s["catalog"]["entities"] == 1)
        .await;
    let pos_id = s["pos_id"].as_str().expect("pos_id").to_string();
    for n in 1..=3 {
        daemon.sell(n).await;
    }
    daemon
        .wait_status("online sales synced", |s| s["outbox"]["synced"] == 3)
        .await;

    // The cloud goes away for ~6 s: about thirty times the budget.
    cloud.process.terminate().expect("stop cloud");
    let outage_began = Instant::now();
    for n in 4..=33 {
        daemon.sell(n).await;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let s = daemon
        .wait_status("outage shown", |s| {
            s["online"] == false && s["offline_since"].is_string() && s["outbox"]["queued"] == 30
        })
        .await;
    assert!(outage_began.elapsed() >= Duration::from_secs(6));
    assert_eq!(s["outbox"]["needs_attention"], 0, "{s:#}");
    assert!(s["outbox"]["oldest_pending_age_seconds"].as_i64().is_some());
    let outbox_state = s["actors"]
        .as_array()
        .and_then(|a| a.iter().find(|a| a["name"] == "sales_outbox"))
        .map(|a| a["state"].to_string())
        .unwrap_or_default();
    assert!(
        outbox_state.contains("holding"),
        "outbox state {outbox_state}"
    );

    // The cloud comes back (new port; the cable follows it). Nobody touches the till.
    cloud.process.restart().expect("restart cloud");
    cable.plug(&cloud.process.base_url);
    let back = Instant::now();
    let s = daemon
        .wait_status("queue drained by itself", |s| {
            s["outbox"]["synced"] == 33 && s["outbox"]["queued"] == 0
        })
        .await;
    let drained = back.elapsed();
    eprintln!(
        "long outage: {} s away, cloud back -> queue empty in {} ms (30 queued sales, cap 200 ms)",
        outage_began.elapsed().as_secs() - drained.as_secs(),
        drained.as_millis()
    );
    assert_eq!(s["outbox"]["needs_attention"], 0, "{s:#}");
    assert_eq!(s["online"], true);
    assert!(s["offline_since"].is_null());
    let held = cloud.sync_status(&token).await;
    let entry = pos_entry(&held, &pos_id);
    assert_eq!(entry["total_events"], 33, "{held}");
    assert_eq!(entry["highest_contiguous"], 33, "{held}");
    assert_eq!(cloud.stored_sales("b1").await, 33, "each sale stored once");
}
