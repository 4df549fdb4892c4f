//! CRM write-back end to end: the real daemon pulls deals from the HubSpot, Pipedrive
//! and Salesforce mocks, sends follow-ups through the real SMTP server, and records
//! each sent email on its deal in its CRM, once, through the manifests' `[writeback]`.

use crate::followups::{config as email_config, messages_to};
use crate::harness::daemon::{TestDaemon, run_cli, start_auth};
use crate::harness::eventually;
use crate::harness::smtp::SmtpServer;
use crate::harness::vendors::Fault;
use crate::harness::vendors::hubspot::{HsDeal, HubSpot};
use crate::harness::vendors::pipedrive::{PdDeal, Pipedrive};
use crate::harness::vendors::salesforce::{Salesforce, SfOpp};
use chrono::Utc;
use serde_json::Value;
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(40);
const TEAM: &str = "team@example.com";

/// An owner alert to a fixed address for every deal in `sales.proposal`.
const ALERT_RULE: &str = r#"
[followups.owner_alert]
kind = "transactional"
stage = "sales.proposal"
to = "team@example.com"
template = "deal_stalled"
after = "100ms"
"#;

/// Write-back on, at test pace: a 1 s request timeout, retries from 200 ms.
fn writeback(max_attempts: u32) -> String {
    format!(
        "[CONNECTION.settings]\nrequest_timeout = \"1s\"\n[CONNECTION.writeback]\nenabled = true\nretry_delay = \"200ms\"\nmax_attempts = {max_attempts}\n"
    )
}

fn hubspot_connection(url: &str, max_attempts: u32) -> String {
    format!(
        "[connections.hs]\nconnector = \"hubspot\"\nbase_url = \"{url}\"\ntoken = \"pat-test\"\npoll_interval = \"1h\"\n{}",
        writeback(max_attempts).replace("CONNECTION", "connections.hs")
    )
}

/// `--format json` output of a CLI command against the daemon's config.
async fn cli_json(daemon: &TestDaemon, args: &[&str]) -> Value {
    let mut full = vec!["--config", daemon.config_path.to_str().unwrap()];
    full.extend(args);
    full.extend(["--format", "json"]);
    let (code, stdout, stderr) = run_cli(&full, &[]).await;
    assert_eq!(code, 0, "{args:?}: {stdout}{stderr}");
    serde_json::from_str(&stdout).unwrap_or_else(|error| panic!("{args:?}: {error}: {stdout}"))
}

/// The stored id of deal `external_id` of `connection`, once the sync stored it.
async fn deal_id(daemon: &TestDaemon, connection: &str, external_id: &str) -> i64 {
    eventually(
        &format!("deal {external_id} of {connection}"),
        WAIT,
        || async {
            daemon
                .db()
                .query_row(
                    "SELECT id FROM deals WHERE connection = ?1 AND external_id = ?2",
                    [connection, external_id],
                    |row| row.get(0),
                )
                .ok()
        },
    )
    .await
}

/// `deals show`'s write-backs of a deal, once none is pending or in flight.
async fn settled_writebacks(daemon: &TestDaemon, deal: i64) -> Vec<Value> {
    let id = deal.to_string();
    eventually(&format!("deal {deal}'s write-back"), WAIT, || async {
        let shown = cli_json(daemon, &["deals", "show", &id]).await;
        let rows = shown["writebacks"].as_array().cloned().unwrap_or_default();
        (!rows.is_empty()
            && rows
                .iter()
                .all(|row| row["state"] == "done" || row["state"] == "failed"))
        .then_some(rows)
    })
    .await
}

/// The outbox id of the deal's one sent email, and the key its write-back carries.
fn sent_email(daemon: &TestDaemon, deal: i64) -> (i64, String) {
    let (id, state): (i64, String) = daemon
        .db()
        .query_row(
            "SELECT id, state FROM outbox WHERE deal_id = ?1",
            [deal],
            |row| Ok((row.get(0)?, row.get(1)?)),
        )
        .unwrap();
    assert_eq!(state, "sent");
    (id, format!("dealsync_outbox_{id}"))
}

