//! The verdict: every terminal's journal against the cloud's `sales_events`, row by row.
//!
//! Three sources are compared. The *acknowledged* sales (the receipts `POST /sales` returned,
//! i.e. what the till was promised is durable), each terminal's *journal* (`sync_journal`),
//! and the cloud's *ledger* (`sales_events`, read straight from PostgreSQL, not through the
//! API under test). A sale is lost if it was acknowledged or journaled and the cloud lacks it;
//! duplicated if the cloud holds its key or its receipt more than once; crossing if the cloud
//! filed it under a branch other than its terminal's.

use std::collections::{BTreeMap, BTreeSet};

use diesel::sql_types::{BigInt, Text};
use diesel::{Connection, PgConnection, QueryableByName, RunQueryDsl};
use serde::{Deserialize, Serialize};

use crate::terminal_fleet::{JournalEntry, Receipt};
use crate::SimError;

/// One row of the cloud's `sales_events`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, QueryableByName)]
pub struct CloudSale {
    #[diesel(sql_type = Text)]
    /// Terminal that sent it.
    pub terminal_id: String,
    #[diesel(sql_type = Text)]
    /// Local database that recorded it.
    pub pos_id: String,
    #[diesel(sql_type = BigInt)]
    /// Its number on that `pos_id`.
    pub local_event_id: i64,
    #[diesel(sql_type = Text)]
    /// Branch the cloud filed it under.
    pub branch_id: String,
    #[diesel(sql_type = Text)]
    /// Receipt number from the payload (unique per scripted sale).
    pub receipt_no: String,
}

/// Reads every row of `sales_events`.
pub async fn read_cloud_sales(db_url: &str) -> Result<Vec<CloudSale>, SimError> {
    let url = db_url.to_string();
    tokio::task::spawn_blocking(move || -> Result<Vec<CloudSale>, SimError> {
        let mut c = PgConnection::establish(&url)
            .map_err(|e| SimError::Postgres(format!("cannot reach {url}: {e}")))?;
        diesel::sql_query(
            "SELECT terminal_id::text AS terminal_id, pos_id::text AS pos_id, \
             local_event_id::bigint AS local_event_id, branch_id::text AS branch_id, \
             receipt_no::text AS receipt_no FROM sales_events",
        )
        .load::<CloudSale>(&mut c)
        .map_err(|e| SimError::Postgres(format!("reading sales_events: {e}")))
    })
    .await
    .map_err(|e| SimError::Postgres(e.to_string()))?
}

/// What one terminal did, as the audit needs it.
#[derive(Debug, Clone, Default)]
pub struct TerminalLedger {
    /// Cloud-issued terminal id.
    pub terminal_id: String,
    /// Branch it is enrolled in.
    pub branch_id: String,
    /// Receipts `POST /sales` acknowledged, with the receipt number sent.
    pub acknowledged: Vec<(Receipt, String)>,
    /// The terminal's `sync_journal` at the end of the run.
    pub journal: Vec<JournalEntry>,
}

/// The headline counts of a run, defined once: the audit finds them and the run's report
/// shows them (both flatten this struct, so the JSON keeps its top-level fields).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SaleCounts {
    /// Receipts the tills acknowledged.
    pub sales_created: u64,
    /// `sales_events` rows of the run's terminals.
    pub sales_in_cloud: u64,
    /// Acknowledged or journaled sales the cloud lacks.
    pub lost: u64,
    /// Extra copies in the cloud (same key, or same receipt under another key).
    pub duplicated: u64,
    /// Cloud rows filed under a branch other than their terminal's (the report adds other
    /// branches' catalog entities found on terminals).
    pub cross_branch: u64,
    /// Journal rows left in `needs_attention`.
    pub needs_attention: u64,
}

/// The audit's counts, plus a few examples of each defect for the report.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditFindings {
    /// The headline counts.
    #[serde(flatten)]
    pub counts: SaleCounts,
    /// Journal rows not `synced` at the end (pending, failed, in flight, needs attention).
    pub unsynced_in_journal: u64,
    /// Acknowledged sales missing from the terminal's own journal (a local durability bug;
    /// also counted in `lost`).
    pub acknowledged_not_journaled: u64,
    /// Journal rows the harness never got a receipt for (e.g. the reply was cut by a kill).
    pub journaled_not_acknowledged: u64,
    /// Cloud rows of a terminal this run did not enroll.
    pub unknown_terminal_rows: u64,
    /// Up to 20 concrete findings, for the summary.
    pub examples: Vec<String>,
    /// Chain breaks: recorded by the cloud on ingest, plus faults found verifying each
    /// branch's `cloud audit export` offline (docs/journal-chain.md). Must be 0.
    #[serde(default)]
    pub chain_breaks: u64,
    /// Links verified offline over the exports.
    #[serde(default)]
    pub chain_links_verified: u64,
}

