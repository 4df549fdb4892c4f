//! The foundation: config errors and `check`, health and metrics, signals, reload,
//! secrets kept out of logs, the schema guard.

use crate::harness::daemon::{TestDaemon, run_cli};
use crate::harness::{eventually, skip};
use std::time::Duration;

/// A demo connection at test pace.
pub fn demo_connection(name: &str) -> String {
    format!(
        r#"
[connections.{name}]
connector = "demo"
poll_interval = "1s"
settings = {{ seed = 7, pace = "100ms", deals = 20, carts = 10 }}

[connections.{name}.stage_map."Software Sales"]
"Inbound Lead" = "lead_generation"
"Referral Partner" = "lead_generation"
"Discovery Call" = "lead_qualification"
"Product Demo" = "needs_assessment"
"Trial Use" = "proposal"
"Feedback Collection" = "negotiation"
"License Agreement" = "closing"

[connections.{name}.stage_map."Real Estate"]
"New Inquiry" = "lead_generation"
"Qualified Buyer" = "lead_qualification"
"Property Viewing" = "needs_assessment"
"Offer Submission" = "proposal"
"Home Inspection" = "negotiation"
"Closing Agreement" = "closing"

[connections.{name}.stage_map."Web Shop"]
"Checkout" = "ecommerce.checkout_started"
"Order" = "ecommerce.purchase_completed"
"#
    )
}

#[tokio::test]
async fn check_exits_0_on_a_valid_config_and_78_naming_the_key_on_an_invalid_one() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.toml");
    std::fs::write(
        &good,
        format!(
            "[storage]\npath = \"{}/x.db\"\n{}",
            dir.path().display(),
            demo_connection("demo")
        ),
    )
    .unwrap();
    let (code, stdout, stderr) = run_cli(&["--config", good.to_str().unwrap(), "check"], &[]).await;
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert!(
        stdout.contains("connection demo (demo): enabled"),
        "{stdout}"
    );

    let bad = dir.path().join("bad.toml");
    std::fs::write(
        &bad,
        "[connections.crm]\nconnector = \"demo\"\npoll_interval = \"soon\"\n",
    )
    .unwrap();
    let (code, _, stderr) = run_cli(&["--config", bad.to_str().unwrap(), "check"], &[]).await;
    assert_eq!(code, 78, "{stderr}");
    assert!(
        stderr.contains("bad.toml:3: connections.crm.poll_interval"),
        "{stderr}"
    );

    let unknown = dir.path().join("unknown.toml");
    std::fs::write(&unknown, "[connections.crm]\nconnector = \"nosuchcrm\"\n").unwrap();
    let (code, _, stderr) = run_cli(&["--config", unknown.to_str().unwrap(), "check"], &[]).await;
    assert_eq!(code, 78, "{stderr}");
    assert!(
        stderr.contains("unknown connector \"nosuchcrm\" (known: "),
        "{stderr}"
    );

    let (code, _, _) = run_cli(
        &["--config", good.to_str().unwrap(), "no-such-command"],
        &[],
    )
    .await;
    assert_eq!(code, 2);
}

