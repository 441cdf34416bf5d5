//! The fault schedule: every fault a run will inject, decided up front from one seed.
//!
//! Timing on a shared machine is never reproducible, so faults are not keyed to wall-clock
//! instants. They are keyed to *counts* the run controls: the n-th request a terminal's proxy
//! sees, the k-th sale a terminal records, the n-th sale acknowledged fleet-wide. The same seed
//! and the same shape (terminals, sales, fault mode) therefore always produce the same
//! schedule, which is what makes a failing run replayable: rerun with the logged seed.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

/// Which families of faults a run injects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum FaultMode {
    /// A clean network and no crashes: the baseline.
    None,
    /// Proxy faults (drops, delays, duplicates, 5xx, 429 bursts) and a cloud outage.
    Network,
    /// kill -9 of terminal daemons mid-flush and of cloud processes mid-commit.
    Crash,
    /// Both of the above.
    All,
    /// Terminal 0's live data directory is copied (a consistent snapshot, like imaging a
    /// running till) into a second daemon half-way through its sales; both then keep selling.
    /// No other faults, so the run isolates what a cloned disk does to exactly-once.
    Clone,
}

impl FaultMode {
    /// Whether proxy faults and the outage are scheduled.
    pub fn network(self) -> bool {
        matches!(self, FaultMode::Network | FaultMode::All)
    }

    /// Whether process kills are scheduled.
    pub fn crash(self) -> bool {
        matches!(self, FaultMode::Crash | FaultMode::All)
    }

    /// Whether a till's data directory is cloned into a second daemon mid-run.
    pub fn clone_till(self) -> bool {
        matches!(self, FaultMode::Clone)
    }
}

/// What one terminal's proxy does with one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "action", rename_all = "snake_case")]
pub enum ProxyAction {
    /// Forward unchanged.
    Pass,
    /// Close the connection without forwarding: the cloud never sees the request.
    DropRequest,
    /// Forward, let the cloud commit, then close without answering: the terminal must resend
    /// something the cloud already holds.
    DropResponse,
    /// Hold the request this long before forwarding.
    Delay {
        /// Milliseconds to wait.
        ms: u64,
    },
    /// Forward the request twice at once (a retrying load balancer) and answer with one.
    Duplicate,
    /// Answer this 5xx without forwarding (502 bare like a load balancer, 503 with the
    /// `POS_SYNC_STORAGE_FAILED` envelope like the cloud).
    ServerError {
        /// 502 or 503.
        status: u16,
    },
    /// Answer 429 `POS_SYNC_RATE_LIMITED` with this `Retry-After`, without forwarding.
    RateLimited {
        /// Seconds, as the cloud sends them.
        retry_after_s: u64,
    },
}

impl ProxyAction {
    /// Stable name used in the report's "faults by kind".
    pub fn kind(&self) -> &'static str {
        match self {
            ProxyAction::Pass => "pass",
            ProxyAction::DropRequest => "drop_request",
            ProxyAction::DropResponse => "drop_response",
            ProxyAction::Delay { .. } => "delay",
            ProxyAction::Duplicate => "duplicate",
            ProxyAction::ServerError { .. } => "http_5xx",
            ProxyAction::RateLimited { .. } => "http_429",
        }
    }
}

/// A fault hitting the cloud side, triggered when the fleet has recorded `at_sale` sales.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum CloudFault {
    /// kill -9 one cloud process while sales flow, then start it again on the same database.
    Restart {
        /// Fleet-wide sale count that triggers it.
        at_sale: u64,
        /// Which instance (modulo the instance count).
        instance: usize,
    },
    /// Every proxy drops every request for `duration_ms` (longer than the backoff cap).
    Outage {
        /// Fleet-wide sale count that triggers it.
        at_sale: u64,
        /// How long every request is dropped.
        duration_ms: u64,
    },
}

impl CloudFault {
    /// The fleet-wide sale count that triggers this fault.
    pub fn at_sale(&self) -> u64 {
        match self {
            CloudFault::Restart { at_sale, .. } | CloudFault::Outage { at_sale, .. } => *at_sale,
        }
    }
}

/// Faults aimed at one terminal.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TerminalPlan {
    /// Action for the n-th request through this terminal's proxy; requests past the end pass.
    pub proxy: Vec<ProxyAction>,
    /// kill -9 the daemon right after recording this many sales (ascending, each in 1..S).
    pub crash_after_sales: Vec<u32>,
}

