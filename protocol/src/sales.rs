//! Sales event wire types and the validation both sides run: the terminal before it enqueues a
//! sale, the cloud before it ingests one. Validation is a pure function so that a sale the
//! terminal accepted can never be rejected by the cloud for a rule the terminal did not know.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use thiserror::Error;
use uuid::Uuid;

use crate::catalog::{canonical_json, sha256_hex, valid_branch_id};
use crate::error::ErrorCode;

/// Most events in one `POST /v1/pos/sales/events` request.
pub const MAX_EVENTS_PER_REQUEST: usize = 500;
/// Largest request body the sync API accepts, in bytes (1 MiB).
pub const MAX_BODY_BYTES: usize = 1024 * 1024;
/// Most lines in one sale.
pub const MAX_LINES_PER_SALE: usize = 500;

/// The body of `POST /v1/pos/sales/events`, as a terminal sends it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SalesEventsRequest {
    /// At most 500 events and 1 MiB per request.
    pub events: Vec<SaleEvent>,
}

/// Sale, refund or void.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventType {
    /// A sale.
    Sale,
    /// A refund (quantities may be negative).
    Refund,
    /// A void of an earlier sale.
    Void,
}

impl EventType {
    /// The wire spelling.
    pub const fn as_str(self) -> &'static str {
        match self {
            EventType::Sale => "sale",
            EventType::Refund => "refund",
            EventType::Void => "void",
        }
    }
}

/// One sales event. `(terminal_id, pos_id, local_event_id)` is its idempotency key.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SaleEvent {
    /// The terminal the cloud issued the token to.
    pub terminal_id: Uuid,
    /// The local database that recorded the sale.
    pub pos_id: Uuid,
    /// Strictly increasing per `pos_id`, assigned in the transaction that stored the sale.
    pub local_event_id: i64,
    /// The terminal's branch.
    pub branch_id: String,
    #[serde(rename = "type")]
    /// Sale, refund or void.
    pub event_type: EventType,
    /// When the sale happened at the till (RFC 3339 UTC).
    pub occurred_at: DateTime<Utc>,
    /// The receipt.
    pub payload: SalePayload,
}

impl SaleEvent {
    /// sha256 of the canonical JSON of everything but the key: two deliveries of one key are
    /// "the same event" exactly when their hashes match.
    pub fn payload_hash(&self) -> String {
        let body = serde_json::json!({
            "branch_id": self.branch_id,
            "type": self.event_type,
            "occurred_at": self.occurred_at.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true),
            "payload": self.payload,
        });
        sha256_hex(canonical_json(&body).as_bytes())
    }
}

/// A receipt: lines, totals and payments, money in integer minor units.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SalePayload {
    /// The receipt number printed for the customer.
    pub receipt_no: String,
    /// ISO 4217 code, e.g. `EUR`.
    pub currency: String,
    /// 1–500 lines.
    pub lines: Vec<SaleLine>,
    /// Receipt totals.
    pub totals: Totals,
    /// How it was paid; the amounts sum to `totals.total_minor`.
    pub payments: Vec<Payment>,
}

/// One receipt line. `total_minor = qty * unit_price_minor - discount_minor`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SaleLine {
    /// The catalog id of the product sold.
    pub product_id: String,
    #[serde(default)]
    /// The SKU at the time of sale.
    pub sku: String,
    #[serde(default)]
    /// The name printed on the receipt.
    pub name: String,
    /// Quantity; never 0, negative only in refunds.
    pub qty: i64,
    /// Price of one unit, minor units.
    pub unit_price_minor: i64,
    #[serde(default)]
    /// Discount on the line, minor units.
    pub discount_minor: i64,
    #[serde(default)]
    /// Tax included in the line, minor units.
    pub tax_minor: i64,
    /// `qty * unit_price_minor - discount_minor`.
    pub total_minor: i64,
}

/// Receipt totals; `total_minor` equals the sum of line totals and of payments.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Totals {
    /// Total before tax, minor units.
    pub subtotal_minor: i64,
    /// Tax, minor units.
    pub tax_minor: i64,
    /// What the customer pays, minor units.
    pub total_minor: i64,
}

/// How a receipt was paid.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PaymentMethod {
    /// Cash.
    Cash,
    /// Card.
    Card,
    /// Anything else (voucher, transfer, …).
    Other,
}

/// One payment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Payment {
    /// How.
    pub method: PaymentMethod,
    /// How much, minor units.
    pub amount_minor: i64,
}

