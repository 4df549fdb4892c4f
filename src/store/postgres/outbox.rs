//! The follow-up outbox (`store::outbox`, which documents the contract) on PostgreSQL:
//! enrollment, the claim of a due row, its settlement with the deal's move, the
//! operator's retry, the listings, and the follow-up facts `followup::explain` reads.
//!
//! Invariants across replicas:
//! - One row per (deal, rule, step): the unique key, rows inserted with `ON CONFLICT
//!   DO NOTHING`; an enrollment takes a transaction-level advisory lock on (deal,
//!   rule) before it looks for rows, so two replicas enrolling the same deal at once
//!   run one after the other and the second finds the first's rows.
//! - A due row is claimed by one replica: the claim locks it `FOR UPDATE SKIP LOCKED`
//!   while still `pending` (a row another replica is claiming is skipped, not waited
//!   for, and is no longer `pending` once that claim commits), reads the facts and
//!   applies the decision in that transaction. A row sent is `sending`, claimed by this
//!   replica (`claimed_by`) until `claimed_until` (`Options::send_claim_ttl` by the
//!   server's clock), committed before the hand-off.
//! - A recipient's frequency cap is counted under an advisory lock on the address
//!   (held until the claim commits), so two replicas claiming emails to one address
//!   at once count one after the other.
//! - The deal a claim or a send moves is moved in the same transaction, its row
//!   locked; the caller wakes the stage-change subscribers after the commit.
//! - A rule's callback (the enrollment plan, `followup::explain`) is synchronous: it
//!   runs on the blocking pool, and the reads it asks for run on the runtime from
//!   there, inside the same transaction (one snapshot for the explanation).

use super::Database;
use super::deals::{move_stage, pg_text};
use super::ledger::{params, pg_values, settle_in, skip_in};
use crate::domain::people::person_key;
use crate::domain::{ChangeCause, Deal, DealStatus, PipelineKey, StageKey, StageRef};
use crate::store::deals::{DEAL_COLUMNS, deal_from};
use crate::store::ledger::{OUTBOX, Settlement};
use crate::store::outbox::{
    Claim, ClaimDecision, ClaimFacts, ClaimQuery, EarlierEnrollment, EnrollOutcome, EnrollPlan,
    FollowupFacts, FollowupReads, NewOutboxRow, ORDER_SINCE_SQL, OpenLookup, OrderLookup,
    OutboxRow, OutboxRowFilter, ROW_COLUMNS, RetryOutcome, cap_since, claimed_deal, decline_row,
    earlier_from, expired_reason, now_sending, outbox_row_from, retry_failed_sql, retryable,
    rules_left, stopped_reason, superseded_reason,
};
use crate::store::{Result, StoreError, to_ms};
use chrono::{DateTime, Utc};
use deadpool_postgres::{GenericClient, Transaction};
use std::collections::HashMap;
use tokio::runtime::Handle;

/// The advisory-lock class of enrollments, (deal, rule) (two-key form, a key space
/// apart from the deal keys').
const ENROLL_LOCK_CLASS: i32 = 0x656e_726c; // "enrl"
/// The advisory-lock class of a recipient's frequency cap (`hashtext(lower(email))`).
const RECIPIENT_LOCK_CLASS: i32 = 0x7263_7074; // "rcpt"

async fn read_deal(db: &impl GenericClient, id: i64) -> Result<Option<Deal>> {
    let statement = db
        .prepare_cached(&format!("SELECT {DEAL_COLUMNS} FROM deals WHERE id = $1"))
        .await?;
    let row = db.query_opt(&statement, &[&id]).await?;
    Ok(row.as_ref().map(deal_from).transpose()?)
}

async fn read_row(db: &impl GenericClient, id: i64, lock: &str) -> Result<Option<OutboxRow>> {
    let sql = format!("SELECT {ROW_COLUMNS} FROM outbox WHERE id = $1{lock}");
    let row = db.query_opt(&sql, &[&id]).await?;
    Ok(row.as_ref().map(outbox_row_from).transpose()?)
}

