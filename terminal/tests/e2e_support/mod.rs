//! Shared pieces of the end-to-end tests: a real `cloud serve` on a fresh PostgreSQL database
//! (via the testkit), a "cable" between terminal and cloud that a test can cut and re-plug
//! (the cloud's port changes when it restarts, the terminal's enrolled URL does not), and the
//! real `terminal` binary run as a daemon.

#![allow(dead_code)]

use possync_testkit::cloud::CloudProcess;
use possync_testkit::pg::TestDatabase;
use possync_testkit::process::{spawn_announcing, terminate};
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};

/// The `terminal` binary cargo built for these tests.
pub const TERMINAL_BIN: &str = env!("CARGO_BIN_EXE_terminal");

/// Most polls of a condition before a test gives up (each poll sleeps [`POLL`]).
pub const MAX_POLLS: usize = 1200;
pub const POLL: Duration = Duration::from_millis(100);

/// A TCP forwarder 127.0.0.1:port → the cloud. `cut` refuses new connections and drops live
/// ones' future traffic; `plug` points it at a (new) cloud address.
pub struct Cable {
    pub addr: SocketAddr,
    upstream: Arc<Mutex<Option<SocketAddr>>>,
    generation: Arc<std::sync::atomic::AtomicU64>,
}

impl Cable {
    pub async fn start(upstream: &str) -> Cable {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind cable");
        let addr = listener.local_addr().expect("cable addr");
        let cable = Cable {
            addr,
            upstream: Arc::new(Mutex::new(None)),
            generation: Arc::new(Default::default()),
        };
        cable.plug(upstream);
        let up = cable.upstream.clone();
        let generation = cable.generation.clone();
        tokio::spawn(async move {
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else {
                    break;
                };
                let target = *up.lock().expect("cable lock");
                let my_gen = generation.load(std::sync::atomic::Ordering::SeqCst);
                let generation = generation.clone();
                tokio::spawn(async move {
                    let Some(target) = target else { return };
                    let Ok(mut outbound) = TcpStream::connect(target).await else {
                        return;
                    };
                    // Forward until either side closes or the cable is cut/re-plugged.
                    let copy = tokio::io::copy_bidirectional(&mut inbound, &mut outbound);
                    let watch = async {
                        loop {
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            if generation.load(std::sync::atomic::Ordering::SeqCst) != my_gen {
                                break;
                            }
                        }
                    };
                    tokio::select! {
                        _ = copy => {}
                        _ = watch => {}
                    }
                });
            }
        });
        cable
    }

    /// `http://127.0.0.1:PORT` — the cloud URL the terminal is enrolled with.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Connects the cable to `base_url` (`http://HOST:PORT`).
    pub fn plug(&self, base_url: &str) {
        let hostport = base_url.trim_start_matches("http://").trim_end_matches('/');
        let addr: SocketAddr = hostport.parse().expect("cloud address");
        *self.upstream.lock().expect("cable lock") = Some(addr);
        self.generation
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }

    /// Disconnects: new connections are refused-by-close, live ones are dropped.
    pub fn cut(&self) {
        *self.upstream.lock().expect("cable lock") = None;
        self.generation
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }
}

/// A cloud on a fresh PostgreSQL database.
pub struct Cloud {
    pub process: CloudProcess,
    pub db: TestDatabase,
}

impl Cloud {
    /// Fails loudly if PostgreSQL or the cloud binary is missing.
    pub fn start(extra: &[&str]) -> Cloud {
        let db = TestDatabase::create().expect("PostgreSQL must be reachable for e2e tests");
        let process = CloudProcess::start_with(Some(&db.url), extra)
            .expect("cloud serve must start (build it: cargo build -p possync-cloud)");
        Cloud { process, db }
    }

    /// Upserts a global product through the cloud CLI.
    pub fn upsert_product(&self, id: &str, sku: &str, barcode: &str, name: &str) {
        let args = product_upsert_args(id, sku, barcode, name);
        self.process
            .cli(&args.iter().map(String::as_str).collect::<Vec<_>>())
            .expect("catalog upsert");
    }

