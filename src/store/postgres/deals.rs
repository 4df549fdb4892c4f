//! The deal write path on PostgreSQL: the batch's stored deals are read, `deals::plan`
//! decides what the batch does (the same code as on SQLite), and its writes run as a
//! handful of set-based statements (`unnest` over one array per column) inside the
//! caller's transaction, instead of one statement per record.
//!
//! Invariants:
//! - One deal per (connection, external id): the unique constraint, and before the
//!   batch reads anything it takes a transaction-level advisory lock per key (in key
//!   order, so two batches cannot deadlock on each other). Two replicas writing the
//!   same deal at once (a webhook on one, a poll on the other) so run one after the
//!   other, the second planning against what the first committed: no lost update, no
//!   history row twice.
//! - A stage change and its history row commit together (the caller's transaction);
//!   history rows are appended in record order.
//! - A record's writes run in generations: the n-th record of a key in the batch is
//!   written in generation n, after the generation that inserted or updated its deal,
//!   so a deal created and moved in one batch ends as the last record says.
//! - PostgreSQL's text cannot hold U+0000, which SQLite's can: a NUL in a source's text
//!   is stored as U+FFFD, so a hostile record costs that character, not the page.

use super::Database;
use crate::domain::{ChangeCause, Deal, DealStatus, StageChange, StageRef};
use crate::store::deals::{
    DEAL_COLUMNS, DealFilter, DealRef, DealUpsert, Existing, HISTORY_COLUMNS_READ, StageCount,
    UpsertOutcome, Write, by_connection, change_from, deal_from, followup_candidates, plan,
};
use crate::store::people::PersonLink;
use crate::store::{Result, StoreError, to_ms};
use chrono::{DateTime, Utc};
use deadpool_postgres::Transaction;
use std::borrow::Cow;
use std::collections::{HashMap, HashSet};
use tokio_postgres::types::ToSql;

/// The advisory-lock class of deal keys (two-key form, a key space apart from the
/// single-key locks of migrations and copies).
const DEAL_LOCK_CLASS: i32 = 0x6465_616c; // "deal"

/// `text` as PostgreSQL can store it: U+0000 replaced by U+FFFD.
pub(in crate::store) fn pg_text(text: &str) -> Cow<'_, str> {
    if text.contains('\0') {
        Cow::Owned(text.replace('\0', "\u{FFFD}"))
    } else {
        Cow::Borrowed(text)
    }
}

pub(in crate::store) fn pg_opt(text: Option<&str>) -> Option<Cow<'_, str>> {
    text.map(pg_text)
}

/// Inserts or updates each record; appends one history row per canonical stage change.
/// All of it runs in the caller's transaction.
pub(in crate::store) async fn upsert_all(
    tx: &Transaction<'_>,
    upserts: &[DealUpsert],
) -> Result<UpsertOutcome> {
    if upserts.is_empty() {
        return Ok(UpsertOutcome::default());
    }
    lock_keys(tx, upserts).await?;
    let stored = load_existing(tx, upserts).await?;
    let moved = moved_by_followup(tx, &followup_candidates(upserts, &stored)).await?;
    let plan = plan(upserts, stored, &moved)?;
    let ids = write_rows(tx, upserts, &plan.writes).await?;
    let id_of = |deal: DealRef| match deal {
        DealRef::Stored(id) => id,
        DealRef::Inserted(write) => ids[write],
    };
    let mut keys: Vec<Cow<'_, str>> = Vec::new();
    let mut key_deals: Vec<i64> = Vec::new();
    for (write, &id) in plan.writes.iter().zip(&ids) {
        for key in &upserts[write.record].source.cart_keys {
            keys.push(pg_text(key));
            key_deals.push(id);
        }
    }
    write_keys(tx, &keys, &key_deals).await?;
    if !plan.history.is_empty() {
        let mut columns = HistoryColumns::default();
        for entry in &plan.history {
            let to = &upserts[entry.record];
            columns.deal_id.push(id_of(entry.deal));
            columns.at.push(entry.at);
            columns
                .from_pipeline
                .push(entry.from_pipeline.as_deref().map(pg_text));
            columns
                .from_stage
                .push(entry.from_stage.as_deref().map(pg_text));
            columns
                .to_pipeline
                .push(pg_opt(to.target.pipeline.as_ref().map(|p| p.as_str())));
            columns.to_stage.push(pg_text(to.target.stage.as_str()));
            columns
                .native_from
                .push(entry.native_from.as_deref().map(pg_text));
            columns.native_to.push(pg_text(&to.source.native_stage));
            columns.cause.push(to.cause.as_str());
        }
        columns.insert(tx).await?;
    }
    Ok(plan.outcome)
}

