//! The report's queries: one ordered pass over deals, history and sent follow-ups,
//! streamed into a [`ReportSink`], plus the small grouped queries behind the metrics
//! and the status page.
//!
//! Invariant: the scan reads each table once, sequentially (no per-deal query, no
//! random lookups), history on one reader connection and deals plus sent follow-ups
//! on another, at the same time; the history is grouped by deal in memory (a counting
//! sort on the deal ids), the deals are read in id order, and the two are merged
//! in Rust. Memory while the scan runs: 48 bytes per history row at the peak (the rows
//! as read and partitioned, then partitioned and grouped), 16 after, and 64 bytes per deal, besides what
//! the sink keeps.

use super::deals::Columns;
use super::{Result, Store, from_ms};
use crate::domain::{Currency, DealStatus, StepNumber};
use crate::pipeline::Pipelines;
use crate::report::{
    Accumulator, DealInput, FollowupInput, Interner, Report, ReportOptions, ReportSink, StageId,
    VisitInput,
};
use chrono::NaiveDate;
use rusqlite::params;
use rusqlite::types::ValueRef;
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

/// Follow-up emails (outbox rows with `action = 'email'`) per rule and state.
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
    pub step: StepNumber,
    /// `email`, or `expire` for a rule's expiry (moves the deal, sends nothing).
    pub action: String,
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
    /// `email` or `expire`.
    pub action: Option<String>,
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

impl OutboxFilter {
    /// The outbox listing query of this filter for a backend whose numbered
    /// placeholders start with `sigil` (`?1` in SQLite, `$1` in PostgreSQL), and its
    /// text parameters in order (a deal id is a number, written into the query).
    pub(super) fn query(self, sigil: char) -> (String, Vec<String>) {
        let mut select = format!("SELECT {OUTBOX_ENTRY_COLUMNS} FROM outbox WHERE 1 = 1");
        if let Some(deal_id) = self.deal_id {
            select.push_str(&format!(" AND deal_id = {deal_id}"));
        }
        super::Listing {
            select,
            equal: vec![
                ("state", self.state),
                ("rule", self.rule),
                ("action", self.action),
            ],
            order: "updated_at DESC, id DESC",
            limit: self.limit,
            offset: self.offset,
        }
        .query(sigil)
    }
}

/// The columns [`outbox_entry_from`] reads, in its order.
pub(super) const OUTBOX_ENTRY_COLUMNS: &str = "id, deal_id, rule, step, recipient, state, \
    due_at, attempts, reason, sent_at, updated_at, action";

/// Reads an outbox row of either backend ([`OUTBOX_ENTRY_COLUMNS`]).
pub(super) fn outbox_entry_from<R: Columns>(row: &R) -> Result<OutboxEntry, R::Error> {
    Ok(OutboxEntry {
        id: row.int(0)?,
        deal_id: row.int(1)?,
        rule: row.text(2)?,
        step: StepNumber::from_index(row.int(3)?),
        recipient: row.text(4)?,
        state: row.text(5)?,
        due_at: from_ms(row.int(6)?),
        attempts: row.int(7)?,
        reason: row.opt_text(8)?,
        sent_at: row.opt_int(9)?.map(from_ms),
        updated_at: from_ms(row.int(10)?),
        action: row.text(11)?,
    })
}

/// Reads a row of the stage values query of either backend: connection, pipeline
/// (empty for none), stage, currency (empty for none), deals, summed amount.
pub(super) fn stage_value_from<R: Columns>(row: &R) -> Result<StageValue, R::Error> {
    Ok(StageValue {
        connection: row.text(0)?,
        pipeline: row.text(1)?,
        stage: row.text(2)?,
        currency: row.text(3)?,
        deals: row.int(4)?.unsigned_abs(),
        amount_minor: row.int(5)?,
    })
}

/// Reads a row of the outbox counts query of either backend: rule, state, emails.
pub(super) fn outbox_count_from<R: Columns>(row: &R) -> Result<OutboxCount, R::Error> {
    Ok(OutboxCount {
        rule: row.text(0)?,
        state: row.text(1)?,
        emails: row.int(2)?.unsigned_abs(),
    })
}

/// The stalled deals of all the cut-offs (each stage's read at most `limit` long):
/// the longest-stalled first, at most `limit`.
pub(super) fn longest_stalled(
    mut deals: Vec<crate::domain::Deal>,
    limit: u32,
) -> Vec<crate::domain::Deal> {
    deals.sort_by_key(|deal| deal.stage_entered_at);
    deals.truncate(limit as usize);
    deals
}

impl Store {
    /// Streams every deal in scope, with its history and sent follow-ups, into `sink`.
    pub async fn scan_report<S: ReportSink>(&self, scope: ReportScope, sink: S) -> Result<S> {
        scan(self, scope, sink).await
    }

