//! What a connection's stage map did to its stored deals: the live deals per native and
//! canonical stage, the map last applied, moving deals after the map changed, and the
//! native stages left unmapped.
//!
//! Invariants:
//! - A remap moves only the deals where the previous mapping put them (a deal moved by a
//!   follow-up or an order stays), each through `history::move_stage` with cause
//!   `mapping`, dated when the deal entered its native stage.
//! - The moves and the applied map (kept beside the connection's cursors) commit in one
//!   transaction.

use super::history::move_stage;
use crate::domain::{ChangeCause, DealStatus, PipelineKey, StageKey, StageRef};
use crate::store::sync::save_cursor;
use crate::store::{Result, Store, from_ms, to_json, to_ms};
use chrono::Utc;
use rusqlite::params;
use serde::Serialize;

/// Where the applied stage map of a connection is kept: beside its cursors, one JSON
/// value per connection (`sync_cursors`, stream `stage_map`).
const APPLIED_MAP_STREAM: &str = "stage_map";

/// Live deals of one connection in one native stage and one canonical stage.
#[derive(Debug, Clone, PartialEq)]
pub struct NativeStageGroup {
    pub native_pipeline: String,
    pub native_stage: String,
    pub stage: StageRef,
    pub deals: u64,
}

/// What a connection's stage map made of one native stage when it was last applied.
#[derive(Debug, Clone, PartialEq, Serialize, serde::Deserialize)]
pub struct AppliedMapping {
    pub native_pipeline: String,
    pub native_stage: String,
    pub pipeline: Option<String>,
    pub stage: String,
}

/// Deals of a native stage sitting in `from` that a changed mapping moves to `to`.
#[derive(Debug, Clone, PartialEq)]
pub struct StageMove {
    pub native_pipeline: String,
    pub native_stage: String,
    pub from: StageRef,
    pub to: StageRef,
    pub status: DealStatus,
    /// How many deals sit there (for `dealsync check`); the move takes whatever is there.
    pub deals: u64,
}

/// A native stage that has deals but no mapping.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct UnmappedStage {
    pub connection: String,
    pub native_pipeline: String,
    pub native_stage: String,
    pub deals: u64,
}

impl Store {
    /// The live deals of `connection` grouped by native stage and the canonical stage
    /// each group sits in now.
    pub async fn native_stage_groups(&self, connection: &str) -> Result<Vec<NativeStageGroup>> {
        if let Some(database) = self.postgres() {
            return database
                .native_stage_groups(connection)
                .await
                .map_err(|error| database.named(error));
        }
        let connection = connection.to_owned();
        self.read(move |db| {
            let mut statement = db.prepare_cached(
                "SELECT native_pipeline, native_stage, pipeline, stage, count(*) FROM deals
                 WHERE connection = ?1 AND deleted_at IS NULL
                 GROUP BY native_pipeline, native_stage, pipeline, stage
                 ORDER BY native_pipeline, native_stage, pipeline, stage",
            )?;
            let rows = statement.query_map([&connection], |row| {
                Ok(NativeStageGroup {
                    native_pipeline: row.get(0)?,
                    native_stage: row.get(1)?,
                    stage: StageRef {
                        pipeline: row.get::<_, Option<String>>(2)?.map(PipelineKey::new),
                        stage: StageKey::new(row.get::<_, String>(3)?),
                    },
                    deals: row.get::<_, i64>(4)? as u64,
                })
            })?;
            Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
        })
        .await
    }

    /// The stage map last applied to `connection`'s stored deals (see
    /// [`Store::remap_deals`]); `None` before the first.
    pub async fn applied_stage_map(&self, connection: &str) -> Result<Option<Vec<AppliedMapping>>> {
        let Some(value) = self.cursor(connection, APPLIED_MAP_STREAM).await? else {
            return Ok(None);
        };
        // An unreadable record counts as none: only unmapped deals move then.
        Ok(serde_json::from_value(value).ok())
    }

