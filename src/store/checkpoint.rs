//! WAL checkpoints off the commit path, for the deal database and the webhook inbox.
//!
//! Each file has one writer connection. SQLite's automatic checkpoint would run inside
//! the writer's commits (copying pages into the database file and fsyncing it while
//! every waiting write waits too), so it is turned off and replaced by:
//! - a WAL hook on the writer that notes the WAL's size in pages after each commit
//!   (the hook runs inside the commit, on the writer's thread);
//! - a checkpointer thread with its own connection, woken every
//!   [`WalPolicy::checkpoint_every`] pages, that runs PASSIVE checkpoints with no busy
//!   timeout: they never wait for the writer or readers and copy what they can;
//! - a bound: under sustained writes the background pass never finds the WAL quiet, so
//!   the WAL would never start over. Once it holds [`WalPolicy::limit`] pages the writer
//!   finishes a checkpoint itself, right after a background pass has ended (little is
//!   left to copy: one short fsync), and its next transaction restarts the WAL. Past
//!   twice the limit the writer waits for the running pass to end (at most
//!   [`BACKGROUND_WAIT`]) rather than let the WAL grow.
//!
//! Durability is that of each commit (WAL plus `synchronous`), never of a checkpoint.

use rusqlite::Connection;
use std::cell::Cell;
use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

/// SQLite's page size in this project's files.
const PAGE_BYTES: i64 = 4096;

/// When a file's WAL is checkpointed, in pages (one WAL frame each).
#[derive(Debug, Clone, Copy)]
pub(super) struct WalPolicy {
    /// Pages committed between wake-ups of the checkpointer thread.
    pub checkpoint_every: i32,
    /// Pages past which the writer finishes a checkpoint itself so that the WAL can
    /// start over; also the size the WAL file is cut back to then.
    pub limit: i32,
}

thread_local! {
    /// The WAL's size in pages after the last commit of a writer connection on this
    /// thread, or -1 once taken.
    static WAL_PAGES: Cell<i32> = const { Cell::new(-1) };
}

fn note_wal_pages(_wal: &rusqlite::hooks::Wal, pages: std::ffi::c_int) -> rusqlite::Result<()> {
    WAL_PAGES.set(pages);
    Ok(())
}

/// Turns SQLite's automatic checkpoint off on `writer` and installs the hook that
/// [`Checkpoints::after_commit`] reads. After `journal_mode = WAL`.
pub(super) fn install(writer: &Connection, policy: WalPolicy) -> rusqlite::Result<()> {
    // Setting `wal_autocheckpoint` replaces the WAL hook: it goes first.
    writer.pragma_update(None, "wal_autocheckpoint", 0)?;
    writer.pragma_update(
        None,
        "journal_size_limit",
        i64::from(policy.limit) * PAGE_BYTES,
    )?;
    writer.wal_hook(Some(note_wal_pages));
    Ok(())
}

/// The writer's side of one file's checkpoints.
pub(super) struct Checkpoints {
    policy: WalPolicy,
    wake: std::sync::mpsc::SyncSender<()>,
    /// The WAL's size in pages when the checkpointer was last woken.
    woken_at: AtomicI32,
    /// Whether the checkpointer thread is running a pass, and its end signalled.
    running: Arc<(Mutex<bool>, Condvar)>,
    /// Names the file in log lines.
    what: &'static str,
}

impl Checkpoints {
    /// Starts the checkpointer thread on `connection` (its own, not the writer's).
    pub(super) fn start(
        connection: Connection,
        policy: WalPolicy,
        thread: &str,
        what: &'static str,
    ) -> std::io::Result<Checkpoints> {
        // A background pass never waits: whatever it cannot copy now, a later pass or
        // the writer will.
        connection
            .busy_timeout(Duration::ZERO)
            .map_err(std::io::Error::other)?;
        let (wake, woken) = std::sync::mpsc::sync_channel::<()>(1);
        let running = Arc::new((Mutex::new(false), Condvar::new()));
        let state = running.clone();
        std::thread::Builder::new()
            .name(thread.into())
            .spawn(move || {
                // Ends when the writer's side is dropped.
                while woken.recv().is_ok() {
                    set_running(&state, true);
                    match checkpoint(&connection, "PASSIVE") {
                        Err(error) if is_busy(&error) => {
                            tracing::debug!(%error, "checkpoint of {what} deferred");
                        }
                        Err(error) => tracing::warn!(%error, "checkpointing {what} failed"),
                        Ok(()) => {}
                    }
                    set_running(&state, false);
                }
            })?;
        Ok(Checkpoints {
            policy,
            wake,
            woken_at: AtomicI32::new(0),
            running,
            what,
        })
    }

    /// Called on the writer's thread right after each commit of `writer`.
    pub(super) fn after_commit(&self, writer: &Connection) {
        let pages = WAL_PAGES.replace(-1);
        if pages < 0 {
            return;
        }
        let limit = self.policy.limit;
        if pages < limit {
            let woken_at = self.woken_at.load(Ordering::Relaxed);
            if pages < woken_at {
                // The WAL started over.
                self.woken_at.store(0, Ordering::Relaxed);
            } else if pages - woken_at >= self.policy.checkpoint_every {
                self.woken_at.store(pages, Ordering::Relaxed);
                // Already woken and not yet started: nothing to add.
                let _ = self.wake.try_send(());
            }
            return;
        }
        // No new background pass from here: once the running one (if any) ends, little
        // is left to copy and the writer finishes the checkpoint itself (no write can be
        // in progress here). Past twice the limit the writer waits for that pass to end
        // (bounded) rather than let the WAL grow.
        self.woken_at.store(0, Ordering::Relaxed);
        let wait = if pages >= limit.saturating_mul(2) {
            BACKGROUND_WAIT
        } else {
            Duration::ZERO
        };
        let (lock, ended) = &*self.running;
        let idle = lock
            .lock()
            .map(|running| {
                ended
                    .wait_timeout_while(running, wait, |running| *running)
                    .is_ok_and(|(running, _)| !*running)
            })
            .unwrap_or(false);
        if !idle {
            return;
        }
        match checkpoint(writer, "PASSIVE") {
            Err(error) if is_busy(&error) => {
                tracing::debug!(%error, "writer checkpoint of {} deferred", self.what);
            }
            Err(error) => tracing::warn!(%error, "checkpointing {} failed", self.what),
            Ok(()) => {}
        }
    }
}

/// The longest the writer waits for a background pass to end, past twice the limit.
const BACKGROUND_WAIT: Duration = Duration::from_secs(1);

fn set_running(state: &(Mutex<bool>, Condvar), value: bool) {
    if let Ok(mut running) = state.0.lock() {
        *running = value;
    }
    if !value {
        state.1.notify_all();
    }
}

fn is_busy(error: &rusqlite::Error) -> bool {
    matches!(error, rusqlite::Error::SqliteFailure(e, _) if e.code == rusqlite::ErrorCode::DatabaseBusy)
}

fn checkpoint(connection: &Connection, mode: &str) -> rusqlite::Result<()> {
    connection.query_row(&format!("PRAGMA wal_checkpoint({mode})"), [], |_| Ok(()))
}
