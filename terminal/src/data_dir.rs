//! The till's data directory and who may read it.
//!
//! Everything in it is private to the account the till runs as: `terminal.db` and its WAL hold
//! every sale and the cloud token; `local-api.token` opens the loopback API's state-changing
//! routes. The binary sets its umask to `077` before it creates anything, so new files and
//! directories (database, WAL, shared memory, backups, token) are born owner-only; files left
//! world-readable by an older version are tightened when a command opens the directory.
//!
//! The local API token is generated once, from the operating system's CSPRNG, and kept in
//! `local-api.token` (mode 0600). Creating it is race-free: the token is written to a private
//! temporary file and hard-linked into place, which fails if another process got there first —
//! then that process's token is the one read back. A file whose content is not a token (hand
//! edited, truncated) is replaced, with a warning: integrators then read the new one.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use thiserror::Error;

/// Name of the local API token file inside the data dir.
pub const LOCAL_TOKEN_FILE: &str = "local-api.token";
/// Prefix of every local API token (lets secret scanners recognise one in a log or a paste).
const TOKEN_PREFIX: &str = "ltk_";
/// Random bytes in a token (256 bits), hex-encoded after the prefix.
const TOKEN_BYTES: usize = 32;

/// The local API token could not be read or created.
#[derive(Debug, Error)]
#[error("{what} {}: {source}", path.display())]
pub struct LocalTokenError {
    /// What was being done.
    what: &'static str,
    /// The file or directory involved.
    path: PathBuf,
    /// The underlying error.
    source: std::io::Error,
}

/// Name of the file whose lock marks the one process running the sync engine on a data dir.
pub const ENGINE_LOCK_FILE: &str = "engine.lock";

/// Held for as long as a process runs the sync engine on a data dir: the daemon, or a command
/// that runs an engine for itself because no daemon answered. Two engines on one database
/// would release each other's in-flight claims and run two carry-overs; the idempotency ledger
/// keeps that from storing a sale twice, but it doubles the traffic and the work. The daemon's
/// HTTP probe (`terminal run` finding a live daemon) cannot be the guard on its own: a daemon
/// too busy to answer within the probe's timeout would look absent. The lock is the operating
/// system's (`flock`), so it goes with the process however that ends — `kill -9` included —
/// and there is never a stale lock to clean up.
#[derive(Debug)]
pub struct EngineLock {
    _file: std::fs::File,
}

/// The engine lock could not be taken.
#[derive(Debug, Error)]
pub enum EngineLockError {
    /// Another process holds it: a daemon (or a command's engine) runs on this data dir.
    #[error("another process runs the sync engine on {}", .0.display())]
    Held(PathBuf),
    /// The lock file could not be opened or locked.
    #[error("locking {}: {source}", path.display())]
    Io {
        /// The lock file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
}

impl EngineLock {
    /// Takes the engine lock of `dir` without waiting.
    pub fn acquire(dir: &Path) -> Result<EngineLock, EngineLockError> {
        let path = dir.join(ENGINE_LOCK_FILE);
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|source| EngineLockError::Io {
                path: path.clone(),
                source,
            })?;
        match file.try_lock() {
            Ok(()) => Ok(EngineLock { _file: file }),
            Err(std::fs::TryLockError::WouldBlock) => Err(EngineLockError::Held(dir.to_path_buf())),
            Err(std::fs::TryLockError::Error(source)) => Err(EngineLockError::Io { path, source }),
        }
    }
}

/// Makes every file and directory this process creates from now on private to its owner.
///
/// Called first thing by the `terminal` binary. SQLite creates the WAL and shared-memory files
/// with the database file's own mode, and backups and the token are plain new files, so the
/// umask covers all of them without a window in which a file exists world-readable.
#[cfg(unix)]
pub fn restrict_new_files() {
    use rustix::fs::Mode;
    rustix::process::umask(Mode::from_raw_mode(0o077));
}

/// No umask off Unix; the directory's ACL is the operator's to set.
#[cfg(not(unix))]
pub fn restrict_new_files() {}

