//! The daemon as an operating-system process among others: the permissions of what it
//! creates, one daemon per database, OAuth refreshes shared with `dealsync sync`, and
//! workers that outlive a database another process holds locked.

use crate::followups::{TEMPLATES, cart_rule, config, messages_to, put_cart, store};
use crate::harness::daemon::{TestDaemon, binary, run_cli};
use crate::harness::eventually;
use crate::harness::free_port;
use crate::harness::smtp::SmtpServer;
use crate::harness::vendors::OAuthState;
use crate::harness::vendors::pipedrive::{PdDeal, Pipedrive};
use chrono::Utc;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

const WAIT: Duration = Duration::from_secs(30);

/// A file's permission bits in octal, as `ls -l` and `chmod` speak of them.
fn mode(path: &Path) -> String {
    let mode = std::fs::metadata(path)
        .unwrap_or_else(|error| panic!("{}: {error}", path.display()))
        .permissions()
        .mode();
    format!("{:03o}", mode & 0o777)
}

fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    PathBuf::from(format!("{}{suffix}", path.display()))
}

#[tokio::test]
async fn everything_the_daemon_creates_is_owner_only_under_a_umask_of_0022() {
    // Arrange: a daemon started by hand (umask 0022, no systemd UMask=) that writes
    // follow-ups as .eml files into a directory that does not exist yet.
    let mail = tempfile::tempdir().unwrap();
    let outbox = mail.path().join("outbox");
    let messages = outbox.join("messages");
    let daemon = TestDaemon::start_with_umask(
        &format!(
            r#"
[email]
transport = "file"
dir = "{dir}"
from = "Test Shop <shop@example.com>"
templates = "{TEMPLATES}"
unsubscribe_secret = "test-unsubscribe-secret-0123"
enroll_interval = "100ms"
{rule}
"#,
            dir = messages.display(),
            rule = cart_rule("100ms", "1h", "2h"),
        ),
        0o022,
    )
    .await;

    // Act: a cart is abandoned and its first email is written.
    let cart = put_cart(
        &store(&daemon),
        "shop",
        "perm",
        "ada@example.com",
        Some(true),
        "cart_abandoned",
        Utc::now(),
    )
    .await;
    // File names count steps from 1, as every output does.
    let eml = messages.join(format!("{cart}-carts-1.eml"));
    eventually("the first cart email as a file", WAIT, || async {
        eml.exists().then_some(())
    })
    .await;

    // Assert: the database (OAuth tokens live in it), its WAL and shared memory, the
    // webhook inbox and its WAL and shared memory, the lock file, the outbox
    // directories and the message: nothing for the group or others.
    let db = &daemon.db_path;
    let inbox = db.with_extension("inbox.db");
    let files = [
        db.clone(),
        with_suffix(db, "-wal"),
        with_suffix(db, "-shm"),
        inbox.clone(),
        with_suffix(&inbox, "-wal"),
        with_suffix(&inbox, "-shm"),
        with_suffix(db, ".lock"),
        eml,
    ];
    for file in &files {
        assert_eq!(mode(file), "600", "{}", file.display());
    }
    for dir in [&outbox, &messages] {
        assert_eq!(mode(dir), "700", "{}", dir.display());
    }
    // No temporary message file is left behind either.
    let names: Vec<String> = std::fs::read_dir(&messages)
        .unwrap()
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, [format!("{cart}-carts-1.eml")]);
}

/// Runs `dealsync --config <config> run` to its end (at most `limit`), returning
/// (exit code, stderr, elapsed); kills it when the limit passes.
async fn run_second_daemon(config: &Path, limit: Duration) -> (Option<i32>, String, Duration) {
    let started = Instant::now();
    let child = tokio::process::Command::new(binary())
        .arg("--config")
        .arg(config)
        .arg("run")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .output();
    match tokio::time::timeout(limit, child).await {
        Ok(output) => {
            let output = output.expect("running dealsync");
            (
                output.status.code(),
                String::from_utf8_lossy(&output.stderr).into_owned(),
                started.elapsed(),
            )
        }
        Err(_) => (None, String::new(), started.elapsed()),
    }
}

