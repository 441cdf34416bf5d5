//! Idempotency keys of `POST /sales` (docs/terminal-operations.md, "Retrying a sale").
//!
//! A POS client that timed out cannot tell "not recorded" from "recorded, answer lost"; it
//! retries with the same `Idempotency-Key`, and the key — stored in the sale's own row, in the
//! sale's own transaction — turns the retry into a replay of the original receipt instead of a
//! second sale. A second sale here would be a second sale in the cloud too: it gets its own
//! `local_event_id`, so the cloud's idempotency ledger cannot see through it.
//!
//! The key is bound to the request it first recorded by [`request_hash`]; the same key with
//! another request is refused ([`TerminalStoreError::IdempotencyKeyReused`]), never answered
//! with a receipt for a sale the client did not send.

use chrono::{DateTime, SecondsFormat, Utc};
use possync_protocol::journal_chain::canonical_instant;
use possync_protocol::{canonical_json, sha256_hex, EventType, SalePayload};
use rusqlite::{params, OptionalExtension, Transaction};
use std::fmt;
use thiserror::Error;
use uuid::Uuid;

use super::error::TerminalStoreError;

/// Longest key accepted (Stripe's limit; a UUID or a receipt number fits with room to spare).
pub const KEY_MAX_LEN: usize = 255;

/// A client's `Idempotency-Key`: 1 to [`KEY_MAX_LEN`] printable ASCII characters
/// (`0x20..=0x7E`), compared byte for byte. The schema checks the same rule, so a key that
/// got past this type any other way would still not be stored.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct IdempotencyKey(String);

/// Why a header value is not an [`IdempotencyKey`].
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum KeyInvalid {
    /// The header is present but empty.
    #[error("Idempotency-Key is empty")]
    Empty,
    /// More than [`KEY_MAX_LEN`] bytes.
    #[error("Idempotency-Key is {0} bytes long; at most {KEY_MAX_LEN} are accepted")]
    TooLong(usize),
    /// A byte outside printable ASCII.
    #[error("Idempotency-Key byte {index} ({byte:#04x}) is not printable ASCII")]
    NotPrintable {
        /// Its position.
        index: usize,
        /// The byte.
        byte: u8,
    },
}

impl IdempotencyKey {
    /// Accepts a header value's raw bytes (they need not be UTF-8: anything that is not
    /// printable ASCII is refused, so the check runs before any decoding).
    pub fn parse(bytes: &[u8]) -> Result<IdempotencyKey, KeyInvalid> {
        if bytes.is_empty() {
            return Err(KeyInvalid::Empty);
        }
        if bytes.len() > KEY_MAX_LEN {
            return Err(KeyInvalid::TooLong(bytes.len()));
        }
        if let Some((index, &byte)) = bytes
            .iter()
            .enumerate()
            .find(|(_, b)| !(0x20..=0x7e).contains(*b))
        {
            return Err(KeyInvalid::NotPrintable { index, byte });
        }
        // Every byte is ASCII, so each is its own char.
        Ok(IdempotencyKey(
            bytes.iter().map(|&b| char::from(b)).collect(),
        ))
    }

    /// The key as sent.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for IdempotencyKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "IdempotencyKey({:?})", self.0)
    }
}

impl fmt::Display for IdempotencyKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Hex SHA-256 of the canonical request: the canonical JSON of `{"occurred_at", "payload",
/// "type"}`, `occurred_at` as the client gave it (`null` when it did not: the store then stamps
/// the first attempt's time, and a retry must not look like another request because it came
/// later), normalised to microseconds and `Z` so equal instants written differently match.
/// The payload is the parsed receipt re-serialised, so key order and whitespace do not count.
pub fn request_hash(
    event_type: EventType,
    occurred_at: Option<DateTime<Utc>>,
    payload: &SalePayload,
) -> Result<String, TerminalStoreError> {
    let request = serde_json::json!({
        "type": event_type.as_str(),
        "occurred_at": occurred_at
            .map(|t| canonical_instant(t).to_rfc3339_opts(SecondsFormat::Micros, true)),
        "payload": serde_json::to_value(payload)?,
    });
    Ok(sha256_hex(canonical_json(&request).as_bytes()))
}

/// The sale a key recorded earlier.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct KeyedRecord {
    pub pos_id: Uuid,
    pub local_event_id: i64,
    pub request_hash: String,
}

