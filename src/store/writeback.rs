//! The CRM write-back queue: one `writebacks` row per sent follow-up email whose
//! connection records it on the deal in its CRM (migration `0005_writebacks.sql`).
//!
//! Invariants:
//! - A row is written only inside the transaction that marks its email sent
//!   ([`enqueue_in`] from `Store::mark_sent`): an email recorded as sent has its
//!   write-back queued, and nothing about the write-back can delay or repeat the email.
//! - Its idempotency key ([`key_of`]) is stored with it, before any request; the note
//!   carries the key, so an attempt whose outcome is unknown is followed by a lookup.
//! - A claim counts the attempt (`attempts + 1`) in the claim's transaction, before the
//!   request goes out: a job with `attempts > 1` may have been stored by the vendor
//!   already ([`WritebackJob::may_exist`]).
//! - Only a `claimed` row is settled; on PostgreSQL only by the replica holding its claim
//!   (`postgres::claims::WRITEBACKS`, `FOR UPDATE SKIP LOCKED` as the outbox). On SQLite
//!   one daemon holds the file: a row left `claimed` by a crash is pending again when
//!   the worker starts ([`Store::release_writeback_claims`]).

use super::{Result, Store, from_ms, to_ms};
use crate::domain::StepNumber;
use chrono::{DateTime, Utc};
use rusqlite::OptionalExtension;
use serde::Serialize;

/// The idempotency key of the write-back of outbox row `outbox_id`: what the note
/// carries and a lookup searches for. Letters, digits and underscores only, so a
/// vendor's search tokenizes it as one word.
pub fn key_of(outbox_id: i64) -> String {
    format!("dealsync_outbox_{outbox_id}")
}

/// A claimed write-back: what its request needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WritebackJob {
    pub id: i64,
    pub outbox_id: i64,
    pub deal_id: i64,
    pub connection: String,
    pub key: String,
    /// The deal's id in its CRM.
    pub external_id: String,
    pub deal_title: String,
    pub rule: String,
    pub step: StepNumber,
    pub recipient: String,
    pub subject: String,
    pub sent_at: DateTime<Utc>,
    /// Attempts including this one.
    pub attempts: u32,
}

impl WritebackJob {
    /// Whether an earlier attempt was started: the vendor may hold the record already.
    pub fn may_exist(&self) -> bool {
        self.attempts > 1
    }
}

/// What became of an attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WritebackSettlement {
    /// Recorded in the CRM (`remote_id`: the vendor's id of the record, when it said).
    Done { remote_id: Option<String> },
    /// Try again at `at`.
    Retry { at: DateTime<Utc>, reason: String },
    /// Given up: refused by the vendor or out of attempts.
    Failed { reason: String },
}

/// One write-back as `deals show` lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct WritebackRow {
    pub id: i64,
    pub outbox_id: i64,
    pub connection: String,
    pub key: String,
    pub rule: String,
    pub step: StepNumber,
    /// pending, claimed (a request in flight), done or failed.
    pub state: String,
    pub attempts: u32,
    pub next_attempt_at: DateTime<Utc>,
    pub reason: Option<String>,
    pub remote_id: Option<String>,
    pub done_at: Option<DateTime<Utc>>,
}

/// Write-backs per connection and state (`/metrics`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct WritebackCount {
    pub connection: String,
    pub state: String,
    pub rows: u64,
}

/// The columns a [`WritebackJob`] is read from, in [`job_from`]'s order.
pub(super) const JOB_COLUMNS: &str = "id, outbox_id, deal_id, connection, key, external_id, \
     deal_title, rule, step, recipient, subject, sent_at, attempts";

/// The columns a [`WritebackRow`] is read from, in [`row_from`]'s order.
pub(super) const ROW_COLUMNS: &str = "id, outbox_id, connection, key, rule, step, state, \
     attempts, next_attempt_at, reason, remote_id, done_at";

/// A row of either backend, read by position.
pub(super) trait Cells {
    fn int(&self, at: usize) -> Result<i64>;
    fn text(&self, at: usize) -> Result<String>;
    fn maybe_int(&self, at: usize) -> Result<Option<i64>>;
    fn maybe_text(&self, at: usize) -> Result<Option<String>>;
}

