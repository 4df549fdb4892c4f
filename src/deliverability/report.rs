//! Reading bounce emails: delivery status notifications (RFC 3464 in an RFC 6522
//! `multipart/report; report-type=delivery-status`) and complaint feedback reports
//! (ARF, RFC 5965, `report-type=feedback-report`), parsed with `mail-parser`.
//!
//! Invariants:
//! - Only the machine-readable part is read (`message/delivery-status`,
//!   `message/feedback-report`); a message without one (an autoreply, a bounce written
//!   as prose) is [`ReportError::NotAReport`], never guessed from its text.
//! - A recipient counts as bounced only with `Action: failed`; `delivered` is recorded
//!   as delivered (the figures count it); `delayed` (still trying), `relayed` and
//!   `expanded` record nothing. The class comes from the
//!   status code (`domain::delivery::classify_bounce`).
//! - The outbox row is named by the return path the report was addressed to (VERP) and
//!   by the Message-ID of the returned headers; the store trusts either only when the
//!   row's recipient is the reported one.
//! - An event's key is a digest of the whole report and the recipient, so the same
//!   report fed twice (a relay's retry, `bounces ingest` run again) records once.

use crate::domain::delivery::{DeliveryClass, classify_bounce, decode_return_path};
use crate::store::NewDeliveryEvent;
use chrono::{DateTime, Utc};
use mail_parser::{Address, Message, MessageParser, MimeHeaders};
use sha2::{Digest, Sha256};

/// Why a message yielded no event.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReportError {
    #[error("not an email message (no header could be read)")]
    NotAMessage,
    #[error(
        "not a delivery status notification or complaint report (no message/delivery-status or message/feedback-report part); nothing recorded"
    )]
    NotAReport,
    #[error(
        "the report names no recipient (no Final-Recipient or Original-Rcpt-To, and no return path of ours)"
    )]
    NoRecipient,
}

/// The events one bounce email reports: one per failed recipient, or the complaint.
/// `bounce_address` is `deliverability.return_path`, to read the tag it was sent to;
/// `source` is what the events are recorded as coming from.
pub fn read(
    raw: &[u8],
    bounce_address: Option<&str>,
    source: &str,
    now: DateTime<Utc>,
) -> Result<Vec<NewDeliveryEvent>, ReportError> {
    let message = MessageParser::default()
        .parse(raw)
        .ok_or(ReportError::NotAMessage)?;
    let digest = hex(&Sha256::digest(raw));
    let verp = bounce_address.and_then(|base| {
        envelope_recipients(&message)
            .iter()
            .find_map(|address| decode_return_path(base, address))
    });
    let mut status_part = None;
    let mut feedback_part = None;
    let mut original_message_id = None;
    let mut original_to = None;
    for part in &message.parts {
        if part.is_content_type("message", "delivery-status") {
            status_part.get_or_insert(part.contents());
        } else if part.is_content_type("message", "feedback-report") {
            feedback_part.get_or_insert(part.contents());
        } else if part.is_content_type("text", "rfc822-headers") {
            if let Some(headers) = MessageParser::default().parse_headers(part.contents()) {
                original_message_id =
                    original_message_id.or(headers.message_id().map(str::to_owned));
                original_to = original_to.or_else(|| first_address(headers.to()));
            }
        } else if let Some(original) = part.message() {
            original_message_id = original_message_id.or(original.message_id().map(str::to_owned));
            original_to = original_to.or_else(|| first_address(original.to()));
        }
    }
    let event = |key_part: &str, email: String, class, status, detail| NewDeliveryEvent {
        key: format!("report:{digest}:{key_part}"),
        source: source.to_owned(),
        outbox_id: verp
            .as_ref()
            .filter(|path| path.recipient.eq_ignore_ascii_case(&email))
            .map(|path| path.outbox_id),
        email,
        class,
        status,
        detail,
        message_id: original_message_id.as_deref().map(|id| {
            format!(
                "<{}>",
                id.trim().trim_start_matches('<').trim_end_matches('>')
            )
        }),
        occurred_at: now,
    };
    if let Some(body) = status_part {
        let groups = groups(body);
        if groups.len() < 2 {
            return Err(ReportError::NoRecipient);
        }
        let mut events = Vec::new();
        // The first group is about the message; every later one is one recipient.
        for group in groups.into_iter().skip(1) {
            let field = |name: &str| field(&group, name);
            let Some(action) = field("Action") else {
                continue;
            };
            let delivered = action.eq_ignore_ascii_case("delivered");
            if !action.eq_ignore_ascii_case("failed") && !delivered {
                continue;
            }
            let recipient = field("Final-Recipient")
                .or_else(|| field("Original-Recipient"))
                .map(|value| strip_type(&value))
                .or_else(|| verp.as_ref().map(|path| path.recipient.clone()));
            let Some(recipient) = recipient else { continue };
            let diagnostic = field("Diagnostic-Code");
            let key = recipient.to_lowercase();
            if delivered {
                let status = field("Status");
                events.push(event(
                    &key,
                    recipient,
                    DeliveryClass::Delivered,
                    status,
                    diagnostic,
                ));
                continue;
            }
            let Some((class, code)) =
                classify_bounce(field("Status").as_deref(), diagnostic.as_deref())
            else {
                continue;
            };
            events.push(event(&key, recipient, class, Some(code), diagnostic));
        }
        return Ok(events);
    }
    if let Some(body) = feedback_part {
        let report = groups(body).into_iter().next().unwrap_or_default();
        let feedback_type = field(&report, "Feedback-Type").unwrap_or_else(|| "abuse".to_owned());
        if feedback_type.eq_ignore_ascii_case("not-spam") {
            return Ok(Vec::new());
        }
        let recipient = field(&report, "Original-Rcpt-To")
            .map(|value| strip_type(&value))
            .or_else(|| verp.as_ref().map(|path| path.recipient.clone()))
            .or(original_to)
            .ok_or(ReportError::NoRecipient)?;
        let key = recipient.to_lowercase();
        return Ok(vec![event(
            &key,
            recipient,
            DeliveryClass::Complaint,
            None,
            Some(feedback_type),
        )]);
    }
    Err(ReportError::NotAReport)
}

