//! The emails a shop sends, read the way a mail client reads them: every shipped
//! template through the real binary (`outbox preview`) and a Shopify cart end to end
//! over SMTP, each message parsed as MIME (`mail-parser`) and its HTML part with a
//! real HTML5 parser (`scraper`).

use crate::followups::{config, messages_to, put_deal, store};
use crate::harness::daemon::{TestDaemon, run_cli};
use crate::harness::eventually;
use crate::harness::smtp::SmtpServer;
use crate::harness::vendors::fixture;
use crate::webhooks::{SHOP_SECRET, post, shopify, shopify_headers};
use dealsync::domain::{
    ChangeCause, ConnectionName, Currency, DealStatus, EmailAddress, LineItem, Money, PipelineKey,
    SourceDeal, StageKey, StageRef,
};
use dealsync::store::DealUpsert;
use serde_json::json;
use std::time::Duration;

/// One message as a mail client sees it.
#[derive(Debug)]
pub(crate) struct Email {
    pub(crate) subject: String,
    reply_to: Option<String>,
    pub(crate) text: String,
    pub(crate) html: String,
    /// (href, link text) of every link in the HTML part, as the parser reads them.
    links: Vec<(String, String)>,
}

/// Parses a whole message: MIME first, then the HTML part with an HTML5 parser.
/// Panics, naming what is wrong, when the message is not a text-and-HTML email.
pub(crate) fn read(raw: &str) -> Email {
    let message = mail_parser::MessageParser::default()
        .parse(raw.as_bytes())
        .unwrap_or_else(|| panic!("not a MIME message:\n{raw}"));
    let text = match message.text_part(0).map(|part| &part.body) {
        Some(mail_parser::PartType::Text(text)) => text.to_string(),
        other => panic!("no text/plain part ({other:?}) in\n{raw}"),
    };
    let html = match message.html_part(0).map(|part| &part.body) {
        Some(mail_parser::PartType::Html(html)) => html.to_string(),
        other => panic!("no text/html part ({other:?}) in\n{raw}"),
    };
    let document = scraper::Html::parse_document(&html);
    assert!(
        document.errors.is_empty(),
        "the HTML part does not parse cleanly: {:?}\n{html}",
        document.errors
    );
    let anchors = scraper::Selector::parse("a").expect("a valid selector");
    let links = document
        .select(&anchors)
        .map(|a| {
            (
                a.value().attr("href").unwrap_or_default().to_owned(),
                a.text().collect::<String>(),
            )
        })
        .collect();
    Email {
        subject: message.subject().unwrap_or_default().to_owned(),
        reply_to: message
            .reply_to()
            .and_then(|address| address.first())
            .and_then(|addr| addr.address())
            .map(str::to_owned),
        text,
        html,
        links,
    }
}

impl Email {
    /// Checks what every email must be: a subject, links that are web links written
    /// as they are (no entity-escaped slashes), and a sentence after the greeting that
    /// starts with a capital letter, in both parts.
    pub(crate) fn assert_well_formed(&self) {
        assert!(!self.subject.trim().is_empty(), "no subject: {self:#?}");
        assert!(
            !self.html.contains("&#x2f;") && !self.html.contains("&#47;"),
            "entity-escaped slashes in the HTML part:\n{}",
            self.html
        );
        for (href, _) in &self.links {
            assert!(
                href.starts_with("https://") || href.starts_with("http://"),
                "a link that is not a web link: {href:?}"
            );
        }
        let html_text = scraper::Html::parse_document(&self.html)
            .root_element()
            .text()
            .collect::<String>();
        for (part, body) in [("text", self.text.as_str()), ("html", html_text.as_str())] {
            let mut lines = body.lines().map(str::trim).filter(|l| !l.is_empty());
            let greeting = lines
                .find(|line| line.starts_with("Hello"))
                .unwrap_or_else(|| panic!("no greeting in the {part} part:\n{body}"));
            let next = lines.next().unwrap_or_default();
            let first = next.chars().next().unwrap_or(' ');
            assert!(
                first.is_uppercase() || first.is_ascii_digit(),
                "after {greeting:?} the {part} part goes on in lower case: {next:?}"
            );
        }
    }

