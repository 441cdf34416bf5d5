//! The machine-readable spec: each requirement of a seed document with the evidence that shows
//! it is met. Kept as TOML under `specs/<name>.toml` so a reviewer can read it beside the seed.

use serde::Deserialize;

/// One spec file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Spec {
    /// Must equal the file stem, so `gov-spec-audit NAME` can't audit the wrong spec.
    pub name: String,
    pub title: String,
    #[serde(rename = "requirement")]
    pub requirements: Vec<Requirement>,
}

/// One requirement of the seed and its evidence. A requirement with no evidence at all is a gap.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Requirement {
    pub id: String,
    pub section: String,
    pub text: String,
    /// Tests that must exist and have passed: each entry matches `"<binary id> <test name>"`
    /// of the last nextest run by substring, and every match must have passed.
    #[serde(default)]
    pub tests: Vec<String>,
    /// Files that must exist (relative to the repository root).
    #[serde(default)]
    pub files: Vec<String>,
    /// Text that must occur in a file.
    #[serde(default)]
    pub contains: Vec<Contains>,
    /// Text that must occur in none of the listed files or directories.
    #[serde(default)]
    pub absent: Vec<Absent>,
    /// Stable error codes: each must be in `protocol/src/error.rs` and in `docs/api.md`.
    #[serde(default)]
    pub codes: Vec<String>,
    /// Metric names: each must be registered in code (quoted) and named in `docs/`.
    #[serde(default)]
    pub metrics: Vec<String>,
    /// Substrings no package name in the resolved dependency graph may contain.
    #[serde(default)]
    pub forbidden_dependencies: Vec<String>,
}

/// `text` must occur in `file`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Contains {
    pub file: String,
    pub text: String,
}

/// `text` must occur in no file under any of `paths` (case-insensitive).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Absent {
    pub paths: Vec<String>,
    pub text: String,
    /// Why this text must not be there, shown in the table.
    pub why: String,
}

impl Requirement {
    /// Whether the requirement names any evidence at all.
    pub fn has_evidence(&self) -> bool {
        !(self.tests.is_empty()
            && self.files.is_empty()
            && self.contains.is_empty()
            && self.absent.is_empty()
            && self.codes.is_empty()
            && self.metrics.is_empty()
            && self.forbidden_dependencies.is_empty())
    }
}
