//! People and companies across connections, as stored: each deal's `person_key` and
//! `company_key` (`domain::people` decides both from the contact address), the
//! migration's backfill of the deals stored before them, the reads that gather one
//! person's deals, carts, emails and suppressions, and the per-person facts the
//! send-time decision reads (`store::outbox`, `store::postgres::outbox`).
//!
//! Invariants:
//! - The keys are written with the contact, in the same statement, on every deal write
//!   (`deals::write`, `postgres::deals`): they never disagree with `contact_email`.
//! - A person's addresses are the contact addresses of the deals with their key, in
//!   any connection: suppressing one of them, or emailing one, counts for all.
//! - The SQL here is the same for both backends but for its placeholders (`sigil`).

use super::deals::{DEAL_COLUMNS, deal_from_row};
use super::outbox::{OutboxRow, ROW_COLUMNS, outbox_row_from};
use super::suppression::{COLUMNS as SUPPRESSION_COLUMNS, Suppression, suppression_from};
use super::{Result, Store};
use crate::domain::people::{company_key, person_key};
use crate::domain::{Deal, EmailAddress, StageRef};
use rusqlite::{OptionalExtension, params};
use serde::Serialize;

/// The person and company keys of a deal whose contact is `email`.
#[derive(Debug, Clone, Default, PartialEq)]
pub(crate) struct PersonLink {
    pub(crate) person: Option<String>,
    pub(crate) company: Option<String>,
}

impl PersonLink {
    /// The keys of a deal whose contact is `email` and whose source names its
    /// company's domain or website `company` (a CRM's company record), which then
    /// decides the company over the email's domain.
    pub(crate) fn of(email: Option<&EmailAddress>, company: Option<&str>) -> Self {
        PersonLink {
            person: email.and_then(|email| person_key(email.as_str())),
            company: company
                .and_then(crate::domain::people::website_domain)
                .or_else(|| email.and_then(|email| company_key(email.as_str()))),
        }
    }
}

/// How many deals one statement of the backfill reads and updates.
pub(super) const BACKFILL_BATCH: usize = 10_000;

/// Sets the keys of every stored deal that has a contact: the Rust step of the
/// migration that added them, in its transaction.
pub(super) fn backfill(db: &rusqlite::Connection) -> Result<()> {
    let mut read = db.prepare(
        "SELECT id, contact_email FROM deals
         WHERE id > ?1 AND contact_email IS NOT NULL ORDER BY id LIMIT ?2",
    )?;
    let mut write =
        db.prepare("UPDATE deals SET person_key = ?2, company_key = ?3 WHERE id = ?1")?;
    let mut after = 0_i64;
    loop {
        let batch = read
            .query_map(params![after, BACKFILL_BATCH as i64], |row| {
                Ok((row.get::<_, i64>(0)?, row.get::<_, String>(1)?))
            })?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        let Some((last, _)) = batch.last() else {
            return Ok(());
        };
        after = *last;
        for (id, email) in &batch {
            write.execute(params![id, person_key(email), company_key(email)])?;
        }
    }
}

/// Everything stored about one person, across every connection.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Person {
    /// The person key the address normalises to.
    pub key: String,
    /// Deals of the person outside the cart pipeline, newest activity first.
    pub deals: Vec<Deal>,
    /// Deals of the person in the cart pipeline (`ecommerce`), newest activity first.
    pub carts: Vec<Deal>,
    /// Outbox rows of the person's deals (emails and expiries), latest due first.
    pub emails: Vec<OutboxRow>,
    /// Suppressions of any of the person's addresses.
    pub suppressions: Vec<Suppression>,
}

/// The canonical pipeline whose deals are carts.
const CART_PIPELINE: &str = "ecommerce";

/// The most rows of each kind a person view lists.
pub const PERSON_VIEW_LIMIT: u32 = 1_000;

