//! The in-memory store the engine tests run on keeps the `LocalStore` contract — the same suite
//! the terminal's `SqliteStore` passes (`terminal/tests/store_contract.rs`).

use std::sync::Arc;

use possync_actors::store_contract::Subject;
use possync_actors::testing::{sale_event, MemoryStore};
use uuid::Uuid;

fn memory_store() -> Subject {
    let store = Arc::new(MemoryStore::new());
    let sales = store.clone();
    let next = std::sync::atomic::AtomicI64::new(0);
    Subject {
        store,
        record_sale: Box::new(move || {
            let n = next.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
            sales.enqueue(sale_event(Uuid::nil(), Uuid::nil(), n))
        }),
        keep: Box::new(()),
    }
}

possync_actors::local_store_contract!(memory_store);
