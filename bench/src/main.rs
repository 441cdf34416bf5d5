//! `bench-terminal` (run by `scripts/bench-terminal`): the terminal's three performance
//! promises measured in one run on this machine, each beside the raw limit measured in the
//! same run. It prints figures and never fails on speed; it fails only when something does
//! not work (PostgreSQL unreachable, a binary missing, a request refused).
//!
//! 1. **Snapshot**: a real `cloud serve` (fresh PostgreSQL database, or embedded SQLite) is
//!    seeded with N products by `cloud catalog import`; an empty, enrolled terminal runs
//!    `terminal run`, and the clock runs from spawning it until the catalog is complete: the
//!    daemon's own completion stamp (`catalog.last_synced_at`, written by the snapshot's last
//!    page), confirmed by `/status` showing the snapshot's version with all N entities (polled
//!    every 250 ms; each poll counts the catalog, so polling faster would slow what it
//!    measures). Beside it two floors, each raw insert + transfer: the raw insert (the same rows
//!    bulk-inserted into an empty file with the terminal's schema in one transaction), and the
//!    transfer of every snapshot page over HTTP by the same terminal token, nothing stored —
//!    once plain (`identity`: the true floor, no avoidable work in it) and once in the encoding
//!    the terminal asks for (`zstd` by default: what its transfer costs). Wire bytes are
//!    printed per encoding (identity, zstd, gzip). The transfers are measured from the cloud's
//!    snapshot page cache, as the terminal's pages were served (the first pass, which filled
//!    it, is printed as the cold transfer).
//! 2. **Sale enqueue**: `POST /sales` on the daemon and `SqliteStore::enqueue_sale` in-process,
//!    beside a plain `INSERT` committed with `synchronous=FULL` in WAL (one transaction each)
//!    into a scratch file in the same directory; the three series are interleaved sale by sale so
//!    disk noise from other work on the machine falls on all of them alike. Measured with the
//!    cloud up (the outbox delivers as the till sells) and again with the cloud stopped.
//! 3. **Memory**: the daemon's peak RSS (`VmHWM`) after holding the catalog and the sales.
//!
//! The cloud runs with its rate limits raised so the snapshot measures sync, not the limiter
//! (at the default 20 requests/s, 100 pages alone take ≥ 3 s).

use possync_bench::{catalog, daemon, enqueue, stats};

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use clap::{Parser, ValueEnum};
use possync_protocol::SalePayload;
use possync_terminal::store::SqliteStore;
use possync_testkit::pg::TestDatabase;

use stats::{ms, ratio, summarize, Summary};

/// Targets from the terminal issue: printed beside the figures, never enforced.
const SNAPSHOT_TARGET_RATIO: f64 = 2.0;
const SNAPSHOT_GOAL_RATIO: f64 = 1.3;
const ENQUEUE_TARGET_RATIO: f64 = 2.0;
const RSS_TARGET_MIB: f64 = 32.0;
/// How often `/status` is polled (each call counts the catalog, so polling often would slow
/// the snapshot it measures; the figure comes from the daemon's own completion stamp).
const STATUS_POLL: Duration = Duration::from_millis(250);
/// Give up on the snapshot after this long (a broken build, not a slow one).
const SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(900);
/// Give up waiting for the outbox to deliver the sales after this long.
const OUTBOX_DRAIN_TIMEOUT: Duration = Duration::from_secs(300);

/// Which database the cloud runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum CloudDb {
    /// A fresh PostgreSQL database on 127.0.0.1:5432 (or `POSSYNC_TEST_PG_URL`).
    Postgres,
    /// The cloud's embedded SQLite.
    Sqlite,
}

/// Terminal benchmark: snapshot to offline-ready, sale-enqueue latency, daemon memory.
#[derive(Debug, Parser)]
#[command(name = "bench-terminal")]
struct Options {
    /// Catalog entities seeded into the cloud.
    #[arg(long, default_value_t = 100_000)]
    entities: usize,
    /// Sales per enqueue series and cloud state (cloud up, cloud stopped).
    #[arg(long, default_value_t = 2000)]
    sales: usize,
    /// The cloud's database.
    #[arg(long, value_enum, default_value_t = CloudDb::Postgres)]
    cloud_db: CloudDb,
    /// Content encoding the terminal asks for (`terminal run --catalog-encoding`).
    #[arg(long, default_value = "zstd")]
    catalog_encoding: String,
    /// Directory under which the terminal's data dir and the scratch files are created (a
    /// fresh temporary directory inside it, removed afterwards).
    #[arg(long)]
    work_dir: Option<PathBuf>,
}

