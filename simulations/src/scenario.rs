//! One simulation run, start to verdict: set up the cloud and the fleet, sell under faults,
//! stop the faults, wait for quiescence, and audit.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::sync::Mutex;

use crate::catalog_churn::{branch_truth, compare_catalog, seed_catalog, CatalogChurn};
use crate::cloud_cluster::{CloudCluster, Enrollment, RunDatabase, DEFAULT_PG_SERVER};
use crate::daemon::Binaries;
use crate::fault_schedule::{CloudFault, FaultMode, FaultSchedule, ScheduleShape};
use crate::ledger_audit::{
    audit, audit_chains, read_cloud_sales, read_recorded_breaks, SaleCounts, TerminalLedger,
};
use crate::proxy::{FaultProxy, Upstreams};
use crate::report::{AbuseReport, RunReport, TerminalReport, Timings};
use crate::sale_script::{is_valid, SaleScript};
use crate::terminal_fleet::{DaemonTuning, Receipt, TerminalNode};
use crate::SimError;

/// Everything `simulations run` takes.
#[derive(Debug, Clone)]
pub struct RunConfig {
    /// Terminals in the fleet.
    pub terminals: usize,
    /// Branches they are spread over (`b0` …).
    pub branches: usize,
    /// Sales each terminal records.
    pub sales: u32,
    /// Fault families to inject.
    pub faults: FaultMode,
    /// Seed of everything random.
    pub seed: u64,
    /// `cloud serve` processes on the one database.
    pub cloud_instances: usize,
    /// Use this database as is; `None` = create a fresh one on `pg_server`.
    pub database_url: Option<String>,
    /// Server on which a fresh database is created (`postgres://user@host:port`).
    pub pg_server: String,
    /// Add the flooding terminal.
    pub abusive_terminal: bool,
    /// Mean pause between two sales of one terminal.
    pub pace_ms: u64,
    /// Backoff and polling knobs passed to every daemon.
    pub tuning: DaemonTuning,
    /// Longest wait for every journal to settle.
    pub quiescence_timeout: Duration,
    /// Longest wait for every catalog to match its branch.
    pub catalog_timeout: Duration,
    /// Where logs and terminal data go; `None` = a new directory under the temp dir.
    pub run_dir: Option<PathBuf>,
    /// Keep the run directory and database even when the run passes.
    pub keep: bool,
    /// Harness self-test: terminal 0's proxy forges `accepted` for its first sales batch, so
    /// those sales never reach the cloud. A correct audit must then fail the run.
    pub sabotage: bool,
}

impl Default for RunConfig {
    fn default() -> Self {
        RunConfig {
            terminals: 4,
            branches: 2,
            sales: 30,
            faults: FaultMode::All,
            seed: 1,
            cloud_instances: 1,
            database_url: None,
            pg_server: DEFAULT_PG_SERVER.to_string(),
            abusive_terminal: false,
            pace_ms: 20,
            tuning: DaemonTuning {
                backoff_base_ms: 50,
                backoff_cap_ms: 1000,
                delta_interval_ms: 500,
                max_attempts: 4,
            },
            quiescence_timeout: Duration::from_secs(180),
            catalog_timeout: Duration::from_secs(60),
            run_dir: None,
            keep: false,
            sabotage: false,
        }
    }
}

impl RunConfig {
    /// The schedule shape this configuration implies.
    pub fn shape(&self) -> ScheduleShape {
        ScheduleShape {
            seed: self.seed,
            terminals: self.terminals,
            sales_per_terminal: self.sales,
            cloud_instances: self.cloud_instances.max(1),
            faults: self.faults,
            backoff_cap_ms: self.tuning.backoff_cap_ms,
            attempt_budget_ms: self.tuning.attempt_budget_ms(),
        }
    }
}

fn ms(d: Duration) -> u64 {
    d.as_millis() as u64
}

