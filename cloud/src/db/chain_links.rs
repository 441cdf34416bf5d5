//! Which links of the sales journal's hash chain an ingest transaction can verify, and how
//! they came out (docs/journal-chain.md). Pure: [`super::ledger`] loads the stored neighbours
//! of the events it just stored, asks [`links_to_verify`], and writes the answer in the same
//! transaction.
//!
//! A link joins event `n` of a `pos_id` to event `n - 1`. It is verified by the transaction that
//! stores the later-arriving of its two ends: an event whose predecessor is already stored is
//! verified at once; one whose predecessor is missing waits (a gap), and is verified when the
//! predecessor arrives, by the predecessor's transaction.

use std::collections::{HashMap, HashSet};

use chrono::NaiveDateTime;
use possync_protocol::journal_chain::{canonical_event_bytes, chain_hash, prev_of};
use possync_protocol::EventType;
use uuid::Uuid;

/// A stored event as far as the chain is concerned.
#[derive(Debug, Clone)]
pub struct StoredEnd {
    /// Its id.
    pub cloud_event_id: String,
    /// Its branch.
    pub branch_id: String,
    /// Its `pos_id`.
    pub pos_id: Uuid,
    /// Its id within the `pos_id`.
    pub local_event_id: i64,
    /// `sale`, `refund` or `void`.
    pub event_type: EventType,
    /// As stored (microseconds).
    pub occurred_at: NaiveDateTime,
    /// The stored canonical JSON of the receipt.
    pub payload: String,
    /// What the till sent; `None` for an event recorded before chaining began.
    pub chain_hash: Option<String>,
}

impl StoredEnd {
    /// The canonical bytes of what is stored (so a link verifies the stored sale, not the
    /// request), or why they cannot be formed.
    fn canonical_bytes(&self) -> Result<String, String> {
        let payload: serde_json::Value = serde_json::from_str(&self.payload)
            .map_err(|e| format!("stored payload is not JSON: {e}"))?;
        Ok(canonical_event_bytes(
            self.pos_id,
            self.local_event_id,
            self.event_type,
            self.occurred_at.and_utc(),
            &payload,
        ))
    }
}

/// The verdict on one link.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LinkVerdict {
    /// The later event of the link.
    pub cloud_event_id: String,
    /// Its branch.
    pub branch_id: String,
    /// Its `pos_id`.
    pub pos_id: Uuid,
    /// Its id.
    pub local_event_id: i64,
    /// Whether its `chain_hash` follows from its predecessor and its stored bytes.
    pub intact: bool,
    /// The hash the chain gives.
    pub expected_hash: String,
}

