//! Ingest: where source records become deals, whichever way they arrive.
//!
//! A connection's [`ConnectionRuntime`] owns its connector and its stage map and turns
//! source records into deal upserts. The pull scheduler (`sync`), the webhook inbox
//! worker (`webhooks::worker`), the cart sweeper (`carts`) and the CLI (`dealsync
//! sync`, `check`) all go through it, so a record maps the same way whether it was
//! pulled, pushed or read again.
//!
//! - `runtime.rs`: the runtime, its stage map, `map` and `upserts`.
//! - `records.rs`: a pulled page's records mapped, the unstorable quarantined.
//! - `webhook.rs`: a webhook delivery planned into deal changes.
//! - `connections.rs`: the runtimes in force, swapped whole on reload.
//! - `remap.rs`: moving stored deals when the stage map changes.
//! - `reread.rs`: reading one deal again before a marketing email.
//!
//! Invariant: nothing here schedules anything; the workers decide when, this module
//! decides what a record becomes.

mod connections;
mod records;
mod remap;
mod reread;
mod runtime;
mod webhook;

pub use connections::Connections;
pub use records::Pulled;
pub use remap::{RemapPlan, plan_remap, remap};
pub use reread::{Rereader, reread};
pub use runtime::ConnectionRuntime;
pub use webhook::PlanError;

use crate::connectors::ConnectorError;
use crate::store::{Store, StoreError};
use crate::telemetry::Metrics;
use std::sync::Arc;

/// Everything a connection's runtime needs besides the connection: where records are
/// stored, where vendor metrics go, and where the connection reports what it needs
/// from an operator.
#[derive(Clone)]
pub struct SyncDeps {
    pub store: Store,
    pub metrics: Arc<Metrics>,
    /// Where a connection reports what it needs from an operator (`/readyz`).
    pub attention: Option<crate::connectors::Attention>,
}

/// Why reading from a connection or storing what it read failed.
#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error(transparent)]
    Connector(#[from] ConnectorError),
    #[error(transparent)]
    Store(#[from] StoreError),
}