impl Cells for rusqlite::Row<'_> {
    fn int(&self, at: usize) -> Result<i64> {
        Ok(self.get(at)?)
    }
    fn text(&self, at: usize) -> Result<String> {
        Ok(self.get(at)?)
    }
    fn maybe_int(&self, at: usize) -> Result<Option<i64>> {
        Ok(self.get(at)?)
    }
    fn maybe_text(&self, at: usize) -> Result<Option<String>> {
        Ok(self.get(at)?)
    }
}

fn count_of(value: i64) -> u32 {
    u32::try_from(value.max(0)).unwrap_or(u32::MAX)
}

pub(super) fn job_from(row: &impl Cells) -> Result<WritebackJob> {
    Ok(WritebackJob {
        id: row.int(0)?,
        outbox_id: row.int(1)?,
        deal_id: row.int(2)?,
        connection: row.text(3)?,
        key: row.text(4)?,
        external_id: row.text(5)?,
        deal_title: row.text(6)?,
        rule: row.text(7)?,
        step: StepNumber::from_index(row.int(8)?),
        recipient: row.text(9)?,
        subject: row.text(10)?,
        sent_at: from_ms(row.int(11)?),
        attempts: count_of(row.int(12)?),
    })
}

pub(super) fn row_from(row: &impl Cells) -> Result<WritebackRow> {
    Ok(WritebackRow {
        id: row.int(0)?,
        outbox_id: row.int(1)?,
        connection: row.text(2)?,
        key: row.text(3)?,
        rule: row.text(4)?,
        step: StepNumber::from_index(row.int(5)?),
        state: row.text(6)?,
        attempts: count_of(row.int(7)?),
        next_attempt_at: from_ms(row.int(8)?),
        reason: row.maybe_text(9)?,
        remote_id: row.maybe_text(10)?,
        done_at: row.maybe_int(11)?.map(from_ms),
    })
}

/// The queueing statement (`?`/`$` placeholders by `mark`): `1` outbox id, `2` key,
/// `3` subject, `4` sent at in ms. Copies what the templates need from the outbox row
/// and its deal; an outbox row already queued is left alone.
pub(super) fn enqueue_sql(mark: char) -> String {
    format!(
        "INSERT INTO writebacks (outbox_id, deal_id, connection, key, external_id, deal_title,
             rule, step, recipient, subject, sent_at, state, attempts, next_attempt_at,
             created_at, updated_at)
         SELECT o.id, o.deal_id, d.connection, {mark}2, d.external_id, d.title, o.rule, o.step,
             o.recipient, {mark}3, {mark}4, 'pending', 0, {mark}4, {mark}4, {mark}4
           FROM outbox o JOIN deals d ON d.id = o.deal_id
          WHERE o.id = {mark}1
         ON CONFLICT (outbox_id) DO NOTHING"
    )
}

/// The settling statement: `1` id, `2` state, `3` now in ms, `4` next attempt in ms,
/// `5` reason, `6` remote id; `holder` adds the claim condition (PostgreSQL).
pub(super) fn settle_sql(mark: char, holder: &str) -> String {
    format!(
        "UPDATE writebacks SET state = {mark}2, updated_at = {mark}3,
             next_attempt_at = coalesce({mark}4, next_attempt_at), reason = {mark}5,
             remote_id = coalesce({mark}6, remote_id),
             done_at = CASE WHEN {mark}2 = 'done' THEN {mark}3 ELSE done_at END{claim}
         WHERE id = {mark}1 AND state = 'claimed'{holder}",
        claim = if holder.is_empty() {
            ""
        } else {
            ", claimed_by = NULL, claimed_until = NULL"
        },
    )
}

/// The parameters of [`settle_sql`] for `settlement`: (state, next attempt, reason,
/// remote id).
pub(super) fn settle_values(
    settlement: &WritebackSettlement,
) -> (&'static str, Option<i64>, Option<String>, Option<String>) {
    match settlement {
        WritebackSettlement::Done { remote_id } => ("done", None, None, remote_id.clone()),
        WritebackSettlement::Retry { at, reason } => {
            ("pending", Some(to_ms(*at)), Some(reason.clone()), None)
        }
        WritebackSettlement::Failed { reason } => ("failed", None, Some(reason.clone()), None),
    }
}

