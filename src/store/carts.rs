//! Carts: the e-commerce side of deals. A cart is a deal with cart keys (checkout
//! token, cart token, session id); orders find their cart through those keys, in any
//! connection, or through the shopper (the person key of the address, any spelling)
//! within a window.
//!
//! Invariants:
//! - A cart's stage only moves forward on the source's say-so: a record that says "still
//!   open" never moves a stored cart out of the stage dealsync or an order put it in
//!   (abandoned, followed up, purchased, expired). See `held_stage` in `deals::plan`.
//! - An order matched to carts moves them to the won stage in the same transaction that
//!   records it, and is not stored a second time as its own deal (no double revenue).
//! - Abandoning and expiring re-check the stage inside their transaction, so a cart an
//!   order reached a moment earlier is left alone.

use super::deals::{DealUpsert, UpsertOutcome, move_stage, upsert_all, write_keys};
use super::{Result, Store, to_ms};
use crate::domain::people::person_key;
use crate::domain::{ChangeCause, DealStatus, StageRef};
use chrono::{DateTime, Utc};
use rusqlite::{OptionalExtension, Transaction, params, params_from_iter};

/// How cart events are matched.
#[derive(Debug, Clone, Copy)]
pub struct CartRules {
    /// An order with no key match completes the shopper's latest open cart started
    /// within this window before it.
    pub email_window: chrono::Duration,
}

impl Default for CartRules {
    fn default() -> Self {
        CartRules {
            email_window: chrono::Duration::days(7),
        }
    }
}

/// What applying a cart event did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CartOutcome {
    /// The record was stored as its own deal (created or updated).
    Upserted(UpsertOutcome),
    /// An order completed these existing carts; it was not stored separately.
    Matched(Vec<i64>),
    /// A checkout whose purchase is already recorded on this deal; not stored again.
    Superseded(i64),
}

/// A live deal sharing a key with a cart record.
pub(in crate::store) struct Match {
    pub id: i64,
    pub status: String,
}

/// What a cart record does, decided from its own deal and the deals sharing its keys,
/// the same on both backends.
pub(in crate::store) enum CartStep {
    /// Stored as its own deal.
    Store,
    /// A checkout whose purchase deal `0` already records: not stored again.
    Superseded(i64),
    /// An order: completes `matched`, the key matches still open or lost; with
    /// `by_email`, the shopper's latest cart ([`email_window`]) is looked up too.
    Order { matched: Vec<i64>, by_email: bool },
}

/// What `upsert` does, given its own deal's id (if stored) and the live deals of its
/// pipeline that share a key with it (`others`, own deal excluded).
pub(in crate::store) fn cart_step(
    upsert: &DealUpsert,
    own: Option<i64>,
    others: &[Match],
) -> CartStep {
    if upsert.status != DealStatus::Won {
        if own.is_none()
            && let Some(won) = others.iter().find(|m| m.status == "won")
        {
            return CartStep::Superseded(won.id);
        }
        return CartStep::Store;
    }
    CartStep::Order {
        matched: others
            .iter()
            .filter(|m| m.status == "open" || m.status == "lost")
            .map(|m| m.id)
            .collect(),
        by_email: own.is_none() && others.is_empty() && upsert.source.contact_email.is_some(),
    }
}

/// When an order happened: the source's modification time, else its creation time,
/// else when it was observed.
pub(in crate::store) fn order_time(upsert: &DealUpsert) -> DateTime<Utc> {
    let source = &upsert.source;
    source
        .updated_at
        .or(source.created_at)
        .unwrap_or(upsert.observed_at)
}

/// The start times (epoch ms, inclusive) of the carts an order at `at` may complete by
/// the shopper's email.
pub(in crate::store) fn email_window(at: DateTime<Utc>, rules: CartRules) -> (i64, i64) {
    let at = to_ms(at);
    (
        at - rules.email_window.num_milliseconds(),
        at + CLOCK_SKEW_MS,
    )
}

/// Whether an order is stored as its own deal besides the carts it completes: when it
/// has its own deal already, or completes nothing and shares no key.
pub(in crate::store) fn order_is_stored(
    own: Option<i64>,
    others: &[Match],
    matched: &[i64],
) -> bool {
    own.is_some() || (others.is_empty() && matched.is_empty())
}

