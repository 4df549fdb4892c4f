//! Follow-ups end to end: the real daemon, a real SMTP server process, deals written
//! into the daemon's SQLite file through the library's `Store`.

use crate::harness::daemon::{TestDaemon, run_cli};
use crate::harness::eventually;
use crate::harness::smtp::{ReceivedMail, SmtpServer};
use chrono::{DateTime, Utc};
use dealsync::domain::{
    ChangeCause, ConnectionName, Currency, DealStatus, EmailAddress, LineItem, Money, PipelineKey,
    SourceDeal, StageKey, StageRef,
};
use dealsync::store::{DealUpsert, Store};
use std::collections::HashMap;
use std::time::Duration;

pub(crate) const TEMPLATES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/config/templates");
const WAIT: Duration = Duration::from_secs(30);

/// `[email]` pointing at `smtp`, plus extra lines, plus the rules.
/// `email_extra` may set `retry_initial` and `retry_max` (both, or neither: 200 ms to
/// 1 s).
pub(crate) fn config(smtp: &SmtpServer, email_extra: &str, rules: &str) -> String {
    let retries = if email_extra.contains("retry_initial") {
        ""
    } else {
        "retry_initial = \"200ms\"\nretry_max = \"1s\""
    };
    format!(
        r#"
[email]
transport = "smtp"
url = "{url}"
from = "Test Shop <shop@example.com>"
templates = "{TEMPLATES}"
unsubscribe_secret = "test-unsubscribe-secret-0123"
enroll_interval = "100ms"
{retries}
{email_extra}

{rules}
"#,
        url = smtp.url()
    )
}

/// A three-step cart sequence on `ecommerce.cart_abandoned`, at test pace.
pub(crate) fn cart_rule(first: &str, second: &str, third: &str) -> String {
    format!(
        r#"
[followups.carts]
kind = "marketing"
stage = "ecommerce.cart_abandoned"
expire_after = "1s"
steps = [
  {{ after = "{first}", template = "cart_reminder" }},
  {{ after = "{second}", template = "cart_reminder" }},
  {{ after = "{third}", template = "cart_discount", discount_code = "SAVE10" }},
]
"#
    )
}

fn ecommerce(stage: &str) -> StageRef {
    StageRef {
        pipeline: Some(PipelineKey::new("ecommerce")),
        stage: StageKey::new(stage),
    }
}

/// Deal `dN` of connection `crm`, polled into `sales.proposal` at `now`.
pub(crate) fn in_proposal(n: usize, now: DateTime<Utc>) -> DealUpsert {
    let mut source = SourceDeal::new(format!("d{n}"), format!("Deal {n}"), "p", "s");
    source.stage_changed_at = Some(now);
    source.updated_at = Some(now);
    DealUpsert {
        connection: ConnectionName::new("crm"),
        source,
        target: StageRef {
            pipeline: Some(PipelineKey::new("sales")),
            stage: StageKey::new("proposal"),
        },
        status: DealStatus::Open,
        observed_at: now,
        cause: ChangeCause::Poll,
    }
}

pub(crate) fn store(daemon: &TestDaemon) -> Store {
    Store::open(&daemon.db_path).expect("opening the daemon's database")
}

/// Writes a cart (or an order) as a webhook would, entered into `stage` at `at`.
pub(crate) async fn put_cart(
    store: &Store,
    connection: &str,
    id: &str,
    email: &str,
    consent: Option<bool>,
    stage: &str,
    at: DateTime<Utc>,
) -> i64 {
    put_cart_with_raw(
        store,
        connection,
        id,
        email,
        consent,
        stage,
        at,
        serde_json::Value::Null,
    )
    .await
}

/// `put_cart` with the source's record as the webhook delivered it.
#[allow(clippy::too_many_arguments)]
async fn put_cart_with_raw(
    store: &Store,
    connection: &str,
    id: &str,
    email: &str,
    consent: Option<bool>,
    stage: &str,
    at: DateTime<Utc>,
    raw: serde_json::Value,
) -> i64 {
    let mut source = SourceDeal::new(id, format!("Cart {id}"), "checkouts", stage);
    source.raw = dealsync::domain::RawRecord::from_value(&raw);
    source.contact_email = EmailAddress::parse(email);
    source.contact_name = Some("Ada Lovelace".into());
    put_cart_source(store, connection, source, consent, stage, at).await
}

/// Writes `source` (its id, contact and raw record set) as a cart in `stage`.
async fn put_cart_source(
    store: &Store,
    connection: &str,
    mut source: SourceDeal,
    consent: Option<bool>,
    stage: &str,
    at: DateTime<Utc>,
) -> i64 {
    let id = source.external_id.to_string();
    source.amount = Some(Money::new(30_700, Currency::parse("EUR").unwrap()));
    source.marketing_consent = consent;
    source.created_at = Some(at);
    source.updated_at = Some(at);
    source.stage_changed_at = Some(at);
    source.recovery_url = Some(format!("https://shop.example.com/cart/{id}/recover"));
    source.line_items = vec![LineItem {
        title: "Espresso grinder".into(),
        quantity: 1,
        unit_price_minor: Some(24_900),
        sku: None,
    }];
    let status = if stage == "purchase_completed" {
        DealStatus::Won
    } else {
        DealStatus::Open
    };
    store
        .upsert_deals(vec![DealUpsert {
            connection: ConnectionName::new(connection),
            source,
            target: ecommerce(stage),
            status,
            observed_at: at,
            cause: ChangeCause::Webhook,
        }])
        .await
        .expect("upserting a cart");
    store
        .deal_by_external_id(connection, &id)
        .await
        .unwrap()
        .expect("the cart just written")
        .id
}

/// The value of a header in a raw message, unfolded.
pub(crate) fn header(data: &str, name: &str) -> Option<String> {
    let head = data.split("\r\n\r\n").next().unwrap_or(data);
    let head = head.replace("\r\n ", " ").replace("\r\n\t", " ");
    let head = head.replace("\n ", " ");
    head.lines().find_map(|line| {
        let (key, value) = line.split_once(':')?;
        key.eq_ignore_ascii_case(name)
            .then(|| value.trim().to_owned())
    })
}

fn to(mail: &ReceivedMail, address: &str) -> bool {
    mail.rcpt_to.iter().any(|r| r == address)
}

pub(crate) fn messages_to(smtp: &SmtpServer, address: &str) -> Vec<ReceivedMail> {
    smtp.messages()
        .into_iter()
        .filter(|m| to(m, address))
        .collect()
}

