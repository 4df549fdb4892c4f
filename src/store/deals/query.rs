//! Reading deals: one by id or external id, filtered lists, counts per stage, and the
//! unchanged-record lookup of incremental reads. `DEAL_COLUMNS` and `deal_from_row`
//! are the one way the store reads a deal row (the outbox, digests and report
//! use them).
//!
//! Invariants:
//! - Nothing here writes.
//! - A damaged JSON column of a deal row reads as empty with a warning: one bad row
//!   never fails a list of deals.
//! - Lists are ordered by last activity, newest first, then id; counts cover live
//!   (not deleted) deals only.

use crate::domain::people;
use crate::domain::{
    ConnectionName, Currency, Deal, DealStatus, EmailAddress, ExternalId, PipelineKey, StageKey,
};
use crate::store::{Result, Store, from_ms, to_json};
use rusqlite::{OptionalExtension, Row, params};
use serde::Serialize;

/// Filters for listing deals; `None` means any.
#[derive(Debug, Clone, Default)]
pub struct DealFilter {
    pub connection: Option<String>,
    pub pipeline: Option<String>,
    pub stage: Option<String>,
    pub status: Option<DealStatus>,
    /// Only the deals of this person, in any connection: an address, normalised by
    /// `domain::people::person_key` (one that is not an address matches nothing).
    pub person: Option<String>,
    /// Only the deals of this company: a domain, normalised by
    /// `domain::people::company_domain` (a free-mail domain matches nothing).
    pub company: Option<String>,
    pub limit: Option<u32>,
    pub offset: Option<u32>,
}

impl DealFilter {
    /// The deals query of this filter for a backend whose numbered placeholders start
    /// with `sigil` (`?1` in SQLite, `$1` in PostgreSQL), and its parameters in order.
    pub(in crate::store) fn query(self, sigil: char) -> (String, Vec<String>) {
        crate::store::Listing {
            select: format!("SELECT {DEAL_COLUMNS} FROM deals WHERE 1 = 1"),
            equal: vec![
                ("connection", self.connection),
                ("pipeline", self.pipeline),
                ("stage", self.stage),
                ("status", self.status.map(|s| s.as_str().to_owned())),
                // No key is empty, so input without one matches nothing.
                (
                    "person_key",
                    self.person
                        .map(|p| people::person_key(&p).unwrap_or_default()),
                ),
                (
                    "company_key",
                    self.company
                        .map(|c| people::company_domain(&c).unwrap_or_default()),
                ),
            ],
            order: "last_activity_at DESC, id DESC",
            limit: self.limit,
            offset: self.offset,
        }
        .query(sigil)
    }
}

/// Deals per canonical stage and connection (for metrics and the report).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StageCount {
    pub connection: String,
    pub pipeline: Option<String>,
    pub stage: String,
    pub deals: u64,
}

pub(crate) const DEAL_COLUMNS: &str =
    "id, connection, external_id, title, amount_minor, currency, pipeline,
    stage, status, native_pipeline, native_stage, contact_email, contact_name, owner, owner_email,
    marketing_consent, source_created_at, source_updated_at, stage_entered_at, last_activity_at,
    expected_close, recovery_url, line_items, cart_keys, deleted_at, first_seen_at, raw";

/// A result row of either backend, read by column position: the one mapping of a row
/// to a domain value (`deal_from`, `history::change_from`) serves both.
pub(in crate::store) trait Columns {
    type Error;
    fn int(&self, index: usize) -> Result<i64, Self::Error>;
    fn opt_int(&self, index: usize) -> Result<Option<i64>, Self::Error>;
    fn text(&self, index: usize) -> Result<String, Self::Error>;
    fn opt_text(&self, index: usize) -> Result<Option<String>, Self::Error>;
    fn opt_bool(&self, index: usize) -> Result<Option<bool>, Self::Error>;
    fn bytes(&self, index: usize) -> Result<Vec<u8>, Self::Error>;
}