#[tokio::test]
async fn missing_env_vars_and_credentials_are_named_and_secrets_are_never_printed() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("dealsync.toml");
    std::fs::write(
        &path,
        format!(
            "[storage]\npath = \"{}/x.db\"\n[email]\ntransport = \"smtp\"\nurl = \"${{SMTP_URL}}\"\n[connections.crm]\nconnector = \"demo\"\ntoken = \"${{credential:crm_token}}\"\n",
            dir.path().display()
        ),
    )
    .unwrap();
    let (code, _, stderr) = run_cli(&["--config", path.to_str().unwrap(), "check"], &[]).await;
    assert_eq!(code, 78);
    assert!(
        stderr.contains("email.url: environment variable SMTP_URL is not set"),
        "{stderr}"
    );
    // A credential `check` cannot read here is a note, not a failure (the service
    // reads it); the daemon itself refuses to start without it, naming it.
    let smtp = [("SMTP_URL", "smtp://127.0.0.1:2525")];
    let (code, stdout, stderr) =
        run_cli(&["--config", path.to_str().unwrap(), "check"], &smtp).await;
    assert_eq!(code, 0, "{stdout}{stderr}");
    assert!(
        stdout.contains("note: connections.crm.token: ${credential:crm_token}"),
        "{stdout}"
    );
    let (code, _, stderr) = run_cli(&["--config", path.to_str().unwrap(), "run"], &smtp).await;
    assert_eq!(code, 78, "{stderr}");
    assert!(stderr.contains("connections.crm.token"), "{stderr}");
    assert!(stderr.contains("CREDENTIALS_DIRECTORY"), "{stderr}");

    // With both present, nothing secret shows in check's output.
    let credentials = dir.path().join("creds");
    std::fs::create_dir(&credentials).unwrap();
    std::fs::write(credentials.join("crm_token"), "pat-na1-verysecret\n").unwrap();
    let env = [
        ("SMTP_URL", "smtp://user:smtp-password-xyz@127.0.0.1:2525"),
        ("CREDENTIALS_DIRECTORY", credentials.to_str().unwrap()),
    ];
    let (code, stdout, stderr) = run_cli(
        &[
            "--config",
            path.to_str().unwrap(),
            "--log-level",
            "trace",
            "check",
        ],
        &env,
    )
    .await;
    assert_eq!(code, 0, "{stdout}{stderr}");
    for secret in ["pat-na1-verysecret", "smtp-password-xyz"] {
        assert!(
            !stdout.contains(secret) && !stderr.contains(secret),
            "{stdout}{stderr}"
        );
    }
}

#[tokio::test]
async fn healthz_readyz_and_metrics_report_the_running_daemon() {
    let started = chrono::Utc::now().timestamp_millis() as f64 / 1000.0;
    let daemon = TestDaemon::start(&demo_connection("demo")).await;
    let (status, body) = daemon.get("/healthz").await;
    assert_eq!(status, 200, "{body}");
    let (status, body) = daemon.get("/readyz").await;
    assert_eq!(status, 200);
    let ready: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(ready["ready"], true);
    assert_eq!(ready["connections"]["demo"], "started");

    let metrics = eventually(
        "deal gauges in /metrics",
        Duration::from_secs(15),
        || async {
            let (_, body) = daemon.get("/metrics").await;
            (body.contains("dealsync_deals{")
                && body.contains("dealsync_last_successful_sync_timestamp_seconds{"))
            .then_some(body)
        },
    )
    .await;
    assert!(
        metrics.contains("dealsync_build_info{version=\""),
        "{metrics}"
    );
    assert!(metrics.contains("pipeline=\"sales\""), "{metrics}");
    assert!(
        metrics.contains("dealsync_sync_runs_total{connection=\"demo\",status=\"succeeded\"}"),
        "{metrics}"
    );
    assert!(
        metrics.contains(
            "dealsync_http_requests_total{route=\"/readyz\",method=\"GET\",status=\"200\"}"
        ),
        "{metrics}"
    );
    assert!(metrics.contains("dealsync_unmapped_deals"), "{metrics}");
    // The last successful run's time, in Unix seconds (what an alert compares with
    // `time()`): between the daemon's start and now.
    let last_success: f64 = metrics
        .lines()
        .find_map(|line| {
            line.strip_prefix(
                "dealsync_last_successful_sync_timestamp_seconds{connection=\"demo\"} ",
            )
        })
        .unwrap_or_else(|| panic!("no last success of demo in {metrics}"))
        .parse()
        .unwrap();
    let now = chrono::Utc::now().timestamp_millis() as f64 / 1000.0;
    assert!(
        started - 1.0 <= last_success && last_success <= now + 1.0,
        "{last_success} not within [{started}, {now}]"
    );
    // The first run, with no cursor yet, reads everything: it is recorded as a full
    // sync; the runs after it are incremental.
    let runs: Vec<bool> = {
        let db = daemon.db();
        let mut statement = db
            .prepare("SELECT full FROM sync_runs WHERE connection = 'demo' ORDER BY id")
            .unwrap();
        statement
            .query_map([], |row| row.get(0))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap()
    };
    assert_eq!(runs.first(), Some(&true), "{runs:?}");
    assert!(runs[1..].iter().all(|full| !full), "{runs:?}");
}

