//! The outbox: one row per (deal, rule, step), the durable ledger of follow-ups.
//!
//! Invariants:
//! - `UNIQUE (deal_id, rule, step)`: a step exists once, whatever enrolls it twice.
//! - A row is claimed (`pending` → `sending`) in a write transaction that also re-reads
//!   the deal, the suppression list, orders from the same customer and the
//!   recipient's recent sends; the caller's decision is applied in that same
//!   transaction, so nothing can change between the check and the claim.
//! - `sending` is committed before the message is handed to SMTP. A row found in
//!   `sending` at start-up was interrupted between hand-off and acknowledgement: it
//!   becomes `uncertain` and is never sent again (at most once, not at least once).
//! - Marking a row sent and moving the cart it advances commit together.

use super::deals::{Columns, DEAL_COLUMNS, deal_from_row, move_stage};
use super::ledger::{OUTBOX, OutboxState, Settlement, Value};
use super::people::OpenElsewhere;
use super::{Result, Store, StoreError, from_ms, to_ms};
use crate::domain::people::person_key;
use crate::domain::{ChangeCause, Deal, DealStatus, PipelineKey, StageKey, StageRef, StepNumber};
use chrono::{DateTime, Utc};
use rusqlite::{OptionalExtension, Row, Transaction, params};
use serde::Serialize;
use std::collections::HashMap;
use std::time::Duration;

/// What a row does when it comes due.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum OutboxAction {
    /// Send the step's email.
    Email,
    /// Move a deal that is still waiting to the rule's expiry stage.
    Expire,
}

impl OutboxAction {
    pub fn as_str(self) -> &'static str {
        match self {
            OutboxAction::Email => "email",
            OutboxAction::Expire => "expire",
        }
    }
}

/// One stored row.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct OutboxRow {
    pub id: i64,
    pub deal_id: i64,
    pub rule: String,
    /// The step (stored as its 0-based index, shown from 1); the expiry row comes
    /// after the last step.
    pub step: StepNumber,
    pub action: OutboxAction,
    pub recipient: String,
    pub state: OutboxState,
    pub anchor_at: DateTime<Utc>,
    pub due_at: DateTime<Utc>,
    pub next_attempt_at: DateTime<Utc>,
    pub attempts: i64,
    pub reason: Option<String>,
    pub message_id: Option<String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub sent_at: Option<DateTime<Utc>>,
}

/// The columns [`outbox_row_from`] reads, in its order.
pub(super) const ROW_COLUMNS: &str = "id, deal_id, rule, step, action, recipient, state, anchor_at,
    due_at, next_attempt_at, attempts, reason, message_id, created_at, updated_at, sent_at";

/// Reads an outbox row of either backend ([`ROW_COLUMNS`]).
pub(super) fn outbox_row_from<R: Columns>(row: &R) -> Result<OutboxRow, R::Error> {
    let action = row.text(4)?;
    let state = row.text(6)?;
    Ok(OutboxRow {
        id: row.int(0)?,
        deal_id: row.int(1)?,
        rule: row.text(2)?,
        step: StepNumber::from_index(row.int(3)?),
        action: if action == "expire" {
            OutboxAction::Expire
        } else {
            OutboxAction::Email
        },
        recipient: row.text(5)?,
        state: OutboxState::parse(&state).unwrap_or(OutboxState::Uncertain),
        anchor_at: from_ms(row.int(7)?),
        due_at: from_ms(row.int(8)?),
        next_attempt_at: from_ms(row.int(9)?),
        attempts: row.int(10)?,
        reason: row.opt_text(11)?,
        message_id: row.opt_text(12)?,
        created_at: from_ms(row.int(13)?),
        updated_at: from_ms(row.int(14)?),
        sent_at: row.opt_int(15)?.map(from_ms),
    })
}

fn row_from(row: &Row<'_>) -> rusqlite::Result<OutboxRow> {
    outbox_row_from(row)
}

/// Reads a row of the earlier-enrollments query of either backend: deal id, first
/// anchor, first creation, whether some step started, whether some step is pending.
pub(super) fn earlier_from<R: Columns>(row: &R) -> Result<EarlierEnrollment, R::Error> {
    Ok(EarlierEnrollment {
        deal_id: row.int(0)?,
        anchor_at: from_ms(row.int(1)?),
        created_at: from_ms(row.int(2)?),
        started: row.opt_bool(3)?.unwrap_or(false),
        pending: row.opt_bool(4)?.unwrap_or(false),
    })
}

/// A row to create at enrollment.
#[derive(Debug, Clone, PartialEq)]
pub struct NewOutboxRow {
    pub step: StepNumber,
    pub action: OutboxAction,
    pub due_at: DateTime<Utc>,
    /// `Pending`, or `Skipped` with a reason (a step already too late at enrollment).
    pub state: OutboxState,
    pub reason: Option<String>,
}

/// An earlier enrollment of the same recipient into the same rule.
#[derive(Debug, Clone, PartialEq)]
pub struct EarlierEnrollment {
    pub deal_id: i64,
    pub anchor_at: DateTime<Utc>,
    pub created_at: DateTime<Utc>,
    /// Some step was handed to SMTP (sent, sending or uncertain).
    pub started: bool,
    /// Some step is still pending.
    pub pending: bool,
}

/// What to do with a deal that may enter a rule.
#[derive(Debug, Clone, PartialEq)]
pub enum EnrollPlan {
    /// Not (or no longer) eligible; record nothing so a later pass may look again.
    Nothing,
    /// Create the rows; skip what is still pending of the superseded enrollments.
    Enroll {
        recipient: String,
        anchor_at: DateTime<Utc>,
        rows: Vec<NewOutboxRow>,
        supersede: Vec<i64>,
    },
    /// Record that the deal will not get this rule (one skipped row for step 0).
    Decline {
        recipient: String,
        anchor_at: DateTime<Utc>,
        reason: String,
    },
}

/// What enrolling did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct EnrollOutcome {
    pub enrolled: bool,
    pub declined: bool,
    pub superseded: u64,
}

/// The facts a send-time decision needs, read inside the claim transaction.
#[derive(Debug, Clone)]
pub struct ClaimFacts {
    pub row: OutboxRow,
    /// The deal as stored now.
    pub deal: Option<Deal>,
    /// The suppression reason, when the recipient is suppressed.
    pub suppressed: Option<String>,
    /// A won deal of the same customer in the checked pipeline since this deal started.
    pub order_since: Option<i64>,
    /// Emails claimed for this recipient (any address of the person, in any
    /// connection) within the cap window, and the oldest claim's time.
    pub recent_to_recipient: (u32, Option<DateTime<Utc>>),
    /// An open deal of the same person, in any connection, in one of the query's
    /// `skip_if_open_in` stages.
    pub open_elsewhere: Option<OpenElsewhere>,
}

/// Which facts to gather.
#[derive(Debug, Clone, Default)]
pub struct ClaimQuery {
    /// Look for orders (won deals) of the same customer in this pipeline.
    pub order_pipeline: Option<PipelineKey>,
    pub cap_window: Option<Duration>,
    /// Look for an open deal of the same person in these stages (the rule's
    /// `skip_if_open_in`).
    pub skip_if_open_in: Vec<StageRef>,
}

/// The decision about a due row.
#[derive(Debug, Clone, PartialEq)]
pub enum ClaimDecision {
    /// Claim it: `sending`.
    Send,
    /// Skip this step only.
    Skip(String),
    /// Skip this step and every pending email step of the same (deal, rule).
    Stop(String),
    /// Look again later.
    Defer {
        until: DateTime<Utc>,
        reason: String,
    },
    /// Move the deal to the expiry stage; the row is `done`.
    Expire(StageRef),
}

/// The result of a claim: the decision applied, and for `Send` the claimed row and deal.
#[derive(Debug, Clone)]
pub struct Claim {
    pub decision: ClaimDecision,
    pub sending: Option<(OutboxRow, Deal)>,
}

