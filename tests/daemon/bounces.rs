//! Bounces and complaints that arrive after the hand-off, end to end: the real daemon
//! sends over a real SMTP server with its per-message return path; delivery status
//! notifications built as real `multipart/report` messages (from the shared DSN
//! fixture's shape) come back through `POST /bounces` and `dealsync bounces ingest`;
//! then the follow-up worker sends nothing more to a suppressed address through any
//! connection.

use crate::followups::{config, header, messages_to, outbox_rows, put_cart, store};
use crate::harness::daemon::{TestDaemon, run_cli};
use crate::harness::eventually;
use crate::harness::smtp::{ReceivedMail, SmtpServer};
use chrono::Utc;
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(30);
const TOKEN: &str = "bounce-intake-token-0123456789";
const DSN_TEMPLATE: &str = include_str!("../fixtures/bounces/dsn-template.eml");

/// The cart rule at a pace that leaves time to return a bounce between the steps.
fn rule() -> String {
    r#"
[followups.carts]
kind = "marketing"
stage = "ecommerce.cart_abandoned"
expire_after = "1s"
steps = [
  { after = "100ms", template = "cart_reminder" },
  { after = "4s", template = "cart_reminder" },
  { after = "8s", template = "cart_discount", discount_code = "SAVE10" },
]
"#
    .to_owned()
}

fn deliverability(limit: u32) -> String {
    format!(
        r#"
[deliverability]
return_path = "bounces@shop.example"
intake_token = "{TOKEN}"
transient_bounce_limit = {limit}
transient_bounce_window = "1h"
"#
    )
}

/// A DSN for `mail` (as the SMTP server received it), reporting `status` for its
/// recipient, addressed to the envelope sender the daemon used.
fn dsn_for(mail: &ReceivedMail, status: &str, diagnostic: &str) -> Vec<u8> {
    let message_id = header(&mail.data, "Message-ID").expect("a Message-ID");
    let fields = [
        ("RETURN_PATH", mail.mail_from.as_str()),
        ("RECIPIENT", mail.rcpt_to[0].as_str()),
        ("ACTION", "failed"),
        ("STATUS", status),
        ("DIAGNOSTIC", diagnostic),
        ("MESSAGE_ID", message_id.as_str()),
    ];
    let mut text = DSN_TEMPLATE.to_owned();
    for (name, value) in fields {
        text = text.replace(&format!("${{{name}}}"), value);
    }
    text.into_bytes()
}

/// Waits until `address` has received `count` messages; the last one.
async fn nth_message(smtp: &SmtpServer, address: &str, count: usize) -> ReceivedMail {
    eventually(&format!("message {count} to {address}"), WAIT, || async {
        let messages = messages_to(smtp, address);
        (messages.len() >= count).then(|| messages[count - 1].clone())
    })
    .await
}

/// Waits until no row of the deal is pending or sending; (step, state, reason) of its emails.
async fn settled(daemon: &TestDaemon, deal_id: i64) -> Vec<(i64, String, Option<String>)> {
    let rows = eventually(&format!("deal {deal_id} to settle"), WAIT, || async {
        let rows = outbox_rows(daemon, deal_id);
        (!rows.is_empty()
            && rows
                .iter()
                .all(|(_, s, _)| s != "pending" && s != "sending"))
        .then_some(rows)
    })
    .await;
    // Steps 0 to 2 are the emails; the row after them expires the cart.
    rows.into_iter().filter(|(step, _, _)| *step < 3).collect()
}

fn outbox_id_of(daemon: &TestDaemon, deal_id: i64, step: i64) -> i64 {
    daemon
        .db()
        .query_row(
            "SELECT id FROM outbox WHERE deal_id = ?1 AND step = ?2",
            [deal_id, step],
            |r| r.get(0),
        )
        .unwrap()
}

async fn post_bounce(
    daemon: &TestDaemon,
    token: Option<&str>,
    body: Vec<u8>,
) -> (u16, serde_json::Value) {
    let mut request = daemon.http.post(daemon.url("/bounces")).body(body);
    if let Some(token) = token {
        request = request.bearer_auth(token);
    }
    let response = request.send().await.expect("POST /bounces");
    let status = response.status().as_u16();
    let body = response.text().await.unwrap_or_default();
    (
        status,
        serde_json::from_str(&body).unwrap_or(serde_json::Value::String(body)),
    )
}