/// The recipient's enrollments into `rule` created since `since_ms`, other than
/// `except_deal`'s, by deal.
async fn earlier_enrollments(
    db: &impl GenericClient,
    rule: &str,
    recipient: &str,
    since_ms: i64,
    except_deal: i64,
) -> Result<Vec<EarlierEnrollment>> {
    let statement = db
        .prepare_cached(
            "SELECT deal_id, min(anchor_at), min(created_at),
                    bool_or(state IN ('sent', 'sending', 'uncertain')), bool_or(state = 'pending')
             FROM outbox WHERE rule = $1 AND created_at >= $3 AND deal_id <> $4
               AND (recipient = $2
                    OR recipient IN (SELECT contact_email FROM deals WHERE person_key = $5))
             GROUP BY deal_id ORDER BY deal_id",
        )
        .await?;
    let person = person_key(recipient);
    let rows = db
        .query(
            &statement,
            &[
                &pg_text(rule),
                &pg_text(recipient),
                &since_ms,
                &except_deal,
                &person,
            ],
        )
        .await?;
    Ok(rows
        .iter()
        .map(earlier_from)
        .collect::<std::result::Result<_, _>>()?)
}

/// The facts a send-time decision needs about `row` (as `store::outbox` reads them).
async fn read_claim_facts(
    db: &impl GenericClient,
    row: OutboxRow,
    query: &ClaimQuery,
    now_ms: i64,
) -> Result<ClaimFacts> {
    let deal = read_deal(db, row.deal_id).await?;
    let suppressed = if row.recipient.is_empty() {
        None
    } else {
        super::people::suppression_of(db, &row.recipient).await?
    };
    let order_since = match OrderLookup::of(query, deal.as_ref()) {
        Some(order) => {
            let statement = db
                .prepare_cached(&ORDER_SINCE_SQL.replace('?', "$"))
                .await?;
            let found = db
                .query_opt(
                    &statement,
                    &[
                        &pg_text(&order.person),
                        &pg_text(order.pipeline),
                        &order.deal_id,
                        &order.started_ms,
                    ],
                )
                .await?;
            found.map(|row| row.try_get(0)).transpose()?
        }
        None => None,
    };
    let recent_to_recipient = match cap_since(query, &row, now_ms) {
        Some(since) => {
            // Replicas claiming two emails to one person at once count one after
            // the other (the lock lasts until this claim commits its `sending`), so
            // the cap holds across replicas as it does under SQLite's single writer.
            // The lock is the person's, so two addresses of one person share it.
            let lock = db
                .prepare_cached("SELECT pg_advisory_xact_lock($1, hashtext(lower($2)))")
                .await?;
            let person = person_key(&row.recipient);
            let locked = person.as_deref().unwrap_or(&row.recipient);
            db.execute(&lock, &[&RECIPIENT_LOCK_CLASS, &pg_text(locked)])
                .await?;
            super::people::recent_to_person(db, &row.recipient, since).await?
        }
        None => (0, None),
    };
    let open_elsewhere = match OpenLookup::of(query, deal.as_ref()) {
        Some(open) => {
            super::people::open_elsewhere(db, &open.person, open.deal_id, open.stages).await?
        }
        None => None,
    };
    Ok(ClaimFacts {
        row,
        deal,
        suppressed,
        order_since,
        recent_to_recipient,
        open_elsewhere,
    })
}

/// The follow-up reads of a synchronous callback running on the blocking pool: each
/// runs on the runtime, in the caller's transaction.
struct Blocking<'a> {
    tx: &'a Transaction<'a>,
    runtime: &'a Handle,
}

impl FollowupReads for Blocking<'_> {
    fn earlier_enrollments(
        &self,
        rule: &str,
        recipient: &str,
        since_ms: i64,
        except_deal: i64,
    ) -> Result<Vec<EarlierEnrollment>> {
        self.runtime.block_on(earlier_enrollments(
            self.tx,
            rule,
            recipient,
            since_ms,
            except_deal,
        ))
    }

    fn claim_facts(&self, row: OutboxRow, query: &ClaimQuery, now_ms: i64) -> Result<ClaimFacts> {
        self.runtime
            .block_on(read_claim_facts(self.tx, row, query, now_ms))
    }
}

