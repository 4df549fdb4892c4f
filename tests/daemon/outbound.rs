//! Outbound HTTP against vendors that misbehave: a redirect to another origin never
//! carries the connection's credentials there (the vendor client, the Shopify backfill,
//! the OAuth token refresh), a redirect within the origin is followed, and an answer
//! larger than `max_response_bytes` fails its request while the daemon goes on.

use crate::harness::daemon::TestDaemon;
use crate::harness::eventually;
use crate::harness::vendors::Fault;
use crate::harness::vendors::hostile::{HugeBody, OtherHost};
use crate::harness::vendors::pipedrive::{PdDeal, Pipedrive};
use crate::harness::vendors::salesforce::{Salesforce, SfOpp};
use chrono::Utc;
use std::sync::atomic::Ordering;
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(30);

fn pipedrive_connection(name: &str, url: &str, extra: &str) -> String {
    format!(
        r#"
[connections.{name}]
connector = "pipedrive"
base_url = "{url}"
token = "pd-token"
poll_interval = "1s"
lookback = "30s"
rate_limit = {{ requests_per_second = 200.0, burst = 50 }}
{extra}
"#
    )
}

/// The error of a failed sync run of `connection` that contains `needle`, if any.
fn failed_run_with(daemon: &TestDaemon, connection: &str, needle: &str) -> Option<String> {
    let db = daemon.db();
    let mut statement = db
        .prepare("SELECT error FROM sync_runs WHERE connection = ?1 AND status = 'failed'")
        .unwrap();
    let errors: Vec<String> = statement
        .query_map([connection], |row| row.get::<_, Option<String>>(0))
        .unwrap()
        .filter_map(|row| row.unwrap())
        .collect();
    errors.into_iter().find(|error| error.contains(needle))
}

fn stored_stage(daemon: &TestDaemon, connection: &str, external_id: &str) -> Option<String> {
    daemon
        .db()
        .query_row(
            "SELECT stage FROM deals WHERE connection = ?1 AND external_id = ?2",
            [connection, external_id],
            |row| row.get(0),
        )
        .ok()
}

/// Waits until `connection` fails a run naming `location`, or `other` receives
/// anything (which is the defect), then asserts the first and not the second.
async fn assert_refused_redirect(
    daemon: &TestDaemon,
    other: &OtherHost,
    connection: &str,
    location: &str,
    secrets: &[&str],
) -> String {
    let error = eventually(
        "a failed run naming the Location, or a request at the other host",
        WAIT,
        || async {
            if !other.seen().is_empty() {
                return Some(None);
            }
            failed_run_with(daemon, connection, location).map(Some)
        },
    )
    .await;
    let seen = other.seen();
    assert!(
        seen.is_empty(),
        "the other host received the connection's request: {seen:#?}"
    );
    let error = error.expect("a failed run when the other host saw nothing");
    assert!(
        error.contains("another origin") && error.contains("base_url"),
        "the error says why and what to fix: {error}"
    );
    for secret in secrets {
        assert!(!error.contains(secret), "{error}");
        assert!(
            !daemon.logs().contains(secret),
            "secret {secret} in the logs"
        );
    }
    error
}

#[tokio::test]
async fn a_vendor_redirect_to_another_origin_sends_it_nothing_and_fails_the_run_naming_the_location()
 {
    let other = OtherHost::start().await;
    let pipedrive = Pipedrive::start("pd-token").await;
    pipedrive.put(PdDeal::new(11, "after the redirect", 1, Utc::now()));
    let target = format!("{}/api/v2/deals?api_token=echoed", other.url());
    pipedrive.faults().push(
        "/api/v2/deals",
        Fault::Status(302, vec![("location", target)], String::new()),
    );
    let daemon = TestDaemon::start(&pipedrive_connection("pd", &pipedrive.url(), "")).await;

    let error = assert_refused_redirect(
        &daemon,
        &other,
        "pd",
        &format!("{}/api/v2/deals?…", other.url()),
        &["pd-token"],
    )
    .await;
    assert!(
        error.contains("pipedrive redirected /api/v2/deals to"),
        "{error}"
    );
    assert!(!error.contains("echoed"), "the query is left out: {error}");

    // Not a wedge: the next run reads the vendor again and stores the deal.
    eventually("the deal stored by a later run", WAIT, || async {
        stored_stage(&daemon, "pd", "11")
    })
    .await;
    assert!(other.seen().is_empty());
}