async fn cli(daemon: &TestDaemon, args: &[&str]) -> (i32, String) {
    let mut all = vec!["--config", daemon.config_path.to_str().unwrap()];
    all.extend_from_slice(args);
    let (code, stdout, stderr) = run_cli(&all, &[]).await;
    (code, format!("{stdout}{stderr}"))
}

#[tokio::test]
async fn a_5_1_1_dsn_posted_by_the_relay_suppresses_the_address_for_every_connection() {
    let smtp = SmtpServer::start().await;
    let daemon = TestDaemon::start(&format!(
        "{}{}",
        config(&smtp, "", &rule()),
        deliverability(3)
    ))
    .await;
    let store = store(&daemon);
    let cart = put_cart(
        &store,
        "shop",
        "c1",
        "nobody@example.com",
        Some(true),
        "cart_abandoned",
        Utc::now(),
    )
    .await;
    let first = nth_message(&smtp, "nobody@example.com", 1).await;
    let row = outbox_id_of(&daemon, cart, 0);
    assert_eq!(
        first.mail_from,
        format!("bounces+{row}-nobody=example.com@shop.example"),
        "each follow-up has its own return path"
    );

    let dsn = dsn_for(
        &first,
        "5.1.1",
        "550 5.1.1 <nobody@example.com>: Recipient address rejected: User unknown",
    );
    assert_eq!(post_bounce(&daemon, None, dsn.clone()).await.0, 401);
    assert_eq!(
        post_bounce(&daemon, Some("wrong-token-wrong-token"), dsn.clone())
            .await
            .0,
        401
    );
    assert!(
        store
            .suppression("nobody@example.com".into())
            .await
            .unwrap()
            .is_none()
    );
    let (status, answer) = post_bounce(&daemon, Some(TOKEN), dsn.clone()).await;
    assert_eq!(status, 200, "{answer}");
    let event = &answer["events"][0];
    assert_eq!(event["class"], "permanent", "{answer}");
    assert_eq!(event["outbox_id"], row, "{answer}");
    assert_eq!(event["suppressed"], "hard bounce", "{answer}");
    // The relay retries the same report: acknowledged, nothing changes.
    let (status, again) = post_bounce(&daemon, Some(TOKEN), dsn).await;
    assert_eq!(
        (status, again["events"][0]["recorded"].clone()),
        (200, false.into())
    );

    let suppression = store
        .suppression("nobody@example.com".into())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(suppression.reason, "hard bounce");
    assert!(
        suppression
            .source
            .as_deref()
            .unwrap_or_default()
            .starts_with("dsn: 5.1.1"),
        "{suppression:?}"
    );

    // The rest of the sequence is skipped, and so is a cart of the same person from
    // another connection.
    let rows = settled(&daemon, cart).await;
    assert_eq!(rows[0].1, "sent", "{rows:?}");
    assert!(
        rows[1..].iter().all(|(_, state, reason)| state == "skipped"
            && reason.as_deref().unwrap_or_default().contains("suppressed")),
        "{rows:?}"
    );
    let other = put_cart(
        &store,
        "web",
        "w1",
        "Nobody@example.com",
        Some(true),
        "cart_abandoned",
        Utc::now(),
    )
    .await;
    let other_rows = settled(&daemon, other).await;
    assert!(
        other_rows.iter().all(|(_, state, _)| state == "skipped"),
        "{other_rows:?}"
    );
    assert_eq!(messages_to(&smtp, "nobody@example.com").len(), 1);

    // The operator sees why, with the report's source.
    let (code, shown) = cli(&daemon, &["suppressions", "show", "nobody@example.com"]).await;
    assert_eq!(code, 0, "{shown}");
    assert!(
        shown.contains("hard bounce")
            && shown.contains("dsn: 5.1.1")
            && shown.contains("permanent"),
        "{shown}"
    );
    let (code, deal) = cli(&daemon, &["deals", "show", &cart.to_string()]).await;
    assert_eq!(code, 0, "{deal}");
    assert!(
        deal.contains("Bounces and complaints") && deal.contains("suppressed: hard bounce"),
        "{deal}"
    );
}

