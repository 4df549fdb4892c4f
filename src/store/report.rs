//! The report's queries: one ordered pass over deals, history and sent follow-ups,
//! streamed into a [`ReportSink`], plus the small grouped queries behind the metrics
//! and the status page.
//!
//! Invariant: the scan reads each table once, sequentially (no per-deal query, no
//! random lookups): history and sent follow-ups into memory, sorted by deal, then the
//! deals in id order, merged in Rust. Memory: 24 bytes per history row while the
//! scan runs, besides what the sink keeps.

use super::{Result, Store};
use crate::domain::{Currency, DealStatus};
use crate::pipeline::Pipelines;
use crate::report::{
    Accumulator, DealInput, FollowupInput, Report, ReportOptions, ReportSink, VisitInput,
};
use rusqlite::params;
use serde::Serialize;

/// Which deals a report scan reads.
#[derive(Debug, Clone, Default)]
pub struct ReportScope {
    pub connection: Option<String>,
}

/// Live deals and their value, per connection, canonical stage and currency.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StageValue {
    pub connection: String,
    pub pipeline: String,
    pub stage: String,
    /// Empty when the deals have no amount.
    pub currency: String,
    pub deals: u64,
    pub amount_minor: i64,
}

/// Open deals past a stage's stall threshold, per connection and stage.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StalledCount {
    pub connection: String,
    pub pipeline: String,
    pub stage: String,
    pub deals: u64,
}

/// Outbox rows per follow-up rule and state.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct OutboxCount {
    pub rule: String,
    pub state: String,
    pub emails: u64,
}

/// One outbox row, as the read API and the status page show it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct OutboxEntry {
    pub id: i64,
    pub deal_id: i64,
    pub rule: String,
    pub step: i64,
    pub recipient: String,
    pub state: String,
    pub due_at: chrono::DateTime<chrono::Utc>,
    pub attempts: i64,
    pub reason: Option<String>,
    pub sent_at: Option<chrono::DateTime<chrono::Utc>>,
    pub updated_at: chrono::DateTime<chrono::Utc>,
}

/// Filters for listing the outbox; `None` means any.
#[derive(Debug, Clone, Default)]
pub struct OutboxFilter {
    pub deal_id: Option<i64>,
    pub state: Option<String>,
    pub rule: Option<String>,
    pub limit: Option<u32>,
    pub offset: Option<u32>,
}

/// A stage's stall cut-off: open deals that entered it before `entered_before` (UTC ms) are stalled.
#[derive(Debug, Clone)]
pub struct StallCutoff {
    pub pipeline: String,
    pub stage: String,
    pub entered_before: i64,
}

fn outbox_from_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<OutboxEntry> {
    use super::from_ms;
    Ok(OutboxEntry {
        id: row.get(0)?,
        deal_id: row.get(1)?,
        rule: row.get(2)?,
        step: row.get(3)?,
        recipient: row.get(4)?,
        state: row.get(5)?,
        due_at: from_ms(row.get(6)?),
        attempts: row.get(7)?,
        reason: row.get(8)?,
        sent_at: row.get::<_, Option<i64>>(9)?.map(from_ms),
        updated_at: from_ms(row.get(10)?),
    })
}

impl Store {
    /// Streams every deal in scope, with its history and sent follow-ups, into `sink`.
    pub async fn scan_report<S: ReportSink>(&self, scope: ReportScope, sink: S) -> Result<S> {
        self.read(move |db| scan(db, &scope, sink)).await
    }

    /// The whole report: one scan folded by [`Accumulator`], on a blocking thread.
    pub async fn report(&self, pipelines: Pipelines, options: ReportOptions) -> Result<Report> {
        let scope = ReportScope {
            connection: options.connection.clone(),
        };
        self.read(move |db| Ok(scan(db, &scope, Accumulator::new(pipelines, options))?.finish()))
            .await
    }

    /// Live deals and their summed amount per connection, stage and currency.
    pub async fn stage_values(&self) -> Result<Vec<StageValue>> {
        self.read(|db| {
            let mut statement = db.prepare(
                "SELECT connection, coalesce(pipeline, ''), stage, coalesce(currency, ''),
                        count(*), coalesce(sum(amount_minor), 0)
                 FROM deals WHERE deleted_at IS NULL
                 GROUP BY connection, pipeline, stage, currency
                 ORDER BY connection, pipeline, stage, currency",
            )?;
            let rows = statement.query_map([], |row| {
                Ok(StageValue {
                    connection: row.get(0)?,
                    pipeline: row.get(1)?,
                    stage: row.get(2)?,
                    currency: row.get(3)?,
                    deals: row.get::<_, i64>(4)? as u64,
                    amount_minor: row.get(5)?,
                })
            })?;
            Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
        })
        .await
    }