/// Filters for listing the outbox.
#[derive(Debug, Clone, Default)]
pub struct OutboxRowFilter {
    pub state: Option<OutboxState>,
    pub rule: Option<String>,
    pub deal_id: Option<i64>,
    pub limit: Option<u32>,
}

impl OutboxRowFilter {
    /// The listing query of this filter for a backend whose numbered placeholders start
    /// with `sigil`, and its parameters in order.
    pub(super) fn query(self, sigil: char) -> (String, Vec<Value<'static>>) {
        let mut sql = format!("SELECT {ROW_COLUMNS} FROM outbox WHERE 1 = 1");
        let mut values = Vec::new();
        if let Some(state) = self.state {
            values.push(Value::Text(state.as_str()));
            sql.push_str(&format!(" AND state = {sigil}{}", values.len()));
        }
        if let Some(rule) = self.rule {
            values.push(Value::Owned(rule));
            sql.push_str(&format!(" AND rule = {sigil}{}", values.len()));
        }
        if let Some(deal_id) = self.deal_id {
            values.push(Value::Int(deal_id));
            sql.push_str(&format!(" AND deal_id = {sigil}{}", values.len()));
        }
        sql.push_str(" ORDER BY due_at DESC, id DESC");
        if let Some(limit) = self.limit {
            sql.push_str(&format!(" LIMIT {limit}"));
        }
        (sql, values)
    }
}

/// What asking to send a failed email again did.
#[derive(Debug, Clone, PartialEq)]
pub enum RetryOutcome {
    /// Back to `pending`, due now, its attempts counted afresh.
    Queued(OutboxRow),
    /// Only failed emails are retried; this row is in another state (or is an expiry).
    NotFailed(OutboxRow),
    /// The recipient is suppressed (the reason): a retry would only be skipped. Nothing
    /// changed.
    Suppressed(OutboxRow, String),
    NotFound,
}

fn read_row(tx: &rusqlite::Connection, id: i64) -> Result<Option<OutboxRow>> {
    let sql = format!("SELECT {ROW_COLUMNS} FROM outbox WHERE id = ?1");
    Ok(tx.query_row(&sql, [id], row_from).optional()?)
}

fn read_deal(tx: &rusqlite::Connection, id: i64) -> Result<Option<Deal>> {
    let sql = format!("SELECT {DEAL_COLUMNS} FROM deals WHERE id = ?1");
    Ok(tx.query_row(&sql, [id], deal_from_row).optional()?)
}

fn earlier_enrollments(
    tx: &rusqlite::Connection,
    rule: &str,
    recipient: &str,
    since: i64,
    except_deal: i64,
) -> Result<Vec<EarlierEnrollment>> {
    let mut statement = tx.prepare_cached(
        "SELECT deal_id, min(anchor_at), min(created_at),
                max(state IN ('sent', 'sending', 'uncertain')), max(state = 'pending')
         FROM outbox WHERE rule = ?1 AND created_at >= ?3 AND deal_id != ?4
           AND (recipient = ?2
                OR recipient IN (SELECT contact_email FROM deals WHERE person_key = ?5))
         GROUP BY deal_id",
    )?;
    let person = person_key(recipient);
    let rows = statement.query_map(
        params![rule, recipient, since, except_deal, person],
        |row| earlier_from(row),
    )?;
    Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
}

/// Reads the facts a send-time decision needs about `row` (in the claim transaction,
/// or on a reader for an explanation: one query for both, so they cannot differ).
fn read_claim_facts(
    db: &rusqlite::Connection,
    row: OutboxRow,
    query: &ClaimQuery,
    now_ms: i64,
) -> Result<ClaimFacts> {
    let deal = read_deal(db, row.deal_id)?;
    let suppressed = if row.recipient.is_empty() {
        None
    } else {
        super::people::suppression_of(db, &row.recipient)?
    };
    // (`store::postgres::outbox` reads the same facts, deciding what to read alike.)
    let order_since = match OrderLookup::of(query, deal.as_ref()) {
        Some(order) => db
            .prepare_cached(ORDER_SINCE_SQL)?
            .query_row(
                params![
                    order.person,
                    order.pipeline,
                    order.deal_id,
                    order.started_ms
                ],
                |r| r.get(0),
            )
            .optional()?,
        None => None,
    };
    let recent_to_recipient = match cap_since(query, &row, now_ms) {
        Some(since) => db
            .prepare_cached(super::people::RECENT_TO_PERSON_SQL)?
            .query_row(
                params![row.recipient, since, person_key(&row.recipient)],
                |r| {
                    Ok((
                        r.get::<_, i64>(0)? as u32,
                        r.get::<_, Option<i64>>(1)?.map(from_ms),
                    ))
                },
            )?,
        _ => (0, None),
    };
    let open_elsewhere = match OpenLookup::of(query, deal.as_ref()) {
        Some(open) => super::people::open_elsewhere(db, &open.person, open.deal_id, open.stages)?,
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

/// The order lookup of a claim's facts ([`OrderLookup`]): `?1` the person key.
pub(super) const ORDER_SINCE_SQL: &str = "SELECT id FROM deals
     WHERE person_key = ?1 AND pipeline = ?2
       AND status = 'won' AND id != ?3 AND stage_entered_at >= ?4
     LIMIT 1";

/// The order lookup of a claim's facts: a won deal of the same person (in any
/// connection) in the checked pipeline, other than the deal, that entered its stage
/// since the deal started.
pub(super) struct OrderLookup<'a> {
    pub(super) person: String,
    pub(super) pipeline: &'a str,
    pub(super) deal_id: i64,
    pub(super) started_ms: i64,
}

impl<'a> OrderLookup<'a> {
    /// What to look for, when the query asks for orders and the deal has a contact.
    pub(super) fn of(query: &'a ClaimQuery, deal: Option<&'a Deal>) -> Option<Self> {
        let pipeline = query.order_pipeline.as_ref()?;
        let deal = deal?;
        let person = person_key(deal.contact_email.as_ref()?.as_str())?;
        Some(OrderLookup {
            person,
            pipeline: pipeline.as_str(),
            deal_id: deal.id,
            started_ms: to_ms(deal.created_at.unwrap_or(deal.first_seen_at)),
        })
    }
}

/// The `skip_if_open_in` lookup of a claim's facts: an open deal of the same person
/// in one of the rule's stages.
pub(super) struct OpenLookup<'a> {
    pub(super) person: String,
    pub(super) deal_id: i64,
    pub(super) stages: &'a [StageRef],
}

impl<'a> OpenLookup<'a> {
    /// What to look for, when the rule names stages and the deal has a person.
    pub(super) fn of(query: &'a ClaimQuery, deal: Option<&'a Deal>) -> Option<Self> {
        if query.skip_if_open_in.is_empty() {
            return None;
        }
        let deal = deal?;
        Some(OpenLookup {
            person: person_key(deal.contact_email.as_ref()?.as_str())?,
            deal_id: deal.id,
            stages: &query.skip_if_open_in,
        })
    }
}

/// Since when (ms) the per-recipient cap counts claims, when the query has a cap and
/// the row a recipient.
pub(super) fn cap_since(query: &ClaimQuery, row: &OutboxRow, now_ms: i64) -> Option<i64> {
    match query.cap_window {
        Some(window) if !row.recipient.is_empty() => Some(now_ms - window.as_millis() as i64),
        _ => None,
    }
}

/// The one row a declined enrollment records: step 0, skipped with the reason.
pub(super) fn decline_row(reason: String, now_ms: i64) -> NewOutboxRow {
    NewOutboxRow {
        step: StepNumber::default(),
        action: OutboxAction::Email,
        due_at: from_ms(now_ms),
        state: OutboxState::Skipped,
        reason: Some(reason),
    }
}

