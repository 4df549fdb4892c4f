//! What the inbox worker reads and records: the rows due now, how it is done with each
//! (settlements), counts by state, and pruning after the retention.
//!
//! Invariants:
//! - Rows of one connection are handed out in arrival order, and not past a row of the
//!   same connection that waits for a retry.
//! - Settling a row counts it out of `pending` only when it was pending; a retry keeps
//!   it pending.
//! - Processed rows are kept for [`RETENTION`] (their delivery ids dedupe redeliveries),
//!   failed rows and dead letters for [`DEAD_LETTER_RETENTION`]; a pruned row's body
//!   goes with it.
//!
//! On PostgreSQL (`store::postgres::inbox`) the same methods claim and settle rows
//! shared by replicas: a row handed out is claimed by this process, and only its
//! holder settles it. The row mapping, the counts by state, the prune cutoffs and what
//! a settlement does to the pending count are decided here, for both backends.

use super::writer::Command;
use super::{DEAD_LETTER_RETENTION, MAX_PENDING, RETENTION, Result, parse_headers};
use crate::store::deals::Columns;
use crate::store::{Store, from_ms, to_ms};
use chrono::{DateTime, Utc};
use rusqlite::params;

/// An inbox row waiting to be processed.
#[derive(Debug, Clone)]
pub struct InboxRow {
    pub id: i64,
    pub connection: String,
    pub delivery_id: String,
    pub topic: Option<String>,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    pub received_at: DateTime<Utc>,
    /// Failed attempts so far.
    pub attempts: u32,
}

/// Inbox rows by state, for `/metrics` and tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct InboxCounts {
    pub pending: u64,
    pub processed: u64,
    pub failed: u64,
}

impl InboxCounts {
    /// Adds `count` rows in `state`: a row `claimed` by a replica (PostgreSQL) is not
    /// processed yet, so it counts as pending; any settled state but `processed` is
    /// `failed`.
    pub(in crate::store) fn add(&mut self, state: &str, count: i64) {
        let count = count.max(0) as u64;
        match state {
            "pending" | "claimed" => self.pending += count,
            "processed" => self.processed += count,
            _ => self.failed += count,
        }
    }
}

/// The columns [`inbox_row_from`] reads, in its order (`i` the inbox row, `b` its body).
pub(in crate::store) const INBOX_ROW_COLUMNS: &str =
    "i.id, i.connection, i.delivery_id, i.topic, b.headers, b.body, i.received_at, i.attempts";

/// Reads an inbox row of either backend ([`INBOX_ROW_COLUMNS`]).
pub(in crate::store) fn inbox_row_from<R: Columns>(row: &R) -> Result<InboxRow, R::Error> {
    Ok(InboxRow {
        id: row.int(0)?,
        connection: row.text(1)?,
        delivery_id: row.text(2)?,
        topic: row.opt_text(3)?,
        headers: parse_headers(&row.text(4)?),
        body: row.bytes(5)?,
        received_at: from_ms(row.int(6)?),
        attempts: row.int(7)?.max(0) as u32,
    })
}

