//! The stable error codes of the sync API (the contract's nine, plus `POS_SYNC_POS_CLONED` and
//! `POS_REQUEST_INVALID`) and of the till's loopback API (five, `POS_LOCAL_*`), and the JSON
//! envelope that carries them.
//!
//! A code is a promise to clients: its spelling never changes, and neither does whether a
//! client should retry. Each side maps its own errors onto these codes in exactly one place.

use serde::{Deserialize, Serialize};
use std::fmt;

/// Stable, client-visible error code. The string form is the wire form.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ErrorCode {
    /// Token missing, unknown or revoked (401), or the body names another terminal or branch (403).
    PosSyncUnauthorized,
    /// The caller's leaky bucket is empty; retry after the `Retry-After` header.
    PosSyncRateLimited,
    /// Bad snapshot cursor (400) or a server failure while paging the snapshot (500).
    PosCatalogSnapshotFailed,
    /// Bad `since` (400), `since` older than retained history (410), or server failure (500).
    PosCatalogDeltaFailed,
    /// Malformed reconcile manifest (400) or server failure (500).
    PosCatalogReconcileFailed,
    /// The reconcile manifest holds more entries or bytes than the server accepts.
    PosCatalogManifestTooLarge,
    /// A request body or one event failed its schema, size or arithmetic checks.
    PosSyncEventInvalid,
    /// The idempotency key was already ingested (per-event status, never an HTTP error).
    PosSyncEventDuplicate,
    /// The database could not commit; nothing of the request was stored.
    PosSyncStorageFailed,
    /// The event's `pos_id` is bound to another device (a cloned disk or a restored backup):
    /// per-event status `conflict`, nothing stored. The till moves its unsent sales to a new
    /// `pos_id` and delivers them again; never an operator's job.
    PosSyncPosCloned,
    /// Till loopback API: the request's `Host` is not one the daemon answers to (403) — the
    /// mark of DNS rebinding, or of a name the operator did not allow with `--allowed-host`.
    PosLocalHostNotAllowed,
    /// Till loopback API: the request comes from a web page of another origin (403), even
    /// when it carries a valid token.
    PosLocalOriginNotAllowed,
    /// Till loopback API: a state-changing request without a valid local token (401), or with
    /// the operator page's token on a route that token does not open (403).
    PosLocalUnauthorized,
    /// Till loopback API: a `POST` body that is not declared `application/json` (415).
    PosLocalUnsupportedMediaType,
    /// Till loopback API: a `POST /sales` whose `Idempotency-Key` already recorded a different
    /// sale request (409). Nothing new is stored; retrying the same request cannot succeed, a
    /// new sale needs a new key.
    PosLocalIdempotencyKeyReused,
    /// The request is not one this API serves: unknown path (404), wrong method (405), a body
    /// that did not arrive in time (408), an over-long URL (414) or a malformed request (400).
    /// Beyond the contract's nine codes, so that every non-2xx answer has a stable code.
    PosRequestInvalid,
    /// The event's `chain_hash` does not follow from its predecessor's `chain_hash` and its
    /// own canonical bytes (see `journal_chain`): one of the two was changed after the till
    /// chained it. Per-event code on an `accepted` (stored) event, never an HTTP error: the
    /// journal is evidence, so the event is kept and the break recorded.
    PosSyncChainBreak,
}

impl ErrorCode {
    /// Every code, in the order of the contract's table.
    pub const ALL: [ErrorCode; 17] = [
        ErrorCode::PosSyncUnauthorized,
        ErrorCode::PosSyncRateLimited,
        ErrorCode::PosCatalogSnapshotFailed,
        ErrorCode::PosCatalogDeltaFailed,
        ErrorCode::PosCatalogReconcileFailed,
        ErrorCode::PosCatalogManifestTooLarge,
        ErrorCode::PosSyncEventInvalid,
        ErrorCode::PosSyncEventDuplicate,
        ErrorCode::PosSyncStorageFailed,
        ErrorCode::PosSyncPosCloned,
        ErrorCode::PosLocalHostNotAllowed,
        ErrorCode::PosLocalOriginNotAllowed,
        ErrorCode::PosLocalUnauthorized,
        ErrorCode::PosLocalUnsupportedMediaType,
        ErrorCode::PosRequestInvalid,
        ErrorCode::PosSyncChainBreak,
        ErrorCode::PosLocalIdempotencyKeyReused,
    ];