/// Adds each `(key, deal id)` pair to `deal_keys`; a pair already there is kept.
pub(in crate::store) async fn write_keys(
    tx: &Transaction<'_>,
    keys: &[Cow<'_, str>],
    deal_ids: &[i64],
) -> Result<()> {
    if keys.is_empty() {
        return Ok(());
    }
    let statement = tx
        .prepare_cached(
            "INSERT INTO deal_keys (key, deal_id)
             SELECT * FROM unnest($1::text[], $2::bigint[]) ON CONFLICT DO NOTHING",
        )
        .await?;
    tx.execute(&statement, &[&keys, &deal_ids]).await?;
    Ok(())
}

/// The advisory-lock key of a deal, from its connection `c` and external id `e`.
macro_rules! deal_lock_key {
    () => {
        "hashtext(c || chr(31) || e)"
    };
}

/// Takes the transaction-level advisory lock of every (connection, external id) of the
/// batch, in key order.
async fn lock_keys(tx: &Transaction<'_>, upserts: &[DealUpsert]) -> Result<()> {
    let keys: Vec<(&str, &str)> = upserts
        .iter()
        .map(|u| (u.connection.as_str(), u.source.external_id.as_str()))
        .collect();
    lock_deal_keys(tx, &keys).await
}

/// Takes the transaction-level advisory lock of each (connection, external id) of
/// `keys`, in key order: what every writer of a deal's row takes first, so that writers
/// of one deal on several replicas run one after the other.
pub(in crate::store) async fn lock_deal_keys(
    tx: &Transaction<'_>,
    keys: &[(&str, &str)],
) -> Result<()> {
    let connections: Vec<Cow<'_, str>> = keys.iter().map(|(c, _)| pg_text(c)).collect();
    let external_ids: Vec<Cow<'_, str>> = keys.iter().map(|(_, e)| pg_text(e)).collect();
    let statement = tx
        .prepare_cached(concat!(
            "SELECT count(pg_advisory_xact_lock($1, k))
             FROM (SELECT DISTINCT ",
            deal_lock_key!(),
            " AS k FROM unnest($2::text[], $3::text[]) AS u(c, e) ORDER BY k) AS keys"
        ))
        .await?;
    tx.execute(&statement, &[&DEAL_LOCK_CLASS, &connections, &external_ids])
        .await?;
    Ok(())
}

/// [`lock_deal_keys`] for the stored deals `ids` (an unknown id locks nothing).
pub(in crate::store) async fn lock_deals(tx: &Transaction<'_>, ids: &[i64]) -> Result<()> {
    if ids.is_empty() {
        return Ok(());
    }
    let statement = tx
        .prepare_cached(concat!(
            "SELECT count(pg_advisory_xact_lock($1, k))
             FROM (SELECT DISTINCT ",
            deal_lock_key!(),
            " AS k FROM (SELECT connection AS c, external_id AS e FROM deals
                          WHERE id = ANY($2)) AS d ORDER BY k) AS keys"
        ))
        .await?;
    tx.execute(&statement, &[&DEAL_LOCK_CLASS, &ids]).await?;
    Ok(())
}

/// Reads the stored state of every deal in the batch, aligned with `upserts`: one
/// statement per connection over the batch's external ids.
async fn load_existing(
    tx: &Transaction<'_>,
    upserts: &[DealUpsert],
) -> Result<Vec<Option<Existing>>> {
    // `LATERAL` looks each id up on the unique (connection, external_id) index, in
    // batch order: a join would let the planner, whose statistics lag a bulk load,
    // read every deal of the connection for each batch instead.
    let statement = tx
        .prepare_cached(
            "SELECT u.ord, d.id, d.pipeline, d.stage, d.native_stage, d.contact_email,
                d.content_hash, d.source_updated_at, d.stage_entered_at, d.status
             FROM unnest($2::text[]) WITH ORDINALITY AS u(external_id, ord)
             CROSS JOIN LATERAL (SELECT * FROM deals
                WHERE connection = $1 AND external_id = u.external_id) AS d",
        )
        .await?;
    let mut found: Vec<Option<Existing>> = Vec::with_capacity(upserts.len());
    found.resize_with(upserts.len(), || None);
    for (connection, positions) in by_connection(upserts) {
        let external_ids: Vec<Cow<'_, str>> = positions
            .iter()
            .map(|&index| pg_text(upserts[index].source.external_id.as_str()))
            .collect();
        let rows = tx
            .query(&statement, &[&pg_text(connection), &external_ids])
            .await?;
        for row in rows {
            let position = usize::try_from(row.try_get::<_, i64>(0)? - 1)
                .ok()
                .and_then(|ordinal| positions.get(ordinal))
                .ok_or_else(|| StoreError::Corrupt("unnest returned an unknown ordinal".into()))?;
            found[*position] = Some(Existing {
                id: row.try_get(1)?,
                pipeline: row.try_get(2)?,
                stage: row.try_get(3)?,
                native_stage: row.try_get(4)?,
                contact_email: row.try_get(5)?,
                content_hash: row.try_get(6)?,
                source_updated_at: row.try_get(7)?,
                stage_entered_at: row.try_get(8)?,
                status: row.try_get(9)?,
            });
        }
    }
    Ok(found)
}

/// Of `candidates`, the deals whose last history row has cause `followup`.
async fn moved_by_followup(tx: &Transaction<'_>, candidates: &[i64]) -> Result<HashSet<i64>> {
    if candidates.is_empty() {
        return Ok(HashSet::new());
    }
    let rows = tx
        .query(
            "SELECT DISTINCT ON (deal_id) deal_id, cause FROM stage_history
             WHERE deal_id = ANY($1) ORDER BY deal_id, at DESC, id DESC",
            &[&candidates],
        )
        .await?;
    let mut moved = HashSet::new();
    for row in rows {
        let cause: &str = row.try_get(1)?;
        if cause == ChangeCause::Followup.as_str() {
            moved.insert(row.try_get(0)?);
        }
    }
    Ok(moved)
}

/// Writes the plan's rows, generation by generation (see the module's invariants);
/// returns each write's deal id.
async fn write_rows(
    tx: &Transaction<'_>,
    upserts: &[DealUpsert],
    writes: &[Write<'_>],
) -> Result<Vec<i64>> {
    let mut generation_of = Vec::with_capacity(writes.len());
    let mut seen: HashMap<(&str, &str), usize> = HashMap::new();
    for write in writes {
        let upsert = &upserts[write.record];
        let key = (
            upsert.connection.as_str(),
            upsert.source.external_id.as_str(),
        );
        let generation = seen.entry(key).or_insert(0);
        generation_of.push(*generation);
        *generation += 1;
    }
    let generations = generation_of.iter().max().map_or(0, |last| last + 1);
    let mut ids = vec![0_i64; writes.len()];
    for generation in 0..generations {
        let in_generation = || (0..writes.len()).filter(|&w| generation_of[w] == generation);
        let inserts: Vec<usize> = in_generation()
            .filter(|&w| writes[w].deal.is_none())
            .collect();
        if !inserts.is_empty() {
            let columns = DealColumns::of(upserts, writes, &inserts);
            let statement = tx.prepare_cached(INSERT_DEALS_SQL).await?;
            let rows = tx.query(&statement, &columns.params()).await?;
            // Within a generation a key occurs once: the returned key names the write.
            let by_key: HashMap<(&str, &str), usize> = inserts
                .iter()
                .enumerate()
                .map(|(row, &w)| ((&*columns.connection[row], &*columns.external_id[row]), w))
                .collect();
            for row in rows {
                let key: (&str, &str) = (row.try_get(1)?, row.try_get(2)?);
                let write = by_key.get(&key).ok_or_else(|| {
                    StoreError::Corrupt("an inserted deal has an unknown key".into())
                })?;
                ids[*write] = row.try_get(0)?;
            }
        }
        let updates: Vec<usize> = in_generation()
            .filter(|&w| writes[w].deal.is_some())
            .collect();
        if !updates.is_empty() {
            let deal_ids: Vec<i64> = updates
                .iter()
                .map(|&w| match writes[w].deal {
                    Some(DealRef::Stored(id)) => id,
                    Some(DealRef::Inserted(earlier)) => ids[earlier],
                    None => unreachable!("updates have a deal"),
                })
                .collect();
            for (&w, &id) in updates.iter().zip(&deal_ids) {
                ids[w] = id;
            }
            let columns = DealColumns::of(upserts, writes, &updates);
            let mut params = columns.params();
            params.push(&deal_ids);
            let statement = tx.prepare_cached(UPDATE_DEALS_SQL).await?;
            tx.execute(&statement, &params).await?;
        }
    }
    Ok(ids)
}

/// The `unnest` of a deal row's columns, in `DealColumns::params` order, and, for an
/// update, one more argument and column (the deal's id).
macro_rules! deal_unnest {
    ($($argument:literal, $column:literal)?) => {
        concat!(
            "unnest($1::text[], $2::text[], $3::text[], $4::bigint[], $5::text[], $6::text[],
                $7::text[], $8::text[], $9::text[], $10::text[], $11::text[], $12::text[],
                $13::text[], $14::text[], $15::boolean[], $16::bigint[], $17::bigint[],
                $18::bigint[], $19::bigint[], $20::text[], $21::text[], $22::text[],
                $23::text[], $24::boolean[], $25::bigint[], $26::bigint[], $27::text[],
                $28::bigint[], $29::text[], $30::text[]" $(, $argument)?,
            ") AS r(connection, external_id, title, amount_minor, currency, pipeline, stage,
                status, native_pipeline, native_stage, contact_email, contact_name, owner,
                owner_email, marketing_consent, source_created_at, source_updated_at,
                stage_entered_at, last_activity_at, expected_close, recovery_url, line_items,
                cart_keys, deleted, observed, content_hash, raw, fingerprint, person_key,
                company_key" $(, $column)?,
            ")"
        )
    };
}

const INSERT_DEALS_SQL: &str = concat!(
    "INSERT INTO deals (connection, external_id, title, amount_minor, currency, pipeline,
        stage, status, native_pipeline, native_stage, contact_email, contact_name, owner,
        owner_email, marketing_consent, source_created_at, source_updated_at, stage_entered_at,
        last_activity_at, expected_close, recovery_url, line_items, cart_keys, deleted_at,
        first_seen_at, synced_at, content_hash, raw, fingerprint, person_key, company_key)
     SELECT connection, external_id, title, amount_minor, currency, pipeline, stage, status,
        native_pipeline, native_stage, contact_email, contact_name, owner, owner_email,
        marketing_consent, source_created_at, source_updated_at, stage_entered_at,
        last_activity_at, expected_close, recovery_url, line_items, cart_keys,
        CASE WHEN deleted THEN observed END, observed, observed, content_hash, raw, fingerprint,
        person_key, company_key
     FROM ",
    deal_unnest!(),
    " RETURNING id, connection, external_id"
);

/// Every column is assigned: where the stage or the contact did not change, the plan's
/// values are the stored ones, and PostgreSQL keeps an index entry whose value is
/// unchanged (a HOT update), unlike SQLite.
const UPDATE_DEALS_SQL: &str = concat!(
    "UPDATE deals AS d SET title = r.title, amount_minor = r.amount_minor,
        currency = r.currency, pipeline = r.pipeline, stage = r.stage, status = r.status,
        native_pipeline = r.native_pipeline, native_stage = r.native_stage,
        contact_email = r.contact_email, contact_name = r.contact_name, owner = r.owner,
        owner_email = r.owner_email, marketing_consent = r.marketing_consent,
        source_created_at = r.source_created_at, source_updated_at = r.source_updated_at,
        stage_entered_at = r.stage_entered_at, last_activity_at = r.last_activity_at,
        expected_close = r.expected_close, recovery_url = r.recovery_url,
        line_items = r.line_items, cart_keys = r.cart_keys,
        deleted_at = CASE WHEN r.deleted THEN coalesce(d.deleted_at, r.observed) END,
        synced_at = r.observed, content_hash = r.content_hash, raw = r.raw,
        fingerprint = r.fingerprint, person_key = r.person_key, company_key = r.company_key
     FROM ",
    deal_unnest!(", $31::bigint[]", ", id"),
    " WHERE d.id = r.id"
);

/// One array per column of the deal rows a statement writes.
#[derive(Default)]
struct DealColumns<'a> {
    connection: Vec<Cow<'a, str>>,
    external_id: Vec<Cow<'a, str>>,
    title: Vec<Cow<'a, str>>,
    amount_minor: Vec<Option<i64>>,
    currency: Vec<Option<&'a str>>,
    pipeline: Vec<Option<Cow<'a, str>>>,
    stage: Vec<Cow<'a, str>>,
    status: Vec<&'static str>,
    native_pipeline: Vec<Cow<'a, str>>,
    native_stage: Vec<Cow<'a, str>>,
    contact_email: Vec<Option<Cow<'a, str>>>,
    contact_name: Vec<Option<Cow<'a, str>>>,
    owner: Vec<Option<Cow<'a, str>>>,
    owner_email: Vec<Option<Cow<'a, str>>>,
    marketing_consent: Vec<Option<bool>>,
    source_created_at: Vec<Option<i64>>,
    source_updated_at: Vec<Option<i64>>,
    stage_entered_at: Vec<i64>,
    last_activity_at: Vec<i64>,
    expected_close: Vec<Option<&'a str>>,
    recovery_url: Vec<Option<Cow<'a, str>>>,
    line_items: Vec<Cow<'a, str>>,
    cart_keys: Vec<Cow<'a, str>>,
    deleted: Vec<bool>,
    observed: Vec<i64>,
    content_hash: Vec<i64>,
    raw: Vec<Cow<'a, str>>,
    fingerprint: Vec<Option<i64>>,
    person_key: Vec<Option<String>>,
    company_key: Vec<Option<String>>,
}