impl AuditFindings {
    /// Whether the run proved what it must: nothing lost, doubled or crossing.
    pub fn clean(&self) -> bool {
        self.counts.lost == 0
            && self.chain_breaks == 0
            && self.counts.duplicated == 0
            && self.counts.cross_branch == 0
            && self.unknown_terminal_rows == 0
    }

    fn example(&mut self, s: String) {
        if self.examples.len() < 20 {
            self.examples.push(s);
        }
    }
}

type Key = (String, String, i64);

/// Compares the terminals' records with the cloud's ledger.
pub fn audit(terminals: &[TerminalLedger], cloud: &[CloudSale]) -> AuditFindings {
    let mut f = AuditFindings::default();
    let branch_of: BTreeMap<&str, &str> = terminals
        .iter()
        .map(|t| (t.terminal_id.as_str(), t.branch_id.as_str()))
        .collect();

    let mut cloud_keys: BTreeMap<Key, u64> = BTreeMap::new();
    let mut cloud_receipts: BTreeMap<&str, u64> = BTreeMap::new();
    for row in cloud {
        match branch_of.get(row.terminal_id.as_str()) {
            None => {
                f.unknown_terminal_rows += 1;
                f.example(format!(
                    "cloud row of unknown terminal {} ({})",
                    row.terminal_id, row.receipt_no
                ));
                continue;
            }
            Some(b) if *b != row.branch_id => {
                f.counts.cross_branch += 1;
                f.example(format!(
                    "cross-branch: {} of terminal {} (branch {b}) filed under {}",
                    row.receipt_no, row.terminal_id, row.branch_id
                ));
            }
            Some(_) => {}
        }
        f.counts.sales_in_cloud += 1;
        *cloud_keys
            .entry((
                row.terminal_id.clone(),
                row.pos_id.clone(),
                row.local_event_id,
            ))
            .or_insert(0) += 1;
        *cloud_receipts.entry(row.receipt_no.as_str()).or_insert(0) += 1;
    }
    for (k, n) in &cloud_keys {
        if *n > 1 {
            f.counts.duplicated += n - 1;
            f.example(format!("key {k:?} stored {n} times"));
        }
    }
    for (r, n) in &cloud_receipts {
        if *n > 1 {
            f.counts.duplicated += n - 1;
            f.example(format!("receipt {r} stored {n} times under different keys"));
        }
    }

    for t in terminals {
        f.counts.sales_created += t.acknowledged.len() as u64;
        let journal: BTreeSet<(String, i64)> = t
            .journal
            .iter()
            .map(|j| (j.pos_id.clone(), j.local_event_id))
            .collect();
        let acked: BTreeSet<(String, i64)> = t
            .acknowledged
            .iter()
            .map(|(r, _)| (r.pos_id.clone(), r.local_event_id))
            .collect();
        for j in &t.journal {
            if j.status == "needs_attention" {
                f.counts.needs_attention += 1;
            }
            if j.status != "synced" {
                f.unsynced_in_journal += 1;
            }
        }
        let mut expected: BTreeSet<(String, i64)> = journal.clone();
        for a in &acked {
            if !journal.contains(a) {
                f.acknowledged_not_journaled += 1;
                f.example(format!(
                    "terminal {}: acknowledged {a:?} is not in its journal",
                    t.terminal_id
                ));
            }
            expected.insert(a.clone());
        }
        f.journaled_not_acknowledged += journal.difference(&acked).count() as u64;
        for (pos, id) in expected {
            if !cloud_keys.contains_key(&(t.terminal_id.clone(), pos.clone(), id)) {
                f.counts.lost += 1;
                f.example(format!(
                    "lost: terminal {} pos {pos} local_event_id {id}",
                    t.terminal_id
                ));
            }
        }
    }
    f
}

/// Checks every chain: the breaks the cloud recorded on ingest (`sales_chain_links`), then
/// each branch's export verified offline with the protocol's verifier. Adds to `f`.
pub fn audit_chains(f: &mut AuditFindings, recorded_breaks: u64, exports: &[(String, String)]) {
    use possync_protocol::journal_chain::{AuditRecord, ChainVerifier};
    f.chain_breaks += recorded_breaks;
    if recorded_breaks > 0 {
        f.example(format!(
            "{recorded_breaks} chain breaks recorded by the cloud on ingest"
        ));
    }
    for (branch, text) in exports {
        let mut v = ChainVerifier::new();
        for (i, line) in text.lines().enumerate() {
            let checked = serde_json::from_str::<AuditRecord>(line)
                .map_err(|e| e.to_string())
                .and_then(|r| v.check(&r).map_err(|e| e.to_string()));
            if let Err(e) = checked {
                // Gaps are the lost/needs-attention audit's business; a fault here that is
                // not a gap is a chain fault.
                if !e.starts_with("gap") {
                    f.chain_breaks += 1;
                    f.example(format!("branch {branch} export line {}: {e}", i + 1));
                }
                break;
            }
        }
        f.chain_links_verified += v.links_verified;
    }
}