/// Where the report was delivered: the headers a delivering server records the
/// envelope recipient in, then `To`.
fn envelope_recipients(message: &Message<'_>) -> Vec<String> {
    let mut found = Vec::new();
    for name in ["X-Original-To", "Delivered-To", "Envelope-To"] {
        if let Some(value) = message.header_raw(name) {
            found.push(value.trim().to_owned());
        }
    }
    if let Some(Address::List(list)) = message.to() {
        found.extend(list.iter().filter_map(|a| a.address().map(str::to_owned)));
    }
    found
}

fn first_address(address: Option<&Address<'_>>) -> Option<String> {
    address?.first()?.address().map(str::to_owned)
}

/// The header-style groups of a report body, split at blank lines, each as its
/// (name, unfolded value) fields read by `mail-parser`.
fn groups(body: &[u8]) -> Vec<Vec<(String, String)>> {
    let text = String::from_utf8_lossy(body).replace("\r\n", "\n");
    text.split("\n\n")
        .filter(|group| !group.trim().is_empty())
        .filter_map(|group| {
            let raw = format!("{}\n\n", group.trim_start_matches('\n'));
            let parsed = MessageParser::default().parse_headers(raw.as_bytes())?;
            let fields: Vec<(String, String)> = parsed
                .headers_raw()
                .map(|(name, value)| {
                    let unfolded = value.split_whitespace().collect::<Vec<_>>().join(" ");
                    (name.to_owned(), unfolded)
                })
                .collect();
            (!fields.is_empty()).then_some(fields)
        })
        .collect()
}

fn field(group: &[(String, String)], name: &str) -> Option<String> {
    group
        .iter()
        .find(|(field, _)| field.eq_ignore_ascii_case(name))
        .map(|(_, value)| value.clone())
        .filter(|value| !value.is_empty())
}

