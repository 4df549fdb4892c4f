//! Deals and their stage history.
//!
//! Invariants:
//! - One deal per (connection, external id). A record whose content hash
//!   (`domain::hashing::content_hash`) equals the stored one writes nothing; a record older than the stored one (`source_updated_at`)
//!   is counted stale and writes nothing.
//! - Every canonical stage change appends exactly one `stage_history` row, in the same
//!   transaction as the deal's update (the caller's).
//! - A batch reads the stored deals up front; a record whose external id occurs earlier
//!   in the same batch is compared against that earlier write, not the batch's start.

use super::{Result, Store, StoreError, from_ms, to_ms};
use crate::domain::hashing::{self, DealText};
use crate::domain::{
    ChangeCause, ConnectionName, Currency, Deal, DealStatus, EmailAddress, ExternalId, PipelineKey,
    SourceDeal, StageChange, StageKey, StageRef,
};
use chrono::{DateTime, Utc};
use rusqlite::{OptionalExtension, Row, Transaction, params};
use serde::Serialize;

/// One source record to store, with its stage already mapped.
#[derive(Debug, Clone)]
pub struct DealUpsert {
    pub connection: ConnectionName,
    pub source: SourceDeal,
    pub target: StageRef,
    pub status: DealStatus,
    pub observed_at: DateTime<Utc>,
    pub cause: ChangeCause,
}

/// What an upsert did, counted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct UpsertOutcome {
    pub created: u64,
    pub updated: u64,
    pub unchanged: u64,
    /// Records older than what is stored (an out-of-order delivery), ignored.
    pub stale: u64,
    pub stage_changes: u64,
    pub unmapped: u64,
}

impl UpsertOutcome {
    pub fn add(&mut self, other: UpsertOutcome) {
        self.created += other.created;
        self.updated += other.updated;
        self.unchanged += other.unchanged;
        self.stale += other.stale;
        self.stage_changes += other.stage_changes;
        self.unmapped += other.unmapped;
    }
}

fn json<T: Serialize>(value: &T) -> Result<String> {
    serde_json::to_string(value).map_err(|error| StoreError::Corrupt(error.to_string()))
}

/// What an upsert compares a record against: the stored deal's state.
struct Existing {
    id: i64,
    pipeline: Option<String>,
    stage: String,
    native_stage: String,
    contact_email: Option<String>,
    content_hash: i64,
    source_updated_at: Option<i64>,
    stage_entered_at: i64,
    status: String,
}

fn existing_from_row(row: &Row<'_>, first: usize) -> rusqlite::Result<Existing> {
    Ok(Existing {
        id: row.get(first)?,
        pipeline: row.get(first + 1)?,
        stage: row.get(first + 2)?,
        native_stage: row.get(first + 3)?,
        contact_email: row.get(first + 4)?,
        content_hash: row.get(first + 5)?,
        source_updated_at: row.get(first + 6)?,
        stage_entered_at: row.get(first + 7)?,
        status: row.get(first + 8)?,
    })
}

/// Reads the stored state of every deal in the batch, aligned with `upserts`: one
/// statement per connection, walking the batch's external ids (a JSON array, in batch
/// order) and looking each up on the unique (connection, external_id) index, instead
/// of one statement per record. `CROSS JOIN` keeps that join order: the planner would
/// otherwise scan every deal of the connection.
fn load_existing(tx: &Transaction<'_>, upserts: &[DealUpsert]) -> Result<Vec<Option<Existing>>> {
    let mut by_connection: Vec<(&str, Vec<usize>)> = Vec::new();
    for (index, upsert) in upserts.iter().enumerate() {
        let connection = upsert.connection.as_str();
        match by_connection
            .iter_mut()
            .find(|(name, _)| *name == connection)
        {
            Some((_, positions)) => positions.push(index),
            None => by_connection.push((connection, vec![index])),
        }
    }
    let mut statement = tx.prepare_cached(
        "SELECT j.key, d.id, d.pipeline, d.stage, d.native_stage, d.contact_email,
            d.content_hash, d.source_updated_at, d.stage_entered_at, d.status
         FROM json_each(?2) AS j CROSS JOIN deals AS d
         WHERE d.connection = ?1 AND d.external_id = j.value",
    )?;
    let mut found: Vec<Option<Existing>> = Vec::with_capacity(upserts.len());
    found.resize_with(upserts.len(), || None);
    for (connection, positions) in by_connection {
        let external_ids: Vec<&str> = positions
            .iter()
            .map(|&index| upserts[index].source.external_id.as_str())
            .collect();
        let mut rows = statement.query(params![connection, json(&external_ids)?])?;
        while let Some(row) = rows.next()? {
            let position = usize::try_from(row.get::<_, i64>(0)?)
                .ok()
                .and_then(|key| positions.get(key))
                .ok_or_else(|| StoreError::Corrupt("json_each returned an unknown key".into()))?;
            found[*position] = Some(existing_from_row(row, 1)?);
        }
    }
    Ok(found)
}

/// Reads one stored deal; for records whose deal an earlier record of the same batch
/// may already have written.
fn find_existing(tx: &Transaction<'_>, upsert: &DealUpsert) -> Result<Option<Existing>> {
    let mut statement = tx.prepare_cached(
        "SELECT id, pipeline, stage, native_stage, contact_email, content_hash,
            source_updated_at, stage_entered_at, status
         FROM deals WHERE connection = ?1 AND external_id = ?2",
    )?;
    Ok(statement
        .query_row(
            params![
                upsert.connection.as_str(),
                upsert.source.external_id.as_str()
            ],
            |row| existing_from_row(row, 0),
        )
        .optional()?)
}

/// Whether the deal's current stage is where a follow-up moved it (its last history
/// row has cause `followup`).
fn moved_by_followup(tx: &Transaction<'_>, deal_id: i64) -> Result<bool> {
    let cause: Option<String> = tx
        .prepare_cached(
            "SELECT cause FROM stage_history WHERE deal_id = ?1 ORDER BY at DESC, id DESC LIMIT 1",
        )?
        .query_row([deal_id], |row| row.get(0))
        .optional()?;
    Ok(cause.as_deref() == Some(ChangeCause::Followup.as_str()))
}

/// Marks the records whose (connection, external id) occurs more than once in the
/// batch: sorted positions, equal neighbours.
fn repeated_keys(upserts: &[DealUpsert]) -> Vec<bool> {
    let key = |index: usize| {
        let upsert = &upserts[index];
        (
            upsert.connection.as_str(),
            upsert.source.external_id.as_str(),
        )
    };
    let mut order: Vec<usize> = (0..upserts.len()).collect();
    order.sort_unstable_by(|a, b| key(*a).cmp(&key(*b)));
    let mut repeated = vec![false; upserts.len()];
    for pair in order.windows(2) {
        if key(pair[0]) == key(pair[1]) {
            repeated[pair[0]] = true;
            repeated[pair[1]] = true;
        }
    }
    repeated
}