#[tokio::test]
async fn each_sent_email_becomes_one_note_on_its_deal_in_every_crm_even_when_the_first_write_times_out_after_it_was_stored()
 {
    let smtp = SmtpServer::start().await;
    let now = Utc::now();
    let hubspot = HubSpot::start("pat-test", None).await;
    hubspot.put(HsDeal::new(
        401,
        "ACME renewal",
        "presentationscheduled",
        now.timestamp_millis() - 60_000,
    ));
    hubspot.put(HsDeal::new(
        402,
        "Globex expansion",
        "presentationscheduled",
        now.timestamp_millis() - 60_000,
    ));
    let pipedrive = Pipedrive::start("pd-token").await;
    pipedrive.put(PdDeal::new(
        9001,
        "Initech pilot",
        3,
        now - chrono::Duration::minutes(1),
    ));
    pipedrive.put(PdDeal::new(
        9002,
        "Umbrella deal",
        3,
        now - chrono::Duration::minutes(1),
    ));
    let salesforce = Salesforce::start("refresh-0", 10).await;
    salesforce.put(SfOpp::new(
        "006Ox00000AbCdEIAV",
        "Stark order",
        "Proposal/Price Quote",
        now - chrono::Duration::minutes(1),
    ));
    // Each vendor stores the first write and then holds its answer past the daemon's
    // 1 s timeout: the daemon cannot know the note exists.
    let hold = Fault::Stall(Duration::from_secs(3));
    hubspot.faults().push("/crm/v3/objects/notes", hold.clone());
    pipedrive.faults().push("/v1/notes", hold.clone());
    salesforce
        .state
        .faults
        .push("/services/data/v62.0/sobjects/Task", hold);
    let sf_url = salesforce.url();
    let connections = format!(
        "{hs}\n[connections.pd]\nconnector = \"pipedrive\"\nbase_url = \"{pd}\"\ntoken = \"pd-token\"\npoll_interval = \"1h\"\n{pd_wb}\n[connections.sf]\nconnector = \"salesforce\"\npoll_interval = \"1h\"\n[connections.sf.oauth]\nclient_id = \"sf-client\"\nclient_secret = \"sf-secret\"\ntoken_url = \"{sf_url}/services/oauth2/token\"\nrefresh_token = \"refresh-0\"\n{sf_wb}",
        hs = hubspot_connection(&hubspot.url(), 5),
        pd = pipedrive.url(),
        pd_wb = writeback(5).replace("CONNECTION", "connections.pd"),
        sf_wb = writeback(5).replace("CONNECTION", "connections.sf"),
    );
    let daemon = TestDaemon::start(&format!(
        "{connections}\n{}",
        email_config(&smtp, "", ALERT_RULE)
    ))
    .await;

    let deals = [
        ("hs", "401"),
        ("hs", "402"),
        ("pd", "9001"),
        ("pd", "9002"),
        ("sf", "006Ox00000AbCdEIAV"),
    ];
    let mut keys = Vec::new();
    for (connection, external_id) in deals {
        let deal = deal_id(&daemon, connection, external_id).await;
        let rows = settled_writebacks(&daemon, deal).await;
        assert_eq!(rows.len(), 1, "{connection} {external_id}: {rows:?}");
        assert_eq!(
            rows[0]["state"], "done",
            "{connection} {external_id}: {rows:?}"
        );
        let (outbox_id, key) = sent_email(&daemon, deal);
        assert_eq!(rows[0]["outbox_id"], outbox_id);
        assert_eq!(rows[0]["key"], key.as_str());
        keys.push((connection, external_id, key, rows[0]["remote_id"].clone()));
    }
    let mails = messages_to(&smtp, TEAM);
    assert_eq!(
        mails.len(),
        deals.len(),
        "one alert per deal, none repeated"
    );

    // HubSpot: one note per email, associated to its own deal (note → deal, 214),
    // carrying its key; the timed-out first write was found by the search, not repeated.
    let notes = hubspot.notes();
    assert_eq!(notes.len(), 2, "{notes:#?}");
    for (connection, external_id, key, remote_id) in keys.iter().filter(|k| k.0 == "hs") {
        let carrying: Vec<&Value> = notes
            .iter()
            .filter(|note| {
                note["properties"]["hs_note_body"]
                    .as_str()
                    .unwrap()
                    .contains(&format!("ref={key}"))
            })
            .collect();
        assert_eq!(carrying.len(), 1, "{connection} {external_id}: {notes:#?}");
        let note = carrying[0];
        let association = &note["associations"][0];
        assert_eq!(association["to"]["id"], external_id.to_string());
        assert_eq!(
            association["types"][0]["associationCategory"],
            "HUBSPOT_DEFINED"
        );
        assert_eq!(association["types"][0]["associationTypeId"], 214);
        assert!(
            chrono::DateTime::parse_from_rfc3339(
                note["properties"]["hs_timestamp"].as_str().unwrap()
            )
            .is_ok()
        );
        assert_eq!(remote_id, &note["id"]);
    }
    assert!(
        hubspot.faults().count("/crm/v3/objects/notes/search") >= 1,
        "the attempt after the timeout looked the note up"
    );

    // Pipedrive: one note per email with its deal's numeric id.
    let pd_notes = pipedrive.notes();
    assert_eq!(pd_notes.len(), 2, "{pd_notes:#?}");
    for (_, external_id, key, remote_id) in keys.iter().filter(|k| k.0 == "pd") {
        let carrying: Vec<&Value> = pd_notes
            .iter()
            .filter(|note| {
                note["content"]
                    .as_str()
                    .unwrap()
                    .contains(&format!("ref={key}"))
            })
            .collect();
        assert_eq!(carrying.len(), 1, "{external_id}: {pd_notes:#?}");
        assert_eq!(carrying[0]["deal_id"], external_id.parse::<u64>().unwrap());
        assert_eq!(
            remote_id.as_str(),
            Some(carrying[0]["id"].to_string().as_str())
        );
    }
    assert!(
        pipedrive
            .faults()
            .seen()
            .iter()
            .any(|line| line.starts_with("GET /v1/notes?")),
        "the attempt after the timeout listed the deal's notes"
    );

    // Salesforce: one completed email Task on the opportunity, upserted by the key
    // (the retry updated the task the timed-out request had created).
    let tasks = salesforce.tasks();
    assert_eq!(tasks.len(), 1, "{tasks:#?}");
    let (_, _, key, remote_id) = keys.iter().find(|k| k.0 == "sf").unwrap();
    let (task_id, fields) = &tasks[&key.to_lowercase()];
    assert_eq!(fields["WhatId"], "006Ox00000AbCdEIAV");
    assert_eq!(fields["TaskSubtype"], "Email");
    assert_eq!(fields["Status"], "Completed");
    assert_eq!(remote_id.as_str(), Some(task_id.as_str()));
    assert_eq!(
        salesforce
            .state
            .faults
            .count("/services/data/v62.0/sobjects/Task"),
        2,
        "the timed-out upsert was sent again, and Salesforce kept one task"
    );
    assert_eq!(
        messages_to(&smtp, TEAM).len(),
        deals.len(),
        "still one email each"
    );
}

