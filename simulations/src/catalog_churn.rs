//! The catalog under the terminals' feet: an initial catalog (global products plus
//! branch-scoped prices), then a seeded stream of upserts and deletes through the cloud's CLI
//! while sales flow, and at the end the check that every terminal holds exactly its branch's
//! truth.
//!
//! The truth is read from the cloud's snapshot route with a token of the branch, directly
//! (not through a fault proxy), and compared entity by entity — type, id, version and hash —
//! with the terminal's `catalog_entities`.

use std::collections::BTreeSet;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use crate::cloud_cluster::{CatalogAdmin, CloudCluster};
use crate::sale_script::{product_id, product_price, PRODUCTS};
use crate::terminal_fleet::CatalogRow;
use crate::SimError;

/// Branch-scoped price entities per branch.
const PRICES_PER_BRANCH: usize = 5;

/// Catalog changes made during a run.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ChurnCounts {
    /// Entities created or replaced.
    pub upserts: u64,
    /// Entities tombstoned.
    pub deletes: u64,
    /// Changes the cloud did not take (e.g. every instance down at that moment).
    pub failed: u64,
}

fn product_data(i: usize, price: i64) -> serde_json::Value {
    serde_json::json!({
        "sku": format!("SKU-{i:04}"),
        "barcode": format!("40000000{i:04}"),
        "name": format!("Product {i}"),
        "price_minor": price,
        "currency": "EUR",
    })
}

fn price_id(branch: &str, i: usize) -> String {
    format!("{branch}-{}", product_id(i))
}

fn price_data(i: usize, price: i64) -> serde_json::Value {
    serde_json::json!({"product_id": product_id(i), "price_minor": price, "currency": "EUR"})
}

/// Loads the initial catalog — `PRODUCTS` global products and a few prices per branch — in
/// one `cloud catalog import` of JSON lines (written under `dir`). Returns the entity count.
pub async fn seed_catalog(
    cloud: &CloudCluster,
    branches: &[String],
    dir: &std::path::Path,
) -> Result<u64, SimError> {
    let mut lines = Vec::new();
    for i in 0..PRODUCTS {
        lines.push(
            serde_json::json!({"type": "product", "id": product_id(i), "branch_id": null,
            "data": product_data(i, product_price(i))}),
        );
    }
    for b in branches {
        for i in 0..PRICES_PER_BRANCH {
            lines.push(
                serde_json::json!({"type": "price", "id": price_id(b, i), "branch_id": b,
                "data": price_data(i, product_price(i) + 10)}),
            );
        }
    }
    let file = dir.join("catalog-seed.jsonl");
    let body: String = lines.iter().map(|l| format!("{l}\n")).collect();
    std::fs::write(&file, body).map_err(|e| SimError::Io(format!("{}: {e}", file.display())))?;
    cloud.catalog_import(&file).await?;
    Ok(lines.len() as u64)
}

/// The admin's seeded change stream.
pub struct CatalogChurn {
    rng: StdRng,
    branches: Vec<String>,
    deleted: BTreeSet<usize>,
    /// What the stream did so far.
    pub counts: ChurnCounts,
}

impl CatalogChurn {
    /// A stream derived from the run seed.
    pub fn new(seed: u64, branches: Vec<String>) -> CatalogChurn {
        CatalogChurn {
            rng: StdRng::seed_from_u64(seed ^ 0xCA7A_1064),
            branches,
            deleted: BTreeSet::new(),
            counts: ChurnCounts::default(),
        }
    }

    /// Makes one change through the admin HTTP route: reprice a product, reprice a branch
    /// price, delete a product, or bring a deleted one back. A failure is counted, not fatal
    /// (an instance may be restarting; the catalog check at the end is what matters).
    pub async fn step(&mut self, cloud: &CatalogAdmin) {
        let roll = self.rng.random_range(0..10);
        let i = self.rng.random_range(0..PRODUCTS);
        let price = self.rng.random_range(50..2000);
        let res = if roll < 5 {
            self.deleted.remove(&i);
            self.counts.upserts += 1;
            cloud
                .admin_upsert("product", &product_id(i), None, &product_data(i, price))
                .await
        } else if roll < 8 && !self.branches.is_empty() {
            let b = self.branches[self.rng.random_range(0..self.branches.len())].clone();
            let j = self.rng.random_range(0..PRICES_PER_BRANCH);
            self.counts.upserts += 1;
            cloud
                .admin_upsert("price", &price_id(&b, j), Some(&b), &price_data(j, price))
                .await
        } else if self.deleted.insert(i) {
            self.counts.deletes += 1;
            cloud.admin_delete("product", &product_id(i)).await
        } else {
            self.deleted.remove(&i);
            self.counts.upserts += 1;
            cloud
                .admin_upsert("product", &product_id(i), None, &product_data(i, price))
                .await
        };
        if let Err(e) = res {
            self.counts.failed += 1;
            tracing::warn!(error = %e, "catalog change failed");
        }
    }
}

