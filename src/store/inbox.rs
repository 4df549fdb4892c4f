//! The webhook inbox and the dead letters, in their own SQLite file.
//!
//! A verified delivery is committed here before the HTTP handler answers 2xx; the
//! worker turns inbox rows into deals later. The inbox lives in a file of its own beside
//! the main database (`dealsync.db` → `dealsync.inbox.db`, see [`inbox_path`]), with
//! its own WAL and its own writer, so committing deliveries never waits behind deal
//! writes, and a long worker transaction never delays a delivery's 2xx.
//!
//! Every write to the file goes through one writer thread that owns the connection.
//! Requests queue on a bounded channel; the thread drains up to [`MAX_BATCH`] of them
//! (deliveries, dead letters, the worker's settlements, pruning) into one transaction,
//! commits it with `synchronous = FULL` (one fsync of the WAL for the whole batch), and
//! only then answers each request: group commit. While one batch is being fsynced the
//! next one gathers, so the batch grows with the load and the fsyncs per second stay
//! bounded by the disk. WAL checkpoints run on a second thread, so their copying and
//! their fsync of the database file stay off the commit path; they are triggered by the
//! frames SQLite reports after each commit, so the worker's settlements count as well
//! as deliveries. When the WAL still reaches its limit under sustained load, the writer
//! finishes a checkpoint itself right after a background pass (little left to copy),
//! which lets the next transaction start the WAL over. Headers and bodies sit in a
//! table of their own, so settling a row rewrites a small row, not a body.
//!
//! Invariants:
//! - `enqueue_webhook` returns `Stored` or `Duplicate` only after the row is committed
//!   (or was already there); a caller that answers 2xx after it never loses the delivery.
//! - `(connection, delivery_id)` is unique: a redelivery is acknowledged as a duplicate
//!   and never processed twice. For body-only signers the body's hash is a second key:
//!   the same body within the scheme's replay window is a duplicate too. Processed rows are kept for [`RETENTION`], longer than
//!   any vendor retries (Shopify about 4 h, Stripe up to 3 days), then pruned.
//! - Bounded: past [`MAX_PENDING`] unprocessed rows, or with [`QUEUE`] requests already
//!   waiting for the writer, a delivery is refused ([`EnqueueError::Full`],
//!   [`EnqueueError::Busy`]) before anything is written, so the vendor retries it later;
//!   nothing is accepted that is not stored.
//! - Rows of one connection are handed out in arrival order, and not past a row of the
//!   same connection that waits for a retry.
//! - Applying a row's changes to the main database (`deal_changes`) and marking it
//!   processed here are two commits; a crash between them applies the row again, which
//!   the upserts make a no-op.

use super::checkpoint::{self, Checkpoints, WalPolicy};
use super::{Result, Store, StoreError, from_ms, to_ms};
use bytes::Bytes;
use chrono::{DateTime, Utc};
use rusqlite::{Connection, OptionalExtension, params};
use serde::Serialize;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use tokio::sync::{Notify, mpsc, oneshot};

/// Most requests committed in one transaction.
pub const MAX_BATCH: usize = 1024;

/// Requests that may wait for the writer; beyond this a delivery is refused as busy.
pub const QUEUE: usize = 16_384;

/// Unprocessed rows beyond which deliveries are refused (503 with `Retry-After`) until
/// the worker catches up: about 1 GB of 4 KB payloads.
pub const MAX_PENDING: u64 = 250_000;

/// How long processed rows (and so their delivery ids) are kept.
pub const RETENTION: chrono::Duration = chrono::Duration::days(7);

/// How long dead letters and permanently failed rows are kept for inspection.
pub const DEAD_LETTER_RETENTION: chrono::Duration = chrono::Duration::days(30);

/// When the inbox's WAL is checkpointed (see `checkpoint`): the checkpointer is woken
/// every 1 MiB, so each background pass copies and fsyncs little and delays the commits
/// that fsync the WAL beside it as little as possible; the WAL starts over at 128 MiB,
/// about every 8 s at 5,000 deliveries/s, each time after a checkpoint of a few
/// milliseconds.
const WAL_POLICY: WalPolicy = WalPolicy {
    checkpoint_every: 256,
    limit: 32_768,
};

