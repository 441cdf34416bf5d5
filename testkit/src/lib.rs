//! # possync-testkit
//!
//! Shared test support so every crate tests against the same real things: a fresh PostgreSQL
//! database per test ([`pg`]), a real `cloud serve` process on port 0 ([`cloud`]), the fleet deployment of
//! `scripts/cluster` — nginx with TLS over several clouds ([`cluster`]), the way
//! every harness finds and starts the real binaries ([`process`]), headless Chromium for the
//! operator pages ([`webdriver`]), and sample
//! sales that pass the protocol's validation (below), so tests differ only in what they test.

pub mod cloud;
pub mod cluster;
pub mod metrics_text;
pub mod pg;
pub mod process;
pub mod webdriver;

use chrono::{TimeZone, Utc};
use possync_protocol::{
    EventType, Payment, PaymentMethod, SaleEvent, SaleLine, SalePayload, Totals,
};
use uuid::Uuid;

/// A valid sale of `local_event_id` by `terminal_id`/`pos_id` in `branch`: two lines whose
/// amounts depend on `local_event_id` (so different ids give different payload hashes), paid in
/// cash. `validate_event` accepts it.
pub fn sample_sale_event(
    terminal_id: Uuid,
    pos_id: Uuid,
    local_event_id: i64,
    branch: &str,
) -> SaleEvent {
    let unit = 100 + (local_event_id.rem_euclid(50)) * 10;
    let lines = vec![
        SaleLine {
            product_id: "prod-coffee".into(),
            sku: "SKU-COFFEE".into(),
            name: "Coffee".into(),
            qty: 2,
            unit_price_minor: unit,
            discount_minor: 0,
            tax_minor: 0,
            total_minor: 2 * unit,
        },
        SaleLine {
            product_id: "prod-bun".into(),
            sku: "SKU-BUN".into(),
            name: "Bun".into(),
            qty: 1,
            unit_price_minor: 250,
            discount_minor: 50,
            tax_minor: 0,
            total_minor: 200,
        },
    ];
    SaleEvent {
        terminal_id,
        pos_id,
        local_event_id,
        branch_id: branch.to_string(),
        event_type: EventType::Sale,
        occurred_at: Utc
            .timestamp_opt(1_700_000_000 + local_event_id, 0)
            .single()
            .unwrap_or_else(Utc::now),
        payload: cash_payload(format!("R-{local_event_id:06}"), lines),
        chain_hash: None,
    }
}

/// A valid one-line cash sale: `qty` × `unit` minor units of coffee, no discount or tax.
pub fn one_line_payload(receipt_no: &str, qty: i64, unit: i64) -> SalePayload {
    cash_payload(
        receipt_no.to_string(),
        vec![SaleLine {
            product_id: "p-coffee".into(),
            sku: "SKU-COFFEE".into(),
            name: "Coffee".into(),
            qty,
            unit_price_minor: unit,
            discount_minor: 0,
            tax_minor: 0,
            total_minor: qty * unit,
        }],
    )
}

/// A EUR sale of `lines` whose totals are the sum of the lines, paid in one cash payment: the
/// arithmetic every sample must get right, written once.
fn cash_payload(receipt_no: String, lines: Vec<SaleLine>) -> SalePayload {
    let total: i64 = lines.iter().map(|l| l.total_minor).sum();
    SalePayload {
        receipt_no,
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

/// The same sale with different money: same idempotency key, different payload hash (a
/// `conflict` when the first one is already stored).
pub fn conflicting_sale_event(original: &SaleEvent) -> SaleEvent {
    let mut e = original.clone();
    for l in &mut e.payload.lines {
        l.unit_price_minor += 1;
        l.total_minor = l.qty * l.unit_price_minor - l.discount_minor;
    }
    let total: i64 = e.payload.lines.iter().map(|l| l.total_minor).sum();
    e.payload.totals.subtotal_minor = total;
    e.payload.totals.total_minor = total;
    for p in &mut e.payload.payments {
        p.amount_minor = total;
    }
    e
}

/// A sale whose first line's total does not match `qty * unit_price_minor - discount_minor`:
/// schema-valid JSON that fails the arithmetic check.
pub fn arithmetic_failure_event(
    terminal_id: Uuid,
    pos_id: Uuid,
    local_event_id: i64,
    branch: &str,
) -> SaleEvent {
    let mut e = sample_sale_event(terminal_id, pos_id, local_event_id, branch);
    e.payload.lines[0].total_minor += 1;
    e
}

/// Sets each event's `chain_hash` as the till does, `events` being consecutive ids of one
/// `pos_id` starting at `first.local_event_id` (`prev` = genesis for id 1).
///
/// # Panics
/// If an event cannot be hashed (sample events always can).
pub fn chain_sale_events(events: &mut [SaleEvent]) {
    let mut prev: Option<String> = None;
    for e in events.iter_mut() {
        let p =
            possync_protocol::journal_chain::prev_of(e.pos_id, e.local_event_id, prev.as_deref());
        let h = e.expected_chain_hash(&p).expect("a sample event hashes");
        e.chain_hash = Some(h.clone());
        prev = Some(h);
    }
}

/// `{"events": [...]}` for `POST /v1/pos/sales/events`.
pub fn events_body(events: &[SaleEvent]) -> serde_json::Value {
    serde_json::json!({ "events": events })
}

#[cfg(test)]
mod tests {
    use super::*;
    use possync_protocol::validate_event;

    #[test]
    fn samples_pass_validation_and_differ_by_id() {
        let t = Uuid::now_v7();
        let p = Uuid::now_v7();
        let a = sample_sale_event(t, p, 1, "b1");
        let b = sample_sale_event(t, p, 2, "b1");
        assert_eq!(validate_event(&a), Ok(()));
        assert_eq!(validate_event(&b), Ok(()));
        assert_ne!(a.payload_hash(), b.payload_hash());
    }

    #[test]
    fn conflicting_sale_is_valid_with_another_hash() {
        let a = sample_sale_event(Uuid::now_v7(), Uuid::now_v7(), 7, "b1");
        let c = conflicting_sale_event(&a);
        assert_eq!(validate_event(&c), Ok(()));
        assert_ne!(a.payload_hash(), c.payload_hash());
    }

    #[test]
    fn one_line_payload_passes_validation_with_its_total() {
        let p = one_line_payload("R-000001", 3, 120);
        assert_eq!(
            possync_protocol::validate_payload(EventType::Sale, &p),
            Ok(())
        );
        assert_eq!(p.totals.total_minor, 360);
        assert_eq!(p.payments[0].amount_minor, 360);
    }

    #[test]
    fn arithmetic_failure_fails_validation() {
        let e = arithmetic_failure_event(Uuid::now_v7(), Uuid::now_v7(), 3, "b1");
        assert!(validate_event(&e).is_err());
    }
}
