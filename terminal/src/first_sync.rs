//! First-sync progress: while the daemon takes a catalog snapshot, how far it is.
//!
//! On a terminal (stderr is a TTY) an `indicatif` progress bar shows entities stored out of
//! the snapshot's total, the percentage, the rate and the time left; otherwise (a service
//! manager, a pipe) one JSON log line every [`LOG_EVERY`] carries the same figures, so the
//! logs stay machine-readable. Both read the engine's status board (memory), never the
//! database: watching the sync does not slow it down.

use std::io::IsTerminal as _;
use std::sync::Arc;
use std::time::{Duration, Instant};

use possync_actors::CatalogPosition;

use crate::wiring::EngineControl;

/// How often the board is read.
const POLL: Duration = Duration::from_millis(200);
/// Progress log lines when stderr is not a terminal.
pub const LOG_EVERY: Duration = Duration::from_secs(2);

/// Where a snapshot is, as shown to an operator.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Progress {
    /// Entities stored.
    pub received: u64,
    /// Entities the snapshot announced.
    pub total: u64,
    /// Entities per second since the watch began.
    pub rate: f64,
    /// Time left at that rate (`None` before anything arrived, or when it is too long to
    /// represent: the total is the cloud's figure and may be absurd).
    pub eta: Option<Duration>,
}

impl Progress {
    /// Figures for `received` of `total` after `elapsed`, counting from `received_at_start`
    /// (a resumed snapshot does not credit this run with the pages stored before it).
    pub fn at(received: u64, total: u64, received_at_start: u64, elapsed: Duration) -> Progress {
        let done_here = received.saturating_sub(received_at_start);
        let secs = elapsed.as_secs_f64();
        let rate = if secs > 0.0 {
            done_here as f64 / secs
        } else {
            0.0
        };
        // `total` comes from the cloud: a huge one over a slow rate gives more seconds than a
        // Duration holds, where `from_secs_f64` would panic the watcher. No ETA then.
        let eta = (rate > 0.0)
            .then(|| Duration::try_from_secs_f64(total.saturating_sub(received) as f64 / rate).ok())
            .flatten();
        Progress {
            received,
            total,
            rate,
            eta,
        }
    }

    /// Percentage stored (0 while the total is unknown).
    pub fn percent(&self) -> f64 {
        if self.total == 0 {
            0.0
        } else {
            (self.received as f64 * 100.0 / self.total as f64).min(100.0)
        }
    }
}

/// Whether a position is a first sync still running (no complete catalog yet, or a snapshot
/// in progress).
fn snapshotting(pos: &CatalogPosition) -> bool {
    pos.snapshot_in_progress || pos.catalog_version.is_none()
}

/// Shows snapshot progress until the snapshot completes or the engine stops. Returns at once
/// when the catalog is already complete (a daemon restarted on a synced till shows nothing).
pub async fn watch(control: Arc<EngineControl>) {
    let tty = std::io::stderr().is_terminal();
    let started = Instant::now();
    let mut start_received = None;
    let mut bar: Option<indicatif::ProgressBar> = None;
    let mut last_log: Option<Instant> = None;
    let mut tick = tokio::time::interval(POLL);
    loop {
        tick.tick().await;
        let Some(pos) = control.catalog_position().await else {
            break;
        };
        // Nothing read from the store yet: the board still holds its default.
        if pos == CatalogPosition::default() && started.elapsed() < Duration::from_secs(2) {
            continue;
        }
        if !snapshotting(&pos) {
            if let Some(b) = bar.take() {
                b.set_position(b.length().unwrap_or(0));
                b.finish_with_message("catalog ready");
            }
            if start_received.is_some() {
                tracing::info!(
                    entities = pos.snapshot_received,
                    seconds = started.elapsed().as_secs_f64(),
                    "first sync complete"
                );
            }
            return;
        }
        let received = pos.snapshot_received.max(0) as u64;
        let total = pos.snapshot_total.max(0) as u64;
        let base = *start_received.get_or_insert(received);
        let p = Progress::at(received, total, base, started.elapsed());
        if tty {
            let b = bar.get_or_insert_with(|| new_bar(total));
            b.set_length(total);
            b.set_position(received);
        } else if total > 0 && last_log.is_none_or(|t| t.elapsed() >= LOG_EVERY) {
            last_log = Some(Instant::now());
            tracing::info!(
                entities = p.received,
                total = p.total,
                percent = (p.percent() * 10.0).round() / 10.0,
                entities_per_second = p.rate.round(),
                eta_seconds = p.eta.map(|d| d.as_secs_f64().round()),
                "first sync progress"
            );
        }
    }
    if let Some(b) = bar {
        b.abandon_with_message("engine stopped");
    }
}

fn new_bar(total: u64) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(total);
    let style = indicatif::ProgressStyle::with_template(
        "first sync {bar:32.cyan/blue} {human_pos}/{human_len} entities {percent:>3}% \
         {per_sec} ETA {eta} {msg}",
    )
    .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar());
    bar.set_style(style);
    bar
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_and_eta_count_only_this_run() {
        let p = Progress::at(60_000, 100_000, 20_000, Duration::from_secs(2));
        assert_eq!(p.rate, 20_000.0);
        assert_eq!(p.eta, Some(Duration::from_secs(2)));
        assert_eq!(p.percent(), 60.0);
        let start = Progress::at(0, 0, 0, Duration::ZERO);
        assert_eq!(start.eta, None);
        assert_eq!(start.percent(), 0.0);
    }

    #[test]
    fn an_absurd_total_from_the_cloud_gives_no_eta_instead_of_a_panic() {
        let total = i64::MAX as u64;
        let p = Progress::at(1, total, 0, Duration::from_secs(1_000_000));
        assert_eq!(p.eta, None);
        assert_eq!(p.total, total);
        assert!(p.percent() >= 0.0 && p.percent() <= 100.0);
        let p = Progress::at(1, u64::MAX, 0, Duration::from_secs(u64::MAX / 2));
        assert_eq!(p.eta, None);
        // a sane total still gets its ETA
        let p = Progress::at(10, 20, 0, Duration::from_secs(10));
        assert_eq!(p.eta, Some(Duration::from_secs(10)));
    }

    #[test]
    fn a_complete_catalog_is_not_a_first_sync() {
        assert!(snapshotting(&CatalogPosition::default()));
        let done = CatalogPosition {
            catalog_version: Some(3),
            ..CatalogPosition::default()
        };
        assert!(!snapshotting(&done));
        let resnapshot = CatalogPosition {
            snapshot_in_progress: true,
            ..done
        };
        assert!(snapshotting(&resnapshot));
    }
}
