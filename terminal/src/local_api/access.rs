//! Who may use the till's loopback API, checked on every request before any handler runs.
//!
//! Binding to loopback keeps the shop network out, but not the web: the till runs a browser,
//! and any page it opens can send requests to `127.0.0.1`. Three checks close that, in order:
//!
//! 1. **Host** must be one this daemon answers to: `localhost`, `127.0.0.1` or `[::1]` with the
//!    bound port, or a name the operator allowed with `--allowed-host`. A page that rebinds its
//!    own DNS name to 127.0.0.1 still sends its own name as `Host`, so it is refused before it
//!    can read anything (`/status` carries the till's ids).
//! 2. **Origin**, when a browser sends one, must be the daemon's own (`http://` + an allowed
//!    host). Browsers always send it on cross-origin requests and on every `POST`, and a page
//!    cannot forge it, so a foreign page is refused even if it somehow holds a token.
//! 3. Every **state-changing** request (any method but `GET`/`HEAD`) needs
//!    `Authorization: Bearer <token>` and a body declared `application/json`. A cross-origin
//!    page can set neither without a CORS preflight, which this API never grants.
//!
//! Two tokens exist. The *local token* (`<data-dir>/local-api.token`, owner-only) opens every
//! route and is what POS software uses. The *page token* is generated per daemon run and
//! embedded in the operator page; since any account on the machine can load that page, it opens
//! only the operator's actions (`/outbox/retry`, `/reconcile`), never `POST /sales`: enqueuing
//! sales stays with whoever can read the token file.
//!
//! Tokens are compared as sha256 digests in constant time. Refusals are counted in
//! `terminal_local_api_refused_total{reason}` and logged at WARN (the request was refused, the
//! daemon is fine), with the offending `Host`/`Origin` cut to a printable prefix.

use actix_web::body::{EitherBody, MessageBody};
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::http::header::{self, HeaderMap};
use actix_web::http::{Method, StatusCode};
use actix_web::middleware::Next;
use actix_web::{web, HttpResponse, ResponseError};
use possync_protocol::token::{digests_match, token_digest as digest};
use possync_protocol::{ErrorCode, ErrorEnvelope};
use prometheus::{IntCounterVec, Opts, Registry};
use thiserror::Error;

/// Hosts the daemon always answers to (with its bound port).
const LOOPBACK_HOSTS: [&str; 3] = ["localhost", "127.0.0.1", "[::1]"];
/// Most characters of a refused `Host`/`Origin` repeated in a message or log line.
const ECHO_MAX: usize = 80;

/// Why a request was refused before reaching its handler.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum AccessDenied {
    /// `Host` missing or not an allowed name with the bound port.
    #[error("host {0:?} is not one this till answers to (allow more with --allowed-host)")]
    HostNotAllowed(String),
    /// A browser request from a page of another origin.
    #[error("requests from origin {0:?} are not accepted")]
    OriginNotAllowed(String),
    /// No `Authorization: Bearer`, or not a token of this till.
    #[error(
        "this route needs Authorization: Bearer <local token> (terminal local-token prints it)"
    )]
    Unauthenticated,
    /// The operator page's token on a route only the local token opens.
    #[error("the operator page's token does not open {0}; use the local token")]
    PageTokenScope(String),
    /// A state-changing request whose body is not declared JSON.
    #[error("body must be content-type: application/json, not {0:?}")]
    UnsupportedMediaType(String),
}

impl AccessDenied {
    /// The stable code of the refusal.
    pub fn code(&self) -> ErrorCode {
        match self {
            AccessDenied::HostNotAllowed(_) => ErrorCode::PosLocalHostNotAllowed,
            AccessDenied::OriginNotAllowed(_) => ErrorCode::PosLocalOriginNotAllowed,
            AccessDenied::Unauthenticated | AccessDenied::PageTokenScope(_) => {
                ErrorCode::PosLocalUnauthorized
            }
            AccessDenied::UnsupportedMediaType(_) => ErrorCode::PosLocalUnsupportedMediaType,
        }
    }

    /// The `reason` label of `terminal_local_api_refused_total`.
    pub fn reason(&self) -> &'static str {
        match self {
            AccessDenied::HostNotAllowed(_) => "host",
            AccessDenied::OriginNotAllowed(_) => "origin",
            AccessDenied::Unauthenticated | AccessDenied::PageTokenScope(_) => "token",
            AccessDenied::UnsupportedMediaType(_) => "content_type",
        }
    }
}

