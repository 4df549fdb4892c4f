//! The inbox worker: turns committed webhook deliveries into deals, asynchronously.
//!
//! Rows are taken oldest first from the inbox file, up to `BATCH` per pass. Each row
//! is parsed again by its connection's connector (the HTTP layer already checked that it
//! parses) and its actions are planned: carts and orders through the cart rules, other
//! records through the plain upsert, deletions by marking the deal deleted, and id-only
//! payloads by fetching the record through the pull connector first. A pass's changes
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

use crate::app::AppState;
use crate::connectors::{ConnectorError, SyncContext, WebhookAction, WebhookEvent};
use crate::domain::{ChangeCause, ConnectionName, SourceDeal, check_depth};
use crate::retry::Backoff;
#[cfg(test)]
use crate::store::Store;
use crate::store::{CartRules, DealChange, InboxRow, StoreError};
use crate::ingest::ConnectionRuntime;
use chrono::Utc;
use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

/// Attempts before a row is given up on.
pub const MAX_ATTEMPTS: u32 = 10;
/// Rows read per pass.
const BATCH: u32 = 256;
/// How often to look for due rows when nothing wakes the worker (retries coming due).
const IDLE_POLL: Duration = Duration::from_secs(1);
/// How often processed rows past their retention are pruned.
const PRUNE_EVERY: Duration = Duration::from_secs(3600);

/// Why a row could not be applied. [`ProcessError::is_permanent`] says whether another
/// attempt can help.
#[derive(Debug, thiserror::Error)]
enum ProcessError {
    /// Writing the row's changes failed: worth another attempt later.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Fetching an id-only payload's record failed: retried unless the vendor's answer
    /// was unusable.
    #[error("fetching {external_id}: {source}")]
    Fetch {
        external_id: String,
        #[source]
        source: Box<ConnectorError>,
    },
    /// The row's connection was removed from the configuration.
    #[error("the connection is no longer configured")]
    ConnectionGone,
    /// The body no longer parses as the connector's payload.
    #[error("malformed payload: {reason}")]
    Malformed { reason: String },
    /// A fetched record nests too deep to store.
    #[error("record {external_id}: {source}")]
    TooDeep {
        external_id: crate::domain::ExternalId,
        #[source]
        source: crate::domain::TooDeep,
    },
}

impl ProcessError {
    /// Whether no later attempt can work (the connection is gone, the body or the
    /// fetched record is unusable); everything else is worth retrying.
    fn is_permanent(&self) -> bool {
        match self {
            ProcessError::Store(_) => false,
            ProcessError::Fetch { source, .. } => {
                matches!(**source, ConnectorError::BadResponse { .. })
            }
            ProcessError::ConnectionGone
            | ProcessError::Malformed { .. }
            | ProcessError::TooDeep { .. } => true,
        }
    }
}

/// Retries of a row that could not be applied: 1 s doubling up to 5 min, equal jitter
/// (a retry never comes at once), [`MAX_ATTEMPTS`] in all.
pub const ROW_RETRIES: Backoff =
    Backoff::equal(Duration::from_secs(1), Duration::from_secs(300)).attempts(MAX_ATTEMPTS);

