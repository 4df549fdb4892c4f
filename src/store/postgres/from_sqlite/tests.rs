//! The copy at the store level: the table list against the SQLite schema (no server
//! needed), and against a real PostgreSQL server (the test process's throwaway
//! cluster) the refusals and the rollback that the daemon tests cannot provoke.

use super::*;
use crate::config::{PostgresUrl, Secret};
use crate::store::Store;
use crate::store::postgres::{Options, test_cluster::TestDatabase, test_database};

/// The tables of a SQLite file, as the current binary creates it.
fn sqlite_tables(path: &Path) -> Vec<String> {
    let db = rusqlite::Connection::open(path).unwrap();
    let mut statement = db
        .prepare("SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%' ORDER BY name")
        .unwrap();
    statement
        .query_map([], |row| row.get(0))
        .unwrap()
        .map(Result::unwrap)
        .collect()
}

#[test]
fn every_table_of_both_sqlite_files_is_one_the_copy_knows() {
    // A migration that adds a table without teaching the copy fails here, so no
    // install is ever moved without it.
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("d.db");
    drop(Store::open(&db).unwrap());
    for (file, path) in [
        (File::Database, db.clone()),
        (File::Inbox, crate::store::inbox_path(&db)),
    ] {
        let mut known: Vec<&str> = TABLES
            .iter()
            .filter(|(of, _)| *of == file)
            .map(|(_, table)| *table)
            .collect();
        known.sort_unstable();
        assert_eq!(sqlite_tables(&path), known, "{file:?}");
    }
}

#[test]
fn flags_become_booleans_and_other_values_keep_their_type() {
    let cell = |value, ty| convert(value, ty);
    assert!(matches!(
        cell(ValueRef::Integer(1), &Type::BOOL),
        Ok(Cell::Bool(true))
    ));
    assert!(matches!(
        cell(ValueRef::Integer(0), &Type::BOOL),
        Ok(Cell::Bool(false))
    ));
    assert!(cell(ValueRef::Integer(2), &Type::BOOL).is_err());
    assert!(matches!(
        cell(ValueRef::Integer(-7), &Type::INT8),
        Ok(Cell::Int(-7))
    ));
    assert!(matches!(cell(ValueRef::Null, &Type::BOOL), Ok(Cell::Null)));
    assert!(matches!(
        cell(ValueRef::Blob(b"\x00\xff"), &Type::BYTEA),
        Ok(Cell::Bytes(bytes)) if bytes == b"\x00\xff"
    ));
    assert!(cell(ValueRef::Text(b"a\0b"), &Type::TEXT).is_err());
    assert!(cell(ValueRef::Text(b"\xff"), &Type::TEXT).is_err());
    assert!(cell(ValueRef::Text(b"x"), &Type::INT8).is_err());
}

fn url_of(database: &TestDatabase) -> PostgresUrl {
    PostgresUrl::parse(&Secret::new(database.url())).unwrap()
}

async fn copy(db: &Path, database: &TestDatabase) -> Result<Vec<TableCopied>, CopyError> {
    let target = Database::connect(&url_of(database), &Options::default())
        .await
        .unwrap();
    copy_sqlite_install(db, &target, &mut |_, _| {}).await
}

async fn pg_count(database: &TestDatabase, table: &str) -> i64 {
    database
        .admin()
        .await
        .query_one(&format!("SELECT count(*) FROM {table}"), &[])
        .await
        .unwrap()
        .get(0)
}

/// A SQLite install with three suppressions and a sync run.
async fn small_install(dir: &Path) -> PathBuf {
    let db = dir.join("d.db");
    let store = Store::open(&db).unwrap();
    store
        .execute_batch_for_test(
            "INSERT INTO suppressions (email, reason, created_at) VALUES
                 ('a@example.com', 'unsubscribed', 1), ('b@example.com', 'bounced', 2),
                 ('c@example.com', 'manual', 3);
             INSERT INTO sync_runs (connection, full, started_at, status) VALUES ('crm', 1, 5, 'ok');",
        )
        .await
        .unwrap();
    drop(store);
    db
}

