//! The promises on the shipped connectors' real field shapes: owner alerts reach the
//! owner's address from the vendor's owners or users API, consent is read from every
//! source, amounts keep their currency, mapping changes move stored deals, and step
//! numbers agree everywhere. Mocks answer in the shapes of tests/fixtures (see
//! PROVENANCE.md); email goes to the real SMTP test server.

use crate::harness::daemon::{TestDaemon, run_cli};
use crate::harness::eventually;
use crate::harness::smtp::{ReceivedMail, SmtpServer};
use crate::harness::vendors::hubspot::{HsDeal, HubSpot};
use crate::harness::vendors::pipedrive::{PdDeal, Pipedrive};
use std::time::Duration;

const TEMPLATES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/config/templates");
const WAIT: Duration = Duration::from_secs(30);

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// `[email]` sending to `smtp` at test pace.
fn email(smtp: &SmtpServer) -> String {
    format!(
        r#"
[email]
transport = "smtp"
url = "{url}"
from = "Sales Desk <desk@example.com>"
templates = "{TEMPLATES}"
unsubscribe_secret = "test-unsubscribe-secret-0123"
enroll_interval = "100ms"
retry_initial = "200ms"
retry_max = "1s"
"#,
        url = smtp.url()
    )
}

fn hubspot_connection(url: &str) -> String {
    format!(
        r#"
[connections.hs]
connector = "hubspot"
base_url = "{url}"
token = "pat-test"
poll_interval = "1s"
page_size = 2
lookback = "1s"
rate_limit = {{ requests_per_second = 200.0, burst = 50 }}
"#
    )
}

fn pipedrive_connection(url: &str) -> String {
    format!(
        r#"
[connections.pd]
connector = "pipedrive"
base_url = "{url}"
token = "pd-test"
poll_interval = "1s"
lookback = "1s"
rate_limit = {{ requests_per_second = 200.0, burst = 50 }}
"#
    )
}

/// A stall alert to the deal's owner, due a second after the deal entered proposal.
const STALLED_TO_OWNER: &str = r#"
[followups.stalled]
kind = "transactional"
stage = "sales.proposal"
to = "owner"
template = "deal_stalled"
after = "1s"
"#;

fn messages_to(smtp: &SmtpServer, address: &str) -> Vec<ReceivedMail> {
    smtp.messages()
        .into_iter()
        .filter(|mail| mail.rcpt_to.iter().any(|to| to == address))
        .collect()
}

fn successful_runs(daemon: &TestDaemon, connection: &str) -> i64 {
    daemon.count(&format!(
        "SELECT count(*) FROM sync_runs WHERE connection = '{connection}' AND status = 'succeeded'"
    ))
}

