//! What webhook rows change in the main database: deals and carts.
//!
//! The inbox (`inbox.rs`, its own file) holds the deliveries; this module writes what
//! the webhook worker planned from them into the deals, through the cart rules
//! (`carts.rs`) or the plain upsert (`deals.rs`), and marks deals deleted.
//!
//! Invariants:
//! - A pass's changes commit in one transaction of the main database; only then are its
//!   rows marked processed in the inbox (a second commit). A crash between the two
//!   applies the rows again, which the upserts make a no-op.
//! - A webhook record never erases contact or owner data it does not carry
//!   ([`keep_known_contact`]).
//! - A deleted deal keeps its row and its history.
//! - Both engines apply the same changes with the same decisions: the contact a record
//!   keeps ([`keep_known`]) and the cart rules are shared; `postgres::deal_changes`
//!   executes them on PostgreSQL. Marking the rows processed goes through the inbox's
//!   `settle_webhooks` on either engine.

use super::carts::{self, CartRules};
use super::deals::{Columns, DealUpsert, upsert_all};
use super::inbox::Settlement;
use super::{Result, Store, to_ms};
use chrono::{DateTime, Utc};
use rusqlite::{OptionalExtension, Transaction, params};

/// One change a webhook row asks of the deals, ready to write.
#[derive(Debug, Clone)]
pub enum DealChange {
    /// A cart or an order: applied through the cart rules.
    Cart(DealUpsert),
    /// Any other record.
    Upsert(DealUpsert),
    /// The record was deleted in its source.
    Delete {
        connection: String,
        external_id: String,
    },
    /// A bounce or complaint an email provider reported, with what it does
    /// (`store::delivery`).
    Delivery {
        event: Box<super::NewDeliveryEvent>,
        policy: super::DeliveryPolicy,
    },
}

/// The contact and owner fields of a stored deal, which a webhook record that lacks
/// them keeps ([`keep_known`]). Read by either backend ([`known_contact_from`]).
pub(in crate::store) struct KnownContact {
    email: Option<String>,
    name: Option<String>,
    owner: Option<String>,
    owner_email: Option<String>,
    consent: Option<bool>,
}

/// The columns [`known_contact_from`] reads, in its order.
pub(in crate::store) const KNOWN_CONTACT_COLUMNS: &str =
    "contact_email, contact_name, owner, owner_email, marketing_consent";

/// Reads a [`KNOWN_CONTACT_COLUMNS`] row of either backend.
pub(in crate::store) fn known_contact_from<R: Columns>(row: &R) -> Result<KnownContact, R::Error> {
    Ok(KnownContact {
        email: row.opt_text(0)?,
        name: row.opt_text(1)?,
        owner: row.opt_text(2)?,
        owner_email: row.opt_text(3)?,
        consent: row.opt_bool(4)?,
    })
}

/// Whether the record carries every contact and owner field, so nothing stored needs
/// to be read for it.
pub(in crate::store) fn carries_every_contact_field(upsert: &DealUpsert) -> bool {
    let source = &upsert.source;
    source.contact_email.is_some()
        && source.contact_name.is_some()
        && source.owner.is_some()
        && source.owner_email.is_some()
        && source.marketing_consent.is_some()
}

/// Fills the contact and owner fields a webhook record does not carry from the stored
/// deal's `known` ones, so a webhook never erases what a pull (or an earlier delivery)
/// knew: a Pipedrive deal event names the person by id only, with no email.
pub(in crate::store) fn keep_known(upsert: &mut DealUpsert, known: KnownContact) {
    let source = &mut upsert.source;
    if source.contact_email.is_none() {
        source.contact_email = known
            .email
            .as_deref()
            .and_then(crate::domain::EmailAddress::parse);
    }
    if source.contact_name.is_none() {
        source.contact_name = known.name;
    }
    // A stored owner email belongs to the stored owner: a record naming another owner
    // (reassigned in the CRM) does not inherit the previous owner's address.
    let same_owner = source.owner.is_none() || source.owner == known.owner;
    if source.owner.is_none() {
        source.owner = known.owner;
    }
    if source.owner_email.is_none() && same_owner {
        source.owner_email = known
            .owner_email
            .as_deref()
            .and_then(crate::domain::EmailAddress::parse);
    }
    if source.marketing_consent.is_none() {
        source.marketing_consent = known.consent;
    }
}

/// [`keep_known`] with the stored deal read on SQLite.
fn keep_known_contact(tx: &Transaction<'_>, upsert: &mut DealUpsert) -> Result<()> {
    if carries_every_contact_field(upsert) {
        return Ok(());
    }
    let known = tx
        .prepare_cached(&format!(
            "SELECT {KNOWN_CONTACT_COLUMNS} FROM deals WHERE connection = ?1 AND external_id = ?2"
        ))?
        .query_row(
            params![
                upsert.connection.as_str(),
                upsert.source.external_id.as_str()
            ],
            |row| known_contact_from(row),
        )
        .optional()?;
    if let Some(known) = known {
        keep_known(upsert, known);
    }
    Ok(())
}

