//! The tamper-evident sales journal: one hash chain per `pos_id`.
//!
//! When a till enqueues a sale it stores, in the same transaction,
//! `chain_hash = SHA-256(prev || canonical_event_bytes)` where `prev` is the 32 raw bytes of
//! the previous event's `chain_hash` (of the same `pos_id`, `local_event_id - 1`), or the
//! [`genesis`] of the `pos_id` for the first chained event. The till sends `chain_hash` with
//! the event; the cloud verifies each link as soon as it holds both ends, and anyone holding
//! an export can verify it offline with [`ChainVerifier`].
//!
//! Everything here is specified byte for byte in `docs/journal-chain.md` so that a third party
//! can re-implement verification; the test vector there is asserted below.
//!
//! What is chained is the sale as a fact: `pos_id`, `local_event_id`, `type`, `occurred_at`,
//! `payload`. Not `terminal_id` or `branch_id`: a sale queued before enrollment is stamped with
//! them later, and carry-over may deliver it under another terminal.

use chrono::{DateTime, SecondsFormat, SubsecRound, Timelike, Utc};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::fmt;
use uuid::Uuid;

use crate::catalog::canonical_json;
use crate::sales::{EventType, SaleEvent};

/// Domain-separation prefix of the genesis hash (and the chain's version).
pub const GENESIS_DOMAIN: &str = "possync-chain-v1";

/// `hex(SHA-256("possync-chain-v1" || pos_id))`, `pos_id` in its lower-case hyphenated ASCII
/// form (36 bytes): the `prev` of the first chained event of a `pos_id`.
pub fn genesis(pos_id: Uuid) -> String {
    let mut h = Sha256::new();
    h.update(GENESIS_DOMAIN.as_bytes());
    h.update(pos_id.hyphenated().to_string().as_bytes());
    hex::encode(h.finalize())
}

/// The instant the chain covers: truncated to the microsecond (what both cloud databases
/// store) and a leap second (`23:59:60.x`) written as the next second's `00.x`.
pub fn canonical_instant(t: DateTime<Utc>) -> DateTime<Utc> {
    let t = t.trunc_subsecs(6);
    let nanos = t.nanosecond();
    if nanos < 1_000_000_000 {
        return t;
    }
    t.with_nanosecond(nanos - 1_000_000_000)
        .and_then(|s| s.checked_add_signed(chrono::Duration::seconds(1)))
        .unwrap_or(t)
}

/// The canonical event bytes: the canonical JSON (keys sorted bytewise, no whitespace; see
/// [`canonical_json`]) of `{"local_event_id", "occurred_at", "payload", "pos_id", "type"}`,
/// `occurred_at` as RFC 3339 UTC with exactly six fractional digits and `Z`
/// (after [`canonical_instant`]), `payload` as the receipt's JSON object.
pub fn canonical_event_bytes(
    pos_id: Uuid,
    local_event_id: i64,
    event_type: EventType,
    occurred_at: DateTime<Utc>,
    payload: &serde_json::Value,
) -> String {
    let body = serde_json::json!({
        "local_event_id": local_event_id,
        "occurred_at": canonical_instant(occurred_at).to_rfc3339_opts(SecondsFormat::Micros, true),
        "payload": payload,
        "pos_id": pos_id.hyphenated().to_string(),
        "type": event_type.as_str(),
    });
    canonical_json(&body)
}

/// Why a chain hash could not be computed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChainHashInvalid {
    /// `prev` (or a stored `chain_hash`) is not 64 lower-case hex digits.
    #[error("not a chain hash (64 lower-case hex digits): {0:?}")]
    NotAHash(String),
    /// The payload could not be turned into JSON.
    #[error("payload is not serialisable: {0}")]
    Payload(String),
}

