//! The SQLite half of the deal write path (`upsert_all`): reads the batch's stored
//! deals, lets `plan` decide what the batch does, and executes its writes inside the
//! caller's transaction.
//!
//! Invariants (the decisions are `plan`'s, see there):
//! - The batch's stored deals are read up front in one statement per connection; the
//!   deals a follow-up may have moved last in one more.
//! - Writes run in record order; history rows are appended at the end, in record order,
//!   through `history::insert_history`, in the caller's transaction, which also holds
//!   the page's cursor.

use super::history::{PendingHistory, insert_history};
use super::plan::{self, DealRef, Existing, Write};
use super::{DealUpsert, UpsertOutcome};
use crate::domain::ChangeCause;
use crate::store::people::PersonLink;
use crate::store::{Result, Store, StoreError, to_json, to_ms};
use rusqlite::{Row, Transaction, params};
use std::collections::HashSet;

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
    let mut statement = tx.prepare_cached(
        "SELECT j.key, d.id, d.pipeline, d.stage, d.native_stage, d.contact_email,
            d.content_hash, d.source_updated_at, d.stage_entered_at, d.status
         FROM json_each(?2) AS j CROSS JOIN deals AS d
         WHERE d.connection = ?1 AND d.external_id = j.value",
    )?;
    let mut found: Vec<Option<Existing>> = Vec::with_capacity(upserts.len());
    found.resize_with(upserts.len(), || None);
    for (connection, positions) in plan::by_connection(upserts) {
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

/// Of `candidates`, the deals whose last history row has cause `followup`.
fn moved_by_followup(tx: &Transaction<'_>, candidates: &[i64]) -> Result<HashSet<i64>> {
    let mut statement = tx.prepare_cached(
        "SELECT cause FROM stage_history WHERE deal_id = ?1 ORDER BY at DESC, id DESC LIMIT 1",
    )?;
    let mut moved = HashSet::new();
    for &deal_id in candidates {
        let mut rows = statement.query([deal_id])?;
        if let Some(row) = rows.next()?
            && row.get_ref(0)?.as_str().ok() == Some(ChangeCause::Followup.as_str())
        {
            moved.insert(deal_id);
        }
    }
    Ok(moved)
}

/// Inserts or updates each record; appends one history row per canonical stage change.
/// All of it runs in the caller's transaction.
pub(crate) fn upsert_all(tx: &Transaction<'_>, upserts: Vec<DealUpsert>) -> Result<UpsertOutcome> {
    let stored = load_existing(tx, &upserts)?;
    let moved = moved_by_followup(tx, &plan::followup_candidates(&upserts, &stored))?;
    let plan = plan::plan(&upserts, stored, &moved)?;
    // Prepared once for the batch: `prepare_cached` hashes the SQL text on every call.
    let mut insert_statement = tx.prepare_cached(INSERT_DEAL_SQL)?;
    let mut update_statements: [Option<rusqlite::CachedStatement<'_>>; 4] = Default::default();
    // The id each write's row has: known for an update, given by SQLite for an insert.
    let mut ids = Vec::with_capacity(plan.writes.len());
    let id_of = |ids: &[i64], deal: DealRef| match deal {
        DealRef::Stored(id) => id,
        DealRef::Inserted(write) => ids[write],
    };
    for write in &plan.writes {
        let upsert = &upserts[write.record];
        let id = match write.deal {
            None => insert(tx, &mut insert_statement, upsert, write)?,
            Some(deal) => {
                let id = id_of(&ids, deal);
                let shape =
                    usize::from(write.stage_changed) * 2 + usize::from(write.contact_changed);
                let statement = match &mut update_statements[shape] {
                    Some(statement) => statement,
                    empty => empty.insert(tx.prepare_cached(UPDATE_DEAL_SQL[shape])?),
                };
                update(statement, id, upsert, write)?;
                id
            }
        };
        write_keys(tx, id, &upsert.source.cart_keys)?;
        ids.push(id);
    }
    let history: Vec<PendingHistory> = plan
        .history
        .into_iter()
        .map(|entry| PendingHistory {
            upsert: entry.record,
            deal_id: id_of(&ids, entry.deal),
            at: entry.at,
            from_pipeline: entry.from_pipeline,
            from_stage: entry.from_stage,
            native_from: entry.native_from,
        })
        .collect();
    insert_history(tx, &upserts, &history)?;
    Ok(plan.outcome)
}

const INSERT_DEAL_SQL: &str = "INSERT INTO deals (connection, external_id, title, amount_minor,
        currency, pipeline, stage, status, native_pipeline, native_stage, contact_email,
        contact_name, owner, owner_email, marketing_consent, source_created_at,
        source_updated_at, stage_entered_at, last_activity_at, expected_close, recovery_url,
        line_items, cart_keys, deleted_at, first_seen_at, synced_at, content_hash, raw,
        fingerprint, person_key, company_key)
     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18,
        ?19, ?20, ?21, ?22, ?23, ?24, ?25, ?25, ?26, ?27, ?28, ?29, ?30)";