/// What an order did: completed `matched`, or, completing none, was stored (`stored`).
pub(in crate::store) fn order_outcome(
    matched: Vec<i64>,
    stored: Option<UpsertOutcome>,
) -> CartOutcome {
    match stored {
        Some(outcome) if matched.is_empty() => CartOutcome::Upserted(outcome),
        _ => CartOutcome::Matched(matched),
    }
}

fn own_deal(tx: &Transaction<'_>, upsert: &DealUpsert) -> Result<Option<i64>> {
    Ok(tx
        .query_row(
            "SELECT id FROM deals WHERE connection = ?1 AND external_id = ?2",
            params![
                upsert.connection.as_str(),
                upsert.source.external_id.as_str()
            ],
            |row| row.get(0),
        )
        .optional()?)
}

/// The key-match query for `keys` keys: `?1` own deal id, `?2` pipeline, `?3…` keys.
///
/// CROSS JOIN pins the order: the few rows of the keys' primary key first, then their
/// deals by id. With a plain join the planner walks every deal of the pipeline (its
/// stage index) and probes the keys: a scan of the whole shop per webhook.
fn key_matches_sql(keys: usize) -> String {
    let placeholders = (0..keys)
        .map(|at| format!("?{}", at + 3))
        .collect::<Vec<_>>()
        .join(", ");
    format!(
        "SELECT DISTINCT d.id, d.status FROM deal_keys k CROSS JOIN deals d ON d.id = k.deal_id
         WHERE k.key IN ({placeholders}) AND d.deleted_at IS NULL AND d.id != ?1
           AND d.pipeline IS ?2
         ORDER BY d.id"
    )
}

/// Live deals in `pipeline` sharing a key with the record, other than `own`.
fn key_matches(
    tx: &Transaction<'_>,
    keys: &[String],
    pipeline: Option<&str>,
    own: Option<i64>,
) -> Result<Vec<Match>> {
    if keys.is_empty() {
        return Ok(Vec::new());
    }
    let sql = key_matches_sql(keys.len());
    let mut values: Vec<rusqlite::types::Value> =
        vec![own.unwrap_or(-1).into(), pipeline.map(str::to_owned).into()];
    values.extend(keys.iter().map(|key| key.clone().into()));
    let mut statement = tx.prepare(&sql)?;
    let rows = statement.query_map(params_from_iter(values), |row| {
        Ok(Match {
            id: row.get(0)?,
            status: row.get(1)?,
        })
    })?;
    Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
}

/// How far a cart may seem to start after its order: the two come from different
/// systems whose clocks and timestamp precision differ.
const CLOCK_SKEW_MS: i64 = 10 * 60 * 1000;

/// The shopper's latest open cart in `pipeline` started within `window` (see
/// [`email_window`]): a cart of the same person (`domain::people`), whichever
/// spelling of the address each carries.
fn email_match(
    tx: &Transaction<'_>,
    email: &str,
    pipeline: Option<&str>,
    (from, to): (i64, i64),
) -> Result<Option<i64>> {
    Ok(tx
        .query_row(
            "SELECT id FROM deals
             WHERE person_key = ?1 AND pipeline IS ?2 AND status = 'open'
               AND deleted_at IS NULL AND cart_keys != '[]'
               AND coalesce(source_created_at, first_seen_at) BETWEEN ?3 AND ?4
             ORDER BY coalesce(source_created_at, first_seen_at) DESC, id DESC LIMIT 1",
            params![person_key(email), pipeline, from, to],
            |row| row.get(0),
        )
        .optional()?)
}

pub(super) fn apply(
    tx: &Transaction<'_>,
    upsert: &DealUpsert,
    rules: CartRules,
) -> Result<CartOutcome> {
    let source = &upsert.source;
    let pipeline = upsert.target.pipeline.as_ref().map(|p| p.as_str());
    let own = own_deal(tx, upsert)?;
    let others = key_matches(tx, &source.cart_keys, pipeline, own)?;
    let (mut matched, by_email) = match cart_step(upsert, own, &others) {
        CartStep::Superseded(id) => return Ok(CartOutcome::Superseded(id)),
        CartStep::Store => {
            return Ok(CartOutcome::Upserted(upsert_all(tx, vec![upsert.clone()])?));
        }
        CartStep::Order { matched, by_email } => (matched, by_email),
    };
    let at = order_time(upsert);
    if by_email
        && let Some(email) = &source.contact_email
        && let Some(id) = email_match(tx, email.as_str(), pipeline, email_window(at, rules))?
    {
        matched.push(id);
    }
    for id in &matched {
        move_stage(
            tx,
            *id,
            &upsert.target,
            DealStatus::Won,
            at,
            ChangeCause::Webhook,
        )?;
        write_keys(tx, *id, &source.cart_keys)?;
    }
    let stored = if order_is_stored(own, &others, &matched) {
        Some(upsert_all(tx, vec![upsert.clone()])?)
    } else {
        None
    };
    Ok(order_outcome(matched, stored))
}

