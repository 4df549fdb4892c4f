//! Stage history: every `stage_history` row is written and read here.
//!
//! Invariants:
//! - One row per canonical stage change, in the transaction of the deal's update: a
//!   batch's rows in record order through multi-row INSERTs (`insert_history`), a
//!   move on dealsync's own account with its deal update (`move_stage`).
//! - A move to the stage the deal is already in writes nothing.
//! - A deal's history reads back oldest first, each row with the cause it was written
//!   with.

use super::DealUpsert;
use super::query::Columns;
use crate::domain::{ChangeCause, DealStatus, PipelineKey, StageChange, StageKey, StageRef};
use crate::store::{Result, Store, from_ms, to_ms};
use chrono::{DateTime, Utc};
use rusqlite::{Row, Transaction, params};

/// A stage-history row waiting for the batch's multi-row insert; its `to` side is
/// `upserts[upsert]`.
pub(super) struct PendingHistory {
    pub(super) upsert: usize,
    pub(super) deal_id: i64,
    pub(super) at: i64,
    pub(super) from_pipeline: Option<String>,
    pub(super) from_stage: Option<String>,
    pub(super) native_from: Option<String>,
}

/// History rows per multi-row INSERT: 9 parameters each, far below SQLite's limit.
const HISTORY_ROWS_PER_INSERT: usize = 32;
const HISTORY_COLUMNS: usize = 9;

fn history_insert_sql(rows: usize) -> String {
    let mut sql = String::from(
        "INSERT INTO stage_history (deal_id, at, from_pipeline, from_stage, to_pipeline, to_stage,
            native_from, native_to, cause) VALUES ",
    );
    for row in 0..rows {
        if row > 0 {
            sql.push_str(", ");
        }
        let first = row * HISTORY_COLUMNS + 1;
        let placeholders: Vec<String> = (first..first + HISTORY_COLUMNS)
            .map(|n| format!("?{n}"))
            .collect();
        sql.push('(');
        sql.push_str(&placeholders.join(", "));
        sql.push(')');
    }
    sql
}

/// Appends the batch's history rows, in order: full chunks through one cached
/// multi-row INSERT (one statement execution per chunk instead of per row), the rest
/// one by one.
pub(super) fn insert_history(
    tx: &Transaction<'_>,
    upserts: &[DealUpsert],
    rows: &[PendingHistory],
) -> Result<()> {
    static CHUNK_SQL: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    let chunks = rows.chunks_exact(HISTORY_ROWS_PER_INSERT);
    let rest = chunks.remainder();
    if rows.len() >= HISTORY_ROWS_PER_INSERT {
        let sql = CHUNK_SQL.get_or_init(|| history_insert_sql(HISTORY_ROWS_PER_INSERT));
        let mut statement = tx.prepare_cached(sql)?;
        for chunk in chunks {
            for (position, row) in chunk.iter().enumerate() {
                bind_history(&mut statement, position * HISTORY_COLUMNS, upserts, row)?;
            }
            statement.raw_execute()?;
        }
    }
    if !rest.is_empty() {
        let mut statement = tx.prepare_cached(&history_insert_sql(1))?;
        for row in rest {
            bind_history(&mut statement, 0, upserts, row)?;
            statement.raw_execute()?;
        }
    }
    Ok(())
}

fn bind_history(
    statement: &mut rusqlite::CachedStatement<'_>,
    offset: usize,
    upserts: &[DealUpsert],
    row: &PendingHistory,
) -> Result<()> {
    let to = &upserts[row.upsert];
    statement.raw_bind_parameter(offset + 1, row.deal_id)?;
    statement.raw_bind_parameter(offset + 2, row.at)?;
    statement.raw_bind_parameter(offset + 3, row.from_pipeline.as_deref())?;
    statement.raw_bind_parameter(offset + 4, row.from_stage.as_deref())?;
    statement.raw_bind_parameter(offset + 5, to.target.pipeline.as_ref().map(|p| p.as_str()))?;
    statement.raw_bind_parameter(offset + 6, to.target.stage.as_str())?;
    statement.raw_bind_parameter(offset + 7, row.native_from.as_deref())?;
    statement.raw_bind_parameter(offset + 8, to.source.native_stage.as_str())?;
    statement.raw_bind_parameter(offset + 9, to.cause.as_str())?;
    Ok(())
}

