//! The one error type of the HTTP boundary, mapped once to a status, a stable
//! [`ErrorCode`], the contract's JSON envelope and a log level.
//!
//! Handlers never build error responses themselves: they return an [`ApiError`], so a code's
//! status and `retryable` flag cannot differ between routes, and client mistakes can never
//! surface as a 500.

use actix_web::http::{header, StatusCode};
use actix_web::{HttpResponse, ResponseError};
use possync_protocol::{ErrorCode, ErrorEnvelope};
use serde_json::json;
use thiserror::Error;

/// Everything a request can fail with, named by what went wrong rather than by status.
#[derive(Debug, Error)]
pub enum ApiError {
    /// No bearer token, or one that is unknown or revoked. Says nothing more on purpose.
    #[error("missing, unknown or revoked token")]
    Unauthenticated,
    /// The token is valid but the request names another terminal or branch.
    #[error("{0}")]
    Forbidden(String),
    /// The caller's leaky bucket is empty.
    #[error("rate limit exceeded; retry after {retry_after_secs}s")]
    RateLimited {
        /// Whole seconds (≥ 1) until a request will be admitted again.
        retry_after_secs: u64,
    },
    /// The snapshot `cursor` or `limit` is not one this server handed out or accepts.
    #[error("bad snapshot request: {0}")]
    SnapshotBadRequest(String),
    /// The snapshot could not be read (database trouble).
    #[error("snapshot failed: {0}")]
    SnapshotFailed(String),
    /// `since` or `limit` is malformed.
    #[error("bad delta request: {0}")]
    DeltaBadRequest(String),
    /// `since` predates the tombstone horizon: the terminal must take a new snapshot.
    #[error("since is older than the retained history (horizon {horizon}); take a new snapshot")]
    ResnapshotRequired {
        /// Oldest `since` still served.
        horizon: i64,
    },
    /// The delta could not be read (database trouble).
    #[error("delta failed: {0}")]
    DeltaFailed(String),
    /// The reconcile manifest is not valid.
    #[error("malformed reconcile manifest: {0}")]
    ReconcileMalformed(String),
    /// Reconcile could not be computed (database trouble).
    #[error("reconcile failed: {0}")]
    ReconcileFailed(String),
    /// The manifest holds more entries (or bytes) than the server accepts.
    #[error("manifest too large: at most {max_entries} entries and {max_bytes} bytes; split it into ranges")]
    ManifestTooLarge {
        /// Entry limit.
        max_entries: usize,
        /// Byte limit of the request body.
        max_bytes: usize,
    },
    /// The request body is not what the route expects (not JSON, wrong shape, wrong type).
    #[error("invalid request: {0}")]
    InvalidBody(String),
    /// The request body or event count is over the limit.
    #[error("request too large: {0}")]
    BodyTooLarge(String),
    /// The database could not commit or be reached; nothing of the request was stored.
    #[error("storage unavailable: {0}")]
    StorageFailed(String),
    /// No route has this path.
    #[error("no such route: {0}")]
    NoSuchRoute(String),
    /// The path exists, but not for this method.
    #[error("method {0} is not served on this path")]
    MethodNotAllowed(String),
    /// The body did not arrive within the body read timeout.
    #[error("the request body did not arrive within {secs}s")]
    BodyTimeout {
        /// The timeout, in seconds.
        secs: u64,
    },
    /// The request target is longer than the server reads.
    #[error("the URL is over {max} bytes")]
    UriTooLong {
        /// Longest path plus query accepted.
        max: usize,
    },
    /// The request is malformed at the HTTP level (headers, query string, framing).
    #[error("malformed request: {0}")]
    Malformed(String),
}

impl ApiError {
    /// The envelope-carrying error for a bare error response produced outside the handlers
    /// (actix's own 404/405/400/413/…), keyed by its status and named by `what`.
    pub fn for_bare_status(status: StatusCode, what: String) -> ApiError {
        match status {
            StatusCode::NOT_FOUND => ApiError::NoSuchRoute(what),
            StatusCode::METHOD_NOT_ALLOWED => ApiError::MethodNotAllowed(what),
            StatusCode::PAYLOAD_TOO_LARGE => ApiError::BodyTooLarge(what),
            StatusCode::URI_TOO_LONG => ApiError::UriTooLong {
                max: crate::app::MAX_URI_BYTES,
            },
            s if s.is_server_error() => ApiError::StorageFailed(what),
            _ => ApiError::Malformed(what),
        }
    }
}

