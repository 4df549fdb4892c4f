//! The store: the only module that knows SQL or rusqlite.
//!
//! SQLite with WAL and a busy timeout. One writer connection behind a mutex (SQLite
//! has one writer anyway; serializing here avoids `SQLITE_BUSY` storms) and a small
//! pool of reader connections. Every call runs on tokio's blocking pool, never on the
//! async executor threads.
//!
//! Invariants:
//! - Migrations are embedded and applied in one transaction at open; a database whose
//!   schema is newer than this binary's is refused and left untouched.
//! - A deal's stage change and its history row commit in the same transaction.
//! - A page's deals and the sync cursor commit in the same transaction.
//! - After a write transaction that appended stage history commits (and only then),
//!   `stage_changes()` subscribers are woken: the follow-up scheduler enrolls at once
//!   instead of waiting for its next pass.
//! - The webhook inbox is a second file beside the database, with its own writer
//!   (`inbox`), so webhook intake never waits for the deal writer.

mod carts;
mod deals;
mod digests;
mod inbox;
mod migrations;
mod outbox;
mod report;
mod suppression;
mod sync;
mod tokens;

pub use carts::{CartOutcome, CartRules};
pub use deals::{DealFilter, DealUpsert, StageCount, UnmappedStage, UpsertOutcome};
pub use digests::{AssembleOutcome, DigestClaim, DigestFinish, DigestRow, DigestWatch};
pub use inbox::{
    EnqueueError, Enqueued, InboxCounts, InboxOp, InboxRow, NewWebhook, Settlement, inbox_path,
};
pub use migrations::SCHEMA_VERSION;
pub use outbox::{
    Claim, ClaimDecision, ClaimFacts, ClaimQuery, EarlierEnrollment, EnrollOutcome, EnrollPlan,
    NewOutboxRow, OutboxAction, OutboxRow, OutboxRowFilter, OutboxState, StageEntry,
};
pub use report::{
    OutboxCount, OutboxEntry, OutboxFilter, ReportScope, StageValue, StallCutoff, StalledCount,
};
pub use suppression::Suppression;
pub use sync::{Quarantined, SyncRunRecord};
pub use tokens::StoredToken;

use chrono::{DateTime, TimeZone, Utc};
use rusqlite::Connection;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("opening database {path}: {source}")]
    Open {
        path: String,
        source: rusqlite::Error,
    },
    #[error("creating directory {path}: {source}")]
    CreateDir {
        path: String,
        source: std::io::Error,
    },
    #[error(
        "database {path} has schema version {found}, newer than this dealsync understands ({supported}); \
         upgrade dealsync or restore a backup — the file was not modified"
    )]
    NewerSchema {
        path: String,
        found: i64,
        supported: i64,
    },
    #[error("migrating database to version {version}: {source}")]
    Migration {
        version: i64,
        source: rusqlite::Error,
    },
    #[error("database error: {0}")]
    Sql(#[from] rusqlite::Error),
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
    #[error("database task failed: {0}")]
    Task(String),
}

impl StoreError {
    /// Whether the disk is full or read-only: the caller should pause, not drop data.
    pub fn is_disk_full(&self) -> bool {
        matches!(
            self,
            StoreError::Sql(rusqlite::Error::SqliteFailure(e, _))
                if e.code == rusqlite::ErrorCode::DiskFull
        )
    }
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

const READERS: usize = 4;

/// WAL pages between automatic checkpoints (see `configure`).
const WAL_AUTOCHECKPOINT_PAGES: i64 = 4_096;

struct Inner {
    path: PathBuf,
    /// The one writer. A std mutex: held only inside blocking tasks, never across `.await`.
    writer: Mutex<Connection>,
    /// Idle reader connections; a reader is opened on demand when none is idle.
    readers: Mutex<Vec<Connection>>,
    /// The webhook inbox: its own file, writer thread and reader.
    inbox: inbox::Inbox,
    /// Set by the writer's update hook when a transaction inserts a stage-history row.
    stage_changed: Arc<AtomicBool>,
    /// Bumped after such a transaction commits; see `Store::stage_changes`.
    stage_changes: tokio::sync::watch::Sender<u64>,
}

/// A handle to the database; cheap to clone.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("path", &self.inner.path)
            .finish()
    }
}

fn open_connection(path: &Path) -> Result<Connection> {
    let connection = Connection::open(path).map_err(|source| StoreError::Open {
        path: path.display().to_string(),
        source,
    })?;
    connection.busy_timeout(Duration::from_secs(10))?;
    // A larger page cache and memory-mapped reads keep index lookups off the
    // read() path as the deals table grows.
    connection.pragma_update(None, "cache_size", -8_192)?;

    connection.pragma_update(None, "temp_store", "MEMORY")?;
    Ok(connection)
}

fn configure(connection: &Connection) -> Result<()> {
    connection.pragma_update(None, "journal_mode", "WAL")?;
    // NORMAL is durable across process crashes in WAL mode; a power loss may drop
    // the last transactions but never corrupts. `storage.synchronous` may raise it.
    connection.pragma_update(None, "synchronous", "NORMAL")?;
    // Checkpoint every 4,096 WAL pages (16 MiB at 4 KiB pages) instead of SQLite's
    // 1,000: a page rewritten by several commits between checkpoints is copied into
    // the database file once, which cut the checkpoint share of a bulk upsert. It does
    // not change durability; the WAL file grows to about this size and is reused.
    connection.pragma_update(None, "wal_autocheckpoint", WAL_AUTOCHECKPOINT_PAGES)?;
    connection.pragma_update(None, "foreign_keys", "ON")?;
    Ok(())
}

