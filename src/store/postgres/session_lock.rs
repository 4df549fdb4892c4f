//! A named lock held by one process at a time across every replica, for work that
//! must not run twice at once, such as refreshing an OAuth token a vendor rotates: a
//! session-level advisory lock on a connection taken out of the pool for as long as it
//! is held. Dropping the guard closes that connection, and the server releases the
//! lock with it; a process that dies releases it the same way. So no lock is ever left
//! behind on a pooled connection.

use super::Database;
use crate::lock::LockError;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// The advisory-lock class of named session locks (two-key form).
const SESSION_LOCK_CLASS: i32 = 0x6c6f_636b; // "lock"

/// How often a waiting process asks again.
const POLL: Duration = Duration::from_millis(100);

/// A held session lock; dropping it closes its connection, which releases it.
pub struct SessionLock {
    // Never read: its connection holds the lock.
    _client: deadpool_postgres::ClientWrapper,
}

impl Database {
    /// Takes the lock `name` (any text), asking every [`POLL`] until `wait` has passed
    /// or `cancel` fires.
    pub async fn session_lock(
        &self,
        name: &str,
        wait: Duration,
        cancel: &CancellationToken,
    ) -> Result<SessionLock, LockError> {
        let what = format!("the lock {name} in PostgreSQL {}", self.target());
        let failed = |reason: String| LockError::Failed {
            what: what.clone(),
            reason,
        };
        let client = self
            .client()
            .await
            .map_err(|error| failed(crate::telemetry::error_chain(&error)))?;
        // Out of the pool: closed, not recycled, when the guard is dropped.
        let client = deadpool_postgres::Object::take(client);
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let taken: bool = client
                .query_one(
                    "SELECT pg_try_advisory_lock($1, hashtext($2))",
                    &[&SESSION_LOCK_CLASS, &name],
                )
                .await
                .and_then(|row| row.try_get(0))
                .map_err(|error| failed(crate::telemetry::error_chain(&error)))?;
            if taken {
                return Ok(SessionLock { _client: client });
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(LockError::TimedOutOn { what, waited: wait });
            }
            tokio::select! {
                _ = cancel.cancelled() => return Err(LockError::CancelledOn { what }),
                _ = tokio::time::sleep(POLL) => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::postgres::tests::url_of;
    use crate::store::postgres::{Options, test_database};

    /// Two replicas: the second waits while the first holds the lock, times out, and
    /// gets it once the first drops its guard; another name is free meanwhile.
    #[tokio::test]
    async fn a_session_lock_is_held_by_one_replica_until_its_guard_is_dropped() {
        let Some(test) =
            test_database("a_session_lock_is_held_by_one_replica_until_its_guard_is_dropped")
        else {
            return;
        };
        let (url, options) = (url_of(&test), Options::default());
        let one = Database::open(&url, &options).await.unwrap();
        let two = Database::open(&url, &options).await.unwrap();
        let cancel = CancellationToken::new();
        let short = Duration::from_millis(300);
        let held = one.session_lock("oauth:crm", short, &cancel).await.unwrap();
        match two.session_lock("oauth:crm", short, &cancel).await {
            Err(LockError::TimedOutOn { what, .. }) => {
                assert!(what.contains("oauth:crm"), "{what}")
            }
            other => panic!("{:?}", other.map(|_| "taken")),
        }
        let other_name = two.session_lock("oauth:shop", short, &cancel).await;
        assert!(other_name.is_ok(), "another name is free");
        drop(held);
        let taken = two
            .session_lock("oauth:crm", Duration::from_secs(10), &cancel)
            .await;
        assert!(taken.is_ok(), "free once the guard is dropped");
        cancel.cancel();
        let cancelled = one
            .session_lock("oauth:crm", Duration::from_secs(10), &cancel)
            .await;
        assert!(matches!(cancelled, Err(LockError::CancelledOn { .. })));
    }
}
