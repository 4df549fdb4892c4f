//! The suppression list: addresses that get no email at all, whatever the rule.
//!
//! Invariant: an address is compared as stored and lower-cased, so `Ada@Example.com`
//! and `ada@example.com` are one entry in practice; the first reason recorded stays.

use super::deals::Columns;
use super::{Result, Store, from_ms, to_ms};
use chrono::{DateTime, Utc};
use rusqlite::{OptionalExtension, Transaction, params};
use serde::Serialize;

/// One suppressed address.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Suppression {
    pub email: String,
    /// `unsubscribed`, `hard bounce`, `manual`.
    pub reason: String,
    /// Where it came from: the link, one-click, the bounce text.
    pub source: Option<String>,
    pub created_at: DateTime<Utc>,
}

pub(crate) fn insert(
    tx: &Transaction<'_>,
    email: &str,
    reason: &str,
    source: Option<&str>,
    at: DateTime<Utc>,
) -> Result<bool> {
    let inserted = tx.execute(
        "INSERT OR IGNORE INTO suppressions (email, reason, source, created_at)
         VALUES (lower(?1), ?2, ?3, ?4)",
        params![email, reason, source, to_ms(at)],
    )?;
    Ok(inserted == 1)
}

/// Why `email` is suppressed, if it is (compared as given and lower-cased).
pub(crate) fn reason_of(db: &rusqlite::Connection, email: &str) -> Result<Option<String>> {
    Ok(db
        .prepare_cached("SELECT reason FROM suppressions WHERE email IN (?1, lower(?1))")?
        .query_row([email], |r| r.get(0))
        .optional()?)
}

/// The columns [`suppression_from`] reads, in its order.
pub(super) const COLUMNS: &str = "email, reason, source, created_at";

/// Reads a suppression row of either backend ([`COLUMNS`]).
pub(super) fn suppression_from<R: Columns>(row: &R) -> Result<Suppression, R::Error> {
    Ok(Suppression {
        email: row.text(0)?,
        reason: row.text(1)?,
        source: row.opt_text(2)?,
        created_at: from_ms(row.int(3)?),
    })
}

/// The suppression of `email` (compared as given and lower-cased), if any.
fn find(db: &rusqlite::Connection, email: &str) -> Result<Option<Suppression>> {
    Ok(db
        .query_row(
            &format!("SELECT {COLUMNS} FROM suppressions WHERE email IN (?1, lower(?1))"),
            [email],
            |row| suppression_from(row),
        )
        .optional()?)
}

impl Store {
    /// Adds an address; returns false when it was already suppressed.
    pub async fn suppress(
        &self,
        email: String,
        reason: String,
        source: Option<String>,
        at: DateTime<Utc>,
    ) -> Result<bool> {
        if let Some(database) = self.postgres() {
            return database
                .suppress(&email, &reason, source.as_deref(), at)
                .await
                .map_err(|error| database.named(error));
        }
        self.write(move |tx| insert(tx, &email, &reason, source.as_deref(), at))
            .await
    }

    /// The suppression of an address, if any.
    pub async fn suppression(&self, email: String) -> Result<Option<Suppression>> {
        if let Some(database) = self.postgres() {
            return database
                .suppression(&email)
                .await
                .map_err(|error| database.named(error));
        }
        self.read(move |db| find(db, &email)).await
    }

    /// Removes an address from the list; returns what was removed, `None` when it was
    /// not suppressed. Sequences already stopped for it stay stopped; later follow-ups
    /// are sent.
    pub async fn unsuppress(&self, email: String) -> Result<Option<Suppression>> {
        if let Some(database) = self.postgres() {
            return database
                .unsuppress(&email)
                .await
                .map_err(|error| database.named(error));
        }
        self.write(move |tx| {
            let found = find(tx, &email)?;
            if let Some(found) = &found {
                tx.execute("DELETE FROM suppressions WHERE email = ?1", [&found.email])?;
            }
            Ok(found)
        })
        .await
    }

    /// Every suppressed address, newest first.
    pub async fn suppressions(&self) -> Result<Vec<Suppression>> {
        if let Some(database) = self.postgres() {
            return database
                .suppressions()
                .await
                .map_err(|error| database.named(error));
        }
        self.read(|db| {
            let mut statement = db.prepare(&format!(
                "SELECT {COLUMNS} FROM suppressions ORDER BY created_at DESC, email"
            ))?;
            let rows = statement.query_map([], |row| suppression_from(row))?;
            Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use crate::store::both_backends::on_both;
    use chrono::{Duration, Utc};

    /// An address is one entry whatever its case; the first reason stays; the list is
    /// newest first; removing it returns what was removed, once.
    #[tokio::test]
    async fn an_address_is_suppressed_once_whatever_its_case_and_removed_once() {
        on_both(
            "an_address_is_suppressed_once_whatever_its_case_and_removed_once",
            async |store| {
                let now = Utc::now();
                let suppress = |email: &str, reason: &str, at| {
                    store.suppress(email.into(), reason.into(), Some("test".into()), at)
                };
                assert!(
                    suppress("Ada@Example.com", "unsubscribed", now)
                        .await
                        .unwrap()
                );
                assert!(!suppress("ada@example.com", "manual", now).await.unwrap());
                assert!(
                    suppress("bob@example.com", "hard bounce", now + Duration::seconds(1))
                        .await
                        .unwrap()
                );
                let found = store.suppression("ADA@example.com".into()).await.unwrap();
                let found = found.expect("found by another case");
                assert_eq!(
                    (found.email.as_str(), found.reason.as_str()),
                    ("ada@example.com", "unsubscribed")
                );
                let listed: Vec<String> = store
                    .suppressions()
                    .await
                    .unwrap()
                    .into_iter()
                    .map(|s| s.email)
                    .collect();
                assert_eq!(listed, ["bob@example.com", "ada@example.com"]);
                let removed = store.unsuppress("Ada@Example.com".into()).await.unwrap();
                assert_eq!(removed.map(|s| s.email).as_deref(), Some("ada@example.com"));
                assert!(
                    store
                        .unsuppress("ada@example.com".into())
                        .await
                        .unwrap()
                        .is_none()
                );
                assert!(
                    store
                        .suppression("ada@example.com".into())
                        .await
                        .unwrap()
                        .is_none()
                );
            },
        )
        .await;
    }
}