    /// Moves `connection`'s deals for each of `moves`: the live deals in its native
    /// stage that sit in `from` (where the previous mapping put them) go to `to`, each
    /// with a history row of cause `mapping` at the time it entered the native stage,
    /// which is when it entered the stage the mapping now names. Records `applied` as
    /// the map now in force. One transaction; returns how many moved per move.
    ///
    /// Deals of that native stage elsewhere (moved by a follow-up, an order, or held by
    /// the source's won or lost status) are not the mapping's doing and stay.
    pub async fn remap_deals(
        &self,
        connection: &str,
        moves: Vec<StageMove>,
        applied: Vec<AppliedMapping>,
    ) -> Result<Vec<u64>> {
        if let Some(database) = self.postgres() {
            let counts = database
                .remap_deals(connection, APPLIED_MAP_STREAM, moves, applied)
                .await
                .map_err(|error| database.named(error))?;
            // One history row per deal moved.
            self.note_stage_changes(counts.iter().sum());
            return Ok(counts);
        }
        let connection = connection.to_owned();
        self.write(move |tx| {
            let mut counts = Vec::with_capacity(moves.len());
            for change in &moves {
                let deals: Vec<(i64, i64)> = tx
                    .prepare_cached(
                        "SELECT id, stage_entered_at FROM deals
                         WHERE connection = ?1 AND native_pipeline = ?2 AND native_stage = ?3
                           AND pipeline IS ?4 AND stage = ?5 AND deleted_at IS NULL",
                    )?
                    .query_map(
                        params![
                            connection,
                            change.native_pipeline,
                            change.native_stage,
                            change.from.pipeline.as_ref().map(|p| p.as_str()),
                            change.from.stage.as_str()
                        ],
                        |row| Ok((row.get(0)?, row.get(1)?)),
                    )?
                    .collect::<rusqlite::Result<_>>()?;
                let mut moved = 0;
                for (id, entered_at) in deals {
                    if move_stage(
                        tx,
                        id,
                        &change.to,
                        change.status,
                        from_ms(entered_at),
                        ChangeCause::Mapping,
                    )? {
                        moved += 1;
                    }
                }
                counts.push(moved);
            }
            save_cursor(
                tx,
                &connection,
                APPLIED_MAP_STREAM,
                &to_json(&applied)?,
                to_ms(Utc::now()),
            )?;
            Ok(counts)
        })
        .await
    }

    /// The native stages of deals kept as unmapped, with how many: of one connection,
    /// or of all with `None`.
    pub async fn unmapped_stages(&self, connection: Option<&str>) -> Result<Vec<UnmappedStage>> {
        if let Some(database) = self.postgres() {
            return database
                .unmapped_stages(connection)
                .await
                .map_err(|error| database.named(error));
        }
        let connection = connection.map(str::to_owned);
        self.read(move |db| {
            let mut statement = db.prepare_cached(
                "SELECT connection, native_pipeline, native_stage, count(*) FROM deals
                 WHERE stage = 'unmapped' AND deleted_at IS NULL
                   AND (?1 IS NULL OR connection = ?1)
                 GROUP BY connection, native_pipeline, native_stage
                 ORDER BY connection, native_pipeline, native_stage",
            )?;
            let rows = statement.query_map([&connection], |row| {
                Ok(UnmappedStage {
                    connection: row.get(0)?,
                    native_pipeline: row.get(1)?,
                    native_stage: row.get(2)?,
                    deals: row.get::<_, i64>(3)? as u64,
                })
            })?;
            Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::UNMAPPED;
    use crate::store::both_backends::on_both;
    use crate::store::deals::tests::{sales, stage_and_status, stored_deal, upsert};
    use chrono::Duration;

    #[tokio::test]
    async fn a_changed_stage_map_moves_the_live_deals_where_the_old_mapping_put_them_and_records_the_map()
     {
        on_both("a_changed_stage_map_moves_the_live_deals_where_the_old_mapping_put_them_and_records_the_map", async |store| {
            let t0 = Utc::now() - Duration::hours(3);
            let mut deleted = upsert("3", "mystery", t0);
            deleted.source.deleted = true;
            store
                .upsert_deals(vec![
                    upsert("1", "mystery", t0),
                    upsert("2", "mystery", t0 + Duration::minutes(1)),
                    deleted,
                    upsert("4", "proposal", t0),
                ])
                .await
                .unwrap();
            assert_eq!(store.applied_stage_map("crm").await.unwrap(), None);
            let applied = vec![AppliedMapping {
                native_pipeline: "default".into(),
                native_stage: "mystery".into(),
                pipeline: Some("sales".into()),
                stage: "negotiation".into(),
            }];
            let moves = vec![
                StageMove {
                    native_pipeline: "default".into(),
                    native_stage: "mystery".into(),
                    from: StageRef::unmapped(),
                    to: sales("negotiation"),
                    status: DealStatus::Open,
                    deals: 2,
                },
                // Deal 4 is not where this move expects it: it stays.
                StageMove {
                    native_pipeline: "default".into(),
                    native_stage: "proposal".into(),
                    from: sales("negotiation"),
                    to: sales("won"),
                    status: DealStatus::Won,
                    deals: 0,
                },
            ];
            let counts = store
                .remap_deals("crm", moves, applied.clone())
                .await
                .unwrap();
            assert_eq!(counts, [2, 0]);
            for (id, entered) in [("1", t0), ("2", t0 + Duration::minutes(1))] {
                let deal = stored_deal(&store, "crm", id).await;
                assert_eq!(deal.stage.as_str(), "negotiation", "deal {id}");
                let last = store.history(deal.id).await.unwrap().pop().unwrap();
                assert_eq!(last.cause, ChangeCause::Mapping);
                assert_eq!(
                    last.at.timestamp_millis(),
                    entered.timestamp_millis(),
                    "dated when deal {id} entered its native stage"
                );
            }
            assert_eq!(stage_and_status(&store, "crm", "3").await.0, UNMAPPED);
            assert_eq!(stage_and_status(&store, "crm", "4").await.0, "proposal");
            assert_eq!(store.applied_stage_map("crm").await.unwrap(), Some(applied));
        })
        .await;
    }
}
