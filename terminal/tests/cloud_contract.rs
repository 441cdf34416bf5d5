//! A real `cloud serve` (on a fresh PostgreSQL database), reached through the terminal's HTTP
//! client, keeps the `CloudApi` contract — the same suite the engine tests' scriptable fake
//! passes (`actors/tests/cloud_contract.rs`), so the fake cannot drift from the cloud.

mod e2e_support;

use std::sync::Arc;

use e2e_support::Cloud;
use possync_actors::cloud_contract::Subject;
use possync_terminal::cloud_client::{CloudTarget, HttpCloud};

async fn real_cloud() -> Subject {
    let cloud = Arc::new(Cloud::start(&[]));
    let (terminal_id, token) = cloud.process.add_terminal("b1").expect("terminal add");
    let client = HttpCloud::new(CloudTarget {
        base_url: cloud.process.url(""),
        token,
    })
    .expect("client");
    let catalog = cloud.clone();
    Subject {
        cloud: Arc::new(client),
        terminal_id,
        branch_id: "b1".into(),
        upsert_product: Box::new(move |id, name| {
            let catalog = catalog.clone();
            let (id, name) = (id.to_string(), name.to_string());
            Box::pin(async move {
                tokio::task::spawn_blocking(move || {
                    catalog.upsert_product(&id, &format!("SKU-{id}"), &format!("40{id}"), &name)
                })
                .await
                .expect("catalog upsert");
            })
        }),
        keep: Box::new(cloud),
    }
}

possync_actors::cloud_contract!(real_cloud);