/// (external id, state, reason) of every email row of a rule, by external id and step.
fn outbox_of(daemon: &TestDaemon, rule: &str) -> Vec<(String, String, Option<String>)> {
    let db = daemon.db();
    let mut statement = db
        .prepare(
            "SELECT d.external_id, o.state, o.reason FROM outbox o JOIN deals d ON d.id = o.deal_id
             WHERE o.rule = ?1 AND o.action = 'email' ORDER BY d.external_id, o.step",
        )
        .unwrap();
    statement
        .query_map([rule], |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap()
}

#[tokio::test]
async fn a_stalled_hubspot_deal_alerts_its_owner_at_the_address_from_the_owners_api() {
    let smtp = SmtpServer::start().await;
    let hubspot = HubSpot::start("pat-test", None).await;
    let entered = now_ms() - 3_600_000;
    // Owners 6166860 (jsmith@example.com) and 6166861 (mlee@example.com) are the
    // fixture's; 110 more put the last one on the list's second page of 100.
    for n in 0..110 {
        hubspot.put_owner(
            &format!("700{n:03}"),
            &format!("rep{n}@example.com"),
            "Rep",
            &n.to_string(),
        );
    }
    for (id, owner) in [
        (1, "6166860"),
        (2, "6166861"),
        (3, "6166860"),
        (4, "6166861"),
        (5, "700109"),
    ] {
        let mut deal = HsDeal::new(
            id,
            &format!("Deal {id}"),
            "presentationscheduled",
            entered + id as i64,
        );
        deal.owner = Some(owner.to_owned());
        hubspot.put(deal);
    }
    let daemon = TestDaemon::start(&format!(
        "{}{}{STALLED_TO_OWNER}",
        email(&smtp),
        hubspot_connection(&hubspot.url())
    ))
    .await;

    let alerts = eventually("the owners' stall alerts", WAIT, || async {
        let first = messages_to(&smtp, "jsmith@example.com");
        let second = messages_to(&smtp, "mlee@example.com");
        let last = messages_to(&smtp, "rep109@example.com");
        (first.len() == 2 && second.len() == 2 && last.len() == 1).then_some((first, second))
    })
    .await;
    assert!(alerts.0[0].data.contains("Deal "), "{}", alerts.0[0].data);
    // Later runs find the owners kept from the first: one read of the list (its two
    // pages of 100), however many deal pages and runs.
    eventually("three more sync runs", WAIT, || async {
        (successful_runs(&daemon, "hs") >= 4).then_some(())
    })
    .await;
    let owner_requests: Vec<String> = hubspot
        .faults()
        .seen()
        .into_iter()
        .filter(|line| line.contains("/crm/v3/owners"))
        .collect();
    assert_eq!(
        owner_requests,
        [
            "GET /crm/v3/owners?limit=100",
            "GET /crm/v3/owners?limit=100&after=100"
        ]
    );
    assert_eq!(smtp.messages().len(), 5, "one alert per deal, none twice");
    let emails: Vec<(String, Option<String>)> = {
        let db = daemon.db();
        let mut statement = db
            .prepare("SELECT external_id, owner_email FROM deals ORDER BY external_id")
            .unwrap();
        statement
            .query_map([], |row| Ok((row.get(0)?, row.get(1)?)))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap()
    };
    assert_eq!(emails[1], ("2".into(), Some("mlee@example.com".into())));
}

#[tokio::test]
async fn a_stalled_pipedrive_deal_alerts_its_owner_at_the_address_from_the_users_api() {
    let smtp = SmtpServer::start().await;
    let pipedrive = Pipedrive::start("pd-test").await;
    let entered = chrono::Utc::now() - chrono::Duration::hours(1);
    // Stage 4 is "Proposal Made" (→ sales.proposal). User 1234 is the fixture's active
    // Anna; 1235, Ben, is deactivated (`active_flag: false`): no alert goes to him.
    let mut anna = PdDeal::new(11, "Anna's deal", 4, entered);
    anna.owner_id = 1234;
    let mut ben = PdDeal::new(12, "Ben's deal", 4, entered);
    ben.owner_id = 1235;
    pipedrive.put(anna);
    pipedrive.put(ben);
    let daemon = TestDaemon::start(&format!(
        "{}{}{STALLED_TO_OWNER}",
        email(&smtp),
        pipedrive_connection(&pipedrive.url())
    ))
    .await;

    let alert = eventually("Anna's stall alert", WAIT, || async {
        messages_to(&smtp, "anna@acme.example").into_iter().next()
    })
    .await;
    assert!(alert.data.contains("Anna's deal"), "{}", alert.data);
    let rows = eventually("both deals decided", WAIT, || async {
        let rows = outbox_of(&daemon, "stalled");
        (rows.len() == 2
            && rows
                .iter()
                .all(|(_, state, _)| state != "pending" && state != "sending"))
        .then_some(rows)
    })
    .await;
    assert_eq!(rows[0].1, "sent");
    assert_eq!(rows[1].1, "skipped", "{rows:?}");
    assert_eq!(
        rows[1].2.as_deref(),
        Some("the deal has no owner email address")
    );
    assert!(messages_to(&smtp, "ben@acme.example").is_empty());
    eventually("two more sync runs", WAIT, || async {
        (successful_runs(&daemon, "pd") >= 3).then_some(())
    })
    .await;
    // Both users are kept for a day (Ben as deactivated): one read of the list.
    assert_eq!(pipedrive.faults().count("/v1/users"), 1);
}

#[tokio::test]
async fn check_warns_when_a_rule_sends_to_owners_a_connection_cannot_name() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("dealsync.toml");
    std::fs::write(
        &config,
        format!(
            r#"
[storage]
path = "{db}"
[email]
transport = "file"
dir = "{out}"
from = "desk@example.com"
templates = "{TEMPLATES}"
{STALLED_TO_OWNER}
[connections.crm]
connector = "webhook"
pipeline = "sales"
webhook_secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"

[connections.hs]
connector = "hubspot"
token = "pat-test"
"#,
            db = dir.path().join("d.db").display(),
            out = dir.path().join("out").display()
        ),
    )
    .unwrap();
    let (code, stdout, stderr) =
        run_cli(&["--config", config.to_str().unwrap(), "check"], &[]).await;
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stdout.contains("warning: follow-up stalled sends to the owner, but connection crm (webhook) gives no owner email"),
        "{stdout}"
    );
    assert!(
        !stdout.contains("connection hs (hubspot) gives no owner email"),
        "{stdout}"
    );
}

/// A two-step marketing sequence to the contact of a deal in proposal.
const NURTURE: &str = r#"
[followups.nurture]
kind = "marketing"
stage = "sales.proposal"
to = "contact"
steps = [
  { after = "1s", template = "post_sale" },
  { after = "8s", template = "post_sale" },
]
"#;

#[tokio::test]
async fn a_consenting_hubspot_contact_gets_the_marketing_step_and_an_opt_out_at_the_source_stops_the_next()
 {
    let smtp = SmtpServer::start().await;
    let hubspot = HubSpot::start("pat-test", None).await;
    let now = now_ms();
    // Contact 501 may be mailed ("Unsubscribed from all email": "false"), 502 has
    // unsubscribed, 503 never said anything.
    for (deal, contact, email, optout) in [
        (1, 501, "yes@example.com", Some("false")),
        (2, 502, "no@example.com", Some("true")),
        (3, 503, "silent@example.com", None),
    ] {
        hubspot.put_contact(contact, email, "Pat", "Example");
        if let Some(optout) = optout {
            hubspot.set_optout(contact, optout);
        }
        let mut record = HsDeal::new(
            deal,
            &format!("Deal {deal}"),
            "presentationscheduled",
            now + deal as i64,
        );
        record.contact = Some(contact);
        hubspot.put(record);
    }
    let daemon = TestDaemon::start(&format!(
        "{}{}{NURTURE}",
        email(&smtp),
        hubspot_connection(&hubspot.url())
    ))
    .await;

    eventually("the first step to the consenting contact", WAIT, || async {
        (messages_to(&smtp, "yes@example.com").len() == 1).then_some(())
    })
    .await;
    // The contact unsubscribes in HubSpot; the deal record itself does not change.
    hubspot.set_optout(501, "true");
    let rows = eventually("every step decided", WAIT, || async {
        let rows = outbox_of(&daemon, "nurture");
        (rows.len() == 6
            && rows
                .iter()
                .all(|(_, state, _)| state != "pending" && state != "sending"))
        .then_some(rows)
    })
    .await;
    assert_eq!(messages_to(&smtp, "yes@example.com").len(), 1, "{rows:?}");
    assert!(messages_to(&smtp, "no@example.com").is_empty());
    assert!(messages_to(&smtp, "silent@example.com").is_empty());
    assert_eq!(rows[0].1, "sent");
    assert_eq!(
        (rows[1].1.as_str(), rows[1].2.as_deref()),
        (
            "skipped",
            Some("the contact declined marketing email in the source")
        ),
        "{rows:?}"
    );
    assert_eq!(
        rows[2].2.as_deref(),
        Some("the contact declined marketing email in the source")
    );
    assert_eq!(
        rows[4].2.as_deref(),
        Some("the source records no marketing consent for the contact")
    );
    let consent: Option<bool> = daemon
        .db()
        .query_row(
            "SELECT marketing_consent FROM deals WHERE external_id = '1'",
            [],
            |row| row.get(0),
        )
        .unwrap();
    assert_eq!(consent, Some(false), "the re-read stored the opt-out");
}

