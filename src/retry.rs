//! Retry timing for the whole crate: exponential backoff with jitter, a cap, bounded
//! attempts and a server's `Retry-After` honoured within a limit.
//!
//! Every retry loop takes its delays from a [`Backoff`]: vendor requests
//! (`vendor_http`), sync runs after a failure (`sync`), follow-up and digest emails
//! after a transient SMTP failure (`followup`), webhook rows that could not be applied
//! (`webhooks::worker`), and the long-running workers after a store error
//! ([`STORE_ERRORS`]). [`retry`] runs a write that must not be lost (what a sent email
//! did, a rotated OAuth token) again while the store fails transiently.
//!
//! Invariants:
//! - The ceiling of retry `n` (1 for the first retry) is `initial · 2^(n-1)`, never more
//!   than `max`; the delay drawn is within `[0, ceiling]` ([`Jitter::Full`]) or
//!   `[ceiling/2, ceiling]` ([`Jitter::Equal`]), so it never exceeds `max`.
//! - A hint from the server (`Retry-After`) is waited for, up to the caller's limit:
//!   the delay is the larger of the capped hint and the drawn backoff.
//! - Attempts are bounded by `max_attempts` (the first attempt included); only the
//!   workers' store backoff retries until the process stops, each wait capped.

use rand::Rng;
use std::time::Duration;

/// How the delay is drawn below the ceiling of a retry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Jitter {
    /// Uniform in `[0, ceiling]`: spreads a crowd of retries best (AWS's "full jitter").
    Full,
    /// Uniform in `[ceiling/2, ceiling]` ("equal jitter"): for callers that want a
    /// floor, so a retry never comes at once (an SMTP relay, a locked database).
    Equal,
}

/// An exponential backoff: the delays of a retry loop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    /// The ceiling of the first retry.
    pub initial: Duration,
    /// The largest ceiling: no delay is longer.
    pub max: Duration,
    pub jitter: Jitter,
    /// Attempts in all, the first one included; `u32::MAX` retries until stopped.
    pub max_attempts: u32,
}

/// The long-running workers' pause after a failed pass over the store (busy, I/O
/// error, disk full): from 1 s, doubling up to 30 s, retried until the daemon stops.
pub const STORE_ERRORS: Backoff = Backoff::equal(Duration::from_secs(1), Duration::from_secs(30));

impl Backoff {
    /// Full jitter from `initial` up to `max`, unbounded attempts (see [`Self::attempts`]).
    pub const fn full(initial: Duration, max: Duration) -> Backoff {
        Backoff {
            initial,
            max,
            jitter: Jitter::Full,
            max_attempts: u32::MAX,
        }
    }

    /// Equal jitter from `initial` up to `max`, unbounded attempts.
    pub const fn equal(initial: Duration, max: Duration) -> Backoff {
        Backoff {
            initial,
            max,
            jitter: Jitter::Equal,
            max_attempts: u32::MAX,
        }
    }

    /// The same backoff, giving up after `attempts` attempts in all.
    pub const fn attempts(self, attempts: u32) -> Backoff {
        Backoff {
            max_attempts: attempts,
            ..self
        }
    }

    /// Whether another attempt may follow `made` attempts (the first one included).
    pub fn may_retry(&self, made: u32) -> bool {
        made < self.max_attempts
    }

    /// The most retry `retry` (1 for the first) waits: `initial · 2^(retry-1)`, capped.
    pub fn ceiling(&self, retry: u32) -> Duration {
        let doublings = retry.saturating_sub(1).min(31);
        self.initial
            .checked_mul(1u32 << doublings)
            .unwrap_or(Duration::MAX)
            .min(self.max)
    }

    /// The delay before retry `retry` (1 for the first), drawn below its ceiling.
    pub fn delay(&self, retry: u32) -> Duration {
        self.delay_with(retry, &mut rand::rng())
    }

    /// [`Self::delay`] with a given source of randomness (tests seed it).
    pub fn delay_with(&self, retry: u32, rng: &mut impl Rng) -> Duration {
        let ceiling = self.ceiling(retry);
        let floor = match self.jitter {
            Jitter::Full => Duration::ZERO,
            Jitter::Equal => ceiling / 2,
        };
        let nanos = |d: Duration| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        Duration::from_nanos(rng.random_range(nanos(floor)..=nanos(ceiling)))
    }

    /// The delay before retry `retry` when the server named one (`Retry-After`): at
    /// least its hint, capped at `limit` so a bogus hint cannot stall the caller, and
    /// at least the drawn backoff.
    pub fn delay_honouring(&self, retry: u32, hint: Option<Duration>, limit: Duration) -> Duration {
        let asked = hint.map_or(Duration::ZERO, |hint| hint.min(limit));
        asked.max(self.delay(retry))
    }
}

