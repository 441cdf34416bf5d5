//! The seeded end-to-end scenarios CI runs: real `cloud serve` processes on a fresh
//! PostgreSQL database, real `terminal run` daemons behind fault proxies, every fault kind on.
//!
//! They need the `cloud` and `terminal` binaries next to `simulations` (`scripts/test` builds
//! every binary first) and PostgreSQL on 127.0.0.1:5432 (or `POSSYNC_SIM_PG_SERVER`); if either
//! is missing the run exits 2 and the test fails, naming the cause. Nothing is skipped.

use std::path::Path;
use std::process::Command;

fn run_simulation(args: &[&str], report: &Path) -> (i32, serde_json::Value, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_simulations"))
        .arg("run")
        .args(args)
        .arg("--report")
        .arg(report)
        .output()
        .expect("start simulations");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let code = out.status.code().unwrap_or(-1);
    assert_ne!(
        code,
        2,
        "the simulation could not run at all:\n{stdout}\n{}",
        stderr.lines().rev().take(30).collect::<Vec<_>>().join("\n")
    );
    let json =
        std::fs::read(report).unwrap_or_else(|e| panic!("no report ({e}):\n{stdout}\n{stderr}"));
    let report: serde_json::Value = serde_json::from_slice(&json).expect("report JSON");
    (code, report, stdout)
}

#[test]
fn four_terminals_two_branches_all_faults_lose_and_double_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let report_path = dir.path().join("report.json");
    let (code, r, stdout) = run_simulation(
        &[
            "--terminals",
            "4",
            "--branches",
            "2",
            "--sales",
            "30",
            "--faults",
            "all",
            "--seed",
            "20261125",
            "--cloud-instances",
            "2",
        ],
        &report_path,
    );
    println!("{stdout}");
    assert_eq!(r["sales_created"], 120, "{stdout}");
    assert_eq!(r["sales_in_cloud"], 120, "{stdout}");
    assert_eq!(r["lost"], 0, "{stdout}");
    assert_eq!(r["duplicated"], 0, "{stdout}");
    assert_eq!(r["cross_branch"], 0, "{stdout}");
    assert_eq!(r["catalog_unconverged_terminals"], 0, "{stdout}");
    let injected = &r["faults_injected"];
    for kind in ["terminal_kill", "cloud_kill", "cloud_outage"] {
        assert!(
            injected[kind].as_u64().unwrap_or(0) > 0,
            "{kind} not injected: {injected}"
        );
    }
    let proxy_faults: u64 = [
        "drop_request",
        "drop_response",
        "duplicate",
        "http_5xx",
        "http_429",
        "delay",
    ]
    .iter()
    .map(|k| injected[*k].as_u64().unwrap_or(0))
    .sum();
    assert!(
        proxy_faults > 0,
        "no network fault was injected: {injected}"
    );
    assert_eq!(code, 0, "{stdout}");
}

#[test]
fn an_abusive_terminal_is_rate_limited_while_the_others_sell() {
    let dir = tempfile::tempdir().expect("tempdir");
    let report_path = dir.path().join("report.json");
    let (code, r, stdout) = run_simulation(
        &[
            "--terminals",
            "2",
            "--branches",
            "2",
            "--sales",
            "15",
            "--faults",
            "none",
            "--seed",
            "77",
            "--abusive-terminal",
        ],
        &report_path,
    );
    println!("{stdout}");
    let abuse = &r["abuse"];
    assert!(
        abuse["status_429"].as_u64().unwrap_or(0) > 0,
        "abuser never limited: {abuse}"
    );
    assert!(
        abuse["retry_after_seen"].as_u64().unwrap_or(0) > 0,
        "429 without Retry-After: {abuse}"
    );
    assert_eq!(r["sales_created"], 30, "{stdout}");
    assert_eq!(r["sales_in_cloud"], 30, "{stdout}");
    assert_eq!(r["lost"], 0, "{stdout}");
    assert_eq!(code, 0, "{stdout}");
}

#[test]
fn the_audit_catches_a_sale_the_network_lied_about() {
    // The proxy of terminal 0 forges "accepted" for its first sales batch without forwarding
    // it: the terminal marks those sales synced, the cloud never saw them. If this run passed,
    // every green run above would prove nothing.
    let dir = tempfile::tempdir().expect("tempdir");
    let report_path = dir.path().join("report.json");
    let (code, r, stdout) = run_simulation(
        &[
            "--terminals",
            "2",
            "--branches",
            "1",
            "--sales",
            "10",
            "--faults",
            "none",
            "--seed",
            "99",
            "--sabotage",
        ],
        &report_path,
    );
    assert_eq!(code, 1, "a forged acceptance must fail the run:\n{stdout}");
    assert_eq!(r["sales_created"], 20, "{stdout}");
    let lost = r["lost"].as_u64().unwrap_or(0);
    assert!(lost >= 1, "the forged batch must count as lost:\n{stdout}");
    assert_eq!(r["sales_in_cloud"].as_u64(), Some(20 - lost), "{stdout}");
    assert_eq!(r["passed"], false);
}

#[test]
fn a_till_cloned_mid_run_and_its_original_deliver_every_sale_once_without_an_operator() {
    let dir = tempfile::tempdir().expect("tempdir");
    let report_path = dir.path().join("report.json");
    let (code, r, stdout) = run_simulation(
        &[
            "--terminals",
            "2",
            "--branches",
            "1",
            "--sales",
            "20",
            "--faults",
            "clone",
            "--seed",
            "20261129",
        ],
        &report_path,
    );
    println!("{stdout}");
    // Two tills of 20 sales, and the clone of terminal 0 with 10 of its own.
    assert_eq!(r["sales_created"], 50, "{stdout}");
    assert_eq!(r["sales_in_cloud"], 50, "{stdout}");
    assert_eq!(r["lost"], 0, "{stdout}");
    assert_eq!(r["duplicated"], 0, "{stdout}");
    assert_eq!(r["needs_attention"], 0, "{stdout}");
    assert_eq!(r["needs_attention_released_by_operator"], 0, "{stdout}");
    assert_eq!(r["faults_injected"]["terminal_clone"], 1, "{stdout}");
    let per = r["per_terminal"].as_array().expect("per terminal");
    assert_eq!(per.len(), 3, "{stdout}");
    assert_eq!(
        per[2]["terminal_id"], per[0]["terminal_id"],
        "the clone runs as the same terminal"
    );
    assert_eq!(code, 0, "{stdout}");
}