/// Whether `s` has the form of a chain hash: 64 lower-case hex digits.
pub fn is_chain_hash(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// `hex(SHA-256(raw(prev) || canonical))`, `raw(prev)` being the 32 bytes `prev` spells.
pub fn chain_hash(prev: &str, canonical: &str) -> Result<String, ChainHashInvalid> {
    if !is_chain_hash(prev) {
        return Err(ChainHashInvalid::NotAHash(prev.to_string()));
    }
    let raw = hex::decode(prev).map_err(|_| ChainHashInvalid::NotAHash(prev.to_string()))?;
    let mut h = Sha256::new();
    h.update(&raw);
    h.update(canonical.as_bytes());
    Ok(hex::encode(h.finalize()))
}

/// The `prev` of event `local_event_id` of `pos_id`, given its predecessor
/// (`local_event_id - 1`, same `pos_id`): the predecessor's `chain_hash`, or the [`genesis`]
/// when there is no predecessor (`local_event_id == 1`) or the predecessor was recorded
/// before chaining began (it has no `chain_hash`: the chain starts after it).
pub fn prev_of(pos_id: Uuid, local_event_id: i64, predecessor_chain_hash: Option<&str>) -> String {
    match predecessor_chain_hash {
        Some(h) if local_event_id > 1 => h.to_string(),
        _ => genesis(pos_id),
    }
}

impl SaleEvent {
    /// [`canonical_event_bytes`] of this event.
    pub fn canonical_bytes(&self) -> Result<String, ChainHashInvalid> {
        let payload = serde_json::to_value(&self.payload)
            .map_err(|e| ChainHashInvalid::Payload(e.to_string()))?;
        Ok(canonical_event_bytes(
            self.pos_id,
            self.local_event_id,
            self.event_type,
            self.occurred_at,
            &payload,
        ))
    }

    /// The `chain_hash` this event must carry when `prev` is its predecessor's.
    pub fn expected_chain_hash(&self, prev: &str) -> Result<String, ChainHashInvalid> {
        chain_hash(prev, &self.canonical_bytes()?)
    }
}

/// One journal record of an audit export (`cloud audit export`, one JSON object per line) or
/// of a till's own journal: the chained fields, the chain hash, and where it was stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditRecord {
    /// The local database that recorded the sale.
    pub pos_id: Uuid,
    /// Its id within `pos_id`.
    pub local_event_id: i64,
    /// The terminal it was delivered as (not chained).
    pub terminal_id: Option<Uuid>,
    /// The branch (not chained).
    pub branch_id: Option<String>,
    #[serde(rename = "type")]
    /// Sale, refund or void.
    pub event_type: EventType,
    /// When the sale happened at the till (RFC 3339 UTC, microseconds).
    pub occurred_at: DateTime<Utc>,
    /// The receipt, as stored.
    pub payload: serde_json::Value,
    /// The event's chain hash; `None` for a sale recorded before chaining began.
    pub chain_hash: Option<String>,
    /// The predecessor's chain hash (or the genesis) as the exporter holds it, so that an
    /// export starting in the middle of a chain can be verified: used only for the first
    /// record of a `pos_id` in the file.
    #[serde(default)]
    pub prev_chain_hash: Option<String>,
    /// The cloud's id of the stored sale (exports from the cloud).
    #[serde(default)]
    pub cloud_event_id: Option<Uuid>,
    /// When the cloud stored it (exports from the cloud).
    #[serde(default)]
    pub received_at: Option<DateTime<Utc>>,
}

impl AuditRecord {
    /// [`canonical_event_bytes`] of this record.
    pub fn canonical_bytes(&self) -> String {
        canonical_event_bytes(
            self.pos_id,
            self.local_event_id,
            self.event_type,
            self.occurred_at,
            &self.payload,
        )
    }
}

