//! The store: the only module that knows SQL or rusqlite.
//!
//! Everything below is the SQLite backend, the one `Store` runs on. `postgres` is the
//! second backend, so far its pool, schema and migrations only (docs/ARCHITECTURE.md,
//! "Two backends").
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
//! - WAL checkpoints run on a checkpointer thread with its own connection, woken every
//!   [`CHECKPOINT_EVERY_PAGES`] WAL pages, so copying pages into the database file and
//!   its fsync stay off the writer. Past [`WAL_LIMIT_PAGES`] the writer checkpoints once
//!   itself after a background pass, so the next transaction starts the WAL over and it
//!   cannot grow without bound under sustained writes (`checkpoint`, shared with the
//!   inbox). Durability is that of the commit (WAL, `synchronous`), not of the
//!   checkpoint.

#[cfg(test)]
pub(crate) mod both_backends;
mod carts;
mod checkpoint;
mod deal_changes;
mod deals;
mod delivery;
mod digests;
mod inbox;
mod ledger;
mod migrations;
mod outbox;
mod people;
pub mod postgres;
mod report;
mod stage_feed;
mod suppression;
mod sync;
mod tokens;
mod writeback;

pub use carts::{CartOutcome, CartRules};
pub use deal_changes::DealChange;
pub use deals::{
    AppliedMapping, DealFilter, DealUpsert, NativeStageGroup, StageCount, StageMove, UnmappedStage,
    UpsertOutcome,
};
pub use delivery::{
    DeliveryEvent, DeliveryFigures, DeliveryOutcome, DeliveryPolicy, NewDeliveryEvent, RulePause,
};
pub use digests::{AssembleOutcome, DigestClaim, DigestFinish, DigestRow, DigestWatch};
pub use inbox::{
    EnqueueError, Enqueued, InboxCounts, InboxRow, MAX_PENDING, NewWebhook, Replayed, Settlement,
    StoredDeadLetter, inbox_path,
};
pub use ledger::OutboxState;
pub use migrations::SCHEMA_VERSION;
pub use outbox::{
    Claim, ClaimDecision, ClaimFacts, ClaimQuery, EarlierEnrollment, EnrollOutcome, EnrollPlan,
    FollowupFacts, NewOutboxRow, OutboxAction, OutboxRow, OutboxRowFilter, RetryOutcome,
};
pub use people::{OpenElsewhere, PERSON_VIEW_LIMIT, Person};
pub use report::{
    OutboxCount, OutboxEntry, OutboxFilter, ReportScope, StageValue, StallCutoff, StalledCount,
};
pub use stage_feed::StageEntry;
pub use suppression::Suppression;
pub use sync::{
    CachedRecord, ENRICHMENT_RETENTION, QuarantineEntry, Quarantined, Reread, SyncRunRecord,
};
pub use tokens::StoredToken;
pub use writeback::{
    WritebackCount, WritebackJob, WritebackRow, WritebackSettlement, key_of as writeback_key,
};

use chrono::{DateTime, TimeZone, Utc};
use rusqlite::Connection;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("opening database {path}: {source}")]
    Open { path: String, source: DbError },
    #[error("creating directory {path}: {source}")]
    CreateDir {
        path: String,
        source: std::io::Error,
    },
    #[error("creating {path}: {source}")]
    CreateFile {
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
    /// A PostgreSQL database (`storage.url`) written by a newer dealsync.
    #[error(
        "PostgreSQL database {target} has schema version {found}, newer than this dealsync \
         understands ({supported}); upgrade dealsync or point storage.url at another \
         database — the database was not modified"
    )]
    PostgresNewerSchema {
        /// `host:port/database`, never the password.
        target: String,
        found: i64,
        supported: i64,
    },
    /// No connection to the PostgreSQL server could be made.
    #[error(transparent)]
    PostgresConnect(Box<postgres::ConnectError>),
    /// A statement failed because the PostgreSQL server went out of reach or refused
    /// work (a lost connection, a restart, no slot free).
    #[error(transparent)]
    PostgresUnavailable(Box<postgres::Unavailable>),
    #[error("migrating database to version {version}: {source}")]
    Migration { version: i64, source: DbError },
    /// The data directory or a database file cannot be written (permissions, a
    /// read-only file system): nothing dealsync does can fix that, an operator can.
    #[error(
        "storage: {what} {path} is not writable: {source}; dealsync keeps its database \
         and webhook inbox there: give the user dealsync runs as write access (the \
         systemd unit's StateDirectory= does) or set storage.path to a writable place"
    )]
    NotWritable {
        what: &'static str,
        path: String,
        source: std::io::Error,
    },
    #[error("database error: {0}")]
    Database(#[from] DbError),
    /// The PostgreSQL server could not take a batch this request was part of (the
    /// batch's error, as text: it is reported once per request).
    #[error("database unavailable: {0}")]
    Unavailable(String),
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
    #[error("database task failed: {0}")]
    Task(String),
    /// An operation this version runs on SQLite only, asked of a PostgreSQL store.
    #[error(
        "this operation is not available with storage.url (PostgreSQL) in this version of \
         dealsync; see docs/scale-out.md for what runs on PostgreSQL"
    )]
    NotOnPostgres,
    /// A write guarded by a lease this replica no longer holds (another replica took it
    /// over): nothing of it was committed.
    #[error(
        "this replica no longer holds the lease {lease}: another replica has taken the duty \
         over, and nothing of this write was committed"
    )]
    LeaseLost { lease: String },
}

