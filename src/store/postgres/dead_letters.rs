//! Dead letters on PostgreSQL: keeping them, listing them, replaying them into the
//! shared inbox. The contract is that of `store::inbox::dead_letters`, which documents
//! it and decides what a replay does ([`ReplayStart`], [`ReplayInto`]); this file only
//! carries it out.
//!
//! Invariants across replicas (and `dealsync inbox replay` run beside them):
//! - A dead letter is replayed at most once: the replay locks the letter's row
//!   (`FOR UPDATE`) before reading it, so a second replay of it waits for the first
//!   and then finds it replayed.
//! - Two letters of one delivery replayed at once store one inbox row: the insert is
//!   `ON CONFLICT DO NOTHING` on `(connection, delivery_id)`, and the replay that
//!   loses reads the row the other stored and answers as for a delivery already there.
//! - A failed row is put back to pending only while it is still `failed` (a row
//!   claimed or settled meanwhile is left to its holder).
//! - An inbox row and its body are written in one statement.

use super::Database;
use super::deals::pg_text;
use crate::store::inbox::{
    DEAD_LETTER_COLUMNS, DeadLetter, ReplayInto, ReplayStart, dead_letter_from, replay_event,
    replayed_as,
};
use crate::store::{NewWebhook, Replayed, Result, StoreError, StoredDeadLetter, to_json, to_ms};
use chrono::{DateTime, Utc};
use tokio_postgres::GenericClient;

/// Stores a replayed delivery and its body unless its delivery id is there; the new
/// row's id.
const INSERT_REPLAY: &str = "
WITH stored AS (
    INSERT INTO webhook_inbox (connection, delivery_id, topic, received_at)
    VALUES ($1, $2, $3, $4)
    ON CONFLICT (connection, delivery_id) DO NOTHING
    RETURNING id
), body AS (
    INSERT INTO webhook_bodies (id, headers, body) SELECT id, $5, $6 FROM stored
)
SELECT id FROM stored";

/// Dead letter `$1` with the state of the inbox row its replay became.
fn one_letter_sql() -> String {
    format!(
        "SELECT {DEAD_LETTER_COLUMNS} FROM webhook_dead_letters AS d
         LEFT JOIN webhook_inbox AS i ON i.id = d.replayed_as
         WHERE d.id = $1"
    )
}

async fn read_dead_letter(
    client: &impl GenericClient,
    id: i64,
) -> Result<Option<StoredDeadLetter>> {
    let row = client.query_opt(&one_letter_sql(), &[&id]).await?;
    Ok(row.as_ref().map(dead_letter_from).transpose()?)
}

/// The inbox row `(id, state)` of a delivery, locked for the rest of the transaction.
async fn inbox_row_of(
    client: &impl GenericClient,
    connection: &str,
    delivery_id: &str,
) -> Result<Option<(i64, String)>> {
    let row = client
        .query_opt(
            "SELECT id, state FROM webhook_inbox
              WHERE connection = $1 AND delivery_id = $2 FOR UPDATE",
            &[&pg_text(connection), &pg_text(delivery_id)],
        )
        .await?;
    Ok(row.map(|row| (row.get(0), row.get(1))))
}

/// Stores `event`; its new row's id, or `None` when its delivery id is there already.
async fn insert_replay(client: &impl GenericClient, event: &NewWebhook) -> Result<Option<i64>> {
    let row = client
        .query_opt(
            INSERT_REPLAY,
            &[
                &pg_text(&event.connection),
                &pg_text(&event.delivery_id),
                &event.topic.as_deref().map(pg_text),
                &to_ms(event.received_at),
                &to_json(&event.headers)?,
                &&event.body[..],
            ],
        )
        .await?;
    Ok(row.map(|row| row.get(0)))
}

/// Puts a failed inbox row back to pending, as if it had just arrived.
async fn requeue(client: &impl GenericClient, inbox_id: i64) -> Result<()> {
    client
        .execute(
            "UPDATE webhook_inbox SET state = 'pending', attempts = 0, next_attempt_at = NULL,
                 last_error = NULL, processed_at = NULL, claimed_by = NULL, claimed_until = NULL
              WHERE id = $1 AND state = 'failed'",
            &[&inbox_id],
        )
        .await?;
    Ok(())
}