/// Runs until `shutdown`: processes due rows, sleeps until new ones are committed. A
/// pass the store fails (busy, I/O error, disk full) marks the worker degraded in
/// `/readyz` and is tried again after a backoff; no row pays an attempt for it.
pub async fn run(state: Arc<AppState>, shutdown: CancellationToken) {
    let committed = state.store.inbox_committed();
    let mut health = state.readiness.worker("webhooks");
    let mut last_prune: Option<std::time::Instant> = None;
    info!("webhook inbox worker started");
    loop {
        if last_prune.is_none_or(|at| at.elapsed() >= PRUNE_EVERY) {
            match state.store.prune_webhooks(Utc::now()).await {
                Ok(pruned) if pruned > 0 => info!(pruned, "pruned old webhook inbox rows"),
                Ok(_) => {}
                Err(error) => warn!(%error, "pruning the webhook inbox failed"),
            }
            last_prune = Some(std::time::Instant::now());
        }
        // After a failed pass only the backoff (or shutdown) ends the pause: new
        // deliveries must not hurry a database that just failed.
        let (pause, failed) = match process_due(&state, &shutdown).await {
            Ok(worked) => {
                health.succeeded();
                if worked > 0 {
                    continue;
                }
                (IDLE_POLL, false)
            }
            Err(error) => (health.failed(&error), true),
        };
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = committed.notified(), if !failed => {}
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
async fn process_due(state: &AppState, shutdown: &CancellationToken) -> Result<usize, StoreError> {
    let rows = state.store.due_webhooks(Utc::now(), BATCH).await?;
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
    state: &AppState,
    row: &InboxRow,
    error: ProcessError,
) -> Result<bool, StoreError> {
    let reason = crate::telemetry::error_chain(&error);
    if error.is_permanent() {
        error!(connection = %row.connection, delivery_id = %row.delivery_id, reason, "webhook could not be applied; kept as failed");
        state
            .store
            .webhook_failed(row.id, &reason, Utc::now())
            .await?;
        Ok(false)
    } else if !ROW_RETRIES.may_retry(row.attempts + 1) {
        error!(connection = %row.connection, delivery_id = %row.delivery_id, attempts = row.attempts + 1, reason, "webhook failed too often; kept as failed");
        state
            .store
            .webhook_failed(row.id, &reason, Utc::now())
            .await?;
        Ok(false)
    } else {
        let delay = ROW_RETRIES.delay(row.attempts + 1);
        warn!(connection = %row.connection, delivery_id = %row.delivery_id, attempt = row.attempts + 1, retry_in_ms = delay.as_millis() as u64, reason, "webhook processing failed; will retry");
        let next = Utc::now() + chrono::Duration::from_std(delay).unwrap_or_default();
        state.store.webhook_retry(row.id, &reason, next).await?;
        Ok(true)
    }
}

async fn plan(
    state: &AppState,
    row: &InboxRow,
    shutdown: &CancellationToken,
) -> Result<Vec<DealChange>, ProcessError> {
    let runtime = state
        .connection(&row.connection)
        .ok_or(ProcessError::ConnectionGone)?;
    let cx = runtime.context(&state.sync_deps(), shutdown);
    plan_row(&runtime, row, &cx).await
}

/// Applies one inbox row on its own (parse, fetch, write, mark processed).
#[cfg(test)]
async fn apply_row(
    store: &Store,
    runtime: &ConnectionRuntime,
    row: &InboxRow,
    cx: &SyncContext,
) -> Result<(), ProcessError> {
    let ops = plan_row(runtime, row, cx).await?;
    store
        .apply_webhook_batch(vec![(row.id, ops)], CartRules::default(), Utc::now())
        .await?;
    Ok(())
}

/// Turns one inbox row into the changes to write, through its connection's connector:
/// carts and orders go through the cart rules, other records are upserted, deletions
/// mark the deal deleted, id-only payloads are fetched first. Writes nothing.
async fn plan_row(
    runtime: &ConnectionRuntime,
    row: &InboxRow,
    cx: &SyncContext,
) -> Result<Vec<DealChange>, ProcessError> {
    let event = WebhookEvent {
        connection: ConnectionName::new(row.connection.clone()),
        delivery_id: row.delivery_id.clone(),
        topic: row.topic.clone(),
        headers: row.headers.clone(),
        body: row.body.clone(),
        received_at: row.received_at,
    };
    let actions = runtime
        .connector
        .parse_webhook(&event)
        .map_err(|bad| ProcessError::Malformed { reason: bad.reason })?;
    let mut ops = Vec::new();
    for action in actions {
        match action {
            WebhookAction::Upsert(deal) => ops.push(record(runtime, *deal)?),
            WebhookAction::Delete { external_id } => ops.push(deletion(runtime, external_id)),
            WebhookAction::Refetch { external_id } => {
                match runtime.connector.fetch_one(cx, &external_id).await {
                    Ok(Some(deal)) => ops.push(record(runtime, deal)?),
                    Ok(None) => ops.push(deletion(runtime, external_id)),
                    Err(source) => {
                        return Err(ProcessError::Fetch {
                            external_id,
                            source: Box::new(source),
                        });
                    }
                }
            }
        }
    }
    debug!(connection = runtime.name(), delivery_id = %row.delivery_id, ops = ops.len(), "webhook planned");
    Ok(ops)
}

/// A record to write: carts (records with cart keys) through the cart rules. A record
/// nested too deep (a fetched one: bodies are checked at intake) is never stored.
fn record(runtime: &ConnectionRuntime, deal: SourceDeal) -> Result<DealChange, ProcessError> {
    if let Err(source) = check_depth(deal.raw.as_str().as_bytes()) {
        return Err(ProcessError::TooDeep {
            external_id: deal.external_id,
            source,
        });
    }
    let is_cart = !deal.cart_keys.is_empty();
    let upsert = runtime
        .upserts(vec![deal], ChangeCause::Webhook)
        .pop()
        .expect("one record in, one upsert out");
    Ok(if is_cart {
        DealChange::Cart(upsert)
    } else {
        DealChange::Upsert(upsert)
    })
}

fn deletion(runtime: &ConnectionRuntime, external_id: String) -> DealChange {
    DealChange::Delete {
        connection: runtime.name().to_owned(),
        external_id,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::connectors::{BadRecord, Connector, Page};
    use crate::domain::DealStatus;
    use crate::store::NewWebhook;
    use async_trait::async_trait;
    use std::sync::Mutex;

    /// A CRM-like connector whose webhooks carry only ids: `{"refetch": "7"}`,
    /// `{"delete": "7"}`; `fetch_one` answers from a map and fails while `down`.
    struct IdOnlyCrm {
        records: Mutex<Vec<SourceDeal>>,
        down: Mutex<bool>,
    }

    #[async_trait]
    impl Connector for IdOnlyCrm {
        fn kind(&self) -> &str {
            "crm-test"
        }
        fn default_pipeline(&self) -> Option<&str> {
            Some("sales")
        }
        async fn fetch_page(
            &self,
            _cx: &SyncContext,
            _cursor: Option<&serde_json::Value>,
        ) -> Result<Page, ConnectorError> {
            Err(ConnectorError::NotConfigured { what: "not used" })
        }
        fn parse_webhook(&self, event: &WebhookEvent) -> Result<Vec<WebhookAction>, BadRecord> {
            let body: serde_json::Value = serde_json::from_slice(&event.body).unwrap();
            Ok(match (body.get("refetch"), body.get("delete")) {
                (Some(id), _) => vec![WebhookAction::Refetch {
                    external_id: id.as_str().unwrap().to_owned(),
                }],
                (_, Some(id)) => vec![WebhookAction::Delete {
                    external_id: id.as_str().unwrap().to_owned(),
                }],
                _ => Vec::new(),
            })
        }
        async fn fetch_one(
            &self,
            _cx: &SyncContext,
            external_id: &str,
        ) -> Result<Option<SourceDeal>, ConnectorError> {
            if *self.down.lock().unwrap() {
                return Err(ConnectorError::Transient {
                    vendor: "crm-test".into(),
                    reason: "503".into(),
                    retry_after: None,
                });
            }
            Ok(self
                .records
                .lock()
                .unwrap()
                .iter()
                .find(|d| d.external_id.as_str() == external_id)
                .cloned())
        }
    }

    async fn row(store: &Store, id: &str, body: serde_json::Value) -> InboxRow {
        store
            .enqueue_webhook(NewWebhook {
                connection: "crm".into(),
                delivery_id: id.into(),
                topic: None,
                headers: Vec::new(),
                body_sha256: None,
                body: serde_json::to_vec(&body).unwrap().into(),
                received_at: Utc::now(),
            })
            .await
            .unwrap();
        store
            .due_webhooks(Utc::now(), 100)
            .await
            .unwrap()
            .into_iter()
            .find(|r| r.delivery_id == id)
            .unwrap()
    }

    #[tokio::test]
    async fn an_id_only_crm_webhook_is_fetched_then_stored_and_a_deletion_marks_the_deal_deleted() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("db.sqlite")).unwrap();
        let config = crate::config::parse(
            std::path::Path::new("t.toml"),
            "[connections.crm]\nconnector = \"demo\"\n[connections.crm.stage_map.default]\nproposal = \"proposal\"\n",
            &crate::config::interpolate::ProcessEnv,
        )
        .unwrap();
        let mut deal = SourceDeal::new("7", "Big deal", "default", "proposal");
        deal.updated_at = Some(Utc::now());
        let connector = Arc::new(IdOnlyCrm {
            records: Mutex::new(vec![deal]),
            down: Mutex::new(true),
        });
        let runtime = ConnectionRuntime::new(
            config.connections[0].clone(),
            connector.clone(),
            config.pipelines.clone(),
        );
        let cx = SyncContext::new(ConnectionName::new("crm"), CancellationToken::new());

        // While the CRM is down, the refetch is a retryable failure and nothing is stored.
        let refetch = row(&store, "e-1", serde_json::json!({"refetch": "7"})).await;
        let failed = apply_row(&store, &runtime, &refetch, &cx).await;
        assert!(
            matches!(&failed, Err(error) if !error.is_permanent()),
            "{failed:?}"
        );
        assert!(
            store
                .deal_by_external_id("crm", "7")
                .await
                .unwrap()
                .is_none()
        );

        *connector.down.lock().unwrap() = false;
        apply_row(&store, &runtime, &refetch, &cx).await.unwrap();
        let stored = store
            .deal_by_external_id("crm", "7")
            .await
            .unwrap()
            .unwrap();
        assert_eq!(stored.stage.as_str(), "proposal");
        let history = store.history(stored.id).await.unwrap();
        assert_eq!(history[0].cause, ChangeCause::Webhook);

        let delete = row(&store, "e-2", serde_json::json!({"delete": "7"})).await;
        apply_row(&store, &runtime, &delete, &cx).await.unwrap();
        let deleted = store
            .deal_by_external_id("crm", "7")
            .await
            .unwrap()
            .unwrap();
        assert_eq!(deleted.status, DealStatus::Deleted);
        assert!(deleted.deleted_at.is_some());
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
