//! The suppression list and the quarantine listing on PostgreSQL: the same contract as
//! `store::suppression` and the quarantine reads of `store::sync`, which document it.
//!
//! Invariant: an address is stored lower-cased and compared as given and lower-cased;
//! the first reason recorded stays (`ON CONFLICT DO NOTHING`), also when two replicas
//! suppress it at once.

use super::Database;
use super::deals::pg_text;
use crate::store::sync::QuarantineEntry;
use crate::store::{Result, Suppression, from_ms, to_ms};
use chrono::{DateTime, Utc};

/// The columns `suppression_from` reads, in its order.
const COLUMNS: &str = "email, reason, source, created_at";

fn suppression_from(row: &tokio_postgres::Row) -> Result<Suppression> {
    Ok(Suppression {
        email: row.try_get(0)?,
        reason: row.try_get(1)?,
        source: row.try_get(2)?,
        created_at: from_ms(row.try_get(3)?),
    })
}

fn quarantine_from(row: &tokio_postgres::Row) -> Result<QuarantineEntry> {
    Ok(QuarantineEntry {
        id: row.try_get(0)?,
        connection: row.try_get(1)?,
        external_id: row.try_get(2)?,
        error: row.try_get(3)?,
        at: from_ms(row.try_get(4)?),
        raw: row.try_get(5)?,
    })
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
        let inserted = self
            .client()
            .await?
            .execute(
                "INSERT INTO suppressions (email, reason, source, created_at)
                 VALUES (lower($1), $2, $3, $4) ON CONFLICT DO NOTHING",
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
        row.as_ref().map(suppression_from).transpose()
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
        row.as_ref().map(suppression_from).transpose()
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
        rows.iter().map(suppression_from).collect()
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
                "SELECT id, connection, external_id, error, at, raw FROM quarantine
                 WHERE $1::text IS NULL OR connection = $1 ORDER BY id DESC LIMIT $2",
                &[&connection, &i64::from(limit)],
            )
            .await?;
        rows.iter().map(quarantine_from).collect()
    }

    /// One quarantined record.
    pub async fn quarantine_entry(&self, id: i64) -> Result<Option<QuarantineEntry>> {
        let row = self
            .client()
            .await?
            .query_opt(
                "SELECT id, connection, external_id, error, at, raw FROM quarantine WHERE id = $1",
                &[&id],
            )
            .await?;
        row.as_ref().map(quarantine_from).transpose()
    }
}