/// Per-event ingestion outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventStatus {
    /// Stored now, for the first time.
    Accepted,
    /// Stored before with the same payload; the first `cloud_event_id` is returned.
    Duplicate,
    /// Stored before with a different payload; the first stays, this one is dropped. Also the
    /// answer, with `POS_SYNC_POS_CLONED`, for an event whose `pos_id` belongs to another device.
    Conflict,
    /// Failed schema or arithmetic; not stored.
    Rejected,
}

/// One entry of the `results` array, in request order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EventResult {
    /// The event's `local_event_id` (`None` if a rejected event had none).
    pub local_event_id: Option<i64>,
    /// What happened to the event.
    pub status: EventStatus,
    /// `POS_SYNC_EVENT_DUPLICATE`, `POS_SYNC_EVENT_INVALID` or `POS_SYNC_POS_CLONED` where it
    /// applies.
    pub code: Option<ErrorCode>,
    /// The cloud's id of the stored sale (the first one, for duplicates and conflicts).
    pub cloud_event_id: Option<Uuid>,
    /// Why, for rejected and conflicting events.
    pub message: Option<String>,
}

/// `POST /v1/pos/sales/events` answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SalesEventsResponse {
    /// One result per event, in request order.
    pub results: Vec<EventResult>,
}

/// `GET /v1/pos/sync/status`: per `pos_id`, how far ingestion got.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SyncStatus {
    /// The terminal asking.
    pub terminal_id: Uuid,
    /// Its branch.
    pub branch_id: String,
    /// One entry per `pos_id` this terminal has used.
    pub pos: Vec<PosIngestion>,
}

/// Ingestion progress of one `pos_id`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PosIngestion {
    /// The local database.
    pub pos_id: Uuid,
    /// Highest `n` such that every `local_event_id` in `1..=n` is stored.
    pub highest_contiguous: i64,
    /// Stored ids above `highest_contiguous` — their presence means lower ids are missing.
    pub ids_above_gap: Vec<i64>,
    /// Events stored for this `pos_id`.
    pub total_events: i64,
}

/// Most keys in one `GET /v1/pos/sales/held` page.
pub const MAX_HELD_KEYS_PER_PAGE: usize = 1000;

/// `GET /v1/pos/sales/held?pos_id=…&after=…&limit=…`: the keys the cloud holds for one
/// `pos_id`, under any terminal, in `local_event_id` order.
///
/// A till asks before it moves unsent sales to a new key (re-enrollment under a new terminal,
/// or a fork after a clone or restore): a sale whose old key is held with the same payload hash
/// already reached the cloud and is marked synced instead of being sent again.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HeldKeysPage {
    /// The `pos_id` asked about.
    pub pos_id: Uuid,
    /// At most `limit` keys with `local_event_id > after`, ascending.
    pub keys: Vec<HeldKey>,
    /// `after` for the next page; `None` when this page is the last.
    pub next_after: Option<i64>,
}

/// One held key of a `pos_id` and the hash of what is stored under it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeldKey {
    /// The terminal the sale was delivered as.
    pub terminal_id: Uuid,
    /// Its `local_event_id`.
    pub local_event_id: i64,
    /// [`SaleEvent::payload_hash`] of the stored delivery.
    pub payload_hash: String,
    /// The cloud's id of the stored sale.
    pub cloud_event_id: Uuid,
}

/// Why an event failed validation. Every variant maps to `POS_SYNC_EVENT_INVALID`.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum SaleInvalid {
    #[error("{field}: {reason}")]
    /// A field failed its schema rule.
    Field {
        /// Path of the field, e.g. `lines[2].qty`.
        field: String,
        /// The rule it broke.
        reason: String,
    },
    #[error("arithmetic: {0}")]
    /// Money does not add up, or overflows.
    Arithmetic(String),
}

impl SaleInvalid {
    fn field(field: impl Into<String>, reason: impl Into<String>) -> Self {
        SaleInvalid::Field {
            field: field.into(),
            reason: reason.into(),
        }
    }
}

/// Checks one event: identifiers, then the payload's schema and arithmetic.
pub fn validate_event(event: &SaleEvent) -> Result<(), SaleInvalid> {
    if event.local_event_id < 1 {
        return Err(SaleInvalid::field("local_event_id", "must be >= 1"));
    }
    if !valid_branch_id(&event.branch_id) {
        return Err(SaleInvalid::field(
            "branch_id",
            "must be 1-64 of [a-z0-9_-]",
        ));
    }
    validate_payload(event.event_type, &event.payload)
}

