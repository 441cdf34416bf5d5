//! The loopback API's parsers of untrusted input: request bodies and query strings, each a pure
//! function from bytes or text to a typed request or a [`StatusError`] with a stable code, so
//! the property tests below can feed them anything a client could send.
//!
//! Query strings are parsed here rather than by actix's `web::Query` extractor, whose failures
//! answer a plain-text 400 outside the error envelope.

use actix_web::web;
use chrono::{DateTime, Utc};
use possync_protocol::{ErrorCode, EventType, SalePayload};
use serde::Deserialize;

use super::StatusError;
use crate::operator::{CatalogQuery, IdempotencyKey, JournalStatus, RetryTarget, TillError};
use possync_actors::ReconcileAction;

/// Most journal rows one `GET /outbox` returns.
pub const OUTBOX_LIST_MAX: usize = 1000;
/// Rows `GET /outbox` returns without `limit`.
const OUTBOX_LIST_DEFAULT: usize = 100;

fn bad_request(code: ErrorCode, message: impl Into<String>) -> StatusError {
    StatusError::BadRequest {
        code,
        message: message.into(),
    }
}

/// `POST /sales` body: the sale plus its type and (optional) time.
#[derive(Debug, Deserialize)]
pub struct SaleRequest {
    /// `sale`, `refund` or `void`; a sale when absent.
    #[serde(rename = "type", default = "default_event_type")]
    pub event_type: EventType,
    /// When the sale happened; now when absent.
    #[serde(default)]
    pub occurred_at: Option<DateTime<Utc>>,
    /// The receipt.
    pub payload: SalePayload,
}

fn default_event_type() -> EventType {
    EventType::Sale
}

impl SaleRequest {
    /// Parses a `POST /sales` body. Anything that is not one is 422 `POS_SYNC_EVENT_INVALID`
    /// (the same answer as a sale that fails validation: nothing is stored either way).
    pub fn parse(bytes: &[u8]) -> Result<SaleRequest, StatusError> {
        serde_json::from_slice(bytes)
            .map_err(|e| StatusError::Till(TillError::Invalid(format!("sale request: {e}"))))
    }

    /// Parses either a `POST /sales` body or a bare SALE payload (as `terminal sale add` takes).
    pub fn parse_lenient(bytes: &[u8]) -> Result<SaleRequest, String> {
        let value: serde_json::Value =
            serde_json::from_slice(bytes).map_err(|e| format!("body is not JSON: {e}"))?;
        if value.get("payload").is_some() {
            serde_json::from_value(value).map_err(|e| format!("sale request: {e}"))
        } else {
            let payload: SalePayload =
                serde_json::from_value(value).map_err(|e| format!("sale payload: {e}"))?;
            Ok(SaleRequest {
                event_type: EventType::Sale,
                occurred_at: None,
                payload,
            })
        }
    }
}

/// The request header that makes a `POST /sales` idempotent (docs/terminal-operations.md,
/// "Retrying a sale").
pub const IDEMPOTENCY_KEY: &str = "idempotency-key";

/// `POST /sales`'s `Idempotency-Key`, given every value the header arrived with: none → no
/// key (the sale is recorded as without the feature); exactly one valid value → the key.
/// Anything else — an empty, over-long or non-printable value, or the header twice (which
/// of two keys would the client retry with?) — is 400 `POS_REQUEST_INVALID`, before anything
/// is stored.
pub fn idempotency_key(values: &[&[u8]]) -> Result<Option<IdempotencyKey>, StatusError> {
    match values {
        [] => Ok(None),
        [one] => IdempotencyKey::parse(one)
            .map(Some)
            .map_err(|e| bad_request(ErrorCode::PosRequestInvalid, e.to_string())),
        more => Err(bad_request(
            ErrorCode::PosRequestInvalid,
            format!(
                "Idempotency-Key sent {} times; send it once per request",
                more.len()
            ),
        )),
    }
}

#[derive(Debug, Deserialize)]
struct LookupParams {
    barcode: Option<String>,
    sku: Option<String>,
    q: Option<String>,
}

