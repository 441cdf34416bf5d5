//! Reading request bodies under a byte limit, with the route's own error for "too large" and
//! "not JSON", so a client mistake is always answered with that route's stable code (actix's
//! built-in extractors would answer with their own plain-text errors).

use actix_web::http::header;
use actix_web::web::{Bytes, BytesMut, Payload};
use actix_web::HttpRequest;
use futures::StreamExt;

use crate::error::ApiError;

/// Whether the request declares a JSON body (`application/json`, parameters allowed).
pub fn is_json(req: &HttpRequest) -> bool {
    req.headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .map(|m| {
            let m = m.trim();
            let b = m.as_bytes();
            m.eq_ignore_ascii_case("application/json")
                || (b.len() > 5 && b[b.len() - 5..].eq_ignore_ascii_case(b"+json"))
        })
        .unwrap_or(false)
}

/// Reads the whole body, failing with `too_large()` as soon as more than `limit` bytes are
/// announced or received, with `broken(cause)` if the stream fails, and with
/// [`ApiError::BodyTimeout`] (408) when the whole body has not arrived within the server's body
/// timeout (`--body-timeout-secs`): a client trickling its body cannot hold a worker's memory and
/// a connection for longer than that.
pub async fn read_limited(
    req: &HttpRequest,
    payload: Payload,
    limit: usize,
    too_large: impl Fn() -> ApiError,
    broken: impl Fn(String) -> ApiError,
) -> Result<Bytes, ApiError> {
    let timeout = req
        .app_data::<actix_web::web::Data<crate::app::AppState>>()
        .map_or(DEFAULT_BODY_TIMEOUT, |s| s.limits.body_timeout);
    tokio::time::timeout(timeout, read_all(req, payload, limit, too_large, broken))
        .await
        .map_err(|_| ApiError::BodyTimeout {
            secs: timeout.as_secs(),
        })?
}

/// The body read timeout when the server was not given one.
pub const DEFAULT_BODY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

async fn read_all(
    req: &HttpRequest,
    mut payload: Payload,
    limit: usize,
    too_large: impl Fn() -> ApiError,
    broken: impl Fn(String) -> ApiError,
) -> Result<Bytes, ApiError> {
    if let Some(len) = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
    {
        if len > limit as u64 {
            return Err(too_large());
        }
    }
    let mut buf = BytesMut::new();
    while let Some(chunk) = payload.next().await {
        let chunk = chunk.map_err(|e| broken(e.to_string()))?;
        if buf.len() + chunk.len() > limit {
            return Err(too_large());
        }
        buf.extend_from_slice(&chunk);
    }
    Ok(buf.freeze())
}

#[cfg(test)]
mod tests {
    use super::*;
    use actix_web::test::TestRequest;

    #[test]
    fn json_content_types() {
        let ok = [
            "application/json",
            "application/json; charset=utf-8",
            "Application/JSON",
            "application/vnd.possync+json",
        ];
        for ct in ok {
            let req = TestRequest::default()
                .insert_header((header::CONTENT_TYPE, ct))
                .to_http_request();
            assert!(is_json(&req), "{ct}");
        }
        for ct in ["text/plain", "application/x-www-form-urlencoded", "json"] {
            let req = TestRequest::default()
                .insert_header((header::CONTENT_TYPE, ct))
                .to_http_request();
            assert!(!is_json(&req), "{ct}");
        }
        assert!(!is_json(&TestRequest::default().to_http_request()));
    }
}
