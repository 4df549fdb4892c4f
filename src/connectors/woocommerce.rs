//! The `woocommerce` connector: orders by webhook (`X-WC-Webhook-Signature`).
//!
//! A WooCommerce order is its own cart: `pending`, `on-hold`, `failed` and
//! `checkout-draft` are a checkout in progress, `processing` and `completed` a purchase,
//! `cancelled` and `refunded` closed. Any other (custom) status is kept as its own
//! native stage, so it shows up as unmapped until the config maps it. `order.deleted`
//! marks the deal deleted. The unsigned ping WooCommerce sends when a webhook is created
//! is answered by the HTTP layer and never reaches the connector.

use super::ecommerce::{
    self, CHECKOUT, CLOSED, ConsentField, NATIVE_PIPELINE, PURCHASED, WebhookShop, bad, currency,
    decimal, email, full_name, line_items, text, time,
};
use super::{BadRecord, WebhookAction, WebhookEvent};
use crate::config::ConnectionConfig;
use crate::connectors::signature::Scheme;
use crate::domain::{RawRecord, SourceDeal};
use serde_json::Value;

/// Where consent is read when the connection does not say: Mailchimp for
/// WooCommerce's order meta, the only consent plugin that writes to the order.
pub const DEFAULT_CONSENT: &str = "meta:mailchimp_woocommerce_is_subscribed";

/// The WooCommerce connector for one connection.
pub struct WooCommerceConnector {
    /// Where the shopper's marketing consent is read (`settings.consent`).
    consent: Vec<ConsentField>,
}

impl WooCommerceConnector {
    /// Builds the connector; errors are (settings key, message).
    pub fn from_config(connection: &ConnectionConfig) -> Result<Self, (String, String)> {
        let mut consent = vec![ConsentField::parse(DEFAULT_CONSENT).expect("a valid default")];
        for (key, value) in &connection.settings {
            match key.as_str() {
                "consent" => {
                    consent = ecommerce::consent_fields(value).map_err(|m| (key.clone(), m))?;
                }
                _ => {
                    return Err((key.clone(), "unknown setting (known: consent)".to_owned()));
                }
            }
        }
        Ok(WooCommerceConnector { consent })
    }
}

/// The native stage of an order status.
fn stage_of(status: &str) -> &str {
    match status {
        "pending" | "on-hold" | "failed" | "checkout-draft" => CHECKOUT,
        "processing" | "completed" => PURCHASED,
        "cancelled" | "refunded" => CLOSED,
        other => other,
    }
}

/// Reads an order (REST v3 resource, as webhooks carry it) into a cart; consent from
/// the first of `consent` that holds a yes or a no.
pub fn parse_order(order: &Value, consent: &[ConsentField]) -> Result<SourceDeal, BadRecord> {
    let id = text(order, "id").ok_or_else(|| bad(order, None, "order has no id"))?;
    let status = order
        .get("status")
        .and_then(Value::as_str)
        .ok_or_else(|| bad(order, Some(id.clone()), "order has no status"))?;
    let billing = order.get("billing").filter(|b| b.is_object());
    let contact_name = billing.and_then(|b| full_name(b.get("first_name"), b.get("last_name")));
    let title = match &contact_name {
        Some(name) => format!(
            "Order #{} of {name}",
            text(order, "number").unwrap_or(id.clone())
        ),
        None => format!("Order #{}", text(order, "number").unwrap_or(id.clone())),
    };
    let mut deal = SourceDeal::new(&id, title, NATIVE_PIPELINE, stage_of(status));
    let money_currency = currency(order.get("currency"));
    deal.amount = money_currency.and_then(|c| decimal(order.get("total"), c));
    if deal.amount.is_none() && order.get("total").is_some_and(|t| !t.is_null()) {
        return Err(bad(order, Some(id), "total or currency is not usable"));
    }
    deal.contact_email = billing.and_then(|b| email(b.get("email")));
    deal.contact_name = contact_name;
    deal.marketing_consent = ecommerce::consent(order, consent);
    deal.created_at = time(order.get("date_created_gmt"));
    deal.updated_at = time(order.get("date_modified_gmt")).or(deal.created_at);
    // WooCommerce puts a variation's attributes in the item's name already.
    deal.line_items = line_items(
        order.get("line_items"),
        "name",
        None,
        "price",
        money_currency,
    );
    if let Some(key) = text(order, "order_key") {
        deal.cart_keys.push(format!("woocommerce:order_key:{key}"));
    }
    if let Some(hash) = text(order, "cart_hash") {
        deal.cart_keys.push(format!("woocommerce:cart:{hash}"));
    }
    if deal.cart_keys.is_empty() {
        deal.cart_keys.push(format!("woocommerce:order:{id}"));
    }
    deal.raw = RawRecord::from_value(order);
    Ok(deal)
}

