//! What an operator does beside the service: commands as the service user with the
//! service's config and its systemd credentials.

use crate::harness::daemon::{TestDaemon, binary, run_cli, run_cli_without};
use crate::harness::smtp::SmtpServer;
use crate::harness::{eventually, free_port};
use chrono::Utc;
use dealsync::domain::{
    ChangeCause, ConnectionName, Currency, DealStatus, EmailAddress, Money, PipelineKey,
    SourceDeal, StageKey, StageRef,
};
use dealsync::store::{DealUpsert, Store};
use std::path::{Path, PathBuf};
use std::time::Duration;

const EXAMPLE_CONFIG: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/config/dealsync.example.toml");
const TEMPLATES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/config/templates");

/// The shipped example config, as systemd/README.md installs it: only the store moved
/// into `dir` (and the templates named by absolute path, as the copy is elsewhere).
fn example_config(dir: &Path) -> PathBuf {
    let text = std::fs::read_to_string(EXAMPLE_CONFIG).expect("the example config");
    let store = "path = \"/var/lib/dealsync/dealsync.db\"";
    let templates = "templates = \"templates\"";
    assert!(text.contains(store) && text.contains(templates));
    let text = text
        .replace(
            store,
            &format!("path = \"{}\"", dir.join("dealsync.db").display()),
        )
        .replace(templates, &format!("templates = \"{TEMPLATES}\""));
    let path = dir.join("dealsync.toml");
    std::fs::write(&path, text).expect("writing the config");
    path
}

/// A won deal of `connection`, as a sync would store it; returns its id.
async fn put_won_deal(db: &Path, connection: &str, external_id: &str) -> i64 {
    let store = Store::open(db).expect("opening the store");
    let at = Utc::now() - chrono::Duration::days(1);
    let mut source = SourceDeal::new(external_id, "Acme renewal", "default", "closedwon");
    source.amount = Some(Money::new(120_000, Currency::parse("EUR").unwrap()));
    source.contact_email = EmailAddress::parse("ada@acme.example");
    source.contact_name = Some("Ada".into());
    source.stage_changed_at = Some(at);
    source.updated_at = Some(at);
    store
        .upsert_deals(vec![DealUpsert {
            connection: ConnectionName::new(connection),
            source,
            target: StageRef {
                pipeline: Some(PipelineKey::new("sales")),
                stage: StageKey::new("won"),
            },
            status: DealStatus::Won,
            observed_at: Utc::now(),
            cause: ChangeCause::Poll,
        }])
        .await
        .expect("storing a deal");
    store
        .deal_by_external_id(connection, external_id)
        .await
        .unwrap()
        .expect("the deal just stored")
        .id
}

/// The four credentials the example config names, as files in `dir`.
fn write_credentials(dir: &Path, unsubscribe_secret: &str) {
    std::fs::create_dir_all(dir).unwrap();
    for (name, value) in [
        (
            "smtp-url",
            "smtp://relay-user:relay-password-123@127.0.0.1:2525",
        ),
        ("unsubscribe-secret", unsubscribe_secret),
        ("hubspot-eu-token", "pat-eu1-very-secret-token"),
        ("shopify-webhook-secret", "shpss_very_secret_value"),
        ("woo-webhook-secret", "woo_very_secret_value"),
    ] {
        std::fs::write(dir.join(name), format!("{value}\n")).unwrap();
    }
}

const NO_SERVICE: &[&str] = &["CREDENTIALS_DIRECTORY"];

