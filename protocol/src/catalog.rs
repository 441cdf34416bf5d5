//! Catalog wire types: entities, snapshot and delta pages, reconcile manifests and plans,
//! and the canonical hash both sides compute over an entity's data.
//!
//! The cloud owns catalog truth. A terminal holds a copy that it keeps current by a snapshot
//! (once) followed by deltas, and that it can verify or repair by reconcile.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::cmp::Ordering;
use std::fmt;

/// Largest `limit` a snapshot or delta page may ask for.
pub const MAX_PAGE_LIMIT: u32 = 1000;
/// Page size used when a request gives no `limit`.
pub const DEFAULT_PAGE_LIMIT: u32 = 500;
/// Default largest number of entries in one reconcile manifest.
pub const DEFAULT_MANIFEST_MAX_ENTRIES: usize = 2000;

/// One catalog document as the cloud serves it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Entity {
    #[serde(rename = "type")]
    /// Entity type, e.g. `product`, `category`, `tax_rate`, `price` (`[a-z][a-z_]*`).
    pub entity_type: String,
    /// Id, unique within its type across all branches.
    pub id: String,
    /// The catalog version of the change that produced this state.
    pub version: i64,
    /// A tombstone: the entity was deleted at `version` (delta pages only).
    pub deleted: bool,
    /// `None` for global entities, `Some(branch)` for entities of one branch.
    pub branch_id: Option<String>,
    /// [`entity_hash`] of `data`; empty data for tombstones hashes `null`.
    pub hash: String,
    /// The document itself; its shape belongs to the type, not to the sync engine.
    pub data: serde_json::Value,
}

impl Entity {
    /// The `type/id` key used by reconcile ranges.
    pub fn key(&self) -> EntityKey {
        EntityKey::new(&self.entity_type, &self.id)
    }
}

/// `GET /v1/pos/catalog/snapshot` page.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SnapshotPage {
    /// The catalog version the snapshot was started at; deltas continue from it.
    pub snapshot_version: i64,
    /// Entities this branch sees in the snapshot, for progress display.
    pub total: i64,
    /// This page, ordered by `(type, id)`.
    pub entities: Vec<Entity>,
    /// Where the next page starts; `None` on the last page.
    pub next_cursor: Option<String>,
}

/// `GET /v1/pos/catalog/delta` page.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeltaPage {
    /// Changes after `since`, in version order, tombstones included.
    pub changes: Vec<Entity>,
    /// The `since` of the next request.
    pub next_since: i64,
    /// Whether more changes are waiting right now.
    pub has_more: bool,
    /// The newest catalog version at the time of the answer.
    pub catalog_version: i64,
}

/// Whether reconcile should only report drift or also return the plan that repairs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ReconcileMode {
    /// Report drift only; change nothing.
    Verify,
    /// Return the plan that repairs the range.
    Plan,
}

/// A half-open key range `(after, through]`; `None` bounds are open.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyRange {
    /// Exclusive lower bound (`type/id`); `None` = from the start.
    pub after: Option<String>,
    /// Inclusive upper bound (`type/id`); `None` = to the end.
    pub through: Option<String>,
}

impl KeyRange {
    /// Whether `key` lies inside the range, comparing bytewise.
    pub fn contains(&self, key: &str) -> bool {
        let above = self
            .after
            .as_deref()
            .is_none_or(|a| key.as_bytes() > a.as_bytes());
        let below = self
            .through
            .as_deref()
            .is_none_or(|t| key.as_bytes() <= t.as_bytes());
        above && below
    }
}

/// What a terminal holds for one entity.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestEntry {
    #[serde(rename = "type")]
    /// Entity type.
    pub entity_type: String,
    /// Entity id.
    pub id: String,
    /// The version the terminal holds.
    pub version: i64,
    /// The hash of the data the terminal holds (recomputed from it, so local edits show).
    pub hash: String,
}

/// `POST /v1/pos/catalog/reconcile` body.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReconcileRequest {
    /// Verify or plan.
    pub mode: ReconcileMode,
    #[serde(default)]
    /// The key range the manifest covers.
    pub range: KeyRange,
    /// What the terminal holds in the range, at most the server's entry limit.
    pub entries: Vec<ManifestEntry>,
}

/// Counts of what reconcile found in the range.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReconcileSummary {
    /// Keys compared (local entries and the cloud's keys in the range).
    pub checked: i64,
    /// Keys equal on both sides.
    pub unchanged: i64,
    /// Entities missing locally or different from the cloud.
    pub upserts: i64,
    /// Local entities the cloud does not hold for this branch.
    pub deletes: i64,
}

