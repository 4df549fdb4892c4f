//! The `shopify` connector: checkouts and orders by webhook, abandoned checkouts by a
//! REST backfill.
//!
//! Webhooks (`X-Shopify-Hmac-Sha256`): `checkouts/create|update` carry the checkout,
//! `orders/create|paid` the order. A cart's external id is the checkout `token`; an order
//! that names its `checkout_token` uses the same id, so it lands on its cart whichever
//! arrives first. Cart keys `shopify:checkout:<token>` and `shopify:cart:<cart_token>`
//! let an order find its cart in another connection too.
//!
//! Backfill: `GET /admin/api/{version}/checkouts.json` with `X-Shopify-Access-Token`,
//! `updated_at_min` for incremental reads and `Link: <…page_info=…>; rel="next"`
//! pagination. It runs only when the connection has a `token`, and recovers what the
//! webhooks missed while dealsync was down.

use super::ecommerce::{
    self, CHECKOUT, CLOSED, NATIVE_PIPELINE, PURCHASED, bad, currency, decimal, email, full_name,
    line_items, prefix, text, time, web_url,
};
use super::{BadRecord, Connector, ConnectorError, Page, SyncContext, WebhookAction, WebhookEvent};
use crate::config::{ConnectionConfig, Secret};
use crate::connectors::signature::Scheme;
use crate::domain::{DealStatus, RawRecord, SourceDeal};
use crate::pipeline::StageMapEntry;
use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::time::Duration;

/// The Admin API version used unless `settings.api_version` says otherwise.
pub const DEFAULT_API_VERSION: &str = "2024-10";
const DEFAULT_PAGE_SIZE: u32 = 250;

/// The Shopify connector for one connection.
pub struct ShopifyConnector {
    base_url: Option<url::Url>,
    api_version: String,
    token: Option<Secret>,
    page_size: u32,
    lookback: Duration,
    max_response_bytes: u64,
    http: reqwest::Client,
}

/// Where the backfill stands.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
struct BackfillCursor {
    /// Checkouts updated at or after this instant (RFC 3339) are read on the next run.
    #[serde(default)]
    updated_at_min: Option<String>,
    /// Mid-run: the next page, exactly as Shopify's `Link` header gave it.
    #[serde(default)]
    page_info: Option<String>,
    /// The newest `updated_at` read so far in this run.
    #[serde(default)]
    max_seen: Option<String>,
}

impl ShopifyConnector {
    /// Builds the connector; errors are (settings key, message).
    pub fn from_config(connection: &ConnectionConfig) -> Result<Self, (String, String)> {
        let mut shop = None;
        let mut api_version = DEFAULT_API_VERSION.to_owned();
        for (key, value) in &connection.settings {
            let text = value
                .as_str()
                .ok_or_else(|| (key.clone(), "expected a string".to_owned()))?;
            match key.as_str() {
                "shop" => shop = Some(text.to_owned()),
                "api_version" => api_version = text.to_owned(),
                other => {
                    return Err((
                        other.to_owned(),
                        "unknown setting (known: shop, api_version)".to_owned(),
                    ));
                }
            }
        }
        let base_url = match (&connection.base_url, shop) {
            (Some(url), _) => Some(url.clone()),
            (None, Some(shop)) => {
                let host = if shop.contains('.') {
                    shop
                } else {
                    format!("{shop}.myshopify.com")
                };
                Some(
                    url::Url::parse(&format!("https://{host}/")).map_err(|error| {
                        ("shop".to_owned(), format!("not a shop domain: {error}"))
                    })?,
                )
            }
            (None, None) => None,
        };
        if connection.token.is_some() && base_url.is_none() {
            return Err((
                "shop".to_owned(),
                "the backfill needs the shop's domain (settings.shop = \"example.myshopify.com\")"
                    .to_owned(),
            ));
        }
        Ok(ShopifyConnector {
            base_url,
            api_version,
            token: connection.token.clone(),
            page_size: connection
                .page_size
                .unwrap_or(DEFAULT_PAGE_SIZE)
                .clamp(1, 250),
            lookback: connection.lookback.unwrap_or(Duration::from_secs(300)),
            max_response_bytes: connection.max_response_bytes,
            // Same-origin redirects only: the access token never reaches another host.
            http: crate::connectors::vendor_http::client_builder()
                .connect_timeout(Duration::from_secs(10))
                .timeout(Duration::from_secs(60))
                .build()
                .map_err(|error| ("shop".to_owned(), format!("HTTP client: {error}")))?,
        })
    }