fn ids(tx: &Transaction<'_>, sql: &str, values: Vec<rusqlite::types::Value>) -> Result<Vec<i64>> {
    let mut statement = tx.prepare(sql)?;
    let rows = statement.query_map(params_from_iter(values), |row| row.get(0))?;
    Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
}

impl Store {
    #[cfg(test)]
    /// Applies one cart or order record: upserts it, or completes the carts an order
    /// matches (see the module invariants). One transaction.
    pub async fn apply_cart_event(
        &self,
        upsert: DealUpsert,
        rules: CartRules,
    ) -> Result<CartOutcome> {
        if let Some(database) = self.postgres() {
            let (outcome, stage_changes) = database
                .apply_cart_event(upsert, rules)
                .await
                .map_err(|error| database.named(error))?;
            self.note_stage_changes(stage_changes);
            return Ok(outcome);
        }
        self.write(move |tx| apply(tx, &upsert, rules)).await
    }

    /// Moves carts of `connection` that sit in `from` and have been idle since before
    /// `idle_since` to `to`, with a history row each (cause: follow-up). Uses the
    /// (pipeline, stage, stage_entered_at) index; returns the moved deal ids.
    pub async fn abandon_idle_carts(
        &self,
        connection: &str,
        from: StageRef,
        to: StageRef,
        idle_since: DateTime<Utc>,
        now: DateTime<Utc>,
        limit: u32,
    ) -> Result<Vec<i64>> {
        if let Some(database) = self.postgres() {
            let moved = database
                .abandon_idle_carts(connection, from, to, idle_since, now, limit)
                .await
                .map_err(|error| database.named(error))?;
            self.note_stage_changes(moved.len() as u64);
            return Ok(moved);
        }
        let connection = connection.to_owned();
        self.write(move |tx| {
            let cutoff = to_ms(idle_since);
            let found = ids(
                tx,
                "SELECT id FROM deals
                 WHERE pipeline IS ?1 AND stage = ?2 AND stage_entered_at <= ?3
                   AND connection = ?4 AND last_activity_at <= ?3 AND deleted_at IS NULL
                 ORDER BY stage_entered_at LIMIT ?5",
                vec![
                    from.pipeline.as_ref().map(|p| p.as_str().to_owned()).into(),
                    from.stage.as_str().to_owned().into(),
                    cutoff.into(),
                    connection.into(),
                    i64::from(limit).into(),
                ],
            )?;
            for id in &found {
                move_stage(tx, *id, &to, DealStatus::Open, now, ChangeCause::Followup)?;
            }
            Ok(found)
        })
        .await
    }

    /// The safety net behind the follow-ups: carts of `connection` that have sat in one
    /// of `stages` since before `stale_since` move to `to` (a lost stage). Returns the
    /// moved deal ids.
    pub async fn expire_stale_carts(
        &self,
        connection: &str,
        stages: Vec<StageRef>,
        to: StageRef,
        stale_since: DateTime<Utc>,
        now: DateTime<Utc>,
        limit: u32,
    ) -> Result<Vec<i64>> {
        if let Some(database) = self.postgres() {
            let moved = database
                .expire_stale_carts(connection, stages, to, stale_since, now, limit)
                .await
                .map_err(|error| database.named(error))?;
            self.note_stage_changes(moved.len() as u64);
            return Ok(moved);
        }
        let connection = connection.to_owned();
        self.write(move |tx| {
            let mut moved = Vec::new();
            for stage in &stages {
                let found = ids(
                    tx,
                    "SELECT id FROM deals
                     WHERE pipeline IS ?1 AND stage = ?2 AND stage_entered_at <= ?3
                       AND connection = ?4 AND deleted_at IS NULL
                     ORDER BY stage_entered_at LIMIT ?5",
                    vec![
                        stage
                            .pipeline
                            .as_ref()
                            .map(|p| p.as_str().to_owned())
                            .into(),
                        stage.stage.as_str().to_owned().into(),
                        to_ms(stale_since).into(),
                        connection.clone().into(),
                        i64::from(limit).into(),
                    ],
                )?;
                for id in found {
                    move_stage(tx, id, &to, DealStatus::Lost, now, ChangeCause::Followup)?;
                    moved.push(id);
                }
            }
            Ok(moved)
        })
        .await
    }
}

