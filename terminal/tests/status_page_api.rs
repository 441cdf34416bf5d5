//! The loopback status endpoint's JSON routes, against an in-memory till and engine.

mod status_page_support;

use possync_actors::ReconcileAction;
use possync_terminal::local_api::{LocalApiConfig, StatusBindError, StatusServer};
use serde_json::{json, Value};
use status_page_support::{
    metrics_text, start_fake_server, start_server_with, valid_payload, FakeEngine, FakeTill,
    LOCAL_TOKEN, POS_ID,
};
use std::sync::atomic::Ordering;
use std::sync::Arc;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_reports_catalog_queue_actors_and_attention() {
    let (server, _till, _engine, _) = start_fake_server();
    let s: Value = reqwest::get(format!("{}/status", server.url()))
        .await
        .expect("GET /status")
        .json()
        .await
        .expect("json");
    assert_eq!(s["daemon_running"], true);
    assert_eq!(s["online"], false);
    assert!(s["offline_since"].is_string(), "the outage is shown: {s}");
    assert!(s["offline_seconds"].as_i64().expect("outage length") >= 5_399);
    assert_eq!(s["pos_id"], POS_ID);
    assert_eq!(s["branch_id"], "b1");
    assert_eq!(s["catalog"]["version"], 42);
    assert_eq!(s["catalog"]["entities"], 2);
    assert!(s["catalog"]["age_seconds"].as_i64().expect("age") >= 89);
    assert_eq!(s["outbox"]["pending"], 1);
    assert_eq!(s["outbox"]["synced"], 2);
    assert_eq!(s["outbox"]["needs_attention"], 1);
    assert_eq!(s["outbox"]["queued"], 1);
    assert!(
        s["outbox"]["oldest_pending_age_seconds"]
            .as_i64()
            .expect("age")
            >= 600
    );
    assert_eq!(s["needs_attention"][0]["journal_id"], 3);
    assert_eq!(s["actors"][0]["name"], "catalog_syncer");
    assert_eq!(s["actors"][0]["restarts"], 1);
    let errors = s["last_errors"].as_array().expect("errors");
    assert!(errors
        .iter()
        .any(|e| e.as_str().is_some_and(|e| e.contains("connection refused"))));
    assert!(errors.iter().any(|e| e
        .as_str()
        .is_some_and(|e| e.contains("POS_SYNC_EVENT_INVALID"))));
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sales_are_enqueued_then_the_outbox_is_nudged_and_invalid_ones_get_422() {
    let (server, till, engine, _) = start_fake_server();
    let http = reqwest::Client::new();
    let res = http
        .post(format!("{}/sales", server.url()))
        .bearer_auth(LOCAL_TOKEN)
        .json(&json!({"type": "sale", "payload": valid_payload("R-100")}))
        .send()
        .await
        .expect("POST /sales");
    assert_eq!(res.status(), 201);
    // The 201 says where the time went: the committed enqueue within the handler.
    let timing = res
        .headers()
        .get("server-timing")
        .and_then(|v| v.to_str().ok())
        .expect("Server-Timing on the 201")
        .to_string();
    let dur = |name: &str| -> f64 {
        timing
            .split(',')
            .find_map(|m| m.trim().strip_prefix(&format!("{name};dur=")))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{name} in {timing}"))
    };
    assert!(
        dur("store") >= 0.0 && dur("store") <= dur("handler"),
        "{timing}"
    );
    let body: Value = res.json().await.expect("json");
    assert_eq!(body, json!({"pos_id": POS_ID, "local_event_id": 5}));
    assert_eq!(till.rows.lock().expect("rows").len(), 5);

    // Arithmetic failure: line total does not match qty * price.
    let mut bad = valid_payload("R-101");
    bad["lines"][0]["total_minor"] = json!(499);
    let res = http
        .post(format!("{}/sales", server.url()))
        .bearer_auth(LOCAL_TOKEN)
        .json(&json!({"type": "sale", "payload": bad}))
        .send()
        .await
        .expect("POST /sales");
    assert_eq!(res.status(), 422);
    let env: Value = res.json().await.expect("json");
    assert_eq!(env["error"]["code"], "POS_SYNC_EVENT_INVALID");
    assert_eq!(env["error"]["retryable"], false);

    let res = http
        .post(format!("{}/sales", server.url()))
        .bearer_auth(LOCAL_TOKEN)
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .expect("POST /sales");
    assert_eq!(res.status(), 422);
    assert_eq!(
        till.rows.lock().expect("rows").len(),
        5,
        "nothing stored for invalid sales"
    );

    // The nudge is spawned after the answer; wait for it to land (no timing asserted).
    for _ in 0..200 {
        if engine.flushes.load(Ordering::SeqCst) > 0 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    assert_eq!(engine.flushes.load(Ordering::SeqCst), 1);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lookup_outbox_retry_reconcile_and_metrics() {
    let (server, _till, engine, engine_metric) = start_fake_server();
    let http = reqwest::Client::new();
    let url = server.url();

    let hit: Value = http
        .get(format!("{url}/catalog/lookup?barcode=4006381333948"))
        .send()
        .await
        .expect("lookup")
        .json()
        .await
        .expect("json");
    assert_eq!(hit["count"], 1);
    assert_eq!(hit["entities"][0]["id"], "p2");
    let text: Value = http
        .get(format!("{url}/catalog/lookup?q=espresso"))
        .send()
        .await
        .expect("lookup")
        .json()
        .await
        .expect("json");
    assert_eq!(text["entities"][0]["id"], "p1");
    let res = http
        .get(format!("{url}/catalog/lookup"))
        .send()
        .await
        .expect("lookup");
    assert_eq!(res.status(), 400);

    let attention: Value = http
        .get(format!("{url}/outbox?status=needs_attention"))
        .send()
        .await
        .expect("outbox")
        .json()
        .await
        .expect("json");
    assert_eq!(attention["count"], 1);
    assert_eq!(attention["rows"][0]["journal_id"], 3);
    let res = http
        .get(format!("{url}/outbox?status=lost"))
        .send()
        .await
        .expect("outbox");
    assert_eq!(res.status(), 400);

    let res = http
        .post(format!("{url}/outbox/retry"))
        .bearer_auth(LOCAL_TOKEN)
        .json(&json!({"journal_id": 99}))
        .send()
        .await
        .expect("retry");
    assert_eq!(res.status(), 404);
    let released: Value = http
        .post(format!("{url}/outbox/retry"))
        .bearer_auth(LOCAL_TOKEN)
        .json(&json!({"all": true}))
        .send()
        .await
        .expect("retry")
        .json()
        .await
        .expect("json");
    assert_eq!(released, json!({"released": 1}));
    let pending: Value = http
        .get(format!("{url}/outbox?status=pending"))
        .send()
        .await
        .expect("outbox")
        .json()
        .await
        .expect("json");
    assert_eq!(pending["count"], 2);

    let report: Value = http
        .post(format!("{url}/reconcile"))
        .bearer_auth(LOCAL_TOKEN)
        .json(&json!({"mode": "verify"}))
        .send()
        .await
        .expect("reconcile")
        .json()
        .await
        .expect("json");
    assert_eq!(report["applied"], false);
    assert_eq!(report["upserts"], 1);
    let res = http
        .post(format!("{url}/reconcile"))
        .bearer_auth(LOCAL_TOKEN)
        .json(&json!({"mode": "destroy"}))
        .send()
        .await
        .expect("reconcile");
    assert_eq!(res.status(), 400);
    let env: Value = res.json().await.expect("json");
    assert_eq!(env["error"]["code"], "POS_CATALOG_RECONCILE_FAILED");
    assert_eq!(
        *engine.reconciles.lock().expect("reconciles"),
        vec![ReconcileAction::Verify]
    );

    engine_metric.inc_by(3);
    let metrics = metrics_text(&url).await;
    assert!(metrics.contains("synced_events 3"), "{metrics}");
    assert!(
        metrics.contains("terminal_outbox_rows{state=\"pending\"} 2"),
        "{metrics}"
    );
    assert!(metrics.contains("terminal_catalog_version 42"), "{metrics}");
    assert!(metrics.contains("terminal_catalog_entities 2"), "{metrics}");
    server.stop().await;
}

#[tokio::test]
async fn refuses_to_bind_a_non_loopback_address() {
    let err = StatusServer::start(
        "0.0.0.0:0",
        LocalApiConfig {
            local_token: LOCAL_TOKEN.into(),
            allowed_hosts: vec![],
        },
        Arc::new(FakeTill::new()),
        Arc::new(FakeEngine::default()),
        prometheus::Registry::new(),
    )
    .err()
    .expect("must refuse");
    assert!(matches!(err, StatusBindError::NotLoopback(_)), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_page_is_self_contained_html() {
    let (server, _, _, _) = start_fake_server();
    let res = reqwest::get(format!("{}/", server.url()))
        .await
        .expect("GET /");
    assert_eq!(res.status(), 200);
    assert!(res
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("text/html")));
    let html = res.text().await.expect("text");
    for id in [
        "verify-btn",
        "reconcile-btn",
        "retry-all-btn",
        "action-result",
        "oldest-pending",
    ] {
        assert!(html.contains(&format!("id=\"{id}\"")), "missing #{id}");
    }
    assert!(
        !html.contains("http://") && !html.contains("https://"),
        "no external assets"
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_snapshot_progress_is_reported() {
    let till = FakeTill {
        snapshot_in_progress: true,
        ..FakeTill::new()
    };
    let (server, _, _, _) = start_server_with(till);
    let s: Value = reqwest::get(format!("{}/status", server.url()))
        .await
        .expect("GET /status")
        .json()
        .await
        .expect("json");
    let snap = &s["catalog"]["snapshot"];
    assert_eq!(snap["in_progress"], true);
    assert_eq!(snap["received"], 250);
    assert_eq!(snap["total"], 1000);
    assert_eq!(snap["percent"], 25.0);
    server.stop().await;
}

#[tokio::test]
async fn an_unknown_route_gets_404_with_the_envelope() {
    let (server, _till, _engine, _) = start_fake_server();
    let r = reqwest::get(format!("{}/no/such/route", server.url()))
        .await
        .expect("GET");
    assert_eq!(r.status(), 404);
    let body: Value = r.json().await.expect("envelope");
    assert_eq!(body["error"]["code"], "POS_REQUEST_INVALID", "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("GET /no/such/route")),
        "{body}"
    );
}
