//! Webhook authenticity checks for every source dealsync receives deliveries from.
//!
//! [`verify`] takes the raw request parts, the active secrets and the clock, and either
//! returns what the delivery proved about itself ([`Verified`]) or says why it is rejected
//! ([`SignatureError`]). [`sign`] applies the same formulas on the sending side, for tests and
//! load generators. The module does no IO and reads no clock of its own.
//!
//! It is also where intake learns what else differs between vendors, so `http` names
//! none: the headers never stored ([`header::SECRET`]), a delivery's id
//! ([`Scheme::delivery_id`]) and topic ([`Scheme::topic`]), a vendor's test ping
//! ([`Scheme::is_ping`]), and the names manifests give the schemes ([`SchemeName`]).
//!
//! Invariants:
//! - Signatures and credentials are compared in constant time.
//! - The body is checked as the raw bytes received; nothing is re-serialized.
//! - Several secrets may be active at once (rotation); a delivery passes if any one matches.
//!   An empty secret never matches, since anyone could sign with it.
//! - Errors carry header names and fixed reasons only, never a secret or an expected value.
//! - Timestamped schemes (Stripe, HubSpot v3, Standard Webhooks) accept a delivery only when
//!   `|now - signed_at| <= tolerance`; a clock far ahead is rejected like a replay.
//! - The signature is checked before the replay window, so [`SignatureError::Stale`] is only
//!   reported for deliveries that are authentic but too old (or too far in the future).

use std::borrow::Cow;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use hmac::{Hmac, Mac};
use http::{HeaderMap, HeaderName, HeaderValue};
use sha2::{Digest, Sha256};
use subtle::{Choice, ConstantTimeEq};

mod providers;
pub use providers::{SnsEnvelope, mailgun_signature, rsa_key_of_certificate};

type HmacSha256 = Hmac<Sha256>;
type Digest32 = [u8; 32];

/// The replay window Stripe, HubSpot v3 and Standard Webhooks use by default: 5 minutes.
pub const DEFAULT_TOLERANCE: Duration = Duration::from_secs(300);

/// Header names read or written here, lowercase as `http` stores them.
pub mod header {
    pub const SHOPIFY_HMAC: &str = "x-shopify-hmac-sha256";
    /// Shopify "events" deliveries drop the `X-` prefix from every header.
    pub const SHOPIFY_EVENTS_HMAC: &str = "shopify-hmac-sha256";
    pub const SHOPIFY_WEBHOOK_ID: &str = "x-shopify-webhook-id";
    pub const SHOPIFY_EVENTS_WEBHOOK_ID: &str = "shopify-webhook-id";
    pub const SHOPIFY_EVENT_ID: &str = "x-shopify-event-id";
    pub const SHOPIFY_EVENTS_EVENT_ID: &str = "shopify-event-id";
    pub const WOOCOMMERCE_SIGNATURE: &str = "x-wc-webhook-signature";
    pub const WOOCOMMERCE_DELIVERY_ID: &str = "x-wc-webhook-delivery-id";
    pub const STRIPE_SIGNATURE: &str = "stripe-signature";
    pub const HUBSPOT_SIGNATURE: &str = "x-hubspot-signature";
    pub const HUBSPOT_SIGNATURE_VERSION: &str = "x-hubspot-signature-version";
    pub const HUBSPOT_SIGNATURE_V3: &str = "x-hubspot-signature-v3";
    pub const HUBSPOT_REQUEST_TIMESTAMP: &str = "x-hubspot-request-timestamp";
    pub const AUTHORIZATION: &str = "authorization";
    pub const WEBHOOK_ID: &str = "webhook-id";
    pub const WEBHOOK_TIMESTAMP: &str = "webhook-timestamp";
    pub const WEBHOOK_SIGNATURE: &str = "webhook-signature";
    pub const SHOPIFY_TOPIC: &str = "x-shopify-topic";
    pub const SHOPIFY_EVENTS_TOPIC: &str = "shopify-topic";
    pub const WOOCOMMERCE_TOPIC: &str = "x-wc-webhook-topic";

    /// Headers that authenticate a delivery under any scheme, and those that carry
    /// credentials in any HTTP request: checked, never stored or logged.
    pub const SECRET: &[&str] = &[
        SHOPIFY_HMAC,
        SHOPIFY_EVENTS_HMAC,
        WOOCOMMERCE_SIGNATURE,
        STRIPE_SIGNATURE,
        HUBSPOT_SIGNATURE,
        HUBSPOT_SIGNATURE_V3,
        AUTHORIZATION,
        WEBHOOK_SIGNATURE,
        super::providers::SENDGRID_SIGNATURE,
        "cookie",
        "proxy-authorization",
    ];
}

/// A scheme by the name a manifest's `webhooks.scheme` gives it (and the `signature`
/// fuzz target's request line): the one place these names are spelled. Parsed by serde
/// or [`str::parse`]; an unknown name is refused with the list of known ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
pub enum SchemeName {
    #[serde(rename = "hubspot_v3")]
    HubSpotV3,
    #[serde(rename = "hubspot_v1v2")]
    HubSpotV1V2,
    #[serde(rename = "pipedrive_basic")]
    PipedriveBasic,
    #[serde(rename = "shopify")]
    Shopify,
    #[serde(rename = "woocommerce")]
    WooCommerce,
    #[serde(rename = "stripe")]
    Stripe,
    #[serde(rename = "standard_webhooks")]
    StandardWebhooks,
    #[serde(rename = "none")]
    None,
}

impl SchemeName {
    /// The scheme this name stands for, timestamped ones with [`DEFAULT_TOLERANCE`].
    pub fn scheme(self) -> Scheme {
        let tolerance = DEFAULT_TOLERANCE;
        match self {
            SchemeName::HubSpotV3 => Scheme::HubSpotV3 { tolerance },
            SchemeName::HubSpotV1V2 => Scheme::HubSpotV1V2,
            SchemeName::PipedriveBasic => Scheme::PipedriveBasic,
            SchemeName::Shopify => Scheme::Shopify,
            SchemeName::WooCommerce => Scheme::WooCommerce,
            SchemeName::Stripe => Scheme::Stripe { tolerance },
            SchemeName::StandardWebhooks => Scheme::StandardWebhooks { tolerance },
            SchemeName::None => Scheme::None,
        }
    }
}

impl std::str::FromStr for SchemeName {
    type Err = serde::de::value::Error;

    /// Reads a name as serde does, so the names above are the only spelling.
    fn from_str(name: &str) -> Result<Self, Self::Err> {
        use serde::Deserialize as _;
        use serde::de::IntoDeserializer as _;
        SchemeName::deserialize(name.into_deserializer())
    }
}

/// How a source authenticates its deliveries, and the secret format [`verify`] expects for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    /// `X-Shopify-Hmac-Sha256` (or `shopify-hmac-sha256`): base64 HMAC-SHA256 of the body,
    /// keyed with the app's client secret. No replay window.
    Shopify,
    /// `X-WC-Webhook-Signature`: base64 HMAC-SHA256 of the body, keyed with the webhook secret.
    /// No replay window.
    WooCommerce,
    /// `Stripe-Signature: t=<secs>,v1=<hex>[,v1=<hex>…]`: hex HMAC-SHA256 of `t.body`, keyed
    /// with the whole `whsec_…` string (not decoded).
    Stripe { tolerance: Duration },
    /// `X-HubSpot-Signature-v3` + `X-HubSpot-Request-Timestamp` (ms): base64 HMAC-SHA256 of
    /// `METHOD + URI + body + timestamp`, keyed with the app's client secret.
    HubSpotV3 { tolerance: Duration },
    /// Legacy `X-HubSpot-Signature` with `X-HubSpot-Signature-Version: v1|v2`: hex SHA-256 of
    /// `secret + body` (v1) or `secret + METHOD + URI + body` (v2). No replay window.
    HubSpotV1V2,
    /// `Authorization: Basic …`; each secret is the `user:password` pair configured on the
    /// Pipedrive webhook. Proves the sender knows the credentials; the body is not covered.
    PipedriveBasic,
    /// `webhook-id`, `webhook-timestamp`, `webhook-signature: v1,<b64> …`: base64 HMAC-SHA256
    /// of `id.timestamp.body`, keyed with the base64-decoded part of `whsec_…`.
    StandardWebhooks { tolerance: Duration },
    /// Mailgun: hex HMAC-SHA256 of `timestamp + token`, keyed with the webhook signing
    /// key, in the body's `signature` object (see `providers`).
    Mailgun { tolerance: Duration },
    /// SendGrid's signed event webhook: ECDSA P-256 over `timestamp + body`, checked with
    /// the base64 DER public key from the SendGrid settings (see `providers`).
    SendGrid { tolerance: Duration },
    /// Amazon SNS (SES notifications): RSA over the envelope's canonical string, with the
    /// key of the certificate the envelope names, fetched by the connector from an
    /// allowed host (see `providers`).
    Sns,
    /// No authentication: every delivery passes. For sources that offer none.
    None,
}

impl Scheme {
    /// For schemes whose signature covers the body alone (Shopify, WooCommerce): how
    /// long an identical body received again by the same connection is a duplicate,
    /// whatever delivery id and topic it carries. Nothing else of such a delivery is
    /// signed, so a captured body can be sent again by anyone; vendors resend a
    /// failed delivery with its original body (Shopify for up to 48 hours; WooCommerce
    /// does not retry, and the same window covers a delivery its queue sends late).
    /// `None` for schemes that sign a timestamp or a message id, whose replay window
    /// or delivery id already does this.
    pub fn body_replay_window(&self) -> Option<Duration> {
        match self {
            Scheme::Shopify | Scheme::WooCommerce => Some(BODY_ONLY_REPLAY_WINDOW),
            _ => None,
        }
    }

    /// Tells whether a request is the vendor's unsigned test ping rather than a
    /// delivery (WooCommerce's creation ping): the receiver answers it with 200 and
    /// stores nothing. Checked before the signature, since a ping carries none.
    pub fn is_ping(&self, headers: &HeaderMap, body: &[u8]) -> bool {
        match self {
            Scheme::WooCommerce => is_woocommerce_ping(headers, body),
            _ => false,
        }
    }

