//! Which device owns each `pos_id`: clone and restore detection.
//!
//! Exactly-once rests on the key `(terminal_id, pos_id, local_event_id)`, and a `pos_id` is
//! only unique while one database uses it. A disk image copied to a second till, or a till
//! restored from an old backup, brings a second database with the same `pos_id` whose local ids
//! name different sales. Each terminal sends a device nonce (`x-device-nonce`) that it
//! regenerates whenever its database file is not the one that created the nonce; the first
//! nonce seen for a `pos_id` owns it for good. A request for that `pos_id` with another nonce
//! is from a copy: its events are answered `conflict` with `POS_SYNC_POS_CLONED`, nothing of
//! them is stored, and the till moves its unsent sales to a new `pos_id` of its own.
//!
//! The binding is never updated, only inserted (`ON CONFLICT DO NOTHING`), so two requests
//! racing to bind one `pos_id` agree on the winner: the primary key admits one row.

use std::collections::{BTreeSet, HashMap};
use std::sync::Mutex;

use diesel::prelude::*;
use uuid::Uuid;

use super::schema::pos_devices;
use super::{for_each_backend, now_utc, with_conn, write_txn, DbConn, StoreError};

/// Longest device nonce accepted; the terminal sends a hyphenated UUID (36 characters).
pub const MAX_NONCE_LEN: usize = 64;

#[derive(Debug, Insertable)]
#[diesel(table_name = pos_devices)]
struct DeviceRow {
    pos_id: String,
    terminal_id: String,
    device_nonce: String,
    first_seen_at: chrono::NaiveDateTime,
}

for_each_backend! {
    pub(super) fn bind(c: &mut Conn, row: &DeviceRow) -> QueryResult<usize> {
        diesel::insert_into(pos_devices::table)
            .values(row)
            .on_conflict_do_nothing()
            .execute(c)
    }

    pub(super) fn owner(c: &mut Conn, pos: &str) -> QueryResult<Option<String>> {
        pos_devices::table
            .filter(pos_devices::pos_id.eq(pos))
            .select(pos_devices::device_nonce)
            .first(c)
            .optional()
    }
}

/// Whether a header value can be a device nonce: 1–64 of `[A-Za-z0-9-]`.
pub fn valid_nonce(nonce: &str) -> bool {
    !nonce.is_empty()
        && nonce.len() <= MAX_NONCE_LEN
        && nonce
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-')
}

/// Most bindings one process remembers before it starts over.
pub const MAX_KNOWN_BINDINGS: usize = 100_000;

/// `(pos_id, nonce)` bindings this process has seen in the database. A binding never changes
/// once made, so a remembered one is always right, and a request whose `pos_id`s are all
/// remembered for its nonce needs no database round trip. When full, it starts over: forgetting
/// costs a lookup, never a wrong answer.
#[derive(Debug, Default)]
pub struct KnownBindings {
    map: Mutex<HashMap<Uuid, String>>,
}

impl KnownBindings {
    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<Uuid, String>> {
        self.map
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Whether every `pos_id` is known to be bound to `nonce`.
    pub fn all_bound_to(&self, pos_ids: &BTreeSet<Uuid>, nonce: &str) -> bool {
        let map = self.map();
        pos_ids
            .iter()
            .all(|p| map.get(p).is_some_and(|n| n == nonce))
    }

    /// Remembers that these `pos_id`s are bound to `nonce`.
    pub fn remember<'a>(&self, pos_ids: impl IntoIterator<Item = &'a Uuid>, nonce: &str) {
        let mut map = self.map();
        for p in pos_ids {
            if map.len() >= MAX_KNOWN_BINDINGS {
                map.clear();
            }
            map.insert(*p, nonce.to_string());
        }
    }
}