    /// Sales rows the cloud stores for `branch` (admin route): duplicates would show here.
    pub async fn stored_sales(&self, branch: &str) -> i64 {
        let v: Value = reqwest::Client::new()
            .get(
                self.process
                    .url(&format!("/v1/admin/sales/summary?branch={branch}")),
            )
            .bearer_auth(&self.process.admin_token)
            .send()
            .await
            .expect("admin sales summary")
            .json()
            .await
            .expect("summary json");
        v["sales_events"]
            .as_i64()
            .unwrap_or_else(|| panic!("no sales_events in {v}"))
    }

    /// `GET /v1/pos/sync/status` as the terminal: what the cloud holds of its sales. Shares
    /// the terminal's rate-limit bucket, so a 429 is waited out.
    pub async fn sync_status(&self, token: &str) -> Value {
        let mut last = Value::Null;
        for _ in 0..MAX_POLLS {
            let resp = reqwest::Client::new()
                .get(self.process.url("/v1/pos/sync/status"))
                .bearer_auth(token)
                .send()
                .await
                .expect("sync status");
            let status = resp.status().as_u16();
            last = resp.json().await.expect("sync status json");
            if status != 429 {
                return last;
            }
            tokio::time::sleep(POLL).await;
        }
        panic!("sync status stayed rate-limited: {last}");
    }
}

/// `cloud catalog upsert …` of a global product with these fields (price 250).
pub fn product_upsert_args(id: &str, sku: &str, barcode: &str, name: &str) -> Vec<String> {
    let data = json!({"sku": sku, "barcode": barcode, "name": name, "price_minor": 250});
    [
        "catalog", "upsert", "--type", "product", "--id", id, "--data",
    ]
    .iter()
    .map(|s| s.to_string())
    .chain([data.to_string()])
    .collect()
}