/// Why an older deal's pending rows were skipped at a newer deal's enrollment.
pub(super) fn superseded_reason(newer_deal: i64) -> String {
    format!("superseded by the newer deal {newer_deal}")
}

/// Why the rest of a sequence was skipped after a `Stop`.
pub(super) fn stopped_reason(reason: &str) -> String {
    format!("sequence stopped: {reason}")
}

/// What an expiry row records once it moved the deal.
pub(super) fn expired_reason(to: &StageRef) -> String {
    format!("moved to {}", describe(to))
}

/// The claimed row as it is once `sending`.
pub(super) fn now_sending(mut row: OutboxRow) -> OutboxRow {
    row.state = OutboxState::Sending;
    row.attempts += 1;
    row
}

/// The deal of a row claimed to send; a claimed row without its deal is corrupt data.
pub(super) fn claimed_deal(id: i64, deal: Option<Deal>) -> Result<Deal> {
    deal.ok_or_else(|| StoreError::Corrupt(format!("outbox row {id} claimed without its deal")))
}

/// Whether `retry_failed` may queue `row` again: only a failed email.
pub(super) fn retryable(row: &OutboxRow) -> bool {
    row.state == OutboxState::Failed && row.action == OutboxAction::Email
}

/// The rules among `rules` (those with pending rows of the deal) whose active stages
/// no longer hold the deal, each with the reason its rows stop; a rule without stages
/// in `active` is not judged.
pub(super) fn rules_left(
    deal: &Deal,
    rules: Vec<String>,
    active: &HashMap<String, Vec<StageRef>>,
) -> Vec<(String, String)> {
    let here = StageRef {
        pipeline: deal.pipeline.clone(),
        stage: deal.stage.clone(),
    };
    rules
        .into_iter()
        .filter(|rule| {
            active
                .get(rule)
                .is_some_and(|stages| !stages.contains(&here))
        })
        .map(|rule| {
            let reason = format!(
                "sequence stopped: the deal left the rule's stages (now in {})",
                describe(&here)
            );
            (rule, reason)
        })
        .collect()
}

fn insert_row(
    tx: &Transaction<'_>,
    deal_id: i64,
    rule: &str,
    recipient: &str,
    anchor_at: i64,
    row: &NewOutboxRow,
    now: i64,
) -> Result<()> {
    let mut statement = tx.prepare_cached(
        "INSERT OR IGNORE INTO outbox (deal_id, rule, step, action, recipient, state, anchor_at,
            due_at, next_attempt_at, reason, created_at, updated_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?8, ?9, ?10, ?10)",
    )?;
    statement.execute(params![
        deal_id,
        rule,
        row.step.index() as i64,
        row.action.as_str(),
        recipient,
        row.state.as_str(),
        anchor_at,
        to_ms(row.due_at),
        row.reason,
        now,
    ])?;
    Ok(())
}

/// Skips the pending email steps of (deal, rule).
fn stop_sequence(
    tx: &Transaction<'_>,
    deal_id: i64,
    rule: &str,
    reason: &str,
    now: i64,
) -> Result<()> {
    tx.execute(
        "UPDATE outbox SET state = 'skipped', reason = ?3, updated_at = ?4
         WHERE deal_id = ?1 AND rule = ?2 AND state = 'pending' AND action = 'email'",
        params![deal_id, rule, reason, now],
    )?;
    Ok(())
}

/// Read access to the facts enrollment and the send-time decision look at, through the
/// same queries (`followup::explain` asks them without changing anything).
pub struct FollowupFacts<'a> {
    reads: &'a dyn FollowupReads,
}

/// The two reads behind [`FollowupFacts`], on a backend's snapshot.
pub(super) trait FollowupReads {
    fn earlier_enrollments(
        &self,
        rule: &str,
        recipient: &str,
        since_ms: i64,
        except_deal: i64,
    ) -> Result<Vec<EarlierEnrollment>>;

    fn claim_facts(&self, row: OutboxRow, query: &ClaimQuery, now_ms: i64) -> Result<ClaimFacts>;
}

impl FollowupReads for rusqlite::Connection {
    fn earlier_enrollments(
        &self,
        rule: &str,
        recipient: &str,
        since_ms: i64,
        except_deal: i64,
    ) -> Result<Vec<EarlierEnrollment>> {
        earlier_enrollments(self, rule, recipient, since_ms, except_deal)
    }

    fn claim_facts(&self, row: OutboxRow, query: &ClaimQuery, now_ms: i64) -> Result<ClaimFacts> {
        read_claim_facts(self, row, query, now_ms)
    }
}

impl<'a> FollowupFacts<'a> {
    pub(super) fn new(reads: &'a dyn FollowupReads) -> Self {
        FollowupFacts { reads }
    }

    /// The recipient's enrollments into `rule` created since `since`, other than
    /// `except_deal`'s: what `Store::enroll` hands to its plan.
    pub fn earlier_enrollments(
        &self,
        rule: &str,
        recipient: &str,
        since: DateTime<Utc>,
        except_deal: i64,
    ) -> Result<Vec<EarlierEnrollment>> {
        self.reads
            .earlier_enrollments(rule, recipient, to_ms(since), except_deal)
    }

    /// What `Store::claim` would read about `row` at `now`.
    pub fn claim_facts(
        &self,
        row: OutboxRow,
        query: &ClaimQuery,
        now: DateTime<Utc>,
    ) -> Result<ClaimFacts> {
        self.reads.claim_facts(row, query, to_ms(now))
    }
}

