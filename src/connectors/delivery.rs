//! Email providers' bounce and complaint webhooks: the `postmark`, `mailgun` and
//! `sendgrid` connectors. Each takes webhooks only (no polling, no deals); a verified
//! delivery becomes [`WebhookAction::Delivery`] events, which the inbox worker records
//! with their effects (`store::delivery`) in the transaction that settles the row, so a
//! 2xx means the delivery is stored and its effects follow, as for every webhook.
//!
//! Classification: the status code a provider reports decides (`domain::delivery`:
//! 5.7.x is a policy refusal whatever the provider's type says); only without one does
//! the provider's own type (Postmark `Type`, Mailgun `severity`, SendGrid `type`).
//! Events that are not bounces or complaints (deliveries, opens, deferrals, drops) record
//! nothing. The outbox row is named by the Message-ID dealsync set (Mailgun, SendGrid)
//! or an `outbox_id` in the provider's metadata / custom arguments; the store trusts
//! either only when the row's recipient is the reported address.
//!
//! Authentication ([`Connector::webhook_scheme`]): Postmark signs nothing and sends the
//! basic-auth credentials of the webhook URL (`user:password` as the connection's
//! `webhook_secret`, checked like Pipedrive's); Mailgun and SendGrid as in
//! `signature::providers`.

use super::ecommerce::{bad, parse_body};
use super::signature::{DEFAULT_TOLERANCE, Scheme};
use super::{BadRecord, Connector, WebhookAction, WebhookEvent};
use crate::domain::delivery::{DeliveryClass, classify_bounce};
use crate::store::NewDeliveryEvent;
use chrono::{DateTime, Utc};
use serde_json::Value;

/// Which provider a connection receives from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Provider {
    Postmark,
    Mailgun,
    SendGrid,
}

impl Provider {
    /// The connector names, as `connections.NAME.connector` gives them.
    pub const NAMES: &[&str] = &["postmark", "mailgun", "sendgrid"];

    pub fn parse(name: &str) -> Option<Provider> {
        Some(match name {
            "postmark" => Provider::Postmark,
            "mailgun" => Provider::Mailgun,
            "sendgrid" => Provider::SendGrid,
            _ => return None,
        })
    }
}

/// The connector of one provider connection.
pub struct DeliveryConnector {
    provider: Provider,
}

impl DeliveryConnector {
    pub fn new(provider: Provider) -> Self {
        DeliveryConnector { provider }
    }

    /// The events of one verified delivery.
    pub fn events(&self, event: &WebhookEvent) -> Result<Vec<NewDeliveryEvent>, BadRecord> {
        let payload = parse_body(&event.body)?;
        let source = event.connection.to_string();
        let events = match self.provider {
            Provider::Postmark => postmark(&payload, &source, event)?,
            Provider::Mailgun => mailgun(&payload, &source, event)?,
            Provider::SendGrid => sendgrid(&payload, &source, event)?,
        };
        Ok(events.into_iter().flatten().collect())
    }
}

#[async_trait::async_trait]
impl Connector for DeliveryConnector {
    fn kind(&self) -> &str {
        match self.provider {
            Provider::Postmark => "postmark",
            Provider::Mailgun => "mailgun",
            Provider::SendGrid => "sendgrid",
        }
    }

    fn polls(&self) -> bool {
        false
    }

    fn webhook_scheme(&self) -> Option<Scheme> {
        let tolerance = DEFAULT_TOLERANCE;
        Some(match self.provider {
            // Basic auth in the webhook URL, the same check as Pipedrive's.
            Provider::Postmark => Scheme::PipedriveBasic,
            Provider::Mailgun => Scheme::Mailgun { tolerance },
            Provider::SendGrid => Scheme::SendGrid { tolerance },
        })
    }

    fn parse_webhook(&self, event: &WebhookEvent) -> Result<Vec<WebhookAction>, BadRecord> {
        Ok(self
            .events(event)?
            .into_iter()
            .map(|event| WebhookAction::Delivery(Box::new(event)))
            .collect())
    }
}

fn text<'a>(value: &'a Value, pointer: &str) -> Option<&'a str> {
    value
        .pointer(pointer)
        .and_then(Value::as_str)
        .filter(|t| !t.is_empty())
}

/// An outbox id from the provider's metadata: a string or a number.
fn outbox_id(value: &Value, pointer: &str) -> Option<i64> {
    match value.pointer(pointer)? {
        Value::String(text) => text.trim().parse().ok(),
        Value::Number(number) => number.as_i64(),
        _ => None,
    }
}

/// The class from the reported codes, else from the provider's own verdict.
fn class_of(
    status: Option<&str>,
    diagnostic: Option<&str>,
    fallback: DeliveryClass,
) -> (DeliveryClass, Option<String>) {
    match classify_bounce(status, diagnostic) {
        Some((class, code)) => (class, Some(code)),
        None => (fallback, None),
    }
}