impl Store {
    /// Opens (creating if needed) and migrates the database. Blocking.
    pub fn open(path: &Path) -> Result<Store> {
        if let Some(parent) = path.parent()
            && !parent.as_os_str().is_empty()
        {
            std::fs::create_dir_all(parent).map_err(|source| StoreError::CreateDir {
                path: parent.display().to_string(),
                source,
            })?;
        }
        let mut writer = open_connection(path)?;
        // The version check comes before any pragma that could write to the file.
        migrations::refuse_newer(&writer, path)?;
        configure(&writer)?;
        migrations::migrate(&mut writer)?;
        let stage_changed = Arc::new(AtomicBool::new(false));
        let flag = stage_changed.clone();
        writer.update_hook(Some(
            move |action: rusqlite::hooks::Action, _db: &str, table: &str, _row: i64| {
                if action == rusqlite::hooks::Action::SQLITE_INSERT && table == "stage_history" {
                    flag.store(true, Ordering::Relaxed);
                }
            },
        ));
        let inbox = inbox::Inbox::open(&inbox::inbox_path(path))?;
        Ok(Store {
            inner: Arc::new(Inner {
                path: path.to_owned(),
                writer: Mutex::new(writer),
                readers: Mutex::new(Vec::new()),
                inbox,
                stage_changed,
                stage_changes: tokio::sync::watch::Sender::new(0),
            }),
        })
    }

    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// Runs `f` in one write transaction on a blocking thread; commits if it returns Ok.
    async fn write<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&rusqlite::Transaction<'_>) -> Result<T> + Send + 'static,
    {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || {
            let mut connection = inner
                .writer
                .lock()
                .map_err(|_| StoreError::Task("writer lock poisoned".into()))?;
            let tx =
                connection.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
            let value = f(&tx)?;
            tx.commit()?;
            // Set by the update hook during `f` (or an earlier transaction that rolled
            // back: a harmless extra wake-up). Read only after the commit, so a
            // subscriber never looks for a change that is not visible yet.
            if inner.stage_changed.swap(false, Ordering::Relaxed) {
                inner.stage_changes.send_modify(|count| *count += 1);
            }
            Ok(value)
        })
        .await
        .map_err(|error| StoreError::Task(error.to_string()))?
    }

    /// A receiver that changes after every committed transaction that recorded a
    /// stage change through this `Store` (writes by other processes are not seen).
    pub fn stage_changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.inner.stage_changes.subscribe()
    }

    /// Runs `f` on a reader connection on a blocking thread.
    async fn read<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T> + Send + 'static,
    {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || {
            let idle = inner.readers.lock().ok().and_then(|mut pool| pool.pop());
            let connection = match idle {
                Some(connection) => connection,
                None => {
                    let connection = open_connection(&inner.path)?;
                    connection.pragma_update(None, "query_only", "ON")?;
                    connection
                }
            };
            let value = f(&connection);
            if let Ok(mut pool) = inner.readers.lock()
                && pool.len() < READERS
            {
                pool.push(connection);
            }
            value
        })
        .await
        .map_err(|error| StoreError::Task(error.to_string()))?
    }

    /// The schema version of the open database.
    pub async fn schema_version(&self) -> Result<i64> {
        self.read(|db| Ok(db.pragma_query_value(None, "user_version", |row| row.get(0))?))
            .await
    }
}

/// UTC milliseconds, the storage format of every time.
pub(crate) fn to_ms(at: DateTime<Utc>) -> i64 {
    at.timestamp_millis()
}

pub(crate) fn from_ms(ms: i64) -> DateTime<Utc> {
    Utc.timestamp_millis_opt(ms)
        .single()
        .unwrap_or(DateTime::<Utc>::MIN_UTC)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub fn temp_store() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("nested/dealsync.db")).unwrap();
        (dir, store)
    }

    #[tokio::test]
    async fn migrations_apply_from_empty_and_rerun_as_a_no_op() {
        let (dir, store) = temp_store();
        assert_eq!(store.schema_version().await.unwrap(), SCHEMA_VERSION);
        drop(store);
        let again = Store::open(&dir.path().join("nested/dealsync.db")).unwrap();
        assert_eq!(again.schema_version().await.unwrap(), SCHEMA_VERSION);
    }

    #[test]
    fn a_newer_schema_is_refused_and_the_file_is_not_modified() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("future.db");
        {
            let db = Connection::open(&path).unwrap();
            db.execute_batch("CREATE TABLE t (x); PRAGMA user_version = 999;")
                .unwrap();
        }
        let before = std::fs::read(&path).unwrap();
        let error = Store::open(&path).unwrap_err();
        assert!(matches!(error, StoreError::NewerSchema { found: 999, .. }));
        assert!(error.to_string().contains("was not modified"), "{error}");
        assert_eq!(std::fs::read(&path).unwrap(), before);
        assert!(!dir.path().join("future.db-wal").exists());
    }
}
