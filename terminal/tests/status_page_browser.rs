//! The status page in real headless Chromium, driven over WebDriver (chromedriver, plain HTTP):
//! the page renders the live `/status`, Verify posts a reconcile and shows its result, and a
//! needs-attention row's Retry button releases it.
//!
//! Needs Debian's `chromium` and `chromium-driver`. If they are missing the test FAILS — a
//! page nobody has clicked is not tested.

mod status_page_support;

use status_page_support::start_fake_server;
use status_page_support::webdriver::{start_driver, Session};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_button_shows_the_reconcile_result_and_retry_releases_a_sale() {
    let (server, till, engine, _) = start_fake_server();
    let driver = start_driver().await;
    let session = Session::new(&driver).await;
    session.goto(&format!("{}/", server.url())).await;

    // The page fetched /status and rendered it.
    let version = session.wait_text("#catalog-version", |t| t == "42").await;
    assert_eq!(version, "42");
    assert_eq!(session.text("#online").await, "offline");
    let outage = session.text("#outage").await;
    assert!(
        outage.contains("cloud unreachable since") && outage.contains("1 h ago"),
        "outage line: {outage:?}"
    );
    assert_eq!(session.text("#queued").await, "1");
    let oldest = session.text("#oldest-pending").await;
    assert!(
        oldest.starts_with("oldest waiting sale: 10 min"),
        "{oldest}"
    );
    let attention = session.text("#attention").await;
    assert!(attention.contains("POS_SYNC_EVENT_INVALID"), "{attention}");

    // Verify: the result of the POST /reconcile appears on the page.
    session.click("#verify-btn").await;
    let result = session
        .wait_text("#action-result", |t| t.starts_with("Verify"))
        .await;
    assert_eq!(
        result,
        "Verify: 2 entries differ (checked 2, unchanged 0, upserts 1, deletes 1, catalog v42)"
    );
    assert_eq!(
        *engine.reconciles.lock().expect("reconciles"),
        vec![possync_terminal::operator::ReconcileChoice::Verify]
    );

    // Reconcile applies and says what it repaired.
    session.click("#reconcile-btn").await;
    let result = session
        .wait_text("#action-result", |t| t.starts_with("Reconcile"))
        .await;
    assert_eq!(
        result,
        "Reconcile applied: repaired 2 entries (checked 2, unchanged 0, upserts 1, deletes 1, catalog v42)"
    );
    assert_eq!(
        engine.reconciles.lock().expect("reconciles").last(),
        Some(&possync_terminal::operator::ReconcileChoice::Apply)
    );

    // Retry on the needs-attention row releases it.
    session.click("#attention .retry-btn").await;
    let result = session
        .wait_text("#action-result", |t| t.starts_with("Released"))
        .await;
    assert_eq!(result, "Released 1 sale(s) for retry.");
    let still: Vec<_> = till
        .rows
        .lock()
        .expect("rows")
        .iter()
        .filter(|r| r["status"] == "needs_attention")
        .cloned()
        .collect();
    assert!(still.is_empty(), "{still:?}");
    let queued = session.wait_text("#queued", |t| t == "2").await;
    assert_eq!(queued, "2");

    session.close().await;
    drop(driver);
    server.stop().await;
}
