//! Against a real PostgreSQL 15 server: the test process's throwaway cluster
//! (`test_cluster`), a fresh database per test. Skipped, by the rule of `test_skip`,
//! where PostgreSQL is not installed.

use super::*;
use crate::config::Secret;
use test_cluster::TestDatabase;

pub(in crate::store) fn url_of(database: &TestDatabase) -> PostgresUrl {
    PostgresUrl::parse(&Secret::new(database.url())).unwrap()
}

/// The tables of the database's `public` schema, with their column count, in order.
async fn table_listing(database: &TestDatabase) -> Vec<(String, i64)> {
    database
        .admin()
        .await
        .query(
            "SELECT c.relname::text, count(a.attnum)
               FROM pg_class c
               JOIN pg_namespace n ON n.oid = c.relnamespace AND n.nspname = 'public'
               LEFT JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0
              WHERE c.relkind IN ('r', 'i')
              GROUP BY c.relname ORDER BY c.relname",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| (row.get(0), row.get(1)))
        .collect()
}

async fn versions(database: &TestDatabase) -> Vec<i64> {
    database
        .admin()
        .await
        .query("SELECT version FROM schema_version ORDER BY version", &[])
        .await
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect()
}

#[tokio::test]
async fn migrations_apply_to_an_empty_database_and_reopening_is_a_no_op() {
    let Some(database) =
        test_database("migrations_apply_to_an_empty_database_and_reopening_is_a_no_op")
    else {
        return;
    };
    let url = url_of(&database);
    let first = Database::connect(&url, &Options::default()).await.unwrap();
    assert_eq!(first.schema_state().await.unwrap(), SchemaState::Absent);
    assert_eq!(
        first.migrate().await.unwrap(),
        migrations::versions_after(0)
    );
    assert_eq!(
        first.schema_state().await.unwrap(),
        SchemaState::Current(SCHEMA_VERSION)
    );
    let tables: Vec<String> = table_listing(&database)
        .await
        .into_iter()
        .map(|(name, _)| name)
        .collect();
    // Every table of the SQLite database and of the webhook inbox.
    for table in [
        "connections",
        "deals",
        "deal_keys",
        "stage_history",
        "sync_cursors",
        "native_pipelines",
        "sync_runs",
        "quarantine",
        "enrichment_cache",
        "outbox",
        "digests",
        "digest_runs",
        "suppressions",
        "oauth_tokens",
        "webhook_inbox",
        "webhook_bodies",
        "webhook_dead_letters",
        "schema_version",
    ] {
        assert!(tables.iter().any(|t| t == table), "{table} in {tables:?}");
    }
    let before = table_listing(&database).await;
    let again = Database::open(&url, &Options::default()).await.unwrap();
    assert_eq!(again.migrate().await.unwrap(), Vec::<i64>::new());
    assert_eq!(table_listing(&database).await, before);
    assert_eq!(versions(&database).await, migrations::versions_after(0));
}

#[tokio::test]
async fn every_table_and_index_of_the_sqlite_schema_exists_in_postgres() {
    let Some(database) =
        test_database("every_table_and_index_of_the_sqlite_schema_exists_in_postgres")
    else {
        return;
    };
    Database::open(&url_of(&database), &Options::default())
        .await
        .unwrap();
    let pg: Vec<String> = table_listing(&database)
        .await
        .into_iter()
        .map(|(name, _)| name)
        .collect();
    // The SQLite files as the current binary creates them: every named table and
    // index must have its PostgreSQL counterpart of the same name.
    let dir = tempfile::tempdir().unwrap();
    let store = crate::store::Store::open(&dir.path().join("d.db")).unwrap();
    drop(store);
    let mut sqlite = Vec::new();
    for file in ["d.db", "d.inbox.db"] {
        let db = rusqlite::Connection::open(dir.path().join(file)).unwrap();
        let mut statement = db
            .prepare(
                "SELECT name FROM sqlite_master WHERE type IN ('table', 'index')
                   AND name NOT LIKE 'sqlite_%'",
            )
            .unwrap();
        let names = statement
            .query_map([], |row| row.get::<_, String>(0))
            .unwrap();
        sqlite.extend(names.map(Result::unwrap));
    }
    assert!(sqlite.len() > 20, "{sqlite:?}");
    // The exceptions, each with its counterpart: the inbox's open rows in PostgreSQL
    // are `pending` and `claimed` (replicas claim rows; SQLite's one worker does not).
    let counterpart = |name: &str| match name {
        "webhook_inbox_pending" => "webhook_inbox_open".to_owned(),
        name => name.to_owned(),
    };
    let missing: Vec<&String> = sqlite
        .iter()
        .filter(|name| !pg.contains(&counterpart(name)))
        .collect();
    assert!(missing.is_empty(), "missing in PostgreSQL: {missing:?}");
}

#[tokio::test]
async fn a_newer_schema_is_refused_naming_the_database_and_left_untouched() {
    let Some(database) =
        test_database("a_newer_schema_is_refused_naming_the_database_and_left_untouched")
    else {
        return;
    };
    database
        .admin()
        .await
        .batch_execute(
            "SET ROLE dealsync_tester;
             CREATE TABLE schema_version (version BIGINT PRIMARY KEY, applied_at TIMESTAMPTZ, dealsync TEXT);
             INSERT INTO schema_version VALUES (999, now(), 'future');
             CREATE TABLE from_the_future (x BIGINT);",
        )
        .await
        .unwrap();
    let before = table_listing(&database).await;
    let error = Database::open(&url_of(&database), &Options::default())
        .await
        .unwrap_err();
    assert!(
        matches!(
            error,
            StoreError::PostgresNewerSchema {
                found: 999,
                supported: SCHEMA_VERSION,
                ..
            }
        ),
        "{error}"
    );
    let shown = error.to_string();
    assert!(
        shown.contains(&format!("127.0.0.1:{}/{}", database.port, database.name)),
        "{shown}"
    );
    assert!(shown.contains("was not modified"), "{shown}");
    assert!(!shown.contains(test_cluster::PASSWORD), "{shown}");
    assert_eq!(table_listing(&database).await, before);
    assert_eq!(versions(&database).await, vec![999]);
    let connected = Database::connect(&url_of(&database), &Options::default())
        .await
        .unwrap();
    assert_eq!(
        connected.schema_state().await.unwrap(),
        SchemaState::Newer {
            found: 999,
            supported: SCHEMA_VERSION
        }
    );
}

#[tokio::test]
async fn two_pools_opening_at_once_migrate_once() {
    let Some(database) = test_database("two_pools_opening_at_once_migrate_once") else {
        return;
    };
    let url = url_of(&database);
    // Connected first, so both migrations start as close together as they can.
    let options = Options::default();
    let (a, b) = tokio::join!(
        Database::connect(&url, &options),
        Database::connect(&url, &options)
    );
    let (a, b) = (a.unwrap(), b.unwrap());
    let (applied_a, applied_b) = tokio::join!(a.migrate(), b.migrate());
    let mut applied = [applied_a.unwrap(), applied_b.unwrap()];
    applied.sort();
    assert_eq!(applied, [vec![], migrations::versions_after(0)]);
    assert_eq!(versions(&database).await, migrations::versions_after(0));
}

/// A deal row with the columns the schema requires.
const INSERT_DEAL: &str = "INSERT INTO deals (connection, external_id, title, stage, status,
        native_pipeline, native_stage, stage_entered_at, last_activity_at, first_seen_at,
        synced_at, content_hash, raw)
     VALUES ($1, $2, 'Deal', 'proposal', 'open', 'p', 's', 0, 0, 0, 0, 7, '{}') RETURNING id";