/// Waits for a task on the blocking pool.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|error| StoreError::Task(error.to_string()))?
}

async fn insert_row(
    tx: &Transaction<'_>,
    deal_id: i64,
    rule: &str,
    recipient: &str,
    anchor_at: i64,
    row: &NewOutboxRow,
    now: i64,
) -> Result<()> {
    let statement = tx
        .prepare_cached(
            "INSERT INTO outbox (deal_id, rule, step, action, recipient, state, anchor_at,
                due_at, next_attempt_at, reason, created_at, updated_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $8, $9, $10, $10)
             ON CONFLICT DO NOTHING",
        )
        .await?;
    tx.execute(
        &statement,
        &[
            &deal_id,
            &pg_text(rule),
            &(row.step.index() as i64),
            &row.action.as_str(),
            &pg_text(recipient),
            &row.state.as_str(),
            &anchor_at,
            &to_ms(row.due_at),
            &row.reason.as_deref().map(pg_text),
            &now,
        ],
    )
    .await?;
    Ok(())
}

/// Skips the `pending` rows of (deal, rule) with the reason, the expiry too unless
/// `emails_only`; how many.
async fn skip_pending(
    tx: &Transaction<'_>,
    deal_id: i64,
    rule: &str,
    reason: &str,
    now: i64,
    emails_only: bool,
) -> Result<u64> {
    let only = if emails_only {
        " AND action = 'email'"
    } else {
        ""
    };
    let statement = tx
        .prepare_cached(&format!(
            "UPDATE outbox SET state = 'skipped', reason = $3, updated_at = $4
             WHERE deal_id = $1 AND rule = $2 AND state = 'pending'{only}"
        ))
        .await?;
    Ok(tx
        .execute(
            &statement,
            &[&deal_id, &pg_text(rule), &pg_text(reason), &now],
        )
        .await?)
}

/// Applies an enrollment plan in the caller's transaction.
async fn apply_plan(
    tx: &Transaction<'_>,
    deal_id: i64,
    rule: &str,
    plan: EnrollPlan,
    now: i64,
) -> Result<EnrollOutcome> {
    let mut outcome = EnrollOutcome::default();
    match plan {
        EnrollPlan::Nothing => {}
        EnrollPlan::Decline {
            recipient,
            anchor_at,
            reason,
        } => {
            let row = decline_row(reason, now);
            insert_row(tx, deal_id, rule, &recipient, to_ms(anchor_at), &row, now).await?;
            outcome.declined = true;
        }
        EnrollPlan::Enroll {
            recipient,
            anchor_at,
            rows,
            supersede,
        } => {
            let reason = superseded_reason(deal_id);
            for old in supersede {
                // The expiry row goes too: the newer deal's sequence owns the shopper.
                outcome.superseded += skip_pending(tx, old, rule, &reason, now, false).await?;
            }
            for row in &rows {
                insert_row(tx, deal_id, rule, &recipient, to_ms(anchor_at), row, now).await?;
            }
            outcome.enrolled = true;
        }
    }
    Ok(outcome)
}

/// Serializes enrollments of (deal, rule) across replicas, until the transaction ends;
/// then whether the deal already has rows for the rule.
async fn lock_enrollment(tx: &Transaction<'_>, deal_id: i64, rule: &str) -> Result<bool> {
    tx.execute(
        "SELECT pg_advisory_xact_lock($1, hashtext($2::bigint::text || ':' || $3))",
        &[&ENROLL_LOCK_CLASS, &deal_id, &pg_text(rule)],
    )
    .await?;
    let statement = tx
        .prepare_cached("SELECT 1 FROM outbox WHERE deal_id = $1 AND rule = $2 LIMIT 1")
        .await?;
    Ok(tx
        .query_opt(&statement, &[&deal_id, &pg_text(rule)])
        .await?
        .is_some())
}

