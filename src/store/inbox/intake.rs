//! Storing a verified delivery before the 2xx: dedupe by delivery id (and, for
//! body-only signers, by the body's hash within its replay window) and backpressure.
//!
//! Invariants:
//! - `enqueue_webhook` answers `Stored` or `Duplicate` only after the writer committed
//!   the row (or found it there); a refusal (`Full`, `Busy`) wrote nothing.
//! - A row's headers and body go in `webhook_bodies`, in the transaction of its row.

use super::writer::{Command, QUEUE, stopped};
use super::{MAX_PENDING, Result, StoreError};
use crate::store::{Engine, Store, to_json, to_ms};
use bytes::Bytes;
use chrono::{DateTime, Utc};
use rusqlite::params;
use std::sync::atomic::Ordering;
use tokio::sync::{Notify, mpsc, oneshot};

/// A verified delivery to store.
#[derive(Debug, Clone)]
pub struct NewWebhook {
    pub connection: String,
    pub delivery_id: String,
    pub topic: Option<String>,
    /// Lower-case header names and values, without signature or auth headers.
    pub headers: Vec<(String, String)>,
    /// For schemes that sign only the body: its SHA-256 and the window within which
    /// the same body received again by this connection is a duplicate, whatever
    /// delivery id it carries (see `Scheme::body_replay_window`).
    pub body_sha256: Option<([u8; 32], std::time::Duration)>,
    /// The raw body, exactly as received.
    pub body: Bytes,
    pub received_at: DateTime<Utc>,
}

/// What storing a delivery did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Enqueued {
    /// A new row, now committed.
    Stored,
    /// The same (connection, delivery id) was already in the inbox, or, for a body-only
    /// signer, the same body within its replay window.
    Duplicate,
}

/// Why a delivery was not stored. `Full` and `Busy` wrote nothing and are worth a retry
/// by the sender after [`EnqueueError::retry_after`].
#[derive(Debug, thiserror::Error)]
pub enum EnqueueError {
    #[error("the webhook inbox holds {pending} unprocessed deliveries, its limit")]
    Full { pending: u64 },
    #[error("{QUEUE} deliveries are already waiting to be committed")]
    Busy,
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl EnqueueError {
    /// How long the sender should wait before retrying, when a retry can help.
    pub fn retry_after(&self) -> Option<std::time::Duration> {
        match self {
            EnqueueError::Full { .. } => Some(std::time::Duration::from_secs(30)),
            EnqueueError::Busy => Some(std::time::Duration::from_secs(1)),
            EnqueueError::Store(error) if error.is_disk_full() => {
                Some(std::time::Duration::from_secs(60))
            }
            // PostgreSQL restarting or out of reach: a replica answers 503 meanwhile.
            EnqueueError::Store(error) if error.is_unavailable() => {
                Some(std::time::Duration::from_secs(5))
            }
            EnqueueError::Store(_) => None,
        }
    }
}

pub(super) fn insert(tx: &rusqlite::Transaction<'_>, event: &NewWebhook) -> Result<Enqueued> {
    if let Some((sha256, window)) = &event.body_sha256 {
        let since = chrono::Duration::from_std(*window)
            .ok()
            .and_then(|window| event.received_at.checked_sub_signed(window))
            .unwrap_or(DateTime::<Utc>::MIN_UTC);
        // Earlier rows of this batch are in the transaction, so they count too.
        let seen = tx
            .prepare_cached(
                "SELECT 1 FROM webhook_inbox
                 WHERE connection = ?1 AND body_sha256 = ?2 AND received_at >= ?3",
            )?
            .exists(params![event.connection, &sha256[..], to_ms(since)])?;
        if seen {
            return Ok(Enqueued::Duplicate);
        }
    }
    let inserted = tx
        .prepare_cached(
            "INSERT INTO webhook_inbox (connection, delivery_id, topic, received_at, body_sha256)
             VALUES (?1, ?2, ?3, ?4, ?5)
             ON CONFLICT (connection, delivery_id) DO NOTHING",
        )?
        .execute(params![
            event.connection,
            event.delivery_id,
            event.topic,
            to_ms(event.received_at),
            event.body_sha256.as_ref().map(|(sha256, _)| &sha256[..]),
        ])?;
    if inserted == 0 {
        return Ok(Enqueued::Duplicate);
    }
    tx.prepare_cached("INSERT INTO webhook_bodies (id, headers, body) VALUES (?1, ?2, ?3)")?
        .execute(params![
            tx.last_insert_rowid(),
            to_json(&event.headers)?,
            &event.body[..],
        ])?;
    Ok(Enqueued::Stored)
}

impl Store {
    /// Commits a verified delivery to the inbox (grouped with concurrent ones into one
    /// transaction) and returns once it is durable. Refuses it, writing nothing, when
    /// the inbox is full or the writer's queue is.
    pub async fn enqueue_webhook(&self, event: NewWebhook) -> Result<Enqueued, EnqueueError> {
        if let Engine::Postgres(postgres) = &self.engine {
            return postgres.intake.enqueue(event).await;
        }
        self.inbox_has_room()?;
        let inbox = self.inbox()?;
        let (reply, answer) = oneshot::channel();
        inbox
            .queue
            .try_send(Command::Insert(event, reply))
            .map_err(|error| match error {
                mpsc::error::TrySendError::Full(_) => EnqueueError::Busy,
                mpsc::error::TrySendError::Closed(_) => stopped().into(),
            })?;
        Ok(answer.await.map_err(|_| stopped())??)
    }