/// Refuses an order topic whose `X-WC-Webhook-Resource` names another resource. Neither
/// header is signed (WooCommerce signs the body alone), but WooCommerce always sends
/// the two in agreement, so a disagreement is a delivery someone altered.
fn check_resource(event: &WebhookEvent, body: &Value, topic: &str) -> Result<(), BadRecord> {
    let resource = event
        .headers
        .iter()
        .find(|(name, _)| name.eq_ignore_ascii_case("x-wc-webhook-resource"))
        .map(|(_, value)| value.as_str());
    match resource {
        Some(resource) if resource != "order" => Err(bad(
            body,
            text(body, "id"),
            format!("topic {topic} contradicts the X-WC-Webhook-Resource header {resource:?}"),
        )),
        _ => Ok(()),
    }
}

/// Fields only a subscription (WooCommerce Subscriptions) has beside an order's.
const SUBSCRIPTION_FIELDS: &[&str] = &["billing_period", "billing_interval"];

/// Refuses an order topic whose body is not an order: the topic header is not signed,
/// so a captured product, customer or subscription body could otherwise be sent again
/// as `order.updated` and be stored as a cart. A REST v3 order always has `order_key`.
fn check_order_body(body: &Value, topic: &str) -> Result<(), BadRecord> {
    let problem = if text(body, "order_key").is_none() {
        Some("it has no order_key".to_owned())
    } else {
        SUBSCRIPTION_FIELDS
            .iter()
            .find(|field| body.get(**field).is_some_and(|value| !value.is_null()))
            .map(|field| format!("it has {field}, a subscription's field"))
    };
    match problem {
        Some(problem) => Err(bad(
            body,
            text(body, "id"),
            format!("topic {topic} contradicts the body: {problem}, so it is not an order"),
        )),
        None => Ok(()),
    }
}

impl WebhookShop for WooCommerceConnector {
    const KIND: &'static str = "woocommerce";

    fn scheme(&self) -> Scheme {
        Scheme::WooCommerce
    }

