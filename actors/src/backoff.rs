//! Retry pacing: exponential backoff with full jitter, and whether the cloud is reachable.
//!
//! The delay rule is a pure function ([`next_delay`]) so that it can be proven with property
//! tests and replayed by simulations; the [`Backoff`] actor only owns what must be shared by the
//! other actors: the seeded random source (so a seed reproduces a run) and the online/offline
//! verdict built from everyone's contact reports.

use chrono::{DateTime, Utc};
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::time::Duration;

use crate::ports::Clock;
use crate::status::{ActorKind, ActorState, SharedBoard};

/// How retries are paced. Defaults: base 1 s, cap 5 min, 12 attempts.
///
/// `max_attempts` counts deliveries: after the `max_attempts`-th failed attempt there is no
/// further automatic retry (the journal row goes to `needs_attention` until an operator retries).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct BackoffPolicy {
    /// Upper bound of the first retry's delay.
    pub base: Duration,
    /// No delay exceeds this (except a longer `Retry-After`, which wins up to
    /// [`MAX_RETRY_AFTER`]).
    pub cap: Duration,
    /// Deliveries allowed before giving up.
    pub max_attempts: u32,
}

impl Default for BackoffPolicy {
    fn default() -> Self {
        BackoffPolicy {
            base: Duration::from_secs(1),
            cap: Duration::from_secs(300),
            max_attempts: 12,
        }
    }
}

/// The longest `Retry-After` honoured: one hour. A longer one (a misconfigured proxy, a
/// garbled header, `Retry-After: 99999999999999`) is cut to this, so a server can slow the
/// till down but never park its queue for days, and no delay can overflow the clock
/// arithmetic that turns it into an instant. `HttpCloud` clamps when it parses the header;
/// [`next_delay`] clamps again, so no caller can get past the bound.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(3600);

/// No delay [`next_delay`] returns exceeds this: the cap is clamped to it (and
/// `EngineConfig::validate` refuses a longer one) and so is `Retry-After`. Hence a stored
/// retry instant further ahead of the wall clock than this was not set by this rule on this
/// clock: the wall clock was stepped back since (NTP correcting a wrong RTC), and the row is
/// treated as due (`LocalStore::claim_batch`) instead of stalling for as long as the step.
pub const MAX_DELAY: Duration = MAX_RETRY_AFTER;

/// The upper bound of the jitter window after `failures` failed attempts:
/// `min(cap, base * 2^(failures-1))`, computed without overflow.
pub fn delay_ceiling(policy: &BackoffPolicy, failures: u32) -> Duration {
    let exp = failures.saturating_sub(1).min(63);
    let factor = 1u64 << exp;
    let base_ms = u64::try_from(policy.base.as_millis()).unwrap_or(u64::MAX);
    let cap_ms = u64::try_from(policy.cap.as_millis()).unwrap_or(u64::MAX);
    Duration::from_millis(base_ms.saturating_mul(factor).min(cap_ms))
}

/// Delay before the next attempt after `failures` failed attempts (≥ 1), or `None` when the
/// policy's attempts are used up.
///
/// Full jitter (`rand(0 ..= ceiling)`, with `unit_random` in `[0, 1]` supplying the randomness)
/// spreads the retries of many terminals that lost the network at the same moment, so they do
/// not hit the cloud in waves; a `Retry-After` from the server is a floor, because the server
/// knows its own load better than our guess does.
pub fn next_delay(
    policy: &BackoffPolicy,
    failures: u32,
    retry_after: Option<Duration>,
    unit_random: f64,
) -> Option<Duration> {
    if failures >= policy.max_attempts {
        return None;
    }
    let ceiling = delay_ceiling(policy, failures.max(1));
    let unit = if unit_random.is_finite() {
        unit_random.clamp(0.0, 1.0)
    } else {
        1.0
    };
    let jittered = ceiling.mul_f64(unit);
    let delay = match retry_after.map(|r| r.min(MAX_RETRY_AFTER)) {
        Some(floor) if floor > jittered => floor,
        _ => jittered,
    };
    Some(delay.min(MAX_DELAY))
}

