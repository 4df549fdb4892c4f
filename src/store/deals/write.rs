//! How a batch of records (a page of a sync run, a webhook's records) becomes deal rows
//! and their stage history, inside the caller's transaction: `upsert_all`.
//!
//! Invariants:
//! - One deal per (connection, external id). A record whose content hash
//!   (`domain::hashing::content_hash`) equals the stored one writes nothing; a record
//!   older than the stored one (`source_updated_at`) is counted stale and writes nothing.
//! - Every canonical stage change appends exactly one `stage_history` row (through
//!   `history::insert_history`, at the end of the batch, in record order), in the same
//!   transaction as the deal's update: the caller's, which also holds the page's cursor.
//! - A batch reads the stored deals up front; a record whose external id occurs earlier
//!   in the same batch is compared against that earlier write, not the batch's start.
//! - A cart keeps the stage dealsync or an order moved it to (`held_stage`), and a won
//!   deal a follow-up moved on stays there while its source still says won.

use super::history::{PendingHistory, insert_history};
use super::{DealUpsert, UpsertOutcome};
use crate::domain::hashing::{self, DealText};
use crate::domain::{ChangeCause, DealStatus, PipelineKey, StageKey, StageRef};
use crate::store::{Result, Store, StoreError, to_json, to_ms};
use rusqlite::{OptionalExtension, Row, Transaction, params};

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
        let mut rows = statement.query(params![connection, to_json(&external_ids)?])?;
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

pub(in crate::store) fn write_keys(
    tx: &Transaction<'_>,
    deal_id: i64,
    keys: &[String],
) -> Result<()> {
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

impl Store {
    /// Upserts records outside a sync run (webhooks, tests); one transaction.
    pub async fn upsert_deals(&self, upserts: Vec<DealUpsert>) -> Result<UpsertOutcome> {
        self.write(move |tx| upsert_all(tx, upserts)).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{ConnectionName, EmailAddress, UNMAPPED};
    use crate::store::DealFilter;
    use crate::store::deals::tests::{sales, stage_and_status, stored_deal, upsert, with_status};
    use crate::store::tests::temp_store;
    use chrono::{DateTime, Duration, Utc};

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
        let deal = stored_deal(&store, "crm", "1").await;
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

        let deal = stored_deal(&store, "crm", "1").await;
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
        let deal = stored_deal(&store, "crm", "1").await;
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
        let deal = stored_deal(&store, "crm", "1").await;
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
        let deal = stored_deal(&store, "crm", "1").await;
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
        let deal = stored_deal(&store, "crm", "1").await;
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
        let deal = stored_deal(&store, "crm", "1").await;
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
        let deal = stored_deal(&store, "crm", "1").await;
        assert_eq!(deal.contact_email.unwrap().as_str(), "new@example.com");
        assert_eq!(stored_raw(&store, "1").await, text);
    }

    /// A won deal in `sales.won` that the post-sale follow-up then moved to
    /// `sales.post_sale`; returns its id.
    async fn won_then_moved_to_post_sale(store: &Store, t0: DateTime<Utc>) -> i64 {
        store
            .upsert_deals(vec![with_status(upsert("1", "won", t0), DealStatus::Won)])
            .await
            .unwrap();
        let deal = stored_deal(store, "crm", "1").await;
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
        let deal = stored_deal(&store, "crm", "1").await;
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

        let deal = stored_deal(&store, "crm", "1").await;
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
        let deal = stored_deal(&store, "crm", "1").await;
        assert_eq!(deal.stage.as_str(), "negotiation");
        assert_eq!(
            deal.contact_email.as_ref().map(|e| e.as_str()),
            Some("grace@acme.example")
        );
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