    fn checkouts_url(&self) -> Result<url::Url, ConnectorError> {
        let base = self
            .base_url
            .as_ref()
            .ok_or(ConnectorError::NotConfigured {
                what: "no shop domain configured for the backfill",
            })?;
        base.join(&format!("admin/api/{}/checkouts.json", self.api_version))
            .map_err(|source| ConnectorError::Url {
                what: "checkouts",
                source,
            })
    }
}

/// Reads a checkout (webhook body or REST list entry) into a cart.
pub fn parse_checkout(checkout: &Value) -> Result<SourceDeal, BadRecord> {
    let token = text(checkout, "token")
        .ok_or_else(|| bad(checkout, text(checkout, "id"), "checkout has no token"))?;
    let stage = if checkout.get("completed_at").is_some_and(|v| !v.is_null()) {
        PURCHASED
    } else {
        CHECKOUT
    };
    let mut deal = cart(checkout, &token, stage)?;
    deal.recovery_url = web_url(text(checkout, "abandoned_checkout_url"));
    deal.cart_keys.push(format!("shopify:checkout:{token}"));
    if let Some(cart_token) = text(checkout, "cart_token") {
        deal.cart_keys.push(format!("shopify:cart:{cart_token}"));
    }
    Ok(deal)
}

/// Reads an order into the cart it completes (or closes, when cancelled).
pub fn parse_order(order: &Value) -> Result<SourceDeal, BadRecord> {
    let id = text(order, "id").ok_or_else(|| bad(order, None, "order has no id"))?;
    let checkout_token = text(order, "checkout_token");
    let external_id = checkout_token
        .clone()
        .unwrap_or_else(|| format!("order:{id}"));
    let cancelled = order.get("cancelled_at").is_some_and(|v| !v.is_null());
    let mut deal = cart(
        order,
        &external_id,
        if cancelled { CLOSED } else { PURCHASED },
    )?;
    deal.source_status = Some(if cancelled {
        DealStatus::Lost
    } else {
        DealStatus::Won
    });
    if let Some(token) = checkout_token {
        deal.cart_keys.push(format!("shopify:checkout:{token}"));
    }
    if let Some(cart_token) = text(order, "cart_token") {
        deal.cart_keys.push(format!("shopify:cart:{cart_token}"));
    }
    deal.cart_keys.push(format!("shopify:order:{id}"));
    Ok(deal)
}

/// The fields checkouts and orders share.
fn cart(record: &Value, external_id: &str, stage: &str) -> Result<SourceDeal, BadRecord> {
    let customer = record.get("customer").filter(|c| c.is_object());
    let money_currency =
        currency(record.get("currency")).or_else(|| currency(record.get("presentment_currency")));
    let contact_name = customer
        .and_then(|c| full_name(c.get("first_name"), c.get("last_name")))
        .or_else(|| {
            record
                .get("billing_address")
                .and_then(|a| full_name(a.get("first_name"), a.get("last_name")))
        });
    let title = match (&contact_name, text(record, "name")) {
        (Some(name), _) => format!("Checkout of {name}"),
        (None, Some(number)) => format!("Order {number}"),
        (None, None) => format!("Checkout {}", prefix(external_id, 8)),
    };
    let mut deal = SourceDeal::new(external_id, title, NATIVE_PIPELINE, stage);
    deal.amount = money_currency.and_then(|c| decimal(record.get("total_price"), c));
    if record.get("total_price").is_some_and(|v| !v.is_null()) && deal.amount.is_none() {
        return Err(bad(
            record,
            Some(external_id.to_owned()),
            "total_price or currency is not usable",
        ));
    }
    deal.contact_email = email(record.get("email"))
        .or_else(|| email(record.get("contact_email")))
        .or_else(|| customer.and_then(|c| email(c.get("email"))));
    deal.contact_name = contact_name;
    deal.marketing_consent = marketing_consent(record);
    deal.created_at = time(record.get("created_at"));
    deal.updated_at = time(record.get("updated_at")).or(deal.created_at);
    deal.line_items = line_items(
        record.get("line_items"),
        "title",
        Some("variant_title"),
        "price",
        money_currency,
    );
    deal.raw = RawRecord::from_value(record);
    Ok(deal)
}

