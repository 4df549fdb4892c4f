//! People across connections end to end: a HubSpot deal pulled from the mock API, a
//! Pipedrive deal pulled from its mock, Shopify carts posted as signed webhooks, the
//! real SMTP server; one person is capped, skipped and shown as one.

use crate::followups::{config, messages_to};
use crate::harness::daemon::{TestDaemon, run_cli};
use crate::harness::eventually;
use crate::harness::smtp::SmtpServer;
use crate::harness::vendors::hubspot::{HsDeal, HubSpot};
use crate::harness::vendors::pipedrive::{PdDeal, Pipedrive};
use crate::pull::hubspot_connection;
use crate::webhooks::{SHOP_SECRET, checkout, post, shopify, shopify_headers};
use serde_json::{Value, json};
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(30);
const API_TOKEN: &str = "people-token-0123456789abcdef";

/// A Shopify checkout by `email` who subscribed to marketing, updated now.
fn consenting_checkout(token: &str, email: &str) -> Vec<u8> {
    let now = chrono::Utc::now().to_rfc3339();
    let mut body: Value = serde_json::from_slice(&checkout(token, &now, email)).unwrap();
    body["buyer_accepts_marketing"] = json!(true);
    body["customer"]["email_marketing_consent"]["state"] = json!("subscribed");
    serde_json::to_vec(&body).unwrap()
}

async fn post_checkout(daemon: &TestDaemon, token: &str, email: &str) {
    let body = consenting_checkout(token, email);
    let headers = shopify_headers(SHOP_SECRET, "checkouts/create", token, &body);
    let (status, answer) = post(daemon, "shop", headers, body).await;
    assert_eq!(status, 200, "{answer}");
}

