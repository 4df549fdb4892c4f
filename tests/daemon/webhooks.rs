//! Webhook intake end to end against the real binary: rejections that write nothing,
//! dedupe, out-of-order deliveries, carts through abandonment to purchase (across
//! connections), restarts and SIGKILL under load, and the Shopify backfill.

use crate::harness::daemon::TestDaemon;
use crate::harness::eventually;
use dealsync::connectors::signature::{self, Delivery, Scheme};
use serde_json::{Value, json};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

pub(crate) const SHOP_SECRET: &str = "shpss_current_secret";
pub(crate) const STRIPE_SECRET: &str = "whsec_stripe_test_secret";
const WOO_SECRET: &str = "woo-secret";
const WAIT: Duration = Duration::from_secs(15);

/// The daemon's database with the webhook inbox file attached: `webhook_inbox` and
/// `webhook_dead_letters` resolve to the inbox file, everything else to the main one.
pub(crate) fn db(daemon: &TestDaemon) -> rusqlite::Connection {
    let db = daemon.db();
    let inbox = dealsync::store::inbox_path(&daemon.db_path);
    db.execute("ATTACH DATABASE ?1 AS inbox", [inbox.display().to_string()])
        .expect("attach the inbox");
    db
}

pub fn count(daemon: &TestDaemon, sql: &str) -> i64 {
    db(daemon).query_row(sql, [], |row| row.get(0)).expect(sql)
}

fn fixture(path: &str) -> Value {
    let full = format!("{}/tests/fixtures/{path}", env!("CARGO_MANIFEST_DIR"));
    serde_json::from_str(&std::fs::read_to_string(&full).expect(&full)).expect("fixture JSON")
}

/// A Shopify connection that takes webhooks signed with either of two secrets.
pub(crate) fn shopify(name: &str, abandon_after: &str) -> String {
    format!(
        r#"
[connections.{name}]
connector = "shopify"
webhook_secret = ["shpss_retired_secret", "{SHOP_SECRET}"]
abandon_after = "{abandon_after}"
"#
    )
}

pub(crate) fn stripe(name: &str) -> String {
    format!(
        "\n[connections.{name}]\nconnector = \"stripe\"\nwebhook_secret = \"{STRIPE_SECRET}\"\n"
    )
}

fn woocommerce(name: &str) -> String {
    format!(
        "\n[connections.{name}]\nconnector = \"woocommerce\"\nwebhook_secret = \"{WOO_SECRET}\"\n"
    )
}

/// The checkout fixture with its own token, time and shopper.
pub(crate) fn checkout(token: &str, updated_at: &str, email: &str) -> Vec<u8> {
    let mut body = fixture("shopify/webhook-checkouts-create.json");
    body["token"] = json!(token);
    body["cart_token"] = json!(format!("cart-{token}"));
    body["updated_at"] = json!(updated_at);
    body["created_at"] = json!("2026-01-01T10:00:00Z");
    body["email"] = json!(email);
    body["customer"]["email"] = json!(email);
    serde_json::to_vec(&body).unwrap()
}

pub(crate) fn order(id: u64, checkout_token: Option<&str>, email: &str) -> Vec<u8> {
    let mut body = fixture("shopify/webhook-orders-create.json");
    body["id"] = json!(id);
    body["checkout_token"] = json!(checkout_token);
    body["cart_token"] = Value::Null;
    body["email"] = json!(email);
    body["updated_at"] = json!("2026-01-01T12:00:00Z");
    serde_json::to_vec(&body).unwrap()
}

pub(crate) async fn post(
    daemon: &TestDaemon,
    connection: &str,
    headers: http::HeaderMap,
    body: Vec<u8>,
) -> (u16, String) {
    let response = daemon
        .http
        .post(daemon.url(&format!("/webhooks/{connection}")))
        .headers(headers)
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .expect("POST webhook");
    let status = response.status().as_u16();
    (status, response.text().await.unwrap_or_default())
}

pub(crate) fn shopify_headers(secret: &str, topic: &str, id: &str, body: &[u8]) -> http::HeaderMap {
    let delivery = Delivery {
        method: "POST",
        uri: "",
        body,
        id,
    };
    let mut headers = signature::sign(
        &Scheme::Shopify,
        secret.as_bytes(),
        &delivery,
        SystemTime::now(),
    )
    .expect("signing");
    headers.insert("x-shopify-topic", topic.parse().unwrap());
    headers
}

async fn post_shopify(
    daemon: &TestDaemon,
    connection: &str,
    topic: &str,
    id: &str,
    body: Vec<u8>,
) -> u16 {
    let headers = shopify_headers(SHOP_SECRET, topic, id, &body);
    post(daemon, connection, headers, body).await.0
}

fn stripe_headers(body: &[u8], at: SystemTime) -> http::HeaderMap {
    let delivery = Delivery {
        method: "POST",
        uri: "",
        body,
        id: "",
    };
    signature::sign(
        &Scheme::Stripe {
            tolerance: signature::DEFAULT_TOLERANCE,
        },
        STRIPE_SECRET.as_bytes(),
        &delivery,
        at,
    )
    .unwrap()
}

/// (stage, status) of a deal, once it exists.
fn stage_of(daemon: &TestDaemon, connection: &str, external_id: &str) -> Option<(String, String)> {
    db(daemon)
        .query_row(
            "SELECT stage, status FROM deals WHERE connection = ?1 AND external_id = ?2",
            [connection, external_id],
            |row| Ok((row.get(0)?, row.get(1)?)),
        )
        .ok()
}

async fn wait_for_stage(daemon: &TestDaemon, connection: &str, external_id: &str, stage: &str) {
    eventually(
        &format!("{connection}/{external_id} in stage {stage}"),
        WAIT,
        || async {
            stage_of(daemon, connection, external_id)
                .filter(|(found, _)| found == stage)
                .map(|_| ())
        },
    )
    .await
}

/// Sends only the head of a request whose `Content-Length` is 1 MiB + 1; returns the status.
async fn declare_oversized_body(daemon: &TestDaemon, connection: &str) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", daemon.port))
        .await
        .expect("connect");
    let head = format!(
        "POST /webhooks/{connection} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n\
         X-Shopify-Topic: checkouts/create\r\nContent-Length: {}\r\n\r\n",
        1024 * 1024 + 1
    );
    stream.write_all(head.as_bytes()).await.expect("write");
    let mut answer = vec![0u8; 64];
    let read = tokio::time::timeout(WAIT, stream.read(&mut answer))
        .await
        .expect("an answer before the body")
        .expect("read");
    let line = String::from_utf8_lossy(&answer[..read]).into_owned();
    line.split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP status line: {line:?}"))
}

/// POSTs `body` with `Transfer-Encoding: chunked` (no `Content-Length`, so only
/// counting the bytes can find it too large) in 64 KiB chunks over a raw socket, and
/// returns the status. The answer is read while the body is still being written: a
/// server that refuses early may close the connection before it has all of it.
async fn post_chunked(
    daemon: &TestDaemon,
    connection: &str,
    headers: &http::HeaderMap,
    body: Vec<u8>,
) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let stream = tokio::net::TcpStream::connect(("127.0.0.1", daemon.port))
        .await
        .expect("connect");
    let (mut reader, mut writer) = stream.into_split();
    let mut head = format!(
        "POST /webhooks/{connection} HTTP/1.1\r\nHost: 127.0.0.1\r\n\
         Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n"
    );
    for (name, value) in headers {
        head.push_str(&format!("{name}: {}\r\n", value.to_str().unwrap()));
    }
    head.push_str("\r\n");
    let upload = tokio::spawn(async move {
        writer.write_all(head.as_bytes()).await?;
        for chunk in body.chunks(64 * 1024) {
            writer
                .write_all(format!("{:x}\r\n", chunk.len()).as_bytes())
                .await?;
            writer.write_all(chunk).await?;
            writer.write_all(b"\r\n").await?;
        }
        writer.write_all(b"0\r\n\r\n").await?;
        writer.flush().await?;
        // Returned, not dropped: dropping it would half-close the connection, and the
        // server treats a closed request side as a client that went away.
        Ok::<_, std::io::Error>(writer)
    });
    let mut answer = Vec::new();
    let mut buffer = [0u8; 1024];
    while !answer.windows(2).any(|w| w == b"\r\n") {
        let read = tokio::time::timeout(WAIT, reader.read(&mut buffer))
            .await
            .expect("an answer to the chunked upload")
            .expect("read");
        assert!(read > 0, "the connection closed without an answer");
        answer.extend_from_slice(&buffer[..read]);
    }
    // The server may have stopped reading: a failed upload is expected then.
    upload.abort();
    let line = String::from_utf8_lossy(&answer).into_owned();
    line.split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP status line: {line:?}"))
}

