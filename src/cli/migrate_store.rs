//! `dealsync migrate-store --to postgres://…`: copies the SQLite install named by
//! `storage.path` (the deal database and its webhook inbox) into an empty PostgreSQL
//! database (`store::postgres::from_sqlite`).
//!
//! Invariants:
//! - The daemon's lock file is held for the whole copy: refused while a daemon runs,
//!   and no daemon starts on the install until the copy has ended.
//! - The SQLite files are only read; the copy commits whole or not at all.
//! - The password of `--to` is never printed: it is scrubbed like a config's secrets.
//! - stdout gets one line per table and the summary; progress goes to stderr.

use super::MigrateStoreArgs;
use super::context::{CliError, ConfigSource, load};
use crate::config::{ConfigError, PostgresUrl};
use crate::lock::{LockError, LockFile};
use crate::store::postgres::{Database, Options, from_sqlite};
use std::time::Instant;

pub(super) async fn migrate_store(
    source: &ConfigSource,
    args: MigrateStoreArgs,
) -> Result<(), CliError> {
    let config = load(source).await?;
    if config.storage.url.is_some() {
        return Err(ConfigError::at(
            &config,
            "storage.url",
            "migrate-store copies the SQLite install named by storage.path, and this config names a PostgreSQL database instead; run it with the config the SQLite install runs with",
        )
        .into());
    }
    let url = PostgresUrl::from_argument("--to", &args.to, source.credentials_dir.clone())
        .map_err(CliError::Usage)?;
    let db_path = config.storage.path.clone();
    let inbox_path = crate::store::inbox_path(&db_path);
    if !db_path.is_file() {
        return Err(anyhow::anyhow!(
            "there is no SQLite database at {} (storage.path in {}): nothing to copy",
            db_path.display(),
            config.path.display()
        )
        .into());
    }
    // Held until the copy has ended: a daemon started meanwhile stops at once.
    let lock_path = crate::lock::daemon_lock_path(&db_path);
    let _lock = match LockFile::try_lock(&lock_path) {
        Ok(lock) => lock,
        Err(LockError::Held { holder, .. }) => {
            return Err(CliError::AlreadyRunning(format!(
                "a dealsync daemon{} is running on {}: it holds the lock file {}; stop the daemon first (systemctl stop dealsync), then run migrate-store again — nothing was copied",
                holder
                    .map(|pid| format!(" (pid {pid})"))
                    .unwrap_or_default(),
                db_path.display(),
                lock_path.display()
            )));
        }
        Err(other) => return Err(anyhow::Error::from(other).into()),
    };

    let started = Instant::now();
    let options = Options {
        // One connection does the whole copy.
        max_connections: 1,
        ..Options::default()
    };
    let database = Database::connect(&url, &options).await?;
    eprintln!(
        "copying {} and {} into PostgreSQL {url}",
        db_path.display(),
        inbox_path.display()
    );
    let mut progress = |table: &str, rows: u64| eprintln!("copying {table}: {rows} rows…");
    let copied = from_sqlite::copy_sqlite_install(&db_path, &database, &mut progress)
        .await
        .map_err(anyhow::Error::from)?;
    let mut out = String::new();
    for table in &copied {
        out.push_str(&format!("{}: {} rows\n", table.table, table.rows));
    }
    out.push_str(&format!(
        "copied {} tables, {} rows, into PostgreSQL {url} in {:.1} s; every table's row count verified; the SQLite files were not modified\n",
        copied.len(),
        copied.iter().map(|table| table.rows).sum::<u64>(),
        started.elapsed().as_secs_f64()
    ));
    crate::output::print(&out);
    Ok(())
}