    /// The href of the link whose text contains `text`.
    fn link(&self, text: &str) -> &str {
        self.links
            .iter()
            .find(|(_, shown)| shown.contains(text))
            .map(|(href, _)| href.as_str())
            .unwrap_or_else(|| panic!("no link {text:?} in {:?}", self.links))
    }
}

/// A cart in `ecommerce.cart_abandoned` with two priced lines, as a shop sends it.
async fn put_abandoned_cart(store: &dealsync::store::Store, id: &str, recovery_url: &str) -> i64 {
    let now = chrono::Utc::now();
    let mut source = SourceDeal::new(id, format!("Checkout {id}"), "cart", "abandoned");
    source.amount = Some(Money::new(42_700, Currency::parse("EUR").unwrap()));
    source.contact_email = EmailAddress::parse("ada@example.com");
    source.contact_name = Some("Ada Lovelace".into());
    source.marketing_consent = Some(true);
    source.created_at = Some(now);
    source.updated_at = Some(now);
    source.recovery_url = Some(recovery_url.to_owned());
    source.line_items = vec![
        LineItem {
            title: "Espresso grinder (Matte black)".into(),
            quantity: 1,
            unit_price_minor: Some(24_900),
            sku: None,
        },
        LineItem {
            title: "Coffee beans 1kg".into(),
            quantity: 2,
            unit_price_minor: Some(8_900),
            sku: None,
        },
    ];
    store
        .upsert_deals(vec![DealUpsert {
            connection: ConnectionName::new("shop"),
            source,
            target: StageRef {
                pipeline: Some(PipelineKey::new("ecommerce")),
                stage: StageKey::new("cart_abandoned"),
            },
            status: DealStatus::Open,
            observed_at: now,
            cause: ChangeCause::Webhook,
        }])
        .await
        .expect("upserting a cart");
    store
        .deal_by_external_id("shop", id)
        .await
        .unwrap()
        .expect("the cart just written")
        .id
}

/// Every rule the shipped templates serve, far enough out that previews come first.
const RULES: &str = r#"
[followups.carts]
kind = "marketing"
stage = "ecommerce.cart_abandoned"
steps = [
  { after = "1h", template = "cart_reminder" },
  { after = "2h", template = "cart_reminder" },
  { after = "3h", template = "cart_discount", discount_code = "SAVE10" },
]

[followups.stalled]
kind = "transactional"
stage = "sales.proposal"
to = "owner"
template = "deal_stalled"
after = "1h"

[followups.thanks]
kind = "transactional"
stage = "sales.won"
to = "contact"
template = "post_sale"
after = "1h"

[followups.digest]
kind = "transactional"
stage = ["sales.proposal"]
to = "owner"
after = "1h"
template = "owner_digest"
digest = "08:00"
time_zone = "UTC"

[followups.review]
kind = "transactional"
to = "sales-ops@example.com"
template = "weekly_review"
review = "monday 08:00"
time_zone = "UTC"
"#;

async fn preview(daemon: &TestDaemon, rule: &str, deal: i64, step: Option<usize>) -> Email {
    let config = daemon.config_path.to_str().unwrap().to_owned();
    let deal = deal.to_string();
    let step = step.map(|s| s.to_string());
    let mut args = vec!["--config", &config, "outbox", "preview", rule, &deal];
    if let Some(step) = &step {
        args.extend(["--step", step]);
    }
    let (code, stdout, stderr) = run_cli(&args, &[]).await;
    assert_eq!(code, 0, "preview {rule} {deal}: {stderr}");
    read(&stdout)
}