/// What a claim decided other than `Send`, applied in the claim's transaction; how many
/// stage changes it recorded.
async fn apply_decision(
    tx: &Transaction<'_>,
    row: &OutboxRow,
    decision: &ClaimDecision,
    now: DateTime<Utc>,
) -> Result<u64> {
    let (id, now_ms) = (row.id, to_ms(now));
    match decision {
        ClaimDecision::Send => {}
        ClaimDecision::Skip(reason) => {
            skip_in(tx, &OUTBOX, id, reason, now).await?;
        }
        ClaimDecision::Stop(reason) => {
            skip_in(tx, &OUTBOX, id, reason, now).await?;
            let stopped = stopped_reason(reason);
            skip_pending(tx, row.deal_id, &row.rule, &stopped, now_ms, true).await?;
        }
        ClaimDecision::Defer { until, reason } => {
            tx.execute(
                "UPDATE outbox SET next_attempt_at = $2, reason = $3, updated_at = $4
                 WHERE id = $1",
                &[&id, &to_ms(*until), &pg_text(reason), &now_ms],
            )
            .await?;
        }
        ClaimDecision::Expire(to) => {
            let moved = move_stage(
                tx,
                row.deal_id,
                to,
                DealStatus::Lost,
                now,
                ChangeCause::Followup,
            )
            .await?;
            tx.execute(
                "UPDATE outbox SET state = 'done', reason = $2, updated_at = $3, sent_at = $3
                 WHERE id = $1",
                &[&id, &pg_text(&expired_reason(to)), &now_ms],
            )
            .await?;
            return Ok(u64::from(moved));
        }
    }
    Ok(0)
}