/// While the source cannot be read to confirm consent, a marketing step waits (and
/// says why); once it is later than its rule's late grace, it is skipped. Never sent
/// on the strength of an old read.
#[tokio::test]
async fn a_marketing_step_whose_consent_cannot_be_read_again_waits_then_is_skipped_after_the_grace()
{
    use crate::harness::vendors::Fault;
    let smtp = SmtpServer::start().await;
    let hubspot = HubSpot::start("pat-test", None).await;
    hubspot.put_contact(501, "yes@example.com", "Pat", "Example");
    hubspot.set_optout(501, "false");
    let mut record = HsDeal::new(1, "Deal 1", "presentationscheduled", now_ms());
    record.contact = Some(501);
    hubspot.put(record);
    // Two rules on the same deal: one whose grace passes during the test, one whose
    // grace (an hour) cannot.
    let rules = r#"
[followups.brief]
kind = "marketing"
stage = "sales.proposal"
to = "contact"
late_grace = "2s"
steps = [{ after = "5s", template = "post_sale" }]

[followups.patient]
kind = "marketing"
stage = "sales.proposal"
to = "contact"
late_grace = "1h"
steps = [{ after = "5s", template = "post_sale" }]
"#;
    let daemon = TestDaemon::start(&format!(
        "{}{}{rules}",
        email(&smtp),
        hubspot_connection(&hubspot.url())
    ))
    .await;
    // Once the deal is synced, every read of HubSpot's CRM fails (the steps are due
    // five seconds after the deal entered the stage).
    eventually("the deal synced", WAIT, || async {
        (outbox_of(&daemon, "brief").len() == 1).then_some(())
    })
    .await;
    let down = Fault::Status(500, vec![], "{}".into());
    hubspot.faults().every("/crm/", vec![(1, down)]);
    let skipped = eventually("the brief rule's step skipped", WAIT, || async {
        outbox_of(&daemon, "brief")
            .into_iter()
            .find(|(_, state, _)| state == "skipped")
    })
    .await;
    let reason = skipped.2.unwrap_or_default();
    assert!(
        reason.contains("consent could not be confirmed at the source within the late grace"),
        "{reason}"
    );
    // Past the brief rule's grace, the patient rule's step still waits, saying why.
    let patient = outbox_of(&daemon, "patient");
    assert_eq!(patient.len(), 1, "{patient:?}");
    assert_eq!(patient[0].1, "pending", "{patient:?}");
    let waiting = patient[0].2.clone().unwrap_or_default();
    assert!(
        waiting.contains("confirming consent at the source"),
        "{waiting}"
    );
    // The wait runs forward: the step is put off to a time after the deferral was
    // written, not tried again at once.
    let (next, written): (i64, i64) = daemon
        .db()
        .query_row(
            "SELECT next_attempt_at, updated_at FROM outbox
             WHERE rule = 'patient' AND action = 'email'",
            [],
            |row| Ok((row.get(0)?, row.get(1)?)),
        )
        .unwrap();
    assert!(next > written, "put off to {next}, written at {written}");
    assert!(smtp.messages().is_empty());
}

const WOO_SECRET: &str = "woo-secret";

/// The order-meta fixture as a pending order of `email`, modified now, with the
/// Mailchimp opt-in checkbox set to `subscribed` ("1" or "0").
fn woo_order(
    id: u64,
    email: &str,
    subscribed: &str,
    modified: chrono::DateTime<chrono::Utc>,
) -> serde_json::Value {
    let mut order: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(format!(
            "{}/tests/fixtures/woocommerce/order-meta-data-consent.json",
            env!("CARGO_MANIFEST_DIR")
        ))
        .unwrap(),
    )
    .unwrap();
    order.as_object_mut().unwrap().remove("_note");
    order["id"] = serde_json::json!(id);
    order["status"] = serde_json::json!("pending");
    order["currency"] = serde_json::json!("EUR");
    order["total"] = serde_json::json!("42.00");
    order["order_key"] = serde_json::json!(format!("wc_order_{id}"));
    order["billing"]["email"] = serde_json::json!(email);
    order["date_created_gmt"] = serde_json::json!(modified.format("%Y-%m-%dT%H:%M:%S").to_string());
    order["date_modified_gmt"] =
        serde_json::json!(modified.format("%Y-%m-%dT%H:%M:%S").to_string());
    order["meta_data"][0]["value"] = serde_json::json!(subscribed);
    order
}

