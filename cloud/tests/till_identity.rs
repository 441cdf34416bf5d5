//! Till identity against a real `cloud serve` on both backends: token rotation keeps the
//! terminal's identity, a second device using a `pos_id` is refused with `POS_SYNC_POS_CLONED`
//! (nothing stored), and `GET /v1/pos/sales/held` answers which keys of a `pos_id` are held.

#[macro_use]
mod common;

use common::{expect_error, json_ok, Backend, Env};
use possync_protocol::{SaleEvent, DEVICE_NONCE_HEADER};
use possync_testkit::{conflicting_sale_event, events_body, sample_sale_event};
use serde_json::Value;
use uuid::Uuid;

on_both_backends!(
    rotation_keeps_the_identity_and_refuses_the_old_token,
    a_second_device_on_one_pos_id_is_told_it_is_a_clone_and_nothing_is_stored,
    held_keys_answer_per_pos_id_across_terminals,
);

async fn post_events(env: &Env, token: &str, nonce: Option<&str>, events: &[SaleEvent]) -> Value {
    let mut r = env
        .http
        .post(env.url("/v1/pos/sales/events"))
        .bearer_auth(token)
        .json(&events_body(events));
    if let Some(n) = nonce {
        r = r.header(DEVICE_NONCE_HEADER, n);
    }
    json_ok(r.send().await.expect("request sent")).await
}

fn metric(text: &str, series: &str) -> f64 {
    possync_testkit::metrics_text::sample(text, series)
        .unwrap_or_else(|| panic!("no {series} in metrics"))
}

async fn rotation_keeps_the_identity_and_refuses_the_old_token(backend: Backend) {
    let env = Env::start(backend);
    let (terminal, first) = env.terminal("b1");
    let pos = Uuid::new_v4();
    let sale = |id| sample_sale_event(terminal, pos, id, "b1");
    post_events(&env, &first, None, &[sale(1)]).await;

    let second = env.cloud.rotate_terminal(terminal, 0).expect("rotate");
    assert_ne!(second, first);
    let r = env.get("/v1/pos/sync/status", Some(&first)).await;
    expect_error(r, 401, "POS_SYNC_UNAUTHORIZED").await;
    // Same terminal, same keys: the sale made before the rotation is a duplicate now.
    let v = post_events(&env, &second, None, &[sale(1), sale(2)]).await;
    assert_eq!(v["results"][0]["status"], "duplicate", "{v}");
    assert_eq!(v["results"][1]["status"], "accepted", "{v}");
    let status = json_ok(env.get("/v1/pos/sync/status", Some(&second)).await).await;
    assert_eq!(status["terminal_id"], terminal.to_string());
    assert_eq!(status["pos"][0]["highest_contiguous"], 2, "{status}");

    // With a grace both work until it ends; a second rotation retires the older one.
    let third = env.cloud.rotate_terminal(terminal, 600).expect("rotate");
    json_ok(env.get("/v1/pos/sync/status", Some(&second)).await).await;
    json_ok(env.get("/v1/pos/sync/status", Some(&third)).await).await;
    let fourth = env.cloud.rotate_terminal(terminal, 600).expect("rotate");
    expect_error(
        env.get("/v1/pos/sync/status", Some(&second)).await,
        401,
        "POS_SYNC_UNAUTHORIZED",
    )
    .await;
    json_ok(env.get("/v1/pos/sync/status", Some(&fourth)).await).await;

    // Unknown and revoked terminals cannot be rotated; the CLI says so and exits non-zero.
    assert!(env.cloud.rotate_terminal(Uuid::now_v7(), 0).is_err());
    env.cloud.revoke_terminal(terminal).expect("revoke");
    let err = env.cloud.rotate_terminal(terminal, 0).expect_err("revoked");
    assert!(err.to_string().contains("unknown or revoked"), "{err:#}");
    expect_error(
        env.get("/v1/pos/sync/status", Some(&third)).await,
        401,
        "POS_SYNC_UNAUTHORIZED",
    )
    .await;
    assert_eq!(env.sales_count().await, 2);
}