#[tokio::test]
async fn sigterm_drains_and_exits_0() {
    let mut daemon = TestDaemon::start(&demo_connection("demo")).await;
    daemon.signal("TERM");
    let status = daemon.wait_exit(Duration::from_secs(10)).await;
    assert_eq!(status.code(), Some(0), "{}", daemon.logs());
    assert!(
        daemon.logs().contains("shutdown complete"),
        "{}",
        daemon.logs()
    );
}

#[tokio::test]
async fn sighup_applies_a_valid_config_and_keeps_the_old_one_on_an_invalid_one() {
    let daemon = TestDaemon::start(&demo_connection("first")).await;
    daemon.write_config(&format!(
        "{}{}",
        demo_connection("first"),
        demo_connection("second")
    ));
    daemon.signal("HUP");
    eventually(
        "the second connection after reload",
        Duration::from_secs(10),
        || async {
            let (_, body) = daemon.get("/readyz").await;
            body.contains("\"second\":\"started\"").then_some(())
        },
    )
    .await;

    daemon.write_config("[connections.first]\nconnector = \"demo\"\nbogus = 1\n");
    daemon.signal("HUP");
    daemon
        .wait_for_log("config reload refused", Duration::from_secs(10))
        .await;
    assert!(daemon.logs().contains("bogus"), "the refusal says why");
    let (status, body) = daemon.get("/readyz").await;
    assert_eq!(status, 200);
    assert!(
        body.contains("\"second\":\"started\""),
        "old config still in force: {body}"
    );
    let metrics = daemon.get("/metrics").await.1;
    assert!(
        metrics.contains("status=\"applied\"") && metrics.contains("status=\"refused\""),
        "{metrics}"
    );
}

