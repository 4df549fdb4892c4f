//! What webhook rows change in the deals, on PostgreSQL: the changes a pass of the
//! webhook worker planned (`store::deal_changes::DealChange`), applied in order in one
//! transaction through the shared deal write path (`deals::upsert_all`) or the cart
//! rules (`carts`), and deals marked deleted.
//!
//! Invariants (across replicas sharing the database):
//! - Every change to a deal first takes the advisory lock of its (connection, external
//!   id), the lock the deal write path takes, before it reads the stored deal: the
//!   contact a webhook record keeps (`deal_changes::keep_known`) is read from what the
//!   last writer committed, and two replicas applying the same batch run one after the
//!   other per deal, the second finding nothing left to do (one deal, one history row
//!   per stage change).
//! - A pass is applied in order, in segments: a run of records that touch distinct
//!   deals and share no cart key is locked and read at once (one round trip for the
//!   stored deals, their contacts and the deals sharing their keys) and written by one
//!   `upsert_all`; an order (it completes other carts) or a deletion is applied on its
//!   own. No record of a segment reads what another of it writes, so the result is
//!   that of applying the changes one by one.
//! - A pass commits with `synchronous_commit = off` (see `try_apply_webhook_rows`):
//!   anything observable that follows from it commits synchronously later, which makes
//!   this commit durable first.
//! - A pass's changes and their history rows commit together, and with them the
//!   settlement of its inbox rows (`apply_webhook_rows`): only rows this replica still
//!   holds under an unexpired claim, locked first, are applied and marked processed, so
//!   a row another replica took over after a stall is applied by that one alone. The
//!   caller wakes the stage-change subscribers after the commit.
//! - Marking a deal deleted is one conditional UPDATE (`deleted_at IS NULL`): of two
//!   replicas deleting the same deal, one reports it.

use super::Database;
use super::carts::apply_cart;
use super::deals::{lock_deal_keys, pg_opt, pg_text, upsert_all};
use crate::domain::DealStatus;
use crate::retry;
use crate::store::carts::{CartStep, Match, cart_step};
use crate::store::deal_changes::{
    DealChange, KNOWN_CONTACT_COLUMNS, KnownContact, carries_every_contact_field, keep_known,
    known_contact_from,
};
use crate::store::{CartRules, DealUpsert, Result, StoreError, to_ms};
use chrono::{DateTime, Utc};
use deadpool_postgres::Transaction;
use std::borrow::Cow;
use std::collections::{HashSet, VecDeque};
use std::time::Duration;

/// Fills the contact fields `upsert` lacks from its stored deal (`keep_known`), under
/// the deal's advisory lock, which the caller's transaction keeps until it commits.
async fn keep_known_contact(tx: &Transaction<'_>, upsert: &mut DealUpsert) -> Result<()> {
    let (connection, external_id) = (
        upsert.connection.as_str(),
        upsert.source.external_id.as_str(),
    );
    lock_deal_keys(tx, &[(connection, external_id)]).await?;
    if carries_every_contact_field(upsert) {
        return Ok(());
    }
    let statement = tx
        .prepare_cached(&format!(
            "SELECT {KNOWN_CONTACT_COLUMNS} FROM deals WHERE connection = $1 AND external_id = $2"
        ))
        .await?;
    let row = tx
        .query_opt(&statement, &[&pg_text(connection), &pg_text(external_id)])
        .await?;
    if let Some(row) = row {
        keep_known(upsert, known_contact_from(&row)?);
    }
    Ok(())
}

/// Marks a deal deleted in the caller's transaction, under the deal's key lock; false
/// when it is unknown or already deleted (as `deal_changes::mark_deleted` on SQLite).
pub(in crate::store) async fn mark_deleted(
    tx: &Transaction<'_>,
    connection: &str,
    external_id: &str,
    at: DateTime<Utc>,
) -> Result<bool> {
    lock_deal_keys(tx, &[(connection, external_id)]).await?;
    let statement = tx
        .prepare_cached(
            "UPDATE deals SET deleted_at = $3, status = 'deleted', synced_at = $3
             WHERE connection = $1 AND external_id = $2 AND deleted_at IS NULL",
        )
        .await?;
    let changed = tx
        .execute(
            &statement,
            &[&pg_text(connection), &pg_text(external_id), &to_ms(at)],
        )
        .await?;
    Ok(changed > 0)
}

