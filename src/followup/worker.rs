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

use super::digest::{DigestContext, DigestRecipient, DigestRule, MAX_LISTED};
use super::mailer::{MailError, Mailer, Outgoing};
use super::policy::{self, CAP_WINDOW, Policy};
use super::rules::{Recipient, Rule, RuleKind};
use super::templates::{EmailContext, Templates};
use super::unsubscribe;
use super::{FollowupError, SourceReader};
use crate::config::{Config, EmailConfig};
use crate::connectors::Attention;
use crate::domain::{Deal, StageRef, StepNumber};
use crate::health::WorkerHealth;
use crate::retry::Backoff;
use crate::store::{
    AssembleOutcome, ClaimDecision, ClaimQuery, DigestClaim, DigestFinish, DigestWatch,
    EarlierEnrollment, EnrollPlan, NewOutboxRow, OutboxAction, OutboxRow, OutboxState, Store,
    StoreError,
};
use crate::telemetry::{FollowupLabels, KindLabels, Metrics};
use chrono::{DateTime, Utc};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

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
    attention: Option<Attention>,
}

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
/// in `/readyz` (`health`) and is tried again after a backoff; the worker never stops
/// on it. One that cannot start (its mailer) is marked degraded with the reason.
/// `source` reads deals again from their sources before marketing emails to their
/// contacts.
pub async fn run(
    store: Store,
    config: Arc<Config>,
    metrics: Arc<Metrics>,
    source: Option<Arc<dyn SourceReader>>,
    attention: Option<Attention>,
    shutdown: CancellationToken,
    health: WorkerHealth,
) {
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
    worker.run_loop(shutdown, health).await;
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
            attention(crate::health::EMAIL_ATTENTION, note);
        }
    }

    async fn run_loop(self: Arc<Self>, shutdown: CancellationToken, mut health: WorkerHealth) {
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
            let (wake, failed) = match self.pass(&mut progress, &limit, &shutdown).await {
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
            }
        }
        info!("follow-up worker stopped");
    }

    /// One pass: the start-up enrollment while not done, enrollment from the history
    /// feed when due, digests, then every due row (claimed, sent and settled before the
    /// pass ends). Returns when to wake for the next pass, `None` for at once. A store
    /// error ends the pass after the sends in flight have settled; what was done stays
    /// done, and the next pass goes on from there.
    async fn pass(
        self: &Arc<Self>,
        progress: &mut Progress,
        limit: &Arc<Semaphore>,
        shutdown: &CancellationToken,
    ) -> Result<Option<tokio::time::Instant>, StoreError> {
        let email = &self.config.email;
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
            progress.next_enroll = tokio::time::Instant::now() + email.enroll_interval;
        }
        self.assemble_digests(&mut progress.assembled).await?;
        let digests = self.store.digests_due(Utc::now(), BATCH).await?;
        // From here sends may be in flight: an error is kept until they have settled.
        let mut sends: JoinSet<Result<(), StoreError>> = JoinSet::new();
        let mut failure: Option<StoreError> = None;
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
            Ok(due) => due,
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

    /// Enrolls deals that entered a trigger stage recently enough that some step can
    /// still be sent; an index range per rule.
    async fn enroll_from_index(&self) -> Result<(), StoreError> {
        let now = Utc::now();
        for rule in self.rules.values() {
            let reach = rule.horizon() + rule.late_grace.unwrap_or(self.config.email.late_grace);
            let since = now - chrono::Duration::from_std(reach).unwrap_or(chrono::Duration::MAX);
            let deals = self
                .store
                .unenrolled_in_stage(rule.trigger.clone(), since, rule.name.clone())
                .await?;
            for deal_id in deals {
                self.enroll(rule.clone(), deal_id).await?;
            }
        }
        Ok(())
    }

    /// Follows the stage history after `after`, moving it past each entry enrolled (so
    /// a pass that fails half-way goes on from there).
    async fn enroll_from_feed(&self, after: &mut i64) -> Result<(), StoreError> {
        loop {
            let entries = self.store.stage_entries_after(*after, FEED_PAGE).await?;
            let last_page = (entries.len() as u32) < FEED_PAGE;
            let mut moved = Vec::new();
            for entry in entries {
                for rule in self.rules.values() {
                    if rule.trigger == entry.to {
                        self.enroll(rule.clone(), entry.deal_id).await?;
                    }
                }
                if self
                    .rules
                    .values()
                    .any(|rule| !rule.is_active_in(&entry.to))
                    && !moved.contains(&entry.deal_id)
                {
                    moved.push(entry.deal_id);
                }
                *after = entry.history_id;
            }
            let active = self
                .rules
                .values()
                .map(|rule| (rule.name.clone(), rule.active.clone()))
                .collect();
            for (rule, rows) in self
                .store
                .stop_left_rules(moved, active, Utc::now())
                .await?
            {
                info!(rule = %rule, rows, "follow-ups stopped: their deal left the rule's stages");
                self.metrics
                    .followups
                    .get_or_create(&FollowupLabels {
                        rule,
                        outcome: "skipped".to_owned(),
                    })
                    .inc_by(rows);
            }
            if last_page {
                return Ok(());
            }
        }
    }

    async fn enroll(&self, rule: Arc<Rule>, deal_id: i64) -> Result<(), StoreError> {
        let now = Utc::now();
        let (grace, since) = enrollment_window(&rule, &self.config.email, now);
        let name = rule.name.clone();
        let outcome = self
            .store
            .enroll(deal_id, name.clone(), since, now, move |deal, earlier| {
                plan_enrollment(&rule, deal, now, grace, earlier)
            })
            .await?;
        if outcome.enrolled {
            debug!(rule = %name, deal_id, superseded = outcome.superseded, "deal enrolled");
        } else if outcome.declined {
            debug!(rule = %name, deal_id, "deal declined by the rule");
        }
        Ok(())
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

    /// Claims one due row and carries it out.
    async fn process(&self, id: i64, rule_name: &str) -> Result<(), StoreError> {
        let now = Utc::now();
        let Some(rule) = self.rules.get(rule_name).cloned() else {
            let reason = format!("rule {rule_name} is no longer configured");
            self.store
                .claim(id, now, ClaimQuery::default(), move |_| {
                    ClaimDecision::Skip(reason)
                })
                .await?;
            return Ok(());
        };
        let email = &self.config.email;
        if rule.kind == RuleKind::Marketing
            && rule.to == Recipient::Contact
            && let Some(source) = &self.source
            && let Some(deal) = self.store.outbox_email_deal(id).await?
            && let Err(reason) = source
                .reread(
                    deal.connection.as_str(),
                    deal.external_id.as_str(),
                    &self.shutdown,
                )
                .await
        {
            // Consent is the source's to say: without a fresh read the step waits,
            // and is skipped once it is later than the grace.
            let grace = chrono::Duration::from_std(rule.late_grace.unwrap_or(email.late_grace))
                .unwrap_or(chrono::Duration::MAX);
            let retry = email_backoff(email).delay(1);
            let until = now + chrono::Duration::from_std(retry).unwrap_or_default();
            warn!(rule = %rule.name, outbox_id = id, deal_id = deal.id, %reason, "could not read the deal again at its source to confirm consent; the step waits");
            self.store
                .claim(id, now, ClaimQuery::default(), move |facts| {
                    if now - facts.row.due_at > grace {
                        ClaimDecision::Skip(format!(
                            "consent could not be confirmed at the source within the late grace: {reason}"
                        ))
                    } else {
                        ClaimDecision::Defer {
                            until,
                            reason: format!("confirming consent at the source: {reason}"),
                        }
                    }
                })
                .await?;
            self.count(&rule.name, "deferred");
            return Ok(());
        }
        let query = claim_query(&rule, &self.config.email);
        let decider = rule.clone();
        let config = self.config.clone();
        let Some(claim) = self
            .store
            .claim(id, now, query, move |facts| {
                send_policy(&decider, &config.email, now).decide(facts)
            })
            .await?
        else {
            return Ok(());
        };
        match (&claim.decision, claim.sending) {
            (ClaimDecision::Send, Some((row, deal))) => self.deliver(&rule, row, deal).await,
            (ClaimDecision::Skip(reason) | ClaimDecision::Stop(reason), _) => {
                self.count(&rule.name, "skipped");
                info!(rule = %rule.name, outbox_id = id, reason = %reason, "follow-up skipped");
                Ok(())
            }
            (ClaimDecision::Defer { until, reason }, _) => {
                self.count(&rule.name, "deferred");
                debug!(rule = %rule.name, outbox_id = id, %until, reason = %reason, "follow-up deferred");
                Ok(())
            }
            (ClaimDecision::Expire(to), _) => {
                self.count(&rule.name, "expired");
                info!(rule = %rule.name, outbox_id = id, to = %policy::describe(to), "deal expired after its follow-ups");
                Ok(())
            }
            (ClaimDecision::Send, None) => Ok(()),
        }
    }

    /// Renders, sends and records one claimed email.
    async fn deliver(&self, rule: &Rule, row: OutboxRow, deal: Deal) -> Result<(), StoreError> {
        let step = row.step;
        let key = idempotency_key(&row);
        let outgoing = match self.compose(rule, &row, &deal) {
            Ok(outgoing) => outgoing,
            Err(error) => {
                let reason = format!("could not compose the email: {error}");
                error!(rule = %rule.name, deal_id = deal.id, %reason, "follow-up failed");
                self.count(&rule.name, "failed");
                return self
                    .store
                    .mark_failed(row.id, reason, None, Utc::now())
                    .await;
            }
        };
        let message_id = self.mailer.message_id(&key);
        let message = match self.mailer.build(&outgoing) {
            Ok(message) => message,
            Err(error) => {
                self.count(&rule.name, "failed");
                return self
                    .store
                    .mark_failed(row.id, error.to_string(), None, Utc::now())
                    .await;
            }
        };
        if self.config.email.dry_run {
            info!(rule = %rule.name, deal_id = deal.id, %step, subject = %outgoing.subject, "dry run: follow-up rendered, not sent");
            self.count(&rule.name, "dry_run");
            return self
                .store
                .mark_dry_run(row.id, message_id, Utc::now())
                .await;
        }
        let sent = self.mailer.send(message, &key).await;
        self.note_delivery(&sent, &rule.name);
        match sent {
            Ok(()) => {
                // The status follows the stage: a won deal moved to post-sale stays won.
                let move_to = rule
                    .steps
                    .get(step.index())
                    .and_then(|s| s.move_to.clone())
                    .map(|to| {
                        let status = self.config.pipelines.status_of(&to);
                        (to, status)
                    });
                record("a sent follow-up", || {
                    self.store.mark_sent(
                        row.id,
                        message_id.clone(),
                        Utc::now(),
                        move_to.clone(),
                        rule.active.clone(),
                    )
                })
                .await?;
                info!(rule = %rule.name, deal_id = deal.id, %step, "follow-up sent");
                self.count(&rule.name, "sent");
                Ok(())
            }
            Err(MailError::Transient(reason))
                if (row.attempts as u32) < self.config.email.max_attempts =>
            {
                let email = &self.config.email;
                let delay = email_backoff(email).delay(row.attempts as u32);
                let at = Utc::now() + chrono::Duration::from_std(delay).unwrap_or_default();
                warn!(rule = %rule.name, deal_id = deal.id, attempt = row.attempts, retry_in_ms = delay.as_millis() as u64, %reason, "follow-up delivery failed, retrying");
                self.count(&rule.name, "retried");
                record("a follow-up retry", || {
                    self.store
                        .mark_retry(row.id, at, format!("retrying: {reason}"), Utc::now())
                })
                .await
            }
            Err(MailError::Unknown(reason)) => {
                warn!(rule = %rule.name, deal_id = deal.id, %reason, "follow-up outcome unknown; marked uncertain, not resent");
                self.count(&rule.name, "uncertain");
                record("an uncertain follow-up", || {
                    self.store
                        .mark_uncertain(row.id, unknown_outcome_reason(&reason), Utc::now())
                })
                .await
            }
            Err(MailError::Permanent {
                reason,
                hard_bounce,
            }) => {
                warn!(rule = %rule.name, deal_id = deal.id, hard_bounce, %reason, "follow-up refused by the server");
                self.count(&rule.name, "failed");
                let suppress = hard_bounce.then(|| row.recipient.clone());
                record("a refused follow-up", || {
                    self.store
                        .mark_failed(row.id, reason.clone(), suppress.clone(), Utc::now())
                })
                .await
            }
            Err(error) => {
                let reason = format!("gave up after {} attempts: {error}", row.attempts);
                warn!(rule = %rule.name, deal_id = deal.id, %reason, "follow-up failed");
                record("a failed follow-up", || {
                    self.store
                        .mark_failed(row.id, reason.clone(), None, Utc::now())
                })
                .await
            }
        }
    }

    /// Assembles each digest rule's latest slot once per local day; a slot further
    /// back than the rule's late grace (downtime) is recorded as missed.
    async fn assemble_digests(
        &self,
        assembled: &mut HashMap<String, chrono::NaiveDate>,
    ) -> Result<(), StoreError> {
        let now = Utc::now();
        for rule in self.digests.values() {
            let (day, slot) = rule.latest_slot(now);
            if assembled.get(&rule.name) == Some(&day) {
                continue;
            }
            let late = (now - slot).to_std().unwrap_or_default();
            let missed = late > rule.late_grace;
            let outcome = self
                .store
                .assemble_digests(
                    rule.name.clone(),
                    day.to_string(),
                    slot,
                    now,
                    digest_watch(rule, now),
                    digest_fixed(rule),
                    missed,
                )
                .await?;
            match outcome {
                AssembleOutcome::Assembled { recipients } => {
                    info!(rule = %rule.name, %day, recipients, "daily digest assembled");
                }
                AssembleOutcome::Missed => {
                    self.count(&rule.name, "missed");
                    info!(rule = %rule.name, %day, late_s = late.as_secs(), "daily digest missed: the daemon was not running within the late grace of its time; not sent late");
                }
                AssembleOutcome::AlreadyDone => {}
            }
            assembled.insert(rule.name.clone(), day);
        }
        Ok(())
    }

    /// Claims one due digest (re-reading its deals) and sends it.
    async fn process_digest(&self, id: i64, rule_name: &str) -> Result<(), StoreError> {
        let now = Utc::now();
        let Some(rule) = self.digests.get(rule_name).cloned() else {
            let reason = format!("digest rule {rule_name} is no longer configured");
            return self.store.skip_digest(id, reason, now).await;
        };
        let by_owner = rule.to == DigestRecipient::Owner;
        let claim = self
            .store
            .claim_digest(
                id,
                now,
                rule.late_grace,
                digest_watch(&rule, now),
                by_owner,
                MAX_LISTED,
            )
            .await?;
        let (row, deals, total) = match claim {
            DigestClaim::Gone => return Ok(()),
            DigestClaim::Skipped(reason) => {
                self.count(&rule.name, "skipped");
                info!(rule = %rule.name, digest_id = id, %reason, "daily digest skipped");
                return Ok(());
            }
            DigestClaim::Send { row, deals, total } => (row, deals, total),
        };
        let context = DigestContext::new(
            &rule,
            &row.recipient,
            deals,
            total,
            &self.config.pipelines,
            &row.day,
            sender_name(&self.config),
            now,
        );
        let key = rule.idempotency_key(&row.day, &row.recipient);
        let message_id = self.mailer.message_id(&key);
        let built = self
            .templates
            .render(&rule.template, &context)
            .map_err(FollowupError::from)
            .and_then(|rendered| {
                let to = crate::domain::EmailAddress::parse(&row.recipient).ok_or_else(|| {
                    FollowupError::NoRecipient {
                        rule: rule.name.clone(),
                    }
                })?;
                let outgoing = Outgoing {
                    to,
                    to_name: context.owner.name.clone(),
                    subject: rendered.subject,
                    text: rendered.text,
                    html: rendered.html,
                    idempotency_key: key.clone(),
                    unsubscribe: None,
                    reply_to: None,
                };
                Ok(self.mailer.build(&outgoing)?)
            });
        let message = match built {
            Ok(message) => message,
            Err(error) => {
                self.count(&rule.name, "failed");
                error!(rule = %rule.name, digest_id = id, %error, "daily digest failed");
                let finish = DigestFinish::Failed {
                    reason: format!("could not compose the digest: {error}"),
                    suppress: false,
                };
                return self.store.finish_digest(id, finish, Utc::now()).await;
            }
        };
        if self.config.email.dry_run {
            self.count(&rule.name, "dry_run");
            info!(rule = %rule.name, digest_id = id, deals = total, "dry run: digest rendered, not sent");
            let finish = DigestFinish::DryRun { message_id };
            return self.store.finish_digest(id, finish, Utc::now()).await;
        }
        let sent = self.mailer.send(message, &key).await;
        self.note_delivery(&sent, &rule.name);
        let finish = match sent {
            Ok(()) => {
                self.count(&rule.name, "sent");
                info!(rule = %rule.name, digest_id = id, deals = total, day = %row.day, "daily digest sent");
                DigestFinish::Sent { message_id }
            }
            Err(MailError::Transient(reason))
                if (row.attempts as u32) < self.config.email.max_attempts =>
            {
                let email = &self.config.email;
                let delay = email_backoff(email).delay(row.attempts as u32);
                self.count(&rule.name, "retried");
                warn!(rule = %rule.name, digest_id = id, attempt = row.attempts, retry_in_ms = delay.as_millis() as u64, %reason, "digest delivery failed, retrying");
                DigestFinish::Retry {
                    at: Utc::now() + chrono::Duration::from_std(delay).unwrap_or_default(),
                    reason: format!("retrying: {reason}"),
                }
            }
            Err(MailError::Unknown(reason)) => {
                self.count(&rule.name, "uncertain");
                warn!(rule = %rule.name, digest_id = id, %reason, "digest outcome unknown; marked uncertain, not resent");
                DigestFinish::Uncertain {
                    reason: unknown_outcome_reason(&reason),
                }
            }
            Err(MailError::Permanent {
                reason,
                hard_bounce,
            }) => {
                self.count(&rule.name, "failed");
                warn!(rule = %rule.name, digest_id = id, hard_bounce, %reason, "digest refused by the server");
                DigestFinish::Failed {
                    reason,
                    suppress: hard_bounce,
                }
            }
            Err(error) => {
                self.count(&rule.name, "failed");
                DigestFinish::Failed {
                    reason: format!("gave up after {} attempts: {error}", row.attempts),
                    suppress: false,
                }
            }
        };
        record("a digest's outcome", || {
            self.store.finish_digest(id, finish.clone(), Utc::now())
        })
        .await
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

/// Renders the email of a row.
pub fn compose(
    config: &Config,
    templates: &Templates,
    mailer: &Mailer,
    rule: &Rule,
    row: &OutboxRow,
    deal: &Deal,
) -> Result<Outgoing, FollowupError> {
    let step = row.step;
    let template = &rule
        .steps
        .get(step.index())
        .ok_or_else(|| FollowupError::NoSuchStep {
            rule: rule.name.clone(),
            step,
        })?
        .template;
    let to = crate::domain::EmailAddress::parse(&row.recipient).ok_or_else(|| {
        FollowupError::NoRecipient {
            rule: rule.name.clone(),
        }
    })?;
    let unsubscribe = match rule.kind {
        RuleKind::Marketing => {
            let secret = config.email.unsubscribe_secret.as_ref().ok_or_else(|| {
                FollowupError::Unsubscribe("email.unsubscribe_secret is not set".into())
            })?;
            let base =
                config.server.public_url.as_ref().ok_or_else(|| {
                    FollowupError::Unsubscribe("server.public_url is not set".into())
                })?;
            let token = unsubscribe::sign(secret.expose(), &to);
            let url = base
                .join(&format!("unsubscribe/{token}"))
                .map_err(|error| FollowupError::Unsubscribe(error.to_string()))?;
            let mailto = config
                .email
                .unsubscribe_mailto
                .clone()
                .unwrap_or_else(|| mailer.from_address());
            Some((url.to_string(), mailto))
        }
        RuleKind::Transactional => None,
    };
    let sender = sender_name(config);
    let context = EmailContext::new(
        deal,
        rule,
        step,
        unsubscribe.as_ref().map(|(url, _)| url.clone()),
        sender,
        Utc::now(),
    )
    .with_stage_label(&config.pipelines);
    let rendered = templates.render(template, &context)?;
    let to_name = match rule.to {
        Recipient::Contact => deal.contact_name.clone(),
        Recipient::Owner => deal.owner.clone(),
        Recipient::Fixed(_) => None,
    };
    // A transactional note to the contact is the owner's (the shipped post-sale
    // note is signed by the owner): a reply goes to the owner, not to `email.from`.
    let reply_to = match (rule.kind, &rule.to, &deal.owner_email) {
        (RuleKind::Transactional, Recipient::Contact, Some(owner)) => {
            Some((deal.owner.clone(), owner.clone()))
        }
        _ => None,
    };
    Ok(Outgoing {
        to,
        to_name,
        subject: rendered.subject,
        text: rendered.text,
        html: rendered.html,
        idempotency_key: idempotency_key(row),
        unsubscribe,
        reply_to,
    })
}

/// What a digest lists at `now`: each watched stage with its idle cut-off.
pub fn digest_watch(rule: &DigestRule, now: DateTime<Utc>) -> Vec<DigestWatch> {
    rule.cutoffs(now)
        .into_iter()
        .map(|(stage, entered_before)| DigestWatch {
            stage,
            entered_before,
        })
        .collect()
}

fn digest_fixed(rule: &DigestRule) -> Option<String> {
    match &rule.to {
        DigestRecipient::Owner => None,
        DigestRecipient::Fixed(address) => Some(address.as_str().to_lowercase()),
    }
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

/// `<deal>-<rule>-<step>` (the step counted from 1): names an outbox row everywhere
/// (`.eml` file, Message-ID, `X-Dealsync-Idempotency-Key`), stable across restarts.
pub fn idempotency_key(row: &OutboxRow) -> String {
    format!("{}-{}-{}", row.deal_id, row.rule, row.step)
}

/// The facts the send-time decision of `rule` needs from the store.
pub fn claim_query(rule: &Rule, email: &EmailConfig) -> ClaimQuery {
    ClaimQuery {
        order_pipeline: if rule.stop_on_purchase {
            rule.trigger.pipeline.clone()
        } else {
            None
        },
        cap_window: email.max_per_recipient_per_day.map(|_| CAP_WINDOW),
    }
}

/// The send-time policy of `rule` at `now`: what the worker decides a due row with.
pub fn send_policy<'a>(rule: &'a Rule, email: &'a EmailConfig, now: DateTime<Utc>) -> Policy<'a> {
    Policy {
        rule,
        now,
        late_grace: rule.late_grace.unwrap_or(email.late_grace),
        cap: email.max_per_recipient_per_day,
        quiet: email.quiet_hours.map(|q| (q, email.time_zone)),
        recipient_zone_fields: &email.recipient_time_zone,
    }
}

/// The late grace of `rule`, and since when enrolling it looks at the recipient's
/// earlier enrollments (the cooldown, or the whole sequence plus its grace).
pub fn enrollment_window(
    rule: &Rule,
    email: &EmailConfig,
    now: DateTime<Utc>,
) -> (Duration, DateTime<Utc>) {
    let grace = rule.late_grace.unwrap_or(email.late_grace);
    let lookback = rule
        .cooldown
        .unwrap_or(Duration::ZERO)
        .max(rule.horizon() + grace);
    let since = now - chrono::Duration::from_std(lookback).unwrap_or(chrono::Duration::MAX);
    (grace, since)
}

/// Why `deal` cannot enter `rule` now, if it cannot: it is not in the rule's trigger
/// stage, or it was deleted in its source.
pub fn enrollment_gate(rule: &Rule, deal: &Deal) -> Result<(), String> {
    let here = StageRef {
        pipeline: deal.pipeline.clone(),
        stage: deal.stage.clone(),
    };
    if deal.deleted_at.is_some() {
        return Err("the deal was deleted in its source".into());
    }
    if here != rule.trigger {
        return Err(format!(
            "not in a trigger stage: the rule starts when a deal enters {}, and this deal is in {}",
            policy::describe(&rule.trigger),
            policy::describe(&here)
        ));
    }
    Ok(())
}

/// Decides, inside the enrollment transaction, whether and how a deal enters a rule.
pub fn plan_enrollment(
    rule: &Rule,
    deal: &Deal,
    now: DateTime<Utc>,
    grace: Duration,
    earlier: &mut dyn FnMut(&str) -> Result<Vec<EarlierEnrollment>, StoreError>,
) -> EnrollPlan {
    if enrollment_gate(rule, deal).is_err() {
        return EnrollPlan::Nothing;
    }
    let anchor_at = deal.stage_entered_at;
    let address = match &rule.to {
        Recipient::Contact => deal.contact_email.clone(),
        Recipient::Owner => deal.owner_email.clone(),
        Recipient::Fixed(address) => Some(address.clone()),
    };
    let Some(address) = address else {
        let whose = if rule.to == Recipient::Owner {
            "owner"
        } else {
            "contact"
        };
        return EnrollPlan::Decline {
            recipient: String::new(),
            anchor_at,
            reason: format!("the deal has no {whose} email address"),
        };
    };
    let recipient = address.to_string();
    let mut supersede = Vec::new();
    if rule.to == Recipient::Contact {
        // One sequence per shopper: the newest deal wins while nothing was sent yet.
        let earlier = match earlier(&recipient) {
            Ok(earlier) => earlier,
            Err(error) => {
                warn!(rule = %rule.name, deal_id = deal.id, %error, "could not read earlier enrollments; will retry");
                return EnrollPlan::Nothing;
            }
        };
        for other in earlier {
            if other.started && other.pending {
                return EnrollPlan::Decline {
                    recipient,
                    anchor_at,
                    reason: format!(
                        "the recipient is already in this rule's sequence for deal {}",
                        other.deal_id
                    ),
                };
            }
            if other.started {
                if let Some(cooldown) = rule.cooldown
                    && other.created_at
                        > now - chrono::Duration::from_std(cooldown).unwrap_or_default()
                {
                    return EnrollPlan::Decline {
                        recipient,
                        anchor_at,
                        reason: format!(
                            "cooldown: the recipient went through this rule for deal {} within {}",
                            other.deal_id,
                            crate::config::duration::format(cooldown)
                        ),
                    };
                }
                continue;
            }
            if other.pending {
                if other.anchor_at <= anchor_at {
                    supersede.push(other.deal_id);
                } else {
                    return EnrollPlan::Decline {
                        recipient,
                        anchor_at,
                        reason: format!(
                            "a newer deal of the same recipient ({}) has this rule",
                            other.deal_id
                        ),
                    };
                }
            }
        }
    }
    let grace = chrono::Duration::from_std(grace).unwrap_or(chrono::Duration::MAX);
    let offset = |after: Duration| chrono::Duration::from_std(after).unwrap_or_default();
    let mut rows: Vec<NewOutboxRow> = rule
        .steps
        .iter()
        .enumerate()
        .map(|(at, step)| {
            let due_at = anchor_at + offset(step.after);
            let too_late = now - due_at > grace;
            NewOutboxRow {
                step: StepNumber::from_index(at as i64),
                action: OutboxAction::Email,
                due_at,
                state: if too_late {
                    OutboxState::Skipped
                } else {
                    OutboxState::Pending
                },
                reason: too_late.then(|| {
                    "already overdue by more than the late grace when enrolled: not sent late"
                        .to_owned()
                }),
            }
        })
        .collect();
    if rows.iter().all(|row| row.state == OutboxState::Skipped) {
        return EnrollPlan::Decline {
            recipient,
            anchor_at,
            reason: "entered the stage too long ago: every step is past the late grace".into(),
        };
    }
    if let (Some((after, _)), Some(last)) = (&rule.expire, rule.steps.last()) {
        rows.push(NewOutboxRow {
            step: StepNumber::from_index(rule.steps.len() as i64),
            action: OutboxAction::Expire,
            due_at: anchor_at + offset(last.after) + offset(*after),
            state: OutboxState::Pending,
            reason: None,
        });
    }
    EnrollPlan::Enroll {
        recipient,
        anchor_at,
        rows,
        supersede,
    }
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

    mod enrollment {
        use super::super::*;
        use crate::domain::{EmailAddress, PipelineKey, StageKey};
        use crate::followup::rules::Step;
        use crate::store::EarlierEnrollment;
        use chrono::TimeZone;
        use std::cell::Cell;

        const HOUR: Duration = Duration::from_secs(3600);
        const DAY: Duration = Duration::from_secs(24 * 3600);

        fn now() -> DateTime<Utc> {
            Utc.with_ymd_and_hms(2026, 3, 10, 12, 0, 0).unwrap()
        }

        fn stage(name: &str) -> StageRef {
            StageRef {
                pipeline: Some(PipelineKey::new("ecommerce")),
                stage: StageKey::new(name),
            }
        }

        fn ago(hours: i64) -> DateTime<Utc> {
            now() - chrono::Duration::hours(hours)
        }

        /// A cart rule: steps at 1 h, 24 h and 72 h after entering `abandoned`.
        fn rule() -> Rule {
            let step = |hours: u64, template: &str| Step {
                after: HOUR * hours as u32,
                template: template.into(),
                discount_code: None,
                move_to: None,
            };
            Rule {
                name: "cart".into(),
                trigger: stage("abandoned"),
                kind: RuleKind::Marketing,
                to: Recipient::Contact,
                steps: vec![step(1, "a"), step(24, "b"), step(72, "c")],
                expire: None,
                cooldown: None,
                late_grace: None,
                stop_on_purchase: true,
                active: vec![stage("abandoned")],
            }
        }

        fn shopper(entered: DateTime<Utc>) -> Deal {
            Deal {
                contact_email: EmailAddress::parse("ann@shop.example"),
                ..Deal::example(stage("abandoned"), entered)
            }
        }

        fn plan(rule: &Rule, deal: &Deal, earlier: Vec<EarlierEnrollment>) -> EnrollPlan {
            plan_enrollment(rule, deal, now(), 2 * HOUR, &mut |_| Ok(earlier.clone()))
        }

        fn earlier(deal_id: i64, started: bool, pending: bool) -> EarlierEnrollment {
            EarlierEnrollment {
                deal_id,
                anchor_at: ago(48),
                created_at: ago(48),
                started,
                pending,
            }
        }

        fn declined(plan: &EnrollPlan) -> &str {
            match plan {
                EnrollPlan::Decline { reason, .. } => reason,
                other => panic!("expected a decline, got {other:?}"),
            }
        }

        fn enrolled(plan: EnrollPlan) -> (String, Vec<NewOutboxRow>, Vec<i64>) {
            match plan {
                EnrollPlan::Enroll {
                    recipient,
                    rows,
                    supersede,
                    ..
                } => (recipient, rows, supersede),
                other => panic!("expected an enrollment, got {other:?}"),
            }
        }

        #[test]
        fn a_fresh_deal_gets_one_pending_row_per_step_counted_from_its_stage_entry() {
            let entered = ago(0);
            let (recipient, rows, supersede) = enrolled(plan(&rule(), &shopper(entered), vec![]));
            assert_eq!(recipient, "ann@shop.example");
            assert!(supersede.is_empty());
            let got: Vec<_> = rows
                .iter()
                .map(|r| {
                    (
                        r.step.index(),
                        r.action,
                        r.due_at,
                        r.state,
                        r.reason.clone(),
                    )
                })
                .collect();
            let pending = |index, hours| {
                (
                    index,
                    OutboxAction::Email,
                    entered + chrono::Duration::hours(hours),
                    OutboxState::Pending,
                    None,
                )
            };
            assert_eq!(got, vec![pending(0, 1), pending(1, 24), pending(2, 72)]);
        }

        #[test]
        fn a_step_later_than_the_grace_is_skipped_and_one_exactly_at_the_grace_is_not() {
            // Entered 4 h ago: step 0 (due 3 h ago) is 3 h late, past the 2 h grace.
            // Entered 3 h ago: step 0 is exactly 2 h late, and still sent.
            let (_, rows, _) = enrolled(plan(&rule(), &shopper(ago(4)), vec![]));
            assert_eq!(rows[0].state, OutboxState::Skipped);
            assert!(rows[0].reason.as_deref().unwrap().contains("late grace"));
            assert_eq!(rows[1].state, OutboxState::Pending);
            assert_eq!(rows[1].reason, None);

            let (_, rows, _) = enrolled(plan(&rule(), &shopper(ago(3)), vec![]));
            assert_eq!(rows[0].state, OutboxState::Pending);
        }

        #[test]
        fn a_deal_whose_every_step_is_past_the_grace_is_declined() {
            // The last step is due 72 h after entry; 75 h ago puts it 3 h late.
            let late = plan(&rule(), &shopper(ago(75)), vec![]);
            assert!(declined(&late).contains("every step is past the late grace"));
            // 74 h ago: the last step is exactly 2 h late, so it still goes out.
            let (_, rows, _) = enrolled(plan(&rule(), &shopper(ago(74)), vec![]));
            let states: Vec<_> = rows.iter().map(|r| r.state).collect();
            assert_eq!(
                states,
                [
                    OutboxState::Skipped,
                    OutboxState::Skipped,
                    OutboxState::Pending
                ]
            );
        }

        #[test]
        fn the_expiry_row_follows_the_last_step_with_the_next_index() {
            let rule = Rule {
                expire: Some((2 * DAY, stage("lost"))),
                ..rule()
            };
            let entered = ago(0);
            let (_, rows, _) = enrolled(plan(&rule, &shopper(entered), vec![]));
            let expiry = rows.last().unwrap();
            assert_eq!(rows.len(), 4);
            assert_eq!(expiry.action, OutboxAction::Expire);
            assert_eq!(expiry.step.index(), 3);
            assert_eq!(expiry.due_at, entered + chrono::Duration::hours(72 + 48));
            assert_eq!(expiry.state, OutboxState::Pending);
        }

        #[test]
        fn a_deleted_deal_or_one_outside_the_trigger_stage_is_not_planned() {
            let deleted = Deal {
                deleted_at: Some(ago(0)),
                ..shopper(ago(0))
            };
            assert_eq!(plan(&rule(), &deleted, vec![]), EnrollPlan::Nothing);
            assert!(
                enrollment_gate(&rule(), &deleted)
                    .unwrap_err()
                    .contains("deleted")
            );

            let elsewhere = Deal {
                stage: StageKey::new("recovered"),
                ..shopper(ago(0))
            };
            assert_eq!(plan(&rule(), &elsewhere, vec![]), EnrollPlan::Nothing);
            let why = enrollment_gate(&rule(), &elsewhere).unwrap_err();
            assert!(why.contains("ecommerce.abandoned") && why.contains("ecommerce.recovered"));
            assert_eq!(enrollment_gate(&rule(), &shopper(ago(0))), Ok(()));
        }

        #[test]
        fn a_deal_without_the_address_is_declined_naming_whose_address() {
            let no_contact = Deal::example(stage("abandoned"), ago(0));
            let plan_contact = plan(&rule(), &no_contact, vec![]);
            assert_eq!(
                declined(&plan_contact),
                "the deal has no contact email address"
            );
            let owner_rule = Rule {
                to: Recipient::Owner,
                ..rule()
            };
            let plan_owner = plan(&owner_rule, &shopper(ago(0)), vec![]);
            assert_eq!(declined(&plan_owner), "the deal has no owner email address");
            match plan_owner {
                EnrollPlan::Decline { recipient, .. } => assert_eq!(recipient, ""),
                other => panic!("{other:?}"),
            }
        }

        #[test]
        fn only_contact_rules_look_at_earlier_enrollments() {
            let team = EmailAddress::parse("team@shop.example").unwrap();
            for to in [Recipient::Owner, Recipient::Fixed(team.clone())] {
                let rule = Rule { to, ..rule() };
                let deal = Deal {
                    owner_email: EmailAddress::parse("owner@shop.example"),
                    ..shopper(ago(0))
                };
                let asked = Cell::new(0);
                let plan = plan_enrollment(&rule, &deal, now(), 2 * HOUR, &mut |_| {
                    asked.set(asked.get() + 1);
                    Ok(vec![earlier(1, true, true)])
                });
                let (recipient, _, _) = enrolled(plan);
                assert_eq!(asked.get(), 0);
                let expected = match &rule.to {
                    Recipient::Fixed(_) => "team@shop.example",
                    _ => "owner@shop.example",
                };
                assert_eq!(recipient, expected);
            }
            let asked_for = std::cell::RefCell::new(String::new());
            enrolled(plan_enrollment(
                &rule(),
                &shopper(ago(0)),
                now(),
                2 * HOUR,
                &mut |recipient| {
                    *asked_for.borrow_mut() = recipient.to_owned();
                    Ok(vec![])
                },
            ));
            assert_eq!(*asked_for.borrow(), "ann@shop.example");
        }

        #[test]
        fn a_recipient_mid_sequence_is_declined_and_a_finished_one_waits_out_the_cooldown() {
            let plan_mid = plan(&rule(), &shopper(ago(0)), vec![earlier(3, true, true)]);
            assert!(declined(&plan_mid).contains("already in this rule's sequence for deal 3"));

            // Finished 48 h ago; no cooldown: enrolled again.
            enrolled(plan(
                &rule(),
                &shopper(ago(0)),
                vec![earlier(3, true, false)],
            ));
            // A 3-day cooldown: still inside it.
            let cooling = Rule {
                cooldown: Some(3 * DAY),
                ..rule()
            };
            let plan_cool = plan(&cooling, &shopper(ago(0)), vec![earlier(3, true, false)]);
            assert!(declined(&plan_cool).contains("cooldown"));
            assert!(declined(&plan_cool).contains("deal 3 within 3d"));
            // A 2-day cooldown ends exactly now: enrolled.
            let ended = Rule {
                cooldown: Some(2 * DAY),
                ..rule()
            };
            enrolled(plan(
                &ended,
                &shopper(ago(0)),
                vec![earlier(3, true, false)],
            ));
        }

        #[test]
        fn a_newer_deal_supersedes_an_unstarted_older_one_and_an_older_deal_yields() {
            // The earlier enrollment (anchored 48 h ago) has sent nothing: the new deal,
            // anchored now, takes over.
            let (_, _, supersede) = enrolled(plan(
                &rule(),
                &shopper(ago(0)),
                vec![earlier(3, false, true), earlier(4, false, false)],
            ));
            assert_eq!(supersede, vec![3]);
            // Same anchor: the newest decision still wins.
            let (_, _, supersede) = enrolled(plan(
                &rule(),
                &shopper(ago(48)),
                vec![earlier(3, false, true)],
            ));
            assert_eq!(supersede, vec![3]);
            // The deal being planned is the older one: it declines.
            let older = plan(&rule(), &shopper(ago(49)), vec![earlier(3, false, true)]);
            assert!(declined(&older).contains("a newer deal of the same recipient (3)"));
        }

        #[test]
        fn an_unreadable_history_plans_nothing_so_a_later_pass_retries() {
            let plan = plan_enrollment(&rule(), &shopper(ago(0)), now(), 2 * HOUR, &mut |_| {
                Err(StoreError::Corrupt("bad row".into()))
            });
            assert_eq!(plan, EnrollPlan::Nothing);
        }

        #[test]
        fn the_enrollment_window_looks_back_over_the_longer_of_cooldown_and_sequence() {
            let text = "[email]\ntransport = \"file\"\ndir = \"out\"\nfrom = \"shop@example.com\"\nlate_grace = \"2h\"\n";
            let email = crate::config::parse(
                std::path::Path::new("dealsync.toml"),
                text,
                &crate::config::interpolate::tests::MapEnv(Default::default()),
            )
            .unwrap()
            .email;
            // Sequence 72 h + grace 2 h.
            let (grace, since) = enrollment_window(&rule(), &email, now());
            assert_eq!(grace, 2 * HOUR);
            assert_eq!(since, ago(74));
            let long = Rule {
                cooldown: Some(10 * DAY),
                late_grace: Some(HOUR),
                ..rule()
            };
            let (grace, since) = enrollment_window(&long, &email, now());
            assert_eq!(grace, HOUR);
            assert_eq!(since, ago(240));
        }
    }
}
