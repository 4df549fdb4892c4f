//! The follow-up worker: enrolls deals into rules and sends what is due.
//!
//! Data flow: stage history (change feed, by id) → enrollment (outbox rows, one per
//! step, with due times) → due query on the partial index of pending rows → claim
//! (re-check in one transaction) → render → SMTP or `.eml` → mark sent (and move the
//! cart) in one transaction.
//!
//! The loop sleeps until the earlier of the next due row and the next enrollment pass,
//! and wakes at once when a stage change commits through the store (new work); it
//! never scans the deals table per tick. `enroll_interval` is only the fallback for
//! changes written by another process (a CLI `sync` beside the daemon). At start it enrolls, from the
//! `(pipeline, stage, stage_entered_at)` index, deals that entered a trigger stage
//! recently enough for a step to be still sendable, then follows the history feed.
//! On shutdown it stops claiming and lets the sends in flight finish.
//!
//! One idea per file: this one holds the loop, its passes and what every send shares
//! (recording an outcome, the backoff, the sender's name); `enrollment` turns stage
//! entries into outbox rows, `sending` claims and sends one due row, `digests`
//! assembles and sends the daily digests.

use super::digest::DigestRule;
use super::mailer::{MailError, Mailer, Outgoing};
use super::rules::Rule;
use super::templates::Templates;
use super::{FollowupError, SourceReader};
use crate::config::Config;
use crate::domain::Deal;
use crate::health::WorkerHealth;
use crate::retry::Backoff;
use crate::store::{OutboxRow, Store, StoreError};
use crate::telemetry::{FollowupLabels, KindLabels, Metrics};
use chrono::Utc;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

mod digests;
mod enrollment;
mod sending;

pub use digests::digest_watch;
pub use enrollment::{enrollment_gate, enrollment_window, plan_enrollment};
pub use sending::{claim_query, compose, idempotency_key, send_policy};

/// Rows fetched per due query.
const BATCH: u32 = 256;
/// History rows read per enrollment page.
const FEED_PAGE: u32 = 2000;

/// Everything the worker needs, shared by its send tasks.
pub struct Worker {
    store: Store,
    config: Arc<Config>,
    rules: HashMap<String, Arc<Rule>>,
    digests: HashMap<String, Arc<DigestRule>>,
    templates: Templates,
    mailer: Mailer,
    metrics: Arc<Metrics>,
    /// Reads a deal again from its source before a marketing email to its contact.
    source: Option<Arc<dyn SourceReader>>,
    shutdown: CancellationToken,
    /// Where delivery failures are reported for `/readyz` (and cleared by a success).
    attention: Option<DeliveryAttention>,
}

/// Everything the follow-up worker runs on, handed over by whoever starts it (`App`
/// builds one per start and reload): the worker reaches nothing else.
pub struct Deps {
    pub store: Store,
    pub config: Arc<Config>,
    pub metrics: Arc<Metrics>,
    /// Reads a deal again from its source before a marketing email to its contact.
    pub source: Option<Arc<dyn SourceReader>>,
    /// Where delivery failures are reported for `/readyz` (and cleared by a success).
    pub attention: Option<DeliveryAttention>,
    /// The worker's standing in `/readyz`.
    pub health: WorkerHealth,
    /// Whether this replica enrolls and assembles digests now (leader duties); every
    /// replica sends what is due, each row claimed by one.
    pub leading: crate::replica::Leadership,
}

/// Names the last delivery failure for `/readyz` (`Some`), or clears it (`None`).
pub type DeliveryAttention = Arc<dyn Fn(Option<String>) + Send + Sync>;