/// The shape of a run, which with the seed fully determines the schedule.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScheduleShape {
    /// Every random choice of the run derives from it.
    pub seed: u64,
    /// Terminals in the fleet.
    pub terminals: usize,
    /// Sales each terminal records.
    pub sales_per_terminal: u32,
    /// `cloud serve` processes sharing the database.
    pub cloud_instances: usize,
    /// Fault families to draw from.
    pub faults: FaultMode,
    /// Backoff cap of the terminals, in ms: the outage is scheduled to outlast it.
    pub backoff_cap_ms: u64,
    /// How long a terminal's whole attempt budget lasts, in ms: the outage lasts at least
    /// [`OUTAGE_BUDGETS`] times as long, so a run proves that an outage never parks a sale.
    pub attempt_budget_ms: u64,
}

/// An outage lasts at least this many attempt budgets.
pub const OUTAGE_BUDGETS: u64 = 4;

/// Every fault of one run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FaultSchedule {
    /// What the schedule was drawn for.
    pub shape: ScheduleShape,
    /// One plan per terminal, by index.
    pub terminals: Vec<TerminalPlan>,
    /// Sorted by `at_sale`.
    pub cloud: Vec<CloudFault>,
}

impl FaultSchedule {
    /// Derives the schedule from the shape alone. Each terminal draws from its own stream
    /// (seeded from the run seed and its index), so adding a terminal does not reshuffle the
    /// faults of the others.
    pub fn generate(shape: ScheduleShape) -> FaultSchedule {
        let terminals = (0..shape.terminals)
            .map(|i| terminal_plan(&shape, i))
            .collect();
        let mut cloud = Vec::new();
        let total_sales = shape.terminals as u64 * u64::from(shape.sales_per_terminal);
        let mut rng = StdRng::seed_from_u64(shape.seed ^ 0xC10D_F417);
        if total_sales >= 4 {
            if shape.faults.crash() {
                let restarts = if total_sales >= 200 { 2 } else { 1 };
                for _ in 0..restarts {
                    cloud.push(CloudFault::Restart {
                        at_sale: rng.random_range(total_sales / 5..total_sales * 4 / 5),
                        instance: rng.random_range(0..shape.cloud_instances.max(1)),
                    });
                }
            }
            if shape.faults.network() {
                let cap = shape.backoff_cap_ms.max(100);
                cloud.push(CloudFault::Outage {
                    at_sale: rng.random_range(total_sales / 4..total_sales * 3 / 4),
                    duration_ms: (cap * 2 + rng.random_range(0..cap))
                        .max(shape.attempt_budget_ms.saturating_mul(OUTAGE_BUDGETS)),
                });
            }
        }
        cloud.sort_by_key(CloudFault::at_sale);
        FaultSchedule {
            shape,
            terminals,
            cloud,
        }
    }

    /// Number of scheduled faults of each kind (proxy actions other than `pass`, crashes,
    /// restarts, outages), for the report.
    pub fn planned_by_kind(&self) -> std::collections::BTreeMap<String, u64> {
        let mut out = std::collections::BTreeMap::new();
        for t in &self.terminals {
            for a in t.proxy.iter().filter(|a| **a != ProxyAction::Pass) {
                *out.entry(a.kind().to_string()).or_insert(0) += 1;
            }
            *out.entry("terminal_kill".to_string()).or_insert(0) +=
                t.crash_after_sales.len() as u64;
        }
        if self.shape.faults.clone_till() && self.shape.terminals > 0 {
            out.insert("terminal_clone".to_string(), 1);
        }
        for c in &self.cloud {
            let k = match c {
                CloudFault::Restart { .. } => "cloud_kill",
                CloudFault::Outage { .. } => "cloud_outage",
            };
            *out.entry(k.to_string()).or_insert(0) += 1;
        }
        out
    }
}

/// How many proxy decisions to pre-draw per terminal: comfortably more than the requests a
/// run makes (a few per sale batch plus catalog polls), so faults continue throughout.
fn proxy_plan_len(sales: u32) -> usize {
    200 + sales as usize * 3
}

