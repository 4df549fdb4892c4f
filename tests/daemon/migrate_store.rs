//! `dealsync migrate-store` through the real binary: a SQLite install written by the
//! real daemon (a demo connection, Shopify webhooks, a cart follow-up sent to the real
//! SMTP test server) and by the library's store, copied into the test process's
//! throwaway PostgreSQL cluster; every table compared row for row, the SQLite files
//! hashed before and after. Where PostgreSQL is not installed these tests skip.

use crate::followups::{cart_rule, config as followup_config, put_cart, store};
use crate::foundation::demo_connection;
use crate::harness::daemon::{TestDaemon, run_cli};
use crate::harness::eventually;
use crate::harness::postgres::{PASSWORD, PASSWORD_ROLE, TestDatabase};
use crate::harness::postgres_database as database;
use crate::harness::smtp::SmtpServer;
use crate::webhooks::{SHOP_SECRET, checkout, order, post, shopify, shopify_headers};
use chrono::Utc;
use dealsync::store::postgres::from_sqlite::{File, TABLES};
use sha2::{Digest, Sha256};
use std::path::Path;
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(30);

/// `--credentials-dir` holding the credential `pg` (the test role's password), and
/// the `--to` URL that names it.
fn target(dir: &Path, database: &TestDatabase) -> (String, String) {
    let credentials = dir.join("credentials");
    std::fs::create_dir_all(&credentials).unwrap();
    std::fs::write(credentials.join("pg"), format!("{PASSWORD}\n")).unwrap();
    (
        credentials.to_str().unwrap().to_owned(),
        format!(
            "postgres://{PASSWORD_ROLE}:${{credential:pg}}@127.0.0.1:{}/{}",
            database.port, database.name
        ),
    )
}

/// `dealsync --config … --credentials-dir … migrate-store --to URL`.
async fn migrate(daemon: &TestDaemon, credentials: &str, to: &str) -> (i32, String, String) {
    run_cli(
        &[
            "--config",
            daemon.config_path.to_str().unwrap(),
            "--credentials-dir",
            credentials,
            "migrate-store",
            "--to",
            to,
        ],
        &[],
    )
    .await
}

fn sha256(path: &Path) -> String {
    let bytes = std::fs::read(path).unwrap_or_else(|error| panic!("{}: {error}", path.display()));
    format!("{:x}", Sha256::digest(bytes))
}

/// Both SQLite files' hashes.
fn hashes(daemon: &TestDaemon) -> [String; 2] {
    [
        sha256(&daemon.db_path),
        sha256(&dealsync::store::inbox_path(&daemon.db_path)),
    ]
}

/// A value as both databases can give it: PostgreSQL's BOOLEAN read as SQLite's 0/1.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Value {
    Null,
    Int(i64),
    Text(String),
    Bytes(Vec<u8>),
}