async fn post_woo(
    daemon: &TestDaemon,
    connection: &str,
    delivery: &str,
    order: &serde_json::Value,
) {
    use dealsync::connectors::signature::{self, Delivery, Scheme};
    let body = serde_json::to_vec(order).unwrap();
    let mut headers = signature::sign(
        &Scheme::WooCommerce,
        WOO_SECRET.as_bytes(),
        &Delivery {
            method: "POST",
            uri: "",
            body: &body,
            id: delivery,
        },
        std::time::SystemTime::now(),
    )
    .unwrap();
    headers.insert("x-wc-webhook-topic", "order.updated".parse().unwrap());
    let response = daemon
        .http
        .post(daemon.url(&format!("/webhooks/{connection}")))
        .headers(headers)
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 200);
}

#[tokio::test]
async fn a_consenting_woocommerce_shopper_gets_the_cart_step_and_an_opt_out_in_an_order_update_stops_the_next()
 {
    let smtp = SmtpServer::start().await;
    let daemon = TestDaemon::start(&format!(
        r#"{}
[connections.woo]
connector = "woocommerce"
webhook_secret = "{WOO_SECRET}"
abandon_after = "1s"

[followups.carts]
kind = "marketing"
stage = "ecommerce.cart_abandoned"
steps = [
  {{ after = "1s", template = "cart_reminder" }},
  {{ after = "8s", template = "cart_reminder" }},
]
"#,
        email(&smtp)
    ))
    .await;
    let now = chrono::Utc::now();
    post_woo(
        &daemon,
        "woo",
        "d-1",
        &woo_order(801, "yes@shop.example", "1", now),
    )
    .await;
    post_woo(
        &daemon,
        "woo",
        "d-2",
        &woo_order(802, "no@shop.example", "0", now),
    )
    .await;

    eventually(
        "the first reminder to the consenting shopper",
        WAIT,
        || async { (messages_to(&smtp, "yes@shop.example").len() == 1).then_some(()) },
    )
    .await;
    // The shopper unticks Mailchimp's box; WooCommerce sends the order again.
    let later = now + chrono::Duration::seconds(2);
    post_woo(
        &daemon,
        "woo",
        "d-3",
        &woo_order(801, "yes@shop.example", "0", later),
    )
    .await;
    let rows = eventually("every step decided", WAIT, || async {
        let rows = outbox_of(&daemon, "carts");
        (rows.len() == 4
            && rows
                .iter()
                .all(|(_, state, _)| state != "pending" && state != "sending"))
        .then_some(rows)
    })
    .await;
    assert_eq!(messages_to(&smtp, "yes@shop.example").len(), 1, "{rows:?}");
    assert!(messages_to(&smtp, "no@shop.example").is_empty(), "{rows:?}");
    assert_eq!(rows[0].1, "sent");
    assert_eq!(
        rows[1].2.as_deref(),
        Some("the contact declined marketing email in the source"),
        "{rows:?}"
    );
    assert_eq!(
        rows[2].2.as_deref(),
        Some("the contact declined marketing email in the source"),
        "{rows:?}"
    );
}

#[tokio::test]
async fn a_subscribed_pipedrive_person_gets_the_marketing_step_until_unsubscribed_at_the_source() {
    let smtp = SmtpServer::start().await;
    let pipedrive = Pipedrive::start("pd-test").await;
    let entered = chrono::Utc::now();
    for (deal, person, email, status) in [
        (21, 501, "jane@example.com", "subscribed"),
        (22, 502, "omar@example.org", "no_consent"),
    ] {
        pipedrive.put_person(person, "Person", email);
        pipedrive.set_marketing_status(person, status);
        let mut record = PdDeal::new(deal, &format!("Deal {deal}"), 4, entered);
        record.person_id = Some(person);
        pipedrive.put(record);
    }
    let daemon = TestDaemon::start(&format!(
        "{}{}{NURTURE}",
        email(&smtp),
        pipedrive_connection(&pipedrive.url())
    ))
    .await;
    eventually("the first step to the subscribed person", WAIT, || async {
        (messages_to(&smtp, "jane@example.com").len() == 1).then_some(())
    })
    .await;
    pipedrive.set_marketing_status(501, "unsubscribed");
    let rows = eventually("every step decided", WAIT, || async {
        let rows = outbox_of(&daemon, "nurture");
        (rows.len() == 4
            && rows
                .iter()
                .all(|(_, state, _)| state != "pending" && state != "sending"))
        .then_some(rows)
    })
    .await;
    assert_eq!(messages_to(&smtp, "jane@example.com").len(), 1, "{rows:?}");
    assert!(messages_to(&smtp, "omar@example.org").is_empty());
    assert_eq!(
        rows[1].2.as_deref(),
        Some("the contact declined marketing email in the source"),
        "{rows:?}"
    );
    assert_eq!(
        rows[2].2.as_deref(),
        Some("the contact declined marketing email in the source"),
        "{rows:?}"
    );
}

fn salesforce_connection(name: &str, url: &str, extra: &str) -> String {
    format!(
        r#"
[connections.{name}]
connector = "salesforce"
poll_interval = "1s"
lookback = "30s"
rate_limit = {{ requests_per_second = 200.0, burst = 50 }}
{extra}

[connections.{name}.oauth]
client_id = "sf-client"
client_secret = "sf-secret"
token_url = "{url}/services/oauth2/token"
refresh_token = "refresh-0"
"#
    )
}

/// (external id, amount in minor units, currency) of a connection's deals.
fn amounts(daemon: &TestDaemon, connection: &str) -> Vec<(String, i64, String)> {
    let db = daemon.db();
    let mut statement = db
        .prepare(
            "SELECT external_id, amount_minor, currency FROM deals WHERE connection = ?1
             ORDER BY external_id",
        )
        .unwrap();
    statement
        .query_map([connection], |row| {
            Ok((row.get(0)?, row.get(1)?, row.get(2)?))
        })
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap()
}