impl Store {
    /// Runs `f` on a deal, its outbox rows (every rule, by rule and step) and the
    /// follow-up facts, in one read transaction (one snapshot); `None` when there is no
    /// such deal. Writes nothing.
    pub async fn with_followup_facts<T, F>(&self, deal_id: i64, f: F) -> Result<Option<T>>
    where
        T: Send + 'static,
        F: FnOnce(&Deal, &[OutboxRow], &FollowupFacts<'_>) -> Result<T> + Send + 'static,
    {
        if let Some(database) = self.postgres() {
            return database
                .with_followup_facts(deal_id, f)
                .await
                .map_err(|error| database.named(error));
        }
        self.read(move |db| {
            let snapshot = db.unchecked_transaction()?;
            let Some(deal) = read_deal(&snapshot, deal_id)? else {
                return Ok(None);
            };
            let sql =
                format!("SELECT {ROW_COLUMNS} FROM outbox WHERE deal_id = ?1 ORDER BY rule, step");
            let rows = snapshot
                .prepare(&sql)?
                .query_map([deal_id], row_from)?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            let value = f(&deal, &rows, &FollowupFacts::new(&*snapshot))?;
            snapshot.finish()?;
            Ok(Some(value))
        })
        .await
    }

    /// Enrolls a deal into a rule in one transaction: re-reads the deal, looks up the
    /// recipient's earlier enrollments (since `history_since`) through `plan`, and
    /// applies the plan. Does nothing when the deal already has rows for the rule.
    pub async fn enroll<F>(
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
        if let Some(database) = self.postgres() {
            return database
                .enroll(deal_id, rule, history_since, now, plan)
                .await
                .map_err(|error| database.named(error));
        }
        self.write(move |tx| {
            let exists: bool = tx
                .prepare_cached("SELECT 1 FROM outbox WHERE deal_id = ?1 AND rule = ?2 LIMIT 1")?
                .exists(params![deal_id, rule])?;
            if exists {
                return Ok(EnrollOutcome::default());
            }
            let Some(deal) = read_deal(tx, deal_id)? else {
                return Ok(EnrollOutcome::default());
            };
            let since = to_ms(history_since);
            let mut lookup =
                |recipient: &str| earlier_enrollments(tx, &rule, recipient, since, deal_id);
            let plan = plan(&deal, &mut lookup);
            let now = to_ms(now);
            let mut outcome = EnrollOutcome::default();
            match plan {
                EnrollPlan::Nothing => {}
                EnrollPlan::Decline {
                    recipient,
                    anchor_at,
                    reason,
                } => {
                    let row = decline_row(reason, now);
                    insert_row(tx, deal_id, &rule, &recipient, to_ms(anchor_at), &row, now)?;
                    outcome.declined = true;
                }
                EnrollPlan::Enroll {
                    recipient,
                    anchor_at,
                    rows,
                    supersede,
                } => {
                    for old in supersede {
                        let reason = superseded_reason(deal_id);
                        // The expiry row goes too: the newer deal's sequence owns the shopper.
                        outcome.superseded += tx.execute(
                            "UPDATE outbox SET state = 'skipped', reason = ?3, updated_at = ?4
                             WHERE deal_id = ?1 AND rule = ?2 AND state = 'pending'",
                            params![old, rule, reason, now],
                        )? as u64;
                    }
                    for row in &rows {
                        insert_row(tx, deal_id, &rule, &recipient, to_ms(anchor_at), row, now)?;
                    }
                    outcome.enrolled = true;
                }
            }
            Ok(outcome)
        })
        .await
    }

    /// Claims a due row: gathers the facts, lets `decide` choose, applies the choice.
    pub async fn claim<F>(
        &self,
        id: i64,
        now: DateTime<Utc>,
        query: ClaimQuery,
        decide: F,
    ) -> Result<Option<Claim>>
    where
        F: FnOnce(&ClaimFacts) -> ClaimDecision + Send + 'static,
    {
        if let Some(database) = self.postgres() {
            let (claim, moved) = database
                .claim_outbox(id, now, query, decide, self.replica().unwrap_or_default())
                .await
                .map_err(|error| database.named(error))?;
            self.note_stage_changes(moved);
            return Ok(claim);
        }
        self.write(move |tx| {
            let Some(row) = read_row(tx, id)? else {
                return Ok(None);
            };
            if row.state != OutboxState::Pending {
                return Ok(None);
            }
            let now_ms = to_ms(now);
            let facts = read_claim_facts(tx, row, &query, now_ms)?;
            let decision = decide(&facts);
            let ClaimFacts { row, deal, .. } = facts;
            let mut sending = None;
            match &decision {
                ClaimDecision::Send => {
                    OUTBOX.mark_sending(tx, id, now_ms, ", claimed_at = ?2", &[])?;
                    sending = Some((now_sending(row), claimed_deal(id, deal)?));
                }
                ClaimDecision::Skip(reason) => {
                    OUTBOX.skip(tx, id, reason, now_ms)?;
                }
                ClaimDecision::Stop(reason) => {
                    OUTBOX.skip(tx, id, reason, now_ms)?;
                    stop_sequence(tx, row.deal_id, &row.rule, &stopped_reason(reason), now_ms)?;
                }
                ClaimDecision::Defer { until, reason } => {
                    tx.execute(
                        "UPDATE outbox SET next_attempt_at = ?2, reason = ?3, updated_at = ?4
                         WHERE id = ?1",
                        params![id, to_ms(*until), reason, now_ms],
                    )?;
                }
                ClaimDecision::Expire(to) => {
                    move_stage(
                        tx,
                        row.deal_id,
                        to,
                        DealStatus::Lost,
                        now,
                        ChangeCause::Followup,
                    )?;
                    tx.execute(
                        "UPDATE outbox SET state = 'done', reason = ?2, updated_at = ?3,
                            sent_at = ?3
                         WHERE id = ?1",
                        params![id, expired_reason(to), now_ms],
                    )?;
                }
            }
            Ok(Some(Claim { decision, sending }))
        })
        .await
    }

    /// Marks a claimed row sent and, in the same transaction, moves the deal to
    /// `move_to` if it is still in one of `only_from` (an order that arrived during
    /// the send must not be overwritten). `writeback` (the email's subject) queues the
    /// email's CRM write-back in that transaction too (`store::writeback`).
    pub async fn mark_sent(
        &self,
        id: i64,
        message_id: String,
        at: DateTime<Utc>,
        move_to: Option<(StageRef, DealStatus)>,
        only_from: Vec<StageRef>,
        writeback: Option<String>,
    ) -> Result<bool> {
        if let Some(database) = self.postgres() {
            let (sent, moved) = database
                .mark_sent(
                    id,
                    &message_id,
                    at,
                    move_to,
                    &only_from,
                    writeback.as_deref(),
                )
                .await
                .map_err(|error| database.named(error))?;
            self.note_stage_changes(moved);
            return Ok(sent);
        }
        self.write(move |tx| {
            let sent = Settlement::Sent {
                message_id: &message_id,
            };
            if !OUTBOX.settle(tx, id, sent, at)? {
                return Ok(false);
            }
            if let Some(subject) = &writeback {
                super::writeback::enqueue_in(tx, id, subject, at)?;
            }
            if let Some((to, status)) = move_to {
                let deal_id: i64 =
                    tx.query_row("SELECT deal_id FROM outbox WHERE id = ?1", [id], |r| {
                        r.get(0)
                    })?;
                let (pipeline, stage): (Option<String>, String) = tx.query_row(
                    "SELECT pipeline, stage FROM deals WHERE id = ?1",
                    [deal_id],
                    |r| Ok((r.get(0)?, r.get(1)?)),
                )?;
                let here = StageRef {
                    pipeline: pipeline.map(PipelineKey::new),
                    stage: StageKey::new(stage),
                };
                if only_from.contains(&here) {
                    move_stage(tx, deal_id, &to, status, at, ChangeCause::Followup)?;
                }
            }
            Ok(true)
        })
        .await
    }

    /// Puts a `failed` email back to `pending`, due at `now`, with its attempts reset,
    /// so the worker claims it at its next pass (re-checking everything as for any
    /// due row) and sends it once. One transaction; any other state is left alone.
    pub async fn retry_failed(&self, id: i64, now: DateTime<Utc>) -> Result<RetryOutcome> {
        if let Some(database) = self.postgres() {
            return database
                .retry_failed(id, now)
                .await
                .map_err(|error| database.named(error));
        }
        self.write(move |tx| {
            let Some(row) = read_row(tx, id)? else {
                return Ok(RetryOutcome::NotFound);
            };
            if !retryable(&row) {
                return Ok(RetryOutcome::NotFailed(row));
            }
            // The person's suppression, as the send-time check reads it.
            if let Some(reason) = super::people::suppression_of(tx, &row.recipient)? {
                return Ok(RetryOutcome::Suppressed(row, reason));
            }
            let now_ms = to_ms(now);
            tx.execute(&retry_failed_sql('?'), params![id, now_ms])?;
            Ok(RetryOutcome::Queued(read_row(tx, id)?.ok_or_else(
                || StoreError::Corrupt(format!("outbox row {id} vanished while retried")),
            )?))
        })
        .await
    }

    /// Records a dry-run render: the row is skipped with the message id it would have had.
    pub async fn mark_dry_run(&self, id: i64, message_id: String, at: DateTime<Utc>) -> Result<()> {
        if let Some(database) = self.postgres() {
            let dry_run = Settlement::DryRun {
                message_id: &message_id,
            };
            return database
                .settle(&OUTBOX, id, dry_run, at)
                .await
                .map(drop)
                .map_err(|error| database.named(error));
        }
        self.write(move |tx| {
            let dry_run = Settlement::DryRun {
                message_id: &message_id,
            };
            OUTBOX.settle(tx, id, dry_run, at)?;
            Ok(())
        })
        .await
    }

    /// Returns a claimed row to `pending` for a retry at `next_attempt_at`.
    pub async fn mark_retry(
        &self,
        id: i64,
        next_attempt_at: DateTime<Utc>,
        reason: String,
        at: DateTime<Utc>,
    ) -> Result<()> {
        if let Some(database) = self.postgres() {
            let retry = Settlement::Retry {
                next_attempt_at,
                reason: &reason,
            };
            return database
                .settle(&OUTBOX, id, retry, at)
                .await
                .map(drop)
                .map_err(|error| database.named(error));
        }
        self.write(move |tx| {
            let retry = Settlement::Retry {
                next_attempt_at,
                reason: &reason,
            };
            OUTBOX.settle(tx, id, retry, at)?;
            Ok(())
        })
        .await
    }

    /// Marks a claimed row `uncertain`: the server may have accepted the message (the
    /// connection failed after the hand-off), so it is never resent.
    pub async fn mark_uncertain(&self, id: i64, reason: String, at: DateTime<Utc>) -> Result<()> {
        if let Some(database) = self.postgres() {
            let uncertain = Settlement::Uncertain { reason: &reason };
            return database
                .settle(&OUTBOX, id, uncertain, at)
                .await
                .map(drop)
                .map_err(|error| database.named(error));
        }
        self.write(move |tx| {
            OUTBOX.settle(tx, id, Settlement::Uncertain { reason: &reason }, at)?;
            Ok(())
        })
        .await
    }

    /// Marks a claimed row failed; a hard bounce also suppresses the address, in the
    /// same transaction.
    pub async fn mark_failed(
        &self,
        id: i64,
        reason: String,
        suppress: Option<String>,
        at: DateTime<Utc>,
    ) -> Result<()> {
        if let Some(database) = self.postgres() {
            let failed = Settlement::Failed { reason: &reason };
            let suppress = suppress.as_deref().map(|email| (email, reason.as_str()));
            return database
                .settle_and_suppress(&OUTBOX, id, failed, suppress, at)
                .await
                .map(drop)
                .map_err(|error| database.named(error));
        }
        self.write(move |tx| {
            OUTBOX.settle(tx, id, Settlement::Failed { reason: &reason }, at)?;
            if let Some(email) = suppress {
                super::suppression::insert(tx, &email, "hard bounce", Some(&reason), at)?;
            }
            Ok(())
        })
        .await
    }

    /// At start-up: every outbox or digest row left in `sending` by a crash becomes
    /// `uncertain`. Returns how many.
    pub async fn outbox_recover_interrupted(&self, at: DateTime<Utc>) -> Result<u64> {
        if let Some(database) = self.postgres() {
            return database
                .recover_interrupted(&[&OUTBOX, &super::ledger::DIGESTS], at)
                .await
                .map_err(|error| database.named(error));
        }
        self.write(move |tx| {
            let outbox = OUTBOX.recover_interrupted(tx, at)?;
            let digests = super::ledger::DIGESTS.recover_interrupted(tx, at)?;
            Ok(outbox + digests)
        })
        .await
    }

    /// Pending rows due by `now`, earliest first: (id, rule). Uses the partial index
    /// on pending rows, so its cost follows the due set, not the table.
    pub async fn outbox_due(&self, now: DateTime<Utc>, limit: u32) -> Result<Vec<(i64, String)>> {
        if let Some(database) = self.postgres() {
            return database
                .due(&OUTBOX, now, limit)
                .await
                .map_err(|error| database.named(error));
        }
        self.read(move |db| OUTBOX.due(db, now, limit)).await
    }

    /// The deal of an email row (not an expiry), as stored now.
    pub async fn outbox_email_deal(&self, id: i64) -> Result<Option<Deal>> {
        if let Some(database) = self.postgres() {
            return database
                .outbox_email_deal(id)
                .await
                .map_err(|error| database.named(error));
        }
        self.read(move |db| {
            let sql = format!(
                "SELECT {DEAL_COLUMNS} FROM deals WHERE id =
                   (SELECT deal_id FROM outbox WHERE id = ?1 AND action = 'email')"
            );
            Ok(db.query_row(&sql, [id], deal_from_row).optional()?)
        })
        .await
    }

    /// When the next pending row comes due.
    pub async fn outbox_next_due(&self) -> Result<Option<DateTime<Utc>>> {
        if let Some(database) = self.postgres() {
            return database
                .next_due(&OUTBOX)
                .await
                .map_err(|error| database.named(error));
        }
        self.read(|db| OUTBOX.next_due(db)).await
    }

    /// Rows matching the filter, newest first.
    pub async fn outbox(&self, filter: OutboxRowFilter) -> Result<Vec<OutboxRow>> {
        if let Some(database) = self.postgres() {
            return database
                .outbox(filter)
                .await
                .map_err(|error| database.named(error));
        }
        self.read(move |db| {
            let (sql, values) = filter.query('?');
            let mut statement = db.prepare(&sql)?;
            let rows = statement.query_map(rusqlite::params_from_iter(values), row_from)?;
            Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
        })
        .await
    }

    /// Stops, at once, the pending rows (emails and expiry) of each deal in `deal_ids`
    /// whose current stage is no longer one of its rule's `active` stages: what the
    /// send-time check would decide once each falls due, known now, so the outbox
    /// shows it. Returns (rule, rows stopped) for each rule that stopped rows.
    pub async fn stop_left_rules(
        &self,
        deal_ids: Vec<i64>,
        active: HashMap<String, Vec<StageRef>>,
        now: DateTime<Utc>,
    ) -> Result<Vec<(String, u64)>> {
        if deal_ids.is_empty() || active.is_empty() {
            return Ok(Vec::new());
        }
        if let Some(database) = self.postgres() {
            return database
                .stop_left_rules(&deal_ids, &active, now)
                .await
                .map_err(|error| database.named(error));
        }
        self.write(move |tx| {
            let now = to_ms(now);
            let mut stopped: HashMap<String, u64> = HashMap::new();
            for deal_id in deal_ids {
                let rules: Vec<String> = tx
                    .prepare_cached(
                        "SELECT DISTINCT rule FROM outbox WHERE deal_id = ?1 AND state = 'pending'",
                    )?
                    .query_map([deal_id], |r| r.get(0))?
                    .collect::<rusqlite::Result<_>>()?;
                if rules.is_empty() {
                    continue;
                }
                let Some(deal) = read_deal(tx, deal_id)? else {
                    continue;
                };
                for (rule, reason) in rules_left(&deal, rules, &active) {
                    let changed = tx.execute(
                        "UPDATE outbox SET state = 'skipped', reason = ?3, updated_at = ?4
                         WHERE deal_id = ?1 AND rule = ?2 AND state = 'pending'",
                        params![deal_id, rule, reason, now],
                    )?;
                    *stopped.entry(rule).or_default() += changed as u64;
                }
            }
            Ok(stopped.into_iter().collect())
        })
        .await
    }

    /// The rule names outbox rows carry, sorted (rules since removed included).
    pub async fn outbox_rules(&self) -> Result<Vec<String>> {
        if let Some(database) = self.postgres() {
            return database
                .outbox_rules()
                .await
                .map_err(|error| database.named(error));
        }
        self.read(|db| {
            let mut statement = db.prepare("SELECT DISTINCT rule FROM outbox ORDER BY rule")?;
            let rows = statement.query_map([], |r| r.get(0))?;
            Ok(rows.collect::<rusqlite::Result<Vec<String>>>()?)
        })
        .await
    }

    /// Deals in a stage that entered it after `entered_after` and have no row for
    /// `rule`, oldest entry first. An index range on (pipeline, stage, stage_entered_at).
    pub async fn unenrolled_in_stage(
        &self,
        at: StageRef,
        entered_after: DateTime<Utc>,
        rule: String,
    ) -> Result<Vec<i64>> {
        if let Some(database) = self.postgres() {
            return database
                .unenrolled_in_stage(&at, entered_after, &rule)
                .await
                .map_err(|error| database.named(error));
        }
        self.read(move |db| {
            let mut statement = db.prepare_cached(
                "SELECT d.id FROM deals d
                 WHERE d.pipeline = ?1 AND d.stage = ?2 AND d.stage_entered_at > ?3
                   AND d.deleted_at IS NULL
                   AND NOT EXISTS (SELECT 1 FROM outbox o WHERE o.deal_id = d.id AND o.rule = ?4)
                 ORDER BY d.stage_entered_at, d.id",
            )?;
            let rows = statement.query_map(
                params![
                    at.pipeline.as_ref().map(|p| p.as_str()),
                    at.stage.as_str(),
                    to_ms(entered_after),
                    rule
                ],
                |r| r.get(0),
            )?;
            Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
        })
        .await
    }
}

/// Failed row `{sigil}1` back to `pending`, due at `{sigil}2` (ms), attempts reset.
pub(super) fn retry_failed_sql(sigil: char) -> String {
    format!(
        "UPDATE outbox SET state = 'pending', next_attempt_at = {sigil}2, attempts = 0,
            claimed_at = NULL, updated_at = {sigil}2,
            reason = 'retry asked by an operator after: ' || coalesce(reason, 'a failure')
         WHERE id = {sigil}1 AND state = 'failed'"
    )
}

fn describe(at: &StageRef) -> String {
    match &at.pipeline {
        Some(pipeline) => format!("{pipeline}.{}", at.stage),
        None => at.stage.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::both_backends::on_both;
    use crate::store::deals::tests::upsert;
    use crate::store::ledger::test_sql::exec;
    use chrono::TimeZone;
    use std::sync::{Arc, Mutex};

    fn at(minute: i64) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 3, 2, 9, 0, 0).unwrap() + chrono::Duration::minutes(minute)
    }

