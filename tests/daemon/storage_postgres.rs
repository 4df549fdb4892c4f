//! `[storage] url` (PostgreSQL) through the real binary: `check` reaches the server,
//! applies nothing and reports the schema (absent, current, newer), naming
//! host:port/db and never the password; `sync` pulls a mock HubSpot into the database,
//! fully then incrementally, and `report` gives the figures SQLite gives; processes on
//! one database share each deal's writes, a token refresh and the request rate. The
//! daemon's replicas are in `replicas.rs`. The server is the test process's throwaway cluster
//! (`harness::postgres`); where PostgreSQL is not installed those tests skip.

use crate::harness::daemon::run_cli;
use crate::harness::free_port;
use crate::harness::postgres::{self, PASSWORD, PASSWORD_ROLE, TestDatabase};
use crate::harness::postgres_database as database;
use crate::harness::vendors::hubspot::{HsDeal, HubSpot};
use crate::harness::vendors::salesforce::{Salesforce, SfOpp};
use std::path::Path;
use std::time::Duration;

/// A config whose store is `url` (its password through `${credential:pg}`, read from
/// `dir/credentials/pg`, which holds `password`), and the `--credentials-dir` to pass.
fn write_config(dir: &Path, url_without_password: &str, password: &str) -> (String, String) {
    let credentials = dir.join("credentials");
    std::fs::create_dir_all(&credentials).unwrap();
    std::fs::write(credentials.join("pg"), format!("{password}\n")).unwrap();
    let url = url_without_password.replacen("@", ":${credential:pg}@", 1);
    let path = dir.join("dealsync.toml");
    std::fs::write(
        &path,
        format!(
            "[storage]\nurl = \"{url}\"\n\n[server]\nlisten = \"127.0.0.1:{}\"\n",
            free_port()
        ),
    )
    .unwrap();
    (
        path.to_str().unwrap().to_owned(),
        credentials.to_str().unwrap().to_owned(),
    )
}

/// Appends `text` (a connection's TOML) to the config file `config`.
fn append_to_config(config: &str, text: &str) {
    let mut whole = std::fs::read_to_string(config).unwrap();
    whole.push_str(text);
    std::fs::write(config, whole).unwrap();
}

fn url_without_password(database: &TestDatabase) -> String {
    format!(
        "postgres://{PASSWORD_ROLE}@127.0.0.1:{}/{}",
        database.port, database.name
    )
}

/// `dealsync --config CONFIG --credentials-dir CREDENTIALS check`.
async fn check(config: &str, credentials: &str) -> (i32, String, String) {
    run_cli(
        &[
            "--config",
            config,
            "--credentials-dir",
            credentials,
            "check",
        ],
        &[],
    )
    .await
}

async fn tables(database: &TestDatabase) -> Vec<String> {
    database
        .admin()
        .await
        .query(
            "SELECT tablename::text FROM pg_tables WHERE schemaname = 'public' ORDER BY 1",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|row| row.get(0))
        .collect()
}