/// Applies one change in the caller's transaction; returns the stage changes it
/// recorded.
async fn apply_change(
    tx: &Transaction<'_>,
    change: DealChange,
    rules: CartRules,
    now: DateTime<Utc>,
) -> Result<u64> {
    match change {
        DealChange::Cart(mut upsert) => {
            keep_known_contact(tx, &mut upsert).await?;
            let (_, stage_changes) = apply_cart(tx, &upsert, rules).await?;
            Ok(stage_changes)
        }
        DealChange::Upsert(mut upsert) => {
            keep_known_contact(tx, &mut upsert).await?;
            let outcome = upsert_all(tx, std::slice::from_ref(&upsert)).await?;
            Ok(outcome.stage_changes)
        }
        DealChange::Delete {
            connection,
            external_id,
        } => {
            mark_deleted(tx, &connection, &external_id, now).await?;
            Ok(0)
        }
        DealChange::Delivery { event, policy } => {
            super::delivery::record_one(tx, &event, &policy, now).await?;
            Ok(0)
        }
    }
}

/// How many of the first changes can be applied as one segment: records that alter
/// only their own deal, touch distinct deals and share no cart key, so none reads what
/// another writes. At least one when the first is such a record.
fn segment_len(changes: &[DealChange]) -> usize {
    let mut deals: HashSet<(&str, &str)> = HashSet::new();
    let mut keys: HashSet<&str> = HashSet::new();
    for (taken, change) in changes.iter().enumerate() {
        let upsert = match change {
            DealChange::Upsert(upsert) | DealChange::Cart(upsert) if !alters_others(change) => {
                upsert
            }
            _ => return taken,
        };
        let fresh_deal = deals.insert((
            upsert.connection.as_str(),
            upsert.source.external_id.as_str(),
        ));
        let fresh_keys = upsert
            .source
            .cart_keys
            .iter()
            .all(|key| keys.insert(key.as_str()));
        if !fresh_deal || !fresh_keys {
            return taken;
        }
    }
    changes.len()
}

/// What a segment's records read before they are planned, by position in the segment.
#[derive(Default)]
struct Stored {
    /// The record's own stored deal.
    own: Option<i64>,
    /// Its contact fields, which the record keeps where it lacks them.
    known: Option<KnownContact>,
    /// Live deals of its pipeline sharing a cart key with it, other than its own.
    others: Vec<Match>,
}