/// What is wrong with a record of a journal, the first one found.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChainFault {
    /// The record's `chain_hash` does not follow from `prev` and its own bytes: it or its
    /// predecessor was changed after it was chained.
    #[error("chain break at pos_id {pos_id} local_event_id {local_event_id}: chain_hash {found} but the chain gives {expected}")]
    Break {
        /// Its `pos_id`.
        pos_id: Uuid,
        /// Its id.
        local_event_id: i64,
        /// The hash it carries.
        found: String,
        /// The hash its predecessor and bytes give.
        expected: String,
    },
    /// Ids of a `pos_id` are missing between two records.
    #[error("gap in pos_id {pos_id}: local_event_id {from}..={to} missing")]
    Gap {
        /// Its `pos_id`.
        pos_id: Uuid,
        /// First missing id.
        from: i64,
        /// Last missing id.
        to: i64,
    },
    /// A record whose id is not above the previous record of its `pos_id`.
    #[error(
        "pos_id {pos_id}: local_event_id {local_event_id} repeated or out of order (after {after})"
    )]
    OutOfOrder {
        /// Its `pos_id`.
        pos_id: Uuid,
        /// Its id.
        local_event_id: i64,
        /// The previous record's id.
        after: i64,
    },
    /// A record without `chain_hash` after chained records of its `pos_id`: chaining, once
    /// begun, never stops, so its hash was removed.
    #[error(
        "pos_id {pos_id} local_event_id {local_event_id} has no chain_hash after the chain began"
    )]
    Unchained {
        /// Its `pos_id`.
        pos_id: Uuid,
        /// Its id.
        local_event_id: i64,
    },
    /// A `chain_hash` that is not 64 lower-case hex digits.
    #[error("pos_id {pos_id} local_event_id {local_event_id}: {cause}")]
    Malformed {
        /// Its `pos_id`.
        pos_id: Uuid,
        /// Its id.
        local_event_id: i64,
        /// What is malformed.
        cause: ChainHashInvalid,
    },
}

/// Verifies journals record by record: every `pos_id`'s records must come in ascending
/// `local_event_id` order without gaps (records of different `pos_id`s may interleave), each
/// chained record's hash must follow from its predecessor's, and no unchained record may
/// follow a chained one. A `pos_id`'s first record must be id 1 or carry `prev_chain_hash`.
#[derive(Debug, Default)]
pub struct ChainVerifier {
    /// Per `pos_id`: the last record's id and chain hash.
    last: HashMap<Uuid, (i64, Option<String>)>,
    /// Records checked so far.
    pub records: u64,
    /// Chained records whose link verified.
    pub links_verified: u64,
}

impl ChainVerifier {
    /// A verifier that has seen nothing.
    pub fn new() -> Self {
        ChainVerifier::default()
    }

    /// Checks the next record; the first fault is the answer (the state is not advanced).
    pub fn check(&mut self, r: &AuditRecord) -> Result<(), ChainFault> {
        let previous = self.last.get(&r.pos_id);
        if let Some((last_id, _)) = previous {
            if r.local_event_id <= *last_id {
                return Err(ChainFault::OutOfOrder {
                    pos_id: r.pos_id,
                    local_event_id: r.local_event_id,
                    after: *last_id,
                });
            }
            if r.local_event_id != last_id + 1 {
                return Err(ChainFault::Gap {
                    pos_id: r.pos_id,
                    from: last_id + 1,
                    to: r.local_event_id - 1,
                });
            }
        }
        if previous.is_none() && r.local_event_id > 1 && r.prev_chain_hash.is_none() {
            // The journal begins after id 1 and nobody vouched for the predecessor.
            return Err(ChainFault::Gap {
                pos_id: r.pos_id,
                from: 1,
                to: r.local_event_id - 1,
            });
        }
        let Some(found) = &r.chain_hash else {
            if matches!(previous, Some((_, Some(_)))) {
                return Err(ChainFault::Unchained {
                    pos_id: r.pos_id,
                    local_event_id: r.local_event_id,
                });
            }
            self.last.insert(r.pos_id, (r.local_event_id, None));
            self.records += 1;
            return Ok(());
        };
        let prev = match previous {
            Some((_, h)) => prev_of(r.pos_id, r.local_event_id, h.as_deref()),
            None => r
                .prev_chain_hash
                .clone()
                .unwrap_or_else(|| genesis(r.pos_id)),
        };
        let malformed = |cause| ChainFault::Malformed {
            pos_id: r.pos_id,
            local_event_id: r.local_event_id,
            cause,
        };
        if !is_chain_hash(found) {
            return Err(malformed(ChainHashInvalid::NotAHash(found.clone())));
        }
        let expected = chain_hash(&prev, &r.canonical_bytes()).map_err(malformed)?;
        if &expected != found {
            return Err(ChainFault::Break {
                pos_id: r.pos_id,
                local_event_id: r.local_event_id,
                found: found.clone(),
                expected,
            });
        }
        self.last
            .insert(r.pos_id, (r.local_event_id, Some(found.clone())));
        self.records += 1;
        self.links_verified += 1;
        Ok(())
    }