/// Looks the key up in the caller's transaction (one probe of the `sales_idempotency_key`
/// index). Because the sale path's transaction is IMMEDIATE, no other writer can record the
/// same key between this lookup and the caller's insert.
pub(crate) fn lookup(
    tx: &Transaction<'_>,
    key: &IdempotencyKey,
) -> Result<Option<KeyedRecord>, TerminalStoreError> {
    let found = tx
        .prepare_cached(
            "SELECT pos_id, local_event_id, request_hash FROM sales WHERE idempotency_key = ?1",
        )?
        .query_row(params![key.as_str()], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, Option<i64>>(1)?,
                r.get::<_, Option<String>>(2)?,
            ))
        })
        .optional()?;
    let Some((pos_id, local_event_id, request_hash)) = found else {
        return Ok(None);
    };
    // Only the keyed sale path writes a key, always with a local_event_id and a hash (the
    // schema's CHECK ties the hash to the key).
    let corrupt = |what: &str| TerminalStoreError::Corrupt(format!("sale of key {key}: {what}"));
    Ok(Some(KeyedRecord {
        pos_id: Uuid::parse_str(&pos_id).map_err(|e| corrupt(&format!("pos_id: {e}")))?,
        local_event_id: local_event_id.ok_or_else(|| corrupt("no local_event_id"))?,
        request_hash: request_hash.ok_or_else(|| corrupt("no request hash"))?,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn keys_are_one_to_255_printable_ascii_bytes() {
        assert_eq!(
            IdempotencyKey::parse(b"0194b7a2-6c1e-7f00-8000-000000000001")
                .expect("uuid")
                .as_str(),
            "0194b7a2-6c1e-7f00-8000-000000000001"
        );
        assert!(IdempotencyKey::parse(b"B1 T1 #000042 ~").is_ok());
        assert!(IdempotencyKey::parse(&[b'k'; KEY_MAX_LEN]).is_ok());
        assert_eq!(IdempotencyKey::parse(b""), Err(KeyInvalid::Empty));
        assert_eq!(
            IdempotencyKey::parse(&[b'k'; KEY_MAX_LEN + 1]),
            Err(KeyInvalid::TooLong(KEY_MAX_LEN + 1))
        );
        assert_eq!(
            IdempotencyKey::parse(b"ab\tc"),
            Err(KeyInvalid::NotPrintable {
                index: 2,
                byte: b'\t'
            })
        );
        assert!(IdempotencyKey::parse("café".as_bytes()).is_err());
        assert!(IdempotencyKey::parse(b"del\x7f").is_err());
    }

    fn payload(receipt: &str, total: i64) -> SalePayload {
        serde_json::from_value(serde_json::json!({
            "receipt_no": receipt, "currency": "EUR",
            "lines": [{"product_id": "p1", "qty": 1, "unit_price_minor": total, "total_minor": total}],
            "totals": {"subtotal_minor": total, "tax_minor": 0, "total_minor": total},
            "payments": [{"method": "cash", "amount_minor": total}]
        }))
        .expect("payload")
    }

    #[test]
    fn the_request_hash_covers_type_payload_and_a_given_time_only() {
        let p = payload("R1", 100);
        let h = |t, at, p: &SalePayload| request_hash(t, at, p).expect("hash");
        let at: DateTime<Utc> = "2026-01-02T03:04:05Z".parse().expect("time");
        let same_at: DateTime<Utc> = "2026-01-02T04:04:05.000000001+01:00".parse().expect("time");
        let base = h(EventType::Sale, Some(at), &p);
        assert_eq!(base.len(), 64);
        assert_eq!(base, h(EventType::Sale, Some(same_at), &p), "same instant");
        assert_ne!(base, h(EventType::Refund, Some(at), &p));
        assert_ne!(base, h(EventType::Sale, None, &p));
        assert_ne!(base, h(EventType::Sale, Some(at), &payload("R1", 101)));
        assert_ne!(base, h(EventType::Sale, Some(at), &payload("R2", 100)));
    }

    proptest! {
        /// Any bytes are a key or a refusal, never a panic; a key is exactly the bytes given.
        #[test]
        fn any_header_bytes_parse_or_are_refused(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            match IdempotencyKey::parse(&bytes) {
                Ok(k) => {
                    prop_assert_eq!(k.as_str().as_bytes(), &bytes[..]);
                    prop_assert!((1..=KEY_MAX_LEN).contains(&bytes.len()));
                }
                Err(_) => prop_assert!(
                    bytes.is_empty()
                        || bytes.len() > KEY_MAX_LEN
                        || bytes.iter().any(|b| !(0x20..=0x7e).contains(b))
                ),
            }
        }
    }
}
