//! The stage-history change feed: what the follow-up worker enrolls from.
//!
//! Invariants:
//! - History rows are appended, never changed or deleted, in the transaction of their
//!   deal's stage change. Reading after the last id seen, oldest first, misses no
//!   committed entry and yields none twice:
//!   - on SQLite, the one writer appends them, so their ids grow in commit order;
//!   - on PostgreSQL, where replicas write at once and ids are drawn before commit,
//!     the feed hands out only ids no transaction in flight can still commit below
//!     (`postgres::stage_feed`, which says how).
//! - Reads only: the feed writes nothing, and its position is the reader's to keep.

use super::deals::Columns;
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

/// The columns [`stage_entry_from`] reads, in its order.
pub(super) const STAGE_ENTRY_COLUMNS: &str = "id, deal_id, to_pipeline, to_stage";

/// Reads a `stage_history` row of either backend ([`STAGE_ENTRY_COLUMNS`]).
pub(super) fn stage_entry_from<R: Columns>(row: &R) -> Result<StageEntry, R::Error> {
    Ok(StageEntry {
        history_id: row.int(0)?,
        deal_id: row.int(1)?,
        to: StageRef {
            pipeline: row.opt_text(2)?.map(PipelineKey::new),
            stage: StageKey::new(row.text(3)?),
        },
    })
}

impl Store {
    /// The newest stage-history id: where the enrollment change feed starts.
    pub async fn last_history_id(&self) -> Result<i64> {
        if let Some(database) = self.postgres() {
            return database
                .last_history_id()
                .await
                .map_err(|error| database.named(error));
        }
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
        if let Some(database) = self.postgres() {
            return database
                .stage_entries_after(after_id, limit)
                .await
                .map_err(|error| database.named(error));
        }
        self.read(move |db| {
            let mut statement = db.prepare_cached(&format!(
                "SELECT {STAGE_ENTRY_COLUMNS} FROM stage_history
                 WHERE id > ?1 ORDER BY id LIMIT ?2"
            ))?;
            let rows = statement.query_map(params![after_id, limit], |r| stage_entry_from(r))?;
            Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use crate::domain::{PipelineKey, StageKey, StageRef};
    use crate::store::both_backends::on_both;
    use crate::store::deals::tests::{stored_deal, upsert};
    use chrono::{Duration, Utc};

    /// The feed starts at the newest entry and hands out what comes after it, oldest
    /// first, a page at a time, each entry once; the stage entered is the canonical one.
    #[tokio::test]
    async fn the_feed_hands_out_entries_after_the_last_seen_oldest_first_in_pages() {
        on_both(
            "the_feed_hands_out_entries_after_the_last_seen_oldest_first_in_pages",
            async |store| {
                assert_eq!(store.last_history_id().await.unwrap(), 0);
                assert!(store.stage_entries_after(0, 10).await.unwrap().is_empty());
                let t0 = Utc::now() - Duration::hours(1);
                store
                    .upsert_deals(vec![upsert("1", "proposal", t0)])
                    .await
                    .unwrap();
                let start = store.last_history_id().await.unwrap();
                assert!(start > 0);
                assert!(
                    store
                        .stage_entries_after(start, 10)
                        .await
                        .unwrap()
                        .is_empty()
                );

                store
                    .upsert_deals(vec![
                        upsert("2", "mystery", t0),
                        upsert("1", "negotiation", t0 + Duration::minutes(1)),
                    ])
                    .await
                    .unwrap();
                let (one, two) = (
                    stored_deal(&store, "crm", "1").await.id,
                    stored_deal(&store, "crm", "2").await.id,
                );
                let all = store.stage_entries_after(start, 10).await.unwrap();
                let seen: Vec<(i64, StageRef)> =
                    all.iter().map(|e| (e.deal_id, e.to.clone())).collect();
                assert_eq!(
                    seen,
                    [
                        (two, StageRef::unmapped()),
                        (
                            one,
                            StageRef {
                                pipeline: Some(PipelineKey::new("sales")),
                                stage: StageKey::new("negotiation"),
                            }
                        ),
                    ]
                );
                assert!(all[0].history_id > start && all[1].history_id > all[0].history_id);
                assert_eq!(store.last_history_id().await.unwrap(), all[1].history_id);

                let first_page = store.stage_entries_after(start, 1).await.unwrap();
                assert_eq!(first_page, all[..1]);
                let rest = store
                    .stage_entries_after(first_page[0].history_id, 10)
                    .await
                    .unwrap();
                assert_eq!(rest, all[1..]);
            },
        )
        .await;
    }
}