#[tokio::test]
async fn outside_the_service_read_only_commands_work_with_the_services_credentials_config() {
    let dir = tempfile::tempdir().unwrap();
    let config = example_config(dir.path());
    let config = config.to_str().unwrap();
    let deal = put_won_deal(&dir.path().join("dealsync.db"), "hubspot-eu", "4711").await;
    let deal = deal.to_string();

    // systemd/README.md's own step: `check` as the service user, no credentials.
    let (code, stdout, stderr) =
        run_cli_without(&["--config", config, "check"], &[], NO_SERVICE).await;
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert!(
        stdout.contains("credentials: 5 not available here, so not checked"),
        "{stdout}"
    );
    for (key, credential) in [
        ("email.url", "smtp-url"),
        ("email.unsubscribe_secret", "unsubscribe-secret"),
        ("connections.hubspot-eu.token", "hubspot-eu-token"),
        (
            "connections.shop.webhook_secret[0]",
            "shopify-webhook-secret",
        ),
    ] {
        assert!(
            stdout.contains(&format!("note: {key}: ${{credential:{credential}}}")),
            "{key}: {stdout}"
        );
    }

    // The read-only commands of the issue: each succeeds.
    for args in [
        vec!["deals", "list"],
        vec!["deals", "list", "--format", "json"],
        vec!["report"],
        vec!["stages"],
        vec!["outbox", "list"],
    ] {
        let mut full = vec!["--config", config];
        full.extend(&args);
        let (code, stdout, stderr) = run_cli_without(&full, &[], NO_SERVICE).await;
        assert_eq!(code, 0, "{args:?}: {stdout}{stderr}");
        assert!(!stderr.contains("credential"), "{args:?}: {stderr}");
    }
    let (_, listed, _) = run_cli_without(
        &["--config", config, "deals", "list", "--format", "json"],
        &[],
        NO_SERVICE,
    )
    .await;
    let listed: Vec<serde_json::Value> = serde_json::from_str(&listed).unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0]["external_id"], "4711");

    // A transactional email previews without any secret (the SMTP URL is not used).
    let (code, stdout, stderr) = run_cli_without(
        &["--config", config, "outbox", "preview", "post_sale", &deal],
        &[],
        NO_SERVICE,
    )
    .await;
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert!(stdout.contains("To: Ada <ada@acme.example>"), "{stdout}");

    // A marketing email's unsubscribe link is signed with a credential: named, with how.
    let (code, _, stderr) = run_cli_without(
        &[
            "--config",
            config,
            "outbox",
            "preview",
            "cart_recovery",
            &deal,
        ],
        &[],
        NO_SERVICE,
    )
    .await;
    assert_eq!(code, 78, "{stderr}");
    assert!(
        stderr.contains(
            "email.unsubscribe_secret: this command needs ${credential:unsubscribe-secret}"
        ),
        "{stderr}"
    );
    assert!(stderr.contains("--credentials-dir DIR"), "{stderr}");
    assert!(!stderr.contains("email.url"), "{stderr}");

    // `sync` needs its connection's token, and only that.
    let (code, _, stderr) =
        run_cli_without(&["--config", config, "sync", "hubspot-eu"], &[], NO_SERVICE).await;
    assert_eq!(code, 78, "{stderr}");
    assert!(
        stderr.contains(
            "connections.hubspot-eu.token: this command needs ${credential:hubspot-eu-token}"
        ),
        "{stderr}"
    );
    assert!(!stderr.contains("email.url"), "{stderr}");

    // `run` needs every one of them: each named, with how to provide them.
    let (code, _, stderr) = run_cli_without(&["--config", config, "run"], &[], NO_SERVICE).await;
    assert_eq!(code, 78, "{stderr}");
    for key in [
        "email.url",
        "email.unsubscribe_secret",
        "connections.hubspot-eu.token",
        "connections.shop.webhook_secret[0]",
    ] {
        assert!(
            stderr.contains(&format!("{key}: this command needs")),
            "{key}: {stderr}"
        );
    }
    assert!(stderr.contains("LoadCredential="), "{stderr}");
    assert!(stderr.contains("--credentials-dir DIR"), "{stderr}");

    // --credentials-dir is read like $CREDENTIALS_DIRECTORY: the values are checked.
    let credentials = dir.path().join("credentials");
    write_credentials(&credentials, "too-short");
    let credentials = credentials.to_str().unwrap();
    let (code, _, stderr) = run_cli_without(
        &[
            "--config",
            config,
            "--credentials-dir",
            credentials,
            "check",
        ],
        &[],
        NO_SERVICE,
    )
    .await;
    assert_eq!(code, 78, "{stderr}");
    assert!(
        stderr.contains("email.unsubscribe_secret: must be at least 16 characters"),
        "{stderr}"
    );
    write_credentials(Path::new(credentials), "a-long-enough-unsubscribe-secret");
    let (code, stdout, stderr) = run_cli_without(
        &[
            "--config",
            config,
            "--credentials-dir",
            credentials,
            "check",
        ],
        &[],
        NO_SERVICE,
    )
    .await;
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert!(!stdout.contains("not available"), "{stdout}");
    let (code, stdout, stderr) = run_cli_without(
        &[
            "--config",
            config,
            "--credentials-dir",
            credentials,
            "outbox",
            "preview",
            "cart_recovery",
            &deal,
        ],
        &[],
        NO_SERVICE,
    )
    .await;
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert!(stdout.contains("List-Unsubscribe:"), "{stdout}");
    for secret in [
        "relay-password-123",
        "pat-eu1-very-secret-token",
        "shpss_very_secret_value",
    ] {
        assert!(!stdout.contains(secret) && !stderr.contains(secret));
    }
}

#[tokio::test]
async fn the_daemon_reads_credentials_from_credentials_dir_at_start_and_on_reload() {
    let dir = tempfile::tempdir().unwrap();
    let credentials = dir.path().join("credentials");
    std::fs::create_dir(&credentials).unwrap();
    std::fs::write(
        credentials.join("api-token"),
        "api-token-from-a-file-0123\n",
    )
    .unwrap();
    let port = free_port();
    let config = dir.path().join("dealsync.toml");
    std::fs::write(
        &config,
        format!(
            "[storage]\npath = \"{}\"\n[server]\nlisten = \"127.0.0.1:{port}\"\napi_token = \"${{credential:api-token}}\"\n",
            dir.path().join("dealsync.db").display()
        ),
    )
    .unwrap();
    let mut child = tokio::process::Command::new(binary())
        .arg("--config")
        .arg(&config)
        .arg("--credentials-dir")
        .arg(&credentials)
        .arg("run")
        .env_remove("CREDENTIALS_DIRECTORY")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("starting dealsync");
    let http = reqwest::Client::new();
    let deals = |token: &'static str| {
        let http = http.clone();
        async move {
            http.get(format!("http://127.0.0.1:{port}/api/v1/deals"))
                .bearer_auth(token)
                .send()
                .await
                .ok()
                .map(|r| r.status().as_u16())
        }
    };
    let status = eventually("the daemon to answer", Duration::from_secs(20), || {
        deals("api-token-from-a-file-0123")
    })
    .await;
    assert_eq!(status, 200, "the token was read from --credentials-dir");

    // A reload reads the credential again from the same directory.
    std::fs::write(credentials.join("api-token"), "rotated-api-token-4567\n").unwrap();
    let pid = child.id().expect("running").to_string();
    let sent = std::process::Command::new("kill")
        .args(["-HUP", &pid])
        .status()
        .unwrap();
    assert!(sent.success());
    eventually(
        "the rotated token to be in force",
        Duration::from_secs(20),
        || async { (deals("rotated-api-token-4567").await == Some(200)).then_some(()) },
    )
    .await;
    assert_eq!(deals("api-token-from-a-file-0123").await, Some(401));
    child.kill().await.unwrap();
}

