//! The cloud HTTP API against a real `cloud serve` process, written once and run on both
//! backends: a fresh PostgreSQL database per test (`pg::*`) and the embedded SQLite default
//! (`sqlite::*`).

#[macro_use]
mod common;

use common::{expect_error, json_ok, Backend, Env};
use possync_testkit::{
    arithmetic_failure_event, conflicting_sale_event, events_body, sample_sale_event,
};
use serde_json::{json, Value};
use uuid::Uuid;

on_both_backends!(
    scenarios =>
    health_readiness_metrics_and_request_ids,
    authentication_failures,
    admin_routes_refuse_terminal_tokens_and_vice_versa,
    sales_ingest_accepts_rejects_duplicates_and_conflicts,
    foreign_terminal_or_branch_is_forbidden_and_nothing_stored,
    malformed_and_oversized_event_bodies,
    snapshot_pages_are_branch_scoped_and_resumable,
    delta_is_branch_scoped_with_tombstones_and_410_after_purge,
    reconcile_verify_plan_and_limits,
    fingerprints_are_cached_per_version_and_validated,
    terminal_rate_limit_answers_429_with_retry_after,
    address_rate_limit_applies_before_auth,
    forwarded_addresses_count_only_from_trusted_proxies,
    concurrent_duplicates_over_separate_connections_store_once,
    cli_catalog_commands_feed_the_snapshot,
    responses_are_gzipped_when_accepted,
    crash_and_restart_keep_every_acknowledged_sale,
    delta_reader_sees_every_change_of_concurrent_writers,
);

fn entity(t: &str, id: &str, branch: Option<&str>, data: Value) -> Value {
    json!({"type": t, "id": id, "branch_id": branch, "data": data})
}

fn keys_of(entities: &Value) -> Vec<String> {
    entities
        .as_array()
        .expect("entity array")
        .iter()
        .map(|e| {
            format!(
                "{}/{}",
                e["type"].as_str().unwrap_or(""),
                e["id"].as_str().unwrap_or("")
            )
        })
        .collect()
}

mod scenarios {
    use super::*;

    /// Behind a trusted proxy each forwarded client has its own address bucket; without
    /// `--trusted-proxies` the headers are ignored, so a client cannot pick its bucket.
    pub async fn forwarded_addresses_count_only_from_trusted_proxies(b: Backend) {
        async fn statuses(env: &Env, xff: &str, n: usize) -> Vec<u16> {
            let http = reqwest::Client::new();
            let mut out = Vec::new();
            for _ in 0..n {
                let r = http
                    .get(env.url("/v1/pos/sync/status"))
                    .header("x-forwarded-for", xff)
                    .send()
                    .await
                    .expect("request");
                out.push(r.status().as_u16());
            }
            out
        }
        let limits = [
            "--address-rate-per-second",
            "1",
            "--address-rate-burst",
            "2",
        ];
        // Trusted: 198.51.100.1 spends its own burst; 198.51.100.2 still has its own.
        let mut args = limits.to_vec();
        args.extend(["--trusted-proxies", "127.0.0.1/32,::1"]);
        let env = Env::start_with(b, &args);
        assert_eq!(statuses(&env, "198.51.100.1", 3).await, [401, 401, 429]);
        assert_eq!(statuses(&env, "6.6.6.6, 198.51.100.2", 2).await, [401, 401]);
        drop(env);
        // Untrusted: the header changes nothing, everyone is 127.0.0.1.
        let env = Env::start_with(b, &limits);
        assert_eq!(statuses(&env, "198.51.100.1", 2).await, [401, 401]);
        assert_eq!(statuses(&env, "198.51.100.2", 1).await, [429]);
    }

    /// Two terminals of one branch ask for fingerprints: the tree is read from the database
    /// once per catalog version; a catalog change moves the answer; bad nodes are 400.
    pub async fn fingerprints_are_cached_per_version_and_validated(b: Backend) {
        let env = Env::start(b);
        env.admin_upsert(json!([
            entity("product", "p1", None, json!({"name": "Tea"})),
            entity("product", "p2", None, json!({"name": "Coffee"})),
        ]))
        .await;
        let (_, t1) = env.terminal("b1");
        let (_, t2) = env.terminal("b1");
        let level1: Vec<Value> = (0..16).map(|i| json!({"level": 1, "index": i})).collect();
        let ask = json!({ "nodes": level1 });
        let a = json_ok(
            env.post_json("/v1/pos/catalog/fingerprints", Some(&t1), &ask)
                .await,
        )
        .await;
        let b2 = json_ok(
            env.post_json("/v1/pos/catalog/fingerprints", Some(&t2), &ask)
                .await,
        )
        .await;
        assert_eq!(a, b2);
        assert_eq!(a["nodes"].as_array().map(Vec::len), Some(16));
        let total: u64 = a["nodes"]
            .as_array()
            .expect("nodes")
            .iter()
            .map(|n| n["count"].as_u64().unwrap_or(0))
            .sum();
        assert_eq!(total, 2);
        let metrics = env
            .get("/metrics", None)
            .await
            .text()
            .await
            .expect("metrics");
        assert!(
            metrics.contains("fingerprint_tree_builds 1"),
            "one build for two terminals: {metrics}"
        );
        env.admin_upsert(json!([entity(
            "product",
            "p3",
            None,
            json!({"name": "Milk"})
        )]))
        .await;
        let c = json_ok(
            env.post_json("/v1/pos/catalog/fingerprints", Some(&t1), &ask)
                .await,
        )
        .await;
        assert_ne!(a["catalog_version"], c["catalog_version"]);
        assert_ne!(a["nodes"], c["nodes"]);
        for bad in [
            json!({"nodes": []}),
            json!({"nodes": [{"level": 4, "index": 0}]}),
            json!({"nodes": [{"level": 1, "index": 16}]}),
        ] {
            expect_error(
                env.post_json("/v1/pos/catalog/fingerprints", Some(&t1), &bad)
                    .await,
                400,
                "POS_CATALOG_RECONCILE_FAILED",
            )
            .await;
        }
        expect_error(
            env.post_json(
                "/v1/pos/catalog/reconcile/leaves",
                Some(&t1),
                &json!({"mode": "verify", "leaves": [5000], "entries": []}),
            )
            .await,
            400,
            "POS_CATALOG_RECONCILE_FAILED",
        )
        .await;
    }

