//! The suppression list: addresses that get no email at all, whatever the rule.
//!
//! Invariant: an address is compared as stored and lower-cased, so `Ada@Example.com`
//! and `ada@example.com` are one entry in practice; the first reason recorded stays.

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

/// The columns `suppression_from_row` reads, in its order.
const COLUMNS: &str = "email, reason, source, created_at";

fn suppression_from_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<Suppression> {
    Ok(Suppression {
        email: row.get(0)?,
        reason: row.get(1)?,
        source: row.get(2)?,
        created_at: from_ms(row.get(3)?),
    })
}

/// The suppression of `email` (compared as given and lower-cased), if any.
fn find(db: &rusqlite::Connection, email: &str) -> Result<Option<Suppression>> {
    Ok(db
        .query_row(
            &format!("SELECT {COLUMNS} FROM suppressions WHERE email IN (?1, lower(?1))"),
            [email],
            suppression_from_row,
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
        self.write(move |tx| insert(tx, &email, &reason, source.as_deref(), at))
            .await
    }

    /// The suppression of an address, if any.
    pub async fn suppression(&self, email: String) -> Result<Option<Suppression>> {
        self.read(move |db| find(db, &email)).await
    }

    /// Removes an address from the list; returns what was removed, `None` when it was
    /// not suppressed. Sequences already stopped for it stay stopped; later follow-ups
    /// are sent.
    pub async fn unsuppress(&self, email: String) -> Result<Option<Suppression>> {
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
        self.read(|db| {
            let mut statement = db.prepare(&format!(
                "SELECT {COLUMNS} FROM suppressions ORDER BY created_at DESC, email"
            ))?;
            let rows = statement.query_map([], suppression_from_row)?;
            Ok(rows.collect::<rusqlite::Result<Vec<_>>>()?)
        })
        .await
    }
}