#[tokio::test]
async fn a_second_daemon_on_the_same_database_stops_at_once_naming_the_first_ones_pid() {
    // Arrange: a running daemon, and a second config on the same database that
    // listens on another port (so only the database is shared).
    let mut daemon = TestDaemon::start("").await;
    let first = daemon.config_path.to_str().unwrap().to_owned();
    let second = daemon.dir.path().join("second.toml");
    let text = std::fs::read_to_string(&daemon.config_path).unwrap();
    let other_port = free_port();
    std::fs::write(
        &second,
        text.replace(
            &format!("listen = \"127.0.0.1:{}\"", daemon.port),
            &format!("listen = \"127.0.0.1:{other_port}\""),
        ),
    )
    .unwrap();

    // Act: a second `run` on the same database.
    let (code, stderr, elapsed) = run_second_daemon(&second, Duration::from_secs(30)).await;

    // Assert: it stopped by itself, without waiting for the lock (the first daemon
    // still holds it, and the refusal is the one that does not wait), with EX_TEMPFAIL
    // and a message that names the running daemon's pid and the lock file.
    assert!(
        code.is_some(),
        "the second daemon was still running after {elapsed:?}"
    );
    assert_eq!(code, Some(75), "stderr: {stderr}");
    assert!(!stderr.contains("stayed locked"), "it waited: {stderr}");
    let lock = with_suffix(&daemon.db_path, ".lock");
    assert!(
        stderr.contains(&format!("pid {}", daemon.pid())),
        "stderr: {stderr}"
    );
    assert!(
        stderr.contains(&lock.display().to_string()),
        "stderr: {stderr}"
    );
    let (status, _) = daemon.get("/healthz").await;
    assert_eq!(status, 200, "the first daemon goes on");

    // Read-only commands still work beside the daemon.
    for args in [
        vec!["--config", &first, "deals", "list"],
        vec!["--config", &first, "check"],
        vec!["--config", &first, "report"],
        vec!["--config", &first, "outbox", "list"],
    ] {
        let (code, stdout, stderr) = run_cli(&args, &[]).await;
        assert_eq!(code, 0, "{args:?}: {stdout}\n{stderr}");
    }

    // Once the first daemon has stopped, a new one starts on the same database.
    daemon.signal("TERM");
    assert!(daemon.wait_exit(Duration::from_secs(15)).await.success());
    daemon.start_again().await;
    let (status, _) = daemon.get("/readyz").await;
    assert_eq!(status, 200);
}

/// The stored (access, refresh, needs_reauth) of connection `pd`.
fn stored_tokens(daemon: &TestDaemon) -> (Option<String>, Option<String>, bool) {
    daemon
        .db()
        .query_row(
            "SELECT access_token, refresh_token, needs_reauth FROM oauth_tokens WHERE connection = 'pd'",
            [],
            |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)),
        )
        .unwrap()
}