#[tokio::test]
async fn every_shipped_template_is_a_readable_mime_email_with_valid_html_and_plain_links() {
    let smtp = SmtpServer::start().await;
    let daemon = TestDaemon::start(&config(&smtp, "", RULES)).await;
    let store = store(&daemon);
    let recovery = "https://shop.example.com/cart/c-1/recover?key=k1&utm_source=dealsync";
    let cart = put_abandoned_cart(&store, "c-1", recovery).await;
    let stalled = put_deal(
        &store,
        "d-1",
        "proposal",
        Some(("Alice Owner", "alice@example.com")),
        chrono::Duration::days(10),
        1_250_000,
    )
    .await;
    let won = put_deal(
        &store,
        "d-2",
        "won",
        Some(("Bob Owner", "bob@example.com")),
        chrono::Duration::hours(2),
        990_000,
    )
    .await;

    for step in 1..=3 {
        let email = preview(&daemon, "carts", cart, Some(step)).await;
        email.assert_well_formed();
        // The parser decodes `&amp;`: the link is the shop's URL, character for character.
        let recover = if step == 3 {
            "Complete your order"
        } else {
            "Pick up where you left off"
        };
        assert_eq!(email.link(recover), recovery, "step {step}");
        assert!(email.link("Unsubscribe").contains("/unsubscribe/"));
        for part in [&email.text, &email.html] {
            assert!(part.contains("Espresso grinder (Matte black)"), "{part}");
            assert!(
                part.contains("249.00 EUR"),
                "a line's price, step {step}: {part}"
            );
            assert!(
                part.contains("178.00 EUR"),
                "2 x 89.00, step {step}: {part}"
            );
            assert!(
                part.contains("427.00 EUR"),
                "the total, step {step}: {part}"
            );
        }
        if step == 3 {
            assert!(email.subject.contains("SAVE10"), "{}", email.subject);
            assert!(email.text.contains("SAVE10") && email.html.contains("SAVE10"));
        }
    }

    let alert = preview(&daemon, "stalled", stalled, None).await;
    alert.assert_well_formed();
    // Stage labels, as the pipeline names them, not keys.
    assert!(
        alert.subject.contains("in Proposal since"),
        "{}",
        alert.subject
    );
    assert!(
        alert.text.contains("out of Proposal since"),
        "{}",
        alert.text
    );
    assert!(alert.html.contains("<em>Proposal</em>"), "{}", alert.html);

    let note = preview(&daemon, "thanks", won, None).await;
    note.assert_well_formed();
    assert_eq!(note.reply_to.as_deref(), Some("bob@example.com"));
    assert!(
        !note.subject.contains("Deal d-2") && !note.text.contains("Deal d-2"),
        "the internal deal title reaches the customer: {note:#?}"
    );
    assert!(note.subject.contains("Bob Owner"), "{}", note.subject);

    let digest = preview(&daemon, "digest", stalled, None).await;
    digest.assert_well_formed();
    assert!(digest.text.contains("Deal d-1") && digest.html.contains("Proposal"));
    assert!(!digest.html.contains("&#x2f;"), "{}", digest.html);

    // The weekly review has no deal of its own: the one named is not read.
    let review = preview(&daemon, "review", stalled, None).await;
    review.assert_well_formed();
    assert!(
        review.subject.starts_with("Pipeline review"),
        "{}",
        review.subject
    );
    for part in [&review.text, &review.html] {
        assert!(
            part.contains("Proposal") && part.contains("Cart recovery"),
            "{part}"
        );
    }
}

/// The Shopify checkout fixture as a consenting shopper's, with its own token, address
/// and recovery URL, updated just now.
fn consenting_checkout(token: &str, email: &str, recovery_url: &str) -> Vec<u8> {
    let mut body = fixture("shopify/webhook-checkouts-create.json");
    let now = chrono::Utc::now().to_rfc3339();
    body["token"] = json!(token);
    body["cart_token"] = json!(format!("cart-{token}"));
    body["created_at"] = json!(now);
    body["updated_at"] = json!(now);
    body["email"] = json!(email);
    body["buyer_accepts_marketing"] = json!(true);
    body["customer"]["email"] = json!(email);
    body["customer"]["email_marketing_consent"]["state"] = json!("subscribed");
    body["abandoned_checkout_url"] = json!(recovery_url);
    serde_json::to_vec(&body).unwrap()
}