/// A failure reported by the database. Opaque, so that no caller outside the store
/// depends on the backend: it says what a caller needs to decide (retry, pause), and
/// its message and source chain carry the database's own words.
#[derive(Debug, thiserror::Error)]
#[error(transparent)]
pub struct DbError(Backend);

/// The backend a [`DbError`] comes from.
#[derive(Debug, thiserror::Error)]
enum Backend {
    #[error(transparent)]
    Sqlite(rusqlite::Error),
    #[error(transparent)]
    Postgres(tokio_postgres::Error),
    /// The PostgreSQL pool gave no connection: every one busy past the wait timeout,
    /// or the pool closed.
    #[error(transparent)]
    Pool(Box<deadpool_postgres::PoolError>),
}

impl From<rusqlite::Error> for DbError {
    fn from(error: rusqlite::Error) -> DbError {
        DbError(Backend::Sqlite(error))
    }
}

impl From<rusqlite::Error> for StoreError {
    fn from(error: rusqlite::Error) -> StoreError {
        StoreError::Database(error.into())
    }
}

impl From<tokio_postgres::Error> for DbError {
    fn from(error: tokio_postgres::Error) -> DbError {
        DbError(Backend::Postgres(error))
    }
}

impl From<tokio_postgres::Error> for StoreError {
    fn from(error: tokio_postgres::Error) -> StoreError {
        StoreError::Database(error.into())
    }
}

impl From<deadpool_postgres::PoolError> for DbError {
    fn from(error: deadpool_postgres::PoolError) -> DbError {
        match error {
            deadpool_postgres::PoolError::Backend(error)
            | deadpool_postgres::PoolError::PostCreateHook(
                deadpool_postgres::HookError::Backend(error),
            ) => error.into(),
            other => DbError(Backend::Pool(Box::new(other))),
        }
    }
}

impl DbError {
    fn code(&self) -> Option<rusqlite::ErrorCode> {
        match &self.0 {
            Backend::Sqlite(error) => error.sqlite_error_code(),
            Backend::Postgres(_) | Backend::Pool(_) => None,
        }
    }

    /// The SQLSTATE of a PostgreSQL error the server reported.
    fn sql_state(&self) -> Option<&tokio_postgres::error::SqlState> {
        match &self.0 {
            Backend::Postgres(error) => error.code(),
            Backend::Sqlite(_) | Backend::Pool(_) => None,
        }
    }

    /// Whether PostgreSQL rolled the transaction back to break a deadlock or a
    /// serialization conflict with another transaction: the same work run again at
    /// once may well succeed.
    pub fn is_conflict(&self) -> bool {
        use tokio_postgres::error::SqlState;
        self.sql_state().is_some_and(|state| {
            [
                SqlState::T_R_DEADLOCK_DETECTED,
                SqlState::T_R_SERIALIZATION_FAILURE,
            ]
            .contains(state)
        })
    }

    /// Whether the disk is full.
    pub fn is_disk_full(&self) -> bool {
        match &self.0 {
            Backend::Sqlite(_) => self.code() == Some(rusqlite::ErrorCode::DiskFull),
            Backend::Postgres(_) => {
                self.sql_state() == Some(&tokio_postgres::error::SqlState::DISK_FULL)
            }
            Backend::Pool(_) => false,
        }
    }

    /// Whether the failure is the database's state rather than the data: busy or
    /// locked by another connection or process, an I/O error, a full or read-only
    /// disk; for PostgreSQL also a lost or refused connection, a server shutting
    /// down or starting, a serialization failure or deadlock, no connection slot
    /// free. Retrying the same work later may succeed.
    pub fn is_transient(&self) -> bool {
        use rusqlite::ErrorCode;
        match &self.0 {
            Backend::Sqlite(_) => matches!(
                self.code(),
                Some(
                    ErrorCode::DatabaseBusy
                        | ErrorCode::DatabaseLocked
                        | ErrorCode::SystemIoFailure
                        | ErrorCode::DiskFull
                        | ErrorCode::CannotOpen
                        | ErrorCode::ReadOnly
                        | ErrorCode::FileLockingProtocolFailed
                        | ErrorCode::OutOfMemory
                )
            ),
            Backend::Postgres(error) => postgres::is_transient(error),
            Backend::Pool(error) => !matches!(**error, deadpool_postgres::PoolError::Closed),
        }
    }