const TOKEN: &str = "operator-token-0123456789";
const WAIT: Duration = Duration::from_secs(30);

/// `[email]` for the SMTP test server, at test pace; `extra` adds lines to it.
fn email(smtp: &SmtpServer, extra: &str) -> String {
    format!(
        r#"
[email]
transport = "smtp"
url = "{url}"
from = "Test Shop <shop@example.com>"
templates = "{TEMPLATES}"
unsubscribe_secret = "test-unsubscribe-secret-0123"
enroll_interval = "100ms"
retry_initial = "200ms"
retry_max = "1s"
{extra}
"#,
        url = smtp.url()
    )
}

/// A two-step cart sequence and an owner alert on `sales.proposal`.
const RULES: &str = r#"
[followups.carts]
kind = "marketing"
stage = "ecommerce.cart_abandoned"
steps = [
  { after = "200ms", template = "cart_reminder" },
  { after = "1h", template = "cart_reminder" },
]

[followups.alert]
kind = "transactional"
stage = "sales.proposal"
to = "owner"
template = "deal_stalled"
after = "200ms"
"#;

/// A deal to write as a sync or webhook would.
struct Put<'a> {
    connection: &'a str,
    id: &'a str,
    stage: StageRef,
    status: DealStatus,
    contact: Option<&'a str>,
    consent: Option<bool>,
    owner_email: Option<&'a str>,
    created_at: chrono::DateTime<Utc>,
    entered_at: chrono::DateTime<Utc>,
}

impl<'a> Put<'a> {
    /// An abandoned cart whose first step (200ms) is due already.
    fn cart(id: &'a str, contact: &'a str, consent: Option<bool>) -> Put<'a> {
        let now = Utc::now() - chrono::Duration::seconds(2);
        Put {
            connection: "shop",
            id,
            stage: stage("ecommerce", "cart_abandoned"),
            status: DealStatus::Open,
            contact: Some(contact),
            consent,
            owner_email: None,
            created_at: now,
            entered_at: now,
        }
    }

    async fn write(&self, store: &Store) -> i64 {
        let mut source = SourceDeal::new(self.id, format!("Deal {}", self.id), "native", "n");
        source.amount = Some(Money::new(30_700, Currency::parse("EUR").unwrap()));
        source.contact_email = self.contact.and_then(EmailAddress::parse);
        source.contact_name = Some("Ada Lovelace".into());
        source.marketing_consent = self.consent;
        source.owner = Some("Grace".into());
        source.owner_email = self.owner_email.and_then(EmailAddress::parse);
        source.created_at = Some(self.created_at);
        source.updated_at = Some(self.entered_at);
        source.stage_changed_at = Some(self.entered_at);
        source.recovery_url = Some(format!("https://shop.example.com/cart/{}", self.id));
        source.raw = dealsync::domain::RawRecord::from_value(
            &serde_json::json!({"id": self.id, "note": "as the source sent it"}),
        );
        store
            .upsert_deals(vec![DealUpsert {
                connection: ConnectionName::new(self.connection),
                source,
                target: self.stage.clone(),
                status: self.status,
                observed_at: self.entered_at,
                cause: ChangeCause::Webhook,
            }])
            .await
            .expect("storing a deal");
        store
            .deal_by_external_id(self.connection, self.id)
            .await
            .unwrap()
            .expect("the deal just stored")
            .id
    }
}

fn stage(pipeline: &str, stage: &str) -> StageRef {
    StageRef {
        pipeline: Some(PipelineKey::new(pipeline)),
        stage: StageKey::new(stage),
    }
}

/// `deals show ID --format json` with `config`: the rule decisions by rule name.
async fn decisions(
    config: &Path,
    deal: i64,
) -> std::collections::HashMap<String, serde_json::Value> {
    let (code, stdout, stderr) = run_cli(
        &[
            "--config",
            config.to_str().unwrap(),
            "deals",
            "show",
            &deal.to_string(),
            "--format",
            "json",
        ],
        &[],
    )
    .await;
    assert_eq!(code, 0, "{stdout}{stderr}");
    let view: serde_json::Value = serde_json::from_str(&stdout).expect("JSON");
    assert_eq!(view["deal"]["id"], deal);
    view["followups"]
        .as_array()
        .expect("followups")
        .iter()
        .map(|d| (d["rule"].as_str().unwrap().to_owned(), d.clone()))
        .collect()
}

/// One outbox row as the daemon wrote it; times in milliseconds.
#[derive(Debug)]
struct Row {
    step: i64,
    state: String,
    reason: Option<String>,
    due_at: i64,
    claimed_at: Option<i64>,
}

fn rows(daemon: &TestDaemon, deal: i64, rule: &str) -> Vec<Row> {
    let db = daemon.db();
    let mut statement = db
        .prepare(
            "SELECT step, state, reason, due_at, claimed_at FROM outbox
             WHERE deal_id = ?1 AND rule = ?2 ORDER BY step",
        )
        .unwrap();
    statement
        .query_map(rusqlite::params![deal, rule], |r| {
            Ok(Row {
                step: r.get(0)?,
                state: r.get(1)?,
                reason: r.get(2)?,
                due_at: r.get(3)?,
                claimed_at: r.get(4)?,
            })
        })
        .unwrap()
        .collect::<Result<Vec<_>, _>>()
        .unwrap()
}

