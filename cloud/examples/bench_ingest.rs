//! Ingestion benchmark (run by `scripts/bench-ingest`; prints figures, never fails on speed).
//!
//! 1. Starts `cloud serve` on a fresh PostgreSQL database and has N terminals (default 8, two
//!    per branch) post batches of 100 sales concurrently, each waiting for its answer before
//!    sending the next batch. Reports accepted events/s and p50/p99 request latency.
//! 2. Writes the same rows straight to a second fresh database with the same schema, using plain
//!    multi-row `INSERT … ON CONFLICT DO NOTHING` statements (ledger + sales, one transaction
//!    per batch, same concurrency): the raw limit of this machine's PostgreSQL for this data.
//! 3. Prints the ratio of the two.
//!
//! Flags: `--terminals N` (8), `--batches N` per terminal (80), `--batch-size N` (100),
//! `--terminals-per-branch N` (2).

use std::time::{Duration, Instant};

use diesel::{Connection, PgConnection, RunQueryDsl};
use possync_cloud::db::Database;
use possync_protocol::SaleEvent;
use possync_testkit::cloud::CloudProcess;
use possync_testkit::pg::TestDatabase;
use possync_testkit::{events_body, sample_sale_event};
use uuid::Uuid;

struct Options {
    terminals: usize,
    batches: usize,
    batch_size: usize,
    per_branch: usize,
}