    /// Open deals past their stage's cut-off, per connection and stage; one indexed
    /// range query per stage (`deals_by_stage`).
    pub async fn stalled_counts(&self, cutoffs: Vec<StallCutoff>) -> Result<Vec<StalledCount>> {
        self.read(move |db| {
            let mut statement = db.prepare(
                "SELECT connection, count(*) FROM deals
                 WHERE pipeline = ?1 AND stage = ?2 AND stage_entered_at < ?3
                   AND status = 'open' AND deleted_at IS NULL
                 GROUP BY connection ORDER BY connection",
            )?;
            let mut out = Vec::new();
            for cutoff in &cutoffs {
                let rows = statement.query_map(
                    params![cutoff.pipeline, cutoff.stage, cutoff.entered_before],
                    |row| Ok((row.get::<_, String>(0)?, row.get::<_, i64>(1)?)),
                )?;
                for row in rows {
                    let (connection, deals) = row?;
                    out.push(StalledCount {
                        connection,
                        pipeline: cutoff.pipeline.clone(),
                        stage: cutoff.stage.clone(),
                        deals: deals as u64,
                    });
                }
            }
            Ok(out)
        })
        .await
    }

    /// The open deals past their stage's cut-off, longest-stalled first, at most `limit`.
    pub async fn stalled_deals(
        &self,
        cutoffs: Vec<StallCutoff>,
        limit: u32,
    ) -> Result<Vec<crate::domain::Deal>> {
        self.read(move |db| {
            let sql = format!(
                "SELECT {} FROM deals
                 WHERE pipeline = ?1 AND stage = ?2 AND stage_entered_at < ?3
                   AND status = 'open' AND deleted_at IS NULL
                 ORDER BY stage_entered_at LIMIT ?4",
                super::deals::DEAL_COLUMNS
            );
            let mut statement = db.prepare(&sql)?;
            let mut out = Vec::new();
            for cutoff in &cutoffs {
                let rows = statement.query_map(
                    params![cutoff.pipeline, cutoff.stage, cutoff.entered_before, limit],
                    super::deals::deal_from_row,
                )?;
                for row in rows {
                    out.push(row?);
                }
            }
            out.sort_by_key(|deal| deal.stage_entered_at);
            out.truncate(limit as usize);
            Ok(out)
        })
        .await
    }

    /// Outbox rows per rule and state.
    pub async fn outbox_counts(&self) -> Result<Vec<OutboxCount>> {
        self.read(|db| {
            let mut statement = db.prepare(
                "SELECT rule, state, count(*) FROM outbox GROUP BY rule, state ORDER BY rule, state",
            )?;
            let rows = statement.query_map([], |row| {
                Ok(OutboxCount {
                    rule: row.get(0)?,
                    state: row.get(1)?,
                    emails: row.get::<_, i64>(2)? as u64,
                })
            })?;
            Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
        })
        .await
    }

    /// Outbox rows matching the filter, most recently updated first.
    pub async fn outbox_entries(&self, filter: OutboxFilter) -> Result<Vec<OutboxEntry>> {
        self.read(move |db| {
            let mut sql = String::from(
                "SELECT id, deal_id, rule, step, recipient, state, due_at, attempts, reason,
                        sent_at, updated_at FROM outbox WHERE 1 = 1",
            );
            let mut values: Vec<rusqlite::types::Value> = Vec::new();
            if let Some(deal_id) = filter.deal_id {
                values.push(deal_id.into());
                sql.push_str(&format!(" AND deal_id = ?{}", values.len()));
            }
            for (column, value) in [("state", filter.state), ("rule", filter.rule)] {
                if let Some(value) = value {
                    values.push(value.into());
                    sql.push_str(&format!(" AND {column} = ?{}", values.len()));
                }
            }
            sql.push_str(&format!(
                " ORDER BY updated_at DESC, id DESC LIMIT {} OFFSET {}",
                filter.limit.map_or(-1, i64::from),
                filter.offset.unwrap_or(0)
            ));
            let mut statement = db.prepare(&sql)?;
            let rows = statement.query_map(rusqlite::params_from_iter(values), outbox_from_row)?;
            Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
        })
        .await
    }
}

