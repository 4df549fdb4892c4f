//! Health: what `/readyz` reports, and the standing of each long-running worker.
//!
//! `Readiness` is shared by the tasks that make it true (migrated, connections started)
//! and read by `/readyz` and the status page. Each worker (the pull schedulers, the
//! webhook inbox worker, the cart sweeper, the follow-up worker) holds a
//! [`WorkerHealth`] handle to it.
//!
//! Invariants:
//! - A degraded worker makes the daemon unready until its next pass works; a
//!   connection's attention entry (re-authorization) never does.
//! - A reload that drops a connection drops its marks with it.

use serde::Serialize;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use tracing::{info, warn};

/// The `/readyz` attention entry of email delivery; a name no connection can have
/// (connection names hold no spaces).
pub const EMAIL_ATTENTION: &str = "email delivery";

/// What `/readyz` reports.
#[derive(Debug, Clone, Serialize)]
pub struct ReadinessReport {
    pub ready: bool,
    pub migrated: bool,
    /// connection → "starting" | "started"
    pub connections: BTreeMap<String, String>,
    /// connection (or `email delivery`) → what needs attention (it does not make the
    /// daemon unready).
    pub attention: BTreeMap<String, String>,
    /// worker → why it is degraded: its last pass failed and it is backing off before
    /// the next (`followups`, `webhooks`, `cart_sweeper`, `connection:NAME`). Makes the
    /// daemon unready until the worker's next pass works.
    pub degraded: BTreeMap<String, String>,
    /// On PostgreSQL: this process among the replicas (what its leases name).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub replica: Option<String>,
    /// On PostgreSQL: the leases this replica holds (`poll:CONNECTION`,
    /// `leader:DUTY`) → their fencing token. A connection missing here is polled by
    /// another replica.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub leases: Option<BTreeMap<String, i64>>,
}

/// Readiness, shared by the tasks that make it true.
#[derive(Default)]
pub struct Readiness {
    // A std mutex: tiny critical sections, never held across `.await`.
    inner: Mutex<ReadinessInner>,
}

#[derive(Default)]
struct ReadinessInner {
    migrated: bool,
    connections: BTreeMap<String, bool>,
    attention: BTreeMap<String, String>,
    degraded: BTreeMap<String, String>,
    replica: Option<String>,
    leases: BTreeMap<String, i64>,
}

impl Readiness {
    /// Names this process among replicas: `/readyz` then lists its leases.
    pub fn set_replica(&self, replica: &str) {
        if let Ok(mut inner) = self.inner.lock() {
            inner.replica = Some(replica.to_owned());
        }
    }

    /// Records that this replica holds lease `name` with fencing token `token`, or
    /// (with `None`) no longer does.
    pub fn lease(&self, name: &str, token: Option<i64>) {
        if let Ok(mut inner) = self.inner.lock() {
            match token {
                Some(token) => inner.leases.insert(name.to_owned(), token),
                None => inner.leases.remove(name),
            };
        }
    }

    pub fn set_migrated(&self) {
        if let Ok(mut inner) = self.inner.lock() {
            inner.migrated = true;
        }
    }

    /// Resets the expected connections (at start and on reload).
    pub fn expect(&self, names: impl IntoIterator<Item = String>) {
        if let Ok(mut inner) = self.inner.lock() {
            inner.connections = names.into_iter().map(|name| (name, false)).collect();
            let keep: Vec<String> = inner.connections.keys().cloned().collect();
            inner
                .attention
                .retain(|name, _| keep.contains(name) || name == EMAIL_ATTENTION);
            inner.degraded.retain(|worker, _| {
                worker
                    .strip_prefix(CONNECTION_WORKER)
                    .is_none_or(|name| keep.iter().any(|kept| kept == name))
            });
        }
    }

    pub fn started(&self, name: &str) {
        if let Ok(mut inner) = self.inner.lock() {
            inner.connections.insert(name.to_owned(), true);
        }
    }

    /// Marks (or clears, with `None`) something a connection needs from an operator.
    pub fn attention(&self, name: &str, what: Option<String>) {
        if let Ok(mut inner) = self.inner.lock() {
            match what {
                Some(what) => inner.attention.insert(name.to_owned(), what),
                None => inner.attention.remove(name),
            };
        }
    }

    /// Marks a worker as degraded with the reason, or (with `None`) as working again.
    pub fn degraded(&self, worker: &str, reason: Option<String>) {
        if let Ok(mut inner) = self.inner.lock() {
            match reason {
                Some(reason) => inner.degraded.insert(worker.to_owned(), reason),
                None => inner.degraded.remove(worker),
            };
        }
    }

