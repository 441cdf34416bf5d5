//! The fleet deployment for tests: `scripts/cluster` (nginx terminating TLS with a local CA,
//! load-balancing over N `cloud serve` processes on one PostgreSQL database) started in a
//! temp directory, so tests run exactly what an operator runs.
//!
//! nginx and openssl must be installed (`scripts/setup` installs them): a missing one fails the
//! test with a message saying so — the script is told not to install anything itself.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context as _};
use serde::Deserialize;
use uuid::Uuid;

use crate::cloud::{cloud_binary, CloudCli};

/// `scripts/cluster` of this repository.
pub fn cluster_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/cluster")
}

/// What `scripts/cluster` wrote to `DIR/cluster.json`.
#[derive(Debug, Clone, Deserialize)]
struct Description {
    url: String,
    ca_cert: PathBuf,
    database_url: String,
    admin_token: String,
    instances: Vec<u16>,
}

/// A running cluster; stopped (nginx and every instance) on drop.
pub struct Cluster {
    dir: tempfile::TempDir,
    /// Given to every `cloud serve`, also when an instance is started again.
    env: Vec<(String, String)>,
    /// The admin commands on the cluster's database.
    pub admin: CloudCli,
    /// `https://localhost:PORT` (nginx).
    pub url: String,
    /// The local CA's certificate (PEM) that signed nginx's certificate.
    pub ca_cert: PathBuf,
    /// The one database every instance uses.
    pub database_url: String,
    /// The admin token every instance accepts.
    pub admin_token: String,
    /// Each instance's plain-HTTP port on 127.0.0.1 (behind nginx).
    pub instance_ports: Vec<u16>,
}

/// Fails loudly if `tool` is not installed (PATH or /usr/sbin, where Debian puts nginx).
fn require_tool(tool: &str) -> anyhow::Result<()> {
    let on_path = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
        .unwrap_or(false);
    if on_path || Path::new("/usr/sbin").join(tool).is_file() {
        Ok(())
    } else {
        bail!("{tool} is not installed: run scripts/setup (Debian package {tool}); the fleet tests need it")
    }
}

impl Cluster {
    /// Starts `instances` clouds on `database_url` (which must exist; the script migrates it)
    /// behind nginx, and waits until each answers `/readyz` and nginx answers over TLS.
    /// `env` goes to every `cloud serve` (e.g. `POSSYNC_RATE_PER_SECOND`).
    pub fn start(
        instances: usize,
        database_url: &str,
        env: &[(&str, &str)],
    ) -> anyhow::Result<Cluster> {
        require_tool("nginx")?;
        require_tool("openssl")?;
        let binary = cloud_binary()?;
        let dir = tempfile::tempdir().context("creating the cluster dir")?;
        let out = Command::new(cluster_script())
            .args(["start", "--instances", &instances.to_string()])
            .args(["--database-url", database_url])
            .arg("--dir")
            .arg(dir.path())
            .env("POSSYNC_CLOUD_BIN", &binary)
            .env("POSSYNC_CLUSTER_NO_SETUP", "1")
            .env_remove("POSSYNC_ADMIN_TOKEN")
            .envs(env.iter().copied())
            .output()
            .context("running scripts/cluster")?;
        if !out.status.success() {
            bail!(
                "scripts/cluster start failed ({}): {}{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let path = dir.path().join("cluster.json");
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("reading {}", path.display()))?;
        let d: Description =
            serde_json::from_str(&text).with_context(|| format!("parsing {text}"))?;
        Ok(Cluster {
            admin: CloudCli {
                binary,
                data_dir: dir.path().to_path_buf(),
                database_url: d.database_url.clone(),
                admin_token: d.admin_token.clone(),
            },
            dir,
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            url: d.url,
            ca_cert: d.ca_cert,
            database_url: d.database_url,
            admin_token: d.admin_token,
            instance_ports: d.instances,
        })
    }

    fn script(&self, args: &[&str]) -> anyhow::Result<()> {
        let out = Command::new(cluster_script())
            .args(args)
            .arg("--dir")
            .arg(self.dir.path())
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .output()
            .with_context(|| format!("running scripts/cluster {args:?}"))?;
        if !out.status.success() {
            bail!(
                "scripts/cluster {args:?} failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }

    /// `kill -9` of instance `i` (nginx routes around it).
    pub fn kill_instance(&self, i: usize) -> anyhow::Result<()> {
        self.script(&["kill-instance", &i.to_string()])
    }

    /// Starts instance `i` again on its port and waits for its `/readyz`.
    pub fn start_instance(&self, i: usize) -> anyhow::Result<()> {
        self.script(&["start-instance", &i.to_string()])
    }

    /// Instance `i`'s own base URL (plain HTTP, bypassing nginx).
    pub fn instance_url(&self, i: usize) -> String {
        format!("http://127.0.0.1:{}", self.instance_ports[i])
    }

    /// Where the cluster keeps its config, certificates and logs.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Runs a `cloud` admin command on the cluster's database; returns stdout.
    pub fn cli(&self, args: &[&str]) -> anyhow::Result<String> {
        self.admin.run(args)
    }

    /// Enrolls a terminal for `branch`; returns `(terminal_id, token)`.
    pub fn add_terminal(&self, branch: &str) -> anyhow::Result<(Uuid, String)> {
        self.admin.add_terminal(branch)
    }

    /// The process id of instance `i`, while it runs.
    pub fn instance_pid(&self, i: usize) -> Option<u32> {
        std::fs::read_to_string(self.dir.path().join(format!("cloud-{i}/pid")))
            .ok()
            .and_then(|s| s.trim().parse().ok())
    }

    /// An HTTPS client trusting the cluster's CA (what a terminal enrolled with
    /// `--ca-cert` uses).
    pub fn https_client(&self) -> anyhow::Result<reqwest::Client> {
        let pem = std::fs::read(&self.ca_cert)
            .with_context(|| format!("reading {}", self.ca_cert.display()))?;
        let ca = reqwest::Certificate::from_pem(&pem).context("parsing the cluster CA")?;
        reqwest::Client::builder()
            .add_root_certificate(ca)
            .build()
            .context("building the HTTPS client")
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if let Err(e) = self.script(&["stop"]) {
            eprintln!("stopping the cluster: {e}");
        }
    }
}
