//! The operator's fleet page (`GET /admin/fleet`) in headless Chromium against a real `cloud
//! serve`: tills deliver sales with a gap and with a sale changed after it was chained; the page,
//! given the admin token through its input field (never the URL), shows per branch the
//! terminals and their last contact, "missing 4–9 from T" and the chain break. Chromium and
//! chromedriver missing FAIL the test.

use possync_protocol::SaleEvent;
use possync_testkit::cloud::CloudProcess;
use possync_testkit::webdriver::{start_driver, Session};
use possync_testkit::{chain_sale_events, events_body, sample_sale_event};
use serde_json::Value;
use uuid::Uuid;

/// Posts `events` as a till would, with its report headers (`(name, value)`).
async fn post_events(
    cloud: &CloudProcess,
    token: &str,
    events: &[SaleEvent],
    report: &[(&str, &str)],
) -> Value {
    let mut req = reqwest::Client::new()
        .post(cloud.url("/v1/pos/sales/events"))
        .bearer_auth(token);
    for (name, value) in report {
        req = req.header(*name, *value);
    }
    let r = req
        .json(&events_body(events))
        .send()
        .await
        .expect("sales posted");
    assert!(r.status().is_success(), "{}", r.status());
    r.json().await.expect("sales json")
}

async fn fleet_json(cloud: &CloudProcess) -> Value {
    let r = reqwest::Client::new()
        .get(cloud.url("/v1/admin/fleet"))
        .bearer_auth(&cloud.admin_token)
        .send()
        .await
        .expect("fleet");
    assert!(r.status().is_success(), "{}", r.status());
    r.json().await.expect("fleet json")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fleet_page_shows_last_contact_gaps_and_chain_breaks_per_branch() {
    let cloud = CloudProcess::start(None).expect("cloud serve (cargo build -p possync-cloud)");
    let (t1, token1) = cloud.add_terminal("b1").expect("terminal 1");
    let (t2, token2) = cloud.add_terminal("b1").expect("terminal 2");
    let (t3, _) = cloud.add_terminal("b2").expect("terminal 3");

    // Till 1 sells 1..=10; 4..=9 are still on their way: a gap.
    let (p1, p2) = (Uuid::now_v7(), Uuid::now_v7());
    let mut sales1: Vec<SaleEvent> = (1..=10)
        .map(|n| sample_sale_event(t1, p1, n, "b1"))
        .collect();
    chain_sale_events(&mut sales1);
    let delivered: Vec<SaleEvent> = sales1
        .iter()
        .filter(|e| !(4..=9).contains(&e.local_event_id))
        .cloned()
        .collect();
    // Till 1 reports its catalog at version 0 and two sales waiting for an operator.
    let catalog_version = {
        let r = reqwest::Client::new()
            .post(cloud.url("/v1/admin/catalog/upsert"))
            .bearer_auth(&cloud.admin_token)
            .json(&serde_json::json!({"entities": [
                {"type": "product", "id": "p1", "data": {"name": "tea"}},
                {"type": "product", "id": "p2", "data": {"name": "coffee"}}
            ]}))
            .send()
            .await
            .expect("upsert");
        assert!(r.status().is_success(), "{}", r.status());
        // A till sends its report with every request; the first one is what gets recorded
        // (contacts are written at most once a minute).
        let delta: Value = reqwest::Client::new()
            .get(cloud.url("/v1/pos/catalog/delta?since=0"))
            .bearer_auth(&token1)
            .header(possync_protocol::TILL_CATALOG_VERSION_HEADER, "0")
            .header(possync_protocol::TILL_NEEDS_ATTENTION_HEADER, "2")
            .send()
            .await
            .expect("delta")
            .json()
            .await
            .expect("delta json");
        delta["catalog_version"].as_i64().expect("catalog version")
    };
    assert!(catalog_version > 0);
    post_events(
        &cloud,
        &token1,
        &delivered,
        &[
            (possync_protocol::TILL_CATALOG_VERSION_HEADER, "0"),
            (possync_protocol::TILL_NEEDS_ATTENTION_HEADER, "2"),
        ],
    )
    .await;

    // Till 2's sale 2 was changed after it was chained: stored, and a chain break.
    let mut sales2: Vec<SaleEvent> = (1..=3)
        .map(|n| sample_sale_event(t2, p2, n, "b1"))
        .collect();
    chain_sale_events(&mut sales2);
    sales2[1].payload.receipt_no = "FORGED".into();
    // Till 2 sends report headers that are not numbers: not recorded, and never a refusal.
    let res = post_events(
        &cloud,
        &token2,
        &sales2,
        &[
            (possync_protocol::TILL_CATALOG_VERSION_HEADER, "-5"),
            (possync_protocol::TILL_NEEDS_ATTENTION_HEADER, "many"),
        ],
    )
    .await;
    assert_eq!(res["results"][1]["code"], "POS_SYNC_CHAIN_BREAK", "{res}");

    // The JSON first: last contact of the tills that called, none for the one that did not.
    // The contact is written beside the request, not inside it: wait (bounded) for it.
    let mut fleet = fleet_json(&cloud).await;
    for _ in 0..100 {
        let recorded = fleet["terminals"]
            .as_array()
            .map(|ts| {
                ts.iter()
                    .filter(|x| x["last_contact_at"].is_string())
                    .count()
            })
            .unwrap_or(0);
        if recorded >= 2 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        fleet = fleet_json(&cloud).await;
    }
    let terminals = fleet["terminals"].as_array().expect("terminals");
    assert_eq!(terminals.len(), 3, "{fleet}");
    let of = |t: Uuid| {
        terminals
            .iter()
            .find(|x| x["terminal_id"] == t.to_string())
            .unwrap_or_else(|| panic!("{t} listed: {fleet}"))
    };
    for t in [t1, t2] {
        let seen = of(t)["last_contact_at"].as_str().expect("last contact");
        let seen = chrono::DateTime::parse_from_rfc3339(seen).expect("RFC 3339");
        let age = chrono::Utc::now().signed_duration_since(seen);
        assert!(
            age.num_seconds() < 120 && age.num_seconds() >= -5,
            "{fleet}"
        );
    }
    assert_eq!(
        of(t1)["catalog_versions_behind"].as_i64(),
        Some(catalog_version),
        "{fleet}"
    );
    assert_eq!(of(t1)["needs_attention"].as_i64(), Some(2), "{fleet}");
    assert!(of(t2)["catalog_versions_behind"].is_null(), "{fleet}");
    assert!(of(t2)["needs_attention"].is_null(), "{fleet}");
    assert!(of(t3)["last_contact_at"].is_null(), "{fleet}");
    assert_eq!(
        fleet["gaps"][0]["missing"],
        serde_json::json!([[4, 9]]),
        "{fleet}"
    );
    assert_eq!(fleet["chain_breaks"][0]["local_event_id"], 2, "{fleet}");

    // The page is served without a token, not stored, and may talk to this origin only.
    let page = reqwest::get(cloud.url("/admin/fleet")).await.expect("page");
    assert_eq!(page.status(), 200);
    let header = |name: &str| {
        page.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string()
    };
    assert_eq!(header("cache-control"), "no-store");
    assert_eq!(header("x-frame-options"), "DENY");
    let csp = header("content-security-policy");
    for directive in [
        "default-src 'none'",
        "connect-src 'self'",
        "frame-ancestors 'none'",
    ] {
        assert!(csp.contains(directive), "{csp}");
    }
    let html = page.text().await.expect("html");
    assert!(!html.contains(&cloud.admin_token));

    let driver = start_driver().await;
    let session = Session::new(&driver).await;
    session.goto(&cloud.url("/admin/fleet")).await;
    let status = session
        .wait_text("#fleet-status", |t| t.contains("admin token"))
        .await;
    assert!(status.contains("Enter the admin token"), "{status}");

    // A wrong token is refused and said so.
    session.type_into("#token", "adm_wrong").await;
    session.click("#load-btn").await;
    let status = session
        .wait_text("#fleet-status", |t| t.contains("Could not load"))
        .await;
    assert!(status.contains("POS_SYNC_UNAUTHORIZED"), "{status}");

    session.type_into("#token", &cloud.admin_token).await;
    session.click("#load-btn").await;
    let gap = format!("missing 4\u{2013}9 from {t1}");
    let chain_break = format!("chain break at event 2 of pos {p2} from {t2}");
    let b1 = session
        .wait_text("section.branch[data-branch='b1']", |t| {
            t.contains(&gap) && t.contains(&chain_break)
        })
        .await;
    assert!(b1.contains(&gap), "{b1}");
    assert!(b1.contains(&chain_break), "{b1}");
    assert!(b1.contains("6 sale(s) missing"), "{b1}");
    assert!(b1.contains("1 chain break(s)"), "{b1}");
    let row1 = session
        .text(&format!("tr.terminal[data-terminal='{t1}'] .last-contact"))
        .await;
    assert!(row1.contains(" s ago ("), "{row1}");
    let attention = session
        .text(&format!(
            "tr.terminal[data-terminal='{t1}'] .needs-attention"
        ))
        .await;
    assert_eq!(
        attention, "2",
        "till 1 reported two sales needing attention"
    );
    let row2 = session
        .text(&format!("tr.terminal[data-terminal='{t2}']"))
        .await;
    assert!(row2.contains("not reported"), "{row2}");
    let b2 = session.text("section.branch[data-branch='b2']").await;
    assert!(b2.contains(&t3.to_string()) && b2.contains("never"), "{b2}");
    assert!(
        b2.contains("Gaps\nnone") || b2.contains("GAPS\nnone"),
        "{b2}"
    );

    // The token is in this tab's sessionStorage, not the URL: a reload shows the fleet again
    // without asking.
    let url = session.cmd(reqwest::Method::GET, "/url", Value::Null).await;
    assert_eq!(url.as_str(), Some(cloud.url("/admin/fleet").as_str()));
    session.goto(&cloud.url("/admin/fleet")).await;
    let again = session
        .wait_text("#branches", |t| t.contains(&chain_break))
        .await;
    assert!(again.contains(&gap), "{again}");

    // "Forget token" clears it.
    session.click("#forget-btn").await;
    let status = session.text("#fleet-status").await;
    assert!(status.contains("Token forgotten"), "{status}");
    session.goto(&cloud.url("/admin/fleet")).await;
    let status = session
        .wait_text("#fleet-status", |t| t.contains("Enter the admin token"))
        .await;
    assert!(status.contains("Enter the admin token"), "{status}");
    assert_eq!(session.text("#branches").await, "");
    session.close().await;
}