/// Rows of the daemon's outbox for a deal: (step, state, reason).
pub(crate) fn outbox_rows(daemon: &TestDaemon, deal_id: i64) -> Vec<(i64, String, Option<String>)> {
    let db = daemon.db();
    let mut statement = db
        .prepare("SELECT step, state, reason FROM outbox WHERE deal_id = ?1 ORDER BY step")
        .unwrap();
    statement
        .query_map([deal_id], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .unwrap()
        .collect::<Result<Vec<_>, _>>()
        .unwrap()
}

fn stage_of(daemon: &TestDaemon, deal_id: i64) -> String {
    daemon
        .db()
        .query_row("SELECT stage FROM deals WHERE id = ?1", [deal_id], |r| {
            r.get(0)
        })
        .unwrap()
}

/// Waits until no row of the deal is pending or sending.
async fn settled(daemon: &TestDaemon, deal_id: i64) -> Vec<(i64, String, Option<String>)> {
    eventually(
        &format!("deal {deal_id}'s outbox to settle"),
        WAIT,
        || async {
            let rows = outbox_rows(daemon, deal_id);
            (!rows.is_empty()
                && rows
                    .iter()
                    .all(|(_, s, _)| s != "pending" && s != "sending"))
            .then_some(rows)
        },
    )
    .await
}

#[tokio::test]
async fn a_cart_sequence_arrives_over_smtp_with_both_parts_and_every_header_then_the_cart_expires()
{
    let smtp = SmtpServer::start().await;
    let daemon =
        TestDaemon::start(&config(&smtp, "", &cart_rule("200ms", "700ms", "1200ms"))).await;
    let store = store(&daemon);
    let cart = put_cart(
        &store,
        "shop",
        "c1",
        "ada@example.com",
        Some(true),
        "cart_abandoned",
        Utc::now(),
    )
    .await;

    let mails = eventually("three cart emails", WAIT, || async {
        let mails = messages_to(&smtp, "ada@example.com");
        (mails.len() >= 3).then_some(mails)
    })
    .await;
    let rows = settled(&daemon, cart).await;

    assert_eq!(mails.len(), 3, "exactly three emails");
    let subjects: Vec<_> = mails
        .iter()
        .map(|m| header(&m.data, "Subject").unwrap())
        .collect();
    assert_eq!(subjects[0], "You left something in your cart");
    assert_eq!(subjects[1], "Still thinking it over, Ada Lovelace?");
    assert_eq!(subjects[2], "SAVE10: a discount for the cart you left");
    for (step, mail) in mails.iter().enumerate() {
        assert_eq!(mail.mail_from, "shop@example.com");
        let data = &mail.data;
        assert!(
            header(data, "Content-Type")
                .unwrap()
                .starts_with("multipart/alternative")
        );
        assert!(data.contains("Content-Type: text/plain"), "{data}");
        assert!(data.contains("Content-Type: text/html"), "{data}");
        assert_eq!(
            header(data, "X-Dealsync-Idempotency-Key").unwrap(),
            format!("{cart}-carts-{}", step + 1),
            "steps count from 1 in the idempotency key"
        );
        assert_eq!(
            header(data, "Message-ID").unwrap(),
            format!("<{cart}-carts-{}.dealsync@example.com>", step + 1)
        );
        let unsubscribe = header(data, "List-Unsubscribe").unwrap();
        assert!(
            unsubscribe.starts_with("<mailto:shop@example.com?"),
            "{unsubscribe}"
        );
        assert!(
            unsubscribe.contains(&daemon.url("/unsubscribe/")),
            "{unsubscribe}"
        );
        assert_eq!(
            header(data, "List-Unsubscribe-Post").unwrap(),
            "List-Unsubscribe=One-Click"
        );
    }
    assert!(mails[2].data.contains("SAVE10"));
    let states: Vec<_> = rows.iter().map(|(_, s, _)| s.as_str()).collect();
    assert_eq!(states, ["sent", "sent", "sent", "done"], "{rows:?}");
    assert_eq!(stage_of(&daemon, cart), "expired");
    let history = store.history(cart).await.unwrap();
    let path: Vec<_> = history.iter().map(|h| h.to_stage.as_str()).collect();
    assert_eq!(
        path,
        [
            "cart_abandoned",
            "follow_up_email",
            "discount_offer",
            "expired"
        ]
    );
    assert!(
        history[1..]
            .iter()
            .all(|h| h.cause == ChangeCause::Followup)
    );
    let (_, metrics) = daemon.get("/metrics").await;
    assert!(
        metrics.contains("dealsync_followups_total{rule=\"carts\",outcome=\"sent\"} 3"),
        "{metrics}"
    );
}

/// An abandoned cart of `email` whose shopper is called `name`, entered now.
async fn put_named_cart(store: &Store, id: &str, email: &str, name: &str) -> i64 {
    let mut source = SourceDeal::new(id, format!("Cart {id}"), "checkouts", "cart_abandoned");
    source.contact_email = EmailAddress::parse(email);
    source.contact_name = Some(name.into());
    put_cart_source(
        store,
        "shop",
        source,
        Some(true),
        "cart_abandoned",
        Utc::now(),
    )
    .await
}

/// The display name and address of a `To` header value, the name unquoted and its
/// RFC 2047 encoded words (`=?utf-8?b?…?=`, as lettre writes names with `:` or `@`)
/// decoded.
fn to_mailbox(value: &str) -> (String, String) {
    use base64::Engine as _;
    let (name, address) = value.rsplit_once(" <").unwrap_or(("", value));
    let address = address.trim_end_matches('>').to_owned();
    let words: Vec<&str> = name.split_whitespace().collect();
    let decode = |word: &str| -> Option<String> {
        let lower = word.to_ascii_lowercase();
        let encoded = lower.strip_prefix("=?utf-8?b?")?.strip_suffix("?=")?;
        // The base64 text is case-sensitive: take it from the original word.
        let start = word.len() - encoded.len() - 2;
        let text = word.get(start..word.len() - 2)?;
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(text)
            .ok()?;
        String::from_utf8(bytes).ok()
    };
    let name = if !words.is_empty() && words.iter().all(|w| decode(w).is_some()) {
        words.iter().filter_map(|w| decode(w)).collect()
    } else {
        name.trim_matches('"').to_owned()
    };
    (name, address)
}

/// True when every CR of `data` starts a CRLF.
fn no_bare_cr(data: &str) -> bool {
    data.as_bytes()
        .windows(2)
        .all(|pair| pair[0] != b'\r' || pair[1] == b'\n')
        && !data.ends_with('\r')
}

#[tokio::test]
async fn a_shopper_name_with_line_breaks_or_a_nul_is_mailed_with_a_one_line_to_and_no_nul() {
    let smtp = SmtpServer::start().await;
    let daemon = TestDaemon::start(&config(&smtp, "", &cart_rule("100ms", "300ms", "1h"))).await;
    let store = store(&daemon);
    // (address, name as the shop sent it, display name expected in To and Subject)
    let shoppers = [
        (
            "crlf@example.com",
            "Ada\r\nBcc: eve@example.com",
            "Ada Bcc: eve@example.com",
        ),
        ("lf@example.com", "Grace\nHopper", "Grace Hopper"),
        ("cr@example.com", "Radia\rPerlman", "Radia Perlman"),
        ("nul@example.com", "Linus\0Torvalds", "LinusTorvalds"),
    ];
    let mut carts = Vec::new();
    for (n, (address, name, _)) in shoppers.iter().enumerate() {
        carts.push(put_named_cart(&store, &format!("n{n}"), address, name).await);
    }

    let mails = eventually("two emails to each shopper", WAIT, || async {
        let all = smtp.messages();
        shoppers
            .iter()
            .all(|(address, _, _)| all.iter().filter(|m| to(m, address)).count() >= 2)
            .then_some(all)
    })
    .await;

    assert_eq!(mails.len(), 2 * shoppers.len(), "nothing else was sent");
    for (address, _, display) in shoppers {
        for mail in mails.iter().filter(|m| to(m, address)) {
            let data = &mail.data;
            assert_eq!(mail.rcpt_to, [address], "the envelope has one recipient");
            let (head, _) = data.split_once("\r\n\r\n").unwrap();
            assert!(
                !head.lines().any(|line| line.starts_with("Bcc:")),
                "a header was injected:\n{head}"
            );
            assert_eq!(
                to_mailbox(&header(data, "To").unwrap()),
                (display.to_owned(), address.to_owned())
            );
            assert!(!data.contains('\0'), "a NUL reached the message:\n{data:?}");
            assert!(no_bare_cr(data), "a bare CR reached the message:\n{data:?}");
        }
        let subjects: Vec<String> = mails
            .iter()
            .filter(|m| to(m, address))
            .map(|m| header(&m.data, "Subject").unwrap())
            .collect();
        assert!(
            subjects.contains(&format!("Still thinking it over, {display}?")),
            "{subjects:?}"
        );
    }
    for cart in carts {
        let states: Vec<String> = outbox_rows(&daemon, cart)
            .into_iter()
            .take(2)
            .map(|(_, state, _)| state)
            .collect();
        assert_eq!(states, ["sent", "sent"]);
    }
}

#[tokio::test]
async fn an_email_that_cannot_be_built_is_failed_with_its_reason_and_outbox_preview_never_panics() {
    let smtp = SmtpServer::start().await;
    let daemon = TestDaemon::start(&config(&smtp, "", &cart_rule("100ms", "1h", "2h"))).await;
    let store = store(&daemon);
    // An address the deal accepts but no mail library does.
    let unbuildable = put_named_cart(&store, "bad", "ada,grace@example.com", "Ada").await;
    let crlf = put_named_cart(
        &store,
        "crlf",
        "crlf@example.com",
        "Ada\r\nBcc: eve@example.com",
    )
    .await;

    let (state, reason) = eventually("the unbuildable email settled", WAIT, || async {
        outbox_rows(&daemon, unbuildable)
            .into_iter()
            .find(|(step, state, _)| *step == 0 && state != "pending" && state != "sending")
            .map(|(_, state, reason)| (state, reason))
    })
    .await;
    assert_eq!(state, "failed");
    let reason = reason.unwrap_or_default();
    assert!(reason.contains("recipient address"), "{reason}");
    eventually(
        "the first email to the shopper with a CRLF name",
        WAIT,
        || async { (messages_to(&smtp, "crlf@example.com").len() == 1).then_some(()) },
    )
    .await;
    assert!(messages_to(&smtp, "eve@example.com").is_empty());

    let config = daemon.config_path.to_str().unwrap().to_owned();
    let preview = |deal: i64| {
        let config = config.clone();
        async move {
            let deal = deal.to_string();
            run_cli(
                &[
                    "--config", &config, "outbox", "preview", "carts", &deal, "--step", "2",
                ],
                &[],
            )
            .await
        }
    };
    let (code, stdout, stderr) = preview(crlf).await;
    assert_eq!(code, 0, "{stderr}");
    let (head, _) = stdout.split_once("\r\n\r\n").unwrap_or((&stdout, ""));
    assert_eq!(
        to_mailbox(&header(head, "To").unwrap()),
        (
            "Ada Bcc: eve@example.com".to_owned(),
            "crlf@example.com".to_owned()
        ),
        "{head}"
    );
    assert!(!head.lines().any(|line| line.starts_with("Bcc:")), "{head}");
    let (code, _, stderr) = preview(unbuildable).await;
    assert_eq!(code, 1, "a clean error, not a panic (101): {stderr}");
    assert!(stderr.contains("recipient address"), "{stderr}");
}

#[tokio::test]
async fn a_sequence_stops_when_the_cart_is_bought_between_steps_even_through_another_connection() {
    let smtp = SmtpServer::start().await;
    let daemon = TestDaemon::start(&config(&smtp, "", &cart_rule("200ms", "2500ms", "4s"))).await;
    let store = store(&daemon);
    let now = Utc::now();
    // Grace buys through the shop where she abandoned the cart; Linus through another
    // connection (say, the phone order desk's CRM) with the same email address.
    let grace_cart = put_cart(
        &store,
        "shop",
        "g1",
        "grace@example.com",
        Some(true),
        "cart_abandoned",
        now,
    )
    .await;
    let linus_cart = put_cart(
        &store,
        "shop",
        "l1",
        "linus@example.com",
        Some(true),
        "cart_abandoned",
        now,
    )
    .await;
    eventually("the first email to both", WAIT, || async {
        (messages_to(&smtp, "grace@example.com").len() == 1
            && messages_to(&smtp, "linus@example.com").len() == 1)
            .then_some(())
    })
    .await;

    put_cart(
        &store,
        "shop",
        "g1",
        "grace@example.com",
        Some(true),
        "purchase_completed",
        Utc::now(),
    )
    .await;
    put_cart(
        &store,
        "phone-orders",
        "order-77",
        "linus@example.com",
        Some(true),
        "purchase_completed",
        Utc::now(),
    )
    .await;

    let grace_rows = settled(&daemon, grace_cart).await;
    let linus_rows = settled(&daemon, linus_cart).await;
    assert_eq!(messages_to(&smtp, "grace@example.com").len(), 1);
    assert_eq!(messages_to(&smtp, "linus@example.com").len(), 1);
    assert_eq!(grace_rows[1].1, "skipped");
    assert!(
        grace_rows[1]
            .2
            .as_deref()
            .unwrap()
            .contains("purchase_completed"),
        "{grace_rows:?}"
    );
    assert_eq!(linus_rows[1].1, "skipped");
    let reason = linus_rows[1].2.as_deref().unwrap();
    assert!(reason.contains("placed an order"), "{linus_rows:?}");
    assert!(
        linus_rows.iter().skip(1).all(|(_, s, _)| s == "skipped"),
        "{linus_rows:?}"
    );
    // The cart itself stays where the first email put it: no expiry over an order.
    assert_eq!(stage_of(&daemon, linus_cart), "follow_up_email");
}

#[tokio::test]
async fn the_unsubscribe_link_works_over_http_and_nothing_more_is_sent() {
    let smtp = SmtpServer::start().await;
    let daemon = TestDaemon::start(&config(&smtp, "", &cart_rule("200ms", "3s", "4s"))).await;
    let store = store(&daemon);
    let cart = put_cart(
        &store,
        "shop",
        "u1",
        "barbara@example.com",
        Some(true),
        "cart_abandoned",
        Utc::now(),
    )
    .await;
    let first = eventually("the first email", WAIT, || async {
        messages_to(&smtp, "barbara@example.com").into_iter().next()
    })
    .await;
    let list_unsubscribe = header(&first.data, "List-Unsubscribe").unwrap();
    let url = list_unsubscribe
        .split(", ")
        .find_map(|part| part.strip_prefix("<http"))
        .map(|rest| format!("http{}", rest.trim_end_matches('>')))
        .expect("an https/http unsubscribe URL");
    let path = url.strip_prefix(&daemon.url("")).unwrap().to_owned();

    let (status, page) = daemon.get(&path).await;
    assert_eq!(status, 200, "{page}");
    assert!(page.contains("<form method=\"post\""), "{page}");
    assert!(page.contains("b***@example.com"), "{page}");
    assert!(
        store
            .suppression("barbara@example.com".into())
            .await
            .unwrap()
            .is_none(),
        "a GET must not unsubscribe"
    );

    let forged = format!("{}x", path.trim_end_matches('/'));
    let (status, _) = daemon.get(&forged).await;
    assert_eq!(status, 404);

    let response = daemon
        .http
        .post(daemon.url(&path))
        .header("content-type", "application/x-www-form-urlencoded")
        .body("List-Unsubscribe=One-Click")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 200);
    let suppression = store
        .suppression("barbara@example.com".into())
        .await
        .unwrap()
        .expect("suppressed after the POST");
    assert_eq!(suppression.reason, "unsubscribed");

    let rows = settled(&daemon, cart).await;
    assert_eq!(messages_to(&smtp, "barbara@example.com").len(), 1);
    assert!(
        rows[1].2.as_deref().unwrap().contains("suppressed"),
        "{rows:?}"
    );
}

