//! The webhook inbox and the dead letters, in their own SQLite file.
//!
//! A verified delivery is committed here before the HTTP handler answers 2xx; the
//! worker turns inbox rows into deals later. The inbox lives in a file of its own beside
//! the main database (`dealsync.db` → `dealsync.inbox.db`, see [`inbox_path`]), with
//! its own WAL and its own writer, so committing deliveries never waits behind deal
//! writes, and a long worker transaction never delays a delivery's 2xx. One file per idea:
//! - `writer`: the file, its schema and the one writer thread that group-commits every
//!   write; the reader connection.
//! - `intake`: storing a delivery (dedupe, backpressure) before the 2xx.
//! - `processing`: what the inbox worker reads and records: due rows, settlements,
//!   counts, pruning after the retention.
//! - `dead_letters`: deliveries that could not be parsed, kept for inspection and replay.
//!
//! Invariants:
//! - `enqueue_webhook` returns `Stored` or `Duplicate` only after the row is committed
//!   (or was already there); a caller that answers 2xx after it never loses the delivery.
//! - `(connection, delivery_id)` is unique: a redelivery is acknowledged as a duplicate
//!   and never processed twice. For body-only signers the body's hash is a second key:
//!   the same body within the scheme's replay window is a duplicate too. Processed rows are kept for [`RETENTION`], longer than
//!   any vendor retries (Shopify about 4 h, Stripe up to 3 days), then pruned.
//! - Bounded: past [`MAX_PENDING`] unprocessed rows, or with [`QUEUE`](writer::QUEUE) requests already
//!   waiting for the writer, a delivery is refused ([`EnqueueError::Full`],
//!   [`EnqueueError::Busy`]) before anything is written, so the vendor retries it later;
//!   nothing is accepted that is not stored.
//! - Rows of one connection are handed out in arrival order, and not past a row of the
//!   same connection that waits for a retry.
//! - Applying a row's changes to the main database (`deal_changes`) and marking it
//!   processed here are two commits; a crash between them applies the row again, which
//!   the upserts make a no-op.

mod dead_letters;
mod intake;
mod processing;
mod writer;

pub(in crate::store) use dead_letters::{
    DEAD_LETTER_COLUMNS, DeadLetter, ReplayInto, ReplayStart, dead_letter_from, replay_event,
    replayed_as,
};
pub use dead_letters::{Replayed, StoredDeadLetter};
pub use intake::{EnqueueError, Enqueued, NewWebhook};
pub(in crate::store) use processing::{INBOX_ROW_COLUMNS, PruneCutoffs, inbox_row_from};
pub use processing::{InboxCounts, InboxRow, Settlement};
pub(super) use writer::Inbox;
pub(in crate::store) use writer::QUEUE;
pub(super) use writer::SCHEMA;

use super::{Result, StoreError};
use std::path::{Path, PathBuf};

/// Unprocessed rows beyond which deliveries are refused (503 with `Retry-After`) until
/// the worker catches up: about 1 GB of 4 KB payloads.
pub const MAX_PENDING: u64 = 250_000;

/// How long processed rows (and so their delivery ids) are kept.
pub const RETENTION: chrono::Duration = chrono::Duration::days(7);

/// How long dead letters and permanently failed rows are kept for inspection.
pub const DEAD_LETTER_RETENTION: chrono::Duration = chrono::Duration::days(30);

/// The inbox file that belongs to the database at `db_path`: `dealsync.db` →
/// `dealsync.inbox.db`, in the same directory.
pub fn inbox_path(db_path: &Path) -> PathBuf {
    db_path.with_extension("inbox.db")
}

fn parse_headers(text: &str) -> Vec<(String, String)> {
    serde_json::from_str(text).unwrap_or_default()
}

#[cfg(test)]
pub(in crate::store) mod tests {
    use super::*;
    use bytes::Bytes;
    use chrono::Utc;

    /// A delivery of `shop` with delivery id `id`, received now.
    pub(in crate::store) fn event(id: &str) -> NewWebhook {
        NewWebhook {
            connection: "shop".into(),
            delivery_id: id.into(),
            topic: Some("checkouts/create".into()),
            headers: vec![("x-shopify-topic".into(), "checkouts/create".into())],
            body_sha256: None,
            body: Bytes::from_static(br#"{"id":1}"#),
            received_at: Utc::now(),
        }
    }

    /// Runs statements without parameters on the inbox of either backend (a fixture).
    pub(in crate::store) async fn inbox_execute(store: &crate::store::Store, sql: &str) {
        use crate::store::Engine;
        match &store.engine {
            Engine::Sqlite(_) => {
                let db = rusqlite::Connection::open(store.inbox_path().unwrap()).unwrap();
                db.execute_batch(sql).unwrap();
            }
            Engine::Postgres(postgres) => {
                let client = postgres.database.client().await.unwrap();
                client.batch_execute(sql).await.unwrap();
            }
        }
    }

    /// The integer a query without parameters answers, on the inbox of either backend.
    pub(in crate::store) async fn inbox_int(store: &crate::store::Store, sql: &str) -> i64 {
        use crate::store::Engine;
        match &store.engine {
            Engine::Sqlite(_) => {
                let sql = sql.to_owned();
                store
                    .read_inbox(move |db| Ok(db.query_row(&sql, [], |row| row.get(0))?))
                    .await
                    .unwrap()
            }
            Engine::Postgres(postgres) => {
                let client = postgres.database.client().await.unwrap();
                client.query_one(sql, &[]).await.unwrap().get(0)
            }
        }
    }

    /// The 2xx a vendor gets rests on this: the writer's commits are fsynced

    #[test]
    fn the_inbox_file_sits_beside_the_database() {
        assert_eq!(
            inbox_path(Path::new("/var/lib/dealsync/dealsync.db")),
            Path::new("/var/lib/dealsync/dealsync.inbox.db")
        );
        assert_eq!(
            inbox_path(Path::new("data/store")),
            Path::new("data/store.inbox.db")
        );
    }
}
