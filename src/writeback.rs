//! The write-back worker: records sent follow-ups on their deals in their CRMs, from
//! the queue the follow-up worker fills (`store::writeback`: one row per sent email of
//! a connection with `[connections.NAME.writeback] enabled = true`).
//!
//! Each pass claims the due rows (on PostgreSQL each row goes to one replica), hands
//! each to its connection's connector (`Connector::write_back`: the manifest's
//! `[writeback]` requests through `vendor_http`, under the connection's rate limit and
//! budget) and records the outcome: done, a retry after a backoff, or failed.
//!
//! Invariants:
//! - The email never waits for its write-back and is never sent again because of it:
//!   the row was queued in the transaction that marked the email sent, and this worker
//!   writes only `writebacks` rows.
//! - At most one record per email in the CRM: an attempt counts before its request goes
//!   out, and one that follows an attempt whose outcome is unknown looks the record up
//!   first (or the manifest's create is the vendor's idempotent upsert).
//! - Retries are bounded (`writeback.max_attempts`) with backoff from
//!   `writeback.retry_delay` doubling up to an hour ([`Backoff`]), a vendor's
//!   `Retry-After` honoured; a refused request fails at once. Failures show in
//!   `dealsync deals show` and in `/metrics` (`dealsync_writebacks`).
//! - A failing store marks the worker degraded in `/readyz` and the pass is tried again
//!   after a backoff; no row pays an attempt for it.

use crate::config::WritebackConfig;
use crate::connectors::WritebackError;
use crate::health::WorkerHealth;
use crate::ingest::{Connections, SyncDeps};
use crate::retry::Backoff;
use crate::store::{StoreError, WritebackJob, WritebackSettlement};
use crate::telemetry::RecordLabels;
use chrono::{DateTime, Utc};
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

/// The worker's name in `/readyz`.
pub const NAME: &str = "writeback";
/// Rows claimed per pass; they are written concurrently (each connection's limiter
/// paces its own).
const BATCH: u32 = 32;
/// How often to look for due rows when the last pass found none.
const IDLE_POLL: Duration = Duration::from_secs(1);
/// Retries of recording an outcome while the store fails: 500 ms doubling up to 30 s.
const RECORD_RETRIES: Backoff =
    Backoff::equal(Duration::from_millis(500), Duration::from_secs(30)).attempts(12);
/// The longest vendor `Retry-After` honoured for a write-back.
const MAX_HINT: Duration = Duration::from_secs(24 * 3600);

/// Runs until `shutdown`. `connections` is read at each row, so a reload applies to the
/// next attempt.
pub async fn run(
    deps: SyncDeps,
    connections: Connections,
    mut health: WorkerHealth,
    shutdown: CancellationToken,
) {
    info!("write-back worker started");
    let mut released = false;
    loop {
        if !released {
            // A claim a stopped daemon left (SQLite) is due again; its next attempt
            // looks the note up before writing.
            match deps.store.release_writeback_claims(Utc::now()).await {
                Ok(rows) => {
                    released = true;
                    if rows > 0 {
                        info!(
                            rows,
                            "write-backs left in flight by the last run are due again"
                        );
                    }
                }
                Err(error) => warn!(%error, "releasing the write-backs the last run left failed"),
            }
        }
        let pause = match pass(&deps, &connections, &shutdown).await {
            Ok(worked) => {
                health.succeeded();
                if worked > 0 {
                    continue;
                }
                IDLE_POLL
            }
            Err(error) => health.failed(&error),
        };
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tokio::time::sleep(pause) => {}
        }
    }
    info!("write-back worker stopped");
}

/// Claims and carries out one batch of due write-backs; returns how many.
async fn pass(
    deps: &SyncDeps,
    connections: &Connections,
    shutdown: &CancellationToken,
) -> Result<usize, StoreError> {
    if shutdown.is_cancelled() {
        return Ok(0);
    }
    let jobs = deps.store.claim_writebacks(Utc::now(), BATCH).await?;
    deps.metrics.claimed("writebacks", jobs.len());
    let count = jobs.len();
    let outcomes = futures_util::future::join_all(
        jobs.into_iter()
            .map(|job| carry_out(deps, connections, job, shutdown)),
    )
    .await;
    for outcome in outcomes {
        outcome?;
    }
    Ok(count)
}