    /// Stores deal `external_id` of the test connection; its row id.
    async fn deal(store: &Store, external_id: &str) -> i64 {
        store
            .upsert_deals(vec![upsert(external_id, "lead", at(0))])
            .await
            .unwrap();
        store
            .deal_by_external_id("crm", external_id)
            .await
            .unwrap()
            .unwrap()
            .id
    }

    /// Enrolls `deal_id` into `rule` for `recipient` with these steps, all pending.
    async fn enroll(
        store: &Store,
        deal_id: i64,
        rule: &str,
        recipient: &str,
        steps: &[OutboxAction],
        now: DateTime<Utc>,
    ) {
        let rows: Vec<NewOutboxRow> = steps
            .iter()
            .enumerate()
            .map(|(index, action)| NewOutboxRow {
                step: StepNumber::from_index(index as i64),
                action: *action,
                due_at: now + chrono::Duration::hours(index as i64),
                state: OutboxState::Pending,
                reason: None,
            })
            .collect();
        let recipient = recipient.to_owned();
        let outcome = store
            .enroll(deal_id, rule.into(), at(-10_000), now, move |_, _| {
                EnrollPlan::Enroll {
                    recipient,
                    anchor_at: now,
                    rows,
                    supersede: Vec::new(),
                }
            })
            .await
            .unwrap();
        assert!(outcome.enrolled);
    }

