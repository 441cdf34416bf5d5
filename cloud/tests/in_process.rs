//! The application built by `possync_cloud::app::build`, driven in-process with
//! `actix_web::test` (no socket), on a real SQLite database: the same stack `cloud serve` runs.

use actix_web::test;
use possync_cloud::app::{self, AppState};
use possync_cloud::config::{Limits, RateLimits};
use possync_cloud::db::{terminals, Database};
use possync_cloud::ingest::IngestSettings;
use possync_cloud::metrics::Metrics;
use possync_testkit::{events_body, sample_sale_event};
use uuid::Uuid;

#[actix_web::test]
async fn in_process_app_authenticates_ingests_and_counts() {
    let dir = tempfile::tempdir().expect("temp dir");
    let db = Database::connect(
        &format!("sqlite://{}", dir.path().join("cloud.db").display()),
        2,
    )
    .expect("connect");
    db.run_migrations().expect("migrate");
    let issued = {
        let mut conn = db.conn().expect("conn");
        terminals::add_terminal(&mut conn, "b1", Some("till 1")).expect("add terminal")
    };
    let metrics = Metrics::new();
    let state = AppState::new(
        db,
        metrics.clone(),
        "admin-secret",
        Limits::default(),
        RateLimits::default(),
        IngestSettings::default(),
    );
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