    /// Whether the PostgreSQL server cannot take work now (see
    /// [`StoreError::is_unavailable`]).
    pub fn is_unavailable(&self) -> bool {
        match &self.0 {
            Backend::Sqlite(_) => false,
            Backend::Postgres(error) => postgres::is_transient(error),
            Backend::Pool(error) => !matches!(**error, deadpool_postgres::PoolError::Closed),
        }
    }

    /// Whether the failure may come from a directory or file that cannot be written
    /// (SQLite says "unable to open database file" or "readonly database").
    fn may_be_unwritable(&self) -> bool {
        use rusqlite::ErrorCode;
        matches!(
            self.code(),
            Some(
                ErrorCode::CannotOpen
                    | ErrorCode::ReadOnly
                    | ErrorCode::PermissionDenied
                    | ErrorCode::SystemIoFailure
            )
        )
    }

    /// The database is busy (another connection holds the lock): for tests of the
    /// callers' retries.
    #[cfg(test)]
    pub(crate) fn busy() -> DbError {
        DbError(Backend::Sqlite(rusqlite::Error::SqliteFailure(
            rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_BUSY),
            Some("database is locked".into()),
        )))
    }

    /// The disk is full: for tests of the callers' pauses.
    #[cfg(test)]
    pub(crate) fn disk_full() -> DbError {
        DbError(Backend::Sqlite(rusqlite::Error::SqliteFailure(
            rusqlite::ffi::Error::new(rusqlite::ffi::SQLITE_FULL),
            Some("database or disk is full".into()),
        )))
    }
}

impl StoreError {
    /// Whether the disk is full or read-only: the caller should pause, not drop data.
    pub fn is_disk_full(&self) -> bool {
        matches!(self, StoreError::Database(error) if error.is_disk_full())
    }

    /// Whether the PostgreSQL server cannot take work now (unreachable, restarting,
    /// out of connection slots, a deadlock or serialization failure): the same
    /// request a little later may succeed. Never true for SQLite.
    pub fn is_unavailable(&self) -> bool {
        match self {
            StoreError::PostgresConnect(_)
            | StoreError::PostgresUnavailable(_)
            | StoreError::Unavailable(_) => true,
            StoreError::Database(error) => error.is_unavailable(),
            _ => false,
        }
    }

    /// Whether PostgreSQL rolled the transaction back to break a deadlock or a
    /// serialization conflict (`DbError::is_conflict`).
    pub fn is_conflict(&self) -> bool {
        matches!(self, StoreError::Database(error) if error.is_conflict())
    }

    /// Whether the failure is the database's state rather than the data: busy or
    /// locked by another connection or process, an I/O error, a full or read-only
    /// disk. Retrying the same work later may succeed; it says nothing against the row.
    pub fn is_transient(&self) -> bool {
        match self {
            StoreError::Database(error) | StoreError::Open { source: error, .. } => {
                error.is_transient()
            }
            StoreError::PostgresConnect(failure) => failure.source.is_transient(),
            StoreError::PostgresUnavailable(_) => true,
            StoreError::Unavailable(_) => true,
            StoreError::CreateDir { .. } | StoreError::CreateFile { .. } => true,
            _ => false,
        }
    }
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;

const READERS: usize = 4;

/// WAL pages written between background checkpoints: 16 MiB at 4 KiB pages. A page
/// rewritten by several commits in between is copied into the database file once.
const CHECKPOINT_EVERY_PAGES: i32 = if cfg!(test) { 64 } else { 4_096 };

/// WAL pages at which the writer checkpoints itself, so the WAL can start over.
const WAL_LIMIT_PAGES: i32 = 4 * CHECKPOINT_EVERY_PAGES;

/// The deal database's checkpoints (see `checkpoint`).
const WAL_POLICY: checkpoint::WalPolicy = checkpoint::WalPolicy {
    checkpoint_every: CHECKPOINT_EVERY_PAGES,
    limit: WAL_LIMIT_PAGES,
};

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
    checkpoints: checkpoint::Checkpoints,
}

/// The PostgreSQL backend of a [`Store`]: the pool, the webhook intake's writer, and
/// the stage-change signal of this process's writes.
struct Postgres {
    database: postgres::Database,
    intake: postgres::intake::Intake,
    stage_changes: Arc<tokio::sync::watch::Sender<u64>>,
    /// This process among the replicas sharing the database: the holder its leases and
    /// claims name (`postgres::replica_id`).
    replica: String,
    /// The task listening for the other replicas' announcements (`postgres::notify`),
    /// when `Options::listen`; ended with the store.
    listener: Option<tokio::task::JoinHandle<()>>,
    /// The leases this process holds now, by name, with their fencing tokens: a write a
    /// lease guards (a poll's page and cursor) commits only while its token is current.
    fences: std::sync::Mutex<std::collections::HashMap<String, i64>>,
}