#[tokio::test]
async fn ingested_4_2_2_bounces_suppress_only_at_the_limit_and_a_5_7_1_never() {
    let smtp = SmtpServer::start().await;
    let daemon = TestDaemon::start(&format!(
        "{}{}",
        config(&smtp, "", &rule()),
        deliverability(2)
    ))
    .await;
    let store = store(&daemon);
    let now = Utc::now();
    let full = put_cart(
        &store,
        "shop",
        "f1",
        "full@example.com",
        Some(true),
        "cart_abandoned",
        now,
    )
    .await;
    let blocked = put_cart(
        &store,
        "web",
        "b1",
        "blocked@example.com",
        Some(true),
        "cart_abandoned",
        now,
    )
    .await;
    let full_first = nth_message(&smtp, "full@example.com", 1).await;
    let blocked_first = nth_message(&smtp, "blocked@example.com", 1).await;

    // An mbox with both reports, as a relay's bounce mailbox keeps them.
    let mbox = daemon.dir.path().join("bounces.mbox");
    let mut text = Vec::new();
    for dsn in [
        dsn_for(&full_first, "4.2.2", "452 4.2.2 mailbox full"),
        dsn_for(
            &blocked_first,
            "5.7.1",
            "550 5.7.1 user unknown; refused for poor sender reputation",
        ),
    ] {
        text.extend_from_slice(b"From MAILER-DAEMON Mon Mar  2 10:16:04 2026\n");
        text.extend_from_slice(
            &String::from_utf8(dsn)
                .unwrap()
                .replace("\r\n", "\n")
                .into_bytes(),
        );
        text.extend_from_slice(b"\n");
    }
    std::fs::write(&mbox, text).unwrap();
    let (code, output) = cli(&daemon, &["bounces", "ingest", mbox.to_str().unwrap()]).await;
    assert_eq!(code, 0, "{output}");
    assert!(
        output.contains("transient") && output.contains("policy"),
        "{output}"
    );
    assert!(!output.contains("address suppressed"), "{output}");
    assert!(
        store
            .suppression("full@example.com".into())
            .await
            .unwrap()
            .is_none()
    );
    assert!(
        store
            .suppression("blocked@example.com".into())
            .await
            .unwrap()
            .is_none()
    );

    // Both still get their next email; a second mailbox-full report (in a Maildir)
    // reaches the limit of two.
    let full_second = nth_message(&smtp, "full@example.com", 2).await;
    let maildir = daemon.dir.path().join("Maildir");
    for sub in ["cur", "new", "tmp"] {
        std::fs::create_dir_all(maildir.join(sub)).unwrap();
    }
    std::fs::write(
        maildir.join("new").join("1772446566.M1P1.relay"),
        dsn_for(&full_second, "4.2.2", "452 4.2.2 mailbox full"),
    )
    .unwrap();
    let (code, output) = cli(&daemon, &["bounces", "ingest", maildir.to_str().unwrap()]).await;
    assert_eq!(code, 0, "{output}");
    assert!(
        output.contains("address suppressed (soft bounces)"),
        "{output}"
    );
    let suppression = store
        .suppression("full@example.com".into())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(suppression.reason, "soft bounces");

    // The third step goes to the blocked address (a policy refusal is the sender's
    // problem), not to the suppressed one.
    let full_rows = settled(&daemon, full).await;
    let blocked_rows = settled(&daemon, blocked).await;
    assert_eq!(full_rows[2].1, "skipped", "{full_rows:?}");
    assert!(
        blocked_rows.iter().all(|(_, state, _)| state == "sent"),
        "{blocked_rows:?}"
    );
    assert_eq!(messages_to(&smtp, "full@example.com").len(), 2);
    assert_eq!(messages_to(&smtp, "blocked@example.com").len(), 3);

    // A file that is not there is named; the exit code says so.
    let (code, output) = cli(&daemon, &["bounces", "ingest", "/nonexistent/bounces.mbox"]).await;
    assert_eq!(code, 1, "{output}");
    assert!(output.contains("/nonexistent/bounces.mbox"), "{output}");
}

const POSTMARK_AUTH: &str = "postmark-hook:pm-password-0123";
const MAILGUN_KEY: &str = "dealsync-test-mailgun-signing-key";

