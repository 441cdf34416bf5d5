//! Durability by killing a process: a child enqueues sales in a loop and prints each
//! `local_event_id` after `enqueue_sale` returned; the parent SIGKILLs it mid-loop, reopens
//! the file and checks that every printed id is stored, ids are contiguous, and no sale is
//! half-written (each sale has its journal row and vice versa).
//!
//! The child is this same test binary, re-run with `--exact writer_child --ignored` and the
//! database path in `POSSYNC_DURABILITY_DB`.

mod fixtures;

use chrono::Utc;
use fixtures::*;
use possync_protocol::EventType;
use possync_terminal::store::SqliteStore;
use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};

const DB_ENV: &str = "POSSYNC_DURABILITY_DB";

/// The writer side. Ignored in normal runs; it only does work when started by the parent.
#[test]
#[ignore = "run as a child process by sales_printed_before_a_kill_9_survive_it"]
fn writer_child() {
    let Some(path) = std::env::var_os(DB_ENV) else {
        panic!("{DB_ENV} not set: this test is only run by its parent");
    };
    let store = SqliteStore::open(std::path::Path::new(&path)).expect("child open");
    let mut out = std::io::stdout().lock();
    for i in 0.. {
        let e = store
            .enqueue_sale(
                EventType::Sale,
                Utc::now(),
                &payload(&format!("K-{i}"), 1 + i % 5, 199),
            )
            .expect("enqueue");
        writeln!(out, "ENQUEUED {}", e.local_event_id).expect("print");
        out.flush().expect("flush");
    }
}

/// The id in a child line. libtest may print `test writer_child ... ` before the first one on
/// the same line, so the marker is searched for, not expected at the start.
fn enqueued_id(line: &str) -> Option<i64> {
    let (_, rest) = line.split_once("ENQUEUED ")?;
    rest.trim().parse().ok()
}

#[test]
fn sales_printed_before_a_kill_9_survive_it() {
    let (_dir, path) = temp_db();
    // the file exists and is migrated before the child starts, as under the daemon
    drop(open(&path));
    let exe = std::env::current_exe().expect("test binary");
    let mut child = Command::new(exe)
        .args([
            "--exact",
            "writer_child",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(DB_ENV, &path)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn writer");
    let stdout = child.stdout.take().expect("child stdout");
    let mut reader = BufReader::new(stdout);
    let mut printed: Vec<i64> = Vec::new();
    let mut line = String::new();
    while printed.len() < 150 {
        line.clear();
        let n = reader.read_line(&mut line).expect("read child");
        assert!(n > 0, "child ended early after {} sales", printed.len());
        if let Some(id) = enqueued_id(&line) {
            printed.push(id);
        }
    }
    child.kill().expect("SIGKILL the writer"); // Child::kill is SIGKILL on Unix
    child.wait().expect("reap");
    // whatever it managed to print before dying counts too
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut reader, &mut rest).expect("drain");
    // only complete lines: a line cut by the kill could read as a smaller id
    printed.extend(
        rest.split_inclusive('\n')
            .filter(|l| l.ends_with('\n'))
            .filter_map(enqueued_id),
    );
    assert_eq!(
        printed,
        (1..=printed.len() as i64).collect::<Vec<_>>(),
        "child printed in order"
    );

    let store = open(&path);
    let stored: Vec<i64> = store
        .journal_for_report()
        .expect("journal")
        .into_iter()
        .map(|(pos, id, status)| {
            assert_eq!(pos, store.pos_id());
            assert_eq!(status, "pending");
            id
        })
        .collect();
    let last_printed = *printed.last().expect("some printed");
    assert!(
        stored.len() as i64 >= last_printed,
        "every acknowledged sale is on disk: printed up to {last_printed}, stored {}",
        stored.len()
    );
    assert_eq!(
        stored,
        (1..=stored.len() as i64).collect::<Vec<_>>(),
        "ids contiguous"
    );
    // at most the one sale in flight at the kill is stored without having been printed
    assert!(stored.len() as i64 <= last_printed + 1);
    assert_eq!(
        count(&path, "sales"),
        stored.len() as i64,
        "no sale without its journal row"
    );
    assert_eq!(
        count(&path, "sales s JOIN sync_journal j ON j.pos_id = s.pos_id AND j.local_event_id = s.local_event_id"),
        stored.len() as i64
    );
    // and the next sale continues the sequence
    let e = store
        .enqueue_sale(EventType::Sale, Utc::now(), &payload("after-crash", 1, 1))
        .expect("enqueue after crash");
    assert_eq!(e.local_event_id, stored.len() as i64 + 1);
}
