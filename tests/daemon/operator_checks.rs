//! What an operator meets, through the real binary: `check` and `check --online`
//! against a mock CRM, a closed port, the real SMTP test server and a read-only data
//! directory; errors that name what to fix, once; filters that refuse typos; `sync`,
//! `stages`, completions and the man page; outbox rows that say at once why they will
//! not be sent; SMTP failures on `/readyz` and in a metric.

use crate::followups::{config, messages_to, outbox_rows, put_cart, store};
use crate::foundation::{demo_connection, mount_tmpfs};
use crate::harness::daemon::{TestDaemon, run_cli};
use crate::harness::smtp::SmtpServer;
use crate::harness::vendors::hubspot::{HsDeal, HubSpot};
use crate::harness::{eventually, free_port, skip};
use crate::pull::hubspot_connection;
use std::path::Path;
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(20);
/// `dealsync check`'s exit code when the config is valid and the environment is not.
const EX_UNAVAILABLE: i32 = 69;

/// Writes a config with its own storage path and listen address into `dir`.
fn write_config(dir: &Path, listen_port: u16, body: &str) -> String {
    let path = dir.join("dealsync.toml");
    std::fs::write(
        &path,
        format!(
            "[storage]\npath = \"{}\"\n\n[server]\nlisten = \"127.0.0.1:{listen_port}\"\n\n{body}",
            dir.join("data/dealsync.db").display()
        ),
    )
    .unwrap();
    path.to_str().unwrap().to_owned()
}

/// The demo connection of `foundation`, with "Trial Use" misspelt and "Referral
/// Partner" left unmapped.
fn demo_with_typo() -> String {
    demo_connection("demo")
        .replace("\"Referral Partner\" = \"lead_generation\"\n", "")
        .replace(
            "\"Trial Use\" = \"proposal\"",
            "\"Trial Usage\" = \"proposal\"",
        )
}

#[tokio::test]
async fn check_on_a_fresh_store_says_no_stages_were_discovered_rather_than_all_mapped() {
    let dir = tempfile::tempdir().unwrap();
    // An email provider's bounce webhooks carry no deals: no stages to wait for.
    let bounces = "\n[connections.bounces]\nconnector = \"postmark\"\nwebhook_secret = \"hook:pm-password-0123\"\n";
    let config = write_config(
        dir.path(),
        free_port(),
        &format!("{}{bounces}", demo_with_typo()),
    );
    let (code, stdout, stderr) = run_cli(&["--config", &config, "check"], &[]).await;
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert!(
        stdout.contains("no stages discovered yet for demo ("),
        "{stdout}"
    );
    assert!(!stdout.contains("is mapped"), "{stdout}");
}

#[tokio::test]
async fn check_names_a_mapping_key_matching_no_native_stage_and_each_unmapped_stage_once() {
    let daemon = TestDaemon::start(&demo_with_typo()).await;
    // Deals kept as unmapped in the store, in a stage discovery knows too: the old
    // check named such a stage once per source of the fact.
    let stage: String = eventually("a deal kept as unmapped", WAIT, || async {
        daemon
            .db()
            .query_row(
                "SELECT native_stage FROM deals WHERE stage = 'unmapped' LIMIT 1",
                [],
                |r| r.get(0),
            )
            .ok()
    })
    .await;
    let config = daemon.config_path.to_str().unwrap().to_owned();
    let (code, stdout, stderr) = run_cli(&["--config", &config, "check"], &[]).await;
    assert_eq!(code, 0, "warnings do not fail check: {stdout}{stderr}");
    let typo: Vec<&str> = stdout
        .lines()
        .filter(|line| line.contains("Trial Usage"))
        .collect();
    assert_eq!(typo.len(), 1, "{stdout}");
    assert!(
        typo[0].contains("stage_map")
            && typo[0].contains("matches no stage")
            && typo[0].contains("Trial Use,"),
        "the key, and the stages there are: {stdout}"
    );
    let naming = |native: &str| {
        stdout
            .lines()
            .filter(|line| {
                line.contains("warning:")
                    && line.contains(&format!("\"{native}\""))
                    && !line.contains("Trial Usage")
            })
            .count()
    };
    assert_eq!(naming(&stage), 1, "{stage} named once: {stdout}");
    assert_eq!(naming("Referral Partner"), 1, "{stdout}");
    assert!(!stdout.contains("no stages discovered"), "{stdout}");
}

