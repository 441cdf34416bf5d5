//! Range fingerprints of a branch's catalog view: how a terminal finds catalog drift in
//! O(changed) instead of sending its whole manifest (docs/architecture.md, "Verify").
//!
//! The key space is cut into [`LEAVES`] leaves by the first 12 bits of `SHA-256(key)`, and the
//! leaves are the bottom of a [`FANOUT`]-ary tree of [`LEVELS`] levels below the root
//! (16³ = 4096). A node's fingerprint is the count of live entities under it and the sum,
//! modulo 2²⁵⁶, of their entry digests `SHA-256(key ‖ 0 ‖ version ‖ 0 ‖ hash)`; the wire form
//! is the first 16 bytes of `SHA-256(count ‖ sum)`, hex. Both sides compute the same numbers
//! from the same entities, so equal fingerprints mean equal sets (but for a 2⁻¹²⁸ chance);
//! sums are order-free, so a tree is built in one pass over the entities in any order, and a
//! parent is the sum of its children.
//!
//! Why hashed leaves and not key-ordered ranges: leaf boundaries must be the same on both
//! sides without either knowing the other's keys, and a hash spreads any catalog (ten product
//! types, one million prices) evenly, so a leaf of a 100 000-entity catalog holds ~25 entries.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Children per node.
pub const FANOUT: u32 = 16;
/// Levels below the root; leaves are at this level.
pub const LEVELS: u8 = 3;
/// Number of leaves (`FANOUT^LEVELS`).
pub const LEAVES: u32 = 4096;
/// Most nodes one fingerprint request may ask for (a full level 3 would be 4096).
pub const MAX_NODES_PER_REQUEST: usize = 4096;
/// Most leaves one leaf reconcile may cover.
pub const MAX_LEAVES_PER_RECONCILE: usize = 256;

/// The leaf a key belongs to: the first 12 bits of `SHA-256(key)`.
pub fn leaf_of(key: &str) -> u32 {
    let d = Sha256::digest(key.as_bytes());
    (u32::from(d[0]) << 4) | (u32::from(d[1]) >> 4)
}

/// A node of the tree: `level` 0 is the root (index 0), level [`LEVELS`] the leaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct NodeId {
    /// 0 ..= LEVELS.
    pub level: u8,
    /// 0 .. FANOUT^level.
    pub index: u32,
}

impl NodeId {
    /// The root.
    pub const ROOT: NodeId = NodeId { level: 0, index: 0 };

    /// Whether the node exists in the tree.
    pub fn is_valid(self) -> bool {
        self.level <= LEVELS && self.index < FANOUT.pow(u32::from(self.level))
    }

    /// Its children (empty for a leaf).
    pub fn children(self) -> Vec<NodeId> {
        if self.level >= LEVELS {
            return Vec::new();
        }
        (0..FANOUT)
            .map(|c| NodeId {
                level: self.level + 1,
                index: self.index * FANOUT + c,
            })
            .collect()
    }

    /// The leaves under it, as a half-open range of leaf indexes.
    pub fn leaves(self) -> std::ops::Range<u32> {
        let width = FANOUT.pow(u32::from(LEVELS - self.level.min(LEVELS)));
        self.index * width..(self.index + 1) * width
    }

    /// Whether this is a leaf.
    pub fn is_leaf(self) -> bool {
        self.level == LEVELS
    }
}

/// Count and 256-bit sum of entry digests under one leaf (or node).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Accumulator {
    count: u64,
    /// Little-endian 64-bit limbs.
    sum: [u64; 4],
}

impl Accumulator {
    fn add_digest(&mut self, digest: &[u8]) {
        let mut carry = 0u128;
        for (i, limb) in self.sum.iter_mut().enumerate() {
            let mut b = [0u8; 8];
            b.copy_from_slice(&digest[i * 8..i * 8 + 8]);
            let v = u128::from(*limb) + u128::from(u64::from_le_bytes(b)) + carry;
            *limb = v as u64;
            carry = v >> 64;
        }
        self.count = self.count.wrapping_add(1);
    }

    fn merge(&mut self, other: &Accumulator) {
        let mut carry = 0u128;
        for (a, b) in self.sum.iter_mut().zip(other.sum) {
            let v = u128::from(*a) + u128::from(b) + carry;
            *a = v as u64;
            carry = v >> 64;
        }
        self.count = self.count.wrapping_add(other.count);
    }

    /// The wire form: count and the first 16 bytes of `SHA-256(count ‖ sum)`, hex.
    pub fn fingerprint(&self, node: NodeId) -> NodeFingerprint {
        let mut h = Sha256::new();
        h.update(self.count.to_le_bytes());
        for limb in self.sum {
            h.update(limb.to_le_bytes());
        }
        NodeFingerprint {
            level: node.level,
            index: node.index,
            count: self.count,
            fp: hex::encode(&h.finalize()[..16]),
        }
    }
}

/// `SHA-256(key ‖ 0 ‖ version ‖ 0 ‖ hash)`: what one live entity contributes.
pub fn entry_digest(key: &str, version: i64, hash: &str) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(key.as_bytes());
    h.update([0]);
    h.update(version.to_string().as_bytes());
    h.update([0]);
    h.update(hash.as_bytes());
    h.finalize().into()
}

/// The fingerprint tree of one catalog view: one accumulator per leaf.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FingerprintTree {
    leaves: Vec<Accumulator>,
}

impl Default for FingerprintTree {
    fn default() -> Self {
        FingerprintTree {
            leaves: vec![Accumulator::default(); LEAVES as usize],
        }
    }
}

