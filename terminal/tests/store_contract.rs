//! The terminal's `SqliteStore` keeps the `LocalStore` contract — the same suite the engine
//! tests' in-memory fake passes (`actors/tests/store_contract.rs`), so the fake cannot drift
//! from the store the till runs on.

mod fixtures;

use std::sync::Arc;

use chrono::Utc;
use fixtures::*;
use possync_actors::store_contract::Subject;
use possync_protocol::EventType;

fn sqlite_store() -> Subject {
    let (dir, path) = temp_db();
    let store = open(&path);
    // Sales recorded before enrollment carry no terminal id and are not delivered.
    store.save_enrollment(&enrollment()).expect("enroll");
    let sales = store.clone();
    let n = std::sync::atomic::AtomicI64::new(0);
    Subject {
        store: Arc::new(store),
        record_sale: Box::new(move || {
            let i = n.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            sales
                .enqueue_sale(
                    EventType::Sale,
                    Utc::now(),
                    &payload(&format!("R-{i}"), 1, 250),
                )
                .expect("enqueue")
                .journal_id
        }),
        keep: Box::new(dir),
    }
}

possync_actors::local_store_contract!(sqlite_store);