/// Every secret of the config is put to use (the HubSpot token on every API call, the
/// webhook secret on a delivery accepted and one refused, the API token on the status
/// page), and none appears in the logs (stdout and stderr), an answer, the status page,
/// the metrics or `check`'s report.
#[tokio::test]
async fn secrets_do_not_reach_the_logs() {
    use crate::harness::vendors::hubspot::{HsDeal, HubSpot};
    use dealsync::connectors::signature::{self, Delivery, Scheme};
    const HS_TOKEN: &str = "pat-supersecret-123";
    const HOOK_SECRET: &str = "whsec-supersecret-456";
    const SMTP_PASSWORD: &str = "pw-supersecret-789";
    const API_TOKEN: &str = "api-supersecret-000";
    let hubspot = HubSpot::start(HS_TOKEN, None).await;
    hubspot.put(HsDeal::new(
        1002,
        "Acme expansion",
        "appointmentscheduled",
        chrono::Utc::now().timestamp_millis() - 3_600_000,
    ));
    let body = format!(
        r#"api_token = "${{API_TOKEN}}"
status_page_auth = "always"

[connections.hs]
connector = "hubspot"
base_url = "{}"
token = "${{HS_TOKEN}}"
webhook_secret = "${{HOOK_SECRET}}"
poll_interval = "1s"

[email]
transport = "smtp"
url = "${{SMTP_URL}}"
"#,
        hubspot.url()
    );
    let smtp_url = format!("smtp://u:{SMTP_PASSWORD}@127.0.0.1:1");
    let env = [
        ("API_TOKEN", API_TOKEN),
        ("HS_TOKEN", HS_TOKEN),
        ("HOOK_SECRET", HOOK_SECRET),
        ("SMTP_URL", smtp_url.as_str()),
    ];
    let daemon = TestDaemon::start_with_env(&body, &env).await;
    eventually(
        "deal 1002 pulled with the token",
        Duration::from_secs(15),
        || async {
            (daemon.count("SELECT count(*) FROM deals WHERE external_id = '1002'") == 1)
                .then_some(())
        },
    )
    .await;

    // A delivery signed with the webhook secret is taken; one signed otherwise is not.
    let uri = daemon.url("/webhooks/hs");
    let mut event = crate::harness::vendors::fixture("hubspot/webhook-deal-propertychange.json");
    event.as_array_mut().unwrap().truncate(1);
    let event = serde_json::to_vec(&event).unwrap();
    let mut answers = String::new();
    for (secret, expected) in [(HOOK_SECRET, 200), ("whsec-someone-else", 401)] {
        let delivery = Delivery {
            method: "POST",
            uri: &uri,
            body: &event,
            id: "",
        };
        let headers = signature::sign(
            &Scheme::HubSpotV3 {
                tolerance: signature::DEFAULT_TOLERANCE,
            },
            secret.as_bytes(),
            &delivery,
            std::time::SystemTime::now(),
        )
        .unwrap();
        let response = daemon
            .http
            .post(&uri)
            .headers(headers)
            .header("content-type", "application/json")
            .body(event.clone())
            .send()
            .await
            .unwrap();
        assert_eq!(response.status().as_u16(), expected);
        answers.push_str(&response.text().await.unwrap());
    }
    eventually(
        "the accepted delivery applied",
        Duration::from_secs(15),
        || async {
            let processed: i64 = daemon
                .inbox_read_only()
                .query_row(
                    "SELECT count(*) FROM webhook_inbox WHERE state = 'processed'",
                    [],
                    |row| row.get(0),
                )
                .unwrap();
            (processed == 1).then_some(())
        },
    )
    .await;

    // The status page with the API token, and without it; the metrics.
    let status_page = |token: Option<&str>| {
        let mut request = daemon.http.get(daemon.url("/"));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        async move {
            let response = request.send().await.unwrap();
            (response.status().as_u16(), response.text().await.unwrap())
        }
    };
    let (code, page) = status_page(Some(API_TOKEN)).await;
    assert_eq!(code, 200, "{page}");
    assert!(page.contains("hs"), "{page}");
    let (code, refused) = status_page(Some("wrong")).await;
    assert_eq!(code, 401, "{refused}");
    let (code, metrics) = daemon.get("/metrics").await;
    assert_eq!(code, 200);
    assert!(metrics.contains("connection=\"hs\""), "{metrics}");
    let (code, check_out, check_err) = run_cli(
        &["--config", daemon.config_path.to_str().unwrap(), "check"],
        &env,
    )
    .await;

    let logs = daemon.logs();
    assert!(logs.contains("sync run finished"), "{logs}");
    let outputs = [
        ("logs", logs.as_str()),
        ("webhook answers", answers.as_str()),
        ("status page", page.as_str()),
        ("refusal", refused.as_str()),
        ("metrics", metrics.as_str()),
        ("check stdout", check_out.as_str()),
        ("check stderr", check_err.as_str()),
    ];
    for secret in [HS_TOKEN, HOOK_SECRET, SMTP_PASSWORD, API_TOKEN] {
        for (name, text) in outputs {
            assert!(
                !text.contains(secret),
                "secret {secret} in the {name} (check exit {code})"
            );
        }
    }
}

#[tokio::test]
async fn a_database_from_a_newer_dealsync_is_refused_and_left_untouched() {
    let dir = tempfile::tempdir().unwrap();
    let db_path = dir.path().join("future.db");
    {
        let db = rusqlite::Connection::open(&db_path).unwrap();
        db.execute_batch("CREATE TABLE x (y); PRAGMA user_version = 4242;")
            .unwrap();
    }
    let before = std::fs::read(&db_path).unwrap();
    let config = dir.path().join("dealsync.toml");
    std::fs::write(
        &config,
        format!(
            "[storage]\npath = \"{}\"\n[server]\nlisten = \"127.0.0.1:0\"\n",
            db_path.display()
        ),
    )
    .unwrap();
    let (code, _, stderr) = run_cli(&["--config", config.to_str().unwrap(), "run"], &[]).await;
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("schema version 4242"), "{stderr}");
    assert_eq!(std::fs::read(&db_path).unwrap(), before);
}

