//! The state the HTTP handlers share, built by `app`: the store, the metrics, the
//! readiness, and the config and connections in force.
//!
//! Invariant: the config and the connections are each swapped whole on reload (by
//! `app`); a handler reads each once per request and keeps what it read, so a request
//! never sees half of a reload's config.

use crate::config::Config;
use crate::health::Readiness;
use crate::ingest::{ConnectionRuntime, Connections};
use crate::store::Store;
use crate::telemetry::Metrics;
use std::sync::{Arc, RwLock};

/// What the handlers read; the workers get their parts from `app` too.
pub struct HttpState {
    pub store: Store,
    pub metrics: Arc<Metrics>,
    pub readiness: Arc<Readiness>,
    /// The connections in force (webhook intake verifies and parses with their
    /// connectors); the same handle the workers read.
    pub connections: Connections,
    config: RwLock<Arc<Config>>,
}

impl HttpState {
    pub fn new(
        store: Store,
        metrics: Arc<Metrics>,
        readiness: Arc<Readiness>,
        config: Config,
        connections: Connections,
    ) -> Self {
        HttpState {
            store,
            metrics,
            readiness,
            connections,
            config: RwLock::new(Arc::new(config)),
        }
    }

    /// The config in force.
    pub fn config(&self) -> Arc<Config> {
        self.config
            .read()
            .map(|c| c.clone())
            .expect("config lock is never poisoned")
    }

    /// Puts a reloaded config in force.
    pub fn set_config(&self, config: Config) {
        *self.config.write().expect("config lock is never poisoned") = Arc::new(config);
    }

    /// The runtime of connection `name`, when it is in force.
    pub fn connection(&self, name: &str) -> Option<Arc<ConnectionRuntime>> {
        self.connections.get(name)
    }
}