/// Chain breaks the cloud recorded on ingest.
pub async fn read_recorded_breaks(db_url: &str) -> Result<u64, SimError> {
    #[derive(QueryableByName)]
    struct Count {
        #[diesel(sql_type = diesel::sql_types::BigInt)]
        n: i64,
    }
    let url = db_url.to_string();
    tokio::task::spawn_blocking(move || -> Result<u64, SimError> {
        let mut c = PgConnection::establish(&url)
            .map_err(|e| SimError::Postgres(format!("cannot reach {url}: {e}")))?;
        let rows = diesel::sql_query(
            "SELECT count(*)::bigint AS n FROM sales_chain_links WHERE NOT intact",
        )
        .load::<Count>(&mut c)
        .map_err(|e| SimError::Postgres(format!("reading sales_chain_links: {e}")))?;
        Ok(rows.first().map_or(0, |r| u64::try_from(r.n).unwrap_or(0)))
    })
    .await
    .map_err(|e| SimError::Postgres(e.to_string()))?
}

#[cfg(test)]
mod tests {
    use super::*;

    fn receipt(pos: &str, id: i64) -> (Receipt, String) {
        (
            Receipt {
                pos_id: pos.into(),
                local_event_id: id,
            },
            format!("R-{pos}-{id}"),
        )
    }

    fn journal(pos: &str, id: i64, status: &str) -> JournalEntry {
        JournalEntry {
            pos_id: pos.into(),
            local_event_id: id,
            status: status.into(),
            attempts: 1,
        }
    }

    fn cloud(t: &str, pos: &str, id: i64, branch: &str) -> CloudSale {
        CloudSale {
            terminal_id: t.into(),
            pos_id: pos.into(),
            local_event_id: id,
            branch_id: branch.into(),
            receipt_no: format!("R-{pos}-{id}"),
        }
    }

    fn terminal() -> TerminalLedger {
        TerminalLedger {
            terminal_id: "t1".into(),
            branch_id: "b1".into(),
            acknowledged: vec![receipt("p", 1), receipt("p", 2)],
            journal: vec![journal("p", 1, "synced"), journal("p", 2, "synced")],
        }
    }

    #[test]
    fn a_complete_run_is_clean() {
        let f = audit(
            &[terminal()],
            &[cloud("t1", "p", 1, "b1"), cloud("t1", "p", 2, "b1")],
        );
        assert!(f.clean(), "{f:?}");
        assert_eq!((f.counts.sales_created, f.counts.sales_in_cloud), (2, 2));
    }

    #[test]
    fn a_missing_row_is_lost() {
        let f = audit(&[terminal()], &[cloud("t1", "p", 1, "b1")]);
        assert_eq!(f.counts.lost, 1);
        assert!(!f.clean());
    }

    #[test]
    fn an_acknowledged_sale_missing_locally_is_lost_even_if_the_journal_agrees_with_the_cloud() {
        let mut t = terminal();
        t.journal.pop();
        let f = audit(&[t], &[cloud("t1", "p", 1, "b1")]);
        assert_eq!(f.acknowledged_not_journaled, 1);
        assert_eq!(f.counts.lost, 1);
    }

    #[test]
    fn doubled_receipts_and_other_branches_are_caught() {
        let mut twice = cloud("t1", "p", 3, "b1");
        twice.receipt_no = "R-p-2".into();
        let f = audit(
            &[terminal()],
            &[cloud("t1", "p", 1, "b2"), cloud("t1", "p", 2, "b1"), twice],
        );
        assert_eq!(f.counts.cross_branch, 1);
        assert_eq!(f.counts.duplicated, 1);
        assert!(!f.clean());
    }

    #[test]
    fn needs_attention_and_unknown_terminals_are_counted() {
        let mut t = terminal();
        t.journal[1].status = "needs_attention".into();
        let f = audit(
            &[t],
            &[cloud("t1", "p", 1, "b1"), cloud("tX", "q", 1, "b1")],
        );
        assert_eq!(f.counts.needs_attention, 1);
        assert_eq!(f.unsynced_in_journal, 1);
        assert_eq!(f.counts.lost, 1);
        assert_eq!(f.unknown_terminal_rows, 1);
    }
}