    /// The delivery's topic, from the first of the vendor's topic headers that is
    /// visible ASCII (Shopify's `X-Shopify-Topic`, WooCommerce's `X-WC-Webhook-Topic`);
    /// `None` for vendors that name the event in the body. Unsigned: a connector may
    /// refuse a body its topic contradicts, never trust it alone.
    pub fn topic(&self, headers: &HeaderMap) -> Option<String> {
        let names: &[&str] = match self {
            Scheme::Shopify => &[header::SHOPIFY_TOPIC, header::SHOPIFY_EVENTS_TOPIC],
            Scheme::WooCommerce => &[header::WOOCOMMERCE_TOPIC],
            _ => &[],
        };
        names.iter().find_map(|name| {
            headers
                .get(*name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        })
    }

    /// The delivery's idempotency key: the vendor's delivery id when the scheme has one
    /// (`verified`), else the id inside the body (Stripe's event id, Pipedrive's
    /// `meta.id`), else a hash of the body (HubSpot's, with the retry counter left out
    /// so a retry hashes the same).
    pub fn delivery_id(&self, verified: &Verified, body: &[u8]) -> String {
        if let Some(id) = verified.delivery_id.as_ref().or(verified.event_id.as_ref()) {
            return id.clone();
        }
        let parsed: Option<serde_json::Value> = serde_json::from_slice(body).ok();
        let from_body = parsed.as_ref().and_then(|value| match self {
            Scheme::Stripe { .. } => value.get("id")?.as_str().map(str::to_owned),
            Scheme::PipedriveBasic => value.pointer("/meta/id")?.as_str().map(str::to_owned),
            _ => None,
        });
        if let Some(id) = from_body {
            return id;
        }
        let hashed = match (self, parsed) {
            (
                Scheme::HubSpotV3 { .. } | Scheme::HubSpotV1V2,
                Some(serde_json::Value::Array(mut events)),
            ) => {
                for event in &mut events {
                    if let Some(object) = event.as_object_mut() {
                        object.remove("attemptNumber");
                    }
                }
                serde_json::to_vec(&events).unwrap_or_else(|_| body.to_vec())
            }
            _ => body.to_vec(),
        };
        format!("sha256:{}", to_hex(&Sha256::digest(&hashed)))
    }
}

/// See [`Scheme::body_replay_window`]: Shopify's retry window, the longest of the
/// body-only signers.
pub const BODY_ONLY_REPLAY_WINDOW: Duration = Duration::from_secs(48 * 3600);

/// The parts of an inbound request that signatures cover.
#[derive(Clone, Copy)]
pub struct Request<'a> {
    /// The HTTP method as sent, e.g. `POST`.
    pub method: &'a str,
    /// The full URL the vendor requested, scheme, host and query included (HubSpot signs it);
    /// behind a proxy, rebuild it from the public origin.
    pub uri: &'a str,
    pub headers: &'a HeaderMap,
    /// The raw body bytes, exactly as received.
    pub body: &'a [u8],
}

/// What an authentic delivery told us about itself.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Verified {
    /// The vendor's delivery or message id: `X-Shopify-Webhook-Id`,
    /// `X-WC-Webhook-Delivery-ID` or `webhook-id` (stable across retries, the idempotency key).
    /// Unsigned ids (Shopify, WooCommerce) are dropped when they are not visible ASCII.
    pub delivery_id: Option<String>,
    /// Shopify's `X-Shopify-Event-Id`, shared by every delivery of one event.
    pub event_id: Option<String>,
    /// The signed timestamp: Stripe `t`, HubSpot `X-HubSpot-Request-Timestamp` or
    /// `webhook-timestamp`.
    pub signed_at: Option<SystemTime>,
    /// Which of the given secrets matched; `None` when the scheme uses none. Lets the operator
    /// see when an old secret stops being used and can be retired.
    pub secret_index: Option<usize>,
}

/// Why a delivery was rejected, or could not be checked.
///
/// Every variant but [`SignatureError::BadSecret`] is the sender's fault (answer 401);
/// `BadSecret` is a configuration error on our side.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    #[error("missing header {header}")]
    Missing { header: &'static str },
    #[error("malformed header {header}: {reason}")]
    Malformed {
        header: &'static str,
        reason: &'static str,
    },
    #[error("signature matches none of the configured secrets")]
    Mismatch,
    /// The delivery is authentic but its timestamp is outside the replay window;
    /// `age_secs` is negative when the timestamp lies in the future.
    #[error("signed timestamp is outside the replay window (age {age_secs}s)")]
    Stale { age_secs: i64 },
    #[error("unusable webhook secret: {reason}")]
    BadSecret { reason: &'static str },
}

/// Checks that `request` was sent by the holder of one of `secrets`, and that its signed
/// timestamp, if the scheme has one, is within the scheme's tolerance of `now`.
pub fn verify(
    scheme: &Scheme,
    secrets: &[&[u8]],
    request: &Request<'_>,
    now: SystemTime,
) -> Result<Verified, SignatureError> {
    let headers = request.headers;
    match *scheme {
        Scheme::None => Ok(Verified::default()),
        Scheme::Shopify => {
            let (name, value) = first_header(
                headers,
                &[header::SHOPIFY_HMAC, header::SHOPIFY_EVENTS_HMAC],
            )?;
            let signature = decode_base64_digest(value.as_bytes(), name)?;
            let index = match_secret(secrets, &[signature], |key| {
                hmac_sha256(key, &[request.body])
            })?;
            Ok(Verified {
                delivery_id: optional_header(
                    headers,
                    &[
                        header::SHOPIFY_WEBHOOK_ID,
                        header::SHOPIFY_EVENTS_WEBHOOK_ID,
                    ],
                ),
                event_id: optional_header(
                    headers,
                    &[header::SHOPIFY_EVENT_ID, header::SHOPIFY_EVENTS_EVENT_ID],
                ),
                signed_at: None,
                secret_index: Some(index),
            })
        }
        Scheme::WooCommerce => {
            let value = required_header(headers, header::WOOCOMMERCE_SIGNATURE)?;
            let signature = decode_base64_digest(value.as_bytes(), header::WOOCOMMERCE_SIGNATURE)?;
            let index = match_secret(secrets, &[signature], |key| {
                hmac_sha256(key, &[request.body])
            })?;
            Ok(Verified {
                delivery_id: optional_header(headers, &[header::WOOCOMMERCE_DELIVERY_ID]),
                secret_index: Some(index),
                ..Verified::default()
            })
        }
        Scheme::Stripe { tolerance } => verify_stripe(secrets, request, now, tolerance),
        Scheme::HubSpotV3 { tolerance } => verify_hubspot_v3(secrets, request, now, tolerance),
        Scheme::HubSpotV1V2 => verify_hubspot_v1_v2(secrets, request),
        Scheme::PipedriveBasic => {
            let credentials = parse_basic_auth(required_str(headers, header::AUTHORIZATION)?)?;
            // Comparing digests keeps the comparison constant-time whatever the lengths.
            let presented: Digest32 = Sha256::digest(&credentials).into();
            let index = match_secret(secrets, &[presented], |key| Sha256::digest(key).into())?;
            Ok(Verified {
                secret_index: Some(index),
                ..Verified::default()
            })
        }
        Scheme::StandardWebhooks { tolerance } => {
            verify_standard_webhooks(secrets, request, now, tolerance)
        }
        Scheme::Mailgun { tolerance } => {
            providers::verify_mailgun(secrets, request, now, tolerance)
        }
        Scheme::SendGrid { tolerance } => {
            providers::verify_sendgrid(secrets, request, now, tolerance)
        }
        Scheme::Sns => providers::verify_sns(secrets, request),
    }
}

/// Tells whether a request is WooCommerce's creation ping: a form body `webhook_id=<n>` and
/// no signature header (see [`Scheme::is_ping`]).
fn is_woocommerce_ping(headers: &HeaderMap, body: &[u8]) -> bool {
    !headers.contains_key(header::WOOCOMMERCE_SIGNATURE)
        && body
            .strip_prefix(b"webhook_id=")
            .is_some_and(|id| !id.is_empty() && id.iter().all(u8::is_ascii_digit))
}

/// Checks a configured secret's format for `scheme`, so configuration errors surface at load
/// time instead of on the first delivery.
pub fn validate_secret(scheme: &Scheme, secret: &[u8]) -> Result<(), SignatureError> {
    match scheme {
        Scheme::None => Ok(()),
        _ if secret.is_empty() => Err(SignatureError::BadSecret {
            reason: "the secret is empty",
        }),
        Scheme::StandardWebhooks { .. } => standard_webhooks_key(secret).map(drop),
        Scheme::SendGrid { .. } => providers::sendgrid_key(secret).map(drop),
        Scheme::PipedriveBasic if !secret.contains(&b':') => Err(SignatureError::BadSecret {
            reason: "expected user:password",
        }),
        _ => Ok(()),
    }
}

/// An outgoing delivery for [`sign`].
#[derive(Debug, Clone, Copy)]
pub struct Delivery<'a> {
    pub method: &'a str,
    /// The full URL the delivery is sent to (signed by HubSpot schemes).
    pub uri: &'a str,
    pub body: &'a [u8],
    /// Sent as the scheme's delivery id header, if it has one; signed by Standard Webhooks.
    pub id: &'a str,
}

