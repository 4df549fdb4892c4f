//! Carts on PostgreSQL: a cart or order record applied by the cart rules, and the cart
//! sweeper (abandoning idle carts, expiring stale ones). What a record does is decided
//! by the same code as on SQLite (`carts::cart_step` and its helpers); this file reads
//! what it needs and writes it.
//!
//! Invariants (across replicas sharing the database):
//! - A record takes its own deal's advisory lock (the lock of the deal write path)
//!   before it reads anything. An order also takes the lock of every cart it completes,
//!   then reads its matches again under those locks, and completes only what is still
//!   open or lost then: a cart's update on another replica (a late "still open"
//!   checkout, a poll) runs wholly before or after the order, so it never reopens a
//!   purchased cart, and two replicas applying the same order complete the cart once.
//! - The sweeper moves a cart only by a conditional UPDATE (`WHERE stage = <from>` and
//!   the idle or stale condition, checked again), with its history row in the same
//!   statement, under the carts' advisory locks. Two sweepers at once (the daemon
//!   runs one, under `leader:cart_sweeper`; a lease handed over mid-sweep may overlap)
//!   still move each cart once and write one history row; a cart an
//!   order or a record reached first is left alone.
//! - Advisory locks are taken in key order within one call; a webhook pass and a sweep
//!   that lock the same carts in opposite orders (or a pass's segment, which locks its
//!   records' deals at once in key order, and another replica's orders) can deadlock,
//!   which the server breaks by failing one of them: nothing of it committed, and the
//!   webhook pass runs again at once (`deal_changes::retry_conflicts`, bounded), a
//!   sweep on its next round.

use super::Database;
use super::deals::{
    lock_deal_keys, lock_deals, move_stage, pg_opt, pg_text, upsert_all, write_keys,
};
use crate::domain::people::person_key;
use crate::domain::{ChangeCause, DealStatus, StageRef};
use crate::store::carts::{
    CartStep, Match, cart_step, email_window, order_is_stored, order_outcome, order_time,
};
use crate::store::{CartOutcome, CartRules, DealUpsert, Result, to_ms};
use chrono::{DateTime, Utc};
use deadpool_postgres::Transaction;
use std::borrow::Cow;
use std::collections::HashSet;

/// The stored id of the record's own deal.
async fn own_deal(tx: &Transaction<'_>, upsert: &DealUpsert) -> Result<Option<i64>> {
    let statement = tx
        .prepare_cached("SELECT id FROM deals WHERE connection = $1 AND external_id = $2")
        .await?;
    let row = tx
        .query_opt(
            &statement,
            &[
                &pg_text(upsert.connection.as_str()),
                &pg_text(upsert.source.external_id.as_str()),
            ],
        )
        .await?;
    Ok(row.map(|row| row.try_get(0)).transpose()?)
}

/// Live deals in `pipeline` sharing a key with the record, other than `own`, by id.
async fn key_matches(
    tx: &Transaction<'_>,
    keys: &[String],
    pipeline: Option<&str>,
    own: Option<i64>,
) -> Result<Vec<Match>> {
    if keys.is_empty() {
        return Ok(Vec::new());
    }
    let keys: Vec<Cow<'_, str>> = keys.iter().map(|key| pg_text(key)).collect();
    let statement = tx
        .prepare_cached(
            "SELECT DISTINCT d.id, d.status FROM deal_keys k JOIN deals d ON d.id = k.deal_id
             WHERE k.key = ANY($3::text[]) AND d.deleted_at IS NULL AND d.id <> $1
               AND d.pipeline IS NOT DISTINCT FROM $2
             ORDER BY d.id",
        )
        .await?;
    let rows = tx
        .query(&statement, &[&own.unwrap_or(-1), &pg_opt(pipeline), &keys])
        .await?;
    rows.iter()
        .map(|row| {
            Ok(Match {
                id: row.try_get(0)?,
                status: row.try_get(1)?,
            })
        })
        .collect()
}

/// The shopper's latest open cart in `pipeline` started within `(from, to)` (see
/// `carts::email_window`).
async fn email_match(
    tx: &Transaction<'_>,
    email: &str,
    pipeline: Option<&str>,
    (from, to): (i64, i64),
) -> Result<Option<i64>> {
    let statement = tx
        .prepare_cached(
            "SELECT id FROM deals
             WHERE person_key = $1 AND pipeline IS NOT DISTINCT FROM $2 AND status = 'open'
               AND deleted_at IS NULL AND cart_keys <> '[]'
               AND coalesce(source_created_at, first_seen_at) BETWEEN $3 AND $4
             ORDER BY coalesce(source_created_at, first_seen_at) DESC, id DESC LIMIT 1",
        )
        .await?;
    let row = tx
        .query_opt(
            &statement,
            &[&person_key(email), &pg_opt(pipeline), &from, &to],
        )
        .await?;
    Ok(row.map(|row| row.try_get(0)).transpose()?)
}