/// What pruning at a time deletes: settled inbox rows of each state whose
/// `processed_at` is before its cutoff, and dead letters received before theirs
/// (epoch milliseconds).
pub(in crate::store) struct PruneCutoffs {
    pub settled: [(&'static str, i64); 2],
    pub dead_letters: i64,
}

impl PruneCutoffs {
    pub(in crate::store) fn at(now: DateTime<Utc>) -> PruneCutoffs {
        PruneCutoffs {
            settled: [
                ("processed", to_ms(now - RETENTION)),
                ("failed", to_ms(now - DEAD_LETTER_RETENTION)),
            ],
            dead_letters: to_ms(now - DEAD_LETTER_RETENTION),
        }
    }
}

/// How the worker is done with a row.
#[derive(Debug, Clone)]
pub enum Settlement {
    /// Applied: kept (for dedupe) until [`RETENTION`] has passed.
    Processed { id: i64, at: DateTime<Utc> },
    /// Failed; tried again at `next_attempt_at`.
    Retry {
        id: i64,
        error: String,
        next_attempt_at: DateTime<Utc>,
    },
    /// Given up on: kept with its error for inspection.
    Failed {
        id: i64,
        error: String,
        at: DateTime<Utc>,
    },
}

impl Settlement {
    /// The inbox row settled.
    pub(in crate::store) fn id(&self) -> i64 {
        match self {
            Settlement::Processed { id, .. }
            | Settlement::Retry { id, .. }
            | Settlement::Failed { id, .. } => *id,
        }
    }

    /// Whether it takes its row out of the unprocessed ones (a retry keeps it in).
    pub(in crate::store) fn is_final(&self) -> bool {
        !matches!(self, Settlement::Retry { .. })
    }
}

/// Applies settlements; returns how many pending rows they took out of `pending`.
pub(super) fn settle(tx: &rusqlite::Transaction<'_>, settlements: &[Settlement]) -> Result<u64> {
    let mut settled = 0u64;
    for settlement in settlements {
        match settlement {
            Settlement::Processed { id, at } => {
                settled += tx
                    .prepare_cached(
                        "UPDATE webhook_inbox SET state = 'processed', processed_at = ?2,
                            next_attempt_at = NULL WHERE id = ?1 AND state = 'pending'",
                    )?
                    .execute(params![id, to_ms(*at)])? as u64;
            }
            Settlement::Retry {
                id,
                error,
                next_attempt_at,
            } => {
                tx.prepare_cached(
                    "UPDATE webhook_inbox SET attempts = attempts + 1, last_error = ?2,
                        next_attempt_at = ?3 WHERE id = ?1",
                )?
                .execute(params![id, error, to_ms(*next_attempt_at)])?;
            }
            Settlement::Failed { id, error, at } => {
                settled += tx
                    .prepare_cached(
                        "UPDATE webhook_inbox SET state = 'failed', attempts = attempts + 1,
                            last_error = ?2, processed_at = ?3, next_attempt_at = NULL
                         WHERE id = ?1 AND state = 'pending'",
                    )?
                    .execute(params![id, error, to_ms(*at)])? as u64;
            }
        }
    }
    Ok(settled)
}

pub(super) fn prune(tx: &rusqlite::Transaction<'_>, now: DateTime<Utc>) -> Result<u64> {
    let mut pruned = 0;
    let cutoffs = PruneCutoffs::at(now);
    for (state, cutoff) in cutoffs.settled {
        tx.execute(
            "DELETE FROM webhook_bodies WHERE id IN (
                SELECT id FROM webhook_inbox WHERE state = ?1 AND processed_at < ?2)",
            params![state, cutoff],
        )?;
        pruned += tx.execute(
            "DELETE FROM webhook_inbox WHERE state = ?1 AND processed_at < ?2",
            params![state, cutoff],
        )?;
    }
    pruned += tx.execute(
        "DELETE FROM webhook_dead_letters WHERE received_at < ?1",
        [cutoffs.dead_letters],
    )?;
    Ok(pruned as u64)
}

impl Store {
    /// Records how the worker is done with rows (one commit for all of them).
    ///
    /// On PostgreSQL only the rows this process holds are settled: a row whose claim
    /// expired and went to another replica keeps that replica's outcome.
    pub async fn settle_webhooks(&self, settlements: Vec<Settlement>) -> Result<()> {
        if settlements.is_empty() {
            return Ok(());
        }
        if let Some(postgres) = self.postgres_engine() {
            let database = &postgres.database;
            let settled = database
                .settle_claimed_webhooks(&postgres.replica, &settlements)
                .await
                .map_err(|error| database.named(error))?;
            let finished = settlements
                .iter()
                .filter(|settlement| settlement.is_final() && settled.contains(&settlement.id()))
                .count();
            postgres.intake.settled(finished as u64);
            if settled.len() < settlements.len() {
                tracing::warn!(
                    lost = settlements.len() - settled.len(),
                    "webhook rows no longer held by this replica (their claim expired and \
                     went to another) were left to their new holder"
                );
            }
            return Ok(());
        }
        self.inbox()?
            .ask(|reply| Command::Settle(settlements, reply))
            .await
    }

    /// Keeps the inbox rows this replica claimed its own while a pass works on them:
    /// renews their claims every third of their time, until dropped (run it beside the
    /// pass). Never returns; on SQLite, where one process holds the inbox, it only
    /// waits.
    pub async fn keep_webhook_claims(&self) -> std::convert::Infallible {
        let Some(postgres) = self.postgres_engine() else {
            return std::future::pending().await;
        };
        let every = postgres.database.webhook_claim_renewal();
        loop {
            tokio::time::sleep(every).await;
            if let Err(error) = postgres
                .database
                .renew_webhook_claims(&postgres.replica)
                .await
            {
                tracing::warn!(error = %crate::telemetry::error_chain(&error), "renewing this replica's inbox claims failed; another replica may take rows this pass is working on");
            }
        }
    }