/// Returns the headers a sender using `scheme` attaches to `delivery` at time `now`: the
/// signature, plus the timestamp and id headers the scheme defines. HubSpotV1V2 signs v2.
pub fn sign(
    scheme: &Scheme,
    secret: &[u8],
    delivery: &Delivery<'_>,
    now: SystemTime,
) -> Result<HeaderMap, SignatureError> {
    validate_secret(scheme, secret)?;
    let mut headers = HeaderMap::new();
    let since_epoch = now.duration_since(UNIX_EPOCH).unwrap_or_default();
    match scheme {
        Scheme::None => {}
        Scheme::Shopify => {
            let signature = hmac_sha256(secret, &[delivery.body]);
            insert(
                &mut headers,
                header::SHOPIFY_HMAC,
                &BASE64.encode(signature),
            )?;
            insert(&mut headers, header::SHOPIFY_WEBHOOK_ID, delivery.id)?;
        }
        Scheme::WooCommerce => {
            let signature = hmac_sha256(secret, &[delivery.body]);
            insert(
                &mut headers,
                header::WOOCOMMERCE_SIGNATURE,
                &BASE64.encode(signature),
            )?;
            insert(&mut headers, header::WOOCOMMERCE_DELIVERY_ID, delivery.id)?;
        }
        Scheme::Stripe { .. } => {
            let timestamp = since_epoch.as_secs().to_string();
            let signature = hmac_sha256(secret, &[timestamp.as_bytes(), b".", delivery.body]);
            let value = format!("t={timestamp},v1={}", to_hex(&signature));
            insert(&mut headers, header::STRIPE_SIGNATURE, &value)?;
        }
        Scheme::HubSpotV3 { .. } => {
            let timestamp = since_epoch.as_millis().to_string();
            let signature = hubspot_v3_digest(
                secret,
                delivery.method,
                delivery.uri,
                delivery.body,
                &timestamp,
            );
            insert(
                &mut headers,
                header::HUBSPOT_SIGNATURE_V3,
                &BASE64.encode(signature),
            )?;
            insert(&mut headers, header::HUBSPOT_REQUEST_TIMESTAMP, &timestamp)?;
        }
        Scheme::HubSpotV1V2 => {
            let parts = [
                delivery.method.as_bytes(),
                delivery.uri.as_bytes(),
                delivery.body,
            ];
            let signature = sha256_prefixed(secret, &parts);
            insert(&mut headers, header::HUBSPOT_SIGNATURE, &to_hex(&signature))?;
            insert(&mut headers, header::HUBSPOT_SIGNATURE_VERSION, "v2")?;
        }
        Scheme::PipedriveBasic => {
            let value = format!("Basic {}", BASE64.encode(secret));
            insert(&mut headers, header::AUTHORIZATION, &value)?;
        }
        Scheme::StandardWebhooks { .. } => {
            let key = standard_webhooks_key(secret)?;
            let timestamp = since_epoch.as_secs().to_string();
            let signature = standard_webhooks_digest(&key, delivery.id, &timestamp, delivery.body);
            let value = format!("v1,{}", BASE64.encode(signature));
            insert(&mut headers, header::WEBHOOK_ID, delivery.id)?;
            insert(&mut headers, header::WEBHOOK_TIMESTAMP, &timestamp)?;
            insert(&mut headers, header::WEBHOOK_SIGNATURE, &value)?;
        }
        // Mailgun signs inside the body (`mailgun_signature` builds it); SendGrid and SNS
        // sign with private keys dealsync never holds: no header to add for any.
        Scheme::Mailgun { .. } | Scheme::SendGrid { .. } | Scheme::Sns => {}
    }
    Ok(headers)
}

fn verify_stripe(
    secrets: &[&[u8]],
    request: &Request<'_>,
    now: SystemTime,
    tolerance: Duration,
) -> Result<Verified, SignatureError> {
    const NAME: &str = header::STRIPE_SIGNATURE;
    let value = required_str(request.headers, NAME)?;
    let mut timestamp = None;
    let mut signatures = Vec::new();
    for item in value.split(',') {
        let Some((key, field)) = item.split_once('=') else {
            return Err(malformed(NAME, "expected comma-separated key=value pairs"));
        };
        match key {
            "t" => timestamp = Some(field),
            // As Stripe's libraries do: an undecodable v1 is skipped, other schemes ignored.
            "v1" => signatures.extend(decode_hex_digest(field)),
            _ => {}
        }
    }
    let timestamp = timestamp.ok_or(malformed(NAME, "no t= timestamp"))?;
    let signed_at = parse_timestamp(timestamp, Duration::from_secs, NAME)?;
    if signatures.is_empty() {
        return Err(malformed(NAME, "no v1 signature"));
    }
    let index = match_secret(secrets, &signatures, |key| {
        hmac_sha256(key, &[timestamp.as_bytes(), b".", request.body])
    })?;
    check_window(signed_at, now, tolerance)?;
    Ok(Verified {
        signed_at: Some(signed_at),
        secret_index: Some(index),
        ..Verified::default()
    })
}

fn verify_hubspot_v3(
    secrets: &[&[u8]],
    request: &Request<'_>,
    now: SystemTime,
    tolerance: Duration,
) -> Result<Verified, SignatureError> {
    let value = required_header(request.headers, header::HUBSPOT_SIGNATURE_V3)?;
    let signature = decode_base64_digest(value.as_bytes(), header::HUBSPOT_SIGNATURE_V3)?;
    let timestamp = required_str(request.headers, header::HUBSPOT_REQUEST_TIMESTAMP)?;
    let signed_at = parse_timestamp(
        timestamp,
        Duration::from_millis,
        header::HUBSPOT_REQUEST_TIMESTAMP,
    )?;
    let match_uri = |uri: &str| {
        match_secret(secrets, &[signature], |key| {
            hubspot_v3_digest(key, request.method, uri, request.body, timestamp)
        })
    };
    let index = match match_uri(request.uri) {
        // HubSpot signs the URI after decoding some escapes; the exact list is unconfirmed,
        // so the URI as received is tried first. Either form is bound to this request.
        Err(SignatureError::Mismatch) => match hubspot_decode_uri(request.uri) {
            Cow::Owned(decoded) => match_uri(&decoded),
            Cow::Borrowed(_) => Err(SignatureError::Mismatch),
        },
        other => other,
    }?;
    check_window(signed_at, now, tolerance)?;
    Ok(Verified {
        signed_at: Some(signed_at),
        secret_index: Some(index),
        ..Verified::default()
    })
}

fn verify_hubspot_v1_v2(
    secrets: &[&[u8]],
    request: &Request<'_>,
) -> Result<Verified, SignatureError> {
    let value = required_str(request.headers, header::HUBSPOT_SIGNATURE)?;
    let signature = decode_hex_digest(value).ok_or(malformed(
        header::HUBSPOT_SIGNATURE,
        "expected 64 hex digits",
    ))?;
    let method_and_uri: &[&[u8]] =
        match required_str(request.headers, header::HUBSPOT_SIGNATURE_VERSION)? {
            "v1" => &[],
            "v2" => &[request.method.as_bytes(), request.uri.as_bytes()],
            _ => {
                return Err(malformed(
                    header::HUBSPOT_SIGNATURE_VERSION,
                    "expected v1 or v2",
                ));
            }
        };
    let index = match_secret(secrets, &[signature], |key| {
        sha256_prefixed(key, &[method_and_uri, &[request.body]].concat())
    })?;
    Ok(Verified {
        secret_index: Some(index),
        ..Verified::default()
    })
}

fn verify_standard_webhooks(
    secrets: &[&[u8]],
    request: &Request<'_>,
    now: SystemTime,
    tolerance: Duration,
) -> Result<Verified, SignatureError> {
    let id = required_str(request.headers, header::WEBHOOK_ID)?;
    let timestamp = required_str(request.headers, header::WEBHOOK_TIMESTAMP)?;
    let signed_at = parse_timestamp(timestamp, Duration::from_secs, header::WEBHOOK_TIMESTAMP)?;
    let list = required_str(request.headers, header::WEBHOOK_SIGNATURE)?;
    let mut has_v1 = false;
    let mut signatures = Vec::new();
    for (version, signature) in list.split(' ').filter_map(|entry| entry.split_once(',')) {
        // v1a (ed25519) entries are ignored: only symmetric secrets are supported.
        if version == "v1" {
            has_v1 = true;
            signatures.extend(base64_digest(signature.as_bytes()));
        }
    }
    if !has_v1 {
        return Err(malformed(header::WEBHOOK_SIGNATURE, "no v1 signature"));
    }
    let keys = secrets
        .iter()
        .map(|secret| standard_webhooks_key(secret))
        .collect::<Result<Vec<_>, _>>()?;
    let keys: Vec<&[u8]> = keys.iter().map(Vec::as_slice).collect();
    let index = match_secret(&keys, &signatures, |key| {
        standard_webhooks_digest(key, id, timestamp, request.body)
    })?;
    check_window(signed_at, now, tolerance)?;
    Ok(Verified {
        delivery_id: Some(id.to_owned()),
        signed_at: Some(signed_at),
        secret_index: Some(index),
        ..Verified::default()
    })
}

/// Returns the index of the first non-empty key whose digest equals one of `signatures`.
fn match_secret(
    keys: &[&[u8]],
    signatures: &[Digest32],
    digest: impl Fn(&[u8]) -> Digest32,
) -> Result<usize, SignatureError> {
    let mut any_usable = false;
    for (index, key) in keys.iter().enumerate() {
        // An empty key is one every sender knows.
        if key.is_empty() {
            continue;
        }
        any_usable = true;
        let expected = digest(key);
        let matched = signatures.iter().fold(Choice::from(0), |found, signature| {
            found | signature.ct_eq(&expected)
        });
        if bool::from(matched) {
            return Ok(index);
        }
    }
    if any_usable {
        Err(SignatureError::Mismatch)
    } else {
        Err(SignatureError::BadSecret {
            reason: "no non-empty secret is configured",
        })
    }
}

fn check_window(
    signed_at: SystemTime,
    now: SystemTime,
    tolerance: Duration,
) -> Result<(), SignatureError> {
    let (distance, in_future) = match now.duration_since(signed_at) {
        Ok(age) => (age, false),
        Err(error) => (error.duration(), true),
    };
    if distance <= tolerance {
        return Ok(());
    }
    let secs = i64::try_from(distance.as_secs()).unwrap_or(i64::MAX);
    Err(SignatureError::Stale {
        age_secs: if in_future { -secs } else { secs },
    })
}

fn hmac_sha256(key: &[u8], parts: &[&[u8]]) -> Digest32 {
    let mut mac = HmacSha256::new_from_slice(key).expect("HMAC accepts keys of any length");
    for part in parts {
        mac.update(part);
    }
    mac.finalize().into_bytes().into()
}

/// HubSpot v1/v2: a plain SHA-256 of the secret followed by the message, not an HMAC.
fn sha256_prefixed(secret: &[u8], parts: &[&[u8]]) -> Digest32 {
    let mut hasher = Sha256::new_with_prefix(secret);
    for part in parts {
        hasher.update(part);
    }
    hasher.finalize().into()
}

fn hubspot_v3_digest(
    key: &[u8],
    method: &str,
    uri: &str,
    body: &[u8],
    timestamp: &str,
) -> Digest32 {
    hmac_sha256(
        key,
        &[
            method.as_bytes(),
            uri.as_bytes(),
            body,
            timestamp.as_bytes(),
        ],
    )
}

