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
//! - A pass's changes and their history rows commit together, and with them the
//!   settlement of its inbox rows (`apply_webhook_rows`): only rows this replica still
//!   holds under an unexpired claim, locked first, are applied and marked processed, so
//!   a row another replica took over after a stall is applied by that one alone. The
//!   caller wakes the stage-change subscribers after the commit.
//! - Marking a deal deleted is one conditional UPDATE (`deleted_at IS NULL`): of two
//!   replicas deleting the same deal, one reports it.

use super::Database;
use super::carts::apply_cart;
use super::deals::{lock_deal_keys, pg_text, upsert_all};
use crate::store::deal_changes::{
    DealChange, KNOWN_CONTACT_COLUMNS, carries_every_contact_field, keep_known, known_contact_from,
};
use crate::store::{CartRules, DealUpsert, Result, to_ms};
use chrono::{DateTime, Utc};
use deadpool_postgres::Transaction;

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
        let ids: Vec<i64> = items.iter().map(|(id, _)| *id).collect();
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        let held: std::collections::HashSet<i64> = tx
            .query(super::inbox::HELD_FOR_UPDATE, &[&ids, &claimer])
            .await?
            .iter()
            .map(|row| row.get(0))
            .collect();
        let mut stage_changes = 0;
        let mut left = Vec::new();
        for (id, changes) in items {
            if !held.contains(&id) {
                left.push(id);
                continue;
            }
            for change in changes {
                stage_changes += apply_change(&tx, change, rules, now).await?;
            }
        }
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
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        let mut stage_changes = 0;
        for change in changes {
            stage_changes += apply_change(&tx, change, rules, now).await?;
        }
        tx.commit().await?;
        Ok(stage_changes)
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