impl Drop for Postgres {
    fn drop(&mut self) {
        if let Some(listener) = &self.listener {
            listener.abort();
        }
    }
}

/// The backend a [`Store`] runs on.
#[derive(Clone)]
enum Engine {
    Sqlite(Arc<Inner>),
    Postgres(Arc<Postgres>),
}

/// A listing query (deals, the outbox) written once for both backends: `select`
/// (ending in a `WHERE` clause), an `AND column = <placeholder>` for each given value,
/// the order, and the page.
pub(in crate::store) struct Listing {
    pub select: String,
    /// (column, value): columns are constants, never input; `None` filters nothing.
    pub equal: Vec<(&'static str, Option<String>)>,
    pub order: &'static str,
    pub limit: Option<u32>,
    pub offset: Option<u32>,
}

impl Listing {
    /// The query for a backend whose numbered placeholders start with `sigil` (`?1` in
    /// SQLite, `$1` in PostgreSQL), and its text parameters in order.
    pub(in crate::store) fn query(self, sigil: char) -> (String, Vec<String>) {
        let mut sql = self.select;
        let mut values: Vec<String> = Vec::new();
        for (column, value) in self.equal {
            if let Some(value) = value {
                values.push(value);
                sql.push_str(&format!(" AND {column} = {sigil}{}", values.len()));
            }
        }
        sql.push_str(&format!(" ORDER BY {}", self.order));
        if let Some(limit) = self.limit {
            sql.push_str(&format!(" LIMIT {limit}"));
        } else if sigil == '?' {
            // SQLite takes OFFSET only after a LIMIT; -1 is none.
            sql.push_str(" LIMIT -1");
        }
        sql.push_str(&format!(" OFFSET {}", self.offset.unwrap_or(0)));
        (sql, values)
    }
}

/// A handle to the database; cheap to clone.
///
/// On PostgreSQL (`storage.url`) every method runs on the shared database, with the
/// same contract (the test-only `schema_version` answers [`StoreError::NotOnPostgres`]).
#[derive(Clone)]
pub struct Store {
    engine: Engine,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.engine {
            Engine::Sqlite(inner) => f.debug_struct("Store").field("path", &inner.path).finish(),
            Engine::Postgres(postgres) => f
                .debug_struct("Store")
                .field("postgres", &postgres.database.target())
                .finish(),
        }
    }
}

fn open_connection(path: &Path) -> Result<Connection> {
    let connection = Connection::open(path).map_err(|source| StoreError::Open {
        path: path.display().to_string(),
        source: source.into(),
    })?;
    connection.busy_timeout(Duration::from_secs(10))?;
    // A larger page cache and memory-mapped reads keep index lookups off the
    // read() path as the deals table grows.
    connection.pragma_update(None, "cache_size", -8_192)?;

    connection.pragma_update(None, "temp_store", "MEMORY")?;
    Ok(connection)
}

/// Creates the SQLite file at `path` (and its directory) owner-only unless it exists;
/// warns when an existing one is open to other users. SQLite gives the `-wal` and
/// `-shm` files it creates the same mode as the database file.
fn create_private(path: &Path, what: &str) -> Result<()> {
    if let Some(parent) = path.parent()
        && !parent.as_os_str().is_empty()
    {
        crate::files::create_dir_all(parent).map_err(|source| StoreError::CreateDir {
            path: parent.display().to_string(),
            source,
        })?;
    }
    crate::files::ensure_private_file(path).map_err(|source| StoreError::CreateFile {
        path: path.display().to_string(),
        source,
    })?;
    crate::files::warn_if_shared(path, what);
    Ok(())
}

fn configure(connection: &Connection) -> Result<()> {
    connection.pragma_update(None, "journal_mode", "WAL")?;
    // NORMAL is durable across process crashes in WAL mode; a power loss may drop
    // the last transactions but never corrupts. `storage.synchronous` may raise it.
    connection.pragma_update(None, "synchronous", "NORMAL")?;
    connection.pragma_update(None, "foreign_keys", "ON")?;
    Ok(())
}