    /// The whole report: one scan folded by [`Accumulator`], on blocking threads.
    pub async fn report(&self, pipelines: Pipelines, options: ReportOptions) -> Result<Report> {
        let scope = ReportScope {
            connection: options.connection.clone(),
        };
        let accumulator = scan(self, scope, Accumulator::new(pipelines, options)).await?;
        tokio::task::spawn_blocking(move || accumulator.finish())
            .await
            .map_err(|error| super::StoreError::Task(error.to_string()))
    }

    /// Live deals and their summed amount per connection, stage and currency.
    pub async fn stage_values(&self) -> Result<Vec<StageValue>> {
        if let Some(database) = self.postgres() {
            return database
                .stage_values()
                .await
                .map_err(|error| database.named(error));
        }
        self.read(|db| {
            let mut statement = db.prepare(
                "SELECT connection, coalesce(pipeline, ''), stage, coalesce(currency, ''),
                        count(*), coalesce(sum(amount_minor), 0)
                 FROM deals WHERE deleted_at IS NULL
                 GROUP BY connection, pipeline, stage, currency
                 ORDER BY connection, pipeline, stage, currency",
            )?;
            let rows = statement.query_map([], |row| stage_value_from(row))?;
            Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
        })
        .await
    }

    /// Open deals past their stage's cut-off, per connection and stage; one indexed
    /// range query per stage (`deals_by_stage`).
    pub async fn stalled_counts(&self, cutoffs: Vec<StallCutoff>) -> Result<Vec<StalledCount>> {
        if let Some(database) = self.postgres() {
            return database
                .stalled_counts(cutoffs)
                .await
                .map_err(|error| database.named(error));
        }
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
        if let Some(database) = self.postgres() {
            return database
                .stalled_deals(cutoffs, limit)
                .await
                .map_err(|error| database.named(error));
        }
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
            Ok(longest_stalled(out, limit))
        })
        .await
    }

    /// Follow-up emails per rule and state; expiry rows are not emails and not counted.
    pub async fn outbox_counts(&self) -> Result<Vec<OutboxCount>> {
        if let Some(database) = self.postgres() {
            return database
                .outbox_counts()
                .await
                .map_err(|error| database.named(error));
        }
        self.read(|db| {
            let mut statement = db.prepare(
                "SELECT rule, state, count(*) FROM outbox WHERE action = 'email'
                 GROUP BY rule, state ORDER BY rule, state",
            )?;
            let rows = statement.query_map([], |row| outbox_count_from(row))?;
            Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
        })
        .await
    }

    /// Outbox rows matching the filter, most recently updated first.
    pub async fn outbox_entries(&self, filter: OutboxFilter) -> Result<Vec<OutboxEntry>> {
        if let Some(database) = self.postgres() {
            return database
                .outbox_entries(filter)
                .await
                .map_err(|error| database.named(error));
        }
        self.read(move |db| {
            let (sql, values) = filter.query('?');
            let mut statement = db.prepare(&sql)?;
            let rows = statement.query_map(rusqlite::params_from_iter(values), |row| {
                outbox_entry_from(row)
            })?;
            Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
        })
        .await
    }
}

/// Rows of one table grouped by deal, in deal id order: the rows of the deal
/// `groups[i].0` are `rows[groups[i - 1].1..groups[i].1]` (from 0 for the first).
pub(super) struct ByDeal<T> {
    groups: Vec<(i64, usize)>,
    rows: Vec<T>,
}

impl<T: Copy> ByDeal<T> {
    /// Groups rows read in table order by deal id; within a deal, orders them by
    /// `order`, keeping table order among equals (every sort here is stable).
    ///
    /// Deal ids are row ids, so their span is small: a counting sort (count per id,
    /// then place each row at its deal's next slot) groups the rows in one pass with
    /// no comparison. Ids spread wider than two per row take a comparison sort.
    pub(super) fn group(rows: Vec<(i64, T)>, order: impl Fn(&T) -> i64) -> ByDeal<T> {
        let Some((first, last)) =
            rows.iter()
                .map(|(deal_id, _)| *deal_id)
                .fold(None, |range: Option<(i64, i64)>, id| {
                    Some(range.map_or((id, id), |(lo, hi)| (lo.min(id), hi.max(id))))
                })
        else {
            return ByDeal {
                groups: Vec::new(),
                rows: Vec::new(),
            };
        };
        let span = usize::try_from(last.abs_diff(first)).unwrap_or(usize::MAX);
        // The count table costs 4 bytes per id in the span: allowed up to about two
        // ids per row.
        let dense = span < rows.len().saturating_mul(2).saturating_add(1 << 16)
            && u32::try_from(rows.len()).is_ok();
        let mut grouped = if dense {
            counting_sort(rows, first, span + 1)
        } else {
            comparison_sort(rows)
        };
        let mut start = 0;
        for &(_, end) in &grouped.groups {
            let deal_rows = &mut grouped.rows[start..end];
            if !deal_rows.is_sorted_by_key(&order) {
                deal_rows.sort_by_key(&order);
            }
            start = end;
        }
        grouped
    }

