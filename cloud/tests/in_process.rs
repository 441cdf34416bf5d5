//! The application built by `possync_cloud::app::build`, driven in-process with
//! `actix_web::test` (no socket), on a real SQLite database: the same stack `cloud serve` runs.
//! Authentication, ingest and counting; and `GET /v1/pos/catalog/snapshot`: the encoding
//! negotiated from `Accept-Encoding`, every encoding carrying the same page, and a herd of
//! terminals costing the database one read per page per catalog version.

use std::path::Path;
use std::sync::Arc;

use actix_web::test;
use possync_cloud::app::{self, AppState};
use possync_cloud::config::{Limits, RateLimits};
use possync_cloud::db::catalog::{self, EntityWrite};
use possync_cloud::db::terminals::{self, IssuedTerminal};
use possync_cloud::db::{ConnectOptions, Database};
use possync_cloud::ingest::IngestSettings;
use possync_cloud::metrics::Metrics;
use possync_cloud::rate_limit::RateLimit;
use possync_protocol::SnapshotPage;
use possync_testkit::{events_body, sample_sale_event};
use uuid::Uuid;

/// The application's state on a fresh SQLite file under `dir`, with `products` in the catalog
/// and one terminal of branch `b1` (its token returned).
fn sqlite_app(
    dir: &Path,
    products: &[EntityWrite],
    rate_limits: RateLimits,
) -> (Database, Metrics, Arc<AppState>, IssuedTerminal) {
    sqlite_app_with(dir, products, rate_limits, ConnectOptions::default())
}

/// [`sqlite_app`] with explicit connection settings (a short busy timeout, say).
fn sqlite_app_with(
    dir: &Path,
    products: &[EntityWrite],
    rate_limits: RateLimits,
    options: ConnectOptions,
) -> (Database, Metrics, Arc<AppState>, IssuedTerminal) {
    let db = Database::connect_with(
        &format!("sqlite://{}", dir.join("cloud.db").display()),
        4,
        options,
    )
    .expect("connect");
    db.run_migrations().expect("migrate");
    let issued = {
        let mut conn = db.conn().expect("conn");
        if !products.is_empty() {
            catalog::upsert_entities(&mut conn, products).expect("seed");
        }
        terminals::add_terminal(&mut conn, "b1", Some("till 1")).expect("add terminal")
    };
    let metrics = Metrics::new();
    let state = AppState::new(
        db.clone(),
        metrics.clone(),
        "admin-secret",
        Limits::default(),
        rate_limits,
        IngestSettings::default(),
    );
    (db, metrics, state, issued)
}

#[actix_web::test]
async fn in_process_app_authenticates_ingests_and_counts() {
    let dir = tempfile::tempdir().expect("temp dir");
    let (_db, metrics, state, issued) = sqlite_app(dir.path(), &[], RateLimits::default());
    let app = test::init_service(app::build(state)).await;

    let req = test::TestRequest::get().uri("/healthz").to_request();
    let resp = test::call_service(&app, req).await;
    assert_eq!(resp.status(), 200);
    assert!(resp.headers().contains_key("x-request-id"));

    let req = test::TestRequest::get()
        .uri("/v1/pos/sync/status")
        .to_request();
    let resp = test::call_service(&app, req).await;
    assert_eq!(resp.status(), 401);

    let event = sample_sale_event(issued.terminal_id, Uuid::now_v7(), 1, "b1");
    let req = test::TestRequest::post()
        .uri("/v1/pos/sales/events")
        .insert_header(("authorization", format!("Bearer {}", issued.token)))
        .set_json(events_body(&[event]))
        .to_request();
    let body: serde_json::Value = test::call_and_read_body_json(&app, req).await;
    assert_eq!(body["results"][0]["status"], "accepted", "{body}");

    assert_eq!(
        metrics.synced_events.with_label_values(&["accepted"]).get(),
        1
    );
    assert_eq!(
        metrics
            .errors_total
            .with_label_values(&["POS_SYNC_UNAUTHORIZED"])
            .get(),
        1,
        "the 401 is counted by code"
    );
}