#[allow(clippy::too_many_arguments)]
fn new_event(
    key: String,
    source: &str,
    email: &str,
    class: DeliveryClass,
    status: Option<String>,
    detail: Option<&str>,
    outbox_id: Option<i64>,
    message_id: Option<&str>,
    occurred_at: DateTime<Utc>,
) -> NewDeliveryEvent {
    NewDeliveryEvent {
        key,
        source: source.to_owned(),
        email: email.to_owned(),
        class,
        status,
        detail: detail.map(|d| d.chars().take(500).collect()),
        outbox_id,
        message_id: message_id.map(str::to_owned),
        occurred_at,
    }
}

/// Postmark: one object per delivery, `RecordType` `Bounce` or `SpamComplaint`.
fn postmark(
    payload: &Value,
    source: &str,
    event: &WebhookEvent,
) -> Result<Vec<Option<NewDeliveryEvent>>, BadRecord> {
    let record_type = text(payload, "/RecordType").unwrap_or_default();
    let kind = text(payload, "/Type").unwrap_or_default();
    let email = text(payload, "/Email")
        .ok_or_else(|| bad(payload, None, "a Postmark record without Email"))?;
    let id = payload
        .get("ID")
        .map(|id| id.to_string())
        .ok_or_else(|| bad(payload, None, "a Postmark record without ID"))?;
    let occurred_at = text(payload, "/BouncedAt")
        .and_then(|at| DateTime::parse_from_rfc3339(at).ok())
        .map_or(event.received_at, |at| at.with_timezone(&Utc));
    let details = text(payload, "/Details");
    let (class, status) = if record_type == "SpamComplaint" || kind == "SpamComplaint" {
        (DeliveryClass::Complaint, None)
    } else if record_type == "Bounce" {
        let fallback = match kind {
            "HardBounce" | "BadEmailAddress" | "ManuallyDeactivated" => DeliveryClass::Permanent,
            "SoftBounce" | "Transient" | "DnsError" | "AutoResponder" => DeliveryClass::Transient,
            "Unsubscribe" | "Subscribe" | "SpamNotification" | "OpenRelayTest" => {
                return Ok(Vec::new());
            }
            _ => DeliveryClass::Undetermined,
        };
        class_of(None, details, fallback)
    } else {
        return Ok(Vec::new());
    };
    Ok(vec![Some(new_event(
        format!("postmark:{record_type}:{id}"),
        source,
        email,
        class,
        status,
        details.or(Some(kind)),
        outbox_id(payload, "/Metadata/outbox_id"),
        None,
        occurred_at,
    ))])
}

/// Mailgun: `{signature, event-data}`; `failed` (with `severity`) and `complained`.
fn mailgun(
    payload: &Value,
    source: &str,
    event: &WebhookEvent,
) -> Result<Vec<Option<NewDeliveryEvent>>, BadRecord> {
    let data = payload
        .get("event-data")
        .ok_or_else(|| bad(payload, None, "a Mailgun body without event-data"))?;
    let kind = text(data, "/event").unwrap_or_default();
    let email = text(data, "/recipient");
    let occurred_at = data
        .get("timestamp")
        .and_then(Value::as_f64)
        .and_then(|secs| DateTime::from_timestamp_millis((secs * 1000.0) as i64))
        .unwrap_or(event.received_at);
    let (class, status, detail) = match kind {
        "failed" => {
            let fallback = match text(data, "/severity") {
                Some("permanent") => DeliveryClass::Permanent,
                Some("temporary") => DeliveryClass::Transient,
                _ => DeliveryClass::Undetermined,
            };
            let code = data
                .pointer("/delivery-status/code")
                .map(|code| code.to_string());
            let (class, status) = class_of(
                text(data, "/delivery-status/enhanced-code"),
                code.map(|code| format!("smtp; {code}")).as_deref(),
                fallback,
            );
            (class, status, text(data, "/delivery-status/message"))
        }
        "complained" => (DeliveryClass::Complaint, None, None),
        _ => return Ok(Vec::new()),
    };
    let email = email.ok_or_else(|| bad(payload, None, "a Mailgun event without recipient"))?;
    Ok(vec![Some(new_event(
        format!("{}:{email}", event.delivery_id),
        source,
        email,
        class,
        status,
        detail,
        outbox_id(data, "/user-variables/outbox_id"),
        text(data, "/message/headers/message-id"),
        occurred_at,
    ))])
}