    /// A cursor over deals visited in increasing id order.
    fn cursor(&self) -> ByDealCursor<'_, T> {
        ByDealCursor {
            by_deal: self,
            next_group: 0,
        }
    }
}

struct ByDealCursor<'a, T> {
    by_deal: &'a ByDeal<T>,
    next_group: usize,
}

impl<'a, T> ByDealCursor<'a, T> {
    /// The rows of `deal_id`, which must not be smaller than the previous call's;
    /// groups of deals skipped over (outside the scope) are passed by.
    fn rows_of(&mut self, deal_id: i64) -> &'a [T] {
        let groups = &self.by_deal.groups;
        while let Some((id, _)) = groups.get(self.next_group) {
            if *id >= deal_id {
                break;
            }
            self.next_group += 1;
        }
        match groups.get(self.next_group) {
            Some((id, end)) if *id == deal_id => {
                let start = self
                    .next_group
                    .checked_sub(1)
                    .map_or(0, |previous| groups[previous].1);
                self.next_group += 1;
                &self.by_deal.rows[start..*end]
            }
            _ => &[],
        }
    }
}

/// Partitions of the deal id range the counting sort works in, as a power of two.
const PARTITION_BITS: u32 = 6;

/// Groups rows by deal id, ids from `first` spanning `span`; rows of one deal keep their
/// order. Needs fewer than 2^32 rows.
///
/// Two passes, both cache-friendly: the rows are first split by the high bits of their
/// id into 64 contiguous partitions (64 sequential write streams), then each partition
/// is counting-sorted on its own, so its count table and its target range stay in the
/// cache. Placing every row straight at its deal's slot across the whole table would
/// miss the cache on nearly every row: history arrives in time order, so one deal's
/// rows are far apart.
fn counting_sort<T: Copy>(rows: Vec<(i64, T)>, first: i64, span: usize) -> ByDeal<T> {
    let Some(&filler) = rows.first() else {
        return ByDeal {
            groups: Vec::new(),
            rows: Vec::new(),
        };
    };
    let offset = |deal_id: i64| deal_id.abs_diff(first) as usize;
    let id_bits = usize::BITS - span.leading_zeros();
    let shift = id_bits.saturating_sub(PARTITION_BITS);
    let partitions = (span >> shift) + 1;

    let mut bounds = vec![0usize; partitions + 1];
    for (deal_id, _) in &rows {
        bounds[(offset(*deal_id) >> shift) + 1] += 1;
    }
    for at in 1..bounds.len() {
        bounds[at] += bounds[at - 1];
    }
    // Every slot is overwritten exactly once below; the filler is never read.
    let mut partitioned = vec![filler; rows.len()];
    let mut next = bounds.clone();
    for row in rows {
        let slot = &mut next[offset(row.0) >> shift];
        partitioned[*slot] = row;
        *slot += 1;
    }

    let mut groups = Vec::new();
    let mut placed = vec![filler.1; partitioned.len()];
    let mut counts = vec![0u32; 1 << shift];
    for partition in 0..partitions {
        let rows = &partitioned[bounds[partition]..bounds[partition + 1]];
        let base = partition << shift;
        counts.fill(0);
        for (deal_id, _) in rows {
            counts[offset(*deal_id) - base] += 1;
        }
        let mut total = bounds[partition] as u32;
        for (at, count) in counts.iter_mut().enumerate() {
            if *count > 0 {
                total += *count;
                groups.push((first + (base + at) as i64, total as usize));
            }
            // From here on, where the deal's next row goes.
            *count = total - *count;
        }
        for (deal_id, row) in rows {
            let slot = &mut counts[offset(*deal_id) - base];
            placed[*slot as usize] = *row;
            *slot += 1;
        }
    }
    ByDeal {
        groups,
        rows: placed,
    }
}

fn comparison_sort<T: Copy>(mut rows: Vec<(i64, T)>) -> ByDeal<T> {
    rows.sort_by_key(|(deal_id, _)| *deal_id);
    let mut groups: Vec<(i64, usize)> = Vec::new();
    for (at, (deal_id, _)) in rows.iter().enumerate() {
        match groups.last_mut() {
            Some((last, end)) if last == deal_id => *end = at + 1,
            _ => groups.push((*deal_id, at + 1)),
        }
    }
    ByDeal {
        groups,
        rows: rows.into_iter().map(|(_, row)| row).collect(),
    }
}