impl<'a> DealColumns<'a> {
    /// The columns of `writes[w]` for each `w` of `which`, in that order.
    fn of(upserts: &'a [DealUpsert], writes: &'a [Write<'a>], which: &[usize]) -> Self {
        let mut c = DealColumns::default();
        for &w in which {
            let write = &writes[w];
            let upsert = &upserts[write.record];
            let s = &upsert.source;
            let text = &write.text;
            c.connection.push(pg_text(upsert.connection.as_str()));
            c.external_id.push(pg_text(s.external_id.as_str()));
            c.title.push(pg_text(&s.title));
            c.amount_minor.push(s.amount.map(|m| m.minor));
            c.currency
                .push(s.amount.as_ref().map(|m| m.currency.as_str()));
            c.pipeline
                .push(pg_opt(write.target.pipeline.as_ref().map(|p| p.as_str())));
            c.stage.push(pg_text(write.target.stage.as_str()));
            c.status.push(write.status.as_str());
            c.native_pipeline.push(pg_text(&s.native_pipeline));
            c.native_stage.push(pg_text(&s.native_stage));
            c.contact_email
                .push(pg_opt(s.contact_email.as_ref().map(|e| e.as_str())));
            c.contact_name.push(pg_opt(s.contact_name.as_deref()));
            c.owner.push(pg_opt(s.owner.as_deref()));
            c.owner_email
                .push(pg_opt(s.owner_email.as_ref().map(|e| e.as_str())));
            c.marketing_consent.push(s.marketing_consent);
            c.source_created_at.push(s.created_at.map(to_ms));
            c.source_updated_at.push(s.updated_at.map(to_ms));
            c.stage_entered_at.push(write.entered_at);
            c.last_activity_at.push(write.last_activity_at(upsert));
            c.expected_close.push(text.expected_close.as_deref());
            c.recovery_url.push(pg_opt(s.recovery_url.as_deref()));
            c.line_items.push(pg_text(&text.line_items));
            c.cart_keys.push(pg_text(&text.cart_keys));
            c.deleted.push(s.deleted);
            c.observed.push(write.observed);
            c.content_hash.push(write.hash);
            c.raw.push(pg_text(text.raw));
            c.fingerprint.push(s.fingerprint);
            // Derived from the contact: `pg_text` is not needed, since a key is never
            // made of an address with a control character in it.
            let link = PersonLink::of(s.contact_email.as_ref(), s.company_domain.as_deref());
            c.person_key.push(link.person);
            c.company_key.push(link.company);
        }
        c
    }

    /// `$1` to `$30`.
    fn params(&self) -> Vec<&(dyn ToSql + Sync)> {
        vec![
            &self.connection,
            &self.external_id,
            &self.title,
            &self.amount_minor,
            &self.currency,
            &self.pipeline,
            &self.stage,
            &self.status,
            &self.native_pipeline,
            &self.native_stage,
            &self.contact_email,
            &self.contact_name,
            &self.owner,
            &self.owner_email,
            &self.marketing_consent,
            &self.source_created_at,
            &self.source_updated_at,
            &self.stage_entered_at,
            &self.last_activity_at,
            &self.expected_close,
            &self.recovery_url,
            &self.line_items,
            &self.cart_keys,
            &self.deleted,
            &self.observed,
            &self.content_hash,
            &self.raw,
            &self.fingerprint,
            &self.person_key,
            &self.company_key,
        ]
    }
}

/// One array per column of the history rows a batch appends.
#[derive(Default)]
struct HistoryColumns<'a> {
    deal_id: Vec<i64>,
    at: Vec<i64>,
    from_pipeline: Vec<Option<Cow<'a, str>>>,
    from_stage: Vec<Option<Cow<'a, str>>>,
    to_pipeline: Vec<Option<Cow<'a, str>>>,
    to_stage: Vec<Cow<'a, str>>,
    native_from: Vec<Option<Cow<'a, str>>>,
    native_to: Vec<Cow<'a, str>>,
    cause: Vec<&'static str>,
}