/// Checks, without changing anything, that dealsync can write where `storage.path`
/// points: the directory (or the nearest existing one above it, when it is still to
/// be created) takes a new file, and the database and inbox files that exist open for
/// writing. `dealsync check` runs it; `Store::open` runs it to explain a failure.
pub fn check_writable(db_path: &Path) -> Result<()> {
    let dir = match db_path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent.to_owned(),
        _ => PathBuf::from("."),
    };
    let not_writable =
        |what: &'static str, path: &Path, source: std::io::Error| StoreError::NotWritable {
            what,
            path: path.display().to_string(),
            source,
        };
    probe_dir(&dir).map_err(|(existing, source)| {
        let what = if existing == dir {
            "the data directory"
        } else {
            "the directory that would hold the data directory,"
        };
        not_writable(what, &existing, source)
    })?;
    let inbox = inbox::inbox_path(db_path);
    for file in [db_path.to_owned(), inbox] {
        for candidate in [
            file.clone(),
            PathBuf::from(format!("{}-wal", file.display())),
            PathBuf::from(format!("{}-shm", file.display())),
        ] {
            if candidate.exists() {
                std::fs::OpenOptions::new()
                    .write(true)
                    .open(&candidate)
                    .map_err(|source| not_writable("the database file", &candidate, source))?;
            }
        }
    }
    Ok(())
}

/// Checks that a new file can be made in `dir`, or, while `dir` does not exist yet,
/// in the nearest directory above it that does; on failure returns that directory
/// and the OS error. Changes nothing: the probe file is created new and removed at
/// once. It is the only test that also sees read-only mounts, ACLs and SELinux,
/// which permission bits do not show.
pub fn probe_dir(dir: &Path) -> std::result::Result<(), (PathBuf, std::io::Error)> {
    let mut existing = dir;
    while !existing.exists() {
        match existing.parent() {
            Some(parent) if !parent.as_os_str().is_empty() => existing = parent,
            _ => {
                existing = Path::new(".");
                break;
            }
        }
    }
    let probe = existing.join(format!(".dealsync-write-probe-{}", std::process::id()));
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&probe)
        .map_err(|source| (existing.to_owned(), source))?;
    let _ = std::fs::remove_file(&probe);
    Ok(())
}

/// Whether an error opening the store may come from a directory or file it cannot
/// write (SQLite says "unable to open database file" or "readonly database").
fn may_be_unwritable(error: &StoreError) -> bool {
    match error {
        StoreError::Open { source, .. }
        | StoreError::Database(source)
        | StoreError::Migration { source, .. } => source.may_be_unwritable(),
        StoreError::CreateDir { .. } => true,
        _ => false,
    }
}

impl Store {
    /// Opens (creating if needed) and migrates the database. Blocking.
    ///
    /// A new database (and its directory) is created owner-only, whatever the umask;
    /// SQLite gives the `-wal` and `-shm` files the database file's mode.
    /// A failure that comes from a directory or file dealsync cannot write is
    /// reported as [`StoreError::NotWritable`], naming the path and the OS cause.
    pub fn open(path: &Path) -> Result<Store> {
        Store::open_checked(path).map_err(|error| {
            if may_be_unwritable(&error)
                && let Err(unwritable) = check_writable(path)
            {
                return unwritable;
            }
            error
        })
    }

    fn open_checked(path: &Path) -> Result<Store> {
        create_private(path, "the database")?;
        let mut writer = open_connection(path)?;
        // The version check comes before any pragma that could write to the file.
        migrations::DATABASE.refuse_newer(&writer, path)?;
        configure(&writer)?;
        migrations::DATABASE.migrate(&mut writer, path)?;
        let stage_changed = Arc::new(AtomicBool::new(false));
        let flag = stage_changed.clone();
        writer.update_hook(Some(
            move |action: rusqlite::hooks::Action, _db: &str, table: &str, _row: i64| {
                if action == rusqlite::hooks::Action::SQLITE_INSERT && table == "stage_history" {
                    flag.store(true, Ordering::Relaxed);
                }
            },
        ));
        // No automatic checkpoint in the writer's commits: the checkpointer thread does it.
        checkpoint::install(&writer, WAL_POLICY)?;
        let checkpoints = checkpoint::Checkpoints::start(
            open_connection(path)?,
            WAL_POLICY,
            "dealsync-db-ckpt",
            "the database",
        )
        .map_err(|error| StoreError::Task(format!("starting the checkpointer: {error}")))?;
        let inbox = inbox::Inbox::open(&inbox::inbox_path(path))?;
        Ok(Store {
            engine: Engine::Sqlite(Arc::new(Inner {
                path: path.to_owned(),
                writer: Mutex::new(writer),
                readers: Mutex::new(Vec::new()),
                inbox,
                stage_changed,
                stage_changes: tokio::sync::watch::Sender::new(0),
                checkpoints,
            })),
        })
    }

    /// Connects to the PostgreSQL database `url` names and migrates it (see
    /// `postgres::Database::open`), and starts its webhook intake.
    pub async fn open_postgres(url: &crate::config::PostgresUrl) -> Result<Store> {
        Self::open_postgres_with(url, &postgres::Options::default()).await
    }