/// Runs one simulation and returns its report (also written to `report_path` by the caller).
/// Errors are reserved for a run that could not be carried out at all.
pub async fn run(cfg: RunConfig) -> Result<RunReport, SimError> {
    let started = Instant::now();
    let schedule = FaultSchedule::generate(cfg.shape());
    tracing::info!(
        seed = cfg.seed,
        faults = ?cfg.faults,
        planned = ?schedule.planned_by_kind(),
        cloud_faults = ?schedule.cloud,
        "fault schedule (replay with the same --seed and shape)"
    );
    let bins = Binaries::locate()?;
    let run_dir = match &cfg.run_dir {
        Some(d) => d.clone(),
        None => {
            std::env::temp_dir().join(format!("possync-sim-{}-{}", cfg.seed, std::process::id()))
        }
    };
    std::fs::create_dir_all(&run_dir).map_err(|e| SimError::Io(e.to_string()))?;
    let db = match &cfg.database_url {
        Some(url) => RunDatabase::existing(url),
        None => {
            RunDatabase::create_fresh(
                &cfg.pg_server,
                &format!("possync_sim_{}_{}", cfg.seed, std::process::id()),
            )
            .await?
        }
    };
    let cluster = CloudCluster::start(
        &bins.cloud,
        &db.url,
        &run_dir,
        cfg.cloud_instances.max(1),
        // Every simulated terminal reaches the cloud from 127.0.0.1, so the per-address
        // bucket (meant for distinct client addresses) would throttle the whole fleet as one
        // client. Lift it; the per-terminal bucket keeps its defaults (20/s, burst 40).
        vec![
            ("POSSYNC_ADDRESS_RATE_PER_SECOND".into(), "100000".into()),
            ("POSSYNC_ADDRESS_RATE_BURST".into(), "100000".into()),
        ],
    )
    .await?;
    let result = run_on(&cfg, &bins, &run_dir, &db, cluster, schedule, started).await;
    // A failing run keeps its database and logs for inspection — except a sabotage
    // self-test, whose failure is the expected outcome.
    let keep = cfg.keep || (!cfg.sabotage && result.as_ref().map(|r| !r.passed).unwrap_or(true));
    if !keep {
        if let Err(e) = db.drop_database().await {
            tracing::warn!(error = %e, "could not drop the run database");
        }
        let _ = std::fs::remove_dir_all(&run_dir);
    }
    result
}