impl std::fmt::Debug for Worker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Worker")
            .field("rules", &self.rules.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

/// The follow-up worker's name in `/readyz` (it sends the daily digests too).
pub const NAME: &str = "followups";

/// Retries of writing what a send did (sent, retry, failed, uncertain) while the store
/// fails: 500 ms doubling up to 30 s, 12 attempts in all (a few minutes).
const RECORD_RETRIES: Backoff =
    Backoff::equal(Duration::from_millis(500), Duration::from_secs(30)).attempts(12);

/// Runs the worker until `shutdown`. A pass the store fails marks the worker degraded
/// in `/readyz` (`deps.health`) and is tried again after a backoff; the worker never
/// stops on it. One that cannot start (its mailer) is marked degraded with the reason.
/// `deps.source` reads deals again from their sources before marketing emails to their
/// contacts.
pub async fn run(deps: Deps, shutdown: CancellationToken) {
    let Deps {
        store,
        config,
        metrics,
        source,
        attention,
        health,
        leading,
    } = deps;
    if config.followups.is_empty() && config.digests.is_empty() {
        debug!("no follow-up rules configured; the follow-up worker is idle");
        health.recovered();
        return;
    }
    let worker = match Worker::new(store, config, metrics) {
        Ok(mut worker) => {
            worker.source = source;
            worker.shutdown = shutdown.clone();
            worker.attention = attention;
            Arc::new(worker)
        }
        Err(error) => {
            error!(%error, "the follow-up worker cannot start");
            health.degraded(format!("cannot start: {error}"));
            return;
        }
    };
    worker.run_loop(shutdown, health, leading).await;
}

/// Where the worker stands between passes.
struct Progress {
    /// The last stage-history id enrolled from; `None` until read at start.
    feed: Option<i64>,
    /// Whether the start-up enrollment from the stage index is done.
    indexed: bool,
    next_enroll: tokio::time::Instant,
    /// The local day each digest rule was last assembled for, in this process; the
    /// store's `digest_runs` is what makes assembling once per day hold across restarts.
    assembled: HashMap<String, chrono::NaiveDate>,
}

impl Worker {
    pub fn new(
        store: Store,
        config: Arc<Config>,
        metrics: Arc<Metrics>,
    ) -> Result<Worker, FollowupError> {
        let templates = Templates::for_config(&config)?;
        let mailer = Mailer::new(&config.email)?;
        let rules = config
            .followups
            .iter()
            .map(|rule| (rule.name.clone(), Arc::new(rule.clone())))
            .collect();
        let digests = config
            .digests
            .iter()
            .map(|rule| (rule.name.clone(), Arc::new(rule.clone())))
            .collect();
        Ok(Worker {
            store,
            config,
            rules,
            digests,
            templates,
            mailer,
            metrics,
            source: None,
            shutdown: CancellationToken::new(),
            attention: None,
        })
    }

    /// Counts a failed delivery by kind and names it on `/readyz`; a delivery that
    /// went through clears that entry.
    fn note_delivery(&self, sent: &Result<(), MailError>, rule: &str) {
        let note = match sent {
            Ok(()) => None,
            Err(error) => {
                let kind = match error {
                    MailError::Transient(_) => "transient",
                    MailError::Permanent { .. } => "permanent",
                    MailError::Unknown(_) => "unknown",
                    MailError::Build(_) | MailError::Setup(_) => "other",
                };
                self.metrics
                    .email_failures
                    .get_or_create(&KindLabels {
                        kind: kind.to_owned(),
                    })
                    .inc();
                Some(format!(
                    "the last email (rule {rule}) was not delivered at {}: {error}; see `dealsync outbox list --state failed` and the email.url server",
                    Utc::now().format("%Y-%m-%d %H:%M:%S UTC")
                ))
            }
        };
        if let Some(attention) = &self.attention {
            attention(note);
        }
    }

    async fn run_loop(
        self: Arc<Self>,
        shutdown: CancellationToken,
        mut health: WorkerHealth,
        mut leading: crate::replica::Leadership,
    ) {
        let email = &self.config.email;
        info!(
            rules = self.rules.len(),
            digests = self.digests.len(),
            dry_run = email.dry_run,
            "follow-up worker started"
        );
        let mut changes = self.store.stage_changes();
        let mut progress = Progress {
            feed: None,
            indexed: false,
            next_enroll: tokio::time::Instant::now() + email.enroll_interval,
            assembled: HashMap::new(),
        };
        let limit = Arc::new(Semaphore::new(email.pool_size as usize));
        loop {
            if shutdown.is_cancelled() {
                break;
            }
            let lead = leading.leading();
            let (wake, failed) = match self.pass(&mut progress, lead, &limit, &shutdown).await {
                Ok(Some(wake)) => {
                    health.succeeded();
                    (wake, false)
                }
                // A full batch was due: the next one at once.
                Ok(None) => {
                    health.succeeded();
                    continue;
                }
                // Stopped (a reload or shutdown) mid-pass: the mark is the successor's.
                Err(_) if shutdown.is_cancelled() => break,
                Err(error) => (tokio::time::Instant::now() + health.failed(&error), true),
            };
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep_until(wake) => {}
                // New work: a stage change committed through this store may enroll a
                // deal whose first step is due now. `enroll_interval` stays the
                // fallback for changes written by another process. After a failed
                // pass only the backoff ends the pause.
                changed = changes.changed(), if !failed => {
                    if changed.is_ok() {
                        changes.borrow_and_update();
                        progress.next_enroll = tokio::time::Instant::now();
                    }
                }
                // Taken or lost the leader duties: a new leader enrolls from the stage
                // index again (what the last leader may have left) before the feed.
                () = leading.changed() => {
                    progress.feed = None;
                    progress.indexed = false;
                    progress.next_enroll = tokio::time::Instant::now();
                }
            }
        }
        info!("follow-up worker stopped");
    }

    /// One pass: while `leading`, the start-up enrollment while not done, enrollment
    /// from the history feed when due and digest assembly; then every due digest and row (claimed, sent and settled before the
    /// pass ends). Returns when to wake for the next pass, `None` for at once. A store
    /// error ends the pass after the sends in flight have settled; what was done stays
    /// done, and the next pass goes on from there.
    async fn pass(
        self: &Arc<Self>,
        progress: &mut Progress,
        leading: bool,
        limit: &Arc<Semaphore>,
        shutdown: &CancellationToken,
    ) -> Result<Option<tokio::time::Instant>, StoreError> {
        // A failed leader part (enrollment, digest assembly) does not hold back what
        // is due: its error is kept and returned once the sends have settled.
        let mut failure: Option<StoreError> = None;
        if leading && let Err(error) = self.lead(progress).await {
            failure = Some(error);
        }
        let digests = self.store.digests_due(Utc::now(), BATCH).await?;
        self.metrics.claimed("digests", digests.len());
        // From here sends may be in flight: an error is kept until they have settled.
        let mut sends: JoinSet<Result<(), StoreError>> = JoinSet::new();
        for (id, rule) in digests {
            let permit = tokio::select! {
                permit = limit.clone().acquire_owned() => permit.expect("the semaphore is never closed"),
                _ = shutdown.cancelled() => break,
            };
            let worker = self.clone();
            sends.spawn(async move {
                let result = worker.process_digest(id, &rule).await;
                if let Err(error) = &result {
                    warn!(rule = %rule, digest_id = id, %error, "digest not processed; it stays due");
                }
                drop(permit);
                result
            });
        }
        let due = match self.store.outbox_due(Utc::now(), BATCH).await {
            Ok(due) => {
                self.metrics.claimed("outbox", due.len());
                due
            }
            Err(error) => {
                failure.get_or_insert(error);
                Vec::new()
            }
        };
        let full = due.len() as u32 == BATCH;
        for (id, rule) in due {
            let permit = tokio::select! {
                permit = limit.clone().acquire_owned() => permit.expect("the semaphore is never closed"),
                _ = shutdown.cancelled() => break,
            };
            let worker = self.clone();
            sends.spawn(async move {
                let result = worker.process(id, &rule).await;
                if let Err(error) = &result {
                    warn!(rule = %rule, outbox_id = id, %error, "follow-up not processed; it stays due");
                }
                drop(permit);
                result
            });
            // Reap finished sends so the set stays small.
            while let Some(joined) = sends.try_join_next() {
                settle(joined, &mut failure);
            }
        }
        // Claimed rows must settle before the due query runs again.
        while let Some(joined) = sends.join_next().await {
            settle(joined, &mut failure);
        }
        if let Some(error) = failure {
            return Err(error);
        }
        if full {
            return Ok(None);
        }
        let now = Utc::now();
        let next_due = [
            self.store.outbox_next_due().await?,
            self.store.digest_next_due().await?,
        ]
        .into_iter()
        .chain(self.digests.values().map(|rule| Some(rule.next_slot(now))))
        .flatten()
        .min();
        Ok(Some(match next_due {
            Some(at) => {
                let wait = (at - Utc::now()).to_std().unwrap_or(Duration::ZERO);
                (tokio::time::Instant::now() + wait).min(progress.next_enroll)
            }
            None => progress.next_enroll,
        }))
    }

    /// The leader duties of a pass: enrollment (from the stage index once, then from
    /// the history feed when due) and digest assembly. One replica at a time does them;
    /// both are idempotent, so a leader that takes over late repeats nothing.
    async fn lead(&self, progress: &mut Progress) -> Result<(), StoreError> {
        // Read the feed position first, then enroll from the index: an entry in
        // between is seen twice, and enrolling is idempotent.
        let feed = match &mut progress.feed {
            Some(feed) => feed,
            None => progress.feed.insert(self.store.last_history_id().await?),
        };
        if !progress.indexed {
            self.enroll_from_index().await?;
            progress.indexed = true;
        }
        if tokio::time::Instant::now() >= progress.next_enroll {
            self.enroll_from_feed(feed).await?;
            progress.next_enroll = tokio::time::Instant::now() + self.config.email.enroll_interval;
        }
        self.assemble_digests(&mut progress.assembled).await
    }

    fn count(&self, rule: &str, outcome: &str) {
        self.metrics
            .followups
            .get_or_create(&FollowupLabels {
                rule: rule.to_owned(),
                outcome: outcome.to_owned(),
            })
            .inc();
    }

    /// Renders the email of a row; used by the sender and by `outbox preview`.
    pub fn compose(
        &self,
        rule: &Rule,
        row: &OutboxRow,
        deal: &Deal,
    ) -> Result<Outgoing, FollowupError> {
        compose(&self.config, &self.templates, &self.mailer, rule, row, deal)
    }
}