#[tokio::test]
async fn suppressed_bouncing_and_non_consenting_recipients_get_nothing() {
    let smtp = SmtpServer::start().await;
    let daemon = TestDaemon::start(&config(&smtp, "", &cart_rule("200ms", "400ms", "600ms"))).await;
    let store = store(&daemon);
    store
        .suppress(
            "suppressed@example.com".into(),
            "manual".into(),
            None,
            Utc::now(),
        )
        .await
        .unwrap();
    let now = Utc::now();
    let suppressed = put_cart(
        &store,
        "shop",
        "s1",
        "suppressed@example.com",
        Some(true),
        "cart_abandoned",
        now,
    )
    .await;
    let declined = put_cart(
        &store,
        "shop",
        "s2",
        "declined@example.com",
        Some(false),
        "cart_abandoned",
        now,
    )
    .await;
    let unknown = put_cart(
        &store,
        "shop",
        "s3",
        "unknown@example.com",
        None,
        "cart_abandoned",
        now,
    )
    .await;
    let bouncing = put_cart(
        &store,
        "shop",
        "s4",
        "bounce@example.com",
        Some(true),
        "cart_abandoned",
        now,
    )
    .await;
    let control = put_cart(
        &store,
        "shop",
        "s5",
        "control@example.com",
        Some(true),
        "cart_abandoned",
        now,
    )
    .await;

    for deal in [suppressed, declined, unknown, bouncing, control] {
        settled(&daemon, deal).await;
    }
    let received: Vec<_> = smtp.messages();
    assert_eq!(
        messages_to(&smtp, "control@example.com").len(),
        3,
        "the control shopper gets the sequence"
    );
    assert!(
        received.iter().all(|m| to(m, "control@example.com")),
        "only the control shopper got email: {:?}",
        received.iter().map(|m| &m.rcpt_to).collect::<Vec<_>>()
    );
    let reason = |deal| outbox_rows(&daemon, deal)[0].2.clone().unwrap_or_default();
    assert!(
        reason(suppressed).contains("suppressed"),
        "{}",
        reason(suppressed)
    );
    assert!(
        reason(declined).contains("declined"),
        "{}",
        reason(declined)
    );
    assert!(
        reason(unknown).contains("no marketing consent"),
        "{}",
        reason(unknown)
    );
    let bounce_rows = outbox_rows(&daemon, bouncing);
    assert_eq!(bounce_rows[0].1, "failed", "{bounce_rows:?}");
    assert!(bounce_rows[1].2.as_deref().unwrap().contains("suppressed"));
    let bounce = store
        .suppression("bounce@example.com".into())
        .await
        .unwrap()
        .expect("a hard bounce suppresses the address");
    assert_eq!(bounce.reason, "hard bounce");
}

