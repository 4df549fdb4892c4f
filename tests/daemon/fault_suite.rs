//! The standing fault suite: the real daemon is SIGKILLed again and again while
//! webhooks arrive from several connections, a pull sync reads a vendor that fails on a
//! fixed schedule (429, 500, truncated bodies), and follow-ups go out to a real SMTP
//! server. After the last restart every acknowledged delivery is stored once, every
//! source deal is present once in its stage, no email arrived twice and every due email
//! was sent or recorded as uncertain.
//!
//! Runs with the rest of the daemon tests (`cargo test`, hence `.ci/run`); it takes
//! about half a minute.

use crate::followups::header;
use crate::harness::daemon::{TestDaemon, run_cli};
use crate::harness::eventually;
use crate::harness::smtp::SmtpServer;
use crate::harness::vendors::Fault;
use crate::harness::vendors::pipedrive::{PdDeal, Pipedrive};
use crate::webhooks::{SHOP_SECRET, STRIPE_SECRET, checkout, order, shopify, stripe};
use chrono::{DateTime, Utc};
use dealsync::connectors::signature::{self, DEFAULT_TOLERANCE, Delivery, Scheme};
use serde_json::{Value, json};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

const TEMPLATES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/config/templates");
/// The Standard Webhooks libraries' example secret.
const GENERIC_SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
const KILLS: usize = 4;
const WAIT: Duration = Duration::from_secs(40);
/// A sender's pause between two deliveries, so the load spans every kill.
const PACE: Duration = Duration::from_millis(250);
/// Concurrent senders per webhook connection.
const SENDERS: usize = 6;
const PD_DEALS: u64 = 60;
/// The cart rule's steps; the CRM rule has one.
const CART_STEPS: i64 = 2;

/// What a delivery becomes once the daemon has applied it.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Becomes {
    /// An abandoned cart; with the shopper's consent it gets the cart sequence.
    AbandonedCart { consent: bool },
    /// A completed purchase.
    Purchase,
}

/// One webhook delivery, sent as the vendor would: the same delivery id on every retry.
#[derive(Clone)]
struct Webhook {
    connection: &'static str,
    scheme: Scheme,
    secret: &'static str,
    delivery_id: String,
    /// Shopify's (unsigned) topic header.
    topic: Option<&'static str>,
    body: Vec<u8>,
    /// The deal it becomes: the connector's external id.
    external_id: String,
    becomes: Becomes,
}

impl Webhook {
    /// The headers of one attempt; timestamped schemes sign every attempt anew.
    fn headers(&self) -> http::HeaderMap {
        let delivery = Delivery {
            method: "POST",
            uri: "",
            body: &self.body,
            id: &self.delivery_id,
        };
        let mut headers = signature::sign(
            &self.scheme,
            self.secret.as_bytes(),
            &delivery,
            SystemTime::now(),
        )
        .expect("signing a delivery");
        if let Some(topic) = self.topic {
            headers.insert("x-shopify-topic", topic.parse().unwrap());
        }
        headers.insert("content-type", "application/json".parse().unwrap());
        headers
    }
}

