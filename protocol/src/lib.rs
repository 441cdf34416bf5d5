//! # possync-protocol
//!
//! Everything the cloud and the terminal must agree on, in one place so they cannot drift:
//! the JSON wire types of the sync API, the stable error codes with their HTTP statuses
//! and retry rules, the canonical entity hash, the sales journal's hash chain, and the validation of a sale.
//!
//! This crate does no I/O.

#![warn(missing_docs)]

pub mod catalog;
pub mod error;
pub mod fingerprint;
pub mod journal_chain;
pub mod sales;
pub mod token;

pub use catalog::*;
pub use error::{ErrorBody, ErrorCode, ErrorEnvelope};
pub use sales::*;

/// Path prefix of every terminal-facing route.
pub const POS_API_PREFIX: &str = "/v1/pos";
/// Headers of every operator page (the till's status page, the cloud's fleet page) besides its
/// own `content-security-policy`: never cached (they show live state and handle tokens), never
/// framed (clickjacking), never sniffed as another type, and no referrer sent on.
pub const OPERATOR_PAGE_HEADERS: [(&str, &str); 4] = [
    ("cache-control", "no-store"),
    ("x-frame-options", "DENY"),
    ("x-content-type-options", "nosniff"),
    ("referrer-policy", "no-referrer"),
];
/// Header every response carries so a log line on either side can be matched to the other.
pub const REQUEST_ID_HEADER: &str = "x-request-id";
/// Header a terminal sends with every sales request: a random id of the device that holds the
/// database, so the cloud can tell two devices sharing one `pos_id` (a cloned disk, a restored
/// backup) apart. See [`ErrorCode::PosSyncPosCloned`].
pub const DEVICE_NONCE_HEADER: &str = "x-device-nonce";
/// Sent by a till with its requests: the catalog version its copy is at (a non-negative
/// integer). The cloud records it beside the till's last contact for the fleet view.
pub const TILL_CATALOG_VERSION_HEADER: &str = "x-possync-catalog-version";
/// Sent by a till with its requests: how many of its sales wait for an operator
/// (`needs_attention`). Recorded like [`TILL_CATALOG_VERSION_HEADER`].
pub const TILL_NEEDS_ATTENTION_HEADER: &str = "x-possync-needs-attention";