/// The statements of a person view, for a backend whose placeholders start with `sigil`:
/// deals, emails, suppressions; each takes the person key as its one parameter.
pub(super) fn person_view_sql(sigil: char) -> [String; 3] {
    let p = format!("{sigil}1");
    [
        format!(
            "SELECT {DEAL_COLUMNS} FROM deals WHERE person_key = {p}
             ORDER BY last_activity_at DESC, id DESC LIMIT {PERSON_VIEW_LIMIT}"
        ),
        format!(
            "SELECT {ROW_COLUMNS} FROM outbox
             WHERE deal_id IN (SELECT id FROM deals WHERE person_key = {p})
             ORDER BY due_at DESC, id DESC LIMIT {PERSON_VIEW_LIMIT}"
        ),
        format!(
            "SELECT {SUPPRESSION_COLUMNS} FROM suppressions
             WHERE email = {p}
                OR email IN (SELECT lower(contact_email) FROM deals WHERE person_key = {p})
             ORDER BY created_at DESC, email LIMIT {PERSON_VIEW_LIMIT}"
        ),
    ]
}

impl Person {
    /// Splits `deals` into deals and carts.
    pub(super) fn assemble(
        key: String,
        deals: Vec<Deal>,
        emails: Vec<OutboxRow>,
        suppressions: Vec<Suppression>,
    ) -> Person {
        let (carts, deals) = deals.into_iter().partition(|deal| {
            deal.pipeline
                .as_ref()
                .is_some_and(|p| p.as_str() == CART_PIPELINE)
        });
        Person {
            key,
            deals,
            carts,
            emails,
            suppressions,
        }
    }
}

/// Why the person `recipient` is, if any of their addresses is suppressed: the address
/// itself (as given and lower-cased), its person key, and the contact address of any
/// deal of the person in any connection.
pub(super) fn suppression_of(db: &rusqlite::Connection, recipient: &str) -> Result<Option<String>> {
    Ok(db
        .prepare_cached(SUPPRESSION_OF_SQL)?
        .query_row(params![recipient, person_key(recipient)], |r| r.get(0))
        .optional()?)
}

/// [`suppression_of`]'s statement; `$1` the recipient, `$2` its person key.
pub(super) const SUPPRESSION_OF_SQL: &str = "SELECT reason FROM suppressions
     WHERE email IN (?1, lower(?1), ?2)
        OR email IN (SELECT lower(contact_email) FROM deals WHERE person_key = ?2)
     LIMIT 1";

/// The cap's count of emails claimed for the person `recipient` since `?2`: to the
/// address itself or to any contact address of the person's deals.
pub(super) const RECENT_TO_PERSON_SQL: &str = "SELECT count(*), min(claimed_at) FROM outbox
     WHERE (recipient = ?1
            OR recipient IN (SELECT contact_email FROM deals WHERE person_key = ?3))
       AND claimed_at > ?2 AND state IN ('sending', 'sent', 'uncertain')";

/// The open deals of a person other than `?2`, for the rule's `skip_if_open_in`.
pub(super) const OPEN_DEALS_OF_PERSON_SQL: &str =
    "SELECT id, connection, pipeline, stage FROM deals
     WHERE person_key = ?1 AND id != ?2 AND status = 'open' AND deleted_at IS NULL
     ORDER BY id";

/// An open deal of the same person in another deal's stage that a rule skips for.
#[derive(Debug, Clone, PartialEq)]
pub struct OpenElsewhere {
    pub deal_id: i64,
    pub connection: String,
    pub at: StageRef,
}

/// The first of `open` (id, connection, pipeline, stage) that sits in one of `stages`.
pub(super) fn open_in(
    open: impl IntoIterator<Item = (i64, String, Option<String>, String)>,
    stages: &[StageRef],
) -> Option<OpenElsewhere> {
    open.into_iter()
        .find_map(|(deal_id, connection, pipeline, stage)| {
            stages
                .iter()
                .find(|at| {
                    at.pipeline.as_ref().map(|p| p.as_str()) == pipeline.as_deref()
                        && at.stage.as_str() == stage
                })
                .map(|at| OpenElsewhere {
                    deal_id,
                    connection,
                    at: at.clone(),
                })
        })
}