/// The stage history grouped by deal, with the stages it names.
pub(super) struct History {
    pub(super) visits: ByDeal<VisitInput>,
    pub(super) stages: Interner,
}

/// The deals in scope, in id order, and their sent follow-up emails.
pub(super) struct Deals<S> {
    pub(super) sink: S,
    pub(super) deals: Vec<DealInput>,
    pub(super) followups: ByDeal<FollowupInput>,
}

/// Reads and folds the report's inputs on two reader connections at once: one reads
/// and groups the stage history (the bulk of the rows), the other the deals and the
/// sent follow-ups; the fold then runs over both.
///
/// Each statement reads its own snapshot, as any sequence of autocommit statements
/// does: a change committed between them can make a deal's current row newer or older
/// than its history by that one change, never lose or double a row.
async fn scan<S: ReportSink>(store: &Store, scope: ReportScope, sink: S) -> Result<S> {
    if let Some(database) = store.postgres() {
        return database
            .scan_report(scope, sink)
            .await
            .map_err(|error| database.named(error));
    }
    let history = store.read(read_history);
    let deals = store.read(move |db| read_deals(db, &scope, sink));
    let (history, deals) = tokio::try_join!(history, deals)?;
    tokio::task::spawn_blocking(move || fold(history, deals))
        .await
        .map_err(|error| super::StoreError::Task(error.to_string()))
}

pub(super) fn fold<S: ReportSink>(history: History, deals: Deals<S>) -> S {
    let Deals {
        mut sink,
        deals,
        followups,
    } = deals;
    // The history was read with its own interner; translate its stage ids once.
    let mut visits = history.visits;
    let translated: Vec<StageId> = history
        .stages
        .stages()
        .map(|(pipeline, stage)| sink.interner().stage(pipeline, stage))
        .collect();
    for visit in &mut visits.rows {
        visit.stage = translated[visit.stage.index()];
    }
    let (mut visits_of, mut followups_of) = (visits.cursor(), followups.cursor());
    for deal in &deals {
        sink.add_deal(
            deal,
            visits_of.rows_of(deal.id),
            followups_of.rows_of(deal.id),
        );
    }
    sink
}

/// A row of the scan's queries, of either backend: text columns as bytes (the UTF-8
/// check is left to the interner, once per distinct value) and integers.
pub(super) trait ScanRow {
    fn bytes(&self, at: usize) -> Result<Option<&[u8]>>;
    fn int(&self, at: usize) -> Result<i64>;
    fn opt_int(&self, at: usize) -> Result<Option<i64>>;
}

impl ScanRow for rusqlite::Row<'_> {
    fn bytes(&self, at: usize) -> Result<Option<&[u8]>> {
        Ok(bytes_at(self, at)?)
    }
    fn int(&self, at: usize) -> Result<i64> {
        Ok(self.get(at)?)
    }
    fn opt_int(&self, at: usize) -> Result<Option<i64>> {
        Ok(self.get(at)?)
    }
}

impl ScanRow for tokio_postgres::Row {
    fn bytes(&self, at: usize) -> Result<Option<&[u8]>> {
        Ok(self.try_get::<_, Option<&str>>(at)?.map(str::as_bytes))
    }
    fn int(&self, at: usize) -> Result<i64> {
        Ok(self.try_get(at)?)
    }
    fn opt_int(&self, at: usize) -> Result<Option<i64>> {
        Ok(self.try_get(at)?)
    }
}

/// The history query's columns, in [`visit_row`]'s order.
pub(super) const HISTORY_SQL: &str = "SELECT deal_id, at, to_pipeline, to_stage FROM stage_history";

/// A history row as (deal id, visit).
pub(super) fn visit_row(row: &impl ScanRow, stages: &mut Interner) -> Result<(i64, VisitInput)> {
    let stage = stages
        .stage_bytes(row.bytes(2)?, row.bytes(3)?.unwrap_or_default())
        .ok_or_else(|| not_utf8(3))?;
    Ok((
        row.int(0)?,
        VisitInput {
            at: row.int(1)?,
            stage,
        },
    ))
}

/// Only emails that went out: expiry rows (`action = 'expire'`) move a deal but send
/// nothing, and rows never sent carry no `sent_at`. Columns in [`followup_row`]'s order.
pub(super) const FOLLOWUPS_SQL: &str = "SELECT deal_id, rule, step, sent_at FROM outbox
     WHERE state = 'sent' AND action = 'email' AND sent_at IS NOT NULL";

