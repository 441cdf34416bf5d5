//! Who is calling: per-address rate limiting before authentication, bearer-token
//! authentication of terminals (and of the admin), then per-terminal rate limiting.
//!
//! Terminal tokens are looked up in the database on every request (no cache), so a revoked
//! token is refused from the very next request. Terminal and admin tokens live in different
//! places and neither opens the other's routes.

use std::future::{ready, Ready};
use std::net::{IpAddr, Ipv4Addr};

use actix_web::body::{EitherBody, MessageBody};
use actix_web::dev::{Payload, ServiceRequest, ServiceResponse};
use actix_web::http::header;
use actix_web::middleware::Next;
use actix_web::{web, FromRequest, HttpMessage, HttpRequest};

use crate::app::AppState;
use crate::db::terminals::{self, TerminalIdentity};
use crate::error::ApiError;
use crate::rate_limit::Admission;

use possync_protocol::token::digests_match as constant_time_eq;
/// sha256 of a token, so admin tokens are compared digest-to-digest in constant time.
pub use possync_protocol::token::token_digest;

/// The bearer token of a request, if it carries a well-formed one.
fn bearer(req: &ServiceRequest) -> Option<String> {
    let value = req.headers().get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    let token = token.trim();
    if !scheme.eq_ignore_ascii_case("bearer")
        || token.is_empty()
        || token.len() > terminals::MAX_TOKEN_LEN
    {
        return None;
    }
    Some(token.to_string())
}

/// The client's address: the socket's peer, or, when that peer is a trusted proxy, the client
/// its forwarding headers name (see [`crate::client_address`]).
fn client_ip(state: &AppState, req: &ServiceRequest) -> IpAddr {
    let peer = req
        .peer_addr()
        .map(|a| a.ip())
        .unwrap_or(IpAddr::V4(Ipv4Addr::UNSPECIFIED));
    if state.trusted_proxies.is_empty() {
        return peer;
    }
    let values = |name: &str| -> Vec<&str> {
        req.headers()
            .get_all(name)
            .filter_map(|v| v.to_str().ok())
            .collect()
    };
    crate::client_address::client_address(
        peer,
        &values("forwarded"),
        &values("x-forwarded-for"),
        &state.trusted_proxies,
    )
}

fn state(req: &ServiceRequest) -> Result<web::Data<AppState>, ApiError> {
    req.app_data::<web::Data<AppState>>()
        .cloned()
        .ok_or_else(|| ApiError::StorageFailed("application state missing".into()))
}

fn check_address(state: &AppState, req: &ServiceRequest) -> Result<(), ApiError> {
    match state.address_buckets.check(&client_ip(state, req)) {
        Admission::Admitted => Ok(()),
        Admission::Refused { retry_after_secs } => {
            state
                .metrics
                .rate_limited_total
                .with_label_values(&["address"])
                .inc();
            Err(ApiError::RateLimited { retry_after_secs })
        }
    }
}

/// Middleware of `/v1/pos/*`: address bucket, token lookup, terminal bucket. On success the
/// [`TerminalIdentity`] is stored in the request for the [`Terminal`] extractor. A refusal is
/// answered here as a response carrying the [`ApiError`], so outer middleware sees it.
pub async fn terminal_guard(
    req: ServiceRequest,
    next: Next<impl MessageBody>,
) -> Result<ServiceResponse<EitherBody<impl MessageBody>>, actix_web::Error> {
    match admit_terminal(&req).await {
        Ok(identity) => {
            req.extensions_mut().insert(identity);
            Ok(next.call(req).await?.map_into_left_body())
        }
        Err(e) => Ok(req.error_response(e).map_into_right_body()),
    }
}

