//! Sales event wire types and the validation both sides run: the terminal before it enqueues a
//! sale, the cloud before it ingests one. Validation is a pure function so that a sale the
//! terminal accepted can never be rejected by the cloud for a rule the terminal did not know.

use chrono::{DateTime, Datelike, Utc};
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

impl std::str::FromStr for EventType {
    type Err = String;
    /// Parses the wire spelling (`sale`, `refund`, `void`).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        [EventType::Sale, EventType::Refund, EventType::Void]
            .into_iter()
            .find(|t| t.as_str() == s)
            .ok_or_else(|| format!("unknown event type {s:?} (sale, refund, void)"))
    }
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
    /// The till's hash chain link for this event (see [`crate::journal_chain`]): 64 lower-case
    /// hex digits, absent for sales recorded before chaining began. Not part of
    /// [`SaleEvent::payload_hash`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chain_hash: Option<String>,
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

/// Highest `local_event_id` accepted: 2^53 - 1, the largest integer every JSON reader holds
/// exactly (a JavaScript front end, `jq`), and far from `i64::MAX`, so `id + 1` never
/// overflows anywhere ids are summed or stepped.
pub const MAX_LOCAL_EVENT_ID: i64 = (1 << 53) - 1;

/// Earliest year `occurred_at` may carry: RFC 3339 writes years with four digits, and both
/// databases store and return every instant of years 1..=9999 unchanged (property-tested
/// against PostgreSQL and SQLite in the cloud's storage tests).
pub const OCCURRED_AT_MIN_YEAR: i32 = 1;
/// Latest year `occurred_at` may carry (see [`OCCURRED_AT_MIN_YEAR`]).
pub const OCCURRED_AT_MAX_YEAR: i32 = 9999;
/// A sale said to have happened before this year is stored but flagged
/// [`SaleFlag::ClockBehind`]: no till sold anything through possync before it, so the till's
/// clock was wrong (a flat RTC battery typically resets it to 1970).
pub const PLAUSIBLE_SINCE_YEAR: i32 = 2000;
/// A sale said to have happened more than this many seconds after the cloud received it is
/// stored but flagged [`SaleFlag::ClockAhead`].
pub const CLOCK_AHEAD_TOLERANCE_SECS: i64 = 24 * 3600;

/// Something odd but storable about a sale. A sale is a fact that already happened, so an odd
/// one is stored and flagged for the back office, never refused and never parked at the till.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SaleFlag {
    /// `occurred_at` is before [`PLAUSIBLE_SINCE_YEAR`]: the till's clock was behind.
    ClockBehind,
    /// `occurred_at` is more than [`CLOCK_AHEAD_TOLERANCE_SECS`] after the cloud received it.
    ClockAhead,
    /// A line's discount is larger than its gross amount (`|qty| × unit_price_minor`).
    DiscountExceedsLine,
}

impl SaleFlag {
    /// The stored and logged spelling.
    pub const fn as_str(self) -> &'static str {
        match self {
            SaleFlag::ClockBehind => "clock_behind",
            SaleFlag::ClockAhead => "clock_ahead",
            SaleFlag::DiscountExceedsLine => "discount_exceeds_line",
        }
    }
}

/// The flags of a valid event received at `received_at`, in [`SaleFlag`] order, each once.
pub fn sale_flags(event: &SaleEvent, received_at: DateTime<Utc>) -> Vec<SaleFlag> {
    let mut flags = Vec::new();
    if event.occurred_at.year() < PLAUSIBLE_SINCE_YEAR {
        flags.push(SaleFlag::ClockBehind);
    }
    if (event.occurred_at - received_at).num_seconds() > CLOCK_AHEAD_TOLERANCE_SECS {
        flags.push(SaleFlag::ClockAhead);
    }
    let over_discounted = event.payload.lines.iter().any(|l| {
        l.qty
            .checked_abs()
            .and_then(|q| q.checked_mul(l.unit_price_minor))
            .is_none_or(|gross| l.discount_minor > gross)
    });
    if over_discounted {
        flags.push(SaleFlag::DiscountExceedsLine);
    }
    flags
}

/// Checks one event: identifiers, the time window, then the payload's schema and arithmetic.
pub fn validate_event(event: &SaleEvent) -> Result<(), SaleInvalid> {
    if !(1..=MAX_LOCAL_EVENT_ID).contains(&event.local_event_id) {
        return Err(SaleInvalid::field(
            "local_event_id",
            "must be between 1 and 9007199254740991 (2^53 - 1)",
        ));
    }
    if !valid_branch_id(&event.branch_id) {
        return Err(SaleInvalid::field(
            "branch_id",
            "must be 1-64 of [a-z0-9_-]",
        ));
    }
    if let Some(h) = &event.chain_hash {
        if !crate::journal_chain::is_chain_hash(h) {
            return Err(SaleInvalid::field(
                "chain_hash",
                "must be 64 lower-case hex digits",
            ));
        }
    }
    let year = event.occurred_at.year();
    if !(OCCURRED_AT_MIN_YEAR..=OCCURRED_AT_MAX_YEAR).contains(&year) {
        return Err(SaleInvalid::field(
            "occurred_at",
            format!("year {year} is outside {OCCURRED_AT_MIN_YEAR:04}..={OCCURRED_AT_MAX_YEAR}"),
        ));
    }
    validate_payload(event.event_type, &event.payload)
}