const ENTITIES: usize = 25;
const LIMIT: usize = 10;

/// A sale that meets SQLite's write lock held by someone else beyond the busy timeout is the
/// database's trouble: answered 503 `POS_SYNC_STORAGE_FAILED`, retryable, never `rejected`
/// (which a till would park for an operator); once the lock is gone the same sale is stored.
#[actix_web::test]
async fn a_sale_meeting_a_locked_sqlite_database_is_retryable_and_stored_later() {
    use diesel::connection::SimpleConnection;
    use diesel::Connection;
    let dir = tempfile::tempdir().expect("temp dir");
    let options = ConnectOptions {
        sqlite_busy_timeout: std::time::Duration::from_millis(100),
        ..ConnectOptions::default()
    };
    let (db, _metrics, state, issued) =
        sqlite_app_with(dir.path(), &[], RateLimits::default(), options);
    let app = test::init_service(app::build(state)).await;
    let event = sample_sale_event(issued.terminal_id, Uuid::now_v7(), 1, "b1");
    let post = || {
        test::TestRequest::post()
            .uri("/v1/pos/sales/events")
            .insert_header(("authorization", format!("Bearer {}", issued.token)))
            .set_json(events_body(std::slice::from_ref(&event)))
            .to_request()
    };

    // Another writer (a backup, a second process) holds the write lock far longer than 100 ms.
    let path = dir.path().join("cloud.db");
    let mut holder =
        diesel::SqliteConnection::establish(path.to_str().expect("utf-8")).expect("open");
    holder
        .batch_execute("BEGIN IMMEDIATE;")
        .expect("take the write lock");
    let resp = test::call_service(&app, post()).await;
    let status = resp.status();
    let body: serde_json::Value = test::read_body_json(resp).await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["error"]["code"], "POS_SYNC_STORAGE_FAILED", "{body}");
    assert_eq!(body["error"]["retryable"], true, "{body}");
    holder.batch_execute("COMMIT;").expect("release the lock");
    {
        let mut conn = db.conn().expect("conn");
        assert_eq!(
            possync_cloud::db::ledger::count_sales(&mut conn, None).expect("count"),
            0,
            "nothing was stored under the lock"
        );
    }

    // The till's retry, once the lock is gone, stores the sale.
    let body: serde_json::Value = test::call_and_read_body_json(&app, post()).await;
    assert_eq!(body["results"][0]["status"], "accepted", "{body}");
    let mut conn = db.conn().expect("conn");
    assert_eq!(
        possync_cloud::db::ledger::count_sales(&mut conn, None).expect("count"),
        1
    );
}

fn product(i: usize, price: i64) -> EntityWrite {
    EntityWrite {
        entity_type: "product".into(),
        id: format!("prod-{i:04}"),
        branch_id: None,
        data: serde_json::json!({"sku": format!("SKU-{i:04}"), "name": "coffee 250 g", "price_minor": price}),
    }
}

fn decode(encoding: &str, body: &[u8]) -> Vec<u8> {
    match encoding {
        "zstd" => zstd::stream::decode_all(body).expect("zstd body"),
        "gzip" => {
            let mut out = Vec::new();
            std::io::Read::read_to_end(&mut flate2::read::GzDecoder::new(body), &mut out)
                .expect("gzip body");
            out
        }
        _ => body.to_vec(),
    }
}

