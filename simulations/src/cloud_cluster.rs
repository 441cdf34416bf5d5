//! The cloud side of a run: a fresh PostgreSQL database, K `cloud serve` processes sharing it,
//! and the cloud's own CLI for enrolling terminals and changing the catalog.
//!
//! Instances are killed with SIGKILL and restarted on the same database (a new port each
//! time); the shared [`Upstreams`] tells every proxy which instances are live.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use diesel::{Connection, PgConnection, RunQueryDsl};
use serde::Deserialize;

use crate::daemon::{run_command, Daemon};
use crate::proxy::Upstreams;
use crate::SimError;

/// Default server for the run's fresh database.
pub const DEFAULT_PG_SERVER: &str = "postgres://postgres@127.0.0.1:5432";

/// A database created for one run, dropped again by [`RunDatabase::drop_database`].
#[derive(Debug, Clone)]
pub struct RunDatabase {
    /// URL the cloud uses.
    pub url: String,
    /// Set when the run created the database (and may drop it).
    created: Option<(String, String)>,
}

impl RunDatabase {
    /// Creates (dropping any leftover of the same name) database `name` on `server`
    /// (`postgres://user@host:port`). Fails loudly if PostgreSQL is unreachable.
    pub async fn create_fresh(server: &str, name: &str) -> Result<RunDatabase, SimError> {
        let admin = format!("{}/postgres", server.trim_end_matches('/'));
        let n = name.to_string();
        let a = admin.clone();
        tokio::task::spawn_blocking(move || -> Result<(), SimError> {
            let mut c = PgConnection::establish(&a).map_err(|e| {
                SimError::Postgres(format!("cannot reach {a}: {e} (is PostgreSQL running?)"))
            })?;
            drop_if_exists(&mut c, &n)?;
            diesel::sql_query(format!("CREATE DATABASE \"{n}\""))
                .execute(&mut c)
                .map_err(|e| SimError::Postgres(format!("create {n}: {e}")))?;
            Ok(())
        })
        .await
        .map_err(|e| SimError::Postgres(e.to_string()))??;
        Ok(RunDatabase {
            url: format!("{}/{name}", server.trim_end_matches('/')),
            created: Some((admin, name.to_string())),
        })
    }

    /// Uses an existing database as is (the caller vouches that it is fresh).
    pub fn existing(url: &str) -> RunDatabase {
        RunDatabase {
            url: url.to_string(),
            created: None,
        }
    }

    /// Drops the database if this run created it.
    pub async fn drop_database(&self) -> Result<(), SimError> {
        let Some((admin, name)) = self.created.clone() else {
            return Ok(());
        };
        tokio::task::spawn_blocking(move || -> Result<(), SimError> {
            let mut c = PgConnection::establish(&admin)
                .map_err(|e| SimError::Postgres(format!("cannot reach {admin}: {e}")))?;
            drop_if_exists(&mut c, &name)
        })
        .await
        .map_err(|e| SimError::Postgres(e.to_string()))?
    }
}