fn main() {
    let opts = Options::parse();
    if let Err(e) = run(&opts) {
        eprintln!("bench-terminal failed: {e:#}");
        std::process::exit(1);
    }
}

/// Everything measured, for the report.
struct Figures {
    import: Duration,
    readiness: Readiness,
    daemon_started: Duration,
    /// The first pass (identity): the cloud read every page from its database.
    cold_transfer: catalog::TransferPass,
    /// Passes after the snapshot, every encoding twice (pages served from the cloud's cache,
    /// as they were to the terminal).
    transfer_passes: Vec<catalog::TransferPass>,
    raw_insert: Duration,
    online: EnqueueFigures,
    offline: EnqueueFigures,
    after_snapshot: daemon::Memory,
    at_end: daemon::Memory,
    /// The daemon's outbox counts after selling offline (how many sales it already tried).
    offline_outbox: serde_json::Value,
}

struct EnqueueFigures {
    raw: Summary,
    store: Summary,
    daemon: Summary,
    /// The daemon's committed enqueue, by its `Server-Timing`.
    daemon_store: Summary,
    /// The daemon's handler (body read → answer) minus its enqueue: parsing, validation, the
    /// hand-off to the blocking pool and back.
    daemon_handler_rest: Summary,
    /// The request minus the daemon's handler: the client, loopback TCP and actix's HTTP.
    outside_handler: Summary,
    /// The same POST with an event type there is not (422 after the payload is parsed,
    /// nothing stored): the HTTP round trip's own floor.
    http_floor: Summary,
    /// Sales the daemon records as held by the cloud at the end of the series (cloud up only).
    delivered: i64,
}