    /// Pending rows due at `now`, oldest first, at most `limit`. A connection with a row
    /// waiting for its retry contributes nothing, so its order is kept.
    ///
    /// On PostgreSQL the rows are claimed for this process (`FOR UPDATE SKIP LOCKED`):
    /// replicas share the connections, each row goes to one replica, and rows it holds
    /// but has not settled are handed to it again.
    pub async fn due_webhooks(&self, now: DateTime<Utc>, limit: u32) -> Result<Vec<InboxRow>> {
        if let Some(postgres) = self.postgres_engine() {
            let database = &postgres.database;
            let rows = database
                .due_webhooks(&postgres.replica, now, limit)
                .await
                .map_err(|error| database.named(error))?;
            // The count is advisory, kept by this process's writer and settlements and
            // read again from the database by the writer while deliveries come. The
            // worker reads it again when the inbox is full (a replica that refuses
            // deliveries stores none, so its writer never counts again, while other
            // replicas settle rows) and, at most once a second, when nothing is due (a
            // settlement racing the writer's count leaves it off until then).
            let intake = &postgres.intake;
            let recounted = if intake.pending() >= MAX_PENDING {
                intake.recount(database).await
            } else if rows.is_empty() {
                intake.recount_when_idle(database).await
            } else {
                Ok(intake.pending())
            };
            recounted.map_err(|error| database.named(error))?;
            return Ok(rows);
        }
        self.read_inbox(move |db| {
            let mut statement = db.prepare_cached(&format!(
                "SELECT {INBOX_ROW_COLUMNS}
                 FROM webhook_inbox AS i INDEXED BY webhook_inbox_pending
                 CROSS JOIN webhook_bodies AS b ON b.id = i.id
                 WHERE state = 'pending' AND coalesce(next_attempt_at, 0) <= ?1
                   AND connection NOT IN (
                        SELECT connection FROM webhook_inbox INDEXED BY webhook_inbox_retrying
                        WHERE state = 'pending' AND next_attempt_at IS NOT NULL
                          AND next_attempt_at > ?1)
                 ORDER BY i.id LIMIT ?2"
            ))?;
            let rows =
                statement.query_map(params![to_ms(now), limit], |row| inbox_row_from(row))?;
            Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
        })
        .await
    }

    #[cfg(test)]
    /// Marks a row processed.
    pub async fn webhook_processed(&self, id: i64, at: DateTime<Utc>) -> Result<()> {
        self.settle_webhooks(vec![Settlement::Processed { id, at }])
            .await
    }

    /// Records a failed attempt; the row is retried at `next_attempt_at`.
    pub async fn webhook_retry(
        &self,
        id: i64,
        error: &str,
        next_attempt_at: DateTime<Utc>,
    ) -> Result<()> {
        self.settle_webhooks(vec![Settlement::Retry {
            id,
            error: error.to_owned(),
            next_attempt_at,
        }])
        .await
    }

    /// Gives up on a row: kept as `failed` with its error for inspection.
    pub async fn webhook_failed(&self, id: i64, error: &str, at: DateTime<Utc>) -> Result<()> {
        self.settle_webhooks(vec![Settlement::Failed {
            id,
            error: error.to_owned(),
            at,
        }])
        .await
    }

    /// Deletes processed rows older than [`RETENTION`] and failed rows and dead letters
    /// older than [`DEAD_LETTER_RETENTION`]; returns how many rows went.
    pub async fn prune_webhooks(&self, now: DateTime<Utc>) -> Result<u64> {
        if let Some(database) = self.postgres() {
            return database
                .prune_webhooks(now)
                .await
                .map_err(|error| database.named(error));
        }
        self.inbox()?.ask(|reply| Command::Prune(now, reply)).await
    }

