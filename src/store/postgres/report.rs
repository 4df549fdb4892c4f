//! The report scan on PostgreSQL: the same single pass as on SQLite (`store::report`,
//! which documents it): the history in two halves on two pooled connections and the
//! deals and sent follow-ups on a third, at the same time, each streamed through binary
//! `COPY` (`copy_rows`) into the same per-row readers and the same fold.
//!
//! Invariants:
//! - Each query reads its own snapshot, as on SQLite: a change committed between them
//!   can make a deal's row newer or older than its history by that one change, never
//!   lose or double a row.
//! - History rows of one deal at the same instant keep table order, as SQLite's keep
//!   rowid order: here the physical order of the two halves read one after the other,
//!   which is insertion order for `stage_history` (rows are only ever appended).

use super::Database;
use super::copy_rows::copy_rows;
use crate::report::{FollowupInput, Interner, ReportSink, StageId, VisitInput};
use crate::store::report::{
    ByDeal, DEAL_INPUT_COLUMNS, Deals, FOLLOWUPS_SQL, HISTORY_SQL, History, ReportScope, TextCache,
    deal_input, fold, followup_row, visit_row,
};
use crate::store::{Result, StoreError};

/// `text` as an SQL string literal: quotes doubled, NUL dropped (PostgreSQL's text
/// cannot hold it, so no stored name has one).
fn quote_literal(text: &str) -> String {
    format!("'{}'", text.replace('\0', "").replace('\'', "''"))
}

impl Database {
    /// Streams every deal in scope, with its history and sent follow-ups, into `sink`.
    pub async fn scan_report<S: ReportSink>(&self, scope: ReportScope, sink: S) -> Result<S> {
        let (history, deals) =
            tokio::try_join!(self.read_history(), self.read_deals(&scope, sink))?;
        tokio::task::spawn_blocking(move || fold(history, deals))
            .await
            .map_err(|error| StoreError::Task(error.to_string()))
    }

    /// The history, read in two halves of the table's pages on two connections at once
    /// (the server's scan of it is the scan's longest part; a TID range scan reads
    /// only its half), each in table order, then put together and grouped by deal.
    async fn read_history(&self) -> Result<History> {
        let client = self.client().await?;
        let row = client
            .query_one(
                "SELECT (pg_relation_size('stage_history') / current_setting('block_size')::int)
                    ::bigint, coalesce(max(id), 0) FROM stage_history",
                &[],
            )
            .await?;
        let (pages, rows): (i64, i64) = (row.try_get(0)?, row.try_get(1)?);
        drop(client);
        // Pages appended meanwhile fall in the second half, which has no end.
        let middle = format!("'({},0)'::tid", pages / 2);
        let (mut first, second) = tokio::try_join!(
            self.read_history_part(format!("ctid < {middle}"), rows / 2),
            self.read_history_part(format!("ctid >= {middle}"), rows / 2),
        )?;
        // The second part's stages are interned by its own interner: translate them.
        let translated: Vec<StageId> = second
            .1
            .stages()
            .map(|(pipeline, stage)| first.1.stage(pipeline, stage))
            .collect();
        first
            .0
            .extend(second.0.into_iter().map(|(deal_id, mut visit)| {
                visit.stage = translated[visit.stage.index()];
                (deal_id, visit)
            }));
        Ok(History {
            visits: ByDeal::group(first.0, |visit| visit.at),
            stages: first.1,
        })
    }

    /// The history rows `pages` selects, in table order.
    async fn read_history_part(
        &self,
        pages: String,
        capacity: i64,
    ) -> Result<(Vec<(i64, VisitInput)>, Interner)> {
        let client = self.client().await?;
        let mut rows: Vec<(i64, VisitInput)> =
            Vec::with_capacity(usize::try_from(capacity).unwrap_or(0).min(1 << 27));
        let mut stages = Interner::default();
        copy_rows(&client, &format!("{HISTORY_SQL} WHERE {pages}"), |row| {
            rows.push(visit_row(row, &mut stages)?);
            Ok(())
        })
        .await?;
        Ok((rows, stages))
    }

    async fn read_deals<S: ReportSink>(
        &self,
        scope: &ReportScope,
        mut sink: S,
    ) -> Result<Deals<S>> {
        let client = self.client().await?;
        let mut followup_rows: Vec<(i64, FollowupInput)> = Vec::new();
        copy_rows(&client, FOLLOWUPS_SQL, |row| {
            followup_rows.push(followup_row(row, sink.interner())?);
            Ok(())
        })
        .await?;
        let followups = ByDeal::group(followup_rows, |followup| followup.sent_at);
        let count: i64 = client
            .query_one("SELECT coalesce(max(id), 0) FROM deals", &[])
            .await?
            .try_get(0)?;
        let mut deals = Vec::with_capacity(usize::try_from(count).unwrap_or(0).min(1 << 26));
        // COPY takes no parameters: the connection name goes in as a literal.
        let scope = match &scope.connection {
            Some(connection) => format!("WHERE connection = {}", quote_literal(connection)),
            None => String::new(),
        };
        // In table order, then sorted here (mostly in order already, so nearly free):
        // cheaper than the server's sort or index walk.
        let sql = format!("SELECT {DEAL_INPUT_COLUMNS} FROM deals {scope}");
        let mut texts = TextCache::default();
        copy_rows(&client, &sql, |row| {
            deals.push(deal_input(row, sink.interner(), &mut texts)?);
            Ok(())
        })
        .await?;
        deals.sort_by_key(|deal| deal.id);
        Ok(Deals {
            sink,
            deals,
            followups,
        })
    }
}
