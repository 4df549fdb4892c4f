//! The read API's authentication and answers, and the status page rendered by a real
//! headless browser (Debian's chromium), on the report fixture's history.

use crate::harness::daemon::TestDaemon;
use crate::harness::skip;
use crate::report::FIXTURE;
use serde_json::Value;
use std::time::Duration;

const TOKEN: &str = "test-token-0123456789abcdef";

/// A daemon with no connections, the API on, and the fixture's deals in its store.
async fn daemon_with_fixture(server_keys: &str) -> TestDaemon {
    // The harness's config ends inside [server], so these keys land there.
    let daemon = TestDaemon::start(server_keys).await;
    daemon
        .db()
        .execute_batch(FIXTURE)
        .expect("loading the fixture");
    daemon
}

/// Moves the fixture's history so that its period's end (2026-02-01) is now: what is
/// stalled, or in the page's last 30 days, then never depends on today's date.
fn shift_fixture_to_now(daemon: &TestDaemon) {
    let shift = chrono::Utc::now().timestamp_millis()
        - chrono::DateTime::parse_from_rfc3339("2026-02-01T00:00:00Z")
            .unwrap()
            .timestamp_millis();
    daemon
        .db()
        .execute_batch(&format!(
            "UPDATE stage_history SET at = at + {shift};
             UPDATE deals SET stage_entered_at = stage_entered_at + {shift};"
        ))
        .unwrap();
}

async fn get_with(daemon: &TestDaemon, path: &str, token: Option<&str>) -> (u16, String) {
    let mut request = daemon.http.get(daemon.url(path));
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let response = request.send().await.expect("GET");
    let status = response.status().as_u16();
    (status, response.text().await.unwrap_or_default())
}