#[tokio::test]
async fn stages_lists_each_mapping_once_with_descriptions_also_on_the_status_page_and_api() {
    let token = "operators-test-token-0123";
    let daemon = TestDaemon::start(&format!(
        "api_token = \"{token}\"\nstatus_page_auth = \"local\"\n{}",
        demo_connection("demo")
    ))
    .await;
    eventually("discovered stages", WAIT, || async {
        (daemon.count("SELECT count(*) FROM deals") > 0).then_some(())
    })
    .await;
    let config = daemon.config_path.to_str().unwrap().to_owned();
    let (code, stdout, _) = run_cli(&["--config", &config, "stages"], &[]).await;
    assert_eq!(code, 0);
    let demo_rows = stdout
        .lines()
        .filter(|line| line.contains("Product Demo") && line.contains("sales.needs_assessment"))
        .count();
    assert_eq!(demo_rows, 1, "{stdout}");
    // The default pipelines' entry and exit criteria.
    let description = "Entry: a prospect is identified.";
    assert!(stdout.contains(description), "{stdout}");

    let (status, page) = daemon.get("/").await;
    assert_eq!(status, 200);
    assert!(page.contains(description), "the status page");
    let response = daemon
        .http
        .get(daemon.url("/api/v1/pipelines"))
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 200);
    let body: serde_json::Value = response.json().await.unwrap();
    let stages = body["pipelines"][0]["stages"].as_array().unwrap();
    assert!(
        stages
            .iter()
            .all(|stage| !stage["description"].as_str().unwrap_or_default().is_empty()),
        "{body}"
    );
}

#[tokio::test]
async fn sync_on_a_webhook_only_connection_says_so_and_leaves_it_healthy() {
    let daemon = TestDaemon::start(
        "\n[connections.shop]\nconnector = \"shopify\"\nwebhook_secret = \"shpss_x\"\n",
    )
    .await;
    let config = daemon.config_path.to_str().unwrap().to_owned();
    let (code, stdout, stderr) = run_cli(&["--config", &config, "sync", "shop"], &[]).await;
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert!(stdout.contains("nothing to pull"), "{stdout}");
    assert_eq!(daemon.count("SELECT count(*) FROM sync_runs"), 0);
    let (_, page) = daemon.get("/").await;
    assert!(!page.contains("class=\"health health-failing\""), "{page}");
}

#[tokio::test]
async fn a_full_sync_of_the_demo_beside_the_daemon_never_moves_a_closed_deal_back() {
    let daemon = TestDaemon::start(&demo_connection("demo")).await;
    eventually("won or lost deals", WAIT, || async {
        (daemon.count("SELECT count(*) FROM deals WHERE status IN ('won', 'lost')") >= 2)
            .then_some(())
    })
    .await;
    let before = daemon.count("SELECT coalesce(max(id), 0) FROM stage_history");
    let config = daemon.config_path.to_str().unwrap().to_owned();
    let (code, stdout, stderr) =
        run_cli(&["--config", &config, "sync", "--full", "demo"], &[]).await;
    assert_eq!(code, 0, "{stdout}{stderr}");
    // In the demo's story a won or lost deal stays so: a change out of one is a new story.
    let reopened = daemon.count(&format!(
        "SELECT count(*) FROM stage_history WHERE id > {before}
           AND from_stage IN ('won', 'lost', 'purchase_completed', 'expired')"
    ));
    assert_eq!(reopened, 0, "closed deals moved back by the full sync");
}