/// The open deal of `person` (other than `deal_id`) in one of `stages`, if any.
pub(super) fn open_elsewhere(
    db: &rusqlite::Connection,
    person: &str,
    deal_id: i64,
    stages: &[StageRef],
) -> Result<Option<OpenElsewhere>> {
    let mut statement = db.prepare_cached(OPEN_DEALS_OF_PERSON_SQL)?;
    let rows = statement
        .query_map(params![person, deal_id], |row| {
            Ok((row.get(0)?, row.get(1)?, row.get(2)?, row.get(3)?))
        })?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    Ok(open_in(rows, stages))
}

impl Store {
    /// Everything stored about the person `email` normalises to, across connections;
    /// `None` when `email` is not an address.
    pub async fn person(&self, email: &str) -> Result<Option<Person>> {
        let Some(key) = person_key(email) else {
            return Ok(None);
        };
        if let Some(database) = self.postgres() {
            return database
                .person(key)
                .await
                .map(Some)
                .map_err(|error| database.named(error));
        }
        self.read(move |db| {
            let [deals_sql, emails_sql, suppressions_sql] = person_view_sql('?');
            let deals = db
                .prepare(&deals_sql)?
                .query_map([&key], deal_from_row)?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            let emails = db
                .prepare(&emails_sql)?
                .query_map([&key], |row| outbox_row_from(row))?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            let suppressions = db
                .prepare(&suppressions_sql)?
                .query_map([&key], |row| suppression_from(row))?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            Ok(Some(Person::assemble(key, deals, emails, suppressions)))
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::StepNumber;
    use crate::domain::{ConnectionName, DealStatus, PipelineKey, StageKey};
    use crate::store::both_backends::{on_both, stored_text};
    use crate::store::deals::DealUpsert;
    use crate::store::deals::tests::upsert;
    use crate::store::ledger::{Value, test_sql::exec};
    use crate::store::{
        ClaimDecision, ClaimFacts, ClaimQuery, DealFilter, EnrollPlan, NewOutboxRow, OutboxAction,
        OutboxState, to_ms,
    };
    use chrono::{DateTime, TimeZone, Utc};
    use std::sync::{Arc, Mutex};

    fn at(minute: i64) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 3, 2, 9, 0, 0).unwrap() + chrono::Duration::minutes(minute)
    }

    fn stage(pipeline: &str, stage: &str) -> StageRef {
        StageRef {
            pipeline: Some(PipelineKey::new(pipeline)),
            stage: StageKey::new(stage),
        }
    }

    /// Deal `id` of `connection` in `pipeline.stage` with the contact `email`.
    fn deal(connection: &str, id: &str, email: Option<&str>, at_stage: StageRef) -> DealUpsert {
        let mut record = upsert(id, at_stage.stage.as_str(), at(0));
        record.connection = ConnectionName::new(connection);
        record.source.contact_email = email.and_then(EmailAddress::parse);
        record.target = at_stage;
        record
    }

    async fn id_of(store: &Store, connection: &str, id: &str) -> i64 {
        store
            .deal_by_external_id(connection, id)
            .await
            .unwrap()
            .unwrap()
            .id
    }

    fn ids(deals: &[Deal]) -> Vec<String> {
        let mut ids: Vec<String> = deals
            .iter()
            .map(|d| format!("{}/{}", d.connection, d.external_id))
            .collect();
        ids.sort();
        ids
    }

    #[tokio::test]
    async fn every_deal_write_links_the_person_and_company_across_connections() {
        on_both(
            "every_deal_write_links_the_person_and_company_across_connections",
            async |store| {
                store
                    .upsert_deals(vec![
                        deal(
                            "hubspot",
                            "1",
                            Some("Ann.Lee+crm@GMail.com"),
                            stage("sales", "proposal"),
                        ),
                        deal(
                            "shop",
                            "c1",
                            Some(" ann.lee@gmail.com"),
                            stage("ecommerce", "cart_abandoned"),
                        ),
                        // Not a plus-addressing domain: another mailbox, another person.
                        deal(
                            "hubspot",
                            "2",
                            Some("ann.lee+crm@acme.example"),
                            stage("sales", "lead"),
                        ),
                        deal(
                            "pipedrive",
                            "7",
                            Some("Bob@ACME.example"),
                            stage("sales", "negotiation"),
                        ),
                        deal("pipedrive", "8", None, stage("sales", "lead")),
                    ])
                    .await
                    .unwrap();
                assert_eq!(
                    stored_text(&store, "1", "person_key").await,
                    "ann.lee@gmail.com"
                );
                let person = store
                    .person("ANN.LEE+shop@gmail.com ")
                    .await
                    .unwrap()
                    .unwrap();
                assert_eq!(person.key, "ann.lee@gmail.com");
                assert_eq!(ids(&person.deals), ["hubspot/1"]);
                assert_eq!(ids(&person.carts), ["shop/c1"]);
                // Free mail links no company; a company's domain links its people.
                let acme = store
                    .deals(DealFilter {
                        company: Some("www.Acme.example".into()),
                        ..DealFilter::default()
                    })
                    .await
                    .unwrap();
                assert_eq!(ids(&acme), ["hubspot/2", "pipedrive/7"]);
                for company in ["gmail.com", "", "%"] {
                    let none = store
                        .deals(DealFilter {
                            company: Some(company.into()),
                            ..DealFilter::default()
                        })
                        .await
                        .unwrap();
                    assert!(none.is_empty(), "{company:?}");
                }
                // Hostile or empty input matches nobody rather than everybody.
                for hostile in ["", "nobody", "' OR 1=1 --", "%@gmail.com"] {
                    let none = store
                        .deals(DealFilter {
                            person: Some(hostile.into()),
                            ..DealFilter::default()
                        })
                        .await
                        .unwrap();
                    assert!(none.is_empty(), "{hostile:?}");
                }
                assert_eq!(store.person("not an address").await.unwrap(), None);
                // A changed contact moves the deal to its new person, on update too.
                let mut moved = deal(
                    "hubspot",
                    "1",
                    Some("grace@acme.example"),
                    stage("sales", "proposal"),
                );
                moved.source.updated_at = Some(at(5));
                moved.source.title = "Moved".into();
                store.upsert_deals(vec![moved]).await.unwrap();
                let ann = store.person("ann.lee@gmail.com").await.unwrap().unwrap();
                assert!(ann.deals.is_empty());
                let by_person = store
                    .deals(DealFilter {
                        person: Some("Grace@Acme.Example".into()),
                        ..DealFilter::default()
                    })
                    .await
                    .unwrap();
                assert_eq!(ids(&by_person), ["hubspot/1"]);
                assert_eq!(
                    stored_text(&store, "1", "company_key").await,
                    "acme.example"
                );
            },
        )
        .await;
    }

    /// Drops the keys again and rewinds the schema to before the people migration, so
    /// reopening the store runs it on deals stored without keys.
    async fn rewind(store: &Store) {
        let sqlite = store.postgres().is_none();
        // The later migrations' objects go too (the write-back queue), so that the
        // store migrates from the people migration on, as a file of that age does.
        for sql in [
            "DROP TABLE writebacks",
            "DROP INDEX deals_by_person",
            "DROP INDEX deals_by_company",
            "ALTER TABLE deals DROP COLUMN person_key",
            "ALTER TABLE deals DROP COLUMN company_key",
        ] {
            exec(store, sql, vec![]).await;
        }
        if sqlite {
            exec(store, "PRAGMA user_version = 3", vec![]).await;
        } else {
            // PostgreSQL's version 8: the inbox's open-rows index.
            for sql in [
                "DROP INDEX webhook_inbox_open",
                "CREATE INDEX webhook_inbox_pending ON webhook_inbox (id) WHERE state = 'pending'",
                "DELETE FROM schema_version WHERE version >= 6",
            ] {
                exec(store, sql, vec![]).await;
            }
        }
    }

    #[tokio::test]
    async fn the_migration_backfills_the_keys_of_deals_stored_before_it() {
        let records = || {
            vec![
                deal(
                    "hubspot",
                    "1",
                    Some("Ann+x@gmail.com"),
                    stage("sales", "proposal"),
                ),
                deal(
                    "shop",
                    "c1",
                    Some("ann@gmail.com"),
                    stage("ecommerce", "cart_abandoned"),
                ),
                deal(
                    "pipedrive",
                    "7",
                    Some("bob@acme.example"),
                    stage("sales", "lead"),
                ),
                deal("pipedrive", "8", None, stage("sales", "lead")),
            ]
        };
        let check = async |store: &Store| {
            let ann = store.person("ann@gmail.com").await.unwrap().unwrap();
            assert_eq!(ids(&ann.deals), ["hubspot/1"]);
            assert_eq!(ids(&ann.carts), ["shop/c1"]);
            assert_eq!(stored_text(store, "7", "company_key").await, "acme.example");
        };
        // SQLite: a file of the schema before the migration, opened again.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("dealsync.db");
        let store = Store::open(&path).unwrap();
        store.upsert_deals(records()).await.unwrap();
        rewind(&store).await;
        drop(store);
        let store = Store::open(&path).unwrap();
        check(&store).await;
        // PostgreSQL: the same on a database rewound to version 5.
        let test = "the_migration_backfills_the_keys_of_deals_stored_before_it";
        let Some(database) = crate::store::postgres::test_database(test) else {
            return;
        };
        let url = crate::store::postgres::tests::url_of(&database);
        let store = Store::open_postgres(&url).await.unwrap();
        store.upsert_deals(records()).await.unwrap();
        rewind(&store).await;
        drop(store);
        let store = Store::open_postgres(&url).await.unwrap();
        check(&store).await;
    }

    /// Enrolls one pending email of `rule` for `deal_id` to `recipient`; its row id.
    async fn enroll(store: &Store, deal_id: i64, rule: &str, recipient: &str) -> i64 {
        let recipient = recipient.to_owned();
        store
            .enroll(deal_id, rule.into(), at(-10_000), at(0), move |_, _| {
                EnrollPlan::Enroll {
                    recipient,
                    anchor_at: at(0),
                    rows: vec![NewOutboxRow {
                        step: StepNumber::from_index(0),
                        action: OutboxAction::Email,
                        due_at: at(0),
                        state: OutboxState::Pending,
                        reason: None,
                    }],
                    supersede: Vec::new(),
                }
            })
            .await
            .unwrap();
        let rows = store
            .outbox(crate::store::OutboxRowFilter {
                deal_id: Some(deal_id),
                rule: Some(rule.into()),
                ..Default::default()
            })
            .await
            .unwrap();
        rows[0].id
    }

    /// The facts a claim of row `id` reads with `query`; the row stays pending.
    async fn facts(store: &Store, id: i64, query: ClaimQuery) -> ClaimFacts {
        let seen = Arc::new(Mutex::new(None));
        let into = Arc::clone(&seen);
        store
            .claim(id, at(10), query, move |facts| {
                *into.lock().unwrap() = Some(facts.clone());
                ClaimDecision::Defer {
                    until: at(20),
                    reason: "looked".into(),
                }
            })
            .await
            .unwrap();
        let facts = seen.lock().unwrap().take();
        facts.expect("the claim read its facts")
    }

    #[tokio::test]
    async fn the_send_time_facts_count_one_person_across_connections() {
        on_both(
            "the_send_time_facts_count_one_person_across_connections",
            async |store| {
                store
                    .upsert_deals(vec![
                        deal(
                            "hubspot",
                            "1",
                            Some("Ann@GMail.com"),
                            stage("sales", "proposal"),
                        ),
                        deal(
                            "shop",
                            "c1",
                            Some("ann+shop@gmail.com"),
                            stage("ecommerce", "cart_abandoned"),
                        ),
                        deal(
                            "pipedrive",
                            "9",
                            Some("ann@gmail.com"),
                            stage("sales", "negotiation"),
                        ),
                        deal(
                            "shop",
                            "c2",
                            Some("bob@gmail.com"),
                            stage("ecommerce", "cart_abandoned"),
                        ),
                    ])
                    .await
                    .unwrap();
                let crm = id_of(&store, "hubspot", "1").await;
                let cart = id_of(&store, "shop", "c1").await;
                let negotiating = id_of(&store, "pipedrive", "9").await;
                let strangers = id_of(&store, "shop", "c2").await;
                // An email to the HubSpot address went out at minute 5.
                let sent = enroll(&store, crm, "stalled", "Ann@gmail.com").await;
                exec(
                    &store,
                    "UPDATE outbox SET state = 'sent', claimed_at = ?2 WHERE id = ?1",
                    vec![Value::Int(sent), Value::Int(to_ms(at(5)))],
                )
                .await;
                let cart_row = enroll(&store, cart, "cart", "ann+shop@gmail.com").await;
                let bob_row = enroll(&store, strangers, "cart", "bob@gmail.com").await;
                let query = ClaimQuery {
                    cap_window: Some(std::time::Duration::from_secs(3600)),
                    order_pipeline: Some(PipelineKey::new("ecommerce")),
                    skip_if_open_in: vec![stage("sales", "negotiation")],
                };
                let ann = facts(&store, cart_row, query.clone()).await;
                assert_eq!(ann.recent_to_recipient, (1, Some(at(5))));
                assert_eq!(ann.suppressed, None);
                assert_eq!(ann.order_since, None);
                let open = ann.open_elsewhere.expect("the negotiation in Pipedrive");
                assert_eq!(
                    (open.deal_id, open.connection.as_str(), open.at),
                    (negotiating, "pipedrive", stage("sales", "negotiation"))
                );
                let bob = facts(&store, bob_row, query.clone()).await;
                assert_eq!(bob.recent_to_recipient, (0, None));
                assert_eq!(bob.open_elsewhere, None);

                // Unsubscribed at the HubSpot address: the cart address is suppressed too.
                store
                    .suppress("ann@gmail.com".into(), "unsubscribed".into(), None, at(6))
                    .await
                    .unwrap();
                let ann = facts(&store, cart_row, query.clone()).await;
                assert_eq!(ann.suppressed.as_deref(), Some("unsubscribed"));
                assert_eq!(facts(&store, bob_row, query.clone()).await.suppressed, None);
                // Nor does an operator's retry queue a failed email to another spelling.
                exec(
                    &store,
                    "UPDATE outbox SET state = 'failed' WHERE id = ?1",
                    vec![Value::Int(cart_row)],
                )
                .await;
                let retried = store.retry_failed(cart_row, at(6)).await.unwrap();
                assert!(
                    matches!(&retried, crate::store::RetryOutcome::Suppressed(_, reason) if reason == "unsubscribed"),
                    "{retried:?}"
                );
                exec(
                    &store,
                    "UPDATE outbox SET state = 'pending' WHERE id = ?1",
                    vec![Value::Int(cart_row)],
                )
                .await;

                // A purchase in another connection counts as the person's order.
                let mut order = deal(
                    "woo",
                    "o1",
                    Some("ANN@gmail.com"),
                    stage("ecommerce", "purchased"),
                );
                order.status = DealStatus::Won;
                order.source.updated_at = Some(at(7));
                store.upsert_deals(vec![order]).await.unwrap();
                let bought = id_of(&store, "woo", "o1").await;
                assert_eq!(
                    facts(&store, cart_row, query.clone()).await.order_since,
                    Some(bought)
                );

                // The person view gathers it all.
                let person = store.person("ann@gmail.com").await.unwrap().unwrap();
                assert_eq!(ids(&person.deals), ["hubspot/1", "pipedrive/9"]);
                assert_eq!(ids(&person.carts), ["shop/c1", "woo/o1"]);
                let mut emails: Vec<i64> = person.emails.iter().map(|r| r.id).collect();
                emails.sort();
                assert_eq!(emails, [sent, cart_row]);
                assert_eq!(person.suppressions.len(), 1);
                assert_eq!(person.suppressions[0].email, "ann@gmail.com");
            },
        )
        .await;
    }

    #[tokio::test]
    async fn one_sequence_per_person_sees_enrollments_at_every_address() {
        on_both(
            "one_sequence_per_person_sees_enrollments_at_every_address",
            async |store| {
                store
                    .upsert_deals(vec![
                        deal(
                            "shop",
                            "c1",
                            Some("Ann@gmail.com"),
                            stage("ecommerce", "cart_abandoned"),
                        ),
                        deal(
                            "woo",
                            "c2",
                            Some("ann+woo@gmail.com"),
                            stage("ecommerce", "cart_abandoned"),
                        ),
                    ])
                    .await
                    .unwrap();
                let first = id_of(&store, "shop", "c1").await;
                let second = id_of(&store, "woo", "c2").await;
                enroll(&store, first, "cart", "Ann@gmail.com").await;
                let seen = Arc::new(Mutex::new(Vec::new()));
                let into = Arc::clone(&seen);
                store
                    .enroll(
                        second,
                        "cart".into(),
                        at(-10_000),
                        at(1),
                        move |_, earlier| {
                            *into.lock().unwrap() = earlier("ann+woo@gmail.com")
                                .unwrap()
                                .iter()
                                .map(|e| e.deal_id)
                                .collect();
                            EnrollPlan::Nothing
                        },
                    )
                    .await
                    .unwrap();
                assert_eq!(*seen.lock().unwrap(), [first]);
            },
        )
        .await;
    }
}

#[cfg(test)]
mod cart_tests {
    use crate::domain::{DealStatus, EmailAddress};
    use crate::store::CartRules;
    use crate::store::both_backends::on_both;
    use crate::store::carts::tests::cart;
    use chrono::Utc;

