//! Carry-over: moves unsent sales of an earlier key space (another terminal, branch or
//! `pos_id`) into the current one, exactly once.
//!
//! [`settle`] first forks if the cloud said the current `pos_id` is used by another database,
//! then, for every earlier `pos_id` with unsent rows, pages through the keys the cloud holds
//! for it (`GET /v1/pos/sales/held`) and decides per row with the pure [`decide`]: a row whose
//! old key is held with the same payload hash is that very sale, already in the cloud, and is
//! marked synced; any other row is re-keyed. The store applies the decisions only to rows that
//! did not change since they were read, so nothing is re-keyed on stale information.
//!
//! The daemon runs [`settle`] at start and then every few seconds (a cheap local check when
//! there is nothing to do); `terminal enroll` and `terminal token set` run it once when the
//! cloud is reachable. Without the cloud nothing moves: the rows wait, safe, and the next pass
//! picks them up.

use std::collections::{BTreeMap, HashMap};

use possync_actors::{CloudError, TerminalCode};
use possync_protocol::{HeldKey, MAX_HELD_KEYS_PER_PAGE};
use serde::Serialize;
use thiserror::Error;
use uuid::Uuid;

use crate::cloud_client::HttpCloud;
use crate::store::{
    off_thread, CarryCandidate, CarryDecision, CarryOverCounts, CarryScope, SqliteStore,
    TerminalStoreError, WorkerLost,
};

/// Why a carry-over pass stopped; nothing of it was applied.
#[derive(Debug, Error)]
pub enum CarryOverError {
    /// The local database failed.
    #[error(transparent)]
    Store(#[from] TerminalStoreError),
    /// The cloud could not say which keys it holds.
    #[error(transparent)]
    Cloud(#[from] CloudError),
    /// The blocking worker died.
    #[error(transparent)]
    Worker(#[from] WorkerLost),
}

impl CarryOverError {
    /// The code for logs.
    pub fn code(&self) -> TerminalCode {
        match self {
            CarryOverError::Store(e) => e.code().into(),
            CarryOverError::Cloud(e) => e.code(),
            CarryOverError::Worker(_) => TerminalCode::STORAGE_FAILED,
        }
    }
}

/// What one pass did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct SettleReport {
    /// The new `pos_id`, when the pass forked.
    pub forked_to: Option<Uuid>,
    /// Rows re-keyed, marked held, or skipped.
    pub carried: CarryOverCounts,
}

/// Decides for each candidate given the keys the cloud holds for its `pos_id`. A row is the
/// held sale only if the held key is exactly its old key (same terminal and local id) with the
/// same payload hash; a key held with another payload is another sale (the other database's),
/// and a row never stamped with a terminal was never sent.
pub fn decide(candidates: Vec<CarryCandidate>, held: &[HeldKey]) -> Vec<CarryDecision> {
    let by_key: HashMap<(Uuid, i64), &HeldKey> = held
        .iter()
        .map(|k| ((k.terminal_id, k.local_event_id), k))
        .collect();
    candidates
        .into_iter()
        .map(|row| {
            let same = row.terminal_id.and_then(|t| {
                by_key
                    .get(&(t, row.local_event_id))
                    .filter(|k| Some(&k.payload_hash) == row.payload_hash.as_ref())
                    .map(|k| k.cloud_event_id)
            });
            match same {
                Some(cloud_event_id) => CarryDecision::AlreadyHeld {
                    row,
                    cloud_event_id,
                },
                None => CarryDecision::Rekey { row },
            }
        })
        .collect()
}

async fn blocking<T: Send + 'static>(
    store: &SqliteStore,
    f: impl FnOnce(&SqliteStore) -> Result<T, TerminalStoreError> + Send + 'static,
) -> Result<T, CarryOverError> {
    let store = store.clone();
    off_thread(move || f(&store).map_err(CarryOverError::from)).await
}

/// Every key the cloud holds for `pos_id` with a local id in `from..=to`.
async fn held_in_range(
    cloud: &HttpCloud,
    pos_id: Uuid,
    from: i64,
    to: i64,
) -> Result<Vec<HeldKey>, CloudError> {
    let mut out = Vec::new();
    let mut after = from.saturating_sub(1).max(0);
    loop {
        let page = cloud
            .held_keys(pos_id, after, MAX_HELD_KEYS_PER_PAGE)
            .await?;
        out.extend(page.keys.into_iter().filter(|k| k.local_event_id <= to));
        match page.next_after {
            Some(next) if next < to && next > after => after = next,
            _ => return Ok(out),
        }
    }
}

/// One pass: fork if needed, then carry over every earlier key space's unsent rows
/// (`scope`: see [`CarryScope`]).
pub async fn settle(
    store: &SqliteStore,
    cloud: &HttpCloud,
    scope: CarryScope,
) -> Result<SettleReport, CarryOverError> {
    let forked_to = blocking(store, |s| s.fork_if_needed()).await?;
    let candidates = blocking(store, move |s| s.carry_candidates(scope)).await?;
    let mut report = SettleReport {
        forked_to,
        carried: CarryOverCounts::default(),
    };
    if candidates.is_empty() {
        return Ok(report);
    }
    report.carried = carry(store, cloud, candidates, Carry::RekeyOrHeld).await?;
    Ok(report)
}

/// Marks synced the inherited sales this till leaves to the original database (a copy
/// enrolled as another terminal: [`SqliteStore::inherited_left_to_original`]) once the cloud
/// holds them — the very sale, same key and payload, delivered by the original. Never
/// re-keys one: whether the original will deliver it later is something no answer of the
/// cloud can say. The daemon runs it every [`INHERITED_CHECK_EVERY`]; without such rows it
/// costs one local query and no request.
pub async fn settle_inherited(
    store: &SqliteStore,
    cloud: &HttpCloud,
) -> Result<CarryOverCounts, CarryOverError> {
    let rows = blocking(store, |s| s.inherited_left_to_original()).await?;
    carry(store, cloud, rows, Carry::HeldOnly).await
}

/// How often the daemon asks the cloud about inherited sales left to the original
/// ([`settle_inherited`]): they are the original's backlog, not this till's, so a minute's lag
/// only delays a count on the status page.
pub const INHERITED_CHECK_EVERY: std::time::Duration = std::time::Duration::from_secs(60);

/// Which of [`decide`]'s decisions a pass applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Carry {
    /// Both: rows of an earlier key space of this database.
    RekeyOrHeld,
    /// Only `AlreadyHeld`: inherited rows, which are never re-keyed.
    HeldOnly,
}

