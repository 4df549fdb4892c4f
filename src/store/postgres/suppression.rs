//! The suppression list and the quarantine listing on PostgreSQL: the same contract as
//! `store::suppression` and the quarantine reads of `store::sync`, which document it.
//!
//! Invariant: an address is stored lower-cased and compared as given and lower-cased;
//! the first reason recorded stays (`ON CONFLICT DO NOTHING`), also when two replicas
//! suppress it at once.

use super::Database;
use super::deals::pg_text;
use crate::store::suppression::{COLUMNS, suppression_from};
use crate::store::sync::{QUARANTINE_COLUMNS, QuarantineEntry, quarantine_from};
use crate::store::{Result, Suppression, to_ms};
use chrono::{DateTime, Utc};
use deadpool_postgres::GenericClient;

/// Adds an address in the caller's transaction (or on a connection); false when it was
/// already suppressed.
pub(super) async fn insert(
    db: &impl GenericClient,
    email: &str,
    reason: &str,
    source: Option<&str>,
    at: DateTime<Utc>,
) -> Result<bool> {
    let statement = db
        .prepare_cached(
            "INSERT INTO suppressions (email, reason, source, created_at)
             VALUES (lower($1), $2, $3, $4) ON CONFLICT DO NOTHING",
        )
        .await?;
    let inserted = db
        .execute(
            &statement,
            &[
                &pg_text(email),
                &pg_text(reason),
                &source.map(pg_text),
                &to_ms(at),
            ],
        )
        .await?;
    Ok(inserted == 1)
}

/// Why `email` is suppressed, if it is (compared as given and lower-cased).
pub(super) async fn reason_of(db: &impl GenericClient, email: &str) -> Result<Option<String>> {
    let statement = db
        .prepare_cached("SELECT reason FROM suppressions WHERE email IN ($1, lower($1)) LIMIT 1")
        .await?;
    let row = db.query_opt(&statement, &[&pg_text(email)]).await?;
    Ok(row.map(|row| row.try_get(0)).transpose()?)
}

impl Database {
    /// Adds an address; false when it was already suppressed.
    pub async fn suppress(
        &self,
        email: &str,
        reason: &str,
        source: Option<&str>,
        at: DateTime<Utc>,
    ) -> Result<bool> {
        insert(&self.client().await?, email, reason, source, at).await
    }

    /// The suppression of an address (compared as given and lower-cased), if any.
    pub async fn suppression(&self, email: &str) -> Result<Option<Suppression>> {
        let row = self
            .client()
            .await?
            .query_opt(
                &format!(
                    "SELECT {COLUMNS} FROM suppressions WHERE email IN ($1, lower($1)) LIMIT 1"
                ),
                &[&pg_text(email)],
            )
            .await?;
        Ok(row.as_ref().map(suppression_from).transpose()?)
    }

    /// Removes an address; what was removed, `None` when it was not suppressed.
    pub async fn unsuppress(&self, email: &str) -> Result<Option<Suppression>> {
        let row = self
            .client()
            .await?
            .query_opt(
                &format!(
                    "DELETE FROM suppressions WHERE email = (SELECT email FROM suppressions
                        WHERE email IN ($1, lower($1)) LIMIT 1)
                     RETURNING {COLUMNS}"
                ),
                &[&pg_text(email)],
            )
            .await?;
        Ok(row.as_ref().map(suppression_from).transpose()?)
    }

    /// Every suppressed address, newest first.
    pub async fn suppressions(&self) -> Result<Vec<Suppression>> {
        let rows = self
            .client()
            .await?
            .query(
                &format!("SELECT {COLUMNS} FROM suppressions ORDER BY created_at DESC, email"),
                &[],
            )
            .await?;
        Ok(rows
            .iter()
            .map(suppression_from)
            .collect::<std::result::Result<_, _>>()?)
    }

    /// Quarantined records, newest first (`connection` to list one connection's only).
    pub async fn quarantined(
        &self,
        connection: Option<String>,
        limit: u32,
    ) -> Result<Vec<QuarantineEntry>> {
        let rows = self
            .client()
            .await?
            .query(
                &format!(
                    "SELECT {QUARANTINE_COLUMNS} FROM quarantine
                     WHERE $1::text IS NULL OR connection = $1 ORDER BY id DESC LIMIT $2"
                ),
                &[&connection, &i64::from(limit)],
            )
            .await?;
        Ok(rows
            .iter()
            .map(quarantine_from)
            .collect::<std::result::Result<_, _>>()?)
    }

    /// One quarantined record.
    pub async fn quarantine_entry(&self, id: i64) -> Result<Option<QuarantineEntry>> {
        let row = self
            .client()
            .await?
            .query_opt(
                &format!("SELECT {QUARANTINE_COLUMNS} FROM quarantine WHERE id = $1"),
                &[&id],
            )
            .await?;
        Ok(row.as_ref().map(quarantine_from).transpose()?)
    }
}
