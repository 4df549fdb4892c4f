//! Email providers' bounce and complaint webhooks: the `postmark`, `mailgun`,
//! `sendgrid` and `ses` (Amazon SES through SNS) connectors. Each takes webhooks only (no polling, no deals); a verified
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
//! `signature::providers`. SES through SNS: the connection's `webhook_secret` lists the
//! accepted SNS topic ARNs; a delivery from another topic is refused before anything is
//! fetched; the signing certificate is fetched (and kept) only from an SNS host
//! (`https://sns.<region>.amazonaws.com/…pem`), and the subscription is confirmed by
//! GETting its `SubscribeURL` on such a host. `settings.signing_cert_hosts` adds
//! `host:port` pairs on the loopback interface, over plain HTTP: for tests only, never
//! another machine.

use super::ecommerce::{bad, parse_body};
use super::signature::{DEFAULT_TOLERANCE, Scheme, SnsEnvelope, rsa_key_of_certificate};
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
    Ses,
}

impl Provider {
    /// The connector names, as `connections.NAME.connector` gives them.
    pub const NAMES: &[&str] = &["postmark", "mailgun", "sendgrid", "ses"];

    pub fn parse(name: &str) -> Option<Provider> {
        Some(match name {
            "postmark" => Provider::Postmark,
            "mailgun" => Provider::Mailgun,
            "sendgrid" => Provider::SendGrid,
            "ses" => Provider::Ses,
            _ => return None,
        })
    }
}

/// The connector of one provider connection.
pub struct DeliveryConnector {
    provider: Provider,
    sns: Option<Sns>,
}

/// What an SES connection needs for SNS: the accepted topics, where certificates may
/// come from, the client that fetches them and the certificates fetched.
struct Sns {
    topics: Vec<String>,
    /// Loopback `host:port` pairs allowed over plain HTTP (tests).
    test_hosts: Vec<String>,
    client: reqwest::Client,
    /// Certificate URL → RSA key. A std mutex: held for a lookup or an insert, never
    /// across an await.
    keys: std::sync::Mutex<std::collections::HashMap<String, Vec<u8>>>,
}

/// The largest certificate read.
const MAX_CERTIFICATE_BYTES: usize = 64 * 1024;

impl DeliveryConnector {
    pub fn new(provider: Provider) -> Self {
        DeliveryConnector {
            provider,
            sns: None,
        }
    }

    /// Builds the connector of a connection; errors are (settings key, message).
    pub fn from_config(
        provider: Provider,
        connection: &crate::config::ConnectionConfig,
    ) -> Result<Self, (String, String)> {
        let mut test_hosts = Vec::new();
        for (key, value) in &connection.settings {
            match (provider, key.as_str()) {
                (Provider::Ses, "signing_cert_hosts") => {
                    let hosts = value.as_array().ok_or_else(|| {
                        (
                            key.clone(),
                            "expected a list of \"127.0.0.1:PORT\"".to_owned(),
                        )
                    })?;
                    for host in hosts {
                        let host = host
                            .as_str()
                            .filter(|h| loopback(h))
                            .ok_or_else(|| {
                                (
                                    key.clone(),
                                    "only loopback host:port pairs (tests); SNS certificates otherwise come from sns.<region>.amazonaws.com".to_owned(),
                                )
                            })?;
                        test_hosts.push(host.to_owned());
                    }
                }
                _ => {
                    return Err((
                        key.clone(),
                        "unknown setting (ses knows signing_cert_hosts; the others none)"
                            .to_owned(),
                    ));
                }
            }
        }
        let sns = match provider {
            Provider::Ses => Some(Sns {
                topics: connection
                    .webhook_secrets
                    .iter()
                    .map(|topic| topic.expose().to_owned())
                    .collect(),
                test_hosts,
                client: reqwest::Client::builder()
                    .redirect(reqwest::redirect::Policy::none())
                    .timeout(std::time::Duration::from_secs(10))
                    .build()
                    .map_err(|error| ("signing_cert_hosts".to_owned(), error.to_string()))?,
                keys: Default::default(),
            }),
            _ => None,
        };
        Ok(DeliveryConnector { provider, sns })
    }

    /// The events of one verified delivery.
    pub fn events(&self, event: &WebhookEvent) -> Result<Vec<NewDeliveryEvent>, BadRecord> {
        let payload = parse_body(&event.body)?;
        let source = event.connection.to_string();
        let events = match self.provider {
            Provider::Postmark => postmark(&payload, &source, event)?,
            Provider::Mailgun => mailgun(&payload, &source, event)?,
            Provider::SendGrid => sendgrid(&payload, &source, event)?,
            Provider::Ses => ses(&payload, &source, event)?,
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
            Provider::Ses => "ses",
        }
    }

