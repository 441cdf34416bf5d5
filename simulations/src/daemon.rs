//! Child processes that announce their address on stdout (`listening on http://…`,
//! `status on http://…`), as `cloud serve` and `terminal run` do.
//!
//! Starting one and reading its announcement is [`possync_testkit::process::spawn_announcing`]
//! (everything binds port 0, so runs never collide); the child's stderr goes into a log file
//! in the run directory: when a run fails, those files say why.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::process::Command;

use possync_testkit::process::{locate_binary, spawn_announcing};

use crate::SimError;

/// A running child and the URL it announced; killed (SIGKILL) and reaped on drop.
pub struct Daemon {
    /// Name used in logs and errors (`cloud-0`, `terminal-3`).
    pub name: String,
    /// The URL the child announced.
    pub url: String,
    child: std::process::Child,
}

impl Daemon {
    /// Starts `bin args…` with `env`, waits for a stdout line starting with `announce`
    /// (e.g. `"listening on "`) and returns the URL that follows it. stderr is appended to
    /// `log`.
    pub async fn spawn(
        name: &str,
        bin: &Path,
        args: &[String],
        env: &[(String, String)],
        announce: &str,
        log: &Path,
    ) -> Result<Daemon, SimError> {
        let fail = |message: String| SimError::Process {
            name: name.to_string(),
            message,
        };
        let mut cmd = std::process::Command::new(bin);
        cmd.args(args).envs(env.iter().map(|(k, v)| (k, v)));
        let announce = announce.to_string();
        let log = log.to_path_buf();
        // Waiting for the announcement blocks a thread; keep it off the runtime's workers.
        let (child, url) =
            tokio::task::spawn_blocking(move || spawn_announcing(cmd, &announce, &log))
                .await
                .map_err(|e| fail(e.to_string()))?
                .map_err(|e| fail(format!("{e:#}")))?;
        Ok(Daemon {
            name: name.to_string(),
            url,
            child,
        })
    }

    /// kill -9, then reap. No shutdown hook runs: this is the crash the fault schedule asks for.
    pub async fn kill9(self) {
        // Dropping kills and reaps; reaping blocks, so it runs off the runtime's workers.
        let _ = tokio::task::spawn_blocking(move || drop(self)).await;
    }

    /// OS process id, for logs.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs a short command (`cloud terminal add`, `terminal enroll`, …) to completion and
/// returns its stdout; a non-zero exit is an error carrying its stderr.
pub async fn run_command(
    bin: &Path,
    args: &[String],
    env: &[(String, String)],
) -> Result<String, SimError> {
    let mut cmd = Command::new(bin);
    cmd.args(args).stdin(Stdio::null()).kill_on_drop(true);
    for (k, v) in env {
        cmd.env(k, v);
    }
    let shown = format!("{} {}", bin.display(), args.join(" "));
    let out = tokio::time::timeout(Duration::from_secs(120), cmd.output())
        .await
        .map_err(|_| SimError::Timeout(shown.clone()))?
        .map_err(|e| SimError::Command {
            command: shown.clone(),
            message: e.to_string(),
        })?;
    if !out.status.success() {
        return Err(SimError::Command {
            command: shown,
            message: format!(
                "{}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The production binaries the run starts.
#[derive(Debug, Clone)]
pub struct Binaries {
    /// The `cloud` binary.
    pub cloud: PathBuf,
    /// The `terminal` binary.
    pub terminal: PathBuf,
}

impl Binaries {
    /// `POSSYNC_CLOUD_BIN` / `POSSYNC_TERMINAL_BIN` if set, else `cloud` and `terminal` in
    /// the cargo profile directory the running executable was built into (see
    /// [`possync_testkit::process::locate_binary`]).
    pub fn locate() -> Result<Binaries, SimError> {
        let find = |name: &str, var: &str| {
            locate_binary(name, var).map_err(|e| SimError::MissingBinary(format!("{e:#}")))
        };
        Ok(Binaries {
            cloud: find("cloud", "POSSYNC_CLOUD_BIN")?,
            terminal: find("terminal", "POSSYNC_TERMINAL_BIN")?,
        })
    }
}
