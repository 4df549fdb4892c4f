//! The connections in force: the runtime of every enabled connection, shared by the
//! HTTP handlers and the workers, and swapped whole on reload.
//!
//! Invariant: a reader gets one consistent list (an `Arc` of it) and keeps it for its
//! step; a reload never changes a list someone holds.

use super::ConnectionRuntime;
use std::sync::{Arc, RwLock};

/// A shared handle to the connections in force; clones see the same list.
#[derive(Clone)]
pub struct Connections {
    inner: Arc<RwLock<Arc<Vec<Arc<ConnectionRuntime>>>>>,
}

impl Connections {
    pub fn new(runtimes: Vec<Arc<ConnectionRuntime>>) -> Self {
        Connections {
            inner: Arc::new(RwLock::new(Arc::new(runtimes))),
        }
    }

    /// The runtimes of the enabled connections.
    pub fn current(&self) -> Arc<Vec<Arc<ConnectionRuntime>>> {
        self.inner
            .read()
            .map(|c| c.clone())
            .expect("connections lock is never poisoned")
    }

    /// The runtime of connection `name`, when it is in force.
    pub fn get(&self, name: &str) -> Option<Arc<ConnectionRuntime>> {
        self.current().iter().find(|c| c.name() == name).cloned()
    }

    /// Puts `runtimes` in force (a reload).
    pub fn replace(&self, runtimes: Vec<Arc<ConnectionRuntime>>) {
        *self
            .inner
            .write()
            .expect("connections lock is never poisoned") = Arc::new(runtimes);
    }
}