    fn polls(&self) -> bool {
        false
    }

    fn carries_deals(&self) -> bool {
        false
    }

    fn webhook_scheme(&self) -> Option<Scheme> {
        let tolerance = DEFAULT_TOLERANCE;
        Some(match self.provider {
            // Basic auth in the webhook URL, the same check as Pipedrive's.
            Provider::Postmark => Scheme::PipedriveBasic,
            Provider::Mailgun => Scheme::Mailgun { tolerance },
            Provider::SendGrid => Scheme::SendGrid { tolerance },
            Provider::Ses => Scheme::Sns,
        })
    }

    async fn webhook_keys(&self, body: &[u8]) -> Result<Option<Vec<Vec<u8>>>, String> {
        let Some(sns) = &self.sns else {
            return Ok(None);
        };
        let envelope = SnsEnvelope::parse(body).ok_or_else(|| {
            "not an SNS message (JSON with Type, TopicArn, SigningCertURL, …)".to_owned()
        })?;
        if !sns.topics.contains(&envelope.topic_arn) {
            return Err(format!(
                "topic {} is not among the connection's webhook_secret topic ARNs",
                envelope.topic_arn
            ));
        }
        let url = sns.allowed(&envelope.signing_cert_url, true)?;
        if let Some(key) = sns.cached(url.as_str()) {
            return Ok(Some(vec![key]));
        }
        let response = sns
            .client
            .get(url.clone())
            .send()
            .await
            .map_err(|error| format!("fetching the signing certificate {url}: {error}"))?;
        if !response.status().is_success() {
            return Err(format!(
                "fetching the signing certificate {url}: HTTP {}",
                response.status()
            ));
        }
        let pem = response
            .bytes()
            .await
            .map_err(|error| format!("reading the signing certificate {url}: {error}"))?;
        if pem.len() > MAX_CERTIFICATE_BYTES {
            return Err(format!("the signing certificate {url} is too large"));
        }
        let key = rsa_key_of_certificate(&pem)
            .map_err(|error| format!("the signing certificate {url}: {error}"))?;
        sns.keep(url.as_str(), key.clone());
        Ok(Some(vec![key]))
    }

    async fn confirm_subscription(
        &self,
        _cx: &super::SyncContext,
        url: &str,
    ) -> Result<(), super::ConnectorError> {
        let bad = |reason: String| super::ConnectorError::BadResponse {
            vendor: "sns".to_owned(),
            reason,
        };
        let sns = self
            .sns
            .as_ref()
            .ok_or_else(|| bad("not an SNS connection".to_owned()))?;
        let url = sns.allowed(url, false).map_err(bad)?;
        let response = sns.client.get(url.clone()).send().await.map_err(|error| {
            super::ConnectorError::Transient {
                vendor: "sns".to_owned(),
                reason: format!("confirming the subscription: {error}"),
                retry_after: None,
            }
        })?;
        if response.status().is_success() {
            Ok(())
        } else {
            Err(super::ConnectorError::Transient {
                vendor: "sns".to_owned(),
                reason: format!("confirming the subscription: HTTP {}", response.status()),
                retry_after: None,
            })
        }
    }

    fn parse_webhook(&self, event: &WebhookEvent) -> Result<Vec<WebhookAction>, BadRecord> {
        if let Some(sns) = &self.sns {
            let payload = parse_body(&event.body)?;
            let envelope = SnsEnvelope::parse(&event.body)
                .ok_or_else(|| bad(&payload, None, "not an SNS message"))?;
            match envelope.kind.as_str() {
                "SubscriptionConfirmation" => {
                    let url = envelope.subscribe_url.unwrap_or_default();
                    sns.allowed(&url, false)
                        .map_err(|reason| bad(&payload, None, reason))?;
                    return Ok(vec![WebhookAction::ConfirmSubscription { url }]);
                }
                "Notification" => {}
                _ => return Ok(Vec::new()),
            }
        }
        Ok(self
            .events(event)?
            .into_iter()
            .map(|event| WebhookAction::Delivery(Box::new(event)))
            .collect())
    }
}

/// Whether `host_port` is `127.x.x.x:PORT` or `[::1]:PORT`.
fn loopback(host_port: &str) -> bool {
    host_port
        .parse::<std::net::SocketAddr>()
        .is_ok_and(|address| address.ip().is_loopback())
}