/// A stage-history row waiting for the batch's multi-row insert; its `to` side is
/// `upserts[upsert]`.
struct PendingHistory {
    upsert: usize,
    deal_id: i64,
    at: i64,
    from_pipeline: Option<String>,
    from_stage: Option<String>,
    native_from: Option<String>,
}

/// The stage an existing cart keeps when an incoming record would move it: `Some` when
/// the record is a cart, says "open", and the stored cart is in a different stage that
/// dealsync or an order put it in. A late checkout update after the purchase, or a
/// repeated "pending" after the cart was abandoned, so changes the cart's fields only.
pub(crate) fn held_stage(
    existing_status: &str,
    existing: &StageRef,
    upsert: &DealUpsert,
) -> Option<(StageRef, DealStatus)> {
    if upsert.source.cart_keys.is_empty() || upsert.status != DealStatus::Open {
        return None;
    }
    let status = DealStatus::parse(existing_status)?;
    if !matches!(
        status,
        DealStatus::Open | DealStatus::Won | DealStatus::Lost
    ) {
        return None;
    }
    if existing == &upsert.target {
        return None;
    }
    Some((existing.clone(), status))
}

/// Inserts or updates each record; appends one history row per canonical stage change.
///
/// The batch's stored deals are read up front in one statement (a record whose
/// external id occurs earlier in the same batch is read again, after that earlier
/// write); history rows are written at the end in multi-row inserts, in record order.
/// All of it runs in the caller's transaction.
pub(crate) fn upsert_all(tx: &Transaction<'_>, upserts: Vec<DealUpsert>) -> Result<UpsertOutcome> {
    let mut outcome = UpsertOutcome::default();
    let mut stored = load_existing(tx, &upserts)?;
    let repeated = repeated_keys(&upserts);
    let mut history = Vec::with_capacity(upserts.len());
    // Prepared once for the batch: `prepare_cached` hashes the SQL text on every call.
    let mut insert_statement = tx.prepare_cached(INSERT_DEAL_SQL)?;
    let mut update_statements: [Option<rusqlite::CachedStatement<'_>>; 4] = Default::default();
    for index in 0..upserts.len() {
        let upsert = &upserts[index];
        let source = &upsert.source;
        let existing = if repeated[index] {
            find_existing(tx, upsert)?
        } else {
            stored[index].take()
        };
        // A cart keeps the stage dealsync or an order moved it to (see `held_stage`). Only
        // records with cart keys can be held; the check skips building the stored stage
        // for every other record.
        let held = existing
            .as_ref()
            .filter(|_| !source.cart_keys.is_empty())
            .and_then(|existing| {
                let stored_stage = StageRef {
                    pipeline: existing.pipeline.clone().map(PipelineKey::new),
                    stage: StageKey::new(existing.stage.clone()),
                };
                held_stage(&existing.status, &stored_stage, upsert).map(|(target, status)| {
                    DealUpsert {
                        target,
                        status,
                        ..upsert.clone()
                    }
                })
            });
        // A won deal a follow-up moved on (to post-sale) stays there while its source
        // still says won. Only such records need the extra read.
        let held = match (&held, &existing) {
            (None, Some(existing))
                if source.cart_keys.is_empty()
                    && upsert.status == DealStatus::Won
                    && existing.status == DealStatus::Won.as_str()
                    && existing.pipeline.as_deref()
                        == upsert.target.pipeline.as_ref().map(|p| p.as_str())
                    && existing.stage != upsert.target.stage.as_str()
                    && moved_by_followup(tx, existing.id)? =>
            {
                Some(DealUpsert {
                    target: StageRef {
                        pipeline: existing.pipeline.clone().map(PipelineKey::new),
                        stage: StageKey::new(existing.stage.clone()),
                    },
                    ..upsert.clone()
                })
            }
            _ => held,
        };
        let upsert = held.as_ref().unwrap_or(upsert);
        let status = if source.deleted {
            DealStatus::Deleted
        } else {
            upsert.status
        };
        let text = DealText::of(source).map_err(|error| StoreError::Corrupt(error.to_string()))?;
        let hash = hashing::content_hash(source, &text, &upsert.target, upsert.status);
        if upsert.target.is_unmapped() {
            outcome.unmapped += 1;
        }
        let observed = to_ms(upsert.observed_at);
        let changed_at = source
            .stage_changed_at
            .map(to_ms)
            .or(source.updated_at.map(to_ms))
            .unwrap_or(observed);
        match existing {
            None => {
                let row = RowValues {
                    hash,
                    status,
                    entered_at: changed_at,
                    observed,
                    text: &text,
                };
                let id = insert(tx, &mut insert_statement, upsert, row)?;
                history.push(PendingHistory {
                    upsert: index,
                    deal_id: id,
                    at: changed_at,
                    from_pipeline: None,
                    from_stage: None,
                    native_from: None,
                });
                write_keys(tx, id, &source.cart_keys)?;
                outcome.created += 1;
                outcome.stage_changes += 1;
            }
            Some(existing) if existing.content_hash == hash => outcome.unchanged += 1,
            Some(existing)
                if matches!((existing.source_updated_at, source.updated_at),
                    (Some(stored), Some(incoming)) if to_ms(incoming) < stored) =>
            {
                outcome.stale += 1;
            }
            Some(existing) => {
                let stage_changed = existing.pipeline.as_deref()
                    != upsert.target.pipeline.as_ref().map(|p| p.as_str())
                    || existing.stage != upsert.target.stage.as_str();
                let entered_at = if stage_changed {
                    // A stage change can't predate the previous entry.
                    changed_at.max(existing.stage_entered_at)
                } else {
                    existing.stage_entered_at
                };
                let contact_changed = existing.contact_email.as_deref()
                    != source.contact_email.as_ref().map(|e| e.as_str());
                let row = RowValues {
                    hash,
                    status,
                    entered_at,
                    observed,
                    text: &text,
                };
                let shape = usize::from(stage_changed) * 2 + usize::from(contact_changed);
                let statement = match &mut update_statements[shape] {
                    Some(statement) => statement,
                    empty => empty.insert(tx.prepare_cached(UPDATE_DEAL_SQL[shape])?),
                };
                update(statement, existing.id, upsert, row)?;
                write_keys(tx, existing.id, &source.cart_keys)?;
                if stage_changed {
                    // A held cart never changes stage, so `upserts[index]` is the record
                    // whose target this row moves to.
                    history.push(PendingHistory {
                        upsert: index,
                        deal_id: existing.id,
                        at: entered_at,
                        from_pipeline: existing.pipeline,
                        from_stage: Some(existing.stage),
                        native_from: Some(existing.native_stage),
                    });
                    outcome.stage_changes += 1;
                }
                outcome.updated += 1;
            }
        }
    }
    insert_history(tx, &upserts, &history)?;
    Ok(outcome)
}

/// What an insert or update writes besides the record itself.
struct RowValues<'a> {
    hash: i64,
    status: DealStatus,
    entered_at: i64,
    observed: i64,
    text: &'a DealText<'a>,
}