    pub async fn health_readiness_metrics_and_request_ids(b: Backend) {
        let env = Env::start(b);
        let r = env.get("/healthz", None).await;
        let rid = r
            .headers()
            .get("x-request-id")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
            .expect("x-request-id on every response");
        assert!(
            Uuid::parse_str(&rid).is_ok(),
            "generated ids are UUIDs: {rid}"
        );
        assert_eq!(json_ok(r).await["status"], "ok");
        assert_eq!(
            json_ok(env.get("/readyz", None).await).await["status"],
            "ready"
        );

        // A client's own request id is echoed; a hostile one is replaced.
        let r = env
            .http
            .get(env.url("/healthz"))
            .header("x-request-id", "trace-abc.123")
            .send()
            .await
            .expect("sent");
        assert_eq!(r.headers()["x-request-id"], "trace-abc.123");
        let r = env
            .http
            .get(env.url("/healthz"))
            .header("x-request-id", "has spaces and ; stuff")
            .send()
            .await
            .expect("sent");
        assert_ne!(r.headers()["x-request-id"], "has spaces and ; stuff");

        // Exercise ingestion once so labelled series exist, then read /metrics.
        let (tid, token) = env.terminal("b1");
        let e = sample_sale_event(tid, Uuid::now_v7(), 1, "b1");
        json_ok(
            env.post_json("/v1/pos/sales/events", Some(&token), &events_body(&[e]))
                .await,
        )
        .await;
        let r = env.get("/metrics", None).await;
        assert_eq!(r.status(), 200);
        let text = r.text().await.expect("metrics text");
        for name in [
            "synced_events",
            "queued_events",
            "reconcile_runs",
            "delta_sync_runs",
            "snapshot_pages",
            "http_request_duration_seconds",
            "errors_total",
            "rate_limited_total",
            "branch_actors",
            "ingest_batch_size",
        ] {
            assert!(text.contains(name), "/metrics lacks {name}:\n{text}");
        }
        assert!(
            text.contains("synced_events{status=\"accepted\"} 1"),
            "the accepted sale is counted:\n{text}"
        );
    }

    pub async fn authentication_failures(b: Backend) {
        let env = Env::start(b);
        let (tid, token) = env.terminal("b1");
        for path in [
            "/v1/pos/catalog/snapshot",
            "/v1/pos/catalog/delta?since=0",
            "/v1/pos/sync/status",
        ] {
            expect_error(env.get(path, None).await, 401, "POS_SYNC_UNAUTHORIZED").await;
            expect_error(
                env.get(path, Some("not-a-real-token")).await,
                401,
                "POS_SYNC_UNAUTHORIZED",
            )
            .await;
        }
        let body = events_body(&[sample_sale_event(tid, Uuid::now_v7(), 1, "b1")]);
        expect_error(
            env.post_json("/v1/pos/sales/events", None, &body).await,
            401,
            "POS_SYNC_UNAUTHORIZED",
        )
        .await;
        expect_error(
            env.post_json("/v1/pos/catalog/reconcile", None, &json!({}))
                .await,
            401,
            "POS_SYNC_UNAUTHORIZED",
        )
        .await;

        // Valid until revoked, refused on the very next request after.
        json_ok(env.get("/v1/pos/sync/status", Some(&token)).await).await;
        env.cloud.revoke_terminal(tid).expect("revoke");
        let v = expect_error(
            env.get("/v1/pos/sync/status", Some(&token)).await,
            401,
            "POS_SYNC_UNAUTHORIZED",
        )
        .await;
        assert_eq!(v["error"]["retryable"], false);
        expect_error(
            env.post_json("/v1/pos/sales/events", Some(&token), &body)
                .await,
            401,
            "POS_SYNC_UNAUTHORIZED",
        )
        .await;
        assert_eq!(env.sales_count().await, 0);
    }

