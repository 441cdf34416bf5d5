//! Checks a spec's evidence against a repository tree, a test report and a dependency list.
//!
//! Everything the audit looks at is passed in, so the checks are plain functions that tests can
//! drive with a temporary tree.

use std::fs;
use std::path::{Path, PathBuf};

use crate::junit::TestCase;
use crate::spec::{Requirement, Spec};

/// One line of the audit table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Row {
    pub requirement: String,
    pub evidence: String,
    pub pass: bool,
    /// Why it failed, or a short confirmation.
    pub detail: String,
}

/// Where the tests' results and the dependency names come from.
pub struct Inputs<'a> {
    pub root: &'a Path,
    /// `None` when no test report exists: every test evidence then fails.
    pub tests: Option<&'a [TestCase]>,
    pub dependency_names: &'a [String],
}

/// Audits every requirement of `spec`.
pub fn audit(spec: &Spec, inputs: &Inputs<'_>) -> Vec<Row> {
    let mut rows = Vec::new();
    for req in &spec.requirements {
        if !req.has_evidence() {
            rows.push(row(req, "evidence", false, "no evidence listed".into()));
            continue;
        }
        audit_requirement(req, inputs, &mut rows);
    }
    rows
}

fn row(req: &Requirement, evidence: &str, pass: bool, detail: String) -> Row {
    Row {
        requirement: req.id.clone(),
        evidence: evidence.to_string(),
        pass,
        detail,
    }
}

fn audit_requirement(req: &Requirement, inputs: &Inputs<'_>, rows: &mut Vec<Row>) {
    let root = inputs.root;
    for pattern in &req.tests {
        let (pass, detail) = check_test(pattern, inputs.tests);
        rows.push(row(req, &format!("test {pattern}"), pass, detail));
    }
    for file in &req.files {
        let pass = root.join(file).exists();
        let detail = if pass { "exists" } else { "missing" }.to_string();
        rows.push(row(req, &format!("file {file}"), pass, detail));
    }
    for c in &req.contains {
        let (pass, detail) = match fs::read_to_string(root.join(&c.file)) {
            Ok(body) if body.contains(&c.text) => (true, "found".to_string()),
            Ok(_) => (false, "text not found".to_string()),
            Err(e) => (false, format!("cannot read: {e}")),
        };
        rows.push(row(
            req,
            &format!("{} has {:?}", c.file, c.text),
            pass,
            detail,
        ));
    }
    for a in &req.absent {
        let hits = find_text(root, &a.paths, &a.text);
        let pass = hits.is_empty();
        let detail = if pass {
            a.why.clone()
        } else {
            format!("found in {}", display_paths(root, &hits))
        };
        rows.push(row(
            req,
            &format!("no {:?} in {}", a.text, a.paths.join(",")),
            pass,
            detail,
        ));
    }
    for code in &req.codes {
        let quoted = format!("\"{code}\"");
        let in_protocol = file_contains(&root.join("protocol/src/error.rs"), &quoted);
        let in_docs = file_contains(&root.join("docs/api.md"), code);
        let detail = match (in_protocol, in_docs) {
            (true, true) => "in protocol and docs/api.md".to_string(),
            (false, _) => "missing from protocol/src/error.rs".to_string(),
            (true, false) => "missing from docs/api.md".to_string(),
        };
        rows.push(row(
            req,
            &format!("code {code}"),
            in_protocol && in_docs,
            detail,
        ));
    }
    for metric in &req.metrics {
        let quoted = format!("\"{metric}\"");
        let code_hits = find_text(
            root,
            &[
                "cloud/src".into(),
                "actors/src".into(),
                "terminal/src".into(),
            ],
            &quoted,
        );
        let doc_hits = find_text(root, &["docs".into(), "README.md".into()], metric);
        let pass = !code_hits.is_empty() && !doc_hits.is_empty();
        let detail = if pass {
            format!("registered in {}", display_paths(root, &code_hits))
        } else if code_hits.is_empty() {
            "not registered in code".to_string()
        } else {
            "not documented".to_string()
        };
        rows.push(row(req, &format!("metric {metric}"), pass, detail));
    }
    for forbidden in &req.forbidden_dependencies {
        let needle = forbidden.to_ascii_lowercase();
        let hits: Vec<&String> = inputs
            .dependency_names
            .iter()
            .filter(|n| n.to_ascii_lowercase().contains(&needle))
            .collect();
        let pass = hits.is_empty() && !inputs.dependency_names.is_empty();
        let detail = if inputs.dependency_names.is_empty() {
            "dependency list unavailable".to_string()
        } else if pass {
            format!("none of {} packages", inputs.dependency_names.len())
        } else {
            format!("found {hits:?}")
        };
        rows.push(row(
            req,
            &format!("no dependency *{forbidden}*"),
            pass,
            detail,
        ));
    }
}