#[tokio::test]
async fn unknown_filter_values_and_log_levels_exit_2_naming_the_valid_ones() {
    let dir = tempfile::tempdir().unwrap();
    let templates = concat!(env!("CARGO_MANIFEST_DIR"), "/config/templates");
    let config = write_config(
        dir.path(),
        free_port(),
        &format!(
            "[email]\ntransport = \"file\"\ndir = \"{}\"\nfrom = \"Shop <shop@example.com>\"\ntemplates = \"{templates}\"\n\n[followups.stalled]\nkind = \"transactional\"\nstage = \"sales.proposal\"\nto = \"owner\"\ntemplate = \"deal_stalled\"\nafter = \"1d\"\n{}",
            dir.path().join("outbox").display(),
            demo_connection("demo")
        ),
    );
    for (args, valid) in [
        (
            vec!["deals", "list", "--stage", "cart_abandonded"],
            "cart_abandoned",
        ),
        (vec!["deals", "list", "--connection", "dmeo"], "demo"),
        (vec!["deals", "list", "--pipeline", "sale"], "sales"),
        (vec!["deals", "list", "--status", "wonn"], "open, won, lost"),
        (vec!["outbox", "list", "--rule", "nosuch"], "stalled"),
        (vec!["outbox", "list", "--state", "done-ish"], "pending"),
        (vec!["--log-level", "verbose", "check"], "debug"),
    ] {
        let mut full = vec!["--config", config.as_str()];
        full.extend(args.iter().copied());
        let (code, stdout, stderr) = run_cli(&full, &[]).await;
        assert_eq!(code, 2, "{args:?}: {stdout}{stderr}");
        assert!(stderr.contains(valid), "{args:?} names {valid}: {stderr}");
    }
    let (code, _, stderr) = run_cli(
        &[
            "--config",
            &config,
            "deals",
            "list",
            "--stage",
            "cart_abandoned",
        ],
        &[],
    )
    .await;
    assert_eq!(code, 0, "a valid stage: {stderr}");
}

#[tokio::test]
async fn help_groups_global_flags_and_completions_and_the_man_page_come_from_the_parser() {
    let (code, stdout, _) = run_cli(&["deals", "list", "--help"], &[]).await;
    assert_eq!(code, 0);
    let (local, global) = stdout
        .split_once("Global options:")
        .unwrap_or_else(|| panic!("no global heading: {stdout}"));
    assert!(
        global.contains("--log-level") && !local.contains("--log-level"),
        "{stdout}"
    );
    assert!(local.contains("Only this canonical stage"), "{stdout}");
    let (code, script, _) = run_cli(&["completions", "bash"], &[]).await;
    assert_eq!(code, 0);
    assert!(
        script.contains("_dealsync") && script.contains("--log-level"),
        "{script}"
    );
    let (code, page, _) = run_cli(&["man"], &[]).await;
    assert_eq!(code, 0);
    assert!(
        page.starts_with(".ie") || page.contains(".TH dealsync"),
        "{page}"
    );
    assert!(page.contains("completions"), "{page}");
}

#[tokio::test]
async fn a_busy_listen_port_is_reported_once_with_its_address() {
    let holder = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = holder.local_addr().unwrap().port();
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), port, &demo_connection("demo"));
    let (code, _, stderr) = run_cli(&["--config", &config, "run"], &[]).await;
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains(&format!("127.0.0.1:{port}")), "{stderr}");
    assert_eq!(
        stderr.matches("Address already in use").count(),
        1,
        "{stderr}"
    );
    let (code, stdout, stderr) = run_cli(&["--config", &config, "check", "--online"], &[]).await;
    assert_eq!(code, EX_UNAVAILABLE, "{stdout}{stderr}");
    assert!(
        stdout.contains(&format!("FAILED listen 127.0.0.1:{port}")),
        "{stdout}"
    );
    drop(holder);
}

#[tokio::test]
async fn check_online_reaches_the_crm_and_smtp_and_names_host_port_and_cause_when_it_cannot() {
    let hubspot = HubSpot::start("pat-test", None).await;
    let smtp = SmtpServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let email = format!(
        "[email]\ntransport = \"smtp\"\nurl = \"{}\"\nfrom = \"Shop <shop@example.com>\"\n",
        smtp.url()
    );
    let good = write_config(
        dir.path(),
        free_port(),
        &format!("{email}{}", hubspot_connection("hs", &hubspot.url(), "")),
    );
    let (code, stdout, stderr) = run_cli(&["--config", &good, "check", "--online"], &[]).await;
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert!(stdout.contains("connection hs (hubspot): ok"), "{stdout}");
    assert!(
        stdout.contains(&format!("email smtp://127.0.0.1:{}: ok", smtp.port())),
        "{stdout}"
    );
    assert!(
        hubspot.faults().count("/crm/v3/pipelines") >= 1,
        "one read through the connector"
    );
    assert!(smtp.messages().is_empty(), "no message is sent");

    // A wrong token: the CRM refuses it.
    let refused = write_config(
        dir.path(),
        free_port(),
        &format!(
            "{email}{}",
            hubspot_connection("hs", &hubspot.url(), "").replace("pat-test", "pat-wrong")
        ),
    );
    let (code, stdout, _) = run_cli(&["--config", &refused, "check", "--online"], &[]).await;
    assert_eq!(code, EX_UNAVAILABLE, "{stdout}");
    assert!(
        stdout.contains("FAILED connection hs (hubspot)"),
        "{stdout}"
    );

    // Nothing listens at either address.
    let closed = free_port();
    let down = write_config(
        dir.path(),
        free_port(),
        &format!(
            "[email]\ntransport = \"smtp\"\nurl = \"smtp://127.0.0.1:{closed}\"\nfrom = \"Shop <shop@example.com>\"\n{}",
            hubspot_connection("hs", &format!("http://127.0.0.1:{closed}"), "")
        ),
    );
    let (code, stdout, stderr) = run_cli(&["--config", &down, "check", "--online"], &[]).await;
    assert_eq!(code, EX_UNAVAILABLE, "{stdout}{stderr}");
    let crm = stdout
        .lines()
        .find(|line| line.contains("FAILED connection hs"))
        .unwrap_or_else(|| panic!("{stdout}"));
    assert!(
        crm.contains(&format!("127.0.0.1:{closed}")) && crm.contains("Connection refused"),
        "host, port and the OS error: {crm}"
    );
    assert!(
        stdout.contains(&format!("FAILED email smtp://127.0.0.1:{closed}")),
        "{stdout}"
    );
    assert!(
        stderr.contains("the config is valid, but the environment is not"),
        "{stderr}"
    );
}