#[tokio::test]
async fn a_shopify_cart_email_names_variants_and_prices_and_links_only_web_urls_as_sent() {
    let smtp = SmtpServer::start().await;
    let rules = r#"
[followups.carts]
kind = "marketing"
stage = "ecommerce.cart_abandoned"
steps = [
  { after = "100ms", template = "cart_reminder" },
  { after = "400ms", template = "cart_discount", discount_code = "SAVE10" },
]
"#;
    let daemon = TestDaemon::start(&format!(
        "{}{}",
        config(&smtp, "", rules),
        shopify("shop", "1s")
    ))
    .await;
    let recovery = "https://shop.example.com/548380009/checkouts/c1/recover?key=k%201&from=mail";
    for (token, email, url) in [
        ("c1", "grace@example.com", recovery),
        (
            "c2",
            "linus@example.com",
            "javascript:alert(document.cookie)",
        ),
    ] {
        let body = consenting_checkout(token, email, url);
        let headers = shopify_headers(SHOP_SECRET, "checkouts/create", token, &body);
        let (status, answer) = post(&daemon, "shop", headers, body).await;
        assert_eq!(status, 200, "{answer}");
    }

    let wait = Duration::from_secs(30);
    let grace = eventually("both emails to the first shopper", wait, || async {
        let mails = messages_to(&smtp, "grace@example.com");
        (mails.len() == 2).then_some(mails)
    })
    .await;
    for mail in &grace {
        let email = read(&mail.data);
        email.assert_well_formed();
        // The fixture's two lines: one product in two variants, 199.00 USD each.
        for part in [&email.text, &email.html] {
            assert!(part.contains("IPod Nano - 8GB (Red)"), "{part}");
            assert!(part.contains("IPod Nano - 8GB (Pink)"), "{part}");
            assert!(part.contains("199.00 USD"), "{part}");
        }
        let (href, _) = email
            .links
            .iter()
            .find(|(href, _)| href.contains("/recover"))
            .unwrap_or_else(|| panic!("no recovery link in {:?}", email.links));
        assert_eq!(href, recovery);
    }
    let linus = eventually("both emails to the second shopper", wait, || async {
        let mails = messages_to(&smtp, "linus@example.com");
        (mails.len() == 2).then_some(mails)
    })
    .await;
    for mail in &linus {
        let email = read(&mail.data);
        email.assert_well_formed();
        assert!(
            !email.text.contains("javascript:") && !email.html.contains("javascript:"),
            "a javascript: URL reached the email: {email:#?}"
        );
    }
}

#[tokio::test]
async fn the_shopify_checkout_in_the_docs_gets_a_recovery_email_when_posted_as_written() {
    let docs = include_str!("../../docs/connectors.md");
    let block = docs
        .split("<!-- shopify-checkout-example")
        .nth(1)
        .and_then(|rest| rest.split("```json").nth(1))
        .and_then(|rest| rest.split("```").next())
        .expect("docs/connectors.md shows a Shopify checkout");
    let body = block.trim().as_bytes().to_vec();
    let shopper: serde_json::Value = serde_json::from_slice(&body).expect("the example is JSON");
    let address = shopper["email"].as_str().unwrap().to_owned();

    let smtp = SmtpServer::start().await;
    let rules = r#"
[followups.carts]
kind = "marketing"
stage = "ecommerce.cart_abandoned"
template = "cart_reminder"
after = "100ms"
"#;
    let daemon = TestDaemon::start(&format!(
        "{}{}",
        config(&smtp, "", rules),
        shopify("shop", "1s")
    ))
    .await;
    let headers = shopify_headers(SHOP_SECRET, "checkouts/create", "docs-1", &body);
    let (status, answer) = post(&daemon, "shop", headers, body).await;
    assert_eq!(status, 200, "{answer}");
    let mails = eventually("the recovery email", Duration::from_secs(30), || async {
        let mails = messages_to(&smtp, &address);
        (!mails.is_empty()).then_some(mails)
    })
    .await;
    let email = read(&mails[0].data);
    email.assert_well_formed();
    assert_eq!(
        email.link("Pick up where you left off"),
        shopper["abandoned_checkout_url"].as_str().unwrap()
    );
}
