//! Prometheus metrics of one cloud instance, in their own [`Registry`] so that several
//! in-process servers (tests) never share or collide on counters.

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

/// Every metric the cloud exports. Cheap to clone (the collectors are shared handles).
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    /// Ingested events by outcome (`accepted`, `duplicate`, `conflict`, `rejected`).
    pub synced_events: IntCounterVec,
    /// Sales stored with a flag (`clock_behind`, `clock_ahead`, `discount_exceeds_line`).
    pub flagged_events: IntCounterVec,
    /// Events waiting in branch actors for their group commit: the ingest queue depth.
    pub queued_events: IntGauge,
    /// Reconcile requests answered, by mode.
    pub reconcile_runs: IntCounterVec,
    /// Delta pages served.
    pub delta_sync_runs: IntCounter,
    /// Snapshot pages served.
    pub snapshot_pages: IntCounter,
    /// Snapshot pages read from the database (once per page, branch view and catalog version
    /// while the page cache holds it; see `snapshot_cache`).
    pub snapshot_page_reads_total: IntCounter,
    /// Snapshot pages served from the page cache (held, or read by a concurrent request).
    pub snapshot_page_cache_hits_total: IntCounter,
    /// Snapshot pages this instance missed in memory and found in the page store shared by
    /// the instances on one PostgreSQL database (another instance read them; `db::snapshot_pages`).
    pub snapshot_page_shared_hits_total: IntCounter,
    /// Chain links verified by the periodic re-check (left unverified by ingestion because
    /// two instances stored their two ends concurrently; `ledger::recheck_links`).
    pub chain_links_rechecked: IntCounter,
    /// Snapshot page body bytes sent, by content encoding (`zstd`, `gzip`, `identity`).
    pub snapshot_page_bytes_total: IntCounterVec,
    /// Request latency by route pattern and status.
    pub http_request_duration_seconds: HistogramVec,
    /// Error responses by stable code.
    pub errors_total: IntCounterVec,
    /// Requests refused with 429, by bucket kind (`address`, `terminal`).
    pub rate_limited_total: IntCounterVec,
    /// Branch ingestion actors alive now.
    pub branch_actors: IntGauge,
    /// Events per group commit: how much batching the branch actors achieve.
    pub ingest_batch_size: Histogram,
    /// Tombstones removed by the retention task.
    pub tombstones_purged: IntCounter,
    /// Fingerprint trees built from the database (one per branch view and catalog version;
    /// every other fingerprint request is served from memory).
    pub fingerprint_tree_builds: IntCounter,
    /// Signs that one `pos_id` is used by two databases (a cloned disk, a restored backup), by
    /// how it showed: `device` (a second device nonce; the events were refused with
    /// `POS_SYNC_POS_CLONED`) or `payload` (a key came again with a different payload).
    pub pos_identity_conflicts: IntCounterVec,
    /// Sales missing below the highest stored `local_event_id` of their till, per branch
    /// (read from the database at each scrape: every instance reports the same figure).
    pub sales_gaps: IntGaugeVec,
    /// Recorded chain breaks of the sales journal, per branch (from the database).
    pub sales_chain_breaks: IntGaugeVec,
    /// Delta polls answered from memory, without a query (catalog unchanged for the branch;
    /// see `catalog_versions`).
    pub delta_polls_from_memory: IntCounter,
    /// Catalog-change notifications taken in by this instance's listener.
    pub catalog_notifications: IntCounter,
    /// 1 while the catalog listener is connected and loaded (the shortcut is on), else 0.
    pub catalog_listener_connected: IntGauge,
}

/// Registration can only fail on duplicate names, which is a programming error caught by the
/// unit test below; this keeps `Metrics::new` infallible for callers.
fn reg<C: prometheus::core::Collector + Clone + 'static>(r: &Registry, c: C) -> C {
    if let Err(e) = r.register(Box::new(c.clone())) {
        tracing::error!(error = %e, "metric registration failed");
    }
    c
}