/// Only a 5.1.x reply says the mailbox does not exist. A 5.7.1 policy refusal (here with
/// the 550 that also starts "no such user" replies) fails the email but must not
/// suppress the shopper: once the server accepts again, their next cart gets its email.
#[tokio::test]
async fn a_policy_refusal_fails_the_email_without_suppressing_and_a_5_1_1_suppresses() {
    let smtp = SmtpServer::start().await;
    smtp.refuse_recipient("policy@example.com", Some("550 5.7.1 rejected by policy"));
    smtp.refuse_recipient("gone@example.com", Some("550 5.1.1 mailbox does not exist"));
    let daemon = TestDaemon::start(&config(&smtp, "", &cart_rule("200ms", "400ms", "600ms"))).await;
    let store = store(&daemon);
    let now = Utc::now();
    let refused = put_cart(
        &store,
        "shop",
        "p1",
        "policy@example.com",
        Some(true),
        "cart_abandoned",
        now,
    )
    .await;
    let gone = put_cart(
        &store,
        "shop",
        "g1",
        "gone@example.com",
        Some(true),
        "cart_abandoned",
        now,
    )
    .await;

    // Steps 0 to 2 are the emails; the row after them expires the cart.
    let emails = |rows: Vec<(i64, String, Option<String>)>| {
        rows.into_iter()
            .filter(|(step, _, _)| *step < 3)
            .collect::<Vec<_>>()
    };
    let refused_rows = emails(settled(&daemon, refused).await);
    let gone_rows = emails(settled(&daemon, gone).await);
    assert!(smtp.messages().is_empty(), "{:?}", smtp.messages());
    // Every step was tried and refused on its own: none was skipped as suppressed.
    assert_eq!(refused_rows.len(), 3, "{refused_rows:?}");
    for (step, state, reason) in &refused_rows {
        let reason = reason.as_deref().unwrap_or_default();
        assert_eq!(state, "failed", "step {step}: {reason}");
        assert!(
            reason.contains("5.7.1") && !reason.contains("suppressed"),
            "step {step}: {reason}"
        );
    }
    assert_eq!(
        store
            .suppression("policy@example.com".into())
            .await
            .unwrap()
            .map(|s| s.reason),
        None,
        "a policy refusal is not a bounce"
    );
    // The 5.1.1 suppresses the address; its later steps are skipped for it.
    assert_eq!(gone_rows[0].1, "failed", "{gone_rows:?}");
    assert!(
        gone_rows[1..]
            .iter()
            .all(|(_, _, reason)| reason.as_deref().unwrap_or_default().contains("suppressed")),
        "{gone_rows:?}"
    );
    let bounce = store
        .suppression("gone@example.com".into())
        .await
        .unwrap()
        .expect("a 5.1.1 suppresses the address");
    assert_eq!(bounce.reason, "hard bounce");

    // The server accepts the refused shopper again: their next cart is delivered.
    smtp.refuse_recipient("policy@example.com", None);
    let next = put_cart(
        &store,
        "shop",
        "p2",
        "policy@example.com",
        Some(true),
        "cart_abandoned",
        Utc::now(),
    )
    .await;
    let next_rows = emails(settled(&daemon, next).await);
    assert_eq!(next_rows.len(), 3, "{next_rows:?}");
    assert!(
        next_rows.iter().all(|(_, state, _)| state == "sent"),
        "{next_rows:?}"
    );
    assert_eq!(messages_to(&smtp, "policy@example.com").len(), 3);
}

/// A cart deleted at its source gets no more email, even a step already due and
/// waiting for its retry. The shopper's server first answers 451, so the step is
/// pending with an attempt behind it when the deletion arrives; then it accepts again.
#[tokio::test]
async fn a_cart_deleted_at_its_source_gets_no_email_even_for_a_step_already_due() {
    let smtp = SmtpServer::start().await;
    smtp.refuse_recipient("deleted@example.com", Some("451 4.3.0 try again later"));
    let daemon = TestDaemon::start(&config(&smtp, "", &cart_rule("100ms", "200ms", "300ms"))).await;
    let store = store(&daemon);
    let now = Utc::now();
    let cart = |id: &str, email: &str| {
        let mut source = SourceDeal::new(id, format!("Cart {id}"), "checkouts", "cart_abandoned");
        source.contact_email = EmailAddress::parse(email);
        source.contact_name = Some("Ada Lovelace".into());
        source
    };
    let deleted = put_cart_source(
        &store,
        "shop",
        cart("d1", "deleted@example.com"),
        Some(true),
        "cart_abandoned",
        now,
    )
    .await;
    let control = put_cart_source(
        &store,
        "shop",
        cart("c1", "control@example.com"),
        Some(true),
        "cart_abandoned",
        now,
    )
    .await;
    eventually("the first step to be refused for now", WAIT, || async {
        outbox_rows(&daemon, deleted)
            .into_iter()
            .any(|(step, state, reason)| {
                step == 0 && state == "pending" && reason.is_some_and(|r| r.contains("451"))
            })
            .then_some(())
    })
    .await;

    // The source deletes the cart (same stage, a newer record), then the server accepts.
    let mut gone = cart("d1", "deleted@example.com");
    gone.deleted = true;
    put_cart_source(
        &store,
        "shop",
        gone,
        Some(true),
        "cart_abandoned",
        Utc::now(),
    )
    .await;
    assert!(
        store
            .deal(deleted)
            .await
            .unwrap()
            .unwrap()
            .deleted_at
            .is_some(),
        "the cart is marked deleted"
    );
    smtp.refuse_recipient("deleted@example.com", None);

    let control_rows = settled(&daemon, control).await;
    assert!(
        control_rows
            .iter()
            .filter(|(step, _, _)| *step < 3)
            .all(|(_, s, _)| s == "sent"),
        "{control_rows:?}"
    );
    assert_eq!(messages_to(&smtp, "control@example.com").len(), 3);
    let rows = settled(&daemon, deleted).await;
    assert!(
        messages_to(&smtp, "deleted@example.com").is_empty(),
        "a deleted cart got email; outbox: {rows:?}"
    );
    let first = rows.iter().find(|(step, _, _)| *step == 0).unwrap();
    assert_ne!(first.1, "sent", "{rows:?}");
    assert!(
        first
            .2
            .as_deref()
            .is_some_and(|reason| reason.contains("deleted in its source")),
        "{rows:?}"
    );
}

#[tokio::test]
async fn with_smtp_down_emails_are_retried_later_none_lost_none_doubled() {
    let mut smtp = SmtpServer::start().await;
    smtp.stop().await;
    let daemon = TestDaemon::start(&config(
        &smtp,
        "",
        r#"
[followups.owner_alert]
kind = "transactional"
stage = "sales.proposal"
to = "owner"
template = "deal_stalled"
after = "100ms"
"#,
    ))
    .await;
    let store = store(&daemon);
    let mut deals = Vec::new();
    for n in 0..5 {
        let mut source = SourceDeal::new(format!("d{n}"), format!("Deal {n}"), "p", "s");
        source.owner = Some("Alice Owner".into());
        source.owner_email = EmailAddress::parse("alice@example.com");
        source.stage_changed_at = Some(Utc::now());
        source.updated_at = source.stage_changed_at;
        store
            .upsert_deals(vec![DealUpsert {
                connection: ConnectionName::new("crm"),
                source,
                target: StageRef {
                    pipeline: Some(PipelineKey::new("sales")),
                    stage: StageKey::new("proposal"),
                },
                status: DealStatus::Open,
                observed_at: Utc::now(),
                cause: ChangeCause::Poll,
            }])
            .await
            .unwrap();
        deals.push(
            store
                .deal_by_external_id("crm", &format!("d{n}"))
                .await
                .unwrap()
                .unwrap()
                .id,
        );
    }
    eventually("failed attempts while SMTP is down", WAIT, || async {
        let retrying = daemon.count(
            "SELECT count(*) FROM outbox WHERE state = 'pending' AND attempts >= 1
             AND reason LIKE 'retrying:%'",
        );
        (retrying == 5).then_some(())
    })
    .await;
    assert!(smtp.messages().is_empty());

    smtp.restart().await;
    for deal in &deals {
        let rows = settled(&daemon, *deal).await;
        assert_eq!(rows[0].1, "sent", "{rows:?}");
    }
    let mails = smtp.messages();
    assert_eq!(mails.len(), 5);
    let mut keys: Vec<_> = mails
        .iter()
        .map(|m| header(&m.data, "X-Dealsync-Idempotency-Key").unwrap())
        .collect();
    keys.sort();
    keys.dedup();
    assert_eq!(keys.len(), 5, "each email once");
}

