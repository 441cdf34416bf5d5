//! The unreliable network: one HTTP/1.1 proxy per terminal, between it and the cloud.
//!
//! The terminal is enrolled with the proxy's URL as its cloud URL, so every request the real
//! HTTP client makes goes through here and meets the terminal's [`ProxyAction`] plan, in
//! request order. Requests are forwarded round-robin over the live cloud instances
//! ([`Upstreams`]), which the run updates when it kills and restarts one; a global outage flag
//! makes every proxy drop everything.
//!
//! The proxy speaks just enough HTTP/1.1 for a `reqwest` client: keep-alive, `Content-Length`
//! request bodies, and full responses re-framed with `Content-Length` (bodies pass through
//! untouched, gzip included).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

use crate::fault_schedule::ProxyAction;
use crate::SimError;

/// Largest request head or body the proxy accepts (the API's own limit is 1 MiB).
const MAX_REQUEST_BYTES: usize = 4 * 1024 * 1024;
/// Headers that describe one hop, not the message: never forwarded.
const HOP_HEADERS: [&str; 7] = [
    "connection",
    "keep-alive",
    "transfer-encoding",
    "content-length",
    "host",
    "proxy-connection",
    "upgrade",
];

/// The cloud instances requests may go to, shared by all proxies, plus the outage switch.
#[derive(Debug, Default)]
pub struct Upstreams {
    urls: RwLock<Vec<Option<String>>>,
    next: AtomicUsize,
    outage: AtomicBool,
    /// Sales batches (`POST /v1/pos/sales/events`) being forwarded to each instance right
    /// now, so a cloud kill can be aimed at an instance that is mid-commit.
    sales_in_flight: Vec<AtomicUsize>,
}

impl Upstreams {
    /// One slot per cloud instance, all down until [`Upstreams::set`].
    pub fn new(instances: usize) -> Arc<Upstreams> {
        Arc::new(Upstreams {
            urls: RwLock::new(vec![None; instances]),
            sales_in_flight: (0..instances).map(|_| AtomicUsize::new(0)).collect(),
            ..Default::default()
        })
    }

    /// Marks instance `i` up at `url`, or down with `None`.
    pub fn set(&self, i: usize, url: Option<String>) {
        if let Ok(mut urls) = self.urls.write() {
            if let Some(slot) = urls.get_mut(i) {
                *slot = url;
            }
        }
    }

    /// Starts or ends a full outage (every proxy drops every request).
    pub fn set_outage(&self, on: bool) {
        self.outage.store(on, Ordering::SeqCst);
    }

    fn in_outage(&self) -> bool {
        self.outage.load(Ordering::SeqCst)
    }

    /// Next live instance, round-robin (`None` while every instance is down).
    pub fn pick(&self) -> Option<String> {
        self.pick_indexed().map(|(_, url)| url)
    }

    /// As [`Upstreams::pick`], with the instance's index.
    fn pick_indexed(&self) -> Option<(usize, String)> {
        let urls = self.urls.read().ok()?;
        let live: Vec<(usize, &String)> = urls
            .iter()
            .enumerate()
            .filter_map(|(i, u)| u.as_ref().map(|u| (i, u)))
            .collect();
        if live.is_empty() {
            return None;
        }
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        let (i, url) = live[n % live.len()];
        Some((i, url.clone()))
    }

    /// Sales batches being forwarded to instance `i` at this moment.
    pub fn sales_in_flight(&self, i: usize) -> usize {
        self.sales_in_flight
            .get(i)
            .map(|c| c.load(Ordering::SeqCst))
            .unwrap_or(0)
    }
}

/// What one proxy did, by kind; `requests` counts every request read.
#[derive(Debug, Default)]
pub struct ProxyCounters {
    counts: Mutex<BTreeMap<String, u64>>,
}

impl ProxyCounters {
    fn bump(&self, kind: &str) {
        if let Ok(mut c) = self.counts.lock() {
            *c.entry(kind.to_string()).or_insert(0) += 1;
        }
    }

    /// A copy of the counts.
    pub fn snapshot(&self) -> BTreeMap<String, u64> {
        self.counts.lock().map(|c| c.clone()).unwrap_or_default()
    }
}