/// Queues the write-back of outbox row `outbox_id` inside the caller's transaction
/// (the one that marks the email sent).
pub(super) fn enqueue_in(
    tx: &rusqlite::Transaction<'_>,
    outbox_id: i64,
    subject: &str,
    at: DateTime<Utc>,
) -> Result<()> {
    tx.execute(
        &enqueue_sql('?'),
        rusqlite::params![outbox_id, key_of(outbox_id), subject, to_ms(at)],
    )?;
    Ok(())
}

impl Store {
    /// Claims up to `limit` write-backs due by `now`, earliest first, counting an
    /// attempt for each before it is returned (see the module's invariants).
    pub async fn claim_writebacks(
        &self,
        now: DateTime<Utc>,
        limit: u32,
    ) -> Result<Vec<WritebackJob>> {
        if let Some(postgres) = self.postgres_engine() {
            let database = &postgres.database;
            return database
                .claim_writebacks(&postgres.replica, now, limit)
                .await
                .map_err(|error| database.named(error));
        }
        self.write(move |tx| {
            let ids: Vec<i64> = {
                let mut statement = tx.prepare_cached(
                    "SELECT id FROM writebacks WHERE state = 'pending' AND next_attempt_at <= ?1
                     ORDER BY next_attempt_at, id LIMIT ?2",
                )?;
                statement
                    .query_map(rusqlite::params![to_ms(now), limit], |row| row.get(0))?
                    .collect::<rusqlite::Result<_>>()?
            };
            let mut jobs = Vec::with_capacity(ids.len());
            let sql = format!(
                "UPDATE writebacks SET state = 'claimed', attempts = attempts + 1, updated_at = ?2
                 WHERE id = ?1 RETURNING {JOB_COLUMNS}"
            );
            for id in ids {
                let job = tx
                    .query_row(&sql, rusqlite::params![id, to_ms(now)], |row| {
                        Ok(job_from(row))
                    })
                    .optional()?;
                if let Some(job) = job {
                    jobs.push(job?);
                }
            }
            Ok(jobs)
        })
        .await
    }

    /// Records what attempt `id` came to; false when the row is not claimed (by this
    /// replica, on PostgreSQL), and nothing changed.
    pub async fn settle_writeback(
        &self,
        id: i64,
        settlement: WritebackSettlement,
        now: DateTime<Utc>,
    ) -> Result<bool> {
        if let Some(postgres) = self.postgres_engine() {
            let database = &postgres.database;
            return database
                .settle_writeback(&postgres.replica, id, &settlement, now)
                .await
                .map_err(|error| database.named(error));
        }
        self.write(move |tx| {
            let (state, next, reason, remote_id) = settle_values(&settlement);
            let changed = tx.execute(
                &settle_sql('?', ""),
                rusqlite::params![id, state, to_ms(now), next, reason, remote_id],
            )?;
            Ok(changed == 1)
        })
        .await
    }

    /// Makes the write-backs a stopped daemon left `claimed` pending again, due at
    /// once (their next attempt looks the note up first). SQLite only: there one
    /// daemon holds the file; on PostgreSQL a claim expires by the server's clock.
    pub async fn release_writeback_claims(&self, now: DateTime<Utc>) -> Result<u64> {
        if self.postgres().is_some() {
            return Ok(0);
        }
        self.write(move |tx| {
            let released = tx.execute(
                "UPDATE writebacks SET state = 'pending', next_attempt_at = ?1, updated_at = ?1
                 WHERE state = 'claimed'",
                [to_ms(now)],
            )?;
            Ok(released as u64)
        })
        .await
    }

    /// The write-backs of deal `deal_id`, oldest first.
    pub async fn deal_writebacks(&self, deal_id: i64) -> Result<Vec<WritebackRow>> {
        if let Some(database) = self.postgres() {
            return database
                .deal_writebacks(deal_id)
                .await
                .map_err(|error| database.named(error));
        }
        self.read(move |db| {
            let mut statement = db.prepare_cached(&format!(
                "SELECT {ROW_COLUMNS} FROM writebacks WHERE deal_id = ?1 ORDER BY id"
            ))?;
            let rows = statement.query_map([deal_id], |row| Ok(row_from(row)))?;
            let mut found = Vec::new();
            for row in rows {
                found.push(row??);
            }
            Ok(found)
        })
        .await
    }

