//! Shared pieces of the e-commerce connectors (Shopify, WooCommerce, Stripe, generic):
//! reading loosely typed vendor JSON into a cart, and the native stages every one of
//! them maps onto the `ecommerce` pipeline.
//!
//! Native stages: each connector reports its carts in native pipeline `cart` with one of
//! the stages below, and maps them by default onto the `ecommerce` pipeline. The config's
//! `stage_map` may override any of them like for any other source.

use super::{BadRecord, Connector, WebhookAction, WebhookEvent};
use crate::connectors::signature::Scheme;
use crate::domain::{
    Currency, EmailAddress, LineItem, Money, PipelineKey, RawRecord, StageKey, StageRef,
};
use crate::pipeline::{MappingSource, StageMapEntry};
use chrono::{DateTime, NaiveDateTime, TimeZone, Utc};
use serde_json::Value;

/// The canonical pipeline carts go to.
pub const PIPELINE: &str = "ecommerce";
/// The native pipeline every e-commerce connector reports.
pub const NATIVE_PIPELINE: &str = "cart";

/// A checkout in progress (maps to `checkout_started`).
pub const CHECKOUT: &str = "checkout";
/// A checkout the source itself reports as abandoned or expired with a way back
/// (Stripe's expired session; maps to `cart_abandoned`).
pub const ABANDONED: &str = "abandoned";
/// An order was placed or the checkout completed (maps to `purchase_completed`).
pub const PURCHASED: &str = "purchased";
/// Cancelled, refunded or otherwise closed without a sale (maps to `expired`).
pub const CLOSED: &str = "closed";

/// The default stage mappings of the e-commerce connectors.
pub fn default_mappings() -> Vec<StageMapEntry> {
    [
        (CHECKOUT, "checkout_started"),
        (ABANDONED, "cart_abandoned"),
        (PURCHASED, "purchase_completed"),
        (CLOSED, "expired"),
    ]
    .into_iter()
    .map(|(native, canonical)| StageMapEntry {
        native_pipeline: NATIVE_PIPELINE.to_owned(),
        native_stage: native.to_owned(),
        target: StageRef {
            pipeline: Some(PipelineKey::new(PIPELINE)),
            stage: StageKey::new(canonical),
        },
        source: MappingSource::Manifest,
    })
    .collect()
}

/// A webhook-only e-commerce connector (WooCommerce, Stripe, generic): it names its
/// kind, its signing scheme and how a delivery becomes actions; the blanket
/// [`Connector`] impl below gives it the `ecommerce` pipeline, the default mappings and
/// no polling. Shopify, which may also poll, implements [`Connector`] itself.
pub trait WebhookShop: Send + Sync {
    /// The connector's name ([`Connector::kind`]).
    const KIND: &'static str;

    /// How its webhooks are signed ([`Connector::webhook_scheme`]).
    fn scheme(&self) -> Scheme;

    /// Turns a verified delivery into actions ([`Connector::parse_webhook`]).
    fn actions(&self, event: &WebhookEvent) -> Result<Vec<WebhookAction>, BadRecord>;
}

impl<T: WebhookShop> Connector for T {
    fn kind(&self) -> &str {
        T::KIND
    }

    fn default_pipeline(&self) -> Option<&str> {
        Some(PIPELINE)
    }

    fn default_mappings(&self) -> Vec<StageMapEntry> {
        default_mappings()
    }

    fn polls(&self) -> bool {
        false
    }

    fn webhook_scheme(&self) -> Option<Scheme> {
        Some(self.scheme())
    }

    fn parse_webhook(&self, event: &WebhookEvent) -> Result<Vec<WebhookAction>, BadRecord> {
        self.actions(event)
    }
}

/// A `BadRecord` for a payload that does not have the shape the connector reads.
pub fn bad(raw: &Value, external_id: Option<String>, reason: impl Into<String>) -> BadRecord {
    BadRecord {
        external_id,
        reason: reason.into(),
        raw: RawRecord::from_value(raw),
    }
}

