//! Deals and their stage history.

use super::{Result, Store, StoreError, from_ms, to_ms};
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

/// FNV-1a, fed by serde_json without an intermediate buffer.
struct Fnv(u64);

impl std::io::Write for Fnv {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        for byte in bytes {
            self.0 ^= u64::from(*byte);
            self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
        }
        Ok(bytes.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A hash of the record's JSON (its raw record given already serialized, taken out of
/// `upsert.source`) and its mapped stage: stable across runs and versions.
fn content_hash(upsert: &DealUpsert, raw_text: &str) -> Result<i64> {
    use std::io::Write;
    let mut hash = Fnv(0xcbf2_9ce4_8422_2325);
    serde_json::to_writer(&mut hash, &upsert.source)
        .map_err(|error| StoreError::Corrupt(format!("serializing a deal: {error}")))?;
    let _ = hash.write(raw_text.as_bytes());
    let pipeline = upsert.target.pipeline.as_ref().map_or("", |p| p.as_str());
    let _ = write!(hash, "\0{pipeline}\0{}", upsert.target.stage.as_str());
    Ok(hash.0 as i64)
}

fn json<T: Serialize>(value: &T) -> Result<String> {
    serde_json::to_string(value).map_err(|error| StoreError::Corrupt(error.to_string()))
}

/// A JSON list, without an allocation for the common empty one.
fn json_list<T: Serialize>(items: &[T]) -> Result<std::borrow::Cow<'static, str>> {
    if items.is_empty() {
        Ok(std::borrow::Cow::Borrowed("[]"))
    } else {
        json(&items).map(std::borrow::Cow::Owned)
    }
}

struct Existing {
    id: i64,
    pipeline: Option<String>,
    stage: String,
    native_stage: String,
    content_hash: i64,
    source_updated_at: Option<i64>,
    stage_entered_at: i64,
    status: String,
}

/// Inserts or updates each record; appends one history row per canonical stage change.
pub(crate) fn upsert_all(tx: &Transaction<'_>, upserts: Vec<DealUpsert>) -> Result<UpsertOutcome> {
    let mut outcome = UpsertOutcome::default();
    let mut find = tx.prepare_cached(
        "SELECT id, pipeline, stage, native_stage, content_hash, source_updated_at, stage_entered_at,
            status
         FROM deals WHERE connection = ?1 AND external_id = ?2",
    )?;
    for mut upsert in upserts {
        // The raw record is serialized once, for both the hash and the row.
        let raw_text = json(&std::mem::take(&mut upsert.source.raw))?;
        let upsert = &upsert;
        let source = &upsert.source;
        let existing = find
            .query_row(
                params![upsert.connection.as_str(), source.external_id.as_str()],
                |row| {
                    Ok(Existing {
                        id: row.get(0)?,
                        pipeline: row.get(1)?,
                        stage: row.get(2)?,
                        native_stage: row.get(3)?,
                        content_hash: row.get(4)?,
                        source_updated_at: row.get(5)?,
                        stage_entered_at: row.get(6)?,
                        status: row.get(7)?,
                    })
                },
            )
            .optional()?;
        // A cart keeps the stage dealsync or an order moved it to (see `carts`).
        let held = existing.as_ref().and_then(|existing| {
            let stored = StageRef {
                pipeline: existing.pipeline.clone().map(PipelineKey::new),
                stage: StageKey::new(existing.stage.clone()),
            };
            super::carts::held_stage(&existing.status, &stored, upsert).map(|(target, status)| {
                DealUpsert {
                    target,
                    status,
                    ..upsert.clone()
                }
            })
        });
        let upsert = held.as_ref().unwrap_or(upsert);
        let hash = content_hash(upsert, &raw_text)?;
        if upsert.target.is_unmapped() {
            outcome.unmapped += 1;
        }
        let observed = to_ms(upsert.observed_at);
        let changed_at = source
            .stage_changed_at
            .map(to_ms)
            .or(source.updated_at.map(to_ms))
            .unwrap_or(observed);
        let status = if source.deleted {
            DealStatus::Deleted
        } else {
            upsert.status
        };
        match existing {
            None => {
                let row = RowValues {
                    hash,
                    status,
                    entered_at: changed_at,
                    observed,
                    raw_text: &raw_text,
                };
                let id = insert(tx, upsert, row)?;
                append_history(tx, id, changed_at, None, None, upsert, upsert.cause)?;
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
                let row = RowValues {
                    hash,
                    status,
                    entered_at,
                    observed,
                    raw_text: &raw_text,
                };
                update(tx, existing.id, upsert, row)?;
                if stage_changed {
                    append_history(
                        tx,
                        existing.id,
                        entered_at,
                        Some((existing.pipeline.as_deref(), &existing.stage)),
                        Some(&existing.native_stage),
                        upsert,
                        upsert.cause,
                    )?;
                    outcome.stage_changes += 1;
                }
                write_keys(tx, existing.id, &source.cart_keys)?;
                outcome.updated += 1;
            }
        }
    }
    Ok(outcome)
}

/// What an insert or update writes besides the record itself.
struct RowValues<'a> {
    hash: i64,
    status: DealStatus,
    entered_at: i64,
    observed: i64,
    raw_text: &'a str,
}