#[cfg(test)]
pub(in crate::store) mod tests {
    use super::*;
    use crate::domain::{ConnectionName, EmailAddress, PipelineKey, SourceDeal, StageKey};
    use crate::store::both_backends::on_both;
    use crate::store::deal_changes::DealChange;
    use crate::store::deals::tests::stored_deal;
    use crate::store::tests::temp_store;

    /// `ecommerce.<stage>`.
    pub(in crate::store) fn at(stage: &str) -> StageRef {
        StageRef {
            pipeline: Some(PipelineKey::new("ecommerce")),
            stage: StageKey::new(stage),
        }
    }

    /// A cart (an order in `purchase_completed`) of `connection` with `keys`, changed at
    /// `when`.
    pub(in crate::store) fn cart(
        connection: &str,
        id: &str,
        stage: &str,
        keys: &[&str],
        when: DateTime<Utc>,
    ) -> DealUpsert {
        let mut source = SourceDeal::new(id, format!("Cart {id}"), "shop", stage);
        source.cart_keys = keys.iter().map(|k| (*k).to_owned()).collect();
        source.contact_email = EmailAddress::parse("shopper@example.com");
        source.created_at = Some(when);
        source.updated_at = Some(when);
        let won = stage == "purchase_completed";
        DealUpsert {
            connection: ConnectionName::new(connection),
            source,
            target: at(stage),
            status: if won {
                DealStatus::Won
            } else {
                DealStatus::Open
            },
            observed_at: when,
            cause: ChangeCause::Webhook,
        }
    }

    /// SQLite only: the plan of SQLite's key-match query, which pins its join order;
    /// PostgreSQL's statement is its own (`postgres::carts`).
    #[tokio::test]
    async fn matching_a_carts_keys_reads_the_keys_index_not_every_deal_of_the_pipeline() {
        let (_dir, store) = temp_store();
        let when = Utc::now();
        for n in 0..50 {
            let key = format!("shopify:cart:{n}");
            let upsert = cart("shop", &format!("c{n}"), "checkout_started", &[&key], when);
            store
                .apply_cart_event(upsert, CartRules::default())
                .await
                .unwrap();
        }
        let plan = store
            .read(|db| {
                let sql = format!("EXPLAIN QUERY PLAN {}", key_matches_sql(2));
                let mut statement = db.prepare(&sql)?;
                let rows = statement.query_map(
                    rusqlite::params![-1, "ecommerce", "shopify:cart:1", "shopify:cart:2"],
                    |row| row.get::<_, String>(3),
                )?;
                Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
            })
            .await
            .unwrap();
        assert!(
            plan[0].starts_with("SEARCH k USING PRIMARY KEY"),
            "{plan:?}"
        );
        assert!(plan[1].contains("INTEGER PRIMARY KEY"), "{plan:?}");
    }

    #[tokio::test]
    async fn an_order_in_another_connection_completes_the_cart_it_shares_a_key_with() {
        on_both(
            "an_order_in_another_connection_completes_the_cart_it_shares_a_key_with",
            async |store| {
                let t0 = Utc::now() - chrono::Duration::hours(3);
                let rules = CartRules::default();
                store
                    .apply_cart_event(
                        cart("shop-a", "tok1", "checkout_started", &["k:tok1"], t0),
                        rules,
                    )
                    .await
                    .unwrap();
                let order = cart(
                    "shop-b",
                    "order:9",
                    "purchase_completed",
                    &["k:tok1"],
                    t0 + chrono::Duration::hours(1),
                );
                let outcome = store.apply_cart_event(order.clone(), rules).await.unwrap();
                let cart_deal = stored_deal(&store, "shop-a", "tok1").await;
                assert_eq!(outcome, CartOutcome::Matched(vec![cart_deal.id]));
                assert_eq!(cart_deal.status, DealStatus::Won);
                assert!(
                    store
                        .deal_by_external_id("shop-b", "order:9")
                        .await
                        .unwrap()
                        .is_none()
                );
                // The same order again changes nothing and still stores no second deal.
                store.apply_cart_event(order, rules).await.unwrap();
                assert!(
                    store
                        .deal_by_external_id("shop-b", "order:9")
                        .await
                        .unwrap()
                        .is_none()
                );
                assert_eq!(store.history(cart_deal.id).await.unwrap().len(), 2);
            },
        )
        .await;
    }