/// Sends a chunked request whose body bytes are written as given (framing included),
/// then reads the whole answer until the server closes; returns the status and the answer.
async fn post_raw_body(daemon: &TestDaemon, connection: &str, framed: &[u8]) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", daemon.port))
        .await
        .expect("connect");
    let head = format!(
        "POST /webhooks/{connection} HTTP/1.1\r\nHost: 127.0.0.1\r\n\
         Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    );
    stream.write_all(head.as_bytes()).await.expect("write");
    stream.write_all(framed).await.expect("write");
    let mut answer = Vec::new();
    let mut buffer = [0u8; 1024];
    loop {
        let read = tokio::time::timeout(WAIT, stream.read(&mut buffer))
            .await
            .expect("an answer")
            .expect("read");
        answer.extend_from_slice(&buffer[..read]);
        if read == 0 || answer.ends_with(b"}") {
            break;
        }
    }
    let answer = String::from_utf8_lossy(&answer).into_owned();
    let status = answer
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP answer: {answer:?}"));
    (status, answer)
}

#[tokio::test]
async fn a_signed_chunked_body_over_the_cap_gets_413_and_nothing_is_stored() {
    let daemon = TestDaemon::start(&shopify("shop", "1h")).await;
    // Authentic and well-formed, only too long: past the 1 MiB default by 64 KiB.
    let mut large: Value = serde_json::from_slice(&checkout(
        "tok-large",
        "2026-01-01T10:00:00Z",
        "large@example.com",
    ))
    .unwrap();
    large["note"] = json!("x".repeat(1024 * 1024 + 64 * 1024));
    let large = serde_json::to_vec(&large).unwrap();
    let headers = shopify_headers(SHOP_SECRET, "checkouts/create", "d-large", &large);
    assert_eq!(post_chunked(&daemon, "shop", &headers, large).await, 413);
    assert_eq!(written(&daemon), (0, 0, 0));
    let too_large = r#"dealsync_webhooks_total{connection="shop",outcome="too_large"} 1"#;
    let (_, metrics) = daemon.get("/metrics").await;
    assert!(metrics.contains(too_large), "{metrics}");

    // A body that cannot be read (a chunk size that is not hex) is a bad request, not
    // one too large: 400, and the too-large count stays.
    let (status, answer) = post_raw_body(&daemon, "shop", b"zz\r\n{}\r\n0\r\n\r\n").await;
    assert_eq!(status, 400, "{answer}");
    assert!(answer.contains("could not read the body"), "{answer}");
    let (_, metrics) = daemon.get("/metrics").await;
    assert!(metrics.contains(too_large), "{metrics}");

    // The same framing under the cap is accepted and stored: only the size was refused.
    let small = checkout("tok-small", "2026-01-01T10:00:00Z", "small@example.com");
    let headers = shopify_headers(SHOP_SECRET, "checkouts/create", "d-small", &small);
    assert_eq!(post_chunked(&daemon, "shop", &headers, small).await, 200);
    assert_eq!(count(&daemon, "SELECT count(*) FROM webhook_inbox"), 1);
    assert_eq!(
        count(
            &daemon,
            "SELECT count(*) FROM webhook_inbox WHERE delivery_id = 'd-large'"
        ),
        0
    );
}

#[tokio::test]
async fn a_signed_body_of_exactly_the_cap_with_its_length_declared_is_accepted() {
    let daemon = TestDaemon::start(&shopify("shop", "1h")).await;
    // A checkout padded to exactly the 1 MiB default, sent with its Content-Length.
    let sized = |token: &str, length: usize| {
        let mut cart: Value =
            serde_json::from_slice(&checkout(token, "2026-01-01T10:00:00Z", "edge@example.com"))
                .unwrap();
        cart["note"] = json!("");
        let bare = serde_json::to_vec(&cart).unwrap().len();
        cart["note"] = json!("x".repeat(length - bare));
        let body = serde_json::to_vec(&cart).unwrap();
        assert_eq!(body.len(), length);
        body
    };
    let at_cap = sized("tok-at-cap", 1024 * 1024);
    let headers = shopify_headers(SHOP_SECRET, "checkouts/create", "d-at-cap", &at_cap);
    let (status, text) = post(&daemon, "shop", headers, at_cap).await;
    assert_eq!(status, 200, "{text}");
    // One byte more is refused on its declared length (see
    // `every_rejected_webhook_gets_its_status_and_writes_nothing`).
    assert_eq!(
        count(
            &daemon,
            "SELECT count(*) FROM webhook_inbox WHERE delivery_id = 'd-at-cap'"
        ),
        1
    );
    assert_eq!(count(&daemon, "SELECT count(*) FROM webhook_inbox"), 1);
}

fn written(daemon: &TestDaemon) -> (i64, i64, i64) {
    (
        count(daemon, "SELECT count(*) FROM webhook_inbox"),
        count(daemon, "SELECT count(*) FROM deals"),
        count(daemon, "SELECT count(*) FROM webhook_dead_letters"),
    )
}

#[tokio::test]
async fn every_rejected_webhook_gets_its_status_and_writes_nothing() {
    let daemon = TestDaemon::start(&format!("{}{}", shopify("shop", "1h"), stripe("pay"))).await;
    let body = checkout("tok-reject", "2026-01-01T10:00:00Z", "reject@example.com");

    // Unknown connection.
    let headers = shopify_headers(SHOP_SECRET, "checkouts/create", "d-1", &body);
    let (status, _) = post(&daemon, "nope", headers, body.clone()).await;
    assert_eq!(status, 404);
    assert_eq!(written(&daemon), (0, 0, 0));

    // Missing signature.
    let mut headers = http::HeaderMap::new();
    headers.insert("x-shopify-topic", "checkouts/create".parse().unwrap());
    let (status, text) = post(&daemon, "shop", headers, body.clone()).await;
    assert_eq!(status, 401, "{text}");
    assert!(text.contains("x-shopify-hmac-sha256"), "{text}");
    assert_eq!(written(&daemon), (0, 0, 0));

    // Signed with a secret that is not configured.
    let headers = shopify_headers("shpss_someone_else", "checkouts/create", "d-2", &body);
    let (status, _) = post(&daemon, "shop", headers, body.clone()).await;
    assert_eq!(status, 401);
    assert_eq!(written(&daemon), (0, 0, 0));

    // A body changed after signing.
    let headers = shopify_headers(SHOP_SECRET, "checkouts/create", "d-3", &body);
    let mut tampered = body.clone();
    tampered.extend_from_slice(b" ");
    let (status, _) = post(&daemon, "shop", headers, tampered).await;
    assert_eq!(status, 401);

    // A Stripe delivery signed ten minutes ago (replay window is five).
    let event = serde_json::to_vec(&fixture("stripe/event-checkout-session-expired.json")).unwrap();
    let stale = SystemTime::now() - Duration::from_secs(600);
    let (status, text) = post(&daemon, "pay", stripe_headers(&event, stale), event.clone()).await;
    assert_eq!(status, 401);
    assert!(text.contains("replay window"), "{text}");
    assert_eq!(written(&daemon), (0, 0, 0));

    // Over the 1 MiB default cap: refused from the declared length, before the body is
    // read (sent by hand, so the early answer does not race a client still uploading).
    let status = declare_oversized_body(&daemon, "shop").await;
    assert_eq!(status, 413);
    assert_eq!(written(&daemon), (0, 0, 0));

    // Authentic but malformed: 400, kept as a dead letter, nothing in the inbox.
    let malformed = br#"{"id": 1, "token": "#.to_vec();
    let headers = shopify_headers(SHOP_SECRET, "checkouts/create", "d-5", &malformed);
    let (status, text) = post(&daemon, "shop", headers, malformed.clone()).await;
    assert_eq!(status, 400, "{text}");
    assert_eq!(written(&daemon), (0, 0, 1));
    let kept: Vec<u8> = db(&daemon)
        .query_row("SELECT body FROM webhook_dead_letters", [], |row| {
            row.get(0)
        })
        .unwrap();
    assert_eq!(kept, malformed);
    let stored_headers: String = db(&daemon)
        .query_row("SELECT headers FROM webhook_dead_letters", [], |row| {
            row.get(0)
        })
        .unwrap();
    assert!(!stored_headers.contains("hmac"), "{stored_headers}");

    // Every rejection was logged with its connection; no secret ever was.
    let logs = daemon.logs();
    assert!(logs.contains("webhook rejected"), "{logs}");
    for secret in [SHOP_SECRET, STRIPE_SECRET, "shpss_retired_secret"] {
        assert!(!logs.contains(secret), "a secret leaked into the logs");
    }
}