/// Parses a webhook body as JSON, or says why it is not.
pub fn parse_body(body: &[u8]) -> Result<Value, BadRecord> {
    serde_json::from_slice(body).map_err(|error| BadRecord {
        external_id: None,
        reason: format!("body is not JSON: {error}"),
        raw: RawRecord::from_value(&Value::String(
            String::from_utf8_lossy(body).chars().take(2048).collect(),
        )),
    })
}

/// The first `chars` characters of `text`, for short labels; never splits a character
/// (vendor ids are not always ASCII).
pub fn prefix(text: &str, chars: usize) -> &str {
    match text.char_indices().nth(chars) {
        Some((at, _)) => text.get(..at).unwrap_or(text),
        None => text,
    }
}

/// A string or number field as text (ids arrive as either); `None` when absent or null.
pub fn text(value: &Value, key: &str) -> Option<String> {
    match value.get(key)? {
        Value::String(text) if !text.is_empty() => Some(text.clone()),
        Value::Number(number) => Some(number.to_string()),
        _ => None,
    }
}

/// A string field by JSON pointer, numbers included.
pub fn text_at(value: &Value, pointer: &str) -> Option<String> {
    match value.pointer(pointer)? {
        Value::String(text) if !text.is_empty() => Some(text.clone()),
        Value::Number(number) => Some(number.to_string()),
        Value::Bool(flag) => Some(flag.to_string()),
        _ => None,
    }
}

/// A timestamp in RFC 3339, in `YYYY-MM-DDTHH:MM:SS` taken as UTC (WooCommerce's `_gmt`
/// fields), or as unix seconds (Stripe).
pub fn time(value: Option<&Value>) -> Option<DateTime<Utc>> {
    match value? {
        Value::String(text) => DateTime::parse_from_rfc3339(text)
            .map(|at| at.with_timezone(&Utc))
            .ok()
            .or_else(|| {
                NaiveDateTime::parse_from_str(text, "%Y-%m-%dT%H:%M:%S")
                    .ok()
                    .map(|naive| Utc.from_utc_datetime(&naive))
            }),
        Value::Number(number) => Utc.timestamp_opt(number.as_i64()?, 0).single(),
        _ => None,
    }
}

/// A currency code (any case).
pub fn currency(value: Option<&Value>) -> Option<Currency> {
    Currency::parse(&value?.as_str()?.to_ascii_uppercase()).ok()
}

/// A decimal amount given as a string or number ("379.69", 379.69) in `currency`.
pub fn decimal(value: Option<&Value>, currency: Currency) -> Option<Money> {
    let text = match value? {
        Value::String(text) => text.clone(),
        Value::Number(number) => number.to_string(),
        _ => return None,
    };
    Money::parse_decimal(text.trim(), currency).ok()
}

/// An email address, when the field holds a usable one.
pub fn email(value: Option<&Value>) -> Option<EmailAddress> {
    EmailAddress::parse(value?.as_str()?)
}

/// Where a connection reads a shopper's marketing consent: a JSON pointer into the
/// payload, or `meta:KEY`, the `value` of the item with that `key` in the payload's
/// `meta_data` list (WooCommerce order meta, where consent plugins write).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConsentField {
    Pointer(String),
    Meta(String),
}

impl ConsentField {
    /// Parses `"/pointer"` or `"meta:KEY"`.
    pub fn parse(text: &str) -> Result<Self, String> {
        if let Some(key) = text.strip_prefix("meta:") {
            if key.is_empty() {
                return Err("\"meta:\" needs the meta key, like \"meta:mailchimp_woocommerce_is_subscribed\"".into());
            }
            return Ok(ConsentField::Meta(key.to_owned()));
        }
        if text.starts_with('/') {
            return Ok(ConsentField::Pointer(text.to_owned()));
        }
        Err(format!(
            "expected a JSON pointer like \"/customer/accepts_marketing\" or \"meta:KEY\", got {text:?}"
        ))
    }

