//! The one way tests and benchmarks find and start the real binaries.
//!
//! `cloud serve` prints `listening on http://…` and `terminal run` prints `status on http://…`
//! on stdout once they are bound (both bind port 0, so runs never collide). Every harness needs
//! the same three things: find the binary in the cargo target directory, start it with its
//! logs in a file, and read that announcement to learn the URL. They live here once.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context as _};

/// How long a child may take to announce its address before it is killed.
pub const ANNOUNCE_TIMEOUT: Duration = Duration::from_secs(60);

/// Lines of the child's log quoted when it fails to start.
const LOG_TAIL_LINES: usize = 20;

/// Finds the binary `name` (e.g. `cloud`, `terminal`): the path in the environment variable
/// `env_var` if set, else the first `name` found walking up from the running executable's
/// directory to the cargo `target` directory (`target/<profile>/deps/x` and
/// `target/<profile>/x` both find `target/<profile>/name`), since cargo builds every binary of
/// the workspace into the same profile directory.
pub fn locate_binary(name: &str, env_var: &str) -> anyhow::Result<PathBuf> {
    if let Ok(p) = std::env::var(env_var) {
        return Ok(PathBuf::from(p));
    }
    let exe = std::env::current_exe().context("locating the running executable")?;
    let file = format!("{name}{}", std::env::consts::EXE_SUFFIX);
    let mut dir = exe.parent();
    while let Some(d) = dir {
        let candidate = d.join(&file);
        if candidate.is_file() {
            return Ok(candidate);
        }
        if d.file_name().is_some_and(|n| n == "target") {
            break;
        }
        dir = d.parent();
    }
    bail!(
        "the {name} binary was not found next to {} (build it with `cargo build --workspace --bins`, or set {env_var})",
        exe.display()
    )
}

/// Starts `cmd` with stdin closed, stderr appended to `log`, and stdout read until a line
/// starting with `announce` (e.g. `"status on "`); returns the child and the rest of that line
/// (the URL). stdout is drained afterwards so the child never blocks on a full pipe. If no
/// announcement comes within [`ANNOUNCE_TIMEOUT`] (or the child exits first), the child is
/// killed and the error quotes the end of `log`.
pub fn spawn_announcing(
    mut cmd: Command,
    announce: &str,
    log: &Path,
) -> anyhow::Result<(Child, String)> {
    let log_file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .with_context(|| format!("opening {}", log.display()))?;
    let program = cmd.get_program().to_string_lossy().into_owned();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::from(log_file))
        .spawn()
        .with_context(|| format!("starting {program}"))?;
    let stdout = child
        .stdout
        .take()
        .ok_or_else(|| anyhow!("no stdout pipe"))?;
    let (tx, rx) = mpsc::channel();
    let announce_owned = announce.to_string();
    std::thread::spawn(move || {
        let mut sent = false;
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if !sent {
                if let Some(url) = line.strip_prefix(&announce_owned) {
                    let _ = tx.send(url.trim().to_string());
                    sent = true;
                }
            }
            // Keep draining so the child never blocks on a full pipe.
        }
    });
    match rx.recv_timeout(ANNOUNCE_TIMEOUT) {
        Ok(url) => Ok((child, url)),
        Err(_) => {
            let _ = child.kill();
            let status = child.wait().ok();
            bail!(
                "{program} did not announce `{}` (exit {status:?}); end of {}:\n{}",
                announce.trim(),
                log.display(),
                log_tail(log)
            )
        }
    }
}

/// Asks `child` to stop with SIGTERM (the graceful path a service manager takes) and waits
/// for it to exit. std only offers SIGKILL, so the signal is sent with `kill -TERM`.
pub fn terminate(child: &mut Child) -> anyhow::Result<ExitStatus> {
    let status = Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status()
        .context("sending SIGTERM")?;
    if !status.success() {
        bail!("kill -TERM {} failed: {status}", child.id());
    }
    child.wait().context("waiting for the child to exit")
}

/// The last [`LOG_TAIL_LINES`] lines of `log` (empty if it cannot be read): enough to say why
/// a child did not start without flooding the failure message.
fn log_tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(LOG_TAIL_LINES)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_announced_url_is_returned_and_later_output_does_not_block() {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut cmd = Command::new("sh");
        cmd.args([
            "-c",
            "echo starting; echo 'status on http://127.0.0.1:9' ; echo 'status on http://other'; echo err >&2; sleep 30",
        ]);
        let (mut child, url) =
            spawn_announcing(cmd, "status on ", &dir.path().join("x.log")).expect("announced");
        assert_eq!(url, "http://127.0.0.1:9");
        child.kill().expect("kill");
        child.wait().expect("reap");
    }

    #[test]
    fn a_child_that_exits_without_announcing_is_an_error_quoting_its_log() {
        let dir = tempfile::tempdir().expect("temp dir");
        let log = dir.path().join("x.log");
        let mut cmd = Command::new("sh");
        cmd.args([
            "-c",
            "echo 'listening on http://x'; echo 'boom: bad flag' >&2; exit 2",
        ]);
        let err = spawn_announcing(cmd, "status on ", &log)
            .expect_err("no status line")
            .to_string();
        assert!(err.contains("did not announce `status on`"), "{err}");
        assert!(err.contains("boom: bad flag"), "{err}");
    }

    #[test]
    fn terminate_delivers_sigterm_and_returns_the_exit_status() {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut cmd = Command::new("sh");
        cmd.args([
            "-c",
            "trap 'exit 7' TERM; echo 'status on http://t'; while :; do sleep 0.05; done",
        ]);
        let (mut child, _) =
            spawn_announcing(cmd, "status on ", &dir.path().join("x.log")).expect("announced");
        let status = terminate(&mut child).expect("terminated");
        assert_eq!(status.code(), Some(7), "the TERM trap ran: {status}");
    }

    #[test]
    fn a_missing_binary_is_an_error_naming_its_environment_variable() {
        let var = "POSSYNC_TESTKIT_LOCATE_TEST_BIN";
        let err = locate_binary("no-such-binary-here", var)
            .expect_err("not built")
            .to_string();
        assert!(err.contains(var), "{err}");
    }
}