#[tokio::test]
async fn the_daemon_and_a_cli_sync_beside_it_refresh_a_rotating_token_once_per_expiry() {
    // Arrange: a Pipedrive mock that rotates refresh tokens, refuses a used one
    // (invalid_grant) and answers its token endpoint slowly, so two processes that both
    // need a token ask while the first refresh is still in flight.
    let pipedrive =
        Pipedrive::start_oauth(OAuthState::new("never-issued", "pd-refresh-0", true)).await;
    let start = Utc::now() - chrono::Duration::hours(1);
    for id in 1..=4u64 {
        pipedrive.put(PdDeal::new(
            id,
            "deal",
            2,
            start + chrono::Duration::seconds(id as i64),
        ));
    }
    *pipedrive.faults().slow.lock().unwrap() =
        Some(("/oauth/token".to_owned(), Duration::from_secs(3)));
    let oauth = pipedrive.state.oauth.as_ref().unwrap();
    let url = pipedrive.url();
    let daemon = TestDaemon::start(&format!(
        r#"
[connections.pd]
connector = "pipedrive"
poll_interval = "1h"
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
    let config = daemon.config_path.to_str().unwrap().to_owned();
    let token_requests = || pipedrive.faults().count("/oauth/token");

    // Act 1: the daemon's first run is refreshing (no token stored yet) when
    // `dealsync sync` needs one too.
    eventually("the daemon's first refresh", WAIT, || async {
        (token_requests() >= 1).then_some(())
    })
    .await;
    let (code, stdout, stderr) = run_cli(&["--config", &config, "sync", "pd"], &[]).await;

    // Assert 1: one refresh for both processes; the CLI synced with the daemon's token.
    assert_eq!(code, 0, "{stdout}\n{stderr}");
    assert_eq!(token_requests(), 1, "one refresh for the missing token");
    assert_eq!(oauth.refreshes.load(Ordering::SeqCst), 1);
    let (access, refresh, needs_reauth) = stored_tokens(&daemon);
    assert_eq!(access.as_deref(), Some("access-1"));
    assert_eq!(refresh.as_deref(), Some("refresh-1"));
    assert!(!needs_reauth);
    assert_eq!(
        daemon.count("SELECT count(*) FROM deals WHERE connection = 'pd'"),
        4
    );

    // Act 2: the vendor expires the access token; the daemon's next run (a reload
    // restarts it) gets 401 and refreshes while `dealsync sync` gets 401 too.
    *oauth.access.lock().unwrap() = "expired-by-the-vendor".to_owned();
    daemon.signal("HUP");
    eventually("the daemon's refresh after the expiry", WAIT, || async {
        (token_requests() >= 2).then_some(())
    })
    .await;
    let (code, stdout, stderr) = run_cli(&["--config", &config, "sync", "pd"], &[]).await;

    // Assert 2: one more refresh, and the stored refresh token is the vendor's latest.
    assert_eq!(code, 0, "{stdout}\n{stderr}");
    assert_eq!(token_requests(), 2, "one refresh for the expiry");
    assert_eq!(oauth.refreshes.load(Ordering::SeqCst), 2);
    let live = oauth.refresh.lock().unwrap().clone();
    assert_eq!(live, "refresh-2");
    let (access, refresh, needs_reauth) = stored_tokens(&daemon);
    assert_eq!(access.as_deref(), Some("access-2"));
    assert_eq!(refresh.as_deref(), Some(live.as_str()));
    assert!(!needs_reauth, "the connection was not lost");
    let logs = daemon.logs();
    assert!(!logs.contains("invalid_grant"), "{logs}");
}

/// `/readyz`: (status, body as JSON).
async fn readyz(daemon: &TestDaemon) -> (u16, serde_json::Value) {
    let (status, body) = daemon.get("/readyz").await;
    (status, serde_json::from_str(&body).unwrap_or_default())
}

#[tokio::test]
async fn workers_survive_a_database_locked_by_another_process_and_readyz_names_them_meanwhile() {
    // Arrange: follow-ups over SMTP, and a cart abandoned by another process (as a
    // `dealsync sync` beside the daemon would write it) just before a third process
    // takes the database's write lock and keeps it past SQLite's busy timeout.
    // A demo CRM polls beside them: its scheduler's runs fail on the lock too.
    let smtp = SmtpServer::start().await;
    let crm = r#"
[connections.crm]
connector = "demo"
poll_interval = "1s"
settings = { seed = 7, pace = "10ms", deals = 2, carts = 0 }
"#;
    let rules = format!("{}\n{crm}", cart_rule("100ms", "1h", "2h"));
    let daemon = TestDaemon::start(&config(&smtp, "", &rules)).await;
    let (status, _) = readyz(&daemon).await;
    assert_eq!(status, 200);
    let cart = put_cart(
        &store(&daemon),
        "shop",
        "locked",
        "grace@example.com",
        Some(true),
        "cart_abandoned",
        Utc::now(),
    )
    .await;
    let locker = rusqlite::Connection::open(&daemon.db_path).unwrap();
    locker.execute_batch("BEGIN IMMEDIATE").unwrap();

    // Act 1: the follow-up worker tries to enroll the cart (or to claim its email)
    // and the database stays locked.
    let degraded = eventually("/readyz naming the follow-up worker", WAIT, || async {
        let (status, body) = readyz(&daemon).await;
        let reason = body["degraded"]["followups"].as_str()?.to_owned();
        Some((status, body, reason))
    })
    .await;

    // Assert 1: not ready, and why.
    let (status, body, reason) = degraded;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["ready"], false);
    assert!(reason.contains("locked"), "{reason}");
    let sync = eventually("/readyz naming the CRM's scheduler", WAIT, || async {
        let (_, body) = readyz(&daemon).await;
        body["degraded"]["connection:crm"]
            .as_str()
            .map(str::to_owned)
    })
    .await;
    assert!(
        sync.contains("sync run failed") && sync.contains("locked"),
        "{sync}"
    );
    assert!(
        messages_to(&smtp, "grace@example.com").is_empty(),
        "nothing could be recorded, so nothing was sent"
    );

    // Act 2: the other process lets go.
    locker.execute_batch("COMMIT").unwrap();
    drop(locker);

    // Assert 2: the workers go on by themselves: the email arrives, once, and
    // /readyz is ready again with no worker degraded (the CRM's next run recovers).
    let mails = eventually(
        "the cart email after the lock is released",
        WAIT,
        || async {
            let mails = messages_to(&smtp, "grace@example.com");
            (!mails.is_empty()).then_some(mails)
        },
    )
    .await;
    assert_eq!(mails.len(), 1);
    let body = eventually("/readyz ready again", WAIT, || async {
        let (status, body) = readyz(&daemon).await;
        (status == 200).then_some(body)
    })
    .await;
    assert_eq!(body["degraded"], serde_json::json!({}), "{body}");
    let state: String = daemon
        .db()
        .query_row(
            "SELECT state FROM outbox WHERE deal_id = ?1 AND step = 0",
            [cart],
            |row| row.get(0),
        )
        .unwrap();
    assert_eq!(state, "sent");
}
