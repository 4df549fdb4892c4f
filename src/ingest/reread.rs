//! Reading one deal again from its source: what the follow-up worker asks before a
//! marketing email, so consent withdrawn in a CRM since the last read is seen.
//!
//! Invariant: what is read is stored as a poll would store it (one upsert, cause
//! `poll`), and a record the source no longer has marks the deal deleted, never
//! removes it.

use super::{ConnectionRuntime, Connections, SyncDeps, SyncError};
use crate::domain::ChangeCause;
use chrono::Utc;
use tokio_util::sync::CancellationToken;

/// Reads one deal again from its source and stores it (a poll's upsert), or marks it
/// deleted when the source says it is gone. `Ok(false)`: the connector cannot read one
/// record (webhook-only sources).
pub async fn reread(
    runtime: &ConnectionRuntime,
    deps: &SyncDeps,
    external_id: &str,
    shutdown: &CancellationToken,
) -> Result<bool, SyncError> {
    if !runtime.connector.reads_one() {
        return Ok(false);
    }
    let cx = runtime.context(deps, shutdown);
    match runtime.connector.fetch_one(&cx, external_id).await? {
        Some(deal) => {
            let upserts = runtime.upserts(vec![deal], ChangeCause::Poll);
            deps.store.upsert_deals(upserts).await?;
        }
        None => {
            deps.store
                .mark_deal_deleted(runtime.name(), external_id, Utc::now())
                .await?;
        }
    }
    Ok(true)
}

/// The follow-up worker's [`crate::followup::SourceReader`]: rereads through the
/// connections in force.
pub struct Rereader {
    pub connections: Connections,
    pub deps: SyncDeps,
}

#[async_trait::async_trait]
impl crate::followup::SourceReader for Rereader {
    async fn reread(
        &self,
        connection: &str,
        external_id: &str,
        shutdown: &CancellationToken,
    ) -> Result<bool, String> {
        // A connection no longer configured has no source to ask: the stored deal stands.
        let Some(runtime) = self.connections.get(connection) else {
            return Ok(false);
        };
        reread(&runtime, &self.deps, external_id, shutdown)
            .await
            .map_err(|error| error.to_string())
    }
}
