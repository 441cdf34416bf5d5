//! A seed must replay: the same seed and shape give the same fault schedule, from the library
//! and from the binary alike, and a pinned seed keeps producing the schedule recorded here (so
//! a seed quoted in an old failure report still means the same faults).

use std::process::Command;

use possync_simulations::fault_schedule::{
    CloudFault, FaultMode, FaultSchedule, ProxyAction, ScheduleShape,
};

fn pinned_shape() -> ScheduleShape {
    ScheduleShape {
        seed: 4242,
        terminals: 3,
        sales_per_terminal: 20,
        cloud_instances: 2,
        faults: FaultMode::All,
        backoff_cap_ms: 1000,
        // the binary's defaults: base 50 ms, cap 1 s, 4 attempts
        attempt_budget_ms: 750,
    }
}

fn schedule_from_binary(seed: u64) -> FaultSchedule {
    let out = Command::new(env!("CARGO_BIN_EXE_simulations"))
        .args([
            "schedule",
            "--seed",
            &seed.to_string(),
            "--terminals",
            "3",
            "--sales",
            "20",
            "--cloud-instances",
            "2",
            "--faults",
            "all",
        ])
        .output()
        .expect("run simulations schedule");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("schedule JSON")
}

#[test]
fn same_seed_replays_the_same_schedule() {
    let first = schedule_from_binary(4242);
    let second = schedule_from_binary(4242);
    assert_eq!(first, second);
    assert_eq!(first, FaultSchedule::generate(pinned_shape()));
    assert_ne!(first, schedule_from_binary(4243));
}

#[test]
fn pinned_seed_4242_keeps_its_recorded_schedule() {
    let s = FaultSchedule::generate(pinned_shape());
    assert_eq!(
        s.terminals[0].proxy[..6],
        [
            ProxyAction::Pass,
            ProxyAction::Pass,
            ProxyAction::Delay { ms: 161 },
            ProxyAction::Pass,
            ProxyAction::Pass,
            ProxyAction::Delay { ms: 383 },
        ]
    );
    assert_eq!(s.terminals[1].proxy[1], ProxyAction::DropRequest);
    assert_eq!(
        s.terminals[2].proxy[..4],
        [ProxyAction::RateLimited { retry_after_s: 1 }; 4]
    );
    let crashes: Vec<Vec<u32>> = s
        .terminals
        .iter()
        .map(|t| t.crash_after_sales.clone())
        .collect();
    assert_eq!(crashes, vec![vec![4], vec![12], vec![5]]);
    assert_eq!(
        s.cloud,
        vec![
            // 2 264 ms before outages were stretched to four attempt budgets (2026-11-29)
            CloudFault::Outage {
                at_sale: 20,
                duration_ms: 3000
            },
            CloudFault::Restart {
                at_sale: 36,
                instance: 0
            },
        ]
    );
}