/// Creates the data dir (and its parents) if missing; a new directory is owner-only.
pub fn create(dir: &Path) -> std::io::Result<()> {
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt as _;
        builder.mode(0o700);
    }
    builder.create(dir)
}

/// Removes group and other permissions from `path` if it exists and has any. Returns whether
/// it changed something.
#[cfg(unix)]
pub fn make_owner_only(path: &Path) -> std::io::Result<bool> {
    use std::os::unix::fs::PermissionsExt as _;
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
        Err(e) => return Err(e),
    };
    // A symlink's own mode means nothing; never follow one to chmod its target.
    if meta.file_type().is_symlink() {
        return Ok(false);
    }
    let mode = meta.permissions().mode();
    if mode & 0o077 == 0 {
        return Ok(false);
    }
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode & 0o700))?;
    Ok(true)
}

/// Off Unix there are no mode bits to tighten.
#[cfg(not(unix))]
pub fn make_owner_only(_path: &Path) -> std::io::Result<bool> {
    Ok(false)
}

/// Tightens what an older version may have left readable by others: the database with its WAL,
/// shared memory and backups (every `terminal.db*`), and the token. A missing dir is fine.
pub fn tighten_existing(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if !(name.starts_with(crate::cli::DB_FILE) || name == LOCAL_TOKEN_FILE) {
            continue;
        }
        let path = entry.path();
        match make_owner_only(&path) {
            Ok(true) => tracing::warn!(
                file = %path.display(),
                "file was readable by other accounts; made it owner-only"
            ),
            Ok(false) => {}
            Err(e) => tracing::warn!(
                file = %path.display(),
                error = %e,
                "could not make the file owner-only"
            ),
        }
    }
}

/// Whether `text` has the shape of a token this module generates.
fn well_formed(text: &str) -> bool {
    text.strip_prefix(TOKEN_PREFIX).is_some_and(|hex| {
        hex.len() == TOKEN_BYTES * 2 && hex.bytes().all(|b| b.is_ascii_hexdigit())
    })
}

fn new_token() -> String {
    format!(
        "{TOKEN_PREFIX}{}",
        hex::encode(rand::random::<[u8; TOKEN_BYTES]>())
    )
}

/// The local API token of the data dir `dir`: read from `local-api.token`, or generated and
/// stored there (mode 0600) if there is none yet. Creates `dir` if needed.
pub fn local_token(dir: &Path) -> Result<String, LocalTokenError> {
    let path = dir.join(LOCAL_TOKEN_FILE);
    let err = |what, path: &Path| {
        let path = path.to_path_buf();
        move |source| LocalTokenError { what, path, source }
    };
    match std::fs::read_to_string(&path) {
        Ok(text) if well_formed(text.trim()) => {
            if make_owner_only(&path).map_err(err("restricting", &path))? {
                tracing::warn!(file = %path.display(), "local API token was readable by other accounts; made it owner-only");
            }
            return Ok(text.trim().to_string());
        }
        Ok(_) => tracing::warn!(
            file = %path.display(),
            "local API token file does not hold a token; replacing it (integrators must read the new one)"
        ),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(err("reading", &path)(e)),
    }
    create(dir).map_err(err("creating", dir))?;
    let token = new_token();
    let tmp = dir.join(format!(
        ".{LOCAL_TOKEN_FILE}.{}.tmp",
        uuid::Uuid::new_v4().simple()
    ));
    write_private(&tmp, &token).map_err(err("writing", &tmp))?;
    // No-clobber publish: of two processes creating the token at once, exactly one link
    // succeeds, and both then answer with the file's content.
    let linked = std::fs::hard_link(&tmp, &path);
    let result = match linked {
        Ok(()) => Ok(token),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            let existing = std::fs::read_to_string(&path).map_err(err("reading", &path))?;
            if well_formed(existing.trim()) {
                Ok(existing.trim().to_string())
            } else {
                // The malformed file seen above: replace it atomically.
                std::fs::rename(&tmp, &path).map_err(err("replacing", &path))?;
                Ok(token)
            }
        }
        Err(e) => Err(err("publishing", &path)(e)),
    };
    let _ = std::fs::remove_file(&tmp);
    result
}