/// Checks a text field: at most `max_chars` characters (at least one if `required`) and no NUL,
/// the one character PostgreSQL `text` cannot hold. Every other Unicode scalar value is
/// storable by both databases and is kept as sent.
fn check_text(
    field: impl FnOnce() -> String,
    value: &str,
    required: bool,
    max_chars: usize,
) -> Result<(), SaleInvalid> {
    if value.contains('\0') {
        return Err(SaleInvalid::field(
            field(),
            "must not contain NUL (U+0000), which the database cannot store",
        ));
    }
    let n = value.chars().count();
    if (required && n == 0) || n > max_chars {
        let min = usize::from(required);
        return Err(SaleInvalid::field(
            field(),
            format!("must be {min}-{max_chars} characters"),
        ));
    }
    Ok(())
}

/// Checks a sale payload for the given event type.
///
/// Rules: receipt number 1–64 characters, product id 1–128, sku 0–128, name 0–256, none
/// containing NUL; currency three upper-case letters; 1–500 lines; `qty != 0`, negative only
/// in refunds; prices, discounts and taxes not negative; each line's
/// `total_minor = qty * unit_price_minor - discount_minor`; the line totals sum to
/// `totals.total_minor`, and so do the payments (which may be negative: change given, money
/// paid back); `totals.tax_minor` is the sum of the lines' `tax_minor` and
/// `subtotal_minor + tax_minor = total_minor`. All sums are overflow-checked.
pub fn validate_payload(event_type: EventType, p: &SalePayload) -> Result<(), SaleInvalid> {
    check_text(|| "receipt_no".into(), &p.receipt_no, true, 64)?;
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
    let mut line_tax: i64 = 0;
    for (i, line) in p.lines.iter().enumerate() {
        let at = |f: &str| format!("lines[{i}].{f}");
        check_text(|| at("product_id"), &line.product_id, true, 128)?;
        check_text(|| at("sku"), &line.sku, false, 128)?;
        check_text(|| at("name"), &line.name, false, 256)?;
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
        line_tax = line_tax
            .checked_add(line.tax_minor)
            .ok_or_else(|| SaleInvalid::Arithmetic("line taxes overflow".into()))?;
    }
    if line_tax != p.totals.tax_minor {
        return Err(SaleInvalid::Arithmetic(format!(
            "totals.tax_minor is {} but the lines' tax_minor sum to {line_tax}",
            p.totals.tax_minor
        )));
    }
    let net_plus_tax = p
        .totals
        .subtotal_minor
        .checked_add(p.totals.tax_minor)
        .ok_or_else(|| SaleInvalid::Arithmetic("subtotal + tax overflows".into()))?;
    if net_plus_tax != p.totals.total_minor {
        return Err(SaleInvalid::Arithmetic(format!(
            "totals.subtotal_minor + totals.tax_minor is {net_plus_tax} but totals.total_minor is {}",
            p.totals.total_minor
        )));
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
    fn local_event_id_is_bounded_on_both_sides() {
        let ev = |id: i64| SaleEvent {
            terminal_id: Uuid::nil(),
            pos_id: Uuid::nil(),
            local_event_id: id,
            branch_id: "b1".into(),
            event_type: EventType::Sale,
            occurred_at: "2026-11-25T10:00:00Z".parse().expect("time"),
            payload: payload(vec![line(1, 100, 0)]),
            chain_hash: None,
        };
        for ok in [1, 2, MAX_LOCAL_EVENT_ID] {
            assert_eq!(validate_event(&ev(ok)), Ok(()), "{ok}");
        }
        for bad in [i64::MIN, -1, 0, MAX_LOCAL_EVENT_ID + 1, i64::MAX] {
            assert!(
                matches!(validate_event(&ev(bad)), Err(SaleInvalid::Field { ref field, .. }) if field == "local_event_id"),
                "{bad}"
            );
        }
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
            chain_hash: None,
        };
        let mut other_key = ev.clone();
        other_key.local_event_id = 2;
        assert_eq!(ev.payload_hash(), other_key.payload_hash());
        let mut other_body = ev.clone();
        other_body.payload.receipt_no = "X".into();
        assert_ne!(ev.payload_hash(), other_body.payload_hash());
    }

    fn event_at(occurred_at: &str, payload: SalePayload) -> SaleEvent {
        SaleEvent {
            terminal_id: Uuid::nil(),
            pos_id: Uuid::nil(),
            local_event_id: 1,
            branch_id: "b1".into(),
            event_type: EventType::Sale,
            occurred_at: occurred_at.parse().expect("time"),
            payload,
            chain_hash: None,
        }
    }

    #[test]
    fn nul_is_refused_in_every_text_field_and_other_text_is_kept() {
        let fields: [fn(&mut SalePayload, String); 4] = [
            |p, v| p.receipt_no = v,
            |p, v| p.lines[0].product_id = v,
            |p, v| p.lines[0].sku = v,
            |p, v| p.lines[0].name = v,
        ];
        for set in fields {
            let mut p = payload(vec![line(1, 100, 0)]);
            set(&mut p, "a\0b".into());
            let err = validate_payload(EventType::Sale, &p).expect_err("NUL refused");
            assert!(err.to_string().contains("NUL"), "{err}");
            // Control characters, emoji and right-to-left text are storable and accepted.
            let mut p = payload(vec![line(1, 100, 0)]);
            set(&mut p, "tab\there \u{1F600} \u{202E}עברית\u{7}".into());
            assert_eq!(validate_payload(EventType::Sale, &p), Ok(()));
        }
    }

    #[test]
    fn text_lengths_count_characters() {
        let mut p = payload(vec![line(1, 100, 0)]);
        p.receipt_no = "é".repeat(64);
        assert_eq!(validate_payload(EventType::Sale, &p), Ok(()));
        p.receipt_no = "é".repeat(65);
        assert!(validate_payload(EventType::Sale, &p).is_err());
        let mut p = payload(vec![line(1, 100, 0)]);
        p.lines[0].name = "n".repeat(257);
        assert!(validate_payload(EventType::Sale, &p).is_err());
    }

    #[test]
    fn payments_may_be_negative_when_they_add_up() {
        // Cash 20.00 tendered, 5.00 change given back, for a 15.00 sale.
        let mut p = payload(vec![line(3, 500, 0)]);
        p.payments = vec![
            Payment {
                method: PaymentMethod::Cash,
                amount_minor: 2000,
            },
            Payment {
                method: PaymentMethod::Cash,
                amount_minor: -500,
            },
        ];
        assert_eq!(validate_payload(EventType::Sale, &p), Ok(()));
        p.payments[1].amount_minor = -400;
        assert!(matches!(
            validate_payload(EventType::Sale, &p),
            Err(SaleInvalid::Arithmetic(_))
        ));
    }

    #[test]
    fn a_discount_above_the_line_is_stored_and_flagged() {
        // 1 × 1.00 with a 1.50 discount: the line total is -0.50 and the receipt adds up.
        let p = payload(vec![line(1, 100, 150)]);
        assert_eq!(validate_payload(EventType::Sale, &p), Ok(()));
        let ev = event_at("2026-11-25T10:00:00Z", p);
        let now = "2026-11-25T10:05:00Z".parse().expect("time");
        assert_eq!(sale_flags(&ev, now), vec![SaleFlag::DiscountExceedsLine]);
        let plain = event_at("2026-11-25T10:00:00Z", payload(vec![line(1, 100, 100)]));
        assert!(sale_flags(&plain, now).is_empty());
    }

    #[test]
    fn subtotal_and_tax_must_add_up_to_the_total() {
        let mut l = line(2, 250, 0);
        l.tax_minor = 80;
        let mut p = payload(vec![l]);
        p.totals = Totals {
            subtotal_minor: 420,
            tax_minor: 80,
            total_minor: 500,
        };
        assert_eq!(validate_payload(EventType::Sale, &p), Ok(()));
        let mut wrong_tax = p.clone();
        wrong_tax.totals.tax_minor = 79;
        wrong_tax.totals.subtotal_minor = 421;
        assert!(matches!(
            validate_payload(EventType::Sale, &wrong_tax),
            Err(SaleInvalid::Arithmetic(m)) if m.contains("tax")
        ));
        let mut wrong_subtotal = p;
        wrong_subtotal.totals.subtotal_minor = 500;
        assert!(matches!(
            validate_payload(EventType::Sale, &wrong_subtotal),
            Err(SaleInvalid::Arithmetic(m)) if m.contains("subtotal")
        ));
    }

    #[test]
    fn a_void_restates_the_voided_receipt_with_its_positive_figures() {
        let p = payload(vec![line(2, 250, 0)]);
        assert_eq!(validate_payload(EventType::Void, &p), Ok(()));
        assert!(validate_payload(EventType::Void, &payload(vec![line(-2, 250, 0)])).is_err());
    }

    #[test]
    fn far_times_are_stored_and_flagged_outside_four_digit_years_refused() {
        let now = "2026-11-25T10:00:00Z".parse().expect("time");
        let p = || payload(vec![line(1, 100, 0)]);
        for (at, flags) in [
            ("1970-01-01T00:00:00Z", vec![SaleFlag::ClockBehind]),
            ("0001-01-01T00:00:00Z", vec![SaleFlag::ClockBehind]),
            ("2026-11-26T09:59:59Z", vec![]),
            ("2026-11-26T10:00:01Z", vec![SaleFlag::ClockAhead]),
            ("9999-12-31T23:59:59.999999Z", vec![SaleFlag::ClockAhead]),
        ] {
            let ev = event_at(at, p());
            assert_eq!(validate_event(&ev), Ok(()), "{at}");
            assert_eq!(sale_flags(&ev, now), flags, "{at}");
        }
        let mut ev = event_at("2026-11-25T10:00:00Z", p());
        ev.occurred_at = chrono::NaiveDate::from_ymd_opt(0, 12, 31)
            .and_then(|d| d.and_hms_opt(0, 0, 0))
            .expect("date")
            .and_utc();
        assert!(validate_event(&ev).is_err());
        ev.occurred_at = chrono::NaiveDate::from_ymd_opt(10_000, 1, 1)
            .and_then(|d| d.and_hms_opt(0, 0, 0))
            .expect("date")
            .and_utc();
        assert!(validate_event(&ev).is_err());
    }

    fn arb_text() -> impl Strategy<Value = String> {
        prop_oneof![any::<String>(), "[a-z0-9\\x00-\\x1f]{0,70}"]
    }

    fn arb_event() -> impl Strategy<Value = SaleEvent> {
        let arb_line = (
            arb_text(),
            arb_text(),
            arb_text(),
            any::<i64>(),
            any::<i64>(),
            any::<i64>(),
            any::<i64>(),
            any::<i64>(),
        )
            .prop_map(
                |(product_id, sku, name, qty, unit, disc, tax, total)| SaleLine {
                    product_id,
                    sku,
                    name,
                    qty,
                    unit_price_minor: unit,
                    discount_minor: disc,
                    tax_minor: tax,
                    total_minor: total,
                },
            );
        (
            any::<i64>(),
            arb_text(),
            prop::sample::select(vec![EventType::Sale, EventType::Refund, EventType::Void]),
            any::<i64>(),
            arb_text(),
            arb_text(),
            prop::collection::vec(arb_line, 0..4),
            (any::<i64>(), any::<i64>(), any::<i64>()),
            prop::collection::vec(any::<i64>(), 0..3),
        )
            .prop_map(
                |(id, branch, ty, secs, receipt, currency, lines, (s, t, tot), pays)| SaleEvent {
                    terminal_id: Uuid::nil(),
                    pos_id: Uuid::nil(),
                    local_event_id: id,
                    branch_id: branch,
                    event_type: ty,
                    occurred_at: DateTime::from_timestamp(secs % 300_000_000_000, 0)
                        .unwrap_or_default(),
                    payload: SalePayload {
                        receipt_no: receipt,
                        currency,
                        lines,
                        totals: Totals {
                            subtotal_minor: s,
                            tax_minor: t,
                            total_minor: tot,
                        },
                        payments: pays
                            .into_iter()
                            .map(|amount_minor| Payment {
                                method: PaymentMethod::Card,
                                amount_minor,
                            })
                            .collect(),
                    },
                    chain_hash: None,
                },
            )
    }

    proptest! {
        #[test]
        fn validation_never_panics_and_accepts_only_storable_text(ev in arb_event()) {
            if validate_event(&ev).is_ok() {
                let p = &ev.payload;
                let texts = std::iter::once(&p.receipt_no)
                    .chain(p.lines.iter().flat_map(|l| [&l.product_id, &l.sku, &l.name]));
                for t in texts {
                    prop_assert!(!t.contains('\0'));
                }
                prop_assert!((1..=9999).contains(&ev.occurred_at.year()));
                let now = Utc::now();
                let _ = sale_flags(&ev, now);
            }
        }

        #[test]
        fn the_request_parser_never_panics_on_arbitrary_bytes(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
            let _ = serde_json::from_slice::<SalesEventsRequest>(&bytes);
            let _ = serde_json::from_slice::<crate::ReconcileRequest>(&bytes);
            let _ = serde_json::from_slice::<crate::ErrorEnvelope>(&bytes);
        }

        #[test]
        fn any_serialised_event_parses_back_equal(ev in arb_event()) {
            let text = serde_json::to_string(&ev).expect("serialise");
            let back: SaleEvent = serde_json::from_str(&text).expect("parse");
            prop_assert_eq!(&back, &ev);
            prop_assert_eq!(back.payload_hash(), ev.payload_hash());
        }

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