#[tokio::test]
async fn demo_deals_survive_kill_9_without_loss_or_duplicates() {
    let mut daemon = TestDaemon::start(&demo_connection("demo")).await;
    eventually("some demo deals", Duration::from_secs(10), || async {
        (daemon.count("SELECT count(*) FROM deals") >= 5).then_some(())
    })
    .await;
    daemon.kill_and_restart().await;
    eventually(
        "every demo deal and cart",
        Duration::from_secs(20),
        || async { (daemon.count("SELECT count(*) FROM deals") == 30).then_some(()) },
    )
    .await;
    // (UNIQUE(connection, external_id) already makes a deal stored twice impossible.)
    // A replayed page must not record a stage change twice: no two history rows of a
    // deal say the same move at the same time.
    assert_eq!(
        daemon.count(
            "SELECT count(*) FROM (SELECT 1 FROM stage_history
             GROUP BY deal_id, at, from_pipeline, from_stage, to_pipeline, to_stage
             HAVING count(*) > 1)"
        ),
        0,
        "a stage change recorded twice"
    );
    // Every deal's first history row is its creation; no deal has two.
    assert_eq!(
        daemon.count("SELECT count(*) FROM (SELECT deal_id FROM stage_history WHERE from_stage IS NULL GROUP BY deal_id HAVING count(*) > 1)"),
        0
    );
    let (code, stdout, _) = run_cli(
        &[
            "--config",
            daemon.config_path.to_str().unwrap(),
            "deals",
            "list",
            "--format",
            "csv",
            "--limit",
            "1000",
        ],
        &[],
    )
    .await;
    assert_eq!(code, 0);
    assert_eq!(stdout.lines().count(), 31, "header + 30 deals:\n{stdout}");
}

#[tokio::test]
async fn systemd_hears_ready_watchdog_and_stopping() {
    let dir = tempfile::tempdir().unwrap();
    let socket_path = dir.path().join("notify.sock");
    let socket = tokio::net::UnixDatagram::bind(&socket_path).unwrap();
    let mut daemon = TestDaemon::start_with_env(
        &demo_connection("demo"),
        &[
            ("NOTIFY_SOCKET", socket_path.to_str().unwrap()),
            ("WATCHDOG_USEC", "200000"),
        ],
    )
    .await;
    let mut heard = String::new();
    let mut buffer = vec![0u8; 4096];
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !(heard.contains("READY=1") && heard.contains("WATCHDOG=1")) {
        assert!(std::time::Instant::now() < deadline, "heard only: {heard}");
        if let Ok(Ok(n)) =
            tokio::time::timeout(Duration::from_millis(500), socket.recv(&mut buffer)).await
        {
            heard.push_str(&String::from_utf8_lossy(&buffer[..n]));
            heard.push('\n');
        }
    }
    assert!(heard.contains("STATUS=running 1 connections"), "{heard}");
    daemon.signal("TERM");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !heard.contains("STOPPING=1") {
        assert!(std::time::Instant::now() < deadline, "heard only: {heard}");
        if let Ok(Ok(n)) =
            tokio::time::timeout(Duration::from_millis(500), socket.recv(&mut buffer)).await
        {
            heard.push_str(&String::from_utf8_lossy(&buffer[..n]));
        }
    }
    assert_eq!(
        daemon.wait_exit(Duration::from_secs(10)).await.code(),
        Some(0)
    );
}