impl HistoryColumns<'_> {
    /// Appends the rows in their order (identity values follow it).
    async fn insert(&self, tx: &Transaction<'_>) -> Result<()> {
        let statement = tx
            .prepare_cached(
                "INSERT INTO stage_history (deal_id, at, from_pipeline, from_stage, to_pipeline,
                to_stage, native_from, native_to, cause)
             SELECT deal_id, at, from_pipeline, from_stage, to_pipeline, to_stage, native_from,
                native_to, cause
             FROM unnest($1::bigint[], $2::bigint[], $3::text[], $4::text[], $5::text[],
                $6::text[], $7::text[], $8::text[], $9::text[])
                WITH ORDINALITY AS h(deal_id, at, from_pipeline, from_stage, to_pipeline,
                to_stage, native_from, native_to, cause, ord)
             ORDER BY ord",
            )
            .await?;
        tx.execute(
            &statement,
            &[
                &self.deal_id,
                &self.at,
                &self.from_pipeline,
                &self.from_stage,
                &self.to_pipeline,
                &self.to_stage,
                &self.native_from,
                &self.native_to,
                &self.cause,
            ],
        )
        .await?;
        Ok(())
    }
}

/// Moves a deal to another canonical stage on dealsync's own account, with its history
/// row, in the caller's transaction (as `deals::move_stage` on SQLite). Returns false
/// when the deal was already there.
pub(in crate::store) async fn move_stage(
    tx: &Transaction<'_>,
    deal_id: i64,
    to: &StageRef,
    status: DealStatus,
    at: DateTime<Utc>,
    cause: ChangeCause,
) -> Result<bool> {
    let row = tx
        .query_one(
            "SELECT pipeline, stage, native_stage FROM deals WHERE id = $1 FOR UPDATE",
            &[&deal_id],
        )
        .await?;
    let (pipeline, stage, native): (Option<String>, String, String) =
        (row.try_get(0)?, row.try_get(1)?, row.try_get(2)?);
    if pipeline.as_deref() == to.pipeline.as_ref().map(|p| p.as_str()) && stage == to.stage.as_str()
    {
        return Ok(false);
    }
    let at = to_ms(at);
    let to_pipeline = pg_opt(to.pipeline.as_ref().map(|p| p.as_str()));
    let to_stage = pg_text(to.stage.as_str());
    tx.execute(
        "UPDATE deals SET pipeline = $2, stage = $3, status = $4, stage_entered_at = $5
         WHERE id = $1",
        &[&deal_id, &to_pipeline, &to_stage, &status.as_str(), &at],
    )
    .await?;
    tx.execute(
        "INSERT INTO stage_history (deal_id, at, from_pipeline, from_stage, to_pipeline, to_stage,
            native_from, native_to, cause)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $7, $8)",
        &[
            &deal_id,
            &at,
            &pipeline,
            &stage,
            &to_pipeline,
            &to_stage,
            &native,
            &cause.as_str(),
        ],
    )
    .await?;
    Ok(true)
}

