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

use std::collections::BTreeSet;

use diesel::prelude::*;
use uuid::Uuid;

use super::schema::pos_devices;
use super::{for_each_backend, now_utc, write_txn, DbConn, StoreError};

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

/// Binds every `pos_id` not yet bound to `nonce` and returns those bound to another device.
/// One transaction; an empty set means every `pos_id` of the request belongs to this device.
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
    fn nonce_shape() {
        assert!(valid_nonce(&Uuid::new_v4().to_string()));
        assert!(!valid_nonce(""));
        assert!(!valid_nonce(&"a".repeat(MAX_NONCE_LEN + 1)));
        assert!(!valid_nonce("a b"));
    }
}
