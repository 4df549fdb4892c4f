//! The `webhook` connector: generic JSON deliveries signed per Standard Webhooks
//! (`webhook-id`, `webhook-timestamp`, `webhook-signature`).
//!
//! Where each field sits in the payload is configured with JSON pointers in the
//! connection's `settings` (defaults in [`Fields::default`]); the native stage read from
//! `stage` is mapped like any source's (`stage_map`), with the e-commerce native stages
//! (`checkout`, `abandoned`, `purchased`, `closed`) mapped by default. A payload whose
//! `type` ends in `.deleted` marks the record deleted. When the connection's pipeline is
//! `ecommerce` (the default) records are carts; `cart_key` names a merchant reference
//! that becomes the cart key `ref:<value>`, shared with Stripe's `client_reference_id`.

use super::ecommerce::{
    self, ConsentField, NATIVE_PIPELINE, WebhookShop, bad, currency, decimal, email, text_at, time,
};
use super::{BadRecord, WebhookAction, WebhookEvent};
use crate::config::ConnectionConfig;
use crate::connectors::signature::{DEFAULT_TOLERANCE, Scheme};
use crate::domain::{RawRecord, SourceDeal};
use serde_json::Value;

/// JSON pointers to each field of a record.
#[derive(Debug, Clone, PartialEq)]
pub struct Fields {
    pub id: String,
    pub stage: String,
    pub title: String,
    pub amount: String,
    pub currency: String,
    pub email: String,
    pub name: String,
    pub recovery_url: String,
    /// Where consent is read: pointers (or `meta:KEY`), tried in order.
    pub consent: Vec<ConsentField>,
    pub created_at: String,
    pub updated_at: String,
    pub cart_key: String,
}

impl Default for Fields {
    fn default() -> Self {
        let at = |field: &str| format!("/data/{field}");
        Fields {
            id: at("id"),
            stage: at("stage"),
            title: at("title"),
            amount: at("amount"),
            currency: at("currency"),
            email: at("email"),
            name: at("name"),
            recovery_url: at("recovery_url"),
            consent: vec![ConsentField::Pointer(at("marketing_consent"))],
            created_at: at("created_at"),
            updated_at: at("updated_at"),
            cart_key: at("cart_id"),
        }
    }
}

/// The generic JSON connector for one connection.
pub struct GenericConnector {
    connection: String,
    fields: Fields,
    carts: bool,
}

impl GenericConnector {
    /// Builds the connector; errors are (settings key, message).
    pub fn from_config(connection: &ConnectionConfig) -> Result<Self, (String, String)> {
        let mut fields = Fields::default();
        for (key, value) in &connection.settings {
            if key == "consent" {
                fields.consent =
                    ecommerce::consent_fields(value).map_err(|message| (key.clone(), message))?;
                continue;
            }
            let pointer = value
                .as_str()
                .filter(|p| p.is_empty() || p.starts_with('/'))
                .ok_or_else(|| {
                    (
                        key.clone(),
                        "expected a JSON pointer like \"/data/id\"".to_owned(),
                    )
                })?
                .to_owned();
            let slot = match key.as_str() {
                "id" => &mut fields.id,
                "stage" => &mut fields.stage,
                "title" => &mut fields.title,
                "amount" => &mut fields.amount,
                "currency" => &mut fields.currency,
                "email" => &mut fields.email,
                "name" => &mut fields.name,
                "recovery_url" => &mut fields.recovery_url,
                "created_at" => &mut fields.created_at,
                "updated_at" => &mut fields.updated_at,
                "cart_key" => &mut fields.cart_key,
                other => {
                    return Err((
                        other.to_owned(),
                        "unknown setting (known: id, stage, title, amount, currency, email, name, \
                         recovery_url, consent, created_at, updated_at, cart_key)"
                            .to_owned(),
                    ));
                }
            };
            *slot = pointer;
        }
        Ok(GenericConnector {
            connection: connection.name.to_string(),
            fields,
            carts: connection
                .pipeline
                .as_ref()
                .is_none_or(|p| p.as_str() == ecommerce::PIPELINE),
        })
    }

