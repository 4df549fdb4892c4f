//! Entry points of the fuzz targets (`fuzz/fuzz_targets/`, run with `cargo fuzz`) and of
//! the test that replays their corpus on stable Rust (`tests/fuzz_corpus.rs`): one
//! function per target, called by both, so the two cannot drift apart. Not an API.
//!
//! Each function takes arbitrary bytes, feeds them to the code the daemon runs on bytes
//! from outside (a webhook's headers and body, a vendor's list page, the config file, an
//! amount), the way the daemon calls it, and panics only when an invariant breaks: any
//! panic is a finding. See docs/testing.md, "Fuzzing".
//!
//! Input formats (chosen so corpus files stay readable and vendor payloads seed them):
//! - `signature`: a request line `<scheme> <now, unix seconds> <METHOD> <URI>`, then a
//!   delivery (below). Schemes: `shopify`, `woocommerce`, `stripe`, `hubspot_v3`,
//!   `hubspot_v1v2`, `pipedrive_basic`, `standard_webhooks`, `none`.
//! - `webhook_*`: a delivery: header lines `name: value`, an empty line, the body.
//! - `manifest_records`: a list page body, read by every built-in manifest.
//! - `config`: a config file's text.
//! - `money`: a currency selector byte, then an amount's text.

use crate::config::interpolate::{self, Env};
use crate::connectors::manifest::records::split_page;
use crate::connectors::manifest::{Catalog, ManifestConnector};
use crate::connectors::signature::{self, Delivery, Scheme, SchemeName, SignatureError};
use crate::connectors::{BadRecord, Connector, Registry, WebhookAction, WebhookEvent};
use crate::domain::{Currency, Money, check_depth};
use http::{HeaderMap, HeaderName, HeaderValue};
use serde_json::Value;
use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// A target's entry function: takes the fuzzer's bytes, panics on a finding.
pub type Entry = fn(&[u8]);

/// Every fuzz target by name (the name of its `fuzz/fuzz_targets/<name>.rs` and of its
/// corpus directory `fuzz/corpus/<name>/`) and its entry function.
pub const TARGETS: &[(&str, Entry)] = &[
    ("signature", signature),
    ("webhook_shopify", webhook_shopify),
    ("webhook_woocommerce", webhook_woocommerce),
    ("webhook_stripe", webhook_stripe),
    ("webhook_hubspot", webhook_hubspot),
    ("webhook_pipedrive", webhook_pipedrive),
    ("webhook_generic", webhook_generic),
    ("manifest_records", manifest_records),
    ("config", config),
    ("money", money),
];

/// The entry function of the target `name`.
pub fn target(name: &str) -> Option<Entry> {
    TARGETS
        .iter()
        .find(|(target, _)| *target == name)
        .map(|(_, run)| *run)
}

/// A delivery split as an HTTP server hands it over: the headers it accepts (lines whose
/// name or value HTTP refuses are left out, as a server would refuse them), and the body.
struct Delivered<'a> {
    headers: HeaderMap,
    body: &'a [u8],
}

/// Parses `name: value` lines up to the first empty line; the rest is the body.
fn delivered(data: &[u8]) -> Delivered<'_> {
    let mut headers = HeaderMap::new();
    let mut rest = data;
    loop {
        let (line, after) = match rest.iter().position(|&byte| byte == b'\n') {
            Some(at) => (&rest[..at], &rest[at + 1..]),
            None => (rest, &rest[rest.len()..]),
        };
        rest = after;
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.is_empty() {
            break;
        }
        let Some(colon) = line.iter().position(|&byte| byte == b':') else {
            continue;
        };
        let value = line[colon + 1..].trim_ascii();
        if let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(line[..colon].trim_ascii()),
            HeaderValue::from_bytes(value),
        ) {
            headers.append(name, value);
        }
        if rest.is_empty() {
            break;
        }
    }
    Delivered {
        headers,
        body: rest,
    }
}