/// `GET /catalog/lookup?barcode=` | `?sku=` | `?q=`: exactly one of them.
pub fn lookup_query(query: &str) -> Result<CatalogQuery, StatusError> {
    let p = web::Query::<LookupParams>::from_query(query).map_err(|e| {
        bad_request(
            ErrorCode::PosSyncEventInvalid,
            format!("bad lookup query: {e}"),
        )
    })?;
    let p = p.into_inner();
    match (p.barcode, p.sku, p.q) {
        (Some(b), None, None) => Ok(CatalogQuery::Barcode(b)),
        (None, Some(s), None) => Ok(CatalogQuery::Sku(s)),
        (None, None, Some(q)) => Ok(CatalogQuery::Text(q)),
        _ => Err(bad_request(
            ErrorCode::PosSyncEventInvalid,
            "give exactly one of barcode=, sku= or q=",
        )),
    }
}

#[derive(Debug, Deserialize)]
struct OutboxParams {
    status: Option<String>,
    limit: Option<String>,
}

/// `GET /outbox?status=S&limit=N`: the state filter (none when absent or empty) and the row
/// limit, clamped to 1..=[`OUTBOX_LIST_MAX`].
pub fn outbox_query(query: &str) -> Result<(Option<JournalStatus>, usize), StatusError> {
    let p = web::Query::<OutboxParams>::from_query(query).map_err(|e| {
        bad_request(
            ErrorCode::PosSyncEventInvalid,
            format!("bad outbox query: {e}"),
        )
    })?;
    let p = p.into_inner();
    let filter = match p.status.as_deref().filter(|s| !s.is_empty()) {
        None => None,
        Some(s) => Some(s.parse::<JournalStatus>().map_err(|_| {
            bad_request(
                ErrorCode::PosSyncEventInvalid,
                format!(
                    "unknown status {:?} (pending, in_flight, failed, synced, needs_attention)",
                    s.chars().take(40).collect::<String>()
                ),
            )
        })?),
    };
    let limit = match p.limit.as_deref().filter(|s| !s.is_empty()) {
        None => OUTBOX_LIST_DEFAULT,
        // Any positive integer is a fine request for "up to N"; clamp rather than refuse.
        Some(s) if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) => s
            .parse::<usize>()
            .unwrap_or(OUTBOX_LIST_MAX)
            .clamp(1, OUTBOX_LIST_MAX),
        Some(s) => {
            return Err(bad_request(
                ErrorCode::PosSyncEventInvalid,
                format!(
                    "limit must be a positive integer, not {:?}",
                    s.chars().take(40).collect::<String>()
                ),
            ))
        }
    };
    Ok((filter, limit))
}

/// `POST /outbox/retry` body: `{"journal_id": N}` or `{"all": true}`.
#[derive(Debug, Deserialize)]
struct RetryBody {
    journal_id: Option<i64>,
    #[serde(default)]
    all: bool,
}

/// Parses a `POST /outbox/retry` body.
pub fn retry_selection(bytes: &[u8]) -> Result<RetryTarget, StatusError> {
    let req: RetryBody = serde_json::from_slice(bytes).map_err(|e| {
        bad_request(
            ErrorCode::PosSyncEventInvalid,
            format!("expected {{\"journal_id\": N}} or {{\"all\": true}}: {e}"),
        )
    })?;
    match (req.journal_id, req.all) {
        (Some(id), false) => Ok(RetryTarget::One(id)),
        (None, true) => Ok(RetryTarget::AllNeedingAttention),
        _ => Err(bad_request(
            ErrorCode::PosSyncEventInvalid,
            "give either journal_id or all=true",
        )),
    }
}

#[derive(Debug, Deserialize)]
struct ReconcileBody {
    mode: ReconcileAction,
}