#[tokio::test]
async fn a_redirect_within_the_vendors_origin_is_followed_with_the_credentials() {
    let pipedrive = Pipedrive::start("pd-token").await;
    pipedrive.put(PdDeal::new(11, "mapped", 1, Utc::now()));
    pipedrive.faults().push(
        "/api/v2/stages",
        Fault::Status(
            307,
            vec![("location", "/api/v2/stages?moved=1".to_owned())],
            String::new(),
        ),
    );
    let daemon = TestDaemon::start(&pipedrive_connection("pd", &pipedrive.url(), "")).await;
    let stage = eventually("the deal stored", WAIT, || async {
        stored_stage(&daemon, "pd", "11")
    })
    .await;
    assert_eq!(stage, "lead_qualification", "stages were discovered");
    assert!(
        pipedrive
            .faults()
            .seen()
            .iter()
            .any(|line| line.starts_with("GET /api/v2/stages?moved=1")),
        "the redirect was followed: {:?}",
        pipedrive.faults().seen()
    );
    assert!(
        !daemon.logs().contains("pipeline discovery failed"),
        "the redirected request carried the token and was answered"
    );
}

#[tokio::test]
async fn the_shopify_backfill_does_not_follow_a_redirect_to_another_origin() {
    use axum::response::IntoResponse;
    let other = OtherHost::start().await;
    let target = format!("{}/admin/api/2024-10/checkouts.json", other.url());
    let router = axum::Router::new().route(
        "/admin/api/2024-10/checkouts.json",
        axum::routing::get(move || {
            let target = target.clone();
            async move {
                (
                    axum::http::StatusCode::FOUND,
                    [("location", target)],
                    "moved",
                )
                    .into_response()
            }
        }),
    );
    let shop = crate::harness::vendors::serve(router).await;
    let daemon = TestDaemon::start(&format!(
        r#"
[connections.shop]
connector = "shopify"
base_url = "{}"
token = "shpat_secret_token"
poll_interval = "1s"
"#,
        shop.url()
    ))
    .await;
    let error = assert_refused_redirect(
        &daemon,
        &other,
        "shop",
        &format!("{}/admin/api/2024-10/checkouts.json", other.url()),
        &["shpat_secret_token"],
    )
    .await;
    assert!(error.contains("shopify redirected"), "{error}");
    let (status, _) = daemon.get("/healthz").await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn an_oauth_token_refresh_redirected_to_another_origin_sends_it_no_secret() {
    let other = OtherHost::start().await;
    let salesforce = Salesforce::start("refresh-0", 2).await;
    salesforce.put(SfOpp::new(
        "006A1",
        "after the redirect",
        "Prospecting",
        Utc::now(),
    ));
    // 307 keeps the method and the body: followed, it would re-send the client secret
    // and the refresh token. Twice: pipeline discovery (which only logs a failure)
    // and the deals read of the first run each refresh.
    for _ in 0..2 {
        salesforce.state.faults.push(
            "/services/oauth2/token",
            Fault::Status(
                307,
                vec![("location", format!("{}/services/oauth2/token", other.url()))],
                String::new(),
            ),
        );
    }
    let url = salesforce.url();
    let daemon = TestDaemon::start(&format!(
        r#"
[connections.sf]
connector = "salesforce"
poll_interval = "1s"
lookback = "30s"

[connections.sf.oauth]
client_id = "sf-client"
client_secret = "sf-secret"
token_url = "{url}/services/oauth2/token"
refresh_token = "refresh-0"
"#
    ))
    .await;
    let error = assert_refused_redirect(
        &daemon,
        &other,
        "sf",
        &format!("{}/services/oauth2/token", other.url()),
        &["sf-secret", "refresh-0"],
    )
    .await;
    assert!(
        error.contains("oauth redirected /services/oauth2/token"),
        "{error}"
    );
    eventually("a later refresh and the opportunity", WAIT, || async {
        stored_stage(&daemon, "sf", "006A1")
    })
    .await;
    assert!(other.seen().is_empty());
}

#[tokio::test]
async fn an_answer_over_max_response_bytes_fails_its_request_and_the_daemon_goes_on() {
    const TOTAL: u64 = 80 * 1024 * 1024;
    const CAP: u64 = 1024 * 1024;
    let chunked = HugeBody::start(TOTAL, true).await;
    let declared = HugeBody::start(TOTAL, false).await;
    let token_endpoint = HugeBody::start(TOTAL, true).await;
    let pipedrive = Pipedrive::start("pd-token").await;
    pipedrive.put(PdDeal::new(11, "a normal vendor", 1, Utc::now()));
    let cap = format!("max_response_bytes = {CAP}");
    let daemon = TestDaemon::start(&format!(
        r#"{}{}{}
[connections.sf]
connector = "salesforce"
poll_interval = "1s"
{cap}

[connections.sf.oauth]
client_id = "sf-client"
client_secret = "sf-secret"
token_url = "{}/services/oauth2/token"
refresh_token = "refresh-0"
"#,
        pipedrive_connection("chunked", &chunked.url(), &cap),
        pipedrive_connection("declared", &declared.url(), &cap),
        pipedrive_connection("pd", &pipedrive.url(), ""),
        token_endpoint.url(),
    ))
    .await;

    let too_large = |connection: &str, vendor: &str, path: &str| {
        format!(
            "connection {connection}: the {vendor} answer to {path} is larger than max_response_bytes = {CAP} bytes"
        )
    };
    let error = eventually("the chunked answer refused", WAIT, || async {
        failed_run_with(
            &daemon,
            "chunked",
            &too_large("chunked", "pipedrive", "/api/v2/deals"),
        )
    })
    .await;
    assert!(!error.contains("Content-Length"), "{error}");
    let error = eventually("the declared answer refused", WAIT, || async {
        failed_run_with(
            &daemon,
            "declared",
            &too_large("declared", "pipedrive", "/api/v2/deals"),
        )
    })
    .await;
    assert!(
        error.contains(&format!("(Content-Length: {TOTAL})")),
        "refused on its declared length: {error}"
    );
    eventually("the token answer refused", WAIT, || async {
        failed_run_with(
            &daemon,
            "sf",
            &too_large("sf", "oauth", "/services/oauth2/token"),
        )
    })
    .await;

    // The daemon goes on: it answers, and another connection syncs.
    let (status, _) = daemon.get("/healthz").await;
    assert_eq!(status, 200);
    eventually("the normal connection's deal", WAIT, || async {
        stored_stage(&daemon, "pd", "11")
    })
    .await;
    for server in [&chunked, &declared, &token_endpoint] {
        assert!(server.requests.load(Ordering::SeqCst) >= 1);
        assert_eq!(
            server.completed.load(Ordering::SeqCst),
            0,
            "the daemon hung up before any 80 MiB answer ended"
        );
    }
    // A refused answer is not retried: at most the two discovery requests and one
    // deals request per run, where six attempts of one request would be retries.
    let runs = daemon.count("SELECT count(*) FROM sync_runs WHERE connection = 'declared'");
    let requests = declared.requests.load(Ordering::SeqCst) as i64;
    assert!(
        requests <= 3 * (runs + 1),
        "{requests} requests for {runs} runs"
    );
}