#[tokio::test]
async fn a_salesforce_eur_opportunity_is_stored_and_forecast_in_eur_and_a_single_currency_org_still_syncs()
 {
    use crate::harness::vendors::salesforce::{Salesforce, SfOpp};
    use std::sync::atomic::Ordering;
    let at = chrono::Utc::now() - chrono::Duration::hours(1);
    let multi = Salesforce::start("refresh-0", 100).await;
    let mut euro = SfOpp::new("006E1", "Euro deal", "Negotiation/Review", at);
    euro.currency = "EUR".into();
    euro.amount = 4200.5;
    multi.put(euro);
    multi.put(SfOpp::new("006U1", "Dollar deal", "Negotiation/Review", at));
    let single = Salesforce::start("refresh-0", 100).await;
    single.state.multi_currency.store(false, Ordering::SeqCst);
    single.put(SfOpp::new("006S1", "Pound deal", "Negotiation/Review", at));
    let daemon = TestDaemon::start(&format!(
        "{}{}",
        salesforce_connection("multi", &multi.url(), ""),
        salesforce_connection(
            "single",
            &single.url(),
            "settings = { default_currency = \"GBP\" }"
        )
    ))
    .await;

    let stored = eventually("both orgs synced", WAIT, || async {
        let multi = amounts(&daemon, "multi");
        let single = amounts(&daemon, "single");
        (multi.len() == 2 && single.len() == 1).then_some((multi, single))
    })
    .await;
    assert_eq!(
        stored.0,
        [
            ("006E1".to_owned(), 420050, "EUR".to_owned()),
            ("006U1".to_owned(), 1500000, "USD".to_owned())
        ]
    );
    assert_eq!(stored.1, [("006S1".to_owned(), 1500000, "GBP".to_owned())]);
    // The single-currency org refused the field once; later queries leave it out.
    eventually("more runs of the single-currency org", WAIT, || async {
        (successful_runs(&daemon, "single") >= 3).then_some(())
    })
    .await;
    assert_eq!(single.state.invalid_field.load(Ordering::SeqCst), 1);

    let (code, stdout, stderr) = run_cli(
        &[
            "--config",
            daemon.config_path.to_str().unwrap(),
            "report",
            "--connection",
            "multi",
            "--format",
            "json",
        ],
        &[],
    )
    .await;
    assert_eq!(code, 0, "{stderr}");
    let report: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    let euros: Vec<&serde_json::Value> = report["total"]["forecast"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|row| row["currency"] == "EUR")
        .collect();
    assert_eq!(euros.len(), 1, "{}", report["total"]["forecast"]);
    assert_eq!(euros[0]["amount"]["amount"], "4200.50");
    assert_eq!(euros[0]["amount"]["currency"], "EUR");
}

/// A Close-like CRM whose opportunity `value` is an integer in cents: the worked example
/// of docs/connectors.md ("Amounts in minor units"), word for word.
const CENTS_MANIFEST: &str = r#"
name = "closecrm"
base_url = "https://api.close.com"
default_pipeline = "sales"

[auth]
kind = "basic"

[deals]
page_size = 100
modified = { path = "/date_updated", type = "timestamp" }

[deals.full]
path = "/api/v1/opportunity/"
records = "/data"
pagination = { kind = "offset", param = "_skip", has_more = "/has_more" }
query = { _limit = "{page_size}" }

[deals.fields]
external_id = "/id"
title = "/note"
amount = { path = "/value", type = "minor_units" }
currency = "/value_currency"
native_pipeline = { value = "opportunities" }
native_stage = "/status_label"
status = { path = "/status_type", type = "enum", map = { active = "open", won = "won", lost = "lost" } }
created_at = { path = "/date_created", type = "timestamp" }

[default_mappings.opportunities]
"Demo Completed" = "sales.proposal"
"#;

#[tokio::test]
async fn a_cents_based_manifest_crm_stores_12400_as_124_00() {
    use serde_json::json;
    let opportunities = json!({"data": [
        {"id": "oppo_1", "note": "Renewal", "value": 12400, "value_currency": "EUR",
         "status_label": "Demo Completed", "status_type": "active",
         "date_created": "2026-01-05T09:00:00.000000+00:00", "date_updated": "2026-01-10T09:00:00.000000+00:00"},
        {"id": "oppo_2", "note": "Odd cents", "value": "99", "value_currency": "USD",
         "status_label": "Demo Completed", "status_type": "active",
         "date_created": "2026-01-05T09:00:00.000000+00:00", "date_updated": "2026-01-10T09:00:01.000000+00:00"},
        {"id": "oppo_3", "note": "Not cents", "value": 12.5, "value_currency": "USD",
         "status_label": "Demo Completed", "status_type": "active",
         "date_created": "2026-01-05T09:00:00.000000+00:00", "date_updated": "2026-01-10T09:00:02.000000+00:00"}
    ], "has_more": false});
    let router = axum::Router::new().route(
        "/api/v1/opportunity/",
        axum::routing::get(move || {
            let body = opportunities.clone();
            async move { axum::Json(body) }
        }),
    );
    let mock = crate::harness::vendors::serve(router).await;
    let connectors = tempfile::tempdir().unwrap();
    std::fs::write(connectors.path().join("closecrm.toml"), CENTS_MANIFEST).unwrap();
    let daemon = TestDaemon::start(&format!(
        "[connectors]\ndir = \"{}\"\n\n[connections.close]\nconnector = \"closecrm\"\nbase_url = \"{}\"\nusername = \"api_key\"\npassword = \"\"\npoll_interval = \"1h\"\n",
        connectors.path().display(),
        mock.url()
    ))
    .await;
    let stored = eventually("two cents deals and a quarantined one", WAIT, || async {
        let stored = amounts(&daemon, "close");
        (stored.len() == 2 && daemon.count("SELECT count(*) FROM quarantine") == 1)
            .then_some(stored)
    })
    .await;
    assert_eq!(
        stored,
        [
            ("oppo_1".to_owned(), 12400, "EUR".to_owned()),
            ("oppo_2".to_owned(), 99, "USD".to_owned())
        ]
    );
    let reason: String = daemon
        .db()
        .query_row("SELECT error FROM quarantine", [], |row| row.get(0))
        .unwrap();
    assert!(
        reason.contains("not a whole number of minor units"),
        "{reason}"
    );
    let (code, stdout, stderr) = run_cli(
        &[
            "--config",
            daemon.config_path.to_str().unwrap(),
            "report",
            "--format",
            "json",
        ],
        &[],
    )
    .await;
    assert_eq!(code, 0, "{stderr}");
    let report: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    let proposal = report["total"]["pipelines"][0]["stages"]
        .as_array()
        .unwrap()
        .iter()
        .find(|stage| stage["stage"] == "proposal")
        .unwrap()
        .clone();
    assert_eq!(
        proposal["open_value"],
        json!([
            {"currency": "EUR", "minor": 12400, "amount": "124.00"},
            {"currency": "USD", "minor": 99, "amount": "0.99"}
        ])
    );
}

