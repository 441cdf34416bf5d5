//! The status page in real headless Chromium, driven over WebDriver (chromedriver, plain HTTP):
//! the page renders the live `/status`, Verify posts a reconcile and shows its result, and a
//! needs-attention row's Retry button releases it; and a page of another origin that tries to
//! drive the endpoint (no-cors fetches, a cross-origin read, a text/plain form POST) changes
//! nothing.
//!
//! Needs Debian's `chromium` and `chromium-driver`. If they are missing the test FAILS — a
//! page nobody has clicked is not tested.

mod status_page_support;

use possync_testkit::webdriver::{start_driver, Session};
use status_page_support::{
    refused, serve_page_elsewhere, start_fake_server, start_server_on, valid_payload, FakeTill,
};

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
        "Verify: 2 entries differ (checked 2, unchanged 0, upserts 1, deletes 1, catalog v42; \
         cost 1 round trip, 100 B sent, 200 B received by manifest)"
    );
    assert_eq!(
        *engine.reconciles.lock().expect("reconciles"),
        vec![possync_actors::ReconcileAction::Verify]
    );

    // Reconcile applies and says what it repaired.
    session.click("#reconcile-btn").await;
    let result = session
        .wait_text("#action-result", |t| t.starts_with("Reconcile"))
        .await;
    assert_eq!(
        result,
        "Reconcile applied: repaired 2 entries (checked 2, unchanged 0, upserts 1, deletes 1, \
         catalog v42; cost 1 round trip, 100 B sent, 200 B received by manifest)"
    );
    assert_eq!(
        engine.reconciles.lock().expect("reconciles").last(),
        Some(&possync_actors::ReconcileAction::Apply)
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
        .filter(|r| r.status == possync_terminal::operator::JournalStatus::NeedsAttention)
        .cloned()
        .collect();
    assert!(still.is_empty(), "{still:?}");
    let queued = session.wait_text("#queued", |t| t == "2").await;
    assert_eq!(queued, "2");

    session.close().await;
    drop(driver);
    server.stop().await;
}

/// The attacker's page: every cross-origin way a page can send a POST without a preflight, one
/// cross-origin read, then a form POST whose `text/plain` body is valid sale JSON. It writes
/// what happened into `#log`.
fn attacker_page(daemon: &str) -> String {
    let sale =
        serde_json::json!({"type": "sale", "payload": valid_payload("FORGED-1")}).to_string();
    // A text/plain form sends `name=value`; splitting the JSON at a string value makes the
    // body exactly `{"type":…,"pad":"=\"}` — valid JSON, the classic trick.
    let form_name = format!("{},\"pad\":\"", &sale[..sale.len() - 1]);
    // The attack is real: what the form sends is a sale body the endpoint would accept.
    let form_body = format!("{form_name}=\"}}");
    assert!(
        possync_terminal::local_api::SaleRequest::parse(form_body.as_bytes()).is_ok(),
        "{form_body}"
    );
    let html_attr = |s: &str| s.replace('&', "&amp;").replace('\'', "&#39;");
    format!(
        r#"<!doctype html><html><head><title>cheap flights</title></head><body>
<div id="log"></div>
<iframe name="sink" id="sink"></iframe>
<form id="f" method="POST" action="{daemon}/sales" enctype="text/plain" target="sink">
<input type="hidden" name='{name}' value='"}}'>
</form>
<script>
const D = "{daemon}";
const log = (t) => {{ document.getElementById("log").textContent += t + ";"; }};
async function attack() {{
  const tries = [["/sales", {sale_js}], ["/outbox/retry", '{{"all":true}}'], ["/reconcile", '{{"mode":"apply"}}']];
  for (const [path, body] of tries) {{
    try {{
      await fetch(D + path, {{ method: "POST", mode: "no-cors", headers: {{ "content-type": "text/plain" }}, body }});
      log("sent " + path);
    }} catch (e) {{ log("failed " + path); }}
  }}
  try {{ const r = await fetch(D + "/status"); log("read status " + r.status); }}
  catch (e) {{ log("status read blocked"); }}
  document.getElementById("sink").onload = () => log("form answered");
  document.getElementById("f").submit();
}}
attack();
</script></body></html>"#,
        name = html_attr(&form_name),
        sale_js = serde_json::to_string(&sale).expect("js string"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_page_of_another_origin_cannot_sell_retry_reconcile_or_read() {
    let (server, till, engine, _) = start_fake_server();
    let rows_before = till.rows.lock().expect("rows").clone();
    let attacker = serve_page_elsewhere(attacker_page(&server.url())).await;
    assert_ne!(attacker, server.url());

    let driver = start_driver().await;
    let session = Session::new(&driver).await;
    session.goto(&format!("{attacker}/")).await;
    let log = session
        .wait_text("#log", |t| t.contains("form answered"))
        .await;
    assert!(log.contains("sent /sales"), "{log}");
    assert!(log.contains("sent /outbox/retry"), "{log}");
    assert!(log.contains("sent /reconcile"), "{log}");
    assert!(log.contains("status read blocked"), "{log}");
    assert!(log.contains("form answered"), "{log}");

    // Every attempt reached the endpoint and was refused for its origin: 3 no-cors POSTs,
    // the read, the form.
    let mut by_origin = 0.0;
    for _ in 0..100 {
        by_origin = refused(&server.url(), "origin").await;
        if by_origin >= 5.0 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(by_origin, 5.0);

    // Nothing was enqueued, released or reconciled.
    assert_eq!(*till.rows.lock().expect("rows"), rows_before);
    assert!(engine.reconciles.lock().expect("reconciles").is_empty());
    assert_eq!(engine.flushes.load(std::sync::atomic::Ordering::SeqCst), 0);

    session.close().await;
    drop(driver);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_a_daemon_restart_the_page_reloads_for_the_new_page_token() {
    let (server, _, _, _) = start_fake_server();
    let addr = server.local_addr().to_string();
    let driver = start_driver().await;
    let session = Session::new(&driver).await;
    session.goto(&format!("{}/", server.url())).await;
    session.wait_text("#catalog-version", |t| t == "42").await;

    // The daemon restarts on the same address with a new page token.
    server.stop().await;
    let (server, _, engine, _) = start_server_on(&addr, FakeTill::new(), &[]);
    session.click("#verify-btn").await;
    let shown = session
        .wait_text("#action-result", |t| t.contains("restarted"))
        .await;
    assert!(shown.contains("the daemon restarted"), "{shown}");
    assert!(engine.reconciles.lock().expect("reconciles").is_empty());

    // The page reloads itself; the same button then works.
    session
        .wait_text("#action-result", |t| t.starts_with("Verify compares"))
        .await;
    session.click("#verify-btn").await;
    let result = session
        .wait_text("#action-result", |t| t.starts_with("Verify:"))
        .await;
    assert!(result.starts_with("Verify: 2 entries differ"), "{result}");
    assert_eq!(
        *engine.reconciles.lock().expect("reconciles"),
        vec![possync_actors::ReconcileAction::Verify]
    );

    session.close().await;
    drop(driver);
    server.stop().await;
}