#[tokio::test]
async fn an_empty_install_copies_every_table_with_zero_rows() {
    let Some(database) = test_database("an_empty_install_copies_every_table_with_zero_rows") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("d.db");
    drop(Store::open(&db).unwrap());
    let copied = copy(&db, &database).await.unwrap();
    let names: Vec<&str> = copied.iter().map(|t| t.table).collect();
    let known: Vec<&str> = TABLES.iter().map(|(_, t)| *t).collect();
    assert_eq!(names, known);
    assert!(copied.iter().all(|t| t.rows == 0), "{copied:?}");
}

#[tokio::test]
async fn a_row_count_that_differs_after_the_copy_rolls_everything_back_naming_the_table() {
    let Some(database) = test_database(
        "a_row_count_that_differs_after_the_copy_rolls_everything_back_naming_the_table",
    ) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let db = small_install(dir.path()).await;
    // The schema exists and is empty; a trigger drops one suppression on its way in,
    // as a broken load would.
    Database::open(&url_of(&database), &Options::default())
        .await
        .unwrap();
    database
        .admin()
        .await
        .batch_execute(
            "CREATE FUNCTION drop_b() RETURNS trigger LANGUAGE plpgsql AS $$
             BEGIN IF NEW.email = 'b@example.com' THEN RETURN NULL; END IF; RETURN NEW; END $$;
             CREATE TRIGGER drop_b BEFORE INSERT ON suppressions FOR EACH ROW EXECUTE FUNCTION drop_b();",
        )
        .await
        .unwrap();
    let error = copy(&db, &database).await.unwrap_err();
    assert!(
        matches!(
            &error,
            CopyError::CountMismatch { table, sqlite: 3, postgres: 2 } if table == "suppressions"
        ),
        "{error}"
    );
    assert!(error.to_string().contains("rolled back"), "{error}");
    // Rolled back: the tables copied before it are empty again.
    assert_eq!(pg_count(&database, "sync_runs").await, 0);
    assert_eq!(pg_count(&database, "suppressions").await, 0);
}

#[tokio::test]
async fn a_flag_other_than_0_or_1_stops_the_copy_naming_table_column_and_row() {
    let Some(database) =
        test_database("a_flag_other_than_0_or_1_stops_the_copy_naming_table_column_and_row")
    else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let db = small_install(dir.path()).await;
    rusqlite::Connection::open(&db)
        .unwrap()
        .execute_batch("UPDATE sync_runs SET full = 2")
        .unwrap();
    let error = copy(&db, &database).await.unwrap_err();
    let shown = error.to_string();
    assert!(
        shown.contains("table sync_runs, column full, the table's row number 1: 2 in a 0/1 flag"),
        "{shown}"
    );
    assert_eq!(pg_count(&database, "suppressions").await, 0);
}

#[tokio::test]
async fn a_sqlite_file_of_another_schema_version_is_refused_before_postgres_is_touched() {
    let Some(database) = test_database(
        "a_sqlite_file_of_another_schema_version_is_refused_before_postgres_is_touched",
    ) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let db = small_install(dir.path()).await;
    rusqlite::Connection::open(&db)
        .unwrap()
        .execute_batch("PRAGMA user_version = 1")
        .unwrap();
    let error = copy(&db, &database).await.unwrap_err();
    let shown = error.to_string();
    assert!(
        matches!(error, CopyError::SchemaVersion { found: 1, .. }),
        "{shown}"
    );
    assert!(
        shown.contains("run `dealsync run` of this version once"),
        "{shown}"
    );
    let tables: i64 = database
        .admin()
        .await
        .query_one(
            "SELECT count(*) FROM pg_tables WHERE schemaname = 'public'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(tables, 0, "the schema was not even created");
}
