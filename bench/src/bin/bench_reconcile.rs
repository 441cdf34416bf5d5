//! `bench-reconcile` (run by `scripts/bench-reconcile`): what a catalog verify costs, the
//! O(changed) fingerprint verify beside the full-manifest verify, measured in the same run on
//! the same terminal database.
//!
//! A real `cloud serve` (fresh PostgreSQL database, or embedded SQLite) is seeded with N
//! products; a real `terminal run` takes its snapshot. Then, with 0 and with D entities drifted
//! (edited in the terminal's SQLite file behind the store's back):
//! - **fingerprints**: the daemon's own `POST /reconcile {"mode": "verify"}`, whose report
//!   carries its round trips and the HTTP body bytes as they crossed the wire;
//! - **manifest**: the original protocol, done here with the terminal's own store: the whole
//!   manifest (hash recomputed from each row's data) range by range, 2 000 entries per range,
//!   to `POST /v1/pos/catalog/reconcile`; request and response bodies counted (requests are not
//!   compressed; responses are asked for uncompressed, they are a few hundred bytes).
//!
//! Prints figures and the goal (≤ 1 % of the manifest's bytes with D drifted, a few round
//! trips, under a second); never fails on speed, only when something does not work.

use anyhow::{bail, Context};
use clap::{Parser, ValueEnum};
use possync_actors::LocalStore;
use possync_bench::{catalog, daemon};
use possync_protocol::{ReconcileMode, ReconcileRequest, ReconcileResponse};
use possync_testkit::pg::TestDatabase;
use std::path::Path;
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum CloudDb {
    Postgres,
    Sqlite,
}

#[derive(Debug, Parser)]
#[command(
    name = "bench-reconcile",
    about = "Verify cost: fingerprints vs full manifest"
)]
struct Options {
    /// Products in the catalog.
    #[arg(long, default_value_t = 100_000)]
    entities: usize,
    /// Entities drifted for the second measurement.
    #[arg(long, default_value_t = 10)]
    drift: usize,
    #[arg(long, value_enum, default_value_t = CloudDb::Postgres)]
    cloud_db: CloudDb,
    /// Where the terminal's data goes (default: the temp dir).
    #[arg(long)]
    work_dir: Option<std::path::PathBuf>,
}

/// What one verify cost.
#[derive(Debug, Clone, Copy, Default)]
struct Cost {
    round_trips: u64,
    bytes_sent: u64,
    bytes_received: u64,
    wall: Duration,
    upserts: i64,
    deletes: i64,
}

impl Cost {
    fn bytes(&self) -> u64 {
        self.bytes_sent + self.bytes_received
    }
}

fn main() {
    let opts = Options::parse();
    if let Err(e) = run(&opts) {
        eprintln!("bench-reconcile: {e:#}");
        std::process::exit(1);
    }
}

