//! Versioned migrations embedded in the binary, tracked in `PRAGMA user_version`.

use super::{Result, StoreError};
use rusqlite::Connection;
use std::path::Path;

/// (version, SQL), in order. Append only; never edit a released migration.
const MIGRATIONS: &[(i64, &str)] = &[
    (1, include_str!("migrations/0001_initial.sql")),
    (2, include_str!("migrations/0002_deal_fingerprint.sql")),
];

/// The schema version this binary writes.
pub const SCHEMA_VERSION: i64 = MIGRATIONS[MIGRATIONS.len() - 1].0;

fn current(db: &Connection) -> Result<i64> {
    Ok(db.pragma_query_value(None, "user_version", |row| row.get(0))?)
}

/// Refuses a database written by a newer dealsync, before anything touches it.
pub fn refuse_newer(db: &Connection, path: &Path) -> Result<()> {
    let found = current(db)?;
    if found > SCHEMA_VERSION {
        return Err(StoreError::NewerSchema {
            path: path.display().to_string(),
            found,
            supported: SCHEMA_VERSION,
        });
    }
    Ok(())
}

/// Applies the missing migrations, all in one transaction.
pub fn migrate(db: &mut Connection) -> Result<()> {
    let tx = db.transaction_with_behavior(rusqlite::TransactionBehavior::Exclusive)?;
    let found = current(&tx)?;
    for &(version, sql) in MIGRATIONS.iter().filter(|(v, _)| *v > found) {
        tx.execute_batch(sql)
            .and_then(|()| tx.pragma_update(None, "user_version", version))
            .map_err(|source| StoreError::Migration {
                version,
                source: source.into(),
            })?;
        tracing::info!(version, "applied database migration");
    }
    tx.commit()?;
    Ok(())
}