impl Database {
    /// Upserts records outside a sync run (webhooks, tests); one transaction.
    pub async fn upsert_deals(&self, upserts: Vec<DealUpsert>) -> Result<UpsertOutcome> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        let outcome = upsert_all(&tx, &upserts).await?;
        tx.commit().await?;
        Ok(outcome)
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
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        let moved = move_stage(&tx, deal_id, &to, status, at, cause).await?;
        tx.commit().await?;
        Ok(moved)
    }

    pub async fn deal(&self, id: i64) -> Result<Option<Deal>> {
        let client = self.client().await?;
        let sql = format!("SELECT {DEAL_COLUMNS} FROM deals WHERE id = $1");
        let row = client.query_opt(&sql, &[&id]).await?;
        Ok(row.as_ref().map(deal_from).transpose()?)
    }

    pub async fn deal_by_external_id(
        &self,
        connection: &str,
        external_id: &str,
    ) -> Result<Option<Deal>> {
        let client = self.client().await?;
        let sql =
            format!("SELECT {DEAL_COLUMNS} FROM deals WHERE connection = $1 AND external_id = $2");
        let row = client
            .query_opt(&sql, &[&pg_text(connection), &pg_text(external_id)])
            .await?;
        Ok(row.as_ref().map(deal_from).transpose()?)
    }

    /// Runs `sql` with text parameters `values` (a listing's filter, built once for
    /// both engines with `$` placeholders).
    pub(super) async fn query_texts(
        &self,
        sql: &str,
        values: &[String],
    ) -> Result<Vec<tokio_postgres::Row>> {
        let values: Vec<String> = values.iter().map(|v| pg_text(v).into_owned()).collect();
        let params: Vec<&(dyn ToSql + Sync)> =
            values.iter().map(|v| v as &(dyn ToSql + Sync)).collect();
        Ok(self.client().await?.query(sql, &params).await?)
    }

    /// Deals matching the filter, newest activity first.
    pub async fn deals(&self, filter: DealFilter) -> Result<Vec<Deal>> {
        let (sql, values) = filter.query('$');
        let rows = self.query_texts(&sql, &values).await?;
        Ok(rows
            .iter()
            .map(deal_from)
            .collect::<std::result::Result<_, _>>()?)
    }

    /// Counts of live deals per connection and canonical stage.
    pub async fn stage_counts(&self) -> Result<Vec<StageCount>> {
        let rows = self
            .client()
            .await?
            .query(
                "SELECT connection, pipeline, stage, count(*) FROM deals
                 WHERE deleted_at IS NULL GROUP BY connection, pipeline, stage
                 ORDER BY connection, pipeline, stage",
                &[],
            )
            .await?;
        Ok(rows
            .iter()
            .map(|row| {
                Ok(StageCount {
                    connection: row.try_get(0)?,
                    pipeline: row.try_get(1)?,
                    stage: row.try_get(2)?,
                    deals: row.try_get::<_, i64>(3)?.unsigned_abs(),
                })
            })
            .collect::<std::result::Result<_, tokio_postgres::Error>>()?)
    }

    /// A deal's stage history, oldest first.
    pub async fn history(&self, deal_id: i64) -> Result<Vec<StageChange>> {
        let client = self.client().await?;
        let sql = format!(
            "SELECT {HISTORY_COLUMNS_READ} FROM stage_history WHERE deal_id = $1 ORDER BY at, id"
        );
        let rows = client.query(&sql, &[&deal_id]).await?;
        Ok(rows
            .iter()
            .map(change_from)
            .collect::<std::result::Result<_, _>>()?)
    }
}