/// The customer's `email_marketing_consent.state` when given (`subscribed` is a yes,
/// anything else a no), else `buyer_accepts_marketing`.
fn marketing_consent(record: &Value) -> Option<bool> {
    let state = record
        .pointer("/customer/email_marketing_consent/state")
        .and_then(Value::as_str);
    match state {
        Some(state) => Some(state == "subscribed"),
        None => record
            .get("buyer_accepts_marketing")
            .and_then(Value::as_bool),
    }
}

/// Fields only an order has (REST Admin order resource).
const ORDER_FIELDS: &[&str] = &["order_number", "financial_status"];
/// Fields only a checkout has (abandoned-checkout resource).
const CHECKOUT_FIELDS: &[&str] = &["abandoned_checkout_url"];

#[derive(Debug, Clone, Copy, PartialEq)]
enum Kind {
    Checkout,
    Order,
}

/// Refuses a body its topic contradicts. The topic header is not signed (Shopify signs
/// the body alone), so a captured checkout could otherwise be sent again as
/// `orders/create` and mark its cart purchased: an order topic needs a body with an
/// order's fields and none of a checkout's, a checkout topic the reverse.
fn check_topic(body: &Value, topic: &str, kind: Kind) -> Result<(), BadRecord> {
    let has = |fields: &[&str]| -> Vec<String> {
        fields
            .iter()
            .filter(|field| body.get(**field).is_some_and(|value| !value.is_null()))
            .map(|field| (*field).to_owned())
            .collect()
    };
    let (wanted, unwanted) = match kind {
        Kind::Order => (ORDER_FIELDS, CHECKOUT_FIELDS),
        Kind::Checkout => (&[][..], ORDER_FIELDS),
    };
    let stray = has(unwanted);
    let problem = if !stray.is_empty() {
        Some(format!("it has {}", stray.join(", ")))
    } else if !wanted.is_empty() && has(wanted).is_empty() {
        Some(format!("it has none of {}", wanted.join(", ")))
    } else {
        None
    };
    match problem {
        Some(problem) => Err(bad(
            body,
            text(body, "id"),
            format!(
                "topic {topic} contradicts the body: {problem}, so it is not {}",
                match kind {
                    Kind::Order => "an order",
                    Kind::Checkout => "a checkout",
                }
            ),
        )),
        None => Ok(()),
    }
}

/// The `page_info` of the `rel="next"` link, if any.
fn next_page_info(link: Option<&str>) -> Option<String> {
    link?.split(',').find_map(|part| {
        let (target, params) = part.split_once(';')?;
        if !params.contains("rel=\"next\"") && !params.contains("rel=next") {
            return None;
        }
        let target = target.trim().trim_start_matches('<').trim_end_matches('>');
        let url = url::Url::parse(target).ok()?;
        url.query_pairs()
            .find(|(key, _)| key == "page_info")
            .map(|(_, value)| value.into_owned())
    })
}

