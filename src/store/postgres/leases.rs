//! Leases: a named duty (a connection's polling, a leader-only duty) held by one
//! replica at a time, kept by renewing it before it expires, with a fencing token.
//! The daemon's poll and leader duties run under them (`crate::replica`).
//!
//! A lease is a row of `leases` (migration 0002). Every time comes from the server's
//! clock (`clock_timestamp()`): a lease expires when the server says so, whatever the
//! replicas' clocks say. The row is never deleted, so the token only grows.
//!
//! Invariants:
//! - At most one holder at a time: [`Database::try_acquire`] is one statement
//!   (`INSERT … ON CONFLICT DO UPDATE … WHERE`), which the server serializes on the
//!   row; it takes the lease only when it is free, expired, or already the caller's.
//! - Every new acquisition (a new holder, or the same one after expiry) increments the
//!   fencing token; re-acquiring a live lease one already holds keeps it.
//! - A lease is held only while unexpired at the server: [`Database::renew`] fails on
//!   an expired lease even when nobody took it, and the holder then acquires anew,
//!   with a new token.
//! - A write guarded by [`fence`] commits only while the token it carries is the
//!   lease's current one; it locks the lease row `FOR SHARE` until its transaction
//!   ends, so nobody acquires the lease between the check and the commit.
//! - [`LeaseKeeper`] declares the lease lost (cancels the duty's token) before the
//!   server can have expired it: at `ttl - margin` after the start of the last renewal
//!   that succeeded, measured on the replica's monotonic clock.

use super::super::{Result, StoreError};
use super::{Database, millis};
use crate::retry::{self, Backoff};
use crate::store::from_ms;
use chrono::{DateTime, Utc};
use std::time::Duration;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// A lease this replica holds, as the server granted it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub name: String,
    pub holder: String,
    /// The fencing token: larger for every later acquisition of this lease.
    pub token: i64,
    /// When the server lets it expire unless renewed (the server's clock).
    pub expires_at: DateTime<Utc>,
}

/// A lease as `holders()` lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseHolder {
    pub name: String,
    pub holder: String,
    pub token: i64,
    pub acquired_at: DateTime<Utc>,
    pub expires_at: DateTime<Utc>,
}

/// The lease's times as epoch milliseconds, as the rest of the schema's times (no
/// chrono feature of the driver needed).
const EXPIRES_MS: &str = "(extract(epoch FROM expires_at) * 1000)::bigint";
const ACQUIRED_MS: &str = "(extract(epoch FROM acquired_at) * 1000)::bigint";

/// The lease name of leader-only duty `duty`.
pub fn leader_lease(duty: &str) -> String {
    format!("leader:{duty}")
}

/// The condition that lets a write through only while lease `$name` has token
/// `$token` (`name` and `token` are the statement's parameter numbers): add it to the
/// write's `WHERE`. It locks the lease row `FOR SHARE` until the transaction ends, so
/// an acquisition by another replica waits for this write, and a write that started
/// after one sees the new token and changes nothing.
pub fn fence(name: usize, token: usize) -> String {
    format!("(SELECT token FROM leases WHERE name = ${name} FOR SHARE) = ${token}")
}

/// The lease of connection `connection`'s polling.
pub fn poll_lease(connection: &str) -> String {
    format!("poll:{connection}")
}

/// Fails the caller's transaction with [`StoreError::LeaseLost`] unless lease `lease`
/// still has token `token`; holds the lease row `FOR SHARE` until the transaction
/// ends ([`fence`]), so nobody acquires the lease before this write commits.
pub(super) async fn check_fence(
    tx: &deadpool_postgres::Transaction<'_>,
    lease: &str,
    token: i64,
) -> Result<()> {
    let statement = tx
        .prepare_cached(&format!("SELECT {}", fence(1, 2)))
        .await?;
    let current: Option<bool> = tx.query_one(&statement, &[&lease, &token]).await?.get(0);
    if current == Some(true) {
        return Ok(());
    }
    Err(StoreError::LeaseLost {
        lease: lease.to_owned(),
    })
}

