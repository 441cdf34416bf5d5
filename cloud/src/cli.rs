//! The `cloud` command line (README, Commands). Every command that fails returns a [`CliError`] whose
//! one-line text names the stable code or the cause; `main` prints it and exits non-zero.

use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use thiserror::Error;
use uuid::Uuid;

use crate::catalog_source::{self, SourceError, SourceMapping};
use crate::config::{default_database_url, ServeConfig};
use crate::db::catalog::{self, EntityWrite};
use crate::db::{terminals, ConnectOptions, Database, DbConn, StoreError};
use crate::rate_limit::RateLimit;
use crate::server::{self, ServeError};

/// `cloud`: the possync cloud service and its administration commands.
#[derive(Debug, Parser)]
#[command(name = "cloud", version, about)]
pub struct Cli {
    /// Database URL: `postgres://…` or `sqlite://PATH`. Default: `sqlite://<data-dir>/cloud.db`.
    #[arg(long, global = true, env = "POSSYNC_DATABASE_URL")]
    pub database_url: Option<String>,
    /// Directory for the embedded database and the generated admin token.
    #[arg(
        long,
        global = true,
        env = "POSSYNC_CLOUD_DATA",
        default_value = "./data/cloud"
    )]
    pub data_dir: PathBuf,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve the HTTP API (migrations run first).
    Serve(ServeArgs),
    /// Apply pending database migrations and exit.
    Migrate,
    /// Enroll, revoke or list terminals.
    #[command(subcommand)]
    Terminal(TerminalCommand),
    /// Write catalog entities.
    #[command(subcommand)]
    Catalog(CatalogCommand),
    /// Print the admin token (generated and stored under the data dir on first use, unless
    /// `POSSYNC_ADMIN_TOKEN` is set).
    AdminToken,
    /// Export or verify the sales journal's hash chains (docs/journal-chain.md).
    #[command(subcommand)]
    Audit(AuditCommand),
}

/// `cloud audit …`.
#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Print a branch's sales journal as JSON Lines on stdout, by pos_id then local_event_id:
    /// every pos_id from its first to its last sale that happened in [--from, --to).
    Export {
        /// The branch.
        #[arg(long)]
        branch: String,
        /// Earliest `occurred_at` (RFC 3339), inclusive.
        #[arg(long)]
        from: Option<chrono::DateTime<chrono::Utc>>,
        /// Latest `occurred_at` (RFC 3339), exclusive.
        #[arg(long)]
        to: Option<chrono::DateTime<chrono::Utc>>,
    },
    /// Verify an export offline, with no database: exit 0 when every chain is intact and
    /// gapless, else exit 1 naming the first bad record.
    Verify {
        /// The JSON Lines file (`-` for stdin).
        file: PathBuf,
    },
}

