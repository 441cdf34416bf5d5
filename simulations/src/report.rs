//! The run report: JSON for machines (`--report PATH`) and a short summary for people.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::catalog_churn::{CatalogComparison, ChurnCounts};
use crate::fault_schedule::FaultSchedule;
use crate::ledger_audit::{AuditFindings, SaleCounts};

/// Per-terminal outcome.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TerminalReport {
    /// Position in the fleet (0-based).
    pub index: usize,
    /// Cloud-issued terminal id.
    pub terminal_id: String,
    /// Its branch.
    pub branch_id: String,
    /// Receipts `POST /sales` returned.
    pub sales_acknowledged: u64,
    /// Rows in its `sync_journal`.
    pub journal_rows: u64,
    /// Rows `synced`.
    pub synced: u64,
    /// Rows left in `needs_attention`.
    pub needs_attention: u64,
    /// Σ (attempts − 1) over the journal: deliveries beyond the first.
    pub retries: u64,
    /// kill -9 + restart cycles of its daemon.
    pub kills: u32,
    /// Its catalog against its branch's truth.
    pub catalog: CatalogComparison,
    /// The daemon's `POST /reconcile {"mode":"verify"}` answer at the end, if it gave one.
    pub reconcile_verify: Option<serde_json::Value>,
    /// What this terminal's proxy did, by kind.
    pub proxy: BTreeMap<String, u64>,
}

/// The misbehaving terminal's outcome (`--abusive-terminal`).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct AbuseReport {
    /// Cloud-issued id of the abusive terminal.
    pub terminal_id: String,
    /// Requests it sent.
    pub requests: u64,
    /// Answered 200.
    pub status_200: u64,
    /// Answered 429.
    pub status_429: u64,
    /// Answered anything else.
    pub other_status: u64,
    /// No answer at all.
    pub transport_errors: u64,
    /// 429 answers that carried a `Retry-After` header.
    pub retry_after_seen: u64,
    /// The first `Retry-After` value seen, in seconds.
    pub first_retry_after_s: Option<u64>,
}

/// Wall-clock time per phase, in milliseconds.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Timings {
    /// Database, cloud processes, catalog, enrollment, daemons.
    pub setup_ms: u64,
    /// From the first sale to the last acknowledged one.
    pub selling_ms: u64,
    /// From the end of the faults until every journal settled.
    pub quiescence_ms: u64,
    /// Until every catalog matched its branch.
    pub catalog_convergence_ms: u64,
    /// Reading the ledgers and comparing.
    pub audit_ms: u64,
    /// The whole run.
    pub total_ms: u64,
}

/// Everything a run found.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunReport {
    /// The run's seed (replay with it).
    pub seed: u64,
    /// Terminals in the fleet.
    pub terminals: usize,
    /// Branches they are spread over.
    pub branches: usize,
    /// Sales each terminal recorded.
    pub sales_per_terminal: u32,
    /// `cloud serve` processes.
    pub cloud_instances: usize,
    /// `none`, `network`, `crash` or `all`.
    pub faults_mode: String,
    /// Sales created, in the cloud, lost, duplicated, crossing branches (sales, plus other
    /// branches' catalog entities found on terminals), left needing attention.
    #[serde(flatten)]
    pub counts: SaleCounts,
    /// Rows that had exhausted their attempts during the faults and were sent again by the
    /// harness acting as operator (`POST /outbox/retry {"all": true}`), up to three rounds.
    pub needs_attention_released_by_operator: u64,
    /// Deliveries beyond the first, summed over the journals.
    pub retries: u64,
    /// How long one terminal's whole attempt budget lasts (sum of its backoff ceilings), ms.
    pub attempt_budget_ms: u64,
    /// The longest cloud outage scheduled, ms: several attempt budgets, and still no sale may
    /// need an operator.
    pub longest_outage_ms: u64,
    /// Terminals whose catalog equals their branch's truth.
    pub catalog_converged_terminals: u64,
    /// Terminals whose catalog does not.
    pub catalog_unconverged_terminals: u64,
    /// Faults actually injected, by kind (proxy actions taken, kills, restarts, outages).
    pub faults_injected: BTreeMap<String, u64>,
    /// Faults the schedule planned, by kind (proxy plans are longer than most runs need).
    pub faults_planned: BTreeMap<String, u64>,
    /// Catalog changes made while the terminals sold.
    pub catalog_changes: ChurnCounts,
    /// The row-by-row comparison.
    pub audit: AuditFindings,
    /// The misbehaving terminal, when `--abusive-terminal`.
    pub abuse: Option<AbuseReport>,
    /// Time per phase.
    pub timings: Timings,
    /// One entry per terminal.
    pub per_terminal: Vec<TerminalReport>,
    /// Set when the run itself broke (e.g. quiescence deadline), besides the audit.
    pub errors: Vec<String>,
    /// The full fault schedule, for replay.
    pub schedule: FaultSchedule,
    /// Where logs and terminal databases of this run are.
    pub run_dir: String,
    /// The verdict ([`RunReport::verdict`]).
    pub passed: bool,
}

