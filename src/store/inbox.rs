//! The webhook inbox and the dead letters.
//!
//! A verified delivery is committed here before the HTTP handler answers 2xx; a worker
//! turns inbox rows into deals later. Inserts go through one group-commit writer thread:
//! concurrent requests queue on a bounded channel, the thread drains up to
//! [`MAX_BATCH`] of them into one transaction, commits it with `synchronous = FULL`
//! (one fsync for the whole batch), and only then answers each request.
//!
//! Invariants:
//! - `enqueue_webhook` returns only after the row is committed (or was already there);
//!   a caller that answers 2xx after it never loses the delivery.
//! - `(connection, delivery_id)` is unique: a redelivery is acknowledged as a duplicate
//!   and never processed twice. Processed rows are kept for [`RETENTION`], longer than
//!   any vendor retries (Shopify about 4 h, Stripe up to 3 days), then pruned.
//! - Rows of one connection are handed out in arrival order, and not past a row of the
//!   same connection that waits for a retry.

use super::{Inner, Result, Store, StoreError, from_ms, to_ms};
use chrono::{DateTime, Utc};
use rusqlite::params;
use std::sync::{Arc, Weak};
use tokio::sync::{Notify, mpsc, oneshot};

/// Most inserts committed in one transaction.
pub const MAX_BATCH: usize = 512;

/// Requests that may wait for the writer; beyond this, callers wait to enqueue.
const QUEUE: usize = 8192;

/// How long processed rows (and so their delivery ids) are kept.
pub const RETENTION: chrono::Duration = chrono::Duration::days(7);

/// How long dead letters and permanently failed rows are kept for inspection.
pub const DEAD_LETTER_RETENTION: chrono::Duration = chrono::Duration::days(30);

/// A verified delivery to store.
#[derive(Debug, Clone)]
pub struct NewWebhook {
    pub connection: String,
    pub delivery_id: String,
    pub topic: Option<String>,
    /// Lower-case header names and values, without signature or auth headers.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    pub received_at: DateTime<Utc>,
}

/// What storing a delivery did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Enqueued {
    /// A new row, now committed.
    Stored,
    /// The same (connection, delivery id) was already in the inbox.
    Duplicate,
}

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

/// One change a webhook row asks for, ready to write.
#[derive(Debug, Clone)]
pub enum InboxOp {
    /// A cart or an order: applied through the cart rules.
    Cart(super::DealUpsert),
    /// Any other record.
    Upsert(super::DealUpsert),
    /// The record was deleted in its source.
    Delete {
        connection: String,
        external_id: String,
    },
}

struct Pending {
    event: NewWebhook,
    reply: oneshot::Sender<Result<Enqueued>>,
}

/// The sending side of the group-commit writer, created on first use.
pub(super) struct InboxWriter {
    queue: mpsc::Sender<Pending>,
    /// Woken after each committed batch, so the processing worker need not poll.
    committed: Arc<Notify>,
}

impl InboxWriter {
    pub(super) fn start(inner: Weak<Inner>) -> InboxWriter {
        let (queue, receiver) = mpsc::channel(QUEUE);
        let committed = Arc::new(Notify::new());
        let notify = committed.clone();
        std::thread::Builder::new()
            .name("dealsync-inbox".into())
            .spawn(move || run_writer(inner, receiver, notify))
            .expect("spawning the inbox writer thread");
        InboxWriter { queue, committed }
    }
}