/// A key the terminal must delete.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EntityRef {
    #[serde(rename = "type")]
    /// Entity type.
    pub entity_type: String,
    /// Entity id.
    pub id: String,
}

/// The changes that make the terminal's range equal the cloud's truth.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ReconcilePlan {
    /// Entities to store as they are.
    pub upserts: Vec<Entity>,
    /// Keys to remove.
    pub deletes: Vec<EntityRef>,
}

/// `POST /v1/pos/catalog/reconcile` answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReconcileResponse {
    /// The catalog version the plan was computed at.
    pub catalog_version: i64,
    /// The range the answer covers (echoed).
    pub range: KeyRange,
    /// What reconcile found.
    pub summary: ReconcileSummary,
    /// The repair (empty in `verify` mode).
    pub plan: ReconcilePlan,
}

/// A `type/id` key. Types are `[a-z][a-z_]*`, so bytewise order of keys equals `(type, id)`
/// order (`_` sorts after `/`), which lets snapshot pages and reconcile ranges agree.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct EntityKey(String);

impl EntityKey {
    /// The key of `type/id`.
    pub fn new(entity_type: &str, id: &str) -> Self {
        EntityKey(format!("{entity_type}/{id}"))
    }
    /// The key as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl Ord for EntityKey {
    fn cmp(&self, other: &Self) -> Ordering {
        self.0.as_bytes().cmp(other.0.as_bytes())
    }
}
impl PartialOrd for EntityKey {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl fmt::Display for EntityKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Checks an entity type name: 1–32 of `[a-z_]`, starting with a letter.
pub fn valid_entity_type(t: &str) -> bool {
    !t.is_empty()
        && t.len() <= 32
        && t.as_bytes()[0].is_ascii_lowercase()
        && t.bytes().all(|b| b.is_ascii_lowercase() || b == b'_')
}

/// Checks an entity id: 1–128 printable ASCII characters without spaces.
pub fn valid_entity_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 128 && id.bytes().all(|b| b.is_ascii_graphic())
}

/// Checks a branch id: 1–64 of `[a-z0-9_-]`.
pub fn valid_branch_id(b: &str) -> bool {
    !b.is_empty()
        && b.len() <= 64
        && b.bytes()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'_' || c == b'-')
}

/// Writes `value` as canonical JSON: object keys sorted bytewise at every depth, no
/// insignificant whitespace, numbers and strings as serde_json prints them.
///
/// Both sides hash this form, so the hash does not depend on key order or formatting.
pub fn canonical_json(value: &serde_json::Value) -> String {
    let mut out = String::new();
    write_canonical(value, &mut out);
    out
}

fn write_canonical(value: &serde_json::Value, out: &mut String) {
    match value {
        serde_json::Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
            out.push('{');
            for (i, k) in keys.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&serde_json::Value::String(k.clone()).to_string());
                out.push(':');
                if let Some(v) = map.get(k) {
                    write_canonical(v, out);
                }
            }
            out.push('}');
        }
        serde_json::Value::Array(items) => {
            out.push('[');
            for (i, v) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_canonical(v, out);
            }
            out.push(']');
        }
        other => out.push_str(&other.to_string()),
    }
}

/// sha256 hex of [`canonical_json`]`(data)`: the `hash` of an entity.
pub fn entity_hash(data: &serde_json::Value) -> String {
    sha256_hex(canonical_json(data).as_bytes())
}