/// Marks a deal deleted; false when unknown or already deleted.
pub(super) fn mark_deleted(
    tx: &Transaction<'_>,
    connection: &str,
    external_id: &str,
    at: DateTime<Utc>,
) -> Result<bool> {
    let changed = tx.execute(
        "UPDATE deals SET deleted_at = ?3, status = 'deleted', synced_at = ?3
         WHERE connection = ?1 AND external_id = ?2 AND deleted_at IS NULL",
        params![connection, external_id, to_ms(at)],
    )?;
    Ok(changed > 0)
}

impl Store {
    /// Applies the changes of several inbox rows to the deals in one transaction, then
    /// marks the rows processed in the inbox. A webhook record keeps the contact data
    /// it does not carry (see `keep_known`).
    pub async fn apply_webhook_batch(
        &self,
        items: Vec<(i64, Vec<DealChange>)>,
        rules: CartRules,
        now: DateTime<Utc>,
    ) -> Result<()> {
        // On PostgreSQL the changes and the settlement commit together, under the
        // rows' claims (`postgres::deal_changes::apply_webhook_rows`).
        if let Some(postgres) = self.postgres_engine() {
            let database = &postgres.database;
            let count = items.len() as u64;
            let (stage_changes, left) = database
                .apply_webhook_rows(&postgres.replica, items, rules, now)
                .await
                .map_err(|error| database.named(error))?;
            self.note_stage_changes(stage_changes);
            postgres.intake.settled(count - left.len() as u64);
            if !left.is_empty() {
                tracing::warn!(rows = ?left, "webhook rows whose claim expired during the pass were left to the replica that took them over");
            }
            return Ok(());
        }
        let ids: Vec<i64> = items.iter().map(|(id, _)| *id).collect();
        let changes = items.into_iter().flat_map(|(_, ops)| ops).collect();
        self.apply_deal_changes(changes, rules, now).await?;
        let settlements = ids
            .into_iter()
            .map(|id| Settlement::Processed { id, at: now })
            .collect();
        self.settle_webhooks(settlements).await
    }

    /// Applies deal changes, in order, in one transaction of the main database.
    pub(in crate::store) async fn apply_deal_changes(
        &self,
        changes: Vec<DealChange>,
        rules: CartRules,
        now: DateTime<Utc>,
    ) -> Result<()> {
        if let Some(database) = self.postgres() {
            let stage_changes = database
                .apply_deal_changes(changes, rules, now)
                .await
                .map_err(|error| database.named(error))?;
            self.note_stage_changes(stage_changes);
            return Ok(());
        }
        self.write(move |tx| {
            for op in changes {
                match op {
                    DealChange::Cart(mut upsert) => {
                        keep_known_contact(tx, &mut upsert)?;
                        carts::apply(tx, &upsert, rules)?;
                    }
                    DealChange::Upsert(mut upsert) => {
                        keep_known_contact(tx, &mut upsert)?;
                        upsert_all(tx, vec![upsert])?;
                    }
                    DealChange::Delete {
                        connection,
                        external_id,
                    } => {
                        mark_deleted(tx, &connection, &external_id, now)?;
                    }
                    DealChange::Delivery { event, policy } => {
                        super::delivery::record_one(tx, &event, &policy, now)?;
                    }
                }
            }
            Ok(())
        })
        .await
    }