/// Options of `cloud serve`; defaults are in `docs/cloud-operations.md` and `docs/rate-limits.md`.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Address to bind (port 0: any free port, printed on stdout).
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub bind: String,
    /// HTTP worker threads (0: one per core).
    #[arg(long, default_value_t = 0)]
    pub workers: usize,
    /// Database connections in the pool.
    #[arg(long, default_value_t = 8, env = "POSSYNC_DB_POOL_SIZE")]
    pub pool_size: u32,
    /// Sustained requests per second per terminal.
    #[arg(long, default_value_t = 20, env = "POSSYNC_RATE_PER_SECOND")]
    pub rate_per_second: u32,
    /// Burst per terminal.
    #[arg(long, default_value_t = 40, env = "POSSYNC_RATE_BURST")]
    pub rate_burst: u32,
    /// Sustained requests per second per client address (before auth).
    #[arg(long, default_value_t = 20, env = "POSSYNC_ADDRESS_RATE_PER_SECOND")]
    pub address_rate_per_second: u32,
    /// Burst per client address.
    #[arg(long, default_value_t = 40, env = "POSSYNC_ADDRESS_RATE_BURST")]
    pub address_rate_burst: u32,
    /// Reverse proxies (addresses or CIDRs, comma-separated) whose `Forwarded` /
    /// `X-Forwarded-For` headers name the client for the per-address rate limit. Without it
    /// those headers are ignored, so a client cannot pick its own bucket.
    #[arg(long, default_value = "", env = "POSSYNC_TRUSTED_PROXIES")]
    pub trusted_proxies: String,
    /// Most entries in one reconcile manifest.
    #[arg(long, default_value_t = 2000)]
    pub manifest_max_entries: usize,
    /// Seconds a request body may take to arrive before the request is answered 408.
    #[arg(long, default_value_t = 30)]
    pub body_timeout_secs: u64,
    /// Most snapshot pages built from the catalog at once (a cold-start herd queues behind
    /// them; pages already built are served without waiting). Keep it below --pool-size.
    #[arg(long, default_value_t = crate::config::DEFAULT_SNAPSHOT_BUILDS, env = "POSSYNC_SNAPSHOT_BUILDS")]
    pub snapshot_builds: usize,
    /// Days tombstones are kept (older delta cursors get 410 resnapshot_required).
    #[arg(long, default_value_t = 30)]
    pub tombstone_retention_days: i64,
    /// Seconds between tombstone purge runs.
    #[arg(long, default_value_t = 3600)]
    pub purge_interval_secs: u64,
    /// Most events waiting in one branch actor before 503.
    #[arg(long, default_value_t = 10_000)]
    pub branch_queue_limit: usize,
    /// Seconds an idle branch actor lives.
    #[arg(long, default_value_t = 300)]
    pub branch_idle_secs: u64,
    /// A catalog-source mapping (TOML): the catalog comes from the back office's own
    /// PostgreSQL tables, captured by the triggers `cloud catalog source install` added; the
    /// server refuses to start if they are missing or from another mapping.
    #[arg(long, env = "POSSYNC_CATALOG_SOURCE")]
    pub catalog_source: Option<PathBuf>,
    /// With --catalog-source: refuse admin catalog writes (403), so the back office stays the
    /// one source of truth.
    #[arg(
        long,
        env = "POSSYNC_CATALOG_SOURCE_ONLY",
        requires = "catalog_source",
        default_value_t = false
    )]
    pub catalog_source_only: bool,
    /// PostgreSQL only: answer an empty delta poll from memory, kept current across
    /// instances by LISTEN/NOTIFY. A change is then seen by a poll within the notification's
    /// latency (tens of ms) instead of at once (docs/deployment.md); off by default.
    #[arg(long, env = "POSSYNC_DELTA_FROM_MEMORY", default_value_t = false)]
    pub delta_from_memory: bool,
}

/// `cloud terminal …`.
#[derive(Debug, Subcommand)]
pub enum TerminalCommand {
    /// Enroll a terminal; prints `{"terminal_id","branch_id","token"}` (the token is shown once).
    Add {
        /// Its branch.
        #[arg(long)]
        branch: String,
        /// A label for operators.
        #[arg(long)]
        name: Option<String>,
    },
    /// Enroll many terminals at once, in one transaction: FILE holds one branch id per line
    /// (one terminal each; blank lines skipped); prints one `{"terminal_id","branch_id","token"}`
    /// line per terminal, in file order.
    Import {
        /// The file of branch ids.
        file: PathBuf,
    },
    /// Revoke a terminal's token; its next request gets 401.
    Revoke {
        /// The terminal id.
        id: Uuid,
    },
    /// Issue a new token for the same terminal (id, branch and sales keys stay); prints
    /// `{"terminal_id","branch_id","token","grace_seconds"}`. The till takes it with
    /// `terminal token set TOKEN`.
    Rotate {
        /// The terminal id.
        id: Uuid,
        /// Seconds the old token keeps working (0: refused from the next request).
        #[arg(long, default_value_t = 0)]
        grace_seconds: u64,
    },
    /// List terminals as JSON lines.
    List,
}