#[tokio::test]
async fn check_reports_an_absent_then_current_then_newer_postgres_schema_and_applies_nothing() {
    let Some(database) = database(
        "check_reports_an_absent_then_current_then_newer_postgres_schema_and_applies_nothing",
    ) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let (config, credentials) =
        write_config(dir.path(), &url_without_password(&database), PASSWORD);
    let target = format!("127.0.0.1:{}/{}", database.port, database.name);
    let check = || check(&config, &credentials);

    let (code, stdout, stderr) = check().await;
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert!(
        stdout.contains(&format!(
            "storage PostgreSQL {target}: reachable, no dealsync schema yet"
        )),
        "{stdout}"
    );
    // Every command runs on PostgreSQL: check no longer says that most refuse it.
    assert!(!stdout.contains("refuse storage.url"), "{stdout}");
    assert!(!format!("{stdout}{stderr}").contains(PASSWORD));
    assert_eq!(
        tables(&database).await,
        Vec::<String>::new(),
        "check applied nothing"
    );

    // Migrated by the library (no command of this version does it).
    let url = dealsync::config::PostgresUrl::parse(&dealsync::config::Secret::new(database.url()))
        .unwrap();
    dealsync::store::postgres::Database::open(&url, &Default::default())
        .await
        .unwrap();
    let migrated = tables(&database).await;
    let (code, stdout, stderr) = check().await;
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert!(
        stdout.contains(&format!(
            "storage PostgreSQL {target}: reachable, schema version {}, current",
            dealsync::store::postgres::SCHEMA_VERSION
        )),
        "{stdout}"
    );
    assert_eq!(tables(&database).await, migrated);

    database
        .admin()
        .await
        .execute(
            "INSERT INTO schema_version VALUES (999, now(), 'future')",
            &[],
        )
        .await
        .unwrap();
    let (code, stdout, stderr) = check().await;
    assert_eq!(code, 69, "{stdout}{stderr}");
    assert!(
        stderr.contains(&format!(
            "storage PostgreSQL {target}: reachable, schema version 999, newer"
        )),
        "{stderr}"
    );
    assert!(stderr.contains("nothing was changed"), "{stderr}");
    assert!(!format!("{stdout}{stderr}").contains(PASSWORD));
    assert_eq!(tables(&database).await, migrated);
}

#[tokio::test]
async fn check_names_host_port_and_the_cause_of_a_closed_port_or_a_wrong_password_never_the_password()
 {
    // A closed port: no server needed.
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let (config, credentials) = write_config(
        dir.path(),
        &format!("postgres://dealsync@127.0.0.1:{port}/dealsync"),
        "Cl0sed-port-pAss",
    );
    let (code, stdout, stderr) = run_cli(
        &[
            "--config",
            &config,
            "--credentials-dir",
            &credentials,
            "check",
        ],
        &[],
    )
    .await;
    assert_eq!(code, 69, "{stdout}{stderr}");
    assert!(
        stderr.contains(&format!(
            "connecting to PostgreSQL at 127.0.0.1:{port}/dealsync"
        )),
        "{stderr}"
    );
    assert!(stderr.contains("Connection refused"), "{stderr}");
    assert!(stderr.contains("accepts TCP connections"), "{stderr}");
    assert!(!format!("{stdout}{stderr}").contains("Cl0sed-port-pAss"));

    let Some(database) = database(
        "check_names_host_port_and_the_cause_of_a_closed_port_or_a_wrong_password_never_the_password",
    ) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let (config, credentials) = write_config(
        dir.path(),
        &url_without_password(&database),
        "Wr0ng-pAss-99",
    );
    let (code, stdout, stderr) = run_cli(
        &[
            "--config",
            &config,
            "--credentials-dir",
            &credentials,
            "check",
        ],
        &[],
    )
    .await;
    assert_eq!(code, 69, "{stdout}{stderr}");
    assert!(
        stderr.contains(&format!(
            "connecting to PostgreSQL at 127.0.0.1:{}/{}",
            database.port, database.name
        )),
        "{stderr}"
    );
    assert!(
        stderr.contains("password authentication failed"),
        "{stderr}"
    );
    let shown = format!("{stdout}{stderr}");
    assert!(
        !shown.contains("Wr0ng-pAss-99") && !shown.contains(PASSWORD),
        "{shown}"
    );
}