/// The deliveries of every webhook connection: Shopify checkouts (a quarter without
/// consent) and orders, Stripe expired and completed Checkout Sessions, generic carts.
/// Every shopper is someone else, so no order completes another delivery's cart.
fn deliveries(now: DateTime<Utc>) -> Vec<Webhook> {
    let at = now.to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let mut all = Vec::new();
    for (n, connection) in ["shop-a", "shop-b"].into_iter().enumerate() {
        for i in 0..192 {
            let token = format!("{connection}-checkout-{i}");
            let email = format!("{connection}.cart{i}@shoppers.example");
            let consent = i % 6 == 0;
            let mut body: Value =
                serde_json::from_slice(&checkout(&token, &at, &email)).expect("checkout JSON");
            body["created_at"] = json!(at);
            body["customer"]["email_marketing_consent"]["state"] = json!(if consent {
                "subscribed"
            } else {
                "not_subscribed"
            });
            all.push(Webhook {
                connection,
                scheme: Scheme::Shopify,
                secret: SHOP_SECRET,
                delivery_id: format!("{connection}-checkout-delivery-{i}"),
                topic: Some("checkouts/create"),
                body: serde_json::to_vec(&body).unwrap(),
                external_id: token,
                becomes: Becomes::AbandonedCart { consent },
            });
        }
        for i in 0..48 {
            let id = 7_000_000 + n as u64 * 1_000 + i;
            let email = format!("{connection}.order{i}@shoppers.example");
            let mut body: Value =
                serde_json::from_slice(&order(id, None, &email)).expect("order JSON");
            body["customer"]["email"] = json!(email);
            body["created_at"] = json!(at);
            body["updated_at"] = json!(at);
            all.push(Webhook {
                connection,
                scheme: Scheme::Shopify,
                secret: SHOP_SECRET,
                delivery_id: format!("{connection}-order-delivery-{i}"),
                topic: Some("orders/create"),
                body: serde_json::to_vec(&body).unwrap(),
                // Shopify's connector keys an order without a checkout by its id.
                external_id: format!("order:{id}"),
                becomes: Becomes::Purchase,
            });
        }
    }
    let expired: Value =
        crate::harness::vendors::fixture("stripe/event-checkout-session-expired.json");
    for i in 0..240 {
        let paid = i % 4 == 0;
        let consent = i % 6 == 1;
        let session = format!("cs_test_fault_{i}");
        let mut event = expired.clone();
        event["id"] = json!(format!("evt_fault_{i}"));
        event["created"] = json!(now.timestamp());
        event["type"] = json!(if paid {
            "checkout.session.completed"
        } else {
            "checkout.session.expired"
        });
        let object = &mut event["data"]["object"];
        object["id"] = json!(session);
        object["created"] = json!(now.timestamp());
        object["client_reference_id"] = Value::Null;
        object["customer_details"]["email"] = json!(format!("stripe{i}@shoppers.example"));
        object["customer_details"]["name"] = json!(format!("Stripe Shopper {i}"));
        object["consent"]["promotions"] = json!(if consent { "opt_in" } else { "opt_out" });
        object["payment_status"] = json!(if paid { "paid" } else { "unpaid" });
        object["status"] = json!(if paid { "complete" } else { "expired" });
        all.push(Webhook {
            connection: "pay",
            scheme: Scheme::Stripe {
                tolerance: DEFAULT_TOLERANCE,
            },
            secret: STRIPE_SECRET,
            // Stripe's idempotency key is the event id in the body.
            delivery_id: format!("evt_fault_{i}"),
            topic: None,
            body: serde_json::to_vec(&event).unwrap(),
            external_id: session,
            becomes: if paid {
                Becomes::Purchase
            } else {
                Becomes::AbandonedCart { consent }
            },
        });
    }
    for i in 0..240 {
        let purchased = i % 4 == 0;
        let consent = i % 6 == 1;
        let id = format!("generic-cart-{i}");
        let payload = json!({"type": "cart.updated", "timestamp": at, "data": {
            "id": id, "stage": if purchased { "purchased" } else { "abandoned" },
            "title": format!("Cart {i}"), "amount": "12.50", "currency": "EUR",
            "email": format!("generic{i}@shoppers.example"), "marketing_consent": consent,
            "created_at": at, "updated_at": at,
        }});
        all.push(Webhook {
            connection: "hooks",
            scheme: Scheme::StandardWebhooks {
                tolerance: DEFAULT_TOLERANCE,
            },
            secret: GENERIC_SECRET,
            delivery_id: format!("msg_fault_{i}"),
            topic: None,
            body: serde_json::to_vec(&payload).unwrap(),
            external_id: id,
            becomes: if purchased {
                Becomes::Purchase
            } else {
                Becomes::AbandonedCart { consent }
            },
        });
    }
    all
}

/// What the senders saw.
#[derive(Default)]
struct Ledger {
    /// (connection, delivery id) of every delivery answered with a 2xx.
    acknowledged: Vec<(String, String)>,
    /// Deliveries answered with a 4xx, which a vendor does not retry.
    refused: Vec<String>,
    /// Attempts that failed (no connection, reset, 5xx) and were retried.
    retries: usize,
    /// While set, senders go on without their pause: a burst, for a kill to land in.
    burst: bool,
}