impl Metrics {
    /// Creates and registers every metric in a fresh registry.
    pub fn new() -> Self {
        let r = Registry::new();
        let counter_vec = |name: &str, help: &str, labels: &[&str]| {
            IntCounterVec::new(Opts::new(name, help), labels)
                .unwrap_or_else(|_| unreachable_metric(name))
        };
        let synced_events = reg(
            &r,
            counter_vec(
                "synced_events",
                "Sales events processed, by status",
                &["status"],
            ),
        );
        let flagged_events = reg(
            &r,
            counter_vec(
                "flagged_events",
                "Sales events stored with a flag, by flag",
                &["flag"],
            ),
        );
        let queued_events = reg(
            &r,
            IntGauge::new("queued_events", "Events queued in branch ingestion actors")
                .unwrap_or_else(|_| unreachable_metric("queued_events")),
        );
        let reconcile_runs = reg(
            &r,
            counter_vec("reconcile_runs", "Reconcile requests answered", &["mode"]),
        );
        let delta_sync_runs = reg(
            &r,
            IntCounter::new("delta_sync_runs", "Delta pages served")
                .unwrap_or_else(|_| unreachable_metric("delta_sync_runs")),
        );
        let snapshot_pages = reg(
            &r,
            IntCounter::new("snapshot_pages", "Snapshot pages served")
                .unwrap_or_else(|_| unreachable_metric("snapshot_pages")),
        );
        let snapshot_page_reads_total = reg(
            &r,
            IntCounter::new(
                "snapshot_page_reads_total",
                "Snapshot pages read from the database",
            )
            .unwrap_or_else(|_| unreachable_metric("snapshot_page_reads_total")),
        );
        let snapshot_page_cache_hits_total = reg(
            &r,
            IntCounter::new(
                "snapshot_page_cache_hits_total",
                "Snapshot pages served from the encoded page cache",
            )
            .unwrap_or_else(|_| unreachable_metric("snapshot_page_cache_hits_total")),
        );
        let chain_links_rechecked = reg(
            &r,
            IntCounter::new(
                "chain_links_rechecked",
                "Chain links verified by the periodic re-check",
            )
            .unwrap_or_else(|_| unreachable_metric("chain_links_rechecked")),
        );
        let snapshot_page_shared_hits_total = reg(
            &r,
            IntCounter::new(
                "snapshot_page_shared_hits_total",
                "Snapshot pages found in the page store shared by the instances",
            )
            .unwrap_or_else(|_| unreachable_metric("snapshot_page_shared_hits_total")),
        );
        let snapshot_page_bytes_total = reg(
            &r,
            counter_vec(
                "snapshot_page_bytes_total",
                "Snapshot page body bytes sent, by content encoding",
                &["encoding"],
            ),
        );
        let http_request_duration_seconds = reg(
            &r,
            HistogramVec::new(
                HistogramOpts::new(
                    "http_request_duration_seconds",
                    "HTTP request latency by route and status",
                )
                .buckets(vec![
                    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                ]),
                &["route", "status"],
            )
            .unwrap_or_else(|_| unreachable_metric("http_request_duration_seconds")),
        );
        let errors_total = reg(
            &r,
            counter_vec("errors_total", "Error responses by stable code", &["code"]),
        );
        let rate_limited_total = reg(
            &r,
            counter_vec(
                "rate_limited_total",
                "Requests refused by a rate limiter",
                &["bucket"],
            ),
        );
        let branch_actors = reg(
            &r,
            IntGauge::new("branch_actors", "Branch ingestion actors alive")
                .unwrap_or_else(|_| unreachable_metric("branch_actors")),
        );
        let ingest_batch_size = reg(
            &r,
            Histogram::with_opts(
                HistogramOpts::new("ingest_batch_size", "Events per group commit").buckets(vec![
                    1.0, 2.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0,
                ]),
            )
            .unwrap_or_else(|_| unreachable_metric("ingest_batch_size")),
        );
        let fingerprint_tree_builds = reg(
            &r,
            IntCounter::new(
                "fingerprint_tree_builds",
                "Catalog fingerprint trees built from the database",
            )
            .unwrap_or_else(|_| unreachable_metric("fingerprint_tree_builds")),
        );
        let tombstones_purged = reg(
            &r,
            IntCounter::new("tombstones_purged", "Tombstones removed by retention")
                .unwrap_or_else(|_| unreachable_metric("tombstones_purged")),
        );
        let pos_identity_conflicts = reg(
            &r,
            counter_vec(
                "pos_identity_conflicts",
                "Events showing one pos_id used by two databases, by how it showed",
                &["reason"],
            ),
        );
        let gauge_vec = |name: &str, help: &str| {
            IntGaugeVec::new(Opts::new(name, help), &["branch"])
                .unwrap_or_else(|_| unreachable_metric(name))
        };
        let sales_gaps = reg(
            &r,
            gauge_vec(
                "sales_gaps",
                "Sales missing below the highest stored local_event_id of their till, per branch",
            ),
        );
        let sales_chain_breaks = reg(
            &r,
            gauge_vec(
                "sales_chain_breaks",
                "Recorded breaks of the sales journal's hash chain, per branch",
            ),
        );
        let delta_polls_from_memory = reg(
            &r,
            IntCounter::new(
                "delta_polls_from_memory",
                "Delta polls answered from memory without a database query",
            )
            .unwrap_or_else(|_| unreachable_metric("delta_polls_from_memory")),
        );
        let catalog_notifications = reg(
            &r,
            IntCounter::new(
                "catalog_notifications",
                "Catalog-change notifications taken in by the listener",
            )
            .unwrap_or_else(|_| unreachable_metric("catalog_notifications")),
        );
        let catalog_listener_connected = reg(
            &r,
            IntGauge::new(
                "catalog_listener_connected",
                "1 while the catalog listener is connected (empty delta polls need no query)",
            )
            .unwrap_or_else(|_| unreachable_metric("catalog_listener_connected")),
        );
        for reason in ["device", "payload"] {
            pos_identity_conflicts.with_label_values(&[reason]);
        }
        // Create every known label set up front so each series is exported (at 0) from the
        // start: dashboards and alerts should not depend on an event having happened yet.
        for status in ["accepted", "duplicate", "conflict", "rejected"] {
            synced_events.with_label_values(&[status]);
        }
        for mode in ["verify", "plan"] {
            reconcile_runs.with_label_values(&[mode]);
        }
        for bucket in ["address", "terminal"] {
            rate_limited_total.with_label_values(&[bucket]);
        }
        for code in possync_protocol::ErrorCode::ALL
            .into_iter()
            .filter(|c| !c.is_local_api())
        {
            errors_total.with_label_values(&[code.as_str()]);
        }
        Metrics {
            registry: r,
            synced_events,
            flagged_events,
            queued_events,
            reconcile_runs,
            delta_sync_runs,
            snapshot_pages,
            snapshot_page_reads_total,
            snapshot_page_cache_hits_total,
            snapshot_page_shared_hits_total,
            chain_links_rechecked,
            snapshot_page_bytes_total,
            http_request_duration_seconds,
            errors_total,
            rate_limited_total,
            branch_actors,
            ingest_batch_size,
            tombstones_purged,
            fingerprint_tree_builds,
            pos_identity_conflicts,
            delta_polls_from_memory,
            catalog_notifications,
            catalog_listener_connected,
            sales_gaps,
            sales_chain_breaks,
        }
    }