#[tokio::test]
async fn a_woocommerce_ping_gets_200_and_nothing_is_stored_while_a_signed_order_is() {
    let daemon = TestDaemon::start(&woocommerce("woo")).await;
    let response = daemon
        .http
        .post(daemon.url("/webhooks/woo"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body("webhook_id=17")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 200);
    assert_eq!(written(&daemon), (0, 0, 0));

    let mut order = fixture("woocommerce/order-retrieve.json");
    order["status"] = json!("pending");
    let body = serde_json::to_vec(&order).unwrap();
    let delivery = Delivery {
        method: "POST",
        uri: "",
        body: &body,
        id: "woo-delivery-1",
    };
    let mut headers = signature::sign(
        &Scheme::WooCommerce,
        WOO_SECRET.as_bytes(),
        &delivery,
        SystemTime::now(),
    )
    .unwrap();
    headers.insert("x-wc-webhook-topic", "order.updated".parse().unwrap());
    let (status, _) = post(&daemon, "woo", headers, body).await;
    assert_eq!(status, 200);
    wait_for_stage(&daemon, "woo", "727", "checkout_started").await;
}

#[tokio::test]
async fn a_redelivered_webhook_is_acknowledged_and_processed_once() {
    let daemon = TestDaemon::start(&shopify("shop", "1h")).await;
    let body = checkout("tok-dup", "2026-01-01T10:00:00Z", "dup@example.com");
    for _ in 0..3 {
        let status = post_shopify(
            &daemon,
            "shop",
            "checkouts/create",
            "delivery-dup",
            body.clone(),
        )
        .await;
        assert_eq!(status, 200);
    }
    wait_for_stage(&daemon, "shop", "tok-dup", "checkout_started").await;
    eventually("the inbox row processed", WAIT, || async {
        (count(
            &daemon,
            "SELECT count(*) FROM webhook_inbox WHERE state = 'processed'",
        ) == 1)
            .then_some(())
    })
    .await;
    assert_eq!(count(&daemon, "SELECT count(*) FROM webhook_inbox"), 1);
    assert_eq!(count(&daemon, "SELECT count(*) FROM deals"), 1);
    assert_eq!(count(&daemon, "SELECT count(*) FROM stage_history"), 1);
    let (_, metrics) = daemon.get("/metrics").await;
    assert!(
        metrics.contains(r#"dealsync_webhooks_total{connection="shop",outcome="duplicate"} 2"#),
        "{metrics}"
    );
}

#[tokio::test]
async fn a_signed_delivery_of_a_topic_dealsync_does_not_use_is_acknowledged_and_not_stored() {
    let daemon = TestDaemon::start(&shopify("shop", "1h")).await;
    // Shopify sends every topic the app subscribed to; a product update is not a cart.
    let body = br#"{"id":632910392,"title":"IPod Nano - 8GB"}"#.to_vec();
    let headers = shopify_headers(SHOP_SECRET, "products/update", "d-product", &body);
    let (status, answer) = post(&daemon, "shop", headers, body).await;
    assert_eq!(
        (status, answer.contains("ignored")),
        (200, true),
        "{answer}"
    );
    assert_eq!(written(&daemon), (0, 0, 0));
    let (_, metrics) = daemon.get("/metrics").await;
    assert!(
        metrics.contains(r#"dealsync_webhooks_total{connection="shop",outcome="ignored"} 1"#),
        "{metrics}"
    );
}

#[tokio::test]
async fn a_connection_without_a_webhook_secret_refuses_deliveries_and_says_so() {
    let daemon = TestDaemon::start(
        "\n[connections.shop]\nconnector = \"shopify\"\nabandon_after = \"1h\"\n",
    )
    .await;
    let body = checkout(
        "tok-nosecret",
        "2026-01-01T10:00:00Z",
        "nosecret@example.com",
    );
    let headers = shopify_headers(SHOP_SECRET, "checkouts/create", "d-nosecret", &body);
    let (status, answer) = post(&daemon, "shop", headers, body).await;
    assert_eq!(status, 401, "{answer}");
    // The answer names the cause, which is the daemon's configuration, not the sender's
    // signature.
    assert!(answer.contains("no webhook secret configured"), "{answer}");
    assert_eq!(written(&daemon), (0, 0, 0));
}

const API_TOKEN: &str = "test-token-0123456789abcdef";

/// The dead letters' reasons, oldest first.
fn dead_letter_reasons(daemon: &TestDaemon) -> Vec<String> {
    db(daemon)
        .prepare("SELECT reason FROM webhook_dead_letters ORDER BY id")
        .unwrap()
        .query_map([], |row| row.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap()
}

#[tokio::test]
async fn a_shopify_token_or_a_stripe_session_id_with_multi_byte_characters_is_answered_and_recorded()
 {
    let daemon = TestDaemon::start(&format!("{}{}", shopify("shop", "1h"), stripe("pay"))).await;

    // A checkout with no shopper name: its title is made from the token, whose 8th
    // byte falls inside a character.
    let token = "aéééééé";
    assert!(!token.is_char_boundary(8));
    let mut checkout = fixture("shopify/webhook-checkouts-create.json");
    for key in ["customer", "billing_address", "name"] {
        checkout.as_object_mut().unwrap().remove(key);
    }
    checkout["token"] = json!(token);
    let body = serde_json::to_vec(&checkout).unwrap();
    let headers = shopify_headers(SHOP_SECRET, "checkouts/create", "mb-1", &body);
    let (status, answer) = post(&daemon, "shop", headers, body).await;
    assert_eq!(status, 200, "{answer}");
    wait_for_stage(&daemon, "shop", token, "checkout_started").await;

    // A Stripe session with no customer name: its title is made from the session id,
    // whose 16th byte falls inside a character.
    let session = "cs_tést_🛒🛒🛒";
    assert!(!session.is_char_boundary(16));
    let mut event = fixture("stripe/event-checkout-session-expired.json");
    event["data"]["object"]["id"] = json!(session);
    event["data"]["object"]["customer_details"]["name"] = Value::Null;
    let body = serde_json::to_vec(&event).unwrap();
    let (status, answer) = post(
        &daemon,
        "pay",
        stripe_headers(&body, SystemTime::now()),
        body,
    )
    .await;
    assert_eq!(status, 200, "{answer}");
    wait_for_stage(&daemon, "pay", session, "cart_abandoned").await;

    let titles: Vec<String> = db(&daemon)
        .prepare("SELECT title FROM deals ORDER BY id")
        .unwrap()
        .query_map([], |row| row.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(
        titles,
        [format!("Checkout {token}"), format!("Checkout {session}")]
    );
    assert!(!daemon.logs().contains("panicked"), "{}", daemon.logs());
}

#[tokio::test]
async fn a_webhook_body_nested_200000_levels_deep_is_dead_lettered_and_every_deal_stays_readable() {
    let daemon = TestDaemon::start(&format!(
        "api_token = \"{API_TOKEN}\"\n{}",
        shopify("shop", "1h")
    ))
    .await;
    let body = checkout("tok-ok", "2026-01-01T10:00:00Z", "ok@example.com");
    assert_eq!(
        post_shopify(&daemon, "shop", "checkouts/create", "ok-1", body).await,
        200
    );
    wait_for_stage(&daemon, "shop", "tok-ok", "checkout_started").await;

    // A signed checkout with a field no mapping reads nested 200,000 levels deep.
    let levels = 200_000;
    let plain = checkout("tok-deep", "2026-01-01T10:00:00Z", "deep@example.com");
    let mut deep = format!(
        r#"{{"x_deep":{}{},"#,
        "[".repeat(levels),
        "]".repeat(levels)
    )
    .into_bytes();
    deep.extend_from_slice(&plain[1..]);
    serde_json::from_slice::<serde::de::IgnoredAny>(&deep).expect("the deep body is JSON");
    let headers = shopify_headers(SHOP_SECRET, "checkouts/create", "deep-1", &deep);
    let (status, answer) = post(&daemon, "shop", headers, deep).await;

    assert_eq!(status, 400, "{answer}");
    let reasons = dead_letter_reasons(&daemon);
    assert_eq!(reasons.len(), 1, "{reasons:?}");
    assert!(
        reasons[0].contains("nested 128 or more levels deep"),
        "{reasons:?}"
    );
    assert_eq!(count(&daemon, "SELECT count(*) FROM webhook_inbox"), 1);
    assert_eq!(stage_of(&daemon, "shop", "tok-deep"), None);
    let response = daemon
        .http
        .get(daemon.url("/api/v1/deals"))
        .bearer_auth(API_TOKEN)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 200);
    let listed: Value = response.json().await.unwrap();
    assert_eq!(listed["deals"].as_array().unwrap().len(), 1, "{listed}");
    let config = daemon.config_path.to_str().unwrap().to_owned();
    let (code, stdout, stderr) = crate::harness::daemon::run_cli(
        &["--config", &config, "deals", "list", "--format", "json"],
        &[],
    )
    .await;
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout.contains("tok-ok"), "{stdout}");
}

#[tokio::test]
async fn a_signed_checkout_resent_as_an_order_is_refused_and_the_same_body_under_a_new_id_is_a_duplicate()
 {
    let daemon =
        TestDaemon::start(&format!("{}{}", shopify("shop", "1h"), woocommerce("woo"))).await;
    let body = checkout("tok-replay", "2026-01-01T10:00:00Z", "replay@example.com");
    assert_eq!(
        post_shopify(&daemon, "shop", "checkouts/create", "r-1", body.clone()).await,
        200
    );
    wait_for_stage(&daemon, "shop", "tok-replay", "checkout_started").await;

    // The captured body, validly signed, sent again as an order under a new id.
    let headers = shopify_headers(SHOP_SECRET, "orders/create", "r-2", &body);
    let (status, answer) = post(&daemon, "shop", headers, body.clone()).await;
    assert_eq!(status, 400, "{answer}");
    assert!(answer.contains("contradicts"), "{answer}");
    let reasons = dead_letter_reasons(&daemon);
    assert_eq!(reasons.len(), 1, "{reasons:?}");
    assert!(reasons[0].contains("orders/create"), "{reasons:?}");

    // The same body under its own topic and a new delivery id: a duplicate.
    let headers = shopify_headers(SHOP_SECRET, "checkouts/update", "r-3", &body);
    let (status, answer) = post(&daemon, "shop", headers, body).await;
    assert_eq!(status, 200, "{answer}");
    assert!(answer.contains("duplicate"), "{answer}");

    // WooCommerce signs the body alone too.
    let mut order = fixture("woocommerce/order-retrieve.json");
    order["status"] = json!("pending");
    let body = serde_json::to_vec(&order).unwrap();
    let woo = |id: &str, resource: &str| {
        let delivery = Delivery {
            method: "POST",
            uri: "",
            body: &body,
            id,
        };
        let mut headers = signature::sign(
            &Scheme::WooCommerce,
            WOO_SECRET.as_bytes(),
            &delivery,
            SystemTime::now(),
        )
        .unwrap();
        headers.insert("x-wc-webhook-topic", "order.updated".parse().unwrap());
        headers.insert("x-wc-webhook-resource", resource.parse().unwrap());
        headers
    };
    let (status, answer) = post(&daemon, "woo", woo("w-1", "order"), body.clone()).await;
    assert_eq!(status, 200, "{answer}");
    let (status, answer) = post(&daemon, "woo", woo("w-2", "order"), body.clone()).await;
    assert_eq!(
        (status, answer.contains("duplicate")),
        (200, true),
        "{answer}"
    );
    let (status, answer) = post(&daemon, "woo", woo("w-3", "product"), body).await;
    assert_eq!(status, 400, "{answer}");
    wait_for_stage(&daemon, "woo", "727", "checkout_started").await;

    eventually("the inbox processed", WAIT, || async {
        (count(
            &daemon,
            "SELECT count(*) FROM webhook_inbox WHERE state = 'processed'",
        ) == 2)
            .then_some(())
    })
    .await;
    assert_eq!(count(&daemon, "SELECT count(*) FROM webhook_inbox"), 2);
    assert_eq!(dead_letter_reasons(&daemon).len(), 2);
    assert_eq!(
        stage_of(&daemon, "shop", "tok-replay"),
        Some(("checkout_started".into(), "open".into())),
        "the replayed checkout did not mark the cart purchased"
    );
    assert_eq!(count(&daemon, "SELECT count(*) FROM stage_history"), 2);
    let (_, metrics) = daemon.get("/metrics").await;
    for connection in ["shop", "woo"] {
        let line = format!(
            r#"dealsync_webhooks_total{{connection="{connection}",outcome="duplicate"}} 1"#
        );
        assert!(metrics.contains(&line), "{line} in {metrics}");
    }
}

#[tokio::test]
async fn an_update_that_arrives_before_its_create_wins_and_an_order_before_its_checkout_keeps_the_cart_purchased()
 {
    let daemon = TestDaemon::start(&shopify("shop", "1h")).await;
    let newer = checkout("tok-ooo", "2026-01-01T11:00:00Z", "newer@example.com");
    let older = checkout("tok-ooo", "2026-01-01T10:00:00Z", "older@example.com");
    assert_eq!(
        post_shopify(&daemon, "shop", "checkouts/update", "u-1", newer).await,
        200
    );
    assert_eq!(
        post_shopify(&daemon, "shop", "checkouts/create", "c-1", older).await,
        200
    );
    eventually("both deliveries processed", WAIT, || async {
        (count(
            &daemon,
            "SELECT count(*) FROM webhook_inbox WHERE state = 'processed'",
        ) == 2)
            .then_some(())
    })
    .await;
    let email: String = db(&daemon)
        .query_row(
            "SELECT contact_email FROM deals WHERE external_id = 'tok-ooo'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(email, "newer@example.com");

    // The order first, then its checkout's create and a later update.
    assert_eq!(
        post_shopify(
            &daemon,
            "shop",
            "orders/create",
            "o-1",
            order(7001, Some("tok-first"), "o@example.com")
        )
        .await,
        200
    );
    wait_for_stage(&daemon, "shop", "tok-first", "purchase_completed").await;
    for (id, at) in [
        ("c-2", "2026-01-01T10:00:00Z"),
        ("u-2", "2026-01-01T13:00:00Z"),
    ] {
        let body = checkout("tok-first", at, "o@example.com");
        assert_eq!(
            post_shopify(&daemon, "shop", "checkouts/update", id, body).await,
            200
        );
    }
    eventually("all deliveries processed", WAIT, || async {
        (count(
            &daemon,
            "SELECT count(*) FROM webhook_inbox WHERE state = 'processed'",
        ) == 5)
            .then_some(())
    })
    .await;
    assert_eq!(
        stage_of(&daemon, "shop", "tok-first"),
        Some(("purchase_completed".into(), "won".into()))
    );
}

#[tokio::test]
async fn an_idle_cart_is_abandoned_and_an_order_through_another_connection_marks_it_purchased() {
    let config = format!("{}{}", shopify("shop-eu", "1s"), shopify("shop-pos", "1h"));
    let daemon = TestDaemon::start(&config).await;
    // updated_at in the past: idle for longer than 1 s at once.
    let body = checkout("tok-cart", "2026-01-01T10:00:00Z", "cart@example.com");
    assert_eq!(
        post_shopify(&daemon, "shop-eu", "checkouts/create", "c-1", body).await,
        200
    );
    wait_for_stage(&daemon, "shop-eu", "tok-cart", "cart_abandoned").await;
    let cause: String = db(&daemon)
        .query_row(
            "SELECT cause FROM stage_history ORDER BY id DESC LIMIT 1",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(cause, "followup");
    let recovery: String = db(&daemon)
        .query_row(
            "SELECT recovery_url FROM deals WHERE external_id = 'tok-cart'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert!(recovery.ends_with("/recover"), "{recovery}");

    // The order comes through the other connection, naming the checkout token.
    let paid = order(9001, Some("tok-cart"), "cart@example.com");
    assert_eq!(
        post_shopify(&daemon, "shop-pos", "orders/paid", "o-1", paid).await,
        200
    );
    wait_for_stage(&daemon, "shop-eu", "tok-cart", "purchase_completed").await;
    assert_eq!(
        count(
            &daemon,
            "SELECT count(*) FROM deals WHERE connection = 'shop-pos'"
        ),
        0,
        "the order is not stored a second time"
    );

    // A Stripe purchase by the same shopper with no shared key: matched by email.
    let daemon_config = format!("{}{}", shopify("shop", "1h"), stripe("pay"));
    drop(daemon);
    let daemon = TestDaemon::start(&daemon_config).await;
    let mut cart = fixture("shopify/webhook-checkouts-create.json");
    cart["token"] = json!("tok-mail");
    cart["email"] = json!("jenny.rosen@example.com");
    cart["created_at"] = json!(chrono::Utc::now().to_rfc3339());
    cart["updated_at"] = json!(chrono::Utc::now().to_rfc3339());
    let body = serde_json::to_vec(&cart).unwrap();
    assert_eq!(
        post_shopify(&daemon, "shop", "checkouts/create", "c-9", body).await,
        200
    );
    wait_for_stage(&daemon, "shop", "tok-mail", "checkout_started").await;
    let mut event = fixture("stripe/event-checkout-session-completed.json");
    event["created"] = json!(chrono::Utc::now().timestamp());
    let body = serde_json::to_vec(&event).unwrap();
    let (status, _) = post(
        &daemon,
        "pay",
        stripe_headers(&body, SystemTime::now()),
        body,
    )
    .await;
    assert_eq!(status, 200);
    wait_for_stage(&daemon, "shop", "tok-mail", "purchase_completed").await;

    // Stripe resends an event under its id; the envelope's `pending_webhooks` count can
    // differ between attempts, and the event id alone makes it the same delivery.
    event["pending_webhooks"] = json!(0);
    let body = serde_json::to_vec(&event).unwrap();
    let (status, text) = post(
        &daemon,
        "pay",
        stripe_headers(&body, SystemTime::now()),
        body,
    )
    .await;
    assert_eq!((status, text.contains("duplicate")), (200, true), "{text}");
}

#[tokio::test]
async fn pending_inbox_rows_left_by_a_stopped_daemon_are_processed_after_a_restart() {
    let mut daemon = TestDaemon::start(&shopify("shop", "1h")).await;
    daemon.signal("TERM");
    daemon.wait_exit(Duration::from_secs(10)).await;
    {
        let db = db(&daemon);
        for n in 0..5 {
            insert_row(&db, "shop", &format!("left-{n}"), None);
        }
    }
    daemon.start_again().await;
    eventually("the left-over rows processed", WAIT, || async {
        (count(&daemon, "SELECT count(*) FROM deals") == 5
            && count(
                &daemon,
                "SELECT count(*) FROM webhook_inbox WHERE state = 'pending'",
            ) == 0)
            .then_some(())
    })
    .await;
}

/// Inserts a webhook row, as the intake stores one, with its body.
fn insert_row(
    db: &rusqlite::Connection,
    connection: &str,
    delivery: &str,
    settled: Option<(&str, i64)>,
) {
    let (state, processed_at) = settled.unwrap_or(("pending", 0));
    let processed_at = settled.map(|_| processed_at);
    db.execute(
        "INSERT INTO webhook_inbox (connection, delivery_id, topic, received_at, state, processed_at)
         VALUES (?1, ?2, 'checkouts/create', 0, ?3, ?4)",
        rusqlite::params![connection, delivery, state, processed_at],
    )
    .unwrap();
    let body = checkout(delivery, "2026-01-01T10:00:00Z", "r@example.com");
    db.execute(
        "INSERT INTO webhook_bodies (id, headers, body) VALUES (?1, '[]', ?2)",
        rusqlite::params![db.last_insert_rowid(), body],
    )
    .unwrap();
}

#[tokio::test]
async fn a_pending_row_of_a_connection_removed_from_the_config_is_kept_as_failed_without_retries() {
    let mut daemon = TestDaemon::start(&shopify("shop", "1h")).await;
    daemon.signal("TERM");
    daemon.wait_exit(Duration::from_secs(10)).await;
    {
        let db = db(&daemon);
        insert_row(&db, "old-shop", "orphan-1", None);
        insert_row(&db, "shop", "kept-1", None);
    }
    daemon.start_again().await;
    let (state, attempts, error) = eventually("the orphan row settled", WAIT, || async {
        db(&daemon)
            .query_row(
                "SELECT state, attempts, last_error FROM webhook_inbox
                 WHERE delivery_id = 'orphan-1' AND next_attempt_at IS NULL AND state <> 'pending'",
                [],
                |row| {
                    Ok((
                        row.get::<_, String>(0)?,
                        row.get::<_, i64>(1)?,
                        row.get::<_, Option<String>>(2)?,
                    ))
                },
            )
            .ok()
    })
    .await;
    // No later attempt can work: failed at once, not scheduled for retries.
    assert_eq!(state, "failed");
    assert!(attempts <= 1, "attempts {attempts}");
    let error = error.unwrap_or_default();
    assert!(error.contains("no longer configured"), "{error}");
    // The orphan is settled while the pass is planned; the kept row commits with the
    // pass after it.
    eventually("the configured connection's row applied", WAIT, || async {
        (count(
            &daemon,
            "SELECT count(*) FROM webhook_inbox WHERE state = 'processed'",
        ) == 1)
            .then_some(())
    })
    .await;
}

#[tokio::test]
async fn settled_rows_past_their_retention_are_pruned_and_the_log_says_how_many() {
    let mut daemon = TestDaemon::start(&shopify("shop", "1h")).await;
    let body = checkout("tok-p1", "2026-01-01T10:00:00Z", "p@example.com");
    assert_eq!(
        post_shopify(&daemon, "shop", "checkouts/create", "p-1", body).await,
        200
    );
    // The worker prunes before its first pass: once this row is applied, the prune of
    // an inbox with nothing old has run, and must not have said it pruned anything.
    eventually("the webhook applied", WAIT, || async {
        (count(
            &daemon,
            "SELECT count(*) FROM webhook_inbox WHERE state = 'processed'",
        ) == 1)
            .then_some(())
    })
    .await;
    assert!(
        !daemon.logs().contains("pruned old webhook inbox rows"),
        "{}",
        daemon.logs()
    );
    daemon.signal("TERM");
    daemon.wait_exit(Duration::from_secs(10)).await;
    let day_ms = 86_400_000;
    let now_ms = chrono::Utc::now().timestamp_millis();
    {
        // Processed rows are kept 7 days, failed ones 30.
        let db = db(&daemon);
        insert_row(
            &db,
            "shop",
            "processed-8d",
            Some(("processed", now_ms - 8 * day_ms)),
        );
        insert_row(
            &db,
            "shop",
            "processed-6d",
            Some(("processed", now_ms - 6 * day_ms)),
        );
        insert_row(
            &db,
            "shop",
            "failed-31d",
            Some(("failed", now_ms - 31 * day_ms)),
        );
        insert_row(
            &db,
            "shop",
            "failed-29d",
            Some(("failed", now_ms - 29 * day_ms)),
        );
    }
    daemon.start_again().await;
    daemon
        .wait_for_log("pruned old webhook inbox rows", WAIT)
        .await;
    let line = daemon
        .logs()
        .lines()
        .find(|line| line.contains("pruned old webhook inbox rows"))
        .unwrap_or_default()
        .to_owned();
    assert!(line.contains("pruned=2"), "{line}");
    let left: Vec<String> = db(&daemon)
        .prepare("SELECT delivery_id FROM webhook_inbox ORDER BY delivery_id")
        .unwrap()
        .query_map([], |row| row.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(left, ["failed-29d", "p-1", "processed-6d"]);
    assert_eq!(
        count(&daemon, "SELECT count(*) FROM webhook_bodies"),
        3,
        "a pruned row's body goes with it"
    );
}

#[tokio::test]
async fn a_full_inbox_answers_503_with_retry_after_and_stores_nothing() {
    let mut daemon = TestDaemon::start(&shopify("shop", "1h")).await;
    daemon.signal("TERM");
    daemon.wait_exit(Duration::from_secs(10)).await;
    // The inbox at its limit: unprocessed rows of a connection whose first row waits
    // for a retry an hour away, so the worker leaves them all pending.
    let limit = dealsync::store::MAX_PENDING as i64;
    db(&daemon)
        .execute_batch(&format!(
            "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < {limit})
             INSERT INTO webhook_inbox (connection, delivery_id, topic, received_at, attempts, next_attempt_at)
             SELECT 'held', 'held-' || i, 'checkouts/create', 0, CASE i WHEN 1 THEN 1 ELSE 0 END,
                    CASE i WHEN 1 THEN (unixepoch() + 3600) * 1000 END
             FROM n;
             INSERT INTO webhook_bodies (id, headers, body) SELECT id, '[]', '{{}}' FROM webhook_inbox;"
        ))
        .unwrap();
    daemon.start_again().await;
    let before = written(&daemon);

    let body = checkout("tok-full", "2026-01-01T10:00:00Z", "full@example.com");
    let response = daemon
        .http
        .post(daemon.url("/webhooks/shop"))
        .headers(shopify_headers(
            SHOP_SECRET,
            "checkouts/create",
            "d-full",
            &body,
        ))
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 503);
    let retry_after: u64 = response.headers()["retry-after"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(retry_after > 0, "Retry-After: {retry_after}");
    assert_eq!(
        written(&daemon),
        before,
        "nothing stored, nothing dead-lettered"
    );
    assert_eq!(
        count(
            &daemon,
            "SELECT count(*) FROM webhook_inbox WHERE delivery_id = 'd-full'"
        ),
        0
    );
}

#[tokio::test]
async fn every_webhook_answered_2xx_survives_a_sigkill_during_a_load() {
    let mut daemon = TestDaemon::start(&shopify("shop", "1h")).await;
    let url = daemon.url("/webhooks/shop");
    let acknowledged = Arc::new(Mutex::new(Vec::<String>::new()));
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(5))
        .build()
        .unwrap();
    let mut senders = Vec::new();
    for worker in 0..16 {
        let (url, client, acknowledged) = (url.clone(), client.clone(), acknowledged.clone());
        senders.push(tokio::spawn(async move {
            for n in 0..200 {
                let id = format!("kill-{worker}-{n}");
                let body = checkout(&id, "2026-01-01T10:00:00Z", "load@example.com");
                let headers = shopify_headers(SHOP_SECRET, "checkouts/create", &id, &body);
                let sent = client.post(&url).headers(headers).body(body).send().await;
                match sent {
                    Ok(response) if response.status().is_success() => {
                        acknowledged.lock().unwrap().push(id)
                    }
                    // The daemon is gone: this sender is done.
                    _ => return,
                }
            }
        }));
    }
    eventually("some deliveries acknowledged", WAIT, || async {
        (acknowledged.lock().unwrap().len() >= 300).then_some(())
    })
    .await;
    daemon.kill_and_restart().await;
    for sender in senders {
        sender.await.unwrap();
    }
    let acknowledged = acknowledged.lock().unwrap().clone();
    assert!(acknowledged.len() >= 300);
    let db = db(&daemon);
    let mut missing = Vec::new();
    for id in &acknowledged {
        let found: i64 = db
            .query_row(
                "SELECT count(*) FROM webhook_inbox WHERE connection = 'shop' AND delivery_id = ?1",
                [id],
                |row| row.get(0),
            )
            .unwrap();
        if found != 1 {
            missing.push(id.clone());
        }
    }
    assert!(missing.is_empty(), "acknowledged but lost: {missing:?}");
    // And each becomes its deal, once.
    let expected = acknowledged.len() as i64;
    eventually(
        "every acknowledged checkout stored as a deal",
        WAIT,
        || async {
            let deals = count(
                &daemon,
                "SELECT count(*) FROM deals d JOIN webhook_inbox w
             ON w.connection = d.connection AND w.delivery_id = d.external_id",
            );
            (deals >= expected).then_some(())
        },
    )
    .await;
}

/// A mock Shopify Admin API serving the abandoned-checkouts fixture over three pages.
async fn mock_shopify(requests: Arc<Mutex<Vec<String>>>) -> String {
    use axum::extract::{RawQuery, State};
    use axum::http::HeaderMap;
    use axum::response::IntoResponse;
    async fn checkouts(
        State((requests, base)): State<(Arc<Mutex<Vec<String>>>, String)>,
        headers: HeaderMap,
        RawQuery(query): RawQuery,
    ) -> axum::response::Response {
        let query = query.unwrap_or_default();
        if headers
            .get("x-shopify-access-token")
            .and_then(|v| v.to_str().ok())
            != Some("shpat_token")
        {
            return (axum::http::StatusCode::UNAUTHORIZED, "bad token").into_response();
        }
        requests.lock().unwrap().push(query.clone());
        let template = fixture("shopify/abandoned-checkouts-list.json")["checkouts"][0].clone();
        let page = |tokens: &[&str]| {
            let checkouts: Vec<Value> = tokens
                .iter()
                .map(|token| {
                    let mut checkout = template.clone();
                    checkout["token"] = json!(token);
                    checkout["updated_at"] = json!("2026-01-02T10:00:00Z");
                    checkout
                })
                .collect();
            json!({ "checkouts": checkouts })
        };
        let link = |next: &str| {
            format!(
                "<{base}/admin/api/2024-10/checkouts.json?page_info={next}&limit=2>; rel=\"next\""
            )
        };
        let (body, link) = if query.contains("page_info=p2") {
            (page(&["bf-3", "bf-4"]), Some(link("p3")))
        } else if query.contains("page_info=p3") {
            (page(&["bf-5"]), None)
        } else if query.contains("updated_at_min") {
            (page(&[]), None)
        } else {
            (page(&["bf-1", "bf-2"]), Some(link("p2")))
        };
        let mut response = axum::Json(body).into_response();
        if let Some(link) = link {
            response.headers_mut().insert("link", link.parse().unwrap());
        }
        response
    }
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let app = axum::Router::new()
        .route(
            "/admin/api/2024-10/checkouts.json",
            axum::routing::get(checkouts),
        )
        .with_state((requests, base.clone()));
    tokio::spawn(async move { axum::serve(listener, app).await });
    base
}

#[tokio::test]
async fn the_shopify_backfill_follows_link_pagination_then_reads_incrementally() {
    let requests = Arc::new(Mutex::new(Vec::new()));
    let base = mock_shopify(requests.clone()).await;
    let config = format!(
        r#"
[connections.shop]
connector = "shopify"
base_url = "{base}"
token = "shpat_token"
page_size = 2
poll_interval = "1s"
webhook_secret = "{SHOP_SECRET}"
"#
    );
    let daemon = TestDaemon::start(&config).await;
    eventually("five backfilled checkouts", WAIT, || async {
        (count(
            &daemon,
            "SELECT count(*) FROM deals WHERE connection = 'shop'",
        ) == 5)
            .then_some(())
    })
    .await;
    eventually("an incremental read after the full one", WAIT, || async {
        requests
            .lock()
            .unwrap()
            .iter()
            .any(|query| query.contains("updated_at_min=2026-01-02T09%3A55"))
            .then_some(())
    })
    .await;
    let seen = requests.lock().unwrap().clone();
    assert!(
        seen[0].contains("limit=2") && !seen[0].contains("page_info"),
        "{seen:?}"
    );
    assert!(
        seen[1].contains("page_info=p2") && !seen[1].contains("updated_at_min"),
        "{seen:?}"
    );
    assert!(!daemon.logs().contains("shpat_token"));
}

#[tokio::test]
async fn the_demo_connectors_idle_carts_are_abandoned_by_the_sweeper() {
    let config = crate::foundation::demo_connection("demo").replace(
        "poll_interval = \"1s\"",
        "poll_interval = \"1s\"\nabandon_after = \"1s\"",
    );
    let daemon = TestDaemon::start(&config).await;
    eventually("a demo cart abandoned", WAIT, || async {
        (count(&daemon,
            "SELECT count(*) FROM deals d JOIN stage_history h ON h.deal_id = d.id
             WHERE d.connection = 'demo' AND h.to_stage = 'cart_abandoned' AND h.cause = 'followup'",
        ) > 0)
            .then_some(())
    })
    .await;
}

pub(crate) const HUBSPOT_SECRET: &str = "hs-client-secret";
const PIPEDRIVE_AUTH: &str = "dealsync-hook:pd-hook-password";

/// (stage, status, contact email, contact name) of a deal, once it exists.
fn crm_deal(
    daemon: &TestDaemon,
    connection: &str,
    external_id: &str,
) -> Option<(String, String, Option<String>, Option<String>)> {
    db(daemon)
        .query_row(
            "SELECT stage, status, contact_email, contact_name FROM deals
             WHERE connection = ?1 AND external_id = ?2",
            [connection, external_id],
            |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?, row.get(3)?)),
        )
        .ok()
}

/// The cause of the deal's latest stage change.
fn last_cause(daemon: &TestDaemon, connection: &str, external_id: &str) -> String {
    db(daemon)
        .query_row(
            "SELECT h.cause FROM stage_history h JOIN deals d ON d.id = h.deal_id
             WHERE d.connection = ?1 AND d.external_id = ?2 ORDER BY h.id DESC LIMIT 1",
            [connection, external_id],
            |row| row.get(0),
        )
        .expect("a stage history row")
}

/// A HubSpot connection on the mock at `url`, polled hourly (so that after the first
/// sync only a webhook moves a deal), taking signed webhooks.
fn hubspot_hourly(url: &str) -> String {
    format!(
        r#"
[connections.hs]
connector = "hubspot"
base_url = "{url}"
token = "pat-test"
poll_interval = "1h"
webhook_secret = "{HUBSPOT_SECRET}"
"#
    )
}

pub(crate) fn hubspot_v3_headers(uri: &str, body: &[u8], at: SystemTime) -> http::HeaderMap {
    let delivery = Delivery {
        method: "POST",
        uri,
        body,
        id: "",
    };
    signature::sign(
        &Scheme::HubSpotV3 {
            tolerance: signature::DEFAULT_TOLERANCE,
        },
        HUBSPOT_SECRET.as_bytes(),
        &delivery,
        at,
    )
    .expect("signing")
}

#[tokio::test]
async fn hubspot_v3_signed_deal_webhooks_refetch_the_deal_and_a_deletion_marks_it_deleted() {
    use crate::harness::vendors::hubspot::{HsDeal, HubSpot};
    let hubspot = HubSpot::start("pat-test", None).await;
    hubspot.put_contact(501, "ada@acme.example", "Ada", "Lovelace");
    let mut deal = HsDeal::new(
        1002,
        "Acme expansion",
        "appointmentscheduled",
        chrono::Utc::now().timestamp_millis() - 3_600_000,
    );
    deal.contact = Some(501);
    hubspot.put(deal);
    // Polling once an hour: after the first sync, only a webhook can move the deal.
    let config = hubspot_hourly(&hubspot.url());
    let daemon = TestDaemon::start(&config).await;
    eventually("the first sync of deal 1002", WAIT, || async {
        crm_deal(&daemon, "hs", "1002").filter(|deal| deal.0 == "lead_qualification")
    })
    .await;

    // The deal moves in HubSpot; the propertyChange webhook (the fixture: two events for
    // deal 1002, ids only) makes dealsync fetch it at once.
    hubspot.update(1002, |deal| {
        deal.stage = "contractsent".into();
        deal.modified_ms = chrono::Utc::now().timestamp_millis();
    });
    let uri = daemon.url("/webhooks/hs");
    let body = serde_json::to_vec(&fixture("hubspot/webhook-deal-propertychange.json")).unwrap();

    // A stale signature (ten minutes old, the window is five) is refused first.
    let stale = SystemTime::now() - Duration::from_secs(600);
    let (status, text) = post(
        &daemon,
        "hs",
        hubspot_v3_headers(&uri, &body, stale),
        body.clone(),
    )
    .await;
    assert_eq!(status, 401, "{text}");
    // Signed for another URL: refused too.
    let elsewhere = hubspot_v3_headers("http://127.0.0.1:1/webhooks/hs", &body, SystemTime::now());
    let (status, _) = post(&daemon, "hs", elsewhere, body.clone()).await;
    assert_eq!(status, 401);
    assert_eq!(count(&daemon, "SELECT count(*) FROM webhook_inbox"), 0);

    let (status, text) = post(
        &daemon,
        "hs",
        hubspot_v3_headers(&uri, &body, SystemTime::now()),
        body.clone(),
    )
    .await;
    assert_eq!(status, 200, "{text}");
    let moved = eventually("deal 1002 in closing", WAIT, || async {
        crm_deal(&daemon, "hs", "1002").filter(|deal| deal.0 == "closing")
    })
    .await;
    assert_eq!(moved.2.as_deref(), Some("ada@acme.example"));
    assert_eq!(last_cause(&daemon, "hs", "1002"), "webhook");

    // HubSpot's retry of the same batch (attemptNumber 1) is the same delivery.
    let mut retry = fixture("hubspot/webhook-deal-propertychange.json");
    for event in retry.as_array_mut().unwrap() {
        event["attemptNumber"] = json!(1);
    }
    let retry = serde_json::to_vec(&retry).unwrap();
    let (status, text) = post(
        &daemon,
        "hs",
        hubspot_v3_headers(&uri, &retry, SystemTime::now()),
        retry,
    )
    .await;
    assert_eq!((status, text.contains("duplicate")), (200, true), "{text}");

    // The deal is deleted in HubSpot.
    let deletion = serde_json::to_vec(&json!([{
        "eventId": 3818135200u64, "subscriptionId": 2004819, "portalId": 62515, "appId": 54321,
        "occurredAt": chrono::Utc::now().timestamp_millis(), "subscriptionType": "deal.deletion",
        "attemptNumber": 0, "objectId": 1002, "changeFlag": "DELETED", "changeSource": "CRM_UI"
    }]))
    .unwrap();
    let (status, _) = post(
        &daemon,
        "hs",
        hubspot_v3_headers(&uri, &deletion, SystemTime::now()),
        deletion,
    )
    .await;
    assert_eq!(status, 200);
    eventually("deal 1002 deleted", WAIT, || async {
        crm_deal(&daemon, "hs", "1002").filter(|deal| deal.1 == "deleted")
    })
    .await;
    // The row is marked processed in the inbox file just after the deal commits.
    eventually("both deliveries processed", WAIT, || async {
        (count(
            &daemon,
            "SELECT count(*) FROM webhook_inbox WHERE state = 'processed'",
        ) == 2)
            .then_some(())
    })
    .await;
    assert!(!daemon.logs().contains(HUBSPOT_SECRET));
}

/// A HubSpot delivery that names deal `id` only (the worker fetches the deal).
fn hubspot_event(event_id: u64, id: u64) -> Vec<u8> {
    let mut events = fixture("hubspot/webhook-deal-propertychange.json");
    let mut event = events[0].take();
    event["eventId"] = json!(event_id);
    event["objectId"] = json!(id);
    serde_json::to_vec(&json!([event])).unwrap()
}

/// Events of one connection apply in the order received: while the fetch for the
/// first one fails and it waits for its retry, the later one (another deal, whose fetch
/// would succeed) waits too, in the same pass of the worker and in every later one.
#[tokio::test]
async fn a_later_webhook_of_a_connection_waits_while_an_earlier_one_is_retried() {
    use crate::harness::vendors::Fault;
    use crate::harness::vendors::hubspot::{HsDeal, HubSpot};
    let hubspot = HubSpot::start("pat-test", None).await;
    let an_hour_ago = chrono::Utc::now().timestamp_millis() - 3_600_000;
    hubspot.put(HsDeal::new(
        1002,
        "Acme expansion",
        "appointmentscheduled",
        an_hour_ago,
    ));
    hubspot.put(HsDeal::new(
        1003,
        "Globex pilot",
        "appointmentscheduled",
        an_hour_ago,
    ));
    let config = hubspot_hourly(&hubspot.url());
    let mut daemon = TestDaemon::start(&config).await;
    eventually("the first sync", WAIT, || async {
        (crm_deal(&daemon, "hs", "1002").is_some() && crm_deal(&daemon, "hs", "1003").is_some())
            .then_some(())
    })
    .await;

    // Two deliveries wait in the inbox while the daemon is stopped, so that the worker
    // sees both in its first pass: deal 1002's first, then deal 1003's.
    daemon.signal("TERM");
    daemon.wait_exit(Duration::from_secs(10)).await;
    {
        let db = db(&daemon);
        for (delivery, deal) in [("first", 1002), ("second", 1003)] {
            db.execute(
                "INSERT INTO webhook_inbox (connection, delivery_id, received_at)
                 VALUES ('hs', ?1, 0)",
                [delivery],
            )
            .unwrap();
            db.execute(
                "INSERT INTO webhook_bodies (id, headers, body) VALUES (?1, '[]', ?2)",
                rusqlite::params![db.last_insert_rowid(), hubspot_event(deal, deal)],
            )
            .unwrap();
        }
    }
    let now = chrono::Utc::now().timestamp_millis();
    for id in [1002, 1003] {
        hubspot.update(id, |deal| {
            deal.stage = "contractsent".into();
            deal.modified_ms = now;
        });
    }
    // Every fetch of deal 1002 fails until the schedule is lifted: a 429 asking for
    // more than the client waits inline, so each attempt of the row fails at once.
    let unavailable = Fault::Status(429, vec![("retry-after", "600".into())], "{}".into());
    hubspot
        .faults()
        .every("/crm/v3/objects/deals/1002", vec![(1, unavailable)]);
    daemon.start_again().await;

    let inbox_row = |delivery: &str| -> (String, i64, Option<i64>) {
        db(&daemon)
            .query_row(
                "SELECT state, attempts, processed_at FROM webhook_inbox WHERE delivery_id = ?1",
                [delivery],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .unwrap()
    };
    eventually("the first delivery to fail twice", WAIT, || async {
        (inbox_row("first").1 >= 2).then_some(())
    })
    .await;
    // (The start-up sync may have pulled both deals already: the inbox row and the
    // fetch it needs say whether the worker touched the later delivery.)
    assert_eq!(
        inbox_row("second"),
        ("pending".into(), 0, None),
        "the later delivery was handled before the earlier one"
    );
    assert_eq!(hubspot.faults().count("/crm/v3/objects/deals/1003"), 0);

    // The vendor answers again: both apply, the earlier one first.
    hubspot.faults().every("/crm/v3/objects/deals/1002", vec![]);
    eventually("both deliveries processed", WAIT, || async {
        (inbox_row("first").0 == "processed" && inbox_row("second").0 == "processed").then_some(())
    })
    .await;
    assert!(inbox_row("first").2 <= inbox_row("second").2);
    for id in ["1002", "1003"] {
        assert_eq!(
            crm_deal(&daemon, "hs", id).unwrap().0,
            "closing",
            "deal {id}"
        );
    }
}

/// A row whose fetch keeps failing waits longer before each retry (1 s doubling, equal
/// jitter: retry n waits between 2^(n-2) and 2^(n-1) seconds) and is kept as failed,
/// with the vendor's answer, once its last attempt fails.
#[tokio::test]
async fn a_webhook_whose_fetch_keeps_failing_backs_off_and_is_kept_as_failed_after_its_last_attempt()
 {
    use crate::harness::vendors::Fault;
    use crate::harness::vendors::hubspot::{HsDeal, HubSpot};
    use dealsync::webhooks::worker::MAX_ATTEMPTS;
    let hubspot = HubSpot::start("pat-test", None).await;
    let an_hour_ago = chrono::Utc::now().timestamp_millis() - 3_600_000;
    hubspot.put(HsDeal::new(
        1002,
        "Acme expansion",
        "appointmentscheduled",
        an_hour_ago,
    ));
    let config = hubspot_hourly(&hubspot.url());
    let mut daemon = TestDaemon::start(&config).await;
    eventually("the first sync", WAIT, || async {
        crm_deal(&daemon, "hs", "1002").map(|_| ())
    })
    .await;
    daemon.signal("TERM");
    daemon.wait_exit(Duration::from_secs(10)).await;
    // A delivery already tried three times.
    {
        let db = db(&daemon);
        db.execute(
            "INSERT INTO webhook_inbox (connection, delivery_id, received_at, attempts)
             VALUES ('hs', 'tired', 0, 3)",
            [],
        )
        .unwrap();
        db.execute(
            "INSERT INTO webhook_bodies (id, headers, body) VALUES (?1, '[]', ?2)",
            rusqlite::params![db.last_insert_rowid(), hubspot_event(77, 1002)],
        )
        .unwrap();
    }
    let unavailable = Fault::Status(500, vec![], "{}".into());
    hubspot
        .faults()
        .every("/crm/v3/objects/deals/1002", vec![(1, unavailable)]);
    let before_ms = chrono::Utc::now().timestamp_millis();
    daemon.start_again().await;
    let row = |daemon: &TestDaemon| -> (String, i64, Option<i64>, Option<String>) {
        db(daemon)
            .query_row(
                "SELECT state, attempts, next_attempt_at, last_error FROM webhook_inbox
                 WHERE delivery_id = 'tired'",
                [],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
            )
            .unwrap()
    };
    let (state, _, next_attempt_at, _) = eventually("the fourth attempt failed", WAIT, || async {
        Some(row(&daemon)).filter(|row| row.1 == 4)
    })
    .await;
    assert_eq!(state, "pending");
    // The fourth retry waits 4 to 8 s, counted from the failure.
    let next_attempt_at = next_attempt_at.expect("a retry time");
    assert!(
        next_attempt_at >= before_ms + 4_000,
        "next attempt {} ms after the restart began",
        next_attempt_at - before_ms
    );
    let logged = daemon
        .logs()
        .lines()
        .find(|line| line.contains("will retry") && line.contains("attempt=4"))
        .map(str::to_owned)
        .unwrap_or_else(|| panic!("no retry log line: {}", daemon.logs()));
    let waited: u64 = logged
        .split("retry_in_ms=")
        .nth(1)
        .and_then(|rest| rest.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{logged}"));
    assert!((4_000..=8_000).contains(&waited), "{logged}");

    // Its last attempt: it fails once more and stays failed, with the reason.
    daemon.signal("TERM");
    daemon.wait_exit(Duration::from_secs(10)).await;
    db(&daemon)
        .execute(
            "UPDATE webhook_inbox SET attempts = ?1, next_attempt_at = NULL WHERE delivery_id = 'tired'",
            [MAX_ATTEMPTS - 1],
        )
        .unwrap();
    daemon.start_again().await;
    let (state, attempts, next_attempt_at, error) =
        eventually("the last attempt failed", WAIT, || async {
            Some(row(&daemon)).filter(|row| row.0 != "pending")
        })
        .await;
    assert_eq!(
        (state.as_str(), attempts, next_attempt_at),
        ("failed", i64::from(MAX_ATTEMPTS), None)
    );
    assert!(
        error.unwrap_or_default().contains("500"),
        "the vendor's answer is kept"
    );
    assert!(daemon.logs().contains("webhook failed too often"));
}

/// A Pipedrive v2 webhook fixture for deal 12 with its own event id.
fn pipedrive_event(name: &str, event_id: &str) -> Vec<u8> {
    let mut body = fixture(&format!("pipedrive/{name}"));
    body["meta"]["id"] = json!(event_id);
    serde_json::to_vec(&body).unwrap()
}

fn pipedrive_headers(auth: &str) -> http::HeaderMap {
    let delivery = Delivery {
        method: "POST",
        uri: "",
        body: b"",
        id: "",
    };
    signature::sign(
        &Scheme::PipedriveBasic,
        auth.as_bytes(),
        &delivery,
        SystemTime::now(),
    )
    .expect("signing")
}

#[tokio::test]
async fn pipedrive_basic_auth_webhooks_move_the_deal_keep_the_pulled_contact_and_delete_it() {
    use crate::harness::vendors::pipedrive::{PdDeal, Pipedrive};
    let pipedrive = Pipedrive::start("pd-token").await;
    pipedrive.put_person(301, "Ada Lovelace", "ada@acme.example");
    let updated = chrono::DateTime::parse_from_rfc3339("2026-01-10T09:00:00Z")
        .unwrap()
        .with_timezone(&chrono::Utc);
    let mut deal = PdDeal::new(12, "Globex renewal", 1, updated);
    deal.person_id = Some(301);
    pipedrive.put(deal);
    let config = format!(
        r#"
[connections.pd]
connector = "pipedrive"
base_url = "{}"
token = "pd-token"
poll_interval = "1h"
webhook_secret = "{PIPEDRIVE_AUTH}"
"#,
        pipedrive.url()
    );
    let daemon = TestDaemon::start(&config).await;
    let pulled = eventually("the first sync of deal 12", WAIT, || async {
        crm_deal(&daemon, "pd", "12")
    })
    .await;
    assert_eq!(
        pulled,
        (
            "lead_qualification".into(),
            "open".into(),
            Some("ada@acme.example".into()),
            Some("Ada Lovelace".into())
        )
    );

    // Wrong credentials: 401, nothing stored, the deal untouched.
    let change = pipedrive_event("webhook-v2-deal-change.json", "pd-event-change");
    let (status, _) = post(
        &daemon,
        "pd",
        pipedrive_headers("dealsync-hook:wrong"),
        change.clone(),
    )
    .await;
    assert_eq!(status, 401);
    let mut unauthenticated = http::HeaderMap::new();
    unauthenticated.insert("x-unrelated", "1".parse().unwrap());
    let (status, _) = post(&daemon, "pd", unauthenticated, change.clone()).await;
    assert_eq!(status, 401);
    assert_eq!(count(&daemon, "SELECT count(*) FROM webhook_inbox"), 0);

    // The change event (stage 4, "Proposal Made") carries the person by id only, with no
    // email: the deal moves, and the contact the pull stored stays.
    let (status, text) = post(
        &daemon,
        "pd",
        pipedrive_headers(PIPEDRIVE_AUTH),
        change.clone(),
    )
    .await;
    assert_eq!(status, 200, "{text}");
    let moved = eventually("deal 12 in proposal", WAIT, || async {
        crm_deal(&daemon, "pd", "12").filter(|deal| deal.0 == "proposal")
    })
    .await;
    assert_eq!(
        (moved.2.as_deref(), moved.3.as_deref()),
        (Some("ada@acme.example"), Some("Ada Lovelace")),
        "a webhook must not erase the contact it does not carry"
    );
    assert_eq!(last_cause(&daemon, "pd", "12"), "webhook");

    // The same event again (Pipedrive retries on a timeout): acknowledged, not stored.
    let (status, text) = post(
        &daemon,
        "pd",
        pipedrive_headers(PIPEDRIVE_AUTH),
        change.clone(),
    )
    .await;
    assert_eq!((status, text.contains("duplicate")), (200, true), "{text}");
    // Pipedrive's retry counts its attempt in `meta.attempt`, so the retried body differs;
    // `meta.id` stays the same and makes it the same delivery.
    let mut retried: Value = serde_json::from_slice(&change).unwrap();
    retried["meta"]["attempt"] = json!(2);
    let retried = serde_json::to_vec(&retried).unwrap();
    let (status, text) = post(&daemon, "pd", pipedrive_headers(PIPEDRIVE_AUTH), retried).await;
    assert_eq!((status, text.contains("duplicate")), (200, true), "{text}");

    let deletion = pipedrive_event("webhook-v2-deal-delete.json", "pd-event-delete");
    let (status, _) = post(&daemon, "pd", pipedrive_headers(PIPEDRIVE_AUTH), deletion).await;
    assert_eq!(status, 200);
    let deleted = eventually("deal 12 deleted", WAIT, || async {
        crm_deal(&daemon, "pd", "12").filter(|deal| deal.1 == "deleted")
    })
    .await;
    assert_eq!(deleted.2.as_deref(), Some("ada@acme.example"));
    assert_eq!(count(&daemon, "SELECT count(*) FROM webhook_inbox"), 2);
    assert!(!daemon.logs().contains("pd-hook-password"));

    // The stored deliveries, read back from the inbox file: the headers are kept
    // (the content type is there) but the basic-auth credentials are not, in any form.
    use base64::Engine as _;
    let encoded = base64::engine::general_purpose::STANDARD.encode(PIPEDRIVE_AUTH);
    let inbox = daemon.inbox_read_only();
    let mut statement = inbox
        .prepare("SELECT headers, body FROM webhook_bodies ORDER BY id")
        .unwrap();
    let stored: Vec<(String, Vec<u8>)> = statement
        .query_map([], |row| Ok((row.get(0)?, row.get(1)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    assert_eq!(stored.len(), 2, "both deliveries are stored");
    for (headers, body) in &stored {
        let row = format!("{headers}\n{}", String::from_utf8_lossy(body)).to_lowercase();
        assert!(headers.contains("application/json"), "{headers}");
        for secret in [
            "authorization",
            "basic ",
            "pd-hook-password",
            &encoded.to_lowercase(),
        ] {
            assert!(!row.contains(secret), "{secret:?} stored in {headers}");
        }
    }
}
