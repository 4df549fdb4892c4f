//! Copying a SQLite install (the deal database and the webhook inbox file beside it)
//! into an empty PostgreSQL database: what `dealsync migrate-store` runs.
//!
//! Invariants:
//! - The SQLite files are only read: opened read-only, each inside one read
//!   transaction taken before anything is copied, so every table comes from one
//!   consistent snapshot of its file. The caller holds the daemon's lock file, so no
//!   daemon writes them meanwhile.
//! - Every SQLite table is copied or the copy is refused: a table this module does not
//!   know ([`TABLES`]), or whose columns differ from its PostgreSQL counterpart, stops
//!   it before anything is written. A future migration cannot be skipped silently.
//! - The copy is one PostgreSQL transaction: the target must hold no dealsync row (it
//!   is checked in that transaction, under an advisory lock, so two copies cannot
//!   both find it empty), every table is loaded with `COPY … FROM STDIN (FORMAT
//!   binary)` keeping its ids, each identity is moved past the copied ids, and every
//!   table's row count is compared with the SQLite snapshot's before `COMMIT`. Any
//!   failure rolls everything back.
//! - Values are copied as stored: times stay epoch milliseconds, JSON stays text,
//!   encrypted tokens stay as they are (the same key decrypts them); only the 0/1
//!   flags become BOOLEAN. A value that does not fit its PostgreSQL column (a 2 in a
//!   flag, text that is not UTF-8 or holds a NUL) stops the copy naming table, column
//!   and row.

use super::super::{DbError, StoreError, migrations};
use super::Database;
use rusqlite::types::ValueRef;
use std::path::{Path, PathBuf};
use tokio_postgres::types::{IsNull, ToSql, Type, to_sql_checked};

/// Which SQLite file a table lives in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum File {
    /// The deal database (`storage.path`).
    Database,
    /// The webhook inbox beside it (`store::inbox_path`).
    Inbox,
}

/// Every table of the two SQLite files, in the order they are copied: a table after
/// those its foreign keys point at. A migration that adds a SQLite table adds it here
/// (and to the PostgreSQL schema); until then the copy refuses to run.
pub const TABLES: &[(File, &str)] = &[
    (File::Database, "connections"),
    (File::Database, "deals"),
    (File::Database, "deal_keys"),
    (File::Database, "stage_history"),
    (File::Database, "sync_cursors"),
    (File::Database, "native_pipelines"),
    (File::Database, "sync_runs"),
    (File::Database, "quarantine"),
    (File::Database, "enrichment_cache"),
    (File::Database, "outbox"),
    (File::Database, "digests"),
    (File::Database, "digest_runs"),
    (File::Database, "suppressions"),
    (File::Database, "delivery_events"),
    (File::Database, "rule_pauses"),
    (File::Database, "oauth_tokens"),
    (File::Database, "writebacks"),
    (File::Inbox, "webhook_inbox"),
    (File::Inbox, "webhook_bodies"),
    (File::Inbox, "webhook_dead_letters"),
];

/// Rows read from SQLite per message to the copy; bounds the memory in flight.
const BATCH_ROWS: usize = 1_024;

/// Batches in flight between the SQLite reader and the COPY.
const BATCHES_IN_FLIGHT: usize = 4;

/// The key of the transaction-level advisory lock a copy takes ("dsmigrat" in ASCII).
const COPY_LOCK: i64 = 0x6473_6d69_6772_6174;