/// (connection, state, reason) of every outbox row, by id.
fn outbox(daemon: &TestDaemon) -> Vec<(String, String, Option<String>)> {
    let db = daemon.db_read_only();
    let mut statement = db
        .prepare(
            "SELECT d.connection, o.state, o.reason FROM outbox o
             JOIN deals d ON d.id = o.deal_id ORDER BY o.id",
        )
        .unwrap();
    statement
        .query_map([], |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap()
}

/// The (connection, external id) pairs of a JSON list of deals, sorted.
fn deal_ids(deals: &Value) -> Vec<(String, String)> {
    let mut ids: Vec<(String, String)> = deals
        .as_array()
        .expect("a list of deals")
        .iter()
        .map(|deal| {
            (
                deal["connection"].as_str().unwrap().to_owned(),
                deal["external_id"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    ids.sort();
    ids
}

#[tokio::test]
async fn one_person_with_a_hubspot_deal_and_a_shopify_cart_gets_one_capped_sequence_not_two() {
    let hubspot = HubSpot::start("pat-test", None).await;
    hubspot.put_contact(501, "Jane.Doe@Gmail.com", "Jane", "Doe");
    let mut deal = HsDeal::new(
        1001,
        "Jane's renewal",
        "appointmentscheduled",
        chrono::Utc::now().timestamp_millis() - 60_000,
    );
    deal.contact = Some(501);
    hubspot.put(deal);
    let smtp = SmtpServer::start().await;
    let rules = r#"
[followups.stalled]
kind = "transactional"
stage = "sales.lead_qualification"
template = "deal_stalled"
after = "100ms"
late_grace = "1d"

[followups.carts]
kind = "marketing"
stage = "ecommerce.cart_abandoned"
template = "cart_reminder"
after = "100ms"
"#;
    let body = format!(
        "api_token = \"{API_TOKEN}\"\n{}{}{}",
        config(&smtp, "max_per_recipient_per_day = 1", rules),
        hubspot_connection("hs", &hubspot.url(), ""),
        shopify("shop", "1s")
    );
    let daemon = TestDaemon::start(&body).await;
    eventually("the HubSpot deal with its contact", WAIT, || async {
        (daemon.count_read_only(
            "SELECT count(*) FROM deals WHERE connection = 'hs' AND contact_email IS NOT NULL",
        ) == 1)
            .then_some(())
    })
    .await;
    // The same person at the shop, with a tag Gmail ignores and another case.
    post_checkout(&daemon, "jane-cart", "jane.doe+shop@gmail.com").await;

    let rows = eventually(
        "one email sent and the other held by the cap",
        WAIT,
        || async {
            let rows = outbox(&daemon);
            let sent = rows.iter().filter(|r| r.1 == "sent").count();
            let capped = rows.iter().filter(|r| {
                r.1 == "pending" && r.2.as_deref().is_some_and(|t| t.contains("frequency cap"))
            });
            (rows.len() == 2 && sent == 1 && capped.count() == 1).then_some(rows)
        },
    )
    .await;
    let mut connections: Vec<&str> = rows.iter().map(|r| r.0.as_str()).collect();
    connections.sort();
    assert_eq!(connections, ["hs", "shop"], "one row per deal: {rows:?}");
    // Stored (and mailed) with its domain lowercased, its local part as given.
    let delivered = messages_to(&smtp, "Jane.Doe@gmail.com").len()
        + messages_to(&smtp, "jane.doe+shop@gmail.com").len();
    assert_eq!(
        delivered, 1,
        "one email for one person, not one per connection"
    );
    assert_eq!(smtp.messages().len(), 1);

    // `people show` and the read API tell the same story, from what the daemon wrote.
    let config_path = daemon.config_path.to_str().unwrap().to_owned();
    let (code, stdout, stderr) = run_cli(
        &[
            "--config",
            &config_path,
            "people",
            "show",
            " JANE.DOE@gmail.com",
            "--format",
            "json",
        ],
        &[],
    )
    .await;
    assert_eq!(code, 0, "{stderr}");
    let shown: Value = serde_json::from_str(&stdout).expect("people show --format json");
    assert_eq!(shown["key"], "jane.doe@gmail.com");
    assert_eq!(deal_ids(&shown["deals"]), [("hs".into(), "1001".into())]);
    let carts = deal_ids(&shown["carts"]);
    assert_eq!(carts.len(), 1);
    assert_eq!(carts[0].0, "shop");
    let mut states: Vec<&str> = shown["emails"]
        .as_array()
        .unwrap()
        .iter()
        .map(|row| row["state"].as_str().unwrap())
        .collect();
    states.sort();
    assert_eq!(states, ["pending", "sent"]);
    assert_eq!(shown["suppressions"], json!([]));

    let (code, table, stderr) = run_cli(
        &[
            "--config",
            &config_path,
            "people",
            "show",
            "jane.doe@gmail.com",
        ],
        &[],
    )
    .await;
    assert_eq!(code, 0, "{stderr}");
    assert!(table.contains("Person jane.doe@gmail.com"), "{table}");
    assert!(table.contains("Jane's renewal"), "{table}");
    assert!(table.contains("frequency cap"), "{table}");

    let (code, _, stderr) = run_cli(
        &["--config", &config_path, "people", "show", "not-an-address"],
        &[],
    )
    .await;
    assert_eq!(code, 2, "a usage error: {stderr}");
    assert!(stderr.contains("email address"), "{stderr}");

    let (code, listed, stderr) = run_cli(
        &[
            "--config",
            &config_path,
            "deals",
            "list",
            "--person",
            "jane.doe+crm@gmail.com",
            "--format",
            "json",
        ],
        &[],
    )
    .await;
    assert_eq!(code, 0, "{stderr}");
    let listed: Value = serde_json::from_str(&listed).unwrap();
    assert_eq!(deal_ids(&listed).len(), 2, "{listed}");

    let path = "/api/v1/people/Jane.Doe%2Bweb%40gmail.com";
    let anonymous = daemon.http.get(daemon.url(path)).send().await.unwrap();
    assert_eq!(anonymous.status().as_u16(), 401);
    let answer = daemon
        .http
        .get(daemon.url(path))
        .bearer_auth(API_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status().as_u16(), 200);
    let api: Value = answer.json().await.unwrap();
    assert_eq!(api["key"], shown["key"]);
    assert_eq!(deal_ids(&api["deals"]), deal_ids(&shown["deals"]));
    assert_eq!(deal_ids(&api["carts"]), deal_ids(&shown["carts"]));
    assert_eq!(api["emails"].as_array().unwrap().len(), 2);
    let answer = daemon
        .http
        .get(daemon.url("/api/v1/deals?company=gmail.com"))
        .bearer_auth(API_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status().as_u16(), 400, "free mail names no company");
}

#[tokio::test]
async fn a_person_in_negotiation_in_pipedrive_gets_no_cart_email_when_the_rule_says_so() {
    let pipedrive = Pipedrive::start("pd-token").await;
    pipedrive.put_person(301, "Jane Roe", "jane.roe@acme.example");
    let mut deal = PdDeal::new(
        21,
        "Acme rollout",
        5, // "Negotiations Started": sales.negotiation
        chrono::Utc::now() - chrono::Duration::minutes(5),
    );
    deal.person_id = Some(301);
    pipedrive.put(deal);
    let smtp = SmtpServer::start().await;
    let rules = r#"
[followups.carts]
kind = "marketing"
stage = "ecommerce.cart_abandoned"
template = "cart_reminder"
after = "100ms"
skip_if_open_in = ["sales.negotiation"]

[followups.later]
kind = "marketing"
stage = "ecommerce.cart_abandoned"
template = "cart_reminder"
after = "1h"
skip_if_open_in = ["sales.negotiation"]
"#;
    let body = format!(
        "{}{}{}",
        config(&smtp, "", rules),
        format_args!(
            r#"
[connections.pd]
connector = "pipedrive"
base_url = "{}"
token = "pd-token"
poll_interval = "1s"
rate_limit = {{ requests_per_second = 200.0, burst = 50 }}
"#,
            pipedrive.url()
        ),
        shopify("shop", "1s")
    );
    let daemon = TestDaemon::start(&body).await;
    eventually("the Pipedrive deal in negotiation", WAIT, || async {
        (daemon.count_read_only(
            "SELECT count(*) FROM deals WHERE connection = 'pd' AND stage = 'negotiation'
             AND contact_email = 'jane.roe@acme.example'",
        ) == 1)
            .then_some(())
    })
    .await;
    post_checkout(&daemon, "jane-cart", "Jane.Roe@ACME.example").await;
    post_checkout(&daemon, "bob-cart", "bob@globex.example").await;

    // Bob, in no negotiation anywhere, gets his email: the worker ran for both carts.
    eventually("Bob's cart email", WAIT, || async {
        (messages_to(&smtp, "bob@globex.example").len() == 1).then_some(())
    })
    .await;
    let reason = eventually("Jane's cart email stopped", WAIT, || async {
        outbox(&daemon)
            .into_iter()
            .find(|row| row.1 == "skipped")
            .and_then(|row| row.2)
    })
    .await;
    assert!(
        reason.contains("open deal in sales.negotiation") && reason.contains("connection pd"),
        "{reason}"
    );
    assert!(messages_to(&smtp, "Jane.Roe@acme.example").is_empty());
    assert!(messages_to(&smtp, "jane.roe@acme.example").is_empty());
    assert_eq!(smtp.messages().len(), 1);

    // `deals show` explains the later rule, still pending, with the same decision.
    let cart: i64 = daemon
        .db_read_only()
        .query_row(
            "SELECT id FROM deals WHERE connection = 'shop' AND contact_email = 'Jane.Roe@acme.example'",
            [],
            |row| row.get(0),
        )
        .unwrap();
    let config_path = daemon.config_path.to_str().unwrap().to_owned();
    let (code, stdout, stderr) = run_cli(
        &[
            "--config",
            &config_path,
            "deals",
            "show",
            &cart.to_string(),
            "--format",
            "json",
        ],
        &[],
    )
    .await;
    assert_eq!(code, 0, "{stderr}");
    let view: Value = serde_json::from_str(&stdout).unwrap();
    let later = view["followups"]
        .as_array()
        .unwrap()
        .iter()
        .find(|decision| decision["rule"] == "later")
        .expect("the later rule's decision");
    assert_eq!(later["verdict"], "stopped", "{later}");
    let reason = later["reason"].as_str().unwrap();
    assert!(
        reason.contains("open deal in sales.negotiation (deal") && reason.contains("connection pd"),
        "{reason}"
    );
}

#[tokio::test]
async fn check_names_an_unknown_stage_in_skip_if_open_in() {
    let smtp = SmtpServer::start().await;
    let rules = r#"
[followups.carts]
kind = "marketing"
stage = "ecommerce.cart_abandoned"
template = "cart_reminder"
after = "1h"
skip_if_open_in = ["sales.negotiation", "sales.haggling"]
"#;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("dealsync.toml");
    std::fs::write(
        &path,
        format!(
            "[storage]\npath = \"{}\"\n{}",
            dir.path().join("d.db").display(),
            config(&smtp, "", rules)
        ),
    )
    .unwrap();
    let (code, _, stderr) = run_cli(&["--config", path.to_str().unwrap(), "check"], &[]).await;
    assert_eq!(code, 78, "{stderr}");
    assert!(
        stderr.contains("followups.carts.skip_if_open_in"),
        "{stderr}"
    );
    assert!(stderr.contains("haggling"), "{stderr}");
}

/// A Salesforce opportunity whose Account has a website links to that company, even
/// when its contact writes from free mail; one without an Account links by the
/// contact's domain. `deals list --company` lists what the daemon stored.
#[tokio::test]
async fn a_salesforce_accounts_website_names_the_company_over_the_contacts_domain() {
    use crate::harness::vendors::salesforce::{Salesforce, SfOpp};
    let salesforce = Salesforce::start("refresh-0", 10).await;
    let at = chrono::TimeZone::with_ymd_and_hms(&chrono::Utc, 2026, 1, 12, 10, 0, 0).unwrap();
    let mut account = SfOpp::new("006A1", "Acme expansion", "Prospecting", at);
    account.contact = Some(("ann.founder@gmail.com".into(), "Ann".into()));
    account.website = Some("https://www.Acme.example/about".into());
    salesforce.put(account);
    let mut no_account = SfOpp::new("006A2", "Globex pilot", "Prospecting", at);
    no_account.contact = Some(("bob@globex.example".into(), "Bob".into()));
    salesforce.put(no_account);
    let daemon =
        TestDaemon::start(&crate::pull::salesforce_connection("sf", &salesforce.url())).await;
    let config_path = daemon.config_path.to_str().unwrap().to_owned();
    let list = |company: &'static str| {
        let config_path = config_path.clone();
        async move {
            let args = [
                "--config",
                &config_path,
                "deals",
                "list",
                "--company",
                company,
                "--format",
                "json",
            ];
            let (code, stdout, stderr) = run_cli(&args, &[]).await;
            assert_eq!(code, 0, "{stderr}");
            let listed: Value = serde_json::from_str(&stdout).unwrap();
            listed
                .as_array()
                .unwrap()
                .iter()
                .map(|deal| deal["external_id"].as_str().unwrap().to_owned())
                .collect::<Vec<_>>()
        }
    };
    let acme = eventually(
        "the opportunities stored",
        Duration::from_secs(30),
        || async {
            let acme = list("acme.example").await;
            (!acme.is_empty() && !list("globex.example").await.is_empty()).then_some(acme)
        },
    )
    .await;
    assert_eq!(acme, ["006A1"]);
    assert_eq!(list("globex.example").await, ["006A2"]);
    assert!(
        list("www.acme.example").await == ["006A1"],
        "the same domain as typed with www"
    );
}