#[cfg(test)]
mod tests {
    //! What only PostgreSQL has: several writers at once (SQLite has one writer) and
    //! text that cannot hold U+0000. The write path's contract runs on both backends in
    //! `deals::write` and `deals::history`.
    use super::*;
    use crate::store::postgres::tests::url_of;
    use crate::store::postgres::{Options, test_database};
    use crate::store::tests::upsert;
    use chrono::Duration;

    async fn open(test: &str) -> Option<Database> {
        let database = test_database(test)?;
        Some(
            Database::open(&url_of(&database), &Options::default())
                .await
                .unwrap(),
        )
    }

    /// Eight replicas store the same batches at once, as a webhook and a poll of the same
    /// deals would: each deal is created once and moved once, whoever wins each race.
    #[tokio::test]
    async fn replicas_writing_the_same_deals_at_once_create_and_move_each_once() {
        let Some(database) =
            open("replicas_writing_the_same_deals_at_once_create_and_move_each_once").await
        else {
            return;
        };
        let t0 = Utc::now() - Duration::hours(1);
        let batch = |stage: &str, at| -> Vec<DealUpsert> {
            (0..50).map(|n| upsert(&n.to_string(), stage, at)).collect()
        };
        for (stage, at) in [("proposal", t0), ("negotiation", t0 + Duration::minutes(1))] {
            let writers: Vec<_> = (0..8)
                .map(|_| {
                    let (database, records) = (database.clone(), batch(stage, at));
                    tokio::spawn(async move { database.upsert_deals(records).await })
                })
                .collect();
            let mut total = UpsertOutcome::default();
            for writer in writers {
                total.add(writer.await.unwrap().unwrap());
            }
            assert_eq!(total.stage_changes, 50, "{stage}: {total:?}");
            assert_eq!(total.created + total.updated, 50, "{stage}: {total:?}");
            assert_eq!(total.unchanged, 7 * 50, "{stage}: {total:?}");
        }
        for n in 0..50 {
            let deal = database
                .deal_by_external_id("crm", &n.to_string())
                .await
                .unwrap()
                .unwrap();
            let stages: Vec<String> = database
                .history(deal.id)
                .await
                .unwrap()
                .iter()
                .map(|change| change.to_stage.as_str().to_owned())
                .collect();
            assert_eq!(stages, ["proposal", "negotiation"], "deal {n}");
        }
    }