/// Keeps the first store error of a finished send task; a task that panicked is logged.
fn settle(
    joined: Result<Result<(), StoreError>, tokio::task::JoinError>,
    failure: &mut Option<StoreError>,
) {
    match joined {
        Ok(Ok(())) => {}
        Ok(Err(error)) => {
            failure.get_or_insert(error);
        }
        Err(error) => error!(%error, "a follow-up send task failed"),
    }
}

/// Writes what a send did, trying again while the store fails transiently (busy, I/O
/// error, disk full): the message has left, so its outcome must not be lost, else the
/// row would stay `sending` and become `uncertain` at the next start. Bounded by
/// [`RECORD_RETRIES`].
async fn record<T, F, Fut>(what: &str, write: F) -> Result<T, StoreError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, StoreError>>,
{
    crate::retry::retry(
        RECORD_RETRIES,
        &format!("recording {what}"),
        StoreError::is_transient,
        write,
    )
    .await
}

/// Retries of a transient SMTP failure: doubling from `email.retry_initial` up to
/// `email.retry_max`, with equal jitter so a retry never comes at once.
fn email_backoff(email: &crate::config::EmailConfig) -> Backoff {
    Backoff::equal(email.retry_initial, email.retry_max)
}

/// The reason recorded on a row whose delivery outcome is unknown.
fn unknown_outcome_reason(error: &str) -> String {
    format!(
        "outcome unknown: the connection failed after the message was handed to the server ({error}); not resent, see docs/followups.md"
    )
}