    #[tokio::test]
    async fn an_order_at_another_spelling_of_the_address_completes_the_persons_cart() {
        on_both(
            "an_order_at_another_spelling_of_the_address_completes_the_persons_cart",
            async |store| {
                let t0 = Utc::now() - chrono::Duration::hours(5);
                let rules = CartRules::default();
                let mut started = cart("shop", "c1", "checkout_started", &["c1"], t0);
                started.source.contact_email = EmailAddress::parse("Ann.Lee@gmail.com");
                store.apply_cart_event(started, rules).await.unwrap();
                let mut stranger = cart("shop", "c2", "checkout_started", &["c2"], t0);
                stranger.source.contact_email = EmailAddress::parse("ann.lee+x@acme.example");
                store.apply_cart_event(stranger, rules).await.unwrap();
                let mut order = cart(
                    "pos",
                    "order:1",
                    "purchase_completed",
                    &["unrelated"],
                    t0 + chrono::Duration::hours(1),
                );
                order.source.contact_email = EmailAddress::parse(" ann.lee+receipts@GMAIL.com");
                store.apply_cart_event(order, rules).await.unwrap();
                let status = async |id: &str| {
                    store
                        .deal_by_external_id("shop", id)
                        .await
                        .unwrap()
                        .unwrap()
                        .status
                };
                assert_eq!(status("c1").await, DealStatus::Won);
                assert_eq!(status("c2").await, DealStatus::Open);
            },
        )
        .await;
    }
}