fn options() -> anyhow::Result<Options> {
    let mut o = Options {
        terminals: 8,
        batches: 80,
        batch_size: 100,
        per_branch: 2,
    };
    let args: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    while i < args.len() {
        let value = args
            .get(i + 1)
            .ok_or_else(|| anyhow::anyhow!("{} needs a value", args[i]))?
            .parse::<usize>()?;
        match args[i].as_str() {
            "--terminals" => o.terminals = value.max(1),
            "--batches" => o.batches = value.max(1),
            "--batch-size" => o.batch_size = value.clamp(1, 500),
            "--terminals-per-branch" => o.per_branch = value.max(1),
            other => anyhow::bail!("unknown flag {other}"),
        }
        i += 2;
    }
    Ok(o)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

/// One terminal's workload: its token and its batches of events (the same rows feed the HTTP
/// run as JSON bodies and the raw run as SQL).
struct Workload {
    token: String,
    events: Vec<Vec<SaleEvent>>,
}

fn sql_text(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

/// The raw-limit statements for one batch: ledger rows then sales rows, multi-row, idempotent.
fn raw_batch_sql(batch: &[SaleEvent]) -> (String, String) {
    let now = "now()";
    let mut ledger = String::from(
        "INSERT INTO idempotency_ledger (terminal_id, pos_id, local_event_id, payload_hash, \
         cloud_event_id, branch_id, first_seen_at) VALUES ",
    );
    let mut sales = String::from(
        "INSERT INTO sales_events (cloud_event_id, terminal_id, pos_id, local_event_id, branch_id, \
         event_type, occurred_at, received_at, payload, payload_hash, receipt_no, total_minor, \
         currency) VALUES ",
    );
    for (i, e) in batch.iter().enumerate() {
        if i > 0 {
            ledger.push(',');
            sales.push(',');
        }
        let id = Uuid::now_v7().to_string();
        let hash = e.payload_hash();
        let payload = serde_json::to_string(&e.payload).unwrap_or_default();
        ledger.push_str(&format!(
            "({},{},{},{},{},{},{now})",
            sql_text(&e.terminal_id.to_string()),
            sql_text(&e.pos_id.to_string()),
            e.local_event_id,
            sql_text(&hash),
            sql_text(&id),
            sql_text(&e.branch_id),
        ));
        sales.push_str(&format!(
            "({},{},{},{},{},{},{},{now},{},{},{},{},{})",
            sql_text(&id),
            sql_text(&e.terminal_id.to_string()),
            sql_text(&e.pos_id.to_string()),
            e.local_event_id,
            sql_text(&e.branch_id),
            sql_text(e.event_type.as_str()),
            sql_text(&e.occurred_at.naive_utc().to_string()),
            sql_text(&payload),
            sql_text(&hash),
            sql_text(&e.payload.receipt_no),
            e.payload.totals.total_minor,
            sql_text(&e.payload.currency),
        ));
    }
    ledger.push_str(" ON CONFLICT DO NOTHING");
    sales.push_str(" ON CONFLICT DO NOTHING");
    (ledger, sales)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let o = options()?;
    let total_events = o.terminals * o.batches * o.batch_size;
    println!(
        "bench-ingest: {} terminals ({} per branch), {} batches of {} each = {} events",
        o.terminals, o.per_branch, o.batches, o.batch_size, total_events
    );

    // --- 1. through cloud serve -------------------------------------------------------------
    let db = TestDatabase::create()?;
    let cloud = CloudProcess::start_with(
        Some(&db.url),
        &[
            "--rate-per-second",
            "1000000",
            "--rate-burst",
            "1000000",
            "--address-rate-per-second",
            "1000000",
            "--address-rate-burst",
            "1000000",
            "--pool-size",
            "8",
            "--branch-queue-limit",
            "100000",
        ],
    )?;
    let mut workloads = Vec::new();
    for t in 0..o.terminals {
        let branch = format!("bench-{}", t / o.per_branch);
        let (terminal_id, token) = cloud.add_terminal(&branch)?;
        let pos = Uuid::now_v7();
        let events = (0..o.batches)
            .map(|b| {
                (0..o.batch_size)
                    .map(|i| {
                        let id = (b * o.batch_size + i + 1) as i64;
                        sample_sale_event(terminal_id, pos, id, &branch)
                    })
                    .collect()
            })
            .collect();
        workloads.push(Workload { token, events });
    }
    let bodies: Vec<(String, Vec<Vec<u8>>)> = workloads
        .iter()
        .map(|w| {
            let b = w
                .events
                .iter()
                .map(|batch| serde_json::to_vec(&events_body(batch)).unwrap_or_default())
                .collect();
            (w.token.clone(), b)
        })
        .collect();

    // Warm up connections and branch actors with an empty batch per terminal.
    let url = cloud.url("/v1/pos/sales/events");
    for (token, _) in &bodies {
        reqwest::Client::new()
            .post(&url)
            .bearer_auth(token)
            .json(&serde_json::json!({"events": []}))
            .send()
            .await?
            .error_for_status()?;
    }

    let started = Instant::now();
    let mut tasks = Vec::new();
    for (token, batches) in bodies {
        let url = url.clone();
        tasks.push(tokio::spawn(async move {
            let client = reqwest::Client::new();
            let mut latencies = Vec::with_capacity(batches.len());
            let mut accepted = 0usize;
            let mut failed = 0usize;
            for body in batches {
                let t0 = Instant::now();
                let r = client
                    .post(&url)
                    .bearer_auth(&token)
                    .header("content-type", "application/json")
                    .body(body)
                    .send()
                    .await;
                match r {
                    Ok(r) if r.status().is_success() => {
                        let v: serde_json::Value = r.json().await.unwrap_or_default();
                        latencies.push(t0.elapsed());
                        accepted += v["results"]
                            .as_array()
                            .map(|a| a.iter().filter(|x| x["status"] == "accepted").count())
                            .unwrap_or(0);
                    }
                    _ => failed += 1,
                }
            }
            (latencies, accepted, failed)
        }));
    }
    let mut latencies = Vec::new();
    let mut accepted = 0;
    let mut failed = 0;
    for t in tasks {
        let (l, a, f) = t.await?;
        latencies.extend(l);
        accepted += a;
        failed += f;
    }
    let http_elapsed = started.elapsed();
    latencies.sort();
    let http_rate = accepted as f64 / http_elapsed.as_secs_f64();
    drop(cloud);

    // --- 2. raw limit: the same rows straight into PostgreSQL ------------------------------
    let raw_db = TestDatabase::create()?;
    {
        let url = raw_db.url.clone();
        tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
            let d = Database::connect(&url, 1)?;
            d.run_migrations()?;
            Ok(())
        })
        .await??;
    }
    let statements: Vec<Vec<(String, String)>> = workloads
        .iter()
        .map(|w| w.events.iter().map(|b| raw_batch_sql(b)).collect())
        .collect();
    let raw_started = Instant::now();
    let mut raw_tasks = Vec::new();
    for stmts in statements {
        let url = raw_db.url.clone();
        raw_tasks.push(tokio::task::spawn_blocking(
            move || -> anyhow::Result<usize> {
                let mut c = PgConnection::establish(&url)?;
                let mut n = 0;
                for (ledger, sales) in stmts {
                    n += c.transaction::<usize, diesel::result::Error, _>(|c| {
                        let n = diesel::sql_query(ledger).execute(c)?;
                        diesel::sql_query(sales).execute(c)?;
                        Ok(n)
                    })?;
                }
                Ok(n)
            },
        ));
    }
    let mut raw_rows = 0;
    for t in raw_tasks {
        raw_rows += t.await??;
    }
    let raw_elapsed = raw_started.elapsed();
    let raw_rate = raw_rows as f64 / raw_elapsed.as_secs_f64();

    println!(
        "cloud serve (PostgreSQL): accepted {accepted}/{total_events} events in {:.2} s = {:.0} events/s; \
         request latency p50 {:.1} ms, p99 {:.1} ms; failed requests {failed}",
        http_elapsed.as_secs_f64(),
        http_rate,
        percentile(&latencies, 0.50).as_secs_f64() * 1000.0,
        percentile(&latencies, 0.99).as_secs_f64() * 1000.0,
    );
    println!(
        "raw INSERT … ON CONFLICT DO NOTHING: {raw_rows} rows in {:.2} s = {:.0} events/s",
        raw_elapsed.as_secs_f64(),
        raw_rate
    );
    println!(
        "ratio cloud/raw: {:.2} (targets: >= 10000 events/s and >= 0.5 of raw)",
        if raw_rate > 0.0 {
            http_rate / raw_rate
        } else {
            0.0
        }
    );
    Ok(())
}