/// Checks a sale payload for the given event type.
///
/// Rules: receipt number 1–64 chars; currency three upper-case letters; 1–500 lines;
/// `qty != 0`, negative only in refunds; prices, discounts and taxes not negative;
/// each line's `total_minor = qty * unit_price_minor - discount_minor`; the line totals sum to
/// `totals.total_minor`, and so do the payments. All sums are overflow-checked.
pub fn validate_payload(event_type: EventType, p: &SalePayload) -> Result<(), SaleInvalid> {
    if p.receipt_no.is_empty() || p.receipt_no.chars().count() > 64 {
        return Err(SaleInvalid::field("receipt_no", "must be 1-64 characters"));
    }
    if p.currency.len() != 3 || !p.currency.bytes().all(|b| b.is_ascii_uppercase()) {
        return Err(SaleInvalid::field(
            "currency",
            "must be a three-letter upper-case ISO 4217 code",
        ));
    }
    if p.lines.is_empty() || p.lines.len() > MAX_LINES_PER_SALE {
        return Err(SaleInvalid::field(
            "lines",
            format!("must hold 1-{MAX_LINES_PER_SALE} lines"),
        ));
    }
    if p.payments.len() > 50 {
        return Err(SaleInvalid::field("payments", "at most 50 payments"));
    }
    let mut line_sum: i64 = 0;
    for (i, line) in p.lines.iter().enumerate() {
        let at = |f: &str| format!("lines[{i}].{f}");
        if line.product_id.is_empty() || line.product_id.len() > 128 {
            return Err(SaleInvalid::field(
                at("product_id"),
                "must be 1-128 characters",
            ));
        }
        if line.sku.len() > 128 || line.name.chars().count() > 256 {
            return Err(SaleInvalid::field(at("sku"), "sku or name too long"));
        }
        if line.qty == 0 {
            return Err(SaleInvalid::field(at("qty"), "must not be 0"));
        }
        if line.qty < 0 && event_type != EventType::Refund {
            return Err(SaleInvalid::field(
                at("qty"),
                "may be negative only in a refund",
            ));
        }
        if line.unit_price_minor < 0 {
            return Err(SaleInvalid::field(
                at("unit_price_minor"),
                "must not be negative",
            ));
        }
        if line.discount_minor < 0 {
            return Err(SaleInvalid::field(
                at("discount_minor"),
                "must not be negative",
            ));
        }
        if line.tax_minor < 0 {
            return Err(SaleInvalid::field(at("tax_minor"), "must not be negative"));
        }
        let expected = line
            .qty
            .checked_mul(line.unit_price_minor)
            .and_then(|g| g.checked_sub(line.discount_minor))
            .ok_or_else(|| SaleInvalid::Arithmetic(format!("lines[{i}] overflows")))?;
        if expected != line.total_minor {
            return Err(SaleInvalid::Arithmetic(format!(
                "lines[{i}].total_minor is {} but qty * unit_price_minor - discount_minor is {expected}",
                line.total_minor
            )));
        }
        line_sum = line_sum
            .checked_add(line.total_minor)
            .ok_or_else(|| SaleInvalid::Arithmetic("line totals overflow".into()))?;
    }
    if line_sum != p.totals.total_minor {
        return Err(SaleInvalid::Arithmetic(format!(
            "totals.total_minor is {} but the lines sum to {line_sum}",
            p.totals.total_minor
        )));
    }
    let mut paid: i64 = 0;
    for pay in &p.payments {
        paid = paid
            .checked_add(pay.amount_minor)
            .ok_or_else(|| SaleInvalid::Arithmetic("payments overflow".into()))?;
    }
    if paid != p.totals.total_minor {
        return Err(SaleInvalid::Arithmetic(format!(
            "payments sum to {paid} but totals.total_minor is {}",
            p.totals.total_minor
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn line(qty: i64, unit: i64, discount: i64) -> SaleLine {
        SaleLine {
            product_id: "p1".into(),
            sku: "SKU1".into(),
            name: "Coffee".into(),
            qty,
            unit_price_minor: unit,
            discount_minor: discount,
            tax_minor: 0,
            total_minor: qty * unit - discount,
        }
    }

    fn payload(lines: Vec<SaleLine>) -> SalePayload {
        let total: i64 = lines.iter().map(|l| l.total_minor).sum();
        SalePayload {
            receipt_no: "B1-T1-000001".into(),
            currency: "EUR".into(),
            lines,
            totals: Totals {
                subtotal_minor: total,
                tax_minor: 0,
                total_minor: total,
            },
            payments: vec![Payment {
                method: PaymentMethod::Cash,
                amount_minor: total,
            }],
        }
    }

    #[test]
    fn the_contract_example_is_valid() {
        let p: SalePayload = serde_json::from_value(serde_json::json!({
            "receipt_no": "B1-T2-000017", "currency": "EUR",
            "lines": [{"product_id": "p", "sku": "s", "name": "n", "qty": 2, "unit_price_minor": 250,
                       "discount_minor": 0, "tax_minor": 80, "total_minor": 500}],
            "totals": {"subtotal_minor": 420, "tax_minor": 80, "total_minor": 500},
            "payments": [{"method": "cash", "amount_minor": 500}]
        }))
        .expect("parse");
        assert_eq!(validate_payload(EventType::Sale, &p), Ok(()));
    }

    #[test]
    fn wrong_line_total_is_an_arithmetic_failure() {
        let mut p = payload(vec![line(2, 250, 0)]);
        p.lines[0].total_minor = 499;
        assert!(matches!(
            validate_payload(EventType::Sale, &p),
            Err(SaleInvalid::Arithmetic(_))
        ));
    }

    #[test]
    fn totals_and_payments_must_match_lines() {
        let mut p = payload(vec![line(1, 100, 0), line(3, 50, 10)]);
        p.totals.total_minor += 1;
        assert!(validate_payload(EventType::Sale, &p).is_err());
        let mut p = payload(vec![line(1, 100, 0)]);
        p.payments[0].amount_minor = 99;
        assert!(validate_payload(EventType::Sale, &p).is_err());
    }

    #[test]
    fn negative_qty_only_in_refunds_and_zero_never() {
        let p = payload(vec![line(-1, 100, 0)]);
        assert!(validate_payload(EventType::Sale, &p).is_err());
        assert_eq!(validate_payload(EventType::Refund, &p), Ok(()));
        let p = payload(vec![line(0, 100, 0)]);
        assert!(validate_payload(EventType::Refund, &p).is_err());
    }

    #[test]
    fn schema_limits() {
        assert!(validate_payload(EventType::Sale, &payload(vec![])).is_err());
        let many = (0..501).map(|_| line(1, 1, 0)).collect();
        assert!(validate_payload(EventType::Sale, &payload(many)).is_err());
        let mut p = payload(vec![line(1, 1, 0)]);
        p.currency = "eur".into();
        assert!(validate_payload(EventType::Sale, &p).is_err());
    }

    #[test]
    fn overflow_is_rejected_not_panicking() {
        let mut p = payload(vec![line(1, 1, 0)]);
        p.lines[0].qty = i64::MAX;
        p.lines[0].unit_price_minor = 2;
        assert!(matches!(
            validate_payload(EventType::Sale, &p),
            Err(SaleInvalid::Arithmetic(_))
        ));
    }

    #[test]
    fn payload_hash_ignores_the_key_but_not_the_content() {
        let ev = SaleEvent {
            terminal_id: Uuid::nil(),
            pos_id: Uuid::nil(),
            local_event_id: 1,
            branch_id: "b1".into(),
            event_type: EventType::Sale,
            occurred_at: "2026-11-25T10:00:00Z".parse().expect("time"),
            payload: payload(vec![line(1, 100, 0)]),
        };
        let mut other_key = ev.clone();
        other_key.local_event_id = 2;
        assert_eq!(ev.payload_hash(), other_key.payload_hash());
        let mut other_body = ev.clone();
        other_body.payload.receipt_no = "X".into();
        assert_ne!(ev.payload_hash(), other_body.payload_hash());
    }

    proptest! {
        #[test]
        fn consistent_receipts_always_validate(
            lines in prop::collection::vec((1i64..100, 0i64..100_000, 0i64..50), 1..20)
        ) {
            let lines: Vec<SaleLine> = lines.into_iter().map(|(q, u, d)| line(q, u, d.min(q * u))).collect();
            prop_assert_eq!(validate_payload(EventType::Sale, &payload(lines)), Ok(()));
        }

        #[test]
        fn any_single_line_total_error_is_caught(
            lines in prop::collection::vec((1i64..100, 0i64..100_000), 1..20),
            which in any::<prop::sample::Index>(),
            delta in prop_oneof![-1000i64..0, 1i64..1000],
        ) {
            let mut lines: Vec<SaleLine> = lines.into_iter().map(|(q, u)| line(q, u, 0)).collect();
            let i = which.index(lines.len());
            lines[i].total_minor += delta;
            // keep totals and payments consistent with the (wrong) line so only the line rule fires
            prop_assert!(validate_payload(EventType::Sale, &payload(lines)).is_err());
        }
    }
}