impl ResponseError for AccessDenied {
    fn status_code(&self) -> StatusCode {
        match self {
            AccessDenied::HostNotAllowed(_)
            | AccessDenied::OriginNotAllowed(_)
            | AccessDenied::PageTokenScope(_) => StatusCode::FORBIDDEN,
            AccessDenied::Unauthenticated => StatusCode::UNAUTHORIZED,
            AccessDenied::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
        }
    }

    fn error_response(&self) -> HttpResponse {
        let status = self.status_code();
        let mut res = HttpResponse::build(status);
        if status == StatusCode::UNAUTHORIZED {
            res.insert_header((header::WWW_AUTHENTICATE, "Bearer"));
        }
        res.insert_header((header::CACHE_CONTROL, "no-store"))
            .json(ErrorEnvelope::new(
                self.code(),
                status.as_u16(),
                self.to_string(),
            ))
    }
}

/// What a state-changing route needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Needs {
    /// The local token only (`POST /sales`, anything unknown).
    LocalToken,
    /// The local token or the page token (the operator page's buttons).
    OperatorAction,
}

fn needs(method: &Method, path: &str) -> Option<Needs> {
    if method == Method::GET || method == Method::HEAD {
        return None;
    }
    match path {
        "/outbox/retry" | "/reconcile" => Some(Needs::OperatorAction),
        _ => Some(Needs::LocalToken),
    }
}

/// A printable, bounded copy of untrusted header text for messages and logs.
fn echo(value: &str) -> String {
    value
        .chars()
        .filter(|c| !c.is_control())
        .take(ECHO_MAX)
        .collect()
}