impl Database {
    /// Takes lease `name` for `holder` for `ttl` when it is free, expired or already
    /// `holder`'s; `None` when another holder has it. One statement.
    pub async fn try_acquire(
        &self,
        name: &str,
        holder: &str,
        ttl: Duration,
    ) -> Result<Option<Lease>> {
        let client = self.client().await?;
        // Invariant: the server serializes the upsert on the row, so of two replicas
        // racing for a free or expired lease exactly one passes the WHERE.
        let row = client
            .query_opt(
                &format!("INSERT INTO leases AS l (name, holder, token, acquired_at, renewed_at, expires_at)
                 VALUES ($1, $2, 1, clock_timestamp(), clock_timestamp(),
                         clock_timestamp() + $3::bigint * interval '1 millisecond')
                 ON CONFLICT (name) DO UPDATE SET
                     holder = EXCLUDED.holder,
                     -- Re-acquiring one's own live lease is the same acquisition.
                     token = CASE WHEN l.holder = EXCLUDED.holder AND l.expires_at > clock_timestamp()
                                  THEN l.token ELSE l.token + 1 END,
                     acquired_at = CASE WHEN l.holder = EXCLUDED.holder AND l.expires_at > clock_timestamp()
                                        THEN l.acquired_at ELSE EXCLUDED.acquired_at END,
                     renewed_at = EXCLUDED.renewed_at,
                     expires_at = EXCLUDED.expires_at
                 WHERE l.expires_at <= clock_timestamp() OR l.holder = EXCLUDED.holder
                 RETURNING token, {EXPIRES_MS}"),
                &[&name, &holder, &millis(ttl)],
            )
            .await?;
        Ok(row.map(|row| Lease {
            name: name.to_owned(),
            holder: holder.to_owned(),
            token: row.get(0),
            expires_at: from_ms(row.get(1)),
        }))
    }

    /// Extends `lease` to `ttl` from now. `false`: the lease is lost (expired, or
    /// acquired by someone since): the holder must stop its duty at once.
    pub async fn renew(&self, lease: &mut Lease, ttl: Duration) -> Result<bool> {
        let client = self.client().await?;
        let row = client
            .query_opt(
                &format!(
                    "UPDATE leases SET renewed_at = clock_timestamp(),
                     expires_at = clock_timestamp() + $4::bigint * interval '1 millisecond'
                 WHERE name = $1 AND holder = $2 AND token = $3 AND expires_at > clock_timestamp()
                 RETURNING {EXPIRES_MS}"
                ),
                &[&lease.name, &lease.holder, &lease.token, &millis(ttl)],
            )
            .await?;
        Ok(match row {
            Some(row) => {
                lease.expires_at = from_ms(row.get(0));
                true
            }
            None => false,
        })
    }

    /// Gives `lease` up: it expires now, so another replica may take it at once. The
    /// row stays (the token must keep growing). Whether it was still held.
    pub async fn release(&self, lease: &Lease) -> Result<bool> {
        let client = self.client().await?;
        let changed = client
            .execute(
                "UPDATE leases SET expires_at = clock_timestamp()
                 WHERE name = $1 AND holder = $2 AND token = $3 AND expires_at > clock_timestamp()",
                &[&lease.name, &lease.holder, &lease.token],
            )
            .await?;
        Ok(changed == 1)
    }

    /// The leases held now (unexpired at the server), by name.
    pub async fn holders(&self) -> Result<Vec<LeaseHolder>> {
        let client = self.client().await?;
        let rows = client
            .query(
                &format!(
                    "SELECT name, holder, token, {ACQUIRED_MS}, {EXPIRES_MS} FROM leases
                     WHERE expires_at > clock_timestamp() ORDER BY name"
                ),
                &[],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|row| LeaseHolder {
                name: row.get(0),
                holder: row.get(1),
                token: row.get(2),
                acquired_at: from_ms(row.get(3)),
                expires_at: from_ms(row.get(4)),
            })
            .collect())
    }