impl Database {
    /// Runs `f` on a deal, its outbox rows and the follow-up facts, in one read-only
    /// repeatable-read transaction (one snapshot); `None` when there is no such deal.
    pub(in crate::store) async fn with_followup_facts<T, F>(
        &self,
        deal_id: i64,
        f: F,
    ) -> Result<Option<T>>
    where
        T: Send + 'static,
        F: FnOnce(&Deal, &[OutboxRow], &FollowupFacts<'_>) -> Result<T> + Send + 'static,
    {
        let mut client = self.client().await?;
        let runtime = Handle::current();
        blocking(move || {
            let tx = runtime.block_on(
                client
                    .build_transaction()
                    .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
                    .read_only(true)
                    .start(),
            )?;
            let Some(deal) = runtime.block_on(read_deal(&tx, deal_id))? else {
                return Ok(None);
            };
            let rows = runtime.block_on(rows_of_deal(&tx, deal_id))?;
            let reads = Blocking {
                tx: &tx,
                runtime: &runtime,
            };
            let value = f(&deal, &rows, &FollowupFacts::new(&reads))?;
            runtime.block_on(tx.commit())?;
            Ok(Some(value))
        })
        .await
    }

    /// Enrolls a deal into a rule in one transaction (see `Store::enroll`).
    pub(in crate::store) async fn enroll<F>(
        &self,
        deal_id: i64,
        rule: String,
        history_since: DateTime<Utc>,
        now: DateTime<Utc>,
        plan: F,
    ) -> Result<EnrollOutcome>
    where
        F: FnOnce(&Deal, &mut dyn FnMut(&str) -> Result<Vec<EarlierEnrollment>>) -> EnrollPlan
            + Send
            + 'static,
    {
        let mut client = self.client().await?;
        let runtime = Handle::current();
        blocking(move || {
            let tx = runtime.block_on(client.transaction())?;
            if runtime.block_on(lock_enrollment(&tx, deal_id, &rule))? {
                return Ok(EnrollOutcome::default());
            }
            let Some(deal) = runtime.block_on(read_deal(&tx, deal_id))? else {
                return Ok(EnrollOutcome::default());
            };
            let since = to_ms(history_since);
            let reads = Blocking {
                tx: &tx,
                runtime: &runtime,
            };
            let mut lookup =
                |recipient: &str| reads.earlier_enrollments(&rule, recipient, since, deal_id);
            let plan = plan(&deal, &mut lookup);
            let outcome = runtime.block_on(apply_plan(&tx, deal_id, &rule, plan, to_ms(now)))?;
            runtime.block_on(tx.commit())?;
            Ok(outcome)
        })
        .await
    }

    /// Claims due row `id` for `replica` (see `Store::claim`); also how many stage
    /// changes the decision recorded.
    pub(in crate::store) async fn claim_outbox<F>(
        &self,
        id: i64,
        now: DateTime<Utc>,
        query: ClaimQuery,
        decide: F,
        replica: &str,
    ) -> Result<(Option<Claim>, u64)>
    where
        F: FnOnce(&ClaimFacts) -> ClaimDecision,
    {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        let lock = tx
            .prepare_cached(&OUTBOX.claims.lock_pending_sql(ROW_COLUMNS))
            .await?;
        let Some(row) = tx.query_opt(&lock, &[&id]).await? else {
            return Ok((None, 0));
        };
        let now_ms = to_ms(now);
        let facts = read_claim_facts(&tx, outbox_row_from(&row)?, &query, now_ms).await?;
        let decision = decide(&facts);
        let ClaimFacts { row, deal, .. } = facts;
        let mut sending = None;
        let moved = apply_decision(&tx, &row, &decision, now).await?;
        if decision == ClaimDecision::Send {
            let send = tx
                .prepare_cached(&OUTBOX.claims.send_locked_sql(""))
                .await?;
            tx.execute(&send, &[&id, &replica, &now_ms, &self.send_claim_ms()])
                .await?;
            sending = Some((now_sending(row), claimed_deal(id, deal)?));
        }
        tx.commit().await?;
        Ok((Some(Claim { decision, sending }), moved))
    }

    /// Marks a claimed row sent and moves its deal (see `Store::mark_sent`); also how
    /// many stage changes it recorded.
    pub(in crate::store) async fn mark_sent(
        &self,
        id: i64,
        message_id: &str,
        at: DateTime<Utc>,
        move_to: Option<(StageRef, DealStatus)>,
        only_from: &[StageRef],
        writeback: Option<&str>,
    ) -> Result<(bool, u64)> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        let sent = Settlement::Sent { message_id };
        if !settle_in(&tx, &OUTBOX, id, sent, at).await? {
            return Ok((false, 0));
        }
        if let Some(subject) = writeback {
            super::writeback::enqueue_in(&tx, id, subject, at).await?;
        }
        let mut moved = 0;
        if let Some((to, status)) = move_to {
            let here = tx
                .query_one(
                    "SELECT d.id, d.pipeline, d.stage FROM deals d
                     WHERE d.id = (SELECT deal_id FROM outbox WHERE id = $1) FOR UPDATE",
                    &[&id],
                )
                .await?;
            let (deal_id, pipeline, stage): (i64, Option<String>, String) =
                (here.try_get(0)?, here.try_get(1)?, here.try_get(2)?);
            let here = StageRef {
                pipeline: pipeline.map(PipelineKey::new),
                stage: StageKey::new(stage),
            };
            if only_from.contains(&here) {
                let changed =
                    move_stage(&tx, deal_id, &to, status, at, ChangeCause::Followup).await?;
                moved = u64::from(changed);
            }
        }
        tx.commit().await?;
        Ok((true, moved))
    }