    /// Write-backs per connection and state.
    pub async fn writeback_counts(&self) -> Result<Vec<WritebackCount>> {
        if let Some(database) = self.postgres() {
            return database
                .writeback_counts()
                .await
                .map_err(|error| database.named(error));
        }
        self.read(|db| {
            let mut statement = db.prepare_cached(
                "SELECT connection, state, count(*) FROM writebacks
                 GROUP BY connection, state ORDER BY connection, state",
            )?;
            let rows = statement.query_map([], |row| {
                Ok(WritebackCount {
                    connection: row.get(0)?,
                    state: row.get(1)?,
                    rows: row.get::<_, i64>(2)?.max(0) as u64,
                })
            })?;
            Ok(rows.collect::<rusqlite::Result<_>>()?)
        })
        .await
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::store::both_backends::on_both;
    use crate::store::tests::upsert;
    use crate::store::{
        ClaimDecision, ClaimQuery, EnrollPlan, NewOutboxRow, OutboxAction, OutboxRowFilter,
        OutboxState,
    };

    /// A deal of connection `crm` (`wb-1`, `wb-2`, … in the order they are seeded) with
    /// one email sent at `at`; `subject` is given when its connection writes back.
    /// Returns (deal id, outbox id).
    pub(crate) async fn seed_sent_email(
        store: &Store,
        at: DateTime<Utc>,
        subject: Option<&str>,
    ) -> (i64, i64) {
        let seeded = store
            .deals(crate::store::DealFilter::default())
            .await
            .unwrap()
            .len();
        let external_id = format!("wb-{}", seeded + 1);
        store
            .upsert_deals(vec![upsert(&external_id, "proposal", at)])
            .await
            .unwrap();
        let deal_id = store
            .deal_by_external_id("crm", &external_id)
            .await
            .unwrap()
            .unwrap()
            .id;
        let rows = vec![NewOutboxRow {
            step: StepNumber::from_index(0),
            action: OutboxAction::Email,
            due_at: at,
            state: OutboxState::Pending,
            reason: None,
        }];
        store
            .enroll(deal_id, "nudge".into(), at, at, move |_, _| {
                EnrollPlan::Enroll {
                    recipient: "ada@example.com".into(),
                    anchor_at: at,
                    rows,
                    supersede: Vec::new(),
                }
            })
            .await
            .unwrap();
        let filter = OutboxRowFilter {
            deal_id: Some(deal_id),
            ..OutboxRowFilter::default()
        };
        let outbox_id = store.outbox(filter).await.unwrap()[0].id;
        store
            .claim(outbox_id, at, ClaimQuery::default(), |_| {
                ClaimDecision::Send
            })
            .await
            .unwrap()
            .expect("the due row is claimed");
        let sent = store
            .mark_sent(
                outbox_id,
                "<m@example.com>".into(),
                at,
                None,
                Vec::new(),
                subject.map(str::to_owned),
            )
            .await
            .unwrap();
        assert!(sent);
        (deal_id, outbox_id)
    }

    #[tokio::test]
    async fn a_sent_email_queues_one_write_back_that_is_claimed_counted_and_settled_once() {
        on_both(
            "a_sent_email_queues_one_write_back_that_is_claimed_counted_and_settled_once",
            async |store: Store| {
                let t0 = from_ms(1_767_225_600_000);
                let (deal_id, outbox_id) = seed_sent_email(&store, t0, Some("Checking in")).await;
                // An email sent without write-back queues nothing.
                let (other_deal, _) = seed_sent_email(&store, t0, None).await;
                assert!(store.deal_writebacks(other_deal).await.unwrap().is_empty());

                let listed = store.deal_writebacks(deal_id).await.unwrap();
                assert_eq!(listed.len(), 1, "{listed:?}");
                assert_eq!(listed[0].state, "pending");
                assert_eq!(listed[0].key, key_of(outbox_id));
                assert_eq!(listed[0].attempts, 0);

                // Not due before the email was sent.
                let early = t0 - chrono::Duration::seconds(1);
                assert!(store.claim_writebacks(early, 10).await.unwrap().is_empty());
                let jobs = store.claim_writebacks(t0, 10).await.unwrap();
                assert_eq!(jobs.len(), 1);
                let job = &jobs[0];
                assert_eq!(job.outbox_id, outbox_id);
                assert_eq!(job.subject, "Checking in");
                assert_eq!(job.external_id, "wb-1");
                assert_eq!(job.step.number(), 1);
                assert_eq!(job.attempts, 1);
                assert!(!job.may_exist());
                assert_eq!(job.sent_at, t0);
                // Claimed: nobody else gets it.
                assert!(store.claim_writebacks(t0, 10).await.unwrap().is_empty());

                let retry_at = t0 + chrono::Duration::seconds(30);
                let retry = WritebackSettlement::Retry {
                    at: retry_at,
                    reason: "timed out".into(),
                };
                assert!(
                    store
                        .settle_writeback(job.id, retry.clone(), t0)
                        .await
                        .unwrap()
                );
                assert!(
                    !store.settle_writeback(job.id, retry, t0).await.unwrap(),
                    "a row no longer claimed is not settled again"
                );
                assert!(store.claim_writebacks(t0, 10).await.unwrap().is_empty());
                let again = store.claim_writebacks(retry_at, 10).await.unwrap();
                assert_eq!(again.len(), 1);
                assert_eq!(again[0].attempts, 2);
                assert!(
                    again[0].may_exist(),
                    "the first attempt may have been stored"
                );
                let done = WritebackSettlement::Done {
                    remote_id: Some("70001".into()),
                };
                assert!(
                    store
                        .settle_writeback(again[0].id, done, retry_at)
                        .await
                        .unwrap()
                );
                let listed = store.deal_writebacks(deal_id).await.unwrap();
                assert_eq!(listed[0].state, "done");
                assert_eq!(listed[0].remote_id.as_deref(), Some("70001"));
                assert_eq!(listed[0].reason, None);
                assert_eq!(listed[0].done_at, Some(retry_at));
                assert!(
                    store
                        .claim_writebacks(retry_at, 10)
                        .await
                        .unwrap()
                        .is_empty()
                );
                assert_eq!(
                    store.writeback_counts().await.unwrap(),
                    [WritebackCount {
                        connection: "crm".into(),
                        state: "done".into(),
                        rows: 1
                    }]
                );
            },
        )
        .await;
    }

    #[tokio::test]
    async fn a_failed_write_back_keeps_its_reason_and_is_not_claimed_again() {
        on_both(
            "a_failed_write_back_keeps_its_reason_and_is_not_claimed_again",
            async |store: Store| {
                let t0 = from_ms(1_767_225_600_000);
                let (deal_id, _) = seed_sent_email(&store, t0, Some("Hello")).await;
                let job = store.claim_writebacks(t0, 10).await.unwrap().remove(0);
                let failed = WritebackSettlement::Failed {
                    reason: "gave up after 1 attempt: 500".into(),
                };
                assert!(store.settle_writeback(job.id, failed, t0).await.unwrap());
                let later = t0 + chrono::Duration::days(1);
                assert!(store.claim_writebacks(later, 10).await.unwrap().is_empty());
                let listed = store.deal_writebacks(deal_id).await.unwrap();
                assert_eq!(listed[0].state, "failed");
                assert_eq!(
                    listed[0].reason.as_deref(),
                    Some("gave up after 1 attempt: 500")
                );
                assert_eq!(
                    store.writeback_counts().await.unwrap(),
                    [WritebackCount {
                        connection: "crm".into(),
                        state: "failed".into(),
                        rows: 1
                    }]
                );
            },
        )
        .await;
    }

    /// SQLite: a claim a stopped daemon left is pending again at the next start, and
    /// its next attempt knows an earlier one was made. (PostgreSQL claims expire by the
    /// server's clock: `postgres::writeback`'s test.)
    #[tokio::test]
    async fn a_claim_left_by_a_stopped_daemon_is_released_at_start_on_sqlite() {
        let (_dir, store) = crate::store::tests::temp_store();
        let t0 = from_ms(1_767_225_600_000);
        seed_sent_email(&store, t0, Some("Hello")).await;
        assert_eq!(store.claim_writebacks(t0, 10).await.unwrap().len(), 1);
        assert!(store.claim_writebacks(t0, 10).await.unwrap().is_empty());
        assert_eq!(store.release_writeback_claims(t0).await.unwrap(), 1);
        let jobs = store.claim_writebacks(t0, 10).await.unwrap();
        assert_eq!(jobs.len(), 1);
        assert!(jobs[0].may_exist());
    }
}
