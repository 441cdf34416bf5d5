//! The scriptable cloud the engine tests run on keeps the `CloudApi` contract — the same suite
//! a real `cloud serve` passes through the terminal's HTTP client
//! (`terminal/tests/cloud_contract.rs`).

use std::sync::Arc;

use possync_actors::cloud_contract::Subject;
use possync_actors::testing::FakeCloud;
use uuid::Uuid;

async fn fake_cloud() -> Subject {
    let cloud = Arc::new(FakeCloud::new());
    let catalog = cloud.clone();
    Subject {
        cloud,
        terminal_id: Uuid::now_v7(),
        branch_id: "b1".into(),
        upsert_product: Box::new(move |id, name| {
            catalog.upsert("product", id, serde_json::json!({"name": name}));
            Box::pin(async {})
        }),
        keep: Box::new(()),
    }
}

possync_actors::cloud_contract!(fake_cloud);