    /// [`Store::open_postgres`] with the pool's and the claims' settings (the daemon's
    /// follow `storage.failover_after` and `email.timeout`).
    pub async fn open_postgres_with(
        url: &crate::config::PostgresUrl,
        options: &postgres::Options,
    ) -> Result<Store> {
        let database = postgres::Database::open(url, options).await?;
        let intake = postgres::intake::Intake::start(database.clone()).await?;
        let stage_changes = Arc::new(tokio::sync::watch::Sender::new(0));
        let listener = options.listen.then(|| {
            let (stage_changes, intake) = (stage_changes.clone(), intake.clone());
            database.listen(move |channel| match channel {
                postgres::notify::STAGE_CHANGES => {
                    stage_changes.send_modify(|count| *count += 1);
                }
                postgres::notify::INBOX => intake.committed().notify_one(),
                _ => {}
            })
        });
        Ok(Store {
            engine: Engine::Postgres(Arc::new(Postgres {
                database,
                intake,
                stage_changes,
                replica: postgres::replica_id(),
                listener,
                fences: std::sync::Mutex::new(std::collections::HashMap::new()),
            })),
        })
    }

    /// The SQLite backend, or [`StoreError::NotOnPostgres`].
    fn sqlite(&self) -> Result<&Arc<Inner>> {
        match &self.engine {
            Engine::Sqlite(inner) => Ok(inner),
            Engine::Postgres(_) => Err(StoreError::NotOnPostgres),
        }
    }

    /// The PostgreSQL database, when the store runs on one.
    fn postgres(&self) -> Option<&postgres::Database> {
        self.postgres_engine().map(|postgres| &postgres.database)
    }

    /// The PostgreSQL backend with this process's replica id and intake, when the store
    /// runs on one.
    fn postgres_engine(&self) -> Option<&Postgres> {
        match &self.engine {
            Engine::Sqlite(_) => None,
            Engine::Postgres(postgres) => Some(postgres),
        }
    }

    /// After a PostgreSQL write that recorded `changes` stage changes has committed:
    /// wakes the `stage_changes()` subscribers, as SQLite's update hook does.
    fn note_stage_changes(&self, changes: u64) {
        if changes > 0
            && let Engine::Postgres(postgres) = &self.engine
        {
            postgres.stage_changes.send_modify(|count| *count += 1);
            postgres.database.announce(postgres::notify::STAGE_CHANGES);
        }
    }

    /// This process's name among the replicas sharing a PostgreSQL database (what its
    /// leases and claims name); `None` on SQLite, where one daemon holds the file.
    pub fn replica(&self) -> Option<&str> {
        self.postgres_engine()
            .map(|postgres| postgres.replica.as_str())
    }

    /// Starts keeping lease `name` for this replica (see `postgres::leases`): the duty
    /// it guards runs while the keeper's watch shows it held. `None` on SQLite, where
    /// the daemon's lock file already makes this process the only one.
    pub fn lease_keeper(
        &self,
        name: String,
        ttl: Duration,
        shutdown: tokio_util::sync::CancellationToken,
    ) -> Option<postgres::leases::LeaseKeeper> {
        match &self.engine {
            Engine::Sqlite(_) => None,
            // A holder name of the keeper's own: a keeper started by a reload while the
            // last one is still releasing cannot renew or release the other's lease.
            Engine::Postgres(postgres) => Some(postgres::leases::LeaseKeeper::spawn(
                postgres.database.clone(),
                name,
                format!("{}#{:08x}", postgres.replica, rand::random::<u32>()),
                postgres::leases::KeeperTiming::for_ttl(ttl),
                shutdown,
            )),
        }
    }

    /// Records that this process holds lease `lease` with fencing token `token` (or,
    /// with `None`, no longer does): the writes it guards carry the token from then on
    /// (`Store::commit_page` for `poll:CONNECTION`). Nothing on SQLite.
    pub fn set_fence(&self, lease: &str, token: Option<i64>) {
        if let Engine::Postgres(postgres) = &self.engine
            && let Ok(mut fences) = postgres.fences.lock()
        {
            match token {
                Some(token) => fences.insert(lease.to_owned(), token),
                None => fences.remove(lease),
            };
        }
    }

    /// The lease guarding writes of `lease` and its token, when this process holds it.
    fn fence(&self, lease: String) -> Option<(String, i64)> {
        let Engine::Postgres(postgres) = &self.engine else {
            return None;
        };
        let token = *postgres.fences.lock().ok()?.get(&lease)?;
        Some((lease, token))
    }