    pub async fn admin_routes_refuse_terminal_tokens_and_vice_versa(b: Backend) {
        let env = Env::start(b);
        let (_, token) = env.terminal("b1");
        let admin = env.cloud.admin_token.clone();
        for path in ["/v1/admin/terminals", "/v1/admin/sales/summary"] {
            expect_error(
                env.get(path, Some(&token)).await,
                401,
                "POS_SYNC_UNAUTHORIZED",
            )
            .await;
            expect_error(env.get(path, None).await, 401, "POS_SYNC_UNAUTHORIZED").await;
            json_ok(env.get(path, Some(&admin)).await).await;
        }
        expect_error(
            env.post_json(
                "/v1/admin/catalog/upsert",
                Some(&token),
                &json!({"entities": [entity("product", "p1", None, json!({}))]}),
            )
            .await,
            401,
            "POS_SYNC_UNAUTHORIZED",
        )
        .await;
        expect_error(
            env.post_json(
                "/v1/admin/catalog/delete",
                Some(&token),
                &json!({"entities": [{"type": "product", "id": "p1"}]}),
            )
            .await,
            401,
            "POS_SYNC_UNAUTHORIZED",
        )
        .await;
        expect_error(
            env.get("/v1/pos/sync/status", Some(&admin)).await,
            401,
            "POS_SYNC_UNAUTHORIZED",
        )
        .await;
        let list = json_ok(env.get("/v1/admin/terminals", Some(&admin)).await).await;
        let listed = list["terminals"].to_string();
        assert!(!listed.contains(&token), "admin views never show tokens");
    }

    pub async fn sales_ingest_accepts_rejects_duplicates_and_conflicts(b: Backend) {
        let env = Env::start(b);
        let (tid, token) = env.terminal("b1");
        let pos = Uuid::now_v7();
        let e1 = sample_sale_event(tid, pos, 1, "b1");
        let e2 = sample_sale_event(tid, pos, 2, "b1");
        let bad_math = arithmetic_failure_event(tid, pos, 3, "b1");
        let mut missing_payload =
            serde_json::to_value(sample_sale_event(tid, pos, 4, "b1")).expect("event json");
        missing_payload
            .as_object_mut()
            .expect("object")
            .remove("payload");
        let e5 = sample_sale_event(tid, pos, 5, "b1");
        let body = json!({"events": [e1, e2, bad_math, missing_payload, e5]});
        let r = env
            .http
            .post(env.url("/v1/pos/sales/events"))
            .bearer_auth(&token)
            .header("x-sync-attempt", "3")
            .json(&body)
            .send()
            .await
            .expect("sent");
        let v = json_ok(r).await;
        let results = v["results"].as_array().expect("results");
        assert_eq!(results.len(), 5, "one result per event, in order");
        let statuses: Vec<&str> = results
            .iter()
            .map(|r| r["status"].as_str().unwrap_or(""))
            .collect();
        assert_eq!(
            statuses,
            ["accepted", "accepted", "rejected", "rejected", "accepted"]
        );
        let ids: Vec<i64> = results
            .iter()
            .map(|r| r["local_event_id"].as_i64().unwrap_or(-1))
            .collect();
        assert_eq!(ids, [1, 2, 3, 4, 5]);
        assert_eq!(results[2]["code"], "POS_SYNC_EVENT_INVALID");
        assert!(results[2]["message"]
            .as_str()
            .unwrap_or("")
            .contains("arithmetic"));
        assert_eq!(results[3]["code"], "POS_SYNC_EVENT_INVALID");
        assert!(results[0]["code"].is_null());
        let first_id = results[0]["cloud_event_id"].clone();
        assert!(first_id.is_string());
        assert_eq!(env.sales_count().await, 3);

        // The same delivery again: duplicates with the first ingestion's ids, nothing new.
        let v = json_ok(
            env.post_json(
                "/v1/pos/sales/events",
                Some(&token),
                &events_body(&[e1.clone(), e2.clone()]),
            )
            .await,
        )
        .await;
        assert_eq!(v["results"][0]["status"], "duplicate");
        assert_eq!(v["results"][0]["code"], "POS_SYNC_EVENT_DUPLICATE");
        assert_eq!(v["results"][0]["cloud_event_id"], first_id);
        assert_eq!(v["results"][1]["status"], "duplicate");

        // Same key, different payload: conflict, the first stays.
        let v = json_ok(
            env.post_json(
                "/v1/pos/sales/events",
                Some(&token),
                &events_body(&[conflicting_sale_event(&e1)]),
            )
            .await,
        )
        .await;
        assert_eq!(v["results"][0]["status"], "conflict");
        assert_eq!(v["results"][0]["code"], "POS_SYNC_EVENT_DUPLICATE");
        assert_eq!(v["results"][0]["cloud_event_id"], first_id);
        assert_eq!(env.sales_count().await, 3);

        // An empty batch is fine and stores nothing.
        let v = json_ok(
            env.post_json("/v1/pos/sales/events", Some(&token), &json!({"events": []}))
                .await,
        )
        .await;
        assert_eq!(v["results"], json!([]));

        // Sync status: 1 and 2 contiguous, 5 above a gap.
        let s = json_ok(env.get("/v1/pos/sync/status", Some(&token)).await).await;
        assert_eq!(s["terminal_id"], tid.to_string());
        let p = &s["pos"][0];
        assert_eq!(p["pos_id"], pos.to_string());
        assert_eq!(p["highest_contiguous"], 2);
        assert_eq!(p["ids_above_gap"], json!([5]));
        assert_eq!(p["total_events"], 3);

        // The log carries the sync fields.
        let log = std::fs::read_to_string(env.cloud.log_path()).expect("log file");
        let line = log
            .lines()
            .find(|l| l.contains("\"sale event\"") && l.contains("\"status\":\"rejected\""))
            .expect("a JSON log line per event");
        let j: Value = serde_json::from_str(line).expect("JSON log line");
        assert_eq!(j["terminalId"], tid.to_string());
        assert_eq!(j["branchId"], "b1");
        assert_eq!(j["syncAttempt"], 3);
        assert_eq!(j["errorCode"], "POS_SYNC_EVENT_INVALID");
        assert!(j["eventId"].is_i64());
    }