/// Runs `attempt` until it succeeds, fails with an error `retryable` refuses, or the
/// attempts of `backoff` are spent, waiting `backoff.delay(n)` before retry `n`; each
/// retry is logged naming `what`. Returns the last result.
pub async fn retry<T, E, F, Fut>(
    backoff: Backoff,
    what: &str,
    retryable: impl Fn(&E) -> bool,
    mut attempt: F,
) -> Result<T, E>
where
    E: std::fmt::Display,
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, E>>,
{
    let mut made = 1;
    loop {
        match attempt().await {
            Err(error) if retryable(&error) && backoff.may_retry(made) => {
                let delay = backoff.delay(made);
                tracing::warn!(%error, attempt = made, retry_in_ms = delay.as_millis() as u64, "{what} failed; trying again");
                tokio::time::sleep(delay).await;
                made += 1;
            }
            result => return result,
        }
    }
}

/// `period` moved at random by up to `fraction` of itself either way (a poll interval
/// of 60 s with 0.1 becomes 54–66 s), so periodic work of many connections spreads out.
pub fn spread(period: Duration, fraction: f64) -> Duration {
    let fraction = fraction.clamp(0.0, 1.0);
    period.mul_f64(rand::rng().random_range((1.0 - fraction)..=(1.0 + fraction)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    const BACKOFFS: [Backoff; 4] = [
        Backoff::full(Duration::from_millis(500), Duration::from_secs(30)),
        Backoff::equal(Duration::from_secs(1), Duration::from_secs(300)),
        Backoff::equal(Duration::from_millis(200), Duration::from_secs(1)),
        Backoff::full(Duration::from_nanos(1), Duration::from_nanos(3)),
    ];

    #[test]
    fn the_ceiling_doubles_from_initial_until_the_cap_and_stays_there() {
        let backoff = Backoff::full(Duration::from_millis(500), Duration::from_secs(30));
        let ceilings: Vec<u64> = (1..=9)
            .map(|retry| backoff.ceiling(retry).as_millis() as u64)
            .collect();
        assert_eq!(
            ceilings,
            [
                500, 1_000, 2_000, 4_000, 8_000, 16_000, 30_000, 30_000, 30_000
            ]
        );
        // Huge retry counts neither overflow nor pass the cap.
        assert_eq!(backoff.ceiling(u32::MAX), Duration::from_secs(30));
        assert_eq!(backoff.ceiling(0), Duration::from_millis(500));
    }

    #[test]
    fn every_drawn_delay_lies_within_its_jitter_band_for_any_retry() {
        // Property over seeded random draws: 4 backoffs × 200 retry counts × 50 draws.
        let mut rng = StdRng::seed_from_u64(12);
        for backoff in BACKOFFS {
            for retry in (0..100).chain(u32::MAX - 99..=u32::MAX) {
                let ceiling = backoff.ceiling(retry);
                assert!(ceiling <= backoff.max);
                let floor = match backoff.jitter {
                    Jitter::Full => Duration::ZERO,
                    Jitter::Equal => ceiling / 2,
                };
                for _ in 0..50 {
                    let delay = backoff.delay_with(retry, &mut rng);
                    assert!(
                        floor <= delay && delay <= ceiling,
                        "{backoff:?} retry {retry}: {delay:?} outside [{floor:?}, {ceiling:?}]"
                    );
                }
            }
        }
    }

    #[test]
    fn full_jitter_uses_the_whole_range_down_to_zero() {
        let backoff = Backoff::full(Duration::from_secs(1), Duration::from_secs(1));
        let mut rng = StdRng::seed_from_u64(7);
        let draws: Vec<Duration> = (0..2_000)
            .map(|_| backoff.delay_with(1, &mut rng))
            .collect();
        assert!(draws.iter().any(|d| *d < Duration::from_millis(100)));
        assert!(draws.iter().any(|d| *d > Duration::from_millis(900)));
        let mean = draws.iter().sum::<Duration>() / draws.len() as u32;
        assert!(
            (Duration::from_millis(450)..Duration::from_millis(550)).contains(&mean),
            "{mean:?}"
        );
    }

    #[test]
    fn delays_grow_with_the_retry_count_on_average() {
        let backoff = Backoff::equal(Duration::from_millis(100), Duration::from_secs(60));
        let mut rng = StdRng::seed_from_u64(3);
        let mean = |retry: u32, rng: &mut StdRng| {
            (0..200)
                .map(|_| backoff.delay_with(retry, rng))
                .sum::<Duration>()
                / 200
        };
        let means: Vec<Duration> = (1..=8).map(|retry| mean(retry, &mut rng)).collect();
        assert!(means.windows(2).all(|pair| pair[0] < pair[1]), "{means:?}");
    }

    #[test]
    fn a_retry_after_hint_is_honoured_up_to_the_limit_and_never_shortens_the_backoff() {
        let backoff = Backoff::equal(Duration::from_secs(4), Duration::from_secs(4));
        let limit = Duration::from_secs(120);
        for _ in 0..100 {
            assert_eq!(
                backoff.delay_honouring(1, Some(Duration::from_secs(90)), limit),
                Duration::from_secs(90)
            );
            assert_eq!(
                backoff.delay_honouring(1, Some(Duration::from_secs(86_400)), limit),
                limit
            );
            let short = backoff.delay_honouring(1, Some(Duration::from_millis(1)), limit);
            assert!(short >= Duration::from_secs(2), "{short:?}");
            let none = backoff.delay_honouring(1, None, limit);
            assert!((Duration::from_secs(2)..=Duration::from_secs(4)).contains(&none));
        }
    }

    #[test]
    fn attempts_are_bounded_when_asked_and_unbounded_otherwise() {
        let bounded = Backoff::full(Duration::from_secs(1), Duration::from_secs(2)).attempts(3);
        assert!(bounded.may_retry(1) && bounded.may_retry(2));
        assert!(!bounded.may_retry(3) && !bounded.may_retry(4));
        assert!(STORE_ERRORS.may_retry(1_000_000));
    }

    #[tokio::test(start_paused = true)]
    async fn retry_stops_at_success_at_a_refused_error_or_after_its_attempts() {
        use std::sync::atomic::{AtomicU32, Ordering};
        let backoff = Backoff::equal(Duration::from_millis(10), Duration::from_secs(1)).attempts(4);
        let calls = AtomicU32::new(0);
        let run = |fail_until: u32, error: &'static str| {
            calls.store(0, Ordering::SeqCst);
            let calls = &calls;
            retry(
                backoff,
                "a test write",
                |e: &&str| *e == "busy",
                move || async move {
                    let call = calls.fetch_add(1, Ordering::SeqCst);
                    if call < fail_until {
                        Err(error)
                    } else {
                        Ok(call)
                    }
                },
            )
        };
        assert_eq!(run(2, "busy").await, Ok(2));
        assert_eq!(calls.load(Ordering::SeqCst), 3);
        assert_eq!(run(10, "corrupt").await, Err("corrupt"));
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        assert_eq!(run(10, "busy").await, Err("busy"));
        assert_eq!(calls.load(Ordering::SeqCst), 4);
    }

    /// The waits `retry` makes grow: the wait before retry n lies in retry n's equal
    /// jitter band (ceilings 10, 20, 40 ms), and the attempts stop at the bound.
    #[tokio::test(start_paused = true)]
    async fn retry_waits_longer_before_each_retry_up_to_its_cap_and_stops_at_the_bound() {
        use std::sync::Mutex;
        let backoff =
            Backoff::equal(Duration::from_millis(10), Duration::from_millis(40)).attempts(5);
        let calls: Mutex<Vec<tokio::time::Instant>> = Mutex::new(Vec::new());
        let result: Result<(), &str> = retry(
            backoff,
            "a test write",
            |_| true,
            || {
                calls.lock().unwrap().push(tokio::time::Instant::now());
                async { Err("busy") }
            },
        )
        .await;
        assert_eq!(result, Err("busy"));
        let calls = calls.into_inner().unwrap();
        assert_eq!(calls.len(), 5, "the first attempt and four retries");
        let waits: Vec<Duration> = calls.windows(2).map(|w| w[1] - w[0]).collect();
        for (n, wait) in waits.iter().enumerate() {
            let ceiling = backoff.ceiling(n as u32 + 1);
            assert!(
                ceiling / 2 <= *wait && *wait <= ceiling,
                "wait before retry {}: {wait:?} outside [{:?}, {ceiling:?}]; all: {waits:?}",
                n + 1,
                ceiling / 2
            );
        }
        // Bands [5, 10], [10, 20], [20, 40], [20, 40] ms: the third wait is longer than
        // the first can be, and the cap holds the fourth.
        assert!(waits[2] > waits[0], "{waits:?}");
        assert!(waits[3] <= Duration::from_millis(40), "{waits:?}");
    }

    #[test]
    fn spread_stays_within_its_fraction() {
        let period = Duration::from_secs(60);
        for _ in 0..1_000 {
            let spread = spread(period, 0.1);
            assert!(
                (Duration::from_secs(54)..=Duration::from_secs(66)).contains(&spread),
                "{spread:?}"
            );
        }
    }
}
