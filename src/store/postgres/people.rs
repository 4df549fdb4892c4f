//! People and companies across connections on PostgreSQL: the same contract and the
//! same statements as `store::people`, which documents them.

use super::Database;
use super::deals::pg_text;
use crate::domain::StageRef;
use crate::domain::people::{company_key, person_key};
use crate::store::deals::deal_from;
use crate::store::outbox::outbox_row_from;
use crate::store::people::{
    BACKFILL_BATCH, OPEN_DEALS_OF_PERSON_SQL, OpenElsewhere, Person, RECENT_TO_PERSON_SQL,
    SUPPRESSION_OF_SQL, open_in, person_view_sql,
};
use crate::store::suppression::suppression_from;
use crate::store::{Result, from_ms};
use chrono::{DateTime, Utc};
use deadpool_postgres::GenericClient;

/// A statement of `store::people` with PostgreSQL's placeholders.
fn numbered(sql: &str) -> String {
    sql.replace('?', "$")
}

/// Sets the keys of every stored deal that has a contact: the Rust step of the
/// migration that added them, in its transaction; one `UPDATE … FROM unnest` per batch.
pub(super) async fn backfill(tx: &tokio_postgres::Transaction<'_>) -> Result<()> {
    let read = tx
        .prepare(
            "SELECT id, contact_email FROM deals
             WHERE id > $1 AND contact_email IS NOT NULL ORDER BY id LIMIT $2",
        )
        .await?;
    let write = tx
        .prepare(
            "UPDATE deals AS d SET person_key = k.person, company_key = k.company
             FROM unnest($1::bigint[], $2::text[], $3::text[]) AS k(id, person, company)
             WHERE d.id = k.id",
        )
        .await?;
    let mut after = 0_i64;
    loop {
        let rows = tx.query(&read, &[&after, &(BACKFILL_BATCH as i64)]).await?;
        let Some(last) = rows.last() else {
            return Ok(());
        };
        after = last.try_get(0)?;
        let (mut ids, mut people, mut companies) = (Vec::new(), Vec::new(), Vec::new());
        for row in &rows {
            let email: String = row.try_get(1)?;
            ids.push(row.try_get::<_, i64>(0)?);
            people.push(person_key(&email));
            companies.push(company_key(&email));
        }
        tx.execute(&write, &[&ids, &people, &companies]).await?;
    }
}

/// Why the person `recipient` is suppressed, if they are (as `store::people::suppression_of`).
pub(super) async fn suppression_of(
    db: &impl GenericClient,
    recipient: &str,
) -> Result<Option<String>> {
    let statement = db.prepare_cached(&numbered(SUPPRESSION_OF_SQL)).await?;
    let person = person_key(recipient);
    let row = db
        .query_opt(&statement, &[&pg_text(recipient), &person])
        .await?;
    Ok(row.map(|row| row.try_get(0)).transpose()?)
}

/// The cap's count of emails claimed for the person `recipient` since `since_ms`, and
/// the oldest claim's time.
pub(super) async fn recent_to_person(
    db: &impl GenericClient,
    recipient: &str,
    since_ms: i64,
) -> Result<(u32, Option<DateTime<Utc>>)> {
    let statement = db.prepare_cached(&numbered(RECENT_TO_PERSON_SQL)).await?;
    let person = person_key(recipient);
    let counted = db
        .query_one(&statement, &[&pg_text(recipient), &since_ms, &person])
        .await?;
    let (count, oldest): (i64, Option<i64>) = (counted.try_get(0)?, counted.try_get(1)?);
    Ok((count as u32, oldest.map(from_ms)))
}

/// The open deal of `person` other than `deal_id` in one of `stages`, if any.
pub(super) async fn open_elsewhere(
    db: &impl GenericClient,
    person: &str,
    deal_id: i64,
    stages: &[StageRef],
) -> Result<Option<OpenElsewhere>> {
    let statement = db
        .prepare_cached(&numbered(OPEN_DEALS_OF_PERSON_SQL))
        .await?;
    let rows = db.query(&statement, &[&pg_text(person), &deal_id]).await?;
    let open = rows
        .iter()
        .map(|row| {
            Ok((
                row.try_get(0)?,
                row.try_get(1)?,
                row.try_get(2)?,
                row.try_get(3)?,
            ))
        })
        .collect::<Result<Vec<_>, tokio_postgres::Error>>()?;
    Ok(open_in(open, stages))
}

impl Database {
    /// Everything stored about the person `key` (as `Store::person`).
    pub async fn person(&self, key: String) -> Result<Person> {
        let client = self.client().await?;
        let [deals_sql, emails_sql, suppressions_sql] = person_view_sql('$');
        let parameter = pg_text(&key);
        let deals = client
            .query(&deals_sql, &[&parameter])
            .await?
            .iter()
            .map(deal_from)
            .collect::<Result<Vec<_>, _>>()?;
        let emails = client
            .query(&emails_sql, &[&parameter])
            .await?
            .iter()
            .map(outbox_row_from)
            .collect::<Result<Vec<_>, _>>()?;
        let suppressions = client
            .query(&suppressions_sql, &[&parameter])
            .await?
            .iter()
            .map(suppression_from)
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Person::assemble(key, deals, emails, suppressions))
    }
}