    /// Puts a failed email back to `pending` (see `Store::retry_failed`).
    pub(in crate::store) async fn retry_failed(
        &self,
        id: i64,
        now: DateTime<Utc>,
    ) -> Result<RetryOutcome> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        let Some(row) = read_row(&tx, id, " FOR UPDATE").await? else {
            return Ok(RetryOutcome::NotFound);
        };
        if !retryable(&row) {
            return Ok(RetryOutcome::NotFailed(row));
        }
        // The person's suppression, as the send-time check reads it.
        if let Some(reason) = super::people::suppression_of(&tx, &row.recipient).await? {
            return Ok(RetryOutcome::Suppressed(row, reason));
        }
        tx.execute(&retry_failed_sql('$'), &[&id, &to_ms(now)])
            .await?;
        let queued = read_row(&tx, id, "").await?.ok_or_else(|| {
            StoreError::Corrupt(format!("outbox row {id} vanished while retried"))
        })?;
        tx.commit().await?;
        Ok(RetryOutcome::Queued(queued))
    }

    /// The deal of an email row (not an expiry), as stored now.
    pub(in crate::store) async fn outbox_email_deal(&self, id: i64) -> Result<Option<Deal>> {
        let sql = format!(
            "SELECT {DEAL_COLUMNS} FROM deals WHERE id =
               (SELECT deal_id FROM outbox WHERE id = $1 AND action = 'email')"
        );
        let row = self.client().await?.query_opt(&sql, &[&id]).await?;
        Ok(row.as_ref().map(deal_from).transpose()?)
    }

    /// Rows matching the filter, newest first.
    pub(in crate::store) async fn outbox(&self, filter: OutboxRowFilter) -> Result<Vec<OutboxRow>> {
        let (sql, values) = filter.query('$');
        let values = pg_values(values);
        let rows = self.client().await?.query(&sql, &params(&values)).await?;
        Ok(rows
            .iter()
            .map(outbox_row_from)
            .collect::<std::result::Result<_, _>>()?)
    }

    /// Stops the pending rows of the deals that left their rules' stages (see
    /// `Store::stop_left_rules`); (rule, rows stopped).
    pub(in crate::store) async fn stop_left_rules(
        &self,
        deal_ids: &[i64],
        active: &HashMap<String, Vec<StageRef>>,
        now: DateTime<Utc>,
    ) -> Result<Vec<(String, u64)>> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        let now_ms = to_ms(now);
        let mut stopped: HashMap<String, u64> = HashMap::new();
        let pending_rules = tx
            .prepare_cached(
                "SELECT DISTINCT rule FROM outbox WHERE deal_id = $1 AND state = 'pending'",
            )
            .await?;
        for &deal_id in deal_ids {
            let rules: Vec<String> = tx
                .query(&pending_rules, &[&deal_id])
                .await?
                .iter()
                .map(|row| row.try_get(0))
                .collect::<std::result::Result<_, _>>()?;
            if rules.is_empty() {
                continue;
            }
            let Some(deal) = read_deal(&tx, deal_id).await? else {
                continue;
            };
            for (rule, reason) in rules_left(&deal, rules, active) {
                let changed = skip_pending(&tx, deal_id, &rule, &reason, now_ms, false).await?;
                *stopped.entry(rule).or_default() += changed;
            }
        }
        tx.commit().await?;
        Ok(stopped.into_iter().collect())
    }

    /// The rule names outbox rows carry, sorted.
    pub(in crate::store) async fn outbox_rules(&self) -> Result<Vec<String>> {
        let rows = self
            .client()
            .await?
            .query("SELECT DISTINCT rule FROM outbox ORDER BY rule", &[])
            .await?;
        Ok(rows
            .iter()
            .map(|row| row.try_get(0))
            .collect::<std::result::Result<_, _>>()?)
    }

    /// Deals in a stage that entered it after `entered_after` and have no row for
    /// `rule`, oldest entry first.
    pub(in crate::store) async fn unenrolled_in_stage(
        &self,
        at: &StageRef,
        entered_after: DateTime<Utc>,
        rule: &str,
    ) -> Result<Vec<i64>> {
        let client = self.client().await?;
        let statement = client
            .prepare_cached(
                "SELECT d.id FROM deals d
                 WHERE d.pipeline = $1 AND d.stage = $2 AND d.stage_entered_at > $3
                   AND d.deleted_at IS NULL
                   AND NOT EXISTS (SELECT 1 FROM outbox o WHERE o.deal_id = d.id AND o.rule = $4)
                 ORDER BY d.stage_entered_at, d.id",
            )
            .await?;
        let rows = client
            .query(
                &statement,
                &[
                    &at.pipeline.as_ref().map(|p| pg_text(p.as_str())),
                    &pg_text(at.stage.as_str()),
                    &to_ms(entered_after),
                    &pg_text(rule),
                ],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|row| row.try_get(0))
            .collect::<std::result::Result<_, _>>()?)
    }
}

/// A deal's outbox rows, every rule, by rule and step.
async fn rows_of_deal(db: &impl GenericClient, deal_id: i64) -> Result<Vec<OutboxRow>> {
    let sql = format!("SELECT {ROW_COLUMNS} FROM outbox WHERE deal_id = $1 ORDER BY rule, step");
    let rows = db.query(&sql, &[&deal_id]).await?;
    Ok(rows
        .iter()
        .map(outbox_row_from)
        .collect::<std::result::Result<_, _>>()?)
}