    /// Takes one request of `connection`'s vendor rate as every replica counts it
    /// (`postgres::rate`): `None` when granted, else how long to wait. On SQLite always
    /// granted: one daemon uses the file, and its own limiter is the limit.
    pub async fn take_rate_turn(
        &self,
        connection: &str,
        per_second: f64,
        burst: u32,
    ) -> Result<Option<Duration>> {
        let (Some(database), Some(rate)) = (
            self.postgres(),
            postgres::rate::Rate::new(per_second, burst),
        ) else {
            return Ok(None);
        };
        match database
            .try_take(connection, rate)
            .await
            .map_err(|error| database.named(error))?
        {
            postgres::rate::Taken::Granted { .. } => Ok(None),
            postgres::rate::Taken::Wait { wait } => Ok(Some(wait)),
        }
    }

    /// The SQLite database file; `None` on PostgreSQL.
    pub fn path(&self) -> Option<&Path> {
        match &self.engine {
            Engine::Sqlite(inner) => Some(&inner.path),
            Engine::Postgres(_) => None,
        }
    }

    /// Takes the lock every process sharing this store holds around a refresh of
    /// `connection`'s OAuth token, waiting at most `wait`: the lock file beside the
    /// SQLite database, or, on PostgreSQL, an advisory lock in the database, which
    /// replicas on any host share.
    pub async fn lock_token_refresh(
        &self,
        connection: &str,
        wait: Duration,
        cancel: &tokio_util::sync::CancellationToken,
    ) -> std::result::Result<crate::lock::RefreshLock, crate::lock::LockError> {
        use crate::lock::RefreshLock;
        match &self.engine {
            Engine::Sqlite(inner) => {
                let path = crate::lock::token_lock_path(&inner.path, connection);
                Ok(RefreshLock::new(
                    crate::lock::LockFile::lock(&path, wait, cancel).await?,
                ))
            }
            Engine::Postgres(postgres) => Ok(RefreshLock::new(
                postgres
                    .database
                    .session_lock(&format!("oauth:{connection}"), wait, cancel)
                    .await?,
            )),
        }
    }