/// The catalog a branch should see, read page by page from `GET /v1/pos/catalog/snapshot`.
pub async fn branch_truth(cloud_url: &str, token: &str) -> Result<Vec<CatalogRow>, SimError> {
    let client = reqwest::Client::new();
    let mut cursor: Option<String> = None;
    let mut out = Vec::new();
    loop {
        let mut req = client
            .get(format!("{cloud_url}/v1/pos/catalog/snapshot"))
            .bearer_auth(token)
            .query(&[("limit", "1000")]);
        if let Some(c) = &cursor {
            req = req.query(&[("cursor", c.as_str())]);
        }
        let resp = req
            .send()
            .await
            .map_err(|e| SimError::Http(e.to_string()))?;
        if resp.status().as_u16() == 429 {
            tokio::time::sleep(std::time::Duration::from_secs(1)).await;
            continue;
        }
        if !resp.status().is_success() {
            return Err(SimError::Http(format!("snapshot: {}", resp.status())));
        }
        let page: possync_protocol::SnapshotPage = resp
            .json()
            .await
            .map_err(|e| SimError::Http(e.to_string()))?;
        out.extend(
            page.entities
                .into_iter()
                .filter(|e| !e.deleted)
                .map(|e| CatalogRow {
                    entity_type: e.entity_type,
                    id: e.id,
                    version: e.version,
                    hash: e.hash,
                    branch_id: e.branch_id,
                }),
        );
        match page.next_cursor {
            Some(c) => cursor = Some(c),
            None => break,
        }
    }
    out.sort();
    Ok(out)
}

/// How one terminal's catalog compares with its branch's truth.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CatalogComparison {
    /// Live entities in the terminal's SQLite catalog.
    pub entities_terminal: u64,
    /// Entities the branch's snapshot lists.
    pub entities_truth: u64,
    /// Keys whose version/hash differ, or present on one side only.
    pub drift: u64,
    /// Entities scoped to another branch found on the terminal.
    pub foreign_branch_entities: u64,
    /// Upserts + deletes the daemon's own `reconcile verify` reported at the end (`None` if
    /// it gave no answer).
    pub reconcile_drift: Option<u64>,
    /// No drift, no foreign entity, and the daemon's own verify agreed.
    pub converged: bool,
}

/// Compares a terminal's live rows with the truth of its `branch`.
pub fn compare_catalog(
    terminal: &[CatalogRow],
    truth: &[CatalogRow],
    branch: &str,
) -> CatalogComparison {
    let key = |r: &CatalogRow| {
        (
            r.entity_type.clone(),
            r.id.clone(),
            r.version,
            r.hash.clone(),
        )
    };
    let t: BTreeSet<_> = terminal.iter().map(key).collect();
    let w: BTreeSet<_> = truth.iter().map(key).collect();
    let drift = t.symmetric_difference(&w).count() as u64;
    let foreign = terminal
        .iter()
        .filter(|r| r.branch_id.as_deref().is_some_and(|b| b != branch))
        .count() as u64;
    CatalogComparison {
        entities_terminal: terminal.len() as u64,
        entities_truth: truth.len() as u64,
        drift,
        foreign_branch_entities: foreign,
        reconcile_drift: None,
        converged: drift == 0 && foreign == 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(id: &str, v: i64, branch: Option<&str>) -> CatalogRow {
        CatalogRow {
            entity_type: "product".into(),
            id: id.into(),
            version: v,
            hash: format!("h{v}"),
            branch_id: branch.map(str::to_string),
        }
    }

    #[test]
    fn equal_catalogs_converge() {
        let a = vec![row("a", 1, None), row("b", 2, Some("b1"))];
        let c = compare_catalog(&a, &a, "b1");
        assert!(c.converged);
        assert_eq!(c.drift, 0);
    }

    #[test]
    fn stale_missing_and_foreign_rows_do_not() {
        let truth = vec![row("a", 2, None), row("b", 2, None)];
        let term = vec![row("a", 1, None), row("x", 5, Some("b9"))];
        let c = compare_catalog(&term, &truth, "b1");
        assert!(!c.converged);
        assert_eq!(c.drift, 4);
        assert_eq!(c.foreign_branch_entities, 1);
    }

    #[test]
    fn seeded_data_is_stable() {
        assert_eq!(product_data(3, 10), product_data(3, 10));
        assert_eq!(price_id("b1", 2), "b1-p-0002");
    }
}
