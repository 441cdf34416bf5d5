//! The real `terminal` binary's local API seen with `curl`, as a POS integrator or an attacker
//! would: the token `terminal local-token` prints opens `POST /sales`, nothing else does; a
//! foreign `Host`, a foreign `Origin` and a non-JSON body are refused; the CLI's own call
//! through the daemon carries the token; and the data dir's secrets are owner-only, including a
//! database an older version left world-readable.
//!
//! Needs no cloud: enrollment works offline. Needs `curl` (the test FAILS without it).

mod e2e_support;

use e2e_support::{sale_payload, terminal_cli, Daemon};
use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::process::Command;

/// `curl ARGS -w '\n%{http_code}'` → (status, body).
fn curl(args: &[&str]) -> (u16, String) {
    let out = Command::new("curl")
        .args(["-sS", "-w", "\n%{http_code}"])
        .args(args)
        .output()
        .expect("curl is missing: apt-get install -y curl");
    assert!(out.status.success(), "curl failed: {out:?}");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, status) = text.rsplit_once('\n').expect("status line");
    (status.trim().parse().expect("status"), body.to_string())
}

fn code_of(body: &str) -> String {
    let v: serde_json::Value = serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body}"));
    v["error"]["code"].as_str().unwrap_or_default().to_string()
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .permissions()
        .mode()
        & 0o777
}