    /// A record with U+0000 in its texts is stored (the NUL as U+FFFD) with the rest of
    /// its batch, and reads back unchanged when it comes again.
    #[tokio::test]
    async fn a_record_with_nul_characters_is_stored_with_its_batch() {
        let Some(database) = open("a_record_with_nul_characters_is_stored_with_its_batch").await
        else {
            return;
        };
        let at = Utc::now();
        let mut hostile = upsert("evil\0id", "proposal", at);
        hostile.source.title = "a\0title".into();
        hostile.source.contact_name = Some("nul\0name".into());
        hostile.source.raw =
            crate::domain::RawRecord::from_text(r#"{"id":"evil\u0000id"}"#.into()).unwrap();
        let batch = vec![
            upsert("1", "proposal", at),
            hostile,
            upsert("2", "proposal", at),
        ];
        let outcome = database.upsert_deals(batch.clone()).await.unwrap();
        assert_eq!(outcome.created, 3);
        let stored = database
            .deal_by_external_id("crm", "evil\0id")
            .await
            .unwrap()
            .unwrap();
        assert_eq!(stored.external_id.as_str(), "evil\u{FFFD}id");
        assert_eq!(stored.title, "a\u{FFFD}title");
        assert_eq!(stored.contact_name.as_deref(), Some("nul\u{FFFD}name"));
        let again = database.upsert_deals(batch).await.unwrap();
        assert_eq!(again.unchanged, 3, "{again:?}");
    }
}