/// The links that the events `stored_now` (just stored, ids of `neighbours`) complete:
/// each chained event's own link when its predecessor is in `neighbours` (or it is the first of
/// its `pos_id`), and the link of each stored successor not yet in `linked`.
///
/// `neighbours` must hold, for every event stored now, the stored events `n - 1`, `n` and
/// `n + 1` of its `pos_id`. Several rows for one `(pos_id, n)` (one `pos_id` delivered under
/// two terminals) are all candidates: a link is intact when any predecessor candidate gives
/// its hash.
pub fn links_to_verify(
    stored_now: &HashSet<String>,
    neighbours: &[StoredEnd],
    linked: &HashSet<String>,
) -> Vec<LinkVerdict> {
    let mut by_key: HashMap<(Uuid, i64), Vec<&StoredEnd>> = HashMap::new();
    for n in neighbours {
        by_key
            .entry((n.pos_id, n.local_event_id))
            .or_default()
            .push(n);
    }
    let mut candidates: Vec<&StoredEnd> = Vec::new();
    let mut seen = HashSet::new();
    for e in neighbours
        .iter()
        .filter(|n| stored_now.contains(&n.cloud_event_id))
    {
        // The last possible id has no successor (ids are capped well below i64::MAX anyway).
        let successors = e
            .local_event_id
            .checked_add(1)
            .and_then(|next| by_key.get(&(e.pos_id, next)))
            .into_iter()
            .flatten()
            .copied();
        for c in std::iter::once(e).chain(successors) {
            if c.chain_hash.is_some()
                && !linked.contains(&c.cloud_event_id)
                && seen.insert(c.cloud_event_id.as_str())
            {
                candidates.push(c);
            }
        }
    }
    candidates.sort_by_key(|c| (c.pos_id, c.local_event_id));
    let mut out = Vec::new();
    for c in candidates {
        let Some(found) = c.chain_hash.as_deref() else {
            continue;
        };
        let prevs: Vec<String> = if c.local_event_id == 1 {
            vec![prev_of(c.pos_id, 1, None)]
        } else {
            match by_key.get(&(c.pos_id, c.local_event_id.saturating_sub(1))) {
                // The predecessor has not arrived: the link waits for it.
                None => continue,
                Some(ps) => ps
                    .iter()
                    .map(|p| prev_of(c.pos_id, c.local_event_id, p.chain_hash.as_deref()))
                    .collect(),
            }
        };
        let bytes = c.canonical_bytes();
        let expected: Vec<String> = prevs
            .iter()
            .map(|prev| match &bytes {
                Ok(b) => chain_hash(prev, b).unwrap_or_else(|e| format!("unverifiable: {e}")),
                Err(e) => format!("unverifiable: {e}"),
            })
            .collect();
        let intact = expected.iter().any(|h| h == found);
        let expected_hash = if intact {
            found.to_string()
        } else {
            expected.into_iter().next().unwrap_or_default()
        };
        out.push(LinkVerdict {
            cloud_event_id: c.cloud_event_id.clone(),
            branch_id: c.branch_id.clone(),
            pos_id: c.pos_id,
            local_event_id: c.local_event_id,
            intact,
            expected_hash,
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use possync_protocol::journal_chain::genesis;

    fn end(pos: Uuid, n: i64, prev: &str, tamper: bool) -> StoredEnd {
        let mut e = StoredEnd {
            cloud_event_id: format!("c{n}"),
            branch_id: "b".into(),
            pos_id: pos,
            local_event_id: n,
            event_type: EventType::Sale,
            occurred_at: "2026-11-29T10:00:00".parse().expect("time"),
            payload: format!(r#"{{"receipt_no":"R-{n}"}}"#),
            chain_hash: None,
        };
        e.chain_hash = Some(chain_hash(prev, &e.canonical_bytes().expect("bytes")).expect("h"));
        if tamper {
            e.payload = format!(r#"{{"receipt_no":"R-{n}x"}}"#);
        }
        e
    }

    fn chain(pos: Uuid, n: i64) -> Vec<StoredEnd> {
        let mut prev = genesis(pos);
        (1..=n)
            .map(|i| {
                let e = end(pos, i, &prev, false);
                prev = e.chain_hash.clone().expect("h");
                e
            })
            .collect()
    }

    fn ids(v: &[&str]) -> HashSet<String> {
        v.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn an_event_whose_predecessor_is_missing_waits_then_both_directions_verify() {
        let pos = Uuid::now_v7();
        let all = chain(pos, 3);
        // 3 arrives first: its predecessor 2 is missing, nothing to verify.
        let got = links_to_verify(&ids(&["c3"]), &[all[2].clone()], &HashSet::new());
        assert!(got.is_empty(), "{got:?}");
        // 2 arrives, 1 is still missing: 2 waits, but 3's link is now complete.
        let got = links_to_verify(
            &ids(&["c2"]),
            &[all[1].clone(), all[2].clone()],
            &HashSet::new(),
        );
        assert_eq!(got.len(), 1);
        assert_eq!((got[0].local_event_id, got[0].intact), (3, true));
        // 1 arrives: its own link (genesis) and 2's.
        let got = links_to_verify(&ids(&["c1"]), &all[..2], &ids(&["c3"]));
        let v: Vec<(i64, bool)> = got.iter().map(|l| (l.local_event_id, l.intact)).collect();
        assert_eq!(v, vec![(1, true), (2, true)]);
    }

    #[test]
    fn a_changed_stored_event_breaks_its_own_link_only() {
        let pos = Uuid::now_v7();
        let mut all = chain(pos, 3);
        let h1 = all[0].chain_hash.clone().expect("h");
        all[1] = end(pos, 2, &h1, true);
        let got = links_to_verify(&ids(&["c1", "c2", "c3"]), &all, &HashSet::new());
        let v: Vec<(i64, bool)> = got.iter().map(|l| (l.local_event_id, l.intact)).collect();
        assert_eq!(v, vec![(1, true), (2, false), (3, true)]);
    }

    #[test]
    fn an_unchained_predecessor_means_the_chain_starts_at_the_genesis() {
        let pos = Uuid::now_v7();
        let mut legacy = end(pos, 4, &genesis(pos), false);
        legacy.chain_hash = None;
        let first = end(pos, 5, &genesis(pos), false);
        let got = links_to_verify(&ids(&["c5"]), &[legacy, first], &HashSet::new());
        assert_eq!(got.len(), 1);
        assert!(got[0].intact);
    }
}