/// The statements of the inbox file's schema, tracked in its `user_version`.
const SCHEMA: &[(i64, &str)] = &[
    (1, include_str!("migrations/inbox_0001.sql")),
    (2, include_str!("migrations/inbox_0002.sql")),
];

/// The inbox file that belongs to the database at `db_path`: `dealsync.db` →
/// `dealsync.inbox.db`, in the same directory.
pub fn inbox_path(db_path: &Path) -> PathBuf {
    db_path.with_extension("inbox.db")
}

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
            EnqueueError::Store(_) => None,
        }
    }
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

/// A delivery whose signature was valid but whose body could not be parsed.
struct DeadLetter {
    connection: String,
    delivery_id: String,
    topic: Option<String>,
    reason: String,
    headers: Vec<(String, String)>,
    body: Bytes,
    at: DateTime<Utc>,
}

/// A kept dead letter, for `dealsync inbox dead-letters`.
#[derive(Debug, Clone, Serialize)]
pub struct StoredDeadLetter {
    pub id: i64,
    pub connection: String,
    /// `None` for letters kept before dealsync stored it; a replay then uses
    /// `dead-letter:<id>`.
    pub delivery_id: Option<String>,
    pub topic: Option<String>,
    pub received_at: DateTime<Utc>,
    /// Why the connector could not parse it.
    pub reason: String,
    pub replayed_at: Option<DateTime<Utc>>,
    /// The inbox row the replay became.
    pub replayed_as: Option<i64>,
    /// That inbox row's state now (`pending`, `processed`, `failed`), while it is kept.
    pub replay_state: Option<String>,
    pub replay_error: Option<String>,
    /// Lower-case names and values, without signature or auth headers.
    pub headers: Vec<(String, String)>,
    #[serde(skip)]
    pub body: Vec<u8>,
}

impl StoredDeadLetter {
    /// The delivery id a replay is stored (and deduplicated) under.
    pub fn replay_delivery_id(&self) -> String {
        self.delivery_id
            .clone()
            .unwrap_or_else(|| format!("dead-letter:{}", self.id))
    }
}

/// What replaying a dead letter did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Replayed {
    /// Queued as a new inbox row; the inbox worker applies it.
    Queued {
        inbox_id: i64,
    },
    /// The delivery was in the inbox already (a vendor retry, or another dead letter
    /// of it) and had failed: queued again.
    Requeued {
        inbox_id: i64,
    },
    /// The delivery is in the inbox already, pending or processed: nothing to do.
    AlreadyInInbox {
        inbox_id: i64,
        state: String,
    },
    /// This dead letter was replayed before: nothing to do.
    AlreadyReplayed {
        at: DateTime<Utc>,
        inbox_id: Option<i64>,
    },
    NotFound,
}

/// What the writer thread is asked to do; each answers on its own channel.
enum Command {
    Insert(NewWebhook, oneshot::Sender<Result<Enqueued>>),
    DeadLetter(DeadLetter, oneshot::Sender<Result<()>>),
    Settle(Vec<Settlement>, oneshot::Sender<Result<()>>),
    Prune(DateTime<Utc>, oneshot::Sender<Result<u64>>),
    Replay(i64, DateTime<Utc>, oneshot::Sender<Result<Replayed>>),
}

/// What one command did, before its answer is sent.
enum Done {
    Insert(Enqueued),
    Unit,
    Count(u64),
    Replay(Replayed),
}

/// State shared by the handle, the writer thread and the checkpointer.
struct Shared {
    /// Unprocessed rows: counted at open, then kept by the writer after each commit.
    pending: AtomicU64,
    /// Woken after each batch that stored a new row, so the worker need not poll.
    committed: Notify,
}