    /// Takes the lease of leader-only duty `duty` (see [`leader_lease`]); `None` when
    /// another replica leads it.
    ///
    /// Leadership is a lease rather than a session-level advisory lock
    /// (`pg_try_advisory_lock` on a connection held out of the pool), because:
    /// - its end is bounded and known to the leader: a [`LeaseKeeper`] stops the duty
    ///   before the lease expires, whereas a partitioned leader holding an advisory
    ///   lock learns that its session is gone only when its own connection fails (TCP
    ///   keepalives: a minute or more) while the server, once it noticed, has already
    ///   let another replica lead; the server notices a silent peer only after its
    ///   `tcp_keepalives_*` (two hours by the kernel's defaults);
    /// - it has a fencing token, so a deposed leader's writes can be refused;
    /// - it survives what breaks session state: a connection pooler in transaction
    ///   mode (PgBouncer, RDS Proxy), and a reconnect after a dropped connection,
    ///   which would silently drop an advisory lock;
    /// - it needs no connection kept out of the pool per duty, and `holders()` shows
    ///   it like any lease.
    pub async fn try_lead(&self, duty: &str, holder: &str, ttl: Duration) -> Result<Option<Lease>> {
        self.try_acquire(&leader_lease(duty), holder, ttl).await
    }
}

/// A lease a [`LeaseKeeper`] holds now, as its watch shows it.
#[derive(Debug, Clone)]
pub struct HeldLease {
    pub lease: Lease,
    /// Cancelled the moment the keeper considers the lease lost (or stops): the
    /// duty selects on it and stops at once.
    pub lost: CancellationToken,
}

/// How a [`LeaseKeeper`] times its renewals.
#[derive(Debug, Clone, Copy)]
pub struct KeeperTiming {
    /// How long the server keeps the lease after each renewal.
    pub ttl: Duration,
    /// How often it renews (and, while not holding, tries to acquire): `ttl / 3`.
    pub renew_every: Duration,
    /// How long before the lease could expire at the server the keeper declares it
    /// lost when renewals fail: `ttl / 5`, room for the duty to stop and for the
    /// clocks' rates to differ.
    pub margin: Duration,
}

impl KeeperTiming {
    pub fn for_ttl(ttl: Duration) -> KeeperTiming {
        KeeperTiming {
            ttl,
            renew_every: ttl / 3,
            margin: ttl / 5,
        }
    }

    /// Retries of one renewal: quick, within the time left before the margin.
    fn renew_retries(&self) -> Backoff {
        Backoff::full(self.renew_every / 10, self.renew_every / 3).attempts(5)
    }
}

/// A task that holds one named lease for as long as it runs: acquires it when it can,
/// renews it every `ttl / 3`, and shows in a watch whether it holds it, with a token
/// the duty stops on when it is lost. On shutdown it releases the lease, so another
/// replica takes it without waiting for the expiry.
pub struct LeaseKeeper {
    held: watch::Receiver<Option<HeldLease>>,
    task: tokio::task::JoinHandle<()>,
}

impl LeaseKeeper {
    /// Starts keeping lease `name` for `holder` until `shutdown` is cancelled.
    pub fn spawn(
        database: Database,
        name: String,
        holder: String,
        timing: KeeperTiming,
        shutdown: CancellationToken,
    ) -> LeaseKeeper {
        let (sender, held) = watch::channel(None);
        let task = tokio::spawn(keep(database, name, holder, timing, sender, shutdown));
        LeaseKeeper { held, task }
    }

    /// `Some` while the lease is held; changes when it is acquired or lost.
    pub fn watch(&self) -> watch::Receiver<Option<HeldLease>> {
        self.held.clone()
    }

    /// Waits for the task to end (after its shutdown token was cancelled).
    pub async fn join(self) {
        let _ = self.task.await;
    }

    /// Ends the task at once without releasing the lease, as a crashed replica
    /// would; the lease then expires at the server. For tests of failover.
    #[cfg(test)]
    pub(crate) fn abort(&self) {
        self.task.abort();
    }
}