fn insert(
    tx: &Transaction<'_>,
    statement: &mut rusqlite::CachedStatement<'_>,
    upsert: &DealUpsert,
    write: &Write<'_>,
) -> Result<i64> {
    let s = &upsert.source;
    let text = &write.text;
    let link = PersonLink::of(s.contact_email.as_ref(), s.company_domain.as_deref());
    statement.execute(params![
        upsert.connection.as_str(),
        s.external_id.as_str(),
        s.title,
        s.amount.map(|m| m.minor),
        s.amount.as_ref().map(|m| m.currency.as_str()),
        write.target.pipeline.as_ref().map(|p| p.as_str()),
        write.target.stage.as_str(),
        write.status.as_str(),
        s.native_pipeline,
        s.native_stage,
        s.contact_email.as_ref().map(|e| e.as_str()),
        s.contact_name,
        s.owner,
        s.owner_email.as_ref().map(|e| e.as_str()),
        s.marketing_consent,
        s.created_at.map(to_ms),
        s.updated_at.map(to_ms),
        write.entered_at,
        write.last_activity_at(upsert),
        text.expected_close,
        s.recovery_url,
        text.line_items,
        text.cart_keys,
        s.deleted.then_some(write.observed),
        write.observed,
        write.hash,
        text.raw,
        s.fingerprint,
        link.person,
        link.company,
    ])?;
    Ok(tx.last_insert_rowid())
}

/// The UPDATE of a stored deal, in four shapes: SQLite rewrites an index entry when an
/// indexed column is assigned, whether or not its value changes, so the stage columns
/// (`deals_by_stage`) and the contact (`deals_by_contact`, with the person and company
/// keys derived from it: `deals_by_person`, `deals_by_company`) are only assigned when
/// they change. The parameter numbers are the same in every shape; ?29 is always used,
/// so each shape takes all 29.
macro_rules! update_deal_sql {
    ($($assign:literal),*) => {
        concat!(
            "UPDATE deals SET title = ?2, amount_minor = ?3, currency = ?4, status = ?5,
                native_pipeline = ?6, native_stage = ?7, contact_name = ?8, owner = ?9,
                owner_email = ?10, marketing_consent = ?11, source_created_at = ?12,
                source_updated_at = ?13, last_activity_at = ?14, expected_close = ?15,
                recovery_url = ?16, line_items = ?17, cart_keys = ?18,
                deleted_at = CASE WHEN ?19 THEN coalesce(deleted_at, ?20) END,
                synced_at = ?20, content_hash = ?21, fingerprint = ?29, ",
            $($assign,)*
            "raw = ?26 WHERE id = ?1"
        )
    };
}

/// The UPDATE shapes, indexed by `stage_changed * 2 + contact_changed`.
const UPDATE_DEAL_SQL: [&str; 4] = [
    update_deal_sql!(),
    update_deal_sql!("contact_email = ?25, person_key = ?27, company_key = ?28, "),
    update_deal_sql!("pipeline = ?22, stage = ?23, stage_entered_at = ?24, "),
    update_deal_sql!(
        "pipeline = ?22, stage = ?23, stage_entered_at = ?24, ",
        "contact_email = ?25, person_key = ?27, company_key = ?28, "
    ),
];

