//! Running one store test on both backends: [`on_both`] runs the test's body against a
//! fresh SQLite store, then against a fresh database in the test process's throwaway
//! PostgreSQL cluster (skipped by the rule of `test_skip` where PostgreSQL is not
//! installed). [`AnyStore`] has the methods those bodies call, each the backend's own.

use super::postgres::tests::url_of;
use super::postgres::{Database, Options, test_database};
use super::{DealUpsert, Result, Store, UpsertOutcome};
use crate::domain::{ChangeCause, Deal, DealStatus, StageChange, StageRef};
use chrono::{DateTime, Utc};

/// A store of either backend.
#[derive(Clone)]
pub(crate) enum AnyStore {
    Sqlite(Store),
    Postgres(Database),
}

/// Runs `body` on a fresh store of each backend in turn; a failure names the backend
/// (the line before the panic in the test's output).
pub(crate) async fn on_both(test: &str, body: impl AsyncFn(AnyStore)) {
    let (_dir, store) = super::tests::temp_store();
    eprintln!("{test}: on SQLite");
    body(AnyStore::Sqlite(store)).await;
    let Some(database) = test_database(test) else {
        return;
    };
    let database = Database::open(&url_of(&database), &Options::default())
        .await
        .unwrap();
    eprintln!("{test}: on PostgreSQL");
    body(AnyStore::Postgres(database)).await;
}

impl AnyStore {
    pub(crate) async fn upsert_deals(&self, upserts: Vec<DealUpsert>) -> Result<UpsertOutcome> {
        match self {
            AnyStore::Sqlite(store) => store.upsert_deals(upserts).await,
            AnyStore::Postgres(database) => database.upsert_deals(upserts).await,
        }
    }

    pub(crate) async fn deal_by_external_id(
        &self,
        connection: &str,
        external_id: &str,
    ) -> Result<Option<Deal>> {
        match self {
            AnyStore::Sqlite(store) => store.deal_by_external_id(connection, external_id).await,
            AnyStore::Postgres(database) => {
                database.deal_by_external_id(connection, external_id).await
            }
        }
    }

    pub(crate) async fn history(&self, deal_id: i64) -> Result<Vec<StageChange>> {
        match self {
            AnyStore::Sqlite(store) => store.history(deal_id).await,
            AnyStore::Postgres(database) => database.history(deal_id).await,
        }
    }

    pub(crate) async fn move_deal(
        &self,
        deal_id: i64,
        to: StageRef,
        status: DealStatus,
        at: DateTime<Utc>,
        cause: ChangeCause,
    ) -> Result<bool> {
        match self {
            AnyStore::Sqlite(store) => store.move_deal(deal_id, to, status, at, cause).await,
            AnyStore::Postgres(database) => {
                database.move_deal(deal_id, to, status, at, cause).await
            }
        }
    }

    /// The stored deal `external_id` of `connection`, which the test wrote before.
    pub(crate) async fn stored_deal(&self, connection: &str, external_id: &str) -> Deal {
        self.deal_by_external_id(connection, external_id)
            .await
            .unwrap()
            .unwrap_or_else(|| panic!("no deal {external_id} of {connection}"))
    }

    /// The stored deal's canonical stage and status.
    pub(crate) async fn stage_and_status(
        &self,
        connection: &str,
        external_id: &str,
    ) -> (String, DealStatus) {
        let deal = self.stored_deal(connection, external_id).await;
        (deal.stage.as_str().to_owned(), deal.status)
    }

    /// One text column of a stored deal, as stored (for byte-for-byte checks).
    pub(crate) async fn stored_text(&self, external_id: &str, column: &'static str) -> String {
        let sql =
            |placeholder| format!("SELECT {column} FROM deals WHERE external_id = {placeholder}");
        match self {
            AnyStore::Sqlite(store) => {
                let (sql, external_id) = (sql("?1"), external_id.to_owned());
                store
                    .read(move |db| Ok(db.query_row(&sql, [external_id], |row| row.get(0))?))
                    .await
                    .unwrap()
            }
            AnyStore::Postgres(database) => {
                let client = database.client().await.unwrap();
                let row = client.query_one(&sql("$1"), &[&external_id]).await.unwrap();
                row.get(0)
            }
        }
    }

    /// How many deal rows there are, deleted ones included.
    pub(crate) async fn deal_rows(&self) -> i64 {
        const SQL: &str = "SELECT count(*) FROM deals";
        match self {
            AnyStore::Sqlite(store) => store
                .read(|db| Ok(db.query_row(SQL, [], |row| row.get(0))?))
                .await
                .unwrap(),
            AnyStore::Postgres(database) => {
                let client = database.client().await.unwrap();
                client.query_one(SQL, &[]).await.unwrap().get(0)
            }
        }
    }
}
