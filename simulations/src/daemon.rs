//! Child processes that announce their address on stdout (`listening on http://…`,
//! `status on http://…`), as `cloud serve` and `terminal run` do.
//!
//! The harness reads the announcement to learn the port (everything binds port 0, so runs
//! never collide), then keeps copying the child's output into a log file in the run
//! directory: when a run fails, those files say why.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, Command};

use possync_testkit::process::locate_binary;

use crate::SimError;

/// How long a child may take to announce its address.
const ANNOUNCE_TIMEOUT: Duration = Duration::from_secs(60);

/// A running child and the URL it announced.
pub struct Daemon {
    /// Name used in logs and errors (`cloud-0`, `terminal-3`).
    pub name: String,
    /// The URL the child announced.
    pub url: String,
    child: Child,
}

impl Daemon {
    /// Starts `bin args…` with `env`, waits for a stdout line starting with `announce`
    /// (e.g. `"listening on "`) and returns the URL that follows it. stdout and stderr are
    /// appended to `log`.
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
        let log_file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .map_err(|e| fail(format!("log {}: {e}", log.display())))?;
        let mut cmd = Command::new(bin);
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log_file))
            .kill_on_drop(true);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd
            .spawn()
            .map_err(|e| fail(format!("spawn {}: {e}", bin.display())))?;
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| fail("no stdout pipe".into()))?;
        let mut lines = BufReader::new(stdout).lines();
        let mut out = tokio::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .await
            .map_err(|e| fail(format!("log {}: {e}", log.display())))?;
        let found = tokio::time::timeout(ANNOUNCE_TIMEOUT, async {
            while let Ok(Some(line)) = lines.next_line().await {
                let _ = out.write_all(format!("{line}\n").as_bytes()).await;
                if let Some(pos) = line.find(announce) {
                    return Some(line[pos + announce.len()..].trim().to_string());
                }
            }
            None
        })
        .await;
        let url = match found {
            Ok(Some(url)) => url,
            Ok(None) => {
                let status = child.wait().await.ok();
                return Err(fail(format!(
                    "exited ({status:?}) without announcing `{announce}`; see {}",
                    log.display()
                )));
            }
            Err(_) => {
                let _ = child.start_kill();
                return Err(fail(format!(
                    "did not announce `{announce}` within {ANNOUNCE_TIMEOUT:?}; see {}",
                    log.display()
                )));
            }
        };
        // Keep draining stdout so the child never blocks on a full pipe.
        tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                let _ = out.write_all(format!("{line}\n").as_bytes()).await;
            }
        });
        Ok(Daemon {
            name: name.to_string(),
            url,
            child,
        })
    }

    /// kill -9, then reap. No shutdown hook runs: this is the crash the fault schedule asks for.
    pub async fn kill9(mut self) {
        let _ = self.child.start_kill();
        let _ = self.child.wait().await;
    }

    /// OS process id, for logs.
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
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