async fn admit_terminal(req: &ServiceRequest) -> Result<TerminalIdentity, ApiError> {
    let state = state(req)?;
    check_address(&state, req)?;
    let token = bearer(req).ok_or(ApiError::Unauthenticated)?;
    let identity = state
        .db
        .run(move |conn| terminals::authenticate(conn, &token))
        .await
        .map_err(|e| ApiError::StorageFailed(e.to_string()))?
        .ok_or(ApiError::Unauthenticated)?;
    if let Admission::Refused { retry_after_secs } =
        state.terminal_buckets.check(&identity.terminal_id)
    {
        state
            .metrics
            .rate_limited_total
            .with_label_values(&["terminal"])
            .inc();
        tracing::info!(terminalId = %identity.terminal_id, branchId = %identity.branch_id, errorCode = %possync_protocol::ErrorCode::PosSyncRateLimited, "terminal rate limited");
        return Err(ApiError::RateLimited { retry_after_secs });
    }
    if state
        .contacts
        .due(identity.terminal_id, std::time::Instant::now())
    {
        // The fleet view's "last contact": best effort and off the request's path — never a
        // reason to refuse or delay the request.
        let id = identity.terminal_id;
        let report = till_report(req);
        let db = state.db.clone();
        actix_web::rt::spawn(async move {
            if let Err(e) = db
                .run(move |conn| terminals::record_contact(conn, id, report))
                .await
            {
                tracing::warn!(terminalId = %id, errorCode = %possync_protocol::ErrorCode::PosSyncStorageFailed, cause = %e, "last contact not recorded");
            }
        });
    }
    Ok(identity)
}

/// What the till reported about itself in this request's headers. A value that is not a
/// non-negative integer counts as not reported: the report is informational and never a
/// reason to refuse a request.
fn till_report(req: &ServiceRequest) -> terminals::TillReport {
    let number = |name: &str| {
        req.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<i64>().ok())
            .filter(|n| *n >= 0)
    };
    terminals::TillReport {
        catalog_version: number(possync_protocol::TILL_CATALOG_VERSION_HEADER),
        needs_attention: number(possync_protocol::TILL_NEEDS_ATTENTION_HEADER),
    }
}

/// Middleware of `/v1/admin/*`: address bucket, then the admin token. Terminal tokens are
/// never admin tokens (they are random and stored elsewhere), so they get 401 here.
pub async fn admin_guard(
    req: ServiceRequest,
    next: Next<impl MessageBody>,
) -> Result<ServiceResponse<EitherBody<impl MessageBody>>, actix_web::Error> {
    match admit_admin(&req) {
        Ok(()) => Ok(next.call(req).await?.map_into_left_body()),
        Err(e) => Ok(req.error_response(e).map_into_right_body()),
    }
}

fn admit_admin(req: &ServiceRequest) -> Result<(), ApiError> {
    let state = state(req)?;
    check_address(&state, req)?;
    let token = bearer(req).ok_or(ApiError::Unauthenticated)?;
    if !constant_time_eq(&token_digest(&token), &state.admin_token_sha256) {
        return Err(ApiError::Unauthenticated);
    }
    Ok(())
}

/// The authenticated terminal of a `/v1/pos/*` request.
#[derive(Debug, Clone)]
pub struct Terminal(pub TerminalIdentity);

impl FromRequest for Terminal {
    type Error = ApiError;
    type Future = Ready<Result<Self, Self::Error>>;

    fn from_request(req: &HttpRequest, _: &mut Payload) -> Self::Future {
        ready(
            req.extensions()
                .get::<TerminalIdentity>()
                .cloned()
                .map(Terminal)
                .ok_or(ApiError::Unauthenticated),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use actix_web::test::TestRequest;

    #[test]
    fn bearer_tokens_are_parsed_strictly() {
        let with = |v: &str| {
            bearer(
                &TestRequest::default()
                    .insert_header((header::AUTHORIZATION, v))
                    .to_srv_request(),
            )
        };
        assert_eq!(with("Bearer abc"), Some("abc".to_string()));
        assert_eq!(with("bearer abc"), Some("abc".to_string()));
        assert_eq!(with("Basic abc"), None);
        assert_eq!(with("Bearer "), None);
        assert_eq!(with("Bearer"), None);
        assert_eq!(with(&format!("Bearer {}", "x".repeat(600))), None);
        assert_eq!(bearer(&TestRequest::default().to_srv_request()), None);
    }

    #[test]
    fn admin_digest_comparison() {
        let a = token_digest("secret");
        assert!(constant_time_eq(&a, &token_digest("secret")));
        assert!(!constant_time_eq(&a, &token_digest("secreT")));
    }
}