#[tokio::test]
async fn a_daemon_killed_during_a_send_burst_sends_no_message_twice() {
    let smtp = SmtpServer::start().await;
    let mut daemon = TestDaemon::start(&config(
        &smtp,
        "pool_size = 4",
        r#"
[followups.owner_alert]
kind = "transactional"
stage = "sales.proposal"
to = "team@example.com"
template = "deal_stalled"
after = "1s"
"#,
    ))
    .await;
    let store = store(&daemon);
    let total: i64 = 300;
    let now = Utc::now();
    let upserts = (0..total as usize).map(|n| in_proposal(n, now)).collect();
    store.upsert_deals(upserts).await.unwrap();

    eventually("the burst to be under way", WAIT, || async {
        (smtp.messages().len() >= 20).then_some(())
    })
    .await;
    daemon.kill_and_restart().await;
    eventually("every row to settle after the restart", WAIT, || async {
        let open =
            daemon.count("SELECT count(*) FROM outbox WHERE state IN ('pending', 'sending')");
        let all = daemon.count("SELECT count(*) FROM outbox");
        (open == 0 && all == total).then_some(())
    })
    .await;

    let mails = smtp.messages();
    let mut per_key: HashMap<String, usize> = HashMap::new();
    for mail in &mails {
        *per_key
            .entry(header(&mail.data, "X-Dealsync-Idempotency-Key").unwrap())
            .or_default() += 1;
    }
    let doubled: Vec<_> = per_key.iter().filter(|(_, n)| **n > 1).collect();
    assert!(doubled.is_empty(), "sent twice: {doubled:?}");
    let sent = daemon.count("SELECT count(*) FROM outbox WHERE state = 'sent'");
    let uncertain = daemon.count("SELECT count(*) FROM outbox WHERE state = 'uncertain'");
    assert_eq!(
        sent + uncertain,
        total,
        "every row sent or shown as uncertain"
    );
    // Every row marked sent reached the server; an uncertain one may have.
    assert!(mails.len() as i64 >= sent && mails.len() as i64 <= total);
}