    fn actions(&self, event: &WebhookEvent) -> Result<Vec<WebhookAction>, BadRecord> {
        let body = ecommerce::parse_body(&event.body)?;
        let topic = event.topic.as_deref().unwrap_or_default();
        if topic.starts_with("order.") {
            check_resource(event, &body, topic)?;
        }
        match topic {
            "order.created" | "order.updated" | "order.restored" => {
                check_order_body(&body, topic)?;
                Ok(vec![WebhookAction::Upsert(Box::new(parse_order(
                    &body,
                    &self.consent,
                )?))])
            }
            "order.deleted" => {
                let id = text(&body, "id").ok_or_else(|| bad(&body, None, "deletion has no id"))?;
                Ok(vec![WebhookAction::Delete { external_id: id }])
            }
            _ => Ok(Vec::new()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::connectors::Connector;

    fn order_fixture() -> Value {
        let path = format!(
            "{}/tests/fixtures/woocommerce/order-retrieve.json",
            env!("CARGO_MANIFEST_DIR")
        );
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
    }

    fn event(topic: &str, resource: Option<&str>, body: &Value) -> WebhookEvent {
        WebhookEvent {
            connection: "woo".into(),
            delivery_id: "d".into(),
            topic: Some(topic.into()),
            headers: resource
                .map(|r| vec![("x-wc-webhook-resource".to_owned(), r.to_owned())])
                .unwrap_or_default(),
            body: serde_json::to_vec(body).unwrap(),
            received_at: chrono::Utc::now(),
        }
    }

    #[test]
    fn an_order_topic_with_a_body_or_resource_that_is_no_order_is_refused() {
        let connector = WooCommerceConnector {
            consent: vec![ConsentField::parse(DEFAULT_CONSENT).unwrap()],
        };
        let order = order_fixture();
        assert!(
            connector
                .parse_webhook(&event("order.updated", Some("order"), &order))
                .is_ok()
        );
        let refused = connector
            .parse_webhook(&event("order.updated", Some("product"), &order))
            .unwrap_err();
        assert!(
            refused.reason.contains("X-WC-Webhook-Resource"),
            "{}",
            refused.reason
        );
        let product = serde_json::json!({"id": 794, "name": "Premium Quality", "status": "publish", "price": "21.99"});
        let refused = connector
            .parse_webhook(&event("order.created", None, &product))
            .unwrap_err();
        assert!(refused.reason.contains("order_key"), "{}", refused.reason);
        let mut subscription = order.clone();
        subscription["billing_period"] = serde_json::json!("month");
        let refused = connector
            .parse_webhook(&event("order.updated", None, &subscription))
            .unwrap_err();
        assert!(
            refused.reason.contains("billing_period"),
            "{}",
            refused.reason
        );
    }

    #[test]
    fn an_order_becomes_a_cart_in_the_stage_its_status_says() {
        let mut order = order_fixture();
        let default = [ConsentField::parse(DEFAULT_CONSENT).unwrap()];
        let deal = parse_order(&order, &default).unwrap();
        assert_eq!(deal.external_id.as_str(), "727");
        assert_eq!(deal.native_stage, PURCHASED);
        assert_eq!(deal.amount.unwrap().minor, 2935);
        assert_eq!(deal.contact_email.unwrap().as_str(), "john.doe@example.com");
        assert_eq!(
            deal.cart_keys,
            ["woocommerce:order_key:wc_order_58d2d042d1d"]
        );
        for (status, stage) in [
            ("pending", CHECKOUT),
            ("failed", CHECKOUT),
            ("cancelled", CLOSED),
            ("completed", PURCHASED),
            ("wc-custom", "wc-custom"),
        ] {
            order["status"] = Value::String(status.into());
            assert_eq!(parse_order(&order, &default).unwrap().native_stage, stage);
        }
        // The stock order carries no consent plugin's meta: no consent.
        assert_eq!(deal.marketing_consent, None);
    }

    #[test]
    fn consent_comes_from_the_mailchimp_meta_key_by_default_or_where_the_setting_says() {
        let path = format!(
            "{}/tests/fixtures/woocommerce/order-meta-data-consent.json",
            env!("CARGO_MANIFEST_DIR")
        );
        let mut order: Value =
            serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        let default = [ConsentField::parse(DEFAULT_CONSENT).unwrap()];
        assert_eq!(
            parse_order(&order, &default).unwrap().marketing_consent,
            Some(true)
        );
        order["meta_data"][0]["value"] = Value::String("0".into());
        assert_eq!(
            parse_order(&order, &default).unwrap().marketing_consent,
            Some(false)
        );
        let sms = [ConsentField::parse("meta:mailchimp_woocommerce_sms_subscribed").unwrap()];
        assert_eq!(
            parse_order(&order, &sms).unwrap().marketing_consent,
            Some(true)
        );
    }
}