/// The open inbox file: the writer's queue and a reader connection.
pub(super) struct Inbox {
    path: PathBuf,
    queue: mpsc::Sender<Command>,
    shared: Arc<Shared>,
    /// The one reader (the worker's scans, counts). A std mutex: held only inside
    /// blocking tasks, never across `.await`.
    reader: Mutex<Option<Connection>>,
}

fn open_connection(path: &Path) -> Result<Connection> {
    let connection = Connection::open(path).map_err(|source| StoreError::Open {
        path: path.display().to_string(),
        source: source.into(),
    })?;
    connection.busy_timeout(std::time::Duration::from_secs(10))?;
    Ok(connection)
}

fn migrate(db: &mut Connection, path: &Path) -> Result<()> {
    let supported = SCHEMA[SCHEMA.len() - 1].0;
    let found: i64 = db.pragma_query_value(None, "user_version", |row| row.get(0))?;
    if found > supported {
        return Err(StoreError::NewerSchema {
            path: path.display().to_string(),
            found,
            supported,
        });
    }
    db.pragma_update(None, "journal_mode", "WAL")?;
    let tx = db.transaction_with_behavior(rusqlite::TransactionBehavior::Exclusive)?;
    for &(version, sql) in SCHEMA.iter().filter(|(v, _)| *v > found) {
        tx.execute_batch(sql)
            .and_then(|()| tx.pragma_update(None, "user_version", version))
            .map_err(|source| StoreError::Migration {
                version,
                source: source.into(),
            })?;
        tracing::info!(version, path = %path.display(), "applied webhook inbox migration");
    }
    tx.commit()?;
    Ok(())
}

/// Creates (owner-only) and migrates the inbox file and opens the writer's connection.
fn open_writer(path: &Path, policy: WalPolicy) -> Result<Connection> {
    super::create_private(path, "the webhook inbox")?;
    let mut writer = open_connection(path)?;
    migrate(&mut writer, path)?;
    // Every commit is fsynced: a delivery is acknowledged only once it survives a
    // power loss, not only a process crash.
    writer.pragma_update(None, "synchronous", "FULL")?;
    // Checkpoints are the checkpointer thread's job (see `checkpoint`).
    checkpoint::install(&writer, policy)?;
    Ok(writer)
}

impl Inbox {
    /// Opens (creating and migrating if needed) the inbox file and starts its writer and
    /// checkpointer threads. Blocking.
    pub(super) fn open(path: &Path) -> Result<Inbox> {
        Inbox::open_with(path, WAL_POLICY)
    }

    fn open_with(path: &Path, policy: WalPolicy) -> Result<Inbox> {
        let writer = open_writer(path, policy)?;
        let pending: i64 = writer.query_row(
            "SELECT count(*) FROM webhook_inbox WHERE state = 'pending'",
            [],
            |row| row.get(0),
        )?;
        let shared = Arc::new(Shared {
            pending: AtomicU64::new(pending.max(0) as u64),
            committed: Notify::new(),
        });
        let (queue, receiver) = mpsc::channel(QUEUE);
        let checkpoints = Checkpoints::start(
            open_connection(path)?,
            policy,
            "dealsync-inbox-ckpt",
            "the webhook inbox",
        )
        .map_err(|error| StoreError::Task(format!("starting the inbox checkpointer: {error}")))?;
        let writer_shared = shared.clone();
        std::thread::Builder::new()
            .name("dealsync-inbox".into())
            .spawn(move || run_writer(writer, receiver, writer_shared, checkpoints))
            .map_err(|error| StoreError::Task(format!("starting the inbox writer: {error}")))?;
        Ok(Inbox {
            path: path.to_owned(),
            queue,
            shared,
            reader: Mutex::new(None),
        })
    }

    /// Sends a command and waits for its answer.
    async fn ask<T>(
        &self,
        command: impl FnOnce(oneshot::Sender<Result<T>>) -> Command,
    ) -> Result<T> {
        let (reply, answer) = oneshot::channel();
        self.queue
            .send(command(reply))
            .await
            .map_err(|_| StoreError::Task("the inbox writer has stopped".into()))?;
        answer
            .await
            .map_err(|_| StoreError::Task("the inbox writer has stopped".into()))?
    }
}

