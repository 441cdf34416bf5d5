//! `gov-spec-audit <spec-name> [--root DIR] [--junit PATH]`
//!
//! The governance check the seed asks for ("build and governance checks pass"): reads
//! `specs/<spec-name>.toml`, checks every requirement's evidence against the tree, the last
//! nextest JUnit report and the resolved dependency graph, prints a table, and exits non-zero on
//! any gap or an unknown spec name.

mod audit;
mod junit;
mod spec;

use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

use anyhow::{bail, Context, Result};

const USAGE: &str = "usage: gov-spec-audit <spec-name> [--root DIR] [--junit PATH]";

fn main() -> ExitCode {
    match run() {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("gov-spec-audit: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn run() -> Result<bool> {
    let mut args = std::env::args().skip(1);
    let mut name: Option<String> = None;
    let mut root = PathBuf::from(".");
    let mut junit_path: Option<PathBuf> = None;
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--root" => root = PathBuf::from(args.next().context(USAGE)?),
            "--junit" => junit_path = Some(PathBuf::from(args.next().context(USAGE)?)),
            "-h" | "--help" => {
                println!("{USAGE}");
                return Ok(true);
            }
            other if name.is_none() && !other.starts_with('-') => name = Some(other.to_string()),
            other => bail!("unexpected argument {other:?}; {USAGE}"),
        }
    }
    let name = name.context(USAGE)?;
    let spec_path = root.join("specs").join(format!("{name}.toml"));
    if !spec_path.is_file() {
        bail!("unknown spec {name:?}: no {}", spec_path.display());
    }
    let spec: spec::Spec = toml::from_str(
        &std::fs::read_to_string(&spec_path)
            .with_context(|| format!("reading {}", spec_path.display()))?,
    )
    .with_context(|| format!("parsing {}", spec_path.display()))?;
    if spec.name != name {
        bail!("{} declares name {:?}", spec_path.display(), spec.name);
    }

    let junit_path = junit_path.unwrap_or_else(|| root.join("target/nextest/default/junit.xml"));
    let tests = match std::fs::read_to_string(&junit_path) {
        Ok(xml) => Some(junit::parse(&xml)?),
        Err(_) => {
            eprintln!(
                "note: no test report at {}; test evidence will fail",
                junit_path.display()
            );
            None
        }
    };
    let deps = dependency_names(&root)?;
    let rows = audit::audit(
        &spec,
        &audit::Inputs {
            root: &root,
            tests: tests.as_deref(),
            dependency_names: &deps,
        },
    );
    print_table(&spec, &rows);
    Ok(rows.iter().all(|r| r.pass))
}

/// Names of every package in the resolved graph (`cargo metadata`), including the workspace's.
fn dependency_names(root: &Path) -> Result<Vec<String>> {
    let out = Command::new("cargo")
        .args(["metadata", "--format-version", "1", "--locked"])
        .current_dir(root)
        .output()
        .context("running cargo metadata")?;
    if !out.status.success() {
        bail!(
            "cargo metadata failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let meta: serde_json::Value =
        serde_json::from_slice(&out.stdout).context("parsing cargo metadata")?;
    Ok(meta["packages"]
        .as_array()
        .map(|pkgs| {
            pkgs.iter()
                .filter_map(|p| p["name"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default())
}

fn print_table(spec: &spec::Spec, rows: &[audit::Row]) {
    println!("spec audit: {} — {}", spec.name, spec.title);
    let w_req = rows
        .iter()
        .map(|r| r.requirement.len())
        .max()
        .unwrap_or(4)
        .max(11);
    let w_ev = rows
        .iter()
        .map(|r| r.evidence.chars().count())
        .max()
        .unwrap_or(8)
        .clamp(8, 90);
    println!(
        "{:<w_req$}  {:<w_ev$}  result  detail",
        "requirement", "evidence"
    );
    for req in &spec.requirements {
        println!("-- {} [{}] {}", req.id, req.section, req.text);
        for r in rows.iter().filter(|r| r.requirement == req.id) {
            let evidence: String = r.evidence.chars().take(w_ev).collect();
            let verdict = if r.pass { "PASS" } else { "FAIL" };
            println!(
                "{:<w_req$}  {:<w_ev$}  {verdict:<6}  {}",
                r.requirement, evidence, r.detail
            );
        }
    }
    let failed = rows.iter().filter(|r| !r.pass).count();
    let reqs: std::collections::BTreeSet<&str> =
        rows.iter().map(|r| r.requirement.as_str()).collect();
    let failed_reqs: std::collections::BTreeSet<&str> = rows
        .iter()
        .filter(|r| !r.pass)
        .map(|r| r.requirement.as_str())
        .collect();
    println!(
        "{} requirements, {} evidence checks: {} passed, {} failed; requirements with gaps: {}",
        reqs.len(),
        rows.len(),
        rows.len() - failed,
        failed,
        if failed_reqs.is_empty() {
            "none".to_string()
        } else {
            failed_reqs.into_iter().collect::<Vec<_>>().join(", ")
        }
    );
}