    /// Inbox rows by state, counted from the indexes (the bodies are not read).
    pub async fn inbox_counts(&self) -> Result<InboxCounts> {
        if let Some(database) = self.postgres() {
            return database
                .inbox_counts()
                .await
                .map_err(|error| database.named(error));
        }
        self.read_inbox(|db| {
            let mut counts = InboxCounts::default();
            let mut statement = db.prepare_cached(
                "SELECT 'pending', count(*) FROM webhook_inbox INDEXED BY webhook_inbox_pending
                 WHERE state = 'pending'
                 UNION ALL
                 SELECT state, count(*) FROM webhook_inbox INDEXED BY webhook_inbox_settled
                 WHERE state <> 'pending' GROUP BY state",
            )?;
            let rows = statement.query_map([], |row| {
                Ok((row.get::<_, String>(0)?, row.get::<_, i64>(1)?))
            })?;
            for row in rows {
                let (state, count) = row?;
                counts.add(&state, count);
            }
            Ok(counts)
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::super::Enqueued;
    use super::super::tests::{event, inbox_int};
    use super::*;
    use crate::store::both_backends::on_both;

    #[tokio::test]
    async fn a_row_waiting_for_its_retry_holds_back_later_rows_of_its_connection() {
        on_both(
            "a_row_waiting_for_its_retry_holds_back_later_rows_of_its_connection",
            async |store| {
                for id in ["a", "b"] {
                    store.enqueue_webhook(event(id)).await.unwrap();
                }
                let mut other = event("c");
                other.connection = "other".into();
                store.enqueue_webhook(other).await.unwrap();
                let now = Utc::now();
                let due = store.due_webhooks(now, 10).await.unwrap();
                assert_eq!(due.len(), 3);
                store
                    .webhook_retry(
                        due[0].id,
                        "vendor down",
                        now + chrono::Duration::seconds(30),
                    )
                    .await
                    .unwrap();
                let due = store.due_webhooks(now, 10).await.unwrap();
                assert_eq!(
                    due.iter()
                        .map(|r| r.delivery_id.as_str())
                        .collect::<Vec<_>>(),
                    ["c"]
                );
                let later = store
                    .due_webhooks(now + chrono::Duration::seconds(31), 10)
                    .await
                    .unwrap();
                assert_eq!(later.len(), 3);
                assert_eq!(later[0].attempts, 1);
                assert_eq!(later[0].body, br#"{"id":1}"#);
                assert_eq!(later[0].headers, event("a").headers);
            },
        )
        .await;
    }

    #[tokio::test]
    async fn dead_letters_are_kept_for_their_retention_then_pruned_and_counted() {
        on_both(
            "dead_letters_are_kept_for_their_retention_then_pruned_and_counted",
            async |store| {
                let now = Utc::now();
                for (id, received) in [
                    ("fresh", now - chrono::Duration::days(1)),
                    (
                        "old",
                        now - DEAD_LETTER_RETENTION - chrono::Duration::hours(1),
                    ),
                ] {
                    store
                        .dead_letter(
                            "shop",
                            id,
                            None,
                            "not JSON",
                            Vec::new(),
                            bytes::Bytes::from_static(b"{"),
                            received,
                        )
                        .await
                        .unwrap();
                }
                assert_eq!(store.prune_webhooks(now).await.unwrap(), 1);
                let left: Vec<Option<String>> = store
                    .dead_letters(None, 10)
                    .await
                    .unwrap()
                    .into_iter()
                    .map(|letter| letter.delivery_id)
                    .collect();
                assert_eq!(left, [Some("fresh".to_owned())]);
            },
        )
        .await;
    }

    #[tokio::test]
    async fn processed_rows_are_pruned_only_after_the_retention() {
        on_both(
            "processed_rows_are_pruned_only_after_the_retention",
            async |store| {
                store.enqueue_webhook(event("a")).await.unwrap();
                let row = store.due_webhooks(Utc::now(), 1).await.unwrap().remove(0);
                let processed_at = Utc::now();
                store.webhook_processed(row.id, processed_at).await.unwrap();
                assert_eq!(store.inbox_pending(), 0);
                assert_eq!(store.prune_webhooks(processed_at).await.unwrap(), 0);
                // A redelivery within the retention is still a duplicate.
                assert_eq!(
                    store.enqueue_webhook(event("a")).await.unwrap(),
                    Enqueued::Duplicate
                );
                let later = processed_at + RETENTION + chrono::Duration::minutes(1);
                assert_eq!(store.prune_webhooks(later).await.unwrap(), 1);
                assert_eq!(store.inbox_counts().await.unwrap(), InboxCounts::default());
                let bodies = inbox_int(&store, "SELECT count(*) FROM webhook_bodies").await;
                assert_eq!(bodies, 0, "a pruned row's body is deleted with it");
            },
        )
        .await;
    }

    /// Counts by state: a failed row counts as failed and leaves `pending`, a retried
    /// row stays pending (on PostgreSQL a row handed out, claimed, is still pending).
    #[tokio::test]
    async fn rows_are_counted_by_state_and_a_retry_stays_pending() {
        on_both(
            "rows_are_counted_by_state_and_a_retry_stays_pending",
            async |store| {
                for id in ["a", "b", "c"] {
                    let mut event = event(id);
                    event.connection = id.into();
                    store.enqueue_webhook(event).await.unwrap();
                }
                let now = Utc::now();
                let due = store.due_webhooks(now, 10).await.unwrap();
                assert_eq!(store.inbox_counts().await.unwrap().pending, 3);
                store
                    .settle_webhooks(vec![
                        Settlement::Processed {
                            id: due[0].id,
                            at: now,
                        },
                        Settlement::Retry {
                            id: due[1].id,
                            error: "later".into(),
                            next_attempt_at: now + chrono::Duration::minutes(1),
                        },
                        Settlement::Failed {
                            id: due[2].id,
                            error: "unusable".into(),
                            at: now,
                        },
                    ])
                    .await
                    .unwrap();
                assert_eq!(
                    store.inbox_counts().await.unwrap(),
                    InboxCounts {
                        pending: 1,
                        processed: 1,
                        failed: 1
                    }
                );
                assert_eq!(store.inbox_pending(), 1);
                // A row settled already is not settled again.
                store.webhook_failed(due[0].id, "late", now).await.unwrap();
                assert_eq!(store.inbox_counts().await.unwrap().processed, 1);
            },
        )
        .await;
    }
}