struct Unmount(std::path::PathBuf);

impl Drop for Unmount {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

#[tokio::test]
async fn a_read_only_data_directory_is_found_by_check_and_named_by_every_command() {
    let disk = tempfile::tempdir().unwrap();
    if let Err(reason) = mount_tmpfs(disk.path(), "16m") {
        return skip(
            "a_read_only_data_directory_is_found_by_check_and_named_by_every_command",
            &reason,
        );
    }
    let _unmount = Unmount(disk.path().to_owned());
    let dir = tempfile::tempdir().unwrap();
    let data = disk.path().join("data");
    let body = demo_connection("demo");
    let config = dir.path().join("dealsync.toml");
    std::fs::write(
        &config,
        format!(
            "[storage]\npath = \"{}\"\n\n[server]\nlisten = \"127.0.0.1:{}\"\n{body}",
            data.join("dealsync.db").display(),
            free_port()
        ),
    )
    .unwrap();
    let config = config.to_str().unwrap();

    // A store that exists, on a disk then mounted read-only.
    let (code, _, stderr) = run_cli(&["--config", config, "sync"], &[]).await;
    assert_eq!(code, 0, "{stderr}");
    let remount = std::process::Command::new("mount")
        .args(["-o", "remount,ro"])
        .arg(disk.path())
        .status()
        .unwrap();
    assert!(remount.success());
    let (code, stdout, stderr) = run_cli(&["--config", config, "check"], &[]).await;
    assert_eq!(code, EX_UNAVAILABLE, "{stdout}{stderr}");
    assert!(
        stderr.contains("is not writable: Read-only file system"),
        "{stderr}"
    );
    let (code, _, stderr) = run_cli(&["--config", config, "run"], &[]).await;
    assert_eq!(code, 1);
    assert!(
        stderr.contains(&data.display().to_string())
            && stderr.contains("Read-only file system")
            && !stderr.contains("Error code 14"),
        "{stderr}"
    );

    // A data directory still to be created, on a read-only disk: check said ok.
    std::fs::write(
        dir.path().join("fresh.toml"),
        format!(
            "[storage]\npath = \"{}\"\n{body}",
            disk.path().join("new/dealsync.db").display()
        ),
    )
    .unwrap();
    let fresh = dir.path().join("fresh.toml");
    let (code, stdout, stderr) =
        run_cli(&["--config", fresh.to_str().unwrap(), "check"], &[]).await;
    assert_eq!(code, EX_UNAVAILABLE, "{stdout}{stderr}");
    assert!(stderr.contains("not writable"), "{stderr}");
}

#[tokio::test]
async fn a_won_carts_later_emails_show_at_once_why_they_will_not_be_sent() {
    let smtp = SmtpServer::start().await;
    let rules = r#"
[followups.carts]
kind = "marketing"
stage = "ecommerce.cart_abandoned"
steps = [
  { after = "100ms", template = "cart_reminder" },
  { after = "1h", template = "cart_reminder" },
  { after = "2h", template = "cart_discount", discount_code = "SAVE10" },
]
"#;
    let daemon = TestDaemon::start(&config(&smtp, "", rules)).await;
    let store = store(&daemon);
    let now = chrono::Utc::now();
    let cart = put_cart(
        &store,
        "shop",
        "c1",
        "ada@example.com",
        Some(true),
        "cart_abandoned",
        now,
    )
    .await;
    eventually("the first email", WAIT, || async {
        (messages_to(&smtp, "ada@example.com").len() == 1).then_some(())
    })
    .await;
    put_cart(
        &store,
        "shop",
        "c1",
        "ada@example.com",
        Some(true),
        "purchase_completed",
        chrono::Utc::now(),
    )
    .await;
    // The later steps are an hour away: only an early decision shows them stopped now.
    let rows = eventually("the later steps stopped", WAIT, || async {
        let rows = outbox_rows(&daemon, cart);
        rows.iter()
            .skip(1)
            .all(|(_, state, _)| state == "skipped")
            .then_some(rows)
    })
    .await;
    for (_, _, reason) in rows.iter().skip(1) {
        assert!(
            reason
                .as_deref()
                .unwrap_or_default()
                .contains("left the rule's stages (now in ecommerce.purchase_completed)"),
            "{rows:?}"
        );
    }
    let config = daemon.config_path.to_str().unwrap().to_owned();
    let (code, stdout, _) = run_cli(
        &[
            "--config",
            &config,
            "outbox",
            "list",
            "--deal",
            &cart.to_string(),
        ],
        &[],
    )
    .await;
    assert_eq!(code, 0);
    assert!(!stdout.contains("pending"), "{stdout}");
}

#[tokio::test]
async fn an_smtp_refusal_shows_on_readyz_and_in_the_metrics_until_a_send_succeeds() {
    let smtp = SmtpServer::start().await;
    let rules = r#"
[followups.carts]
kind = "marketing"
stage = "ecommerce.cart_abandoned"
template = "cart_reminder"
after = "100ms"
"#;
    let daemon = TestDaemon::start(&config(&smtp, "", rules)).await;
    let store = store(&daemon);
    // The sink refuses recipients containing "bounce" with a permanent 550.
    put_cart(
        &store,
        "shop",
        "b1",
        "bounce@example.com",
        Some(true),
        "cart_abandoned",
        chrono::Utc::now(),
    )
    .await;
    let readyz = eventually("an attention entry for email", WAIT, || async {
        let (_, body) = daemon.get("/readyz").await;
        let json: serde_json::Value = serde_json::from_str(&body).ok()?;
        json["attention"]["email delivery"]
            .as_str()
            .map(str::to_owned)
    })
    .await;
    assert!(
        readyz.contains("550") || readyz.contains("permanent"),
        "{readyz}"
    );
    let (_, metrics) = daemon.get("/metrics").await;
    assert!(
        metrics.contains("dealsync_email_delivery_failures_total{kind=\"permanent\"} 1"),
        "{metrics}"
    );

    put_cart(
        &store,
        "shop",
        "g1",
        "grace@example.com",
        Some(true),
        "cart_abandoned",
        chrono::Utc::now(),
    )
    .await;
    eventually(
        "the attention entry cleared by a delivery",
        WAIT,
        || async {
            let (_, body) = daemon.get("/readyz").await;
            let json: serde_json::Value = serde_json::from_str(&body).ok()?;
            (json["attention"].get("email delivery").is_none()
                && messages_to(&smtp, "grace@example.com").len() == 1)
                .then_some(())
        },
    )
    .await;
}

#[tokio::test]
async fn quiet_sync_runs_log_at_debug_and_json_logs_carry_lists_as_arrays() {
    let hubspot = HubSpot::start("pat-test", None).await;
    let dir = tempfile::tempdir().unwrap();
    let (mut child, lines) = run_with_debug_json_logs(&hubspot, dir.path());
    let runs = eventually("three quiet sync runs", WAIT, || async {
        let lines = lines.lock().unwrap();
        let runs: Vec<serde_json::Value> = lines
            .iter()
            .filter(|line| line["message"] == "sync run finished")
            .cloned()
            .collect();
        (runs.len() >= 3).then_some(runs)
    })
    .await;
    assert!(
        runs.iter()
            .all(|run| run["level"] == "DEBUG" && run["fetched"] == 0),
        "{runs:#?}"
    );
    let running = lines
        .lock()
        .unwrap()
        .iter()
        .find(|line| line["message"] == "dealsync is running")
        .cloned()
        .expect("the start line");
    assert_eq!(
        running["connections"],
        serde_json::json!(["hs"]),
        "{running}"
    );
    child.start_kill().unwrap();
}

/// A sync run that changed something logs "sync run finished" at INFO with its
/// counts, whichever of them changed: a deal created, a deal moved to another stage,
/// a deal renamed, a deal created in a native stage nothing maps. Runs that changed nothing stay at
/// DEBUG.
#[tokio::test]
async fn a_sync_run_that_changes_deals_logs_at_info_with_what_it_changed() {
    let hubspot = HubSpot::start("pat-test", None).await;
    let now_ms = || chrono::Utc::now().timestamp_millis();
    hubspot.put(HsDeal::new(
        1,
        "Acme",
        "appointmentscheduled",
        now_ms() - 60_000,
    ));
    let dir = tempfile::tempdir().unwrap();
    let (mut child, lines) = run_with_debug_json_logs(&hubspot, dir.path());
    let counts = |run: &serde_json::Value| {
        [
            "created",
            "updated",
            "stage_changes",
            "unmapped",
            "quarantined",
        ]
        .map(|field| {
            run[field]
                .as_u64()
                .unwrap_or_else(|| panic!("{field} in {run}"))
        })
    };
    // The INFO run after `seen` runs with the counts `wanted`.
    let info_run = |seen: usize, wanted: [u64; 5]| {
        let lines = lines.clone();
        async move {
            eventually("a sync run logged at INFO", WAIT, || async {
                let lines = lines.lock().unwrap();
                let runs: Vec<&serde_json::Value> = lines
                    .iter()
                    .filter(|line| line["message"] == "sync run finished")
                    .collect();
                let index = runs
                    .iter()
                    .enumerate()
                    .skip(seen)
                    .find(|(_, run)| run["level"] == "INFO")?
                    .0;
                assert_eq!(counts(runs[index]), wanted, "{:#?}", runs[index]);
                assert!(
                    runs[seen..index].iter().all(|run| run["level"] == "DEBUG"),
                    "runs that changed nothing log at DEBUG: {runs:#?}"
                );
                Some(index + 1)
            })
            .await
        }
    };
    // [created, updated, stage_changes, unmapped, quarantined]; a new deal's entry
    // into its first stage is a stage change (it writes a history row).
    let seen = info_run(0, [1, 0, 1, 0, 0]).await;
    hubspot.update(1, |deal| {
        deal.stage = "qualifiedtobuy".into();
        deal.modified_ms = now_ms();
    });
    let seen = info_run(seen, [0, 1, 1, 0, 0]).await;
    hubspot.update(1, |deal| {
        deal.name = "Acme renewal".into();
        deal.modified_ms = now_ms();
    });
    let seen = info_run(seen, [0, 1, 0, 0, 0]).await;
    hubspot.put(HsDeal::new(2, "Globex", "mystery", now_ms()));
    info_run(seen, [1, 0, 1, 1, 0]).await;
    child.start_kill().unwrap();
}

/// Starts `dealsync run` on a HubSpot connection with JSON logs at DEBUG, and
/// collects its log lines.
fn run_with_debug_json_logs(
    hubspot: &HubSpot,
    dir: &Path,
) -> (
    tokio::process::Child,
    std::sync::Arc<std::sync::Mutex<Vec<serde_json::Value>>>,
) {
    use tokio::io::AsyncBufReadExt;
    let config = write_config(
        dir,
        free_port(),
        &hubspot_connection("hs", &hubspot.url(), ""),
    );
    let mut child = tokio::process::Command::new(crate::harness::daemon::binary())
        .args([
            "--config",
            &config,
            "--log-format",
            "json",
            "--log-level",
            "debug",
            "run",
        ])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::<serde_json::Value>::new()));
    let mut stderr = tokio::io::BufReader::new(child.stderr.take().unwrap()).lines();
    let sink = lines.clone();
    tokio::spawn(async move {
        while let Ok(Some(line)) = stderr.next_line().await {
            let parsed = serde_json::from_str(&line)
                .unwrap_or_else(|_| panic!("a log line that is not JSON: {line}"));
            sink.lock().unwrap().push(parsed);
        }
    });
    (child, lines)
}