const INSERT_DEAL_SQL: &str = "INSERT INTO deals (connection, external_id, title, amount_minor,
        currency, pipeline, stage, status, native_pipeline, native_stage, contact_email,
        contact_name, owner, owner_email, marketing_consent, source_created_at,
        source_updated_at, stage_entered_at, last_activity_at, expected_close, recovery_url,
        line_items, cart_keys, deleted_at, first_seen_at, synced_at, content_hash, raw,
        fingerprint)
     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18,
        ?19, ?20, ?21, ?22, ?23, ?24, ?25, ?25, ?26, ?27, ?28)";

fn insert(
    tx: &Transaction<'_>,
    statement: &mut rusqlite::CachedStatement<'_>,
    upsert: &DealUpsert,
    row: RowValues<'_>,
) -> Result<i64> {
    let RowValues {
        hash,
        status,
        entered_at,
        observed,
        text,
    } = row;
    let s = &upsert.source;
    statement.execute(params![
        upsert.connection.as_str(),
        s.external_id.as_str(),
        s.title,
        s.amount.map(|m| m.minor),
        s.amount.as_ref().map(|m| m.currency.as_str()),
        upsert.target.pipeline.as_ref().map(|p| p.as_str()),
        upsert.target.stage.as_str(),
        status.as_str(),
        s.native_pipeline,
        s.native_stage,
        s.contact_email.as_ref().map(|e| e.as_str()),
        s.contact_name,
        s.owner,
        s.owner_email.as_ref().map(|e| e.as_str()),
        s.marketing_consent,
        s.created_at.map(to_ms),
        s.updated_at.map(to_ms),
        entered_at,
        s.updated_at.map_or(observed, to_ms),
        text.expected_close,
        s.recovery_url,
        text.line_items,
        text.cart_keys,
        s.deleted.then_some(observed),
        observed,
        hash,
        text.raw,
        s.fingerprint,
    ])?;
    Ok(tx.last_insert_rowid())
}

/// The UPDATE of a stored deal, in four shapes: SQLite rewrites an index entry when an
/// indexed column is assigned, whether or not its value changes, so the stage columns
/// (`deals_by_stage`) and the contact (`deals_by_contact`) are only assigned when they
/// change. The parameter numbers are the same in every shape; ?27 is always used, so
/// each shape takes all 27.
macro_rules! update_deal_sql {
    ($($assign:literal),*) => {
        concat!(
            "UPDATE deals SET title = ?2, amount_minor = ?3, currency = ?4, status = ?5,
                native_pipeline = ?6, native_stage = ?7, contact_name = ?8, owner = ?9,
                owner_email = ?10, marketing_consent = ?11, source_created_at = ?12,
                source_updated_at = ?13, last_activity_at = ?14, expected_close = ?15,
                recovery_url = ?16, line_items = ?17, cart_keys = ?18,
                deleted_at = CASE WHEN ?19 THEN coalesce(deleted_at, ?20) END,
                synced_at = ?20, content_hash = ?21, fingerprint = ?27, ",
            $($assign,)*
            "raw = ?26 WHERE id = ?1"
        )
    };
}

/// The UPDATE shapes, indexed by `stage_changed * 2 + contact_changed`.
const UPDATE_DEAL_SQL: [&str; 4] = [
    update_deal_sql!(),
    update_deal_sql!("contact_email = ?25, "),
    update_deal_sql!("pipeline = ?22, stage = ?23, stage_entered_at = ?24, "),
    update_deal_sql!(
        "pipeline = ?22, stage = ?23, stage_entered_at = ?24, ",
        "contact_email = ?25, "
    ),
];