/// Whether a run of failures may exhaust the policy's `max_attempts`.
///
/// Pacing and giving up are separate questions: every retry is paced by the same exponential
/// rule, but only failures that belong to the thing being retried (a sale the cloud keeps
/// failing while it accepts others) may use up its attempts. Failures that only say the cloud
/// is away (no answer, a proxy's 502/503/504, 429) are paced forever, never given up on: an
/// outage of any length must not park a sale for an operator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Budget {
    /// `Decision::GiveUp` once `failures >= max_attempts`.
    Attempts,
    /// Never gives up; past `max_attempts` the delay stays at its capped ceiling.
    Unbounded,
}

/// The answer to "when may I try again?".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Try again at this instant (clock time).
    RetryAt(DateTime<Utc>),
    /// Attempts are used up: stop retrying automatically.
    GiveUp,
}

/// Messages of the [`Backoff`] actor.
#[derive(Debug)]
pub enum BackoffMsg {
    /// Asks when to retry after `failures` failed attempts, honouring `retry_after`.
    Decide {
        /// Failed attempts so far (≥ 1).
        failures: u32,
        /// Whether these failures may use up the policy's attempts.
        budget: Budget,
        /// The server's `Retry-After`, a floor for the delay.
        retry_after: Option<Duration>,
        /// Where the decision goes.
        reply: RpcReplyPort<Decision>,
    },
    /// Another actor reached the cloud (`reachable = true`, any answer counts) or could not.
    Contact {
        /// Whether the cloud answered at all.
        reachable: bool,
    },
}

/// Typed start arguments of the [`Backoff`] actor.
#[derive(Clone)]
pub struct BackoffArgs {
    /// Pacing rules.
    pub policy: BackoffPolicy,
    /// Seed of the jitter source; `None` draws one (and logs it so a run can be replayed).
    pub seed: Option<u64>,
    /// Turns delays into retry instants.
    pub clock: Arc<dyn Clock>,
    /// Where the online flag is shown.
    pub board: SharedBoard,
}

/// Live state of the [`Backoff`] actor.
pub struct BackoffState {
    policy: BackoffPolicy,
    rng: StdRng,
    clock: Arc<dyn Clock>,
    board: SharedBoard,
}

/// The actor that paces retries for the whole engine and tracks reachability.
pub struct Backoff;

impl Actor for Backoff {
    type Msg = BackoffMsg;
    type State = BackoffState;
    type Arguments = BackoffArgs;

    async fn pre_start(
        &self,
        _myself: ActorRef<Self::Msg>,
        args: BackoffArgs,
    ) -> Result<Self::State, ActorProcessingErr> {
        let seed = args.seed.unwrap_or_else(|| rand::rng().random());
        tracing::info!(seed, "backoff jitter seeded");
        args.board.set_state(ActorKind::Backoff, ActorState::Ready);
        Ok(BackoffState {
            policy: args.policy,
            rng: StdRng::seed_from_u64(seed),
            clock: args.clock,
            board: args.board,
        })
    }

    async fn handle(
        &self,
        _myself: ActorRef<Self::Msg>,
        message: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match message {
            BackoffMsg::Decide {
                failures,
                budget,
                retry_after,
                reply,
            } => {
                let unit: f64 = state.rng.random();
                let decision = decide(
                    &state.policy,
                    failures,
                    budget,
                    retry_after,
                    unit,
                    state.clock.now(),
                );
                // The asker may have gone away (restarted); nothing to do then.
                let _ = reply.send(decision);
            }
            BackoffMsg::Contact { reachable } => {
                state.board.set_contact(reachable, state.clock.now());
            }
        }
        Ok(())
    }
}

/// [`next_delay`] turned into a clock instant. With [`Budget::Unbounded`] the policy's
/// `max_attempts` is not applied (the delay is still capped), so the answer is always a time.
pub fn decide(
    policy: &BackoffPolicy,
    failures: u32,
    budget: Budget,
    retry_after: Option<Duration>,
    unit_random: f64,
    now: DateTime<Utc>,
) -> Decision {
    let unbounded = BackoffPolicy {
        max_attempts: u32::MAX,
        ..*policy
    };
    let policy = match budget {
        Budget::Attempts => policy,
        Budget::Unbounded => &unbounded,
    };
    match next_delay(policy, failures, retry_after, unit_random) {
        Some(d) => Decision::RetryAt(retry_instant(now, d, policy.cap)),
        None => Decision::GiveUp,
    }
}