/// The writer thread: one transaction per drained batch. It holds only a weak handle,
/// so it ends when the store is dropped (the channel closes with it).
fn run_writer(inner: Weak<Inner>, mut receiver: mpsc::Receiver<Pending>, committed: Arc<Notify>) {
    let mut batch: Vec<Pending> = Vec::with_capacity(MAX_BATCH);
    while let Some(first) = receiver.blocking_recv() {
        batch.push(first);
        while batch.len() < MAX_BATCH {
            match receiver.try_recv() {
                Ok(next) => batch.push(next),
                Err(_) => break,
            }
        }
        let result = match inner.upgrade() {
            Some(inner) => commit_batch(&inner, &batch),
            None => Err(StoreError::Task("the store is closed".into())),
        };
        match result {
            Ok(outcomes) => {
                for (pending, outcome) in batch.drain(..).zip(outcomes) {
                    let _ = pending.reply.send(Ok(outcome));
                }
                committed.notify_one();
            }
            Err(error) => {
                let message = error.to_string();
                for pending in batch.drain(..) {
                    let _ = pending.reply.send(Err(StoreError::Task(format!(
                        "committing the webhook inbox: {message}"
                    ))));
                }
            }
        }
    }
}

fn commit_batch(inner: &Inner, batch: &[Pending]) -> Result<Vec<Enqueued>> {
    let mut connection = inner
        .writer
        .lock()
        .map_err(|_| StoreError::Task("writer lock poisoned".into()))?;
    // FULL for this one transaction: its commit is the fsync that makes every delivery
    // in the batch durable against power loss too, not only against a process crash.
    connection.pragma_update(None, "synchronous", "FULL")?;
    let result = (|| {
        let tx = connection.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let mut outcomes = Vec::with_capacity(batch.len());
        {
            let mut insert = tx.prepare_cached(
                "INSERT INTO webhook_inbox (connection, delivery_id, topic, received_at, headers, body)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)
                 ON CONFLICT (connection, delivery_id) DO NOTHING",
            )?;
            for pending in batch {
                let event = &pending.event;
                let headers = serde_json::to_string(&event.headers)
                    .map_err(|error| StoreError::Corrupt(error.to_string()))?;
                let inserted = insert.execute(params![
                    event.connection,
                    event.delivery_id,
                    event.topic,
                    to_ms(event.received_at),
                    headers,
                    event.body,
                ])?;
                outcomes.push(if inserted == 1 {
                    Enqueued::Stored
                } else {
                    Enqueued::Duplicate
                });
            }
        }
        tx.commit()?;
        Ok(outcomes)
    })();
    connection.pragma_update(None, "synchronous", "NORMAL")?;
    result
}

fn parse_headers(text: &str) -> Vec<(String, String)> {
    serde_json::from_str(text).unwrap_or_default()
}

impl Store {
    fn inbox_writer(&self) -> &InboxWriter {
        self.inner
            .inbox
            .get_or_init(|| InboxWriter::start(Arc::downgrade(&self.inner)))
    }

    /// Commits a verified delivery to the inbox (grouped with concurrent ones into one
    /// transaction) and returns once it is durable.
    pub async fn enqueue_webhook(&self, event: NewWebhook) -> Result<Enqueued> {
        let (reply, answer) = oneshot::channel();
        self.inbox_writer()
            .queue
            .send(Pending { event, reply })
            .await
            .map_err(|_| StoreError::Task("the inbox writer has stopped".into()))?;
        answer
            .await
            .map_err(|_| StoreError::Task("the inbox writer has stopped".into()))?
    }

    /// Notified after every committed inbox batch.
    pub fn inbox_committed(&self) -> Arc<Notify> {
        self.inbox_writer().committed.clone()
    }

    /// Applies the changes of several inbox rows and marks them processed, all in one
    /// transaction (one commit for a whole worker pass instead of two per row).
    pub async fn apply_webhook_batch(
        &self,
        items: Vec<(i64, Vec<InboxOp>)>,
        rules: super::CartRules,
        now: DateTime<Utc>,
    ) -> Result<()> {
        self.write(move |tx| {
            for (id, ops) in &items {
                for op in ops {
                    match op {
                        InboxOp::Cart(upsert) => {
                            super::carts::apply(tx, upsert, rules)?;
                        }
                        InboxOp::Upsert(upsert) => {
                            super::deals::upsert_all(tx, vec![upsert.clone()])?;
                        }
                        InboxOp::Delete {
                            connection,
                            external_id,
                        } => {
                            super::carts::mark_deleted(tx, connection, external_id, now)?;
                        }
                    }
                }
                tx.execute(
                    "UPDATE webhook_inbox SET state = 'processed', processed_at = ?2,
                        next_attempt_at = NULL WHERE id = ?1",
                    params![id, to_ms(now)],
                )?;
            }
            Ok(())
        })
        .await
    }