    /// (rule, step, state, reason) of the deal's rows.
    async fn rows_of(store: &Store, deal_id: i64) -> Vec<(String, i64, String, Option<String>)> {
        let filter = OutboxRowFilter {
            deal_id: Some(deal_id),
            ..OutboxRowFilter::default()
        };
        let mut rows: Vec<_> = store
            .outbox(filter)
            .await
            .unwrap()
            .into_iter()
            .map(|r| {
                let step = r.step.index() as i64;
                (r.rule, step, r.state.as_str().to_owned(), r.reason)
            })
            .collect();
        rows.sort_by(|a, b| (&a.0, a.1).cmp(&(&b.0, b.1)));
        rows
    }

    async fn row_id(store: &Store, deal_id: i64, rule: &str, step: i64) -> i64 {
        let filter = OutboxRowFilter {
            deal_id: Some(deal_id),
            rule: Some(rule.to_owned()),
            ..OutboxRowFilter::default()
        };
        let rows = store.outbox(filter).await.unwrap();
        let row = rows.iter().find(|r| r.step.index() as i64 == step);
        row.expect("the row").id
    }

    /// Marks a row as handed to SMTP (`state`) at `claimed`.
    async fn mark(store: &Store, id: i64, state: &'static str, claimed: DateTime<Utc>) {
        exec(
            store,
            "UPDATE outbox SET state = ?2, claimed_at = ?3 WHERE id = ?1",
            vec![
                Value::Int(id),
                Value::Text(state),
                Value::Int(to_ms(claimed)),
            ],
        )
        .await;
    }

    #[tokio::test]
    async fn a_stop_skips_the_pending_email_steps_of_that_sequence_and_nothing_else() {
        on_both(
            "a_stop_skips_the_pending_email_steps_of_that_sequence_and_nothing_else",
            async |store| {
                use OutboxAction::{Email, Expire};
                let won = deal(&store, "d1").await;
                let other = deal(&store, "d2").await;
                enroll(
                    &store,
                    won,
                    "carts",
                    "ada@example.com",
                    &[Email, Email, Email, Expire],
                    at(0),
                )
                .await;
                enroll(&store, won, "winback", "ada@example.com", &[Email], at(0)).await;
                enroll(
                    &store,
                    other,
                    "carts",
                    "bob@example.com",
                    &[Email, Email],
                    at(0),
                )
                .await;
                let first = row_id(&store, won, "carts", 0).await;
                let claim = store
                    .claim(first, at(1), ClaimQuery::default(), |_| {
                        ClaimDecision::Stop("the deal was won".into())
                    })
                    .await
                    .unwrap()
                    .expect("a pending row");
                assert!(claim.sending.is_none());
                let stopped = Some("sequence stopped: the deal was won".to_owned());
                assert_eq!(
                    rows_of(&store, won).await,
                    [
                        (
                            "carts".into(),
                            0,
                            "skipped".into(),
                            Some("the deal was won".into())
                        ),
                        ("carts".into(), 1, "skipped".into(), stopped.clone()),
                        ("carts".into(), 2, "skipped".into(), stopped),
                        // The expiry is not an email: it still moves a deal that waits on.
                        ("carts".into(), 3, "pending".into(), None),
                        ("winback".into(), 0, "pending".into(), None),
                    ]
                );
                assert!(
                    rows_of(&store, other)
                        .await
                        .iter()
                        .all(|row| row.2 == "pending")
                );
            },
        )
        .await;
    }

    #[tokio::test]
    async fn the_cap_counts_this_recipients_emails_handed_to_smtp_within_the_window_only() {
        on_both(
            "the_cap_counts_this_recipients_emails_handed_to_smtp_within_the_window_only",
            async |store| {
                use OutboxAction::Email;
                let now = at(600);
                let earlier = deal(&store, "d1").await;
                let later = deal(&store, "d2").await;
                let stranger = deal(&store, "d3").await;
                let nobody = deal(&store, "d4").await;
                enroll(
                    &store,
                    earlier,
                    "carts",
                    "ada@example.com",
                    &[Email; 5],
                    at(0),
                )
                .await;
                enroll(&store, later, "carts", "ada@example.com", &[Email], at(0)).await;
                enroll(
                    &store,
                    stranger,
                    "carts",
                    "bob@example.com",
                    &[Email],
                    at(0),
                )
                .await;
                enroll(&store, nobody, "carts", "", &[Email, Email], at(0)).await;
                let step = |n| row_id(&store, earlier, "carts", n);
                // Outside the hour: two hours ago. Inside: sent, sending and uncertain ones, and
                // a failed one (never handed over) that does not count.
                for (n, state, minutes_ago) in [
                    (0, "sent", 120),
                    (1, "sent", 40),
                    (2, "uncertain", 30),
                    (3, "sending", 20),
                    (4, "failed", 10),
                ] {
                    let claimed = now - chrono::Duration::minutes(minutes_ago);
                    mark(&store, step(n).await, state, claimed).await;
                }
                mark(
                    &store,
                    row_id(&store, stranger, "carts", 0).await,
                    "sent",
                    now - chrono::Duration::minutes(5),
                )
                .await;
                mark(
                    &store,
                    row_id(&store, nobody, "carts", 0).await,
                    "sent",
                    now - chrono::Duration::minutes(5),
                )
                .await;

                let recent = |id: i64| {
                    let store = store.clone();
                    async move {
                        let seen = Arc::new(Mutex::new(None));
                        let into = Arc::clone(&seen);
                        let query = ClaimQuery {
                            cap_window: Some(Duration::from_secs(3600)),
                            ..ClaimQuery::default()
                        };
                        store
                            .claim(id, now, query, move |facts| {
                                *into.lock().unwrap() = Some(facts.recent_to_recipient);
                                ClaimDecision::Skip("looked".into())
                            })
                            .await
                            .unwrap()
                            .expect("a pending row");
                        seen.lock().unwrap().take().unwrap()
                    }
                };
                assert_eq!(
                    recent(row_id(&store, later, "carts", 0).await).await,
                    (3, Some(now - chrono::Duration::minutes(40)))
                );
                // An email without a recipient is never capped.
                assert_eq!(
                    recent(row_id(&store, nobody, "carts", 1).await).await,
                    (0, None)
                );
            },
        )
        .await;
    }