/// Runs `terminal ARGS` to completion; returns (success, stdout, stderr).
pub fn terminal_cli(data_dir: &Path, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(TERMINAL_BIN)
        .arg("--data-dir")
        .arg(data_dir)
        .args(args)
        .env("POSSYNC_LOG", "warn")
        .output()
        .expect("run terminal");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Lines of stderr that are not JSON log lines (what an operator reads).
pub fn human_lines(stderr: &str) -> Vec<String> {
    stderr
        .lines()
        .filter(|l| !l.starts_with('{'))
        .map(str::to_string)
        .collect()
}

/// Enrolls the terminal in `data_dir` with the cloud behind `cable`.
pub fn enroll(data_dir: &Path, cable: &Cable, terminal_id: uuid::Uuid, token: &str, branch: &str) {
    let (ok, out, err) = terminal_cli(
        data_dir,
        &[
            "enroll",
            "--cloud-url",
            &cable.url(),
            "--token",
            token,
            "--terminal-id",
            &terminal_id.to_string(),
            "--branch",
            branch,
        ],
    );
    assert!(ok, "enroll failed: {out} {err}");
    let v: Value = serde_json::from_str(&out).expect("enroll json");
    assert_eq!(
        v["verified"], true,
        "the cloud is up: the token must be checked: {out} {err}"
    );
}

/// A running `terminal run` daemon.
pub struct Daemon {
    child: Option<Child>,
    pub url: String,
    /// The local API token the daemon's state-changing routes need.
    pub token: String,
    pub data_dir: PathBuf,
    extra: Vec<String>,
}

impl Daemon {
    /// Starts the daemon with short test intervals and waits for its `status on` line.
    pub fn start(data_dir: &Path, extra: &[&str]) -> Daemon {
        let mut d = Daemon {
            child: None,
            url: String::new(),
            token: String::new(),
            data_dir: data_dir.to_path_buf(),
            extra: extra.iter().map(|s| s.to_string()).collect(),
        };
        d.spawn();
        d
    }

    fn spawn(&mut self) {
        let mut cmd = Command::new(TERMINAL_BIN);
        cmd.arg("--data-dir")
            .arg(&self.data_dir)
            .args(["run", "--status-bind", "127.0.0.1:0"])
            .args(self.args());
        let (child, url) = spawn_announcing(cmd, "status on ", &self.data_dir.join("daemon.log"))
            .unwrap_or_else(|e| panic!("terminal run did not start: {e:#}"));
        self.url = url;
        self.child = Some(child);
        // Written by the daemon before it announced its URL.
        self.token = possync_terminal::data_dir::local_token(&self.data_dir)
            .unwrap_or_else(|e| panic!("local API token: {e}"));
    }

    /// Test defaults (short intervals, attempts that never run out), overridden by `extra`.
    fn args(&self) -> Vec<String> {
        let mut args = Vec::new();
        for (flag, value) in [
            ("--delta-interval-ms", "200"),
            ("--backoff-base-ms", "100"),
            ("--backoff-cap-ms", "400"),
            ("--max-attempts", "1000"),
        ] {
            if !self.extra.iter().any(|e| e == flag) {
                args.push(flag.to_string());
                args.push(value.to_string());
            }
        }
        args.extend(self.extra.iter().cloned());
        args
    }

    /// SIGKILL, like `kill -9`.
    pub fn kill_9(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().expect("kill -9 daemon");
            c.wait().expect("reap daemon");
        }
    }

    /// SIGTERM and wait: the graceful path.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let mut c = self.child.take().expect("daemon running");
        terminate(&mut c).expect("SIGTERM the daemon")
    }

    /// Starts it again on the same data dir (new port).
    pub fn restart(&mut self) {
        self.kill_9();
        self.spawn();
    }

    pub async fn status(&self) -> Value {
        reqwest::get(format!("{}/status", self.url))
            .await
            .expect("GET /status")
            .json()
            .await
            .expect("status json")
    }

    pub async fn get(&self, path: &str) -> Value {
        reqwest::get(format!("{}{path}", self.url))
            .await
            .expect("GET")
            .json()
            .await
            .expect("json")
    }

    pub async fn post(&self, path: &str, body: Value) -> (u16, Value) {
        let (status, _, body) = self.post_with(path, body, &[]).await;
        (status, body)
    }

    /// [`Daemon::post`] with extra request headers; also returns the response's headers.
    pub async fn post_with(
        &self,
        path: &str,
        body: Value,
        headers: &[(&str, &str)],
    ) -> (u16, reqwest::header::HeaderMap, Value) {
        let mut req = reqwest::Client::new()
            .post(format!("{}{path}", self.url))
            .bearer_auth(&self.token)
            .json(&body);
        for (name, value) in headers {
            req = req.header(*name, *value);
        }
        let r = req.send().await.expect("POST");
        let status = r.status().as_u16();
        let headers = r.headers().clone();
        (status, headers, r.json().await.unwrap_or(Value::Null))
    }

    /// Records sale `n` (see [`sale_payload`]) through `POST /sales`; panics unless it is 201.
    /// Returns the answer (`pos_id`, `local_event_id`, …).
    pub async fn sell(&self, n: i64) -> Value {
        let (code, body) = self
            .post(
                "/sales",
                json!({"type": "sale", "payload": sale_payload(n)}),
            )
            .await;
        assert_eq!(code, 201, "sale {n}: {body}");
        body
    }

    /// Polls `/status` until `pred` holds; panics with the last status otherwise.
    pub async fn wait_status(&self, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let mut last = Value::Null;
        for _ in 0..MAX_POLLS {
            last = self.status().await;
            if pred(&last) {
                return last;
            }
            tokio::time::sleep(POLL).await;
        }
        panic!("timed out waiting for {what}; last status: {last:#}");
    }

    /// The daemon's log, for failure messages.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.data_dir.join("daemon.log")).unwrap_or_default()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill_9();
    }
}

/// A valid SALE payload; `n` varies the amounts so receipts differ.
pub fn sale_payload(n: i64) -> Value {
    let unit = 100 + n % 50;
    json!({
        "receipt_no": format!("B1-T1-{n:06}"), "currency": "EUR",
        "lines": [{"product_id": "p1", "sku": "SKU-1", "name": "Coffee beans", "qty": 2,
                   "unit_price_minor": unit, "discount_minor": 0, "tax_minor": 0, "total_minor": 2 * unit}],
        "totals": {"subtotal_minor": 2 * unit, "tax_minor": 0, "total_minor": 2 * unit},
        "payments": [{"method": "card", "amount_minor": 2 * unit}]
    })
}

/// The cloud's ingestion entry for `pos_id` in a sync-status document.
pub fn pos_entry<'a>(sync_status: &'a Value, pos_id: &str) -> &'a Value {
    sync_status["pos"]
        .as_array()
        .and_then(|a| a.iter().find(|p| p["pos_id"] == pos_id))
        .unwrap_or_else(|| panic!("cloud holds nothing of pos {pos_id}: {sync_status}"))
}
