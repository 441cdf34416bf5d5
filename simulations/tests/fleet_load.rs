//! `simulations load` on its own cluster (scripts/cluster: nginx with TLS over two `cloud
//! serve` processes on a fresh PostgreSQL database): a small virtual fleet, then the
//! exactly-once audit of every acknowledged sale. Needs nginx and openssl (scripts/setup) and
//! the `cloud` binary next to `simulations`; a missing one makes the run exit 2 and the test
//! fail, naming it.

use std::process::Command;

#[test]
fn two_hundred_virtual_terminals_through_nginx_lose_and_double_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let report = dir.path().join("load.json");
    let out = Command::new(env!("CARGO_BIN_EXE_simulations"))
        .args([
            "load",
            "--terminals",
            "200",
            "--branches",
            "20",
            "--duration",
            "20",
        ])
        .args(["--instances", "2", "--catalog", "500", "--cold", "10"])
        .args([
            "--sales-per-terminal-per-minute",
            "12",
            "--poll-seconds",
            "3",
        ])
        .args(["--catalog-changes-per-minute", "30", "--seed", "8"])
        .arg("--report")
        .arg(&report)
        .output()
        .expect("start simulations");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    let tail: Vec<&str> = stderr.lines().rev().take(30).collect();
    assert_ne!(
        out.status.code(),
        Some(2),
        "the load could not run:\n{stdout}\n{tail:#?}"
    );
    let r: serde_json::Value = serde_json::from_slice(
        &std::fs::read(&report).unwrap_or_else(|e| panic!("no report ({e}):\n{stdout}")),
    )
    .expect("report JSON");
    assert!(out.status.success(), "load failed:\n{stdout}\n{r:#}");
    for field in [
        "terminals",
        "branches",
        "duration_s",
        "sales_acknowledged",
        "sales_in_cloud",
        "lost",
        "duplicated",
        "responses",
        "latency_ms",
        "cloud_peak_rss_mib",
        "db_connections_peak",
        "audit",
    ] {
        assert!(!r[field].is_null(), "report lacks {field}: {r:#}");
    }
    // ~12 sales per terminal-minute for 20 s: about 800; every one acknowledged is stored once.
    let acked = r["sales_acknowledged"].as_u64().expect("acknowledged");
    assert!(acked > 200, "too few sales to prove anything: {r:#}");
    assert_eq!(r["audit"]["found_once"].as_u64(), Some(acked), "{r:#}");
    assert_eq!(r["lost"], 0);
    assert_eq!(r["duplicated"], 0);
    assert_eq!(r["audit"]["undelivered"], 0);
    assert_eq!(r["sales_in_cloud"].as_u64(), Some(acked), "{r:#}");
    assert_eq!(r["cold"]["terminals"], 10, "{r:#}");
    assert!(
        r["latency_ms"]["delta"]["count"].as_u64().unwrap_or(0) > 0,
        "{r:#}"
    );
    assert_eq!(
        r["cloud_peak_rss_mib"].as_array().map(Vec::len),
        Some(2),
        "{r:#}"
    );
    // Empty polls were answered from memory by at least one instance.
    assert!(
        r["cloud_counters"]["delta_polls_from_memory"]
            .as_f64()
            .unwrap_or(0.0)
            > 0.0,
        "{r:#}"
    );
}