#[allow(clippy::too_many_arguments)]
async fn run_on(
    cfg: &RunConfig,
    bins: &Binaries,
    run_dir: &std::path::Path,
    db: &RunDatabase,
    cluster: CloudCluster,
    schedule: FaultSchedule,
    started: Instant,
) -> Result<RunReport, SimError> {
    let cluster = Arc::new(Mutex::new(cluster));
    let upstreams: Arc<Upstreams> = cluster.lock().await.upstreams();
    let branches: Vec<String> = (0..cfg.branches.max(1)).map(|b| format!("b{b}")).collect();
    let mut errors = Vec::new();

    // --- setup: catalog, enrollment, daemons -----------------------------------------
    seed_catalog(&*cluster.lock().await, &branches, run_dir).await?;
    let mut nodes = Vec::with_capacity(cfg.terminals);
    for i in 0..cfg.terminals {
        let branch = &branches[i % branches.len()];
        let enrollment = cluster.lock().await.add_terminal(branch).await?;
        let proxy =
            FaultProxy::start(schedule.terminals[i].proxy.clone(), upstreams.clone()).await?;
        let node = TerminalNode::enroll_and_start(
            i,
            &bins.terminal,
            run_dir,
            enrollment,
            proxy,
            &cfg.tuning,
        )
        .await?;
        if cfg.sabotage && i == 0 {
            tracing::warn!("self-test: terminal 0's first sales batch will be forged as accepted");
            node.proxy.forge_sales_acceptance(1);
        }
        nodes.push(Arc::new(Mutex::new(node)));
    }
    let abuser: Option<Enrollment> = if cfg.abusive_terminal {
        Some(cluster.lock().await.add_terminal(&branches[0]).await?)
    } else {
        None
    };
    let setup_done = Instant::now();

    // --- selling under faults ----------------------------------------------------------
    let sold = Arc::new(AtomicU64::new(0));
    let selling = Arc::new(AtomicBool::new(true));
    let mut sellers = Vec::new();
    for (i, node) in nodes.iter().enumerate() {
        let node = node.clone();
        let sold = sold.clone();
        let crashes = schedule.terminals[i].crash_after_sales.clone();
        let seed = cfg.seed;
        let sales = cfg.sales;
        let pace = cfg.pace_ms;
        sellers.push(tokio::spawn(async move {
            sell(node, i, seed, sales, pace, crashes, sold).await
        }));
    }
    let cloud_faults = {
        let cluster = cluster.clone();
        let sold = sold.clone();
        let selling = selling.clone();
        let upstreams = upstreams.clone();
        let faults = schedule.cloud.clone();
        tokio::spawn(
            async move { inject_cloud_faults(cluster, upstreams, faults, sold, selling).await },
        )
    };
    let churn = {
        let admin = cluster.lock().await.admin();
        let selling = selling.clone();
        let mut churn = CatalogChurn::new(cfg.seed, branches.clone());
        tokio::spawn(async move {
            while selling.load(Ordering::SeqCst) {
                churn.step(&admin).await;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            churn.counts
        })
    };
    // The `clone` fault: half-way through terminal 0's sales, its live database is copied into
    // a second daemon that then sells as much again.
    let cloner = if schedule.shape.faults.clone_till() && !nodes.is_empty() {
        let source = nodes[0].clone();
        let index = nodes.len();
        let run_dir = run_dir.to_path_buf();
        let proxy = FaultProxy::start(Vec::new(), upstreams.clone()).await?;
        let (sold, seed, sales, pace) = (sold.clone(), cfg.seed, cfg.sales, cfg.pace_ms);
        Some(tokio::spawn(async move {
            clone_and_sell(source, index, run_dir, proxy, seed, sales, pace, sold).await
        }))
    } else {
        None
    };
    let abuse = abuser.as_ref().map(|e| {
        let e = e.clone();
        let selling = selling.clone();
        let upstreams = upstreams.clone();
        tokio::spawn(async move { hammer(e, upstreams, selling).await })
    });

    let mut acknowledged: Vec<Vec<(Receipt, String)>> = Vec::new();
    for (i, s) in sellers.into_iter().enumerate() {
        match s.await {
            Ok(Ok(acks)) => acknowledged.push(acks),
            Ok(Err(e)) => {
                errors.push(format!("terminal {i} selling: {e}"));
                acknowledged.push(Vec::new());
            }
            Err(e) => {
                errors.push(format!("terminal {i} seller panicked: {e}"));
                acknowledged.push(Vec::new());
            }
        }
    }
    let mut injected: BTreeMap<String, u64> = BTreeMap::new();
    if let Some(c) = cloner {
        match c.await {
            Ok(Ok((node, acks))) => {
                nodes.push(Arc::new(Mutex::new(node)));
                acknowledged.push(acks);
                injected.insert("terminal_clone".into(), 1);
            }
            Ok(Err(e)) => errors.push(format!("clone: {e}")),
            Err(e) => errors.push(format!("clone task panicked: {e}")),
        }
    }
    selling.store(false, Ordering::SeqCst);
    match cloud_faults.await {
        Ok(Ok((kills, outages, mid_commit))) => {
            injected.insert("cloud_kill".into(), kills);
            injected.insert("cloud_kill_with_sales_in_flight".into(), mid_commit);
            injected.insert("cloud_outage".into(), outages);
        }
        Ok(Err(e)) => errors.push(format!("cloud fault injection: {e}")),
        Err(e) => errors.push(format!("cloud fault task: {e}")),
    }
    let churn_counts = churn.await.unwrap_or_default();
    let abuse_report = match abuse {
        Some(h) => h.await.ok(),
        None => None,
    };
    let selling_done = Instant::now();

    // --- stop faults, wait for quiescence -----------------------------------------------
    upstreams.set_outage(false);
    for n in &nodes {
        n.lock().await.proxy.stop_faults();
    }
    let deadline = Instant::now() + cfg.quiescence_timeout;
    let mut operator_released = 0u64;
    let mut operator_rounds = 0u32;
    loop {
        let mut busy = 0usize;
        let mut attention: Vec<usize> = Vec::new();
        for (i, n) in nodes.iter().enumerate() {
            let node = n.lock().await;
            match node.journal() {
                Ok(j) => {
                    let open = j
                        .iter()
                        .filter(|r| r.status != "synced" && r.status != "needs_attention")
                        .count();
                    if open > 0 || j.len() < acknowledged[i].len() {
                        busy += 1;
                    } else if j.iter().any(|r| r.status == "needs_attention") {
                        attention.push(i);
                    }
                }
                Err(_) => busy += 1,
            }
        }
        if busy == 0 && attention.is_empty() {
            break;
        }
        if busy == 0 && operator_rounds < 3 {
            // Every journal settled, some sales exhausted their attempts during the faults:
            // do what the operator does (the status page's Retry) and wait again.
            operator_rounds += 1;
            for i in attention {
                match nodes[i].lock().await.retry_needing_attention().await {
                    Ok(n) => operator_released += n,
                    Err(e) => errors.push(format!("terminal {i} operator retry: {e}")),
                }
            }
            continue;
        }
        if busy == 0 || Instant::now() > deadline {
            if busy > 0 {
                errors.push(format!(
                    "quiescence: {busy} terminal(s) still had unsynced sales after {:?}",
                    cfg.quiescence_timeout
                ));
            }
            break;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let quiet = Instant::now();

    // --- catalog convergence ------------------------------------------------------------
    let mut comparisons = vec![Default::default(); nodes.len()];
    let cat_deadline = Instant::now() + cfg.catalog_timeout;
    let mut truths: BTreeMap<String, Vec<crate::terminal_fleet::CatalogRow>> = BTreeMap::new();
    let cloud_url = upstreams.pick().ok_or_else(|| SimError::Process {
        name: "cloud".into(),
        message: "no live instance".into(),
    })?;
    for b in &branches {
        let token = nodes_token_of_branch(&nodes, b).await;
        if let Some(token) = token {
            truths.insert(b.clone(), branch_truth(&cloud_url, &token).await?);
        }
    }
    loop {
        let mut pending = 0;
        for (i, n) in nodes.iter().enumerate() {
            let node = n.lock().await;
            let truth = truths
                .get(&node.enrollment.branch_id)
                .cloned()
                .unwrap_or_default();
            let rows = node.catalog().unwrap_or_default();
            comparisons[i] = compare_catalog(&rows, &truth, &node.enrollment.branch_id);
            if !comparisons[i].converged {
                pending += 1;
            }
        }
        if pending == 0 || Instant::now() > cat_deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let catalog_done = Instant::now();

    // --- audit ------------------------------------------------------------------------------
    let cloud_sales = read_cloud_sales(&db.url).await?;
    let mut ledgers = Vec::new();
    let mut per_terminal = Vec::new();
    for (i, n) in nodes.iter().enumerate() {
        let node = n.lock().await;
        let journal = node.journal().unwrap_or_else(|e| {
            errors.push(format!("terminal {i} journal: {e}"));
            Vec::new()
        });
        // The terminal's own verdict: reconcile `verify` against the cloud must find no drift.
        let reconcile_verify = node.reconcile("verify").await.ok();
        if let Some(v) = &reconcile_verify {
            let drift = v["upserts"].as_u64().unwrap_or(0) + v["deletes"].as_u64().unwrap_or(0);
            comparisons[i].reconcile_drift = Some(drift);
            if drift > 0 {
                comparisons[i].converged = false;
            }
        }
        per_terminal.push(TerminalReport {
            index: i,
            terminal_id: node.enrollment.terminal_id.clone(),
            branch_id: node.enrollment.branch_id.clone(),
            sales_acknowledged: acknowledged[i].len() as u64,
            journal_rows: journal.len() as u64,
            synced: journal.iter().filter(|r| r.status == "synced").count() as u64,
            needs_attention: journal
                .iter()
                .filter(|r| r.status == "needs_attention")
                .count() as u64,
            retries: journal.iter().map(|r| (r.attempts - 1).max(0) as u64).sum(),
            kills: node.kills,
            catalog: comparisons[i].clone(),
            reconcile_verify,
            proxy: node.proxy.counters(),
        });
        ledgers.push(TerminalLedger {
            terminal_id: node.enrollment.terminal_id.clone(),
            branch_id: node.enrollment.branch_id.clone(),
            acknowledged: acknowledged[i].clone(),
            journal,
        });
    }
    let mut findings = audit(&ledgers, &cloud_sales);
    let mut exports = Vec::with_capacity(branches.len());
    for b in &branches {
        let text = cluster.lock().await.audit_export(b).await?;
        exports.push((b.to_string(), text));
    }
    let recorded = read_recorded_breaks(&db.url).await?;
    audit_chains(&mut findings, recorded, &exports);
    let audit_done = Instant::now();

    for t in &per_terminal {
        for (k, v) in &t.proxy {
            if k != "requests" {
                *injected.entry(k.clone()).or_insert(0) += v;
            }
        }
        *injected.entry("terminal_kill".into()).or_insert(0) += u64::from(t.kills);
        *injected.entry("proxied_requests".into()).or_insert(0) +=
            t.proxy.get("requests").copied().unwrap_or(0);
    }
    for n in &nodes {
        n.lock().await.stop().await;
    }
    cluster.lock().await.shutdown().await;

    let converged = comparisons.iter().filter(|c| c.converged).count() as u64;
    let mut report = RunReport {
        seed: cfg.seed,
        terminals: cfg.terminals,
        branches: branches.len(),
        sales_per_terminal: cfg.sales,
        cloud_instances: cfg.cloud_instances.max(1),
        faults_mode: format!("{:?}", cfg.faults).to_lowercase(),
        counts: SaleCounts {
            cross_branch: findings.counts.cross_branch
                + comparisons
                    .iter()
                    .map(|c| c.foreign_branch_entities)
                    .sum::<u64>(),
            ..findings.counts.clone()
        },
        needs_attention_released_by_operator: operator_released,
        retries: per_terminal.iter().map(|t| t.retries).sum(),
        attempt_budget_ms: cfg.tuning.attempt_budget_ms(),
        longest_outage_ms: schedule
            .cloud
            .iter()
            .filter_map(|c| match c {
                CloudFault::Outage { duration_ms, .. } => Some(*duration_ms),
                _ => None,
            })
            .max()
            .unwrap_or(0),
        catalog_converged_terminals: converged,
        catalog_unconverged_terminals: comparisons.len() as u64 - converged,
        faults_injected: injected,
        faults_planned: schedule.planned_by_kind(),
        catalog_changes: churn_counts,
        audit: findings,
        abuse: abuse_report,
        timings: Timings {
            setup_ms: ms(setup_done - started),
            selling_ms: ms(selling_done - setup_done),
            quiescence_ms: ms(quiet - selling_done),
            catalog_convergence_ms: ms(catalog_done - quiet),
            audit_ms: ms(audit_done - catalog_done),
            total_ms: ms(started.elapsed()),
        },
        per_terminal,
        errors,
        schedule,
        run_dir: run_dir.display().to_string(),
        passed: false,
    };
    report.passed = report.verdict();
    Ok(report)
}

async fn nodes_token_of_branch(nodes: &[Arc<Mutex<TerminalNode>>], branch: &str) -> Option<String> {
    for n in nodes {
        let node = n.lock().await;
        if node.enrollment.branch_id == branch {
            return Some(node.enrollment.token.clone());
        }
    }
    None
}

/// One terminal's till: records `sales` scripted sales through the daemon, and kills the
/// daemon (kill -9, then restart) right after the scheduled sale counts — the outbox is
/// typically mid-flush of the sale just recorded.
async fn sell(
    node: Arc<Mutex<TerminalNode>>,
    index: usize,
    seed: u64,
    sales: u32,
    pace_ms: u64,
    crashes: Vec<u32>,
    sold: Arc<AtomicU64>,
) -> Result<Vec<(Receipt, String)>, SimError> {
    let (prefix, _) = {
        let n = node.lock().await;
        (
            format!("{}-T{index}", n.enrollment.branch_id.to_uppercase()),
            (),
        )
    };
    let mut script = SaleScript::new(seed, index, prefix, pace_ms);
    let mut kill_rng = StdRng::seed_from_u64(seed ^ (index as u64) << 8 ^ 0x0C2A_5400);
    let mut acks = Vec::with_capacity(sales as usize);
    for k in 1..=sales {
        let sale = script.next_sale();
        if !is_valid(&sale) {
            return Err(SimError::Io(format!("scripted sale {k} is invalid")));
        }
        tokio::time::sleep(sale.pause).await;
        let body = sale.body();
        let mut attempt = 0;
        let receipt = loop {
            let r = node.lock().await.record_sale(&body).await;
            match r {
                Ok(r) => break r,
                Err(e) if attempt < 20 => {
                    attempt += 1;
                    tracing::warn!(terminal = index, sale = k, error = %e, "recording a sale failed; retrying");
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                Err(e) => return Err(e),
            }
        };
        acks.push((receipt, sale.payload.receipt_no.clone()));
        sold.fetch_add(1, Ordering::SeqCst);
        if crashes.contains(&k) {
            tokio::time::sleep(Duration::from_millis(kill_rng.random_range(0..40))).await;
            node.lock().await.kill_and_restart().await?;
        }
    }
    Ok(acks)
}

/// Waits until `source` has journaled half of its `sales`, clones its live database into a
/// new till (see [`TerminalNode::clone_of`]) and sells `sales / 2` sales there. Returns the new
/// till and its receipts for the audit.
#[allow(clippy::too_many_arguments)]
async fn clone_and_sell(
    source: Arc<Mutex<TerminalNode>>,
    index: usize,
    run_dir: std::path::PathBuf,
    proxy: FaultProxy,
    seed: u64,
    sales: u32,
    pace_ms: u64,
    sold: Arc<AtomicU64>,
) -> Result<(TerminalNode, Vec<(Receipt, String)>), SimError> {
    let half = (sales / 2).max(1) as usize;
    loop {
        let recorded = source.lock().await.journal().map(|j| j.len()).unwrap_or(0);
        if recorded >= half {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let node = {
        let src = source.lock().await;
        TerminalNode::clone_of(&src, index, &run_dir, proxy).await?
    };
    let node = Arc::new(Mutex::new(node));
    let acks = sell(
        node.clone(),
        index,
        seed,
        (sales / 2).max(1),
        pace_ms,
        Vec::new(),
        sold,
    )
    .await?;
    let node = Arc::try_unwrap(node)
        .map_err(|_| SimError::Io("clone node still shared after selling".into()))?
        .into_inner();
    Ok((node, acks))
}

/// Executes the cloud-side faults when the fleet-wide sale count reaches their trigger.
/// Returns (kills, outages, kills that hit an instance with a sales batch in flight).
async fn inject_cloud_faults(
    cluster: Arc<Mutex<CloudCluster>>,
    upstreams: Arc<Upstreams>,
    faults: Vec<CloudFault>,
    sold: Arc<AtomicU64>,
    selling: Arc<AtomicBool>,
) -> Result<(u64, u64, u64), SimError> {
    let (mut kills, mut outages, mut mid_commit) = (0, 0, 0);
    for f in faults {
        while sold.load(Ordering::SeqCst) < f.at_sale() && selling.load(Ordering::SeqCst) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        match f {
            CloudFault::Restart { instance, .. } => {
                // Aim at a commit: wait (briefly) until a sales batch is being forwarded to
                // that instance, then kill it under the request.
                let instance = instance % upstreams_len(&cluster).await;
                let aim_until = Instant::now() + Duration::from_secs(2);
                while upstreams.sales_in_flight(instance) == 0 && Instant::now() < aim_until {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                if upstreams.sales_in_flight(instance) > 0 {
                    mid_commit += 1;
                }
                cluster
                    .lock()
                    .await
                    .kill_and_restart(instance, Duration::from_millis(300))
                    .await?;
                kills += 1;
            }
            CloudFault::Outage { duration_ms, .. } => {
                tracing::warn!(duration_ms, "fault: cloud outage begins");
                upstreams.set_outage(true);
                tokio::time::sleep(Duration::from_millis(duration_ms)).await;
                upstreams.set_outage(false);
                tracing::warn!("fault: cloud outage ends");
                outages += 1;
            }
        }
    }
    Ok((kills, outages, mid_commit))
}

async fn upstreams_len(cluster: &Mutex<CloudCluster>) -> usize {
    cluster.lock().await.len().max(1)
}

/// Concurrent request loops of the misbehaving terminal: enough that it stays far over its
/// limit even when a loaded machine makes every answer slow.
const ABUSE_WORKERS: usize = 8;

/// The misbehaving terminal: [`ABUSE_WORKERS`] loops of delta polls straight at the cloud, each
/// at up to 200 requests/s (ten times the default limit on its own), for as long as the others
/// sell and at least 3 s.
async fn hammer(e: Enrollment, upstreams: Arc<Upstreams>, selling: Arc<AtomicBool>) -> AbuseReport {
    let client = match reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
    {
        Ok(c) => c,
        Err(_) => {
            return AbuseReport {
                terminal_id: e.terminal_id,
                ..Default::default()
            }
        }
    };
    let start = Instant::now();
    let workers: Vec<_> = (0..ABUSE_WORKERS)
        .map(|_| {
            let (client, upstreams, selling, token) = (
                client.clone(),
                upstreams.clone(),
                selling.clone(),
                e.token.clone(),
            );
            tokio::spawn(async move {
                let mut rep = AbuseReport::default();
                let mut tick = tokio::time::interval(Duration::from_millis(5));
                while selling.load(Ordering::SeqCst) || start.elapsed() < Duration::from_secs(3) {
                    tick.tick().await;
                    let Some(url) = upstreams.pick() else {
                        continue;
                    };
                    rep.requests += 1;
                    match client
                        .get(format!("{url}/v1/pos/catalog/delta?since=0&limit=1"))
                        .bearer_auth(&token)
                        .send()
                        .await
                    {
                        Ok(r) if r.status().as_u16() == 429 => {
                            rep.status_429 += 1;
                            if let Some(v) = r.headers().get("retry-after") {
                                rep.retry_after_seen += 1;
                                if rep.first_retry_after_s.is_none() {
                                    rep.first_retry_after_s =
                                        v.to_str().ok().and_then(|s| s.parse().ok());
                                }
                            }
                        }
                        Ok(r) if r.status().is_success() => rep.status_200 += 1,
                        Ok(_) => rep.other_status += 1,
                        Err(_) => rep.transport_errors += 1,
                    }
                }
                rep
            })
        })
        .collect();
    let mut rep = AbuseReport {
        terminal_id: e.terminal_id,
        ..Default::default()
    };
    for w in workers {
        if let Ok(part) = w.await {
            rep.requests += part.requests;
            rep.status_200 += part.status_200;
            rep.status_429 += part.status_429;
            rep.other_status += part.other_status;
            rep.transport_errors += part.transport_errors;
            rep.retry_after_seen += part.retry_after_seen;
            rep.first_retry_after_s = rep.first_retry_after_s.or(part.first_retry_after_s);
        }
    }
    rep
}