fn run(opts: &Options) -> anyhow::Result<()> {
    if opts.entities == 0 || opts.sales == 0 {
        bail!("--entities and --sales must be > 0");
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let work_root = opts.work_dir.clone().unwrap_or_else(std::env::temp_dir);
    std::fs::create_dir_all(&work_root)?;
    let work = tempfile::Builder::new()
        .prefix("bench-terminal-")
        .tempdir_in(&work_root)
        .context("creating the work dir")?;
    let started_at = chrono::Utc::now();
    println!(
        "bench-terminal — {}",
        started_at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
    );
    println!("machine: {}", machine_line());
    println!(
        "cloud db: {:?}; entities: {}; sales per series: {}; work dir: {}",
        opts.cloud_db,
        opts.entities,
        opts.sales,
        work.path().display()
    );

    // --- cloud, seeded --------------------------------------------------------------------
    let pg = match opts.cloud_db {
        CloudDb::Postgres => Some(TestDatabase::create()?),
        CloudDb::Sqlite => None,
    };
    let (mut cloud, import) = catalog::seeded_cloud(
        pg.as_ref().map(|d| d.url.as_str()),
        work.path(),
        opts.entities,
    )?;
    println!(
        "seeded: {} entities by `cloud catalog import` in {}",
        opts.entities,
        ms(import)
    );
    let branch = "b1";
    let (terminal_id, token) = cloud.add_terminal(branch)?;
    let client = reqwest::Client::builder().build()?;
    let wire = catalog::wire_client()?;

    // --- baselines: transfer (also warms the cloud's page cache) and raw insert ---------------
    let first = rt.block_on(catalog::fetch_all_pages(
        &wire,
        &cloud.base_url,
        &token,
        catalog::WireEncoding::Identity,
        true,
    ))?;
    if first.entities != opts.entities {
        bail!(
            "snapshot listed {} entities, expected {}",
            first.entities,
            opts.entities
        );
    }
    let snapshot_version = first.snapshot_version;
    let rows = catalog::raw_rows(&first.kept)?;
    let raw_insert = catalog::raw_insert(&work.path().join("raw-catalog.db"), &rows)?;
    drop(rows);
    let cold_transfer = catalog::TransferPass {
        kept: Vec::new(),
        ..first
    };
    // Every encoding once before the terminal runs, so the cloud holds each page's gzip form
    // too and no pass pays for deriving it.
    for encoding in catalog::WireEncoding::ALL {
        rt.block_on(catalog::fetch_all_pages(
            &wire,
            &cloud.base_url,
            &token,
            encoding,
            false,
        ))?;
    }

    // --- the terminal: empty, enrolled, then `terminal run` until offline-ready --------------
    let data_dir = work.path().join("terminal");
    std::fs::create_dir_all(&data_dir)?;
    daemon::enroll(&data_dir, &cloud.base_url, terminal_id, &token, branch)?;
    let spawned_at = chrono::Utc::now();
    let t0 = Instant::now();
    let terminal = daemon::Daemon::start_with(
        &data_dir,
        &["--catalog-encoding", opts.catalog_encoding.as_str()],
    )?;
    let daemon_started = t0.elapsed();
    let readiness = rt.block_on(wait_offline_ready(
        &client,
        &terminal.url,
        snapshot_version,
        opts.entities,
        (t0, spawned_at),
    ))?;
    let after_snapshot = terminal.memory()?;
    let mut transfer_passes = Vec::new();
    for _ in 0..2 {
        for encoding in catalog::WireEncoding::ALL {
            transfer_passes.push(rt.block_on(catalog::fetch_all_pages(
                &wire,
                &cloud.base_url,
                &token,
                encoding,
                false,
            ))?);
        }
    }

    // --- sale enqueue, cloud up then cloud stopped ---------------------------------------------
    let till = TillUnderTest {
        rt: &rt,
        client: &client,
        status_url: &terminal.url,
        token: &terminal.token,
        dir: &data_dir,
    };
    let online = enqueue_series(&till, "online", 1, opts.sales, true)?;
    cloud.kill()?;
    let offline = enqueue_series(&till, "offline", 1 + opts.sales as i64, opts.sales, false)?;
    let offline_outbox = rt.block_on(async {
        let v: serde_json::Value = client
            .get(format!("{}/status", terminal.url))
            .send()
            .await?
            .json()
            .await?;
        anyhow::Ok(v["outbox"].clone())
    })?;
    let at_end = terminal.memory()?;
    drop(terminal);

    report(
        opts,
        &Figures {
            import,
            readiness,
            daemon_started,
            cold_transfer,
            transfer_passes,
            raw_insert,
            online,
            offline,
            after_snapshot,
            at_end,
            offline_outbox,
        },
    );
    Ok(())
}

/// What waiting for offline-ready saw.
struct Readiness {
    /// When the poll first saw the catalog complete (up to one poll interval late).
    observed: Duration,
    /// The daemon's own completion stamp (`catalog.last_synced_at`, written in the snapshot's
    /// last page transaction) minus the wall time `terminal run` was spawned at.
    stamped: Option<Duration>,
    /// `/status` calls made while waiting, and their latencies (each one counts the catalog,
    /// so they compete with the snapshot for the store: this says by how much).
    polls: Summary,
}

impl Readiness {
    /// The figure to report: the daemon's stamp when it is consistent with the observation
    /// (not after it), else the observation.
    fn snapshot(&self) -> Duration {
        match self.stamped {
            Some(s) if s <= self.observed => s,
            _ => self.observed,
        }
    }
}

/// Polls `/status` until the catalog is complete at `version` with `entities` rows.
async fn wait_offline_ready(
    client: &reqwest::Client,
    status_url: &str,
    version: i64,
    entities: usize,
    since: (Instant, chrono::DateTime<chrono::Utc>),
) -> anyhow::Result<Readiness> {
    let mut last = serde_json::Value::Null;
    let mut polls = Vec::new();
    while since.0.elapsed() < SNAPSHOT_TIMEOUT {
        let t0 = Instant::now();
        if let Ok(resp) = client.get(format!("{status_url}/status")).send().await {
            if let Ok(v) = resp.json::<serde_json::Value>().await {
                polls.push(t0.elapsed());
                let c = &v["catalog"];
                let ready = c["version"].as_i64().is_some_and(|have| have >= version)
                    && c["entities"].as_u64() == Some(entities as u64)
                    && c["snapshot"]["in_progress"] != true;
                if ready {
                    let observed = since.0.elapsed();
                    let stamped = c["last_synced_at"]
                        .as_str()
                        .and_then(|t| t.parse::<chrono::DateTime<chrono::Utc>>().ok())
                        .and_then(|t| (t - since.1).to_std().ok());
                    return Ok(Readiness {
                        observed,
                        stamped,
                        polls: summarize(polls),
                    });
                }
                last = v;
            }
        }
        tokio::time::sleep(STATUS_POLL).await;
    }
    bail!("the terminal was not offline-ready after {SNAPSHOT_TIMEOUT:?}; last status: {last}")
}

/// Polls `/status` until the outbox holds nothing undelivered; returns how many sales the
/// daemon records as held by the cloud.
async fn wait_outbox_drained(client: &reqwest::Client, status_url: &str) -> anyhow::Result<i64> {
    let since = Instant::now();
    let mut last = serde_json::Value::Null;
    while since.elapsed() < OUTBOX_DRAIN_TIMEOUT {
        if let Ok(resp) = client.get(format!("{status_url}/status")).send().await {
            if let Ok(v) = resp.json::<serde_json::Value>().await {
                if v["outbox"]["queued"].as_i64() == Some(0) {
                    return Ok(v["outbox"]["synced"].as_i64().unwrap_or(0));
                }
                last = v;
            }
        }
        tokio::time::sleep(STATUS_POLL).await;
    }
    bail!("the outbox did not drain in {OUTBOX_DRAIN_TIMEOUT:?}; last status: {last}")
}

/// Where the enqueue series run: the daemon's endpoint and its data directory.
#[derive(Clone, Copy)]
struct TillUnderTest<'a> {
    rt: &'a tokio::runtime::Runtime,
    client: &'a reqwest::Client,
    status_url: &'a str,
    token: &'a str,
    dir: &'a Path,
}

