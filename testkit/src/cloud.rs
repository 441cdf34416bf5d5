//! A real `cloud serve` process for tests: port 0, a temp data dir, the database of the
//! caller's choosing, and kill/restart to test crashes.
//!
//! The binary is found (in order) at `$POSSYNC_CLOUD_BIN`, or as `cloud` in the cargo target
//! profile directory of the running test executable (`target/<profile>/deps/x` →
//! `target/<profile>/cloud`). Build it first (`cargo build -p possync-cloud`); the cloud
//! crate's own tests get it built by cargo automatically.

use std::path::{Path, PathBuf};
use std::process::{Child, Command};

use anyhow::{anyhow, bail, Context as _};
use uuid::Uuid;

use crate::process::{locate_binary, spawn_announcing, terminate};

/// Environment variable naming the `cloud` binary explicitly.
pub const CLOUD_BIN_ENV: &str = "POSSYNC_CLOUD_BIN";

/// Locates the `cloud` binary (see the module doc).
pub fn cloud_binary() -> anyhow::Result<PathBuf> {
    locate_binary("cloud", CLOUD_BIN_ENV)
}

/// A running `cloud serve` child process, killed on drop.
pub struct CloudProcess {
    child: Option<Child>,
    binary: PathBuf,
    data_dir: tempfile::TempDir,
    database_url: Option<String>,
    extra_args: Vec<String>,
    /// `http://127.0.0.1:PORT`.
    pub base_url: String,
    /// The admin bearer token this process accepts.
    pub admin_token: String,
}

impl CloudProcess {
    /// Starts `cloud serve --bind 127.0.0.1:0` on `database_url` (or the embedded SQLite
    /// default under a fresh temp data dir when `None`).
    pub fn start(database_url: Option<&str>) -> anyhow::Result<CloudProcess> {
        Self::start_with(database_url, &[])
    }

    /// Like [`start`](Self::start), with extra `serve` flags (e.g. `--rate-burst 2`).
    pub fn start_with(
        database_url: Option<&str>,
        extra_args: &[&str],
    ) -> anyhow::Result<CloudProcess> {
        let binary = cloud_binary()?;
        let data_dir = tempfile::tempdir().context("creating the cloud data dir")?;
        let mut p = CloudProcess {
            child: None,
            binary,
            data_dir,
            database_url: database_url.map(str::to_string),
            extra_args: extra_args.iter().map(|s| s.to_string()).collect(),
            base_url: String::new(),
            admin_token: format!("adm_test_{}", Uuid::new_v4().simple()),
        };
        p.spawn()?;
        Ok(p)
    }

    fn command(&self) -> Command {
        let mut cmd = Command::new(&self.binary);
        cmd.arg("--data-dir").arg(self.data_dir.path());
        if let Some(url) = &self.database_url {
            cmd.arg("--database-url").arg(url);
        }
        cmd.env("POSSYNC_ADMIN_TOKEN", &self.admin_token)
            .env_remove("POSSYNC_DATABASE_URL");
        cmd
    }

    fn spawn(&mut self) -> anyhow::Result<()> {
        let mut cmd = self.command();
        cmd.args(["serve", "--bind", "127.0.0.1:0"])
            .args(&self.extra_args);
        let (child, url) = spawn_announcing(cmd, "listening on ", &self.log_path())?;
        self.base_url = url;
        self.child = Some(child);
        Ok(())
    }

    /// Where the child's stderr (JSON logs) goes.
    pub fn log_path(&self) -> PathBuf {
        self.data_dir.path().join("cloud.log")
    }

    /// The data dir this process uses.
    pub fn data_dir(&self) -> &Path {
        self.data_dir.path()
    }

    /// The database URL this process was started with (`None`: embedded default).
    pub fn database_url(&self) -> Option<&str> {
        self.database_url.as_deref()
    }