/// `cloud catalog …`.
#[derive(Debug, Subcommand)]
pub enum CatalogCommand {
    /// Import entities from JSON lines (`{"type","id","branch_id","data"}`) or CSV with header
    /// `type,id,branch_id,data` (data is a JSON document, empty branch_id means global).
    Import {
        /// The file.
        file: PathBuf,
    },
    /// Create or replace one entity.
    Upsert {
        /// Entity type.
        #[arg(long = "type")]
        entity_type: String,
        /// Entity id.
        #[arg(long)]
        id: String,
        /// Branch for a branch-scoped entity; omit for global.
        #[arg(long)]
        branch: Option<String>,
        /// The JSON document.
        #[arg(long)]
        data: String,
    },
    /// Remove tombstones older than the given age now (what the server's retention task does);
    /// delta cursors from before the removed tombstones then get 410 `resnapshot_required`.
    Purge {
        /// Age in days; 0 purges every tombstone.
        #[arg(long, default_value_t = 30)]
        older_than_days: i64,
    },
    /// Delete (tombstone) one entity.
    Delete {
        /// Entity type.
        #[arg(long = "type")]
        entity_type: String,
        /// Entity id.
        #[arg(long)]
        id: String,
    },
    /// The back office's own PostgreSQL tables as the catalog (docs/catalog-source.md).
    #[command(subcommand)]
    Source(SourceCommand),
}

/// `cloud catalog source …`: every command takes the mapping file (TOML).
#[derive(Debug, Subcommand)]
pub enum SourceCommand {
    /// Check the mapping against the database; one coded line per problem, non-zero exit if any.
    Check {
        /// The mapping file.
        path: PathBuf,
    },
    /// Add the capture triggers to the mapped tables (idempotent), then load what they hold.
    Install {
        /// The mapping file.
        path: PathBuf,
        /// Install the triggers only; run `cloud catalog source load` later.
        #[arg(long)]
        no_load: bool,
    },
    /// Load (or re-load: unchanged rows are no-ops) the mapped tables into the catalog.
    Load {
        /// The mapping file.
        path: PathBuf,
    },
    /// Remove exactly what install added; catalog entities already written stay.
    Uninstall {
        /// The mapping file.
        path: PathBuf,
    },
}