fn fixture(name: &str) -> serde_json::Value {
    let path = format!(
        "{}/tests/fixtures/bounces/{name}",
        env!("CARGO_MANIFEST_DIR")
    );
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// A P-256 key pair for the SendGrid connection: (PKCS#8 of the private key, the public
/// key as SendGrid's settings show it, base64 DER SubjectPublicKeyInfo).
fn sendgrid_keys() -> (Vec<u8>, String) {
    use base64::Engine as _;
    use ring::signature::{ECDSA_P256_SHA256_ASN1_SIGNING, EcdsaKeyPair, KeyPair};
    let rng = ring::rand::SystemRandom::new();
    let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, &rng).unwrap();
    let pair =
        EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, pkcs8.as_ref(), &rng).unwrap();
    // id-ecPublicKey, prime256v1, then the uncompressed point as a BIT STRING.
    let mut spki = vec![
        0x30, 0x59, 0x30, 0x13, 0x06, 0x07, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01, 0x06, 0x08,
        0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07, 0x03, 0x42, 0x00,
    ];
    spki.extend_from_slice(pair.public_key().as_ref());
    (
        pkcs8.as_ref().to_vec(),
        base64::engine::general_purpose::STANDARD.encode(spki),
    )
}

/// SendGrid's headers for `body`, signed with the PKCS#8 key as SendGrid does:
/// ECDSA P-256 / SHA-256 over timestamp + body, base64 DER.
fn sendgrid_headers(pkcs8: &[u8], body: &[u8]) -> Vec<(&'static str, String)> {
    use base64::Engine as _;
    use ring::signature::{ECDSA_P256_SHA256_ASN1_SIGNING, EcdsaKeyPair};
    let rng = ring::rand::SystemRandom::new();
    let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, pkcs8, &rng).unwrap();
    let timestamp = Utc::now().timestamp().to_string();
    let message = [timestamp.as_bytes(), body].concat();
    let signature = pair.sign(&rng, &message).unwrap();
    vec![
        ("x-twilio-email-event-webhook-timestamp", timestamp),
        (
            "x-twilio-email-event-webhook-signature",
            base64::engine::general_purpose::STANDARD.encode(signature.as_ref()),
        ),
    ]
}

async fn post_webhook(
    daemon: &TestDaemon,
    connection: &str,
    headers: &[(&str, String)],
    body: Vec<u8>,
) -> u16 {
    let mut request = daemon
        .http
        .post(daemon.url(&format!("/webhooks/{connection}")))
        .header("content-type", "application/json")
        .body(body);
    for (name, value) in headers {
        request = request.header(*name, value);
    }
    request.send().await.expect("POST").status().as_u16()
}

fn bare(message_id: &str) -> String {
    message_id
        .trim_start_matches('<')
        .trim_end_matches('>')
        .to_owned()
}