struct ProxyState {
    plan: Vec<ProxyAction>,
    next: AtomicUsize,
    faults_on: AtomicBool,
    /// Sales batches still to be answered with a forged `accepted` (harness self-test).
    forge: AtomicUsize,
    upstreams: Arc<Upstreams>,
    counters: Arc<ProxyCounters>,
    client: reqwest::Client,
}

impl ProxyState {
    fn next_action(&self) -> ProxyAction {
        let n = self.next.fetch_add(1, Ordering::SeqCst);
        if !self.faults_on.load(Ordering::SeqCst) {
            return ProxyAction::Pass;
        }
        self.plan.get(n).copied().unwrap_or(ProxyAction::Pass)
    }
}

/// A running proxy. Dropping it stops accepting connections.
pub struct FaultProxy {
    url: String,
    state: Arc<ProxyState>,
    task: JoinHandle<()>,
}

impl FaultProxy {
    /// Binds `127.0.0.1:0` and starts serving with this plan.
    pub async fn start(
        plan: Vec<ProxyAction>,
        upstreams: Arc<Upstreams>,
    ) -> Result<FaultProxy, SimError> {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .map_err(|e| SimError::Io(format!("binding proxy: {e}")))?;
        let addr = listener
            .local_addr()
            .map_err(|e| SimError::Io(format!("proxy address: {e}")))?;
        let client = reqwest::Client::builder()
            .no_gzip()
            .no_proxy()
            .connect_timeout(Duration::from_secs(2))
            .timeout(Duration::from_secs(60))
            .build()
            .map_err(|e| SimError::Io(format!("proxy client: {e}")))?;
        let state = Arc::new(ProxyState {
            plan,
            next: AtomicUsize::new(0),
            faults_on: AtomicBool::new(true),
            forge: AtomicUsize::new(0),
            upstreams,
            counters: Arc::new(ProxyCounters::default()),
            client,
        });
        let accept_state = state.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let st = accept_state.clone();
                tokio::spawn(async move {
                    let _ = stream.set_nodelay(true);
                    serve_connection(stream, st).await;
                });
            }
        });
        Ok(FaultProxy {
            url: format!("http://{addr}"),
            state,
            task,
        })
    }

    /// The URL the terminal is enrolled with.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Harness self-test: answer the next `n` sales batches with a forged 200 that calls every
    /// event `accepted`, without forwarding. The terminal then marks sales synced that the
    /// cloud never saw — exactly the defect the audit exists to catch.
    pub fn forge_sales_acceptance(&self, n: usize) {
        self.state.forge.store(n, Ordering::SeqCst);
    }

    /// Stops injecting faults: from now on every request passes (the quiescence phase).
    pub fn stop_faults(&self) {
        self.state.faults_on.store(false, Ordering::SeqCst);
    }

    /// What this proxy did so far.
    pub fn counters(&self) -> BTreeMap<String, u64> {
        self.state.counters.snapshot()
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// One parsed request.
struct Request {
    method: String,
    target: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

/// One response to write back.
struct Response {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Response {
    fn envelope(status: u16, code: &str, message: &str, extra: Vec<(String, String)>) -> Self {
        let body = serde_json::json!({"error": {"code": code, "message": message,
            "retryable": true, "details": {}}})
        .to_string()
        .into_bytes();
        let mut headers = vec![("content-type".to_string(), "application/json".to_string())];
        headers.extend(extra);
        Response {
            status,
            headers,
            body,
        }
    }

    fn bare(status: u16) -> Self {
        Response {
            status,
            headers: vec![("content-type".into(), "text/plain".into())],
            body: b"bad gateway (simulated)".to_vec(),
        }
    }
}

async fn serve_connection(stream: TcpStream, state: Arc<ProxyState>) {
    let (read, mut write) = stream.into_split();
    let mut reader = BufReader::new(read);
    loop {
        let req = match read_request(&mut reader).await {
            Ok(Some(r)) => r,
            _ => return,
        };
        state.counters.bump("requests");
        if state.upstreams.in_outage() {
            state.counters.bump("outage_drop");
            return; // close: the cloud is unreachable
        }
        if req.method == "POST"
            && req.target.starts_with("/v1/pos/sales/events")
            && state
                .forge
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok()
        {
            state.counters.bump("forged_acceptance");
            if write_response(&mut write, &forged_acceptance(&req.body))
                .await
                .is_err()
            {
                return;
            }
            continue;
        }
        let action = state.next_action();
        if action != ProxyAction::Pass {
            state.counters.bump(action.kind());
        }
        let resp = match action {
            ProxyAction::Pass => forward(&state, &req).await,
            ProxyAction::DropRequest => return,
            ProxyAction::DropResponse => {
                let _ = forward(&state, &req).await;
                return;
            }
            ProxyAction::Delay { ms } => {
                tokio::time::sleep(Duration::from_millis(ms)).await;
                forward(&state, &req).await
            }
            ProxyAction::Duplicate => {
                let (a, _b) = tokio::join!(forward(&state, &req), forward(&state, &req));
                a
            }
            ProxyAction::ServerError { status: 503 } => Response::envelope(
                503,
                "POS_SYNC_STORAGE_FAILED",
                "simulated storage failure",
                vec![],
            ),
            ProxyAction::ServerError { status } => Response::bare(status),
            ProxyAction::RateLimited { retry_after_s } => Response::envelope(
                429,
                "POS_SYNC_RATE_LIMITED",
                "simulated rate limit",
                vec![("retry-after".into(), retry_after_s.to_string())],
            ),
        };
        if write_response(&mut write, &resp).await.is_err() {
            return;
        }
    }
}

/// A 200 that claims every event of the batch was `accepted` (see
/// [`FaultProxy::forge_sales_acceptance`]).
fn forged_acceptance(body: &[u8]) -> Response {
    let ids: Vec<serde_json::Value> = serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v["events"].as_array().cloned())
        .unwrap_or_default()
        .iter()
        .map(|e| e["local_event_id"].clone())
        .collect();
    let results: Vec<serde_json::Value> = ids
        .into_iter()
        .map(|id| {
            serde_json::json!({"local_event_id": id, "status": "accepted", "code": null,
                "cloud_event_id": uuid::Uuid::new_v4(), "message": null})
        })
        .collect();
    Response {
        status: 200,
        headers: vec![("content-type".into(), "application/json".into())],
        body: serde_json::json!({ "results": results })
            .to_string()
            .into_bytes(),
    }
}

/// Sends `req` to a live cloud instance; a cloud that is down answers 502 (like a load
/// balancer with no healthy backend).
async fn forward(state: &ProxyState, req: &Request) -> Response {
    let Some((instance, base)) = state.upstreams.pick_indexed() else {
        state.counters.bump("upstream_down");
        return Response::bare(502);
    };
    let is_sales = req.method == "POST" && req.target.starts_with("/v1/pos/sales/events");
    let _in_flight = is_sales
        .then(|| state.upstreams.sales_in_flight.get(instance))
        .flatten()
        .map(InFlight::enter);
    let Ok(method) = reqwest::Method::from_bytes(req.method.as_bytes()) else {
        return Response::bare(400);
    };
    let mut builder = state
        .client
        .request(method, format!("{base}{}", req.target));
    for (k, v) in &req.headers {
        if !HOP_HEADERS.contains(&k.as_str()) {
            builder = builder.header(k, v);
        }
    }
    let sent = builder.body(req.body.clone()).send().await;
    let resp = match sent {
        Ok(r) => r,
        Err(_) => {
            state.counters.bump("upstream_down");
            return Response::bare(502);
        }
    };
    let status = resp.status().as_u16();
    let headers = resp
        .headers()
        .iter()
        .filter(|(k, _)| !HOP_HEADERS.contains(&k.as_str()))
        .filter_map(|(k, v)| Some((k.as_str().to_string(), v.to_str().ok()?.to_string())))
        .collect();
    match resp.bytes().await {
        Ok(body) => Response {
            status,
            headers,
            body: body.to_vec(),
        },
        Err(_) => {
            state.counters.bump("upstream_down");
            Response::bare(502)
        }
    }
}

/// Counts one forwarded sales batch for as long as it lives.
struct InFlight<'a>(&'a AtomicUsize);

impl<'a> InFlight<'a> {
    fn enter(c: &'a AtomicUsize) -> InFlight<'a> {
        c.fetch_add(1, Ordering::SeqCst);
        InFlight(c)
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

async fn read_request<R: tokio::io::AsyncRead + Unpin>(
    reader: &mut BufReader<R>,
) -> Result<Option<Request>, SimError> {
    let mut line = String::new();
    let mut total = 0usize;
    // Request line (skip stray blank lines between keep-alive requests).
    loop {
        line.clear();
        let n = reader
            .read_line(&mut line)
            .await
            .map_err(|e| SimError::Io(e.to_string()))?;
        if n == 0 {
            return Ok(None);
        }
        total += n;
        if !line.trim().is_empty() {
            break;
        }
    }
    let mut parts = line.split_whitespace();
    let (Some(method), Some(target)) = (parts.next(), parts.next()) else {
        return Err(SimError::Io("malformed request line".into()));
    };
    let (method, target) = (method.to_string(), target.to_string());
    let mut headers = Vec::new();
    let mut content_length = 0usize;
    loop {
        line.clear();
        let n = reader
            .read_line(&mut line)
            .await
            .map_err(|e| SimError::Io(e.to_string()))?;
        total += n;
        if n == 0 || total > MAX_REQUEST_BYTES {
            return Err(SimError::Io("request head cut or too large".into()));
        }
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        if let Some((k, v)) = l.split_once(':') {
            let k = k.trim().to_ascii_lowercase();
            let v = v.trim().to_string();
            if k == "content-length" {
                content_length = v
                    .parse()
                    .map_err(|_| SimError::Io("bad content-length".into()))?;
            }
            if k == "transfer-encoding" {
                return Err(SimError::Io("chunked request bodies unsupported".into()));
            }
            headers.push((k, v));
        }
    }
    if content_length > MAX_REQUEST_BYTES {
        return Err(SimError::Io("request body too large".into()));
    }
    let mut body = vec![0u8; content_length];
    reader
        .read_exact(&mut body)
        .await
        .map_err(|e| SimError::Io(e.to_string()))?;
    Ok(Some(Request {
        method,
        target,
        headers,
        body,
    }))
}

async fn write_response<W: tokio::io::AsyncWrite + Unpin>(
    w: &mut W,
    resp: &Response,
) -> std::io::Result<()> {
    let mut head = format!("HTTP/1.1 {} {}\r\n", resp.status, reason(resp.status));
    for (k, v) in &resp.headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str(&format!("content-length: {}\r\n\r\n", resp.body.len()));
    w.write_all(head.as_bytes()).await?;
    w.write_all(&resp.body).await?;
    w.flush().await
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        410 => "Gone",
        413 => "Payload Too Large",
        429 => "Too Many Requests",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        _ => "Status",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU64;

    /// A tiny upstream that counts requests and echoes the body with the count.
    async fn upstream() -> (String, Arc<AtomicU64>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let hits = Arc::new(AtomicU64::new(0));
        let h = hits.clone();
        tokio::spawn(async move {
            loop {
                let (s, _) = listener.accept().await.expect("accept");
                let h = h.clone();
                tokio::spawn(async move {
                    let (r, mut w) = s.into_split();
                    let mut reader = BufReader::new(r);
                    while let Ok(Some(req)) = read_request(&mut reader).await {
                        let n = h.fetch_add(1, Ordering::SeqCst) + 1;
                        let body = format!("{}:{}", n, String::from_utf8_lossy(&req.body));
                        let resp = Response {
                            status: 200,
                            headers: vec![("x-request-id".into(), "abc".into())],
                            body: body.into_bytes(),
                        };
                        if write_response(&mut w, &resp).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        (format!("http://{addr}"), hits)
    }

    async fn proxy_with(plan: Vec<ProxyAction>) -> (FaultProxy, Arc<AtomicU64>) {
        let (up, hits) = upstream().await;
        let ups = Upstreams::new(1);
        ups.set(0, Some(up));
        (FaultProxy::start(plan, ups).await.expect("proxy"), hits)
    }

    fn client() -> reqwest::Client {
        reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()
            .expect("client")
    }

    #[tokio::test]
    async fn actions_apply_in_request_order() {
        let plan = vec![
            ProxyAction::Pass,
            ProxyAction::DropRequest,
            ProxyAction::DropResponse,
            ProxyAction::Duplicate,
            ProxyAction::RateLimited { retry_after_s: 3 },
            ProxyAction::ServerError { status: 503 },
            ProxyAction::Delay { ms: 5 },
        ];
        let (proxy, hits) = proxy_with(plan).await;
        let c = client();
        let url = format!("{}/v1/pos/sales/events", proxy.url());

        let r = c.post(&url).body("a").send().await.expect("pass");
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["x-request-id"], "abc");
        assert_eq!(r.text().await.expect("body"), "1:a");

        assert!(
            c.post(&url).body("b").send().await.is_err(),
            "dropped request"
        );
        assert_eq!(
            hits.load(Ordering::SeqCst),
            1,
            "dropped request never forwarded"
        );

        assert!(
            c.post(&url).body("c").send().await.is_err(),
            "dropped response"
        );
        assert_eq!(
            hits.load(Ordering::SeqCst),
            2,
            "dropped response was forwarded"
        );

        let r = c.post(&url).body("d").send().await.expect("dup");
        assert_eq!(r.status(), 200);
        assert_eq!(hits.load(Ordering::SeqCst), 4, "duplicate forwarded twice");

        let r = c.post(&url).body("e").send().await.expect("429");
        assert_eq!(r.status(), 429);
        assert_eq!(r.headers()["retry-after"], "3");
        let body: serde_json::Value = r.json().await.expect("envelope");
        assert_eq!(body["error"]["code"], "POS_SYNC_RATE_LIMITED");

        let r = c.post(&url).body("f").send().await.expect("503");
        assert_eq!(r.status(), 503);
        assert_eq!(hits.load(Ordering::SeqCst), 4);

        let r = c.post(&url).body("g").send().await.expect("delay");
        assert_eq!(r.text().await.expect("body"), "5:g");

        let counts = proxy.counters();
        assert_eq!(counts["requests"], 7);
        for k in [
            "drop_request",
            "drop_response",
            "duplicate",
            "http_429",
            "http_5xx",
        ] {
            assert_eq!(counts[k], 1, "{k}");
        }
    }

    #[tokio::test]
    async fn sales_batches_in_flight_are_counted_per_instance() {
        // An upstream that holds every request until told to answer.
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (release_tx, release_rx) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(async move {
            let (s, _) = listener.accept().await.expect("accept");
            let (r, mut w) = s.into_split();
            let mut reader = BufReader::new(r);
            let _ = read_request(&mut reader).await;
            let _ = release_rx.await;
            let resp = Response::bare(200);
            let _ = write_response(&mut w, &resp).await;
        });
        let ups = Upstreams::new(2);
        ups.set(1, Some(format!("http://{addr}")));
        let proxy = FaultProxy::start(vec![], ups.clone()).await.expect("proxy");
        let url = format!("{}/v1/pos/sales/events", proxy.url());
        let req = tokio::spawn(async move { client().post(url).body("{}").send().await });
        for _ in 0..500 {
            if ups.sales_in_flight(1) == 1 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(
            ups.sales_in_flight(1),
            1,
            "the batch is in flight to instance 1"
        );
        assert_eq!(
            ups.sales_in_flight(0),
            0,
            "instance 0 is down, nothing goes there"
        );
        release_tx.send(()).expect("release");
        let resp = req.await.expect("join").expect("response");
        assert_eq!(resp.status(), 200);
        assert_eq!(
            ups.sales_in_flight(1),
            0,
            "done batches are no longer counted"
        );
    }

    #[tokio::test]
    async fn stop_faults_and_outage_and_down_upstream() {
        let (proxy, hits) = proxy_with(vec![ProxyAction::DropRequest; 10]).await;
        let c = client();
        let url = format!("{}/healthz", proxy.url());
        assert!(c.get(&url).send().await.is_err());
        proxy.stop_faults();
        assert_eq!(c.get(&url).send().await.expect("pass").status(), 200);
        assert_eq!(hits.load(Ordering::SeqCst), 1);

        proxy.state.upstreams.set_outage(true);
        assert!(c.get(&url).send().await.is_err(), "outage drops");
        proxy.state.upstreams.set_outage(false);

        proxy.state.upstreams.set(0, None);
        assert_eq!(c.get(&url).send().await.expect("502").status(), 502);
        assert_eq!(proxy.counters()["outage_drop"], 1);
    }
}
