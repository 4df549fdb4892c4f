//! Pull connectors against mock vendors: full and incremental syncs, paging, ties at
//! boundaries, the HubSpot search cap, retries, OAuth refresh and revocation, crashes.

use crate::harness::daemon::{TestDaemon, run_cli, start_auth};
use crate::harness::eventually;
use crate::harness::vendors::Fault;
use crate::harness::vendors::hubspot::{HsDeal, HubSpot};
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(30);

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

pub(crate) fn hubspot_connection(name: &str, url: &str, extra: &str) -> String {
    format!(
        r#"
[connections.{name}]
connector = "hubspot"
base_url = "{url}"
token = "pat-test"
poll_interval = "1s"
page_size = 2
lookback = "1s"
rate_limit = {{ requests_per_second = 200.0, burst = 50 }}
settings = {{ request_timeout = "2s", deletes_every = "1s" }}
{extra}
"#
    )
}

/// (external id, stage, status, contact email) of a connection's deals.
fn deals(daemon: &TestDaemon, connection: &str) -> Vec<(String, String, String, Option<String>)> {
    let db = daemon.db();
    let mut statement = db
        .prepare("SELECT external_id, stage, status, contact_email FROM deals WHERE connection = ?1 ORDER BY external_id")
        .unwrap();
    statement
        .query_map([connection], |row| {
            Ok((row.get(0)?, row.get(1)?, row.get(2)?, row.get(3)?))
        })
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap()
}

fn successful_runs(daemon: &TestDaemon, connection: &str) -> i64 {
    daemon.count(&format!(
        "SELECT count(*) FROM sync_runs WHERE connection = '{connection}' AND status = 'succeeded'"
    ))
}

#[tokio::test]
async fn hubspot_syncs_fully_across_pages_then_incrementally_with_contacts_deletes_and_unmapped_stages()
 {
    let hubspot = HubSpot::start("pat-test", None).await;
    let base = now_ms() - 3_600_000;
    hubspot.put_contact(501, "ada@acme.example", "Ada", "Lovelace");
    for (i, stage) in [
        "appointmentscheduled",
        "qualifiedtobuy",
        "contractsent",
        "closedwon",
        "closedlost",
        "customstage",
    ]
    .iter()
    .enumerate()
    {
        let mut deal = HsDeal::new(
            1001 + i as u64,
            &format!("Deal {i}"),
            stage,
            base + i as i64 * 1000,
        );
        if i == 0 {
            deal.contact = Some(501);
        }
        hubspot.put(deal);
    }
    let daemon = TestDaemon::start(&hubspot_connection("hs", &hubspot.url(), "")).await;

    let stored = eventually("six HubSpot deals stored", WAIT, || async {
        let found = deals(&daemon, "hs");
        (found.len() == 6).then_some(found)
    })
    .await;
    assert_eq!(
        stored[0],
        (
            "1001".into(),
            "lead_qualification".into(),
            "open".into(),
            Some("ada@acme.example".into())
        )
    );
    assert_eq!(stored[3].1, "won");
    assert_eq!(stored[4].2, "lost");
    assert_eq!(
        stored[5].1, "unmapped",
        "an unmapped native stage is kept, as unmapped"
    );
    let list_pages = hubspot.faults().count("/crm/v3/objects/deals?");
    assert!(
        list_pages >= 3,
        "paged across at least three pages, got {list_pages}"
    );
    assert_eq!(
        daemon.count("SELECT count(*) FROM deals WHERE connection = 'hs' AND amount_minor = 10050 AND currency = 'USD'"),
        6
    );

    // A change after the first run arrives through search, with its contact.
    hubspot.put_contact(502, "grace@globex.example", "Grace", "Hopper");
    hubspot.update(1002, |deal| {
        deal.stage = "contractsent".into();
        deal.contact = Some(502);
        deal.modified_ms = now_ms();
    });
    eventually("the changed deal moved to closing", WAIT, || async {
        let found = deals(&daemon, "hs");
        (found[1].1 == "closing" && found[1].3.as_deref() == Some("grace@globex.example"))
            .then_some(())
    })
    .await;
    assert!(hubspot.faults().count("/crm/v3/objects/deals/search") >= 1);
    assert!(
        hubspot
            .faults()
            .count("/crm/v4/associations/deals/contacts/batch/read")
            >= 1
    );

    // An archived deal is marked deleted, not silently kept.
    hubspot.update(1003, |deal| deal.archived = true);
    eventually("the archived deal is marked deleted", WAIT, || async {
        (daemon
            .count("SELECT count(*) FROM deals WHERE external_id = '1003' AND status = 'deleted'")
            == 1)
            .then_some(())
    })
    .await;
    let history = daemon.count("SELECT count(*) FROM stage_history h JOIN deals d ON d.id = h.deal_id WHERE d.external_id = '1002'");
    assert_eq!(history, 2, "one history row per stage change");
}

#[tokio::test]
async fn hubspot_search_restarts_at_the_last_modification_time_before_the_10000_result_cap() {
    let hubspot = HubSpot::start("pat-test", None).await;
    let base = now_ms() - 3_600_000;
    hubspot.put(HsDeal::new(1, "first", "appointmentscheduled", base));
    let daemon = TestDaemon::start(&hubspot_connection("hs", &hubspot.url(), "")).await;
    eventually("the first sync", WAIT, || async {
        (successful_runs(&daemon, "hs") >= 1).then_some(())
    })
    .await;

    // 10,100 deals change after the first run; a few share one timestamp at each page edge.
    let changed_at = now_ms();
    {
        let mut all = hubspot.state.deals.lock().unwrap();
        for id in 2..=10_101u64 {
            let mut deal = HsDeal::new(id, "bulk", "qualifiedtobuy", changed_at + (id as i64 / 3));
            deal.owner = None;
            all.insert(id, deal);
        }
    }
    eventually(
        "every bulk-changed deal stored",
        Duration::from_secs(120),
        || async {
            (daemon.count("SELECT count(*) FROM deals WHERE connection = 'hs'") == 10_101)
                .then_some(())
        },
    )
    .await;
    assert_eq!(
        hubspot
            .state
            .search_400s
            .load(std::sync::atomic::Ordering::SeqCst),
        0,
        "the engine never paged past the cap"
    );
    let failed = daemon.count("SELECT count(*) FROM sync_runs WHERE status = 'failed'");
    assert_eq!(failed, 0, "{}", daemon.logs());
    // Five search pages of 200 are gathered before one association batch read of 1,000.
    let searches = hubspot.faults().count("/crm/v3/objects/deals/search");
    let associations = hubspot
        .faults()
        .count("/crm/v4/associations/deals/contacts/batch/read");
    assert!(
        searches >= 51 && associations * 3 <= searches,
        "{associations} association reads for {searches} search pages"
    );
}