/// A failed command, printed as one line.
#[derive(Debug, Error)]
pub enum CliError {
    /// Database trouble.
    #[error("{code}: {0}", code = possync_protocol::ErrorCode::PosSyncStorageFailed)]
    Store(#[from] StoreError),
    /// Catalog input refused by the store.
    #[error("{0}")]
    Catalog(#[from] catalog::CatalogError),
    /// A catalog source command failed.
    #[error("{0}")]
    Source(#[from] SourceError),
    /// Serving failed.
    #[error("{0}")]
    Serve(#[from] ServeError),
    /// Bad input file or argument.
    #[error("{0}")]
    Input(String),
    /// A journal failed verification: the first bad record.
    #[error("{code}: line {line}: {fault}", code = possync_protocol::ErrorCode::PosSyncChainBreak)]
    Chain {
        /// 1-based line of the file.
        line: usize,
        /// What is wrong with it.
        fault: String,
    },
    /// Local file trouble.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
}

impl Cli {
    fn database_url(&self) -> String {
        self.database_url
            .clone()
            .unwrap_or_else(|| default_database_url(&self.data_dir))
    }
}

/// Name of the admin token file inside the data dir.
const ADMIN_TOKEN_FILE: &str = "admin-token";

/// The admin token: `POSSYNC_ADMIN_TOKEN` if set, else the one stored in the data dir, else a
/// new random one that is stored (mode 0600) for next time.
pub fn admin_token(data_dir: &Path) -> Result<String, CliError> {
    if let Ok(t) = std::env::var("POSSYNC_ADMIN_TOKEN") {
        if !t.trim().is_empty() {
            return Ok(t.trim().to_string());
        }
    }
    let path = data_dir.join(ADMIN_TOKEN_FILE);
    let io = |source| CliError::Io {
        path: path.clone(),
        source,
    };
    match std::fs::read_to_string(&path) {
        Ok(t) if !t.trim().is_empty() => return Ok(t.trim().to_string()),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io(e)),
    }
    std::fs::create_dir_all(data_dir).map_err(|source| CliError::Io {
        path: data_dir.to_path_buf(),
        source,
    })?;
    let token = format!("adm_{}", hex::encode(rand::random::<[u8; 32]>()));
    write_private(&path, &token).map_err(io)?;
    Ok(token)
}

#[cfg(unix)]
fn write_private(path: &Path, content: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(content.as_bytes())
}

#[cfg(not(unix))]
fn write_private(path: &Path, content: &str) -> std::io::Result<()> {
    std::fs::write(path, content)
}

fn open(cli: &Cli) -> Result<Database, CliError> {
    let db = Database::connect_with(&cli.database_url(), 2, ConnectOptions::admin())?;
    db.run_migrations()?;
    Ok(db)
}

/// Runs a non-serving command (blocking; call outside the async runtime).
pub fn run_admin_command(cli: &Cli) -> Result<(), CliError> {
    match &cli.command {
        Command::Serve(_) => Err(CliError::Input("serve runs through run_serve".to_string())),
        Command::Migrate => {
            let db = Database::connect_with(&cli.database_url(), 1, ConnectOptions::admin())?;
            let applied = db.run_migrations()?;
            println!(
                "{}",
                serde_json::json!({"applied": applied, "database": redact(&cli.database_url())})
            );
            Ok(())
        }
        Command::AdminToken => {
            println!("{}", admin_token(&cli.data_dir)?);
            Ok(())
        }
        Command::Audit(AuditCommand::Verify { file }) => {
            let summary = verify_journal_file(file)?;
            println!("{summary}");
            Ok(())
        }
        Command::Audit(AuditCommand::Export { branch, from, to }) => {
            use std::io::Write;
            let db = open(cli)?;
            let mut conn = db.conn()?;
            let stdout = std::io::stdout();
            let mut out = std::io::BufWriter::new(stdout.lock());
            crate::db::journal_audit::export_journal(&mut conn, branch, *from, *to, &mut |r| {
                serde_json::to_writer(&mut out, r).map_err(std::io::Error::other)?;
                out.write_all(b"\n")
            })?;
            out.flush().map_err(|source| CliError::Io {
                path: PathBuf::from("-"),
                source,
            })?;
            Ok(())
        }
        Command::Terminal(t) => {
            let db = open(cli)?;
            let mut conn = db.conn()?;
            match t {
                TerminalCommand::Add { branch, name } => {
                    if !possync_protocol::valid_branch_id(branch) {
                        return Err(CliError::Input(format!(
                            "invalid branch id {branch:?}: must be 1-64 of [a-z0-9_-]"
                        )));
                    }
                    let issued = terminals::add_terminal(&mut conn, branch, name.as_deref())?;
                    println!("{}", json_line(&issued)?);
                }
                TerminalCommand::Import { file } => {
                    let text = std::fs::read_to_string(file).map_err(|source| CliError::Io {
                        path: file.clone(),
                        source,
                    })?;
                    let branches: Vec<String> = text
                        .lines()
                        .map(str::trim)
                        .filter(|l| !l.is_empty())
                        .map(str::to_string)
                        .collect();
                    let issued = terminals::add_terminals(&mut conn, &branches)?;
                    let mut lines = String::with_capacity(issued.len() * 160);
                    for t in &issued {
                        lines.push_str(&json_line(t)?);
                        lines.push('\n');
                    }
                    print!("{lines}");
                }
                TerminalCommand::Revoke { id } => {
                    if terminals::revoke_terminal(&mut conn, *id)? {
                        println!(
                            "{}",
                            serde_json::json!({"terminal_id": id, "revoked": true})
                        );
                    } else {
                        return Err(CliError::Input(format!(
                            "terminal {id} is unknown or already revoked"
                        )));
                    }
                }
                TerminalCommand::Rotate { id, grace_seconds } => {
                    if *grace_seconds > terminals::MAX_ROTATION_GRACE_SECS {
                        return Err(CliError::Input(format!(
                            "--grace-seconds must be at most {}",
                            terminals::MAX_ROTATION_GRACE_SECS
                        )));
                    }
                    let grace = Duration::from_secs(*grace_seconds);
                    match terminals::rotate_terminal(&mut conn, *id, Some(grace))? {
                        Some(issued) => {
                            let mut line = serde_json::to_value(&issued)
                                .map_err(|e| CliError::Input(format!("output: {e}")))?;
                            line["grace_seconds"] = (*grace_seconds).into();
                            println!("{line}");
                        }
                        None => {
                            return Err(CliError::Input(format!(
                                "terminal {id} is unknown or revoked (a revoked terminal is \
                                 retired: enroll the till as a new terminal)"
                            )))
                        }
                    }
                }
                TerminalCommand::List => {
                    for t in terminals::list_terminals(&mut conn)? {
                        println!("{}", json_line(&t)?);
                    }
                }
            }
            Ok(())
        }
        Command::Catalog(c) => {
            let db = open(cli)?;
            let mut conn = db.conn()?;
            match c {
                CatalogCommand::Import { file } => {
                    let text = std::fs::read_to_string(file).map_err(|source| CliError::Io {
                        path: file.clone(),
                        source,
                    })?;
                    let stored = catalog::import_entities(&mut conn, &parse_import(&text)?)?;
                    println!("{}", serde_json::json!({"imported": stored}));
                }
                CatalogCommand::Upsert {
                    entity_type,
                    id,
                    branch,
                    data,
                } => {
                    let data: serde_json::Value = serde_json::from_str(data)
                        .map_err(|e| CliError::Input(format!("--data is not JSON: {e}")))?;
                    let stored = catalog::upsert_entities(
                        &mut conn,
                        &[EntityWrite {
                            entity_type: entity_type.clone(),
                            id: id.clone(),
                            branch_id: branch.clone(),
                            data,
                        }],
                    )?;
                    for e in stored {
                        println!("{}", json_line(&e)?);
                    }
                }
                CatalogCommand::Purge { older_than_days } => {
                    if *older_than_days < 0 {
                        return Err(CliError::Input("--older-than-days must be >= 0".into()));
                    }
                    let n = catalog::purge_tombstones(
                        &mut conn,
                        chrono::Duration::days(*older_than_days),
                    )?;
                    println!("{}", serde_json::json!({"purged": n}));
                }
                CatalogCommand::Delete { entity_type, id } => {
                    let deleted =
                        catalog::delete_entities(&mut conn, &[(entity_type.clone(), id.clone())])?;
                    if deleted.is_empty() {
                        return Err(CliError::Input(format!(
                            "no live entity {entity_type}/{id}"
                        )));
                    }
                    for e in deleted {
                        println!("{}", json_line(&e)?);
                    }
                }
                CatalogCommand::Source(source) => run_source_command(&mut conn, source)?,
            }
            Ok(())
        }
    }
}

/// `cloud catalog source …` on an open, migrated database.
fn run_source_command(conn: &mut DbConn, cmd: &SourceCommand) -> Result<(), CliError> {
    let path = match cmd {
        SourceCommand::Check { path }
        | SourceCommand::Install { path, .. }
        | SourceCommand::Load { path }
        | SourceCommand::Uninstall { path } => path,
    };
    let mapping = SourceMapping::from_file(path)?;
    let DbConn::Pg(c) = conn else {
        return Err(SourceError::NeedsPostgres.into());
    };
    let checked = match catalog_source::inspect::check(c, &mapping) {
        Ok(checked) => checked,
        Err(SourceError::Problems(problems)) => {
            for p in &problems {
                println!("{p}");
            }
            return Err(SourceError::Problems(problems).into());
        }
        Err(e) => return Err(e.into()),
    };
    let types = checked.entities.len();
    match cmd {
        SourceCommand::Check { .. } => {
            println!("{}", serde_json::json!({"ok": true, "entities": types}));
        }
        SourceCommand::Install { no_load, .. } => {
            catalog_source::capture::install(c, &checked)?;
            println!("{}", serde_json::json!({"installed": types}));
            if !no_load {
                for r in catalog_source::load::load(c, &checked)? {
                    println!("{}", json_line(&r)?);
                }
            }
        }
        SourceCommand::Load { .. } => {
            for r in catalog_source::load::load(c, &checked)? {
                println!("{}", json_line(&r)?);
            }
        }
        SourceCommand::Uninstall { .. } => {
            catalog_source::capture::uninstall(c, &checked)?;
            println!("{}", serde_json::json!({"uninstalled": types}));
        }
    }
    Ok(())
}

fn json_line<T: serde::Serialize>(v: &T) -> Result<String, CliError> {
    serde_json::to_string(v).map_err(|e| CliError::Input(e.to_string()))
}

/// Hides a password in a database URL before printing it: the one in the userinfo
/// (`user:pass@`) and any `password=` query parameter (libpq accepts both). Only the query is
/// searched for the parameter, so a path or host that happens to contain the word is kept.
fn redact(url: &str) -> String {
    let (base, query) = crate::db::split_query(url);
    let base = match (base.find("://"), base.rfind('@')) {
        (Some(s), Some(at)) if at > s => {
            let creds = &base[s + 3..at];
            match creds.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &base[..s + 3], &base[at..]),
                None => base.to_string(),
            }
        }
        _ => base.to_string(),
    };
    match query {
        None => base,
        Some(q) => {
            let params: Vec<String> = q
                .split('&')
                .map(|p| match p.split_once('=') {
                    Some((k, _)) if k.eq_ignore_ascii_case("password") => format!("{k}=***"),
                    _ => p.to_string(),
                })
                .collect();
            format!("{base}?{}", params.join("&"))
        }
    }
}

/// Parses an import file: CSV if its first line is the header `type,id,branch_id,data`,
/// otherwise JSON lines. Blank lines are skipped; errors name the line.
pub fn parse_import(text: &str) -> Result<Vec<EntityWrite>, CliError> {
    let mut lines = text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty());
    let first = match lines.next() {
        None => return Ok(Vec::new()),
        Some(f) => f,
    };
    let header: Vec<String> = first
        .1
        .split(',')
        .map(|h| h.trim().to_ascii_lowercase())
        .collect();
    if header == ["type", "id", "branch_id", "data"] {
        lines.map(|(n, l)| parse_csv_line(n + 1, l)).collect()
    } else {
        std::iter::once(first)
            .chain(lines)
            .map(|(n, l)| parse_json_line(n + 1, l))
            .collect()
    }
}