/// Waits until step 1 of the deal's `rule` is no longer pending or sending; returns its
/// state and reason as the daemon recorded them.
async fn step_one(daemon: &TestDaemon, deal: i64, rule: &str) -> (String, Option<String>) {
    eventually(&format!("deal {deal}'s {rule} step 1"), WAIT, || async {
        rows(daemon, deal, rule)
            .into_iter()
            .find(|row| row.step == 0 && row.state != "pending" && row.state != "sending")
            .map(|row| (row.state, row.reason))
    })
    .await
}

fn verdict(
    decisions: &std::collections::HashMap<String, serde_json::Value>,
    rule: &str,
) -> (String, String) {
    let decision = &decisions[rule];
    (
        decision["verdict"].as_str().unwrap().to_owned(),
        decision["reason"].as_str().unwrap().to_owned(),
    )
}

#[tokio::test]
async fn deals_show_predicts_each_rules_decision_with_the_reason_the_worker_then_records() {
    // Arrange: a daemon without rules, so nothing is enrolled while the deals are written.
    let smtp = SmtpServer::start().await;
    let without_rules = format!(
        "api_token = \"{TOKEN}\"\nstatus_page_auth = \"local\"\n{}",
        email(&smtp, "max_per_recipient_per_day = 2")
    );
    let mut daemon = TestDaemon::start(&without_rules).await;
    let store = Store::open(&daemon.db_path).unwrap();
    let now = Utc::now();
    let consenting = Put::cart("A", "ada@shop.example", Some(true))
        .write(&store)
        .await;
    let silent = Put::cart("B", "bob@shop.example", None).write(&store).await;
    store
        .suppress(
            "cy@shop.example".into(),
            "manual".into(),
            Some("test".into()),
            now,
        )
        .await
        .unwrap();
    let suppressed = Put::cart("C", "cy@shop.example", Some(true))
        .write(&store)
        .await;
    let order = Put {
        connection: "shop2",
        id: "order-1",
        stage: stage("ecommerce", "purchase_completed"),
        status: DealStatus::Won,
        contact: Some("gus@shop.example"),
        consent: Some(true),
        owner_email: None,
        created_at: now - chrono::Duration::minutes(1),
        entered_at: now - chrono::Duration::minutes(1),
    }
    .write(&store)
    .await;
    let bought = Put {
        created_at: now - chrono::Duration::minutes(10),
        entered_at: now - chrono::Duration::minutes(5),
        ..Put::cart("G", "gus@shop.example", Some(true))
    }
    .write(&store)
    .await;
    let ownerless = Put {
        connection: "crm",
        id: "D",
        stage: stage("sales", "proposal"),
        status: DealStatus::Open,
        contact: Some("dora@crm.example"),
        consent: None,
        owner_email: None,
        created_at: now - chrono::Duration::seconds(2),
        entered_at: now - chrono::Duration::seconds(2),
    }
    .write(&store)
    .await;
    let owned = Put {
        connection: "crm",
        id: "E",
        stage: stage("sales", "proposal"),
        status: DealStatus::Open,
        contact: None,
        consent: None,
        owner_email: Some("grace@crm.example"),
        created_at: now - chrono::Duration::seconds(2),
        entered_at: now - chrono::Duration::seconds(2),
    }
    .write(&store)
    .await;
    let with_rules = format!("{without_rules}\n{RULES}");
    let rules_config = daemon.dir.path().join("with-rules.toml");
    std::fs::write(
        &rules_config,
        format!("{}{with_rules}", daemon.header(&with_rules)),
    )
    .unwrap();

    // Act 1: what `deals show` predicts before the worker has the rules.
    let predicted_a = decisions(&rules_config, consenting).await;
    let predicted_b = decisions(&rules_config, silent).await;
    let predicted_c = decisions(&rules_config, suppressed).await;
    let predicted_g = decisions(&rules_config, bought).await;
    let predicted_d = decisions(&rules_config, ownerless).await;
    let predicted_e = decisions(&rules_config, owned).await;

    assert_eq!(
        verdict(&predicted_a, "carts").0,
        "scheduled",
        "{predicted_a:?}"
    );
    assert!(
        verdict(&predicted_a, "carts")
            .1
            .contains("step 1 of 2 goes now"),
        "{predicted_a:?}"
    );
    assert_eq!(predicted_a["carts"]["enrolled"], false);
    let (not_triggered, why) = verdict(&predicted_a, "alert");
    assert_eq!(not_triggered, "not_triggered");
    assert!(
        why.contains("not in a trigger stage")
            && why.contains("sales.proposal")
            && why.contains("ecommerce.cart_abandoned"),
        "{why}"
    );
    assert_eq!(verdict(&predicted_b, "carts").0, "stopped");
    assert_eq!(verdict(&predicted_c, "carts").0, "stopped");
    assert_eq!(verdict(&predicted_g, "carts").0, "stopped");
    assert!(
        verdict(&predicted_g, "carts")
            .1
            .contains(&format!("placed an order since (deal {order})")),
        "{predicted_g:?}"
    );
    assert_eq!(verdict(&predicted_d, "alert").0, "declined");
    assert_eq!(verdict(&predicted_d, "carts").0, "not_triggered");
    assert_eq!(verdict(&predicted_e, "alert").0, "scheduled");

    // Act 2: the worker gets the rules and decides.
    daemon.kill_and_restart_with_config(&with_rules).await;

    // Assert: each prediction carries the reason the worker recorded.
    for (deal, predicted, rule) in [
        (silent, &predicted_b, "carts"),
        (suppressed, &predicted_c, "carts"),
        (bought, &predicted_g, "carts"),
        (ownerless, &predicted_d, "alert"),
    ] {
        let (state, reason) = step_one(&daemon, deal, rule).await;
        assert_eq!(state, "skipped", "deal {deal}");
        let reason = reason.expect("a skipped row has its reason");
        let (_, predicted_reason) = verdict(predicted, rule);
        assert!(
            predicted_reason.contains(&reason),
            "deal {deal}: predicted {predicted_reason:?}, the worker recorded {reason:?}"
        );
    }
    assert!(
        step_one(&daemon, suppressed, "carts")
            .await
            .1
            .unwrap()
            .contains("suppressed")
    );
    assert!(
        step_one(&daemon, silent, "carts")
            .await
            .1
            .unwrap()
            .contains("consent")
    );
    assert!(
        step_one(&daemon, ownerless, "alert")
            .await
            .1
            .unwrap()
            .contains("no owner email")
    );
    assert_eq!(step_one(&daemon, consenting, "carts").await.0, "sent");
    assert_eq!(step_one(&daemon, owned, "alert").await.0, "sent");
    let received: Vec<_> = smtp.messages().into_iter().map(|m| m.rcpt_to).collect();
    assert!(
        received.contains(&vec!["ada@shop.example".to_owned()]),
        "{received:?}"
    );
    assert!(
        received.contains(&vec!["grace@crm.example".to_owned()]),
        "{received:?}"
    );

    // After: the consenting cart is enrolled, its next step when the outbox says.
    let after = decisions(&rules_config, consenting).await;
    let step_two = rows(&daemon, consenting, "carts")
        .into_iter()
        .find(|row| row.step == 1)
        .expect("step 2 is enrolled");
    assert_eq!(step_two.state, "pending");
    assert_eq!(after["carts"]["verdict"], "scheduled", "{after:?}");
    assert_eq!(after["carts"]["enrolled"], true);
    assert_eq!(after["carts"]["step"], 2);
    let next_at: chrono::DateTime<Utc> =
        serde_json::from_value(after["carts"]["next_at"].clone()).unwrap();
    assert_eq!(next_at.timestamp_millis(), step_two.due_at);
    assert!(
        verdict(&after, "carts")
            .1
            .starts_with("enrolled: step 2 of 2 goes at ")
    );
    let after_b = decisions(&rules_config, silent).await;
    assert_eq!(
        verdict(&after_b, "carts").0,
        "stopped",
        "{after_b:?} {:?}",
        rows(&daemon, silent, "carts")
    );
    assert!(
        verdict(&after_b, "carts").1.contains("consent"),
        "{after_b:?}"
    );

    // The frequency cap and quiet hours, asked with a config that has them.
    let capped = daemon.dir.path().join("capped.toml");
    std::fs::write(
        &capped,
        format!("{}{without_rules}\n{RULES}", daemon.header(&without_rules)).replace(
            "max_per_recipient_per_day = 2",
            "max_per_recipient_per_day = 1",
        ),
    )
    .unwrap();
    let step_one_claimed = rows(&daemon, consenting, "carts")[0]
        .claimed_at
        .expect("claimed when sent");
    let capped_a = decisions(&capped, consenting).await;
    assert_eq!(capped_a["carts"]["verdict"], "deferred", "{capped_a:?}");
    assert!(
        verdict(&capped_a, "carts")
            .1
            .contains("frequency cap: 1 emails to this recipient in 24h")
    );
    let until: chrono::DateTime<Utc> =
        serde_json::from_value(capped_a["carts"]["next_at"].clone()).unwrap();
    assert_eq!(
        until.timestamp_millis(),
        step_one_claimed + 24 * 3600 * 1000
    );

    let quiet_from = (Utc::now() - chrono::Duration::hours(1)).format("%H:%M");
    let quiet_to = (Utc::now() + chrono::Duration::hours(3)).format("%H:%M");
    let quiet = daemon.dir.path().join("quiet.toml");
    std::fs::write(
        &quiet,
        format!(
            "{}{without_rules}\nquiet_hours = \"{quiet_from}-{quiet_to}\"\n{RULES}",
            daemon.header(&without_rules)
        ),
    )
    .unwrap();
    let quiet_a = decisions(&quiet, consenting).await;
    assert_eq!(quiet_a["carts"]["verdict"], "deferred", "{quiet_a:?}");
    assert!(
        verdict(&quiet_a, "carts").1.contains("quiet hours"),
        "{quiet_a:?}"
    );
    assert_eq!(
        verdict(&quiet_a, "alert").0,
        "not_triggered",
        "owner alerts ignore quiet hours"
    );

    // The table form, the read API and the status page give the same answers.
    let (code, table, _) = run_cli(
        &[
            "--config",
            rules_config.to_str().unwrap(),
            "deals",
            "show",
            &consenting.to_string(),
        ],
        &[],
    )
    .await;
    assert_eq!(code, 0);
    for expected in [
        "Stage history",
        "Emails",
        "Follow-up rules",
        "Source record",
        "as the source sent it",
        "enrolled: step 2 of 2",
    ] {
        assert!(table.contains(expected), "{expected}: {table}");
    }
    let api: serde_json::Value = daemon
        .http
        .get(daemon.url(&format!("/api/v1/deals/{ownerless}")))
        .bearer_auth(TOKEN)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let alert = api["followups"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["rule"] == "alert")
        .unwrap();
    assert_eq!(alert["verdict"], "stopped", "recorded: {api}");
    assert!(
        alert["reason"].as_str().unwrap().contains("no owner email"),
        "{api}"
    );
    assert_eq!(api["source"]["record"]["note"], "as the source sent it");
    let (status, page) = daemon.get(&format!("/deals/{ownerless}")).await;
    assert_eq!(status, 200, "{page}");
    assert!(
        page.contains("the deal has no owner email address"),
        "{page}"
    );
    assert!(
        !page.contains("dora@crm.example"),
        "no addresses on the status page"
    );
    let (status, _) = daemon.get("/deals/999999").await;
    assert_eq!(status, 404);

    // An unknown id is a usage error.
    let (code, _, stderr) = run_cli(
        &[
            "--config",
            rules_config.to_str().unwrap(),
            "deals",
            "show",
            "999999",
        ],
        &[],
    )
    .await;
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("no deal with id 999999"), "{stderr}");
}