/// `dealsync sync` with `storage.url`: a full HubSpot sync across pages (owners and a
/// contact enriched) lands every deal once in PostgreSQL with one history row each, the
/// run and the cursor recorded; a change then arrives through the incremental search as
/// one stage move with its history row; a run with nothing new changes nothing.
#[tokio::test]
async fn sync_pulls_hubspot_into_postgres_fully_then_incrementally() {
    let Some(database) = database("sync_pulls_hubspot_into_postgres_fully_then_incrementally")
    else {
        return;
    };
    let hubspot = HubSpot::start("pat-test", None).await;
    let base = chrono::Utc::now().timestamp_millis() - 3_600_000;
    hubspot.put_contact(501, "ada@acme.example", "Ada", "Lovelace");
    let stages = [
        "appointmentscheduled",
        "qualifiedtobuy",
        "contractsent",
        "closedwon",
    ];
    for id in 1..=9_u64 {
        let mut deal = HsDeal::new(
            1000 + id,
            &format!("Deal {id}"),
            stages[id as usize % stages.len()],
            base + id as i64 * 1000,
        );
        deal.contact = (id == 1).then_some(501);
        hubspot.put(deal);
    }
    let dir = tempfile::tempdir().unwrap();
    let (config, credentials) =
        write_config(dir.path(), &url_without_password(&database), PASSWORD);
    let connection = crate::pull::hubspot_connection("hs", &hubspot.url(), "");
    append_to_config(&config, &connection);
    // The same install on SQLite, pulling the same mock: what the report reads must
    // agree.
    let sqlite_config = dir.path().join("sqlite.toml");
    std::fs::write(
        &sqlite_config,
        format!(
            "[storage]\npath = \"{}/sqlite.db\"\n{connection}",
            dir.path().display()
        ),
    )
    .unwrap();
    let sqlite_config = sqlite_config.to_str().unwrap().to_owned();
    let cli = |config: &str, command: &[&str]| {
        let mut args = vec!["--config", config, "--credentials-dir", &credentials];
        args.extend_from_slice(command);
        let args: Vec<String> = args.into_iter().map(str::to_owned).collect();
        async move {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let (code, stdout, stderr) = run_cli(&args, &[]).await;
            assert_eq!(code, 0, "{args:?}: {stdout}{stderr}");
            assert!(!format!("{stdout}{stderr}").contains(PASSWORD));
            stdout
        }
    };
    let sync = || async {
        cli(&sqlite_config, &["sync", "hs"]).await;
        cli(&config, &["sync", "hs"]).await
    };
    let admin = database.admin().await;
    let count = |sql: &'static str| {
        let admin = &admin;
        async move { admin.query_one(sql, &[]).await.unwrap().get::<_, i64>(0) }
    };

    sync().await;
    assert_eq!(
        count("SELECT count(*) FROM deals WHERE connection = 'hs'").await,
        9
    );
    assert_eq!(
        count("SELECT count(DISTINCT external_id) FROM deals").await,
        9,
        "one deal per external id"
    );
    assert_eq!(count("SELECT count(*) FROM stage_history").await, 9);
    assert!(
        hubspot.faults().count("/crm/v3/objects/deals?") >= 5,
        "paged two at a time"
    );
    let row = admin
        .query_one(
            "SELECT stage, status, contact_email, amount_minor, currency FROM deals
             WHERE external_id = '1001'",
            &[],
        )
        .await
        .unwrap();
    let first: (String, String, Option<String>, Option<i64>, Option<String>) =
        (row.get(0), row.get(1), row.get(2), row.get(3), row.get(4));
    assert_eq!(
        first,
        (
            "needs_assessment".into(),
            "open".into(),
            Some("ada@acme.example".into()),
            Some(10050),
            Some("USD".into())
        )
    );
    assert_eq!(
        count("SELECT count(*) FROM sync_runs WHERE status = 'succeeded' AND \"full\"").await,
        1
    );
    assert_eq!(
        count("SELECT count(*) FROM sync_cursors WHERE connection = 'hs' AND stream = 'deals'")
            .await,
        1
    );

    hubspot.update(1004, |deal| {
        deal.stage = "contractsent".into();
        deal.modified_ms = chrono::Utc::now().timestamp_millis();
    });
    sync().await;
    assert!(hubspot.faults().count("/crm/v3/objects/deals/search") >= 1);
    let moved = admin
        .query_one("SELECT stage FROM deals WHERE external_id = '1004'", &[])
        .await
        .unwrap();
    assert_eq!(moved.get::<_, String>(0), "closing");
    assert_eq!(count("SELECT count(*) FROM stage_history").await, 10);
    assert_eq!(
        count("SELECT count(*) FROM sync_runs WHERE status = 'succeeded' AND NOT \"full\"").await,
        1
    );

    sync().await;
    assert_eq!(
        count("SELECT count(*) FROM stage_history").await,
        10,
        "nothing new, nothing written"
    );
    assert_eq!(count("SELECT count(*) FROM deals").await, 9);

    // `report` on PostgreSQL: the same figures as on SQLite for the same period.
    let period = [
        "report",
        "--format",
        "json",
        "--since",
        "2020-01-01",
        "--until",
        "2100-01-01",
    ];
    let on_postgres: serde_json::Value =
        serde_json::from_str(&cli(&config, &period).await).unwrap();
    let on_sqlite: serde_json::Value =
        serde_json::from_str(&cli(&sqlite_config, &period).await).unwrap();
    assert_eq!(on_postgres, on_sqlite);
    assert_eq!(on_postgres["total"]["deals"], 9, "{on_postgres}");
    assert!(
        on_postgres["total"]["forecast"]
            .as_array()
            .is_some_and(|rows| !rows.is_empty()),
        "{on_postgres}"
    );
    // `deals list` and `stages` read the same on both, but for when each store first saw
    // each deal (its own sync's clock).
    let list = ["deals", "list", "--format", "json"];
    let listed = |text: String| -> Vec<serde_json::Value> {
        let mut deals: Vec<serde_json::Value> = serde_json::from_str(&text).unwrap();
        for deal in &mut deals {
            deal.as_object_mut().unwrap().remove("first_seen_at");
        }
        deals
    };
    let deals_on_postgres = listed(cli(&config, &list).await);
    assert_eq!(deals_on_postgres.len(), 9);
    assert!(
        deals_on_postgres == listed(cli(&sqlite_config, &list).await),
        "deals list differs"
    );
    assert_eq!(
        cli(&config, &["stages"]).await,
        cli(&sqlite_config, &["stages"]).await
    );
    // The suppression list is the database's: added on PostgreSQL, seen there only.
    cli(&config, &["suppressions", "add", "Ada@Acme.example"]).await;
    let listed = cli(&config, &["suppressions", "list", "--format", "json"]).await;
    assert!(listed.contains("ada@acme.example"), "{listed}");
    let on_sqlite = cli(
        &sqlite_config,
        &["suppressions", "list", "--format", "json"],
    )
    .await;
    assert!(!on_sqlite.contains("ada@acme.example"), "{on_sqlite}");
    cli(&config, &["suppressions", "remove", "ada@acme.example"]).await;
    assert_eq!(
        cli(&config, &["quarantine", "list", "--format", "json"])
            .await
            .trim(),
        "[]"
    );
}