/// A sent follow-up as (deal id, follow-up).
pub(super) fn followup_row(
    row: &impl ScanRow,
    interner: &mut Interner,
) -> Result<(i64, FollowupInput)> {
    let rule = interner
        .name_bytes(row.bytes(1)?.unwrap_or_default())
        .ok_or_else(|| not_utf8(1))?;
    Ok((
        row.int(0)?,
        FollowupInput {
            rule,
            step: row.int(2)?,
            sent_at: row.int(3)?,
        },
    ))
}

fn read_history(db: &rusqlite::Connection) -> Result<History> {
    // Reads go through a memory map: the scan touches every page once, and mapped
    // pages cost no read call each. Read-only, so a mapped file cannot be corrupted.
    db.pragma_update(None, "mmap_size", MMAP_BYTES)?;
    // The history is read in table (rowid) order, one sequential pass, then grouped
    // by deal in memory; rows at the same instant keep their insertion order.
    // Walking `stage_history_by_deal` instead would cost one random table lookup per
    // row: history is appended in time order, so one deal's rows are scattered over
    // the whole table.
    // An upper bound of the row count, read from the end of the rowid tree.
    let capacity: i64 = db.query_row(
        "SELECT coalesce(max(id), 0) FROM stage_history",
        [],
        |row| row.get(0),
    )?;
    let mut rows: Vec<(i64, VisitInput)> =
        Vec::with_capacity(usize::try_from(capacity).unwrap_or(0).min(1 << 28));
    let mut stages = Interner::default();
    let mut statement = db.prepare(HISTORY_SQL)?;
    let mut query = statement.query([])?;
    while let Some(row) = query.next()? {
        rows.push(visit_row(row, &mut stages)?);
    }
    Ok(History {
        visits: ByDeal::group(rows, |visit| visit.at),
        stages,
    })
}

fn read_deals<S: ReportSink>(
    db: &rusqlite::Connection,
    scope: &ReportScope,
    mut sink: S,
) -> Result<Deals<S>> {
    db.pragma_update(None, "mmap_size", MMAP_BYTES)?;
    let mut followup_rows: Vec<(i64, FollowupInput)> = Vec::new();
    {
        let mut outbox = db.prepare(FOLLOWUPS_SQL)?;
        let mut rows = outbox.query([])?;
        while let Some(row) = rows.next()? {
            followup_rows.push(followup_row(row, sink.interner())?);
        }
    }
    let followups = ByDeal::group(followup_rows, |followup| followup.sent_at);

    let count: i64 = db.query_row("SELECT coalesce(max(id), 0) FROM deals", [], |row| {
        row.get(0)
    })?;
    let mut deals = Vec::with_capacity(usize::try_from(count).unwrap_or(0).min(1 << 26));
    let mut statement = db.prepare(&format!(
        "SELECT {DEAL_INPUT_COLUMNS} FROM deals WHERE ?1 IS NULL OR connection = ?1 ORDER BY id"
    ))?;
    let mut rows = statement.query(params![scope.connection])?;
    let mut texts = TextCache::default();
    while let Some(row) = rows.next()? {
        deals.push(deal_input(row, sink.interner(), &mut texts)?);
    }
    Ok(Deals {
        sink,
        deals,
        followups,
    })
}

/// A text column's bytes, or `None` for NULL; the UTF-8 check is left to the interner,
/// which makes it once per distinct value.
fn bytes_at<'r>(row: &'r rusqlite::Row<'_>, at: usize) -> rusqlite::Result<Option<&'r [u8]>> {
    match row.get_ref(at)? {
        ValueRef::Null => Ok(None),
        ValueRef::Text(bytes) => Ok(Some(bytes)),
        other => Err(rusqlite::Error::InvalidColumnType(
            at,
            format!("column {at}"),
            other.data_type(),
        )),
    }
}

fn not_utf8(at: usize) -> super::StoreError {
    rusqlite::Error::FromSqlConversionFailure(
        at,
        rusqlite::types::Type::Text,
        "not valid UTF-8".into(),
    )
    .into()
}

/// How much of the database file a report scan maps into memory.
const MMAP_BYTES: i64 = 1 << 31;

/// The last distinct status, currency and close-date texts met, parsed: deals repeat a
/// few of each, so most rows cost a byte comparison instead of a parse.
#[derive(Default)]
pub(super) struct TextCache {
    currencies: Vec<(Vec<u8>, Option<Currency>)>,
    dates: Vec<(Vec<u8>, Option<NaiveDate>)>,
}

/// Distinct values kept per column before the cache stops growing (dates can be many).
const TEXT_CACHE_ENTRIES: usize = 64;

