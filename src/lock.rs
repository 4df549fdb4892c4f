//! Lock files beside the database, held with `flock(2)`: the kernel releases them when
//! the holder's process ends, `kill -9` included, so a stale file never blocks anyone.
//!
//! - `<database>.lock` (`dealsync.db.lock`): held by `dealsync run` for as long as it
//!   runs. One daemon per database: a second `run` on the same database stops at once,
//!   naming the holder's PID (which the holder writes into the file).
//! - `<database>.oauth-<connection>.lock`: held while one process refreshes (or
//!   `dealsync auth` stores) a connection's OAuth tokens, so the daemon, `dealsync sync`
//!   and `dealsync auth` never spend the same refresh token twice.
//!
//! Invariants: the files are created 0600 (`crate::files`) and never deleted (deleting
//! a lock file another process has open would let a third one lock a new file of the
//! same name); only the lock says who holds it, the PID in the file is for messages.

use std::fs::File;
use std::io::{self, Read, Seek, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// How often a waiting process tries the lock again.
const POLL: Duration = Duration::from_millis(25);

/// The daemon's lock file for the database at `db`: `dealsync.db` → `dealsync.db.lock`.
pub fn daemon_lock_path(db: &Path) -> PathBuf {
    suffixed(db, ".lock")
}

/// The token-refresh lock file of `connection` for the database at `db`:
/// `dealsync.db` → `dealsync.db.oauth-<connection>.lock`. Connection names hold only
/// letters, digits, `-` and `_`, so the name is a plain file name.
pub fn token_lock_path(db: &Path, connection: &str) -> PathBuf {
    suffixed(db, &format!(".oauth-{connection}.lock"))
}

fn suffixed(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.as_os_str().to_owned();
    name.push(suffix);
    PathBuf::from(name)
}

/// Why a lock was not taken.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// Another process holds it.
    #[error("{path} is locked by {}", holder_text(*.holder))]
    Held { path: PathBuf, holder: Option<u32> },
    /// Waited `waited` without getting it.
    #[error("{path} stayed locked by {} for {waited:?}", holder_text(*.holder))]
    TimedOut {
        path: PathBuf,
        holder: Option<u32>,
        waited: Duration,
    },
    /// The wait was cancelled (shutdown).
    #[error("stopped waiting for {path}")]
    Cancelled { path: PathBuf },
    #[error("locking {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
    /// A lock that is not a file (a PostgreSQL advisory lock, named by `what`) stayed
    /// held by another process for `waited`.
    #[error("{what} stayed held by another process for {waited:?}")]
    TimedOutOn { what: String, waited: Duration },
    /// The wait for such a lock was cancelled (shutdown).
    #[error("stopped waiting for {what}")]
    CancelledOn { what: String },
    /// Such a lock could not be asked for (the database is out of reach).
    #[error("taking {what}: {reason}")]
    Failed { what: String, reason: String },
}

fn holder_text(holder: Option<u32>) -> String {
    match holder {
        Some(pid) => format!("process {pid}"),
        None => "another process".to_owned(),
    }
}

/// A held token-refresh lock of either kind (a [`LockFile`], or a PostgreSQL session
/// lock); dropping it releases the lock.
pub struct RefreshLock(
    // Never read: holding it is the point.
    #[allow(dead_code)] Box<dyn Send + Sync>,
);

impl RefreshLock {
    pub fn new(held: impl Send + Sync + 'static) -> RefreshLock {
        RefreshLock(Box::new(held))
    }
}

/// An exclusive lock on a file, held until dropped (closing the file releases it).
#[derive(Debug)]
pub struct LockFile {
    // Never read: the open file description is what holds the flock.
    _file: File,
    path: PathBuf,
}

impl LockFile {
    /// Takes the lock on `path` (creating the file 0600 if missing) without waiting,
    /// and writes this process's PID into it.
    pub fn try_lock(path: &Path) -> Result<LockFile, LockError> {
        let failed = |source: io::Error| LockError::Io {
            path: path.to_owned(),
            source,
        };
        if let Some(parent) = path.parent()
            && !parent.as_os_str().is_empty()
        {
            crate::files::create_dir_all(parent).map_err(failed)?;
        }
        let mut file = crate::files::open_private(path).map_err(failed)?;
        match rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => {}
            Err(errno) if errno == rustix::io::Errno::WOULDBLOCK => {
                return Err(LockError::Held {
                    path: path.to_owned(),
                    holder: read_holder(&mut file),
                });
            }
            Err(errno) => return Err(failed(errno.into())),
        }
        file.set_len(0)
            .and_then(|()| file.rewind())
            .and_then(|()| writeln!(file, "{}", std::process::id()))
            .map_err(failed)?;
        Ok(LockFile {
            _file: file,
            path: path.to_owned(),
        })
    }

    /// Waits for the lock on `path`, trying every few milliseconds, until it is taken,
    /// `timeout` has passed or `cancel` is cancelled.
    pub async fn lock(
        path: &Path,
        timeout: Duration,
        cancel: &CancellationToken,
    ) -> Result<LockFile, LockError> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            match LockFile::try_lock(path) {
                Err(LockError::Held { holder, .. }) if tokio::time::Instant::now() >= deadline => {
                    return Err(LockError::TimedOut {
                        path: path.to_owned(),
                        holder,
                        waited: timeout,
                    });
                }
                Err(LockError::Held { .. }) => {}
                other => return other,
            }
            tokio::select! {
                _ = cancel.cancelled() => return Err(LockError::Cancelled { path: path.to_owned() }),
                _ = tokio::time::sleep(POLL) => {}
            }
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// The PID a holder wrote into the file; `None` while it has not yet written it.
fn read_holder(file: &mut File) -> Option<u32> {
    let mut text = String::new();
    file.rewind().ok()?;
    file.take(32).read_to_string(&mut text).ok()?;
    text.trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_sit_beside_the_database() {
        let db = Path::new("/var/lib/dealsync/dealsync.db");
        assert_eq!(
            daemon_lock_path(db),
            Path::new("/var/lib/dealsync/dealsync.db.lock")
        );
        assert_eq!(
            token_lock_path(db, "hubspot-eu"),
            Path::new("/var/lib/dealsync/dealsync.db.oauth-hubspot-eu.lock")
        );
    }

    #[tokio::test]
    async fn a_held_lock_names_its_holder_and_is_free_again_once_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state/d.db.lock");
        let held = LockFile::try_lock(&path).unwrap();
        assert_eq!(held.path(), path);
        // A second open file description conflicts even within one process.
        match LockFile::try_lock(&path) {
            Err(LockError::Held { holder, .. }) => assert_eq!(holder, Some(std::process::id())),
            other => panic!("expected Held, got {other:?}"),
        }
        let cancel = CancellationToken::new();
        let waited = LockFile::lock(&path, Duration::from_millis(100), &cancel).await;
        assert!(
            matches!(waited, Err(LockError::TimedOut { .. })),
            "{waited:?}"
        );
        drop(held);
        let again = LockFile::lock(&path, Duration::from_secs(1), &cancel)
            .await
            .unwrap();
        drop(again);
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
    }

    #[tokio::test]
    async fn a_wait_ends_when_cancelled() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.lock");
        let _held = LockFile::try_lock(&path).unwrap();
        let cancel = CancellationToken::new();
        cancel.cancel();
        let waited = LockFile::lock(&path, Duration::from_secs(60), &cancel).await;
        assert!(
            matches!(waited, Err(LockError::Cancelled { .. })),
            "{waited:?}"
        );
    }
}