/// Three `dealsync sync` processes on one PostgreSQL database at once, pulling the same
/// HubSpot, full then again after changes: every deal is stored once, with one history
/// row per stage change, whichever process wrote it (the per-deal locks serialize the
/// writers of a deal; without them the second insert of a deal fails on the unique
/// key or a move is recorded twice).
#[tokio::test]
async fn three_syncs_at_once_on_one_database_store_each_deal_and_change_once() {
    let Some(database) =
        database("three_syncs_at_once_on_one_database_store_each_deal_and_change_once")
    else {
        return;
    };
    let hubspot = HubSpot::start("pat-test", None).await;
    hubspot.put_deals(1..=60, "appointmentscheduled");
    let dir = tempfile::tempdir().unwrap();
    let (config, credentials) =
        write_config(dir.path(), &url_without_password(&database), PASSWORD);
    append_to_config(
        &config,
        &crate::pull::hubspot_connection("hs", &hubspot.url(), ""),
    );
    let args = [
        "--config",
        &config,
        "--credentials-dir",
        &credentials,
        "sync",
        "--full",
        "hs",
    ];
    let syncs = || async {
        let runs = (0..3).map(|_| run_cli(&args, &[]));
        for (code, stdout, stderr) in futures_util::future::join_all(runs).await {
            assert_eq!(code, 0, "{stdout}{stderr}");
        }
    };
    let admin = database.admin().await;
    let count = |sql: &'static str| {
        let admin = &admin;
        async move { admin.query_one(sql, &[]).await.unwrap().get::<_, i64>(0) }
    };

    syncs().await;
    assert_eq!(count("SELECT count(*) FROM deals").await, 60);
    assert_eq!(count("SELECT count(*) FROM stage_history").await, 60);

    let now = chrono::Utc::now().timestamp_millis();
    for id in 1..=30_u64 {
        hubspot.update(id, |deal| {
            deal.stage = "contractsent".into();
            deal.modified_ms = now;
        });
    }
    syncs().await;
    assert_eq!(count("SELECT count(*) FROM deals").await, 60);
    assert_eq!(
        count("SELECT count(*) FROM stage_history").await,
        90,
        "one row per deal created, one per deal moved"
    );
    assert_eq!(
        count("SELECT count(*) FROM deals WHERE stage = 'closing'").await,
        30
    );
    assert_eq!(
        count("SELECT count(*) FROM sync_runs WHERE status = 'succeeded'").await,
        6
    );
}