fn parse_json_line(line_no: usize, line: &str) -> Result<EntityWrite, CliError> {
    let mut write: EntityWrite =
        serde_json::from_str(line).map_err(|e| CliError::Input(format!("line {line_no}: {e}")))?;
    write.branch_id = write.branch_id.filter(|b| !b.is_empty());
    Ok(write)
}

/// One CSV record: three plain fields, then the data field (the rest of the line, optionally
/// quoted with `""` escapes, as spreadsheets write JSON).
fn parse_csv_line(line_no: usize, line: &str) -> Result<EntityWrite, CliError> {
    let bad = |m: &str| CliError::Input(format!("line {line_no}: {m}"));
    let mut parts = line.splitn(4, ',');
    let entity_type = parts.next().unwrap_or_default().trim().to_string();
    let id = parts
        .next()
        .ok_or_else(|| bad("missing id"))?
        .trim()
        .to_string();
    let branch = parts
        .next()
        .ok_or_else(|| bad("missing branch_id"))?
        .trim()
        .to_string();
    let raw = parts.next().ok_or_else(|| bad("missing data"))?.trim();
    let data_text = if raw.len() >= 2 && raw.starts_with('"') && raw.ends_with('"') {
        raw[1..raw.len() - 1].replace("\"\"", "\"")
    } else {
        raw.to_string()
    };
    let data: serde_json::Value =
        serde_json::from_str(&data_text).map_err(|e| bad(&format!("data is not JSON: {e}")))?;
    Ok(EntityWrite {
        entity_type,
        id,
        branch_id: if branch.is_empty() {
            None
        } else {
            Some(branch)
        },
        data,
    })
}