#[tokio::test]
async fn the_read_api_answers_401_without_or_with_a_wrong_token_and_200_with_the_right_one() {
    let daemon = daemon_with_fixture(&format!("api_token = \"{TOKEN}\"\n")).await;
    for path in [
        "/api/v1/deals",
        "/api/v1/deals/1",
        "/api/v1/funnel",
        "/api/v1/forecast",
        "/api/v1/outbox",
    ] {
        let (status, body) = get_with(&daemon, path, None).await;
        assert_eq!(status, 401, "{path}: {body}");
        let (status, _) = get_with(&daemon, path, Some("test-token-0123456789abcdeX")).await;
        assert_eq!(status, 401, "{path}");
        let (status, body) = get_with(&daemon, path, Some(TOKEN)).await;
        assert_eq!(status, 200, "{path}: {body}");
    }
    let response = daemon
        .http
        .get(daemon.url("/api/v1/deals"))
        .header("authorization", format!("Basic {TOKEN}"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 401);
    assert_eq!(response.headers()["www-authenticate"], "Bearer");
    assert!(
        !daemon.logs().contains(TOKEN),
        "the token leaked into the logs"
    );
}

#[tokio::test]
async fn without_a_token_in_the_config_the_read_api_does_not_exist() {
    let daemon = daemon_with_fixture("").await;
    let (status, body) = get_with(&daemon, "/api/v1/deals", Some(TOKEN)).await;
    assert_eq!(status, 404, "{body}");
    assert!(body.contains("server.api_token"), "{body}");
}

#[tokio::test]
async fn deals_page_and_filter_and_one_deal_carries_its_history_and_emails() {
    let daemon = daemon_with_fixture(&format!("api_token = \"{TOKEN}\"\n")).await;
    let json = |body: &str| serde_json::from_str::<Value>(body).expect("JSON");

    let (_, body) = get_with(&daemon, "/api/v1/deals?limit=5", Some(TOKEN)).await;
    let first = json(&body);
    assert_eq!(first["deals"].as_array().unwrap().len(), 5);
    assert_eq!(first["next_offset"], 5);
    let (_, body) = get_with(&daemon, "/api/v1/deals?limit=5&offset=10", Some(TOKEN)).await;
    let last = json(&body);
    assert_eq!(last["deals"].as_array().unwrap().len(), 3);
    assert_eq!(last["next_offset"], Value::Null);

    let (_, body) = get_with(
        &daemon,
        "/api/v1/deals?connection=shop&status=won",
        Some(TOKEN),
    )
    .await;
    let won_carts = json(&body);
    let ids: Vec<&str> = won_carts["deals"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["external_id"].as_str().unwrap())
        .collect();
    let mut sorted = ids.clone();
    sorted.sort();
    assert_eq!(sorted, vec!["H", "I", "J"]);

    let (status, body) = get_with(&daemon, "/api/v1/deals?status=maybe", Some(TOKEN)).await;
    assert_eq!(status, 400, "{body}");
    let (status, body) = get_with(&daemon, "/api/v1/deals?limit=0", Some(TOKEN)).await;
    assert_eq!(status, 400, "{body}");
    let (status, body) = get_with(&daemon, "/api/v1/deals?colour=red", Some(TOKEN)).await;
    assert_eq!(status, 400, "{body}");

    let (status, body) = get_with(&daemon, "/api/v1/deals/11", Some(TOKEN)).await;
    assert_eq!(status, 200, "{body}");
    let cart = json(&body);
    assert_eq!(cart["deal"]["external_id"], "K");
    let stages: Vec<&str> = cart["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| h["to_stage"].as_str().unwrap())
        .collect();
    assert_eq!(
        stages,
        vec![
            "checkout_started",
            "cart_abandoned",
            "follow_up_email",
            "discount_offer",
            "expired"
        ]
    );
    assert_eq!(cart["history"][0]["from_stage"], Value::Null);
    assert_eq!(cart["emails"].as_array().unwrap().len(), 3);

    let (status, _) = get_with(&daemon, "/api/v1/deals/999", Some(TOKEN)).await;
    assert_eq!(status, 404);
    let (status, _) = get_with(&daemon, "/api/v1/deals/abc", Some(TOKEN)).await;
    assert_eq!(status, 400);
}

#[tokio::test]
async fn a_stored_deal_whose_json_columns_do_not_parse_is_listed_with_them_empty() {
    let daemon = daemon_with_fixture(&format!("api_token = \"{TOKEN}\"\n")).await;
    // Damaged rows, as an older version, a disk error or a hand edit could leave them:
    // a raw record too deep to read back, one cut short, and broken line items.
    let deep = format!("{}{}", "[".repeat(200_000), "]".repeat(200_000));
    let db = daemon.db();
    db.execute("UPDATE deals SET raw = ?1 WHERE external_id = 'A'", [&deep])
        .unwrap();
    db.execute(
        "UPDATE deals SET raw = '{\"id\": ' WHERE external_id = 'B'",
        [],
    )
    .unwrap();
    db.execute(
        "UPDATE deals SET line_items = '[{' , cart_keys = 'nope' WHERE external_id = 'K'",
        [],
    )
    .unwrap();
    let json = |body: &str| serde_json::from_str::<Value>(body).expect("JSON");

    let (status, body) = get_with(&daemon, "/api/v1/deals?limit=100", Some(TOKEN)).await;
    assert_eq!(status, 200, "{body}");
    let listed = json(&body);
    let deals = listed["deals"].as_array().unwrap();
    assert_eq!(deals.len(), 13, "every deal is listed");
    let by_id = |external_id: &str| {
        deals
            .iter()
            .find(|d| d["external_id"] == external_id)
            .unwrap()
            .clone()
    };
    assert_eq!(by_id("A")["raw"], Value::Null);
    assert_eq!(by_id("B")["raw"], Value::Null);
    assert_eq!(by_id("K")["line_items"], serde_json::json!([]));
    assert_eq!(by_id("K")["title"], "Cart expired");
    let (status, body) = get_with(&daemon, "/api/v1/deals/1", Some(TOKEN)).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(json(&body)["deal"]["title"], "Skips stages <b>and</b> wins");
    let (status, body) = get_with(&daemon, "/", Some(TOKEN)).await;
    assert_eq!(status, 200, "the status page: {body}");

    let config = daemon.config_path.to_str().unwrap().to_owned();
    for format in ["table", "json"] {
        let (code, stdout, stderr) = crate::harness::daemon::run_cli(
            &["--config", &config, "deals", "list", "--format", format],
            &[],
        )
        .await;
        assert_eq!(code, 0, "{format}: {stderr}");
        assert!(stdout.contains("Moves backwards"), "{stdout}");
    }
    assert!(
        daemon.logs().contains("stored JSON is unreadable"),
        "{}",
        daemon.logs()
    );
}

#[tokio::test]
async fn funnel_forecast_and_outbox_answer_with_the_report_figures() {
    let daemon = daemon_with_fixture(&format!("api_token = \"{TOKEN}\"\n")).await;
    let json = |body: &str| serde_json::from_str::<Value>(body).expect("JSON");
    let period = "since=2026-01-01&until=2026-02-01&min_cohort=2";

    let (status, body) = get_with(&daemon, &format!("/api/v1/funnel?{period}"), Some(TOKEN)).await;
    assert_eq!(status, 200, "{body}");
    let funnel = json(&body);
    let sales = &funnel["total"]["pipelines"][0];
    assert_eq!(sales["pipeline"], "sales");
    assert_eq!(sales["bottleneck"]["stage"], "proposal");
    assert_eq!(funnel["total"]["cart_recovery"]["recovered"], 2);

    let (_, body) = get_with(
        &daemon,
        &format!("/api/v1/forecast?{period}&pipeline=sales"),
        Some(TOKEN),
    )
    .await;
    let forecast = json(&body);
    assert_eq!(forecast["total"][0]["weighted"]["minor"], 20000);
    assert_eq!(forecast["total"].as_array().unwrap().len(), 3);

    let (status, body) = get_with(&daemon, "/api/v1/funnel?since=yesterday", Some(TOKEN)).await;
    assert_eq!(status, 400, "{body}");
    let (status, _) = get_with(&daemon, "/api/v1/funnel?pipeline=nope", Some(TOKEN)).await;
    assert_eq!(status, 400);

    let (_, body) = get_with(&daemon, "/api/v1/outbox?state=sent", Some(TOKEN)).await;
    let outbox = json(&body);
    assert_eq!(outbox["emails"].as_array().unwrap().len(), 5);
    assert_eq!(outbox["emails"][0]["action"], "email");
    let (_, body) = get_with(&daemon, "/api/v1/outbox?action=expire", Some(TOKEN)).await;
    assert_eq!(json(&body)["emails"].as_array().unwrap().len(), 0);
    let (status, body) = get_with(&daemon, "/api/v1/outbox?action=sms", Some(TOKEN)).await;
    assert_eq!(status, 400, "{body}");
    let failed = outbox["counts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["state"] == "failed")
        .unwrap();
    assert_eq!(failed["emails"], 1);
}

/// The browser: Debian's chromium, or the one `DEALSYNC_TEST_CHROMIUM` names.
fn chromium() -> std::path::PathBuf {
    std::env::var_os("DEALSYNC_TEST_CHROMIUM")
        .unwrap_or_else(|| "/usr/bin/chromium".into())
        .into()
}

/// Renders `url` in headless chromium and returns the DOM after load.
async fn render_in_chromium(url: &str, profile: &std::path::Path) -> String {
    let output = tokio::time::timeout(
        Duration::from_secs(60),
        tokio::process::Command::new(chromium())
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--disable-dev-shm-usage",
            ])
            .arg(format!("--user-data-dir={}", profile.display()))
            .arg("--dump-dom")
            .arg(url)
            .kill_on_drop(true)
            .output(),
    )
    .await
    .expect("chromium finished within a minute")
    .expect("running chromium");
    assert!(
        output.status.success(),
        "chromium failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

#[tokio::test]
async fn the_status_page_renders_in_chromium_with_the_funnel_chart_and_escaped_titles() {
    if !chromium().is_file() {
        return skip(
            "the_status_page_renders_in_chromium_with_the_funnel_chart_and_escaped_titles",
            &format!(
                "{} is absent (apt-get install chromium, or set DEALSYNC_TEST_CHROMIUM)",
                chromium().display()
            ),
        );
    }
    let daemon = daemon_with_fixture("status_page_auth = \"local\"\n").await;
    // A stalled deal whose title tries to inject markup.
    daemon
        .db()
        .execute(
            "UPDATE deals SET title = '<script>document.title=\"pwned\"</script><b>B</b>' WHERE id = 2",
            [],
        )
        .unwrap();
    // Move the fixture's January into the last 30 days, where the page's funnel looks.
    shift_fixture_to_now(&daemon);
    let profile = tempfile::tempdir().unwrap();
    let dom = render_in_chromium(&daemon.url("/"), profile.path()).await;

    assert!(dom.contains("<title>dealsync status</title>"), "{dom}");
    assert!(!dom.contains("pwned\"</script>") || dom.contains("&lt;script&gt;"));
    assert!(
        !dom.contains("<b>B</b>"),
        "an untrusted title became markup: {dom}"
    );
    assert!(dom.contains("&lt;b&gt;B&lt;/b&gt;"), "{dom}");
    let svg_at = dom
        .find("<svg class=\"funnel\" id=\"funnel-sales\"")
        .expect("the sales funnel SVG is in the rendered DOM");
    let from_svg = dom.get(svg_at..).unwrap();
    let (svg, _) = from_svg.split_once("</svg>").unwrap();
    assert!(svg.matches("<rect").count() >= 6, "{svg}");
    // The longest bar spans the full width (400 units): the chart has data, not just axes.
    assert!(svg.contains("width=\"400"), "{svg}");
    assert!(svg.contains("Lead Generation"), "{svg}");
    assert!(dom.contains("id=\"funnel-ecommerce\""), "{dom}");
}

/// GET `/` with extra headers; returns the status, the `WWW-Authenticate` header and the body.
async fn status_page(daemon: &TestDaemon, headers: &[(&str, &str)]) -> (u16, String, String) {
    let mut request = daemon.http.get(daemon.url("/"));
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let response = request.send().await.expect("GET /");
    let status = response.status().as_u16();
    let challenge = response
        .headers()
        .get("www-authenticate")
        .map(|v| v.to_str().unwrap_or_default().to_owned())
        .unwrap_or_default();
    (status, challenge, response.text().await.unwrap_or_default())
}

fn basic(user: &str, password: &str) -> String {
    use base64::Engine;
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"))
    )
}

#[tokio::test]
async fn a_status_page_request_forwarded_by_a_proxy_needs_the_token_and_the_token_opens_it() {
    // The listener is loopback, as every test's is; a reverse proxy in front of it
    // marks its clients with a forwarding header, and they are not local users.
    let daemon = daemon_with_fixture(&format!("api_token = \"{TOKEN}\"\n")).await;
    let remote_client = [
        ("x-forwarded-for", "203.0.113.9"),
        ("forwarded", "for=203.0.113.9;proto=https"),
        ("x-real-ip", "203.0.113.9"),
    ];

    for proxy_header in remote_client {
        let (status, challenge, body) = status_page(&daemon, &[proxy_header]).await;
        assert_eq!(status, 401, "{proxy_header:?}: {body}");
        assert!(challenge.starts_with("Basic realm="), "{challenge}");
        assert!(!body.contains("funnel"), "{body}");
        assert!(!body.contains(TOKEN), "the token leaked into the refusal");
    }
    let wrong = basic("ops", "test-token-0123456789abcdeX");
    let (status, _, _) = status_page(&daemon, &[remote_client[0], ("authorization", &wrong)]).await;
    assert_eq!(status, 401);

    let right = basic("ops", TOKEN);
    let (status, _, body) =
        status_page(&daemon, &[remote_client[0], ("authorization", &right)]).await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("id=\"funnel-sales\""), "{body}");
    assert!(!body.contains(TOKEN), "the token leaked into the page");
    let bearer = format!("Bearer {TOKEN}");
    let (status, _, _) =
        status_page(&daemon, &[remote_client[1], ("authorization", &bearer)]).await;
    assert_eq!(status, 200);

    // Straight from this machine too: by default every request needs the token.
    let (status, challenge, body) = status_page(&daemon, &[]).await;
    assert_eq!(status, 401, "{body}");
    assert!(challenge.starts_with("Basic realm="), "{challenge}");
    assert!(
        !daemon.logs().contains(TOKEN),
        "the token leaked into the logs"
    );
}

#[tokio::test]
async fn with_status_page_auth_always_even_a_local_request_needs_the_token() {
    let daemon = daemon_with_fixture(&format!(
        "api_token = \"{TOKEN}\"\nstatus_page_auth = \"always\"\n"
    ))
    .await;
    let (status, challenge, body) = status_page(&daemon, &[]).await;
    assert_eq!(status, 401, "{body}");
    assert!(challenge.starts_with("Basic"), "{challenge}");
    let right = basic("", TOKEN);
    let (status, _, body) = status_page(&daemon, &[("authorization", &right)]).await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains("id=\"funnel-sales\""), "{body}");
}