    fn value<'a>(&self, payload: &'a Value) -> Option<&'a Value> {
        match self {
            ConsentField::Pointer(pointer) => payload.pointer(pointer),
            ConsentField::Meta(key) => payload
                .get("meta_data")?
                .as_array()?
                .iter()
                .find(|item| item.get("key").and_then(Value::as_str) == Some(key))?
                .get("value"),
        }
    }
}

/// A connection's `consent` setting: one place or a list of them, tried in order.
pub fn consent_fields(setting: &toml::Value) -> Result<Vec<ConsentField>, String> {
    match setting {
        toml::Value::String(text) => Ok(vec![ConsentField::parse(text)?]),
        toml::Value::Array(items) => items
            .iter()
            .map(|item| {
                item.as_str()
                    .ok_or_else(|| "expected a list of JSON pointers or \"meta:KEY\"".to_owned())
                    .and_then(ConsentField::parse)
            })
            .collect(),
        _ => Err("expected a JSON pointer, \"meta:KEY\", or a list of them".into()),
    }
}

/// The shopper's consent: the first of `fields` that holds a yes or a no (`true`,
/// `1`, `"1"`, `"yes"`, `"on"` / `false`, `0`, `"0"`, `"no"`, `"off"`, `""`). `None`
/// when none does: no record of consent is no consent.
pub fn consent(payload: &Value, fields: &[ConsentField]) -> Option<bool> {
    fields
        .iter()
        .find_map(|field| consent_value(field.value(payload)?))
}

fn consent_value(value: &Value) -> Option<bool> {
    match value {
        Value::Bool(flag) => Some(*flag),
        Value::Number(number) => match number.as_i64() {
            Some(1) => Some(true),
            Some(0) => Some(false),
            _ => None,
        },
        Value::String(text) => match text.trim().to_ascii_lowercase().as_str() {
            "1" | "true" | "yes" | "on" => Some(true),
            "0" | "false" | "no" | "off" | "" => Some(false),
            _ => None,
        },
        _ => None,
    }
}

/// "First Last" from two optional fields.
pub fn full_name(first: Option<&Value>, last: Option<&Value>) -> Option<String> {
    let parts: Vec<&str> = [first, last]
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .map(str::trim)
        .filter(|part| !part.is_empty())
        .collect();
    (!parts.is_empty()).then(|| parts.join(" "))
}

/// A link a customer may be sent to: kept only when it parses as a URL whose scheme
/// is `http` or `https`, so a `javascript:` or `data:` URL from a source never
/// reaches an email's `href`.
pub fn web_url(text: Option<String>) -> Option<String> {
    let parsed = url::Url::parse(text?.trim()).ok()?;
    matches!(parsed.scheme(), "http" | "https").then(|| parsed.to_string())
}

/// Shopify's variant title for a product without variants.
const NO_VARIANT: &str = "Default Title";

