//! The stage-history change feed: what the follow-up worker enrolls from.
//!
//! Invariants:
//! - History rows are appended, never changed or deleted, by the one writer, in the
//!   transaction of their deal's stage change; their ids grow in commit order, so
//!   reading after the last id seen, oldest first, misses no committed entry and
//!   yields none twice.
//! - Reads only: the feed writes nothing, and its position is the reader's to keep.

use super::{Result, Store};
use crate::domain::{PipelineKey, StageKey, StageRef};
use rusqlite::params;

/// A deal's entry into a stage, from the history's change feed.
#[derive(Debug, Clone, PartialEq)]
pub struct StageEntry {
    pub history_id: i64,
    pub deal_id: i64,
    pub to: StageRef,
}

impl Store {
    /// The newest stage-history id: where the enrollment change feed starts.
    pub async fn last_history_id(&self) -> Result<i64> {
        self.read(|db| {
            Ok(
                db.query_row("SELECT coalesce(max(id), 0) FROM stage_history", [], |r| {
                    r.get(0)
                })?,
            )
        })
        .await
    }

    /// Stage entries recorded after `after_id`, oldest first: the enrollment change feed.
    pub async fn stage_entries_after(&self, after_id: i64, limit: u32) -> Result<Vec<StageEntry>> {
        self.read(move |db| {
            let mut statement = db.prepare_cached(
                "SELECT id, deal_id, to_pipeline, to_stage FROM stage_history
                 WHERE id > ?1 ORDER BY id LIMIT ?2",
            )?;
            let rows = statement.query_map(params![after_id, limit], |r| {
                Ok(StageEntry {
                    history_id: r.get(0)?,
                    deal_id: r.get(1)?,
                    to: StageRef {
                        pipeline: r.get::<_, Option<String>>(2)?.map(PipelineKey::new),
                        stage: StageKey::new(r.get::<_, String>(3)?),
                    },
                })
            })?;
            Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
        })
        .await
    }
}