/// The implementations only name the type to read; both crates convert.
macro_rules! columns_impl {
    ($row:ty, $error:ty, $get:ident) => {
        impl Columns for $row {
            type Error = $error;
            fn int(&self, index: usize) -> Result<i64, $error> {
                self.$get(index)
            }
            fn opt_int(&self, index: usize) -> Result<Option<i64>, $error> {
                self.$get(index)
            }
            fn text(&self, index: usize) -> Result<String, $error> {
                self.$get(index)
            }
            fn opt_text(&self, index: usize) -> Result<Option<String>, $error> {
                self.$get(index)
            }
            fn opt_bool(&self, index: usize) -> Result<Option<bool>, $error> {
                self.$get(index)
            }
            fn bytes(&self, index: usize) -> Result<Vec<u8>, $error> {
                self.$get(index)
            }
        }
    };
}

columns_impl!(Row<'_>, rusqlite::Error, get);
columns_impl!(tokio_postgres::Row, tokio_postgres::Error, try_get);

/// Reads a SQLite deal row (see [`deal_from`]).
pub(crate) fn deal_from_row(row: &Row<'_>) -> rusqlite::Result<Deal> {
    deal_from(row)
}

/// Reads a deal row. A JSON column that does not parse (the raw record, the line
/// items, the cart keys) reads as empty (`null`, no items, no keys) with a warning,
/// so one damaged row never fails a list of deals.
pub(in crate::store) fn deal_from<R: Columns>(row: &R) -> Result<Deal, R::Error> {
    fn json_or_empty<T: serde::de::DeserializeOwned + Default>(
        text: String,
        deal_id: i64,
        column: &'static str,
    ) -> T {
        serde_json::from_str(&text).unwrap_or_else(|error| {
            tracing::warn!(deal_id, column, %error, "stored JSON is unreadable; read as empty");
            T::default()
        })
    }
    let deal_id = row.int(0)?;
    let currency = row.opt_text(5)?;
    let status = row.text(8)?;
    let email = |value: Option<String>| value.and_then(|v| EmailAddress::parse(&v));
    Ok(Deal {
        id: deal_id,
        connection: ConnectionName::new(row.text(1)?),
        external_id: ExternalId::new(row.text(2)?),
        title: row.text(3)?,
        amount_minor: row.opt_int(4)?,
        currency: currency.and_then(|c| Currency::parse(&c).ok()),
        pipeline: row.opt_text(6)?.map(PipelineKey::new),
        stage: StageKey::new(row.text(7)?),
        status: DealStatus::parse(&status).unwrap_or(DealStatus::Unmapped),
        native_pipeline: row.text(9)?,
        native_stage: row.text(10)?,
        contact_email: email(row.opt_text(11)?),
        contact_name: row.opt_text(12)?,
        owner: row.opt_text(13)?,
        owner_email: email(row.opt_text(14)?),
        marketing_consent: row.opt_bool(15)?,
        created_at: row.opt_int(16)?.map(from_ms),
        updated_at: row.opt_int(17)?.map(from_ms),
        stage_entered_at: from_ms(row.int(18)?),
        last_activity_at: from_ms(row.int(19)?),
        expected_close: row.opt_text(20)?.and_then(|d| d.parse().ok()),
        recovery_url: row.opt_text(21)?,
        line_items: json_or_empty(row.text(22)?, deal_id, "line_items"),
        cart_keys: json_or_empty(row.text(23)?, deal_id, "cart_keys"),
        deleted_at: row.opt_int(24)?.map(from_ms),
        first_seen_at: from_ms(row.int(25)?),
        raw: json_or_empty(row.text(26)?, deal_id, "raw"),
    })
}

impl Store {
    pub async fn deal(&self, id: i64) -> Result<Option<Deal>> {
        if let Some(database) = self.postgres() {
            return database
                .deal(id)
                .await
                .map_err(|error| database.named(error));
        }
        self.read(move |db| {
            let sql = format!("SELECT {DEAL_COLUMNS} FROM deals WHERE id = ?1");
            Ok(db.query_row(&sql, [id], deal_from_row).optional()?)
        })
        .await
    }

    pub async fn deal_by_external_id(
        &self,
        connection: &str,
        external_id: &str,
    ) -> Result<Option<Deal>> {
        if let Some(database) = self.postgres() {
            return database
                .deal_by_external_id(connection, external_id)
                .await
                .map_err(|error| database.named(error));
        }
        let (connection, external_id) = (connection.to_owned(), external_id.to_owned());
        self.read(move |db| {
            let sql = format!(
                "SELECT {DEAL_COLUMNS} FROM deals WHERE connection = ?1 AND external_id = ?2"
            );
            Ok(db
                .query_row(&sql, params![connection, external_id], deal_from_row)
                .optional()?)
        })
        .await
    }

    /// Of `candidates` (external id, [`fingerprint`](crate::domain::hashing::fingerprint)),
    /// those whose stored deal was written from a record with that same fingerprint, is
    /// not deleted and has a contact email: an incremental read that meets one again
    /// (its lookback overlap) has nothing new to ask the vendor about it. A deal without
    /// a contact is left out on purpose: its contact may have been linked after it was
    /// written, and a CRM need not move the deal's modification time for that.
    pub async fn unchanged_records(
        &self,
        connection: &str,
        candidates: Vec<(String, i64)>,
    ) -> Result<std::collections::HashSet<(String, i64)>> {
        if let Some(database) = self.postgres() {
            return database
                .unchanged_records(connection, candidates)
                .await
                .map_err(|error| database.named(error));
        }
        let connection = connection.to_owned();
        self.read(move |db| {
            // Walks the candidates and looks each up on the unique (connection,
            // external_id) index; `CROSS JOIN` keeps that order.
            let mut statement = db.prepare_cached(
                "SELECT d.external_id, d.fingerprint FROM json_each(?2) AS j CROSS JOIN deals AS d
                 WHERE d.connection = ?1 AND d.external_id = j.value ->> 0
                   AND d.fingerprint = j.value ->> 1
                   AND d.deleted_at IS NULL AND d.contact_email IS NOT NULL",
            )?;
            let rows = statement.query_map(params![connection, to_json(&candidates)?], |row| {
                Ok((row.get(0)?, row.get(1)?))
            })?;
            Ok(rows.collect::<rusqlite::Result<_>>()?)
        })
        .await
    }

    /// Deals matching the filter, newest activity first.
    pub async fn deals(&self, filter: DealFilter) -> Result<Vec<Deal>> {
        if let Some(database) = self.postgres() {
            return database
                .deals(filter)
                .await
                .map_err(|error| database.named(error));
        }
        self.read(move |db| {
            let (sql, values) = filter.query('?');
            let mut statement = db.prepare(&sql)?;
            let rows = statement.query_map(rusqlite::params_from_iter(values), deal_from_row)?;
            Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
        })
        .await
    }

    /// Counts of live deals per connection and canonical stage.
    pub async fn stage_counts(&self) -> Result<Vec<StageCount>> {
        if let Some(database) = self.postgres() {
            return database
                .stage_counts()
                .await
                .map_err(|error| database.named(error));
        }
        self.read(|db| {
            let mut statement = db.prepare(
                "SELECT connection, pipeline, stage, count(*) FROM deals
                 WHERE deleted_at IS NULL GROUP BY connection, pipeline, stage
                 ORDER BY connection, pipeline, stage",
            )?;
            let rows = statement.query_map([], |row| {
                Ok(StageCount {
                    connection: row.get(0)?,
                    pipeline: row.get(1)?,
                    stage: row.get(2)?,
                    deals: row.get::<_, i64>(3)? as u64,
                })
            })?;
            Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::ConnectionName;
    use chrono::Duration;

    /// Filters combine; the newest activity comes first, then the highest id; limit and
    /// offset page; counts per stage leave deleted deals out.
    #[tokio::test]
    async fn deals_list_by_filter_newest_first_and_counts_leave_deleted_deals_out() {
        on_both(
            "deals_list_by_filter_newest_first_and_counts_leave_deleted_deals_out",
            async |store| {
                let now = Utc::now();
                let mut records = vec![
                    upsert("1", "proposal", now - Duration::minutes(3)),
                    upsert("2", "proposal", now - Duration::minutes(1)),
                    upsert("3", "negotiation", now - Duration::minutes(2)),
                ];
                let mut other = upsert("4", "proposal", now);
                other.connection = ConnectionName::new("shop");
                records.push(other);
                let mut gone = upsert("5", "proposal", now - Duration::minutes(5));
                gone.source.deleted = true;
                records.push(gone);
                store.upsert_deals(records).await.unwrap();
                let ids = |deals: Vec<Deal>| -> Vec<String> {
                    deals
                        .iter()
                        .map(|d| d.external_id.as_str().to_owned())
                        .collect()
                };
                let all = store.deals(DealFilter::default()).await.unwrap();
                assert_eq!(ids(all), ["4", "2", "3", "1", "5"]);
                let crm_proposals = store
                    .deals(DealFilter {
                        connection: Some("crm".into()),
                        stage: Some("proposal".into()),
                        status: Some(DealStatus::Open),
                        ..DealFilter::default()
                    })
                    .await
                    .unwrap();
                assert_eq!(ids(crm_proposals), ["2", "1"]);
                let page = store
                    .deals(DealFilter {
                        limit: Some(2),
                        offset: Some(1),
                        ..DealFilter::default()
                    })
                    .await
                    .unwrap();
                assert_eq!(ids(page), ["2", "3"]);
                let counts: Vec<(String, String, u64)> = store
                    .stage_counts()
                    .await
                    .unwrap()
                    .into_iter()
                    .map(|c| (c.connection, c.stage, c.deals))
                    .collect();
                assert_eq!(
                    counts,
                    [
                        ("crm".into(), "negotiation".into(), 1),
                        ("crm".into(), "proposal".into(), 2),
                        ("shop".into(), "proposal".into(), 1),
                    ]
                );
            },
        )
        .await;
    }
    use crate::domain::hashing::fingerprint;
    use crate::store::both_backends::on_both;
    use crate::store::deals::tests::upsert;
    use chrono::Utc;

    #[tokio::test]
    async fn a_record_is_recognised_unchanged_only_by_its_fingerprint_with_a_contact_and_not_deleted()
     {
        on_both("a_record_is_recognised_unchanged_only_by_its_fingerprint_with_a_contact_and_not_deleted", async |store| {
            let now = Utc::now();
            let fingerprinted = |id: &str, contact: Option<&str>, deleted: bool| {
                let mut record = upsert(id, "proposal", now);
                record.source.contact_email = contact.and_then(EmailAddress::parse);
                record.source.deleted = deleted;
                let keys = [Some("person 7")];
                record.source.fingerprint = Some(fingerprint(&record.source, &keys));
                record
            };
            let stored = vec![
                fingerprinted("1", Some("ada@acme.example"), false),
                fingerprinted("2", None, false),
                fingerprinted("3", Some("ada@acme.example"), true),
                upsert("4", "proposal", now),
            ];
            let prints: Vec<i64> = stored
                .iter()
                .map(|record| record.source.fingerprint.unwrap_or(0))
                .collect();
            store.upsert_deals(stored).await.unwrap();
            let candidates = vec![
                ("1".to_owned(), prints[0]),
                ("1".to_owned(), prints[0] ^ 1),
                ("2".to_owned(), prints[1]),
                ("3".to_owned(), prints[2]),
                ("4".to_owned(), 0),
                ("5".to_owned(), prints[0]),
            ];
            let unchanged = store.unchanged_records("crm", candidates).await.unwrap();
            assert_eq!(
                unchanged,
                [("1".to_owned(), prints[0])].into_iter().collect(),
                "only 1: 2 has no contact, 3 is deleted, 4 has no fingerprint, 5 is not stored"
            );
            assert!(
                store
                    .unchanged_records("other", vec![("1".to_owned(), prints[0])])
                    .await
                    .unwrap()
                    .is_empty(),
                "another connection's deal is another deal"
            );

            // The fingerprint leaves the raw text out and takes the lookup keys in.
            let mut record = upsert("1", "proposal", now).source;
            let plain = fingerprint(&record, &[Some("person 7")]);
            record.raw = crate::domain::RawRecord::from_text(r#"{"id":"1"}"#.into()).unwrap();
            assert_eq!(fingerprint(&record, &[Some("person 7")]), plain);
            assert_ne!(fingerprint(&record, &[Some("person 8")]), plain);
            assert_ne!(fingerprint(&record, &[None]), plain);
            record.title.push('!');
            assert_ne!(fingerprint(&record, &[Some("person 7")]), plain);
        })
        .await;
    }
}