/// Runs the CLI against `daemon`'s config; returns (code, stdout, stderr).
async fn cli(daemon: &TestDaemon, args: &[&str]) -> (i32, String, String) {
    let mut full = vec!["--config", daemon.config_path.to_str().unwrap()];
    full.extend(args);
    run_cli(&full, &[]).await
}

/// `cli` with `--format json`, expecting success; the parsed output.
async fn cli_json(daemon: &TestDaemon, args: &[&str]) -> serde_json::Value {
    let mut full = args.to_vec();
    full.extend(["--format", "json"]);
    let (code, stdout, stderr) = cli(daemon, &full).await;
    assert_eq!(code, 0, "{args:?}: {stdout}{stderr}");
    serde_json::from_str(&stdout).unwrap_or_else(|error| panic!("{args:?}: {error}: {stdout}"))
}

/// The daemon's webhook inbox file.
fn inbox(daemon: &TestDaemon) -> rusqlite::Connection {
    let db = rusqlite::Connection::open(daemon.db_path.with_extension("inbox.db")).unwrap();
    db.busy_timeout(Duration::from_secs(5)).unwrap();
    db
}

const HOOK_SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";

/// A generic webhook connection whose id pointer is `id`.
fn hooks(id: &str) -> String {
    format!(
        r#"
[connections.hooks]
connector = "webhook"
webhook_secret = "{HOOK_SECRET}"
settings = {{ id = "{id}" }}
"#
    )
}

