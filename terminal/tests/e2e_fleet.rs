//! End to end through the fleet deployment (`scripts/cluster`): the real nginx terminating TLS
//! with a local CA in front of two `cloud serve` processes on one PostgreSQL database. The
//! terminal enrolls over HTTPS trusting that CA (`--ca-cert`), takes its snapshot, sells while
//! every instance is down, and flushes exactly once although one instance is killed with
//! SIGKILL in the middle of the flush — nginx routes the retries to the other.

mod e2e_support;

use e2e_support::{pos_entry, product_upsert_args, terminal_cli, Daemon, MAX_POLLS, POLL};
use possync_testkit::cluster::Cluster;
use possync_testkit::pg::TestDatabase;
use serde_json::{json, Value};

/// Sales sold offline; one per request (`--outbox-batch 1`).
const SALES: i64 = 150;

async fn admin_get(cluster: &Cluster, http: &reqwest::Client, path: &str) -> Value {
    let r = http
        .get(format!("{}{path}", cluster.url))
        .bearer_auth(&cluster.admin_token)
        .send()
        .await
        .expect("admin request through nginx");
    assert_eq!(r.status(), 200, "{path}");
    r.json().await.expect("admin json")
}

async fn sync_status(cluster: &Cluster, http: &reqwest::Client, token: &str) -> Value {
    for _ in 0..MAX_POLLS {
        let r = http
            .get(format!("{}/v1/pos/sync/status", cluster.url))
            .bearer_auth(token)
            .send()
            .await
            .expect("sync status through nginx");
        if r.status() == 200 {
            return r.json().await.expect("sync status json");
        }
        tokio::time::sleep(POLL).await;
    }
    panic!("sync status never answered 200 through nginx");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn through_nginx_with_tls_offline_sales_flush_exactly_once_while_an_instance_is_killed() {
    let db = TestDatabase::create().expect("PostgreSQL must be reachable for e2e tests");
    // A slow per-terminal rate limit (5/s per instance) makes the flush take ~15 s of 429s
    // and retries, so the kill lands in its middle.
    let cluster = Cluster::start(
        2,
        &db.url,
        &[
            ("POSSYNC_RATE_PER_SECOND", "5"),
            ("POSSYNC_RATE_BURST", "5"),
        ],
    )
    .expect("scripts/cluster must start");
    assert!(cluster.url.starts_with("https://"), "{}", cluster.url);
    for i in 1..=5 {
        let (id, sku, barcode, name) = (
            format!("p{i}"),
            format!("SKU-{i}"),
            format!("40000000000{i}"),
            format!("Product {i}"),
        );
        cluster
            .cli(
                &product_upsert_args(&id, &sku, &barcode, &name)
                    .iter()
                    .map(String::as_str)
                    .collect::<Vec<_>>(),
            )
            .expect("catalog upsert");
    }
    let (terminal_id, token) = cluster.add_terminal("b1").expect("terminal add");
    let dir = tempfile::tempdir().expect("data dir");

    let enroll = |extra: &[&str]| -> Value {
        let id = terminal_id.to_string();
        let mut args = vec![
            "enroll",
            "--cloud-url",
            &cluster.url,
            "--token",
            &token,
            "--terminal-id",
            &id,
            "--branch",
            "b1",
        ];
        args.extend_from_slice(extra);
        let (ok, out, err) = terminal_cli(dir.path(), &args);
        assert!(ok, "enroll {extra:?} failed: {out} {err}");
        serde_json::from_str(&out).expect("enroll json")
    };
    // Without the CA the TLS handshake fails: offline enrollment is allowed, but nothing
    // unverified is trusted.
    let v = enroll(&[]);
    assert_eq!(v["verified"], false, "an unknown CA must not verify: {v}");
    // With it, the token is checked over HTTPS through nginx; the CA is kept.
    let ca = cluster.ca_cert.to_str().expect("ca path").to_string();
    let v = enroll(&["--ca-cert", &ca]);
    assert_eq!(v["verified"], true, "{v}");

    let daemon = Daemon::start(
        dir.path(),
        &["--outbox-batch", "1", "--delta-interval-ms", "1000"],
    );
    let s = daemon
        .wait_status("first snapshot over HTTPS", |s| {
            s["catalog"]["entities"] == 5
        })
        .await;
    let pos_id = s["pos_id"].as_str().expect("pos_id").to_string();

    // Every instance down: nginx answers 502, the till sells on.
    cluster.kill_instance(0).expect("kill 0");
    cluster.kill_instance(1).expect("kill 1");
    for n in 1..=SALES {
        daemon.sell(n).await;
    }
    daemon
        .wait_status("offline, sales queued", |s| {
            s["online"] == false && s["outbox"]["queued"] == SALES
        })
        .await;

    // Both back; mid-flush, instance 0 is killed with SIGKILL.
    cluster.start_instance(0).expect("start 0");
    cluster.start_instance(1).expect("start 1");
    let s = daemon
        .wait_status("flush under way", |s| {
            s["outbox"]["synced"].as_i64().is_some_and(|n| n > 5)
        })
        .await;
    cluster.kill_instance(0).expect("kill 0 mid-flush");
    let synced_at_kill = s["outbox"]["synced"].as_i64().expect("synced");
    assert!(
        synced_at_kill < SALES,
        "the flush finished before the kill ({synced_at_kill}); nothing was tested"
    );
    daemon
        .wait_status("queue flushed through the surviving instance", |s| {
            s["outbox"]["synced"] == SALES && s["outbox"]["queued"] == 0
        })
        .await;

    let http = cluster.https_client().expect("https client");
    let held = sync_status(&cluster, &http, &token).await;
    let entry = pos_entry(&held, &pos_id);
    assert_eq!(entry["total_events"], SALES, "{held}");
    assert_eq!(entry["highest_contiguous"], SALES, "{held}");
    assert_eq!(entry["ids_above_gap"], json!([]));
    let summary = admin_get(&cluster, &http, "/v1/admin/sales/summary?branch=b1").await;
    assert_eq!(summary["sales_events"], SALES, "stored rows: {summary}");
    let s = daemon.status().await;
    assert_eq!(s["outbox"]["needs_attention"], 0, "{s:#}");
}
