//! The terminal's error codes: every code the till writes to its journal, prints on a CLI
//! error line, answers on its loopback API or logs as `errorCode`.
//!
//! They are the contract's stable codes ([`ErrorCode`], shared with the cloud) plus a few
//! terminal-local ones for conditions no cloud code describes: the cloud gave no answer
//! (`NETWORK`), an answer that is not the cloud's (`BAD_RESPONSE`, `HTTP_<status>`), a sale
//! whose automatic retries are used up (`POS_SYNC_ATTEMPTS_EXHAUSTED`), and failures of the
//! daemon itself (`ENGINE_*`, `ACTOR_FAILED`, `IO_FAILED`, `STATUS_BIND_FAILED`,
//! `DAEMON_*`). The spellings are stored in `sync_journal.last_error_code`, so they never
//! change: [`TerminalCode::parse`] reads back every one [`TerminalCode::as_str`] wrote
//! (`docs/terminal-operations.md` lists them).
//!
//! Every error type of the terminal maps onto this enum once (its `code()`), and this enum
//! maps once onto what each surface needs: the wire spelling ([`TerminalCode::as_str`]), the
//! loopback API's HTTP status ([`TerminalCode::http_status`]) and whether retrying may help
//! ([`TerminalCode::can_retry`]).

use std::borrow::Cow;
use std::fmt;

use possync_protocol::ErrorCode;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// One code of the terminal: a contract code, or a documented terminal-local one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TerminalCode {
    /// A code of the sync contract (or of the loopback API), as the cloud sent it or as the
    /// till reports a failure the contract names (e.g. `POS_SYNC_STORAGE_FAILED`).
    Api(ErrorCode),
    /// `NETWORK`: the cloud gave no answer (unreachable, timeout, reset, cut body).
    Network,
    /// `BAD_RESPONSE`: an answer that is not the cloud's (unparseable body, wrong result
    /// count, a foreign 2xx such as a captive portal).
    BadResponse,
    /// `HTTP_<status>`: a non-2xx answer without the cloud's error envelope (a proxy's 502).
    Http(u16),
    /// `POS_SYNC_ATTEMPTS_EXHAUSTED`: the cloud answered one sale, sent alone, with its own
    /// error `max_attempts` times while it stored the till's other sales. The only failure
    /// that parks a sale for an operator without the cloud refusing it.
    AttemptsExhausted,
    /// `ENGINE_CONFIG`: the sync engine refused its configuration before starting.
    EngineConfig,
    /// `ENGINE_UNAVAILABLE`: the sync engine (or the actor that would do the work) is not
    /// running: starting, restarting, stopped or failed for good.
    EngineUnavailable,
    /// `ACTOR_FAILED`: a supervised actor returned an error or panicked (it is restarted).
    ActorFailed,
    /// `IO_FAILED`: a file of the data dir (the local API token, a sale file) could not be
    /// read or written.
    IoFailed,
    /// `STATUS_BIND_FAILED`: the loopback status endpoint could not bind its address.
    StatusBindFailed,
    /// `DAEMON_ALREADY_RUNNING`: `terminal run` found a live daemon on the same data dir.
    DaemonAlreadyRunning,
    /// `DAEMON_FAILED`: the running daemon answered a CLI command with an error that carried
    /// no code.
    DaemonFailed,
}

impl From<ErrorCode> for TerminalCode {
    fn from(code: ErrorCode) -> Self {
        TerminalCode::Api(code)
    }
}

/// The terminal-local codes with a fixed spelling (every one but `HTTP_<status>`).
const LOCAL: [(TerminalCode, &str); 10] = [
    (TerminalCode::Network, "NETWORK"),
    (TerminalCode::BadResponse, "BAD_RESPONSE"),
    (
        TerminalCode::AttemptsExhausted,
        "POS_SYNC_ATTEMPTS_EXHAUSTED",
    ),
    (TerminalCode::EngineConfig, "ENGINE_CONFIG"),
    (TerminalCode::EngineUnavailable, "ENGINE_UNAVAILABLE"),
    (TerminalCode::ActorFailed, "ACTOR_FAILED"),
    (TerminalCode::IoFailed, "IO_FAILED"),
    (TerminalCode::StatusBindFailed, "STATUS_BIND_FAILED"),
    (TerminalCode::DaemonAlreadyRunning, "DAEMON_ALREADY_RUNNING"),
    (TerminalCode::DaemonFailed, "DAEMON_FAILED"),
];