    /// The health handle of the worker `name`.
    pub fn worker(self: &Arc<Self>, name: impl Into<String>) -> WorkerHealth {
        WorkerHealth {
            readiness: self.clone(),
            name: name.into(),
            failures: 0,
            backoff: crate::retry::STORE_ERRORS,
        }
    }

    /// The health handle of connection `name`'s scheduler.
    pub fn connection_worker(self: &Arc<Self>, name: &str) -> WorkerHealth {
        self.worker(connection_worker_name(name))
    }

    pub fn report(&self) -> ReadinessReport {
        let Ok(inner) = self.inner.lock() else {
            return ReadinessReport {
                ready: false,
                migrated: false,
                connections: BTreeMap::new(),
                attention: BTreeMap::new(),
                degraded: BTreeMap::new(),
                replica: None,
                leases: None,
            };
        };
        ReadinessReport {
            ready: inner.migrated
                && inner.connections.values().all(|started| *started)
                && inner.degraded.is_empty(),
            migrated: inner.migrated,
            connections: inner
                .connections
                .iter()
                .map(|(name, started)| {
                    let state = if *started { "started" } else { "starting" };
                    (name.clone(), state.to_owned())
                })
                .collect(),
            attention: inner.attention.clone(),
            degraded: inner.degraded.clone(),
            replica: inner.replica.clone(),
            leases: inner.replica.as_ref().map(|_| inner.leases.clone()),
        }
    }
}

/// The prefix of a connection scheduler's name among the workers.
const CONNECTION_WORKER: &str = "connection:";

/// Connection `name`'s scheduler among the workers (`connection:NAME`).
pub fn connection_worker_name(name: &str) -> String {
    format!("{CONNECTION_WORKER}{name}")
}

/// A long-running worker's standing in `/readyz`, and its backoff after failed passes.
///
/// A pass that fails (the store is busy, an I/O error, a full disk) marks the worker
/// degraded with the error, logs it, and returns how long to wait before the next pass
/// ([`crate::retry::STORE_ERRORS`]: growing with the failures in a row, capped). The
/// next pass that works clears the mark. Workers never end on such an error.
pub struct WorkerHealth {
    readiness: Arc<Readiness>,
    name: String,
    failures: u32,
    backoff: crate::retry::Backoff,
}

impl WorkerHealth {
    /// Records a failed pass; returns the pause before the next one.
    pub fn failed(&mut self, error: &dyn std::fmt::Display) -> std::time::Duration {
        self.failures = self.failures.saturating_add(1);
        let delay = self.backoff.delay(self.failures);
        warn!(
            worker = %self.name,
            %error,
            failures = self.failures,
            retry_in_ms = delay.as_millis() as u64,
            "worker pass failed; backing off, then trying again"
        );
        self.degraded(format!(
            "{error} ({} failure(s) in a row; next try in {:.1} s)",
            self.failures,
            delay.as_secs_f64()
        ));
        delay
    }

    /// Records a pass that worked: clears the degraded mark.
    pub fn succeeded(&mut self) {
        if self.failures > 0 {
            info!(worker = %self.name, failures = self.failures, "worker recovered");
            self.failures = 0;
            self.recovered();
        }
    }

    /// Marks the worker degraded without counting a failure (a scheduler that keeps
    /// its own backoff).
    pub fn degraded(&self, reason: String) {
        self.readiness.degraded(&self.name, Some(reason));
    }

    /// Clears the degraded mark.
    pub fn recovered(&self) {
        self.readiness.degraded(&self.name, None);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_degraded_worker_makes_readyz_unready_until_its_next_good_pass() {
        let readiness = Arc::new(Readiness::default());
        readiness.set_migrated();
        readiness.expect(["crm".to_owned()]);
        readiness.started("crm");
        assert!(readiness.report().ready);

        let mut followups = readiness.worker("followups");
        let pause = followups.failed(&"database error: database is locked");
        assert!(pause <= crate::retry::STORE_ERRORS.max);
        let report = readiness.report();
        assert!(!report.ready);
        assert!(report.degraded["followups"].contains("database is locked"));

        // A scheduler marks itself; a reload that drops its connection drops the mark.
        readiness
            .connection_worker("crm")
            .degraded("sync run failed".into());
        readiness.connection_worker("crm").recovered();
        followups.succeeded();
        assert!(readiness.report().ready);
        readiness
            .connection_worker("crm")
            .degraded("sync run failed".into());
        readiness.expect(["other".to_owned()]);
        readiness.started("other");
        let report = readiness.report();
        assert!(report.ready, "{:?}", report.degraded);
    }
}
