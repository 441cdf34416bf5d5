//! What each terminal sells: a seeded stream of valid receipts (and occasional refunds) over
//! the simulated catalog's products, with a seeded pause before each one.
//!
//! Every receipt is checked with the same `validate_payload` the terminal and the cloud run,
//! so a sale the simulation records can only go missing through a sync defect, never through
//! a bad payload.

use std::time::Duration;

use possync_protocol::{
    validate_payload, EventType, Payment, PaymentMethod, SaleLine, SalePayload, Totals,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Number of products the simulated catalog starts with (ids `p-0000` …).
pub const PRODUCTS: usize = 40;

/// Id of the `i`-th simulated product.
pub fn product_id(i: usize) -> String {
    format!("p-{i:04}")
}

/// Base unit price of the `i`-th product, in minor units.
pub fn product_price(i: usize) -> i64 {
    100 + (i as i64 * 37) % 900
}

/// One sale a terminal will record: the body of the daemon's `POST /sales`.
#[derive(Debug, Clone, PartialEq)]
pub struct ScriptedSale {
    /// `sale` or `refund`.
    pub event_type: EventType,
    /// The receipt.
    pub payload: SalePayload,
    /// Pause before recording it.
    pub pause: Duration,
}

impl ScriptedSale {
    /// The `POST /sales` JSON body.
    pub fn body(&self) -> serde_json::Value {
        serde_json::json!({
            "type": self.event_type,
            "occurred_at": chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            "payload": self.payload,
        })
    }
}

/// The seeded sales stream of one terminal.
pub struct SaleScript {
    rng: StdRng,
    prefix: String,
    next_no: u32,
    pace_ms: u64,
}

impl SaleScript {
    /// `prefix` makes receipt numbers readable (`B0-T3-000017`); `pace_ms` is the mean pause
    /// between sales.
    pub fn new(seed: u64, terminal_index: usize, prefix: String, pace_ms: u64) -> SaleScript {
        let stream = seed ^ 0x5A1E_0000_0000 ^ ((terminal_index as u64 + 1) << 20);
        SaleScript {
            rng: StdRng::seed_from_u64(stream),
            prefix,
            next_no: 1,
            pace_ms,
        }
    }

    /// The next receipt: 1–4 lines, about one in twelve a refund.
    pub fn next_sale(&mut self) -> ScriptedSale {
        let refund = self.next_no > 1 && self.rng.random_bool(1.0 / 12.0);
        let event_type = if refund {
            EventType::Refund
        } else {
            EventType::Sale
        };
        let n_lines = self.rng.random_range(1..=4);
        let mut lines = Vec::with_capacity(n_lines);
        for _ in 0..n_lines {
            let p = self.rng.random_range(0..PRODUCTS);
            let unit = product_price(p);
            let mut qty: i64 = self.rng.random_range(1..=3);
            if refund {
                qty = -qty;
            }
            let discount = if !refund && self.rng.random_bool(0.2) {
                self.rng.random_range(0..=unit / 10)
            } else {
                0
            };
            let total = qty * unit - discount;
            lines.push(SaleLine {
                product_id: product_id(p),
                sku: format!("SKU-{p:04}"),
                name: format!("Product {p}"),
                qty,
                unit_price_minor: unit,
                discount_minor: discount,
                tax_minor: (total.abs() * 2) / 12,
                total_minor: total,
            });
        }
        let total: i64 = lines.iter().map(|l| l.total_minor).sum();
        let tax: i64 = lines.iter().map(|l| l.tax_minor).sum();
        let method = match self.rng.random_range(0..3) {
            0 => PaymentMethod::Cash,
            1 => PaymentMethod::Card,
            _ => PaymentMethod::Other,
        };
        let payload = SalePayload {
            receipt_no: format!("{}-{:06}", self.prefix, self.next_no),
            currency: "EUR".into(),
            lines,
            totals: Totals {
                subtotal_minor: total - tax,
                tax_minor: tax,
                total_minor: total,
            },
            payments: vec![Payment {
                method,
                amount_minor: total,
            }],
        };
        self.next_no += 1;
        let pause = Duration::from_millis(if self.pace_ms == 0 {
            0
        } else {
            self.rng.random_range(0..=self.pace_ms * 2)
        });
        ScriptedSale {
            event_type,
            payload,
            pause,
        }
    }
}

/// Checks a scripted sale with the protocol's validation (the harness refuses to send a sale
/// that would be rejected for its content).
pub fn is_valid(sale: &ScriptedSale) -> bool {
    validate_payload(sale.event_type, &sale.payload).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_scripted_sale_is_valid_and_some_are_refunds() {
        let mut s = SaleScript::new(11, 0, "B0-T0".into(), 5);
        let sales: Vec<_> = (0..500).map(|_| s.next_sale()).collect();
        assert!(sales.iter().all(is_valid));
        let refunds = sales
            .iter()
            .filter(|s| s.event_type == EventType::Refund)
            .count();
        assert!(refunds > 10 && refunds < 100, "refunds: {refunds}");
        assert_eq!(sales[41].payload.receipt_no, "B0-T0-000042");
    }

    #[test]
    fn the_script_is_a_function_of_seed_and_terminal() {
        let take = |seed, t| {
            let mut s = SaleScript::new(seed, t, "x".into(), 5);
            (0..20).map(|_| s.next_sale()).collect::<Vec<_>>()
        };
        assert_eq!(take(1, 0), take(1, 0));
        assert_ne!(take(1, 0), take(1, 1));
        assert_ne!(take(1, 0), take(2, 0));
    }
}
