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
    pub(crate) fn of(email: Option<&EmailAddress>) -> Self {
        match email {
            Some(email) => PersonLink {
                person: person_key(email.as_str()),
                company: company_key(email.as_str()),
            },
            None => PersonLink::default(),
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