    /// Runs `f` in one write transaction on a blocking thread; commits if it returns Ok.
    async fn write<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&rusqlite::Transaction<'_>) -> Result<T> + Send + 'static,
    {
        let inner = self.sqlite()?.clone();
        tokio::task::spawn_blocking(move || {
            let mut connection = inner
                .writer
                .lock()
                .map_err(|_| StoreError::Task("writer lock poisoned".into()))?;
            let tx =
                connection.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
            let value = f(&tx)?;
            tx.commit()?;
            inner.checkpoints.after_commit(&connection);
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

    /// Runs raw SQL in one write transaction: fixtures for tests outside the store,
    /// which name no database type.
    #[cfg(test)]
    pub(crate) async fn execute_batch_for_test(&self, sql: &str) -> Result<()> {
        let sql = sql.to_owned();
        self.write(move |tx| Ok(tx.execute_batch(&sql)?)).await
    }

    /// A receiver that changes after every committed transaction that recorded a
    /// stage change through this `Store` (writes by other processes are not seen).
    pub fn stage_changes(&self) -> tokio::sync::watch::Receiver<u64> {
        match &self.engine {
            Engine::Sqlite(inner) => inner.stage_changes.subscribe(),
            Engine::Postgres(postgres) => postgres.stage_changes.subscribe(),
        }
    }

    /// Runs `f` on a reader connection on a blocking thread.
    async fn read<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T> + Send + 'static,
    {
        let inner = self.sqlite()?.clone();
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

    #[cfg(test)]
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

/// The JSON text of `value`, for a statement parameter (`json_each` lists) or a stored
/// column (headers, maps, pipelines).
fn to_json<T: serde::Serialize + ?Sized>(value: &T) -> Result<String> {
    serde_json::to_string(value).map_err(|error| StoreError::Corrupt(error.to_string()))
}

#[cfg(test)]
pub(crate) mod tests {
    pub(crate) use super::deals::tests::upsert;

    /// A verified delivery `id` of `connection`, received now, whose body names it.
    pub(crate) fn webhook(connection: &str, id: &str) -> NewWebhook {
        NewWebhook {
            connection: connection.into(),
            delivery_id: id.into(),
            topic: None,
            headers: vec![],
            body_sha256: None,
            body: bytes::Bytes::from(format!(r#"{{"id":"{id}"}}"#)),
            received_at: chrono::Utc::now(),
        }
    }
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

    #[tokio::test]
    async fn a_database_of_the_first_schema_is_migrated_and_keeps_its_deals() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v1.db");
        {
            let db = Connection::open(&path).unwrap();
            db.execute_batch(include_str!("migrations/0001_initial.sql"))
                .unwrap();
            db.execute_batch(
                "PRAGMA user_version = 1;
                 INSERT INTO deals (connection, external_id, title, stage, status,
                    native_pipeline, native_stage, stage_entered_at, last_activity_at,
                    first_seen_at, synced_at, content_hash, raw)
                 VALUES ('crm', '1', 'Deal 1', 'proposal', 'open', 'p', 's', 0, 0, 0, 0, 7, '{}');",
            )
            .unwrap();
        }
        let store = Store::open(&path).unwrap();
        assert_eq!(store.schema_version().await.unwrap(), SCHEMA_VERSION);
        let (title, fingerprint): (String, Option<i64>) = store
            .read(|db| {
                Ok(db.query_row(
                    "SELECT title, fingerprint FROM deals WHERE external_id = '1'",
                    [],
                    |row| Ok((row.get(0)?, row.get(1)?)),
                )?)
            })
            .await
            .unwrap();
        assert_eq!((title.as_str(), fingerprint), ("Deal 1", None));
    }

    #[tokio::test]
    async fn checkpoints_run_beside_the_writer_and_the_wal_starts_over_under_sustained_writes() {
        use crate::domain::{
            ChangeCause, ConnectionName, DealStatus, RawRecord, SourceDeal, StageKey, StageRef,
        };
        let (dir, store) = temp_store();
        let db = dir.path().join("nested/dealsync.db");
        let wal = dir.path().join("nested/dealsync.db-wal");
        let padding = "x".repeat(3_000);
        // 40 commits of 25 records of ~3 KB: ~1,000 WAL pages, four times the limit
        // (the test build's limits are 64 and 256 pages).
        for batch in 0..40 {
            let upserts = (0..25)
                .map(|n| {
                    let id = format!("{batch}-{n}");
                    let mut source = SourceDeal::new(&id, "Deal", "p", "s");
                    source.raw =
                        RawRecord::from_text(format!(r#"{{"id":"{id}","pad":"{padding}"}}"#))
                            .unwrap();
                    DealUpsert {
                        connection: ConnectionName::new("crm"),
                        source,
                        target: StageRef {
                            pipeline: None,
                            stage: StageKey::new("s"),
                        },
                        status: DealStatus::Open,
                        observed_at: Utc::now(),
                        cause: ChangeCause::Poll,
                    }
                })
                .collect();
            store.upsert_deals(upserts).await.unwrap();
            let wal_bytes = std::fs::metadata(&wal).map_or(0, |meta| meta.len());
            assert!(
                wal_bytes <= 3 * WAL_LIMIT_PAGES as u64 * 4096,
                "batch {batch}: the WAL grew to {wal_bytes} bytes"
            );
        }
        // The checkpointer copied the pages into the database file while it was open.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while std::fs::metadata(&db).unwrap().len() < 2_000_000 {
            assert!(
                std::time::Instant::now() < deadline,
                "no checkpoint reached the database file"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        let count: i64 = store
            .read(|db| Ok(db.query_row("SELECT count(*) FROM deals", [], |row| row.get(0))?))
            .await
            .unwrap();
        assert_eq!(count, 1_000);
    }

    #[test]
    fn busy_and_io_failures_are_transient_and_data_problems_are_not() {
        let sqlite = |code: i32| {
            StoreError::from(rusqlite::Error::SqliteFailure(
                rusqlite::ffi::Error::new(code),
                None,
            ))
        };
        for code in [
            rusqlite::ffi::SQLITE_BUSY,
            rusqlite::ffi::SQLITE_LOCKED,
            rusqlite::ffi::SQLITE_IOERR,
            rusqlite::ffi::SQLITE_FULL,
            rusqlite::ffi::SQLITE_READONLY,
        ] {
            assert!(sqlite(code).is_transient(), "{code}");
        }
        for code in [
            rusqlite::ffi::SQLITE_CONSTRAINT,
            rusqlite::ffi::SQLITE_CORRUPT,
            rusqlite::ffi::SQLITE_MISMATCH,
        ] {
            assert!(!sqlite(code).is_transient(), "{code}");
        }
        assert!(!StoreError::Corrupt("x".into()).is_transient());
    }

    #[test]
    fn a_new_database_and_its_wal_and_shm_are_owner_only() {
        use std::os::unix::fs::PermissionsExt;
        let (dir, store) = temp_store();
        let mode = |name: &str| {
            std::fs::metadata(dir.path().join(name))
                .unwrap()
                .permissions()
                .mode()
                & 0o777
        };
        for name in [
            "nested/dealsync.db",
            "nested/dealsync.db-wal",
            "nested/dealsync.db-shm",
            "nested/dealsync.inbox.db",
            "nested/dealsync.inbox.db-wal",
            "nested/dealsync.inbox.db-shm",
        ] {
            assert_eq!(mode(name), 0o600, "{name}");
        }
        assert_eq!(mode("nested"), 0o700);
        drop(store);
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