impl ApiError {
    /// The stable code this error is reported with.
    pub fn code(&self) -> ErrorCode {
        match self {
            ApiError::Unauthenticated | ApiError::Forbidden(_) => ErrorCode::PosSyncUnauthorized,
            ApiError::RateLimited { .. } => ErrorCode::PosSyncRateLimited,
            ApiError::SnapshotBadRequest(_) | ApiError::SnapshotFailed(_) => {
                ErrorCode::PosCatalogSnapshotFailed
            }
            ApiError::DeltaBadRequest(_)
            | ApiError::ResnapshotRequired { .. }
            | ApiError::DeltaFailed(_) => ErrorCode::PosCatalogDeltaFailed,
            ApiError::ReconcileMalformed(_) | ApiError::ReconcileFailed(_) => {
                ErrorCode::PosCatalogReconcileFailed
            }
            ApiError::ManifestTooLarge { .. } => ErrorCode::PosCatalogManifestTooLarge,
            ApiError::InvalidBody(_) | ApiError::BodyTooLarge(_) => ErrorCode::PosSyncEventInvalid,
            ApiError::StorageFailed(_) => ErrorCode::PosSyncStorageFailed,
            ApiError::NoSuchRoute(_)
            | ApiError::MethodNotAllowed(_)
            | ApiError::BodyTimeout { .. }
            | ApiError::UriTooLong { .. }
            | ApiError::Malformed(_) => ErrorCode::PosRequestInvalid,
        }
    }

    fn details(&self) -> serde_json::Value {
        match self {
            ApiError::ResnapshotRequired { horizon } => {
                json!({"reason": "resnapshot_required", "horizon": horizon})
            }
            ApiError::ManifestTooLarge {
                max_entries,
                max_bytes,
            } => json!({"max_entries": max_entries, "max_bytes": max_bytes}),
            ApiError::RateLimited { retry_after_secs } => {
                json!({"retry_after_secs": retry_after_secs})
            }
            ApiError::BodyTimeout { secs } => json!({"timeout_secs": secs}),
            ApiError::UriTooLong { max } => json!({"max_uri_bytes": max}),
            _ => json!({}),
        }
    }