impl Sns {
    /// `text` as a URL dealsync may fetch: HTTPS on an SNS host
    /// (`sns.<region>.amazonaws.com`, a `.pem` path for a certificate), or a test host.
    fn allowed(&self, text: &str, certificate: bool) -> Result<url::Url, String> {
        let refuse =
            || format!("{text} is not on an SNS host (https://sns.<region>.amazonaws.com/)");
        let url = url::Url::parse(text).map_err(|_| refuse())?;
        let host = url.host_str().unwrap_or_default();
        let port = url.port_or_known_default().unwrap_or_default();
        let region = host
            .strip_prefix("sns.")
            .and_then(|rest| {
                rest.strip_suffix(".amazonaws.com")
                    .or_else(|| rest.strip_suffix(".amazonaws.com.cn"))
            })
            .filter(|region| {
                !region.is_empty()
                    && region
                        .bytes()
                        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            });
        let aws = url.scheme() == "https" && region.is_some() && url.username().is_empty();
        let test = url.scheme() == "http"
            && self.test_hosts.iter().any(|allowed| {
                *allowed == format!("{host}:{port}") || *allowed == format!("[{host}]:{port}")
            });
        if !(aws || test) || (certificate && !url.path().ends_with(".pem")) {
            return Err(refuse());
        }
        Ok(url)
    }

    fn cached(&self, url: &str) -> Option<Vec<u8>> {
        self.keys.lock().ok()?.get(url).cloned()
    }