/// Sends `batch` one by one, retrying each until it is acknowledged, as a vendor does.
async fn send(base: String, batch: Vec<Webhook>, ledger: Arc<Mutex<Ledger>>) {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .expect("HTTP client");
    for webhook in batch {
        let url = format!("{base}/webhooks/{}", webhook.connection);
        let mut retry_in = Duration::from_millis(50);
        loop {
            let answer = client
                .post(&url)
                .headers(webhook.headers())
                .body(webhook.body.clone())
                .send()
                .await;
            let status = answer.as_ref().map(|response| response.status());
            match status {
                Ok(status) if status.is_success() => {
                    ledger
                        .lock()
                        .unwrap()
                        .acknowledged
                        .push((webhook.connection.to_owned(), webhook.delivery_id.clone()));
                    break;
                }
                Ok(status) if status.is_client_error() => {
                    let text = match answer {
                        Ok(response) => response.text().await.unwrap_or_default(),
                        Err(_) => String::new(),
                    };
                    ledger.lock().unwrap().refused.push(format!(
                        "{} {}: {status} {text}",
                        webhook.connection, webhook.delivery_id
                    ));
                    break;
                }
                // The daemon is down or restarting: try again a little later.
                _ => {
                    ledger.lock().unwrap().retries += 1;
                    tokio::time::sleep(retry_in).await;
                    retry_in = (retry_in * 2).min(Duration::from_millis(400));
                }
            }
        }
        let burst = ledger.lock().unwrap().burst;
        if !burst {
            tokio::time::sleep(PACE).await;
        }
    }
}

fn config(smtp: &SmtpServer, pipedrive: &Pipedrive) -> String {
    format!(
        r#"
[email]
transport = "smtp"
url = "{smtp}"
from = "Test Shop <shop@example.com>"
templates = "{TEMPLATES}"
unsubscribe_secret = "fault-suite-unsubscribe-secret"
enroll_interval = "100ms"
retry_initial = "200ms"
retry_max = "1s"

[followups.carts]
kind = "marketing"
stage = "ecommerce.cart_abandoned"
expire_after = "1h"
steps = [
  {{ after = "300ms", template = "cart_reminder" }},
  {{ after = "1500ms", template = "cart_reminder" }},
]

[followups.proposals]
kind = "transactional"
stage = "sales.proposal"
to = "contact"
template = "deal_stalled"
after = "300ms"

{shop_a}
{shop_b}
{pay}

[connections.hooks]
connector = "webhook"
webhook_secret = "{GENERIC_SECRET}"

[connections.pd]
connector = "pipedrive"
base_url = "{pd}"
token = "pd-token"
poll_interval = "1s"
page_size = 5
lookback = "2s"
rate_limit = {{ requests_per_second = 200.0, burst = 50 }}
"#,
        smtp = smtp.url(),
        shop_a = shopify("shop-a", "1s"),
        shop_b = shopify("shop-b", "1s"),
        pay = stripe("pay"),
        pd = pipedrive.url(),
    )
}

/// The Pipedrive stage (1 to 5 of the stock pipeline) a deal starts in.
fn initial_stage(id: u64) -> u64 {
    1 + id % 5
}

/// The canonical (stage, status) a Pipedrive deal should have: the connector's default
/// mapping of the stock pipeline (connectors/pipedrive.toml), and won or lost status
/// over any stage.
fn pipedrive_expected(deal: &PdDeal) -> (String, String) {
    let stage = match deal.status.as_str() {
        "won" => "won",
        "lost" => "lost",
        _ => match deal.stage_id {
            1 => "lead_qualification",
            2 => "needs_assessment",
            3 | 4 => "proposal",
            5 => "negotiation",
            other => panic!("stage {other} is not in the stock pipeline"),
        },
    };
    (stage.to_owned(), deal.status.clone())
}

/// (stage, status) of every deal of a connection, by external id, read while the
/// daemon runs.
fn stored(daemon: &TestDaemon, connection: &str) -> BTreeMap<String, (String, String)> {
    let db = daemon.db_read_only();
    let mut statement = db
        .prepare("SELECT external_id, stage, status FROM deals WHERE connection = ?1")
        .unwrap();
    statement
        .query_map([connection], |row| {
            Ok((row.get(0)?, (row.get(1)?, row.get(2)?)))
        })
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap()
}

/// (connection, external id, rule, step) → state of every email row of the outbox.
type EmailRows = BTreeMap<(String, String, String, i64), String>;

