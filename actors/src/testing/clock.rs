//! A clock tests move by hand.

use super::*;

/// A clock that only moves when told to. [`ManualClock::advance`] moves both its wall clock
/// and its monotonic clock; [`ManualClock::step_wall`] moves only the wall clock, as NTP
/// stepping a wrong RTC does.
#[derive(Debug)]
pub struct ManualClock {
    wall: Mutex<DateTime<Utc>>,
    /// Monotonic time: the real instant it was made at plus everything `advance`d since.
    mono: Mutex<tokio::time::Instant>,
}

impl ManualClock {
    /// Starts at `at`.
    pub fn new(at: DateTime<Utc>) -> Self {
        ManualClock {
            wall: Mutex::new(at),
            mono: Mutex::new(tokio::time::Instant::now()),
        }
    }

    /// Moves time forward.
    pub fn advance(&self, by: Duration) {
        let mut t = lock(&self.wall);
        *t += chrono::Duration::from_std(by).unwrap_or(chrono::Duration::zero());
        let mut m = lock(&self.mono);
        *m += by;
    }

    /// Steps the wall clock alone, by `secs` (negative: back), leaving monotonic time alone.
    pub fn step_wall(&self, secs: i64) {
        let mut t = lock(&self.wall);
        *t += chrono::Duration::seconds(secs);
    }
}

impl Default for ManualClock {
    fn default() -> Self {
        ManualClock::new(
            Utc.with_ymd_and_hms(2026, 11, 25, 12, 0, 0)
                .single()
                .unwrap_or_default(),
        )
    }
}

impl Clock for ManualClock {
    fn now(&self) -> DateTime<Utc> {
        *lock(&self.wall)
    }

    fn monotonic(&self) -> tokio::time::Instant {
        *lock(&self.mono)
    }
}