#[tokio::test]
async fn without_a_token_the_status_page_is_not_served_and_always_is_a_config_error() {
    let daemon = daemon_with_fixture("").await;
    for headers in [&[("x-forwarded-for", "203.0.113.9")][..], &[]] {
        let (status, _, body) = status_page(&daemon, headers).await;
        assert_eq!(status, 404, "{headers:?}: {body}");
        assert!(body.contains("server.api_token"), "{body}");
        assert!(body.contains("status_page_auth"), "{body}");
    }

    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("dealsync.toml");
    std::fs::write(
        &config,
        format!(
            "[storage]\npath = \"{}\"\n\n[server]\nstatus_page_auth = \"always\"\n",
            dir.path().join("dealsync.db").display()
        ),
    )
    .unwrap();
    let (code, _, stderr) =
        crate::harness::daemon::run_cli(&["--config", config.to_str().unwrap(), "check"], &[])
            .await;
    assert_eq!(code, 78, "{stderr}");
    assert!(
        stderr.contains("server.status_page_auth") && stderr.contains("server.api_token"),
        "{stderr}"
    );
}

#[tokio::test]
async fn the_status_page_can_be_turned_off() {
    let daemon = daemon_with_fixture("status_page = false\n").await;
    let (status, _) = daemon.get("/").await;
    assert_eq!(status, 404);
}