/// The display name of the sender, for templates.
pub fn sender_name(config: &Config) -> String {
    config
        .email
        .from
        .parse::<lettre::message::Mailbox>()
        .ok()
        .and_then(|m| m.name)
        .unwrap_or_else(|| config.email.from.clone())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    fn busy() -> StoreError {
        StoreError::Database(crate::store::DbError::busy())
    }

    #[tokio::test(start_paused = true)]
    async fn a_sends_outcome_is_written_again_while_the_store_is_busy() {
        let calls = AtomicU32::new(0);
        let written = record("a sent follow-up", || async {
            match calls.fetch_add(1, Ordering::SeqCst) {
                0..=2 => Err(busy()),
                _ => Ok(true),
            }
        })
        .await;
        assert!(written.unwrap());
        assert_eq!(calls.load(Ordering::SeqCst), 4);
    }

    #[tokio::test(start_paused = true)]
    async fn writing_an_outcome_gives_up_on_data_errors_at_once_and_on_busy_after_its_attempts() {
        let calls = AtomicU32::new(0);
        let corrupt = record("x", || async {
            calls.fetch_add(1, Ordering::SeqCst);
            Err::<(), _>(StoreError::Corrupt("bad row".into()))
        })
        .await;
        assert!(matches!(corrupt, Err(StoreError::Corrupt(_))));
        assert_eq!(calls.load(Ordering::SeqCst), 1);

        let calls = AtomicU32::new(0);
        let busy = record("x", || async {
            calls.fetch_add(1, Ordering::SeqCst);
            Err::<(), _>(busy())
        })
        .await;
        assert!(busy.unwrap_err().is_transient());
        assert_eq!(calls.load(Ordering::SeqCst), RECORD_RETRIES.max_attempts);
    }
}