fn standard_webhooks_digest(key: &[u8], id: &str, timestamp: &str, body: &[u8]) -> Digest32 {
    hmac_sha256(
        key,
        &[id.as_bytes(), b".", timestamp.as_bytes(), b".", body],
    )
}

/// Returns the HMAC key of a Standard Webhooks secret: the base64 after `whsec_`.
fn standard_webhooks_key(secret: &[u8]) -> Result<Vec<u8>, SignatureError> {
    let encoded = secret.strip_prefix(b"whsec_").unwrap_or(secret);
    match BASE64.decode(encoded) {
        Ok(key) if !key.is_empty() => Ok(key),
        _ => Err(SignatureError::BadSecret {
            reason: "expected whsec_ followed by non-empty base64",
        }),
    }
}

/// Decodes the escapes HubSpot's docs say are decoded before a v3 URI is signed.
fn hubspot_decode_uri(uri: &str) -> Cow<'_, str> {
    const DECODED: &str = ":/?@!$'()*,;";
    if !uri.contains('%') {
        return Cow::Borrowed(uri);
    }
    let mut decoded = String::with_capacity(uri.len());
    let mut rest = uri;
    while let Some((before, after)) = rest.split_once('%') {
        decoded.push_str(before);
        let escaped = after
            .get(..2)
            .filter(|hex| hex.bytes().all(|byte| byte.is_ascii_hexdigit()))
            .and_then(|hex| u8::from_str_radix(hex, 16).ok())
            .map(char::from)
            .filter(|character| DECODED.contains(*character));
        match escaped {
            Some(character) => {
                decoded.push(character);
                // Two ASCII hex digits: index 2 is a character boundary.
                rest = after.get(2..).unwrap_or_default();
            }
            None => {
                decoded.push('%');
                rest = after;
            }
        }
    }
    decoded.push_str(rest);
    if decoded == uri {
        Cow::Borrowed(uri)
    } else {
        Cow::Owned(decoded)
    }
}

fn parse_basic_auth(value: &str) -> Result<Vec<u8>, SignatureError> {
    const NAME: &str = header::AUTHORIZATION;
    let (scheme, credentials) = value
        .split_once(' ')
        .ok_or(malformed(NAME, "expected Basic credentials"))?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return Err(malformed(NAME, "expected Basic credentials"));
    }
    BASE64
        .decode(credentials.trim())
        .map_err(|_| malformed(NAME, "credentials are not base64"))
}

fn parse_timestamp(
    value: &str,
    unit: fn(u64) -> Duration,
    name: &'static str,
) -> Result<SystemTime, SignatureError> {
    let number = Some(value)
        .filter(|value| !value.is_empty() && value.bytes().all(|byte| byte.is_ascii_digit()))
        .and_then(|value| value.parse().ok())
        .ok_or(malformed(name, "expected an integer timestamp"))?;
    UNIX_EPOCH
        .checked_add(unit(number))
        .ok_or(malformed(name, "timestamp out of range"))
}

fn decode_base64_digest(value: &[u8], name: &'static str) -> Result<Digest32, SignatureError> {
    base64_digest(value).ok_or(malformed(name, "expected a base64 SHA-256 digest"))
}

fn base64_digest(value: &[u8]) -> Option<Digest32> {
    let raw: Vec<u8> = BASE64.decode(value).ok()?;
    raw.try_into().ok()
}

fn decode_hex_digest(value: &str) -> Option<Digest32> {
    let hex = value.as_bytes();
    if hex.len() != 64 {
        return None;
    }
    let mut digest = [0; 32];
    for (byte, pair) in digest.iter_mut().zip(hex.chunks_exact(2)) {
        *byte = u8::from_str_radix(std::str::from_utf8(pair).ok()?, 16).ok()?;
    }
    Some(digest)
}

fn to_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}

fn malformed(header: &'static str, reason: &'static str) -> SignatureError {
    SignatureError::Malformed { header, reason }
}

fn required_header<'h>(
    headers: &'h HeaderMap,
    name: &'static str,
) -> Result<&'h HeaderValue, SignatureError> {
    headers
        .get(name)
        .ok_or(SignatureError::Missing { header: name })
}

fn required_str<'h>(headers: &'h HeaderMap, name: &'static str) -> Result<&'h str, SignatureError> {
    required_header(headers, name)?
        .to_str()
        .map_err(|_| malformed(name, "not visible ASCII"))
}

/// Returns the first of `names` present; `Missing` names the first.
fn first_header<'h>(
    headers: &'h HeaderMap,
    names: &[&'static str],
) -> Result<(&'static str, &'h HeaderValue), SignatureError> {
    names
        .iter()
        .find_map(|name| headers.get(*name).map(|value| (*name, value)))
        .ok_or(SignatureError::Missing { header: names[0] })
}