/// Moves a deal to another canonical stage on dealsync's own account (an abandoned
/// cart, a sent follow-up, a matched order), with its history row, in one transaction.
/// Returns false when the deal was already there.
pub(crate) fn move_stage(
    tx: &Transaction<'_>,
    deal_id: i64,
    to: &StageRef,
    status: DealStatus,
    at: DateTime<Utc>,
    cause: ChangeCause,
) -> Result<bool> {
    let (pipeline, stage, native): (Option<String>, String, String) = tx.query_row(
        "SELECT pipeline, stage, native_stage FROM deals WHERE id = ?1",
        [deal_id],
        |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)),
    )?;
    if pipeline.as_deref() == to.pipeline.as_ref().map(|p| p.as_str()) && stage == to.stage.as_str()
    {
        return Ok(false);
    }
    let at = to_ms(at);
    tx.execute(
        "UPDATE deals SET pipeline = ?2, stage = ?3, status = ?4, stage_entered_at = ?5 WHERE id = ?1",
        params![
            deal_id,
            to.pipeline.as_ref().map(|p| p.as_str()),
            to.stage.as_str(),
            status.as_str(),
            at
        ],
    )?;
    tx.execute(
        "INSERT INTO stage_history (deal_id, at, from_pipeline, from_stage, to_pipeline, to_stage,
            native_from, native_to, cause)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?7, ?8)",
        params![
            deal_id,
            at,
            pipeline,
            stage,
            to.pipeline.as_ref().map(|p| p.as_str()),
            to.stage.as_str(),
            native,
            cause.as_str()
        ],
    )?;
    Ok(true)
}

/// The columns `change_from` reads, in its order.
pub(in crate::store) const HISTORY_COLUMNS_READ: &str =
    "deal_id, at, from_pipeline, from_stage, to_pipeline, to_stage, native_from, native_to, cause";

fn change_from_row(row: &Row<'_>) -> rusqlite::Result<StageChange> {
    change_from(row)
}

/// Reads a `stage_history` row of either backend ([`HISTORY_COLUMNS_READ`]).
pub(in crate::store) fn change_from<R: Columns>(row: &R) -> Result<StageChange, R::Error> {
    let cause = row.text(8)?;
    Ok(StageChange {
        deal_id: row.int(0)?,
        at: from_ms(row.int(1)?),
        from_pipeline: row.opt_text(2)?.map(PipelineKey::new),
        from_stage: row.opt_text(3)?.map(StageKey::new),
        to_pipeline: row.opt_text(4)?.map(PipelineKey::new),
        to_stage: StageKey::new(row.text(5)?),
        native_from: row.opt_text(6)?,
        native_to: row.text(7)?,
        cause: match cause.as_str() {
            "webhook" => ChangeCause::Webhook,
            "followup" => ChangeCause::Followup,
            "mapping" => ChangeCause::Mapping,
            _ => ChangeCause::Poll,
        },
    })
}

impl Store {
    #[cfg(test)]
    /// Moves a deal to a stage on dealsync's own account, with its history row.
    pub async fn move_deal(
        &self,
        deal_id: i64,
        to: StageRef,
        status: DealStatus,
        at: DateTime<Utc>,
        cause: ChangeCause,
    ) -> Result<bool> {
        if let Some(database) = self.postgres() {
            return database
                .move_deal(deal_id, to, status, at, cause)
                .await
                .map_err(|error| database.named(error));
        }
        self.write(move |tx| move_stage(tx, deal_id, &to, status, at, cause))
            .await
    }