/// Carries out what [`ReplayInto`] decides for the delivery `delivery_id` of `letter`,
/// which is not in the inbox yet or is there: what became of it.
async fn replay_into_inbox(
    client: &impl GenericClient,
    letter: &StoredDeadLetter,
    delivery_id: String,
) -> Result<Replayed> {
    let existing = inbox_row_of(client, &letter.connection, &delivery_id).await?;
    match ReplayInto::of(existing) {
        ReplayInto::Queue => {
            let event = replay_event(letter, delivery_id);
            if let Some(inbox_id) = insert_replay(client, &event).await? {
                return Ok(Replayed::Queued { inbox_id });
            }
            // Stored by a concurrent replay meanwhile (the insert waited for its
            // commit): answer as for a delivery that was there.
            let existing = inbox_row_of(client, &event.connection, &event.delivery_id).await?;
            match ReplayInto::of(existing) {
                ReplayInto::Queue => Err(StoreError::Task(format!(
                    "the inbox row of delivery {:?} changed during its replay; replay the \
                     dead letter again",
                    event.delivery_id
                ))),
                ReplayInto::Requeue { inbox_id } => {
                    requeue(client, inbox_id).await?;
                    Ok(Replayed::Requeued { inbox_id })
                }
                ReplayInto::Leave(replayed) => Ok(replayed),
            }
        }
        ReplayInto::Requeue { inbox_id } => {
            requeue(client, inbox_id).await?;
            Ok(Replayed::Requeued { inbox_id })
        }
        ReplayInto::Leave(replayed) => Ok(replayed),
    }
}

impl Database {
    /// Keeps a delivery whose signature was valid but whose body could not be parsed.
    pub(in crate::store) async fn dead_letter(&self, letter: &DeadLetter) -> Result<()> {
        self.client()
            .await?
            .execute(
                "INSERT INTO webhook_dead_letters
                     (connection, received_at, reason, headers, body, delivery_id, topic)
                 VALUES ($1, $2, $3, $4, $5, $6, $7)",
                &[
                    &pg_text(&letter.connection),
                    &to_ms(letter.at),
                    &pg_text(&letter.reason),
                    &to_json(&letter.headers)?,
                    &&letter.body[..],
                    &pg_text(&letter.delivery_id),
                    &letter.topic.as_deref().map(pg_text),
                ],
            )
            .await?;
        Ok(())
    }

    /// Dead letters kept, newest first (`connection`'s only when given).
    pub async fn dead_letters(
        &self,
        connection: Option<&str>,
        limit: u32,
    ) -> Result<Vec<StoredDeadLetter>> {
        let rows = self
            .client()
            .await?
            .query(
                &format!(
                    "SELECT {DEAD_LETTER_COLUMNS} FROM webhook_dead_letters AS d
                     LEFT JOIN webhook_inbox AS i ON i.id = d.replayed_as
                     WHERE $1::text IS NULL OR d.connection = $1
                     ORDER BY d.id DESC LIMIT $2"
                ),
                &[&connection.map(pg_text), &i64::from(limit)],
            )
            .await?;
        Ok(rows
            .iter()
            .map(dead_letter_from)
            .collect::<Result<Vec<_>, _>>()?)
    }

    /// One dead letter, with its replay's inbox row state.
    pub async fn stored_dead_letter(&self, id: i64) -> Result<Option<StoredDeadLetter>> {
        read_dead_letter(&**self.client().await?, id).await
    }

    /// Replays dead letter `id` into the inbox at most once, in one transaction (see the
    /// module's invariants).
    pub async fn replay_dead_letter(&self, id: i64, at: DateTime<Utc>) -> Result<Replayed> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        // Locked first, read after: the read sees what a replay that held it wrote.
        tx.execute(
            "SELECT 1 FROM webhook_dead_letters WHERE id = $1 FOR UPDATE",
            &[&id],
        )
        .await?;
        let letter = read_dead_letter(&*tx, id).await?;
        let delivery_id = match ReplayStart::of(letter.as_ref()) {
            ReplayStart::Answer(replayed) => return Ok(replayed),
            ReplayStart::RequeueAgain { inbox_id } => {
                requeue(&*tx, inbox_id).await?;
                tx.execute(
                    "UPDATE webhook_dead_letters SET replayed_at = $2 WHERE id = $1",
                    &[&id, &to_ms(at)],
                )
                .await?;
                tx.commit().await?;
                return Ok(Replayed::Requeued { inbox_id });
            }
            ReplayStart::Lookup { delivery_id } => delivery_id,
        };
        let Some(letter) = letter else {
            return Ok(Replayed::NotFound);
        };
        let replayed = replay_into_inbox(&*tx, &letter, delivery_id).await?;
        tx.execute(
            "UPDATE webhook_dead_letters SET replayed_at = $2, replayed_as = $3 WHERE id = $1",
            &[&id, &to_ms(at), &replayed_as(&replayed)],
        )
        .await?;
        tx.commit().await?;
        Ok(replayed)
    }
}
