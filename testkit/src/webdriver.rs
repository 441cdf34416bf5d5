//! A WebDriver client just big enough for the page tests (the till's status page, the cloud's
//! fleet page): chromedriver over plain HTTP, headless Chromium, find/click/type/read text.
//! Missing binaries FAIL the test (never skip).

use serde_json::{json, Value};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

const ELEMENT_KEY: &str = "element-6066-11e4-a52e-4f735466cecf";

/// chromedriver child, killed when the test ends however it ends.
pub struct Driver {
    child: Child,
    base: String,
    _profile: tempfile::TempDir,
    profile_path: String,
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn find_binary(candidates: &[&str]) -> Option<String> {
    candidates
        .iter()
        .find(|p| Path::new(p).exists())
        .map(|p| p.to_string())
}

/// Starts chromedriver on a free port and waits until it answers; panics (naming the Debian
/// packages) if chromedriver or Chromium is missing.
pub async fn start_driver() -> Driver {
    let driver_bin = find_binary(&["/usr/bin/chromedriver", "/usr/lib/chromium/chromedriver"])
        .expect("chromedriver is missing: apt-get install -y chromium chromium-driver");
    find_binary(&["/usr/bin/chromium", "/usr/lib/chromium/chromium"])
        .expect("chromium is missing: apt-get install -y chromium chromium-driver");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let child = Command::new(driver_bin)
        .arg(format!("--port={port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("chromedriver starts");
    let profile = tempfile::tempdir().expect("profile dir");
    let profile_path = profile.path().display().to_string();
    let driver = Driver {
        child,
        base: format!("http://127.0.0.1:{port}"),
        _profile: profile,
        profile_path,
    };
    let http = reqwest::Client::new();
    for _ in 0..300 {
        if let Ok(r) = http.get(format!("{}/status", driver.base)).send().await {
            if r.status().is_success() {
                return driver;
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("chromedriver did not come up on {}", driver.base);
}

/// One headless Chromium session.
pub struct Session {
    http: reqwest::Client,
    base: String,
}

impl Session {
    /// Opens a headless Chromium session on `driver`.
    pub async fn new(driver: &Driver) -> Session {
        let http = reqwest::Client::new();
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": find_binary(&["/usr/bin/chromium", "/usr/lib/chromium/chromium"]),
                "args": ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                         "--disable-background-networking", "--disable-component-update",
                         "--disable-sync", "--no-first-run",
                         format!("--user-data-dir={}", driver.profile_path)]
            }
        }}});
        let res: Value = http
            .post(format!("{}/session", driver.base))
            .json(&caps)
            .send()
            .await
            .expect("new session")
            .json()
            .await
            .expect("session json");
        let id = res["value"]["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no session: {res}"))
            .to_string();
        Session {
            http,
            base: format!("{}/session/{id}", driver.base),
        }
    }

    /// One WebDriver command on this session; returns its `value`.
    pub async fn cmd(&self, method: reqwest::Method, path: &str, body: Value) -> Value {
        let req = self.http.request(method, format!("{}{path}", self.base));
        let req = if body.is_null() { req } else { req.json(&body) };
        let v: Value = req
            .send()
            .await
            .expect("webdriver call")
            .json()
            .await
            .expect("webdriver json");
        v["value"].clone()
    }

    /// Navigates to `url`.
    pub async fn goto(&self, url: &str) {
        self.cmd(reqwest::Method::POST, "/url", json!({"url": url}))
            .await;
    }

    /// The WebDriver id of the first element matching `css`, if there is one.
    pub async fn find(&self, css: &str) -> Option<String> {
        let v = self
            .cmd(
                reqwest::Method::POST,
                "/element",
                json!({"using": "css selector", "value": css}),
            )
            .await;
        v[ELEMENT_KEY].as_str().map(str::to_string)
    }

    /// The WebDriver id of the first element matching `css` (panics if none).
    pub async fn element(&self, css: &str) -> String {
        self.find(css)
            .await
            .unwrap_or_else(|| panic!("no element {css}"))
    }

    /// The rendered text of the element with WebDriver id `id`.
    async fn text_of(&self, id: &str) -> String {
        self.cmd(
            reqwest::Method::GET,
            &format!("/element/{id}/text"),
            Value::Null,
        )
        .await
        .as_str()
        .unwrap_or_default()
        .to_string()
    }

    /// Clicks the first element matching `css`.
    pub async fn click(&self, css: &str) {
        let id = self.element(css).await;
        let v = self
            .cmd(
                reqwest::Method::POST,
                &format!("/element/{id}/click"),
                json!({}),
            )
            .await;
        assert!(v.is_null(), "click {css} failed: {v}");
    }

    /// The rendered text of the first element matching `css` (panics if none).
    pub async fn text(&self, css: &str) -> String {
        let id = self.element(css).await;
        self.text_of(&id).await
    }

    /// Types `text` into the first element matching `css` (an input).
    pub async fn type_into(&self, css: &str, text: &str) {
        let id = self.element(css).await;
        let v = self
            .cmd(
                reqwest::Method::POST,
                &format!("/element/{id}/value"),
                json!({ "text": text }),
            )
            .await;
        assert!(v.is_null(), "typing into {css} failed: {v}");
    }

    /// Polls `css`'s text until `pred` holds (an element not rendered yet counts as empty
    /// text); returns the last text seen either way.
    pub async fn wait_text(&self, css: &str, pred: impl Fn(&str) -> bool) -> String {
        let mut last = String::new();
        for _ in 0..200 {
            last = match self.find(css).await {
                Some(id) => self.text_of(&id).await,
                None => String::new(),
            };
            if pred(&last) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        last
    }

    /// Ends the session (the browser closes).
    pub async fn close(self) {
        let _ = self.http.delete(&self.base).send().await;
    }
}
