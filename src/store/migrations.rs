//! Versioned migrations embedded in the binary, tracked in `PRAGMA user_version`.

use super::{Result, StoreError};
use rusqlite::Connection;
use std::path::Path;

/// (version, SQL), in order. Append only; never edit a released migration.
const MIGRATIONS: &[(i64, &str)] = &[
    (1, include_str!("migrations/0001_initial.sql")),
    (2, include_str!("migrations/0002_deal_fingerprint.sql")),
    (3, include_str!("migrations/0003_delivery_events.sql")),
    (4, include_str!("migrations/0004_people.sql")),
    (5, include_str!("migrations/0005_writebacks.sql")),
];

/// Rust steps of the database's migrations, each run right after its version's SQL in
/// the same transaction: what SQL alone cannot compute.
const BACKFILLS: &[(i64, Backfill)] = &[(4, super::people::backfill)];

/// A migration's Rust step.
pub(super) type Backfill = fn(&rusqlite::Connection) -> Result<()>;

/// The schema version this binary writes.
pub const SCHEMA_VERSION: i64 = MIGRATIONS[MIGRATIONS.len() - 1].0;

/// A SQLite file's schema: its migrations, in order, and what log lines call the file.
/// The database and the webhook inbox each have one.
pub(super) struct Schema {
    pub(super) migrations: &'static [(i64, &'static str)],
    /// "database", "webhook inbox".
    pub(super) file: &'static str,
    /// Rust steps run after the SQL of their version (see `BACKFILLS`).
    pub(super) backfills: &'static [(i64, Backfill)],
}

/// The main database's schema.
pub(super) const DATABASE: Schema = Schema {
    migrations: MIGRATIONS,
    file: "database",
    backfills: BACKFILLS,
};

/// The file's schema version (`PRAGMA user_version`).
pub(super) fn current(db: &Connection) -> Result<i64> {
    Ok(db.pragma_query_value(None, "user_version", |row| row.get(0))?)
}

impl Schema {
    /// The schema version this binary writes to the file.
    pub(super) fn version(&self) -> i64 {
        self.migrations[self.migrations.len() - 1].0
    }

    /// Refuses a file written by a newer dealsync, before anything touches it.
    pub(super) fn refuse_newer(&self, db: &Connection, path: &Path) -> Result<()> {
        let found = current(db)?;
        let supported = self.version();
        if found > supported {
            return Err(StoreError::NewerSchema {
                path: path.display().to_string(),
                found,
                supported,
            });
        }
        Ok(())
    }

    /// Applies the missing migrations, all in one transaction.
    pub(super) fn migrate(&self, db: &mut Connection, path: &Path) -> Result<()> {
        let tx = db.transaction_with_behavior(rusqlite::TransactionBehavior::Exclusive)?;
        let found = current(&tx)?;
        for &(version, sql) in self.migrations.iter().filter(|(v, _)| *v > found) {
            tx.execute_batch(sql)
                .and_then(|()| tx.pragma_update(None, "user_version", version))
                .map_err(|source| StoreError::Migration {
                    version,
                    source: source.into(),
                })?;
            for (_, backfill) in self.backfills.iter().filter(|(v, _)| *v == version) {
                backfill(&tx)?;
            }
            tracing::info!(version, path = %path.display(), "applied {} migration", self.file);
        }
        tx.commit()?;
        Ok(())
    }
}
