//! JSON log lines on stderr (stdout is reserved for command output and the daemon's
//! `status on …` line, which tests and scripts read).
//!
//! Level from `POSSYNC_LOG` (or `RUST_LOG`), default `info`. Each line carries the fields of
//! the spans it was logged in; the daemon's root span holds `terminalId` and `branchId`.

use tracing_subscriber::EnvFilter;

/// Installs the global JSON subscriber. Calling it twice is harmless (the second is ignored).
pub fn init() {
    let filter = std::env::var("POSSYNC_LOG")
        .ok()
        .or_else(|| std::env::var("RUST_LOG").ok())
        .and_then(|f| EnvFilter::try_new(f).ok())
        .unwrap_or_else(|| EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .json()
        .with_current_span(true)
        .with_span_list(false)
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}