fn cached<T: Copy>(
    entries: &mut Vec<(Vec<u8>, T)>,
    bytes: &[u8],
    parse: impl FnOnce(&str) -> T,
    miss: T,
) -> T {
    if let Some((_, value)) = entries.iter().find(|(key, _)| key == bytes) {
        return *value;
    }
    let value = std::str::from_utf8(bytes).map_or(miss, parse);
    if entries.len() < TEXT_CACHE_ENTRIES {
        entries.push((bytes.to_vec(), value));
    }
    value
}

/// The deal columns [`deal_input`] reads, in its order.
pub(super) const DEAL_INPUT_COLUMNS: &str = "id, connection, pipeline, stage, status, \
    amount_minor, currency, expected_close, stage_entered_at";

pub(super) fn deal_input(
    row: &impl ScanRow,
    interner: &mut Interner,
    texts: &mut TextCache,
) -> Result<DealInput> {
    let connection = interner
        .name_bytes(row.bytes(1)?.unwrap_or_default())
        .ok_or_else(|| not_utf8(1))?;
    let stage = interner
        .stage_bytes(row.bytes(2)?, row.bytes(3)?.unwrap_or_default())
        .ok_or_else(|| not_utf8(3))?;
    let status = match row.bytes(4)? {
        Some(bytes) => std::str::from_utf8(bytes).ok().and_then(DealStatus::parse),
        None => None,
    };
    let currency = match row.bytes(6)? {
        Some(bytes) => cached(
            &mut texts.currencies,
            bytes,
            |text| Currency::parse(text).ok(),
            None,
        ),
        None => None,
    };
    let expected_close = match row.bytes(7)? {
        Some(bytes) => cached(&mut texts.dates, bytes, |text| text.parse().ok(), None),
        None => None,
    };
    Ok(DealInput {
        id: row.int(0)?,
        connection,
        stage,
        status: status.unwrap_or(DealStatus::Unmapped),
        amount_minor: row.opt_int(5)?,
        currency,
        expected_close,
        stage_entered_at: row.int(8)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grouped(by_deal: &ByDeal<(i64, u32)>) -> Vec<(i64, Vec<(i64, u32)>)> {
        let mut start = 0;
        by_deal
            .groups
            .iter()
            .map(|&(deal_id, end)| {
                let rows = by_deal.rows[start..end].to_vec();
                start = end;
                (deal_id, rows)
            })
            .collect()
    }

    /// Rows as (deal id, (time, insertion number)), in insertion order.
    fn rows(deal_ids: &[i64]) -> Vec<(i64, (i64, u32))> {
        deal_ids
            .iter()
            .enumerate()
            .map(|(n, &deal_id)| (deal_id, ((n as i64 * 7919) % 5, n as u32)))
            .collect()
    }

    #[test]
    fn dense_and_sparse_deal_ids_group_the_same_way_ordered_by_time_then_insertion() {
        let dense = [3, 1, 2, 3, 3, 1, 2, 2, 3, 1, 5];
        let expected: Vec<(i64, Vec<(i64, u32)>)> = {
            let mut deals: Vec<i64> = dense.to_vec();
            deals.sort();
            deals.dedup();
            deals
                .into_iter()
                .map(|deal_id| {
                    let mut of_deal: Vec<(i64, u32)> = rows(&dense)
                        .into_iter()
                        .filter(|(id, _)| *id == deal_id)
                        .map(|(_, row)| row)
                        .collect();
                    of_deal.sort_by_key(|(at, n)| (*at, *n));
                    (deal_id, of_deal)
                })
                .collect()
        };
        assert_eq!(grouped(&ByDeal::group(rows(&dense), |r| r.0)), expected);

        // The same shape with ids far apart takes the comparison sort.
        for spread in [1_000_000_000, 1_000_000_000_000] {
            let sparse: Vec<i64> = dense.iter().map(|id| id * spread).collect();
            let expected_sparse: Vec<(i64, Vec<(i64, u32)>)> = expected
                .iter()
                .map(|(id, rows)| (id * spread, rows.clone()))
                .collect();
            assert_eq!(
                grouped(&ByDeal::group(rows(&sparse), |r| r.0)),
                expected_sparse
            );
        }
    }

    #[test]
    fn the_counting_sort_agrees_with_the_comparison_sort_over_many_partitions() {
        let mut state = 7u64;
        let deal_ids: Vec<i64> = (0..20_000)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                100 + (state % 9_000) as i64
            })
            .collect();
        let counted = ByDeal::group(rows(&deal_ids), |r| r.0);
        let compared = comparison_sort(rows(&deal_ids));
        assert!(counted.groups.len() > 64 * 10);
        assert_eq!(counted.groups, compared.groups);
        // Same rows per deal, ordered by time then insertion in `counted`.
        assert_eq!(grouped(&counted), {
            let mut by_deal = compared;
            let mut start = 0;
            for &(_, end) in &by_deal.groups {
                by_deal.rows[start..end].sort_by_key(|r| r.0);
                start = end;
            }
            grouped(&by_deal)
        });
    }

    #[test]
    fn the_cursor_hands_each_deal_its_rows_and_nothing_to_deals_without_any() {
        let by_deal = ByDeal::group(rows(&[4, 2, 4, 9]), |r| r.0);
        let mut cursor = by_deal.cursor();
        assert!(cursor.rows_of(1).is_empty());
        assert_eq!(cursor.rows_of(2).len(), 1);
        assert!(cursor.rows_of(3).is_empty());
        // Deal 4 is outside the scope: skipped over.
        assert!(cursor.rows_of(8).is_empty());
        assert_eq!(cursor.rows_of(9).len(), 1);
        assert!(cursor.rows_of(10).is_empty());
        assert!(
            ByDeal::<(i64, u32)>::group(Vec::new(), |r| r.0)
                .groups
                .is_empty()
        );
    }
}