/// Applies one cart or order record in the caller's transaction (see the module's
/// invariants); returns what it did and the stage changes it recorded.
pub(super) async fn apply_cart(
    tx: &Transaction<'_>,
    upsert: &DealUpsert,
    rules: CartRules,
) -> Result<(CartOutcome, u64)> {
    let source = &upsert.source;
    let pipeline = upsert.target.pipeline.as_ref().map(|p| p.as_str());
    lock_deal_keys(
        tx,
        &[(upsert.connection.as_str(), source.external_id.as_str())],
    )
    .await?;
    let own = own_deal(tx, upsert).await?;
    let mut locked: HashSet<i64> = HashSet::new();
    loop {
        let others = key_matches(tx, &source.cart_keys, pipeline, own).await?;
        let (mut matched, by_email) = match cart_step(upsert, own, &others) {
            CartStep::Superseded(id) => return Ok((CartOutcome::Superseded(id), 0)),
            CartStep::Store => {
                let outcome = upsert_all(tx, std::slice::from_ref(upsert)).await?;
                return Ok((CartOutcome::Upserted(outcome), outcome.stage_changes));
            }
            CartStep::Order { matched, by_email } => (matched, by_email),
        };
        let at = order_time(upsert);
        if by_email
            && let Some(email) = &source.contact_email
            && let Some(id) =
                email_match(tx, email.as_str(), pipeline, email_window(at, rules)).await?
        {
            matched.push(id);
        }
        let unlocked: Vec<i64> = matched
            .iter()
            .copied()
            .filter(|id| !locked.contains(id))
            .collect();
        if unlocked.is_empty() {
            return complete_order(tx, upsert, own, &others, matched, at).await;
        }
        // What was read before these locks may have changed: read it again under them.
        lock_deals(tx, &unlocked).await?;
        locked.extend(unlocked);
    }
}

/// Moves the carts an order completes to its won stage, gives them its keys, and stores
/// the order itself where `carts::order_is_stored` says so.
async fn complete_order(
    tx: &Transaction<'_>,
    upsert: &DealUpsert,
    own: Option<i64>,
    others: &[Match],
    matched: Vec<i64>,
    at: DateTime<Utc>,
) -> Result<(CartOutcome, u64)> {
    let keys: Vec<Cow<'_, str>> = upsert
        .source
        .cart_keys
        .iter()
        .map(|key| pg_text(key))
        .collect();
    let mut stage_changes = 0;
    for &id in &matched {
        let moved = move_stage(
            tx,
            id,
            &upsert.target,
            DealStatus::Won,
            at,
            ChangeCause::Webhook,
        )
        .await?;
        stage_changes += u64::from(moved);
        write_keys(tx, &keys, &vec![id; keys.len()]).await?;
    }
    let stored = if order_is_stored(own, others, &matched) {
        let outcome = upsert_all(tx, std::slice::from_ref(upsert)).await?;
        stage_changes += outcome.stage_changes;
        Some(outcome)
    } else {
        None
    };
    Ok((order_outcome(matched, stored), stage_changes))
}

/// One sweep of a connection's carts from one stage to another.
struct Sweep<'a> {
    connection: &'a str,
    from: &'a StageRef,
    to: &'a StageRef,
    status: DealStatus,
    /// Carts that entered `from` at or before this time (epoch ms) move...
    entered_by: i64,
    /// ...and whose last activity is at or before this one.
    active_by: i64,
    /// When they move (epoch ms).
    at: i64,
    limit: u32,
}

/// `pipeline = $n`, or `pipeline IS NULL` for no pipeline: both can use the
/// `deals_by_stage` index, which `IS NOT DISTINCT FROM` cannot. `$n` is used either way
/// so that both statements take the same parameters.
fn pipeline_is(pipeline: Option<&str>) -> &'static str {
    match pipeline {
        Some(_) => "pipeline = $1",
        None => "pipeline IS NULL AND $1::text IS NULL",
    }
}

