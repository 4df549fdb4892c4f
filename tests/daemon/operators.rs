//! What an operator does beside the service: commands as the service user with the
//! service's config and its systemd credentials.

use crate::harness::daemon::{binary, run_cli_without};
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
        stdout.contains("credentials: 4 not available here, so not checked"),
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