async fn post_hook(daemon: &TestDaemon, delivery_id: &str, body: &[u8]) -> (u16, String) {
    use dealsync::connectors::signature::{self, Delivery, Scheme};
    let headers = signature::sign(
        &Scheme::StandardWebhooks {
            tolerance: signature::DEFAULT_TOLERANCE,
        },
        HOOK_SECRET.as_bytes(),
        &Delivery {
            method: "POST",
            uri: "",
            body,
            id: delivery_id,
        },
        std::time::SystemTime::now(),
    )
    .expect("signing");
    let response = daemon
        .http
        .post(daemon.url("/webhooks/hooks"))
        .headers(headers)
        .header("content-type", "application/json")
        .body(body.to_vec())
        .send()
        .await
        .expect("POST");
    let status = response.status().as_u16();
    (status, response.text().await.unwrap_or_default())
}

#[tokio::test]
async fn a_dead_letter_replayed_after_the_fix_is_applied_once_however_often_it_is_replayed() {
    // Arrange: the connection looks for the id where the payload has none.
    let daemon = TestDaemon::start(&hooks("/data/deal_id")).await;
    let body = serde_json::to_vec(&serde_json::json!({
        "type": "cart.updated",
        "data": {"id": "cart-77", "stage": "checkout", "email": "ada@shop.example",
                 "amount": "12.50", "currency": "EUR", "updated_at": "2026-01-05T10:00:00Z"}
    }))
    .unwrap();
    let (status, answer) = post_hook(&daemon, "msg_77", &body).await;
    assert_eq!(status, 400, "{answer}");

    let listed = cli_json(&daemon, &["inbox", "dead-letters", "list"]).await;
    let letters = listed.as_array().unwrap();
    assert_eq!(letters.len(), 1, "{listed}");
    let letter = letters[0]["id"].as_i64().unwrap().to_string();
    assert_eq!(letters[0]["connection"], "hooks");
    assert_eq!(letters[0]["delivery_id"], "msg_77");
    assert!(
        letters[0]["reason"]
            .as_str()
            .unwrap()
            .contains("/data/deal_id"),
        "{listed}"
    );
    assert_eq!(letters[0]["replayed_at"], serde_json::Value::Null);
    let shown = cli_json(&daemon, &["inbox", "dead-letters", "show", &letter]).await;
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(shown["body"].as_str().unwrap()).unwrap(),
        serde_json::from_slice::<serde_json::Value>(&body).unwrap()
    );
    let (code, table, _) = cli(&daemon, &["inbox", "dead-letters", "show", &letter]).await;
    assert_eq!(code, 0);
    assert!(
        table.contains("cart-77") && table.contains("webhook-id"),
        "{table}"
    );

    // Replayed before the fix: it still does not read, and nothing is queued.
    let (code, _, stderr) = cli(&daemon, &["inbox", "dead-letters", "replay", &letter]).await;
    assert_eq!(code, 1, "{stderr}");
    assert!(
        stderr.contains("still does not read") && stderr.contains("/data/deal_id"),
        "{stderr}"
    );
    assert_eq!(
        inbox(&daemon)
            .query_row("SELECT count(*) FROM webhook_inbox", [], |r| r
                .get::<_, i64>(0))
            .unwrap(),
        0
    );

    // The fix: the right pointer, applied by a reload.
    daemon.write_config(&hooks("/data/id"));
    daemon.signal("HUP");
    daemon.wait_for_log("config reloaded", WAIT).await;

    // Act: replay, then replay again.
    let replayed = cli_json(&daemon, &["inbox", "dead-letters", "replay", &letter]).await;
    assert_eq!(replayed["outcome"], "queued", "{replayed}");
    let inbox_id = replayed["inbox_id"].as_i64().unwrap();
    let deal = eventually("the replayed cart to be stored", WAIT, || async {
        let deals = daemon.count("SELECT count(*) FROM deals WHERE external_id = 'cart-77'");
        (deals > 0).then_some(deals)
    })
    .await;
    assert_eq!(deal, 1);
    let processed_at = eventually("the inbox row to be processed", WAIT, || async {
        inbox(&daemon)
            .query_row(
                "SELECT processed_at FROM webhook_inbox WHERE id = ?1 AND state = 'processed'",
                [inbox_id],
                |r| r.get::<_, i64>(0),
            )
            .ok()
    })
    .await;
    let again = cli_json(&daemon, &["inbox", "dead-letters", "replay", &letter]).await;
    assert_eq!(again["outcome"], "already_replayed", "{again}");
    assert_eq!(again["inbox_id"], inbox_id);
    // The vendor's own retry of the delivery is a duplicate of the replay.
    let (status, answer) = post_hook(&daemon, "msg_77", &body).await;
    assert_eq!(
        (status, answer.contains("duplicate")),
        (200, true),
        "{answer}"
    );

    // Assert: one inbox row, processed once; one deal, entered once.
    let db = inbox(&daemon);
    let (rows, processed): (i64, i64) = db
        .query_row(
            "SELECT count(*), max(processed_at) FROM webhook_inbox WHERE delivery_id = 'msg_77'",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    assert_eq!((rows, processed), (1, processed_at));
    assert_eq!(
        daemon.count("SELECT count(*) FROM deals WHERE external_id = 'cart-77'"),
        1
    );
    assert_eq!(
        daemon.count(
            "SELECT count(*) FROM stage_history h JOIN deals d ON d.id = h.deal_id WHERE d.external_id = 'cart-77'"
        ),
        1
    );
    let shown = cli_json(&daemon, &["inbox", "dead-letters", "show", &letter]).await;
    assert_eq!(shown["replayed_as"], inbox_id);
    assert_eq!(shown["replay_state"], "processed");

    let (code, _, stderr) = cli(&daemon, &["inbox", "dead-letters", "replay", "9999"]).await;
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("no dead letter with id 9999"), "{stderr}");
}