/// Locks the deals of a segment's records, then reads what each needs (the two reads
/// pipelined: one round trip for the whole segment).
async fn read_segment(tx: &Transaction<'_>, upserts: &[&DealUpsert]) -> Result<Vec<Stored>> {
    let keys: Vec<(&str, &str)> = upserts
        .iter()
        .map(|u| (u.connection.as_str(), u.source.external_id.as_str()))
        .collect();
    let connections: Vec<Cow<'_, str>> = keys.iter().map(|(c, _)| pg_text(c)).collect();
    let external_ids: Vec<Cow<'_, str>> = keys.iter().map(|(_, e)| pg_text(e)).collect();
    let (mut key_ords, mut cart_keys, mut pipelines) = (Vec::new(), Vec::new(), Vec::new());
    for (ord, upsert) in upserts.iter().enumerate() {
        for key in &upsert.source.cart_keys {
            key_ords.push(ord as i64);
            cart_keys.push(pg_text(key));
            pipelines.push(pg_opt(upsert.target.pipeline.as_ref().map(|p| p.as_str())));
        }
    }
    let own_statement = tx
        .prepare_cached(&format!(
            "SELECT {KNOWN_CONTACT_COLUMNS}, d.id, u.ord - 1
             FROM unnest($1::text[], $2::text[]) WITH ORDINALITY AS u(c, e, ord)
             JOIN deals d ON d.connection = u.c AND d.external_id = u.e"
        ))
        .await?;
    let matches_statement = tx
        .prepare_cached(
            "SELECT DISTINCT u.ord, d.id, d.status
             FROM unnest($1::bigint[], $2::text[], $3::text[]) AS u(ord, key, pipeline)
             JOIN deal_keys k ON k.key = u.key JOIN deals d ON d.id = k.deal_id
             WHERE d.deleted_at IS NULL AND d.pipeline IS NOT DISTINCT FROM u.pipeline
             ORDER BY u.ord, d.id",
        )
        .await?;
    lock_deal_keys(tx, &keys).await?;
    let (own_rows, match_rows) = tokio::try_join!(
        async {
            tx.query(&own_statement, &[&connections, &external_ids])
                .await
        },
        async {
            if key_ords.is_empty() {
                return Ok(Vec::new());
            }
            tx.query(&matches_statement, &[&key_ords, &cart_keys, &pipelines])
                .await
        },
    )?;
    let mut stored: Vec<Stored> = upserts.iter().map(|_| Stored::default()).collect();
    for row in &own_rows {
        let ord: i64 = row.try_get(6)?;
        let entry = &mut stored[ord as usize];
        entry.own = Some(row.try_get(5)?);
        entry.known = Some(known_contact_from(row)?);
    }
    for row in &match_rows {
        let ord: i64 = row.try_get(0)?;
        let entry = &mut stored[ord as usize];
        let id: i64 = row.try_get(1)?;
        if entry.own != Some(id) {
            entry.others.push(Match {
                id,
                status: row.try_get(2)?,
            });
        }
    }
    Ok(stored)
}

/// Applies a segment (see [`segment_len`]): what its records read is read for all of
/// them at once, and what they store is written by one `upsert_all`, as applying them
/// one by one would (no record reads what another of the segment writes).
async fn apply_segment(tx: &Transaction<'_>, segment: Vec<DealChange>) -> Result<u64> {
    let mut upserts: Vec<(bool, DealUpsert)> = segment
        .into_iter()
        .filter_map(|change| match change {
            DealChange::Cart(upsert) => Some((true, upsert)),
            DealChange::Upsert(upsert) => Some((false, upsert)),
            DealChange::Delete { .. } | DealChange::Delivery { .. } => None,
        })
        .collect();
    let refs: Vec<&DealUpsert> = upserts.iter().map(|(_, upsert)| upsert).collect();
    let stored = read_segment(tx, &refs).await?;
    let mut writes = Vec::with_capacity(upserts.len());
    for ((is_cart, mut upsert), stored) in upserts.drain(..).zip(stored) {
        if let Some(known) = stored.known
            && !carries_every_contact_field(&upsert)
        {
            keep_known(&mut upsert, known);
        }
        // A cart that is not an order is stored, unless an order superseded it.
        if is_cart && let CartStep::Superseded(_) = cart_step(&upsert, stored.own, &stored.others) {
            continue;
        }
        writes.push(upsert);
    }
    Ok(upsert_all(tx, &writes).await?.stage_changes)
}

/// Whether a change is applied on its own rather than in a segment: an order (it
/// completes other carts, found by key or by email), a deletion (rare), or a bounce or
/// complaint from an email provider (no deal of its own).
fn alters_others(change: &DealChange) -> bool {
    match change {
        DealChange::Cart(upsert) => upsert.status == DealStatus::Won,
        DealChange::Upsert(_) => false,
        DealChange::Delete { .. } | DealChange::Delivery { .. } => true,
    }
}

