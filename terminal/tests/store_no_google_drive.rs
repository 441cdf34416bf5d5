//! Phase 1's deliverable, checked: no runtime dependency on Google Drive. The resolved
//! dependency graph (`cargo metadata`, for this host) has no Drive or Google API crate, neither
//! does any platform's entry in `Cargo.lock`, and no source file
//! calls a Google API. The legacy migration only reads tables the old Drive sync left behind.

use std::path::{Path, PathBuf};
use std::process::Command;

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}

/// Crate-name fragments of Google Drive / Google API clients and their OAuth stack.
/// Split so this file does not match its own search.
fn forbidden_crate_fragments() -> Vec<String> {
    vec![
        format!("{}{}", "google", "-"),
        format!("{}{}", "google", "_"),
        format!("{}{}", "drive", "3"),
        format!("{}{}", "yup-", "oauth2"),
        format!("{}{}", "gcp", "_auth"),
    ]
}

#[test]
fn the_dependency_graph_has_no_google_drive_crate() {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    // the host's graph: other platforms' crates may not be in the offline cache
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let version = Command::new(rustc).arg("-vV").output().expect("rustc -vV");
    let version = String::from_utf8_lossy(&version.stdout).to_string();
    let host = version
        .lines()
        .find_map(|l| l.strip_prefix("host: "))
        .expect("host triple")
        .trim()
        .to_string();
    let out = Command::new(cargo)
        .args(["metadata", "--format-version", "1", "--offline", "--locked"])
        .args(["--filter-platform", &host])
        .current_dir(workspace_root())
        .output()
        .expect("run cargo metadata");
    assert!(
        out.status.success(),
        "cargo metadata failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let meta: serde_json::Value = serde_json::from_slice(&out.stdout).expect("metadata JSON");
    let names: Vec<String> = meta["packages"]
        .as_array()
        .expect("packages")
        .iter()
        .filter_map(|p| p["name"].as_str().map(str::to_lowercase))
        .collect();
    assert!(
        names.iter().any(|n| n == "rusqlite"),
        "metadata lists the real graph"
    );
    for n in &names {
        for f in forbidden_crate_fragments() {
            assert!(
                !n.contains(&f),
                "dependency {n} looks like a Google/Drive client ({f})"
            );
        }
    }
}

#[test]
fn the_lock_file_has_no_google_drive_crate_for_any_platform() {
    let lock = std::fs::read_to_string(workspace_root().join("Cargo.lock")).expect("Cargo.lock");
    let names: Vec<&str> = lock
        .lines()
        .filter_map(|l| l.strip_prefix("name = \""))
        .filter_map(|l| l.strip_suffix('"'))
        .collect();
    assert!(names.contains(&"rusqlite"), "parsed the lock file");
    for n in names {
        for f in forbidden_crate_fragments() {
            assert!(
                !n.to_lowercase().contains(&f),
                "locked crate {n} looks like a Google/Drive client ({f})"
            );
        }
    }
}

fn rust_sources(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let name = entry.file_name().to_string_lossy().to_string();
        if path.is_dir() {
            if name != "target" && !name.starts_with('.') {
                rust_sources(&path, out);
            }
        } else if name.ends_with(".rs") || name == "Cargo.toml" {
            out.push(path);
        }
    }
}

#[test]
fn no_source_file_talks_to_google_drive() {
    let mut files = Vec::new();
    rust_sources(&workspace_root(), &mut files);
    assert!(files.len() > 20, "found the sources ({})", files.len());
    let patterns = [
        format!("{}{}", "googleapis", ".com"),
        format!("{}{}", "accounts.google", ".com"),
        format!("{}{}", "/drive/", "v3"),
        format!("{}{}", "google_", "drive"),
        format!("{}{}", "DriveHub", ""),
    ];
    let this_file = Path::new(file!()).file_name().expect("name").to_owned();
    for f in files {
        if f.file_name() == Some(this_file.as_os_str()) {
            continue;
        }
        let text = std::fs::read_to_string(&f).unwrap_or_default();
        for p in &patterns {
            assert!(!text.contains(p.as_str()), "{} mentions {p}", f.display());
        }
    }
}