fn terminal_plan(shape: &ScheduleShape, index: usize) -> TerminalPlan {
    let stream = shape
        .seed
        .wrapping_mul(0x9E37_79B9_7F4A_7C15)
        .wrapping_add(index as u64 + 1);
    let mut rng = StdRng::seed_from_u64(stream);
    let mut proxy = Vec::new();
    if shape.faults.network() {
        let len = proxy_plan_len(shape.sales_per_terminal);
        while proxy.len() < len {
            let roll: u32 = rng.random_range(0..100);
            match roll {
                0..=69 => proxy.push(ProxyAction::Pass),
                70..=75 => proxy.push(ProxyAction::DropRequest),
                76..=81 => proxy.push(ProxyAction::DropResponse),
                82..=88 => proxy.push(ProxyAction::Delay {
                    ms: rng.random_range(10..400),
                }),
                89..=92 => proxy.push(ProxyAction::Duplicate),
                93..=96 => proxy.push(ProxyAction::ServerError {
                    status: if rng.random_bool(0.5) { 502 } else { 503 },
                }),
                _ => {
                    // A burst: the next few requests all get 429.
                    let n = rng.random_range(2..6);
                    for _ in 0..n {
                        proxy.push(ProxyAction::RateLimited { retry_after_s: 1 });
                    }
                }
            }
        }
        proxy.truncate(len);
    }
    let mut crash_after_sales = Vec::new();
    if shape.faults.crash() && shape.sales_per_terminal >= 4 {
        let n = if shape.sales_per_terminal >= 100 {
            2
        } else {
            1
        };
        for _ in 0..n {
            crash_after_sales.push(rng.random_range(1..shape.sales_per_terminal));
        }
        crash_after_sales.sort_unstable();
        crash_after_sales.dedup();
    }
    TerminalPlan {
        proxy,
        crash_after_sales,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape(seed: u64, faults: FaultMode) -> ScheduleShape {
        ScheduleShape {
            seed,
            terminals: 4,
            sales_per_terminal: 30,
            cloud_instances: 2,
            faults,
            backoff_cap_ms: 1000,
            attempt_budget_ms: 750,
        }
    }

    #[test]
    fn same_seed_same_schedule_other_seed_other_schedule() {
        let a = FaultSchedule::generate(shape(7, FaultMode::All));
        let b = FaultSchedule::generate(shape(7, FaultMode::All));
        let c = FaultSchedule::generate(shape(8, FaultMode::All));
        assert_eq!(a, b);
        assert_ne!(a, c);
    }

    #[test]
    fn no_faults_means_an_empty_schedule() {
        let s = FaultSchedule::generate(shape(1, FaultMode::None));
        assert!(s.cloud.is_empty());
        assert!(s
            .terminals
            .iter()
            .all(|t| t.proxy.is_empty() && t.crash_after_sales.is_empty()));
    }

    #[test]
    fn all_faults_schedules_every_kind() {
        let s = FaultSchedule::generate(shape(42, FaultMode::All));
        let kinds = s.planned_by_kind();
        for k in [
            "drop_request",
            "drop_response",
            "delay",
            "duplicate",
            "http_5xx",
            "http_429",
            "terminal_kill",
            "cloud_kill",
            "cloud_outage",
        ] {
            assert!(
                kinds.get(k).copied().unwrap_or(0) > 0,
                "{k} missing: {kinds:?}"
            );
        }
        for t in &s.terminals {
            assert!(t.crash_after_sales.iter().all(|&k| (1..30).contains(&k)));
        }
        let outage = s
            .cloud
            .iter()
            .find_map(|c| match c {
                CloudFault::Outage { duration_ms, .. } => Some(*duration_ms),
                _ => None,
            })
            .unwrap_or(0);
        assert!(
            outage >= 750 * OUTAGE_BUDGETS,
            "outage {outage}ms must outlast the attempt budget several times"
        );
        assert!(
            outage > 1000,
            "outage {outage}ms must outlast the 1s backoff cap"
        );
    }

    #[test]
    fn a_terminal_s_plan_does_not_depend_on_fleet_size() {
        let small = FaultSchedule::generate(shape(5, FaultMode::Network));
        let mut big_shape = shape(5, FaultMode::Network);
        big_shape.terminals = 9;
        let big = FaultSchedule::generate(big_shape);
        assert_eq!(small.terminals[..], big.terminals[..4]);
    }

    #[test]
    fn network_only_has_no_kills() {
        let s = FaultSchedule::generate(shape(3, FaultMode::Network));
        let kinds = s.planned_by_kind();
        assert_eq!(kinds.get("terminal_kill").copied().unwrap_or(0), 0);
        assert_eq!(kinds.get("cloud_kill"), None);
    }
}