    /// A deal's stage history, oldest first.
    pub async fn history(&self, deal_id: i64) -> Result<Vec<StageChange>> {
        if let Some(database) = self.postgres() {
            return database
                .history(deal_id)
                .await
                .map_err(|error| database.named(error));
        }
        self.read(move |db| {
            let mut statement = db.prepare(&format!(
                "SELECT {HISTORY_COLUMNS_READ} FROM stage_history WHERE deal_id = ?1 ORDER BY at, id"
            ))?;
            let rows = statement.query_map([deal_id], change_from_row)?;
            Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::both_backends::on_both;
    use crate::store::deals::tests::stored_deal;
    use crate::store::deals::tests::{sales, upsert};
    use chrono::Duration;

    #[tokio::test]
    async fn a_large_batch_writes_exactly_one_history_row_per_change_to_the_right_deal() {
        on_both(
            "a_large_batch_writes_exactly_one_history_row_per_change_to_the_right_deal",
            async |store| {
                let t0 = Utc::now() - Duration::hours(1);
                // 70 records: two full multi-row history inserts and a remainder of six.
                let batch =
                    |stage: &str, at| (0..70).map(|n| upsert(&n.to_string(), stage, at)).collect();
                let created = store.upsert_deals(batch("proposal", t0)).await.unwrap();
                assert_eq!((created.created, created.stage_changes), (70, 70));
                let moved = store
                    .upsert_deals(batch("negotiation", t0 + Duration::minutes(1)))
                    .await
                    .unwrap();
                assert_eq!((moved.updated, moved.stage_changes), (70, 70));
                for n in [0, 31, 32, 63, 64, 69] {
                    let deal = stored_deal(&store, "crm", &n.to_string()).await;
                    let history = store.history(deal.id).await.unwrap();
                    assert_eq!(history.len(), 2, "deal {n}");
                    assert!(history.iter().all(|change| change.deal_id == deal.id));
                    assert_eq!(history[1].to_stage.as_str(), "negotiation");
                    assert_eq!(history[1].native_from.as_deref(), Some("proposal"));
                }
            },
        )
        .await;
    }

    /// Batches just under, at, just over and at twice the multi-row INSERT's chunk:
    /// every stage change is one history row, whichever path wrote it.
    #[tokio::test]
    async fn a_batch_at_a_chunk_boundary_writes_one_history_row_per_stage_change() {
        for size in [
            HISTORY_ROWS_PER_INSERT - 1,
            HISTORY_ROWS_PER_INSERT,
            HISTORY_ROWS_PER_INSERT + 1,
            2 * HISTORY_ROWS_PER_INSERT,
        ] {
            let test = format!("a_batch_of_{size}_writes_one_history_row_per_stage_change");
            on_both(&test, async |store| {
                let t0 = Utc::now() - Duration::hours(1);
                let batch = |stage: &str, at| {
                    (0..size)
                        .map(|n| upsert(&n.to_string(), stage, at))
                        .collect()
                };
                let created = store.upsert_deals(batch("proposal", t0)).await.unwrap();
                assert_eq!(created.stage_changes, size as u64, "batch of {size}");
                let moved = store
                    .upsert_deals(batch("negotiation", t0 + Duration::minutes(1)))
                    .await
                    .unwrap();
                assert_eq!(moved.stage_changes, size as u64, "batch of {size}");
                let mut rows = 0;
                for n in 0..size {
                    let deal = stored_deal(&store, "crm", &n.to_string()).await;
                    let history = store.history(deal.id).await.unwrap();
                    let stages: Vec<&str> = history.iter().map(|c| c.to_stage.as_str()).collect();
                    assert_eq!(
                        stages,
                        ["proposal", "negotiation"],
                        "deal {n} in a batch of {size}"
                    );
                    rows += history.len();
                }
                assert_eq!(rows, 2 * size, "history rows for batches of {size}");
            })
            .await;
        }
    }

    #[tokio::test]
    async fn moving_a_deal_records_history_once() {
        on_both("moving_a_deal_records_history_once", async |store| {
            store
                .upsert_deals(vec![upsert("1", "proposal", Utc::now())])
                .await
                .unwrap();
            let deal = stored_deal(&store, "crm", "1").await;
            let to = StageRef {
                pipeline: Some(PipelineKey::new("sales")),
                stage: StageKey::new("won"),
            };
            assert!(
                store
                    .move_deal(
                        deal.id,
                        to.clone(),
                        DealStatus::Won,
                        Utc::now(),
                        ChangeCause::Followup
                    )
                    .await
                    .unwrap()
            );
            assert!(
                !store
                    .move_deal(
                        deal.id,
                        to,
                        DealStatus::Won,
                        Utc::now(),
                        ChangeCause::Followup
                    )
                    .await
                    .unwrap()
            );
            let history = store.history(deal.id).await.unwrap();
            assert_eq!(history.len(), 2);
            assert_eq!(history[1].cause, ChangeCause::Followup);
        })
        .await;
    }

    #[tokio::test]
    async fn each_history_row_reads_back_with_the_cause_it_was_written_with() {
        on_both(
            "each_history_row_reads_back_with_the_cause_it_was_written_with",
            async |store| {
                let t0 = Utc::now() - Duration::hours(1);
                let mut created = upsert("1", "proposal", t0);
                created.cause = ChangeCause::Webhook;
                store.upsert_deals(vec![created]).await.unwrap();
                let id = stored_deal(&store, "crm", "1").await.id;
                let causes = [
                    ChangeCause::Poll,
                    ChangeCause::Followup,
                    ChangeCause::Mapping,
                ];
                for (minutes, (cause, stage)) in causes
                    .into_iter()
                    .zip(["negotiation", "proposal", "negotiation"])
                    .enumerate()
                {
                    let at = t0 + Duration::minutes(minutes as i64 + 1);
                    let moved = store
                        .move_deal(id, sales(stage), DealStatus::Open, at, cause)
                        .await
                        .unwrap();
                    assert!(moved);
                }
                let read: Vec<ChangeCause> = store
                    .history(id)
                    .await
                    .unwrap()
                    .into_iter()
                    .map(|change| change.cause)
                    .collect();
                assert_eq!(
                    read,
                    [
                        ChangeCause::Webhook,
                        ChangeCause::Poll,
                        ChangeCause::Followup,
                        ChangeCause::Mapping
                    ]
                );
            },
        )
        .await;
    }
}