#[tokio::test]
async fn hubspot_429_500_a_timeout_and_a_malformed_page_are_retried_and_nothing_is_lost() {
    let hubspot = HubSpot::start("pat-test", None).await;
    let base = now_ms() - 3_600_000;
    for id in 1..=7u64 {
        hubspot.put(HsDeal::new(id, "deal", "qualifiedtobuy", base + id as i64));
    }
    let faults = hubspot.faults();
    faults.push(
        "/crm/v3/objects/deals",
        Fault::Status(
            429,
            vec![("Retry-After", "1".into())],
            crate::harness::vendors::fixture("hubspot/error-validation.json").to_string(),
        ),
    );
    faults.push(
        "/crm/v3/objects/deals",
        Fault::Status(500, vec![], "{}".into()),
    );
    faults.push(
        "/crm/v3/objects/deals",
        // Far past the connection's 2 s request timeout.
        Fault::Delay(Duration::from_secs(60)),
    );
    faults.push("/crm/v3/objects/deals", Fault::Garbage);
    let daemon = TestDaemon::start(&hubspot_connection("hs", &hubspot.url(), "")).await;
    eventually("all seven deals stored", WAIT, || async {
        (daemon.count("SELECT count(*) FROM deals WHERE connection = 'hs'") == 7).then_some(())
    })
    .await;
    assert_eq!(
        daemon
            .count("SELECT count(*) FROM sync_runs WHERE connection = 'hs' AND status = 'failed'"),
        0,
        "retries happen inside the run: {}",
        daemon.logs()
    );
    let (_, metrics) = daemon.get("/metrics").await;
    assert!(
        metrics.contains("dealsync_vendor_rate_limited_total{connection=\"hs\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("dealsync_vendor_requests_total{connection=\"hs\",status=\"500\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("dealsync_vendor_retries_total{connection=\"hs\"}"),
        "{metrics}"
    );
    let summary: String = daemon
        .db()
        .query_row(
            "SELECT summary FROM sync_runs WHERE connection = 'hs' ORDER BY id LIMIT 1",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert!(summary.contains("\"rate_limited\":1"), "{summary}");
}

#[tokio::test]
async fn check_reports_a_broken_user_manifest_with_its_file_and_key() {
    let dir = tempfile::tempdir().unwrap();
    let connectors = dir.path().join("connectors");
    std::fs::create_dir(&connectors).unwrap();
    std::fs::write(
        connectors.join("acme.toml"),
        "name = \"acme\"\nbase_url = \"http://127.0.0.1:1\"\n[auth]\nkind = \"bearer\"\n[deals]\nmodified = \"/m\"\n[deals.full]\npath = \"deals\"\n[deals.fields]\nexternal_id = \"/id\"\nnative_stage = \"/stage\"\n",
    )
    .unwrap();
    let config = dir.path().join("dealsync.toml");
    std::fs::write(
        &config,
        format!(
            "[storage]\npath = \"{}/x.db\"\n[connectors]\ndir = \"{}\"\n",
            dir.path().display(),
            connectors.display()
        ),
    )
    .unwrap();
    let (code, stdout, stderr) =
        run_cli(&["--config", config.to_str().unwrap(), "check"], &[]).await;
    assert_eq!(code, 78, "{stdout}{stderr}");
    assert!(stderr.contains("acme.toml:8: deals.full.path"), "{stderr}");
}

use crate::harness::vendors::pipedrive::{PdDeal, Pipedrive};
use crate::harness::vendors::salesforce::{Salesforce, SfOpp};
use chrono::{DateTime, TimeZone, Utc};

fn pipedrive_connection(name: &str, url: &str) -> String {
    format!(
        r#"
[connections.{name}]
connector = "pipedrive"
base_url = "{url}"
token = "pd-token"
poll_interval = "1s"
page_size = 2
lookback = "30s"
rate_limit = {{ requests_per_second = 200.0, burst = 50 }}
"#
    )
}

#[tokio::test]
async fn pipedrive_syncs_with_cursor_pages_persons_won_status_rotting_stages_ties_and_deletes() {
    let pipedrive = Pipedrive::start("pd-token").await;
    pipedrive.put_person(301, "Ada Lovelace", "ada@acme.example");
    let start = Utc::now() - chrono::Duration::hours(1);
    for id in 11..=15u64 {
        let mut deal = PdDeal::new(
            id,
            &format!("Deal {id}"),
            (id - 10).min(5),
            start + chrono::Duration::seconds(id as i64),
        );
        deal.person_id = Some(301);
        pipedrive.put(deal);
    }
    pipedrive.update(15, |deal| deal.status = "won".into());
    let daemon = TestDaemon::start(&pipedrive_connection("pd", &pipedrive.url())).await;
    let stored = eventually("five Pipedrive deals", WAIT, || async {
        let found = deals(&daemon, "pd");
        (found.len() == 5).then_some(found)
    })
    .await;
    assert_eq!(
        stored[0],
        (
            "11".into(),
            "lead_qualification".into(),
            "open".into(),
            Some("ada@acme.example".into())
        )
    );
    assert_eq!(stored[3].1, "proposal");
    assert_eq!(
        stored[4].1, "won",
        "the deal status wins over its open stage"
    );
    assert!(
        pipedrive.faults().count("/api/v2/deals?") >= 3,
        "three pages or more"
    );
    let native: String = daemon
        .db()
        .query_row(
            "SELECT pipelines FROM native_pipelines WHERE connection = 'pd'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert!(
        native.contains("\"rot_after\":\"14days\"") || native.contains("rot_after\":\"14d"),
        "{native}"
    );

    // Wait for an incremental run, then change two deals within one second: the same
    // update_time as the cursor's, the tie Pipedrive's second resolution makes.
    eventually("an incremental run", WAIT, || async {
        (successful_runs(&daemon, "pd") >= 2).then_some(())
    })
    .await;
    let tie = Utc::now();
    pipedrive.update(12, |deal| {
        deal.stage_id = 4;
        deal.update_time = tie;
    });
    eventually("the first change", WAIT, || async {
        (deals(&daemon, "pd")[1].1 == "proposal").then_some(())
    })
    .await;
    pipedrive.update(13, |deal| {
        deal.stage_id = 5;
        deal.update_time = tie;
    });
    eventually("the change at the same second", WAIT, || async {
        (deals(&daemon, "pd")[2].1 == "negotiation").then_some(())
    })
    .await;
    pipedrive.update(14, |deal| {
        deal.deleted = true;
        deal.update_time = Utc::now();
    });
    eventually("the deleted deal marked", WAIT, || async {
        (deals(&daemon, "pd")[3].2 == "deleted").then_some(())
    })
    .await;
    let incremental = pipedrive
        .faults()
        .seen()
        .into_iter()
        .filter(|line| line.contains("updated_since="))
        .count();
    assert!(incremental >= 2, "incremental reads use updated_since");
}

pub(crate) fn salesforce_connection(name: &str, url: &str) -> String {
    format!(
        r#"
[connections.{name}]
connector = "salesforce"
poll_interval = "1s"
lookback = "30s"
rate_limit = {{ requests_per_second = 200.0, burst = 50 }}

[connections.{name}.oauth]
client_id = "sf-client"
client_secret = "sf-secret"
token_url = "{url}/services/oauth2/token"
refresh_token = "refresh-0"
"#
    )
}

#[tokio::test]
async fn salesforce_reads_next_records_urls_on_the_instance_url_and_refreshes_a_token_expiring_mid_sync()
 {
    let salesforce = Salesforce::start("refresh-0", 2).await;
    let at = Utc.with_ymd_and_hms(2026, 1, 12, 10, 0, 0).unwrap();
    for (i, stage) in [
        "Prospecting",
        "Negotiation/Review",
        "Closed Won",
        "Closed Lost",
        "Qualification",
    ]
    .iter()
    .enumerate()
    {
        let mut opportunity = SfOpp::new(
            &format!("006A{i}"),
            &format!("Opp {i}"),
            stage,
            at + chrono::Duration::seconds(i as i64 / 2),
        );
        if i == 0 {
            opportunity.contact = Some(("ada@acme.example".into(), "Ada Lovelace".into()));
        }
        salesforce.put(opportunity);
    }
    // Every access token stops working after three API calls: mid-sync.
    salesforce
        .state
        .oauth
        .expire_after
        .store(3, std::sync::atomic::Ordering::SeqCst);
    let daemon = TestDaemon::start(&salesforce_connection("sf", &salesforce.url())).await;
    let stored = eventually("five opportunities", WAIT, || async {
        let found = deals(&daemon, "sf");
        (found.len() == 5).then_some(found)
    })
    .await;
    assert_eq!(
        stored[0],
        (
            "006A0".into(),
            "lead_generation".into(),
            "open".into(),
            Some("ada@acme.example".into())
        )
    );
    assert_eq!(stored[2].1, "won");
    assert_eq!(stored[3].1, "lost");
    assert!(
        salesforce
            .state
            .oauth
            .refreshes
            .load(std::sync::atomic::Ordering::SeqCst)
            >= 2,
        "refreshed at start and mid-sync"
    );
    assert!(
        salesforce.state.faults.count("/services/data/v62.0/query/") >= 2,
        "followed nextRecordsUrl"
    );
    let token: (Option<String>, String) = daemon
        .db()
        .query_row(
            "SELECT refresh_token, extra FROM oauth_tokens WHERE connection = 'sf'",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    assert_eq!(
        token.0.as_deref(),
        Some("refresh-0"),
        "a refresh without a new refresh token keeps the old one"
    );
    assert!(
        token.1.contains(&salesforce.url()),
        "instance_url kept: {}",
        token.1
    );
    assert!(
        !daemon.logs().contains("sf-secret") && !daemon.logs().contains("refresh-0"),
        "no secret in logs"
    );

    // An update at the very SystemModstamp of the cursor (a tie) and a deletion.
    let high: String = daemon
        .db()
        .query_row(
            "SELECT value FROM sync_cursors WHERE connection = 'sf'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert!(high.contains("watermark"), "{high}");
    let tie = DateTime::from_timestamp(Utc::now().timestamp(), 0).unwrap();
    salesforce.update("006A4", |o| {
        o.stage = "Closed Won".into();
        o.modstamp = tie;
    });
    eventually("the change", WAIT, || async {
        (deals(&daemon, "sf")[4].1 == "won").then_some(())
    })
    .await;
    // Committed after the read that moved the cursor to `tie`, in the same second.
    salesforce.update("006A3", |o| {
        o.stage = "Negotiation/Review".into();
        o.modstamp = tie;
    });
    salesforce.update("006A1", |o| {
        o.deleted = true;
        o.modstamp = Utc::now();
    });
    eventually("the tie and the deletion", WAIT, || async {
        let found = deals(&daemon, "sf");
        (found[3].1 == "negotiation" && found[1].2 == "deleted").then_some(())
    })
    .await;
}

#[tokio::test]
async fn a_revoked_refresh_token_marks_only_that_connection_for_reauthorization() {
    let salesforce = Salesforce::start("refresh-0", 2).await;
    salesforce
        .state
        .oauth
        .revoked
        .store(true, std::sync::atomic::Ordering::SeqCst);
    let pipedrive = Pipedrive::start("pd-token").await;
    pipedrive.put(PdDeal::new(11, "alive", 1, Utc::now()));
    let daemon = TestDaemon::start(&format!(
        "{}{}",
        salesforce_connection("sf", &salesforce.url()),
        pipedrive_connection("pd", &pipedrive.url())
    ))
    .await;
    let body = eventually("readyz names the connection", WAIT, || async {
        let (status, body) = daemon.get("/readyz").await;
        (status == 200 && body.contains("re-authorization")).then_some(body)
    })
    .await;
    assert!(body.contains("\"sf\""), "{body}");
    assert!(body.contains("dealsync auth sf"), "{body}");
    eventually("the other connection syncs", WAIT, || async {
        (deals(&daemon, "pd").len() == 1).then_some(())
    })
    .await;
    let (_, metrics) = daemon.get("/metrics").await;
    assert!(
        metrics.contains("dealsync_oauth_needs_reauthorization{connection=\"sf\"} 1"),
        "{metrics}"
    );
    daemon.wait_for_log("refresh token revoked", WAIT).await;
    assert_eq!(
        daemon.count(
            "SELECT count(*) FROM oauth_tokens WHERE connection = 'sf' AND needs_reauth = 1"
        ),
        1
    );
}

#[tokio::test]
async fn a_daemon_killed_mid_sync_resumes_with_nothing_missing_and_nothing_twice() {
    let pipedrive = Pipedrive::start("pd-token").await;
    let start = Utc::now() - chrono::Duration::hours(1);
    for id in 1..=40u64 {
        pipedrive.put(PdDeal::new(
            id,
            "deal",
            2,
            start + chrono::Duration::seconds(id as i64),
        ));
    }
    *pipedrive.faults().slow.lock().unwrap() =
        Some(("/api/v2/deals".into(), Duration::from_millis(150)));
    let mut daemon = TestDaemon::start(&pipedrive_connection("pd", &pipedrive.url())).await;
    eventually("a few pages stored", WAIT, || async {
        let stored = daemon.count("SELECT count(*) FROM deals WHERE connection = 'pd'");
        (stored >= 6).then_some(())
    })
    .await;
    // Hold every later page (a page already asked for may still arrive), so the kill
    // comes mid-sync however slowly this machine runs.
    *pipedrive.faults().slow.lock().unwrap() =
        Some(("/api/v2/deals".into(), Duration::from_secs(3600)));
    daemon.signal("KILL");
    daemon.wait_exit(Duration::from_secs(10)).await;
    let stored_after_kill = daemon.count("SELECT count(*) FROM deals");
    assert!(
        stored_after_kill < 40,
        "the kill came mid-sync ({stored_after_kill} stored)"
    );
    *pipedrive.faults().slow.lock().unwrap() = None;
    daemon.start_again().await;
    eventually("all forty deals", WAIT, || async {
        (daemon.count("SELECT count(*) FROM deals WHERE connection = 'pd'") == 40).then_some(())
    })
    .await;
    // The forty are the vendor's forty (a deal stored twice is impossible by schema).
    let mut stored: Vec<u64> = deals(&daemon, "pd")
        .into_iter()
        .map(|deal| deal.0.parse().unwrap())
        .collect();
    stored.sort_unstable();
    assert_eq!(stored, (1..=40).collect::<Vec<u64>>());
    assert_eq!(
        daemon.count("SELECT count(*) FROM stage_history"),
        40,
        "one history row per deal: no duplicate from the replayed page"
    );
}

/// A page of exactly 32 new deals (one full chunk of the history writer's multi-row
/// insert) and then the same 32 moved: each deal has its creation and its move.
#[tokio::test]
async fn a_page_of_exactly_32_stage_changes_records_32_history_rows() {
    const DEALS: u64 = 32;
    let pipedrive = Pipedrive::start("pd-token").await;
    let start = Utc::now() - chrono::Duration::hours(1);
    for id in 1..=DEALS {
        pipedrive.put(PdDeal::new(id, "deal", 1, start));
    }
    let config = pipedrive_connection("pd", &pipedrive.url())
        .replace("page_size = 2", "page_size = 100")
        .replace("lookback = \"30s\"", "lookback = \"1s\"");
    let daemon = TestDaemon::start(&config).await;
    let history = || daemon.count("SELECT count(*) FROM stage_history");
    // The deals and their history rows commit in one transaction.
    eventually("the 32 deals", WAIT, || async {
        (daemon.count("SELECT count(*) FROM deals") == DEALS as i64).then_some(())
    })
    .await;
    assert_eq!(history(), DEALS as i64, "one creation row per deal");

    // All 32 move to stage 2 in the vendor. A run usually reads all of them in one
    // page (one that starts between two of these updates splits them); either way,
    // every move is one row.
    let moved_at = Utc::now();
    for id in 1..=DEALS {
        pipedrive.update(id, |deal| {
            deal.stage_id = 2;
            deal.update_time = chrono::DateTime::from_timestamp(moved_at.timestamp(), 0).unwrap();
        });
    }
    eventually("the 32 moves recorded", WAIT, || async {
        (history() >= 2 * DEALS as i64).then_some(())
    })
    .await;
    assert_eq!(
        daemon.count(
            "SELECT count(*) FROM (SELECT deal_id FROM stage_history
             GROUP BY deal_id HAVING count(*) = 2 AND count(from_stage) = 1)"
        ),
        DEALS as i64,
        "each deal: its creation and one move"
    );
}

/// Pages read while the store is busy are committed together, with the cursor of the
/// last: every deal of every gathered page is stored by the commit that moves the
/// cursor past it. The test holds the database's write lock from the moment the first
/// page is asked for until every page has been read, so the pages after the first
/// queue up and are gathered into one commit.
#[tokio::test]
async fn pages_gathered_while_the_store_is_busy_all_commit_with_the_cursor_after_them() {
    const DEALS: u64 = 12;
    let pipedrive = Pipedrive::start("pd-token").await;
    let start = Utc::now() - chrono::Duration::hours(1);
    for id in 1..=DEALS {
        pipedrive.put(PdDeal::new(
            id,
            &format!("deal {id}"),
            2,
            start + chrono::Duration::seconds(id as i64),
        ));
    }
    // The first page is held until the lock below is taken, so it cannot be committed
    // before: every page of the run is gathered behind the lock.
    let gate = std::sync::Arc::new(tokio::sync::Semaphore::new(0));
    pipedrive
        .faults()
        .push("/api/v2/deals", Fault::Gate(gate.clone()));
    // One run: a later one must not read again what the first one lost.
    let config = pipedrive_connection("pd", &pipedrive.url()).replace("\"1s\"", "\"1h\"");
    let daemon = TestDaemon::start(&config).await;
    eventually("the first page asked for", WAIT, || async {
        (pipedrive.faults().count("/api/v2/deals") >= 1).then_some(())
    })
    .await;
    let mut lock = daemon.db();
    let busy = lock
        .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
        .expect("taking the write lock");
    gate.add_permits(1);
    let pages = (DEALS / 2) as usize;
    eventually("every page read while the store is busy", WAIT, || async {
        (pipedrive.faults().count("/api/v2/deals") >= pages).then_some(())
    })
    .await;
    assert_eq!(
        daemon.count_read_only("SELECT count(*) FROM deals"),
        0,
        "nothing was committed while the store was busy"
    );
    busy.rollback().unwrap();

    eventually("the run to succeed", WAIT, || async {
        (successful_runs(&daemon, "pd") >= 1).then_some(())
    })
    .await;
    let stored: Vec<String> = deals(&daemon, "pd").into_iter().map(|d| d.0).collect();
    let mut expected: Vec<String> = (1..=DEALS).map(|id| id.to_string()).collect();
    expected.sort();
    assert_eq!(stored, expected, "every deal of every page is stored");
    assert_eq!(
        daemon.count(
            "SELECT count(*) FROM sync_cursors WHERE connection = 'pd' AND stream = 'deals'"
        ),
        1
    );
    assert_eq!(
        pipedrive.faults().count("/api/v2/deals"),
        pages,
        "each page was read once"
    );
}

/// A CRM that exists only as a manifest: offset paging with a has-more flag, basic
/// auth, epoch-millisecond times, decimal strings, an enum status.
const ACME_MANIFEST: &str = r#"
name = "acmecrm"
base_url = "http://127.0.0.1:9"
default_pipeline = "sales"

[auth]
kind = "basic"

[rate_limit]
requests_per_second = 50.0
burst = 10

[deals]
page_size = 2
modified = { path = "/modified_ms", type = "timestamp" }

[deals.full]
path = "/v1/opportunities"
records = "/items"
pagination = { kind = "offset", param = "offset", has_more = "/has_more" }
query = { count = "{page_size}" }

[deals.incremental]
path = "/v1/opportunities"
records = "/items"
pagination = { kind = "offset", param = "offset", has_more = "/has_more" }
query = { count = "{page_size}", changed_since = "{since_ms}" }

[deals.fields]
external_id = "/ref"
title = "/subject"
amount = { path = "/worth", type = "decimal" }
currency = { path = "/ccy", default = "EUR" }
native_pipeline = { value = "main" }
native_stage = "/phase"
contact_email = "/buyer/mail"
status = { path = "/state", type = "enum", map = { active = "open", signed = "won", dropped = "lost" } }

[stages]
single_pipeline = ["main", "Main"]
[stages.request]
path = "/v1/phases"
records = ""
[stages.fields]
id = "/key"
label = "/name"
order = "/pos"

[default_mappings.main]
intro = "sales.lead_qualification"
offer = "sales.proposal"
"#;

#[tokio::test]
async fn a_crm_defined_only_by_a_manifest_in_the_connectors_dir_syncs_end_to_end() {
    use axum::extract::{Query, State};
    use axum::routing::get;
    use serde_json::json;
    use std::collections::HashMap;
    use std::sync::{Arc, Mutex};
    let items: Arc<Mutex<Vec<serde_json::Value>>> = Arc::new(Mutex::new(
        (1..=5)
            .map(|i| json!({"ref": format!("A-{i}"), "subject": format!("Opp {i}"), "worth": "12.34", "phase": if i % 2 == 0 { "offer" } else { "intro" }, "state": if i == 5 { "signed" } else { "active" }, "modified_ms": 1768212000000i64 + i, "buyer": {"mail": format!("b{i}@acme.example")}}))
            .collect(),
    ));
    async fn list(
        State(items): State<Arc<Mutex<Vec<serde_json::Value>>>>,
        headers: axum::http::HeaderMap,
        Query(q): Query<HashMap<String, String>>,
    ) -> axum::response::Response {
        use axum::response::IntoResponse;
        if headers.get("authorization").and_then(|v| v.to_str().ok()) != Some("Basic dXNlcjpwdw==")
        {
            return axum::http::StatusCode::UNAUTHORIZED.into_response();
        }
        let offset: usize = q["offset"].parse().unwrap();
        let count: usize = q["count"].parse().unwrap();
        let since: i64 = q.get("changed_since").map_or(0, |s| s.parse().unwrap());
        let all: Vec<_> = items
            .lock()
            .unwrap()
            .iter()
            .filter(|i| i["modified_ms"].as_i64().unwrap() >= since)
            .cloned()
            .collect();
        let page: Vec<_> = all.iter().skip(offset).take(count).cloned().collect();
        axum::Json(json!({"items": page, "has_more": offset + count < all.len()})).into_response()
    }
    let router = axum::Router::new()
        .route("/v1/opportunities", get(list))
        .route("/v1/phases", get(|| async { axum::Json(json!([{"key": "intro", "name": "Intro", "pos": 1}, {"key": "offer", "name": "Offer", "pos": 2}])) }))
        .with_state(items.clone());
    let mock = crate::harness::vendors::serve(router).await;
    let connectors = tempfile::tempdir().unwrap();
    std::fs::write(connectors.path().join("acmecrm.toml"), ACME_MANIFEST).unwrap();
    let daemon = TestDaemon::start(&format!(
        "[connectors]\ndir = \"{}\"\n\n[connections.acme]\nconnector = \"acmecrm\"\nbase_url = \"{}\"\nusername = \"user\"\npassword = \"pw\"\npoll_interval = \"1s\"\n",
        connectors.path().display(),
        mock.url()
    ))
    .await;
    let stored = eventually("five Acme deals", WAIT, || async {
        let found = deals(&daemon, "acme");
        (found.len() == 5).then_some(found)
    })
    .await;
    assert_eq!(
        stored[0],
        (
            "A-1".into(),
            "lead_qualification".into(),
            "open".into(),
            Some("b1@acme.example".into())
        )
    );
    assert_eq!(stored[1].1, "proposal");
    assert_eq!(stored[4].2, "won");
    assert_eq!(daemon.count("SELECT count(*) FROM deals WHERE connection = 'acme' AND amount_minor = 1234 AND currency = 'EUR'"), 5);
    items.lock().unwrap()[0]["phase"] = json!("offer");
    items.lock().unwrap()[0]["modified_ms"] = json!(Utc::now().timestamp_millis());
    eventually("the change read incrementally", WAIT, || async {
        (deals(&daemon, "acme")[0].1 == "proposal").then_some(())
    })
    .await;
}

mod webhooks {
    use dealsync::connectors::{Connector, Registry, WebhookAction, WebhookEvent};
    use dealsync::domain::ConnectionName;

    fn connector(kind: &str) -> std::sync::Arc<dyn Connector> {
        let text = format!("[connections.c]\nconnector = \"{kind}\"\ntoken = \"t\"\n");
        let config = dealsync::config::parse(
            std::path::Path::new("t.toml"),
            &text,
            &dealsync::config::interpolate::ProcessEnv,
        )
        .unwrap();
        Registry::build(&config.connections[0], &config).unwrap()
    }

    fn event(body: &str) -> WebhookEvent {
        WebhookEvent {
            connection: ConnectionName::new("c"),
            delivery_id: "d".into(),
            topic: None,
            headers: Vec::new(),
            body: body.as_bytes().to_vec(),
            received_at: chrono::Utc::now(),
        }
    }

    fn fixture_text(path: &str) -> String {
        std::fs::read_to_string(format!(
            "{}/tests/fixtures/{path}",
            env!("CARGO_MANIFEST_DIR")
        ))
        .unwrap()
    }

    #[test]
    fn hubspot_property_changes_become_one_refetch_per_deal_and_deletions_deletes() {
        let hubspot = connector("hubspot");
        assert!(matches!(
            hubspot.webhook_scheme(),
            Some(dealsync::connectors::signature::Scheme::HubSpotV3 { .. })
        ));
        let actions = hubspot
            .parse_webhook(&event(&fixture_text(
                "hubspot/webhook-deal-propertychange.json",
            )))
            .unwrap();
        assert_eq!(
            actions.len(),
            1,
            "two property changes of deal 1002, one refetch"
        );
        assert!(
            matches!(&actions[0], WebhookAction::Refetch { external_id } if external_id == "1002")
        );
        let deletion = r#"[{"eventId":1,"subscriptionType":"deal.deletion","objectId":77,"occurredAt":1},{"eventId":2,"subscriptionType":"contact.creation","objectId":5}]"#;
        let actions = hubspot.parse_webhook(&event(deletion)).unwrap();
        assert_eq!(actions.len(), 1);
        assert!(
            matches!(&actions[0], WebhookAction::Delete { external_id } if external_id == "77")
        );
        assert!(hubspot.parse_webhook(&event("not json")).is_err());
    }

    #[test]
    fn pipedrive_v2_creates_and_changes_map_through_the_manifest_and_deletes_delete() {
        let pipedrive = connector("pipedrive");
        assert_eq!(
            pipedrive.webhook_scheme(),
            Some(dealsync::connectors::signature::Scheme::PipedriveBasic)
        );
        let change = pipedrive
            .parse_webhook(&event(&fixture_text(
                "pipedrive/webhook-v2-deal-change.json",
            )))
            .unwrap();
        let WebhookAction::Upsert(deal) = &change[0] else {
            panic!("{change:?}")
        };
        assert_eq!(deal.external_id.as_str(), "12");
        assert_eq!(deal.native_stage, "4");
        assert_eq!(deal.amount.unwrap().minor, 420050);
        let create = pipedrive
            .parse_webhook(&event(&fixture_text(
                "pipedrive/webhook-v2-deal-create.json",
            )))
            .unwrap();
        assert!(
            matches!(&create[0], WebhookAction::Upsert(deal) if deal.external_id.as_str() == "14")
        );
        let delete = pipedrive
            .parse_webhook(&event(&fixture_text(
                "pipedrive/webhook-v2-deal-delete.json",
            )))
            .unwrap();
        assert!(matches!(&delete[0], WebhookAction::Delete { external_id } if external_id == "12"));
    }
}

#[tokio::test]
async fn dealsync_auth_runs_the_pkce_flow_on_a_loopback_redirect_and_sync_uses_the_stored_tokens() {
    use crate::harness::vendors::OAuthState;
    let hubspot = HubSpot::start(
        "unused",
        Some(OAuthState::new("none-yet", "none-yet", true)),
    )
    .await;
    hubspot.put(HsDeal::new(
        1,
        "after consent",
        "qualifiedtobuy",
        now_ms() - 60_000,
    ));
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("dealsync.toml");
    std::fs::write(
        &config,
        format!(
            "[storage]\npath = \"{}/d.db\"\n\n[connections.hs]\nconnector = \"hubspot\"\nbase_url = \"{}\"\n\n[connections.hs.oauth]\nclient_id = \"hs-client\"\nclient_secret = \"hs-secret\"\nauth_url = \"{}/oauth/authorize\"\n",
            dir.path().display(),
            hubspot.url(),
            hubspot.url()
        ),
    )
    .unwrap();
    let auth_url = format!("{}/oauth/authorize", hubspot.url());
    let (mut child, _output, authorize) = start_auth(&config, "hs", &auth_url).await;
    let query: std::collections::HashMap<String, String> =
        authorize.query_pairs().into_owned().collect();
    assert_eq!(query["code_challenge_method"], "S256");
    assert_eq!(query["client_id"], "hs-client");
    assert!(query["scope"].contains("crm.objects.deals.read"));
    let redirect = &query["redirect_uri"];
    assert!(redirect.starts_with("http://127.0.0.1:"), "{redirect}");
    *hubspot
        .state
        .oauth
        .as_ref()
        .unwrap()
        .challenge
        .lock()
        .unwrap() = Some(query["code_challenge"].clone());
    let answer = reqwest::get(format!("{redirect}?code=the-code&state={}", query["state"]))
        .await
        .unwrap();
    assert_eq!(answer.status(), 200);
    let status = tokio::time::timeout(Duration::from_secs(20), child.wait())
        .await
        .unwrap()
        .unwrap();
    assert!(status.success());
    let db = rusqlite::Connection::open(dir.path().join("d.db")).unwrap();
    let (access, refresh): (String, String) = db
        .query_row(
            "SELECT access_token, refresh_token FROM oauth_tokens WHERE connection = 'hs'",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    assert_eq!(
        (access.as_str(), refresh.as_str()),
        ("access-from-code", "refresh-from-code")
    );
    let (code, stdout, stderr) =
        run_cli(&["--config", config.to_str().unwrap(), "sync", "hs"], &[]).await;
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert!(stdout.contains("hs"), "{stdout}");
    let stored: i64 = db
        .query_row(
            "SELECT count(*) FROM deals WHERE connection = 'hs'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(stored, 1);
}

#[tokio::test]
async fn a_connection_pauses_at_the_reserve_when_its_share_of_the_daily_budget_is_spent() {
    // The pause lasts until HubSpot's daily reset at UTC midnight; a reset during the
    // test would let the webhook's fetch through.
    crate::harness::clear_of_utc_midnight(Duration::from_secs(180)).await;
    let hubspot = HubSpot::start("pat-test", None).await;
    for id in 1..=9u64 {
        hubspot.put(HsDeal::new(id, "deal", "qualifiedtobuy", now_ms() - 60_000));
    }
    // 1,000 a day, 200 left after the first answer: with a 0.8 share that is the
    // reserve kept for the portal's other apps.
    *hubspot.state.budget.lock().unwrap() = Some((1000, 201));
    let daemon = TestDaemon::start(&hubspot_connection(
        "hs",
        &hubspot.url(),
        &format!("webhook_secret = \"{}\"", crate::webhooks::HUBSPOT_SECRET),
    ))
    .await;
    daemon
        .wait_for_log(
            "vendor API budget share used up; pausing this connection",
            WAIT,
        )
        .await;
    let (_, metrics) = daemon.get("/metrics").await;
    assert!(
        metrics.contains("dealsync_vendor_budget_pauses_total{connection=\"hs\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("dealsync_vendor_budget_remaining{connection=\"hs\"} 200"),
        "{metrics}"
    );
    // A webhook for deal 1 carries only its id, so the deal must be fetched: that fetch
    // meets the pause and is refused before any request, and the delivery waits for a
    // retry. The refusal is the sign the daemon went where a request would be made.
    let seen = hubspot.faults().seen();
    let uri = daemon.url("/webhooks/hs");
    let body = serde_json::to_vec(&serde_json::json!([{
        "eventId": 1, "subscriptionId": 2004817, "portalId": 62515, "appId": 54321,
        "occurredAt": now_ms(), "subscriptionType": "deal.propertyChange",
        "attemptNumber": 0, "objectId": 1, "propertyName": "dealstage",
        "propertyValue": "closedwon", "changeSource": "CRM_UI"
    }]))
    .unwrap();
    let headers = crate::webhooks::hubspot_v3_headers(&uri, &body, std::time::SystemTime::now());
    let (status, text) = crate::webhooks::post(&daemon, "hs", headers, body).await;
    assert_eq!(status, 200, "{text}");
    let refused = eventually("the webhook's fetch to meet the pause", WAIT, || async {
        crate::webhooks::db(&daemon)
            .query_row(
                "SELECT last_error FROM webhook_inbox WHERE state = 'pending' AND attempts >= 1",
                [],
                |row| row.get::<_, Option<String>>(0),
            )
            .ok()
            .flatten()
    })
    .await;
    assert!(refused.contains("budget exhausted"), "{refused}");
    assert_eq!(hubspot.faults().seen(), seen, "no request while paused");
}

#[test]
fn the_hubspot_mock_writes_deals_as_it_renders_them() {
    use crate::harness::vendors::hubspot::ExtraProperties;
    let mut deal = HsDeal::new(7, "Quote \"A\"", "qualifiedtobuy", 1_768_212_000_000);
    deal.contact = Some(42);
    deal.extra = std::sync::Arc::new(ExtraProperties::new(vec![(
        "custom_property_00".into(),
        "value with \\ and \"".into(),
    )]));
    for (archived, associations) in [(false, true), (true, false)] {
        deal.archived = archived;
        let mut text = String::new();
        deal.write_json(&mut text, associations);
        let written: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(written, deal.render(associations));
    }
}

#[tokio::test]
async fn hubspot_oauth_refreshes_a_token_expiring_mid_sync_and_reads_every_deal() {
    use crate::harness::vendors::OAuthState;
    use std::sync::atomic::Ordering;
    let hubspot = HubSpot::start(
        "",
        Some(OAuthState::new("never-issued", "hs-refresh-0", false)),
    )
    .await;
    let base = now_ms() - 3_600_000;
    hubspot.put_contact(501, "ada@acme.example", "Ada", "Lovelace");
    for id in 1..=7u64 {
        let mut deal = HsDeal::new(id, "deal", "qualifiedtobuy", base + id as i64);
        deal.contact = Some(501);
        hubspot.put(deal);
    }
    let oauth = hubspot.state.oauth.as_ref().unwrap();
    // Every access token stops working after three API calls: mid-sync.
    oauth.expire_after.store(3, Ordering::SeqCst);
    let url = hubspot.url();
    let daemon = TestDaemon::start(&format!(
        r#"
[connections.hs]
connector = "hubspot"
base_url = "{url}"
poll_interval = "1s"
page_size = 2
rate_limit = {{ requests_per_second = 200.0, burst = 50 }}

[connections.hs.oauth]
client_id = "hs-client"
client_secret = "hs-secret"
refresh_token = "hs-refresh-0"
"#
    ))
    .await;
    eventually("seven deals, each with its contact", WAIT, || async {
        let found = deals(&daemon, "hs");
        (found.len() == 7
            && found
                .iter()
                .all(|d| d.3.as_deref() == Some("ada@acme.example")))
        .then_some(())
    })
    .await;
    assert!(
        oauth.refreshes.load(Ordering::SeqCst) >= 2,
        "refreshed at start and when the token expired mid-sync"
    );
    assert_eq!(
        daemon.count("SELECT count(*) FROM sync_runs WHERE status = 'failed'"),
        0,
        "the expiry cost a refresh, not a failed run"
    );
    let stored: Option<String> = daemon
        .db()
        .query_row(
            "SELECT refresh_token FROM oauth_tokens WHERE connection = 'hs'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(
        stored.as_deref(),
        Some("hs-refresh-0"),
        "an answer without a new refresh token keeps the old one"
    );
    let logs = daemon.logs();
    assert!(
        !logs.contains("hs-secret") && !logs.contains("hs-refresh-0") && !logs.contains("access-"),
        "no secret in logs"
    );
}

#[tokio::test]
async fn pipedrive_oauth_refreshes_a_token_expiring_mid_sync_and_keeps_the_rotated_refresh_token() {
    use crate::harness::vendors::OAuthState;
    use std::sync::atomic::Ordering;
    let pipedrive =
        Pipedrive::start_oauth(OAuthState::new("never-issued", "pd-refresh-0", true)).await;
    let start = Utc::now() - chrono::Duration::hours(1);
    for id in 1..=9u64 {
        pipedrive.put(PdDeal::new(
            id,
            "deal",
            2,
            start + chrono::Duration::seconds(id as i64),
        ));
    }
    let oauth = pipedrive.state.oauth.as_ref().unwrap();
    oauth.expire_after.store(3, Ordering::SeqCst);
    let url = pipedrive.url();
    // No base_url: API calls go to the `api_domain` the token answer names.
    let daemon = TestDaemon::start(&format!(
        r#"
[connections.pd]
connector = "pipedrive"
poll_interval = "1s"
page_size = 2
rate_limit = {{ requests_per_second = 200.0, burst = 50 }}

[connections.pd.oauth]
client_id = "pd-client"
client_secret = "pd-secret"
token_url = "{url}/oauth/token"
refresh_token = "pd-refresh-0"
"#
    ))
    .await;
    eventually("nine deals", WAIT, || async {
        (deals(&daemon, "pd").len() == 9).then_some(())
    })
    .await;
    let refreshes = oauth.refreshes.load(Ordering::SeqCst);
    assert!(refreshes >= 2, "refreshed at start and mid-sync");
    assert_eq!(
        daemon.count("SELECT count(*) FROM sync_runs WHERE status = 'failed'"),
        0,
        "the expiry cost a refresh, not a failed run: {}",
        daemon.logs()
    );
    // Rotation: the stored refresh token is the one the vendor issued last, so the
    // next refresh works (an old one would be invalid_grant).
    let live = oauth.refresh.lock().unwrap().clone();
    assert_ne!(live, "pd-refresh-0");
    eventually("the rotated refresh token stored", WAIT, || async {
        let stored: Option<String> = daemon
            .db()
            .query_row(
                "SELECT refresh_token FROM oauth_tokens WHERE connection = 'pd'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        (stored.as_deref() == Some(oauth.refresh.lock().unwrap().as_str())).then_some(())
    })
    .await;
    let logs = daemon.logs();
    assert!(
        !logs.contains("pd-secret") && !logs.contains("pd-refresh-"),
        "no secret in logs"
    );
}

/// A CRM whose answers carry its budget: limit, remaining and seconds to the reset.
const BUDGET_MANIFEST: &str = r#"
name = "budgetcrm"
base_url = "http://127.0.0.1:9"
default_pipeline = "sales"

[auth]
kind = "bearer"

[rate_limit]
requests_per_second = 100.0
burst = 10
budget_share = 0.8
budget_limit_header = "x-budget-limit"
budget_remaining_header = "x-budget-remaining"
budget_reset = "header"
budget_reset_header = "x-budget-reset"

[deals]
page_size = 1
modified = { path = "/modified_ms", type = "timestamp" }

[deals.full]
path = "/deals"
records = "/items"
pagination = { kind = "page", param = "page", has_more = "/more" }
query = { per_page = "{page_size}" }

[deals.fields]
external_id = "/id"
title = "/title"
native_pipeline = { value = "main" }
native_stage = "/stage"
"#;

#[tokio::test]
async fn a_connection_slows_down_as_the_budget_runs_low_so_its_share_lasts_until_the_reset() {
    use axum::extract::{Query, State};
    use axum::response::IntoResponse;
    use axum::routing::get;
    use serde_json::json;
    use std::collections::HashMap;
    use std::sync::{Arc, Mutex};
    use std::time::Instant;

    struct Budget {
        remaining: u64,
        /// Set by the first request, so the daemon's start-up takes none of the window.
        reset_at: Option<Instant>,
        /// Arrival time and remaining budget after each request.
        seen: Vec<(Instant, u64)>,
    }
    // 1,000 a day, 205 left: the reserve is 200, so 5 spendable, far below a quarter
    // of the 800 share; the budget resets 3 s after the first request. Pacing spaces
    // the 5 requests about 0.75 s apart, so they last until the reset and the rest
    // goes at full speed.
    let budget = Arc::new(Mutex::new(Budget {
        remaining: 205,
        reset_at: None,
        seen: Vec::new(),
    }));
    async fn page(
        State(budget): State<Arc<Mutex<Budget>>>,
        Query(q): Query<HashMap<String, String>>,
    ) -> axum::response::Response {
        let page: u64 = q.get("page").map_or(1, |p| p.parse().unwrap());
        let mut budget = budget.lock().unwrap();
        let now = Instant::now();
        let reset_at = *budget.reset_at.get_or_insert(now + Duration::from_secs(3));
        if now >= reset_at {
            budget.remaining = 1000;
            budget.reset_at = Some(now + Duration::from_secs(3600));
        }
        budget.remaining -= 1;
        let remaining = budget.remaining;
        budget.seen.push((now, remaining));
        let reset = budget
            .reset_at
            .expect("set by the first request")
            .saturating_duration_since(now)
            .as_secs_f64()
            .ceil();
        let body = json!({
            "items": [{"id": format!("B-{page}"), "title": "deal", "stage": "intro", "modified_ms": 1768212000000i64 + page as i64}],
            "more": page < 12,
        });
        (
            [
                ("x-budget-limit", "1000".to_owned()),
                ("x-budget-remaining", remaining.to_string()),
                ("x-budget-reset", reset.to_string()),
            ],
            axum::Json(body),
        )
            .into_response()
    }
    let router = axum::Router::new()
        .route("/deals", get(page))
        .with_state(budget.clone());
    let mock = crate::harness::vendors::serve(router).await;
    let connectors = tempfile::tempdir().unwrap();
    std::fs::write(connectors.path().join("budgetcrm.toml"), BUDGET_MANIFEST).unwrap();
    let daemon = TestDaemon::start(&format!(
        "[connectors]\ndir = \"{}\"\n\n[connections.bc]\nconnector = \"budgetcrm\"\nbase_url = \"{}\"\ntoken = \"t\"\npoll_interval = \"1s\"\n",
        connectors.path().display(),
        mock.url()
    ))
    .await;
    daemon
        .wait_for_log(
            "vendor API budget running low; slowing down so this connection's share lasts until the reset",
            WAIT,
        )
        .await;
    let (_, metrics) = daemon.get("/metrics").await;
    let spacing: f64 = metrics
        .lines()
        .find_map(|line| {
            line.strip_prefix("dealsync_vendor_budget_pace_seconds{connection=\"bc\"} ")
        })
        .and_then(|value| value.parse().ok())
        .unwrap_or_else(|| panic!("{metrics}"));
    assert!(
        spacing > 0.3 && spacing < 3.0,
        "spacing {spacing} s: {metrics}"
    );
    eventually("every deal, after the reset", WAIT, || async {
        (deals(&daemon, "bc").len() == 12).then_some(())
    })
    .await;
    let seen = budget.lock().unwrap().seen.clone();
    // Before the reset: never below the reserve, and paced rather than back to back.
    let before: Vec<&(Instant, u64)> = seen.iter().take_while(|(_, left)| *left < 300).collect();
    assert!(seen.iter().all(|(_, left)| *left >= 200), "{seen:?}");
    assert!(
        before.len() >= 3,
        "{} requests before the reset",
        before.len()
    );
    // The spacing is the time left until the reset over the requests left to spend,
    // so the last one before the reset may follow closely: the reset is near. The
    // others are spread out, not back to back.
    let gaps: Vec<Duration> = before
        .windows(2)
        .skip(1)
        .map(|pair| pair[1].0 - pair[0].0)
        .collect();
    let close = gaps
        .iter()
        .filter(|gap| **gap < Duration::from_millis(300))
        .count();
    assert!(
        close <= 1,
        "requests close together while the budget ran low: {gaps:?}"
    );
    let span = before.last().unwrap().0 - before[0].0;
    assert!(
        span >= Duration::from_millis(1500),
        "the spendable requests were spent within {span:?}: {gaps:?}"
    );
    // The spacing spread the last requests of the share up to the reset: the reserve
    // kept for other integrations was never touched.
    assert!(
        !daemon.logs().contains("budget share used up"),
        "paced, not paused"
    );
}

#[tokio::test]
async fn salesforce_fetch_one_reads_one_opportunity_with_its_contact_and_sees_it_deleted() {
    use dealsync::ingest::{ConnectionRuntime, SyncDeps};
    use dealsync::store::Store;
    let salesforce = Salesforce::start("refresh-0", 2).await;
    let at = Utc.with_ymd_and_hms(2026, 1, 12, 10, 0, 0).unwrap();
    let mut first = SfOpp::new("006A1", "Opp 1", "Negotiation/Review", at);
    first.contact = Some(("ada@acme.example".into(), "Ada Lovelace".into()));
    salesforce.put(first);
    salesforce.put(SfOpp::new("006A2", "Opp 2", "Prospecting", at));
    let dir = tempfile::tempdir().unwrap();
    let text = format!(
        "[storage]\npath = \"{}/one.db\"\n{}",
        dir.path().display(),
        salesforce_connection("sf", &salesforce.url())
    );
    let config = dealsync::config::parse(
        &dir.path().join("dealsync.toml"),
        &text,
        &dealsync::config::interpolate::ProcessEnv,
    )
    .unwrap();
    let runtime = ConnectionRuntime::build_all(&config).unwrap().remove(0);
    let path = config.storage.path.clone();
    let store = tokio::task::spawn_blocking(move || Store::open(&path))
        .await
        .unwrap()
        .unwrap();
    store.ensure_connection("sf", "salesforce").await.unwrap();
    let deps = SyncDeps {
        store,
        metrics: std::sync::Arc::new(dealsync::telemetry::Metrics::new()),
        attention: None,
    };
    let shutdown = tokio_util::sync::CancellationToken::new();
    let cx = runtime.context(&deps, &shutdown);

    let deal = runtime
        .connector
        .fetch_one(&cx, "006A1")
        .await
        .unwrap()
        .expect("found");
    assert_eq!(deal.external_id.as_str(), "006A1");
    assert_eq!(deal.native_stage, "Negotiation/Review");
    assert_eq!(
        deal.contact_email.as_ref().map(|e| e.as_str()),
        Some("ada@acme.example")
    );
    assert!(!deal.deleted);
    let seen = salesforce.state.faults.seen();
    let asked = seen.last().unwrap();
    assert!(
        asked.contains("queryAll") && asked.contains("006A1"),
        "{asked}"
    );

    salesforce.update("006A1", |o| o.deleted = true);
    let deleted = runtime.connector.fetch_one(&cx, "006A1").await.unwrap();
    assert!(deleted.expect("still answered").deleted);
    assert!(
        runtime
            .connector
            .fetch_one(&cx, "006NOPE")
            .await
            .unwrap()
            .is_none()
    );
    let refused = runtime
        .connector
        .fetch_one(&cx, "x' OR Name != '")
        .await
        .unwrap_err();
    assert!(refused.to_string().contains("not a record id"), "{refused}");
}

/// A fictional CRM whose page is served as fixed text: records in the vendor's own
/// key order and spacing, one record of the wrong shape, one with a bad amount, and
/// the buyer's email from an enrichment.
const RAW_MANIFEST: &str = r#"
name = "rawcrm"
base_url = "http://127.0.0.1:9"
default_pipeline = "sales"

[auth]
kind = "bearer"

[deals]
modified = { path = "/modified_ms", type = "timestamp" }

[deals.full]
path = "/v1/opportunities"
records = "/data/items"

[[deals.enrich]]
name = "buyer"
ids = ["/buyer"]
id = "/id"
[deals.enrich.request]
path = "/v1/buyers"
records = "/buyers"
query = { ids = "{ids}" }

[deals.fields]
external_id = "/ref"
title = "/subject"
amount = { path = "/worth", type = "decimal" }
native_pipeline = { value = "main" }
native_stage = "/phase"
contact_email = "@buyer/mail"

[default_mappings.main]
intro = "sales.lead_qualification"
offer = "sales.proposal"
"#;

#[tokio::test]
async fn a_pulled_record_nested_200000_levels_deep_is_quarantined_and_every_deal_stays_readable() {
    use axum::routing::get;
    const TOKEN: &str = "test-token-0123456789abcdef";
    // One usual record and one with a field no mapping reads nested 200,000 levels deep.
    let levels = 200_000;
    let usual = r#"{"ref":"R-1","subject":"Usual","phase":"intro","worth":"12.50","modified_ms":1768212000001}"#;
    let deep = format!(
        r#"{{"ref":"R-2","subject":"Deep","phase":"offer","worth":"3","modified_ms":1768212000002,"notes":{}{}}}"#,
        "[".repeat(levels),
        "]".repeat(levels)
    );
    let page = format!(r#"{{"data": {{"total": 2, "items": [{usual}, {deep}]}}}}"#);
    serde_json::from_str::<serde::de::IgnoredAny>(&page).expect("the page is JSON");
    let router = axum::Router::new()
        .route(
            "/v1/opportunities",
            get(move || {
                let page = page.clone();
                async move { ([("content-type", "application/json")], page) }
            }),
        )
        .route(
            "/v1/buyers",
            get(|| async { axum::Json(serde_json::json!({"buyers": []})) }),
        );
    let mock = crate::harness::vendors::serve(router).await;
    let manifests = tempfile::tempdir().unwrap();
    std::fs::write(manifests.path().join("rawcrm.toml"), RAW_MANIFEST).unwrap();

    let daemon = TestDaemon::start(&format!(
        "api_token = \"{TOKEN}\"\n\n[connectors]\ndir = \"{}\"\n\n[connections.raw]\nconnector = \"rawcrm\"\nbase_url = \"{}\"\ntoken = \"t\"\npoll_interval = \"1h\"\n",
        manifests.path().display(),
        mock.url()
    ))
    .await;
    eventually("the first sync run", WAIT, || async {
        (successful_runs(&daemon, "raw") >= 1).then_some(())
    })
    .await;

    let quarantined: Vec<(Option<String>, String)> = daemon
        .db()
        .prepare("SELECT external_id, error FROM quarantine")
        .unwrap()
        .query_map([], |row| Ok((row.get(0)?, row.get(1)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(quarantined.len(), 1, "{quarantined:?}");
    assert_eq!(quarantined[0].0.as_deref(), Some("R-2"));
    assert!(
        quarantined[0].1.contains("nested 128 or more levels deep"),
        "{quarantined:?}"
    );
    let stored: Vec<String> = deals(&daemon, "raw").into_iter().map(|d| d.0).collect();
    assert_eq!(stored, ["R-1"]);

    let get = |path: String| {
        let request = daemon.http.get(daemon.url(&path)).bearer_auth(TOKEN);
        async move {
            let response = request.send().await.unwrap();
            (response.status().as_u16(), response.text().await.unwrap())
        }
    };
    let (status, body) = get("/api/v1/deals".into()).await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("R-1"), "{body}");
    let id = daemon.count("SELECT id FROM deals WHERE external_id = 'R-1'");
    let (status, body) = get(format!("/api/v1/deals/{id}")).await;
    assert_eq!(status, 200, "{body}");
    let config = daemon.config_path.to_str().unwrap().to_owned();
    let (code, stdout, stderr) = run_cli(&["--config", &config, "deals", "list"], &[]).await;
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("R-1"), "{stdout}");
    // /metrics counts the run's records by outcome: one stored, one quarantined.
    let (status, metrics) = get("/metrics".into()).await;
    assert_eq!(status, 200, "{metrics}");
    for outcome in ["created", "quarantined"] {
        let line = format!("dealsync_records_total{{connection=\"raw\",outcome=\"{outcome}\"}} 1");
        assert!(metrics.lines().any(|l| l == line), "{line} in {metrics}");
    }
}

#[tokio::test]
async fn a_pull_sync_stores_each_record_as_the_vendor_sent_it_and_quarantines_a_bad_one_with_its_text()
 {
    use axum::extract::State;
    use axum::routing::get;
    use dealsync::sync;
    use std::sync::{Arc, Mutex};

    #[derive(Clone)]
    struct Vendor {
        records: Arc<Mutex<Vec<String>>>,
        buyer_mail: Arc<Mutex<String>>,
    }
    let first = r#"{ "subject":"Caf\u00e9 \"deal\"",  "ref" : "R-1", "phase":"intro", "worth":"12.50", "buyer": 7, "modified_ms": 1768212000001, "notes": {"b": [1, 2.0], "a": null} }"#;
    let second = r#"{"ref":"R-2","subject":"Second","phase":"offer","worth":"3","modified_ms":1768212000002}"#;
    let wrong_shape = r#"  "just a string"  "#.trim();
    let bad_amount = r#"{"ref":"R-4","subject":"Bad","phase":"intro","worth":"twelve","modified_ms":1768212000003}"#;
    let vendor = Vendor {
        records: Arc::new(Mutex::new(
            [first, second, wrong_shape, bad_amount]
                .map(str::to_owned)
                .to_vec(),
        )),
        buyer_mail: Arc::new(Mutex::new("ada@acme.example".into())),
    };
    async fn list(State(vendor): State<Vendor>) -> axum::response::Response {
        use axum::response::IntoResponse;
        let body = format!(
            "{{\"data\": {{\"total\": 4, \"items\": [\n  {}\n]}}}}",
            vendor.records.lock().unwrap().join(",\n  ")
        );
        ([("content-type", "application/json")], body).into_response()
    }
    async fn buyers(State(vendor): State<Vendor>) -> axum::Json<serde_json::Value> {
        let mail = vendor.buyer_mail.lock().unwrap().clone();
        axum::Json(serde_json::json!({"buyers": [{"id": 7, "mail": mail}]}))
    }
    let router = axum::Router::new()
        .route("/v1/opportunities", get(list))
        .route("/v1/buyers", get(buyers))
        .with_state(vendor.clone());
    let mock = crate::harness::vendors::serve(router).await;

    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("connectors")).unwrap();
    std::fs::write(dir.path().join("connectors/rawcrm.toml"), RAW_MANIFEST).unwrap();
    let (runtime, deps) = in_process(
        dir.path(),
        &format!(
            "[connectors]\ndir = \"{}/connectors\"\n\n[connections.raw]\nconnector = \"rawcrm\"\nbase_url = \"{}\"\ntoken = \"t\"\n",
            dir.path().display(),
            mock.url()
        ),
    )
    .await;
    let shutdown = tokio_util::sync::CancellationToken::new();
    let sync = || sync::run_once(&runtime, &deps, true, &shutdown, &|_| {});
    let db = || rusqlite::Connection::open(dir.path().join("sync.db")).unwrap();
    let raw_of = |external_id: &str| -> String {
        db().query_row(
            "SELECT raw FROM deals WHERE external_id = ?1",
            [external_id],
            |row| row.get(0),
        )
        .unwrap()
    };

    let summary = sync().await.unwrap();
    assert_eq!(
        (summary.fetched, summary.created, summary.quarantined),
        (4, 2, 2)
    );
    assert_eq!(
        raw_of("R-1"),
        first,
        "the vendor's bytes, key order and spacing"
    );
    assert_eq!(raw_of("R-2"), second);
    let (title, amount, email): (String, i64, String) = db()
        .query_row(
            "SELECT title, amount_minor, contact_email FROM deals WHERE external_id = 'R-1'",
            [],
            |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)),
        )
        .unwrap();
    assert_eq!(
        (title.as_str(), amount, email.as_str()),
        ("Café \"deal\"", 1250, "ada@acme.example")
    );
    let quarantined: Vec<(Option<String>, String, String)> = db()
        .prepare("SELECT external_id, error, raw FROM quarantine ORDER BY id")
        .unwrap()
        .query_map([], |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(quarantined.len(), 2, "{quarantined:?}");
    assert_eq!(quarantined[0].0, None);
    assert!(
        quarantined[0].1.contains("not a JSON object"),
        "{quarantined:?}"
    );
    assert_eq!(quarantined[0].2, wrong_shape);
    assert_eq!(quarantined[1].0.as_deref(), Some("R-4"));
    assert!(quarantined[1].1.contains("amount"), "{quarantined:?}");
    assert_eq!(quarantined[1].2, bad_amount);

    // The same page again: nothing to write.
    let summary = sync().await.unwrap();
    assert_eq!((summary.unchanged, summary.updated), (2, 0));

    // Only the enrichment changes (the records' text does not): R-1 is rewritten.
    *vendor.buyer_mail.lock().unwrap() = "grace@acme.example".into();
    let summary = sync().await.unwrap();
    assert_eq!((summary.unchanged, summary.updated), (1, 1));
    assert_eq!(raw_of("R-1"), first);

    // Only an unmapped part of R-2's text changes: rewritten, with the new text.
    let second_with_note = r#"{"ref":"R-2","subject":"Second","phase":"offer","worth":"3","modified_ms":1768212000002,"note":"x"}"#;
    vendor.records.lock().unwrap()[1] = second_with_note.to_owned();
    let summary = sync().await.unwrap();
    assert_eq!(
        (summary.unchanged, summary.updated, summary.stage_changes),
        (1, 1, 0)
    );
    assert_eq!(raw_of("R-2"), second_with_note);
}

/// A connection's runtime and sync dependencies built in-process from `toml`, with its
/// database in `dir`.
async fn in_process(
    dir: &std::path::Path,
    toml: &str,
) -> (
    std::sync::Arc<dealsync::ingest::ConnectionRuntime>,
    dealsync::ingest::SyncDeps,
) {
    let path = dir.join("dealsync.toml");
    let text = format!("[storage]\npath = \"{}/sync.db\"\n{toml}", dir.display());
    std::fs::write(&path, &text).unwrap();
    let config =
        dealsync::config::parse(&path, &text, &dealsync::config::interpolate::ProcessEnv).unwrap();
    let runtime = dealsync::ingest::ConnectionRuntime::build_all(&config)
        .unwrap()
        .remove(0);
    let db_path = config.storage.path.clone();
    let store = tokio::task::spawn_blocking(move || dealsync::store::Store::open(&db_path))
        .await
        .unwrap()
        .unwrap();
    store
        .ensure_connection(runtime.name(), runtime.connector.kind())
        .await
        .unwrap();
    let deps = dealsync::ingest::SyncDeps {
        store,
        metrics: std::sync::Arc::new(dealsync::telemetry::Metrics::new()),
        attention: None,
    };
    (runtime, deps)
}

/// The HubSpot connection `hs` on `url`, built in-process, with a 1-minute lookback.
async fn hubspot_in_process(
    dir: &std::path::Path,
    url: &str,
) -> (
    std::sync::Arc<dealsync::ingest::ConnectionRuntime>,
    dealsync::ingest::SyncDeps,
) {
    let toml = hubspot_connection("hs", url, "").replace("lookback = \"1s\"", "lookback = \"1m\"");
    in_process(dir, &toml).await
}

#[tokio::test]
async fn hubspot_contacts_are_read_once_per_full_sync_and_incremental_reads_take_fresh_ones_from_the_store()
 {
    use dealsync::sync::run_once;
    let hubspot = HubSpot::start("pat-test", None).await;
    let base = now_ms() - 3_600_000;
    hubspot.put_contact(501, "ada@acme.example", "Ada", "Lovelace");
    hubspot.put_contact(502, "grace@globex.example", "Grace", "Hopper");
    for i in 0..6u64 {
        let mut deal = HsDeal::new(
            1001 + i,
            &format!("Deal {i}"),
            "appointmentscheduled",
            base + i as i64 * 1000,
        );
        deal.contact = Some(if i < 5 { 501 } else { 502 });
        hubspot.put(deal);
    }
    let dir = tempfile::tempdir().unwrap();
    let (runtime, deps) = hubspot_in_process(dir.path(), &hubspot.url()).await;
    let shutdown = tokio_util::sync::CancellationToken::new();
    let contact_reads = || {
        hubspot
            .faults()
            .count("/crm/v3/objects/contacts/batch/read")
    };
    let db = || rusqlite::Connection::open(dir.path().join("sync.db")).unwrap();
    let emails = || -> Vec<Option<String>> {
        db().prepare("SELECT contact_email FROM deals ORDER BY external_id")
            .unwrap()
            .query_map([], |row| row.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap()
    };
    let ada = Some("ada@acme.example".to_owned());

    // Three pages of two: contact 501 is read with the first page only, 502 with the last.
    let full = run_once(&runtime, &deps, true, &shutdown, &|_| {})
        .await
        .unwrap();
    assert_eq!(full.fetched, 6);
    assert_eq!(contact_reads(), 2, "each contact read once in a full sync");
    assert_eq!(emails()[..5], vec![ada.clone(); 5][..]);
    assert_eq!(emails()[5].as_deref(), Some("grace@globex.example"));

    // The contact's email changes and a deal changes: the incremental read takes the
    // contact from the store (read minutes ago), so the deal keeps the old email.
    hubspot.put_contact(501, "ada@analytical.example", "Ada", "Lovelace");
    hubspot.update(1001, |deal| {
        deal.stage = "qualifiedtobuy".into();
        deal.modified_ms = now_ms();
    });
    let incremental = run_once(&runtime, &deps, false, &shutdown, &|_| {})
        .await
        .unwrap();
    assert!(incremental.updated >= 1, "{incremental:?}");
    assert_eq!(contact_reads(), 2, "no contact read again while fresh");
    assert_eq!(
        emails()[0],
        ada,
        "the kept email, until it is older than a day"
    );

    // Kept records older than the manifest's 24 hours are read again.
    db().execute(
        "UPDATE enrichment_cache SET fetched_at = fetched_at - 25 * 3600 * 1000",
        [],
    )
    .unwrap();
    hubspot.update(1001, |deal| deal.modified_ms = now_ms());
    run_once(&runtime, &deps, false, &shutdown, &|_| {})
        .await
        .unwrap();
    assert_eq!(contact_reads(), 3);
    assert_eq!(emails()[0].as_deref(), Some("ada@analytical.example"));

    // A full sync reads every contact again and updates every deal of it.
    hubspot.put_contact(501, "ada@engine.example", "Ada", "Lovelace");
    run_once(&runtime, &deps, true, &shutdown, &|_| {})
        .await
        .unwrap();
    assert_eq!(contact_reads(), 5);
    assert_eq!(
        emails()[..5],
        vec![Some("ada@engine.example".to_owned()); 5][..]
    );
}

#[tokio::test]
async fn an_incremental_read_asks_nothing_more_about_records_its_overlap_meets_unchanged() {
    use dealsync::sync::run_once;
    let hubspot = HubSpot::start("pat-test", None).await;
    let old = now_ms() - 7_200_000;
    let recent = now_ms() - 10_000;
    hubspot.put_contact(501, "ada@acme.example", "Ada", "Lovelace");
    hubspot.put_contact(502, "grace@globex.example", "Grace", "Hopper");
    // 1001 and 1002 lie before the lookback, 1003 and 1004 inside it; 1004 has no
    // contact yet.
    for (id, modified) in [
        (1001, old),
        (1002, old + 1000),
        (1003, recent),
        (1004, recent + 1),
    ] {
        let mut deal = HsDeal::new(id, &format!("Deal {id}"), "appointmentscheduled", modified);
        deal.contact = (id != 1004).then_some(501);
        hubspot.put(deal);
    }
    let dir = tempfile::tempdir().unwrap();
    let (runtime, deps) = hubspot_in_process(dir.path(), &hubspot.url()).await;
    let shutdown = tokio_util::sync::CancellationToken::new();
    let association_reads = || {
        let mut ids = std::mem::take(&mut *hubspot.state.association_reads.lock().unwrap());
        ids.sort();
        ids
    };
    let db = || rusqlite::Connection::open(dir.path().join("sync.db")).unwrap();
    let deal = |id: &str| -> (String, Option<String>) {
        db().query_row(
            "SELECT title, contact_email FROM deals WHERE external_id = ?1",
            [id],
            |row| Ok((row.get(0)?, row.get(1)?)),
        )
        .unwrap()
    };
    let full = run_once(&runtime, &deps, true, &shutdown, &|_| {})
        .await
        .unwrap();
    assert_eq!(full.fetched, 4);
    // The first incremental read meets 1003 and 1004 again (modified within a lookback
    // of the full read's start) and reads them in full: a full read stores no
    // fingerprints.
    let again = run_once(&runtime, &deps, false, &shutdown, &|_| {})
        .await
        .unwrap();
    assert_eq!((again.fetched, again.unchanged), (2, 0), "{again:?}");
    assert_eq!(association_reads(), ["1003", "1004"]);

    // 1001 changes. The search reads it and, in its overlap, 1003 and 1004 as stored:
    // 1003 is recognised and not asked about; 1004 has no contact, so its association
    // is read again (a contact linked later need not move a deal's modification time).
    hubspot.update(1001, |deal| {
        deal.stage = "qualifiedtobuy".into();
        deal.modified_ms = now_ms();
    });
    let first = run_once(&runtime, &deps, false, &shutdown, &|_| {})
        .await
        .unwrap();
    assert_eq!(
        association_reads(),
        ["1001", "1004"],
        "the unchanged 1003 is not asked about"
    );
    assert_eq!(
        (first.fetched, first.unchanged, first.updated),
        (3, 2, 1),
        "1003 not asked about, 1004 asked about and found the same: {first:?}"
    );

    // A contact linked to 1004 without its modification time moving is still found.
    hubspot.update(1004, |deal| deal.contact = Some(502));
    run_once(&runtime, &deps, false, &shutdown, &|_| {})
        .await
        .unwrap();
    assert_eq!(association_reads(), ["1004"], "1001 and 1003 are unchanged");
    assert_eq!(deal("1004").1.as_deref(), Some("grace@globex.example"));

    // A record changed without its modification time moving (equal timestamps) is
    // not taken for the stored one.
    hubspot.update(1003, |deal| deal.name = "Deal 1003, renamed".into());
    let last = run_once(&runtime, &deps, false, &shutdown, &|_| {})
        .await
        .unwrap();
    assert_eq!(association_reads(), ["1003"]);
    assert_eq!(
        deal("1003"),
        ("Deal 1003, renamed".into(), Some("ada@acme.example".into()))
    );
    assert_eq!(last.updated, 1, "{last:?}");
}

#[tokio::test]
async fn a_person_changed_within_the_same_second_is_read_although_the_deal_looks_unchanged() {
    use dealsync::sync::run_once;
    let pipedrive = Pipedrive::start("pd-token").await;
    pipedrive.put_person(301, "Ada Lovelace", "ada@acme.example");
    pipedrive.put_person(302, "Grace Hopper", "grace@globex.example");
    let at = Utc::now() - chrono::Duration::seconds(10);
    for id in [11, 12] {
        let mut deal = PdDeal::new(id, &format!("Deal {id}"), 1, at);
        deal.person_id = Some(301);
        pipedrive.put(deal);
    }
    let dir = tempfile::tempdir().unwrap();
    let (runtime, deps) =
        in_process(dir.path(), &pipedrive_connection("pd", &pipedrive.url())).await;
    let shutdown = tokio_util::sync::CancellationToken::new();
    let person_reads = || pipedrive.faults().count("/api/v2/persons");
    let email = |id: &str| -> Option<String> {
        rusqlite::Connection::open(dir.path().join("sync.db"))
            .unwrap()
            .query_row(
                "SELECT contact_email FROM deals WHERE external_id = ?1",
                [id],
                |row| row.get(0),
            )
            .unwrap()
    };
    run_once(&runtime, &deps, true, &shutdown, &|_| {})
        .await
        .unwrap();
    // The first incremental read meets both deals again (their update time is the
    // watermark) and reads them in full: a full read stores no fingerprints.
    run_once(&runtime, &deps, false, &shutdown, &|_| {})
        .await
        .unwrap();
    let after_full = person_reads();

    // The overlap meets both deals as stored: no person is asked about.
    let quiet = run_once(&runtime, &deps, false, &shutdown, &|_| {})
        .await
        .unwrap();
    assert_eq!((quiet.fetched, quiet.unchanged), (2, 2), "{quiet:?}");
    assert_eq!(person_reads(), after_full);
    let metrics = deps.metrics.encode();
    let unchanged = metrics
        .lines()
        .find(|line| {
            line.contains("records_total")
                && line.contains("connection=\"pd\"")
                && line.contains("outcome=\"unchanged\"")
        })
        .unwrap_or_else(|| panic!("{metrics}"));
    assert!(unchanged.ends_with(" 2"), "{unchanged}");

    // Deal 11 moves to another person within the same second: its fields and update
    // time are the same, but the person id it gives the lookup is not.
    pipedrive.update(11, |deal| deal.person_id = Some(302));
    let moved = run_once(&runtime, &deps, false, &shutdown, &|_| {})
        .await
        .unwrap();
    assert_eq!((moved.fetched, moved.unchanged), (2, 1), "{moved:?}");
    assert_eq!(person_reads(), after_full + 1);
    assert_eq!(email("11").as_deref(), Some("grace@globex.example"));
    assert_eq!(email("12").as_deref(), Some("ada@acme.example"));
}

#[tokio::test]
async fn a_deal_the_search_index_returns_late_is_read_by_the_next_run_and_old_ones_are_not_read_again()
 {
    use dealsync::sync::run_once;
    let hubspot = HubSpot::start("pat-test", None).await;
    let old = now_ms() - 7_200_000;
    hubspot.put_contact(501, "ada@acme.example", "Ada", "Lovelace");
    for (id, modified) in [(1001, old), (1002, old + 30_000)] {
        let mut deal = HsDeal::new(id, &format!("Deal {id}"), "appointmentscheduled", modified);
        deal.contact = Some(501);
        hubspot.put(deal);
    }
    let dir = tempfile::tempdir().unwrap();
    let (runtime, deps) = hubspot_in_process(dir.path(), &hubspot.url()).await;
    let shutdown = tokio_util::sync::CancellationToken::new();
    run_once(&runtime, &deps, true, &shutdown, &|_| {})
        .await
        .unwrap();

    // Deals modified long before the full read began are not read again, although
    // 1001 is within a lookback (1 minute) of the watermark (1002's time), and 1002 is
    // at the watermark.
    let quiet = run_once(&runtime, &deps, false, &shutdown, &|_| {})
        .await
        .unwrap();
    assert_eq!(quiet.fetched, 0, "{quiet:?}");

    // 1003 changes 20 s ago but is not in the index yet; 1004 changes now and is.
    let mut late = HsDeal::new(1003, "Deal 1003", "qualifiedtobuy", now_ms() - 20_000);
    late.contact = Some(501);
    late.unindexed = true;
    hubspot.put(late);
    let mut prompt = HsDeal::new(1004, "Deal 1004", "qualifiedtobuy", now_ms());
    prompt.contact = Some(501);
    hubspot.put(prompt);
    let first = run_once(&runtime, &deps, false, &shutdown, &|_| {})
        .await
        .unwrap();
    assert_eq!(first.created, 1, "{first:?}");

    // The index catches up: the next run reads 1003, modified before the watermark
    // (1004's time) but within a lookback of the previous read's start.
    hubspot.update(1003, |deal| deal.unindexed = false);
    let second = run_once(&runtime, &deps, false, &shutdown, &|_| {})
        .await
        .unwrap();
    assert_eq!(second.created, 1, "{second:?}");
    let stored: i64 = rusqlite::Connection::open(dir.path().join("sync.db"))
        .unwrap()
        .query_row("SELECT count(*) FROM deals", [], |row| row.get(0))
        .unwrap();
    assert_eq!(stored, 4);
}

#[tokio::test]
async fn a_deal_committed_in_the_cursors_own_second_after_the_read_is_read_by_the_next_run() {
    use dealsync::sync::run_once;
    let salesforce = Salesforce::start("refresh-0", 2).await;
    let dir = tempfile::tempdir().unwrap();
    let (runtime, deps) = in_process(
        dir.path(),
        &salesforce_connection("sf", &salesforce.url())
            .replace("lookback = \"30s\"", "lookback = \"1s\""),
    )
    .await;
    let shutdown = tokio_util::sync::CancellationToken::new();
    // SystemModstamp has whole seconds; the lookback is as short as one. The read
    // begins within the opportunity's second.
    let second = DateTime::from_timestamp(Utc::now().timestamp(), 0).unwrap();
    salesforce.put(SfOpp::new("006B1", "Opp 1", "Prospecting", second));
    let full = run_once(&runtime, &deps, true, &shutdown, &|_| {})
        .await
        .unwrap();
    assert_eq!(full.fetched, 1);
    // 006B2 is committed after that read, with the same SystemModstamp: the cursor's.
    salesforce.put(SfOpp::new("006B2", "Opp 2", "Prospecting", second));
    let next = run_once(&runtime, &deps, false, &shutdown, &|_| {})
        .await
        .unwrap();
    assert_eq!(next.created, 1, "{next:?}");
}

/// 450 HubSpot deals change (their changes `age_ms` old) and are read by one
/// incremental read of three search pages, while deal 1 changes again after the first
/// page: it moves to the end of the search's order, and every deal after it one place
/// forward. Returns the deals left at their old stage after one more run.
async fn deals_left_behind_by_a_shift(age_ms: i64) -> Vec<String> {
    use dealsync::sync::run_once;
    let hubspot = HubSpot::start("pat-test", None).await;
    hubspot.put_contact(501, "ada@acme.example", "Ada", "Lovelace");
    let old = now_ms() - 7_200_000;
    for id in 1..=450u64 {
        let mut deal = HsDeal::new(id, &format!("Deal {id}"), "appointmentscheduled", old);
        deal.contact = Some(501);
        hubspot.put(deal);
    }
    let dir = tempfile::tempdir().unwrap();
    let (runtime, deps) = hubspot_in_process(dir.path(), &hubspot.url()).await;
    let shutdown = tokio_util::sync::CancellationToken::new();
    run_once(&runtime, &deps, true, &shutdown, &|_| {})
        .await
        .unwrap();

    let backlog = now_ms() - age_ms;
    for id in 1..=450u64 {
        hubspot.update(id, |deal| {
            deal.stage = "qualifiedtobuy".into();
            deal.modified_ms = backlog + id as i64;
        });
    }
    *hubspot.faults().slow.lock().unwrap() = Some((
        "/crm/v3/objects/deals/search".into(),
        Duration::from_millis(300),
    ));
    let searches = hubspot.faults().count("/crm/v3/objects/deals/search");
    let mover = {
        let hubspot = hubspot.state.clone();
        tokio::spawn(async move {
            while hubspot.faults.count("/crm/v3/objects/deals/search") < searches + 2 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            if let Some(deal) = hubspot.deals.lock().unwrap().get_mut(&1) {
                deal.name = "Deal 1, again".into();
                deal.modified_ms = now_ms();
            }
        })
    };
    run_once(&runtime, &deps, false, &shutdown, &|_| {})
        .await
        .unwrap();
    mover.await.unwrap();
    *hubspot.faults().slow.lock().unwrap() = None;
    // A later run, as the daemon would make.
    run_once(&runtime, &deps, false, &shutdown, &|_| {})
        .await
        .unwrap();
    rusqlite::Connection::open(dir.path().join("sync.db"))
        .unwrap()
        .prepare("SELECT external_id FROM deals WHERE native_stage <> 'qualifiedtobuy' ORDER BY id")
        .unwrap()
        .query_map([], |row| row.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap()
}

#[tokio::test]
async fn a_deal_modified_while_the_search_pages_through_a_backlog_shifts_no_other_deal_out() {
    // While dealsync was down, the deals changed ten minutes ago: older than the
    // lookback (1 minute), so the search pages by keyset (without it: deal 201 is lost).
    let behind = deals_left_behind_by_a_shift(600_000).await;
    assert!(
        behind.is_empty(),
        "deals left at their old stage: {behind:?}"
    );
}

#[tokio::test]
async fn a_deal_a_shift_skips_among_recent_changes_is_read_by_the_next_run() {
    // Changes within the lookback: the search follows its offset, and the deal the
    // shift skips is read by the next run, which starts at this one's horizon.
    let behind = deals_left_behind_by_a_shift(10_000).await;
    assert!(
        behind.is_empty(),
        "deals left at their old stage: {behind:?}"
    );
}

#[tokio::test]
async fn unmapped_deals_move_to_their_stage_once_the_config_maps_it_keeping_when_they_entered() {
    use dealsync::sync::run_once;
    let hubspot = HubSpot::start("pat-test", None).await;
    let entered = now_ms() - 86_400_000;
    hubspot.put(HsDeal::new(1001, "Deal 1001", "customstage", entered));
    hubspot.put(HsDeal::new(
        1002,
        "Deal 1002",
        "appointmentscheduled",
        entered,
    ));
    let dir = tempfile::tempdir().unwrap();
    let (runtime, deps) = hubspot_in_process(dir.path(), &hubspot.url()).await;
    let shutdown = tokio_util::sync::CancellationToken::new();
    run_once(&runtime, &deps, true, &shutdown, &|_| {})
        .await
        .unwrap();
    let db = || rusqlite::Connection::open(dir.path().join("sync.db")).unwrap();
    let deal = |id: &str| -> (String, String, i64) {
        db().query_row(
            "SELECT stage, status, stage_entered_at FROM deals WHERE external_id = ?1",
            [id],
            |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)),
        )
        .unwrap()
    };
    assert_eq!(deal("1001").0, "unmapped");

    // The config maps the stage now; the next run, with nothing changed at the vendor,
    // moves the deal there.
    let path = dir.path().join("dealsync.toml");
    let text = std::fs::read_to_string(&path).unwrap()
        + "\n[connections.hs.stage_map.default]\ncustomstage = \"proposal\"\n";
    let config =
        dealsync::config::parse(&path, &text, &dealsync::config::interpolate::ProcessEnv).unwrap();
    let remapped = dealsync::ingest::ConnectionRuntime::build_all(&config)
        .unwrap()
        .remove(0);
    let run = run_once(&remapped, &deps, false, &shutdown, &|_| {})
        .await
        .unwrap();
    assert_eq!(run.fetched, 0, "nothing read again: {run:?}");
    assert_eq!(
        deal("1001"),
        ("proposal".into(), "open".into(), entered),
        "in its stage since it entered the native stage"
    );
    let history: Vec<(Option<String>, String, String, i64)> = db()
        .prepare(
            "SELECT h.from_stage, h.to_stage, h.cause, h.at FROM stage_history h
             JOIN deals d ON d.id = h.deal_id WHERE d.external_id = '1001' ORDER BY h.id",
        )
        .unwrap()
        .query_map([], |row| {
            Ok((row.get(0)?, row.get(1)?, row.get(2)?, row.get(3)?))
        })
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(
        history,
        [
            (None, "unmapped".into(), "poll".into(), entered),
            (
                Some("unmapped".into()),
                "proposal".into(),
                "mapping".into(),
                entered
            ),
        ]
    );
    assert_eq!(
        deal("1002").0,
        "lead_qualification",
        "a mapped deal is left alone"
    );
    // Once moved, later runs find nothing to move.
    run_once(&remapped, &deps, false, &shutdown, &|_| {})
        .await
        .unwrap();
    let rows: i64 = db()
        .query_row("SELECT count(*) FROM stage_history", [], |row| row.get(0))
        .unwrap();
    assert_eq!(rows, 3);
}