/// Parses a `POST /reconcile` body.
pub fn reconcile_choice(bytes: &[u8]) -> Result<ReconcileAction, StatusError> {
    serde_json::from_slice::<ReconcileBody>(bytes)
        .map(|b| b.mode)
        .map_err(|e| {
            bad_request(
                ErrorCode::PosCatalogReconcileFailed,
                format!("expected {{\"mode\": \"verify\" | \"apply\"}}: {e}"),
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use actix_web::ResponseError as _;
    use proptest::prelude::*;

    fn payload() -> serde_json::Value {
        serde_json::json!({
            "receipt_no": "R1", "currency": "EUR",
            "lines": [{"product_id": "p1", "qty": 1, "unit_price_minor": 100, "total_minor": 100}],
            "totals": {"subtotal_minor": 100, "tax_minor": 0, "total_minor": 100},
            "payments": [{"method": "cash", "amount_minor": 100}]
        })
    }

    fn code(e: StatusError) -> ErrorCode {
        e.code()
    }

    #[test]
    fn sale_request_accepts_a_body_or_a_bare_payload() {
        let bare = SaleRequest::parse_lenient(payload().to_string().as_bytes()).expect("bare");
        assert_eq!(bare.event_type, EventType::Sale);
        assert!(bare.occurred_at.is_none());
        let body = serde_json::json!({"type": "refund", "occurred_at": "2026-01-02T03:04:05Z", "payload": payload()});
        let full = SaleRequest::parse_lenient(body.to_string().as_bytes()).expect("body");
        assert_eq!(full.event_type, EventType::Refund);
        assert_eq!(
            full.occurred_at.map(|t| t.to_rfc3339()),
            Some("2026-01-02T03:04:05+00:00".to_string())
        );
        assert!(SaleRequest::parse_lenient(b"{not json").is_err());
        assert!(SaleRequest::parse(body.to_string().as_bytes()).is_ok());
        assert!(SaleRequest::parse(payload().to_string().as_bytes()).is_err());
    }

    #[test]
    fn an_idempotency_key_is_absent_one_valid_value_or_a_coded_400() {
        assert_eq!(idempotency_key(&[]).expect("absent"), None);
        assert_eq!(
            idempotency_key(&[b"R-000042"])
                .expect("one")
                .map(|k| k.as_str().to_string()),
            Some("R-000042".to_string())
        );
        let long = [b'k'; 256];
        for bad in [
            vec![&b""[..]],
            vec![&long[..]],
            vec![&b"caf\xc3\xa9"[..]],
            vec![&b"a"[..], &b"a"[..]],
        ] {
            let e = idempotency_key(&bad).expect_err("refused");
            assert_eq!(e.status_code(), actix_web::http::StatusCode::BAD_REQUEST);
            assert_eq!(code(e), ErrorCode::PosRequestInvalid, "{bad:?}");
        }
    }

    #[test]
    fn queries_parse_or_answer_a_coded_400() {
        assert_eq!(
            lookup_query("barcode=4006381333931").expect("barcode"),
            CatalogQuery::Barcode("4006381333931".into())
        );
        assert_eq!(
            lookup_query("q=oat%20milk").expect("text"),
            CatalogQuery::Text("oat milk".into())
        );
        assert!(lookup_query("").is_err());
        assert!(lookup_query("sku=a&q=b").is_err());
        assert_eq!(outbox_query("").expect("default"), (None, 100));
        assert_eq!(
            outbox_query("status=needs_attention&limit=5").expect("filter"),
            (Some(JournalStatus::NeedsAttention), 5)
        );
        assert_eq!(outbox_query("limit=0").expect("clamped").1, 1);
        assert_eq!(
            outbox_query("limit=99999999999999999999999")
                .expect("clamped")
                .1,
            OUTBOX_LIST_MAX
        );
        for bad in ["status=lost", "limit=-1", "limit=abc", "limit=1e3"] {
            let e = outbox_query(bad).expect_err(bad);
            assert_eq!(code(e), ErrorCode::PosSyncEventInvalid, "{bad}");
        }
        assert_eq!(
            retry_selection(br#"{"all": true}"#).expect("all"),
            RetryTarget::AllNeedingAttention
        );
        assert!(retry_selection(br#"{"all": true, "journal_id": 1}"#).is_err());
        assert_eq!(
            code(reconcile_choice(br#"{"mode": "destroy"}"#).expect_err("mode")),
            ErrorCode::PosCatalogReconcileFailed
        );
    }

    fn json_value() -> impl Strategy<Value = serde_json::Value> {
        let leaf = prop_oneof![
            Just(serde_json::Value::Null),
            any::<bool>().prop_map(serde_json::Value::from),
            any::<i64>().prop_map(serde_json::Value::from),
            any::<f64>().prop_map(serde_json::Value::from),
            ".{0,12}".prop_map(serde_json::Value::from),
        ];
        leaf.prop_recursive(3, 24, 6, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..6).prop_map(serde_json::Value::from),
                proptest::collection::btree_map(
                    prop_oneof![
                        Just("type".to_string()),
                        Just("payload".to_string()),
                        Just("occurred_at".to_string()),
                        Just("mode".to_string()),
                        Just("all".to_string()),
                        Just("journal_id".to_string()),
                        "[a-z_]{1,10}"
                    ],
                    inner,
                    0..6
                )
                .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
            ]
        })
    }

    proptest! {
        /// Arbitrary bytes never panic a body parser; a refusal always carries the route's code.
        #[test]
        fn body_parsers_take_any_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            if let Err(e) = SaleRequest::parse(&bytes) {
                prop_assert_eq!(code(e), ErrorCode::PosSyncEventInvalid);
            }
            let _ = SaleRequest::parse_lenient(&bytes);
            if let Err(e) = retry_selection(&bytes) {
                prop_assert_eq!(code(e), ErrorCode::PosSyncEventInvalid);
            }
            if let Err(e) = reconcile_choice(&bytes) {
                prop_assert_eq!(code(e), ErrorCode::PosCatalogReconcileFailed);
            }
        }

        /// JSON of any shape (with the fields' names likely) is parsed or refused with the
        /// route's code, never a panic.
        #[test]
        fn body_parsers_take_any_json(value in json_value()) {
            let bytes = value.to_string().into_bytes();
            if let Err(e) = SaleRequest::parse(&bytes) {
                prop_assert_eq!(code(e), ErrorCode::PosSyncEventInvalid);
            }
            if let Err(e) = retry_selection(&bytes) {
                prop_assert_eq!(code(e), ErrorCode::PosSyncEventInvalid);
            }
            if let Err(e) = reconcile_choice(&bytes) {
                prop_assert_eq!(code(e), ErrorCode::PosCatalogReconcileFailed);
            }
        }

        /// A generated sale body round-trips through the parser unchanged.
        #[test]
        fn generated_sale_bodies_parse(
            receipt in "[A-Za-z0-9-]{1,64}",
            qty in 1i64..1000,
            unit in 0i64..1_000_000,
            kind in prop_oneof![Just("sale"), Just("refund"), Just("void")],
            secs in 0i64..4_102_444_800,
        ) {
            let total = qty * unit;
            let at = DateTime::<Utc>::from_timestamp(secs, 0).expect("in range");
            let body = serde_json::json!({
                "type": kind, "occurred_at": at.to_rfc3339(),
                "payload": {"receipt_no": receipt, "currency": "EUR",
                    "lines": [{"product_id": "p1", "qty": qty, "unit_price_minor": unit, "total_minor": total}],
                    "totals": {"subtotal_minor": total, "tax_minor": 0, "total_minor": total},
                    "payments": [{"method": "cash", "amount_minor": total}]}
            });
            let req = SaleRequest::parse(body.to_string().as_bytes()).expect("parses");
            prop_assert_eq!(serde_json::to_value(req.event_type).expect("type"), serde_json::json!(kind));
            prop_assert_eq!(req.occurred_at, Some(at));
            prop_assert_eq!(req.payload.receipt_no, receipt);
            prop_assert_eq!(req.payload.lines[0].total_minor, total);
        }

        /// Any query string is parsed or refused with a coded 400, never a panic; a limit that
        /// parses is always within bounds.
        #[test]
        fn query_parsers_take_any_text(query in "[ -~]{0,80}") {
            if let Err(e) = lookup_query(&query) {
                prop_assert_eq!(code(e), ErrorCode::PosSyncEventInvalid);
            }
            match outbox_query(&query) {
                Ok((_, limit)) => prop_assert!((1..=OUTBOX_LIST_MAX).contains(&limit)),
                Err(e) => prop_assert_eq!(code(e), ErrorCode::PosSyncEventInvalid),
            }
        }

        /// A lookup value of any text survives percent-encoding and parsing unchanged.
        #[test]
        fn lookup_values_round_trip(value in ".{0,40}", which in 0usize..3) {
            let key = ["barcode", "sku", "q"][which];
            let mut url = reqwest::Url::parse("http://127.0.0.1/catalog/lookup").expect("url");
            url.query_pairs_mut().append_pair(key, &value);
            let query = url.query().unwrap_or_default().to_string();
            let parsed = lookup_query(&query).expect("parses");
            let expected = match which {
                0 => CatalogQuery::Barcode(value),
                1 => CatalogQuery::Sku(value),
                _ => CatalogQuery::Text(value),
            };
            prop_assert_eq!(parsed, expected);
        }
    }
}