#[tokio::test]
async fn provider_webhooks_suppress_bounced_and_complaining_addresses_for_every_connection() {
    use base64::Engine as _;
    let smtp = SmtpServer::start().await;
    let (sendgrid_private, sendgrid_public) = sendgrid_keys();
    let connections = format!(
        r#"
[connections.pm]
connector = "postmark"
webhook_secret = "{POSTMARK_AUTH}"

[connections.mg]
connector = "mailgun"
webhook_secret = "{MAILGUN_KEY}"

[connections.sg]
connector = "sendgrid"
webhook_secret = "{sendgrid_public}"
"#
    );
    let daemon = TestDaemon::start(&format!(
        "{}{}{connections}",
        config(&smtp, "", &rule()),
        deliverability(3)
    ))
    .await;
    let store = store(&daemon);
    let now = Utc::now();
    let postmark_cart = put_cart(
        &store,
        "shop",
        "p1",
        "pm-gone@example.com",
        Some(true),
        "cart_abandoned",
        now,
    )
    .await;
    let mailgun_cart = put_cart(
        &store,
        "shop",
        "m1",
        "mg-gone@example.com",
        Some(true),
        "cart_abandoned",
        now,
    )
    .await;
    let complaint_cart = put_cart(
        &store,
        "shop",
        "s1",
        "jane@example.com",
        Some(true),
        "cart_abandoned",
        now,
    )
    .await;
    let postmark_first = nth_message(&smtp, "pm-gone@example.com", 1).await;
    let mailgun_first = nth_message(&smtp, "mg-gone@example.com", 1).await;
    let jane_first = nth_message(&smtp, "jane@example.com", 1).await;

    // Postmark: the webhook URL's basic auth.
    let mut postmark = fixture("postmark-bounce-webhook.json");
    postmark["Email"] = "pm-gone@example.com".into();
    // Postmark copies the X-PM-Metadata-* headers of the message it relayed into the
    // webhook's Metadata: the outbox row, as the daemon named it in the email.
    let relayed = header(&postmark_first.data, "X-PM-Metadata-outbox_id")
        .expect("the follow-up names its outbox row for Postmark");
    assert_eq!(relayed, outbox_id_of(&daemon, postmark_cart, 0).to_string());
    postmark["Metadata"]["outbox_id"] = relayed.into();
    let postmark = serde_json::to_vec(&postmark).unwrap();
    let basic = |credentials: &str| {
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(credentials)
        )
    };
    assert_eq!(
        post_webhook(
            &daemon,
            "pm",
            &[("authorization", basic("postmark-hook:wrong"))],
            postmark.clone()
        )
        .await,
        401
    );
    assert_eq!(
        post_webhook(
            &daemon,
            "pm",
            &[("authorization", basic(POSTMARK_AUTH))],
            postmark
        )
        .await,
        200
    );

    // Mailgun: the signature in the body, over a fresh timestamp and token.
    let mut mailgun = fixture("mailgun-failed-permanent-webhook.json");
    let timestamp = Utc::now().timestamp().to_string();
    let token = format!(
        "{:050}",
        Utc::now().timestamp_nanos_opt().unwrap_or_default()
    );
    mailgun["signature"] = serde_json::json!({
        "timestamp": timestamp,
        "token": token,
        "signature": dealsync::connectors::signature::mailgun_signature(MAILGUN_KEY.as_bytes(), &timestamp, &token),
    });
    mailgun["event-data"]["recipient"] = "mg-gone@example.com".into();
    mailgun["event-data"]["message"]["headers"]["message-id"] =
        bare(&header(&mailgun_first.data, "Message-ID").unwrap()).into();
    mailgun["event-data"]["user-variables"] = serde_json::json!({});
    assert_eq!(
        post_webhook(&daemon, "mg", &[], serde_json::to_vec(&mailgun).unwrap()).await,
        200
    );

    // SendGrid: a spam report for jane, tied to her email by its Message-ID.
    let mut batch = fixture("sendgrid-events-bounce-batch.json");
    batch[1]["smtp-id"] = header(&jane_first.data, "Message-ID").unwrap().into();
    let batch = serde_json::to_vec(&batch).unwrap();
    let headers = sendgrid_headers(&sendgrid_private, &batch);
    let mut tampered = batch.clone();
    tampered.extend_from_slice(b" ");
    assert_eq!(post_webhook(&daemon, "sg", &headers, tampered).await, 401);
    assert_eq!(post_webhook(&daemon, "sg", &headers, batch).await, 200);

    for (email, reason) in [
        ("pm-gone@example.com", "hard bounce"),
        ("mg-gone@example.com", "hard bounce"),
        ("jane@example.com", "complaint"),
        // The batch's bounce for the fixture's address.
        ("nobody@example.com", "hard bounce"),
    ] {
        let suppression = eventually(&format!("{email} suppressed"), WAIT, || async {
            store.suppression(email.into()).await.unwrap()
        })
        .await;
        assert_eq!(suppression.reason, reason, "{email}: {suppression:?}");
    }
    // Each event is recorded against the email it answers.
    let events = store
        .delivery_events_for_email("mg-gone@example.com".into())
        .await
        .unwrap();
    assert_eq!(
        events[0].outbox_id,
        Some(outbox_id_of(&daemon, mailgun_cart, 0))
    );
    assert_eq!(events[0].source, "mg");
    let events = store
        .delivery_events_for_email("jane@example.com".into())
        .await
        .unwrap();
    assert_eq!(
        (events[0].class.as_str(), events[0].outbox_id),
        ("complaint", Some(outbox_id_of(&daemon, complaint_cart, 0)))
    );
    // The complaint stopped jane's pending marketing at once, before it came due.
    let jane = outbox_rows(&daemon, complaint_cart);
    assert!(
        jane[1..3]
            .iter()
            .all(|(_, state, reason)| state == "skipped"
                && reason.as_deref().unwrap_or_default().contains("complained")),
        "{jane:?}"
    );

    // Nothing more goes to any of them, through any connection.
    let other = put_cart(
        &store,
        "web",
        "w1",
        "pm-gone@example.com",
        Some(true),
        "cart_abandoned",
        Utc::now(),
    )
    .await;
    for cart in [postmark_cart, mailgun_cart, complaint_cart, other] {
        settled(&daemon, cart).await;
    }
    for email in [
        "pm-gone@example.com",
        "mg-gone@example.com",
        "jane@example.com",
    ] {
        assert_eq!(messages_to(&smtp, email).len(), 1, "{email}");
    }
}