/// The three enqueue series interleaved sale by sale (raw insert, in-process enqueue, daemon
/// POST, then the next sale), each writing into the same directory, so whatever else the
/// disk is doing at a moment falls on all three alike. With the cloud up (`drain`), the
/// daemon's outbox delivers while the series run; at the end the benchmark waits (untimed)
/// for it to finish and reports how many sales the cloud holds.
fn enqueue_series(
    till: &TillUnderTest<'_>,
    label: &str,
    first_sale: i64,
    n: usize,
    drain: bool,
) -> anyhow::Result<EnqueueFigures> {
    let TillUnderTest {
        rt,
        client,
        status_url,
        token,
        dir,
    } = *till;
    let raw_table = enqueue::RawFsyncTable::open(&dir.join(format!("scratch-fsync-{label}.db")))?;
    let store = SqliteStore::open(&dir.join(format!("scratch-store-{label}.db")))?;
    let payloads: Vec<(SalePayload, String)> = (first_sale..first_sale + n as i64)
        .map(|i| {
            let p = enqueue::sample_payload(i);
            serde_json::to_string(&p).map(|json| (p, json))
        })
        .collect::<Result<_, _>>()?;
    let (mut raw, mut local, mut posted, mut http) = (
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
    );
    for (payload, json) in &payloads {
        raw.push(raw_table.insert(json)?);
        local.push(enqueue::store_enqueue(&store, payload)?);
        http.push(rt.block_on(enqueue::daemon_round_trip(
            client, status_url, token, payload,
        ))?);
        posted.push(rt.block_on(enqueue::daemon_post_sale(
            client, status_url, token, payload,
        ))?);
    }
    let series =
        |f: fn(&enqueue::PostedSale) -> Duration| summarize(posted.iter().map(f).collect());
    if raw_table.count()? < n as i64 {
        bail!("the raw table lost rows");
    }
    let delivered = if drain {
        rt.block_on(wait_outbox_drained(client, status_url))?
    } else {
        0
    };
    Ok(EnqueueFigures {
        raw: summarize(raw),
        store: summarize(local),
        daemon: series(|p| p.total),
        daemon_store: series(|p| p.store),
        daemon_handler_rest: series(|p| p.handler.saturating_sub(p.store)),
        outside_handler: series(|p| p.total.saturating_sub(p.handler)),
        http_floor: summarize(http),
        delivered,
    })
}

