//! The inbox worker: turns committed webhook deliveries into deals, asynchronously.
//!
//! Rows are taken oldest first from the inbox file, up to `BATCH` per pass. Each row
//! is planned by its connection's runtime (`ingest::ConnectionRuntime::plan_webhook`:
//! parsed again by the connector, carts and orders through the cart rules, other
//! records through the plain upsert, deletions by marking the deal deleted, id-only
//! payloads fetched through the pull connector first). This module decides when and in
//! which order rows are applied and what a failure costs them. A pass's changes
//! commit to the main database in one bounded transaction, then its rows are marked
//! processed in the inbox (one group-committed request). Intake never waits for either:
//! the inbox has its own file and writer.
//!
//! Invariants:
//! - Order per connection (and so per cart or deal): a failed row is retried with
//!   exponential backoff and equal jitter ([`ROW_RETRIES`]), and later rows of its
//!   connection wait for it; other connections go on.
//! - A failing database (busy, I/O error, disk full) is not the rows' fault: the pass is
//!   abandoned without counting an attempt against any row, the worker shows as
//!   degraded in `/readyz`, and it tries again after a backoff. It never stops on it.
//! - Retries are bounded: after [`MAX_ATTEMPTS`] the row is kept as `failed`, with its
//!   error, and its connection moves on.
//! - Applying a row twice (a crash between applying and marking it processed) is
//!   harmless: upserts and stage moves are idempotent.
//! - Pending rows left by a previous run are picked up at start.

use crate::health::WorkerHealth;
use crate::ingest::{Connections, PlanError, SyncDeps};
use crate::retry::Backoff;
use crate::store::{CartRules, DealChange, InboxRow, StoreError};
use chrono::Utc;
use std::collections::HashSet;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

/// Attempts before a row is given up on.
pub const MAX_ATTEMPTS: u32 = 10;
/// Rows read per pass.
const BATCH: u32 = 256;
/// How often to look for due rows when nothing wakes the worker (retries coming due).
const IDLE_POLL: Duration = Duration::from_secs(1);
/// The least time between a pass that found nothing due, while rows wait (for their
/// retry, or applied by another replica), and the next pass.
const EMPTY_PASS_REST: Duration = Duration::from_millis(50);
/// How often processed rows past their retention are pruned.
const PRUNE_EVERY: Duration = Duration::from_secs(3600);