/// `rfc822; user@example.com` → `user@example.com`.
fn strip_type(value: &str) -> String {
    let address = value.split_once(';').map_or(value, |(_, rest)| rest);
    address
        .trim()
        .trim_start_matches('<')
        .trim_end_matches('>')
        .to_owned()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    const DSN_TEMPLATE: &str = include_str!("../../tests/fixtures/bounces/dsn-template.eml");
    const ARF_TEMPLATE: &str = include_str!("../../tests/fixtures/bounces/arf-template.eml");

    fn fill(template: &str, fields: &[(&str, &str)]) -> Vec<u8> {
        let mut text = template.to_owned();
        for (name, value) in fields {
            text = text.replace(&format!("${{{name}}}"), value);
        }
        text.into_bytes()
    }

    fn dsn(status: &str, diagnostic: &str, action: &str) -> Vec<u8> {
        fill(
            DSN_TEMPLATE,
            &[
                ("RETURN_PATH", "bounces+42-Ada=example.com@shop.example"),
                ("RECIPIENT", "Ada@example.com"),
                ("ACTION", action),
                ("STATUS", status),
                ("DIAGNOSTIC", diagnostic),
                ("MESSAGE_ID", "<7-stalled-0.dealsync@shop.example>"),
            ],
        )
    }

    fn now() -> DateTime<Utc> {
        DateTime::from_timestamp(1_772_446_566, 0).expect("a valid time")
    }

    #[test]
    fn the_shared_dsn_fixture_reads_as_its_expected_parse() {
        let fixture: serde_json::Value =
            serde_json::from_str(include_str!("../../tests/fixtures/bounces/dsn-5.1.1.json"))
                .unwrap();
        let raw = fixture["raw"].as_str().unwrap();
        let expected = &fixture["expected"];
        let events = read(raw.as_bytes(), Some("bounces@shop.example"), "dsn", now()).unwrap();
        assert_eq!(events.len(), 1);
        let event = &events[0];
        assert_eq!(event.email, expected["recipients"][0]["final_recipient"]);
        assert_eq!(event.class.as_str(), expected["recipients"][0]["class"]);
        assert_eq!(
            event.status.as_deref(),
            expected["recipients"][0]["status"].as_str()
        );
        assert_eq!(
            event.detail.as_deref(),
            expected["recipients"][0]["diagnostic_code"].as_str()
        );
        assert_eq!(
            event.message_id.as_deref(),
            expected["original_message_id"].as_str()
        );
        assert_eq!(
            event.outbox_id.map(|id| id.to_string()).as_deref(),
            expected["verp_outbox_id"].as_str()
        );
        // The same report read again has the same key; another report another.
        let again = read(raw.as_bytes(), None, "dsn", now()).unwrap();
        assert_eq!(again[0].key, event.key);
        assert_eq!(
            again[0].outbox_id, None,
            "no return path configured, no tag read"
        );
    }

    #[test]
    fn each_status_class_is_read_from_the_status_field_not_the_words() {
        let class = |status, diagnostic| {
            read(
                &dsn(status, diagnostic, "failed"),
                Some("bounces@shop.example"),
                "dsn",
                now(),
            )
            .unwrap()
            .iter()
            .map(|e| (e.class, e.status.clone().unwrap_or_default(), e.outbox_id))
            .collect::<Vec<_>>()
        };
        assert_eq!(
            class("5.1.1", "550 5.1.1 user unknown"),
            [(DeliveryClass::Permanent, "5.1.1".to_owned(), Some(42))]
        );
        assert_eq!(
            class("4.2.2", "452 4.2.2 mailbox full"),
            [(DeliveryClass::Transient, "4.2.2".to_owned(), Some(42))]
        );
        // Worded like an unknown user, coded as a policy refusal: a policy refusal.
        assert_eq!(
            class(
                "5.7.1",
                "550 5.7.1 user unknown; message refused for poor reputation"
            ),
            [(DeliveryClass::Policy, "5.7.1".to_owned(), Some(42))]
        );
    }

    #[test]
    fn a_delayed_recipient_records_nothing_and_prose_is_not_a_report() {
        let delayed = read(
            &dsn("4.4.1", "421 try later", "delayed"),
            None,
            "dsn",
            now(),
        )
        .unwrap();
        assert!(delayed.is_empty());
        // A success notification counts as delivered and bounces nothing.
        let delivered = read(
            &dsn("2.0.0", "250 2.0.0 ok", "delivered"),
            None,
            "dsn",
            now(),
        )
        .unwrap();
        assert_eq!(delivered[0].class, DeliveryClass::Delivered);
        let autoreply = b"From: ada@example.com\r\nTo: shop@shop.example\r\nSubject: Out of office\r\n\r\nUser unknown. 550 5.1.1\r\n";
        assert_eq!(
            read(autoreply, None, "dsn", now()),
            Err(ReportError::NotAReport)
        );
        assert_eq!(read(b"", None, "dsn", now()), Err(ReportError::NotAMessage));
    }

    #[test]
    fn a_feedback_report_is_a_complaint_about_the_returned_recipient() {
        let raw = fill(
            ARF_TEMPLATE,
            &[
                ("RETURN_PATH", "bounces+42-jane=example.com@shop.example"),
                ("RECIPIENT", "jane@example.com"),
                ("MESSAGE_ID", "<7-carts-0.dealsync@shop.example>"),
            ],
        );
        let events = read(&raw, Some("bounces@shop.example"), "dsn", now()).unwrap();
        assert_eq!(events.len(), 1);
        assert_eq!(
            (
                events[0].email.as_str(),
                events[0].class,
                events[0].outbox_id
            ),
            ("jane@example.com", DeliveryClass::Complaint, Some(42))
        );
        assert_eq!(events[0].detail.as_deref(), Some("abuse"));
        assert_eq!(
            events[0].message_id.as_deref(),
            Some("<7-carts-0.dealsync@shop.example>")
        );
    }
}