/// Writes one job and records what came of it.
async fn carry_out(
    deps: &SyncDeps,
    connections: &Connections,
    job: WritebackJob,
    shutdown: &CancellationToken,
) -> Result<(), StoreError> {
    let runtime = connections.get(&job.connection);
    let settings = runtime.as_ref().and_then(|r| r.config.writeback);
    let result = match (&runtime, settings) {
        (Some(runtime), Some(_)) => {
            let cx = runtime.context(deps, shutdown);
            runtime.connector.write_back(&cx, &job).await
        }
        _ => Err(WritebackError::Refused {
            reason: format!(
                "connection {} is no longer configured with write-back on",
                job.connection
            ),
        }),
    };
    let now = Utc::now();
    let settlement = settle(&job, result, settings, now);
    let outcome = match &settlement {
        WritebackSettlement::Done { .. } => "done",
        WritebackSettlement::Retry { .. } => "retried",
        WritebackSettlement::Failed { .. } => "failed",
    };
    match &settlement {
        WritebackSettlement::Done { remote_id } => {
            info!(connection = %job.connection, deal_id = job.deal_id, rule = %job.rule, remote_id = remote_id.as_deref().unwrap_or("-"), "follow-up recorded in the CRM");
        }
        WritebackSettlement::Retry { at, reason } => {
            warn!(connection = %job.connection, deal_id = job.deal_id, rule = %job.rule, attempt = job.attempts, %at, %reason, "write-back failed, retrying");
        }
        WritebackSettlement::Failed { reason } => {
            warn!(connection = %job.connection, deal_id = job.deal_id, rule = %job.rule, attempt = job.attempts, %reason, "write-back failed; given up (see `dealsync deals show`)");
        }
    }
    deps.metrics
        .writeback_attempts
        .get_or_create(&RecordLabels {
            connection: job.connection.clone(),
            outcome: outcome.to_owned(),
        })
        .inc();
    crate::retry::retry(
        RECORD_RETRIES,
        "recording a write-back",
        StoreError::is_transient,
        || deps.store.settle_writeback(job.id, settlement.clone(), now),
    )
    .await?;
    Ok(())
}

/// What an attempt's `result` makes of `job`: done, a retry after the backoff of its
/// connection's `settings`, or failed (refused, or its attempts spent).
fn settle(
    job: &WritebackJob,
    result: Result<Option<String>, WritebackError>,
    settings: Option<WritebackConfig>,
    now: DateTime<Utc>,
) -> WritebackSettlement {
    let settings = settings.unwrap_or(WritebackConfig {
        max_attempts: WritebackConfig::DEFAULT_MAX_ATTEMPTS,
        retry_delay: WritebackConfig::DEFAULT_RETRY_DELAY,
    });
    match result {
        Ok(remote_id) => WritebackSettlement::Done { remote_id },
        Err(WritebackError::Refused { reason }) => WritebackSettlement::Failed {
            reason: format!("refused: {reason}"),
        },
        Err(WritebackError::Retry { reason, .. }) if job.attempts >= settings.max_attempts => {
            WritebackSettlement::Failed {
                reason: format!("gave up after {} attempt(s): {reason}", job.attempts),
            }
        }
        Err(WritebackError::Retry { reason, after }) => {
            let backoff = Backoff::equal(settings.retry_delay, WritebackConfig::MAX_RETRY_DELAY);
            let delay = backoff.delay_honouring(job.attempts, after, MAX_HINT);
            WritebackSettlement::Retry {
                at: now + chrono::Duration::from_std(delay).unwrap_or(chrono::Duration::hours(1)),
                reason,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::StepNumber;

    fn job(attempts: u32) -> WritebackJob {
        WritebackJob {
            id: 1,
            outbox_id: 1,
            deal_id: 1,
            connection: "crm".into(),
            key: crate::store::writeback_key(1),
            external_id: "401".into(),
            deal_title: "ACME".into(),
            rule: "nudge".into(),
            step: StepNumber::from_index(0),
            recipient: "a@example.com".into(),
            subject: "Hi".into(),
            sent_at: Utc::now(),
            attempts,
        }
    }

    #[test]
    fn a_transient_failure_retries_with_backoff_until_the_attempts_are_spent() {
        let settings = Some(WritebackConfig {
            max_attempts: 3,
            retry_delay: Duration::from_secs(10),
        });
        let now = Utc::now();
        let retry = || {
            Err(WritebackError::Retry {
                reason: "500".into(),
                after: None,
            })
        };
        match settle(&job(1), retry(), settings, now) {
            WritebackSettlement::Retry { at, reason } => {
                assert_eq!(reason, "500");
                let wait = (at - now).num_milliseconds();
                assert!((5_000..=10_000).contains(&wait), "{wait} ms");
            }
            other => panic!("{other:?}"),
        }
        match settle(&job(2), retry(), settings, now) {
            WritebackSettlement::Retry { at, .. } => {
                let wait = (at - now).num_milliseconds();
                assert!((10_000..=20_000).contains(&wait), "doubles: {wait} ms");
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            settle(&job(3), retry(), settings, now),
            WritebackSettlement::Failed {
                reason: "gave up after 3 attempt(s): 500".into()
            }
        );
        let hinted = Err(WritebackError::Retry {
            reason: "429".into(),
            after: Some(Duration::from_secs(600)),
        });
        match settle(&job(1), hinted, settings, now) {
            WritebackSettlement::Retry { at, .. } => {
                assert!((at - now).num_seconds() >= 600, "Retry-After honoured");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_refused_request_fails_at_once_and_a_success_is_done() {
        let refused = Err(WritebackError::Refused {
            reason: "400 INVALID_FIELD".into(),
        });
        assert_eq!(
            settle(&job(1), refused, None, Utc::now()),
            WritebackSettlement::Failed {
                reason: "refused: 400 INVALID_FIELD".into()
            }
        );
        assert_eq!(
            settle(&job(2), Ok(Some("70001".into())), None, Utc::now()),
            WritebackSettlement::Done {
                remote_id: Some("70001".into())
            }
        );
    }
}