#[tokio::test]
async fn one_deal_per_connection_and_external_id_and_one_outbox_row_per_deal_rule_and_step() {
    let Some(database) = test_database(
        "one_deal_per_connection_and_external_id_and_one_outbox_row_per_deal_rule_and_step",
    ) else {
        return;
    };
    let store = Database::open(&url_of(&database), &Options::default())
        .await
        .unwrap();
    let client = store.client().await.unwrap();
    let id: i64 = client
        .query_one(INSERT_DEAL, &[&"crm", &"42"])
        .await
        .unwrap()
        .get(0);
    // The same external id in another connection is another deal.
    client
        .query_one(INSERT_DEAL, &[&"shop", &"42"])
        .await
        .unwrap();
    let twice = client
        .query_one(INSERT_DEAL, &[&"crm", &"42"])
        .await
        .unwrap_err();
    assert_eq!(
        twice.code(),
        Some(&tokio_postgres::error::SqlState::UNIQUE_VIOLATION),
        "{twice}"
    );
    let twice = StoreError::from(twice);
    assert!(!twice.is_transient() && !twice.is_disk_full(), "{twice}");

    let insert_outbox = "INSERT INTO outbox (deal_id, rule, step, recipient, state, anchor_at,
            due_at, next_attempt_at, created_at, updated_at)
         VALUES ($1, $2, $3, 'a@example.com', 'pending', 0, 0, 0, 0, 0)";
    client
        .execute(insert_outbox, &[&id, &"cart", &0_i64])
        .await
        .unwrap();
    client
        .execute(insert_outbox, &[&id, &"cart", &1_i64])
        .await
        .unwrap();
    client
        .execute(insert_outbox, &[&id, &"other", &0_i64])
        .await
        .unwrap();
    let twice = client
        .execute(insert_outbox, &[&id, &"cart", &1_i64])
        .await
        .unwrap_err();
    assert_eq!(
        twice.code(),
        Some(&tokio_postgres::error::SqlState::UNIQUE_VIOLATION),
        "{twice}"
    );
    let rows: i64 = client
        .query_one("SELECT count(*) FROM outbox", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(rows, 3);
    // An outbox row needs its deal.
    let orphan = client
        .execute(insert_outbox, &[&(id + 1000), &"cart", &0_i64])
        .await
        .unwrap_err();
    assert_eq!(
        orphan.code(),
        Some(&tokio_postgres::error::SqlState::FOREIGN_KEY_VIOLATION)
    );
}