#[cfg(test)]
mod tests {
    //! What only PostgreSQL has: replicas claiming from one outbox at once. The outbox's
    //! contract runs on both backends in `store::outbox`.
    use crate::domain::StepNumber;
    use crate::store::ledger::Value;
    use crate::store::ledger::test_sql::exec;
    use crate::store::outbox::{
        ClaimDecision, ClaimQuery, EnrollPlan, NewOutboxRow, OutboxAction, OutboxRowFilter,
    };
    use crate::store::postgres::test_cluster::TestDatabase;
    use crate::store::postgres::test_database;
    use crate::store::postgres::tests::url_of;
    use crate::store::tests::upsert;
    use crate::store::{OutboxState, Store};
    use chrono::{DateTime, Duration, Utc};
    use std::collections::HashSet;

    /// Two replicas (stores) on one fresh database (kept while the test runs), or
    /// `None` where PostgreSQL is not installed.
    async fn replicas(test: &str) -> Option<(TestDatabase, Store, Store)> {
        let database = test_database(test)?;
        let url = url_of(&database);
        let one = Store::open_postgres(&url).await.unwrap();
        let two = Store::open_postgres(&url).await.unwrap();
        Some((database, one, two))
    }

    /// `count` deals, each enrolled with one email due at `due` to a shopper of its own;
    /// the outbox row ids.
    async fn due_emails(store: &Store, count: usize, due: DateTime<Utc>) -> Vec<i64> {
        due_emails_to(store, count, due, |n| format!("shopper{n}@example.com")).await
    }

    /// [`due_emails`] with deal `n`'s email to `recipient(n)`.
    async fn due_emails_to(
        store: &Store,
        count: usize,
        due: DateTime<Utc>,
        recipient: impl Fn(usize) -> String,
    ) -> Vec<i64> {
        let upserts = (0..count)
            .map(|n| upsert(&format!("d{n}"), "lead", due))
            .collect();
        store.upsert_deals(upserts).await.unwrap();
        for n in 0..count {
            let deal = store
                .deal_by_external_id("crm", &format!("d{n}"))
                .await
                .unwrap()
                .unwrap();
            let row = NewOutboxRow {
                step: StepNumber::default(),
                action: OutboxAction::Email,
                due_at: due,
                state: OutboxState::Pending,
                reason: None,
            };
            let recipient = recipient(n);
            let outcome = store
                .enroll(deal.id, "carts".into(), due, due, move |_, _| {
                    EnrollPlan::Enroll {
                        recipient,
                        anchor_at: due,
                        rows: vec![row],
                        supersede: Vec::new(),
                    }
                })
                .await
                .unwrap();
            assert!(outcome.enrolled);
        }
        let rows = store.outbox(OutboxRowFilter::default()).await.unwrap();
        rows.iter().map(|row| row.id).collect()
    }

    /// Claims, to send, every due row this replica can get; the ids it got.
    async fn claim_all(store: Store, now: DateTime<Utc>) -> Vec<i64> {
        let mut mine = Vec::new();
        for (id, _) in store.outbox_due(now, 1_000).await.unwrap() {
            let claim = store
                .claim(id, now, ClaimQuery::default(), |_| ClaimDecision::Send)
                .await
                .unwrap();
            if let Some(claim) = claim {
                let (row, _) = claim.sending.expect("a send");
                assert_eq!(row.id, id);
                mine.push(id);
            }
        }
        mine
    }

    /// Claims every due row with a cap of one email per recipient a day; the ids sent.
    async fn claim_capped(store: Store, now: DateTime<Utc>) -> Vec<i64> {
        let query = ClaimQuery {
            cap_window: Some(std::time::Duration::from_secs(86_400)),
            ..ClaimQuery::default()
        };
        let mut sent = Vec::new();
        for (id, _) in store.outbox_due(now, 1_000).await.unwrap() {
            let claim = store
                .claim(id, now, query.clone(), |facts| {
                    if facts.recent_to_recipient.0 >= 1 {
                        ClaimDecision::Skip("cap".into())
                    } else {
                        ClaimDecision::Send
                    }
                })
                .await
                .unwrap();
            if claim.is_some_and(|claim| claim.decision == ClaimDecision::Send) {
                sent.push(id);
            }
        }
        sent
    }

