//! Running one store test on both backends: [`on_both`] runs the test's body against a
//! fresh SQLite store, then against a `Store` on a fresh database in the test process's
//! throwaway PostgreSQL cluster (skipped by the rule of `test_skip` where PostgreSQL is
//! not installed). The body calls the `Store`'s own methods, which run on either.

use super::postgres::test_database;
use super::postgres::tests::url_of;
use super::{Engine, Store};

/// Runs `body` on a fresh store of each backend in turn; a failure names the backend
/// (the line before the panic in the test's output).
pub(crate) async fn on_both(test: &str, body: impl AsyncFn(Store)) {
    let (_dir, store) = super::tests::temp_store();
    eprintln!("{test}: on SQLite");
    body(store).await;
    let Some(database) = test_database(test) else {
        return;
    };
    let store = Store::open_postgres(&url_of(&database)).await.unwrap();
    eprintln!("{test}: on PostgreSQL");
    body(store).await;
}

/// One text column of the stored deal `external_id`, as stored (for byte-for-byte
/// checks).
pub(crate) async fn stored_text(store: &Store, external_id: &str, column: &'static str) -> String {
    let sql = |placeholder| format!("SELECT {column} FROM deals WHERE external_id = {placeholder}");
    match &store.engine {
        Engine::Sqlite(_) => {
            let (sql, external_id) = (sql("?1"), external_id.to_owned());
            store
                .read(move |db| Ok(db.query_row(&sql, [external_id], |row| row.get(0))?))
                .await
                .unwrap()
        }
        Engine::Postgres(postgres) => {
            let client = postgres.database.client().await.unwrap();
            let row = client.query_one(&sql("$1"), &[&external_id]).await.unwrap();
            row.get(0)
        }
    }
}

/// How many deal rows there are, deleted ones included.
pub(crate) async fn deal_rows(store: &Store) -> i64 {
    const SQL: &str = "SELECT count(*) FROM deals";
    match &store.engine {
        Engine::Sqlite(_) => store
            .read(|db| Ok(db.query_row(SQL, [], |row| row.get(0))?))
            .await
            .unwrap(),
        Engine::Postgres(postgres) => {
            let client = postgres.database.client().await.unwrap();
            client.query_one(SQL, &[]).await.unwrap().get(0)
        }
    }
}