/// One line per latency series: p50, p99, mean, max.
fn print_series(rows: &[(&str, &Summary)]) {
    for (name, s) in rows {
        println!(
            "{name:<46} p50 {}  p99 {}  mean {}  max {}",
            ms(s.p50),
            ms(s.p99),
            ms(s.mean),
            ms(s.max)
        );
    }
}

fn machine_line() -> String {
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines().find_map(|l| {
                l.strip_prefix("model name")
                    .map(|r| r.trim_start_matches([' ', '\t', ':']).to_string())
            })
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|t| {
            t.lines().find_map(|l| {
                l.strip_prefix("MemTotal:")?
                    .trim()
                    .strip_suffix("kB")?
                    .trim()
                    .parse::<u64>()
                    .ok()
            })
        })
        .map_or_else(
            || "? GiB".into(),
            |kib| format!("{:.1} GiB", kib as f64 / 1048576.0),
        );
    let load = std::fs::read_to_string("/proc/loadavg")
        .ok()
        .map(|t| t.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default();
    format!("{cores} cores ({cpu}), {mem} RAM, load average at start {load}")
}

fn verdict(ok: bool) -> &'static str {
    if ok {
        "meets target"
    } else {
        "MISSES target"
    }
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

/// The fastest pass of `encoding`.
fn best_pass(f: &Figures, encoding: catalog::WireEncoding) -> Option<&catalog::TransferPass> {
    f.transfer_passes
        .iter()
        .filter(|p| p.encoding == encoding)
        .min_by_key(|p| p.http)
}