#[tokio::test]
async fn pooled_connections_carry_the_statement_timeout() {
    let Some(database) = test_database("pooled_connections_carry_the_statement_timeout") else {
        return;
    };
    let options = Options {
        statement_timeout: Duration::from_millis(200),
        ..Options::default()
    };
    let store = Database::connect(&url_of(&database), &options)
        .await
        .unwrap();
    let client = store.client().await.unwrap();
    let shown: String = client
        .query_one("SHOW statement_timeout", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(shown, "200ms");
    let error = client.execute("SELECT pg_sleep(5)", &[]).await.unwrap_err();
    assert_eq!(
        error.code(),
        Some(&tokio_postgres::error::SqlState::QUERY_CANCELED),
        "{error}"
    );
}

/// A pooled connection asks the kernel to write its pages out early (so a
/// checkpoint's flush does not hold commits back), unless the server's administrator
/// chose a value: theirs is kept.
#[tokio::test]
async fn pooled_connections_ask_for_early_writeback_unless_the_server_chose_a_value() {
    let name = "pooled_connections_ask_for_early_writeback_unless_the_server_chose_a_value";
    let Some(database) = test_database(name) else {
        return;
    };
    async fn shown(database: &TestDatabase) -> String {
        let store = Database::connect(&url_of(database), &Options::default())
            .await
            .unwrap();
        let client = store.client().await.unwrap();
        client
            .query_one("SHOW backend_flush_after", &[])
            .await
            .unwrap()
            .get(0)
    }
    assert_eq!(shown(&database).await, "256kB");
    database
        .admin()
        .await
        .batch_execute(&format!(
            "ALTER DATABASE {} SET backend_flush_after = '64kB'",
            database.name
        ))
        .await
        .unwrap();
    assert_eq!(shown(&database).await, "64kB");
}

/// Opening the store asks for the same early writeback in every session of its
/// database (`ALTER DATABASE … SET`), so the server's own vacuum workers, which no pool
/// hook reaches, write back early too. A value set for the database is kept, and a
/// database dealsync's role does not own is opened all the same, its settings
/// untouched.
#[tokio::test]
async fn opening_the_store_asks_for_early_writeback_in_every_session_of_its_database() {
    let name = "opening_the_store_asks_for_early_writeback_in_every_session_of_its_database";
    let Some(database) = test_database(name) else {
        return;
    };
    /// What a new session that is not dealsync's gets: the superuser's, as an
    /// autovacuum worker's, and what the database carries.
    async fn seen(database: &TestDatabase) -> (String, Vec<String>) {
        let admin = database.admin().await;
        let shown = admin
            .query_one("SHOW backend_flush_after", &[])
            .await
            .unwrap()
            .get(0);
        let carried = admin
            .query(
                "SELECT c FROM pg_db_role_setting AS s, unnest(s.setconfig) AS c
                  WHERE s.setdatabase = (SELECT oid FROM pg_database
                                          WHERE datname = current_database())
                    AND s.setrole = 0",
                &[],
            )
            .await
            .unwrap()
            .iter()
            .map(|row| row.get(0))
            .collect();
        (shown, carried)
    }
    async fn open(database: &TestDatabase) {
        Database::open(&url_of(database), &Options::default())
            .await
            .unwrap();
    }
    /// What the server's administrator does to `database` before dealsync opens it.
    async fn beforehand(database: &TestDatabase, sql: &str) {
        database.admin().await.batch_execute(sql).await.unwrap();
    }
    assert_eq!(seen(&database).await, ("0".into(), vec![]));
    open(&database).await;
    let asked = (
        "256kB".to_owned(),
        vec!["backend_flush_after=256kB".to_owned()],
    );
    assert_eq!(seen(&database).await, asked);
    // Opened again (a restart, a second replica): nothing more.
    open(&database).await;
    assert_eq!(seen(&database).await, asked);

    let Some(chosen) = test_database(name) else {
        return;
    };
    beforehand(
        &chosen,
        &format!("ALTER DATABASE {} SET backend_flush_after = 0", chosen.name),
    )
    .await;
    open(&chosen).await;
    let kept = ("0".to_owned(), vec!["backend_flush_after=0".to_owned()]);
    assert_eq!(seen(&chosen).await, kept);

    let Some(not_owned) = test_database(name) else {
        return;
    };
    beforehand(
        &not_owned,
        &format!(
            "ALTER DATABASE {0} OWNER TO postgres;
             GRANT CREATE, USAGE ON SCHEMA public TO {1}",
            not_owned.name,
            test_cluster::PASSWORD_ROLE
        ),
    )
    .await;
    open(&not_owned).await;
    assert_eq!(seen(&not_owned).await, ("0".into(), vec![]));
}

#[tokio::test]
async fn a_wrong_password_is_refused_naming_the_server_and_never_the_password() {
    let Some(database) =
        test_database("a_wrong_password_is_refused_naming_the_server_and_never_the_password")
    else {
        return;
    };
    let wrong = PostgresUrl::parse(&Secret::new(
        database
            .url()
            .replace(test_cluster::PASSWORD, "Wr0ng-pAss-77"),
    ))
    .unwrap();
    let error = Database::connect(&wrong, &Options::default())
        .await
        .unwrap_err();
    let shown = crate::telemetry::error_chain(&error);
    assert!(
        shown.contains(&format!("127.0.0.1:{}/{}", database.port, database.name)),
        "{shown}"
    );
    assert!(shown.contains("password authentication failed"), "{shown}");
    assert!(shown.contains("check the user in storage.url"), "{shown}");
    assert!(!shown.contains("Wr0ng-pAss-77"), "{shown}");
    assert!(!shown.contains(test_cluster::PASSWORD), "{shown}");
    assert!(!error.is_transient(), "{shown}");
}

#[tokio::test]
async fn a_closed_port_is_refused_naming_host_port_and_the_os_cause() {
    // No server needed: a port nobody listens on.
    let port = std::net::TcpListener::bind(("127.0.0.1", 0))
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = PostgresUrl::parse(&Secret::new(format!(
        "postgres://dealsync:Cl0sed-pAss-88@127.0.0.1:{port}/dealsync"
    )))
    .unwrap();
    let error = Database::connect(&url, &Options::default())
        .await
        .unwrap_err();
    let shown = crate::telemetry::error_chain(&error);
    assert!(shown.contains(&format!("127.0.0.1:{port}")), "{shown}");
    assert!(shown.contains("Connection refused"), "{shown}");
    assert!(shown.contains("accepts TCP connections"), "{shown}");
    assert!(!shown.contains("Cl0sed-pAss-88"), "{shown}");
    assert!(
        error.is_transient(),
        "a refused connection may succeed later: {shown}"
    );
}

#[tokio::test]
async fn a_version_1_database_migrates_to_the_replica_schema_keeping_its_rows() {
    let Some(database) =
        test_database("a_version_1_database_migrates_to_the_replica_schema_keeping_its_rows")
    else {
        return;
    };
    // A database as the release with version 1 left it, with an inbox row.
    let admin = database.admin().await;
    admin
        .batch_execute(&format!(
            "SET ROLE {role};
             CREATE TABLE schema_version (version BIGINT PRIMARY KEY,
                 applied_at TIMESTAMPTZ NOT NULL DEFAULT now(), dealsync TEXT NOT NULL);
             {initial}
             INSERT INTO schema_version (version, dealsync) VALUES (1, 'older');
             INSERT INTO webhook_inbox (connection, delivery_id, received_at)
                 VALUES ('crm', 'd-1', 0);",
            role = test_cluster::PASSWORD_ROLE,
            initial = include_str!("migrations/0001_initial.sql"),
        ))
        .await
        .unwrap();
    let store = Database::connect(&url_of(&database), &Options::default())
        .await
        .unwrap();
    assert_eq!(
        store.schema_state().await.unwrap(),
        SchemaState::Older {
            found: 1,
            supported: SCHEMA_VERSION
        }
    );
    assert_eq!(
        store.migrate().await.unwrap(),
        migrations::versions_after(1)
    );
    assert_eq!(versions(&database).await, migrations::versions_after(0));
    let row = admin
        .query_one(
            "SELECT delivery_id, state, claimed_by, claimed_until IS NULL FROM webhook_inbox",
            &[],
        )
        .await
        .unwrap();
    assert_eq!(row.get::<_, String>(0), "d-1");
    assert_eq!(row.get::<_, String>(1), "pending");
    assert_eq!(row.get::<_, Option<String>>(2), None);
    assert!(row.get::<_, bool>(3));
    let leases: i64 = admin
        .query_one("SELECT count(*) FROM leases", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(leases, 0);
}