    /// `pos_id`s seen so far.
    pub fn chains(&self) -> usize {
        self.last.len()
    }
}

impl fmt::Display for ChainVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} records, {} chains, {} links verified",
            self.records,
            self.chains(),
            self.links_verified
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sales::{Payment, PaymentMethod, SaleLine, SalePayload, Totals};

    /// The vector printed in `docs/journal-chain.md` (computed there independently with Python).
    pub(crate) fn vector_event(local_event_id: i64) -> SaleEvent {
        SaleEvent {
            terminal_id: Uuid::nil(),
            pos_id: "0192f0c1-7a4e-7b8a-9c3d-5e6f70819203"
                .parse()
                .expect("uuid"),
            local_event_id,
            branch_id: "berlin-1".into(),
            event_type: EventType::Sale,
            occurred_at: "2026-11-29T10:15:30.123456789Z".parse().expect("time"),
            payload: SalePayload {
                receipt_no: format!("R-{local_event_id}"),
                currency: "EUR".into(),
                lines: vec![SaleLine {
                    product_id: "p-1".into(),
                    sku: "SKU1".into(),
                    name: "Kaffee".into(),
                    qty: 2,
                    unit_price_minor: 250,
                    discount_minor: 0,
                    tax_minor: 80,
                    total_minor: 500,
                }],
                totals: Totals {
                    subtotal_minor: 420,
                    tax_minor: 80,
                    total_minor: 500,
                },
                payments: vec![Payment {
                    method: PaymentMethod::Cash,
                    amount_minor: 500,
                }],
            },
            chain_hash: None,
        }
    }

    #[test]
    fn the_documented_test_vector_holds() {
        let e1 = vector_event(1);
        let pos = e1.pos_id;
        assert_eq!(
            genesis(pos),
            "524a163ab0354ad3288ccd6767bef903144ad83bd17da4b24b5e775e9f0e7ba7"
        );
        assert_eq!(
            e1.canonical_bytes().expect("bytes"),
            r#"{"local_event_id":1,"occurred_at":"2026-11-29T10:15:30.123456Z","payload":{"currency":"EUR","lines":[{"discount_minor":0,"name":"Kaffee","product_id":"p-1","qty":2,"sku":"SKU1","tax_minor":80,"total_minor":500,"unit_price_minor":250}],"payments":[{"amount_minor":500,"method":"cash"}],"receipt_no":"R-1","totals":{"subtotal_minor":420,"tax_minor":80,"total_minor":500}},"pos_id":"0192f0c1-7a4e-7b8a-9c3d-5e6f70819203","type":"sale"}"#
        );
        let h1 = e1.expected_chain_hash(&genesis(pos)).expect("h1");
        assert_eq!(
            h1,
            "8a73f06edca2767c618d311e6df81265a7fbdf45ea1a39e7983bf6ba379e47a8"
        );
        let h2 = vector_event(2).expected_chain_hash(&h1).expect("h2");
        assert_eq!(
            h2,
            "d8379a04cdc759e225ab52b3690fa01c21e490c14379e1f7c6c72a5e81b80fae"
        );
    }

    fn record(e: &SaleEvent, chain_hash: Option<String>) -> AuditRecord {
        AuditRecord {
            pos_id: e.pos_id,
            local_event_id: e.local_event_id,
            terminal_id: Some(e.terminal_id),
            branch_id: Some(e.branch_id.clone()),
            event_type: e.event_type,
            occurred_at: e.occurred_at,
            payload: serde_json::to_value(&e.payload).expect("payload"),
            chain_hash,
            prev_chain_hash: None,
            cloud_event_id: None,
            received_at: None,
        }
    }

    /// Records 1..=n chained from the genesis, the first `legacy` of them unchained.
    fn journal(n: i64, legacy: i64) -> Vec<AuditRecord> {
        let mut prev = genesis(vector_event(1).pos_id);
        (1..=n)
            .map(|i| {
                let e = vector_event(i);
                if i <= legacy {
                    return record(&e, None);
                }
                let h = e.expected_chain_hash(&prev).expect("hash");
                prev = h.clone();
                record(&e, Some(h))
            })
            .collect()
    }

    fn first_fault(records: &[AuditRecord]) -> Option<(usize, ChainFault)> {
        let mut v = ChainVerifier::new();
        records
            .iter()
            .enumerate()
            .find_map(|(i, r)| v.check(r).err().map(|f| (i, f)))
    }

    #[test]
    fn an_intact_journal_verifies_and_one_with_legacy_head_too() {
        assert_eq!(first_fault(&journal(5, 0)), None);
        assert_eq!(first_fault(&journal(5, 2)), None);
    }

    #[test]
    fn a_changed_record_breaks_exactly_its_own_link() {
        let mut j = journal(5, 0);
        j[2].payload["receipt_no"] = "R-X".into();
        assert!(matches!(
            first_fault(&j),
            Some((
                2,
                ChainFault::Break {
                    local_event_id: 3,
                    ..
                }
            ))
        ));
        // The next link still verifies against the (unchanged) stored hash of record 3.
        let mut v = ChainVerifier::new();
        for r in &j[..2] {
            v.check(r).expect("head");
        }
        let mut fixed = j[2].clone();
        fixed.payload["receipt_no"] = "R-3".into();
        v.check(&fixed).expect("original");
        v.check(&j[3]).expect("successor");
    }

    #[test]
    fn gaps_order_and_removed_hashes_are_faults() {
        let mut j = journal(5, 0);
        j.remove(2);
        assert!(matches!(
            first_fault(&j),
            Some((2, ChainFault::Gap { from: 3, to: 3, .. }))
        ));
        let mut j = journal(5, 0);
        j.swap(1, 2);
        assert!(matches!(first_fault(&j), Some((1, ChainFault::Gap { .. }))));
        let mut j = journal(5, 0);
        j[3].chain_hash = None;
        assert!(matches!(
            first_fault(&j),
            Some((3, ChainFault::Unchained { .. }))
        ));
        let mut j = journal(3, 0);
        j[1].chain_hash = Some("XYZ".into());
        assert!(matches!(
            first_fault(&j),
            Some((1, ChainFault::Malformed { .. }))
        ));
    }

    #[test]
    fn an_export_starting_mid_chain_verifies_from_its_prev() {
        let j = journal(5, 0);
        let mut window = j[2..].to_vec();
        assert!(matches!(
            first_fault(&window),
            Some((0, ChainFault::Gap { from: 1, to: 2, .. }))
        ));
        window[0].prev_chain_hash = Some(genesis(j[0].pos_id));
        assert!(matches!(
            first_fault(&window),
            Some((0, ChainFault::Break { .. }))
        ));
        window[0].prev_chain_hash = j[1].chain_hash.clone();
        assert_eq!(first_fault(&window), None);
    }

    #[test]
    fn the_instant_is_cut_to_microseconds_and_leap_seconds_roll_over() {
        let t: DateTime<Utc> = "2026-11-29T10:15:30.123456789Z".parse().expect("t");
        assert_eq!(
            canonical_instant(t).to_rfc3339_opts(SecondsFormat::Micros, true),
            "2026-11-29T10:15:30.123456Z"
        );
        let leap = chrono::NaiveDate::from_ymd_opt(2016, 12, 31)
            .and_then(|d| d.and_hms_nano_opt(23, 59, 59, 1_500_000_000))
            .expect("leap")
            .and_utc();
        assert_eq!(
            canonical_instant(leap).to_rfc3339_opts(SecondsFormat::Micros, true),
            "2017-01-01T00:00:00.500000Z"
        );
    }
}