/// The writer thread: one transaction per drained batch. It ends when every sender is
/// gone (the store was dropped). After each commit it lets `checkpoints` wake the
/// checkpointer or finish a checkpoint itself.
fn run_writer(
    mut db: Connection,
    mut receiver: mpsc::Receiver<Command>,
    shared: Arc<Shared>,
    checkpoints: Checkpoints,
) {
    let mut batch: Vec<Command> = Vec::with_capacity(MAX_BATCH);
    while let Some(first) = receiver.blocking_recv() {
        batch.push(first);
        while batch.len() < MAX_BATCH {
            match receiver.try_recv() {
                Ok(next) => batch.push(next),
                Err(_) => break,
            }
        }
        let outcomes = match commit(&mut db, &batch) {
            Ok(outcomes) => outcomes.into_iter().map(Ok).collect(),
            // One failing command must not fail the others: commit each on its own.
            Err(_) => batch
                .iter()
                .map(|command| {
                    commit(&mut db, std::slice::from_ref(command)).map(|mut done| done.remove(0))
                })
                .collect::<Vec<_>>(),
        };
        // The counters move before anyone hears back, so a caller that saw its commit
        // also sees the count that includes it.
        let mut stored = 0u64;
        let mut settled = 0u64;
        for (command, outcome) in batch.iter().zip(&outcomes) {
            match (command, outcome) {
                (Command::Insert(..), Ok(Done::Insert(Enqueued::Stored))) => stored += 1,
                (
                    Command::Replay(..),
                    Ok(Done::Replay(Replayed::Queued { .. } | Replayed::Requeued { .. })),
                ) => stored += 1,
                (Command::Settle(..), Ok(Done::Count(count))) => settled += count,
                _ => {}
            }
        }
        if stored > 0 {
            shared.pending.fetch_add(stored, Ordering::Relaxed);
        }
        if settled > 0 {
            // Saturating: the count is advisory (backpressure), never below zero.
            let _ = shared
                .pending
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |pending| {
                    Some(pending.saturating_sub(settled))
                });
        }
        for (command, outcome) in batch.drain(..).zip(outcomes) {
            match command {
                Command::Insert(_, reply) => {
                    let _ = reply.send(outcome.and_then(|done| match done {
                        Done::Insert(enqueued) => Ok(enqueued),
                        _ => Err(StoreError::Task("unexpected inbox outcome".into())),
                    }));
                }
                Command::Settle(_, reply) | Command::DeadLetter(_, reply) => {
                    let _ = reply.send(outcome.map(|_| ()));
                }
                Command::Prune(_, reply) => {
                    let _ = reply.send(outcome.map(|done| match done {
                        Done::Count(count) => count,
                        _ => 0,
                    }));
                }
                Command::Replay(_, _, reply) => {
                    let _ = reply.send(outcome.and_then(|done| match done {
                        Done::Replay(replayed) => Ok(replayed),
                        _ => Err(StoreError::Task("unexpected inbox outcome".into())),
                    }));
                }
            }
        }
        if stored > 0 {
            shared.committed.notify_one();
        }
        checkpoints.after_commit(&db);
    }
}

/// Runs `batch` in one transaction; on any error nothing of it is committed.
fn commit(db: &mut Connection, batch: &[Command]) -> Result<Vec<Done>> {
    let tx = db.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    let mut outcomes = Vec::with_capacity(batch.len());
    for command in batch {
        outcomes.push(match command {
            Command::Insert(event, _) => Done::Insert(insert(&tx, event)?),
            Command::DeadLetter(letter, _) => {
                tx.prepare_cached(
                    "INSERT INTO webhook_dead_letters
                        (connection, received_at, reason, headers, body, delivery_id, topic)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                )?
                .execute(params![
                    letter.connection,
                    to_ms(letter.at),
                    letter.reason,
                    headers_json(&letter.headers)?,
                    &letter.body[..],
                    letter.delivery_id,
                    letter.topic,
                ])?;
                Done::Unit
            }
            Command::Settle(settlements, _) => Done::Count(settle(&tx, settlements)?),
            Command::Prune(now, _) => Done::Count(prune(&tx, *now)?),
            Command::Replay(id, at, _) => Done::Replay(replay(&tx, *id, *at)?),
        });
    }
    tx.commit()?;
    Ok(outcomes)
}