    /// The codes only the till's loopback API answers (never the cloud).
    pub const LOCAL_API: [ErrorCode; 5] = [
        ErrorCode::PosLocalHostNotAllowed,
        ErrorCode::PosLocalOriginNotAllowed,
        ErrorCode::PosLocalUnauthorized,
        ErrorCode::PosLocalUnsupportedMediaType,
        ErrorCode::PosLocalIdempotencyKeyReused,
    ];

    /// Whether only the till's loopback API answers this code.
    pub fn is_local_api(self) -> bool {
        ErrorCode::LOCAL_API.contains(&self)
    }

    /// The wire spelling, e.g. `POS_SYNC_RATE_LIMITED`.
    pub const fn as_str(self) -> &'static str {
        match self {
            ErrorCode::PosSyncUnauthorized => "POS_SYNC_UNAUTHORIZED",
            ErrorCode::PosSyncRateLimited => "POS_SYNC_RATE_LIMITED",
            ErrorCode::PosCatalogSnapshotFailed => "POS_CATALOG_SNAPSHOT_FAILED",
            ErrorCode::PosCatalogDeltaFailed => "POS_CATALOG_DELTA_FAILED",
            ErrorCode::PosCatalogReconcileFailed => "POS_CATALOG_RECONCILE_FAILED",
            ErrorCode::PosCatalogManifestTooLarge => "POS_CATALOG_MANIFEST_TOO_LARGE",
            ErrorCode::PosSyncEventInvalid => "POS_SYNC_EVENT_INVALID",
            ErrorCode::PosSyncEventDuplicate => "POS_SYNC_EVENT_DUPLICATE",
            ErrorCode::PosSyncStorageFailed => "POS_SYNC_STORAGE_FAILED",
            ErrorCode::PosLocalHostNotAllowed => "POS_LOCAL_HOST_NOT_ALLOWED",
            ErrorCode::PosLocalOriginNotAllowed => "POS_LOCAL_ORIGIN_NOT_ALLOWED",
            ErrorCode::PosLocalUnauthorized => "POS_LOCAL_UNAUTHORIZED",
            ErrorCode::PosLocalUnsupportedMediaType => "POS_LOCAL_UNSUPPORTED_MEDIA_TYPE",
            ErrorCode::PosLocalIdempotencyKeyReused => "POS_LOCAL_IDEMPOTENCY_KEY_REUSED",
            ErrorCode::PosSyncPosCloned => "POS_SYNC_POS_CLONED",
            ErrorCode::PosRequestInvalid => "POS_REQUEST_INVALID",
            ErrorCode::PosSyncChainBreak => "POS_SYNC_CHAIN_BREAK",
        }
    }

    /// Parses the wire spelling back into a code.
    pub fn parse(s: &str) -> Option<ErrorCode> {
        ErrorCode::ALL.into_iter().find(|c| c.as_str() == s)
    }

    /// Whether a client may retry the same request unchanged, given the HTTP status it got.
    ///
    /// Client mistakes (4xx other than 429) never become right by retrying; server-side
    /// failures (5xx) and rate limiting do.
    pub fn can_retry(self, http_status: u16) -> bool {
        match self {
            ErrorCode::PosSyncRateLimited | ErrorCode::PosSyncStorageFailed => true,
            ErrorCode::PosCatalogSnapshotFailed
            | ErrorCode::PosCatalogDeltaFailed
            | ErrorCode::PosCatalogReconcileFailed => http_status >= 500,
            // A body cut by the read timeout may arrive in time on the next try.
            ErrorCode::PosRequestInvalid => http_status == 408,
            ErrorCode::PosSyncUnauthorized
            | ErrorCode::PosCatalogManifestTooLarge
            | ErrorCode::PosSyncEventInvalid
            | ErrorCode::PosSyncEventDuplicate
            | ErrorCode::PosLocalHostNotAllowed
            | ErrorCode::PosLocalOriginNotAllowed
            | ErrorCode::PosLocalUnauthorized
            | ErrorCode::PosLocalUnsupportedMediaType
            | ErrorCode::PosLocalIdempotencyKeyReused
            | ErrorCode::PosSyncPosCloned
            | ErrorCode::PosSyncChainBreak => false,
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The body of every non-2xx response: `{"error": {...}}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorEnvelope {
    /// What went wrong.
    pub error: ErrorBody,
}

/// What went wrong, for a machine (`code`, `retryable`, `details`) and a person (`message`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// The stable code.
    pub code: ErrorCode,
    /// For people; never parsed.
    pub message: String,
    /// Whether the same request may succeed later unchanged.
    pub retryable: bool,
    #[serde(default)]
    /// Machine-readable specifics, e.g. `max_entries`, `reason`, `retry_after_secs`.
    pub details: serde_json::Value,
}

impl ErrorEnvelope {
    /// Builds an envelope whose `retryable` flag follows [`ErrorCode::can_retry`].
    pub fn new(code: ErrorCode, http_status: u16, message: impl Into<String>) -> Self {
        ErrorEnvelope {
            error: ErrorBody {
                code,
                message: message.into(),
                retryable: code.can_retry(http_status),
                details: serde_json::Value::Object(serde_json::Map::new()),
            },
        }
    }

    /// Attaches machine-readable details (e.g. `{"max_entries": 2000}`).
    pub fn with_details(mut self, details: serde_json::Value) -> Self {
        self.error.details = details;
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_spelling_round_trips_through_serde_and_parse() {
        for code in ErrorCode::ALL {
            let json = serde_json::to_string(&code).expect("serialize");
            assert_eq!(json, format!("\"{}\"", code.as_str()));
            let back: ErrorCode = serde_json::from_str(&json).expect("deserialize");
            assert_eq!(back, code);
            assert_eq!(ErrorCode::parse(code.as_str()), Some(code));
        }
        assert_eq!(ErrorCode::parse("POS_SOMETHING_ELSE"), None);
    }

    #[test]
    fn retryable_follows_the_contract_table() {
        assert!(ErrorCode::PosSyncRateLimited.can_retry(429));
        assert!(ErrorCode::PosSyncStorageFailed.can_retry(503));
        assert!(ErrorCode::PosCatalogDeltaFailed.can_retry(500));
        assert!(!ErrorCode::PosCatalogDeltaFailed.can_retry(410));
        assert!(!ErrorCode::PosCatalogSnapshotFailed.can_retry(400));
        assert!(!ErrorCode::PosSyncUnauthorized.can_retry(401));
        assert!(!ErrorCode::PosCatalogManifestTooLarge.can_retry(413));
        assert!(!ErrorCode::PosSyncEventInvalid.can_retry(422));
        // Resending under the same pos_id cannot succeed; the till forks instead.
        assert!(!ErrorCode::PosSyncPosCloned.can_retry(200));
        assert!(!ErrorCode::PosLocalHostNotAllowed.can_retry(403));
        assert!(!ErrorCode::PosLocalUnauthorized.can_retry(401));
        assert!(!ErrorCode::PosLocalUnsupportedMediaType.can_retry(415));
        assert!(!ErrorCode::PosLocalIdempotencyKeyReused.can_retry(409));
        assert!(ErrorCode::PosLocalIdempotencyKeyReused.is_local_api());
        assert!(!ErrorCode::PosRequestInvalid.can_retry(404));
        assert!(!ErrorCode::PosRequestInvalid.can_retry(405));
        assert!(ErrorCode::PosRequestInvalid.can_retry(408));
    }

    #[test]
    fn envelope_has_the_contract_shape() {
        let env = ErrorEnvelope::new(ErrorCode::PosCatalogManifestTooLarge, 413, "too many")
            .with_details(serde_json::json!({"max_entries": 2000}));
        let v = serde_json::to_value(&env).expect("serialize");
        assert_eq!(v["error"]["code"], "POS_CATALOG_MANIFEST_TOO_LARGE");
        assert_eq!(v["error"]["retryable"], false);
        assert_eq!(v["error"]["details"]["max_entries"], 2000);
    }
}