    /// `Err(Full)` when the inbox holds [`MAX_PENDING`] unprocessed rows: checked again
    /// by `enqueue_webhook`, offered so a caller can refuse before doing other work.
    pub fn inbox_has_room(&self) -> Result<(), EnqueueError> {
        let pending = self.inbox_pending();
        if pending >= MAX_PENDING {
            return Err(EnqueueError::Full { pending });
        }
        Ok(())
    }

    /// Unprocessed inbox rows, as counted by the writer (no query).
    pub fn inbox_pending(&self) -> u64 {
        match &self.engine {
            Engine::Sqlite(inner) => inner.inbox.shared.pending.load(Ordering::Relaxed),
            Engine::Postgres(postgres) => postgres.intake.pending(),
        }
    }

    /// Notified after every committed batch that stored a new delivery.
    pub fn inbox_committed(&self) -> &Notify {
        match &self.engine {
            Engine::Sqlite(inner) => &inner.inbox.shared.committed,
            Engine::Postgres(postgres) => postgres.intake.committed(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::InboxCounts;
    use super::super::tests::event;
    use super::*;
    use crate::store::both_backends::on_both;
    use crate::store::tests::temp_store;

    #[tokio::test]
    async fn concurrent_deliveries_are_committed_and_duplicates_are_recognised() {
        on_both(
            "concurrent_deliveries_are_committed_and_duplicates_are_recognised",
            async |store| concurrent_deliveries(store).await,
        )
        .await;
    }

    async fn concurrent_deliveries(store: Store) {
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
        assert_eq!(store.inbox_pending(), 100);
    }

    /// SQLite only: the PostgreSQL intake's body window is tested in
    /// `store::postgres::intake` (out of this group's reach).
    #[tokio::test]
    async fn a_body_only_signed_body_seen_within_its_window_is_a_duplicate_under_any_delivery_id() {
        let (_dir, store) = temp_store();
        let window = std::time::Duration::from_secs(48 * 3600);
        let now = Utc::now();
        let signed = |id: &str, connection: &str, body: &'static [u8], at: DateTime<Utc>| {
            let mut event = event(id);
            event.connection = connection.into();
            event.body = Bytes::from_static(body);
            event.body_sha256 = Some((<sha2::Sha256 as sha2::Digest>::digest(body).into(), window));
            event.received_at = at;
            event
        };
        let first = signed(
            "d-1",
            "shop",
            br#"{"token":"t"}"#,
            now - chrono::Duration::hours(47),
        );
        assert_eq!(
            store.enqueue_webhook(first).await.unwrap(),
            Enqueued::Stored
        );
        // The same body under a new delivery id, inside the window: a duplicate.
        let replay = signed("d-2", "shop", br#"{"token":"t"}"#, now);
        assert_eq!(
            store.enqueue_webhook(replay).await.unwrap(),
            Enqueued::Duplicate
        );
        // Another body, or the same body for another connection: new.
        let other = signed("d-3", "shop", br#"{"token":"u"}"#, now);
        assert_eq!(
            store.enqueue_webhook(other).await.unwrap(),
            Enqueued::Stored
        );
        let elsewhere = signed("d-1", "shop-eu", br#"{"token":"t"}"#, now);
        assert_eq!(
            store.enqueue_webhook(elsewhere).await.unwrap(),
            Enqueued::Stored
        );
        // Past the window the body is taken again.
        let later = signed(
            "d-4",
            "shop",
            br#"{"token":"t"}"#,
            now + chrono::Duration::hours(2),
        );
        assert_eq!(
            store.enqueue_webhook(later).await.unwrap(),
            Enqueued::Stored
        );
        // Two identical bodies in one batch: one is stored.
        let (a, b) = tokio::join!(
            store.enqueue_webhook(signed("d-5", "shop", br#"{"token":"v"}"#, now)),
            store.enqueue_webhook(signed("d-6", "shop", br#"{"token":"v"}"#, now)),
        );
        let mut outcomes = [a.unwrap(), b.unwrap()];
        outcomes.sort_by_key(|o| *o == Enqueued::Duplicate);
        assert_eq!(outcomes, [Enqueued::Stored, Enqueued::Duplicate]);
        assert_eq!(store.inbox_pending(), 5);
    }

    /// What a refused sender is told to wait (`Retry-After`): only when a retry can help.
    #[test]
    fn a_refusal_says_when_to_retry_only_when_a_retry_can_help() {
        use crate::store::DbError;
        use std::time::Duration;
        assert_eq!(
            EnqueueError::Full {
                pending: MAX_PENDING
            }
            .retry_after(),
            Some(Duration::from_secs(30))
        );
        assert_eq!(
            EnqueueError::Busy.retry_after(),
            Some(Duration::from_secs(1))
        );
        let full = EnqueueError::Store(StoreError::Database(DbError::disk_full()));
        assert_eq!(full.retry_after(), Some(Duration::from_secs(60)));
        let busy = EnqueueError::Store(StoreError::Database(DbError::busy()));
        assert_eq!(busy.retry_after(), None);
        let corrupt = EnqueueError::Store(StoreError::Corrupt("bad row".into()));
        assert_eq!(corrupt.retry_after(), None);
    }

    /// On PostgreSQL the count behind `inbox_has_room` is the intake's: a replica that
    /// refuses deliveries as full counts again when its worker looks for due rows, so
    /// once rows are settled (by any replica) it takes deliveries again.
    #[tokio::test]
    async fn a_full_inbox_on_postgresql_takes_deliveries_again_once_rows_are_settled() {
        let name = "a_full_inbox_on_postgresql_takes_deliveries_again_once_rows_are_settled";
        // PostgreSQL only: the SQLite writer counts every settlement itself (above).
        let Some(test) = crate::store::postgres::test_database(name) else {
            return;
        };
        let url = crate::store::postgres::tests::url_of(&test);
        let store = Store::open_postgres(&url).await.unwrap();
        store.enqueue_webhook(event("a")).await.unwrap();
        let Engine::Postgres(postgres) = &store.engine else {
            unreachable!("a PostgreSQL store")
        };
        // As counted while the inbox was full.
        postgres.intake.added(MAX_PENDING);
        assert!(matches!(
            store.inbox_has_room(),
            Err(EnqueueError::Full { .. })
        ));
        let due = store.due_webhooks(Utc::now(), 10).await.unwrap();
        assert_eq!(due.len(), 1);
        assert_eq!(store.inbox_pending(), 1, "counted again: the claimed row");
        store
            .webhook_processed(due[0].id, Utc::now())
            .await
            .unwrap();
        assert_eq!(store.inbox_pending(), 0);
        store.inbox_has_room().unwrap();
        assert_eq!(
            store.enqueue_webhook(event("b")).await.unwrap(),
            Enqueued::Stored
        );
    }

    /// PostgreSQL only (the SQLite writer counts every settlement itself): the intake's
    /// count drifts when a settlement races the writer's own count (seen in the intake
    /// bench: a pass settled between the writer's count query and its store left 256
    /// rows counted for good once the load stopped). An idle worker pass counts again.
    #[tokio::test]
    async fn on_postgresql_an_idle_worker_pass_sets_a_drifted_pending_count_right() {
        let name = "on_postgresql_an_idle_worker_pass_sets_a_drifted_pending_count_right";
        let Some(test) = crate::store::postgres::test_database(name) else {
            return;
        };
        let url = crate::store::postgres::tests::url_of(&test);
        let store = Store::open_postgres(&url).await.unwrap();
        store.enqueue_webhook(event("a")).await.unwrap();
        let due = store.due_webhooks(Utc::now(), 10).await.unwrap();
        store
            .webhook_processed(due[0].id, Utc::now())
            .await
            .unwrap();
        let Engine::Postgres(postgres) = &store.engine else {
            unreachable!("a PostgreSQL store")
        };
        // The lost decrement of the race.
        postgres.intake.added(256);
        assert_eq!(store.inbox_pending(), 256);
        assert!(store.due_webhooks(Utc::now(), 10).await.unwrap().is_empty());
        assert_eq!(store.inbox_pending(), 0);
        // Once a second at most: with replicas a worker finds nothing due many times a
        // second while another replica applies the rows, and counted at each.
        postgres.intake.added(7);
        assert!(store.due_webhooks(Utc::now(), 10).await.unwrap().is_empty());
        assert_eq!(store.inbox_pending(), 7, "counted again within the second");
        tokio::time::sleep(std::time::Duration::from_millis(1_100)).await;
        assert!(store.due_webhooks(Utc::now(), 10).await.unwrap().is_empty());
        assert_eq!(store.inbox_pending(), 0);
    }

    /// SQLite only: it sets the SQLite writer's count; the PostgreSQL intake's refusal
    /// is tested above and in `store::postgres::intake`.
    #[tokio::test]
    async fn a_full_inbox_refuses_a_delivery_and_writes_nothing() {
        let (_dir, store) = temp_store();
        store
            .inbox()
            .unwrap()
            .shared
            .pending
            .store(MAX_PENDING, Ordering::Relaxed);
        let refused = store.enqueue_webhook(event("late")).await.unwrap_err();
        assert!(matches!(refused, EnqueueError::Full { .. }), "{refused}");
        assert_eq!(
            refused.retry_after(),
            Some(std::time::Duration::from_secs(30))
        );
        assert_eq!(store.inbox_counts().await.unwrap(), InboxCounts::default());
    }
}