/// Why a row could not be applied. [`ProcessError::is_permanent`] says whether another
/// attempt can help.
#[derive(Debug, thiserror::Error)]
enum ProcessError {
    /// Writing the row's changes failed: worth another attempt later.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The row's connection was removed from the configuration.
    #[error("the connection is no longer configured")]
    ConnectionGone,
    /// Planning the row failed: a fetch, or a body or record that cannot be used.
    #[error(transparent)]
    Plan(#[from] PlanError),
}

impl ProcessError {
    /// Whether no later attempt can work (the connection is gone, the body or the
    /// fetched record is unusable); everything else is worth retrying.
    fn is_permanent(&self) -> bool {
        match self {
            ProcessError::Store(_) => false,
            ProcessError::ConnectionGone => true,
            ProcessError::Plan(error) => error.is_permanent(),
        }
    }
}

/// What the worker reads and writes: the inbox and the deals (`deps.store`), and the
/// connections in force, read at each row so a reload applies to the next.
struct Worker {
    deps: SyncDeps,
    connections: Connections,
}

/// Retries of a row that could not be applied: 1 s doubling up to 5 min, equal jitter
/// (a retry never comes at once), [`MAX_ATTEMPTS`] in all.
pub const ROW_RETRIES: Backoff =
    Backoff::equal(Duration::from_secs(1), Duration::from_secs(300)).attempts(MAX_ATTEMPTS);

/// Runs until `shutdown`: processes due rows, sleeps until new ones are committed. A
/// pass the store fails (busy, I/O error, disk full) marks the worker degraded in
/// `/readyz` and is tried again after a backoff; no row pays an attempt for it.
pub async fn run(
    deps: SyncDeps,
    connections: Connections,
    mut health: WorkerHealth,
    shutdown: CancellationToken,
) {
    let worker = Worker { deps, connections };
    let state = &worker;
    let committed = state.deps.store.inbox_committed();
    let mut last_prune: Option<std::time::Instant> = None;
    info!("webhook inbox worker started");
    loop {
        if last_prune.is_none_or(|at| at.elapsed() >= PRUNE_EVERY) {
            match state.deps.store.prune_webhooks(Utc::now()).await {
                Ok(pruned) if pruned > 0 => info!(pruned, "pruned old webhook inbox rows"),
                Ok(_) => {}
                Err(error) => warn!(%error, "pruning the webhook inbox failed"),
            }
            last_prune = Some(std::time::Instant::now());
        }
        // Registered before the pass, so that a delivery committed while it runs (or
        // during the rest below) wakes the next one.
        let notified = committed.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        // After a failed pass only the backoff (or shutdown) ends the pause: new
        // deliveries must not hurry a database that just failed.
        let (pause, failed) = match process_due(state, &shutdown).await {
            Ok(worked) => {
                health.succeeded();
                if worked > 0 {
                    continue;
                }
                (IDLE_POLL, false)
            }
            Err(error) => (health.failed(&error), true),
        };
        if !failed && state.deps.store.inbox_pending() > 0 {
            // A pass that found nothing due while rows wait rests before the next:
            // with replicas, rows another replica is applying (a connection's rows go
            // to one replica at a time) would otherwise wake this worker for an empty
            // claim at every delivery any replica commits.
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep(EMPTY_PASS_REST) => {}
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = &mut notified, if !failed => {}
            _ = tokio::time::sleep(pause) => {}
        }
    }
    info!("webhook inbox worker stopped");
}

/// Processes one pass of due rows; returns how many were handled.
///
/// Rows are planned one by one in order (parsing, and fetching where a payload carries
/// only an id); the planned changes of the whole pass then commit in one transaction.
/// Should that fail, rows are committed one by one, so one bad row cannot block others.
///
/// While the pass works, the rows it claimed stay its own (`Store::keep_webhook_claims`):
/// a pass slowed by refetches under a vendor's rate limit does not lose them to
/// another replica.
async fn process_due(state: &Worker, shutdown: &CancellationToken) -> Result<usize, StoreError> {
    tokio::select! {
        result = process_due_rows(state, shutdown) => result,
        never = state.deps.store.keep_webhook_claims() => match never {},
    }
}

async fn process_due_rows(
    state: &Worker,
    shutdown: &CancellationToken,
) -> Result<usize, StoreError> {
    let rows = state.deps.store.due_webhooks(Utc::now(), BATCH).await?;
    state.deps.metrics.claimed("inbox", rows.len());
    let mut held: HashSet<String> = HashSet::new();
    let mut planned: Vec<(InboxRow, Vec<DealChange>)> = Vec::new();
    let mut handled = 0;
    for row in rows {
        if shutdown.is_cancelled() {
            break;
        }
        // A row of this connection failed in this pass: keep its order.
        if held.contains(&row.connection) {
            continue;
        }
        handled += 1;
        // Parsing is CPU work on an executor thread: let request handlers in between.
        tokio::task::yield_now().await;
        match plan(state, &row, shutdown).await {
            Ok(ops) => planned.push((row, ops)),
            Err(error) => {
                if give_up_or_retry(state, &row, error).await? {
                    held.insert(row.connection.clone());
                }
            }
        }
    }
    if planned.is_empty() {
        return Ok(handled);
    }
    let batch: Vec<(i64, Vec<DealChange>)> = planned
        .iter()
        .map(|(row, ops)| (row.id, ops.clone()))
        .collect();
    let rules = CartRules::default();
    if let Err(error) = state
        .deps
        .store
        .apply_webhook_batch(batch, rules, Utc::now())
        .await
    {
        // The database failed, not the rows: none of them pays an attempt, and the
        // whole pass is tried again after the worker's backoff.
        if error.is_transient() {
            return Err(error);
        }
        warn!(%error, rows = planned.len(), "committing a webhook batch failed; applying its rows one by one");
        let mut failed: HashSet<String> = HashSet::new();
        for (row, ops) in planned {
            tokio::task::yield_now().await;
            if failed.contains(&row.connection) {
                continue;
            }
            let single = vec![(row.id, ops)];
            match state
                .deps
                .store
                .apply_webhook_batch(single, rules, Utc::now())
                .await
            {
                Ok(_) => {}
                Err(error) if error.is_transient() => return Err(error),
                Err(error) => {
                    if give_up_or_retry(state, &row, ProcessError::from(error)).await? {
                        failed.insert(row.connection.clone());
                    }
                }
            }
        }
    }
    Ok(handled)
}

/// Records a failed row: kept as failed when it never can work or has been tried
/// [`MAX_ATTEMPTS`] times, else scheduled again. Returns true when the row will be
/// retried, so later rows of its connection must wait.
async fn give_up_or_retry(
    state: &Worker,
    row: &InboxRow,
    error: ProcessError,
) -> Result<bool, StoreError> {
    let reason = crate::telemetry::error_chain(&error);
    let permanent = error.is_permanent();
    if permanent || !ROW_RETRIES.may_retry(row.attempts + 1) {
        if permanent {
            error!(connection = %row.connection, delivery_id = %row.delivery_id, reason, "webhook could not be applied; kept as failed");
        } else {
            error!(connection = %row.connection, delivery_id = %row.delivery_id, attempts = row.attempts + 1, reason, "webhook failed too often; kept as failed");
        }
        state
            .deps
            .store
            .webhook_failed(row.id, &reason, Utc::now())
            .await?;
        Ok(false)
    } else {
        let delay = ROW_RETRIES.delay(row.attempts + 1);
        warn!(connection = %row.connection, delivery_id = %row.delivery_id, attempt = row.attempts + 1, retry_in_ms = delay.as_millis() as u64, reason, "webhook processing failed; will retry");
        let next = Utc::now() + chrono::Duration::from_std(delay).unwrap_or_default();
        state
            .deps
            .store
            .webhook_retry(row.id, &reason, next)
            .await?;
        Ok(true)
    }
}

/// Plans one row through its connection's runtime; writes nothing.
async fn plan(
    state: &Worker,
    row: &InboxRow,
    shutdown: &CancellationToken,
) -> Result<Vec<DealChange>, ProcessError> {
    let runtime = state
        .connections
        .get(&row.connection)
        .ok_or(ProcessError::ConnectionGone)?;
    let cx = runtime.context(&state.deps, shutdown);
    Ok(runtime.plan_webhook(row, &cx).await?)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A pass hands back how many rows it handled, which decides whether the worker
    /// goes on at once (a backlog) or waits: here every row of a removed connection,
    /// each kept as failed.
    #[tokio::test]
    async fn a_pass_counts_every_row_it_handled() {
        let (_dir, store) = crate::store::tests::temp_store();
        for id in ["a", "b", "c"] {
            let event = crate::store::tests::webhook("gone", id);
            store.enqueue_webhook(event).await.unwrap();
        }
        let worker = Worker {
            deps: SyncDeps {
                store: store.clone(),
                metrics: std::sync::Arc::new(crate::telemetry::Metrics::new()),
                attention: None,
            },
            connections: Connections::new(vec![]),
        };
        let shutdown = CancellationToken::new();
        assert_eq!(process_due(&worker, &shutdown).await.unwrap(), 3);
        assert!(store.due_webhooks(Utc::now(), 10).await.unwrap().is_empty());
        assert_eq!(process_due(&worker, &shutdown).await.unwrap(), 0);
    }

    #[test]
    fn row_retries_grow_and_stay_bounded() {
        for attempts in 0..40 {
            let delay = ROW_RETRIES.delay(attempts + 1);
            assert!(delay <= Duration::from_secs(300), "{attempts}: {delay:?}");
            assert!(delay >= Duration::from_millis(500), "{attempts}: {delay:?}");
        }
        assert!(ROW_RETRIES.delay(1) <= Duration::from_secs(1));
        assert!(ROW_RETRIES.may_retry(MAX_ATTEMPTS - 1));
        assert!(!ROW_RETRIES.may_retry(MAX_ATTEMPTS));
    }
}
