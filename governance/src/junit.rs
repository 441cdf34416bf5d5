//! Reads the JUnit report nextest writes, so the audit can say whether a named test passed in
//! the run CI just made instead of running the suite a second time.

use anyhow::{Context, Result};
use quick_xml::events::Event;
use quick_xml::Reader;

/// One test case of the report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TestCase {
    /// `"<binary id> <test name>"`, e.g. `"possync-cloud::api events_duplicate"`.
    pub full_name: String,
    pub passed: bool,
    pub skipped: bool,
}

/// Parses a nextest JUnit XML document.
pub fn parse(xml: &str) -> Result<Vec<TestCase>> {
    let mut reader = Reader::from_str(xml);
    let mut cases = Vec::new();
    let mut current: Option<TestCase> = None;
    loop {
        match reader.read_event().context("malformed JUnit XML")? {
            Event::Start(e) if e.name().as_ref() == b"testcase" => {
                current = Some(case_from(&e)?);
            }
            Event::Empty(e) if e.name().as_ref() == b"testcase" => {
                cases.push(case_from(&e)?);
            }
            Event::Start(e) | Event::Empty(e) => {
                if let Some(case) = current.as_mut() {
                    match e.name().as_ref() {
                        b"failure" | b"error" => case.passed = false,
                        b"skipped" => {
                            case.skipped = true;
                            case.passed = false;
                        }
                        _ => {}
                    }
                }
            }
            Event::End(e) if e.name().as_ref() == b"testcase" => {
                if let Some(case) = current.take() {
                    cases.push(case);
                }
            }
            Event::Eof => break,
            _ => {}
        }
    }
    Ok(cases)
}

fn case_from(e: &quick_xml::events::BytesStart<'_>) -> Result<TestCase> {
    let mut name = String::new();
    let mut classname = String::new();
    for attr in e.attributes() {
        let attr = attr.context("bad testcase attribute")?;
        let value = attr
            .unescape_value()
            .context("bad testcase attribute value")?
            .into_owned();
        match attr.key.as_ref() {
            b"name" => name = value,
            b"classname" => classname = value,
            _ => {}
        }
    }
    Ok(TestCase {
        full_name: format!("{classname} {name}"),
        passed: true,
        skipped: false,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = r#"<?xml version="1.0" encoding="UTF-8"?>
<testsuites name="nextest-run" tests="3" failures="1" errors="0">
  <testsuite name="possync-cloud::api" tests="3">
    <testcase name="events_duplicate" classname="possync-cloud::api" time="0.1"></testcase>
    <testcase name="rate_limit_429" classname="possync-cloud::api" time="0.1">
      <failure message="boom" type="test failure">stack</failure>
    </testcase>
    <testcase name="empty_one" classname="possync-protocol"/>
  </testsuite>
</testsuites>"#;

    #[test]
    fn reads_pass_and_failure() {
        let cases = parse(SAMPLE).expect("parse");
        assert_eq!(cases.len(), 3);
        assert_eq!(cases[0].full_name, "possync-cloud::api events_duplicate");
        assert!(cases[0].passed);
        assert!(!cases[1].passed);
        assert!(cases[2].passed);
    }

    #[test]
    fn malformed_xml_is_an_error() {
        assert!(parse("<testsuites><testcase name='x'></testsuite>").is_err());
    }
}