const HTTP_PREFIX: &str = "HTTP_";

impl TerminalCode {
    /// The contract's `POS_SYNC_STORAGE_FAILED`, the code of every local storage failure.
    pub const STORAGE_FAILED: TerminalCode = TerminalCode::Api(ErrorCode::PosSyncStorageFailed);

    /// Every terminal-local code with a fixed spelling, for docs and tests.
    pub fn local_codes() -> impl Iterator<Item = TerminalCode> {
        LOCAL.into_iter().map(|(c, _)| c)
    }

    /// The spelling written to the journal, CLI lines, envelopes and logs.
    pub fn as_str(self) -> Cow<'static, str> {
        match self {
            TerminalCode::Api(c) => Cow::Borrowed(c.as_str()),
            TerminalCode::Http(status) => Cow::Owned(format!("{HTTP_PREFIX}{status}")),
            local => Cow::Borrowed(
                LOCAL
                    .iter()
                    .find(|(c, _)| *c == local)
                    .map_or("UNKNOWN", |(_, s)| *s),
            ),
        }
    }

    /// Reads back a spelling [`TerminalCode::as_str`] wrote (e.g. from an older journal row).
    pub fn parse(s: &str) -> Option<TerminalCode> {
        if let Some(code) = ErrorCode::parse(s) {
            return Some(TerminalCode::Api(code));
        }
        if let Some((code, _)) = LOCAL.iter().find(|(_, spelling)| *spelling == s) {
            return Some(*code);
        }
        let status = s.strip_prefix(HTTP_PREFIX)?.parse::<u16>().ok()?;
        (100..=599)
            .contains(&status)
            .then_some(TerminalCode::Http(status))
    }

    /// The contract code, when this is one.
    pub fn api(self) -> Option<ErrorCode> {
        match self {
            TerminalCode::Api(c) => Some(c),
            _ => None,
        }
    }

    /// The HTTP status the till's loopback API answers a failure with this code.
    ///
    /// Validation is the caller's to fix (422); an identity the till does not have yet is a
    /// conflict with its state (409); its own storage or engine being unavailable is 503; a
    /// failure of the cloud behind it (during a reconcile) is 502.
    pub fn http_status(self) -> u16 {
        match self {
            TerminalCode::Api(ErrorCode::PosSyncEventInvalid) => 422,
            TerminalCode::Api(ErrorCode::PosSyncUnauthorized)
            | TerminalCode::Api(ErrorCode::PosLocalIdempotencyKeyReused) => 409,
            TerminalCode::Api(ErrorCode::PosRequestInvalid) => 400,
            TerminalCode::Api(ErrorCode::PosLocalHostNotAllowed)
            | TerminalCode::Api(ErrorCode::PosLocalOriginNotAllowed) => 403,
            TerminalCode::Api(ErrorCode::PosLocalUnauthorized) => 401,
            TerminalCode::Api(ErrorCode::PosLocalUnsupportedMediaType) => 415,
            TerminalCode::Api(ErrorCode::PosSyncStorageFailed)
            | TerminalCode::EngineConfig
            | TerminalCode::EngineUnavailable
            | TerminalCode::ActorFailed
            | TerminalCode::IoFailed
            | TerminalCode::StatusBindFailed
            | TerminalCode::DaemonAlreadyRunning
            | TerminalCode::DaemonFailed => 503,
            TerminalCode::Api(_)
            | TerminalCode::Network
            | TerminalCode::BadResponse
            | TerminalCode::Http(_)
            | TerminalCode::AttemptsExhausted => 502,
        }
    }

    /// Whether the same operation may succeed later unchanged (for the cloud's codes, as the
    /// contract says given `http_status`; a missing answer always may).
    pub fn can_retry(self, http_status: u16) -> bool {
        match self {
            TerminalCode::Api(c) => c.can_retry(http_status),
            TerminalCode::Network
            | TerminalCode::BadResponse
            | TerminalCode::EngineUnavailable
            | TerminalCode::ActorFailed => true,
            TerminalCode::Http(status) => status >= 500 || status == 429 || status == 408,
            TerminalCode::AttemptsExhausted
            | TerminalCode::EngineConfig
            | TerminalCode::IoFailed
            | TerminalCode::StatusBindFailed
            | TerminalCode::DaemonAlreadyRunning
            | TerminalCode::DaemonFailed => false,
        }
    }
}