const ARF_TEMPLATE: &str = include_str!("../fixtures/bounces/arf-template.eml");

/// A complaint feedback report (ARF) about `mail`, as a mailbox provider sends it back.
fn complaint_for(mail: &ReceivedMail) -> Vec<u8> {
    let message_id = header(&mail.data, "Message-ID").expect("a Message-ID");
    ARF_TEMPLATE
        .replace("${RETURN_PATH}", &mail.mail_from)
        .replace("${RECIPIENT}", &mail.rcpt_to[0])
        .replace("${MESSAGE_ID}", &message_id)
        .into_bytes()
}

#[tokio::test]
async fn a_complaint_rate_past_the_threshold_pauses_the_marketing_rule_until_an_operator_resumes_it()
 {
    let smtp = SmtpServer::start().await;
    let pause = "complaint_rate_pause = \"10%\"\ncomplaint_pause_min_sent = 2\n";
    let daemon = TestDaemon::start(&format!(
        "{}{}{pause}",
        config(&smtp, "", &rule()),
        deliverability(3)
    ))
    .await;
    let store = store(&daemon);
    let now = Utc::now();
    let complainer = put_cart(
        &store,
        "shop",
        "a1",
        "ann@example.com",
        Some(true),
        "cart_abandoned",
        now,
    )
    .await;
    let other = put_cart(
        &store,
        "shop",
        "b1",
        "bea@example.com",
        Some(true),
        "cart_abandoned",
        now,
    )
    .await;
    let third = put_cart(
        &store,
        "web",
        "c1",
        "cy@example.com",
        Some(true),
        "cart_abandoned",
        now,
    )
    .await;
    let ann_first = nth_message(&smtp, "ann@example.com", 1).await;
    nth_message(&smtp, "bea@example.com", 1).await;
    nth_message(&smtp, "cy@example.com", 1).await;

    // One complaint of three emails sent: 33 %, past the 10 % threshold.
    let (status, answer) = post_bounce(&daemon, Some(TOKEN), complaint_for(&ann_first)).await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["events"][0]["class"], "complaint", "{answer}");
    assert_eq!(answer["events"][0]["paused"], "carts", "{answer}");
    assert_eq!(answer["events"][0]["suppressed"], "complaint", "{answer}");

    // Visible on /readyz (the daemon stays ready) and in /metrics.
    let (code, body) = daemon.get("/readyz").await;
    assert_eq!(code, 200, "{body}");
    let ready: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(ready["paused_rules"][0]["rule"], "carts", "{body}");
    let (_, metrics) = daemon.get("/metrics").await;
    for line in [
        "dealsync_followup_rule_paused{rule=\"carts\",state=\"paused\"} 1",
        "dealsync_deliverability_emails{rule=\"carts\",window=\"7d\",outcome=\"sent\"} 3",
        "dealsync_deliverability_emails{rule=\"carts\",window=\"1d\",outcome=\"complained\"} 1",
        "dealsync_deliverability_complaint_rate{rule=\"all\",window=\"1d\"} 0.333",
    ] {
        assert!(metrics.contains(line), "{line} not in:\n{metrics}");
    }

    // The other shoppers' next steps wait while the rule is paused.
    let waiting = eventually(
        "bea's second step to wait for the paused rule",
        WAIT,
        || async {
            let rows = outbox_rows(&daemon, other);
            let (_, state, reason) = rows[1].clone();
            (state == "pending"
                && reason
                    .as_deref()
                    .unwrap_or_default()
                    .contains("rule paused"))
            .then_some(reason)
        },
    )
    .await;
    assert!(
        waiting
            .unwrap_or_default()
            .contains("dealsync deliverability resume carts")
    );
    assert_eq!(messages_to(&smtp, "bea@example.com").len(), 1);

    let (code, shown) = cli(&daemon, &["deliverability", "show"]).await;
    assert_eq!(code, 0, "{shown}");
    let (code, report) = cli(&daemon, &["report"]).await;
    assert_eq!(code, 0, "{report}");
    assert!(
        report.contains("Deliverability") && report.contains("33.33 %"),
        "{report}"
    );
    let (code, json) = cli(&daemon, &["report", "--format", "json"]).await;
    assert_eq!(code, 0, "{json}");
    let json: serde_json::Value = serde_json::from_str(&json).expect("JSON");
    let carts_7d = json["deliverability"]
        .as_array()
        .and_then(|lines| {
            lines
                .iter()
                .find(|line| line["rule"] == "carts" && line["window"] == "7d")
        })
        .cloned()
        .unwrap_or_default();
    assert_eq!(
        (carts_7d["sent"].clone(), carts_7d["complained"].clone()),
        (3.into(), 1.into()),
        "{json}"
    );
    assert!(
        shown.contains("33.33 %")
            && shown.contains("Paused rules")
            && shown.contains("carts since"),
        "{shown}"
    );

    // Only the operator resumes it; then the waiting steps go out, never to the
    // complainer.
    let (code, resumed) = cli(&daemon, &["deliverability", "resume", "carts"]).await;
    assert_eq!(code, 0, "{resumed}");
    nth_message(&smtp, "bea@example.com", 2).await;
    nth_message(&smtp, "cy@example.com", 2).await;
    let (code, again) = cli(&daemon, &["deliverability", "resume", "carts"]).await;
    assert_eq!(code, 2, "{again}");
    let ann = settled(&daemon, complainer).await;
    assert!(
        ann[1..].iter().all(|(_, state, _)| state == "skipped"),
        "{ann:?}"
    );
    settled(&daemon, third).await;
    assert_eq!(messages_to(&smtp, "ann@example.com").len(), 1);
}

