//! Fingerprint trees of branch catalog views, kept in memory per catalog version.
//!
//! A verify must not rescan the catalog for every terminal: the tree of a branch's view at
//! catalog version `v` is built once (one read of `(type, id, version, hash)` of its live
//! entities) and then answers every fingerprint request of that branch until the catalog
//! moves on. Entries are keyed by version, so an instance never serves a stale tree, however
//! many instances share the database: a request reads the current version first (one indexed
//! row) and rebuilds when it differs. Memory: 4 096 leaves × 40 bytes = 160 KiB per view,
//! at most [`FingerprintCache::CAPACITY`] views (the least recently used goes first).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use possync_protocol::fingerprint::FingerprintTree;

/// One branch view's tree at one catalog version.
#[derive(Debug)]
pub struct CachedTree {
    /// The catalog version the tree describes.
    pub version: i64,
    /// The tree.
    pub tree: FingerprintTree,
}

#[derive(Default)]
struct Slots {
    trees: HashMap<String, (Arc<CachedTree>, u64)>,
    tick: u64,
}

/// The per-instance cache.
#[derive(Default)]
pub struct FingerprintCache {
    slots: Mutex<Slots>,
}

impl FingerprintCache {
    /// Branch views held at most (~10 MiB).
    pub const CAPACITY: usize = 64;

    /// The tree of `branch` if one is held for exactly `version`.
    pub fn get(&self, branch: &str, version: i64) -> Option<Arc<CachedTree>> {
        let mut g = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        g.tick += 1;
        let tick = g.tick;
        match g.trees.get_mut(branch) {
            Some((t, used)) if t.version == version => {
                *used = tick;
                Some(t.clone())
            }
            _ => None,
        }
    }

    /// Keeps `tree` for `branch` (replacing an older version), evicting the least recently
    /// used view when full.
    pub fn put(&self, branch: &str, tree: Arc<CachedTree>) {
        let mut g = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        g.tick += 1;
        let tick = g.tick;
        if !g.trees.contains_key(branch) && g.trees.len() >= Self::CAPACITY {
            if let Some(oldest) = g
                .trees
                .iter()
                .min_by_key(|(_, (_, used))| *used)
                .map(|(b, _)| b.clone())
            {
                g.trees.remove(&oldest);
            }
        }
        match g.trees.get(branch) {
            // Never replace a newer tree by an older one (two requests raced a change).
            Some((held, _)) if held.version > tree.version => {}
            _ => {
                g.trees.insert(branch.to_string(), (tree, tick));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tree(version: i64) -> Arc<CachedTree> {
        Arc::new(CachedTree {
            version,
            tree: FingerprintTree::default(),
        })
    }

    #[test]
    fn serves_only_the_exact_version_and_evicts_the_least_recently_used() {
        let c = FingerprintCache::default();
        c.put("b1", tree(5));
        assert!(c.get("b1", 5).is_some());
        assert!(c.get("b1", 6).is_none(), "a newer catalog needs a new tree");
        c.put("b1", tree(4));
        assert!(
            c.get("b1", 5).is_some(),
            "an older tree never replaces a newer one"
        );
        for i in 0..FingerprintCache::CAPACITY {
            c.put(&format!("x{i}"), tree(1));
            assert!(c.get("b1", 5).is_some(), "b1 stays recently used");
        }
        assert!(
            c.get("x0", 1).is_none(),
            "the least recently used view went"
        );
    }
}