/// A deal's (from, to) stage pairs of its `mapping` history rows.
type Moves = Vec<(String, String)>;

/// (external id, stage, mapping history rows) of a connection's deals.
fn mapping_history(daemon: &TestDaemon, connection: &str) -> Vec<(String, String, Moves)> {
    let db = daemon.db();
    let mut statement = db
        .prepare(
            "SELECT id, external_id, stage FROM deals WHERE connection = ?1 ORDER BY external_id",
        )
        .unwrap();
    let deals: Vec<(i64, String, String)> = statement
        .query_map([connection], |row| {
            Ok((row.get(0)?, row.get(1)?, row.get(2)?))
        })
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    deals
        .into_iter()
        .map(|(id, external_id, stage)| {
            let mut rows = db
                .prepare("SELECT from_stage, to_stage FROM stage_history WHERE deal_id = ?1 AND cause = 'mapping' ORDER BY id")
                .unwrap();
            let moves = rows
                .query_map([id], |row| Ok((row.get(0)?, row.get(1)?)))
                .unwrap()
                .collect::<Result<_, _>>()
                .unwrap();
            (external_id, stage, moves)
        })
        .collect()
}

#[tokio::test]
async fn a_changed_stage_map_moves_existing_poll_and_webhook_deals_on_reload_with_one_history_row_each()
 {
    let hubspot = HubSpot::start("pat-test", None).await;
    let entered = now_ms() - 3_600_000;
    for id in [1, 2] {
        hubspot.put(HsDeal::new(
            id,
            &format!("Deal {id}"),
            "appointmentscheduled",
            entered + id as i64,
        ));
    }
    let config = |hubspot_map: &str, woo_stage: &str| {
        format!(
            r#"{hs}
poll_interval = "1h"
{hubspot_map}

[connections.woo]
connector = "woocommerce"
webhook_secret = "{WOO_SECRET}"
abandon_after = "1h"

[connections.woo.stage_map.cart]
"awaiting-payment" = "{woo_stage}"
"#,
            hs = hubspot_connection(&hubspot.url()).replace("poll_interval = \"1s\"\n", "")
        )
    };
    let before = config("", "ecommerce.checkout_started");
    let mut daemon = TestDaemon::start(&before).await;
    let mut order = woo_order(901, "later@shop.example", "1", chrono::Utc::now());
    order["status"] = serde_json::json!("awaiting-payment");
    post_woo(&daemon, "woo", "d-901", &order).await;
    eventually("the deals stored as the first map says", WAIT, || async {
        let hs = mapping_history(&daemon, "hs");
        let woo = mapping_history(&daemon, "woo");
        (hs.len() == 2
            && hs.iter().all(|(_, stage, _)| stage == "lead_qualification")
            && woo.len() == 1
            && woo[0].1 == "checkout_started")
            .then_some(())
    })
    .await;
    let entered_before: Vec<i64> = {
        let db = daemon.db();
        let mut statement = db
            .prepare("SELECT stage_entered_at FROM deals ORDER BY id")
            .unwrap();
        statement
            .query_map([], |row| row.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap()
    };

    // The config now maps HubSpot's first stage and the shop's custom status elsewhere.
    let after = config(
        "[connections.hs.stage_map.default]\nappointmentscheduled = \"needs_assessment\"\n",
        "ecommerce.cart_abandoned",
    );
    daemon.write_config(&after);
    let (code, stdout, stderr) = run_cli(
        &["--config", daemon.config_path.to_str().unwrap(), "check"],
        &[],
    )
    .await;
    assert_eq!(code, 0, "{stderr}");
    assert!(
        stdout.contains("stage mapping change: connection hs will move 2 deals when the daemon next starts or reloads"),
        "{stdout}"
    );
    assert!(
        stdout.contains("stage mapping change: connection woo will move 1 deals"),
        "{stdout}"
    );
    assert!(
        stdout.contains("2 deals in native stage \"default\" / \"appointmentscheduled\": sales.lead_qualification → sales.needs_assessment"),
        "{stdout}"
    );

    daemon.signal("HUP");
    let moved = eventually("the deals moved by the new map", WAIT, || async {
        let hs = mapping_history(&daemon, "hs");
        let woo = mapping_history(&daemon, "woo");
        (hs.iter().all(|(_, stage, _)| stage == "needs_assessment") && woo[0].1 == "cart_abandoned")
            .then_some((hs, woo))
    })
    .await;
    for (_, _, moves) in moved.0.iter().chain(&moved.1) {
        assert_eq!(moves.len(), 1, "{moved:?}");
    }
    assert_eq!(
        moved.0[0].2[0],
        ("lead_qualification".into(), "needs_assessment".into())
    );
    assert_eq!(
        moved.1[0].2[0],
        ("checkout_started".into(), "cart_abandoned".into())
    );
    // The operator reads in the log what moved where, once per native stage.
    let logs = daemon.logs();
    let said: Vec<&str> = logs
        .lines()
        .filter(|line| line.contains("deals moved to the stage their native stage now maps to"))
        .collect();
    assert_eq!(said.len(), 2, "{said:#?}");
    for (connection, moved) in [("hs", 2), ("woo", 1)] {
        assert!(
            said.iter()
                .any(|line| line.contains(&format!("connection={connection}"))
                    && line.contains(&format!("moved={moved}"))
                    && line.contains("INFO")),
            "{said:#?}"
        );
    }
    let entered_after: Vec<i64> = {
        let db = daemon.db();
        let mut statement = db
            .prepare("SELECT stage_entered_at FROM deals ORDER BY id")
            .unwrap();
        statement
            .query_map([], |row| row.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap()
    };
    assert_eq!(
        entered_after, entered_before,
        "each keeps when it entered its native stage"
    );

    // Nothing is pending any more, and a restart moves nothing twice.
    let (_, stdout, _) = run_cli(
        &["--config", daemon.config_path.to_str().unwrap(), "check"],
        &[],
    )
    .await;
    assert!(!stdout.contains("stage mapping change"), "{stdout}");
    daemon.kill_and_restart().await;
    eventually("a sync run after the restart", WAIT, || async {
        (successful_runs(&daemon, "hs") >= 2).then_some(())
    })
    .await;
    let again = mapping_history(&daemon, "hs");
    assert!(
        again.iter().all(|(_, _, moves)| moves.len() == 1),
        "{again:?}"
    );
}

#[tokio::test]
async fn the_same_step_number_appears_in_every_output_for_the_same_outbox_row() {
    let out = tempfile::tempdir().unwrap();
    // The body's first lines continue the harness's [server] table.
    let mut daemon = TestDaemon::start(&format!(
        r#"api_token = "step-test-token-0123456789"

[email]
transport = "file"
dir = "{dir}"
from = "Shop <shop@example.com>"
templates = "{TEMPLATES}"
unsubscribe_secret = "test-unsubscribe-secret-0123"
enroll_interval = "100ms"

[connections.woo]
connector = "woocommerce"
webhook_secret = "{WOO_SECRET}"
abandon_after = "1s"

[followups.carts]
kind = "marketing"
stage = "ecommerce.cart_abandoned"
steps = [
  {{ after = "1s", template = "cart_reminder" }},
  {{ after = "2s", template = "cart_reminder" }},
]
"#,
        dir = out.path().display()
    ))
    .await;
    post_woo(
        &daemon,
        "woo",
        "d-step",
        &woo_order(950, "steps@shop.example", "1", chrono::Utc::now()),
    )
    .await;
    // The row under test is the rule's second step, as the daemon stores it.
    let (row_id, deal_id, stored_step): (i64, i64, i64) =
        eventually("the second step sent", WAIT, || async {
            daemon
                .db()
                .query_row(
                    "SELECT id, deal_id, step FROM outbox WHERE rule = 'carts' AND state = 'sent'
                 ORDER BY step DESC LIMIT 1",
                    [],
                    |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)),
                )
                .ok()
                .filter(|(_, _, step): &(i64, i64, i64)| *step > 0)
        })
        .await;
    let shown = stored_step + 1;
    assert_eq!(shown, 2);
    let key = format!("{deal_id}-carts-{shown}");
    let config = daemon.config_path.to_str().unwrap().to_owned();

    // The .eml file, its Message-ID and idempotency key.
    let file = out.path().join(format!("{key}.eml"));
    let message = std::fs::read_to_string(&file).unwrap_or_else(|e| {
        panic!(
            "{}: {e}; files: {:?}",
            file.display(),
            std::fs::read_dir(out.path()).unwrap().collect::<Vec<_>>()
        )
    });
    assert!(
        message.contains(&format!("Message-ID: <{key}.dealsync@example.com>")),
        "{message}"
    );
    assert!(
        message.contains(&format!("X-Dealsync-Idempotency-Key: {key}")),
        "{message}"
    );

    // `outbox list`, as a table and as JSON.
    let (code, table, stderr) = run_cli(
        &[
            "--config",
            &config,
            "outbox",
            "list",
            "--deal",
            &deal_id.to_string(),
        ],
        &[],
    )
    .await;
    assert_eq!(code, 0, "{stderr}");
    let line = table
        .lines()
        .find(|line| line.split_whitespace().next() == Some(&row_id.to_string()))
        .unwrap_or_else(|| panic!("row {row_id} in\n{table}"));
    assert!(
        line.split_whitespace()
            .any(|cell| cell == shown.to_string()),
        "{line}"
    );
    assert!(line.contains("sent"), "{line}");
    let (_, listed, _) = run_cli(
        &[
            "--config",
            &config,
            "outbox",
            "list",
            "--deal",
            &deal_id.to_string(),
            "--format",
            "json",
        ],
        &[],
    )
    .await;
    let listed: serde_json::Value = serde_json::from_str(&listed).unwrap();
    let json_row = listed
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["id"] == row_id)
        .unwrap();
    assert_eq!(json_row["step"], shown);
    assert_eq!(
        json_row["message_id"],
        format!("<{key}.dealsync@example.com>")
    );

    // The preview of step 2 is that very email.
    let (_, preview, _) = run_cli(
        &[
            "--config",
            &config,
            "outbox",
            "preview",
            "carts",
            &deal_id.to_string(),
            "--step",
            "2",
        ],
        &[],
    )
    .await;
    assert!(
        preview.contains(&format!("X-Dealsync-Idempotency-Key: {key}")),
        "{preview}"
    );

    // The read API and the status page.
    let api: serde_json::Value = daemon
        .http
        .get(daemon.url(&format!("/api/v1/outbox?deal_id={deal_id}")))
        .bearer_auth("step-test-token-0123456789")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let api_row = api["emails"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["id"] == row_id)
        .unwrap();
    assert_eq!(api_row["step"], shown, "{api}");
    let response = daemon
        .http
        .get(daemon.url("/"))
        .bearer_auth("step-test-token-0123456789")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let page = response.text().await.unwrap();
    assert!(
        page.contains(&format!(
            "<td><a href=\"/deals/{deal_id}\">{deal_id}</a></td><td>carts</td><td>{shown}</td><td>sent</td>"
        )),
        "{page}"
    );

    // The report's cart recovery table, as JSON and as a table.
    let (_, report, _) = run_cli(&["--config", &config, "report", "--format", "json"], &[]).await;
    let report: serde_json::Value = serde_json::from_str(&report).unwrap();
    let steps: Vec<i64> = report["total"]["cart_recovery"]["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["step"].as_i64().unwrap())
        .collect();
    assert_eq!(steps, [1, 2], "{report}");
    let (_, csv, _) = run_cli(
        &[
            "--config",
            &config,
            "report",
            "--format",
            "csv",
            "--section",
            "carts",
        ],
        &[],
    )
    .await;
    assert!(
        csv.lines()
            .any(|line| line.contains(&format!("carts,{shown},"))),
        "{csv}"
    );

    // The log line of the send.
    daemon.wait_for_log(&format!("step={shown}"), WAIT).await;
    assert!(
        daemon
            .logs()
            .lines()
            .any(|line| line.contains("follow-up sent") && line.contains(&format!("step={shown}"))),
        "{}",
        daemon.logs()
    );
    daemon.signal("TERM");
    daemon.wait_exit(Duration::from_secs(10)).await;
}