    pub async fn foreign_terminal_or_branch_is_forbidden_and_nothing_stored(b: Backend) {
        let env = Env::start(b);
        let (tid, token) = env.terminal("b1");
        let (other_tid, _) = env.terminal("b1");
        let pos = Uuid::now_v7();
        let mine = sample_sale_event(tid, pos, 1, "b1");
        let other_terminal = sample_sale_event(other_tid, pos, 2, "b1");
        let other_branch = sample_sale_event(tid, pos, 3, "b2");
        for stranger in [other_terminal, other_branch] {
            let v = expect_error(
                env.post_json(
                    "/v1/pos/sales/events",
                    Some(&token),
                    &events_body(&[mine.clone(), stranger]),
                )
                .await,
                403,
                "POS_SYNC_UNAUTHORIZED",
            )
            .await;
            assert_eq!(v["error"]["retryable"], false);
        }
        assert_eq!(
            env.sales_count().await,
            0,
            "nothing of a refused request is stored"
        );
        let s = json_ok(env.get("/v1/pos/sync/status", Some(&token)).await).await;
        assert_eq!(s["pos"], json!([]));
    }

    pub async fn malformed_and_oversized_event_bodies(b: Backend) {
        let env = Env::start(b);
        let (tid, token) = env.terminal("b1");
        let path = "/v1/pos/sales/events";
        expect_error(
            env.post_raw(path, &token, "application/json", b"{not json".to_vec())
                .await,
            400,
            "POS_SYNC_EVENT_INVALID",
        )
        .await;
        expect_error(
            env.post_raw(
                path,
                &token,
                "application/json",
                b"{\"events\": 5}".to_vec(),
            )
            .await,
            400,
            "POS_SYNC_EVENT_INVALID",
        )
        .await;
        expect_error(
            env.post_raw(path, &token, "text/plain", b"{\"events\": []}".to_vec())
                .await,
            400,
            "POS_SYNC_EVENT_INVALID",
        )
        .await;
        // More than 500 events.
        let pos = Uuid::now_v7();
        let many: Vec<_> = (1..=501)
            .map(|i| sample_sale_event(tid, pos, i, "b1"))
            .collect();
        let body = serde_json::to_vec(&events_body(&many)).expect("json");
        assert!(
            body.len() < 1024 * 1024,
            "the count limit is what trips here"
        );
        expect_error(
            env.post_raw(path, &token, "application/json", body).await,
            413,
            "POS_SYNC_EVENT_INVALID",
        )
        .await;
        // Over 1 MiB.
        let mut huge = b"{\"events\": [\"".to_vec();
        huge.extend(std::iter::repeat_n(b'x', 1024 * 1024 + 10));
        huge.extend(b"\"]}");
        expect_error(
            env.post_raw(path, &token, "application/json", huge).await,
            413,
            "POS_SYNC_EVENT_INVALID",
        )
        .await;
        assert_eq!(env.sales_count().await, 0);
        // The server is still fine.
        json_ok(env.get("/healthz", None).await).await;
    }

    async fn seed_catalog(env: &Env) {
        env.admin_upsert(json!([
            entity(
                "product",
                "p1",
                None,
                json!({"name": "Coffee", "sku": "C1"})
            ),
            entity("product", "p2", None, json!({"name": "Tea", "sku": "T1"})),
            entity("price", "b1-p1", Some("b1"), json!({"amount_minor": 250})),
            entity("price", "b2-p1", Some("b2"), json!({"amount_minor": 990})),
            entity("tax_rate", "std", None, json!({"rate_bp": 2000})),
        ]))
        .await;
    }

