//! The real `terminal` binary, run the way a shop runs it: `terminal enroll`, then
//! `terminal run` as a child process whose `/status` the benchmark polls and whose memory it
//! reads from `/proc`.
//!
//! Why a child process rather than the engine in-process: the figures are meant to be the
//! daemon's — its HTTP client, its actors, its allocator — and peak RSS is only meaningful
//! for a process that holds nothing but the terminal.

use std::path::{Path, PathBuf};
use std::process::{Child, Command};

use anyhow::{anyhow, bail, Context as _};
use possync_testkit::process::{locate_binary, spawn_announcing};

/// Environment variable naming the `terminal` binary explicitly.
pub const TERMINAL_BIN_ENV: &str = "POSSYNC_TERMINAL_BIN";

/// `$POSSYNC_TERMINAL_BIN`, else `terminal` in the cargo profile directory this executable
/// was built into (both are built into the same one).
pub fn terminal_binary() -> anyhow::Result<PathBuf> {
    locate_binary("terminal", TERMINAL_BIN_ENV)
}

/// Runs `terminal enroll` against the cloud for the given identity.
pub fn enroll(
    data_dir: &Path,
    cloud_url: &str,
    terminal_id: uuid::Uuid,
    token: &str,
    branch: &str,
) -> anyhow::Result<()> {
    let out = Command::new(terminal_binary()?)
        .arg("--data-dir")
        .arg(data_dir)
        .args(["enroll", "--cloud-url", cloud_url, "--token", token])
        .args([
            "--terminal-id",
            &terminal_id.to_string(),
            "--branch",
            branch,
        ])
        .env("POSSYNC_LOG", "warn")
        .output()
        .context("running terminal enroll")?;
    if !out.status.success() {
        bail!(
            "terminal enroll failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// A running `terminal run`, killed on drop.
pub struct Daemon {
    child: Child,
    /// `http://127.0.0.1:PORT` of its status endpoint.
    pub url: String,
    /// The local API token its `POST` routes need.
    pub token: String,
}

impl Daemon {
    /// Starts `terminal run --status-bind 127.0.0.1:0` on `data_dir` with its default tuning
    /// and the log level of the environment (`POSSYNC_LOG`/`RUST_LOG`; the daemon's own default
    /// is `info`), logging into `daemon.log` in the data dir, and waits for its `status on` line.
    pub fn start(data_dir: &Path) -> anyhow::Result<Daemon> {
        Self::start_with(data_dir, &[])
    }

    /// [`Daemon::start`] with further `terminal run` arguments (e.g. `--catalog-encoding`).
    pub fn start_with(data_dir: &Path, run_args: &[&str]) -> anyhow::Result<Daemon> {
        let mut cmd = Command::new(terminal_binary()?);
        cmd.arg("--data-dir")
            .arg(data_dir)
            .args(["run", "--status-bind", "127.0.0.1:0"])
            .args(run_args);
        let (child, url) = spawn_announcing(cmd, "status on ", &data_dir.join("daemon.log"))?;
        let token = possync_terminal::data_dir::local_token(data_dir)?;
        Ok(Daemon { child, url, token })
    }

    /// The daemon's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Its memory figures now.
    pub fn memory(&self) -> anyhow::Result<Memory> {
        let path = format!("/proc/{}/status", self.pid());
        let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
        Memory::parse(&text).ok_or_else(|| anyhow!("no VmHWM/VmRSS in {path}"))
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Resident memory of a process, from `/proc/<pid>/status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Memory {
    /// `VmHWM`: peak resident set size so far, in KiB.
    pub peak_kib: u64,
    /// `VmRSS`: resident set size now, in KiB.
    pub current_kib: u64,
}

impl Memory {
    /// Reads `VmHWM` and `VmRSS` out of a `/proc/<pid>/status` text.
    pub fn parse(status: &str) -> Option<Memory> {
        let field = |name: &str| {
            status.lines().find_map(|l| {
                l.strip_prefix(name)?
                    .trim()
                    .strip_suffix("kB")?
                    .trim()
                    .parse::<u64>()
                    .ok()
            })
        };
        Some(Memory {
            peak_kib: field("VmHWM:")?,
            current_kib: field("VmRSS:")?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_is_read_from_proc_status_text() {
        let text =
            "Name:\tterminal\nVmPeak:\t  900000 kB\nVmHWM:\t   41234 kB\nVmRSS:\t   39000 kB\n";
        assert_eq!(
            Memory::parse(text),
            Some(Memory {
                peak_kib: 41234,
                current_kib: 39000
            })
        );
        assert_eq!(Memory::parse("Name:\tx\n"), None);
    }

    #[test]
    fn own_proc_status_parses() {
        let text = std::fs::read_to_string("/proc/self/status").expect("linux /proc");
        let m = Memory::parse(&text).expect("fields present");
        assert!(m.peak_kib >= m.current_kib);
    }
}
