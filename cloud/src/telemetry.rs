//! Logging setup: JSON lines on stderr (stdout is kept for command output and the
//! `listening on` line), filtered by `RUST_LOG` (default `info`).

use tracing_subscriber::EnvFilter;

/// Installs the JSON subscriber once; later calls are no-ops (tests may call it repeatedly).
pub fn init(default_level: &str) {
    let mut filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_level));
    // actix-http's HTTP/1 dispatcher logs at ERROR what one client did to its own connection
    // (bytes that are not HTTP, control characters in a header, a head over 32 KiB, a peer
    // that vanished mid-write) and answers it with a bare 400/431/408 before any request
    // exists. Those are client mistakes, never server state, and must not page an operator.
    if let Ok(quiet) = "actix_http::h1::dispatcher=off".parse() {
        filter = filter.add_directive(quiet);
    }
    let _ = tracing_subscriber::fmt()
        .json()
        .flatten_event(true)
        .with_current_span(false)
        .with_span_list(false)
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}