    pub async fn snapshot_pages_are_branch_scoped_and_resumable(b: Backend) {
        let env = Env::start(b);
        seed_catalog(&env).await;
        let (_, t1) = env.terminal("b1");
        let (_, t2) = env.terminal("b2");

        // Page through b1's snapshot two at a time.
        let mut seen = Vec::new();
        let mut cursor: Option<String> = None;
        let mut version = None;
        for _ in 0..10 {
            let path = match &cursor {
                None => "/v1/pos/catalog/snapshot?limit=2".to_string(),
                Some(c) => format!("/v1/pos/catalog/snapshot?limit=2&cursor={c}"),
            };
            let page = json_ok(env.get(&path, Some(&t1)).await).await;
            assert_eq!(page["total"], 4, "{page}");
            let v = page["snapshot_version"].as_i64().expect("version");
            assert_eq!(
                *version.get_or_insert(v),
                v,
                "one snapshot version across pages"
            );
            assert!(page["entities"].as_array().expect("entities").len() <= 2);
            for e in page["entities"].as_array().expect("entities") {
                assert_eq!(e["hash"], possync_protocol::entity_hash(&e["data"]));
                assert!(e["branch_id"].is_null() || e["branch_id"] == "b1", "{e}");
            }
            seen.extend(keys_of(&page["entities"]));
            match page["next_cursor"].as_str() {
                Some(c) => cursor = Some(c.to_string()),
                None => break,
            }
        }
        assert_eq!(
            seen,
            ["price/b1-p1", "product/p1", "product/p2", "tax_rate/std"],
            "ordered by (type, id), b2's price absent"
        );
        let b1_price = json_ok(env.get("/v1/pos/catalog/snapshot", Some(&t1)).await).await;
        let price = b1_price["entities"]
            .as_array()
            .expect("entities")
            .iter()
            .find(|e| e["type"] == "price")
            .cloned()
            .expect("b1 price");
        assert_eq!(price["data"]["amount_minor"], 250);

        let b2 = json_ok(
            env.get("/v1/pos/catalog/snapshot?limit=1000", Some(&t2))
                .await,
        )
        .await;
        let b2_price = b2["entities"]
            .as_array()
            .expect("entities")
            .iter()
            .find(|e| e["type"] == "price")
            .cloned()
            .expect("b2 price");
        assert_eq!(b2_price["data"]["amount_minor"], 990);

        // Bad cursor and bad limit → 400; huge limit is clamped.
        expect_error(
            env.get(
                "/v1/pos/catalog/snapshot?cursor=definitely-not-a-cursor",
                Some(&t1),
            )
            .await,
            400,
            "POS_CATALOG_SNAPSHOT_FAILED",
        )
        .await;
        expect_error(
            env.get("/v1/pos/catalog/snapshot?limit=abc", Some(&t1))
                .await,
            400,
            "POS_CATALOG_SNAPSHOT_FAILED",
        )
        .await;
        json_ok(
            env.get("/v1/pos/catalog/snapshot?limit=100000", Some(&t1))
                .await,
        )
        .await;
    }

    pub async fn delta_is_branch_scoped_with_tombstones_and_410_after_purge(b: Backend) {
        let env = Env::start(b);
        let (_, t1) = env.terminal("b1");
        seed_catalog(&env).await;
        let start = json_ok(env.get("/v1/pos/catalog/delta?since=0", Some(&t1)).await).await;
        assert_eq!(
            keys_of(&start["changes"]).len(),
            4,
            "b1 sees global + own entities only: {start}"
        );
        let versions: Vec<i64> = start["changes"]
            .as_array()
            .expect("changes")
            .iter()
            .map(|e| e["version"].as_i64().expect("version"))
            .collect();
        assert!(
            versions.windows(2).all(|w| w[0] < w[1]),
            "version order: {versions:?}"
        );
        let since = start["next_since"].as_i64().expect("next_since");

        // Paging with limit=1 returns the same changes.
        let mut paged = Vec::new();
        let mut s = 0;
        for _ in 0..10 {
            let p = json_ok(
                env.get(
                    &format!("/v1/pos/catalog/delta?since={s}&limit=1"),
                    Some(&t1),
                )
                .await,
            )
            .await;
            paged.extend(keys_of(&p["changes"]));
            s = p["next_since"].as_i64().expect("next_since");
            if !p["has_more"].as_bool().expect("has_more") {
                break;
            }
        }
        assert_eq!(paged, keys_of(&start["changes"]));

        // A delete shows up as a tombstone; a b2-only change does not show up at all.
        env.admin_delete(json!([{"type": "product", "id": "p2"}]))
            .await;
        env.admin_upsert(json!([entity(
            "price",
            "p9",
            Some("b2"),
            json!({"amount_minor": 1})
        )]))
        .await;
        let d = json_ok(
            env.get(&format!("/v1/pos/catalog/delta?since={since}"), Some(&t1))
                .await,
        )
        .await;
        let changes = d["changes"].as_array().expect("changes");
        assert_eq!(changes.len(), 1, "{d}");
        assert_eq!(changes[0]["id"], "p2");
        assert_eq!(changes[0]["deleted"], true);
        assert!(d["catalog_version"].as_i64().expect("cv") > since);

        for bad in ["-1", "abc", "1.5"] {
            expect_error(
                env.get(&format!("/v1/pos/catalog/delta?since={bad}"), Some(&t1))
                    .await,
                400,
                "POS_CATALOG_DELTA_FAILED",
            )
            .await;
        }

        // Purging the tombstone raises the horizon: an old cursor must resnapshot.
        env.cloud
            .cli(&["catalog", "purge", "--older-than-days", "0"])
            .expect("purge");
        let v = expect_error(
            env.get(&format!("/v1/pos/catalog/delta?since={since}"), Some(&t1))
                .await,
            410,
            "POS_CATALOG_DELTA_FAILED",
        )
        .await;
        assert_eq!(v["error"]["details"]["reason"], "resnapshot_required");
        assert_eq!(v["error"]["retryable"], false);
        // A current cursor still works.
        let now = d["next_since"].as_i64().expect("next_since");
        json_ok(
            env.get(&format!("/v1/pos/catalog/delta?since={now}"), Some(&t1))
                .await,
        )
        .await;
    }