    /// Whether this is the server's fault (logged at `error`) rather than the client's (`info`).
    pub fn is_server_fault(&self) -> bool {
        self.status_code().is_server_error()
    }
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        match self {
            ApiError::Unauthenticated => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            ApiError::SnapshotBadRequest(_)
            | ApiError::DeltaBadRequest(_)
            | ApiError::ReconcileMalformed(_)
            | ApiError::InvalidBody(_) => StatusCode::BAD_REQUEST,
            ApiError::ResnapshotRequired { .. } => StatusCode::GONE,
            ApiError::ManifestTooLarge { .. } | ApiError::BodyTooLarge(_) => {
                StatusCode::PAYLOAD_TOO_LARGE
            }
            ApiError::SnapshotFailed(_)
            | ApiError::DeltaFailed(_)
            | ApiError::ReconcileFailed(_) => StatusCode::INTERNAL_SERVER_ERROR,
            ApiError::StorageFailed(_) => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::NoSuchRoute(_) => StatusCode::NOT_FOUND,
            ApiError::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::BodyTimeout { .. } => StatusCode::REQUEST_TIMEOUT,
            ApiError::UriTooLong { .. } => StatusCode::URI_TOO_LONG,
            ApiError::Malformed(_) => StatusCode::BAD_REQUEST,
        }
    }

    fn error_response(&self) -> HttpResponse {
        let status = self.status_code();
        let code = self.code();
        // Server-side causes can name internals (hosts, SQL); clients get a generic text.
        let message = if self.is_server_fault() {
            tracing::error!(errorCode = code.as_str(), status = status.as_u16(), cause = %self, "request failed");
            match self {
                ApiError::StorageFailed(_) => {
                    "the database could not commit; nothing was stored, retry later".to_string()
                }
                _ => "internal failure; retry later".to_string(),
            }
        } else {
            tracing::info!(errorCode = code.as_str(), status = status.as_u16(), cause = %self, "request refused");
            self.to_string()
        };
        let envelope =
            ErrorEnvelope::new(code, status.as_u16(), message).with_details(self.details());
        let mut resp = HttpResponse::build(status);
        if let ApiError::RateLimited { retry_after_secs } = self {
            resp.insert_header((header::RETRY_AFTER, retry_after_secs.max(&1).to_string()));
        }
        if matches!(self, ApiError::Unauthenticated) {
            resp.insert_header((header::WWW_AUTHENTICATE, "Bearer"));
        }
        resp.json(envelope)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use actix_web::body::MessageBody;

    fn body_of(e: &ApiError) -> (u16, serde_json::Value, Option<String>) {
        let resp = e.error_response();
        let status = resp.status().as_u16();
        let retry = resp
            .headers()
            .get(header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let bytes = resp.into_body().try_into_bytes().unwrap_or_default();
        let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap_or_default();
        (status, v, retry)
    }

    #[test]
    fn every_variant_has_the_contract_status_and_retry_flag() {
        let cases: Vec<(ApiError, u16, ErrorCode, bool)> = vec![
            (
                ApiError::Unauthenticated,
                401,
                ErrorCode::PosSyncUnauthorized,
                false,
            ),
            (
                ApiError::Forbidden("x".into()),
                403,
                ErrorCode::PosSyncUnauthorized,
                false,
            ),
            (
                ApiError::RateLimited {
                    retry_after_secs: 2,
                },
                429,
                ErrorCode::PosSyncRateLimited,
                true,
            ),
            (
                ApiError::SnapshotBadRequest("c".into()),
                400,
                ErrorCode::PosCatalogSnapshotFailed,
                false,
            ),
            (
                ApiError::SnapshotFailed("db".into()),
                500,
                ErrorCode::PosCatalogSnapshotFailed,
                true,
            ),
            (
                ApiError::DeltaBadRequest("s".into()),
                400,
                ErrorCode::PosCatalogDeltaFailed,
                false,
            ),
            (
                ApiError::ResnapshotRequired { horizon: 7 },
                410,
                ErrorCode::PosCatalogDeltaFailed,
                false,
            ),
            (
                ApiError::ReconcileMalformed("m".into()),
                400,
                ErrorCode::PosCatalogReconcileFailed,
                false,
            ),
            (
                ApiError::ManifestTooLarge {
                    max_entries: 2000,
                    max_bytes: 10,
                },
                413,
                ErrorCode::PosCatalogManifestTooLarge,
                false,
            ),
            (
                ApiError::InvalidBody("j".into()),
                400,
                ErrorCode::PosSyncEventInvalid,
                false,
            ),
            (
                ApiError::BodyTooLarge("b".into()),
                413,
                ErrorCode::PosSyncEventInvalid,
                false,
            ),
            (
                ApiError::StorageFailed("down".into()),
                503,
                ErrorCode::PosSyncStorageFailed,
                true,
            ),
            (
                ApiError::NoSuchRoute("/x".into()),
                404,
                ErrorCode::PosRequestInvalid,
                false,
            ),
            (
                ApiError::MethodNotAllowed("PUT".into()),
                405,
                ErrorCode::PosRequestInvalid,
                false,
            ),
            (
                ApiError::BodyTimeout { secs: 30 },
                408,
                ErrorCode::PosRequestInvalid,
                true,
            ),
            (
                ApiError::UriTooLong { max: 8192 },
                414,
                ErrorCode::PosRequestInvalid,
                false,
            ),
            (
                ApiError::Malformed("x".into()),
                400,
                ErrorCode::PosRequestInvalid,
                false,
            ),
        ];
        for (err, status, code, retryable) in cases {
            let (s, body, _) = body_of(&err);
            assert_eq!(s, status, "{err:?}");
            assert_eq!(body["error"]["code"], code.as_str(), "{err:?}");
            assert_eq!(body["error"]["retryable"], retryable, "{err:?}");
        }
    }

    #[test]
    fn rate_limited_carries_retry_after_of_at_least_one_second() {
        let (_, body, retry) = body_of(&ApiError::RateLimited {
            retry_after_secs: 0,
        });
        assert_eq!(retry.as_deref(), Some("1"));
        assert_eq!(
            body["error"]["code"],
            ErrorCode::PosSyncRateLimited.as_str()
        );
    }

    #[test]
    fn resnapshot_and_manifest_details_are_machine_readable() {
        let (_, body, _) = body_of(&ApiError::ResnapshotRequired { horizon: 42 });
        assert_eq!(body["error"]["details"]["reason"], "resnapshot_required");
        let (_, body, _) = body_of(&ApiError::ManifestTooLarge {
            max_entries: 2000,
            max_bytes: 1,
        });
        assert_eq!(body["error"]["details"]["max_entries"], 2000);
    }

    #[test]
    fn server_faults_do_not_leak_their_cause() {
        let (_, body, _) = body_of(&ApiError::StorageFailed("host=10.0.0.5 password".into()));
        let msg = body["error"]["message"].as_str().expect("a message");
        assert!(!msg.is_empty() && !msg.contains("10.0.0.5"), "{msg}");
    }
}