/// Why a copy was refused or failed. Nothing was written to PostgreSQL in any case
/// (the schema aside, which an empty database gets before the copy starts).
#[derive(Debug, thiserror::Error)]
pub enum CopyError {
    #[error("{}: no such file; storage.path must name the SQLite database of the install to copy", .path.display())]
    Missing { path: PathBuf },
    #[error("opening {} read-only: {source}", .path.display())]
    Open { path: PathBuf, source: DbError },
    #[error("reading {}: {source}", .path.display())]
    Read { path: PathBuf, source: DbError },
    /// The SQLite file's schema is not the one this binary writes.
    #[error(
        "{} has schema version {found}, this dealsync copies version {supported}: {}",
        .path.display(),
        if found < supported {
            "run `dealsync run` of this version once on the install (it migrates the file), stop it, and run migrate-store again"
        } else {
            "the file was written by a newer dealsync; run migrate-store of that version"
        }
    )]
    SchemaVersion {
        path: PathBuf,
        found: i64,
        supported: i64,
    },
    #[error(
        "{} has a table {table} that this dealsync does not know how to copy; nothing was copied (is the file from another version?)",
        .path.display()
    )]
    UnknownTable { path: PathBuf, table: String },
    #[error("{} has no table {table}: is it a dealsync {} file?", .path.display(), .file)]
    MissingTable {
        path: PathBuf,
        table: String,
        file: &'static str,
    },
    #[error("table {table}: {detail}; nothing was copied")]
    Columns { table: String, detail: String },
    #[error(
        "PostgreSQL database {target} already holds dealsync data (table {table} has rows); \
         migrate-store copies only into an empty database: create a new one, or drop and \
         recreate this one if its data is not needed — nothing was written"
    )]
    NotEmpty { target: String, table: String },
    #[error(
        "table {table}, column {column}, the table's row number {row}: {reason}; the copy was rolled back, nothing was written"
    )]
    Value {
        table: String,
        column: String,
        row: u64,
        reason: String,
    },
    #[error(
        "table {table}: {postgres} rows in PostgreSQL after the copy, {sqlite} in SQLite; the copy was rolled back, nothing was written"
    )]
    CountMismatch {
        table: String,
        sqlite: u64,
        postgres: u64,
    },
    #[error(
        "copying table {table} into PostgreSQL {target}: {source}; the copy was rolled back, nothing was written"
    )]
    Postgres {
        table: String,
        target: String,
        source: DbError,
    },
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// One table copied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableCopied {
    pub table: &'static str,
    /// Rows in SQLite and, verified before the commit, in PostgreSQL.
    pub rows: u64,
}

/// PostgreSQL columns with no SQLite counterpart: a replica's claim on a row
/// (`migrations/0002_replicas.sql`). A single SQLite daemon never claims, so the copy
/// leaves them NULL: unclaimed.
const REPLICA_ONLY: [&str; 2] = ["claimed_by", "claimed_until"];

/// A value on its way from SQLite to a PostgreSQL column.
#[derive(Debug)]
enum Cell {
    Null,
    Int(i64),
    Bool(bool),
    Text(String),
    Bytes(Vec<u8>),
}

impl ToSql for Cell {
    fn to_sql(
        &self,
        ty: &Type,
        out: &mut bytes::BytesMut,
    ) -> Result<IsNull, Box<dyn std::error::Error + Sync + Send>> {
        match self {
            Cell::Null => Ok(IsNull::Yes),
            Cell::Int(value) => value.to_sql(ty, out),
            Cell::Bool(value) => value.to_sql(ty, out),
            Cell::Text(value) => value.to_sql(ty, out),
            Cell::Bytes(value) => value.to_sql(ty, out),
        }
    }

    fn accepts(ty: &Type) -> bool {
        [Type::INT8, Type::BOOL, Type::TEXT, Type::BYTEA].contains(ty)
    }

    to_sql_checked!();
}

/// Converts one SQLite value for a column of PostgreSQL type `ty`.
fn convert(value: ValueRef<'_>, ty: &Type) -> Result<Cell, String> {
    let text = |bytes: &[u8]| -> Result<String, String> {
        let text = std::str::from_utf8(bytes)
            .map_err(|_| "the text is not UTF-8, which PostgreSQL's TEXT requires".to_owned())?;
        if text.contains('\0') {
            return Err("the text holds a NUL character, which PostgreSQL's TEXT cannot".into());
        }
        Ok(text.to_owned())
    };
    match (value, ty) {
        (ValueRef::Null, _) => Ok(Cell::Null),
        (ValueRef::Integer(value), &Type::INT8) => Ok(Cell::Int(value)),
        (ValueRef::Integer(0), &Type::BOOL) => Ok(Cell::Bool(false)),
        (ValueRef::Integer(1), &Type::BOOL) => Ok(Cell::Bool(true)),
        (ValueRef::Integer(value), &Type::BOOL) => {
            Err(format!("{value} in a 0/1 flag (BOOLEAN in PostgreSQL)"))
        }
        (ValueRef::Text(bytes), &Type::TEXT) => text(bytes).map(Cell::Text),
        (ValueRef::Integer(value), &Type::TEXT) => Ok(Cell::Text(value.to_string())),
        (ValueRef::Blob(bytes) | ValueRef::Text(bytes), &Type::BYTEA) => {
            Ok(Cell::Bytes(bytes.to_vec()))
        }
        (other, ty) => Err(format!(
            "a SQLite {:?} value cannot go into a PostgreSQL {ty} column",
            other.data_type()
        )),
    }
}

