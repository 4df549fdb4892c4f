//! The grouped reads behind the status page, `/metrics` and the read API on
//! PostgreSQL: live deals and their value per stage, stalled deals counted and listed,
//! follow-up emails counted and outbox rows listed. The same contract as the SQLite
//! methods of the same names (`store::report`), which document it; the row mappings,
//! the outbox listing's query and the stalled deals' final order are theirs, shared.
//!
//! Invariants:
//! - Reads only, each statement on its own snapshot: nothing here needs a lock, and a
//!   replica writing meanwhile can make one answer's parts differ by what it
//!   committed in between, as on SQLite.
//! - Text sorts by its bytes (`COLLATE "C"`), as SQLite's `BINARY` does, and a missing
//!   pipeline or currency sorts first, as SQLite's NULL does, whatever the database's
//!   collation.

use super::Database;
use super::deals::pg_text;
use crate::domain::Deal;
use crate::store::Result;
use crate::store::deals::{DEAL_COLUMNS, deal_from};
use crate::store::report::{
    OutboxCount, OutboxEntry, OutboxFilter, StageValue, StallCutoff, StalledCount, longest_stalled,
    outbox_count_from, outbox_entry_from, stage_value_from,
};

impl Database {
    /// Live deals and their summed amount per connection, stage and currency.
    pub async fn stage_values(&self) -> Result<Vec<StageValue>> {
        let client = self.client().await?;
        let statement = client
            .prepare_cached(
                "SELECT connection, coalesce(pipeline, ''), stage, coalesce(currency, ''),
                        count(*), coalesce(sum(amount_minor), 0)::bigint
                 FROM deals WHERE deleted_at IS NULL
                 GROUP BY connection, pipeline, stage, currency
                 ORDER BY connection COLLATE \"C\", pipeline COLLATE \"C\" NULLS FIRST,
                          stage COLLATE \"C\", currency COLLATE \"C\" NULLS FIRST",
            )
            .await?;
        let rows = client.query(&statement, &[]).await?;
        Ok(rows
            .iter()
            .map(stage_value_from)
            .collect::<std::result::Result<_, _>>()?)
    }

    /// Open deals past their stage's cut-off, per connection and stage; one indexed
    /// range query per stage (`deals_by_stage`).
    pub async fn stalled_counts(&self, cutoffs: Vec<StallCutoff>) -> Result<Vec<StalledCount>> {
        let client = self.client().await?;
        let statement = client
            .prepare_cached(
                "SELECT connection, count(*) FROM deals
                 WHERE pipeline = $1 AND stage = $2 AND stage_entered_at < $3
                   AND status = 'open' AND deleted_at IS NULL
                 GROUP BY connection ORDER BY connection COLLATE \"C\"",
            )
            .await?;
        let mut out = Vec::new();
        for cutoff in &cutoffs {
            let (pipeline, stage) = (pg_text(&cutoff.pipeline), pg_text(&cutoff.stage));
            let rows = client
                .query(&statement, &[&pipeline, &stage, &cutoff.entered_before])
                .await?;
            for row in rows {
                out.push(StalledCount {
                    connection: row.try_get(0)?,
                    pipeline: cutoff.pipeline.clone(),
                    stage: cutoff.stage.clone(),
                    deals: row.try_get::<_, i64>(1)?.unsigned_abs(),
                });
            }
        }
        Ok(out)
    }

    /// The open deals past their stage's cut-off, longest-stalled first, at most `limit`.
    pub async fn stalled_deals(&self, cutoffs: Vec<StallCutoff>, limit: u32) -> Result<Vec<Deal>> {
        let client = self.client().await?;
        let statement = client
            .prepare_cached(&format!(
                "SELECT {DEAL_COLUMNS} FROM deals
                 WHERE pipeline = $1 AND stage = $2 AND stage_entered_at < $3
                   AND status = 'open' AND deleted_at IS NULL
                 ORDER BY stage_entered_at LIMIT $4"
            ))
            .await?;
        let mut out = Vec::new();
        for cutoff in &cutoffs {
            let (pipeline, stage) = (pg_text(&cutoff.pipeline), pg_text(&cutoff.stage));
            let rows = client
                .query(
                    &statement,
                    &[&pipeline, &stage, &cutoff.entered_before, &i64::from(limit)],
                )
                .await?;
            for row in &rows {
                out.push(deal_from(row)?);
            }
        }
        Ok(longest_stalled(out, limit))
    }

    /// Follow-up emails per rule and state; expiry rows are not emails and not counted.
    pub async fn outbox_counts(&self) -> Result<Vec<OutboxCount>> {
        let client = self.client().await?;
        let statement = client
            .prepare_cached(
                "SELECT rule, state, count(*) FROM outbox WHERE action = 'email'
                 GROUP BY rule, state ORDER BY rule COLLATE \"C\", state COLLATE \"C\"",
            )
            .await?;
        let rows = client.query(&statement, &[]).await?;
        Ok(rows
            .iter()
            .map(outbox_count_from)
            .collect::<std::result::Result<_, _>>()?)
    }

    /// Outbox rows matching the filter, most recently updated first.
    pub async fn outbox_entries(&self, filter: OutboxFilter) -> Result<Vec<OutboxEntry>> {
        let (sql, values) = filter.query('$');
        let rows = self.query_texts(&sql, &values).await?;
        Ok(rows
            .iter()
            .map(outbox_entry_from)
            .collect::<std::result::Result<_, _>>()?)
    }
}
