//! Duties one replica at a time performs when several dealsync processes share a
//! PostgreSQL store: each connection's polling (lease `poll:NAME`) and the leader
//! duties (lease `leader:DUTY`: the cart sweeper; enrollment and digest assembly in the
//! follow-up worker). Webhook intake and the work queues (inbox, outbox, digests) need
//! no lease: every replica takes its share through `FOR UPDATE SKIP LOCKED` claims.
//!
//! On SQLite a duty simply runs: the daemon's lock file makes this process the only one.
//!
//! Invariants:
//! - A duty runs only while its lease is held: it gets the lease's `lost` token, which
//!   the keeper cancels before the server can have expired the lease
//!   (`postgres::leases::LeaseKeeper`), so two replicas never run it at once.
//! - A replica that dies stops renewing; another takes the lease within
//!   `storage.failover_after` plus a third of it, and the duty starts again from what
//!   is committed (a connection from its stored cursor).
//! - `/readyz` lists the leases held (`Readiness::lease`), set when a duty starts and
//!   cleared when it ends.

use crate::health::Readiness;
use crate::store::Store;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// The lease of connection `name`'s polling.
pub fn poll_lease(connection: &str) -> String {
    crate::store::postgres::leases::poll_lease(connection)
}

/// The lease of leader duty `duty`.
pub fn leader_lease(duty: &str) -> String {
    crate::store::postgres::leases::leader_lease(duty)
}

/// Where the daemon's duties take their leases.
#[derive(Clone)]
pub struct Duties {
    pub store: Store,
    pub readiness: Arc<Readiness>,
    /// `dealsync_leases_held`.
    pub metrics: Arc<crate::telemetry::Metrics>,
    /// `storage.failover_after`: the leases' time to live.
    pub ttl: Duration,
}

impl Duties {
    /// Runs `duty` whenever this replica holds lease `name`, until `shutdown`: waits
    /// for the lease, runs the duty with a token cancelled when the lease is lost or on
    /// shutdown, and waits again after a loss. A duty that returns by itself (a
    /// connection that does not poll) releases the lease and is not run again. When the
    /// lease is lost, the duty's `/readyz` mark (`worker`) is cleared: a replica that no
    /// longer holds a duty is not degraded by it. On SQLite, runs `duty(shutdown)` once.
    pub async fn run_while_held<F, Fut>(
        &self,
        name: String,
        worker: &str,
        shutdown: CancellationToken,
        duty: F,
    ) where
        F: FnMut(CancellationToken) -> Fut,
        Fut: Future<Output = ()>,
    {
        let mut duty = duty;
        let keeping = shutdown.child_token();
        let Some(keeper) = self
            .store
            .lease_keeper(name.clone(), self.ttl, keeping.clone())
        else {
            duty(shutdown).await;
            return;
        };
        let mut held = keeper.watch();
        while let Some(lease) = next_held(&mut held, &shutdown).await {
            tracing::info!(lease = %name, token = lease.lease.token, "lease held: running its duty");
            self.mark(&name, Some(lease.lease.token));
            duty(lease.lost.clone()).await;
            self.mark(&name, None);
            if shutdown.is_cancelled() || !lease.lost.is_cancelled() {
                break;
            }
            self.readiness.degraded(worker, None);
            tracing::warn!(lease = %name, "lease lost: its duty stopped; another replica may hold it now");
        }
        // Releases the lease (when held) so another replica need not wait for expiry.
        keeping.cancel();
        keeper.join().await;
    }

    /// Shows whether this replica holds lease `name` (its fencing token) in `/readyz`
    /// and `/metrics`.
    /// Its writes carry the token from now on (`Store::set_fence`).
    fn mark(&self, name: &str, token: Option<i64>) {
        self.store.set_fence(name, token);
        self.readiness.lease(name, token);
        self.metrics
            .leases_held
            .get_or_create(&crate::telemetry::LeaseLabels {
                lease: name.to_owned(),
            })
            .set(i64::from(token.is_some()));
    }

    /// Whether this replica holds leader duty `duty`, kept for as long as `shutdown`
    /// is not cancelled: always on SQLite. For workers that do their leader part only
    /// while leading and the rest always (the follow-up worker).
    /// The keeper runs on `tasks`, so that a shutdown waits for its release.
    pub fn leadership(
        &self,
        duty: &str,
        tasks: &tokio_util::task::TaskTracker,
        shutdown: CancellationToken,
    ) -> Leadership {
        if self.store.replica().is_none() {
            return Leadership::always();
        }
        let (sender, receiver) = watch::channel(false);
        let sender = Arc::new(sender);
        let duties = self.clone();
        let name = leader_lease(duty);
        // No worker's mark to clear: the follow-up worker runs on every replica.
        let worker = name.clone();
        tasks.spawn(async move {
            duties
                .run_while_held(name, &worker, shutdown, |lost: CancellationToken| {
                    let sender = sender.clone();
                    async move {
                        sender.send_replace(true);
                        lost.cancelled().await;
                        sender.send_replace(false);
                    }
                })
                .await;
        });
        Leadership {
            watch: Some(receiver),
        }
    }
}

/// Whether this replica leads a duty now, and a wait for that to change.
#[derive(Debug, Clone)]
pub struct Leadership {
    /// `None`: always leading (SQLite, tests, benches).
    watch: Option<watch::Receiver<bool>>,
}

impl Leadership {
    /// Leading for good: the one process on a SQLite store.
    pub fn always() -> Leadership {
        Leadership { watch: None }
    }

    pub fn leading(&self) -> bool {
        self.watch.as_ref().is_none_or(|watch| *watch.borrow())
    }

    /// Returns when leadership was taken or lost; never when it cannot change (always
    /// leading, or the keeper ended with the shutdown).
    pub async fn changed(&mut self) {
        let changed = match &mut self.watch {
            Some(watch) => watch.changed().await.is_ok(),
            None => false,
        };
        if !changed {
            std::future::pending::<()>().await;
        }
    }
}

/// Waits until the keeper shows the lease held; `None` on shutdown or when the
/// keeper ended.
async fn next_held(
    held: &mut watch::Receiver<Option<crate::store::postgres::leases::HeldLease>>,
    shutdown: &CancellationToken,
) -> Option<crate::store::postgres::leases::HeldLease> {
    loop {
        if let Some(lease) = held.borrow_and_update().clone()
            && !lease.lost.is_cancelled()
        {
            return Some(lease);
        }
        tokio::select! {
            _ = shutdown.cancelled() => return None,
            changed = held.changed() => changed.ok()?,
        }
    }
}