/// `DROP DATABASE IF EXISTS name WITH (FORCE)`: clears a leftover before a run and removes the
/// run's database after it, disconnecting any cloud still attached.
fn drop_if_exists(c: &mut PgConnection, name: &str) -> Result<(), SimError> {
    diesel::sql_query(format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"))
        .execute(c)
        .map_err(|e| SimError::Postgres(format!("drop {name}: {e}")))?;
    Ok(())
}

/// What `cloud terminal add` prints.
#[derive(Debug, Clone, Deserialize, serde::Serialize)]
pub struct Enrollment {
    /// Cloud-issued terminal id (UUID).
    pub terminal_id: String,
    /// The branch the terminal belongs to.
    pub branch_id: String,
    /// Bearer token for `/v1/pos/*` (shown once by the CLI).
    pub token: String,
}

/// K cloud processes on one database.
pub struct CloudCluster {
    bin: PathBuf,
    db_url: String,
    run_dir: PathBuf,
    admin_token: String,
    instances: Vec<Option<Daemon>>,
    upstreams: Arc<Upstreams>,
    restarts: u32,
    extra_env: Vec<(String, String)>,
    admin: reqwest::Client,
}

impl CloudCluster {
    /// Starts `instances` `cloud serve` processes on `db_url`; their logs and data dirs go
    /// under `run_dir`. The first one runs the migrations before the others start.
    pub async fn start(
        bin: &Path,
        db_url: &str,
        run_dir: &Path,
        instances: usize,
        extra_env: Vec<(String, String)>,
    ) -> Result<CloudCluster, SimError> {
        let mut cluster = CloudCluster {
            bin: bin.to_path_buf(),
            db_url: db_url.to_string(),
            run_dir: run_dir.to_path_buf(),
            admin_token: format!("sim-admin-{}", uuid::Uuid::new_v4().simple()),
            instances: (0..instances.max(1)).map(|_| None).collect(),
            upstreams: Upstreams::new(instances.max(1)),
            restarts: 0,
            extra_env,
            admin: reqwest::Client::builder()
                .no_proxy()
                .timeout(Duration::from_secs(10))
                .build()
                .map_err(|e| SimError::Http(e.to_string()))?,
        };
        for i in 0..cluster.instances.len() {
            cluster.start_instance(i).await?;
        }
        Ok(cluster)
    }

    /// The live-instance list every proxy forwards to.
    pub fn upstreams(&self) -> Arc<Upstreams> {
        self.upstreams.clone()
    }

    /// The admin token the instances accept (`POSSYNC_ADMIN_TOKEN`).
    pub fn admin_token(&self) -> &str {
        &self.admin_token
    }

    /// URL of some live instance (for the harness's own, fault-free, calls).
    pub fn any_url(&self) -> Option<String> {
        self.instances
            .iter()
            .flatten()
            .map(|d| d.url.clone())
            .next()
    }

    /// Number of instances.
    pub fn len(&self) -> usize {
        self.instances.len()
    }

    /// Whether the cluster has no instances (never, after `start`).
    pub fn is_empty(&self) -> bool {
        self.instances.is_empty()
    }

    /// How many kill-and-restart cycles happened.
    pub fn restarts(&self) -> u32 {
        self.restarts
    }

    fn env(&self) -> Vec<(String, String)> {
        let mut env = vec![
            ("POSSYNC_ADMIN_TOKEN".to_string(), self.admin_token.clone()),
            ("RUST_LOG".to_string(), "warn".to_string()),
        ];
        env.extend(self.extra_env.iter().cloned());
        env
    }

    async fn start_instance(&mut self, i: usize) -> Result<(), SimError> {
        let data_dir = self.run_dir.join(format!("cloud-{i}"));
        std::fs::create_dir_all(&data_dir).map_err(|e| SimError::Io(e.to_string()))?;
        let args: Vec<String> = [
            "serve",
            "--bind",
            "127.0.0.1:0",
            "--database-url",
            &self.db_url,
            "--data-dir",
            &data_dir.to_string_lossy(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let log = self.run_dir.join(format!("cloud-{i}.log"));
        let d = Daemon::spawn(
            &format!("cloud-{i}"),
            &self.bin,
            &args,
            &self.env(),
            "listening on ",
            &log,
        )
        .await?;
        wait_healthy(&d.url).await?;
        tracing::info!(instance = i, url = %d.url, pid = ?d.pid(), "cloud instance up");
        self.upstreams.set(i, Some(d.url.clone()));
        self.instances[i] = Some(d);
        Ok(())
    }

    /// kill -9 instance `i` (while requests are in flight: some die mid-commit), leave it
    /// down for `down_for`, then start it again on the same database.
    pub async fn kill_and_restart(&mut self, i: usize, down_for: Duration) -> Result<(), SimError> {
        let i = i % self.instances.len();
        self.upstreams.set(i, None);
        if let Some(d) = self.instances[i].take() {
            tracing::warn!(instance = i, pid = ?d.pid(), "fault: kill -9 cloud instance");
            d.kill9().await;
        }
        tokio::time::sleep(down_for).await;
        self.start_instance(i).await?;
        self.restarts += 1;
        Ok(())
    }

    /// `cloud terminal add --branch B`.
    pub async fn add_terminal(&self, branch: &str) -> Result<Enrollment, SimError> {
        let out = run_command(
            &self.bin,
            &self.cli_args(&["terminal", "add", "--branch", branch]),
            &self.env(),
        )
        .await?;
        parse_last_json(&out).ok_or_else(|| SimError::Command {
            command: "cloud terminal add".into(),
            message: format!("no enrollment JSON in output: {out}"),
        })
    }

    /// `cloud catalog upsert --type T --id I [--branch B] --data JSON`.
    pub async fn catalog_upsert(
        &self,
        entity_type: &str,
        id: &str,
        branch: Option<&str>,
        data: &serde_json::Value,
    ) -> Result<(), SimError> {
        let data = data.to_string();
        let mut a = vec!["catalog", "upsert", "--type", entity_type, "--id", id];
        if let Some(b) = branch {
            a.extend(["--branch", b]);
        }
        a.extend(["--data", &data]);
        run_command(&self.bin, &self.cli_args(&a), &self.env()).await?;
        Ok(())
    }

    /// `cloud catalog delete --type T --id I`.
    pub async fn catalog_delete(&self, entity_type: &str, id: &str) -> Result<(), SimError> {
        run_command(
            &self.bin,
            &self.cli_args(&["catalog", "delete", "--type", entity_type, "--id", id]),
            &self.env(),
        )
        .await?;
        Ok(())
    }

    /// A handle on the admin HTTP API that needs no lock on the cluster (so catalog changes
    /// continue while an instance is being restarted).
    pub fn admin(&self) -> CatalogAdmin {
        CatalogAdmin {
            client: self.admin.clone(),
            upstreams: self.upstreams.clone(),
            token: self.admin_token.clone(),
        }
    }

    /// `cloud catalog import FILE`.
    pub async fn catalog_import(&self, file: &Path) -> Result<(), SimError> {
        let f = file.to_string_lossy().to_string();
        run_command(
            &self.bin,
            &self.cli_args(&["catalog", "import", &f]),
            &self.env(),
        )
        .await?;
        Ok(())
    }

    /// `cloud audit export --branch B`: the branch's journal as JSON Lines.
    pub async fn audit_export(&self, branch: &str) -> Result<String, SimError> {
        run_command(
            &self.bin,
            &self.cli_args(&["audit", "export", "--branch", branch]),
            &self.env(),
        )
        .await
    }

    fn cli_args(&self, a: &[&str]) -> Vec<String> {
        let mut v: Vec<String> = a.iter().map(|s| s.to_string()).collect();
        v.push("--database-url".into());
        v.push(self.db_url.clone());
        v
    }

    /// Stops every instance.
    pub async fn shutdown(&mut self) {
        for (i, slot) in self.instances.iter_mut().enumerate() {
            self.upstreams.set(i, None);
            if let Some(d) = slot.take() {
                d.kill9().await;
            }
        }
    }
}

/// The admin routes of whichever instance is live.
#[derive(Clone)]
pub struct CatalogAdmin {
    client: reqwest::Client,
    upstreams: Arc<Upstreams>,
    token: String,
}

impl CatalogAdmin {
    /// `POST /v1/admin/catalog/upsert` (one entity) on a live instance, with the admin token.
    pub async fn admin_upsert(
        &self,
        entity_type: &str,
        id: &str,
        branch: Option<&str>,
        data: &serde_json::Value,
    ) -> Result<(), SimError> {
        let body = serde_json::json!({"entities": [{"type": entity_type, "id": id,
            "branch_id": branch, "data": data}]});
        self.admin_post("/v1/admin/catalog/upsert", &body).await
    }

    /// `POST /v1/admin/catalog/delete` (one entity) on a live instance.
    pub async fn admin_delete(&self, entity_type: &str, id: &str) -> Result<(), SimError> {
        let body = serde_json::json!({"entities": [{"type": entity_type, "id": id}]});
        self.admin_post("/v1/admin/catalog/delete", &body).await
    }

    async fn admin_post(&self, path: &str, body: &serde_json::Value) -> Result<(), SimError> {
        let base = self
            .upstreams
            .pick()
            .ok_or_else(|| SimError::Http("no live cloud instance".into()))?;
        let r = self
            .client
            .post(format!("{base}{path}"))
            .bearer_auth(&self.token)
            .json(body)
            .send()
            .await
            .map_err(|e| SimError::Http(format!("POST {path}: {e}")))?;
        if !r.status().is_success() {
            let status = r.status();
            let text = r.text().await.unwrap_or_default();
            return Err(SimError::Http(format!("POST {path}: {status}: {text}")));
        }
        Ok(())
    }
}

/// The last line of `out` that parses as JSON of type `T` (CLIs may log before it).
fn parse_last_json<T: serde::de::DeserializeOwned>(out: &str) -> Option<T> {
    if let Ok(v) = serde_json::from_str(out.trim()) {
        return Some(v);
    }
    out.lines()
        .rev()
        .find_map(|l| serde_json::from_str(l.trim()).ok())
}

/// Polls `GET /healthz` until it answers 200 (at most 30 s).
async fn wait_healthy(url: &str) -> Result<(), SimError> {
    let client = reqwest::Client::new();
    for _ in 0..300 {
        if let Ok(r) = client.get(format!("{url}/healthz")).send().await {
            if r.status().is_success() {
                return Ok(());
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Err(SimError::Timeout(format!(
        "{url}/healthz never answered 200"
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn enrollment_json_is_found_after_log_lines() {
        let out =
            "migrations applied\n{\"terminal_id\":\"t\",\"branch_id\":\"b0\",\"token\":\"x\"}\n";
        let e: Enrollment = parse_last_json(out).expect("json");
        assert_eq!(e.branch_id, "b0");
        assert!(parse_last_json::<Enrollment>("nothing").is_none());
    }
}