/// Applies a pass's changes in order: each run of records with no deal or cart key in
/// common as one segment, every order and deletion on its own.
async fn apply_changes(
    tx: &Transaction<'_>,
    changes: Vec<DealChange>,
    rules: CartRules,
    now: DateTime<Utc>,
) -> Result<u64> {
    let mut changes = VecDeque::from(changes);
    let mut stage_changes = 0;
    while let Some(next) = changes.front() {
        if alters_others(next)
            && let Some(change) = changes.pop_front()
        {
            stage_changes += apply_change(tx, change, rules, now).await?;
            continue;
        }
        let taken = segment_len(changes.make_contiguous());
        let segment: Vec<DealChange> = changes.drain(..taken).collect();
        stage_changes += apply_segment(tx, segment).await?;
    }
    Ok(stage_changes)
}

/// How often a transaction PostgreSQL rolled back to break a deadlock with another
/// replica's (it locks the carts an order completes as it finds them, so two passes
/// can lock the same deals in opposite orders) is run again, soon: the other one has
/// gone on meanwhile.
const CONFLICT_RETRIES: retry::Backoff =
    retry::Backoff::full(Duration::from_millis(20), Duration::from_millis(500)).attempts(5);

/// Runs `attempt` again when PostgreSQL broke a deadlock or a serialization conflict by
/// rolling it back (nothing of it committed), within [`CONFLICT_RETRIES`].
async fn retry_conflicts<T, F, Fut>(what: &str, attempt: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T>>,
{
    retry::retry(CONFLICT_RETRIES, what, StoreError::is_conflict, attempt).await
}

impl Database {
    /// Applies the changes of the inbox rows `items` that `claimer` still holds, in
    /// order, and marks those rows processed at `now`, in one transaction. Returns the
    /// stage changes recorded and the rows left alone (their claim expired: another
    /// replica may have them).
    pub async fn apply_webhook_rows(
        &self,
        claimer: &str,
        items: Vec<(i64, Vec<DealChange>)>,
        rules: CartRules,
        now: DateTime<Utc>,
    ) -> Result<(u64, Vec<i64>)> {
        retry_conflicts("applying a webhook pass", || {
            self.try_apply_webhook_rows(claimer, items.clone(), rules, now)
        })
        .await
    }

    async fn try_apply_webhook_rows(
        &self,
        claimer: &str,
        items: Vec<(i64, Vec<DealChange>)>,
        rules: CartRules,
        now: DateTime<Utc>,
    ) -> Result<(u64, Vec<i64>)> {
        let ids: Vec<i64> = items.iter().map(|(id, _)| *id).collect();
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        // The pass need not wait for its own WAL flush: its rows are durable in the
        // inbox, and were the server to lose the commit in a crash the rows would be
        // claimed and applied again (applying a row twice is harmless). Whatever leaves
        // the database because of it (an enrollment, an email, a write-back) is
        // committed later with `synchronous_commit = on`, which flushes the WAL up to
        // its own commit, this one included. Intake's fsyncs no longer queue behind the
        // worker's (BENCHMARKS.md).
        tx.batch_execute("SET LOCAL synchronous_commit = off")
            .await?;
        let held: HashSet<i64> = tx
            .query(super::inbox::HELD_FOR_UPDATE, &[&ids, &claimer])
            .await?
            .iter()
            .map(|row| row.get(0))
            .collect();
        let mut pass = Vec::new();
        let mut left = Vec::new();
        for (id, changes) in items {
            if !held.contains(&id) {
                left.push(id);
                continue;
            }
            pass.extend(changes);
        }
        let stage_changes = apply_changes(&tx, pass, rules, now).await?;
        let processed: Vec<i64> = held.into_iter().collect();
        tx.execute(
            "UPDATE webhook_inbox SET state = 'processed', processed_at = $2,
                 next_attempt_at = NULL, claimed_by = NULL, claimed_until = NULL
              WHERE id = ANY($1)",
            &[&processed, &to_ms(now)],
        )
        .await?;
        tx.commit().await?;
        Ok((stage_changes, left))
    }

    /// Applies deal changes, in order, in one transaction; returns the stage changes
    /// they recorded.
    pub async fn apply_deal_changes(
        &self,
        changes: Vec<DealChange>,
        rules: CartRules,
        now: DateTime<Utc>,
    ) -> Result<u64> {
        retry_conflicts("applying deal changes", || async {
            let mut client = self.client().await?;
            let tx = client.transaction().await?;
            let stage_changes = apply_changes(&tx, changes.clone(), rules, now).await?;
            tx.commit().await?;
            Ok(stage_changes)
        })
        .await
    }

    /// Marks a deal deleted in its source; false when unknown or already deleted.
    pub async fn mark_deal_deleted(
        &self,
        connection: &str,
        external_id: &str,
        at: DateTime<Utc>,
    ) -> Result<bool> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        let deleted = mark_deleted(&tx, connection, external_id, at).await?;
        tx.commit().await?;
        Ok(deleted)
    }
}