fn insert(tx: &Transaction<'_>, upsert: &DealUpsert, row: RowValues<'_>) -> Result<i64> {
    let RowValues {
        hash,
        status,
        entered_at,
        observed,
        raw_text,
    } = row;
    let s = &upsert.source;
    let mut statement = tx.prepare_cached(
        "INSERT INTO deals (connection, external_id, title, amount_minor, currency, pipeline, stage,
            status, native_pipeline, native_stage, contact_email, contact_name, owner, owner_email,
            marketing_consent, source_created_at, source_updated_at, stage_entered_at,
            last_activity_at, expected_close, recovery_url, line_items, cart_keys, deleted_at,
            first_seen_at, synced_at, content_hash, raw)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18,
            ?19, ?20, ?21, ?22, ?23, ?24, ?25, ?25, ?26, ?27)",
    )?;
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
        s.expected_close.map(|d| d.to_string()),
        s.recovery_url,
        json_list(&s.line_items)?,
        json_list(&s.cart_keys)?,
        s.deleted.then_some(observed),
        observed,
        hash,
        raw_text,
    ])?;
    Ok(tx.last_insert_rowid())
}

fn update(tx: &Transaction<'_>, id: i64, upsert: &DealUpsert, row: RowValues<'_>) -> Result<()> {
    let RowValues {
        hash,
        status,
        entered_at,
        observed,
        raw_text,
    } = row;
    let s = &upsert.source;
    let mut statement = tx.prepare_cached(
        "UPDATE deals SET title = ?2, amount_minor = ?3, currency = ?4, pipeline = ?5, stage = ?6,
            status = ?7, native_pipeline = ?8, native_stage = ?9, contact_email = ?10,
            contact_name = ?11, owner = ?12, owner_email = ?13, marketing_consent = ?14,
            source_created_at = ?15, source_updated_at = ?16, stage_entered_at = ?17,
            last_activity_at = ?18, expected_close = ?19, recovery_url = ?20, line_items = ?21,
            cart_keys = ?22, deleted_at = CASE WHEN ?23 THEN coalesce(deleted_at, ?24) END,
            synced_at = ?24, content_hash = ?25, raw = ?26
         WHERE id = ?1",
    )?;
    statement.execute(params![
        id,
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
        s.expected_close.map(|d| d.to_string()),
        s.recovery_url,
        json_list(&s.line_items)?,
        json_list(&s.cart_keys)?,
        s.deleted,
        observed,
        hash,
        raw_text,
    ])?;
    Ok(())
}

fn append_history(
    tx: &Transaction<'_>,
    deal_id: i64,
    at: i64,
    from: Option<(Option<&str>, &str)>,
    native_from: Option<&str>,
    upsert: &DealUpsert,
    cause: ChangeCause,
) -> Result<()> {
    let mut statement = tx.prepare_cached(
        "INSERT INTO stage_history (deal_id, at, from_pipeline, from_stage, to_pipeline, to_stage,
            native_from, native_to, cause)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
    )?;
    statement.execute(params![
        deal_id,
        at,
        from.and_then(|(pipeline, _)| pipeline),
        from.map(|(_, stage)| stage),
        upsert.target.pipeline.as_ref().map(|p| p.as_str()),
        upsert.target.stage.as_str(),
        native_from,
        upsert.source.native_stage,
        cause.as_str(),
    ])?;
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

pub(crate) fn deal_from_row(row: &Row<'_>) -> rusqlite::Result<Deal> {
    fn parse_json<T: serde::de::DeserializeOwned>(text: String) -> rusqlite::Result<T> {
        serde_json::from_str(&text).map_err(|e| {
            rusqlite::Error::FromSqlConversionFailure(0, rusqlite::types::Type::Text, Box::new(e))
        })
    }
    let currency: Option<String> = row.get(5)?;
    let status: String = row.get(8)?;
    let email = |value: Option<String>| value.and_then(|v| EmailAddress::parse(&v));
    Ok(Deal {
        id: row.get(0)?,
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
        line_items: parse_json(row.get(22)?)?,
        cart_keys: parse_json(row.get(23)?)?,
        deleted_at: row.get::<_, Option<i64>>(24)?.map(from_ms),
        first_seen_at: from_ms(row.get(25)?),
        raw: parse_json(row.get(26)?)?,
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

    /// Native stages holding unmapped deals, with counts.
    pub async fn unmapped_stages(&self) -> Result<Vec<UnmappedStage>> {
        self.read(|db| {
            let mut statement = db.prepare(
                "SELECT connection, native_pipeline, native_stage, count(*) FROM deals
                 WHERE stage = 'unmapped' AND deleted_at IS NULL
                 GROUP BY connection, native_pipeline, native_stage
                 ORDER BY connection, native_pipeline, native_stage",
            )?;
            let rows = statement.query_map([], |row| {
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
    use crate::domain::{Money, UNMAPPED};
    use crate::store::tests::temp_store;
    use chrono::Duration;

    fn upsert(id: &str, stage: &str, at: DateTime<Utc>) -> DealUpsert {
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
        let unmapped = store.unmapped_stages().await.unwrap();
        assert_eq!(unmapped.len(), 1);
        assert_eq!(unmapped[0].native_stage, "mystery");
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
}
