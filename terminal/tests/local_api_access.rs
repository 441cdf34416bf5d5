//! The loopback API's access rules over HTTP (reqwest against the endpoint over an in-memory
//! till): `Host` allowlist, foreign `Origin`, local and page tokens, JSON-only bodies — each
//! refusal with its stable code in the error envelope, counted, and nothing stored.

mod status_page_support;

use reqwest::{Client, RequestBuilder, Response};
use serde_json::{json, Value};
use status_page_support::{
    refused, start_fake_server, start_server_allowing, valid_payload, FakeTill, LOCAL_TOKEN,
};

async fn envelope(res: Response, status: u16, code: &str) -> Value {
    assert_eq!(res.status().as_u16(), status);
    let body: Value = res.json().await.expect("error envelope");
    assert_eq!(body["error"]["code"], code, "{body}");
    assert_eq!(body["error"]["retryable"], false, "{body}");
    assert!(body["error"]["message"]
        .as_str()
        .is_some_and(|m| !m.is_empty()));
    body
}

fn sale(http: &Client, url: &str) -> RequestBuilder {
    http.post(format!("{url}/sales"))
        .json(&json!({"type": "sale", "payload": valid_payload("R-ACCESS")}))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_daemons_own_host_names_are_answered() {
    let (server, _, _, _) = start_server_allowing(FakeTill::new(), &["till-7.shop.lan"]);
    let http = Client::new();
    let url = server.url();
    let port = server.local_addr().port();

    for host in [
        format!("127.0.0.1:{port}"),
        format!("localhost:{port}"),
        format!("[::1]:{port}"),
        format!("till-7.shop.lan:{port}"),
    ] {
        let res = http
            .get(format!("{url}/status"))
            .header("host", &host)
            .send()
            .await
            .expect("GET /status");
        assert_eq!(res.status(), 200, "{host}");
    }
    // DNS rebinding: the attacker's name resolves to 127.0.0.1, the browser sends it as Host.
    for (path, host) in [
        ("/status", format!("evil.example:{port}")),
        ("/", format!("evil.example:{port}")),
        ("/outbox", format!("127.0.0.1.nip.io:{port}")),
        ("/status", format!("127.0.0.1:{}", port.wrapping_add(1))),
        ("/no-such-route", "localhost".to_string()),
    ] {
        let res = http
            .get(format!("{url}{path}"))
            .header("host", &host)
            .send()
            .await
            .expect("GET");
        envelope(res, 403, "POS_LOCAL_HOST_NOT_ALLOWED").await;
    }
    // The host check comes first: even the token does not help.
    let res = sale(&http, &url)
        .header("host", format!("evil.example:{port}"))
        .bearer_auth(LOCAL_TOKEN)
        .send()
        .await
        .expect("POST");
    envelope(res, 403, "POS_LOCAL_HOST_NOT_ALLOWED").await;
    assert_eq!(refused(&url, "host").await, 6.0);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_foreign_origin_is_refused_even_with_the_token() {
    let (server, till, _, _) = start_fake_server();
    let http = Client::new();
    let url = server.url();
    for origin in ["http://evil.example", "null", "http://127.0.0.1:1"] {
        let res = sale(&http, &url)
            .bearer_auth(LOCAL_TOKEN)
            .header("origin", origin)
            .send()
            .await
            .expect("POST");
        envelope(res, 403, "POS_LOCAL_ORIGIN_NOT_ALLOWED").await;
    }
    let res = http
        .get(format!("{url}/status"))
        .header("origin", "http://evil.example")
        .send()
        .await
        .expect("GET");
    envelope(res, 403, "POS_LOCAL_ORIGIN_NOT_ALLOWED").await;
    assert_eq!(till.rows.lock().expect("rows").len(), 4, "nothing stored");

    // The daemon's own page origin is fine.
    let res = sale(&http, &url)
        .bearer_auth(LOCAL_TOKEN)
        .header("origin", url.as_str())
        .send()
        .await
        .expect("POST");
    assert_eq!(res.status(), 201);
    assert_eq!(refused(&url, "origin").await, 4.0);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_changing_routes_need_the_local_token_and_the_page_token_only_opens_operator_actions()
{
    let (server, till, engine, _) = start_fake_server();
    let http = Client::new();
    let url = server.url();

    let res = sale(&http, &url).send().await.expect("POST");
    assert_eq!(
        res.headers()
            .get("www-authenticate")
            .and_then(|v| v.to_str().ok()),
        Some("Bearer")
    );
    envelope(res, 401, "POS_LOCAL_UNAUTHORIZED").await;
    for auth in [
        "Bearer ltk_not-the-token".to_string(),
        format!("Basic {LOCAL_TOKEN}"),
        format!("Bearer {LOCAL_TOKEN}x"),
        "Bearer".to_string(),
    ] {
        let res = sale(&http, &url)
            .header("authorization", auth)
            .send()
            .await
            .expect("POST");
        envelope(res, 401, "POS_LOCAL_UNAUTHORIZED").await;
    }
    for (path, body) in [
        ("/outbox/retry", json!({"all": true})),
        ("/reconcile", json!({"mode": "apply"})),
    ] {
        let res = http
            .post(format!("{url}{path}"))
            .json(&body)
            .send()
            .await
            .expect("POST");
        envelope(res, 401, "POS_LOCAL_UNAUTHORIZED").await;
    }
    assert_eq!(till.rows.lock().expect("rows").len(), 4);
    assert!(engine.reconciles.lock().expect("reconciles").is_empty());

    // The page token, as the page gets it.
    let html = http
        .get(format!("{url}/"))
        .send()
        .await
        .expect("GET /")
        .text()
        .await
        .expect("html");
    let page_token = html
        .split("name=\"possync-page-token\" content=\"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .expect("page token in the page")
        .to_string();
    assert!(page_token.starts_with("pgt_"), "{page_token}");
    assert_ne!(page_token, LOCAL_TOKEN);
    let res = sale(&http, &url)
        .bearer_auth(&page_token)
        .send()
        .await
        .expect("POST");
    envelope(res, 403, "POS_LOCAL_UNAUTHORIZED").await;
    assert_eq!(till.rows.lock().expect("rows").len(), 4);
    let res = http
        .post(format!("{url}/outbox/retry"))
        .bearer_auth(&page_token)
        .json(&json!({"all": true}))
        .send()
        .await
        .expect("POST");
    assert_eq!(res.status(), 200);
    let res = http
        .post(format!("{url}/reconcile"))
        .bearer_auth(&page_token)
        .json(&json!({"mode": "verify"}))
        .send()
        .await
        .expect("POST");
    assert_eq!(res.status(), 200);

    let res = sale(&http, &url)
        .bearer_auth(LOCAL_TOKEN)
        .send()
        .await
        .expect("POST");
    assert_eq!(res.status(), 201);
    assert_eq!(refused(&url, "token").await, 8.0);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn post_bodies_must_be_declared_json() {
    let (server, till, _, _) = start_fake_server();
    let http = Client::new();
    let url = server.url();
    let body = json!({"type": "sale", "payload": valid_payload("R-CT")}).to_string();
    for ct in [
        Some("text/plain"),
        Some("application/x-www-form-urlencoded"),
        Some("multipart/form-data; boundary=x"),
        None,
    ] {
        let mut req = http
            .post(format!("{url}/sales"))
            .bearer_auth(LOCAL_TOKEN)
            .body(body.clone());
        if let Some(ct) = ct {
            req = req.header("content-type", ct);
        }
        let res = req.send().await.expect("POST");
        envelope(res, 415, "POS_LOCAL_UNSUPPORTED_MEDIA_TYPE").await;
    }
    assert_eq!(till.rows.lock().expect("rows").len(), 4, "nothing stored");
    let res = http
        .post(format!("{url}/sales"))
        .bearer_auth(LOCAL_TOKEN)
        .header("content-type", "application/json; charset=utf-8")
        .body(body)
        .send()
        .await
        .expect("POST");
    assert_eq!(res.status(), 201);
    assert_eq!(refused(&url, "content_type").await, 4.0);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_queries_get_the_envelope_and_the_page_cannot_be_framed() {
    let (server, _, _, _) = start_fake_server();
    let http = Client::new();
    let url = server.url();
    for path in [
        "/outbox?limit=abc",
        "/outbox?limit=-1",
        "/outbox?status=lost",
        "/catalog/lookup?sku=a&q=b",
    ] {
        let res = http.get(format!("{url}{path}")).send().await.expect("GET");
        envelope(res, 400, "POS_SYNC_EVENT_INVALID").await;
    }
    let res = http.get(format!("{url}/")).send().await.expect("GET /");
    let header = |name: &str| {
        res.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string()
    };
    assert_eq!(header("x-frame-options"), "DENY");
    assert!(header("content-security-policy").contains("frame-ancestors 'none'"));
    assert_eq!(header("cache-control"), "no-store");
    server.stop().await;
}