/// SendGrid: an array of events; `bounce` (`type` bounce or blocked) and `spamreport`.
fn sendgrid(
    payload: &Value,
    source: &str,
    event: &WebhookEvent,
) -> Result<Vec<Option<NewDeliveryEvent>>, BadRecord> {
    let events = payload.as_array().ok_or_else(|| {
        bad(
            payload,
            None,
            "a SendGrid body that is not an array of events",
        )
    })?;
    let mut found = Vec::new();
    for item in events {
        let kind = text(item, "/event").unwrap_or_default();
        let (class, status) = match kind {
            "bounce" => {
                let fallback = match text(item, "/type") {
                    Some("blocked") => DeliveryClass::Transient,
                    _ => DeliveryClass::Permanent,
                };
                class_of(text(item, "/status"), text(item, "/reason"), fallback)
            }
            "spamreport" => (DeliveryClass::Complaint, None),
            _ => continue,
        };
        let email = text(item, "/email")
            .ok_or_else(|| bad(item, None, "a SendGrid event without email"))?;
        let id = text(item, "/sg_event_id")
            .ok_or_else(|| bad(item, None, "a SendGrid event without sg_event_id"))?;
        let occurred_at = item
            .get("timestamp")
            .and_then(Value::as_i64)
            .and_then(|secs| DateTime::from_timestamp(secs, 0))
            .unwrap_or(event.received_at);
        found.push(Some(new_event(
            format!("sendgrid:{id}"),
            source,
            email,
            class,
            status,
            text(item, "/reason"),
            outbox_id(item, "/outbox_id"),
            text(item, "/smtp-id"),
            occurred_at,
        )));
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::ConnectionName;

    fn delivery(connection: &str, id: &str, body: &str) -> WebhookEvent {
        WebhookEvent {
            connection: ConnectionName::new(connection),
            delivery_id: id.to_owned(),
            topic: None,
            headers: Vec::new(),
            body: body.as_bytes().to_vec(),
            received_at: DateTime::from_timestamp(1_772_446_600, 0).unwrap(),
        }
    }

    fn fixture(name: &str) -> String {
        std::fs::read_to_string(format!(
            "{}/tests/fixtures/bounces/{name}",
            env!("CARGO_MANIFEST_DIR")
        ))
        .unwrap()
    }

    #[test]
    fn a_postmark_hard_bounce_is_permanent_by_its_5_1_1_and_names_its_outbox_row() {
        let connector = DeliveryConnector::new(Provider::Postmark);
        let events = connector
            .events(&delivery(
                "pm",
                "d1",
                &fixture("postmark-bounce-webhook.json"),
            ))
            .unwrap();
        assert_eq!(events.len(), 1);
        let event = &events[0];
        assert_eq!(
            (
                event.email.as_str(),
                event.class,
                event.status.as_deref(),
                event.outbox_id
            ),
            (
                "nobody@example.com",
                DeliveryClass::Permanent,
                Some("5.1.1"),
                Some(9001)
            )
        );
        assert_eq!(event.key, "postmark:Bounce:4323372036854775807");
        assert_eq!(event.source, "pm");
        // The same type with a policy code is a policy refusal.
        let blocked = fixture("postmark-bounce-webhook.json").replace(
            "550 5.1.1 The email account",
            "550 5.7.1 Message rejected for reputation, the email account",
        );
        let events = connector.events(&delivery("pm", "d2", &blocked)).unwrap();
        assert_eq!(events[0].class, DeliveryClass::Policy);
        let complaint = r#"{"RecordType":"SpamComplaint","ID":42,"Type":"SpamComplaint","TypeCode":512,"Email":"jane@example.com","BouncedAt":"2026-03-03T08:01:33Z"}"#;
        let events = connector.events(&delivery("pm", "d3", complaint)).unwrap();
        assert_eq!(events[0].class, DeliveryClass::Complaint);
    }

    #[test]
    fn a_mailgun_permanent_failure_is_read_with_its_message_id_and_a_delivery_is_ignored() {
        let connector = DeliveryConnector::new(Provider::Mailgun);
        let events = connector
            .events(&delivery(
                "mg",
                "mailgun:tok",
                &fixture("mailgun-failed-permanent-webhook.json"),
            ))
            .unwrap();
        assert_eq!(events.len(), 1);
        let event = &events[0];
        assert_eq!(
            (
                event.email.as_str(),
                event.class,
                event.status.as_deref(),
                event.outbox_id
            ),
            (
                "nobody@example.com",
                DeliveryClass::Permanent,
                Some("5.1.1"),
                Some(9001)
            )
        );
        assert_eq!(
            event.message_id.as_deref(),
            Some("dealsync.9001@shop.example")
        );
        let delivered =
            r#"{"signature":{},"event-data":{"event":"delivered","recipient":"a@example.com"}}"#;
        assert!(
            connector
                .events(&delivery("mg", "x", delivered))
                .unwrap()
                .is_empty()
        );
        assert!(connector.events(&delivery("mg", "x", "[1]")).is_err());
    }

    #[test]
    fn a_sendgrid_batch_gives_a_bounce_and_a_complaint() {
        let connector = DeliveryConnector::new(Provider::SendGrid);
        let body = std::fs::read_to_string(format!(
            "{}/tests/fixtures/bounces/sendgrid-events-bounce-batch.json",
            env!("CARGO_MANIFEST_DIR")
        ))
        .unwrap();
        let events = connector.events(&delivery("sg", "d", &body)).unwrap();
        let seen: Vec<_> = events
            .iter()
            .map(|e| {
                (
                    e.email.as_str(),
                    e.class,
                    e.outbox_id,
                    e.message_id.as_deref(),
                )
            })
            .collect();
        assert_eq!(
            seen,
            [
                (
                    "nobody@example.com",
                    DeliveryClass::Permanent,
                    Some(9001),
                    Some("<dealsync.9001@shop.example>")
                ),
                ("jane@example.com", DeliveryClass::Complaint, None, None),
            ]
        );
        assert_eq!(events[0].key, "sendgrid:Ym91bmNlLTAtZGVhbHN5bmM");
    }
}