const SNS_TOPIC: &str = "arn:aws:sns:eu-west-1:123456789012:ses-bounces";

/// An SNS envelope of `kind` carrying `fields`, signed as SNS signs (SignatureVersion 2:
/// RSA PKCS#1 v1.5 with SHA-256 over the canonical string) with the test key whose
/// certificate is at `cert_url`.
fn sns_envelope(kind: &str, fields: &[(&str, String)], cert_url: &str) -> Vec<u8> {
    use base64::Engine as _;
    let mut envelope = serde_json::json!({
        "Type": kind,
        "MessageId": format!("{:x}", Utc::now().timestamp_nanos_opt().unwrap_or_default()),
        "TopicArn": SNS_TOPIC,
        "Timestamp": Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
        "SignatureVersion": "2",
        "SigningCertURL": cert_url,
    });
    for (key, value) in fields {
        envelope[*key] = value.clone().into();
    }
    // The fields the signature covers, read back as the daemon reads them.
    let mut unsigned = envelope.clone();
    unsigned["Signature"] = "".into();
    let parsed = dealsync::connectors::signature::SnsEnvelope::parse(
        &serde_json::to_vec(&unsigned).unwrap(),
    )
    .expect("an SNS envelope");
    let pem = include_str!("../fixtures/bounces/sns-test-key.pem");
    let der: String = pem
        .lines()
        .filter(|line| !line.starts_with("-----"))
        .collect();
    let pkcs8 = base64::engine::general_purpose::STANDARD
        .decode(der)
        .unwrap();
    let key = ring::signature::RsaKeyPair::from_pkcs8(&pkcs8).unwrap();
    let message = parsed.string_to_sign().expect("a signable envelope");
    let mut signature = vec![0; key.public().modulus_len()];
    key.sign(
        &ring::signature::RSA_PKCS1_SHA256,
        &ring::rand::SystemRandom::new(),
        message.as_bytes(),
        &mut signature,
    )
    .unwrap();
    envelope["Signature"] = base64::engine::general_purpose::STANDARD
        .encode(signature)
        .into();
    serde_json::to_vec(&envelope).unwrap()
}