/// Line items from an array of objects with a title, a quantity and a decimal unit
/// price; with `variant_key`, a variant name the shop sends apart from the title is
/// added to it (`IPod Nano - 8GB (Red)`), so the shopper sees which one was left.
pub fn line_items(
    items: Option<&Value>,
    title_key: &str,
    variant_key: Option<&str>,
    price_key: &str,
    currency: Option<Currency>,
) -> Vec<LineItem> {
    let Some(Value::Array(items)) = items else {
        return Vec::new();
    };
    let title = |item: &Value| {
        let title = item
            .get(title_key)
            .and_then(Value::as_str)
            .unwrap_or("item")
            .trim();
        let variant = variant_key
            .and_then(|key| item.get(key))
            .and_then(Value::as_str)
            .map(str::trim)
            .filter(|variant| !variant.is_empty() && *variant != NO_VARIANT);
        match variant {
            Some(variant) if !title.contains(variant) => format!("{title} ({variant})"),
            _ => title.to_owned(),
        }
    };
    items
        .iter()
        .map(|item| LineItem {
            title: title(item),
            quantity: item.get("quantity").and_then(Value::as_i64).unwrap_or(1),
            unit_price_minor: currency
                .and_then(|currency| decimal(item.get(price_key), currency))
                .map(|money| money.minor),
            sku: text(item, "sku"),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn times_are_read_in_every_vendor_format() {
        let expected = Utc.with_ymd_and_hms(2012, 10, 12, 11, 5, 27).unwrap();
        assert_eq!(
            time(Some(&json!("2012-10-12T07:05:27-04:00"))),
            Some(expected)
        );
        assert_eq!(time(Some(&json!("2012-10-12T11:05:27"))), Some(expected));
        assert_eq!(time(Some(&json!(expected.timestamp()))), Some(expected));
        assert_eq!(time(Some(&json!("yesterday"))), None);
    }

    #[test]
    fn a_prefix_counts_characters_and_never_splits_one() {
        assert_eq!(prefix("abcdefghij", 8), "abcdefgh");
        assert_eq!(prefix("abc", 8), "abc");
        assert_eq!(prefix("ééééééééé", 8), "éééééééé");
        assert_eq!(prefix("a🛒b", 2), "a🛒");
        assert_eq!(prefix("", 8), "");
    }

    #[test]
    fn consent_is_read_from_pointers_and_meta_keys_in_order() {
        let order = json!({
            "customer": {"accepts_marketing": "maybe"},
            "meta_data": [
                {"id": 1, "key": "mailchimp_woocommerce_is_subscribed", "value": "1"},
                {"id": 2, "key": "other_optin", "value": 0},
            ]
        });
        let fields = |list: &[&str]| {
            list.iter()
                .map(|text| ConsentField::parse(text).unwrap())
                .collect::<Vec<_>>()
        };
        // An unreadable value is passed over for the next place.
        assert_eq!(
            consent(
                &order,
                &fields(&[
                    "/customer/accepts_marketing",
                    "meta:mailchimp_woocommerce_is_subscribed"
                ])
            ),
            Some(true)
        );
        assert_eq!(consent(&order, &fields(&["meta:other_optin"])), Some(false));
        assert_eq!(consent(&order, &fields(&["meta:absent", "/absent"])), None);
        assert!(ConsentField::parse("accepts_marketing").is_err());
        assert!(ConsentField::parse("meta:").is_err());
    }

    #[test]
    fn only_http_and_https_links_are_kept() {
        let url = |text: &str| web_url(Some(text.to_owned()));
        assert_eq!(
            url(" https://shop.example.com/cart/1/recover?key=a&b=c "),
            Some("https://shop.example.com/cart/1/recover?key=a&b=c".to_owned())
        );
        assert!(url("http://shop.example.com/r").is_some());
        for bad in [
            "javascript:alert(1)",
            "JavaScript:alert(1)",
            "data:text/html,<b>x</b>",
            "/relative/path",
            "mailto:a@example.com",
            "",
        ] {
            assert_eq!(url(bad), None, "{bad}");
        }
    }

    #[test]
    fn a_variant_name_joins_its_item_title() {
        let usd = Currency::parse("USD").ok();
        let items = json!([
            {"title": "IPod Nano - 8GB", "variant_title": "Red", "quantity": 1, "price": "199.00"},
            {"title": "Gift card", "variant_title": "Default Title", "quantity": 2, "price": "10.00"},
            {"title": "Hoodie - Blue", "variant_title": "Blue", "quantity": 1, "price": "49.90"},
        ]);
        let titles: Vec<String> =
            line_items(Some(&items), "title", Some("variant_title"), "price", usd)
                .into_iter()
                .map(|item| item.title)
                .collect();
        assert_eq!(
            titles,
            ["IPod Nano - 8GB (Red)", "Gift card", "Hoodie - Blue"]
        );
    }

    #[test]
    fn amounts_are_exact_minor_units() {
        let usd = Currency::parse("USD").unwrap();
        assert_eq!(decimal(Some(&json!("379.69")), usd).unwrap().minor, 37969);
        assert_eq!(decimal(Some(&json!("0.1")), usd).unwrap().minor, 10);
        assert!(decimal(Some(&json!("abc")), usd).is_none());
        assert_eq!(currency(Some(&json!("usd"))), Some(usd));
    }
}