fn optional_header(headers: &HeaderMap, names: &[&'static str]) -> Option<String> {
    let (_, value) = first_header(headers, names).ok()?;
    value.to_str().ok().map(str::to_owned)
}

fn insert(headers: &mut HeaderMap, name: &'static str, value: &str) -> Result<(), SignatureError> {
    let value =
        HeaderValue::from_str(value).map_err(|_| malformed(name, "not a valid header value"))?;
    headers.insert(HeaderName::from_static(name), value);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const URI: &str = "https://dealsync.example.com/hooks/test";

    const SHOPIFY_SECRET: &str = "test_secret_key";
    const SHOPIFY_BODY: &str = r#"{"foo": "bar"}"#;
    const SHOPIFY_HMAC: &str = "B23tXN681gZ0qIWNRrgtzBE9XSDo5yaUu6wfmhu3a7g=";

    const WOO_SECRET: &str = "wc_webhook_secret";
    const WOO_BODY: &str = r#"{"id":727,"status":"processing"}"#;
    const WOO_SIGNATURE: &str = "IoHtI0HQvFbpo2s7ecatIj6HSJZb1hVZkyMYm6lta4c=";

    const STRIPE_SECRET: &str = "whsec_test_secret";
    const STRIPE_T: u64 = 1768986405;
    const STRIPE_BODY: &str = r#"{"id":"evt_test_webhook","object":"event"}"#;
    const STRIPE_HEADER: &str =
        "t=1768986405,v1=6e2884537b6362786e3cfa480cc1658b590b0f4dd8c7b94699559b0f7d0b8d9c";

    const HUBSPOT_SECRET: &str = "yyyyyyyy-yyyy-yyyy-yyyy-yyyyyyyyyyyy";
    const HUBSPOT_URI: &str = "https://www.example.com/webhook_uri";
    const HUBSPOT_BODY: &str = "{'example_field':'example_value'}";
    const HUBSPOT_V3_TS: &str = "1693657560000";
    const HUBSPOT_V3_SIGNATURE: &str = "K36dawei4A+QBNolUOqo7s91KQDWQ5MXZ/QufNYuk/Y=";

    const SW_SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    const SW_ID: &str = "msg_p5jXN8AQM9LWM0D4loKWxJek";
    const SW_TS: u64 = 1614265330;
    const SW_BODY: &str = r#"{"test": 2432232314}"#;
    const SW_SIGNATURE: &str = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=";

    fn at_secs(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(secs)
    }

    fn header_map(pairs: &[(&str, &str)]) -> HeaderMap {
        pairs
            .iter()
            .map(|(name, value)| {
                (
                    HeaderName::from_bytes(name.as_bytes()).expect("test header name"),
                    HeaderValue::from_str(value).expect("test header value"),
                )
            })
            .collect()
    }

    fn check(
        scheme: Scheme,
        secrets: &[&str],
        method: &str,
        uri: &str,
        headers: &HeaderMap,
        body: &str,
        now: SystemTime,
    ) -> Result<Verified, SignatureError> {
        let secrets: Vec<&[u8]> = secrets.iter().map(|secret| secret.as_bytes()).collect();
        let request = Request {
            method,
            uri,
            headers,
            body: body.as_bytes(),
        };
        verify(&scheme, &secrets, &request, now)
    }

    fn post(
        scheme: Scheme,
        secrets: &[&str],
        headers: &HeaderMap,
        body: &str,
        now: SystemTime,
    ) -> Result<Verified, SignatureError> {
        check(scheme, secrets, "POST", URI, headers, body, now)
    }

    fn stripe() -> Scheme {
        Scheme::Stripe {
            tolerance: DEFAULT_TOLERANCE,
        }
    }

    fn hubspot_v3() -> Scheme {
        Scheme::HubSpotV3 {
            tolerance: DEFAULT_TOLERANCE,
        }
    }

    fn standard_webhooks() -> Scheme {
        Scheme::StandardWebhooks {
            tolerance: DEFAULT_TOLERANCE,
        }
    }

    /// Every scheme with a secret in its expected format: (scheme, secret, other secret).
    fn signed_schemes() -> Vec<(Scheme, &'static str, &'static str)> {
        vec![
            (Scheme::Shopify, SHOPIFY_SECRET, "other_secret"),
            (Scheme::WooCommerce, WOO_SECRET, "other_secret"),
            (stripe(), STRIPE_SECRET, "whsec_other"),
            (hubspot_v3(), HUBSPOT_SECRET, "zzzzzzzz-zzzz"),
            (Scheme::HubSpotV1V2, HUBSPOT_SECRET, "zzzzzzzz-zzzz"),
            (Scheme::PipedriveBasic, "hook:s3cret", "hook:other"),
            (
                standard_webhooks(),
                SW_SECRET,
                "whsec_b3RoZXJfc2VjcmV0X2tleV8xMjM0",
            ),
        ]
    }

    fn signed(scheme: Scheme, secret: &str, body: &str, now: SystemTime) -> HeaderMap {
        let delivery = Delivery {
            method: "POST",
            uri: URI,
            body: body.as_bytes(),
            id: "delivery-1",
        };
        sign(&scheme, secret.as_bytes(), &delivery, now).expect("test secrets are well-formed")
    }

    /// A vendor's published example: the scheme, its secret, where the body was sent,
    /// the body, and the clock it was signed at.
    struct Vector {
        scheme: Scheme,
        secret: &'static str,
        uri: &'static str,
        body: &'static str,
        now: SystemTime,
    }

    impl Vector {
        /// Verifies a POST of the example's body with `headers`, with its secret at its
        /// clock.
        fn post(&self, headers: &HeaderMap) -> Result<Verified, SignatureError> {
            check(
                self.scheme,
                &[self.secret],
                "POST",
                self.uri,
                headers,
                self.body,
                self.now,
            )
        }
    }

    fn shopify_vector() -> Vector {
        Vector {
            scheme: Scheme::Shopify,
            secret: SHOPIFY_SECRET,
            uri: URI,
            body: SHOPIFY_BODY,
            now: at_secs(0),
        }
    }

    fn woo_vector() -> Vector {
        Vector {
            scheme: Scheme::WooCommerce,
            secret: WOO_SECRET,
            uri: URI,
            body: WOO_BODY,
            now: at_secs(0),
        }
    }

    fn stripe_vector() -> Vector {
        Vector {
            scheme: stripe(),
            secret: STRIPE_SECRET,
            uri: URI,
            body: STRIPE_BODY,
            now: at_secs(STRIPE_T),
        }
    }

    fn hubspot_v3_vector() -> Vector {
        Vector {
            scheme: hubspot_v3(),
            secret: HUBSPOT_SECRET,
            uri: HUBSPOT_URI,
            body: HUBSPOT_BODY,
            now: UNIX_EPOCH + Duration::from_millis(1693657560000),
        }
    }

    fn sw_vector() -> Vector {
        Vector {
            scheme: standard_webhooks(),
            secret: SW_SECRET,
            uri: URI,
            body: SW_BODY,
            now: at_secs(SW_TS),
        }
    }

    #[test]
    fn shopify_official_vector_verifies_and_reports_the_delivery_and_event_ids() {
        let headers = header_map(&[
            ("X-Shopify-Hmac-Sha256", SHOPIFY_HMAC),
            (
                "X-Shopify-Webhook-Id",
                "b54557e4-bdd9-4b37-8a5f-bf7d70bcd043",
            ),
            ("X-Shopify-Event-Id", "98880550-7158-44d4-b7cd-2c97c8a091b5"),
        ]);

        let verified = shopify_vector().post(&headers);

        assert_eq!(
            verified,
            Ok(Verified {
                delivery_id: Some("b54557e4-bdd9-4b37-8a5f-bf7d70bcd043".into()),
                event_id: Some("98880550-7158-44d4-b7cd-2c97c8a091b5".into()),
                signed_at: None,
                secret_index: Some(0),
            })
        );
    }

    #[test]
    fn shopify_events_deliveries_with_lowercase_unprefixed_headers_verify() {
        let headers = header_map(&[
            ("shopify-hmac-sha256", SHOPIFY_HMAC),
            ("shopify-event-id", "evt-1"),
        ]);

        let verified = shopify_vector().post(&headers);

        assert_eq!(verified.map(|v| v.event_id), Ok(Some("evt-1".into())));
    }

    #[test]
    fn woocommerce_vector_verifies_and_reports_the_delivery_id() {
        let headers = header_map(&[
            ("X-WC-Webhook-Signature", WOO_SIGNATURE),
            ("X-WC-Webhook-Delivery-ID", "a1b2c3"),
        ]);

        let verified = woo_vector().post(&headers);

        assert_eq!(verified.map(|v| v.delivery_id), Ok(Some("a1b2c3".into())));
    }

    #[test]
    fn stripe_vector_verifies_and_reports_the_signed_timestamp() {
        let headers = header_map(&[("Stripe-Signature", STRIPE_HEADER)]);

        let verified = stripe_vector().post(&headers);

        assert_eq!(verified.map(|v| v.signed_at), Ok(Some(at_secs(STRIPE_T))));
    }

    #[test]
    fn stripe_accepts_any_v1_entry_and_ignores_other_schemes() {
        let zeros = "0".repeat(64);
        let valid = STRIPE_HEADER.rsplit_once("v1=").expect("vector has v1").1;
        let value = format!("t={STRIPE_T},v0={zeros},v1={zeros},v1=nothex,v1={valid},x=y");
        let headers = header_map(&[("stripe-signature", &value)]);

        let verified = stripe_vector().post(&headers);

        assert!(verified.is_ok(), "{verified:?}");
    }

    /// A header that lists the matching signature more than once (a sender or proxy
    /// repeating the entry) is as authentic as one that lists it once.
    #[test]
    fn stripe_accepts_the_matching_v1_entry_listed_twice() {
        let valid = STRIPE_HEADER.rsplit_once("v1=").expect("vector has v1").1;
        let value = format!("t={STRIPE_T},v1={valid},v1={valid}");
        let headers = header_map(&[("stripe-signature", &value)]);

        let verified = stripe_vector().post(&headers);

        assert_eq!(verified.map(|v| v.secret_index), Ok(Some(0)));
    }

    #[test]
    fn hubspot_v3_official_vector_verifies_with_the_clock_at_its_timestamp() {
        let headers = header_map(&[
            ("X-HubSpot-Signature-v3", HUBSPOT_V3_SIGNATURE),
            ("X-HubSpot-Request-Timestamp", HUBSPOT_V3_TS),
        ]);
        let vector = hubspot_v3_vector();

        let verified = vector.post(&headers);

        assert_eq!(verified.map(|v| v.signed_at), Ok(Some(vector.now)));
    }

    #[test]
    fn hubspot_v3_accepts_a_signature_over_the_percent_decoded_uri() {
        let decoded_uri = "https://dealsync.example.com/hooks/hubspot?next=/a:b";
        let received_uri = "https://dealsync.example.com/hooks/hubspot?next=%2Fa%3ab";
        let delivery = Delivery {
            method: "POST",
            uri: decoded_uri,
            body: b"[]",
            id: "",
        };
        let now = at_secs(1_700_000_000);
        let headers =
            sign(&hubspot_v3(), HUBSPOT_SECRET.as_bytes(), &delivery, now).expect("valid secret");

        let verified = check(
            hubspot_v3(),
            &[HUBSPOT_SECRET],
            "POST",
            received_uri,
            &headers,
            "[]",
            now,
        );

        assert!(verified.is_ok(), "{verified:?}");
        assert_eq!(hubspot_decode_uri("/a%2f%zz%41%"), "/a/%zz%41%");
        assert_eq!(hubspot_decode_uri("/é%é%2fé%"), "/é%é/é%");
    }

    #[test]
    fn hubspot_v1_and_v2_official_vectors_verify() {
        let v1_body = r#"[{"eventId":1,"subscriptionId":12345,"portalId":62515,"occurredAt":1564113600000,"subscriptionType":"contact.creation","attemptNumber":0,"objectId":123,"changeSource":"CRM","changeFlag":"NEW","appId":54321}]"#;
        let cases = [
            (
                "v1",
                "POST",
                v1_body,
                "232db2615f3d666fe21a8ec971ac7b5402d33b9a925784df3ca654d05f4817de",
            ),
            (
                "v2",
                "GET",
                "",
                "eee2dddcc73c94d699f5e395f4b9d454a069a6855fbfa152e91e88823087200e",
            ),
            (
                "v2",
                "POST",
                r#"{"example_field":"example_value"}"#,
                "9569219f8ba981ffa6f6f16aa0f48637d35d728c7e4d93d0d52efaa512af7900",
            ),
            (
                "v1",
                "POST",
                HUBSPOT_BODY,
                "69fc6631a867edd4f9e9e627fc5c1148e3fbdd8b21837b6d2b8901c1fa57f750",
            ),
            (
                "v2",
                "POST",
                HUBSPOT_BODY,
                "4fe4e3a7d3cf09db53be39d0a58130e2aaba074ec123a9e355b876a689a1c383",
            ),
        ];
        for (version, method, body, expected) in cases {
            let headers = header_map(&[
                ("X-HubSpot-Signature", expected),
                ("X-HubSpot-Signature-Version", version),
            ]);

            let verified = check(
                Scheme::HubSpotV1V2,
                &[HUBSPOT_SECRET],
                method,
                HUBSPOT_URI,
                &headers,
                body,
                at_secs(0),
            );

            assert!(verified.is_ok(), "{version} {method}: {verified:?}");
        }
    }

    #[test]
    fn standard_webhooks_official_vector_verifies_and_reports_the_message_id() {
        let headers = header_map(&[
            ("webhook-id", SW_ID),
            ("webhook-timestamp", &SW_TS.to_string()),
            ("webhook-signature", SW_SIGNATURE),
        ]);

        let verified = sw_vector().post(&headers);

        assert_eq!(
            verified,
            Ok(Verified {
                delivery_id: Some(SW_ID.into()),
                event_id: None,
                signed_at: Some(at_secs(SW_TS)),
                secret_index: Some(0),
            })
        );
    }

    #[test]
    fn standard_webhooks_official_negative_vector_is_a_mismatch() {
        let headers = header_map(&[
            ("webhook-id", SW_ID),
            ("webhook-timestamp", &SW_TS.to_string()),
            (
                "webhook-signature",
                "v1,Ceo5qEr07ixe2NLpvHk3FH9bwy/WavXrAFQ/9tdO6mc=",
            ),
        ]);

        let verified = sw_vector().post(&headers);

        assert_eq!(verified, Err(SignatureError::Mismatch));
    }

    #[test]
    fn standard_webhooks_accepts_any_v1_in_a_space_separated_list() {
        let value = format!(
            "v1a,c2lnbmF0dXJl v1,Ceo5qEr07ixe2NLpvHk3FH9bwy/WavXrAFQ/9tdO6mc= {SW_SIGNATURE}"
        );
        let headers = header_map(&[
            ("webhook-id", SW_ID),
            ("webhook-timestamp", &SW_TS.to_string()),
            ("webhook-signature", &value),
        ]);

        let verified = sw_vector().post(&headers);

        assert!(verified.is_ok(), "{verified:?}");
    }

    #[test]
    fn signing_reproduces_the_official_vectors() {
        let cases = [
            (shopify_vector(), "", header::SHOPIFY_HMAC, SHOPIFY_HMAC),
            (
                woo_vector(),
                "",
                header::WOOCOMMERCE_SIGNATURE,
                WOO_SIGNATURE,
            ),
            (stripe_vector(), "", header::STRIPE_SIGNATURE, STRIPE_HEADER),
            (
                hubspot_v3_vector(),
                "",
                header::HUBSPOT_SIGNATURE_V3,
                HUBSPOT_V3_SIGNATURE,
            ),
            (sw_vector(), SW_ID, header::WEBHOOK_SIGNATURE, SW_SIGNATURE),
        ];
        for (vector, id, name, expected) in cases {
            let delivery = Delivery {
                method: "POST",
                uri: vector.uri,
                body: vector.body.as_bytes(),
                id,
            };

            let headers = sign(
                &vector.scheme,
                vector.secret.as_bytes(),
                &delivery,
                vector.now,
            )
            .expect("valid secret");

            assert_eq!(
                headers[name].to_str().expect("ascii"),
                expected,
                "{:?}",
                vector.scheme
            );
        }
    }

    #[test]
    fn every_scheme_verifies_what_it_signs() {
        let now = at_secs(1_700_000_000);
        for (scheme, secret, _) in signed_schemes() {
            let headers = signed(scheme, secret, "{}", now);

            let verified = post(scheme, &[secret], &headers, "{}", now);

            assert_eq!(verified.map(|v| v.secret_index), Ok(Some(0)), "{scheme:?}");
        }
    }

    #[test]
    fn a_wrong_secret_is_a_mismatch_for_every_scheme() {
        let now = at_secs(1_700_000_000);
        for (scheme, secret, other) in signed_schemes() {
            let headers = signed(scheme, secret, "{}", now);

            let verified = post(scheme, &[other], &headers, "{}", now);

            assert_eq!(verified, Err(SignatureError::Mismatch), "{scheme:?}");
        }
    }

    #[test]
    fn a_tampered_body_is_a_mismatch_for_every_scheme_that_signs_the_body() {
        let now = at_secs(1_700_000_000);
        for (scheme, secret, _) in signed_schemes() {
            if scheme == Scheme::PipedriveBasic {
                continue; // Basic auth does not cover the body.
            }
            let headers = signed(scheme, secret, r#"{"amount":1}"#, now);

            let verified = post(scheme, &[secret], &headers, r#"{"amount":9}"#, now);

            assert_eq!(verified, Err(SignatureError::Mismatch), "{scheme:?}");
        }
    }

    #[test]
    fn during_rotation_the_second_secret_matching_is_enough() {
        let now = at_secs(1_700_000_000);
        for (scheme, secret, other) in signed_schemes() {
            let headers = signed(scheme, secret, "{}", now);

            let verified = post(scheme, &[other, secret], &headers, "{}", now);

            assert_eq!(verified.map(|v| v.secret_index), Ok(Some(1)), "{scheme:?}");
        }
    }

    #[test]
    fn a_timestamp_older_than_the_tolerance_is_stale() {
        let signed_at = at_secs(1_700_000_000);
        for (scheme, secret, _) in signed_schemes() {
            if !matches!(
                scheme,
                Scheme::Stripe { .. } | Scheme::HubSpotV3 { .. } | Scheme::StandardWebhooks { .. }
            ) {
                continue;
            }
            let headers = signed(scheme, secret, "{}", signed_at);

            let just_in_time = post(
                scheme,
                &[secret],
                &headers,
                "{}",
                signed_at + DEFAULT_TOLERANCE,
            );
            let too_late = post(
                scheme,
                &[secret],
                &headers,
                "{}",
                signed_at + Duration::from_secs(301),
            );

            assert!(just_in_time.is_ok(), "{scheme:?}: {just_in_time:?}");
            assert_eq!(
                too_late,
                Err(SignatureError::Stale { age_secs: 301 }),
                "{scheme:?}"
            );
        }
    }

    #[test]
    fn a_standard_webhooks_timestamp_too_far_in_the_future_is_stale() {
        let signed_at = at_secs(1_700_000_000);
        let headers = signed(standard_webhooks(), SW_SECRET, "{}", signed_at);

        let verified = post(
            standard_webhooks(),
            &[SW_SECRET],
            &headers,
            "{}",
            signed_at - Duration::from_secs(400),
        );

        assert_eq!(verified, Err(SignatureError::Stale { age_secs: -400 }));
    }

    #[test]
    fn a_forged_old_delivery_is_a_mismatch_not_stale() {
        let headers = header_map(&[("Stripe-Signature", STRIPE_HEADER)]);

        let verified = post(
            stripe(),
            &["whsec_other"],
            &headers,
            STRIPE_BODY,
            at_secs(STRIPE_T + 3600),
        );

        assert_eq!(verified, Err(SignatureError::Mismatch));
    }

    #[test]
    fn a_missing_signature_header_is_reported_by_name() {
        let cases = [
            (Scheme::Shopify, header::SHOPIFY_HMAC),
            (Scheme::WooCommerce, header::WOOCOMMERCE_SIGNATURE),
            (stripe(), header::STRIPE_SIGNATURE),
            (hubspot_v3(), header::HUBSPOT_SIGNATURE_V3),
            (Scheme::HubSpotV1V2, header::HUBSPOT_SIGNATURE),
            (Scheme::PipedriveBasic, header::AUTHORIZATION),
            (standard_webhooks(), header::WEBHOOK_ID),
        ];
        for (scheme, missing) in cases {
            let verified = post(scheme, &["secret"], &HeaderMap::new(), "{}", at_secs(0));

            assert_eq!(
                verified,
                Err(SignatureError::Missing { header: missing }),
                "{scheme:?}"
            );
        }
    }

    #[test]
    fn a_missing_timestamp_header_is_reported_by_name() {
        let headers = header_map(&[("X-HubSpot-Signature-v3", HUBSPOT_V3_SIGNATURE)]);

        let verified = post(hubspot_v3(), &[HUBSPOT_SECRET], &headers, "{}", at_secs(0));

        assert_eq!(
            verified,
            Err(SignatureError::Missing {
                header: header::HUBSPOT_REQUEST_TIMESTAMP
            })
        );
    }

    #[test]
    fn malformed_headers_are_reported_by_name() {
        let sw = |timestamp: &str, signature: &str| {
            header_map(&[
                ("webhook-id", SW_ID),
                ("webhook-timestamp", timestamp),
                ("webhook-signature", signature),
            ])
        };
        let cases = [
            (
                Scheme::Shopify,
                header_map(&[("X-Shopify-Hmac-Sha256", "not base64!")]),
                header::SHOPIFY_HMAC,
            ),
            (
                Scheme::WooCommerce,
                header_map(&[("X-WC-Webhook-Signature", "c2hvcnQ=")]),
                header::WOOCOMMERCE_SIGNATURE,
            ),
            (
                stripe(),
                header_map(&[("Stripe-Signature", "garbage")]),
                header::STRIPE_SIGNATURE,
            ),
            (
                stripe(),
                header_map(&[("Stripe-Signature", "v1=00")]),
                header::STRIPE_SIGNATURE,
            ),
            (
                stripe(),
                header_map(&[("Stripe-Signature", "t=soon,v1=00")]),
                header::STRIPE_SIGNATURE,
            ),
            (
                stripe(),
                header_map(&[("Stripe-Signature", "t=1,v0=00")]),
                header::STRIPE_SIGNATURE,
            ),
            (
                hubspot_v3(),
                header_map(&[
                    ("X-HubSpot-Signature-v3", HUBSPOT_V3_SIGNATURE),
                    ("X-HubSpot-Request-Timestamp", "-5"),
                ]),
                header::HUBSPOT_REQUEST_TIMESTAMP,
            ),
            (
                Scheme::HubSpotV1V2,
                header_map(&[
                    ("X-HubSpot-Signature", &"0".repeat(64)),
                    ("X-HubSpot-Signature-Version", "v9"),
                ]),
                header::HUBSPOT_SIGNATURE_VERSION,
            ),
            (
                Scheme::PipedriveBasic,
                header_map(&[("Authorization", "Bearer abc")]),
                header::AUTHORIZATION,
            ),
            (
                standard_webhooks(),
                sw("1e9", SW_SIGNATURE),
                header::WEBHOOK_TIMESTAMP,
            ),
            // Rust's integer parser takes a leading sign; the header's grammar does not.
            (
                standard_webhooks(),
                sw("+1614265330", SW_SIGNATURE),
                header::WEBHOOK_TIMESTAMP,
            ),
            (
                standard_webhooks(),
                sw("1614265330", "v1a,c2ln"),
                header::WEBHOOK_SIGNATURE,
            ),
        ];
        for (scheme, headers, name) in cases {
            let verified = post(scheme, &["secret"], &headers, "{}", at_secs(0));

            assert!(
                matches!(verified, Err(SignatureError::Malformed { header, .. }) if header == name),
                "{scheme:?} {headers:?}: {verified:?}"
            );
        }
    }

    #[test]
    fn no_usable_secret_is_a_configuration_error_not_a_mismatch() {
        let headers = header_map(&[("X-Shopify-Hmac-Sha256", SHOPIFY_HMAC)]);

        let none = post(Scheme::Shopify, &[], &headers, SHOPIFY_BODY, at_secs(0));
        let empty = post(Scheme::Shopify, &[""], &headers, SHOPIFY_BODY, at_secs(0));

        assert!(
            matches!(none, Err(SignatureError::BadSecret { .. })),
            "{none:?}"
        );
        assert!(
            matches!(empty, Err(SignatureError::BadSecret { .. })),
            "{empty:?}"
        );
    }

    #[test]
    fn validate_secret_rejects_secrets_in_the_wrong_format() {
        assert!(validate_secret(&Scheme::Shopify, b"").is_err());
        assert!(validate_secret(&standard_webhooks(), b"whsec_not base64!").is_err());
        assert!(validate_secret(&standard_webhooks(), b"whsec_").is_err());
        assert!(validate_secret(&Scheme::PipedriveBasic, b"no-colon").is_err());
        assert!(validate_secret(&standard_webhooks(), SW_SECRET.as_bytes()).is_ok());
        assert!(validate_secret(&Scheme::PipedriveBasic, b"user:pass").is_ok());
        assert!(validate_secret(&Scheme::None, b"").is_ok());
    }

    #[test]
    fn pipedrive_accepts_only_the_configured_basic_credentials() {
        let lowercase_scheme = header_map(&[("authorization", "basic aG9vazpzM2NyZXQ=")]);
        let wrong_password = header_map(&[("Authorization", "Basic aG9vazpzM2NyZXQh")]);

        let accepted = post(
            Scheme::PipedriveBasic,
            &["hook:s3cret"],
            &lowercase_scheme,
            "{}",
            at_secs(0),
        );
        let rejected = post(
            Scheme::PipedriveBasic,
            &["hook:s3cret"],
            &wrong_password,
            "{}",
            at_secs(0),
        );

        assert!(accepted.is_ok(), "{accepted:?}");
        assert_eq!(rejected, Err(SignatureError::Mismatch));
    }

    #[test]
    fn scheme_none_accepts_an_unsigned_delivery() {
        let verified = post(Scheme::None, &[], &HeaderMap::new(), "{}", at_secs(0));

        assert_eq!(verified, Ok(Verified::default()));
    }

    #[test]
    fn a_woocommerce_ping_is_recognised_only_without_a_signature_header() {
        let unsigned = HeaderMap::new();
        let signed_headers = header_map(&[("X-WC-Webhook-Signature", WOO_SIGNATURE)]);

        assert!(is_woocommerce_ping(&unsigned, b"webhook_id=42"));
        assert!(!is_woocommerce_ping(&signed_headers, b"webhook_id=42"));
        assert!(!is_woocommerce_ping(&unsigned, b"webhook_id="));
        assert!(!is_woocommerce_ping(&unsigned, b"webhook_id=42&x=1"));
        assert!(!is_woocommerce_ping(&unsigned, WOO_BODY.as_bytes()));
    }

    #[test]
    fn only_woocommerce_takes_a_request_for_a_ping() {
        let unsigned = HeaderMap::new();
        assert!(Scheme::WooCommerce.is_ping(&unsigned, b"webhook_id=42"));
        for scheme in [Scheme::Shopify, Scheme::PipedriveBasic, Scheme::None] {
            assert!(!scheme.is_ping(&unsigned, b"webhook_id=42"), "{scheme:?}");
        }
    }

    #[test]
    fn the_topic_comes_from_the_vendors_own_topic_headers_first_match_first() {
        let shopify = header_map(&[
            ("shopify-topic", "orders/create"),
            ("x-shopify-topic", "checkouts/create"),
        ]);
        assert_eq!(
            Scheme::Shopify.topic(&shopify).as_deref(),
            Some("checkouts/create")
        );
        let events = header_map(&[("shopify-topic", "orders/create")]);
        assert_eq!(
            Scheme::Shopify.topic(&events).as_deref(),
            Some("orders/create")
        );
        let woo = header_map(&[("x-wc-webhook-topic", "order.updated")]);
        assert_eq!(
            Scheme::WooCommerce.topic(&woo).as_deref(),
            Some("order.updated")
        );
        let tolerance = DEFAULT_TOLERANCE;
        for scheme in [
            Scheme::Stripe { tolerance },
            Scheme::HubSpotV3 { tolerance },
            Scheme::PipedriveBasic,
            Scheme::None,
        ] {
            assert_eq!(scheme.topic(&HeaderMap::new()), None, "{scheme:?}");
        }
    }

    #[test]
    fn the_delivery_id_is_the_vendors_id_else_the_bodys_id_else_a_hash_of_the_body() {
        let tolerance = DEFAULT_TOLERANCE;
        let signed_id = Verified {
            delivery_id: Some("d-1".into()),
            event_id: Some("e-1".into()),
            ..Verified::default()
        };
        assert_eq!(Scheme::Shopify.delivery_id(&signed_id, b"{}"), "d-1");
        let event_only = Verified {
            event_id: Some("e-1".into()),
            ..Verified::default()
        };
        assert_eq!(Scheme::Shopify.delivery_id(&event_only, b"{}"), "e-1");
        let none = Verified::default();
        let stripe = Scheme::Stripe { tolerance };
        assert_eq!(stripe.delivery_id(&none, br#"{"id":"evt_1"}"#), "evt_1");
        assert_eq!(
            Scheme::PipedriveBasic.delivery_id(&none, br#"{"meta":{"id":"m-9"}}"#),
            "m-9"
        );
        // Another scheme does not read those ids: the body's hash is the key.
        assert_eq!(
            Scheme::None.delivery_id(&none, b"abc"),
            "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        // HubSpot's retries differ only in `attemptNumber`: the same key.
        let hubspot = Scheme::HubSpotV3 { tolerance };
        let first = hubspot.delivery_id(&none, br#"[{"eventId":1,"attemptNumber":0}]"#);
        let retry = hubspot.delivery_id(&none, br#"[{"eventId":1,"attemptNumber":3}]"#);
        assert_eq!(first, retry);
        assert!(first.starts_with("sha256:"), "{first}");
        assert_ne!(
            first,
            hubspot.delivery_id(&none, br#"[{"eventId":2,"attemptNumber":0}]"#)
        );
    }

    #[test]
    fn every_scheme_name_parses_and_an_unknown_one_is_refused_naming_the_known_ones() {
        let tolerance = DEFAULT_TOLERANCE;
        let named = [
            ("hubspot_v3", Scheme::HubSpotV3 { tolerance }),
            ("hubspot_v1v2", Scheme::HubSpotV1V2),
            ("pipedrive_basic", Scheme::PipedriveBasic),
            ("shopify", Scheme::Shopify),
            ("woocommerce", Scheme::WooCommerce),
            ("stripe", Scheme::Stripe { tolerance }),
            ("standard_webhooks", Scheme::StandardWebhooks { tolerance }),
            ("none", Scheme::None),
        ];
        for (name, scheme) in named {
            let parsed: SchemeName = name.parse().unwrap();
            assert_eq!(parsed.scheme(), scheme, "{name}");
        }
        let error = "shopfiy".parse::<SchemeName>().unwrap_err().to_string();
        assert!(
            error.contains("shopfiy") && error.contains("standard_webhooks"),
            "{error}"
        );
    }

    #[test]
    fn errors_never_reveal_the_secret_or_the_expected_signature() {
        let now = at_secs(1_700_000_000);
        for (scheme, secret, other) in signed_schemes() {
            let genuine = signed(scheme, secret, "{}", now);
            let forged = signed(scheme, other, "{}", now);
            let failures = [
                post(scheme, &[secret], &forged, "{}", now),
                post(
                    scheme,
                    &[secret],
                    &genuine,
                    "{}",
                    now + Duration::from_secs(3600),
                ),
                post(scheme, &[secret], &genuine, "tampered", now),
            ];

            for error in failures.into_iter().filter_map(Result::err) {
                let rendered = format!("{error} {error:?}");
                assert!(!rendered.contains(secret), "{rendered}");
                for value in genuine.values() {
                    let value = value.to_str().expect("ascii");
                    assert!(value.len() < 16 || !rendered.contains(value), "{rendered}");
                }
            }
        }
    }

    /// Runs every vector in the vendored fixtures (`tests/fixtures`, see its PROVENANCE.md).
    #[test]
    fn every_shared_fixture_vector_verifies_as_documented() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
        // The fixtures are part of the repository (the report tests include one at
        // compile time), so their absence is a broken checkout, never a skip.
        assert!(root.is_dir(), "{} is absent", root.display());
        let load = |vendor: &str| -> serde_json::Value {
            let path = root.join(vendor).join("signature-vectors.json");
            let text = std::fs::read_to_string(&path).expect("fixture is readable");
            serde_json::from_str(&text).expect("fixture is JSON")
        };
        let text = |vector: &serde_json::Value, key: &str| -> String {
            vector[key]
                .as_str()
                .unwrap_or_else(|| panic!("{key} is a string"))
                .to_owned()
        };
        let expect_valid =
            |vector: &serde_json::Value| vector["expect_valid"].as_bool().unwrap_or(true);
        let mut count = 0;

        for vector in load("shopify")["vectors"].as_array().expect("vectors") {
            let headers = header_map(&[("X-Shopify-Hmac-Sha256", &text(vector, "expected"))]);
            let verified = post(
                Scheme::Shopify,
                &[&text(vector, "secret")],
                &headers,
                &text(vector, "body"),
                at_secs(0),
            );
            assert!(verified.is_ok(), "{}: {verified:?}", vector["name"]);
            count += 1;
        }
        for vector in load("woocommerce")["vectors"].as_array().expect("vectors") {
            let headers = header_map(&[("X-WC-Webhook-Signature", &text(vector, "expected"))]);
            let verified = post(
                Scheme::WooCommerce,
                &[&text(vector, "secret")],
                &headers,
                &text(vector, "body"),
                at_secs(0),
            );
            assert!(verified.is_ok(), "{}: {verified:?}", vector["name"]);
            count += 1;
        }
        for vector in load("stripe")["vectors"].as_array().expect("vectors") {
            let headers = header_map(&[("Stripe-Signature", &text(vector, "header"))]);
            let now = at_secs(vector["timestamp"].as_u64().expect("timestamp"));
            let verified = post(
                stripe(),
                &[&text(vector, "secret")],
                &headers,
                &text(vector, "payload"),
                now,
            );
            assert_eq!(
                verified.is_ok(),
                expect_valid(vector),
                "{}: {verified:?}",
                vector["name"]
            );
            count += 1;
        }
        for vector in load("hubspot")["vectors"].as_array().expect("vectors") {
            let version = text(vector, "version");
            let (scheme, headers, now) = if version == "v3" {
                let timestamp = text(vector, "timestamp");
                let millis = timestamp.parse().expect("timestamp in ms");
                let headers = header_map(&[
                    ("X-HubSpot-Signature-v3", &text(vector, "expected")),
                    ("X-HubSpot-Request-Timestamp", &timestamp),
                ]);
                (
                    hubspot_v3(),
                    headers,
                    UNIX_EPOCH + Duration::from_millis(millis),
                )
            } else {
                let headers = header_map(&[
                    ("X-HubSpot-Signature", &text(vector, "expected")),
                    ("X-HubSpot-Signature-Version", &version),
                ]);
                (Scheme::HubSpotV1V2, headers, at_secs(0))
            };
            let uri = vector["uri"].as_str().unwrap_or(URI);
            let verified = check(
                scheme,
                &[&text(vector, "client_secret")],
                &text(vector, "method"),
                uri,
                &headers,
                &text(vector, "body"),
                now,
            );
            assert!(verified.is_ok(), "{}: {verified:?}", vector["name"]);
            count += 1;
        }
        for vector in load("standard-webhooks")["vectors"]
            .as_array()
            .expect("vectors")
        {
            let timestamp = vector["webhook_timestamp"].as_u64().expect("timestamp");
            let signature = vector["expected_header"]
                .as_str()
                .or(vector["header"].as_str())
                .expect("signature");
            let headers = header_map(&[
                ("webhook-id", &text(vector, "webhook_id")),
                ("webhook-timestamp", &timestamp.to_string()),
                ("webhook-signature", signature),
            ]);
            let verified = post(
                standard_webhooks(),
                &[&text(vector, "secret")],
                &headers,
                &text(vector, "payload"),
                at_secs(timestamp),
            );
            assert_eq!(
                verified.is_ok(),
                expect_valid(vector),
                "{}: {verified:?}",
                vector["name"]
            );
            count += 1;
        }

        assert!(
            count >= 17,
            "expected every fixture vector to run, ran {count}"
        );
    }

    /// A body-only signer's delivery resent with its original body inside Shopify's
    /// 48-hour retry window is a duplicate in the inbox, whatever its delivery id; a
    /// scheme that signs a timestamp or message id leaves duplicates to those.
    #[tokio::test]
    async fn a_body_only_signed_body_resent_within_shopifys_retry_window_is_a_duplicate() {
        use crate::store::{Enqueued, NewWebhook};
        let (_dir, store) = crate::store::tests::temp_store();
        let now = chrono::Utc::now();
        let body = bytes::Bytes::from_static(br#"{"token":"t"}"#);
        let delivery = |scheme: &Scheme, connection: &str, id: &str, hours_ago: i64| NewWebhook {
            connection: connection.into(),
            delivery_id: id.into(),
            topic: None,
            headers: Vec::new(),
            body_sha256: scheme
                .body_replay_window()
                .map(|window| (Sha256::digest(&body).into(), window)),
            body: body.clone(),
            received_at: now - chrono::Duration::hours(hours_ago),
        };
        for (name, scheme) in [("shop", Scheme::Shopify), ("woo", Scheme::WooCommerce)] {
            let first = store
                .enqueue_webhook(delivery(&scheme, name, "d-1", 47))
                .await
                .unwrap();
            assert_eq!(first, Enqueued::Stored, "{name}");
            let resent = store
                .enqueue_webhook(delivery(&scheme, name, "d-2", 0))
                .await
                .unwrap();
            assert_eq!(resent, Enqueued::Duplicate, "{name}: 47 hours later");
        }
        let tolerance = Duration::from_secs(300);
        for scheme in [
            Scheme::Stripe { tolerance },
            Scheme::HubSpotV3 { tolerance },
            Scheme::StandardWebhooks { tolerance },
            Scheme::PipedriveBasic,
            Scheme::None,
        ] {
            assert_eq!(scheme.body_replay_window(), None, "{scheme:?}");
        }
        let stripe = Scheme::Stripe { tolerance };
        for id in ["evt-1", "evt-2"] {
            let stored = store
                .enqueue_webhook(delivery(&stripe, "stripe", id, 0))
                .await
                .unwrap();
            assert_eq!(
                stored,
                Enqueued::Stored,
                "a new Stripe event id is a new event"
            );
        }
    }
}

#[cfg(test)]
mod proptests {
    use super::*;
    use proptest::prelude::*;

    /// Every header this module reads.
    const HEADERS: &[&str] = &[
        header::SHOPIFY_HMAC,
        header::SHOPIFY_EVENTS_HMAC,
        header::SHOPIFY_WEBHOOK_ID,
        header::SHOPIFY_EVENTS_WEBHOOK_ID,
        header::SHOPIFY_EVENT_ID,
        header::SHOPIFY_EVENTS_EVENT_ID,
        header::WOOCOMMERCE_SIGNATURE,
        header::WOOCOMMERCE_DELIVERY_ID,
        header::STRIPE_SIGNATURE,
        header::HUBSPOT_SIGNATURE,
        header::HUBSPOT_SIGNATURE_VERSION,
        header::HUBSPOT_SIGNATURE_V3,
        header::HUBSPOT_REQUEST_TIMESTAMP,
        header::AUTHORIZATION,
        header::WEBHOOK_ID,
        header::WEBHOOK_TIMESTAMP,
        header::WEBHOOK_SIGNATURE,
    ];

    fn schemes() -> Vec<Scheme> {
        vec![
            Scheme::Shopify,
            Scheme::WooCommerce,
            Scheme::Stripe {
                tolerance: DEFAULT_TOLERANCE,
            },
            Scheme::HubSpotV3 {
                tolerance: DEFAULT_TOLERANCE,
            },
            Scheme::HubSpotV1V2,
            Scheme::PipedriveBasic,
            Scheme::StandardWebhooks {
                tolerance: DEFAULT_TOLERANCE,
            },
            Scheme::None,
        ]
    }

    /// A secret in the format `scheme` takes, from `raw` (non-empty bytes).
    fn secret_for(scheme: &Scheme, raw: &[u8]) -> Vec<u8> {
        match scheme {
            Scheme::StandardWebhooks { .. } => format!("whsec_{}", BASE64.encode(raw)).into_bytes(),
            Scheme::PipedriveBasic => [b"hook-user:".as_slice(), raw].concat(),
            _ => raw.to_vec(),
        }
    }

    /// Header values a sender could put anywhere: arbitrary bytes, and text shaped like
    /// each scheme's values (timestamps, hex, base64, lists) to reach past the first check.
    fn header_value() -> impl Strategy<Value = Vec<u8>> {
        prop_oneof![
            prop::collection::vec(any::<u8>(), 0..80),
            "t=[0-9]{0,22}(,v[0-9]=[0-9a-fA-F]{0,66}){0,3},?".prop_map(String::into_bytes),
            "(v1[a]?,[A-Za-z0-9+/=]{0,46} ?){0,3}".prop_map(String::into_bytes),
            "[Bb]asic ?[A-Za-z0-9+/=]{0,24}".prop_map(String::into_bytes),
            "[0-9]{0,24}|v[0-9]|[A-Za-z0-9+/]{43}=".prop_map(String::into_bytes),
        ]
    }

    fn headers() -> impl Strategy<Value = HeaderMap> {
        prop::collection::vec((prop::sample::select(HEADERS), header_value()), 0..8).prop_map(
            |pairs| {
                pairs
                    .into_iter()
                    .filter_map(|(name, value)| {
                        Some((
                            HeaderName::from_static(name),
                            HeaderValue::from_bytes(&value).ok()?,
                        ))
                    })
                    .collect()
            },
        )
    }

    /// A clock anywhere from the epoch to well past today.
    fn now() -> impl Strategy<Value = SystemTime> {
        (0u64..8_000_000_000).prop_map(|secs| UNIX_EPOCH + Duration::from_secs(secs))
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn no_headers_body_or_uri_panic_any_scheme(
            headers in headers(),
            body in prop::collection::vec(any::<u8>(), 0..64),
            uri in prop_oneof![".{0,24}", "https://h\\.example/[%0-9a-fA-F:/?@]{0,24}"],
            secret in prop::collection::vec(any::<u8>(), 0..24),
            now in now(),
        ) {
            let request = Request { method: "POST", uri: &uri, headers: &headers, body: &body };
            for scheme in schemes() {
                let secret = secret_for(&scheme, &secret);
                let secrets: [&[u8]; 3] = [b"", &secret, b"whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"];
                let _ = verify(&scheme, &secrets, &request, now);
                let _ = validate_secret(&scheme, &secret);
            }
            let _ = is_woocommerce_ping(&headers, &body);
        }

        #[test]
        fn a_correct_signature_over_any_body_verifies(
            body in prop::collection::vec(any::<u8>(), 0..256),
            raw_secret in prop::collection::vec(any::<u8>(), 1..48),
            id in "[!-~]{1,32}",
            uri in "https://hooks\\.example/[!-~]{0,24}",
            now in now(),
        ) {
            for scheme in schemes().into_iter().filter(|s| *s != Scheme::None) {
                let secret = secret_for(&scheme, &raw_secret);
                let delivery = Delivery { method: "POST", uri: &uri, body: &body, id: &id };
                let headers = sign(&scheme, &secret, &delivery, now).expect("signing");
                let request = Request { method: "POST", uri: &uri, headers: &headers, body: &body };
                let another = secret_for(&scheme, b"another-secret");
                let verified = verify(&scheme, &[&another, &secret], &request, now);
                prop_assert!(verified.is_ok(), "{scheme:?}: {verified:?}");
                let verified = verified.unwrap();
                prop_assert_eq!(verified.secret_index, Some(1), "{:?}", scheme);
                if matches!(
                    scheme,
                    Scheme::Shopify | Scheme::WooCommerce | Scheme::StandardWebhooks { .. }
                ) {
                    prop_assert_eq!(verified.delivery_id.as_deref(), Some(id.as_str()));
                }
            }
        }

        #[test]
        fn a_one_bit_flip_in_the_body_or_the_secret_does_not_verify(
            body in prop::collection::vec(any::<u8>(), 1..256),
            raw_secret in prop::collection::vec(any::<u8>(), 1..48),
            bit in any::<prop::sample::Index>(),
            secret_bit in any::<prop::sample::Index>(),
            now in now(),
        ) {
            let uri = "https://hooks.example/webhooks/shop";
            for scheme in schemes().into_iter().filter(|s| *s != Scheme::None) {
                let secret = secret_for(&scheme, &raw_secret);
                let delivery = Delivery { method: "POST", uri, body: &body, id: "delivery-1" };
                let headers = sign(&scheme, &secret, &delivery, now).expect("signing");

                let mut flipped_body = body.clone();
                let at = bit.index(body.len() * 8);
                flipped_body[at / 8] ^= 1 << (at % 8);
                let request = Request { method: "POST", uri, headers: &headers, body: &flipped_body };
                let outcome = verify(&scheme, &[&secret], &request, now);
                if scheme == Scheme::PipedriveBasic {
                    // Basic auth proves the sender, not the body.
                    prop_assert!(outcome.is_ok(), "{:?}", outcome);
                } else {
                    prop_assert_eq!(outcome, Err(SignatureError::Mismatch), "{:?}", scheme);
                }

                let mut flipped_raw = raw_secret.clone();
                let at = secret_bit.index(raw_secret.len() * 8);
                flipped_raw[at / 8] ^= 1 << (at % 8);
                let other = secret_for(&scheme, &flipped_raw);
                let request = Request { method: "POST", uri, headers: &headers, body: &body };
                let outcome = verify(&scheme, &[&other], &request, now);
                prop_assert_eq!(outcome, Err(SignatureError::Mismatch), "{:?}", scheme);
            }
        }
    }
}