/// Enrolls `data` as `terminal_id` of branch `b1` without a cloud (nothing listens on port 9).
fn enroll_offline(data: &std::path::Path, terminal_id: &str) {
    let (ok, out, err) = terminal_cli(
        data,
        &[
            "enroll",
            "--cloud-url",
            "http://127.0.0.1:9",
            "--token",
            "t",
            "--terminal-id",
            terminal_id,
            "--branch",
            "b1",
        ],
    );
    assert!(ok, "{out} {err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_needs_the_local_token_and_the_till_s_files_are_owner_only() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("till");
    enroll_offline(&data, "0194b7a2-6c1e-7f00-8000-0000000000aa");
    // As an older version would have left it.
    std::fs::set_permissions(
        data.join("terminal.db"),
        std::fs::Permissions::from_mode(0o644),
    )
    .expect("chmod");

    let (ok, token, err) = terminal_cli(&data, &["local-token"]);
    assert!(ok, "{err}");
    let token = token.trim().to_string();
    assert!(token.starts_with("ltk_") && token.len() == 68, "{token}");
    let (_, again, _) = terminal_cli(&data, &["local-token"]);
    assert_eq!(again.trim(), token, "generated once");

    let daemon = Daemon::start(&data, &[]);
    assert_eq!(daemon.token, token);
    let url = daemon.url.clone();
    let port = url.rsplit(':').next().expect("port").to_string();
    let body = serde_json::json!({"type": "sale", "payload": sale_payload(1)}).to_string();
    let auth = format!("authorization: Bearer {token}");
    let json_ct = "content-type: application/json";
    let sales = format!("{url}/sales");

    // POST /sales with these headers → (status, error code or "").
    let post_sale = |headers: &[&str]| {
        let mut args = vec!["-X", "POST", sales.as_str(), "-d", body.as_str()];
        for h in headers {
            args.extend(["-H", h]);
        }
        let (status, answer) = curl(&args);
        let code = if status == 201 {
            String::new()
        } else {
            code_of(&answer)
        };
        (status, code)
    };
    let refusals = [
        (vec![json_ct], 401, "POS_LOCAL_UNAUTHORIZED"),
        (
            vec![json_ct, "authorization: Bearer ltk_guess"],
            401,
            "POS_LOCAL_UNAUTHORIZED",
        ),
        (
            vec!["content-type: text/plain", &auth],
            415,
            "POS_LOCAL_UNSUPPORTED_MEDIA_TYPE",
        ),
        (
            vec![json_ct, &auth, "origin: http://evil.example"],
            403,
            "POS_LOCAL_ORIGIN_NOT_ALLOWED",
        ),
    ];
    for (headers, status, code) in refusals {
        assert_eq!(
            post_sale(&headers),
            (status, code.to_string()),
            "{headers:?}"
        );
    }
    let evil_host = format!("host: evil.example:{port}");
    let (status, answer) = curl(&[&format!("{url}/status"), "-H", &evil_host]);
    assert_eq!(
        (status, code_of(&answer).as_str()),
        (403, "POS_LOCAL_HOST_NOT_ALLOWED")
    );
    assert!(!answer.contains("pos_id"), "{answer}");
    let s = daemon.status().await;
    assert_eq!(
        s["outbox"]["queued"], 0,
        "nothing enqueued by refused requests: {s}"
    );

    assert_eq!(post_sale(&[json_ct, &auth]), (201, String::new()));
    let (status, _) = curl(&[&format!("http://localhost:{port}/status")]);
    assert_eq!(status, 200);

    // `terminal reconcile` goes through the daemon with the token: the refusal it reports is
    // the unreachable cloud's, not the local API's.
    let (ok, out, err) = terminal_cli(&data, &["reconcile", "--verify"]);
    assert!(!ok, "{out}");
    assert!(!err.contains("POS_LOCAL_"), "{err}");

    // Owner-only: the token, the database with its WAL and shared memory (SQLite creates
    // those with the database's mode), the one an older version left at 0644 included.
    assert_eq!(mode(&data), 0o700);
    for name in [
        "local-api.token",
        "terminal.db",
        "terminal.db-wal",
        "terminal.db-shm",
    ] {
        assert_eq!(
            mode(&data.join(name)) & 0o077,
            0,
            "{name} is readable by others"
        );
    }
    drop(daemon);

    // A bad --allowed-host is refused before anything binds.
    let (ok, _, err) = terminal_cli(
        &data,
        &["run", "--status-bind", "127.0.0.1:0", "--allowed-host", "*"],
    );
    assert!(!ok);
    assert!(
        err.contains("error: STATUS_BIND_FAILED: --allowed-host"),
        "{err}"
    );
}

/// A POS client's retry after a timeout: the same `Idempotency-Key` with the same sale answers
/// the original receipt (201, `Idempotent-Replayed: true`) and records nothing, across a daemon
/// restart too; the key with another sale is 409; a malformed key is 400 and stores nothing;
/// without a key the same sale twice is two sales; and two simultaneous requests with one key
/// record one sale.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retried_sale_with_its_idempotency_key_is_recorded_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("till");
    enroll_offline(&data, "0194b7a2-6c1e-7f00-8000-0000000000ab");
    let mut daemon = Daemon::start(&data, &[]);
    let sale = |n: i64| serde_json::json!({"type": "sale", "payload": sale_payload(n)});
    let recorded = |d: &Daemon| {
        let url = format!("{}/outbox?limit=1000", d.url);
        async move {
            let v: serde_json::Value = reqwest::get(url)
                .await
                .expect("GET /outbox")
                .json()
                .await
                .expect("json");
            v["count"].as_i64().expect("count")
        }
    };
    let key = [("idempotency-key", "0194b7a2-6c1e-7f00-8000-00000000k001")];

    let (status, headers, first) = daemon.post_with("/sales", sale(1), &key).await;
    assert_eq!(status, 201, "{first}");
    assert!(headers.get("idempotent-replayed").is_none());
    let (status, headers, again) = daemon.post_with("/sales", sale(1), &key).await;
    assert_eq!(status, 201, "{again}");
    assert_eq!(
        headers.get("idempotent-replayed").map(|v| v.as_bytes()),
        Some(&b"true"[..])
    );
    assert_eq!(again, first, "the original receipt");
    assert_eq!(recorded(&daemon).await, 1);

    let (status, _, refused) = daemon.post_with("/sales", sale(2), &key).await;
    assert_eq!(status, 409, "{refused}");
    assert_eq!(refused["error"]["code"], "POS_LOCAL_IDEMPOTENCY_KEY_REUSED");
    assert_eq!(refused["error"]["retryable"], false);

    let long = "k".repeat(256);
    let malformed: [&[(&str, &str)]; 4] = [
        &[("idempotency-key", "")],
        &[("idempotency-key", long.as_str())],
        &[("idempotency-key", "tab\there")],
        &[("idempotency-key", "a"), ("idempotency-key", "b")],
    ];
    for headers in malformed {
        let (status, _, answer) = daemon.post_with("/sales", sale(3), headers).await;
        assert_eq!(status, 400, "{headers:?}: {answer}");
        assert_eq!(answer["error"]["code"], "POS_REQUEST_INVALID", "{answer}");
    }
    assert_eq!(recorded(&daemon).await, 1, "nothing stored by refusals");

    // Without the header, today's behaviour: a retry is another sale.
    assert_eq!(daemon.post("/sales", sale(4)).await.0, 201);
    assert_eq!(daemon.post("/sales", sale(4)).await.0, 201);
    assert_eq!(recorded(&daemon).await, 3);

    // Two simultaneous requests with one key: one sale, one receipt for both.
    let shared = [("idempotency-key", "receipt B1-T1-000005")];
    let (a, b) = tokio::join!(
        daemon.post_with("/sales", sale(5), &shared),
        daemon.post_with("/sales", sale(5), &shared)
    );
    assert_eq!((a.0, b.0), (201, 201), "{} {}", a.2, b.2);
    assert_eq!(a.2, b.2, "the same receipt");
    let replays = [&a.1, &b.1]
        .iter()
        .filter(|h| h.get("idempotent-replayed").is_some())
        .count();
    assert_eq!(replays, 1, "one recorded, one replayed");
    assert_eq!(recorded(&daemon).await, 4);

    // The key is in the database, not in the daemon's memory.
    daemon.restart();
    let (status, headers, after) = daemon.post_with("/sales", sale(1), &key).await;
    assert_eq!(status, 201, "{after}");
    assert!(headers.get("idempotent-replayed").is_some());
    assert_eq!(after, first);
    assert_eq!(recorded(&daemon).await, 4, "{}", daemon.log());
}