/// Writes `content` to a new file that only its owner can read, durably.
fn write_private(path: &Path, content: &str) -> std::io::Result<()> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt as _;
        options.mode(0o600);
    }
    let mut f = options.open(path)?;
    f.write_all(content.as_bytes())?;
    f.write_all(b"\n")?;
    f.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_engine_lock_per_data_dir_released_with_its_holder() {
        let dir = tempfile::tempdir().expect("tempdir");
        let first = EngineLock::acquire(dir.path()).expect("first");
        assert!(
            matches!(
                EngineLock::acquire(dir.path()),
                Err(EngineLockError::Held(_))
            ),
            "a second engine on the same data dir is refused"
        );
        let other = tempfile::tempdir().expect("tempdir");
        let _elsewhere = EngineLock::acquire(other.path()).expect("another data dir is free");
        drop(first);
        let _again = EngineLock::acquire(dir.path()).expect("free once its holder is gone");
        assert!(matches!(
            EngineLock::acquire(&dir.path().join("missing")),
            Err(EngineLockError::Io { .. })
        ));
    }

    #[cfg(unix)]
    fn mode(path: &Path) -> u32 {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::metadata(path)
            .expect("metadata")
            .permissions()
            .mode()
            & 0o777
    }

    #[test]
    fn the_token_is_generated_once_owner_only_and_read_back() {
        let dir = tempfile::tempdir().expect("tempdir");
        let data = dir.path().join("till");
        let a = local_token(&data).expect("generated");
        assert!(well_formed(&a), "{a}");
        let b = local_token(&data).expect("read back");
        assert_eq!(a, b);
        let other = tempfile::tempdir().expect("tempdir");
        assert_ne!(a, local_token(other.path()).expect("another till"));
        #[cfg(unix)]
        {
            assert_eq!(mode(&data.join(LOCAL_TOKEN_FILE)), 0o600);
            assert_eq!(mode(&data), 0o700);
        }
        let leftovers: Vec<_> = std::fs::read_dir(&data)
            .expect("list")
            .flatten()
            .map(|e| e.file_name())
            .filter(|n| n != LOCAL_TOKEN_FILE)
            .collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
    }

    #[test]
    fn a_file_that_holds_no_token_is_replaced() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join(LOCAL_TOKEN_FILE), "hunter2\n").expect("write");
        let t = local_token(dir.path()).expect("replaced");
        assert!(well_formed(&t), "{t}");
        let on_disk = std::fs::read_to_string(dir.path().join(LOCAL_TOKEN_FILE)).expect("read");
        assert_eq!(on_disk.trim(), t);
    }

    #[test]
    fn concurrent_creators_agree_on_one_token() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().to_path_buf();
        let tokens: Vec<String> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..8)
                .map(|_| s.spawn(|| local_token(&path).expect("token")))
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().expect("join"))
                .collect()
        });
        assert!(tokens.windows(2).all(|w| w[0] == w[1]), "{tokens:?}");
    }

    #[cfg(unix)]
    #[test]
    fn readable_database_files_are_tightened_and_others_left_alone() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().expect("tempdir");
        for name in [
            "terminal.db",
            "terminal.db-wal",
            "terminal.db.bak-1-v3",
            "notes.txt",
        ] {
            let p = dir.path().join(name);
            std::fs::write(&p, "x").expect("write");
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        }
        tighten_existing(dir.path());
        assert_eq!(mode(&dir.path().join("terminal.db")), 0o600);
        assert_eq!(mode(&dir.path().join("terminal.db-wal")), 0o600);
        assert_eq!(mode(&dir.path().join("terminal.db.bak-1-v3")), 0o600);
        assert_eq!(mode(&dir.path().join("notes.txt")), 0o644);
    }
}