    #[tokio::test]
    async fn an_order_without_keys_completes_the_latest_cart_of_the_same_email() {
        on_both(
            "an_order_without_keys_completes_the_latest_cart_of_the_same_email",
            async |store| {
                let t0 = Utc::now() - chrono::Duration::hours(5);
                let rules = CartRules::default();
                for (id, offset) in [("old", 0), ("new", 1)] {
                    store
                        .apply_cart_event(
                            cart(
                                "shop",
                                id,
                                "checkout_started",
                                &[id],
                                t0 + chrono::Duration::hours(offset),
                            ),
                            rules,
                        )
                        .await
                        .unwrap();
                }
                let order = cart(
                    "pos",
                    "order:1",
                    "purchase_completed",
                    &["unrelated"],
                    t0 + chrono::Duration::hours(2),
                );
                store.apply_cart_event(order, rules).await.unwrap();
                let new = stored_deal(&store, "shop", "new").await;
                let old = stored_deal(&store, "shop", "old").await;
                assert_eq!(
                    (new.status, old.status),
                    (DealStatus::Won, DealStatus::Open)
                );
            },
        )
        .await;
    }

    #[tokio::test]
    async fn a_late_checkout_update_does_not_reopen_a_purchased_cart() {
        on_both(
            "a_late_checkout_update_does_not_reopen_a_purchased_cart",
            async |store| {
                let t0 = Utc::now() - chrono::Duration::hours(2);
                let rules = CartRules::default();
                // The order arrives first, under the checkout's token.
                store
                    .apply_cart_event(
                        cart(
                            "shop",
                            "tok",
                            "purchase_completed",
                            &["k:tok"],
                            t0 + chrono::Duration::minutes(30),
                        ),
                        rules,
                    )
                    .await
                    .unwrap();
                // Then the checkout's own create and a later update.
                for minutes in [0, 45] {
                    store
                        .apply_cart_event(
                            cart(
                                "shop",
                                "tok",
                                "checkout_started",
                                &["k:tok"],
                                t0 + chrono::Duration::minutes(minutes),
                            ),
                            rules,
                        )
                        .await
                        .unwrap();
                }
                let deal = stored_deal(&store, "shop", "tok").await;
                assert_eq!(
                    (deal.status, deal.stage.as_str()),
                    (DealStatus::Won, "purchase_completed")
                );
                assert_eq!(store.history(deal.id).await.unwrap().len(), 1);
            },
        )
        .await;
    }