/// The connection to PostgreSQL lost in the middle of a `dealsync sync` (a relay in
/// front of the server cut, as a restart or a partition does): the run fails with an
/// error that names the server and never the password, keeps every page it committed
/// with its cursor, and the next run, once the server is back, completes it: every deal
/// once, one history row each.
#[tokio::test]
async fn a_sync_that_loses_postgres_midway_fails_clearly_and_the_next_one_completes_it() {
    let test = "a_sync_that_loses_postgres_midway_fails_clearly_and_the_next_one_completes_it";
    let Some(database) = database(test) else {
        return;
    };
    let relay = postgres::Relay::start(database.port).await;
    let hubspot = HubSpot::start("pat-test", None).await;
    hubspot.put_deals(1..=20, "qualifiedtobuy");
    // From the fourth request for deals on, every one is held until the server is out
    // of reach (a fault is served to the next request of the path, in queue order; a
    // zero delay lets one pass).
    let gate = std::sync::Arc::new(tokio::sync::Semaphore::new(0));
    for n in 0..40 {
        let fault = if n < 3 {
            crate::harness::vendors::Fault::Delay(Duration::ZERO)
        } else {
            crate::harness::vendors::Fault::Gate(gate.clone())
        };
        hubspot.faults().push("/crm/v3/objects/deals", fault);
    }
    let dir = tempfile::tempdir().unwrap();
    let url = format!(
        "postgres://{PASSWORD_ROLE}@127.0.0.1:{}/{}",
        relay.port(),
        database.name
    );
    let (config, credentials) = write_config(dir.path(), &url, PASSWORD);
    append_to_config(
        &config,
        &crate::pull::hubspot_connection("hs", &hubspot.url(), ""),
    );
    let args = [
        "--config",
        &config,
        "--credentials-dir",
        &credentials,
        "sync",
        "hs",
    ]
    .map(str::to_owned);
    let sync = || {
        let args = args.clone();
        tokio::spawn(async move {
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            run_cli(&args, &[]).await
        })
    };
    let admin = database.admin().await;
    // Zero until the first run has made the schema.
    let deals = || async {
        admin
            .query_one("SELECT count(*) FROM deals", &[])
            .await
            .map_or(0, |row| row.get::<_, i64>(0))
    };

    let first = sync();
    crate::harness::eventually(
        "a page stored and the fourth request held",
        Duration::from_secs(30),
        || async {
            (deals().await >= 2 && hubspot.faults().count("/crm/v3/objects/deals") >= 4)
                .then_some(())
        },
    )
    .await;
    relay.cut().await;
    gate.add_permits(1_000);
    let (code, stdout, stderr) = first.await.unwrap();
    assert_ne!(code, 0, "{stdout}{stderr}");
    let failure = stderr
        .lines()
        .find(|line| line.contains("sync failed"))
        .unwrap_or_else(|| panic!("no failure line: {stderr}"));
    // Lost while connecting (refused) or in the middle of a statement (closed): either
    // way the line names the server and what to do.
    assert!(
        failure.contains(&format!(
            "PostgreSQL at 127.0.0.1:{}/{}",
            relay.port(),
            database.name
        )) && failure.contains("check that"),
        "names the server and what to do: {failure}"
    );
    assert!(!format!("{stdout}{stderr}").contains(PASSWORD));
    let kept = deals().await;
    assert!((2..20).contains(&kept), "{kept} deals kept");
    let cursor_kept = admin
        .query_one(
            "SELECT count(*) FROM sync_cursors WHERE connection = 'hs' AND stream = 'deals'",
            &[],
        )
        .await
        .unwrap()
        .get::<_, i64>(0);
    assert_eq!(cursor_kept, 1, "the committed pages' cursor");

    relay.restore().await;
    let (code, stdout, stderr) = sync().await.unwrap();
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert_eq!(deals().await, 20);
    let history = admin
        .query_one("SELECT count(*) FROM stage_history", &[])
        .await
        .unwrap()
        .get::<_, i64>(0);
    assert_eq!(history, 20, "one history row per deal, none twice");
}