impl fmt::Display for TerminalCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.as_str())
    }
}

impl PartialEq<ErrorCode> for TerminalCode {
    fn eq(&self, other: &ErrorCode) -> bool {
        *self == TerminalCode::Api(*other)
    }
}

impl Serialize for TerminalCode {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.as_str())
    }
}

impl<'de> Deserialize<'de> for TerminalCode {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = Cow::<'de, str>::deserialize(d)?;
        TerminalCode::parse(&s)
            .ok_or_else(|| serde::de::Error::custom(format!("unknown terminal code {s:?}")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn every_code_reads_back_as_written() {
        let all = ErrorCode::ALL
            .into_iter()
            .map(TerminalCode::Api)
            .chain(TerminalCode::local_codes())
            .chain([TerminalCode::Http(502), TerminalCode::Http(404)]);
        for code in all {
            assert_eq!(TerminalCode::parse(&code.as_str()), Some(code), "{code}");
            let json = serde_json::to_string(&code).expect("serialize");
            assert_eq!(json, format!("\"{code}\""));
            let back: TerminalCode = serde_json::from_str(&json).expect("deserialize");
            assert_eq!(back, code);
        }
    }

    #[test]
    fn spellings_are_unique_and_stable() {
        let mut seen = std::collections::HashSet::new();
        for code in ErrorCode::ALL
            .into_iter()
            .map(TerminalCode::Api)
            .chain(TerminalCode::local_codes())
        {
            assert!(seen.insert(code.as_str()), "{code} spelled twice");
        }
        // Stored in journals written by earlier versions: these spellings are a promise.
        assert_eq!(TerminalCode::Network.to_string(), "NETWORK");
        assert_eq!(TerminalCode::Http(503).to_string(), "HTTP_503");
        assert_eq!(
            TerminalCode::AttemptsExhausted.to_string(),
            "POS_SYNC_ATTEMPTS_EXHAUSTED"
        );
    }

    #[test]
    fn unknown_spellings_are_refused() {
        for s in [
            "", "network", "HTTP_", "HTTP_abc", "HTTP_99", "HTTP_600", "POS_NOPE",
        ] {
            assert_eq!(TerminalCode::parse(s), None, "{s:?}");
        }
        assert!(serde_json::from_str::<TerminalCode>("\"POS_NOPE\"").is_err());
    }

    #[test]
    fn the_loopback_api_answers_each_class_with_its_status() {
        assert_eq!(
            TerminalCode::Api(ErrorCode::PosSyncEventInvalid).http_status(),
            422
        );
        assert_eq!(TerminalCode::STORAGE_FAILED.http_status(), 503);
        assert_eq!(TerminalCode::Network.http_status(), 502);
        assert!(TerminalCode::Network.can_retry(0));
        assert!(!TerminalCode::AttemptsExhausted.can_retry(0));
    }

    proptest! {
        #[test]
        fn any_http_status_round_trips(status in 100u16..=599) {
            let code = TerminalCode::Http(status);
            prop_assert_eq!(TerminalCode::parse(&code.as_str()), Some(code));
        }
    }
}