fn run(opts: &Options) -> anyhow::Result<()> {
    if opts.entities == 0 || opts.drift > opts.entities {
        bail!("--entities must be > 0 and --drift at most --entities");
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let root = opts.work_dir.clone().unwrap_or_else(std::env::temp_dir);
    std::fs::create_dir_all(&root)?;
    let work = tempfile::Builder::new()
        .prefix("bench-reconcile-")
        .tempdir_in(&root)?;
    println!(
        "bench-reconcile — {}; cloud db {:?}; {} entities; {} drifted",
        chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        opts.cloud_db,
        opts.entities,
        opts.drift
    );
    let pg = match opts.cloud_db {
        CloudDb::Postgres => Some(TestDatabase::create()?),
        CloudDb::Sqlite => None,
    };
    let (mut cloud, _) = catalog::seeded_cloud(
        pg.as_ref().map(|d| d.url.as_str()),
        work.path(),
        opts.entities,
    )?;
    let (terminal_id, token) = cloud.add_terminal("b1")?;
    let data_dir = work.path().join("terminal");
    std::fs::create_dir_all(&data_dir)?;
    daemon::enroll(&data_dir, &cloud.base_url, terminal_id, &token, "b1")?;
    let till = daemon::Daemon::start(&data_dir)?;
    let http = reqwest::Client::builder().no_gzip().build()?;
    rt.block_on(wait_offline_ready(&http, &till.url, opts.entities))?;
    println!("terminal offline-ready with {} entities", opts.entities);

    let db = data_dir.join("terminal.db");
    let store = possync_terminal::store::SqliteStore::open(&db)?;
    let mut rows = Vec::new();
    for drifted in [0, opts.drift] {
        if drifted > 0 {
            drift(&db, drifted)?;
        }
        let fp = rt.block_on(fingerprint_verify(&http, &till))?;
        let manifest = rt.block_on(manifest_verify(&http, &cloud.base_url, &token, &store))?;
        if fp.upserts != manifest.upserts || fp.deletes != manifest.deletes {
            bail!("the two verifies disagree: fingerprints {fp:?}, manifest {manifest:?}");
        }
        if fp.upserts != drifted as i64 {
            bail!("{drifted} drifted but verify found {} upserts", fp.upserts);
        }
        rows.push((drifted, fp, manifest));
    }
    drop(store);
    cloud.terminate()?;

    println!();
    println!(
        "| drifted | method | round trips | bytes sent | bytes received | bytes total | of manifest | wall |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for (drifted, fp, manifest) in &rows {
        for (name, c) in [("fingerprints", fp), ("full manifest", manifest)] {
            println!(
                "| {drifted} | {name} | {} | {} | {} | {} | {:.3} % | {} ms |",
                c.round_trips,
                c.bytes_sent,
                c.bytes_received,
                c.bytes(),
                c.bytes() as f64 * 100.0 / manifest.bytes().max(1) as f64,
                c.wall.as_millis()
            );
        }
    }
    if let Some((_, fp, manifest)) = rows.last() {
        let share = fp.bytes() as f64 * 100.0 / manifest.bytes().max(1) as f64;
        println!();
        println!(
            "goal with {} drifted: bytes ≤ 1 % of the manifest's → {:.3} % ({}); a few round trips → {}; under a second → {} ms ({})",
            opts.drift,
            share,
            if share <= 1.0 { "met" } else { "MISSED" },
            fp.round_trips,
            fp.wall.as_millis(),
            if fp.wall < Duration::from_secs(1) { "met" } else { "MISSED" }
        );
    }
    Ok(())
}

async fn wait_offline_ready(
    http: &reqwest::Client,
    url: &str,
    entities: usize,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let s: serde_json::Value = http
            .get(format!("{url}/status"))
            .send()
            .await?
            .json()
            .await?;
        if s["catalog"]["entities"].as_u64() == Some(entities as u64)
            && s["catalog"]["snapshot"]["in_progress"] == false
        {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("terminal not offline-ready after 10 minutes: {s}");
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// Edits `n` rows behind the store's back (their data no longer hashes to what the cloud has).
fn drift(db: &Path, n: usize) -> anyhow::Result<()> {
    let conn = rusqlite::Connection::open(db)?;
    conn.busy_timeout(Duration::from_secs(5))?;
    let changed = conn.execute(
        "UPDATE catalog_entities SET data = json_set(data, '$.name', 'drifted')
         WHERE rowid IN (SELECT rowid FROM catalog_entities WHERE deleted = 0
                         ORDER BY entity_id LIMIT ?1)",
        [n as i64],
    )?;
    if changed != n {
        bail!("drifted {changed} rows, wanted {n}");
    }
    Ok(())
}

/// The daemon's own verify (fingerprints first).
async fn fingerprint_verify(http: &reqwest::Client, till: &daemon::Daemon) -> anyhow::Result<Cost> {
    let started = Instant::now();
    let resp = http
        .post(format!("{}/reconcile", till.url))
        .bearer_auth(&till.token)
        .json(&serde_json::json!({"mode": "verify"}))
        .send()
        .await?;
    let status = resp.status();
    let report: serde_json::Value = resp.json().await?;
    let wall = started.elapsed();
    if !status.is_success() {
        bail!("daemon verify answered {status}: {report}");
    }
    if report["method"] != "fingerprints" {
        bail!("the daemon did not verify by fingerprints: {report}");
    }
    let n = |k: &str| {
        report[k]
            .as_u64()
            .context(format!("report lacks {k}: {report}"))
    };
    Ok(Cost {
        round_trips: n("round_trips")?,
        bytes_sent: n("bytes_sent")?,
        bytes_received: n("bytes_received")?,
        wall,
        upserts: report["upserts"].as_i64().unwrap_or(-1),
        deletes: report["deletes"].as_i64().unwrap_or(-1),
    })
}

/// The full-manifest verify as the Reconciler did it before fingerprints (and still does with
/// an old cloud): every range of 2 000 entries from the terminal's own store.
async fn manifest_verify(
    http: &reqwest::Client,
    cloud_url: &str,
    token: &str,
    store: &possync_terminal::store::SqliteStore,
) -> anyhow::Result<Cost> {
    const RANGE: usize = 2000;
    let started = Instant::now();
    let mut cost = Cost::default();
    let mut after: Option<String> = None;
    loop {
        let fetched = store.manifest_after(after.as_deref(), RANGE + 1)?;
        let (range, entries, last) =
            possync_actors::reconcile::cut_range(after.clone(), fetched, RANGE);
        let body = serde_json::to_vec(&ReconcileRequest {
            mode: ReconcileMode::Verify,
            range: range.clone(),
            entries,
        })?;
        cost.bytes_sent += body.len() as u64;
        let resp = http
            .post(format!("{cloud_url}/v1/pos/catalog/reconcile"))
            .bearer_auth(token)
            .header("content-type", "application/json")
            .body(body)
            .send()
            .await?;
        let status = resp.status();
        let bytes = resp.bytes().await?;
        cost.round_trips += 1;
        cost.bytes_received += bytes.len() as u64;
        if !status.is_success() {
            bail!(
                "manifest reconcile answered {status}: {}",
                String::from_utf8_lossy(&bytes)
            );
        }
        let answer: ReconcileResponse = serde_json::from_slice(&bytes)?;
        cost.upserts += answer.summary.upserts;
        cost.deletes += answer.summary.deletes;
        if last {
            break;
        }
        after = range.through;
    }
    cost.wall = started.elapsed();
    Ok(cost)
}