#[tokio::test]
async fn the_post_sale_email_moves_a_won_deal_to_post_sale_where_it_stays_and_the_report_counts_it()
{
    let smtp = SmtpServer::start().await;
    let hubspot = HubSpot::start("pat-test", None).await;
    hubspot.put_contact(601, "buyer@example.com", "Bea", "Buyer");
    let mut won = HsDeal::new(7, "Signed deal", "closedwon", now_ms() - 3_600_000);
    won.contact = Some(601);
    hubspot.put(won);
    let daemon = TestDaemon::start(&format!(
        r#"{}{}
[followups.post_sale]
kind = "transactional"
stage = "sales.won"
to = "contact"
template = "post_sale"
after = "1s"
move_to = "sales.post_sale"
"#,
        email(&smtp),
        hubspot_connection(&hubspot.url())
    ))
    .await;
    let stage_of = || -> (String, String) {
        daemon
            .db()
            .query_row(
                "SELECT stage, status FROM deals WHERE external_id = '7'",
                [],
                |row| Ok((row.get(0)?, row.get(1)?)),
            )
            .unwrap()
    };
    eventually("the post-sale email", WAIT, || async {
        (messages_to(&smtp, "buyer@example.com").len() == 1).then_some(())
    })
    .await;
    eventually("the deal in post-sale", WAIT, || async {
        (stage_of() == ("post_sale".to_owned(), "won".to_owned())).then_some(())
    })
    .await;
    // The CRM changes the deal, still closed won: it stays in post-sale.
    hubspot.update(7, |deal| {
        deal.amount = Some("999.00".into());
        deal.modified_ms = now_ms();
    });
    eventually("the change read", WAIT, || async {
        let amount: Option<i64> = daemon
            .db()
            .query_row(
                "SELECT amount_minor FROM deals WHERE external_id = '7'",
                [],
                |row| row.get(0),
            )
            .ok();
        (amount == Some(99_900)).then_some(())
    })
    .await;
    assert_eq!(stage_of(), ("post_sale".to_owned(), "won".to_owned()));
    let causes: Vec<(String, String)> = {
        let db = daemon.db();
        let mut statement = db
            .prepare("SELECT to_stage, cause FROM stage_history ORDER BY at, id")
            .unwrap();
        statement
            .query_map([], |row| Ok((row.get(0)?, row.get(1)?)))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap()
    };
    assert_eq!(
        causes,
        [
            ("won".to_owned(), "poll".to_owned()),
            ("post_sale".to_owned(), "followup".to_owned())
        ]
    );

    let (code, stdout, stderr) = run_cli(
        &[
            "--config",
            daemon.config_path.to_str().unwrap(),
            "report",
            "--format",
            "json",
        ],
        &[],
    )
    .await;
    assert_eq!(code, 0, "{stderr}");
    let report: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    let sales = &report["total"]["pipelines"][0];
    let post_sale = sales["stages"]
        .as_array()
        .unwrap()
        .iter()
        .find(|stage| stage["stage"] == "post_sale")
        .unwrap();
    assert_eq!(post_sale["entered"], 1, "{post_sale}");
    assert_eq!(
        sales["outcomes"]["won"], 1,
        "won once: won → post-sale is one run"
    );
}