#[tokio::test]
async fn a_failed_email_retried_goes_back_to_pending_and_is_received_once() {
    let smtp = SmtpServer::start().await;
    smtp.refuse(Some("554 5.7.1 rejected by policy"));
    let daemon = TestDaemon::start(&format!("{}\n{RULES}", email(&smtp, ""))).await;
    let store = Store::open(&daemon.db_path).unwrap();
    let now = Utc::now() - chrono::Duration::seconds(2);
    let deal = Put {
        connection: "crm",
        id: "E",
        stage: stage("sales", "proposal"),
        status: DealStatus::Open,
        contact: None,
        consent: None,
        owner_email: Some("grace@crm.example"),
        created_at: now,
        entered_at: now,
    }
    .write(&store)
    .await;
    let (state, reason) = step_one(&daemon, deal, "alert").await;
    assert_eq!(state, "failed");
    assert!(reason.unwrap().contains("5.7.1"));
    assert!(smtp.messages().is_empty());
    let failed = cli_json(&daemon, &["outbox", "list", "--state", "failed"]).await;
    assert_eq!(failed.as_array().unwrap().len(), 1, "{failed}");
    let id = failed[0]["id"].as_i64().unwrap().to_string();

    // The server accepts again; the operator retries.
    smtp.refuse(None);
    let retried = cli_json(&daemon, &["outbox", "retry", &id]).await;
    assert_eq!(retried["outcome"], "queued", "{retried}");
    assert_eq!(retried["row"]["state"], "pending");
    let sent = eventually("the retried email to be sent", WAIT, || async {
        let rows = rows(&daemon, deal, "alert");
        (rows[0].state == "sent").then_some(rows)
    })
    .await;
    assert_eq!(sent.len(), 1);
    let received: Vec<_> = smtp
        .messages()
        .into_iter()
        .filter(|m| m.rcpt_to == ["grace@crm.example"])
        .collect();
    assert_eq!(received.len(), 1);

    // A second retry changes nothing: the email was sent.
    let (code, _, stderr) = cli(&daemon, &["outbox", "retry", &id]).await;
    assert_eq!(code, 2, "{stderr}");
    assert!(
        stderr.contains("is sent") && stderr.contains("only a failed email"),
        "{stderr}"
    );
    assert_eq!(rows(&daemon, deal, "alert")[0].state, "sent");
    assert_eq!(smtp.messages().len(), 1);
    let (code, _, stderr) = cli(&daemon, &["outbox", "retry", "9999"]).await;
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("no outbox row with id 9999"), "{stderr}");
}