    #[tokio::test]
    async fn a_newer_enrollment_supersedes_what_is_pending_of_the_older_ones_and_counts_it() {
        on_both(
            "a_newer_enrollment_supersedes_what_is_pending_of_the_older_ones_and_counts_it",
            async |store| {
                use OutboxAction::{Email, Expire};
                let older = deal(&store, "d1").await;
                let oldest = deal(&store, "d2").await;
                let newer = deal(&store, "d3").await;
                enroll(
                    &store,
                    older,
                    "carts",
                    "ada@example.com",
                    &[Email, Email, Expire],
                    at(0),
                )
                .await;
                mark(
                    &store,
                    row_id(&store, older, "carts", 0).await,
                    "sent",
                    at(1),
                )
                .await;
                enroll(&store, oldest, "carts", "ada@example.com", &[Email], at(0)).await;
                let outcome = store
                    .enroll(newer, "carts".into(), at(-60), at(10), move |_, earlier| {
                        let supersede = earlier("ada@example.com")
                            .unwrap()
                            .into_iter()
                            .map(|e| e.deal_id)
                            .collect();
                        EnrollPlan::Enroll {
                            recipient: "ada@example.com".into(),
                            anchor_at: at(10),
                            rows: vec![NewOutboxRow {
                                step: StepNumber::default(),
                                action: Email,
                                due_at: at(11),
                                state: OutboxState::Pending,
                                reason: None,
                            }],
                            supersede,
                        }
                    })
                    .await
                    .unwrap();
                // Two pending rows of the older deal (its expiry too) and one of the oldest.
                assert_eq!(
                    outcome,
                    EnrollOutcome {
                        enrolled: true,
                        declined: false,
                        superseded: 3,
                    }
                );
                let reason = Some(format!("superseded by the newer deal {newer}"));
                let states: Vec<_> = rows_of(&store, older)
                    .await
                    .into_iter()
                    .map(|row| (row.2, row.3))
                    .collect();
                assert_eq!(
                    states,
                    [
                        ("sent".to_owned(), None),
                        ("skipped".to_owned(), reason.clone()),
                        ("skipped".to_owned(), reason.clone()),
                    ]
                );
                assert_eq!(rows_of(&store, oldest).await[0].2, "skipped");
                assert_eq!(rows_of(&store, newer).await[0].2, "pending");
            },
        )
        .await;
    }

    #[tokio::test]
    async fn only_a_failed_email_is_queued_again_and_never_to_a_suppressed_address() {
        on_both(
            "only_a_failed_email_is_queued_again_and_never_to_a_suppressed_address",
            async |store| {
                use OutboxAction::{Email, Expire};
                let cart = deal(&store, "d1").await;
                let gone = deal(&store, "d2").await;
                enroll(
                    &store,
                    cart,
                    "carts",
                    "ada@example.com",
                    &[Email, Email, Expire],
                    at(0),
                )
                .await;
                enroll(&store, gone, "carts", "gone@example.com", &[Email], at(0)).await;
                let [sent, failed, expiry] = [
                    row_id(&store, cart, "carts", 0).await,
                    row_id(&store, cart, "carts", 1).await,
                    row_id(&store, cart, "carts", 2).await,
                ];
                let bounced = row_id(&store, gone, "carts", 0).await;
                mark(&store, sent, "sent", at(1)).await;
                for id in [failed, expiry, bounced] {
                    mark(&store, id, "failed", at(2)).await;
                }
                store
                    .suppress("gone@example.com".into(), "hard bounce".into(), None, at(3))
                    .await
                    .unwrap();
                let now = at(5);
                // A sent email is never sent again, and an expiry is not an email.
                for id in [sent, expiry] {
                    assert!(matches!(
                        store.retry_failed(id, now).await.unwrap(),
                        RetryOutcome::NotFailed(row) if row.id == id
                    ));
                }
                assert!(matches!(
                    store.retry_failed(bounced, now).await.unwrap(),
                    RetryOutcome::Suppressed(_, reason) if reason == "hard bounce"
                ));
                match store.retry_failed(failed, now).await.unwrap() {
                    RetryOutcome::Queued(row) => {
                        assert_eq!(
                            (row.id, row.state, row.attempts),
                            (failed, OutboxState::Pending, 0)
                        );
                    }
                    other => panic!("{other:?}"),
                }
                assert!(matches!(
                    store.retry_failed(9_999, now).await.unwrap(),
                    RetryOutcome::NotFound
                ));
                let states: Vec<String> = rows_of(&store, cart)
                    .await
                    .into_iter()
                    .map(|r| r.2)
                    .collect();
                assert_eq!(states, ["sent", "pending", "failed"]);
                assert_eq!(rows_of(&store, gone).await[0].2, "failed");
            },
        )
        .await;
    }