fn email_rows(daemon: &TestDaemon) -> EmailRows {
    let db = daemon.db_read_only();
    let mut statement = db
        .prepare(
            // The store keeps the 0-based index; every output counts steps from 1.
            "SELECT d.connection, d.external_id, o.rule, o.step + 1, o.state
             FROM outbox o JOIN deals d ON d.id = o.deal_id WHERE o.action = 'email'",
        )
        .unwrap();
    statement
        .query_map([], |row| {
            Ok((
                (row.get(0)?, row.get(1)?, row.get(2)?, row.get(3)?),
                row.get(4)?,
            ))
        })
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap()
}

/// The CLI's JSON output of `args` against the daemon's config.
async fn cli_json(daemon: &TestDaemon, args: &[&str]) -> Vec<Value> {
    let config = daemon.config_path.to_str().unwrap();
    let mut full = vec!["--config", config];
    full.extend_from_slice(args);
    let (code, stdout, stderr) = run_cli(&full, &[]).await;
    assert_eq!(code, 0, "dealsync {args:?}: {stderr}");
    serde_json::from_str(&stdout).unwrap_or_else(|e| panic!("dealsync {args:?}: {e}: {stdout}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn four_sigkills_under_webhooks_a_failing_vendor_and_email_sends_lose_nothing_and_repeat_nothing()
 {
    let began = Instant::now();
    let smtp = SmtpServer::start().await;

    // A Pipedrive account with sixty deals, each with its own contact, that answers
    // every 5th request 429, every 7th 500 and every 9th with half its body.
    let pipedrive = Pipedrive::start("pd-token").await;
    let changed_at = Utc::now() - chrono::Duration::minutes(10);
    for id in 1..=PD_DEALS {
        let mut deal = PdDeal::new(
            id,
            &format!("Deal {id}"),
            initial_stage(id),
            changed_at + chrono::Duration::seconds(id as i64),
        );
        deal.person_id = Some(1_000 + id);
        pipedrive.put_person(
            1_000 + id,
            &format!("Buyer {id}"),
            &format!("buyer{id}@crm.example"),
        );
        pipedrive.put(deal);
    }
    *pipedrive.faults().slow.lock().unwrap() =
        Some(("/api/v2/deals".into(), Duration::from_millis(100)));
    pipedrive.faults().every(
        "/api/v2/",
        vec![
            (
                5,
                Fault::Status(
                    429,
                    vec![("retry-after", "1".into())],
                    r#"{"success":false,"error":"Request over limit","errorCode":429}"#.into(),
                ),
            ),
            (
                7,
                Fault::Status(
                    500,
                    vec![],
                    r#"{"success":false,"error":"Internal server error"}"#.into(),
                ),
            ),
            (9, Fault::Truncated),
        ],
    );

    let mut daemon = TestDaemon::start(&config(&smtp, &pipedrive)).await;

    // Vendors deliver, several senders per connection at once.
    let webhooks = deliveries(Utc::now());
    let total = webhooks.len();
    let ledger = Arc::new(Mutex::new(Ledger::default()));
    let mut batches: BTreeMap<(&str, usize), Vec<Webhook>> = BTreeMap::new();
    for (n, webhook) in webhooks.iter().enumerate() {
        batches
            .entry((webhook.connection, n % SENDERS))
            .or_default()
            .push(webhook.clone());
    }
    let senders: Vec<_> = batches
        .into_values()
        .map(|batch| tokio::spawn(send(daemon.url(""), batch, ledger.clone())))
        .collect();

    // Kill -9, spread over the load: past a fifth, two, three and four fifths of the
    // deliveries acknowledged, so deliveries are still to come at every kill; the first
    // one during the Pipedrive full sync, each other one once more emails went out
    // since the restart before (carts keep being abandoned while deliveries arrive).
    let acknowledged = || ledger.lock().unwrap().acknowledged.len();
    let pulled = |daemon: &TestDaemon| {
        daemon.count_read_only("SELECT count(*) FROM deals WHERE connection = 'pd'")
    };
    let mut mails_before = 0;
    let mut pulled_at_first_kill = 0;
    for kill in 1..=KILLS {
        let goal = total * kill / (KILLS + 1);
        let (mails, pulled_now) =
            eventually(&format!("the load before kill {kill}"), WAIT, || async {
                let mails = smtp.messages().len();
                let pulled_now = pulled(&daemon);
                let ready = acknowledged() >= goal
                    && if kill == 1 {
                        pulled_now >= 10
                    } else {
                        mails >= mails_before + 5
                    };
                ready.then_some((mails, pulled_now))
            })
            .await;
        if kill == 1 {
            pulled_at_first_kill = pulled_now;
        }
        mails_before = mails;
        // Then every sender at full speed, so the kill lands among deliveries in flight
        // and just acknowledged (one answered 2xx before its commit would be lost).
        ledger.lock().unwrap().burst = true;
        let burst_from = acknowledged();
        eventually("a burst of deliveries", WAIT, || async {
            (acknowledged() >= burst_from + 2 * senders.len()).then_some(())
        })
        .await;
        eprintln!(
            "fault suite: kill {kill} at {:.1}s: {} of {total} deliveries acknowledged, {pulled_now} deals pulled, {mails} emails received",
            began.elapsed().as_secs_f64(),
            acknowledged()
        );
        daemon.kill_and_restart().await;
        ledger.lock().unwrap().burst = false;

        if kill == 2 {
            // Deals move in the CRM meanwhile: into the proposal stage (which sends
            // an email), on to negotiation, won and lost. None leaves the proposal stage.
            let early: Vec<u64> = (1..=PD_DEALS)
                .filter(|id| initial_stage(*id) <= 2)
                .collect();
            for (n, id) in early.into_iter().take(14).enumerate() {
                pipedrive.update(id, |deal| {
                    match n {
                        0..6 => deal.stage_id = 4,
                        6..9 => deal.status = "won".into(),
                        9..12 => deal.stage_id = 5,
                        _ => deal.status = "lost".into(),
                    }
                    deal.update_time = Utc::now();
                });
            }
        }
    }
    assert!(
        pulled_at_first_kill < PD_DEALS as i64,
        "the first kill came during the full sync ({pulled_at_first_kill} deals stored)"
    );

    // Quiet, step by step: every sender is done, so the inbox holds all it will.
    let quiet_from = Utc::now();
    for sender in senders {
        tokio::time::timeout(WAIT, sender)
            .await
            .expect("every sender finishes")
            .expect("a sender panicked");
    }
    let ledger = std::mem::take(&mut *ledger.lock().unwrap());
    assert!(
        ledger.refused.is_empty(),
        "deliveries refused: {:?}",
        ledger.refused
    );
    assert_eq!(
        ledger.acknowledged.len(),
        total,
        "every delivery acknowledged"
    );

    // Every acknowledged delivery is in the inbox exactly once, and applied.
    eventually("every stored delivery applied", WAIT, || async {
        let open = daemon.inbox_read_only().query_row(
            "SELECT count(*) FROM webhook_inbox WHERE state <> 'processed'",
            [],
            |row| row.get::<_, i64>(0),
        );
        (open.unwrap() == 0).then_some(())
    })
    .await;
    let inbox = daemon.inbox_read_only();
    let mut lost_or_doubled = Vec::new();
    for (connection, delivery_id) in &ledger.acknowledged {
        let found: i64 = inbox
            .query_row(
                "SELECT count(*) FROM webhook_inbox WHERE connection = ?1 AND delivery_id = ?2",
                [connection, delivery_id],
                |row| row.get(0),
            )
            .unwrap();
        if found != 1 {
            lost_or_doubled.push(format!("{connection}/{delivery_id}: {found}"));
        }
    }
    assert!(
        lost_or_doubled.is_empty(),
        "acknowledged deliveries not stored exactly once: {lost_or_doubled:?}"
    );
    let dead: i64 = inbox
        .query_row("SELECT count(*) FROM webhook_dead_letters", [], |row| {
            row.get(0)
        })
        .unwrap();
    assert_eq!(dead, 0, "no delivery was dead-lettered");

    // Two Pipedrive runs that started after the last change in the CRM and succeeded:
    // the first may finish a full read resumed from its cursor (which does not go back
    // to the deals it read before the change), the second is a new read. Then every
    // deal must be in its stage.
    eventually("two Pipedrive runs after the last change", WAIT, || async {
        let runs = daemon.db_read_only().query_row(
            "SELECT count(*) FROM sync_runs
             WHERE connection = 'pd' AND status = 'succeeded' AND started_at > ?1",
            [quiet_from.timestamp_millis()],
            |row| row.get::<_, i64>(0),
        );
        (runs.unwrap() >= 2).then_some(())
    })
    .await;
    let pipedrive_now: Vec<PdDeal> = pipedrive
        .state
        .deals
        .lock()
        .unwrap()
        .values()
        .cloned()
        .collect();
    let expected_pd: BTreeMap<String, (String, String)> = pipedrive_now
        .iter()
        .map(|deal| (deal.id.to_string(), pipedrive_expected(deal)))
        .collect();
    assert_eq!(stored(&daemon, "pd"), expected_pd, "Pipedrive deals by id");
    assert_eq!(
        daemon.count_read_only(
            "SELECT count(*) FROM (SELECT deal_id FROM stage_history WHERE from_stage IS NULL
             GROUP BY deal_id HAVING count(*) > 1)"
        ),
        0,
        "no deal was created twice in its history"
    );

    // The emails that are due: each step of the cart rule for every abandoned cart
    // whose shopper consented, and the proposal email for every deal in proposal.
    // Steps are numbered as every output of the daemon shows them: from 1.
    let mut due: BTreeSet<(String, String, String, i64)> = BTreeSet::new();
    for webhook in &webhooks {
        if webhook.becomes == (Becomes::AbandonedCart { consent: true }) {
            for step in 1..=CART_STEPS {
                due.insert((
                    webhook.connection.to_owned(),
                    webhook.external_id.clone(),
                    "carts".to_owned(),
                    step,
                ));
            }
        }
    }
    for (id, (stage, _)) in &expected_pd {
        if stage == "proposal" {
            due.insert(("pd".into(), id.clone(), "proposals".into(), 1));
        }
    }
    let settled = eventually("every due email settled", WAIT, || async {
        let rows = email_rows(&daemon);
        let open = rows
            .values()
            .any(|state| state == "pending" || state == "sending");
        (!open && due.iter().all(|key| rows.contains_key(key))).then_some(rows)
    })
    .await;

    // Every source deal is present once, in its stage: the user's view (`deals list`).
    let listed = cli_json(
        &daemon,
        &["deals", "list", "--format", "json", "--limit", "100000"],
    )
    .await;
    let mut per_deal: HashMap<(String, String), Vec<(String, String)>> = HashMap::new();
    for deal in &listed {
        let text = |key: &str| deal[key].as_str().unwrap_or_default().to_owned();
        per_deal
            .entry((text("connection"), text("external_id")))
            .or_default()
            .push((text("stage"), text("status")));
    }
    let sent_any = |connection: &str, external_id: &str| {
        settled
            .iter()
            .any(|((c, e, _, _), state)| c == connection && e == external_id && state == "sent")
    };
    let mut expected: HashMap<(String, String), (String, String)> = HashMap::new();
    for webhook in &webhooks {
        let stage = match webhook.becomes {
            Becomes::Purchase => ("purchase_completed", "won"),
            // A sent step moves the cart on; an uncertain one does not.
            Becomes::AbandonedCart { consent: true }
                if sent_any(webhook.connection, &webhook.external_id) =>
            {
                ("follow_up_email", "open")
            }
            Becomes::AbandonedCart { .. } => ("cart_abandoned", "open"),
        };
        expected.insert(
            (webhook.connection.to_owned(), webhook.external_id.clone()),
            (stage.0.to_owned(), stage.1.to_owned()),
        );
    }
    for (id, stage) in &expected_pd {
        expected.insert(("pd".into(), id.clone()), stage.clone());
    }
    let mut wrong = Vec::new();
    for (key, want) in &expected {
        match per_deal.get(key).map(Vec::as_slice) {
            Some([found]) if found == want => {}
            other => wrong.push(format!("{key:?}: want {want:?}, found {other:?}")),
        }
    }
    for key in per_deal.keys().filter(|key| !expected.contains_key(*key)) {
        wrong.push(format!("{key:?}: a deal no source sent"));
    }
    wrong.sort();
    assert!(
        wrong.is_empty(),
        "deals not once in their stage:\n{}",
        wrong.join("\n")
    );

    // Every due email was sent or recorded as uncertain (`outbox list`), and no other
    // email went out.
    let outbox = cli_json(
        &daemon,
        &["outbox", "list", "--format", "json", "--limit", "100000"],
    )
    .await;
    let deal_keys: HashMap<i64, (String, String)> = listed
        .iter()
        .map(|deal| {
            (
                deal["id"].as_i64().unwrap(),
                (
                    deal["connection"].as_str().unwrap().to_owned(),
                    deal["external_id"].as_str().unwrap().to_owned(),
                ),
            )
        })
        .collect();
    // (connection, external id, rule, step) and `<deal>-<rule>-<step>` → state.
    let mut row_states: HashMap<(String, String, String, i64), String> = HashMap::new();
    let mut by_key: HashMap<String, String> = HashMap::new();
    for row in outbox.iter().filter(|row| row["action"] == "email") {
        let deal_id = row["deal_id"].as_i64().unwrap();
        let (connection, external_id) = deal_keys[&deal_id].clone();
        let rule = row["rule"].as_str().unwrap().to_owned();
        let step = row["step"].as_i64().unwrap();
        let state = row["state"].as_str().unwrap().to_owned();
        by_key.insert(format!("{deal_id}-{rule}-{step}"), state.clone());
        row_states.insert((connection, external_id, rule, step), state);
    }
    let mut unsettled = Vec::new();
    for key in &due {
        match row_states.get(key).map(String::as_str) {
            Some("sent" | "uncertain") => {}
            other => unsettled.push(format!("{key:?}: {other:?}")),
        }
    }
    for (key, state) in &row_states {
        if !due.contains(key) && (state == "sent" || state == "uncertain") {
            unsettled.push(format!("{key:?}: {state}, but it was not due"));
        }
    }
    unsettled.sort();
    assert!(
        unsettled.is_empty(),
        "due emails neither sent nor uncertain, or sent though not due:\n{}",
        unsettled.join("\n")
    );

    // No email arrived twice, by Message-ID or by (recipient, rule, step); each
    // arrival is a row recorded as sent or uncertain, and each row sent arrived.
    let mails = smtp.messages();
    let mut by_message_id: HashMap<String, usize> = HashMap::new();
    let mut by_step: HashMap<(String, String, String), usize> = HashMap::new();
    let mut arrived: HashMap<String, usize> = HashMap::new();
    for mail in &mails {
        let message_id =
            header(&mail.data, "Message-ID").expect("every follow-up has a Message-ID");
        *by_message_id.entry(message_id).or_default() += 1;
        let key = header(&mail.data, "X-Dealsync-Idempotency-Key")
            .expect("every follow-up names its outbox row");
        // `<deal>-<rule>-<step>`; rule names here hold no `-`.
        let (_, rule_and_step) = key.split_once('-').expect("a deal id");
        let (rule, step) = rule_and_step.rsplit_once('-').expect("a step");
        for recipient in &mail.rcpt_to {
            *by_step
                .entry((recipient.clone(), rule.to_owned(), step.to_owned()))
                .or_default() += 1;
        }
        *arrived.entry(key).or_default() += 1;
    }
    let twice: Vec<_> = by_message_id.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "received twice by Message-ID: {twice:?}");
    let twice: Vec<_> = by_step.iter().filter(|(_, n)| **n > 1).collect();
    assert!(
        twice.is_empty(),
        "received twice by (recipient, rule, step): {twice:?}"
    );
    let stray: Vec<_> = arrived
        .keys()
        .filter(|key| {
            !matches!(
                by_key.get(*key).map(String::as_str),
                Some("sent" | "uncertain")
            )
        })
        .collect();
    assert!(
        stray.is_empty(),
        "received, but recorded neither sent nor uncertain: {stray:?}"
    );
    let never_arrived: Vec<_> = by_key
        .iter()
        .filter(|(key, state)| *state == "sent" && !arrived.contains_key(*key))
        .collect();
    assert!(
        never_arrived.is_empty(),
        "recorded as sent, never received: {never_arrived:?}"
    );
    let sent = by_key.values().filter(|state| *state == "sent").count();
    let uncertain = by_key
        .values()
        .filter(|state| *state == "uncertain")
        .count();

    // The vendor's faults were met, and the run stayed short.
    let served = pipedrive.faults().scheduled_served.lock().unwrap().clone();
    for kind in ["Status(429", "Status(500", "Truncated"] {
        assert!(
            served.iter().any(|fault| fault.starts_with(kind)),
            "the pull met no {kind}: {served:?}"
        );
    }
    eprintln!(
        "fault suite: {total} deliveries ({} retried attempts), {} Pipedrive faults, \
         {} emails received ({} sent, {uncertain} uncertain), {KILLS} kills, {:.1}s",
        ledger.retries,
        served.len(),
        mails.len(),
        sent,
        began.elapsed().as_secs_f64()
    );
}