#[tokio::test]
async fn metrics_carry_deal_value_per_currency_stalled_deals_and_emails_by_rule_and_state() {
    let daemon = daemon_with_fixture("").await;
    // The fixture's end is now: its stages were entered days ago, not months.
    shift_fixture_to_now(&daemon);
    let (status, body) = daemon.get("/metrics").await;
    assert_eq!(status, 200);
    for line in [
        "dealsync_deal_value_minor{connection=\"crm-us\",pipeline=\"sales\",stage=\"proposal\",currency=\"USD\"} 200000",
        "dealsync_deal_value_minor{connection=\"crm-eu\",pipeline=\"sales\",stage=\"proposal\",currency=\"EUR\"} 250000",
        // B (needs assessment for 18 days, past its 14) and F (lead qualification for
        // 25 days, past its 7) are stalled.
        "dealsync_stalled_deals{connection=\"crm-eu\",pipeline=\"sales\",stage=\"needs_assessment\"} 1",
        "dealsync_stalled_deals{connection=\"crm-eu\",pipeline=\"sales\",stage=\"lead_qualification\"} 1",
        "dealsync_outbox_emails{rule=\"cart\",state=\"sent\"} 5",
        "dealsync_outbox_emails{rule=\"cart\",state=\"failed\"} 1",
        "dealsync_outbox_emails{rule=\"cart\",state=\"skipped\"} 1",
    ] {
        assert!(body.contains(line), "missing {line:?} in:\n{body}");
    }
    // Won and lost deals are never stalled; D and M are in proposal for 7 and 4 days,
    // within its 14.
    for absent in [
        "dealsync_stalled_deals{connection=\"crm-us\",pipeline=\"sales\",stage=\"won\"",
        "dealsync_stalled_deals{connection=\"crm-us\",pipeline=\"sales\",stage=\"proposal\"",
        "dealsync_stalled_deals{connection=\"crm-eu\",pipeline=\"sales\",stage=\"proposal\"",
    ] {
        assert!(!body.contains(absent), "{absent:?} in:\n{body}");
    }
}