fn headers_json(headers: &[(String, String)]) -> Result<String> {
    serde_json::to_string(headers).map_err(|error| StoreError::Corrupt(error.to_string()))
}

fn insert(tx: &rusqlite::Transaction<'_>, event: &NewWebhook) -> Result<Enqueued> {
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
            headers_json(&event.headers)?,
            &event.body[..],
        ])?;
    Ok(Enqueued::Stored)
}

/// Applies settlements; returns how many pending rows they took out of `pending`.
fn settle(tx: &rusqlite::Transaction<'_>, settlements: &[Settlement]) -> Result<u64> {
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

fn prune(tx: &rusqlite::Transaction<'_>, now: DateTime<Utc>) -> Result<u64> {
    let mut pruned = 0;
    for (state, retention) in [("processed", RETENTION), ("failed", DEAD_LETTER_RETENTION)] {
        let cutoff = to_ms(now - retention);
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
        [to_ms(now - DEAD_LETTER_RETENTION)],
    )?;
    Ok(pruned as u64)
}

/// Puts dead letter `id` into the inbox under its delivery id, once: a second replay,
/// or a delivery already pending or processed, changes nothing; one that failed is
/// queued again.
fn replay(tx: &rusqlite::Transaction<'_>, id: i64, at: DateTime<Utc>) -> Result<Replayed> {
    let Some(letter) = read_dead_letter(tx, id)? else {
        return Ok(Replayed::NotFound);
    };
    if let Some(replayed_at) = letter.replayed_at {
        // Only a replay the worker gave up on may go again: its row never applied.
        if let (Some(inbox_id), Some("failed")) =
            (letter.replayed_as, letter.replay_state.as_deref())
        {
            tx.execute(
                "UPDATE webhook_inbox SET state = 'pending', attempts = 0, next_attempt_at = NULL,
                    last_error = NULL, processed_at = NULL
                 WHERE id = ?1 AND state = 'failed'",
                [inbox_id],
            )?;
            tx.execute(
                "UPDATE webhook_dead_letters SET replayed_at = ?2 WHERE id = ?1",
                params![id, to_ms(at)],
            )?;
            return Ok(Replayed::Requeued { inbox_id });
        }
        return Ok(Replayed::AlreadyReplayed {
            at: replayed_at,
            inbox_id: letter.replayed_as,
        });
    }
    let delivery_id = letter.replay_delivery_id();
    let existing: Option<(i64, String)> = tx
        .query_row(
            "SELECT id, state FROM webhook_inbox WHERE connection = ?1 AND delivery_id = ?2",
            params![letter.connection, delivery_id],
            |row| Ok((row.get(0)?, row.get(1)?)),
        )
        .optional()?;
    let replayed = match existing {
        None => {
            let event = NewWebhook {
                connection: letter.connection.clone(),
                delivery_id,
                topic: letter.topic.clone(),
                headers: letter.headers.clone(),
                body: Bytes::from(letter.body.clone()),
                received_at: letter.received_at,
                // A replay is the operator's: no body-replay window applies to it.
                body_sha256: None,
            };
            insert(tx, &event)?;
            Replayed::Queued {
                inbox_id: tx.last_insert_rowid(),
            }
        }
        Some((inbox_id, state)) if state == "failed" => {
            tx.execute(
                "UPDATE webhook_inbox SET state = 'pending', attempts = 0, next_attempt_at = NULL,
                    last_error = NULL, processed_at = NULL
                 WHERE id = ?1 AND state = 'failed'",
                [inbox_id],
            )?;
            Replayed::Requeued { inbox_id }
        }
        Some((inbox_id, state)) => Replayed::AlreadyInInbox { inbox_id, state },
    };
    let inbox_id = match &replayed {
        Replayed::Queued { inbox_id }
        | Replayed::Requeued { inbox_id }
        | Replayed::AlreadyInInbox { inbox_id, .. } => Some(*inbox_id),
        _ => None,
    };
    tx.execute(
        "UPDATE webhook_dead_letters SET replayed_at = ?2, replayed_as = ?3 WHERE id = ?1",
        params![id, to_ms(at), inbox_id],
    )?;
    Ok(replayed)
}

const DEAD_LETTER_COLUMNS: &str = "d.id, d.connection, d.delivery_id, d.topic, d.received_at,
    d.reason, d.replayed_at, d.replayed_as, i.state, i.last_error, d.headers, d.body";

fn dead_letter_from(row: &rusqlite::Row<'_>) -> rusqlite::Result<StoredDeadLetter> {
    Ok(StoredDeadLetter {
        id: row.get(0)?,
        connection: row.get(1)?,
        delivery_id: row.get(2)?,
        topic: row.get(3)?,
        received_at: from_ms(row.get(4)?),
        reason: row.get(5)?,
        replayed_at: row.get::<_, Option<i64>>(6)?.map(from_ms),
        replayed_as: row.get(7)?,
        replay_state: row.get(8)?,
        replay_error: row.get(9)?,
        headers: parse_headers(&row.get::<_, String>(10)?),
        body: row.get(11)?,
    })
}

fn read_dead_letter(db: &Connection, id: i64) -> Result<Option<StoredDeadLetter>> {
    Ok(db
        .query_row(
            &format!(
                "SELECT {DEAD_LETTER_COLUMNS} FROM webhook_dead_letters AS d
                 LEFT JOIN webhook_inbox AS i ON i.id = d.replayed_as
                 WHERE d.id = ?1"
            ),
            [id],
            dead_letter_from,
        )
        .optional()?)
}

fn parse_headers(text: &str) -> Vec<(String, String)> {
    serde_json::from_str(text).unwrap_or_default()
}

impl Store {
    fn inbox(&self) -> &Inbox {
        &self.inner.inbox
    }

    /// The inbox file's path.
    pub fn inbox_path(&self) -> &Path {
        &self.inbox().path
    }

    /// Runs `f` on the inbox's reader connection on a blocking thread.
    async fn read_inbox<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T> + Send + 'static,
    {
        let inner = self.inner.clone();
        tokio::task::spawn_blocking(move || {
            let mut slot = inner
                .inbox
                .reader
                .lock()
                .map_err(|_| StoreError::Task("inbox reader lock poisoned".into()))?;
            if slot.is_none() {
                let connection = open_connection(&inner.inbox.path)?;
                connection.pragma_update(None, "query_only", "ON")?;
                *slot = Some(connection);
            }
            f(slot.as_ref().expect("opened above"))
        })
        .await
        .map_err(|error| StoreError::Task(error.to_string()))?
    }

    /// Commits a verified delivery to the inbox (grouped with concurrent ones into one
    /// transaction) and returns once it is durable. Refuses it, writing nothing, when
    /// the inbox is full or the writer's queue is.
    pub async fn enqueue_webhook(&self, event: NewWebhook) -> Result<Enqueued, EnqueueError> {
        self.inbox_has_room()?;
        let inbox = self.inbox();
        let (reply, answer) = oneshot::channel();
        inbox
            .queue
            .try_send(Command::Insert(event, reply))
            .map_err(|error| match error {
                mpsc::error::TrySendError::Full(_) => EnqueueError::Busy,
                mpsc::error::TrySendError::Closed(_) => {
                    StoreError::Task("the inbox writer has stopped".into()).into()
                }
            })?;
        Ok(answer
            .await
            .map_err(|_| StoreError::Task("the inbox writer has stopped".into()))??)
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
        self.inbox().shared.pending.load(Ordering::Relaxed)
    }

    /// Notified after every committed batch that stored a new delivery.
    pub fn inbox_committed(&self) -> &Notify {
        &self.inbox().shared.committed
    }

    /// Keeps a delivery whose signature was valid but whose body could not be parsed,
    /// with the delivery id and topic a replay is stored under.
    #[allow(clippy::too_many_arguments)]
    pub async fn dead_letter(
        &self,
        connection: &str,
        delivery_id: &str,
        topic: Option<&str>,
        reason: &str,
        headers: Vec<(String, String)>,
        body: Bytes,
        at: DateTime<Utc>,
    ) -> Result<()> {
        let letter = DeadLetter {
            connection: connection.to_owned(),
            delivery_id: delivery_id.to_owned(),
            topic: topic.map(str::to_owned),
            reason: reason.to_owned(),
            headers,
            body,
            at,
        };
        self.inbox()
            .ask(|reply| Command::DeadLetter(letter, reply))
            .await
    }

    /// Records how the worker is done with rows (one commit for all of them).
    pub async fn settle_webhooks(&self, settlements: Vec<Settlement>) -> Result<()> {
        if settlements.is_empty() {
            return Ok(());
        }
        self.inbox()
            .ask(|reply| Command::Settle(settlements, reply))
            .await
    }

    /// Pending rows due at `now`, oldest first, at most `limit`. A connection with a row
    /// waiting for its retry contributes nothing, so its order is kept.
    pub async fn due_webhooks(&self, now: DateTime<Utc>, limit: u32) -> Result<Vec<InboxRow>> {
        self.read_inbox(move |db| {
            let mut statement = db.prepare_cached(
                "SELECT i.id, connection, delivery_id, topic, headers, body, received_at, attempts
                 FROM webhook_inbox AS i INDEXED BY webhook_inbox_pending
                 CROSS JOIN webhook_bodies AS b ON b.id = i.id
                 WHERE state = 'pending' AND coalesce(next_attempt_at, 0) <= ?1
                   AND connection NOT IN (
                        SELECT connection FROM webhook_inbox INDEXED BY webhook_inbox_retrying
                        WHERE state = 'pending' AND next_attempt_at IS NOT NULL
                          AND next_attempt_at > ?1)
                 ORDER BY i.id LIMIT ?2",
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
        self.inbox().ask(|reply| Command::Prune(now, reply)).await
    }

    /// Inbox rows by state, counted from the indexes (the bodies are not read).
    pub async fn inbox_counts(&self) -> Result<InboxCounts> {
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

    /// Dead letters kept, newest first (`connection` to list one connection's only).
    pub async fn dead_letters(
        &self,
        connection: Option<String>,
        limit: u32,
    ) -> Result<Vec<StoredDeadLetter>> {
        self.read_inbox(move |db| {
            let mut statement = db.prepare(&format!(
                "SELECT {DEAD_LETTER_COLUMNS} FROM webhook_dead_letters AS d
                 LEFT JOIN webhook_inbox AS i ON i.id = d.replayed_as
                 WHERE ?1 IS NULL OR d.connection = ?1
                 ORDER BY d.id DESC LIMIT ?2"
            ))?;
            let rows = statement.query_map(params![connection, limit], dead_letter_from)?;
            Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
        })
        .await
    }

    /// One dead letter, with its replay's inbox row state.
    pub async fn stored_dead_letter(&self, id: i64) -> Result<Option<StoredDeadLetter>> {
        self.read_inbox(move |db| read_dead_letter(db, id)).await
    }

    /// Replays a dead letter through the inbox (and so through the inbox worker, like
    /// any delivery), at most once: see [`Replayed`]. One transaction on the inbox's
    /// writer, so it is safe beside a running daemon, whose worker picks the row up.
    pub async fn replay_dead_letter(&self, id: i64, at: DateTime<Utc>) -> Result<Replayed> {
        self.inbox()
            .ask(|reply| Command::Replay(id, at, reply))
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
            body_sha256: None,
            body: Bytes::from_static(br#"{"id":1}"#),
            received_at: Utc::now(),
        }
    }

    /// The 2xx a vendor gets rests on this: the writer's commits are fsynced
    /// (`synchronous = FULL`, 2) in WAL mode, so an acknowledged delivery survives a
    /// power loss. The pragma belongs to the connection, so it is read from the writer's.
    #[test]
    fn the_inbox_writer_commits_with_full_synchronous_in_wal_mode() {
        let dir = tempfile::tempdir().unwrap();
        let writer = open_writer(&dir.path().join("dealsync.inbox.db"), WAL_POLICY).unwrap();
        let synchronous: i64 = writer
            .query_row("PRAGMA synchronous", [], |row| row.get(0))
            .unwrap();
        assert_eq!(synchronous, 2, "PRAGMA synchronous of the inbox writer");
        let journal: String = writer
            .query_row("PRAGMA journal_mode", [], |row| row.get(0))
            .unwrap();
        assert_eq!(journal, "wal");
    }

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
        assert_eq!(store.inbox_pending(), 100);
    }

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

    #[tokio::test]
    async fn committed_deliveries_survive_reopening_and_the_pending_count_is_restored() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("dealsync.db");
        {
            let store = Store::open(&path).unwrap();
            for id in ["a", "b", "c"] {
                store.enqueue_webhook(event(id)).await.unwrap();
            }
            let row = store.due_webhooks(Utc::now(), 1).await.unwrap().remove(0);
            store.webhook_processed(row.id, Utc::now()).await.unwrap();
            assert_eq!(store.inbox_pending(), 2);
        }
        let store = Store::open(&path).unwrap();
        assert!(dir.path().join("dealsync.inbox.db").exists());
        assert_eq!(store.inbox_pending(), 2);
        assert_eq!(
            store.enqueue_webhook(event("a")).await.unwrap(),
            Enqueued::Duplicate
        );
    }

    #[tokio::test]
    async fn a_full_inbox_refuses_a_delivery_and_writes_nothing() {
        let (_dir, store) = temp_store();
        store
            .inbox()
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
        let bodies: i64 = store
            .read_inbox(|db| {
                Ok(db.query_row("SELECT count(*) FROM webhook_bodies", [], |row| row.get(0))?)
            })
            .await
            .unwrap();
        assert_eq!(bodies, 0, "a pruned row's body is deleted with it");
    }

    #[tokio::test]
    async fn under_sustained_writes_the_writer_keeps_the_wal_within_its_limit() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("test.inbox.db");
        // The background checkpointer is never woken: only the writer's own checkpoint
        // at the limit can let the WAL start over.
        let limit = 128;
        let policy = WalPolicy {
            checkpoint_every: i32::MAX,
            limit,
        };
        let inbox = Inbox::open_with(&path, policy).unwrap();
        let wal = PathBuf::from(format!("{}-wal", path.display()));
        let body = Bytes::from(vec![b'x'; 3000]);
        // 40 batches of 25 deliveries of 3 KB: about 1,000 pages, eight times the limit.
        for batch in 0..40 {
            let mut answers = Vec::new();
            for n in 0..25 {
                let mut delivery = event(&format!("{batch}-{n}"));
                delivery.body = body.clone();
                let (reply, answer) = oneshot::channel();
                inbox
                    .queue
                    .send(Command::Insert(delivery, reply))
                    .await
                    .unwrap();
                answers.push(answer);
            }
            for answer in answers {
                assert_eq!(answer.await.unwrap().unwrap(), Enqueued::Stored);
            }
            let wal_bytes = std::fs::metadata(&wal).map_or(0, |meta| meta.len());
            assert!(
                wal_bytes <= 2 * limit as u64 * (4096 + 24),
                "batch {batch}: the WAL grew to {wal_bytes} bytes"
            );
        }
        drop(inbox);
        let db = Connection::open(&path).unwrap();
        let stored: i64 = db
            .query_row(
                "SELECT count(*) FROM webhook_inbox JOIN webhook_bodies USING (id)",
                [],
                |row| row.get(0),
            )
            .unwrap();
        assert_eq!(stored, 1000);
    }
}
