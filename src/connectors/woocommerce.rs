//! The `woocommerce` connector: orders by webhook (`X-WC-Webhook-Signature`).
//!
//! A WooCommerce order is its own cart: `pending`, `on-hold`, `failed` and
//! `checkout-draft` are a checkout in progress, `processing` and `completed` a purchase,
//! `cancelled` and `refunded` closed. Any other (custom) status is kept as its own
//! native stage, so it shows up as unmapped until the config maps it. `order.deleted`
//! marks the deal deleted. The unsigned ping WooCommerce sends when a webhook is created
//! is answered by the HTTP layer and never reaches the connector.

use super::ecommerce::{
    self, CHECKOUT, CLOSED, NATIVE_PIPELINE, PURCHASED, bad, currency, decimal, email, full_name,
    line_items, text, time,
};
use super::{BadRecord, Connector, ConnectorError, Page, SyncContext, WebhookAction, WebhookEvent};
use crate::config::ConnectionConfig;
use crate::domain::{RawRecord, SourceDeal};
use crate::pipeline::StageMapEntry;
use crate::webhooks::signature::Scheme;
use async_trait::async_trait;
use serde_json::Value;

/// The WooCommerce connector for one connection.
pub struct WooCommerceConnector;

impl WooCommerceConnector {
    /// Builds the connector; errors are (settings key, message).
    pub fn from_config(connection: &ConnectionConfig) -> Result<Self, (String, String)> {
        if let Some(key) = connection.settings.keys().next() {
            return Err((
                key.clone(),
                "unknown setting (woocommerce has none)".to_owned(),
            ));
        }
        Ok(WooCommerceConnector)
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

/// Reads an order (REST v3 resource, as webhooks carry it) into a cart.
pub fn parse_order(order: &Value) -> Result<SourceDeal, BadRecord> {
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

#[async_trait]
impl Connector for WooCommerceConnector {
    fn kind(&self) -> &str {
        "woocommerce"
    }

    fn default_pipeline(&self) -> Option<&str> {
        Some(ecommerce::PIPELINE)
    }

    fn default_mappings(&self) -> Vec<StageMapEntry> {
        ecommerce::default_mappings()
    }

    fn polls(&self) -> bool {
        false
    }

    async fn fetch_page(
        &self,
        _cx: &SyncContext,
        _cursor: Option<&serde_json::Value>,
    ) -> Result<Page, ConnectorError> {
        Ok(Page::empty())
    }

    fn webhook_scheme(&self) -> Option<Scheme> {
        Some(Scheme::WooCommerce)
    }

    fn parse_webhook(&self, event: &WebhookEvent) -> Result<Vec<WebhookAction>, BadRecord> {
        let body = ecommerce::parse_body(&event.body)?;
        match event.topic.as_deref().unwrap_or_default() {
            "order.created" | "order.updated" | "order.restored" => {
                Ok(vec![WebhookAction::Upsert(Box::new(parse_order(&body)?))])
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

    #[test]
    fn an_order_becomes_a_cart_in_the_stage_its_status_says() {
        let path = format!(
            "{}/tests/fixtures/woocommerce/order-retrieve.json",
            env!("CARGO_MANIFEST_DIR")
        );
        let mut order: Value =
            serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        let deal = parse_order(&order).unwrap();
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
            assert_eq!(parse_order(&order).unwrap().native_stage, stage);
        }
    }
}