    pub async fn reconcile_verify_plan_and_limits(b: Backend) {
        let env = Env::start(b);
        seed_catalog(&env).await;
        let (_, t1) = env.terminal("b1");
        let snap = json_ok(env.get("/v1/pos/catalog/snapshot", Some(&t1)).await).await;
        let entities = snap["entities"].as_array().expect("entities").clone();
        // The terminal holds everything but product/p2, a stale hash for product/p1, and a
        // stray key the cloud never had.
        let mut entries: Vec<Value> = entities
            .iter()
            .filter(|e| e["id"] != "p2")
            .map(|e| {
                let hash = if e["type"] == "product" && e["id"] == "p1" {
                    "0".repeat(64)
                } else {
                    e["hash"].as_str().expect("hash").to_string()
                };
                json!({"type": e["type"], "id": e["id"], "version": e["version"], "hash": hash})
            })
            .collect();
        entries.push(
            json!({"type": "product", "id": "zz-stray", "version": 1, "hash": "0".repeat(64)}),
        );
        entries.sort_by(|a, b| {
            format!(
                "{}/{}",
                a["type"].as_str().unwrap_or(""),
                a["id"].as_str().unwrap_or("")
            )
            .cmp(&format!(
                "{}/{}",
                b["type"].as_str().unwrap_or(""),
                b["id"].as_str().unwrap_or("")
            ))
        });
        let range = json!({"after": null, "through": null});
        let verify = json_ok(
            env.post_json(
                "/v1/pos/catalog/reconcile",
                Some(&t1),
                &json!({"mode": "verify", "range": range, "entries": entries}),
            )
            .await,
        )
        .await;
        assert_eq!(verify["summary"]["upserts"], 2, "{verify}");
        assert_eq!(verify["summary"]["deletes"], 1, "{verify}");
        assert_eq!(verify["summary"]["unchanged"], 2, "{verify}");
        assert_eq!(verify["plan"]["upserts"], json!([]));
        assert_eq!(verify["plan"]["deletes"], json!([]));

        let plan = json_ok(
            env.post_json(
                "/v1/pos/catalog/reconcile",
                Some(&t1),
                &json!({"mode": "plan", "range": range, "entries": entries}),
            )
            .await,
        )
        .await;
        let mut up = keys_of(&plan["plan"]["upserts"]);
        up.sort();
        assert_eq!(up, ["product/p1", "product/p2"]);
        assert_eq!(
            plan["plan"]["deletes"],
            json!([{"type": "product", "id": "zz-stray"}])
        );
        // Never another branch's entity.
        assert!(!plan.to_string().contains("990"), "{plan}");

        // Malformed manifest → 400; wrong content type → 400.
        expect_error(
            env.post_json(
                "/v1/pos/catalog/reconcile",
                Some(&t1),
                &json!({"mode": "sideways", "entries": []}),
            )
            .await,
            400,
            "POS_CATALOG_RECONCILE_FAILED",
        )
        .await;
        expect_error(
            env.post_raw(
                "/v1/pos/catalog/reconcile",
                &t1,
                "application/json",
                b"[[[".to_vec(),
            )
            .await,
            400,
            "POS_CATALOG_RECONCILE_FAILED",
        )
        .await;
        expect_error(
            env.post_raw(
                "/v1/pos/catalog/reconcile",
                &t1,
                "text/csv",
                b"a,b".to_vec(),
            )
            .await,
            400,
            "POS_CATALOG_RECONCILE_FAILED",
        )
        .await;
        // Over the entry limit → 413 naming the limit.
        let many: Vec<Value> = (0..2001)
            .map(|i| json!({"type": "product", "id": format!("k{i:05}"), "version": 1, "hash": "0".repeat(64)}))
            .collect();
        let v = expect_error(
            env.post_json(
                "/v1/pos/catalog/reconcile",
                Some(&t1),
                &json!({"mode": "verify", "entries": many}),
            )
            .await,
            413,
            "POS_CATALOG_MANIFEST_TOO_LARGE",
        )
        .await;
        assert_eq!(v["error"]["details"]["max_entries"], 2000);
        // Over the byte limit → 413 as well.
        let mut huge = b"{\"mode\":\"verify\",\"entries\":[],\"pad\":\"".to_vec();
        huge.extend(std::iter::repeat_n(b'x', 1024 * 1024 + 1));
        huge.extend(b"\"}");
        expect_error(
            env.post_raw("/v1/pos/catalog/reconcile", &t1, "application/json", huge)
                .await,
            413,
            "POS_CATALOG_MANIFEST_TOO_LARGE",
        )
        .await;
    }