impl RunReport {
    /// Whether the run passes: a clean audit, every catalog converged, and no run error. For
    /// the abusive scenario also: the abuser saw 429s.
    pub fn verdict(&self) -> bool {
        self.audit.clean()
            && self.counts.needs_attention == 0
            && self.needs_attention_released_by_operator == 0
            && self.catalog_unconverged_terminals == 0
            && self.errors.is_empty()
            && self.abuse.as_ref().is_none_or(|a| a.status_429 > 0)
    }

    /// The human summary printed on stdout.
    pub fn summary(&self) -> String {
        let mut s = String::new();
        let line = |s: &mut String, k: &str, v: String| s.push_str(&format!("  {k:<28} {v}\n"));
        s.push_str(&format!(
            "possync simulation — seed {} · {} terminals × {} branches × {} sales · faults {} · {} cloud instance(s)\n",
            self.seed, self.terminals, self.branches, self.sales_per_terminal, self.faults_mode, self.cloud_instances
        ));
        line(
            &mut s,
            "sales_created",
            self.counts.sales_created.to_string(),
        );
        line(
            &mut s,
            "sales_in_cloud",
            self.counts.sales_in_cloud.to_string(),
        );
        line(&mut s, "lost", self.counts.lost.to_string());
        line(&mut s, "duplicated", self.counts.duplicated.to_string());
        line(&mut s, "cross_branch", self.counts.cross_branch.to_string());
        line(
            &mut s,
            "needs_attention",
            self.counts.needs_attention.to_string(),
        );
        line(
            &mut s,
            "chain_breaks",
            format!(
                "{} ({} links verified offline over the exports)",
                self.audit.chain_breaks, self.audit.chain_links_verified
            ),
        );
        line(
            &mut s,
            "longest outage",
            format!(
                "{} ms ({:.1} × the {} ms attempt budget)",
                self.longest_outage_ms,
                self.longest_outage_ms as f64 / self.attempt_budget_ms.max(1) as f64,
                self.attempt_budget_ms
            ),
        );
        line(
            &mut s,
            "needs_attention (operator)",
            format!(
                "{} released by operator retry",
                self.needs_attention_released_by_operator
            ),
        );
        line(&mut s, "retries", self.retries.to_string());
        line(
            &mut s,
            "catalog converged",
            format!(
                "{}/{} terminals",
                self.catalog_converged_terminals,
                self.catalog_converged_terminals + self.catalog_unconverged_terminals
            ),
        );
        line(
            &mut s,
            "catalog changes",
            format!(
                "{} upserts, {} deletes",
                self.catalog_changes.upserts, self.catalog_changes.deletes
            ),
        );
        let faults: Vec<String> = self
            .faults_injected
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        line(&mut s, "faults injected", faults.join(" "));
        if let Some(a) = &self.abuse {
            line(
                &mut s,
                "abusive terminal",
                format!(
                    "{} requests: {} ok, {} × 429 ({} with Retry-After)",
                    a.requests, a.status_200, a.status_429, a.retry_after_seen
                ),
            );
        }
        let t = &self.timings;
        line(
            &mut s,
            "timings (ms)",
            format!(
                "setup {} · selling {} · quiescence {} · catalog {} · audit {} · total {}",
                t.setup_ms,
                t.selling_ms,
                t.quiescence_ms,
                t.catalog_convergence_ms,
                t.audit_ms,
                t.total_ms
            ),
        );
        for e in &self.errors {
            line(&mut s, "error", e.clone());
        }
        for e in &self.audit.examples {
            line(&mut s, "finding", e.clone());
        }
        if !self.passed {
            line(&mut s, "logs and terminal data", self.run_dir.clone());
        }
        s.push_str(&format!(
            "  verdict: {}  (replay: simulations run --terminals {} --branches {} --sales {} --faults {} --seed {} --cloud-instances {})\n",
            if self.passed { "PASS" } else { "FAIL" },
            self.terminals, self.branches, self.sales_per_terminal, self.faults_mode, self.seed, self.cloud_instances
        ));
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fault_schedule::{FaultMode, ScheduleShape};

    fn report() -> RunReport {
        let shape = ScheduleShape {
            seed: 1,
            terminals: 1,
            sales_per_terminal: 1,
            cloud_instances: 1,
            faults: FaultMode::None,
            backoff_cap_ms: 1000,
            attempt_budget_ms: 750,
        };
        RunReport {
            seed: 1,
            terminals: 1,
            branches: 1,
            sales_per_terminal: 1,
            cloud_instances: 1,
            faults_mode: "none".into(),
            counts: SaleCounts {
                sales_created: 1,
                sales_in_cloud: 1,
                ..SaleCounts::default()
            },
            needs_attention_released_by_operator: 0,
            retries: 0,
            attempt_budget_ms: 750,
            longest_outage_ms: 0,
            catalog_converged_terminals: 1,
            catalog_unconverged_terminals: 0,
            faults_injected: BTreeMap::new(),
            faults_planned: BTreeMap::new(),
            catalog_changes: ChurnCounts::default(),
            audit: AuditFindings {
                counts: SaleCounts {
                    sales_created: 1,
                    sales_in_cloud: 1,
                    ..SaleCounts::default()
                },
                ..Default::default()
            },
            abuse: None,
            timings: Timings::default(),
            per_terminal: vec![],
            errors: vec![],
            schedule: FaultSchedule::generate(shape),
            run_dir: "/tmp/x".into(),
            passed: false,
        }
    }

    #[test]
    fn a_clean_run_passes_and_each_defect_fails_it() {
        assert!(report().verdict());

        let mut r = report();
        r.audit.counts.lost = 1;
        assert!(!r.verdict(), "a lost sale fails the run");

        let mut r = report();
        r.needs_attention_released_by_operator = 2;
        assert!(
            !r.verdict(),
            "a sale that needed an operator fails the run: no fault here is the sale's own"
        );

        let mut r = report();
        r.catalog_unconverged_terminals = 1;
        assert!(!r.verdict(), "an unconverged catalog fails the run");

        let mut r = report();
        r.errors.push("quiescence".into());
        assert!(!r.verdict(), "a run error fails the run");

        let mut r = report();
        r.abuse = Some(AbuseReport::default());
        assert!(
            !r.verdict(),
            "an abuser that was never limited fails the run"
        );
        r.abuse = Some(AbuseReport {
            status_429: 3,
            ..Default::default()
        });
        assert!(r.verdict());
    }

    #[test]
    fn the_summary_names_every_headline_figure_and_the_replay_command() {
        let mut r = report();
        r.passed = r.verdict();
        let s = r.summary();
        for k in [
            "sales_created",
            "sales_in_cloud",
            "lost",
            "duplicated",
            "cross_branch",
            "needs_attention",
            "retries",
            "catalog converged",
            "faults injected",
            "verdict: PASS",
            "--seed 1",
        ] {
            assert!(s.contains(k), "summary lacks {k}:\n{s}");
        }
    }
}