#[actix_web::test]
async fn pages_are_negotiated_identical_and_read_once_per_catalog_version() {
    let dir = tempfile::tempdir().expect("temp dir");
    let unlimited = RateLimit {
        per_second: 1_000_000,
        burst: 1_000_000,
    };
    let products: Vec<_> = (0..ENTITIES).map(|i| product(i, 100)).collect();
    let (db, metrics, state, issued) = sqlite_app(
        dir.path(),
        &products,
        RateLimits {
            terminal: unlimited,
            address: unlimited,
            ..RateLimits::default()
        },
    );
    let app = test::init_service(app::build(state)).await;
    let auth = ("authorization", format!("Bearer {}", issued.token));

    // One pass per encoding; each page must decode to the same JSON in every encoding.
    let mut passes: Vec<Vec<Vec<u8>>> = Vec::new();
    for (asked, expected) in [
        ("identity", "identity"),
        ("gzip, zstd", "zstd"),
        ("gzip", "gzip"),
        ("zstd;q=0, gzip;q=0.8", "gzip"),
    ] {
        let mut pages = Vec::new();
        let mut cursor: Option<String> = None;
        loop {
            let uri = match &cursor {
                Some(c) => format!("/v1/pos/catalog/snapshot?limit={LIMIT}&cursor={c}"),
                None => format!("/v1/pos/catalog/snapshot?limit={LIMIT}"),
            };
            let req = test::TestRequest::get()
                .uri(&uri)
                .insert_header(auth.clone())
                .insert_header(("accept-encoding", asked))
                .to_request();
            let resp = test::call_service(&app, req).await;
            assert_eq!(resp.status(), 200);
            let got = resp
                .headers()
                .get("content-encoding")
                .map(|v| v.to_str().expect("ascii").to_string())
                .unwrap_or_else(|| "identity".into());
            assert_eq!(got, expected, "Accept-Encoding: {asked}");
            assert_eq!(
                resp.headers().get("vary").map(|v| v.as_bytes()),
                Some(&b"accept-encoding"[..])
            );
            let body = decode(&got, &test::read_body(resp).await);
            let page: SnapshotPage = serde_json::from_slice(&body).expect("page JSON");
            pages.push(body);
            match page.next_cursor {
                Some(c) => cursor = Some(c),
                None => break,
            }
        }
        passes.push(pages);
    }
    let pages = passes[0].len();
    assert_eq!(pages, ENTITIES.div_ceil(LIMIT));
    for pass in &passes[1..] {
        assert_eq!(pass, &passes[0], "every encoding carries the same pages");
    }
    assert_eq!(
        metrics.snapshot_page_reads_total.get(),
        pages as u64,
        "four passes read each page from the database once"
    );
    assert_eq!(
        metrics.snapshot_page_cache_hits_total.get(),
        3 * pages as u64
    );
    assert!(
        metrics
            .snapshot_page_bytes_total
            .with_label_values(&["zstd"])
            .get()
            > 0
    );

    // A herd of first pages at once after the catalog moved: one more database read.
    {
        let mut conn = db.conn().expect("conn");
        catalog::upsert_entities(&mut conn, &[product(0, 250)]).expect("change");
    }
    let herd = (0..16).map(|_| {
        let req = test::TestRequest::get()
            .uri(&format!("/v1/pos/catalog/snapshot?limit={LIMIT}"))
            .insert_header(auth.clone())
            .insert_header(("accept-encoding", "zstd"))
            .to_request();
        test::call_service(&app, req)
    });
    let mut versions = Vec::new();
    for resp in futures::future::join_all(herd).await {
        assert_eq!(resp.status(), 200);
        let body = decode("zstd", &test::read_body(resp).await);
        let page: SnapshotPage = serde_json::from_slice(&body).expect("page JSON");
        assert_eq!(
            page.entities[0].data["price_minor"], 250,
            "never a stale page"
        );
        versions.push(page.snapshot_version);
    }
    versions.dedup();
    assert_eq!(versions.len(), 1);
    assert_eq!(
        metrics.snapshot_page_reads_total.get(),
        pages as u64 + 1,
        "sixteen requests for a new version's first page read it once"
    );
    let text = metrics.render();
    assert!(text.contains("snapshot_page_reads_total"));
    assert!(text.contains("snapshot_page_cache_hits_total"));
}