    #[tokio::test]
    async fn at_start_every_email_and_digest_left_sending_becomes_uncertain_and_is_counted() {
        on_both(
            "at_start_every_email_and_digest_left_sending_becomes_uncertain_and_is_counted",
            async |store| {
                use OutboxAction::Email;
                let cart = deal(&store, "d1").await;
                enroll(
                    &store,
                    cart,
                    "carts",
                    "ada@example.com",
                    &[Email, Email, Email],
                    at(0),
                )
                .await;
                for step in [0, 1] {
                    mark(
                        &store,
                        row_id(&store, cart, "carts", step).await,
                        "sending",
                        at(1),
                    )
                    .await;
                }
                exec(
                    &store,
                    "INSERT INTO digests (rule, day, recipient, state, slot_at, next_attempt_at,
                         created_at, updated_at)
                     VALUES ('daily', '2026-03-02', 'ops@example.com', 'sending', 0, 0, 0, 0)",
                    vec![],
                )
                .await;
                assert_eq!(store.outbox_recover_interrupted(at(2)).await.unwrap(), 3);
                let states: Vec<String> = rows_of(&store, cart)
                    .await
                    .into_iter()
                    .map(|r| r.2)
                    .collect();
                assert_eq!(states, ["uncertain", "uncertain", "pending"]);
                assert_eq!(store.outbox_recover_interrupted(at(3)).await.unwrap(), 0);
            },
        )
        .await;
    }

    #[tokio::test]
    async fn a_deal_that_left_its_rules_stages_has_what_is_pending_stopped_at_once() {
        on_both(
            "a_deal_that_left_its_rules_stages_has_what_is_pending_stopped_at_once",
            async |store| {
                use OutboxAction::{Email, Expire};
                let left = deal(&store, "d1").await;
                let stays = deal(&store, "d2").await;
                enroll(
                    &store,
                    left,
                    "nurture",
                    "ada@example.com",
                    &[Email, Email, Expire],
                    at(0),
                )
                .await;
                enroll(&store, left, "other", "ada@example.com", &[Email], at(0)).await;
                enroll(&store, stays, "nurture", "bob@example.com", &[Email], at(0)).await;
                mark(
                    &store,
                    row_id(&store, left, "nurture", 0).await,
                    "sent",
                    at(1),
                )
                .await;
                // Both deals are in sales.lead; the rule now runs only in sales.won.
                let won = StageRef {
                    pipeline: Some(PipelineKey::new("sales")),
                    stage: StageKey::new("won"),
                };
                let lead = StageRef {
                    pipeline: Some(PipelineKey::new("sales")),
                    stage: StageKey::new("lead"),
                };
                let active = HashMap::from([("nurture".to_owned(), vec![won])]);
                assert_eq!(
                    store
                        .stop_left_rules(vec![left], active.clone(), at(2))
                        .await
                        .unwrap(),
                    [("nurture".to_owned(), 2)]
                );
                let reason = Some(
                    "sequence stopped: the deal left the rule's stages (now in sales.lead)"
                        .to_owned(),
                );
                let rows: Vec<_> = rows_of(&store, left)
                    .await
                    .into_iter()
                    .map(|r| (r.0, r.2, r.3))
                    .collect();
                assert_eq!(
                    rows,
                    [
                        ("nurture".into(), "sent".into(), None),
                        ("nurture".into(), "skipped".into(), reason.clone()),
                        ("nurture".into(), "skipped".into(), reason),
                        // A rule without stages given here is not judged.
                        ("other".into(), "pending".into(), None),
                    ]
                );
                // Only the deals named are looked at; one still in the rule's stages stays.
                assert_eq!(rows_of(&store, stays).await[0].2, "pending");
                let still = HashMap::from([("nurture".to_owned(), vec![lead])]);
                assert!(
                    store
                        .stop_left_rules(vec![stays], still, at(3))
                        .await
                        .unwrap()
                        .is_empty()
                );
                assert_eq!(rows_of(&store, stays).await[0].2, "pending");
                assert!(
                    store
                        .stop_left_rules(vec![], active, at(3))
                        .await
                        .unwrap()
                        .is_empty()
                );
                // The rules the outbox holds rows of, each once, sorted.
                assert_eq!(store.outbox_rules().await.unwrap(), ["nurture", "other"]);
            },
        )
        .await;
    }

    #[tokio::test]
    async fn an_email_rows_deal_is_found_and_an_expiry_or_unknown_row_has_none() {
        on_both(
            "an_email_rows_deal_is_found_and_an_expiry_or_unknown_row_has_none",
            async |store| {
                use OutboxAction::{Email, Expire};
                let cart = deal(&store, "d1").await;
                enroll(
                    &store,
                    cart,
                    "carts",
                    "ada@example.com",
                    &[Email, Expire],
                    at(0),
                )
                .await;
                let email = row_id(&store, cart, "carts", 0).await;
                let expiry = row_id(&store, cart, "carts", 1).await;
                let found = store
                    .outbox_email_deal(email)
                    .await
                    .unwrap()
                    .expect("its deal");
                assert_eq!((found.id, found.external_id.as_str()), (cart, "d1"));
                assert!(store.outbox_email_deal(expiry).await.unwrap().is_none());
                assert!(store.outbox_email_deal(9_999).await.unwrap().is_none());
            },
        )
        .await;
    }

    #[tokio::test]
    async fn the_start_up_index_lists_a_stages_deals_without_rows_for_the_rule_oldest_entry_first()
    {
        on_both(
            "the_start_up_index_lists_a_stages_deals_without_rows_for_the_rule_oldest_entry_first",
            async |store| {
                let lead = StageRef {
                    pipeline: Some(PipelineKey::new("sales")),
                    stage: StageKey::new("lead"),
                };
                let mut ids = Vec::new();
                for external_id in ["d1", "d2", "d3", "d4", "d5", "d6"] {
                    ids.push(deal(&store, external_id).await);
                }
                let [early, late, enrolled, elsewhere, deleted, before] = ids[..] else {
                    unreachable!()
                };
                // Entered at minutes 20, 10, 15, 5, 5 and -5; one is elsewhere, one deleted.
                for (id, minute) in [
                    (early, 20),
                    (late, 10),
                    (enrolled, 15),
                    (elsewhere, 5),
                    (deleted, 5),
                    (before, -5),
                ] {
                    exec(
                        &store,
                        "UPDATE deals SET stage_entered_at = ?2 WHERE id = ?1",
                        vec![Value::Int(id), Value::Int(to_ms(at(minute)))],
                    )
                    .await;
                }
                let update = "UPDATE deals SET stage = 'won' WHERE id = ?1";
                exec(&store, update, vec![Value::Int(elsewhere)]).await;
                let update = "UPDATE deals SET deleted_at = 1 WHERE id = ?1";
                exec(&store, update, vec![Value::Int(deleted)]).await;
                enroll(
                    &store,
                    enrolled,
                    "carts",
                    "ada@example.com",
                    &[OutboxAction::Email],
                    at(16),
                )
                .await;
                enroll(
                    &store,
                    early,
                    "winback",
                    "ada@example.com",
                    &[OutboxAction::Email],
                    at(21),
                )
                .await;
                let unenrolled = store
                    .unenrolled_in_stage(lead.clone(), at(0), "carts".into())
                    .await
                    .unwrap();
                assert_eq!(unenrolled, [late, early]);
                assert!(
                    store
                        .unenrolled_in_stage(lead, at(20), "carts".into())
                        .await
                        .unwrap()
                        .is_empty()
                );
            },
        )
        .await;
    }

    #[tokio::test]
    async fn explain_sees_the_recipients_other_enrollments_in_the_rule_since_the_cutoff() {
        on_both(
            "explain_sees_the_recipients_other_enrollments_in_the_rule_since_the_cutoff",
            async |store| {
                use OutboxAction::Email;
                let started = deal(&store, "d1").await;
                let waiting = deal(&store, "d2").await;
                let old = deal(&store, "d3").await;
                let asking = deal(&store, "d4").await;
                enroll(
                    &store,
                    started,
                    "carts",
                    "ada@example.com",
                    &[Email, Email],
                    at(60),
                )
                .await;
                mark(
                    &store,
                    row_id(&store, started, "carts", 0).await,
                    "sent",
                    at(61),
                )
                .await;
                enroll(
                    &store,
                    waiting,
                    "carts",
                    "ada@example.com",
                    &[Email],
                    at(90),
                )
                .await;
                enroll(&store, old, "carts", "ada@example.com", &[Email], at(-60)).await;
                enroll(
                    &store,
                    asking,
                    "carts",
                    "ada@example.com",
                    &[Email],
                    at(100),
                )
                .await;
                enroll(
                    &store,
                    asking,
                    "winback",
                    "ada@example.com",
                    &[Email],
                    at(100),
                )
                .await;
                let earlier = store
                    .with_followup_facts(asking, move |_, _, facts| {
                        facts.earlier_enrollments("carts", "ada@example.com", at(0), asking)
                    })
                    .await
                    .unwrap()
                    .expect("the deal exists");
                let mut earlier = earlier;
                earlier.sort_by_key(|e| e.deal_id);
                assert_eq!(
                    earlier,
                    [
                        EarlierEnrollment {
                            deal_id: started,
                            anchor_at: at(60),
                            created_at: at(60),
                            started: true,
                            pending: true,
                        },
                        EarlierEnrollment {
                            deal_id: waiting,
                            anchor_at: at(90),
                            created_at: at(90),
                            started: false,
                            pending: true,
                        },
                    ]
                );
            },
        )
        .await;
    }
}