fn report(opts: &Options, f: &Figures) {
    use catalog::WireEncoding;
    let transfer_of = |e: WireEncoding| best_pass(f, e).map(|p| p.http).unwrap_or_default();
    let snapshot = f.readiness.snapshot();
    let plain_floor = f.raw_insert + transfer_of(WireEncoding::Identity);
    let terminal_encoding = WireEncoding::ALL
        .into_iter()
        .find(|e| e.name() == opts.catalog_encoding)
        .unwrap_or(WireEncoding::Zstd);
    let compressed_floor = f.raw_insert + transfer_of(terminal_encoding);
    let plain_ratio = ratio(snapshot, plain_floor);
    let compressed_ratio = ratio(snapshot, compressed_floor);

    println!();
    println!(
        "== (a) empty terminal → offline-ready, {} entities (terminal asks for {}) ==",
        opts.entities, opts.catalog_encoding
    );
    println!(
        "snapshot (spawn `terminal run` → catalog complete, by the daemon's own stamp): {}",
        ms(snapshot)
    );
    println!(
        "  of which daemon start-up until its status endpoint answered: {}",
        ms(f.daemon_started)
    );
    println!(
        "  seen complete on /status after {} ({} polls every {}, each {} p50 / {} max)",
        ms(f.readiness.observed),
        f.readiness.polls.count,
        ms(STATUS_POLL),
        ms(f.readiness.polls.p50),
        ms(f.readiness.polls.max)
    );
    println!(
        "transfer of all {} pages ({:.1} MiB of JSON), nothing stored — per encoding, best of {} passes from the cloud's page cache:",
        f.cold_transfer.pages,
        f.cold_transfer.bytes as f64 / 1048576.0,
        f.transfer_passes.len() / WireEncoding::ALL.len()
    );
    for e in WireEncoding::ALL {
        if let Some(p) = best_pass(f, e) {
            println!(
                "  {:<8} {:>8.2} MiB on the wire ({:>4.1}% of JSON)  {} (of which decoding {}; passes: {})",
                e.name(),
                p.wire_bytes as f64 / 1048576.0,
                p.wire_bytes as f64 * 100.0 / p.bytes.max(1) as f64,
                ms(p.http),
                ms(p.decode),
                f.transfer_passes
                    .iter()
                    .filter(|q| q.encoding == e)
                    .map(|q| ms(q.http))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
    }
    println!(
        "  cold (the cloud reading every page from its database, identity): {}",
        ms(f.cold_transfer.http)
    );
    println!(
        "  JSON parsing of those pages (not in a floor): {}",
        ms(best_pass(f, WireEncoding::Identity)
            .map(|p| p.parse)
            .unwrap_or_default())
    );
    println!(
        "raw insert (same rows, terminal schema, one transaction): {}",
        ms(f.raw_insert)
    );
    println!(
        "floor, plain:      raw insert + identity transfer = {}",
        ms(plain_floor)
    );
    println!(
        "floor, compressed: raw insert + {} transfer     = {}",
        terminal_encoding.name(),
        ms(compressed_floor)
    );
    println!(
        "ratio snapshot / plain floor      = {} / {} = {plain_ratio:.2}  (target ≤ {SNAPSHOT_TARGET_RATIO:.1}, goal {SNAPSHOT_GOAL_RATIO:.1}: {})",
        ms(snapshot),
        ms(plain_floor),
        verdict(plain_ratio <= SNAPSHOT_TARGET_RATIO)
    );
    println!(
        "ratio snapshot / compressed floor = {} / {} = {compressed_ratio:.2}",
        ms(snapshot),
        ms(compressed_floor),
    );
    println!("(seeding by `cloud catalog import`: {})", ms(f.import));

    for (label, e) in [
        (
            "cloud up: the outbox delivers while the till sells",
            &f.online,
        ),
        ("cloud stopped: selling offline", &f.offline),
    ] {
        println!();
        println!(
            "== (b) sale enqueue, {} sales per series — {label} ==",
            e.daemon.count
        );
        print_series(&[
            ("raw fsync'd INSERT (WAL, synchronous=FULL)", &e.raw),
            ("SqliteStore::enqueue_sale (in-process)", &e.store),
            ("POST /sales on the daemon (HTTP, loopback)", &e.daemon),
            ("same POST, no such type (HTTP + parse, 422)", &e.http_floor),
        ]);
        println!("  where POST /sales spends its time (each part's own percentiles):");
        print_series(&[
            ("  the daemon's committed enqueue (store)", &e.daemon_store),
            (
                "  rest of its handler (JSON, hand-offs)",
                &e.daemon_handler_rest,
            ),
            (
                "  outside the handler (client, TCP, HTTP)",
                &e.outside_handler,
            ),
        ]);
        if e.delivered > 0 {
            println!(
                "(the cloud holds {} of the daemon's sales: the outbox delivered while the till sold)",
                e.delivered
            );
        }
        let with_http = e.raw.p99 + e.http_floor.p99;
        println!(
            "floor with the HTTP round trip: raw p99 + HTTP-floor p99 = {} + {} = {}; POST /sales p99 / that = {:.2}",
            ms(e.raw.p99),
            ms(e.http_floor.p99),
            ms(with_http),
            ratio(e.daemon.p99, with_http)
        );
        for (name, s) in [("enqueue_sale", &e.store), ("POST /sales", &e.daemon)] {
            let r99 = ratio(s.p99, e.raw.p99);
            println!(
                "{name:<13} p99 / raw p99 = {r99:.2}, p50 / raw p50 = {:.2}  (target p99 ≤ {ENQUEUE_TARGET_RATIO:.1}×: {})",
                ratio(s.p50, e.raw.p50),
                verdict(r99 <= ENQUEUE_TARGET_RATIO)
            );
        }
    }

    let o = &f.offline_outbox;
    println!(
        "outbox after selling offline: pending {}, in flight {}, failed (tried, waiting to retry) {}",
        o["pending"], o["in_flight"], o["failed"]
    );

    let peak = mib(f.at_end.peak_kib.max(f.after_snapshot.peak_kib));
    println!();
    println!("== (c) daemon memory ==");
    println!(
        "after the snapshot: VmHWM {:.1} MiB, VmRSS {:.1} MiB",
        mib(f.after_snapshot.peak_kib),
        mib(f.after_snapshot.current_kib)
    );
    println!(
        "after the sales:    VmHWM {:.1} MiB, VmRSS {:.1} MiB",
        mib(f.at_end.peak_kib),
        mib(f.at_end.current_kib)
    );
    println!(
        "peak RSS {peak:.1} MiB  (target ≤ {RSS_TARGET_MIB:.0} MiB: {})",
        verdict(peak <= RSS_TARGET_MIB)
    );
}