/// `now + delay` without panicking: `DateTime + TimeDelta` panics past chrono's range, and
/// a configured cap could be anything. A delay that does not fit falls back to `now + cap`,
/// then to `now + MAX_RETRY_AFTER`, and finally to `now` itself (retry at once: a busy retry
/// is a nuisance, a panic takes the actor down with every retry it was pacing).
pub fn retry_instant(now: DateTime<Utc>, delay: Duration, cap: Duration) -> DateTime<Utc> {
    [delay, cap, MAX_RETRY_AFTER]
        .into_iter()
        .find_map(|d| {
            chrono::Duration::from_std(d)
                .ok()
                .and_then(|d| now.checked_add_signed(d))
        })
        .unwrap_or(now)
}

/// Asks the Backoff actor, falling back to the deterministic worst case (the full ceiling)
/// when it is down (e.g. being restarted), so a retry is never scheduled sooner than policy.
pub async fn ask(
    backoff: Option<ActorRef<BackoffMsg>>,
    policy: &BackoffPolicy,
    failures: u32,
    budget: Budget,
    retry_after: Option<Duration>,
    now: DateTime<Utc>,
) -> Decision {
    if let Some(b) = backoff {
        let asked = b
            .call(
                |reply| BackoffMsg::Decide {
                    failures,
                    budget,
                    retry_after,
                    reply,
                },
                Some(Duration::from_secs(5)),
            )
            .await;
        if let Ok(ractor::rpc::CallResult::Success(d)) = asked {
            return d;
        }
    }
    decide(policy, failures, budget, retry_after, 1.0, now)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn policy() -> BackoffPolicy {
        BackoffPolicy::default()
    }

    #[test]
    fn first_retry_is_within_base_and_grows_to_the_cap() {
        let p = policy();
        assert_eq!(next_delay(&p, 1, None, 1.0), Some(Duration::from_secs(1)));
        assert_eq!(next_delay(&p, 2, None, 1.0), Some(Duration::from_secs(2)));
        assert_eq!(next_delay(&p, 4, None, 1.0), Some(Duration::from_secs(8)));
        assert_eq!(
            next_delay(&p, 11, None, 1.0),
            Some(Duration::from_secs(300))
        );
        assert_eq!(next_delay(&p, 1, None, 0.0), Some(Duration::ZERO));
    }

    #[test]
    fn attempts_are_used_up_at_max_attempts() {
        let p = BackoffPolicy {
            max_attempts: 3,
            ..policy()
        };
        assert!(next_delay(&p, 2, None, 0.5).is_some());
        assert_eq!(next_delay(&p, 3, None, 0.5), None);
        assert_eq!(
            decide(&p, 3, Budget::Attempts, None, 0.5, Utc::now()),
            Decision::GiveUp
        );
    }

    proptest! {
        /// However long an outage lasts, an unbudgeted retry is always scheduled, never later
        /// than the cap (or a longer `Retry-After`) after now.
        #[test]
        fn unbounded_failures_are_never_given_up(
            failures in 1u32..1_000_000, max in 1u32..20, unit in 0.0f64..=1.0,
            base_ms in 1u64..5000, cap_ms in 1u64..600_000
        ) {
            let p = BackoffPolicy { base: Duration::from_millis(base_ms), cap: Duration::from_millis(cap_ms), max_attempts: max };
            let now = Utc::now();
            match decide(&p, failures, Budget::Unbounded, None, unit, now) {
                Decision::RetryAt(t) => {
                    prop_assert!(t >= now);
                    prop_assert!(t <= now + chrono::Duration::milliseconds(i64::try_from(cap_ms).unwrap_or(i64::MAX)));
                }
                Decision::GiveUp => prop_assert!(false, "an unbounded retry was given up"),
            }
            prop_assert_eq!(
                decide(&p, failures, Budget::Attempts, None, unit, now) == Decision::GiveUp,
                failures >= max
            );
        }
    }

    #[test]
    fn retry_after_is_a_floor_even_above_the_cap() {
        let p = policy();
        let ra = Duration::from_secs(600);
        assert_eq!(next_delay(&p, 1, Some(ra), 0.3), Some(ra));
        // a short Retry-After does not shorten a longer jittered delay
        assert_eq!(
            next_delay(&p, 5, Some(Duration::from_millis(1)), 1.0),
            Some(Duration::from_secs(16))
        );
    }

    #[test]
    fn a_huge_retry_after_is_clamped_and_never_panics() {
        let p = policy();
        let huge = Duration::from_secs(99_999_999_999_999);
        assert_eq!(next_delay(&p, 1, Some(huge), 0.5), Some(MAX_RETRY_AFTER));
        let now = Utc::now();
        for budget in [Budget::Attempts, Budget::Unbounded] {
            assert_eq!(
                decide(&p, 1, budget, Some(huge), 0.5, now),
                Decision::RetryAt(now + chrono::Duration::seconds(3600))
            );
            assert_eq!(
                decide(&p, 1, budget, Some(Duration::MAX), 1.0, now),
                Decision::RetryAt(now + chrono::Duration::seconds(3600))
            );
        }
        // A cap chrono cannot represent falls back instead of panicking.
        let wild = BackoffPolicy {
            cap: Duration::MAX,
            base: Duration::MAX,
            max_attempts: 100,
        };
        assert!(matches!(
            decide(&wild, 50, Budget::Attempts, None, 1.0, now),
            Decision::RetryAt(t) if t >= now
        ));
        // And at the edge of the calendar the answer is still a time, not a panic.
        let end = DateTime::<Utc>::MAX_UTC;
        assert_eq!(
            decide(&p, 3, Budget::Unbounded, Some(huge), 1.0, end),
            Decision::RetryAt(end)
        );
    }

    #[test]
    fn huge_failure_counts_do_not_overflow() {
        let p = BackoffPolicy {
            max_attempts: u32::MAX,
            ..policy()
        };
        assert_eq!(next_delay(&p, 10_000, None, 1.0), Some(p.cap));
        assert_eq!(
            next_delay(&p, 5, None, f64::NAN),
            Some(Duration::from_secs(16))
        );
    }

    proptest! {
        #[test]
        fn delay_stays_within_zero_and_the_ceiling(
            failures in 1u32..40, unit in 0.0f64..=1.0, base_ms in 1u64..5000, cap_ms in 1u64..600_000
        ) {
            let p = BackoffPolicy { base: Duration::from_millis(base_ms), cap: Duration::from_millis(cap_ms), max_attempts: 100 };
            let d = next_delay(&p, failures, None, unit).expect("attempts left");
            prop_assert!(d <= delay_ceiling(&p, failures));
            prop_assert!(d <= p.cap);
        }

        #[test]
        fn ceiling_is_monotone_and_capped(failures in 1u32..80, base_ms in 1u64..5000, cap_ms in 1u64..600_000) {
            let p = BackoffPolicy { base: Duration::from_millis(base_ms), cap: Duration::from_millis(cap_ms), max_attempts: 100 };
            prop_assert!(delay_ceiling(&p, failures) <= delay_ceiling(&p, failures + 1));
            prop_assert!(delay_ceiling(&p, failures) <= p.cap);
        }

        #[test]
        fn retry_after_is_always_honoured(failures in 1u32..12, unit in 0.0f64..=1.0, ra_s in 0u64..3600) {
            let p = policy();
            let ra = Duration::from_secs(ra_s);
            let d = next_delay(&p, failures, Some(ra), unit).expect("attempts left");
            prop_assert!(d >= ra);
        }

        #[test]
        fn same_seed_same_delays(seed in any::<u64>()) {
            let p = policy();
            let mut a = StdRng::seed_from_u64(seed);
            let mut b = StdRng::seed_from_u64(seed);
            for f in 1..12 {
                prop_assert_eq!(next_delay(&p, f, None, rand::Rng::random(&mut a)), next_delay(&p, f, None, rand::Rng::random(&mut b)));
            }
        }
    }
}
