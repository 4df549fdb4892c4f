//! Versioned migrations of the PostgreSQL schema, embedded in the binary and recorded
//! in the `schema_version` table (one row per applied version). The PostgreSQL
//! versions are numbered on their own: version 1 is the whole SQLite schema (database
//! and inbox) as it stood when PostgreSQL was added.

use super::super::{Result, StoreError};
use super::SchemaState;
use tokio_postgres::GenericClient;

/// (version, SQL), in order. Append only; never edit a released migration.
const MIGRATIONS: &[(i64, &str)] = &[
    (1, include_str!("migrations/0001_initial.sql")),
    (2, include_str!("migrations/0002_replicas.sql")),
    (3, include_str!("migrations/0003_rate_limits.sql")),
    (4, include_str!("migrations/0004_raw_compression.sql")),
    (5, include_str!("migrations/0005_delivery_events.sql")),
    (6, include_str!("migrations/0006_people.sql")),
    (7, include_str!("migrations/0007_writebacks.sql")),
    (8, include_str!("migrations/0008_inbox_open_rows.sql")),
];

/// The version whose migration ends with the Rust backfill of the people and company
/// keys (`people::backfill`), in the same transaction.
const PEOPLE_VERSION: i64 = 6;

/// The versions this binary has after `found`, in order: what migrating a schema of
/// version `found` applies (the list may have gaps where a version was not taken).
#[cfg(test)]
pub(super) fn versions_after(found: i64) -> Vec<i64> {
    MIGRATIONS
        .iter()
        .map(|(version, _)| *version)
        .filter(|version| *version > found)
        .collect()
}

/// The schema version this binary writes.
pub const SCHEMA_VERSION: i64 = MIGRATIONS[MIGRATIONS.len() - 1].0;

/// The key of the transaction-level advisory lock every migration takes ("dealsync"
/// in ASCII): processes that start together migrate one after the other.
const MIGRATION_LOCK: i64 = 0x6465_616c_7379_6e63;

/// The schema version recorded in the database; `None` when there is no
/// `schema_version` table (nothing of dealsync's). Reads only.
pub(super) async fn current_version(
    client: &impl GenericClient,
) -> Result<Option<i64>, tokio_postgres::Error> {
    let exists: bool = client
        .query_one("SELECT to_regclass('schema_version') IS NOT NULL", &[])
        .await?
        .get(0);
    if !exists {
        return Ok(None);
    }
    let version: Option<i64> = client
        .query_one("SELECT max(version) FROM schema_version", &[])
        .await?
        .get(0);
    Ok(Some(version.unwrap_or(0)))
}

pub(super) fn state(found: Option<i64>) -> SchemaState {
    match found {
        None => SchemaState::Absent,
        Some(found) if found == SCHEMA_VERSION => SchemaState::Current(found),
        Some(found) if found < SCHEMA_VERSION => SchemaState::Older {
            found,
            supported: SCHEMA_VERSION,
        },
        Some(found) => SchemaState::Newer {
            found,
            supported: SCHEMA_VERSION,
        },
    }
}

/// Applies the missing migrations in one transaction, and in it asks for early
/// writeback in the whole database where nobody chose a value
/// (`super::DATABASE_WRITEBACK_AFTER`); `target` (`host:port/db`) names the database in
/// errors and log lines.
pub(super) async fn migrate(client: &mut tokio_postgres::Client, target: &str) -> Result<Vec<i64>> {
    let tx = client.transaction().await?;
    // Invariant: the version is read only once the lock is held, so a process that
    // waited here sees what the one before it committed, and migrates nothing twice.
    // The lock goes with the transaction, whatever ends it (commit, rollback, a lost
    // connection).
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
        .await?;
    let found = current_version(&tx).await?;
    if let SchemaState::Newer { found, supported } = state(found) {
        // Nothing was written: rolling back only releases the lock.
        tx.rollback().await?;
        return Err(StoreError::PostgresNewerSchema {
            target: target.to_owned(),
            found,
            supported,
        });
    }
    if found.is_none() {
        tx.batch_execute(
            "CREATE TABLE schema_version (
                 version    BIGINT PRIMARY KEY,
                 applied_at TIMESTAMPTZ NOT NULL DEFAULT now(),
                 -- The dealsync release that applied it.
                 dealsync   TEXT NOT NULL
             )",
        )
        .await?;
    }
    let mut applied = Vec::new();
    for &(version, sql) in MIGRATIONS.iter().filter(|(v, _)| *v > found.unwrap_or(0)) {
        let result = match tx.batch_execute(sql).await {
            Ok(()) => tx
                .execute(
                    "INSERT INTO schema_version (version, dealsync) VALUES ($1, $2)",
                    &[&version, &env!("CARGO_PKG_VERSION")],
                )
                .await
                .map(drop),
            Err(error) => Err(error),
        };
        result.map_err(|source| StoreError::Migration {
            version,
            source: source.into(),
        })?;
        if version == PEOPLE_VERSION {
            super::people::backfill(&tx).await?;
        }
        applied.push(version);
    }
    // Under the lock: replicas starting together would update the database's
    // settings row at once, and the second update would fail.
    let writeback: Option<String> = tx
        .query_opt(super::DATABASE_WRITEBACK_AFTER, &[])
        .await?
        .map(|row| row.try_get(0))
        .transpose()?;
    if let Some(statement) = &writeback {
        tx.batch_execute(statement).await?;
    }
    tx.commit().await?;
    for version in &applied {
        tracing::info!(version, database = %target, "applied PostgreSQL migration");
    }
    if let Some(statement) = writeback {
        tracing::info!(
            database = %target,
            %statement,
            "asked the server to write back early the pages every session of the database \
             writes, its vacuum workers too (to choose another value, set one for the \
             database: dealsync then keeps it)"
        );
    }
    Ok(applied)
}