#[cfg(test)]
mod replica_tests {
    //! PostgreSQL only: a replica whose inbox claims expired mid-pass (it stalled) and
    //! another replica that took the rows over.
    use super::super::claims::INBOX;
    use super::super::test_database;
    use super::super::tests::url_of;
    use crate::store::deal_changes::DealChange;
    use crate::store::{CartRules, Store};
    use chrono::Utc;
    use std::time::Duration;

    /// The stalled replica's pass applies nothing of the rows it lost and settles none;
    /// the replica that took them over applies each once and marks it processed.
    #[tokio::test]
    async fn a_pass_applies_only_the_rows_its_replica_still_holds() {
        let Some(database) = test_database("a_pass_applies_only_the_rows_its_replica_still_holds")
        else {
            return;
        };
        let url = url_of(&database);
        let (stalled, taker) = (
            Store::open_postgres(&url).await.unwrap(),
            Store::open_postgres(&url).await.unwrap(),
        );
        for id in ["w1", "w2"] {
            stalled
                .enqueue_webhook(crate::store::tests::webhook("shop", id))
                .await
                .unwrap();
        }
        let now = Utc::now();
        let rows = stalled.due_webhooks(now, 10).await.unwrap();
        assert_eq!(rows.len(), 2);
        // Its claims run out (as after a stall); the other replica takes the rows.
        let admin = database.admin().await;
        admin
            .execute(
                "UPDATE webhook_inbox SET claimed_until = clock_timestamp() - interval '1 second'",
                &[],
            )
            .await
            .unwrap();
        let pool = taker.postgres().unwrap();
        let taken = pool
            .claim(
                &INBOX,
                taker.replica().unwrap(),
                Duration::from_secs(60),
                now,
                10,
            )
            .await
            .unwrap();
        assert_eq!(taken.ids.len(), 2);
        let pass = |store: &Store| {
            let items = rows
                .iter()
                .map(|row| {
                    let deal = crate::store::tests::upsert(&row.delivery_id, "lead", now);
                    (row.id, vec![DealChange::Upsert(deal)])
                })
                .collect();
            let store = store.clone();
            async move {
                store
                    .apply_webhook_batch(items, CartRules::default(), now)
                    .await
                    .unwrap()
            }
        };
        pass(&stalled).await;
        let count = |sql: &'static str| {
            let admin = &admin;
            async move { admin.query_one(sql, &[]).await.unwrap().get::<_, i64>(0) }
        };
        assert_eq!(
            count("SELECT count(*) FROM deals").await,
            0,
            "nothing applied"
        );
        assert_eq!(
            count("SELECT count(*) FROM webhook_inbox WHERE state = 'processed'").await,
            0
        );
        pass(&taker).await;
        assert_eq!(count("SELECT count(*) FROM deals").await, 2);
        assert_eq!(count("SELECT count(*) FROM stage_history").await, 2);
        assert_eq!(
            count("SELECT count(*) FROM webhook_inbox WHERE state = 'processed'").await,
            2
        );
    }
}