async fn a_second_device_on_one_pos_id_is_told_it_is_a_clone_and_nothing_is_stored(
    backend: Backend,
) {
    let env = Env::start(backend);
    let (terminal, token) = env.terminal("b1");
    let pos = Uuid::new_v4();
    let (original, copy) = (Uuid::new_v4().to_string(), Uuid::new_v4().to_string());
    let sale = |id| sample_sale_event(terminal, pos, id, "b1");

    let v = post_events(&env, &token, Some(&original), &[sale(1)]).await;
    assert_eq!(v["results"][0]["status"], "accepted", "{v}");
    // The copy's own sale 2 and another pos_id of its own in the same request.
    let own_pos = sample_sale_event(terminal, Uuid::new_v4(), 1, "b1");
    let v = post_events(&env, &token, Some(&copy), &[sale(2), own_pos]).await;
    let r = &v["results"][0];
    assert_eq!(r["status"], "conflict", "{v}");
    assert_eq!(r["code"], "POS_SYNC_POS_CLONED", "{v}");
    assert_eq!(r["cloud_event_id"], Value::Null, "{v}");
    assert_eq!(
        v["results"][1]["status"], "accepted",
        "its own pos_id is its own: {v}"
    );
    assert_eq!(
        env.sales_count().await,
        2,
        "the refused event was not stored"
    );
    // The original device still delivers sale 2 under the pos_id it owns.
    let v = post_events(&env, &token, Some(&original), &[sale(2)]).await;
    assert_eq!(v["results"][0]["status"], "accepted", "{v}");
    // No header: not checked (terminals from before device nonces). A payload conflict is
    // counted as a sign of a shared pos_id too.
    let v = post_events(&env, &token, None, &[conflicting_sale_event(&sale(1))]).await;
    assert_eq!(v["results"][0]["status"], "conflict", "{v}");
    assert_eq!(v["results"][0]["code"], "POS_SYNC_EVENT_DUPLICATE", "{v}");

    let r = env
        .http
        .post(env.url("/v1/pos/sales/events"))
        .bearer_auth(&token)
        .header(DEVICE_NONCE_HEADER, "not a nonce!")
        .json(&events_body(&[sale(3)]))
        .send()
        .await
        .expect("sent");
    expect_error(r, 400, "POS_SYNC_EVENT_INVALID").await;

    let text = env
        .get("/metrics", None)
        .await
        .text()
        .await
        .expect("metrics");
    assert_eq!(
        metric(&text, "pos_identity_conflicts{reason=\"device\"}"),
        1.0
    );
    assert_eq!(
        metric(&text, "pos_identity_conflicts{reason=\"payload\"}"),
        1.0
    );
    let log = std::fs::read_to_string(env.cloud.log_path()).expect("cloud log");
    assert!(
        log.lines().any(|l| l.contains("POS_SYNC_POS_CLONED")
            && l.contains(&pos.to_string())
            && l.contains(&terminal.to_string())),
        "the clone is in the cloud's log with its terminal and pos_id"
    );
}

async fn held_keys_answer_per_pos_id_across_terminals(backend: Backend) {
    let env = Env::start(backend);
    let (old, old_token) = env.terminal("b1");
    let (_new, new_token) = env.terminal("b2");
    let pos = Uuid::new_v4();
    let events: Vec<SaleEvent> = (1..=5)
        .map(|i| sample_sale_event(old, pos, i, "b1"))
        .collect();
    post_events(&env, &old_token, None, &events).await;

    // The till re-enrolled as another terminal (even of another branch) asks about its pos_id.
    let path = format!("/v1/pos/sales/held?pos_id={pos}&after=1&limit=3");
    let page = json_ok(env.get(&path, Some(&new_token)).await).await;
    assert_eq!(page["pos_id"], pos.to_string());
    let ids: Vec<i64> = page["keys"]
        .as_array()
        .expect("keys")
        .iter()
        .map(|k| k["local_event_id"].as_i64().expect("id"))
        .collect();
    assert_eq!(ids, vec![2, 3, 4]);
    assert_eq!(page["next_after"], 4);
    assert_eq!(page["keys"][0]["terminal_id"], old.to_string());
    assert_eq!(page["keys"][0]["payload_hash"], events[1].payload_hash());
    let last = json_ok(
        env.get(
            &format!("/v1/pos/sales/held?pos_id={pos}&after=4"),
            Some(&new_token),
        )
        .await,
    )
    .await;
    assert_eq!(last["keys"].as_array().map(Vec::len), Some(1));
    assert_eq!(last["next_after"], Value::Null);

    for bad in [
        "/v1/pos/sales/held",
        "/v1/pos/sales/held?pos_id=nope",
        "/v1/pos/sales/held?pos_id=00000000-0000-0000-0000-000000000000&after=-1",
        "/v1/pos/sales/held?pos_id=00000000-0000-0000-0000-000000000000&limit=0",
    ] {
        expect_error(
            env.get(bad, Some(&new_token)).await,
            400,
            "POS_SYNC_EVENT_INVALID",
        )
        .await;
    }
    expect_error(env.get(&path, None).await, 401, "POS_SYNC_UNAUTHORIZED").await;
}