#[tokio::test]
async fn a_failing_write_back_never_delays_or_repeats_the_email_and_shows_as_failed() {
    let smtp = SmtpServer::start().await;
    let hubspot = HubSpot::start("pat-test", None).await;
    hubspot.put(HsDeal::new(
        401,
        "ACME renewal",
        "presentationscheduled",
        Utc::now().timestamp_millis() - 60_000,
    ));
    // Every note request fails: HubSpot is down for writes.
    hubspot.faults().every(
        "/crm/v3/objects/notes",
        vec![(
            1,
            Fault::Status(
                500,
                vec![],
                r#"{"status":"error","message":"internal error"}"#.into(),
            ),
        )],
    );
    let daemon = TestDaemon::start(&format!(
        "{}\n{}",
        hubspot_connection(&hubspot.url(), 3),
        email_config(&smtp, "", ALERT_RULE)
    ))
    .await;
    let deal = deal_id(&daemon, "hs", "401").await;

    // The email goes out and is recorded sent while its write-back is still failing.
    eventually("the alert", WAIT, || async {
        (messages_to(&smtp, TEAM).len() == 1).then_some(())
    })
    .await;
    let rows = settled_writebacks(&daemon, deal).await;
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(rows[0]["state"], "failed");
    assert_eq!(rows[0]["attempts"], 3);
    let reason = rows[0]["reason"].as_str().unwrap();
    assert!(
        reason.contains("gave up after 3 attempt(s)") && reason.contains("500"),
        "{reason}"
    );
    let (_, _) = sent_email(&daemon, deal);
    assert_eq!(
        hubspot.faults().count("/crm/v3/objects/notes"),
        3,
        "one create, then a lookup before each retry (failing too, so nothing was written again)"
    );
    assert_eq!(hubspot.faults().count("/crm/v3/objects/notes/search"), 2);
    assert!(hubspot.notes().is_empty());
    assert_eq!(
        messages_to(&smtp, TEAM).len(),
        1,
        "the email was not repeated"
    );

    let (_, metrics) = daemon.get("/metrics").await;
    assert!(
        metrics.contains("dealsync_writebacks{connection=\"hs\",state=\"failed\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics
            .contains("dealsync_writeback_attempts_total{connection=\"hs\",outcome=\"failed\"} 1"),
        "{metrics}"
    );
    let (code, table, stderr) = run_cli(
        &[
            "--config",
            daemon.config_path.to_str().unwrap(),
            "deals",
            "show",
            &deal.to_string(),
        ],
        &[],
    )
    .await;
    assert_eq!(code, 0, "{stderr}");
    assert!(
        table.contains("CRM write-back") && table.contains("failed"),
        "{table}"
    );
}

/// The daemon is killed while its first write is in flight (HubSpot stored the note
/// and holds the answer): after the restart the write-back is due again, its attempt
/// finds the note by its key, and nothing is written twice.
#[tokio::test]
async fn a_write_back_in_flight_when_the_daemon_is_killed_is_found_after_the_restart_not_written_again()
 {
    let smtp = SmtpServer::start().await;
    let hubspot = HubSpot::start("pat-test", None).await;
    hubspot.put(HsDeal::new(
        401,
        "ACME renewal",
        "presentationscheduled",
        Utc::now().timestamp_millis() - 60_000,
    ));
    hubspot.faults().push(
        "/crm/v3/objects/notes",
        Fault::Stall(Duration::from_secs(120)),
    );
    // The connection's default request timeout (30 s): the daemon is mid-request when
    // it is killed.
    let body = format!(
        "[connections.hs]\nconnector = \"hubspot\"\nbase_url = \"{}\"\ntoken = \"pat-test\"\npoll_interval = \"1h\"\n[connections.hs.writeback]\nenabled = true\nretry_delay = \"200ms\"\n\n{}",
        hubspot.url(),
        email_config(&smtp, "", ALERT_RULE)
    );
    let mut daemon = TestDaemon::start(&body).await;
    let deal = deal_id(&daemon, "hs", "401").await;
    eventually("HubSpot to store the first note", WAIT, || async {
        (hubspot.notes().len() == 1).then_some(())
    })
    .await;
    let state: String = daemon
        .db()
        .query_row(
            "SELECT state FROM writebacks WHERE deal_id = ?1",
            [deal],
            |row| row.get(0),
        )
        .unwrap();
    assert_eq!(state, "claimed", "the request is in flight");

    daemon.kill_and_restart().await;
    let rows = settled_writebacks(&daemon, deal).await;
    assert_eq!(rows[0]["state"], "done", "{rows:?}");
    assert_eq!(rows[0]["attempts"], 2);
    let notes = hubspot.notes();
    assert_eq!(notes.len(), 1, "{notes:#?}");
    assert_eq!(rows[0]["remote_id"], notes[0]["id"]);
    assert_eq!(hubspot.faults().count("/crm/v3/objects/notes/search"), 1);
    assert_eq!(
        messages_to(&smtp, TEAM).len(),
        1,
        "the email was not sent again"
    );
}

/// The same on PostgreSQL: the write-back is queued in the send's transaction and
/// claimed by the replica, and a first write that timed out after HubSpot stored it
/// leaves one note.
#[tokio::test]
async fn write_back_on_postgresql_records_each_sent_email_once() {
    use crate::harness::postgres::{PASSWORD, PASSWORD_ROLE};
    let Some(database) =
        crate::harness::postgres_database("write_back_on_postgresql_records_each_sent_email_once")
    else {
        return;
    };
    let smtp = SmtpServer::start().await;
    let hubspot = HubSpot::start("pat-test", None).await;
    hubspot.put(HsDeal::new(
        401,
        "ACME renewal",
        "presentationscheduled",
        Utc::now().timestamp_millis() - 60_000,
    ));
    hubspot.faults().push(
        "/crm/v3/objects/notes",
        Fault::Stall(Duration::from_secs(3)),
    );
    let storage = format!(
        "url = \"postgres://{PASSWORD_ROLE}:${{DEALSYNC_TEST_PG_PASSWORD}}@127.0.0.1:{}/{}\"",
        database.port, database.name
    );
    let body = format!(
        "{}\n{}",
        hubspot_connection(&hubspot.url(), 5),
        email_config(&smtp, "", ALERT_RULE)
    );
    let _daemon =
        TestDaemon::start_on(&storage, &body, &[("DEALSYNC_TEST_PG_PASSWORD", PASSWORD)]).await;
    let store = dealsync::store::Store::open_postgres(
        &dealsync::config::PostgresUrl::parse(&dealsync::config::Secret::new(database.url()))
            .unwrap(),
    )
    .await
    .unwrap();
    let rows = eventually("the write-back to be done", WAIT, || async {
        let deal = store.deal_by_external_id("hs", "401").await.unwrap()?;
        let rows = store.deal_writebacks(deal.id).await.unwrap();
        (rows.len() == 1 && rows[0].state == "done").then_some(rows)
    })
    .await;
    assert_eq!(rows[0].attempts, 2, "{rows:?}");
    let notes = hubspot.notes();
    assert_eq!(notes.len(), 1, "{notes:#?}");
    assert_eq!(
        rows[0].remote_id.as_ref(),
        notes[0]["id"].as_str().map(str::to_owned).as_ref()
    );
    assert_eq!(messages_to(&smtp, TEAM).len(), 1);
}

/// The `scope` of the authorize URL `dealsync auth hs` prints for a HubSpot OAuth
/// connection with `extra` lines under it.
async fn authorize_scope(hubspot: &HubSpot, extra: &str) -> String {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("dealsync.toml");
    std::fs::write(
        &config,
        format!(
            "[storage]\npath = \"{}/d.db\"\n\n[connections.hs]\nconnector = \"hubspot\"\nbase_url = \"{url}\"\n{extra}\n[connections.hs.oauth]\nclient_id = \"hs-client\"\nauth_url = \"{url}/oauth/authorize\"\n",
            dir.path().display(),
            url = hubspot.url(),
        ),
    )
    .unwrap();
    let auth_url = format!("{}/oauth/authorize", hubspot.url());
    let (mut child, _output, authorize) = start_auth(&config, "hs", &auth_url).await;
    child.kill().await.unwrap();
    authorize
        .query_pairs()
        .find(|(key, _)| key == "scope")
        .map(|(_, value)| value.into_owned())
        .expect("a scope parameter")
}

/// `dealsync auth` asks HubSpot for the notes' write scope only for a connection
/// with write-back on.
#[tokio::test]
async fn dealsync_auth_asks_for_the_write_scope_only_when_write_back_is_on() {
    let hubspot = HubSpot::start("unused", None).await;
    let reads = "crm.objects.deals.read crm.objects.contacts.read crm.objects.owners.read";
    assert_eq!(authorize_scope(&hubspot, "").await, reads);
    assert_eq!(
        authorize_scope(&hubspot, "[connections.hs.writeback]\nenabled = true\n").await,
        format!("{reads} crm.objects.contacts.write")
    );
}
