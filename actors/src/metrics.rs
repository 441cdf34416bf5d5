//! Prometheus metrics of the engine, registered in the registry the host passes to
//! `Engine::start` so the daemon's `/metrics` shows them next to its own.

use prometheus::{IntCounter, IntCounterVec, IntGauge, Opts, Registry};

/// Handles to every metric the actors update.
#[derive(Clone)]
pub struct EngineMetrics {
    /// Journal rows not yet synced (pending, in flight or waiting to retry).
    pub queued_events: IntGauge,
    /// Sales the cloud confirmed (accepted or duplicate).
    pub synced_events: IntCounter,
    /// Delta pages fetched.
    pub delta_sync_runs: IntCounter,
    /// Reconcile runs (verify or apply) started.
    pub reconcile_runs: IntCounter,
    /// Snapshot pages stored.
    pub snapshot_pages: IntCounter,
    /// Sales scheduled for another delivery attempt.
    pub outbox_retries: IntCounter,
    /// Supervisor restarts, by actor.
    pub actor_restarts: IntCounterVec,
    /// Entities the last verify found different from the cloud (upserts + deletes).
    pub catalog_drift_entities: IntGauge,
    /// HTTP body bytes (sent + received, as on the wire) of every reconcile run.
    pub reconcile_bytes: IntCounter,
}

impl EngineMetrics {
    /// Creates the metrics and registers them in `registry`.
    pub fn register(registry: &Registry) -> Result<Self, prometheus::Error> {
        let m = EngineMetrics {
            queued_events: IntGauge::new(
                "queued_events",
                "Sales journal rows not yet synced to the cloud",
            )?,
            synced_events: IntCounter::new(
                "synced_events",
                "Sales the cloud confirmed (accepted or duplicate)",
            )?,
            delta_sync_runs: IntCounter::new("delta_sync_runs", "Catalog delta pages fetched")?,
            reconcile_runs: IntCounter::new("reconcile_runs", "Catalog reconcile runs started")?,
            snapshot_pages: IntCounter::new("snapshot_pages", "Catalog snapshot pages stored")?,
            outbox_retries: IntCounter::new(
                "outbox_retries",
                "Sales scheduled for another delivery attempt",
            )?,
            actor_restarts: IntCounterVec::new(
                Opts::new("actor_restarts", "Supervisor restarts of sync actors"),
                &["actor"],
            )?,
            catalog_drift_entities: IntGauge::new(
                "catalog_drift_entities",
                "Entities the last catalog verify found different from the cloud",
            )?,
            reconcile_bytes: IntCounter::new(
                "reconcile_bytes_total",
                "HTTP body bytes sent and received by catalog reconcile runs",
            )?,
        };
        registry.register(Box::new(m.queued_events.clone()))?;
        registry.register(Box::new(m.synced_events.clone()))?;
        registry.register(Box::new(m.delta_sync_runs.clone()))?;
        registry.register(Box::new(m.reconcile_runs.clone()))?;
        registry.register(Box::new(m.snapshot_pages.clone()))?;
        registry.register(Box::new(m.outbox_retries.clone()))?;
        registry.register(Box::new(m.actor_restarts.clone()))?;
        registry.register(Box::new(m.catalog_drift_entities.clone()))?;
        registry.register(Box::new(m.reconcile_bytes.clone()))?;
        Ok(m)
    }
}