#[tokio::test]
async fn the_frequency_cap_holds_back_emails_beyond_the_daily_limit() {
    let smtp = SmtpServer::start().await;
    // The cart expires an hour after the last step, not a second: the held step must
    // stay held while the test looks, however slow the machine.
    let rule = cart_rule("200ms", "400ms", "600ms")
        .replace(r#"expire_after = "1s""#, r#"expire_after = "1h""#);
    assert!(rule.contains(r#"expire_after = "1h""#));
    let daemon = TestDaemon::start(&config(&smtp, "max_per_recipient_per_day = 2", &rule)).await;
    let store = store(&daemon);
    let cart = put_cart(
        &store,
        "shop",
        "f1",
        "frances@example.com",
        Some(true),
        "cart_abandoned",
        Utc::now(),
    )
    .await;
    let rows = eventually("the third step to be held by the cap", WAIT, || async {
        let rows = outbox_rows(&daemon, cart);
        rows.get(2)
            .filter(|(_, state, reason)| {
                state == "pending"
                    && reason
                        .as_deref()
                        .is_some_and(|r| r.contains("frequency cap"))
            })
            .map(|_| rows.clone())
    })
    .await;
    assert_eq!(rows[0].1, "sent");
    assert_eq!(rows[1].1, "sent");
    assert_eq!(messages_to(&smtp, "frances@example.com").len(), 2);
}

/// A server that keeps answering 451 gets `email.max_attempts` tries, then the email is
/// failed with the count and the server's answer: never a fourth try, never given up early.
#[tokio::test]
async fn an_email_the_server_keeps_deferring_is_tried_max_attempts_times_then_failed_with_its_answer()
 {
    let smtp = SmtpServer::start().await;
    let daemon = TestDaemon::start(&config(
        &smtp,
        "max_attempts = 3",
        &cart_rule("100ms", "1h", "2h"),
    ))
    .await;
    let store = store(&daemon);
    // The test server answers 451 for every recipient whose address says "tempfail".
    let cart = put_cart(
        &store,
        "shop",
        "t1",
        "busy-tempfail@example.com",
        Some(true),
        "cart_abandoned",
        Utc::now(),
    )
    .await;
    let (state, reason) = eventually("the first step to be given up", WAIT, || async {
        outbox_rows(&daemon, cart)
            .into_iter()
            .find(|(step, state, _)| *step == 0 && state != "pending" && state != "sending")
            .map(|(_, state, reason)| (state, reason.unwrap_or_default()))
    })
    .await;
    assert_eq!(state, "failed", "{reason}");
    assert!(reason.contains("gave up after 3 attempts"), "{reason}");
    assert!(
        reason.contains("451"),
        "the server's answer is kept: {reason}"
    );
    let attempts: i64 = daemon
        .db()
        .query_row(
            "SELECT attempts FROM outbox WHERE deal_id = ?1 AND step = 0",
            [cart],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(attempts, 3);
    assert!(smtp.messages().is_empty());
}

#[tokio::test]
async fn one_shopper_with_several_abandoned_carts_gets_one_sequence_for_the_newest() {
    let smtp = SmtpServer::start().await;
    let daemon = TestDaemon::start(&config(&smtp, "", &cart_rule("1500ms", "2s", "2500ms"))).await;
    let store = store(&daemon);
    let older = put_cart(
        &store,
        "shop",
        "o1",
        "edsger@example.com",
        Some(true),
        "cart_abandoned",
        Utc::now(),
    )
    .await;
    eventually("the older cart to be enrolled", WAIT, || async {
        (!outbox_rows(&daemon, older).is_empty()).then_some(())
    })
    .await;
    let newer = put_cart(
        &store,
        "shop",
        "o2",
        "edsger@example.com",
        Some(true),
        "cart_abandoned",
        Utc::now(),
    )
    .await;
    let newer_rows = settled(&daemon, newer).await;
    let older_rows = settled(&daemon, older).await;
    assert!(
        older_rows
            .iter()
            .all(|(_, s, r)| s == "skipped" && r.as_deref().unwrap().contains("superseded")),
        "{older_rows:?}"
    );
    assert_eq!(newer_rows[0].1, "sent");
    let mails = messages_to(&smtp, "edsger@example.com");
    assert_eq!(mails.len(), 3);
    assert!(mails.iter().all(|m| {
        header(&m.data, "X-Dealsync-Idempotency-Key")
            .unwrap()
            .starts_with(&format!("{newer}-"))
    }));
}

/// Moves every time the store holds about deal `deal_id` (the deal, its stage history,
/// its outbox rows) `by` into the past, as if that much time had passed since: what a
/// stopped daemon finds when it starts again after downtime. The daemon must be stopped.
fn pass_time(daemon: &TestDaemon, deal_id: i64, by: chrono::Duration) {
    let ms = by.num_milliseconds();
    daemon
        .db()
        .execute_batch(&format!(
            "UPDATE deals SET stage_entered_at = stage_entered_at - {ms},
                 last_activity_at = last_activity_at - {ms}, first_seen_at = first_seen_at - {ms},
                 synced_at = synced_at - {ms}, source_created_at = source_created_at - {ms},
                 source_updated_at = source_updated_at - {ms}
               WHERE id = {deal_id};
             UPDATE stage_history SET at = at - {ms} WHERE deal_id = {deal_id};
             UPDATE outbox SET anchor_at = anchor_at - {ms}, due_at = due_at - {ms},
                 next_attempt_at = next_attempt_at - {ms}, created_at = created_at - {ms},
                 updated_at = updated_at - {ms}
               WHERE deal_id = {deal_id};"
        ))
        .expect("moving the deal's times into the past");
}

#[tokio::test]
async fn after_downtime_a_step_overdue_beyond_the_grace_is_skipped_and_recorded_not_sent_late() {
    // Arrange: a sequence at 10 min, 1 h and 2 h, a 5 min grace; the cart enrolled.
    let smtp = SmtpServer::start().await;
    let mut daemon = TestDaemon::start(&config(
        &smtp,
        "late_grace = \"5m\"",
        &cart_rule("10m", "1h", "2h"),
    ))
    .await;
    let store = store(&daemon);
    let cart = put_cart(
        &store,
        "shop",
        "late",
        "dennis@example.com",
        Some(true),
        "cart_abandoned",
        Utc::now(),
    )
    .await;
    eventually("the cart to be enrolled", WAIT, || async {
        (outbox_rows(&daemon, cart).len() == 4).then_some(())
    })
    .await;

    // Act: the daemon is down for an hour: step 1 came due 50 min ago (beyond its
    // grace), step 2 comes due as it starts again.
    daemon.signal("KILL");
    daemon.wait_exit(Duration::from_secs(10)).await;
    pass_time(&daemon, cart, chrono::Duration::hours(1));
    daemon.start_again().await;

    // Assert
    let rows = eventually("step 2 to be sent on time", WAIT, || async {
        let rows = outbox_rows(&daemon, cart);
        (rows[1].1 == "sent").then_some(rows)
    })
    .await;
    assert_eq!(rows[0].1, "skipped", "{rows:?}");
    assert!(
        rows[0].2.as_deref().unwrap().contains("not sent late"),
        "{rows:?}"
    );
    assert_eq!(rows[2].1, "pending", "step 3 is an hour away: {rows:?}");
    let mails = messages_to(&smtp, "dennis@example.com");
    assert_eq!(mails.len(), 1);
    assert_eq!(
        header(&mails[0].data, "X-Dealsync-Idempotency-Key").unwrap(),
        format!("{cart}-carts-2")
    );
}

#[tokio::test]
async fn check_rejects_unknown_stages_templates_bad_delays_and_template_errors_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("templates")).unwrap();
    for (file, text) in [
        ("broken.subject", "Hello {{ contact.nmae }}"),
        ("broken.txt", "text"),
        ("broken.html", "<p>html</p>"),
    ] {
        std::fs::write(dir.path().join("templates").join(file), text).unwrap();
    }
    let write = |name: &str, rules: &str| {
        let path = dir.path().join(name);
        std::fs::write(
            &path,
            format!(
                "[storage]\npath = \"{}/x.db\"\n[email]\ntemplates = \"templates\"\n{rules}",
                dir.path().display()
            ),
        )
        .unwrap();
        path
    };
    let bad = write(
        "bad.toml",
        r#"
[followups.a]
kind = "transactional"
stage = "sales.nowhere"
template = "deal_stalled"

[followups.b]
kind = "transactional"
stage = "sales.proposal"
to = "owner"
template = "missing"

[followups.c]
kind = "transactional"
stage = "ecommerce.cart_abandoned"
steps = [
  { after = "2h", template = "broken" },
  { after = "1h", template = "broken" },
]
"#,
    );
    let (code, _, stderr) = run_cli(&["--config", bad.to_str().unwrap(), "check"], &[]).await;
    assert_eq!(code, 78, "{stderr}");
    assert!(stderr.contains("followups.a.stage"), "{stderr}");
    assert!(
        stderr.contains("followups.b.template: unknown template \"missing\""),
        "{stderr}"
    );
    assert!(
        stderr.contains("followups.c.steps[1].after: must be later"),
        "{stderr}"
    );

    let typo = write(
        "typo.toml",
        r#"
[followups.c]
kind = "transactional"
stage = "sales.proposal"
to = "owner"
template = "broken"
"#,
    );
    let (code, _, stderr) = run_cli(&["--config", typo.to_str().unwrap(), "check"], &[]).await;
    assert_eq!(code, 78, "{stderr}");
    assert!(stderr.contains("broken.subject"), "{stderr}");
    assert!(stderr.contains("followups.c"), "{stderr}");
}

#[tokio::test]
async fn dry_run_renders_and_records_without_sending_and_preview_prints_the_exact_email() {
    let smtp = SmtpServer::start().await;
    let daemon = TestDaemon::start(&config(
        &smtp,
        "dry_run = true",
        &cart_rule("100ms", "200ms", "300ms"),
    ))
    .await;
    let store = store(&daemon);
    let cart = put_cart(
        &store,
        "shop",
        "dry",
        "radia@example.com",
        Some(true),
        "cart_abandoned",
        Utc::now(),
    )
    .await;
    let rows = settled(&daemon, cart).await;
    assert!(smtp.messages().is_empty(), "a dry run sends nothing");
    for (_, state, reason) in &rows[..3] {
        assert_eq!(state, "skipped");
        assert!(
            reason.as_deref().unwrap().starts_with("dry run"),
            "{rows:?}"
        );
    }
    let recorded = daemon.count("SELECT count(*) FROM outbox WHERE message_id IS NOT NULL");
    assert_eq!(recorded, 3, "each rendered email keeps its Message-ID");

    let config = daemon.config_path.to_str().unwrap().to_owned();
    let deal = cart.to_string();
    let (code, stdout, stderr) = run_cli(
        &[
            "--config", &config, "outbox", "preview", "carts", &deal, "--step", "3",
        ],
        &[],
    )
    .await;
    assert_eq!(code, 0, "{stderr}");
    for needle in [
        "To: \"Ada Lovelace\" <radia@example.com>",
        "Subject: SAVE10: a discount for the cart you left",
        &format!("X-Dealsync-Idempotency-Key: {cart}-carts-3"),
        &format!("Message-ID: <{cart}-carts-3.dealsync@example.com>"),
        "List-Unsubscribe-Post: List-Unsubscribe=One-Click",
        "Content-Type: text/plain",
        "Content-Type: text/html",
    ] {
        assert!(stdout.contains(needle), "{needle} missing in\n{stdout}");
    }
    let (code, stdout, stderr) = run_cli(
        &[
            "--config", &config, "outbox", "list", "--deal", &deal, "--format", "json",
        ],
        &[],
    )
    .await;
    assert_eq!(code, 0, "{stderr}");
    let listed: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(listed.as_array().unwrap().len(), 4, "{stdout}");
    let (code, _, stderr) = run_cli(
        &[
            "--config",
            &config,
            "outbox",
            "preview",
            "nosuchrule",
            &deal,
        ],
        &[],
    )
    .await;
    assert_eq!(code, 2, "{stderr}");
    assert!(stderr.contains("known: carts"), "{stderr}");
}

#[tokio::test]
async fn a_newly_abandoned_cart_is_sent_promptly_without_waiting_for_the_enroll_interval() {
    // Arrange: the App in process, so the cart is written through the daemon's own
    // store, with an enrollment pass only once an hour.
    let smtp = SmtpServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("dealsync.toml");
    let body = config(&smtp, "", &cart_rule("100ms", "1h", "2h"))
        .replace("enroll_interval = \"100ms\"", "enroll_interval = \"1h\"");
    std::fs::write(
        &path,
        format!(
            "[storage]\npath = \"{}\"\n[server]\nlisten = \"127.0.0.1:0\"\npublic_url = \"http://127.0.0.1:8080\"\n{body}",
            dir.path().join("dealsync.db").display()
        ),
    )
    .unwrap();
    let app = dealsync::app::App::build(dealsync::config::load(&path).unwrap())
        .await
        .unwrap();
    let state = app.state();
    let shutdown = tokio_util::sync::CancellationToken::new();
    let running = tokio::spawn(app.run(shutdown.clone()));
    // A first cart proves the worker is in its loop (its start-up pass may be what
    // enrolls this one); after it, only a wake-up can enroll before an hour passes.
    put_cart(
        &state.store,
        "shop",
        "w0",
        "first@example.com",
        Some(true),
        "cart_abandoned",
        Utc::now(),
    )
    .await;
    eventually("the first shopper's email", WAIT, || async {
        (!messages_to(&smtp, "first@example.com").is_empty()).then_some(())
    })
    .await;

    // Act: a cart is abandoned now.
    let cart = put_cart(
        &state.store,
        "shop",
        "w1",
        "wake@example.com",
        Some(true),
        "cart_abandoned",
        Utc::now(),
    )
    .await;

    // Assert: its first step (due after 100 ms) arrives within the wait, not an hour.
    let mails = eventually("the first cart email", WAIT, || async {
        let mails = messages_to(&smtp, "wake@example.com");
        (!mails.is_empty()).then_some(mails)
    })
    .await;
    assert_eq!(mails.len(), 1);
    assert_eq!(
        header(&mails[0].data, "X-Dealsync-Idempotency-Key").unwrap(),
        format!("{cart}-carts-1")
    );
    shutdown.cancel();
    running.await.unwrap().unwrap();
}

/// A deal in a `sales` stage, owned by `owner`, entered `entered` ago.
pub(crate) async fn put_deal(
    store: &Store,
    id: &str,
    stage: &str,
    owner: Option<(&str, &str)>,
    entered: chrono::Duration,
    amount_minor: i64,
) -> i64 {
    let at = Utc::now() - entered;
    let mut source = SourceDeal::new(id, format!("Deal {id}"), "p", stage);
    source.amount = Some(Money::new(amount_minor, Currency::parse("EUR").unwrap()));
    if let Some((name, email)) = owner {
        source.owner = Some(name.into());
        source.owner_email = EmailAddress::parse(email);
    }
    source.contact_email = EmailAddress::parse(&format!("contact-{id}@example.com"));
    source.stage_changed_at = Some(at);
    source.updated_at = Some(at);
    store
        .upsert_deals(vec![DealUpsert {
            connection: ConnectionName::new("crm"),
            source,
            target: StageRef {
                pipeline: Some(PipelineKey::new("sales")),
                stage: StageKey::new(stage),
            },
            status: DealStatus::Open,
            observed_at: Utc::now(),
            cause: ChangeCause::Poll,
        }])
        .await
        .unwrap();
    store
        .deal_by_external_id("crm", id)
        .await
        .unwrap()
        .unwrap()
        .id
}

fn digest_rule(name: &str, to: &str, at: &str, grace: &str, enabled: bool) -> String {
    format!(
        r#"
[followups.{name}]
enabled = {enabled}
kind = "transactional"
stage = ["sales.proposal", "sales.negotiation"]
to = "{to}"
after = "1h"
template = "owner_digest"
digest = "{at}"
time_zone = "UTC"
late_grace = "{grace}"
"#
    )
}

/// A digest the server keeps deferring is tried `email.max_attempts` times, then failed
/// with the count: never given up early, never tried once more.
#[tokio::test]
async fn a_digest_the_server_keeps_deferring_is_tried_max_attempts_times_then_failed() {
    let smtp = SmtpServer::start().await;
    let rule = |at: &str, enabled: bool| digest_rule("rotting", "owner", at, "10m", enabled);
    // Retries 1.5 to 3 s apart, so the wait between the two attempts can be seen.
    let email = "max_attempts = 2\nretry_initial = \"3s\"\nretry_max = \"3s\"";
    let mut daemon = TestDaemon::start(&config(&smtp, email, &rule("08:00", false))).await;
    let store = store(&daemon);
    // The test server answers 451 to every address that says "tempfail".
    let owner = Some(("Busy Owner", "busy-tempfail@example.com"));
    put_deal(
        &store,
        "r1",
        "proposal",
        owner,
        chrono::Duration::days(3),
        1,
    )
    .await;
    let slot = Utc::now() + chrono::Duration::seconds(2);
    let at = slot.format("%H:%M:%S").to_string();
    daemon
        .kill_and_restart_with_config(&config(&smtp, email, &rule(&at, true)))
        .await;
    // After the first 451 the digest waits: its next attempt lies after the time the
    // retry was written.
    let (next, written) = eventually("the first attempt deferred", WAIT, || async {
        daemon
            .db()
            .query_row(
                "SELECT next_attempt_at, updated_at FROM digests
                 WHERE recipient = 'busy-tempfail@example.com'
                   AND state = 'pending' AND attempts = 1",
                [],
                |r| Ok((r.get::<_, i64>(0)?, r.get::<_, i64>(1)?)),
            )
            .ok()
    })
    .await;
    assert!(next > written, "put off to {next}, written at {written}");
    let (state, attempts, reason) = eventually("the digest given up", WAIT, || async {
        daemon
            .db()
            .query_row(
                "SELECT state, attempts, reason FROM digests
                 WHERE recipient = 'busy-tempfail@example.com'",
                [],
                |r| {
                    Ok((
                        r.get::<_, String>(0)?,
                        r.get::<_, i64>(1)?,
                        r.get::<_, Option<String>>(2)?,
                    ))
                },
            )
            .ok()
            .filter(|(state, _, _)| state != "pending" && state != "sending")
    })
    .await;
    let reason = reason.unwrap_or_default();
    assert_eq!((state.as_str(), attempts), ("failed", 2), "{reason}");
    assert!(reason.contains("gave up after 2 attempts"), "{reason}");
    assert!(smtp.messages().is_empty());
}

/// A per-deal alert on `sales.closing`: once it arrives, the worker has been through
/// its loop (digest assembly comes first in every pass).
pub(crate) const CANARY_RULE: &str = r#"
[followups.canary]
kind = "transactional"
stage = "sales.closing"
to = "canary@example.com"
template = "deal_stalled"
after = "100ms"
"#;

#[tokio::test]
async fn a_daily_digest_lists_each_owners_rotting_deals_in_one_email_once_per_day_even_across_a_restart()
 {
    // Arrange: the deals first (the rule off), then the rule on with its time a few
    // seconds ahead. Whether the worker starts before that time (it waits for it) or
    // after (it catches up within the grace), each owner gets one digest.
    let smtp = SmtpServer::start().await;
    let rules = |at: &str, enabled: bool| {
        format!(
            "{}{CANARY_RULE}",
            digest_rule("rotting", "owner", at, "10m", enabled)
        )
    };
    let mut daemon = TestDaemon::start(&config(&smtp, "", &rules("08:00", false))).await;
    let store = store(&daemon);
    let alice = Some(("Alice Owner", "Alice@Example.com"));
    let days = chrono::Duration::days;
    let a1 = put_deal(&store, "a1", "proposal", alice, days(3), 1_200_000).await;
    put_deal(&store, "a2", "negotiation", alice, days(2), 500_000).await;
    put_deal(
        &store,
        "a-fresh",
        "proposal",
        alice,
        chrono::Duration::minutes(5),
        1,
    )
    .await;
    put_deal(
        &store,
        "c1",
        "proposal",
        Some(("Carol", "carol@example.com")),
        chrono::Duration::hours(2),
        700,
    )
    .await;
    put_deal(
        &store,
        "b1",
        "needs_assessment",
        Some(("Bob", "bob@example.com")),
        days(9),
        1,
    )
    .await;
    put_deal(&store, "n1", "proposal", None, days(9), 1).await;
    let slot = Utc::now() + chrono::Duration::seconds(2);
    let at = slot.format("%H:%M:%S").to_string();
    daemon
        .kill_and_restart_with_config(&config(&smtp, "", &rules(&at, true)))
        .await;

    // Act: the slot passes.
    let digests = eventually("a digest for Alice and one for Carol", WAIT, || async {
        let alice = messages_to(&smtp, "alice@example.com");
        let carol = messages_to(&smtp, "carol@example.com");
        (!alice.is_empty() && !carol.is_empty()).then_some((alice, carol))
    })
    .await;

    // Assert: one email per owner, listing exactly the owner's idle deals.
    let (alice_mails, carol_mails) = digests;
    assert_eq!(alice_mails.len(), 1);
    assert_eq!(carol_mails.len(), 1);
    let day = slot.date_naive().to_string();
    let mail = &alice_mails[0].data;
    assert_eq!(
        header(mail, "Subject").unwrap(),
        format!("2 rotting deals for Alice Owner ({day})")
    );
    assert_eq!(
        header(mail, "X-Dealsync-Idempotency-Key").unwrap(),
        format!("digest-rotting-{day}-alice@example.com")
    );
    assert!(header(mail, "List-Unsubscribe").is_none());
    assert!(mail.contains("text/plain") && mail.contains("text/html"));
    let body = mail.replace("=\r\n", "");
    for needle in [
        "Deal a1",
        "Deal a2",
        "Proposal",
        "Negotiation",
        "12000.00 EUR",
        "3 days in stage",
    ] {
        assert!(body.contains(needle), "{needle} missing in\n{body}");
    }
    assert!(
        !body.contains("Deal a-fresh") && !body.contains("Deal c1"),
        "{body}"
    );
    assert!(carol_mails[0].data.contains("Deal c1"));
    assert!(messages_to(&smtp, "bob@example.com").is_empty());
    eventually("both digests recorded as sent", WAIT, || async {
        (daemon.count("SELECT count(*) FROM digests WHERE state = 'sent'") == 2).then_some(())
    })
    .await;

    // A crash and restart the same day: a new owner with rotting deals appears, but the
    // day was assembled, so nobody gets a second digest (and the newcomer none today).
    daemon.kill_and_restart().await;
    put_deal(
        &store,
        "d1",
        "proposal",
        Some(("Dave", "dave@example.com")),
        days(4),
        1,
    )
    .await;
    put_deal(&store, "k1", "closing", None, chrono::Duration::zero(), 1).await;
    eventually("the canary alert after the restart", WAIT, || async {
        (!messages_to(&smtp, "canary@example.com").is_empty()).then_some(())
    })
    .await;
    assert_eq!(messages_to(&smtp, "alice@example.com").len(), 1);
    assert_eq!(messages_to(&smtp, "carol@example.com").len(), 1);
    assert!(messages_to(&smtp, "dave@example.com").is_empty());
    assert_eq!(
        daemon.count("SELECT count(*) FROM digests WHERE state = 'sent'"),
        2
    );
    let config_path = daemon.config_path.to_str().unwrap().to_owned();
    let (code, stdout, stderr) = run_cli(
        &[
            "--config",
            &config_path,
            "outbox",
            "digests",
            "--format",
            "json",
        ],
        &[],
    )
    .await;
    assert_eq!(code, 0, "{stderr}");
    let rows: Vec<serde_json::Value> = serde_json::from_str(&stdout).unwrap();
    let mut listed: Vec<_> = rows
        .iter()
        .map(|r| {
            (
                r["recipient"].as_str().unwrap(),
                r["state"].as_str().unwrap(),
                r["deals"].as_array().unwrap().len(),
            )
        })
        .collect();
    listed.sort();
    assert_eq!(
        listed,
        [
            ("alice@example.com", "sent", 2),
            ("carol@example.com", "sent", 1)
        ]
    );
    let deal = a1.to_string();
    let (code, stdout, stderr) = run_cli(
        &[
            "--config",
            &config_path,
            "outbox",
            "preview",
            "rotting",
            &deal,
        ],
        &[],
    )
    .await;
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(
        header(&stdout, "Subject").unwrap(),
        format!("2 rotting deals for Alice Owner ({day})")
    );
}

#[tokio::test]
async fn after_downtime_a_digest_is_caught_up_within_its_grace_and_recorded_missed_beyond_it() {
    // Arrange: two fixed-address digests whose time passed two minutes ago, switched
    // on only once the deals exist (the daemon was "down" for them until then).
    let smtp = SmtpServer::start().await;
    let at = (Utc::now() - chrono::Duration::minutes(2))
        .format("%H:%M:%S")
        .to_string();
    let rules = |enabled: bool| {
        format!(
            "{}{}",
            digest_rule("team_a", "team-a@example.com", &at, "10m", enabled),
            digest_rule("team_b", "team-b@example.com", &at, "30s", enabled)
        )
    };
    let mut daemon = TestDaemon::start(&config(&smtp, "", &rules(false))).await;
    let store = store(&daemon);
    let days = chrono::Duration::days;
    put_deal(
        &store,
        "x1",
        "proposal",
        Some(("Alice", "alice@example.com")),
        days(3),
        100,
    )
    .await;
    put_deal(&store, "x2", "negotiation", None, days(5), 200).await;

    // Act: the rules come on with a restart.
    daemon
        .kill_and_restart_with_config(&config(&smtp, "", &rules(true)))
        .await;

    // Assert: team A gets every matching deal in one digest; team B's is too late.
    let mails = eventually("team A's digest", WAIT, || async {
        let mails = messages_to(&smtp, "team-a@example.com");
        (!mails.is_empty()).then_some(mails)
    })
    .await;
    assert_eq!(mails.len(), 1);
    assert!(mails[0].data.contains("Deal x1") && mails[0].data.contains("Deal x2"));
    let outcome = eventually("team B's day to be recorded", WAIT, || async {
        daemon
            .db()
            .query_row(
                "SELECT outcome FROM digest_runs WHERE rule = 'team_b'",
                [],
                |r| r.get::<_, String>(0),
            )
            .ok()
    })
    .await;
    assert_eq!(outcome, "missed");
    assert!(messages_to(&smtp, "team-b@example.com").is_empty());
    assert_eq!(
        daemon.count("SELECT count(*) FROM digests WHERE rule = 'team_b'"),
        0
    );
}

#[tokio::test]
async fn a_connection_dropped_after_data_leaves_the_email_uncertain_and_it_is_not_sent_again() {
    // Arrange: the server stores the message, then drops the connection instead of
    // answering, as a crashing relay would.
    let smtp = SmtpServer::start().await;
    let daemon = TestDaemon::start(&config(
        &smtp,
        "",
        r#"
[followups.alert]
kind = "transactional"
stage = "sales.proposal"
to = "dropafterdata@example.com"
template = "deal_stalled"
after = "100ms"

# Due retry_max (1s) after its deal is put, which is after the first email is marked
# uncertain: the pass that sends it is past the time any retry of that email would
# have come due, and a pass claims the due rows oldest first.
[followups.canary]
kind = "transactional"
stage = "sales.closing"
to = "canary@example.com"
template = "deal_stalled"
after = "1s"
"#,
    ))
    .await;
    let store = store(&daemon);

    // Act
    let deal = put_deal(&store, "u1", "proposal", None, chrono::Duration::zero(), 1).await;
    let rows = settled(&daemon, deal).await;

    // Assert: the row says what happened, and nothing is retried: a later email goes
    // out (the worker moved on, past the retry delay) and the first is still once.
    assert_eq!(rows[0].1, "uncertain", "{rows:?}");
    assert!(
        rows[0].2.as_deref().unwrap().contains("outcome unknown"),
        "{rows:?}"
    );
    put_deal(&store, "k1", "closing", None, chrono::Duration::zero(), 1).await;
    eventually("the canary alert", WAIT, || async {
        (!messages_to(&smtp, "canary@example.com").is_empty()).then_some(())
    })
    .await;
    assert_eq!(messages_to(&smtp, "dropafterdata@example.com").len(), 1);
    assert_eq!(outbox_rows(&daemon, deal)[0].1, "uncertain");
}

#[tokio::test]
async fn quiet_hours_follow_the_recipients_time_zone_from_the_source_record_else_the_shops() {
    // Arrange: quiet hours around the current hour in the shop's zone (UTC); one
    // shopper's record says she lives at UTC+12, where it is the middle of her day.
    let smtp = SmtpServer::start().await;
    let now = Utc::now();
    let quiet = format!(
        "{}-{}",
        (now - chrono::Duration::hours(1)).format("%H:%M"),
        (now + chrono::Duration::hours(1)).format("%H:%M")
    );
    let email = format!(
        "quiet_hours = \"{quiet}\"\ntime_zone = \"UTC\"\nrecipient_time_zone = [\"/customer/time_zone\"]"
    );
    let daemon = TestDaemon::start(&config(&smtp, &email, &cart_rule("100ms", "1h", "2h"))).await;
    let store = store(&daemon);

    // Act
    let record = serde_json::json!({"customer": {"time_zone": "Etc/GMT-12"}});
    put_cart_with_raw(
        &store,
        "shop",
        "tz1",
        "far@example.com",
        Some(true),
        "cart_abandoned",
        now,
        record,
    )
    .await;
    let near = put_cart(
        &store,
        "shop",
        "tz2",
        "near@example.com",
        Some(true),
        "cart_abandoned",
        now,
    )
    .await;

    // Assert: hers goes out; the other waits for the shop's morning.
    eventually("the email to the shopper at UTC+12", WAIT, || async {
        (messages_to(&smtp, "far@example.com").len() == 1).then_some(())
    })
    .await;
    let rows = eventually("the other step to be deferred", WAIT, || async {
        let rows = outbox_rows(&daemon, near);
        rows.first()
            .filter(|(_, state, reason)| {
                state == "pending" && reason.as_deref() == Some("quiet hours")
            })
            .map(|_| rows.clone())
    })
    .await;
    assert_eq!(rows[0].1, "pending");
    assert!(messages_to(&smtp, "near@example.com").is_empty());
}