#[tokio::test]
async fn a_suppression_added_blocks_the_send_and_once_removed_the_next_one_goes() {
    let smtp = SmtpServer::start().await;
    let daemon = TestDaemon::start(&format!("{}\n{RULES}", email(&smtp, ""))).await;
    let store = Store::open(&daemon.db_path).unwrap();

    let added = cli_json(
        &daemon,
        &[
            "suppressions",
            "add",
            "Ada@Shop.example",
            "--note",
            "asked by phone",
        ],
    )
    .await;
    assert_eq!(added["outcome"], "added", "{added}");
    let listed = cli_json(&daemon, &["suppressions", "list"]).await;
    assert_eq!(listed[0]["email"], "ada@shop.example", "{listed}");
    assert_eq!(listed[0]["reason"], "manual");
    assert_eq!(listed[0]["source"], "asked by phone");
    let again = cli_json(&daemon, &["suppressions", "add", "ada@shop.example"]).await;
    assert_eq!(again["outcome"], "already_suppressed");

    let blocked = Put::cart("first", "ada@shop.example", Some(true))
        .write(&store)
        .await;
    let (state, reason) = step_one(&daemon, blocked, "carts").await;
    assert_eq!(state, "skipped");
    assert!(reason.unwrap().contains("recipient is suppressed (manual)"));
    assert!(smtp.messages().is_empty());

    let removed = cli_json(&daemon, &["suppressions", "remove", "ada@shop.example"]).await;
    assert_eq!(removed["outcome"], "removed", "{removed}");
    assert_eq!(
        cli_json(&daemon, &["suppressions", "list"]).await,
        serde_json::json!([])
    );
    let (code, _, stderr) = cli(&daemon, &["suppressions", "remove", "ada@shop.example"]).await;
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("is not suppressed"), "{stderr}");
    let (code, _, stderr) = cli(&daemon, &["suppressions", "add", "not an address"]).await;
    assert_eq!(code, 2, "{stderr}");

    let allowed = Put::cart("second", "ada@shop.example", Some(true))
        .write(&store)
        .await;
    let (state, _) = step_one(&daemon, allowed, "carts").await;
    assert_eq!(state, "sent");
    let received: Vec<_> = smtp
        .messages()
        .into_iter()
        .filter(|m| m.rcpt_to == ["ada@shop.example"])
        .collect();
    assert_eq!(received.len(), 1);
}

#[tokio::test]
async fn quarantine_retry_reads_the_record_again_and_stores_it_once() {
    use crate::harness::vendors::hubspot::{HsDeal, HubSpot};
    let hubspot = HubSpot::start("pat-test", None).await;
    let modified = Utc::now().timestamp_millis() - 60_000;
    let mut bad = HsDeal::new(4242, "Broken amount", "appointmentscheduled", modified);
    bad.amount = Some("twelve".into());
    hubspot.put(bad);
    hubspot.put(HsDeal::new(4243, "Fine", "appointmentscheduled", modified));
    // One sync at start, the next an hour later: the quarantine stays as it is.
    let daemon = TestDaemon::start(&format!(
        r#"
[connections.hs]
connector = "hubspot"
base_url = "{}"
token = "pat-test"
poll_interval = "1h"
"#,
        hubspot.url()
    ))
    .await;
    eventually("the bad record to be quarantined", WAIT, || async {
        (daemon.count("SELECT count(*) FROM quarantine") > 0).then_some(())
    })
    .await;
    let listed = cli_json(&daemon, &["quarantine", "list", "--connection", "hs"]).await;
    assert_eq!(listed.as_array().unwrap().len(), 1, "{listed}");
    assert_eq!(listed[0]["external_id"], "4242");
    assert!(
        listed[0]["error"].as_str().unwrap().contains("amount"),
        "{listed}"
    );
    let id = listed[0]["id"].as_i64().unwrap().to_string();
    let shown = cli_json(&daemon, &["quarantine", "show", &id]).await;
    assert!(shown["raw"].as_str().unwrap().contains("twelve"), "{shown}");
    assert_eq!(
        daemon.count("SELECT count(*) FROM deals WHERE external_id = '4242'"),
        0
    );

    // Still broken at the source: it stays quarantined.
    let (code, _, stderr) = cli(&daemon, &["quarantine", "retry", &id]).await;
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("stays quarantined"), "{stderr}");

    // Fixed at the source: the retry reads it again, beside the running daemon.
    hubspot.update(4242, |deal| deal.amount = Some("12.50".into()));
    let retried = cli_json(&daemon, &["quarantine", "retry", &id]).await;
    assert_eq!(retried["outcome"], "stored", "{retried}");
    assert_eq!(retried["removed_entries"], 1);
    let (amount, deal_id): (i64, i64) = daemon
        .db()
        .query_row(
            "SELECT amount_minor, id FROM deals WHERE connection = 'hs' AND external_id = '4242'",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    assert_eq!(amount, 1250);
    assert_eq!(retried["deal_id"], deal_id);
    assert_eq!(daemon.count("SELECT count(*) FROM quarantine"), 0);
    assert_eq!(
        hubspot.faults().count("/crm/v3/objects/deals/4242"),
        2,
        "each retry read the record from the source"
    );
    let (code, _, stderr) = cli(&daemon, &["quarantine", "retry", &id]).await;
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("no quarantined record with id"), "{stderr}");
    assert_eq!(
        daemon.count("SELECT count(*) FROM deals WHERE external_id = '4242'"),
        1
    );
    let (code, _, stderr) = cli(&daemon, &["quarantine", "list", "--connection", "nope"]).await;
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("known: hs"), "{stderr}");
}