fn transient(reason: String, retry_after: Option<Duration>) -> ConnectorError {
    ConnectorError::Transient {
        vendor: "shopify".into(),
        reason,
        retry_after,
    }
}

#[async_trait]
impl Connector for ShopifyConnector {
    fn kind(&self) -> &str {
        "shopify"
    }

    fn default_pipeline(&self) -> Option<&str> {
        Some(ecommerce::PIPELINE)
    }

    fn default_mappings(&self) -> Vec<StageMapEntry> {
        ecommerce::default_mappings()
    }

    fn polls(&self) -> bool {
        self.token.is_some()
    }

    async fn probe(&self, cx: &SyncContext) -> Result<String, ConnectorError> {
        let page = self.fetch_page(cx, None).await?;
        Ok(format!("read {} abandoned checkout(s)", page.records.len()))
    }

    async fn fetch_page(
        &self,
        cx: &SyncContext,
        cursor: Option<&serde_json::Value>,
    ) -> Result<Page, ConnectorError> {
        let token = self.token.as_ref().ok_or(ConnectorError::NotConfigured {
            what: "the Shopify backfill needs a token",
        })?;
        let cursor: BackfillCursor = match cursor {
            Some(value) => serde_json::from_value(value.clone()).map_err(|error| {
                ConnectorError::BadResponse {
                    vendor: "shopify".into(),
                    reason: format!("unreadable cursor: {error}"),
                }
            })?,
            None => BackfillCursor::default(),
        };
        let mut url = self.checkouts_url()?;
        {
            let mut query = url.query_pairs_mut();
            query.append_pair("limit", &self.page_size.to_string());
            match (&cursor.page_info, &cursor.updated_at_min) {
                // With page_info, Shopify accepts only limit (and fields).
                (Some(page_info), _) => {
                    query.append_pair("page_info", page_info);
                }
                (None, Some(since)) => {
                    let since = chrono::DateTime::parse_from_rfc3339(since)
                        .map(|at| at.with_timezone(&chrono::Utc))
                        .map_err(|error| ConnectorError::BadResponse {
                            vendor: "shopify".into(),
                            reason: format!("unreadable cursor time: {error}"),
                        })?;
                    let lookback = chrono::Duration::from_std(self.lookback).unwrap_or_default();
                    query.append_pair("updated_at_min", &(since - lookback).to_rfc3339());
                }
                (None, None) => {}
            }
        }
        let request = self
            .http
            .get(url.clone())
            .header("X-Shopify-Access-Token", token.expose())
            .header("Accept", "application/json");
        let received = async {
            let response = request.send().await?;
            crate::connectors::vendor_http::receive(response, self.max_response_bytes).await
        };
        let response = tokio::select! {
            _ = cx.shutdown.cancelled() => return Err(ConnectorError::Cancelled),
            response = received => response.map_err(|error| error.into_connector_error("shopify", &cx.connection, &url))?,
        };
        let status = reqwest::StatusCode::from_u16(response.status)
            .unwrap_or(reqwest::StatusCode::INTERNAL_SERVER_ERROR);
        if status == reqwest::StatusCode::UNAUTHORIZED || status == reqwest::StatusCode::FORBIDDEN {
            return Err(ConnectorError::Unauthorized {
                connection: cx.connection.clone(),
                reason: format!("Shopify answered {status}"),
            });
        }
        if status == reqwest::StatusCode::TOO_MANY_REQUESTS || status.is_server_error() {
            let retry_after = response
                .headers
                .get("retry-after")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse::<f64>().ok())
                .filter(|secs| secs.is_finite() && *secs >= 0.0)
                .map(|secs| Duration::from_secs_f64(secs.min(3600.0)));
            return Err(transient(format!("Shopify answered {status}"), retry_after));
        }
        if !status.is_success() {
            return Err(ConnectorError::BadResponse {
                vendor: "shopify".into(),
                reason: format!("Shopify answered {status}"),
            });
        }
        let next_page = next_page_info(
            response
                .headers
                .get("link")
                .and_then(|value| value.to_str().ok()),
        );
        // A body that is not JSON is a truncated or garbled transfer: try again later.
        let body: Value = serde_json::from_slice(&response.body)
            .map_err(|error| transient(format!("unreadable checkouts page: {error}"), None))?;
        let Some(Value::Array(checkouts)) = body.get("checkouts") else {
            return Err(ConnectorError::BadResponse {
                vendor: "shopify".into(),
                reason: "response has no checkouts array".into(),
            });
        };
        let mut max_seen = cursor
            .max_seen
            .as_deref()
            .and_then(|text| time(Some(&Value::String(text.to_owned()))));
        let records: Vec<_> = checkouts
            .iter()
            .map(|checkout| {
                let record = parse_checkout(checkout);
                if let Ok(deal) = &record {
                    max_seen = max_seen.max(deal.updated_at);
                }
                record
            })
            .collect();
        let max_seen = max_seen.map(|at| at.to_rfc3339());
        let (next, done) = match next_page {
            Some(page_info) => (
                BackfillCursor {
                    updated_at_min: cursor.updated_at_min.clone(),
                    page_info: Some(page_info),
                    max_seen,
                },
                false,
            ),
            None => (
                BackfillCursor {
                    updated_at_min: max_seen.or(cursor.updated_at_min.clone()),
                    page_info: None,
                    max_seen: None,
                },
                true,
            ),
        };
        Ok(Page {
            records,
            next: serde_json::to_value(next).unwrap_or_default(),
            done,
            requests: 1,
            rate_limited: 0,
            unchanged: 0,
            cache: Vec::new(),
        })
    }

    fn webhook_scheme(&self) -> Option<Scheme> {
        Some(Scheme::Shopify)
    }

    fn parse_webhook(&self, event: &WebhookEvent) -> Result<Vec<WebhookAction>, BadRecord> {
        let body = ecommerce::parse_body(&event.body)?;
        let topic = event.topic.as_deref().unwrap_or_default();
        let deal = match topic {
            "checkouts/create" | "checkouts/update" => {
                check_topic(&body, topic, Kind::Checkout)?;
                parse_checkout(&body)?
            }
            "orders/create" | "orders/paid" | "orders/updated" | "orders/cancelled" => {
                check_topic(&body, topic, Kind::Order)?;
                parse_order(&body)?
            }
            // Other topics (and deliveries without one) are not about carts.
            _ => return Ok(Vec::new()),
        };
        Ok(vec![WebhookAction::Upsert(Box::new(deal))])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> Value {
        let path = format!(
            "{}/tests/fixtures/shopify/{name}",
            env!("CARGO_MANIFEST_DIR")
        );
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
    }

    #[test]
    fn a_checkout_becomes_a_cart_with_its_recovery_url_items_and_consent() {
        let deal = parse_checkout(&fixture("webhook-checkouts-create.json")).unwrap();
        assert_eq!(
            deal.external_id.as_str(),
            "2a1ace52255252df566af0faaedfbfa7"
        );
        assert_eq!(deal.native_stage, CHECKOUT);
        assert_eq!(deal.amount.unwrap().minor, 37969);
        assert_eq!(deal.amount.unwrap().currency.as_str(), "USD");
        assert_eq!(
            deal.contact_email.unwrap().as_str(),
            "bob.norman@mail.example.com"
        );
        assert_eq!(deal.contact_name.as_deref(), Some("Bob Norman"));
        assert_eq!(deal.marketing_consent, Some(false));
        assert!(deal.recovery_url.unwrap().ends_with("/recover"));
        assert!(!deal.line_items.is_empty());
        assert_eq!(
            deal.cart_keys,
            [
                "shopify:checkout:2a1ace52255252df566af0faaedfbfa7",
                "shopify:cart:68778783ad298f1c80c3bafcddeea02f"
            ]
        );
    }

    #[test]
    fn an_order_lands_on_its_checkout_token() {
        let deal = parse_order(&fixture("webhook-orders-create.json")).unwrap();
        assert_eq!(
            deal.external_id.as_str(),
            "bd5a8aa1ecd019dd3520ff791ee3a24c"
        );
        assert_eq!(deal.native_stage, PURCHASED);
        assert_eq!(deal.amount.unwrap().minor, 59894);
        assert!(
            deal.cart_keys
                .contains(&"shopify:cart:68778783ad298f1c80c3bafcddeea02f".to_owned())
        );
    }

    #[test]
    fn the_next_page_info_is_read_from_the_link_header() {
        let link = r#"<https://shop.myshopify.com/admin/api/2024-10/checkouts.json?page_info=abc&limit=2>; rel="previous", <https://shop.myshopify.com/admin/api/2024-10/checkouts.json?page_info=def%3D&limit=2>; rel="next""#;
        assert_eq!(next_page_info(Some(link)).as_deref(), Some("def="));
        assert_eq!(
            next_page_info(Some(
                r#"<https://s/checkouts.json?page_info=abc>; rel="previous""#
            )),
            None
        );
        assert_eq!(next_page_info(None), None);
    }

    fn event(topic: &str, body: &Value) -> WebhookEvent {
        WebhookEvent {
            connection: "shop".into(),
            delivery_id: "d".into(),
            topic: Some(topic.into()),
            headers: Vec::new(),
            body: serde_json::to_vec(body).unwrap(),
            received_at: chrono::Utc::now(),
        }
    }

    fn connector() -> ShopifyConnector {
        ShopifyConnector {
            base_url: None,
            api_version: DEFAULT_API_VERSION.to_owned(),
            token: None,
            page_size: DEFAULT_PAGE_SIZE,
            lookback: Duration::ZERO,
            http: reqwest::Client::new(),
            max_response_bytes: 64 * 1024 * 1024,
        }
    }

    #[test]
    fn a_body_its_topic_contradicts_is_refused() {
        let connector = connector();
        let checkout = fixture("webhook-checkouts-create.json");
        let order = fixture("webhook-orders-create.json");
        for topic in [
            "orders/create",
            "orders/paid",
            "orders/updated",
            "orders/cancelled",
        ] {
            let refused = connector
                .parse_webhook(&event(topic, &checkout))
                .unwrap_err();
            assert!(refused.reason.contains("contradicts"), "{}", refused.reason);
            assert!(connector.parse_webhook(&event(topic, &order)).is_ok());
        }
        for topic in ["checkouts/create", "checkouts/update"] {
            let refused = connector.parse_webhook(&event(topic, &order)).unwrap_err();
            assert!(
                refused.reason.contains("financial_status"),
                "{}",
                refused.reason
            );
            assert!(connector.parse_webhook(&event(topic, &checkout)).is_ok());
        }
        // A checkout stripped of its checkout fields still is no order.
        let mut bare = checkout.clone();
        bare.as_object_mut()
            .unwrap()
            .remove("abandoned_checkout_url");
        let refused = connector
            .parse_webhook(&event("orders/create", &bare))
            .unwrap_err();
        assert!(refused.reason.contains("none of"), "{}", refused.reason);
    }

    #[test]
    fn a_multi_byte_token_makes_a_title_without_splitting_a_character() {
        let mut checkout = fixture("webhook-checkouts-create.json");
        for key in ["customer", "billing_address", "name"] {
            checkout.as_object_mut().unwrap().remove(key);
        }
        checkout["token"] = serde_json::json!("aéééééé");
        let deal = parse_checkout(&checkout).unwrap();
        assert_eq!(deal.title, "Checkout aéééééé");
    }

    #[test]
    fn a_checkout_without_a_token_is_a_bad_record() {
        let error = parse_checkout(&serde_json::json!({"id": 5})).unwrap_err();
        assert!(error.reason.contains("token"), "{}", error.reason);
    }
}