    /// Keeps a delivery whose signature was valid but whose body could not be parsed.
    pub async fn dead_letter(
        &self,
        connection: &str,
        reason: &str,
        headers: &[(String, String)],
        body: Vec<u8>,
        at: DateTime<Utc>,
    ) -> Result<()> {
        let (connection, reason) = (connection.to_owned(), reason.to_owned());
        let headers = serde_json::to_string(headers)
            .map_err(|error| StoreError::Corrupt(error.to_string()))?;
        self.write(move |tx| {
            tx.execute(
                "INSERT INTO webhook_dead_letters (connection, received_at, reason, headers, body)
                 VALUES (?1, ?2, ?3, ?4, ?5)",
                params![connection, to_ms(at), reason, headers, body],
            )?;
            Ok(())
        })
        .await
    }

    /// Pending rows due at `now`, oldest first, at most `limit`. A connection with a row
    /// waiting for its retry contributes nothing, so its order is kept.
    pub async fn due_webhooks(&self, now: DateTime<Utc>, limit: u32) -> Result<Vec<InboxRow>> {
        self.read(move |db| {
            let mut statement = db.prepare_cached(
                "SELECT id, connection, delivery_id, topic, headers, body, received_at, attempts
                 FROM webhook_inbox
                 WHERE state = 'pending' AND coalesce(next_attempt_at, 0) <= ?1
                   AND connection NOT IN (SELECT connection FROM webhook_inbox
                        WHERE state = 'pending' AND next_attempt_at > ?1)
                 ORDER BY id LIMIT ?2",
            )?;
            let rows = statement.query_map(params![to_ms(now), limit], |row| {
                Ok(InboxRow {
                    id: row.get(0)?,
                    connection: row.get(1)?,
                    delivery_id: row.get(2)?,
                    topic: row.get(3)?,
                    headers: parse_headers(&row.get::<_, String>(4)?),
                    body: row.get(5)?,
                    received_at: from_ms(row.get(6)?),
                    attempts: row.get::<_, i64>(7)?.max(0) as u32,
                })
            })?;
            Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
        })
        .await
    }

    /// Marks a row processed.
    pub async fn webhook_processed(&self, id: i64, at: DateTime<Utc>) -> Result<()> {
        self.write(move |tx| {
            tx.execute(
                "UPDATE webhook_inbox SET state = 'processed', processed_at = ?2,
                    next_attempt_at = NULL WHERE id = ?1",
                params![id, to_ms(at)],
            )?;
            Ok(())
        })
        .await
    }

    /// Records a failed attempt; the row is retried at `next_attempt_at`.
    pub async fn webhook_retry(
        &self,
        id: i64,
        error: &str,
        next_attempt_at: DateTime<Utc>,
    ) -> Result<()> {
        let error = error.to_owned();
        self.write(move |tx| {
            tx.execute(
                "UPDATE webhook_inbox SET attempts = attempts + 1, last_error = ?2,
                    next_attempt_at = ?3 WHERE id = ?1",
                params![id, error, to_ms(next_attempt_at)],
            )?;
            Ok(())
        })
        .await
    }

    /// Gives up on a row: kept as `failed` with its error for inspection.
    pub async fn webhook_failed(&self, id: i64, error: &str, at: DateTime<Utc>) -> Result<()> {
        let error = error.to_owned();
        self.write(move |tx| {
            tx.execute(
                "UPDATE webhook_inbox SET state = 'failed', attempts = attempts + 1,
                    last_error = ?2, processed_at = ?3, next_attempt_at = NULL WHERE id = ?1",
                params![id, error, to_ms(at)],
            )?;
            Ok(())
        })
        .await
    }