fn update(
    statement: &mut rusqlite::CachedStatement<'_>,
    id: i64,
    upsert: &DealUpsert,
    row: RowValues<'_>,
) -> Result<()> {
    let RowValues {
        hash,
        status,
        entered_at,
        observed,
        text,
    } = row;
    let s = &upsert.source;
    statement.execute(params![
        id,
        s.title,
        s.amount.map(|m| m.minor),
        s.amount.as_ref().map(|m| m.currency.as_str()),
        status.as_str(),
        s.native_pipeline,
        s.native_stage,
        s.contact_name,
        s.owner,
        s.owner_email.as_ref().map(|e| e.as_str()),
        s.marketing_consent,
        s.created_at.map(to_ms),
        s.updated_at.map(to_ms),
        s.updated_at.map_or(observed, to_ms),
        text.expected_close,
        s.recovery_url,
        text.line_items,
        text.cart_keys,
        s.deleted,
        observed,
        hash,
        upsert.target.pipeline.as_ref().map(|p| p.as_str()),
        upsert.target.stage.as_str(),
        entered_at,
        s.contact_email.as_ref().map(|e| e.as_str()),
        text.raw,
        s.fingerprint,
    ])?;
    Ok(())
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
fn insert_history(
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

pub(super) fn write_keys(tx: &Transaction<'_>, deal_id: i64, keys: &[String]) -> Result<()> {
    if keys.is_empty() {
        return Ok(());
    }
    let mut statement =
        tx.prepare_cached("INSERT OR IGNORE INTO deal_keys (key, deal_id) VALUES (?1, ?2)")?;
    for key in keys {
        statement.execute(params![key, deal_id])?;
    }
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

/// Filters for listing deals; `None` means any.
#[derive(Debug, Clone, Default)]
pub struct DealFilter {
    pub connection: Option<String>,
    pub pipeline: Option<String>,
    pub stage: Option<String>,
    pub status: Option<DealStatus>,
    pub limit: Option<u32>,
    pub offset: Option<u32>,
}

/// Deals per canonical stage and connection (for metrics and the report).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StageCount {
    pub connection: String,
    pub pipeline: Option<String>,
    pub stage: String,
    pub deals: u64,
}

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

pub(crate) const DEAL_COLUMNS: &str =
    "id, connection, external_id, title, amount_minor, currency, pipeline,
    stage, status, native_pipeline, native_stage, contact_email, contact_name, owner, owner_email,
    marketing_consent, source_created_at, source_updated_at, stage_entered_at, last_activity_at,
    expected_close, recovery_url, line_items, cart_keys, deleted_at, first_seen_at, raw";

/// Reads a deal row. A JSON column that does not parse (the raw record, the line
/// items, the cart keys) reads as empty (`null`, no items, no keys) with a warning,
/// so one damaged row never fails a list of deals.
pub(crate) fn deal_from_row(row: &Row<'_>) -> rusqlite::Result<Deal> {
    fn json_or_empty<T: serde::de::DeserializeOwned + Default>(
        text: String,
        deal_id: i64,
        column: &'static str,
    ) -> T {
        serde_json::from_str(&text).unwrap_or_else(|error| {
            tracing::warn!(deal_id, column, %error, "stored JSON is unreadable; read as empty");
            T::default()
        })
    }
    let deal_id: i64 = row.get(0)?;
    let currency: Option<String> = row.get(5)?;
    let status: String = row.get(8)?;
    let email = |value: Option<String>| value.and_then(|v| EmailAddress::parse(&v));
    Ok(Deal {
        id: deal_id,
        connection: ConnectionName::new(row.get::<_, String>(1)?),
        external_id: ExternalId::new(row.get::<_, String>(2)?),
        title: row.get(3)?,
        amount_minor: row.get(4)?,
        currency: currency.and_then(|c| Currency::parse(&c).ok()),
        pipeline: row.get::<_, Option<String>>(6)?.map(PipelineKey::new),
        stage: StageKey::new(row.get::<_, String>(7)?),
        status: DealStatus::parse(&status).unwrap_or(DealStatus::Unmapped),
        native_pipeline: row.get(9)?,
        native_stage: row.get(10)?,
        contact_email: email(row.get(11)?),
        contact_name: row.get(12)?,
        owner: row.get(13)?,
        owner_email: email(row.get(14)?),
        marketing_consent: row.get(15)?,
        created_at: row.get::<_, Option<i64>>(16)?.map(from_ms),
        updated_at: row.get::<_, Option<i64>>(17)?.map(from_ms),
        stage_entered_at: from_ms(row.get(18)?),
        last_activity_at: from_ms(row.get(19)?),
        expected_close: row
            .get::<_, Option<String>>(20)?
            .and_then(|d| d.parse().ok()),
        recovery_url: row.get(21)?,
        line_items: json_or_empty(row.get(22)?, deal_id, "line_items"),
        cart_keys: json_or_empty(row.get(23)?, deal_id, "cart_keys"),
        deleted_at: row.get::<_, Option<i64>>(24)?.map(from_ms),
        first_seen_at: from_ms(row.get(25)?),
        raw: json_or_empty(row.get(26)?, deal_id, "raw"),
    })
}

fn change_from_row(row: &Row<'_>) -> rusqlite::Result<StageChange> {
    let cause: String = row.get(8)?;
    Ok(StageChange {
        deal_id: row.get(0)?,
        at: from_ms(row.get(1)?),
        from_pipeline: row.get::<_, Option<String>>(2)?.map(PipelineKey::new),
        from_stage: row.get::<_, Option<String>>(3)?.map(StageKey::new),
        to_pipeline: row.get::<_, Option<String>>(4)?.map(PipelineKey::new),
        to_stage: StageKey::new(row.get::<_, String>(5)?),
        native_from: row.get(6)?,
        native_to: row.get(7)?,
        cause: match cause.as_str() {
            "webhook" => ChangeCause::Webhook,
            "followup" => ChangeCause::Followup,
            "mapping" => ChangeCause::Mapping,
            _ => ChangeCause::Poll,
        },
    })
}

impl Store {
    /// Upserts records outside a sync run (webhooks, tests); one transaction.
    pub async fn upsert_deals(&self, upserts: Vec<DealUpsert>) -> Result<UpsertOutcome> {
        self.write(move |tx| upsert_all(tx, upserts)).await
    }

    /// Moves a deal to a stage on dealsync's own account, with its history row.
    pub async fn move_deal(
        &self,
        deal_id: i64,
        to: StageRef,
        status: DealStatus,
        at: DateTime<Utc>,
        cause: ChangeCause,
    ) -> Result<bool> {
        self.write(move |tx| move_stage(tx, deal_id, &to, status, at, cause))
            .await
    }

    pub async fn deal(&self, id: i64) -> Result<Option<Deal>> {
        self.read(move |db| {
            let sql = format!("SELECT {DEAL_COLUMNS} FROM deals WHERE id = ?1");
            Ok(db.query_row(&sql, [id], deal_from_row).optional()?)
        })
        .await
    }

    pub async fn deal_by_external_id(
        &self,
        connection: &str,
        external_id: &str,
    ) -> Result<Option<Deal>> {
        let (connection, external_id) = (connection.to_owned(), external_id.to_owned());
        self.read(move |db| {
            let sql = format!(
                "SELECT {DEAL_COLUMNS} FROM deals WHERE connection = ?1 AND external_id = ?2"
            );
            Ok(db
                .query_row(&sql, params![connection, external_id], deal_from_row)
                .optional()?)
        })
        .await
    }

    /// Of `candidates` (external id, [`fingerprint`](crate::domain::hashing::fingerprint)),
    /// those whose stored deal was written from a record with that same fingerprint, is
    /// not deleted and has a contact email: an incremental read that meets one again
    /// (its lookback overlap) has nothing new to ask the vendor about it. A deal without
    /// a contact is left out on purpose: its contact may have been linked after it was
    /// written, and a CRM need not move the deal's modification time for that.
    pub async fn unchanged_records(
        &self,
        connection: &str,
        candidates: Vec<(String, i64)>,
    ) -> Result<std::collections::HashSet<(String, i64)>> {
        let connection = connection.to_owned();
        self.read(move |db| {
            // Walks the candidates and looks each up on the unique (connection,
            // external_id) index; `CROSS JOIN` keeps that order.
            let mut statement = db.prepare_cached(
                "SELECT d.external_id, d.fingerprint FROM json_each(?2) AS j CROSS JOIN deals AS d
                 WHERE d.connection = ?1 AND d.external_id = j.value ->> 0
                   AND d.fingerprint = j.value ->> 1
                   AND d.deleted_at IS NULL AND d.contact_email IS NOT NULL",
            )?;
            let rows = statement.query_map(params![connection, json(&candidates)?], |row| {
                Ok((row.get(0)?, row.get(1)?))
            })?;
            Ok(rows.collect::<rusqlite::Result<_>>()?)
        })
        .await
    }

    /// Deals matching the filter, newest activity first.
    pub async fn deals(&self, filter: DealFilter) -> Result<Vec<Deal>> {
        self.read(move |db| {
            let mut sql = format!("SELECT {DEAL_COLUMNS} FROM deals WHERE 1 = 1");
            let mut values: Vec<String> = Vec::new();
            for (column, value) in [
                ("connection", filter.connection),
                ("pipeline", filter.pipeline),
                ("stage", filter.stage),
                ("status", filter.status.map(|s| s.as_str().to_owned())),
            ] {
                if let Some(value) = value {
                    values.push(value);
                    sql.push_str(&format!(" AND {column} = ?{}", values.len()));
                }
            }
            sql.push_str(" ORDER BY last_activity_at DESC, id DESC");
            sql.push_str(&format!(
                " LIMIT {} OFFSET {}",
                filter.limit.map_or(-1, i64::from),
                filter.offset.unwrap_or(0)
            ));
            let mut statement = db.prepare(&sql)?;
            let rows = statement.query_map(rusqlite::params_from_iter(values), deal_from_row)?;
            Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
        })
        .await
    }

    /// A deal's stage history, oldest first.
    pub async fn history(&self, deal_id: i64) -> Result<Vec<StageChange>> {
        self.read(move |db| {
            let mut statement = db.prepare(
                "SELECT deal_id, at, from_pipeline, from_stage, to_pipeline, to_stage, native_from,
                    native_to, cause FROM stage_history WHERE deal_id = ?1 ORDER BY at, id",
            )?;
            let rows = statement.query_map([deal_id], change_from_row)?;
            Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
        })
        .await
    }

    /// Counts of live deals per connection and canonical stage.
    pub async fn stage_counts(&self) -> Result<Vec<StageCount>> {
        self.read(|db| {
            let mut statement = db.prepare(
                "SELECT connection, pipeline, stage, count(*) FROM deals
                 WHERE deleted_at IS NULL GROUP BY connection, pipeline, stage
                 ORDER BY connection, pipeline, stage",
            )?;
            let rows = statement.query_map([], |row| {
                Ok(StageCount {
                    connection: row.get(0)?,
                    pipeline: row.get(1)?,
                    stage: row.get(2)?,
                    deals: row.get::<_, i64>(3)? as u64,
                })
            })?;
            Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
        })
        .await
    }

    /// The live deals of `connection` grouped by native stage and the canonical stage
    /// each group sits in now.
    pub async fn native_stage_groups(&self, connection: &str) -> Result<Vec<NativeStageGroup>> {
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
            tx.execute(
                "INSERT INTO sync_cursors (connection, stream, value, updated_at)
                 VALUES (?1, ?2, ?3, ?4)
                 ON CONFLICT (connection, stream) DO UPDATE
                   SET value = excluded.value, updated_at = excluded.updated_at",
                params![
                    connection,
                    APPLIED_MAP_STREAM,
                    json(&applied)?,
                    to_ms(Utc::now())
                ],
            )?;
            Ok(counts)
        })
        .await
    }

    /// The native stages of deals kept as unmapped, with how many: of one connection,
    /// or of all with `None`.
    pub async fn unmapped_stages(&self, connection: Option<&str>) -> Result<Vec<UnmappedStage>> {
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
pub(crate) mod tests {
    use super::*;
    use crate::domain::hashing::fingerprint;
    use crate::domain::{Money, UNMAPPED};
    use crate::store::tests::temp_store;
    use chrono::Duration;

    #[test]
    fn outcomes_add_up_field_by_field() {
        let mut total = UpsertOutcome {
            created: 1,
            updated: 2,
            unchanged: 3,
            stale: 4,
            stage_changes: 5,
            unmapped: 6,
        };
        total.add(UpsertOutcome {
            created: 10,
            updated: 20,
            unchanged: 30,
            stale: 40,
            stage_changes: 50,
            unmapped: 60,
        });
        let expected = UpsertOutcome {
            created: 11,
            updated: 22,
            unchanged: 33,
            stale: 44,
            stage_changes: 55,
            unmapped: 66,
        };
        assert_eq!(total, expected);
    }

    /// Deal `id` of connection `crm` in `sales.<stage>` (`mystery` is unmapped), 4,200.50 EUR.
    pub(crate) fn upsert(id: &str, stage: &str, at: DateTime<Utc>) -> DealUpsert {
        let mut source = SourceDeal::new(id, format!("Deal {id}"), "default", stage);
        source.amount = Some(Money::new(420050, Currency::parse("EUR").unwrap()));
        source.updated_at = Some(at);
        DealUpsert {
            connection: ConnectionName::new("crm"),
            target: if stage == "mystery" {
                StageRef::unmapped()
            } else {
                StageRef {
                    pipeline: Some(PipelineKey::new("sales")),
                    stage: StageKey::new(stage),
                }
            },
            status: if stage == "mystery" {
                DealStatus::Unmapped
            } else {
                DealStatus::Open
            },
            source,
            observed_at: at,
            cause: ChangeCause::Poll,
        }
    }

    #[tokio::test]
    async fn a_record_is_recognised_unchanged_only_by_its_fingerprint_with_a_contact_and_not_deleted()
     {
        let (_dir, store) = temp_store();
        let now = Utc::now();
        let fingerprinted = |id: &str, contact: Option<&str>, deleted: bool| {
            let mut record = upsert(id, "proposal", now);
            record.source.contact_email = contact.and_then(EmailAddress::parse);
            record.source.deleted = deleted;
            let keys = [Some("person 7")];
            record.source.fingerprint = Some(fingerprint(&record.source, &keys));
            record
        };
        let stored = vec![
            fingerprinted("1", Some("ada@acme.example"), false),
            fingerprinted("2", None, false),
            fingerprinted("3", Some("ada@acme.example"), true),
            upsert("4", "proposal", now),
        ];
        let prints: Vec<i64> = stored
            .iter()
            .map(|record| record.source.fingerprint.unwrap_or(0))
            .collect();
        store.upsert_deals(stored).await.unwrap();
        let candidates = vec![
            ("1".to_owned(), prints[0]),
            ("1".to_owned(), prints[0] ^ 1),
            ("2".to_owned(), prints[1]),
            ("3".to_owned(), prints[2]),
            ("4".to_owned(), 0),
            ("5".to_owned(), prints[0]),
        ];
        let unchanged = store.unchanged_records("crm", candidates).await.unwrap();
        assert_eq!(
            unchanged,
            [("1".to_owned(), prints[0])].into_iter().collect(),
            "only 1: 2 has no contact, 3 is deleted, 4 has no fingerprint, 5 is not stored"
        );
        assert!(
            store
                .unchanged_records("other", vec![("1".to_owned(), prints[0])])
                .await
                .unwrap()
                .is_empty(),
            "another connection's deal is another deal"
        );

        // The fingerprint leaves the raw text out and takes the lookup keys in.
        let mut record = upsert("1", "proposal", now).source;
        let plain = fingerprint(&record, &[Some("person 7")]);
        record.raw = crate::domain::RawRecord::from_text(r#"{"id":"1"}"#.into()).unwrap();
        assert_eq!(fingerprint(&record, &[Some("person 7")]), plain);
        assert_ne!(fingerprint(&record, &[Some("person 8")]), plain);
        assert_ne!(fingerprint(&record, &[None]), plain);
        record.title.push('!');
        assert_ne!(fingerprint(&record, &[Some("person 7")]), plain);
    }

    #[tokio::test]
    async fn upserting_the_same_record_twice_changes_nothing() {
        let (_dir, store) = temp_store();
        let now = Utc::now();
        let first = store
            .upsert_deals(vec![upsert("1", "proposal", now)])
            .await
            .unwrap();
        assert_eq!((first.created, first.stage_changes), (1, 1));
        let second = store
            .upsert_deals(vec![upsert("1", "proposal", now)])
            .await
            .unwrap();
        assert_eq!(
            second,
            UpsertOutcome {
                unchanged: 1,
                ..Default::default()
            }
        );
        let deal = store
            .deal_by_external_id("crm", "1")
            .await
            .unwrap()
            .unwrap();
        assert_eq!(deal.amount_minor, Some(420050));
        assert_eq!(store.history(deal.id).await.unwrap().len(), 1);
        assert_eq!(store.deals(DealFilter::default()).await.unwrap().len(), 1);
    }

    #[tokio::test]
    async fn a_stage_change_appends_exactly_one_history_row() {
        let (_dir, store) = temp_store();
        let t0 = Utc::now() - Duration::hours(2);
        store
            .upsert_deals(vec![upsert("1", "proposal", t0)])
            .await
            .unwrap();
        let mut renamed = upsert("1", "proposal", t0 + Duration::minutes(5));
        renamed.source.title = "Renamed".into();
        let outcome = store.upsert_deals(vec![renamed]).await.unwrap();
        assert_eq!((outcome.updated, outcome.stage_changes), (1, 0));
        let t1 = t0 + Duration::hours(1);
        let outcome = store
            .upsert_deals(vec![upsert("1", "negotiation", t1)])
            .await
            .unwrap();
        assert_eq!((outcome.updated, outcome.stage_changes), (1, 1));

        let deal = store
            .deal_by_external_id("crm", "1")
            .await
            .unwrap()
            .unwrap();
        let history = store.history(deal.id).await.unwrap();
        assert_eq!(history.len(), 2);
        assert_eq!(history[1].from_stage.as_ref().unwrap().as_str(), "proposal");
        assert_eq!(history[1].to_stage.as_str(), "negotiation");
        assert_eq!(history[1].at.timestamp_millis(), t1.timestamp_millis());
        assert_eq!(
            deal.stage_entered_at.timestamp_millis(),
            t1.timestamp_millis()
        );
    }

    #[tokio::test]
    async fn a_deal_twice_in_one_batch_is_created_then_moved_with_two_history_rows() {
        let (_dir, store) = temp_store();
        let t0 = Utc::now() - Duration::hours(1);
        let t1 = t0 + Duration::minutes(10);
        let outcome = store
            .upsert_deals(vec![
                upsert("1", "proposal", t0),
                upsert("2", "proposal", t0),
                upsert("1", "negotiation", t1),
                upsert("1", "negotiation", t1),
            ])
            .await
            .unwrap();
        assert_eq!(
            outcome,
            UpsertOutcome {
                created: 2,
                updated: 1,
                unchanged: 1,
                stage_changes: 3,
                ..Default::default()
            }
        );
        let deal = store
            .deal_by_external_id("crm", "1")
            .await
            .unwrap()
            .unwrap();
        assert_eq!(deal.stage.as_str(), "negotiation");
        let history = store.history(deal.id).await.unwrap();
        let stages: Vec<_> = history
            .iter()
            .map(|change| {
                (
                    change.from_stage.as_ref().map(|s| s.as_str().to_owned()),
                    change.to_stage.as_str().to_owned(),
                )
            })
            .collect();
        assert_eq!(
            stages,
            vec![
                (None, "proposal".to_owned()),
                (Some("proposal".to_owned()), "negotiation".to_owned())
            ]
        );
        assert_eq!(store.deals(DealFilter::default()).await.unwrap().len(), 2);
    }

    #[tokio::test]
    async fn a_large_batch_writes_exactly_one_history_row_per_change_to_the_right_deal() {
        let (_dir, store) = temp_store();
        let t0 = Utc::now() - Duration::hours(1);
        // 70 records: two full multi-row history inserts and a remainder of six.
        let batch = |stage: &str, at| (0..70).map(|n| upsert(&n.to_string(), stage, at)).collect();
        let created = store.upsert_deals(batch("proposal", t0)).await.unwrap();
        assert_eq!((created.created, created.stage_changes), (70, 70));
        let moved = store
            .upsert_deals(batch("negotiation", t0 + Duration::minutes(1)))
            .await
            .unwrap();
        assert_eq!((moved.updated, moved.stage_changes), (70, 70));
        for n in [0, 31, 32, 63, 64, 69] {
            let deal = store
                .deal_by_external_id("crm", &n.to_string())
                .await
                .unwrap()
                .unwrap();
            let history = store.history(deal.id).await.unwrap();
            assert_eq!(history.len(), 2, "deal {n}");
            assert!(history.iter().all(|change| change.deal_id == deal.id));
            assert_eq!(history[1].to_stage.as_str(), "negotiation");
            assert_eq!(history[1].native_from.as_deref(), Some("proposal"));
        }
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
            let (_dir, store) = temp_store();
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
                let deal = store
                    .deal_by_external_id("crm", &n.to_string())
                    .await
                    .unwrap()
                    .unwrap();
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
        }
    }

    #[tokio::test]
    async fn an_update_that_changes_only_the_contact_stores_it_without_a_stage_change() {
        let (_dir, store) = temp_store();
        let t0 = Utc::now() - Duration::hours(1);
        store
            .upsert_deals(vec![upsert("1", "proposal", t0)])
            .await
            .unwrap();
        let mut changed = upsert("1", "proposal", t0 + Duration::minutes(1));
        changed.source.contact_email = EmailAddress::parse("new@example.com");
        let outcome = store.upsert_deals(vec![changed]).await.unwrap();
        assert_eq!((outcome.updated, outcome.stage_changes), (1, 0));
        let deal = store
            .deal_by_external_id("crm", "1")
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            deal.contact_email.as_ref().map(|e| e.as_str()),
            Some("new@example.com")
        );
        assert_eq!(deal.stage.as_str(), "proposal");
        assert_eq!(
            deal.stage_entered_at.timestamp_millis(),
            t0.timestamp_millis()
        );
        assert_eq!(store.history(deal.id).await.unwrap().len(), 1);
    }

    #[tokio::test]
    async fn an_older_record_does_not_overwrite_a_newer_one() {
        let (_dir, store) = temp_store();
        let t1 = Utc::now();
        store
            .upsert_deals(vec![upsert("1", "negotiation", t1)])
            .await
            .unwrap();
        let outcome = store
            .upsert_deals(vec![upsert("1", "proposal", t1 - Duration::minutes(1))])
            .await
            .unwrap();
        assert_eq!(outcome.stale, 1);
        let deal = store
            .deal_by_external_id("crm", "1")
            .await
            .unwrap()
            .unwrap();
        assert_eq!(deal.stage.as_str(), "negotiation");
    }

    #[tokio::test]
    async fn an_unmapped_stage_is_kept_and_reported() {
        let (_dir, store) = temp_store();
        let outcome = store
            .upsert_deals(vec![upsert("1", "mystery", Utc::now())])
            .await
            .unwrap();
        assert_eq!(outcome.unmapped, 1);
        let deal = store
            .deal_by_external_id("crm", "1")
            .await
            .unwrap()
            .unwrap();
        assert_eq!(deal.stage.as_str(), UNMAPPED);
        assert_eq!(deal.status, DealStatus::Unmapped);
        let unmapped = store.unmapped_stages(None).await.unwrap();
        assert_eq!(unmapped.len(), 1);
        assert_eq!(unmapped[0].native_stage, "mystery");
    }

    fn with_raw(mut upsert: DealUpsert, text: &str) -> DealUpsert {
        upsert.source.raw = crate::domain::RawRecord::from_text(text.to_owned()).unwrap();
        upsert
    }

    /// The stored `raw` column, as text.
    async fn stored_raw(store: &Store, external_id: &str) -> String {
        let external_id = external_id.to_owned();
        store
            .read(move |db| {
                Ok(db.query_row(
                    "SELECT raw FROM deals WHERE external_id = ?1",
                    [external_id],
                    |row| row.get(0),
                )?)
            })
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn the_stored_raw_record_is_the_sources_text_byte_for_byte() {
        let (_dir, store) = temp_store();
        let text = r#"{ "id" : "1", "z": 1, "a": "caf\u00e9 \"quoted\"", "n": 1.50 }"#;
        store
            .upsert_deals(vec![with_raw(upsert("1", "proposal", Utc::now()), text)])
            .await
            .unwrap();
        assert_eq!(stored_raw(&store, "1").await, text);
        let deal = store
            .deal_by_external_id("crm", "1")
            .await
            .unwrap()
            .unwrap();
        assert_eq!(deal.raw["a"], "café \"quoted\"");
    }

    #[tokio::test]
    async fn a_record_is_rewritten_when_its_raw_text_or_a_mapped_field_changes_and_not_otherwise() {
        let (_dir, store) = temp_store();
        let at = Utc::now() - Duration::hours(1);
        let text = r#"{"id":"1","properties":{"dealname":"Deal 1"}}"#;
        let base = || with_raw(upsert("1", "proposal", at), text);
        let write = |record: DealUpsert| {
            let store = store.clone();
            async move { store.upsert_deals(vec![record]).await.unwrap() }
        };
        assert_eq!(write(base()).await.created, 1);
        assert_eq!(write(base()).await.unchanged, 1, "the same text and fields");

        // Only the raw text changes (a property the mapping does not read).
        let other_text = r#"{"id":"1","properties":{"dealname":"Deal 1","extra":"x"}}"#;
        let outcome = write(with_raw(upsert("1", "proposal", at), other_text)).await;
        assert_eq!((outcome.updated, outcome.stage_changes), (1, 0));
        assert_eq!(stored_raw(&store, "1").await, other_text);
        // Back to the first text: a change again, then nothing.
        assert_eq!(write(base()).await.updated, 1);
        assert_eq!(write(base()).await.unchanged, 1);

        // Only a mapped field changes (an enrichment's contact email), not the text.
        let mut contact = base();
        contact.source.contact_email = EmailAddress::parse("new@example.com");
        assert_eq!(write(contact.clone()).await.updated, 1);
        assert_eq!(write(contact).await.unchanged, 1);
        let deal = store
            .deal_by_external_id("crm", "1")
            .await
            .unwrap()
            .unwrap();
        assert_eq!(deal.contact_email.unwrap().as_str(), "new@example.com");
        assert_eq!(stored_raw(&store, "1").await, text);
    }

    #[tokio::test]
    async fn moving_a_deal_records_history_once() {
        let (_dir, store) = temp_store();
        store
            .upsert_deals(vec![upsert("1", "proposal", Utc::now())])
            .await
            .unwrap();
        let deal = store
            .deal_by_external_id("crm", "1")
            .await
            .unwrap()
            .unwrap();
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
    }

    /// `upsert` with the source saying `status` and the canonical stage `sales.<stage>`.
    fn with_status(mut record: DealUpsert, status: DealStatus) -> DealUpsert {
        record.status = status;
        record
    }

    fn sales(stage: &str) -> StageRef {
        StageRef {
            pipeline: Some(PipelineKey::new("sales")),
            stage: StageKey::new(stage),
        }
    }

    async fn stage_and_status(store: &Store, connection: &str, id: &str) -> (String, DealStatus) {
        let deal = store
            .deal_by_external_id(connection, id)
            .await
            .unwrap()
            .unwrap();
        (deal.stage.as_str().to_owned(), deal.status)
    }

    /// A won deal in `sales.won` that the post-sale follow-up then moved to
    /// `sales.post_sale`; returns its id.
    async fn won_then_moved_to_post_sale(store: &Store, t0: DateTime<Utc>) -> i64 {
        store
            .upsert_deals(vec![with_status(upsert("1", "won", t0), DealStatus::Won)])
            .await
            .unwrap();
        let deal = store
            .deal_by_external_id("crm", "1")
            .await
            .unwrap()
            .unwrap();
        let moved = store
            .move_deal(
                deal.id,
                sales("post_sale"),
                DealStatus::Won,
                t0 + Duration::minutes(1),
                ChangeCause::Followup,
            )
            .await
            .unwrap();
        assert!(moved);
        deal.id
    }

    #[tokio::test]
    async fn a_won_deal_a_followup_moved_on_stays_there_while_the_source_still_says_won() {
        let (_dir, store) = temp_store();
        let t0 = Utc::now() - Duration::hours(1);
        let id = won_then_moved_to_post_sale(&store, t0).await;

        // The next sync still reads the deal as won in the source's won stage, and
        // something else about it changed (so the record is rewritten).
        let mut again = with_status(
            upsert("1", "won", t0 + Duration::minutes(5)),
            DealStatus::Won,
        );
        again.source.title = "Deal 1 (invoiced)".into();
        let outcome = store.upsert_deals(vec![again]).await.unwrap();
        assert_eq!((outcome.updated, outcome.stage_changes), (1, 0));
        assert_eq!(
            stage_and_status(&store, "crm", "1").await,
            ("post_sale".to_owned(), DealStatus::Won)
        );
        let deal = store
            .deal_by_external_id("crm", "1")
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            deal.title, "Deal 1 (invoiced)",
            "the rest of the record is written"
        );
        assert_eq!(
            store.history(id).await.unwrap().len(),
            2,
            "no move back to won is recorded"
        );
    }

    #[tokio::test]
    async fn a_won_deal_moved_by_the_source_itself_follows_the_source() {
        let (_dir, store) = temp_store();
        let t0 = Utc::now() - Duration::hours(1);
        // Someone moves the won deal to post-sale in the CRM, and later back.
        for (stage, minutes) in [("won", 0), ("post_sale", 5), ("won", 10)] {
            store
                .upsert_deals(vec![with_status(
                    upsert("1", stage, t0 + Duration::minutes(minutes)),
                    DealStatus::Won,
                )])
                .await
                .unwrap();
            assert_eq!(
                stage_and_status(&store, "crm", "1").await,
                (stage.to_owned(), DealStatus::Won),
                "only a follow-up's move is held"
            );
        }
    }

    #[tokio::test]
    async fn a_deal_a_followup_moved_on_follows_the_source_once_the_source_no_longer_says_won() {
        let (_dir, store) = temp_store();
        let t0 = Utc::now() - Duration::hours(1);
        let id = won_then_moved_to_post_sale(&store, t0).await;

        let lost = with_status(
            upsert("1", "lost", t0 + Duration::minutes(5)),
            DealStatus::Lost,
        );
        let outcome = store.upsert_deals(vec![lost]).await.unwrap();
        assert_eq!((outcome.updated, outcome.stage_changes), (1, 1));
        assert_eq!(
            stage_and_status(&store, "crm", "1").await,
            ("lost".to_owned(), DealStatus::Lost)
        );
        let history = store.history(id).await.unwrap();
        assert_eq!(history.len(), 3);
        assert_eq!(
            history[2].from_stage.as_ref().unwrap().as_str(),
            "post_sale"
        );
        assert_eq!(history[2].to_stage.as_str(), "lost");
    }

    #[tokio::test]
    async fn a_stage_change_reported_before_the_current_entry_is_dated_at_that_entry() {
        let (_dir, store) = temp_store();
        let entered = Utc::now() - Duration::hours(6);
        // Entered proposal at `entered`, edited two hours later.
        let mut first = upsert("1", "proposal", entered + Duration::hours(2));
        first.source.stage_changed_at = Some(entered);
        store.upsert_deals(vec![first]).await.unwrap();
        // The source then reports a move whose stage-change time is earlier than that
        // entry (a skewed clock), in a record edited later still.
        let mut moved = upsert("1", "negotiation", entered + Duration::hours(3));
        moved.source.stage_changed_at = Some(entered - Duration::hours(1));
        let outcome = store.upsert_deals(vec![moved]).await.unwrap();
        assert_eq!(outcome.stage_changes, 1);

        let deal = store
            .deal_by_external_id("crm", "1")
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            deal.stage_entered_at.timestamp_millis(),
            entered.timestamp_millis(),
            "a stage change can't predate the previous entry, and no later time is made up"
        );
        let history = store.history(deal.id).await.unwrap();
        assert_eq!(history.len(), 2);
        assert_eq!(history[1].at.timestamp_millis(), entered.timestamp_millis());
    }

    #[tokio::test]
    async fn an_update_that_moves_the_deal_and_changes_its_contact_stores_both() {
        let (_dir, store) = temp_store();
        let t0 = Utc::now() - Duration::hours(1);
        let mut first = upsert("1", "proposal", t0);
        first.source.contact_email = EmailAddress::parse("ada@acme.example");
        store.upsert_deals(vec![first]).await.unwrap();
        let mut moved = upsert("1", "negotiation", t0 + Duration::minutes(5));
        moved.source.contact_email = EmailAddress::parse("grace@acme.example");
        let outcome = store.upsert_deals(vec![moved]).await.unwrap();
        assert_eq!((outcome.updated, outcome.stage_changes), (1, 1));
        let deal = store
            .deal_by_external_id("crm", "1")
            .await
            .unwrap()
            .unwrap();
        assert_eq!(deal.stage.as_str(), "negotiation");
        assert_eq!(
            deal.contact_email.as_ref().map(|e| e.as_str()),
            Some("grace@acme.example")
        );
    }

    #[tokio::test]
    async fn each_history_row_reads_back_with_the_cause_it_was_written_with() {
        let (_dir, store) = temp_store();
        let t0 = Utc::now() - Duration::hours(1);
        let mut created = upsert("1", "proposal", t0);
        created.cause = ChangeCause::Webhook;
        store.upsert_deals(vec![created]).await.unwrap();
        let id = store
            .deal_by_external_id("crm", "1")
            .await
            .unwrap()
            .unwrap()
            .id;
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
    }

    #[tokio::test]
    async fn a_changed_stage_map_moves_the_live_deals_where_the_old_mapping_put_them_and_records_the_map()
     {
        let (_dir, store) = temp_store();
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
            let deal = store.deal_by_external_id("crm", id).await.unwrap().unwrap();
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
    }

    #[tokio::test]
    async fn a_batch_mixing_two_connections_updates_each_connections_own_deals() {
        let (_dir, store) = temp_store();
        let t0 = Utc::now() - Duration::hours(1);
        // Two CRMs that both number their deals from 1.
        let of = |connection: &str, stage: &str, at: DateTime<Utc>| {
            let mut record = upsert("1", stage, at);
            record.connection = ConnectionName::new(connection);
            record
        };
        store
            .upsert_deals(vec![of("crm", "proposal", t0), of("shop", "proposal", t0)])
            .await
            .unwrap();
        let t1 = t0 + Duration::minutes(5);
        let outcome = store
            .upsert_deals(vec![of("crm", "negotiation", t1), of("shop", "won", t1)])
            .await
            .unwrap();
        assert_eq!(
            (outcome.created, outcome.updated, outcome.stage_changes),
            (0, 2, 2)
        );
        assert_eq!(stage_and_status(&store, "crm", "1").await.0, "negotiation");
        assert_eq!(stage_and_status(&store, "shop", "1").await.0, "won");
    }
}