    pub async fn terminal_rate_limit_answers_429_with_retry_after(b: Backend) {
        let env = Env::start_with(
            b,
            &[
                "--rate-per-second",
                "1",
                "--rate-burst",
                "3",
                "--address-rate-per-second",
                "100000",
                "--address-rate-burst",
                "100000",
            ],
        );
        let (_, token) = env.terminal("b1");
        let mut limited = None;
        for _ in 0..10 {
            let r = env.get("/v1/pos/sync/status", Some(&token)).await;
            if r.status() == 429 {
                limited = Some(r);
                break;
            }
        }
        let r = limited.expect("a burst of 3 at 1/s cannot admit 10 requests");
        let retry: u64 = r.headers()["retry-after"]
            .to_str()
            .expect("ascii")
            .parse()
            .expect("whole seconds");
        assert!(retry >= 1);
        let v = expect_error(r, 429, "POS_SYNC_RATE_LIMITED").await;
        assert_eq!(v["error"]["retryable"], true);
        // Another terminal has its own bucket.
        let (_, other) = env.terminal("b1");
        json_ok(env.get("/v1/pos/sync/status", Some(&other)).await).await;
        let m = env
            .get("/metrics", None)
            .await
            .text()
            .await
            .expect("metrics");
        assert!(m.contains("rate_limited_total{bucket=\"terminal\"}"), "{m}");
    }

    pub async fn address_rate_limit_applies_before_auth(b: Backend) {
        let env = Env::start_with(
            b,
            &[
                "--address-rate-per-second",
                "1",
                "--address-rate-burst",
                "3",
            ],
        );
        let mut statuses = Vec::new();
        for _ in 0..10 {
            let r = env.get("/v1/pos/sync/status", Some("bogus-token")).await;
            statuses.push(r.status().as_u16());
            if r.status() == 429 {
                assert!(r.headers().contains_key("retry-after"));
                expect_error(r, 429, "POS_SYNC_RATE_LIMITED").await;
                break;
            }
        }
        assert_eq!(statuses.first(), Some(&401));
        assert_eq!(statuses.last(), Some(&429), "{statuses:?}");
        // Health and metrics stay reachable for operators.
        json_ok(env.get("/healthz", None).await).await;
    }

    pub async fn concurrent_duplicates_over_separate_connections_store_once(b: Backend) {
        let env = Env::start(b);
        let (tid, token) = env.terminal("b1");
        let event = sample_sale_event(tid, Uuid::now_v7(), 1, "b1");
        let body = events_body(&[event]);
        let url = env.url("/v1/pos/sales/events");
        let mut tasks = Vec::new();
        for _ in 0..8 {
            // A client per task: its own connection.
            let client = reqwest::Client::new();
            let (url, token, body) = (url.clone(), token.clone(), body.clone());
            tasks.push(tokio::spawn(async move {
                let r = client
                    .post(url)
                    .bearer_auth(token)
                    .json(&body)
                    .send()
                    .await
                    .expect("sent");
                json_ok(r).await
            }));
        }
        let mut statuses = Vec::new();
        let mut ids = std::collections::HashSet::new();
        for t in tasks {
            let v = t.await.expect("task");
            statuses.push(v["results"][0]["status"].as_str().unwrap_or("").to_string());
            ids.insert(v["results"][0]["cloud_event_id"].to_string());
        }
        assert_eq!(
            statuses.iter().filter(|s| *s == "accepted").count(),
            1,
            "{statuses:?}"
        );
        assert_eq!(
            statuses.iter().filter(|s| *s == "duplicate").count(),
            7,
            "{statuses:?}"
        );
        assert_eq!(ids.len(), 1, "every answer names the one stored event");
        assert_eq!(env.sales_count().await, 1);
    }

    pub async fn cli_catalog_commands_feed_the_snapshot(b: Backend) {
        let env = Env::start(b);
        let (_, t1) = env.terminal("b1");
        env.cloud
            .cli(&[
                "catalog",
                "upsert",
                "--type",
                "product",
                "--id",
                "p1",
                "--data",
                "{\"name\":\"Tea\"}",
            ])
            .expect("upsert");
        let file = env.cloud.data_dir().join("import.csv");
        std::fs::write(
            &file,
            "type,id,branch_id,data\nproduct,p2,,{\"name\":\"Bun\"}\nprice,p2,b1,\"{\"\"amount_minor\"\":120}\"\n",
        )
        .expect("write csv");
        let out = env
            .cloud
            .cli(&["catalog", "import", file.to_str().expect("utf-8 path")])
            .expect("import");
        assert!(out.contains("\"imported\":2"), "{out}");
        env.cloud
            .cli(&["catalog", "delete", "--type", "product", "--id", "p1"])
            .expect("delete");
        let snap = json_ok(env.get("/v1/pos/catalog/snapshot", Some(&t1)).await).await;
        assert_eq!(keys_of(&snap["entities"]), ["price/p2", "product/p2"]);

        // A failing command says why in one line and exits non-zero.
        let err = env
            .cloud
            .cli(&["terminal", "revoke", &Uuid::now_v7().to_string()])
            .expect_err("unknown terminal");
        assert!(err.to_string().contains("unknown"), "{err}");
        let err = env
            .cloud
            .cli(&[
                "catalog", "upsert", "--type", "product", "--id", "x", "--data", "{nope",
            ])
            .expect_err("bad json");
        assert!(err.to_string().contains("not JSON"), "{err}");
    }