fn check_test(pattern: &str, tests: Option<&[TestCase]>) -> (bool, String) {
    let Some(tests) = tests else {
        return (false, "no test report: run scripts/test first".to_string());
    };
    let matches: Vec<&TestCase> = tests
        .iter()
        .filter(|t| t.full_name.contains(pattern))
        .collect();
    if matches.is_empty() {
        return (false, "no such test in the report".to_string());
    }
    let failed: Vec<&str> = matches
        .iter()
        .filter(|t| !t.passed)
        .map(|t| t.full_name.as_str())
        .collect();
    if failed.is_empty() {
        (true, format!("{} passed", matches.len()))
    } else {
        (false, format!("not passed: {}", failed.join(", ")))
    }
}

fn file_contains(path: &Path, text: &str) -> bool {
    fs::read_to_string(path).is_ok_and(|b| b.contains(text))
}

/// Files under `paths` (files or directories, relative to `root`) whose text contains `needle`,
/// compared case-insensitively. `target/` and hidden directories are skipped.
fn find_text(root: &Path, paths: &[String], needle: &str) -> Vec<PathBuf> {
    let needle = needle.to_ascii_lowercase();
    let mut hits = Vec::new();
    let mut stack: Vec<PathBuf> = paths.iter().map(|p| root.join(p)).collect();
    while let Some(path) = stack.pop() {
        if path.is_dir() {
            let Ok(entries) = fs::read_dir(&path) else {
                continue;
            };
            for entry in entries.flatten() {
                let name = entry.file_name();
                let name = name.to_string_lossy();
                if name.starts_with('.') || name == "target" {
                    continue;
                }
                stack.push(entry.path());
            }
        } else if let Ok(body) = fs::read_to_string(&path) {
            if body.to_ascii_lowercase().contains(&needle) {
                hits.push(path);
            }
        }
    }
    hits.sort();
    hits
}

fn display_paths(root: &Path, paths: &[PathBuf]) -> String {
    paths
        .iter()
        .take(3)
        .map(|p| p.strip_prefix(root).unwrap_or(p).display().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::Spec;

    fn spec(toml_text: &str) -> Spec {
        toml::from_str(toml_text).expect("spec parses")
    }

    #[test]
    fn passes_and_fails_each_kind_of_evidence() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path();
        fs::create_dir_all(root.join("protocol/src")).expect("mkdir");
        fs::create_dir_all(root.join("docs")).expect("mkdir");
        fs::create_dir_all(root.join("cloud/src")).expect("mkdir");
        fs::write(root.join("protocol/src/error.rs"), "\"POS_A\"").expect("write");
        fs::write(root.join("docs/api.md"), "POS_A queued_events").expect("write");
        fs::write(root.join("cloud/src/m.rs"), "\"queued_events\" stock").expect("write");
        let s = spec(
            r#"
name = "x"
title = "x"
[[requirement]]
id = "R1"
section = "s"
text = "t"
codes = ["POS_A", "POS_B"]
metrics = ["queued_events"]
files = ["docs/api.md", "nope.md"]
tests = ["suite good", "suite bad", "suite missing"]
absent = [{ paths = ["cloud/src"], text = "STOCK", why = "no stock" }]
forbidden_dependencies = ["drive"]
[[requirement]]
id = "R2"
section = "s"
text = "nothing to show"
"#,
        );
        let tests = vec![
            TestCase {
                full_name: "suite good".into(),
                passed: true,
                skipped: false,
            },
            TestCase {
                full_name: "suite bad".into(),
                passed: false,
                skipped: false,
            },
        ];
        let deps = vec!["serde".to_string(), "google-drive3".to_string()];
        let rows = audit(
            &s,
            &Inputs {
                root,
                tests: Some(&tests),
                dependency_names: &deps,
            },
        );
        let verdict = |ev: &str| {
            rows.iter()
                .find(|r| r.evidence == ev)
                .unwrap_or_else(|| panic!("row {ev} missing: {rows:?}"))
                .pass
        };
        assert!(verdict("code POS_A"));
        assert!(!verdict("code POS_B"));
        assert!(verdict("metric queued_events"));
        assert!(verdict("file docs/api.md"));
        assert!(!verdict("file nope.md"));
        assert!(verdict("test suite good"));
        assert!(!verdict("test suite bad"));
        assert!(!verdict("test suite missing"));
        assert!(!verdict("no \"STOCK\" in cloud/src"));
        assert!(!verdict("no dependency *drive*"));
        let r2: Vec<&Row> = rows.iter().filter(|r| r.requirement == "R2").collect();
        assert_eq!(r2.len(), 1);
        assert!(!r2[0].pass, "a requirement without evidence is a gap");
    }

    #[test]
    fn without_a_report_test_evidence_fails() {
        let (pass, detail) = check_test("anything", None);
        assert!(!pass);
        assert!(detail.contains("scripts/test"));
    }
}
