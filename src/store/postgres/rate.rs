//! The vendor limits replicas share: a connection's request rate (a token bucket)
//! and the vendor's daily request budget, kept in the database so that a vendor sees
//! one client however many replicas call it. `connectors::vendor_http` takes a turn
//! from the bucket after its own in-memory limiter (`governor`); the daily count is not
//! used by the daemon yet (the vendor's own budget headers are).
//!
//! The bucket of a connection (`rate_buckets`, migration 0003) holds `tokens`, at most
//! the burst, as of `updated_at`; it refills at the rate from then on. A request takes
//! one token when there is one, else it is told how long until there is one, sleeps
//! that long and asks again. The budget (`request_budgets`) counts the requests a
//! connection spent on a UTC day; at the limit the caller pauses until the next UTC
//! midnight, as `vendor_http` does when the vendor says its budget is spent.
//!
//! Invariants:
//! - Each answer is one statement, which the server serializes on the connection's
//!   row: [`Database::try_take`] is an `INSERT … ON CONFLICT DO UPDATE … RETURNING`
//!   that refills, decides and takes in the row's update; [`Database::spend`] an
//!   upsert whose update counts only while `used < limit`. Neither reads first and
//!   writes after, so no interleaving of replicas grants more than the limits allow.
//! - Every time is the server's clock, read once per request (`clock_timestamp()`,
//!   after the row is locked), never a replica's: replicas whose clocks disagree still
//!   share one bucket. `updated_at` never moves back (a server clock stepped back
//!   refills nothing until it catches up), so no interval is credited twice.
//! - Over any interval between two granted requests of a connection, the grants number
//!   at most `burst + rate × interval` by the grants' own server times.

use super::super::Result;
use super::Database;
use chrono::NaiveDate;
use std::time::Duration;

/// A connection's request rate: `per_second` on average, `burst` at once.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Rate {
    per_second: f64,
    burst: u32,
}

impl Rate {
    /// `None` when `per_second` is not a positive number (no limit, as for
    /// `vendor_http`'s limiter); a burst of 0 counts as 1.
    pub fn new(per_second: f64, burst: u32) -> Option<Rate> {
        (per_second.is_finite() && per_second > 0.0).then_some(Rate {
            per_second,
            burst: burst.max(1),
        })
    }

    pub fn per_second(&self) -> f64 {
        self.per_second
    }

    pub fn burst(&self) -> u32 {
        self.burst
    }

    /// The time one token takes to refill.
    fn period(&self) -> Duration {
        Duration::from_secs_f64(1.0 / self.per_second)
    }
}

/// The answer of [`Database::try_take`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Taken {
    /// A token was taken: the request may go now. `at_us`: when, by the server's clock
    /// (epoch microseconds).
    Granted { at_us: i64 },
    /// No token: ask again after `wait` (more than zero, at most one token's refill
    /// time); another replica may take that token first.
    Wait { wait: Duration },
}

/// The answer of [`Database::spend`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BudgetAnswer {
    /// One request of the day's budget spent; `remaining` are left.
    Granted { remaining: u32 },
    /// The day's budget is spent: no request until the next UTC day.
    Spent,
}

/// One request from `$1`'s bucket: `$2` rate per second, `$3` burst. The clock is read
/// once, in the subquery `c`, when the row is locked.
const TAKE: &str = "
INSERT INTO rate_buckets AS b (connection, tokens, updated_at, granted)
VALUES ($1, $3::float8 - 1, clock_timestamp(), true)
ON CONFLICT (connection) DO UPDATE SET (tokens, updated_at, granted) = (
    SELECT CASE WHEN s.available >= 1 THEN s.available - 1 ELSE s.available END,
           s.at, s.available >= 1
      FROM (SELECT least($3::float8, b.tokens + $2::float8 * greatest(0,
                       extract(epoch FROM c.now - b.updated_at)::float8)) AS available,
                   greatest(b.updated_at, c.now) AS at
              FROM (SELECT clock_timestamp() AS now) c) s)
RETURNING granted, tokens, (extract(epoch FROM updated_at) * 1000000)::bigint";

/// One request of `$1`'s budget on day `$2` (ISO date) with limit `$3`. No row is
/// written when the limit is 0, nor updated once `used` reached it.
const SPEND: &str = "
INSERT INTO request_budgets AS b (connection, day, used)
SELECT $1, $2::text::date, 1 WHERE $3::bigint > 0
ON CONFLICT (connection, day) DO UPDATE SET used = b.used + 1 WHERE b.used < $3::bigint
RETURNING used";

impl Database {
    /// Takes a token from `connection`'s bucket at `rate`, or says how long until one
    /// is there. One statement; the server's clock.
    pub async fn try_take(&self, connection: &str, rate: Rate) -> Result<Taken> {
        let client = self.client().await?;
        let row = client
            .query_one(
                TAKE,
                &[&connection, &rate.per_second, &f64::from(rate.burst)],
            )
            .await?;
        let granted: bool = row.get(0);
        let tokens: f64 = row.get(1);
        if granted {
            return Ok(Taken::Granted { at_us: row.get(2) });
        }
        Ok(Taken::Wait {
            wait: token_wait(tokens, rate),
        })
    }

    /// Spends one request of `connection`'s budget of `limit` for the UTC `day`, or
    /// says the day's budget is spent. One statement; never more than `limit`
    /// granted, however many replicas spend at once. A new day starts at zero.
    pub async fn spend(
        &self,
        connection: &str,
        day: NaiveDate,
        limit: u32,
    ) -> Result<BudgetAnswer> {
        let client = self.client().await?;
        let row = client
            .query_opt(SPEND, &[&connection, &day.to_string(), &i64::from(limit)])
            .await?;
        Ok(match row {
            Some(row) => {
                let used: i64 = row.get(0);
                BudgetAnswer::Granted {
                    remaining: u32::try_from(i64::from(limit) - used).unwrap_or(0),
                }
            }
            None => BudgetAnswer::Spent,
        })
    }
}

/// How long until a bucket holding `tokens` (less than one) has one: more than zero
/// (rounded up to the server clock's microsecond), at most one token's refill time.
fn token_wait(tokens: f64, rate: Rate) -> Duration {
    let missing = (1.0 - tokens).clamp(0.0, 1.0);
    let micros = (missing / rate.per_second * 1e6).ceil();
    Duration::from_micros(micros as u64)
        .max(Duration::from_micros(1))
        .min(rate.period().max(Duration::from_micros(1)))
}

#[cfg(test)]
mod tests;