/// Every row of `table` in PostgreSQL, with its column names, sorted.
async fn pg_rows(client: &tokio_postgres::Client, table: &str) -> (Vec<String>, Vec<Vec<Value>>) {
    use tokio_postgres::types::Type;
    let all: Vec<String> = client
        .query(
            "SELECT column_name::text FROM information_schema.columns
              WHERE table_schema = 'public' AND table_name = $1 ORDER BY ordinal_position",
            &[&table],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect();
    // A replica's claim on a row has no SQLite counterpart: copied rows are unclaimed.
    let claims = ["claimed_by", "claimed_until"];
    if all.iter().any(|column| claims.contains(&column.as_str())) {
        let claimed: i64 = client
            .query_one(
                &format!(
                    "SELECT count(*) FROM {table}
                      WHERE claimed_by IS NOT NULL OR claimed_until IS NOT NULL"
                ),
                &[],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(claimed, 0, "{table}: copied rows are unclaimed");
    }
    let columns: Vec<String> = all
        .into_iter()
        .filter(|column| !claims.contains(&column.as_str()))
        .collect();
    let rows = client
        .query(
            &format!(
                "SELECT {} FROM {table}",
                columns
                    .iter()
                    .map(|column| format!("\"{column}\""))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            &[],
        )
        .await
        .unwrap();
    let mut values: Vec<Vec<Value>> = rows
        .iter()
        .map(|row| {
            (0..row.len())
                .map(|at| {
                    let ty = row.columns()[at].type_().clone();
                    let value = if ty == Type::INT8 {
                        row.get::<_, Option<i64>>(at).map(Value::Int)
                    } else if ty == Type::BOOL {
                        row.get::<_, Option<bool>>(at)
                            .map(|b| Value::Int(i64::from(b)))
                    } else if ty == Type::TEXT {
                        row.get::<_, Option<String>>(at).map(Value::Text)
                    } else if ty == Type::BYTEA {
                        row.get::<_, Option<Vec<u8>>>(at).map(Value::Bytes)
                    } else {
                        panic!("{table}: unexpected column type {ty}")
                    };
                    value.unwrap_or(Value::Null)
                })
                .collect()
        })
        .collect();
    values.sort();
    (columns, values)
}

/// Every row of `table` in SQLite, the columns in `columns`' order, sorted.
fn sqlite_rows(path: &Path, table: &str, columns: &[String]) -> Vec<Vec<Value>> {
    use rusqlite::types::ValueRef;
    let db =
        rusqlite::Connection::open_with_flags(path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .unwrap();
    let list = columns
        .iter()
        .map(|c| format!("\"{c}\""))
        .collect::<Vec<_>>()
        .join(", ");
    let mut statement = db.prepare(&format!("SELECT {list} FROM {table}")).unwrap();
    let mut rows = statement.query([]).unwrap();
    let mut values = Vec::new();
    while let Some(row) = rows.next().unwrap() {
        values.push(
            (0..columns.len())
                .map(|at| match row.get_ref(at).unwrap() {
                    ValueRef::Null => Value::Null,
                    ValueRef::Integer(value) => Value::Int(value),
                    ValueRef::Text(text) => Value::Text(String::from_utf8(text.to_vec()).unwrap()),
                    ValueRef::Blob(bytes) => Value::Bytes(bytes.to_vec()),
                    ValueRef::Real(value) => panic!("{table}: a REAL {value}"),
                })
                .collect(),
        );
    }
    values.sort();
    values
}

async fn pg_total_rows(client: &tokio_postgres::Client) -> i64 {
    let mut total = 0;
    for (_, table) in TABLES {
        let rows: i64 = client
            .query_one(&format!("SELECT count(*) FROM {table}"), &[])
            .await
            .unwrap()
            .get(0);
        total += rows;
    }
    total
}

/// A stopped daemon's install with rows in most tables, written by the daemon itself
/// and, for what a short run cannot reach (a quarantined record, an enrichment cache
/// entry, an OAuth token, a suppression), by the library's store.
async fn populated_install() -> (TestDaemon, SmtpServer) {
    let smtp = SmtpServer::start().await;
    let rules = cart_rule("200ms", "1h", "2h");
    let body = format!(
        "{}{}{}",
        demo_connection("demo"),
        shopify("shop", "1h"),
        followup_config(&smtp, "", &rules)
    );
    let mut daemon = TestDaemon::start(&body).await;
    // Webhooks: three checkouts, an order closing one of them, and an authentic
    // delivery whose body cannot be read (a dead letter).
    for n in 0..3 {
        let body = checkout(
            &format!("tok-{n}"),
            "2026-01-01T10:05:00Z",
            "buyer@example.com",
        );
        let headers = shopify_headers(SHOP_SECRET, "checkouts/create", &format!("d-{n}"), &body);
        let (status, text) = post(&daemon, "shop", headers, body).await;
        assert_eq!(status, 200, "{text}");
    }
    let body = order(9001, Some("tok-0"), "buyer@example.com");
    let headers = shopify_headers(SHOP_SECRET, "orders/create", "d-order", &body);
    assert_eq!(post(&daemon, "shop", headers, body).await.0, 200);
    let bad = b"{ not json".to_vec();
    let headers = shopify_headers(SHOP_SECRET, "checkouts/create", "d-bad", &bad);
    assert_eq!(post(&daemon, "shop", headers, bad).await.0, 400);
    // A cart whose first reminder goes out over SMTP.
    let library = store(&daemon);
    put_cart(
        &library,
        "carts",
        "c1",
        "ada@example.com",
        Some(true),
        "cart_abandoned",
        Utc::now(),
    )
    .await;
    drop(library);
    eventually(
        "the demo's deals, the webhooks processed and a reminder sent",
        WAIT,
        || async {
            let db = daemon.db_read_only();
            let inbox = daemon.inbox_read_only();
            let count = |db: &rusqlite::Connection, sql: &str| -> i64 {
                db.query_row(sql, [], |row| row.get(0)).unwrap()
            };
            let ready = count(&db, "SELECT count(*) FROM deals WHERE connection = 'demo'") >= 20
                && count(
                    &db,
                    "SELECT count(*) FROM sync_runs WHERE finished_at IS NOT NULL",
                ) > 0
                && count(&db, "SELECT count(*) FROM outbox WHERE state = 'sent'") > 0
                && count(&db, "SELECT count(*) FROM deal_keys") > 0
                && count(
                    &inbox,
                    "SELECT count(*) FROM webhook_inbox WHERE state = 'processed'",
                ) >= 4
                && !smtp.messages().is_empty();
            ready.then_some(())
        },
    )
    .await;
    daemon.signal("TERM");
    assert!(daemon.wait_exit(WAIT).await.success(), "{}", daemon.logs());

    let library = store(&daemon);
    library
        .commit_page(
            "demo",
            "deals",
            Vec::new(),
            vec![dealsync::store::Quarantined {
                external_id: Some("broken-1".into()),
                error: "amount is not a number".into(),
                raw: dealsync::domain::RawRecord::from_text(
                    r#"{"id":"broken-1","amount":"x"}"#.into(),
                )
                .unwrap(),
            }],
            vec![dealsync::store::CachedRecord {
                step: "contact".into(),
                id: "501".into(),
                record: dealsync::domain::RawRecord::from_text(
                    r#"{"id":"501","email":"c@example.com"}"#.into(),
                )
                .unwrap(),
            }],
            None,
        )
        .await
        .unwrap();
    library
        .save_oauth_token(
            "sf",
            "access-tok-1",
            Some("refresh-tok-1"),
            Some(Utc::now()),
            serde_json::json!({ "instance_url": "https://example.my.salesforce.com" }),
        )
        .await
        .unwrap();
    library
        .suppress(
            "gone@example.com".into(),
            "unsubscribed".into(),
            Some("test".into()),
            Utc::now(),
        )
        .await
        .unwrap();
    drop(library);
    // The store's background threads close their connections a moment after the drop,
    // the last one checkpointing the WAL into the file and removing it: only then is
    // the file what the hash before the copy must see.
    let wal = |path: &Path| Path::new(&format!("{}-wal", path.display())).exists();
    eventually("the store's connections closed", WAIT, || async {
        let inbox = dealsync::store::inbox_path(&daemon.db_path);
        (!wal(&daemon.db_path) && !wal(&inbox)).then_some(())
    })
    .await;
    (daemon, smtp)
}

#[tokio::test]
async fn migrate_store_copies_every_table_row_for_row_and_leaves_the_sqlite_files_untouched() {
    let Some(database) = database(
        "migrate_store_copies_every_table_row_for_row_and_leaves_the_sqlite_files_untouched",
    ) else {
        return;
    };
    let (daemon, _smtp) = populated_install().await;
    let (credentials, to) = target(daemon.dir.path(), &database);
    let before = hashes(&daemon);

    let (code, stdout, stderr) = migrate(&daemon, &credentials, &to).await;

    assert_eq!(code, 0, "{stdout}{stderr}");
    assert_eq!(hashes(&daemon), before, "the SQLite files were modified");
    assert!(!format!("{stdout}{stderr}").contains(PASSWORD));
    assert!(stderr.contains("copying deals: "), "{stderr}");
    assert!(
        stdout.contains("every table's row count verified"),
        "{stdout}"
    );
    let client = database.admin().await;
    let mut filled = Vec::new();
    for &(file, table) in TABLES {
        let path = match file {
            File::Database => daemon.db_path.clone(),
            File::Inbox => dealsync::store::inbox_path(&daemon.db_path),
        };
        let (columns, pg) = pg_rows(&client, table).await;
        let sqlite = sqlite_rows(&path, table, &columns);
        assert_eq!(pg, sqlite, "table {table}: rows differ");
        assert!(
            stdout.contains(&format!("\n{table}: {} rows\n", sqlite.len()))
                || stdout.starts_with(&format!("{table}: {} rows\n", sqlite.len())),
            "{table} in {stdout}"
        );
        if !sqlite.is_empty() {
            filled.push(table);
        }
    }
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
        "suppressions",
        "oauth_tokens",
        "webhook_inbox",
        "webhook_bodies",
        "webhook_dead_letters",
    ] {
        assert!(
            filled.contains(&table),
            "{table} has no row to copy: {filled:?}"
        );
    }

    // Inserts after the copy get ids above the copied ones: a deal and its history row
    // as the daemon writes them (the id from the identity)...
    let max_deal: i64 = client
        .query_one("SELECT max(id) FROM deals", &[])
        .await
        .unwrap()
        .get(0);
    let deal: i64 = client
        .query_one(
            "INSERT INTO deals (connection, external_id, title, stage, status, native_pipeline,
                native_stage, stage_entered_at, last_activity_at, first_seen_at, synced_at,
                content_hash, raw)
             VALUES ('demo', 'after-the-copy', 'New', 'proposal', 'open', 'p', 's', 0, 0, 0, 0,
                7, '{}') RETURNING id",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(deal > max_deal, "deal id {deal}, copied up to {max_deal}");
    let max_history: i64 = client
        .query_one("SELECT max(id) FROM stage_history", &[])
        .await
        .unwrap()
        .get(0);
    let history: i64 = client
        .query_one(
            "INSERT INTO stage_history (deal_id, at, to_stage, native_to, cause)
             VALUES ($1, 0, 'proposal', 's', 'poll') RETURNING id",
            &[&deal],
        )
        .await
        .unwrap()
        .get(0);
    assert!(
        history > max_history,
        "history id {history}, copied up to {max_history}"
    );
    // ... and every identity's next value (what an insert's default takes).
    let identities = client
        .query(
            "SELECT table_name::text, column_name::text FROM information_schema.columns
              WHERE table_schema = 'public' AND is_identity = 'YES'",
            &[],
        )
        .await
        .unwrap();
    assert!(identities.len() >= 8, "{}", identities.len());
    for row in &identities {
        let (table, column): (String, String) = (row.get(0), row.get(1));
        let max: Option<i64> = client
            .query_one(&format!("SELECT max({column}) FROM {table}"), &[])
            .await
            .unwrap()
            .get(0);
        let next: i64 = client
            .query_one(
                "SELECT nextval(pg_get_serial_sequence($1, $2))",
                &[&table, &column],
            )
            .await
            .unwrap()
            .get(0);
        assert!(
            next > max.unwrap_or(0),
            "{table}.{column}: next {next}, max {max:?}"
        );
    }

    // A second run into the same database is refused naming the first table with rows,
    // and writes nothing.
    let total = pg_total_rows(&client).await;
    let (code, stdout, stderr) = migrate(&daemon, &credentials, &to).await;
    assert_ne!(code, 0, "{stdout}{stderr}");
    assert!(
        stderr.contains("already holds dealsync data (table connections has rows)"),
        "{stderr}"
    );
    assert!(stderr.contains("nothing was written"), "{stderr}");
    assert_eq!(pg_total_rows(&client).await, total);
    assert_eq!(hashes(&daemon), before);
}

#[tokio::test]
async fn migrate_store_is_refused_while_the_daemon_runs_and_copies_nothing() {
    let Some(database) =
        database("migrate_store_is_refused_while_the_daemon_runs_and_copies_nothing")
    else {
        return;
    };
    let daemon = TestDaemon::start(&demo_connection("demo")).await;
    let (credentials, to) = target(daemon.dir.path(), &database);

    let (code, stdout, stderr) = migrate(&daemon, &credentials, &to).await;

    assert_eq!(code, 75, "{stdout}{stderr}");
    assert!(
        stderr.contains(&format!(
            "a dealsync daemon (pid {}) is running",
            daemon.pid()
        )),
        "{stderr}"
    );
    assert!(stderr.contains("stop the daemon first"), "{stderr}");
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
    assert_eq!(tables, 0, "nothing was created");
}

#[tokio::test]
async fn a_wrong_password_exits_non_zero_naming_host_and_port_and_never_the_password() {
    let Some(database) =
        database("a_wrong_password_exits_non_zero_naming_host_and_port_and_never_the_password")
    else {
        return;
    };
    let mut daemon = TestDaemon::start(&demo_connection("demo")).await;
    daemon.signal("TERM");
    daemon.wait_exit(WAIT).await;
    let before = hashes(&daemon);
    // The password written in the URL, as the plain form allows.
    let to = format!(
        "postgres://{PASSWORD_ROLE}:Wr0ng-pAss-91@127.0.0.1:{}/{}",
        database.port, database.name
    );

    let (code, stdout, stderr) = run_cli(
        &[
            "--config",
            daemon.config_path.to_str().unwrap(),
            "migrate-store",
            "--to",
            &to,
        ],
        &[],
    )
    .await;

    assert_ne!(code, 0, "{stdout}{stderr}");
    assert!(
        stderr.contains(&format!("127.0.0.1:{}/{}", database.port, database.name)),
        "{stderr}"
    );
    assert!(
        stderr.contains("password authentication failed"),
        "{stderr}"
    );
    assert!(!format!("{stdout}{stderr}").contains("Wr0ng-pAss-91"));
    assert_eq!(hashes(&daemon), before);
}