/// The token of an `Authorization: Bearer <token>` value, if it is one.
pub fn bearer_token(value: &str) -> Option<&str> {
    let (scheme, token) = value.split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

/// Whether a `Content-Type` value declares JSON (`application/json` or `application/*+json`,
/// parameters such as `charset` allowed).
pub fn declares_json(value: &str) -> bool {
    let essence = value
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase();
    essence == "application/json"
        || essence
            .strip_prefix("application/")
            .is_some_and(|sub| sub.len() > "+json".len() && sub.ends_with("+json"))
}

/// `name` split into host and `:port`, if it has one. The colons inside a bracketed IPv6
/// address (`[::1]`, `[fe80::1]:8080`) are not a port separator.
fn split_port(name: &str) -> (&str, Option<&str>) {
    match name.rsplit_once(':') {
        Some((h, p))
            if !h.ends_with(':') && !p.contains(']') && h.starts_with('[') == h.ends_with(']') =>
        {
            (h, Some(p))
        }
        _ => (name, None),
    }
}

/// Whether `name` is acceptable as `--allowed-host`: a DNS name or IPv4 address, or a bracketed
/// IPv6 address, optionally with `:port`. Wildcards are deliberately not supported.
pub fn valid_allowed_host(name: &str) -> bool {
    let (host, port) = split_port(name);
    let port_ok = port.is_none_or(|p| !p.is_empty() && p.parse::<u16>().is_ok_and(|n| n > 0));
    let host_ok = if let Some(inner) = host.strip_prefix('[') {
        inner
            .strip_suffix(']')
            .is_some_and(|ip| ip.parse::<std::net::Ipv6Addr>().is_ok())
    } else {
        !host.is_empty()
            && host.len() <= 253
            && host
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
            && !host.starts_with(['.', '-'])
    };
    port_ok && host_ok
}

/// The access rules of one running endpoint (it knows its bound port).
#[derive(Debug, Clone)]
pub struct AccessPolicy {
    /// Accepted `Host` values, lower case, each with its port.
    authorities: Vec<String>,
    /// Accepted `Origin` values: `http://` + an authority.
    origins: Vec<String>,
    local_token: [u8; 32],
    page_token: String,
    page_token_digest: [u8; 32],
}

impl AccessPolicy {
    /// Rules for an endpoint bound on `port`, answering also to `extra_hosts` (names without a
    /// port get the bound one), opened by `local_token`. A fresh page token is drawn.
    pub fn new(port: u16, extra_hosts: &[String], local_token: &str) -> AccessPolicy {
        let mut authorities: Vec<String> = LOOPBACK_HOSTS
            .iter()
            .map(|h| format!("{h}:{port}"))
            .collect();
        for h in extra_hosts {
            let h = h.to_ascii_lowercase();
            let has_port = split_port(&h).1.is_some();
            authorities.push(if has_port { h } else { format!("{h}:{port}") });
        }
        // A browser leaves the default port out of Host and Origin.
        if port == 80 {
            let bare: Vec<String> = authorities
                .iter()
                .filter_map(|a| a.strip_suffix(":80").map(str::to_string))
                .collect();
            authorities.extend(bare);
        }
        authorities.sort();
        authorities.dedup();
        let origins = authorities.iter().map(|a| format!("http://{a}")).collect();
        let page_token = format!("pgt_{}", hex::encode(rand::random::<[u8; 32]>()));
        AccessPolicy {
            authorities,
            origins,
            local_token: digest(local_token),
            page_token_digest: digest(&page_token),
            page_token,
        }
    }

    /// The per-run token the operator page embeds.
    pub fn page_token(&self) -> &str {
        &self.page_token
    }

    /// The `Host` values this endpoint answers to.
    pub fn authorities(&self) -> &[String] {
        &self.authorities
    }

    /// Decides one request from its method, path and headers.
    pub fn check(
        &self,
        method: &Method,
        path: &str,
        headers: &HeaderMap,
    ) -> Result<(), AccessDenied> {
        let text = |name: header::HeaderName| -> Option<Result<&str, String>> {
            headers.get(name).map(|v| {
                v.to_str()
                    .map_err(|_| echo(&String::from_utf8_lossy(v.as_bytes())))
            })
        };
        match text(header::HOST) {
            Some(Ok(host))
                if self
                    .authorities
                    .iter()
                    .any(|a| a.eq_ignore_ascii_case(host)) => {}
            Some(Ok(host)) => return Err(AccessDenied::HostNotAllowed(echo(host))),
            Some(Err(shown)) => return Err(AccessDenied::HostNotAllowed(shown)),
            None => return Err(AccessDenied::HostNotAllowed(String::new())),
        }
        match text(header::ORIGIN) {
            None => {}
            Some(Ok(origin)) if self.origins.iter().any(|o| o.eq_ignore_ascii_case(origin)) => {}
            Some(Ok(origin)) => return Err(AccessDenied::OriginNotAllowed(echo(origin))),
            Some(Err(shown)) => return Err(AccessDenied::OriginNotAllowed(shown)),
        }
        let Some(needed) = needs(method, path) else {
            return Ok(());
        };
        let presented = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(bearer_token)
            .map(digest)
            .ok_or(AccessDenied::Unauthenticated)?;
        let local = digests_match(&presented, &self.local_token);
        let page = digests_match(&presented, &self.page_token_digest);
        if !local && !page {
            return Err(AccessDenied::Unauthenticated);
        }
        if !local && needed != Needs::OperatorAction {
            return Err(AccessDenied::PageTokenScope(format!(
                "{method} {}",
                echo(path)
            )));
        }
        match text(header::CONTENT_TYPE) {
            Some(Ok(ct)) if declares_json(ct) => Ok(()),
            Some(Ok(ct)) => Err(AccessDenied::UnsupportedMediaType(echo(ct))),
            Some(Err(shown)) => Err(AccessDenied::UnsupportedMediaType(shown)),
            None => Err(AccessDenied::UnsupportedMediaType(String::new())),
        }
    }
}

/// The policy plus its refusal counter, shared by the endpoint's workers.
pub struct Gate {
    policy: AccessPolicy,
    refused: IntCounterVec,
}

impl Gate {
    /// Registers `terminal_local_api_refused_total{reason}` (every reason exported from 0).
    pub fn register(policy: AccessPolicy, registry: &Registry) -> Result<Gate, prometheus::Error> {
        let refused = IntCounterVec::new(
            Opts::new(
                "terminal_local_api_refused_total",
                "loopback API requests refused before their handler, by reason",
            ),
            &["reason"],
        )?;
        for reason in ["host", "origin", "token", "content_type"] {
            refused.with_label_values(&[reason]);
        }
        registry.register(Box::new(refused.clone()))?;
        Ok(Gate { policy, refused })
    }

    /// The rules in force.
    pub fn policy(&self) -> &AccessPolicy {
        &self.policy
    }
}

/// Middleware of every route: answers a refused request itself, with the error envelope.
pub async fn guard(
    req: ServiceRequest,
    next: Next<impl MessageBody>,
) -> Result<ServiceResponse<EitherBody<impl MessageBody>>, actix_web::Error> {
    let verdict = match req.app_data::<web::Data<Gate>>() {
        Some(gate) => gate
            .policy
            .check(req.method(), req.path(), req.headers())
            .inspect_err(|denied| {
                gate.refused.with_label_values(&[denied.reason()]).inc();
                let header = |name| {
                    req.headers()
                        .get(name)
                        .map(|v| echo(&String::from_utf8_lossy(v.as_bytes())))
                        .unwrap_or_default()
                };
                tracing::warn!(
                    errorCode = denied.code().as_str(),
                    reason = denied.reason(),
                    host = %header(header::HOST),
                    origin = %header(header::ORIGIN),
                    "local API request refused"
                );
            }),
        // Without its rules the endpoint must not answer at all.
        None => Err(AccessDenied::HostNotAllowed(String::new())),
    };
    match verdict {
        Ok(()) => Ok(next.call(req).await?.map_into_left_body()),
        Err(denied) => Ok(req.error_response(denied).map_into_right_body()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use actix_web::http::header::{HeaderName, HeaderValue};
    use proptest::prelude::*;

    const TOKEN: &str = "ltk_0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).expect("name"),
                HeaderValue::from_str(v).expect("value"),
            );
        }
        h
    }

    fn policy() -> AccessPolicy {
        AccessPolicy::new(
            7070,
            &["till-7.shop.lan".into(), "pos.local:8443".into()],
            TOKEN,
        )
    }

    #[test]
    fn hosts_are_the_loopback_names_and_the_allowed_ones_with_their_port() {
        let p = policy();
        for ok in [
            "127.0.0.1:7070",
            "localhost:7070",
            "LOCALHOST:7070",
            "[::1]:7070",
            "till-7.shop.lan:7070",
            "pos.local:8443",
        ] {
            assert_eq!(
                p.check(&Method::GET, "/status", &headers(&[("host", ok)])),
                Ok(()),
                "{ok}"
            );
        }
        for bad in [
            "127.0.0.1:7071",
            "127.0.0.1",
            "localhost",
            "evil.example:7070",
            "127.0.0.1.nip.io:7070",
            "localhost.:7070",
            "pos.local:7070",
            "127.0.0.2:7070",
            "",
        ] {
            assert!(
                matches!(
                    p.check(&Method::GET, "/status", &headers(&[("host", bad)])),
                    Err(AccessDenied::HostNotAllowed(_))
                ),
                "{bad}"
            );
        }
        assert!(matches!(
            p.check(&Method::GET, "/", &HeaderMap::new()),
            Err(AccessDenied::HostNotAllowed(_))
        ));
        let v6 = AccessPolicy::new(7070, &["[FE80::1]".into(), "[fe80::2]:9".into()], TOKEN);
        for ok in ["[fe80::1]:7070", "[fe80::2]:9"] {
            assert_eq!(
                v6.check(&Method::GET, "/", &headers(&[("host", ok)])),
                Ok(()),
                "{ok}"
            );
        }
        let on_80 = AccessPolicy::new(80, &[], TOKEN);
        assert_eq!(
            on_80.check(&Method::GET, "/", &headers(&[("host", "localhost")])),
            Ok(())
        );
    }

    #[test]
    fn a_foreign_origin_is_refused_even_with_the_token() {
        let p = policy();
        let post = |origin: &str| {
            p.check(
                &Method::POST,
                "/sales",
                &headers(&[
                    ("host", "127.0.0.1:7070"),
                    ("origin", origin),
                    ("authorization", &format!("Bearer {TOKEN}")),
                    ("content-type", "application/json"),
                ]),
            )
        };
        assert_eq!(post("http://127.0.0.1:7070"), Ok(()));
        assert_eq!(post("http://localhost:7070"), Ok(()));
        for bad in [
            "http://127.0.0.1:8000",
            "https://127.0.0.1:7070",
            "http://evil.example",
            "null",
            "http://127.0.0.1:7070/",
        ] {
            assert!(
                matches!(post(bad), Err(AccessDenied::OriginNotAllowed(_))),
                "{bad}"
            );
        }
    }

    #[test]
    fn state_changing_routes_need_a_token_and_json() {
        let p = policy();
        let call = |method: Method, path: &str, auth: Option<String>, ct: Option<&str>| {
            let mut pairs = vec![("host", "127.0.0.1:7070".to_string())];
            if let Some(a) = auth {
                pairs.push(("authorization", a));
            }
            if let Some(c) = ct {
                pairs.push(("content-type", c.to_string()));
            }
            let pairs: Vec<(&str, &str)> = pairs.iter().map(|(k, v)| (*k, v.as_str())).collect();
            p.check(&method, path, &headers(&pairs))
        };
        let local = Some(format!("Bearer {TOKEN}"));
        let page = Some(format!("Bearer {}", p.page_token()));
        let json = Some("application/json; charset=utf-8");
        assert_eq!(call(Method::POST, "/sales", local.clone(), json), Ok(()));
        assert_eq!(
            call(Method::POST, "/sales", None, json),
            Err(AccessDenied::Unauthenticated)
        );
        assert_eq!(
            call(
                Method::POST,
                "/sales",
                Some("Bearer ltk_wrong".into()),
                json
            ),
            Err(AccessDenied::Unauthenticated)
        );
        assert_eq!(
            call(Method::POST, "/sales", Some(format!("Basic {TOKEN}")), json),
            Err(AccessDenied::Unauthenticated)
        );
        assert!(matches!(
            call(Method::POST, "/sales", page.clone(), json),
            Err(AccessDenied::PageTokenScope(_))
        ));
        assert_eq!(call(Method::POST, "/reconcile", page.clone(), json), Ok(()));
        assert_eq!(call(Method::POST, "/outbox/retry", page, json), Ok(()));
        for ct in [
            None,
            Some("text/plain"),
            Some("application/x-www-form-urlencoded"),
            Some("multipart/form-data; boundary=x"),
        ] {
            assert!(
                matches!(
                    call(Method::POST, "/sales", local.clone(), ct),
                    Err(AccessDenied::UnsupportedMediaType(_))
                ),
                "{ct:?}"
            );
        }
        assert_eq!(call(Method::GET, "/outbox", None, None), Ok(()));
        assert_eq!(
            call(Method::PUT, "/anything", None, json),
            Err(AccessDenied::Unauthenticated)
        );
    }

    #[test]
    fn allowed_host_flags_are_names_or_addresses_with_an_optional_port() {
        for ok in [
            "till.local",
            "pos-7.shop.lan:8080",
            "10.0.0.5",
            "[::1]:7070",
            "[fe80::1]",
        ] {
            assert!(valid_allowed_host(ok), "{ok}");
        }
        for bad in [
            "*",
            "",
            "till.local:",
            "till.local:0",
            "till.local:99999",
            "a b",
            "[::1",
            "::1",
            "-x",
            "http://x",
        ] {
            assert!(!valid_allowed_host(bad), "{bad}");
        }
    }

    #[test]
    fn json_content_types() {
        assert!(declares_json("application/json"));
        assert!(declares_json("Application/JSON;charset=UTF-8"));
        assert!(declares_json("application/merge-patch+json"));
        assert!(!declares_json("application/+json"));
        assert!(!declares_json("text/json"));
        assert!(!declares_json("text/plain; application/json"));
    }

    proptest! {
        /// Any Host value is accepted exactly when it is one of the allowed authorities.
        #[test]
        fn host_allowlist_is_exact(host in "[ -~]{0,40}") {
            let p = policy();
            let Ok(value) = HeaderValue::from_str(&host) else { return Ok(()); };
            let mut h = HeaderMap::new();
            h.insert(header::HOST, value);
            let allowed = p.authorities().iter().any(|a| a.eq_ignore_ascii_case(&host));
            prop_assert_eq!(p.check(&Method::GET, "/status", &h).is_ok(), allowed);
        }

        /// No Authorization value other than the two tokens opens a state-changing route, and
        /// arbitrary header bytes never panic the check.
        #[test]
        fn only_the_tokens_open_post_routes(
            auth in proptest::collection::vec(any::<u8>(), 0..120),
            origin in proptest::option::of("[ -~]{0,40}"),
            path in "/[a-z/]{0,20}",
        ) {
            let p = policy();
            let mut h = headers(&[("host", "127.0.0.1:7070"), ("content-type", "application/json")]);
            if let Ok(v) = HeaderValue::from_bytes(&auth) {
                h.insert(header::AUTHORIZATION, v);
            }
            if let Some(o) = origin.as_deref().and_then(|o| HeaderValue::from_str(o).ok()) {
                h.insert(header::ORIGIN, o);
            }
            let verdict = p.check(&Method::POST, &path, &h);
            let text = String::from_utf8_lossy(&auth);
            let holds_token = bearer_token(&text).is_some_and(|t| t == TOKEN || t == p.page_token());
            if !holds_token {
                prop_assert!(verdict.is_err());
            }
        }
    }
}