async fn keep(
    database: Database,
    name: String,
    holder: String,
    timing: KeeperTiming,
    held: watch::Sender<Option<HeldLease>>,
    shutdown: CancellationToken,
) {
    let mut failures = 0;
    loop {
        // Not holding: try to acquire every `renew_every`, or later after failures.
        let attempt_started = Instant::now();
        let acquired = tokio::select! {
            _ = shutdown.cancelled() => return,
            acquired = database.try_acquire(&name, &holder, timing.ttl) => acquired,
        };
        let wait = match acquired {
            Ok(Some(lease)) => {
                failures = 0;
                tracing::info!(lease = %name, token = lease.token, "lease acquired");
                hold(&database, lease, attempt_started, timing, &held, &shutdown).await;
                if shutdown.is_cancelled() {
                    return;
                }
                timing.renew_every
            }
            Ok(None) => timing.renew_every,
            Err(error) => {
                failures += 1;
                tracing::warn!(lease = %name, %error, "acquiring the lease failed");
                Backoff::full(timing.renew_every, timing.ttl * 4)
                    .delay(failures)
                    .max(timing.renew_every)
            }
        };
        // From the attempt's start, so the attempts keep their pace whatever each
        // statement takes: a lease that expires is taken within `renew_every`.
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep_until(attempt_started + wait) => {}
        }
    }
}

/// Holds `lease`, acquired by a statement that started at `last_good`, until it is
/// lost or `shutdown` is cancelled (then releases it).
async fn hold(
    database: &Database,
    mut lease: Lease,
    mut last_good: Instant,
    timing: KeeperTiming,
    held: &watch::Sender<Option<HeldLease>>,
    shutdown: &CancellationToken,
) {
    let lost = CancellationToken::new();
    held.send_replace(Some(HeldLease {
        lease: lease.clone(),
        lost: lost.clone(),
    }));
    // Invariant: whichever way this returns, the duty is told first.
    let _stop_the_duty = lost.clone().drop_guard();
    loop {
        // The server keeps the lease at least `ttl` past the start of the last
        // renewal that succeeded (its clock_timestamp() was read after that start);
        // give it up `margin` earlier.
        let deadline = last_good + timing.ttl - timing.margin;
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => {
                lost.cancel();
                held.send_replace(None);
                // Best effort, bounded: a lease not released simply expires.
                let release = tokio::time::timeout(timing.margin, database.release(&lease));
                if let Ok(Err(error)) = release.await {
                    tracing::warn!(lease = %lease.name, %error, "releasing the lease failed; it expires on its own");
                }
                return;
            }
            _ = tokio::time::sleep_until(last_good + timing.renew_every) => {}
        }
        // When the attempt that succeeded started. A std Mutex: held for a store only,
        // never across an await; a Mutex rather than a Cell because the task is Send.
        let started = std::sync::Mutex::new(Instant::now());
        let renewal = retry::retry(
            timing.renew_retries(),
            "renewing a lease",
            StoreError::is_transient,
            || {
                *started.lock().expect("never poisoned: no panic while held") = Instant::now();
                let mut attempt = lease.clone();
                async move {
                    database
                        .renew(&mut attempt, timing.ttl)
                        .await
                        .map(|ok| ok.then_some(attempt))
                }
            },
        );
        // A renewal cut off by the deadline may still run at the server and extend the
        // lease later, for this holder and token only: harmless, the keeper then
        // acquires it again with the same token, or it expires.
        let outcome = tokio::select! {
            _ = shutdown.cancelled() => continue,
            outcome = tokio::time::timeout_at(deadline, renewal) => outcome,
        };
        match outcome {
            Ok(Ok(Some(renewed))) => {
                lease = renewed;
                last_good = *started.lock().expect("never poisoned: no panic while held");
            }
            Ok(Ok(None)) => {
                tracing::warn!(lease = %lease.name, token = lease.token, "lease lost: expired or taken by another replica");
                break;
            }
            Ok(Err(error)) => {
                tracing::warn!(lease = %lease.name, %error, "lease given up: renewing it failed");
                break;
            }
            Err(_) => {
                tracing::warn!(lease = %lease.name, "lease given up: no renewal succeeded before it could expire");
                break;
            }
        }
    }
    lost.cancel();
    held.send_replace(None);
}
