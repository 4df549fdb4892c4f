//! The inbox file and its one writer thread: group commit.
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
//! - A request is answered only after the transaction holding it committed (or failed);
//!   one failing request does not fail the others of its batch.
//! - The pending count moves before anyone hears back, so a caller that saw its commit
//!   also sees the count that includes it.
//! - The reader connection is query-only.

use super::dead_letters::{self, DeadLetter, Replayed};
use super::intake::{self, Enqueued, NewWebhook};
use super::processing::{self, Settlement};
use crate::store::checkpoint::{self, Checkpoints, WalPolicy};
use crate::store::migrations::Schema;
use crate::store::{Result, Store, StoreError};
use chrono::{DateTime, Utc};
use rusqlite::Connection;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use tokio::sync::{Notify, mpsc, oneshot};

/// Most requests committed in one transaction.
pub const MAX_BATCH: usize = 1024;

/// Requests that may wait for the writer; beyond this a delivery is refused as busy.
pub const QUEUE: usize = 16_384;

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
pub(in crate::store) const SCHEMA: Schema = Schema {
    migrations: &[
        (1, include_str!("../migrations/inbox_0001.sql")),
        (2, include_str!("../migrations/inbox_0002.sql")),
    ],
    file: "webhook inbox",
    backfills: &[],
};

/// What the writer thread is asked to do; each answers on its own channel.
pub(super) enum Command {
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
pub(super) struct Shared {
    /// Unprocessed rows: counted at open, then kept by the writer after each commit.
    pub(super) pending: AtomicU64,
    /// Woken after each batch that stored a new row, so the worker need not poll.
    pub(super) committed: Notify,
}

/// The open inbox file: the writer's queue and a reader connection.
pub(in crate::store) struct Inbox {
    pub(super) path: PathBuf,
    pub(super) queue: mpsc::Sender<Command>,
    pub(super) shared: Arc<Shared>,
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
    SCHEMA.refuse_newer(db, path)?;
    db.pragma_update(None, "journal_mode", "WAL")?;
    SCHEMA.migrate(db, path)
}

/// Creates (owner-only) and migrates the inbox file and opens the writer's connection.
fn open_writer(path: &Path, policy: WalPolicy) -> Result<Connection> {
    crate::store::create_private(path, "the webhook inbox")?;
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
    pub(in crate::store) fn open(path: &Path) -> Result<Inbox> {
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
    pub(super) async fn ask<T>(
        &self,
        command: impl FnOnce(oneshot::Sender<Result<T>>) -> Command,
    ) -> Result<T> {
        let (reply, answer) = oneshot::channel();
        self.queue
            .send(command(reply))
            .await
            .map_err(|_| stopped())?;
        answer.await.map_err(|_| stopped())?
    }
}

/// The error of a request the writer thread can no longer take or answer.
pub(super) fn stopped() -> StoreError {
    StoreError::Task("the inbox writer has stopped".into())
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
            Command::Insert(event, _) => Done::Insert(intake::insert(&tx, event)?),
            Command::DeadLetter(letter, _) => {
                dead_letters::keep(&tx, letter)?;
                Done::Unit
            }
            Command::Settle(settlements, _) => Done::Count(processing::settle(&tx, settlements)?),
            Command::Prune(now, _) => Done::Count(processing::prune(&tx, *now)?),
            Command::Replay(id, at, _) => Done::Replay(dead_letters::replay(&tx, *id, *at)?),
        });
    }
    tx.commit()?;
    Ok(outcomes)
}

impl Store {
    /// The SQLite inbox, or [`StoreError::NotOnPostgres`].
    pub(super) fn inbox(&self) -> Result<&Inbox> {
        Ok(&self.sqlite()?.inbox)
    }

    /// The inbox file's path; `None` on PostgreSQL.
    pub fn inbox_path(&self) -> Option<&Path> {
        self.inbox().ok().map(|inbox| inbox.path.as_path())
    }

    /// Runs `f` on the inbox's reader connection on a blocking thread.
    pub(super) async fn read_inbox<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T> + Send + 'static,
    {
        let inner = self.sqlite()?.clone();
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
}

#[cfg(test)]
mod tests {
    use super::super::tests::event;
    use super::*;
    use bytes::Bytes;

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

    /// Whether the writer has signalled a commit of new rows since the last look (a
    /// stored permit completes `notified` at its first poll).
    ///
    /// The writer signals after it answers, so first a command that stores nothing
    /// makes a round trip: the writer is one thread, so when it answers, every earlier
    /// batch has signalled.
    async fn woken(store: &Store) -> bool {
        let long_ago = chrono::DateTime::<Utc>::UNIX_EPOCH;
        assert_eq!(store.prune_webhooks(long_ago).await.unwrap(), 0);
        tokio::time::timeout(
            std::time::Duration::ZERO,
            store.inbox_committed().notified(),
        )
        .await
        .is_ok()
    }

    /// The pending count is the 503 backpressure's measure and the wake-up is what
    /// starts the worker: both follow every way a row enters or leaves `pending`.
    #[tokio::test]
    async fn the_pending_count_and_the_worker_wake_up_follow_stores_settlements_and_replays() {
        let (_dir, store) = crate::store::tests::temp_store();
        assert!(!woken(&store).await);
        store.enqueue_webhook(event("a")).await.unwrap();
        store.enqueue_webhook(event("b")).await.unwrap();
        store.enqueue_webhook(event("c")).await.unwrap();
        assert_eq!(store.inbox_pending(), 3);
        assert!(woken(&store).await, "a stored delivery wakes the worker");
        assert_eq!(
            store.enqueue_webhook(event("a")).await.unwrap(),
            Enqueued::Duplicate
        );
        assert_eq!(store.inbox_pending(), 3);
        assert!(
            !woken(&store).await,
            "a duplicate stores nothing to work on"
        );

        let due = store.due_webhooks(Utc::now(), 10).await.unwrap();
        assert_eq!(
            due[0].headers,
            event("a").headers,
            "the headers are read back"
        );
        store
            .webhook_processed(due[0].id, Utc::now())
            .await
            .unwrap();
        store
            .webhook_failed(due[1].id, "unusable", Utc::now())
            .await
            .unwrap();
        assert_eq!(store.inbox_pending(), 1);
        assert!(!woken(&store).await, "settling stores nothing to work on");

        store
            .dead_letter(
                "shop",
                "dead-1",
                Some("checkouts/create"),
                "not JSON",
                vec![("x-wc-webhook-topic".into(), "order.created".into())],
                Bytes::from_static(b"{"),
                Utc::now(),
            )
            .await
            .unwrap();
        let letter = store.dead_letters(None, 1).await.unwrap().remove(0);
        assert_eq!(
            letter.headers,
            [("x-wc-webhook-topic".to_owned(), "order.created".to_owned())]
        );
        assert!(matches!(
            store
                .replay_dead_letter(letter.id, Utc::now())
                .await
                .unwrap(),
            Replayed::Queued { .. }
        ));
        assert_eq!(store.inbox_pending(), 2, "a replay is a pending row");
        assert!(woken(&store).await, "a replay wakes the worker");
        assert!(matches!(
            store
                .replay_dead_letter(letter.id, Utc::now())
                .await
                .unwrap(),
            Replayed::AlreadyReplayed { .. }
        ));
        assert_eq!(store.inbox_pending(), 2);
        assert_eq!(
            store.inbox_counts().await.unwrap(),
            crate::store::InboxCounts {
                pending: 2,
                processed: 1,
                failed: 1,
            }
        );
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