/// The schemes by the names the `signature` target's request line uses, each with the
/// secrets configured for it: an empty one (never matches), an old one still in
/// rotation, and the current one (the shared fixtures' vector secret, so the seed
/// vectors verify).
fn scheme_named(name: &[u8]) -> Option<(Scheme, [&'static [u8]; 3])> {
    let name: SchemeName = std::str::from_utf8(name).ok()?.parse().ok()?;
    let secrets: [&'static [u8]; 3] = match name {
        SchemeName::Shopify => [b"", b"old-secret", b"test_secret_key"],
        SchemeName::WooCommerce => [b"", b"old-secret", b"wc_webhook_secret"],
        SchemeName::Stripe => [b"", b"whsec_old", b"whsec_test_secret"],
        SchemeName::HubSpotV3 | SchemeName::HubSpotV1V2 => {
            [b"", b"old-secret", b"yyyyyyyy-yyyy-yyyy-yyyy-yyyyyyyyyyyy"]
        }
        SchemeName::PipedriveBasic => [b"", b"hook-user:old-password", b"hook-user:hook-password"],
        // No empty one: a Standard Webhooks secret must decode to a key, and the config
        // refuses one that does not.
        SchemeName::StandardWebhooks => [
            b"whsec_b2xkLXNlY3JldA==",
            b"whsec_b2xkZXItc2VjcmV0",
            b"whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
        ],
        SchemeName::None => [b"", b"", b""],
    };
    Some((name.scheme(), secrets))
}

/// `signature`: the webhook signature checks of every scheme ([`signature::verify`])
/// over a request's method, URI, headers and body, at a given clock.
///
/// Checks: no panic; a verified delivery names a configured, non-empty secret and, for
/// a timestamped scheme, a signed time within the tolerance of the clock; no error
/// message quotes a secret; and what [`signature::sign`] signs for the same method,
/// URI, body and clock verifies, with the secret it was signed with.
pub fn signature(data: &[u8]) {
    let (request_line, rest) = match data.iter().position(|&byte| byte == b'\n') {
        Some(at) => (&data[..at], &data[at + 1..]),
        None => (data, &data[data.len()..]),
    };
    let mut words = request_line.split(|&byte| byte == b' ');
    let Some((scheme, secrets)) = words.next().and_then(scheme_named) else {
        return;
    };
    // The clock, up to the end of year 9999 (the daemon passes its own clock; past
    // year 584 million HubSpot's millisecond timestamps no longer fit in 64 bits, so
    // `sign` writes one `verify` refuses).
    let now = words
        .next()
        .and_then(|word| std::str::from_utf8(word).ok()?.parse::<u64>().ok())
        .filter(|secs| *secs < 253_402_300_800)
        .map_or(UNIX_EPOCH + Duration::from_secs(1_768_986_405), |secs| {
            UNIX_EPOCH + Duration::from_secs(secs)
        });
    let method = words
        .next()
        .and_then(|word| std::str::from_utf8(word).ok())
        .unwrap_or("POST");
    let uri = words
        .next()
        .and_then(|word| std::str::from_utf8(word).ok())
        .unwrap_or("https://hooks.example/webhooks/c");
    let Delivered { headers, body } = delivered(rest);

    let request = signature::Request {
        method,
        uri,
        headers: &headers,
        body,
    };
    match signature::verify(&scheme, &secrets, &request, now) {
        Ok(verified) => check_verified(&scheme, &secrets, &verified, now),
        Err(error) => check_error_is_quiet(&error, &secrets),
    }
    let _ = Scheme::WooCommerce.is_ping(&headers, body);
    let _ = signature::validate_secret(&scheme, body);

    // Round trip: what the sending side signs verifies, whatever the body and URI.
    if scheme == Scheme::None {
        return;
    }
    let id = headers
        .values()
        .find_map(|value| value.to_str().ok().filter(|id| !id.trim().is_empty()))
        .unwrap_or("delivery-1")
        .trim();
    let delivery = Delivery {
        method,
        uri,
        body,
        id,
    };
    let signed = signature::sign(&scheme, secrets[2], &delivery, now)
        .expect("a configured secret and a visible-ASCII id always sign");
    let request = signature::Request {
        method,
        uri,
        headers: &signed,
        body,
    };
    let verified = signature::verify(&scheme, &secrets, &request, now)
        .unwrap_or_else(|error| panic!("{scheme:?}: what sign() signed does not verify: {error}"));
    assert_eq!(verified.secret_index, Some(2), "{scheme:?}");
    if matches!(
        scheme,
        Scheme::Shopify | Scheme::WooCommerce | Scheme::StandardWebhooks { .. }
    ) {
        assert_eq!(verified.delivery_id.as_deref(), Some(id), "{scheme:?}");
    }
}

fn check_verified(
    scheme: &Scheme,
    secrets: &[&[u8]],
    verified: &signature::Verified,
    now: SystemTime,
) {
    if *scheme == Scheme::None {
        return;
    }
    let index = verified
        .secret_index
        .unwrap_or_else(|| panic!("{scheme:?}: verified without naming a secret"));
    assert!(
        secrets.get(index).is_some_and(|secret| !secret.is_empty()),
        "{scheme:?}: verified with secret {index}, which is empty or absent"
    );
    let tolerance = match scheme {
        Scheme::Stripe { tolerance }
        | Scheme::HubSpotV3 { tolerance }
        | Scheme::StandardWebhooks { tolerance } => *tolerance,
        _ => return,
    };
    let signed_at = verified
        .signed_at
        .unwrap_or_else(|| panic!("{scheme:?}: verified without a signed time"));
    let distance = now
        .duration_since(signed_at)
        .unwrap_or_else(|error| error.duration());
    assert!(
        distance <= tolerance,
        "{scheme:?}: verified a delivery signed {distance:?} away from the clock"
    );
}

/// Errors carry header names and fixed reasons only, never a secret.
fn check_error_is_quiet(error: &SignatureError, secrets: &[&[u8]]) {
    let message = error.to_string();
    for secret in secrets.iter().filter(|secret| secret.len() >= 6) {
        let secret = String::from_utf8_lossy(secret);
        assert!(
            !message.contains(secret.as_ref()),
            "an error quotes a secret: {message}"
        );
    }
}

/// A connector built from a one-connection config, as the daemon builds it.
fn configured(connector: &str, settings: &str) -> Arc<dyn Connector> {
    let text = format!("[connections.c]\nconnector = \"{connector}\"\n{settings}\n");
    let config = crate::config::parse(Path::new("fuzz.toml"), &text, &NoEnv)
        .expect("the fuzz targets' connection configs are valid");
    Registry::build(&config.connections[0], &config).expect("the fuzz targets' connections build")
}

struct NoEnv;

impl Env for NoEnv {
    fn var(&self, _name: &str) -> Option<String> {
        None
    }
}

/// What webhook intake does with a delivery's headers and body once the signature
/// holds (`http::webhooks::receive`), then what the inbox worker does first: parse it.
///
/// Checks: no panic; no header that authenticates a delivery is among the stored ones;
/// a body the depth check lets through is never refused by the JSON parser for its
/// depth (what is stored must parse back); every record an action or a refusal carries
/// is JSON that parses back and passes the depth check.
fn webhook(connector: &dyn Connector, data: &[u8]) {
    let Delivered { headers, body } = delivered(data);
    let scheme = connector
        .webhook_scheme()
        .expect("the webhook targets' connectors take webhooks");
    let stored = crate::http::webhooks::stored_headers(&headers);
    for (name, _) in &stored {
        assert!(
            !SECRET_HEADERS.contains(&name.as_str()),
            "header {name} would be stored"
        );
    }
    let topic = scheme.topic(&headers);
    let delivery_id = scheme.delivery_id(&signature::Verified::default(), body);
    if check_depth(body).is_err() {
        // Dead-lettered before anything parses it.
        return;
    }
    if let Err(error) = serde_json::from_slice::<Value>(body) {
        assert!(
            !error.to_string().contains("recursion limit"),
            "check_depth let through JSON too deep to parse: {error}"
        );
    }
    let event = WebhookEvent {
        connection: "c".into(),
        delivery_id,
        topic,
        headers: stored,
        body: body.to_vec(),
        received_at: chrono::DateTime::UNIX_EPOCH,
    };
    match connector.parse_webhook(&event) {
        Ok(actions) => {
            for action in actions {
                match action {
                    WebhookAction::Upsert(deal) => check_raw(deal.raw.as_str()),
                    WebhookAction::Delete { external_id }
                    | WebhookAction::Refetch { external_id } => {
                        assert!(!external_id.is_empty(), "an action without an id")
                    }
                    WebhookAction::Delivery(event) => {
                        assert!(!event.key.is_empty(), "a delivery event without a key")
                    }
                    WebhookAction::ConfirmSubscription { url } => {
                        assert!(!url.is_empty(), "a confirmation without a URL")
                    }
                }
            }
        }
        Err(bad) => check_bad(&bad),
    }
}

/// The headers `http::webhooks` must never store (it reads `signature::header::SECRET`;
/// this list is the contract, so a header dropped from that one is caught here).
const SECRET_HEADERS: &[&str] = &[
    signature::header::SHOPIFY_HMAC,
    signature::header::SHOPIFY_EVENTS_HMAC,
    signature::header::WOOCOMMERCE_SIGNATURE,
    signature::header::STRIPE_SIGNATURE,
    signature::header::HUBSPOT_SIGNATURE,
    signature::header::HUBSPOT_SIGNATURE_V3,
    signature::header::AUTHORIZATION,
    signature::header::WEBHOOK_SIGNATURE,
    "x-twilio-email-event-webhook-signature",
    "cookie",
    "proxy-authorization",
];

fn check_raw(text: &str) {
    let parsed = serde_json::from_str::<Value>(text);
    assert!(
        parsed.is_ok(),
        "a stored record does not parse back: {parsed:?}"
    );
    assert!(
        check_depth(text.as_bytes()).is_ok(),
        "a stored record is too deep to read back"
    );
}

fn check_bad(bad: &BadRecord) {
    check_raw(bad.raw.as_str());
}

macro_rules! webhook_target {
    ($(#[$doc:meta])* $name:ident, $connector:literal, $settings:literal) => {
        $(#[$doc])*
        pub fn $name(data: &[u8]) {
            static CONNECTOR: OnceLock<Arc<dyn Connector>> = OnceLock::new();
            let connector = CONNECTOR.get_or_init(|| configured($connector, $settings));
            webhook(connector.as_ref(), data);
        }
    };
}

webhook_target!(
    /// `webhook_shopify`: Shopify deliveries (checkouts and orders, by `X-Shopify-Topic`).
    webhook_shopify,
    "shopify",
    "webhook_secret = \"test_secret_key\""
);
webhook_target!(
    /// `webhook_woocommerce`: WooCommerce order deliveries (`X-WC-Webhook-Topic`,
    /// `X-WC-Webhook-Resource`), consent read from the order meta.
    webhook_woocommerce,
    "woocommerce",
    "webhook_secret = \"wc_webhook_secret\""
);
webhook_target!(
    /// `webhook_stripe`: Stripe events (Checkout Sessions).
    webhook_stripe,
    "stripe",
    "webhook_secret = \"whsec_test_secret\""
);
webhook_target!(
    /// `webhook_hubspot`: HubSpot's batched deal events, through the built-in manifest.
    webhook_hubspot,
    "hubspot",
    "token = \"t\"\nwebhook_secret = \"yyyyyyyy-yyyy-yyyy-yyyy-yyyyyyyyyyyy\""
);
webhook_target!(
    /// `webhook_pipedrive`: Pipedrive v2 deal events (records in the body), through the
    /// built-in manifest.
    webhook_pipedrive,
    "pipedrive",
    "token = \"t\"\nwebhook_secret = \"hook-user:hook-password\""
);
webhook_target!(
    /// `webhook_generic`: the generic `webhook` connector's JSON deliveries.
    webhook_generic,
    "webhook",
    "webhook_secret = \"whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw\""
);

/// The built-in manifest connectors (Salesforce takes no webhooks: its records are
/// read from list pages only, which this target covers).
fn manifest_connectors() -> &'static [ManifestConnector] {
    static CONNECTORS: OnceLock<Vec<ManifestConnector>> = OnceLock::new();
    CONNECTORS.get_or_init(|| {
        let catalog = Catalog::load(None).expect("the built-in manifests load");
        let salesforce = "[connections.c.oauth]\nclient_id = \"x\"\nclient_secret = \"y\"\nrefresh_token = \"z\"";
        [
            ("hubspot", "token = \"t\""),
            ("pipedrive", "token = \"t\""),
            ("salesforce", salesforce),
        ]
        .into_iter()
        .map(|(name, credentials)| {
            let text = format!("[connections.c]\nconnector = \"{name}\"\n{credentials}\n");
            let config = crate::config::parse(Path::new("fuzz.toml"), &text, &NoEnv)
                .expect("the fuzz targets' connection configs are valid");
            let manifest = catalog.get(name).expect("a built-in manifest");
            ManifestConnector::new(manifest, &config.connections[0])
                .unwrap_or_else(|(key, message)| panic!("{name}: {key}: {message}"))
        })
        .collect()
    })
}

/// `manifest_records`: a vendor's list page read by each built-in manifest (HubSpot,
/// Pipedrive, Salesforce): split at the manifest's records pointer, each record pruned
/// to the values the mapping reads, then mapped to a deal by the manifest's field
/// extraction (pointers, enrichment paths, strings, enums, amounts, timestamps, dates,
/// booleans, consent).
///
/// Checks: no panic; every record's text parses back to the value it holds in the page;
/// the pruned record maps exactly like the whole one (the list read maps pruned
/// records, so a difference is a field read wrong), and yields the same modification
/// time; a deal's stored record parses back.
pub fn manifest_records(data: &[u8]) {
    for connector in manifest_connectors() {
        let deals = &connector.manifest().deals;
        let mut pointers = vec![deals.full.records.as_str()];
        if let Some(incremental) = &deals.incremental
            && incremental.records != deals.full.records
        {
            pointers.push(incremental.records.as_str());
        }
        for pointer in pointers {
            let Ok(page) = split_page(data, pointer) else {
                continue;
            };
            for raw in &page.records {
                check_raw(raw.as_str());
                let whole = raw.to_value();
                let pruned = connector.plan().prune(raw.as_str());
                let none = HashMap::new();
                if let Ok(pruned) = &pruned {
                    let from_pruned = connector.map_fields(pruned, &none, false);
                    let from_whole = connector.map_fields(&whole, &none, false);
                    match (from_pruned, from_whole) {
                        (Ok(a), Ok(b)) => assert_eq!(a, b, "{pointer}: pruned and whole differ"),
                        (Err(a), Err(b)) => assert_eq!(
                            (a.external_id, a.reason),
                            (b.external_id, b.reason),
                            "{pointer}: pruned and whole fail differently"
                        ),
                        (a, b) => panic!("{pointer}: pruned {a:?}, whole {b:?}"),
                    }
                    assert_eq!(
                        connector.modified_of(pruned, &none),
                        connector.modified_of(&whole, &none)
                    );
                }
                // Enrichment paths (`@name/pointer`) over the record itself.
                let enriched: HashMap<String, Value> = deals
                    .enrich
                    .iter()
                    .map(|step| (step.name.clone(), whole.clone()))
                    .collect();
                match connector.to_deal(&whole, &enriched, false) {
                    Ok(deal) => check_raw(deal.raw.as_str()),
                    Err(bad) => check_bad(&bad),
                }
            }
        }
    }
}

/// The environment the `config` target's interpolation sees.
struct FuzzEnv;

/// A secret only the environment holds; it must never appear in an error message.
const ENV_SECRET: &str = "s3cr3t-from-env";

impl Env for FuzzEnv {
    fn var(&self, name: &str) -> Option<String> {
        match name {
            "TOKEN" => Some(ENV_SECRET.to_owned()),
            "EMPTY" => Some(String::new()),
            "PORT" => Some("8080".to_owned()),
            _ => None,
        }
    }
}

/// `config`: a config file's text through `config::parse` (TOML, `${VAR}` and
/// `${credential:NAME}` interpolation, typing, validation), and the interpolation alone
/// over the text as one string value.
///
/// Checks: no panic; an error message never shows the value of a variable
/// (`${TOKEN}`) when the file does not spell that value out itself; text without `$`
/// is left as it is by the interpolation.
pub fn config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Err(error) = crate::config::parse(Path::new("fuzz.toml"), text, &FuzzEnv) {
        // Escapes (`\u0073`) can spell the value without its text: only a file that
        // has neither can be held to it.
        if !text.contains(ENV_SECRET) && !text.contains('\\') {
            let message = error.to_string();
            assert!(
                !message.contains(ENV_SECRET),
                "a config error shows a substituted value: {message}"
            );
        }
    }

    let mut value = toml::Value::String(text.to_owned());
    let outcome = interpolate::interpolate(&mut value, &FuzzEnv);
    if !text.contains('$') {
        assert_eq!(outcome.as_deref(), Ok(&[][..]));
        assert_eq!(value.as_str(), Some(text));
    }
    if let Err(errors) = outcome
        && !text.contains(ENV_SECRET)
    {
        for error in errors {
            assert!(!error.message.contains(ENV_SECRET), "{}", error.message);
        }
    }
}

/// Currencies with each minor-unit exponent ISO 4217 has (0, 2, 3, 4).
const CURRENCIES: &[&str] = &["EUR", "JPY", "KWD", "CLF", "USD", "ISK", "BHD", "UYW"];

/// `money`: an amount's decimal text (`Money::parse_decimal`, which every connector
/// uses on vendor amounts), and the minor-unit integers manifests read.
///
/// Checks: no panic; a parsed amount formats to text that parses to the same amount;
/// a sign in front negates (rounding is half away from zero, so symmetric); integer
/// minor units format and parse back.
pub fn money(data: &[u8]) {
    let Some((&selector, rest)) = data.split_first() else {
        return;
    };
    let currency = Currency::parse(CURRENCIES[usize::from(selector) % CURRENCIES.len()])
        .expect("a listed currency");
    let Ok(text) = std::str::from_utf8(rest) else {
        return;
    };
    if let Ok(parsed) = Money::parse_decimal(text, currency) {
        let formatted = parsed.to_decimal_string();
        assert_eq!(
            Money::parse_decimal(&formatted, currency),
            Ok(parsed),
            "{text:?} parsed to {parsed}, whose text {formatted:?} parses differently"
        );
        let trimmed = text.trim();
        if !trimmed.starts_with(['-', '+'])
            && let Ok(negated) = Money::parse_decimal(&format!("-{trimmed}"), currency)
        {
            assert_eq!(negated.minor, -parsed.minor, "-({text:?})");
        }
    }
    if let Some(minor) = crate::connectors::manifest::fields::parse_minor_units(text) {
        let money = Money::new(minor, currency);
        assert_eq!(
            Money::parse_decimal(&money.to_decimal_string(), currency),
            Ok(money)
        );
        assert_eq!(minor.to_string().parse::<i64>(), Ok(minor));
    }
    if let Ok(number) = serde_json::from_str::<serde_json::Number>(text) {
        // A JSON amount reaches the connectors as serde_json's number (an f64 when it
        // is not an integer), read back through its shortest text: exact for up to 15
        // significant digits, which every currency amount has.
        let mantissa = text.trim().split(['e', 'E']).next().unwrap_or_default();
        let significant = mantissa
            .trim_start_matches(['-', '0', '.'])
            .bytes()
            .filter(u8::is_ascii_digit)
            .count();
        if significant <= 15 {
            let value = Value::Number(number);
            assert_eq!(
                crate::connectors::ecommerce::decimal(Some(&value), currency),
                Money::parse_decimal(text, currency).ok(),
                "the JSON number {text} is read as another amount"
            );
        }
    }
}