    /// Twenty emails due to one address, two replicas claiming at once under a cap of
    /// one a day: one is sent in all (each claim counts under a lock on the address;
    /// without it both replicas count none and both send).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_frequency_cap_holds_across_replicas_claiming_at_once() {
        let Some((_database, one, two)) =
            replicas("the_frequency_cap_holds_across_replicas_claiming_at_once").await
        else {
            return;
        };
        let now = Utc::now();
        due_emails_to(&one, 20, now - Duration::minutes(1), |_| {
            "ada@example.com".to_owned()
        })
        .await;
        let (a, b) = tokio::join!(
            tokio::spawn(claim_capped(one.clone(), now)),
            tokio::spawn(claim_capped(two.clone(), now)),
        );
        let sent = a.unwrap().len() + b.unwrap().len();
        assert_eq!(sent, 1, "one email to the address in all");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn two_replicas_claiming_the_due_outbox_at_once_get_each_row_exactly_once() {
        let Some((_database, one, two)) =
            replicas("two_replicas_claiming_the_due_outbox_at_once_get_each_row_exactly_once")
                .await
        else {
            return;
        };
        let now = Utc::now();
        let all: HashSet<i64> = due_emails(&one, 60, now - Duration::minutes(1))
            .await
            .into_iter()
            .collect();
        for round in 0..3 {
            let (a, b) = tokio::join!(
                tokio::spawn(claim_all(one.clone(), now)),
                tokio::spawn(claim_all(two.clone(), now)),
            );
            let (a, b) = (a.unwrap(), b.unwrap());
            let (a_set, b_set): (HashSet<i64>, HashSet<i64>) =
                (a.iter().copied().collect(), b.iter().copied().collect());
            if round == 0 {
                assert!(a_set.is_disjoint(&b_set), "a row claimed by both replicas");
                assert_eq!(a.len() + b.len(), all.len());
                assert_eq!(&a_set | &b_set, all);
            } else {
                assert!(a.is_empty() && b.is_empty(), "a row claimed again");
            }
        }
        let rows = two.outbox(OutboxRowFilter::default()).await.unwrap();
        assert!(rows.iter().all(|row| row.state == OutboxState::Sending));
        assert!(rows.iter().all(|row| row.attempts == 1));
    }

    #[tokio::test]
    async fn a_start_up_leaves_another_replicas_send_in_flight_and_takes_an_expired_one() {
        let Some((_database, one, two)) =
            replicas("a_start_up_leaves_another_replicas_send_in_flight_and_takes_an_expired_one")
                .await
        else {
            return;
        };
        let now = Utc::now();
        let ids = due_emails(&one, 2, now - Duration::minutes(1)).await;
        assert_eq!(claim_all(one.clone(), now).await.len(), 2);
        // The second replica starts while the first is sending both: nothing is its.
        assert_eq!(two.outbox_recover_interrupted(now).await.unwrap(), 0);
        // The first replica's claim on one of them expires (it died mid-send).
        exec(
            &two,
            "UPDATE outbox SET claimed_until = now() - interval '1 second' WHERE id = ?1",
            vec![Value::Int(ids[0])],
        )
        .await;
        assert_eq!(two.outbox_recover_interrupted(now).await.unwrap(), 1);
        let states: Vec<(i64, OutboxState)> = two
            .outbox(OutboxRowFilter::default())
            .await
            .unwrap()
            .iter()
            .map(|row| (row.id, row.state))
            .collect();
        assert!(
            states.contains(&(ids[0], OutboxState::Uncertain)),
            "{states:?}"
        );
        assert!(
            states.contains(&(ids[1], OutboxState::Sending)),
            "{states:?}"
        );
        // The live sender still records its answer; the lost one is never resent.
        assert!(
            one.mark_sent(ids[1], "<m@x>".into(), now, None, Vec::new(), None)
                .await
                .unwrap()
        );
        assert!(one.outbox_due(now, 10).await.unwrap().is_empty());
    }
}