/// Three `dealsync sync` processes on one PostgreSQL database, each with a temporary
/// directory of its own (as on three hosts), start at once against a Salesforce that
/// rotates refresh tokens: the token is refreshed once, under the database's advisory
/// lock, and every process syncs with it. Two refreshes would race with the same
/// refresh token, and the loser's `invalid_grant` would mark the connection for
/// re-authorization.
#[tokio::test]
async fn replicas_on_several_hosts_refresh_a_rotating_oauth_token_once() {
    let Some(database) = database("replicas_on_several_hosts_refresh_a_rotating_oauth_token_once")
    else {
        return;
    };
    let salesforce = Salesforce::start_with("refresh-0", 2, true).await;
    let at = chrono::Utc::now() - chrono::Duration::hours(1);
    for i in 0..10 {
        salesforce.put(SfOpp::new(
            &format!("006B{i}"),
            &format!("Opp {i}"),
            "Prospecting",
            at + chrono::Duration::seconds(i),
        ));
    }
    let dir = tempfile::tempdir().unwrap();
    let (config, credentials) =
        write_config(dir.path(), &url_without_password(&database), PASSWORD);
    append_to_config(
        &config,
        &crate::pull::salesforce_connection("sf", &salesforce.url()),
    );
    let hosts: Vec<String> = (0..3)
        .map(|n| {
            let tmp = dir.path().join(format!("tmp-host-{n}"));
            std::fs::create_dir_all(&tmp).unwrap();
            tmp.to_str().unwrap().to_owned()
        })
        .collect();
    let args = [
        "--config",
        &config,
        "--credentials-dir",
        &credentials,
        "sync",
        "sf",
    ];
    // The first token request is held until the two other processes are seen waiting
    // for the refresh lock in the database; each process has a temporary directory of
    // its own, so a lock file there would not hold the others back (they would send
    // refreshes of their own, and never wait in the database).
    let gate = std::sync::Arc::new(tokio::sync::Semaphore::new(0));
    salesforce.state.faults.push(
        "/services/oauth2/token",
        crate::harness::vendors::Fault::Gate(gate.clone()),
    );
    let envs: Vec<[(&str, &str); 1]> = hosts.iter().map(|tmp| [("TMPDIR", tmp.as_str())]).collect();
    let runs = futures_util::future::join_all(envs.iter().map(|env| run_cli(&args, env)));
    let admin = database.admin().await;
    let waiting = async {
        crate::harness::eventually(
            "the lock's holder asking for a token, two processes waiting for the lock",
            Duration::from_secs(30),
            || async {
                let row = admin
                    .query_one(
                        // The class of dealsync's named session locks ("lock").
                        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'
                           AND classid = 1819239275 AND objsubid = 2 AND NOT granted",
                        &[],
                    )
                    .await
                    .unwrap();
                let holder_asked = salesforce.state.faults.count("/services/oauth2/token") >= 1;
                (row.get::<_, i64>(0) == 2 && holder_asked).then_some(())
            },
        )
        .await;
        assert_eq!(
            salesforce.state.faults.count("/services/oauth2/token"),
            1,
            "only the lock's holder asked for a token"
        );
        gate.add_permits(100);
    };
    let (outcomes, ()) = tokio::join!(runs, waiting);
    for (code, stdout, stderr) in outcomes {
        assert_eq!(code, 0, "{stdout}{stderr}");
    }
    assert_eq!(
        salesforce
            .state
            .oauth
            .refreshes
            .load(std::sync::atomic::Ordering::SeqCst),
        1,
        "one refresh for the three processes"
    );
    let row = admin
        .query_one(
            "SELECT refresh_token, needs_reauth, (SELECT count(*) FROM deals) FROM oauth_tokens
             WHERE connection = 'sf'",
            &[],
        )
        .await
        .unwrap();
    let stored: (Option<String>, bool, i64) = (row.get(0), row.get(1), row.get(2));
    assert_eq!(stored, (Some("refresh-1".into()), false, 10));
}