    /// Sets the journal gauges to the database's figures (branches absent from both maps are
    /// dropped from the exposition).
    pub fn set_journal_signals(
        &self,
        gaps: &std::collections::BTreeMap<String, i64>,
        breaks: &std::collections::BTreeMap<String, i64>,
    ) {
        self.sales_gaps.reset();
        self.sales_chain_breaks.reset();
        for branch in gaps.keys().chain(breaks.keys()) {
            self.sales_gaps
                .with_label_values(&[branch])
                .set(gaps.get(branch).copied().unwrap_or(0));
            self.sales_chain_breaks
                .with_label_values(&[branch])
                .set(breaks.get(branch).copied().unwrap_or(0));
        }
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut buf) {
            tracing::error!(error = %e, "metrics encoding failed");
        }
        String::from_utf8(buf).unwrap_or_default()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// Metric options are constants; an invalid one is a bug that the unit test catches.
#[allow(clippy::panic)]
fn unreachable_metric(name: &str) -> ! {
    panic!("invalid metric definition: {name}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_metric_is_exposed_by_name() {
        let m = Metrics::new();
        // Only the latency histogram needs traffic to have a series.
        m.http_request_duration_seconds
            .with_label_values(&["/healthz", "200"])
            .observe(0.001);
        let text = m.render();
        assert!(text.contains(&format!(
            "errors_total{{code=\"{}\"}} 0",
            possync_protocol::ErrorCode::PosSyncStorageFailed
        )));
        assert!(text.contains("synced_events{status=\"conflict\"} 0"));
        for name in [
            "synced_events",
            "queued_events",
            "reconcile_runs",
            "delta_sync_runs",
            "snapshot_pages",
            "snapshot_page_reads_total",
            "snapshot_page_cache_hits_total",
            "snapshot_page_shared_hits_total",
            "chain_links_rechecked",
            "http_request_duration_seconds_bucket",
            "errors_total",
            "rate_limited_total",
            "branch_actors",
            "ingest_batch_size_bucket",
            "tombstones_purged",
            "fingerprint_tree_builds",
            "pos_identity_conflicts",
            "delta_polls_from_memory",
            "catalog_notifications",
            "catalog_listener_connected",
        ] {
            assert!(text.contains(name), "missing {name} in\n{text}");
        }
    }

    #[test]
    fn two_instances_do_not_share_counters() {
        let a = Metrics::new();
        let b = Metrics::new();
        a.delta_sync_runs.inc();
        assert_eq!(a.delta_sync_runs.get(), 1);
        assert_eq!(b.delta_sync_runs.get(), 0);
    }
}