fn scan<S: ReportSink>(db: &rusqlite::Connection, scope: &ReportScope, mut sink: S) -> Result<S> {
    // Reads go through a memory map: the scan touches every page once, and mapped
    // pages cost no read call each. Read-only, so a mapped file cannot be corrupted.
    db.pragma_update(None, "mmap_size", MMAP_BYTES)?;

    // The history is read in table (rowid) order, one sequential pass, then sorted in
    // memory by (deal, time); the sort is stable, so rows at the same instant keep
    // their insertion order. Walking `stage_history_by_deal` instead would cost one
    // random table lookup per row: history is appended in time order, so one deal's
    // rows are scattered over the whole table.
    let mut visits_sorted: Vec<(i64, VisitInput)> = Vec::new();
    {
        let mut history =
            db.prepare("SELECT deal_id, at, to_pipeline, to_stage FROM stage_history")?;
        let mut rows = history.query([])?;
        let interner = sink.interner();
        while let Some(row) = rows.next()? {
            let stage = interner.stage(text_at(row, 2)?, text_at(row, 3)?.unwrap_or_default());
            visits_sorted.push((
                row.get(0)?,
                VisitInput {
                    at: row.get(1)?,
                    stage,
                },
            ));
        }
    }
    visits_sorted.sort_by_key(|(deal_id, visit)| (*deal_id, visit.at));

    let mut followups_sorted: Vec<(i64, FollowupInput)> = Vec::new();
    {
        let mut outbox = db.prepare(
            "SELECT deal_id, rule, step, sent_at FROM outbox
             WHERE state = 'sent' AND sent_at IS NOT NULL",
        )?;
        let mut rows = outbox.query([])?;
        let interner = sink.interner();
        while let Some(row) = rows.next()? {
            let rule = interner.name(text_at(row, 1)?.unwrap_or_default());
            followups_sorted.push((
                row.get(0)?,
                FollowupInput {
                    rule,
                    step: row.get(2)?,
                    sent_at: row.get(3)?,
                },
            ));
        }
    }
    followups_sorted.sort_by_key(|(deal_id, followup)| (*deal_id, followup.sent_at));

    let mut deals = db.prepare(
        "SELECT id, connection, pipeline, stage, status, amount_minor, currency, expected_close,
                stage_entered_at
         FROM deals WHERE ?1 IS NULL OR connection = ?1 ORDER BY id",
    )?;
    let mut rows = deals.query(params![scope.connection])?;
    let (mut next_visit, mut next_followup) = (0usize, 0usize);
    let mut visits: Vec<VisitInput> = Vec::new();
    let mut followups: Vec<FollowupInput> = Vec::new();
    while let Some(row) = rows.next()? {
        let deal = deal_input(row, sink.interner())?;
        take_rows(&visits_sorted, &mut next_visit, deal.id, &mut visits);
        take_rows(
            &followups_sorted,
            &mut next_followup,
            deal.id,
            &mut followups,
        );
        sink.add_deal(&deal, &visits, &followups);
    }
    Ok(sink)
}

/// A text column, or `None` for NULL.
fn text_at<'r>(row: &'r rusqlite::Row<'_>, at: usize) -> rusqlite::Result<Option<&'r str>> {
    row.get_ref(at)?.as_str_or_null().map_err(|error| {
        rusqlite::Error::FromSqlConversionFailure(at, rusqlite::types::Type::Text, Box::new(error))
    })
}

/// How much of the database file a report scan maps into memory.
const MMAP_BYTES: i64 = 1 << 31;

/// Copies the rows of `deal_id` from rows sorted by deal id, starting at `*next`;
/// rows of smaller ids (deals outside the scope) are skipped.
fn take_rows<T: Copy>(sorted: &[(i64, T)], next: &mut usize, deal_id: i64, out: &mut Vec<T>) {
    out.clear();
    while let Some((id, value)) = sorted.get(*next) {
        if *id > deal_id {
            break;
        }
        if *id == deal_id {
            out.push(*value);
        }
        *next += 1;
    }
}

fn deal_input(
    row: &rusqlite::Row<'_>,
    interner: &mut crate::report::Interner,
) -> rusqlite::Result<DealInput> {
    let text = |at: usize| -> rusqlite::Result<Option<&str>> {
        row.get_ref(at)?.as_str_or_null().map_err(|e| {
            rusqlite::Error::FromSqlConversionFailure(at, rusqlite::types::Type::Text, Box::new(e))
        })
    };
    let connection = interner.name(text(1)?.unwrap_or_default());
    let stage = interner.stage(text(2)?, text(3)?.unwrap_or_default());
    Ok(DealInput {
        id: row.get(0)?,
        connection,
        stage,
        status: text(4)?
            .and_then(DealStatus::parse)
            .unwrap_or(DealStatus::Unmapped),
        amount_minor: row.get(5)?,
        currency: text(6)?.and_then(|c| Currency::parse(c).ok()),
        expected_close: text(7)?.and_then(|d| d.parse().ok()),
        stage_entered_at: row.get(8)?,
    })
}