/// Lower-case hex sha256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    #[test]
    fn canonical_json_sorts_keys_at_every_depth() {
        let v = json!({"b": 1, "a": {"z": [3, {"y": true, "x": null}], "c": "s"}});
        assert_eq!(
            canonical_json(&v),
            r#"{"a":{"c":"s","z":[3,{"x":null,"y":true}]},"b":1}"#
        );
    }

    #[test]
    fn hash_is_sha256_of_canonical_form() {
        // sha256("{}")
        assert_eq!(
            entity_hash(&json!({})),
            "44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a"
        );
    }

    #[test]
    fn key_range_is_half_open_and_bytewise() {
        let r = KeyRange {
            after: Some("product/1".into()),
            through: Some("product/3".into()),
        };
        assert!(!r.contains("product/1"));
        assert!(r.contains("product/2"));
        assert!(r.contains("product/3"));
        assert!(!r.contains("product/4"));
        assert!(KeyRange::default().contains("anything/at-all"));
    }

    #[test]
    fn key_order_matches_type_id_order() {
        let mut keys = [
            EntityKey::new("price_list", "a"),
            EntityKey::new("price", "z"),
            EntityKey::new("price", "a"),
        ];
        keys.sort();
        assert_eq!(keys[0].as_str(), "price/a");
        assert_eq!(keys[1].as_str(), "price/z");
        assert_eq!(keys[2].as_str(), "price_list/a");
    }

    #[test]
    fn identifier_rules() {
        assert!(valid_branch_id("b1"));
        assert!(valid_branch_id("north-side_2"));
        assert!(!valid_branch_id(""));
        assert!(!valid_branch_id("B1"));
        assert!(!valid_branch_id(&"a".repeat(65)));
        assert!(valid_entity_type("tax_rate"));
        assert!(!valid_entity_type("_x"));
        assert!(!valid_entity_type("a-b"));
        assert!(valid_entity_id("sku-123/x"));
        assert!(!valid_entity_id("has space"));
    }

    fn arb_json() -> impl Strategy<Value = serde_json::Value> {
        let leaf = prop_oneof![
            Just(serde_json::Value::Null),
            any::<bool>().prop_map(serde_json::Value::Bool),
            any::<i64>().prop_map(|n| json!(n)),
            "[a-zA-Z0-9 é\"\\\\]{0,8}".prop_map(serde_json::Value::String),
        ];
        leaf.prop_recursive(3, 32, 6, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..6).prop_map(serde_json::Value::Array),
                prop::collection::btree_map("[a-z]{1,4}", inner, 0..6)
                    .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
            ]
        })
    }

    /// JSON as an admin sends it: any finite float written any way serde_json accepts.
    fn arb_json_with_floats() -> impl Strategy<Value = serde_json::Value> {
        let leaf = prop_oneof![
            any::<f64>()
                .prop_filter("JSON has no NaN or infinity", |f| f.is_finite())
                .prop_map(|f| json!(f)),
            any::<u64>().prop_map(|n| json!(n)),
            (any::<i64>(), any::<u8>()).prop_map(|(m, e)| {
                // Decimal text with many digits: parsed by serde_json into an f64.
                let text = format!(
                    "{m}.{:0>width$}",
                    m.unsigned_abs(),
                    width = usize::from(e % 25)
                );
                serde_json::from_str::<serde_json::Value>(&text).unwrap_or(serde_json::Value::Null)
            }),
        ];
        leaf.prop_recursive(2, 16, 4, |inner| {
            prop::collection::btree_map("[a-z]{1,3}", inner, 0..4)
                .prop_map(|m| serde_json::Value::Object(m.into_iter().collect()))
        })
    }

    proptest! {
        #[test]
        fn canonical_json_is_valid_json_equal_to_the_input(v in arb_json()) {
            let text = canonical_json(&v);
            let back: serde_json::Value = serde_json::from_str(&text).expect("canonical form parses");
            prop_assert_eq!(back, v);
        }

        #[test]
        fn hash_ignores_key_order_and_whitespace(v in arb_json()) {
            let pretty = serde_json::to_string_pretty(&v).expect("serialize");
            let reparsed: serde_json::Value = serde_json::from_str(&pretty).expect("parse");
            prop_assert_eq!(entity_hash(&reparsed), entity_hash(&v));
            // canonicalising twice changes nothing
            let once = canonical_json(&v);
            let twice = canonical_json(&serde_json::from_str(&once).expect("parse"));
            prop_assert_eq!(once, twice);
        }

        /// What the cloud serves is its stored canonical text parsed and printed again; the
        /// terminal hashes that. Every float must survive text → value → text unchanged, or
        /// the served hash is not the hash of the served data and reconcile repairs forever.
        #[test]
        fn served_data_hashes_to_the_served_hash(v in arb_json_with_floats()) {
            let stored = canonical_json(&v);
            let hash = entity_hash(&v);
            let served: serde_json::Value = serde_json::from_str(&stored).expect("parse");
            let wire = serde_json::to_string(&served).expect("serialise");
            let at_terminal: serde_json::Value = serde_json::from_str(&wire).expect("parse");
            prop_assert_eq!(entity_hash(&at_terminal), hash);
            prop_assert_eq!(canonical_json(&at_terminal), stored);
        }

        #[test]
        fn different_data_gives_different_hashes(a in arb_json(), b in arb_json()) {
            prop_assume!(a != b);
            prop_assert_ne!(entity_hash(&a), entity_hash(&b));
        }
    }
}