    fn keep(&self, url: &str, key: Vec<u8>) {
        if let Ok(mut keys) = self.keys.lock() {
            keys.insert(url.to_owned(), key);
        }
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
        "delivered" => (DeliveryClass::Delivered, None, None),
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
            "delivered" => (DeliveryClass::Delivered, None),
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

/// SES through SNS: the envelope's `Message` is the SES notification as a string;
/// `Bounce` (`bounceType`: Permanent, Transient, Undetermined) and `Complaint`.
fn ses(
    payload: &Value,
    source: &str,
    event: &WebhookEvent,
) -> Result<Vec<Option<NewDeliveryEvent>>, BadRecord> {
    let message = text(payload, "/Message")
        .ok_or_else(|| bad(payload, None, "an SNS notification without Message"))?;
    let notification: Value = serde_json::from_str(message).map_err(|_| {
        bad(
            payload,
            None,
            "the SNS Message is not the SES notification JSON",
        )
    })?;
    let kind = text(&notification, "/notificationType")
        .or_else(|| text(&notification, "/eventType"))
        .unwrap_or_default();
    let message_id = text(&notification, "/mail/commonHeaders/messageId");
    let at = |pointer: &str| {
        text(&notification, pointer)
            .and_then(|at| DateTime::parse_from_rfc3339(at).ok())
            .map_or(event.received_at, |at| at.with_timezone(&Utc))
    };
    let mut found = Vec::new();
    match kind {
        "Delivery" => {
            let recipients = notification
                .pointer("/delivery/recipients")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default();
            let mail_id = text(&notification, "/mail/messageId").unwrap_or_default();
            for email in recipients.iter().filter_map(Value::as_str) {
                found.push(Some(new_event(
                    format!("ses:delivery:{mail_id}:{}", email.to_lowercase()),
                    source,
                    email,
                    DeliveryClass::Delivered,
                    None,
                    None,
                    None,
                    message_id,
                    at("/delivery/timestamp"),
                )));
            }
        }
        "Bounce" => {
            let fallback = match text(&notification, "/bounce/bounceType") {
                Some("Permanent") => DeliveryClass::Permanent,
                Some("Transient") => DeliveryClass::Transient,
                _ => DeliveryClass::Undetermined,
            };
            let feedback = text(&notification, "/bounce/feedbackId").unwrap_or_default();
            let recipients = notification
                .pointer("/bounce/bouncedRecipients")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default();
            for recipient in &recipients {
                let Some(email) = text(recipient, "/emailAddress") else {
                    continue;
                };
                let diagnostic = text(recipient, "/diagnosticCode");
                let (class, status) = class_of(text(recipient, "/status"), diagnostic, fallback);
                found.push(Some(new_event(
                    format!("ses:{feedback}:{}", email.to_lowercase()),
                    source,
                    email,
                    class,
                    status,
                    diagnostic,
                    None,
                    message_id,
                    at("/bounce/timestamp"),
                )));
            }
        }
        "Complaint" => {
            let feedback_type = text(&notification, "/complaint/complaintFeedbackType");
            if feedback_type == Some("not-spam") {
                return Ok(Vec::new());
            }
            let feedback = text(&notification, "/complaint/feedbackId").unwrap_or_default();
            let recipients = notification
                .pointer("/complaint/complainedRecipients")
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default();
            for recipient in &recipients {
                let Some(email) = text(recipient, "/emailAddress") else {
                    continue;
                };
                found.push(Some(new_event(
                    format!("ses:{feedback}:{}", email.to_lowercase()),
                    source,
                    email,
                    DeliveryClass::Complaint,
                    None,
                    feedback_type,
                    None,
                    message_id,
                    at("/complaint/timestamp"),
                )));
            }
        }
        _ => {}
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

    /// Who, what, the status code and the outbox row of an event.
    fn summary(event: &NewDeliveryEvent) -> (&str, DeliveryClass, Option<&str>, Option<i64>) {
        (
            event.email.as_str(),
            event.class,
            event.status.as_deref(),
            event.outbox_id,
        )
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
            summary(event),
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
    fn a_mailgun_permanent_failure_is_read_with_its_message_id_and_a_delivery_counted() {
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
            summary(event),
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
        let events = connector.events(&delivery("mg", "x", delivered)).unwrap();
        assert_eq!(events[0].class, DeliveryClass::Delivered);
        let opened = delivered.replace("delivered", "opened");
        assert!(
            connector
                .events(&delivery("mg", "x", &opened))
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

    fn ses_connection(settings: &str) -> crate::config::ConnectionConfig {
        let text = format!(
            "[connections.ses]\nconnector = \"ses\"\nwebhook_secret = \"arn:aws:sns:eu-west-1:1:t\"\n{settings}"
        );
        let config = crate::config::testing::parse_in(std::path::Path::new(""), &text)
            .expect("a valid config");
        config.connections[0].clone()
    }

    #[test]
    fn sns_certificates_come_only_from_sns_hosts_or_a_configured_loopback_test_host() {
        let connector = DeliveryConnector::from_config(
            Provider::Ses,
            &ses_connection(
                "[connections.ses.settings]\nsigning_cert_hosts = [\"127.0.0.1:4567\"]",
            ),
        )
        .unwrap();
        let sns = connector.sns.as_ref().unwrap();
        let allowed = |url: &str| sns.allowed(url, true).is_ok();
        assert!(allowed(
            "https://sns.eu-west-1.amazonaws.com/SimpleNotificationService-abc.pem"
        ));
        assert!(allowed(
            "https://sns.cn-north-1.amazonaws.com.cn/SimpleNotificationService-abc.pem"
        ));
        assert!(allowed("http://127.0.0.1:4567/cert.pem"));
        for refused in [
            "http://sns.eu-west-1.amazonaws.com/SimpleNotificationService-abc.pem",
            "https://sns.eu-west-1.amazonaws.com.evil.example/cert.pem",
            "https://evil.example/sns.eu-west-1.amazonaws.com/cert.pem",
            "https://sns.eu-west-1.amazonaws.com/not-a-certificate",
            "https://user@sns.eu-west-1.amazonaws.com/cert.pem",
            "http://127.0.0.1:4568/cert.pem",
            "not a url",
        ] {
            assert!(!allowed(refused), "{refused}");
        }
        let error = DeliveryConnector::from_config(
            Provider::Ses,
            &ses_connection("[connections.ses.settings]\nsigning_cert_hosts = [\"192.0.2.1:443\"]"),
        )
        .err()
        .expect("a host off the loopback interface is refused");
        assert!(error.1.contains("only loopback"), "{error:?}");
    }

    #[test]
    fn an_ses_complaint_notification_is_a_complaint_with_its_feedback_type() {
        let connector = DeliveryConnector::new(Provider::Ses);
        let message = fixture("ses-complaint-abuse.json");
        let envelope = serde_json::json!({ "Type": "Notification", "Message": message });
        let events = connector
            .events(&delivery("ses", "d", &envelope.to_string()))
            .unwrap();
        assert_eq!(events.len(), 1);
        assert_eq!(
            (
                events[0].email.as_str(),
                events[0].class,
                events[0].detail.as_deref()
            ),
            ("jane@example.com", DeliveryClass::Complaint, Some("abuse"))
        );
        assert!(events[0].key.starts_with("ses:0102018e0000cccc"));
    }
}