    /// `base_url` + `path`.
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base_url)
    }

    /// Runs a `cloud` admin command on the same database and data dir; returns stdout.
    pub fn cli(&self, args: &[&str]) -> anyhow::Result<String> {
        run_cli(self.command(), args)
    }

    /// Enrolls a terminal for `branch` via `cloud terminal add`; returns `(terminal_id, token)`.
    pub fn add_terminal(&self, branch: &str) -> anyhow::Result<(Uuid, String)> {
        added_terminal(&self.cli(&["terminal", "add", "--branch", branch])?)
    }

    /// Issues a new token for a terminal via `cloud terminal rotate` (old token refused after
    /// `grace_seconds`); returns the new token.
    pub fn rotate_terminal(&self, terminal_id: Uuid, grace_seconds: u64) -> anyhow::Result<String> {
        let out = self.cli(&[
            "terminal",
            "rotate",
            &terminal_id.to_string(),
            "--grace-seconds",
            &grace_seconds.to_string(),
        ])?;
        let v: serde_json::Value =
            serde_json::from_str(out.trim()).with_context(|| format!("parsing {out:?}"))?;
        if v["terminal_id"].as_str() != Some(terminal_id.to_string().as_str()) {
            bail!("rotate answered for another terminal: {out:?}");
        }
        Ok(v["token"]
            .as_str()
            .ok_or_else(|| anyhow!("no token in {out:?}"))?
            .to_string())
    }

    /// Revokes a terminal via `cloud terminal revoke`.
    pub fn revoke_terminal(&self, terminal_id: Uuid) -> anyhow::Result<()> {
        self.cli(&["terminal", "revoke", &terminal_id.to_string()])
            .map(|_| ())
    }

    /// The child's process id, if running.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Kills the process abruptly (SIGKILL, like `kill -9`) and reaps it.
    pub fn kill(&mut self) -> anyhow::Result<()> {
        if let Some(mut child) = self.child.take() {
            child.kill().context("killing cloud")?;
            child.wait().context("reaping cloud")?;
        }
        Ok(())
    }

    /// Asks the process to stop (SIGTERM) and waits for it to exit.
    pub fn terminate(&mut self) -> anyhow::Result<std::process::ExitStatus> {
        let mut child = self
            .child
            .take()
            .ok_or_else(|| anyhow!("cloud is not running"))?;
        terminate(&mut child)
    }

    /// Kills the process (if running) and starts it again on the same database and data dir.
    /// The port changes; read `base_url` again.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.kill()?;
        self.spawn()
    }
}

/// Runs `cmd ARGS` (a `cloud` command already pointed at its database) to completion; returns
/// stdout, or an error carrying stderr.
pub(crate) fn run_cli(mut cmd: Command, args: &[&str]) -> anyhow::Result<String> {
    let out = cmd
        .args(args)
        .output()
        .with_context(|| format!("running cloud {args:?}"))?;
    if !out.status.success() {
        bail!(
            "cloud {args:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The `cloud` admin commands run against one database directly (no server involved): what
/// an operator runs on a deployment's host.
#[derive(Debug, Clone)]
pub struct CloudCli {
    /// The `cloud` binary.
    pub binary: PathBuf,
    /// Its `--data-dir`.
    pub data_dir: PathBuf,
    /// The deployment's database.
    pub database_url: String,
    /// The admin token (set as `POSSYNC_ADMIN_TOKEN`).
    pub admin_token: String,
}

impl CloudCli {
    /// Runs `cloud ARGS`; returns stdout.
    pub fn run(&self, args: &[&str]) -> anyhow::Result<String> {
        let mut cmd = Command::new(&self.binary);
        cmd.arg("--data-dir")
            .arg(&self.data_dir)
            .arg("--database-url")
            .arg(&self.database_url)
            .env("POSSYNC_ADMIN_TOKEN", &self.admin_token)
            .env_remove("POSSYNC_DATABASE_URL");
        run_cli(cmd, args)
    }

    /// Enrolls a terminal for `branch`; returns `(terminal_id, token)`.
    pub fn add_terminal(&self, branch: &str) -> anyhow::Result<(Uuid, String)> {
        added_terminal(&self.run(&["terminal", "add", "--branch", branch])?)
    }

    /// Enrolls one terminal per entry of `branches` in one transaction (`cloud terminal
    /// import`); returns `(terminal_id, token)` in the same order.
    pub fn add_terminals(&self, branches: &[String]) -> anyhow::Result<Vec<(Uuid, String)>> {
        let file = tempfile::NamedTempFile::new().context("temp file of branch ids")?;
        std::fs::write(file.path(), branches.join("\n")).context("writing branch ids")?;
        let path = file.path().to_string_lossy().into_owned();
        let out = self.run(&["terminal", "import", &path])?;
        let issued = out
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(added_terminal)
            .collect::<anyhow::Result<Vec<_>>>()?;
        if issued.len() != branches.len() {
            bail!(
                "cloud terminal import enrolled {} terminals for {} branch ids",
                issued.len(),
                branches.len()
            );
        }
        Ok(issued)
    }
}

/// `(terminal_id, token)` from what `cloud terminal add` printed.
pub(crate) fn added_terminal(out: &str) -> anyhow::Result<(Uuid, String)> {
    let v: serde_json::Value =
        serde_json::from_str(out.trim()).with_context(|| format!("parsing {out:?}"))?;
    let id = v["terminal_id"]
        .as_str()
        .and_then(|s| Uuid::parse_str(s).ok())
        .ok_or_else(|| anyhow!("no terminal_id in {out:?}"))?;
    let token = v["token"]
        .as_str()
        .ok_or_else(|| anyhow!("no token in {out:?}"))?
        .to_string();
    Ok((id, token))
}

impl Drop for CloudProcess {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