#[tokio::test]
async fn an_ses_bounce_through_sns_is_verified_with_the_certificate_from_an_allowed_host() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    let fetched = Arc::new(AtomicUsize::new(0));
    let confirmed = Arc::new(AtomicUsize::new(0));
    let (cert_hits, confirm_hits) = (fetched.clone(), confirmed.clone());
    let router = axum::Router::new()
        .route(
            "/SimpleNotificationService-test.pem",
            axum::routing::get(move || {
                cert_hits.fetch_add(1, Ordering::SeqCst);
                async { include_str!("../fixtures/bounces/sns-test-cert.pem") }
            }),
        )
        .route(
            "/confirm",
            axum::routing::get(move || {
                confirm_hits.fetch_add(1, Ordering::SeqCst);
                async { "<ConfirmSubscriptionResponse/>" }
            }),
        );
    let sns = crate::harness::vendors::serve(router).await;
    let cert_url = format!("{}/SimpleNotificationService-test.pem", sns.url());
    let smtp = SmtpServer::start().await;
    let connection = format!(
        "\n[connections.ses]\nconnector = \"ses\"\nwebhook_secret = \"{SNS_TOPIC}\"\n[connections.ses.settings]\nsigning_cert_hosts = [\"{}\"]\n",
        sns.addr
    );
    let daemon = TestDaemon::start(&format!(
        "{}{}{connection}",
        config(&smtp, "", &rule()),
        deliverability(3)
    ))
    .await;
    let store = store(&daemon);

    // The subscription is confirmed by GETting its SubscribeURL.
    let confirmation = sns_envelope(
        "SubscriptionConfirmation",
        &[
            (
                "Message",
                "You have chosen to subscribe to the topic".to_owned(),
            ),
            ("Token", "2336412f37fb687f5d51e6e2425".to_owned()),
            (
                "SubscribeURL",
                format!("{}/confirm?Token=2336412f37fb687f5d51e6e2425", sns.url()),
            ),
        ],
        &cert_url,
    );
    assert_eq!(post_webhook(&daemon, "ses", &[], confirmation).await, 200);
    eventually("the subscription confirmed", WAIT, || async {
        (confirmed.load(Ordering::SeqCst) == 1).then_some(())
    })
    .await;

    let cart = put_cart(
        &store,
        "shop",
        "e1",
        "ses-gone@example.com",
        Some(true),
        "cart_abandoned",
        Utc::now(),
    )
    .await;
    let first = nth_message(&smtp, "ses-gone@example.com", 1).await;
    let mut notification = fixture("ses-bounce-permanent.json");
    notification["bounce"]["bouncedRecipients"][0]["emailAddress"] = "ses-gone@example.com".into();
    notification["mail"]["commonHeaders"]["messageId"] =
        header(&first.data, "Message-ID").unwrap().into();
    let message = serde_json::to_string(&notification).unwrap();
    let bounce = sns_envelope("Notification", &[("Message", message.clone())], &cert_url);

    // A certificate from any other host is never fetched; a tampered message fails.
    let elsewhere = sns_envelope(
        "Notification",
        &[("Message", message.clone())],
        "https://sns.eu-west-1.amazonaws.com.evil.example/cert.pem",
    );
    assert_eq!(post_webhook(&daemon, "ses", &[], elsewhere).await, 401);
    let mut tampered: serde_json::Value = serde_json::from_slice(&bounce).unwrap();
    tampered["Message"] = message.replace("Permanent", "Transient").into();
    assert_eq!(
        post_webhook(&daemon, "ses", &[], serde_json::to_vec(&tampered).unwrap()).await,
        401
    );
    let mut other_topic: serde_json::Value = serde_json::from_slice(&bounce).unwrap();
    other_topic["TopicArn"] = "arn:aws:sns:eu-west-1:999999999999:other".into();
    assert_eq!(
        post_webhook(
            &daemon,
            "ses",
            &[],
            serde_json::to_vec(&other_topic).unwrap()
        )
        .await,
        401
    );
    assert!(
        store
            .suppression("ses-gone@example.com".into())
            .await
            .unwrap()
            .is_none()
    );

    assert_eq!(post_webhook(&daemon, "ses", &[], bounce).await, 200);
    let suppression = eventually("the SES bounce to suppress", WAIT, || async {
        store
            .suppression("ses-gone@example.com".into())
            .await
            .unwrap()
    })
    .await;
    assert_eq!(suppression.reason, "hard bounce");
    let events = store
        .delivery_events_for_email("ses-gone@example.com".into())
        .await
        .unwrap();
    assert_eq!(events[0].outbox_id, Some(outbox_id_of(&daemon, cart, 0)));
    // The certificate was fetched once and kept.
    assert_eq!(fetched.load(Ordering::SeqCst), 1);
    let rows = settled(&daemon, cart).await;
    assert!(
        rows[1..].iter().all(|(_, state, _)| state == "skipped"),
        "{rows:?}"
    );
    assert_eq!(messages_to(&smtp, "ses-gone@example.com").len(), 1);
}