/// The carts a sweep would move, oldest entry first, at most its limit. Reads only.
async fn sweep_candidates(tx: &Transaction<'_>, sweep: &Sweep<'_>) -> Result<Vec<i64>> {
    let pipeline = sweep.from.pipeline.as_ref().map(|p| p.as_str());
    let statement = tx
        .prepare_cached(&format!(
            "SELECT id FROM deals
             WHERE {} AND stage = $2 AND stage_entered_at <= $3 AND connection = $4
               AND last_activity_at <= $5 AND deleted_at IS NULL
             ORDER BY stage_entered_at LIMIT $6",
            pipeline_is(pipeline)
        ))
        .await?;
    let rows = tx
        .query(
            &statement,
            &[
                &pg_opt(pipeline),
                &pg_text(sweep.from.stage.as_str()),
                &sweep.entered_by,
                &pg_text(sweep.connection),
                &sweep.active_by,
                &i64::from(sweep.limit),
            ],
        )
        .await?;
    rows.iter()
        .map(|row| Ok(row.try_get(0)?))
        .collect::<Result<Vec<i64>>>()
}

/// Moves those of `ids` still in the sweep's `from` stage (and still idle or stale),
/// each with its history row; returns the ids moved.
async fn move_still_due(
    tx: &Transaction<'_>,
    sweep: &Sweep<'_>,
    ids: &[i64],
) -> Result<HashSet<i64>> {
    let statement = tx
        .prepare_cached(
            "WITH moved AS (
                UPDATE deals SET pipeline = $2, stage = $3, status = $4, stage_entered_at = $5
                WHERE id = ANY($1) AND pipeline IS NOT DISTINCT FROM $6 AND stage = $7
                  AND stage_entered_at <= $8 AND last_activity_at <= $9 AND deleted_at IS NULL
                RETURNING id, native_stage
             ), history AS (
                INSERT INTO stage_history (deal_id, at, from_pipeline, from_stage, to_pipeline,
                    to_stage, native_from, native_to, cause)
                SELECT id, $5, $6, $7, $2, $3, native_stage, native_stage, $10
                FROM moved ORDER BY id
             )
             SELECT id FROM moved",
        )
        .await?;
    let rows = tx
        .query(
            &statement,
            &[
                &ids,
                &pg_opt(sweep.to.pipeline.as_ref().map(|p| p.as_str())),
                &pg_text(sweep.to.stage.as_str()),
                &sweep.status.as_str(),
                &sweep.at,
                &pg_opt(sweep.from.pipeline.as_ref().map(|p| p.as_str())),
                &pg_text(sweep.from.stage.as_str()),
                &sweep.entered_by,
                &sweep.active_by,
                &ChangeCause::Followup.as_str(),
            ],
        )
        .await?;
    rows.iter()
        .map(|row| Ok(row.try_get(0)?))
        .collect::<Result<HashSet<i64>>>()
}

/// Runs one sweep in the caller's transaction; returns the carts moved, oldest entry
/// first. A sweep to the stage it sweeps moves nothing and returns what it found, as
/// on SQLite (`move_stage` there leaves a deal already in place alone).
async fn sweep(tx: &Transaction<'_>, sweep: &Sweep<'_>) -> Result<Vec<i64>> {
    let candidates = sweep_candidates(tx, sweep).await?;
    if candidates.is_empty() || sweep.from == sweep.to {
        return Ok(candidates);
    }
    lock_deals(tx, &candidates).await?;
    let moved = move_still_due(tx, sweep, &candidates).await?;
    Ok(candidates
        .into_iter()
        .filter(|id| moved.contains(id))
        .collect())
}