fn update(
    statement: &mut rusqlite::CachedStatement<'_>,
    id: i64,
    upsert: &DealUpsert,
    write: &Write<'_>,
) -> Result<()> {
    let s = &upsert.source;
    let text = &write.text;
    let link = PersonLink::of(s.contact_email.as_ref(), s.company_domain.as_deref());
    statement.execute(params![
        id,
        s.title,
        s.amount.map(|m| m.minor),
        s.amount.as_ref().map(|m| m.currency.as_str()),
        write.status.as_str(),
        s.native_pipeline,
        s.native_stage,
        s.contact_name,
        s.owner,
        s.owner_email.as_ref().map(|e| e.as_str()),
        s.marketing_consent,
        s.created_at.map(to_ms),
        s.updated_at.map(to_ms),
        write.last_activity_at(upsert),
        text.expected_close,
        s.recovery_url,
        text.line_items,
        text.cart_keys,
        s.deleted,
        write.observed,
        write.hash,
        write.target.pipeline.as_ref().map(|p| p.as_str()),
        write.target.stage.as_str(),
        write.entered_at,
        s.contact_email.as_ref().map(|e| e.as_str()),
        text.raw,
        link.person,
        link.company,
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
        if let Some(database) = self.postgres() {
            let outcome = database
                .upsert_deals(upserts)
                .await
                .map_err(|error| database.named(error))?;
            self.note_stage_changes(outcome.stage_changes);
            return Ok(outcome);
        }
        self.write(move |tx| upsert_all(tx, upserts)).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{ConnectionName, DealStatus, EmailAddress, UNMAPPED};
    use crate::store::both_backends::{deal_rows, on_both, stored_text};
    use crate::store::deals::tests::{sales, stage_and_status, stored_deal, upsert, with_status};
    use chrono::{DateTime, Duration, Utc};

    #[tokio::test]
    async fn upserting_the_same_record_twice_changes_nothing() {
        on_both(
            "upserting_the_same_record_twice_changes_nothing",
            async |store| {
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
                assert_eq!(deal_rows(&store).await, 1);
            },
        )
        .await;
    }

    #[tokio::test]
    async fn a_stage_change_appends_exactly_one_history_row() {
        on_both(
            "a_stage_change_appends_exactly_one_history_row",
            async |store| {
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
            },
        )
        .await;
    }

    #[tokio::test]
    async fn a_deal_twice_in_one_batch_is_created_then_moved_with_two_history_rows() {
        on_both(
            "a_deal_twice_in_one_batch_is_created_then_moved_with_two_history_rows",
            async |store| {
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
                assert_eq!(deal_rows(&store).await, 2);
            },
        )
        .await;
    }

    #[tokio::test]
    async fn an_update_that_changes_only_the_contact_stores_it_without_a_stage_change() {
        on_both(
            "an_update_that_changes_only_the_contact_stores_it_without_a_stage_change",
            async |store| {
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
            },
        )
        .await;
    }

    #[tokio::test]
    async fn an_older_record_does_not_overwrite_a_newer_one() {
        on_both(
            "an_older_record_does_not_overwrite_a_newer_one",
            async |store| {
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
            },
        )
        .await;
    }

    #[tokio::test]
    async fn an_unmapped_stage_is_kept_and_reported() {
        on_both("an_unmapped_stage_is_kept_and_reported", async |store| {
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
        })
        .await;
    }

    fn with_raw(mut upsert: DealUpsert, text: &str) -> DealUpsert {
        upsert.source.raw = crate::domain::RawRecord::from_text(text.to_owned()).unwrap();
        upsert
    }

    #[tokio::test]
    async fn the_stored_raw_record_is_the_sources_text_byte_for_byte() {
        on_both(
            "the_stored_raw_record_is_the_sources_text_byte_for_byte",
            async |store| {
                let text = r#"{ "id" : "1", "z": 1, "a": "caf\u00e9 \"quoted\"", "n": 1.50 }"#;
                store
                    .upsert_deals(vec![with_raw(upsert("1", "proposal", Utc::now()), text)])
                    .await
                    .unwrap();
                assert_eq!(stored_text(&store, "1", "raw").await, text);
                let deal = stored_deal(&store, "crm", "1").await;
                assert_eq!(deal.raw["a"], "café \"quoted\"");
            },
        )
        .await;
    }

    #[tokio::test]
    async fn a_record_is_rewritten_when_its_raw_text_or_a_mapped_field_changes_and_not_otherwise() {
        on_both(
            "a_record_is_rewritten_when_its_raw_text_or_a_mapped_field_changes_and_not_otherwise",
            async |store| {
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
                assert_eq!(stored_text(&store, "1", "raw").await, other_text);
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
                assert_eq!(stored_text(&store, "1", "raw").await, text);
            },
        )
        .await;
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
        on_both(
            "a_won_deal_a_followup_moved_on_stays_there_while_the_source_still_says_won",
            async |store| {
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
            },
        )
        .await;
    }

    #[tokio::test]
    async fn a_won_deal_moved_by_the_source_itself_follows_the_source() {
        on_both(
            "a_won_deal_moved_by_the_source_itself_follows_the_source",
            async |store| {
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
            },
        )
        .await;
    }

    #[tokio::test]
    async fn a_deal_a_followup_moved_on_follows_the_source_once_the_source_no_longer_says_won() {
        on_both(
            "a_deal_a_followup_moved_on_follows_the_source_once_the_source_no_longer_says_won",
            async |store| {
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
            },
        )
        .await;
    }

    #[tokio::test]
    async fn a_stage_change_reported_before_the_current_entry_is_dated_at_that_entry() {
        on_both(
            "a_stage_change_reported_before_the_current_entry_is_dated_at_that_entry",
            async |store| {
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
            },
        )
        .await;
    }

    #[tokio::test]
    async fn an_update_that_moves_the_deal_and_changes_its_contact_stores_both() {
        on_both(
            "an_update_that_moves_the_deal_and_changes_its_contact_stores_both",
            async |store| {
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
            },
        )
        .await;
    }

    #[tokio::test]
    async fn a_batch_mixing_two_connections_updates_each_connections_own_deals() {
        on_both(
            "a_batch_mixing_two_connections_updates_each_connections_own_deals",
            async |store| {
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
            },
        )
        .await;
    }
}