#[tokio::test]
async fn an_unmapped_native_stage_is_kept_and_named_by_check_and_stages() {
    let body = demo_connection("demo").replace("\"Referral Partner\" = \"lead_generation\"\n", "");
    let daemon = TestDaemon::start(&body).await;
    eventually("demo deals", Duration::from_secs(10), || async {
        (daemon.count("SELECT count(*) FROM deals") > 0).then_some(())
    })
    .await;
    let config = daemon.config_path.to_str().unwrap().to_owned();
    let (code, stdout, _) = run_cli(&["--config", &config, "check"], &[]).await;
    assert_eq!(code, 0, "unmapped stages warn, they do not fail: {stdout}");
    assert!(
        stdout.contains("native stage \"Software Sales\" / \"Referral Partner\" has no mapping"),
        "{stdout}"
    );
    let (code, stdout, _) = run_cli(&["--config", &config, "stages"], &[]).await;
    assert_eq!(code, 0);
    assert!(
        stdout
            .lines()
            .any(|line| line.contains("Referral Partner") && line.contains("unmapped")),
        "{stdout}"
    );
    assert!(
        stdout.contains("Product Demo") && stdout.contains("sales.needs_assessment"),
        "{stdout}"
    );
    let unmapped = daemon.count(
        "SELECT count(*) FROM deals WHERE stage = 'unmapped' AND native_stage = 'Referral Partner'",
    );
    let (code, stdout, _) = run_cli(
        &[
            "--config", &config, "deals", "list", "--status", "unmapped", "--format", "json",
        ],
        &[],
    )
    .await;
    assert_eq!(code, 0);
    let listed: Vec<serde_json::Value> = serde_json::from_str(&stdout).unwrap();
    assert_eq!(listed.len() as i64, unmapped);
    assert!(listed.iter().all(|deal| deal["stage"] == "unmapped"));
}

/// Mounts a tmpfs of `size` at `dir` (root only); the reason when this machine can't.
pub(crate) fn mount_tmpfs(dir: &std::path::Path, size: &str) -> Result<(), String> {
    let output = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
        .arg(dir)
        .output()
        .map_err(|error| format!("running mount: {error} (apt-get install mount)"))?;
    if output.status.success() {
        return Ok(());
    }
    Err(format!(
        "mounting a {size} tmpfs needs root: {}",
        String::from_utf8_lossy(&output.stderr).trim()
    ))
}

#[tokio::test]
async fn a_full_disk_fails_the_sync_loudly_and_loses_nothing_once_space_returns() {
    let disk = tempfile::tempdir().unwrap();
    if let Err(reason) = mount_tmpfs(disk.path(), "600k") {
        return skip(
            "a_full_disk_fails_the_sync_loudly_and_loses_nothing_once_space_returns",
            &reason,
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
    let _unmount = Unmount(disk.path().to_owned());
    let body = demo_connection("demo").replace(
        "settings = { seed = 7, pace = \"100ms\", deals = 20, carts = 10 }",
        "settings = { seed = 7, pace = \"10ms\", deals = 3000, carts = 1000, page_size = 200 }",
    );
    let mut daemon = TestDaemon::start(&body).await;
    // Move the store onto the small disk: stop, rewrite the path, start again.
    daemon.signal("TERM");
    daemon.wait_exit(Duration::from_secs(10)).await;
    daemon.db_path = disk.path().join("dealsync.db");
    daemon.kill_and_restart_with_config(&body).await;

    daemon
        .wait_for_log("disk is full", Duration::from_secs(30))
        .await;
    let (status, _) = daemon.get("/healthz").await;
    assert_eq!(status, 200, "the daemon stays up on a full disk");

    let status = std::process::Command::new("mount")
        .args(["-o", "remount,size=64m"])
        .arg(disk.path())
        .status()
        .unwrap();
    assert!(status.success());
    eventually(
        "every deal (4000) once space returned",
        Duration::from_secs(30),
        || async { (daemon.count("SELECT count(*) FROM deals") == 4000).then_some(()) },
    )
    .await;
    // Nothing half-written by the failed commits: every deal's latest history row
    // ends in the stage the deal is in (a stage and its history share a transaction).
    assert_eq!(
        daemon.count(
            "SELECT count(*) FROM deals d WHERE d.stage IS NOT (SELECT h.to_stage \
             FROM stage_history h WHERE h.deal_id = d.id ORDER BY h.at DESC, h.id DESC LIMIT 1)"
        ),
        0,
        "deals whose history does not end in their stage"
    );
}