impl Database {
    /// Applies one cart or order record in one transaction; returns what it did and the
    /// stage changes it recorded.
    #[cfg(test)]
    pub async fn apply_cart_event(
        &self,
        upsert: DealUpsert,
        rules: CartRules,
    ) -> Result<(CartOutcome, u64)> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        let applied = apply_cart(&tx, &upsert, rules).await?;
        tx.commit().await?;
        Ok(applied)
    }

    /// Moves carts of `connection` idle in `from` since before `idle_since` to `to`
    /// (see `Store::abandon_idle_carts`); one transaction. Returns the moved ids.
    pub async fn abandon_idle_carts(
        &self,
        connection: &str,
        from: StageRef,
        to: StageRef,
        idle_since: DateTime<Utc>,
        now: DateTime<Utc>,
        limit: u32,
    ) -> Result<Vec<i64>> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        let cutoff = to_ms(idle_since);
        let moved = sweep(
            &tx,
            &Sweep {
                connection,
                from: &from,
                to: &to,
                status: DealStatus::Open,
                entered_by: cutoff,
                active_by: cutoff,
                at: to_ms(now),
                limit,
            },
        )
        .await?;
        tx.commit().await?;
        Ok(moved)
    }

    /// Moves carts of `connection` in one of `stages` since before `stale_since` to `to`
    /// (see `Store::expire_stale_carts`); one transaction. Returns the moved ids.
    pub async fn expire_stale_carts(
        &self,
        connection: &str,
        stages: Vec<StageRef>,
        to: StageRef,
        stale_since: DateTime<Utc>,
        now: DateTime<Utc>,
        limit: u32,
    ) -> Result<Vec<i64>> {
        let mut client = self.client().await?;
        let tx = client.transaction().await?;
        let mut moved = Vec::new();
        for from in &stages {
            moved.extend(
                sweep(
                    &tx,
                    &Sweep {
                        connection,
                        from,
                        to: &to,
                        status: DealStatus::Lost,
                        entered_by: to_ms(stale_since),
                        active_by: i64::MAX,
                        at: to_ms(now),
                        limit,
                    },
                )
                .await?,
            );
        }
        tx.commit().await?;
        Ok(moved)
    }
}

#[cfg(test)]
mod tests {
    //! Replicas at once: two `Store`s on one test database stand for two processes.
    //! The rules themselves run on both engines in `store::carts`.
    use super::super::test_database;
    use super::super::tests::url_of;
    use crate::store::both_backends::deal_rows;
    use crate::store::carts::tests::{at, cart};
    use crate::store::deals::tests::{stored_deal, upsert};
    use crate::store::{CartRules, DealChange, Store};
    use chrono::{Duration, Utc};
    use std::collections::HashSet;

    const CARTS: usize = 20;

    /// Two stores on a fresh database of `test`, or `None` where it is skipped.
    async fn two_replicas(
        test: &str,
    ) -> Option<(super::super::test_cluster::TestDatabase, Store, Store)> {
        let database = test_database(test)?;
        let url = url_of(&database);
        let one = Store::open_postgres(&url).await.unwrap();
        let two = Store::open_postgres(&url).await.unwrap();
        Some((database, one, two))
    }

    /// Carts `c0…` of connection `shop` in `checkout_started`, with keys `k:c0…`,
    /// entered at `when`.
    async fn carts(store: &Store, when: chrono::DateTime<Utc>) {
        let changes = (0..CARTS)
            .map(|n| {
                let id = format!("c{n}");
                DealChange::Cart(cart(
                    "shop",
                    &id,
                    "checkout_started",
                    &[&format!("k:{id}")],
                    when,
                ))
            })
            .collect();
        store
            .apply_deal_changes(changes, CartRules::default(), Utc::now())
            .await
            .unwrap();
    }

    /// Each cart `c0…`: (stage, history rows).
    async fn cart_states(store: &Store) -> Vec<(String, usize)> {
        let mut states = Vec::new();
        for n in 0..CARTS {
            let deal = stored_deal(store, "shop", &format!("c{n}")).await;
            let history = store.history(deal.id).await.unwrap().len();
            states.push((deal.stage.as_str().to_owned(), history));
        }
        states
    }

    #[tokio::test]
    async fn replicas_applying_the_same_webhook_pass_at_once_write_each_deal_and_history_row_once()
    {
        let Some((_database, one, two)) = two_replicas(
            "replicas_applying_the_same_webhook_pass_at_once_write_each_deal_and_history_row_once",
        )
        .await
        else {
            return;
        };
        let t0 = Utc::now() - Duration::hours(3);
        carts(&one, t0).await;
        // One pass: an order of another connection per cart, and a new CRM deal each.
        let pass: Vec<DealChange> = (0..CARTS)
            .flat_map(|n| {
                let key = format!("k:c{n}");
                let order = cart(
                    "shop-b",
                    &format!("order:{n}"),
                    "purchase_completed",
                    &[&key],
                    t0 + Duration::hours(1),
                );
                [
                    DealChange::Cart(order),
                    DealChange::Upsert(upsert(&format!("d{n}"), "proposal", t0)),
                ]
            })
            .collect();
        let rules = CartRules::default();
        let (a, b) = tokio::join!(
            one.apply_deal_changes(pass.clone(), rules, Utc::now()),
            two.apply_deal_changes(pass, rules, Utc::now()),
        );
        a.unwrap();
        b.unwrap();
        let won = vec![("purchase_completed".to_owned(), 2); CARTS];
        assert_eq!(cart_states(&one).await, won, "each cart completed once");
        for n in 0..CARTS {
            assert!(
                one.deal_by_external_id("shop-b", &format!("order:{n}"))
                    .await
                    .unwrap()
                    .is_none(),
                "a matched order is not stored as its own deal"
            );
            let deal = stored_deal(&two, "crm", &format!("d{n}")).await;
            assert_eq!(two.history(deal.id).await.unwrap().len(), 1, "d{n}");
        }
        assert_eq!(deal_rows(&one).await, 2 * CARTS as i64);
    }