/// The connection's `rate_limit` holds across processes: two `dealsync sync` runs of one
/// HubSpot connection at once on one database (as replicas polling and re-reading it
/// would) together never send the mock more than the burst plus the rate over any
/// span. Fails where each process limits only itself (twice the rate).
#[tokio::test]
async fn two_processes_on_one_database_share_the_connections_request_rate() {
    let Some(database) =
        database("two_processes_on_one_database_share_the_connections_request_rate")
    else {
        return;
    };
    const RATE: f64 = 8.0;
    const BURST: usize = 2;
    let hubspot = std::sync::Arc::new(HubSpot::start("pat-test", None).await);
    hubspot.put_deals(1..=40, "appointmentscheduled");
    let dir = tempfile::tempdir().unwrap();
    let (config, credentials) =
        write_config(dir.path(), &url_without_password(&database), PASSWORD);
    let connection = crate::pull::hubspot_connection("hs", &hubspot.url(), "").replace(
        "rate_limit = { requests_per_second = 200.0, burst = 50 }",
        &format!("rate_limit = {{ requests_per_second = {RATE:.1}, burst = {BURST} }}"),
    );
    assert!(connection.contains("requests_per_second = 8.0"));
    append_to_config(&config, &connection);
    let args = [
        "--config",
        &config,
        "--credentials-dir",
        &credentials,
        "sync",
        "--full",
        "hs",
    ];
    // What the vendor sees: the count of requests, sampled every 20 ms while both run.
    let sampling = tokio_util::sync::CancellationToken::new();
    let sampler = {
        let (hubspot, sampling) = (hubspot.clone(), sampling.clone());
        tokio::spawn(async move {
            let started = std::time::Instant::now();
            let mut samples = Vec::new();
            while !sampling.is_cancelled() {
                samples.push((started.elapsed(), hubspot.faults().seen().len()));
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            samples
        })
    };
    let runs = (0..2).map(|_| run_cli(&args, &[]));
    for (code, stdout, stderr) in futures_util::future::join_all(runs).await {
        assert_eq!(code, 0, "{stdout}{stderr}");
    }
    sampling.cancel();
    let samples = sampler.await.unwrap();
    let total = samples.last().map(|(_, seen)| *seen).unwrap_or_default();
    assert!(
        total >= 40,
        "both runs paged through the deals: {total} requests"
    );
    // Over every span between two samples: at most the burst plus the rate over the
    // span, plus one request of slack for the sampling's own delay at each end.
    let mut worst = (0.0_f64, Duration::ZERO, 0_usize);
    for (i, (start, before)) in samples.iter().enumerate() {
        for (end, after) in &samples[i + 1..] {
            let span = *end - *start;
            let allowed = BURST as f64 + RATE * span.as_secs_f64() + 2.0;
            let excess = (after - before) as f64 - allowed;
            if excess > worst.0 {
                worst = (excess, span, after - before);
            }
        }
    }
    assert!(
        worst.0 <= 0.0,
        "{} requests within {:?}: more than {BURST} + {RATE}/s allows",
        worst.2,
        worst.1
    );
}