/// Builds the serve configuration from the command line.
pub fn serve_config(cli: &Cli, args: &ServeArgs) -> Result<ServeConfig, CliError> {
    let mut config = ServeConfig::new(
        cli.database_url(),
        cli.data_dir.clone(),
        admin_token(&cli.data_dir)?,
    );
    if args.tombstone_retention_days < 0 {
        return Err(CliError::Input(
            "--tombstone-retention-days must be >= 0".into(),
        ));
    }
    config.bind = args.bind.clone();
    config.workers = args.workers;
    config.pool_size = args.pool_size.max(1);
    config.rate_limits.terminal = RateLimit {
        per_second: args.rate_per_second,
        burst: args.rate_burst,
    };
    config.rate_limits.address = RateLimit {
        per_second: args.address_rate_per_second,
        burst: args.address_rate_burst,
    };
    config.rate_limits.trusted_proxies = args
        .trusted_proxies
        .parse()
        .map_err(|e: crate::client_address::BadProxyNet| CliError::Input(e.to_string()))?;
    config.limits.manifest_max_entries = args.manifest_max_entries.max(1);
    config.limits.body_timeout = Duration::from_secs(args.body_timeout_secs.max(1));
    config.limits.snapshot_builds = args.snapshot_builds.max(1);
    config.tombstone_retention = chrono::Duration::days(args.tombstone_retention_days);
    config.purge_interval = Duration::from_secs(args.purge_interval_secs.max(1));
    config.ingest.queue_limit = args.branch_queue_limit.max(1);
    config.ingest.idle_timeout = Duration::from_secs(args.branch_idle_secs.max(1));
    config.catalog_source = args.catalog_source.clone();
    config.catalog_source_only = args.catalog_source_only;
    config.delta_from_memory = args.delta_from_memory;
    Ok(config)
}