    /// Reads one payload into a record.
    pub fn parse(&self, payload: &Value) -> Result<SourceDeal, BadRecord> {
        let f = &self.fields;
        let id = text_at(payload, &f.id)
            .ok_or_else(|| bad(payload, None, format!("no id at {}", f.id)))?;
        let stage = text_at(payload, &f.stage).ok_or_else(|| {
            bad(
                payload,
                Some(id.clone()),
                format!("no stage at {}", f.stage),
            )
        })?;
        let title = text_at(payload, &f.title).unwrap_or_else(|| format!("Record {id}"));
        let mut deal = SourceDeal::new(&id, title, NATIVE_PIPELINE, stage);
        let money_currency = currency(payload.pointer(&f.currency));
        if let Some(amount) = payload.pointer(&f.amount).filter(|a| !a.is_null()) {
            let money = money_currency.and_then(|c| decimal(Some(amount), c));
            if money.is_none() {
                return Err(bad(
                    payload,
                    Some(id),
                    format!(
                        "amount at {} needs a decimal and a currency at {}",
                        f.amount, f.currency
                    ),
                ));
            }
            deal.amount = money;
        }
        deal.contact_email = email(payload.pointer(&f.email));
        deal.contact_name = text_at(payload, &f.name);
        deal.recovery_url = super::ecommerce::web_url(text_at(payload, &f.recovery_url));
        deal.marketing_consent = ecommerce::consent(payload, &f.consent);
        deal.created_at = time(payload.pointer(&f.created_at));
        deal.updated_at = time(payload.pointer(&f.updated_at)).or(deal.created_at);
        if self.carts {
            deal.cart_keys
                .push(format!("webhook:{}:{id}", self.connection));
            if let Some(reference) = text_at(payload, &f.cart_key) {
                deal.cart_keys.push(format!("ref:{reference}"));
            }
        }
        deal.raw = RawRecord::from_value(payload);
        Ok(deal)
    }
}

impl WebhookShop for GenericConnector {
    const KIND: &'static str = "webhook";

    fn scheme(&self) -> Scheme {
        Scheme::StandardWebhooks {
            tolerance: DEFAULT_TOLERANCE,
        }
    }

    fn actions(&self, event: &WebhookEvent) -> Result<Vec<WebhookAction>, BadRecord> {
        let payload = ecommerce::parse_body(&event.body)?;
        let deleted = payload
            .get("type")
            .and_then(Value::as_str)
            .is_some_and(|kind| kind.ends_with(".deleted"));
        if deleted {
            let id = text_at(&payload, &self.fields.id)
                .ok_or_else(|| bad(&payload, None, format!("no id at {}", self.fields.id)))?;
            return Ok(vec![WebhookAction::Delete { external_id: id }]);
        }
        Ok(vec![WebhookAction::Upsert(Box::new(self.parse(&payload)?))])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn connector(settings: toml::Table) -> GenericConnector {
        GenericConnector {
            connection: "hooks".into(),
            fields: {
                let mut fields = Fields::default();
                if let Some(id) = settings.get("id").and_then(|v| v.as_str()) {
                    fields.id = id.to_owned();
                }
                fields
            },
            carts: true,
        }
    }

    #[test]
    fn fields_are_read_where_the_pointers_say() {
        let payload = json!({"type": "cart.updated", "data": {
            "id": 17, "stage": "checkout", "amount": "12.50", "currency": "eur",
            "email": "a@example.com", "cart_id": "c-9", "marketing_consent": true,
            "updated_at": "2026-01-01T10:00:00Z"}});
        let deal = connector(toml::Table::new()).parse(&payload).unwrap();
        assert_eq!(deal.external_id.as_str(), "17");
        assert_eq!(deal.amount.unwrap().minor, 1250);
        assert_eq!(deal.marketing_consent, Some(true));
        assert_eq!(deal.cart_keys, ["webhook:hooks:17", "ref:c-9"]);
    }

    #[test]
    fn a_payload_without_the_configured_id_is_a_bad_record() {
        let mut settings = toml::Table::new();
        settings.insert("id".into(), "/cart/id".into());
        let error = connector(settings)
            .parse(&json!({"data": {"id": 1, "stage": "checkout"}}))
            .unwrap_err();
        assert!(error.reason.contains("/cart/id"), "{}", error.reason);
    }
}