    /// Marks a deal deleted in its source; returns false when it is unknown or already
    /// deleted. The row and its history are kept.
    pub async fn mark_deal_deleted(
        &self,
        connection: &str,
        external_id: &str,
        at: DateTime<Utc>,
    ) -> Result<bool> {
        if let Some(database) = self.postgres() {
            return database
                .mark_deal_deleted(connection, external_id, at)
                .await
                .map_err(|error| database.named(error));
        }
        let (connection, external_id) = (connection.to_owned(), external_id.to_owned());
        self.write(move |tx| mark_deleted(tx, &connection, &external_id, at))
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::both_backends::on_both;
    use crate::store::deals::tests::stored_deal;
    use crate::store::inbox::tests::event;

    /// A Pipedrive deal of connection `pd`, open in `stage`, as `cause` delivers it.
    fn pd_upsert(
        source: crate::domain::SourceDeal,
        stage: &str,
        cause: crate::domain::ChangeCause,
    ) -> crate::store::DealUpsert {
        crate::store::DealUpsert {
            connection: crate::domain::ConnectionName::new("pd"),
            source,
            target: crate::domain::StageRef {
                pipeline: None,
                stage: crate::domain::StageKey::new(stage),
            },
            status: crate::domain::DealStatus::Open,
            observed_at: Utc::now(),
            cause,
        }
    }

    /// Applies `change` as the webhook worker applies delivery `delivery`: through an
    /// inbox row, which ends processed.
    async fn apply_delivered(store: &Store, delivery: &str, change: DealChange) {
        let rules = crate::store::CartRules::default();
        let processed = store.inbox_counts().await.unwrap().processed;
        store.enqueue_webhook(event(delivery)).await.unwrap();
        let row = store.due_webhooks(Utc::now(), 1).await.unwrap().remove(0);
        store
            .apply_webhook_batch(vec![(row.id, vec![change])], rules, Utc::now())
            .await
            .unwrap();
        assert_eq!(
            store.inbox_counts().await.unwrap().processed,
            processed + 1,
            "{delivery} is processed"
        );
    }

    #[tokio::test]
    async fn a_webhook_record_keeps_the_stored_owner_email_only_for_the_same_owner() {
        on_both(
            "a_webhook_record_keeps_the_stored_owner_email_only_for_the_same_owner",
            async |store| {
                use crate::domain::{ChangeCause, EmailAddress, SourceDeal};
                let upsert = |owner: &str, email: Option<&str>, cause: ChangeCause, minute: u32| {
                    let mut source = SourceDeal::new("12", "Globex renewal", "1", "proposal");
                    source.owner = Some(owner.to_owned());
                    source.owner_email = email.and_then(EmailAddress::parse);
                    source.updated_at = Some(
                        chrono::TimeZone::with_ymd_and_hms(&Utc, 2026, 1, 14, 18, minute, 0)
                            .unwrap(),
                    );
                    pd_upsert(source, "proposal", cause)
                };
                store
                    .upsert_deals(vec![upsert(
                        "1234",
                        Some("anna@acme.example"),
                        ChangeCause::Poll,
                        0,
                    )])
                    .await
                    .unwrap();
                for (delivery, owner, minute, expected) in [
                    ("pd-same-owner", "1234", 5, Some("anna@acme.example")),
                    ("pd-new-owner", "1235", 6, None),
                ] {
                    let change = upsert(owner, None, ChangeCause::Webhook, minute);
                    apply_delivered(&store, delivery, DealChange::Upsert(change)).await;
                    let stored = stored_deal(&store, "pd", "12").await;
                    assert_eq!(
                        stored.owner_email.map(|e| e.to_string()).as_deref(),
                        expected,
                        "{delivery}"
                    );
                }
            },
        )
        .await;
    }

    #[tokio::test]
    async fn a_webhook_record_without_a_contact_keeps_the_one_a_pull_stored() {
        on_both(
            "a_webhook_record_without_a_contact_keeps_the_one_a_pull_stored",
            async |store| {
                use crate::domain::{ChangeCause, EmailAddress, SourceDeal};
                let upsert = |stage: &str, email: Option<&str>, cause: ChangeCause, minute: u32| {
                    let mut source = SourceDeal::new("12", "Globex renewal", "1", stage);
                    source.contact_email = email.and_then(EmailAddress::parse);
                    source.contact_name = email.map(|_| "Ada Lovelace".to_owned());
                    source.updated_at = Some(
                        chrono::TimeZone::with_ymd_and_hms(&Utc, 2026, 1, 14, 18, minute, 0)
                            .unwrap(),
                    );
                    pd_upsert(source, stage, cause)
                };
                store
                    .upsert_deals(vec![upsert(
                        "lead_qualification",
                        Some("ada@acme.example"),
                        ChangeCause::Poll,
                        0,
                    )])
                    .await
                    .unwrap();
                let change = upsert("proposal", None, ChangeCause::Webhook, 5);
                apply_delivered(&store, "pd-change", DealChange::Upsert(change)).await;
                let deal = stored_deal(&store, "pd", "12").await;
                assert_eq!(deal.stage.as_str(), "proposal");
                assert_eq!(
                    deal.contact_email.as_ref().map(|e| e.as_str()),
                    Some("ada@acme.example")
                );
                assert_eq!(deal.contact_name.as_deref(), Some("Ada Lovelace"));
                assert_eq!(store.history(deal.id).await.unwrap().len(), 2);
            },
        )
        .await;
    }

    #[tokio::test]
    async fn a_webhook_record_carrying_only_some_contact_fields_keeps_every_other_stored_one() {
        on_both(
            "a_webhook_record_carrying_only_some_contact_fields_keeps_every_other_stored_one",
            async |store| {
                use crate::domain::{ChangeCause, EmailAddress, SourceDeal};
                // The first `carried` of email, name, owner, owner email and consent, as a
                // pull stored them; the rest absent.
                let upsert = |carried: usize, cause: ChangeCause, minute: u32| {
                    let mut source = SourceDeal::new("12", "Globex renewal", "1", "proposal");
                    if carried > 0 {
                        source.contact_email = EmailAddress::parse("ada@acme.example");
                    }
                    if carried > 1 {
                        source.contact_name = Some("Ada Lovelace".to_owned());
                    }
                    if carried > 2 {
                        source.owner = Some("1234".to_owned());
                    }
                    if carried > 3 {
                        source.owner_email = EmailAddress::parse("anna@acme.example");
                    }
                    if carried > 4 {
                        source.marketing_consent = Some(true);
                    }
                    source.updated_at = Some(
                        chrono::TimeZone::with_ymd_and_hms(&Utc, 2026, 1, 14, 18, minute, 0)
                            .unwrap(),
                    );
                    pd_upsert(source, "proposal", cause)
                };
                store
                    .upsert_deals(vec![upsert(5, ChangeCause::Poll, 0)])
                    .await
                    .unwrap();
                for carried in 0..5 {
                    let change = upsert(carried, ChangeCause::Webhook, 1 + carried as u32);
                    let delivery = format!("pd-carries-{carried}");
                    apply_delivered(&store, &delivery, DealChange::Upsert(change)).await;
                    let deal = stored_deal(&store, "pd", "12").await;
                    assert_eq!(
                        (
                            deal.contact_email.as_ref().map(|e| e.as_str()),
                            deal.contact_name.as_deref(),
                            deal.owner.as_deref(),
                            deal.owner_email.as_ref().map(|e| e.as_str()),
                            deal.marketing_consent,
                        ),
                        (
                            Some("ada@acme.example"),
                            Some("Ada Lovelace"),
                            Some("1234"),
                            Some("anna@acme.example"),
                            Some(true)
                        ),
                        "a record carrying {carried} of the five fields"
                    );
                }
            },
        )
        .await;
    }

    #[tokio::test]
    async fn a_deal_is_marked_deleted_once_and_an_unknown_one_not_at_all() {
        on_both(
            "a_deal_is_marked_deleted_once_and_an_unknown_one_not_at_all",
            async |store| {
                let at = Utc::now();
                store
                    .upsert_deals(vec![pd_upsert(
                        crate::domain::SourceDeal::new("12", "Globex renewal", "1", "proposal"),
                        "proposal",
                        crate::domain::ChangeCause::Poll,
                    )])
                    .await
                    .unwrap();
                assert!(!store.mark_deal_deleted("pd", "13", at).await.unwrap());
                assert!(store.mark_deal_deleted("pd", "12", at).await.unwrap());
                let deal = stored_deal(&store, "pd", "12").await;
                assert!(deal.deleted_at.is_some());
                assert_eq!(deal.status, crate::domain::DealStatus::Deleted);
                assert!(!store.mark_deal_deleted("pd", "12", at).await.unwrap());
                assert_eq!(store.history(deal.id).await.unwrap().len(), 1);
            },
        )
        .await;
    }

    #[tokio::test]
    async fn a_pass_applies_upserts_carts_and_deletions_in_order_in_one_transaction() {
        on_both(
            "a_pass_applies_upserts_carts_and_deletions_in_order_in_one_transaction",
            async |store| {
                use crate::domain::{ChangeCause, DealStatus, SourceDeal};
                let deal = |id: &str, stage: &str| {
                    pd_upsert(
                        SourceDeal::new(id, "Globex renewal", "1", stage),
                        stage,
                        ChangeCause::Webhook,
                    )
                };
                let mut cart = deal("c1", "checkout_started");
                cart.source.cart_keys = vec!["k:c1".to_owned()];
                let changes = vec![
                    DealChange::Upsert(deal("1", "proposal")),
                    DealChange::Cart(cart),
                    DealChange::Upsert(deal("2", "proposal")),
                    DealChange::Delete {
                        connection: "pd".into(),
                        external_id: "2".into(),
                    },
                ];
                let changes_seen = store.stage_changes();
                store
                    .apply_deal_changes(changes, crate::store::CartRules::default(), Utc::now())
                    .await
                    .unwrap();
                assert!(changes_seen.has_changed().unwrap(), "subscribers are woken");
                assert_eq!(
                    stored_deal(&store, "pd", "1").await.status,
                    DealStatus::Open
                );
                assert_eq!(
                    stored_deal(&store, "pd", "c1").await.stage.as_str(),
                    "checkout_started"
                );
                assert_eq!(
                    stored_deal(&store, "pd", "2").await.status,
                    DealStatus::Deleted,
                    "the deletion comes after the record that created the deal"
                );
            },
        )
        .await;
    }
}