    pub async fn responses_are_gzipped_when_accepted(b: Backend) {
        let env = Env::start(b);
        let client = reqwest::Client::builder()
            .no_gzip()
            .build()
            .expect("client");
        let r = client
            .get(env.url("/metrics"))
            .header("accept-encoding", "gzip")
            .send()
            .await
            .expect("sent");
        assert_eq!(r.status(), 200);
        assert_eq!(
            r.headers().get("content-encoding").map(|v| v.as_bytes()),
            Some(&b"gzip"[..])
        );
        let plain = client.get(env.url("/metrics")).send().await.expect("sent");
        assert!(plain.headers().get("content-encoding").is_none());
    }

    pub async fn crash_and_restart_keep_every_acknowledged_sale(b: Backend) {
        let mut env = Env::start(b);
        let (tid, token) = env.terminal("b1");
        let pos = Uuid::now_v7();
        let events: Vec<_> = (1..=20)
            .map(|i| sample_sale_event(tid, pos, i, "b1"))
            .collect();
        let first = json_ok(
            env.post_json("/v1/pos/sales/events", Some(&token), &events_body(&events))
                .await,
        )
        .await;
        // kill -9 right after the answer, then start again on the same database.
        env.cloud.kill().expect("kill -9");
        env.cloud.restart().expect("restart");
        let again = json_ok(
            env.post_json("/v1/pos/sales/events", Some(&token), &events_body(&events))
                .await,
        )
        .await;
        for (a, b) in first["results"]
            .as_array()
            .expect("results")
            .iter()
            .zip(again["results"].as_array().expect("results"))
        {
            assert_eq!(a["status"], "accepted");
            assert_eq!(
                b["status"], "duplicate",
                "acknowledged sales survived the crash"
            );
            assert_eq!(a["cloud_event_id"], b["cloud_event_id"]);
        }
        assert_eq!(env.sales_count().await, 20);
        // SIGTERM is a clean shutdown.
        let status = env.cloud.terminate().expect("terminate");
        assert!(status.success(), "graceful shutdown exits 0: {status}");
    }

    pub async fn delta_reader_sees_every_change_of_concurrent_writers(b: Backend) {
        let env = std::sync::Arc::new(Env::start(b));
        let (_, t1) = env.terminal("b1");
        let admin = env.cloud.admin_token.clone();
        let writers_done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));

        // Four writers, each upserting 25 distinct entities one request at a time.
        let mut writers = Vec::new();
        for w in 0..4 {
            let (env, admin) = (env.clone(), admin.clone());
            writers.push(tokio::spawn(async move {
                for i in 0..25 {
                    let r = env
                        .post_json(
                            "/v1/admin/catalog/upsert",
                            Some(&admin),
                            &json!({"entities": [entity("product", &format!("w{w}-{i:02}"), None, json!({"n": i}))]}),
                        )
                        .await;
                    json_ok(r).await;
                }
            }));
        }
        // A reader follows the delta while they write, then once more after they finish.
        let reader = {
            let (env, done) = (env.clone(), writers_done.clone());
            tokio::spawn(async move {
                let mut since = 0i64;
                let mut seen = std::collections::HashSet::new();
                loop {
                    let finished = done.load(std::sync::atomic::Ordering::SeqCst);
                    loop {
                        let p = json_ok(
                            env.get(
                                &format!("/v1/pos/catalog/delta?since={since}&limit=7"),
                                Some(&t1),
                            )
                            .await,
                        )
                        .await;
                        for k in keys_of(&p["changes"]) {
                            seen.insert(k);
                        }
                        since = p["next_since"].as_i64().expect("next_since");
                        if !p["has_more"].as_bool().expect("has_more") {
                            break;
                        }
                    }
                    if finished {
                        return seen;
                    }
                    tokio::task::yield_now().await;
                }
            })
        };
        for w in writers {
            w.await.expect("writer");
        }
        writers_done.store(true, std::sync::atomic::Ordering::SeqCst);
        let seen = reader.await.expect("reader");
        let missing: Vec<String> = (0..4)
            .flat_map(|w| (0..25).map(move |i| format!("product/w{w}-{i:02}")))
            .filter(|k| !seen.contains(k))
            .collect();
        assert!(missing.is_empty(), "the delta cursor skipped {missing:?}");
    }
}