    /// Deletes processed rows older than [`RETENTION`] and failed rows and dead letters
    /// older than [`DEAD_LETTER_RETENTION`]; returns how many rows went.
    pub async fn prune_webhooks(&self, now: DateTime<Utc>) -> Result<u64> {
        self.write(move |tx| {
            let processed = tx.execute(
                "DELETE FROM webhook_inbox WHERE state = 'processed' AND processed_at < ?1",
                [to_ms(now - RETENTION)],
            )?;
            let failed = tx.execute(
                "DELETE FROM webhook_inbox WHERE state = 'failed' AND processed_at < ?1",
                [to_ms(now - DEAD_LETTER_RETENTION)],
            )?;
            let dead = tx.execute(
                "DELETE FROM webhook_dead_letters WHERE received_at < ?1",
                [to_ms(now - DEAD_LETTER_RETENTION)],
            )?;
            Ok((processed + failed + dead) as u64)
        })
        .await
    }

    /// Inbox rows by state.
    pub async fn inbox_counts(&self) -> Result<InboxCounts> {
        self.read(|db| {
            let mut counts = InboxCounts::default();
            let mut statement =
                db.prepare("SELECT state, count(*) FROM webhook_inbox GROUP BY state")?;
            let rows = statement.query_map([], |row| {
                Ok((row.get::<_, String>(0)?, row.get::<_, i64>(1)?))
            })?;
            for row in rows {
                let (state, count) = row?;
                let count = count.max(0) as u64;
                match state.as_str() {
                    "pending" => counts.pending = count,
                    "processed" => counts.processed = count,
                    _ => counts.failed += count,
                }
            }
            Ok(counts)
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::tests::temp_store;

    fn event(id: &str) -> NewWebhook {
        NewWebhook {
            connection: "shop".into(),
            delivery_id: id.into(),
            topic: Some("checkouts/create".into()),
            headers: vec![("x-shopify-topic".into(), "checkouts/create".into())],
            body: br#"{"id":1}"#.to_vec(),
            received_at: Utc::now(),
        }
    }

    #[tokio::test]
    async fn concurrent_deliveries_are_committed_and_duplicates_are_recognised() {
        let (_dir, store) = temp_store();
        let mut handles = Vec::new();
        for n in 0..200 {
            let store = store.clone();
            // Every delivery id twice: one of each pair is a duplicate.
            handles.push(tokio::spawn(async move {
                store.enqueue_webhook(event(&format!("d-{}", n / 2))).await
            }));
        }
        let mut stored = 0;
        let mut duplicates = 0;
        for handle in handles {
            match handle.await.unwrap().unwrap() {
                Enqueued::Stored => stored += 1,
                Enqueued::Duplicate => duplicates += 1,
            }
        }
        assert_eq!((stored, duplicates), (100, 100));
        assert_eq!(store.inbox_counts().await.unwrap().pending, 100);
    }

    #[tokio::test]
    async fn a_row_waiting_for_its_retry_holds_back_later_rows_of_its_connection() {
        let (_dir, store) = temp_store();
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
    }

    #[tokio::test]
    async fn processed_rows_are_pruned_only_after_the_retention() {
        let (_dir, store) = temp_store();
        store.enqueue_webhook(event("a")).await.unwrap();
        let row = store.due_webhooks(Utc::now(), 1).await.unwrap().remove(0);
        let processed_at = Utc::now();
        store.webhook_processed(row.id, processed_at).await.unwrap();
        assert_eq!(store.prune_webhooks(processed_at).await.unwrap(), 0);
        // A redelivery within the retention is still a duplicate.
        assert_eq!(
            store.enqueue_webhook(event("a")).await.unwrap(),
            Enqueued::Duplicate
        );
        let later = processed_at + RETENTION + chrono::Duration::minutes(1);
        assert_eq!(store.prune_webhooks(later).await.unwrap(), 1);
        assert_eq!(store.inbox_counts().await.unwrap(), InboxCounts::default());
    }
}