/// Asks the cloud, per earlier `pos_id`, which keys of `rows` it holds, and applies the
/// decisions `mode` allows.
async fn carry(
    store: &SqliteStore,
    cloud: &HttpCloud,
    rows: Vec<CarryCandidate>,
    mode: Carry,
) -> Result<CarryOverCounts, CarryOverError> {
    let mut total = CarryOverCounts::default();
    let mut by_pos: BTreeMap<Uuid, Vec<CarryCandidate>> = BTreeMap::new();
    for c in rows {
        by_pos.entry(c.pos_id).or_default().push(c);
    }
    for (pos_id, rows) in by_pos {
        let from = rows.iter().map(|r| r.local_event_id).min().unwrap_or(1);
        let to = rows.iter().map(|r| r.local_event_id).max().unwrap_or(from);
        let held = held_in_range(cloud, pos_id, from, to).await?;
        let decisions: Vec<CarryDecision> = decide(rows, &held)
            .into_iter()
            .filter(|d| {
                mode == Carry::RekeyOrHeld || matches!(d, CarryDecision::AlreadyHeld { .. })
            })
            .collect();
        if decisions.is_empty() {
            continue;
        }
        let counts = blocking(store, move |s| s.apply_carry_over(&decisions)).await?;
        tracing::info!(
            fromPosId = %pos_id,
            rekeyed = counts.rekeyed,
            alreadyHeld = counts.already_held,
            skipped = counts.skipped,
            inherited = mode == Carry::HeldOnly,
            "unsent sales carried over to the current key space"
        );
        total.rekeyed += counts.rekeyed;
        total.already_held += counts.already_held;
        total.skipped += counts.skipped;
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(id: i64, terminal: Option<Uuid>, hash: &str) -> CarryCandidate {
        CarryCandidate {
            journal_id: id,
            pos_id: Uuid::nil(),
            local_event_id: id,
            terminal_id: terminal,
            payload_hash: terminal.map(|_| hash.to_string()),
            status: "pending".into(),
            attempts: 0,
            updated_at: "t".into(),
        }
    }

    fn key(terminal: Uuid, id: i64, hash: &str) -> HeldKey {
        HeldKey {
            terminal_id: terminal,
            local_event_id: id,
            payload_hash: hash.into(),
            cloud_event_id: Uuid::from_u128(id as u128),
        }
    }

    #[test]
    fn only_the_same_key_with_the_same_payload_counts_as_held() {
        let (old, other) = (Uuid::from_u128(1), Uuid::from_u128(2));
        let rows = vec![
            row(1, Some(old), "h1"), // held as is
            row(2, Some(old), "h2"), // held with another payload: another database's sale
            row(3, Some(old), "h3"), // held under another terminal: another key
            row(4, Some(old), "h4"), // not held
            row(5, None, "h5"),      // never stamped, never sent
        ];
        let held = vec![
            key(old, 1, "h1"),
            key(old, 2, "other"),
            key(other, 3, "h3"),
            key(old, 5, "h5"),
        ];
        let out = decide(rows, &held);
        assert!(matches!(
            &out[0],
            CarryDecision::AlreadyHeld { cloud_event_id, .. } if *cloud_event_id == Uuid::from_u128(1)
        ));
        for d in &out[1..] {
            assert!(matches!(d, CarryDecision::Rekey { .. }), "{d:?}");
        }
    }
}