/// `cloud serve`: runs until SIGINT/SIGTERM.
pub async fn run_serve(config: ServeConfig) -> Result<(), CliError> {
    if config.database_url.starts_with("sqlite://") {
        std::fs::create_dir_all(&config.data_dir).map_err(|source| CliError::Io {
            path: config.data_dir.clone(),
            source,
        })?;
    }
    server::run(config).await.map_err(CliError::from)
}

/// Verifies a journal export (JSON Lines of [`possync_protocol::journal_chain::AuditRecord`])
/// with [`possync_protocol::journal_chain::ChainVerifier`]; no database. The summary on success,
/// the first bad line otherwise (an unparsable line is bad too).
pub fn verify_journal_file(file: &Path) -> Result<String, CliError> {
    use possync_protocol::journal_chain::{AuditRecord, ChainVerifier};
    use std::io::BufRead;
    let io = |source| CliError::Io {
        path: file.to_path_buf(),
        source,
    };
    let reader: Box<dyn BufRead> = if file == Path::new("-") {
        Box::new(std::io::BufReader::new(std::io::stdin()))
    } else {
        Box::new(std::io::BufReader::new(
            std::fs::File::open(file).map_err(io)?,
        ))
    };
    let mut verifier = ChainVerifier::new();
    for (i, line) in reader.lines().enumerate() {
        let line = line.map_err(io)?;
        if line.trim().is_empty() {
            continue;
        }
        let record: AuditRecord = serde_json::from_str(&line).map_err(|e| CliError::Chain {
            line: i + 1,
            fault: format!("not a journal record: {e}"),
        })?;
        verifier.check(&record).map_err(|f| CliError::Chain {
            line: i + 1,
            fault: f.to_string(),
        })?;
    }
    Ok(format!("intact and gapless: {verifier}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn import_reads_json_lines() {
        let text = r#"{"type":"product","id":"p1","data":{"name":"Tea"}}

{"type":"price","id":"p1","branch_id":"b1","data":{"amount_minor":250}}"#;
        let w = parse_import(text).expect("parses");
        assert_eq!(w.len(), 2);
        assert_eq!(w[0].branch_id, None);
        assert_eq!(w[1].branch_id.as_deref(), Some("b1"));
        assert_eq!(w[1].data["amount_minor"], 250);
    }

    #[test]
    fn import_reads_csv_with_quoted_json() {
        let text = "type,id,branch_id,data\nproduct,p1,,{\"name\":\"Tea\"}\nprice,p1,b1,\"{\"\"amount_minor\"\":250, \"\"x\"\":1}\"\n";
        let w = parse_import(text).expect("parses");
        assert_eq!(w.len(), 2);
        assert_eq!(w[0].data["name"], "Tea");
        assert_eq!(w[1].branch_id.as_deref(), Some("b1"));
        assert_eq!(w[1].data["x"], 1);
    }

    #[test]
    fn import_names_the_bad_line() {
        let err = parse_import("{\"type\":\"product\",\"id\":\"p\",\"data\":{}}\nnot json")
            .err()
            .map(|e| e.to_string())
            .unwrap_or_default();
        assert!(err.starts_with("line 2:"), "{err}");
    }

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(
            redact("postgres://u:secret@h:5432/db"),
            "postgres://u:***@h:5432/db"
        );
        assert_eq!(redact("sqlite:///x/cloud.db"), "sqlite:///x/cloud.db");
        assert_eq!(
            redact("postgres://u@h/db?sslmode=require&password=s3cr%40t&application_name=x"),
            "postgres://u@h/db?sslmode=require&password=***&application_name=x"
        );
        assert_eq!(
            redact("postgresql://u:one@h/db?PASSWORD=two"),
            "postgresql://u:***@h/db?PASSWORD=***"
        );
        // An '@' inside the query does not move the userinfo boundary.
        assert_eq!(
            redact("postgres://h/db?password=a@b&user=u"),
            "postgres://h/db?password=***&user=u"
        );
        assert_eq!(
            redact("postgres://h/password=db?sslmode=disable"),
            "postgres://h/password=db?sslmode=disable"
        );
        for url in [
            "postgres://u@h/db?password=hunter2",
            "postgres://u:hunter2@h/db?password=hunter2",
            "postgres://u:hun?ter2@h/db",
            "postgres://u:hun?ter2@h/db?sslmode=require",
        ] {
            assert!(!redact(url).contains("hunter2"), "{url}");
        }
    }

    #[test]
    fn cli_parses_the_spec_command_lines() {
        let cli = Cli::try_parse_from([
            "cloud",
            "terminal",
            "add",
            "--branch",
            "b1",
            "--data-dir",
            "/tmp/x",
        ]);
        assert!(cli.is_ok());
        let cli = Cli::try_parse_from([
            "cloud",
            "serve",
            "--bind",
            "127.0.0.1:0",
            "--database-url",
            "sqlite:///tmp/c.db",
        ]);
        assert!(matches!(
            cli.map(|c| c.command),
            Ok(Command::Serve(ServeArgs { ref bind, .. })) if bind == "127.0.0.1:0"
        ));
    }

    #[test]
    fn admin_token_is_generated_once_and_reused() {
        let dir = tempfile::tempdir().expect("temp dir");
        assert!(
            std::env::var("POSSYNC_ADMIN_TOKEN").is_err(),
            "unset POSSYNC_ADMIN_TOKEN to run this test"
        );
        let a = admin_token(dir.path()).expect("generated");
        let b = admin_token(dir.path()).expect("read back");
        assert!(a.starts_with("adm_") && a.len() > 60, "{a}");
        assert_eq!(a, b);
    }
}
