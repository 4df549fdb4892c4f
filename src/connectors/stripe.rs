//! The `stripe` connector: Checkout Sessions by webhook (`Stripe-Signature`).
//!
//! `checkout.session.completed` is a purchase (or, with `payment_status = unpaid`, a
//! checkout waiting for an asynchronous payment, settled by
//! `checkout.session.async_payment_succeeded|failed`); `checkout.session.expired` is an
//! abandoned cart, with `after_expiration.recovery.url` as its recovery link. The
//! session id is the external id; `client_reference_id` becomes the cart key
//! `ref:<id>`, so a shop that sends its own cart id elsewhere can be matched.

use super::ecommerce::{
    self, ABANDONED, CHECKOUT, NATIVE_PIPELINE, PURCHASED, WebhookShop, bad, currency, email, text,
    text_at, time,
};
use super::{BadRecord, WebhookAction, WebhookEvent};
use crate::config::ConnectionConfig;
use crate::connectors::signature::{DEFAULT_TOLERANCE, Scheme};
use crate::domain::{LineItem, Money, RawRecord, SourceDeal};
use serde_json::Value;

/// The Stripe connector for one connection.
pub struct StripeConnector;

impl StripeConnector {
    /// Builds the connector; errors are (settings key, message).
    pub fn from_config(connection: &ConnectionConfig) -> Result<Self, (String, String)> {
        if let Some(key) = connection.settings.keys().next() {
            return Err((key.clone(), "unknown setting (stripe has none)".to_owned()));
        }
        Ok(StripeConnector)
    }
}

/// Reads a Checkout Session event into a cart; `None` for event types not about carts.
pub fn parse_event(event: &Value) -> Result<Option<SourceDeal>, BadRecord> {
    let kind = event
        .get("type")
        .and_then(Value::as_str)
        .ok_or_else(|| bad(event, None, "event has no type"))?;
    let session = event
        .pointer("/data/object")
        .filter(|s| s.is_object())
        .ok_or_else(|| bad(event, None, "event has no data.object"))?;
    let stage = match kind {
        "checkout.session.completed" => {
            if session.get("payment_status").and_then(Value::as_str) == Some("unpaid") {
                CHECKOUT
            } else {
                PURCHASED
            }
        }
        "checkout.session.async_payment_succeeded" => PURCHASED,
        "checkout.session.async_payment_failed" | "checkout.session.expired" => ABANDONED,
        _ => return Ok(None),
    };
    let id = text(session, "id").ok_or_else(|| bad(event, None, "session has no id"))?;
    let contact_name = text_at(session, "/customer_details/name");
    let title = match &contact_name {
        Some(name) => format!("Checkout of {name}"),
        None => format!("Checkout {}", ecommerce::prefix(&id, 16)),
    };
    let mut deal = SourceDeal::new(&id, title, NATIVE_PIPELINE, stage);
    let money_currency = currency(session.get("currency"));
    deal.amount = match (
        session.get("amount_total").and_then(Value::as_i64),
        money_currency,
    ) {
        (Some(minor), Some(c)) => Some(Money::new(minor, c)),
        (None, _) => None,
        (Some(_), None) => return Err(bad(event, Some(id), "session currency is not usable")),
    };
    deal.contact_email = email(session.pointer("/customer_details/email"))
        .or_else(|| email(session.get("customer_email")));
    deal.contact_name = contact_name;
    deal.marketing_consent = match session
        .pointer("/consent/promotions")
        .and_then(Value::as_str)
    {
        Some("opt_in") => Some(true),
        Some("opt_out") => Some(false),
        _ => None,
    };
    deal.recovery_url = ecommerce::web_url(text_at(session, "/after_expiration/recovery/url"));
    deal.created_at = time(session.get("created"));
    deal.updated_at = time(event.get("created")).or(deal.created_at);
    if let Some(Value::Array(items)) = session.pointer("/line_items/data") {
        deal.line_items = items
            .iter()
            .map(|item| {
                let quantity = item.get("quantity").and_then(Value::as_i64).unwrap_or(1);
                LineItem {
                    title: text(item, "description").unwrap_or_else(|| "item".into()),
                    quantity,
                    unit_price_minor: item
                        .pointer("/price/unit_amount")
                        .and_then(Value::as_i64)
                        .or_else(|| {
                            let total = item.get("amount_total").and_then(Value::as_i64)?;
                            (quantity > 0).then(|| total / quantity)
                        }),
                    sku: text_at(item, "/price/product"),
                }
            })
            .collect();
    }
    deal.cart_keys.push(format!("stripe:session:{id}"));
    if let Some(reference) = text(session, "client_reference_id") {
        deal.cart_keys.push(format!("ref:{reference}"));
    }
    deal.raw = RawRecord::from_value(event);
    Ok(Some(deal))
}

impl WebhookShop for StripeConnector {
    const KIND: &'static str = "stripe";

    fn scheme(&self) -> Scheme {
        Scheme::Stripe {
            tolerance: DEFAULT_TOLERANCE,
        }
    }

    fn actions(&self, event: &WebhookEvent) -> Result<Vec<WebhookAction>, BadRecord> {
        let body = ecommerce::parse_body(&event.body)?;
        Ok(parse_event(&body)?
            .map(|deal| WebhookAction::Upsert(Box::new(deal)))
            .into_iter()
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> Value {
        let path = format!(
            "{}/tests/fixtures/stripe/{name}",
            env!("CARGO_MANIFEST_DIR")
        );
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
    }

    #[test]
    fn an_expired_session_is_an_abandoned_cart_with_its_recovery_url() {
        let deal = parse_event(&fixture("event-checkout-session-expired.json"))
            .unwrap()
            .unwrap();
        assert_eq!(deal.native_stage, ABANDONED);
        assert_eq!(
            deal.recovery_url.as_deref(),
            Some("https://buy.stripe.com/r/test_placeholder_recovery_url")
        );
        assert_eq!(deal.amount.unwrap().minor, 4999);
        assert_eq!(deal.amount.unwrap().currency.as_str(), "USD");
        assert_eq!(
            deal.contact_email.unwrap().as_str(),
            "jenny.rosen@example.com"
        );
        assert!(deal.cart_keys.contains(&"ref:cart_7f3a9c".to_owned()));
    }

    #[test]
    fn a_completed_session_is_a_purchase_and_other_events_are_ignored() {
        let mut event = fixture("event-checkout-session-completed.json");
        let deal = parse_event(&event).unwrap().unwrap();
        assert_eq!(deal.native_stage, PURCHASED);
        event["data"]["object"]["consent"]["promotions"] = Value::String("opt_in".into());
        assert_eq!(
            parse_event(&event).unwrap().unwrap().marketing_consent,
            Some(true)
        );
        event["type"] = Value::String("invoice.paid".into());
        assert!(parse_event(&event).unwrap().is_none());
    }
}