#[cfg(test)]
mod status_tests {
    //! The grouped reads behind the status page, `/metrics` and the read API, on both
    //! backends.
    use super::*;
    use crate::store::Engine;
    use crate::store::both_backends::on_both;
    use crate::store::deals::tests::{stored_deal, upsert};
    use chrono::{Duration, Utc};

    /// Writes outbox rows with plain SQL both backends take (the outbox's own writes
    /// are another module's): (rule, step, action, state, updated_at) of `deal_id`.
    async fn outbox_rows(store: &Store, deal_id: i64, rows: &[(&str, i64, &str, &str, i64)]) {
        let values: Vec<String> = rows
            .iter()
            .map(|(rule, step, action, state, updated_at)| {
                format!(
                    "({deal_id}, '{rule}', {step}, '{action}', 'ann@example.com', '{state}', \
                     0, 10, 10, 0, {updated_at})"
                )
            })
            .collect();
        let sql = format!(
            "INSERT INTO outbox (deal_id, rule, step, action, recipient, state, anchor_at,
                due_at, next_attempt_at, created_at, updated_at) VALUES {}",
            values.join(", ")
        );
        match &store.engine {
            Engine::Sqlite(_) => store.execute_batch_for_test(&sql).await.unwrap(),
            Engine::Postgres(postgres) => postgres
                .database
                .client()
                .await
                .unwrap()
                .batch_execute(&sql)
                .await
                .unwrap(),
        }
    }

    /// Live deals are summed per stage and currency (no pipeline or currency as empty
    /// text, first); deleted ones are not counted.
    #[tokio::test]
    async fn stage_values_sum_the_live_deals_per_stage_and_currency() {
        on_both(
            "stage_values_sum_the_live_deals_per_stage_and_currency",
            async |store| {
                let at = Utc::now();
                let mut deleted = upsert("4", "proposal", at);
                deleted.source.deleted = true;
                let mut no_amount = upsert("5", "won", at);
                no_amount.source.amount = None;
                store
                    .upsert_deals(vec![
                        upsert("1", "proposal", at),
                        upsert("2", "proposal", at),
                        upsert("3", "mystery", at),
                        deleted,
                        no_amount,
                    ])
                    .await
                    .unwrap();
                let value =
                    |pipeline: &str, stage: &str, currency: &str, deals, amount| StageValue {
                        connection: "crm".into(),
                        pipeline: pipeline.into(),
                        stage: stage.into(),
                        currency: currency.into(),
                        deals,
                        amount_minor: amount,
                    };
                assert_eq!(
                    store.stage_values().await.unwrap(),
                    [
                        value("", "unmapped", "EUR", 1, 420_050),
                        value("sales", "proposal", "EUR", 2, 840_100),
                        value("sales", "won", "", 1, 0),
                    ]
                );
            },
        )
        .await;
    }

    /// Open live deals that entered a stage before its cut-off are stalled: counted per
    /// connection, and listed longest-stalled first up to the limit.
    #[tokio::test]
    async fn stalled_deals_are_counted_and_listed_longest_stalled_first() {
        on_both(
            "stalled_deals_are_counted_and_listed_longest_stalled_first",
            async |store| {
                let t0 = Utc::now() - Duration::days(10);
                let mut deleted = upsert("9", "proposal", t0);
                deleted.source.deleted = true;
                store
                    .upsert_deals(vec![
                        upsert("2", "proposal", t0 + Duration::days(1)),
                        upsert("1", "proposal", t0),
                        upsert("3", "negotiation", t0 + Duration::days(2)),
                        upsert("4", "proposal", Utc::now()),
                        deleted,
                    ])
                    .await
                    .unwrap();
                let cutoff = |stage: &str, before: chrono::DateTime<Utc>| StallCutoff {
                    pipeline: "sales".into(),
                    stage: stage.into(),
                    entered_before: before.timestamp_millis(),
                };
                let cutoffs = vec![
                    cutoff("proposal", t0 + Duration::days(5)),
                    cutoff("negotiation", t0 + Duration::days(5)),
                    cutoff("won", Utc::now()),
                ];
                let count = |stage: &str, deals| StalledCount {
                    connection: "crm".into(),
                    pipeline: "sales".into(),
                    stage: stage.into(),
                    deals,
                };
                assert_eq!(
                    store.stalled_counts(cutoffs.clone()).await.unwrap(),
                    [count("proposal", 2), count("negotiation", 1)]
                );
                let listed = |deals: Vec<crate::domain::Deal>| -> Vec<String> {
                    deals
                        .into_iter()
                        .map(|deal| deal.external_id.as_str().to_owned())
                        .collect()
                };
                let all = store.stalled_deals(cutoffs.clone(), 10).await.unwrap();
                assert_eq!(listed(all), ["1", "2", "3"]);
                let two = store.stalled_deals(cutoffs, 2).await.unwrap();
                assert_eq!(listed(two), ["1", "2"]);
                let none = vec![cutoff("proposal", t0)];
                assert!(store.stalled_counts(none.clone()).await.unwrap().is_empty());
                assert!(store.stalled_deals(none, 10).await.unwrap().is_empty());
            },
        )
        .await;
    }

    /// Emails are counted per rule and state (expiry rows are not emails); the listing
    /// filters, orders by last update, newest first, and pages.
    #[tokio::test]
    async fn the_outbox_is_counted_per_rule_and_state_and_listed_newest_update_first() {
        on_both(
            "the_outbox_is_counted_per_rule_and_state_and_listed_newest_update_first",
            async |store| {
                store
                    .upsert_deals(vec![
                        upsert("1", "proposal", Utc::now()),
                        upsert("2", "proposal", Utc::now()),
                    ])
                    .await
                    .unwrap();
                let (one, two) = (
                    stored_deal(&store, "crm", "1").await.id,
                    stored_deal(&store, "crm", "2").await.id,
                );
                outbox_rows(
                    &store,
                    one,
                    &[
                        ("nudge", 0, "email", "sent", 30),
                        ("nudge", 1, "email", "pending", 10),
                        ("expiry", 0, "expire", "pending", 20),
                    ],
                )
                .await;
                outbox_rows(&store, two, &[("nudge", 0, "email", "pending", 40)]).await;
                let count = |rule: &str, state: &str, emails| OutboxCount {
                    rule: rule.into(),
                    state: state.into(),
                    emails,
                };
                assert_eq!(
                    store.outbox_counts().await.unwrap(),
                    [count("nudge", "pending", 2), count("nudge", "sent", 1)]
                );
                let listed = |entries: Vec<OutboxEntry>| -> Vec<(i64, String, i64, String)> {
                    entries
                        .into_iter()
                        .map(|e| (e.deal_id, e.rule, e.updated_at.timestamp_millis(), e.action))
                        .collect()
                };
                let row = |deal, rule: &str, updated_at, action: &str| {
                    (deal, rule.to_owned(), updated_at, action.to_owned())
                };
                let all = store.outbox_entries(OutboxFilter::default()).await.unwrap();
                assert_eq!(
                    listed(all),
                    [
                        row(two, "nudge", 40, "email"),
                        row(one, "nudge", 30, "email"),
                        row(one, "expiry", 20, "expire"),
                        row(one, "nudge", 10, "email"),
                    ]
                );
                let filter = OutboxFilter {
                    deal_id: Some(one),
                    action: Some("email".into()),
                    limit: Some(1),
                    offset: Some(1),
                    ..OutboxFilter::default()
                };
                let paged = store.outbox_entries(filter).await.unwrap();
                assert_eq!(listed(paged), [row(one, "nudge", 10, "email")]);
                let filter = OutboxFilter {
                    state: Some("pending".into()),
                    rule: Some("expiry".into()),
                    offset: Some(0),
                    ..OutboxFilter::default()
                };
                let expiry = store.outbox_entries(filter).await.unwrap();
                assert_eq!(listed(expiry), [row(one, "expiry", 20, "expire")]);
                let entry = &store
                    .outbox_entries(OutboxFilter {
                        deal_id: Some(one),
                        state: Some("sent".into()),
                        ..OutboxFilter::default()
                    })
                    .await
                    .unwrap()[0];
                assert_eq!(
                    (entry.step, entry.recipient.as_str(), entry.attempts),
                    (StepNumber::from_index(0), "ann@example.com", 0)
                );
                assert_eq!((entry.reason.as_deref(), entry.sent_at), (None, None));
            },
        )
        .await;
    }
}
