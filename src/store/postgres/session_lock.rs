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

/// A held session lock; dropping it closes its connection, which releases it.
pub struct SessionLock {
    // Never read: its connection holds the lock.
    _client: deadpool_postgres::ClientWrapper,
}

impl Database {
    /// Takes the lock `name` (any text), waiting until `wait` has passed or `cancel`
    /// fires. A process waiting shows in `pg_locks` as an advisory lock not granted.
    pub async fn session_lock(
        &self,
        name: &str,
        wait: Duration,
        cancel: &CancellationToken,
    ) -> Result<SessionLock, LockError> {
        let what = format!("the lock {name} in PostgreSQL {}", self.target());
        let failed = |error: &(dyn std::error::Error + 'static)| LockError::Failed {
            what: what.clone(),
            reason: crate::telemetry::error_chain(error),
        };
        let client = self.client().await.map_err(|error| failed(&error))?;
        // Out of the pool: closed, not recycled, when the guard is dropped (or when a
        // cancelled wait drops it, which ends the wait at the server too).
        let client = deadpool_postgres::Object::take(client);
        client
            .batch_execute(&format!(
                "SET statement_timeout = 0; SET lock_timeout = {}",
                wait.as_millis().clamp(1, i32::MAX as u128)
            ))
            .await
            .map_err(|error| failed(&error))?;
        let params: [&(dyn tokio_postgres::types::ToSql + Sync); 2] = [&SESSION_LOCK_CLASS, &name];
        let outcome = tokio::select! {
            _ = cancel.cancelled() => None,
            taken = client.execute("SELECT pg_advisory_lock($1, hashtext($2))", &params) => {
                Some(taken)
            }
        };
        match outcome {
            None => Err(LockError::CancelledOn { what }),
            Some(Ok(_)) => Ok(SessionLock { _client: client }),
            Some(Err(error))
                if error.code() == Some(&tokio_postgres::error::SqlState::LOCK_NOT_AVAILABLE) =>
            {
                Err(LockError::TimedOutOn { what, waited: wait })
            }
            Some(Err(error)) => Err(failed(&error)),
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