impl FingerprintTree {
    /// Adds one live entity (`key` = `type/id`).
    pub fn add(&mut self, key: &str, version: i64, hash: &str) {
        let leaf = leaf_of(key) as usize;
        self.leaves[leaf].add_digest(&entry_digest(key, version, hash));
    }

    /// The accumulator of any node (the sum of its leaves).
    pub fn accumulator(&self, node: NodeId) -> Accumulator {
        let mut acc = Accumulator::default();
        for leaf in node.leaves() {
            if let Some(l) = self.leaves.get(leaf as usize) {
                acc.merge(l);
            }
        }
        acc
    }

    /// The wire fingerprint of `node`.
    pub fn fingerprint(&self, node: NodeId) -> NodeFingerprint {
        self.accumulator(node).fingerprint(node)
    }

    /// Entities under the whole tree.
    pub fn count(&self) -> u64 {
        self.leaves.iter().map(|l| l.count).sum()
    }
}

/// `POST /v1/pos/catalog/fingerprints` body: the nodes whose fingerprints the terminal wants.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FingerprintRequest {
    /// At most [`MAX_NODES_PER_REQUEST`] valid nodes.
    pub nodes: Vec<NodeId>,
}

/// One node's fingerprint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeFingerprint {
    /// The node's level.
    pub level: u8,
    /// The node's index on its level.
    pub index: u32,
    /// Live entities under the node.
    pub count: u64,
    /// 32 hex digits.
    pub fp: String,
}

impl NodeFingerprint {
    /// The node it describes.
    pub fn node(&self) -> NodeId {
        NodeId {
            level: self.level,
            index: self.index,
        }
    }
}

/// `POST /v1/pos/catalog/fingerprints` answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FingerprintResponse {
    /// The catalog version the fingerprints describe.
    pub catalog_version: i64,
    /// One per requested node, in request order.
    pub nodes: Vec<NodeFingerprint>,
}

/// `POST /v1/pos/catalog/reconcile/leaves` body: a reconcile scoped to leaves instead of a key
/// range. `entries` are everything the terminal holds in those leaves.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LeafReconcileRequest {
    /// Verify or plan.
    pub mode: crate::ReconcileMode,
    /// At most [`MAX_LEAVES_PER_RECONCILE`] leaf indexes.
    pub leaves: Vec<u32>,
    /// What the terminal holds in those leaves.
    pub entries: Vec<crate::ManifestEntry>,
}

/// The nodes to ask about next: the children of every node whose local fingerprint differs
/// from the cloud's (a pure step of the descent). Leaves that differ are returned separately:
/// they are reconciled entry by entry.
pub fn next_step(local: &FingerprintTree, remote: &[NodeFingerprint]) -> (Vec<NodeId>, Vec<u32>) {
    let mut ask = Vec::new();
    let mut leaves = Vec::new();
    for r in remote {
        let node = r.node();
        if !node.is_valid() || local.fingerprint(node) == *r {
            continue;
        }
        if node.is_leaf() {
            leaves.push(node.index);
        } else {
            ask.extend(node.children());
        }
    }
    (ask, leaves)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn tree_shape() {
        assert_eq!(FANOUT.pow(u32::from(LEVELS)), LEAVES);
        assert_eq!(NodeId::ROOT.leaves(), 0..LEAVES);
        assert_eq!(NodeId::ROOT.children().len(), 16);
        let leaf = NodeId {
            level: 3,
            index: 4095,
        };
        assert!(leaf.is_valid() && leaf.is_leaf() && leaf.children().is_empty());
        assert!(!NodeId {
            level: 3,
            index: 4096
        }
        .is_valid());
        assert!(!NodeId { level: 4, index: 0 }.is_valid());
        assert_eq!(NodeId { level: 1, index: 2 }.leaves(), 512..768);
    }

    fn tree(entries: &[(String, i64, String)]) -> FingerprintTree {
        let mut t = FingerprintTree::default();
        for (k, v, h) in entries {
            t.add(k, *v, h);
        }
        t
    }

    proptest! {
        /// Order never matters, and any single change (edit, version, removal, addition)
        /// changes the root and exactly the path down to its leaf.
        #[test]
        fn fingerprints_see_every_change_and_only_where_it_is(
            n in 1usize..200, pick in any::<prop::sample::Index>(), kind in 0u8..4, seed in any::<u64>()
        ) {
            let entries: Vec<(String, i64, String)> = (0..n)
                .map(|i| (format!("product/p{seed}-{i}"), i as i64 + 1, format!("h{i}")))
                .collect();
            let base = tree(&entries);
            let mut rev = entries.clone();
            rev.reverse();
            prop_assert_eq!(&tree(&rev), &base);

            let i = pick.index(n);
            let mut changed = entries.clone();
            let key = changed[i].0.clone();
            match kind {
                0 => changed[i].2.push('x'),
                1 => changed[i].1 += 1000,
                2 => { changed.remove(i); }
                _ => changed.push((format!("{key}-extra"), 1, "h".into())),
            }
            let other = tree(&changed);
            prop_assert_ne!(other.fingerprint(NodeId::ROOT), base.fingerprint(NodeId::ROOT));
            let leaf = if kind == 3 { leaf_of(&format!("{key}-extra")) } else { leaf_of(&key) };
            // walking down from the root finds exactly that leaf
            let mut ask = vec![NodeId::ROOT];
            let mut found = Vec::new();
            while !ask.is_empty() {
                let remote: Vec<NodeFingerprint> = ask.iter().map(|n| other.fingerprint(*n)).collect();
                let (next, leaves) = next_step(&base, &remote);
                found.extend(leaves);
                ask = next;
            }
            prop_assert_eq!(found, vec![leaf]);
        }
    }
}
