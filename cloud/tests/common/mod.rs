//! Shared setup of the cloud integration suites: a real `cloud serve` process on a real
//! database (a fresh PostgreSQL database, or the embedded SQLite default), plus HTTP helpers.
#![allow(dead_code)]

use possync_testkit::cloud::CloudProcess;
use possync_testkit::pg::TestDatabase;
use reqwest::{Client, Response, StatusCode};
use serde_json::Value;

/// Declares each named scenario twice, as the tests `pg::NAME` and `sqlite::NAME`, each calling
/// `NAME(Backend)` in the suite's root — or in its module `M` with `on_both_backends!(M => …)`.
/// A suite that uses it declares `#[macro_use] mod common;`.
#[allow(unused_macros)]
macro_rules! on_both_backends {
    ($module:ident => $($name:ident),* $(,)?) => {
        mod pg {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$module::$name(super::Backend::Pg).await
                }
            )*
        }
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$module::$name(super::Backend::Sqlite).await
                }
            )*
        }
    };
    ($($name:ident),* $(,)?) => {
        mod pg {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(super::Backend::Pg).await
                }
            )*
        }
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(super::Backend::Sqlite).await
                }
            )*
        }
    };
}

/// Which database the server under test runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Pg,
    Sqlite,
}

/// Rate limits high enough that only the rate-limit tests ever meet them.
pub const NO_LIMITS: &[&str] = &[
    "--rate-per-second",
    "100000",
    "--rate-burst",
    "100000",
    "--address-rate-per-second",
    "100000",
    "--address-rate-burst",
    "100000",
];

/// A server under test. Field order matters: the process stops before its database is dropped.
pub struct Env {
    pub cloud: CloudProcess,
    pub pg: Option<TestDatabase>,
    pub http: Client,
}

impl Env {
    /// A server with effectively no rate limits.
    pub fn start(backend: Backend) -> Env {
        Env::start_with(backend, NO_LIMITS)
    }

    /// A server with the given extra `serve` flags.
    pub fn start_with(backend: Backend, args: &[&str]) -> Env {
        let pg = match backend {
            Backend::Pg => Some(
                TestDatabase::create()
                    .expect("PostgreSQL must be reachable (these tests never skip)"),
            ),
            Backend::Sqlite => None,
        };
        let cloud = CloudProcess::start_with(pg.as_ref().map(|d| d.url.as_str()), args)
            .expect("cloud serve starts");
        Env {
            cloud,
            pg,
            http: Client::new(),
        }
    }

    pub fn url(&self, path: &str) -> String {
        self.cloud.url(path)
    }

    pub fn terminal(&self, branch: &str) -> (uuid::Uuid, String) {
        self.cloud.add_terminal(branch).expect("terminal add")
    }

    pub async fn get(&self, path: &str, token: Option<&str>) -> Response {
        let mut r = self.http.get(self.url(path));
        if let Some(t) = token {
            r = r.bearer_auth(t);
        }
        r.send().await.expect("request sent")
    }

    pub async fn post_json(&self, path: &str, token: Option<&str>, body: &Value) -> Response {
        let mut r = self.http.post(self.url(path)).json(body);
        if let Some(t) = token {
            r = r.bearer_auth(t);
        }
        r.send().await.expect("request sent")
    }

    pub async fn post_raw(
        &self,
        path: &str,
        token: &str,
        content_type: &str,
        body: Vec<u8>,
    ) -> Response {
        self.http
            .post(self.url(path))
            .bearer_auth(token)
            .header("content-type", content_type)
            .body(body)
            .send()
            .await
            .expect("request sent")
    }

    pub async fn admin_upsert(&self, entities: Value) -> Value {
        let r = self
            .post_json(
                "/v1/admin/catalog/upsert",
                Some(&self.cloud.admin_token.clone()),
                &serde_json::json!({ "entities": entities }),
            )
            .await;
        json_ok(r).await
    }

    pub async fn admin_delete(&self, keys: Value) -> Value {
        let r = self
            .post_json(
                "/v1/admin/catalog/delete",
                Some(&self.cloud.admin_token.clone()),
                &serde_json::json!({ "entities": keys }),
            )
            .await;
        json_ok(r).await
    }

    pub async fn sales_count(&self) -> i64 {
        let r = self
            .get(
                "/v1/admin/sales/summary",
                Some(&self.cloud.admin_token.clone()),
            )
            .await;
        json_ok(r).await["sales_events"]
            .as_i64()
            .expect("sales_events count")
    }
}

/// Asserts 200 and returns the JSON body.
pub async fn json_ok(r: Response) -> Value {
    let status = r.status();
    let text = r.text().await.expect("body");
    assert_eq!(status, StatusCode::OK, "body: {text}");
    serde_json::from_str(&text).expect("JSON body")
}

/// Asserts the contract's error envelope with this status and code; returns the envelope.
pub async fn expect_error(r: Response, status: u16, code: &str) -> Value {
    let got = r.status().as_u16();
    assert!(
        r.headers().contains_key("x-request-id"),
        "every response carries x-request-id"
    );
    let text = r.text().await.expect("body");
    assert_eq!(got, status, "body: {text}");
    let v: Value = serde_json::from_str(&text).expect("error envelope is JSON");
    assert_eq!(v["error"]["code"], code, "{v}");
    assert!(v["error"]["message"].is_string(), "{v}");
    assert!(v["error"]["retryable"].is_boolean(), "{v}");
    v
}

impl Drop for Env {
    /// A failing test shows the server's last log lines (the cause behind a 5xx), since the
    /// data dir holding the log is deleted with the process.
    fn drop(&mut self) {
        if std::thread::panicking() {
            let log = std::fs::read_to_string(self.cloud.log_path()).unwrap_or_default();
            let lines: Vec<&str> = log
                .lines()
                .filter(|l| l.contains("\"ERROR\"") || l.contains("\"WARN\""))
                .collect();
            let start = lines.len().saturating_sub(15);
            eprintln!(
                "--- cloud log (warnings and errors, last 15) ---\n{}",
                lines[start..].join("\n")
            );
        }
    }
}