/// Binds every `pos_id` not yet bound to `nonce` and returns those bound to another device.
/// When every `pos_id` is bound already (the common case) this is one read; otherwise one
/// write transaction. An empty set means every `pos_id` of the request belongs to this device.
pub fn claim_pos_ids(
    conn: &mut DbConn,
    terminal_id: Uuid,
    pos_ids: &BTreeSet<Uuid>,
    nonce: &str,
) -> Result<BTreeSet<Uuid>, StoreError> {
    if !valid_nonce(nonce) {
        return Err(StoreError::InvalidInput(format!(
            "device nonce must be 1-{MAX_NONCE_LEN} of [A-Za-z0-9-]"
        )));
    }
    let mut bound_elsewhere = BTreeSet::new();
    let mut all_bound = true;
    for pos in pos_ids {
        let key = pos.to_string();
        match with_conn!(conn, |c, m| m::owner(c, &key))? {
            Some(owner) if owner == nonce => {}
            Some(_) => {
                bound_elsewhere.insert(*pos);
            }
            None => all_bound = false,
        }
    }
    if all_bound {
        return Ok(bound_elsewhere);
    }
    let now = now_utc();
    let terminal = terminal_id.to_string();
    // Ordered (BTreeSet) so two transactions binding overlapping sets lock in one order.
    write_txn!(conn, |c, m| -> Result<BTreeSet<Uuid>, StoreError> {
        let mut foreign = BTreeSet::new();
        for pos in pos_ids {
            let row = DeviceRow {
                pos_id: pos.to_string(),
                terminal_id: terminal.clone(),
                device_nonce: nonce.to_string(),
                first_seen_at: now,
            };
            if m::bind(c, &row)? == 0 && m::owner(c, &row.pos_id)?.as_deref() != Some(nonce) {
                foreign.insert(*pos);
            }
        }
        Ok(foreign)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::db::test_support::each_backend;

    #[test]
    fn the_first_device_owns_a_pos_id_and_a_second_is_told_apart() {
        each_backend(|db| {
            let mut conn = db.conn().expect("conn");
            let terminal = Uuid::now_v7();
            let (p1, p2) = (Uuid::new_v4(), Uuid::new_v4());
            let both: BTreeSet<Uuid> = [p1, p2].into();
            let only_p1: BTreeSet<Uuid> = [p1].into();
            assert!(claim_pos_ids(&mut conn, terminal, &only_p1, "device-a")
                .expect("bind")
                .is_empty());
            // Same device again: still its own.
            assert!(claim_pos_ids(&mut conn, terminal, &only_p1, "device-a")
                .expect("again")
                .is_empty());
            // A copy of the database on another device: p1 is foreign, p2 (new) becomes its own.
            assert_eq!(
                claim_pos_ids(&mut conn, terminal, &both, "device-b").expect("copy"),
                only_p1
            );
            assert_eq!(
                claim_pos_ids(&mut conn, terminal, &[p2].into(), "device-a").expect("p2"),
                [p2].into()
            );
            assert!(matches!(
                claim_pos_ids(&mut conn, terminal, &only_p1, "bad nonce!"),
                Err(StoreError::InvalidInput(_))
            ));
        });
    }

    #[test]
    fn known_bindings_answer_only_for_the_bound_nonce_and_start_over_when_full() {
        let known = KnownBindings::default();
        let (p1, p2) = (Uuid::new_v4(), Uuid::new_v4());
        assert!(!known.all_bound_to(&[p1].into(), "a"));
        known.remember(&[p1], "a");
        assert!(known.all_bound_to(&[p1].into(), "a"));
        assert!(!known.all_bound_to(&[p1].into(), "b"));
        assert!(!known.all_bound_to(&[p1, p2].into(), "a"));
        let many: Vec<Uuid> = (0..MAX_KNOWN_BINDINGS).map(|_| Uuid::new_v4()).collect();
        known.remember(&many, "c");
        assert!(known.map().len() <= MAX_KNOWN_BINDINGS);
    }

    #[test]
    fn nonce_shape() {
        assert!(valid_nonce(&Uuid::new_v4().to_string()));
        assert!(!valid_nonce(""));
        assert!(!valid_nonce(&"a".repeat(MAX_NONCE_LEN + 1)));
        assert!(!valid_nonce("a b"));
    }
}