    #[tokio::test]
    async fn an_order_on_one_replica_and_a_late_checkout_update_on_another_never_reopen_the_cart() {
        let Some((_database, one, two)) = two_replicas(
            "an_order_on_one_replica_and_a_late_checkout_update_on_another_never_reopen_the_cart",
        )
        .await
        else {
            return;
        };
        let t0 = Utc::now() - Duration::hours(3);
        carts(&one, t0).await;
        // The orders come from the point of sale, matched to the carts by key.
        let record = |connection: &str, id: String, n: usize, stage: &str, minutes: i64| {
            let mut record = cart(
                connection,
                &id,
                stage,
                &[&format!("k:c{n}")],
                t0 + Duration::minutes(minutes),
            );
            record.source.title = format!("{id}, {stage} at {minutes}");
            DealChange::Cart(record)
        };
        let orders = (0..CARTS)
            .map(|n| record("pos", format!("order:{n}"), n, "purchase_completed", 30))
            .collect();
        let updates = (0..CARTS)
            .map(|n| record("shop", format!("c{n}"), n, "checkout_started", 45))
            .collect();
        let rules = CartRules::default();
        let (a, b) = tokio::join!(
            one.apply_deal_changes(orders, rules, Utc::now()),
            two.apply_deal_changes(updates, rules, Utc::now()),
        );
        a.unwrap();
        b.unwrap();
        let won = vec![("purchase_completed".to_owned(), 2); CARTS];
        assert_eq!(cart_states(&two).await, won);
    }

    #[tokio::test]
    async fn two_sweepers_at_once_move_each_cart_once_with_one_history_row() {
        let Some((_database, one, two)) =
            two_replicas("two_sweepers_at_once_move_each_cart_once_with_one_history_row").await
        else {
            return;
        };
        let now = Utc::now();
        carts(&one, now - Duration::hours(2)).await;
        let all: HashSet<i64> = {
            let mut ids = HashSet::new();
            for n in 0..CARTS {
                ids.insert(stored_deal(&one, "shop", &format!("c{n}")).await.id);
            }
            ids
        };
        let cutoff = now - Duration::hours(1);
        let abandon = |store: &Store| {
            let store = store.clone();
            async move {
                store
                    .abandon_idle_carts(
                        "shop",
                        at("checkout_started"),
                        at("cart_abandoned"),
                        cutoff,
                        now,
                        100,
                    )
                    .await
                    .unwrap()
            }
        };
        let (a, b) = tokio::join!(abandon(&one), abandon(&two));
        assert_moved_once(&a, &b, &all);
        let abandoned = vec![("cart_abandoned".to_owned(), 2); CARTS];
        assert_eq!(cart_states(&one).await, abandoned);

        let later = now + Duration::days(31);
        let expire = |store: &Store| {
            let store = store.clone();
            async move {
                store
                    .expire_stale_carts(
                        "shop",
                        vec![at("checkout_started"), at("cart_abandoned")],
                        at("expired"),
                        later - Duration::days(30),
                        later,
                        100,
                    )
                    .await
                    .unwrap()
            }
        };
        let (a, b) = tokio::join!(expire(&one), expire(&two));
        assert_moved_once(&a, &b, &all);
        let expired = vec![("expired".to_owned(), 3); CARTS];
        assert_eq!(cart_states(&two).await, expired);
    }

    /// The two sweeps moved every cart of `all`, none twice.
    fn assert_moved_once(a: &[i64], b: &[i64], all: &HashSet<i64>) {
        let moved: HashSet<i64> = a.iter().chain(b).copied().collect();
        assert_eq!(a.len() + b.len(), moved.len(), "moved twice: {a:?} {b:?}");
        assert_eq!(&moved, all);
    }
}