/// A table as both sides have it.
#[derive(Clone)]
struct Plan {
    file: File,
    table: &'static str,
    /// Column names, SQLite's order, with their PostgreSQL types.
    columns: Vec<(String, Type)>,
    /// Rows in the SQLite snapshot.
    rows: u64,
}

/// The two SQLite files, open read-only, each inside its read transaction.
struct Snapshot {
    database: (PathBuf, rusqlite::Connection),
    inbox: (PathBuf, rusqlite::Connection),
}

impl Snapshot {
    fn connection(&self, file: File) -> &(PathBuf, rusqlite::Connection) {
        match file {
            File::Database => &self.database,
            File::Inbox => &self.inbox,
        }
    }
}

/// Opens `path` read-only (never creating it) and begins its read transaction.
fn open_snapshot(
    path: &Path,
    schema: &migrations::Schema,
) -> Result<(PathBuf, rusqlite::Connection), CopyError> {
    if !path.is_file() {
        return Err(CopyError::Missing {
            path: path.to_owned(),
        });
    }
    let open = |source: rusqlite::Error| CopyError::Open {
        path: path.to_owned(),
        source: source.into(),
    };
    let read = |source: rusqlite::Error| CopyError::Read {
        path: path.to_owned(),
        source: source.into(),
    };
    // Read-only: SQLite writes nothing to the file. A WAL left by a daemon that was
    // killed is read as part of the snapshot, not checkpointed into the file.
    let connection = rusqlite::Connection::open_with_flags(
        path,
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(open)?;
    connection
        .busy_timeout(std::time::Duration::from_secs(10))
        .map_err(open)?;
    // BEGIN takes the snapshot at the first read, which follows at once: every later
    // read of this connection sees the file as it was then.
    connection.execute_batch("BEGIN").map_err(read)?;
    let found = migrations::current(&connection).map_err(|error| match error {
        StoreError::Database(source) => CopyError::Read {
            path: path.to_owned(),
            source,
        },
        other => CopyError::Store(other),
    })?;
    let supported = schema.version();
    if found != supported {
        return Err(CopyError::SchemaVersion {
            path: path.to_owned(),
            found,
            supported,
        });
    }
    Ok((path.to_owned(), connection))
}

/// The SQLite snapshot's tables and columns checked against [`TABLES`] and against
/// PostgreSQL's columns (`postgres`: table → [(column, type)]), with their row counts.
fn plan(
    snapshot: &Snapshot,
    postgres: &dyn Fn(&str) -> Vec<(String, Type)>,
) -> Result<Vec<Plan>, CopyError> {
    for file in [File::Database, File::Inbox] {
        let (path, connection) = snapshot.connection(file);
        let read = |source: rusqlite::Error| CopyError::Read {
            path: path.clone(),
            source: source.into(),
        };
        let mut statement = connection
            .prepare(
                "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'",
            )
            .map_err(read)?;
        let names = statement
            .query_map([], |row| row.get::<_, String>(0))
            .map_err(read)?
            .collect::<Result<Vec<String>, _>>()
            .map_err(read)?;
        if let Some(table) = names
            .iter()
            .find(|name| !TABLES.contains(&(file, name.as_str())))
        {
            return Err(CopyError::UnknownTable {
                path: path.clone(),
                table: table.clone(),
            });
        }
        if let Some((_, table)) = TABLES
            .iter()
            .find(|(of, table)| *of == file && !names.iter().any(|name| name == table))
        {
            return Err(CopyError::MissingTable {
                path: path.clone(),
                table: (*table).to_owned(),
                file: match file {
                    File::Database => "database",
                    File::Inbox => "webhook inbox",
                },
            });
        }
    }
    let mut plans = Vec::new();
    for &(file, table) in TABLES {
        let (path, connection) = snapshot.connection(file);
        let read = |source: rusqlite::Error| CopyError::Read {
            path: path.clone(),
            source: source.into(),
        };
        let mut statement = connection
            .prepare(&format!(
                "SELECT name FROM pragma_table_info('{table}') ORDER BY cid"
            ))
            .map_err(read)?;
        let sqlite_columns = statement
            .query_map([], |row| row.get::<_, String>(0))
            .map_err(read)?
            .collect::<Result<Vec<String>, _>>()
            .map_err(read)?;
        let pg_columns = postgres(table);
        if pg_columns.is_empty() {
            return Err(CopyError::Columns {
                table: table.to_owned(),
                detail: "the PostgreSQL schema has no such table".to_owned(),
            });
        }
        let mut columns = Vec::new();
        for name in &sqlite_columns {
            match pg_columns.iter().find(|(pg, _)| pg == name) {
                Some((_, ty)) => columns.push((name.clone(), ty.clone())),
                None => {
                    return Err(CopyError::Columns {
                        table: table.to_owned(),
                        detail: format!("SQLite column {name} has no PostgreSQL counterpart"),
                    });
                }
            }
        }
        if let Some((name, _)) = pg_columns
            .iter()
            .find(|(pg, _)| !sqlite_columns.contains(pg) && !REPLICA_ONLY.contains(&pg.as_str()))
        {
            return Err(CopyError::Columns {
                table: table.to_owned(),
                detail: format!("PostgreSQL column {name} has no SQLite counterpart"),
            });
        }
        let rows: i64 = connection
            .query_row(&format!("SELECT count(*) FROM {table}"), [], |row| {
                row.get(0)
            })
            .map_err(read)?;
        plans.push(Plan {
            file,
            table,
            columns,
            rows: u64::try_from(rows).unwrap_or_default(),
        });
    }
    Ok(plans)
}

/// What the SQLite reader sends the COPY: rows of the current table, or its end.
enum Batch {
    Rows(Vec<Vec<Cell>>),
    /// The table is done: how many rows were read.
    End(u64),
}

/// Reads every planned table, in order, from the snapshot, converting each value for
/// its column; runs on a blocking thread. Stops at the first failure, which is the
/// last message; a closed channel (the COPY failed) stops it quietly.
fn read_tables(
    snapshot: Snapshot,
    plans: Vec<Plan>,
    sender: tokio::sync::mpsc::Sender<Result<Batch, CopyError>>,
) {
    for Plan {
        file,
        table,
        columns,
        ..
    } in plans
    {
        let (path, connection) = snapshot.connection(file);
        let result = (|| -> Result<bool, CopyError> {
            let read = |source: rusqlite::Error| CopyError::Read {
                path: path.clone(),
                source: source.into(),
            };
            let list = columns
                .iter()
                .map(|(name, _)| format!("\"{name}\""))
                .collect::<Vec<_>>()
                .join(", ");
            let mut statement = connection
                .prepare(&format!("SELECT {list} FROM {table}"))
                .map_err(read)?;
            let mut rows = statement.query([]).map_err(read)?;
            let mut batch = Vec::with_capacity(BATCH_ROWS);
            let mut count = 0u64;
            while let Some(row) = rows.next().map_err(read)? {
                count += 1;
                let mut cells = Vec::with_capacity(columns.len());
                for (at, (name, ty)) in columns.iter().enumerate() {
                    let value = row.get_ref(at).map_err(read)?;
                    cells.push(convert(value, ty).map_err(|reason| CopyError::Value {
                        table: table.to_owned(),
                        column: name.clone(),
                        row: count,
                        reason,
                    })?);
                }
                batch.push(cells);
                if batch.len() == BATCH_ROWS {
                    let full = std::mem::replace(&mut batch, Vec::with_capacity(BATCH_ROWS));
                    if sender.blocking_send(Ok(Batch::Rows(full))).is_err() {
                        return Ok(false);
                    }
                }
            }
            if !batch.is_empty() && sender.blocking_send(Ok(Batch::Rows(batch))).is_err() {
                return Ok(false);
            }
            Ok(sender.blocking_send(Ok(Batch::End(count))).is_ok())
        })();
        match result {
            Ok(true) => {}
            Ok(false) => return,
            Err(error) => {
                let _ = sender.blocking_send(Err(error));
                return;
            }
        }
    }
    // The read transactions end with the connections (nothing to commit).
    drop(snapshot);
}

/// Copies the SQLite install whose deal database is `db_path` into `database`, which
/// gets the schema first and must hold no dealsync row. `progress` is called before
/// each table with its name and SQLite row count. Returns each table's verified rows.
pub async fn copy_sqlite_install(
    db_path: &Path,
    database: &Database,
    progress: &mut (dyn FnMut(&str, u64) + Send),
) -> Result<Vec<TableCopied>, CopyError> {
    let target = database.target();
    // Both files first, so a missing or foreign file is refused before PostgreSQL is
    // touched.
    let db_path = db_path.to_owned();
    let inbox_path = super::super::inbox_path(&db_path);
    let snapshot = tokio::task::spawn_blocking(move || -> Result<Snapshot, CopyError> {
        Ok(Snapshot {
            database: open_snapshot(&db_path, &migrations::DATABASE)?,
            inbox: open_snapshot(&inbox_path, &super::super::inbox::SCHEMA)?,
        })
    })
    .await
    .map_err(|error| StoreError::Task(error.to_string()))??;

    // The schema (a no-op when it is current; a newer one is refused untouched).
    database.migrate().await?;
    let mut client = database.client().await?;
    let pg_failed = |table: &str| {
        let target = target.clone();
        let table = table.to_owned();
        move |source: tokio_postgres::Error| CopyError::Postgres {
            table: table.clone(),
            target: target.clone(),
            source: source.into(),
        }
    };
    let tx = client
        .transaction()
        .await
        .map_err(pg_failed("(starting the transaction)"))?;
    // One copy at a time: a second waits here, then finds the tables full. The
    // statement timeout of the pool suits the daemon's statements, not a bulk load.
    tx.batch_execute(&format!(
        "SELECT pg_advisory_xact_lock({COPY_LOCK}); SET LOCAL statement_timeout = 0"
    ))
    .await
    .map_err(pg_failed("(locking)"))?;

    let pg_tables: Vec<String> = tx
        .query(
            "SELECT table_name::text FROM information_schema.tables
              WHERE table_schema = current_schema() AND table_type = 'BASE TABLE'
                AND table_name <> 'schema_version'
              ORDER BY table_name",
            &[],
        )
        .await
        .map_err(pg_failed("(listing tables)"))?
        .iter()
        .map(|row| row.get(0))
        .collect();
    // Dealsync's tables in copy order, then any other of the schema.
    let mut check_order: Vec<String> = TABLES
        .iter()
        .map(|(_, table)| (*table).to_owned())
        .filter(|table| pg_tables.contains(table))
        .collect();
    check_order.extend(
        pg_tables
            .iter()
            .filter(|table| !check_order.contains(table))
            .cloned()
            .collect::<Vec<_>>(),
    );
    for table in &check_order {
        let has_rows: bool = tx
            .query_one(&format!("SELECT EXISTS (SELECT 1 FROM \"{table}\")"), &[])
            .await
            .map_err(pg_failed(table))?
            .get(0);
        if has_rows {
            return Err(CopyError::NotEmpty {
                target,
                table: table.clone(),
            });
        }
    }

    let column_rows = tx
        .query(
            "SELECT table_name::text, column_name::text, data_type::text,
                    is_identity = 'YES'
               FROM information_schema.columns
              WHERE table_schema = current_schema()",
            &[],
        )
        .await
        .map_err(pg_failed("(listing columns)"))?;
    let mut pg_columns: std::collections::HashMap<String, Vec<(String, Type)>> = Default::default();
    let mut identities: Vec<(String, String)> = Vec::new();
    for row in &column_rows {
        let (table, column, data_type, identity): (String, String, String, bool) =
            (row.get(0), row.get(1), row.get(2), row.get(3));
        let ty = match data_type.as_str() {
            "bigint" => Type::INT8,
            "boolean" => Type::BOOL,
            "text" => Type::TEXT,
            "bytea" => Type::BYTEA,
            // Not a type the dealsync schema uses outside `schema_version`: the plan
            // refuses the column by name if a copied table ever has one.
            _ => Type::UNKNOWN,
        };
        if identity {
            identities.push((table.clone(), column.clone()));
        }
        pg_columns.entry(table).or_default().push((column, ty));
    }
    if let Some((table, column)) = pg_columns.iter().find_map(|(table, columns)| {
        columns
            .iter()
            .find(|(column, ty)| *ty == Type::UNKNOWN && !REPLICA_ONLY.contains(&column.as_str()))
            .filter(|_| TABLES.iter().any(|(_, known)| known == table))
            .map(|(column, _)| (table.clone(), column.clone()))
    }) {
        return Err(CopyError::Columns {
            table,
            detail: format!("PostgreSQL column {column} has a type the copy does not convert to"),
        });
    }

    let (snapshot, plans) = tokio::task::spawn_blocking(move || {
        let plans = plan(&snapshot, &|table| {
            pg_columns.get(table).cloned().unwrap_or_default()
        });
        (snapshot, plans)
    })
    .await
    .map_err(|error| StoreError::Task(error.to_string()))?;
    let plans = plans?;

    let (sender, mut receiver) = tokio::sync::mpsc::channel(BATCHES_IN_FLIGHT);
    let reading = plans.clone();
    let reader = tokio::task::spawn_blocking(move || read_tables(snapshot, reading, sender));

    let mut copied = Vec::with_capacity(plans.len());
    for plan in &plans {
        progress(plan.table, plan.rows);
        let failed = pg_failed(plan.table);
        let list = plan
            .columns
            .iter()
            .map(|(name, _)| format!("\"{name}\""))
            .collect::<Vec<_>>()
            .join(", ");
        let sink = tx
            .copy_in(&format!(
                "COPY \"{}\" ({list}) FROM STDIN (FORMAT binary)",
                plan.table
            ))
            .await
            .map_err(&failed)?;
        let types: Vec<Type> = plan.columns.iter().map(|(_, ty)| ty.clone()).collect();
        let mut writer = std::pin::pin!(tokio_postgres::binary_copy::BinaryCopyInWriter::new(
            sink, &types
        ));
        let read_rows = loop {
            match receiver.recv().await {
                Some(Ok(Batch::Rows(rows))) => {
                    for row in &rows {
                        let values: Vec<&(dyn ToSql + Sync)> =
                            row.iter().map(|cell| cell as &(dyn ToSql + Sync)).collect();
                        writer.as_mut().write(&values).await.map_err(&failed)?;
                    }
                }
                Some(Ok(Batch::End(count))) => break count,
                Some(Err(error)) => return Err(error),
                None => {
                    return Err(StoreError::Task(format!(
                        "the SQLite reader stopped before the end of table {}",
                        plan.table
                    ))
                    .into());
                }
            }
        };
        writer.as_mut().finish().await.map_err(&failed)?;
        if read_rows != plan.rows {
            // Cannot happen inside one read transaction; checked all the same.
            return Err(CopyError::CountMismatch {
                table: plan.table.to_owned(),
                sqlite: plan.rows,
                postgres: read_rows,
            });
        }
        copied.push(TableCopied {
            table: plan.table,
            rows: plan.rows,
        });
    }
    reader
        .await
        .map_err(|error| StoreError::Task(error.to_string()))?;

    // Later inserts must not collide with the copied ids: each identity continues
    // after the largest one copied (an empty table keeps its start).
    for (table, column) in &identities {
        tx.execute(
            &format!(
                "SELECT setval(pg_get_serial_sequence($1, $2), max(\"{column}\")) FROM \"{table}\" HAVING max(\"{column}\") IS NOT NULL"
            ),
            &[&format!("\"{table}\""), column],
        )
        .await
        .map_err(pg_failed(table))?;
    }

    // Verified in the transaction, before it commits: a mismatch rolls it all back.
    for table in &copied {
        let rows: i64 = tx
            .query_one(&format!("SELECT count(*) FROM \"{}\"", table.table), &[])
            .await
            .map_err(pg_failed(table.table))?
            .get(0);
        let rows = u64::try_from(rows).unwrap_or_default();
        if rows != table.rows {
            return Err(CopyError::CountMismatch {
                table: table.table.to_owned(),
                sqlite: table.rows,
                postgres: rows,
            });
        }
    }
    tx.commit().await.map_err(pg_failed("(committing)"))?;
    Ok(copied)
}

#[cfg(test)]
mod tests;