    /// One webhook pass of records that read what earlier ones of the same pass wrote:
    /// two records of one checkout, an order completing that checkout, a checkout an
    /// order already completed, a record keeping a stored contact. Applied in one transaction,
    /// each sees the pass's earlier changes as if applied one by one (on PostgreSQL the
    /// pass is applied in segments of records with no deal or key in common).
    #[tokio::test]
    async fn a_pass_of_carts_and_orders_applies_as_if_one_by_one() {
        on_both(
            "a_pass_of_carts_and_orders_applies_as_if_one_by_one",
            async |store| {
                let t0 = Utc::now() - chrono::Duration::hours(3);
                let minutes = |m: i64| t0 + chrono::Duration::minutes(m);
                let rules = CartRules::default();
                // Before the pass: an order under key k:done, and a stored cart with a contact.
                store
                    .apply_cart_event(
                        cart(
                            "shop",
                            "o-old",
                            "purchase_completed",
                            &["k:done"],
                            minutes(0),
                        ),
                        rules,
                    )
                    .await
                    .unwrap();
                store
                    .apply_cart_event(
                        cart(
                            "shop",
                            "known",
                            "checkout_started",
                            &["k:known"],
                            minutes(0),
                        ),
                        rules,
                    )
                    .await
                    .unwrap();
                // An open cart record changes a stored cart's fields, not its stage
                // (`deals::plan::held_stage`).
                let mut without_contact = cart(
                    "shop",
                    "known",
                    "checkout_started",
                    &["k:known"],
                    minutes(5),
                );
                without_contact.source.contact_email = None;
                without_contact.source.contact_name = Some("Grace Hopper".to_owned());
                let mut c1_named = cart("shop", "c1", "checkout_started", &["k:c1"], minutes(12));
                c1_named.source.contact_name = Some("Ada Lovelace".to_owned());
                let pass = vec![
                    DealChange::Cart(cart(
                        "shop",
                        "c1",
                        "checkout_started",
                        &["k:c1"],
                        minutes(10),
                    )),
                    DealChange::Cart(without_contact),
                    DealChange::Cart(cart(
                        "shop",
                        "late",
                        "checkout_started",
                        &["k:done"],
                        minutes(11),
                    )),
                    DealChange::Cart(c1_named),
                    DealChange::Cart(cart(
                        "shop",
                        "c2",
                        "checkout_started",
                        &["k:c2"],
                        minutes(13),
                    )),
                    DealChange::Cart(cart(
                        "web",
                        "o1",
                        "purchase_completed",
                        &["k:c1"],
                        minutes(14),
                    )),
                    DealChange::Cart(cart(
                        "shop",
                        "c3",
                        "checkout_started",
                        &["k:c3"],
                        minutes(15),
                    )),
                ];
                store
                    .apply_deal_changes(pass, rules, Utc::now())
                    .await
                    .unwrap();

                let c1 = stored_deal(&store, "shop", "c1").await;
                assert_eq!(
                    (c1.status, c1.stage.as_str()),
                    (DealStatus::Won, "purchase_completed"),
                    "the order completes the checkout stored earlier in the same pass"
                );
                let stages: Vec<String> = store
                    .history(c1.id)
                    .await
                    .unwrap()
                    .iter()
                    .map(|entry| entry.to_stage.as_str().to_owned())
                    .collect();
                assert_eq!(stages, ["checkout_started", "purchase_completed"]);
                assert_eq!(
                    c1.contact_name.as_deref(),
                    Some("Ada Lovelace"),
                    "the second record of the checkout in the pass is applied"
                );
                let known = stored_deal(&store, "shop", "known").await;
                assert_eq!(known.contact_name.as_deref(), Some("Grace Hopper"));
                assert_eq!(
                    known.contact_email.as_ref().map(|e| e.as_str()),
                    Some("shopper@example.com"),
                    "the record keeps the stored contact"
                );
                assert!(
                    store
                        .deal_by_external_id("shop", "late")
                        .await
                        .unwrap()
                        .is_none(),
                    "a checkout of an order already stored is not stored"
                );
                for id in ["c2", "c3"] {
                    let deal = stored_deal(&store, "shop", id).await;
                    assert_eq!(
                        (deal.status, deal.stage.as_str()),
                        (DealStatus::Open, "checkout_started")
                    );
                }
            },
        )
        .await;
    }

    #[tokio::test]
    async fn idle_carts_are_abandoned_once_and_stale_ones_expire() {
        on_both(
            "idle_carts_are_abandoned_once_and_stale_ones_expire",
            async |store| {
                let now = Utc::now();
                let rules = CartRules::default();
                store
                    .apply_cart_event(
                        cart(
                            "shop",
                            "idle",
                            "checkout_started",
                            &["a"],
                            now - chrono::Duration::hours(2),
                        ),
                        rules,
                    )
                    .await
                    .unwrap();
                store
                    .apply_cart_event(
                        cart(
                            "shop",
                            "busy",
                            "checkout_started",
                            &["b"],
                            now - chrono::Duration::minutes(5),
                        ),
                        rules,
                    )
                    .await
                    .unwrap();
                let cutoff = now - chrono::Duration::hours(1);
                // The same pass twice: the second finds nothing left to abandon.
                let abandon = || {
                    store.abandon_idle_carts(
                        "shop",
                        at("checkout_started"),
                        at("cart_abandoned"),
                        cutoff,
                        now,
                        100,
                    )
                };
                let moved = abandon().await.unwrap();
                assert_eq!(moved.len(), 1);
                let again = abandon().await.unwrap();
                assert!(again.is_empty());
                let idle = stored_deal(&store, "shop", "idle").await;
                assert_eq!(idle.stage.as_str(), "cart_abandoned");
                let history = store.history(idle.id).await.unwrap();
                assert_eq!(history.last().unwrap().cause, ChangeCause::Followup);

                let later = now + chrono::Duration::days(31);
                let expired = store
                    .expire_stale_carts(
                        "shop",
                        vec![at("cart_abandoned")],
                        at("expired"),
                        later - chrono::Duration::days(30),
                        later,
                        100,
                    )
                    .await
                    .unwrap();
                assert_eq!(expired, vec![idle.id]);
                let idle = store.deal(idle.id).await.unwrap().unwrap();
                assert_eq!(idle.status, DealStatus::Lost);
            },
        )
        .await;
    }
}
